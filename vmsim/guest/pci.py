"""The guest's PCI core (drivers/pci/: probe.c, pci.c, msi/): enumerating bus 0 through the
ECAM window the firmware tables describe, decoding BARs by sizing them, walking the capability
list, enabling a function's decoders and bus mastering, and MSI-X.

Every configuration access is a trapped read or write of the ECAM window (an exit), as on a
machine whose PCI host bridge is ECAM-only (arm64's "pci-host-ecam-generic").

MSI-X: enabling programs each table entry's message (an address in the CPU's MSI window and a
data word) with the entry masked, then clears the function mask; requesting a vector's
interrupt unmasks its entry, freeing it masks it again (irq_startup / irq_shutdown). The
interrupt of table entry i arrives on the interrupt line ("msix", slot, i): the irqfd the VMM
routed for that entry's message, as KVM routes an MSI to an irqfd.
"""

import errno
from typing import Any

from vmsim.abi import pci as P
from vmsim.guest.platform import Platform

# Where MSI messages are written: the local APIC's window on x86. The VMM routes each table
# entry to its own irqfd whatever the message holds; the guest programs a valid one anyway.
MSI_ADDRESS = 0xFEE0_0000

EINVAL = -errno.EINVAL
ENOSPC = -errno.ENOSPC
ENODEV = -errno.ENODEV


class IoRegion:
    """A mapped part of a BAR (pci_iomap): reads and writes trap as memory or I/O accesses."""

    __slots__ = ("base", "platform", "space")

    def __init__(self, platform: Platform, space: str, base: int) -> None:
        self.platform, self.space, self.base = platform, space, base

    def read(self, off: int, width: int) -> int:
        if self.space == "pio":
            return self.platform.io_read(self.base + off, width)
        return self.platform.read(self.base + off, width)

    def write(self, off: int, width: int, value: int) -> None:
        if self.space == "pio":
            self.platform.io_write(self.base + off, width, value)
        else:
            self.platform.write(self.base + off, width, value)

    def read8(self, off: int) -> int:
        return self.read(off, 1)

    def read16(self, off: int) -> int:
        return self.read(off, 2)

    def read32(self, off: int) -> int:
        return self.read(off, 4)

    def write8(self, off: int, value: int) -> None:
        self.write(off, 1, value)

    def write16(self, off: int, value: int) -> None:
        self.write(off, 2, value)

    def write32(self, off: int, value: int) -> None:
        self.write(off, 4, value)

    def address(self, off: int = 0) -> int:
        return self.base + off


class PciBar:
    """struct resource of one BAR: where the firmware put it and how big it is."""

    __slots__ = ("index", "is64", "kind", "prefetch", "size", "start")

    def __init__(self, index: int, kind: str, start: int, size: int, is64: bool,
                 prefetch: bool) -> None:
        self.index, self.kind, self.start, self.size = index, kind, start, size
        self.is64, self.prefetch = is64, prefetch

    def __repr__(self) -> str:
        return (f"PciBar({self.index}, {self.kind}{'64' if self.is64 else ''}, "
                f"0x{self.start:x}+0x{self.size:x})")


class Ecam:
    """Configuration access through the ECAM window of one host bridge."""

    def __init__(self, platform: Platform, base: int) -> None:
        self.platform = platform
        self.base = base

    def read(self, bus: int, slot: int, fn: int, reg: int, width: int) -> int:
        return self.platform.read(self.base + P.ecam_offset(bus, slot, fn, reg), width)

    def write(self, bus: int, slot: int, fn: int, reg: int, width: int, value: int) -> None:
        self.platform.write(self.base + P.ecam_offset(bus, slot, fn, reg), width, value)


