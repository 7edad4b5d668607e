"""Malformed packed rings written by hand, and the device error each one is.

Every descriptor and flags word here is written with struct straight into the mapping that
stands for guest RAM, at the offsets of the virtio spec's packed ring layout

    struct pvirtq_desc { le64 addr; le32 len; le16 id; le16 flags; }      16 bytes each

as a buggy or hostile driver could; no driver code runs. A descriptor is available when its
AVAIL bit (1 << 7) equals the driver's wrap counter and its USED bit (1 << 15) does not; the
buffer id is in the last descriptor of a chain. The device side
(vmsim.host.virtio.queue_packed.PackedQueue) must refuse each malformed chain with a RingError
carrying the specific Reason, without consuming it (its position, wrap counter and buffer ids
unchanged) and without writing anything. One level up, a real BlkDevice with
VIRTIO_F_RING_PACKED negotiated must turn that error into virtio_error: DEVICE_NEEDS_RESET, a
config-change interrupt, the queue broken, nothing raised.

Chains of three descriptors in a row and three-entry indirect tables (the shape of a block
request) may be read by a faster path on the device; every malformation is tried in those
shapes too.
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
from vmsim.host.virtio.queue_packed import PackedQueue

BASE = 0x4000_0000
RAM = 0x10000                 # 64 KiB of guest RAM at BASE
END = BASE + RAM
NUM = 8
DESC = BASE + 0x1000          # the descriptor ring (align 16)
DRV = BASE + 0x2000           # driver event suppression area (align 4)
DEV = BASE + 0x2040           # device event suppression area (align 4)
TABLE = BASE + 0x4000         # indirect tables
TABLE2 = BASE + 0x5000
BUF = BASE + 0x8000           # buffers

NEXT, WRITE, INDIRECT = 1, 2, 4
AVAIL, USED = 1 << 7, 1 << 15
R_, W_ = 0, WRITE


def avail_bits(wrap: int) -> int:
    """AVAIL/USED bits of a descriptor made available in a lap of driver wrap counter wrap."""
    return AVAIL if wrap else USED


class HandRing:
    """Guest RAM and a packed device queue over it; the ring is written by hand. The
    driver's position and wrap counter are kept here, as a driver keeps them."""

    def __init__(self, num: int = NUM, indirect: bool = True, event_idx: bool = False,
                 ram: int = RAM) -> None:
        self.num = num
        self.mm = mmap.mmap(-1, ram)
        self.mem = GuestMemory(self.mm, BASE)
        self.q = PackedQueue(self.mem, num, DESC, DRV, DEV, event_idx, indirect)
        self.pos = 0
        self.wrap = 1

    def desc(self, i: int, addr: int, ln: int, bid: int = 0, flags: int = 0,
             table: int | None = None) -> None:
        """Descriptor i of the ring (flags as given, AVAIL/USED included) or of a table."""
        at = (DESC + 16 * i if table is None else table + 16 * i) - BASE
        struct.pack_into("<QIHH", self.mm, at, addr, ln, bid, flags)

    def flags_at(self, i: int) -> int:
        return struct.unpack_from("<H", self.mm, DESC - BASE + 16 * i + 14)[0]

    def set_flags(self, i: int, flags: int) -> None:
        struct.pack_into("<H", self.mm, DESC - BASE + 16 * i + 14, flags)

    def table(self, gpa: int, entries: list[tuple[int, int, int]]) -> None:
        for j, (addr, ln, fl) in enumerate(entries):
            self.desc(j, addr, ln, 0, fl, table=gpa)

    def chain(self, segs: list[tuple[int, int, int]], bid: int, *, ids: list[int] | None = None,
              raw: bool = False) -> int:
        """Make a chain available at the driver's position: segs are (addr, len, flags); the
        NEXT flags are added (unless raw) and the AVAIL/USED bits of each descriptor's lap;
        the id goes in every descriptor (or `ids`, one each); the head's flags are written
        last. Returns the chain's first position."""
        first = self.pos
        head_flags = 0
        for k, (addr, ln, fl) in enumerate(segs):
            if not raw and k < len(segs) - 1:
                fl |= NEXT
            fl |= avail_bits(self.wrap)
            bid_k = ids[k] if ids is not None else bid
            if k == 0:
                head_flags = fl
                self.desc(self.pos, addr, ln, bid_k, 0)
            else:
                self.desc(self.pos, addr, ln, bid_k, fl)
            self.pos += 1
            if self.pos == self.num:
                self.pos = 0
                self.wrap ^= 1
        self.set_flags(first, head_flags)
        return first

    def indirect(self, gpa: int, ln: int, bid: int, extra: int = 0) -> int:
        """One ring descriptor naming a table at gpa of ln bytes."""
        return self.chain([(gpa, ln, INDIRECT | extra)], bid, raw=True)

    def round_trip(self, n: int) -> None:
        """n well-formed one-descriptor buffers through the device (pop, push)."""
        for _ in range(n):
            self.chain([(BUF, 8, 0)], 0)
            c = self.q.pop()
            assert c is not None and c.head == 0
            self.q.push(c, 0)

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


def state(r: HandRing) -> tuple:
    q = r.q
    return (q.last_avail_idx, q.avail_wrap_counter, q.inflight, bytes(q.in_flight_ids),
            q.used_idx, q.used_wrap_counter)


def low_ram(r: HandRing) -> bytes:
    """The part of guest RAM that rings, tables and buffers here live in (all of it for the
    usual 64 KiB; not the lazily mapped rest of a huge one)."""
    return bytes(r.mm[:RAM])


