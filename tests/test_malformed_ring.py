"""Malformed split rings written by hand, and the device error each one is.

Every descriptor, avail entry and index here is written with struct straight into the
mapping that stands for guest RAM, as a buggy or hostile driver could; no driver code runs.
The device side (vmsim.host.virtio.queue_split.SplitQueue) must refuse each with a RingError
carrying the specific Reason, without consuming the chain and without touching anything
outside guest RAM. One level up, the device model (a real BlkDevice) must turn that error into
virtio_error: DEVICE_NEEDS_RESET, a config-change interrupt, the queue broken, nothing raised.
"""

import mmap
import struct

import pytest

from vmsim.abi import blk as B
from vmsim.abi import features as F
from vmsim.abi import status as S
from vmsim.host.devices.blk.backend import MemoryBackend
from vmsim.host.devices.blk.device import BlkDevice
from vmsim.host.memory import GuestMemory
from vmsim.host.virtio.chain import indirect_table_max
from vmsim.host.virtio.errors import Reason, RingError
from vmsim.host.virtio.queue_split import SplitQueue

BASE = 0x4000_0000
RAM = 0x10000                 # 64 KiB of guest RAM at BASE
END = BASE + RAM
NUM = 8
DESC = BASE + 0x1000          # ring areas (spec alignments: 16, 2, 4)
AVAIL = BASE + 0x2000
USED = BASE + 0x3000
TABLE = BASE + 0x4000         # an indirect table
TABLE2 = BASE + 0x5000
BUF = BASE + 0x8000           # buffers

NEXT, WRITE, INDIRECT = 1, 2, 4


class HandRing:
    """Guest RAM and a device queue over it; the ring is written by hand."""

    def __init__(self, num: int = NUM, indirect: bool = True, event_idx: bool = False,
                 ram: int = RAM) -> None:
        self.num = num
        self.mm = mmap.mmap(-1, ram)
        self.mem = GuestMemory(self.mm, BASE)
        self.q = SplitQueue(self.mem, num, DESC, AVAIL, USED, event_idx, indirect)
        self.idx = 0

    def desc(self, i: int, addr: int, ln: int, flags: int = 0, nxt: int = 0,
             table: int = DESC) -> None:
        struct.pack_into("<QIHH", self.mm, table - BASE + 16 * i, addr, ln, flags, nxt)

    def set_avail_idx(self, v: int) -> None:
        struct.pack_into("<H", self.mm, AVAIL - BASE + 2, v & 0xFFFF)

    def put_avail(self, slot: int, head: int) -> None:
        struct.pack_into("<H", self.mm, AVAIL - BASE + 4 + 2 * (slot % self.num), head)

    def publish(self, *heads: int) -> None:
        for h in heads:
            self.put_avail(self.idx, h)
            self.idx = (self.idx + 1) & 0xFFFF
        self.set_avail_idx(self.idx)

    def used_idx(self) -> int:
        return struct.unpack_from("<H", self.mm, USED - BASE + 2)[0]

    def close(self) -> None:
        self.q.release()
        self.mem.release()
        try:
            self.mm.close()
        except BufferError:
            pass


@pytest.fixture
def ring():
    r = HandRing()
    yield r
    r.close()


def expect(r: HandRing, reason: Reason) -> RingError:
    """pop() refuses with `reason` and consumes nothing."""
    last, inflight = r.q.last_avail_idx, r.q.inflight
    with pytest.raises(RingError) as ei:
        r.q.pop()
    assert ei.value.reason is reason, ei.value
    assert str(ei.value).startswith(reason.value)
    assert r.q.last_avail_idx == last
    assert r.q.inflight == inflight
    return ei.value


# ---- a well-formed control ----------------------------------------------------------------------


def test_well_formed_chain_is_accepted(ring):
    ring.desc(0, BUF, 16, NEXT, 1)
    ring.desc(1, BUF + 0x100, 512, NEXT | WRITE, 2)
    ring.desc(2, BUF + 0x400, 1, WRITE)
    ring.publish(0)
    c = ring.q.pop()
    assert (c.head, c.rlen, c.wlen, c.ndescs) == (0, 16, 513, 3)
    assert c.r_off == [BUF - BASE] and c.w_off == [BUF + 0x100 - BASE, BUF + 0x400 - BASE]
    assert ring.q.pop() is None


def test_buffers_exactly_at_the_edges_of_ram_are_accepted(ring):
    ring.desc(0, BASE, 1, NEXT, 1)                  # the first byte of RAM
    ring.desc(1, END - 16, 16, WRITE)               # ends on the last byte
    ring.publish(0)
    c = ring.q.pop()
    assert c.r_off == [0] and c.w_off == [RAM - 16]


