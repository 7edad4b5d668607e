"""Both sides of the split ring in one process over one shared mapping.

The driver (vmsim.guest.virtio.ring_split) and the device (vmsim.host.virtio.queue_split) are
the real code; they meet only in the anonymous mapping that stands for guest RAM, exactly as
the guest and host processes do. A model kept by the tests checks what each side does against
what the other side sees, reading the ring memory independently with struct (offsets computed
here from the spec's layout, not from vmsim.abi):

- every token comes back exactly once, with the length the device pushed;
- the device sees the segments and bytes the driver put in; the driver sees the bytes the
  device wrote;
- num_free is num minus the descriptors of what is in flight;
- the 16-bit indices wrap at 65536 (a long loop crosses it several times; a state machine
  starts just below it);
- notification decisions follow the spec: with EVENT_IDX kick_prepare() and need_notify()
  equal vring_need_event over the event words found in memory; without it they follow the
  NO_NOTIFY / NO_INTERRUPT flags; and no notification that is owed is ever suppressed.
"""

import mmap
import random
import struct
import sys
from collections import deque
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from vmsim.abi import features as F
from vmsim.abi import split_ring as R
from vmsim.guest.memory import DmaMemory, GuestRAM
from vmsim.guest.virtio.virtqueue import EIO, ENOSPC, INDIRECT_MAX
from vmsim.guest.virtio.vring import vring_create_virtqueue
from vmsim.host.memory import GuestMemory
from vmsim.host.virtio.queue_split import SplitQueue

BASE = 0x4000_0000
RAM_SIZE = 1 << 20
U16 = 0xFFFF

# The spec's constants, spelled out here so that a wrong value in vmsim.abi shows up.
DESC_F_NEXT, DESC_F_WRITE, DESC_F_INDIRECT = 1, 2, 4
AVAIL_F_NO_INTERRUPT = 1
USED_F_NO_NOTIFY = 1

SENTINEL = 0xEE


def need_event(event: int, new: int, old: int) -> bool:
    """The spec's rule, written as its definition: notify when moving an index from `old` to
    `new` passes `event`, i.e. event lies in [old, new) modulo 2**16."""
    return (event - old) & U16 < (new - old) & U16


def features(event: bool, indirect: bool) -> int:
    f = F.bit(F.VIRTIO_F_VERSION_1)
    if event:
        f |= F.bit(F.VIRTIO_RING_F_EVENT_IDX)
    if indirect:
        f |= F.bit(F.VIRTIO_RING_F_INDIRECT_DESC)
    return f


class Rig:
    """One driver queue and one device queue over one anonymous mapping."""

    def __init__(self, num: int, event: bool, indirect: bool, vring_align: int = 4,
                 ram_size: int = RAM_SIZE, callback: bool = True) -> None:
        self.num = num
        self.event = event
        self.indirect = indirect
        self.mm = mmap.mmap(-1, ram_size)
        self.ram = GuestRAM(self.mm, BASE)
        self.dma = DmaMemory(self.ram)
        self.notifies = 0
        self.callbacks = 0
        self.vq = vring_create_virtqueue(
            0, num, vring_align, self.dma, features(event, indirect), self._notify,
            self._callback if callback else None, "test-vq")
        self.mem = GuestMemory(self.mm, BASE)
        self.dev = SplitQueue(self.mem, num, self.vq.desc_addr, self.vq.avail_addr,
                              self.vq.used_addr, event, indirect)

    def _notify(self, vq) -> bool:
        assert vq is self.vq
        self.notifies += 1
        return True

    def _callback(self, vq) -> None:
        assert vq is self.vq
        self.callbacks += 1

    # ---- independent reads of ring memory (spec layout, struct, little-endian) ----------
    def _u16(self, gpa: int) -> int:
        return struct.unpack_from("<H", self.mm, gpa - BASE)[0]

    def _put16(self, gpa: int, v: int) -> None:
        struct.pack_into("<H", self.mm, gpa - BASE, v)

    @property
    def avail_flags(self) -> int:
        return self._u16(self.vq.avail_addr)

    @property
    def avail_idx(self) -> int:
        return self._u16(self.vq.avail_addr + 2)

    def avail_ring(self, i: int) -> int:
        return self._u16(self.vq.avail_addr + 4 + 2 * (i % self.num))

    @property
    def used_event(self) -> int:
        return self._u16(self.vq.avail_addr + 4 + 2 * self.num)

    @property
    def used_flags(self) -> int:
        return self._u16(self.vq.used_addr)

    @property
    def used_idx(self) -> int:
        return self._u16(self.vq.used_addr + 2)

    def used_elem(self, i: int) -> tuple[int, int]:
        return struct.unpack_from("<II", self.mm,
                                  self.vq.used_addr - BASE + 4 + 8 * (i % self.num))

    def write_used_elem(self, i: int, ident: int, ln: int) -> None:
        struct.pack_into("<II", self.mm, self.vq.used_addr - BASE + 4 + 8 * (i % self.num),
                         ident, ln)

    @property
    def avail_event(self) -> int:
        return self._u16(self.vq.used_addr + 4 + 8 * self.num)

    def desc(self, i: int, table: int | None = None) -> tuple[int, int, int, int]:
        """(addr, len, flags, next) of descriptor i of the ring's table or of a table at gpa."""
        at = (self.vq.desc_addr if table is None else table) - BASE + 16 * i
        return struct.unpack_from("<QIHH", self.mm, at)

    def close(self) -> None:
        self.vq.release()
        self.dev.release()
        self.mem.release()
        self.ram.release()
        try:
            self.mm.close()
        except BufferError:  # a chain view still alive somewhere; the GC will unmap it
            pass


