"""The stats region: one shared-memory object per run, fixed records of u64 counters.

Each counter has exactly one writer (the guest's driver for driver-side counts, the host's
device for device-side ones), which adds with a plain native store through a 'Q' memoryview
(no system call, no lock); readers (the launcher, the dashboard) only read. Writers keep their
running counts in ordinary attributes and publish them here at batch boundaries (a kick, the
end of a service pass), so the data path pays a few stores per batch, not per request.
"""

import mmap
from enum import IntEnum

MAGIC = 0x3154534D49534D56  # b"VMSIMST1" little-endian
VERSION = 1
HEADER_WORDS = 16
RECORD_WORDS = 32


class Q(IntEnum):
    """Per-queue counters. 0..15 written by the driver (guest), 16..31 by the device (host)."""
    ADDED = 0                   # buffers (chains) made available
    KICKS = 1                   # notifications sent to the device
    KICKS_SUPPRESSED = 2        # kick_prepare said no
    COMPLETED = 3               # buffers returned by get_buf
    DETACHED = 4                # buffers reclaimed by detach_unused_buf
    IRQS = 5                    # vring_interrupt calls that found work
    SPURIOUS = 6                # vring_interrupt calls with nothing used
    DESCS_ADDED = 7             # descriptors written (ring + indirect tables)
    INDIRECT_ADDED = 8          # chains added through an indirect table
    NUM_FREE = 9                # free descriptors after the last publish
    # device side
    POPPED = 16                 # chains taken from the avail ring
    USED = 17                   # used elements pushed
    NOTIFIES = 18               # kicks received (eventfd reads)
    INTERRUPTS = 19             # used-buffer notifications sent
    INTERRUPTS_SUPPRESSED = 20  # notification decisions that said no
    BYTES_READ = 21             # bytes the device read from driver buffers
    BYTES_WRITTEN = 22          # bytes the device wrote (used lengths)
    ERRORS = 23                 # ring errors (queue broken)
    WAKEUPS = 24                # service passes that found work
    MISSED = 25                 # work found by the safety-net timeout, not by a kick
    SIZE = 28                   # queue size while ready
    RING = 29                   # 0 split, 1 packed
    READY = 30                  # 1 while the queue is enabled


class D(IntEnum):
    """Per-device counters (host), and what the guest's driver reports (16..)."""
    EXITS_READ = 0
    EXITS_WRITE = 1
    CONFIG_INTERRUPTS = 2
    STATUS = 3
    DEVICE_FEATURES = 4
    DRIVER_FEATURES = 5
    DEVICE_ERRORS = 6
    RESETS = 7
    CONFIG_GENERATION = 8
    # guest side
    PROBED = 16                 # 1 once the driver's probe succeeded
    GUEST_FEATURES = 17         # features the guest negotiated
    CONFIG_CHANGED = 18         # config_changed callbacks run


class W(IntEnum):
    """Per-workload counters (guest)."""
    OPS = 0
    BYTES = 1
    ERRORS = 2
    READS = 3
    WRITES = 4
    FLUSHES = 5
    OTHER = 6
    STARTED_NS = 7
    ENDED_NS = 8
    RUNNING = 9


def region_size(n_queues: int, n_devices: int, n_workloads: int) -> int:
    words = HEADER_WORDS + RECORD_WORDS * (n_queues + n_devices + n_workloads)
    return (words * 8 + mmap.PAGESIZE - 1) // mmap.PAGESIZE * mmap.PAGESIZE


class StatsRegion:
    """Views of the records of a mapped stats region."""

    def __init__(self, mm: mmap.mmap) -> None:
        self.mm = mm
        self.words = memoryview(mm).cast("Q")
        w = self.words
        if w[0] != MAGIC:
            raise ValueError("not a vmsim stats region")
        self.n_queues, self.n_devices, self.n_workloads = int(w[2]), int(w[3]), int(w[4])

    @staticmethod
    def format(mm: mmap.mmap, n_queues: int, n_devices: int, n_workloads: int) -> None:
        """Write the header of a new region (launcher)."""
        w = memoryview(mm).cast("Q")
        w[1] = VERSION
        w[2], w[3], w[4], w[5] = n_queues, n_devices, n_workloads, RECORD_WORDS
        w[0] = MAGIC  # last: a reader that sees the magic sees the counts
        w.release()

    def _record(self, i: int) -> memoryview:
        off = HEADER_WORDS + RECORD_WORDS * i
        return self.words[off:off + RECORD_WORDS]

    def queue(self, i: int) -> memoryview:
        if not 0 <= i < self.n_queues:
            raise IndexError(f"queue record {i}")
        return self._record(i)

    def device(self, i: int) -> memoryview:
        if not 0 <= i < self.n_devices:
            raise IndexError(f"device record {i}")
        return self._record(self.n_queues + i)

    def workload(self, i: int) -> memoryview:
        if not 0 <= i < self.n_workloads:
            raise IndexError(f"workload record {i}")
        return self._record(self.n_queues + self.n_devices + i)

    def release(self) -> None:
        self.words.release()


def snapshot(rec: memoryview, fields: type[IntEnum]) -> dict[str, int]:
    """A record's counters by name (lower-case field names)."""
    return {f.name.lower(): int(rec[f]) for f in fields}
