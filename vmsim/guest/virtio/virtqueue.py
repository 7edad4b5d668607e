"""The driver-side virtqueue interface: Linux's struct virtqueue and its API
(include/linux/virtio.h, drivers/virtio/virtio_ring.c).

A ring format (split here; packed alongside it later) implements the `*_impl` methods with the
same names as Linux's `*_split` / `*_packed` functions; drivers call only the public API.
Like Linux, a virtqueue is not locked: the driver serialises calls (its per-queue lock).

Return conventions follow Linux: add_* return 0 or a negative errno (-ENOSPC when the ring is
full, -EIO once the queue is broken); get_buf returns None when nothing is used.
"""

import errno
import struct
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from vmsim.abi import features as F
from vmsim.guest.memory import DMA_FROM_DEVICE, DMA_TO_DEVICE, DmaMappingError
from vmsim.machine.stats import LATENCY_SAMPLE_EVERY, Q, fold_histogram

ENOSPC = -errno.ENOSPC
EIO = -errno.EIO
ENOMEM = -errno.ENOMEM
DMA_MAPPING_ERROR = (1 << 64) - 1   # what a failed dma_map_* returns (~(dma_addr_t)0)

Sg = tuple[int, int]  # (guest-physical address, length): one scatterlist entry
# A mapped buffer's (device address, length, direction), to unmap it when it comes back.
Mapping = tuple[int, int, int]

# Entries of one indirect table. A chain with more segments goes direct (Linux falls back
# when kmalloc of the table fails).
INDIRECT_MAX = 16
_SIX = np.arange(6, dtype=np.intp)
# Three descriptors in one struct call (a block request: header, data, status).
PACK_DESC3 = struct.Struct("<" + "QIHH" * 3).pack_into
_NEXT, _WRITE = 1, 2
# flags of a three-segment chain's descriptors, by how many of them the device reads
FLAGS3 = ((_NEXT | _WRITE, _NEXT | _WRITE, _WRITE), (_NEXT, _NEXT | _WRITE, _WRITE),
          (_NEXT, _NEXT, _WRITE), (_NEXT, _NEXT, 0))


