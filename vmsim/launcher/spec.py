"""From a validated topology to what each process of the run receives: the host's spec (every
VM and device, with backends resolved) and each guest's (its trap socket, workloads, and the
stats records it writes)."""

import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vmsim.abi import console as CON
from vmsim.launcher.topology import Topology
from vmsim.machine import runname


@dataclass
class RunLayout:
    """Names and stats records of one run."""
    run: str
    rundir: str
    stats_name: str
    n_queues: int = 0
    n_devices: int = 0
    n_workloads: int = 0
    # (vm, dev) -> device record, list of queue records; (vm, workload) -> record
    device_records: dict[tuple[str, str], int] = field(default_factory=dict)
    queue_records: dict[tuple[str, str], list[int]] = field(default_factory=dict)
    workload_records: dict[tuple[str, str], int] = field(default_factory=dict)
    ram_names: dict[str, str] = field(default_factory=dict)
    scratch_files: list[str] = field(default_factory=list)


def queues_of(dev: Any) -> int:
    """How many virtqueues a device has."""
    if dev.type == "blk":
        return dev.num_queues
    if dev.type == "net":
        if dev.vhost_user() is not None:        # one pair, no control queue (as QEMU's)
            return 2
        return 2 * dev.queue_pairs + 1          # the pairs, then the control queue
    if dev.type == "console":                   # port 0's pair (+ control, + the others')
        return CON.num_queues(bool(dev.multiport), dev.max_ports or len(dev.ports))
    return 1


def console_spec(vname: str, dname: str, dev: Any, rundir: str, config_dir: Path) -> dict:
    """A console device's part of the host spec: its ports with paths resolved, the pty
    links and default sockets in the run directory, and the manifest `vmsim console` reads
    (<rundir>/<vm>-<dev>.console.json)."""
    ports = []
    for i, p in enumerate(dev.ports):
        d: dict[str, Any] = {"name": p.name, "backend": p.backend,
                             "console": p.console if p.console is not None else i == 0}
        if p.backend == "pty":
            d["link"] = os.path.join(rundir, f"{vname}-{dname}-{p.name}.pty")
        elif p.path:
            d["path"] = str((config_dir / os.path.expanduser(p.path)).resolve())
        elif p.backend == "socket":
            path = os.path.join(rundir, f"{vname}-{dname}-{p.name}.sock")
            if len(path.encode()) > 100:            # AF_UNIX paths hold 107 bytes
                tag = zlib.crc32(f"{vname}.{dname}.{p.name}".encode())
                path = os.path.join(rundir, f"console-{tag:08x}.sock")
            d["path"] = path
        ports.append(d)
    return {"multiport": bool(dev.multiport), "max_nr_ports": dev.max_ports or len(dev.ports),
            "size": [dev.size.cols, dev.size.rows], "ports": ports,
            "manifest": os.path.join(rundir, f"{vname}-{dname}.console.json")}


def console_endpoints(host: dict[str, Any]) -> list[str]:
    """One line per console port with a host end a person can reach (a pty, a socket), for
    the launcher to print once the host has made them."""
    lines = []
    for vm in host["vms"]:
        for d in vm["devices"]:
            for i, p in enumerate(d.get("console", {}).get("ports", [])):
                where = f"{vm['name']}.{d['name']} port {i} ({p['name']})"
                if p["backend"] == "pty" and p.get("link"):
                    try:
                        pty = os.readlink(p["link"])
                    except OSError:
                        continue
                    lines.append(f"{where}: pty {pty}  (attach: vmsim console {vm['name']} "
                                 f"{d['name']}{'' if i == 0 else ' ' + p['name']})")
                elif p["backend"] == "socket":
                    lines.append(f"{where}: socket {p['path']}")
                elif p["backend"] == "file":
                    lines.append(f"{where}: log {p['path']}")
    return lines


def mac_of(vname: str, dname: str, dev: Any) -> str:
    """A net device's MAC: the configured one, else one derived from its name (locally
    administered, QEMU's 52:54:00 prefix)."""
    if getattr(dev, "mac", None):
        return dev.mac.lower()
    h = zlib.crc32(f"{vname}.{dname}".encode())
    return "52:54:00:" + ":".join(f"{h >> s & 0xFF:02x}" for s in (16, 8, 0))


def vhost_user_spec(vname: str, dname: str, d: dict[str, Any], socket: str | None,
                    rundir: str, config_dir: Path) -> dict[str, Any]:
    """Where the device's vhost-user backend listens, and for `spawn` the command the launcher
    starts it with (`vmsim backend TYPE`, serving what the device spec names)."""
    if socket is not None:
        return {"socket": str((config_dir / os.path.expanduser(socket)).resolve()),
                "spawn": None}
    path = os.path.join(rundir, f"{vname}-{dname}.vhost.sock")
    if len(path.encode()) > 100:                    # AF_UNIX paths hold 107 bytes
        path = os.path.join(rundir, f"vhost-{zlib.crc32(f'{vname}.{dname}'.encode()):08x}.sock")
    argv = ["backend", d["type"], "--socket", path]
    if d["ring"] != "packed":
        argv.append("--no-packed")
    if d["type"] == "blk":
        argv += ["--image", d["blk"]["path"]] + (["--readonly"] if d["blk"]["readonly"] else [])
    elif d["type"] == "net":
        n = d["net"]
        argv += ["--tap", n["backend"]["tap"], "--mac", n["mac"], "--mtu", str(n["mtu"]),
                 "--queue-pairs", str(n["queue_pairs"])]
    elif d["type"] == "console":
        argv += ["--output", d["console"]["ports"][0]["path"], "--no-input"]
    return {"socket": path, "spawn": argv}


