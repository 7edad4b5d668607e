"""The legacy virtio-pci interface, driver side (drivers/virtio/virtio_pci_legacy.c,
virtio_pci_legacy_dev.c): a transitional device ID and revision 0, the registers in I/O
BAR 0.

32 feature bits and no FEATURES_OK; a queue's size is the device's (QUEUE_NUM, read-only)
and its contiguous vring is placed by writing its page frame number to QUEUE_PFN (the used
ring at the next 4096-byte boundary); the device configuration follows the header at offset 20,
or 24 while MSI-X is enabled (the two vector registers sit in between), and is read a byte at
a time, as Linux's legacy vp_get does.
"""

import errno
from collections.abc import Callable

from vmsim.abi import pci as P
from vmsim.guest.memory import OutOfGuestMemory
from vmsim.guest.pci import IoRegion
from vmsim.guest.virtio.core import VirtioDevice
from vmsim.guest.virtio.pci_common import NO_VECTOR, PciProbeError, VirtioPciDevice
from vmsim.guest.virtio.virtqueue import Virtqueue, vring_transport_features
from vmsim.guest.virtio.vring import vring_create_virtqueue, vring_del_virtqueue


class VirtioPciLegacy(VirtioPciDevice):
    """struct virtio_pci_legacy_device, and the legacy config ops."""

    transport_name = "pci-legacy"

    def __init__(self, *args, **kw) -> None:
        super().__init__(*args, **kw)
        self.ioaddr: IoRegion | None = None

    # ---- probe (vp_legacy_probe) -----------------------------------------------------------------
    def probe(self, name: str, dev_stats: memoryview | None) -> VirtioDevice:
        pdev = self.pdev
        if not P.VIRTIO_PCI_DEVICE_ID_FIRST <= pdev.device <= P.VIRTIO_PCI_TRANSITIONAL_LAST:
            raise PciProbeError(errno.ENODEV, f"device ID 0x{pdev.device:04x} is not a legacy "
                                f"virtio device")
        if pdev.revision != P.VIRTIO_PCI_ABI_VERSION:
            raise PciProbeError(errno.ENODEV, f"revision {pdev.revision}: this driver speaks "
                                f"ABI version {P.VIRTIO_PCI_ABI_VERSION}")
        if pdev.resource_kind(0) != "io":
            raise PciProbeError(errno.ENODEV, "BAR 0 is not an I/O BAR")
        self.ioaddr = pdev.iomap(0)
        vdev = VirtioDevice(name, pdev.subsystem_device, pdev.subsystem_vendor, self, dev_stats)
        vdev.transport = self
        self.vdev = vdev
        return vdev

    # ---- config ops ------------------------------------------------------------------------------
    def get_features(self, vdev: VirtioDevice) -> int:
        """Only 32 bits of features in the legacy interface."""
        return self.ioaddr.read32(P.VIRTIO_PCI_HOST_FEATURES)

    def finalize_features(self, vdev: VirtioDevice) -> int:
        vring_transport_features(vdev)
        if vdev.features >> 32:
            vdev.probe_error = "legacy virtio-pci: features beyond bit 31"
            return -errno.EINVAL
        self.ioaddr.write32(P.VIRTIO_PCI_GUEST_FEATURES, vdev.features)
        return 0

    def _config_off(self) -> int:
        return P.virtio_pci_config_off(self.msix_enabled)

    def get(self, vdev: VirtioDevice, offset: int, length: int) -> bytes:
        """vp_get: the device configuration a byte at a time."""
        base = self._config_off() + offset
        return bytes(self.ioaddr.read8(base + i) for i in range(length))

    def set(self, vdev: VirtioDevice, offset: int, data: bytes) -> None:
        base = self._config_off() + offset
        for i, b in enumerate(data):
            self.ioaddr.write8(base + i, b)

    def generation(self, vdev: VirtioDevice) -> int:
        return 0     # a legacy device has no configuration generation

    def get_status(self, vdev: VirtioDevice) -> int:
        return self.ioaddr.read8(P.VIRTIO_PCI_STATUS)

    def set_status(self, vdev: VirtioDevice, status: int) -> None:
        assert status != 0     # that is reset
        self.ioaddr.write8(P.VIRTIO_PCI_STATUS, status)

    def reset(self, vdev: VirtioDevice) -> None:
        """vp_reset: 0 status means a reset; the read flushes the write out to the device."""
        self.ioaddr.write8(P.VIRTIO_PCI_STATUS, 0)
        self.ioaddr.read8(P.VIRTIO_PCI_STATUS)
        self.vp_synchronize_vectors()

    def config_vector(self, vector: int) -> int:
        self.ioaddr.write16(P.VIRTIO_MSI_CONFIG_VECTOR, vector)
        return self.ioaddr.read16(P.VIRTIO_MSI_CONFIG_VECTOR)

    def read_isr(self) -> int:
        return self.ioaddr.read8(P.VIRTIO_PCI_ISR)

    # ---- queues ----------------------------------------------------------------------------------
    def _queue_vector(self, index: int, vector: int) -> int:
        io = self.ioaddr
        io.write16(P.VIRTIO_PCI_QUEUE_SEL, index)
        io.write16(P.VIRTIO_MSI_QUEUE_VECTOR, vector)
        return io.read16(P.VIRTIO_MSI_QUEUE_VECTOR)

    def _set_queue_address(self, index: int, pfn: int) -> None:
        self.ioaddr.write16(P.VIRTIO_PCI_QUEUE_SEL, index)
        self.ioaddr.write32(P.VIRTIO_PCI_QUEUE_PFN, pfn)

    def setup_vq(self, vdev: VirtioDevice, index: int,
                 callback: Callable[[Virtqueue], None] | None, name: str, want: int,
                 msix_vec: int) -> Virtqueue:
        io = self.ioaddr
        io.write16(P.VIRTIO_PCI_QUEUE_SEL, index)
        num = io.read16(P.VIRTIO_PCI_QUEUE_NUM)
        if not num or io.read32(P.VIRTIO_PCI_QUEUE_PFN):
            raise OSError(errno.ENOENT, f"queue {index} not available")
        if num & (num - 1):
            raise OSError(errno.EINVAL, f"bad queue size {num}")
        # The device fixes the size: no reducing it to fit memory (may_reduce_num false).
        try:
            vq = vring_create_virtqueue(index, num, P.VIRTIO_PCI_VRING_ALIGN, self.dma,
                                        vdev.features, self._notify, callback, name,
                                        self.queue_stats(index))
        except OutOfGuestMemory:
            raise OSError(errno.ENOMEM, f"queue {index}: no memory for {num} entries") from None
        vq.num_max = num
        vq.vdev = vdev
        q_pfn = vq.desc_addr >> P.VIRTIO_PCI_QUEUE_ADDR_SHIFT
        if q_pfn >> 32:
            vring_del_virtqueue(vq)
            raise OSError(errno.E2BIG, "legacy virtio-pci needs the ring below 16 TiB")
        # activate the queue
        self._set_queue_address(index, q_pfn)
        if msix_vec != NO_VECTOR and self._queue_vector(index, msix_vec) == NO_VECTOR:
            self._set_queue_address(index, 0)
            vring_del_virtqueue(vq)
            raise OSError(errno.EBUSY, f"queue {index}: vector {msix_vec} not mapped")
        return vq

    def _notify(self, vq: Virtqueue) -> bool:
        """vp_notify: the queue index to QUEUE_NOTIFY (an ioeventfd on the port: no exit)."""
        self.ioaddr.write16(P.VIRTIO_PCI_QUEUE_NOTIFY, vq.index)
        return True

    def del_vq(self, info) -> None:
        vq = info.vq
        if self.msix_enabled:
            self._queue_vector(vq.index, NO_VECTOR)
            # Flush the write out to the device.
            self.ioaddr.read8(P.VIRTIO_PCI_ISR)
        # Select and deactivate the queue.
        self._set_queue_address(vq.index, 0)
        vring_del_virtqueue(vq)
