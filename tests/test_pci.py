"""virtio-pci, modern and legacy, on both sides.

1. The host's emulation (vmsim.host.pci + vmsim.host.virtio.pci.PciTransport) register by
   register, reached through the board's address spaces as trapped accesses reach it: the
   configuration header and ECAM, BAR sizing and decoding, the capability chain, every field
   of the common configuration, notify addresses, the ISR, the device configuration, the PCI
   configuration access window, the MSI-X table, PBA and masking, the legacy I/O registers;
   invalid offsets and widths and writes in the wrong device state (guest errors, ignored).
2. The interrupt path: which irqfd fires for a queue and for a configuration change under
   MSI-X with a vector per queue, a shared queue vector, and INTx, and what the driver must
   read to learn the cause.
3. The guest's PCI core and virtio-pci driver against the real host emulation in one process
   (a test-side host thread answering traps, as in test_guest_core): enumeration, probe, the
   interrupt fallback Linux makes, I/O, configuration changes, packed rings, per-queue reset,
   notification data, removal.
4. Real runs of the launcher with the shipped PCI topologies and forced fallbacks.
"""

import errno
import mmap
import queue
import select
import threading
import time
from functools import partial
from pathlib import Path

import pytest

from vmsim.abi import blk as B
from vmsim.abi import features as F
from vmsim.abi import pci as P
from vmsim.abi import split_ring as R
from vmsim.abi import status as S
from vmsim.guest.drivers.blk import BlkDriver, VirtioBlk
from vmsim.guest.memory import DmaMemory, GuestRAM
from vmsim.guest.pci import scan_bus
from vmsim.guest.platform import IrqController, Platform
from vmsim.guest.virtio.core import VirtioBus
from vmsim.guest.virtio.pci_common import PciProbeError, VirtioPciDevice, virtio_pci_probe
from vmsim.guest.virtio.vring import virtqueue_reset, virtqueue_resize
from vmsim.host.board import PCI_ECAM_BASE, Board
from vmsim.host.devices.blk.backend import MemoryBackend
from vmsim.host.devices.blk.device import BlkDevice
from vmsim.host.memory import GuestMemory
from vmsim.host.virtio import pci as HP
from vmsim.host.virtio.pci import PciTransport
from vmsim.machine.eventfd import EventFd
from vmsim.machine.wire import Channel, ChannelClosed

ROOT = Path(__file__).resolve().parents[1]
RAM_BASE = 0x4000_0000
RAM_SIZE = 4 << 20
DISK_SIZE = 1 << 20
NO_VECTOR = P.VIRTIO_MSI_NO_VECTOR
ACK, DRV, FOK, DOK = S.ACKNOWLEDGE, S.DRIVER, S.FEATURES_OK, S.DRIVER_OK
V1 = F.bit(F.VIRTIO_F_VERSION_1)
RING_RESET = F.bit(F.VIRTIO_F_RING_RESET)
BLK_DEFAULT = (V1 | F.bit(F.VIRTIO_RING_F_INDIRECT_DESC) | F.bit(F.VIRTIO_RING_F_EVENT_IDX)
               | RING_RESET | F.bit(B.VIRTIO_BLK_F_SEG_MAX) | F.bit(B.VIRTIO_BLK_F_BLK_SIZE)
               | F.bit(B.VIRTIO_BLK_F_FLUSH) | F.bit(B.VIRTIO_BLK_F_TOPOLOGY))
BLK_MQ = BLK_DEFAULT | F.bit(B.VIRTIO_BLK_F_MQ)           # with more than one queue
CMD_ALL = P.PCI_COMMAND_IO | P.PCI_COMMAND_MEMORY | P.PCI_COMMAND_MASTER

# common configuration offsets, short
DFSEL, DF, GFSEL, GF = (P.VIRTIO_PCI_COMMON_DFSELECT, P.VIRTIO_PCI_COMMON_DF,
                        P.VIRTIO_PCI_COMMON_GFSELECT, P.VIRTIO_PCI_COMMON_GF)
MSIX, NUMQ, STATUS, GEN = (P.VIRTIO_PCI_COMMON_MSIX, P.VIRTIO_PCI_COMMON_NUMQ,
                           P.VIRTIO_PCI_COMMON_STATUS, P.VIRTIO_PCI_COMMON_CFGGENERATION)
QSEL, QSIZE, QMSIX, QEN, QNOFF = (P.VIRTIO_PCI_COMMON_Q_SELECT, P.VIRTIO_PCI_COMMON_Q_SIZE,
                                  P.VIRTIO_PCI_COMMON_Q_MSIX, P.VIRTIO_PCI_COMMON_Q_ENABLE,
                                  P.VIRTIO_PCI_COMMON_Q_NOFF)
QDESC, QDRV, QDEV = (P.VIRTIO_PCI_COMMON_Q_DESCLO, P.VIRTIO_PCI_COMMON_Q_AVAILLO,
                     P.VIRTIO_PCI_COMMON_Q_USEDLO)
QNDATA, QRESET = P.VIRTIO_PCI_COMMON_Q_NDATA, P.VIRTIO_PCI_COMMON_Q_RESET

pytestmark = pytest.mark.timeout(60)


def wait_for(cond, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.002)


def ones(width: int) -> int:
    return (1 << 8 * width) - 1


def fired(efd: EventFd) -> int:
    """How many times an irqfd was signalled since last asked (0: not at all)."""
    return efd.consume()


# ---- 1. the host emulation, register by register ------------------------------------------------
class Rig:
    """A blk device on a PciTransport on its own board, over anonymous "guest RAM"."""

    def __init__(self, legacy: bool = False, msix_vectors: int | None = None,
                 mult: int = HP.DEFAULT_NOTIFY_OFF_MULTIPLIER, num_queues: int = 2,
                 queue_size: int = 8, **kw) -> None:
        self.mm = mmap.mmap(-1, RAM_SIZE)
        self.mem = GuestMemory(self.mm, RAM_BASE)
        self.board = Board()
        args = dict(name="vda", mem=self.mem, backend=MemoryBackend(DISK_SIZE), readonly=False,
                    num_queues=num_queues, queue_size=queue_size, offer=0, withhold=0,
                    blk_size=512, serial="pci-test", dev_stats=None,
                    queue_stats=[None] * num_queues)
        args.update(kw)
        self.dev = BlkDevice(**args)
        self.t = PciTransport(self.dev, self.board, legacy=legacy, msix_vectors=msix_vectors,
                              notify_off_multiplier=mult)
        for r in self.t.regions():
            (self.board.mmio if r.space == "mmio" else self.board.pio).add(r)
        self.slot = self.t.slot

    # trapped accesses, routed as vmsim.host.vm routes them
    def read(self, addr: int, width: int, space: str = "mmio") -> int:
        region = (self.board.mmio if space == "mmio" else self.board.pio).find(addr)
        if region is None:
            return ones(width)
        return region.read(addr - region.base, width)

    def write(self, addr: int, width: int, value: int, space: str = "mmio") -> None:
        region = (self.board.mmio if space == "mmio" else self.board.pio).find(addr)
        if region is not None:
            region.write(addr - region.base, width, value)

    def cfg(self, reg: int, width: int = 4, slot: int | None = None, fn: int = 0) -> int:
        slot = self.slot if slot is None else slot
        return self.read(PCI_ECAM_BASE + P.ecam_offset(0, slot, fn, reg), width)

    def cfg_w(self, reg: int, width: int, value: int) -> None:
        self.write(PCI_ECAM_BASE + P.ecam_offset(0, self.slot, 0, reg), width, value)

    def enable(self, command: int = CMD_ALL) -> None:
        self.cfg_w(P.PCI_COMMAND, 2, command)

    # modern BAR 4
    def c(self, off: int, width: int) -> int:
        return self.read(self.t.mem_base + HP.COMMON_OFFSET + off, width)

    def c_w(self, off: int, width: int, value: int) -> None:
        self.write(self.t.mem_base + HP.COMMON_OFFSET + off, width, value)

    def bar4(self, off: int, width: int) -> int:
        return self.read(self.t.mem_base + off, width)

    def bar4_w(self, off: int, width: int, value: int) -> None:
        self.write(self.t.mem_base + off, width, value)

    # legacy BAR 0
    def io(self, off: int, width: int) -> int:
        return self.read(self.t.io_base + off, width, "pio")

    def io_w(self, off: int, width: int, value: int) -> None:
        self.write(self.t.io_base + off, width, value, "pio")

    # MSI-X BAR 1
    def msix_w(self, off: int, value: int) -> None:
        self.write(self.t.msix_base + off, 4, value)

    def msix(self, off: int) -> int:
        return self.read(self.t.msix_base + off, 4)

    def program_msix(self, nvec: int, enable: bool = True) -> None:
        """What the guest's pci_enable_msix_exact does: messages, entries unmasked."""
        for v in range(nvec):
            e = 16 * v
            self.msix_w(e + P.PCI_MSIX_ENTRY_LOWER_ADDR, 0xFEE0_0000)
            self.msix_w(e + P.PCI_MSIX_ENTRY_DATA, v)
            self.msix_w(e + P.PCI_MSIX_ENTRY_VECTOR_CTRL, 0)
        if enable:
            self.cfg_w(self.t.msix.cap + P.PCI_MSIX_FLAGS, 2, P.PCI_MSIX_FLAGS_ENABLE)

    def negotiate(self, features: int = BLK_DEFAULT) -> int:
        self.c_w(STATUS, 1, ACK)
        self.c_w(STATUS, 1, ACK | DRV)
        self.c_w(GFSEL, 4, 0)
        self.c_w(GF, 4, features & 0xFFFFFFFF)
        self.c_w(GFSEL, 4, 1)
        self.c_w(GF, 4, features >> 32)
        self.c_w(STATUS, 1, ACK | DRV | FOK)
        return self.c(STATUS, 1)

    def program_queue(self, index: int, num: int, base: int) -> tuple[int, int, int]:
        desc, avail = base, base + R.desc_table_size(num)
        used = R.align_up(avail + R.avail_size(num), 4)
        self.c_w(QSEL, 2, index)
        self.c_w(QSIZE, 2, num)
        for off, addr in ((QDESC, desc), (QDRV, avail), (QDEV, used)):
            self.c_w(off, 4, addr & 0xFFFFFFFF)
            self.c_w(off + 4, 4, addr >> 32)
        return desc, avail, used

    @property
    def errors(self) -> list[str]:
        return self.dev.guest_errors

    def close(self) -> None:
        self.dev.close()
        self.t.close()
        self.mem.release()
        try:
            self.mm.close()
        except BufferError:
            pass


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


