"""Fuzzing the device side with arbitrary ring memory (issue 8, "Fuzzing").

Two targets, each for split and packed rings:

1. The rings alone (SplitQueue / PackedQueue): arbitrary descriptor tables, avail rings,
   indirect tables and flags - structured values biased towards the interesting edges, mixed
   with raw bytes - popped in batches of any size, with chains returned in any order between
   batches. Every pop is compared with a model of the spec's rules written here, one
   descriptor at a time (`model_split_pop` / `model_packed_pop`): the device must hand out
   exactly the chains the model accepts, with the same segments, and refuse the first chain
   the model refuses with the model's Reason, having consumed only what came before it. The
   used side is checked against the same model (used element, used idx / used descriptor,
   flags and wrap counter).

2. Whole devices over a real virtio-mmio transport: a virtio-blk device on a memory backend
   and a virtio-net device on a real switch, brought up register by register with any ring
   layout (inside or outside RAM, aligned or not, overlapping or not, any size) and any mix of
   features, then fed arbitrary bytes in the ring areas and buffers, kicked, served, and (net)
   sent frames from the wire. Whatever happens: no exception escapes (the device boundary
   would record an "internal device error"), nothing outside guest RAM changes (guard bytes
   around it: the host reaches memory only through vmsim/host/memory.py), every device error
   names one of the spec's reasons and comes with DEVICE_NEEDS_RESET and a config-change
   interrupt, a broken queue is never served again, and what the device did serve is right:
   every blk request is answered with the status and used length a model of virtio-blk
   expects, reads return the disk's bytes and writes reach the disk.

The example budget is small by default so that the suite stays fast; set
VMSIM_FUZZ_EXAMPLES to run longer, for instance

    VMSIM_FUZZ_EXAMPLES=200000 python3 -m pytest tests/test_fuzz_rings.py

(the budget is per target; each runs 100-170 examples a second on one core, so 200,000 take
20-35 minutes a target; --hypothesis-show-statistics shows what the examples exercised, and a
failure prints the smallest example hypothesis could reduce it to).
"""

import itertools
import os
import struct

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from rogue import (
    AVAIL,
    BASE,
    EVENT_IDX,
    IN_ORDER,
    INDIRECT,
    INDIRECT_DESC,
    NEXT,
    PACKED,
    USED,
    V1,
    WRITE,
    GuardedRam,
    PackedWriter,
    Rig,
    SplitWriter,
    make_blk,
    make_net,
)
from rogue import (
    GUEST_MAC as GUEST_MAC_,
)

from vmsim.abi import blk as B
from vmsim.abi import features as F
from vmsim.abi import mmio as M
from vmsim.abi import net as N
from vmsim.abi import status as S
from vmsim.host.switch import Switch
from vmsim.host.virtio.chain import MAX_CHAIN_BYTES, indirect_table_max
from vmsim.host.virtio.errors import Reason, RingError
from vmsim.host.virtio.queue_packed import PackedQueue
from vmsim.host.virtio.queue_split import SplitQueue

