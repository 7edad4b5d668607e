"""A rogue driver for the host's device side, shared by tests/test_hostile_guest.py and
tests/test_fuzz_rings.py.

- `GuardedRam`: guest RAM with guard bytes on both sides. The device is handed only the
  middle (its GuestMemory is built over that slice), so anything the host wrote outside guest
  RAM - by any path other than the one bounds-checked translation in vmsim/host/memory.py -
  shows up as a changed guard byte.
- `Rig`: a real device (blk on a memory backend, net on a real switch, console) on a real
  virtio-mmio transport, brought up register by register as a guest's trapped accesses
  would, with queues placed wherever the test says (outside RAM, misaligned, any size).
- `SplitWriter` / `PackedWriter`: rings written by hand with struct, as a buggy or hostile
  driver could, with no driver code in between.

Nothing here stands in for device code: the device, its queues, its transport and its
request parsing are the production classes.
"""

import mmap
import struct
from collections.abc import Callable

from vmsim.abi import blk as B
from vmsim.abi import features as F
from vmsim.abi import iommu as I
from vmsim.abi import mmio as M
from vmsim.abi import net as N
from vmsim.abi import packed_ring as P
from vmsim.abi import status as S
from vmsim.host.devices.blk.backend import MemoryBackend
from vmsim.host.devices.blk.device import BlkDevice
from vmsim.host.devices.net.backend import SwitchBackend
from vmsim.host.devices.net.device import NetDevice
from vmsim.host.iommu import Iommu
from vmsim.host.iommu_device import IommuDevice
from vmsim.host.memory import GuestMemory, IotlbMemory
from vmsim.host.switch import Switch
from vmsim.host.virtio.device import VirtioDevice
from vmsim.host.virtio.errors import Reason
from vmsim.host.virtio.mmio import MmioTransport

BASE = 0x4000_0000
GUARD = 0x1000
GUARD_BYTE = 0xA5
MMIO_BASE = 0x0A00_0000
IRQ = 32

NEXT, WRITE, INDIRECT = 1, 2, 4
AVAIL, USED = P.F_AVAIL, P.F_USED
ACK, DRV, FOK, DOK = S.ACKNOWLEDGE, S.DRIVER, S.FEATURES_OK, S.DRIVER_OK
V1 = F.bit(F.VIRTIO_F_VERSION_1)
PACKED = F.bit(F.VIRTIO_F_RING_PACKED)
EVENT_IDX = F.bit(F.VIRTIO_RING_F_EVENT_IDX)
INDIRECT_DESC = F.bit(F.VIRTIO_RING_F_INDIRECT_DESC)
IN_ORDER = F.bit(F.VIRTIO_F_IN_ORDER)
INTERNAL = "internal device error"
REASONS = tuple(r.value for r in Reason)


class GuardedRam:
    """`size` bytes of guest RAM at guest-physical `base`, between two guard areas."""

    def __init__(self, size: int, base: int = BASE) -> None:
        self.size = size
        self.base = base
        self.end = base + size
        self.whole = mmap.mmap(-1, GUARD + size + GUARD)
        self.whole[:GUARD] = bytes([GUARD_BYTE]) * GUARD
        self.whole[GUARD + size:] = bytes([GUARD_BYTE]) * GUARD
        self.mv = memoryview(self.whole)[GUARD:GUARD + size]     # guest RAM, as bytes
        self.mem = GuestMemory(self.mv, base)                     # the host's view of it

    def off(self, gpa: int) -> int:
        return gpa - self.base

    def guards_intact(self) -> bool:
        g = bytes([GUARD_BYTE]) * GUARD
        return self.whole[:GUARD] == g and self.whole[GUARD + self.size:] == g

    def zero(self) -> None:
        self.mv[:] = bytes(self.size)

    def close(self) -> None:
        self.mem.release()
        self.mv.release()
        try:
            self.whole.close()
        except BufferError:     # a failed test's traceback still holds a view: the GC unmaps it
            pass