def expect(r: HandRing, reason: Reason) -> RingError:
    """pop() refuses with `reason`, consumes nothing and writes nothing."""
    before_state, before_mem = state(r), low_ram(r)
    with pytest.raises(RingError) as ei:
        r.q.pop()
    assert ei.value.reason is reason, ei.value
    assert str(ei.value).startswith(reason.value)
    assert state(r) == before_state
    assert low_ram(r) == before_mem
    # has_work still sees it (the device did not skip it; a descriptor that looks used is
    # no work), and pop_batch says the same
    assert r.q.has_work() == (reason is not Reason.USED_FLAG_BY_DRIVER)
    with pytest.raises(RingError) as ei2:
        r.q.pop_batch()
    assert ei2.value.reason is reason
    assert state(r) == before_state
    return ei.value


# ---- well-formed controls ------------------------------------------------------------------------


def test_well_formed_chain_is_accepted(ring):
    ring.chain([(BUF, 16, R_), (BUF + 0x100, 512, W_), (BUF + 0x400, 1, W_)], bid=5)
    c = ring.q.pop()
    assert (c.head, c.rlen, c.wlen, c.ndescs) == (5, 16, 513, 3)
    assert c.r_off == [BUF - BASE] and c.w_off == [BUF + 0x100 - BASE, BUF + 0x400 - BASE]
    assert ring.q.pop() is None
    assert (ring.q.last_avail_idx, ring.q.avail_wrap_counter) == (3, 1)


@pytest.mark.parametrize("dirs", ["RRR", "RRW", "RWW", "WWW", "R", "W", "RW", "RRRRW"])
@pytest.mark.parametrize("start", [0, NUM - 3, NUM - 2, NUM - 1])
def test_chains_of_every_shape_and_place_are_accepted(ring, dirs, start):
    """Every direction pattern, anywhere in the ring (across its end too), direct and
    through an indirect table: the device sees exactly the segments."""
    ring.round_trip(start)
    segs = [(BUF + 0x100 * k, 16 + k, WRITE if d == "W" else 0) for k, d in enumerate(dirs)]
    nr = dirs.count("R")
    exp_r = [(a - BASE, n) for a, n, _ in segs[:nr]]
    exp_w = [(a - BASE, n) for a, n, _ in segs[nr:]]
    ring.chain(segs, bid=3)
    c = ring.q.pop()
    assert (c.head, c.ndescs) == (3, len(dirs))
    assert list(zip(c.r_off, c.r_len, strict=True)) == exp_r
    assert list(zip(c.w_off, c.w_len, strict=True)) == exp_w
    assert ring.q.last_avail_idx == (start + len(dirs)) % NUM
    assert ring.q.avail_wrap_counter == (0 if start + len(dirs) >= NUM else 1)
    ring.q.push(c, 0)
    ring.table(TABLE, [(a, n, fl) for a, n, fl in segs])
    ring.indirect(TABLE, 16 * len(segs), bid=4)
    c = ring.q.pop()
    assert (c.head, c.ndescs) == (4, 1)
    assert list(zip(c.r_off, c.r_len, strict=True)) == exp_r
    assert list(zip(c.w_off, c.w_len, strict=True)) == exp_w


def test_buffers_exactly_at_the_edges_of_ram_are_accepted(ring):
    ring.chain([(BASE, 1, R_), (END - 16, 16, W_)], bid=0)
    c = ring.q.pop()
    assert c.r_off == [0] and c.w_off == [RAM - 16]


def test_buffer_id_is_read_from_the_last_descriptor(ring):
    """"Buffer ID is included in the last descriptor in the list": ids in the others are
    not looked at, even out of range."""
    ring.chain([(BUF, 8, R_), (BUF, 8, W_), (BUF, 8, W_)], 0, ids=[0xFFFF, NUM, 2])
    assert ring.q.pop().head == 2
    ring.chain([(BUF, 8, R_), (BUF, 8, R_)], 0, ids=[0xFFFF, 6])
    assert ring.q.pop().head == 6


def test_chain_using_the_whole_ring_is_accepted():
    """A list of exactly the queue size (the spec's limit), starting mid-ring."""
    r = HandRing(num=5)
    try:
        r.round_trip(3)
        r.chain([(BUF, 8, R_)] * 4 + [(BUF, 8, W_)], bid=4)
        c = r.q.pop()
        assert (c.head, c.ndescs, c.rlen, c.wlen) == (4, 5, 32, 8)
        assert (r.q.last_avail_idx, r.q.avail_wrap_counter) == (3, 0)
    finally:
        r.close()


def test_indirect_write_flag_and_table_flags_other_than_write_are_ignored(ring):
    """The device ignores WRITE on a descriptor with INDIRECT, and every flag but WRITE in
    a table (reserved); the table's length, not NEXT, says how many entries it has."""
    ring.table(TABLE, [(BUF, 8, NEXT), (BUF + 8, 8, 0), (BUF + 16, 8, WRITE | NEXT),
                       (BUF + 24, 4, WRITE)])
    ring.indirect(TABLE, 64, bid=1, extra=WRITE)
    c = ring.q.pop()
    assert (c.head, c.rlen, c.wlen, c.r_len, c.w_len) == (1, 16, 12, [8, 8], [8, 4])


def test_indirect_table_of_exactly_the_queue_size_is_accepted(ring):
    ring.table(TABLE, [(BUF + 8 * j, 8, R_) for j in range(NUM)])
    ring.indirect(TABLE, 16 * NUM, bid=0)
    assert ring.q.pop().rlen == 8 * NUM


