"""The vmsim command line."""

import json
import os
import sys
from pathlib import Path

import click
from rich.console import Console

from vmsim.launcher.defaults import DEFAULT_TOPOLOGY
from vmsim.launcher.live import foreground
from vmsim.launcher.run import LaunchError, Run, sweep_stale_runs
from vmsim.launcher.summary import render_summary
from vmsim.launcher.topology import TopologyError, load_topology, load_topology_file

EXIT_USAGE = 2


def _fail(msg: str, code: int = EXIT_USAGE) -> None:
    click.echo(f"vmsim: {msg}", err=True)
    sys.exit(code)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="vmsim")
def main() -> None:
    """vmsim: the Linux virtio subsystem, run for real as processes.

    A guest process holds virtio drivers, a host process holds virtio devices; they share
    guest RAM (POSIX shared memory holding the vrings) and signal with eventfds."""


@main.command()
@click.argument("config", required=False, type=click.Path(dir_okay=False))
@click.option("--duration", type=click.FloatRange(min=0, min_open=True), metavar="S",
              help="Stop the run after S seconds (default: the topology's, else 10).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, writable=True),
              metavar="FILE", help="Write the summary as JSON to FILE.")
@click.option("--quiet", "-q", is_flag=True,
              help="No dashboard, no progress lines, no summary table.")
@click.option("--no-dashboard", is_flag=True,
              help="No live dashboard on a terminal: progress lines on stderr instead.")
@click.option("--refresh", type=click.FloatRange(1, 20), default=4.0, show_default=True,
              metavar="HZ", help="Dashboard refreshes per second.")
@click.option("--stats-file", type=click.Path(dir_okay=False, writable=True), metavar="FILE",
              help="Append one JSON line of counters and rates per interval to FILE.")
@click.option("--stats-every", type=click.FloatRange(min=0.05), metavar="S",
              help="The --stats-file interval in seconds (default 1).")
def run(config: str | None, duration: float | None, json_path: str | None, quiet: bool,
        no_dashboard: bool, refresh: float, stats_file: str | None,
        stats_every: float | None) -> None:
    """Run a topology (CONFIG, a YAML file; without it, the built-in default).

    On a terminal a live dashboard shows every queue (q quits, p pauses, tab focuses);
    elsewhere (a pipe, CI) a progress line goes to stderr every 2 s."""
    try:
        if config is None:
            topo = load_topology(DEFAULT_TOPOLOGY, "<built-in default>")
            source, config_dir = "<built-in default>", Path.cwd()
        else:
            topo = load_topology_file(config)
            source, config_dir = config, Path(config).resolve().parent
    except TopologyError as e:
        _fail(f"config error: {e}")
    for opt, path in (("--json", json_path), ("--stats-file", stats_file)):
        if path is not None:
            parent = os.path.dirname(os.path.abspath(path))
            if not os.path.isdir(parent):
                _fail(f"{opt}: directory {parent} does not exist")
    if stats_every is not None and stats_file is None:
        _fail("--stats-every needs --stats-file FILE")
    dashboard = not (quiet or no_dashboard) and foreground(sys.stdout.fileno())
    try:
        result = Run(topo, source, config_dir, duration=duration, progress=not quiet,
                     dashboard=dashboard, refresh_hz=refresh, stats_file=stats_file,
                     stats_every=stats_every or 1.0).execute()
    except LaunchError as e:
        _fail(str(e), 3)
    if json_path is not None:
        with open(json_path, "w") as f:
            json.dump(result.summary, f, indent=2)
            f.write("\n")
    if not quiet:
        # Off a terminal rich would assume 80 columns; the queue table needs more.
        width = None if sys.stdout.isatty() else 140
        render_summary(result.summary, Console(highlight=False, width=width))
    sys.exit(result.exit_code)


@main.command()
@click.option("--seconds", type=click.FloatRange(min=0.5), default=5.0, show_default=True,
              help="Length of each measured run.")
@click.option("--rounds", type=click.IntRange(1, 20), default=3, show_default=True,
              help="Rounds; each runs every case and its baseline, the median is reported.")
@click.option("--matrix", is_flag=True,
              help="Also run split and packed rings with and without in-order and event idx.")
@click.option("--stats-cost", is_flag=True,
              help="Instead: 4 KiB reads with live stats off, on, and with the dashboard "
                   "drawn at 4 and 10 Hz (what observing a run costs it).")
@click.option("--vhost-scaling", is_flag=True,
              help="Instead: 1, 2 and 4 VMs with a blk device each, served in-process and by "
                   "vhost-user backends (aggregate req/s, CPU per request by process).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, writable=True),
              metavar="FILE", help="Write the results as JSON to FILE.")
