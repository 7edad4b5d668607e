"""virtio-ccw on both sides.

1. The host's channel subsystem and virtio-ccw emulation (vmsim.host.css, vmsim.host.virtio.ccw)
   driven at the channel-program level, as a guest's trapped instructions drive them: SCHIBs,
   ORBs, CCWs and communication blocks are written here byte by byte in s390's big-endian
   layouts (with `struct`, independently of the code under test), IRBs decoded the same way.
2. The interrupt path: which indicator bits the device sets in guest memory, which eventfd
   fires, what the guest reads to learn the cause; and the driver's handling of a bit it
   erased while clearing (the race of non-atomic clearing).
3. The guest's channel subsystem and virtio_ccw driver against the real host emulation in one
   process (the pattern of test_guest_core.py): probing, revisions, adapter and classic
   interrupts, config changes, removal.
4. Real runs of `vmsim run configs/blk-ccw.yaml`.
"""

import errno
import json
import mmap
import queue
import select
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vmsim.abi import blk as B
from vmsim.abi import ccw as C
from vmsim.abi import features as F
from vmsim.abi import ids
from vmsim.abi import status as S
from vmsim.guest.css import AirqIv, ChannelSubsystem
from vmsim.guest.drivers.blk import BlkDriver, VirtioBlk
from vmsim.guest.memory import DmaMemory, GuestRAM
from vmsim.guest.platform import IrqController, Platform
from vmsim.guest.virtio.ccw import AirqAreas, CcwProbeError, VirtioCcw
from vmsim.guest.virtio.core import VirtioBus
from vmsim.host.board import Board
from vmsim.host.devices.blk.backend import MemoryBackend
from vmsim.host.devices.blk.device import BlkDevice
from vmsim.host.memory import GuestMemory
from vmsim.host.virtio.ccw import CcwTransport
from vmsim.machine.eventfd import EventFd
from vmsim.machine.wire import Channel, ChannelClosed

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[1]
RAM_BASE = 0x4000_0000
RAM_SIZE = 1 << 20
DISK_SIZE = 1 << 20
SERIAL = "vmsim-ccw-disk"
ACK, DRV, FOK, DOK = S.ACKNOWLEDGE, S.DRIVER, S.FEATURES_OK, S.DRIVER_OK
SCHID0 = 0x0001_0000                     # subchannel 0.0.0000: the "one" bit, number 0
CE_DE = 0x08 | 0x04                      # channel end, device end
UNIT_CHECK = 0x02
PROG_CHECK = 0x20
INCORR_LEN = 0x40
FMT1 = 0x0080                            # ORB: format-1 CCWs
SLI = 0x20
CC = 0x40

# The communication blocks as the spec prints them, written here independently.
CCW_FMT = ">BBHI"
ORB_FMT = ">IHBBI"
SCSW_FMT = ">HHIBBH"
PMCW_FMT = ">IHHBBBBHBB8sI"


def wait_for(cond, timeout: float = 5.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.002)


def efd_count(efd: EventFd) -> int:
    """How often an eventfd was signalled since it was last read (reads it)."""
    r, _, _ = select.select([efd.fileno()], [], [], 0)
    if not r:
        return 0
    return int.from_bytes(__import__("os").read(efd.fileno(), 8), "little")


class Status:
    """An IRB decoded from guest memory."""

    def __init__(self, cc: int, irb: bytes) -> None:
        self.cc = cc
        (self.flags, self.ctrl, self.cpa, self.dstat, self.cstat,
         self.count) = struct.unpack_from(SCSW_FMT, irb, 0)
        self.esw = irb[12:32]
        self.sense = irb[32:64]

    @property
    def ok(self) -> bool:
        return self.dstat == CE_DE and self.cstat == 0 and not self.flags & 0x0300

    @property
    def rejected(self) -> bool:
        """Unit check with command reject in the concurrent sense data."""
        return bool(self.dstat & UNIT_CHECK and self.flags & 0x0002 and self.sense[0] & 0x80)

    @property
    def program_check(self) -> bool:
        return bool(self.cstat & PROG_CHECK)

    @property
    def incorrect_length(self) -> bool:
        return bool(self.cstat & INCORR_LEN)

    def __repr__(self) -> str:
        return (f"Status(cc={self.cc}, flags=0x{self.flags:04x}, ctrl=0x{self.ctrl:04x}, "
                f"cpa=0x{self.cpa:x}, dstat=0x{self.dstat:02x}, cstat=0x{self.cstat:02x}, "
                f"count={self.count}, sense0=0x{self.sense[0]:02x})")


# ---- 1. the host emulation, channel program by channel program -----------------------------------
class Rig:
    """A virtio-blk device on a subchannel over anonymous "guest RAM", and a hand-written
    driver's areas in it."""

    def __init__(self, devices: int = 1, **kw) -> None:
        self.mm = mmap.mmap(-1, RAM_SIZE)
        self.mem = GuestMemory(self.mm, RAM_BASE)
        self.ram = GuestRAM(self.mm, RAM_BASE)
        self.dma = DmaMemory(self.ram)
        self.board = Board()
        tkw = {k: kw.pop(k) for k in ("max_revision", "adapter_interrupts") if k in kw}
        self.devs, self.ts = [], []
        for i in range(devices):
            nq = kw.get("num_queues", 1)
            args = dict(name=f"vd{chr(97 + i)}", mem=self.mem, backend=MemoryBackend(DISK_SIZE),
                        readonly=False, num_queues=nq, queue_size=8, offer=0, withhold=0,
                        blk_size=512, serial=SERIAL, dev_stats=None, queue_stats=[None] * nq,
                        refuse_features_ok=False)
            args.update(kw)
            dev = BlkDevice(**args)
            self.devs.append(dev)
            self.ts.append(CcwTransport(dev, self.board, **tkw))
        self.dev, self.t = self.devs[0], self.ts[0]
        self.css = self.board.css
        self.orb, _ = self.dma.alloc(32, 8)
        self.irb, _ = self.dma.alloc(96, 8)
        self.schib, _ = self.dma.alloc(64, 8)
        self.prog, _ = self.dma.alloc(8 * 16, 8)
        self.data, _ = self.dma.alloc(512, 8)

    def close(self) -> None:
        for dev, t in zip(self.devs, self.ts, strict=True):
            dev.close()
            t.close()
        self.ram.release()
        self.mem.release()
        try:
            self.mm.close()
        except BufferError:
            pass

    # ---- guest memory ------------------------------------------------------------------------
    def put(self, gpa: int, data: bytes) -> None:
        self.ram.view(gpa, len(data))[:] = data

    def get(self, gpa: int, n: int) -> bytes:
        return bytes(self.ram.view(gpa, n))

    # ---- instructions ------------------------------------------------------------------------
    def insn(self, *args):
        return self.css.trap(list(args))

    def stsch(self, schid: int = SCHID0) -> tuple[int, tuple]:
        cc = self.insn("stsch", schid, self.schib)
        return cc, struct.unpack_from(PMCW_FMT, self.get(self.schib, 28))

    def enable(self, schid: int = SCHID0, isc: int = 3, enable: bool = True,
               csense: bool = True) -> int:
        cc, pmcw = self.stsch(schid)
        assert cc == 0
        raw = bytearray(self.get(self.schib, C.SCHIB_SIZE))
        flags = pmcw[1] & ~0x3880 | isc << 11 | (0x80 if enable else 0)
        chars = pmcw[11] & ~1 | (1 if csense else 0)
        struct.pack_into(">IH", raw, 0, 0xC0FFEE, flags)
        struct.pack_into(">B", raw, 8, 0x80)            # lpm
        struct.pack_into(">I", raw, 24, chars)
        self.put(self.schib, bytes(raw))
        return self.insn("msch", schid, self.schib)

    def tsch(self, schid: int = SCHID0) -> Status:
        cc = self.insn("tsch", schid, self.irb)
        return Status(cc, self.get(self.irb, 64))

    def start(self, ccws, schid: int = SCHID0, ctrl0: int = FMT1, lpm: int = 0x80,
              ctrl1: int = 0, cpa: int | None = None) -> int:
        prog = b"".join(struct.pack(CCW_FMT, *c) for c in ccws)
        self.put(self.prog, prog)
        self.put(self.orb, struct.pack(ORB_FMT, 0x1234, ctrl0, lpm, ctrl1,
                                       self.prog if cpa is None else cpa))
        return self.insn("ssch", schid, self.orb)

    def run(self, *ccws, schid: int = SCHID0, **orb) -> Status:
        assert self.start(ccws, schid, **orb) == 0
        st_ = self.tsch(schid)
        assert st_.cc == 0, "a started channel program leaves a status pending"
        return st_

    def cmd(self, cmd: int, data: bytes = b"", count: int | None = None, flags: int = 0,
            schid: int = SCHID0, cda: int | None = None) -> Status:
        """One CCW; its data area holds `data` before (and the device's answer after)."""
        self.put(self.data, data.ljust(256, b"\0"))
        n = len(data) if count is None else count
        return self.run((cmd, flags, n, self.data if cda is None else cda), schid=schid)

    def answer(self, n: int) -> bytes:
        return self.get(self.data, n)

    # ---- virtio-ccw steps --------------------------------------------------------------------
    def set_rev(self, rev: int = 2, schid: int = SCHID0) -> Status:
        return self.cmd(C.CCW_CMD_SET_VIRTIO_REV, struct.pack(">HH", rev, 0), schid=schid)

    def write_status(self, value: int, schid: int = SCHID0) -> Status:
        return self.cmd(C.CCW_CMD_WRITE_STATUS, bytes((value,)), schid=schid)

    def read_status(self) -> int:
        s = self.cmd(C.CCW_CMD_READ_STATUS, b"\xee")
        assert s.ok, s
        return self.answer(1)[0]

    def write_feat(self, word: int, index: int) -> Status:
        return self.cmd(C.CCW_CMD_WRITE_FEAT, struct.pack("<IB", word, index))

    def to_features_ok(self, features: int | None = None) -> None:
        assert self.enable() == 0
        assert self.set_rev().ok
        for v in (ACK, ACK | DRV):
            assert self.write_status(v).ok
        feats = self.dev.device_features if features is None else features
        assert self.write_feat(feats & 0xFFFFFFFF, 0).ok
        assert self.write_feat(feats >> 32, 1).ok
        assert self.write_status(ACK | DRV | FOK).ok

    def ring(self, num: int = 8) -> tuple[int, int, int]:
        desc, _ = self.dma.alloc(16 * num + 6 + 2 * num + 4096 + 6 + 8 * num, 4096)
        return desc, desc + 16 * num, desc + 4096

    def set_vq(self, index: int = 0, num: int = 8, rings=None, **kw) -> Status:
        desc, drv, dev = rings if rings is not None else self.ring(num)
        return self.cmd(C.CCW_CMD_SET_VQ,
                        struct.pack(">QIHHQQ", desc, 0, index, num, drv, dev), **kw)

    def to_driver_ok(self) -> None:
        self.to_features_ok()
        assert self.set_vq().ok
        assert self.write_status(ACK | DRV | FOK | DOK).ok