def test_modern_configuration_header(make):
    r = make()
    assert r.slot == 1
    assert r.cfg(P.PCI_VENDOR_ID, 2) == 0x1AF4
    assert r.cfg(P.PCI_DEVICE_ID, 2) == 0x1040 + 2 == 0x1042
    assert r.cfg(P.PCI_REVISION_ID, 1) == 1
    assert r.cfg(P.PCI_REVISION_ID, 4) >> 8 == P.PCI_CLASS_STORAGE_SCSI
    assert r.cfg(P.PCI_HEADER_TYPE, 1) == P.PCI_HEADER_TYPE_NORMAL
    assert r.cfg(P.PCI_SUBSYSTEM_VENDOR_ID, 2) == 0x1AF4
    assert r.cfg(P.PCI_SUBSYSTEM_ID, 2) == P.PCI_SUBDEVICE_ID_QEMU >= 0x40
    assert r.cfg(P.PCI_INTERRUPT_PIN, 1) == 1 and r.cfg(P.PCI_INTERRUPT_LINE, 1) == r.t.irq
    assert r.cfg(P.PCI_STATUS, 2) & P.PCI_STATUS_CAP_LIST
    assert r.cfg(P.PCI_COMMAND, 2) == 0          # firmware leaves decoding to the OS
    assert r.cfg(P.PCI_ROM_ADDRESS) == 0
    # read-only fields ignore writes (no guest error: that is PCI)
    r.cfg_w(P.PCI_VENDOR_ID, 2, 0x1234)
    r.cfg_w(P.PCI_REVISION_ID, 4, 0)
    assert r.cfg(P.PCI_VENDOR_ID, 2) == 0x1AF4 and r.cfg(P.PCI_REVISION_ID, 1) == 1
    r.cfg_w(P.PCI_INTERRUPT_LINE, 1, 11)
    assert r.cfg(P.PCI_INTERRUPT_LINE, 1) == 11
    # beyond the conventional 256 bytes: no extended capabilities
    assert r.cfg(0x100) == 0
    assert r.t.exits["pci_cfg_read"] >= 10 and r.t.exits["pci_cfg_write"] == 3
    assert r.errors == []


def test_legacy_configuration_header(make):
    r = make(legacy=True)
    assert r.cfg(P.PCI_DEVICE_ID, 2) == 0x1001            # the transitional blk ID
    assert r.cfg(P.PCI_REVISION_ID, 1) == P.VIRTIO_PCI_ABI_VERSION == 0
    assert r.cfg(P.PCI_SUBSYSTEM_ID, 2) == 2              # the virtio device ID
    assert r.cfg(P.PCI_SUBSYSTEM_VENDOR_ID, 2) == 0x1AF4
    assert r.dev.legacy and not r.dev.device_features >> 32    # no VERSION_1


def test_host_bridge_and_empty_slots(make):
    r = make()
    assert r.cfg(P.PCI_VENDOR_ID, 2, slot=0) == P.PCI_VENDOR_ID_REDHAT
    assert r.cfg(P.PCI_REVISION_ID, 4, slot=0) >> 8 == P.PCI_CLASS_BRIDGE_HOST
    assert r.cfg(P.PCI_VENDOR_ID, 2, slot=7) == 0xFFFF            # nothing there
    assert r.cfg(P.PCI_VENDOR_ID, 4, slot=31) == 0xFFFFFFFF
    assert r.cfg(P.PCI_VENDOR_ID, 2, fn=1) == 0xFFFF              # single-function device
    assert r.board.pci.empty_reads == 3
    d = r.board.pci.describe()
    assert d["ecam"] == PCI_ECAM_BASE and d["bus"] == 0 and d["slots"] == 32
    assert d["functions"] == [{"slot": 1, "name": "vda"}]


def test_invalid_configuration_accesses(make):
    r = make()
    assert r.cfg(P.PCI_DEVICE_ID, 4) == 0xFFFFFFFF      # misaligned dword
    assert r.cfg(P.PCI_VENDOR_ID, 3) == 0xFFFFFF
    r.cfg_w(P.PCI_COMMAND + 1, 2, 0xFFFF)
    assert r.cfg(P.PCI_COMMAND, 2) == 0
    assert len(r.errors) == 3 and all("naturally aligned" in e for e in r.errors)


def test_bar_sizing_and_assignment(make):
    r = make()
    t = r.t
    bar = lambda i: r.cfg(P.PCI_BASE_ADDRESS_0 + 4 * i)   # noqa: E731
    assert bar(0) == 0 and bar(2) == 0 and bar(3) == 0        # not implemented
    assert bar(1) == t.msix_base and t.msix_base % HP.MSIX_BAR_SIZE == 0
    assert bar(4) == t.mem_base | P.PCI_BASE_ADDRESS_MEM_TYPE_64 | \
        P.PCI_BASE_ADDRESS_MEM_PREFETCH
    assert bar(5) == t.mem_base >> 32 == 0
    # sizing: all ones in, the size mask (and the type bits) out; then the address back
    for i in range(6):
        orig = bar(i)
        r.cfg_w(P.PCI_BASE_ADDRESS_0 + 4 * i, 4, 0xFFFFFFFF)
        sized = bar(i)
        r.cfg_w(P.PCI_BASE_ADDRESS_0 + 4 * i, 4, orig)
        assert bar(i) == orig
        assert sized == {0: 0, 1: 0xFFFFF000, 2: 0, 3: 0,
                         4: 0xFFFFC000 | 0xC, 5: 0xFFFFFFFF}[i]
    lr = make(legacy=True)
    io = lr.cfg(P.PCI_BASE_ADDRESS_0)
    assert io == lr.t.io_base | P.PCI_BASE_ADDRESS_SPACE_IO
    lr.cfg_w(P.PCI_BASE_ADDRESS_0, 4, 0xFFFFFFFF)
    size = P.legacy_region_size(B.CONFIG_SIZE)
    assert size == 64 and lr.cfg(P.PCI_BASE_ADDRESS_0) == (~(size - 1) & 0xFFFFFFFC) | 1
    assert r.errors == [] and lr.errors == []


def test_bar_decodes_only_when_enabled_and_in_place(make):
    r = make()
    assert r.c(NUMQ, 2) == 0xFFFF                     # memory decoding off
    assert "decoding is disabled" in r.errors[-1]
    r.enable(P.PCI_COMMAND_MEMORY)
    assert r.c(NUMQ, 2) == 2
    # the guest moves BAR 4: firmware's window no longer decodes, the new place is nowhere
    new = r.t.mem_base + 0x10_0000
    r.cfg_w(P.PCI_BASE_ADDRESS_0 + 16, 4, new)
    assert r.c(NUMQ, 2) == 0xFFFF and "moved" in r.errors[-1]
    assert r.read(new + NUMQ, 2) == 0xFFFF
    r.cfg_w(P.PCI_BASE_ADDRESS_0 + 16, 4, r.t.mem_base)
    assert r.c(NUMQ, 2) == 2
    lr = make(legacy=True)
    assert lr.io(P.VIRTIO_PCI_QUEUE_NUM, 2) == 0xFFFF
    lr.enable(P.PCI_COMMAND_IO)
    assert lr.io(P.VIRTIO_PCI_QUEUE_NUM, 2) == 8


