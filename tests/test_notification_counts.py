"""How many kicks and interrupts a defined driver/device protocol sends, to the exact count.

The driver side (vmsim.guest.virtio: SplitVirtqueue / PackedVirtqueue) and the device side
(vmsim.host.virtio: SplitQueue / PackedQueue) are the real code over one anonymous mapping, run
step by step in one thread so that every interleaving is fixed by the protocol below and the
counts are deterministic. The expected figures are derived in the comments from the spec's
rules, not from vmsim:

- flags (no EVENT_IDX), split: the driver kicks unless used->flags has NO_NOTIFY; the device
  interrupts unless avail->flags has NO_INTERRUPT.
- event index, split: a side that moves its index from `old` to `new` notifies iff the other
  side's event index lies in [old, new) (mod 2^16), i.e. vring_need_event.
- packed: ENABLE -> always, DISABLE -> never, DESC (only with EVENT_IDX) -> iff the descriptor
  at (offset, wrap counter) was made available / used in this step ("Event will only trigger
  when this descriptor is made available/used", virtio spec, packed virtqueues).

The protocol (one thread; the "device" and the "driver" take turns):

  START      both sides start as they are between batches: the device asleep, having called
             enable_notify() on the empty ring, the driver having run NAPI's disable_cb() /
             enable_cb() (without them a packed ring's event areas are still as initialised:
             ENABLE, which enable_cb alone keeps, as in Linux).
  BATCH      the driver adds B buffers (every buffer is one chain of `segs` descriptors),
             calling kick_prepare() once after the B adds (or, in the kick-per-add variant,
             after every add) and notify() whenever it says so.
  WAKE-UP    a device that sleeps runs only if it was kicked since it went to sleep. It then
             calls disable_notify(), runs passes until the ring is empty - a pass is
             pop_batch(C) (C = everything unless said otherwise), fill_batch with each chain's
             writable length, and one need_notify() - then enable_notify() (and runs again if
             that reports work) and sleeps.
             A polling device calls disable_notify() once at the start and then runs passes
             after every batch without ever touching the notification state again.
  INTERRUPT  if any need_notify() of the wake-up said yes, one interrupt is delivered after
             the device is done: vring_interrupt() runs the driver's callback.
  NAPI       the callback: disable_cb(), get_buf() until empty, enable_cb(); if enable_cb()
             reports more used buffers, start over.

Counted: driver n_kicks / n_kicks_suppressed (one of them per kick_prepare), device
n_interrupts / n_interrupts_suppressed (one of them per need_notify).
"""

import math
import mmap
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vmsim.abi import features as F
from vmsim.guest.memory import DmaMemory, GuestRAM
from vmsim.guest.virtio.vring import vring_create_virtqueue, vring_del_virtqueue
from vmsim.host.memory import GuestMemory
from vmsim.host.virtio.queue_packed import PackedQueue
from vmsim.host.virtio.queue_split import SplitQueue

BASE = 0x4000_0000
RAM_SIZE = 2 << 20
N = 1024                      # requests per test
BATCHES = [1, 4, 16, 64]
BUF = 64                      # bytes of each data buffer

# (ring, event idx): the four kinds of notification suppression
MODES = [("split", False), ("split", True), ("packed", False), ("packed", True)]
MODE_IDS = ["split-flags", "split-event", "packed-flags", "packed-desc"]
# Each buffer is one chain of `segs` descriptors (no indirect descriptors, so a packed chain
# of 3 takes 3 ring slots). Queue sizes: split rings are powers of two; packed ones are not,
# and the chains of 3 cross the end of a 199-entry ring at every offset.
SIZES = {("split", 1): 128, ("split", 3): 256, ("packed", 1): 100, ("packed", 3): 199}

# the spec's packed event suppression constants, spelled out here
EV_ENABLE, EV_DISABLE, EV_DESC = 0, 1, 2


# PackedQueue.need_notify compares the driver's DESC event with the window (old, new] of used
# positions; when the used position wrapped during the step, `old` counts a lap back (DPDK's
# vhost_vring_call_packed: `if (new <= old) old -= size`), so an event the device passed in
# the previous lap does not fire again. The tests below cross the end of the ring on purpose.


