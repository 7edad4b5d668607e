"""The guest's virtio core, virtio-mmio transport driver and virtio_blk driver against the
real host emulation (MmioTransport + BlkDevice), in one process.

The two sides are wired as a run wires them, minus the process boundary: guest RAM is one
mapping both sides use (GuestRAM / GuestMemory), register accesses trap over a SEQPACKET
channel pair as msgpack messages, kicks are the queues' ioeventfds bound in the guest's
Platform, interrupts the transport's irqfd taken by the guest's IrqController thread.

The host side is TestHost below: one thread, like vmsim.host's event loop, that answers traps
and serves the device's ready queues when kicked (and on a short poll as a safety net), using
the device's own notification protocol (enable_notify after each pass).
"""

import errno
import mmap
import queue
import select
import threading
import time

import pytest

from vmsim.abi import blk as B
from vmsim.abi import features as F
from vmsim.abi import ids
from vmsim.abi import mmio as M
from vmsim.abi import status as S
from vmsim.guest.drivers.blk import BlkDriver, VirtioBlk
from vmsim.guest.memory import DmaMemory, GuestRAM
from vmsim.guest.platform import IrqController, Platform
from vmsim.guest.virtio.core import VirtioBus, VirtioDriver
from vmsim.guest.virtio.mmio import MmioProbeError, VirtioMmio
from vmsim.host.devices.blk.backend import MemoryBackend
from vmsim.host.devices.blk.device import BlkDevice
from vmsim.host.memory import GuestMemory
from vmsim.host.virtio.device import VirtioDevice as HostVirtioDevice
from vmsim.host.virtio.mmio import MmioTransport
from vmsim.machine.eventfd import EventFd
from vmsim.machine.wire import Channel, ChannelClosed

pytestmark = pytest.mark.timeout(30)

RAM_BASE = 0x4000_0000
RAM_SIZE = 4 << 20
MMIO_BASE = 0x0A00_0000
IRQ = 32
DISK_SIZE = 1 << 20
SERIAL = "guest-core-disk"

ACK, DRV, FOK, DOK = S.ACKNOWLEDGE, S.DRIVER, S.FEATURES_OK, S.DRIVER_OK
V1 = F.bit(F.VIRTIO_F_VERSION_1)
EVENT_IDX = F.bit(F.VIRTIO_RING_F_EVENT_IDX)
INDIRECT = F.bit(F.VIRTIO_RING_F_INDIRECT_DESC)
# BlkDevice's default offer, and what virtio_blk + the split ring accept of it.
BLK_DEFAULT = (V1 | INDIRECT | EVENT_IDX | F.bit(F.VIRTIO_F_RING_RESET)
               | F.bit(B.VIRTIO_BLK_F_SEG_MAX) | F.bit(B.VIRTIO_BLK_F_BLK_SIZE)
               | F.bit(B.VIRTIO_BLK_F_FLUSH) | F.bit(B.VIRTIO_BLK_F_TOPOLOGY))


def wait_for(cond, timeout: float = 5.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.002)