def walk_caps(r: Rig) -> list[int]:
    caps, pos = [], r.cfg(P.PCI_CAPABILITY_LIST, 1)
    while pos:
        assert pos % 4 == 0 and pos >= 0x40
        caps.append(pos)
        pos = r.cfg(pos + 1, 1)
    return caps


def test_capability_chain_modern(make):
    r = make(num_queues=3)
    caps = walk_caps(r)
    vendor = [c for c in caps if r.cfg(c, 1) == P.PCI_CAP_ID_VNDR]
    assert [r.cfg(c, 1) for c in caps] == [P.PCI_CAP_ID_VNDR] * 5 + [P.PCI_CAP_ID_MSIX]
    got = {}
    for c in vendor:
        typ = r.cfg(c + P.VIRTIO_PCI_CAP_CFG_TYPE, 1)
        got[typ] = (r.cfg(c + P.VIRTIO_PCI_CAP_LEN, 1), r.cfg(c + P.VIRTIO_PCI_CAP_BAR, 1),
                    r.cfg(c + P.VIRTIO_PCI_CAP_OFFSET), r.cfg(c + P.VIRTIO_PCI_CAP_LENGTH))
    assert got == {
        P.VIRTIO_PCI_CAP_COMMON_CFG: (16, 4, 0x0000, 64),
        P.VIRTIO_PCI_CAP_NOTIFY_CFG: (20, 4, 0x3000, 3 * 4),
        P.VIRTIO_PCI_CAP_ISR_CFG: (16, 4, 0x1000, 1),
        P.VIRTIO_PCI_CAP_DEVICE_CFG: (16, 4, 0x2000, B.CONFIG_SIZE),
        P.VIRTIO_PCI_CAP_PCI_CFG: (20, 0, 0, 0),
    }
    notify = vendor[1]
    assert r.cfg(notify + P.VIRTIO_PCI_NOTIFY_CAP_MULT) == 4
    msix = caps[-1]
    assert r.cfg(msix + P.PCI_MSIX_FLAGS, 2) == 3        # 4 vectors: 3 queues + config
    assert r.cfg(msix + P.PCI_MSIX_TABLE) == 0x000 | 1
    assert r.cfg(msix + P.PCI_MSIX_PBA) == 0x800 | 1
    # the driver must not write the virtio capabilities (but may the PCI cfg window's fields)
    r.cfg_w(vendor[0] + P.VIRTIO_PCI_CAP_OFFSET, 4, 0x100)
    assert r.cfg(vendor[0] + P.VIRTIO_PCI_CAP_OFFSET) == 0 and "read-only virtio" in r.errors[-1]
    n = len(r.errors)
    r.cfg_w(vendor[4] + P.VIRTIO_PCI_CAP_OFFSET, 4, 0x14)
    assert r.cfg(vendor[4] + P.VIRTIO_PCI_CAP_OFFSET) == 0x14 and len(r.errors) == n


def test_capability_chain_legacy_and_without_msix(make):
    r = make(legacy=True)
    caps = walk_caps(r)
    assert [r.cfg(c, 1) for c in caps] == [P.PCI_CAP_ID_MSIX]     # no virtio capabilities
    bare = make(legacy=True, msix_vectors=0)
    assert not bare.cfg(P.PCI_STATUS, 2) & P.PCI_STATUS_CAP_LIST
    assert bare.cfg(P.PCI_CAPABILITY_LIST, 1) == 0 and bare.t.msix is None
    assert bare.cfg(P.PCI_BASE_ADDRESS_0 + 4) == 0                 # no MSI-X BAR either
    mod = make(msix_vectors=0)
    assert P.PCI_CAP_ID_MSIX not in [mod.cfg(c, 1) for c in walk_caps(mod)]