# ---- avail ring and heads -----------------------------------------------------------------------


def test_avail_idx_too_far_ahead(ring):
    ring.desc(0, BUF, 8)
    for s in range(NUM):
        ring.put_avail(s, 0)
    ring.set_avail_idx(NUM + 1)
    expect(ring, Reason.INVALID_AVAIL_IDX)


def test_avail_idx_exactly_queue_size_ahead_is_fine(ring):
    for i in range(NUM):
        ring.desc(i, BUF + 16 * i, 8)
    ring.publish(*range(NUM))
    assert [ring.q.pop().head for _ in range(NUM)] == list(range(NUM))


def test_avail_idx_moved_backwards(ring):
    ring.desc(0, BUF, 8)
    ring.publish(0)
    assert ring.q.pop() is not None
    ring.set_avail_idx(0)                           # 0 - 1 = 0xFFFF ahead
    expect(ring, Reason.INVALID_AVAIL_IDX)


def test_avail_idx_too_far_ahead_across_the_wrap():
    r = HandRing(num=4, indirect=False)
    try:
        # bring the device to last_avail_idx 0xFFFE with real pops of one reused chain
        r.desc(0, BUF, 8)
        for _ in range(0xFFFE):
            r.publish(0)
            c = r.q.pop()
            r.q.push(c.head, 0)
        assert r.q.last_avail_idx == 0xFFFE
        r.set_avail_idx(0xFFFE + 4)                 # 2 after the wrap: 4 ahead, fine
        for s in range(4):
            r.put_avail(0xFFFE + s, 0)
        for _ in range(4):                          # consume what was published
            assert r.q.pop().head == 0
            r.q.push(0, 0)
        assert r.q.last_avail_idx == 2
        # Like vhost, the device re-reads avail->idx once what it saw is consumed, and checks
        # the new value against where it is then.
        r.set_avail_idx(2 + 5)                      # 5 ahead of 2 (0x10002), past the wrap
        expect(r, Reason.INVALID_AVAIL_IDX)
    finally:
        r.close()


@pytest.mark.parametrize("head", [NUM, NUM + 1, 0xFFFF])
def test_head_out_of_range(ring, head):
    ring.publish(head)
    expect(ring, Reason.INVALID_HEAD)


def test_too_many_in_flight(ring):
    """The driver publishes more chains than the ring can hold in flight: 2*NUM entries,
    each within NUM of the device's position when it is read."""
    ring.desc(0, BUF, 8)
    for _ in range(NUM):
        ring.publish(0)
    for _ in range(NUM):
        assert ring.q.pop() is not None             # never pushed back
    ring.publish(0)
    expect(ring, Reason.TOO_MANY_IN_FLIGHT)
    ring.q.push(0, 0)                               # one comes back: room for one more
    assert ring.q.pop() is not None


# ---- chain walking ------------------------------------------------------------------------------


@pytest.mark.parametrize("nxt", [NUM, NUM + 7, 0xFFFF])
def test_next_out_of_range(ring, nxt):
    ring.desc(0, BUF, 8, NEXT, 1)
    ring.desc(1, BUF, 8, NEXT, nxt)
    ring.publish(0)
    expect(ring, Reason.INVALID_NEXT)


def test_next_out_of_range_inside_indirect_table(ring):
    ring.desc(0, TABLE, 3 * 16, INDIRECT)
    ring.desc(0, BUF, 8, NEXT, 1, table=TABLE)
    ring.desc(1, BUF, 8, NEXT, 3, table=TABLE)      # the table has 3 entries: 0..2
    ring.desc(2, BUF, 8, WRITE, table=TABLE)
    ring.publish(0)
    expect(ring, Reason.INVALID_NEXT)


@pytest.mark.parametrize("shape", ["self", "two", "full"])
def test_loop_is_chain_too_long(ring, shape):
    if shape == "self":
        ring.desc(3, BUF, 8, NEXT, 3)
        head = 3
    elif shape == "two":
        ring.desc(0, BUF, 8, NEXT, 1)
        ring.desc(1, BUF, 8, NEXT, 0)
        head = 0
    else:                                           # every descriptor, then back to the head
        for i in range(NUM):
            ring.desc(i, BUF, 8, NEXT, (i + 1) % NUM)
        head = 0
    ring.publish(head)
    expect(ring, Reason.CHAIN_TOO_LONG)


def test_chain_using_every_descriptor_is_not_too_long(ring):
    for i in range(NUM - 1):
        ring.desc(i, BUF, 8, NEXT, i + 1)
    ring.desc(NUM - 1, BUF, 8)
    ring.publish(0)
    assert ring.q.pop().ndescs == NUM