class PciDev:
    """struct pci_dev: one function found on the bus."""

    def __init__(self, ecam: Ecam, bus: int, slot: int, fn: int) -> None:
        self.ecam = ecam
        self.bus, self.slot, self.fn = bus, slot, fn
        self.platform = ecam.platform
        self.vendor = self.cfg_read16(P.PCI_VENDOR_ID)
        self.device = self.cfg_read16(P.PCI_DEVICE_ID)
        rev_class = self.cfg_read32(P.PCI_REVISION_ID)
        self.revision = rev_class & 0xFF
        self.class_code = rev_class >> 8
        self.header_type = self.cfg_read8(P.PCI_HEADER_TYPE)
        self.subsystem_vendor = self.cfg_read16(P.PCI_SUBSYSTEM_VENDOR_ID)
        self.subsystem_device = self.cfg_read16(P.PCI_SUBSYSTEM_ID)
        self.pin = self.cfg_read8(P.PCI_INTERRUPT_PIN)
        # The line firmware routed INTx to (0: the function raises no INTx).
        self.irq = self.cfg_read8(P.PCI_INTERRUPT_LINE) if self.pin else 0
        self.bars: list[PciBar | None] = [None] * P.PCI_STD_NUM_BARS
        self._read_bases()
        self.msix_cap = self.find_capability(P.PCI_CAP_ID_MSIX)
        self.msix_enabled = False
        self.msix_nvec = 0
        self._msix_table: IoRegion | None = None
        self.enabled = False

    @property
    def name(self) -> str:
        """pci_name: domain:bus:slot.function."""
        return f"0000:{self.bus:02x}:{self.slot:02x}.{self.fn}"

    # ---- configuration space ---------------------------------------------------------------------
    def cfg_read(self, reg: int, width: int) -> int:
        return self.ecam.read(self.bus, self.slot, self.fn, reg, width)

    def cfg_write(self, reg: int, width: int, value: int) -> None:
        self.ecam.write(self.bus, self.slot, self.fn, reg, width, value)

    def cfg_read8(self, reg: int) -> int:
        return self.cfg_read(reg, 1)

    def cfg_read16(self, reg: int) -> int:
        return self.cfg_read(reg, 2)

    def cfg_read32(self, reg: int) -> int:
        return self.cfg_read(reg, 4)

    def cfg_write8(self, reg: int, value: int) -> None:
        self.cfg_write(reg, 1, value)

    def cfg_write16(self, reg: int, value: int) -> None:
        self.cfg_write(reg, 2, value)

    def cfg_write32(self, reg: int, value: int) -> None:
        self.cfg_write(reg, 4, value)

    # ---- BARs (__pci_read_base) ------------------------------------------------------------------
    def _read_bases(self) -> None:
        """Size each BAR: with decoding off, write all ones, read the size mask back,
        restore the address."""
        cmd = self.cfg_read16(P.PCI_COMMAND)
        decode = P.PCI_COMMAND_IO | P.PCI_COMMAND_MEMORY
        if cmd & decode:
            self.cfg_write16(P.PCI_COMMAND, cmd & ~decode)
        i = 0
        while i < P.PCI_STD_NUM_BARS:
            pos = P.PCI_BASE_ADDRESS_0 + 4 * i
            orig = self.cfg_read32(pos)
            self.cfg_write32(pos, 0xFFFFFFFF)
            sz = self.cfg_read32(pos)
            self.cfg_write32(pos, orig)
            if sz in (0, 0xFFFFFFFF):
                i += 1          # not implemented
                continue
            if orig & P.PCI_BASE_ADDRESS_SPACE_IO:
                mask = P.PCI_BASE_ADDRESS_IO_MASK & 0xFFFF
                size = _lowest_bit(sz & mask)
                if size:
                    self.bars[i] = PciBar(i, "io", orig & mask, size, False, False)
                i += 1
                continue
            is64 = orig & P.PCI_BASE_ADDRESS_MEM_TYPE_MASK == P.PCI_BASE_ADDRESS_MEM_TYPE_64
            start, szmask = orig & P.PCI_BASE_ADDRESS_MEM_MASK, sz & P.PCI_BASE_ADDRESS_MEM_MASK
            if is64 and i + 1 < P.PCI_STD_NUM_BARS:
                hi = self.cfg_read32(pos + 4)
                self.cfg_write32(pos + 4, 0xFFFFFFFF)
                szhi = self.cfg_read32(pos + 4)
                self.cfg_write32(pos + 4, hi)
                start |= hi << 32
                szmask |= szhi << 32
            size = _lowest_bit(szmask)
            if size:
                self.bars[i] = PciBar(i, "mem", start, size, is64,
                                      bool(orig & P.PCI_BASE_ADDRESS_MEM_PREFETCH))
            i += 2 if is64 else 1
        if cmd & decode:
            self.cfg_write16(P.PCI_COMMAND, cmd)

    def resource_start(self, i: int) -> int:
        bar = self.bars[i] if 0 <= i < P.PCI_STD_NUM_BARS else None
        return bar.start if bar is not None else 0

    def resource_len(self, i: int) -> int:
        bar = self.bars[i] if 0 <= i < P.PCI_STD_NUM_BARS else None
        return bar.size if bar is not None else 0

    def resource_kind(self, i: int) -> str:
        """"io", "mem", or "" for a BAR the function does not implement."""
        bar = self.bars[i] if 0 <= i < P.PCI_STD_NUM_BARS else None
        return bar.kind if bar is not None else ""

    def iomap(self, i: int, offset: int = 0) -> IoRegion | None:
        """pci_iomap_range: a BAR (from `offset`) as trapped accesses; None if it has none."""
        bar = self.bars[i] if 0 <= i < P.PCI_STD_NUM_BARS else None
        if bar is None:
            return None
        return IoRegion(self.platform, "pio" if bar.kind == "io" else "mmio", bar.start + offset)

    # ---- capabilities (pci_find_capability) ------------------------------------------------------
    def find_capability(self, cap_id: int) -> int:
        if not self.cfg_read16(P.PCI_STATUS) & P.PCI_STATUS_CAP_LIST:
            return 0
        return self._find_next(self.cfg_read8(P.PCI_CAPABILITY_LIST), cap_id)

    def find_next_capability(self, pos: int, cap_id: int) -> int:
        return self._find_next(self.cfg_read8(pos + P.PCI_CAP_LIST_NEXT), cap_id)

    def _find_next(self, pos: int, cap_id: int) -> int:
        """Follow the list from `pos`; a loop ends after PCI_FIND_CAP_TTL links."""
        for _ in range(P.PCI_FIND_CAP_TTL):
            pos &= ~3
            if pos < P.PCI_STD_HEADER_SIZEOF:
                return 0
            ent = self.cfg_read16(pos)
            if ent & 0xFF == 0xFF:
                return 0
            if ent & 0xFF == cap_id:
                return pos
            pos = ent >> 8
        return 0

    def capabilities(self) -> list[tuple[int, int]]:
        """(offset, capability ID) of every capability on the list."""
        caps: list[tuple[int, int]] = []
        if not self.cfg_read16(P.PCI_STATUS) & P.PCI_STATUS_CAP_LIST:
            return caps
        pos = self.cfg_read8(P.PCI_CAPABILITY_LIST)
        for _ in range(P.PCI_FIND_CAP_TTL):
            pos &= ~3
            if pos < P.PCI_STD_HEADER_SIZEOF:
                break
            ent = self.cfg_read16(pos)
            caps.append((pos, ent & 0xFF))
            pos = ent >> 8
        return caps

    # ---- enabling --------------------------------------------------------------------------------
    def enable_device(self) -> int:
        """pci_enable_device: turn on the decoders the function's BARs need."""
        want = 0
        for bar in self.bars:
            if bar is not None:
                want |= P.PCI_COMMAND_IO if bar.kind == "io" else P.PCI_COMMAND_MEMORY
        cmd = self.cfg_read16(P.PCI_COMMAND)
        if cmd & want != want:
            self.cfg_write16(P.PCI_COMMAND, cmd | want)
        self.enabled = True
        return 0

    def disable_device(self) -> None:
        """pci_disable_device: bus mastering off (the decoders stay on, as Linux leaves them)."""
        self.clear_master()
        self.enabled = False

    def set_master(self) -> None:
        cmd = self.cfg_read16(P.PCI_COMMAND)
        if not cmd & P.PCI_COMMAND_MASTER:
            self.cfg_write16(P.PCI_COMMAND, cmd | P.PCI_COMMAND_MASTER)

    def clear_master(self) -> None:
        cmd = self.cfg_read16(P.PCI_COMMAND)
        if cmd & P.PCI_COMMAND_MASTER:
            self.cfg_write16(P.PCI_COMMAND, cmd & ~P.PCI_COMMAND_MASTER)

    def intx(self, enable: bool) -> None:
        """pci_intx: the command register's INTx disable bit."""
        cmd = self.cfg_read16(P.PCI_COMMAND)
        new = cmd & ~P.PCI_COMMAND_INTX_DISABLE if enable else cmd | P.PCI_COMMAND_INTX_DISABLE
        if new != cmd:
            self.cfg_write16(P.PCI_COMMAND, new)

    # ---- MSI-X -----------------------------------------------------------------------------------
    def msix_vec_count(self) -> int:
        """pci_msix_vec_count: the table size, or -EINVAL without an MSI-X capability."""
        if not self.msix_cap:
            return EINVAL
        return (self.cfg_read16(self.msix_cap + P.PCI_MSIX_FLAGS) & P.PCI_MSIX_FLAGS_QSIZE) + 1

    def _msix_ctrl(self, clear: int, set_: int) -> None:
        """pci_msix_clear_and_set_ctrl."""
        pos = self.msix_cap + P.PCI_MSIX_FLAGS
        ctrl = self.cfg_read16(pos)
        new = (ctrl & ~clear) | set_
        if new != ctrl:
            self.cfg_write16(pos, new)

    def enable_msix_exact(self, nvec: int) -> int:
        """pci_enable_msix_exact (msix_capability_init): 0, or -errno if the function cannot
        give `nvec` vectors (no capability, a smaller table, its BAR missing)."""
        if self.msix_enabled:
            return EINVAL
        total = self.msix_vec_count()
        if total < 0:
            return total
        if nvec > total:
            return ENOSPC
        table = self.cfg_read32(self.msix_cap + P.PCI_MSIX_TABLE)
        bir, offset = table & P.PCI_MSIX_BIR, table & P.PCI_MSIX_OFFSET_MASK
        region = self.iomap(bir, offset)
        if region is None or region.space != "mmio":
            return EINVAL
        # Enabled but masked as a whole while the entries are set up.
        self._msix_ctrl(0, P.PCI_MSIX_FLAGS_MASKALL | P.PCI_MSIX_FLAGS_ENABLE)
        self._msix_table = region
        for i in range(nvec):
            e = i * P.PCI_MSIX_ENTRY_SIZE
            self.msix_mask_vector(i)
            region.write32(e + P.PCI_MSIX_ENTRY_LOWER_ADDR, MSI_ADDRESS)
            region.write32(e + P.PCI_MSIX_ENTRY_UPPER_ADDR, 0)
            region.write32(e + P.PCI_MSIX_ENTRY_DATA, i)
        self.intx(False)                       # pci_intx_for_msi
        self._msix_ctrl(P.PCI_MSIX_FLAGS_MASKALL, 0)
        self.msix_enabled = True
        self.msix_nvec = nvec
        return 0

    def msix_mask_vector(self, i: int) -> None:
        if self._msix_table is not None:
            self._msix_table.write32(i * P.PCI_MSIX_ENTRY_SIZE + P.PCI_MSIX_ENTRY_VECTOR_CTRL,
                                     P.PCI_MSIX_ENTRY_CTRL_MASKBIT)

    def msix_unmask_vector(self, i: int) -> None:
        if self._msix_table is not None:
            self._msix_table.write32(i * P.PCI_MSIX_ENTRY_SIZE + P.PCI_MSIX_ENTRY_VECTOR_CTRL,
                                     0)

    def disable_msix(self) -> None:
        """pci_disable_msix: mask every entry, disable MSI-X, INTx back on."""
        if not self.msix_enabled:
            return
        for i in range(self.msix_nvec):
            self.msix_mask_vector(i)
        self._msix_ctrl(P.PCI_MSIX_FLAGS_ENABLE, 0)
        self.intx(True)
        self.msix_enabled = False
        self.msix_nvec = 0
        self._msix_table = None

    def irq_vector(self, i: int) -> Any:
        """pci_irq_vector: the interrupt line of MSI-X vector i, or the INTx line."""
        if self.msix_enabled:
            return ("msix", self.slot, i) if 0 <= i < self.msix_nvec else None
        return self.irq if i == 0 and self.irq else None


def _lowest_bit(x: int) -> int:
    return x & -x


def scan_bus(platform: Platform, ecam_base: int, bus: int = 0) -> list[PciDev]:
    """pci_scan_child_bus: every function that answers on `bus`."""
    ecam = Ecam(platform, ecam_base)
    found = []
    for slot in range(P.PCI_SLOTS):
        vendor = ecam.read(bus, slot, 0, P.PCI_VENDOR_ID, 2)
        if vendor in (0xFFFF, 0x0000):
            continue
        header = ecam.read(bus, slot, 0, P.PCI_HEADER_TYPE, 1)
        nfn = P.PCI_FUNCTIONS if header & P.PCI_HEADER_TYPE_MFD else 1
        for fn in range(nfn):
            if fn and ecam.read(bus, slot, fn, P.PCI_VENDOR_ID, 2) in (0xFFFF, 0x0000):
                continue
            found.append(PciDev(ecam, bus, slot, fn))
    return found
