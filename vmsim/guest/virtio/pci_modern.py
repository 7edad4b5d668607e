"""The modern (virtio 1.x) virtio-pci interface, driver side (drivers/virtio/
virtio_pci_modern.c, virtio_pci_modern_dev.c).

The probe walks the capability list for the virtio structures (common configuration, ISR,
notifications, device configuration), checks each against its BAR, and maps them; the config
ops are accesses to the common configuration structure and the device configuration; a queue
is set up by selecting it, writing its size, ring addresses and MSI-X vector, and enabled once
every queue is ready; a kick is a write of the queue index to its notify address
(cap.offset + queue_notify_off * notify_off_multiplier), an ioeventfd.
"""

import errno
from collections.abc import Callable, Sequence

from vmsim.abi import features as F
from vmsim.abi import pci as P
from vmsim.guest.memory import OutOfGuestMemory
from vmsim.guest.pci import IoRegion
from vmsim.guest.virtio.core import VirtioDevice
from vmsim.guest.virtio.pci_common import NO_VECTOR, PciProbeError, VirtioPciDevice
from vmsim.guest.virtio.virtqueue import Virtqueue, vring_transport_features
from vmsim.guest.virtio.vring import vring_create_virtqueue, vring_del_virtqueue

SMP_CACHE_BYTES = 64
PAGE_SIZE = 4096
C = P   # the common configuration offsets live with the rest of the PCI ABI