def test_loop_inside_indirect_table(ring):
    ring.desc(0, TABLE, 2 * 16, INDIRECT)
    ring.desc(0, BUF, 8, NEXT, 1, table=TABLE)
    ring.desc(1, BUF, 8, NEXT, 0, table=TABLE)
    ring.publish(0)
    expect(ring, Reason.CHAIN_TOO_LONG)


def test_readable_after_writable(ring):
    ring.desc(0, BUF, 8, NEXT, 1)
    ring.desc(1, BUF + 8, 8, WRITE | NEXT, 2)
    ring.desc(2, BUF + 16, 8)
    ring.publish(0)
    expect(ring, Reason.READABLE_AFTER_WRITABLE)


def test_readable_after_writable_inside_indirect_table(ring):
    ring.desc(0, TABLE, 2 * 16, INDIRECT)
    ring.desc(0, BUF, 8, WRITE | NEXT, 1, table=TABLE)
    ring.desc(1, BUF, 8, 0, table=TABLE)
    ring.publish(0)
    expect(ring, Reason.READABLE_AFTER_WRITABLE)


def test_readable_in_indirect_table_after_writable_direct_descriptor(ring):
    ring.desc(0, BUF, 8, WRITE | NEXT, 1)
    ring.desc(1, TABLE, 16, INDIRECT)
    ring.desc(0, BUF, 8, 0, table=TABLE)
    ring.publish(0)
    expect(ring, Reason.READABLE_AFTER_WRITABLE)


@pytest.mark.parametrize("where", ["head", "middle", "indirect"])
def test_zero_length(ring, where):
    if where == "head":
        ring.desc(0, BUF, 0)
    elif where == "middle":
        ring.desc(0, BUF, 8, NEXT, 1)
        ring.desc(1, BUF, 0, WRITE | NEXT, 2)
        ring.desc(2, BUF, 8, WRITE)
    else:
        ring.desc(0, TABLE, 32, INDIRECT)
        ring.desc(0, BUF, 8, NEXT, 1, table=TABLE)
        ring.desc(1, BUF, 0, WRITE, table=TABLE)
    ring.publish(0)
    expect(ring, Reason.ZERO_LENGTH)


@pytest.mark.parametrize("addr,ln", [
    (END, 1),                                   # just past RAM
    (END - 8, 9),                               # straddles the end
    (BASE - 1, 1),                              # just below RAM
    (BASE - 8, 16),                             # straddles the base
    (0, 8),                                     # guest-physical 0, below the RAM base
    (2**64 - 8, 16),                            # addr + len overflows 64 bits
    (2**64 - 1, 0xFFFFFFFF),
    (BASE, 0xFFFFFFFF),                         # length larger than RAM
    (BASE + 0x100, RAM),                        # one byte too long
], ids=["past-end", "straddle-end", "below-base", "straddle-base", "zero", "overflow",
        "max", "huge-len", "one-too-long"])
def test_address_out_of_range(ring, addr, ln):
    ring.desc(0, BUF, 8, NEXT, 1)
    ring.desc(1, addr, ln, WRITE)
    ring.publish(0)
    expect(ring, Reason.ADDRESS_OUT_OF_RANGE)


def test_address_out_of_range_inside_indirect_table(ring):
    ring.desc(0, TABLE, 16, INDIRECT)
    ring.desc(0, END, 16, WRITE, table=TABLE)
    ring.publish(0)
    expect(ring, Reason.ADDRESS_OUT_OF_RANGE)


def test_chain_too_big():
    """More than 2^32 bytes in one chain: 258 entries of almost 16 MiB each, every one inside
    RAM (the same bytes named again and again, which nothing forbids)."""
    ram = 16 << 20
    r = HandRing(ram=ram)
    try:
        n = 0xFFFFFFFF // (ram - 0x10000) + 1
        assert n * (ram - 0x10000) > 0xFFFFFFFF
        big = BASE + 0x10000
        r.desc(0, big - 0x8000, 16 * n, INDIRECT)      # the table, below the big buffer
        for j in range(n):
            r.desc(j, big, ram - 0x10000, WRITE | (NEXT if j < n - 1 else 0), j + 1,
                   table=big - 0x8000)
        r.publish(0)
        expect(r, Reason.CHAIN_TOO_BIG)
        # one entry fewer stays under 2^32 and is accepted
        r2 = HandRing(ram=ram)
        try:
            m = 0xFFFFFFFF // (ram - 0x10000)
            r2.desc(0, big - 0x8000, 16 * m, INDIRECT)
            for j in range(m):
                r2.desc(j, big, ram - 0x10000, WRITE | (NEXT if j < m - 1 else 0), j + 1,
                        table=big - 0x8000)
            r2.publish(0)
            assert r2.q.pop().wlen == m * (ram - 0x10000) <= 0xFFFFFFFF
        finally:
            r2.close()
    finally:
        r.close()