@dataclass
class Req:
    """One buffer the driver exposed, as the model knows it."""
    token: int
    out: list[tuple[int, bytes]]             # (gpa, bytes the driver put there)
    inp: list[tuple[int, int]]               # (gpa, length)
    indirect: bool
    cost: int                                # ring descriptors it holds
    head: int | None = None
    chain: object = None
    written: bytes = b""
    used_len: int = 0
    gpas: list[int] = field(default_factory=list)

    @property
    def total(self) -> int:
        return len(self.out) + len(self.inp)

    @property
    def out_bytes(self) -> bytes:
        return b"".join(d for _, d in self.out)

    @property
    def wlen(self) -> int:
        return sum(n for _, n in self.inp)


def make_req(rig: Rig, token: int, out_lens: list[int], in_lens: list[int],
             rng: random.Random) -> Req:
    out, inp, gpas = [], [], []
    for n in out_lens:
        gpa, mv = rig.dma.alloc(n, 8)
        data = rng.randbytes(n)
        mv[:] = data
        out.append((gpa, data))
        gpas.append(gpa)
    for n in in_lens:
        gpa, mv = rig.dma.alloc(n, 8)
        mv[:] = bytes([SENTINEL]) * n
        inp.append((gpa, n))
        gpas.append(gpa)
    total = len(out_lens) + len(in_lens)
    use_ind = rig.indirect and 1 < total <= INDIRECT_MAX and rig.vq.num_free > 0
    return Req(token, out, inp, use_ind, 1 if use_ind else total, gpas=gpas)


def add(rig: Rig, req: Req) -> int:
    out = [(g, len(d)) for g, d in req.out]
    inp = list(req.inp)
    if not inp:
        return rig.vq.add_outbuf(out, req.token)
    if not out:
        return rig.vq.add_inbuf(inp, req.token)
    return rig.vq.add_sgs(out, inp, req.token)


def free_req(rig: Rig, req: Req) -> None:
    for g in req.gpas:
        rig.dma.free(g)


def check_chain_matches(rig: Rig, req: Req, chain) -> None:
    """The device sees the driver's segments (same addresses, lengths, order, direction) and
    the bytes the driver wrote; an indirect table was used exactly when it should be."""
    assert chain.r_off == [g - BASE for g, _ in req.out]
    assert chain.r_len == [len(d) for _, d in req.out]
    assert chain.w_off == [g - BASE for g, _ in req.inp]
    assert chain.w_len == [n for _, n in req.inp]
    assert chain.rlen == len(req.out_bytes)
    assert chain.wlen == req.wlen
    assert b"".join(bytes(v) for v in chain.readable) == req.out_bytes
    assert [len(v) for v in chain.writable] == [n for _, n in req.inp]
    addr, ln, flags, _ = rig.desc(chain.head)
    assert bool(flags & DESC_F_INDIRECT) == req.indirect
    if req.indirect:
        assert ln == 16 * req.total
        # the table holds the same segments, flagged as the spec says
        for j, (g, n) in enumerate([(g, len(d)) for g, d in req.out] + req.inp):
            a, ln_j, fl_j, nx_j = rig.desc(j, table=addr)
            assert (a, ln_j) == (g, n)
            assert bool(fl_j & DESC_F_WRITE) == (j >= len(req.out))
            assert bool(fl_j & DESC_F_NEXT) == (j < req.total - 1)
            assert not fl_j & DESC_F_INDIRECT
            if fl_j & DESC_F_NEXT:
                assert nx_j == j + 1
    else:
        # walk the ring's own table from the head: the chain the driver linked
        i, seen = chain.head, []
        while True:
            a, ln_i, fl_i, nx_i = rig.desc(i)
            seen.append((a, ln_i, bool(fl_i & DESC_F_WRITE)))
            if not fl_i & DESC_F_NEXT:
                break
            i = nx_i
            assert len(seen) <= rig.num
        assert seen == [(g, len(d), False) for g, d in req.out] + [(g, n, True)
                                                                   for g, n in req.inp]


def check_driver_sees(rig: Rig, req: Req, written: int) -> None:
    """What the device wrote is what the driver reads; nothing past it was touched."""
    got = b"".join(bytes(rig.ram.view(g, n)) for g, n in req.inp)
    assert got[:written] == req.written
    assert got[written:] == bytes([SENTINEL]) * (req.wlen - written)


# ---- the pure rule -----------------------------------------------------------------------------


@given(st.integers(0, U16), st.integers(0, U16), st.integers(0, U16))
@settings(max_examples=300, deadline=None)
def test_vring_need_event_is_the_spec_rule(event, new, old):
    assert R.vring_need_event(event, new, old) == need_event(event, new, old)


