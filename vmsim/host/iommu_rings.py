"""The device-side rings of a device behind an IOMMU (VIRTIO_F_ACCESS_PLATFORM): every address
the driver wrote - ring areas, indirect tables, buffers - is an IOVA, translated through the
device's IOTLB (an IotlbMemory) with the permission the access needs, as vhost's
translate_desc does: the device reads the descriptor table, the avail ring and the buffers it
reads; it writes the used ring and writable buffers. A buffer contiguous in IOVA space may be
several pieces of guest RAM; each becomes a segment of the chain.

These classes replace only the ring setup and the descriptor walk of vmsim's split and packed
queues. Their fast paths range-check `addr - base` inline; here the untranslated window is
empty, so those paths refuse every chain and hand it to the walk here. A fault raises IotlbRingError
(a RingError: the device reports it and stops the ring, or a vhost-user backend asks its
frontend for the missing translation and retries).
"""

from collections.abc import Callable

from vmsim.abi import packed_ring as P
from vmsim.abi import split_ring as R
from vmsim.host.iommu import PERM_R, PERM_W
from vmsim.host.memory import GuestMemoryError, IommuFault, IotlbMemory
from vmsim.host.virtio.chain import MAX_CHAIN_BYTES, DescChain, indirect_table_max
from vmsim.host.virtio.errors import Reason, RingError
from vmsim.host.virtio.queue_packed import PackedQueue
from vmsim.host.virtio.queue_split import SplitQueue

NEXT = R.VRING_DESC_F_NEXT
WRITE = R.VRING_DESC_F_WRITE
INDIRECT = R.VRING_DESC_F_INDIRECT
UNPACK_SPLIT = R.DESC.unpack_from
UNPACK_PACKED = P.DESC.unpack_from


class IotlbRingError(RingError):
    """A ring access the IOTLB refused; `fault` says which IOVA and access."""

    def __init__(self, reason: Reason, detail: str, fault: IommuFault) -> None:
        super().__init__(reason, detail)
        self.fault = fault


def _ring_gpas(mem: IotlbMemory, areas: list[tuple[str, int, int, int]]) -> list[int]:
    """The guest-physical address of each ring area, which must be mapped in one piece with
    the access the device makes to it. The ring is set up at those addresses over plain RAM
    (vhost translates ring addresses once, at SET_VRING_ADDR, too): every view and offset
    the queue code derives is then right, whatever it computes from `mem.base`."""
    out = []
    for what, addr, length, perm in areas:
        try:
            out.append(mem.ram_base + mem.offset_of(addr, length, perm))
        except IommuFault as e:
            raise IotlbRingError(Reason.RING_OUT_OF_RANGE, f"{what}: {e}", e) from None
        except GuestMemoryError as e:
            raise RingError(Reason.RING_OUT_OF_RANGE, f"{what}: {e}") from None
    return out


def _translating(q: SplitQueue | PackedQueue, mem: IotlbMemory,
                 iovas: tuple[int, int, int]) -> None:
    """After the base constructor: descriptors go through the IOTLB from now on."""
    q.mem = mem
    q.mem_base = 0      # an empty untranslated window: the inline fast paths refuse all,
    q.mem_size = 0      # every chain comes to _walk here
    q.desc_addr, q.avail_addr, q.used_addr = iovas


def _table(mem: IotlbMemory, addr: int, ln: int, what: str) -> tuple[memoryview | bytes, int]:
    """An indirect table (device-read) as (buffer, offset): in place when it is one piece of
    RAM, else copied (a published table does not change under the device)."""
    try:
        pieces = mem.segments(addr, ln, PERM_R)
    except IommuFault as e:
        raise IotlbRingError(Reason.INDIRECT_OUT_OF_RANGE, f"{what}: {e}", e) from None
    if len(pieces) == 1:
        return mem.mv, pieces[0][0]
    return b"".join(bytes(mem.mv[o:o + n]) for o, n in pieces), 0