@pytest.fixture
def rig():
    made = []

    def _make(**kw) -> Rig:
        r = Rig(**kw)
        made.append(r)
        return r

    yield _make
    for r in made:
        r.close()


# ---- the channel subsystem -----------------------------------------------------------------------
def test_store_subchannel_describes_the_proxy(rig):
    r = rig(devices=2)
    cc, pmcw = r.stsch()
    intparm, flags, devno, _lpm, _pnom, _lpum, pim, _mbi, pom, pam, chpids, chars = pmcw
    assert cc == 0 and intparm == 0 and chpids == bytes(8)
    assert flags & 0x0001 and not flags & 0x0080          # device number valid, disabled
    assert (devno, pim, pam, pom) == (0, 0x80, 0x80, 0xFF)
    assert chars & 0x00E00000 == 0                         # an I/O subchannel
    assert r.stsch(SCHID0 | 1)[1][2] == 1                  # the second device: 0.0.0001
    assert r.insn("stsch", SCHID0 | 2, r.schib) == 3       # beyond the last: not operational
    assert r.insn("stsch", SCHID0 | 2 << 17, r.schib) == 3     # subchannel set 1 is empty
    assert r.css.describe()["subchannels"][1]["bus_id"] == "0.0.0001"


@pytest.mark.parametrize("args, what", [
    (("stsch", 0x0000_0000, None), "subchannel-identification"),   # the one bit is clear
    (("stsch", 0x0101_0000, None), "subchannel-identification"),   # a css id without M
    (("stsch", SCHID0, RAM_BASE - 64), "addressing"),
    (("stsch", SCHID0, RAM_BASE + RAM_SIZE - 8), "addressing"),
    (("tsch", SCHID0, RAM_BASE + 2), "specification"),             # not word aligned
    (("ssch", SCHID0, 0), "addressing"),
    (("msch", "x", None), "operand"),
    (("bogus",), "operation exception"),
])
def test_bad_instruction_operands_are_program_exceptions(rig, args, what):
    r = rig()
    args = tuple(r.schib if a is None else a for a in args)
    reply = r.insn(*args)
    assert isinstance(reply, str) and what in reply
    assert r.css.counters()["program_exceptions"] >= (0 if args[0] == "bogus" else 1)


def test_msch_rejects_reserved_bits(rig):
    r = rig()
    r.stsch()
    raw = bytearray(r.get(r.schib, C.SCHIB_SIZE))
    struct.pack_into(">H", raw, 4, 0x0780)                  # ENA with reserved flag bits
    r.put(r.schib, bytes(raw))
    assert "operand" in r.insn("msch", SCHID0, r.schib)
    assert not r.t.sch.enabled


def test_start_needs_an_enabled_subchannel_and_a_free_status(rig):
    r = rig()
    noop = (C.CCW_CMD_NOOP, 0, 0, 0)
    assert r.start([noop]) == 3                              # disabled: not operational
    assert r.enable() == 0
    assert r.stsch()[1][1] & 0x0080
    assert r.start([noop]) == 0
    assert r.start([noop]) == 1                              # status pending
    assert r.enable() == 1                                   # MSCH too
    s = r.tsch()
    assert s.cc == 0 and s.ok
    assert s.ctrl & 0x4000                                   # start function
    assert s.ctrl & 0x001F == 0x0007                         # primary, secondary, pending
    assert s.cpa == r.prog + 8 and s.count == 0
    assert r.tsch().cc == 1                                  # nothing pending any more
    assert r.t.exits["ssch"] == 3 and r.t.exits["tsch"] == 2
    assert r.t.exits_write >= 3 and r.t.exits_read >= 2


def test_io_interrupt_fires_once_per_status(rig):
    r = rig()
    assert r.enable() == 0
    efd = r.t.sch.io_efd
    efd_count(efd)
    assert r.start([(C.CCW_CMD_NOOP, 0, 0, 0)]) == 0
    assert efd_count(efd) == 1
    assert r.tsch().ok
    assert efd_count(efd) == 0


def test_sense_id_names_the_virtio_device(rig):
    r = rig()
    assert r.enable() == 0
    s = r.cmd(C.CCW_CMD_SENSE_ID, count=256)
    assert s.ok, s
    reserved, cu_type, cu_model, dev_type, dev_model = struct.unpack(">BHBHB", r.answer(7))
    assert (reserved, cu_type, cu_model, dev_type, dev_model) == (
        0xFF, 0x3832, ids.VIRTIO_ID_BLOCK, 0, 0)
    # SLI: a short count takes the first bytes; without it the count must be the whole
    s = r.cmd(C.CCW_CMD_SENSE_ID, count=8, flags=SLI)
    assert s.ok and s.count == 0
    assert r.cmd(C.CCW_CMD_SENSE_ID, count=8).incorrect_length
    s = r.cmd(C.CCW_CMD_SENSE_ID, count=300)
    assert s.incorrect_length
    s = r.cmd(C.CCW_CMD_SENSE_ID, count=300, flags=SLI)
    assert s.ok and s.count == 44                    # the residual count