def test_layout_constants_match_the_spec():
    assert (R.VRING_DESC_F_NEXT, R.VRING_DESC_F_WRITE, R.VRING_DESC_F_INDIRECT) == (1, 2, 4)
    assert R.VRING_AVAIL_F_NO_INTERRUPT == 1 and R.VRING_USED_F_NO_NOTIFY == 1
    for num in (1, 2, 256, 32768):
        assert R.avail_h_used_event(num) * 2 == 4 + 2 * num
        assert R.used_h_avail_event(num) * 2 == 4 + 8 * num
        assert R.avail_size(num) == 6 + 2 * num
        assert R.used_size(num) == 6 + 8 * num


# ---- the state machine -------------------------------------------------------------------------


class SplitRingMachine(RuleBasedStateMachine):
    """Random interleavings of driver and device operations on one ring."""

    NEAR_WRAP = False

    def __init__(self) -> None:
        super().__init__()
        self.rig: Rig | None = None

    @initialize(num=st.sampled_from([1, 2, 4, 8, 16, 32]), event=st.booleans(),
                indirect=st.booleans(), vring_align=st.sampled_from([4, 4096]),
                seed=st.integers(0, 2**32 - 1), back=st.integers(1, 40))
    def setup(self, num, event, indirect, vring_align, seed, back):
        self.rig = Rig(num, event, indirect, vring_align)
        self.rng = random.Random(seed)
        self.next_token = 1
        self.reqs: dict[int, Req] = {}           # added, not yet returned by get_buf
        self.avail_fifo: deque[int] = deque()   # added, not yet popped by the device
        self.popped: list[int] = []             # popped, not yet pushed
        self.used_fifo: deque[tuple[int, int]] = deque()  # pushed, not yet taken back
        self.added = self.consumed = self.dev_popped = self.dev_used = 0
        self.kick_old = 0
        self.signalled, self.signalled_valid = 0, False
        self.cb_enabled, self.event_triggered = True, False
        self.used_event_exp = 0
        self.dev_notify_enabled = True
        self.avail_event_exp = 0
        self.irq_armed = False      # enable_cb() said nothing is pending: an interrupt is owed
        self.kick_armed = False     # enable_notify() said nothing slipped in: a kick is owed
        self.kick_armed_at = 0
        if self.NEAR_WRAP:
            self._prefix(65536 - back)

    def _prefix(self, n: int) -> None:
        """Bring every index to n with complete round trips through the real code."""
        rig = self.rig
        vq, dev = rig.vq, rig.dev
        gpa, _ = rig.dma.alloc(16)
        for i in range(n):
            assert vq.add_outbuf([(gpa, 16)], i + 1) == 0
            vq.kick_prepare()
            chain = dev.pop()
            dev.push(chain.head, 0)
            dev.need_notify()
            assert vq.get_buf() == (i + 1, 0)
        rig.dma.free(gpa)
        self.added = self.consumed = self.dev_popped = self.dev_used = n & U16
        self.kick_old = n & U16
        self.signalled, self.signalled_valid = n & U16, n > 0
        self.used_event_exp = n & U16
        self.next_token = n + 1

    def teardown(self) -> None:
        rig = self.rig
        if rig is None:
            return
        try:
            # after a failing step the model may be off: report that step, not this check
            if sys.exc_info()[0] is None:
                self._reset_and_detach()
        finally:
            rig.close()

    def _reset_and_detach(self) -> None:
        """The device is stopped: every buffer not taken back by get_buf comes back from
        detach_unused_buf exactly once, and the ring is whole again."""
        rig = self.rig
        outstanding = set(self.reqs)
        got = []
        while (tok := rig.vq.detach_unused_buf()) is not None:
            got.append(tok)
            assert len(got) <= rig.num
        assert sorted(got) == sorted(outstanding)
        assert rig.vq.num_free == rig.num
        assert rig.vq.detach_unused_buf() is None
        # each detached buffer is taken back off the avail ring
        assert rig.avail_idx == self.consumed & U16
        for tok in got:
            free_req(rig, self.reqs.pop(tok))

    # ---- invariants ------------------------------------------------------------------------
    @invariant()
    def counts_and_indices(self):
        rig = self.rig
        if rig is None:
            return
        in_flight = sum(r.cost for r in self.reqs.values())
        assert rig.vq.num_free == rig.num - in_flight
        assert rig.avail_idx == self.added
        assert rig.used_idx == self.dev_used
        assert rig.dev.last_avail_idx == self.dev_popped
        assert rig.dev.last_used_idx == self.dev_used
        assert rig.vq.callbacks_enabled() == self.cb_enabled
        assert not rig.vq.broken
        if rig.event:
            assert rig.used_event == self.used_event_exp
            assert rig.avail_event == self.avail_event_exp
            assert rig.avail_flags == 0
            assert rig.used_flags == 0
        else:
            assert rig.avail_flags == (0 if self.cb_enabled else AVAIL_F_NO_INTERRUPT)
            assert rig.used_flags == (0 if self.dev_notify_enabled else USED_F_NO_NOTIFY)

    # ---- driver ----------------------------------------------------------------------------
    @rule(n_out=st.one_of(st.integers(0, 4), st.integers(15, 18)), n_in=st.integers(0, 3),
          lens=st.lists(st.integers(1, 96), min_size=22, max_size=22))
    def driver_add(self, n_out, n_in, lens):
        rig = self.rig
        if n_out + n_in == 0:
            n_out = 1
        tok = self.next_token
        self.next_token += 1
        req = make_req(rig, tok, lens[:n_out], lens[n_out:n_out + n_in], self.rng)
        free_before = rig.vq.num_free
        r = add(rig, req)
        if req.cost <= free_before:
            assert r == 0
            self.reqs[tok] = req
            self.avail_fifo.append(tok)
            assert rig.avail_ring(self.added) < rig.num
            self.added = (self.added + 1) & U16
        else:
            assert r == ENOSPC
            assert rig.vq.num_free == free_before
            free_req(rig, req)

    def _expected_kick(self) -> bool:
        rig = self.rig
        if rig.event:
            return need_event(rig.avail_event, rig.avail_idx, self.kick_old)
        return not rig.used_flags & USED_F_NO_NOTIFY

    def _after_kick(self, kicked: bool) -> None:
        if self.kick_armed and self.added != self.kick_armed_at:
            assert kicked, "the device asked for a kick (enable_notify) and got none"
            self.kick_armed = False
        self.kick_old = self.added

    @rule()
    def driver_kick_prepare(self):
        exp = self._expected_kick()
        got = self.rig.vq.kick_prepare()
        assert got == exp
        self._after_kick(got)

    @rule()
    def driver_kick(self):
        exp = self._expected_kick()
        before = self.rig.notifies
        assert self.rig.vq.kick() is True
        assert self.rig.notifies - before == int(exp)
        self._after_kick(exp)

    @rule(k=st.integers(1, 4))
    def driver_get_buf(self, k):
        rig = self.rig
        for _ in range(k):
            assert rig.vq.more_used() == bool(self.used_fifo)
            r = rig.vq.get_buf()
            if not self.used_fifo:
                assert r is None
                return
            tok, written = self.used_fifo.popleft()
            assert r == (tok, written)
            req = self.reqs.pop(tok)
            check_driver_sees(rig, req, written)
            free_req(rig, req)
            self.consumed = (self.consumed + 1) & U16
            if self.cb_enabled:
                self.used_event_exp = self.consumed

    @rule()
    def driver_disable_cb(self):
        self.rig.vq.disable_cb()
        if self.cb_enabled:
            self.cb_enabled = False
            if self.rig.event and not self.event_triggered:
                self.used_event_exp = 0
        self.irq_armed = False

    def _enabled(self) -> None:
        self.cb_enabled = True
        self.event_triggered = False
        self.used_event_exp = self.consumed

    @rule()
    def driver_enable_cb(self):
        got = self.rig.vq.enable_cb()
        self._enabled()
        assert got == (not self.used_fifo)
        self.irq_armed = got

    @rule()
    def driver_enable_cb_prepare_poll(self):
        v = self.rig.vq.enable_cb_prepare()
        assert v == self.consumed
        self._enabled()
        pending = self.rig.vq.poll(v)
        assert pending == bool(self.used_fifo)
        self.irq_armed = not pending

    @rule()
    def driver_enable_cb_delayed(self):
        rig = self.rig
        bufs = ((rig.avail_idx - self.consumed) & U16) * 3 // 4
        got = rig.vq.enable_cb_delayed()
        self._enabled()
        self.used_event_exp = (self.consumed + bufs) & U16
        assert got == (len(self.used_fifo) <= bufs)
        self.irq_armed = False      # the interrupt is now owed only after `bufs` more

    @rule()
    def driver_interrupt(self):
        rig = self.rig
        before = rig.callbacks
        got = rig.vq.vring_interrupt()
        assert got == bool(self.used_fifo)
        assert rig.callbacks - before == int(got)
        if got and rig.event:
            self.event_triggered = True

    # ---- device ----------------------------------------------------------------------------
    @rule(k=st.integers(1, 4))
    def device_pop(self, k):
        rig = self.rig
        for _ in range(k):
            assert rig.dev.has_work() == bool(self.avail_fifo)
            chain = rig.dev.pop()
            if not self.avail_fifo:
                assert chain is None
                return
            tok = self.avail_fifo.popleft()
            req = self.reqs[tok]
            assert chain.head == rig.avail_ring(self.dev_popped)
            check_chain_matches(rig, req, chain)
            busy = {self.reqs[t].head for t in self.popped}
            busy |= {self.reqs[t].head for t, _ in self.used_fifo}
            assert chain.head not in busy, "a head still in use was handed out again"
            req.head, req.chain = chain.head, chain
            self.popped.append(tok)
            self.dev_popped = (self.dev_popped + 1) & U16

    @precondition(lambda self: self.popped)
    @rule(pick=st.integers(0, 1 << 16), frac=st.floats(0, 1))
    def device_push(self, pick, frac):
        rig = self.rig
        tok = self.popped.pop(pick % len(self.popped))
        req = self.reqs[tok]
        written = round(req.wlen * frac)
        req.written = self.rng.randbytes(written)
        assert req.chain.write_at(0, req.written) == written
        rig.dev.push(req.head, written)
        assert rig.used_elem(self.dev_used) == (req.head, written)
        self.used_fifo.append((tok, written))
        self.dev_used = (self.dev_used + 1) & U16

    @rule()
    def device_need_notify(self):
        rig = self.rig
        if rig.event:
            exp = (not self.signalled_valid
                   or need_event(rig.used_event, self.dev_used, self.signalled))
            self.signalled, self.signalled_valid = self.dev_used, True
        else:
            exp = not rig.avail_flags & AVAIL_F_NO_INTERRUPT
        got = rig.dev.need_notify()
        assert got == exp
        if self.irq_armed and self.used_fifo:
            assert got, "the driver enabled callbacks and an interrupt was suppressed"
        if got:
            self.irq_armed = False

    @rule()
    def device_disable_notify(self):
        self.rig.dev.disable_notify()
        self.dev_notify_enabled = False
        self.kick_armed = False

    @rule()
    def device_enable_notify(self):
        rig = self.rig
        got = rig.dev.enable_notify()
        self.dev_notify_enabled = True
        if rig.event:
            self.avail_event_exp = self.dev_popped
        assert got == bool(self.avail_fifo)
        assert got == rig.dev.has_work()
        if not got:
            # every buffer added from now on is owed a kick (the first kick_prepare after it)
            self.kick_armed, self.kick_armed_at = True, self.added


