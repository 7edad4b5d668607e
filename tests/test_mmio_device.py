"""The host's virtio-mmio emulation (vmsim.host.virtio.mmio.MmioTransport) over a virtio-blk
device, driven register by register as a guest's trapped accesses would drive it; then
virtio-blk requests built by hand on a real guest-side split ring; then the file backend.

Everything runs in this process over an anonymous mapping standing in for guest RAM: the host
sees it through GuestMemory, the guest-side ring code through GuestRAM, as the two processes
of a run map the same shm object.
"""

import mmap
import os
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vmsim.abi import blk as B
from vmsim.abi import features as F
from vmsim.abi import ids
from vmsim.abi import mmio as M
from vmsim.abi import status as S
from vmsim.guest.memory import DmaMemory, GuestRAM
from vmsim.guest.virtio.vring import vring_create_virtqueue, vring_del_virtqueue
from vmsim.host.devices.blk.backend import FileBackend, MemoryBackend
from vmsim.host.devices.blk.device import BlkDevice
from vmsim.host.memory import GuestMemory
from vmsim.host.virtio.mmio import MmioTransport

RAM_BASE = 0x4000_0000
RAM_SIZE = 1 << 20
MMIO_BASE = 0x0A00_0000
IRQ = 32
DISK_SIZE = 1 << 20
SERIAL = "vmsim-test-serial"

ACK, DRV, FOK, DOK = S.ACKNOWLEDGE, S.DRIVER, S.FEATURES_OK, S.DRIVER_OK
V1 = F.bit(F.VIRTIO_F_VERSION_1)
# What BlkDevice offers with no offer/withhold, read-write, one queue.
BLK_DEFAULT = (V1 | F.bit(F.VIRTIO_RING_F_INDIRECT_DESC) | F.bit(F.VIRTIO_RING_F_EVENT_IDX)
               | F.bit(F.VIRTIO_F_RING_RESET)
               | F.bit(B.VIRTIO_BLK_F_SEG_MAX) | F.bit(B.VIRTIO_BLK_F_BLK_SIZE)
               | F.bit(B.VIRTIO_BLK_F_FLUSH) | F.bit(B.VIRTIO_BLK_F_TOPOLOGY))


# ---- fixtures ------------------------------------------------------------------------------------
class Rig:
    """One device on its transport over anonymous "guest RAM"."""

    def __init__(self, backend=None, **kw) -> None:
        self.mm = mmap.mmap(-1, RAM_SIZE)
        self.mem = GuestMemory(self.mm, RAM_BASE)
        self.dma = DmaMemory(GuestRAM(self.mm, RAM_BASE))
        nq = kw.get("num_queues", 1)
        args = dict(name="vda", mem=self.mem,
                    backend=backend if backend is not None else MemoryBackend(DISK_SIZE),
                    readonly=False, num_queues=nq, queue_size=8, offer=0, withhold=0,
                    blk_size=512, serial=SERIAL, dev_stats=None, queue_stats=[None] * nq,
                    refuse_features_ok=False)
        args.update(kw)
        self.dev = BlkDevice(**args)
        self.t = MmioTransport(self.dev, MMIO_BASE, IRQ)
        self.vqs = []

    # register access as the guest's readl / writel reach the transport
    def r(self, off: int) -> int:
        return self.t.read(off, 4)

    def w(self, off: int, value: int) -> None:
        self.t.write(off, 4, value)

    @property
    def status(self) -> int:
        return self.r(M.STATUS)

    def device_features(self) -> int:
        self.w(M.DEVICE_FEATURES_SEL, 1)
        hi = self.r(M.DEVICE_FEATURES)
        self.w(M.DEVICE_FEATURES_SEL, 0)
        return hi << 32 | self.r(M.DEVICE_FEATURES)

    def driver_features(self, features: int) -> None:
        self.w(M.DRIVER_FEATURES_SEL, 1)
        self.w(M.DRIVER_FEATURES, features >> 32)
        self.w(M.DRIVER_FEATURES_SEL, 0)
        self.w(M.DRIVER_FEATURES, features & 0xFFFFFFFF)

    def negotiate(self, features: int = V1) -> int:
        """ACKNOWLEDGE, DRIVER, features, FEATURES_OK; the status read back."""
        self.w(M.STATUS, ACK)
        self.w(M.STATUS, ACK | DRV)
        self.driver_features(features)
        self.w(M.STATUS, ACK | DRV | FOK)
        return self.status

    def program_queue(self, index: int, num: int, desc: int, avail: int, used: int) -> None:
        self.w(M.QUEUE_SEL, index)
        self.w(M.QUEUE_NUM, num)
        for lo, addr in ((M.QUEUE_DESC_LOW, desc), (M.QUEUE_DRIVER_LOW, avail),
                         (M.QUEUE_DEVICE_LOW, used)):
            self.w(lo, addr & 0xFFFFFFFF)
            self.w(lo + 4, addr >> 32)

    def close(self) -> None:
        for vq in self.vqs:
            vring_del_virtqueue(vq)
        self.dev.close()
        self.t.close()
        self.dma.ram.release()
        self.mem.release()
        try:
            self.mm.close()
        except BufferError:
            pass    # a failed test's traceback still holds views: the GC unmaps it later


@pytest.fixture
def make():
    rigs = []

    def _make(**kw) -> Rig:
        rig = Rig(**kw)
        rigs.append(rig)
        return rig

    yield _make
    for rig in rigs:
        rig.close()


@pytest.fixture
def rig(make) -> Rig:
    return make()


# ---- identification ------------------------------------------------------------------------------
def test_identification_registers(rig):
    assert rig.r(M.MAGIC_VALUE) == 0x74726976
    assert rig.r(M.VERSION) == 2
    assert rig.r(M.DEVICE_ID) == ids.VIRTIO_ID_BLOCK == 2
    assert rig.r(M.VENDOR_ID) == 0x554D4551        # "QEMU"
    assert rig.dev.guest_errors == []