# ---- rings written by hand -----------------------------------------------------------------------
class SplitWriter:
    """A split ring at (desc, avail, used) in guest RAM, written by hand."""

    packed = False

    def __init__(self, ram: GuardedRam, num: int, desc: int, avail: int, used: int) -> None:
        self.ram, self.num = ram, num
        self.desc_addr, self.drv_addr, self.dev_addr = desc, avail, used
        self.idx = 0            # the driver's avail idx

    def desc(self, i: int, addr: int, ln: int, flags: int = 0, nxt: int = 0,
             table: int | None = None) -> None:
        at = self.ram.off(self.desc_addr if table is None else table) + 16 * i
        struct.pack_into("<QIHH", self.ram.mv, at, addr & (2**64 - 1), ln & 0xFFFFFFFF,
                         flags & 0xFFFF, nxt & 0xFFFF)

    def chain(self, segs: list[tuple[int, int, int]], head: int = 0) -> int:
        """Descriptors head, head+1, ... linked by NEXT (segs: addr, len, flags), published."""
        for k, (addr, ln, fl) in enumerate(segs):
            last = k == len(segs) - 1
            self.desc(head + k, addr, ln, fl | (0 if last else NEXT), head + k + 1)
        self.publish(head)
        return head

    def indirect(self, table: int, segs: list[tuple[int, int, int]], head: int = 0,
                 extra: int = 0) -> int:
        for k, (addr, ln, fl) in enumerate(segs):
            last = k == len(segs) - 1
            self.desc(k, addr, ln, fl | (0 if last else NEXT), k + 1, table=table)
        self.desc(head, table, 16 * len(segs), INDIRECT | extra)
        self.publish(head)
        return head

    def put_avail(self, slot: int, head: int) -> None:
        struct.pack_into("<H", self.ram.mv, self.ram.off(self.drv_addr) + 4 + 2 * (slot % self.num),
                         head & 0xFFFF)

    def set_avail_idx(self, v: int) -> None:
        struct.pack_into("<H", self.ram.mv, self.ram.off(self.drv_addr) + 2, v & 0xFFFF)

    def publish(self, *heads: int) -> None:
        for h in heads:
            self.put_avail(self.idx, h)
            self.idx = (self.idx + 1) & 0xFFFF
        self.set_avail_idx(self.idx)

    def used_idx(self) -> int:
        return struct.unpack_from("<H", self.ram.mv, self.ram.off(self.dev_addr) + 2)[0]

    def used_elem(self, i: int) -> tuple[int, int]:
        return struct.unpack_from("<II", self.ram.mv,
                                  self.ram.off(self.dev_addr) + 4 + 8 * (i % self.num))


class PackedWriter:
    """A packed ring at (desc, driver event, device event) in guest RAM, written by hand; the
    driver's position and wrap counter are kept here as a driver keeps them."""

    packed = True

    def __init__(self, ram: GuardedRam, num: int, desc: int, drv: int, dev: int) -> None:
        self.ram, self.num = ram, num
        self.desc_addr, self.drv_addr, self.dev_addr = desc, drv, dev
        self.pos, self.wrap = 0, 1

    def desc(self, i: int, addr: int, ln: int, bid: int = 0, flags: int = 0,
             table: int | None = None) -> None:
        at = self.ram.off(self.desc_addr if table is None else table) + 16 * i
        struct.pack_into("<QIHH", self.ram.mv, at, addr & (2**64 - 1), ln & 0xFFFFFFFF,
                         bid & 0xFFFF, flags & 0xFFFF)

    def set_flags(self, i: int, flags: int) -> None:
        struct.pack_into("<H", self.ram.mv, self.ram.off(self.desc_addr) + 16 * i + 14, flags)

    def chain(self, segs: list[tuple[int, int, int]], bid: int = 0, raw: bool = False,
              ids: list[int] | None = None) -> int:
        """Make a chain available at the driver's position (NEXT added unless raw; the
        AVAIL/USED bits of the lap; the head's flags written last)."""
        first, head_flags = self.pos, 0
        for k, (addr, ln, fl) in enumerate(segs):
            if not raw and k < len(segs) - 1:
                fl |= NEXT
            fl |= AVAIL if self.wrap else USED
            b = ids[k] if ids is not None else bid
            if k == 0:
                head_flags = fl
                self.desc(self.pos, addr, ln, b, 0)
            else:
                self.desc(self.pos, addr, ln, b, fl)
            self.pos += 1
            if self.pos == self.num:
                self.pos, self.wrap = 0, self.wrap ^ 1
        self.set_flags(first, head_flags)
        return first

    def indirect(self, table: int, segs: list[tuple[int, int, int]], bid: int = 0,
                 extra: int = 0) -> int:
        for k, (addr, ln, fl) in enumerate(segs):
            self.desc(k, addr, ln, 0, fl, table=table)
        return self.chain([(table, 16 * len(segs), INDIRECT | extra)], bid, raw=True)

    def used_desc(self, i: int) -> tuple[int, int, int, int]:
        return struct.unpack_from("<QIHH", self.ram.mv, self.ram.off(self.desc_addr) + 16 * i)


