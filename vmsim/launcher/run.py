"""A run's lifecycle: create, spawn, watch, stop, report, clean up.

The launcher owns every named object of the run (DESIGN.md 8): the guests' RAM objects and
the stats region in /dev/shm, and a run directory holding the trap sockets and scratch disk
images. They are removed in a `finally` however the run ends: a normal end, Ctrl-C (or
SIGTERM), a child that dies (noticed at once through its pidfd), or an error. Children are
started with PDEATHSIG, so none outlives the launcher.
"""

import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vmsim.launcher import manifest as manifests
from vmsim.launcher import spec as specs
from vmsim.launcher.backends import Backends, BackendStartError
from vmsim.launcher.observe import Observers
from vmsim.launcher.summary import build_summary
from vmsim.launcher.topology import Topology
from vmsim.machine import runname, shm
from vmsim.machine.stats import D, StatsRegion, W, region_size
from vmsim.machine.wire import Channel, ChannelClosed

STARTUP_TIMEOUT_S = 30.0
GUEST_STOP_TIMEOUT_S = 15.0
HOST_STOP_TIMEOUT_S = 10.0
EXIT_WAIT_S = 3.0
DEFAULT_DURATION_S = 10.0

EXIT_OK = 0
EXIT_ERRORS = 1       # the run completed but workloads or devices reported errors
EXIT_FAILED = 3       # a process died or failed
EXIT_INTERRUPTED = 130


class LaunchError(Exception):
    """The run could not be set up (one readable line)."""


@dataclass
class Child:
    role: str                      # "host" or "guest"
    name: str                      # "host" or the VM's name
    popen: subprocess.Popen
    chan: Channel
    pidfd: int
    state: str = "starting"        # starting, ready/running, done, stopping, exited
    report: dict[str, Any] | None = None
    error: str | None = None
    exited: bool = False
    expected_exit: bool = False

    @property
    def label(self) -> str:
        return "host" if self.role == "host" else f"guest {self.name}"


@dataclass
class RunResult:
    exit_code: int
    summary: dict[str, Any]
    problems: list[str] = field(default_factory=list)


def describe_exit(rc: int) -> str:
    if rc < 0:
        try:
            return f"was killed by signal {signal.Signals(-rc).name}"
        except ValueError:
            return f"was killed by signal {-rc}"
    return f"exited with code {rc}"


