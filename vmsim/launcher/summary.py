"""The end-of-run summary: one dict (written as JSON with --json) built from the stats region
and the processes' reports, and its rendering as text tables."""

from typing import Any

from rich.console import Console
from rich.table import Table

from vmsim.abi import blk as B
from vmsim.abi import console as CON
from vmsim.abi import features as F
from vmsim.abi import net as N
from vmsim.abi import status as S
from vmsim.launcher.rates import percentile_ns
from vmsim.launcher.spec import RunLayout
from vmsim.launcher.topology import Topology
from vmsim.machine.stats import D, Q, StatsRegion, W, histogram, snapshot

DEVICE_FEATURE_NAMES = {"blk": B.FEATURE_NAMES, "net": N.FEATURE_NAMES,
                        "console": CON.FEATURE_NAMES}


def build_summary(*, topo: Topology, layout: RunLayout, stats: StatsRegion, source: str,
                  host_report: dict | None, guest_reports: dict[str, dict | None],
                  problems: list[str], elapsed: float,
                  device_snapshot: dict[tuple[str, str], dict[str, int]] | None = None
                  ) -> dict[str, Any]:
    """The run's summary. Device status and negotiated features come from `device_snapshot`
    (taken as the run ended, before the drivers' removal reset the devices) when given."""
    vms: dict[str, Any] = {}
    workloads: dict[str, Any] = {}
    totals = {"workload_ops": 0, "workload_bytes": 0, "workload_errors": 0, "device_errors": 0}
    host_vms = (host_report or {}).get("vms", {})
    for vname, vm in topo.vms.items():
        hvm = host_vms.get(vname, {}).get("devices", {})
        grep = guest_reports.get(vname) or {}
        gdevs = grep.get("devices", {})
        devices = {}
        for dname, dev in vm.devices.items():
            names = DEVICE_FEATURE_NAMES.get(dev.type, {})
            drec = snapshot(stats.device(layout.device_records[(vname, dname)]), D)
            snap = (device_snapshot or {}).get((vname, dname))
            if snap:
                drec.update(snap)
            hd = hvm.get(dname, {})
            gd = gdevs.get(dname, {})
            # Features are negotiated once the device accepted FEATURES_OK (or, on a legacy
            # interface, which has no FEATURES_OK, once the driver set DRIVER_OK).
            requested = drec["driver_features"]
            negotiated = requested if drec["status"] & (S.FEATURES_OK | S.DRIVER_OK) else 0
            queues = []
            for i, rec in enumerate(layout.queue_records[(vname, dname)]):
                qrec = stats.queue(rec)
                q = snapshot(qrec, Q)
                queues.append({
                    "index": i, "ring": "packed" if q["ring"] else "split",
                    "size": q["size"] or dev.queue_size,
                    "added": q["added"], "used": q["used"],
                    "in_flight": q["added"] - q["completed"] - q["detached"],
                    "completed": q["completed"], "detached": q["detached"],
                    "kicks": q["kicks"], "kicks_suppressed": q["kicks_suppressed"],
                    "notifies_received": q["notifies"],
                    "interrupts": q["interrupts"],
                    "interrupts_suppressed": q["interrupts_suppressed"],
                    "irqs_handled": q["irqs"], "spurious_irqs": q["spurious"],
                    "bytes_read": q["bytes_read"], "bytes_written": q["bytes_written"],
                    "descriptors": q["descs_added"], "indirect": q["indirect_added"],
                    "missed_wakeups": q["missed"], "ring_errors": q["errors"],
                    "free_descriptors": q["num_free"],
                    "latency": latency(histogram(qrec), q["lat_every"]),
                })
            errors = hd.get("errors", [])
            totals["device_errors"] += len(errors)
            devices[dname] = {
                "type": dev.type,
                "transport": dev.transport,
                "features": F.names(negotiated, names),
                "features_bits": negotiated,
                "features_requested": F.names(requested, names),
                "device_features": F.names(drec["device_features"], names),
                "status": S.describe(drec["status"]),
                "driver": gd.get("driver"),
                "probe_error": gd.get("probe_error", ""),
                "exits": {"read": drec["exits_read"], "write": drec["exits_write"],
                          "total": drec["exits_read"] + drec["exits_write"]},
                "interrupts": hd.get("interrupts", 0),
                "config_interrupts": drec["config_interrupts"],
                "config_changes": drec["config_changed"],
                "errors": errors,
                "guest_errors": hd.get("guest_errors", []),
                "queues": queues,
            }
            for k in ("backend", "capacity_bytes", "readonly", "requests", "transport_info"):
                if k in hd:
                    devices[dname][k] = hd[k]
            # the rest of what the device and its driver said of themselves
            standard = {"transport", "transport_info", "device_features", "driver_features",
                        "status", "errors", "guest_errors", "exits", "interrupts",
                        "config_interrupts", "resets", "queue_sizes"}
            info = {k: v for k, v in hd.items() if k not in standard}
            if info:
                devices[dname]["info"] = info
            if gd.get("driver_info"):
                devices[dname]["driver_info"] = gd["driver_info"]
            if hd.get("exits", {}).get("by_kind"):
                devices[dname]["exits"]["by_kind"] = hd["exits"]["by_kind"]
            if gd.get("irq_mode"):     # PCI: the interrupts the guest's driver chose
                devices[dname]["irq_mode"] = gd["irq_mode"]
            if gd.get("dma"):          # behind an IOMMU: the driver's DMA API, counted
                devices[dname]["dma"] = gd["dma"]
        vms[vname] = {"memory": vm.memory, "devices": devices,
                      "exits": grep.get("exits", 0),
                      "ioeventfd_writes": grep.get("ioeventfd_writes", 0)}
        iommu = host_vms.get(vname, {}).get("iommu")
        if iommu:                      # the VM's IOMMU: endpoints, domains, maps, faults
            vms[vname]["iommu"] = iommu
        for wname, w in vm.workloads.items():
            rec = snapshot(stats.workload(layout.workload_records[(vname, wname)]), W)
            rep = (grep.get("workloads") or {}).get(wname, {})
            secs = rep.get("seconds") or (
                (rec["ended_ns"] or 0) - rec["started_ns"]) / 1e9 if rec["started_ns"] else 0
            secs = secs if secs and secs > 0 else elapsed
            extra = {k: v for k, v in rep.items()
                     if k not in ("kind", "ops", "bytes", "errors", "reads", "writes",
                                  "flushes", "other", "seconds", "ops_per_s", "mb_per_s",
                                  "error_messages")}
            entry = {
                "vm": vname, "type": w.type, "device": w.device, **extra,
                "ops": rec["ops"], "bytes": rec["bytes"], "errors": rec["errors"],
                "reads": rec["reads"], "writes": rec["writes"], "flushes": rec["flushes"],
                "seconds": round(secs, 3),
                "ops_per_s": round(rec["ops"] / secs, 1) if secs else 0.0,
                "mb_per_s": round(rec["bytes"] / secs / 1e6, 3) if secs else 0.0,
                "error_messages": rep.get("error_messages", []),
            }
            workloads[f"{vname}.{wname}"] = entry
            totals["workload_ops"] += rec["ops"]
            totals["workload_bytes"] += rec["bytes"]
            totals["workload_errors"] += rec["errors"]
    return {"run": layout.run, "config": source, "topology": topo.name,
            "elapsed_s": round(elapsed, 3), "vms": vms, "workloads": workloads,
            "host": {"loop": (host_report or {}).get("loop", {})},
            "switches": (host_report or {}).get("switches", {}),
            "totals": totals, "problems": list(problems)}