# ---- three-descriptor chains (the shape of a block request) -------------------------------------
# A chain of three consecutive direct descriptors is the common case and may be read by a
# faster path on the device; each malformation must still be refused with its own reason, and
# well-formed ones accepted with the exact segments, wherever the chain sits in the table.

R_, W_ = 0, WRITE
THREE_HEADS = [0, NUM - 3, NUM - 2]     # NUM - 2: the chain wraps to descriptor 0


def _three(r, head, flags=(NEXT, NEXT | W_, W_), lens=(16, 512, 1),
           addrs=(BUF, BUF + 0x200, BUF + 0x400), nexts=None):
    ids = [head, (head + 1) % NUM, (head + 2) % NUM]
    nexts = nexts or (ids[1], ids[2], 0)
    for k in range(3):
        r.desc(ids[k], addrs[k], lens[k], flags[k], nexts[k])
    r.publish(head)
    return ids


@pytest.mark.parametrize("head", THREE_HEADS)
@pytest.mark.parametrize("dirs", ["RRR", "RRW", "RWW", "WWW"])
def test_three_descriptor_chain_accepted(ring, head, dirs):
    fl = [WRITE if d == "W" else 0 for d in dirs]
    flags = (fl[0] | NEXT, fl[1] | NEXT, fl[2])
    lens = (16, 512, 3)
    addrs = (BUF, BUF + 0x200, END - 3)
    _three(ring, head, flags, lens, addrs)
    c = ring.q.pop()
    segs = list(zip([a - BASE for a in addrs], lens, strict=True))
    nr = dirs.count("R")
    assert c.head == head and c.ndescs == 3
    assert list(zip(c.r_off, c.r_len, strict=True)) == segs[:nr]
    assert list(zip(c.w_off, c.w_len, strict=True)) == segs[nr:]
    assert (c.rlen, c.wlen) == (sum(lens[:nr]), sum(lens[nr:]))
    # the chain object is refilled correctly when the head is used again with another shape
    ring.q.push(c.head, 0)
    _three(ring, head, (NEXT, NEXT, 0), (1, 2, 3), (BUF, BUF + 1, BUF + 2))
    c = ring.q.pop()
    assert (c.r_len, c.w_len, c.rlen, c.wlen) == ([1, 2, 3], [], 6, 0)


@pytest.mark.parametrize("nexts", [(1, 5), (4, 2), (6, 7), (1, 0)], ids=str)
def test_three_descriptor_chain_follows_next_not_position(ring, nexts):
    """A chain whose links are not consecutive is read along its next fields, even when the
    descriptors right after the head hold other, valid-looking buffers."""
    for i in range(NUM):
        ring.desc(i, BUF + 0x100 * i, 0x10 + i, WRITE)          # decoys that end a chain
    n1, n2 = nexts
    head = 3 if 0 in nexts else 0
    ring.desc(head, BUF + 0x1000, 16, NEXT, n1)
    ring.desc(n1, BUF + 0x2000, 32, NEXT | WRITE, n2)
    ring.desc(n2, BUF + 0x3000, 1, WRITE)
    ring.publish(head)
    c = ring.q.pop()
    assert c.head == head and c.ndescs == 3
    assert c.r_off == [BUF + 0x1000 - BASE] and c.r_len == [16]
    assert c.w_off == [BUF + 0x2000 - BASE, BUF + 0x3000 - BASE] and c.w_len == [32, 1]


