"""`vmsim bench`: the cases, each run against its baseline in the same round."""

import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from vmsim.bench.baseline_pipe import run_pipe_blk
from vmsim.bench.cpu import parallelism
from vmsim.bench.raw import run_pipe_raw, run_raw
from vmsim.launcher.run import Run
from vmsim.launcher.topology import load_topology


def blk_topology(op: str, seconds: float, withhold: list[str] | None = None,
                 block: int = 4096, in_flight: int = 64, ring: str = "split",
                 offer: list[str] | None = None) -> dict[str, Any]:
    """One VM, one RAM-disk virtio-blk device on MMIO, a blk-bench workload."""
    return {
        "name": "bench", "duration": seconds,
        "host": {"poll_us": 200},
        "vms": {"vm0": {
            "memory": "64M",
            "devices": {"vda": {"type": "blk", "backend": "memory", "size": "64M",
                                "queue_size": 256, "poll_us": 200, "ring": ring,
                                "features": {"withhold": withhold or [],
                                             "offer": offer or []}}},
            "workloads": {"bench": {"type": "blk-bench", "device": "vda", "op": op,
                                    "block_size": block, "in_flight": in_flight}},
        }},
    }


class Case:
    def __init__(self, name: str, op: str, baseline: str, ring: str = "split",
                 withhold: tuple[str, ...] = (), offer: tuple[str, ...] = ()) -> None:
        self.name, self.op, self.baseline = name, op, baseline
        self.ring, self.withhold, self.offer = ring, list(withhold), list(offer)


CASES = [
    Case("blk-read-4k", "read", "pipe-read-4k"),
    Case("blk-write-4k", "write", "pipe-write-4k"),
    Case("blk-read-4k-no-indirect", "read", "pipe-read-4k", withhold=("INDIRECT_DESC",)),
]
# --matrix: both ring formats, with and without in-order and event index (4 KiB reads)
MATRIX = [
    Case(f"ring-{ring}{'-in-order' if io else ''}{'' if ev else '-no-event-idx'}", "read",
         "pipe-read-4k", ring=ring, withhold=() if ev else ("EVENT_IDX",),
         offer=("IN_ORDER",) if io else ())
    for ring in ("split", "packed") for io in (False, True) for ev in (True, False)
]
# The raw ring, alone between two processes (vmsim.bench.raw), against Pipe request/response
RAW = [Case("raw-split", "raw", "pipe-raw"), Case("raw-packed", "raw", "pipe-raw",
                                                  ring="packed")]
BASELINES = {"pipe-read-4k": "read", "pipe-write-4k": "write", "pipe-raw": "raw"}


def run_vmsim_case(case: Case, seconds: float) -> dict[str, Any]:
    name = case.name
    if case.op == "raw":
        return {**run_raw(case.ring, seconds), "errors": 0}
    topo = load_topology(blk_topology(case.op, seconds, case.withhold, ring=case.ring,
                                      offer=case.offer), f"<bench {name}>")
    res = Run(topo, f"<bench {name}>", Path.cwd(), progress=False).execute()
    s = res.summary
    if res.exit_code != 0:
        raise RuntimeError(f"bench case {name} failed: {'; '.join(res.problems) or s['outcome']}")
    w = s["workloads"]["vm0.bench"]
    qs = s["vms"]["vm0"]["devices"]["vda"]["queues"]
    reqs = max(1, sum(q["used"] for q in qs))
    return {"requests_per_s": w["ops_per_s"], "ops": w["ops"],
            "kicks_per_request": sum(q["kicks"] for q in qs) / reqs,
            "interrupts_per_request": sum(q["interrupts"] for q in qs) / reqs,
            "errors": w["errors"]}


def run_bench(seconds: float, json_path: str | None, rounds: int = 1,
              matrix: bool = False) -> int:
    con = Console(stderr=True, highlight=False)
    cases = RAW + CASES + (MATRIX if matrix else [])
    par_before = parallelism()
    con.print(f"cpu parallelism for two processes: {par_before} (2.0 = two full CPUs)")
    rows: dict[str, list[dict[str, Any]]] = {c.name: [] for c in cases}
    for r in range(rounds):
        base: dict[str, float] = {}
        for bname, op in BASELINES.items():
            base[bname] = run_pipe_raw(seconds) if op == "raw" else run_pipe_blk(op, seconds)
            con.print(f"round {r}: {bname:24s} {base[bname]:12,.0f} req/s (Pipe + msgpack)")
        for case in cases:
            name, bname = case.name, case.baseline
            x = run_vmsim_case(case, seconds)
            x["baseline"] = bname
            x["baseline_requests_per_s"] = base[bname]
            x["ratio"] = x["requests_per_s"] / base[bname]
            x["ring"] = case.ring
            x["features"] = {"offer": case.offer, "withhold": case.withhold}
            rows[name].append(x)
            con.print(f"round {r}: {name:24s} {x['requests_per_s']:12,.0f} req/s "
                      f"ratio {x['ratio']:.2f}  kicks/req {x['kicks_per_request']:.4f}  "
                      f"irqs/req {x['interrupts_per_request']:.4f}")
    par_after = parallelism()
    results = []
    for case in cases:
        name = case.name
        xs = sorted(rows[name], key=lambda x: x["ratio"])
        x = xs[len(xs) // 2]           # the median round by ratio
        results.append({"name": name, "ring": x["ring"], "features": x["features"],
                        "requests_per_s": round(x["requests_per_s"], 1),
                        "baseline": x["baseline"],
                        "baseline_requests_per_s": round(x["baseline_requests_per_s"], 1),
                        "ratio": round(x["ratio"], 3),
                        "kicks_per_request": round(x["kicks_per_request"], 5),
                        "interrupts_per_request": round(x["interrupts_per_request"], 5),
                        "rounds": len(xs)})
    t = Table(title=f"vmsim bench ({seconds:g} s per run, {rounds} round(s); cpu parallelism "
                    f"{par_before} before, {par_after} after)", title_justify="left")
    for col in ("case", "vmsim req/s", "baseline", "baseline req/s", "ratio", "kicks/req",
                "irqs/req"):
        t.add_column(col, justify="left" if col in ("case", "baseline") else "right")
    for x in results:
        t.add_row(x["name"], f"{x['requests_per_s']:,.0f}", x["baseline"],
                  f"{x['baseline_requests_per_s']:,.0f}", f"{x['ratio']:.2f}",
                  f"{x['kicks_per_request']:.4f}", f"{x['interrupts_per_request']:.4f}")
    Console(highlight=False, width=None if sys.stdout.isatty() else 120).print(t)
    if json_path:
        doc = {"bench": "vmsim", "seconds": seconds, "rounds": rounds,
               "cpu_parallelism": {"before": par_before, "after": par_after},
               "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                           "platform": platform.platform()},
               "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "results": results}
        with open(json_path, "w") as f:
            json.dump(doc, f, indent=2)
            f.write("\n")
    return 0