class VirtioPciModern(VirtioPciDevice):
    """struct virtio_pci_modern_device, and the modern config ops."""

    transport_name = "pci"

    def __init__(self, *args, **kw) -> None:
        super().__init__(*args, **kw)
        self.common: IoRegion | None = None
        self.common_len = 0
        self.isr: IoRegion | None = None
        self.notify_base: IoRegion | None = None
        self.notify_len = 0
        self.notify_offset_multiplier = 0
        self.device: IoRegion | None = None
        self.device_len = 0
        self.modern_bars = 0
        self.caps: dict[str, int] = {}
        self.notify_addrs: dict[int, int] = {}     # queue index -> its notify address

    # ---- probe (vp_modern_probe) -----------------------------------------------------------------
    def probe(self, name: str, dev_stats: memoryview | None) -> VirtioDevice:
        pdev = self.pdev
        if not P.VIRTIO_PCI_DEVICE_ID_FIRST <= pdev.device <= P.VIRTIO_PCI_DEVICE_ID_LAST:
            raise PciProbeError(errno.ENODEV, f"device ID 0x{pdev.device:04x} is no virtio's")
        if pdev.device < P.VIRTIO_PCI_MODERN_DEVICE_BASE:
            # Transitional devices: the subsystem device ID is the virtio device ID.
            device_id = pdev.subsystem_device
        else:
            device_id = pdev.device - P.VIRTIO_PCI_MODERN_DEVICE_BASE
        common = self._find_capability(P.VIRTIO_PCI_CAP_COMMON_CFG)
        if not common:
            raise PciProbeError(errno.ENODEV, "no virtio common configuration capability: "
                                "leaving for the legacy driver")
        isr = self._find_capability(P.VIRTIO_PCI_CAP_ISR_CFG)
        notify = self._find_capability(P.VIRTIO_PCI_CAP_NOTIFY_CFG)
        if not isr or not notify:
            raise PciProbeError(errno.EINVAL, f"missing capabilities {common}/{isr}/{notify}")
        device = self._find_capability(P.VIRTIO_PCI_CAP_DEVICE_CFG)
        self.caps = {"common": common, "isr": isr, "notify": notify, "device": device}
        self.common, self.common_len = self._map_capability(
            common, P.VIRTIO_PCI_COMMON_CFG_SIZEOF, 4, 0, P.VIRTIO_PCI_MODERN_COMMON_CFG_SIZEOF)
        self.isr, _ = self._map_capability(isr, 1, 1, 0, 1)
        cfg = self.pdev.cfg_read32
        self.notify_offset_multiplier = cfg(notify + P.VIRTIO_PCI_NOTIFY_CAP_MULT)
        notify_length = cfg(notify + P.VIRTIO_PCI_CAP_LENGTH)
        self.notify_base, self.notify_len = self._map_capability(notify, 2, 2, 0, notify_length)
        if device:
            self.device, self.device_len = self._map_capability(device, 0, 4, 0, PAGE_SIZE)
        vdev = VirtioDevice(name, device_id, pdev.subsystem_vendor, self, dev_stats)
        vdev.transport = self
        self.vdev = vdev
        return vdev

    def _find_capability(self, cfg_type: int) -> int:
        """virtio_pci_find_capability: the first vendor capability of `cfg_type` whose BAR the
        function implements."""
        pdev = self.pdev
        pos = pdev.find_capability(P.PCI_CAP_ID_VNDR)
        while pos:
            typ = pdev.cfg_read8(pos + P.VIRTIO_PCI_CAP_CFG_TYPE)
            bar = pdev.cfg_read8(pos + P.VIRTIO_PCI_CAP_BAR)
            if bar < P.PCI_STD_NUM_BARS and typ == cfg_type and pdev.resource_len(bar):
                self.modern_bars |= 1 << bar
                return pos
            pos = pdev.find_next_capability(pos, P.PCI_CAP_ID_VNDR)
        return 0

    def _map_capability(self, off: int, minlen: int, align: int, start: int,
                        size: int) -> tuple[IoRegion, int]:
        """vp_modern_map_capability: the structure a capability points at, checked against
        its BAR; (region, mapped length). Raises PciProbeError."""
        pdev = self.pdev
        bar = pdev.cfg_read8(off + P.VIRTIO_PCI_CAP_BAR)
        offset = pdev.cfg_read32(off + P.VIRTIO_PCI_CAP_OFFSET)
        length = pdev.cfg_read32(off + P.VIRTIO_PCI_CAP_LENGTH)
        if bar >= P.PCI_STD_NUM_BARS or not self.modern_bars & (1 << bar):
            raise PciProbeError(errno.EINVAL, f"bar unexpectedly changed to {bar}")
        if length <= start:
            raise PciProbeError(errno.EINVAL, f"bad capability len {length} (>{start} expected)")
        if length - start < minlen:
            raise PciProbeError(errno.EINVAL, f"bad capability len {length} "
                                f"(>={minlen} expected)")
        length -= start
        offset += start
        if offset & (align - 1):
            raise PciProbeError(errno.EINVAL, f"offset {offset} not aligned to {align}")
        length = min(length, size)
        if minlen + offset > pdev.resource_len(bar):
            raise PciProbeError(errno.EINVAL, f"map virtio {minlen}@{offset} out of range on "
                                f"bar {bar} length {pdev.resource_len(bar)}")
        region = pdev.iomap(bar, offset)
        assert region is not None
        return region, length

    # ---- config ops ------------------------------------------------------------------------------
    def get_shm_region(self, vdev: VirtioDevice, region_id: int) -> tuple[int, int] | None:
        """vp_get_shm_region: (guest-physical address, length) of shared memory region
        `region_id`, from its VIRTIO_PCI_CAP_SHARED_MEMORY_CFG capability; None if the device
        has no such region."""
        pdev = self.pdev
        pos = pdev.find_capability(P.PCI_CAP_ID_VNDR)
        while pos:
            here, pos = pos, pdev.find_next_capability(pos, P.PCI_CAP_ID_VNDR)
            if pdev.cfg_read8(here + P.VIRTIO_PCI_CAP_CFG_TYPE) != \
                    P.VIRTIO_PCI_CAP_SHARED_MEMORY_CFG:
                continue
            if pdev.cfg_read8(here + P.VIRTIO_PCI_CAP_LEN) != P.VIRTIO_PCI_CAP64_SIZEOF:
                continue            # "shm cap with bad size"
            if pdev.cfg_read8(here + P.VIRTIO_PCI_CAP_ID) != region_id:
                continue
            bar = pdev.cfg_read8(here + P.VIRTIO_PCI_CAP_BAR)
            if bar >= P.PCI_STD_NUM_BARS:
                continue
            offset = (pdev.cfg_read32(here + P.VIRTIO_PCI_CAP_OFFSET)
                      | pdev.cfg_read32(here + P.VIRTIO_PCI_CAP64_OFFSET_HI) << 32)
            length = (pdev.cfg_read32(here + P.VIRTIO_PCI_CAP_LENGTH)
                      | pdev.cfg_read32(here + P.VIRTIO_PCI_CAP64_LENGTH_HI) << 32)
            if offset + length > pdev.resource_len(bar):
                return None         # "bar shorter than cap offset+len"
            return pdev.resource_start(bar) + offset, length
        return None

    def get_features(self, vdev: VirtioDevice) -> int:
        c = self.common
        c.write32(C.VIRTIO_PCI_COMMON_DFSELECT, 0)
        features = c.read32(C.VIRTIO_PCI_COMMON_DF)
        c.write32(C.VIRTIO_PCI_COMMON_DFSELECT, 1)
        return features | c.read32(C.VIRTIO_PCI_COMMON_DF) << 32

    def get_driver_features(self) -> int:
        c = self.common
        c.write32(C.VIRTIO_PCI_COMMON_GFSELECT, 0)
        features = c.read32(C.VIRTIO_PCI_COMMON_GF)
        c.write32(C.VIRTIO_PCI_COMMON_GFSELECT, 1)
        return features | c.read32(C.VIRTIO_PCI_COMMON_GF) << 32

    def finalize_features(self, vdev: VirtioDevice) -> int:
        features = vdev.features
        vring_transport_features(vdev)
        # vp_transport_features: what virtio-pci itself accepts of the transport bits
        if F.has(features, F.VIRTIO_F_RING_RESET):
            vdev.set_bit(F.VIRTIO_F_RING_RESET)
        if not vdev.has_feature(F.VIRTIO_F_VERSION_1):
            vdev.probe_error = ("virtio: device uses modern interface but does not have "
                                "VIRTIO_F_VERSION_1")
            return -errno.EINVAL
        # vp_check_common_size: the fields a feature needs must be in the common structure.
        for bit, field_end in ((F.VIRTIO_F_NOTIF_CONFIG_DATA, C.VIRTIO_PCI_COMMON_Q_NDATA + 2),
                               (F.VIRTIO_F_RING_RESET, C.VIRTIO_PCI_COMMON_Q_RESET + 2)):
            if vdev.has_feature(bit) and self.common_len < field_end:
                vdev.probe_error = (f"virtio: common cfg size({self.common_len}) does not "
                                    f"match the feature {F.COMMON_NAMES.get(bit, bit)}")
                return -errno.EINVAL
        c = self.common
        c.write32(C.VIRTIO_PCI_COMMON_GFSELECT, 0)
        c.write32(C.VIRTIO_PCI_COMMON_GF, vdev.features & 0xFFFFFFFF)
        c.write32(C.VIRTIO_PCI_COMMON_GFSELECT, 1)
        c.write32(C.VIRTIO_PCI_COMMON_GF, vdev.features >> 32 & 0xFFFFFFFF)
        return 0

    def get(self, vdev: VirtioDevice, offset: int, length: int) -> bytes:
        """vp_get: reads of 1, 2, 4 bytes; 8 as two 4-byte reads."""
        if offset + length > self.device_len or self.device is None:
            raise ValueError(f"config read of {length} at {offset} beyond {self.device_len}")
        d = self.device
        if length in (1, 2, 4):
            return d.read(offset, length).to_bytes(length, "little")
        if length == 8:
            return (d.read32(offset).to_bytes(4, "little")
                    + d.read32(offset + 4).to_bytes(4, "little"))
        return bytes(d.read8(offset + i) for i in range(length))

    def set(self, vdev: VirtioDevice, offset: int, data: bytes) -> None:
        if offset + len(data) > self.device_len or self.device is None:
            raise ValueError(f"config write of {len(data)} at {offset} beyond {self.device_len}")
        d = self.device
        if len(data) in (1, 2, 4):
            d.write(offset, len(data), int.from_bytes(data, "little"))
        elif len(data) == 8:
            d.write32(offset, int.from_bytes(data[:4], "little"))
            d.write32(offset + 4, int.from_bytes(data[4:], "little"))
        else:
            for i, b in enumerate(data):
                d.write8(offset + i, b)

    def generation(self, vdev: VirtioDevice) -> int:
        return self.common.read8(C.VIRTIO_PCI_COMMON_CFGGENERATION)

    def get_status(self, vdev: VirtioDevice) -> int:
        return self.common.read8(C.VIRTIO_PCI_COMMON_STATUS)

    def set_status(self, vdev: VirtioDevice, status: int) -> None:
        # We should never be setting status to 0 (that is reset).
        assert status != 0
        self.common.write8(C.VIRTIO_PCI_COMMON_STATUS, status)

    def reset(self, vdev: VirtioDevice) -> None:
        """vp_reset: write 0, wait until the status reads 0 (flushing the device's writes and
        interrupts), then for the handlers."""
        self.common.write8(C.VIRTIO_PCI_COMMON_STATUS, 0)
        for _ in range(1000):
            if not self.common.read8(C.VIRTIO_PCI_COMMON_STATUS):
                break
        else:
            raise OSError(errno.EIO, f"{vdev.name}: device status does not read 0 after reset")
        self.vp_synchronize_vectors()

    def config_vector(self, vector: int) -> int:
        """vp_modern_config_vector."""
        self.common.write16(C.VIRTIO_PCI_COMMON_MSIX, vector)
        return self.common.read16(C.VIRTIO_PCI_COMMON_MSIX)

    def read_isr(self) -> int:
        return self.isr.read8(0)

    def find_vqs(self, vdev: VirtioDevice, nvqs: int,
                 callbacks: Sequence[Callable[[Virtqueue], None] | None],
                 names: Sequence[str], sizes: Sequence[int] | None = None) -> list[Virtqueue]:
        """vp_modern_find_vqs: set every queue up, then enable them all. Has to be done last:
        once a queue is enabled there is no way back but a reset."""
        vqs = super().find_vqs(vdev, nvqs, callbacks, names, sizes)
        for vq in vqs:
            self._set_queue_enable(vq.index)
        return vqs

    # ---- queues ----------------------------------------------------------------------------------
    def _select(self, index: int) -> None:
        self.common.write16(C.VIRTIO_PCI_COMMON_Q_SELECT, index)

    def _set_queue_enable(self, index: int) -> None:
        self._select(index)
        self.common.write16(C.VIRTIO_PCI_COMMON_Q_ENABLE, 1)

    def _get_queue_enable(self, index: int) -> int:
        self._select(index)
        return self.common.read16(C.VIRTIO_PCI_COMMON_Q_ENABLE)

    def queue_vector(self, index: int, vector: int) -> int:
        """vp_modern_queue_vector: map a queue's interrupts to `vector`; what reads back."""
        self._select(index)
        self.common.write16(C.VIRTIO_PCI_COMMON_Q_MSIX, vector)
        return self.common.read16(C.VIRTIO_PCI_COMMON_Q_MSIX)

    def setup_vq(self, vdev: VirtioDevice, index: int,
                 callback: Callable[[Virtqueue], None] | None, name: str, want: int,
                 msix_vec: int) -> Virtqueue:
        c = self.common
        notify = (self._notify_with_data if vdev.has_feature(F.VIRTIO_F_NOTIFICATION_DATA)
                  else self._notify)
        if index >= c.read16(C.VIRTIO_PCI_COMMON_NUMQ):
            raise OSError(errno.EINVAL, f"queue {index} beyond num_queues")
        self._select(index)
        num = c.read16(C.VIRTIO_PCI_COMMON_Q_SIZE)
        # Check if queue is either not available or already active.
        if not num or c.read16(C.VIRTIO_PCI_COMMON_Q_ENABLE):
            raise OSError(errno.ENOENT, f"queue {index} not available")
        if not vdev.has_feature(F.VIRTIO_F_RING_PACKED) and num & (num - 1):
            raise OSError(errno.EINVAL, f"bad queue size {num}")
        max_num = num
        if want:
            num = min(num, want)
        while True:
            # may_reduce_num: halve the ring until its memory can be allocated
            try:
                vq = vring_create_virtqueue(index, num, SMP_CACHE_BYTES, self.dma,
                                            vdev.features, notify, callback, name,
                                            self.queue_stats(index))
                break
            except OutOfGuestMemory:
                if num <= 1:
                    raise OSError(errno.ENOMEM, f"queue {index}: no memory") from None
                num //= 2
        vq.num_max = max_num
        vq.vdev = vdev
        try:
            self._active_vq(vq, msix_vec)
            self.notify_addrs[index] = self._map_vq_notify(index)
        except OSError:
            vring_del_virtqueue(vq)
            raise
        return vq

    def _active_vq(self, vq: Virtqueue, msix_vec: int) -> None:
        """vp_active_vq: size, ring addresses, and the MSI-X vector (read back)."""
        c = self.common
        self._select(vq.index)
        c.write16(C.VIRTIO_PCI_COMMON_Q_SIZE, vq.get_vring_size())
        for lo, addr in ((C.VIRTIO_PCI_COMMON_Q_DESCLO, vq.desc_addr),
                         (C.VIRTIO_PCI_COMMON_Q_AVAILLO, vq.avail_addr),
                         (C.VIRTIO_PCI_COMMON_Q_USEDLO, vq.used_addr)):
            c.write32(lo, addr & 0xFFFFFFFF)
            c.write32(lo + 4, addr >> 32)
        if msix_vec != NO_VECTOR and self.queue_vector(vq.index, msix_vec) == NO_VECTOR:
            raise OSError(errno.EBUSY, f"queue {vq.index}: vector {msix_vec} not mapped")

    def _map_vq_notify(self, index: int) -> int:
        """vp_modern_map_vq_notify: the queue's notify address."""
        self._select(index)
        off = self.common.read16(C.VIRTIO_PCI_COMMON_Q_NOFF)
        if off * self.notify_offset_multiplier + 2 > self.notify_len:
            raise OSError(errno.EINVAL, f"queue {index}: notify offset {off} x "
                          f"{self.notify_offset_multiplier} beyond {self.notify_len}")
        return self.notify_base.address(off * self.notify_offset_multiplier)

    def _notify(self, vq: Virtqueue) -> bool:
        """vp_notify: the queue's index to its notify address (an ioeventfd: no exit)."""
        self.platform.write(self.notify_addrs[vq.index], 2, vq.index)
        return True

    def _notify_with_data(self, vq: Virtqueue) -> bool:
        """vp_notify_with_data: 32 bits of queue index and next available position; such a
        value matches no ioeventfd (datamatch: the index), so the write traps."""
        self.platform.write(self.notify_addrs[vq.index], 4, vq.notification_data())
        return True

    def del_vq(self, info) -> None:
        """del_vq: the queue's vector unmapped, the ring freed."""
        vq = info.vq
        if self.msix_enabled:
            self.queue_vector(vq.index, NO_VECTOR)
        vring_del_virtqueue(vq)

    # ---- per-queue reset (VIRTIO_F_RING_RESET) ---------------------------------------------------
    def _get_queue_reset(self, index: int) -> int:
        self._select(index)
        return self.common.read16(C.VIRTIO_PCI_COMMON_Q_RESET)

    def disable_vq_and_reset(self, vq: Virtqueue) -> int:
        """vp_modern_disable_vq_and_reset: write 1 to queue_reset, wait until it and
        queue_enable read 0, take the queue off the interrupt handlers' list."""
        if not vq.vdev.has_feature(F.VIRTIO_F_RING_RESET):
            return -errno.ENOENT
        self._select(vq.index)
        self.common.write16(C.VIRTIO_PCI_COMMON_Q_RESET, 1)
        for reg in (C.VIRTIO_PCI_COMMON_Q_RESET, C.VIRTIO_PCI_COMMON_Q_ENABLE):
            for _ in range(1000):
                if not self.common.read16(reg):
                    break
            else:
                return -errno.EBUSY
        info = self.vqs.get(vq.index)
        if info is not None:
            info.active = False
        self.vp_synchronize_vectors()
        vq.reset = True
        return 0

    def enable_vq_after_reset(self, vq: Virtqueue) -> int:
        """vp_modern_enable_vq_after_reset: the (possibly new) ring programmed again with its
        vector, back on the handlers' list, enabled."""
        if not vq.reset:
            return -errno.EBUSY
        if self._get_queue_reset(vq.index) or self._get_queue_enable(vq.index):
            return -errno.EBUSY
        info = self.vqs.get(vq.index)
        try:
            self._active_vq(vq, info.msix_vector if info is not None else NO_VECTOR)
        except OSError as e:
            return -e.errno
        if info is not None:
            info.active = True
        self._set_queue_enable(vq.index)
        vq.reset = False
        return 0
