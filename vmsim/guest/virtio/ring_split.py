"""The split virtqueue, driver side (drivers/virtio/virtio_ring.c, the *_split functions).

Shared fields are reached through memoryview casts of guest RAM so that every index, flag and
event word is one aligned native load or store (DESIGN.md, memory ordering):

    desc_q   'Q' view of the descriptor table: desc i's addr is word 2i
    desc_i   'I' view of it: desc i's len is word 4i+2, flags | next << 16 word 4i+3
    desc_mv  the bytes, for struct.pack_into of whole descriptors before they are published
    avail_h  'H' view of the avail area: [0] flags, [1] idx, [2+i] ring[i], [2+num] used_event
    used_h   'H' view of the used area: [0] flags, [1] idx, [2+4*num] avail_event
    used_i   'I' view of the used area: ring[i] is [1+2i] id, [2+2i] len

Stores happen in the order the spec's barriers protect: descriptors, then the avail ring entry,
then avail->idx. Where a store must be ordered before a later load (kick_prepare, poll) a full
barrier runs (vmsim.machine.barrier). The driver never trusts the ring for its own state: the
free list and chain links live in private lists (desc_next), as Linux keeps desc_extra.
"""

from collections import deque
from collections.abc import Callable, Sequence
from time import monotonic_ns
from typing import Any

from vmsim.abi import features as F
from vmsim.abi import split_ring as R
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

NEXT = R.VRING_DESC_F_NEXT
WRITE = R.VRING_DESC_F_WRITE
INDIRECT = R.VRING_DESC_F_INDIRECT
PACK_DESC = R.DESC.pack_into
NO_INTERRUPT = R.VRING_AVAIL_F_NO_INTERRUPT
NO_NOTIFY = R.VRING_USED_F_NO_NOTIFY


def _last_entry(out_sgs: Sequence[Sg], in_sgs: Sequence[Sg]) -> tuple[int, int, int]:
    """(addr, len, flags) of a chain's last segment, which ends it (no NEXT)."""
    if in_sgs:
        addr, ln = in_sgs[-1]
        return addr, ln, WRITE
    addr, ln = out_sgs[-1]
    return addr, ln, 0


