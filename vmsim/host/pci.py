"""The VM's PCI bus: a host bridge with ECAM configuration space for bus 0, the functions in
its slots (a type-0 configuration header each, with BARs, a capability list and MSI-X), as a
PCIe host bridge of QEMU's arm "virt" machine presents them (hw/pci-host/gpex.c, hw/pci/pci.c,
hw/pci/msix.c).

- **Configuration space.** Each function's 256 bytes are a byte array with a write mask, as
  QEMU keeps them: a write changes only the writable bits, so writing all ones to a BAR reads
  back its size mask (BAR sizing) and writes to read-only fields are ignored, as PCI wants.
  Capabilities hook reads and writes of their own ranges. Accesses are 1, 2 or 4 bytes,
  naturally aligned; anything else is a guest error and reads all ones. ECAM's 4 KiB per
  function reads 0 beyond the conventional 256 bytes (no extended capabilities).
- **BARs** are assigned by the host, as firmware would assign them before the guest boots, and
  the transports' register windows sit at those addresses. A BAR decodes only while its
  command bit (I/O or memory space) is set and it holds the address firmware gave it: a guest
  may size a BAR and write the address back, but a BAR it moves elsewhere decodes nowhere
  (the ioeventfds and windows stay where firmware put them); such an access is a guest error.
- **MSI-X**: a table entry per vector (address, data, vector control with its mask bit) and the
  pending bit array, in a memory BAR; each vector has its own eventfd (KVM's irqfd for the MSI
  route of that entry). A vector raised while masked (by its entry or by the function mask)
  sets its pending bit and fires when unmasked. Without bus mastering a function cannot send
  the MSI write, so such an interrupt is lost (counted), as on real hardware.
"""

import logging
from collections.abc import Callable
from typing import Any

from vmsim.abi import pci as P
from vmsim.host.board import PCI_ECAM_BASE, Board, Region
from vmsim.machine.eventfd import EventFd

log = logging.getLogger("vmsim.host")

ReadHook = Callable[[int, int], None]                # (offset, width) before a read
WriteHook = Callable[[int, int, bytes], None]        # (offset, width, old bytes) after a write


def _noop_exit(kind: str, write: bool) -> None:
    pass


class Bar:
    """One base address register as firmware assigned it."""

    __slots__ = ("addr", "index", "kind", "prefetch", "size")

    def __init__(self, index: int, kind: str, size: int, addr: int, prefetch: bool) -> None:
        if kind not in ("io", "mem32", "mem64"):
            raise ValueError(f"BAR kind {kind!r}")
        if size < (4 if kind == "io" else 16) or size & (size - 1):
            raise ValueError(f"BAR size {size} is not a power of two of at least the minimum")
        if addr & (size - 1):
            raise ValueError(f"BAR address 0x{addr:x} is not aligned to its size 0x{size:x}")
        self.index, self.kind, self.size, self.addr, self.prefetch = (index, kind, size, addr,
                                                                     prefetch)

    @property
    def is_io(self) -> bool:
        return self.kind == "io"

    def type_bits(self) -> int:
        if self.is_io:
            return P.PCI_BASE_ADDRESS_SPACE_IO
        bits = P.PCI_BASE_ADDRESS_MEM_TYPE_64 if self.kind == "mem64" else 0
        return bits | (P.PCI_BASE_ADDRESS_MEM_PREFETCH if self.prefetch else 0)