def test_command_reject_is_reported_with_concurrent_sense(rig):
    r = rig()
    assert r.enable() == 0
    s = r.cmd(0x02, count=8)                         # READ IPL: not a command of this device
    assert s.rejected and s.dstat == CE_DE | UNIT_CHECK
    assert s.ctrl & 0x0010                           # alert status
    assert s.flags & 0x0400                          # extended status word format
    # without concurrent sense the sense data waits for BASIC SENSE
    assert r.enable(csense=False) == 0
    s = r.cmd(0x02, count=8)
    assert s.dstat & UNIT_CHECK and not s.flags & 0x0002 and s.sense == bytes(32)
    s = r.cmd(C.CCW_CMD_BASIC_SENSE, count=32)
    assert s.ok and r.answer(1)[0] == 0x80
    s = r.cmd(C.CCW_CMD_BASIC_SENSE, count=32)
    assert s.ok and r.answer(1)[0] == 0              # taken


# ---- malformed channel programs ------------------------------------------------------------------
@pytest.mark.parametrize("ccw, check", [
    ((0x00, 0, 0, 0), "program"),                    # command code 0
    ((0xF0, 0, 0, 0), "program"),                    # low nibble 0
    ((0x18, 0, 0, 0), "program"),                    # TIC with high bits
    ((C.CCW_CMD_SENSE_ID, SLI | 0x80, 256, None), "program"),   # data chaining
    ((C.CCW_CMD_SENSE_ID, SLI | 0x04, 256, None), "program"),   # indirect data addressing
    ((C.CCW_CMD_SENSE_ID, SLI | 0x10, 256, None), "program"),   # skip
    ((C.CCW_CMD_SENSE_ID, SLI | 0x02, 256, None), "program"),   # suspend
    ((C.CCW_CMD_SENSE_ID, SLI, 256, RAM_BASE - 4096), "program"),     # data outside RAM
    ((C.CCW_CMD_SENSE_ID, SLI, 256, RAM_BASE + RAM_SIZE - 8), "program"),
    ((C.CCW_CMD_SENSE_ID, SLI, 256, 0x8000_0000 | RAM_BASE), "program"),   # beyond 31 bits
    ((0x02, 0, 8, None), "reject"),
    ((0xFF, 0, 8, None), "reject"),
])
def test_malformed_ccw_is_a_check_in_the_status(rig, ccw, check):
    r = rig()
    assert r.enable() == 0
    cmd, flags, count, cda = ccw
    r.put(r.prog, struct.pack(CCW_FMT, cmd, flags, count, r.data if cda is None else cda))
    r.put(r.orb, struct.pack(ORB_FMT, 0, FMT1, 0x80, 0, r.prog))
    before = bytes(r.mm)
    assert r.insn("ssch", SCHID0, r.orb) == 0
    s = r.tsch()
    if check == "program":
        assert s.program_check and not s.dstat & UNIT_CHECK, s
    else:
        assert s.rejected, s
    assert s.ctrl & 0x0010 and s.cpa == r.prog + 8
    after = bytes(r.mm)
    # nothing in guest RAM changed but the IRB the TSCH stored
    diff = [i for i in range(len(before)) if before[i] != after[i]]
    assert all(r.irb - RAM_BASE <= i < r.irb - RAM_BASE + 64 for i in diff)


def test_malformed_orb_and_channel_program_addresses(rig):
    r = rig()
    assert r.enable() == 0
    noop = (C.CCW_CMD_NOOP, 0, 0, 0)
    assert r.run(noop, ctrl0=0).program_check                       # format-0 CCWs
    assert r.run(noop, ctrl0=FMT1 | 0x0004).program_check           # reserved ORB bit
    assert r.run(noop, ctrl1=0x02).program_check
    assert r.run(noop, cpa=r.prog + 4).program_check                # not a doubleword
    assert r.run(noop, cpa=RAM_BASE + RAM_SIZE).program_check       # outside RAM
    assert r.run(noop, cpa=0x8000_0000).program_check               # beyond 31 bits
    s = r.run(noop, lpm=0x40)                                       # no such path
    assert s.flags & 0x0300 == 0x0300 and s.ctrl & 0x0011 == 0x0011  # deferred cc 3, alert


def test_tic_chains_and_tic_loops(rig):
    r = rig()
    assert r.enable() == 0
    # NOOP (chained) -> TIC -> SENSE ID
    target = r.prog + 64
    r.put(target, struct.pack(CCW_FMT, C.CCW_CMD_SENSE_ID, SLI, 256, r.data))
    s = r.run((C.CCW_CMD_NOOP, CC, 0, 0), (C.CCW_CMD_TIC, 0, 0, target))
    assert s.ok and s.cpa == target + 8
    assert struct.unpack(">BH", r.answer(3)) == (0xFF, 0x3832)
    # TIC to a TIC
    s = r.run((C.CCW_CMD_TIC, 0, 0, r.prog + 8), (C.CCW_CMD_TIC, 0, 0, r.prog))
    assert s.program_check
    # TIC -> NOOP (chained) -> TIC back: a loop ends in a program check
    s = r.run((C.CCW_CMD_NOOP, CC, 0, 0), (C.CCW_CMD_TIC, 0, 0, r.prog))
    assert s.program_check and "longer than" in r.t.sch.last_error


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(program=st.lists(st.tuples(st.integers(0, 255), st.integers(0, 255),
                                  st.integers(0, 0xFFFF),
                                  st.one_of(st.integers(0, 0xFFFF_FFFF),
                                            st.integers(RAM_BASE, RAM_BASE + RAM_SIZE))),
                        min_size=1, max_size=6),
       revision_first=st.booleans())
def test_random_channel_programs_never_escape(program, revision_first):
    """Whatever the CCWs say, the instruction answers a condition code, the status is one the
    architecture defines, and nothing outside guest RAM is touched (GuestMemory refuses)."""
    r = Rig()
    try:
        assert r.enable() == 0
        if revision_first:
            assert r.set_rev().ok
        for _ in range(2):
            assert r.start(program) == 0
            s = r.tsch()
            assert s.cc == 0
            assert s.ctrl & 0x0001
            assert s.ok or s.cstat or s.dstat & UNIT_CHECK, s
        assert r.css.counters()["program_exceptions"] == 0
    finally:
        r.close()


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cmd=st.sampled_from(sorted(C.VIRTIO_COMMANDS)),
       payload=st.one_of(
           st.binary(max_size=40),
           st.builds(lambda a, b, c, d, e: struct.pack(">QIHHQQ", a, 0, b, c, d, e),
                     st.integers(0, 2**64 - 1) | st.integers(RAM_BASE, RAM_BASE + RAM_SIZE),
                     st.integers(0, 3), st.integers(0, 0xFFFF),
                     st.integers(0, 2**64 - 1) | st.integers(RAM_BASE, RAM_BASE + RAM_SIZE),
                     st.integers(0, 2**64 - 1) | st.integers(RAM_BASE, RAM_BASE + RAM_SIZE)),
           st.builds(lambda a, b, c, d: struct.pack(">QQQB", a, b, c, d),
                     st.integers(0, 2**64 - 1) | st.integers(RAM_BASE, RAM_BASE + RAM_SIZE),
                     st.integers(0, 2**64 - 1) | st.integers(RAM_BASE, RAM_BASE + RAM_SIZE),
                     st.integers(0, 2**64 - 1) | st.integers(0, 4096), st.integers(0, 255))),
       flags=st.sampled_from([0, SLI]), packed=st.booleans())
def test_random_communication_blocks_never_escape(cmd, payload, flags, packed):
    """Any payload for any virtio command in the FEATURES_OK state, then the device's
    notifications: a status comes back, the host raises nothing, guest RAM bounds hold."""
    r = Rig(packed=packed)
    try:
        r.to_features_ok()
        s = r.cmd(cmd, payload, flags=flags)
        assert s.ok or s.cstat or s.dstat & UNIT_CHECK, s
        for q in range(len(r.dev.queues)):
            r.t.signal_used(q)
        r.t.signal_config()
        assert r.tsch().cc in (0, 1)
    finally:
        r.close()