THREE_BAD = {
    "zero-len-0": (dict(lens=(0, 512, 1)), Reason.ZERO_LENGTH),
    "zero-len-1": (dict(lens=(16, 0, 1)), Reason.ZERO_LENGTH),
    "zero-len-2": (dict(lens=(16, 512, 0)), Reason.ZERO_LENGTH),
    "past-end-0": (dict(addrs=(END - 8, BUF, BUF)), Reason.ADDRESS_OUT_OF_RANGE),
    "past-end-1": (dict(addrs=(BUF, END, BUF)), Reason.ADDRESS_OUT_OF_RANGE),
    "past-end-2": (dict(addrs=(BUF, BUF, END)), Reason.ADDRESS_OUT_OF_RANGE),
    "below-base-1": (dict(addrs=(BUF, BASE - 0x100, BUF)), Reason.ADDRESS_OUT_OF_RANGE),
    "overflow-2": (dict(addrs=(BUF, BUF, 2**64 - 1)), Reason.ADDRESS_OUT_OF_RANGE),
    "W-R-R": (dict(flags=(NEXT | W_, NEXT, 0)), Reason.READABLE_AFTER_WRITABLE),
    "R-W-R": (dict(flags=(NEXT, NEXT | W_, 0)), Reason.READABLE_AFTER_WRITABLE),
    "W-W-R": (dict(flags=(NEXT | W_, NEXT | W_, 0)), Reason.READABLE_AFTER_WRITABLE),
    "W-R-W": (dict(flags=(NEXT | W_, NEXT, W_)), Reason.READABLE_AFTER_WRITABLE),
    "indirect-next-0": (dict(flags=(NEXT | INDIRECT, NEXT, W_)), Reason.INDIRECT_WITH_NEXT),
    "indirect-next-1": (dict(flags=(NEXT, NEXT | INDIRECT, W_)), Reason.INDIRECT_WITH_NEXT),
    "last-has-bad-next": (dict(flags=(NEXT, NEXT | W_, NEXT | W_), nexts=(None, None, NUM)),
                          Reason.INVALID_NEXT),
    "last-loops-to-head": (dict(flags=(NEXT | W_, NEXT | W_, NEXT | W_),
                                nexts=(None, None, "head")),
                           Reason.CHAIN_TOO_LONG),
    "first-next-out": (dict(nexts=(NUM + 1, None, None)), Reason.INVALID_NEXT),
}


@pytest.mark.parametrize("head", THREE_HEADS)
@pytest.mark.parametrize("case", sorted(THREE_BAD))
def test_three_descriptor_chain_refused(ring, head, case):
    kw, reason = THREE_BAD[case]
    kw = dict(kw)
    if "nexts" in kw:
        ids = [head, (head + 1) % NUM, (head + 2) % NUM]
        dflt = (ids[1], ids[2], 0)
        kw["nexts"] = tuple(head if n == "head" else dflt[k] if n is None else n
                            for k, n in enumerate(kw["nexts"]))
    _three(ring, head, **kw)
    expect(ring, reason)


def test_three_descriptor_indirect_last_not_negotiated():
    r = HandRing(indirect=False)
    try:
        r.desc(0, TABLE, 16, INDIRECT)
        _three(r, 2, flags=(NEXT, NEXT, INDIRECT), addrs=(BUF, BUF, TABLE), lens=(8, 8, 16))
        expect(r, Reason.INDIRECT_NOT_NEGOTIATED)
    finally:
        r.close()


def test_three_descriptor_chain_too_big():
    """Three descriptors of 1.4 GiB each: more than 2^32 bytes (guest RAM is 1.5 GiB,
    mapped lazily, touched only where the ring is)."""
    ram = 0x6000_0000
    try:
        r = HandRing(ram=ram)
    except (OSError, ValueError) as e:      # pragma: no cover - a host without the room
        pytest.skip(f"cannot map {ram} bytes: {e}")
    try:
        ln = 0x5800_0000
        assert 3 * ln > 0xFFFFFFFF and 0x10000 + ln <= ram
        _three(r, 0, flags=(NEXT, NEXT | W_, W_), lens=(ln, ln, ln),
               addrs=(BASE + 0x10000,) * 3)
        expect(r, Reason.CHAIN_TOO_BIG)
        # two of them are fine
        r.desc(5, BASE + 0x10000, ln, NEXT, 6)
        r.desc(6, BASE + 0x10000, ln, WRITE)
        struct.pack_into("<H", r.mm, AVAIL - BASE + 4, 5)      # replace the bad entry
        assert r.q.pop().rlen == ln
    finally:
        r.close()


# ---- indirect descriptors -----------------------------------------------------------------------


def test_indirect_not_negotiated():
    r = HandRing(indirect=False)
    try:
        r.desc(0, TABLE, 16, INDIRECT)
        r.desc(0, BUF, 8, table=TABLE)
        r.publish(0)
        expect(r, Reason.INDIRECT_NOT_NEGOTIATED)
    finally:
        r.close()


def test_indirect_with_next(ring):
    ring.desc(0, TABLE, 16, INDIRECT | NEXT, 1)
    ring.desc(1, BUF, 8)
    ring.desc(0, BUF, 8, table=TABLE)
    ring.publish(0)
    expect(ring, Reason.INDIRECT_WITH_NEXT)


def test_nested_indirect(ring):
    ring.desc(0, TABLE, 32, INDIRECT)
    ring.desc(0, BUF, 8, NEXT, 1, table=TABLE)
    ring.desc(1, TABLE2, 16, INDIRECT, table=TABLE)
    ring.desc(0, BUF, 8, table=TABLE2)
    ring.publish(0)
    expect(ring, Reason.NESTED_INDIRECT)


