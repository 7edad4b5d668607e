"""The virtio core: struct virtio_device, struct virtio_driver, the virtio bus, and the probe
sequence with feature negotiation (drivers/virtio/virtio.c).

The device status sequence is the reference doc's: reset, ACKNOWLEDGE (on registration),
DRIVER, read features, negotiate, finalize (the transport writes them), the driver's validate
hook, FEATURES_OK and read it back, the driver's probe (which finds its queues and sets
DRIVER_OK through virtio_device_ready); FAILED when any step fails.
"""

import errno
import logging
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from vmsim.abi import features as F
from vmsim.abi import ids
from vmsim.abi import status as S
from vmsim.guest.virtio.virtqueue import Virtqueue
from vmsim.machine.stats import D

log = logging.getLogger("vmsim.guest")


class ConfigOps(Protocol):
    """struct virtio_config_ops: what a transport provides to the core and drivers."""

    def get(self, vdev: "VirtioDevice", offset: int, length: int) -> bytes: ...
    def set(self, vdev: "VirtioDevice", offset: int, data: bytes) -> None: ...
    def generation(self, vdev: "VirtioDevice") -> int: ...
    def get_status(self, vdev: "VirtioDevice") -> int: ...
    def set_status(self, vdev: "VirtioDevice", status: int) -> None: ...
    def reset(self, vdev: "VirtioDevice") -> None: ...
    def find_vqs(self, vdev: "VirtioDevice", nvqs: int,
                 callbacks: Sequence[Callable[[Virtqueue], None] | None],
                 names: Sequence[str], sizes: Sequence[int] | None = None) -> list[Virtqueue]: ...
    def del_vqs(self, vdev: "VirtioDevice") -> None: ...
    def synchronize_cbs(self, vdev: "VirtioDevice") -> None: ...
    def get_features(self, vdev: "VirtioDevice") -> int: ...
    def finalize_features(self, vdev: "VirtioDevice") -> int: ...
    def bus_name(self, vdev: "VirtioDevice") -> str: ...


class VirtioDriver:
    """struct virtio_driver. Subclasses set the tables and override the hooks."""

    name = "virtio"
    id_table: Sequence[tuple[int, int]] = ()          # (device id, vendor id)
    feature_table: Sequence[int] = ()
    feature_table_legacy: Sequence[int] = ()

    def validate(self, vdev: "VirtioDevice") -> int:
        """Check or adjust the negotiated features before FEATURES_OK; 0 or -errno."""
        return 0

    def probe(self, vdev: "VirtioDevice") -> int:
        raise NotImplementedError

    def remove(self, vdev: "VirtioDevice") -> None:
        raise NotImplementedError

    def config_changed(self, vdev: "VirtioDevice") -> None:
        pass

    def freeze(self, vdev: "VirtioDevice") -> int:
        """Quiesce and delete the queues before a suspend; 0 or -errno. A driver without
        freeze/restore cannot be suspended."""
        return -errno.EOPNOTSUPP

    def restore(self, vdev: "VirtioDevice") -> int:
        """Rebuild the queues after a resume (the features are negotiated again); 0 or -errno."""
        return -errno.EOPNOTSUPP


