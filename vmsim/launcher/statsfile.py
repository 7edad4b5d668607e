"""`vmsim run --stats-every S --stats-file FILE`: one JSON object per line, per interval, for
plotting. Each line holds the counters as they stand and the rates over the interval since the
previous line (the first line's, since the workloads started):

    {"run": ..., "t": 2.0, "time": 1718000000.1, "interval_s": 1.0, "final": false,
     "vms": {"vm0": {"vda": {"status": "DRIVER_OK", "exits": 12, "exits_by_kind": {...},
                             "queues": [{"index": 0, "ring": "split", "size": 256,
                                         "avail_idx": ..., "used_idx": ..., "added": ...,
                                         "ops_per_s": ..., "latency_p50_us": ..., ...}]}}},
     "workloads": {"vm0.verify": {"ops": ..., "ops_per_s": ..., "mb_per_s": ..., ...}}}

The last line, written as the run stops, has "final": true.
"""

import json
import time
from typing import IO, Any

from vmsim.launcher.dashboard import short_status
from vmsim.launcher.rates import queue_rates, workload_rates
from vmsim.launcher.statsread import Sample


def _r(x: float | None, nd: int = 1) -> float | None:
    return None if x is None else round(x, nd)


def stats_line(manifest: dict[str, Any], cur: Sample, prev: Sample | None, t: float,
               final: bool = False) -> dict[str, Any]:
    """One line's object: `cur` with rates since `prev`."""
    dt = cur.t - prev.t if prev is not None else 0.0
    vms: dict[str, Any] = {}
    for (vname, dname), ds in cur.devices.items():
        pd = prev.devices.get((vname, dname)) if prev is not None else None
        queues = []
        for q in ds.queues:
            pq = pd.queues[q.index] if pd is not None and q.index < len(pd.queues) else None
            r = queue_rates(q, pq, dt)
            c = q.c
            rs = q.ring
            queues.append({
                "index": q.index, "ring": "packed" if c["ring"] else "split",
                "size": c["size"], "ready": bool(c["ready"]),
                "avail_idx": rs.avail_idx if rs else None,
                "used_idx": rs.used_idx if rs else None,
                "added": c["added"], "used": c["used"],
                "in_flight": c["added"] - c["completed"] - c["detached"],
                "device_in_flight": c["dev_in_flight"],
                "free_descriptors": c["num_free"],
                "kicks": c["kicks"], "kicks_suppressed": c["kicks_suppressed"],
                "interrupts": c["interrupts"],
                "interrupts_suppressed": c["interrupts_suppressed"],
                "spurious": c["spurious"], "notifies": c["notifies"],
                "bytes_read": c["bytes_read"], "bytes_written": c["bytes_written"],
                "ops_per_s": _r(r.ops_per_s), "mb_per_s": _r(r.mb_per_s, 3),
                "kicks_per_s": _r(r.kicks_per_s), "interrupts_per_s": _r(r.irqs_per_s),
                "kicks_suppressed_share": _r(r.kicks_suppressed, 4),
                "interrupts_suppressed_share": _r(r.irqs_suppressed, 4),
                "latency_p50_us": _r(r.p50_ns / 1e3 if r.p50_ns is not None else None, 2),
                "latency_p99_us": _r(r.p99_ns / 1e3 if r.p99_ns is not None else None, 2),
            })
        c = ds.c
        vms.setdefault(vname, {})[dname] = {
            "status": short_status(c["status"]), "exits": c["exits_read"] + c["exits_write"],
            "exits_by_kind": ds.exits_by_kind, "config_changes": c["config_generation"],
            "errors": c["device_errors"], "queues": queues}
    workloads = {}
    for (vname, wname), c in cur.workloads.items():
        p = prev.workloads.get((vname, wname)) if prev is not None else None
        r = workload_rates(c, p, dt)
        workloads[f"{vname}.{wname}"] = {"ops": c["ops"], "bytes": c["bytes"],
                                          "errors": c["errors"], "ops_per_s": _r(r.ops_per_s),
                                          "mb_per_s": _r(r.mb_per_s, 3)}
    return {"run": manifest["run"], "t": round(t, 3), "time": round(time.time(), 3),
            "interval_s": round(dt, 3), "final": final, "vms": vms, "workloads": workloads}


class StatsFile:
    """Appends a line per interval; the file is opened (append) for the run's length."""

    def __init__(self, path: str, manifest: dict[str, Any], start: Sample | None) -> None:
        self.manifest = manifest
        self.f: IO[str] = open(path, "a")  # noqa: SIM115 (held for the run, closed in close)
        self.prev = start           # the first line's rates count from here
        self.lines = 0

    def write(self, cur: Sample, t: float, final: bool = False) -> None:
        self.f.write(json.dumps(stats_line(self.manifest, cur, self.prev, t, final)) + "\n")
        self.f.flush()              # a plotting script may be following the file
        self.prev = cur
        self.lines += 1

    def close(self) -> None:
        self.f.close()