def test_common_cfg_device_fields(make):
    r = make()
    r.enable()
    assert r.c(DFSEL, 4) == 0
    assert r.c(DF, 4) == BLK_MQ & 0xFFFFFFFF
    r.c_w(DFSEL, 4, 1)
    assert r.c(DFSEL, 4) == 1 and r.c(DF, 4) == BLK_MQ >> 32
    r.c_w(DFSEL, 4, 2)
    assert r.c(DF, 4) == 0
    assert r.c(NUMQ, 2) == 2
    assert r.c(STATUS, 1) == 0 and r.c(GEN, 1) == 0
    assert r.c(MSIX, 2) == NO_VECTOR
    r.c_w(MSIX, 2, 2)
    assert r.c(MSIX, 2) == 2
    r.c_w(MSIX, 2, 3)                              # the table has 3 entries: 0..2
    assert r.c(MSIX, 2) == NO_VECTOR and "MSI-X table has 3" in r.errors[-1]
    # driver features: only after DRIVER, and only offered bits are accepted at FEATURES_OK
    r.c_w(GFSEL, 4, 0)
    r.c_w(GF, 4, 0x1234)
    assert r.c(GF, 4) == 0 and "before DRIVER" in r.errors[-1]
    assert r.negotiate() == ACK | DRV | FOK
    r.c_w(GFSEL, 4, 1)
    assert r.c(GFSEL, 4) == 1 and r.c(GF, 4) == BLK_DEFAULT >> 32
    r.c_w(GFSEL, 4, 0)
    assert r.c(GF, 4) == BLK_DEFAULT & 0xFFFFFFFF
    r.c_w(GF, 4, 0)                                # after FEATURES_OK: refused by the device
    assert r.c(GF, 4) == BLK_DEFAULT & 0xFFFFFFFF
    # read-only fields
    for off, width in ((DF, 4), (NUMQ, 2), (GEN, 1), (QNOFF, 2), (QNDATA, 2)):
        before = r.c(off, width)
        r.c_w(off, width, 0x55)
        assert r.c(off, width) == before and "read-only" in r.errors[-1]
    # the generation moves when the host changes the config
    r.dev.resize(DISK_SIZE // 2)
    assert r.c(GEN, 1) == 1
    assert r.bar4(HP.DEVICE_OFFSET, 4) == DISK_SIZE // 2 // 512


def test_common_cfg_queue_fields(make):
    r = make(num_queues=2)
    r.enable()
    r.c_w(QSEL, 2, 1)
    assert r.c(QSEL, 2) == 1
    assert r.c(QSIZE, 2) == 8 and r.c(QMSIX, 2) == NO_VECTOR and r.c(QEN, 2) == 0
    assert r.c(QNOFF, 2) == 1 and r.c(QNDATA, 2) == 1 and r.c(QRESET, 2) == 0
    assert r.c(P.VIRTIO_PCI_COMMON_ADM_Q_IDX, 2) == 0 == r.c(P.VIRTIO_PCI_COMMON_ADM_Q_NUM, 2)
    r.c_w(QMSIX, 2, 1)                             # a vector may be mapped in any state
    assert r.c(QMSIX, 2) == 1
    assert r.negotiate() == ACK | DRV | FOK
    desc, avail, used = r.program_queue(1, 4, RAM_BASE + 0x10000)
    q = r.dev.queues[1]
    assert (q.num, q.desc, q.driver, q.device) == (4, desc, avail, used)
    assert r.c(QSIZE, 2) == 4
    assert r.c(QDESC, 4) == desc & 0xFFFFFFFF and r.c(QDESC + 4, 4) == 0
    assert r.c(QDRV, 4) == avail and r.c(QDEV, 4) == used
    r.c_w(QDESC + 4, 4, 1)                         # the high half alone
    assert q.desc == 1 << 32 | desc
    r.c_w(QDESC + 4, 4, 0)
    for bad in (0, 3, 16):                         # not a power of two, beyond the maximum
        r.c_w(QSIZE, 2, bad)
        assert q.num == 4 and "queue_size" in r.errors[-1]
    r.c_w(QEN, 2, 1)
    assert q.ready and q.ring is not None and r.c(QEN, 2) == 1
    n = len(r.errors)
    for off, width, value in ((QSIZE, 2, 2), (QDESC, 4, 0), (QEN, 2, 1)):
        r.c_w(off, width, value)                   # the queue is enabled: no more changes
    assert len(r.errors) == n + 3 and all("enabled" in e for e in r.errors[n:])
    assert q.num == 4 and q.desc == desc
    # a queue that does not exist reads as unavailable and takes no writes
    r.c_w(QSEL, 2, 7)
    assert r.c(QSIZE, 2) == 0 and r.c(QMSIX, 2) == NO_VECTOR and r.c(QEN, 2) == 0
    r.c_w(QSIZE, 2, 4)
    assert "does not exist" in r.errors[-1]
    # status 0 resets everything, vectors unmapped included
    r.c_w(STATUS, 1, 0)
    assert r.c(STATUS, 1) == 0 and not q.ready and q.num == 8
    r.c_w(QSEL, 2, 1)
    assert r.c(QMSIX, 2) == NO_VECTOR and r.c(QSEL, 2) == 1


def test_queue_writes_in_the_wrong_state_are_rejected(make):
    r = make()
    r.enable()
    q = r.dev.queues[0]
    r.c_w(STATUS, 1, ACK)
    r.c_w(STATUS, 1, ACK | DRV)
    # before FEATURES_OK no queue register may be written (spec 3.1.1)
    r.c_w(QSEL, 2, 0)
    for off, width, value in ((QSIZE, 2, 4), (QDESC, 4, RAM_BASE), (QEN, 2, 1)):
        r.c_w(off, width, value)
        assert "written in status ACKNOWLEDGE|DRIVER" in r.errors[-1]
    assert q.num == 8 and q.desc == 0 and not q.ready
    # DRIVER_OK before FEATURES_OK: the device's state machine refuses it
    r.c_w(STATUS, 1, ACK | DRV | DOK)
    assert r.c(STATUS, 1) == ACK | DRV and "before" in r.errors[-1]
    assert r.negotiate(BLK_DEFAULT & ~RING_RESET) == ACK | DRV | FOK
    r.program_queue(0, 8, RAM_BASE + 0x10000)
    r.c_w(QEN, 2, 0)                               # the driver MUST NOT write 0
    assert "may only write 1" in r.errors[-1] and not q.ready
    r.c_w(QEN, 2, 1)
    r.c_w(STATUS, 1, ACK | DRV | FOK | DOK)
    assert r.c(STATUS, 1) == ACK | DRV | FOK | DOK
    # after DRIVER_OK, without RING_RESET: queue_reset and queue setup are refused
    r.c_w(QSEL, 2, 1)
    r.c_w(QSIZE, 2, 4)
    assert "written in status" in r.errors[-1] and r.dev.queues[1].num == 8
    r.c_w(QRESET, 2, 1)
    assert "without VIRTIO_F_RING_RESET" in r.errors[-1]
    # clearing a status bit without a reset is refused
    r.c_w(STATUS, 1, ACK | DRV)
    assert r.c(STATUS, 1) == ACK | DRV | FOK | DOK


def test_queue_reset_register(make):
    r = make()
    r.enable()
    r.negotiate()
    r.program_queue(0, 8, RAM_BASE + 0x10000)
    r.c_w(QMSIX, 2, 1)
    r.c_w(QEN, 2, 1)
    r.c_w(STATUS, 1, ACK | DRV | FOK | DOK)
    q = r.dev.queues[0]
    assert q.ready
    r.c_w(QRESET, 2, 1)
    # the reset completes within the write: both queue_reset and queue_enable read 0
    assert r.c(QRESET, 2) == 0 and r.c(QEN, 2) == 0 and not q.ready and q.ring is None
    assert r.c(QSIZE, 2) == 8 and r.c(QMSIX, 2) == NO_VECTOR
    # while the device runs, a reset queue may be set up again (spec 2.6.1)
    r.program_queue(0, 4, RAM_BASE + 0x20000)
    r.c_w(QEN, 2, 1)
    assert q.ready and q.num == 4 and r.errors == []


def test_invalid_offsets_and_widths_modern(make):
    r = make()
    r.enable()
    cases = [
        (lambda: r.c(QSEL, 4), "queue_select is 16 bits"),
        (lambda: r.c(DF, 1), "device_feature is 32 bits"),
        (lambda: r.c(1, 1), "no field starts"),
        (lambda: r.c(QDESC, 8), "queue_desc_lo is 32 bits"),
        (lambda: r.c(STATUS, 2), "device_status is 8 bits"),
        (lambda: r.bar4(0x100, 4), "no virtio structure"),
        (lambda: r.bar4(HP.ISR_OFFSET, 2), "ISR access of width 2"),
        (lambda: r.bar4(HP.ISR_OFFSET + 1, 1), "no virtio structure"),
        (lambda: r.bar4(HP.DEVICE_OFFSET + 1, 2), "naturally aligned"),
        (lambda: r.bar4(HP.DEVICE_OFFSET + B.CONFIG_SIZE, 4), "no virtio structure"),
        (lambda: r.bar4(HP.NOTIFY_OFFSET, 2), "read of the notify region"),
        (lambda: r.bar4(HP.NOTIFY_OFFSET + 0x800, 2), "no virtio structure"),
    ]
    for access, msg in cases:
        assert access() == 0, msg
        assert msg in r.errors[-1]
    n = len(r.errors)
    r.c_w(QSEL, 4, 1)                              # a write of the wrong width is ignored
    r.bar4_w(HP.ISR_OFFSET, 1, 3)
    r.bar4_w(HP.NOTIFY_OFFSET, 1, 0)
    r.bar4_w(HP.NOTIFY_OFFSET + 2, 2, 0)
    assert r.c(QSEL, 2) == 0 and len(r.errors) == n + 4
    assert r.t.pending_kicks == []


def test_notify_addresses_and_ioeventfds(make):
    r = make(num_queues=3)
    r.enable()
    evs = r.t.ioeventfds()
    assert [(s, a - r.t.mem_base, d) for s, a, d, _ in evs] == \
        [("mmio", 0x3000 + 4 * q, q) for q in range(3)]
    assert [e for *_, e in evs] == [q.kick for q in r.dev.queues]
    for q in range(3):
        r.c_w(QSEL, 2, q)
        assert r.c(QNOFF, 2) * 4 + 0x3000 == evs[q][1] - r.t.mem_base
    # a write that reaches the device (no ioeventfd matched it) still kicks the queue
    r.bar4_w(HP.NOTIFY_OFFSET + 4, 2, 1)
    assert r.t.pending_kicks == [1] and r.t.exits["notify_write"] == 1
    r.bar4_w(HP.NOTIFY_OFFSET + 8, 2, 0)           # queue 0's index at queue 2's address
    assert r.t.pending_kicks == [1, 2] and "notify of queue 0 at queue 2" in r.errors[-1]
    # notify_off_multiplier 0: one address for every queue, the value tells them apart
    z = make(num_queues=3, mult=0)
    assert {a for _, a, _, _ in z.t.ioeventfds()} == {z.t.mem_base + 0x3000}
    assert [d for _, _, d, _ in z.t.ioeventfds()] == [0, 1, 2]
    z.enable()
    z.bar4_w(HP.NOTIFY_OFFSET, 2, 2)
    assert z.t.pending_kicks == [2]
    z.bar4_w(HP.NOTIFY_OFFSET, 2, 9)
    assert "queue 9, which does not exist" in z.errors[-1] and z.t.pending_kicks == [2]
    with pytest.raises(ValueError, match="notify_off_multiplier"):
        PciTransport(r.dev, Board(), notify_off_multiplier=6)
    # legacy: the QUEUE_NOTIFY port
    lr = make(legacy=True, num_queues=2)
    assert [(s, a, d) for s, a, d, _ in lr.t.ioeventfds()] == \
        [("pio", lr.t.io_base + P.VIRTIO_PCI_QUEUE_NOTIFY, q) for q in range(2)]


def test_isr_read_clears_and_intx_follows_it(make):
    r = make(msix_vectors=0)
    r.enable()
    t = r.t
    assert t.irqfds() == [(t.irq, t.intx_fd)]
    t.signal_used(0)
    assert t.isr == P.VIRTIO_PCI_ISR_QUEUE and fired(t.intx_fd) == 1
    assert r.cfg(P.PCI_STATUS, 2) & P.PCI_STATUS_INTERRUPT
    t.signal_config()                              # the line is already up: no new edge
    assert fired(t.intx_fd) == 0
    assert r.bar4(HP.ISR_OFFSET, 1) == P.VIRTIO_PCI_ISR_QUEUE | P.VIRTIO_PCI_ISR_CONFIG
    assert r.bar4(HP.ISR_OFFSET, 1) == 0           # read to clear
    assert not r.cfg(P.PCI_STATUS, 2) & P.PCI_STATUS_INTERRUPT
    assert t.exits["isr_read"] == 2
    t.signal_used(1)
    assert fired(t.intx_fd) == 1
    r.bar4(HP.ISR_OFFSET, 1)
    # INTx disabled in the command register: the ISR still records the cause, no interrupt
    r.enable(CMD_ALL | P.PCI_COMMAND_INTX_DISABLE)
    t.signal_used(0)
    assert fired(t.intx_fd) == 0 and r.cfg(P.PCI_STATUS, 2) & P.PCI_STATUS_INTERRUPT
    r.enable(CMD_ALL)                              # enabled again: the pending level fires
    assert fired(t.intx_fd) == 1
    assert r.bar4(HP.ISR_OFFSET, 1) == P.VIRTIO_PCI_ISR_QUEUE
    # a device reset clears the ISR
    t.signal_config()
    fired(t.intx_fd)
    r.c_w(STATUS, 1, 0)
    assert t.isr == 0 and not r.cfg(P.PCI_STATUS, 2) & P.PCI_STATUS_INTERRUPT
    assert r.errors == []


def test_device_config_through_the_bar(make):
    r = make()
    r.enable()
    cap = r.bar4(HP.DEVICE_OFFSET + B.CFG_CAPACITY, 4) | \
        r.bar4(HP.DEVICE_OFFSET + B.CFG_CAPACITY + 4, 4) << 32
    assert cap == DISK_SIZE // 512
    assert r.bar4(HP.DEVICE_OFFSET + B.CFG_NUM_QUEUES, 2) == 2
    assert r.bar4(HP.DEVICE_OFFSET + B.CFG_BLK_SIZE, 4) == 512
    assert r.bar4(HP.DEVICE_OFFSET + B.CFG_WRITEBACK, 1) == 0
    r.bar4_w(HP.DEVICE_OFFSET, 4, 0)               # blk's config is read-only
    assert "read-only config" in r.errors[-1]
    assert r.t.exits["bar_read"] == 5


def test_pci_cfg_access_window(make):
    r = make()                                     # BAR decoding stays off: the window works
    cap = r.t.cfg_cap
    data = cap + P.VIRTIO_PCI_CFG_CAP_DATA

    def window(offset: int, length: int, bar: int = 4) -> None:
        r.cfg_w(cap + P.VIRTIO_PCI_CAP_BAR, 1, bar)
        r.cfg_w(cap + P.VIRTIO_PCI_CAP_OFFSET, 4, offset)
        r.cfg_w(cap + P.VIRTIO_PCI_CAP_LENGTH, 4, length)

    window(HP.COMMON_OFFSET + NUMQ, 2)
    assert r.cfg(data, 2) == 2
    window(HP.DEVICE_OFFSET + B.CFG_CAPACITY, 4)
    assert r.cfg(data) == DISK_SIZE // 512
    window(HP.COMMON_OFFSET + STATUS, 1)
    r.cfg_w(data, 1, ACK)
    assert r.dev.status == ACK and r.cfg(data, 1) == ACK
    window(HP.NOTIFY_OFFSET + 4, 2)
    r.cfg_w(data, 2, 1)
    assert r.t.pending_kicks == [1]
    r.t.signal_config()
    window(HP.ISR_OFFSET, 1)
    assert r.cfg(data, 1) == P.VIRTIO_PCI_ISR_CONFIG and r.t.isr == 0
    assert r.errors == []
    assert "bar_read" not in r.t.exits             # the window's accesses are config exits
    for args, msg in (((HP.COMMON_OFFSET, 3), "1, 2 or 4 bytes"),
                      ((HP.COMMON_OFFSET + 2, 4), "aligned"),
                      ((0x800, 4), "no virtio structure"),
                      ((HP.COMMON_OFFSET, 4, 1), "no virtio structure")):
        window(*args)
        r.cfg(data)
        assert msg in r.errors[-1]


def test_msix_table_pba_and_masking(make):
    r = make(num_queues=2)                         # 3 vectors
    t, m = r.t, r.t.msix
    r.enable()
    for v in range(3):                             # every entry starts masked
        assert r.msix(16 * v + P.PCI_MSIX_ENTRY_VECTOR_CTRL) == 1
        assert r.msix(16 * v) == 0
    assert r.msix(HP.MSIX_PBA_OFFSET) == 0
    assert [line for line, _ in t.irqfds()] == [t.irq] + [("msix", r.slot, v) for v in range(3)]
    # entries programmed, still masked; MSI-X enabled
    for v in range(3):
        r.msix_w(16 * v, 0xFEE0_0000)
        r.msix_w(16 * v + 8, 0x40 + v)
    assert m.message(2) == (0xFEE0_0000, 0x42)
    r.cfg_w(m.cap + P.PCI_MSIX_FLAGS, 2, P.PCI_MSIX_FLAGS_ENABLE)
    assert t.msix_enabled and r.cfg(m.cap + P.PCI_MSIX_FLAGS, 2) == 0x8000 | 2
    r.c_w(MSIX, 2, 0)
    r.c_w(QSEL, 2, 1)
    r.c_w(QMSIX, 2, 2)
    t.signal_used(1)                               # vector 2 is masked: pending, no message
    assert fired(m.irqfds[2]) == 0 and r.msix(HP.MSIX_PBA_OFFSET) == 0b100
    r.msix_w(16 * 2 + P.PCI_MSIX_ENTRY_VECTOR_CTRL, 0)   # unmask: the pending message goes
    assert fired(m.irqfds[2]) == 1 and r.msix(HP.MSIX_PBA_OFFSET) == 0
    t.signal_used(1)
    assert fired(m.irqfds[2]) == 1
    # the function mask holds every vector
    r.msix_w(P.PCI_MSIX_ENTRY_VECTOR_CTRL, 0)
    r.cfg_w(m.cap + P.PCI_MSIX_FLAGS, 2, P.PCI_MSIX_FLAGS_ENABLE | P.PCI_MSIX_FLAGS_MASKALL)
    t.signal_config()
    assert fired(m.irqfds[0]) == 0 and r.msix(HP.MSIX_PBA_OFFSET) == 0b1
    r.cfg_w(m.cap + P.PCI_MSIX_FLAGS, 2, P.PCI_MSIX_FLAGS_ENABLE)
    assert fired(m.irqfds[0]) == 1
    # MSI-X never raises INTx, whatever the ISR holds
    assert fired(t.intx_fd) == 0
    # NO_VECTOR: no interrupt at all for that event
    r.c_w(QSEL, 2, 0)
    t.signal_used(0)
    assert t.n_no_vector == 1 and not any(fired(e) for e in m.irqfds)
    # without bus mastering the message cannot be sent: lost
    r.enable(P.PCI_COMMAND_MEMORY)
    t.signal_used(1)
    assert fired(m.irqfds[2]) == 0 and m.n_dropped == 1 and "bus mastering" in r.errors[-1]
    # table accesses are aligned dwords or qwords; the PBA is read-only
    n = len(r.errors)
    assert r.read(t.msix_base + 2, 2) == 0xFFFF
    r.write(t.msix_base + HP.MSIX_PBA_OFFSET, 4, 1)
    assert r.read(t.msix_base + 0x400, 4) == 0
    assert len(r.errors) == n + 3
    assert m.fired == [1, 0, 2] and t.exits["msix_write"] >= 9


def test_legacy_io_registers(make):
    r = make(legacy=True, num_queues=2)
    r.enable()
    t = r.t
    assert r.io(P.VIRTIO_PCI_HOST_FEATURES, 4) == BLK_MQ & 0xFFFFFFFF    # no VERSION_1
    assert r.io(P.VIRTIO_PCI_QUEUE_NUM, 2) == 8
    r.io_w(P.VIRTIO_PCI_QUEUE_NUM, 2, 4)           # read-only: the device fixes the size
    assert r.io(P.VIRTIO_PCI_QUEUE_NUM, 2) == 8 and "read-only" in r.errors[-1]
    r.io_w(P.VIRTIO_PCI_GUEST_FEATURES, 4, 0x10)   # before DRIVER
    assert r.io(P.VIRTIO_PCI_GUEST_FEATURES, 4) == 0 and "guest features" in r.errors[-1]
    r.io_w(P.VIRTIO_PCI_QUEUE_PFN, 4, 0x40010)     # before DRIVER
    assert "QUEUE_PFN written in status RESET" in r.errors[-1]
    r.io_w(P.VIRTIO_PCI_STATUS, 1, ACK)
    r.io_w(P.VIRTIO_PCI_STATUS, 1, ACK | DRV)
    feats = F.bit(B.VIRTIO_BLK_F_FLUSH) | F.bit(F.VIRTIO_RING_F_EVENT_IDX)
    r.io_w(P.VIRTIO_PCI_GUEST_FEATURES, 4, feats)
    assert r.io(P.VIRTIO_PCI_GUEST_FEATURES, 4) == feats
    # QUEUE_PFN: a contiguous ring, the used ring on the next 4096-byte boundary
    pfn = (RAM_BASE + 0x10000) >> 12
    r.io_w(P.VIRTIO_PCI_QUEUE_SEL, 2, 1)
    assert r.io(P.VIRTIO_PCI_QUEUE_SEL, 2) == 1
    r.io_w(P.VIRTIO_PCI_QUEUE_PFN, 4, pfn)
    q = r.dev.queues[1]
    assert q.ready and r.io(P.VIRTIO_PCI_QUEUE_PFN, 4) == pfn
    assert (q.num, q.desc, q.driver, q.device) == (8, pfn << 12, (pfn << 12) + 128,
                                                   (pfn << 12) + 4096)
    r.io_w(P.VIRTIO_PCI_QUEUE_PFN, 4, pfn + 1)     # while active
    assert "while queue 1 is active" in r.errors[-1] and q.desc == pfn << 12
    r.io_w(P.VIRTIO_PCI_STATUS, 1, ACK | DRV | DOK)       # legacy: no FEATURES_OK
    assert r.io(P.VIRTIO_PCI_STATUS, 1) == ACK | DRV | DOK
    assert r.dev.live_queues() == [q]
    # the device config starts at 20 while MSI-X is off, any width
    assert r.io(20, 4) == DISK_SIZE // 512 and r.io(21, 1) == (DISK_SIZE // 512) >> 8
    assert r.io(20 + B.CFG_NUM_QUEUES, 2) == 2
    # with MSI-X on, the two vector registers sit at 20 and 22 and the config moves to 24
    r.program_msix(3)
    assert r.io(P.VIRTIO_MSI_CONFIG_VECTOR, 2) == NO_VECTOR and r.io(24, 4) == DISK_SIZE // 512
    r.io_w(P.VIRTIO_MSI_CONFIG_VECTOR, 2, 0)
    r.io_w(P.VIRTIO_MSI_QUEUE_VECTOR, 2, 2)
    assert r.io(P.VIRTIO_MSI_CONFIG_VECTOR, 2) == 0 and r.io(P.VIRTIO_MSI_QUEUE_VECTOR, 2) == 2
    r.io_w(P.VIRTIO_MSI_QUEUE_VECTOR, 2, 9)
    assert r.io(P.VIRTIO_MSI_QUEUE_VECTOR, 2) == NO_VECTOR
    r.io_w(P.VIRTIO_MSI_QUEUE_VECTOR, 2, 2)
    t.signal_used(1)
    assert fired(t.msix.irqfds[2]) == 1
    # widths: each register has its own
    n = len(r.errors)
    assert r.io(P.VIRTIO_PCI_QUEUE_SEL, 4) == 0 and r.io(P.VIRTIO_PCI_STATUS, 2) == 0
    r.io_w(P.VIRTIO_PCI_HOST_FEATURES, 4, 0)
    assert len(r.errors) == n + 3
    # a trapped QUEUE_NOTIFY kicks; PFN 0 deactivates; status 0 resets
    r.io_w(P.VIRTIO_PCI_QUEUE_NOTIFY, 2, 1)
    assert t.pending_kicks == [1] and t.exits["notify_write"] == 1
    r.io_w(P.VIRTIO_PCI_QUEUE_PFN, 4, 0)
    assert not q.ready and r.io(P.VIRTIO_PCI_QUEUE_PFN, 4) == 0
    r.io_w(P.VIRTIO_PCI_STATUS, 1, 0)
    assert r.io(P.VIRTIO_PCI_STATUS, 1) == 0 and r.io(P.VIRTIO_MSI_CONFIG_VECTOR, 2) == NO_VECTOR


def test_legacy_isr(make):
    r = make(legacy=True, msix_vectors=0)
    r.enable()
    r.t.signal_used(0)
    assert fired(r.t.intx_fd) == 1
    assert r.io(P.VIRTIO_PCI_ISR, 1) == P.VIRTIO_PCI_ISR_QUEUE
    assert r.io(P.VIRTIO_PCI_ISR, 1) == 0 and r.t.exits["isr_read"] == 2
    r.io_w(P.VIRTIO_PCI_ISR, 1, 1)
    assert "read-only" in r.errors[-1]


def test_legacy_needs_a_transitional_id(make):
    class Gpu(BlkDevice):
        device_id = 16                             # virtio-gpu: no transitional ID
    mm = mmap.mmap(-1, RAM_SIZE)
    mem = GuestMemory(mm, RAM_BASE)
    dev = Gpu("gpu", mem, MemoryBackend(DISK_SIZE), readonly=False, num_queues=1,
              queue_size=8, offer=0, withhold=0, blk_size=512, serial="x", dev_stats=None,
              queue_stats=[None])
    try:
        with pytest.raises(ValueError, match="no transitional"):
            PciTransport(dev, Board(), legacy=True)
        t = PciTransport(dev, Board())
        assert t.fn.get(P.PCI_DEVICE_ID, 2) == 0x1050
        assert t.fn.get(P.PCI_CLASS_DEVICE, 2) << 8 == P.PCI_CLASS_OTHERS
        t.close()
    finally:
        dev.close()
        mem.release()
        mm.close()


# ---- 2. the interrupt path -----------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["msix-per-queue", "msix-shared", "intx"])
def test_which_irqfd_fires(make, mode):
    """Per-queue MSI-X: the queue's own vector; shared: one vector for both queues; the
    config change its own vector under MSI-X. INTx: one line, and the cause is in the ISR,
    which the driver has to read (an exit)."""
    r = make(num_queues=2, msix_vectors=None if mode != "intx" else 0)
    r.enable()
    t = r.t
    if mode != "intx":
        r.program_msix(3)
        r.c_w(MSIX, 2, 0)
        for q in (0, 1):
            r.c_w(QSEL, 2, q)
            r.c_w(QMSIX, 2, 1 + q if mode == "msix-per-queue" else 1)
    lines = dict(t.irqfds())

    def who_fired() -> list:
        return [line for line, efd in lines.items() if fired(efd)]

    t.signal_used(1)
    t.signal_used(0)
    if mode == "msix-per-queue":
        assert who_fired() == [("msix", r.slot, 1), ("msix", r.slot, 2)]
    elif mode == "msix-shared":
        assert who_fired() == [("msix", r.slot, 1)]
    else:
        assert who_fired() == [t.irq]
        assert r.bar4(HP.ISR_OFFSET, 1) == P.VIRTIO_PCI_ISR_QUEUE
    t.signal_config()
    if mode == "intx":
        assert who_fired() == [t.irq]
        assert r.bar4(HP.ISR_OFFSET, 1) == P.VIRTIO_PCI_ISR_CONFIG
        assert t.exits["isr_read"] == 2
    else:
        assert who_fired() == [("msix", r.slot, 0)]
        assert "isr_read" not in t.exits
    assert r.errors == []


# ---- 3. the guest's driver against the host emulation, in one process ---------------------------
class PciHost:
    """One host thread, as vmsim.host's event loop: traps routed through the board, kicks,
    queue service."""

    def __init__(self, board: Board, transports: list[PciTransport]) -> None:
        self.board = board
        self.transports = transports
        self.guest_ch, self.host_ch = Channel.pair()
        self.error: BaseException | None = None
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = EventFd()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="pci-test-host", daemon=True)

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
        done, box = threading.Event(), {}

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
                self._serve()
        except BaseException as e:
            self.error = e
        finally:
            ep.close()

    def _trap(self) -> None:
        try:
            msg, _fds = self.host_ch.recv()
        except ChannelClosed:
            self._stop = True
            return
        op, addr, width = msg[0], msg[1], msg[2]
        space = self.board.pio if op in ("ir", "iw") else self.board.mmio
        region = space.find(addr)
        reply = None
        if op in ("r", "ir"):
            reply = ones(width) if region is None else region.read(addr - region.base, width)
        elif region is not None:
            region.write(addr - region.base, width, msg[3])
            for t in self.transports:
                t.pending_kicks.clear()          # served below by polling the rings
        self.host_ch.send(reply)

    def _serve(self) -> None:
        for t in self.transports:
            dev = t.dev
            for q in dev.live_queues():
                ring = q.ring
                while ring.has_work() and not q.broken and not dev.broken:
                    ring.disable_notify()
                    dev.service(q)
                    if not ring.enable_notify():
                        break


