"""The device side of a virtqueue: one interface, two ring formats side by side
(queue_split.py and queue_packed.py, with matching method names, as QEMU's *_split / *_packed
and Linux's vringh pair them).

    pop / pop_batch       take available chains, validated (RingError on a bad one)
    pop_bufs / push_used  the batch paths: every available one-descriptor buffer as numpy
                          arrays; many used buffers published with one index store
    pop_chains3           every available three-segment chain (a block request) as arrays
    fill / flush / push   write used elements; publish them; both
    fill_batch            fill a batch and flush once
    need_notify           whether the driver wants an interrupt for what was used
    enable_notify         ask for kicks again; True if buffers slipped in meanwhile
    disable_notify        the device is polling: no kicks needed
    has_work              something is available
    check_notification    a kick's VIRTIO_F_NOTIFICATION_DATA against the ring
    mark / rewind         give back chains popped but not used
"""

from time import monotonic_ns
from typing import NamedTuple

import numpy as np

from vmsim.host.virtio.chain import DescChain
from vmsim.machine.stats import Q


class Bufs(NamedTuple):
    """One-descriptor buffers popped as a batch: their heads (split) or buffer ids (packed),
    RAM offsets, lengths, and whether each is device-writable."""

    heads: np.ndarray
    off: np.ndarray
    len: np.ndarray
    writable: np.ndarray


_none = np.zeros(0, np.intp)
EMPTY_BUFS = Bufs(_none, _none, _none, np.zeros(0, bool))


class Chains3(NamedTuple):
    """Three-segment chains popped as a batch (a block request: header, data, status): their
    heads, and each segment's RAM offset, length and device-writability as (n, 3) arrays, in
    chain order (readable segments first)."""

    heads: np.ndarray
    off: np.ndarray
    len: np.ndarray
    writable: np.ndarray


_none3 = np.zeros((0, 3), np.int64)
EMPTY_CHAINS3 = Chains3(_none, _none3, _none3, np.zeros((0, 3), bool))