def test_device_features_by_select(rig):
    rig.w(M.DEVICE_FEATURES_SEL, 0)
    lo = rig.r(M.DEVICE_FEATURES)
    rig.w(M.DEVICE_FEATURES_SEL, 1)
    hi = rig.r(M.DEVICE_FEATURES)
    assert hi & 1, "VERSION_1 is bit 32: bit 0 of the second word"
    assert hi << 32 | lo == BLK_DEFAULT
    rig.w(M.DEVICE_FEATURES_SEL, 2)
    assert rig.r(M.DEVICE_FEATURES) == 0          # no third word
    rig.w(M.DEVICE_FEATURES_SEL, 0xFFFFFFFF)
    assert rig.r(M.DEVICE_FEATURES) == 0


@pytest.mark.parametrize("kw, expect", [
    (dict(readonly=True), BLK_DEFAULT | F.bit(B.VIRTIO_BLK_F_RO)),
    (dict(num_queues=2), BLK_DEFAULT | F.bit(B.VIRTIO_BLK_F_MQ)),
    (dict(offer=F.bit(B.VIRTIO_BLK_F_GEOMETRY) | F.bit(F.VIRTIO_F_RING_PACKED)),
     BLK_DEFAULT | F.bit(B.VIRTIO_BLK_F_GEOMETRY) | F.bit(F.VIRTIO_F_RING_PACKED)),
    (dict(withhold=F.bit(F.VIRTIO_RING_F_EVENT_IDX) | F.bit(B.VIRTIO_BLK_F_FLUSH)),
     BLK_DEFAULT & ~F.bit(F.VIRTIO_RING_F_EVENT_IDX) & ~F.bit(B.VIRTIO_BLK_F_FLUSH)),
])
def test_device_features_follow_configuration(make, kw, expect):
    assert make(**kw).device_features() == expect


def test_driver_features_written_in_two_halves(rig):
    want = V1 | F.bit(F.VIRTIO_RING_F_EVENT_IDX) | F.bit(B.VIRTIO_BLK_F_FLUSH)
    rig.w(M.STATUS, ACK)
    rig.w(M.STATUS, ACK | DRV)
    rig.w(M.DRIVER_FEATURES_SEL, 1)
    rig.w(M.DRIVER_FEATURES, want >> 32)
    assert rig.dev.driver_features == V1               # the high half alone
    rig.w(M.DRIVER_FEATURES_SEL, 0)
    rig.w(M.DRIVER_FEATURES, want & 0xFFFFFFFF)
    assert rig.dev.driver_features == want
    # rewriting one half leaves the other alone
    rig.w(M.DRIVER_FEATURES, F.bit(B.VIRTIO_BLK_F_FLUSH))
    assert rig.dev.driver_features == V1 | F.bit(B.VIRTIO_BLK_F_FLUSH)
    rig.w(M.DRIVER_FEATURES, want & 0xFFFFFFFF)
    rig.w(M.STATUS, ACK | DRV | FOK)
    assert rig.status == ACK | DRV | FOK
    assert rig.dev.negotiated(F.VIRTIO_RING_F_EVENT_IDX)
    # after FEATURES_OK the features are fixed
    errors = len(rig.dev.guest_errors)
    rig.w(M.DRIVER_FEATURES, 0)
    assert rig.dev.driver_features == want
    assert len(rig.dev.guest_errors) == errors + 1


# ---- the status state machine --------------------------------------------------------------------
def test_status_sequence(rig):
    assert rig.status == 0
    rig.w(M.STATUS, ACK)
    assert rig.status == ACK
    rig.w(M.STATUS, ACK | DRV)
    assert rig.status == ACK | DRV
    rig.driver_features(V1)
    rig.w(M.STATUS, ACK | DRV | FOK)
    assert rig.status == ACK | DRV | FOK
    rig.w(M.STATUS, ACK | DRV | FOK | DOK)
    assert rig.status == ACK | DRV | FOK | DOK
    assert rig.dev.guest_errors == []


def test_status_all_bits_in_one_write(rig):
    """Prerequisites may be set in the same write as the bit that needs them."""
    rig.driver_features(V1)
    rig.w(M.STATUS, ACK | DRV | FOK | DOK)
    assert rig.status == ACK | DRV | FOK | DOK


@pytest.mark.parametrize("before, write", [
    (0, DRV),                          # DRIVER before ACKNOWLEDGE
    (0, FOK),
    (0, DOK),
    (ACK, ACK | FOK),                  # FEATURES_OK before DRIVER
    (ACK, ACK | DOK),
    (ACK | DRV, ACK | DRV | DOK),      # DRIVER_OK before FEATURES_OK
    (ACK, ACK | 0x10),                 # a bit the spec does not define
])
def test_status_bit_before_prerequisite_is_ignored(rig, before, write):
    rig.driver_features(V1)
    for bit in (ACK, DRV):
        if before & bit:
            rig.w(M.STATUS, rig.status | bit)
    assert rig.status == before
    rig.w(M.STATUS, write)
    assert rig.status == before
    assert len(rig.dev.guest_errors) == 1


@pytest.mark.parametrize("write", [ACK, ACK | DRV, DRV | FOK, ACK | FOK])
def test_clearing_bits_without_reset_is_ignored(rig, write):
    assert rig.negotiate() == ACK | DRV | FOK
    rig.w(M.STATUS, write)
    assert rig.status == ACK | DRV | FOK
    assert len(rig.dev.guest_errors) == 1


def test_failed_may_be_set_at_any_time(rig):
    rig.w(M.STATUS, ACK)
    rig.w(M.STATUS, ACK | S.FAILED)
    assert rig.status == ACK | S.FAILED


def _live_with_queue(rig: Rig, features: int = V1) -> None:
    """FEATURES_OK, queue 0 on a ring placed in RAM, ready, DRIVER_OK."""
    assert rig.negotiate(features) == ACK | DRV | FOK
    rig.program_queue(0, 8, RAM_BASE + 0x1000, RAM_BASE + 0x1080, RAM_BASE + 0x2000)
    rig.w(M.QUEUE_READY, 1)
    rig.w(M.STATUS, ACK | DRV | FOK | DOK)
    assert rig.status == ACK | DRV | FOK | DOK