def _buffer(mem: IotlbMemory, addr: int, ln: int, write: bool, what: str,
            offs: list[int], lens: list[int]) -> None:
    try:
        pieces = mem.segments(addr, ln, PERM_W if write else PERM_R)
    except IommuFault as e:
        raise IotlbRingError(Reason.ADDRESS_OUT_OF_RANGE, f"{what}: {e}", e) from None
    for o, n in pieces:
        offs.append(o)
        lens.append(n)


def _one_by_one(pop: Callable[[int], list[DescChain]], limit: int) -> list[DescChain]:
    """pop_batch a chain at a time: a fault at the k-th chain hands back the chains before it
    (the base pop_batch consumes them and raises), and the faulting chain, not consumed,
    raises on the next call. A backend that asks its frontend for a missing translation
    loses nothing, and serves the rest once the answer came."""
    out: list[DescChain] = []
    while len(out) < limit:
        try:
            got = pop(1)
        except IotlbRingError:
            if out:
                return out
            raise
        if not got:
            break
        out += got
    return out


class TranslatedSplitQueue(SplitQueue):
    """A split ring whose addresses are IOVAs."""

    def __init__(self, mem: IotlbMemory, num: int, desc_addr: int, avail_addr: int,
                 used_addr: int, event_idx: bool, indirect: bool,
                 stats: memoryview | None = None, in_order: bool = False) -> None:
        iovas = (desc_addr, avail_addr, used_addr)
        if R.is_power_of_two(num) and num <= R.MAX_QUEUE_SIZE:
            desc_addr, avail_addr, used_addr = _ring_gpas(mem, [
                ("descriptor table", desc_addr, R.desc_table_size(num), PERM_R),
                ("avail ring", avail_addr, R.avail_size(num), PERM_R),
                ("used ring", used_addr, R.used_size(num), PERM_R | PERM_W)])
        super().__init__(mem.ram, num, desc_addr, avail_addr, used_addr, event_idx, indirect,
                         stats, in_order)
        _translating(self, mem, iovas)

    def pop_bufs(self, limit: int = 1 << 16) -> None:
        """The batch path reads descriptors as guest-physical: never here."""
        return None

    batch3 = False

    def pop_chains3(self, limit: int = 1 << 16) -> None:
        """As pop_bufs: never here."""
        return None

    def pop_batch(self, limit: int = 1 << 16) -> list[DescChain]:
        return _one_by_one(super().pop_batch, limit)

    def _walk(self, chain: DescChain, head: int) -> None:
        mem = self.mem
        r_off: list[int] = []
        r_len: list[int] = []
        w_off: list[int] = []
        w_len: list[int] = []
        rlen = wlen = 0
        tbl: memoryview | bytes = self.ram
        tb = self.desc_off
        table_size = self.num
        in_indirect = False
        count = 1
        i = head
        while True:
            addr, ln, fl, nx = UNPACK_SPLIT(tbl, tb + 16 * i)
            if fl & INDIRECT:
                if not self.indirect:
                    raise RingError(Reason.INDIRECT_NOT_NEGOTIATED, f"descriptor {i}")
                if in_indirect:
                    raise RingError(Reason.NESTED_INDIRECT, f"entry {i} of head {head}'s table")
                if fl & NEXT:
                    raise RingError(Reason.INDIRECT_WITH_NEXT, f"descriptor {i}")
                if ln == 0 or ln % R.DESC_SIZE:
                    raise RingError(Reason.INDIRECT_BAD_LENGTH, f"length {ln} at descriptor {i}")
                if ln // R.DESC_SIZE > indirect_table_max(self.num):
                    raise RingError(Reason.CHAIN_TOO_LONG, f"indirect table of {ln // 16}")
                tbl, tb = _table(mem, addr, ln, f"indirect table of head {head}")
                table_size = ln // R.DESC_SIZE
                in_indirect = True
                count = 1
                i = 0
                continue
            if ln == 0:
                raise RingError(Reason.ZERO_LENGTH, f"descriptor {i} of head {head}")
            what = f"descriptor {i} of head {head}"
            if fl & WRITE:
                _buffer(mem, addr, ln, True, what, w_off, w_len)
                wlen += ln
            else:
                if wlen:
                    raise RingError(Reason.READABLE_AFTER_WRITABLE, f"descriptor {i}")
                _buffer(mem, addr, ln, False, what, r_off, r_len)
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
        chain.r_off, chain.r_len, chain.w_off, chain.w_len = r_off, r_len, w_off, w_len
        chain.head = head
        chain.rlen = rlen
        chain.wlen = wlen
        chain.ndescs = count


