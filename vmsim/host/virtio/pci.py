"""virtio-pci register emulation, modern and legacy (virtio spec 4.1; QEMU hw/virtio/
virtio-pci.c).

One instance per device: a PCI function on the board's host bridge (vmsim.host.pci) with the
BARs firmware would assign it, laid out as QEMU lays out a virtio-pci device:

    modern ("pci"): device ID 0x1040 + type, revision 1
      BAR 1 (32-bit memory, 4 KiB)   MSI-X table at 0x000, pending bit array at 0x800
      BAR 4 (64-bit memory, 16 KiB)  common cfg 0x0000, ISR 0x1000, device cfg 0x2000,
                                     notify 0x3000 (queue_notify_off x notify_off_multiplier)
      capabilities: virtio common / notify / ISR / device / PCI cfg access, then MSI-X
    legacy ("pci-legacy"): transitional device ID (0x1001 for blk), revision 0
      BAR 0 (I/O)                    the legacy header (features, QUEUE_PFN, QUEUE_NUM,
                                     QUEUE_SEL, QUEUE_NOTIFY, STATUS, ISR, and while MSI-X is
                                     enabled the two vector registers), then device config
      BAR 1 (32-bit memory, 4 KiB)   MSI-X, as above
      capabilities: MSI-X only (a legacy device has no virtio capabilities)

Interrupts. While MSI-X is enabled, a queue's interrupt is its queue_msix_vector's message and
the configuration change's is config_msix_vector's (NO_VECTOR: none at all); each vector has its
own irqfd, so the driver learns the cause from which one fired, without an exit. Otherwise the
function raises INTx (its own irqfd, an interrupt line of the board) after setting a bit of the
ISR status, which the driver reads to learn the cause and which that read clears.

Notifications. Each queue's notify address is bound to its kick eventfd (an ioeventfd with the
queue index as datamatch: "mmio" space for the modern notify region, "pio" for the legacy
QUEUE_NOTIFY port), so a kick does not exit; a write that matches no ioeventfd (notification
data, a wrong value) traps and is handled here.

Everything the driver writes is checked: an access at an offset that is no field's start, of a
width other than the field's, or in a device state the spec does not allow is a guest error,
logged and otherwise ignored; a failed MSI-X vector mapping reads back as NO_VECTOR.
"""

from typing import Any

from vmsim.abi import features as F
from vmsim.abi import pci as P
from vmsim.abi import split_ring as R
from vmsim.abi import status as S
from vmsim.host.board import Board, Region
from vmsim.host.pci import Bar, Msix, PciFunction, PciHostBridge
from vmsim.host.virtio.device import QueueState, VirtioDevice
from vmsim.host.virtio.transport import HostTransport
from vmsim.machine.eventfd import EventFd

U32 = 0xFFFFFFFF
NO_VECTOR = P.VIRTIO_MSI_NO_VECTOR

LEGACY_BAR = 0
MSIX_BAR = 1
MODERN_BAR = 4
MSIX_BAR_SIZE = 0x1000
MSIX_TABLE_OFFSET = 0x000
MSIX_PBA_OFFSET = 0x800
MODERN_BAR_SIZE = 0x4000
COMMON_OFFSET = 0x0000
ISR_OFFSET = 0x1000
DEVICE_OFFSET = 0x2000
NOTIFY_OFFSET = 0x3000
DEFAULT_NOTIFY_OFF_MULTIPLIER = 4

QUEUE_ADDR_FIELDS = {P.VIRTIO_PCI_COMMON_Q_DESCLO: "desc", P.VIRTIO_PCI_COMMON_Q_DESCHI: "desc",
                     P.VIRTIO_PCI_COMMON_Q_AVAILLO: "driver",
                     P.VIRTIO_PCI_COMMON_Q_AVAILHI: "driver",
                     P.VIRTIO_PCI_COMMON_Q_USEDLO: "device", P.VIRTIO_PCI_COMMON_Q_USEDHI: "device"}
COMMON_READ_ONLY = {P.VIRTIO_PCI_COMMON_DF, P.VIRTIO_PCI_COMMON_NUMQ,
                    P.VIRTIO_PCI_COMMON_CFGGENERATION, P.VIRTIO_PCI_COMMON_Q_NOFF,
                    P.VIRTIO_PCI_COMMON_Q_NDATA, P.VIRTIO_PCI_COMMON_ADM_Q_IDX,
                    P.VIRTIO_PCI_COMMON_ADM_Q_NUM}


def _all_ones(width: int) -> int:
    return (1 << 8 * width) - 1 if 0 < width <= 8 else 0