def test_indirect_table_ending_at_end_of_ram_is_accepted(ring):
    ring.table(END - 48, [(BUF, 8, R_), (BUF, 8, W_), (BUF, 1, W_)])
    ring.indirect(END - 48, 48, bid=0)
    c = ring.q.pop()
    assert (c.rlen, c.wlen) == (8, 9)


def test_not_yet_available_descriptors_are_not_taken(ring):
    """Zeroed descriptors (the ring's initial state), a descriptor of the other lap and a
    used one of the previous lap are not available; pop finds nothing and raises nothing."""
    assert ring.q.pop() is None and not ring.q.has_work()
    ring.desc(0, BUF, 8, 0, USED)                   # available in a wrap-0 lap, not this one
    assert ring.q.pop() is None
    ring.round_trip(NUM)                             # a lap: the device is at 0, wrap 0
    assert (ring.q.last_avail_idx, ring.q.avail_wrap_counter) == (0, 0)
    assert ring.flags_at(0) == AVAIL | USED          # used in the previous lap
    assert ring.q.pop() is None and not ring.q.has_work()


# ---- buffer ids --------------------------------------------------------------------------------


@pytest.mark.parametrize("bid", [NUM, NUM + 1, 0x7FFF, 0xFFFF])
@pytest.mark.parametrize("shape", ["single", "chain", "rww", "rrw", "indirect3", "indirect"])
def test_buffer_id_out_of_range(ring, bid, shape):
    if shape == "single":
        ring.chain([(BUF, 8, W_)], bid)
    elif shape == "chain":
        ring.chain([(BUF, 8, R_), (BUF, 8, W_)], 0, ids=[0, bid])
    elif shape in ("rww", "rrw"):
        dirs = (R_, W_, W_) if shape == "rww" else (R_, R_, W_)
        ring.chain([(BUF, 16, dirs[0]), (BUF, 512, dirs[1]), (BUF, 1, dirs[2])], 0,
                   ids=[0, 0, bid])
    else:
        n = 3 if shape == "indirect3" else 2
        ring.table(TABLE, [(BUF, 16, R_), (BUF, 512, W_), (BUF, 1, W_)][:n])
        ring.indirect(TABLE, 16 * n, bid)
    expect(ring, Reason.INVALID_BUFFER_ID)


@pytest.mark.parametrize("shape", ["single", "rww", "indirect3"])
def test_buffer_id_already_in_flight(ring, shape):
    """A chain is popped and not yet used; another chain made available with its id."""

    def make(bid):
        if shape == "single":
            ring.chain([(BUF, 8, R_)], bid)
        elif shape == "rww":
            ring.chain([(BUF, 16, R_), (BUF, 512, W_), (BUF, 1, W_)], bid)
        else:
            ring.table(TABLE, [(BUF, 16, R_), (BUF, 512, W_), (BUF, 1, W_)])
            ring.indirect(TABLE, 48, bid)

    make(3)
    first = ring.q.pop()
    assert first.head == 3
    make(3)
    expect(ring, Reason.BUFFER_ID_IN_FLIGHT)
    ring.q.push(first, 0)                        # used: the id is free again
    assert ring.q.pop().head == 3


def test_buffer_id_in_flight_within_one_batch(ring):
    """Two chains with the same id made available together: pop_batch takes the first and
    refuses the second."""
    ring.chain([(BUF, 8, R_)], 6)
    ring.chain([(BUF, 8, W_)], 6)
    with pytest.raises(RingError) as ei:
        ring.q.pop_batch()
    assert ei.value.reason is Reason.BUFFER_ID_IN_FLIGHT
    assert ring.q.in_flight_ids[6] == 1 and ring.q.last_avail_idx == 1


def test_too_many_in_flight(ring):
    """The driver makes more available than the ring holds: NUM one-descriptor buffers are
    popped and never used, and the driver overwrites position 0 in its next lap."""
    for bid in range(NUM):
        ring.chain([(BUF, 8, R_)], bid)
    assert len(ring.q.pop_batch()) == NUM
    assert (ring.q.last_avail_idx, ring.q.avail_wrap_counter) == (0, 0)
    assert ring.wrap == 0
    ring.chain([(BUF, 8, R_)], 2)                  # position 0, wrap 0: available
    expect(ring, Reason.TOO_MANY_IN_FLIGHT)
    ring.q.push(2, 0)
    assert ring.q.inflight == NUM - 1


# ---- chain walking -----------------------------------------------------------------------------


@pytest.mark.parametrize("start", [0, 3])
def test_chain_longer_than_the_queue(ring, start):
    """Every descriptor with NEXT: the walk goes round the ring and would not end."""
    ring.round_trip(start)
    ring.chain([(BUF, 8, R_ | NEXT)] * NUM, 0, raw=True)
    expect(ring, Reason.CHAIN_TOO_LONG)


def test_chain_longer_than_the_queue_with_stale_descriptors(ring):
    """NEXT on the last descriptor the driver wrote: the walk runs into descriptors of an
    earlier lap (still NEXT) and round the ring."""
    for i in range(NUM):
        ring.desc(i, BUF, 8, 0, NEXT | AVAIL)
    expect(ring, Reason.CHAIN_TOO_LONG)