@pytest.mark.parametrize("ln", [0, 1, 8, 15, 17, 24, 40])
def test_indirect_bad_length(ring, ln):
    ring.desc(0, TABLE, ln, INDIRECT)
    for j in range(4):
        ring.desc(j, BUF, 8, table=TABLE)
    ring.publish(0)
    expect(ring, Reason.INDIRECT_BAD_LENGTH)


@pytest.mark.parametrize("addr,ln", [
    (END - 16, 32),                 # runs off the end
    (END, 16),                      # starts past the end
    (BASE - 16, 16),                # below RAM
    (2**64 - 16, 32),               # overflows
    (BASE, 0xFFFFFFF0),             # longer than RAM
])
def test_indirect_table_out_of_range(ring, addr, ln):
    ring.desc(0, addr, ln, INDIRECT)
    ring.publish(0)
    expect(ring, Reason.INDIRECT_OUT_OF_RANGE)


def test_indirect_table_ending_at_end_of_ram_is_fine(ring):
    ring.desc(0, END - 32, 32, INDIRECT)
    ring.desc(0, BUF, 8, NEXT, 1, table=END - 32)
    ring.desc(1, BUF + 8, 4, WRITE, table=END - 32)
    ring.publish(0)
    c = ring.q.pop()
    assert (c.rlen, c.wlen, c.ndescs) == (8, 4, 2)


def test_indirect_write_flag_is_ignored(ring):
    """The device MUST ignore the write-only flag of a descriptor that refers to an indirect
    table (spec 2.7.5.3.2)."""
    ring.desc(0, TABLE, 16, INDIRECT | WRITE)
    ring.desc(0, BUF, 8, table=TABLE)
    ring.publish(0)
    c = ring.q.pop()
    assert (c.rlen, c.wlen) == (8, 0)


@pytest.mark.parametrize("corrupt", ["loop", "outside", "indirect", "head"])
def test_refused_chain_changes_no_memory(corrupt):
    """The device writes nothing for a chain it refuses: not the used ring, not any buffer."""
    r = HandRing()
    try:
        if corrupt == "loop":
            r.desc(0, BUF, 8, NEXT | WRITE, 0)
            reason = Reason.CHAIN_TOO_LONG
        elif corrupt == "outside":
            r.desc(0, BUF, 8, NEXT | WRITE, 1)
            r.desc(1, END - 4, 8, WRITE)
            reason = Reason.ADDRESS_OUT_OF_RANGE
        elif corrupt == "indirect":
            r.desc(0, TABLE, 24, INDIRECT)
            reason = Reason.INDIRECT_BAD_LENGTH
        else:
            reason = Reason.INVALID_HEAD
        r.publish(0 if corrupt != "head" else NUM)
        before = bytes(r.mm)
        expect(r, reason)
        assert bytes(r.mm) == before
        assert r.used_idx() == 0
    finally:
        r.close()


# ---- ring setup ---------------------------------------------------------------------------------


def _setup(num=NUM, desc=DESC, avail=AVAIL, used=USED, ram=RAM):
    mm = mmap.mmap(-1, ram)
    mem = GuestMemory(mm, BASE)
    try:
        SplitQueue(mem, num, desc, avail, used, False, False)
    finally:
        mem.release()
        try:
            mm.close()
        except BufferError:
            pass


@pytest.mark.parametrize("num", [0, 3, 6, 100, 32768 + 1, 65536, 1 << 20, -8])
def test_invalid_ring_size(num):
    with pytest.raises(RingError) as ei:
        _setup(num=num)
    assert ei.value.reason is Reason.INVALID_RING_SIZE


def test_largest_ring_size_is_accepted():
    _setup(num=32768, desc=BASE, avail=BASE + 16 * 32768, used=BASE + 0xA0000, ram=0x100000)


@pytest.mark.parametrize("desc,avail,used", [
    (DESC + 8, AVAIL, USED),        # descriptor table: 16-byte aligned
    (DESC + 1, AVAIL, USED),
    (DESC, AVAIL + 1, USED),        # avail ring: 2
    (DESC, AVAIL, USED + 2),        # used ring: 4
    (DESC, AVAIL, USED + 1),
])
def test_misaligned_ring(desc, avail, used):
    with pytest.raises(RingError) as ei:
        _setup(desc=desc, avail=avail, used=used)
    assert ei.value.reason is Reason.MISALIGNED_RING


@pytest.mark.parametrize("desc,avail,used", [
    (END, AVAIL, USED),                         # descriptor table past RAM
    (END - 16 * NUM + 16, AVAIL, USED),         # straddling the end
    (BASE - 0x1000, AVAIL, USED),               # below RAM
    (0, AVAIL, USED),
    (DESC, END - 8, USED),                      # avail ring straddling the end
    (DESC, BASE - 2, USED),
    (DESC, AVAIL, END - 8),                     # used ring straddling the end
    (DESC, AVAIL, 2**64 - 16),                  # overflow
])
def test_ring_out_of_range(desc, avail, used):
    with pytest.raises(RingError) as ei:
        _setup(desc=desc, avail=avail, used=used)
    assert ei.value.reason is Reason.RING_OUT_OF_RANGE