class NearWrapMachine(SplitRingMachine):
    """The same machine, started 1..40 round trips short of the 16-bit wrap."""

    NEAR_WRAP = True


TestSplitRing = SplitRingMachine.TestCase
TestSplitRing.settings = settings(max_examples=250, stateful_step_count=60, deadline=None)

TestSplitRingNearWrap = NearWrapMachine.TestCase
TestSplitRingNearWrap.settings = settings(
    max_examples=10, stateful_step_count=80, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])


# ---- long deterministic runs across the wrap ----------------------------------------------------


@pytest.mark.parametrize("event,indirect", [(True, True), (False, False), (True, False),
                                            (False, True)])
def test_indices_wrap_many_times(event, indirect):
    """~200k buffers through an 8-entry ring in batches, completed out of order: the 16-bit
    indices cross 65536 three times; tokens, lengths, bytes and notification decisions stay
    right all the way."""
    total = 200_000 if event and indirect else 70_000
    rig = Rig(8, event, indirect)
    vq, dev = rig.vq, rig.dev
    try:
        out_gpa, out_mv = rig.dma.alloc(4 * 16, 8)
        in_gpa, in_mv = rig.dma.alloc(4 * 16, 8)
        tok = 0
        kick_old = 0
        signalled, valid = 0, False
        wraps = 0
        prev_idx = 0
        pattern = struct.Struct("<Q")
        while tok < total:
            batch = 1 + tok % 4
            toks = []
            for k in range(batch):
                tok += 1
                pattern.pack_into(out_mv, 16 * k, tok)
                nseg = 1 + (tok >> 3) % 2            # 1 or 2 segments: direct and indirect
                if nseg == 1:
                    r = vq.add_sgs([(out_gpa + 16 * k, 8)], [], tok)
                else:
                    r = vq.add_sgs([(out_gpa + 16 * k, 8)], [(in_gpa + 16 * k, 8)], tok)
                assert r == 0
                toks.append(tok)
            new = rig.avail_idx
            assert new == tok & U16
            if tok % 3 == 0:
                dev.disable_notify()
            elif tok % 3 == 1:
                dev.enable_notify()
            exp = (need_event(rig.avail_event, new, kick_old) if event
                   else not rig.used_flags & USED_F_NO_NOTIFY)
            assert vq.kick_prepare() == exp
            kick_old = new
            chains = []
            while (c := dev.pop()) is not None:
                t = pattern.unpack_from(c.readable[0])[0]
                if c.wlen:
                    c.write_at(0, pattern.pack(~t & 0xFFFFFFFFFFFFFFFF))
                chains.append((t, c.head, c.wlen))
            assert [t for t, _, _ in chains] == toks
            for t, head, wlen in reversed(chains):   # complete out of order
                dev.push(head, min(wlen, t % 9))
            if event:
                exp = not valid or need_event(rig.used_event, dev.last_used_idx, signalled)
                signalled, valid = dev.last_used_idx, True
            else:
                exp = not rig.avail_flags & AVAIL_F_NO_INTERRUPT
            assert dev.need_notify() == exp
            for k, (t, _, wlen) in reversed(list(enumerate(chains))):
                assert vq.get_buf() == (t, min(wlen, t % 9))
                if wlen:
                    assert pattern.unpack_from(in_mv, 16 * k)[0] == ~t & 0xFFFFFFFFFFFFFFFF
            assert vq.get_buf() is None
            assert vq.num_free == 8
            if tok % 7 == 0:
                vq.disable_cb()
            elif tok % 7 == 3:
                vq.enable_cb()
            idx = rig.used_idx
            if idx < prev_idx:
                wraps += 1
            prev_idx = idx
        assert wraps == tok // 65536 >= 1
        assert vq.last_used_idx == dev.last_used_idx == tok & U16
    finally:
        rig.close()