class PciFunction:
    """A function's type-0 configuration space."""

    def __init__(self, *, vendor: int, device: int, revision: int, class_code: int,
                 subsystem_vendor: int = 0, subsystem_id: int = 0, irq_line: int = 0,
                 irq_pin: int = 0, name: str = "",
                 guest_error: Callable[[str], None] | None = None,
                 count_exit: Callable[[str, bool], None] | None = None) -> None:
        self.name = name
        self.cfg = bytearray(P.PCI_CFG_SPACE_SIZE)
        self.wmask = bytearray(P.PCI_CFG_SPACE_SIZE)
        self.bars: list[Bar | None] = [None] * P.PCI_STD_NUM_BARS
        self.guest_error = guest_error or (lambda msg: log.info("guest error: %s: %s", name, msg))
        self.count_exit = count_exit or _noop_exit
        self._read_hooks: list[tuple[int, int, ReadHook]] = []
        self._write_hooks: list[tuple[int, int, WriteHook]] = []
        self._cap_next = P.PCI_STD_HEADER_SIZEOF     # where the next capability goes
        self._cap_last = 0                           # the last capability's offset
        self.slot = -1
        self.present = True          # False: the slot is empty (hot-unplugged, or not yet plugged)
        self._put(P.PCI_VENDOR_ID, 2, vendor)
        self._put(P.PCI_DEVICE_ID, 2, device)
        self._put(P.PCI_REVISION_ID, 1, revision)
        self._put(P.PCI_CLASS_PROG, 1, class_code & 0xFF)
        self._put(P.PCI_CLASS_DEVICE, 2, class_code >> 8)
        self._put(P.PCI_HEADER_TYPE, 1, P.PCI_HEADER_TYPE_NORMAL)
        self._put(P.PCI_SUBSYSTEM_VENDOR_ID, 2, subsystem_vendor)
        self._put(P.PCI_SUBSYSTEM_ID, 2, subsystem_id)
        self._put(P.PCI_INTERRUPT_LINE, 1, irq_line & 0xFF)
        self._put(P.PCI_INTERRUPT_PIN, 1, irq_pin)
        # What software may change: the command register's enables, the interrupt line, the
        # cache line size and latency timer (as QEMU's pci_init_wmask).
        cmd = (P.PCI_COMMAND_IO | P.PCI_COMMAND_MEMORY | P.PCI_COMMAND_MASTER
               | P.PCI_COMMAND_SERR | P.PCI_COMMAND_INTX_DISABLE)
        self._put_mask(P.PCI_COMMAND, 2, cmd)
        self._put_mask(P.PCI_CACHE_LINE_SIZE, 1, 0xFF)
        self._put_mask(P.PCI_LATENCY_TIMER, 1, 0xFF)
        self._put_mask(P.PCI_INTERRUPT_LINE, 1, 0xFF)
        self.command_listeners: list[Callable[[int, int], None]] = []
        self.add_write_hook(P.PCI_COMMAND, P.PCI_COMMAND + 2, self._command_written)

    # ---- building --------------------------------------------------------------------------------
    def _put(self, off: int, width: int, value: int) -> None:
        self.cfg[off:off + width] = (value & ((1 << 8 * width) - 1)).to_bytes(width, "little")

    def _put_mask(self, off: int, width: int, mask: int) -> None:
        self.wmask[off:off + width] = mask.to_bytes(width, "little")

    def get(self, off: int, width: int) -> int:
        """A field's current value (no side effects, no exit: the host's own view)."""
        return int.from_bytes(self.cfg[off:off + width], "little")

    def add_bar(self, bar: Bar) -> None:
        i = bar.index
        if self.bars[i] is not None or (bar.kind == "mem64" and (i == 5 or self.bars[i + 1])):
            raise ValueError(f"BAR {i} is taken")
        self.bars[i] = bar
        off = P.PCI_BASE_ADDRESS_0 + 4 * i
        low_mask = P.PCI_BASE_ADDRESS_IO_MASK if bar.is_io else P.PCI_BASE_ADDRESS_MEM_MASK
        self._put(off, 4, (bar.addr & low_mask) | bar.type_bits())
        self._put_mask(off, 4, ~(bar.size - 1) & low_mask & 0xFFFFFFFF)
        if bar.kind == "mem64":
            self._put(off + 4, 4, bar.addr >> 32)
            self._put_mask(off + 4, 4, (~(bar.size - 1) >> 32) & 0xFFFFFFFF)

    def add_capability(self, cap_id: int, size: int) -> int:
        """Append a capability of `size` bytes to the list; its offset (dword aligned)."""
        off = (self._cap_next + 3) & ~3
        if off + size > P.PCI_CFG_SPACE_SIZE:
            raise ValueError("configuration space full")
        self.cfg[off] = cap_id
        self.cfg[off + 1] = 0
        if self._cap_last:
            self.cfg[self._cap_last + P.PCI_CAP_LIST_NEXT] = off
        else:
            self.cfg[P.PCI_CAPABILITY_LIST] = off
            self._put(P.PCI_STATUS, 2, self.get(P.PCI_STATUS, 2) | P.PCI_STATUS_CAP_LIST)
        self._cap_last = off
        self._cap_next = off + size
        return off

    def add_read_hook(self, start: int, end: int, fn: ReadHook) -> None:
        self._read_hooks.append((start, end, fn))

    def add_write_hook(self, start: int, end: int, fn: WriteHook) -> None:
        self._write_hooks.append((start, end, fn))

    # ---- state the transports look at ------------------------------------------------------------
    @property
    def command(self) -> int:
        return self.get(P.PCI_COMMAND, 2)

    @property
    def bus_master(self) -> bool:
        return bool(self.command & P.PCI_COMMAND_MASTER)

    @property
    def intx_disabled(self) -> bool:
        return bool(self.command & P.PCI_COMMAND_INTX_DISABLE)

    def set_interrupt_status(self, level: bool) -> None:
        """The status register's Interrupt Status bit: the function's INTx level."""
        st = self.get(P.PCI_STATUS, 2)
        st = st | P.PCI_STATUS_INTERRUPT if level else st & ~P.PCI_STATUS_INTERRUPT
        self._put(P.PCI_STATUS, 2, st)

    def bar_value(self, index: int) -> int:
        """The address a BAR holds now (what the guest last wrote, masked)."""
        bar = self.bars[index]
        if bar is None:
            return 0
        off = P.PCI_BASE_ADDRESS_0 + 4 * index
        mask = P.PCI_BASE_ADDRESS_IO_MASK if bar.is_io else P.PCI_BASE_ADDRESS_MEM_MASK
        value = self.get(off, 4) & mask
        if bar.kind == "mem64":
            value |= self.get(off + 4, 4) << 32
        return value

    def decode_error(self, index: int) -> str:
        """Why BAR `index` does not decode now, or "" when it does."""
        if not self.present:
            return "the function was unplugged"
        bar = self.bars[index]
        if bar is None:
            return f"BAR {index} does not exist"
        need = P.PCI_COMMAND_IO if bar.is_io else P.PCI_COMMAND_MEMORY
        if not self.command & need:
            return (f"BAR {index} accessed while {'I/O' if bar.is_io else 'memory'} space "
                    f"decoding is disabled in the command register")
        if self.bar_value(index) != bar.addr:
            return (f"BAR {index} accessed at 0x{bar.addr:x} but it was moved to "
                    f"0x{self.bar_value(index):x} (relocation is not supported)")
        return ""

    # ---- configuration access (trapped) ----------------------------------------------------------
    def read(self, offset: int, width: int) -> int:
        self.count_exit("pci_cfg_read", False)
        if width not in (1, 2, 4) or offset % width or offset + width > P.PCI_CFG_SPACE_EXP_SIZE:
            self.guest_error(f"config read of width {width} at 0x{offset:x}: accesses are 1, 2 "
                             f"or 4 bytes, naturally aligned")
            return (1 << 8 * width) - 1 if 0 < width <= 8 else 0
        if offset >= P.PCI_CFG_SPACE_SIZE:
            return 0        # no extended configuration space (no PCIe extended capabilities)
        end = offset + width
        for start, stop, fn in self._read_hooks:
            if offset < stop and start < end:
                fn(offset, width)
        return self.get(offset, width)

    def write(self, offset: int, width: int, value: int) -> None:
        self.count_exit("pci_cfg_write", True)
        if width not in (1, 2, 4) or offset % width or offset + width > P.PCI_CFG_SPACE_EXP_SIZE:
            self.guest_error(f"config write of width {width} at 0x{offset:x}: accesses are 1, "
                             f"2 or 4 bytes, naturally aligned")
            return
        if offset >= P.PCI_CFG_SPACE_SIZE:
            return
        end = offset + width
        old = bytes(self.cfg[offset:end])
        data = (value & ((1 << 8 * width) - 1)).to_bytes(width, "little")
        for i in range(width):
            m = self.wmask[offset + i]
            self.cfg[offset + i] = (old[i] & ~m) | (data[i] & m)
        for start, stop, fn in self._write_hooks:
            if offset < stop and start < end:
                fn(offset, width, old)

    def _command_written(self, offset: int, width: int, old: bytes) -> None:
        # Rebuild the old command value from what this write replaced.
        prev = bytearray(self.cfg[P.PCI_COMMAND:P.PCI_COMMAND + 2])
        for i in range(width):
            pos = offset + i - P.PCI_COMMAND
            if 0 <= pos < 2:
                prev[pos] = old[i]
        before = int.from_bytes(prev, "little")
        after = self.command
        if before != after:
            for fn in self.command_listeners:
                fn(before, after)


