"""The run's manifest: what a reader in another process needs to make sense of a live run
(`vmsim top`, `vmsim ps`): the topology as resolved for this run, which stats record belongs to
which queue, device and workload, each VM's RAM object and placement, and where its consoles
are. The launcher writes it into the run directory (<tmp>/vmsim-<pid>-<hex>-*/run.json) once
the host is up, and the run directory goes with the run."""

import json
import os
from typing import Any

from vmsim.launcher import spec as specs
from vmsim.launcher.topology import Topology

MANIFEST = "run.json"
VERSION = 1


class ManifestError(Exception):
    """No readable manifest (the run is starting, or it is not a vmsim run directory)."""


def _backend(d: dict[str, Any]) -> str:
    """One line on what serves a device."""
    vu = d.get("vhost_user")
    if vu is not None:
        return f"vhost-user {'spawned ' if vu['spawn'] else ''}{vu['socket']}"
    if d["type"] == "blk":
        b = d["blk"]
        return f"file {b['path']}" if b["backend"] == "file" else "memory"
    if d["type"] == "net":
        b = d["net"]["backend"]
        return f"switch {b['switch']}" if b.get("switch") else f"tap {b.get('tap')}"
    if d["type"] == "console":
        return ", ".join(f"{p['name']}: {p['backend']}" for p in d["console"]["ports"])
    return ""


def _console_ports(d: dict[str, Any]) -> list[dict[str, Any]]:
    ports = []
    for i, p in enumerate(d.get("console", {}).get("ports", [])):
        where = p.get("path") or ""
        if p["backend"] == "pty" and p.get("link"):
            try:
                where = os.readlink(p["link"])
            except OSError:
                where = ""
        ports.append({"index": i, "name": p["name"], "backend": p["backend"], "path": where})
    return ports


def build(*, topo: Topology, layout: specs.RunLayout, host_spec: dict[str, Any], source: str,
          duration: float, started_mono: float, started_wall: float) -> dict[str, Any]:
    """The manifest of a run whose host has built its devices (pty paths exist)."""
    vms: dict[str, Any] = {}
    attachments: dict[str, list[str]] = {name: [] for name in topo.switches}
    for hvm in host_spec["vms"]:
        vname = hvm["name"]
        vm = topo.vms[vname]
        devices = {}
        for d in hvm["devices"]:
            dname = d["name"]
            entry = {"type": d["type"], "transport": d["transport"], "ring": d["ring"],
                     "queue_size": d["queue_size"], "record": d["device_record"],
                     "queues": list(d["queue_records"]), "backend": _backend(d)}
            if d["type"] == "console":
                entry["ports"] = _console_ports(d)
            if d["type"] == "net":
                entry["mac"] = d["net"]["mac"]
                sw = d["net"]["backend"].get("switch")
                if sw:
                    attachments.setdefault(sw, []).append(f"{vname}.{dname}")
            devices[dname] = entry
        workloads = {}
        for wname, w in vm.workloads.items():
            workloads[wname] = {"type": w.type, "device": w.device,
                                "record": layout.workload_records[(vname, wname)],
                                "peer": getattr(w, "peer", None)}
        vms[vname] = {"ram": dict(hvm["ram"]), "devices": devices, "workloads": workloads}
    return {"version": VERSION, "run": layout.run, "pid": os.getpid(), "config": source,
            "topology": topo.name, "description": getattr(topo, "description", "") or "",
            "duration": duration, "started_mono": started_mono, "started_wall": started_wall,
            "stats": layout.stats_name, "vms": vms, "switches": attachments}


def write(rundir: str, manifest: dict[str, Any]) -> str:
    """Write it atomically (a reader never sees half of it); its path."""
    path = os.path.join(rundir, MANIFEST)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1)
    os.replace(tmp, path)
    return path


def read(rundir: str) -> dict[str, Any]:
    path = os.path.join(rundir, MANIFEST)
    try:
        with open(path) as f:
            m = json.load(f)
    except FileNotFoundError:
        raise ManifestError(f"{rundir}: no {MANIFEST} yet (the run is starting)") from None
    except (OSError, ValueError) as e:
        raise ManifestError(f"{path}: {e}") from None
    if not isinstance(m, dict) or m.get("version") != VERSION:
        raise ManifestError(f"{path}: not a version {VERSION} vmsim manifest")
    return m
