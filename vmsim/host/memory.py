"""Guest memory as the device side reaches it (vm-memory's GuestMemory in rust-vmm).

Every access a device makes to guest RAM is bounds-checked against this object: `translate`
turns a guest-physical (address, length) into a memoryview, and the ring code, which checks
ranges itself on its hot path, keeps RAM offsets it validated with `offset_of`'s rule.
Everything in guest RAM came from the guest and is untrusted.

Besides the byte view, whole-RAM 'I' and 'Q' views let the ring code read descriptors and
request headers with single native loads, without making a memoryview per access.
"""

import mmap


class GuestMemoryError(Exception):
    """An access outside guest RAM (or an address that overflows 64 bits)."""


class GuestMemory:
    """The guest's RAM: one shared mapping placed at `base` in the guest-physical space."""

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
