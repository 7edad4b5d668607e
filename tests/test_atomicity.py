"""DESIGN.md, memory ordering and atomicity: every ring field the other side may read while it is
being written is stored and loaded with one aligned native access, so a reader never sees half
of an old value and half of a new one.

Each test runs a writer and a reader in two processes (fork) over guest RAM that is a real
POSIX shared-memory object, as the guest and host processes share it. The writer stores a ring
field through the real code path of the side that owns it (driver: add_sgs /
detach_unused_buf, disable_cb / enable_cb_prepare; device: push, enable_notify), flipping it
between values that differ in both bytes; the reader loads it through the other side's real
view for about a second, millions of times, and every value it sees must be one that was
written. The values are chosen so that a torn 16-bit access would show as a value never
written (0x00FF <-> 0x0100 tears to 0x0000 or 0x01FF; 0xFFFF <-> 0x0000 to 0x00FF or 0xFF00).
CPython's struct zero-fills the field before writing its bytes, so pairs whose values are both
nonzero (0x00FF / 0x0100, 0x00FF / 0xFF00) also catch a writer that tears that way: a store
that regressed to struct.pack_into fails these tests (checked by hand).

For contrast (reported, never asserted: it is probabilistic) a writer using struct.pack_into,
which CPython performs a byte at a time, is run against the same reader.
"""

import functools
import mmap
import multiprocessing as mp
import os
import secrets
import time
import traceback

import pytest

from vmsim.abi import features as F
from vmsim.abi import split_ring as R
from vmsim.guest.memory import DmaMemory, GuestRAM
from vmsim.guest.virtio.vring import vring_create_virtqueue
from vmsim.host.memory import GuestMemory
from vmsim.host.virtio.queue_split import SplitQueue
from vmsim.machine import shm

pytestmark = [pytest.mark.timeout(60), pytest.mark.multiprocess]

CTX = mp.get_context("fork")
BASE = 0x4000_0000
RAM = 1 << 20
NUM = 8
DURATION = 1.0          # seconds the reader reads for
BURST = 256             # writer iterations between checks of the stop flag
MIN_CHANGES = 20        # the reader must see the value change at least this often


class Shared:
    """Guest RAM as one named POSIX shm object, with both sides of one split ring over it."""

    def __init__(self, event: bool = True) -> None:
        self.name = f"/vmsim-{os.getpid()}-{secrets.token_hex(3)}-atomicity"
        shm.create(self.name, RAM)
        try:
            self.mm = shm.open_map(self.name)
        except BaseException:
            shm.unlink(self.name)
            raise
        feats = F.bit(F.VIRTIO_F_VERSION_1)
        if event:
            feats |= F.bit(F.VIRTIO_RING_F_EVENT_IDX)
        self.ram = GuestRAM(self.mm, BASE)
        self.dma = DmaMemory(self.ram)
        self.vq = vring_create_virtqueue(0, NUM, 4, self.dma, feats, lambda vq: True,
                                               lambda vq: None, "atomicity")
        self.mem = GuestMemory(self.mm, BASE)
        self.dev = SplitQueue(self.mem, NUM, self.vq.desc_addr, self.vq.avail_addr,
                              self.vq.used_addr, event, False)
        self.buf, _ = self.dma.alloc(64)

    def round_trips(self, n: int) -> None:
        """Move every index forward by n with complete round trips through the real code."""
        vq, dev = self.vq, self.dev
        for i in range(n):
            assert vq.add_outbuf([(self.buf, 8)], i + 1) == 0
            vq.kick_prepare()
            chain = dev.pop()
            dev.push(chain.head, 0)
            dev.need_notify()
            assert vq.get_buf() == (i + 1, 0)

    def close(self) -> None:
        shm.unlink(self.name)
        self.vq.release()
        self.dev.release()
        try:
            self.mem.release()
            self.ram.release()
            self.mm.close()
        except BufferError:
            pass


@pytest.fixture
def shared():
    s = Shared()
    yield s
    s.close()


# ---- the two processes --------------------------------------------------------------------------


def _writer_main(burst, go, stop, conn) -> None:
    try:
        go.wait(10)
        n = 0
        while not stop.is_set():
            burst()
            n += BURST
        conn.send(("ok", n))
    except BaseException:
        conn.send(("error", traceback.format_exc()))


