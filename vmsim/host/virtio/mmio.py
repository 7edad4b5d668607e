"""virtio-mmio register emulation, version 2 (virtio spec 4.2.2; QEMU hw/virtio/virtio-mmio.c).

One instance per device: a register window at `base` in the guest-physical space and one
interrupt line (an irqfd). Accesses arrive as trapped reads and writes (exits); the queue
notify register is normally bound to the queues' ioeventfds, so a guest's kick reaches the
device without an exit, as with KVM.
"""

from vmsim.abi import features as F
from vmsim.abi import ids
from vmsim.abi import mmio as M
from vmsim.abi import status as S
from vmsim.host.virtio.device import VirtioDevice
from vmsim.machine.eventfd import EventFd
from vmsim.machine.stats import D

U32 = 0xFFFFFFFF


class MmioTransport:
    """The register window of one virtio-mmio device."""

    name = "mmio"

    def __init__(self, dev: VirtioDevice, base: int, irq: int, version: int = 2) -> None:
        if version != 2:
            raise ValueError("virtio-mmio version 1 (legacy) is not supported yet")
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
        self.exits_read = 0
        self.exits_write = 0
        self.n_trapped_notifies = 0
        self.n_interrupts = 0
        self.pending_kicks: list[int] = []   # queue notifies that came by trap, not eventfd
        dev.transport = self

    # ---- interrupts (the device model calls these) -----------------------------------------------
    def signal_used(self, queue_index: int) -> None:
        self.interrupt_status |= M.INT_VRING
        self.n_interrupts += 1
        self.irqfd.signal()

    def signal_config(self) -> None:
        self.interrupt_status |= M.INT_CONFIG
        self.n_interrupts += 1
        self.irqfd.signal()

    # ---- ioeventfds the guest may bind -----------------------------------------------------------
    def ioeventfds(self) -> list[tuple[int, int, EventFd]]:
        """(address, datamatch, eventfd) for each queue's notify: a write of the queue index to
        QueueNotify signals that queue's kick eventfd."""
        return [(self.base + M.QUEUE_NOTIFY, q.index, q.kick) for q in self.dev.queues]

    # ---- register access -------------------------------------------------------------------------
    def read(self, offset: int, width: int) -> int:
        self.exits_read += 1
        self._publish_exits()
        dev = self.dev
        if offset >= M.CONFIG:
            if width not in (1, 2, 4):
                dev.guest_error(f"config read of width {width}")
                return 0
            return dev.read_config(offset - M.CONFIG, width)
        if width != 4 or offset % 4:
            dev.guest_error(f"mmio read of width {width} at 0x{offset:x}: registers are 32-bit")
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
        self.exits_write += 1
        self._publish_exits()
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
        value &= U32
        if offset == M.DEVICE_FEATURES_SEL:
            self.device_features_sel = value
        elif offset == M.DRIVER_FEATURES:
            dev.set_driver_features(self.driver_features_sel, value)
        elif offset == M.DRIVER_FEATURES_SEL:
            self.driver_features_sel = value
        elif offset == M.QUEUE_SEL:
            self.queue_sel = value
        elif offset == M.QUEUE_NUM:
            q = self._queue_for_setup("QueueNum")
            if q is not None:
                q.num = value
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
            self.n_trapped_notifies += 1
            qi = value & 0xFFFF
            if dev.negotiated(F.VIRTIO_F_NOTIFICATION_DATA) and qi < len(dev.queues):
                ring = dev.queues[qi].ring
                if ring is not None and not ring.check_notification(value):
                    ring.n_notify_data_errors += 1
                    dev.guest_error(f"queue {qi}: notification data 0x{value:08x} is ahead of "
                                    f"the ring")
            self.pending_kicks.append(qi)
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

    def _queue(self):
        qs = self.dev.queues
        return qs[self.queue_sel] if self.queue_sel < len(qs) else None

    def _queue_for_setup(self, what: str):
        """The selected queue, if its registers may be written now: it exists, is not ready,
        and the driver has set FEATURES_OK but not DRIVER_OK (spec 4.2.3.2)."""
        q = self._queue()
        dev = self.dev
        if q is None:
            dev.guest_error(f"{what} for queue {self.queue_sel}, which does not exist")
            return None
        if q.ready:
            dev.guest_error(f"{what} written while queue {q.index} is ready")
            return None
        st = dev.status
        # Before DRIVER_OK; or after it, for a queue reset with VIRTIO_F_RING_RESET.
        if not st & S.FEATURES_OK or (st & S.DRIVER_OK
                                       and not dev.negotiated(F.VIRTIO_F_RING_RESET)):
            dev.guest_error(f"{what} written in status {S.describe(st)}")
            return None
        return q

    @staticmethod
    def _set_queue_addr(q, offset: int, value: int) -> None:
        field = {M.QUEUE_DESC_LOW: "desc", M.QUEUE_DESC_HIGH: "desc",
                 M.QUEUE_DRIVER_LOW: "driver", M.QUEUE_DRIVER_HIGH: "driver",
                 M.QUEUE_DEVICE_LOW: "device", M.QUEUE_DEVICE_HIGH: "device"}[offset]
        old = getattr(q, field)
        # The HIGH registers sit 4 bytes after their LOW halves.
        new = (old & U32) | value << 32 if offset & 4 else (old & ~U32) | value
        setattr(q, field, new)

    def _publish_exits(self) -> None:
        s = self.dev.stats
        if s is not None:
            s[D.EXITS_READ] = self.exits_read
            s[D.EXITS_WRITE] = self.exits_write

    def describe(self) -> dict:
        return {"base": self.base, "irq": self.irq, "version": self.version}

    def close(self) -> None:
        self.irqfd.close()