@pytest.mark.parametrize("where", ["head", "middle", "last"])
def test_readable_after_writable(ring, where):
    if where == "head":
        segs = [(BUF, 8, W_), (BUF, 8, R_)]
    elif where == "middle":
        segs = [(BUF, 8, R_), (BUF, 8, W_), (BUF, 8, R_), (BUF, 8, W_)]
    else:
        segs = [(BUF, 8, R_), (BUF, 8, W_), (BUF, 8, R_)]         # WRW-like three in a row
    ring.chain(segs, 0)
    expect(ring, Reason.READABLE_AFTER_WRITABLE)


@pytest.mark.parametrize("dirs", [(W_, R_, W_), (W_, W_, R_), (R_, W_, R_)])
def test_readable_after_writable_inside_indirect_table(ring, dirs):
    ring.table(TABLE, [(BUF, 16, dirs[0]), (BUF, 8, dirs[1]), (BUF, 1, dirs[2])])
    ring.indirect(TABLE, 48, 0)
    expect(ring, Reason.READABLE_AFTER_WRITABLE)


@pytest.mark.parametrize("shape,k", [(s, k) for s in ("rww", "rrw", "chain4", "indirect3")
                                     for k in (0, 1, 2)] + [("indirect2", 0), ("indirect2", 1)])
def test_zero_length(ring, k, shape):
    lens = [16, 512, 1, 8]
    lens[k] = 0
    if shape in ("rww", "rrw"):
        dirs = (R_, W_, W_) if shape == "rww" else (R_, R_, W_)
        ring.chain([(BUF, lens[j], dirs[j]) for j in range(3)], 0)
    elif shape == "chain4":
        ring.chain([(BUF, lens[j], (R_, R_, W_, W_)[j]) for j in range(4)], 0)
    else:
        n = 3 if shape == "indirect3" else 2
        ring.table(TABLE, [(BUF, lens[j], (R_, W_, W_)[j]) for j in range(n)])
        ring.indirect(TABLE, 16 * n, 0)
    expect(ring, Reason.ZERO_LENGTH)


OUT_OF_RANGE = [
    (END, 1),                                   # just past RAM
    (END - 8, 9),                               # straddles the end
    (BASE - 1, 1),                              # just below RAM
    (BASE - 8, 16),                             # straddles the base
    (0, 8),                                     # guest-physical 0, below the RAM base
    (2**64 - 8, 16),                            # addr + len overflows 64 bits
    (2**64 - 1, 0xFFFFFFFF),
    (BASE, 0xFFFFFFFF),                         # longer than RAM
    (BASE + 0x100, RAM),                        # one byte too long
]
OOR_IDS = ["past-end", "straddle-end", "below-base", "straddle-base", "zero", "overflow",
           "max", "huge-len", "one-too-long"]


@pytest.mark.parametrize("addr,ln", OUT_OF_RANGE, ids=OOR_IDS)
@pytest.mark.parametrize("k", [0, 2])
@pytest.mark.parametrize("shape", ["rww", "rrw", "chain4", "indirect3"])
def test_address_out_of_range(ring, addr, ln, k, shape):
    segs = [(BUF, 16), (BUF + 0x100, 512), (BUF + 0x400, 1), (BUF, 8)]
    segs[k] = (addr, ln)
    if shape in ("rww", "rrw"):
        dirs = (R_, W_, W_) if shape == "rww" else (R_, R_, W_)
        ring.chain([(a, n, dirs[j]) for j, (a, n) in enumerate(segs[:3])], 0)
    elif shape == "chain4":
        ring.chain([(a, n, (R_, R_, W_, W_)[j]) for j, (a, n) in enumerate(segs)], 0)
    else:
        ring.table(TABLE, [(a, n, (R_, W_, W_)[j]) for j, (a, n) in enumerate(segs[:3])])
        ring.indirect(TABLE, 48, 0)
    expect(ring, Reason.ADDRESS_OUT_OF_RANGE)


@pytest.mark.parametrize("shape", ["chain", "rrrw", "rww", "rrw", "indirect3"])
def test_chain_too_big(shape):
    """More than 2^32 bytes in one buffer (guest RAM is 1.5 GiB, mapped lazily and touched
    only where the ring is; the same bytes are named again and again, which nothing
    forbids)."""
    ram = 0x6000_0000
    try:
        r = HandRing(ram=ram)
    except (OSError, ValueError) as e:      # pragma: no cover - a host without the room
        pytest.skip(f"cannot map {ram} bytes: {e}")
    try:
        big = BASE + 0x10000
        ln = 0x5800_0000
        assert 3 * ln > 0xFFFFFFFF >= 2 * ln and 0x10000 + ln <= ram
        if shape == "chain":
            r.chain([(big, ln, R_), (big, ln, R_), (big, ln, W_), (big, ln, W_)], 0)
        elif shape == "rrrw":
            r.chain([(big, ln, R_), (big, ln, R_), (big, ln, R_)], 0)
        elif shape in ("rww", "rrw"):
            dirs = (R_, W_, W_) if shape == "rww" else (R_, R_, W_)
            r.chain([(big, ln, d) for d in dirs], 0)
        else:
            r.table(TABLE, [(big, ln, R_), (big, ln, W_), (big, ln, W_)])
            r.indirect(TABLE, 48, 0)
        expect(r, Reason.CHAIN_TOO_BIG)
    finally:
        r.close()


def test_two_huge_buffers_are_not_too_big():
    ram = 0x6000_0000
    try:
        r = HandRing(ram=ram)
    except (OSError, ValueError) as e:      # pragma: no cover
        pytest.skip(f"cannot map {ram} bytes: {e}")
    try:
        ln = 0x5800_0000
        r.chain([(BASE + 0x10000, ln, R_), (BASE + 0x10000, ln, W_)], 0)
        c = r.q.pop()
        assert (c.rlen, c.wlen) == (ln, ln)
    finally:
        r.close()