def test_write_zero_resets_everything(rig):
    _live_with_queue(rig)
    rig.t.signal_used(0)
    rig.t.signal_config()
    assert rig.r(M.INTERRUPT_STATUS) == M.INT_VRING | M.INT_CONFIG
    q = rig.dev.queues[0]
    assert q.ready and q.ring is not None
    resets = rig.dev.n_resets

    rig.w(M.STATUS, 0)

    assert rig.status == 0
    assert rig.dev.driver_features == 0
    assert rig.r(M.INTERRUPT_STATUS) == 0
    rig.w(M.QUEUE_SEL, 0)
    assert rig.r(M.QUEUE_READY) == 0
    assert not q.ready and q.ring is None
    assert (q.num, q.desc, q.driver, q.device) == (8, 0, 0, 0)
    assert rig.dev.n_resets == resets + 1
    assert rig.dev.live_queues() == []
    # the device can be brought up again from scratch
    _live_with_queue(rig)


def test_reset_clears_device_needs_reset(rig):
    assert rig.negotiate() == ACK | DRV | FOK
    rig.program_queue(0, 8, RAM_BASE + RAM_SIZE, RAM_BASE + 0x1080, RAM_BASE + 0x2000)
    rig.w(M.QUEUE_READY, 1)
    assert rig.status & S.DEVICE_NEEDS_RESET
    rig.w(M.STATUS, 0)
    assert rig.status == 0
    assert not rig.dev.broken


# ---- FEATURES_OK refused -------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["unoffered", "no-version-1", "configured-refusal"])
def test_features_ok_refused(make, case):
    if case == "configured-refusal":
        rig = make(refuse_features_ok=True)
        features = V1
    elif case == "unoffered":
        rig = make()
        features = V1 | F.bit(B.VIRTIO_BLK_F_MQ)        # one queue: MQ is not offered
    else:
        rig = make()
        features = F.bit(B.VIRTIO_BLK_F_FLUSH)
    assert rig.negotiate(features) == ACK | DRV, "FEATURES_OK must not read back"
    if case != "configured-refusal":
        assert rig.dev.guest_errors, "the refusal is a guest error"
    # queue setup stays closed without FEATURES_OK
    rig.w(M.QUEUE_SEL, 0)
    rig.w(M.QUEUE_NUM, 4)
    assert rig.dev.queues[0].num == 8


def test_features_ok_after_a_refusal_with_corrected_features(rig):
    assert rig.negotiate(V1 | F.bit(F.VIRTIO_F_RING_PACKED)) == ACK | DRV
    rig.driver_features(V1 | F.bit(B.VIRTIO_BLK_F_FLUSH))
    rig.w(M.STATUS, ACK | DRV | FOK)
    assert rig.status == ACK | DRV | FOK


@pytest.mark.parametrize("refuse", ["configured-refusal", "no-version-1"])
def test_driver_ok_not_accepted_with_a_refused_features_ok(make, refuse):
    rig = make(refuse_features_ok=refuse == "configured-refusal")
    rig.w(M.STATUS, ACK)
    rig.w(M.STATUS, ACK | DRV)
    rig.driver_features(V1 if refuse == "configured-refusal" else 0)
    # a driver that does not read FEATURES_OK back before going on
    rig.w(M.STATUS, ACK | DRV | FOK | DOK)
    assert not rig.status & DOK


# ---- queue registers -----------------------------------------------------------------------------
def test_queue_num_max(make):
    rig = make(num_queues=2, queue_size=64)
    for i in (0, 1):
        rig.w(M.QUEUE_SEL, i)
        assert rig.r(M.QUEUE_NUM_MAX) == 64
        assert rig.r(M.QUEUE_READY) == 0
    rig.w(M.QUEUE_SEL, 2)
    assert rig.r(M.QUEUE_NUM_MAX) == 0
    assert rig.r(M.QUEUE_READY) == 0
    rig.w(M.QUEUE_SEL, 0xFFFFFFFF)
    assert rig.r(M.QUEUE_NUM_MAX) == 0


def test_queue_registers_accepted_between_features_ok_and_driver_ok(rig):
    assert rig.negotiate() == ACK | DRV | FOK
    rig.program_queue(0, 4, 0x1_2345_6000, 0x2_0000_0100, 0x3_0000_0200)
    q = rig.dev.queues[0]
    assert (q.num, q.desc, q.driver, q.device) == (4, 0x1_2345_6000, 0x2_0000_0100,
                                                   0x3_0000_0200)
    # low and high halves are independent
    rig.w(M.QUEUE_DESC_HIGH, 0)
    assert q.desc == 0x2345_6000
    rig.w(M.QUEUE_DESC_LOW, 0x1000)
    assert q.desc == 0x1000
    assert rig.dev.guest_errors == []


def test_queue_registers_ignored_before_features_ok(rig):
    rig.w(M.STATUS, ACK)
    rig.w(M.STATUS, ACK | DRV)
    rig.program_queue(0, 4, RAM_BASE + 0x1000, RAM_BASE + 0x1080, RAM_BASE + 0x2000)
    rig.w(M.QUEUE_READY, 1)
    q = rig.dev.queues[0]
    assert (q.num, q.desc, q.driver, q.device, q.ready) == (8, 0, 0, 0, False)
    assert rig.r(M.QUEUE_READY) == 0
    assert len(rig.dev.guest_errors) == 8     # num, 3 x (low, high), ready


def test_queue_registers_ignored_after_driver_ok(rig):
    assert rig.negotiate() == ACK | DRV | FOK
    rig.w(M.STATUS, ACK | DRV | FOK | DOK)
    rig.program_queue(0, 4, RAM_BASE + 0x1000, RAM_BASE + 0x1080, RAM_BASE + 0x2000)
    rig.w(M.QUEUE_READY, 1)
    q = rig.dev.queues[0]
    assert (q.num, q.desc, q.ready) == (8, 0, False)
    assert len(rig.dev.guest_errors) == 8


def test_queue_registers_ignored_while_ready(rig):
    assert rig.negotiate() == ACK | DRV | FOK
    rig.program_queue(0, 8, RAM_BASE + 0x1000, RAM_BASE + 0x1080, RAM_BASE + 0x2000)
    rig.w(M.QUEUE_READY, 1)
    assert rig.r(M.QUEUE_READY) == 1
    q = rig.dev.queues[0]
    rig.w(M.QUEUE_NUM, 4)
    rig.w(M.QUEUE_DESC_LOW, 0x3000)
    rig.w(M.QUEUE_DEVICE_HIGH, 1)
    assert (q.num, q.desc, q.device) == (8, RAM_BASE + 0x1000, RAM_BASE + 0x2000)
    assert len(rig.dev.guest_errors) == 3
    # QueueReady=0 takes the queue down; then it may be reprogrammed
    rig.w(M.QUEUE_READY, 0)
    assert rig.r(M.QUEUE_READY) == 0 and q.ring is None
    rig.w(M.QUEUE_NUM, 4)
    assert q.num == 4


