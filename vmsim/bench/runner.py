"""`vmsim bench`: the cases, each run against its baseline in the same round.

    raw-*          the raw virtqueue (vmsim.bench.raw), split and packed, scalar and batched
                   paths, against Pipe + msgpack request/response pairs (pipe-raw)
    blk-*-4k       4 KiB random reads / writes through a whole vmsim run (guest driver and
                   workload, MMIO transport, host device, RAM disk) at the queue's depth
                   (256 in flight), against the same requests over Pipe + msgpack at the
                   same depth (pipe-read-4k / pipe-write-4k); -qd64: both at 64 in flight
    blk-seqread-64k  64 KiB sequential reads of an image file in the page cache, against this
                   machine's memcpy bandwidth measured in the same round (vmsim.bench.memcpy)

Every row carries the notifications per request (kicks, interrupts) the run needed; the run
records the parallelism two processes got (vmsim.bench.cpu) before and after.
"""

import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from vmsim.bench.baseline_pipe import run_pipe_blk
from vmsim.bench.cpu import parallelism
from vmsim.bench.memcpy import memcpy_mb_s
from vmsim.bench.raw import run_pipe_raw, run_raw
from vmsim.launcher.run import Run
from vmsim.launcher.topology import load_topology

SEQ_IMAGE = 64 << 20           # the page-cached image of the 64 KiB sequential-read case


def blk_topology(op: str, seconds: float, withhold: list[str] | None = None,
                 block: int = 4096, in_flight: int = 64, ring: str = "split",
                 offer: list[str] | None = None, path: str | None = None,
                 pattern: str = "random") -> dict[str, Any]:
    """One VM, one virtio-blk device on MMIO (a RAM disk, or the image at `path`), a
    blk-bench workload."""
    dev: dict[str, Any] = {"type": "blk", "backend": "memory", "size": "64M",
                           "queue_size": 256, "poll_us": 200, "ring": ring,
                           "features": {"withhold": withhold or [], "offer": offer or []}}
    if path is not None:
        dev.update(backend="file", path=path, size=f"{SEQ_IMAGE >> 20}M")
    return {
        "name": "bench", "duration": seconds,
        "host": {"poll_us": 200},
        "vms": {"vm0": {
            "memory": "64M",
            "devices": {"vda": dev},
            "workloads": {"bench": {"type": "blk-bench", "device": "vda", "op": op,
                                    "block_size": block, "in_flight": in_flight,
                                    "pattern": pattern}},
        }},
    }


class Case:
    def __init__(self, name: str, op: str, baseline: str, ring: str = "split",
                 withhold: tuple[str, ...] = (), offer: tuple[str, ...] = (),
                 batched: bool = False, block: int = 4096, in_flight: int = 64,
                 seq_file: bool = False, target: float = 0.0) -> None:
        self.name, self.op, self.baseline = name, op, baseline
        self.ring, self.withhold, self.offer = ring, list(withhold), list(offer)
        self.batched, self.block, self.in_flight = batched, block, in_flight
        self.seq_file = seq_file
        self.target = target            # the ratio to reach (0: none)


# The raw ring, alone between two processes (vmsim.bench.raw), against Pipe request/response
RAW = [Case(f"raw-{ring}-{mode}", "raw", "pipe-raw", ring=ring, batched=mode == "batched",
            target=20.0 if mode == "batched" else 10.0)
       for ring in ("split", "packed") for mode in ("scalar", "batched")]
# 4 KiB requests at the disk's whole queue depth (virtio_blk's default: one request per
# ring entry, 256 here) and at 64 in flight, each against Pipe + msgpack at the same depth.
CASES = [
    Case("blk-read-4k", "read", "pipe-read-4k", in_flight=256, target=5.0),
    Case("blk-write-4k", "write", "pipe-write-4k", in_flight=256, target=5.0),
    Case("blk-read-4k-qd64", "read", "pipe-read-4k-qd64"),
    Case("blk-write-4k-qd64", "write", "pipe-write-4k-qd64"),
    Case("blk-seqread-64k", "read", "memcpy", block=65536, in_flight=16, seq_file=True,
         target=0.5),
]
# --matrix: both ring formats, with and without in-order and event index (4 KiB reads)
MATRIX = [
    Case(f"ring-{ring}{'-in-order' if io else ''}{'' if ev else '-no-event-idx'}", "read",
         "pipe-read-4k", ring=ring, withhold=() if ev else ("EVENT_IDX",),
         offer=("IN_ORDER",) if io else ())
    for ring in ("split", "packed") for io in (False, True) for ev in (True, False)
] + [Case("blk-read-4k-no-indirect", "read", "pipe-read-4k", withhold=("INDIRECT_DESC",))]
BASELINES = {"pipe-raw": ("raw", 64), "pipe-read-4k": ("read", 256),
             "pipe-write-4k": ("write", 256), "pipe-read-4k-qd64": ("read", 64),
             "pipe-write-4k-qd64": ("write", 64), "memcpy": ("memcpy", 0)}


def _seq_image(path: str) -> None:
    """The image of the sequential-read case, written and read once so that it is in the
    page cache when measured."""
    block = os.urandom(1 << 20)
    with open(path, "wb") as f:
        for _ in range(SEQ_IMAGE >> 20):
            f.write(block)
    with open(path, "rb") as f:
        while f.read(8 << 20):
            pass