def test_kick_forced_after_65535_adds_without_kick_prepare():
    """Linux kicks by itself when 2^16-1 buffers were added since the last kick_prepare, so
    that the old/new window of vring_need_event never becomes ambiguous."""
    rig = Rig(2, True, False)
    vq, dev = rig.vq, rig.dev
    try:
        gpa, _ = rig.dma.alloc(16)
        for i in range(1, 65536 + 10):
            assert vq.add_outbuf([(gpa, 16)], i) == 0
            assert rig.notifies == (1 if i >= 65535 else 0), i
            c = dev.pop()
            dev.push(c.head, 0)
            assert vq.get_buf() == (i, 0)
        assert rig.avail_idx == (65536 + 9) & U16
    finally:
        rig.close()


def test_event_triggered_disable_cb_leaves_used_event():
    """With EVENT_IDX, once the device has interrupted (vring_interrupt ran the callback) it
    will not interrupt again before used_event moves, so disable_cb need not (and, as in
    Linux, does not) write used_event; enable_cb_prepare clears the state again."""
    rig = Rig(4, True, False)
    vq, dev = rig.vq, rig.dev
    try:
        gpa, _ = rig.dma.alloc(8)
        for tok in (1, 2, 3):
            assert vq.add_outbuf([(gpa, 8)], tok) == 0
            dev.push(dev.pop().head, 0)
        assert vq.get_buf() == (1, 0)
        assert rig.used_event == 1
        assert dev.need_notify() is True
        assert vq.vring_interrupt() is True and rig.callbacks == 1
        vq.disable_cb()                          # from the callback, as NAPI does
        assert not vq.callbacks_enabled()
        assert rig.used_event == 1               # untouched: the event already fired
        assert vq.get_buf() == (2, 0)
        assert rig.used_event == 1               # callbacks are off: get_buf leaves it
        assert vq.enable_cb_prepare() == 2
        assert rig.used_event == 2
        vq.disable_cb()                          # no event since: the "hack" value 0
        assert rig.used_event == 0
        assert vq.enable_cb() is False           # buffer 3 is pending
        assert vq.get_buf() == (3, 0)
        assert rig.used_event == 3
        # the same through enable_cb_delayed, which also ends the triggered state
        assert vq.add_outbuf([(gpa, 8)], 4) == 0
        dev.push(dev.pop().head, 0)
        assert dev.need_notify() is True
        assert vq.vring_interrupt() is True and rig.callbacks == 2
        assert vq.enable_cb_delayed() is False   # 1 pending > 3/4 of 1 outstanding
        assert rig.used_event == 3
        vq.disable_cb()
        assert rig.used_event == 0
    finally:
        rig.close()


