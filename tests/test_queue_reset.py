"""Per-queue reset and resize (VIRTIO_F_RING_RESET) with buffers in flight, end to end in one
process: the guest's virtio core, virtio-mmio driver and virtio_blk driver against the real
host emulation (MmioTransport + BlkDevice), wired as tests/test_guest_core.py wires them (its
Machine: one mapping for guest RAM, trapped register accesses, ioeventfd kicks, an irqfd, a
host thread that answers traps and serves the rings).

What is checked:
- virtqueue_reset / virtqueue_resize lose no token: every request in flight comes back exactly
  once, either completed by the device (its callback ran with a status) or handed to
  `recycle` (detached) - including requests the device used but the driver had not collected;
- the device forgot the old ring: the queue is not ready while it is reset, its ring object is
  a new one afterwards, and nothing made available before the reset is ever executed after it;
- the queue works afterwards, and a resize is visible on both sides (host q.num and ring.num,
  guest vq.num); bad sizes are refused (-E2BIG, -EINVAL) and split sizes round down;
- the QueueReset register: ignored (a guest error) unless RING_RESET was negotiated, reads 0
  once the reset is done, QueueReady reads 0 until the driver enables the queue again.
"""

import errno
import threading
import time

import pytest
from test_guest_core import MMIO_BASE, Machine, wait_for

from vmsim.abi import blk as B
from vmsim.abi import features as F
from vmsim.abi import mmio as M
from vmsim.abi import status as S
from vmsim.guest.virtio.vring import virtqueue_reset, virtqueue_resize

pytestmark = pytest.mark.timeout(30)

RING_RESET = F.bit(F.VIRTIO_F_RING_RESET)
RINGS = pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
IN_ORDER = F.bit(F.VIRTIO_F_IN_ORDER)
NOTIF_DATA = F.bit(F.VIRTIO_F_NOTIFICATION_DATA)
# (packed, offer): both rings, plain, with VIRTIO_F_IN_ORDER, with VIRTIO_F_NOTIFICATION_DATA
# (whose kicks the host checks against the ring, which must be the new one after a reset)
RING_KINDS = pytest.mark.parametrize("packed,offer", [
    (False, 0), (True, 0), (False, IN_ORDER), (True, IN_ORDER),
    (False, NOTIF_DATA), (True, NOTIF_DATA)],
    ids=["split", "packed", "split-in-order", "packed-in-order", "split-notif-data",
         "packed-notif-data"])
SECTOR = 512


@pytest.fixture
def machine():
    made = []

    def _make(**kw) -> Machine:
        m = Machine(**kw)
        made.append(m)
        return m

    yield _make
    for m in made:
        m.close()


def pattern(k: int) -> bytes:
    return bytes((k * 7 + i) & 0xFF or 1 for i in range(SECTOR))    # never all zero


