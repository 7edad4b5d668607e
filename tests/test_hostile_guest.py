"""The host survives any guest: issue 8's device-side checklist, item by item.

Every item is a hostile (or buggy) driver's act written by hand into guest RAM or the trapped
registers (tests/rogue.py), against the real device code on a real virtio-mmio transport:
virtio-blk on a memory (or file) backend, virtio-net on a real switch, virtio-console; split
and packed rings wherever the item applies. For each one the test asserts what the spec and
vmsim's rules make of it:

- a malformed ring or chain is a device error with its specific reason (errors.Reason: the
  text starts "queue N: <reason>"), DEVICE_NEEDS_RESET in the status the driver reads, a
  config-change interrupt (InterruptStatus bit 1) when the device was live, the queue broken
  and never served again, and a reset bringing the device back;
- a request the device can answer is answered: VIRTIO_BLK_S_IOERR / S_UNSUPP with the reason
  counted (BlkMetrics), VIRTIO_NET_ERR for a bad control command, a counted drop for a frame
  the device will not send; the device stays live;
- register misuse is refused and logged as a guest error (the spec lets the device ignore it);
- always: no Python exception escapes (the device boundary would record an "internal device
  error"), nothing outside guest RAM is written (guard bytes around it), and two bystanders -
  another device of the same VM and a device of another VM - keep serving requests correctly.
  One item also runs for real: two VMs under `vmsim run`, one VM's ring corrupted from outside
  while it runs, the other VM's workload going on undisturbed.

Checklist item -> where it is tested. "here" is this module ([S] split, [P] packed); the
others are existing tests that cover the item at ring level or through another harness
(CHECKLIST below; test_checklist_points_at_real_tests keeps the map from going stale).

queue used before ready (or DRIVER_OK)
    here: test_queue_used_before_ready [S,P], test_notify_of_a_missing_queue [S,P]
size 0, above the maximum, not a power of two (split)
    here: test_bad_queue_size [S,P]; test_malformed_ring / test_malformed_packed::
    test_invalid_ring_size
ring parts misaligned or outside guest RAM
    here: test_bad_ring_layout [S,P]; test_malformed_*::test_misaligned_ring,
    test_ring_out_of_range; test_mmio_device::test_queue_ready_with_bad_ring_is_a_device_error
queue registers written in a state the spec forbids
    here: test_queue_registers_in_forbidden_states [S,P]; test_mmio_device::
    test_queue_registers_ignored_*; test_pci::test_queue_writes_in_the_wrong_state_are_rejected;
    test_queue_reset::test_queue_registers_are_locked_while_the_queue_is_ready
features accepted that were never offered
    here: test_features_never_offered; test_mmio_device::test_features_ok_refused
avail idx ahead by more than the queue size
    here: test_ring_fault[avail-idx-ahead] [S]; test_malformed_ring::test_avail_idx_*
head >= queue size (packed: buffer id >= queue size)
    here: test_ring_fault[head-out-of-range] [S], [id-out-of-range] [P];
    test_malformed_ring::test_head_out_of_range, test_malformed_packed::
    test_buffer_id_out_of_range
next >= table size
    here: test_ring_fault[next-out-of-range] [S]; test_malformed_ring::test_next_out_of_range
loop in a chain, chain longer than the table
    here: test_ring_fault[loop] [S], [chain-round-the-ring] [P];
    test_malformed_ring::test_loop_is_chain_too_long, test_malformed_packed::
    test_chain_longer_than_the_queue
more chains in flight than the queue size
    here: test_more_in_flight_than_the_queue_size [S,P] (a console holds its buffers);
    test_malformed_*::test_too_many_in_flight
readable after writable; zero-length buffer
    here: test_ring_fault[readable-after-writable], [zero-length] [S,P]
chain longer than 2^32 bytes
    test_malformed_ring::test_chain_too_big, test_three_descriptor_chain_too_big;
    test_malformed_packed::test_chain_too_big (they map 1.5 GiB of guest RAM)
buffer outside guest RAM, address overflow
    here: test_ring_fault[outside-ram], [address-overflow] [S,P]
more than 1024 segments
    here: test_ring_fault[indirect-over-1024] [S,P], test_segments_beyond_iov_max_on_a_file_disk
    [S,P], test_blk_requests[too-many-segments] [S,P]
indirect table: length 0 or not a multiple of 16, outside RAM, nested, with NEXT, not
negotiated, (packed) inside a chain
    here: test_ring_fault[indirect-*] [S,P]
blk: short or missing header; status byte area too small; wrong directions; length not a
multiple of 512 or past capacity; write to a read-only disk; unknown types
    here: test_blk_requests[*] [S,P], test_ring_fault[no-status-byte] [S,P]
net: short or oversized headers and frames; malformed control commands
    here: test_net_transmit_faults, test_net_receive_faults, test_net_control_faults [S,P];
    test_net::test_bad_control_commands_are_nacked
packed: ids, wrap counters, chain ends
    here: test_ring_fault[id-out-of-range], [id-in-flight], [used-flag-by-driver],
    [chain-round-the-ring], [indirect-in-chain]; test_malformed_packed::
    test_used_flag_set_by_the_driver
other devices and other VMs keep running
    here: every fault checks two bystanders (another device of the VM, a device of another
    VM); test_another_vm_keeps_running_under_vmsim_run (real processes)
"""

import importlib
import json
import mmap
import os
import re
import struct
import time
from pathlib import Path

import pytest
from rogue import (
    AVAIL,
    BASE,
    DOK,
    DRV,
    EVENT_IDX,
    FOK,
    GUEST_MAC,
    INDIRECT,
    INDIRECT_DESC,
    NEXT,
    PACKED,
    USED,
    V1,
    WRITE,
    GuardedRam,
    PackedWriter,
    Rig,
    SplitWriter,
    blk_read,
    make_blk,
    make_net,
)

from vmsim.abi import blk as B
from vmsim.abi import console as C
from vmsim.abi import features as F
from vmsim.abi import mmio as M
from vmsim.abi import net as N
from vmsim.abi import status as S
from vmsim.host.devices.blk.backend import FileBackend
from vmsim.host.devices.blk.device import BlkDevice
from vmsim.host.devices.console.backend import NullBackend
from vmsim.host.devices.console.device import ConsoleDevice
from vmsim.host.devices.console.ports import HostPort
from vmsim.host.devices.net.request import TX_FRAME_MAX
from vmsim.host.switch import Switch
from vmsim.host.virtio.errors import Reason