# ---- indirect descriptors ----------------------------------------------------------------------


def test_indirect_with_next(ring):
    ring.table(TABLE, [(BUF, 8, R_)])
    ring.chain([(TABLE, 16, INDIRECT | NEXT), (BUF, 8, W_)], 0, raw=True)
    expect(ring, Reason.INDIRECT_WITH_NEXT)


@pytest.mark.parametrize("at", [1, 2])
def test_indirect_inside_a_chain(ring, at):
    """INDIRECT on a later descriptor of a chain (no NEXT on it: the last one)."""
    ring.table(TABLE, [(BUF, 8, W_)])
    segs = [(BUF, 8, R_ | NEXT), (BUF, 8, R_ | NEXT), (BUF, 8, W_)][:at]
    ring.chain([*segs, (TABLE, 16, INDIRECT)], 0, raw=True)
    expect(ring, Reason.INDIRECT_IN_CHAIN)


def test_indirect_with_next_inside_a_chain(ring):
    ring.table(TABLE, [(BUF, 8, W_)])
    ring.chain([(BUF, 8, R_ | NEXT), (TABLE, 16, INDIRECT | NEXT), (BUF, 8, W_)], 0, raw=True)
    expect(ring, Reason.INDIRECT_WITH_NEXT)


@pytest.mark.parametrize("ln", [0, 1, 8, 15, 17, 24, 40, 47, 49])
def test_indirect_bad_length(ring, ln):
    ring.table(TABLE, [(BUF, 8, R_)] * 4)
    ring.indirect(TABLE, ln, 0)
    expect(ring, Reason.INDIRECT_BAD_LENGTH)


def test_indirect_table_longer_than_the_limit(ring):
    n = indirect_table_max(NUM) + 1
    ring.table(TABLE, [(BUF, 8, R_)] * n)
    ring.indirect(TABLE, 16 * n, 0)
    expect(ring, Reason.CHAIN_TOO_LONG)


def test_indirect_table_longer_than_the_queue_is_accepted(ring):
    ring.table(TABLE, [(BUF, 8, R_)] * (NUM + 1))
    ring.indirect(TABLE, 16 * (NUM + 1), 0)
    assert ring.q.pop().rlen == 8 * (NUM + 1)


def test_indirect_table_far_longer_than_the_queue(ring):
    ring.indirect(BASE, 0xFFFFFFF0, 0)            # also longer than RAM: the count decides
    expect(ring, Reason.CHAIN_TOO_LONG)


@pytest.mark.parametrize("dirs", ["RRR", "RWW", "RRW", "WWW"])
def test_three_entry_table_on_a_queue_of_two_is_accepted(dirs):
    """A table may hold more entries than the queue (Linux makes such tables, QEMU accepts
    them), and the fast path agrees with the walk."""
    r = HandRing(num=2)
    try:
        r.table(TABLE, [(BUF, 16, WRITE if d == "W" else 0) for d in dirs])
        r.indirect(TABLE, 48, 0)
        chain = r.q.pop()
        assert (chain.rlen, chain.wlen) == (16 * dirs.count("R"), 16 * dirs.count("W"))
    finally:
        r.close()


@pytest.mark.parametrize("addr,ln", [
    (END - 16, 32),                 # runs off the end
    (END - 32, 48),                 # a three-entry table running off the end
    (END, 16),                      # starts past the end
    (BASE - 16, 16),                # below RAM
    (BASE - 16, 48),
    (0, 48),
    (2**64 - 16, 32),               # overflows
    (2**64 - 16, 48),
])
def test_indirect_table_out_of_range(ring, addr, ln):
    ring.indirect(addr, ln, 0)
    expect(ring, Reason.INDIRECT_OUT_OF_RANGE)


@pytest.mark.parametrize("n,k", [(2, 0), (2, 1), (3, 0), (3, 1), (3, 2)])
def test_nested_indirect(ring, k, n):
    ring.table(TABLE2, [(BUF, 8, R_)])
    entries = [(BUF, 16, R_), (BUF, 512, W_), (BUF, 1, W_)][:n]
    _, _, fl = entries[k]
    entries[k] = (TABLE2, 16, INDIRECT | fl)
    ring.table(TABLE, entries)
    ring.indirect(TABLE, 16 * n, 0)
    expect(ring, Reason.NESTED_INDIRECT)


@pytest.mark.parametrize("n", [1, 3])
def test_indirect_not_negotiated(n):
    r = HandRing(indirect=False)
    try:
        r.table(TABLE, [(BUF, 16, R_), (BUF, 512, W_), (BUF, 1, W_)][:n])
        r.indirect(TABLE, 16 * n, 0)
        expect(r, Reason.INDIRECT_NOT_NEGOTIATED)
    finally:
        r.close()


# ---- the used flag -----------------------------------------------------------------------------


@pytest.mark.parametrize("lap", [0, 1, 2])
@pytest.mark.parametrize("start", [0, 5])
def test_used_flag_set_by_the_driver(ring, lap, start):
    """At the device's next position a descriptor with AVAIL == USED == the device's wrap
    counter: it looks used in the device's current lap where the device has used nothing,
    so only the driver can have written it."""
    ring.round_trip(lap * NUM + start)
    w = ring.q.avail_wrap_counter
    assert w == (1 if lap % 2 == 0 else 0)
    pos = ring.q.last_avail_idx
    assert pos == start
    ring.desc(pos, BUF, 8, 0, (AVAIL | USED if w else 0) | WRITE)
    expect(ring, Reason.USED_FLAG_BY_DRIVER)


