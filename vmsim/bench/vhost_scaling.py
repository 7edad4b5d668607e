"""Does moving the data plane out of the host process scale? N VMs, each with one virtio-blk
device under a blk-bench workload (4 KiB random reads, 64 in flight, a page-cached image),
served either in-process by the one host process (one Python interpreter: one GIL for every
device) or by N `vmsim backend blk` processes over vhost-user (the host keeps only the control
plane and the interrupt relay).

For each case: aggregate requests/s over a measurement window that starts once every workload
runs, and the CPU seconds each kind of process spent per request in that window (read from
/proc), so the device side's cost per request - the host process in-process, the backend
processes plus the host's relay over vhost-user - is seen beside the guests'.
"""

import os
import time
from pathlib import Path
from typing import Any

from vmsim.launcher.run import Run
from vmsim.launcher.topology import load_topology
from vmsim.machine.stats import W

CLK_TCK = os.sysconf("SC_CLK_TCK")


def _cpu_s(pid: int) -> float:
    """utime + stime of a live process, in seconds (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def scaling_topology(n: int, vhost_user: bool, seconds: float) -> dict[str, Any]:
    backend: Any = {"vhost_user": {"spawn": True}} if vhost_user else "file"
    vms = {}
    for i in range(n):
        vms[f"vm{i}"] = {
            "memory": "64M",
            "devices": {"vda": {"type": "blk", "transport": "pci", "backend": backend,
                                "size": "32M", "queue_size": 256, "poll_us": 200}},
            "workloads": {"bench": {"type": "blk-bench", "device": "vda", "op": "read",
                                    "block_size": 4096, "in_flight": 64}},
        }
    return {"name": "vhost-scaling", "duration": seconds + 30, "host": {"poll_us": 200},
            "vms": vms}


def run_case(n: int, vhost_user: bool, seconds: float, warmup: float = 0.5) -> dict[str, Any]:
    """One case; the run's own duration is long, the director ends it after the window."""
    out: dict[str, Any] = {}

    def director(run: Run) -> None:
        lay = run.layout
        recs = [lay.workload_records[(f"vm{i}", "bench")] for i in range(n)]

        def snapshot() -> tuple[float, int, dict[str, float]]:
            ops = sum(int(run.stats.workload(r)[W.OPS]) for r in recs)
            cpu = {"guests": 0.0, "host": 0.0, "backends": 0.0}
            for c in run.children:
                cpu["host" if c.role == "host" else "guests"] += _cpu_s(c.popen.pid)
            for s in (run.backends.spawned if run.backends else []):
                cpu["backends"] += _cpu_s(s.popen.pid)
            return time.monotonic(), ops, cpu

        run.pump(warmup)
        t0, ops0, cpu0 = snapshot()
        run.pump(seconds)
        t1, ops1, cpu1 = snapshot()
        reqs = max(1, ops1 - ops0)
        out.update(requests_per_s=reqs / (t1 - t0), requests=reqs,
                   cpu_us_per_request={k: (cpu1[k] - cpu0[k]) / reqs * 1e6 for k in cpu0})

    name = f"vhost-scaling-{n}-{'vhost-user' if vhost_user else 'in-process'}"
    topo = load_topology(scaling_topology(n, vhost_user, seconds), f"<bench {name}>")
    res = Run(topo, f"<bench {name}>", Path.cwd(), progress=False,
              director=director).execute()
    errors = sum(w.get("errors", 0) for w in res.summary.get("workloads", {}).values())
    if res.exit_code != 0 or errors or not out:
        raise RuntimeError(f"bench case {name} failed: "
                           f"{'; '.join(res.problems) or res.summary.get('outcome')}")
    cpu = out["cpu_us_per_request"]
    return {"name": name, "devices": n, "mode": "vhost-user" if vhost_user else "in-process",
            "requests_per_s": out["requests_per_s"], "requests": out["requests"],
            "device_side_cpu_us_per_request": cpu["host"] + cpu["backends"],
            "host_cpu_us_per_request": cpu["host"],
            "backend_cpu_us_per_request": cpu["backends"],
            "guest_cpu_us_per_request": cpu["guests"]}


def run_scaling(seconds: float, counts: tuple[int, ...] = (1, 2, 4),
                rounds: int = 1) -> list[dict[str, Any]]:
    """Every case, `rounds` times interleaved (a noisy machine drifts: interleaving keeps the
    comparison fair); the median round of each."""
    runs: dict[str, list[dict[str, Any]]] = {}
    for _ in range(rounds):
        for n in counts:
            for vu in (False, True):
                r = run_case(n, vu, seconds)
                runs.setdefault(r["name"], []).append(r)
    out = []
    for rs in runs.values():
        rs.sort(key=lambda r: r["requests_per_s"])
        out.append(rs[len(rs) // 2])
    return out


def format_table(results: list[dict[str, Any]]) -> list[str]:
    lines = [f"{'devices':>7} {'mode':>11} {'req/s':>10} {'x 1 dev':>8} "
             f"{'device-side us/req':>19} {'(host':>7} {'backends)':>10} {'guest us/req':>13}"]
    base = {r["mode"]: r["requests_per_s"] for r in results if r["devices"] == 1}
    for r in results:
        scale = r["requests_per_s"] / base.get(r["mode"], r["requests_per_s"])
        lines.append(f"{r['devices']:>7} {r['mode']:>11} {r['requests_per_s']:>10,.0f} "
                     f"{scale:>7.2f}x {r['device_side_cpu_us_per_request']:>19.1f} "
                     f"{r['host_cpu_us_per_request']:>7.1f} "
                     f"{r['backend_cpu_us_per_request']:>10.1f} "
                     f"{r['guest_cpu_us_per_request']:>13.1f}")
    return lines


def run_vhost_scaling(seconds: float, rounds: int, json_path: str | None) -> int:
    """`vmsim bench --vhost-scaling`: the table, with the machine's parallelism beside it."""
    import json

    from vmsim.bench.cpu import parallelism
    before = parallelism()
    results = run_scaling(seconds, rounds=rounds)
    after = parallelism()
    print(f"vhost-user scaling: {seconds:g} s windows, median of {rounds} round(s); "
          f"cpu parallelism {before:.2f} before, {after:.2f} after (2.0 = two free cores)")
    for line in format_table(results):
        print(line)
    by = {(r["devices"], r["mode"]): r["requests_per_s"] for r in results}
    for n in sorted({r["devices"] for r in results}):
        if (n, "in-process") in by and (n, "vhost-user") in by:
            print(f"{n} device(s): vhost-user / in-process = "
                  f"{by[(n, 'vhost-user')] / by[(n, 'in-process')]:.2f}")
    if json_path:
        with open(json_path, "w") as f:
            json.dump({"bench": "vhost-scaling", "seconds": seconds, "rounds": rounds,
                       "cpu_parallelism": [before, after], "results": results}, f, indent=1)
    return 0