# ---- the host side -------------------------------------------------------------------------------
class TestHost:
    """One host thread: trapped register accesses, kicks, and queue service."""

    __test__ = False

    def __init__(self, transports: list[MmioTransport]) -> None:
        self.transports = transports
        self.by_base = {t.base: t for t in transports}
        self.guest_ch, self.host_ch = Channel.pair()
        self.status_writes: dict[int, list[int]] = {t.base: [] for t in transports}
        self.serve_queues = True
        self.unassigned = 0
        self.error: BaseException | None = None
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = EventFd()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="test-host", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop = True
        self._wake.signal()
        self._thread.join(timeout=5)
        assert not self._thread.is_alive(), "host thread did not stop"
        self.guest_ch.close()
        self.host_ch.close()
        self._wake.close()

    def call(self, fn, *args):
        """Run fn(*args) on the host thread (devices are single-threaded, as in vmsim.host)."""
        done = threading.Event()
        box: dict = {}

        def job() -> None:
            try:
                box["result"] = fn(*args)
            except BaseException as e:  # handed to the caller
                box["error"] = e
            finally:
                done.set()

        self._jobs.put(job)
        self._wake.signal()
        assert done.wait(5), "host thread did not run the job"
        if "error" in box:
            raise box["error"]
        return box.get("result")

    def set_serving(self, on: bool) -> None:
        self.call(setattr, self, "serve_queues", on)

    # ---- the loop --------------------------------------------------------------------------------
    def _run(self) -> None:
        ep = select.epoll()
        kicks = {}
        devs = {}
        try:
            ep.register(self.host_ch.fileno(), select.EPOLLIN)
            ep.register(self._wake.fileno(), select.EPOLLIN)
            for t in self.transports:
                for q in t.dev.queues:
                    ep.register(q.kick.fileno(), select.EPOLLIN)
                    kicks[q.kick.fileno()] = q
                    devs[q.kick.fileno()] = t.dev
            while not self._stop:
                for fd, _ in ep.poll(0.01):
                    if fd == self.host_ch.fileno():
                        self._trap()
                    elif fd == self._wake.fileno():
                        self._wake.consume()
                        while not self._jobs.empty():
                            self._jobs.get()()
                    else:
                        q = kicks[fd]
                        q.kick.consume()
                        if q.ring is not None:
                            q.ring.n_notifies += 1
                            devs[fd].kicked(q)
                if self.serve_queues:
                    self._serve()
        except BaseException as e:
            self.error = e
        finally:
            ep.close()

    def _trap(self) -> None:
        try:
            msg, fds = self.host_ch.recv()
        except ChannelClosed:
            self._stop = True
            return
        assert not fds
        op, addr, width = msg[0], msg[1], msg[2]
        base = addr & ~(M.REGION_SIZE - 1)
        t = self.by_base.get(base)
        if op == "r":
            if t is None:
                self.unassigned += 1
                reply = (1 << 8 * width) - 1          # nothing decodes the address: all ones
            else:
                reply = t.read(addr - base, width)
        else:
            assert op == "w"
            reply = None
            if t is None:
                self.unassigned += 1
            else:
                if addr - base == M.STATUS and width == 4:
                    self.status_writes[base].append(msg[3])
                t.write(addr - base, width, msg[3])
                for qi in t.pending_kicks:           # served below by polling the rings
                    if qi < len(t.dev.queues):
                        t.dev.kicked(t.dev.queues[qi])
                t.pending_kicks.clear()
        self.host_ch.send(reply)

    def _serve(self) -> None:
        for t in self.transports:
            dev = t.dev
            for q in dev.live_queues():
                ring = q.ring
                # (posted receive buffers alone are no work: wants_service)
                while (dev.wants_service(q) and ring.has_work() and not q.broken
                       and not dev.broken):
                    ring.disable_notify()
                    dev.service(q)
                    if not dev.wants_service(q):
                        break           # e.g. a receive queue waiting for buffers: its kick
                    # Ask for kicks again; keep going if buffers slipped in meanwhile.
                    if not ring.enable_notify():
                        break