class Io:
    """Requests of one blk queue and where each of them went: completed (the device's status
    reached the callback) or recycled (detached by a reset), each at most once."""

    def __init__(self, m: Machine, n_bufs: int) -> None:
        self.m = m
        self.blk = m.blk
        self.q = self.blk.queues[0]
        self.vq = self.q.vq
        self.bufs = [m.dma.alloc(SECTOR, SECTOR) for _ in range(n_bufs)]
        self.cond = threading.Condition()
        self.completed: dict[int, int] = {}
        self.recycled: list[int] = []
        self.submitted: list[int] = []
        self.dupes: list[int] = []

    def done(self, status: int, arg: int) -> None:
        with self.cond:
            if arg in self.completed or arg in self.recycled:
                self.dupes.append(arg)
            self.completed[arg] = status
            self.cond.notify_all()

    def write(self, k: int) -> None:
        """Write pattern(k) to sector k from buffer k (a request the test can recognise)."""
        gpa, view = self.bufs[k % len(self.bufs)]
        view[:] = pattern(k)
        assert self.blk.write(k, [(gpa, SECTOR)], self.done, k) == 0
        self.submitted.append(k)

    def recycle(self, vq, req) -> None:
        """The `recycle` of virtqueue_reset / _resize: the driver gets its slot back."""
        assert vq is self.vq
        arg = req.arg
        with self.cond:
            if arg in self.completed or arg in self.recycled:
                self.dupes.append(arg)
            self.recycled.append(arg)
        req.callback = req.arg = None
        self.q.free.append(req)

    def wait_completed(self, n: int) -> None:
        with self.cond:
            assert self.cond.wait_for(lambda: len(self.completed) >= n, timeout=5), \
                f"{len(self.completed)} of {n} requests completed"

    def check_each_came_back_once(self) -> None:
        assert self.dupes == []
        assert sorted([*self.completed, *self.recycled]) == sorted(self.submitted)
        assert set(self.completed.values()) <= {B.VIRTIO_BLK_S_OK}
        assert self.blk.in_flight() == 0
        assert self.vq.in_flight() == 0
        assert self.vq.n_detached == len(self.recycled)

    def disk_sector(self, k: int) -> bytes:
        out = bytearray(SECTOR)
        self.m.dev.backend.read_into(k * SECTOR, [memoryview(out)])
        return bytes(out)


def host_serve(m: Machine, n: int) -> int:
    """On the host thread: take n available requests, execute them, mark them used and
    interrupt if the driver asks for it (one device pass, as BlkDevice serves a queue)."""

    def job() -> int:
        q = m.dev.queues[0]
        ring = q.ring
        chains = ring.pop_batch(n)
        ring.fill_batch(chains, [m.dev.handler.execute(c) for c in chains])
        if chains and ring.need_notify():
            m.t.signal_used(q.index)
        return len(chains)

    return m.host.call(job)


def host_queue(m: Machine, i: int = 0):
    """(ready, ring, num) of the device's queue i, read on the host thread."""
    return m.host.call(lambda: (m.dev.queues[i].ready, m.dev.queues[i].ring,
                                m.dev.queues[i].num))


def boot(machine, **dev_kw) -> Machine:
    m = machine(dev_kw=dev_kw)
    assert m.boot() == 0
    assert m.vdev.has_feature(F.VIRTIO_F_RING_RESET)
    assert m.dev.negotiated(F.VIRTIO_F_RING_RESET)
    return m


def check_io_works(io: Io, first: int, count: int) -> None:
    """`count` more writes (all in flight at once), then each read back."""
    n0 = len(io.completed)
    with io.blk.plug():
        for k in range(first, first + count):
            io.write(k)
    io.wait_completed(n0 + count)
    for k in range(first, first + count):
        assert io.completed[k] == B.VIRTIO_BLK_S_OK
        assert io.disk_sector(k) == pattern(k)
    gpa, view = io.bufs[0]
    view[:] = bytes(SECTOR)
    assert io.blk.sync(B.VIRTIO_BLK_T_IN, first, [(gpa, SECTOR)]) == B.VIRTIO_BLK_S_OK
    assert bytes(view) == pattern(first)


