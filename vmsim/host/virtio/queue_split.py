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

from vmsim.abi import split_ring as R
from vmsim.host.memory import GuestMemory, GuestMemoryError
from vmsim.host.virtio.chain import DescChain
from vmsim.host.virtio.errors import Reason, RingError
from vmsim.machine.barrier import full_barrier
from vmsim.machine.stats import Q

NEXT = R.VRING_DESC_F_NEXT
WRITE = R.VRING_DESC_F_WRITE
INDIRECT = R.VRING_DESC_F_INDIRECT
U32 = 0xFFFFFFFF
MAX_CHAIN_BYTES = 1 << 32   # "Drivers MUST NOT add a descriptor chain longer than 2^32 bytes"
UNPACK_DESC = R.DESC.unpack_from
UNPACK_DESC3 = struct.Struct("<" + "QIHH" * 3).unpack_from


class SplitQueue:
    """The device's view of one split ring."""

    def __init__(self, mem: GuestMemory, num: int, desc_addr: int, avail_addr: int,
                 used_addr: int, event_idx: bool, indirect: bool,
                 stats: memoryview | None = None) -> None:
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
        self.mem = mem
        self.ram = mem.mv
        self.mem_base = mem.base
        self.mem_size = mem.size
        self.num = num
        self.mask = num - 1
        self.desc_addr, self.avail_addr, self.used_addr = desc_addr, avail_addr, used_addr
        self.event_idx = event_idx
        self.indirect = indirect
        self.used_event_at = R.avail_h_used_event(num)
        self.avail_event_at = R.used_h_avail_event(num)
        self.last_avail_idx = 0      # next avail entry the device will take
        self.last_used_idx = 0       # next used entry the device will fill (= used->idx)
        self.signalled_used = 0
        self.signalled_used_valid = False
        self._used_at_signal = 0
        self.used_flags = 0          # shadow of used->flags
        self.inflight = 0
        self.stats = stats
        self._chains = [DescChain(mem) for _ in range(num)]  # one per head: no allocation per pop
        # running counts, published to the stats record at the end of each service pass
        self.n_popped = 0
        self.n_used = 0
        self.n_notifies = 0
        self.n_interrupts = 0
        self.n_interrupts_suppressed = 0
        self.n_bytes_read = 0
        self.n_bytes_written = 0
        self.n_wakeups = 0
        self.n_missed = 0
        self.used_h[R.USED_H_FLAGS] = 0
        self.used_h[R.USED_H_IDX] = 0
        self.used_h[self.avail_event_at] = 0

    # ---- avail side ------------------------------------------------------------------------------
    def avail_idx(self) -> int:
        return self.avail_h[R.AVAIL_H_IDX]

    def has_work(self) -> bool:
        return self.avail_h[R.AVAIL_H_IDX] != self.last_avail_idx

    def pop(self) -> DescChain | None:
        """The next available chain, validated, or None if the ring is empty.

        The chain walk is written out here rather than called: it runs once per request.
        A published descriptor does not change under the device, so each is read whole with
        one struct.unpack_from (the cheapest load in CPython; DESIGN.md allows struct for bytes
        published by an index store). Every buffer is range-checked and kept as a RAM offset."""
        last = self.last_avail_idx
        avail_h = self.avail_h
        avail = avail_h[1]
        if avail == last:
            return None
        num = self.num
        if (avail - last) & 0xFFFF > num:
            raise RingError(Reason.INVALID_AVAIL_IDX,
                            f"avail idx {avail}, last seen {last}, size {num}")
        if self.inflight >= num:
            raise RingError(Reason.TOO_MANY_IN_FLIGHT, f"{self.inflight} chains not yet used")
        # avail idx was read before the entry: TSO keeps the loads in order (virtio_rmb).
        head = avail_h[2 + (last & self.mask)]
        if head >= num:
            raise RingError(Reason.INVALID_HEAD,
                            f"head {head} in avail ring slot {last & self.mask}")
        chain = self._chains[head]
        if head + 3 <= num and self._pop3(chain, head):
            self.last_avail_idx = (last + 1) & 0xFFFF
            self.inflight += 1
            self.n_popped += 1
            self.n_bytes_read += chain.rlen
            return chain
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
        table_size = num
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
        self.last_avail_idx = (last + 1) & 0xFFFF
        self.inflight += 1
        self.n_popped += 1
        self.n_bytes_read += rlen
        return chain

    def _pop3(self, chain: DescChain, head: int) -> bool:
        """The common chain, read with one call: three consecutive direct descriptors from
        `head` (a block request: header, data, status). Fills `chain` and returns True if the
        chain is exactly that and valid; anything else (including every error) is left to the
        general walk, which reports it precisely."""
        a0, l0, f0, n0, a1, l1, f1, n1, a2, l2, f2, _ = UNPACK_DESC3(self.ram,
                                                                     self.desc_off + 16 * head)
        if f0 & 5 != 1 or f1 & 5 != 1 or f2 & 5 or n0 != head + 1 or n1 != head + 2:
            return False
        base = self.mem_base
        size = self.mem_size
        o0 = a0 - base
        o1 = a1 - base
        o2 = a2 - base
        if o0 < 0 or o1 < 0 or o2 < 0 or not (0 < l0 <= size - o0 and 0 < l1 <= size - o1
                                              and 0 < l2 <= size - o2):
            return False
        writable = (f0 & WRITE) | (f1 & WRITE) << 1 | (f2 & WRITE) << 2
        if writable == 8:          # read, read, write
            chain.r_off = [o0, o1]
            chain.r_len = [l0, l1]
            chain.w_off = [o2]
            chain.w_len = [l2]
            chain.rlen = l0 + l1
            chain.wlen = l2
        elif writable == 12:       # read, write, write
            chain.r_off = [o0]
            chain.r_len = [l0]
            chain.w_off = [o1, o2]
            chain.w_len = [l1, l2]
            chain.rlen = l0
            chain.wlen = l1 + l2
        elif writable == 0:
            chain.r_off = [o0, o1, o2]
            chain.r_len = [l0, l1, l2]
            chain.w_off = []
            chain.w_len = []
            chain.rlen = l0 + l1 + l2
            chain.wlen = 0
        elif writable == 14:
            chain.r_off = []
            chain.r_len = []
            chain.w_off = [o0, o1, o2]
            chain.w_len = [l0, l1, l2]
            chain.rlen = 0
            chain.wlen = l0 + l1 + l2
        else:
            return False           # readable after writable: the walk reports it
        if chain.rlen + chain.wlen > MAX_CHAIN_BYTES:
            return False
        chain.head = head
        chain.ndescs = 3
        return True

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
        # The table stays in guest RAM: entries are read where they are.
        return self.ram, off, ln // R.DESC_SIZE

    # ---- used side -------------------------------------------------------------------------------
    def push(self, head: int, written: int) -> None:
        """Return the chain `head` with `written` bytes written to its writable part."""
        used = self.last_used_idx
        k = 1 + 2 * (used & self.mask)
        ui = self.used_i
        ui[k] = head
        ui[k + 1] = written
        used = (used + 1) & R.IDX_MASK
        self.last_used_idx = used
        # The element is written; now the index that publishes it.
        self.used_h[R.USED_H_IDX] = used
        self.inflight -= 1
        self.n_used += 1
        self.n_bytes_written += written

    def need_notify(self) -> bool:
        """vhost_notify: whether the driver wants an interrupt for what was used."""
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

    # ---- state -----------------------------------------------------------------------------------
    def publish_stats(self) -> None:
        s = self.stats
        if s is None:
            return
        s[Q.POPPED] = self.n_popped
        s[Q.USED] = self.n_used
        s[Q.NOTIFIES] = self.n_notifies
        s[Q.INTERRUPTS] = self.n_interrupts
        s[Q.INTERRUPTS_SUPPRESSED] = self.n_interrupts_suppressed
        s[Q.BYTES_READ] = self.n_bytes_read
        s[Q.BYTES_WRITTEN] = self.n_bytes_written
        s[Q.WAKEUPS] = self.n_wakeups
        s[Q.MISSED] = self.n_missed

    def release(self) -> None:
        for v in (self.avail_h, self.used_h, self.used_i):
            v.release()