def bench(seconds: float, rounds: int, matrix: bool, stats_cost: bool, vhost_scaling: bool,
          json_path: str | None) -> None:
    """Measure vmsim against a multiprocessing.Pipe + msgpack baseline in the same run."""
    if vhost_scaling:
        from vmsim.bench.vhost_scaling import run_vhost_scaling
        sys.exit(run_vhost_scaling(seconds, rounds, json_path))
    if stats_cost:
        from vmsim.bench.stats_cost import run_stats_cost
        sys.exit(run_stats_cost(seconds, rounds, json_path))
    from vmsim.bench.runner import run_bench
    sys.exit(run_bench(seconds, json_path, rounds, matrix))


@main.command()
@click.option("--json", "as_json", is_flag=True, help="The list as JSON.")
def ps(as_json: bool) -> None:
    """List the vmsim runs in progress (name, launcher pid, config, uptime, VMs)."""
    from vmsim.launcher.top import main_ps
    sys.exit(main_ps(as_json))


@main.command()
@click.argument("run", required=False)
@click.option("--once", "once_", is_flag=True,
              help="Print the dashboard once (rates over 1 s) and exit; the default when "
                   "stdout is not a terminal.")
@click.option("--json", "as_json", is_flag=True,
              help="Print one line of counters and rates (as --stats-file writes) and exit.")
@click.option("--refresh", type=click.FloatRange(1, 20), default=4.0, show_default=True,
              metavar="HZ", help="Refreshes per second.")
def top(run: str | None, once_: bool, as_json: bool, refresh: float) -> None:
    """Show the dashboard of a run in progress (RUN: its name, a prefix, or its launcher's
    pid; optional when only one runs). Read-only: q leaves top, the run goes on."""
    from vmsim.launcher.top import main_top
    sys.exit(main_top(run, once_, as_json, refresh))


@main.command()
def clean() -> None:
    """Remove objects left in /dev/shm by runs whose launcher was killed."""
    removed = sweep_stale_runs()
    click.echo(f"removed {len(removed)} stale object{'s' if len(removed) != 1 else ''}"
               + (": " + ", ".join(removed) if removed else ""))


@main.command()
@click.argument("config", type=click.Path(dir_okay=False))
def check(config: str) -> None:
    """Validate a topology file without running it."""
    try:
        topo = load_topology_file(config)
    except TopologyError as e:
        _fail(f"config error: {e}")
    n_dev = sum(len(vm.devices) for vm in topo.vms.values())
    n_wl = sum(len(vm.workloads) for vm in topo.vms.values())
    click.echo(f"{config}: ok ({len(topo.vms)} VM(s), {n_dev} device(s), {n_wl} workload(s))")


@main.command()
@click.argument("vm")
@click.argument("device")
@click.argument("port", required=False)
@click.option("--run", "run_name", metavar="RUN",
              help="The run to attach to (its name or its launcher's pid), when several "
                   "running runs have the device.")
def console(vm: str, device: str, port: str | None, run_name: str | None) -> None:
    """Attach this terminal to a console port of a running VM (PORT: a name or number,
    default 0), like virsh console; Ctrl-] detaches."""
    from vmsim.launcher.console_attach import main_console
    sys.exit(main_console(vm, device, port, run_name))


if __name__ == "__main__":
    main()


@main.command()
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--json", "json_path", type=click.Path(dir_okay=False, writable=True),
              metavar="FILE", help="Write a report of every scenario and step as JSON.")
def scenario(files: tuple[str, ...], json_path: str | None) -> None:
    """Run scenario files: a topology, steps against the live run, expected outcomes.
    Prints a line per step and per scenario; exits 1 if any failed."""
    from vmsim.scenario.model import ScenarioError, load_scenario
    from vmsim.scenario.report import failure_lines, scenario_line, write_json
    from vmsim.scenario.runner import run_scenario

    loaded = []
    for f in files:
        try:
            loaded.append(load_scenario(f))
        except ScenarioError as e:
            _fail(f"scenario error: {e}")
    if json_path is not None and not os.path.isdir(os.path.dirname(os.path.abspath(json_path))):
        _fail(f"--json: directory {os.path.dirname(os.path.abspath(json_path))} does not exist")

    def log(msg: str) -> None:
        click.echo(msg, err=False)

    results = []
    for sc in loaded:
        click.echo(f"scenario {sc.scenario.name} ({sc.path})")
        r = run_scenario(sc, log)
        for line in failure_lines(r):
            click.echo(line)
        click.echo(scenario_line(r))
        results.append(r)
    if len(results) > 1:
        ok = sum(r.ok for r in results)
        click.echo(f"{ok} of {len(results)} scenarios passed")
    if json_path is not None:
        write_json(json_path, results)
    sys.exit(0 if all(r.ok for r in results) else 1)