def test_used_flag_in_a_chains_head(ring):
    ring.chain([(BUF, 8, R_), (BUF, 8, W_)], 0)
    ring.set_flags(0, NEXT | AVAIL | USED)
    expect(ring, Reason.USED_FLAG_BY_DRIVER)


# ---- a refused chain leaves everything as it was -----------------------------------------------


@pytest.mark.parametrize("corrupt", ["loop", "outside", "indirect", "id", "in-flight"])
def test_refused_chain_after_good_ones(corrupt):
    """Good chains are popped and used first; the device then refuses the bad one without
    touching the used descriptors it wrote, and keeps refusing it."""
    r = HandRing()
    try:
        r.round_trip(5)
        r.chain([(BUF, 8, R_)], 7)
        held = r.q.pop()
        if corrupt == "loop":
            r.chain([(BUF, 8, R_ | NEXT)] * NUM, 0, raw=True)
            reason = Reason.CHAIN_TOO_LONG
        elif corrupt == "outside":
            r.chain([(BUF, 8, R_), (END - 4, 8, W_)], 0)
            reason = Reason.ADDRESS_OUT_OF_RANGE
        elif corrupt == "indirect":
            r.indirect(TABLE, 24, 0)
            reason = Reason.INDIRECT_BAD_LENGTH
        elif corrupt == "id":
            r.chain([(BUF, 8, R_)], NUM)
            reason = Reason.INVALID_BUFFER_ID
        else:
            r.chain([(BUF, 8, R_)], 7)
            reason = Reason.BUFFER_ID_IN_FLIGHT
        expect(r, reason)
        expect(r, reason)
        r.q.push(held, 0)
    finally:
        r.close()


# ---- ring setup --------------------------------------------------------------------------------


def _setup(num=NUM, desc=DESC, drv=DRV, dev=DEV, ram=RAM):
    mm = mmap.mmap(-1, ram)
    mem = GuestMemory(mm, BASE)
    try:
        q = PackedQueue(mem, num, desc, drv, dev, False, False)
        q.release()
    finally:
        mem.release()
        try:
            mm.close()
        except BufferError:
            pass


@pytest.mark.parametrize("num", [0, 32768 + 1, 65536, 1 << 20, -1, -8])
def test_invalid_ring_size(num):
    with pytest.raises(RingError) as ei:
        _setup(num=num)
    assert ei.value.reason is Reason.INVALID_RING_SIZE


@pytest.mark.parametrize("num", [1, 2, 3, 5, 7, 100, 255, 1000])
def test_any_ring_size_up_to_the_maximum_is_accepted(num):
    _setup(num=num, desc=BASE, drv=BASE + 16 * num, dev=BASE + 16 * num + 4, ram=0x10000 * 2)


@pytest.mark.parametrize("num", [32767, 32768])
def test_largest_ring_sizes_are_accepted(num):
    _setup(num=num, desc=BASE, drv=BASE + 16 * 32768, dev=BASE + 16 * 32768 + 64,
           ram=0x100000)


@pytest.mark.parametrize("desc,drv,dev", [
    (DESC + 8, DRV, DEV),           # descriptor ring: 16-byte aligned
    (DESC + 4, DRV, DEV),
    (DESC + 1, DRV, DEV),
    (DESC, DRV + 2, DEV),           # driver event suppression: 4
    (DESC, DRV + 1, DEV),
    (DESC, DRV, DEV + 2),           # device event suppression: 4
    (DESC, DRV, DEV + 3),
])
def test_misaligned_ring(desc, drv, dev):
    with pytest.raises(RingError) as ei:
        _setup(desc=desc, drv=drv, dev=dev)
    assert ei.value.reason is Reason.MISALIGNED_RING


@pytest.mark.parametrize("desc,drv,dev", [
    (END, DRV, DEV),                            # the ring past RAM
    (END - 16 * NUM + 16, DRV, DEV),            # straddling the end
    (BASE - 0x1000, DRV, DEV),                  # below RAM
    (0, DRV, DEV),
    (2**64 - 16 * NUM, DRV, DEV),               # overflow
    (DESC, END, DEV),                           # driver area past the end
    (DESC, BASE - 4, DEV),
    (DESC, DRV, END),                           # device area past the end
    (DESC, DRV, 2**64 - 4),
])
def test_ring_out_of_range(desc, drv, dev):
    with pytest.raises(RingError) as ei:
        _setup(desc=desc, drv=drv, dev=dev)
    assert ei.value.reason is Reason.RING_OUT_OF_RANGE


def test_ring_areas_at_the_edges_of_ram_are_accepted():
    _setup(desc=END - 16 * NUM, drv=BASE, dev=END - 16 * NUM - 4)
    _setup(desc=BASE, drv=END - 4, dev=END - 8)


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


def _blk(mm: mmap.mmap, mem: GuestMemory) -> BlkDevice:
    return BlkDevice("blk-test", mem, MemoryBackend(1 << 20), readonly=False, num_queues=1,
                     queue_size=NUM, offer=0, withhold=0, packed=True, blk_size=512,
                     serial="test", dev_stats=None, queue_stats=[None])