# ---- reset / resize with requests in flight ------------------------------------------------------
@RING_KINDS
@pytest.mark.parametrize("op", ["reset", "resize"])
def test_reset_or_resize_with_requests_in_flight_loses_no_token(machine, packed, offer, op):
    """12 writes in flight on a 16-entry queue while the host is paused. The host then
    completes 3 of them (the driver collects those: completed), uses 4 more while the driver
    is held off its queue lock (used, never collected), and leaves 5 available. The reset (or
    resize to 8) runs under the queue lock, as a driver quiesces its queue first:
    - recycle receives exactly the other 9 (4 used-but-uncollected + 5 never used), and each
      of the 12 tokens came back exactly once;
    - while the recycling runs the device's queue is not ready and has no ring; afterwards it
      is ready again with a new ring object that has taken nothing yet;
    - the 5 never-used writes are never executed after the reset (their sectors stay zero).
    With IN_ORDER the device marks each batch used with one entry: the 4 used ones are one
    used entry the driver never read."""
    m = boot(machine, packed=packed, queue_size=16, offer=offer)
    assert m.vdev.features & offer == offer
    io = Io(m, 16)
    old_ready, old_ring, _ = host_queue(m)
    assert old_ready and old_ring is not None and old_ring.ring == ("packed" if packed else "split")
    m.host.set_serving(False)
    for k in range(12):
        io.write(k)
    assert io.vq.in_flight() == 12
    assert host_serve(m, 3) == 3
    io.wait_completed(3)
    during = []

    def recycle(vq, req) -> None:
        during.append(host_queue(m)[:2])
        io.recycle(vq, req)

    with m.irqc.disabled():
        assert host_serve(m, 4) == 4               # used, but the driver cannot collect them
        if op == "reset":
            assert virtqueue_reset(io.vq, recycle) == 0
        else:
            assert virtqueue_resize(io.vq, 8, recycle) == 0
    assert sorted(io.completed) == [0, 1, 2]
    assert sorted(io.recycled) == list(range(3, 12))
    io.check_each_came_back_once()
    assert during == [(False, None)] * 9
    ready, ring, num = host_queue(m)
    assert ready and ring is not None and ring is not old_ring
    assert ring.n_popped == 0 and ring.last_avail_idx == 0
    want = 16 if op == "reset" else 8
    assert num == ring.num == io.vq.num == want
    assert io.vq.num_free == want
    # the device executed exactly the 7 it took before the reset
    for k in range(12):
        assert io.disk_sector(k) == (pattern(k) if k < 7 else bytes(SECTOR)), k
    m.host.set_serving(True)
    time.sleep(0.05)                               # give a confused device time to misbehave
    for k in range(7, 12):
        assert io.disk_sector(k) == bytes(SECTOR), f"request {k} ran after the reset"
    check_io_works(io, 100, min(want, io.blk.queue_depth))
    io.check_each_came_back_once()
    assert m.dev.guest_errors == [] and m.dev.errors == []
    assert not io.vq.broken and not io.vq.reset


@RING_KINDS
def test_resizes_and_resets_under_continuous_io(machine, packed, offer):
    """A completion callback keeps 12 writes in flight (each completion submits the next)
    while the main thread resets and resizes the queue 30 times through sizes 16, 8, 4, 12
    (12 is 8 for a split ring), topping the queue up to 12 again after each (recycled
    requests, and those a smaller ring had no room for, are replaced by new ones). At the
    end every request ever submitted came back exactly once, the device took no request
    twice, and the sizes agree on both sides.
    With NOTIFICATION_DATA only the main thread submits: a kick is sent after the queue lock
    is dropped (kick_prepare under it, notify outside, as in Linux), so a completion's kick
    computed before a reset could reach the device after it, carrying a position of the old
    ring - a driver must quiesce its kicks around a queue reset, and the device rightly
    reports such a kick as inconsistent with the (new) ring."""
    m = boot(machine, packed=packed, queue_size=16, offer=offer)
    resubmit = not offer & NOTIF_DATA
    io = Io(m, 64)
    lock = threading.Lock()
    stop = threading.Event()
    counter = [0]

    def next_k() -> int:
        with lock:
            counter[0] += 1
            return counter[0]

    def submit_one() -> int:
        k = next_k()
        gpa, view = io.bufs[k % len(io.bufs)]
        view[:] = pattern(k)
        err = io.blk.write(k % 1024, [(gpa, SECTOR)], on_done, k)
        if err == 0:
            with io.cond:
                io.submitted.append(k)
        else:
            assert err == -errno.EAGAIN        # a smaller ring is full: the main loop tops up
        return err

    def top_up() -> None:
        while io.blk.in_flight() < 12 and submit_one() == 0:
            pass

    def on_done(status: int, arg: int) -> None:
        io.done(status, arg)
        if resubmit and not stop.is_set():
            submit_one()

    top_up()
    sizes = [16, 8, 4, 12]
    for i in range(30):
        for _ in range(3):
            time.sleep(0.002)
            top_up()
        with m.irqc.disabled():                    # no completion runs meanwhile
            if i % 3 == 2:
                assert virtqueue_reset(io.vq, io.recycle) == 0
            else:
                want = sizes[i % len(sizes)]
                assert virtqueue_resize(io.vq, want, io.recycle) == 0
                if not packed and want == 12:
                    want = 8
                assert io.vq.num == want
        top_up()
        _, ring, num = host_queue(m)
        assert ring is not None and ring.num == num == io.vq.num
    stop.set()
    wait_for(lambda: io.blk.in_flight() == 0, what="the last requests to complete")
    with io.cond:
        io.check_each_came_back_once()
    assert len(io.recycled) > 0 and len(io.completed) > 100
    metrics = m.host.call(lambda: m.dev.metrics.as_dict())
    # every write the device executed was a completion or a recycled used-but-uncollected one
    assert len(io.completed) <= metrics["writes"] <= len(io.completed) + len(io.recycled)
    assert m.dev.guest_errors == [] and m.dev.errors == []


