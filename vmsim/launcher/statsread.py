"""Reading a live run from the outside: its stats region and its guests' RAM, mapped read-only
(or, in the launcher, its own mapping of the region), turned into plain samples.

A sample is what the records held at one moment: every counter of every queue, device and
workload, each queue's latency histogram, and each ready queue's ring decoded from guest RAM
(vmsim.launcher.ringview). Readers only load: each word is one aligned native load, so a
sample never holds a torn value, though different words may be a publish apart.
"""

import mmap
import time
from dataclasses import dataclass, field
from typing import Any

from vmsim.launcher.ringview import RingState, RingView
from vmsim.machine import shm
from vmsim.machine.stats import D, Q, StatsRegion, W, exits_by_kind, histogram, snapshot

Key = tuple[str, str]        # (vm, device) or (vm, workload)


@dataclass
class QueueSample:
    index: int
    c: dict[str, int]                      # the record's words by Q name (lower case)
    hist: list[int]                        # latency histogram (ns.bit_length() buckets)
    ring: RingState | None = None          # decoded from RAM while the queue is ready
    ring_error: str = ""                   # why it could not be decoded


@dataclass
class DeviceSample:
    c: dict[str, int]                      # D words
    exits_by_kind: dict[str, int]
    queues: list[QueueSample] = field(default_factory=list)


@dataclass
class Sample:
    t: float                               # time.monotonic() when it was taken
    devices: dict[Key, DeviceSample]
    workloads: dict[Key, dict[str, int]]   # W words


class RunReader:
    """Samples of one run. `stats` is the launcher's own region, or None to map the run's
    region read-only by the name in the manifest; RAM is mapped read-only unless `rings` is
    False (the ring columns are then left empty)."""

    def __init__(self, manifest: dict[str, Any], stats: StatsRegion | None = None,
                 rings: bool = True) -> None:
        self.manifest = manifest
        self._own: list[mmap.mmap] = []
        self._ram: dict[str, tuple[mmap.mmap, memoryview, int]] = {}
        self._views: dict[int, tuple[tuple, RingView | None, str]] = {}
        try:
            if stats is None:
                mm = shm.open_map_readonly(manifest["stats"])
                self._own.append(mm)
                stats = StatsRegion(mm)
                self._own_stats = stats
            else:
                self._own_stats = None
            self.stats = stats
            if rings:
                for vname, vm in manifest["vms"].items():
                    ram = vm["ram"]
                    mm = shm.open_map_readonly(ram["name"])
                    self._own.append(mm)
                    self._ram[vname] = (mm, memoryview(mm), int(ram["base"]))
        except BaseException:
            self.close()
            raise

    def sample(self) -> Sample:
        st = self.stats
        devices: dict[Key, DeviceSample] = {}
        workloads: dict[Key, dict[str, int]] = {}
        for vname, vm in self.manifest["vms"].items():
            for dname, dev in vm["devices"].items():
                drec = st.device(dev["record"])
                ds = DeviceSample(snapshot(drec, D), exits_by_kind(drec))
                for i, rec in enumerate(dev["queues"]):
                    qrec = st.queue(rec)
                    qs = QueueSample(i, snapshot(qrec, Q), histogram(qrec))
                    self._decode(vname, rec, qs)
                    ds.queues.append(qs)
                devices[(vname, dname)] = ds
            for wname, w in vm["workloads"].items():
                workloads[(vname, wname)] = snapshot(st.workload(w["record"]), W)
        return Sample(time.monotonic(), devices, workloads)

    def _decode(self, vname: str, rec: int, qs: QueueSample) -> None:
        c = qs.c
        ram = self._ram.get(vname)
        if ram is None or not c["ready"] or not c["size"]:
            return
        ring = "packed" if c["ring"] else "split"
        key = (c["layout_gen"], ring, c["size"], c["desc_addr"], c["driver_addr"],
               c["device_addr"], c["ram_base"])
        cached = self._views.get(rec)
        if cached is None or cached[0] != key:
            if cached is not None and cached[1] is not None:
                cached[1].release()
            try:
                view: RingView | None = RingView(ram[1], c["ram_base"] or ram[2], ring,
                                                 c["size"], c["desc_addr"], c["driver_addr"],
                                                 c["device_addr"])
                err = ""
            except ValueError as e:
                view, err = None, str(e)
            cached = self._views[rec] = (key, view, err)
        view = cached[1]
        if view is None:
            qs.ring_error = cached[2]
            return
        qs.ring = view.read(c["dev_last_avail"], c["dev_used"])

    def close(self) -> None:
        for _, view, _ in self._views.values():
            if view is not None:
                view.release()
        self._views = {}
        for _, mv, _ in self._ram.values():
            mv.release()
        self._ram = {}
        if getattr(self, "_own_stats", None) is not None:
            self._own_stats.release()
            self._own_stats = None
        for mm in self._own:
            mm.close()
        self._own = []
