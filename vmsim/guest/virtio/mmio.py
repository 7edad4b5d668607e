"""The virtio-mmio transport driver (drivers/virtio/virtio_mmio.c), versions 2 and 1.

The guest finds MMIO devices in the device list the host publishes (its device tree: a base
address and an interrupt line per node), checks the magic value, version and device ID by
register reads, and registers a virtio device for each. One interrupt line serves the whole
device: the handler reads InterruptStatus and acknowledges it (two exits) to learn whether
the queues or the configuration changed.
"""

import errno
import logging
from collections.abc import Callable, Sequence

from vmsim.abi import features as F
from vmsim.abi import mmio as M
from vmsim.guest.memory import DmaMemory, OutOfGuestMemory
from vmsim.guest.platform import IrqController, Platform
from vmsim.guest.virtio.core import VirtioDevice, virtio_config_changed
from vmsim.guest.virtio.virtqueue import Virtqueue, vring_transport_features
from vmsim.guest.virtio.vring import vring_create_virtqueue, vring_del_virtqueue

log = logging.getLogger("vmsim.guest")

PAGE_SIZE = 4096
VIRTIO_MMIO_VRING_ALIGN = PAGE_SIZE


class MmioProbeError(Exception):
    """The region does not hold a usable virtio-mmio device."""


