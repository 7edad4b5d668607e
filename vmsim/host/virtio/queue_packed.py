"""The packed virtqueue, device side (QEMU's virtqueue_packed_pop / _fill / _flush, vhost's
packed helpers), beside queue_split.py with the same method names.

The device polls one location: the descriptor at its next position. It is available when its
AVAIL bit equals the device's avail wrap counter and its USED bit does not. Its chain follows in
ring order (NEXT), wrapping at the end; the buffer ID is in the chain's last descriptor. A used
buffer is written back as one descriptor at the device's used position (id and len, then the
flags with AVAIL = USED = the used wrap counter, written last with one 16-bit store), and the
used position skips the chain's descriptors.

Views of guest RAM (each shared word one native load or store, DESIGN.md):

    ring_h    'H' view of the ring: desc i's id [8i+6], flags [8i+7]
    ring_i    'I' view: desc i's len [4i+2]
    drv_ev    'I' view of the driver event suppression area, read as one snapshot
    dev_ev    'H' view of the device event suppression area: [0] off_wrap, [1] flags

Everything the driver wrote is untrusted: a bad descriptor raises RingError with a reason.
"""

import struct

import numpy as np

from vmsim.abi import packed_ring as P
from vmsim.host.memory import GuestMemory, GuestMemoryError
from vmsim.host.virtio.chain import MAX_CHAIN_BYTES, DescChain, indirect_table_max
from vmsim.host.virtio.errors import Reason, RingError
from vmsim.host.virtio.queue import EMPTY_BUFS, EMPTY_CHAINS3, Bufs, Chains3, DeviceQueue
from vmsim.machine.barrier import full_barrier

NEXT = P.VRING_DESC_F_NEXT
WRITE = P.VRING_DESC_F_WRITE
INDIRECT = P.VRING_DESC_F_INDIRECT
F_AVAIL = P.F_AVAIL
F_USED = P.F_USED
WRAP_SHIFT = P.VRING_PACKED_EVENT_F_WRAP_CTR
ENABLE = P.VRING_PACKED_EVENT_FLAG_ENABLE
DISABLE = P.VRING_PACKED_EVENT_FLAG_DISABLE
DESC_EVENT = P.VRING_PACKED_EVENT_FLAG_DESC
UNPACK_DESC = P.DESC.unpack_from
_MAX = np.maximum
_GT = np.greater
_NNZ = np.count_nonzero
UNPACK_DESC3 = struct.Struct("<" + "QIHH" * 3).unpack_from
PACK_USED = struct.Struct("<IH").pack_into      # len, id (then the flags, alone)
# pop_chains3's constants as numpy values: a ring descriptor naming a three-entry table has
# len 48 and INDIRECT without NEXT (its id and the AVAIL / USED bits aside)
_HEAD_CHK = np.uint64(0xFFFFFFFF | (NEXT | INDIRECT) << 48)
_HEAD_TABLE3 = np.uint64(48 | INDIRECT << 48)
_THIRTY_TWO, _FORTY_EIGHT = np.uint64(32), np.uint64(48)
_ID_MASK, _U32 = np.uint64(0xFFFF), np.uint64(0xFFFFFFFF)
_SEVEN, _THREE, _ONE = np.uint64(7), np.uint64(3), np.uint64(1)
_WRITE, _INDIRECT = np.uint64(WRITE), np.uint64(INDIRECT)
_SIX = np.arange(6, dtype=np.intp)
_NO_WORDS = np.zeros(0, np.uint64)