pytestmark = pytest.mark.timeout(60)

RAM = 0x10000
END = BASE + RAM
TABLE = BASE + 0x4000              # indirect tables
TABLE2 = BASE + 0x4800
HDR = BASE + 0x8000                # a request: header, data, status
DATA = BASE + 0x8200
STATUS = BASE + 0x7000
BIG = BASE + 0x9000                # room for large buffers (up to 0xC000)
U64 = 2**64 - 1
FORMATS = ["split", "packed"]


def sane(packed: bool, k: int = 0) -> tuple[int, int, int]:
    """Where queue k of the victim lives: aligned, apart, inside RAM."""
    d = BASE + 0x1000 + 0x800 * k
    return (d, d + 0x400, d + 0x600) if not packed else (d, d + 0x400, d + 0x440)


# ---- the bystanders: another device of the same VM, a device of another VM -----------------------
class Bystanders:
    """A blk device in the victim's guest RAM (its ring and buffers away from the victim's)
    and a blk device of a second VM; `check` has each serve a read and verifies the data."""

    def __init__(self, victim_ram: GuardedRam) -> None:
        self.other_ram = GuardedRam(RAM)
        self.rigs = [Rig(lambda m: make_blk(m, name="vdb"), guarded=victim_ram,
                         mmio_base=0x0A00_0200),
                     Rig(lambda m: make_blk(m, name="vm1.vda"), guarded=self.other_ram)]
        for r in self.rigs:
            r.dev.backend.mem[:4096] = bytes(i * 5 & 0xFF for i in range(4096))
            r.bring_up(V1, [(8, BASE + 0xC000, BASE + 0xC400, BASE + 0xC600)])
        self.served = 0

    def check(self) -> None:
        for r in self.rigs:
            w = r.writer(0)
            w.idx = r.dev.queues[0].ring.last_avail_idx
            hdr, data, status = BASE + 0xE000, BASE + 0xE200, BASE + 0xE400
            sector = self.served % 4
            blk_read(w, hdr, data, status, sector=sector)
            r.kick(0)
            assert r.service(0) == 1, r.dev.errors
            assert r.ram.mv[status - BASE] == B.VIRTIO_BLK_S_OK
            assert bytes(r.ram.mv[data - BASE:data - BASE + 512]) == \
                bytes(r.dev.backend.mem[sector * 512:sector * 512 + 512])
            assert not r.dev.errors and not r.dev.guest_errors
            r.assert_survived()
        self.served += 1

    def close(self) -> None:
        for r in self.rigs:
            r.close()
        self.other_ram.close()


class Victim:
    """The device under attack (its own guest RAM with guards) and the bystanders."""

    def __init__(self, make, features: int, nq: int = 1, num: int = 8, ram: int = RAM,
                 layouts: list[tuple[int, int, int, int]] | None = None) -> None:
        self.ram = GuardedRam(ram)
        self.rig = Rig(make, guarded=self.ram)
        self.packed = bool(features & PACKED)
        self.features = features
        self.layouts = layouts or [(num, *sane(self.packed, k)) for k in range(nq)]
        self.bystanders = Bystanders(self.ram)
        self.writers: dict[int, SplitWriter | PackedWriter] = {}

    def up(self) -> None:
        self.rig.bring_up(self.features, self.layouts)
        assert self.rig.status == S.ACKNOWLEDGE | DRV | FOK | DOK, self.rig.dev.errors
        self.writers.clear()

    def writer(self, k: int = 0) -> SplitWriter | PackedWriter:
        """The driver's side of queue k (its position kept from one request to the next)."""
        if k not in self.writers:
            self.writers[k] = self.rig.writer(k)
        return self.writers[k]

    def close(self) -> None:
        self.bystanders.close()
        self.rig.close()
        self.ram.close()


@pytest.fixture
def victims():
    made: list[Victim] = []

    def make(*args, **kw) -> Victim:
        made.append(Victim(*args, **kw))
        return made[-1]

    yield make
    for v in made:
        v.close()


def blk_victim(victims, fmt: str, features: int = V1 | INDIRECT_DESC | EVENT_IDX, **kw):
    packed = fmt == "packed"
    v = victims(lambda m: make_blk(m, packed=packed, **kw), features | (PACKED if packed else 0))
    v.rig.dev.backend.mem[:1 << 16] = bytes(i * 3 & 0xFF for i in range(1 << 16))
    return v


def assert_device_error(v: Victim, reason: Reason, queue: int = 0) -> None:
    """virtio_error's outcome, seen as the driver sees it, and nothing else harmed."""
    rig, dev = v.rig, v.rig.dev
    assert len(dev.errors) == 1, dev.errors
    assert dev.errors[0].startswith(f"queue {queue}: {reason.value}"), dev.errors
    st = rig.status                                     # a trapped read, as the driver's
    assert st & S.DEVICE_NEEDS_RESET and st & DOK
    assert rig.interrupts() & M.INT_CONFIG              # the config-change interrupt
    assert dev.queues[queue].broken and dev.live_queues() == []
    rig.assert_survived()
    # a broken queue is not served again: nothing in guest RAM changes
    before = bytes(v.ram.mv)
    rig.kick(queue)
    assert rig.service(queue) == 0
    assert bytes(v.ram.mv) == before and len(dev.errors) == 1
    v.bystanders.check()
    # the driver's reset clears it; set up again, the device serves
    rig.w(M.STATUS, 0)
    assert rig.status == 0 and not dev.broken and not dev.queues[queue].broken
    v.ram.zero()


def assert_blk_recovers(v: Victim) -> None:
    """Set up again after a reset, the device serves a read (the errors of before stay in
    its record for the run summary; no new one)."""
    errors = len(v.rig.dev.errors)
    v.up()
    w = v.writer()
    blk_read(w, HDR, DATA, STATUS, sector=1)
    v.rig.kick(0)
    assert v.rig.service(0) == 1 and len(v.rig.dev.errors) == errors
    assert v.ram.mv[STATUS - BASE] == B.VIRTIO_BLK_S_OK
    assert bytes(v.ram.mv[DATA - BASE:DATA - BASE + 512]) == \
        bytes(v.rig.dev.backend.mem[512:1024])
    v.rig.assert_survived()