def test_interrupt_not_lost_when_used_idx_laps_signalled_used():
    """The device signals at used idx 0, then (one long service pass, no need_notify) uses
    65535 buffers the driver consumes by polling with callbacks off. The driver re-enables
    callbacks (nothing pending, so it will sleep), adds one more buffer, and the device uses
    it: used idx has passed used_event (65535), so the driver must be interrupted. With
    old == new (mod 2^16) vring_need_event says no; vhost marks signalled_used invalid when
    the used idx laps it (drivers/vhost/vhost.c, vhost_add_used_n) and notifies."""
    rig = Rig(2, True, False)
    vq, dev = rig.vq, rig.dev
    try:
        gpa, _ = rig.dma.alloc(8)
        assert dev.need_notify() is True            # signalled at used idx 0
        vq.disable_cb()                             # the driver polls
        for i in range(65535):
            assert vq.add_outbuf([(gpa, 8)], i + 1) == 0
            dev.push(dev.pop().head, 0)
            assert vq.get_buf() == (i + 1, 0)
        assert vq.enable_cb() is True               # nothing pending: wait for an interrupt
        assert rig.used_event == 65535
        assert vq.add_outbuf([(gpa, 8)], "last") == 0
        dev.push(dev.pop().head, 0)
        assert rig.used_idx == 0 and vq.more_used()
        assert need_event(rig.used_event, 0, 65535)  # the used idx crossed used_event
        assert dev.need_notify() is True
    finally:
        rig.close()


def test_indirect_table_allocation_failure_falls_back_to_direct():
    """When no memory is left for an indirect table, the chain goes out as direct
    descriptors (Linux falls back when kmalloc of the table fails)."""
    rig = Rig(4, False, True, ram_size=0x4000)
    try:
        rng = random.Random(6)
        req = make_req(rig, 1, [8, 8], [8], rng)
        # take every byte the allocator has left
        hog = []
        while True:
            try:
                hog.append(rig.dma.alloc(8, 8)[0])
            except MemoryError:
                break
        assert add(rig, req) == 0
        assert rig.vq.num_free == 1                 # three ring descriptors, not one
        req.indirect, req.cost = False, 3
        chain = rig.dev.pop()
        check_chain_matches(rig, req, chain)
        rig.dev.push(chain.head, 8)
        assert rig.vq.get_buf() == (1, 8)
        assert rig.vq.num_free == 4
    finally:
        rig.close()


# ---- indirect descriptors, ENOSPC, reset --------------------------------------------------------


@pytest.mark.parametrize("event", [False, True])
def test_indirect_chain_uses_one_ring_descriptor(event):
    rig = Rig(4, event, True)
    try:
        rng = random.Random(1)
        reqs = [make_req(rig, t, [16, 1, 7], [512, 1], rng) for t in (1, 2, 3, 4)]
        for req in reqs:
            assert req.indirect
            assert add(rig, req) == 0
        assert rig.vq.num_free == 0
        single = make_req(rig, 9, [8], [], rng)
        assert add(rig, single) == ENOSPC
        for req in reqs:
            chain = rig.dev.pop()
            check_chain_matches(rig, req, chain)
            assert chain.ndescs == 5
            rig.dev.push(chain.head, 3)
        for req in reqs:
            assert rig.vq.get_buf() == (req.token, 3)
        assert rig.vq.num_free == 4
        # a single segment never goes indirect
        req = make_req(rig, 10, [8], [], rng)
        assert not req.indirect
        assert add(rig, req) == 0
        check_chain_matches(rig, req, rig.dev.pop())
    finally:
        rig.close()