class PackedQueue(DeviceQueue):
    """The device's view of one packed ring."""

    ring = "packed"
    batch3 = True

    def __init__(self, mem: GuestMemory, num: int, desc_addr: int, driver_addr: int,
                 device_addr: int, event_idx: bool, indirect: bool,
                 stats: memoryview | None = None, in_order: bool = False) -> None:
        if not 0 < num <= P.MAX_QUEUE_SIZE:
            raise RingError(Reason.INVALID_RING_SIZE, f"size {num}")
        for what, addr, align in (("descriptor ring", desc_addr, P.DESC_ALIGN),
                                  ("driver event area", driver_addr, P.EVENT_ALIGN),
                                  ("device event area", device_addr, P.EVENT_ALIGN)):
            if addr % align:
                raise RingError(Reason.MISALIGNED_RING, f"{what} at 0x{addr:x}, align {align}")
        try:
            self.desc_off = mem.offset_of(desc_addr, P.ring_size(num))
            ring = mem.translate(desc_addr, P.ring_size(num))
            self.drv_ev = mem.translate(driver_addr, P.EVENT_SIZE).cast("I")
            self.dev_ev = mem.translate(device_addr, P.EVENT_SIZE).cast("H")
        except GuestMemoryError as e:
            raise RingError(Reason.RING_OUT_OF_RANGE, str(e)) from None
        super().__init__(num, event_idx, indirect, in_order, stats)
        self.mem = mem
        self.ram = mem.mv
        self.mem_base = mem.base
        self.mem_size = mem.size
        self.ring_mv = ring
        self.ring_h = ring.cast("H")
        self.ring_i = mem.translate(desc_addr, P.ring_size(num)).cast("I")
        self.desc_addr, self.avail_addr, self.used_addr = desc_addr, driver_addr, device_addr
        self.last_avail_idx = 0          # next position the device reads
        self.avail_wrap_counter = 1
        self.used_idx = 0                # next position the device writes a used descriptor
        self.used_wrap_counter = 1
        self.used_laps = 0               # completed laps of the used position
        self.signalled_used = 0          # free-running (laps * num + position) at the last decision
        self.signalled_used_valid = False
        self.notify_flags = ENABLE       # shadow of the device event flags
        self.in_flight_ids = bytearray(num)   # 1 while a buffer id is with the device
        # numpy views for the batch paths (pop_bufs, push_used): the in-flight ids, the ring
        # as (num, 2) u64 words (addr; len | id << 32 | flags << 48), and each buffer's ring
        # descriptors (`_nd`, also for fill: a chain object may be stale after pop_bufs)
        self._ifl = np.frombuffer(self.in_flight_ids, np.uint8)
        ring_np = np.ndarray((num, 2), np.uint64, mem.mm, self.desc_off)
        self._w0 = ring_np[:, 0]
        self._w1 = ring_np[:, 1]
        self._nd_np = np.ones(num, np.int32)
        self._nd = memoryview(self._nd_np)
        self._multi_out = 0                     # buffers of > 1 ring descriptor in flight
        self._seen = np.zeros(num, np.uint8)
        # Constants as arrays, cut to a batch's length (a numpy scalar operand costs about
        # twice an array one): len | NEXT | INDIRECT (the check below), RAM's base, 1, WRITE,
        # RAM's last offset, the flags an available descriptor has in each lap (AVAIL and
        # USED bits of word 1), and a used descriptor's flags in each lap.
        mask = (F_AVAIL | F_USED) << 48
        self._consts = tuple(np.full(num, v, np.uint64) for v in (
            0xFFFFFFFF | (NEXT | INDIRECT) << 48, mem.base, 1, WRITE << 48, mem.size - 1,
            mask, F_USED << 48, F_AVAIL << 48, 0, mask, 32))
        self._cuts: dict[int, tuple] = {}
        # pop_chains3: RAM as u64 words (indirect tables), and its bounds as numpy values
        self.ram_q_np = np.ndarray(mem.size >> 3, np.uint64, mem.mm)
        self._base_u = np.uint64(mem.base)
        self._table_last = np.uint64(max(mem.size - 48, 0))
        self._ram_last = np.uint64(max(mem.size - 1, 0))
        self._chains = [DescChain(mem) for _ in range(num)]  # by buffer id
        self._pending_used: list[tuple[int, int, int]] = []  # in-order batch: (id, len, ndescs)
        self.dev_ev[P.EVENT_H_OFF_WRAP] = 0
        self.dev_ev[P.EVENT_H_FLAGS] = ENABLE

    # ---- avail side ------------------------------------------------------------------------------
    def has_work(self) -> bool:
        flags = self.ring_h[8 * self.last_avail_idx + 7]
        w = self.avail_wrap_counter
        return bool(flags & F_AVAIL) == bool(w) and bool(flags & F_USED) != bool(w)

    def avail_position(self) -> int:
        """The next position and wrap counter, as off_wrap."""
        return self.last_avail_idx | self.avail_wrap_counter << WRAP_SHIFT

    def pop_batch(self, limit: int = 1 << 16) -> list[DescChain]:
        """Every available chain (at most `limit`), validated, in ring order."""
        out: list[DescChain] = []
        ring_h = self.ring_h
        num = self.num
        rbytes = 0
        try:
            while len(out) < limit:
                pos = self.last_avail_idx
                w = self.avail_wrap_counter
                flags = ring_h[8 * pos + 7]
                a = bool(flags & F_AVAIL)
                u = bool(flags & F_USED)
                if a != bool(w) or u == bool(w):
                    if a == u == bool(w):
                        # Looks used in the device's current lap at a position the device
                        # has not used yet: only the driver can have written that.
                        raise RingError(Reason.USED_FLAG_BY_DRIVER,
                                        f"descriptor {pos} flags 0x{flags:04x}")
                    break
                if self.inflight >= num:
                    raise RingError(Reason.TOO_MANY_IN_FLIGHT,
                                    f"{self.inflight} buffers not yet used")
                # The flags were read first: the rest of the chain is valid now (TSO).
                chain = self._fast(pos)
                if chain is None:
                    chain, ndescs = self._walk(pos, w)
                else:
                    ndescs = chain.ndescs
                npos = pos + ndescs
                if npos >= num:
                    npos -= num
                    self.avail_wrap_counter ^= 1
                self.last_avail_idx = npos
                self.in_flight_ids[chain.head] = 1
                self._nd[chain.head] = ndescs
                if ndescs > 1:
                    self._multi_out += 1
                self.inflight += 1
                rbytes += chain.rlen
                out.append(chain)
        finally:
            self.n_popped += len(out)
            self.n_bytes_read += rbytes
        return out

    def _fast(self, pos: int) -> DescChain | None:
        """The common buffer, read with few calls: a three-entry indirect table, or three
        descriptors in a row (a block request: header, data, status). Returns the filled chain,
        or None for anything else - every error included - which _walk then reports."""
        ram = self.ram
        at = self.desc_off + 16 * pos
        a0, l0, bid, f0 = UNPACK_DESC(ram, at)
        base = self.mem_base
        size = self.mem_size
        if f0 & (INDIRECT | NEXT) == INDIRECT:
            if l0 != 48 or not self.indirect:
                return None
            t = a0 - base
            if t < 0 or t > size - 48:
                return None
            a0, l0, _, f0, a1, l1, _, f1, a2, l2, _, f2 = UNPACK_DESC3(ram, t)
            if (f0 | f1 | f2) & INDIRECT:
                return None
            ndescs = 1
        elif f0 & (INDIRECT | NEXT) == NEXT and pos + 3 <= self.num:
            _, _, _, _, a1, l1, _, f1, a2, l2, bid, f2 = UNPACK_DESC3(ram, at)
            if f1 & (INDIRECT | NEXT) != NEXT or f2 & (INDIRECT | NEXT):
                return None
            ndescs = 3
        else:
            return None
        o0 = a0 - base
        o1 = a1 - base
        o2 = a2 - base
        if (o0 < 0 or o1 < 0 or o2 < 0 or not (0 < l0 <= size - o0 and 0 < l1 <= size - o1
                                               and 0 < l2 <= size - o2)
                or bid >= self.num or self.in_flight_ids[bid]):
            return None
        if l0 + l1 + l2 > MAX_CHAIN_BYTES:
            return None
        w = (f0 & WRITE) | (f1 & WRITE) << 1 | (f2 & WRITE) << 2
        chain = self._chains[bid]
        if w == 12:                # read, write, write: a block read
            chain.r_off, chain.r_len, chain.w_off, chain.w_len = [o0], [l0], [o1, o2], [l1, l2]
            chain.rlen, chain.wlen = l0, l1 + l2
        elif w == 8:               # read, read, write: a block write
            chain.r_off, chain.r_len, chain.w_off, chain.w_len = [o0, o1], [l0, l1], [o2], [l2]
            chain.rlen, chain.wlen = l0 + l1, l2
        else:
            return None
        chain.head = bid
        chain.ndescs = ndescs
        return chain

    def _walk(self, pos: int, wrap: int) -> tuple[DescChain, int]:
        """Read the chain whose first descriptor is at `pos`; returns the chain (kept under
        its buffer id) and how many ring descriptors it takes."""
        ram = self.ram
        base = self.mem_base
        size = self.mem_size
        num = self.num
        desc_off = self.desc_off
        r_off: list[int] = []
        r_len: list[int] = []
        w_off: list[int] = []
        w_len: list[int] = []
        rlen = wlen = 0
        i = pos
        n = 0
        while True:
            addr, ln, bid, fl = UNPACK_DESC(ram, desc_off + 16 * i)
            n += 1
            if n > num:
                raise RingError(Reason.CHAIN_TOO_LONG, f"chain from position {pos}")
            if fl & INDIRECT:
                if not self.indirect:
                    raise RingError(Reason.INDIRECT_NOT_NEGOTIATED, f"descriptor {i}")
                if fl & NEXT:
                    raise RingError(Reason.INDIRECT_WITH_NEXT, f"descriptor {i}")
                if n > 1:
                    raise RingError(Reason.INDIRECT_IN_CHAIN, f"descriptor {i}")
                rlen, wlen = self._indirect(addr, ln, i, r_off, r_len, w_off, w_len)
                break
            off = addr - base
            if off < 0 or not 0 < ln <= size - off:
                if ln == 0:
                    raise RingError(Reason.ZERO_LENGTH, f"descriptor {i}")
                raise RingError(Reason.ADDRESS_OUT_OF_RANGE,
                                f"descriptor {i}: 0x{addr:x}+0x{ln:x} is outside guest RAM")
            if fl & WRITE:
                w_off.append(off)
                w_len.append(ln)
                wlen += ln
            else:
                if wlen:
                    raise RingError(Reason.READABLE_AFTER_WRITABLE, f"descriptor {i}")
                r_off.append(off)
                r_len.append(ln)
                rlen += ln
            if not fl & NEXT:
                break
            i += 1
            if i >= num:
                i = 0
        # "Buffer ID is included in the last descriptor in the list."
        if bid >= num:
            raise RingError(Reason.INVALID_BUFFER_ID, f"buffer id {bid} >= queue size {num}")
        if self.in_flight_ids[bid]:
            raise RingError(Reason.BUFFER_ID_IN_FLIGHT, f"buffer id {bid}")
        if rlen + wlen > MAX_CHAIN_BYTES:
            raise RingError(Reason.CHAIN_TOO_BIG, f"{rlen + wlen} bytes at position {pos}")
        chain = self._chains[bid]
        chain.head = bid
        chain.r_off, chain.r_len, chain.w_off, chain.w_len = r_off, r_len, w_off, w_len
        chain.rlen = rlen
        chain.wlen = wlen
        chain.ndescs = n
        return chain, n

    def _indirect(self, addr: int, ln: int, i: int, r_off: list[int], r_len: list[int],
                  w_off: list[int], w_len: list[int]) -> tuple[int, int]:
        """Read an indirect table: its entries in order (only WRITE is meaningful in them)."""
        if ln == 0 or ln % P.DESC_SIZE:
            raise RingError(Reason.INDIRECT_BAD_LENGTH, f"length {ln} at descriptor {i}")
        if ln // P.DESC_SIZE > indirect_table_max(self.num):
            raise RingError(Reason.CHAIN_TOO_LONG, f"indirect table of {ln // P.DESC_SIZE}")
        base = self.mem_base
        size = self.mem_size
        toff = addr - base
        if toff < 0 or toff + ln > size:
            raise RingError(Reason.INDIRECT_OUT_OF_RANGE,
                            f"table 0x{addr:x}+0x{ln:x} is outside guest RAM")
        ram = self.ram
        rlen = wlen = 0
        for j in range(ln // P.DESC_SIZE):
            a, n, _bid, fl = UNPACK_DESC(ram, toff + 16 * j)
            if fl & INDIRECT:
                raise RingError(Reason.NESTED_INDIRECT, f"entry {j} of the table at 0x{addr:x}")
            off = a - base
            if off < 0 or not 0 < n <= size - off:
                if n == 0:
                    raise RingError(Reason.ZERO_LENGTH, f"indirect entry {j}")
                raise RingError(Reason.ADDRESS_OUT_OF_RANGE,
                                f"indirect entry {j}: 0x{a:x}+0x{n:x} is outside guest RAM")
            if fl & WRITE:
                w_off.append(off)
                w_len.append(n)
                wlen += n
            else:
                if wlen:
                    raise RingError(Reason.READABLE_AFTER_WRITABLE, f"indirect entry {j}")
                r_off.append(off)
                r_len.append(n)
                rlen += n
        return rlen, wlen

    def pop_bufs(self, limit: int = 1 << 16) -> Bufs | None:
        """Every available buffer (at most `limit`, up to the ring's end) that is one direct
        descriptor, as arrays, with a few numpy operations: the flags words of the run are
        read first, as one copy of the descriptors' second u64 words (len, id and flags read
        together, each word one native load); the addresses after them (TSO keeps loads in
        order). Stops before anything else - a chain, a fault - and returns None if that is
        the first, for pop_batch to take or report."""
        snap = self._avail_run(limit)
        if snap is None or not len(snap):
            return EMPTY_BUFS if snap is not None else None
        pos = self.last_avail_idx
        num = self.num
        k = len(snap)
        cm = self._cut(k)
        c_chk, c_base, c_one, c_write, c_last = cm[:5]
        addr = self._w0[pos:pos + k]
        # x = len - 1 for a valid buffer (an empty one wraps to huge; NEXT or INDIRECT make
        # it >= 2**48); off wraps to huge below RAM; off + x, the last byte, wraps below off
        # or x if either is huge: one compare of the largest with RAM's last offset.
        x = (snap & c_chk) - c_one
        off = addr - c_base
        ids = snap.view(np.uint16)[2::4].astype(np.intp)      # bits 32-47: the buffer id
        bad = _NNZ(_GT(_MAX(off + x, _MAX(off, x)), c_last))
        if not bad:
            seen = self._seen
            seen[ids] = 1
            bad = _NNZ(seen) != k or _NNZ(self._ifl[ids]) != 0
            seen[ids] = 0
        if bad:
            return self._pop_bufs_prefix(k)
        ln = x + c_one
        writable = (snap & c_write).astype(bool)
        nw = _NNZ(writable)
        rbytes = 0 if nw == k else int(ln[~writable].sum())
        self._ifl[ids] = 1
        self._nd_np[ids] = 1
        pos += k
        if pos == num:
            pos = 0
            self.avail_wrap_counter ^= 1
        self.last_avail_idx = pos
        self.inflight += k
        self.n_popped += k
        self.n_bytes_read += rbytes
        out = Bufs(ids, off, ln, writable)
        if pos == 0 and k < limit:
            # the run reached the ring's end: the rest of it starts the next lap
            more = self.pop_bufs(limit - k)
            if more is not None and len(more.heads):
                out = Bufs(*(np.concatenate(pair) for pair in zip(out, more, strict=True)))
        return out

    def _avail_run(self, limit: int) -> np.ndarray | None:
        """The len | id | flags words of the available run from the device's position (at
        most `limit`, the ring's room, and up to the ring's end), copied once; empty when
        nothing is available; None when the next entry is already a fault, for pop_batch to
        name. The batch paths read these first, the addresses after them (TSO)."""
        pos = self.last_avail_idx
        m = min(self.num - pos, limit, self.num - self.inflight)
        if m <= 0:
            return None if self.has_work() else _NO_WORDS
        w = self.avail_wrap_counter
        # One native load of the next descriptor's flags first: a polling device mostly finds
        # nothing, and this answers that for a tenth of the batch check's cost.
        if self.ring_h[8 * pos + 7] & (F_AVAIL | F_USED) != (F_AVAIL if w else F_USED):
            return None if self._used_by_driver(pos, w) else _NO_WORDS
        snap = self._w1[pos:pos + m].copy()
        cm = self._cut(m)
        avail = (snap & cm[5]) == cm[7 if w else 6]
        k = int(avail.argmin())
        return snap if avail[k] else snap[:k]      # (k >= 1: the first one is available)

    def has_at_least(self, k: int) -> bool:
        """Whether k descriptors are available from the device's position (they are made
        available in ring order: the k-th one's flags tell)."""
        pos = self.last_avail_idx + k - 1
        w = self.avail_wrap_counter
        if pos >= self.num:
            pos -= self.num
            w ^= 1
            if pos >= self.last_avail_idx:
                return False
        return self.ring_h[8 * pos + 7] & (F_AVAIL | F_USED) == (F_AVAIL if w else F_USED)

    def pop_chains3(self, limit: int = 1 << 16) -> Chains3 | None:
        """Every available buffer (at most `limit`, up to the ring's end) that is one ring
        descriptor naming a three-entry indirect table, as arrays, validated with numpy
        operations per batch as pop_batch checks each (flags, the table inside RAM, entries
        not indirect, readable before writable, non-empty and inside RAM, ids in range,
        distinct and not in flight). Stops before anything else - a chain in the ring, a
        fault - and returns None if that is the first, for pop_batch to take or report. The
        flags words are read first, the addresses and tables after them (TSO)."""
        snap = self._avail_run(limit)
        if snap is None or not len(snap):
            return EMPTY_CHAINS3 if snap is not None else None
        pos = self.last_avail_idx
        num = self.num
        k = len(snap)
        t = self._w0[pos:pos + k] - self._base_u
        ids = (snap >> _THIRTY_TWO) & _ID_MASK
        ok = ((snap & _HEAD_CHK) == _HEAD_TABLE3) & (t <= self._table_last) \
            & ((t & _SEVEN) == 0) & (ids < num)
        if not self.indirect:
            ok[:] = False
        at = np.where(ok, t >> _THREE, 0).astype(np.intp)
        words = self.ram_q_np[at[:, None] + _SIX]
        we = words[:, 1::2]                 # len | id << 32 | flags << 48, per entry
        ln = we & _U32
        fl = we >> _FORTY_EIGHT
        off = words[:, ::2] - self._base_u
        writable = (fl & _WRITE).astype(bool)
        x = ln - _ONE
        worst = _MAX(off + x, _MAX(off, x))
        ok &= ((fl & _INDIRECT) == 0).all(1) & (worst <= self._ram_last).all(1) \
            & (writable[:, :2] <= writable[:, 1:]).all(1)
        if self.mem_size > MAX_CHAIN_BYTES // 3:
            ok &= ln.sum(1) <= MAX_CHAIN_BYTES
        n = k
        if not ok.all():
            n = int((~ok).argmax())
            if n == 0:
                return None
            ids, off, ln, writable = ids[:n], off[:n], ln[:n], writable[:n]
        ids = ids.astype(np.intp)
        seen = self._seen
        seen[ids] = 1
        bad = _NNZ(seen) != n or _NNZ(self._ifl[ids]) != 0
        seen[ids] = 0
        if bad:
            return None        # an id twice or in flight: pop_batch takes one at a time
        self._ifl[ids] = 1
        self._nd_np[ids] = 1
        pos += n
        if pos == num:
            pos = 0
            self.avail_wrap_counter ^= 1
        self.last_avail_idx = pos
        ln = ln.astype(np.int64)
        self.inflight += n
        self.n_popped += n
        self.n_bytes_read += int(ln[~writable].sum())
        return Chains3(ids, off.astype(np.int64), ln, writable)

    def _cut(self, n: int) -> tuple:
        """The constants cut to length n (cached: batches come in few lengths)."""
        c = self._cuts.get(n)
        if c is None:
            if len(self._cuts) > 64:
                self._cuts.clear()
            c = self._cuts[n] = tuple(a[:n] for a in self._consts)
        return c

    def _used_by_driver(self, pos: int, w: int) -> bool:
        flags = self.ring_h[8 * pos + 7]
        return bool(flags & F_AVAIL) == bool(flags & F_USED) == bool(w)

    def _pop_bufs_prefix(self, k: int) -> Bufs | None:
        """A fault among the next k buffers: the good ones before it, one by one (rare)."""
        return DeviceQueue.pop_bufs(self, k)

    def push_used(self, heads: np.ndarray, written: "np.ndarray | int") -> None:
        """Return many buffers (by id) at once: one u64 store each of len | id | flags at the
        used positions (len and id published with their flags in one native store), when
        every buffer in flight is one descriptor; otherwise one by one (fill / flush)."""
        n = len(heads)
        if not n:
            return
        if self.in_order or self._pending_used or self._multi_out:
            DeviceQueue.push_used(self, heads, written)
            return
        ids = np.asarray(heads, np.uint64)
        c = self._cut(n)
        if isinstance(written, int):
            lo = ids << c[10]
            if written:
                lo |= np.uint64(written | WRITE << 48)
            nbytes = written * n
        else:
            wr = np.asarray(written, np.uint64)
            lo = wr | ids << c[10] | (wr != 0).astype(np.uint64) << np.uint64(
                48 + 1)                                     # WRITE is bit 1 of the flags
            nbytes = int(wr.sum())
        pos = self.used_idx
        num = self.num
        w1 = self._w1
        k = min(n, num - pos)
        # a used descriptor's AVAIL and USED bits both equal the wrap counter
        w1[pos:pos + k] = lo[:k] | c[9][:k] if self.used_wrap_counter else lo[:k]
        pos += k
        if pos == num:
            pos = 0
            self.used_wrap_counter ^= 1
            self.used_laps += 1
            if n > k:
                w1[:n - k] = lo[k:] | c[9][:n - k] if self.used_wrap_counter else lo[k:]
                pos = n - k
        self.used_idx = pos
        self._ifl[heads] = 0
        self.inflight -= n
        self.n_used += n
        self.n_bytes_written += nbytes

    # ---- used side -------------------------------------------------------------------------------
    def fill(self, chain: DescChain | int, written: int) -> None:
        """Mark a buffer used (`written` bytes). With VIRTIO_F_IN_ORDER the used descriptor is
        held back so that a batch can be written as one (flush writes it)."""
        bid = chain if isinstance(chain, int) else chain.head
        nd = self._nd[bid]
        if nd > 1:
            self._multi_out -= 1
        self.in_flight_ids[bid] = 0
        self.inflight -= 1
        self.n_used += 1
        self.n_bytes_written += written
        if self.in_order:
            self._pending_used.append((bid, written, nd))
            return
        self._write_used(bid, written, nd)

    def _write_used(self, bid: int, written: int, skip: int) -> None:
        pos = self.used_idx
        wrap = self.used_wrap_counter
        PACK_USED(self.ring_mv, 16 * pos + 8, written, bid)
        flags = (F_AVAIL | F_USED if wrap else 0) | (WRITE if written else 0)
        # id and len are written; now the flags that publish them.
        self.ring_h[8 * pos + 7] = flags
        pos += skip
        if pos >= self.num:
            pos -= self.num
            self.used_wrap_counter ^= 1
            self.used_laps += 1
        self.used_idx = pos

    def flush(self) -> None:
        """Publish what was filled. In order, a batch becomes one used descriptor carrying
        the last buffer's id, and the used position skips all of the batch's descriptors."""
        pending = self._pending_used
        if not pending:
            return
        skip = sum(p[2] for p in pending)
        bid, written, _ = pending[-1]
        pending.clear()
        self._write_used(bid, written, skip)

    def fill_batch(self, chains: list[DescChain], written: list[int]) -> None:
        for chain, n in zip(chains, written, strict=True):
            self.fill(chain, n)
        self.flush()

    def need_notify(self) -> bool:
        """virtio_packed_should_notify."""
        # The used flags must be visible before the driver's event suppression is read.
        full_barrier()
        snap = self.drv_ev[0]
        flags = snap >> 16 & 0x3
        # Positions run free (laps * num + offset) so that the window of what was used since
        # the last decision is exact even across laps: a 16-bit window mod num cannot tell
        # "nothing new" from "a whole lap", nor a lap and a half from half a lap.
        num = self.num
        laps = self.used_laps
        new = laps * num + self.used_idx
        old = self.signalled_used
        self.signalled_used = new
        valid = self.signalled_used_valid
        self.signalled_used_valid = True
        if flags == DISABLE:
            needs = False
        elif flags == ENABLE or not self.event_idx or not valid:
            needs = True
        else:
            off_wrap = snap & 0xFFFF
            # The event names a descriptor by offset and lap parity: its latest occurrence
            # before the used position is in this lap or the one before (QEMU's
            # vring_packed_need_event), or two laps back if it is still ahead in this one.
            if off_wrap >> WRAP_SHIFT != self.used_wrap_counter:
                laps -= 1
            event = laps * num + (off_wrap & ~(1 << WRAP_SHIFT))
            if event >= new:
                event -= 2 * num
            needs = event >= old
        if needs:
            self.n_interrupts += 1
        else:
            self.n_interrupts_suppressed += 1
        return needs

    # ---- notification suppression ----------------------------------------------------------------
    def disable_notify(self) -> None:
        """The device is polling: ask for no kicks."""
        if self.notify_flags != DISABLE:
            self.notify_flags = DISABLE
            self.dev_ev[P.EVENT_H_FLAGS] = DISABLE

    def enable_notify(self) -> bool:
        """Ask for kicks again (at the next position, with EVENT_IDX); True if a buffer was
        made available meanwhile."""
        if self.event_idx:
            # offset and wrap counter first, then the flags
            self.dev_ev[P.EVENT_H_OFF_WRAP] = self.avail_position()
            self.notify_flags = DESC_EVENT
        else:
            self.notify_flags = ENABLE
        self.dev_ev[P.EVENT_H_FLAGS] = self.notify_flags
        full_barrier()
        return self.has_work()

    def wait_for_more(self) -> bool:
        # The first position past what is available now (a short walk, only when starved) ...
        ring_h = self.ring_h
        pos, w = self.last_avail_idx, self.avail_wrap_counter
        for _ in range(self.num):
            flags = ring_h[8 * pos + 7]
            if bool(flags & F_AVAIL) != bool(w) or bool(flags & F_USED) == bool(w):
                break
            pos += 1
            if pos == self.num:
                pos = 0
                w ^= 1
        # ... and a kick for every buffer made available from now on: an event offset would
        # have to name a descriptor the driver has not reached, which it may never write.
        self.notify_flags = ENABLE
        self.dev_ev[P.EVENT_H_FLAGS] = ENABLE
        full_barrier()
        flags = ring_h[8 * pos + 7]
        return bool(flags & F_AVAIL) == bool(w) and bool(flags & F_USED) != bool(w)

    def mark(self) -> tuple:
        return (self.last_avail_idx, self.avail_wrap_counter, self.inflight, self.n_popped,
                self.n_bytes_read)

    def rewind(self, mark: tuple, chains: list[DescChain]) -> None:
        (self.last_avail_idx, self.avail_wrap_counter, self.inflight, self.n_popped,
         self.n_bytes_read) = mark
        for chain in chains:
            self.in_flight_ids[chain.head] = 0
            if self._nd[chain.head] > 1:
                self._multi_out -= 1

    def check_notification(self, data: int) -> bool:
        """next_off / next_wrap of a notification must not be ahead of the ring. Positions are
        compared modulo two laps (the wrap counter is the lap's parity): up to one lap ahead
        of the device, every descriptor before the position must be available (the one just
        before it is checked); otherwise the position is one the device has passed, which is
        fine: the driver computes the value when it kicks, which can be after the device took
        those buffers. (With one bit of lap, "a lap and one ahead" reads as "a lap less one
        behind"; the format cannot tell them apart.)"""
        nxt = data >> 16
        off = nxt & 0x7FFF
        nwrap = nxt >> 15
        num = self.num
        if off >= num:
            return False
        laps = 2 * num
        dev = self.last_avail_idx + (0 if self.avail_wrap_counter else num)
        ahead = (off + (0 if nwrap else num) - dev) % laps
        if ahead == 0 or ahead > num:
            return True                 # at or behind the device
        last, lw = (off - 1, nwrap) if off > 0 else (num - 1, nwrap ^ 1)
        flags = self.ring_h[8 * last + 7]
        return bool(flags & F_AVAIL) == bool(lw) and bool(flags & F_USED) != bool(lw)

    def ring_positions(self) -> tuple[int, int]:
        return (self.last_avail_idx | self.avail_wrap_counter << WRAP_SHIFT,
                self.used_idx | self.used_wrap_counter << WRAP_SHIFT)

    def release(self) -> None:
        for v in (self.ring_h, self.ring_i, self.ring_mv, self.drv_ev, self.dev_ev):
            v.release()
        # the numpy views hold exports of the mapping, which must go before it is closed
        self._w0 = self._w1 = self.ram_q_np = None
