"""Guest RAM as the guest sees it: one shared mapping at a guest-physical base address, and
an allocator for what drivers place in it (rings with the spec's alignments, buffers).

Addresses handed to devices are guest-physical (GPA = base + offset into the object). The
guest reaches its own memory through `view(gpa, length)`, its phys_to_virt.
"""

import bisect
import mmap


class OutOfGuestMemory(MemoryError):
    """The allocator has no free extent large enough."""


class DmaMappingError(MemoryError):
    """A streaming mapping could not be made (dma_mapping_error): no IOVA space left, or the
    IOMMU refused the MAP."""


# enum dma_data_direction (include/linux/dma-direction.h): the device's access to a buffer.
DMA_BIDIRECTIONAL = 0
DMA_TO_DEVICE = 1       # the device reads it
DMA_FROM_DEVICE = 2     # the device writes it


class GuestRAM:
    """The mapped RAM object and its guest-physical placement."""

    def __init__(self, mm: mmap.mmap, base: int) -> None:
        self.mm = mm
        self.base = base
        self.size = len(mm)
        self.mv = memoryview(mm)

    def view(self, gpa: int, length: int) -> memoryview:
        """A writable view of [gpa, gpa+length) of guest RAM."""
        off = gpa - self.base
        if off < 0 or length < 0 or off + length > self.size:
            raise ValueError(f"guest address range 0x{gpa:x}+{length} is outside RAM")
        return self.mv[off:off + length]

    def contains(self, gpa: int, length: int) -> bool:
        off = gpa - self.base
        return off >= 0 and length >= 0 and off + length <= self.size

    def release(self) -> None:
        self.mv.release()


class Allocator:
    """First-fit allocator over guest-physical extents, with coalescing on free.

    Used at setup time (rings, request pools, workload buffers), never per request."""

    def __init__(self, base: int, size: int, reserve_low: int = 0x1000) -> None:
        # Keep the first page unused so that address 0 of RAM is never a valid buffer.
        self._starts: list[int] = [base + reserve_low]
        self._ends: list[int] = [base + size]
        self._allocated: dict[int, tuple[int, int]] = {}  # gpa -> (extent start, extent end)
        self.total = size - reserve_low

    def alloc(self, size: int, align: int = 8) -> int:
        """A GPA of `size` bytes aligned to `align` (a power of two)."""
        if size <= 0:
            raise ValueError("allocation size must be positive")
        for k, (s, e) in enumerate(zip(self._starts, self._ends, strict=True)):
            a = (s + align - 1) & ~(align - 1)
            if a + size <= e:
                self._take(k, s, e, a, a + size)
                self._allocated[a] = (s if a - s < 16 else a, a + size)
                return a
        raise OutOfGuestMemory(f"no free guest memory for {size} bytes (align {align})")

    def _take(self, k: int, s: int, e: int, a: int, end: int) -> None:
        del self._starts[k], self._ends[k]
        # The alignment gap before `a` is kept free unless it is tiny (then it joins the block).
        if a - s >= 16:
            self._insert(s, a)
        if e > end:
            self._insert(end, e)

    def _insert(self, s: int, e: int) -> None:
        k = bisect.bisect_left(self._starts, s)
        self._starts.insert(k, s)
        self._ends.insert(k, e)

    def free(self, gpa: int) -> None:
        s, e = self._allocated.pop(gpa)
        k = bisect.bisect_left(self._starts, s)
        # coalesce with the following and the preceding extent
        if k < len(self._starts) and self._starts[k] == e:
            e = self._ends[k]
            del self._starts[k], self._ends[k]
        if k > 0 and self._ends[k - 1] == s:
            s = self._starts[k - 1]
            del self._starts[k - 1], self._ends[k - 1]
            k -= 1
        self._starts.insert(k, s)
        self._ends.insert(k, e)

    @property
    def free_bytes(self) -> int:
        return sum(e - s for s, e in zip(self._starts, self._ends, strict=True))

    @property
    def allocations(self) -> int:
        return len(self._allocated)


class DmaMemory:
    """RAM + allocator: what a driver calls for coherent memory (dma_alloc_coherent)."""

    def __init__(self, ram: GuestRAM) -> None:
        self.ram = ram
        self.allocator = Allocator(ram.base, ram.size)

    def alloc(self, size: int, align: int = 8, zero: bool = True) -> tuple[int, memoryview]:
        gpa = self.allocator.alloc(size, align)
        mv = self.ram.view(gpa, size)
        if zero:
            mv[:] = bytes(size)
        return gpa, mv

    def free(self, gpa: int) -> None:
        self.allocator.free(gpa)

    # dma-direct: without an IOMMU the device's address of a buffer is its guest-physical one.
    def map_single(self, gpa: int, size: int, direction: int) -> int:
        """dma_map_single: the address the device uses for [gpa, gpa+size)."""
        return gpa

    def unmap_single(self, dma_addr: int, size: int, direction: int) -> None:
        """dma_unmap_single: the device may no longer reach the buffer."""