# ---- the checklist map is checked ----------------------------------------------------------------
CHECKLIST = {
    "test_malformed_ring": ["test_invalid_ring_size", "test_misaligned_ring",
                            "test_ring_out_of_range", "test_avail_idx_too_far_ahead",
                            "test_avail_idx_moved_backwards", "test_head_out_of_range",
                            "test_next_out_of_range", "test_loop_is_chain_too_long",
                            "test_too_many_in_flight", "test_chain_too_big",
                            "test_three_descriptor_chain_too_big"],
    "test_malformed_packed": ["test_invalid_ring_size", "test_misaligned_ring",
                              "test_ring_out_of_range", "test_buffer_id_out_of_range",
                              "test_chain_longer_than_the_queue", "test_too_many_in_flight",
                              "test_chain_too_big", "test_used_flag_set_by_the_driver"],
    "test_mmio_device": ["test_queue_ready_with_bad_ring_is_a_device_error",
                         "test_queue_registers_ignored_before_features_ok",
                         "test_queue_registers_ignored_after_driver_ok",
                         "test_queue_registers_ignored_while_ready",
                         "test_features_ok_refused"],
    "test_pci": ["test_queue_writes_in_the_wrong_state_are_rejected"],
    "test_queue_reset": ["test_queue_registers_are_locked_while_the_queue_is_ready"],
    "test_net": ["test_bad_control_commands_are_nacked"],
}


def test_checklist_points_at_real_tests():
    for module, names in CHECKLIST.items():
        mod = importlib.import_module(module)
        for name in names:
            assert callable(getattr(mod, name, None)), f"{module}::{name} is gone"


# ---- queue setup: before ready, sizes, layout, register states, features ------------------------
@pytest.mark.parametrize("fmt", FORMATS)
def test_queue_used_before_ready(victims, fmt):
    """Buffers made available and kicked on a queue that is programmed but not ready, then
    ready but before DRIVER_OK: the device touches nothing (spec 3.1.1: no buffer consumed
    before DRIVER_OK) and raises no error; once the driver is done, they are served."""
    v = blk_victim(victims, fmt)
    rig = v.rig
    assert rig.negotiate(v.features) & FOK
    num, d, a, u = v.layouts[0]
    rig.program_queue(0, num, d, a, u)
    w = (PackedWriter if v.packed else SplitWriter)(v.ram, num, d, a, u)
    blk_read(w, HDR, DATA, STATUS, sector=2)
    before = bytes(v.ram.mv)
    for _ in range(2):                      # not ready; then ready, no DRIVER_OK
        rig.kick(0)
        rig.w(M.QUEUE_NOTIFY, 0)            # the trapped notify too
        assert rig.service(0) == 0
        assert bytes(v.ram.mv) == before
        assert not rig.dev.errors and rig.interrupts() == 0
        rig.ready(0)
    rig.driver_ok()
    rig.kick(0)
    assert rig.service(0) == 1
    assert v.ram.mv[STATUS - BASE] == B.VIRTIO_BLK_S_OK
    assert bytes(v.ram.mv[DATA - BASE:DATA - BASE + 512]) == \
        bytes(rig.dev.backend.mem[1024:1536])
    rig.assert_survived()
    v.bystanders.check()


@pytest.mark.parametrize("fmt", FORMATS)
def test_notify_of_a_missing_queue(victims, fmt):
    v = blk_victim(victims, fmt)
    v.up()
    for value in (1, 7, 0xFFFF, 0xFFFF_FFFF):
        v.rig.w(M.QUEUE_NOTIFY, value)
    assert not v.rig.dev.errors and not v.rig.dev.broken
    v.rig.assert_survived()
    assert_blk_recovers_live(v)


def assert_blk_recovers_live(v: Victim) -> None:
    """The live device still serves a read."""
    blk_read(v.writer(), HDR, DATA, STATUS, sector=1)
    v.rig.kick(0)
    assert v.rig.service(0) == 1 and not v.rig.dev.errors
    assert v.ram.mv[STATUS - BASE] == B.VIRTIO_BLK_S_OK
    v.bystanders.check()


def _setup_fault(v: Victim, layout, reason: Reason) -> None:
    """QueueReady with a bad layout: a device error at once (the device is not live yet, so no
    interrupt); the driver, not checking, sets DRIVER_OK: nothing is served, nothing is
    written, nothing raised; a reset and a good layout bring it back."""
    rig, dev = v.rig, v.rig.dev
    assert rig.negotiate(v.features) & FOK
    rig.program_queue(0, *layout)
    rig.ready(0)
    assert rig.r(M.QUEUE_READY) == 0
    assert len(dev.errors) == 1 and dev.errors[0].startswith(f"queue 0: {reason.value}"), \
        dev.errors
    assert rig.status & S.DEVICE_NEEDS_RESET and rig.interrupts() == 0
    rig.driver_ok()
    before = bytes(v.ram.mv)
    rig.kick(0)
    assert rig.service(0) == 0 and bytes(v.ram.mv) == before
    assert rig.status & S.DEVICE_NEEDS_RESET
    rig.assert_survived()
    v.bystanders.check()
    rig.w(M.STATUS, 0)
    assert_blk_recovers(v)


@pytest.mark.parametrize("fmt,num", [("split", 0), ("split", 3), ("split", 12),
                                     ("split", 16), ("split", 32768), ("split", 65535),
                                     ("packed", 0), ("packed", 9), ("packed", 32768)],
                         ids=str)
def test_bad_queue_size(victims, fmt, num):
    """Zero, above the device's QueueNumMax (8 here; the spec's 32768 too), not a power of
    two for a split ring. (A packed ring may have any size up to the maximum.)"""
    v = blk_victim(victims, fmt)
    d, a, u = sane(v.packed)
    _setup_fault(v, (num, d, a, u), Reason.INVALID_RING_SIZE)


def test_odd_packed_size_is_fine(victims):
    v = blk_victim(victims, "packed")
    v.layouts = [(5, *sane(True))]
    assert_blk_recovers(v)