class TranslatedPackedQueue(PackedQueue):
    """A packed ring whose addresses are IOVAs."""

    def __init__(self, mem: IotlbMemory, num: int, desc_addr: int, driver_addr: int,
                 device_addr: int, event_idx: bool, indirect: bool,
                 stats: memoryview | None = None, in_order: bool = False) -> None:
        iovas = (desc_addr, driver_addr, device_addr)
        if 0 < num <= P.MAX_QUEUE_SIZE:
            # The device writes used descriptors into the ring itself.
            desc_addr, driver_addr, device_addr = _ring_gpas(mem, [
                ("descriptor ring", desc_addr, P.ring_size(num), PERM_R | PERM_W),
                ("driver area", driver_addr, P.EVENT_SIZE, PERM_R),
                ("device area", device_addr, P.EVENT_SIZE, PERM_R | PERM_W)])
        super().__init__(mem.ram, num, desc_addr, driver_addr, device_addr, event_idx, indirect,
                         stats, in_order)
        _translating(self, mem, iovas)

    def _fast(self, pos: int) -> None:
        return None

    batch3 = False

    def pop_chains3(self, limit: int = 1 << 16) -> None:
        """The batch path reads descriptors as guest-physical: never here."""
        return None

    def pop_bufs(self, limit: int = 1 << 16) -> None:
        return None

    def pop_batch(self, limit: int = 1 << 16) -> list[DescChain]:
        return _one_by_one(super().pop_batch, limit)

    def _walk(self, pos: int, wrap: int) -> tuple[DescChain, int]:
        mem = self.mem
        ram = self.ram
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
            addr, ln, bid, fl = UNPACK_PACKED(ram, desc_off + 16 * i)
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
                if ln == 0 or ln % P.DESC_SIZE:
                    raise RingError(Reason.INDIRECT_BAD_LENGTH, f"length {ln} at descriptor {i}")
                if ln // P.DESC_SIZE > indirect_table_max(num):
                    raise RingError(Reason.CHAIN_TOO_LONG, f"indirect table of {ln // 16}")
                tbl, tb = _table(mem, addr, ln, f"indirect table at descriptor {i}")
                for j in range(ln // P.DESC_SIZE):
                    a, m, _bid, f = UNPACK_PACKED(tbl, tb + 16 * j)
                    if f & INDIRECT:
                        raise RingError(Reason.NESTED_INDIRECT, f"entry {j} of the table")
                    if m == 0:
                        raise RingError(Reason.ZERO_LENGTH, f"indirect entry {j}")
                    if f & WRITE:
                        _buffer(mem, a, m, True, f"indirect entry {j}", w_off, w_len)
                        wlen += m
                    else:
                        if wlen:
                            raise RingError(Reason.READABLE_AFTER_WRITABLE,
                                            f"indirect entry {j}")
                        _buffer(mem, a, m, False, f"indirect entry {j}", r_off, r_len)
                        rlen += m
                break
            if ln == 0:
                raise RingError(Reason.ZERO_LENGTH, f"descriptor {i}")
            if fl & WRITE:
                _buffer(mem, addr, ln, True, f"descriptor {i}", w_off, w_len)
                wlen += ln
            else:
                if wlen:
                    raise RingError(Reason.READABLE_AFTER_WRITABLE, f"descriptor {i}")
                _buffer(mem, addr, ln, False, f"descriptor {i}", r_off, r_len)
                rlen += ln
            if not fl & NEXT:
                break
            i += 1
            if i >= num:
                i = 0
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


RING_CLASSES = {SplitQueue: TranslatedSplitQueue, PackedQueue: TranslatedPackedQueue}


def ring_class(cls: type) -> type:
    """The translating flavour of a ring class (device.py's queue_enable, behind an IOMMU)."""
    return RING_CLASSES.get(cls, cls)