def test_chain_longer_than_indirect_max_goes_direct():
    rig = Rig(32, False, True)
    try:
        rng = random.Random(2)
        n = INDIRECT_MAX + 1
        req = make_req(rig, 1, [8] * (n - 3), [8] * 3, rng)
        assert not req.indirect and req.cost == n
        assert add(rig, req) == 0
        assert rig.vq.num_free == 32 - n
        chain = rig.dev.pop()
        check_chain_matches(rig, req, chain)
        rig.dev.push(chain.head, 24)
        assert rig.vq.get_buf() == (1, 24)
        assert rig.vq.num_free == 32
    finally:
        rig.close()


def _chain_ids(rig: Rig, head: int) -> list[int]:
    ids = [head]
    while True:
        _, _, flags, nxt = rig.desc(ids[-1])
        if not flags & DESC_F_NEXT:
            return ids
        ids.append(nxt)
        assert len(ids) <= rig.num


@pytest.mark.parametrize("event", [False, True])
def test_three_segment_chains_on_fresh_and_fragmented_free_lists(event):
    """Block-request-shaped chains (three segments, every split into readable and writable),
    direct, mixed with shorter chains and completed out of order so that they land both on
    consecutive descriptors and on a fragmented free list. Each is seen by the device as the
    driver wrote it and comes back with its token and length."""
    rig = Rig(8, event, False)
    rng = random.Random(5)
    shapes = {"consecutive": 0, "scattered": 0}
    tok = 0
    try:
        for round_ in range(300):
            reqs = []
            while True:
                # first only three-segment chains (the free list stays in consecutive runs),
                # then mixed with shorter ones (which scatter it)
                total = 3 if round_ < 150 else rng.choice((3, 3, 2, 1))
                n_out = rng.randint(0, total)
                lens = [rng.randint(1, 64) for _ in range(total)]
                tok += 1
                req = make_req(rig, tok, lens[:n_out], lens[n_out:], rng)
                if add(rig, req) != 0:
                    free_req(rig, req)
                    break
                reqs.append(req)
            rig.vq.kick_prepare()
            for req in reqs:
                chain = rig.dev.pop()
                check_chain_matches(rig, req, chain)
                req.head, req.chain = chain.head, chain
                if req.total == 3:
                    ids = _chain_ids(rig, chain.head)
                    key = ("consecutive" if ids == list(range(ids[0], ids[0] + 3))
                           else "scattered")
                    shapes[key] += 1
            assert rig.dev.pop() is None
            rng.shuffle(reqs)
            for req in reqs:
                written = rng.randint(0, req.wlen)
                req.written = rng.randbytes(written)
                assert req.chain.write_at(0, req.written) == written
                rig.dev.push(req.head, written)
                req.used_len = written
            for req in reqs:
                assert rig.vq.get_buf() == (req.token, req.used_len)
                check_driver_sees(rig, req, req.used_len)
                free_req(rig, req)
            assert rig.vq.num_free == 8
        assert shapes["consecutive"] > 50 and shapes["scattered"] > 50, shapes
    finally:
        rig.close()


@pytest.mark.parametrize("indirect", [False, True])
def test_enospc_when_full(indirect):
    rig = Rig(4, False, indirect)
    try:
        rng = random.Random(3)
        a = make_req(rig, 1, [8, 8], [8], rng)
        assert add(rig, a) == 0
        assert rig.vq.num_free == (3 if indirect else 1)
        if not indirect:
            big = make_req(rig, 2, [8], [8], rng)
            assert add(rig, big) == ENOSPC
            assert rig.vq.num_free == 1
            assert rig.avail_idx == 1
            too_long = make_req(rig, 3, [8] * 5, [], rng)
            assert add(rig, too_long) == ENOSPC
        fill = [make_req(rig, 10 + i, [8], [], rng) for i in range(rig.vq.num_free)]
        for req in fill:
            assert add(rig, req) == 0
        assert rig.vq.num_free == 0
        assert add(rig, make_req(rig, 99, [8], [], rng)) == ENOSPC
        assert add(rig, make_req(rig, 98, [8, 8], [8], rng)) == ENOSPC
        assert rig.avail_idx == 1 + len(fill)
        # one completion makes room again
        c = rig.dev.pop()
        rig.dev.push(c.head, 0)
        assert rig.vq.get_buf() == (1, 0)
        assert add(rig, make_req(rig, 100, [8], [], rng)) == 0
    finally:
        rig.close()


def test_token_none_refused_and_empty_chain_refused():
    rig = Rig(4, False, False)
    try:
        gpa, _ = rig.dma.alloc(8)
        with pytest.raises(ValueError):
            rig.vq.add_outbuf([(gpa, 8)], None)
        with pytest.raises(ValueError):
            rig.vq.add_sgs([], [], 1)
        assert rig.vq.num_free == 4 and rig.avail_idx == 0
        # falsy tokens are tokens
        assert rig.vq.add_outbuf([(gpa, 8)], 0) == 0
        c = rig.dev.pop()
        rig.dev.push(c.head, 0)
        assert rig.vq.get_buf() == (0, 0)
    finally:
        rig.close()


