"""The guest's driver for vmsim's IOMMU device (layout in vmsim.abi.iommu): it finds the
device where the firmware description says, checks its identity and page size, and submits
virtio-iommu requests (ATTACH, MAP, UNMAP) for the devices' DMA objects
(vmsim.guest.memory.DeviceDma), one trapped write per submission.

Every device behind the IOMMU gets a domain of its own (domain id = endpoint id), attached at
boot: until its driver maps something the device reaches no memory at all.
"""

import threading
from typing import Any

from vmsim.abi import iommu as I
from vmsim.guest.memory import DmaMemory
from vmsim.guest.platform import Platform


class IommuProbeError(RuntimeError):
    """The IOMMU the firmware names is not there or not usable."""


class IommuDriver:
    def __init__(self, platform: Platform, dma: DmaMemory, node: dict[str, Any]) -> None:
        self.platform = platform
        self.base = int(node["base"])
        self.endpoints: dict[str, int] = {k: int(v) for k, v in node.get("endpoints", {}).items()}
        self.strict: set[str] = set(node.get("strict", ()))   # iommu.strict=1 for these
        magic = platform.read(self.base + I.REG_MAGIC, 4)
        version = platform.read(self.base + I.REG_VERSION, 4)
        if magic != I.MAGIC or version != I.VERSION:
            raise IommuProbeError(f"no IOMMU at 0x{self.base:x} (magic 0x{magic:x}, "
                                  f"version {version})")
        if not platform.read(self.base + I.REG_PAGE_SIZE_MASK, 4) & I.PAGE_SIZE:
            raise IommuProbeError("the IOMMU does not support 4 KiB pages")
        # The request slots live in guest RAM, allocated once; the IOMMU reads them
        # physically. One lock: submissions come from driver threads and the interrupt thread.
        self.req_gpa, self.req = dma.alloc(I.SLOT_SIZE * I.MAX_BATCH, 64)
        platform.write(self.base + I.REG_CMD_BASE_LO, 4, self.req_gpa & 0xFFFFFFFF)
        platform.write(self.base + I.REG_CMD_BASE_HI, 4, self.req_gpa >> 32)
        self._lock = threading.Lock()
        self.submits = 0

    def _submit(self, kind: int, body: bytes) -> int:
        """Execute one request; its status (VIRTIO_IOMMU_S_*)."""
        return self._submit_many(kind, [body])[0]

    def _submit_many(self, kind: int, bodies: list[bytes]) -> list[int]:
        """Execute up to MAX_BATCH requests of one kind with one trapped write."""
        tail = I.TAIL_AT[kind]
        req = self.req
        with self._lock:
            for k, body in enumerate(bodies):
                at = k * I.SLOT_SIZE
                req[at:at + len(body)] = body
                req[at + tail] = 0xFF       # overwritten by the device when it executes
            self.platform.write(self.base + I.REG_CMD_SUBMIT, 4, len(bodies))
            self.submits += 1
            return [req[k * I.SLOT_SIZE + tail] for k in range(len(bodies))]

    def attach(self, domain: int, endpoint: int) -> int:
        return self._submit(I.T_ATTACH, I.ATTACH.pack(I.T_ATTACH, domain, endpoint, 0, 0))

    def detach(self, domain: int, endpoint: int) -> int:
        return self._submit(I.T_DETACH, I.DETACH.pack(I.T_DETACH, domain, endpoint, 0))

    def map(self, domain: int, iova: int, gpa: int, size: int, perm: int) -> int:
        flags = (I.MAP_F_READ if perm & 1 else 0) | (I.MAP_F_WRITE if perm & 2 else 0)
        return self._submit(I.T_MAP, I.MAP.pack(I.T_MAP, domain, iova, iova + size - 1, gpa,
                                                flags, 0))

    def unmap(self, domain: int, iova: int, size: int) -> int:
        return self._submit(I.T_UNMAP, I.UNMAP.pack(I.T_UNMAP, domain, iova, iova + size - 1, 0))

    def unmap_many(self, domain: int, ranges: list[tuple[int, int]]) -> list[int]:
        """UNMAP each (iova, size), up to MAX_BATCH of them in one submission."""
        return self._submit_many(I.T_UNMAP, [I.UNMAP.pack(I.T_UNMAP, domain, iova,
                                                          iova + size - 1, 0)
                                             for iova, size in ranges])
