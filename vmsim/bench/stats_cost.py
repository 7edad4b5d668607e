"""`vmsim bench --stats-cost`: what observing a run costs its data path.

The same 4 KiB read benchmark runs in four settings, interleaved within each round so that a
change in the machine's load hits all of them alike:

    stats-off        queue counters reach the stats region only at the end; no request timed
    stats-on         the default: counters published a few times a second, 1 request in
                     LATENCY_SAMPLE_EVERY timed from add_sgs to get_buf
    dashboard-4hz    stats on, and the launcher draws the dashboard 4 times a second (to an
                     off-screen console of 180x50: the same sampling, rendering and output)
    dashboard-10hz   the same at 10 Hz

Throughput on a shared machine moves by more than what is measured here, so two figures that
load hardly touches come with it: the CPU time the guest and host processes spent per request
(their whole lives, boot and teardown included, from getrusage(RUSAGE_CHILDREN)), and the CPU
time the launcher spent per second (RUSAGE_SELF: the dashboard's sampling and drawing). Each
figure is the median over rounds; ratios are taken within a round (runs seconds apart), and
the order of the settings rotates from round to round.
"""

import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from vmsim.bench.cpu import parallelism
from vmsim.bench.runner import blk_topology
from vmsim.launcher.run import Run
from vmsim.launcher.topology import load_topology

SETTINGS = [("stats-off", False, 0.0), ("stats-on", True, 0.0),
            ("dashboard-4hz", True, 4.0), ("dashboard-10hz", True, 10.0)]


def run_setting(name: str, live_stats: bool, hz: float, seconds: float) -> dict[str, Any]:
    # at the queue's depth, as the blk cases of `vmsim bench`: where requests cost least,
    # observing them costs most in proportion
    topo = load_topology(blk_topology("read", seconds, in_flight=256), f"<bench {name}>")
    devnull = open(os.devnull, "w")  # noqa: SIM115 (closed below)
    kids0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    self0 = resource.getrusage(resource.RUSAGE_SELF)
    try:
        console = Console(file=devnull, force_terminal=True, width=180, height=50,
                          color_system="truecolor") if hz else None
        res = Run(topo, f"<bench {name}>", Path.cwd(), progress=False, live_stats=live_stats,
                  dashboard=bool(hz), refresh_hz=hz or 4.0, dashboard_console=console).execute()
    finally:
        devnull.close()
    kids1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    self1 = resource.getrusage(resource.RUSAGE_SELF)
    if res.exit_code != 0:
        raise RuntimeError(f"bench setting {name} failed: {'; '.join(res.problems)}")
    w = res.summary["workloads"]["vm0.bench"]
    kids = kids1.ru_utime + kids1.ru_stime - kids0.ru_utime - kids0.ru_stime
    me = self1.ru_utime + self1.ru_stime - self0.ru_utime - self0.ru_stime
    out = {"requests_per_s": w["ops_per_s"], "ops": w["ops"],
           "processes_cpu_us_per_request": round(1e6 * kids / max(1, w["ops"]), 3),
           "launcher_cpu_ms_per_s": round(1e3 * me / max(1e-9, res.summary["elapsed_s"]), 2)}
    if "dashboard" in res.summary:
        d = res.summary["dashboard"]
        out["frames"] = d["frames"]
        out["ms_per_frame"] = round(1e3 * d["cpu_s"] / max(1, d["frames"]), 2)
    return out


def run_stats_cost(seconds: float, rounds: int, json_path: str | None) -> int:
    con = Console(stderr=True, highlight=False)
    par_before = parallelism()
    con.print(f"cpu parallelism for two processes: {par_before} (2.0 = two full CPUs)")
    rows: dict[str, list[dict[str, Any]]] = {n: [] for n, _, _ in SETTINGS}
    for r in range(rounds):
        for name, live, hz in SETTINGS[r % 4:] + SETTINGS[:r % 4]:
            x = run_setting(name, live, hz, seconds)
            rows[name].append(x)
            extra = f"  {x['ms_per_frame']} ms/frame" if "ms_per_frame" in x else ""
            con.print(f"round {r}: {name:15s} {x['requests_per_s']:12,.0f} req/s  "
                      f"{x['processes_cpu_us_per_request']:.2f} cpu us/req  launcher "
                      f"{x['launcher_cpu_ms_per_s']:.1f} cpu ms/s{extra}")
    par_after = parallelism()
    def median(xs: list[float]) -> float:
        xs = sorted(xs)
        return xs[len(xs) // 2]

    def ratio(name: str, key: str) -> float:
        return median([x[key] / max(1e-9, y[key])
                       for x, y in zip(rows[name], rows["stats-off"], strict=True)])

    t = Table(title=f"vmsim bench --stats-cost ({seconds:g} s per run, {rounds} round(s); cpu "
                    f"parallelism {par_before} before, {par_after} after)", title_justify="left")
    for col in ("setting", "req/s", "vs off", "cpu us/req", "vs off", "launcher cpu ms/s",
                "cpu ms/frame"):
        t.add_column(col, justify="left" if col == "setting" else "right")
    results = []
    for name, _, hz in SETTINGS:
        xs = rows[name]
        x = {k: median([y[k] for y in xs]) for k in ("requests_per_s",
                                                      "processes_cpu_us_per_request",
                                                      "launcher_cpu_ms_per_s")}
        if hz:
            x["ms_per_frame"] = median([y["ms_per_frame"] for y in xs])
        x.update(setting=name, refresh_hz=hz, rounds=len(xs),
                 requests_ratio_to_stats_off=round(ratio(name, "requests_per_s"), 4),
                 cpu_ratio_to_stats_off=round(ratio(name, "processes_cpu_us_per_request"), 4),
                 all_rounds=xs)
        results.append(x)
        t.add_row(name, f"{x['requests_per_s']:,.0f}", f"{x['requests_ratio_to_stats_off']:.3f}",
                  f"{x['processes_cpu_us_per_request']:.2f}",
                  f"{x['cpu_ratio_to_stats_off']:.3f}", f"{x['launcher_cpu_ms_per_s']:.1f}",
                  str(x.get("ms_per_frame", "-")))
    Console(highlight=False, width=None if sys.stdout.isatty() else 120).print(t)
    if json_path:
        with open(json_path, "w") as f:
            json.dump({"bench": "vmsim-stats-cost", "seconds": seconds, "rounds": rounds,
                       "cpu_parallelism": {"before": par_before, "after": par_after},
                       "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "results": results},
                      f, indent=2)
            f.write("\n")
    return 0