@given(ops=st.lists(st.tuples(st.integers(1, 3), st.integers(0, 2), st.integers(0, 5),
                              st.integers(0, 5)), min_size=1, max_size=12),
       event=st.booleans(), indirect=st.booleans())
@settings(max_examples=60, deadline=None)
def test_detach_unused_after_reset(ops, event, indirect):
    """Buffers in every state (available, popped by the device, used but not yet taken back)
    when the device stops: detach_unused_buf returns each exactly once and num_free is
    restored."""
    rig = Rig(8, event, indirect)
    rng = random.Random(4)
    try:
        live: dict[int, Req] = {}
        popped = []
        got_back = set()
        for tok, (n_out, n_in, n_pop, n_push) in enumerate(ops, 1):
            req = make_req(rig, tok, [8] * n_out, [8] * n_in, rng)
            if add(rig, req) == 0:
                live[tok] = req
            else:
                free_req(rig, req)
            for _ in range(n_pop):
                c = rig.dev.pop()
                if c is None:
                    break
                popped.append(c.head)
            for _ in range(min(n_push, len(popped))):
                rig.dev.push(popped.pop(0), 0)
            if n_push == 5 and (r := rig.vq.get_buf()) is not None:
                got_back.add(r[0])
                free_req(rig, live.pop(r[0]))
        # reset: the device is gone; everything not returned comes back through detach
        detached = []
        while (t := rig.vq.detach_unused_buf()) is not None:
            detached.append(t)
        assert sorted(detached) == sorted(live)
        assert not got_back & set(detached)
        assert rig.vq.num_free == 8
        assert rig.vq.detach_unused_buf() is None
    finally:
        rig.close()


# ---- the driver distrusts the used ring ---------------------------------------------------------


def _one_used(rig: Rig, ident: int, ln: int = 0) -> None:
    """Write a used element by hand and publish it."""
    idx = rig.used_idx
    rig.write_used_elem(idx, ident, ln)
    rig._put16(rig.vq.used_addr + 2, (idx + 1) & U16)


@pytest.mark.parametrize("ident", [4, 5, 0xFFFF, 0xFFFFFFFF])
def test_used_id_out_of_range_breaks_queue(ident):
    rig = Rig(4, True, False)
    try:
        gpa, _ = rig.dma.alloc(8)
        assert rig.vq.add_outbuf([(gpa, 8)], "a") == 0
        _one_used(rig, ident)
        assert rig.vq.get_buf() is None
        assert rig.vq.broken
        assert "out of range" in rig.vq.broken_reason
        assert rig.vq.get_buf() is None
        assert rig.vq.add_outbuf([(gpa, 8)], "b") == EIO
        assert rig.vq.notify() is False
        assert rig.notifies == 0
        # an interrupt on a broken queue is not spurious, but runs no callback
        assert rig.vq.vring_interrupt() is True
        assert rig.callbacks == 0
    finally:
        rig.close()


@pytest.mark.parametrize("which", ["free", "inside-chain", "already-used"])
def test_used_id_not_a_head_breaks_queue(which):
    rig = Rig(8, False, False)
    try:
        gpa, _ = rig.dma.alloc(64)
        # head 0 holds a 3-descriptor chain (0 -> 1 -> 2); 3..7 are free
        assert rig.vq.add_sgs([(gpa, 8), (gpa + 8, 8)], [(gpa + 16, 8)], "chain") == 0
        chain = rig.dev.pop()
        assert chain.head == 0
        if which == "free":
            _one_used(rig, 5)
        elif which == "inside-chain":
            _one_used(rig, 1)
        else:
            rig.dev.push(chain.head, 8)
            assert rig.vq.get_buf() == ("chain", 8)
            _one_used(rig, 0)              # the same head, used a second time
        assert rig.vq.get_buf() is None
        assert rig.vq.broken
        assert "not a head" in rig.vq.broken_reason
        assert rig.vq.add_outbuf([(gpa, 8)], "x") == EIO
    finally:
        rig.close()


def test_used_ring_is_read_only_after_its_index():
    """An element written but not published by used->idx is not taken."""
    rig = Rig(4, False, False)
    try:
        gpa, _ = rig.dma.alloc(8)
        assert rig.vq.add_outbuf([(gpa, 8)], "a") == 0
        rig.write_used_elem(0, 0, 8)
        assert not rig.vq.more_used()
        assert rig.vq.get_buf() is None
        assert rig.vq.vring_interrupt() is False      # spurious
        assert rig.vq.n_spurious == 1
        rig._put16(rig.vq.used_addr + 2, 1)
        assert rig.vq.vring_interrupt() is True
        assert rig.callbacks == 1
        assert rig.vq.get_buf() == ("a", 8)
    finally:
        rig.close()


def test_no_callback_queue_asks_for_no_interrupts():
    rig = Rig(4, False, False, callback=False)
    try:
        assert not rig.vq.callbacks_enabled()
        assert rig.avail_flags & AVAIL_F_NO_INTERRUPT
    finally:
        rig.close()