class SplitVirtqueue(Virtqueue):
    """struct vring_virtqueue with split.* state."""

    def __init__(self, index: int, num: int, dma: DmaMemory, desc_addr: int, avail_addr: int,
                 used_addr: int, features: int, notify: Callable[[Virtqueue], bool],
                 callback: Callable[[Virtqueue], None] | None, name: str,
                 stats: memoryview | None = None) -> None:
        super().__init__(index, name, num, callback, notify, stats, dma)
        self.event = F.has(features, F.VIRTIO_RING_F_EVENT_IDX)
        self.indirect = F.has(features, F.VIRTIO_RING_F_INDIRECT_DESC)
        self.in_order = F.has(features, F.VIRTIO_F_IN_ORDER)
        self.attach(num, desc_addr, avail_addr, used_addr)

    def attach(self, num: int, desc_addr: int, avail_addr: int, used_addr: int) -> None:
        """Use the ring at these addresses (a new queue, or one resized after a reset)."""
        if not R.is_power_of_two(num) or num > R.MAX_QUEUE_SIZE:
            raise ValueError(f"split queue size {num} is not a power of two <= 32768")
        ram = self.dma.ram
        self.num = num
        self.desc_addr, self.avail_addr, self.used_addr = desc_addr, avail_addr, used_addr
        self.desc_mv = ram.view(desc_addr, R.desc_table_size(num))
        self.desc_q = self.desc_mv.cast("Q")
        self.desc_i = ram.view(desc_addr, R.desc_table_size(num)).cast("I")
        self.avail_h = ram.view(avail_addr, R.avail_size(num)).cast("H")
        self.used_h = ram.view(used_addr, R.used_size(num)).cast("H")
        self.used_i = ram.view(used_addr, 4 + R.USED_ELEM_SIZE * num).cast("I")
        self.mask = num - 1
        self.used_event_at = R.avail_h_used_event(num)
        self.avail_event_at = R.used_h_avail_event(num)
        self._reset_state()

    def reinit(self) -> None:
        """virtqueue_reinit_split: the same ring, zeroed and back to its initial state."""
        self.desc_mv[:] = bytes(len(self.desc_mv))
        self.used_h[R.USED_H_FLAGS] = 0
        self.used_h[R.USED_H_IDX] = 0
        self.used_h[self.avail_event_at] = 0
        self._reset_state()

    def _reset_state(self) -> None:
        num = self.num
        self.free_head = 0
        self.desc_next = list(range(1, num + 1))     # desc_extra[i].next: the free list
        if self.in_order:
            # VIRTIO_F_IN_ORDER: descriptors are used in ring order, wrapping at the end.
            self.desc_next[num - 1] = 0
        self.desc_data: list[Any] = [None] * num     # desc_state[head].data: the token
        self.desc_count = [0] * num                  # ring descriptors the chain holds
        self.desc_last = [0] * num                   # the chain's last ring descriptor
        self._inflight_heads: deque[int] = deque()   # submission order (in-order batches)
        self._batch: deque[tuple[Any, int]] = deque()
        self.desc_in_len = [0] * num                 # writable bytes of each chain
        self.lat_t = [0] * num                       # add time of a sampled chain, by head
        self.num_free = num
        self.avail_idx_shadow = 0
        self.avail_flags_shadow = 0
        self.last_used_idx = 0
        self.used_seen = 0                           # used->idx as last read
        self.num_added = 0
        self.event_triggered = False
        self._chain_last = 0
        self.avail_h[R.AVAIL_H_FLAGS] = 0
        self.avail_h[R.AVAIL_H_IDX] = 0
        self.avail_h[self.used_event_at] = 0
        if self.callback is None:
            # "No callback? Tell other side not to bother us."
            self.avail_flags_shadow |= NO_INTERRUPT
            if not self.event:
                self.avail_h[R.AVAIL_H_FLAGS] = self.avail_flags_shadow

    # ---- add -------------------------------------------------------------------------------------
    # add_sgs and get_buf run once per request: their bodies are written out by hand (no helper
    # calls for the common cases, attributes held in locals), which roughly halves their cost.
    def add_sgs(self, out_sgs: Sequence[Sg], in_sgs: Sequence[Sg], data: Any) -> int:
        """virtqueue_add_split.

        Descriptors are not visible to the device until avail->idx publishes them, so
        struct.pack_into is safe here (DESIGN.md) and the cheapest store. A three-segment chain
        (a block request) is written with one call: into its indirect table, or into three
        consecutive ring descriptors, which it usually finds since chains go back on the free
        list whole."""
        if data is None:
            raise ValueError("the data token must not be None")
        if self.broken:
            return EIO
        n_out = len(out_sgs)
        total = n_out + len(in_sgs)
        if total == 0:
            raise ValueError("a buffer needs at least one segment")
        head = self.free_head
        nxt = self.desc_next
        table = None
        if self.indirect and 1 < total <= INDIRECT_MAX and self.num_free:
            table = self._indirect_table(head)
        if table is not None:
            gpa, tmv = table
            if total == 3:
                (a0, l0), (a1, l1), (a2, l2) = (*out_sgs, *in_sgs)
                f0, f1, f2 = FLAGS3[n_out]
                PACK_DESC3(tmv, 0, a0, l0, f0, 1, a1, l1, f1, 2, a2, l2, f2, 0)
            else:
                self._write_table(tmv, out_sgs, in_sgs)
            PACK_DESC(self.desc_mv, 16 * head, gpa, total * R.DESC_SIZE, INDIRECT, 0)
            self.free_head = nxt[head]
            self.desc_count[head] = 1
            self.desc_last[head] = head
            self.num_free -= 1
            self.n_indirect += 1
            self.n_descs += total + 1
        else:
            if self.num_free < total:
                return ENOSPC
            if total == 3 and nxt[head] == head + 1 and nxt[head + 1] == head + 2:
                i = nxt[head + 2]
                (a0, l0), (a1, l1), (a2, l2) = (*out_sgs, *in_sgs)
                f0, f1, f2 = FLAGS3[n_out]
                PACK_DESC3(self.desc_mv, 16 * head, a0, l0, f0, head + 1, a1, l1, f1, head + 2,
                           a2, l2, f2, i)
                prev = head + 2
            else:
                i = self._write_chain(self.desc_mv, nxt, head, out_sgs, in_sgs)
                prev = self._chain_last
            self.free_head = i
            self.desc_count[head] = total
            self.desc_last[head] = prev
            self.num_free -= total
            self.n_descs += total
        if self.in_order:
            self._inflight_heads.append(head)
            self.desc_in_len[head] = sum(ln for _, ln in in_sgs)
        # Expose the chain: the descriptors are written; now the ring entry, then the index.
        self.desc_data[head] = data
        shadow = self.avail_idx_shadow
        avail = self.avail_h
        avail[R.AVAIL_H_RING + (shadow & self.mask)] = head
        shadow = (shadow + 1) & R.IDX_MASK
        self.avail_idx_shadow = shadow
        avail[R.AVAIL_H_IDX] = shadow
        n = self.n_added = self.n_added + 1
        if not n & self.lat_mask:
            self.lat_t[head] = monotonic_ns()
        self.num_added += 1
        if self.num_added == R.IDX_MASK:
            # Linux: "This is very unlikely, but theoretically possible. Kick just in case."
            self.kick()
        return 0

    @staticmethod
    def _write_table(tmv: memoryview, out_sgs: Sequence[Sg], in_sgs: Sequence[Sg]) -> None:
        """Fill an indirect table with a chain of any length (entries 0..n-1, in order)."""
        j = 0
        for addr, ln in out_sgs:
            j += 1
            PACK_DESC(tmv, 16 * j - 16, addr, ln, NEXT, j)
        for addr, ln in in_sgs:
            j += 1
            PACK_DESC(tmv, 16 * j - 16, addr, ln, NEXT | WRITE, j)
        PACK_DESC(tmv, 16 * j - 16, *_last_entry(out_sgs, in_sgs), 0)

    def _write_chain(self, mv: memoryview, nxt: list[int], head: int, out_sgs: Sequence[Sg],
                     in_sgs: Sequence[Sg]) -> int:
        """Write a chain along the free list from `head`; returns the next free descriptor
        (and leaves the chain's last descriptor in _chain_last)."""
        pack = PACK_DESC
        i = head
        prev = 0
        n = 0
        for addr, ln in out_sgs:
            n = nxt[i]
            pack(mv, 16 * i, addr, ln, NEXT, n)
            prev = i
            i = n
        for addr, ln in in_sgs:
            n = nxt[i]
            pack(mv, 16 * i, addr, ln, NEXT | WRITE, n)
            prev = i
            i = n
        self.desc_i[4 * prev + 3] &= ~NEXT                  # the last descriptor ends the chain
        self._chain_last = prev
        return i

    # ---- notify ----------------------------------------------------------------------------------
    def kick_prepare(self) -> bool:
        """virtqueue_kick_prepare_split."""
        # Expose the new avail idx before reading the device's event index / flags.
        full_barrier()
        new = self.avail_idx_shadow
        old = (new - self.num_added) & R.IDX_MASK
        self.num_added = 0
        if self.event:
            needs = R.vring_need_event(self.used_h[self.avail_event_at], new, old)
        else:
            needs = not (self.used_h[R.USED_H_FLAGS] & NO_NOTIFY)
        if needs:
            self.n_kicks += 1
        else:
            self.n_kicks_suppressed += 1
        return needs

    # ---- used ------------------------------------------------------------------------------------
    def more_used(self) -> bool:
        return bool(self._batch) or self.last_used_idx != self.used_h[R.USED_H_IDX]

    def callbacks_enabled(self) -> bool:
        return not self.avail_flags_shadow & NO_INTERRUPT

    def get_buf(self) -> tuple[Any, int] | None:
        """virtqueue_get_buf_ctx_split."""
        if self._batch:
            self.n_completed += 1
            return self._batch.popleft()
        last = self.last_used_idx
        if last == self.used_seen:
            # Re-read used->idx only when what was seen is consumed: the device rewrites that
            # cache line as it completes.
            seen = self.used_h[R.USED_H_IDX]
            if last == seen:
                return None
            self.used_seen = seen
        if self.broken:
            return None
        # The used idx was read first: the entry it published is now valid (TSO keeps loads
        # in order, which is Linux's virtio_rmb here).
        k = 1 + 2 * (last & self.mask)
        ui = self.used_i
        head = ui[k]
        ln = ui[k + 1]
        if head >= self.num:
            self.mark_broken(f"used id {head} out of range")
            return None
        data = self.desc_data[head]
        if data is None:
            self.mark_broken(f"used id {head} is not a head")
            return None
        if self.in_order:
            return self._get_buf_in_order(head, ln, data, last)
        t = self.lat_t[head]
        if t:
            self.lat_t[head] = 0
            self.lat_hist[(monotonic_ns() - t).bit_length()] += 1
        # detach_buf_split, inlined: the chain goes back on the free list whole.
        self.desc_data[head] = None
        self.desc_next[self.desc_last[head]] = self.free_head
        self.free_head = head
        self.num_free += self.desc_count[head]
        last = (last + 1) & R.IDX_MASK
        self.last_used_idx = last
        self.n_completed += 1
        if not self.avail_flags_shadow & NO_INTERRUPT:
            self.avail_h[self.used_event_at] = last
        return data, ln

    def _get_buf_in_order(self, head: int, ln: int, data: Any, last: int) -> tuple[Any, int]:
        """With VIRTIO_F_IN_ORDER one used entry may stand for a batch: every buffer made
        available before `head` is used too ("used completely": its writable length), and
        used->idx moved by the size of the batch."""
        heads = self._inflight_heads
        k = 1
        while heads and heads[0] != head:
            early = heads.popleft()
            self._batch.append((self.desc_data[early], self.desc_in_len[early]))
            self._sample_latency(early)
            self._detach_buf(early)
            k += 1
        if heads:
            heads.popleft()
        self._sample_latency(head)
        self._detach_buf(head)
        last = (last + k) & R.IDX_MASK
        self.last_used_idx = last
        if not self.avail_flags_shadow & NO_INTERRUPT:
            self.avail_h[self.used_event_at] = last
        self.n_completed += 1
        if self._batch:
            self._batch.append((data, ln))
            return self._batch.popleft()
        return data, ln

    def _sample_latency(self, head: int) -> None:
        t = self.lat_t[head]
        if t:
            self.lat_t[head] = 0
            self.lat_hist[(monotonic_ns() - t).bit_length()] += 1

    def _detach_buf(self, head: int) -> None:
        """detach_buf_split: return the chain's descriptors to the free list. In order, the
        free descriptors are always the ring-order run after the in-flight ones: no links
        change."""
        self.desc_data[head] = None
        if not self.in_order:
            self.desc_next[self.desc_last[head]] = self.free_head
            self.free_head = head
        self.num_free += self.desc_count[head]

    # ---- callbacks -------------------------------------------------------------------------------
    def disable_cb(self) -> None:
        """virtqueue_disable_cb_split."""
        if not self.avail_flags_shadow & NO_INTERRUPT:
            self.avail_flags_shadow |= NO_INTERRUPT
            if self.event_triggered:
                # The device has sent its event already and will not send another.
                return
            if self.event:
                # Linux writes 0 here ("a hack"): no event until the used idx wraps to it.
                self.avail_h[self.used_event_at] = 0
            else:
                self.avail_h[R.AVAIL_H_FLAGS] = self.avail_flags_shadow

    def enable_cb_prepare(self) -> int:
        """virtqueue_enable_cb_prepare_split."""
        self.event_triggered = False
        if self.avail_flags_shadow & NO_INTERRUPT:
            self.avail_flags_shadow &= ~NO_INTERRUPT
            if not self.event:
                self.avail_h[R.AVAIL_H_FLAGS] = self.avail_flags_shadow
        last = self.last_used_idx
        self.avail_h[self.used_event_at] = last
        return last

    def poll(self, last_used_idx: int) -> bool:
        """virtqueue_poll_split."""
        # The used_event / flags store above must be visible before the used idx is read.
        full_barrier()
        return bool(self._batch) or last_used_idx != self.used_h[R.USED_H_IDX]

    def ring_positions(self) -> tuple[int, int]:
        return self.avail_idx_shadow, self.last_used_idx

    def notification_data(self) -> int:
        """VIRTIO_F_NOTIFICATION_DATA for a split ring: vqn, then the next avail index."""
        return self.index | self.avail_idx_shadow << 16

    def enable_cb_delayed(self) -> bool:
        """virtqueue_enable_cb_delayed_split."""
        self.event_triggered = False
        bufs = ((self.avail_idx_shadow - self.last_used_idx) & R.IDX_MASK) * 3 // 4
        if self.avail_flags_shadow & NO_INTERRUPT:
            self.avail_flags_shadow &= ~NO_INTERRUPT
            if not self.event:
                self.avail_h[R.AVAIL_H_FLAGS] = self.avail_flags_shadow
        self.avail_h[self.used_event_at] = (self.last_used_idx + bufs) & R.IDX_MASK
        full_barrier()
        # Buffers of an in-order batch are used and not yet returned: they count as pending.
        pending = ((self.used_h[R.USED_H_IDX] - self.last_used_idx) & R.IDX_MASK) + len(self._batch)
        return pending <= bufs

    def _event_triggered(self) -> None:
        if self.event:
            self.event_triggered = True

    # ---- teardown --------------------------------------------------------------------------------
    def detach_unused_buf(self) -> Any:
        """virtqueue_detach_unused_buf_split."""
        if self._batch:
            # used by the device, never returned: after a reset it comes back as unused
            self.n_detached += 1
            return self._batch.popleft()[0]
        for head in range(self.num):
            data = self.desc_data[head]
            if data is None:
                continue
            self._detach_buf(head)
            self.lat_t[head] = 0                # never used: not a latency
            if self.in_order and head in self._inflight_heads:
                self._inflight_heads.remove(head)
            # "That's not really used": take the entry back off the avail ring.
            self.avail_idx_shadow = (self.avail_idx_shadow - 1) & R.IDX_MASK
            self.avail_h[R.AVAIL_H_IDX] = self.avail_idx_shadow
            self.n_detached += 1
            return data
        return None

    def release(self) -> None:
        self._free_indirect_tables()
        for v in (self.desc_q, self.desc_i, self.desc_mv, self.avail_h, self.used_h,
                  self.used_i):
            v.release()