def _reader_main(read, allowed, go, stop, conn) -> None:
    try:
        go.wait(10)
        bad: dict[int, int] = {}
        reads = changes = 0
        last = read()
        if last not in allowed:
            bad[last] = 1
        end = time.monotonic() + DURATION
        while True:
            for _ in range(8192):
                v = read()
                if v != last:
                    changes += 1
                    last = v
                    if v not in allowed:
                        bad[v] = bad.get(v, 0) + 1
            reads += 8192
            if time.monotonic() >= end:
                break
        stop.set()
        conn.send(("ok", reads, changes, bad))
    except BaseException:
        stop.set()
        conn.send(("error", traceback.format_exc()))


def race(burst, read, allowed) -> tuple[int, int, dict[int, int], int]:
    """Run `burst` (the writer) and `read` (the reader) in two forked processes; returns
    (reads, changes seen, values read that were never written, writes)."""
    go, stop = CTX.Event(), CTX.Event()
    r_recv, r_send = CTX.Pipe(duplex=False)
    w_recv, w_send = CTX.Pipe(duplex=False)
    writer = CTX.Process(target=_writer_main, args=(burst, go, stop, w_send), daemon=True)
    reader = CTX.Process(target=_reader_main, args=(read, frozenset(allowed), go, stop, r_send),
                         daemon=True)
    procs = [writer, reader]
    try:
        for p in procs:
            p.start()
        go.set()
        assert r_recv.poll(DURATION + 30), "the reader process did not report"
        rres = r_recv.recv()
        stop.set()
        assert w_recv.poll(30), "the writer process did not report"
        wres = w_recv.recv()
        assert rres[0] == "ok", rres[1]
        assert wres[0] == "ok", wres[1]
        for p in procs:
            p.join(10)
            assert p.exitcode == 0
        _, reads, changes, bad = rres
        return reads, changes, bad, wres[1]
    finally:
        stop.set()
        for p in procs:
            if p.is_alive():
                p.kill()
            if p.pid is not None:
                p.join(5)
        for c in (r_recv, r_send, w_recv, w_send):
            c.close()


def check(result, what: str, record) -> None:
    reads, changes, bad, writes = result
    record(what, f"{reads} reads, {changes} changes seen, {writes} writer iterations, torn: {bad}")
    assert reads >= 1_000_000
    assert changes >= MIN_CHANGES, "the writer and reader did not overlap"
    assert not bad, f"{what}: torn values read: " + ", ".join(
        f"0x{v:04x} x{n}" for v, n in sorted(bad.items()))


# ---- avail idx: driver writes, device reads -----------------------------------------------------


@pytest.mark.parametrize("start", [0x00FF, 0xFFFF], ids=["0x00ff-0x0100", "0xffff-0x0000"])
def test_avail_idx_from_add_and_detach(shared, start, record_property):
    """The driver's add_sgs publishes avail idx start+1; detach_unused_buf takes it back to
    start. The device reads it with SplitQueue.avail_idx()."""
    shared.round_trips(start)
    vq, dev = shared.vq, shared.dev
    assert dev.avail_idx() == start
    sg = [(shared.buf, 8)]

    def burst():
        add, detach = vq.add_outbuf, vq.detach_unused_buf
        for _ in range(BURST):
            add(sg, 7)
            detach()

    new = (start + 1) & 0xFFFF
    check(race(burst, dev.avail_idx, {start, new}), "avail idx", record_property)
    assert dev.avail_idx() in (start, new)


def test_avail_idx_store_both_bytes_flip(shared, record_property):
    """The store statement the driver publishes with (avail_h[AVAIL_H_IDX] = shadow, through
    the driver's own view) alternating 0x00FF / 0xFF00: every bit of both bytes changes."""
    avail = shared.vq.avail_h
    at = R.AVAIL_H_IDX
    avail[at] = 0x00FF

    def burst():
        for _ in range(BURST):
            avail[at] = 0xFF00
            avail[at] = 0x00FF

    check(race(burst, shared.dev.avail_idx, {0x00FF, 0xFF00}), "avail idx", record_property)


# ---- used idx: device writes, driver reads ------------------------------------------------------


