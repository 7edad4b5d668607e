"""The split virtqueue, device side: Linux's vringh / vhost role (drivers/vhost/vringh.c,
vhost.c), with the checks of QEMU and rust-vmm's virtio-queue.

`pop` takes the next available chain, walking NEXT and INDIRECT descriptors and handing out
each buffer as a memoryview of guest RAM (no copies); `push` returns a chain with its written
length; `need_notify` decides whether the driver must be interrupted (vhost_notify);
`enable_notify` / `disable_notify` publish avail_event or VRING_USED_F_NO_NOTIFY.

Everything read from the ring is untrusted: a bad descriptor raises RingError with a specific
reason, which the device turns into virtio_error. The views below are the same casts the
driver uses (see vmsim.guest.virtio.ring_split), each shared field one native load or store.
"""

import struct

import numpy as np

from vmsim.abi import split_ring as R
from vmsim.host.memory import GuestMemory, GuestMemoryError
from vmsim.host.virtio.chain import MAX_CHAIN_BYTES, DescChain, indirect_table_max
from vmsim.host.virtio.errors import Reason, RingError
from vmsim.host.virtio.queue import EMPTY_BUFS, EMPTY_CHAINS3, Bufs, Chains3, DeviceQueue
from vmsim.machine.barrier import full_barrier

NEXT = R.VRING_DESC_F_NEXT
WRITE = R.VRING_DESC_F_WRITE
INDIRECT = R.VRING_DESC_F_INDIRECT
U32 = 0xFFFFFFFF
UNPACK_DESC = R.DESC.unpack_from
UNPACK_DESC3 = struct.Struct("<" + "QIHH" * 3).unpack_from
_MAX = np.maximum
_GT = np.greater
_NNZ = np.count_nonzero
_NO_HEADS = np.zeros(0, np.intp)
_SIX = np.arange(6, dtype=np.intp)
# pop_chains3's constants, as numpy values (a Python int operand costs a conversion per op)
_LOW48 = np.uint64((1 << 48) - 1)
_IND48 = np.uint64(INDIRECT << 32 | 48)
_SEVEN, _THREE, _ONE = np.uint64(7), np.uint64(3), np.uint64(1)
_THIRTY_TWO, _U32, _WRITE = np.uint64(32), np.uint64(U32), np.uint64(WRITE)
_LINK_BITS = np.array([0xFFFF0000 | NEXT | INDIRECT, 0xFFFF0000 | NEXT | INDIRECT,
                       NEXT | INDIRECT], np.uint64)
_EXPECT_TABLE = np.array([1 << 16 | NEXT, 2 << 16 | NEXT, 0], np.uint64)


