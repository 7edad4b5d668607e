"""The packed virtqueue, driver side (drivers/virtio/virtio_ring.c, the *_packed functions).

It reads line by line against ring_split.py: the same methods, the same names. Shared fields
go through memoryview casts of guest RAM, each one native load or store (DESIGN.md):

    ring_mv   the descriptor ring's bytes: addr, len and id of a descriptor are written with
              struct.pack_into before its flags make it visible
    ring_h    'H' view of the ring: desc i's id is [8i+6], its flags [8i+7] (the word the
              device polls: written last, alone)
    ring_i    'I' view of the ring: desc i's len is [4i+2]
    drv_ev    'H' view of the driver event suppression area: [0] off_wrap, [1] flags
    dev_ev    'I' view of the device event suppression area: off_wrap | flags << 16, read as
              one 32-bit snapshot (Linux reads it as a u32 too)

Buffer IDs come from a free list independent of ring slots (Linux's desc_extra / free_head);
the ring is used strictly in order; a chain's head flags are written after the rest of it.
With VIRTIO_F_IN_ORDER the device may mark a batch used with one descriptor (the ID of the
batch's last buffer): the driver keeps its buffers in submission order to resolve it.
"""

import struct
from collections import deque
from collections.abc import Callable, Sequence
from time import monotonic_ns
from typing import Any

import numpy as np

from vmsim.abi import features as F
from vmsim.abi import packed_ring as P
from vmsim.guest.memory import DmaMemory
from vmsim.guest.virtio.virtqueue import (
    EIO,
    ENOSPC,
    FLAGS3,
    INDIRECT_MAX,
    PACK_DESC3,
    Sg,
    Virtqueue,
)
from vmsim.machine.barrier import full_barrier

NEXT = P.VRING_DESC_F_NEXT
WRITE = P.VRING_DESC_F_WRITE
INDIRECT = P.VRING_DESC_F_INDIRECT
F_AVAIL = P.F_AVAIL
F_USED = P.F_USED
FLIP = F_AVAIL | F_USED
WRAP_SHIFT = P.VRING_PACKED_EVENT_F_WRAP_CTR
WRAP_BIT = 1 << WRAP_SHIFT
ENABLE = P.VRING_PACKED_EVENT_FLAG_ENABLE
DISABLE = P.VRING_PACKED_EVENT_FLAG_DISABLE
DESC_EVENT = P.VRING_PACKED_EVENT_FLAG_DESC
PACK_DESC = P.DESC.pack_into
PACK_HEAD = struct.Struct("<QIH").pack_into    # addr, len, id: the head's flags come last
# add_chains3: an indirect table entry's flags << 48 (WRITE only: entries are consecutive,
# their ids unused), by how many of the three the device reads (FLAGS3)
_LINKS3 = np.array([[(f & WRITE) << 48 for f in fl] for fl in FLAGS3], np.int64)
PACK_DESC2 = struct.Struct("<QIHHQIHH").pack_into


