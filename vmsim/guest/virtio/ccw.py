"""The virtio-ccw transport driver (drivers/s390/virtio/virtio_ccw.c): virtio devices behind
the subchannels the channel subsystem driver (vmsim.guest.css) found.

A device is onlined as Linux's virtio_ccw_online does it: SENSE ID must show control unit type
0x3832 (its model is the virtio device ID), SET_VIRTIO_REV negotiates the revision from the
highest down (2: READ_STATUS; 1: virtio 1), and the device is registered on the virtio bus.
Every config op is a channel program of one CCW, run synchronously (ccw_io_helper) with its
communication block in a small area below 2 GiB. vmsim's driver implements revisions 1 and 2;
a device that takes only revision 0 (legacy) is refused.

Config space is read and written whole from offset 0 (READ_CONF / WRITE_CONF move `offset +
len` bytes), so a read is consistent by itself. virtio-ccw has no generation counter: as the
spec suggests, the driver keeps one, bumped whenever a read shows bytes that differ from what
it read before and on every configuration-change interrupt; `cread` re-reads when it moved.

Interrupts. The device sets indicator bits in guest memory and interrupts; the driver learns
which queue fired from the bits, never from a register:
- adapter (two-stage) indicators, the default as in Linux: bits in an interrupt vector shared
  by devices (an airq area, 256 bits here), one summary byte per area, the adapter interrupt
  of ISC 3; no exit at all per interrupt;
- classic indicators (the fallback, or `use_airq=False`): one 64-bit word per device and the
  subchannel's I/O interrupt, whose status the handler fetches with TSCH (one exit);
- configuration changes: always the classic way, bit 0 of a second word.

Clearing indicators without losing one. Linux clears each bit with an atomic
test-and-clear; Python has no atomic read-modify-write on shared memory. The driver therefore
reads a whole 64-bit word (one native load) and, if it is not zero, stores 0 (one native
store). A bit the device set between that load and that store is lost from memory, but the
device set it only after it had put the buffers in the used ring, and the driver takes a full
barrier after its store: every queue whose bit lies in a word the driver stored to is checked
for used buffers (`more_used`) even if its bit was not seen, and served if it has some. A bit
can thus be erased but its work cannot be missed. The adapter handler follows the spec's order:
scan, clear the summary indicator, full barrier, scan again; the device reads the summary only
after a full barrier behind its bit store, so either the second scan sees the bit or the
device raises a new interrupt. What a re-check recovers is counted (`recovered`).
"""

import errno
import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any

from vmsim.abi import ccw as C
from vmsim.abi import features as F
from vmsim.guest.css import (
    DEFAULT_ISC,
    EOPNOTSUPP,
    Airq,
    AirqIv,
    ChannelSubsystem,
    Subchannel,
    dma_alloc_low,
)
from vmsim.guest.memory import DmaMemory, OutOfGuestMemory
from vmsim.guest.virtio.core import VirtioDevice, virtio_config_changed
from vmsim.guest.virtio.virtqueue import Virtqueue, vring_transport_features
from vmsim.guest.virtio.vring import vring_create_virtqueue, vring_del_virtqueue
from vmsim.machine.barrier import full_barrier

log = logging.getLogger("vmsim.guest")

VIRTIO_IV_BITS = 256          # Linux: a cache line of bits (2048 on s390); vmsim: 4 words
MAX_AIRQ_AREAS = 20
VIRTIO_AIRQ_ISC = DEFAULT_ISC