class DeviceQueue:
    """State and counters every ring format shares."""

    ring = ""            # "split" or "packed"
    batch3 = False       # pop_chains3 takes three-segment chains as arrays

    def __init__(self, num: int, event_idx: bool, indirect: bool, in_order: bool,
                 stats: memoryview | None) -> None:
        self.num = num
        self.event_idx = event_idx
        self.indirect = indirect
        self.in_order = in_order
        self.stats = stats
        self.inflight = 0
        # running counts, published to the stats record by the host's loop
        self.n_popped = 0
        self.n_used = 0
        self.n_notifies = 0
        self.n_interrupts = 0
        self.n_interrupts_suppressed = 0
        self.n_bytes_read = 0
        self.n_bytes_written = 0
        self.n_wakeups = 0
        self.n_missed = 0
        self.n_notify_data_errors = 0

    # ---- the interface ---------------------------------------------------------------------------
    def pop_batch(self, limit: int = 1 << 16) -> list[DescChain]:
        raise NotImplementedError

    def has_at_least(self, k: int) -> bool:
        """Whether the driver has made at least k entries available that the device has not
        taken."""
        raise NotImplementedError

    def pop_chains3(self, limit: int = 1 << 16) -> Chains3 | None:
        """Every available chain (at most `limit`) of exactly three segments, as arrays;
        None when the next entry is anything else (or this format or memory has no batch
        path), for pop_batch to take."""
        return None

    def pop_bufs(self, limit: int = 1 << 16) -> Bufs | None:
        """Every available buffer (at most `limit`) that is one descriptor, as arrays; None
        when the next entry is anything else, for pop_batch to take. This generic form pops
        with pop_batch and gives back what follows the first chain (mark / rewind); a bad
        descriptor raises RingError as pop_batch does. A format may vectorize it."""
        m = self.mark()
        chains = self.pop_batch(limit)
        if not chains:
            return EMPTY_BUFS
        heads: list[int] = []
        offs: list[int] = []
        lens: list[int] = []
        wr: list[bool] = []
        for c in chains:
            if c.ndescs != 1 or len(c.r_off) + len(c.w_off) != 1:
                break
            heads.append(c.head)
            if c.w_off:
                offs.append(c.w_off[0])
                lens.append(c.w_len[0])
                wr.append(True)
            else:
                offs.append(c.r_off[0])
                lens.append(c.r_len[0])
                wr.append(False)
        k = len(heads)
        if k < len(chains):
            # a chain: give everything back, take again only the buffers before it
            self.rewind(m, chains)
            if not k:
                return None
            self.pop_batch(k)
        return Bufs(np.array(heads, np.intp), np.array(offs, np.uint64),
                    np.array(lens, np.uint64), np.array(wr, bool))

    def push_used(self, heads: np.ndarray, written: "np.ndarray | int") -> None:
        """Return many buffers (by head or buffer id), `written` bytes each (an array, or
        one number for all), published together. Generic form: fill each, flush once."""
        n = len(heads)
        if not n:
            return
        wl = [written] * n if isinstance(written, int) else written.tolist()
        for h, w in zip(heads.tolist(), wl, strict=True):
            self.fill(h, w)
        self.flush()

    def pop(self) -> DescChain | None:
        """The next available chain, validated, or None if the ring is empty."""
        chains = self.pop_batch(1)
        return chains[0] if chains else None

    def fill(self, chain: DescChain | int, written: int) -> None:
        raise NotImplementedError

    def flush(self) -> None:
        raise NotImplementedError

    def push(self, chain: DescChain | int, written: int) -> None:
        """Return a chain with `written` bytes written to its writable part."""
        self.fill(chain, written)
        self.flush()

    def fill_batch(self, chains: list[DescChain], written: list[int]) -> None:
        raise NotImplementedError

    def need_notify(self) -> bool:
        raise NotImplementedError

    def enable_notify(self) -> bool:
        raise NotImplementedError

    def disable_notify(self) -> None:
        raise NotImplementedError

    def wait_for_more(self) -> bool:
        """Ask for a kick when the driver makes available more than is available now (what is
        there is not enough: a receive queue whose buffers cannot hold the next frame); True if
        more came meanwhile (QEMU's virtio_net_has_buffers re-check)."""
        raise NotImplementedError

    def has_work(self) -> bool:
        raise NotImplementedError

    def check_notification(self, data: int) -> bool:
        """Whether the position a notification carries (NOTIFICATION_DATA) is consistent with
        the ring: the driver may have made more available since, never less."""
        raise NotImplementedError

    def mark(self) -> tuple:
        """Where the device is in the available ring (for rewind)."""
        raise NotImplementedError

    def rewind(self, mark: tuple, chains: list[DescChain]) -> None:
        """Give back `chains`, popped since `mark` and not used: they become available again,
        as if never taken (QEMU's virtqueue_unpop; a device that took buffers for a frame
        they turn out too small for)."""
        raise NotImplementedError

    # ---- state -----------------------------------------------------------------------------------
    def ring_positions(self) -> tuple[int, int]:
        """(next avail position, next used position) as the format counts them: the
        device's private indices, which a reader of the ring cannot see in guest RAM."""
        raise NotImplementedError

    def publish_stats(self) -> None:
        s = self.stats
        if s is None:
            return
        s[Q.DEV_LAST_AVAIL], s[Q.DEV_USED] = self.ring_positions()
        s[Q.DEV_IN_FLIGHT] = self.inflight
        s[Q.POPPED] = self.n_popped
        s[Q.USED] = self.n_used
        s[Q.NOTIFIES] = self.n_notifies
        s[Q.INTERRUPTS] = self.n_interrupts
        s[Q.INTERRUPTS_SUPPRESSED] = self.n_interrupts_suppressed
        s[Q.BYTES_READ] = self.n_bytes_read
        s[Q.BYTES_WRITTEN] = self.n_bytes_written
        s[Q.WAKEUPS] = self.n_wakeups
        s[Q.MISSED] = self.n_missed
        s[Q.DEV_PUBLISHED_NS] = monotonic_ns()

    def release(self) -> None:
        pass