@pytest.mark.parametrize("start", [0x00FE, 0xFFFE], ids=["0x00ff-0x0100", "0xffff-0x0000"])
def test_used_idx_from_push(shared, start, record_property):
    """The device's push publishes used idx start+1 then start+2; the driver reads it through
    its used_h view, as more_used() / get_buf() do. Between pairs the writer winds back the
    device's private shadow (last_used_idx), so every store is push's own."""
    dev, vq = shared.dev, shared.vq
    dev.last_used_idx = start
    dev.push(0, 0)
    one, two = (start + 1) & 0xFFFF, (start + 2) & 0xFFFF
    assert vq.used_h[R.USED_H_IDX] == one

    def burst():
        push = dev.push
        for _ in range(BURST):
            dev.last_used_idx = start
            push(0, 0)          # publishes start + 1
            push(0, 0)          # publishes start + 2

    read = functools.partial(vq.used_h.__getitem__, R.USED_H_IDX)
    check(race(burst, read, {one, two}), "used idx", record_property)


# ---- event index words --------------------------------------------------------------------------


def test_used_event_from_callbacks(shared, record_property):
    """The driver's enable_cb_prepare writes used_event = last_used_idx (0x00FF after real round
    trips) and enable_cb_delayed writes last_used_idx + 3/4 of the two outstanding buffers
    (0x0100); the device reads used_event through the view need_notify() uses."""
    shared.round_trips(0x00FF)
    vq, dev = shared.vq, shared.dev
    for tok in (1, 2):
        assert vq.add_outbuf([(shared.buf, 8)], tok) == 0
    assert vq.enable_cb_delayed() is True
    assert dev.avail_h[dev.used_event_at] == 0x0100
    assert vq.enable_cb_prepare() == 0x00FF
    assert dev.avail_h[dev.used_event_at] == 0x00FF

    def burst():
        prepare, delayed = vq.enable_cb_prepare, vq.enable_cb_delayed
        for _ in range(BURST):
            delayed()
            prepare()

    read = functools.partial(dev.avail_h.__getitem__, dev.used_event_at)
    check(race(burst, read, {0x00FF, 0x0100}), "used_event", record_property)


def test_used_event_from_disable_cb(shared, record_property):
    """disable_cb's used_event store (0, with EVENT_IDX) against enable_cb_prepare's (0x0101)."""
    shared.round_trips(0x0101)
    vq, dev = shared.vq, shared.dev
    assert dev.avail_h[dev.used_event_at] == 0x0101

    def burst():
        disable, enable = vq.disable_cb, vq.enable_cb_prepare
        for _ in range(BURST):
            disable()
            enable()

    read = functools.partial(dev.avail_h.__getitem__, dev.used_event_at)
    check(race(burst, read, {0x0000, 0x0101}), "used_event", record_property)


def test_avail_event_from_enable_notify(shared, record_property):
    """The device's enable_notify writes avail_event = its last_avail_idx (EVENT_IDX); the
    driver reads it through the view kick_prepare() uses. The writer sets the device's private
    last_avail_idx to 0x00FF / 0xFF00 before each call."""
    vq, dev = shared.vq, shared.dev
    dev.last_avail_idx = 0x00FF
    dev.enable_notify()
    assert vq.used_h[vq.avail_event_at] == 0x00FF

    def burst():
        enable = dev.enable_notify
        for _ in range(BURST):
            dev.last_avail_idx = 0x00FF
            enable()
            dev.last_avail_idx = 0xFF00
            enable()

    read = functools.partial(vq.used_h.__getitem__, vq.avail_event_at)
    check(race(burst, read, {0x00FF, 0xFF00}), "avail_event", record_property)


# ---- contrast: struct.pack_into is not one store ------------------------------------------------


def test_struct_pack_into_writer_for_contrast(shared, record_property, capsys):
    """What the rule protects against: the same race with the writer using struct.pack_into.
    Torn values are counted and reported only (they are likely, not certain)."""
    import struct

    mm: mmap.mmap = shared.mm
    off = shared.vq.avail_addr - BASE + 2
    pack = struct.Struct("<H").pack_into
    pack(mm, off, 0x00FF)

    def burst():
        for _ in range(BURST):
            pack(mm, off, 0xFF00)
            pack(mm, off, 0x00FF)

    reads, changes, bad, _ = race(burst, shared.dev.avail_idx, {0x00FF, 0xFF00})
    torn = sum(bad.values())
    msg = (f"struct.pack_into writer: {torn} torn reads in {reads} "
           f"({changes} changes seen): " + ", ".join(f"0x{v:04x} x{n}"
                                                    for v, n in sorted(bad.items())))
    record_property("struct contrast", msg)
    with capsys.disabled():
        print("\n" + msg)
    assert reads >= 1_000_000