def latency(hist: list[int], every: int) -> dict[str, Any]:
    """A queue's latency (add_sgs to get_buf) from its sampled log2 histogram."""
    def us(q: float) -> float | None:
        ns = percentile_ns(hist, q)
        return None if ns is None else round(ns / 1e3, 2)
    return {"samples": sum(hist), "sampled_every": every, "p50_us": us(0.5),
            "p99_us": us(0.99), "histogram_log2_ns": hist}


def _us(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:.0f}µs" if x < 1000 else f"{x / 1000:.1f}ms"


def _n(x: int) -> str:
    return f"{x:,}"


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def render_summary(summary: dict[str, Any], console: Console) -> None:
    """The summary as tables: per device and queue, then per workload."""
    console.print(f"[bold]vmsim run {summary['run']}[/] ({summary['config']}): "
                  f"{summary['elapsed_s']:.1f} s, outcome [bold]{summary.get('outcome', '?')}"
                  f"[/]")
    for vname, vm in summary["vms"].items():
        for dname, dev in vm["devices"].items():
            title = (f"{vname}.{dname}: {dev['type']} over {dev['transport']}, "
                     f"status {dev['status']}, exits {dev['exits']['total']:,} "
                     f"({dev['exits']['read']:,} reads, {dev['exits']['write']:,} writes)")
            t = Table(title=title, title_justify="left", expand=False)
            for col in ("queue", "ring", "size", "added", "used", "in flight",
                        "kicks sent / suppr.", "irqs sent / suppr.", "read", "written",
                        "p50 / p99"):
                t.add_column(col, justify="right")
            vu = dev.get("info", {}).get("vhost_user")
            for q in dev["queues"]:
                # a vhost-user backend counts what it used and moved; the host does not see it
                t.add_row(str(q["index"]), q["ring"], str(q["size"]), _n(q["added"]),
                          "-" if vu else _n(q["used"]), _n(q["in_flight"]),
                          f"{_n(q['kicks'])} / {_n(q['kicks_suppressed'])}",
                          f"{_n(q['interrupts'])} / {_n(q['interrupts_suppressed'])}",
                          "-" if vu else _bytes(q["bytes_read"]),
                          "-" if vu else _bytes(q["bytes_written"]),
                          f"{_us(q['latency']['p50_us'])} / {_us(q['latency']['p99_us'])}")
            console.print(t)
            console.print(f"  features: {' '.join(dev['features']) or '(none negotiated)'}")
            if dev.get("dma"):
                d = dev["dma"]
                console.print("  behind the IOMMU: " + ", ".join(
                    f"{k} {_n(v) if isinstance(v, int) else v}" for k, v in d.items()))
            if vu:
                console.print(f"  vhost-user backend at {vu['socket']}: {_n(vu['messages'])} "
                              f"messages, {_n(vu['calls'])} interrupts relayed, "
                              f"{_n(vu['ring_errors'])} ring errors reported (used and bytes "
                              f"are the backend's to count)")
            if dev.get("irq_mode"):
                kinds = dev["exits"].get("by_kind", {})
                console.print(f"  interrupts: {dev['irq_mode']}; exits by kind: "
                              + ", ".join(f"{k} {_n(v)}" for k, v in sorted(kinds.items())))
            for p in dev.get("info", {}).get("ports", []) if dev["type"] == "console" else ():
                where = p.get("path") or ""
                console.print(f"  port {p['id']} {p['name']}: {p['backend']} {where}, "
                              f"{_bytes(p['bytes_to_guest'])} in, "
                              f"{_bytes(p['bytes_from_guest'])} out"
                              + (f", {_bytes(p['dropped_from_guest'])} dropped"
                                 if p["dropped_from_guest"] else ""), markup=False)
            for e in dev["errors"]:
                console.print(f"  [red]device error:[/] {e}")
            if dev.get("probe_error"):
                console.print(f"  [red]probe:[/] {dev['probe_error']}")
    if summary["workloads"]:
        t = Table(title="workloads", title_justify="left")
        for col in ("workload", "type", "device", "ops", "ops/s", "MB/s", "errors"):
            t.add_column(col, justify="right" if col in ("ops", "ops/s", "MB/s", "errors")
                         else "left")
        for name, w in summary["workloads"].items():
            err = str(w["errors"]) if not w["errors"] else f"[red]{w['errors']}[/]"
            t.add_row(name, w["type"], w["device"], _n(w["ops"]), f"{w['ops_per_s']:,.0f}",
                      f"{w['mb_per_s']:.1f}", err)
        console.print(t)
        for name, w in summary["workloads"].items():
            for m in w["error_messages"][:5]:
                console.print(f"  [red]{name}:[/] {m}")
    for p in summary["problems"]:
        console.print(f"[red]problem:[/] {p}")
