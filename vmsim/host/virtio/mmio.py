"""virtio-mmio register emulation, version 2 and version 1 (legacy) (virtio spec 4.2.2 and
4.2.4; QEMU hw/virtio/virtio-mmio.c).

One instance per device: a register window in the guest-physical space and one interrupt
line (an irqfd) whose cause the driver reads in InterruptStatus and clears in InterruptACK.
Accesses arrive as trapped reads and writes (exits); QueueNotify is bound to the queues'
ioeventfds, so a kick reaches the device without an exit, as with KVM.

Version 1 places each queue with GuestPageSize, QueueAlign and QueuePFN (the legacy
contiguous vring) instead of QueueReady and the three 64-bit ring addresses; its device is a
legacy one (32 feature bits, no VERSION_1, no FEATURES_OK).
"""

from vmsim.abi import features as F
from vmsim.abi import ids
from vmsim.abi import mmio as M
from vmsim.abi import split_ring as R
from vmsim.abi import status as S
from vmsim.host.board import Region
from vmsim.host.virtio.device import QueueState, VirtioDevice
from vmsim.host.virtio.transport import HostTransport
from vmsim.machine.eventfd import EventFd

U32 = 0xFFFFFFFF
V2_ONLY = {M.QUEUE_READY, M.QUEUE_DESC_LOW, M.QUEUE_DESC_HIGH, M.QUEUE_DRIVER_LOW,
           M.QUEUE_DRIVER_HIGH, M.QUEUE_DEVICE_LOW, M.QUEUE_DEVICE_HIGH, M.SHM_SEL,
           M.SHM_LEN_LOW, M.SHM_LEN_HIGH, M.SHM_BASE_LOW, M.SHM_BASE_HIGH, M.QUEUE_RESET,
           M.CONFIG_GENERATION}
V1_ONLY = {M.GUEST_PAGE_SIZE, M.QUEUE_ALIGN, M.QUEUE_PFN}


