"""The batch paths of both sides of the split ring - the driver's add_bufs / get_bufs, the
device's pop_bufs / push_used - mixed at random with the one-buffer paths (add_sgs, get_buf,
pop_batch, fill/flush) over one shared mapping, across the 16-bit index wrap.

A model kept here knows which buffer (by its guest address) each token stands for, in which
order the driver made buffers available and the device used them; whatever mix of paths runs,
each side must see exactly what the other did: the device each buffer once, in ring order,
with its address, length and direction; the driver each token once, in used order, with the
length the device wrote; num_free the ring less what is in flight.
"""

import mmap
from collections import deque

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from vmsim.abi import features as F
from vmsim.guest.memory import DmaMemory, GuestRAM
from vmsim.guest.virtio.virtqueue import ENOSPC
from vmsim.guest.virtio.vring import vring_create_virtqueue
from vmsim.host.memory import GuestMemory
from vmsim.host.virtio.errors import RingError
from vmsim.host.virtio.queue_packed import PackedQueue
from vmsim.host.virtio.queue_split import SplitQueue

BASE = 0x4000_0000
RAM = 1 << 20
BUF = 64


class Rig:
    def __init__(self, num: int, event: bool, indirect: bool, packed: bool = False) -> None:
        self.mm = mmap.mmap(-1, RAM)
        self.ram = GuestRAM(self.mm, BASE)
        self.dma = DmaMemory(self.ram)
        feats = F.bit(F.VIRTIO_F_VERSION_1)
        if event:
            feats |= F.bit(F.VIRTIO_RING_F_EVENT_IDX)
        if indirect:
            feats |= F.bit(F.VIRTIO_RING_F_INDIRECT_DESC)
        if packed:
            feats |= F.bit(F.VIRTIO_F_RING_PACKED)
        self.vq = vring_create_virtqueue(0, num, 4096, self.dma, feats, lambda _vq: True,
                                         lambda _vq: None, "batch")
        self.mem = GuestMemory(self.mm, BASE)
        cls = PackedQueue if packed else SplitQueue
        self.dev = cls(self.mem, num, self.vq.desc_addr, self.vq.avail_addr,
                       self.vq.used_addr, event, indirect)
        # one buffer per possible token slot, reused: 3 segments each for chains
        self.pool = [self.dma.alloc(3 * BUF, 64)[0] for _ in range(4 * num)]

    def close(self) -> None:
        self.vq.release()
        self.dev.release()
        self.mem.release()
        self.ram.release()
        try:
            self.mm.close()
        except BufferError:
            pass


