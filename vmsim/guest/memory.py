"""Guest RAM as the guest sees it: one shared mapping at a guest-physical base address, and
an allocator for what drivers place in it (rings with the spec's alignments, buffers).

Addresses handed to devices are guest-physical (GPA = base + offset into the object). The
guest reaches its own memory through `view(gpa, length)`, its phys_to_virt.
"""

import bisect
import mmap
import threading
import time
from collections import deque
from typing import Any, Protocol


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


PAGE = 4096
# Where a device's IOVAs start: far from guest-physical addresses (RAM is below 4 GiB), so
# that an IOVA used as a GPA, or the reverse, is caught at once.
IOVA_BASE = 1 << 32
IOVA_SIZE = 1 << 40
POOL_CHUNK = 64 * 1024      # coherent pool chunk (dma_pool) for allocations below a page
FQ_MAX = 256                # lazy mode: deferred unmaps held at most (then half are flushed)
FQ_AGE_S = 0.01             # lazy mode: flush() drops deferred unmaps older than this
PERM_R, PERM_W = 1, 2
_PERM_OF = {DMA_BIDIRECTIONAL: PERM_R | PERM_W, DMA_TO_DEVICE: PERM_R, DMA_FROM_DEVICE: PERM_W}


class IommuOps(Protocol):
    """What a device's DMA object asks of the IOMMU driver (vmsim.guest.iommu)."""

    def map(self, domain: int, iova: int, gpa: int, size: int, perm: int) -> int: ...
    def unmap(self, domain: int, iova: int, size: int) -> int: ...
    def unmap_many(self, domain: int, ranges: list[tuple[int, int]]) -> list[int]: ...


class _Chunk:
    """Coherent memory mapped in one piece: [iova, iova+size) -> [gpa, gpa+size)."""

    __slots__ = ("gpa", "iova", "pool", "size")

    def __init__(self, iova: int, gpa: int, size: int, pool: Allocator | None) -> None:
        self.iova, self.gpa, self.size, self.pool = iova, gpa, size, pool