class MmioTransport(HostTransport):
    """The register window of one virtio-mmio device."""

    def __init__(self, dev: VirtioDevice, base: int, irq: int, version: int = 2) -> None:
        super().__init__()
        if version not in (1, 2):
            raise ValueError(f"virtio-mmio version {version} does not exist")
        self.name = "mmio" if version == 2 else "mmio-legacy"
        self.dev = dev
        self.base = base
        self.size = M.REGION_SIZE
        self.irq = irq
        self.irqfd = EventFd()
        self.version = version
        self.interrupt_status = 0
        self.device_features_sel = 0
        self.driver_features_sel = 0
        self.queue_sel = 0
        self.guest_page_size = 0
        self.queue_align: dict[int, int] = {}
        self.queue_pfn: dict[int, int] = {}
        self.n_trapped_notifies = 0
        self.pending_kicks: list[int] = []   # queue notifies that came by trap, not eventfd
        if version == 1:
            dev.make_legacy()
        dev.transport = self

    # ---- interrupts (the device model calls these) ----------------------------------------------
    def signal_used(self, queue_index: int) -> None:
        self.interrupt_status |= M.INT_VRING
        self.n_interrupts += 1
        self.irqfd.signal()

    def signal_config(self) -> None:
        self.interrupt_status |= M.INT_CONFIG
        self.n_interrupts += 1
        self.irqfd.signal()

    # ---- wiring ----------------------------------------------------------------------------------
    def regions(self) -> list[Region]:
        return [Region("mmio", self.base, self.size, self.read, self.write, self.dev.name)]

    def ioeventfds(self) -> list[tuple[str, int, int, EventFd]]:
        """A write of the queue index to QueueNotify signals that queue's kick eventfd."""
        return [("mmio", self.base + M.QUEUE_NOTIFY, q.index, q.kick) for q in self.dev.queues]

    def irqfds(self) -> list[tuple[int, EventFd]]:
        return [(self.irq, self.irqfd)]

    def boot_node(self) -> dict:
        """The device-tree node: compatible = "virtio,mmio", reg, interrupts."""
        return {"type": "virtio-mmio", "name": self.dev.name, "base": self.base,
                "size": self.size, "irq": self.irq}

    # ---- register access -------------------------------------------------------------------------
    def read(self, offset: int, width: int) -> int:
        # By kind, so the summary shows what an interrupt costs on this transport: one
        # InterruptStatus read and one InterruptACK write each.
        self.count_exit("interrupt_status" if offset == M.INTERRUPT_STATUS else
                        "config_read" if offset >= M.CONFIG else "mmio_read", False)
        dev = self.dev
        if offset >= M.CONFIG:
            if width not in (1, 2, 4):
                dev.guest_error(f"config read of width {width}")
                return 0
            return dev.read_config(offset - M.CONFIG, width)
        if width != 4 or offset % 4:
            dev.guest_error(f"mmio read of width {width} at 0x{offset:x}: registers are 32-bit")
            return 0
        if not self._exists(offset):
            dev.guest_error(f"mmio v{self.version} read of register 0x{offset:x}, which only "
                            f"version {3 - self.version} has")
            return 0
        if offset == M.MAGIC_VALUE:
            return M.MAGIC
        if offset == M.VERSION:
            return self.version
        if offset == M.DEVICE_ID:
            return dev.device_id
        if offset == M.VENDOR_ID:
            return ids.VENDOR_QEMU
        if offset == M.DEVICE_FEATURES:
            if self.device_features_sel > 1:
                return 0
            return dev.device_features >> (32 * self.device_features_sel) & U32
        if offset == M.QUEUE_NUM_MAX:
            q = self._queue()
            return q.num_max if q is not None else 0
        if offset == M.QUEUE_READY:
            q = self._queue()
            return int(q is not None and q.ready)
        if offset == M.QUEUE_PFN:
            q = self._queue()
            return self.queue_pfn.get(q.index, 0) if q is not None and q.ready else 0
        if offset == M.INTERRUPT_STATUS:
            return self.interrupt_status
        if offset == M.STATUS:
            return dev.status
        if offset == M.CONFIG_GENERATION:
            return dev.config_generation
        if offset in (M.SHM_LEN_LOW, M.SHM_LEN_HIGH, M.SHM_BASE_LOW, M.SHM_BASE_HIGH):
            return U32          # no shared-memory regions: length and base read as ~0
        if offset == M.QUEUE_RESET:
            return 0            # a queue reset completes within the write that asks for it
        dev.guest_error(f"mmio read of write-only or unknown register 0x{offset:x}")
        return 0

    def write(self, offset: int, width: int, value: int) -> None:
        self.count_exit("interrupt_ack" if offset == M.INTERRUPT_ACK else
                        "queue_notify" if offset == M.QUEUE_NOTIFY else
                        "config_write" if offset >= M.CONFIG else "mmio_write", True)
        dev = self.dev
        if offset >= M.CONFIG:
            if width not in (1, 2, 4):
                dev.guest_error(f"config write of width {width}")
                return
            dev.write_config(offset - M.CONFIG, width, value)
            return
        if width != 4 or offset % 4:
            dev.guest_error(f"mmio write of width {width} at 0x{offset:x}: registers are 32-bit")
            return
        if not self._exists(offset):
            dev.guest_error(f"mmio v{self.version} write of register 0x{offset:x}, which only "
                            f"version {3 - self.version} has")
            return
        value &= U32
        if offset == M.DEVICE_FEATURES_SEL:
            self.device_features_sel = value
        elif offset == M.DRIVER_FEATURES:
            dev.set_driver_features(self.driver_features_sel, value)
        elif offset == M.DRIVER_FEATURES_SEL:
            self.driver_features_sel = value
        elif offset == M.GUEST_PAGE_SIZE:
            self.guest_page_size = value
        elif offset == M.QUEUE_SEL:
            self.queue_sel = value
        elif offset == M.QUEUE_NUM:
            q = self._queue_for_setup("QueueNum")
            if q is not None:
                q.num = value
        elif offset == M.QUEUE_ALIGN:
            q = self._queue_for_setup("QueueAlign")
            if q is not None:
                self.queue_align[q.index] = value
        elif offset == M.QUEUE_PFN:
            self._write_pfn(value)
        elif offset == M.QUEUE_READY:
            q = self._queue()
            if q is None:
                dev.guest_error(f"QueueReady for queue {self.queue_sel}, which does not exist")
            elif value & 1 and not q.ready:
                if self._queue_for_setup("QueueReady") is not None:
                    dev.queue_enable(q)
            elif not value & 1:
                dev.queue_disable(q)
        elif offset == M.QUEUE_NOTIFY:
            self._trapped_notify(value)
        elif offset == M.INTERRUPT_ACK:
            self.interrupt_status &= ~value
        elif offset == M.STATUS:
            if value == 0:
                self.interrupt_status = 0
            dev.write_status(value)
        elif offset in (M.QUEUE_DESC_LOW, M.QUEUE_DESC_HIGH, M.QUEUE_DRIVER_LOW,
                        M.QUEUE_DRIVER_HIGH, M.QUEUE_DEVICE_LOW, M.QUEUE_DEVICE_HIGH):
            q = self._queue_for_setup("queue address")
            if q is not None:
                self._set_queue_addr(q, offset, value)
        elif offset == M.SHM_SEL:
            pass
        elif offset == M.QUEUE_RESET:
            q = self._queue()
            if not dev.negotiated(F.VIRTIO_F_RING_RESET):
                dev.guest_error("QueueReset without VIRTIO_F_RING_RESET")
            elif q is None:
                dev.guest_error(f"QueueReset of queue {self.queue_sel}, which does not exist")
            elif value & 1:
                dev.queue_reset(q)
        else:
            dev.guest_error(f"mmio write to read-only or unknown register 0x{offset:x}")

    def _exists(self, offset: int) -> bool:
        return offset not in (V1_ONLY if self.version == 2 else V2_ONLY)

    def _trapped_notify(self, value: int) -> None:
        dev = self.dev
        self.n_trapped_notifies += 1
        qi = value & 0xFFFF
        if dev.negotiated(F.VIRTIO_F_NOTIFICATION_DATA) and qi < len(dev.queues):
            ring = dev.queues[qi].ring
            if ring is not None and not ring.check_notification(value):
                ring.n_notify_data_errors += 1
                dev.guest_error(f"queue {qi}: notification data 0x{value:08x} is ahead of the "
                                f"ring")
        self.pending_kicks.append(qi)

    def _write_pfn(self, pfn: int) -> None:
        """Version 1: a non-zero page frame number places the selected queue's contiguous
        vring there and activates it; zero deactivates it."""
        dev = self.dev
        q = self._queue()
        if q is None:
            dev.guest_error(f"QueuePFN for queue {self.queue_sel}, which does not exist")
            return
        if pfn == 0:
            dev.queue_disable(q)
            self.queue_pfn.pop(q.index, None)
            return
        if q.ready:
            dev.guest_error(f"QueuePFN written while queue {q.index} is active")
            return
        page = self.guest_page_size
        align = self.queue_align.get(q.index, R.LEGACY_VRING_ALIGN)
        if not page or page & (page - 1) or not align or align & (align - 1):
            dev.virtio_error(f"queue {q.index}: GuestPageSize {page} / QueueAlign {align} "
                             f"is not a power of two")
            return
        q.desc = pfn * page
        q.driver = q.desc + R.desc_table_size(q.num)
        q.device = q.desc + R.used_offset_in_vring(q.num, align)
        self.queue_pfn[q.index] = pfn
        dev.queue_enable(q)

    def _queue(self) -> QueueState | None:
        qs = self.dev.queues
        return qs[self.queue_sel] if self.queue_sel < len(qs) else None

    def _queue_for_setup(self, what: str) -> QueueState | None:
        """The selected queue, if its registers may be written now: it exists, is not ready,
        and (version 2) the driver has set FEATURES_OK but not DRIVER_OK (spec 4.2.3.2), or
        the queue was reset with VIRTIO_F_RING_RESET."""
        q = self._queue()
        dev = self.dev
        if q is None:
            dev.guest_error(f"{what} for queue {self.queue_sel}, which does not exist")
            return None
        if q.ready:
            dev.guest_error(f"{what} written while queue {q.index} is ready")
            return None
        st = dev.status
        if self.version == 1:
            if not st & S.DRIVER:
                dev.guest_error(f"{what} written in status {S.describe(st)}")
                return None
            return q
        if not st & S.FEATURES_OK or (st & S.DRIVER_OK
                                       and not dev.negotiated(F.VIRTIO_F_RING_RESET)):
            dev.guest_error(f"{what} written in status {S.describe(st)}")
            return None
        return q

    @staticmethod
    def _set_queue_addr(q: QueueState, offset: int, value: int) -> None:
        field = {M.QUEUE_DESC_LOW: "desc", M.QUEUE_DESC_HIGH: "desc",
                 M.QUEUE_DRIVER_LOW: "driver", M.QUEUE_DRIVER_HIGH: "driver",
                 M.QUEUE_DEVICE_LOW: "device", M.QUEUE_DEVICE_HIGH: "device"}[offset]
        old = getattr(q, field)
        # The HIGH registers sit 4 bytes after their LOW halves.
        new = (old & U32) | value << 32 if offset & 4 else (old & ~U32) | value
        setattr(q, field, new)

    def describe(self) -> dict:
        return {"base": self.base, "irq": self.irq, "version": self.version}

    def close(self) -> None:
        self.irqfd.close()