BAD_LAYOUTS = [
    # (what, part, value, reason)
    ("desc-misaligned", 0, 8, Reason.MISALIGNED_RING),
    ("desc-misaligned-1", 0, 1, Reason.MISALIGNED_RING),
    ("driver-misaligned", 1, 1, Reason.MISALIGNED_RING),
    ("device-misaligned", 2, 2, Reason.MISALIGNED_RING),
    ("desc-past-end", 0, END, Reason.RING_OUT_OF_RANGE),
    ("desc-straddles-end", 0, END - 64, Reason.RING_OUT_OF_RANGE),
    ("driver-below-ram", 1, BASE - 0x1000, Reason.RING_OUT_OF_RANGE),
    ("device-at-zero", 2, 0, Reason.RING_OUT_OF_RANGE),
    ("desc-overflows", 0, 2**64 - 16, Reason.RING_OUT_OF_RANGE),
    ("device-overflows", 2, 2**64 - 4, Reason.RING_OUT_OF_RANGE),
]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("what,part,value,reason", BAD_LAYOUTS, ids=[b[0] for b in BAD_LAYOUTS])
def test_bad_ring_layout(victims, fmt, what, part, value, reason):
    v = blk_victim(victims, fmt)
    addrs = list(sane(v.packed))
    # misalignments are offsets from the good address, the rest absolute
    addrs[part] = addrs[part] + value if "misaligned" in what else value
    _setup_fault(v, (8, *addrs), reason)


@pytest.mark.parametrize("fmt", FORMATS)
def test_queue_registers_in_forbidden_states(victims, fmt):
    """Every queue register, written before FEATURES_OK, while the queue is ready, and after
    DRIVER_OK (without RING_RESET): each refused as a guest error, the live ring unchanged,
    the device still serving."""
    v = blk_victim(victims, fmt)
    rig, dev = v.rig, v.rig.dev
    regs = [M.QUEUE_NUM, M.QUEUE_DESC_LOW, M.QUEUE_DESC_HIGH, M.QUEUE_DRIVER_LOW,
            M.QUEUE_DRIVER_HIGH, M.QUEUE_DEVICE_LOW, M.QUEUE_DEVICE_HIGH]
    rig.w(M.STATUS, S.ACKNOWLEDGE)
    rig.w(M.STATUS, S.ACKNOWLEDGE | DRV)
    for reg in [*regs, M.QUEUE_READY]:
        rig.w(reg, 1)
    assert len(dev.guest_errors) == 8 and dev.queues[0].num == 8 and not dev.queues[0].ready
    rig.w(M.STATUS, 0)
    v.features &= ~F.bit(F.VIRTIO_F_RING_RESET)
    v.up()
    ring = dev.queues[0].ring
    n = len(dev.guest_errors)
    for reg in regs:
        rig.w(reg, 0xDEAD_0000)                     # ready, and DRIVER_OK: both forbid it
    assert len(dev.guest_errors) == n + len(regs)
    q = dev.queues[0]
    assert dev.queues[0].ring is ring and (q.num, q.desc, q.driver, q.device) == v.layouts[0]
    assert not dev.errors
    rig.assert_survived()
    assert_blk_recovers_live(v)


NEVER_OFFERED = [
    ("RING_PACKED", F.bit(F.VIRTIO_F_RING_PACKED)),     # a split-only device
    ("IN_ORDER", F.bit(F.VIRTIO_F_IN_ORDER)),           # offered only on request
    ("NOTIFICATION_DATA", F.bit(F.VIRTIO_F_NOTIFICATION_DATA)),
    ("BLK_MQ", F.bit(B.VIRTIO_BLK_F_MQ)),               # one queue
    ("BLK_DISCARD", F.bit(B.VIRTIO_BLK_F_DISCARD)),
    ("ACCESS_PLATFORM", F.bit(F.VIRTIO_F_ACCESS_PLATFORM)),
    ("bit-63", 1 << 63),
    ("bit-50", 1 << 50),
]


@pytest.mark.parametrize("name,bit", NEVER_OFFERED, ids=[n for n, _ in NEVER_OFFERED])
def test_features_never_offered(victims, name, bit):
    """The driver accepts a feature the device never offered: FEATURES_OK does not stick
    (spec 3.1.1: the driver re-reads it), the reason is a guest error naming the feature, the
    queues stay closed, DRIVER_OK is refused; after a reset, honest features work."""
    v = blk_victim(victims, "split")
    rig, dev = v.rig, v.rig.dev
    assert not dev.device_features & bit
    assert rig.negotiate(V1 | bit) == S.ACKNOWLEDGE | DRV
    assert any("never offered" in e for e in dev.guest_errors), dev.guest_errors
    rig.program_queue(0, *v.layouts[0])
    rig.ready(0)
    rig.driver_ok()
    assert not rig.status & (FOK | DOK) and dev.queues[0].ring is None
    assert not dev.errors
    rig.assert_survived()
    v.bystanders.check()
    rig.w(M.STATUS, 0)
    assert_blk_recovers(v)


# ---- the ring: indices, chains, buffers, indirect tables -----------------------------------------
def _req(w, segs, head=0, **kw):
    """A block read's header, then `segs` (direction as given)."""
    struct.pack_into("<IIQ", w.ram.mv, HDR - BASE, B.VIRTIO_BLK_T_IN, 0, 0)
    return w.chain([(HDR, 16, 0), *segs], head, **kw)


def _avail_ahead(w):
    _req(w, [(STATUS, 1, WRITE)])
    w.set_avail_idx(w.idx + w.num)          # num + 1 ahead of the device (which is at idx-1)


def _head_out_of_range(w):
    w.publish(w.num)


def _next_out_of_range(w):
    w.desc(0, HDR, 16, NEXT, w.num)
    w.publish(0)


def _loop(w):
    w.desc(0, HDR, 16, NEXT, 1)
    w.desc(1, DATA, 16, NEXT, 0)
    w.publish(0)


def _round_the_ring(w):
    w.chain([(HDR, 16, NEXT)] * w.num, 0, raw=True)


def _id_out_of_range(w):
    _req(w, [(STATUS, 1, WRITE)], w.num)


def _id_in_flight(w):
    _req(w, [(STATUS, 1, WRITE)], 3)
    _req(w, [(STATUS, 1, WRITE)], 3)


def _used_flag(w):
    w.desc(w.pos, HDR, 16, 0, (AVAIL | USED if w.wrap else 0) | WRITE)


def _r_after_w(w):
    w.chain([(STATUS, 1, WRITE), (HDR, 16, 0)], 0)


def _zero_length(w):
    _req(w, [(DATA, 0, WRITE), (STATUS, 1, WRITE)])


def _outside_ram(w):
    _req(w, [(END - 8, 16, WRITE), (STATUS, 1, WRITE)])


def _overflow(w):
    _req(w, [(U64 - 7, 16, WRITE), (STATUS, 1, WRITE)])


def _no_status_byte(w):
    _req(w, [])


def _table(length, addr=TABLE):
    def fault(w):
        w.desc(0, HDR, 16, table=TABLE)             # an entry, if the table is read at all
        w.chain([(addr, length, INDIRECT)], 0)
    return fault


