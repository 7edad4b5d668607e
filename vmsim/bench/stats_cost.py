"""`vmsim bench --stats-cost`: what observing a run costs its data path.

The same 4 KiB read benchmark runs in four settings, interleaved within each round so that a
change in the machine's load hits all of them alike:

    stats-off        queue counters reach the stats region only at the end; no request timed
    stats-on         the default: counters published a few times a second, 1 request in
                     LATENCY_SAMPLE_EVERY timed from add_sgs to get_buf
    dashboard-4hz    stats on, and the launcher draws the dashboard 4 times a second (to an
                     off-screen console of 180x50: the same sampling, rendering and output)
    dashboard-10hz   the same at 10 Hz

The figure is each setting's median requests/s and its ratio to stats-off.
"""

import json
import os
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
    topo = load_topology(blk_topology("read", seconds), f"<bench {name}>")
    devnull = open(os.devnull, "w")  # noqa: SIM115 (closed below)
    try:
        console = Console(file=devnull, force_terminal=True, width=180, height=50,
                          color_system="truecolor") if hz else None
        res = Run(topo, f"<bench {name}>", Path.cwd(), progress=False, live_stats=live_stats,
                  dashboard=bool(hz), refresh_hz=hz or 4.0, dashboard_console=console).execute()
    finally:
        devnull.close()
    if res.exit_code != 0:
        raise RuntimeError(f"bench setting {name} failed: {'; '.join(res.problems)}")
    w = res.summary["workloads"]["vm0.bench"]
    out = {"requests_per_s": w["ops_per_s"], "ops": w["ops"]}
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
        for name, live, hz in SETTINGS:
            x = run_setting(name, live, hz, seconds)
            rows[name].append(x)
            extra = f"  {x['ms_per_frame']} ms/frame" if "ms_per_frame" in x else ""
            con.print(f"round {r}: {name:15s} {x['requests_per_s']:12,.0f} req/s{extra}")
    par_after = parallelism()
    med = {}
    for name, xs in rows.items():
        xs = sorted(xs, key=lambda x: x["requests_per_s"])
        med[name] = xs[len(xs) // 2]
    base = med["stats-off"]["requests_per_s"]
    t = Table(title=f"vmsim bench --stats-cost ({seconds:g} s per run, {rounds} round(s); cpu "
                    f"parallelism {par_before} before, {par_after} after)", title_justify="left")
    for col in ("setting", "req/s (median)", "vs stats-off", "cpu ms/frame"):
        t.add_column(col, justify="left" if col == "setting" else "right")
    results = []
    for name, _, hz in SETTINGS:
        x = med[name]
        ratio = x["requests_per_s"] / base if base else 0.0
        results.append({"setting": name, "requests_per_s": x["requests_per_s"],
                        "ratio_to_stats_off": round(ratio, 4), "refresh_hz": hz,
                        "ms_per_frame": x.get("ms_per_frame"), "rounds": len(rows[name]),
                        "all_rounds": [y["requests_per_s"] for y in rows[name]]})
        t.add_row(name, f"{x['requests_per_s']:,.0f}", f"{ratio:.3f}",
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