class VirtioDevice:
    """struct virtio_device, as a transport registers it."""

    def __init__(self, name: str, device_id: int, vendor: int, config: ConfigOps,
                 stats: memoryview | None = None) -> None:
        self.name = name                    # the node name the host published ("vda")
        self.index = -1
        self.id = (device_id, vendor)
        self.config = config
        self.transport: Any = config
        self.features = 0
        self.device_features = 0
        self.vqs: list[Virtqueue] = []
        self.driver: VirtioDriver | None = None
        self.priv: Any = None
        self.failed = False
        self.config_enabled = False
        self.config_change_pending = False
        self.needs_reset = False
        self.probe_error = ""
        self.stats = stats
        self.n_config_changed = 0
        # The DMA object of the device (its parent's dma ops): the shared direct one, or a
        # DeviceDma behind an IOMMU; set when the device is registered.
        self.dma: Any = None

    # ---- helpers drivers use ---------------------------------------------------------------------
    def has_feature(self, bit: int) -> bool:
        """virtio_has_feature."""
        return F.has(self.features, bit)

    def set_bit(self, bit: int) -> None:
        self.features |= 1 << bit

    def clear_bit(self, bit: int) -> None:
        self.features &= ~(1 << bit)

    def add_status(self, status: int) -> None:
        """virtio_add_status."""
        self.config.set_status(self, self.config.get_status(self) | status)

    def cread(self, offset: int, width: int) -> int:
        """virtio_cread8/16/32/64: a config field read consistently against the generation
        counter (a multi-part read is retried if the device changed config meanwhile)."""
        while True:
            gen = self.config.generation(self)
            data = self.config.get(self, offset, width)
            if self.config.generation(self) == gen:
                return int.from_bytes(data, "little")

    def cread_feature(self, bit: int, offset: int, width: int) -> int | None:
        """virtio_cread_feature: the field, or None if the feature was not negotiated."""
        if not self.has_feature(bit):
            return None
        return self.cread(offset, width)

    def device_ready(self) -> None:
        """virtio_device_ready: DRIVER_OK."""
        status = self.config.get_status(self)
        if status & S.DRIVER_OK:
            raise RuntimeError(f"{self.name}: DRIVER_OK set twice")
        self.config.set_status(self, status | S.DRIVER_OK)

    def reset_device(self) -> None:
        """virtio_reset_device."""
        self.config.reset(self)

    def publish_stats(self) -> None:
        s = self.stats
        if s is None:
            return
        s[D.PROBED] = int(self.driver is not None and not self.failed)
        s[D.GUEST_FEATURES] = self.features
        s[D.CONFIG_CHANGED] = self.n_config_changed