# ---- resize: sizes -----------------------------------------------------------------------------
@RINGS
def test_resize_size_rules(machine, packed):
    """num_max is the device's QueueNumMax (64): above it -E2BIG, 0 or less -EINVAL, neither
    touching the queue. The same size is a no-op (no reset). A split ring rounds a size down
    to a power of two (24 -> 16); a packed ring takes it as it is (24), and both can grow
    back to num_max."""
    m = boot(machine, packed=packed, queue_size=64)
    io = Io(m, 64)
    vq = io.vq
    assert vq.num == vq.num_max == 64
    _, ring0, _ = host_queue(m)
    with m.irqc.disabled():
        assert virtqueue_resize(vq, 65, io.recycle) == -errno.E2BIG
        assert virtqueue_resize(vq, 1 << 20, io.recycle) == -errno.E2BIG
        assert virtqueue_resize(vq, 0, io.recycle) == -errno.EINVAL
        assert virtqueue_resize(vq, -4, io.recycle) == -errno.EINVAL
        assert virtqueue_resize(vq, 64, io.recycle) == 0
    assert host_queue(m)[1] is ring0 and vq.num == 64 and not vq.reset
    with m.irqc.disabled():
        assert virtqueue_resize(vq, 24, io.recycle) == 0
    want = 24 if packed else 16
    ready, ring, num = host_queue(m)
    assert ready and ring is not ring0
    assert vq.num == num == ring.num == want and vq.num_free == want
    # rounding down to the current size is a no-op for a split ring
    with m.irqc.disabled():
        assert virtqueue_resize(vq, 31 if not packed else 24, io.recycle) == 0
    assert host_queue(m)[1] is ring
    check_io_works(io, 0, min(want, io.blk.queue_depth))
    with m.irqc.disabled():
        assert virtqueue_resize(vq, 64, io.recycle) == 0
    assert vq.num == host_queue(m)[2] == 64
    check_io_works(io, 200, io.blk.queue_depth)
    assert io.recycled == []
    assert m.dev.guest_errors == []


@RINGS
def test_resize_to_one_entry(machine, packed):
    """The smallest ring: one descriptor (indirect requests take one each), one request at a
    time, still correct."""
    m = boot(machine, packed=packed, queue_size=16)
    io = Io(m, 4)
    with m.irqc.disabled():
        assert virtqueue_resize(io.vq, 1, io.recycle) == 0
    assert io.vq.num == host_queue(m)[2] == 1
    for k in range(20):
        io.write(k)
        io.wait_completed(k + 1)
    assert all(io.disk_sector(k) == pattern(k) for k in range(20))
    io.check_each_came_back_once()