@main.group()
def backend() -> None:
    """Run a vmsim device as a standalone vhost-user backend (QEMU's -chardev socket,path=...
    with -device vhost-user-blk-pci, or any vhost-user frontend), until SIGINT / SIGTERM."""


def _serve_backend(make_device, path: str, trace: bool) -> None:
    from vmsim.vhost.server import BackendError, Server
    try:
        device = make_device()
    except OSError as e:
        where = f"{e.filename}: " if e.filename else ""
        _fail(f"backend: {where}{e.strerror or e}", 1)
    try:
        sys.exit(Server(device, path, trace=trace).run())
    except BackendError as e:
        device.close()
        _fail(f"backend: {e}", 1)


@backend.command("blk")
@click.option("--socket", "path", required=True, type=click.Path(dir_okay=False),
              help="The vhost-user socket to listen on.")
@click.option("--image", required=True, type=click.Path(dir_okay=False, exists=True),
              help="A raw disk image (its size is the capacity).")
@click.option("--readonly", is_flag=True, help="Offer VIRTIO_BLK_F_RO; writes fail.")
@click.option("--no-packed", is_flag=True, help="Do not offer VIRTIO_F_RING_PACKED.")
@click.option("--trace", is_flag=True, help="Log every message from the frontend.")
def backend_blk(path: str, image: str, readonly: bool, no_packed: bool, trace: bool) -> None:
    """virtio-blk on a raw image."""
    from vmsim.vhost.devices import BlkVhostDevice
    _serve_backend(lambda: BlkVhostDevice(image, readonly, packed=not no_packed), path, trace)


@backend.command("console")
@click.option("--socket", "path", required=True, type=click.Path(dir_okay=False),
              help="The vhost-user socket to listen on.")
@click.option("--output", type=click.Path(dir_okay=False, writable=True),
              help="Append what the driver writes to FILE (default: stdout).")
@click.option("--no-input", is_flag=True, help="Do not read stdin for the driver.")
@click.option("--no-packed", is_flag=True, help="Do not offer VIRTIO_F_RING_PACKED.")
@click.option("--trace", is_flag=True, help="Log every message from the frontend.")
def backend_console(path: str, output: str | None, no_input: bool, no_packed: bool,
                    trace: bool) -> None:
    """virtio-console, port 0: the driver's output to stdout (or --output), stdin to it."""
    from vmsim.vhost.devices import ConsoleVhostDevice

    def make():
        out = open(output, "ab") if output else sys.stdout.buffer  # noqa: SIM115
        return ConsoleVhostDevice(not no_packed, out, None if no_input else sys.stdin.fileno())
    _serve_backend(make, path, trace)


@backend.command("net")
@click.option("--socket", "path", required=True, type=click.Path(dir_okay=False),
              help="The vhost-user socket to listen on.")
@click.option("--tap", required=True, metavar="IFNAME",
              help="The TAP interface the frames go to and come from (created if absent).")
@click.option("--mac", default="52:54:00:12:34:56", show_default=True,
              help="The MAC address in the config space (QEMU's virtio-net uses its own).")
@click.option("--mtu", default=1500, show_default=True, type=int,
              help="Offered with VIRTIO_NET_F_MTU when not 1500.")
@click.option("--queue-pairs", default=1, show_default=True, type=int,
              help="Receive/transmit queue pairs (VIRTIO_NET_F_MQ above 1).")
@click.option("--no-packed", is_flag=True, help="Do not offer VIRTIO_F_RING_PACKED.")
@click.option("--trace", is_flag=True, help="Log every message from the frontend.")
def backend_net(path: str, tap: str, mac: str, mtu: int, queue_pairs: int, no_packed: bool,
                trace: bool) -> None:
    """virtio-net on a TAP interface (no control queue: the frontend keeps it)."""
    from vmsim.abi import net as N
    from vmsim.vhost.net import NetVhostDevice
    try:
        mac_bytes = N.parse_mac(mac)
    except ValueError as e:
        _fail(f"backend: --mac: {e}", 2)

    def make():
        try:
            return NetVhostDevice(tap, mac_bytes, mtu, queue_pairs, packed=not no_packed)
        except ValueError as e:
            _fail(f"backend: {e}", 2)
    _serve_backend(make, path, trace)