def off_wrap_of(p: int, num: int) -> int:
    """(offset | wrap << 15) of free-running ring position p: both wrap counters start at 1
    and flip each time the ring's last descriptor is passed."""
    return p % num | (1 ^ (p // num) & 1) << 15


class Rig:
    """One driver queue and one device queue over one mapping, with the protocol's steps."""

    def __init__(self, ring: str, event: bool, segs: int = 1) -> None:
        self.packed = ring == "packed"
        self.event = event
        self.segs = segs
        self.num = SIZES[(ring, segs)]
        feats = F.bit(F.VIRTIO_F_VERSION_1)
        if event:
            feats |= F.bit(F.VIRTIO_RING_F_EVENT_IDX)
        if self.packed:
            feats |= F.bit(F.VIRTIO_F_RING_PACKED)
        self.mm = mmap.mmap(-1, RAM_SIZE)
        self.ram = GuestRAM(self.mm, BASE)
        self.dma = DmaMemory(self.ram)
        self.vq = vring_create_virtqueue(0, self.num, 4096, self.dma, feats, self._notify,
                                         self._callback, "counts")
        assert self.vq.num == self.num and self.vq.ring == ring
        self.mem = GuestMemory(self.mm, BASE)
        cls = PackedQueue if self.packed else SplitQueue
        self.dq = cls(self.mem, self.num, self.vq.desc_addr, self.vq.avail_addr,
                      self.vq.used_addr, event_idx=event, indirect=False)
        # one header, data buffer and status byte shared by every token (the device here
        # only reports lengths; it does not look at the contents)
        self.hdr_gpa, _ = self.dma.alloc(16, 16)
        self.status_gpa, _ = self.dma.alloc(1, 8)
        self.data_gpa, _ = self.dma.alloc(BUF, 64)
        self.next_token = 0
        self.outstanding: set[int] = set()
        self.returned = 0
        self.notifies = 0
        self.kicked = False              # a kick arrived since the device went to sleep
        self.irq_pending = False
        self.on_interrupt = self.napi
        self.irq_log: list[bool] = []     # every need_notify answer, in order
        self.avail_p = 0                  # free-running descriptor positions (packed model)
        self.used_p = 0

    def start_asleep(self) -> None:
        assert not self.dq.enable_notify()
        self.vq.disable_cb()
        assert self.vq.enable_cb()

    # ---- the driver ------------------------------------------------------------------------------
    def _notify(self, vq) -> bool:
        self.notifies += 1
        self.kicked = True
        return True

    def _callback(self, vq) -> None:
        self.on_interrupt()

    def add(self) -> None:
        tok = self.next_token
        self.next_token += 1
        if self.segs == 1:
            err = self.vq.add_inbuf([(self.data_gpa, BUF)], tok)
        else:
            err = self.vq.add_sgs([(self.hdr_gpa, 16)], [(self.data_gpa, BUF),
                                                         (self.status_gpa, 1)], tok)
        assert err == 0
        self.outstanding.add(tok)
        self.avail_p += self.segs

    def kick(self) -> None:
        if self.vq.kick_prepare():
            assert self.vq.notify()

    def batch(self, b: int, kick_each: bool = False) -> None:
        for _ in range(b):
            self.add()
            if kick_each:
                self.kick()
        if not kick_each:
            self.kick()

    def drain(self) -> int:
        n = 0
        while (r := self.vq.get_buf()) is not None:
            tok, ln = r
            assert tok in self.outstanding, f"token {tok} returned twice or never added"
            self.outstanding.remove(tok)
            assert ln == (BUF if self.segs == 1 else BUF + 1)
            n += 1
        self.returned += n
        return n

    def napi(self) -> None:
        vq = self.vq
        while True:
            vq.disable_cb()
            self.drain()
            if vq.enable_cb():
                break
        if self.packed and self.event:
            # enable_cb armed a DESC event at the next descriptor to be used
            assert self.drv_event() == (off_wrap_of(self.used_p, self.num), EV_DESC)
        elif self.packed:
            assert self.drv_event()[1] == EV_ENABLE
        elif self.event:
            # used_event = the next used idx
            assert self.split_u16(self.vq.avail_addr + 4 + 2 * self.num) \
                == self.returned & 0xFFFF
        else:
            assert self.split_u16(self.vq.avail_addr) & 1 == 0      # NO_INTERRUPT clear

    # ---- the device ------------------------------------------------------------------------------
    def one_pass(self, chunk: int) -> int:
        chains = self.dq.pop_batch(chunk)
        if not chains:
            return 0
        self.dq.fill_batch(chains, [c.wlen for c in chains])
        self.used_p += sum(c.ndescs for c in chains)
        needs = self.dq.need_notify()
        self.irq_log.append(needs)
        self.irq_pending |= needs
        return len(chains)

    def passes(self, chunk: int) -> None:
        while self.one_pass(chunk):
            pass

    def wake(self, chunk: int = 1 << 16) -> bool:
        """A sleeping device: runs only if kicked; returns whether it ran."""
        if not self.kicked:
            return False
        self.kicked = False
        dq = self.dq
        dq.disable_notify()
        while True:
            self.passes(chunk)
            if not dq.enable_notify():
                break
        if self.packed and self.event:
            # enable_notify armed a DESC event at the next descriptor to be made available
            assert self.dev_event() == (off_wrap_of(self.avail_p, self.num), EV_DESC)
        elif self.packed:
            assert self.dev_event()[1] == EV_ENABLE
        elif self.event:
            # avail_event = the next avail idx
            assert self.split_u16(self.vq.used_addr + 4 + 8 * self.num) \
                == self.avail_p // self.segs & 0xFFFF
        else:
            assert self.split_u16(self.vq.used_addr) & 1 == 0        # NO_NOTIFY clear
        self.deliver()
        return True

    def deliver(self) -> None:
        if self.irq_pending:
            self.irq_pending = False
            assert self.vq.vring_interrupt()

    # ---- independent reads of the event areas and flags (spec layout) ----------------------
    def split_u16(self, gpa: int) -> int:
        return struct.unpack_from("<H", self.mm, gpa - BASE)[0]

    def dev_event(self) -> tuple[int, int]:
        return struct.unpack_from("<HH", self.mm, self.vq.used_addr - BASE)

    def drv_event(self) -> tuple[int, int]:
        return struct.unpack_from("<HH", self.mm, self.vq.avail_addr - BASE)

    # ---- results ---------------------------------------------------------------------------------
    def kicks(self) -> tuple[int, int]:
        assert self.notifies == self.vq.n_kicks
        return self.vq.n_kicks, self.vq.n_kicks_suppressed

    def interrupts(self) -> tuple[int, int]:
        assert self.irq_log.count(True) == self.dq.n_interrupts
        return self.dq.n_interrupts, self.dq.n_interrupts_suppressed

    def check_all_returned(self) -> None:
        assert not self.outstanding and self.returned == self.next_token
        assert self.vq.num_free == self.num

    def close(self) -> None:
        self.dq.release()
        vring_del_virtqueue(self.vq)
        self.mem.release()
        self.ram.release()
        self.mm.close()


@pytest.fixture
def rig():
    made = []

    def make(*a, **kw) -> Rig:
        r = Rig(*a, **kw)
        made.append(r)
        return r

    yield make
    for r in made:
        r.close()


modes = pytest.mark.parametrize("ring,event", MODES, ids=MODE_IDS)
batches = pytest.mark.parametrize("b", BATCHES)
shapes = pytest.mark.parametrize("segs", [1, 3], ids=["1desc", "3desc"])


# ---- 1. a device that sleeps between batches, one kick_prepare per batch ---------------------
@modes
@batches
@shapes
def test_sleeping_device_one_kick_and_one_interrupt_per_batch(rig, ring, event, b, segs):
    """Every batch finds the device asleep with notifications enabled: NO_NOTIFY clear
    (flags), avail_event == the avail idx before the batch (event idx: the first add moves
    the index past it), or ENABLE / a DESC event at the batch's first descriptor (packed).
    So the one kick_prepare of the batch kicks: N/B kicks, none suppressed.
    The device empties the ring in one pass, whose need_notify finds the driver's callbacks
    enabled by NAPI's enable_cb: NO_INTERRUPT clear, used_event == the used idx before the
    pass, or ENABLE / DESC at the pass's first used descriptor. N/B interrupts, none
    suppressed."""
    r = rig(ring, event, segs)
    r.start_asleep()
    for _ in range(N // b):
        r.batch(b)
        assert r.wake()
    r.check_all_returned()
    assert r.kicks() == (N // b, 0)
    assert r.interrupts() == (N // b, 0)
    assert r.vq.n_irqs == N // b and r.vq.n_spurious == 0


# ---- 2. the same, but kick_prepare after every add (unplugged submission) --------------------
@modes
@batches
@shapes
def test_sleeping_device_kick_prepare_after_every_add(rig, ring, event, b, segs):
    """The device runs only after the whole batch (it is slow to wake), so while the driver
    adds it still shows the state it left when it went to sleep.
    - flags / packed ENABLE: that state says "notify me" unconditionally, so every one of
      the N kick_prepare calls kicks: N kicks, 0 suppressed.
    - event idx / packed DESC: the event is the batch's first slot; only the first add moves
      past it ([old, new) holds it only then): one kick per batch, B-1 suppressed.
    Interrupts as in test 1: one pass per batch, N/B, none suppressed."""
    r = rig(ring, event, segs)
    r.start_asleep()
    for _ in range(N // b):
        r.batch(b, kick_each=True)
        assert r.wake()
    r.check_all_returned()
    if event:
        assert r.kicks() == (N // b, N - N // b)
    else:
        assert r.kicks() == (N, 0)
    assert r.interrupts() == (N // b, 0)


# ---- 3. a device that keeps polling ----------------------------------------------------------
@modes
@batches
@shapes
def test_polling_device_is_not_kicked(rig, ring, event, b, segs):
    """The device calls disable_notify() once before anything is added and then serves the
    ring after every batch without enabling notifications again.
    - split flags: NO_NOTIFY is set -> every kick_prepare is suppressed: 0 and N/B.
    - split event idx: disabling writes nothing (vhost_disable_notify only touches the flags
      without EVENT_IDX), so avail_event keeps its initial 0. The first batch moves avail idx
      from 0 to B, past 0: one kick. The index never comes back to 0 within N < 2^16 adds:
      every later kick_prepare is suppressed: 1 and N/B - 1.
    - packed: the device event flags are DISABLE: 0 and N/B, with or without EVENT_IDX.
    The driver runs NAPI after every pass, re-enabling callbacks each time: one interrupt per
    pass, N/B, none suppressed."""
    r = rig(ring, event, segs)
    r.dq.disable_notify()
    for _ in range(N // b):
        r.batch(b)
        r.passes(1 << 16)
        r.deliver()
    r.check_all_returned()
    if ring == "split" and event:
        assert r.kicks() == (1, N // b - 1)
    else:
        assert r.kicks() == (0, N // b)
    assert r.interrupts() == (N // b, 0)


@modes
@batches
def test_polling_device_and_polling_driver_exchange_no_notifications(rig, ring, event, b):
    """Both sides poll: the device as above, the driver calls disable_cb() once at the
    start and calls get_buf() after each device pass.
    Kicks as above. Interrupts:
    - split flags: NO_INTERRUPT is set -> all N/B need_notify calls say no.
    - split event idx: disable_cb writes used_event = 0 ("a hack" in Linux: no event until
      the used idx comes back to 0). The first pass moves used idx from 0 to B, past 0: one
      interrupt; afterwards none (N < 2^16): 1 and N/B - 1.
    - packed: the driver event flags are DISABLE: none, with or without EVENT_IDX."""
    r = rig(ring, event)
    r.dq.disable_notify()
    r.vq.disable_cb()
    r.on_interrupt = lambda: None        # a polling driver ignores its (one) interrupt
    for _ in range(N // b):
        r.batch(b)
        r.passes(1 << 16)
        r.deliver()
        assert r.drain() == b
    r.check_all_returned()
    if ring == "split" and event:
        assert r.kicks() == (1, N // b - 1)
        assert r.interrupts() == (1, N // b - 1)
    elif ring == "split":
        assert r.kicks() == (0, N // b)
        assert r.interrupts() == (0, N // b)
    else:
        assert r.kicks() == (0, N // b)
        assert r.interrupts() == (0, N // b)


# ---- 4. a device that completes in chunks: several need_notify per wake-up -------------------
CHUNK = 16


@modes
@batches
@shapes
def test_chunked_device_interrupts_once_per_batch_with_event_idx(request, rig, ring, event, b,
                                                                 segs):
    """The device pops at most C = 16 chains per pass, so a batch takes ceil(B/C) passes and
    there are P = N/B * ceil(B/C) need_notify calls. The driver's NAPI runs only after the
    device sleeps, so during all passes of a batch the driver state is what its last
    enable_cb left: callbacks enabled, event at the batch's first used entry/descriptor.
    - flags / packed ENABLE: every pass interrupts: P, 0.
    - event idx / packed DESC: only the first pass of each batch uses the event entry
      (the later ones start after it, still within the same lap for the packed ring, even
      when a pass crosses the end of the ring): N/B interrupts, P - N/B suppressed.
    Kicks: one per batch, as in test 1."""
    r = rig(ring, event, segs)
    r.start_asleep()
    for _ in range(N // b):
        r.batch(b)
        assert r.wake(CHUNK)
    r.check_all_returned()
    p = N // b * math.ceil(b / CHUNK)
    assert r.kicks() == (N // b, 0)
    if event:
        assert r.interrupts() == (N // b, p - N // b)
    else:
        assert r.interrupts() == (p, 0)


# ---- 5. enable_cb_delayed: one interrupt after about 3/4 of what is outstanding --------------
@modes
@pytest.mark.parametrize("m", [4, 10, 16, 33])
@shapes
def test_enable_cb_delayed_interrupts_after_three_quarters(request, rig, ring, event, m, segs):
    """Rounds of M buffers (the virtio-net transmit pattern): the driver adds M, kicks, then
    calls enable_cb_delayed() and does not look at the ring until interrupted. The device
    completes one chain per pass (M need_notify calls); the interrupt then runs a callback
    that does disable_cb() and drains all M (enable_cb_delayed re-arms in the next round).
    A warm-up round trip first makes the device's signalled_used valid.
    - event idx: enable_cb_delayed puts the event 3/4 of the outstanding buffers ahead:
      split used_event = last_used + floor(3M/4); packed off_wrap = last_used +
      floor(3*D/4) descriptors, D = M*segs outstanding descriptors, which is inside the
      chain of buffer floor(floor(9M/4)/3) = floor(3M/4) of the round (counting from 0).
      Either way only pass k = floor(3M/4) + 1 uses it: 1 interrupt per round, M-1
      suppressed, and it comes at exactly that pass.
    - flags / packed ENABLE: enable_cb_delayed just enables callbacks: M interrupts, 0.
    Kicks: one per round, none suppressed."""
    r = rig(ring, event, segs)
    r.start_asleep()
    r.batch(1)
    assert r.wake()
    r.check_all_returned()
    k0, i0 = r.kicks(), r.interrupts()
    warm = len(r.irq_log)

    def take_all() -> None:
        r.vq.disable_cb()
        assert r.drain() == m

    r.on_interrupt = take_all
    rounds = N // m
    for _ in range(rounds):
        r.batch(m)
        assert r.vq.enable_cb_delayed()       # nothing was used yet
        assert r.wake(1)
    r.check_all_returned()
    kicks = r.kicks()
    irqs = r.interrupts()
    assert (kicks[0] - k0[0], kicks[1] - k0[1]) == (rounds, 0)
    if event:
        assert (irqs[0] - i0[0], irqs[1] - i0[1]) == (rounds, rounds * (m - 1))
        fired_at = {i % m + 1 for i, yes in enumerate(r.irq_log[warm:]) if yes}
        assert fired_at == {3 * m // 4 + 1}
    else:
        assert (irqs[0] - i0[0], irqs[1] - i0[1]) == (rounds * m, 0)


@modes
def test_enable_cb_delayed_reports_buffers_already_used(rig, ring, event):
    """enable_cb_delayed returns False when 3/4 of the outstanding buffers are used already:
    the driver must then process them instead of waiting for an interrupt that may not
    come. With 8 outstanding and 7 used (7 > floor(3*8/4) = 6) it must say so."""
    r = rig(ring, event)
    r.on_interrupt = lambda: None
    r.batch(8)
    r.dq.disable_notify()
    for _ in range(7):
        r.one_pass(1)
    assert not r.vq.enable_cb_delayed()
    r.passes(1)
    r.vq.disable_cb()
    assert r.drain() == 8


# ---- 6. packed DESC events: off_wrap across many ring wraps ----------------------------------
@pytest.mark.parametrize("segs", [1, 3], ids=["1desc", "3desc"])
@pytest.mark.parametrize("b", [1, 3, 4, 7, 64])
def test_packed_stale_desc_event_fires_once_per_two_laps(rig, segs, b):
    """The device arms a DESC event once (enable_notify() on an empty ring: offset 0, wrap
    counter 1) and then polls without touching its event area. The spec: the event "will only
    trigger when Ring Wrap Counter matches this value and a descriptor is made available" at
    that offset. In free-running positions that descriptor comes round at p = 2*num*j (every
    other lap has wrap counter 1), so a kick_prepare kicks iff its batch made one of those
    positions available: exactly ceil(N*segs / (2*num)) of the N/B batches, whatever the
    batch size - including batches that straddle the end of the ring, and chains that do."""
    r = rig("packed", True, segs)
    assert not r.dq.enable_notify()
    assert r.dev_event() == (off_wrap_of(0, r.num), EV_DESC)
    r.vq.disable_cb()
    r.on_interrupt = lambda: None
    kicked_at = []
    done = 0
    while done < N:
        n = min(b, N - done)
        start = r.avail_p
        before = r.vq.n_kicks
        r.batch(n)
        if r.vq.n_kicks != before:
            kicked_at.append((start, r.avail_p))
        r.passes(1 << 16)
        assert r.drain() == n
        done += n
    r.check_all_returned()
    total = N * segs
    laps2 = 2 * r.num
    expect = [(s, e) for s, e in kicked_at if any(s <= p < e for p in range(0, total, laps2))]
    assert kicked_at == expect
    assert len(kicked_at) == math.ceil(total / laps2)
    batches_run = math.ceil(N / b)
    assert r.kicks() == (len(kicked_at), batches_run - len(kicked_at))
    # the event area was never rewritten
    assert r.dev_event() == (off_wrap_of(0, r.num), EV_DESC)


@pytest.mark.parametrize("segs", [1, 3], ids=["1desc", "3desc"])
def test_packed_desc_interrupt_only_for_the_event_descriptor_across_wraps(rig, segs):
    """The driver arms DESC events at fixed descriptors and the device completes one chain per
    pass, wrapping the ring several times. For each target the driver picks a free-running
    used position t ahead of the device (within one lap) at a chain boundary and writes
    off_wrap_of(t) (driver event area, flags DESC). The spec's rule: exactly the pass that
    uses the chain starting at t interrupts; every other pass - including the passes that
    cross the end of the ring before or after it - is suppressed."""
    r = rig("packed", True, segs)
    r.on_interrupt = lambda: None
    r.vq.disable_cb()
    # warm-up: one round trip makes the device's signalled_used valid
    r.batch(1)
    r.passes(1)
    r.deliver()
    assert r.drain() == 1
    cap = r.num // segs                        # chains that fit in the ring
    fired = []
    expected = []
    for rnd in range(24):
        n = cap - 1 - rnd % 5
        ahead = (rnd * 7) % n                 # the event's chain within this round
        start = r.used_p
        t = start + ahead * segs
        expected.append(t)
        r.batch(n)
        struct.pack_into("<HH", r.mm, r.vq.avail_addr - BASE, off_wrap_of(t, r.num), EV_DESC)
        for _ in range(n):
            at = r.used_p
            r.one_pass(1)
            if r.irq_log[-1]:
                fired.append(at)
        r.deliver()
        assert r.drain() == n
    r.check_all_returned()
    assert r.used_p > 10 * r.num              # many wraps
    assert fired == expected


# ---- 7. packed kick decisions against the spec's rule, for any interleaving ------------------
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(num=st.sampled_from([1, 2, 3, 5, 13, 100]), event=st.booleans(),
       segs=st.integers(1, 3), ops=st.lists(st.tuples(
           st.sampled_from(["add", "add", "pass", "sleep", "disable", "drain"]),
           st.integers(1, 7), st.booleans()), max_size=120))
def test_packed_kick_decisions_follow_the_spec_rule(num, event, segs, ops):
    """Random interleavings of driver adds (kick_prepare after the adds, or after each), device
    passes, the device going to sleep (enable_notify) or polling (disable_notify), and the
    driver draining. A model of the device event area - ENABLE (as initialised), DISABLE, or
    DESC at the free-running position p_e where the device stood when it enabled - predicts
    every kick_prepare: ENABLE yes, DISABLE no, DESC iff the step made available a descriptor
    at p_e's offset with p_e's wrap counter, i.e. some p in [old, new) with p = p_e mod 2*num
    (which also covers events left stale for laps)."""
    segs = min(segs, num)
    feats = F.bit(F.VIRTIO_F_VERSION_1) | F.bit(F.VIRTIO_F_RING_PACKED)
    if event:
        feats |= F.bit(F.VIRTIO_RING_F_EVENT_IDX)
    mm = mmap.mmap(-1, 256 << 10)
    ram = GuestRAM(mm, BASE)
    dma = DmaMemory(ram)
    vq = vring_create_virtqueue(0, num, 4096, dma, feats, lambda q: True, None, "model")
    mem = GuestMemory(mm, BASE)
    dq = PackedQueue(mem, num, vq.desc_addr, vq.avail_addr, vq.used_addr, event_idx=event,
                     indirect=False)
    data_gpa, view = dma.alloc(64 * 3, 64)
    view.release()
    try:
        mode, p_e = EV_ENABLE, 0
        avail_p = dev_p = 0
        outstanding = 0
        tok = 0
        for op, k, each in ops:
            if op == "add":
                k = min(k, vq.num_free // segs)
                old = avail_p
                for _ in range(k):
                    sgs = [(data_gpa + 64 * i, 64) for i in range(segs)]
                    assert vq.add_inbuf(sgs, tok) == 0
                    tok += 1
                    outstanding += 1
                    avail_p += segs
                    if each:
                        want = mode == EV_ENABLE or (mode == EV_DESC and any(
                            p % (2 * num) == p_e % (2 * num)
                            for p in range(avail_p - segs, avail_p)))
                        assert vq.kick_prepare() == want
                if not each and k:
                    want = mode == EV_ENABLE or (mode == EV_DESC and any(
                        p % (2 * num) == p_e % (2 * num) for p in range(old, avail_p)))
                    assert vq.kick_prepare() == want
            elif op == "pass":
                chains = dq.pop_batch(k)
                dq.fill_batch(chains, [c.wlen for c in chains])
                dev_p += sum(c.ndescs for c in chains)
            elif op == "sleep":
                assert dq.enable_notify() == (dev_p != avail_p)
                mode, p_e = (EV_DESC, dev_p) if event else (EV_ENABLE, 0)
            elif op == "disable":
                dq.disable_notify()
                mode = EV_DISABLE
            else:
                while vq.get_buf() is not None:
                    outstanding -= 1
        assert outstanding >= 0
    finally:
        dq.release()
        vring_del_virtqueue(vq)
        mem.release()
        ram.release()
        mm.close()
