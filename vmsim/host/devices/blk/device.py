"""virtio-blk, device side (QEMU hw/block/virtio-blk.c, Firecracker devices/virtio/block)."""

from vmsim.abi import blk as B
from vmsim.abi import features as F
from vmsim.abi import ids
from vmsim.host.devices.blk.backend import BlkBackend
from vmsim.host.devices.blk.config import build_config
from vmsim.host.devices.blk.metrics import BlkMetrics
from vmsim.host.devices.blk.request import BlkRequestHandler
from vmsim.host.memory import GuestMemory
from vmsim.host.virtio.device import QueueState, VirtioDevice
from vmsim.host.virtio.queue import DeviceQueue

# Ring and transport features offered by default (VIRTIO_F_RING_PACKED comes with
# `ring: packed`; IN_ORDER and NOTIFICATION_DATA are implemented and offered on request, as
# QEMU offers them only when asked).
RING_FEATURES = (F.bit(F.VIRTIO_F_VERSION_1) | F.bit(F.VIRTIO_RING_F_INDIRECT_DESC)
                 | F.bit(F.VIRTIO_RING_F_EVENT_IDX) | F.bit(F.VIRTIO_F_RING_RESET))


class BlkDevice(VirtioDevice):
    device_id = ids.VIRTIO_ID_BLOCK
    feature_names = B.FEATURE_NAMES

    def __init__(self, name: str, mem: GuestMemory, backend: BlkBackend, *, readonly: bool,
                 num_queues: int, queue_size: int, offer: int, withhold: int,
                 packed: bool = False,
                 blk_size: int, serial: str, dev_stats: memoryview | None,
                 queue_stats: list[memoryview | None], refuse_features_ok: bool = False) -> None:
        features = RING_FEATURES | F.bit(B.VIRTIO_BLK_F_SEG_MAX) | F.bit(B.VIRTIO_BLK_F_BLK_SIZE) \
            | F.bit(B.VIRTIO_BLK_F_FLUSH) | F.bit(B.VIRTIO_BLK_F_TOPOLOGY)
        if readonly:
            features |= F.bit(B.VIRTIO_BLK_F_RO)
        if num_queues > 1:
            features |= F.bit(B.VIRTIO_BLK_F_MQ)
        if packed:
            features |= F.bit(F.VIRTIO_F_RING_PACKED)
        features = (features | offer) & ~withhold
        super().__init__(name, mem, num_queues, queue_size, features, dev_stats, queue_stats,
                         refuse_features_ok)
        self.backend = backend
        self.readonly = readonly
        self.blk_size = blk_size
        self.num_req_queues = num_queues
        # QEMU's default: a request may use every descriptor but the header's and status's.
        self.seg_max = max(1, queue_size - 2)
        self.metrics = BlkMetrics()
        self.handler = BlkRequestHandler(mem, backend, readonly, serial.encode(), self.seg_max,
                                         self.metrics)
        self._config = self._build_config()

    def _build_config(self) -> bytearray:
        return build_config(self.backend.size >> B.SECTOR_SHIFT, size_max=0,
                            seg_max=self.seg_max, blk_size=self.blk_size,
                            num_queues=self.num_req_queues, writeback=False)

    def config_space(self) -> bytearray:
        return self._config

    def on_driver_ok(self) -> None:
        self.handler.flush_ok = self.negotiated(B.VIRTIO_BLK_F_FLUSH)

    def handle_queue(self, q: QueueState, ring: DeviceQueue) -> int:
        """Serve every available request on the queue (one service pass)."""
        return self.handler.serve(ring)

    def resize(self, new_size: int) -> None:
        """A host-side capacity change (blk resize): the driver hears of it by a config-change
        interrupt and re-reads capacity."""
        self.backend.resize(new_size)
        self.handler.capacity_bytes = new_size & ~(B.SECTOR_SIZE - 1)
        self._config = self._build_config()
        self.config_changed()

    def describe(self) -> dict:
        return {"backend": self.backend.description, "capacity_bytes": self.backend.size,
                "readonly": self.readonly, "requests": self.metrics.as_dict()}

    def close(self) -> None:
        super().close()
        self.backend.close()