EXAMPLES = int(os.environ.get("VMSIM_FUZZ_EXAMPLES", "150"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.filter_too_much])
pytestmark = pytest.mark.timeout(max(120, EXAMPLES // 10))

RAM = 0x10000
END = BASE + RAM
# Where things sit in the ring-level target (the device-level one places rings anywhere).
DESC, AVAIL_AT, USED_AT = BASE + 0x1000, BASE + 0x2000, BASE + 0x3000
DATA = BASE + 0x8000                         # buffers
SLOTS = [BASE + 0x4000 + 0x100 * k for k in range(8)]      # indirect tables
U64 = 2**64 - 1

# ---- strategies: values biased towards the edges, and raw bytes ---------------------------------
ADDR = st.one_of(
    st.sampled_from([DATA + 0x200 * k for k in range(16)]),
    st.sampled_from(SLOTS),
    st.integers(0, RAM - 1).map(lambda o: BASE + o),
    st.sampled_from([0, BASE - 1, BASE - 16, BASE, END - 1, END - 16, END - 48, END, U64,
                     U64 - 15, 2**63, 2**32]),
    st.integers(0, U64),
)
LEN = st.one_of(
    st.sampled_from([0, 1, 15, 16, 32, 48, 512, 513, 1024, 4096, 0xFFFF_FFFF, 0x8000_0000]),
    st.integers(1, 0x900),
    st.integers(0, 0xFFFF_FFFF),
)
FLAGS = st.one_of(
    st.sampled_from([0, NEXT, WRITE, NEXT | WRITE, INDIRECT, INDIRECT | NEXT, INDIRECT | WRITE]),
    st.integers(0, 0xFFFF),
)


def desc_bytes(nexts: st.SearchStrategy[int], flags: st.SearchStrategy[int] = FLAGS
               ) -> st.SearchStrategy[bytes]:
    """One 16-byte descriptor: structured (addr, len, flags, next-or-id) or raw bytes."""
    structured = st.builds(lambda a, ln, f, n: struct.pack("<QIHH", a, ln, f, n),
                           ADDR, LEN, flags, nexts)
    return st.one_of(structured, structured, structured, st.binary(min_size=16, max_size=16))


def table_bytes(max_entries: int, nexts: st.SearchStrategy[int],
                flags: st.SearchStrategy[int] = FLAGS) -> st.SearchStrategy[bytes]:
    return st.lists(desc_bytes(nexts, flags), max_size=max_entries).map(b"".join)


# ---- the model: the spec's rules, one descriptor at a time --------------------------------------
class Err(Exception):
    def __init__(self, reason: Reason) -> None:
        super().__init__(reason.value)
        self.reason = reason


def _desc(ram: memoryview, off: int) -> tuple[int, int, int, int]:
    return struct.unpack_from("<QIHH", ram, off)


def _buffer(addr: int, ln: int) -> int:
    """The RAM offset of a buffer, or the reason it is none."""
    if ln == 0:
        raise Err(Reason.ZERO_LENGTH)
    off = addr - BASE
    if off < 0 or off + ln > RAM:
        raise Err(Reason.ADDRESS_OUT_OF_RANGE)
    return off


def model_split_pop(ram: memoryview, num: int, last: int, seen: int, inflight: int,
                    indirect: bool, desc: int = DESC, avail: int = AVAIL_AT):
    """The next chain (head, readable, writable, ndescs), None if nothing is available, or
    Err(reason) for the first rule the driver broke; and avail idx as seen now. As vhost,
    the device reads avail idx again only when it has consumed what it saw last time, and
    checks the new value against where it is then."""
    a_off = avail - BASE
    if last == seen:
        idx = struct.unpack_from("<H", ram, a_off + 2)[0]
        if idx == last:
            return None, seen
        if (idx - last) & 0xFFFF > num:
            raise Err(Reason.INVALID_AVAIL_IDX)
        seen = idx
    if inflight >= num:
        raise Err(Reason.TOO_MANY_IN_FLIGHT)
    head = struct.unpack_from("<H", ram, a_off + 4 + 2 * (last % num))[0]
    if head >= num:
        raise Err(Reason.INVALID_HEAD)
    table, size, nested = desc - BASE, num, False
    i, count, readable, writable = head, 1, [], []
    while True:
        addr, ln, fl, nx = _desc(ram, table + 16 * i)
        if fl & INDIRECT:
            if not indirect:
                raise Err(Reason.INDIRECT_NOT_NEGOTIATED)
            if nested:
                raise Err(Reason.NESTED_INDIRECT)
            if fl & NEXT:
                raise Err(Reason.INDIRECT_WITH_NEXT)
            if ln == 0 or ln % 16:
                raise Err(Reason.INDIRECT_BAD_LENGTH)
            if addr < BASE or addr - BASE + ln > RAM:
                raise Err(Reason.INDIRECT_OUT_OF_RANGE)
            if ln // 16 > indirect_table_max(num):
                raise Err(Reason.CHAIN_TOO_LONG)
            table, size, nested, i, count = addr - BASE, ln // 16, True, 0, 1
            continue
        seg = (_buffer(addr, ln), ln)
        if fl & WRITE:
            writable.append(seg)
        elif writable:
            raise Err(Reason.READABLE_AFTER_WRITABLE)
        else:
            readable.append(seg)
        if not fl & NEXT:
            break
        count += 1
        if count > size:
            raise Err(Reason.CHAIN_TOO_LONG)
        i = nx
        if i >= size:
            raise Err(Reason.INVALID_NEXT)
    if sum(n for _, n in readable + writable) > MAX_CHAIN_BYTES:
        raise Err(Reason.CHAIN_TOO_BIG)
    return (head, readable, writable, count), seen


def model_packed_pop(ram: memoryview, num: int, pos: int, wrap: int, ids: set[int],
                     indirect: bool, desc: int = DESC):
    """The chain at `pos` (id, readable, writable, ring descriptors), None if the descriptor
    there is not available in lap `wrap`, or Err(reason)."""
    d_off = desc - BASE
    flags = _desc(ram, d_off + 16 * pos)[3]
    a, u = bool(flags & AVAIL), bool(flags & USED)
    if a != bool(wrap) or u == bool(wrap):
        if a == u == bool(wrap):
            raise Err(Reason.USED_FLAG_BY_DRIVER)
        return None
    if len(ids) >= num:
        raise Err(Reason.TOO_MANY_IN_FLIGHT)
    readable, writable = [], []

    def take(addr: int, ln: int, fl: int) -> None:
        seg = (_buffer(addr, ln), ln)
        if fl & WRITE:
            writable.append(seg)
        elif writable:
            raise Err(Reason.READABLE_AFTER_WRITABLE)
        else:
            readable.append(seg)

    i, n = pos, 0
    while True:
        addr, ln, bid, fl = _desc(ram, d_off + 16 * i)
        n += 1
        if n > num:
            raise Err(Reason.CHAIN_TOO_LONG)
        if fl & INDIRECT:
            if not indirect:
                raise Err(Reason.INDIRECT_NOT_NEGOTIATED)
            if fl & NEXT:
                raise Err(Reason.INDIRECT_WITH_NEXT)
            if n > 1:
                raise Err(Reason.INDIRECT_IN_CHAIN)
            if ln == 0 or ln % 16:
                raise Err(Reason.INDIRECT_BAD_LENGTH)
            if ln // 16 > indirect_table_max(num):
                raise Err(Reason.CHAIN_TOO_LONG)
            if addr < BASE or addr - BASE + ln > RAM:
                raise Err(Reason.INDIRECT_OUT_OF_RANGE)
            for j in range(ln // 16):
                ea, en, _, ef = _desc(ram, addr - BASE + 16 * j)
                if ef & INDIRECT:
                    raise Err(Reason.NESTED_INDIRECT)
                take(ea, en, ef)
            break
        take(addr, ln, fl)
        if not fl & NEXT:
            break
        i = (i + 1) % num
    if bid >= num:
        raise Err(Reason.INVALID_BUFFER_ID)
    if bid in ids:
        raise Err(Reason.BUFFER_ID_IN_FLIGHT)
    if sum(n_ for _, n_ in readable + writable) > MAX_CHAIN_BYTES:
        raise Err(Reason.CHAIN_TOO_BIG)
    return bid, readable, writable, n


def segs(chain) -> tuple[list, list]:
    return (list(zip(chain.r_off, chain.r_len, strict=True)),
            list(zip(chain.w_off, chain.w_len, strict=True)))


# ---- target 1: the rings alone ----------------------------------------------------------------
# Each round an honest driver makes a few well-formed chains available (direct, or through an
# indirect table), then 0 to 4 fields anywhere in the ring areas are overwritten with edge
# values or random ones (a hostile driver, or a buggy one): most examples are chains the fast
# paths take, the rest every kind of fault and its mixtures.
SEG = st.tuples(st.integers(0, 15), st.sampled_from([1, 16, 48, 512, 513, 4096]))
VALUE = st.one_of(st.integers(0, 18), ADDR, LEN, FLAGS,
                  st.sampled_from([0xFFFF, 0x7FFF, 0x8000, AVAIL, USED, AVAIL | USED]))


@st.composite
def good_chain(draw, indirect: bool):
    """(segments [(addr, len, WRITE or 0)], through an indirect table or not)."""
    nr = draw(st.integers(0, 3))
    nw = draw(st.integers(0 if nr else 1, 3))
    segs = [(DATA + 0x200 * k, n, 0) for k, n in draw(st.lists(SEG, min_size=nr, max_size=nr))]
    segs += [(DATA + 0x200 * k, n, WRITE)
             for k, n in draw(st.lists(SEG, min_size=nw, max_size=nw))]
    return segs, indirect and draw(st.booleans())


# mutation: (area, entry, field, value) - areas: 0 the ring, 1 tables, 2 the avail ring - or
# (3, area, offset, raw bytes)
MUTATION = st.one_of(
    st.tuples(st.integers(0, 2), st.integers(0, 17), st.integers(0, 3), VALUE),
    st.tuples(st.just(3), st.integers(0, 2), st.integers(0, 0x7FF),
              st.binary(min_size=1, max_size=48)),
)
SPLIT_FIELDS = ((0, "<Q"), (8, "<I"), (12, "<H"), (14, "<H"))     # addr, len, flags, next
PACKED_FIELDS = ((0, "<Q"), (8, "<I"), (14, "<H"), (12, "<H"))    # addr, len, flags, id


def mutate(mv: memoryview, m, num: int, ring: int, avail: int | None, fields) -> None:
    area, entry, field, value = m
    if area == 3:                                   # raw bytes somewhere in one area
        base, size = ((ring, 16 * num), (SLOTS[0], 0x100 * len(SLOTS)),
                      (avail, 6 + 2 * num) if avail is not None else (ring, 16 * num))[entry]
        at = base - BASE + field % size
        n = min(len(value), base - BASE + size - at)
        mv[at:at + n] = value[:n]
        return
    if area == 2 and avail is not None:             # split: avail idx or an avail entry
        at = avail - BASE + (2 if entry == 0 else 4 + 2 * ((entry - 1) % num))
        struct.pack_into("<H", mv, at, value & 0xFFFF)
        return
    base = ring if area != 1 else SLOTS[entry % len(SLOTS)]
    i = entry % num if area != 1 else field
    off, fmt = fields[field if area != 1 else entry % 4]
    width = struct.calcsize(fmt)
    struct.pack_into(fmt, mv, base - BASE + 16 * i + off, value & ((1 << 8 * width) - 1))


@st.composite
def rounds(draw, num: int, indirect: bool):
    return draw(st.lists(st.tuples(
        st.lists(good_chain(indirect), max_size=num),
        st.lists(MUTATION, max_size=4) if draw(st.integers(0, 2)) else st.just([]),
        st.integers(1, 2 * num + 1),                                     # pop_batch limit
        st.lists(st.tuples(st.integers(0, 31), st.integers(0, 0xFFFF_FFFF)), max_size=num),
    ), min_size=1, max_size=4))


@st.composite
def split_case(draw):
    num = draw(st.sampled_from([1, 2, 4, 8, 16]))
    indirect = draw(st.booleans())
    return num, indirect, draw(st.booleans()), draw(rounds(num, indirect))


@FUZZ
@given(split_case())
def test_fuzz_split_ring_against_the_model(case):
    num, indirect, event_idx, plan = case
    ram = GuardedRam(RAM)
    q = SplitQueue(ram.mem, num, DESC, AVAIL_AT, USED_AT, event_idx, indirect)
    w = SplitWriter(ram, num, DESC, AVAIL_AT, USED_AT)
    try:
        mv = ram.mv
        last, seen, inflight, used = 0, 0, {}, 0     # inflight: head -> [wlen]
        for r, (chains_, mutations, limit, pushes) in enumerate(plan):
            # the honest part: chains from descriptor 0 on, as many as fit
            i, heads = 0, []
            for k, (sg, via_table) in enumerate(chains_):
                if via_table:
                    table = SLOTS[(k + r) % len(SLOTS)]
                    for j, (a, n, f) in enumerate(sg):
                        w.desc(j, a, n, f | (NEXT if j < len(sg) - 1 else 0), j + 1, table=table)
                    w.desc(i, table, 16 * len(sg), INDIRECT)
                    heads.append(i)
                    i += 1
                elif i + len(sg) <= num:
                    for j, (a, n, f) in enumerate(sg):
                        w.desc(i + j, a, n, f | (NEXT if j < len(sg) - 1 else 0), i + j + 1)
                    heads.append(i)
                    i += len(sg)
                if i >= num:
                    break
            w.publish(*heads)
            for m in mutations:
                mutate(mv, m, num, DESC, AVAIL_AT, SPLIT_FIELDS)
            # what the model expects of pop_batch(limit)
            want, reason = [], None
            n_inflight = sum(len(v) for v in inflight.values())
            m_last = last
            while len(want) < limit:
                try:
                    got, seen = model_split_pop(mv, num, m_last, seen, n_inflight, indirect)
                except Err as e:
                    reason = e.reason
                    break
                if got is None:
                    break
                want.append(got)
                m_last = (m_last + 1) & 0xFFFF
                n_inflight += 1
            event(f"refused: {reason.name}" if reason else f"accepted {min(len(want), 3)}+")
            try:
                chains = q.pop_batch(limit)
            except RingError as e:
                assert reason is not None, f"device refused ({e}) what the model accepts"
                assert e.reason is reason, (e, reason)
                assert q.last_avail_idx == (last + len(want)) & 0xFFFF
                assert ram.guards_intact()
                return
            assert reason is None or len(want) == limit, \
                f"device accepted what the model refuses: {reason}"
            assert len(chains) == len(want)
            for c, (head, rd, wr, ndescs) in zip(chains, want, strict=True):
                assert (c.head, *segs(c)) == (head, rd, wr)
                assert (c.rlen, c.wlen) == (sum(n for _, n in rd), sum(n for _, n in wr))
                assert c.ndescs == ndescs
                inflight.setdefault(head, []).append(c.wlen)
            last = q.last_avail_idx
            assert last == m_last
            # return some of what is in flight, any order, any written length <= wlen
            for pick, written in pushes:
                heads = [h for h, v in inflight.items() if v]
                if not heads:
                    break
                h = heads[pick % len(heads)]
                wlen = inflight[h].pop()
                n = written % (wlen + 1)
                q.push(h, n)
                used = (used + 1) & 0xFFFF
                assert struct.unpack_from("<H", mv, USED_AT - BASE + 2)[0] == used
                slot = USED_AT - BASE + 4 + 8 * ((used - 1) % num)
                assert struct.unpack_from("<II", mv, slot) == (h, n)
            assert q.inflight == sum(len(v) for v in inflight.values())
            # a driver that lied about avail idx: keep going from where the device is
            w.idx = q.avail_idx() if reason is None else w.idx
        assert ram.guards_intact()
    finally:
        q.release()
        ram.close()


@st.composite
def packed_case(draw):
    num = draw(st.sampled_from([1, 2, 3, 4, 5, 8]))
    indirect = draw(st.booleans())
    return num, indirect, draw(st.booleans()), draw(rounds(num, indirect))


@FUZZ
@given(packed_case())
def test_fuzz_packed_ring_against_the_model(case):
    num, indirect, event_idx, plan = case
    ram = GuardedRam(RAM)
    q = PackedQueue(ram.mem, num, DESC, AVAIL_AT, AVAIL_AT + 0x40, event_idx, indirect)
    w = PackedWriter(ram, num, DESC, AVAIL_AT, AVAIL_AT + 0x40)
    try:
        mv = ram.mv
        pos, wrap, ids = 0, 1, {}                   # the device's position, as the model has it
        upos, uwrap = 0, 1                          # the used position
        outstanding = 0                             # ring descriptors not yet used
        for r, (chains_, mutations, limit, pushes) in enumerate(plan):
            free = [b for b in range(num) if b not in ids]
            for k, (sg, via_table) in enumerate(chains_):
                need = 1 if via_table else len(sg)
                if not free or outstanding + need > num:
                    break
                bid = free.pop(0)
                if via_table:
                    w.indirect(SLOTS[(k + r) % len(SLOTS)], sg, bid)
                else:
                    w.chain(sg, bid)
                outstanding += need
            for m in mutations:
                mutate(mv, m, num, DESC, None, PACKED_FIELDS)
            want, reason = [], None
            m_pos, m_wrap, m_ids = pos, wrap, set(ids)
            while len(want) < limit:
                try:
                    got = model_packed_pop(mv, num, m_pos, m_wrap, m_ids, indirect)
                except Err as e:
                    reason = e.reason
                    break
                if got is None:
                    break
                want.append(got)
                m_ids.add(got[0])
                m_pos += got[3]
                if m_pos >= num:
                    m_pos, m_wrap = m_pos - num, m_wrap ^ 1
            event(f"refused: {reason.name}" if reason else f"accepted {min(len(want), 3)}+")
            try:
                chains = q.pop_batch(limit)
            except RingError as e:
                assert reason is not None, f"device refused ({e}) what the model accepts"
                assert e.reason is reason, (e, reason)
                assert (q.last_avail_idx, q.avail_wrap_counter) == (m_pos, m_wrap)
                assert ram.guards_intact()
                return
            assert reason is None or len(want) == limit, \
                f"device accepted what the model refuses: {reason}"
            assert len(chains) == len(want)
            for c, (bid, rd, wr, ndescs) in zip(chains, want, strict=True):
                assert (c.head, *segs(c)) == (bid, rd, wr)
                assert c.ndescs == ndescs
                ids[bid] = (c.wlen, ndescs)
            pos, wrap = m_pos, m_wrap
            assert (q.last_avail_idx, q.avail_wrap_counter) == (pos, wrap)
            if mutations:
                # the driver may have lost track (a mutated chain length): follow the device
                w.pos, w.wrap = pos, wrap
                outstanding = sum(n for _, n in ids.values())
            for pick, written in pushes:
                if not ids:
                    break
                bid = sorted(ids)[pick % len(ids)]
                wlen, ndescs = ids.pop(bid)
                n = written % (wlen + 1)
                q.push(bid, n)
                outstanding -= ndescs
                _, ln, uid, ufl = struct.unpack_from("<QIHH", mv, DESC - BASE + 16 * upos)
                assert (ln, uid) == (n, bid)
                assert ufl & (AVAIL | USED) == (AVAIL | USED if uwrap else 0)
                assert bool(ufl & WRITE) == bool(n)
                upos += ndescs
                if upos >= num:
                    upos, uwrap = upos - num, uwrap ^ 1
                assert (q.used_idx, q.used_wrap_counter) == (upos, uwrap)
        assert ram.guards_intact()
    finally:
        q.release()
        ram.close()


# ---- target 2: whole devices over virtio-mmio --------------------------------------------------
# An honest driver places requests (blk) or frames, receive buffers and control commands (net)
# in the rings, in every layout the spec allows; then nothing, or a few fields or raw bytes of
# the ring areas, tables and buffers are overwritten. Queues are mostly placed sanely, sometimes
# anywhere (any size, misaligned, outside RAM, overlapping each other).
SANE = {  # (desc, driver, device) of queue k for each format: aligned, apart, inside RAM
    False: lambda k: (BASE + 0x1000 + 0x800 * k, BASE + 0x1400 + 0x800 * k,
                      BASE + 0x1600 + 0x800 * k),
    True: lambda k: (BASE + 0x1000 + 0x800 * k, BASE + 0x1400 + 0x800 * k,
                     BASE + 0x1440 + 0x800 * k),
}
RING_ADDR = st.one_of(
    st.sampled_from([BASE + 0x1000, BASE + 0x1400, BASE + 0x1600, BASE + 0x1002, BASE + 0x1001,
                     BASE + 0x1008, BASE, END - 16, END - 64, END, BASE - 0x1000, 0, U64 - 7,
                     DATA, DATA + 0x200]),
    st.integers(0, RAM - 1).map(lambda o: BASE + o),
)
BLOB = st.tuples(st.integers(0, RAM - 1), st.binary(min_size=1, max_size=64))


@st.composite
def layout(draw, num_max: int, queues: int, extra_features: list[int]):
    """(packed, features, [(num, desc, driver, device)] per queue, sane)."""
    packed = draw(st.booleans())
    features = V1 | (PACKED if packed else 0)
    features |= sum(draw(st.sets(st.sampled_from([INDIRECT_DESC, EVENT_IDX, IN_ORDER,
                                                   *extra_features]))))
    sane = draw(st.integers(0, 4)) > 0
    if draw(st.integers(0, 15)) == 0:
        features |= 1 << draw(st.integers(0, 63))      # maybe one never offered
        sane = False
    out = []
    for k in range(queues):
        if sane or draw(st.booleans()):
            num = draw(st.sampled_from([num_max, num_max, num_max // 2, 1 if packed else 2]))
            out.append((num, *SANE[packed](k)))
        else:
            sane = False
            num = draw(st.sampled_from([0, 3, num_max + 1, 32768, 65535, num_max]))
            out.append((num, draw(RING_ADDR), draw(RING_ADDR), draw(RING_ADDR)))
    return packed, features, out, sane


class Bump:
    """Buffers for one round, one after another in the data area (so they never overlap)."""

    def __init__(self) -> None:
        self.at = DATA
        self.lied = False               # a request with its data in the wrong direction

    def take(self, n: int) -> int:
        gpa = self.at
        self.at += (n + 63) & ~63
        return gpa

    def fits(self, n: int) -> bool:
        return self.at + n + 64 <= END


def place(w, ram: GuardedRam, chains: list[tuple[list[tuple[int, int, int]], bool]],
          k0: int = 0) -> int:
    """Make each chain available (split: from descriptor 0 on; packed: at the driver's
    position, ids 0, 1, ...), directly or through an indirect table; returns how many."""
    n, i = 0, 0
    for k, (sg, via_table) in enumerate(chains):
        need = 1 if via_table else len(sg)
        if i + need > w.num:
            break
        if via_table:
            w.indirect(SLOTS[(k + k0) % len(SLOTS)], sg, i if not w.packed else k)
        elif w.packed:
            w.chain(sg, k)
        else:
            w.chain(sg, i)
        i += need
        n += 1
    return n


class BlkSpy:
    """Calls the device's real request handler and checks each answer against a model of
    virtio-blk (spec 5.2.6) at once, before a later request can change guest RAM."""

    def __init__(self, rig: Rig) -> None:
        self.rig = rig
        handler = rig.dev.handler
        real = type(handler).execute
        spy = self

        def execute(self, chain) -> int:
            return spy.check(chain, lambda: real(self, chain))

        # the same object, its class swapped for a subclass whose execute checks and calls
        # the real one (the handler's __slots__ leave no room for an attribute)
        handler.__class__ = type("SpiedHandler", (type(handler),),
                                 {"__slots__": (), "execute": execute})

    def check(self, chain, real) -> int:
        mv = self.rig.ram.mv
        disk = self.rig.dev.backend.mem
        r, w = segs(chain)
        hdr = chain.read_bytes(0, B.OUTHDR_SIZE)
        readable = chain.read_bytes(0, chain.rlen) if chain.rlen <= 1 << 20 else None
        expect, used = self.model(chain, hdr)
        written = real()
        status = mv[w[-1][0] + w[-1][1] - 1]
        event(f"blk status {status}")
        assert (status, written) == (expect, used), (hdr, r, w, status, written)
        # the bytes moved, where the request's buffers do not overlap each other
        spans = sorted(r + w)
        apart = all(a + n <= b for (a, n), (b, _) in itertools.pairwise(spans))
        if status == B.VIRTIO_BLK_S_OK and apart:
            typ, _, sector = B.OUTHDR.unpack(hdr)
            pos = sector * 512
            if typ == B.VIRTIO_BLK_T_IN:
                got = b"".join(bytes(mv[o:o + n]) for o, n in w)[:written - 1]
                assert got == bytes(disk[pos:pos + written - 1])
            elif typ == B.VIRTIO_BLK_T_OUT and readable is not None:
                assert bytes(disk[pos:pos + chain.rlen - 16]) == readable[16:]
        return written

    def model(self, chain, hdr: bytes) -> tuple[int, int]:
        """(status byte, used length) the spec and vmsim's rules give this request."""
        ok, ioerr, unsupp = B.VIRTIO_BLK_S_OK, B.VIRTIO_BLK_S_IOERR, B.VIRTIO_BLK_S_UNSUPP
        dev = self.rig.dev
        if chain.rlen < 16:
            return ioerr, 1
        typ, _, sector = B.OUTHDR.unpack(hdr)
        cap, seg_max = dev.backend.size, dev.seg_max
        if typ == B.VIRTIO_BLK_T_IN:
            n = chain.wlen - 1
            pieces = len(chain.writable_views(0, n))
            if chain.rlen != 16 or n % 512 or sector * 512 + n > cap or pieces > seg_max:
                return ioerr, 1
            return ok, n + 1
        if typ == B.VIRTIO_BLK_T_OUT:
            n = chain.rlen - 16
            pieces = len(chain.readable_views(16, n))
            if dev.readonly or chain.wlen != 1 or n % 512 or sector * 512 + n > cap \
                    or pieces > seg_max:
                return ioerr, 1
            return ok, 1
        if typ == B.VIRTIO_BLK_T_FLUSH and dev.handler.flush_ok:
            return ok, 1
        if typ == B.VIRTIO_BLK_T_GET_ID:
            return ok, min(B.VIRTIO_BLK_ID_BYTES, chain.wlen - 1) + 1
        return unsupp, 1


def _check_device_errors(rig: Rig, errors_before: int) -> None:
    """After a service pass: nothing escaped or leaked; an error is virtio_error's outcome,
    with the config-change interrupt if it came while the device was live."""
    dev = rig.dev
    rig.assert_survived()
    if dev.errors:
        assert dev.broken
        assert dev.status & S.DEVICE_NEEDS_RESET
    if len(dev.errors) > errors_before and dev.status & S.DRIVER_OK:
        assert rig.interrupts() & M.INT_CONFIG


def _bring_up(rig: Rig, features: int, layouts) -> bool:
    """As a driver would; False if the device refused its features."""
    if not rig.negotiate(features) & S.FEATURES_OK:
        assert not rig.dev.errors
        return False
    for i, (num, d, a, u) in enumerate(layouts):
        rig.program_queue(i, num, d, a, u)
        rig.ready(i)
    rig.driver_ok()
    return True


@st.composite
def blk_request(draw, bump: Bump, ram: GuardedRam):
    """One request's segments as a driver lays it out (the header split or not, the data in
    1-3 pieces, the status alone or sharing the last writable buffer)."""
    typ = draw(st.one_of(st.sampled_from([B.VIRTIO_BLK_T_IN, B.VIRTIO_BLK_T_IN,
                                          B.VIRTIO_BLK_T_OUT, B.VIRTIO_BLK_T_OUT,
                                          B.VIRTIO_BLK_T_FLUSH, B.VIRTIO_BLK_T_GET_ID,
                                          B.VIRTIO_BLK_T_DISCARD]),
                         st.integers(0, 0xFFFF_FFFF)))
    sector = draw(st.one_of(st.integers(0, 2047), st.sampled_from([2046, 2047, 2048, U64]),
                            st.integers(0, U64)))
    n = draw(st.sampled_from([0, 512, 512, 1024, 2048, 100, 513, 20]))
    if not bump.fits(n + 32):
        return None
    hdr = bump.take(16)
    struct.pack_into("<IIQ", ram.mv, hdr - BASE, typ, 0, sector)
    segs = [(hdr, 16, 0)] if draw(st.booleans()) else [(hdr, 8, 0), (hdr + 8, 8, 0)]
    data = bump.take(max(n, 1))
    ram.mv[data - BASE:data - BASE + n] = bytes((i * 13 + sector) & 0xFF for i in range(n))
    cuts = sorted(draw(st.sets(st.integers(1, max(n - 1, 1)), max_size=2))) if n > 1 else []
    pieces = [(data + a, b - a) for a, b in zip([0, *cuts], [*cuts, n], strict=True) if b > a]
    out = typ in (B.VIRTIO_BLK_T_OUT, B.VIRTIO_BLK_T_DISCARD)
    if draw(st.integers(0, 9)) == 0:
        out = not out                   # the data in the wrong direction
        bump.lied = True
    segs += [(a, ln, 0 if out else WRITE) for a, ln in pieces]
    status = bump.take(1)
    ram.mv[status - BASE] = 0xEE
    if not out and pieces and draw(st.booleans()) and pieces[-1][0] + pieces[-1][1] == status:
        segs[-1] = (segs[-1][0], segs[-1][1] + 1, WRITE)        # the status shares a buffer
    else:
        segs.append((status, 1, WRITE))
    return segs


@FUZZ
@given(layout(8, 1, []), st.data())
def test_fuzz_blk_device(lay, data):
    packed, features, layouts, sane = lay
    ram = GuardedRam(RAM)
    rig = Rig(lambda mem: make_blk(mem, packed=packed, offer=IN_ORDER, disk=1 << 20,
                                   readonly=data.draw(st.integers(0, 7)) == 0), guarded=ram)
    try:
        disk = rig.dev.backend.mem
        disk[:] = bytes(i * 7 & 0xFF for i in range(256)) * (len(disk) // 256)
        BlkSpy(rig)
        if not _bring_up(rig, features, layouts):
            rig.assert_survived()
            return
        q = rig.dev.queues[0]
        w = rig.writer(0) if sane else None
        honest = sane
        for r in range(data.draw(st.integers(1, 3))):
            mutations, blobs = [], []
            if w is not None:
                bump = Bump()
                reqs = [data.draw(blk_request(bump, ram)) for _ in range(data.draw(
                    st.integers(0, w.num)))]
                via = rig.dev.negotiated(F.VIRTIO_RING_F_INDIRECT_DESC) and data.draw(st.booleans())
                place(w, ram, [(sg, via) for sg in reqs if sg], r)
                honest = honest and not bump.lied
            if not sane or data.draw(st.integers(0, 2)) == 0:
                mutations = data.draw(st.lists(MUTATION, max_size=4))
                blobs = data.draw(st.lists(BLOB, max_size=3))
                num, d, a, _ = layouts[0]
                if d >= BASE and d - BASE + 16 * max(num, 1) <= RAM and a >= BASE \
                        and a - BASE + 6 + 2 * num <= RAM and num:
                    for m in mutations:
                        mutate(ram.mv, m, min(num, 18), d, None if packed else a,
                               PACKED_FIELDS if packed else SPLIT_FIELDS)
                for off, blob in blobs:
                    ram.mv[off:off + len(blob)] = blob[:RAM - off]
            errors = len(rig.dev.errors)
            broken = q.broken
            used_before = q.ring.n_used if q.ring is not None else 0
            rig.kick(0)
            n = rig.service(0)
            if broken:
                assert n == 0 and (q.ring.n_used if q.ring is not None else 0) == used_before
            _check_device_errors(rig, errors)
            for e in rig.dev.errors[errors:]:
                event("device error: " + next(r.name for r in Reason if r.value in e))
            honest = honest and not mutations and not blobs
            if honest:
                assert not rig.dev.errors, "an honest driver's requests were refused"
    finally:
        rig.close()
        ram.close()


NET_FEATURES = [1 << N.VIRTIO_NET_F_MRG_RXBUF, 1 << N.VIRTIO_NET_F_CTRL_VQ,
                1 << N.VIRTIO_NET_F_CTRL_RX, 1 << N.VIRTIO_NET_F_MAC, 1 << N.VIRTIO_NET_F_CSUM,
                1 << N.VIRTIO_NET_F_GUEST_CSUM, 1 << N.VIRTIO_NET_F_CTRL_MAC_ADDR]
WIRE_MAC = bytes.fromhex("5254000000ff")


def eth(dst: bytes, src: bytes, size: int, seq: int) -> bytes:
    body = bytes((i + seq) & 0xFF for i in range(max(size - 14, 0)))
    return (dst + src + b"\x88\xb5" + body)[:size]


@FUZZ
@given(layout(8, 3, NET_FEATURES), st.data())
def test_fuzz_net_device(lay, data):
    packed, features, layouts, sane = lay
    ram = GuardedRam(RAM)
    switch = Switch("lan")
    seen: list[bytes] = []
    port = switch.attach("wire", lambda f, meta: seen.append(f))
    rig = Rig(lambda mem: make_net(mem, packed=packed, switch=switch), guarded=ram)
    try:
        if not _bring_up(rig, features, layouts):
            rig.assert_survived()
            return
        sent, posted = [], 0
        honest = sane
        if sane:
            rx, tx, ctrl = (rig.writer(i) for i in range(3))
        for r in range(data.draw(st.integers(1, 3))):
            mutations, blobs = [], []
            if sane:
                bump = Bump()
                # receive buffers (only in the first round: the device holds them)
                if r == 0:
                    sizes = data.draw(st.lists(st.sampled_from([12, 64, 1526, 2048, 20]),
                                               max_size=rx.num))
                    posted = place(rx, ram, [([(bump.take(n), n, WRITE)], False)
                                             for n in sizes if bump.fits(n)], r)
                frames = [eth(WIRE_MAC, GUEST_MAC_, n, r * 16 + k) for k, n in enumerate(data.draw(
                    st.lists(st.sampled_from([60, 14, 1514, 100]), max_size=tx.num)))]
                chains = []
                for f in frames:
                    if not bump.fits(len(f) + 12):
                        break
                    at = bump.take(12 + len(f))
                    ram.mv[at - BASE:at - BASE + 12] = bytes(12)
                    ram.mv[at + 12 - BASE:at + 12 + len(f) - BASE] = f
                    chains.append(([(at, 12 + len(f), 0)] if data.draw(st.booleans())
                                   else [(at, 12, 0), (at + 12, len(f), 0)], False))
                    sent.append(f)
                del sent[len(sent) - len(frames) + place(tx, ram, chains, r):]
                if features & NET_FEATURES[1]:
                    at = bump.take(16)
                    cmd = data.draw(st.sampled_from([b"\x00\x00\x01", b"\x00\x01\x00",
                                                     b"\x01\x01" + GUEST_MAC_,
                                                     b"\x04\x00\x01\x00", b"\x63\x00"]))
                    ram.mv[at - BASE:at - BASE + len(cmd)] = cmd
                    place(ctrl, ram, [([(at, len(cmd), 0), (at + 15, 1, WRITE)], False)], r)
            if not sane or data.draw(st.integers(0, 2)) == 0:
                mutations = data.draw(st.lists(st.tuples(st.integers(0, 2), MUTATION),
                                               max_size=4))
                blobs = data.draw(st.lists(BLOB, max_size=3))
                for qi, m in mutations:
                    num, d, a, _ = layouts[qi]
                    if num and d >= BASE and d - BASE + 16 * num <= RAM and a >= BASE \
                            and a - BASE + 6 + 2 * num <= RAM:
                        mutate(ram.mv, m, min(num, 18), d, None if packed else a,
                               PACKED_FIELDS if packed else SPLIT_FIELDS)
                for off, blob in blobs:
                    ram.mv[off:off + len(blob)] = blob[:RAM - off]
            errors = len(rig.dev.errors)
            for qi in (1, 2, 0):
                rig.kick(qi)
                rig.service(qi)
            for k, size in enumerate(data.draw(st.lists(st.sampled_from([60, 1514, 9000, 14]),
                                                       max_size=3))):
                port.send(eth(GUEST_MAC_, WIRE_MAC, size, k), None)
            _check_device_errors(rig, errors)
            for e in rig.dev.errors[errors:]:
                event("device error: " + next(r.name for r in Reason if r.value in e))
            honest = honest and not mutations and not blobs
            if honest:
                assert not rig.dev.errors, "an honest driver's buffers were refused"
                assert seen == sent, "frames lost or changed on the way out"
        m = rig.dev.metrics
        event(f"net rx {min(m.rx_frames, 2)} tx {min(m.tx_frames, 2)}")
        assert posted >= 0
    finally:
        rig.close()
        switch.detach(port)
        ram.close()