# ---- one machine: guest RAM, a device on its transport, the guest's view -------------------------
class Machine:
    def __init__(self, dev_kw: dict | None = None, extra=None, make_dev=None) -> None:
        """A blk device (dev_kw: BlkDevice arguments to change), or make_dev(guest memory)."""
        self.mm = mmap.mmap(-1, RAM_SIZE)
        self.hmem = GuestMemory(self.mm, RAM_BASE)
        self.ram = GuestRAM(self.mm, RAM_BASE)
        self.dma = DmaMemory(self.ram)
        if make_dev is not None:
            self.dev = make_dev(self.hmem)
        else:
            kw = dict(name="vda", mem=self.hmem, backend=MemoryBackend(DISK_SIZE),
                      readonly=False, num_queues=1, queue_size=16, offer=0, withhold=0,
                      blk_size=512, serial=SERIAL, dev_stats=None, queue_stats=[None],
                      refuse_features_ok=False)
            kw.update(dev_kw or {})
            kw["queue_stats"] = [None] * kw["num_queues"]
            self.dev = BlkDevice(**kw)
        self.t = MmioTransport(self.dev, MMIO_BASE, IRQ)
        # more register windows (extra(mem) -> transports), decoded by the same host
        self.transports = [self.t, *(extra(self.hmem) if extra else [])]
        self.host = TestHost(self.transports)
        self.host.start()
        self.platform = Platform(self.host.guest_ch)
        self.irqc = IrqController()
        for t in self.transports:
            for space, addr, data, efd in t.ioeventfds():
                self.platform.bind_ioeventfd(addr, data, efd, space)
            self.irqc.add_line(t.irq, t.irqfd)
        self.irqc.start()
        self.bus = VirtioBus()
        self.vm = VirtioMmio(self.platform, self.irqc, self.dma, MMIO_BASE, IRQ,
                             queue_stats=lambda i: None)
        self.vdev = None

    @property
    def status_writes(self) -> list[int]:
        return self.host.status_writes[MMIO_BASE]

    def host_status(self) -> int:
        return self.host.call(lambda: self.dev.status)

    def boot(self, driver: VirtioDriver | None = None) -> int:
        """Probe the MMIO window, register a driver (virtio_blk by default), the device."""
        self.vdev = self.vm.probe("vda", None)
        self.bus.register_driver(driver if driver is not None else BlkDriver(self.dma))
        return self.bus.register_device(self.vdev)

    @property
    def blk(self) -> VirtioBlk:
        assert self.vdev is not None and isinstance(self.vdev.priv, VirtioBlk)
        return self.vdev.priv

    def close(self) -> None:
        try:
            if self.vdev is not None and self.vdev.driver is not None:
                self.bus.unregister_device(self.vdev)
        finally:
            self.irqc.stop()
            self.host.stop()
            for t in self.transports:
                t.dev.close()
                t.close()
            self.ram.release()
            self.hmem.release()
            try:
                self.mm.close()
            except BufferError:
                pass     # a failed test's traceback still holds views; the GC unmaps it
        assert self.host.error is None, f"host thread failed: {self.host.error!r}"
        assert self.irqc.error is None, f"interrupt thread failed: {self.irqc.error!r}"


@pytest.fixture
def machine():
    made = []

    def _make(**kw) -> Machine:
        m = Machine(**kw)
        made.append(m)
        return m

    yield _make
    for m in made:
        m.close()


def _buf(m: Machine, data: bytes | int) -> tuple[int, memoryview]:
    if isinstance(data, int):
        return m.dma.alloc(data, 512)
    gpa, view = m.dma.alloc(len(data), 512)
    view[:] = data
    return gpa, view


def _pattern(n: int, seed: int) -> bytes:
    return bytes((i * 13 + seed) & 0xFF for i in range(n))


# ---- probe and negotiation -----------------------------------------------------------------------
def test_probe_status_sequence_and_features(machine):
    m = machine()
    assert m.boot() == 0
    vdev = m.vdev
    assert vdev.id == (ids.VIRTIO_ID_BLOCK, ids.VENDOR_QEMU)
    assert isinstance(vdev.driver, BlkDriver) and not vdev.failed
    # reset, ACKNOWLEDGE, DRIVER, FEATURES_OK, DRIVER_OK: each write the device saw
    assert m.status_writes == [0, ACK, ACK | DRV, ACK | DRV | FOK, ACK | DRV | FOK | DOK]
    assert m.host_status() == ACK | DRV | FOK | DOK
    assert vdev.device_features == m.dev.device_features == BLK_DEFAULT
    assert vdev.features == BLK_DEFAULT
    assert m.dev.driver_features == vdev.features
    vq = vdev.vqs[0]
    assert vq.event and vq.indirect
    q = m.dev.queues[0]
    assert q.ready and q.num == 16 == vq.num
    assert (q.desc, q.driver, q.device) == (vq.desc_addr, vq.avail_addr, vq.used_addr)
    assert m.dev.guest_errors == []


