"""The device model common to every virtio device (QEMU's VirtIODevice, Firecracker's
VirtioDevice): the status state machine, feature negotiation, config space with its
generation counter, the queues' registers and rings, and virtio_error.

A transport (MMIO, ...) owns the register layout and interrupt delivery and calls into this
model; a device type (blk, ...) subclasses it with its config space and `handle_queue`.
"""

import logging
from typing import Protocol

from vmsim.abi import features as F
from vmsim.abi import status as S
from vmsim.host.iommu_rings import ring_class
from vmsim.host.memory import GuestMemory
from vmsim.host.virtio.errors import Reason, RingError
from vmsim.host.virtio.queue import DeviceQueue
from vmsim.host.virtio.queue_packed import PackedQueue
from vmsim.host.virtio.queue_split import SplitQueue
from vmsim.machine.eventfd import EventFd
from vmsim.machine.stats import D, Q

log = logging.getLogger("vmsim.host")

# The spec's device status state machine as a table: a bit may be newly set only when the
# bits it requires are set in the same write (virtio spec 3.1.1, 2.1.2). Clearing any bit
# other than by writing 0 (reset) is refused.
STATUS_REQUIRES = {
    S.ACKNOWLEDGE: 0,
    S.DRIVER: S.ACKNOWLEDGE,
    S.FEATURES_OK: S.ACKNOWLEDGE | S.DRIVER,
    S.DRIVER_OK: S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK,
    S.FAILED: 0,
}
STATUS_REQUIRES_LEGACY = {**STATUS_REQUIRES, S.DRIVER_OK: S.ACKNOWLEDGE | S.DRIVER}


class Transport(Protocol):
    """What the device model needs from its transport: interrupt delivery."""

    name: str

    def signal_used(self, queue_index: int) -> None: ...
    def signal_config(self) -> None: ...


class QueueState:
    """One queue's registers and, once ready, its ring."""

    __slots__ = ("broken", "desc", "device", "driver", "index", "kick", "num", "num_max",
                 "ready", "ring", "stats")

    def __init__(self, index: int, num_max: int, stats: memoryview | None) -> None:
        self.index = index
        self.num_max = num_max
        self.kick = EventFd()           # the ioeventfd for this queue's notify register
        self.stats = stats
        self.ring: DeviceQueue | None = None
        self.reset()

    def reset(self) -> None:
        self.num = self.num_max
        self.desc = self.driver = self.device = 0
        self.ready = False
        self.broken = False
        if self.ring is not None:
            self.ring.publish_stats()
            self.ring.release()
        self.ring = None
        if self.stats is not None:
            self.stats[Q.READY] = 0