def test_queue_ready_for_missing_queue(rig):
    assert rig.negotiate() == ACK | DRV | FOK
    rig.w(M.QUEUE_SEL, 1)
    rig.w(M.QUEUE_NUM, 8)
    rig.w(M.QUEUE_READY, 1)
    assert rig.r(M.QUEUE_READY) == 0
    assert len(rig.dev.guest_errors) == 2
    assert not rig.dev.errors


@pytest.mark.parametrize("num, desc, avail, used", [
    (8, RAM_BASE + RAM_SIZE, RAM_BASE + 0x1080, RAM_BASE + 0x2000),       # desc beyond RAM
    (8, RAM_BASE + 0x1000, RAM_BASE - 0x1000, RAM_BASE + 0x2000),         # avail below RAM
    (8, RAM_BASE + 0x1000, RAM_BASE + 0x1080, RAM_BASE + RAM_SIZE - 8),   # used straddles end
    (8, RAM_BASE + 0x1008, RAM_BASE + 0x1080, RAM_BASE + 0x2000),         # desc misaligned
    (6, RAM_BASE + 0x1000, RAM_BASE + 0x1080, RAM_BASE + 0x2000),         # not a power of two
    (0, RAM_BASE + 0x1000, RAM_BASE + 0x1080, RAM_BASE + 0x2000),         # size 0
], ids=["desc-out", "avail-out", "used-straddles", "misaligned", "size-6", "size-0"])
def test_queue_ready_with_bad_ring_is_a_device_error(rig, num, desc, avail, used):
    assert rig.negotiate() == ACK | DRV | FOK
    rig.program_queue(0, num, desc, avail, used)
    rig.w(M.QUEUE_READY, 1)
    assert rig.r(M.QUEUE_READY) == 0
    assert rig.dev.errors and rig.dev.broken
    assert rig.status == ACK | DRV | FOK | S.DEVICE_NEEDS_RESET
    # before DRIVER_OK there is no one to interrupt
    assert rig.r(M.INTERRUPT_STATUS) == 0
    # the driver writing back what it read keeps NEEDS_RESET; no exception anywhere
    rig.w(M.STATUS, rig.status | DOK)
    assert rig.status & S.DEVICE_NEEDS_RESET


# ---- invalid accesses ----------------------------------------------------------------------------
@pytest.mark.parametrize("offset, width", [
    (M.MAGIC_VALUE, 1), (M.MAGIC_VALUE, 2), (M.MAGIC_VALUE, 8), (M.STATUS, 0),
    (M.MAGIC_VALUE + 2, 4),            # unaligned
    (0x0F0, 4), (0x0D0, 4),            # holes in the map
    (M.QUEUE_SEL, 4), (M.DEVICE_FEATURES_SEL, 4), (M.INTERRUPT_ACK, 4),   # write-only
    (M.QUEUE_NOTIFY, 4), (M.GUEST_PAGE_SIZE, 4), (M.QUEUE_PFN, 4),
    (M.CONFIG, 8), (M.CONFIG, 3), (M.CONFIG + B.CONFIG_SIZE, 1), (M.CONFIG + 34, 4),
    (M.REGION_SIZE, 4), (0xFFFF, 4),
])
def test_invalid_reads_return_zero_and_are_guest_errors(rig, offset, width):
    before = len(rig.dev.guest_errors)
    assert rig.t.read(offset, width) == 0
    assert len(rig.dev.guest_errors) == before + 1


@pytest.mark.parametrize("offset, width, value", [
    (M.STATUS, 1, ACK), (M.STATUS, 2, ACK), (M.STATUS + 1, 4, ACK),
    (M.MAGIC_VALUE, 4, 0), (M.VERSION, 4, 1), (M.DEVICE_ID, 4, 7),     # read-only
    (M.DEVICE_FEATURES, 4, 0), (M.INTERRUPT_STATUS, 4, 3), (M.CONFIG_GENERATION, 4, 9),
    (0x0F0, 4, 1), (M.QUEUE_RESET, 4, 1),
    (M.CONFIG + B.CFG_CAPACITY, 4, 1), (M.CONFIG + B.CFG_BLK_SIZE, 2, 1),  # read-only config
    (M.CONFIG, 8, 1), (M.CONFIG + B.CONFIG_SIZE, 1, 0),
])
def test_invalid_writes_are_ignored_and_are_guest_errors(rig, offset, width, value):
    config = bytes(rig.dev.config_space())
    before = len(rig.dev.guest_errors)
    rig.t.write(offset, width, value)
    assert len(rig.dev.guest_errors) == before + 1
    assert rig.status == 0
    assert rig.r(M.MAGIC_VALUE) == M.MAGIC and rig.r(M.DEVICE_ID) == 2
    assert bytes(rig.dev.config_space()) == config


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 0x210),
                          st.sampled_from([0, 1, 2, 3, 4, 8]), st.integers(0, 2**32 - 1)),
                max_size=40))
def test_any_access_sequence_never_raises(rig, accesses):
    """Untrusted register traffic: reads always answer an int of the access width.
    (Values are kept within the access width: see the OverflowError test below.)"""
    rig.w(M.STATUS, 0)
    for is_read, offset, width, value in accesses:
        if is_read:
            v = rig.t.read(offset, width)
            assert isinstance(v, int) and 0 <= v < 1 << max(32, 8 * width)
        else:
            rig.t.write(offset, width, value & ((1 << 8 * width) - 1))


@pytest.mark.parametrize("width, value", [(1, 0x100), (2, 0x1_0000), (4, 1 << 32), (1, -1)])
def test_config_write_value_wider_than_the_access(rig, width, value):
    rig.t.write(M.CONFIG + B.CFG_WRITEBACK, width, value)
    assert rig.dev.guest_errors