class Virtqueue:
    """struct virtqueue: one queue of a device, as its driver sees it."""

    ring = "split"

    def __init__(self, index: int, name: str, num: int,
                 callback: Callable[["Virtqueue"], None] | None,
                 notify: Callable[["Virtqueue"], bool], stats: memoryview | None,
                 dma: Any = None) -> None:
        self.index = index
        self.name = name
        self.num = num                  # queue size (vring.num)
        self.num_max = num
        self.num_free = num
        self.callback = callback
        self._notify = notify           # the transport's notify (vp_notify / vm_notify)
        self.broken = False
        self.broken_reason = ""
        self.reset = False              # between disable_vq_and_reset and enable_vq_after_reset
        self.vdev: Any = None
        self.priv: Any = None           # the driver's per-queue data
        self.stats = stats
        self.dma = dma
        self.dma_api = False            # vring_use_dma_api: buffers are mapped to add them
        self.premapped = False          # virtqueue_set_dma_premapped: the driver maps them
        self._indirect_tables: dict[int, tuple[int, memoryview]] = {}
        # running counts, published to the stats record at batch boundaries
        self.n_added = 0
        self.n_kicks = 0
        self.n_kicks_suppressed = 0
        self.n_completed = 0
        self.n_detached = 0
        self.n_irqs = 0
        self.n_spurious = 0
        self.n_descs = 0
        self.n_indirect = 0
        # Latency, sampled: add_sgs stamps one request in LATENCY_SAMPLE_EVERY into
        # lat_t[head or id] (a preallocated list: nothing allocated per request), get_buf
        # adds its age to lat_hist[ns.bit_length()]. lat_mask -1 never samples (n_added >= 1
        # when it is tested), for a run with live stats off.
        self.lat_mask = LATENCY_SAMPLE_EVERY - 1 if stats is not None else -1
        self.lat_t = [0] * num
        self.lat_hist = [0] * 64

    # ---- the API (names as in Linux) -------------------------------------------------------------
    def add_sgs(self, out_sgs: Sequence[Sg], in_sgs: Sequence[Sg], data: Any) -> int:
        """virtqueue_add_sgs: expose a chain of readable then writable buffers; `data` is the
        token get_buf returns for it (not None)."""
        raise NotImplementedError

    def add_bufs(self, addrs: Any, lens: Any, tokens: Sequence[Any],
                 writable: bool = True) -> int:
        """Add many one-segment buffers at once (vmsim's batch form of add_inbuf /
        add_outbuf): buffer i is [addrs[i], addrs[i] + lens[i]) (`lens` an int: the same for
        all), device-writable if `writable`, with token tokens[i]. All or nothing: 0, or
        -ENOSPC when the ring has no room for all of them (nothing added), -EIO once broken.
        The formats publish the batch with one index (or head flags) store; this generic
        form adds them one by one and is what a queue with the DMA API mapped uses."""
        n = len(tokens)
        if self.broken:
            return EIO
        if self.num_free < n:
            return ENOSPC
        al = addrs.tolist() if hasattr(addrs, "tolist") else list(addrs)
        ll = [lens] * n if isinstance(lens, int) else (
            lens.tolist() if hasattr(lens, "tolist") else list(lens))
        add = self.add_sgs
        for a, ln, tok in zip(al, ll, tokens, strict=True):
            err = add((), ((a, ln),), tok) if writable else add(((a, ln),), (), tok)
            if err:
                return err
        return 0

    def add_chains3(self, addrs: Any, lens: Any, n_out: Any,
                    tokens: Sequence[Any]) -> tuple[int, int]:
        """Add many three-segment chains at once (a batch of block requests: header, data,
        status): chain i is the segments (addrs[i, j], lens[i, j]), j = 0..2, of which the
        first n_out[i] (an int: the same for all) are device-readable and the rest
        device-writable, with token tokens[i]. Returns (chains added, 0 or the error of the
        first that was not: -ENOSPC, -EIO); those after it were not tried. The split ring
        writes a batch into indirect tables with a few numpy operations and publishes it
        with one index store; this generic form calls add_sgs for each."""
        al = addrs.tolist() if hasattr(addrs, "tolist") else addrs
        ll = lens.tolist() if hasattr(lens, "tolist") else lens
        n = len(tokens)
        outs = [n_out] * n if isinstance(n_out, int) else (
            n_out.tolist() if hasattr(n_out, "tolist") else n_out)
        add = self.add_sgs
        for i in range(n):
            (a0, a1, a2), (l0, l1, l2) = al[i], ll[i]
            k = outs[i]
            # (tuples built directly: this runs once per chain)
            if k == 1:
                err = add(((a0, l0),), ((a1, l1), (a2, l2)), tokens[i])
            elif k == 2:
                err = add(((a0, l0), (a1, l1)), ((a2, l2),), tokens[i])
            else:
                segs = ((a0, l0), (a1, l1), (a2, l2))
                err = add(segs[:k], segs[k:], tokens[i])
            if err:
                return i, err
        return n, 0

    def get_bufs(self, limit: int = 1 << 16) -> tuple[Sequence[Any], Sequence[int]]:
        """Every used buffer (at most `limit`) at once: (tokens, bytes written), two
        sequences (lists, or numpy arrays: test them with len()) in the order the device
        used them; empty when none is used. The formats detach a batch of
        one-descriptor buffers with a few numpy operations; this generic form calls
        get_buf."""
        toks: list[Any] = []
        lens: list[int] = []
        get = self.get_buf
        while len(toks) < limit and (r := get()) is not None:
            toks.append(r[0])
            lens.append(r[1])
        return toks, lens

    def add_outbuf(self, sgs: Sequence[Sg], data: Any) -> int:
        """virtqueue_add_outbuf: buffers the device reads."""
        return self.add_sgs(sgs, (), data)

    def add_inbuf(self, sgs: Sequence[Sg], data: Any) -> int:
        """virtqueue_add_inbuf: buffers the device writes."""
        return self.add_sgs((), sgs, data)

    def kick_prepare(self) -> bool:
        """virtqueue_kick_prepare: whether the device must be notified of what was added."""
        raise NotImplementedError

    def notify(self) -> bool:
        """virtqueue_notify: notify the device through the transport; False marks it broken."""
        if self.broken:
            return False
        if not self._notify(self):
            self.mark_broken("the transport failed to notify the device")
            return False
        return True

    def kick(self) -> bool:
        """virtqueue_kick: kick_prepare, then notify if needed."""
        if self.kick_prepare():
            return self.notify()
        return True

    def get_buf(self) -> tuple[Any, int] | None:
        """virtqueue_get_buf: the next used buffer as (data token, bytes written), or None."""
        raise NotImplementedError

    def disable_cb(self) -> None:
        """virtqueue_disable_cb: ask the device not to interrupt (a hint, not a guarantee)."""
        raise NotImplementedError

    def enable_cb_prepare(self) -> int:
        """virtqueue_enable_cb_prepare: re-enable callbacks; returns an opaque value for poll."""
        raise NotImplementedError

    def poll(self, last_used_idx: int) -> bool:
        """virtqueue_poll: whether buffers were used since enable_cb_prepare returned the value."""
        raise NotImplementedError

    def enable_cb(self) -> bool:
        """virtqueue_enable_cb: re-enable callbacks; False if buffers are pending (the caller
        must process them: the race the NAPI pattern re-checks)."""
        return not self.poll(self.enable_cb_prepare())

    def enable_cb_delayed(self) -> bool:
        """virtqueue_enable_cb_delayed: re-enable callbacks after about 3/4 of the pending
        buffers are used; False if that many are used already."""
        raise NotImplementedError

    def detach_unused_buf(self) -> Any:
        """virtqueue_detach_unused_buf: take back a buffer the device never used (only after a
        reset of the device or queue); None when none are left."""
        raise NotImplementedError

    def more_used(self) -> bool:
        raise NotImplementedError

    def callbacks_enabled(self) -> bool:
        """Whether the driver currently asks for interrupts on this queue."""
        raise NotImplementedError

    def get_vring_size(self) -> int:
        return self.num

    def is_broken(self) -> bool:
        return self.broken

    # ---- interrupts ------------------------------------------------------------------------------
    def vring_interrupt(self) -> bool:
        """vring_interrupt: the transport's handler calls this; runs the callback if the
        device used buffers. False (IRQ_NONE) when nothing was used: a spurious interrupt."""
        if not self.more_used():
            self.n_spurious += 1
            return False
        if self.broken:
            return True
        self.n_irqs += 1
        self._event_triggered()
        if self.callback is not None:
            self.callback(self)
        return True

    def _event_triggered(self) -> None:
        pass

    # ---- state -----------------------------------------------------------------------------------
    def mark_broken(self, reason: str) -> None:
        """BAD_RING / virtio_break_device: stop using the queue."""
        if not self.broken:
            self.broken = True
            self.broken_reason = reason

    def publish_stats(self) -> None:
        """Copy the running counts into the shared stats record. The data path never calls
        this: the guest's main thread does, a few times a second and at the end, so counting
        costs a request only the integer increments."""
        s = self.stats
        if s is None:
            return
        s[Q.ADDED] = self.n_added
        s[Q.KICKS] = self.n_kicks
        s[Q.KICKS_SUPPRESSED] = self.n_kicks_suppressed
        s[Q.COMPLETED] = self.n_completed
        s[Q.DETACHED] = self.n_detached
        s[Q.IRQS] = self.n_irqs
        s[Q.SPURIOUS] = self.n_spurious
        s[Q.DESCS_ADDED] = self.n_descs
        s[Q.INDIRECT_ADDED] = self.n_indirect
        s[Q.NUM_FREE] = self.num_free
        s[Q.DRV_AVAIL], s[Q.DRV_LAST_USED] = self.ring_positions()
        s[Q.LAT_EVERY] = self.lat_mask + 1
        for i, n in enumerate(fold_histogram(self.lat_hist)):
            s[Q.LAT_HIST + i] = n
        s[Q.DRV_PUBLISHED_NS] = time.monotonic_ns()

    def ring_positions(self) -> tuple[int, int]:
        """(next avail position, last used position) as the format counts them, for the
        stats record: the driver's private indices a reader cannot find in the ring."""
        return 0, 0

    def stop_sampling(self) -> None:
        """No more latency samples (live stats are off)."""
        self.lat_mask = -1

    # ---- the DMA API (vring_use_dma_api, vring_map_one_sg, virtqueue_dma_*) ---------------------
    def use_dma_api(self) -> None:
        """VIRTIO_F_ACCESS_PLATFORM was negotiated: the device reaches memory through the
        platform (an IOMMU), so each buffer a driver adds is mapped through the device's DMA
        API (vring_map_one_sg) and unmapped when the device is done with it (vring_unmap_one).
        The ring formats are untouched: the mapped variants shadow add_sgs / get_buf /
        detach_unused_buf on this queue only, so a queue without the DMA API pays nothing."""
        self.dma_api = True
        if not self.premapped:
            self.add_sgs = self._add_sgs_mapped            # type: ignore[method-assign]
            self.get_buf = self._get_buf_mapped            # type: ignore[method-assign]
            self.detach_unused_buf = self._detach_unused_mapped  # type: ignore[method-assign]

    def set_dma_premapped(self) -> int:
        """virtqueue_set_dma_premapped: the driver maps its buffers itself (with
        dma_map_single_attrs) and adds device addresses; only on an empty queue."""
        if self.in_flight():
            return -errno.EINVAL
        self.premapped = True
        for name in ("add_sgs", "get_buf", "detach_unused_buf"):
            self.__dict__.pop(name, None)
        return 0

    def dma_map_single_attrs(self, addr: int, size: int, direction: int, attrs: int = 0) -> int:
        """virtqueue_dma_map_single_attrs: the device address of a buffer a premapping
        driver adds (its guest-physical address without the DMA API); DMA_MAPPING_ERROR
        when it cannot be mapped."""
        if not self.dma_api:
            return addr
        try:
            return self.dma.map_single(addr, size, direction)
        except DmaMappingError:
            return DMA_MAPPING_ERROR

    def dma_unmap_single_attrs(self, dma_addr: int, size: int, direction: int,
                               attrs: int = 0) -> None:
        """virtqueue_dma_unmap_single_attrs."""
        if self.dma_api:
            self.dma.unmap_single(dma_addr, size, direction)

    @staticmethod
    def dma_mapping_error(dma_addr: int) -> bool:
        """virtqueue_dma_mapping_error."""
        return dma_addr == DMA_MAPPING_ERROR

    def dma_dev(self) -> Any:
        """virtqueue_dma_dev: the device's DMA object, None without the DMA API."""
        return self.dma if self.dma_api else None

    def _add_sgs_mapped(self, out_sgs: Sequence[Sg], in_sgs: Sequence[Sg], data: Any) -> int:
        maps: list[Mapping] = []
        dma = self.dma
        try:
            for addr, n in out_sgs:
                maps.append((dma.map_single(addr, n, DMA_TO_DEVICE), n, DMA_TO_DEVICE))
            for addr, n in in_sgs:
                maps.append((dma.map_single(addr, n, DMA_FROM_DEVICE), n, DMA_FROM_DEVICE))
        except DmaMappingError:
            self._unmap(maps)
            return ENOMEM
        k = len(out_sgs)
        err = type(self).add_sgs(self, [(a, n) for a, n, _ in maps[:k]],
                                 [(a, n) for a, n, _ in maps[k:]], (data, maps))
        if err:
            self._unmap(maps)
        return err

    def _get_buf_mapped(self) -> tuple[Any, int] | None:
        got = type(self).get_buf(self)
        if got is None:
            return None
        (data, maps), written = got
        self._unmap(maps)
        return data, written

    def _detach_unused_mapped(self) -> Any:
        got = type(self).detach_unused_buf(self)
        if got is None:
            return None
        data, maps = got
        self._unmap(maps)
        return data

    def _unmap(self, maps: list[Mapping]) -> None:
        unmap = self.dma.unmap_single
        for dma_addr, n, direction in maps:
            unmap(dma_addr, n, direction)

    # ---- indirect tables -------------------------------------------------------------------------
    def _indirect_table(self, key: int) -> tuple[int, memoryview] | None:
        """The indirect table of a head (split) or buffer ID (packed): allocated on first use
        and kept, so adding a request allocates nothing. None when guest memory is short (the
        chain then goes direct)."""
        table = self._indirect_tables.get(key)
        if table is None:
            try:
                # cache-line aligned: a short table is one line for the device to fetch
                table = self.dma.alloc(INDIRECT_MAX * 16, 64)
            except MemoryError:
                return None
            self._indirect_tables[key] = table
            self._table_placed(key, table[0])
        return table

    def _table_placed(self, key: int, gpa: int) -> None:
        """A new indirect table for `key`: its address in the batch path's array."""
        if key < len(self._table_gpa):
            self._table_gpa[key] = gpa

    def _setup_batch_tables(self, num: int) -> None:
        """add_chains3's state: the indirect table of each head or buffer id (0: none yet),
        and u64 words of the whole of RAM to write tables anywhere in it, at
        (gpa - base) / 8 (None behind an IOMMU, where addresses are not RAM's: the batch
        path is not taken there)."""
        ram = self.dma.ram
        mm = getattr(ram, "mm", None)
        self._ram_q = None if mm is None else np.ndarray(len(mm) >> 3, np.int64, mm)
        self._ram_base = getattr(ram, "base", 0)
        self._table_gpa = np.zeros(num, np.int64)
        for key, (gpa, _mv) in self._indirect_tables.items():
            if key < num:
                self._table_gpa[key] = gpa

    def _write_tables3(self, keys: Any, addrs: Any, lens: Any, links: Any) -> Any:
        """Write three-entry indirect tables for `keys` (heads or buffer ids): entry j of
        table i is addrs[i, j], lens[i, j] | links[i, j] (the format's flags and next).
        Returns the tables' addresses, or None when guest memory is short for a new one."""
        tables = self._table_gpa[keys]
        if not tables.all():
            for k in keys[tables == 0].tolist():
                if self._indirect_table(k) is None:
                    return None
            tables = self._table_gpa[keys]
        words = np.empty((len(keys), 6), np.int64)
        words[:, 0::2] = addrs
        words[:, 1::2] = lens
        words[:, 1::2] |= links
        self._ram_q[((tables - self._ram_base) >> 3)[:, None] + _SIX] = words
        return tables

    def _free_indirect_tables(self) -> None:
        for gpa, mv in self._indirect_tables.values():
            mv.release()
            self.dma.free(gpa)
        self._indirect_tables = {}
        self._table_gpa[:] = 0

    def notification_data(self) -> int:
        """The value of a notification with VIRTIO_F_NOTIFICATION_DATA (vqn | next << 16)."""
        raise NotImplementedError

    def in_flight(self) -> int:
        return self.n_added - self.n_completed - self.n_detached

    def release(self) -> None:
        """Drop the views into guest RAM (the queue is being deleted)."""


# The ring and transport features this guest's virtio ring code implements; the rest of the
# transport range (bits 28..41) is cleared before negotiation completes.

RING_FEATURES_SUPPORTED = frozenset({
    F.VIRTIO_RING_F_INDIRECT_DESC,
    F.VIRTIO_RING_F_EVENT_IDX,
    F.VIRTIO_F_VERSION_1,
    F.VIRTIO_F_RING_PACKED,
    F.VIRTIO_F_IN_ORDER,
    F.VIRTIO_F_NOTIFICATION_DATA,
    F.VIRTIO_F_RING_RESET,      # Linux keeps this one for PCI only; vmsim's MMIO has QueueReset
    F.VIRTIO_F_ACCESS_PLATFORM,  # buffers go through the DMA API (use_dma_api)
})


def vring_transport_features(vdev: Any) -> None:
    """vring_transport_features: clear the transport bits the ring code does not know."""
    for i in range(F.VIRTIO_TRANSPORT_F_START, F.VIRTIO_TRANSPORT_F_END):
        if i not in RING_FEATURES_SUPPORTED:
            vdev.clear_bit(i)