def _nested(w):
    w.indirect(TABLE, [(HDR, 16, 0), (TABLE2, 16, INDIRECT | WRITE)], 0)


def _indirect_next(w):
    w.indirect(TABLE, [(HDR, 16, 0), (STATUS, 1, WRITE)], 0, extra=NEXT)


def _indirect_in_chain(w):
    w.desc(0, STATUS, 1, 0, WRITE, table=TABLE)
    w.chain([(HDR, 16, NEXT), (TABLE, 16, INDIRECT)], 0, raw=True)


def _over_1024(w):
    w.chain([(TABLE, 16 * 1025, INDIRECT)], 0)     # more than max(queue size, 1024) entries


def _indirect_plain(w):
    w.indirect(TABLE, [(HDR, 16, 0), (STATUS, 1, WRITE)], 0)


RING_FAULTS = [
    # (name, formats, fault, reason, features to withhold)
    ("avail-idx-ahead", ["split"], _avail_ahead, Reason.INVALID_AVAIL_IDX, 0),
    ("head-out-of-range", ["split"], _head_out_of_range, Reason.INVALID_HEAD, 0),
    ("id-out-of-range", ["packed"], _id_out_of_range, Reason.INVALID_BUFFER_ID, 0),
    ("id-in-flight", ["packed"], _id_in_flight, Reason.BUFFER_ID_IN_FLIGHT, 0),
    ("used-flag-by-driver", ["packed"], _used_flag, Reason.USED_FLAG_BY_DRIVER, 0),
    ("next-out-of-range", ["split"], _next_out_of_range, Reason.INVALID_NEXT, 0),
    ("loop", ["split"], _loop, Reason.CHAIN_TOO_LONG, 0),
    ("chain-round-the-ring", ["packed"], _round_the_ring, Reason.CHAIN_TOO_LONG, 0),
    ("readable-after-writable", FORMATS, _r_after_w, Reason.READABLE_AFTER_WRITABLE, 0),
    ("zero-length", FORMATS, _zero_length, Reason.ZERO_LENGTH, 0),
    ("outside-ram", FORMATS, _outside_ram, Reason.ADDRESS_OUT_OF_RANGE, 0),
    ("address-overflow", FORMATS, _overflow, Reason.ADDRESS_OUT_OF_RANGE, 0),
    ("no-status-byte", FORMATS, _no_status_byte, Reason.MALFORMED_REQUEST, 0),
    ("indirect-len-0", FORMATS, _table(0), Reason.INDIRECT_BAD_LENGTH, 0),
    ("indirect-len-24", FORMATS, _table(24), Reason.INDIRECT_BAD_LENGTH, 0),
    ("indirect-outside", FORMATS, _table(48, END - 16), Reason.INDIRECT_OUT_OF_RANGE, 0),
    ("indirect-overflow", FORMATS, _table(48, U64 - 15), Reason.INDIRECT_OUT_OF_RANGE, 0),
    ("indirect-nested", FORMATS, _nested, Reason.NESTED_INDIRECT, 0),
    ("indirect-with-next", FORMATS, _indirect_next, Reason.INDIRECT_WITH_NEXT, 0),
    ("indirect-in-chain", ["packed"], _indirect_in_chain, Reason.INDIRECT_IN_CHAIN, 0),
    ("indirect-over-1024", FORMATS, _over_1024, Reason.CHAIN_TOO_LONG, 0),
    ("indirect-not-negotiated", FORMATS, _indirect_plain, Reason.INDIRECT_NOT_NEGOTIATED,
     INDIRECT_DESC),
]
RING_CASES = [pytest.param(fmt, fault, reason, withhold, id=f"{name}-{fmt}")
              for name, fmts, fault, reason, withhold in RING_FAULTS for fmt in fmts]


@pytest.mark.parametrize("fmt,fault,reason,withhold", RING_CASES)
def test_ring_fault(victims, fmt, fault, reason, withhold):
    """A good request is served first; then the fault: the device error with its reason."""
    v = blk_victim(victims, fmt, (V1 | INDIRECT_DESC | EVENT_IDX) & ~withhold)
    v.up()
    w = v.writer()
    blk_read(w, HDR, DATA, STATUS, sector=3)
    v.rig.kick(0)
    assert v.rig.service(0) == 1 and v.ram.mv[STATUS - BASE] == B.VIRTIO_BLK_S_OK
    v.rig.interrupts()
    fault(w)
    v.rig.kick(0)
    v.rig.service(0)                                    # returns; nothing raised
    assert_device_error(v, reason)
    v.features |= withhold
    assert_blk_recovers(v)


@pytest.mark.parametrize("fmt", FORMATS)
def test_more_in_flight_than_the_queue_size(victims, fmt):
    """A console holds receive buffers until input comes: the driver makes one more available
    than the queue holds (split: avail idx one past; packed: slot 0 again in the next lap)."""
    packed = fmt == "packed"

    def make(mem):
        return ConsoleDevice("hvc0", mem, [HostPort(0, "console", NullBackend(), True, (80, 24))],
                             multiport=False, queue_size=8, packed=packed)

    v = victims(make, V1 | (PACKED if packed else 0), nq=2)
    v.up()
    w = v.writer(C.rx_queue(0))
    for k in range(8):
        w.chain([(DATA + 64 * k, 64, WRITE)], k)
    v.rig.kick(0)
    v.rig.service(0)
    assert v.rig.dev.queues[0].ring.inflight == 8 and not v.rig.dev.errors
    w.chain([(DATA, 64, WRITE)], 0)         # (packed: id 0 is in flight too)
    v.rig.kick(0)
    v.rig.service(0)
    assert_device_error(v, Reason.TOO_MANY_IN_FLIGHT)