class PciMachine:
    """Guest RAM, blk devices as PCI functions on one bus, the guest's view of them."""

    def __init__(self, devices: list[dict]) -> None:
        self.mm = mmap.mmap(-1, RAM_SIZE)
        self.hmem = GuestMemory(self.mm, RAM_BASE)
        self.ram = GuestRAM(self.mm, RAM_BASE)
        self.dma = DmaMemory(self.ram)
        self.board = Board()
        self.devs: list[BlkDevice] = []
        self.transports: list[PciTransport] = []
        for i, d in enumerate(devices):
            d = dict(d)
            legacy = d.pop("legacy", False)
            msix_vectors = d.pop("msix_vectors", None)
            kw = dict(name=f"vd{chr(97 + i)}", mem=self.hmem, backend=MemoryBackend(DISK_SIZE),
                      readonly=False, num_queues=1, queue_size=16, offer=0, withhold=0,
                      blk_size=512, serial=f"pci-{i}", dev_stats=None)
            kw.update(d)
            kw["queue_stats"] = [None] * kw["num_queues"]
            dev = BlkDevice(**kw)
            t = PciTransport(dev, self.board, legacy=legacy, msix_vectors=msix_vectors)
            for r in t.regions():
                (self.board.mmio if r.space == "mmio" else self.board.pio).add(r)
            self.devs.append(dev)
            self.transports.append(t)
        self.host = PciHost(self.board, self.transports)
        self.host.start()
        self.platform = Platform(self.host.guest_ch)
        self.irqc = IrqController()
        for t in self.transports:
            for space, addr, data, efd in t.ioeventfds():
                self.platform.bind_ioeventfd(addr, data, efd, space)
            for line, efd in t.irqfds():
                self.irqc.add_line(line, efd)
        self.irqc.start()
        self.bus = VirtioBus()
        self.bus.register_driver(BlkDriver(self.dma))
        self.vps: list[VirtioPciDevice] = []

    @property
    def dev(self) -> BlkDevice:
        return self.devs[0]

    @property
    def t(self) -> PciTransport:
        return self.transports[0]

    @property
    def vp(self) -> VirtioPciDevice:
        return self.vps[0]

    def blk(self, i: int = 0) -> VirtioBlk:
        return self.vps[i].vdev.priv

    def boot(self) -> list[int]:
        """Enumerate the bus, probe every virtio function, register it on the virtio bus."""
        errs = []
        for pdev in scan_bus(self.platform, PCI_ECAM_BASE):
            if pdev.vendor != P.PCI_VENDOR_ID_REDHAT_QUMRANET:
                continue
            vp = virtio_pci_probe(self.platform, self.irqc, self.dma, pdev,
                                  f"vd{chr(96 + pdev.slot)}", None, lambda i: None)
            self.vps.append(vp)
            errs.append(self.bus.register_device(vp.vdev))
        return errs

    def host_status(self, i: int = 0) -> int:
        return self.host.call(lambda: self.devs[i].status)

    def close(self) -> None:
        try:
            for vp in self.vps:
                if vp.vdev.driver is not None:
                    self.bus.unregister_device(vp.vdev)
        finally:
            self.irqc.stop()
            self.host.stop()
            for dev, t in zip(self.devs, self.transports, strict=True):
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

    def _make(*devices: dict) -> PciMachine:
        m = PciMachine(list(devices) or [{}])
        made.append(m)
        return m

    yield _make
    for m in made:
        m.close()