# ---- config space --------------------------------------------------------------------------------
def _cfg(rig: Rig, off: int, width: int) -> int:
    return rig.t.read(M.CONFIG + off, width)


def test_config_fields(make):
    rig = make(backend=MemoryBackend(5 << 20 | 0x200), queue_size=128, blk_size=4096,
               num_queues=4)
    cap = (5 << 20 >> 9) + 1
    # capacity is le64 and a driver reads it as two 32-bit halves
    lo = _cfg(rig, B.CFG_CAPACITY, 4)
    hi = _cfg(rig, B.CFG_CAPACITY + 4, 4)
    assert hi << 32 | lo == cap
    assert _cfg(rig, B.CFG_BLK_SIZE, 4) == 4096
    assert _cfg(rig, B.CFG_SEG_MAX, 4) == 126          # queue size minus header and status
    assert _cfg(rig, B.CFG_NUM_QUEUES, 2) == 4
    assert rig.dev.guest_errors == []


def test_config_capacity_above_4g_sectors(make, tmp_path):
    # capacity needs the high half: 3 TiB, a sparse image (only the config is read here)
    rig = make(backend=FileBackend(str(tmp_path / "big.img"), 512, False))
    rig.dev.resize(3 << 40)
    assert _cfg(rig, B.CFG_CAPACITY + 4, 4) == (3 << 40 >> 9) >> 32 == 1
    assert _cfg(rig, B.CFG_CAPACITY, 4) == (3 << 40 >> 9) & 0xFFFFFFFF


@settings(max_examples=100, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.integers(0, B.CONFIG_SIZE - 1), st.sampled_from([1, 2, 4]))
def test_config_reads_of_every_width_agree_with_byte_reads(rig, off, width):
    """A 1, 2 or 4-byte read is the little-endian value of the bytes it covers."""
    if off + width > B.CONFIG_SIZE:
        return
    as_bytes = bytes(_cfg(rig, off + i, 1) for i in range(width))
    assert _cfg(rig, off, width) == int.from_bytes(as_bytes, "little")


def test_config_known_bytes(rig):
    raw = bytes(_cfg(rig, i, 1) for i in range(B.CONFIG_SIZE))
    capacity, size_max, seg_max = struct.unpack_from("<QII", raw, 0)
    assert (capacity, size_max, seg_max) == (DISK_SIZE >> 9, 0, 6)
    assert struct.unpack_from("<I", raw, B.CFG_BLK_SIZE)[0] == 512
    assert struct.unpack_from("<H", raw, B.CFG_NUM_QUEUES)[0] == 1
    assert rig.dev.guest_errors == []