# ---- revisions -----------------------------------------------------------------------------------
VIRTIO_CMDS = [C.CCW_CMD_READ_FEAT, C.CCW_CMD_WRITE_FEAT, C.CCW_CMD_READ_CONF,
               C.CCW_CMD_WRITE_CONF, C.CCW_CMD_WRITE_STATUS, C.CCW_CMD_READ_STATUS,
               C.CCW_CMD_SET_VQ, C.CCW_CMD_READ_VQ_CONF, C.CCW_CMD_VDEV_RESET,
               C.CCW_CMD_SET_IND, C.CCW_CMD_SET_CONF_IND, C.CCW_CMD_SET_IND_ADAPTER]


@pytest.mark.parametrize("cmd", VIRTIO_CMDS)
def test_virtio_commands_before_set_virtio_rev_are_rejected(rig, cmd):
    r = rig()
    assert r.enable() == 0
    s = r.cmd(cmd, bytes(32), flags=SLI)
    assert s.rejected, s
    assert r.dev.status == 0 and r.t.revision == -1


def test_set_virtio_rev_negotiation(rig):
    r = rig()
    assert r.enable() == 0
    assert r.set_rev(0).rejected            # legacy: the device is non-transitional
    assert r.set_rev(3).rejected            # beyond the device's highest
    s = r.cmd(C.CCW_CMD_SET_VIRTIO_REV, struct.pack(">HH", 2, 4) + b"abcd")
    assert s.rejected                       # revision 2 carries no data
    assert r.t.revision == -1
    assert r.set_rev(2).ok and r.t.revision == 2
    assert r.set_rev(2).rejected            # a revision is selected once
    assert r.set_rev(1).rejected
    # re-enabling the subchannel forgets the revision
    assert r.enable(enable=False) == 0 and r.enable() == 0
    assert r.t.revision == -1
    assert r.cmd(C.CCW_CMD_READ_FEAT, bytes(5)).rejected
    assert r.set_rev(1).ok


def test_set_virtio_rev_lengths(rig):
    r = rig()
    assert r.enable() == 0
    assert r.cmd(C.CCW_CMD_SET_VIRTIO_REV, struct.pack(">HH", 2, 0), count=2).incorrect_length
    s = r.cmd(C.CCW_CMD_SET_VIRTIO_REV, struct.pack(">HH", 2, 0), count=2, flags=SLI)
    assert s.dstat & UNIT_CHECK and not s.rejected       # not enough data: a check condition
    assert r.cmd(C.CCW_CMD_SET_VIRTIO_REV, struct.pack(">HH", 2, 0), count=6).incorrect_length
    s = r.cmd(C.CCW_CMD_SET_VIRTIO_REV, struct.pack(">HH", 2, 0), count=6, flags=SLI)
    assert s.ok and s.count == 2 and r.t.revision == 2


def test_read_status_needs_revision_2(rig):
    r = rig(max_revision=1)
    assert r.enable() == 0
    assert r.set_rev(2).rejected
    assert r.set_rev(1).ok
    assert r.write_status(ACK).ok
    assert r.cmd(C.CCW_CMD_READ_STATUS, b"\0").rejected
    r2 = rig()
    assert r2.enable() == 0 and r2.set_rev(2).ok
    assert r2.write_status(ACK).ok
    assert r2.read_status() == ACK


# ---- features, config, status --------------------------------------------------------------------
def test_feature_words(rig):
    r = rig()
    assert r.enable() == 0 and r.set_rev().ok
    feats = r.dev.device_features
    for index, want in ((0, feats & 0xFFFFFFFF), (1, feats >> 32), (2, 0), (255, 0)):
        s = r.cmd(C.CCW_CMD_READ_FEAT, struct.pack("<IB", 0xDEADBEEF, index))
        assert s.ok
        assert struct.unpack("<IB", r.answer(5)) == (want, index)    # le32, as the spec says
    assert r.cmd(C.CCW_CMD_READ_FEAT, bytes(5), count=4).incorrect_length
    assert r.cmd(C.CCW_CMD_READ_FEAT, bytes(8), count=8, flags=SLI).ok
    assert r.write_status(ACK).ok and r.write_status(ACK | DRV).ok
    assert r.write_feat(feats & 0xFFFFFFFF, 0).ok and r.write_feat(feats >> 32, 1).ok
    assert r.dev.driver_features == feats
    assert r.write_feat(0x1234, 2).ok and "expected 0" in r.dev.guest_errors[-1]
    assert r.write_status(ACK | DRV | FOK).ok
    assert r.write_feat(0, 0).ok                     # ignored after FEATURES_OK
    assert r.dev.driver_features == feats


def test_read_and_write_config(rig):
    r = rig()
    assert r.enable() == 0 and r.set_rev().ok
    cfg = bytes(r.dev.config_space())
    s = r.cmd(C.CCW_CMD_READ_CONF, count=len(cfg))
    assert s.ok and r.answer(len(cfg)) == cfg
    assert struct.unpack_from("<Q", r.answer(8))[0] == DISK_SIZE // 512   # little-endian
    s = r.cmd(C.CCW_CMD_READ_CONF, count=12)            # offset + len, as Linux reads
    assert s.ok and s.count == 0 and r.answer(12) == cfg[:12]
    assert r.cmd(C.CCW_CMD_READ_CONF, count=len(cfg) + 8).incorrect_length
    s = r.cmd(C.CCW_CMD_READ_CONF, count=len(cfg) + 8, flags=SLI)
    assert s.ok and s.count == 8
    # writing back what was read changes nothing and is no error
    assert r.cmd(C.CCW_CMD_WRITE_CONF, cfg).ok and r.dev.guest_errors == []
    # a change to a read-only field reaches the device, which refuses it
    assert r.cmd(C.CCW_CMD_WRITE_CONF, b"\x01" + cfg[1:8]).ok
    assert "read-only" in r.dev.guest_errors[-1]
    assert bytes(r.dev.config_space()) == cfg


def test_status_state_machine_over_ccw(rig):
    r = rig()
    assert r.enable() == 0 and r.set_rev().ok
    assert r.write_status(DRV).rejected               # DRIVER before ACKNOWLEDGE
    assert r.read_status() == 0
    assert r.write_status(ACK).ok and r.write_status(ACK | DRV).ok
    assert r.write_status(ACK | DRV | DOK).rejected   # DRIVER_OK before FEATURES_OK
    assert r.read_status() == ACK | DRV
    assert r.write_status(ACK | DRV | FOK).rejected   # VERSION_1 not accepted: refused
    assert r.read_status() == ACK | DRV
    assert r.write_status(ACK).rejected               # clearing bits without a reset
    assert r.write_status(0).ok and r.read_status() == 0
    assert r.dev.n_resets >= 1
    assert r.write_status(1).ok and r.cmd(C.CCW_CMD_WRITE_STATUS, b"\1\1").incorrect_length


def test_refused_features_ok_leaves_the_status_unchanged(rig):
    r = rig(refuse_features_ok=True)
    assert r.enable() == 0 and r.set_rev().ok
    assert r.write_status(ACK).ok
    # ACKNOWLEDGE -> ACK|DRV|FOK in one write: DRIVER would be taken, FEATURES_OK not
    assert r.write_feat(1 << (F.VIRTIO_F_VERSION_1 - 32), 1).ok
    s = r.write_status(ACK | DRV | FOK)
    assert s.rejected
    assert r.read_status() == ACK                       # all of it refused


# ---- queues --------------------------------------------------------------------------------------
def test_read_vq_conf(rig):
    r = rig(num_queues=2)
    assert r.enable() == 0 and r.set_rev().ok
    for index, want in ((0, 8), (1, 8), (2, 0), (1023, 0)):
        assert r.cmd(C.CCW_CMD_READ_VQ_CONF, struct.pack(">HH", index, 0xFFFF)).ok
        assert struct.unpack(">HH", r.answer(4)) == (index, want)
    assert r.cmd(C.CCW_CMD_READ_VQ_CONF, struct.pack(">HH", 1024, 0)).rejected