def test_negotiation_keeps_only_what_driver_and_ring_support(machine):
    offer = (F.bit(B.VIRTIO_BLK_F_GEOMETRY) | F.bit(B.VIRTIO_BLK_F_CONFIG_WCE)   # no driver
             | F.bit(F.VIRTIO_F_ORDER_PLATFORM) | F.bit(F.VIRTIO_F_SR_IOV)        # no ring
             | F.bit(F.VIRTIO_F_ADMIN_VQ))
    m = machine(dev_kw=dict(offer=offer))
    assert m.boot() == 0
    assert m.vdev.device_features == BLK_DEFAULT | offer
    assert m.vdev.features == BLK_DEFAULT
    assert m.dev.driver_features == BLK_DEFAULT
    assert m.host_status() == ACK | DRV | FOK | DOK


def test_driver_feature_not_offered_is_not_negotiated(machine):
    m = machine(dev_kw=dict(withhold=F.bit(B.VIRTIO_BLK_F_FLUSH) | F.bit(B.VIRTIO_BLK_F_SEG_MAX)))
    assert m.boot() == 0
    assert not m.vdev.has_feature(B.VIRTIO_BLK_F_FLUSH)
    assert not m.blk.has_flush
    assert m.blk.seg_max == 1        # without SEG_MAX a request has one data segment
    gpa, _ = _buf(m, 1024)
    assert m.blk.submit(B.VIRTIO_BLK_T_IN, 0, [(gpa, 512), (gpa + 512, 512)],
                        lambda s, a: None, None) == -errno.EINVAL
    # a flush the device does not offer is answered as unsupported
    assert m.blk.sync(B.VIRTIO_BLK_T_FLUSH, 0, []) == B.VIRTIO_BLK_S_UNSUPP


@pytest.mark.parametrize("withheld", [F.VIRTIO_RING_F_EVENT_IDX, F.VIRTIO_RING_F_INDIRECT_DESC])
def test_withheld_ring_feature_is_not_negotiated_and_io_works(machine, withheld):
    m = machine(dev_kw=dict(withhold=F.bit(withheld)))
    assert m.boot() == 0
    assert not m.vdev.has_feature(withheld)
    assert not m.dev.negotiated(withheld)
    assert m.vdev.features == BLK_DEFAULT & ~F.bit(withheld)
    vq = m.vdev.vqs[0]
    assert (vq.event, vq.indirect) == (withheld != F.VIRTIO_RING_F_EVENT_IDX,
                                       withheld != F.VIRTIO_RING_F_INDIRECT_DESC)
    # depth: a slot per descriptor with indirect descriptors, half the ring without
    assert m.blk.queue_depth == (8 if withheld == F.VIRTIO_RING_F_INDIRECT_DESC else 16)
    data = _pattern(4096, 3)
    gpa, view = _buf(m, data)
    for rnd in range(20):        # enough round trips for the kick / interrupt protocol
        assert m.blk.sync(B.VIRTIO_BLK_T_OUT, rnd * 8, [(gpa, 4096)]) == B.VIRTIO_BLK_S_OK
        view[:] = bytes(4096)
        assert m.blk.sync(B.VIRTIO_BLK_T_IN, rnd * 8, [(gpa, 4096)]) == B.VIRTIO_BLK_S_OK
        assert bytes(view) == data


def test_device_refusing_features_ok_fails_the_probe(machine):
    m = machine(dev_kw=dict(refuse_features_ok=True))
    assert m.boot() == -errno.ENODEV
    vdev = m.vdev
    assert vdev.driver is None and vdev.failed and vdev.priv is None
    assert "refuses features" in vdev.probe_error
    assert m.host_status() == ACK | DRV | S.FAILED
    assert m.status_writes == [0, ACK, ACK | DRV, ACK | DRV | FOK, ACK | DRV | S.FAILED]
    # nothing was set up, nothing is left allocated in guest RAM
    assert not m.dev.queues[0].ready and vdev.vqs == []
    assert m.dma.allocator.allocations == 0


def test_device_without_version_1_fails_the_probe(machine):
    m = machine(dev_kw=dict(withhold=V1))
    assert m.boot() == -errno.EINVAL
    assert m.vdev.driver is None and m.vdev.failed
    # version 2 MMIO requires VERSION_1: the driver never even tries FEATURES_OK
    assert m.status_writes == [0, ACK, ACK | DRV, ACK | DRV | S.FAILED]
    assert m.host_status() == ACK | DRV | S.FAILED