class BatchMachine(RuleBasedStateMachine):
    """Driver and device each pick a one-buffer or a batch operation at random."""

    PACKED = False

    def __init__(self) -> None:
        super().__init__()
        self.rig: Rig | None = None

    @initialize(num=st.sampled_from([1, 2, 3, 4, 8, 16, 64]), event=st.booleans(),
                indirect=st.booleans(), near_wrap=st.booleans(), back=st.integers(0, 70))
    def setup(self, num, event, indirect, near_wrap, back):
        if num == 3 and not self.PACKED:
            num = 4                 # a split ring's size is a power of two
        self.rig = rig = Rig(num, event, indirect, self.PACKED)
        self.num = num
        self.free_slots = list(range(len(rig.pool)))
        self.next_token = 0
        self.avail: deque[tuple[int, int, int, bool, int]] = deque()  # token, slot, len, w, n
        self.held: dict[int, tuple[int, int, int, bool, int]] = {}    # head -> the same
        self.used: deque[tuple[int, int]] = deque()                  # token, written
        self.descs = 0                                               # ring descs in flight
        self.tokens: dict[int, int] = {}                             # token -> slot
        self.cost: dict[int, int] = {}                               # token -> ring descs
        # start `back` buffers short of the 16-bit wrap of the indices, brought there through
        # the batch paths (on rings of 16 and more: smaller ones would take too long)
        target = 65536 - back if near_wrap and num >= 16 else 0
        vq, dev = rig.vq, rig.dev
        done = 0
        while done < target:
            k = min(num, target - done)
            toks = list(range(k))
            addrs = np.array([rig.pool[i] for i in range(k)], np.uint64)
            assert vq.add_bufs(addrs, BUF, toks, True) == 0
            b = dev.pop_bufs()
            assert b is not None and len(b.heads) == k
            dev.push_used(b.heads, 0)
            got, _ = vq.get_bufs()
            assert list(got) == toks
            done += k

    # ---- the driver ------------------------------------------------------------------------------
    def _take(self, segs: int) -> tuple[int, int]:
        slot = self.free_slots.pop()
        tok = self.next_token
        self.next_token += 1
        self.tokens[tok] = slot
        return tok, slot

    @precondition(lambda self: self.rig is not None and self.free_slots)
    @rule(writable=st.booleans(), ln=st.integers(1, BUF))
    def add_one(self, writable, ln):
        vq = self.rig.vq
        tok, slot = self._take(1)
        sg = [(self.rig.pool[slot], ln)]
        err = vq.add_sgs((), sg, tok) if writable else vq.add_sgs(sg, (), tok)
        if vq.num_free < 0 or err == ENOSPC:
            assert err == ENOSPC
            self._give_back(tok)
            return
        assert err == 0
        self.avail.append((tok, slot, ln, writable, 1))
        self.cost[tok] = 1
        self.descs += 1

    @precondition(lambda self: self.rig is not None and len(self.free_slots) >= 1)
    @rule()
    def add_chain(self):
        """A three-segment request (header, data, status), direct or indirect."""
        rig = self.rig
        vq = rig.vq
        free = vq.num_free
        tok, slot = self._take(3)
        g = rig.pool[slot]
        err = vq.add_sgs([(g, 16)], [(g + BUF, BUF), (g + 2 * BUF, 1)], tok)
        ind = rig.vq.indirect and free >= 1
        cost = 1 if ind else 3
        if free < cost:
            assert err == ENOSPC
            self._give_back(tok)
            return
        assert err == 0
        self.avail.append((tok, slot, -1, False, cost))
        self.cost[tok] = cost
        self.descs += cost

    @precondition(lambda self: self.rig is not None and self.free_slots)
    @rule(n=st.integers(1, 70), writable=st.booleans(), same_len=st.booleans())
    def add_batch(self, n, writable, same_len):
        rig = self.rig
        vq = rig.vq
        n = min(n, len(self.free_slots))
        taken = [self._take(1) for _ in range(n)]
        addrs = np.array([rig.pool[s] for _, s in taken], np.uint64)
        lens = [1 + (t * 7) % BUF for t, _ in taken]
        arg = BUF if same_len else np.array(lens, np.int64)
        free = vq.num_free
        err = vq.add_bufs(addrs, arg, [t for t, _ in taken], writable)
        if free < n:
            assert err == ENOSPC and vq.num_free == free        # all or nothing
            for t, _ in taken:
                self._give_back(t)
            return
        assert err == 0
        for t, s in taken:
            self.avail.append((t, s, BUF if same_len else 1 + (t * 7) % BUF, writable, 1))
            self.cost[t] = 1
        self.descs += n

    def _give_back(self, tok: int) -> None:
        self.free_slots.append(self.tokens.pop(tok))

    @precondition(lambda self: self.rig is not None)
    @rule()
    def get_one(self):
        r = self.rig.vq.get_buf()
        if not self.used:
            assert r is None
            return
        assert r == self.used.popleft()
        self._done(r[0])

    @precondition(lambda self: self.rig is not None)
    @rule(limit=st.integers(1, 80))
    def get_batch(self, limit):
        toks, lens = self.rig.vq.get_bufs(limit)
        want = [self.used.popleft() for _ in range(min(limit, len(self.used)))]
        assert list(zip(toks, [int(x) for x in lens], strict=True)) == want
        for t, _ in want:
            self._done(t)

    def _done(self, tok: int) -> None:
        self.descs -= self.cost.pop(tok)
        self._give_back(tok)

    # ---- the device ------------------------------------------------------------------------------
    def _check_popped(self, head: int, off: int, ln: int, writable: bool) -> None:
        _tok, slot, want_len, want_w, cost = item = self.avail.popleft()
        assert cost == 1 and want_len > 0
        assert off == self.rig.pool[slot] - BASE
        assert ln == want_len and writable == want_w
        assert head not in self.held
        self.held[head] = item

    @precondition(lambda self: self.rig is not None)
    @rule(limit=st.integers(1, 80))
    def pop_one_by_one(self, limit):
        chains = self.rig.dev.pop_batch(limit)
        assert len(chains) == min(limit, len(self.avail))
        for c in chains:
            _tok, slot, ln, w, _cost = self.avail[0]
            g = self.rig.pool[slot] - BASE
            if ln < 0:
                assert (c.r_off, c.r_len) == ([g], [16])
                assert (c.w_off, c.w_len) == ([g + BUF, g + 2 * BUF], [BUF, 1])
                self.held[c.head] = self.avail.popleft()
            elif w:
                assert not c.r_off
                self._check_popped(c.head, c.w_off[0], c.w_len[0], True)
            else:
                assert not c.w_off
                self._check_popped(c.head, c.r_off[0], c.r_len[0], False)

    @precondition(lambda self: self.rig is not None)
    @rule(limit=st.integers(1, 80))
    def pop_batch_of_bufs(self, limit):
        b = self.rig.dev.pop_bufs(limit)
        if b is None:
            # the next entry is a chain: pop_batch takes it
            assert self.avail and self.avail[0][2] < 0
            return
        run = 0
        for item in self.avail:
            if item[2] < 0 or run == limit:
                break
            run += 1
        assert len(b.heads) == run
        for h, o, ln, w in zip(b.heads.tolist(), b.off.tolist(), b.len.tolist(),
                               b.writable.tolist(), strict=True):
            self._check_popped(h, o, ln, w)

    @precondition(lambda self: self.rig is not None and self.held)
    @rule(data=st.data())
    def push_one(self, data):
        head = data.draw(st.sampled_from(sorted(self.held)))
        tok, _slot, ln, w, _cost = self.held.pop(head)
        written = ln if w and ln > 0 else (1 if ln < 0 else 0)
        self.rig.dev.push(head, written)
        self.used.append((tok, written))

    @precondition(lambda self: self.rig is not None and self.held)
    @rule(data=st.data(), same=st.booleans())
    def push_batch(self, data, same):
        heads = data.draw(st.lists(st.sampled_from(sorted(self.held)), min_size=1,
                                   unique=True))
        items = [self.held.pop(h) for h in heads]
        if same:
            written: int | np.ndarray = 0
            ws = [0] * len(heads)
        else:
            ws = [it[2] if it[2] > 0 else 1 for it in items]
            written = np.array(ws, np.int64)
        self.rig.dev.push_used(np.array(heads, np.intp), written)
        for it, w in zip(items, ws, strict=True):
            self.used.append((it[0], w))

    # ---- what both sides must agree on -----------------------------------------------------------
    @invariant()
    def accounting(self):
        if self.rig is None:
            return
        vq, dev = self.rig.vq, self.rig.dev
        assert not vq.broken
        assert vq.num_free == self.num - self.descs
        assert dev.inflight == len(self.held)
        assert vq.in_flight() == len(self.avail) + len(self.held) + len(self.used)

    def teardown(self):
        if self.rig is not None:
            self.rig.close()