def test_set_vq_states_and_values(rig):
    r = rig()
    assert r.enable() == 0 and r.set_rev().ok
    rings = r.ring()
    assert r.set_vq(rings=rings).rejected                     # status 0
    assert r.write_status(ACK).ok and r.write_status(ACK | DRV).ok
    assert r.set_vq(rings=rings).rejected                     # before FEATURES_OK
    feats = r.dev.device_features
    assert r.write_feat(feats & 0xFFFFFFFF, 0).ok and r.write_feat(feats >> 32, 1).ok
    assert r.write_status(ACK | DRV | FOK).ok
    assert r.set_vq(index=1, rings=rings).rejected            # no such queue
    assert r.set_vq(num=16, rings=rings).rejected             # beyond QueueNumMax
    assert r.set_vq(num=6, rings=rings).rejected              # a split ring: a power of two
    assert r.set_vq(rings=(RAM_BASE + RAM_SIZE, rings[1], rings[2])).rejected   # ring outside
    assert r.dev.errors                                       # a device error (virtio_error)
    r = rig()
    r.to_features_ok()
    assert r.cmd(C.CCW_CMD_SET_VQ, bytes(32), count=24).incorrect_length
    assert r.set_vq(rings=rings).ok
    q = r.dev.queues[0]
    assert q.ready and (q.num, q.desc, q.driver, q.device) == (8, *rings)
    assert r.set_vq(rings=rings).rejected                     # already set up
    assert r.write_status(ACK | DRV | FOK | DOK).ok
    assert r.set_vq(rings=rings).rejected                     # after DRIVER_OK
    # releasing a queue (desc 0) is taken in any state, as Linux's del_vqs sends it
    assert r.cmd(C.CCW_CMD_SET_VQ, struct.pack(">QIHHQQ", 0, 0, 0, 0, 0, 0)).ok
    assert not r.dev.queues[0].ready


def test_vdev_reset(rig):
    r = rig()
    r.to_driver_ok()
    ind, _ = r.dma.alloc(8, 8)
    assert r.cmd(C.CCW_CMD_SET_IND, struct.pack(">Q", ind)).ok
    s = r.run((C.CCW_CMD_VDEV_RESET, 0, 0, 0))
    assert s.ok
    assert r.dev.status == 0 and not r.dev.queues[0].ready
    assert r.t.indicators == 0 and r.t.revision == 2          # the revision stays
    assert r.read_status() == 0


# ---- indicators ----------------------------------------------------------------------------------
def test_indicator_registration_rules(rig):
    r = rig()
    r.to_features_ok()
    ind, _ = r.dma.alloc(64, 8)
    for bad in (ind + 4, RAM_BASE - 8, RAM_BASE + RAM_SIZE):
        assert r.cmd(C.CCW_CMD_SET_IND, struct.pack(">Q", bad)).rejected
        assert r.cmd(C.CCW_CMD_SET_CONF_IND, struct.pack(">Q", bad)).rejected
    assert r.cmd(C.CCW_CMD_SET_IND, struct.pack(">I", ind), count=4).incorrect_length
    area = struct.pack(">QQQB", ind + 16, ind + 24, 5, 3)
    assert r.cmd(C.CCW_CMD_SET_IND, struct.pack(">Q", ind)).ok
    assert r.cmd(C.CCW_CMD_SET_IND_ADAPTER, area).rejected      # classic already set up
    assert r.cmd(C.CCW_CMD_SET_IND, struct.pack(">Q", 0)).ok     # deregistered
    assert r.cmd(C.CCW_CMD_SET_IND_ADAPTER, area[:-1] + b"\x08").rejected   # ISC 8
    assert r.cmd(C.CCW_CMD_SET_IND_ADAPTER,
                 struct.pack(">QQQB", ind, RAM_BASE + RAM_SIZE - 1, 9, 3)).rejected
    assert r.cmd(C.CCW_CMD_SET_IND_ADAPTER,
                 struct.pack(">QQQB", ind, ind, 1 << 63, 3)).rejected
    assert r.cmd(C.CCW_CMD_SET_IND_ADAPTER, area, count=24).incorrect_length
    assert r.cmd(C.CCW_CMD_SET_IND_ADAPTER, area + b"xx", count=27, flags=SLI).ok
    assert r.t.irq_mode == "adapter"
    assert r.cmd(C.CCW_CMD_SET_IND, struct.pack(">Q", ind)).rejected   # adapter set up
    # deregistering adapter indicators: indicator address 0
    assert r.cmd(C.CCW_CMD_SET_IND_ADAPTER, struct.pack(">QQQB", ind + 16, 0, 0, 3)).ok
    assert not r.t.thinint
    assert r.cmd(C.CCW_CMD_SET_IND, struct.pack(">Q", ind)).ok


def test_adapter_interrupts_can_be_withheld(rig):
    r = rig(adapter_interrupts=False)
    r.to_features_ok()
    ind, _ = r.dma.alloc(64, 8)
    assert r.cmd(C.CCW_CMD_SET_IND_ADAPTER, struct.pack(">QQQB", ind, ind + 8, 0, 3)).rejected


def test_classic_indicators_and_the_io_interrupt(rig):
    r = rig(num_queues=10)
    r.to_features_ok()
    ind, _ = r.dma.alloc(16, 8)
    assert r.cmd(C.CCW_CMD_SET_IND, struct.pack(">Q", ind)).ok
    assert r.cmd(C.CCW_CMD_SET_CONF_IND, struct.pack(">Q", ind + 8)).ok
    io, airq = r.t.sch.io_efd, r.css.adapter_efds[3]
    efd_count(io)
    r.t.signal_used(0)
    r.t.signal_used(9)
    # bit n of a big-endian 64-bit word: byte 7 - n // 8
    assert r.get(ind, 8) == bytes([0, 0, 0, 0, 0, 0, 0x02, 0x01])
    assert struct.unpack(">Q", r.get(ind, 8))[0] == 1 << 0 | 1 << 9
    assert efd_count(io) == 1 and efd_count(airq) == 0     # one interrupt while pending
    s = r.tsch()
    assert s.cc == 0 and s.ctrl == 0x0011                  # unsolicited: alert, pending
    assert s.dstat == 0 and s.cstat == 0
    r.t.signal_used(3)
    assert efd_count(io) == 1 and r.tsch().cc == 0
    assert r.get(ind, 8)[7] == 0x09
    # configuration change: bit 0 of the second word, the same I/O interrupt
    r.t.signal_config()
    assert r.get(ind + 8, 8) == bytes(7) + b"\x01"
    assert efd_count(io) == 1
    assert r.t.n_io_interrupts == 3 and r.t.n_interrupts == 4


def test_classic_interrupt_needs_an_enabled_subchannel(rig):
    r = rig()
    r.to_features_ok()
    ind, _ = r.dma.alloc(8, 8)
    assert r.cmd(C.CCW_CMD_SET_IND, struct.pack(">Q", ind)).ok
    assert r.enable(enable=False) == 0
    efd_count(r.t.sch.io_efd)
    r.t.signal_used(0)
    assert r.get(ind, 8)[7] == 1 and efd_count(r.t.sch.io_efd) == 0
    assert r.tsch().cc == 1


def test_adapter_indicators_summary_and_adapter_interrupt(rig):
    r = rig(num_queues=4)
    r.to_features_ok()
    area, _ = r.dma.alloc(64, 8)
    summary, ind, conf = area, area + 8, area + 40
    assert r.cmd(C.CCW_CMD_SET_IND_ADAPTER, struct.pack(">QQQB", summary, ind, 13, 6),
                 flags=SLI).ok
    assert r.cmd(C.CCW_CMD_SET_CONF_IND, struct.pack(">Q", conf)).ok
    io, airq = r.t.sch.io_efd, r.css.adapter_efds[6]
    efd_count(io)
    r.t.signal_used(0)                      # bit 13: byte 1, 0x80 >> 5
    r.t.signal_used(3)                      # bit 16: byte 2, 0x80
    assert r.get(ind, 4) == bytes([0, 0x04, 0x80, 0])
    assert r.get(summary, 1) == b"\x01"
    assert efd_count(airq) == 1 and efd_count(io) == 0      # summary was set: one interrupt
    assert r.t.n_adapter_suppressed == 1
    assert efd_count(r.css.adapter_efds[3]) == 0            # only the ISC asked for
    # the driver clears the summary: the next notification interrupts again
    r.put(summary, b"\0")
    r.t.signal_used(1)
    assert r.get(ind, 2)[1] == 0x06 and efd_count(airq) == 1
    # configuration changes still use the classic path
    r.t.signal_config()
    assert r.get(conf, 8)[7] == 1 and efd_count(io) == 1 and efd_count(airq) == 0
    assert r.tsch().ctrl == 0x0011
    d = r.t.describe()
    assert d["irq_mode"] == "adapter" and d["adapter_interrupts"] == 2