def test_invalid_block_size_fails_the_probe_and_frees_the_queue(machine):
    m = machine(dev_kw=dict(blk_size=1000))
    assert m.boot() == -errno.EINVAL
    assert m.vdev.driver is None and m.vdev.failed
    assert m.host_status() & S.FAILED
    assert not m.host_status() & DOK
    assert not m.dev.queues[0].ready and m.vdev.vqs == []
    assert m.dma.allocator.allocations == 0
    assert not m.vm.irq_requested


def test_wrong_magic_is_a_probe_error(machine):
    m = machine()
    empty = VirtioMmio(m.platform, m.irqc, m.dma, MMIO_BASE + 0x10000, IRQ + 1,
                       queue_stats=lambda i: None)
    with pytest.raises(MmioProbeError, match="magic"):
        empty.probe("nothing", None)
    assert m.host.unassigned >= 1


def test_device_id_zero_is_a_probe_error(machine):
    # an empty slot next to the disk: a device model with device ID 0 and no queues
    def empty_slot(mem):
        dev = HostVirtioDevice("empty", mem, 0, 16, 0, None, [])
        return [MmioTransport(dev, MMIO_BASE + M.REGION_SIZE, IRQ + 1)]

    m = machine(extra=empty_slot)
    empty = VirtioMmio(m.platform, m.irqc, m.dma, MMIO_BASE + M.REGION_SIZE, IRQ + 1,
                       queue_stats=lambda i: None)
    with pytest.raises(MmioProbeError, match="device ID 0"):
        empty.probe("empty", None)
    assert m.boot() == 0            # the disk next to it is unaffected