class SplitQueue(DeviceQueue):
    """The device's view of one split ring."""

    ring = "split"
    batch3 = True

    def __init__(self, mem: GuestMemory, num: int, desc_addr: int, avail_addr: int,
                 used_addr: int, event_idx: bool, indirect: bool,
                 stats: memoryview | None = None, in_order: bool = False) -> None:
        if not R.is_power_of_two(num) or num > R.MAX_QUEUE_SIZE:
            raise RingError(Reason.INVALID_RING_SIZE, f"size {num}")
        for what, addr, align in (("descriptor table", desc_addr, R.DESC_ALIGN),
                                  ("avail ring", avail_addr, R.AVAIL_ALIGN),
                                  ("used ring", used_addr, R.USED_ALIGN)):
            if addr % align:
                raise RingError(Reason.MISALIGNED_RING, f"{what} at 0x{addr:x}, align {align}")
        try:
            self.desc_off = mem.offset_of(desc_addr, R.desc_table_size(num))
            self.avail_h = mem.translate(avail_addr, R.avail_size(num)).cast("H")
            self.used_h = mem.translate(used_addr, R.used_size(num)).cast("H")
            self.used_i = mem.translate(used_addr, 4 + R.USED_ELEM_SIZE * num).cast("I")
        except GuestMemoryError as e:
            raise RingError(Reason.RING_OUT_OF_RANGE, str(e)) from None
        super().__init__(num, event_idx, indirect, in_order, stats)
        self.mem = mem
        self.ram = mem.mv
        self.mem_base = mem.base
        self.mem_size = mem.size
        self.mask = num - 1
        self.desc_addr, self.avail_addr, self.used_addr = desc_addr, avail_addr, used_addr
        self.used_event_at = R.avail_h_used_event(num)
        self.avail_event_at = R.used_h_avail_event(num)
        self.last_avail_idx = 0      # next avail entry the device will take
        self.avail_seen = 0          # avail->idx as last read
        self.avail_seen_now = 0      # avail->idx as a batch path last read it
        self.last_used_idx = 0       # next used entry the device will fill (= used->idx)
        self.signalled_used = 0
        self.signalled_used_valid = False
        self._used_at_signal = 0
        self.used_flags = 0          # shadow of used->flags
        self._pending_used: list[tuple[int, int]] = []   # in-order batch: (head, written)
        self._chains = [DescChain(mem) for _ in range(num)]  # one per head: no allocation per pop
        # numpy views for the batch paths (pop_bufs, push_used): plain integer views, which
        # copy at memcpy speed (a structured dtype costs ~8x more). The descriptor table is
        # read as (num, 2) u64: addr, then len | flags << 32 | next << 48.
        buf = mem.mm
        # The table is read through flat views (word 2i is descriptor i's addr, word 2i + 1
        # its len | flags | next) indexed by 2 * head: a take from a contiguous 1-D array
        # costs about half of one from a strided column.
        self.desc_addr_np = np.ndarray(2 * num, np.uint64, buf, self.desc_off)
        self.desc_w_np = np.ndarray(2 * num - 1, np.uint64, buf, self.desc_off + 8)
        self.avail_np = np.ndarray(num, np.uint16, buf, avail_addr - mem.base + 4)
        self.used_u64 = np.ndarray(num, np.uint64, buf, used_addr - mem.base + 4)
        self.ram_q_np = np.ndarray(mem.size >> 3, np.uint64, buf)   # indirect tables
        self._base_u = np.uint64(mem.base)
        self._table_last = np.uint64(max(mem.size - 48, 0))   # a table's last start
        self._ram_last = np.uint64(max(mem.size - 1, 0))
        # The batch check below folds "len >= 1 and neither NEXT nor INDIRECT set" into
        # len - 1 < 2**32 - 1 and compares it with the RAM's last offset together with the
        # buffer's end: that needs RAM smaller than 4 GiB; above, the bits are checked apart.
        self._big_ram = mem.size >= 0xFFFFFFFF
        self._consts = tuple(np.full(num, v, np.uint64) for v in (
            0xFFFFFFFF | (NEXT | INDIRECT) << 32, mem.base, 1, 0xFFFFFFFE, WRITE << 32,
            mem.size - 1))
        self._consts_n = num
        self._consts_cut = self._consts
        self.used_h[R.USED_H_FLAGS] = 0
        self.used_h[R.USED_H_IDX] = 0
        self.used_h[self.avail_event_at] = 0

    # ---- avail side ------------------------------------------------------------------------------
    def avail_idx(self) -> int:
        return self.avail_h[R.AVAIL_H_IDX]

    def has_work(self) -> bool:
        return self.avail_h[R.AVAIL_H_IDX] != self.last_avail_idx

    def has_at_least(self, k: int) -> bool:
        return (self.avail_h[R.AVAIL_H_IDX] - self.last_avail_idx) & R.IDX_MASK >= k

    def _avail_heads(self, limit: int) -> np.ndarray | None:
        """The heads of the available entries a batch path may take (at most `limit` and
        the room the ring has); None when the next entry is already a fault, for pop_batch
        to name. Heads >= num are the caller's to cut (_heads_in_range), when a take of
        their descriptors fails. Leaves avail->idx as read in avail_seen_now; nothing is
        consumed."""
        last = self.last_avail_idx
        avail = self.avail_seen_now = self.avail_h[1]
        n = (avail - last) & 0xFFFF
        if n == 0:
            return _NO_HEADS
        num = self.num
        room = num - self.inflight
        if n > num or room <= 0:
            return None                         # pop_batch names the fault
        if n > room:
            n = room
        if n > limit:
            n = limit
        s = last & self.mask
        if s + n <= num:
            heads = self.avail_np[s:s + n].astype(np.intp)
        else:
            heads = np.concatenate((self.avail_np[s:], self.avail_np[:s + n - num])).astype(
                np.intp)
        return heads

    def _heads_in_range(self, heads: np.ndarray) -> np.ndarray | None:
        """The heads before the first >= num (a take of its descriptor failed); None when
        that is the first, for pop_batch to name."""
        n = int((heads >= self.num).argmax())
        return heads[:n] if n else None

    def pop_bufs(self, limit: int = 1 << 16) -> Bufs | None:
        """Every available buffer (at most `limit`) that is one direct descriptor, as arrays,
        validated with a dozen numpy operations per batch instead of Python per buffer.

        Stops before the first entry that is anything else - a chain, an indirect table, or a
        fault of any kind - and returns None if that entry is the first: pop_batch then takes
        it (or raises the RingError that names the fault). The avail entries and descriptors
        were published by the avail idx store read first (TSO keeps loads in order), so bulk
        numpy reads of them are safe (DESIGN.md); each is read once, into private arrays."""
        heads = self._avail_heads(limit)
        if heads is None or not len(heads):
            return EMPTY_BUFS if heads is not None else None
        last, avail = self.last_avail_idx, self.avail_seen_now
        h2 = heads + heads
        try:
            addr = self.desc_addr_np.take(h2)
        except IndexError:
            heads = self._heads_in_range(heads)
            if heads is None:
                return None
            h2 = heads + heads
            addr = self.desc_addr_np.take(h2)
        n = len(heads)
        w = self.desc_w_np.take(h2)             # len | flags << 32 | next << 48
        # (constants as arrays of the batch's length: a numpy scalar operand costs more)
        if n != self._consts_n:
            self._consts_n = n
            self._consts_cut = tuple(c[:n] for c in self._consts)
        c_chk, c_base, c_one, c_lenmax, c_write, c_last = self._consts_cut
        # x = len - 1 for a valid buffer; an empty one wraps to huge, NEXT / INDIRECT set
        # make it >= 2**32 - 1. off wraps to huge below RAM; off + x is the buffer's last
        # byte (it wraps below off or x if either is huge). One compare of the largest of
        # the three with RAM's last offset catches every fault (2**32 - 1 > RAM's last).
        x = (w & c_chk) - c_one
        off = addr - c_base
        worst = _MAX(off + x, _MAX(off, x))
        bad = _GT(worst, c_last)
        if self._big_ram:
            bad |= _GT(x, c_lenmax)
        if _NNZ(bad):
            k = int(bad.argmax())
            if k == 0:
                return None
            heads, off, x, w, n = heads[:k], off[:k], x[:k], w[:k], k
            c_one, c_write = c_one[:k], c_write[:k]
        ln = x + c_one
        writable = (w & c_write).astype(bool)
        nw = _NNZ(writable)
        if nw == n:
            rbytes = 0
        elif nw == 0:
            rbytes = int(ln.sum())
        else:
            rbytes = int(ln[~writable].sum())
        self.last_avail_idx = (last + n) & 0xFFFF
        self.avail_seen = avail
        self.inflight += n
        self.n_popped += n
        self.n_bytes_read += rbytes
        return Bufs(heads, off, ln, writable)

    def pop_chains3(self, limit: int = 1 << 16) -> Chains3 | None:
        """Every available chain (at most `limit`) of exactly three segments - a three-entry
        indirect table, or three ring descriptors in a row, the two shapes pop_batch reads
        in one go - as arrays, validated with a few dozen numpy operations per batch: flags
        and links, readable before writable, every segment non-empty and inside RAM, the
        chain under 4 GiB. Stops before the first entry that is anything else (or faulty)
        and returns None if that is the first, for pop_batch to take or name, as pop_bufs
        does. The descriptors and tables were published by the avail idx store read first,
        so bulk reads of them are safe (DESIGN.md); each is read once."""
        heads = self._avail_heads(limit)
        if heads is None or not len(heads):
            return EMPTY_CHAINS3 if heads is not None else None
        last, avail = self.last_avail_idx, self.avail_seen_now
        h2 = heads + heads
        try:
            w0 = self.desc_w_np.take(h2)
        except IndexError:
            heads = self._heads_in_range(heads)
            if heads is None:
                return None
            h2 = heads + heads
            w0 = self.desc_w_np.take(h2)
        t = self.desc_addr_np.take(h2) - self._base_u
        # Where the three entries are: a 48-byte table (INDIRECT alone, its next ignored),
        # 8-aligned inside RAM - what a driver with INDIRECT_DESC builds - or the ring's
        # descriptors head..head+2. What each entry's flags & (NEXT | INDIRECT) | next << 16
        # must then be: NEXT to the following entry, NEXT, neither (the last's next unread).
        table = (w0 & _LOW48) == _IND48
        if self.indirect and table.all() and not ((t & _SEVEN) | (t > self._table_last)).any():
            at = t >> _THREE
            expect = _EXPECT_TABLE
        else:
            table &= (t <= self._table_last) & ((t & _SEVEN) == 0) & self.indirect
            direct = ~table & (heads <= self.num - 3)
            at = np.where(table, t >> _THREE, np.where(direct, (self.desc_off >> 3) + h2, 0))
            first = np.where(table, 1, heads + 1).astype(np.uint64)
            expect = np.empty((len(heads), 3), np.uint64)
            expect[:, 0] = (first << 16) | NEXT
            expect[:, 1] = ((first + 1) << 16) | NEXT
            expect[:, 2] = 0
            expect[~(table | direct)] = 1 << 63        # matches nothing
        words = self.ram_q_np[at.astype(np.intp)[:, None] + _SIX]
        w = words[:, 1::2]                  # len | flags << 32 | next << 48, per entry
        hi = w >> _THIRTY_TWO
        ln = w & _U32
        off = words[:, ::2] - self._base_u
        writable = (hi & _WRITE).astype(bool)
        # non-empty and inside RAM: len - 1 wraps to huge when 0, off when below RAM, and
        # off + len - 1 (the last byte) wraps below one of them: one compare of the largest
        x = ln - _ONE
        worst = _MAX(off + x, _MAX(off, x))
        ok = ((hi & _LINK_BITS) == expect).all(1) & (worst <= self._ram_last).all(1) \
            & (writable[:, :2] <= writable[:, 1:]).all(1)
        if self.mem_size > MAX_CHAIN_BYTES // 3:
            ok &= ln.sum(1) <= MAX_CHAIN_BYTES
        n = len(heads)
        if not ok.all():
            n = int((~ok).argmax())
            if n == 0:
                return None
            heads, off, ln, writable = heads[:n], off[:n], ln[:n], writable[:n]
        off = off.astype(np.int64)
        ln = ln.astype(np.int64)
        self.last_avail_idx = (last + n) & 0xFFFF
        self.avail_seen = avail
        self.inflight += n
        self.n_popped += n
        self.n_bytes_read += int(ln[~writable].sum())
        return Chains3(heads, off, ln, writable)

    def pop_batch(self, limit: int = 1 << 16) -> list[DescChain]:
        """Every available chain (at most `limit`), validated, in ring order.

        This runs once per request, so it is written out by hand: the ring state lives in
        locals for the whole batch, and the common chain - three descriptors in a row, or a
        three-entry indirect table (a block request: header, data, status) - is read with one
        struct.unpack_from and checked inline. Anything else, every error included, goes to
        _walk, which follows NEXT and INDIRECT one descriptor at a time and names the fault.
        A published descriptor does not change under the device, so struct is safe here
        (DESIGN.md). A bad chain raises RingError; the chains before it were consumed."""
        out: list[DescChain] = []
        chains = self._chains
        avail_h = self.avail_h
        num = self.num
        mask = self.mask
        ram = self.ram
        base = self.mem_base
        size = self.mem_size
        desc_off = self.desc_off
        indirect = self.indirect
        unpack3 = UNPACK_DESC3
        last = self.last_avail_idx
        seen = self.avail_seen
        inflight = self.inflight
        rbytes = 0
        try:
            while len(out) < limit:
                if last == seen:
                    # Re-read avail->idx only when what was seen is used up (vhost's
                    # vq->avail_idx): the driver rewrites that cache line on every add.
                    avail = avail_h[1]
                    if avail == last:
                        break
                    if (avail - last) & 0xFFFF > num:
                        raise RingError(Reason.INVALID_AVAIL_IDX,
                                        f"avail idx {avail}, last seen {last}, size {num}")
                    seen = avail
                if inflight >= num:
                    raise RingError(Reason.TOO_MANY_IN_FLIGHT,
                                    f"{inflight} chains not yet used")
                # avail idx was read before the entry: TSO keeps loads in order (virtio_rmb).
                head = avail_h[2 + (last & mask)]
                if head >= num:
                    raise RingError(Reason.INVALID_HEAD,
                                    f"head {head} in avail ring slot {last & mask}")
                chain = chains[head]
                fast = False
                if head + 3 <= num:
                    at = desc_off + 16 * head
                    a0, l0, f0, n0, a1, l1, f1, n1, a2, l2, f2, _ = unpack3(ram, at)
                    first = head + 1
                    ndescs = 3
                    if f0 == INDIRECT and l0 == 48 and indirect:
                        t = a0 - base
                        if 0 <= t <= size - 48:
                            a0, l0, f0, n0, a1, l1, f1, n1, a2, l2, f2, _ = unpack3(ram, t)
                            first = 1     # (ndescs: the table's entries, as _walk counts)
                    o0 = a0 - base
                    o1 = a1 - base
                    o2 = a2 - base
                    if (f0 & 5 == 1 and f1 & 5 == 1 and not f2 & 5 and n0 == first
                            and n1 == first + 1 and o0 >= 0 and o1 >= 0 and o2 >= 0
                            and 0 < l0 <= size - o0 and 0 < l1 <= size - o1
                            and 0 < l2 <= size - o2):
                        w = (f0 & WRITE) | (f1 & WRITE) << 1 | (f2 & WRITE) << 2
                        fast = True
                        if w == 8:          # read, read, write: a block write
                            chain.r_off = [o0, o1]
                            chain.r_len = [l0, l1]
                            chain.w_off = [o2]
                            chain.w_len = [l2]
                            chain.rlen = l0 + l1
                            chain.wlen = l2
                        elif w == 12:       # read, write, write: a block read
                            chain.r_off = [o0]
                            chain.r_len = [l0]
                            chain.w_off = [o1, o2]
                            chain.w_len = [l1, l2]
                            chain.rlen = l0
                            chain.wlen = l1 + l2
                        elif w == 0:
                            chain.r_off = [o0, o1, o2]
                            chain.r_len = [l0, l1, l2]
                            chain.w_off = []
                            chain.w_len = []
                            chain.rlen = l0 + l1 + l2
                            chain.wlen = 0
                        elif w == 14:
                            chain.r_off = []
                            chain.r_len = []
                            chain.w_off = [o0, o1, o2]
                            chain.w_len = [l0, l1, l2]
                            chain.rlen = 0
                            chain.wlen = l0 + l1 + l2
                        else:
                            fast = False    # readable after writable: _walk names it
                        if fast:
                            if l0 + l1 + l2 > MAX_CHAIN_BYTES:
                                fast = False
                            else:
                                chain.head = head
                                chain.ndescs = ndescs
                if not fast:
                    self._walk(chain, head)
                last = (last + 1) & 0xFFFF
                inflight += 1
                rbytes += chain.rlen
                out.append(chain)
        finally:
            self.last_avail_idx = last
            self.avail_seen = seen
            self.inflight = inflight
            self.n_popped += len(out)
            self.n_bytes_read += rbytes
        return out

    def _walk(self, chain: DescChain, head: int) -> None:
        """Fill `chain` from the descriptors starting at `head`, following NEXT and INDIRECT.

        A published descriptor does not change under the device, so each is read whole with
        one struct.unpack_from (the cheapest load in CPython; DESIGN.md allows struct for bytes
        published by an index store). Every buffer is range-checked and kept as a RAM offset."""
        r_off = chain.r_off
        r_len = chain.r_len
        w_off = chain.w_off
        w_len = chain.w_len
        r_off.clear()
        r_len.clear()
        w_off.clear()
        w_len.clear()
        rlen = wlen = 0
        unpack = UNPACK_DESC
        tbl = self.ram
        tb = self.desc_off
        table_size = self.num
        base = self.mem_base
        size = self.mem_size
        in_indirect = False
        count = 1
        i = head
        while True:
            addr, ln, fl, nx = unpack(tbl, tb + 16 * i)
            off = addr - base
            if fl & INDIRECT:
                tbl, tb, table_size = self._indirect(addr, ln, fl, i, head, in_indirect)
                in_indirect = True
                count = 1
                i = 0
                continue
            if off < 0 or not 0 < ln <= size - off:
                if ln == 0:
                    raise RingError(Reason.ZERO_LENGTH, f"descriptor {i} of head {head}")
                raise RingError(Reason.ADDRESS_OUT_OF_RANGE,
                                f"descriptor {i} of head {head}: 0x{addr:x}+0x{ln:x} is "
                                f"outside guest RAM")
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
            count += 1
            if count > table_size:
                raise RingError(Reason.CHAIN_TOO_LONG, f"chain from head {head}")
            i = nx
            if i >= table_size:
                raise RingError(Reason.INVALID_NEXT, f"next {i} in a table of {table_size}")
        if rlen + wlen > MAX_CHAIN_BYTES:
            raise RingError(Reason.CHAIN_TOO_BIG, f"{rlen + wlen} bytes from head {head}")
        chain.head = head
        chain.rlen = rlen
        chain.wlen = wlen
        chain.ndescs = count

    def _indirect(self, addr: int, ln: int, flags: int, i: int, head: int,
                  in_indirect: bool) -> tuple[memoryview, int, int]:
        """Check an INDIRECT descriptor; the view, byte offset and size of its table."""
        if not self.indirect:
            raise RingError(Reason.INDIRECT_NOT_NEGOTIATED, f"descriptor {i}")
        if in_indirect:
            raise RingError(Reason.NESTED_INDIRECT, f"entry {i} of head {head}'s table")
        if flags & NEXT:
            raise RingError(Reason.INDIRECT_WITH_NEXT, f"descriptor {i}")
        if ln == 0 or ln % R.DESC_SIZE:
            raise RingError(Reason.INDIRECT_BAD_LENGTH, f"length {ln} at descriptor {i}")
        off = addr - self.mem_base
        if off < 0 or off + ln > self.mem_size:
            raise RingError(Reason.INDIRECT_OUT_OF_RANGE,
                            f"table 0x{addr:x}+0x{ln:x} is outside guest RAM")
        if ln // R.DESC_SIZE > indirect_table_max(self.num):
            raise RingError(Reason.CHAIN_TOO_LONG, f"indirect table of {ln // R.DESC_SIZE}")
        # The table stays in guest RAM: entries are read where they are.
        return self.ram, off, ln // R.DESC_SIZE

    # ---- used side -------------------------------------------------------------------------------
    # QEMU's pair: fill writes a used element, flush publishes every filled element with one
    # store of used->idx; push is both. A device that serves a batch fills each request and
    # flushes once, so the line the driver polls changes hands once per batch.
    def fill(self, chain: DescChain | int, written: int) -> None:
        """Write the used element for a chain (or its head), `written` bytes; not yet
        published. With VIRTIO_F_IN_ORDER the element is held back so that a batch can be
        written as one (flush writes it)."""
        head = chain if isinstance(chain, int) else chain.head
        if self.in_order:
            self._pending_used.append((head, written))
            self.inflight -= 1
            self.n_used += 1
            self.n_bytes_written += written
            return
        used = self.last_used_idx
        k = 1 + 2 * (used & self.mask)
        ui = self.used_i
        ui[k] = head
        ui[k + 1] = written
        self.last_used_idx = (used + 1) & R.IDX_MASK
        self.inflight -= 1
        self.n_used += 1
        self.n_bytes_written += written

    def flush(self) -> None:
        """Publish the filled elements: the elements are written; now the index."""
        if self._pending_used:
            self._write_in_order_batch()
        self.used_h[R.USED_H_IDX] = self.last_used_idx

    def _write_in_order_batch(self) -> None:
        """VIRTIO_F_IN_ORDER: one used entry for the batch, at the slot of its first buffer,
        naming its last buffer; used->idx then moves by the size of the batch."""
        pending = self._pending_used
        head, written = pending[-1]
        used = self.last_used_idx
        k = 1 + 2 * (used & self.mask)
        self.used_i[k] = head
        self.used_i[k + 1] = written
        self.last_used_idx = (used + len(pending)) & R.IDX_MASK
        pending.clear()

    def mark(self) -> tuple:
        return (self.last_avail_idx, self.inflight, self.n_popped, self.n_bytes_read)

    def rewind(self, mark: tuple, chains: list[DescChain]) -> None:
        self.last_avail_idx, self.inflight, self.n_popped, self.n_bytes_read = mark

    def check_notification(self, data: int) -> bool:
        """The avail index a notification carries may be behind the ring's (the driver added
        more since), never ahead of it."""
        nxt = data >> 16
        return ((self.avail_h[R.AVAIL_H_IDX] - nxt) & R.IDX_MASK) <= self.num

    def fill_batch(self, chains: list[DescChain], written: list[int]) -> None:
        """fill() for each chain with its written length, then one flush()."""
        if self.in_order:
            for chain, n in zip(chains, written, strict=True):
                self.fill(chain, n)
            self.flush()
            return
        used = self.last_used_idx
        mask = self.mask
        ui = self.used_i
        for chain, n in zip(chains, written, strict=True):
            k = 1 + 2 * (used & mask)
            ui[k] = chain.head
            ui[k + 1] = n
            used = (used + 1) & 0xFFFF
        self.last_used_idx = used
        self.inflight -= len(chains)
        self.n_used += len(chains)
        self.n_bytes_written += sum(written)
        self.used_h[R.USED_H_IDX] = used

    def push_used(self, heads: np.ndarray, written: "np.ndarray | int") -> None:
        """Return many buffers at once (by head, `written` bytes each) and publish them with
        one used->idx store. Each used element {le32 id, le32 len} is one u64 word, so the
        batch is one numpy slice store (two at the ring's end), published by the index store
        that follows (DESIGN.md)."""
        n = len(heads)
        if not n:
            return
        if self.in_order or self._pending_used:
            wl = np.broadcast_to(written, (n,)).tolist()
            for h, w in zip(heads.tolist(), wl, strict=True):
                self.fill(h, w)
            self.flush()
            return
        if isinstance(written, int):
            elems = heads | written << 32 if written else heads
            nbytes = written * n
        else:
            elems = heads | written.astype(np.int64) << 32
            nbytes = int(written.sum())
        used = self.last_used_idx
        num = self.num
        s = used & self.mask
        u = self.used_u64
        if s + n <= num:
            u[s:s + n] = elems
        else:
            k = num - s
            u[s:] = elems[:k]
            u[:n - k] = elems[k:]
        used = (used + n) & 0xFFFF
        self.last_used_idx = used
        self.inflight -= n
        self.n_used += n
        self.n_bytes_written += nbytes
        # The elements are written; now the index that publishes them.
        self.used_h[R.USED_H_IDX] = used

    def need_notify(self) -> bool:
        """vhost_notify: whether the driver wants an interrupt for what was used (flushed)."""
        # The used idx store must be visible before the driver's event index is read.
        full_barrier()
        if not self.event_idx:
            needs = not self.avail_h[R.AVAIL_H_FLAGS] & R.VRING_AVAIL_F_NO_INTERRUPT
        else:
            old = self.signalled_used
            # After 65536 pushes the 16-bit index is back where it was signalled: the window
            # (old, new] is the whole ring, which vring_need_event cannot express (vhost's
            # vhost_add_used_n invalidates signalled_used for the same reason).
            valid = self.signalled_used_valid and self.n_used - self._used_at_signal < 0x10000
            new = self.signalled_used = self.last_used_idx
            self._used_at_signal = self.n_used
            self.signalled_used_valid = True
            needs = not valid or R.vring_need_event(self.avail_h[self.used_event_at], new, old)
        if needs:
            self.n_interrupts += 1
        else:
            self.n_interrupts_suppressed += 1
        return needs

    # ---- notification suppression ----------------------------------------------------------------
    def disable_notify(self) -> None:
        """vhost_disable_notify: the device is polling; kicks are not needed."""
        if self.used_flags & R.VRING_USED_F_NO_NOTIFY:
            return
        self.used_flags |= R.VRING_USED_F_NO_NOTIFY
        if not self.event_idx:
            self.used_h[R.USED_H_FLAGS] = self.used_flags

    def enable_notify(self) -> bool:
        """vhost_enable_notify: ask for kicks again; True if buffers slipped in meanwhile
        (the caller must then keep processing)."""
        if self.used_flags & R.VRING_USED_F_NO_NOTIFY:
            self.used_flags &= ~R.VRING_USED_F_NO_NOTIFY
            if not self.event_idx:
                self.used_h[R.USED_H_FLAGS] = self.used_flags
        if self.event_idx:
            self.used_h[self.avail_event_at] = self.last_avail_idx
        full_barrier()
        return self.avail_h[R.AVAIL_H_IDX] != self.last_avail_idx

    def wait_for_more(self) -> bool:
        idx = self.avail_h[R.AVAIL_H_IDX]
        self.used_flags &= ~R.VRING_USED_F_NO_NOTIFY
        if self.event_idx:
            # A kick when avail->idx moves past what is there now (vhost: vq->avail_idx),
            # not past the device's position, which that idx is already beyond.
            self.used_h[self.avail_event_at] = idx
        else:
            self.used_h[R.USED_H_FLAGS] = self.used_flags
        full_barrier()
        return self.avail_h[R.AVAIL_H_IDX] != idx

    # ---- state -----------------------------------------------------------------------------------
    def ring_positions(self) -> tuple[int, int]:
        return self.last_avail_idx, self.last_used_idx

    def release(self) -> None:
        for v in (self.avail_h, self.used_h, self.used_i):
            v.release()
        # the numpy views hold exports of the mapping, which must go before it is closed
        self.desc_addr_np = self.desc_w_np = self.avail_np = self.used_u64 = None
        self.ram_q_np = None
