"""One ring as a vhost-user backend holds it: what the frontend set (size, base, addresses,
kick / call / err fds, enabled) and, while started, vmsim's own device-side queue over it.

Lifecycle (vhost-user.rst "Ring states"): stopped until SET_VRING_KICK (the ring is started
then, or on its first kick); GET_VRING_BASE stops it and reports where the device is.
Started rings are served while enabled: rings start enabled unless
VHOST_USER_F_PROTOCOL_FEATURES was negotiated, then SET_VRING_ENABLE switches them.
"""

import os

from vmsim.abi import split_ring as R
from vmsim.host.iommu_rings import TranslatedPackedQueue, TranslatedSplitQueue
from vmsim.host.memory import GuestMemory, GuestMemoryError, IotlbMemory
from vmsim.host.virtio.errors import Reason, RingError
from vmsim.host.virtio.queue import DeviceQueue
from vmsim.host.virtio.queue_packed import PackedQueue
from vmsim.host.virtio.queue_split import SplitQueue
from vmsim.vhost import protocol as P

# An eventfd adds the 8-byte value written; a pipe standing in for one just becomes readable.
ONE = (1).to_bytes(8, "little")


def _close(fd: int | None) -> None:
    if fd is not None:
        try:
            os.close(fd)
        except OSError:
            pass


class Vring:
    """The vhost-user state of ring `index`."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.num = 0
        self.base = 0
        self.desc_uva = self.used_uva = self.avail_uva = 0
        self.addr_set = False
        self.kick_fd: int | None = None
        self.call_fd: int | None = None
        self.err_fd: int | None = None
        self.enabled = False
        self.queue: DeviceQueue | None = None
        self.broken = ""            # why the ring stopped being served (a guest error)
        # VIRTIO_F_IOMMU_PLATFORM: the (iova, perm, since) of a translation asked of the
        # frontend (an IOTLB miss); the ring waits for the UPDATE that covers it
        self.iotlb_wait: tuple[int, int, float] | None = None
        # counters over the backend's lifetime (reported by the session)
        self.kicks = 0
        self.spurious_kicks = 0
        self.calls = 0

    @property
    def started(self) -> bool:
        return self.queue is not None

    # ---- fds -------------------------------------------------------------------------------------
    def set_kick(self, fd: int | None) -> None:
        _close(self.kick_fd)
        self.kick_fd = fd

    def set_call(self, fd: int | None) -> None:
        """A call fd replaced while running takes effect at the next interrupt."""
        _close(self.call_fd)
        self.call_fd = fd

    def set_err(self, fd: int | None) -> None:
        _close(self.err_fd)
        self.err_fd = fd

    def call(self) -> None:
        fd = self.call_fd
        if fd is not None:
            try:
                os.write(fd, ONE)
            except BlockingIOError:
                pass            # the counter is saturated: the frontend is already woken
            except OSError:
                pass
            self.calls += 1

    def signal_error(self) -> None:
        if self.err_fd is not None:
            try:
                os.write(self.err_fd, ONE)
            except OSError:
                pass

    # ---- start / stop ----------------------------------------------------------------------------
    def start(self, mem: GuestMemory | IotlbMemory, gpas: tuple[int, int, int], packed: bool,
              event_idx: bool, indirect: bool) -> None:
        """Build the device-side queue at the ring's base (RingError if the ring is bad).
        With an IotlbMemory the addresses are IOVAs and the queue translates every one."""
        desc, avail, used = gpas
        q: DeviceQueue
        translated = isinstance(mem, IotlbMemory)
        split_cls = TranslatedSplitQueue if translated else SplitQueue
        packed_cls = TranslatedPackedQueue if translated else PackedQueue
        if packed:
            a_idx, a_wrap, u_idx, u_wrap = P.split_packed_base(self.base)
            if a_idx >= self.num or u_idx >= self.num:
                raise RingError(Reason.INVALID_RING_SIZE, f"packed base 0x{self.base:x} for size "
                                f"{self.num}")
            q = packed_cls(mem, self.num, desc, avail, used, event_idx, indirect)
            q.last_avail_idx, q.avail_wrap_counter = a_idx, a_wrap
            q.used_idx, q.used_wrap_counter = u_idx, u_wrap
        else:
            # The used index the previous backend (or the driver) left in the ring: the
            # queue's constructor rewrites the used header, so read it first.
            try:
                used_idx = mem.translate(used + 2, 2).cast("H")[0]
            except GuestMemoryError:
                used_idx = 0    # the constructor reports the range
            q = split_cls(mem, self.num, desc, avail, used, event_idx, indirect)
            base = self.base & R.IDX_MASK
            if base != used_idx:
                # Requests taken by a previous backend and never completed: serve them again
                # from the used index (libvhost-user does the same without inflight tracking).
                base = used_idx
            q.last_avail_idx = q.avail_seen = base
            q.last_used_idx = base
            q.used_h[R.USED_H_IDX] = base
        # The constructors zero the device's event suppression (avail_event / the device
        # event area); a ring restarted mid-stream must ask for the next kick where it is,
        # or an EVENT_IDX driver sees an event it has passed and never kicks again.
        q.enable_notify()
        self.queue = q
        self.broken = ""
        self.iotlb_wait = None

    def stop(self) -> int:
        """Stop the ring; its base as GET_VRING_BASE reports it."""
        q = self.queue
        if q is None:
            return self.base
        if isinstance(q, PackedQueue):
            self.base = P.packed_base(q.last_avail_idx, q.avail_wrap_counter, q.used_idx,
                                      q.used_wrap_counter)
        else:
            self.base = q.last_avail_idx
        q.release()
        self.queue = None
        return self.base

    def positions(self) -> int:
        """The base the ring would report if stopped now (to rebuild it on new memory)."""
        q = self.queue
        if isinstance(q, PackedQueue):
            return P.packed_base(q.last_avail_idx, q.avail_wrap_counter, q.used_idx,
                                 q.used_wrap_counter)
        return q.last_avail_idx if q is not None else self.base

    def close(self) -> None:
        if self.queue is not None:
            self.queue.release()
            self.queue = None
        for fd in (self.kick_fd, self.call_fd, self.err_fd):
            _close(fd)
        self.kick_fd = self.call_fd = self.err_fd = None