# ---- the device model turns a ring error into virtio_error --------------------------------------


class FakeTransport:
    """Stands in for the MMIO transport: records the interrupts the device raises."""

    name = "fake-mmio"

    def __init__(self) -> None:
        self.used: list[int] = []
        self.config = 0

    def signal_used(self, queue_index: int) -> None:
        self.used.append(queue_index)

    def signal_config(self) -> None:
        self.config += 1


class LiveBlk:
    """A BlkDevice over hand-written guest RAM, brought to DRIVER_OK the way a driver does."""

    def __init__(self, event_idx: bool = True, indirect: bool = True) -> None:
        self.mm = mmap.mmap(-1, RAM)
        self.mem = GuestMemory(self.mm, BASE)
        self.dev = BlkDevice("blk-test", self.mem, MemoryBackend(1 << 20), readonly=False,
                             num_queues=1, queue_size=NUM, offer=0, withhold=0, blk_size=512,
                             serial="test", dev_stats=None, queue_stats=[None])
        self.transport = FakeTransport()
        self.dev.transport = self.transport
        self.idx = 0
        d = self.dev
        d.write_status(S.ACKNOWLEDGE)
        d.write_status(S.ACKNOWLEDGE | S.DRIVER)
        feats = F.bit(F.VIRTIO_F_VERSION_1)
        if event_idx:
            feats |= F.bit(F.VIRTIO_RING_F_EVENT_IDX)
        if indirect:
            feats |= F.bit(F.VIRTIO_RING_F_INDIRECT_DESC)
        assert feats & ~d.device_features == 0
        d.set_driver_features(0, feats & 0xFFFFFFFF)
        d.set_driver_features(1, feats >> 32)
        d.write_status(S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK)
        assert d.status & S.FEATURES_OK, d.guest_errors
        self.q = q = d.queues[0]
        q.num, q.desc, q.driver, q.device = NUM, DESC, AVAIL, USED
        assert d.queue_enable(q)
        d.write_status(S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK | S.DRIVER_OK)
        assert d.status == S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK | S.DRIVER_OK
        assert d.live_queues() == [q]

    def desc(self, i, addr, ln, flags=0, nxt=0, table=DESC):
        struct.pack_into("<QIHH", self.mm, table - BASE + 16 * i, addr, ln, flags, nxt)

    def publish(self, head):
        struct.pack_into("<H", self.mm, AVAIL - BASE + 4 + 2 * (self.idx % NUM), head)
        self.idx += 1
        struct.pack_into("<H", self.mm, AVAIL - BASE + 2, self.idx)

    def read_request(self, head=0, sector=0):
        """A well-formed VIRTIO_BLK_T_IN: header, 512 bytes of data, status byte."""
        struct.pack_into("<IIQ", self.mm, BUF - BASE, B.VIRTIO_BLK_T_IN, 0, sector)
        struct.pack_into("<B", self.mm, BUF + 0x400 - BASE, 0xFF)
        self.desc(head, BUF, 16, NEXT, head + 1)
        self.desc(head + 1, BUF + 0x200, 512, WRITE | NEXT, head + 2)
        self.desc(head + 2, BUF + 0x400, 1, WRITE)
        self.publish(head)

    def close(self):
        self.dev.close()
        try:
            self.mem.release()
            self.mm.close()
        except BufferError:     # a view still alive somewhere; the GC will unmap it
            pass


def _bad_loop(b):
    b.desc(3, BUF, 16, NEXT, 4)
    b.desc(4, BUF + 0x400, 1, NEXT, 3)
    b.publish(3)


def _bad_head(b):
    b.publish(NUM + 3)


def _bad_address(b):
    b.desc(3, BUF, 16, NEXT, 4)
    b.desc(4, END, 1, WRITE)
    b.publish(3)


def _bad_next(b):
    b.desc(3, BUF, 16, NEXT, 200)
    b.publish(3)


def _bad_order(b):
    b.desc(3, BUF + 0x400, 1, WRITE | NEXT, 4)
    b.desc(4, BUF, 16)
    b.publish(3)


def _bad_zero(b):
    b.desc(3, BUF, 16, NEXT, 4)
    b.desc(4, BUF + 0x400, 0, WRITE)
    b.publish(3)


def _bad_nested(b):
    b.desc(3, TABLE, 32, INDIRECT)
    b.desc(0, BUF, 16, NEXT, 1, table=TABLE)
    b.desc(1, TABLE2, 16, INDIRECT, table=TABLE)
    b.publish(3)