class DeviceDma:
    """One device's DMA API (the dma ops of its struct device).

    Without an IOMMU, or until the driver negotiated VIRTIO_F_ACCESS_PLATFORM, it is the
    shared DmaMemory: device addresses are guest-physical. Behind an IOMMU, once translated
    (set at FEATURES_OK), `alloc` (dma_alloc_coherent) returns memory mapped read/write in
    the device's domain and its IOVA; `map_single` (dma_map_single) maps a buffer's pages
    with the permission its direction gives (TO_DEVICE read, FROM_DEVICE write) at a fresh
    IOVA, and `unmap_single` takes the mapping away.

    Strict mode unmaps at once: the device cannot reach a buffer after its driver took it
    back. Lazy mode (the default, as Linux's on most platforms) puts unmaps in a flush queue
    that reaches the IOMMU in batches - when it is full, and from flush(), which the guest
    calls every 100 ms for entries older than 10 ms - and a buffer mapped again with the same
    pages and direction before its unmap was flushed takes its mapping back without a MAP:
    a driver that reuses its buffers makes no IOMMU request per I/O. The price is Linux's:
    until the flush the device can still reach a buffer its driver unmapped.

    `view(iova, n)` is the CPU's view of coherent memory known by its device address (the
    ring code builds its views from it). Sub-page coherent allocations share 64 KiB pool
    chunks (dma_pool), so that a queue's indirect tables do not take a page each.

    Called from the driver's threads and the interrupt thread (buffers unmapped as they come
    back): one lock covers the IOVA allocator and the records; no IOMMU request is made
    under it except a coherent allocation's MAP."""

    def __init__(self, mem: DmaMemory, iommu: IommuOps | None = None, domain: int = 0,
                 strict: bool = False) -> None:
        self.mem = mem
        self.iommu = iommu
        self.domain = domain
        self.strict = strict
        self.translated = False
        self.iova = Allocator(IOVA_BASE, IOVA_SIZE, reserve_low=0)
        self._chunks: list[_Chunk] = []          # sorted by iova
        self._small: dict[int, _Chunk] = {}      # pool allocation iova -> its chunk
        self._lock = threading.Lock()
        self._stream_gpa: dict[int, int] = {}    # streaming mapping IOVA page -> GPA page
        # lazy mode's flush queue: (GPA page, bytes, perm) -> IOVAs still mapped so; the
        # order of deferral, with a stamp per IOVA (an entry whose stamp changed is stale)
        self._fq: dict[tuple[int, int, int], list[int]] = {}
        self._fq_stamp: dict[int, int] = {}
        self._fq_order: deque[tuple[int, float, tuple[int, int, int], int]] = deque()
        self._fq_seq = 0
        self.n_maps = self.n_unmaps = self.n_revived = self.n_flushed = 0

    # ---- mode ------------------------------------------------------------------------------------
    def set_translated(self, on: bool) -> None:
        """Device addresses are IOVAs from now (VIRTIO_F_ACCESS_PLATFORM negotiated by a
        device behind an IOMMU), or guest-physical again. Only with no coherent memory out."""
        on = on and self.iommu is not None
        if on != self.translated:
            self._drop_idle_pools()
            if self._chunks:
                raise RuntimeError("the DMA mode changes while coherent memory is allocated")
        self.translated = on

    def _drop_idle_pools(self) -> None:
        """Unmap and free the pool chunks nothing is allocated from (a driver that went
        away gave back its indirect tables; the chunks stayed mapped for the next one)."""
        with self._lock:
            idle = [c for c in self._chunks if c.pool is not None and not c.pool.allocations]
            self._chunks = [c for c in self._chunks if c not in idle]
        for c in idle:
            self._iommu_unmap(c.iova, c.size)
            with self._lock:
                self.iova.free(c.iova)
            self.mem.free(c.gpa)

    @property
    def ram(self) -> Any:
        """What the ring code calls `view` on: RAM itself, or this object (IOVAs)."""
        return self if self.translated else self.mem.ram

    # ---- coherent memory -------------------------------------------------------------------------
    def alloc(self, size: int, align: int = 8, zero: bool = True) -> tuple[int, memoryview]:
        if not self.translated:
            return self.mem.alloc(size, align, zero)
        with self._lock:
            if size <= PAGE // 2 and align <= PAGE:
                iova, gpa = self._pool_alloc(size, align)
            else:
                chunk = self._new_chunk(size, max(align, PAGE), pool=False)
                iova, gpa = chunk.iova, chunk.gpa
        mv = self.mem.ram.view(gpa, size)
        if zero:
            mv[:] = bytes(size)
        return iova, mv

    def free(self, iova: int) -> None:
        if not self.translated:
            self.mem.free(iova)
            return
        with self._lock:
            chunk = self._small.pop(iova, None)
            if chunk is not None:
                chunk.pool.free(iova)       # the chunk stays mapped for the next allocation
                return
            k = self._chunk_index(iova)
            chunk = self._chunks[k]
            if chunk.iova != iova or chunk.pool is not None:
                raise ValueError(f"free of 0x{iova:x}, which alloc did not return")
            del self._chunks[k]
        self._iommu_unmap(chunk.iova, chunk.size)
        with self._lock:
            self.iova.free(chunk.iova)
        self.mem.free(chunk.gpa)

    def _new_chunk(self, size: int, align: int, pool: bool) -> _Chunk:
        n = _pages(size)
        gpa = self.mem.allocator.alloc(n, align)
        try:
            iova = self.iova.alloc(n, align)
        except OutOfGuestMemory:
            self.mem.free(gpa)
            raise
        status = self.iommu.map(self.domain, iova, gpa, n, PERM_R | PERM_W)
        if status:
            self.iova.free(iova)
            self.mem.free(gpa)
            raise OutOfGuestMemory(f"the IOMMU refused to map coherent memory (status {status})")
        chunk = _Chunk(iova, gpa, n, Allocator(iova, n, reserve_low=0) if pool else None)
        bisect.insort(self._chunks, chunk, key=lambda c: c.iova)
        return chunk

    def _pool_alloc(self, size: int, align: int) -> tuple[int, int]:
        for chunk in self._chunks:
            if chunk.pool is not None:
                try:
                    iova = chunk.pool.alloc(size, align)
                except OutOfGuestMemory:
                    continue
                self._small[iova] = chunk
                return iova, chunk.gpa + (iova - chunk.iova)
        chunk = self._new_chunk(POOL_CHUNK, PAGE, pool=True)
        iova = chunk.pool.alloc(size, align)
        self._small[iova] = chunk
        return iova, chunk.gpa + (iova - chunk.iova)

    def _chunk_index(self, iova: int) -> int:
        k = bisect.bisect_right(self._chunks, iova, key=lambda c: c.iova) - 1
        if k < 0 or iova >= self._chunks[k].iova + self._chunks[k].size:
            raise ValueError(f"IOVA 0x{iova:x} is not coherent memory of this device")
        return k

    def view(self, addr: int, length: int) -> memoryview:
        """The CPU's view of [addr, addr+length) of this device's coherent memory."""
        if not self.translated:
            return self.mem.ram.view(addr, length)
        with self._lock:
            chunk = self._chunks[self._chunk_index(addr)]
        if addr + length > chunk.iova + chunk.size:
            raise ValueError(f"IOVA range 0x{addr:x}+{length} leaves its coherent block")
        return self.mem.ram.view(chunk.gpa + (addr - chunk.iova), length)

    # ---- streaming mappings ----------------------------------------------------------------------
    def map_single(self, gpa: int, size: int, direction: int) -> int:
        """dma_map_single: the device address of [gpa, gpa+size) (DmaMappingError if the
        mapping cannot be made)."""
        if not self.translated:
            return gpa
        page = gpa & ~(PAGE - 1)
        n = _pages(gpa + size - page)
        perm = _PERM_OF[direction]
        with self._lock:
            held = self._fq.get((page, n, perm)) if not self.strict else None
            if held:
                iova = held.pop()
                if not held:
                    del self._fq[(page, n, perm)]
                del self._fq_stamp[iova]
                self.n_revived += 1
                return iova + (gpa - page)
            try:
                iova = self.iova.alloc(n, PAGE)
            except OutOfGuestMemory:
                raise DmaMappingError(f"no IOVA space for {n} bytes") from None
        status = self.iommu.map(self.domain, iova, page, n, perm)
        with self._lock:
            if status:
                self.iova.free(iova)
                raise DmaMappingError(f"the IOMMU refused MAP of 0x{page:x}+{n:#x} "
                                      f"(status {status})")
            self._stream_gpa[iova] = page
            self.n_maps += 1
        return iova + (gpa - page)

    def unmap_single(self, dma_addr: int, size: int, direction: int) -> None:
        """dma_unmap_single: strict, the device can no longer reach the buffer when this
        returns; lazy, once the flush queue is flushed."""
        if not self.translated:
            return
        page = dma_addr & ~(PAGE - 1)
        n = _pages(dma_addr + size - page)
        if self.strict:
            self._iommu_unmap(page, n)
            with self._lock:
                self.iova.free(page)
                del self._stream_gpa[page]
                self.n_unmaps += 1
            return
        with self._lock:
            self.n_unmaps += 1
            key = (self._stream_gpa[page], n, _PERM_OF[direction])
            self._fq_seq += 1
            self._fq.setdefault(key, []).append(page)
            self._fq_stamp[page] = self._fq_seq
            self._fq_order.append((self._fq_seq, time.monotonic(), key, page))
            victims = self._fq_take(FQ_MAX // 2, 0.0) if len(self._fq_stamp) > FQ_MAX else []
        self._flush_victims(victims)

    def flush(self, older_than: float = FQ_AGE_S) -> int:
        """Flush the unmaps deferred more than `older_than` seconds ago (every one with a
        negative age); how many."""
        with self._lock:
            victims = self._fq_take(0, time.monotonic() - older_than)
        self._flush_victims(victims)
        return len(victims)

    def _fq_take(self, keep: int, before: float) -> list[tuple[int, int]]:
        """Take deferred unmaps out of the queue, oldest first, down to `keep` entries
        (only those deferred before `before`, when it is not 0)."""
        out: list[tuple[int, int]] = []
        order = self._fq_order
        while order and len(self._fq_stamp) > keep:
            seq, t, key, iova = order[0]
            if before and t >= before:
                break
            order.popleft()
            if self._fq_stamp.get(iova) != seq:
                continue            # revived since, or deferred again (a later entry)
            del self._fq_stamp[iova]
            held = self._fq[key]
            held.remove(iova)
            if not held:
                del self._fq[key]
            out.append((iova, key[1]))
        return out

    def _flush_victims(self, victims: list[tuple[int, int]]) -> None:
        if not victims:
            return
        failed: set[int] = set()
        for k in range(0, len(victims), 64):
            part = victims[k:k + 64]
            for (iova, _n), status in zip(part, self.iommu.unmap_many(self.domain, part),
                                          strict=True):
                if status:
                    failed.add(iova)
        with self._lock:
            for iova, _n in victims:
                if iova not in failed:      # a mapping the IOMMU kept keeps its IOVA too
                    self.iova.free(iova)
                    del self._stream_gpa[iova]
            self.n_flushed += len(victims)
        if failed:
            raise DmaMappingError(f"the IOMMU refused {len(failed)} UNMAPs")

    def _iommu_unmap(self, iova: int, size: int) -> None:
        status = self.iommu.unmap(self.domain, iova, size)
        if status:
            # The mapping stays (the IOMMU refused): its IOVA must not be handed out again.
            raise DmaMappingError(f"the IOMMU refused UNMAP of 0x{iova:x}+{size:#x} "
                                  f"(status {status})")

    def describe(self) -> dict[str, Any]:
        return {"translated": self.translated, "strict": self.strict, "domain": self.domain,
                "maps": self.n_maps, "unmaps": self.n_unmaps, "revived": self.n_revived,
                "flushed": self.n_flushed, "deferred": len(self._fq_stamp),
                "coherent_chunks": len(self._chunks)}


def _pages(n: int) -> int:
    """`n` rounded up to whole pages."""
    return (n + PAGE - 1) & ~(PAGE - 1)