# ---- other queues are not affected -------------------------------------------------------------
@RINGS
def test_reset_of_one_queue_leaves_the_other_alone(machine, packed):
    """Two request queues: queue 1 is reset with requests in flight; queue 0's ring object
    and its own requests in flight are untouched and complete once the host serves again."""
    m = boot(machine, packed=packed, queue_size=16, num_queues=2)
    io = Io(m, 16)
    blk = m.blk
    q1 = blk.queues[1]
    _, ring0, _ = host_queue(m, 0)
    m.host.set_serving(False)
    for k in range(4):
        io.write(k)                                           # queue 0
    other = []
    for k in range(4, 8):
        gpa, view = io.bufs[k]
        view[:] = pattern(k)
        assert blk.write(k, [(gpa, SECTOR)], io.done, k, qid=1) == 0
        other.append(k)
    recycled = []

    def recycle(vq, req) -> None:
        recycled.append(req.arg)
        req.callback = req.arg = None
        q1.free.append(req)

    with q1.lock:
        assert virtqueue_reset(q1.vq, recycle) == 0
    assert sorted(recycled) == other
    assert host_queue(m, 0)[1] is ring0
    m.host.set_serving(True)
    io.wait_completed(4)
    assert sorted(io.completed) == [0, 1, 2, 3]
    # queue 1 works again
    gpa, view = io.bufs[9]
    view[:] = pattern(9)
    done = threading.Event()
    assert blk.write(9, [(gpa, SECTOR)], lambda s, a: done.set(), None, qid=1) == 0
    assert done.wait(5)
    assert io.disk_sector(9) == pattern(9)
    for k in other:
        assert io.disk_sector(k) == bytes(SECTOR)
    assert m.dev.guest_errors == [] and m.dev.errors == []


# ---- the registers -----------------------------------------------------------------------------
def rd(m: Machine, reg: int) -> int:
    return m.platform.readl(MMIO_BASE + reg)


def wr(m: Machine, reg: int, value: int) -> None:
    m.platform.writel(MMIO_BASE + reg, value)


@RINGS
def test_queue_reset_without_ring_reset_is_ignored(machine, packed):
    """Without VIRTIO_F_RING_RESET negotiated a QueueReset write is a guest error and
    changes nothing; the guest's virtqueue_reset / _resize refuse with -ENOENT before they
    touch the device."""
    m = machine(dev_kw=dict(packed=packed, withhold=RING_RESET))
    assert m.boot() == 0
    assert not m.vdev.has_feature(F.VIRTIO_F_RING_RESET)
    io = Io(m, 4)
    _, ring0, _ = host_queue(m)
    wr(m, M.QUEUE_SEL, 0)
    wr(m, M.QUEUE_RESET, 1)
    assert any("QueueReset without VIRTIO_F_RING_RESET" in e for e in m.dev.guest_errors)
    assert rd(m, M.QUEUE_READY) == 1
    assert host_queue(m)[:2] == (True, ring0)
    n_err = len(m.dev.guest_errors)
    with m.irqc.disabled():
        assert virtqueue_reset(io.vq, io.recycle) == -errno.ENOENT
        assert virtqueue_resize(io.vq, 8, io.recycle) == -errno.ENOENT
    assert len(m.dev.guest_errors) == n_err
    assert host_queue(m)[:2] == (True, ring0) and io.vq.num == 16
    check_io_works(io, 0, 4)
    assert m.dev.errors == []