def test_no_indicators_means_no_interrupt(rig):
    r = rig()
    r.to_features_ok()
    efd_count(r.t.sch.io_efd)
    r.t.signal_used(0)
    r.t.signal_config()
    assert efd_count(r.t.sch.io_efd) == 0 and r.t.n_lost == 2


# ---- notifications -------------------------------------------------------------------------------
def test_notify_ioeventfds_and_trapped_notify(rig):
    r = rig(num_queues=2, offer=F.bit(F.VIRTIO_F_NOTIFICATION_DATA))
    assert [(s, a, d) for s, a, d, _ in r.t.ioeventfds()] == [("css", SCHID0, 0),
                                                              ("css", SCHID0, 1)]
    lines = [line for line, _ in r.t.irqfds()]
    assert lines[0] == "io:0.0.0000" and "airq:3" in lines
    r.to_features_ok(r.dev.device_features)
    assert r.set_vq().ok
    assert r.write_status(ACK | DRV | FOK | DOK).ok
    ring = r.dev.queues[0].ring
    before = ring.n_notifies
    cookie = r.insn("notify", SCHID0, 0, 0)
    assert isinstance(cookie, int) and cookie >= 0
    # bits 0-31 of GPR2 are ignored
    assert r.insn("notify", 0xFFFF_FFFF_0000_0000 | SCHID0, 0, cookie) == cookie
    assert ring.n_notifies == before + 2 and r.t.n_trapped_notifies == 2
    assert r.t.exits["notify"] == 2
    # notification data ahead of the ring: counted as a guest error
    assert r.insn("notify", SCHID0, 0 | 5 << 16, cookie) >= 0
    assert ring.n_notify_data_errors == 1
    assert r.insn("notify", SCHID0, 7, 0) == -errno.EINVAL        # no queue 7
    assert r.insn("notify", SCHID0 | 5, 0, 0) == -errno.EINVAL    # no subchannel 5
    assert r.insn("notify", 0, 0, 0) == -errno.EINVAL             # not a subchannel id


def test_exits_are_counted_per_kind(rig):
    r = rig()
    r.to_driver_ok()
    by = r.t.exits
    assert by["stsch"] == 1 and by["msch"] == 1
    assert by["ssch"] == by["tsch"] >= 8
    assert r.t.exits_read == by["stsch"] + by["tsch"]
    assert r.t.exits_write == by["msch"] + by["ssch"]


# ---- 2. the driver's side of the indicator race ------------------------------------------------
class FakeVq:
    """Just what the indicator scans use of a virtqueue."""

    def __init__(self, index: int, transport, used: bool) -> None:
        self.index = index
        self.used = used
        self.enabled = True
        self.calls = 0
        self.vdev = type("V", (), {"transport": transport})()

    def more_used(self) -> bool:
        return self.used

    def callbacks_enabled(self) -> bool:
        return self.enabled

    def vring_interrupt(self) -> bool:
        self.calls += 1
        return self.used


class FakeTransport:
    def __init__(self) -> None:
        self.interrupts = 0
        self.recovered = 0


