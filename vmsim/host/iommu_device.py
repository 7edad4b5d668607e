"""The IOMMU's register window on the board (layout in vmsim.abi.iommu): the guest submits
virtio-iommu requests from a request array in guest RAM; each submit is one trapped write
that executes the requests, in order, and writes each one's status before it returns.

The IOMMU reads its requests physically (it translates for others, not for itself). A bad
request gets its own status (INVAL, RANGE, NOENT ...); a request array outside RAM or a count
above MAX_BATCH is a guest error, recorded, and nothing executes.
"""

from vmsim.abi import iommu as I
from vmsim.host.board import Region
from vmsim.host.iommu import Iommu
from vmsim.host.memory import GuestMemory, GuestMemoryError


class IommuDevice:
    """The IOMMU's registers."""

    def __init__(self, iommu: Iommu, mem: GuestMemory, base: int) -> None:
        self.iommu = iommu
        self.strict: set[str] = set()   # devices whose guest driver unmaps strictly
        self.mem = mem
        self.base = base
        self.cmd_base = 0
        self.done = 0
        self.submits = 0
        self.guest_errors: list[str] = []

    def region(self) -> Region:
        return Region("mmio", self.base, I.REGION_SIZE, self.read, self.write, "iommu")

    def boot_node(self) -> dict:
        """The firmware's description: where the IOMMU is and which endpoint each device
        behind it is (a device tree's `iommus = <&iommu id>`)."""
        return {"base": self.base, "page_size": I.PAGE_SIZE,
                "endpoints": {name: ep for ep, name in self.iommu.endpoints.items()},
                # the guest kernel's iommu.strict=1, per device here (a topology choice)
                "strict": sorted(self.strict)}

    def read(self, offset: int, width: int) -> int:
        if width != 4:
            return 0xFFFFFFFF
        return {I.REG_MAGIC: I.MAGIC, I.REG_VERSION: I.VERSION,
                I.REG_PAGE_SIZE_MASK: I.PAGE_SIZE, I.REG_INPUT_BITS: I.INPUT_BITS,
                I.REG_CMD_BASE_LO: self.cmd_base & 0xFFFFFFFF,
                I.REG_CMD_BASE_HI: self.cmd_base >> 32, I.REG_CMD_DONE: self.done,
                I.REG_FAULTS: self.iommu.faults & 0xFFFFFFFF}.get(offset, 0)

    def write(self, offset: int, width: int, value: int) -> None:
        if width != 4:
            self._error(f"{width}-byte write at offset 0x{offset:x} (registers are 32-bit)")
        elif offset == I.REG_CMD_BASE_LO:
            self.cmd_base = (self.cmd_base & ~0xFFFFFFFF) | value
        elif offset == I.REG_CMD_BASE_HI:
            self.cmd_base = (self.cmd_base & 0xFFFFFFFF) | value << 32
        elif offset == I.REG_CMD_SUBMIT:
            self.submit(value)
        else:
            self._error(f"write of 0x{value:x} to read-only offset 0x{offset:x}")

    def _error(self, what: str) -> None:
        if len(self.guest_errors) < 64:
            self.guest_errors.append(f"iommu: {what}")

    def submit(self, count: int) -> None:
        self.done = 0
        if not 0 < count <= I.MAX_BATCH:
            self._error(f"submit of {count} requests (1..{I.MAX_BATCH})")
            return
        try:
            area = self.mem.translate(self.cmd_base, count * I.SLOT_SIZE)
        except GuestMemoryError as e:
            self._error(f"request array: {e}")
            return
        self.submits += 1
        for k in range(count):
            slot = area[k * I.SLOT_SIZE:(k + 1) * I.SLOT_SIZE]
            kind = slot[0]
            status = self._execute(kind, slot)
            slot[I.TAIL_AT.get(kind, I.SLOT_SIZE - 4)] = status
            self.done += 1
        area.release()

    def _execute(self, kind: int, slot: memoryview) -> int:
        iommu = self.iommu
        if kind == I.T_ATTACH:
            _, domain, endpoint, flags, _ = I.ATTACH.unpack_from(slot)
            return I.S_UNSUPP if flags else iommu.attach(domain, endpoint)
        if kind == I.T_DETACH:
            _, domain, endpoint, _ = I.DETACH.unpack_from(slot)
            return iommu.detach(domain, endpoint)
        if kind == I.T_MAP:
            _, domain, start, end, phys, flags, _ = I.MAP.unpack_from(slot)
            return iommu.map(domain, start, end, phys, flags)
        if kind == I.T_UNMAP:
            _, domain, start, end, _ = I.UNMAP.unpack_from(slot)
            return iommu.unmap(domain, start, end)
        return I.S_UNSUPP

    def describe(self) -> dict:
        return {"base": self.base, "submits": self.submits, **self.iommu.describe(),
                "guest_errors": list(self.guest_errors)}
