"""The stats region: one shared-memory object per run, fixed records of u64 counters.

Each counter has exactly one writer (the guest's driver for driver-side counts, the host's
device for device-side ones), which stores it with a plain native store through a 'Q'
memoryview (no system call, no lock); readers (the launcher, the dashboard, `vmsim top`) only
read, each word one aligned native load (DESIGN.md). Writers keep their running counts in
ordinary attributes and publish them here at batch boundaries (the guest's main thread a few
times a second, the host's loop between service passes), each publish stamped with its
CLOCK_MONOTONIC time so that a reader computes rates over the writer's own intervals.

Layout (u64 words):

    header      HEADER_WORDS: MAGIC, VERSION, n_queues, n_devices, n_workloads,
                RECORD_WORDS, LATENCY_BUCKETS, EXIT_KINDS count
    queues      n_queues records of RECORD_WORDS: Q (0..15 driver, 16..47 device,
                48..79 the driver's latency histogram)
    devices     n_devices records: D (0..15 device, 16..23 driver, 24..55 exits by kind)
    workloads   n_workloads records: W
"""

import mmap
from enum import IntEnum

MAGIC = 0x3154534D49534D56  # b"VMSIMST1" little-endian
VERSION = 2
HEADER_WORDS = 16
RECORD_WORDS = 80

# Latency histogram: bucket i counts samples of i == ns.bit_length(), i.e. latencies in
# [2**(i-1), 2**i) ns (bucket 0: 0 ns); the last bucket takes everything from 2**30 ns (1.07 s).
LATENCY_BUCKETS = 32
# The driver timestamps one request in LATENCY_SAMPLE_EVERY (a power of two). Measured on
# the driver's ring path (add_sgs + get_buf, ~1.4 us a request): timing every request adds
# ~220 ns; one in 16 adds ~50 ns, most of it the test for a stamp, and still gives
# thousands of samples a second.
LATENCY_SAMPLE_EVERY = 16


class Q(IntEnum):
    """Per-queue words. 0..15 written by the driver (guest), 16..47 by the device (host),
    48..79 the latency histogram (driver)."""
    ADDED = 0                   # buffers (chains) made available
    KICKS = 1                   # notifications sent to the device
    KICKS_SUPPRESSED = 2        # kick_prepare said no
    COMPLETED = 3               # buffers returned by get_buf
    DETACHED = 4                # buffers reclaimed by detach_unused_buf
    IRQS = 5                    # vring_interrupt calls that found work
    SPURIOUS = 6                # vring_interrupt calls with nothing used (spurious wake-ups)
    DESCS_ADDED = 7             # descriptors written (ring + indirect tables)
    INDIRECT_ADDED = 8          # chains added through an indirect table
    NUM_FREE = 9                # free descriptors after the last publish
    DRV_AVAIL = 10              # split: avail idx shadow; packed: next_avail | wrap << 15
    DRV_LAST_USED = 11          # split: last_used_idx; packed: last_used | wrap << 15
    LAT_EVERY = 12              # one request in this many is timed (0: not timed)
    DRV_PUBLISHED_NS = 13       # CLOCK_MONOTONIC of the driver's last publish
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
    DEV_LAST_AVAIL = 26         # split: last_avail_idx; packed: last_avail | wrap << 15
    DEV_USED = 27               # split: used idx shadow; packed: used position | wrap << 15
    SIZE = 28                   # queue size while ready
    RING = 29                   # 0 split, 1 packed
    READY = 30                  # 1 while the queue is enabled
    DEV_IN_FLIGHT = 31          # chains popped and not yet used
    # Where the ring lives (guest-physical), set when the queue becomes ready: enough for a
    # reader with the RAM object to decode the ring as a debugger would.
    DESC_ADDR = 32
    DRIVER_ADDR = 33            # split: the avail ring; packed: driver event suppression
    DEVICE_ADDR = 34            # split: the used ring; packed: device event suppression
    RAM_BASE = 35               # guest-physical address of RAM offset 0
    LAYOUT_GEN = 36             # bumped each time the queue is (re)enabled
    DEV_FEATURES = 37           # the ring features in force (EVENT_IDX, IN_ORDER, ...)
    DEV_PUBLISHED_NS = 38       # CLOCK_MONOTONIC of the device's last publish
    LAT_HIST = 48               # LATENCY_BUCKETS words: add_sgs to get_buf, sampled


