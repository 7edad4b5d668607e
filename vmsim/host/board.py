"""The VM's board: the guest-physical memory map and I/O port space, the resources each
transport is given (register windows, interrupt lines, PCI slots, subchannels), and the
routing of trapped accesses to whoever owns the address.

    guest-physical map (as on QEMU's arm "virt" machine where it has an equivalent)
      0x0900_0000  the IOMMU's registers (when a device sits behind it)
      0x0a00_0000  virtio-mmio windows, 0x200 bytes each
      0x1000_0000  PCI memory BARs (assigned here, as firmware would)
      0x3000_0000  PCI ECAM configuration space (bus 0)
      0x4000_0000  RAM (the default memory_base)
    I/O ports
      0xc000       PCI I/O BARs (legacy virtio-pci)
"""

from collections.abc import Callable
from typing import Any

IOMMU_BASE = 0x0900_0000
MMIO_BASE = 0x0A00_0000
MMIO_STRIDE = 0x200
PCI_MMIO_BASE = 0x1000_0000
PCI_MMIO_SIZE = 0x1000_0000
PCI_ECAM_BASE = 0x3000_0000
PCI_PIO_BASE = 0xC000
PCI_PIO_SIZE = 0x4000
FIRST_IRQ = 32

Reader = Callable[[int, int], int]
Writer = Callable[[int, int, int], None]


class Region:
    """A window of an address space owned by a transport: trapped accesses to it go to
    `read(offset, width)` / `write(offset, width, value)`."""

    __slots__ = ("base", "name", "read", "size", "space", "write")

    def __init__(self, space: str, base: int, size: int, read: Reader, write: Writer,
                 name: str) -> None:
        self.space, self.base, self.size = space, base, size
        self.read, self.write, self.name = read, write, name

    @property
    def end(self) -> int:
        return self.base + self.size


class AddressSpace:
    """Non-overlapping regions of one space ("mmio" or "pio")."""

    def __init__(self, space: str) -> None:
        self.space = space
        self.regions: list[Region] = []

    def add(self, region: Region) -> None:
        for r in self.regions:
            if region.base < r.end and r.base < region.end:
                raise ValueError(f"{self.space} region {region.name} at 0x{region.base:x} "
                                 f"overlaps {r.name} at 0x{r.base:x}")
        self.regions.append(region)
        self.regions.sort(key=lambda r: r.base)

    def remove(self, region: Region) -> None:
        if region in self.regions:
            self.regions.remove(region)

    def find(self, addr: int) -> Region | None:
        for r in self.regions:
            if r.base <= addr < r.end:
                return r
        return None


class Board:
    """Resources of one VM, handed out as transports are built."""

    def __init__(self) -> None:
        self.mmio = AddressSpace("mmio")
        self.pio = AddressSpace("pio")
        self._next_mmio_slot = 0
        self._next_irq = FIRST_IRQ
        self._next_bar = PCI_MMIO_BASE
        self._next_port = PCI_PIO_BASE
        self.pci: Any = None          # the PCI host bridge, made on first use
        self.css: Any = None          # the channel subsystem, made on first use

    def mmio_window(self) -> int:
        """The next virtio-mmio register window."""
        base = MMIO_BASE + self._next_mmio_slot * MMIO_STRIDE
        self._next_mmio_slot += 1
        return base

    def irq(self) -> int:
        """A new interrupt line."""
        irq = self._next_irq
        self._next_irq += 1
        return irq

    def bar_window(self, size: int) -> int:
        """Guest-physical space for a PCI memory BAR of `size` (a power of two), aligned."""
        base = (self._next_bar + size - 1) & ~(size - 1)
        if base + size > PCI_MMIO_BASE + PCI_MMIO_SIZE:
            raise ValueError("PCI memory window exhausted")
        self._next_bar = base + size
        return base

    def io_window(self, size: int) -> int:
        """I/O port space for a PCI I/O BAR of `size` (a power of two), aligned."""
        base = (self._next_port + size - 1) & ~(size - 1)
        if base + size > PCI_PIO_BASE + PCI_PIO_SIZE:
            raise ValueError("PCI I/O window exhausted")
        self._next_port = base + size
        return base