class LiveBlk:
    """A BlkDevice with a packed ring over hand-written guest RAM, brought to DRIVER_OK the
    way a driver does."""

    def __init__(self, event_idx: bool = True, indirect: bool = True) -> None:
        self.mm = mmap.mmap(-1, RAM)
        self.mem = GuestMemory(self.mm, BASE)
        self.dev = _blk(self.mm, self.mem)
        self.transport = FakeTransport()
        self.dev.transport = self.transport
        self.pos, self.wrap = 0, 1
        d = self.dev
        d.write_status(S.ACKNOWLEDGE)
        d.write_status(S.ACKNOWLEDGE | S.DRIVER)
        feats = F.bit(F.VIRTIO_F_VERSION_1) | F.bit(F.VIRTIO_F_RING_PACKED)
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
        q.num, q.desc, q.driver, q.device = NUM, DESC, DRV, DEV
        assert d.queue_enable(q)
        assert isinstance(q.ring, PackedQueue)
        d.write_status(S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK | S.DRIVER_OK)
        assert d.status == S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK | S.DRIVER_OK
        assert d.live_queues() == [q]

    def desc(self, i, addr, ln, bid=0, flags=0, table=None):
        at = (DESC + 16 * i if table is None else table + 16 * i) - BASE
        struct.pack_into("<QIHH", self.mm, at, addr, ln, bid, flags)

    def chain(self, segs, bid, raw=False):
        """As HandRing.chain: make a chain available at the driver's position."""
        first, head_flags = self.pos, 0
        for k, (addr, ln, fl) in enumerate(segs):
            if not raw and k < len(segs) - 1:
                fl |= NEXT
            fl |= avail_bits(self.wrap)
            if k == 0:
                head_flags = fl
                self.desc(self.pos, addr, ln, bid, 0)
            else:
                self.desc(self.pos, addr, ln, bid, fl)
            self.pos = (self.pos + 1) % NUM
            if self.pos == 0:
                self.wrap ^= 1
        struct.pack_into("<H", self.mm, DESC - BASE + 16 * first + 14, head_flags)

    def read_request(self, bid=0, sector=0):
        """A well-formed VIRTIO_BLK_T_IN: header, 512 bytes of data, status byte."""
        struct.pack_into("<IIQ", self.mm, BUF - BASE, B.VIRTIO_BLK_T_IN, 0, sector)
        struct.pack_into("<B", self.mm, BUF + 0x400 - BASE, 0xFF)
        self.chain([(BUF, 16, R_), (BUF + 0x200, 512, W_), (BUF + 0x400, 1, W_)], bid)

    def used_desc(self, i):
        return struct.unpack_from("<QIHH", self.mm, DESC - BASE + 16 * i)

    def close(self):
        self.dev.close()
        try:
            self.mem.release()
            self.mm.close()
        except BufferError:     # a view still alive somewhere; the GC will unmap it
            pass


HDR = (BUF, 16, R_)
STATUS = (BUF + 0x400, 1, W_)


def _bad_id(b):
    b.chain([HDR, STATUS], NUM + 1)


def _id_in_flight(b):
    b.chain([HDR, STATUS], 5)
    b.chain([HDR, STATUS], 5)


def _loop(b):
    b.chain([(BUF, 16, R_ | NEXT)] * NUM, 0, raw=True)


def _indirect_next(b):
    b.chain([(TABLE, 16, INDIRECT | NEXT), STATUS], 1, raw=True)


def _indirect_in_chain(b):
    b.desc(0, BUF + 0x400, 1, 0, W_, table=TABLE)
    b.chain([(BUF, 16, R_ | NEXT), (TABLE, 16, INDIRECT)], 1, raw=True)


def _nested(b):
    b.desc(0, BUF, 16, 0, R_, table=TABLE)
    b.desc(1, TABLE2, 16, 0, INDIRECT, table=TABLE)
    b.chain([(TABLE, 32, INDIRECT)], 1, raw=True)


def _table_len(b):
    b.chain([(TABLE, 20, INDIRECT)], 1, raw=True)


def _table_outside(b):
    b.chain([(END - 16, 48, INDIRECT)], 1, raw=True)


def _zero(b):
    b.chain([HDR, (BUF + 0x200, 0, W_), STATUS], 1)


def _outside(b):
    b.chain([HDR, (END - 8, 512, W_), STATUS], 1)


def _order(b):
    b.chain([STATUS, HDR], 1)


def _used_flag(b):
    b.desc(b.pos, BUF, 16, 1, AVAIL | USED if b.wrap else 0)


def _no_status_byte(b):
    b.chain([HDR], 1)


