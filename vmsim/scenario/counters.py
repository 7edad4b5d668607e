"""Live counters a condition names, read from the run's stats region (no request to the
guest or the host: a condition can be polled as often as wanted).

    VM.DEV.qN.FIELD      a queue: added, used, completed, kicks, interrupts, errors, in_flight,
                         and every other per-queue counter (vmsim.machine.stats.Q, lower case)
    VM.DEV.FIELD         a device: status, config_changed, config_interrupts, exits, resets,
                         needs_reset (0/1), driver_ok (0/1), probed, ... (stats.D)
    VM.WORKLOAD.FIELD    a workload: ops, errors, bytes, reads, writes, flushes, running (stats.W)
    host.alive, VM.alive 1 while that process runs, 0 once it has exited
"""

from __future__ import annotations

from typing import Any

from vmsim.abi import status as S
from vmsim.machine.stats import D, Q, W


class CounterError(Exception):
    pass


def resolve(run: Any, path: str) -> int:
    parts = path.split(".")
    lay, stats = run.layout, run.stats
    if len(parts) == 2 and parts[1] == "alive":
        target = parts[0]
        for c in run.children:
            if (c.role == "host" and target == "host") or (c.role == "guest" and c.name == target):
                return int(not c.exited)
        raise CounterError(f"{path}: no process {target!r}")
    if len(parts) == 4 and parts[2].startswith("q") and parts[2][1:].isdigit():
        recs = lay.queue_records.get((parts[0], parts[1]))
        if recs is None:
            raise CounterError(f"{path}: no device {parts[0]}.{parts[1]}")
        qi = int(parts[2][1:])
        if qi >= len(recs):
            raise CounterError(f"{path}: {parts[0]}.{parts[1]} has {len(recs)} queues")
        rec = stats.queue(recs[qi])
        field = parts[3]
        if field == "in_flight":
            return int(rec[Q.ADDED]) - int(rec[Q.COMPLETED]) - int(rec[Q.DETACHED])
        if field == "exits":
            raise CounterError(f"{path}: exits are counted per device")
        return _field(rec, Q, field, path)
    if len(parts) == 3:
        key = (parts[0], parts[1])
        if key in lay.device_records:
            rec = stats.device(lay.device_records[key])
            field = parts[2]
            if field == "needs_reset":
                return int(bool(int(rec[D.STATUS]) & S.DEVICE_NEEDS_RESET))
            if field == "driver_ok":
                return int(bool(int(rec[D.STATUS]) & S.DRIVER_OK))
            if field == "exits":
                return int(rec[D.EXITS_READ]) + int(rec[D.EXITS_WRITE])
            return _field(rec, D, field, path)
        if key in lay.workload_records:
            return _field(stats.workload(lay.workload_records[key]), W, parts[2], path)
        raise CounterError(f"{path}: no device or workload {parts[0]}.{parts[1]}")
    raise CounterError(f"{path}: expected VM.DEV.qN.FIELD, VM.DEV.FIELD, VM.WORKLOAD.FIELD "
                       f"or PROCESS.alive")


def _field(rec: Any, fields: Any, name: str, path: str) -> int:
    try:
        return int(rec[fields[name.upper()]])
    except KeyError:
        raise CounterError(f"{path}: no counter {name!r} (counters: "
                           f"{', '.join(f.name.lower() for f in fields)})") from None