def run_vmsim_case(case: Case, seconds: float, image: str | None = None) -> dict[str, Any]:
    name = case.name
    if case.op == "raw":
        return {**run_raw(case.ring, seconds, batched=case.batched), "errors": 0}
    topo = load_topology(blk_topology(case.op, seconds, case.withhold, block=case.block,
                                      in_flight=case.in_flight, ring=case.ring,
                                      offer=case.offer,
                                      path=image if case.seq_file else None,
                                      pattern="sequential" if case.seq_file else "random"),
                         f"<bench {name}>")
    res = Run(topo, f"<bench {name}>", Path.cwd(), progress=False).execute()
    s = res.summary
    if res.exit_code != 0:
        raise RuntimeError(f"bench case {name} failed: {'; '.join(res.problems) or s['outcome']}")
    w = s["workloads"]["vm0.bench"]
    qs = s["vms"]["vm0"]["devices"]["vda"]["queues"]
    reqs = max(1, sum(q["used"] for q in qs))
    return {"requests_per_s": w["ops_per_s"], "ops": w["ops"],
            "mb_per_s": w["ops_per_s"] * case.block / 1e6,
            "kicks_per_request": sum(q["kicks"] for q in qs) / reqs,
            "interrupts_per_request": sum(q["interrupts"] for q in qs) / reqs,
            "errors": w["errors"]}


def _baseline(bname: str, seconds: float) -> float:
    op, in_flight = BASELINES[bname]
    if op == "raw":
        return run_pipe_raw(seconds)
    if op == "memcpy":
        return memcpy_mb_s()
    return run_pipe_blk(op, seconds, in_flight=in_flight)


def run_bench(seconds: float, json_path: str | None, rounds: int = 1,
              matrix: bool = False) -> int:
    con = Console(stderr=True, highlight=False)
    cases = RAW + CASES + (MATRIX if matrix else [])
    par_before = parallelism()
    con.print(f"cpu parallelism for two processes: {par_before} (2.0 = two full CPUs)")
    rows: dict[str, list[dict[str, Any]]] = {c.name: [] for c in cases}
    t_start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="vmsim-bench-") as tmp:
        image = os.path.join(tmp, "seq.img")
        _seq_image(image)
        for r in range(rounds):
            base: dict[str, float] = {}
            for case in cases:
                name, bname = case.name, case.baseline
                # The baseline runs right before its case, every time: on a shared machine
                # the load changes within seconds, and a ratio is only as good as the two
                # figures are close in time.
                base[bname] = _baseline(bname, seconds)
                unit = "MB/s (memcpy)" if bname == "memcpy" else "req/s (Pipe + msgpack)"
                con.print(f"round {r}: {bname:24s} {base[bname]:12,.0f} {unit}")
                x = run_vmsim_case(case, seconds, image)
                x["baseline"] = bname
                if bname == "memcpy":
                    x["baseline_mb_per_s"] = base[bname]
                    x["ratio"] = x["mb_per_s"] / base[bname]
                else:
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
        out = {"name": name, "ring": x["ring"], "features": x["features"],
               "batched": case.batched,
               "requests_per_s": round(x["requests_per_s"], 1),
               "baseline": x["baseline"],
               "ratio": round(x["ratio"], 3), "target_ratio": case.target,
               "meets_target": x["ratio"] >= case.target,
               "kicks_per_request": round(x["kicks_per_request"], 5),
               "interrupts_per_request": round(x["interrupts_per_request"], 5),
               "rounds": len(xs), "all_ratios": [round(y["ratio"], 3) for y in xs]}
        if "mb_per_s" in x:
            out["mb_per_s"] = round(x["mb_per_s"], 1)
        for k in ("baseline_requests_per_s", "baseline_mb_per_s"):
            if k in x:
                out[k] = round(x[k], 1)
        if "lost_wakeups" in x:
            out["lost_wakeups"] = x["lost_wakeups"]
        results.append(out)
    elapsed = time.monotonic() - t_start
    t = Table(title=f"vmsim bench ({seconds:g} s per run, {rounds} round(s), median round; "
                    f"cpu parallelism {par_before} before, {par_after} after)",
              title_justify="left")
    for col in ("case", "vmsim req/s", "MB/s", "baseline", "baseline", "ratio", "target",
                "kicks/req", "irqs/req"):
        t.add_column(col, justify="left" if col in ("case",) else "right")
    for x in results:
        if x["baseline"] == "memcpy":
            bval = f"{x['baseline_mb_per_s']:,.0f} MB/s"
        else:
            bval = f"{x['baseline_requests_per_s']:,.0f} req/s"
        t.add_row(x["name"], f"{x['requests_per_s']:,.0f}",
                  f"{x['mb_per_s']:,.0f}" if "mb_per_s" in x else "-", x["baseline"], bval,
                  f"{x['ratio']:.2f}",
                  (f"{'>=' if x['meets_target'] else 'MISS <'} {x['target_ratio']:g}"
                   if x["target_ratio"] else "-"),
                  f"{x['kicks_per_request']:.4f}", f"{x['interrupts_per_request']:.4f}")
    out_con = Console(highlight=False, width=None if sys.stdout.isatty() else 130)
    out_con.print(t)
    npr = min(x["kicks_per_request"] + x["interrupts_per_request"] for x in results)
    out_con.print(f"notifications per request under steady load (kicks + interrupts, best "
                  f"case): {npr:.4f}; whole bench {elapsed:.0f} s")
    if json_path:
        doc = {"bench": "vmsim", "seconds": seconds, "rounds": rounds,
               "cpu_parallelism": {"before": par_before, "after": par_after},
               "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                           "platform": platform.platform()},
               "elapsed_s": round(elapsed, 1),
               "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "results": results}
        with open(json_path, "w") as f:
            json.dump(doc, f, indent=2)
            f.write("\n")
    return 0
