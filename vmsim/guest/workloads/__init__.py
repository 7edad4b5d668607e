"""Applications that run in the guest and drive its devices.

A workload is completion-driven: `start` fills its window of requests, and each completion
(run on the interrupt thread) checks the result and issues the next request, so the guest's
work happens where the interrupts are taken, with no hand-off between threads.
"""

import threading
import time
from typing import Any

from vmsim.guest.virtio.core import VirtioDevice
from vmsim.machine.stats import W


class WorkloadError(Exception):
    """A workload cannot start (its device is missing or unusable)."""


class Workload:
    """Base of every workload: counters, stop/finish bookkeeping, the report."""

    kind = ""

    def __init__(self, name: str, spec: dict[str, Any], devices: dict[str, VirtioDevice],
                 stats: memoryview | None) -> None:
        self.name = name
        self.spec = spec
        self.devices = devices
        self.stats = stats
        self.ops = 0
        self.bytes = 0
        self.errors = 0
        self.reads = 0
        self.writes = 0
        self.flushes = 0
        self.other = 0
        self.error_messages: list[str] = []
        self.max_ops: int | None = spec.get("ops")
        # requests still to issue (`ops:` bounds what is issued, not just what completes)
        self.budget = self.max_ops if self.max_ops is not None else 1 << 62
        self.started_ns = 0
        self.ended_ns = 0
        self.stopping = False
        self.in_flight = 0
        self.idle_event = threading.Event()
        self.idle_event.set()
        self.finished_event = threading.Event()

    def device(self, name: str) -> VirtioDevice:
        dev = self.devices.get(name)
        if dev is None:
            raise WorkloadError(f"workload {self.name}: no device {name!r} in this VM")
        if dev.priv is None:
            raise WorkloadError(f"workload {self.name}: device {name!r} has no working driver "
                                f"({dev.probe_error or 'probe failed'})")
        return dev

    def start(self) -> None:
        self.started_ns = time.monotonic_ns()
        if self.stats is not None:
            self.stats[W.STARTED_NS] = self.started_ns
            self.stats[W.RUNNING] = 1

    def stop(self) -> None:
        """Issue nothing more; what is in flight completes."""
        self.stopping = True
        if self.in_flight == 0:
            self._finish()

    def _finish(self) -> None:
        if not self.ended_ns:
            self.ended_ns = time.monotonic_ns()
        self.publish_stats()
        if self.stats is not None:
            self.stats[W.ENDED_NS] = self.ended_ns
            self.stats[W.RUNNING] = 0
        self.finished_event.set()

    def tick(self, now_ns: int) -> None:
        """Run a few times a second on the guest's main thread (timeouts, periodic work)."""

    def fail(self, msg: str) -> None:
        """The workload cannot run: one error, and it is finished."""
        self.error(msg)
        self.stopping = True
        if self.in_flight == 0:
            self.idle_event.set()
            self._finish()

    def error(self, msg: str) -> None:
        self.errors += 1
        if len(self.error_messages) < 20:
            self.error_messages.append(msg)

    def publish_stats(self) -> None:
        s = self.stats
        if s is None:
            return
        s[W.OPS] = self.ops
        s[W.BYTES] = self.bytes
        s[W.ERRORS] = self.errors
        s[W.READS] = self.reads
        s[W.WRITES] = self.writes
        s[W.FLUSHES] = self.flushes
        s[W.OTHER] = self.other
        s[W.PUBLISHED_NS] = time.monotonic_ns()

    def report(self) -> dict[str, Any]:
        end = self.ended_ns or time.monotonic_ns()
        secs = max(1e-9, (end - self.started_ns) / 1e9) if self.started_ns else 0.0
        return {"kind": self.kind, "ops": self.ops, "bytes": self.bytes, "errors": self.errors,
                "reads": self.reads, "writes": self.writes, "flushes": self.flushes,
                "other": self.other, "seconds": round(secs, 3),
                "ops_per_s": round(self.ops / secs, 1) if secs else 0.0,
                "mb_per_s": round(self.bytes / secs / 1e6, 3) if secs else 0.0,
                "error_messages": self.error_messages}

    def close(self) -> None:
        """Free what the workload allocated (after the devices are removed)."""


class WindowWorkload(Workload):
    """A workload that keeps a window of request slots busy: each slot issues a request, and
    its completion issues the next. A slot whose request could not be queued (the ring or the
    driver's slots were full) waits in `deferred` for the next completion."""

    def __init__(self, name: str, spec: dict[str, Any], devices: dict[str, VirtioDevice],
                 stats: memoryview | None) -> None:
        super().__init__(name, spec, devices, stats)
        self.deferred: list[int] = []

    def _issue(self, slot: int) -> None:
        """Issue the next request on `slot` (in_flight already counts it)."""
        raise NotImplementedError

    def fill_window(self, blk: Any, window: int) -> None:
        """Start `window` slots, kicking once for all of them."""
        self.idle_event.clear()
        with blk.plug():
            for slot in range(window):
                self.in_flight += 1
                self._issue(slot)

    def _slot_idle(self) -> None:
        """A slot issues nothing more; the last one finishes the workload."""
        self.in_flight -= 1
        if self.in_flight == 0:
            self.idle_event.set()
            self._finish()

    def _next(self, slot: int) -> None:
        """After a completion on `slot`: issue on it, then on the slots that were waiting."""
        self._issue(slot)
        deferred = self.deferred
        while deferred and not self.stopping:
            self._issue(deferred.pop())
        if self.stopping:
            while deferred:
                deferred.pop()
                self._slot_idle()


class FailedWorkload(Workload):
    """Stands in for a workload that could not be created, so the run reports its error."""

    kind = "failed"

    def __init__(self, name: str, spec: dict[str, Any], devices: dict[str, VirtioDevice],
                 stats: memoryview | None, reason: str) -> None:
        super().__init__(name, spec, devices, stats)
        self.kind = spec.get("type", "failed")
        self.reason = reason

    def start(self) -> None:
        super().start()
        self.fail(self.reason)