def test_airq_iv_bit_numbering():
    mm = mmap.mmap(-1, 1 << 16)
    ram = GuestRAM(mm, RAM_BASE)
    dma = DmaMemory(ram)
    iv = AirqIv(dma, 256)
    try:
        view = ram.view(iv.gpa, 32)
        for bit in (0, 7, 8, 13, 63, 64, 200, 255):
            view[:] = bytes(32)
            view[bit // 8] = 0x80 >> bit % 8           # the device's numbering, from the left
            assert iv.words[bit // 64] == iv.native_mask(bit), bit
        assert iv.alloc(3) == 0 and iv.alloc(2) == 3
        iv.free(0, 3)
        assert iv.alloc(2) == 0 and iv.alloc(1) == 2 and iv.alloc(300) == -1
        view.release()
    finally:
        iv.release()
        ram.release()
        mm.close()


def test_airq_scan_serves_a_queue_whose_bit_was_erased():
    """The driver stores 0 over a word it found non-zero; a bit the device set between the
    load and the store is gone, but its queue is in that word and is checked anyway."""
    mm = mmap.mmap(-1, 1 << 16)
    ram = GuestRAM(mm, RAM_BASE)
    dma = DmaMemory(ram)
    platform = type("P", (), {})()
    irqc = IrqController()
    css = ChannelSubsystem(platform, irqc, dma, {"adapter_irqs": [{"isc": 3, "irq": "airq:3"}]})
    irqc.add_line("airq:3", EventFd())
    areas = AirqAreas.of(css)
    try:
        t = FakeTransport()
        seen, erased, idle = FakeVq(0, t, True), FakeVq(1, t, True), FakeVq(2, t, False)
        got = areas.get_airq_indicator([seen, erased, idle])
        assert got is not None
        info, first = got
        assert first == 0
        vector = ram.view(info.iv.gpa, 8)
        vector[0] = 0x80                      # only queue 0's bit survived in memory
        info.summary[0] = 1
        info.handler()
        assert (seen.calls, erased.calls, idle.calls) == (1, 1, 0)
        assert info.n_recovered == 1 and t.recovered == 1 and t.interrupts == 1
        assert vector[0] == 0 and info.summary[0] == 0
        # a queue that asked for no interrupts is left to its driver's polling
        erased.enabled = False
        vector[0] = 0x80
        info.handler()
        assert erased.calls == 1
        vector.release()
    finally:
        areas.close()
        css.close()
        irqc.stop()
        ram.release()
        mm.close()


# ---- 3. the guest driver against the host emulation ----------------------------------------------
class CcwHost:
    """One host thread, as vmsim.host's loop: traps (the channel subsystem's instructions),
    kicks, and queue service."""

    def __init__(self, board: Board, transports: list[CcwTransport]) -> None:
        self.board = board
        self.transports = transports
        self.guest_ch, self.host_ch = Channel.pair()
        self.serve_queues = True
        self.trapped: list = []
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
        assert not self._thread.is_alive()
        self.guest_ch.close()
        self.host_ch.close()
        self._wake.close()

    def call(self, fn, *args):
        done = threading.Event()
        box: dict = {}

        def job() -> None:
            try:
                box["result"] = fn(*args)
            except BaseException as e:
                box["error"] = e
            finally:
                done.set()

        self._jobs.put(job)
        self._wake.signal()
        assert done.wait(5)
        if "error" in box:
            raise box["error"]
        return box.get("result")

    def _run(self) -> None:
        ep = select.epoll()
        kicks = {}
        try:
            ep.register(self.host_ch.fileno(), select.EPOLLIN)
            ep.register(self._wake.fileno(), select.EPOLLIN)
            for t in self.transports:
                for q in t.dev.queues:
                    ep.register(q.kick.fileno(), select.EPOLLIN)
                    kicks[q.kick.fileno()] = q
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
                if self.serve_queues:
                    for t in self.transports:
                        dev = t.dev
                        for q in dev.live_queues():
                            ring = q.ring
                            while ring.has_work() and not q.broken and not dev.broken:
                                ring.disable_notify()
                                dev.service(q)
                                if not ring.enable_notify():
                                    break
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
        assert not fds and msg[0] == "css", msg
        self.trapped.append(tuple(msg[1:3]))
        self.host_ch.send(self.board.css.trap(msg[1:]))


class Machine:
    def __init__(self, devices: int = 1, dev_kw: dict | None = None, use_airq=None,
                 **tkw) -> None:
        self.mm = mmap.mmap(-1, 4 << 20)
        self.hmem = GuestMemory(self.mm, RAM_BASE)
        self.ram = GuestRAM(self.mm, RAM_BASE)
        self.dma = DmaMemory(self.ram)
        self.board = Board()
        self.devs, self.ts = [], []
        for i in range(devices):
            kw = dict(name=f"vd{chr(97 + i)}", mem=self.hmem, backend=MemoryBackend(DISK_SIZE),
                      readonly=False, num_queues=1, queue_size=16, offer=0, withhold=0,
                      blk_size=512, serial=SERIAL, dev_stats=None, queue_stats=[None],
                      refuse_features_ok=False)
            kw.update(dev_kw or {})
            kw["queue_stats"] = [None] * kw["num_queues"]
            dev = BlkDevice(**kw)
            self.devs.append(dev)
            self.ts.append(CcwTransport(dev, self.board, **tkw))
        self.dev, self.t = self.devs[0], self.ts[0]
        self.host = CcwHost(self.board, self.ts)
        self.host.start()
        self.platform = Platform(self.host.guest_ch)
        self.irqc = IrqController()
        for t in self.ts:
            for space, addr, data, efd in t.ioeventfds():
                self.platform.bind_ioeventfd(addr, data, efd, space)
            for line, efd in t.irqfds():
                self.irqc.add_line(line, efd)
        self.irqc.start()
        self.bus = VirtioBus()
        self.css = ChannelSubsystem(self.platform, self.irqc, self.dma,
                                    self.board.css.describe())
        self.use_airq = use_airq
        self.transports: list[VirtioCcw] = []
        self.vdevs = []

    def boot(self, driver=None) -> list[int]:
        """STSCH scan, online each virtio-ccw device, register the driver and the devices."""
        self.bus.register_driver(driver if driver is not None else BlkDriver(self.dma))
        errs = []
        for sch in self.css.scan():
            vc = VirtioCcw(self.css, sch, self.dma, lambda i: None, use_airq=self.use_airq)
            self.transports.append(vc)
            vdev = vc.probe(sch.name, None)
            self.vdevs.append(vdev)
            errs.append(self.bus.register_device(vdev))
        return errs

    @property
    def vc(self) -> VirtioCcw:
        return self.transports[0]

    @property
    def vdev(self):
        return self.vdevs[0]

    @property
    def blk(self) -> VirtioBlk:
        return self.vdevs[0].priv

    def host_status(self, i: int = 0) -> int:
        return self.host.call(lambda: self.devs[i].status)

    def close(self) -> None:
        try:
            for vdev in self.vdevs:
                if vdev.driver is not None:
                    self.bus.unregister_device(vdev)
        finally:
            self.irqc.stop()
            self.host.stop()
            for vc in self.transports:
                vc.close()
            if "virtio_ccw" in self.css.drvdata:
                self.css.drvdata["virtio_ccw"].close()
            self.css.close()
            for dev, t in zip(self.devs, self.ts, strict=True):
                dev.close()
                t.close()
            self.ram.release()
            self.hmem.release()
            try:
                self.mm.close()
            except BufferError:
                pass
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


def _roundtrip(m: Machine, rounds: int = 20, blk=None) -> None:
    blk = blk or m.blk
    gpa, view = m.dma.alloc(4096, 512)
    for rnd in range(rounds):
        data = bytes((i * 7 + rnd) & 0xFF for i in range(4096))
        view[:] = data
        assert blk.sync(B.VIRTIO_BLK_T_OUT, rnd * 8, [(gpa, 4096)]) == B.VIRTIO_BLK_S_OK
        view[:] = bytes(4096)
        assert blk.sync(B.VIRTIO_BLK_T_IN, rnd * 8, [(gpa, 4096)]) == B.VIRTIO_BLK_S_OK
        assert bytes(view) == data
    view.release()
    m.dma.free(gpa)


def test_guest_probes_over_adapter_interrupts(machine):
    m = machine()
    assert m.boot() == [0]
    vdev, vc = m.vdev, m.vc
    assert vdev.id == (ids.VIRTIO_ID_BLOCK, C.VIRTIO_CCW_CU_TYPE)
    assert isinstance(vdev.driver, BlkDriver) and not vdev.failed
    assert vc.revision == 2 and m.t.revision == 2
    assert vc.irq_mode == "adapter" and m.t.irq_mode == "adapter"
    assert m.host_status() == ACK | DRV | FOK | DOK
    assert vdev.features & F.bit(F.VIRTIO_F_VERSION_1)
    assert not vdev.features & F.bit(F.VIRTIO_F_RING_RESET)     # no queue reset on ccw
    assert m.dev.driver_features == vdev.features
    q = m.dev.queues[0]
    vq = vdev.vqs[0]
    assert q.ready and (q.desc, q.driver, q.device) == (vq.desc_addr, vq.avail_addr,
                                                        vq.used_addr)
    assert vc.bus_name(vdev) == "0.0.0000"
    assert m.dev.guest_errors == [] and m.dev.errors == []
    setup_exits = m.platform.exits
    _roundtrip(m)
    # kicks are ioeventfds and interrupts are memory: the I/O cost no exit at all
    assert m.platform.exits == setup_exits
    assert m.t.n_adapter_interrupts >= 1 and vc.interrupts >= 1
    assert m.t.n_io_interrupts == 0
    assert m.platform.ioeventfd_writes >= 1


def test_guest_uses_classic_indicators_when_told(machine):
    m = machine(use_airq=False)
    assert m.boot() == [0]
    assert m.vc.irq_mode == "classic" and m.t.irq_mode == "classic"
    exits = dict(m.platform.exits_by_kind)
    _roundtrip(m)
    ints = m.t.n_io_interrupts
    assert ints >= 1 and m.t.n_adapter_interrupts == 0
    # each classic interrupt costs one TSCH, and nothing else traps
    after = m.platform.exits_by_kind
    assert after.get("css_tsch", 0) - exits.get("css_tsch", 0) == ints
    assert after.get("css_ssch", 0) == exits.get("css_ssch", 0)


def test_guest_falls_back_to_classic_when_the_host_has_no_adapter_interrupts(machine):
    m = machine(adapter_interrupts=False)
    assert m.boot() == [0]
    assert m.vc.irq_mode == "classic"
    assert not AirqAreas.of(m.css).use_airq           # remembered: stop trying
    _roundtrip(m, 5)


def test_guest_negotiates_down_to_revision_1(machine):
    m = machine(max_revision=1)
    assert m.boot() == [0]
    assert m.vc.revision == 1 and m.t.revision == 1
    n = m.t.n_commands
    assert n.get("READ_STATUS", 0) == 0               # a revision 1 driver never asks
    _roundtrip(m, 5)


def test_guest_refuses_a_legacy_only_device(machine):
    m = machine()
    m.t.max_revision = 0           # a device that would take only revision 0
    (sch,) = m.css.scan()
    vc = VirtioCcw(m.css, sch, m.dma, lambda i: None)
    m.transports.append(vc)
    with pytest.raises(CcwProbeError, match="SET_VIRTIO_REV failed"):
        vc.probe("vda", None)
    assert m.t.n_commands["SET_VIRTIO_REV"] == 2        # 2, then 1; never 0


def test_two_devices_share_an_adapter_area(machine):
    m = machine(devices=2)
    assert m.boot() == [0, 0]
    a, b = m.transports
    assert a.airq_info is b.airq_info and (a.airq_first, b.airq_first) == (0, 1)
    assert m.ts[1].bit_nr == 1 and m.ts[0].summary == m.ts[1].summary
    _roundtrip(m, 5, m.vdevs[0].priv)
    _roundtrip(m, 5, m.vdevs[1].priv)
    assert a.interrupts >= 1 and b.interrupts >= 1


def test_config_change_reaches_the_driver(machine):
    for use_airq in (True, False):
        m = machine(use_airq=use_airq)
        assert m.boot() == [0]
        blk = m.blk
        assert blk.capacity == DISK_SIZE // 512
        seen, changed = [], threading.Event()
        blk.capacity_listeners.append(lambda cap, s=seen, c=changed: (s.append(cap), c.set()))
        gen = m.vc.generation(m.vdev)
        m.host.call(m.dev.resize, DISK_SIZE // 4)
        assert changed.wait(5), "no config-change interrupt reached the driver"
        assert seen == [DISK_SIZE // 4 // 512] and blk.capacity == DISK_SIZE // 4 // 512
        assert m.vc.config_interrupts == 1 and m.vdev.n_config_changed == 1
        assert m.vc.generation(m.vdev) > gen
        assert m.t.n_io_interrupts >= 1                 # always the classic path
        # the config reads ran on the interrupt thread, fetching their status themselves
        assert m.vc.sch.n_polls >= 1
        _roundtrip(m, 2)


def test_config_changes_while_the_main_thread_does_channel_io(machine):
    """The interrupt thread's config handler needs the device's I/O lock while the main
    thread holds it waiting for a status only the interrupt thread would fetch: the waiter
    fetches it itself after a while, and nothing is lost or times out."""
    m = machine(use_airq=False)
    assert m.boot() == [0]
    blk, vdev = m.blk, m.vdev
    seen = []
    blk.capacity_listeners.append(seen.append)
    stop = threading.Event()

    def resizer() -> None:
        for k in range(1, 21):
            m.host.call(m.dev.resize, DISK_SIZE - k * 4096)
            time.sleep(0.005)
        stop.set()

    th = threading.Thread(target=resizer)
    th.start()
    reads = 0
    while not stop.is_set():
        vdev.cread(B.CFG_CAPACITY, 8)
        reads += 1
    th.join()
    final = (DISK_SIZE - 20 * 4096) // 512
    wait_for(lambda: blk.capacity == final, what="the last capacity")
    assert seen and seen[-1] == final
    assert m.vc.sch.n_timeouts == 0 and m.vc.io_errors == 0
    assert m.vc.config_interrupts >= 1 and reads > 0
    _roundtrip(m, 2)


def test_generation_counter_makes_cread_reread(machine):
    m = machine()
    assert m.boot() == [0]
    vdev, vc = m.vdev, m.vc
    before = vc.generation(vdev)
    assert vdev.cread(B.CFG_CAPACITY, 8) == DISK_SIZE // 512
    assert vc.generation(vdev) == before               # nothing changed: one read
    # the host changes config space behind the driver's back (no interrupt)
    m.host.call(lambda: (m.dev.backend.resize(DISK_SIZE // 2),
                         setattr(m.dev, "_config", m.dev._build_config())))
    reads = m.t.n_commands["READ_CONF"]
    assert vdev.cread(B.CFG_CAPACITY, 8) == DISK_SIZE // 2 // 512
    assert vc.generation(vdev) == before + 1
    assert m.t.n_commands["READ_CONF"] == reads + 2    # the change made cread read again


def test_device_error_reaches_the_guest_through_read_status(machine):
    m = machine()
    assert m.boot() == [0]
    m.host.call(m.dev.virtio_error, "injected by the test")
    wait_for(lambda: m.vdev.needs_reset, what="DEVICE_NEEDS_RESET to reach the guest")
    assert m.vdev.vqs[0].broken
    assert m.host_status() & S.DEVICE_NEEDS_RESET


def test_device_refusing_features_ok_fails_the_probe(machine):
    m = machine(dev_kw=dict(refuse_features_ok=True))
    assert m.boot() == [-errno.ENODEV]
    assert m.vdev.failed and "refuses features" in m.vdev.probe_error
    assert m.host_status() == ACK | DRV | S.FAILED


def test_unregister_resets_and_releases_everything(machine):
    m = machine()
    allocs = m.dma.allocator.allocations
    assert m.boot() == [0]
    assert m.dma.allocator.allocations > allocs
    m.bus.unregister_device(m.vdev)
    assert m.host_status() == ACK
    assert not m.dev.queues[0].ready
    assert not m.t.thinint and m.t.indicators == 0
    assert m.vdev.vqs == [] and m.vc.airq_info is None
    assert m.t.n_commands["SET_VQ"] == 2              # set up, then released
    # what stays is the subchannel's and the device's own areas and the airq area
    m.bus.register_device(m.vdev)
    assert m.host_status() == ACK | DRV | FOK | DOK
    _roundtrip(m, 2)


def test_probe_refuses_what_is_not_virtio_ccw(machine):
    m = machine()
    (sch,) = m.css.scan()
    m.host.call(setattr, m.t.sch, "cu_type", 0x3990)
    vc = VirtioCcw(m.css, sch, m.dma, lambda i: None)
    m.transports.append(vc)
    with pytest.raises(CcwProbeError, match="not virtio-ccw"):
        vc.probe("vda", None)


def test_guest_notify_traps_with_notification_data(machine):
    m = machine(dev_kw=dict(offer=F.bit(F.VIRTIO_F_NOTIFICATION_DATA)))
    assert m.boot() == [0]
    assert m.vdev.has_feature(F.VIRTIO_F_NOTIFICATION_DATA)
    _roundtrip(m, 3)
    assert m.t.n_trapped_notifies >= 1
    assert m.platform.exits_by_kind.get("css_notify", 0) == m.t.n_trapped_notifies
    assert m.dev.queues[0].ring.n_notify_data_errors == 0


# ---- 4. real runs --------------------------------------------------------------------------------
@pytest.mark.multiprocess
def test_blk_ccw_config_runs_clean(tmp_path):
    out = tmp_path / "run.json"
    r = subprocess.run([sys.executable, "-m", "vmsim", "run", str(ROOT / "configs/blk-ccw.yaml"),
                        "--duration", "2", "--json", str(out), "-q"],
                       capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    d = json.loads(out.read_text())
    dev = d["vms"]["vm0"]["devices"]["vda"]
    assert dev["transport"] == "ccw"
    assert dev["status"] == "ACKNOWLEDGE|DRIVER|FEATURES_OK|DRIVER_OK"
    info = dev["transport_info"]
    assert info["irq_mode"] == "adapter" and info["revision"] == 2
    assert info["adapter_interrupts"] >= 1
    # setup costs a few dozen exits; the I/O itself none
    assert dev["exits"]["total"] < 100
    assert d["totals"]["workload_errors"] == 0 and d["totals"]["workload_ops"] > 0
    assert d["totals"]["device_errors"] == 0 and not d["problems"]
    assert dev["guest_errors"] == []


@pytest.mark.multiprocess
def test_ccw_and_mmio_devices_side_by_side(tmp_path):
    cfg = tmp_path / "mixed.yaml"
    cfg.write_text(
        "name: mixed\nduration: 2\nvms:\n  vm0:\n    memory: 32M\n    devices:\n"
        "      vda: {type: blk, transport: ccw, backend: memory, size: 4M}\n"
        "      vdb: {type: blk, transport: ccw, backend: memory, size: 4M, ring: packed}\n"
        "      vdc: {type: blk, transport: mmio, backend: memory, size: 4M}\n"
        "    workloads:\n"
        "      a: {type: blk-verify, device: vda, in_flight: 8}\n"
        "      b: {type: blk-verify, device: vdb, in_flight: 8}\n"
        "      c: {type: blk-verify, device: vdc, in_flight: 8}\n")
    out = tmp_path / "run.json"
    r = subprocess.run([sys.executable, "-m", "vmsim", "run", str(cfg), "--duration", "2",
                        "--json", str(out), "-q"],
                       capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    d = json.loads(out.read_text())
    devs = d["vms"]["vm0"]["devices"]
    assert [devs[n]["transport"] for n in ("vda", "vdb", "vdc")] == ["ccw", "ccw", "mmio"]
    assert devs["vdb"]["queues"][0]["ring"] == "packed"
    assert devs["vdb"]["transport_info"]["bus_id"] == "0.0.0001"
    assert d["totals"]["workload_errors"] == 0
    assert all(w["ops"] > 0 for w in d["workloads"].values())