# ---- virtio-blk requests -------------------------------------------------------------------------
def _blk_segs(case: str):
    """(segments, type, sector, expected status, BlkMetrics counter) of one request."""
    IN, OUT = B.VIRTIO_BLK_T_IN, B.VIRTIO_BLK_T_OUT
    ok, ioerr, unsupp = B.VIRTIO_BLK_S_OK, B.VIRTIO_BLK_S_IOERR, B.VIRTIO_BLK_S_UNSUPP
    st_ = (STATUS, 1, WRITE)
    hdr = (HDR, 16, 0)
    return {
        "no-header": ([(DATA, 512, WRITE), st_], IN, 0, ioerr, "bad_header"),
        "short-header": ([(HDR, 8, 0), (DATA, 512, WRITE), st_], IN, 0, ioerr, "bad_header"),
        "split-short-header": ([(HDR, 8, 0), (HDR + 8, 4, 0), st_], OUT, 0, ioerr,
                               "bad_header"),
        "read-into-readable": ([hdr, (DATA, 512, 0), st_], IN, 0, ioerr, "bad_direction"),
        "write-from-writable": ([hdr, (DATA, 512, WRITE), st_], OUT, 0, ioerr,
                                "bad_direction"),
        "odd-length-read": ([hdr, (DATA, 100, WRITE), st_], IN, 0, ioerr, "bad_length"),
        "odd-length-write": ([hdr, (DATA, 513, 0), st_], OUT, 0, ioerr, "bad_length"),
        "past-capacity": ([hdr, (DATA, 1024, WRITE), st_], IN, 2047, ioerr, "out_of_range"),
        "sector-overflow": ([hdr, (DATA, 512, 0), st_], OUT, U64, ioerr, "out_of_range"),
        "too-many-segments": ([hdr, *[(DATA + 512 * k, 512, WRITE) for k in range(7)], st_],
                              IN, 0, ioerr, "too_many_segments"),
        "type-discard": ([hdr, (DATA, 16, 0), st_], B.VIRTIO_BLK_T_DISCARD, 0, unsupp,
                         "unsupported"),
        "type-scsi": ([hdr, st_], B.VIRTIO_BLK_T_SCSI_CMD, 0, unsupp, "unsupported"),
        "type-max": ([hdr, st_], 0xFFFF_FFFF, 0, unsupp, "unsupported"),
        "type-flush-not-negotiated": ([hdr, st_], B.VIRTIO_BLK_T_FLUSH, 0, unsupp,
                                      "unsupported"),
        "status-shares-the-data": ([hdr, (DATA, 513, WRITE)], IN, 1, ok, "reads"),
    }[case]


BLK_CASES = ["no-header", "short-header", "split-short-header", "read-into-readable",
             "write-from-writable", "odd-length-read", "odd-length-write", "past-capacity",
             "sector-overflow", "too-many-segments", "type-discard", "type-scsi", "type-max",
             "type-flush-not-negotiated", "status-shares-the-data", "readonly-write"]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("case", BLK_CASES)
def test_blk_requests(victims, fmt, case):
    """Requests the device can answer are answered, bad or not, each with its status and
    the reason counted; guest data and the disk are touched only by a request that succeeds;
    the device stays live."""
    readonly = case == "readonly-write"
    if readonly:
        segs, typ, sector, status, counter = ([(HDR, 16, 0), (DATA, 512, 0),
                                               (STATUS, 1, WRITE)], B.VIRTIO_BLK_T_OUT, 0,
                                              B.VIRTIO_BLK_S_IOERR, "readonly_writes")
    else:
        segs, typ, sector, status, counter = _blk_segs(case)
    v = blk_victim(victims, fmt, readonly=readonly, disk=1 << 20)
    assert v.rig.dev.seg_max == 6                   # a queue of 8 less header and status
    v.features |= F.bit(B.VIRTIO_BLK_F_RO) if readonly else 0
    v.up()
    struct.pack_into("<IIQ", v.ram.mv, HDR - BASE, typ, 0, sector)
    v.ram.mv[DATA - BASE:DATA - BASE + 4096] = b"\xab" * 4096
    v.ram.mv[STATUS - BASE] = 0xEE
    disk = bytes(v.rig.dev.backend.mem)
    if len(segs) > 4:
        v.writer().indirect(TABLE, segs, 0)         # more than the ring holds
    else:
        v.writer().chain(segs, 0)
    v.rig.kick(0)
    assert v.rig.service(0) == 1
    m = v.rig.dev.metrics
    last = segs[-1]
    assert v.ram.mv[last[0] + last[1] - 1 - BASE] == status
    assert getattr(m, counter) == 1, m.as_dict()
    assert m.io_errors == (status == B.VIRTIO_BLK_S_IOERR)
    if status != B.VIRTIO_BLK_S_OK:
        assert bytes(v.rig.dev.backend.mem) == disk
        assert bytes(v.ram.mv[DATA - BASE:DATA - BASE + 4096]) == b"\xab" * 4096
    assert not v.rig.dev.errors and not v.rig.dev.broken
    v.rig.assert_survived()
    assert_blk_recovers_live(v)