@pytest.mark.parametrize("corrupt,reason", [
    (_bad_id, Reason.INVALID_BUFFER_ID),
    (_id_in_flight, Reason.BUFFER_ID_IN_FLIGHT),
    (_loop, Reason.CHAIN_TOO_LONG),
    (_indirect_next, Reason.INDIRECT_WITH_NEXT),
    (_indirect_in_chain, Reason.INDIRECT_IN_CHAIN),
    (_nested, Reason.NESTED_INDIRECT),
    (_table_len, Reason.INDIRECT_BAD_LENGTH),
    (_table_outside, Reason.INDIRECT_OUT_OF_RANGE),
    (_zero, Reason.ZERO_LENGTH),
    (_outside, Reason.ADDRESS_OUT_OF_RANGE),
    (_order, Reason.READABLE_AFTER_WRITABLE),
    (_used_flag, Reason.USED_FLAG_BY_DRIVER),
    (_no_status_byte, Reason.MALFORMED_REQUEST),
], ids=lambda v: v.name if isinstance(v, Reason) else v.__name__.strip("_"))
def test_device_turns_packed_ring_error_into_virtio_error(corrupt, reason):
    b = LiveBlk()
    try:
        d, q, t = b.dev, b.q, b.transport
        # a good request first: served, used, the driver interrupted
        b.read_request()
        assert d.service(q) == 1
        assert t.used == [0]
        assert b.mm[BUF + 0x400 - BASE] == B.VIRTIO_BLK_S_OK
        _, ln, bid, flags = b.used_desc(0)
        assert (ln, bid, flags) == (513, 0, AVAIL | USED | WRITE)
        assert t.config == 0 and not d.errors

        corrupt(b)
        ram_before = bytes(b.mm)
        assert d.service(q) == 0                    # nothing raised
        assert bytes(b.mm) == ram_before            # nothing written: no used descriptor
        assert d.status & S.DEVICE_NEEDS_RESET
        assert d.status & S.DRIVER_OK               # the driver's bits are kept
        assert len(d.errors) == 1
        assert reason.value in d.errors[0]
        assert d.errors[0].startswith("queue 0:")
        assert q.broken and d.broken
        assert t.config == 1                        # the config-change interrupt
        assert t.used == [0]                        # no used-buffer interrupt for the bad one
        assert d.live_queues() == []

        # a broken queue is not served again, even with good work on it
        b.read_request(bid=2)
        assert d.service(q) == 0
        assert len(d.errors) == 1 and t.config == 1

        # the driver's reset clears it
        d.write_status(0)
        assert d.status == 0 and not d.broken and not q.broken and q.ring is None
    finally:
        b.close()


def test_device_refuses_indirect_when_not_negotiated():
    b = LiveBlk(indirect=False)
    try:
        d, q, t = b.dev, b.q, b.transport
        b.desc(0, BUF, 16, 0, R_, table=TABLE)
        b.desc(1, BUF + 0x200, 512, 0, W_, table=TABLE)
        b.desc(2, BUF + 0x400, 1, 0, W_, table=TABLE)
        b.chain([(TABLE, 48, INDIRECT)], 0, raw=True)
        assert d.service(q) == 0
        assert d.status & S.DEVICE_NEEDS_RESET
        assert Reason.INDIRECT_NOT_NEGOTIATED.value in d.errors[0]
        assert t.config == 1 and t.used == []
    finally:
        b.close()


def test_device_serves_a_lap_of_good_requests_across_the_ring_end():
    """The control: good requests across several laps of the ring (3 descriptors each on a
    ring of 8, so they straddle its end) are all served, each interrupt as the driver's
    (zeroed: ENABLE) event structure asks."""
    b = LiveBlk()
    try:
        d, q, t = b.dev, b.q, b.transport
        for n in range(12):
            b.read_request(bid=n % NUM)
            assert d.service(q) == 1, d.errors
            assert b.mm[BUF + 0x400 - BASE] == B.VIRTIO_BLK_S_OK
            b.mm[BUF + 0x400 - BASE] = 0xFF
        assert len(t.used) == 12 and not d.errors
        assert (q.ring.last_avail_idx, q.ring.avail_wrap_counter) == (36 % NUM, 1)
    finally:
        b.close()


@pytest.mark.parametrize("field,value,reason", [
    ("num", 0, Reason.INVALID_RING_SIZE),
    ("num", 32769, Reason.INVALID_RING_SIZE),
    ("desc", DESC + 8, Reason.MISALIGNED_RING),
    ("driver", DRV + 2, Reason.MISALIGNED_RING),
    ("device", DEV + 1, Reason.MISALIGNED_RING),
    ("device", END, Reason.RING_OUT_OF_RANGE),
    ("desc", END - 16, Reason.RING_OUT_OF_RANGE),
    ("driver", BASE - 4, Reason.RING_OUT_OF_RANGE),
])
def test_bad_packed_ring_layout_at_queue_enable_is_a_device_error(field, value, reason):
    mm = mmap.mmap(-1, RAM)
    mem = GuestMemory(mm, BASE)
    dev = _blk(mm, mem)
    t = FakeTransport()
    dev.transport = t
    try:
        dev.write_status(S.ACKNOWLEDGE)
        dev.write_status(S.ACKNOWLEDGE | S.DRIVER)
        feats = F.bit(F.VIRTIO_F_VERSION_1) | F.bit(F.VIRTIO_F_RING_PACKED)
        dev.set_driver_features(1, feats >> 32)
        dev.write_status(S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK)
        q = dev.queues[0]
        q.num, q.desc, q.driver, q.device = NUM, DESC, DRV, DEV
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


@pytest.mark.parametrize("num", [3, 5, 7])
def test_odd_packed_queue_size_is_accepted_at_queue_enable(num):
    """A packed ring takes any size (a split one only a power of two)."""
    mm = mmap.mmap(-1, RAM)
    mem = GuestMemory(mm, BASE)
    dev = _blk(mm, mem)
    try:
        dev.write_status(S.ACKNOWLEDGE)
        dev.write_status(S.ACKNOWLEDGE | S.DRIVER)
        dev.set_driver_features(1, (F.bit(F.VIRTIO_F_VERSION_1)
                                    | F.bit(F.VIRTIO_F_RING_PACKED)) >> 32)
        dev.write_status(S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK)
        q = dev.queues[0]
        q.num, q.desc, q.driver, q.device = num, DESC, DRV, DEV
        assert dev.queue_enable(q) is True, dev.errors
        assert isinstance(q.ring, PackedQueue) and q.ring.num == num
    finally:
        dev.close()
        try:
            mem.release()
            mm.close()
        except BufferError:
            pass