class VirtioDevice:
    """The device-independent half of a virtio device, on the host."""

    device_id = 0
    feature_names: dict[int, str] = {}
    # False for a device whose rings another process serves (vhost-user): the host loop
    # neither polls its queues nor takes their kicks
    rings_in_process = True

    def __init__(self, name: str, mem: GuestMemory, num_queues: int, queue_size: int,
                 device_features: int, dev_stats: memoryview | None,
                 queue_stats: list[memoryview | None], refuse_features_ok: bool = False) -> None:
        self.name = name
        self.mem = mem
        self.device_features = device_features
        self.refuse_features_ok = refuse_features_ok
        self.queues = [QueueState(i, queue_size, queue_stats[i] if i < len(queue_stats) else None)
                       for i in range(num_queues)]
        self.stats = dev_stats
        self.transport: Transport | None = None
        self.legacy = False
        self.status = 0
        self.driver_features = 0
        self.config_generation = 0
        self.errors: list[str] = []
        self.guest_errors: list[str] = []   # register misuse that is not a ring error
        self.broken = False
        self.n_resets = 0
        self.n_config_interrupts = 0
        # A scenario's fault: a stalled device serves no queue until released (a hung
        # backend); its requests stay in flight.
        self.stalled = False
        self.live_info: dict | None = None
        self._publish_device_stats()

    def make_legacy(self) -> None:
        """The device sits on a legacy interface (virtio-mmio v1, legacy virtio-pci): 32
        feature bits, no VERSION_1 (nor what needs it), no FEATURES_OK step."""
        self.legacy = True
        self.device_features &= 0xFFFFFFFF
        self._publish_device_stats()

    # ---- device type hooks -----------------------------------------------------------------------
    def config_space(self) -> bytearray:
        """The device-specific configuration space (current contents)."""
        return bytearray()

    def write_config_space(self, offset: int, data: bytes) -> None:
        """A driver write to config space; read-only by default."""
        self.guest_error(f"write of {len(data)} bytes to read-only config offset {offset}")

    def handle_queue(self, q: QueueState, ring: DeviceQueue) -> int:
        """Process what is available on one queue; return the number of chains handled."""
        raise NotImplementedError

    def wants_service(self, q: QueueState) -> bool:
        """Whether buffers available on `q` are work for the device now (a receive queue's
        posted buffers are not, until there is something to receive)."""
        return True

    def waits_for_kick(self, q: QueueState) -> bool:
        """Whether `q` waits for the driver's kick (its notifications must stay enabled while
        the host polls the other queues): a receive queue starved of buffers."""
        return False

    def kicked(self, q: QueueState) -> None:
        """The driver kicked `q` (the host loop calls this for every kick it takes)."""

    def on_driver_ok(self) -> None:
        """The driver set DRIVER_OK: the device is live."""

    def on_reset(self) -> None:
        """The device was reset: forget device-type state."""

    def describe(self) -> dict:
        """Device-type details for the run summary."""
        return {}

    # ---- status ----------------------------------------------------------------------------------
    def write_status(self, value: int) -> None:
        value &= 0xFF
        if value == 0:
            self.reset()
            return
        old = self.status
        # The driver writes back what it read, so a NEEDS_RESET the device set may come back;
        # the driver itself never sets it.
        driver_bits = value & ~S.DEVICE_NEEDS_RESET
        if old & ~driver_bits & ~S.DEVICE_NEEDS_RESET:
            self.guest_error(f"status write {S.describe(value)} clears bits of "
                             f"{S.describe(old)} without a reset; ignored")
            return
        table = STATUS_REQUIRES_LEGACY if self.legacy else STATUS_REQUIRES
        for bit, needs in table.items():
            if driver_bits & bit and not old & bit and driver_bits & needs != needs:
                self.guest_error(f"status {S.describe(value)} sets {S.NAMES[bit]} before "
                                 f"{S.describe(needs & ~driver_bits)}; ignored")
                return
        unknown = driver_bits & ~sum(table)
        if unknown:
            self.guest_error(f"status write sets unknown bits 0x{unknown:x}; ignored")
            return
        new_bits = driver_bits & ~old
        if new_bits & S.FEATURES_OK and not self._accept_features():
            driver_bits &= ~S.FEATURES_OK
            new_bits &= ~S.FEATURES_OK
            if new_bits & S.DRIVER_OK and not self.legacy:
                # DRIVER_OK needs FEATURES_OK, which the device just refused.
                self.guest_error("DRIVER_OK written with a FEATURES_OK the device refused; "
                                 "ignored")
                driver_bits &= ~S.DRIVER_OK
                new_bits &= ~S.DRIVER_OK
        self.status = driver_bits | (old & S.DEVICE_NEEDS_RESET)
        if new_bits & S.DRIVER_OK:
            self._driver_ok()
        self._publish_device_stats()

    def _accept_features(self) -> bool:
        """FEATURES_OK: the driver may accept only offered features; a modern device needs
        VERSION_1. A refusal leaves FEATURES_OK clear, which the driver reads back."""
        extra = self.driver_features & ~self.device_features
        if extra:
            self.guest_error("driver accepted features never offered: "
                             + ", ".join(F.names(extra, self.feature_names)))
            return False
        if not self.legacy and not F.has(self.driver_features, F.VIRTIO_F_VERSION_1):
            self.guest_error("driver did not accept VIRTIO_F_VERSION_1 on a modern device")
            return False
        if self.refuse_features_ok:
            log.info("%s: refusing FEATURES_OK as configured", self.name)
            return False
        return True

    def _driver_ok(self) -> None:
        for q in self.queues:
            if q.ready and q.ring is None:
                self.queue_enable(q)
        self.on_driver_ok()

    def reset(self) -> None:
        """A write of 0 to status: back to the initial state, queues forgotten."""
        if self.status & S.DRIVER_OK:
            # what the device was like while live (filters, queue pairs, ports): the run's
            # report shows this, not the state the driver's removal leaves
            self.live_info = self.describe()
        self.status = 0
        self.driver_features = 0
        self.broken = False
        for q in self.queues:
            q.reset()
        self.n_resets += 1
        self.on_reset()
        self._publish_device_stats()

    def set_driver_features(self, word: int, value: int) -> None:
        """One 32-bit half of the driver features (word 0 or 1)."""
        if self.status & S.FEATURES_OK:
            self.guest_error("driver features written after FEATURES_OK; ignored")
            return
        if word not in (0, 1):
            return
        shift = 32 * word
        self.driver_features = (self.driver_features & ~(0xFFFFFFFF << shift)) | (
            (value & 0xFFFFFFFF) << shift)

    def negotiated(self, bit: int) -> bool:
        return F.has(self.driver_features, bit)

    # ---- config space ----------------------------------------------------------------------------
    def read_config(self, offset: int, width: int) -> int:
        cfg = self.config_space()
        if offset < 0 or offset + width > len(cfg):
            self.guest_error(f"config read of {width} bytes at {offset} beyond {len(cfg)} bytes")
            return 0
        return int.from_bytes(cfg[offset:offset + width], "little")

    def write_config(self, offset: int, width: int, value: int) -> None:
        cfg_len = len(self.config_space())
        if offset < 0 or offset + width > cfg_len:
            self.guest_error(f"config write of {width} bytes at {offset} beyond {cfg_len} bytes")
            return
        # The access is `width` bytes wide: a register write carries no more than that.
        value &= (1 << (8 * width)) - 1
        self.write_config_space(offset, value.to_bytes(width, "little"))

    def config_changed(self) -> None:
        """The host changed config space: bump the generation and interrupt the driver."""
        self.config_generation = (self.config_generation + 1) & 0xFFFFFFFF
        if self.status & S.DRIVER_OK and self.transport is not None:
            self.n_config_interrupts += 1
            self.transport.signal_config()
        self._publish_device_stats()

    # ---- queues ----------------------------------------------------------------------------------
    def queue_enable(self, q: QueueState) -> bool:
        """Build the device's view of a queue the driver made ready; a bad layout is a device
        error."""
        packed = self.negotiated(F.VIRTIO_F_RING_PACKED)
        cls = PackedQueue if packed else SplitQueue
        if self.mem.translating:    # behind an IOMMU: the rings translate through its IOTLB
            cls = ring_class(cls)
        try:
            if q.num > q.num_max:       # the driver picks a size up to the device's maximum
                raise RingError(Reason.INVALID_RING_SIZE,
                                f"size {q.num}, the queue's maximum {q.num_max}")
            q.ring = cls(self.mem, q.num, q.desc, q.driver, q.device,
                         event_idx=self.negotiated(F.VIRTIO_RING_F_EVENT_IDX),
                         indirect=self.negotiated(F.VIRTIO_RING_F_INDIRECT_DESC),
                         stats=q.stats, in_order=self.negotiated(F.VIRTIO_F_IN_ORDER))
        except RingError as e:
            self.virtio_error(f"queue {q.index}: {e}")
            return False
        q.ready = True
        s = q.stats
        if s is not None:
            # Where the ring is, for a reader that decodes it from guest RAM; READY last, so
            # a reader that sees it set sees the layout.
            s[Q.SIZE] = q.num
            s[Q.RING] = int(packed)
            s[Q.DESC_ADDR], s[Q.DRIVER_ADDR], s[Q.DEVICE_ADDR] = q.desc, q.driver, q.device
            s[Q.RAM_BASE] = self.mem.base
            s[Q.DEV_FEATURES] = self.driver_features
            s[Q.LAYOUT_GEN] += 1
            q.ring.publish_stats()
            s[Q.READY] = 1
        return True

    def queue_reset(self, q: QueueState) -> None:
        """VIRTIO_F_RING_RESET: forget the queue (its ring, its state); the driver may set it
        up again, with other parameters, and re-enable it while the device stays live."""
        q.reset()
        q.num = q.num_max

    def queue_disable(self, q: QueueState) -> None:
        q.reset()

    def live_queues(self) -> list[QueueState]:
        """Queues the device serves now: ready, with a ring, driver OK, not broken."""
        if self.broken or self.stalled or not self.status & S.DRIVER_OK:
            return []
        return [q for q in self.queues if q.ring is not None and not q.broken]

    def service(self, q: QueueState) -> int:
        """Process one queue and interrupt the driver if it asked to be. Guest-caused errors
        end here, as virtio_error."""
        ring = q.ring
        if ring is None or q.broken or self.broken:
            return 0
        try:
            n = self.handle_queue(q, ring)
        except RingError as e:
            self.virtio_error(f"queue {q.index}: {e}", q)
            return 0
        except Exception as e:  # a host bug, not the guest's: stop this device, keep the rest
            log.exception("%s: queue %d: internal error", self.name, q.index)
            self.virtio_error(f"queue {q.index}: internal device error: "
                              f"{type(e).__name__}: {e}", q)
            return 0
        if n:
            ring.n_wakeups += 1
            if ring.need_notify() and self.transport is not None:
                self.transport.signal_used(q.index)
        return n

    def virtio_error(self, reason: str, q: QueueState | None = None) -> None:
        """QEMU's virtio_error: log, mark broken, set DEVICE_NEEDS_RESET and tell the driver
        through a config-change interrupt (a modern device; a legacy one can only stop)."""
        msg = f"{self.name}: {reason}"
        log.warning("device error: %s", msg)
        self.errors.append(reason)
        if q is not None:
            q.broken = True
            if q.stats is not None:
                q.stats[Q.ERRORS] += 1
        self.broken = True
        if self.negotiated(F.VIRTIO_F_VERSION_1) and not self.legacy:
            self.status |= S.DEVICE_NEEDS_RESET
            if self.status & S.DRIVER_OK and self.transport is not None:
                self.n_config_interrupts += 1
                self.transport.signal_config()
        self._publish_device_stats()

    def guest_error(self, msg: str) -> None:
        """A register-level misuse by the driver (QEMU's LOG_GUEST_ERROR): logged, counted,
        and otherwise ignored as the spec lets a device ignore it."""
        log.info("guest error: %s: %s", self.name, msg)
        if len(self.guest_errors) < 100:
            self.guest_errors.append(msg)

    # ---- stats -----------------------------------------------------------------------------------
    def _publish_device_stats(self) -> None:
        s = self.stats
        if s is None:
            return
        s[D.STATUS] = self.status
        s[D.DEVICE_FEATURES] = self.device_features
        s[D.DRIVER_FEATURES] = self.driver_features
        s[D.DEVICE_ERRORS] = len(self.errors)
        s[D.RESETS] = self.n_resets
        s[D.CONFIG_INTERRUPTS] = self.n_config_interrupts
        s[D.CONFIG_GENERATION] = self.config_generation
        s[D.INTERRUPTS] = getattr(self.transport, "n_interrupts", 0)

    def publish_stats(self) -> None:
        self._publish_device_stats()
        for q in self.queues:
            if q.ring is not None:
                q.ring.publish_stats()

    def close(self) -> None:
        for q in self.queues:
            q.reset()
            q.kick.close()