def classic_mask(bit: int) -> int:
    """Bit `bit` of a big-endian 64-bit indicator word as a native little-endian load sees
    it (byte 7 - bit // 8)."""
    return 1 << (8 * (7 - bit // 8) + bit % 8)


CONFIG_CHANGE_MASK = classic_mask(C.CONFIG_CHANGE_BIT)


class CcwProbeError(Exception):
    """The subchannel does not hold a usable virtio-ccw device."""


def _errname(err: int) -> str:
    return errno.errorcode.get(-err, str(err))


# ---- adapter interrupt areas (the driver's airq_areas) -------------------------------------------
class AirqInfo:
    """struct airq_info: one interrupt vector whose bits queues of several devices use, its
    summary indicator, and its adapter-interrupt registration."""

    def __init__(self, css: ChannelSubsystem, index: int, summary: memoryview,
                 summary_gpa: int) -> None:
        self.lock = threading.Lock()
        self.index = index
        self.iv = AirqIv(css.dma, VIRTIO_IV_BITS)
        self.summary = summary
        self.summary_gpa = summary_gpa
        self.airq = Airq(self.handler, VIRTIO_AIRQ_ISC, summary)
        self.css = css
        self.n_handled = 0
        self.n_recovered = 0
        rc = css.register_adapter_interrupt(self.airq)
        if rc:
            self.iv.release()
            raise OSError(-rc, "cannot register the adapter interrupt")

    def handler(self) -> None:
        """virtio_airq_handler: scan, clear the summary indicator, barrier, scan again."""
        with self.lock:
            self.n_handled += 1
            self._scan()
            self.summary[0] = 0
            full_barrier()
            self._scan()

    def _scan(self) -> None:
        words = self.iv.words
        hits = []
        for i, users in enumerate(self.iv.word_users):
            w = words[i]
            if w:
                words[i] = 0          # the "exchange": one native store of the whole word
                if users:
                    hits.append((w, users))
        if not hits:
            return
        full_barrier()                # the clearing store before the used rings are read
        seen = set()
        for w, users in hits:
            for mask, _bit, vq in users:
                if w & mask:
                    t = vq.vdev.transport
                    if t not in seen:
                        seen.add(t)
                        t.interrupts += 1
                    vq.vring_interrupt()
                elif vq.callbacks_enabled() and vq.more_used():
                    # its bit may have been set between our load and our store
                    self.n_recovered += 1
                    vq.vdev.transport.recovered += 1
                    vq.vring_interrupt()

    def alloc(self, vqs: Sequence[Virtqueue]) -> int:
        with self.lock:
            first = self.iv.alloc(len(vqs))
            if first >= 0:
                for j, vq in enumerate(vqs):
                    self.iv.set_ptr(first + j, vq)
            return first

    def drop(self, first: int, n: int) -> None:
        with self.lock:
            self.iv.free(first, n)

    def close(self) -> None:
        self.css.unregister_adapter_interrupt(self.airq)
        self.iv.release()
        self.summary.release()


class AirqAreas:
    """The driver-wide part of virtio_ccw: the summary indicators (one byte per area) and
    the areas, made on first use, per channel subsystem."""

    def __init__(self, css: ChannelSubsystem) -> None:
        self.css = css
        self.lock = threading.Lock()
        self.summary_gpa, self.summary = dma_alloc_low(css.dma, MAX_AIRQ_AREAS, 8)
        self.areas: list[AirqInfo | None] = [None] * MAX_AIRQ_AREAS
        self.use_airq = True          # virtio_ccw_use_airq: off once a host refuses them

    @classmethod
    def of(cls, css: ChannelSubsystem) -> "AirqAreas":
        areas = css.drvdata.get("virtio_ccw")
        if areas is None:
            areas = css.drvdata["virtio_ccw"] = cls(css)
        return areas

    def get_airq_indicator(self, vqs: Sequence[Virtqueue]) -> tuple[AirqInfo, int] | None:
        """Bits for `vqs` in the first area with room: (area, first bit), or None."""
        for i in range(MAX_AIRQ_AREAS):
            with self.lock:
                info = self.areas[i]
                if info is None:
                    try:
                        info = self.areas[i] = AirqInfo(self.css, i,
                                                        self.summary[i:i + 1],
                                                        self.summary_gpa + i)
                    except (OSError, OutOfGuestMemory) as e:
                        log.info("virtio_ccw: no adapter interrupt area: %s", e)
                        return None
            first = info.alloc(vqs)
            if first >= 0:
                return info, first
        return None

    def close(self) -> None:
        for info in self.areas:
            if info is not None:
                info.close()
        self.areas = [None] * MAX_AIRQ_AREAS
        self.summary.release()
        self.css.dma.free(self.summary_gpa)
        self.css.drvdata.pop("virtio_ccw", None)


# ---- the transport -------------------------------------------------------------------------------
class VirtioCcw:
    """struct virtio_ccw_device: the config ops of one virtio-ccw device."""

    transport_name = "ccw"
    DATA_SIZE = C.VIRTIO_CCW_CONFIG_SIZE

    def __init__(self, css: ChannelSubsystem, sch: Subchannel, dma: DmaMemory,
                 queue_stats: Callable[[int], memoryview | None],
                 use_airq: bool | None = None) -> None:
        self.css = css
        self.sch = sch
        self.dma = dma
        self.platform = css.platform
        self.queue_stats = queue_stats
        try:
            self.airq_areas = AirqAreas.of(css)
            # one CCW, the communication blocks, the indicators and the status: below 2 GiB
            self.ccw_gpa, self.ccw = dma_alloc_low(dma, 16, 8)
            self.data_gpa, self.data = dma_alloc_low(dma, self.DATA_SIZE, 8)
            self.ind_gpa, self.ind_area = dma_alloc_low(dma, 16, 8)
        except OutOfGuestMemory as e:
            raise CcwProbeError(str(e)) from None
        self.is_thinint = self.airq_areas.use_airq if use_airq is None else use_airq
        self.irq_mode = ""
        self.revision = 0
        self.vdev: VirtioDevice | None = None
        self.io_lock = threading.RLock()        # serialises channel programs (vcdev->io_lock)
        self.vqs_lock = threading.Lock()        # the queue list, against the handlers
        self.ind2_gpa = self.ind_gpa + 8
        self.ind = self.ind_area[0:8].cast("Q")
        self.ind2 = self.ind_area[8:16].cast("Q")
        self.indicators_registered = False
        self.airq_info: AirqInfo | None = None
        self.airq_first = 0
        self.airq_n = 0
        self._status = 0
        self._config = bytearray()
        self._generation = 0
        self._cookies: dict[int, int] = {}
        self.interrupts = 0
        self.config_interrupts = 0
        self.safety_polls = 0
        self.recovered = 0
        self.io_errors = 0
        sch.on_interrupt = self._interrupt
        sch.poll_hook = self._safety_poll

    # ---- onlining --------------------------------------------------------------------------------
    def probe(self, name: str, dev_stats: memoryview | None) -> VirtioDevice:
        """virtio_ccw_online: enable the subchannel, SENSE ID, set the revision."""
        rc = self.sch.enable()
        if rc:
            raise CcwProbeError(f"subchannel {self.sch.bus_id} cannot be enabled "
                                f"({_errname(rc)})")
        rc, cu_type, cu_model = self.sch.sense_id()
        if rc:
            raise CcwProbeError(f"SENSE ID failed ({_errname(rc)})")
        if cu_type != C.VIRTIO_CCW_CU_TYPE:
            raise CcwProbeError(f"control unit type 0x{cu_type:04x} is not virtio-ccw")
        if cu_model == 0:
            raise CcwProbeError("control unit model 0: no virtio device")
        rc = self._set_transport_rev()
        if rc:
            raise CcwProbeError(f"SET_VIRTIO_REV failed ({_errname(rc)})")
        vdev = VirtioDevice(name, cu_model, cu_type, self, dev_stats)
        vdev.transport = self
        self.vdev = vdev
        return vdev

    def _set_transport_rev(self) -> int:
        """Try the highest revision first and go down on a command reject. Revision 0 would
        mean a legacy device (native-endian rings): not implemented by this driver."""
        rev = C.VIRTIO_CCW_REV_MAX
        while rev >= 1:
            err = self._io(C.CCW_CMD_SET_VIRTIO_REV, C.REV_INFO.size, C.REV_INFO.pack(rev, 0))
            if err == 0:
                self.revision = rev
                return 0
            if err != EOPNOTSUPP:
                return err
            rev -= 1
        return -errno.EOPNOTSUPP

    # ---- channel programs ------------------------------------------------------------------------
    def _io(self, cmd: int, count: int, payload: bytes = b"", flags: int = 0,
            cda: int | None = None) -> int:
        """ccw_io_helper: one CCW, its communication block in the data area."""
        with self.io_lock:
            if payload:
                self.data[:len(payload)] = payload
            self.ccw[0:C.CCW_SIZE] = C.CCW1.pack(cmd, flags, count,
                                                 self.data_gpa if cda is None else cda)
            err, _irb = self.sch.run(self.ccw_gpa, intparm=cmd)
            if err and err != EOPNOTSUPP:
                self.io_errors += 1
                log.info("%s: %s failed: %s", self.sch.bus_id,
                         C.COMMAND_NAMES.get(cmd, hex(cmd)), _errname(err))
            return err

    def _io_read(self, cmd: int, count: int, payload: bytes = b"",
                 flags: int = 0) -> tuple[int, bytes]:
        with self.io_lock:
            err = self._io(cmd, count, payload, flags)
            return err, b"" if err else bytes(self.data[:count])

    # ---- config ops ------------------------------------------------------------------------------
    def get_features(self, vdev: VirtioDevice) -> int:
        features = 0
        for index in (0, 1) if self.revision >= 1 else (0,):
            err, data = self._io_read(C.CCW_CMD_READ_FEAT, C.FEATURE_DESC.size,
                                      C.FEATURE_DESC.pack(0, index))
            if err:
                break
            word, _ = C.FEATURE_DESC.unpack(data)
            features |= word << 32 * index
        return features

    def finalize_features(self, vdev: VirtioDevice) -> int:
        if self.revision >= 1 and not vdev.has_feature(F.VIRTIO_F_VERSION_1):
            vdev.probe_error = ("virtio: device uses revision 1 but does not have "
                                "VIRTIO_F_VERSION_1")
            return -errno.EINVAL
        vring_transport_features(vdev)
        # ccw_transport_features: virtio-ccw has no command to reset one queue
        vdev.clear_bit(F.VIRTIO_F_RING_RESET)
        for index in (0, 1) if self.revision >= 1 else (0,):
            word = vdev.features >> 32 * index & 0xFFFFFFFF
            err = self._io(C.CCW_CMD_WRITE_FEAT, C.FEATURE_DESC.size,
                           C.FEATURE_DESC.pack(word, index))
            if err:
                return err
        return 0

    def get(self, vdev: VirtioDevice, offset: int, length: int) -> bytes:
        """virtio_ccw_get_config: READ_CONF of bytes 0 .. offset + length."""
        n = offset + length
        if offset < 0 or n > self.DATA_SIZE:
            log.warning("%s: config read of %d bytes at %d", vdev.name, length, offset)
            return bytes(length)
        with self.io_lock:
            err, data = self._io_read(C.CCW_CMD_READ_CONF, n)
            if err:
                return bytes(length)
            self._remember_config(data)
        return data[offset:]

    def _remember_config(self, data: bytes) -> None:
        """Bump the driver's generation count when the device's config differs from what
        was read before."""
        known = min(len(self._config), len(data))
        if self._config[:known] != data[:known]:
            self._generation += 1
        self._config[:len(data)] = data

    def set(self, vdev: VirtioDevice, offset: int, data: bytes) -> None:
        """virtio_ccw_set_config: WRITE_CONF of bytes 0 .. offset + len, the bytes before
        `offset` as last read (read first if not known)."""
        n = offset + len(data)
        if offset < 0 or n > self.DATA_SIZE:
            log.warning("%s: config write of %d bytes at %d", vdev.name, len(data), offset)
            return
        with self.io_lock:
            if len(self._config) < offset:
                self.get(vdev, 0, offset)
            buf = bytes(self._config[:offset]).ljust(offset, b"\0") + bytes(data)
            self._config[offset:n] = data
            self._io(C.CCW_CMD_WRITE_CONF, n, buf)

    def generation(self, vdev: VirtioDevice) -> int:
        return self._generation

    def get_status(self, vdev: VirtioDevice) -> int:
        """READ_STATUS from revision 2 on; before it, the status last written."""
        if self.revision < 2:
            return self._status
        err, data = self._io_read(C.CCW_CMD_READ_STATUS, C.STATUS_SIZE)
        if err:
            return self._status     # the old status, as Linux returns on failure
        self._status = data[0]
        return self._status

    def set_status(self, vdev: VirtioDevice, status: int) -> None:
        """WRITE_STATUS; a command reject means the device kept its old status."""
        err = self._io(C.CCW_CMD_WRITE_STATUS, C.STATUS_SIZE, bytes((status & 0xFF,)))
        if not err:
            self._status = status & 0xFF

    def reset(self, vdev: VirtioDevice) -> None:
        self._status = 0
        self._io(C.CCW_CMD_VDEV_RESET, 0, cda=0)

    def bus_name(self, vdev: VirtioDevice) -> str:
        return self.sch.bus_id

    def synchronize_cbs(self, vdev: VirtioDevice) -> None:
        self.css.irqc.synchronize_irq()

    # ---- queues ----------------------------------------------------------------------------------
    def _notify(self, vq: Virtqueue) -> bool:
        """virtio_ccw_kvm_notify: diagnose 0x500 with the subchannel id, the queue index and
        the cookie the host returned last time (an ioeventfd: no exit)."""
        cookie = self.platform.hypercall_notify(self.sch.schid, vq.index,
                                                self._cookies.get(vq.index, 0))
        if not isinstance(cookie, int) or cookie < 0:
            return False
        self._cookies[vq.index] = cookie
        return True

    def _notify_with_data(self, vq: Virtqueue) -> bool:
        """With VIRTIO_F_NOTIFICATION_DATA GPR3 carries the queue index and the next
        position; such a value matches no ioeventfd, so the notify traps."""
        cookie = self.platform.hypercall_notify(self.sch.schid, vq.notification_data(),
                                                self._cookies.get(vq.index, 0))
        if not isinstance(cookie, int) or cookie < 0:
            return False
        self._cookies[vq.index] = cookie
        return True

    def find_vqs(self, vdev: VirtioDevice, nvqs: int,
                 callbacks: Sequence[Callable[[Virtqueue], None] | None],
                 names: Sequence[str], sizes: Sequence[int] | None = None) -> list[Virtqueue]:
        """virtio_ccw_find_vqs: each queue (READ_VQ_CONF, then SET_VQ), then the queue
        indicators (adapter, falling back to classic), then the config indicator."""
        try:
            for i in range(nvqs):
                want = sizes[i] if sizes else 0
                vq = self._setup_vq(vdev, i, callbacks[i], names[i], want)
                with self.vqs_lock:
                    vdev.vqs.append(vq)
            err = -errno.ENOSPC
            if self.is_thinint:
                err = self._register_adapter_ind(vdev.vqs)
                if err:
                    self.is_thinint = False   # no error: fall back to classic indicators
            if not self.is_thinint:
                self.ind[0] = 0
                err = self._io(C.CCW_CMD_SET_IND, C.INDICATOR_ADDR.size,
                               C.INDICATOR_ADDR.pack(self.ind_gpa))
                if err:
                    raise OSError(-err, f"{vdev.name}: SET_IND failed")
            self.indicators_registered = True
            self.irq_mode = "adapter" if self.is_thinint else "classic"
            self.ind2[0] = 0
            err = self._io(C.CCW_CMD_SET_CONF_IND, C.INDICATOR_ADDR.size,
                           C.INDICATOR_ADDR.pack(self.ind2_gpa))
            if err:
                raise OSError(-err, f"{vdev.name}: SET_CONF_IND failed")
        except Exception:
            self.del_vqs(vdev)
            raise
        return vdev.vqs

    def _setup_vq(self, vdev: VirtioDevice, index: int,
                  callback: Callable[[Virtqueue], None] | None, name: str,
                  want: int) -> Virtqueue:
        err, data = self._io_read(C.CCW_CMD_READ_VQ_CONF, C.VQ_CONFIG_BLOCK.size,
                                  C.VQ_CONFIG_BLOCK.pack(index, 0))
        if err:
            raise OSError(-err, f"READ_VQ_CONF of queue {index} failed")
        _, num_max = C.VQ_CONFIG_BLOCK.unpack(data)
        if num_max == 0:
            raise OSError(errno.ENOENT, f"queue {index} not available")
        num = min(num_max, want) if want else num_max
        notify = (self._notify_with_data if vdev.has_feature(F.VIRTIO_F_NOTIFICATION_DATA)
                  else self._notify)
        while True:
            # may_reduce_num (revision > 0): halve the ring until it can be allocated
            try:
                vq = vring_create_virtqueue(index, num, C.VIRTIO_CCW_RING_ALIGN, self.dma,
                                            vdev.features, notify, callback, name,
                                            self.queue_stats(index))
                break
            except OutOfGuestMemory:
                if num <= 1:
                    raise
                num //= 2
        vq.num_max = num_max
        vq.vdev = vdev
        err = self._io(C.CCW_CMD_SET_VQ, C.VQ_INFO_BLOCK.size,
                       C.VQ_INFO_BLOCK.pack(vq.desc_addr, 0, index, vq.get_vring_size(),
                                            vq.avail_addr, vq.used_addr))
        if err:
            vring_del_virtqueue(vq)
            raise OSError(-err, f"SET_VQ of queue {index} failed")
        self._cookies[index] = 0
        return vq

    def _register_adapter_ind(self, vqs: Sequence[Virtqueue]) -> int:
        """virtio_ccw_register_adapter_ind: bits in an airq area, then SET_IND_ADAPTER."""
        got = self.airq_areas.get_airq_indicator(vqs)
        if got is None:
            return -errno.ENOSPC
        info, first = got
        err = self._io(C.CCW_CMD_SET_IND_ADAPTER, C.THININT_AREA.size,
                       C.THININT_AREA.pack(info.summary_gpa, info.iv.gpa, first,
                                           VIRTIO_AIRQ_ISC), flags=C.CCW_FLAG_SLI)
        if err:
            if err == EOPNOTSUPP:
                # the host does not support adapter interrupts for virtio-ccw: stop trying
                self.airq_areas.use_airq = False
                log.info("virtio_ccw: adapter interrupts unsupported on host")
            info.drop(first, len(vqs))
            return err
        self.airq_info, self.airq_first, self.airq_n = info, first, len(vqs)
        return 0

    def _drop_indicator(self) -> None:
        """virtio_ccw_drop_indicator: deregister the queue indicators from the host."""
        if not self.indicators_registered:
            return
        if self.is_thinint and self.airq_info is not None:
            info = self.airq_info
            err = self._io(C.CCW_CMD_SET_IND_ADAPTER, C.THININT_AREA.size,
                           C.THININT_AREA.pack(info.summary_gpa, 0, 0, VIRTIO_AIRQ_ISC),
                           flags=C.CCW_FLAG_SLI)
            if err and err != -errno.ENODEV:
                log.info("%s: failed to deregister indicators (%s)", self.sch.bus_id,
                         _errname(err))
            info.drop(self.airq_first, self.airq_n)
            self.airq_info = None
        else:
            self._io(C.CCW_CMD_SET_IND, C.INDICATOR_ADDR.size, C.INDICATOR_ADDR.pack(0))
        self.ind[0] = 0
        self.indicators_registered = False

    def del_vqs(self, vdev: VirtioDevice) -> None:
        """virtio_ccw_del_vqs: deregister the indicators, release each queue from the host
        (SET_VQ with no rings), free the rings."""
        self._drop_indicator()
        with self.vqs_lock:
            vqs, vdev.vqs = vdev.vqs, []
        for vq in vqs:
            err = self._io(C.CCW_CMD_SET_VQ, C.VQ_INFO_BLOCK.size,
                           C.VQ_INFO_BLOCK.pack(0, 0, vq.index, 0, 0, 0))
            if err and err != -errno.ENODEV:
                log.warning("%s: error %s while deleting queue %d", vdev.name,
                            _errname(err), vq.index)
            self._cookies.pop(vq.index, None)
        # A handler that took the list before it was emptied holds the lock while it uses it.
        with self.vqs_lock:
            for vq in vqs:
                vq.publish_stats()
                vring_del_virtqueue(vq)

    # ---- interrupts ------------------------------------------------------------------------------
    def _interrupt(self) -> bool:
        """virtio_ccw_int_handler's indicator part, after the subchannel's status was taken:
        the classic queue indicators (if they are in use), then the configuration-change
        indicator (always classic)."""
        vdev = self.vdev
        if vdev is None:
            return False
        handled = False
        if self.indicators_registered and not self.is_thinint:
            w = self.ind[0]
            if w:
                self.ind[0] = 0
                full_barrier()
                self.interrupts += 1
                handled = True
                with self.vqs_lock:
                    for vq in vdev.vqs:
                        if w & classic_mask(vq.index):
                            vq.vring_interrupt()
                        elif vq.callbacks_enabled() and vq.more_used():
                            self.recovered += 1   # its bit may have been erased by our store
                            vq.vring_interrupt()
        if self.ind2[0] & CONFIG_CHANGE_MASK:
            self.ind2[0] = 0
            full_barrier()
            self.config_interrupts += 1
            self._generation += 1
            virtio_config_changed(vdev)
            handled = True
        return handled

    def _safety_poll(self) -> None:
        """Run by the interrupt thread after a long wait without interrupts: a queue whose
        driver waits for an interrupt but whose used ring moved lost a wake-up."""
        vdev = self.vdev
        if vdev is None:
            return
        with self.vqs_lock:
            for vq in vdev.vqs:
                if vq.callback is not None and vq.callbacks_enabled() and vq.more_used():
                    self.safety_polls += 1
                    vq.vring_interrupt()

    def describe(self) -> dict[str, Any]:
        return {"bus_id": self.sch.bus_id, "revision": self.revision,
                "irq_mode": self.irq_mode, "interrupts": self.interrupts,
                "config_interrupts": self.config_interrupts, "recovered": self.recovered,
                "io_errors": self.io_errors, "polled_status": self.sch.n_polls}

    def close(self) -> None:
        """Free the subchannel's interrupt line and this device's areas."""
        self.sch.close()
        self.ind.release()
        self.ind2.release()
        for view, gpa in ((self.ccw, self.ccw_gpa), (self.data, self.data_gpa),
                          (self.ind_area, self.ind_gpa)):
            view.release()
            self.dma.free(gpa)