class Run:
    """One run. `progress`: a one-line progress report to stderr every `progress_every` s
    (off while the dashboard shows). `dashboard`: the live view on this terminal, refreshed
    `refresh_hz` times a second. `stats_file`: a JSON line every `stats_every` s.
    `live_stats` False (for measuring what stats cost): queue counters reach the stats region
    only at the end and no request is timed."""

    def __init__(self, topo: Topology, source: str, config_dir: Path,
                 duration: float | None = None, progress: bool = True,
                 progress_every: float = 2.0, log=None, dashboard: bool = False,
                 refresh_hz: float = 4.0, stats_file: str | None = None,
                 stats_every: float = 1.0, live_stats: bool = True,
                 dashboard_console: Any = None,
                 director: Callable[["Run"], None] | None = None) -> None:
        self.topo = topo
        self.source = source
        self.config_dir = config_dir
        self.duration = duration if duration is not None else (topo.duration or
                                                               DEFAULT_DURATION_S)
        self.progress = progress
        self.progress_every = progress_every
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.children: list[Child] = []
        self.problems: list[str] = []
        self.interrupts = 0
        self.run_name = runname.new_run_name()
        self.rundir = ""
        self.layout: specs.RunLayout | None = None
        self.stats: StatsRegion | None = None
        self._stats_mm = None
        self._shm_names: list[str] = []
        self._wake_r = self._wake_w = -1
        self._old_handlers: dict[int, Any] = {}
        self.started_at = 0.0
        self.ended_at = 0.0
        self.device_snapshot: dict[tuple[str, str], dict[str, int]] = {}
        self.dashboard = dashboard
        self.refresh_hz = refresh_hz
        self.stats_file = stats_file
        self.stats_every = stats_every
        self.live_stats = live_stats
        self.dashboard_console = dashboard_console   # a benchmark's off-screen console
        self.manifest: dict[str, Any] | None = None
        self.observers: Observers | None = None
        self.observed: dict[str, Any] = {}
        self.quit_requested = False       # q on the dashboard: end as at the end of duration
        self._held_logs: list[str] = []
        self._outer_log = self.log
        # A scenario's director plays its steps in place of the watch loop; its requests to
        # the host and the guests are answered on their channels.
        self.director = director
        self._replies: dict[int, tuple[bool, Any]] = {}
        self._next_request = 1
        self.backends: Backends | None = None
        self.backends_failed = False

    # ---- entry -----------------------------------------------------------------------------------
    def execute(self) -> RunResult:
        sweep_stale_runs()
        try:
            self._install_signals()
            self._create_objects()
            try:
                self._start_backends()
                self._start_host()
                self._start_guests()
                for line in specs.console_endpoints(self.host_spec):
                    self.log(f"console {line}")      # where a person can attach
                self._publish_manifest()
                self._start_observers()
                if self.director is not None:
                    self.director(self)
                else:
                    self._watch()
            except _Abort:
                pass
            self._finish_observers()
            self._stop_all()
            return self._result()
        finally:
            self._cleanup()

    def _publish_manifest(self) -> None:
        """The run's manifest in its directory, for `vmsim top` and `vmsim ps`."""
        self.manifest = manifests.build(
            topo=self.topo, layout=self.layout, host_spec=self.host_spec, source=self.source,
            duration=self.duration, started_mono=self.started_at, started_wall=time.time())
        manifests.write(self.rundir, self.manifest)

    def _start_observers(self) -> None:
        if not (self.dashboard or self.stats_file):
            return
        self.observers = Observers(self.manifest, self.stats, dashboard=self.dashboard,
                                   hz=self.refresh_hz, stats_file=self.stats_file,
                                   stats_every=self.stats_every, started=self.started_at,
                                   console=self.dashboard_console)
        if self.dashboard:
            # While the dashboard owns the screen, messages go onto it (and are printed
            # again once it is gone).
            def log(msg: str) -> None:
                self._held_logs.append(msg)
                if self.observers is not None:
                    self.observers.log(msg)

            self.log = log
        self.observers.start()

    def _finish_observers(self) -> None:
        if self.observers is None:
            return
        try:
            self.observers.finish()
        finally:
            self.observed = self.observers.describe()
            self.observers.close()
            self.observers = None
            if self.dashboard:
                self.log = self._outer_log
                for msg in self._held_logs:
                    self.log(msg)
                self._held_logs = []

    # ---- setup -----------------------------------------------------------------------------------
    def _create_objects(self) -> None:
        self.rundir = tempfile.mkdtemp(prefix=self.run_name + "-")
        lay = self.layout = specs.plan(self.topo, self.run_name, self.rundir)
        for vname, vm in self.topo.vms.items():
            name = lay.ram_names[vname]
            try:
                shm.create(name, vm.memory)
            except OSError as e:
                raise LaunchError(f"cannot create guest RAM for {vname} ({vm.memory} bytes): "
                                  f"{e}") from None
            self._shm_names.append(name)
        shm.create(lay.stats_name, region_size(lay.n_queues, lay.n_devices, lay.n_workloads))
        self._shm_names.append(lay.stats_name)
        self._stats_mm = shm.open_map(lay.stats_name)
        StatsRegion.format(self._stats_mm, lay.n_queues, lay.n_devices, lay.n_workloads)
        self.stats = StatsRegion(self._stats_mm)
        self.host_spec = specs.host_spec(self.topo, lay, self.config_dir)
        self.host_spec["live_stats"] = self.live_stats
        for vm in self.host_spec["vms"]:
            for d in vm["devices"]:
                path = d.get("blk", {}).get("path")
                if path and not d["blk"]["readonly"]:
                    parent = os.path.dirname(path)
                    if not os.path.isdir(parent):
                        raise LaunchError(f"{self.source}: vms.{vm['name']}.devices.{d['name']}"
                                          f".path: directory {parent} does not exist")
                if path and d["blk"]["readonly"] and not os.path.exists(path):
                    raise LaunchError(f"{self.source}: vms.{vm['name']}.devices.{d['name']}"
                                      f".path: read-only image {path} does not exist")

    def _spawn(self, role: str, name: str, module: str) -> Child:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            p = subprocess.Popen([sys.executable, "-m", module, "--channel-fd",
                                  str(child.fileno())], pass_fds=[child.fileno()],
                                 stdin=subprocess.DEVNULL)
        finally:
            child.close()
        c = Child(role, name, p, Channel(parent), os.pidfd_open(p.pid))
        self.children.append(c)
        return c

    def _start_backends(self) -> None:
        self.backends = Backends(self.rundir)
        try:
            self.backends.start(self.host_spec)
        except BackendStartError as e:
            self.problems.append(str(e))
            self.backends_failed = True
            raise _Abort() from None

    def _start_host(self) -> None:
        host = self._spawn("host", "host", "vmsim.host")
        host.chan.send(self.host_spec)
        self._wait_states({"ready"}, [host], STARTUP_TIMEOUT_S, "start")

    def _start_guests(self) -> None:
        guests = []
        for vname in self.topo.vms:
            g = self._spawn("guest", vname, "vmsim.guest")
            g.chan.send({**specs.guest_spec(self.topo, self.layout, vname),
                         "live_stats": self.live_stats})
            guests.append(g)
        self._wait_states({"booted"}, guests, STARTUP_TIMEOUT_S, "boot")
        # Two steps: every VM's answering workloads (echo, sink, console apps) first, then
        # those that talk to them, so no first frame finds its peer not yet listening.
        for g in guests:
            g.chan.send(("start_passive",))
        self._wait_states({"passive"}, guests, STARTUP_TIMEOUT_S, "start")
        for g in guests:
            g.chan.send(("start",))
        self._wait_states({"running", "done"}, guests, STARTUP_TIMEOUT_S, "start")
        self.started_at = time.monotonic()

    def _wait_states(self, states: set[str], children: list[Child], timeout: float,
                     what: str) -> None:
        deadline = time.monotonic() + timeout
        while not all(c.state in states for c in children):
            if self._failed() or self.interrupts:
                raise _Abort()
            left = deadline - time.monotonic()
            if left <= 0:
                slow = ", ".join(c.label for c in children if c.state not in states)
                self.problems.append(f"{slow} did not {what} within {timeout:.0f} s")
                raise _Abort()
            self._pump(min(left, 0.5))

    # ---- running ---------------------------------------------------------------------------------
    def _watch(self) -> None:
        deadline = self.started_at + self.duration
        progress = self.progress and not self.dashboard
        next_progress = self.started_at + self.progress_every if progress else float("inf")
        guests = [c for c in self.children if c.role == "guest"]
        while True:
            if self._failed() or self.interrupts or self.quit_requested:
                return
            if all(g.state == "done" for g in guests):
                return
            now = time.monotonic()
            if now >= deadline:
                return
            if now >= next_progress:
                self._progress_line(now)
                next_progress += self.progress_every
            wake = min(deadline, next_progress)
            if self.observers is not None:
                self.observers.run_due(now)
                wake = min(wake, self.observers.next_due())
            self._pump(max(0.0, wake - time.monotonic()))

    # ---- what a scenario's director uses ------------------------------------------------------
    def pump(self, timeout: float) -> None:
        """Handle messages, exits and signals for up to `timeout` seconds."""
        self._pump(timeout)

    def child(self, target: str) -> Child:
        """The host ("host") or a VM's guest process, by name."""
        for c in self.children:
            if (c.role == "host" and target == "host") or (c.role == "guest" and c.name == target):
                return c
        names = ", ".join(["host", *(c.name for c in self.children if c.role == "guest")])
        raise LaunchError(f"no process {target!r} (processes: {names})")

    def request(self, target: str, op: str, args: dict[str, Any],
                timeout: float = 10.0) -> tuple[bool, Any]:
        """Ask the host or a guest to do `op`; (whether it did, its answer or its reason)."""
        c = self.child(target)
        if c.exited or c.chan is None:
            raise LaunchError(f"{c.label} is not running")
        rid = self._next_request
        self._next_request += 1
        try:
            c.chan.send(("op", rid, op, args))
        except ChannelClosed:
            raise LaunchError(f"{c.label} is not running") from None
        deadline = time.monotonic() + timeout
        while rid not in self._replies:
            if c.exited or c.chan is None:
                raise LaunchError(f"{c.label} exited before it answered {op}")
            left = deadline - time.monotonic()
            if left <= 0:
                raise LaunchError(f"{c.label} did not answer {op} within {timeout:g} s")
            self._pump(min(left, 0.1))
        return self._replies.pop(rid)

    def signal_child(self, target: str, signum: int) -> int:
        """Send a signal to the host or a guest (a scenario's fault); its pid."""
        c = self.child(target)
        if c.exited:
            raise LaunchError(f"{c.label} has already exited")
        os.kill(c.popen.pid, signum)
        return c.popen.pid

    def _progress_line(self, now: float) -> None:
        parts = []
        for (vname, wname), rec in self.layout.workload_records.items():
            w = self.stats.workload(rec)
            secs = max(1e-9, now - self.started_at)
            parts.append(f"{vname}.{wname} {w[W.OPS]} ops {w[W.BYTES] / secs / 1e6:.1f} MB/s "
                         f"{w[W.ERRORS]} errors")
        self.log(f"[{now - self.started_at:6.1f}s] " + ("; ".join(parts) or "running"))

    def _pump(self, timeout: float) -> None:
        """Wait up to `timeout` for messages, exits or a signal, and handle them."""
        fds: dict[int, tuple[str, Child | None]] = {self._wake_r: ("wake", None)}
        key_fd = self.observers.input_fd() if self.observers is not None else None
        if key_fd is not None:
            fds[key_fd] = ("keys", None)
        for c in self.children:
            if not c.exited:
                fds[c.pidfd] = ("exit", c)
                if c.chan is not None:
                    fds[c.chan.fileno()] = ("msg", c)
        p = select.poll()
        for fd in fds:
            p.register(fd, select.POLLIN)
        for fd, _ev in p.poll(max(0, int(timeout * 1000))):
            kind, c = fds[fd]
            if kind == "wake":
                try:
                    os.read(self._wake_r, 64)
                except BlockingIOError:
                    pass
            elif kind == "keys":
                if self.observers is not None and self.observers.on_input():
                    self.quit_requested = True
            elif kind == "msg":
                self._on_message(c)
            elif kind == "exit":
                self._on_exit(c)

    def _on_message(self, c: Child) -> None:
        if c.chan is None:
            return   # its exit, handled earlier in the same poll, already drained the channel
        try:
            msg = c.chan.recv_obj()
        except ChannelClosed:
            c.chan.close()
            c.chan = None
            return
        kind = msg[0] if msg else None
        if kind == "reply":
            self._replies[msg[1]] = (bool(msg[2]), msg[3])
        elif kind in ("ready", "booted", "passive", "running", "done"):
            c.state = kind
            if kind == "running" and msg[1].get("probe_errors"):
                for dev, err in msg[1]["probe_errors"].items():
                    self.problems.append(f"{c.name}.{dev}: the guest could not probe it: {err}")
        elif kind == "report":
            c.report = msg[1]
            c.state = "reported"
        elif kind == "error":
            c.error = msg[1]
            if len(msg) > 3 and msg[3]:
                c.report = msg[3]
            self.problems.append(f"{c.label} failed: {msg[1]}")
            if os.environ.get("VMSIM_DEBUG") and len(msg) > 2 and msg[2]:
                self.log(msg[2])

    def _on_exit(self, c: Child) -> None:
        rc = c.popen.wait()
        c.exited = True
        os.close(c.pidfd)
        # Drain what it sent before it went.
        while c.chan is not None:
            p = select.poll()
            p.register(c.chan.fileno(), select.POLLIN)
            if not p.poll(0):
                break
            self._on_message(c)
        if (not c.expected_exit or rc != 0) and c.error is None:
            self.problems.append(f"{c.label} (pid {c.popen.pid}) {describe_exit(rc)}")
            c.error = describe_exit(rc)

    def _failed(self) -> bool:
        return any(c.error is not None for c in self.children)

    # ---- stopping --------------------------------------------------------------------------------
    def _stop_all(self) -> None:
        self._snapshot_devices()
        guests = [c for c in self.children if c.role == "guest"]
        hosts = [c for c in self.children if c.role == "host"]
        self._stop(guests, GUEST_STOP_TIMEOUT_S)
        self._stop(hosts, HOST_STOP_TIMEOUT_S)
        if self.backends is not None:          # after the host: it holds their sessions
            self.problems.extend(self.backends.died())
            self.problems.extend(self.backends.stop())

    def _snapshot_devices(self) -> None:
        """Device status and negotiated features as the run ends, before the guests remove
        their drivers (which resets the devices)."""
        if self.stats is None or self.layout is None:
            return
        for key, rec in self.layout.device_records.items():
            d = self.stats.device(rec)
            self.device_snapshot[key] = {"status": int(d[D.STATUS]),
                                         "driver_features": int(d[D.DRIVER_FEATURES])}

    def _stop(self, children: list[Child], timeout: float) -> None:
        for c in children:
            c.expected_exit = True
            if not c.exited and c.chan is not None:
                try:
                    c.chan.send(("stop",))
                except ChannelClosed:
                    pass
        deadline = time.monotonic() + timeout
        while any(not c.exited for c in children):
            left = deadline - time.monotonic()
            if left <= 0 or self.interrupts > 1:
                for c in children:
                    if not c.exited:
                        self.problems.append(f"{c.label} did not stop within {timeout:.0f} s; "
                                             "killed")
                        c.popen.kill()
                deadline = time.monotonic() + EXIT_WAIT_S
                while any(not c.exited for c in children) and time.monotonic() < deadline:
                    self._pump(0.2)
                return
            self._pump(min(left, 0.5))

    # ---- result ----------------------------------------------------------------------------------
    def _result(self) -> RunResult:
        self.ended_at = time.monotonic()
        host = next((c for c in self.children if c.role == "host"), None)
        guests = {c.name: c for c in self.children if c.role == "guest"}
        summary = build_summary(
            topo=self.topo, layout=self.layout, stats=self.stats, source=self.source,
            host_report=host.report if host else None,
            guest_reports={n: c.report for n, c in guests.items()},
            problems=self.problems, device_snapshot=self.device_snapshot,
            elapsed=(self.ended_at - self.started_at) if self.started_at else 0.0)
        if self.problems and (any(c.error for c in self.children) or self.backends_failed):
            code = EXIT_FAILED
        elif self.interrupts:
            code = EXIT_INTERRUPTED
        elif self.problems or summary["totals"]["workload_errors"] \
                or summary["totals"]["device_errors"]:
            code = EXIT_ERRORS
        else:
            code = EXIT_OK
        summary.update(self.observed)
        summary["exit_code"] = code
        summary["outcome"] = {EXIT_OK: "ok", EXIT_ERRORS: "errors", EXIT_FAILED: "failed",
                              EXIT_INTERRUPTED: "interrupted"}[code]
        return RunResult(code, summary, list(self.problems))

    # ---- signals & cleanup -----------------------------------------------------------------------
    def _install_signals(self) -> None:
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

        def on_signal(signum, _frame):
            self.interrupts += 1
            try:
                os.write(self._wake_w, b"!")
            except OSError:
                pass
            if self.interrupts == 1:
                self.log(f"vmsim: {signal.Signals(signum).name}: stopping the run "
                         "(again to force)")

        for s in (signal.SIGINT, signal.SIGTERM):
            self._old_handlers[s] = signal.signal(s, on_signal)

    def _cleanup(self) -> None:
        if self.observers is not None:         # an error skipped the normal finish
            self.observers.close()
            self.observers = None
        if self.backends is not None:
            self.backends.kill()
        for c in self.children:
            if not c.exited:
                try:
                    c.popen.kill()
                    c.popen.wait(timeout=5)
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    pass
                c.exited = True
                try:
                    os.close(c.pidfd)
                except OSError:
                    pass
            if c.chan is not None:
                c.chan.close()
                c.chan = None
        if self.stats is not None:
            self.stats.release()
            self.stats = None
        if self._stats_mm is not None:
            self._stats_mm.close()
        for name in self._shm_names:
            shm.unlink(name)
        if self.rundir:
            shutil.rmtree(self.rundir, ignore_errors=True)
        for s, h in self._old_handlers.items():
            signal.signal(s, h)
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                os.close(fd)
        self._wake_r = self._wake_w = -1


class _Abort(Exception):
    """Startup failed or was interrupted; the run goes straight to stopping."""


def sweep_stale_runs() -> list[str]:
    """Remove the objects of runs whose launcher is gone (killed before it could clean up)."""
    removed = []
    for run, names in runname.list_shm_runs().items():
        pid = runname.launcher_pid(run)
        if pid == os.getpid() or runname.pid_alive(pid):
            continue
        for n in names:
            if shm.unlink(n):
                removed.append(n)
        tmp = tempfile.gettempdir()
        for entry in os.listdir(tmp):
            if entry.startswith(run + "-"):
                shutil.rmtree(os.path.join(tmp, entry), ignore_errors=True)
    return removed