class VirtioBus:
    """The virtio bus: drivers register id tables, devices are matched and probed."""

    def __init__(self) -> None:
        self.drivers: list[VirtioDriver] = []
        self.devices: list[VirtioDevice] = []
        self._next_index = 0

    def register_driver(self, drv: VirtioDriver) -> None:
        self.drivers.append(drv)
        for dev in self.devices:
            if dev.driver is None and not dev.failed and self._match(dev, drv):
                self._probe(dev, drv)

    def register_device(self, dev: VirtioDevice) -> int:
        """register_virtio_device: reset, ACKNOWLEDGE, then probe with a matching driver.
        Returns 0 or the probe's -errno (the device stays registered, unbound)."""
        dev.index = self._next_index
        self._next_index += 1
        # "Always start by resetting the device, in case a previous driver messed it up."
        dev.reset_device()
        dev.add_status(S.ACKNOWLEDGE)
        self.devices.append(dev)
        for drv in self.drivers:
            if self._match(dev, drv):
                return self._probe(dev, drv)
        dev.probe_error = "no driver matches"
        return 0

    def unregister_device(self, dev: VirtioDevice) -> None:
        """unregister_virtio_device: the driver's remove, then the device is gone."""
        if dev.driver is not None:
            self._remove(dev)
        if dev in self.devices:
            self.devices.remove(dev)

    @staticmethod
    def _match(dev: VirtioDevice, drv: VirtioDriver) -> bool:
        """virtio_dev_match / virtio_id_match."""
        device, vendor = dev.id
        for want_dev, want_vendor in drv.id_table:
            if want_dev != ids.VIRTIO_DEV_ANY_ID and want_dev != device:
                continue
            if want_vendor == ids.VIRTIO_DEV_ANY_ID or want_vendor == vendor:
                return True
        return False

    def _probe(self, dev: VirtioDevice, drv: VirtioDriver) -> int:
        """virtio_dev_probe."""
        err = self._negotiate_and_probe(dev, drv)
        if err:
            log.warning("%s: probe with %s failed: %s", dev.name, drv.name, dev.probe_error)
            dev.add_status(S.FAILED)
            dev.failed = True
            dev.driver = None
        dev.publish_stats()
        return err

    def _negotiate_and_probe(self, dev: VirtioDevice, drv: VirtioDriver) -> int:
        dev.add_status(S.DRIVER)
        device_features = dev.config.get_features(dev)
        dev.device_features = device_features
        driver_features = 0
        for bit in drv.feature_table:
            driver_features |= 1 << bit
        driver_features_legacy = 0
        if drv.feature_table_legacy:
            for bit in drv.feature_table_legacy:
                driver_features_legacy |= 1 << bit
        else:
            driver_features_legacy = driver_features
        if F.has(device_features, F.VIRTIO_F_VERSION_1):
            dev.features = driver_features & device_features
        else:
            dev.features = driver_features_legacy & device_features
        # Transport features always preserved to pass to finalize_features.
        for i in range(F.VIRTIO_TRANSPORT_F_START, F.VIRTIO_TRANSPORT_F_END):
            if F.has(device_features, i):
                dev.set_bit(i)
        err = dev.config.finalize_features(dev)
        if err:
            dev.probe_error = "the transport rejected the features"
            return err
        before = dev.features
        err = drv.validate(dev)
        if err:
            dev.probe_error = f"the driver's validate failed ({err})"
            return err
        if dev.features != before:
            err = dev.config.finalize_features(dev)
            if err:
                dev.probe_error = "the transport rejected the validated features"
                return err
        err = self._features_ok(dev)
        if err:
            return err
        dev.driver = drv
        err = drv.probe(dev)
        if err:
            dev.probe_error = dev.probe_error or f"the driver's probe failed ({err})"
            return err
        # "If probe didn't do it, mark device DRIVER_OK ourselves."
        if not dev.config.get_status(dev) & S.DRIVER_OK:
            dev.device_ready()
        self._config_enable(dev)
        return 0

    def freeze(self, dev: VirtioDevice) -> int:
        """virtio_device_freeze: config changes are held back, the driver quiesces."""
        drv = dev.driver
        if drv is None:
            return 0
        dev.config_enabled = False
        err = drv.freeze(dev)
        if err:
            self._config_enable(dev)
        return err

    def restore(self, dev: VirtioDevice) -> int:
        """virtio_device_restore: reset, acknowledge, negotiate the same features again, let
        the driver rebuild its queues, DRIVER_OK."""
        drv = dev.driver
        dev.reset_device()
        dev.add_status(S.ACKNOWLEDGE)
        if drv is None:
            return 0
        dev.add_status(S.DRIVER)
        err = dev.config.finalize_features(dev)
        if not err:
            err = self._features_ok(dev)
        if not err:
            dev.needs_reset = False
            err = drv.restore(dev)
        if err:
            dev.add_status(S.FAILED)
            return err
        if not dev.config.get_status(dev) & S.DRIVER_OK:
            dev.device_ready()
        self._config_enable(dev)
        dev.publish_stats()
        return 0

    @staticmethod
    def _features_ok(dev: VirtioDevice) -> int:
        """virtio_features_ok: set FEATURES_OK and read it back (a modern device may refuse).

        The device's DMA object learns here whether device addresses are IOVAs: with
        VIRTIO_F_ACCESS_PLATFORM the device goes through the platform's IOMMU (if it sits
        behind one), without it the device bypasses it (the "DMA quirk") and rings and
        buffers are placed by guest-physical address."""
        set_translated = getattr(dev.dma, "set_translated", None)
        if set_translated is not None:
            set_translated(dev.has_feature(F.VIRTIO_F_ACCESS_PLATFORM))
        if not dev.has_feature(F.VIRTIO_F_VERSION_1):
            return 0   # legacy devices have no FEATURES_OK
        dev.add_status(S.FEATURES_OK)
        if not dev.config.get_status(dev) & S.FEATURES_OK:
            dev.probe_error = "virtio: device refuses features"
            return -errno.ENODEV
        return 0

    def _remove(self, dev: VirtioDevice) -> None:
        """virtio_dev_remove: the driver resets the device and deletes its queues."""
        drv = dev.driver
        dev.config_enabled = False
        if drv is not None:
            drv.remove(dev)
        dev.driver = None
        dev.features = 0
        # "Acknowledge the device's existence again."
        dev.add_status(S.ACKNOWLEDGE)
        dev.publish_stats()

    @staticmethod
    def _config_enable(dev: VirtioDevice) -> None:
        dev.config_enabled = True
        if dev.config_change_pending:
            dev.config_change_pending = False
            virtio_config_changed(dev)


def virtio_config_changed(dev: VirtioDevice) -> None:
    """The transport saw a config-change interrupt: a device that needs a reset is marked and
    its queues stop (virtio_break_device); otherwise the driver's config_changed runs."""
    status = dev.config.get_status(dev)
    if status & S.DEVICE_NEEDS_RESET:
        if not dev.needs_reset:
            log.warning("%s: device set DEVICE_NEEDS_RESET", dev.name)
        dev.needs_reset = True
        for vq in dev.vqs:
            vq.mark_broken("the device needs a reset")
    if not dev.config_enabled:
        dev.config_change_pending = True
        return
    dev.n_config_changed += 1
    if dev.driver is not None:
        dev.driver.config_changed(dev)
    dev.publish_stats()