TestBatchPaths = BatchMachine.TestCase
TestBatchPaths.settings = settings(max_examples=150, stateful_step_count=50, deadline=None,
                                   suppress_health_check=[HealthCheck.too_slow])


class PackedBatchMachine(BatchMachine):
    """The same on a packed ring (buffer ids for heads, wrap counters for indices)."""

    PACKED = True


TestPackedBatchPaths = PackedBatchMachine.TestCase
TestPackedBatchPaths.settings = settings(max_examples=150, stateful_step_count=50,
                                         deadline=None,
                                         suppress_health_check=[HealthCheck.too_slow])


def _rig_with_used(num: int = 8) -> Rig:
    rig = Rig(num, True, False)
    toks = list(range(4))
    addrs = np.array(rig.pool[:4], np.uint64)
    assert rig.vq.add_bufs(addrs, BUF, toks, True) == 0
    b = rig.dev.pop_bufs()
    assert b is not None
    return rig


def test_get_bufs_refuses_a_used_id_twice():
    """A device that reports one head twice in a batch breaks the queue (the driver would
    otherwise put the descriptor on its free list twice)."""
    rig = _rig_with_used()
    try:
        b_heads = np.array([0, 0], np.intp)
        rig.dev.inflight = 4
        rig.dev.push_used(b_heads, 0)
        toks, _ = rig.vq.get_bufs()
        assert toks == [] and rig.vq.broken
    finally:
        rig.close()