# ---- the blk driver ------------------------------------------------------------------------------
@pytest.mark.parametrize("kw, capacity, blk_size, seg_max, readonly", [
    (dict(), DISK_SIZE // 512, 512, 14, False),
    (dict(backend=MemoryBackend(3 << 20), blk_size=4096, queue_size=64), 6144, 4096, 62, False),
    (dict(readonly=True, queue_size=8), DISK_SIZE // 512, 512, 6, True),
])
def test_blk_driver_reads_config(machine, kw, capacity, blk_size, seg_max, readonly):
    m = machine(dev_kw=kw)
    assert m.boot() == 0
    blk = m.blk
    assert (blk.capacity, blk.blk_size, blk.seg_max, blk.readonly) == (
        capacity, blk_size, seg_max, readonly)
    assert blk.has_flush
    assert m.vdev.has_feature(B.VIRTIO_BLK_F_RO) == readonly
    if readonly:
        gpa, _ = _buf(m, 512)
        assert blk.submit(B.VIRTIO_BLK_T_OUT, 0, [(gpa, 512)], lambda s, a: None,
                          None) == -errno.EROFS
        assert blk.sync(B.VIRTIO_BLK_T_IN, 0, [(gpa, 512)]) == B.VIRTIO_BLK_S_OK


def test_blk_sync_round_trip_flush_and_get_id(machine):
    m = machine()
    assert m.boot() == 0
    blk = m.blk
    data = _pattern(8192, 7)
    gpa, view = _buf(m, data)
    assert blk.sync(B.VIRTIO_BLK_T_OUT, 100, [(gpa, 8192)]) == B.VIRTIO_BLK_S_OK
    out = bytearray(8192)
    m.dev.backend.read_into(100 * 512, [memoryview(out)])
    assert bytes(out) == data
    view[:] = bytes(8192)
    assert blk.sync(B.VIRTIO_BLK_T_IN, 100, [(gpa, 4096), (gpa + 4096, 4096)]) \
        == B.VIRTIO_BLK_S_OK
    assert bytes(view) == data
    assert blk.sync(B.VIRTIO_BLK_T_FLUSH, 0, []) == B.VIRTIO_BLK_S_OK
    id_gpa, id_view = _buf(m, 20)
    assert blk.sync(B.VIRTIO_BLK_T_GET_ID, 0, [(id_gpa, 20)]) == B.VIRTIO_BLK_S_OK
    assert bytes(id_view) == SERIAL.encode().ljust(20, b"\0")
    # past the end: the device's error reaches the caller as a status
    assert blk.sync(B.VIRTIO_BLK_T_IN, blk.capacity, [(gpa, 512)]) == B.VIRTIO_BLK_S_IOERR
    metrics = m.host.call(lambda: m.dev.metrics.as_dict())
    assert (metrics["writes"], metrics["reads"], metrics["flushes"], metrics["get_id"]) \
        == (1, 1, 1, 1)
    assert m.dev.errors == []


def test_blk_submit_with_callbacks_and_many_in_flight(machine):
    m = machine()
    assert m.boot() == 0
    blk = m.blk
    depth = blk.queue_depth
    assert depth == 16
    results: dict[int, int] = {}
    cond = threading.Condition()
    threads = set()

    def done(status: int, arg: int) -> None:
        threads.add(threading.current_thread().name)
        with cond:
            results[arg] = status
            cond.notify_all()

    bufs = [_buf(m, _pattern(4096, k)) for k in range(depth)]
    m.host.set_serving(False)            # hold the device so that the requests pile up
    with blk.plug():                     # one kick decision for the whole batch
        for k, (gpa, _) in enumerate(bufs):
            assert blk.write(k * 8, [(gpa, 4096)], done, k) == 0
    assert blk.in_flight() == depth
    gpa, _ = _buf(m, 512)
    assert blk.write(0, [(gpa, 512)], done, 99) == -errno.EAGAIN     # every slot busy
    assert m.vdev.vqs[0].n_kicks == 1
    m.host.set_serving(True)
    with cond:
        assert cond.wait_for(lambda: len(results) == depth, timeout=5)
    assert results == {k: B.VIRTIO_BLK_S_OK for k in range(depth)}
    assert threads == {"vmsim-irq"}      # completions run on the interrupt thread
    assert blk.in_flight() == 0
    # read everything back, again all at once
    results.clear()
    for _, view in bufs:
        view[:] = bytes(4096)
    for k, (gpa, _) in enumerate(bufs):
        assert blk.read(k * 8, [(gpa, 4096)], done, k) == 0
    with cond:
        assert cond.wait_for(lambda: len(results) == depth, timeout=5)
    assert set(results.values()) == {B.VIRTIO_BLK_S_OK}
    for k, (_, view) in enumerate(bufs):
        assert bytes(view) == _pattern(4096, k)


def test_blk_completion_callback_may_resubmit(machine):
    m = machine()
    assert m.boot() == 0
    blk = m.blk
    gpa, _ = _buf(m, 512)
    finished = threading.Event()
    statuses = []

    def again(status: int, n: int) -> None:
        statuses.append(status)
        if n < 50:
            assert blk.write(n, [(gpa, 512)], again, n + 1) == 0
        else:
            finished.set()

    assert blk.write(0, [(gpa, 512)], again, 1) == 0
    assert finished.wait(10)
    assert statuses == [B.VIRTIO_BLK_S_OK] * 50


def test_blk_multiqueue(machine):
    m = machine(dev_kw=dict(num_queues=2))
    assert m.boot() == 0
    assert m.vdev.has_feature(B.VIRTIO_BLK_F_MQ)
    assert len(m.blk.queues) == 2 and all(q.ready for q in m.dev.queues)
    got = []
    done = threading.Event()
    gpa, view = _buf(m, _pattern(512, 1))
    assert m.blk.write(3, [(gpa, 512)], lambda s, a: (got.append(s), done.set()), None,
                       qid=1) == 0
    assert done.wait(5) and got == [B.VIRTIO_BLK_S_OK]
    assert m.vdev.vqs[1].n_completed == 1 and m.vdev.vqs[0].n_completed == 0
    view[:] = bytes(512)
    assert m.blk.sync(B.VIRTIO_BLK_T_IN, 3, [(gpa, 512)]) == B.VIRTIO_BLK_S_OK
    assert bytes(view) == _pattern(512, 1)


# ---- configuration changes -----------------------------------------------------------------------
def test_config_change_reaches_the_driver(machine):
    m = machine()
    assert m.boot() == 0
    blk = m.blk
    assert blk.capacity == DISK_SIZE // 512
    seen = []
    changed = threading.Event()
    blk.capacity_listeners.append(lambda cap: (seen.append(cap), changed.set()))
    m.host.call(m.dev.resize, DISK_SIZE // 4)
    assert changed.wait(5), "no config-change interrupt reached the driver"
    assert seen == [DISK_SIZE // 4 // 512] and blk.capacity == DISK_SIZE // 4 // 512
    assert m.vdev.n_config_changed == 1 and m.vm.config_interrupts == 1
    assert m.host.call(lambda: m.dev.config_generation) == 1
    # the device now refuses what lies beyond the new end
    gpa, _ = _buf(m, 512)
    assert blk.sync(B.VIRTIO_BLK_T_IN, blk.capacity, [(gpa, 512)]) == B.VIRTIO_BLK_S_IOERR
    assert blk.sync(B.VIRTIO_BLK_T_IN, blk.capacity - 1, [(gpa, 512)]) == B.VIRTIO_BLK_S_OK


def test_device_error_breaks_the_guest_queues(machine):
    m = machine()
    assert m.boot() == 0
    m.host.call(m.dev.virtio_error, "injected by the test")
    wait_for(lambda: m.vdev.needs_reset, what="DEVICE_NEEDS_RESET to reach the guest")
    assert m.vdev.vqs[0].broken
    gpa, _ = _buf(m, 512)
    assert m.blk.submit(B.VIRTIO_BLK_T_IN, 0, [(gpa, 512)], lambda s, a: None,
                        None) == -errno.EIO
    assert m.host_status() & S.DEVICE_NEEDS_RESET


# ---- removal -------------------------------------------------------------------------------------
def test_unregister_resets_the_device_and_frees_the_queues(machine):
    m = machine()
    allocs_before = m.dma.allocator.allocations
    free_before = m.dma.allocator.free_bytes
    assert m.boot() == 0
    assert m.dma.allocator.allocations > allocs_before
    failed = []
    gpa, _ = _buf(m, 512)
    m.host.set_serving(False)                  # these never reach the device
    for k in range(3):
        assert m.blk.read(k, [(gpa, 512)], lambda s, a: failed.append((a, s)), k) == 0
    resets = m.host.call(lambda: m.dev.n_resets)
    n_writes = len(m.status_writes)
    m.bus.unregister_device(m.vdev)
    # the driver reset the device, then the core acknowledged it again (as Linux does)
    assert m.status_writes[n_writes:] == [0, ACK]
    assert m.host.call(lambda: m.dev.n_resets) == resets + 1
    assert m.host_status() == ACK
    assert sorted(failed) == [(k, B.VIRTIO_BLK_S_IOERR) for k in range(3)]
    q = m.dev.queues[0]
    assert not q.ready and q.ring is None
    assert m.vdev.driver is None and m.vdev.vqs == [] and m.vdev.features == 0
    assert m.vdev not in m.bus.devices
    assert not m.vm.irq_requested
    m.dma.free(gpa)
    assert m.dma.allocator.allocations == allocs_before
    assert m.dma.allocator.free_bytes == free_before


# ---- bus matching --------------------------------------------------------------------------------
class RecordingDriver(VirtioDriver):
    """A driver that binds without queues and records its probe."""

    name = "recorder"

    def __init__(self, id_table) -> None:
        self.id_table = id_table
        self.probed = []
        self.removed = []

    def probe(self, vdev) -> int:
        self.probed.append(vdev)
        return 0

    def remove(self, vdev) -> None:
        self.removed.append(vdev)
        vdev.reset_device()


ANY = ids.VIRTIO_DEV_ANY_ID


@pytest.mark.parametrize("id_table, matches", [
    (((ids.VIRTIO_ID_BLOCK, ANY),), True),
    (((ANY, ANY),), True),
    (((ANY, ids.VENDOR_QEMU),), True),
    (((ids.VIRTIO_ID_BLOCK, ids.VENDOR_QEMU),), True),
    (((ids.VIRTIO_ID_NET, ANY), (ids.VIRTIO_ID_BLOCK, ids.VENDOR_QEMU)), True),
    (((ids.VIRTIO_ID_BLOCK, 0x1AF4),), False),
    (((ids.VIRTIO_ID_NET, ANY),), False),
    (((ANY, 0x1AF4),), False),
    ((), False),
])
def test_bus_matches_by_id_table(machine, id_table, matches):
    m = machine()
    drv = RecordingDriver(id_table)
    assert m.boot(drv) == 0
    if matches:
        assert drv.probed == [m.vdev] and m.vdev.driver is drv
        # the probe did not set DRIVER_OK: the core did
        assert m.host_status() == ACK | DRV | FOK | DOK
        m.bus.unregister_device(m.vdev)
        assert drv.removed == [m.vdev] and m.host_status() == ACK
    else:
        assert drv.probed == [] and m.vdev.driver is None and not m.vdev.failed
        assert m.vdev.probe_error == "no driver matches"
        assert m.host_status() == ACK
        assert m.status_writes == [0, ACK]


def test_late_driver_binds_an_unbound_device(machine):
    m = machine()
    m.vdev = m.vm.probe("vda", None)
    m.bus.register_driver(RecordingDriver(((ids.VIRTIO_ID_NET, ANY),)))
    assert m.bus.register_device(m.vdev) == 0 and m.vdev.driver is None
    m.bus.register_driver(BlkDriver(m.dma))
    assert isinstance(m.vdev.driver, BlkDriver)
    assert m.host_status() == ACK | DRV | FOK | DOK
    gpa, _ = _buf(m, 512)
    assert m.blk.sync(B.VIRTIO_BLK_T_OUT, 1, [(gpa, 512)]) == B.VIRTIO_BLK_S_OK


def test_device_can_be_registered_again_after_removal(machine):
    m = machine()
    assert m.boot() == 0
    gpa, view = _buf(m, _pattern(512, 9))
    assert m.blk.sync(B.VIRTIO_BLK_T_OUT, 9, [(gpa, 512)]) == B.VIRTIO_BLK_S_OK
    m.bus.unregister_device(m.vdev)
    assert m.bus.register_device(m.vdev) == 0
    assert isinstance(m.vdev.driver, BlkDriver)
    assert m.host_status() == ACK | DRV | FOK | DOK
    view[:] = bytes(512)
    assert m.blk.sync(B.VIRTIO_BLK_T_IN, 9, [(gpa, 512)]) == B.VIRTIO_BLK_S_OK
    assert bytes(view) == _pattern(512, 9)


def test_scheduled_work_runs_after_the_interrupts_pending():
    """IrqController.schedule (NAPI's rescheduling): a handler that leaves work for later
    does not keep another line's interrupt waiting; its work runs after it, on the same
    thread, again and again while it reschedules itself."""
    irqc = IrqController()
    a, b = EventFd(), EventFd()
    irqc.add_line(1, a)
    irqc.add_line(2, b)
    order: list[str] = []
    rounds = [0]
    done = threading.Event()

    def busy() -> None:                 # a device that always has more to do, 50 times
        order.append("a-work")
        rounds[0] += 1
        if rounds[0] == 3:
            b.signal()                  # another device's interrupt arrives meanwhile
        if rounds[0] < 50:
            irqc.schedule(busy)
        else:
            done.set()

    def on_a(_irq: object) -> bool:
        order.append("a-irq")
        irqc.schedule(busy)
        return True

    def on_b(_irq: object) -> bool:
        order.append("b-irq")
        return True

    irqc.request_irq(1, on_a, "a")
    irqc.request_irq(2, on_b, "b")
    irqc.start()
    try:
        a.signal()
        assert done.wait(5)
        # b's interrupt was taken while a still had work: right after the round it came in
        i = order.index("b-irq")
        assert order[:i].count("a-work") == 3 and order[i + 1:].count("a-work") == 47
        assert irqc.handled == 2 and irqc.deferred_runs == 50
    finally:
        irqc.stop()
        a.close()
        b.close()