def roundtrip(m: PciMachine, i: int = 0, rounds: int = 10, qid: int = 0) -> None:
    blk = m.blk(i)
    gpa, view = m.dma.alloc(4096, 4096)
    for k in range(rounds):
        data = bytes((k * 7 + j) & 0xFF for j in range(4096))
        view[:] = data
        done, got = threading.Event(), []

        def cb(status: int, _arg, got=got, done=done) -> None:
            got.append(status)
            done.set()
        assert blk.write(k * 8, [(gpa, 4096)], cb, None, qid=qid) == 0
        assert done.wait(5) and got == [B.VIRTIO_BLK_S_OK]
        view[:] = bytes(4096)
        assert blk.sync(B.VIRTIO_BLK_T_IN, k * 8, [(gpa, 4096)]) == B.VIRTIO_BLK_S_OK
        assert bytes(view) == data
    view.release()
    m.dma.free(gpa)


def resize_reaches_driver(m: PciMachine) -> None:
    blk = m.blk()
    changed = threading.Event()
    blk.capacity_listeners.append(lambda cap: changed.set())
    m.host.call(m.dev.resize, DISK_SIZE // 4)
    assert changed.wait(5), "no config-change interrupt reached the driver"
    assert blk.capacity == DISK_SIZE // 4 // 512
    assert m.vp.config_interrupts == 1 and m.vp.vdev.n_config_changed == 1


def test_guest_probes_modern_device_with_a_vector_per_queue(machine):
    m = machine({"num_queues": 2})
    assert m.boot() == [0]
    vp, vdev = m.vp, m.vp.vdev
    assert type(vp).__name__ == "VirtioPciModern" and vp.bus_name(vdev) == "0000:00:01.0"
    assert vdev.id == (2, 0x1AF4) and vdev.driver is not None
    assert m.host_status() == ACK | DRV | FOK | DOK
    assert vdev.features == BLK_MQ
    assert vp.irq_mode == "msix-per-queue" and vp.msix_enabled and vp.per_vq_vectors
    assert {i: info.msix_vector for i, info in vp.vqs.items()} == {0: 1, 1: 2}
    assert m.host.call(lambda: (m.t.config_vector, list(m.t.queue_vectors))) == (0, [1, 2])
    assert vp.pdev.msix_enabled and m.t.msix_enabled and m.t.fn.bus_master
    roundtrip(m, qid=0)
    roundtrip(m, qid=1)
    fired_ = m.host.call(lambda: list(m.t.msix.fired))
    assert fired_[0] == 0 and fired_[1] > 0 and fired_[2] > 0
    assert m.t.n_isr_reads == 0 and vp.isr_reads == 0         # MSI-X: no register read
    resize_reaches_driver(m)
    assert m.host.call(lambda: m.t.msix.fired[0]) == 1
    # the other config ops: affinity hints of the queues' own vectors, no shared memory
    assert vp.get_vq_affinity(vdev, 1) == {0}
    assert vp.set_vq_affinity(vdev.vqs[1], {1}) == 0 and vp.get_vq_affinity(vdev, 1) == {1}
    assert vp.get_shm_region(vdev, 0) is None
    assert m.dev.guest_errors == []


def test_guest_falls_back_to_a_shared_vector(machine):
    m = machine({"num_queues": 2, "msix_vectors": 2})
    assert m.boot() == [0]
    vp = m.vp
    assert vp.irq_mode == "msix-shared" and not vp.per_vq_vectors
    assert m.host.call(lambda: (m.t.config_vector, list(m.t.queue_vectors))) == (0, [1, 1])
    roundtrip(m, qid=0)
    roundtrip(m, qid=1)
    assert m.host.call(lambda: m.t.msix.fired[1]) > 0 and m.t.n_isr_reads == 0
    assert vp.get_vq_affinity(vp.vdev, 0) is None      # no vector of its own
    resize_reaches_driver(m)
    assert m.dev.guest_errors == []


@pytest.mark.parametrize("vectors", [0, 1])
def test_guest_falls_back_to_intx(machine, vectors):
    """No MSI-X (0), or a table of one vector, too small even for a shared vector: INTx."""
    m = machine({"num_queues": 2, "msix_vectors": vectors})
    assert m.boot() == [0]
    vp = m.vp
    assert vp.irq_mode == "intx" and vp.intx_enabled and not vp.msix_enabled
    assert not m.t.msix_enabled
    assert not m.t.fn.intx_disabled                # INTx back on after a failed MSI-X try
    roundtrip(m, qid=0)
    roundtrip(m, qid=1)
    assert m.t.n_intx > 0 and m.t.n_isr_reads > 0 and vp.isr_reads > 0
    resize_reaches_driver(m)
    if vectors == 0:
        assert m.dev.guest_errors == []


def test_guest_drives_a_legacy_device(machine):
    m = machine({"legacy": True, "num_queues": 2})
    assert m.boot() == [0]
    vp, vdev = m.vp, m.vp.vdev
    assert type(vp).__name__ == "VirtioPciLegacy" and vdev.id == (2, 0x1AF4)
    assert not vdev.has_feature(F.VIRTIO_F_VERSION_1) and vdev.features >> 32 == 0
    assert m.host_status() == ACK | DRV | DOK       # no FEATURES_OK on a legacy device
    assert vp.irq_mode == "msix-per-queue"
    q = m.dev.queues[0]
    assert q.desc % 4096 == 0 and q.device - q.desc == R.used_offset_in_vring(16, 4096)
    roundtrip(m, qid=0)
    roundtrip(m, qid=1)
    resize_reaches_driver(m)
    assert m.dev.guest_errors == []


def test_guest_drives_a_legacy_device_on_intx(machine):
    m = machine({"legacy": True, "msix_vectors": 0})
    assert m.boot() == [0]
    assert m.vp.irq_mode == "intx"
    assert m.blk().capacity == DISK_SIZE // 512     # config at offset 20 without MSI-X
    roundtrip(m)
    resize_reaches_driver(m)
    assert m.t.n_isr_reads > 0 and m.dev.guest_errors == []


def test_two_functions_and_the_host_bridge_on_one_bus(machine):
    m = machine({}, {"legacy": True})
    assert m.boot() == [0, 0]
    assert [vp.pdev.slot for vp in m.vps] == [1, 2]
    assert [type(vp).__name__ for vp in m.vps] == ["VirtioPciModern", "VirtioPciLegacy"]
    pdevs = scan_bus(m.platform, PCI_ECAM_BASE)
    assert [(p.slot, p.vendor, p.device) for p in pdevs] == [
        (0, P.PCI_VENDOR_ID_REDHAT, P.PCI_DEVICE_ID_REDHAT_HOST_BRIDGE), (1, 0x1AF4, 0x1042),
        (2, 0x1AF4, 0x1001)]
    modern = pdevs[1]
    assert [(b.index, b.kind, b.size, b.is64) for b in modern.bars if b] == [
        (1, "mem", 0x1000, False), (4, "mem", 0x4000, True)]
    assert modern.bars[4].start == m.transports[0].mem_base and modern.bars[4].prefetch
    assert [(b.index, b.kind) for b in pdevs[2].bars if b] == [(0, "io"), (1, "mem")]
    roundtrip(m, 0)
    roundtrip(m, 1)


def test_force_legacy_is_refused_by_a_modern_only_device(machine):
    m = machine()
    pdev = next(p for p in scan_bus(m.platform, PCI_ECAM_BASE) if p.slot == 1)
    vp = virtio_pci_probe(m.platform, m.irqc, m.dma, pdev, "vda", None, lambda i: None,
                          force_legacy=True)
    assert type(vp).__name__ == "VirtioPciModern"   # the legacy probe said ENODEV
    host = next(p for p in scan_bus(m.platform, PCI_ECAM_BASE) if p.slot == 0)
    with pytest.raises(PciProbeError) as e:
        virtio_pci_probe(m.platform, m.irqc, m.dma, host, "bridge", None, lambda i: None)
    assert e.value.errno == errno.ENODEV


def test_packed_ring_over_pci(machine):
    m = machine({"packed": True, "queue_size": 24})
    assert m.boot() == [0]
    assert m.vp.vdev.has_feature(F.VIRTIO_F_RING_PACKED)
    assert m.vp.vdev.vqs[0].ring == "packed" and m.vp.vdev.vqs[0].num == 24
    roundtrip(m, rounds=30)


def test_notification_data_traps_on_pci(machine):
    m = machine({"offer": F.bit(F.VIRTIO_F_NOTIFICATION_DATA)})
    assert m.boot() == [0]
    assert m.vp.vdev.has_feature(F.VIRTIO_F_NOTIFICATION_DATA)
    roundtrip(m, rounds=10)
    assert m.t.n_trapped_notifies > 0
    assert m.host.call(lambda: m.dev.queues[0].ring.n_notify_data_errors) == 0
    assert m.dev.guest_errors == []


def test_per_queue_reset_and_resize_over_pci(machine):
    m = machine({"num_queues": 2, "queue_size": 32})
    assert m.boot() == [0]
    vq = m.vp.vdev.vqs[0]
    assert vq.num == 32
    assert virtqueue_reset(vq, lambda v, b: None) == 0
    assert m.host.call(lambda: m.t.queue_vectors[0]) == 1   # the vector came back with it
    roundtrip(m, rounds=3)
    assert virtqueue_resize(vq, 8, lambda v, b: None) == 0
    assert vq.num == 8 and m.host.call(lambda: m.dev.queues[0].num) == 8
    roundtrip(m, rounds=20)
    roundtrip(m, rounds=3, qid=1)                  # the other queue never noticed
    assert m.dev.guest_errors == []


def test_ring_reset_unavailable_on_legacy(machine):
    m = machine({"legacy": True})
    assert m.boot() == [0]
    assert virtqueue_reset(m.vp.vdev.vqs[0], lambda v, b: None) == -errno.ENOENT


def test_removal_resets_and_releases_the_interrupts(machine):
    m = machine({"num_queues": 2})
    assert m.boot() == [0]
    vp = m.vp
    lines = list(vp._irqs)
    assert len(lines) == 3
    m.bus.unregister_device(vp.vdev)
    assert m.host_status() in (0, ACK)
    assert not vp.msix_enabled and not vp.pdev.msix_enabled and vp._irqs == []
    assert m.host.call(lambda: (m.t.msix_enabled, m.t.config_vector,
                                list(m.t.queue_vectors))) == (False, NO_VECTOR,
                                                              [NO_VECTOR] * 2)
    assert m.host.call(lambda: [m.t.msix.entry_masked(v) for v in range(3)]) == [True] * 3
    assert vp.vdev.vqs == [] and vp.vqs == {}
    assert m.dev.guest_errors == []


def _isr_settled(m: PciMachine, interrupts_before: int, isr_before: int) -> bool:
    return (m.host.call(lambda: m.t.n_isr_reads) == m.vp.isr_reads
            and m.vp.interrupts - interrupts_before == m.vp.isr_reads - isr_before)


def test_exits_cost_per_interrupt_mode(machine):
    """MSI-X interrupts cost no exit; INTx costs an ISR read per interrupt."""
    costs = {}
    for mode, kw in (("msix", {}), ("intx", {"msix_vectors": 0})):
        m = machine(kw)
        assert m.boot() == [0]
        before = m.host.call(lambda m=m: dict(m.t.exits))
        interrupts_before, isr_before = m.vp.interrupts, m.vp.isr_reads
        roundtrip(m, rounds=20)
        if mode == "intx":
            # a late (spurious) interrupt may still be between its handler's start and its
            # ISR read
            wait_for(partial(_isr_settled, m, interrupts_before, isr_before))
        after = m.host.call(lambda m=m: dict(m.t.exits))
        costs[mode] = {k: after.get(k, 0) - before.get(k, 0) for k in after}
        costs[mode]["interrupts"] = m.vp.interrupts - interrupts_before
    assert sum(v for k, v in costs["msix"].items() if k != "interrupts") == 0
    assert costs["msix"]["interrupts"] > 0
    assert costs["intx"]["isr_read"] == costs["intx"]["interrupts"] > 0


# ---- 4. real runs --------------------------------------------------------------------------------
@pytest.mark.multiprocess
@pytest.mark.timeout(90)
@pytest.mark.parametrize("config, transport, irq_mode", [
    ("blk-pci.yaml", "pci", "msix-per-queue"),
    ("blk-pci-legacy.yaml", "pci-legacy", "intx"),
])
def test_shipped_pci_configs_run(tmp_path, config, transport, irq_mode):
    from test_run import load_json, one_device, run_vmsim
    js = tmp_path / "summary.json"
    rc, launch = run_vmsim(tmp_path, "run", str(ROOT / "configs" / config), "--duration", "2",
                           "--json", str(js), "-q")
    assert rc == 0, launch.output()
    s = load_json(js)
    assert s["outcome"] == "ok" and s["problems"] == []
    assert s["totals"]["workload_errors"] == 0 and s["totals"]["device_errors"] == 0
    assert s["workloads"]["vm0.verify"]["ops"] > 0
    d = one_device(s)
    assert d["transport"] == transport and d["irq_mode"] == irq_mode
    assert d["driver"] == "virtio_blk" and d["guest_errors"] == []
    assert "DRIVER_OK" in d["status"]
    kinds = d["exits"]["by_kind"]
    assert kinds["pci_cfg_read"] > 0
    info = d["transport_info"]
    assert info["vendor_id"] == 0x1AF4 and info["slot"] == 1
    if transport == "pci":
        assert "VERSION_1" in d["features"] and "FEATURES_OK" in d["status"]
        assert "isr_read" not in kinds and info["interrupts"]["msix"] > 0
        assert info["device_id"] == 0x1042
    else:
        assert "VERSION_1" not in d["features"] and "FEATURES_OK" not in d["status"]
        assert kinds["isr_read"] == info["interrupts"]["isr_reads"] > 0
        assert info["device_id"] == 0x1001


@pytest.mark.multiprocess
@pytest.mark.timeout(90)
@pytest.mark.parametrize("transport, extra, irq_mode", [
    ("pci", {"num_queues": 2, "msix_vectors": 2}, "msix-shared"),
    ("pci", {"msix_vectors": 0}, "intx"),
    ("pci-legacy", {"num_queues": 2}, "msix-per-queue"),
])
def test_forced_interrupt_fallbacks_run(tmp_path, transport, extra, irq_mode):
    import yaml
    from test_run import load_json, one_device, run_vmsim
    topo = tmp_path / "topo.yaml"
    topo.write_text(yaml.safe_dump({"name": "pci-fallback", "vms": {"vm0": {
        "memory": "32M",
        "devices": {"vda": {"type": "blk", "transport": transport, "backend": "memory",
                            "size": "8M", **extra}},
        "workloads": {"verify": {"type": "blk-verify", "device": "vda", "in_flight": 8}}}}}))
    js = tmp_path / "summary.json"
    rc, launch = run_vmsim(tmp_path, "run", str(topo), "--duration", "2", "--json", str(js))
    assert rc == 0, launch.output()
    s = load_json(js)
    d = one_device(s)
    assert s["outcome"] == "ok" and s["totals"]["workload_errors"] == 0
    assert d["transport"] == transport and d["irq_mode"] == irq_mode
    assert d["guest_errors"] == [] and s["workloads"]["vm0.verify"]["ops"] > 0
    assert f"interrupts: {irq_mode}" in launch.out