def test_get_bufs_refuses_an_id_out_of_range():
    rig = _rig_with_used()
    try:
        rig.dev.push_used(np.array([3, 200], np.intp), 0)
        toks, _ = rig.vq.get_bufs()
        assert toks == [] and rig.vq.broken
    finally:
        rig.close()


@pytest.mark.parametrize("fault", ["next", "indirect", "zero", "zero_write", "below", "wrap",
                                   "past_end", "head"])
def test_pop_bufs_leaves_a_bad_descriptor_to_pop_batch(fault):
    """pop_bufs takes the good buffers before one that is not a single direct descriptor,
    returns None at it, and pop_batch then takes it or names its fault."""
    rig = Rig(8, True, True)
    try:
        addrs = np.array(rig.pool[:3], np.uint64)
        assert rig.vq.add_bufs(addrs, BUF, [0, 1, 2], False) == 0
        # spoil the third buffer's descriptor, as a hostile driver would
        d = rig.vq._desc_np
        h = int(rig.vq._avail_np[2])
        if fault == "next":
            d[h, 1] |= 1 << 32 | ((h + 1) % 8) << 48
        elif fault == "indirect":
            d[h, 1] = 16 | 4 << 32
        elif fault == "zero":
            d[h, 1] = 0
        elif fault == "zero_write":
            d[h, 1] = 2 << 32                   # empty, device-writable
        elif fault == "wrap":
            d[h, 0] = -16                       # addr + len wraps past 2**64
        elif fault == "below":
            d[h, 0] = BASE - 64
        elif fault == "past_end":
            d[h, 0] = BASE + RAM - 32
        else:
            rig.vq._avail_np[2] = 1000
        b = rig.dev.pop_bufs()
        assert b is not None and len(b.heads) == 2
        assert rig.dev.pop_bufs() is None
        if fault == "next":
            # not a fault: a chain of two (on into the next descriptor), which pop_batch takes
            (chain,) = rig.dev.pop_batch()
            assert chain.ndescs == 2
            return
        with pytest.raises(RingError):
            rig.dev.pop_batch()
    finally:
        rig.close()


@pytest.mark.parametrize("fault", ["indirect", "zero", "zero_write", "below", "wrap",
                                   "past_end", "id"])
def test_packed_pop_bufs_checks_every_descriptor(fault):
    """The packed ring's vectorized check: the third descriptor (ring position 2) spoiled as a
    hostile driver would. The batch is refused and the generic path names the fault (on a
    packed ring pop_bufs raises it, as pop_batch does); the good batch before is intact."""
    rig = Rig(8, True, True, packed=True)
    try:
        addrs = np.array(rig.pool[:3], np.uint64)
        assert rig.vq.add_bufs(addrs, BUF, [0, 1, 2], False) == 0
        w0, w1 = rig.vq._w0, rig.vq._w1       # addr; len | id << 32 | flags << 48
        orig = int(w1[2])
        keep = orig & 0xFFFF_FFFF_0000_0000   # flags (avail in this lap) and id
        if fault == "indirect":
            w1[2] = np.uint64(keep | 4 << 48 | 16)
        elif fault == "zero":
            w1[2] = np.uint64(keep)
        elif fault == "zero_write":
            w1[2] = np.uint64(keep | 2 << 48)
        elif fault == "below":
            w0[2] = np.uint64(BASE - 64)
        elif fault == "wrap":
            w0[2] = np.uint64(2**64 - 16)
        elif fault == "past_end":
            w0[2] = np.uint64(BASE + RAM - 32)
        else:                                 # the id of position 0: used twice
            w1[2] = np.uint64(orig & ~0xFFFF_0000_0000 | int(w1[0]) & 0xFFFF_0000_0000)
        with pytest.raises(RingError):
            rig.dev.pop_bufs()
    finally:
        rig.close()


def test_packed_pop_bufs_takes_a_clean_batch():
    rig = Rig(8, True, True, packed=True)
    try:
        addrs = np.array(rig.pool[:3], np.uint64)
        assert rig.vq.add_bufs(addrs, BUF, [0, 1, 2], False) == 0
        b = rig.dev.pop_bufs()
        assert b is not None and len(b.heads) == 3
        assert (b.off + BASE).tolist() == addrs.tolist() and b.len.tolist() == [BUF] * 3
        assert not b.writable.any()
    finally:
        rig.close()
