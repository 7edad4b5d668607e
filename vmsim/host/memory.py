"""Guest memory as the device side reaches it (vm-memory's GuestMemory in rust-vmm).

Every access a device makes to guest RAM is bounds-checked against this object: `translate`
turns a guest-physical (address, length) into a memoryview, and the ring code, which checks
ranges itself on its hot path, keeps RAM offsets it validated with `offset_of`'s rule.
Everything in guest RAM came from the guest and is untrusted.

Besides the byte view, whole-RAM 'I' and 'Q' views let the ring code read descriptors and
request headers with single native loads, without making a memoryview per access.
"""

import mmap
from collections.abc import Callable

from vmsim.host.iommu import IommuFault as _IommuFault
from vmsim.host.iommu import Iotlb


class GuestMemoryError(Exception):
    """An access outside guest RAM (or an address that overflows 64 bits)."""


class IommuFault(_IommuFault, GuestMemoryError):
    """An access the IOMMU refuses (see vmsim.host.iommu.IommuFault): a GuestMemoryError too,
    so that ring code reports it as it reports an address outside RAM."""


class GuestMemory:
    """The guest's RAM: one shared mapping placed at `base` in the guest-physical space."""

    translating = False     # addresses are guest-physical (see IotlbMemory)

    __slots__ = ("base", "end", "i", "mm", "mv", "q", "size")

    def __init__(self, mm: mmap.mmap, base: int) -> None:
        self.mm = mm
        self.mv = memoryview(mm)
        self.base = base
        self.size = len(mm)
        self.end = base + self.size
        self.q = self.mv[:self.size & ~7].cast("Q")
        self.i = self.mv[:self.size & ~3].cast("I")

    def offset_of(self, addr: int, length: int) -> int:
        """The RAM offset of guest-physical [addr, addr+length), refusing anything outside."""
        off = addr - self.base
        if off < 0 or length < 0 or off + length > self.size:
            raise GuestMemoryError(
                f"guest address range 0x{addr:x}+0x{length:x} is outside guest RAM "
                f"[0x{self.base:x}, 0x{self.end:x})")
        return off

    def translate(self, addr: int, length: int) -> memoryview:
        """A view of guest-physical [addr, addr+length), refusing anything outside RAM."""
        off = self.offset_of(addr, length)
        return self.mv[off:off + length]

    def check(self, addr: int, length: int) -> bool:
        off = addr - self.base
        return off >= 0 and length >= 0 and off + length <= self.size

    def release(self) -> None:
        self.q.release()
        self.i.release()
        self.mv.release()


class IotlbMemory:
    """Guest memory as a device behind an IOMMU reaches it (VIRTIO_F_ACCESS_PLATFORM): the
    device's addresses are IOVAs, translated through `iotlb()` (the endpoint's current
    IOTLB) with the permission each access needs; an access the guest did not map, or mapped
    without that permission, raises IommuFault (a GuestMemoryError).

    It shares the RAM mapping and the byte / 'I' / 'Q' views with the GuestMemory it wraps,
    so offsets it hands out index those views. Its untranslated window is empty (base 0,
    size 0): ring code that range-checks `addr - base` inline on a fast path refuses every
    address there and must take its translating path (vmsim.host.iommu_rings)."""

    translating = True

    def __init__(self, ram: GuestMemory, iotlb: Callable[[], Iotlb], who: str = "",
                 on_fault: Callable[[IommuFault], None] | None = None) -> None:
        self.ram = ram
        self.mm, self.mv, self.q, self.i = ram.mm, ram.mv, ram.q, ram.i
        self.base = 0
        self.size = 0
        self.end = 0
        self.ram_base = ram.base
        self.ram_size = ram.size
        self.iotlb = iotlb
        self.who = who
        self.on_fault = on_fault
        self.iommu: object = None       # the IOMMU model and endpoint, for a vhost-user
        self.endpoint = 0               # frontend that forwards this endpoint's mappings

    def segments(self, iova: int, length: int, perm: int) -> list[tuple[int, int]]:
        """[iova, iova+length) as (RAM offset, length) pieces for an access needing `perm`."""
        try:
            pieces = self.iotlb().translate(iova, length, perm, self.who)
        except _IommuFault as e:
            err = IommuFault(e.kind, e.iova, e.length, e.perm, e.who, e.have)
            if self.on_fault is not None:
                self.on_fault(err)
            raise err from None
        base, size = self.ram_base, self.ram_size
        out = []
        for gpa, n in pieces:
            off = gpa - base
            if off < 0 or off + n > size:
                # A mapping to something that is not RAM (the IOMMU refuses such maps; a
                # vhost-user frontend's IOTLB is checked against its regions): still refused.
                raise IommuFault("unmapped", iova, length, perm, self.who + ", outside RAM")
            out.append((off, n))
        return out

    def offset_of(self, addr: int, length: int, perm: int = 1) -> int:
        """The RAM offset of [addr, addr+length), which must be one contiguous piece (a ring
        area; the guest maps each as one block)."""
        pieces = self.segments(addr, length, perm)
        if len(pieces) != 1:
            raise GuestMemoryError(f"IOVA range 0x{addr:x}+0x{length:x} is not contiguous "
                                   f"in guest RAM ({len(pieces)} pieces)")
        return pieces[0][0]

    def translate(self, addr: int, length: int, perm: int = 1) -> memoryview:
        off = self.offset_of(addr, length, perm)
        return self.mv[off:off + length]

    def check(self, addr: int, length: int) -> bool:
        try:
            self.segments(addr, length, 1)
        except GuestMemoryError:
            return False
        return True

    def release(self) -> None:
        """The RAM views belong to the wrapped GuestMemory."""
