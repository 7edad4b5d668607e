"""The frontend's memory, as a vhost-user backend maps it from the fds it was sent.

Each region names a guest-physical range, the frontend's user (virtual) address of the same
bytes, and where they start in the region's fd. Descriptors carry guest-physical addresses;
ring addresses (SET_VRING_ADDR) are user addresses, translated here to guest-physical.

vmsim's device-side ring code reaches guest RAM through one bounds-checked window
(vmsim.host.memory.GuestMemory: one mapping at one base). A frontend's regions are usually
slices of one RAM object whose guest-physical address equals its offset in the fd plus a
constant (QEMU's memory-backend-memfd below 4 GiB: [0, 640K) and [1M, top), holes for VGA and
ROM between). Such a table becomes one mapping of the fd from the lowest region to the end of
the highest, with GuestMemory placed at the lowest guest-physical address; a descriptor that
points into a hole between regions then reaches bytes of the frontend's own shared RAM object,
never anything of the backend's. A table that does not fit one window (regions of different
objects, or of one at different offsets - RAM above 4 GiB) is refused with a clear message.

Every number is untrusted: regions must not overlap, wrap 64 bits, or extend past the end of
their fd (a mapping past EOF would SIGBUS the backend on first touch).
"""

import itertools
import mmap
import os
import stat

from vmsim.host.memory import GuestMemory
from vmsim.vhost.protocol import MemRegion

PAGE = mmap.ALLOCATIONGRANULARITY
U64_END = 1 << 64
MAX_MEM_SLOTS = 32          # what GET_MAX_MEM_SLOTS answers


class MemoryTableError(ValueError):
    """A memory table or region the backend cannot use; the text says why."""


class _Slot:
    __slots__ = ("fd", "key", "region")

    def __init__(self, region: MemRegion, fd: int, key: tuple[int, int]) -> None:
        self.region = region
        self.fd = fd
        self.key = key


class MemoryTable:
    """The regions of one session and the window built from them."""

    def __init__(self) -> None:
        self.slots: list[_Slot] = []
        self.mem: GuestMemory | None = None
        self._mm: mmap.mmap | None = None

    # ---- changes ---------------------------------------------------------------------------------
    def _slot(self, r: MemRegion, fd: int) -> _Slot:
        if r.size == 0:
            raise MemoryTableError(f"{r}: size 0")
        if r.gpa + r.size > U64_END or r.uva + r.size > U64_END \
                or r.mmap_offset + r.size > U64_END:
            raise MemoryTableError(f"{r}: wraps past 2^64")
        try:
            st = os.fstat(fd)
        except OSError as e:
            raise MemoryTableError(f"{r}: fd {fd}: {e.strerror}") from None
        if not stat.S_ISREG(st.st_mode):
            raise MemoryTableError(f"{r}: its fd is not a memory object or file")
        if r.mmap_offset + r.size > st.st_size:
            raise MemoryTableError(f"{r}: extends past the end of its fd "
                                   f"({st.st_size} bytes)")
        return _Slot(r, fd, (st.st_dev, st.st_ino))

    def set_table(self, regions: list[MemRegion], fds: list[int]) -> None:
        """SET_MEM_TABLE: replace every region. Takes ownership of `fds` (closed on error)."""
        if len(fds) != len(regions):
            for fd in fds:
                os.close(fd)
            raise MemoryTableError(f"{len(regions)} regions with {len(fds)} fds")
        try:
            new = [self._slot(r, fd) for r, fd in zip(regions, fds, strict=True)]
            self._check_overlap(new)
        except MemoryTableError:
            for fd in fds:
                os.close(fd)
            raise
        self._replace(new)

    def add_region(self, r: MemRegion, fd: int) -> None:
        """ADD_MEM_REG. Takes ownership of `fd`."""
        try:
            if len(self.slots) >= MAX_MEM_SLOTS:
                raise MemoryTableError(f"{r}: all {MAX_MEM_SLOTS} slots in use")
            s = self._slot(r, fd)
            new = [*self.slots, s]
            self._check_overlap(new)
        except MemoryTableError:
            os.close(fd)
            raise
        self._replace(new, keep_fds=True)

    def remove_region(self, r: MemRegion) -> None:
        """REM_MEM_REG: the region with this guest address, size and user address."""
        for k, s in enumerate(self.slots):
            q = s.region
            if (q.gpa, q.size, q.uva) == (r.gpa, r.size, r.uva):
                new = self.slots[:k] + self.slots[k + 1:]
                self._replace(new, keep_fds=True)
                os.close(s.fd)
                return
        raise MemoryTableError(f"{r}: no such region")

    @staticmethod
    def _check_overlap(slots: list[_Slot]) -> None:
        for key in ("gpa", "uva"):
            spans = sorted((getattr(s.region, key), s.region.size) for s in slots)
            for (a, n), (b, _) in itertools.pairwise(spans):
                if a + n > b:
                    raise MemoryTableError(f"regions overlap in {key} space at 0x{b:x}")

    def _replace(self, new: list[_Slot], keep_fds: bool = False) -> None:
        """Build the window for `new` (before giving up the old one: a bad table leaves the
        session's memory as it was)."""
        mm, mem = self._build(new)
        old_fds = {s.fd for s in self.slots} - {s.fd for s in new}
        self._release_window()
        if not keep_fds:
            for fd in old_fds:
                os.close(fd)
        self.slots = new
        self._mm, self.mem = mm, mem

    @staticmethod
    def _build(slots: list[_Slot]) -> tuple[mmap.mmap | None, GuestMemory | None]:
        if not slots:
            return None, None
        first = slots[0]
        delta = first.region.gpa - first.region.mmap_offset
        for s in slots[1:]:
            if s.key != first.key or s.region.gpa - s.region.mmap_offset != delta:
                raise MemoryTableError(
                    "regions are not slices of one memory object at one guest-physical offset "
                    "(vmsim's device side reaches guest RAM through one window): "
                    + ", ".join(repr(x.region) for x in slots))
        lo = min(s.region.mmap_offset for s in slots)
        hi = max(s.region.mmap_offset + s.region.size for s in slots)
        map_off = lo - lo % PAGE
        try:
            mm = mmap.mmap(first.fd, hi - map_off, flags=mmap.MAP_SHARED,
                           prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=map_off)
        except (OSError, ValueError, OverflowError) as e:
            raise MemoryTableError(f"cannot map the regions: {e}") from None
        return mm, GuestMemory(mm, map_off + delta)

    # ---- translation -----------------------------------------------------------------------------
    def uva_to_gpa(self, uva: int, length: int) -> int:
        """The guest-physical address of the frontend's user address range (ring addresses)."""
        for s in self.slots:
            r = s.region
            if r.uva <= uva and uva + length <= r.uva + r.size:
                return uva - r.uva + r.gpa
        raise MemoryTableError(f"user address range 0x{uva:x}+0x{length:x} is in no region")

    def describe(self) -> str:
        return ", ".join(repr(s.region) for s in self.slots) or "no regions"

    # ---- teardown --------------------------------------------------------------------------------
    def _release_window(self) -> None:
        if self.mem is not None:
            self.mem.release()
            self.mem = None
        if self._mm is not None:
            try:
                self._mm.close()
            except BufferError:
                pass            # a view still exported: the mapping goes with its last view
            self._mm = None

    def close(self) -> None:
        self._release_window()
        for s in self.slots:
            try:
                os.close(s.fd)
            except OSError:
                pass
        self.slots = []