class PackedVirtqueue(Virtqueue):
    """struct vring_virtqueue with packed.* state."""

    ring = "packed"

    def __init__(self, index: int, num: int, dma: DmaMemory, desc_addr: int,
                 driver_addr: int, device_addr: int, features: int,
                 notify: Callable[[Virtqueue], bool],
                 callback: Callable[[Virtqueue], None] | None, name: str,
                 stats: memoryview | None = None) -> None:
        super().__init__(index, name, num, callback, notify, stats, dma)
        self.event = F.has(features, F.VIRTIO_RING_F_EVENT_IDX)
        self.indirect = F.has(features, F.VIRTIO_RING_F_INDIRECT_DESC)
        self.in_order = F.has(features, F.VIRTIO_F_IN_ORDER)
        self.attach(num, desc_addr, driver_addr, device_addr)

    def attach(self, num: int, desc_addr: int, driver_addr: int, device_addr: int) -> None:
        """Use the ring at these addresses (a new queue, or one resized after a reset)."""
        if not 0 < num <= P.MAX_QUEUE_SIZE:
            raise ValueError(f"packed queue size {num} is not within 1..32768")
        ram = self.dma.ram
        self.num = num
        # Named as the transports program them: desc, driver area, device area.
        self.desc_addr, self.avail_addr, self.used_addr = desc_addr, driver_addr, device_addr
        self.ring_mv = ram.view(desc_addr, P.ring_size(num))
        self.ring_h = self.ring_mv.cast("H")
        self.ring_i = ram.view(desc_addr, P.ring_size(num)).cast("I")
        self.drv_ev = ram.view(driver_addr, P.EVENT_SIZE).cast("H")
        self.dev_ev = ram.view(device_addr, P.EVENT_SIZE).cast("I")
        # the ring as (num, 2) u64 words: addr; len | id << 32 | flags << 48
        # on the ring's own view: behind an IOMMU desc_addr is an IOVA and the DMA object has
        # no RAM offset to give
        ring_np = np.ndarray((num, 2), np.uint64, self.ring_mv)
        self._w0 = ring_np[:, 0]
        self._w1 = ring_np[:, 1]
        self._reset_state()

    def reinit(self) -> None:
        """virtqueue_reinit_packed: the same ring, zeroed and back to its initial state."""
        self.dev_ev[0] = 0
        self._reset_state()

    def _reset_state(self) -> None:
        num = self.num
        self.next_avail_idx = 0
        self.avail_wrap_counter = 1
        self.avail_used_flags = F_AVAIL           # AVAIL = wrap counter 1, USED = its inverse
        self.last_used_idx = 0 | 1 << WRAP_SHIFT  # position | used wrap counter << 15
        self.free_head = 0
        # Per-id state in numpy arrays (the batch paths update a batch with one operation;
        # the one-buffer paths reach them through memoryviews), as in ring_split.py.
        self._next_np = np.arange(1, num + 1, dtype=np.int32)
        self.id_next = memoryview(self._next_np)  # desc_extra[id].next: the free ID list
        self.desc_data = np.full(num, None, dtype=object)  # desc_state[id].data
        self._num_np = np.zeros(num, np.int32)
        self.desc_num = memoryview(self._num_np)  # ring descriptors buffer id holds
        self._multi_out = 0                       # buffers of > 1 ring descriptor in flight
        # free IDs: the stack _stack[:_top] (top first), then the linked list from free_head
        self._stack = np.empty(num, np.intp)
        self._top = 0
        self._seen = np.zeros(num, np.uint8)
        # Constants as arrays cut to a batch's length (a numpy scalar operand costs about
        # twice an array one): 32 (the id's shift), the AVAIL | USED bits, zero. And the
        # low words' constant part (len | flags << 48) by (len, flags), built on first use.
        self._consts = tuple(np.full(num, v, np.uint64) for v in (32, (F_AVAIL | F_USED) << 48,
                                                                  0))
        self._lo_consts: dict[tuple[int, int], Any] = {}
        self._setup_batch_tables(num)
        self.desc_in_len = [0] * num              # its writable bytes (for in-order batches)
        self._lat_np = np.zeros(num, np.int64)
        self.lat_t = memoryview(self._lat_np)     # add time of a sampled buffer, by id
        self._lat_n = 0
        self._inflight_ids: deque[int] = deque()  # submission order (in-order batches)
        self._batch: deque[tuple[Any, int]] = deque()
        self.num_free = num
        self.num_added = 0
        self.event_triggered = False
        self.event_flags_shadow = ENABLE
        self.ring_mv[:] = bytes(len(self.ring_mv))  # "The descriptor ring is zero-initialized."
        self.drv_ev[0] = 0
        self.drv_ev[1] = ENABLE
        if self.callback is None:
            # "No callback? Tell other side not to bother us."
            self.event_flags_shadow = DISABLE
            self.drv_ev[1] = DISABLE

    # ---- add -------------------------------------------------------------------------------------
    def add_sgs(self, out_sgs: Sequence[Sg], in_sgs: Sequence[Sg], data: Any) -> int:
        """virtqueue_add_packed."""
        if data is None:
            raise ValueError("the data token must not be None")
        if self.broken:
            return EIO
        n_out = len(out_sgs)
        total = n_out + len(in_sgs)
        if total == 0:
            raise ValueError("a buffer needs at least one segment")
        if self.num_free < 1:
            return ENOSPC
        if self._top:
            self._link_ids()
        bid = self.free_head
        head = self.next_avail_idx
        flags = self.avail_used_flags
        mv = self.ring_mv
        table = None
        if self.indirect and 1 < total <= INDIRECT_MAX:
            table = self._indirect_table(bid)
        if table is not None:
            # virtqueue_add_indirect_packed: entries carry only WRITE; the ring descriptor
            # names the table.
            gpa, tmv = table
            if total == 3:
                (a0, l0), (a1, l1), (a2, l2) = (*out_sgs, *in_sgs)
                f0, f1, f2 = FLAGS3[n_out]
                # (addr, len, id, flags) each: the id is unused in a table
                PACK_DESC3(tmv, 0, a0, l0, 0, f0 & WRITE, a1, l1, 0, f1 & WRITE,
                           a2, l2, 0, f2 & WRITE)
            else:
                j = 0
                for addr, ln in out_sgs:
                    PACK_DESC(tmv, 16 * j, addr, ln, 0, 0)
                    j += 1
                for addr, ln in in_sgs:
                    PACK_DESC(tmv, 16 * j, addr, ln, 0, WRITE)
                    j += 1
            PACK_HEAD(mv, 16 * head, gpa, total * P.DESC_SIZE, bid)
            head_flags = flags | INDIRECT
            used = 1
            i = head + 1
            if i >= self.num:
                i = 0
                flags ^= FLIP
            self.n_indirect += 1
            self.n_descs += total + 1
        elif total == 3 and head + 3 <= self.num:
            # three descriptors in a row without a wrap: the two after the head in one call
            if self.num_free < 3:
                return ENOSPC
            (a0, l0), (a1, l1), (a2, l2) = (*out_sgs, *in_sgs)
            f0, f1, f2 = FLAGS3[n_out]
            PACK_DESC2(mv, 16 * head + 16, a1, l1, bid, flags | f1, a2, l2, bid, flags | f2)
            PACK_HEAD(mv, 16 * head, a0, l0, bid)
            head_flags = flags | f0
            i = head + 3
            if i == self.num:
                i = 0
                flags ^= FLIP
            used = 3
            self.n_descs += 3
        else:
            if self.num_free < total:
                return ENOSPC
            num = self.num
            i = head
            head_flags = 0
            for c, (addr, ln) in enumerate((*out_sgs, *in_sgs)):
                f = flags | (NEXT if c < total - 1 else 0) | (WRITE if c >= n_out else 0)
                if i == head:
                    head_flags = f
                    PACK_HEAD(mv, 16 * i, addr, ln, bid)
                else:
                    PACK_DESC(mv, 16 * i, addr, ln, bid, f)
                i += 1
                if i >= num:
                    i = 0
                    flags ^= FLIP
            used = total
            self.n_descs += total
        self.num_free -= used
        if i <= head:
            self.avail_wrap_counter ^= 1
        self.next_avail_idx = i
        self.avail_used_flags = flags
        self.free_head = self.id_next[bid]
        self.desc_data[bid] = data
        self.desc_num[bid] = used
        if used > 1:
            self._multi_out += 1
        if self.in_order:
            self.desc_in_len[bid] = sum(ln for _, ln in in_sgs)
            self._inflight_ids.append(bid)
        # The rest of the chain is written; now the head's flags expose it.
        self.ring_h[8 * head + 7] = head_flags
        self.num_added += used
        n = self.n_added = self.n_added + 1
        if not n & self.lat_mask:
            self.lat_t[bid] = monotonic_ns()
            self._lat_n += 1
        if self.num_added >= 0xFFFF:
            self.kick()
        return 0

    # ---- batches ---------------------------------------------------------------------------------
    def add_bufs(self, addrs: Any, lens: Any, tokens: Sequence[Any],
                 writable: bool = True) -> int:
        """Many one-descriptor buffers (see Virtqueue.add_bufs) with a few numpy operations:
        the addresses first, then each descriptor's len | id | flags as one u64 store, which
        makes it available (each store one native word: the flags are published with the len
        and id they go with); ids come off the free stack."""
        n = len(tokens)
        if (self.in_order or "add_sgs" in self.__dict__ or n == 0 or self.broken
                or self.num_free < n):
            return Virtqueue.add_bufs(self, addrs, lens, tokens, writable)
        addrs = np.asarray(addrs, np.uint64)
        top = self._top
        if top < n:
            self._take_free_ids()
            top = self._top
        top -= n
        ids = self._stack[top:top + n]
        self._top = top
        flags = self.avail_used_flags | (WRITE if writable else 0)
        lo = ids.astype(np.uint64)
        lo <<= self._consts[0][:n]
        if isinstance(lens, int):
            lo |= self._lo_const(lens, flags)[:n]
        else:
            lo |= np.asarray(lens, np.uint64)
            lo |= self._lo_const(0, flags)[:n]
        self._publish(ids, addrs, lo, tokens)
        self.n_descs += n
        return 0

    def add_chains3(self, addrs: Any, lens: Any, n_out: Any,
                    tokens: Sequence[Any]) -> tuple[int, int]:
        """Many three-segment chains (see Virtqueue.add_chains3), each into the indirect
        table of its buffer id with a few numpy operations for the batch, then one ring
        descriptor each naming its table, made available as add_bufs makes its buffers.
        Without INDIRECT_DESC, in order, or with the DMA API: one by one."""
        n = len(tokens)
        if (not self.indirect or self.in_order or "add_sgs" in self.__dict__ or n == 0
                or self.broken or self.num_free < n or self._ram_q is None):
            return Virtqueue.add_chains3(self, addrs, lens, n_out, tokens)
        top = self._top
        if top < n:
            self._take_free_ids()
            top = self._top
        ids = self._stack[top - n:top]
        tables = self._write_tables3(ids, addrs, lens, _LINKS3[n_out])
        if tables is None:                  # guest memory short: one by one
            return Virtqueue.add_chains3(self, addrs, lens, n_out, tokens)
        self._top = top - n
        lo = ids.astype(np.uint64)
        lo <<= self._consts[0][:n]
        lo |= self._lo_const(3 * P.DESC_SIZE, self.avail_used_flags | INDIRECT)[:n]
        self._publish(ids, tables.astype(np.uint64), lo, tokens)
        self.n_indirect += n
        self.n_descs += 4 * n
        return n, 0

    def _publish(self, ids: Any, addrs: Any, lo: Any, tokens: Sequence[Any]) -> None:
        """Make a batch available: each descriptor's address, then its len | id | flags
        word (this lap's AVAIL / USED bits in `lo`), one native store each."""
        n = len(ids)
        self.desc_data[ids] = tokens if isinstance(tokens, np.ndarray) else np.fromiter(
            tokens, object, n)
        self._num_np[ids] = 1
        num = self.num
        head = self.next_avail_idx
        k = min(n, num - head)
        self._w0[head:head + k] = addrs[:k]
        self._w1[head:head + k] = lo[:k]
        pos = head + k
        if pos == num:
            pos = 0
            self.avail_wrap_counter ^= 1
            self.avail_used_flags ^= FLIP
            if n > k:
                # the next lap's AVAIL / USED bits are the other way round
                self._w0[:n - k] = addrs[k:]
                self._w1[:n - k] = lo[k:] ^ self._lo_const(0, FLIP)[:n - k]
                pos = n - k
        self.next_avail_idx = pos
        self.num_free -= n
        self.num_added += n
        old = self.n_added
        self.n_added = old + n
        lat_mask = self.lat_mask
        if lat_mask >= 0 and (old ^ (old + n)) & ~lat_mask:
            self.lat_t[int(ids[0])] = monotonic_ns()
            self._lat_n += 1
        if self.num_added >= 0xFFFF:
            self.kick()

    def _link_ids(self) -> None:
        """Put the free stack back into the linked free-ID list, in front (one-buffer
        paths)."""
        top = self._top
        self._top = 0
        run = self._stack[top - 1::-1]
        nxt = self._next_np
        nxt[run[:-1]] = run[1:]
        nxt[run[-1]] = self.free_head
        self.free_head = int(run[0])

    def _take_free_ids(self) -> None:
        """The whole free-ID list onto the stack (walked once, in Python)."""
        if self._top:
            self._link_ids()
        nxt = self.id_next
        out = []
        i = self.free_head
        for _ in range(self.num_free):
            out.append(i)
            i = nxt[i]
        self.free_head = i
        self._stack[:len(out)] = out[::-1]
        self._top = len(out)

    def _lo_const(self, ln: int, flags: int) -> Any:
        """An array of len | flags << 48 (cached: a driver uses few of them)."""
        key = (ln, flags)
        c = self._lo_consts.get(key)
        if c is None:
            if len(self._lo_consts) > 64:
                self._lo_consts.clear()
            c = self._lo_consts[key] = np.full(self.num, ln | flags << 48, np.uint64)
        return c

    def get_bufs(self, limit: int = 1 << 16) -> tuple[Sequence[Any], Sequence[int]]:
        """Every used buffer (see Virtqueue.get_bufs), up to the ring's end per segment: the
        used descriptors' len | id | flags words are copied once and checked with a few numpy
        operations when every buffer in flight is one descriptor."""
        if (self._batch or self.in_order or self._multi_out or "get_buf" in self.__dict__
                or self.broken):
            return Virtqueue.get_bufs(self, limit)
        toks: Any = []
        lens: Any = None
        _, c_au, c_zero = self._consts
        while len(toks) < limit:
            lui = self.last_used_idx
            pos = lui & ~WRAP_BIT
            wrap = lui >> WRAP_SHIFT
            m = min(self.num - pos, limit - len(toks), self.num - self.num_free)
            if m <= 0:
                break
            # one native load of the next flags first: a polling driver mostly finds nothing
            if self.ring_h[8 * pos + 7] & (F_AVAIL | F_USED) != ((F_AVAIL | F_USED) if wrap
                                                                 else 0):
                break
            snap = self._w1[pos:pos + m].copy()
            used = (snap & c_au[:m]) == (c_au[:m] if wrap else c_zero[:m])
            k = int(used.argmin())
            if used[k]:
                k = m
            if not k:
                break
            if k < m:
                snap = snap[:k]
            ids = snap.view(np.uint16)[2::4].astype(np.intp)   # bits 32-47: the buffer id
            data = self.desc_data
            try:
                got = data[ids]
            except IndexError:
                self.mark_broken(f"a used id is >= {self.num}")
                return toks, lens if lens is not None else []
            seen = self._seen
            seen[ids] = 1
            distinct = np.count_nonzero(seen)
            seen[ids] = 0
            if distinct != k or None in got.tolist():
                self.mark_broken("a used id is not a buffer in flight, or is used twice")
                return toks, lens if lens is not None else []
            data[ids] = None
            if self._lat_n:
                self._sample_batch(ids)
            top = self._top
            self._stack[top:top + k] = ids
            self._top = top + k
            self.num_free += k
            pos += k
            if pos >= self.num:
                pos -= self.num
                wrap ^= 1
            self.last_used_idx = pos | wrap << WRAP_SHIFT
            self.n_completed += k
            ln = snap.view(np.uint32)[::2]           # bits 0-31: the length written
            if len(toks):
                toks = np.concatenate((toks, got))
                lens = np.concatenate((lens, ln))
            else:
                toks, lens = got, ln
        if self.event_flags_shadow == DESC_EVENT and len(toks):
            self.drv_ev[0] = self.last_used_idx
        return toks, lens if lens is not None else []

    def _sample_batch(self, ids: Any) -> None:
        lat = self._lat_np[ids]
        stamped = lat[lat != 0].tolist()
        if stamped:
            now = monotonic_ns()
            hist = self.lat_hist
            for t in stamped:
                hist[(now - t).bit_length()] += 1
            self._lat_np[ids] = 0
            self._lat_n -= len(stamped)

    # ---- notify ----------------------------------------------------------------------------------
    def kick_prepare(self) -> bool:
        """virtqueue_kick_prepare_packed."""
        # Expose the new flags before reading the device's event suppression.
        full_barrier()
        new = self.next_avail_idx
        old = (new - self.num_added) & 0xFFFF
        self.num_added = 0
        snap = self.dev_ev[0]
        flags = snap >> 16 & 0x3
        if flags != DESC_EVENT:
            needs = flags != DISABLE
        else:
            # vring_need_event with the event offset moved back a lap when its wrap counter
            # is not the driver's
            off_wrap = snap & 0xFFFF
            event = P.event_idx(off_wrap, self.avail_wrap_counter, self.num)
            needs = ((new - event - 1) & 0xFFFF) < ((new - old) & 0xFFFF)
        if needs:
            self.n_kicks += 1
        else:
            self.n_kicks_suppressed += 1
        return needs

    def ring_positions(self) -> tuple[int, int]:
        return (self.next_avail_idx | self.avail_wrap_counter << WRAP_SHIFT,
                self.last_used_idx)

    def notification_data(self) -> int:
        """VIRTIO_F_NOTIFICATION_DATA: vqn, then next_off (15 bits) and next_wrap."""
        return self.index | (self.next_avail_idx | self.avail_wrap_counter << WRAP_SHIFT) << 16

    # ---- used ------------------------------------------------------------------------------------
    def _is_used(self, pos: int, wrap: int) -> bool:
        """is_used_desc_packed."""
        flags = self.ring_h[8 * pos + 7]
        return bool(flags & F_AVAIL) == bool(flags & F_USED) == bool(wrap)

    def more_used(self) -> bool:
        lui = self.last_used_idx
        return bool(self._batch) or self._is_used(lui & ~WRAP_BIT, lui >> WRAP_SHIFT)

    def callbacks_enabled(self) -> bool:
        return self.event_flags_shadow != DISABLE

    def get_buf(self) -> tuple[Any, int] | None:
        """virtqueue_get_buf_ctx_packed."""
        if self._batch:
            self.n_completed += 1
            return self._batch.popleft()
        if self.broken:
            return None
        lui = self.last_used_idx
        pos = lui & ~WRAP_BIT
        wrap = lui >> WRAP_SHIFT
        flags = self.ring_h[8 * pos + 7]
        if not (bool(flags & F_AVAIL) == bool(flags & F_USED) == bool(wrap)):
            return None
        # The flags were read first: the id and len they publish are valid now (TSO).
        bid = self.ring_h[8 * pos + 6]
        ln = self.ring_i[4 * pos + 2]
        if bid >= self.num:
            self.mark_broken(f"id {bid} out of range")
            return None
        if self.desc_data[bid] is None:
            self.mark_broken(f"id {bid} is not a head")
            return None
        skip = 0
        if self.in_order:
            # The device may have marked a whole batch used with its last buffer's id.
            ids = self._inflight_ids
            while ids and ids[0] != bid:
                early = ids.popleft()
                skip += self.desc_num[early]
                self._batch.append((self.desc_data[early], self.desc_in_len[early]))
                self._sample_latency(early)
                self._detach_buf(early)
            if ids:
                ids.popleft()
        data = self.desc_data[bid]
        skip += self.desc_num[bid]
        t = self.lat_t[bid]
        if t:
            self.lat_t[bid] = 0
            self._lat_n -= 1
            self.lat_hist[(monotonic_ns() - t).bit_length()] += 1
        self._detach_buf(bid)
        pos += skip
        if pos >= self.num:
            pos -= self.num
            wrap ^= 1
        self.last_used_idx = pos | wrap << WRAP_SHIFT
        if self.event_flags_shadow == DESC_EVENT:
            self.drv_ev[0] = self.last_used_idx
        self.n_completed += 1
        if self._batch:
            self._batch.append((data, ln))
            return self._batch.popleft()
        return data, ln

    def _sample_latency(self, bid: int) -> None:
        t = self.lat_t[bid]
        if t:
            self.lat_t[bid] = 0
            self._lat_n -= 1
            self.lat_hist[(monotonic_ns() - t).bit_length()] += 1

    def _detach_buf(self, bid: int) -> None:
        """detach_buf_packed: the ID back on the free list, its ring slots free again."""
        self.desc_data[bid] = None
        if self._top:
            self._link_ids()
        self.id_next[bid] = self.free_head
        self.free_head = bid
        c = self.desc_num[bid]
        if c > 1:
            self._multi_out -= 1
        self.num_free += c

    # ---- callbacks -------------------------------------------------------------------------------
    def disable_cb(self) -> None:
        """virtqueue_disable_cb_packed."""
        if self.event_flags_shadow != DISABLE:
            self.event_flags_shadow = DISABLE
            if self.event_triggered:
                return
            self.drv_ev[1] = DISABLE

    def enable_cb_prepare(self) -> int:
        """virtqueue_enable_cb_prepare_packed."""
        self.event_triggered = False
        if self.event:
            # The offset and wrap counter first, then the flags.
            self.drv_ev[0] = self.last_used_idx
        if self.event_flags_shadow == DISABLE:
            self.event_flags_shadow = DESC_EVENT if self.event else ENABLE
            self.drv_ev[1] = self.event_flags_shadow
        return self.last_used_idx

    def poll(self, last_used_idx: int) -> bool:
        """virtqueue_poll_packed."""
        full_barrier()
        if self._batch:
            return True
        return self._is_used(last_used_idx & ~WRAP_BIT, last_used_idx >> WRAP_SHIFT)

    def enable_cb_delayed(self) -> bool:
        """virtqueue_enable_cb_delayed_packed."""
        self.event_triggered = False
        if self.event:
            bufs = (self.num - self.num_free) * 3 // 4
            lui = self.last_used_idx
            wrap = lui >> WRAP_SHIFT
            used_idx = (lui & ~WRAP_BIT) + bufs
            if used_idx >= self.num:
                used_idx -= self.num
                wrap ^= 1
            self.drv_ev[0] = used_idx | wrap << WRAP_SHIFT
        if self.event_flags_shadow == DISABLE:
            self.event_flags_shadow = DESC_EVENT if self.event else ENABLE
            self.drv_ev[1] = self.event_flags_shadow
        # The event suppression update must be visible before the re-check.
        full_barrier()
        lui = self.last_used_idx
        return not (self._batch or self._is_used(lui & ~WRAP_BIT, lui >> WRAP_SHIFT))

    def _event_triggered(self) -> None:
        if self.event:
            self.event_triggered = True

    # ---- teardown --------------------------------------------------------------------------------
    def detach_unused_buf(self) -> Any:
        """virtqueue_detach_unused_buf_packed."""
        if self._batch:
            # used by the device, never returned: after a reset it comes back as unused
            self.n_detached += 1
            return self._batch.popleft()[0]
        for bid in range(self.num):
            data = self.desc_data[bid]
            if data is None:
                continue
            self._detach_buf(bid)
            if self.lat_t[bid]:
                self.lat_t[bid] = 0             # never used: not a latency
                self._lat_n -= 1
            self.n_detached += 1
            if bid in self._inflight_ids:
                self._inflight_ids.remove(bid)
            return data
        return None

    def release(self) -> None:
        self._free_indirect_tables()
        self._w0 = self._w1 = self._ram_q = None   # numpy exports go before the views
        for v in (self.ring_h, self.ring_i, self.ring_mv, self.drv_ev, self.dev_ev):
            v.release()