def plan(topo: Topology, run: str, rundir: str) -> RunLayout:
    lay = RunLayout(run=run, rundir=rundir, stats_name=runname.stats_name(run))
    for vname, vm in topo.vms.items():
        lay.ram_names[vname] = runname.ram_name(run, vname)
        for dname, dev in vm.devices.items():
            lay.device_records[(vname, dname)] = lay.n_devices
            lay.n_devices += 1
            n = queues_of(dev)
            lay.queue_records[(vname, dname)] = list(range(lay.n_queues, lay.n_queues + n))
            lay.n_queues += n
        for wname in vm.workloads:
            lay.workload_records[(vname, wname)] = lay.n_workloads
            lay.n_workloads += 1
    return lay


def host_spec(topo: Topology, lay: RunLayout, config_dir: Path) -> dict[str, Any]:
    vms = []
    for vname, vm in topo.vms.items():
        devices = []
        for dname, dev in vm.devices.items():
            offer, withhold = dev.feature_bits()
            d: dict[str, Any] = {
                "name": dname, "type": dev.type, "transport": dev.transport, "ring": dev.ring,
                "queue_size": dev.queue_size, "num_queues": queues_of(dev),
                "offer": offer, "withhold": withhold,
                "faults": dev.faults.model_dump(),
                "msix_vectors": getattr(dev, "msix_vectors", None),
                "plugged": dev.plugged,
                "adapter_interrupts": dev.adapter_interrupts,
                "iommu": dev.iommu,
                "device_record": lay.device_records[(vname, dname)],
                "queue_records": lay.queue_records[(vname, dname)],
            }
            vu = dev.vhost_user()
            if dev.type == "blk":
                path = None
                if dev.backend == "file" or (vu is not None and vu.spawn):
                    if dev.path is None:
                        path = os.path.join(lay.rundir, f"{vname}-{dname}.img")
                        lay.scratch_files.append(path)
                    else:
                        path = str((config_dir / os.path.expanduser(dev.path)).resolve())
                d["blk"] = {"backend": "file" if path else "memory" if vu is None
                            else "vhost-user", "path": path, "size": dev.size,
                            "readonly": dev.readonly, "serial": dev.serial or f"vmsim-{dname}",
                            "blk_size": dev.blk_size}
            if dev.type == "net":
                d["net"] = {"mac": mac_of(vname, dname, dev), "queue_pairs": dev.queue_pairs,
                            "mtu": dev.mtu, "link_up": dev.link == "up",
                            "backend": dev.backend.model_dump(exclude_none=True)}
            if dev.type == "console":
                d["console"] = console_spec(vname, dname, dev, lay.rundir, config_dir)
            if vu is not None:
                d["vhost_user"] = vhost_user_spec(vname, dname, d, vu.socket, lay.rundir,
                                                  config_dir)
                d["vhost_user"]["ram"] = lay.ram_names[vname]   # the fd handed over is RAM's
            devices.append(d)
        vms.append({"name": vname,
                    "ram": {"name": lay.ram_names[vname], "base": vm.memory_base,
                            "size": vm.memory},
                    "control": os.path.join(lay.rundir, f"{vname}.sock"),
                    "devices": devices})
    return {"run": lay.run, "stats": lay.stats_name, "poll_us": topo.host.poll_us, "vms": vms,
            "switches": list(topo.switches)}


def guest_spec(topo: Topology, lay: RunLayout, vname: str) -> dict[str, Any]:
    vm = topo.vms[vname]
    workloads = []
    for wname, w in vm.workloads.items():
        d = w.model_dump()
        d["name"] = wname
        peer = getattr(w, "peer", None)
        if peer:
            pvm, _, pdev = peer.partition(".")
            d["peer_mac"] = mac_of(pvm, pdev, topo.vms[pvm].devices[pdev])
        if w.type == "console-app":
            d["vm"] = vname                     # the shell's hostname
        workloads.append(d)
    return {
        "vm": vname,
        "run": lay.run,
        "control": os.path.join(lay.rundir, f"{vname}.sock"),
        "stats": lay.stats_name,
        "workloads": workloads,
        "driver_poll_us": {d: dev.poll_us for d, dev in vm.devices.items()},
        "device_records": {d: lay.device_records[(vname, d)] for d in vm.devices},
        "queue_records": {d: lay.queue_records[(vname, d)] for d in vm.devices},
        "workload_records": {w: lay.workload_records[(vname, w)] for w in vm.workloads},
    }
