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

import numpy as np

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
_WRITE_W = np.int64(WRITE << 32)        # WRITE in a descriptor's second u64 word
_EMPTY: tuple[list[Any], list[int]] = ([], [])
# add_chains3: an indirect table's flags << 32 | next << 48 per entry, by how many entries
# the device reads (FLAGS3); the head descriptor's len | flags << 32 for a 3-entry table
_LINKS3 = np.array([[f0 << 32 | 1 << 48, f1 << 32 | 2 << 48, f2 << 32]
                    for f0, f1, f2 in FLAGS3], np.int64)
_TABLE3_W = np.int64(3 * R.DESC_SIZE | INDIRECT << 32)


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
        # numpy views for the batch paths: the descriptor table as (num, 2) i64 words (addr;
        # len | flags << 32 | next << 48), the avail ring entries, the used elements as one
        # u64 each (id | len << 32). Descriptors and avail entries are written in bulk before
        # the avail idx store publishes them (DESIGN.md); shared words stay on the casts.
        # Built on views of the ring (not the RAM mapping at an offset): behind an IOMMU the
        # ring's addresses are IOVAs and only the device's DMA object can place them.
        self._desc_np = np.ndarray((num, 2), np.int64, self.desc_mv)
        self._desc_addr = np.ndarray(num, np.uint64, self.desc_mv, 0, (16,))
        self._desc_w = self._desc_np[:, 1]
        self._avail_np = np.ndarray(num, np.uint16, ram.view(avail_addr + 4, 2 * num))
        self._used_np = np.ndarray(num, np.uint64, ram.view(used_addr + 4, 8 * num))
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
        # Per-descriptor state lives in numpy arrays so that the batch paths (add_bufs,
        # get_bufs) update a whole batch with one operation; the one-buffer paths reach the
        # same memory through memoryviews, whose item access is nearly a list's.
        self._next_np = np.arange(1, num + 1, dtype=np.int32)
        self.desc_next = memoryview(self._next_np)   # desc_extra[i].next: the free list
        if self.in_order:
            # VIRTIO_F_IN_ORDER: descriptors are used in ring order, wrapping at the end.
            self.desc_next[num - 1] = 0
        # desc_state[head].data: the token (None: not a head in flight)
        self.desc_data = np.full(num, None, dtype=object)
        # Ring descriptors the chain holds, and its last one. A free descriptor always has
        # count 1 and is its own last (detach restores that), so a batch of one-descriptor
        # buffers writes neither.
        self._count_np = np.ones(num, np.int32)
        self.desc_count = memoryview(self._count_np)
        self._last_np = np.arange(num, dtype=np.int32)
        self.desc_last = memoryview(self._last_np)
        self._chains_out = 0                         # chains of > 1 ring descriptor in flight
        # The free list is the stack `_stack[:_top]` (top first) followed by the linked list
        # from free_head. get_bufs pushes a batch on the stack and add_bufs pops from it,
        # without linking or walking anything in Python; a one-buffer path first links the
        # stack in front of the list (_link_run). _run is the stack's state: None when empty.
        self._stack = np.empty(num, np.intp)
        self._top = 0
        self._run: Any = None
        self._seen = np.zeros(num, np.uint8)         # scratch: distinct ids in a used batch
        self._lat_n = 0                              # chains stamped by the one-buffer path
        self._inflight_heads: deque[int] = deque()   # submission order (in-order batches)
        self._batch: deque[tuple[Any, int]] = deque()
        self.desc_in_len = [0] * num                 # writable bytes of each chain
        self._setup_batch_tables(num)
        self._lat_np = np.zeros(num, np.int64)
        self.lat_t = memoryview(self._lat_np)        # add time of a sampled chain, by head
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
        if self._run is not None:
            self._link_run()
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
            if total > 1:
                self.desc_count[head] = total
                self.desc_last[head] = prev
                self._chains_out += 1
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
            self._lat_n += 1
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

    # ---- batches ---------------------------------------------------------------------------------
    # add_bufs and get_bufs run once per batch of buffers: each is a handful of numpy
    # operations on private state and on the ring (the descriptors and avail entries before
    # the avail idx store that publishes them; the used elements after the used idx load that
    # published them), whatever the batch size. Scalar fallbacks handle everything else.
    def add_bufs(self, addrs: Any, lens: Any, tokens: Sequence[Any],
                 writable: bool = True) -> int:
        """Many one-descriptor buffers with a few numpy operations and one avail idx store
        (see Virtqueue.add_bufs): descriptors come from the free list's run (what get_bufs
        put back), and the list is walked only when the run is short."""
        n = len(tokens)
        if (self.in_order or "add_sgs" in self.__dict__ or n == 0 or self.broken
                or self.num_free < n):
            # in order, or buffers mapped through the DMA API: one by one
            return Virtqueue.add_bufs(self, addrs, lens, tokens, writable)
        top = self._top
        if top < n:
            self._take_free_list()
            top = self._top
        top -= n
        heads = self._stack[top:top + n]
        self._top = top
        if not top:
            self._run = None
        self._desc_addr[heads] = addrs
        # len | flags << 32 (next 0: the buffer ends there)
        if isinstance(lens, int):
            self._desc_w[heads] = lens | WRITE << 32 if writable else lens
        else:
            self._desc_w[heads] = np.asarray(lens, np.int64) | _WRITE_W if writable else lens
        # (an array of objects built element by element: a list of tuples as tokens must
        # not turn into a 2-D array)
        self.desc_data[heads] = tokens if isinstance(tokens, np.ndarray) else np.fromiter(
            tokens, object, n)
        self._publish(heads, n)
        self.n_descs += n
        return 0

    def _publish(self, heads: Any, n: int) -> None:
        """The batch's descriptors are written: now its avail entries, then the index."""
        shadow = self.avail_idx_shadow
        num = self.num
        s = shadow & self.mask
        av = self._avail_np
        if s + n <= num:
            av[s:s + n] = heads
        else:
            k = num - s
            av[s:] = heads[:k]
            av[:n - k] = heads[k:]
        self.num_free -= n
        old = self.n_added
        self.n_added = old + n
        lat_mask = self.lat_mask
        if lat_mask >= 0 and (old ^ (old + n)) & ~lat_mask:
            # one sample per batch that crosses a sampling point
            self.lat_t[int(heads[0])] = monotonic_ns()
            self._lat_n += 1
        shadow = (shadow + n) & R.IDX_MASK
        self.avail_idx_shadow = shadow
        self.avail_h[R.AVAIL_H_IDX] = shadow
        self.num_added += n
        if self.num_added >= R.IDX_MASK:
            self.kick()

    def add_chains3(self, addrs: Any, lens: Any, n_out: Any,
                    tokens: Sequence[Any]) -> tuple[int, int]:
        """Many three-segment chains (see Virtqueue.add_chains3), each into the indirect
        table of its head with a few numpy operations for the batch, and one avail idx
        store: the tables are written, then the heads, then the avail entries, then the
        index (DESIGN.md). Without INDIRECT_DESC, in order, or with the DMA API: one by
        one."""
        n = len(tokens)
        if (not self.indirect or self.in_order or "add_sgs" in self.__dict__ or n == 0
                or self.broken or self.num_free < n or self._ram_q is None):
            return Virtqueue.add_chains3(self, addrs, lens, n_out, tokens)
        top = self._top
        if top < n:
            self._take_free_list()
            top = self._top
        heads = self._stack[top - n:top]
        tables = self._write_tables3(heads, addrs, lens, _LINKS3[n_out])
        if tables is None:                  # guest memory short: one by one
            return Virtqueue.add_chains3(self, addrs, lens, n_out, tokens)
        top -= n
        self._top = top
        if not top:
            self._run = None
        self._desc_addr[heads] = tables
        self._desc_w[heads] = _TABLE3_W
        self.desc_data[heads] = tokens if isinstance(tokens, np.ndarray) else np.fromiter(
            tokens, object, n)
        self._publish(heads, n)
        self.n_indirect += n
        self.n_descs += 4 * n
        return n, 0

    def _link_run(self) -> None:
        """Put the stack back into the linked free list, in front (for the one-buffer
        paths): top first."""
        top = self._top
        run = self._stack[top - 1::-1] if top else self._stack[:0]
        self._run = None
        self._top = 0
        if not top:
            return
        nxt = self._next_np
        nxt[run[:-1]] = run[1:]
        nxt[run[-1]] = self.free_head
        self.free_head = int(run[0])

    def _take_free_list(self) -> None:
        """The whole free list onto the stack, in order (walked once, in Python)."""
        if self._run is not None:
            self._link_run()
        nxt = self.desc_next
        out = []
        i = self.free_head
        for _ in range(self.num_free):
            out.append(i)
            i = nxt[i]
        self.free_head = i              # the list's end: nothing follows the stack
        n = len(out)
        self._stack[:n] = out[::-1]
        self._top = n
        self._run = True if n else None

    def get_bufs(self, limit: int = 1 << 16) -> tuple[Sequence[Any], Sequence[int]]:
        """Every used buffer at once (see Virtqueue.get_bufs). A batch of one-descriptor
        buffers is read, checked and put back on the free list (as its run) with a few numpy
        operations, its tokens returned as an array of objects (add_bufs takes it back as
        it is); anything else (chains, in-order batches, DMA-mapped buffers) goes one by
        one."""
        if self._batch:
            # an in-order batch read but not all handed out yet: used->idx is already past it
            return Virtqueue.get_bufs(self, limit)
        last = self.last_used_idx
        seen = self.used_h[R.USED_H_IDX]
        n = (seen - last) & R.IDX_MASK
        if n == 0:
            return _EMPTY
        if self.in_order or self._chains_out or "get_buf" in self.__dict__ or self.broken:
            return Virtqueue.get_bufs(self, limit)
        if n > limit:
            n = limit
        num = self.num
        if n > num - self.num_free:
            self.mark_broken(f"used idx {seen} is {n} ahead, with "
                             f"{num - self.num_free} buffers in flight")
            return _EMPTY
        # The used idx was read first: the elements it published are valid now (TSO). They
        # are copied once: what is checked is what is used.
        s = last & self.mask
        if s + n <= num:
            elems = self._used_np[s:s + n].copy()
        else:
            elems = np.concatenate((self._used_np[s:], self._used_np[:s + n - num]))
        ids = elems.view(np.uint32)[::2].astype(np.intp)   # {le32 id, le32 len}: the ids
        data = self.desc_data
        try:
            toks = data[ids]
        except IndexError:
            self.mark_broken(f"a used id is >= {num}")
            return _EMPTY
        # each id a head in flight (a token), none twice (counted on a scratch array)
        seen_ids = self._seen
        seen_ids[ids] = 1
        distinct = np.count_nonzero(seen_ids)
        seen_ids[ids] = 0
        if distinct != n or None in toks.tolist():
            self.mark_broken("a used id is not a head in flight, or is used twice")
            return _EMPTY
        data[ids] = None
        if self._lat_n:
            self._sample_batch(ids)
        top = self._top
        self._stack[top:top + n] = ids
        self._top = top + n
        self._run = True
        self.num_free += n
        last = (last + n) & R.IDX_MASK
        self.last_used_idx = last
        self.used_seen = seen
        self.n_completed += n
        if not self.avail_flags_shadow & NO_INTERRUPT:
            self.avail_h[self.used_event_at] = last
        return toks, elems.view(np.uint32)[1::2]

    def _sample_batch(self, ids: Any) -> None:
        """Latency samples among a batch (stamped by add_sgs or add_bufs)."""
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
            self._lat_n -= 1
            self.lat_hist[(monotonic_ns() - t).bit_length()] += 1
        # detach_buf_split, inlined: the chain goes back on the free list whole.
        self.desc_data[head] = None
        if self._run is not None:
            self._link_run()
        c = self.desc_count[head]
        if c == 1:
            self.desc_next[head] = self.free_head
        else:
            self.desc_next[self.desc_last[head]] = self.free_head
            self.desc_count[head] = 1
            self.desc_last[head] = head
            self._chains_out -= 1
        self.free_head = head
        self.num_free += c
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
            self._lat_n -= 1
            self.lat_hist[(monotonic_ns() - t).bit_length()] += 1

    def _detach_buf(self, head: int) -> None:
        """detach_buf_split: return the chain's descriptors to the free list. In order, the
        free descriptors are always the ring-order run after the in-flight ones: no links
        change."""
        self.desc_data[head] = None
        if self._run is not None:
            self._link_run()
        c = self.desc_count[head]
        if not self.in_order:
            self.desc_next[self.desc_last[head]] = self.free_head
            self.free_head = head
        if c != 1:
            self.desc_count[head] = 1
            self.desc_last[head] = head
            self._chains_out -= 1
        self.num_free += c

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
            if self.lat_t[head]:
                self.lat_t[head] = 0            # never used: not a latency
                self._lat_n -= 1
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
        # the numpy views hold exports of the ring's views (and so of the mapping): first
        self._desc_np = self._desc_addr = self._desc_w = None
        self._avail_np = self._used_np = self._ram_q = None
        for v in (self.desc_q, self.desc_i, self.desc_mv, self.avail_h, self.used_h,
                  self.used_i):
            v.release()