class PciTransport(HostTransport):
    """One virtio device as a PCI function: its configuration space, BARs and interrupts."""

    def __init__(self, dev: VirtioDevice, board: Board, legacy: bool = False,
                 msix_vectors: int | None = None,
                 notify_off_multiplier: int = DEFAULT_NOTIFY_OFF_MULTIPLIER) -> None:
        super().__init__()
        if notify_off_multiplier and (notify_off_multiplier < 4
                                      or notify_off_multiplier & (notify_off_multiplier - 1)):
            # 0, or a power of two that is a multiple of 4 (which NOTIFICATION_DATA needs)
            raise ValueError(f"notify_off_multiplier {notify_off_multiplier}")
        nq = len(dev.queues)
        # By default a vector per queue and one for config changes, as many as the table
        # holds: a device with more queues (a console with many ports) gets the largest
        # table, and the guest falls back to one vector shared by the queues.
        most = MSIX_PBA_OFFSET // P.PCI_MSIX_ENTRY_SIZE
        nvec = min(nq + 1, most) if msix_vectors is None else msix_vectors
        if not 0 <= nvec <= most:
            raise ValueError(f"msix_vectors {nvec}: expected 0 to "
                             f"{MSIX_PBA_OFFSET // P.PCI_MSIX_ENTRY_SIZE}")
        if legacy:
            pci_device = P.TRANSITIONAL_DEVICE_ID.get(dev.device_id)
            if pci_device is None:
                raise ValueError(f"virtio device type {dev.device_id} has no transitional PCI "
                                 f"device ID: it cannot be a legacy PCI device")
            revision, subsystem = P.VIRTIO_PCI_ABI_VERSION, dev.device_id
            dev.make_legacy()
        else:
            pci_device = P.VIRTIO_PCI_MODERN_DEVICE_BASE + dev.device_id
            revision, subsystem = 1, P.PCI_SUBDEVICE_ID_QEMU
        self.name = "pci-legacy" if legacy else "pci"
        self.dev = dev
        self.legacy = legacy
        self.notify_off_multiplier = notify_off_multiplier
        self.irq = board.irq()                 # the INTx line (pin A) firmware routed
        self.intx_fd = EventFd()
        self.fn = fn = PciFunction(
            vendor=P.PCI_VENDOR_ID_REDHAT_QUMRANET, device=pci_device, revision=revision,
            class_code=P.VIRTIO_CLASS_CODE.get(dev.device_id, P.PCI_CLASS_OTHERS),
            subsystem_vendor=P.PCI_VENDOR_ID_REDHAT_QUMRANET, subsystem_id=subsystem,
            irq_line=self.irq, irq_pin=P.PCI_INTERRUPT_PIN_INTA, name=dev.name,
            guest_error=dev.guest_error, count_exit=self._count)
        fn.command_listeners.append(lambda before, after: self._update_intx())
        self.bridge = PciHostBridge.of(board)
        self.slot = self.bridge.add(fn, dev.name)
        self._regions: list[Region] = []
        cfg_len = len(dev.config_space())
        self.io_base = self.mem_base = self.msix_base = 0
        if legacy:
            size = P.legacy_region_size(cfg_len)
            self.io_base = board.io_window(size)
            fn.add_bar(Bar(LEGACY_BAR, "io", size, self.io_base, False))
            self._regions.append(Region("pio", self.io_base, size, self._legacy_read,
                                        self._legacy_write, dev.name))
        if nvec:
            self.msix_base = board.bar_window(MSIX_BAR_SIZE)
            fn.add_bar(Bar(MSIX_BAR, "mem32", MSIX_BAR_SIZE, self.msix_base, False))
            self._regions.append(Region("mmio", self.msix_base, MSIX_BAR_SIZE, self._msix_read,
                                        self._msix_write, f"{dev.name}-msix"))
        self.notify_len = max(4, notify_off_multiplier * nq)
        self.device_cfg_len = cfg_len
        # (bar, offset, length) of each virtio structure, for the PCI cfg access window
        self.structures: list[tuple[int, int, int]] = []
        self.cfg_cap = 0
        if not legacy:
            self.mem_base = board.bar_window(MODERN_BAR_SIZE)
            fn.add_bar(Bar(MODERN_BAR, "mem64", MODERN_BAR_SIZE, self.mem_base, True))
            self._regions.append(Region("mmio", self.mem_base, MODERN_BAR_SIZE,
                                        self._modern_read, self._modern_write, dev.name))
            self._add_virtio_caps()
        self.msix: Msix | None = None
        if nvec:
            self.msix = Msix(fn, nvec, MSIX_BAR, MSIX_TABLE_OFFSET, MSIX_PBA_OFFSET,
                             lambda v: ("msix", self.slot, v))
            cap = self.msix.cap + P.PCI_MSIX_FLAGS
            fn.add_write_hook(cap, cap + 2, lambda o, w, old: self._update_intx())
        # transport registers
        self.isr = 0
        self.intx_asserted = False
        self.config_vector = NO_VECTOR
        self.queue_vectors = [NO_VECTOR] * nq
        self.device_features_sel = 0
        self.driver_features_sel = 0
        self.queue_sel = 0
        self.queue_pfn: dict[int, int] = {}
        # counts
        self.n_trapped_notifies = 0
        self.n_intx = 0
        self.n_isr_reads = 0
        self.n_no_vector = 0
        self.pending_kicks: list[int] = []
        dev.transport = self

    # ---- layout ----------------------------------------------------------------------------------
    def _add_virtio_caps(self) -> None:
        fn = self.fn
        caps = [(P.VIRTIO_PCI_CAP_COMMON_CFG, COMMON_OFFSET,
                 P.VIRTIO_PCI_MODERN_COMMON_CFG_SIZEOF),
                (P.VIRTIO_PCI_CAP_NOTIFY_CFG, NOTIFY_OFFSET, self.notify_len),
                (P.VIRTIO_PCI_CAP_ISR_CFG, ISR_OFFSET, 1)]
        if self.device_cfg_len:
            caps.append((P.VIRTIO_PCI_CAP_DEVICE_CFG, DEVICE_OFFSET, self.device_cfg_len))
        for cfg_type, offset, length in caps:
            size = (P.VIRTIO_PCI_NOTIFY_CAP_SIZEOF if cfg_type == P.VIRTIO_PCI_CAP_NOTIFY_CFG
                    else P.VIRTIO_PCI_CAP_SIZEOF)
            off = self._vendor_cap(cfg_type, size, MODERN_BAR, offset, length)
            if cfg_type == P.VIRTIO_PCI_CAP_NOTIFY_CFG:
                fn._put(off + P.VIRTIO_PCI_NOTIFY_CAP_MULT, 4, self.notify_off_multiplier)
            self.structures.append((MODERN_BAR, offset, length))
        # The PCI configuration access capability: bar, offset, length and the data window
        # are the driver's to write.
        off = self._vendor_cap(P.VIRTIO_PCI_CAP_PCI_CFG, P.VIRTIO_PCI_CFG_CAP_SIZEOF, 0, 0, 0)
        self.cfg_cap = off
        fn._put_mask(off + P.VIRTIO_PCI_CAP_BAR, 1, 0xFF)
        fn._put_mask(off + P.VIRTIO_PCI_CAP_OFFSET, 4, U32)
        fn._put_mask(off + P.VIRTIO_PCI_CAP_LENGTH, 4, U32)
        data = off + P.VIRTIO_PCI_CFG_CAP_DATA
        fn._put_mask(data, 4, U32)
        fn.add_read_hook(data, data + 4, self._cfg_window_read)
        fn.add_write_hook(data, data + 4, self._cfg_window_write)

    def _vendor_cap(self, cfg_type: int, size: int, bar: int, offset: int, length: int) -> int:
        fn = self.fn
        off = fn.add_capability(P.PCI_CAP_ID_VNDR, size)
        fn._put(off + P.VIRTIO_PCI_CAP_LEN, 1, size)
        fn._put(off + P.VIRTIO_PCI_CAP_CFG_TYPE, 1, cfg_type)
        fn._put(off + P.VIRTIO_PCI_CAP_BAR, 1, bar)
        fn._put(off + P.VIRTIO_PCI_CAP_OFFSET, 4, offset)
        fn._put(off + P.VIRTIO_PCI_CAP_LENGTH, 4, length)
        fn.add_write_hook(off, off + size, self._cap_written(off, cfg_type))
        return off

    def _cap_written(self, cap: int, cfg_type: int):
        writable = set()
        if cfg_type == P.VIRTIO_PCI_CAP_PCI_CFG:
            writable = {cap + P.VIRTIO_PCI_CAP_BAR, *range(cap + P.VIRTIO_PCI_CAP_OFFSET,
                                                           cap + P.VIRTIO_PCI_CFG_CAP_SIZEOF)}

        def hook(offset: int, width: int, old: bytes) -> None:
            bad = [o for o in range(offset, offset + width) if o >= cap and o not in writable]
            if bad:
                self.dev.guest_error(f"write to the read-only virtio capability at 0x{cap:x} "
                                     f"(type {P.CAP_TYPE_NAMES.get(cfg_type, cfg_type)}, "
                                     f"byte 0x{bad[0]:x})")
        return hook

    # ---- interrupts (the device model calls these) ----------------------------------------------
    @property
    def msix_enabled(self) -> bool:
        return self.msix is not None and self.msix.enabled

    def signal_used(self, queue_index: int) -> None:
        self.n_interrupts += 1
        if self.msix_enabled:
            v = self.queue_vectors[queue_index]
            if v == NO_VECTOR:
                self.n_no_vector += 1       # the driver asked for no interrupt
                return
            self.msix.notify(v)
            return
        self.isr |= P.VIRTIO_PCI_ISR_QUEUE
        self._update_intx()

    def signal_config(self) -> None:
        self.n_interrupts += 1
        # The configuration bit is set whatever the interrupt mode (spec 4.1.4.5.1).
        self.isr |= P.VIRTIO_PCI_ISR_CONFIG
        if self.msix_enabled:
            if self.config_vector == NO_VECTOR:
                self.n_no_vector += 1
                return
            self.msix.notify(self.config_vector)
            return
        self._update_intx()

    def _update_intx(self) -> None:
        """INTx follows the ISR while MSI-X is off; the line's rising edge signals the irqfd
        (the guest takes a level-triggered line as one interrupt until it reads the ISR)."""
        level = bool(self.isr) and not self.msix_enabled
        self.fn.set_interrupt_status(level)
        asserted = level and not self.fn.intx_disabled
        if asserted and not self.intx_asserted:
            self.n_intx += 1
            self.intx_fd.signal()
        self.intx_asserted = asserted

    def _read_isr(self) -> int:
        """Reading the ISR returns it and clears it, de-asserting INTx."""
        self.n_isr_reads += 1
        value, self.isr = self.isr, 0
        self._update_intx()
        return value

    # ---- wiring ----------------------------------------------------------------------------------
    def regions(self) -> list[Region]:
        return list(self._regions)

    def notify_address(self, queue_index: int) -> int:
        if self.legacy:
            return self.io_base + P.VIRTIO_PCI_QUEUE_NOTIFY
        return self.mem_base + NOTIFY_OFFSET + queue_index * self.notify_off_multiplier

    def ioeventfds(self) -> list[tuple[str, int, int, EventFd]]:
        """A write of the queue index to its notify address signals its kick eventfd."""
        space = "pio" if self.legacy else "mmio"
        return [(space, self.notify_address(q.index), q.index, q.kick) for q in self.dev.queues]

    def irqfds(self) -> list[tuple[Any, EventFd]]:
        lines: list[tuple[Any, EventFd]] = [(self.irq, self.intx_fd)]
        if self.msix is not None:
            lines += list(zip(self.msix.lines, self.msix.irqfds, strict=True))
        return lines

    # ---- exits -----------------------------------------------------------------------------------
    def _count(self, kind: str, write: bool) -> None:
        self.count_exit(kind, write)

    def _decodes(self, bar: int) -> bool:
        err = self.fn.decode_error(bar)
        if err:
            self.dev.guest_error(err)
            return False
        return True

    # ---- modern: BAR 4 ---------------------------------------------------------------------------
    def _modern_read(self, offset: int, width: int) -> int:
        self._count("isr_read" if ISR_OFFSET <= offset < DEVICE_OFFSET else "bar_read", False)
        if not self._decodes(MODERN_BAR):
            return _all_ones(width)
        return self._modern_access(offset, width, None)

    def _modern_write(self, offset: int, width: int, value: int) -> None:
        self._count("notify_write" if offset >= NOTIFY_OFFSET else "bar_write", True)
        if self._decodes(MODERN_BAR):
            self._modern_access(offset, width, value)

    def _modern_access(self, offset: int, width: int, value: int | None) -> int:
        """A read (value None) or write at `offset` of BAR 4; what a read returns."""
        dev = self.dev
        if COMMON_OFFSET <= offset < COMMON_OFFSET + P.VIRTIO_PCI_MODERN_COMMON_CFG_SIZEOF:
            if value is None:
                return self._common_read(offset - COMMON_OFFSET, width)
            self._common_write(offset - COMMON_OFFSET, width, value)
            return 0
        if offset == ISR_OFFSET:
            if width != 1:
                dev.guest_error(f"ISR access of width {width}: it is one byte")
                return 0
            if value is not None:
                dev.guest_error("write to the read-only ISR status")
                return 0
            return self._read_isr()
        if DEVICE_OFFSET <= offset < DEVICE_OFFSET + self.device_cfg_len:
            rel = offset - DEVICE_OFFSET
            if width not in (1, 2, 4) or rel % width:
                dev.guest_error(f"device config access of width {width} at {rel}: 1, 2 or 4 "
                                f"bytes, naturally aligned")
                return 0
            if value is None:
                return dev.read_config(rel, width)
            dev.write_config(rel, width, value)
            return 0
        if NOTIFY_OFFSET <= offset < NOTIFY_OFFSET + self.notify_len:
            if value is None:
                dev.guest_error(f"read of the notify region at 0x{offset:x}")
                return 0
            self._notify_write(offset - NOTIFY_OFFSET, width, value)
            return 0
        dev.guest_error(f"BAR {MODERN_BAR} {'read' if value is None else 'write'} at "
                        f"0x{offset:x}: no virtio structure there")
        return 0

    def _notify_write(self, rel: int, width: int, value: int) -> None:
        dev = self.dev
        if width not in (2, 4):
            dev.guest_error(f"notify write of width {width}: 16 bits (32 with notification "
                            f"data)")
            return
        vqn = value & 0xFFFF
        qi = vqn
        if self.notify_off_multiplier:
            if rel % self.notify_off_multiplier:
                dev.guest_error(f"notify write at 0x{rel:x}: no queue's notify address")
                return
            qi = rel // self.notify_off_multiplier
            if vqn != qi:
                dev.guest_error(f"notify of queue {vqn} at queue {qi}'s notify address")
        self._trapped_notify(qi, value)

    def _trapped_notify(self, qi: int, value: int) -> None:
        dev = self.dev
        self.n_trapped_notifies += 1
        if qi >= len(dev.queues):
            dev.guest_error(f"notify of queue {qi}, which does not exist")
            return
        if dev.negotiated(F.VIRTIO_F_NOTIFICATION_DATA):
            ring = dev.queues[qi].ring
            if ring is not None and not ring.check_notification(value):
                ring.n_notify_data_errors += 1
                dev.guest_error(f"queue {qi}: notification data 0x{value:08x} is ahead of the "
                                f"ring")
        self.pending_kicks.append(qi)

    def _common_read(self, off: int, width: int) -> int:
        dev = self.dev
        field = P.COMMON_FIELDS.get(off)
        if field is None or field[1] != width:
            dev.guest_error(self._bad_field("read", off, width, field))
            return 0
        q = self._queue()
        if off == P.VIRTIO_PCI_COMMON_DFSELECT:
            return self.device_features_sel
        if off == P.VIRTIO_PCI_COMMON_DF:
            sel = self.device_features_sel
            return dev.device_features >> (32 * sel) & U32 if sel < 2 else 0
        if off == P.VIRTIO_PCI_COMMON_GFSELECT:
            return self.driver_features_sel
        if off == P.VIRTIO_PCI_COMMON_GF:
            sel = self.driver_features_sel
            return dev.driver_features >> (32 * sel) & U32 if sel < 2 else 0
        if off == P.VIRTIO_PCI_COMMON_MSIX:
            return self.config_vector
        if off == P.VIRTIO_PCI_COMMON_NUMQ:
            return len(dev.queues)
        if off == P.VIRTIO_PCI_COMMON_STATUS:
            return dev.status
        if off == P.VIRTIO_PCI_COMMON_CFGGENERATION:
            return dev.config_generation & 0xFF
        if off == P.VIRTIO_PCI_COMMON_Q_SELECT:
            return self.queue_sel
        if q is None:
            return NO_VECTOR if off == P.VIRTIO_PCI_COMMON_Q_MSIX else 0
        if off == P.VIRTIO_PCI_COMMON_Q_SIZE:
            return q.num
        if off == P.VIRTIO_PCI_COMMON_Q_MSIX:
            return self.queue_vectors[q.index]
        if off == P.VIRTIO_PCI_COMMON_Q_ENABLE:
            return int(q.ready)
        if off in (P.VIRTIO_PCI_COMMON_Q_NOFF, P.VIRTIO_PCI_COMMON_Q_NDATA):
            return q.index          # notify offset and notification value: the queue index
        if off in QUEUE_ADDR_FIELDS:
            addr = getattr(q, QUEUE_ADDR_FIELDS[off])
            return addr >> 32 & U32 if off & 4 else addr & U32
        return 0    # queue_reset (a reset completes within its write), the admin queue fields

    def _common_write(self, off: int, width: int, value: int) -> None:
        dev = self.dev
        field = P.COMMON_FIELDS.get(off)
        if field is None or field[1] != width:
            dev.guest_error(self._bad_field("write", off, width, field))
            return
        if off in COMMON_READ_ONLY:
            dev.guest_error(f"write to the read-only common cfg field {field[0]}")
            return
        value &= _all_ones(width)
        if off == P.VIRTIO_PCI_COMMON_DFSELECT:
            self.device_features_sel = value
        elif off == P.VIRTIO_PCI_COMMON_GFSELECT:
            self.driver_features_sel = value
        elif off == P.VIRTIO_PCI_COMMON_GF:
            if not dev.status & S.DRIVER:
                dev.guest_error(f"driver_feature written in status {S.describe(dev.status)}, "
                                f"before DRIVER")
            elif self.driver_features_sel < 2:
                dev.set_driver_features(self.driver_features_sel, value)
            elif value:
                dev.guest_error(f"driver_feature {value:#x} for features "
                                f"{32 * self.driver_features_sel}+, none of them offered")
        elif off == P.VIRTIO_PCI_COMMON_MSIX:
            self.config_vector = self._map_vector(value, "config_msix_vector")
        elif off == P.VIRTIO_PCI_COMMON_STATUS:
            if value == 0:
                self._reset()
            dev.write_status(value)
        elif off == P.VIRTIO_PCI_COMMON_Q_SELECT:
            self.queue_sel = value
        elif off == P.VIRTIO_PCI_COMMON_Q_MSIX:
            q = self._queue()
            if q is None:
                dev.guest_error(f"queue_msix_vector for queue {self.queue_sel}, which does not "
                                f"exist")
            else:
                self.queue_vectors[q.index] = self._map_vector(value, "queue_msix_vector")
        elif off == P.VIRTIO_PCI_COMMON_Q_SIZE:
            q = self._queue_for_setup("queue_size")
            if q is not None:
                packed = dev.negotiated(F.VIRTIO_F_RING_PACKED)
                if not 0 < value <= q.num_max or not (packed or R.is_power_of_two(value)):
                    dev.guest_error(f"queue_size {value} for queue {q.index}: expected "
                                    f"{'1' if packed else 'a power of two from 1'} to "
                                    f"{q.num_max}")
                else:
                    q.num = value
        elif off == P.VIRTIO_PCI_COMMON_Q_ENABLE:
            if value != 1:
                dev.guest_error(f"queue_enable written with {value}: the driver may only "
                                f"write 1 (a queue is disabled by a reset)")
                return
            q = self._queue_for_setup("queue_enable")
            if q is not None:
                dev.queue_enable(q)
        elif off in QUEUE_ADDR_FIELDS:
            q = self._queue_for_setup(field[0])
            if q is not None:
                name = QUEUE_ADDR_FIELDS[off]
                old = getattr(q, name)
                new = (old & U32) | value << 32 if off & 4 else (old & ~U32) | value
                setattr(q, name, new)
        elif off == P.VIRTIO_PCI_COMMON_Q_RESET:
            q = self._queue()
            if not dev.negotiated(F.VIRTIO_F_RING_RESET):
                dev.guest_error("queue_reset written without VIRTIO_F_RING_RESET")
            elif q is None:
                dev.guest_error(f"queue_reset of queue {self.queue_sel}, which does not exist")
            elif value == 1:
                dev.queue_reset(q)
                self.queue_vectors[q.index] = NO_VECTOR
            elif value:
                dev.guest_error(f"queue_reset written with {value}: only 1 resets")

    @staticmethod
    def _bad_field(op: str, off: int, width: int, field: tuple[str, int] | None) -> str:
        if field is None:
            return f"common cfg {op} of width {width} at {off}: no field starts there"
        return (f"common cfg {op} of width {width} at {off}: {field[0]} is "
                f"{8 * field[1]} bits wide")

    def _map_vector(self, value: int, what: str) -> int:
        """A vector the driver maps an event to; NO_VECTOR when it cannot be mapped (the
        driver reads that back and falls back, spec 4.1.5.1.2)."""
        if value == NO_VECTOR:
            return NO_VECTOR
        if self.msix is None or value >= self.msix.nvec:
            self.dev.guest_error(f"{what} {value}: the MSI-X table has "
                                 f"{self.msix.nvec if self.msix else 0} entries")
            return NO_VECTOR
        return value

    def _queue(self) -> QueueState | None:
        qs = self.dev.queues
        return qs[self.queue_sel] if self.queue_sel < len(qs) else None

    def _queue_for_setup(self, what: str) -> QueueState | None:
        """The selected queue, if its registers may be written now: it exists and is not
        enabled, and the driver has set FEATURES_OK but not DRIVER_OK (spec 3.1.1), or the
        queue was reset with VIRTIO_F_RING_RESET while the device runs (spec 2.6.1)."""
        q = self._queue()
        dev = self.dev
        if q is None:
            dev.guest_error(f"{what} for queue {self.queue_sel}, which does not exist")
            return None
        if q.ready:
            dev.guest_error(f"{what} written while queue {q.index} is enabled")
            return None
        st = dev.status
        if not st & S.FEATURES_OK or (st & S.DRIVER_OK
                                       and not dev.negotiated(F.VIRTIO_F_RING_RESET)):
            dev.guest_error(f"{what} written in status {S.describe(st)}")
            return None
        return q

    def set_present(self, present: bool) -> None:
        """Hot-plug: the function enters or leaves its slot. A function that leaves loses
        power: the device is reset, decoding and MSI-X are off, as at power-on when it comes
        back (its BARs keep the addresses firmware gave them)."""
        if not present and self.fn.present:
            self.dev.reset()
            self._reset()
            self.fn._put(P.PCI_COMMAND, 2, 0)
            if self.msix is not None:
                cap = self.msix.cap + P.PCI_MSIX_FLAGS
                self.fn._put(cap, 2, self.fn.get(cap, 2) & ~(P.PCI_MSIX_FLAGS_ENABLE
                                                              | P.PCI_MSIX_FLAGS_MASKALL))
            self._update_intx()
        self.fn.present = present

    def _reset(self) -> None:
        """Device reset: every event unmapped, the ISR clear, the selectors 0."""
        self.isr = 0
        self._update_intx()
        self.config_vector = NO_VECTOR
        self.queue_vectors = [NO_VECTOR] * len(self.dev.queues)
        self.device_features_sel = self.driver_features_sel = self.queue_sel = 0
        self.queue_pfn.clear()

    # ---- the PCI configuration access window (VIRTIO_PCI_CAP_PCI_CFG) ----------------------------
    def _window_target(self) -> tuple[int, int, int] | None:
        fn, cap = self.fn, self.cfg_cap
        bar = fn.get(cap + P.VIRTIO_PCI_CAP_BAR, 1)
        offset = fn.get(cap + P.VIRTIO_PCI_CAP_OFFSET, 4)
        length = fn.get(cap + P.VIRTIO_PCI_CAP_LENGTH, 4)
        if length not in (1, 2, 4) or offset % length:
            self.dev.guest_error(f"PCI cfg window of length {length} at offset {offset}: "
                                 f"1, 2 or 4 bytes, aligned")
            return None
        for b, start, size in self.structures:
            if b == bar and start <= offset and offset + length <= start + size:
                return bar, offset, length
        self.dev.guest_error(f"PCI cfg window at BAR {bar} offset 0x{offset:x}: no virtio "
                             f"structure there")
        return None

    def _cfg_window_read(self, offset: int, width: int) -> None:
        t = self._window_target()
        if t is None:
            return
        _bar, off, length = t
        value = self._modern_access(off, length, None)
        self.fn._put(self.cfg_cap + P.VIRTIO_PCI_CFG_CAP_DATA, length, value)

    def _cfg_window_write(self, offset: int, width: int, old: bytes) -> None:
        t = self._window_target()
        if t is None:
            return
        _bar, off, length = t
        value = self.fn.get(self.cfg_cap + P.VIRTIO_PCI_CFG_CAP_DATA, length)
        self._modern_access(off, length, value)

    # ---- legacy: I/O BAR 0 -----------------------------------------------------------------------
    def _legacy_read(self, offset: int, width: int) -> int:
        self._count("isr_read" if offset == P.VIRTIO_PCI_ISR else "pio_read", False)
        if not self._decodes(LEGACY_BAR):
            return _all_ones(width)
        return self._legacy_access(offset, width, None)

    def _legacy_write(self, offset: int, width: int, value: int) -> None:
        self._count("notify_write" if offset == P.VIRTIO_PCI_QUEUE_NOTIFY else "pio_write", True)
        if self._decodes(LEGACY_BAR):
            self._legacy_access(offset, width, value)

    def _legacy_access(self, off: int, width: int, value: int | None) -> int:
        dev = self.dev
        cfg_off = P.virtio_pci_config_off(self.msix_enabled)
        if off >= cfg_off:
            # The legacy device config may be accessed with any width (spec 4.1.4.8).
            if width not in (1, 2, 4):
                dev.guest_error(f"legacy config access of width {width}")
                return 0
            if value is None:
                return dev.read_config(off - cfg_off, width)
            dev.write_config(off - cfg_off, width, value)
            return 0
        field = P.LEGACY_FIELDS.get(off)
        if field is None and self.msix_enabled:
            field = P.LEGACY_MSIX_FIELDS.get(off)
        if field is None or field[1] != width:
            op = "read" if value is None else "write"
            dev.guest_error(f"legacy {op} of width {width} at {off}: " + (
                "no register starts there" if field is None
                else f"{field[0]} is {8 * field[1]} bits wide"))
            return 0
        q = self._queue()
        if value is None:
            if off == P.VIRTIO_PCI_HOST_FEATURES:
                return dev.device_features & U32
            if off == P.VIRTIO_PCI_GUEST_FEATURES:
                return dev.driver_features & U32
            if off == P.VIRTIO_PCI_QUEUE_PFN:
                return self.queue_pfn.get(q.index, 0) if q is not None and q.ready else 0
            if off == P.VIRTIO_PCI_QUEUE_NUM:
                return q.num_max if q is not None else 0
            if off == P.VIRTIO_PCI_QUEUE_SEL:
                return self.queue_sel
            if off == P.VIRTIO_PCI_STATUS:
                return dev.status
            if off == P.VIRTIO_PCI_ISR:
                return self._read_isr()
            if off == P.VIRTIO_MSI_CONFIG_VECTOR:
                return self.config_vector
            if off == P.VIRTIO_MSI_QUEUE_VECTOR:
                return self.queue_vectors[q.index] if q is not None else NO_VECTOR
            return 0     # QUEUE_NOTIFY
        value &= _all_ones(width)
        if off == P.VIRTIO_PCI_GUEST_FEATURES:
            st = dev.status
            if not st & S.DRIVER or st & S.DRIVER_OK:
                dev.guest_error(f"guest features written in status {S.describe(st)}")
            else:
                dev.set_driver_features(0, value)
        elif off == P.VIRTIO_PCI_QUEUE_PFN:
            self._write_pfn(value)
        elif off == P.VIRTIO_PCI_QUEUE_SEL:
            self.queue_sel = value
        elif off == P.VIRTIO_PCI_QUEUE_NOTIFY:
            self._trapped_notify(value, value)
        elif off == P.VIRTIO_PCI_STATUS:
            if value == 0:
                self._reset()
            dev.write_status(value)
        elif off == P.VIRTIO_MSI_CONFIG_VECTOR:
            self.config_vector = self._map_vector(value, "config vector")
        elif off == P.VIRTIO_MSI_QUEUE_VECTOR:
            if q is None:
                dev.guest_error(f"queue vector for queue {self.queue_sel}, which does not exist")
            else:
                self.queue_vectors[q.index] = self._map_vector(value, "queue vector")
        else:
            dev.guest_error(f"write to the read-only legacy register {field[0]}")
        return 0

    def _write_pfn(self, pfn: int) -> None:
        """A non-zero page frame number places the selected queue's contiguous vring there
        (used ring at the next 4096-byte boundary) and activates it; 0 deactivates it."""
        dev = self.dev
        q = self._queue()
        if q is None:
            dev.guest_error(f"QUEUE_PFN for queue {self.queue_sel}, which does not exist")
            return
        if pfn == 0:
            dev.queue_disable(q)
            self.queue_pfn.pop(q.index, None)
            return
        if q.ready:
            dev.guest_error(f"QUEUE_PFN written while queue {q.index} is active")
            return
        if not dev.status & S.DRIVER:
            dev.guest_error(f"QUEUE_PFN written in status {S.describe(dev.status)}")
            return
        q.num = q.num_max             # legacy: the device's size, the driver cannot change it
        q.desc = pfn << P.VIRTIO_PCI_QUEUE_ADDR_SHIFT
        q.driver = q.desc + R.desc_table_size(q.num)
        q.device = q.desc + R.used_offset_in_vring(q.num, P.VIRTIO_PCI_VRING_ALIGN)
        if dev.queue_enable(q):
            self.queue_pfn[q.index] = pfn

    # ---- MSI-X: BAR 1 ----------------------------------------------------------------------------
    def _msix_read(self, offset: int, width: int) -> int:
        self._count("msix_read", False)
        if not self._decodes(MSIX_BAR):
            return _all_ones(width)
        return self.msix.bar_read(offset, width)

    def _msix_write(self, offset: int, width: int, value: int) -> None:
        self._count("msix_write", True)
        if self._decodes(MSIX_BAR):
            self.msix.bar_write(offset, width, value)

    # ---- report ----------------------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        fn = self.fn
        bars = {}
        for bar in fn.bars:
            if bar is not None:
                bars[str(bar.index)] = {"kind": bar.kind, "addr": bar.addr, "size": bar.size}
        return {
            "slot": self.slot, "bdf": f"0000:00:{self.slot:02x}.0",
            "vendor_id": fn.get(P.PCI_VENDOR_ID, 2), "device_id": fn.get(P.PCI_DEVICE_ID, 2),
            "revision": fn.get(P.PCI_REVISION_ID, 1), "legacy": self.legacy,
            "irq": self.irq, "bars": bars,
            "notify_off_multiplier": None if self.legacy else self.notify_off_multiplier,
            "msix": self.msix.describe() if self.msix is not None else None,
            "interrupts": {
                "msix": sum(self.msix.fired) if self.msix is not None else 0,
                "intx": self.n_intx, "no_vector": self.n_no_vector,
                "isr_reads": self.n_isr_reads},
        }

    def close(self) -> None:
        self.intx_fd.close()
        if self.msix is not None:
            self.msix.close()