def _bad_indirect_len(b):
    b.desc(3, TABLE, 20, INDIRECT)
    b.publish(3)


def _bad_avail_idx(b):
    struct.pack_into("<H", b.mm, AVAIL - BASE + 2, b.idx + NUM + 1)


def _no_status_byte(b):
    b.desc(3, BUF, 16)                              # a request with nothing writable
    b.publish(3)


@pytest.mark.parametrize("corrupt,reason", [
    (_bad_loop, Reason.CHAIN_TOO_LONG),
    (_bad_head, Reason.INVALID_HEAD),
    (_bad_address, Reason.ADDRESS_OUT_OF_RANGE),
    (_bad_next, Reason.INVALID_NEXT),
    (_bad_order, Reason.READABLE_AFTER_WRITABLE),
    (_bad_zero, Reason.ZERO_LENGTH),
    (_bad_nested, Reason.NESTED_INDIRECT),
    (_bad_indirect_len, Reason.INDIRECT_BAD_LENGTH),
    (_bad_avail_idx, Reason.INVALID_AVAIL_IDX),
    (_no_status_byte, Reason.MALFORMED_REQUEST),
], ids=lambda v: v.name if isinstance(v, Reason) else v.__name__.strip("_"))
def test_device_turns_ring_error_into_virtio_error(corrupt, reason):
    b = LiveBlk()
    try:
        d, q, t = b.dev, b.q, b.transport
        # a good request first: served, used, the driver interrupted
        b.read_request()
        assert d.service(q) == 1
        assert t.used == [0]
        assert b.mm[BUF + 0x400 - BASE] == B.VIRTIO_BLK_S_OK
        assert struct.unpack_from("<HH", b.mm, USED - BASE + 2)[0] == 1
        assert t.config == 0 and not d.errors

        corrupt(b)
        assert d.service(q) == 0                    # nothing raised
        assert d.status & S.DEVICE_NEEDS_RESET
        assert d.status & S.DRIVER_OK               # the driver's bits are kept
        assert len(d.errors) == 1
        assert reason.value in d.errors[0]
        assert d.errors[0].startswith("queue 0:")
        assert q.broken and d.broken
        assert t.config == 1                        # the config-change interrupt
        assert t.used == [0]                        # no used-buffer interrupt for the bad one
        assert struct.unpack_from("<H", b.mm, USED - BASE + 2)[0] == 1
        assert d.live_queues() == []

        # a broken queue is not served again, even with good work on it
        b.read_request(head=5)
        assert d.service(q) == 0
        assert len(d.errors) == 1 and t.config == 1

        # the driver's reset clears it
        d.write_status(0)
        assert d.status == 0 and not d.broken and not q.broken and q.ring is None
    finally:
        b.close()


@pytest.mark.parametrize("field,value,reason", [
    ("num", 3, Reason.INVALID_RING_SIZE),
    ("desc", DESC + 8, Reason.MISALIGNED_RING),
    ("device", END - 8, Reason.RING_OUT_OF_RANGE),
])
def test_bad_ring_layout_at_queue_enable_is_a_device_error(field, value, reason):
    mm = mmap.mmap(-1, RAM)
    mem = GuestMemory(mm, BASE)
    dev = BlkDevice("blk-test", mem, MemoryBackend(1 << 20), readonly=False, num_queues=1,
                    queue_size=NUM, offer=0, withhold=0, blk_size=512, serial="x",
                    dev_stats=None, queue_stats=[None])
    t = FakeTransport()
    dev.transport = t
    try:
        dev.write_status(S.ACKNOWLEDGE)
        dev.write_status(S.ACKNOWLEDGE | S.DRIVER)
        dev.set_driver_features(1, 1)               # VERSION_1 is bit 32
        dev.write_status(S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK)
        q = dev.queues[0]
        q.num, q.desc, q.driver, q.device = NUM, DESC, AVAIL, USED
        setattr(q, field, value)
        assert dev.queue_enable(q) is False
        assert q.ring is None and not q.ready
        assert reason.value in dev.errors[0]
        assert dev.status & S.DEVICE_NEEDS_RESET
        assert t.config == 0                        # not live yet: no interrupt to send
    finally:
        dev.close()
        try:
            mem.release()
            mm.close()
        except BufferError:
            pass


def test_indirect_table_longer_than_the_limit(ring):
    n = indirect_table_max(NUM) + 1
    ring.desc(0, TABLE, 16 * n, INDIRECT)       # inside RAM; refused before it is read
    ring.publish(0)
    expect(ring, Reason.CHAIN_TOO_LONG)