class D(IntEnum):
    """Per-device words (host 0..15), what the guest's driver reports (16..23), and the
    device's exits by kind (24.., one word per EXIT_KINDS entry)."""
    EXITS_READ = 0
    EXITS_WRITE = 1
    CONFIG_INTERRUPTS = 2
    STATUS = 3
    DEVICE_FEATURES = 4
    DRIVER_FEATURES = 5
    DEVICE_ERRORS = 6
    RESETS = 7
    CONFIG_GENERATION = 8
    INTERRUPTS = 9              # interrupts the transport raised (used + config)
    # guest side
    PROBED = 16                 # 1 once the driver's probe succeeded
    GUEST_FEATURES = 17         # features the guest negotiated
    CONFIG_CHANGED = 18         # config_changed callbacks run
    EXIT_KIND = 24              # EXIT_KINDS words


# Every kind of exit a transport counts (the trapped accesses KVM would report), in a fixed
# order so that each has a word of its own; anything else counts as "other".
EXIT_KINDS = (
    "mmio_read", "mmio_write", "config_read", "config_write", "interrupt_status",
    "interrupt_ack", "queue_notify",                                    # virtio-mmio
    "pci_cfg_read", "pci_cfg_write", "bar_read", "bar_write", "isr_read", "notify_write",
    "pio_read", "pio_write", "msix_read", "msix_write",                 # virtio-pci
    "notify", "stsch", "msch", "ssch", "tsch", "csch",                  # virtio-ccw
    "other",
)
EXIT_KIND_INDEX = {k: i for i, k in enumerate(EXIT_KINDS)}
EXIT_OTHER = EXIT_KIND_INDEX["other"]


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
    PUBLISHED_NS = 10           # CLOCK_MONOTONIC of the last publish


def region_size(n_queues: int, n_devices: int, n_workloads: int) -> int:
    words = HEADER_WORDS + RECORD_WORDS * (n_queues + n_devices + n_workloads)
    return (words * 8 + mmap.PAGESIZE - 1) // mmap.PAGESIZE * mmap.PAGESIZE


def exit_word(kind: str) -> int:
    """The device-record word that counts exits of `kind`."""
    return D.EXIT_KIND + EXIT_KIND_INDEX.get(kind, EXIT_OTHER)


def latency_bucket(ns: int) -> int:
    """The histogram bucket of a latency of `ns` nanoseconds."""
    return min(ns.bit_length(), LATENCY_BUCKETS - 1)


def fold_histogram(counts: list[int]) -> list[int]:
    """A driver's running histogram (indexed by ns.bit_length(), any length) folded into
    LATENCY_BUCKETS buckets."""
    out = counts[:LATENCY_BUCKETS - 1]
    out += [0] * (LATENCY_BUCKETS - 1 - len(out))
    out.append(sum(counts[LATENCY_BUCKETS - 1:]))
    return out


class StatsRegion:
    """Views of the records of a mapped stats region (read-write, or read-only for a
    reader that maps it with PROT_READ)."""

    def __init__(self, mm: mmap.mmap) -> None:
        self.mm = mm
        self.words = memoryview(mm).cast("Q")
        w = self.words
        if len(w) < HEADER_WORDS or w[0] != MAGIC:
            w.release()
            raise ValueError("not a vmsim stats region")
        if w[1] != VERSION or w[5] != RECORD_WORDS:
            version, words = int(w[1]), int(w[5])
            w.release()
            raise ValueError(f"stats region version {version} with {words}-word records; "
                             f"this vmsim reads version {VERSION} ({RECORD_WORDS} words)")
        self.n_queues, self.n_devices, self.n_workloads = int(w[2]), int(w[3]), int(w[4])

    @staticmethod
    def format(mm: mmap.mmap, n_queues: int, n_devices: int, n_workloads: int) -> None:
        """Write the header of a new region (launcher)."""
        w = memoryview(mm).cast("Q")
        w[1] = VERSION
        w[2], w[3], w[4], w[5] = n_queues, n_devices, n_workloads, RECORD_WORDS
        w[6], w[7] = LATENCY_BUCKETS, len(EXIT_KINDS)
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


def histogram(rec: memoryview) -> list[int]:
    """A queue record's latency histogram."""
    return [int(x) for x in rec[Q.LAT_HIST:Q.LAT_HIST + LATENCY_BUCKETS]]


def exits_by_kind(rec: memoryview) -> dict[str, int]:
    """A device record's exits by kind (kinds with none left out)."""
    out = {}
    for i, k in enumerate(EXIT_KINDS):
        n = int(rec[D.EXIT_KIND + i])
        if n:
            out[k] = n
    return out