class VirtioMmio:
    """struct virtio_mmio_device: the config ops of one MMIO device."""

    transport_name = "mmio"
    # One level-triggered line per device; the cause is read from InterruptStatus.
    irq_mode = "line"

    def __init__(self, platform: Platform, irqc: IrqController, dma: DmaMemory, base: int,
                 irq: int, queue_stats: Callable[[int], memoryview | None]) -> None:
        self.platform = platform
        self.irqc = irqc
        self.dma = dma
        self.base = base
        self.irq = irq
        self.queue_stats = queue_stats
        self.version = 0
        self.vdev: VirtioDevice | None = None
        self.irq_requested = False
        self.interrupts = 0
        self.config_interrupts = 0
        self.safety_polls = 0

    # ---- discovery -------------------------------------------------------------------------------
    def probe(self, name: str, dev_stats: memoryview | None) -> VirtioDevice:
        """virtio_mmio_probe: check the register window and describe the device."""
        rd = self.platform.readl
        magic = rd(self.base + M.MAGIC_VALUE)
        if magic != M.MAGIC:
            raise MmioProbeError(f"wrong magic value 0x{magic:08x}")
        self.version = rd(self.base + M.VERSION)
        if self.version not in (1, 2):
            raise MmioProbeError(f"version {self.version} not supported")
        device_id = rd(self.base + M.DEVICE_ID)
        if device_id == 0:
            # "Don't register a device that doesn't exist": a placeholder slot.
            raise MmioProbeError("device ID 0 (an empty slot)")
        vendor = rd(self.base + M.VENDOR_ID)
        if self.version == 1:
            self.platform.writel(self.base + M.GUEST_PAGE_SIZE, PAGE_SIZE)
        vdev = VirtioDevice(name, device_id, vendor, self, dev_stats)
        vdev.transport = self
        self.vdev = vdev
        return vdev

    # ---- config ops ------------------------------------------------------------------------------
    def get_features(self, vdev: VirtioDevice) -> int:
        wr, rd = self.platform.writel, self.platform.readl
        wr(self.base + M.DEVICE_FEATURES_SEL, 1)
        features = rd(self.base + M.DEVICE_FEATURES) << 32
        wr(self.base + M.DEVICE_FEATURES_SEL, 0)
        return features | rd(self.base + M.DEVICE_FEATURES)

    def finalize_features(self, vdev: VirtioDevice) -> int:
        vring_transport_features(vdev)
        # "Make sure there are no mixed devices."
        if self.version == 2 and not vdev.has_feature(F.VIRTIO_F_VERSION_1):
            vdev.probe_error = ("new virtio-mmio devices (version 2) must provide "
                                "VIRTIO_F_VERSION_1")
            return -errno.EINVAL
        wr = self.platform.writel
        wr(self.base + M.DRIVER_FEATURES_SEL, 1)
        wr(self.base + M.DRIVER_FEATURES, vdev.features >> 32 & 0xFFFFFFFF)
        wr(self.base + M.DRIVER_FEATURES_SEL, 0)
        wr(self.base + M.DRIVER_FEATURES, vdev.features & 0xFFFFFFFF)
        return 0

    def get(self, vdev: VirtioDevice, offset: int, length: int) -> bytes:
        """vm_get: config space reads of 1, 2, 4 bytes; 8 as two 4-byte reads."""
        addr = self.base + M.CONFIG + offset
        rd = self.platform.read
        if length in (1, 2, 4):
            return rd(addr, length).to_bytes(length, "little")
        if length == 8:
            return rd(addr, 4).to_bytes(4, "little") + rd(addr + 4, 4).to_bytes(4, "little")
        return bytes(rd(addr + i, 1) for i in range(length))

    def set(self, vdev: VirtioDevice, offset: int, data: bytes) -> None:
        addr = self.base + M.CONFIG + offset
        if len(data) in (1, 2, 4):
            self.platform.write(addr, len(data), int.from_bytes(data, "little"))
            return
        for i, b in enumerate(data):
            self.platform.write(addr + i, 1, b)

    def generation(self, vdev: VirtioDevice) -> int:
        if self.version == 1:
            return 0
        return self.platform.readl(self.base + M.CONFIG_GENERATION)

    def get_status(self, vdev: VirtioDevice) -> int:
        return self.platform.readl(self.base + M.STATUS) & 0xFF

    def set_status(self, vdev: VirtioDevice, status: int) -> None:
        # We should never be setting status to 0 here (that is reset).
        self.platform.writel(self.base + M.STATUS, status)

    def reset(self, vdev: VirtioDevice) -> None:
        # 0 status means a reset.
        self.platform.writel(self.base + M.STATUS, 0)

    def bus_name(self, vdev: VirtioDevice) -> str:
        return f"virtio-mmio@{self.base:x}"

    def synchronize_cbs(self, vdev: VirtioDevice) -> None:
        self.irqc.synchronize_irq()

    # ---- queues ----------------------------------------------------------------------------------
    def _notify(self, vq: Virtqueue) -> bool:
        """vm_notify: write the queue's index to QueueNotify (an ioeventfd: no exit)."""
        self.platform.writel(self.base + M.QUEUE_NOTIFY, vq.index)
        return True

    def _notify_with_data(self, vq: Virtqueue) -> bool:
        """vm_notify_with_data: the queue index with the next available position. Such a
        value matches the ioeventfd (datamatch: the queue index) only when the position is 0,
        so nearly every such kick is a trapped write, as under KVM."""
        self.platform.writel(self.base + M.QUEUE_NOTIFY, vq.notification_data())
        return True

    def find_vqs(self, vdev: VirtioDevice, nvqs: int,
                 callbacks: Sequence[Callable[[Virtqueue], None] | None],
                 names: Sequence[str], sizes: Sequence[int] | None = None) -> list[Virtqueue]:
        """vm_find_vqs: request the interrupt line, then set up each queue."""
        self.irqc.request_irq(self.irq, self._interrupt, vdev.name, self._safety_poll)
        self.irq_requested = True
        try:
            for i in range(nvqs):
                want = sizes[i] if sizes else 0
                vdev.vqs.append(self._setup_vq(vdev, i, callbacks[i], names[i], want))
        except Exception:
            self.del_vqs(vdev)
            raise
        return vdev.vqs

    def _setup_vq(self, vdev: VirtioDevice, index: int,
                  callback: Callable[[Virtqueue], None] | None, name: str,
                  want: int) -> Virtqueue:
        wr, rd = self.platform.writel, self.platform.readl
        wr(self.base + M.QUEUE_SEL, index)
        if rd(self.base + (M.QUEUE_PFN if self.version == 1 else M.QUEUE_READY)):
            raise OSError(errno.ENOENT, f"queue {index} already set up")
        num = rd(self.base + M.QUEUE_NUM_MAX)
        if num == 0:
            raise OSError(errno.ENOENT, f"queue {index} not available")
        if want:
            num = min(num, want)
        notify = (self._notify_with_data if vdev.has_feature(F.VIRTIO_F_NOTIFICATION_DATA)
                  else self._notify)
        while True:
            # may_reduce_num: halve the ring until its memory can be allocated
            try:
                vq = vring_create_virtqueue(index, num, VIRTIO_MMIO_VRING_ALIGN, self.dma,
                                            vdev.features, notify, callback, name,
                                            self.queue_stats(index))
                break
            except OutOfGuestMemory:
                if num <= 1:
                    raise
                num //= 2
        vq.num_max = rd(self.base + M.QUEUE_NUM_MAX)
        vq.vdev = vdev
        self._activate(vq)
        return vq

    def _activate(self, vq: Virtqueue) -> None:
        """Program the selected queue's size and ring addresses, then QueueReady (version 2);
        its size, QueueAlign and the page frame of its contiguous vring (version 1)."""
        wr = self.platform.writel
        wr(self.base + M.QUEUE_SEL, vq.index)
        wr(self.base + M.QUEUE_NUM, vq.get_vring_size())
        if self.version == 1:
            q_pfn = vq.desc_addr // PAGE_SIZE
            if q_pfn >> 32:
                raise OSError(errno.E2BIG, "virtio-mmio v1 needs the ring below 16 TiB")
            wr(self.base + M.QUEUE_ALIGN, PAGE_SIZE)
            wr(self.base + M.QUEUE_PFN, q_pfn)
            return
        for lo, addr in ((M.QUEUE_DESC_LOW, vq.desc_addr), (M.QUEUE_DRIVER_LOW, vq.avail_addr),
                         (M.QUEUE_DEVICE_LOW, vq.used_addr)):
            wr(self.base + lo, addr & 0xFFFFFFFF)
            wr(self.base + lo + 4, addr >> 32)
        wr(self.base + M.QUEUE_READY, 1)

    # ---- per-queue reset (VIRTIO_F_RING_RESET) ---------------------------------------------------
    def disable_vq_and_reset(self, vq: Virtqueue) -> int:
        """Write 1 to QueueReset and wait until it reads 0, then QueueReady reads 0 too (the
        spec's QueueReset; Linux does the same through PCI's queue_reset)."""
        vdev = vq.vdev
        if not vdev.has_feature(F.VIRTIO_F_RING_RESET):
            return -errno.ENOENT
        wr, rd = self.platform.writel, self.platform.readl
        wr(self.base + M.QUEUE_SEL, vq.index)
        wr(self.base + M.QUEUE_RESET, 1)
        for reg in (M.QUEUE_RESET, M.QUEUE_READY):
            for _ in range(1000):
                if not rd(self.base + reg):
                    break
            else:
                return -errno.EBUSY
        vq.reset = True
        self.irqc.synchronize_irq()      # no handler is still in the queue's old ring
        return 0

    def enable_vq_after_reset(self, vq: Virtqueue) -> int:
        """Set the (possibly new) ring up again and make the queue ready."""
        if not getattr(vq, "reset", False):
            return -errno.EBUSY
        rd = self.platform.readl
        self.platform.writel(self.base + M.QUEUE_SEL, vq.index)
        if rd(self.base + M.QUEUE_RESET) or rd(self.base + M.QUEUE_READY):
            return -errno.EBUSY
        self._activate(vq)
        vq.reset = False
        return 0

    def del_vqs(self, vdev: VirtioDevice) -> None:
        """vm_del_vqs: disable each queue on the device, free the ring, free the irq."""
        wr, rd = self.platform.writel, self.platform.readl
        ready = M.QUEUE_PFN if self.version == 1 else M.QUEUE_READY
        # Off the list the interrupt handler walks first, and no handler still in it (Linux
        # takes the queue off vm_dev->virtqueues under the lock vm_interrupt holds).
        vqs, vdev.vqs = vdev.vqs, []
        self.irqc.synchronize_irq()
        for vq in vqs:
            wr(self.base + M.QUEUE_SEL, vq.index)
            wr(self.base + ready, 0)
            if rd(self.base + ready):
                log.warning("%s: queue %d still active after disable", vdev.name, vq.index)
            vq.publish_stats()
            vring_del_virtqueue(vq)
        if self.irq_requested:
            self.irqc.free_irq(self.irq)
            self.irq_requested = False

    # ---- interrupts ------------------------------------------------------------------------------
    def _interrupt(self, irq: int) -> bool:
        """vm_interrupt: read and acknowledge the cause, then run the handlers."""
        status = self.platform.readl(self.base + M.INTERRUPT_STATUS)
        self.platform.writel(self.base + M.INTERRUPT_ACK, status)
        self.interrupts += 1
        handled = False
        vdev = self.vdev
        if vdev is None:
            return False
        if status & M.INT_CONFIG:
            self.config_interrupts += 1
            virtio_config_changed(vdev)
            handled = True
        if status & M.INT_VRING:
            for vq in vdev.vqs:
                if not vq.reset:
                    handled |= vq.vring_interrupt()
        return handled

    def _safety_poll(self) -> None:
        """Run by the interrupt thread when it has waited long without an interrupt: a queue
        whose driver waits for an interrupt but whose used ring moved lost a wake-up."""
        vdev = self.vdev
        if vdev is None:
            return
        for vq in vdev.vqs:
            if (vq.callback is not None and not vq.reset and vq.callbacks_enabled()
                    and vq.more_used()):
                self.safety_polls += 1
                vq.vring_interrupt()