Writer = SplitWriter | PackedWriter


# ---- a device on a real virtio-mmio transport ---------------------------------------------------
def make_blk(mem: GuestMemory, *, queue_size: int = 8, packed: bool = False,
             readonly: bool = False, disk: int = 1 << 20, offer: int = 0,
             name: str = "vda") -> BlkDevice:
    return BlkDevice(name, mem, MemoryBackend(disk), readonly=readonly, num_queues=1,
                     queue_size=queue_size, offer=offer, withhold=0, packed=packed,
                     blk_size=512, serial="rogue", dev_stats=None, queue_stats=[None])


GUEST_MAC = bytes.fromhex("525400000001")


def make_net(mem: GuestMemory, *, queue_size: int = 8, packed: bool = False,
             switch: Switch | None = None, name: str = "eth0", withhold: int = 0) -> NetDevice:
    sw = switch if switch is not None else Switch("lan")
    return NetDevice(name, mem, SwitchBackend(sw, f"vm0.{name}"), mac=GUEST_MAC, max_pairs=1,
                     queue_size=queue_size, mtu=N.ETH_DATA_LEN, offer=0, withhold=withhold,
                     packed=packed, dev_stats=None, queue_stats=[None] * 3)


class Rig:
    """One device over guarded guest RAM on its virtio-mmio transport."""

    def __init__(self, make: Callable[[GuestMemory], VirtioDevice], ram: int = 0x10000,
                 guarded: GuardedRam | None = None, mmio_base: int = MMIO_BASE) -> None:
        self.own_ram = guarded is None
        self.ram = guarded if guarded is not None else GuardedRam(ram)
        self.dev = make(self.ram.mem)
        self.t = MmioTransport(self.dev, mmio_base, IRQ)

    # trapped register accesses
    def r(self, off: int) -> int:
        return self.t.read(off, 4)

    def w(self, off: int, value: int) -> None:
        self.t.write(off, 4, value)

    @property
    def status(self) -> int:
        return self.r(M.STATUS)

    def negotiate(self, features: int) -> int:
        """ACKNOWLEDGE, DRIVER, the features, FEATURES_OK; the status read back."""
        self.w(M.STATUS, ACK)
        self.w(M.STATUS, ACK | DRV)
        self.w(M.DRIVER_FEATURES_SEL, 1)
        self.w(M.DRIVER_FEATURES, features >> 32)
        self.w(M.DRIVER_FEATURES_SEL, 0)
        self.w(M.DRIVER_FEATURES, features & 0xFFFFFFFF)
        self.w(M.STATUS, ACK | DRV | FOK)
        return self.status

    def program_queue(self, index: int, num: int, desc: int, drv: int, dev: int) -> None:
        self.w(M.QUEUE_SEL, index)
        self.w(M.QUEUE_NUM, num)
        for lo, addr in ((M.QUEUE_DESC_LOW, desc), (M.QUEUE_DRIVER_LOW, drv),
                         (M.QUEUE_DEVICE_LOW, dev)):
            self.w(lo, addr & 0xFFFFFFFF)
            self.w(lo + 4, addr >> 32 & 0xFFFFFFFF)

    def ready(self, index: int) -> None:
        self.w(M.QUEUE_SEL, index)
        self.w(M.QUEUE_READY, 1)

    def driver_ok(self) -> None:
        self.w(M.STATUS, ACK | DRV | FOK | DOK)

    def bring_up(self, features: int, layouts: list[tuple[int, int, int, int]]) -> None:
        """Negotiate, place queue i at layouts[i] = (num, desc, driver, device), make each
        ready, DRIVER_OK; every step as a driver takes it."""
        assert self.negotiate(features) == ACK | DRV | FOK, self.dev.guest_errors
        for i, (num, desc, drv, dev) in enumerate(layouts):
            self.program_queue(i, num, desc, drv, dev)
            self.ready(i)
        self.driver_ok()

    def writer(self, index: int) -> Writer:
        q = self.dev.queues[index]
        cls = PackedWriter if self.dev.negotiated(F.VIRTIO_F_RING_PACKED) else SplitWriter
        return cls(self.ram, q.num, q.desc, q.driver, q.device)

    def kick(self, index: int) -> None:
        """The queue's ioeventfd, as the guest's QueueNotify write signals it."""
        self.dev.queues[index].kick.signal()

    def service(self, index: int) -> int:
        """What the host's loop does for a kicked queue: take the kick, serve if live."""
        dev = self.dev
        q = dev.queues[index]
        q.kick.consume()
        if q.ring is not None:
            q.ring.n_notifies += 1
            dev.kicked(q)
        if q in dev.live_queues() and dev.wants_service(q):
            return dev.service(q)
        return 0

    def interrupts(self) -> int:
        """InterruptStatus, acknowledged (as the guest's handler does)."""
        isr = self.r(M.INTERRUPT_STATUS)
        self.w(M.INTERRUPT_ACK, isr)
        return isr

    def assert_survived(self) -> None:
        """No host exception reached the device boundary; nothing outside guest RAM changed;
        every device error names one of the spec's reasons."""
        errs = self.dev.errors
        assert not any(INTERNAL in e for e in errs), errs
        assert all(any(r in e for r in REASONS) for e in errs), errs
        assert self.ram.guards_intact(), "the host wrote outside guest RAM"

    def close(self) -> None:
        self.dev.close()
        self.t.close()
        if self.own_ram:
            self.ram.close()