@pytest.mark.parametrize("fmt", FORMATS)
def test_segments_beyond_iov_max_on_a_file_disk(victims, tmp_path, fmt):
    """seg_max is the queue size less two (QEMU's rule): on a queue of 2048 a request may have
    1500 data segments, more than one preadv / pwritev takes (IOV_MAX, 1024). A write and a
    read of 1500 segments through an indirect table are served; 2047 segments are refused
    with IOERR (more than seg_max); a table of 2049 entries is a device error."""
    packed = fmt == "packed"
    path = str(tmp_path / "disk.img")

    def make(mem):
        return BlkDevice("vda", mem, FileBackend(path, 1 << 20, False), readonly=False,
                         num_queues=1, queue_size=2048, offer=0, withhold=0, packed=packed,
                         blk_size=512, serial="x", dev_stats=None, queue_stats=[None])

    # a VM of 1 MiB: the ring of 2048 at 0x10000, tables at 0x20000, data from 0x40000
    d = BASE + 0x10000
    v = victims(make, V1 | INDIRECT_DESC | (PACKED if packed else 0), ram=0x100000,
                layouts=[(2048, d, d + 0x8000, d + (0x8040 if packed else 0xA000))])
    v.up()
    n = 1500
    table = BASE + 0x20000
    data = BASE + 0x40000
    pattern = bytes((i * 11) & 0xFF for i in range(512 * n // 8)) * 8
    v.ram.mv[data - BASE:data - BASE + 512 * n] = pattern
    struct.pack_into("<IIQ", v.ram.mv, HDR - BASE, B.VIRTIO_BLK_T_OUT, 0, 8)
    w = v.writer()
    w.indirect(table, [(HDR, 16, 0), *[(data + 512 * k, 512, 0) for k in range(n)],
                       (STATUS, 1, WRITE)], 0)
    v.rig.kick(0)
    assert v.rig.service(0) == 1 and not v.rig.dev.errors
    assert v.ram.mv[STATUS - BASE] == B.VIRTIO_BLK_S_OK
    with open(path, "rb") as f:
        f.seek(8 * 512)
        assert f.read(512 * n) == pattern
    # read it back into zeroed buffers
    v.ram.mv[data - BASE:data - BASE + 512 * n] = bytes(512 * n)
    struct.pack_into("<IIQ", v.ram.mv, HDR - BASE, B.VIRTIO_BLK_T_IN, 0, 8)
    w.indirect(table, [(HDR, 16, 0), *[(data + 512 * k, 512, WRITE) for k in range(n)],
                       (STATUS, 1, WRITE)], 1)
    v.rig.kick(0)
    assert v.rig.service(0) == 1 and v.ram.mv[STATUS - BASE] == B.VIRTIO_BLK_S_OK
    assert bytes(v.ram.mv[data - BASE:data - BASE + 512 * n]) == pattern
    # more data segments than seg_max (2046) in a table of 2048 (the status byte shares the
    # last one): answered IOERR
    struct.pack_into("<IIQ", v.ram.mv, HDR - BASE, B.VIRTIO_BLK_T_IN, 0, 0)
    w.indirect(table, [(HDR, 16, 0), *[(data, 512, WRITE)] * 2046, (STATUS, 513, WRITE)], 2)
    v.rig.kick(0)
    assert v.rig.service(0) == 1 and v.ram.mv[STATUS + 512 - BASE] == B.VIRTIO_BLK_S_IOERR
    assert v.rig.dev.metrics.too_many_segments == 1
    # a table longer than max(queue size, 1024): a device error
    w.indirect(table, [(HDR, 16, 0), *[(data, 512, WRITE)] * 2048], 3)
    v.rig.kick(0)
    v.rig.service(0)
    assert_device_error(v, Reason.CHAIN_TOO_LONG)


# ---- virtio-net ----------------------------------------------------------------------------------
class Wire:
    """The test's own port on the victim's switch: every frame the device sends."""

    def __init__(self) -> None:
        self.switch = Switch("lan")
        self.seen: list[bytes] = []
        self.port = self.switch.attach("wire", lambda f, meta: self.seen.append(f))


PEER = bytes.fromhex("5254000000ff")
NET_FEATURES = (V1 | INDIRECT_DESC | F.bit(N.VIRTIO_NET_F_MAC) | F.bit(N.VIRTIO_NET_F_CTRL_VQ)
                | F.bit(N.VIRTIO_NET_F_CTRL_RX) | F.bit(N.VIRTIO_NET_F_CTRL_MAC_ADDR))


def net_victim(victims, fmt: str, mrg: bool = False):
    wire = Wire()
    packed = fmt == "packed"
    feats = NET_FEATURES | (F.bit(N.VIRTIO_NET_F_MRG_RXBUF) if mrg else 0) \
        | (PACKED if packed else 0)
    v = victims(lambda m: make_net(m, packed=packed, switch=wire.switch), feats, nq=3)
    v.wire = wire
    v.up()
    return v


def frame(n: int, dst: bytes = PEER, src: bytes = GUEST_MAC) -> bytes:
    return (dst + src + b"\x88\xb5" + bytes(i & 0xFF for i in range(n)))[:max(n, 0) + 14]


def _tx(v, segs, bid=0):
    v.writer(1).chain(segs, bid)
    v.rig.kick(1)
    return v.rig.service(1)


def _assert_net_live(v):
    """The device still sends a good frame."""
    f = frame(50)
    at = BIG + 0x2000
    v.ram.mv[at - BASE:at - BASE + 12 + len(f)] = bytes(12) + f
    n_seen = len(v.wire.seen)
    _tx(v, [(at, 12 + len(f), 0)], 5)
    assert v.wire.seen[n_seen:] == [f]
    assert not v.rig.dev.errors and not v.rig.dev.broken
    v.rig.assert_survived()
    v.bystanders.check()


@pytest.mark.parametrize("fmt", FORMATS)
def test_net_transmit_faults(victims, fmt):
    """Frames the device will not send are dropped and counted (one shorter than an Ethernet
    header; one longer than any frame, refused before a byte of it is read - the chain names
    the same 2 KiB buffer 40 times); a buffer with no room for the virtio-net header is a
    device error."""
    v = net_victim(victims, fmt)
    m = v.rig.dev.metrics
    short = frame(0)[:10]
    v.ram.mv[BIG - BASE:BIG - BASE + 22] = bytes(12) + short
    assert _tx(v, [(BIG, 22, 0)], 0) == 1
    assert m.tx_errors == 1 and v.wire.seen == []
    # 80 KiB: an indirect table naming the same 2 KiB 40 times
    v.ram.mv[BIG - BASE:BIG - BASE + 12] = bytes(12)
    assert 12 + TX_FRAME_MAX < 40 * 2048
    v.writer(1).indirect(TABLE, [(BIG, 2048, 0)] * 40, 1)
    v.rig.kick(1)
    assert v.rig.service(1) == 1
    assert m.tx_dropped_oversize == 1 and v.wire.seen == []
    _assert_net_live(v)
    # the header itself cut short (5 bytes of the 12)
    v.writer(1).chain([(BIG, 5, 0)], 6)
    v.rig.kick(1)
    v.rig.service(1)
    assert_device_error(v, Reason.NET_HEADER_SHORT, queue=1)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("case", ["no-writable-part", "mergeable-smaller-than-header",
                                  "too-small-without-mergeable"])
def test_net_receive_faults(victims, fmt, case):
    """Receive buffers the device cannot fill as the spec says: no device-writable part (a
    device error); with MRG_RXBUF, a buffer smaller than the virtio-net header (a device
    error: the driver MUST NOT); without MRG_RXBUF, one too small for the frame (the frame is
    dropped and counted: the driver only SHOULD post big enough buffers)."""
    v = net_victim(victims, fmt, mrg=case == "mergeable-smaller-than-header")
    w = v.writer(0)
    seg = {"no-writable-part": (BIG, 1600, 0), "mergeable-smaller-than-header": (BIG, 8, WRITE),
           "too-small-without-mergeable": (BIG, 40, WRITE)}[case]
    w.chain([seg], 0)
    v.rig.kick(0)
    v.rig.service(0)
    v.wire.port.send(frame(100, dst=GUEST_MAC, src=PEER), None)
    if case == "too-small-without-mergeable":
        assert v.rig.dev.metrics.rx_dropped_too_big == 1
        assert not v.rig.dev.errors
        v.rig.assert_survived()
        return _assert_net_live(v)
    reason = Reason.WRONG_DIRECTION if case == "no-writable-part" else Reason.NET_HEADER_SHORT
    assert_device_error(v, reason, queue=0)


@pytest.mark.parametrize("fmt", FORMATS)
def test_net_control_faults(victims, fmt):
    """Bad commands are NACKed (VIRTIO_NET_ERR), a command longer than any is NACKed unread,
    a command with no ack byte or without class and command is a device error."""
    v = net_victim(victims, fmt)
    w = v.writer(2)
    ack = STATUS
    cmds = [
        b"\x00\x00\x01\x02",                           # RX promisc with 2 bytes of data
        b"\x01\x00" + struct.pack("<I", 5000),         # a MAC table of 5000 entries, cut
        b"\x01\x00" + struct.pack("<I", 0) + struct.pack("<I", 1) + b"\x01\x00",
        b"\x09\x09",                                   # no such class
    ]
    for k, c in enumerate(cmds):
        v.ram.mv[HDR - BASE:HDR - BASE + len(c)] = c
        v.ram.mv[ack - BASE] = 0xEE
        w.chain([(HDR, len(c), 0), (ack, 1, WRITE)], k)
        v.rig.kick(2)
        assert v.rig.service(2) == 1
        assert v.ram.mv[ack - BASE] == N.VIRTIO_NET_ERR, c
    # longer than any command: the same buffer named 8 times, 64 KiB
    v.ram.mv[BIG - BASE:BIG - BASE + 2] = b"\x00\x00"
    w.chain([(BIG, 0x2000, 0)] * 7 + [(ack, 1, WRITE)], 0)
    v.rig.kick(2)
    assert v.rig.service(2) == 1 and v.ram.mv[ack - BASE] == N.VIRTIO_NET_ERR
    m = v.rig.dev.metrics
    assert m.ctrl_errors == 5 and not v.rig.dev.errors
    _assert_net_live(v)
    w.chain([(HDR, 2, 0)], 1)                          # no ack byte
    v.rig.kick(2)
    v.rig.service(2)
    assert_device_error(v, Reason.CONTROL_MALFORMED, queue=2)


# ---- another VM keeps running: a real `vmsim run` ---------------------------------------------
TWO_VMS = """
name: hostile
duration: 30
vms:
  vm0:
    memory: 16M
    devices:
      vda: {type: blk, transport: mmio, backend: memory, size: 4M, queue_size: 64}
    workloads:
      verify: {type: blk-verify, device: vda, block_size: 4096, in_flight: 4}
  vm1:
    memory: 16M
    devices:
      vda: {type: blk, transport: mmio, backend: memory, size: 4M, queue_size: 64}
    workloads:
      verify: {type: blk-verify, device: vda, block_size: 4096, in_flight: 4, ops: 200}
"""


def _find_split_ring(ram: mmap.mmap, num: int) -> int:
    """The RAM offset of the (first) split ring of `num` entries: the guest lays each vring
    out contiguously and page-aligned (desc, avail, then used at 4096); its used idx and avail
    idx are close and have moved."""
    avail_off = 16 * num
    used_off = (16 * num + 2 * (3 + num) + 4095) & ~4095
    for off in range(0, len(ram) - used_off - 8, 4096):
        avail = struct.unpack_from("<H", ram, off + avail_off + 2)[0]
        used = struct.unpack_from("<H", ram, off + used_off + 2)[0]
        if avail and used and (avail - used) & 0xFFFF <= num:
            return off
    raise AssertionError("no split ring found in guest RAM")


def _corrupt(ram: mmap.mmap, how: str) -> None:
    """Write vm1's idle ring as a hostile guest would: avail idx far past the ring, or a new
    chain whose buffer address overflows."""
    num = 64
    off = _find_split_ring(ram, num)
    idx_at = off + 16 * num + 2
    idx = struct.unpack_from("<H", ram, idx_at)[0]
    if how == "avail-idx":
        struct.pack_into("<H", ram, idx_at, (idx + 1000) & 0xFFFF)
        return
    struct.pack_into("<QIHH", ram, off, U64 - 7, 16, 0, 0)          # descriptor 0
    struct.pack_into("<H", ram, off + 16 * num + 4 + 2 * (idx % num), 0)
    struct.pack_into("<H", ram, idx_at, (idx + 1) & 0xFFFF)


@pytest.mark.multiprocess
@pytest.mark.timeout(90)
@pytest.mark.parametrize("how,reason", [("avail-idx", Reason.INVALID_AVAIL_IDX),
                                        ("address", Reason.ADDRESS_OUT_OF_RANGE)])
def test_another_vm_keeps_running_under_vmsim_run(tmp_path, how, reason):
    """Two VMs, each with a disk and a verifying workload. Once vm1's workload has finished
    (its ring idle), its guest RAM is written from outside as a hostile guest would write it,
    and the host's loop finds the work on its next pass: vm1's device reports the reason
    (NEEDS_RESET), while vm0's workload keeps verifying data with no error, the host
    survives, and the run ends cleanly."""
    from test_run import Launch, write_yaml

    topo = write_yaml(tmp_path, TWO_VMS)
    out = tmp_path / "run.json"
    run = Launch(tmp_path, "run", str(topo), "--duration", "6", "--json", str(out))
    try:
        run.wait_running()
        prefix = f"vmsim-{run.pid}-"
        deadline = time.monotonic() + 20
        while True:
            names = [e for e in os.listdir("/dev/shm") if e.startswith(prefix) and "vm1" in e]
            if names:
                break
            assert time.monotonic() < deadline, os.listdir("/dev/shm")
            time.sleep(0.05)
        time.sleep(1.5)                     # vm1's 200 operations are done by now
        fd = os.open("/dev/shm/" + names[0], os.O_RDWR)
        try:
            ram = mmap.mmap(fd, 0)
        finally:
            os.close(fd)
        try:
            _corrupt(ram, how)
        finally:
            ram.close()
        rc = run.wait(60)
        run.assert_clean()
    finally:
        run.close()
    summary = json.loads(Path(out).read_text())
    vm0, vm1 = summary["vms"]["vm0"], summary["vms"]["vm1"]
    errs = vm1["devices"]["vda"]["errors"]
    assert errs and reason.value in errs[0], errs
    assert "NEEDS_RESET" in vm1["devices"]["vda"]["status"]
    assert not vm0["devices"]["vda"]["errors"]
    w0 = summary["workloads"]["vm0.verify"]
    assert w0["errors"] == 0 and w0["ops"] > 200, w0
    assert rc == 1, run.output()                 # a device reported an error
    assert not re.search(r"Traceback", run.err), run.err
