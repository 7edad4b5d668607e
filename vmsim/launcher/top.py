"""`vmsim ps` and `vmsim top`: the runs in progress, and the dashboard of one of them from
another terminal.

Runs are found as `vmsim console` finds them (vmsim.launcher.console_attach.live_runs: a run
directory whose launcher is alive), and read through the manifest the launcher writes there
once the run is under way. `top` maps the run's stats region and its guests' RAM read-only:
it cannot disturb the run, and leaving it (q) leaves the run as it was. It ends by itself when
the run ends.
"""

import json
import select
import sys
import time
from typing import Any

import posix_ipc
from rich.console import Console
from rich.table import Table

from vmsim.launcher import manifest as manifests
from vmsim.launcher.console_attach import live_runs
from vmsim.launcher.dashboard import UiState, render
from vmsim.launcher.live import DEFAULT_HZ, LiveDashboard
from vmsim.launcher.rates import History
from vmsim.launcher.statsfile import stats_line
from vmsim.launcher.statsread import RunReader
from vmsim.machine import runname, shm


class TopError(Exception):
    """No run to show (one readable line)."""


def running(tmp: str | None = None) -> list[tuple[str, str, dict[str, Any] | None]]:
    """(run, run directory, manifest or None while it starts) of every run in progress."""
    out = []
    for run, rundir in live_runs(tmp):
        try:
            m: dict[str, Any] | None = manifests.read(rundir)
        except manifests.ManifestError:
            m = None
        out.append((run, rundir, m))
    return out


def _uptime(m: dict[str, Any]) -> float:
    # CLOCK_MONOTONIC is one clock for every process of the machine.
    return max(0.0, time.monotonic() - float(m.get("started_mono") or time.monotonic()))


def ps_rows(tmp: str | None = None) -> list[dict[str, Any]]:
    rows = []
    for run, rundir, m in running(tmp):
        row: dict[str, Any] = {"run": run, "pid": runname.launcher_pid(run), "rundir": rundir}
        if m is None:
            row.update(state="starting")
        else:
            row.update(state="running", config=m.get("config"), topology=m.get("topology"),
                       uptime_s=round(_uptime(m), 1), duration_s=m.get("duration"),
                       vms={v: sorted(vm["devices"]) for v, vm in m["vms"].items()})
        rows.append(row)
    return rows


def main_ps(as_json: bool = False) -> int:
    rows = ps_rows()
    if as_json:
        print(json.dumps(rows, indent=1))
        return 0
    if not rows:
        print("no vmsim run in progress")
        return 0
    t = Table(box=None, header_style="bold", pad_edge=False)
    for col in ("RUN", "PID", "CONFIG", "UPTIME", "VMS"):
        t.add_column(col, no_wrap=col != "VMS")
    for r in rows:
        if r["state"] == "starting":
            t.add_row(r["run"], str(r["pid"]), "(starting)", "-", "-")
            continue
        dur = f"/{r['duration_s']:g}s" if r.get("duration_s") else ""
        vms = "; ".join(f"{v}: {' '.join(d)}" for v, d in r["vms"].items())
        t.add_row(r["run"], str(r["pid"]), str(r["config"]), f"{r['uptime_s']:.0f}s{dur}", vms)
    Console(highlight=False, width=None if sys.stdout.isatty() else 160).print(t)
    return 0


def choose(run: str | None, tmp: str | None = None) -> tuple[str, str, dict[str, Any]]:
    """The run RUN names (its name, a prefix of it, or its launcher's pid), or the only one."""
    runs = running(tmp)
    if run is not None:
        runs = [r for r in runs if r[0] == run or r[0].startswith(run)
                or str(runname.launcher_pid(r[0])) == run]
        if not runs:
            raise TopError(f"no vmsim run in progress matches {run} (see vmsim ps)")
    if not runs:
        raise TopError("no vmsim run in progress")
    if len(runs) > 1:
        raise TopError("several runs in progress (" + ", ".join(r[0] for r in runs)
                       + "); name one: vmsim top RUN")
    name, rundir, m = runs[0]
    if m is None:
        raise TopError(f"{name} is starting; try again in a moment")
    return name, rundir, m


def _alive(m: dict[str, Any]) -> bool:
    return runname.pid_alive(int(m["pid"])) and shm.exists(m["stats"])


def _open(m: dict[str, Any]) -> RunReader:
    try:
        return RunReader(m)
    except posix_ipc.ExistentialError:
        raise TopError(f"{m['run']} has ended") from None


def once(m: dict[str, Any], as_json: bool, interval: float = 1.0) -> int:
    """Two samples `interval` apart (rates need two), printed once: the dashboard as text,
    or one stats line as JSON."""
    reader = _open(m)
    try:
        first = reader.sample()
        time.sleep(interval)
        cur = reader.sample()
    finally:
        reader.close()
    if as_json:
        print(json.dumps(stats_line(m, cur, first, _uptime(m))))
        return 0
    hist = History()
    hist.add(first)
    hist.add(cur)
    Console(highlight=False, width=None if sys.stdout.isatty() else 160).print(
        render(m, hist, UiState(), _uptime(m)))
    return 0


def interactive(m: dict[str, Any], hz: float) -> int:
    reader = _open(m)
    dash = LiveDashboard(m, reader, hz)
    ended = False
    try:
        dash.start()
        due = time.monotonic() + dash.interval
        while True:
            if not _alive(m):
                ended = True
                break
            fd = dash.input_fd()
            wait = max(0.0, due - time.monotonic())
            if fd is None:
                time.sleep(wait)
            elif select.select([fd], [], [], wait)[0] and dash.on_input():
                break
            now = time.monotonic()
            if now >= due:
                dash.tick()
                due = max(now, due + dash.interval)
    finally:
        dash.stop()
        reader.close()
    if ended:
        print(f"vmsim top: {m['run']} has ended", file=sys.stderr)
    return 0


def main_top(run: str | None, once_: bool, as_json: bool, hz: float = DEFAULT_HZ) -> int:
    try:
        _, _, m = choose(run)
        if once_ or as_json or not sys.stdout.isatty():
            return once(m, as_json)
        return interactive(m, hz)
    except TopError as e:
        print(f"vmsim: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