class IommuRig(Rig):
    """A Rig whose device sits behind the IOMMU (endpoint 1, domain 1): the device reaches
    guest RAM only through its endpoint's IOTLB, offers VIRTIO_F_ACCESS_PLATFORM, and the
    "guest" programs the IOMMU through its register window with virtio-iommu requests it
    writes into guest RAM at `req_at`, as vmsim's guest IOMMU driver does.

    Rings and buffers may be mapped at IOVA == guest-physical address (an IOVA allocation
    a guest is free to make), so the hand-written rings' writers work unchanged; an address
    inside RAM that was not mapped is then still refused by the device."""

    IOMMU_BASE = 0x0900_0000

    def __init__(self, make: Callable[[GuestMemory], VirtioDevice], req_at: int,
                 ram: int = 0x10000, guarded: GuardedRam | None = None) -> None:
        g = guarded if guarded is not None else GuardedRam(ram)
        self.iommu = Iommu(g.base, g.size)
        self.iommu.add_endpoint(1, "rogue")
        self.iommu_dev = IommuDevice(self.iommu, g.mem, self.IOMMU_BASE)
        self.region = self.iommu_dev.region()

        def fault(_e: Exception) -> None:
            self.iommu.faults += 1
        self.dev_mem = IotlbMemory(g.mem, lambda: self.iommu.iotlb(1), "rogue, endpoint 1",
                                   fault)
        super().__init__(lambda _m: make(self.dev_mem), guarded=g)
        self.own_ram = guarded is None
        self.dev.device_features |= F.bit(F.VIRTIO_F_ACCESS_PLATFORM)
        self.req_at = req_at
        self.region.write(I.REG_CMD_BASE_LO, 4, req_at & 0xFFFFFFFF)
        self.region.write(I.REG_CMD_BASE_HI, 4, req_at >> 32)
        assert self.iommu_request(I.T_ATTACH, I.ATTACH.pack(I.T_ATTACH, 1, 1, 0, 0)) == I.S_OK

    def iommu_request(self, kind: int, body: bytes) -> int:
        """One request through the register window; its status."""
        off = self.ram.off(self.req_at)
        self.ram.mv[off:off + len(body)] = body
        self.region.write(I.REG_CMD_SUBMIT, 4, 1)
        return self.ram.mv[off + I.TAIL_AT[kind]]

    def map(self, iova: int, gpa: int, size: int, flags: int) -> int:
        return self.iommu_request(I.T_MAP, I.MAP.pack(I.T_MAP, 1, iova, iova + size - 1, gpa,
                                                      flags, 0))

    def unmap(self, iova: int, size: int) -> int:
        return self.iommu_request(I.T_UNMAP, I.UNMAP.pack(I.T_UNMAP, 1, iova, iova + size - 1,
                                                          0))


# ---- well-formed requests, for controls --------------------------------------------------------
def blk_read(w: Writer, hdr: int, data: int, status: int, sector: int = 0, n: int = 512,
             head: int = 0) -> None:
    """A well-formed VIRTIO_BLK_T_IN: header at hdr, n bytes at data, the status byte."""
    struct.pack_into("<IIQ", w.ram.mv, w.ram.off(hdr), B.VIRTIO_BLK_T_IN, 0, sector)
    w.ram.mv[w.ram.off(status)] = 0xFF
    w.chain([(hdr, 16, 0), (data, n, WRITE), (status, 1, WRITE)], head)