@RINGS
def test_queue_reset_registers(machine, packed):
    """By hand, register by register (spec 4.2.2): with the queue live (resized to 8) and
    requests available, QueueReset=1 resets it; QueueReset then reads 0 (done), QueueReady 0,
    and the device's queue size is back at its default. The
    queue registers may be written again while DRIVER_OK (no guest error); QueueReady stays 0
    until written 1; then the queue serves new requests and never the old ones."""
    m = boot(machine, packed=packed, queue_size=16)
    io = Io(m, 8)
    vq = io.vq
    with m.irqc.disabled():
        assert virtqueue_resize(vq, 8, io.recycle) == 0
    _, ring0, num0 = host_queue(m)
    assert num0 == 8
    m.host.set_serving(False)
    for k in range(3):
        io.write(k)
    with m.irqc.disabled():
        wr(m, M.QUEUE_SEL, 0)
        wr(m, M.QUEUE_RESET, 1)
        assert rd(m, M.QUEUE_RESET) == 0
        assert rd(m, M.QUEUE_READY) == 0
        # the queue is forgotten; its size is back at the default (QueueNumMax)
        assert host_queue(m) == (False, None, 16)
        assert rd(m, M.QUEUE_NUM_MAX) == 16
        assert m.host_status() & S.DRIVER_OK
        # the driver takes its buffers back and empties its ring
        while (req := vq.detach_unused_buf()) is not None:
            io.recycle(vq, req)
        vq.reinit()
        wr(m, M.QUEUE_NUM, vq.num)
        for lo, addr in ((M.QUEUE_DESC_LOW, vq.desc_addr), (M.QUEUE_DRIVER_LOW, vq.avail_addr),
                         (M.QUEUE_DEVICE_LOW, vq.used_addr)):
            wr(m, lo, addr & 0xFFFFFFFF)
            wr(m, lo + 4, addr >> 32)
        assert rd(m, M.QUEUE_READY) == 0
        assert host_queue(m)[:2] == (False, None)
        wr(m, M.QUEUE_READY, 1)
        assert rd(m, M.QUEUE_READY) == 1
    assert m.dev.guest_errors == []
    ready, ring, _ = host_queue(m)
    assert ready and ring is not None and ring is not ring0
    assert sorted(io.recycled) == [0, 1, 2]
    m.host.set_serving(True)
    check_io_works(io, 10, 4)
    io.check_each_came_back_once()
    assert all(io.disk_sector(k) == bytes(SECTOR) for k in range(3))


def test_queue_registers_are_locked_while_the_queue_is_ready(machine):
    """Without a reset, queue registers written while the queue is ready are guest errors and
    ignored; QueueReset of a queue that does not exist is a guest error too."""
    m = boot(machine, queue_size=16)
    io = Io(m, 4)
    wr(m, M.QUEUE_SEL, 0)
    wr(m, M.QUEUE_NUM, 8)
    wr(m, M.QUEUE_DESC_LOW, 0x1000)
    assert [e for e in m.dev.guest_errors if "while queue 0 is ready" in e] != []
    assert host_queue(m)[2] == 16
    n = len(m.dev.guest_errors)
    wr(m, M.QUEUE_SEL, 5)
    wr(m, M.QUEUE_RESET, 1)
    assert len(m.dev.guest_errors) == n + 1 and "does not exist" in m.dev.guest_errors[-1]
    assert rd(m, M.QUEUE_READY) == 0
    wr(m, M.QUEUE_SEL, 0)
    assert rd(m, M.QUEUE_READY) == 1
    check_io_works(io, 0, 4)


@RINGS
def test_guest_transport_reset_ops(machine, packed):
    """The guest's transport ops (disable_vq_and_reset / enable_vq_after_reset) leave the
    registers as the spec says between the two, and enable refuses a queue not reset."""
    m = boot(machine, packed=packed, queue_size=16)
    io = Io(m, 4)
    vq = io.vq
    with m.irqc.disabled():
        assert m.vm.enable_vq_after_reset(vq) == -errno.EBUSY       # not reset
        assert m.vm.disable_vq_and_reset(vq) == 0
        assert vq.reset
        wr(m, M.QUEUE_SEL, 0)
        assert (rd(m, M.QUEUE_RESET), rd(m, M.QUEUE_READY)) == (0, 0)
        vq.reinit()
        assert m.vm.enable_vq_after_reset(vq) == 0
        assert not vq.reset
        assert (rd(m, M.QUEUE_RESET), rd(m, M.QUEUE_READY)) == (0, 1)
    check_io_works(io, 0, 4)
    assert m.dev.guest_errors == []