def test_config_generation_and_config_interrupt(rig):
    assert rig.r(M.CONFIG_GENERATION) == 0
    rig.dev.resize(DISK_SIZE // 2)           # before DRIVER_OK: no interrupt
    assert rig.r(M.CONFIG_GENERATION) == 1
    assert _cfg(rig, B.CFG_CAPACITY, 4) == DISK_SIZE // 2 >> 9
    assert rig.r(M.INTERRUPT_STATUS) == 0
    assert rig.t.irqfd.consume() == 0
    _live_with_queue(rig)
    rig.dev.resize(DISK_SIZE // 4)
    assert rig.r(M.CONFIG_GENERATION) == 2
    assert rig.r(M.INTERRUPT_STATUS) == M.INT_CONFIG
    assert rig.t.irqfd.consume() >= 1
    assert _cfg(rig, B.CFG_CAPACITY, 4) == DISK_SIZE // 4 >> 9


# ---- interrupts, notifications, shared memory ----------------------------------------------------
def test_interrupt_status_and_ack(rig):
    irqfd = rig.t.irqfd
    assert rig.r(M.INTERRUPT_STATUS) == 0 and irqfd.consume() == 0
    rig.t.signal_used(0)
    assert rig.r(M.INTERRUPT_STATUS) == M.INT_VRING
    assert irqfd.consume() == 1
    rig.t.signal_config()
    rig.t.signal_used(0)
    assert rig.r(M.INTERRUPT_STATUS) == M.INT_VRING | M.INT_CONFIG
    assert irqfd.consume() == 2
    rig.w(M.INTERRUPT_ACK, M.INT_VRING)
    assert rig.r(M.INTERRUPT_STATUS) == M.INT_CONFIG
    rig.w(M.INTERRUPT_ACK, M.INT_CONFIG)
    assert rig.r(M.INTERRUPT_STATUS) == 0
    assert irqfd.consume() == 0


def test_ioeventfds_are_the_queue_kicks(make):
    rig = make(num_queues=3)
    fds = rig.t.ioeventfds()
    assert [(s, a, d) for s, a, d, _ in fds] == [("mmio", MMIO_BASE + 0x50, i) for i in range(3)]
    for (_, _, _i, efd), q in zip(fds, rig.dev.queues, strict=True):
        assert efd is q.kick
        efd.signal()
        assert q.kick.consume() == 1


def test_trapped_queue_notify_is_recorded(rig):
    rig.w(M.QUEUE_NOTIFY, 0)
    rig.w(M.QUEUE_NOTIFY, 0x10000 | 3)
    assert rig.t.pending_kicks == [0, 3]
    assert rig.t.n_trapped_notifies == 2


@pytest.mark.parametrize("sel", [0, 1, 255])
def test_no_shared_memory_regions(rig, sel):
    rig.w(M.SHM_SEL, sel)
    for off in (M.SHM_LEN_LOW, M.SHM_LEN_HIGH, M.SHM_BASE_LOW, M.SHM_BASE_HIGH):
        assert rig.r(off) == 0xFFFFFFFF
    assert rig.dev.guest_errors == []


def test_exits_are_counted(rig):
    reads, writes = rig.t.exits_read, rig.t.exits_write
    rig.r(M.MAGIC_VALUE)
    rig.t.read(0x3, 1)
    rig.w(M.STATUS, ACK)
    assert (rig.t.exits_read, rig.t.exits_write) == (reads + 2, writes + 1)


# ---- virtio-blk requests on a real split ring ----------------------------------------------------
class Blk:
    """A driver's view, built by hand: the guest-side split ring programmed through the
    registers, and buffers in guest RAM."""

    def __init__(self, rig: Rig, features: int) -> None:
        self.rig = rig
        self.dev = rig.dev
        assert rig.negotiate(features) == ACK | DRV | FOK
        # a callback: a queue without one asks the device for no interrupts (as in Linux)
        self.vq = vring_create_virtqueue(0, 8, 4096, rig.dma, features,
                                               notify=lambda q: True, callback=lambda q: None,
                                               name="q")
        rig.vqs.append(self.vq)
        rig.program_queue(0, 8, self.vq.desc_addr, self.vq.avail_addr, self.vq.used_addr)
        rig.w(M.QUEUE_READY, 1)
        rig.w(M.STATUS, ACK | DRV | FOK | DOK)
        assert rig.status == ACK | DRV | FOK | DOK
        self.n = 0

    def buf(self, size_or_data, align: int = 16) -> tuple[int, memoryview]:
        if isinstance(size_or_data, int):
            return self.rig.dma.alloc(size_or_data, align)
        gpa, view = self.rig.dma.alloc(len(size_or_data), align)
        view[:] = size_or_data
        return gpa, view

    def hdr(self, typ: int, sector: int) -> int:
        return self.buf(B.OUTHDR.pack(typ, 0, sector))[0]

    def status(self) -> tuple[int, memoryview]:
        gpa, view = self.buf(1)
        view[0] = 0xEE
        return gpa, view

    def run(self, out_sgs, in_sgs) -> int:
        """Expose one chain, let the device serve the queue, return the used length."""
        self.n += 1
        token = f"req{self.n}"
        assert self.vq.add_sgs(out_sgs, in_sgs, token) == 0
        assert self.dev.service(self.dev.queues[0]) == 1
        used = self.vq.get_buf()
        assert used is not None and used[0] == token
        return used[1]

    def write(self, sector: int, data: bytes) -> int:
        gpa, _ = self.buf(data, 512)
        st_gpa, st_view = self.status()
        assert self.run([(self.hdr(B.VIRTIO_BLK_T_OUT, sector), 16), (gpa, len(data))],
                        [(st_gpa, 1)]) == 1
        return st_view[0]

    def read(self, sector: int, length: int) -> tuple[int, bytes]:
        gpa, view = self.buf(length, 512)
        view[:] = b"\xcc" * length
        st_gpa, st_view = self.status()
        used = self.run([(self.hdr(B.VIRTIO_BLK_T_IN, sector), 16)],
                        [(gpa, length), (st_gpa, 1)])
        if st_view[0] == B.VIRTIO_BLK_S_OK:
            assert used == length + 1
        else:
            assert used == 1
        return st_view[0], bytes(view)

    def backend_bytes(self, offset: int, length: int) -> bytes:
        out = bytearray(length)
        self.dev.backend.read_into(offset, [memoryview(out)])
        return bytes(out)


FLUSH = F.bit(B.VIRTIO_BLK_F_FLUSH)
INDIRECT = F.bit(F.VIRTIO_RING_F_INDIRECT_DESC)


@pytest.fixture
def blk(rig) -> Blk:
    return Blk(rig, V1 | FLUSH)


def _pattern(n: int, seed: int) -> bytes:
    return bytes((i * 7 + seed) & 0xFF for i in range(n))


@pytest.mark.parametrize("features", [V1 | FLUSH, V1 | FLUSH | INDIRECT],
                         ids=["direct", "indirect"])
def test_blk_write_read_round_trip(rig, features):
    blk = Blk(rig, features)
    data = _pattern(4096, 1)
    assert blk.write(8, data) == B.VIRTIO_BLK_S_OK
    assert blk.backend_bytes(8 * 512, 4096) == data
    assert blk.read(8, 4096) == (B.VIRTIO_BLK_S_OK, data)
    assert blk.read(7, 512) == (B.VIRTIO_BLK_S_OK, bytes(512))
    # the last sector of the disk
    last = DISK_SIZE // 512 - 1
    assert blk.write(last, _pattern(512, 9)) == B.VIRTIO_BLK_S_OK
    assert blk.read(last, 512) == (B.VIRTIO_BLK_S_OK, _pattern(512, 9))
    m = rig.dev.metrics
    assert (m.writes, m.reads, m.bytes_written, m.bytes_read) == (2, 3, 4608, 5120)
    assert rig.dev.errors == []


@pytest.mark.parametrize("features", [V1, V1 | INDIRECT], ids=["direct", "indirect"])
def test_blk_scattered_data_segments(rig, features):
    blk = Blk(rig, features)
    parts = [_pattern(512, s) for s in range(3)]
    bufs = [blk.buf(p, 512)[0] for p in parts]
    st_gpa, st_view = blk.status()
    out = [(blk.hdr(B.VIRTIO_BLK_T_OUT, 100), 16)] + [(g, 512) for g in bufs]
    assert blk.run(out, [(st_gpa, 1)]) == 1
    assert st_view[0] == B.VIRTIO_BLK_S_OK
    assert blk.backend_bytes(100 * 512, 1536) == b"".join(parts)
    # read it back into two uneven pieces
    a, av = blk.buf(1024, 512)
    b, bv = blk.buf(512, 512)
    st_gpa, st_view = blk.status()
    used = blk.run([(blk.hdr(B.VIRTIO_BLK_T_IN, 100), 16)], [(a, 1024), (b, 512), (st_gpa, 1)])
    assert (used, st_view[0]) == (1537, B.VIRTIO_BLK_S_OK)
    assert bytes(av) + bytes(bv) == b"".join(parts)


def test_blk_flush(blk):
    st_gpa, st_view = blk.status()
    assert blk.run([(blk.hdr(B.VIRTIO_BLK_T_FLUSH, 0), 16)], [(st_gpa, 1)]) == 1
    assert st_view[0] == B.VIRTIO_BLK_S_OK
    assert blk.dev.metrics.flushes == 1


def test_blk_flush_without_the_feature_is_unsupported(rig):
    blk = Blk(rig, V1)
    st_gpa, st_view = blk.status()
    assert blk.run([(blk.hdr(B.VIRTIO_BLK_T_FLUSH, 0), 16)], [(st_gpa, 1)]) == 1
    assert st_view[0] == B.VIRTIO_BLK_S_UNSUPP
    assert rig.dev.metrics.flushes == 0


def test_blk_get_id(blk):
    gpa, view = blk.buf(20)
    view[:] = b"\xff" * 20
    st_gpa, st_view = blk.status()
    used = blk.run([(blk.hdr(B.VIRTIO_BLK_T_GET_ID, 0), 16)], [(gpa, 20), (st_gpa, 1)])
    assert st_view[0] == B.VIRTIO_BLK_S_OK
    assert used == 21
    assert bytes(view) == SERIAL.encode().ljust(20, b"\0")


def test_blk_get_id_serial_of_twenty_bytes_has_no_nul(make):
    blk = Blk(make(serial="A" * 25), V1)
    gpa, view = blk.buf(20)
    st_gpa, st_view = blk.status()
    blk.run([(blk.hdr(B.VIRTIO_BLK_T_GET_ID, 0), 16)], [(gpa, 20), (st_gpa, 1)])
    assert (st_view[0], bytes(view)) == (B.VIRTIO_BLK_S_OK, b"A" * 20)


@pytest.mark.parametrize("typ", [B.VIRTIO_BLK_T_SCSI_CMD, B.VIRTIO_BLK_T_DISCARD,
                                 B.VIRTIO_BLK_T_WRITE_ZEROES, 99, 0xFFFFFFFF])
def test_blk_unknown_type_is_unsupported(blk, typ):
    gpa, _ = blk.buf(512, 512)
    st_gpa, st_view = blk.status()
    assert blk.run([(blk.hdr(typ, 0), 16), (gpa, 512)], [(st_gpa, 1)]) == 1
    assert st_view[0] == B.VIRTIO_BLK_S_UNSUPP
    assert blk.dev.errors == []


@pytest.mark.parametrize("sector, length", [
    (DISK_SIZE // 512, 512),          # just past the end
    (DISK_SIZE // 512 - 1, 1024),     # crosses the end
    (2**63, 512), (2**64 - 1, 512),   # absurd sectors
])
def test_blk_out_of_range_is_ioerr(blk, sector, length):
    assert blk.read(sector, length)[0] == B.VIRTIO_BLK_S_IOERR
    assert blk.write(sector, bytes(length)) == B.VIRTIO_BLK_S_IOERR
    assert blk.dev.errors == [] and not blk.dev.broken


@pytest.mark.parametrize("length", [100, 511, 513, 1000])
def test_blk_length_not_a_multiple_of_512_is_ioerr(blk, length):
    assert blk.write(0, b"\x55" * length) == B.VIRTIO_BLK_S_IOERR
    assert blk.backend_bytes(0, 1024) == bytes(1024)
    assert blk.read(0, length)[0] == B.VIRTIO_BLK_S_IOERR


def test_blk_more_segments_than_seg_max_is_ioerr(rig):
    blk = Blk(rig, V1 | INDIRECT)         # indirect: 7 data segments fit in one ring slot
    assert rig.dev.seg_max == 6
    bufs = [blk.buf(512, 512)[0] for _ in range(7)]
    st_gpa, st_view = blk.status()
    blk.run([(blk.hdr(B.VIRTIO_BLK_T_IN, 0), 16)], [(g, 512) for g in bufs] + [(st_gpa, 1)])
    assert st_view[0] == B.VIRTIO_BLK_S_IOERR


def test_blk_readonly_device_refuses_writes(make):
    rig = make(readonly=True)
    blk = Blk(rig, V1 | F.bit(B.VIRTIO_BLK_F_RO))
    rig.dev.backend.write_from(0, [memoryview(_pattern(1024, 3))])
    assert blk.write(0, b"\x11" * 1024) == B.VIRTIO_BLK_S_IOERR
    assert blk.backend_bytes(0, 1024) == _pattern(1024, 3)
    assert blk.read(0, 1024) == (B.VIRTIO_BLK_S_OK, _pattern(1024, 3))
    assert rig.dev.metrics.writes == 0


@pytest.mark.parametrize("split", [8, 4, 1, 15])
def test_blk_header_split_across_descriptors(blk, split):
    data = _pattern(1024, 5)
    hdr = blk.hdr(B.VIRTIO_BLK_T_OUT, 40)
    gpa, _ = blk.buf(data, 512)
    st_gpa, st_view = blk.status()
    assert blk.run([(hdr, split), (hdr + split, 16 - split), (gpa, 1024)], [(st_gpa, 1)]) == 1
    assert st_view[0] == B.VIRTIO_BLK_S_OK
    assert blk.backend_bytes(40 * 512, 1024) == data
    # a read whose header is split the same way
    hdr = blk.hdr(B.VIRTIO_BLK_T_IN, 40)
    gpa, view = blk.buf(1024, 512)
    st_gpa, st_view = blk.status()
    used = blk.run([(hdr, split), (hdr + split, 16 - split)], [(gpa, 1024), (st_gpa, 1)])
    assert (used, st_view[0], bytes(view)) == (1025, B.VIRTIO_BLK_S_OK, data)


def test_blk_header_and_data_in_one_descriptor(blk):
    data = _pattern(512, 2)
    gpa, _ = blk.buf(B.OUTHDR.pack(B.VIRTIO_BLK_T_OUT, 0, 3) + data, 16)
    st_gpa, st_view = blk.status()
    assert blk.run([(gpa, 16 + 512)], [(st_gpa, 1)]) == 1
    assert st_view[0] == B.VIRTIO_BLK_S_OK
    assert blk.backend_bytes(3 * 512, 512) == data


def test_blk_status_in_the_same_descriptor_as_read_data(blk):
    data = _pattern(1024, 4)
    assert blk.write(16, data) == B.VIRTIO_BLK_S_OK
    gpa, view = blk.buf(1025, 512)
    view[:] = b"\xcc" * 1025
    used = blk.run([(blk.hdr(B.VIRTIO_BLK_T_IN, 16), 16)], [(gpa, 1025)])
    assert used == 1025
    assert bytes(view[:1024]) == data
    assert view[1024] == B.VIRTIO_BLK_S_OK


def test_blk_short_header_is_ioerr(blk):
    gpa, _ = blk.buf(B.OUTHDR.pack(B.VIRTIO_BLK_T_IN, 0, 0)[:8])
    st_gpa, st_view = blk.status()
    assert blk.run([(gpa, 8)], [(st_gpa, 1)]) == 1
    assert st_view[0] == B.VIRTIO_BLK_S_IOERR
    assert blk.dev.errors == []


def test_blk_request_without_a_writable_byte_is_a_device_error(blk):
    gpa, _ = blk.buf(512, 512)
    assert blk.vq.add_sgs([(blk.hdr(B.VIRTIO_BLK_T_OUT, 0), 16), (gpa, 512)], [], "bad") == 0
    dev = blk.dev
    assert dev.service(dev.queues[0]) == 0          # no exception escapes
    assert dev.errors and dev.broken and dev.queues[0].broken
    assert blk.rig.status & S.DEVICE_NEEDS_RESET
    # the driver is told through a configuration-change interrupt
    assert blk.rig.r(M.INTERRUPT_STATUS) & M.INT_CONFIG
    assert blk.rig.t.irqfd.consume() >= 1
    assert blk.vq.get_buf() is None
    assert dev.live_queues() == []
    # a broken device serves nothing until it is reset
    assert dev.service(dev.queues[0]) == 0


def test_blk_used_buffer_interrupts_the_driver(blk):
    blk.rig.t.irqfd.consume()
    assert blk.write(0, bytes(512)) == B.VIRTIO_BLK_S_OK
    assert blk.rig.r(M.INTERRUPT_STATUS) == M.INT_VRING
    assert blk.rig.t.irqfd.consume() == 1
    blk.rig.w(M.INTERRUPT_ACK, M.INT_VRING)
    assert blk.rig.r(M.INTERRUPT_STATUS) == 0


def test_blk_grown_memory_disk_serves_the_new_sectors(blk):
    blk.dev.resize(2 * DISK_SIZE)
    status, data = blk.read(DISK_SIZE // 512 + 8, 512)
    assert (status, data) == (B.VIRTIO_BLK_S_OK, bytes(512))


def test_blk_shrunk_disk_refuses_sectors_past_the_end(blk):
    blk.dev.resize(DISK_SIZE // 2)
    assert blk.read(DISK_SIZE // 1024, 512)[0] == B.VIRTIO_BLK_S_IOERR
    assert blk.read(DISK_SIZE // 1024 - 1, 512)[0] == B.VIRTIO_BLK_S_OK


# ---- the file backend ----------------------------------------------------------------------------
def test_file_backend_creates_a_sparse_image(tmp_path):
    path = tmp_path / "disk.img"
    be = FileBackend(str(path), 64 << 20, readonly=False)
    try:
        st_ = os.stat(path)
        assert be.size == st_.st_size == 64 << 20
        assert st_.st_blocks * 512 < 1 << 20, "a new image is sparse"
        be.flush()                                # fsync works on it
    finally:
        be.close()


def test_file_backend_keeps_an_existing_image(tmp_path):
    path = tmp_path / "disk.img"
    path.write_bytes(_pattern(8192, 1))
    be = FileBackend(str(path), 4096, readonly=False)    # never shrunk
    try:
        assert be.size == 8192
        out = bytearray(512)
        assert be.read_into(512, [memoryview(out)]) == 512
        assert bytes(out) == _pattern(8192, 1)[512:1024]
    finally:
        be.close()
    assert path.read_bytes() == _pattern(8192, 1)


def test_file_backend_missing_without_create(tmp_path):
    with pytest.raises(FileNotFoundError):
        FileBackend(str(tmp_path / "none.img"), 4096, readonly=False, create=False)


def test_blk_on_a_file_lands_at_sector_times_512(make, tmp_path):
    path = tmp_path / "disk.img"
    be = FileBackend(str(path), DISK_SIZE, readonly=False)
    blk = Blk(make(backend=be), V1 | FLUSH | INDIRECT)
    data = _pattern(2048, 6)
    assert blk.write(5, data) == B.VIRTIO_BLK_S_OK
    with open(path, "rb") as f:
        f.seek(5 * 512)
        assert f.read(2048) == data
    # written behind the device's back, read through it
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, _pattern(512, 8), 300 * 512)
    finally:
        os.close(fd)
    assert blk.read(300, 512) == (B.VIRTIO_BLK_S_OK, _pattern(512, 8))
    # scattered segments through preadv / pwritev
    parts = [_pattern(512, s) for s in (10, 11)]
    bufs = [blk.buf(p, 512)[0] for p in parts]
    st_gpa, st_view = blk.status()
    blk.run([(blk.hdr(B.VIRTIO_BLK_T_OUT, 50), 16)] + [(g, 512) for g in bufs], [(st_gpa, 1)])
    assert st_view[0] == B.VIRTIO_BLK_S_OK
    with open(path, "rb") as f:
        f.seek(50 * 512)
        assert f.read(1024) == b"".join(parts)
    # flush is an fsync of the image
    st_gpa, st_view = blk.status()
    assert blk.run([(blk.hdr(B.VIRTIO_BLK_T_FLUSH, 0), 16)], [(st_gpa, 1)]) == 1
    assert st_view[0] == B.VIRTIO_BLK_S_OK
    assert os.path.getsize(path) == DISK_SIZE


def test_blk_on_a_readonly_file(make, tmp_path):
    path = tmp_path / "ro.img"
    path.write_bytes(_pattern(64 * 1024, 2))
    be = FileBackend(str(path), None, readonly=True)
    blk = Blk(make(backend=be, readonly=True), V1 | F.bit(B.VIRTIO_BLK_F_RO))
    assert _cfg(blk.rig, B.CFG_CAPACITY, 4) == 128
    assert blk.write(0, bytes(512)) == B.VIRTIO_BLK_S_IOERR
    assert blk.read(1, 512) == (B.VIRTIO_BLK_S_OK, _pattern(64 * 1024, 2)[512:1024])
    assert path.read_bytes() == _pattern(64 * 1024, 2)


def test_blk_grown_file_disk_reads_zeros(make, tmp_path):
    be = FileBackend(str(tmp_path / "disk.img"), 64 * 1024, readonly=False)
    blk = Blk(make(backend=be), V1)
    blk.dev.resize(128 * 1024)
    status, data = blk.read(200, 512)      # inside the new capacity, past the old end
    assert status == B.VIRTIO_BLK_S_IOERR or data == bytes(512)