class Msix:
    """A function's MSI-X capability, table and pending bit array (in one memory BAR)."""

    def __init__(self, fn: PciFunction, nvec: int, bar: int, table_offset: int,
                 pba_offset: int, line_of: Callable[[int], Any]) -> None:
        if not 0 < nvec <= P.PCI_MSIX_MAX_VECTORS:
            raise ValueError(f"MSI-X table size {nvec}")
        self.fn = fn
        self.nvec = nvec
        self.bar = bar
        self.table_offset = table_offset
        self.pba_offset = pba_offset
        self.cap = cap = fn.add_capability(P.PCI_CAP_ID_MSIX, P.PCI_CAP_MSIX_SIZEOF)
        fn._put(cap + P.PCI_MSIX_FLAGS, 2, nvec - 1)
        fn._put_mask(cap + P.PCI_MSIX_FLAGS, 2, P.PCI_MSIX_FLAGS_ENABLE | P.PCI_MSIX_FLAGS_MASKALL)
        fn._put(cap + P.PCI_MSIX_TABLE, 4, table_offset | bar)
        fn._put(cap + P.PCI_MSIX_PBA, 4, pba_offset | bar)
        fn.add_write_hook(cap + P.PCI_MSIX_FLAGS, cap + P.PCI_MSIX_FLAGS + 2, self._control_written)
        self.table = bytearray(P.PCI_MSIX_ENTRY_SIZE * nvec)
        for v in range(nvec):   # every vector starts masked (PCI 6.8.2.9)
            self.table[v * 16 + P.PCI_MSIX_ENTRY_VECTOR_CTRL] = P.PCI_MSIX_ENTRY_CTRL_MASKBIT
        self.pending = 0
        self.irqfds = [EventFd() for _ in range(nvec)]
        self.lines = [line_of(v) for v in range(nvec)]
        self.fired = [0] * nvec
        self.n_pended = 0
        self.n_dropped = 0

    @property
    def control(self) -> int:
        return self.fn.get(self.cap + P.PCI_MSIX_FLAGS, 2)

    @property
    def enabled(self) -> bool:
        return bool(self.control & P.PCI_MSIX_FLAGS_ENABLE)

    @property
    def function_masked(self) -> bool:
        return bool(self.control & P.PCI_MSIX_FLAGS_MASKALL)

    def entry_masked(self, v: int) -> bool:
        return bool(self.table[v * 16 + P.PCI_MSIX_ENTRY_VECTOR_CTRL]
                    & P.PCI_MSIX_ENTRY_CTRL_MASKBIT)

    def masked(self, v: int) -> bool:
        return self.function_masked or self.entry_masked(v)

    def message(self, v: int) -> tuple[int, int]:
        """(address, data) of entry v."""
        e = self.table[v * 16:v * 16 + 16]
        return (int.from_bytes(e[0:8], "little"), int.from_bytes(e[8:12], "little"))

    # ---- delivery --------------------------------------------------------------------------------
    def notify(self, v: int) -> None:
        """Raise vector v: send its message, or set its pending bit while it is masked."""
        if not 0 <= v < self.nvec:
            self.n_dropped += 1
            return
        if self.masked(v):
            self.pending |= 1 << v
            self.n_pended += 1
            return
        self._send(v)

    def _send(self, v: int) -> None:
        if not self.fn.bus_master:
            self.n_dropped += 1
            self.fn.guest_error(f"MSI-X vector {v} raised without bus mastering: lost")
            return
        if self.message(v)[0] == 0:
            self.n_dropped += 1
            self.fn.guest_error(f"MSI-X vector {v} raised with no message address: lost")
            return
        self.fired[v] += 1
        self.irqfds[v].signal()

    def _flush_pending(self) -> None:
        if not self.pending or not self.enabled:
            return
        for v in range(self.nvec):
            if self.pending >> v & 1 and not self.masked(v):
                self.pending &= ~(1 << v)
                self._send(v)

    def _control_written(self, offset: int, width: int, old: bytes) -> None:
        self._flush_pending()

    # ---- the table and PBA in the BAR ------------------------------------------------------------
    def bar_read(self, offset: int, width: int) -> int:
        if width not in (4, 8) or offset % width:
            self.fn.guest_error(f"MSI-X read of width {width} at 0x{offset:x}: the table and "
                                f"PBA take aligned dword or qword accesses")
            return (1 << 8 * width) - 1 if 0 < width <= 8 else 0
        t0, tend = self.table_offset, self.table_offset + len(self.table)
        p0, pend = self.pba_offset, self.pba_offset + 8 * ((self.nvec + 63) // 64)
        if t0 <= offset and offset + width <= tend:
            return int.from_bytes(self.table[offset - t0:offset - t0 + width], "little")
        if p0 <= offset and offset + width <= pend:
            return self.pending >> (8 * (offset - p0)) & ((1 << 8 * width) - 1)
        self.fn.guest_error(f"MSI-X BAR read at 0x{offset:x}: outside the table and the PBA")
        return 0

    def bar_write(self, offset: int, width: int, value: int) -> None:
        if width not in (4, 8) or offset % width:
            self.fn.guest_error(f"MSI-X write of width {width} at 0x{offset:x}: the table and "
                                f"PBA take aligned dword or qword accesses")
            return
        t0, tend = self.table_offset, self.table_offset + len(self.table)
        if not (t0 <= offset and offset + width <= tend):
            self.fn.guest_error(f"MSI-X BAR write at 0x{offset:x}: outside the table (the PBA "
                                f"is read-only)")
            return
        rel = offset - t0
        self.table[rel:rel + width] = (value & ((1 << 8 * width) - 1)).to_bytes(width, "little")
        for i in range(rel, rel + width):   # reserved vector control bits read as 0
            if i % 16 == P.PCI_MSIX_ENTRY_VECTOR_CTRL:
                self.table[i] &= P.PCI_MSIX_ENTRY_CTRL_MASKBIT
            elif i % 16 > P.PCI_MSIX_ENTRY_VECTOR_CTRL:
                self.table[i] = 0
        self._flush_pending()

    def describe(self) -> dict[str, Any]:
        return {"vectors": self.nvec, "enabled": self.enabled,
                "function_masked": self.function_masked,
                "fired": list(self.fired), "pended": self.n_pended, "dropped": self.n_dropped}

    def close(self) -> None:
        for efd in self.irqfds:
            efd.close()


class PciHostBridge:
    """Bus 0 behind an ECAM window: the host bridge itself in slot 0, functions from slot 1."""

    def __init__(self, board: Board, base: int = PCI_ECAM_BASE) -> None:
        self.base = base
        self.size = P.ECAM_BUS_SIZE
        self.slots: dict[int, PciFunction] = {}
        self.names: dict[int, str] = {}
        self.exits = 0
        self.empty_reads = 0
        self.bridge = PciFunction(vendor=P.PCI_VENDOR_ID_REDHAT,
                                  device=P.PCI_DEVICE_ID_REDHAT_HOST_BRIDGE, revision=0,
                                  class_code=P.PCI_CLASS_BRIDGE_HOST, name="host-bridge")
        self.slots[0] = self.bridge
        board.mmio.add(Region("mmio", base, self.size, self.read, self.write, "pci-ecam"))

    @classmethod
    def of(cls, board: Board) -> "PciHostBridge":
        """The board's PCI host bridge, made on first use."""
        if board.pci is None:
            board.pci = cls(board)
        return board.pci

    def add(self, fn: PciFunction, name: str) -> int:
        """Plug a function into the next free slot; its slot number."""
        for slot in range(1, P.PCI_SLOTS):
            if slot not in self.slots:
                self.slots[slot] = fn
                self.names[slot] = name
                fn.slot = slot
                return slot
        raise ValueError("PCI bus 0 is full (31 slots)")

    def _function(self, offset: int) -> tuple[PciFunction | None, int]:
        bus, slot, func, reg = P.ecam_decode(offset)
        if bus != 0 or func != 0:
            return None, reg
        fn = self.slots.get(slot)
        return (fn if fn is not None and fn.present else None), reg

    def read(self, offset: int, width: int) -> int:
        self.exits += 1
        fn, reg = self._function(offset)
        if fn is None:
            self.empty_reads += 1
            return (1 << 8 * width) - 1 if 0 < width <= 8 else 0   # no device: all ones
        return fn.read(reg, width)

    def write(self, offset: int, width: int, value: int) -> None:
        self.exits += 1
        fn, reg = self._function(offset)
        if fn is not None:
            fn.write(reg, width, value)

    def describe(self) -> dict[str, Any]:
        """What the firmware tables show: the ECAM window, its bus, and the slots' labels
        (as a device tree or ACPI names a slot)."""
        return {"ecam": self.base, "size": self.size, "bus": 0, "slots": P.PCI_SLOTS,
                "functions": [{"slot": s, "name": n} for s, n in sorted(self.names.items())]}
