"""vmsim backend with VIRTIO_F_IOMMU_PLATFORM: a Python frontend (tests/test_vhost_user.py's)
whose guest rings and buffers are mapped through an IOMMU, so every address the backend sees -
ring addresses in SET_VRING_ADDR and descriptor addresses - is an IOVA translated through the
IOTLB the frontend fills with VHOST_USER_IOTLB_MSG (vhost-user.rst "IOMMU support").

- Updates sent up front, or only when the backend asks (IOTLB misses on the backend channel,
  the frontend answering with UPDATE): block reads and writes checked against the image.
- Invalidations: a buffer's translation is dropped and asked again.
- A guest that puts an unmapped IOVA in a descriptor: the miss goes unanswered and the ring
  stops with a line that says so; a device write into a read-only mapping: ACCESS_FAIL on the
  backend channel and the ring stops; the backend serves the next session.
- IOTLB messages the backend cannot take get a non-zero reply and a line; IOMMU_PLATFORM
  without REPLY_ACK and BACKEND_REQ ends the session.
- A real Linux guest under QEMU with an emulated Intel IOMMU, its vhost-user-blk device
  behind it (iommu_platform=on, ATS): QEMU answers the backend's misses.
"""

import hashlib
import os
import random
import re
import select
import socket
import time

import pytest
import qemu_guest as qg
from test_vhost_user import IMAGE_SIZE, INIT, Backend, Frontend

from vmsim.abi import blk as B
from vmsim.abi import features as F
from vmsim.guest.memory import DMA_FROM_DEVICE, DMA_TO_DEVICE, IOVA_BASE, DeviceDma
from vmsim.guest.virtio.vring import vring_create_virtqueue
from vmsim.host.iommu import Iotlb
from vmsim.vhost import protocol as P
from vmsim.vhost.protocol import ProtocolFeature, Req, pbit
from vmsim.vhost.wire import recv_message, send_message

pytestmark = [pytest.mark.multiprocess, pytest.mark.timeout(60)]

IOMMU = F.bit(F.VIRTIO_F_ACCESS_PLATFORM)
WANT = (F.bit(F.VIRTIO_F_VERSION_1) | F.bit(F.VIRTIO_RING_F_EVENT_IDX)
        | F.bit(F.VIRTIO_RING_F_INDIRECT_DESC) | F.bit(B.VIRTIO_BLK_F_FLUSH) | IOMMU)
BACKEND_REQ = pbit(ProtocolFeature.BACKEND_REQ)


@pytest.fixture
def image(tmp_path):
    p = tmp_path / "disk.img"
    p.write_bytes(random.Random(9).randbytes(IMAGE_SIZE))
    return p


@pytest.fixture
def blk_backend(tmp_path, image):
    """`vmsim backend blk` on the image, stopped whatever the test did (a test stops it
    itself to check its exit status; stopping twice is harmless)."""
    be = Backend(tmp_path, "blk", "--image", str(image))
    try:
        yield be
    finally:
        be.stop()


class FrontendIommu:
    """The frontend's vIOMMU as the guest's DMA API programs it (vmsim.guest.memory.IommuOps):
    its mappings (IOVA -> guest-physical), each change forwarded to the backend as an
    IOTLB_MSG - UPDATEs at once when `eager`, else only when the backend misses;
    INVALIDATEs always."""

    def __init__(self, fe: Frontend, eager: bool) -> None:
        self.fe, self.eager = fe, eager
        self.table = Iotlb()
        self.updates = 0
        self.replies: list[int] = []

    def send(self, iova: int, size: int, gpa: int, perm: int, typ: int) -> int:
        ack = self.fe.call(Req.IOTLB_MSG, P.encode_iotlb(iova, size, self.fe.uva(gpa) if gpa
                                                         else 0, perm, typ), need_reply=True)
        self.replies.append(P.decode_u64(ack))
        return self.replies[-1]

    def map(self, domain: int, iova: int, gpa: int, size: int, perm: int) -> int:
        self.table.insert(iova, size, gpa, perm)
        if self.eager:
            self.updates += 1
            assert self.send(iova, size, gpa, perm, P.VHOST_IOTLB_UPDATE) == 0
        return 0

    def unmap(self, domain: int, iova: int, size: int) -> int:
        self.table.remove(iova, size)
        assert self.send(iova, size, 0, 0, P.VHOST_IOTLB_INVALIDATE) == 0
        return 0

    def unmap_many(self, domain: int, ranges: list[tuple[int, int]]) -> list[int]:
        return [self.unmap(domain, iova, size) for iova, size in ranges]

    def answer(self, msg_payload: bytes) -> bool:
        """A MISS from the backend: the UPDATE for the mapping holding its IOVA (nothing for
        an IOVA the guest did not map, as QEMU does)."""
        iova, _size, _uaddr, perm, typ = P.decode_iotlb(msg_payload)
        assert typ == P.VHOST_IOTLB_MISS, P.IOTLB_TYPE_NAMES.get(typ, typ)
        hit = self.table.lookup(iova)
        if hit is None or hit[3] & perm != perm:
            return False
        self.updates += 1
        s, n, gpa, pm = hit
        assert self.send(s, n, gpa, pm, P.VHOST_IOTLB_UPDATE) == 0
        return True


class IommuSession:
    """A frontend session with IOMMU_PLATFORM: backend channel, one blk ring over IOVAs."""

    def __init__(self, path: str, *, packed: bool = False, eager: bool = True,
                 lazy_guest: bool = False) -> None:
        fe = self.fe = Frontend(path)
        offered = fe.negotiate(WANT | (F.bit(F.VIRTIO_F_RING_PACKED) if packed else 0),
                               extra_pf=BACKEND_REQ)
        assert offered & IOMMU and fe.features & IOMMU
        self.chan, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        fe.call(Req.SET_BACKEND_REQ_FD, fds=[theirs.fileno()], need_reply=True)
        theirs.close()
        fe.set_mem_table()
        self.iommu = FrontendIommu(fe, eager)
        self.dma = DeviceDma(fe.dma, self.iommu, 0, strict=not lazy_guest)
        self.dma.set_translated(True)
        self.kick = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.call = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.err = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)

        def notify(_vq) -> bool:
            os.eventfd_write(self.kick, 1)
            return True
        vq = self.vq = vring_create_virtqueue(0, 64, 4096, self.dma, fe.features & ~F.bit(30),
                                              notify, None, "vq0")
        assert vq.dma_api and vq.desc_addr >= IOVA_BASE
        fe.call(Req.SET_VRING_NUM, P.encode_state(0, vq.num))
        fe.call(Req.SET_VRING_BASE, P.encode_state(0, (1 << 15 | 1 << 31) if packed else 0))
        # With IOMMU_PLATFORM the ring addresses are IOVAs, not user addresses.
        fe.call(Req.SET_VRING_ADDR, P.encode_addr(0, 0, vq.desc_addr, vq.used_addr,
                                                  vq.avail_addr))
        fe.call(Req.SET_VRING_ERR, P.encode_u64(0), fds=[self.err])
        fe.call(Req.SET_VRING_CALL, P.encode_u64(0), fds=[self.call])
        fe.call(Req.SET_VRING_KICK, P.encode_u64(0), fds=[self.kick])
        fe.call(Req.SET_VRING_ENABLE, P.encode_state(0, 1))
        self.misses: list[tuple[int, int, int]] = []     # (iova, perm, type) the backend sent
        self.bufs = [(fe.dma.alloc(16)[0], fe.dma.alloc(64 << 10, 4096)[0], fe.dma.alloc(1)[0])
                     for _ in range(8)]

    def pump(self, n: int, timeout: float = 5.0, answer: bool = True) -> list:
        """Wait for n used buffers, answering the backend's misses meanwhile."""
        got: list = []
        deadline = time.monotonic() + timeout
        while len(got) < n:
            while (b := self.vq.get_buf()) is not None:
                got.append(b)
            if len(got) >= n:
                break
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"{len(got)} of {n} used; misses {self.misses}")
            if not self.vq.enable_cb():
                continue
            r, _, _ = select.select([self.call, self.chan], [], [], min(left, 0.05))
            if self.call in r:
                os.eventfd_read(self.call)
            if self.chan in r:
                self.backend_message(answer)
        return got

    def backend_message(self, answer: bool = True) -> tuple[int, int, int]:
        m = recv_message(self.chan)
        assert m.request == P.BackendReq.IOTLB_MSG, m
        iova, _, _, perm, typ = P.decode_iotlb(m.payload)
        self.misses.append((iova, perm, typ))
        if answer and typ == P.VHOST_IOTLB_MISS:
            self.iommu.answer(m.payload)
        return iova, perm, typ

    # block requests: header, data, status in the guest's RAM (guest-physical; the ring maps)
    def submit(self, slot: int, typ: int, sector: int, data: bytes | int) -> None:
        hdr, buf, st = self.bufs[slot]
        ram = self.fe.ram
        ram.view(hdr, 16)[:] = B.OUTHDR.pack(typ, 0, sector)
        ram.view(st, 1)[0] = 0xFF
        if typ == B.VIRTIO_BLK_T_OUT:
            ram.view(buf, len(data))[:] = data
            assert self.vq.add_sgs([(hdr, 16), (buf, len(data))], [(st, 1)], slot) == 0
        else:
            assert self.vq.add_sgs([(hdr, 16)], [(buf, data), (st, 1)], slot) == 0

    def status(self, slot: int) -> int:
        return self.fe.ram.view(self.bufs[slot][2], 1)[0]

    def data(self, slot: int, n: int) -> bytes:
        return bytes(self.fe.ram.view(self.bufs[slot][1], n))

    def close(self) -> None:
        self.vq.release()
        self.fe.close()
        self.chan.close()
        for fd in (self.kick, self.call, self.err):
            os.close(fd)


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("eager", [True, False])
def test_blk_over_iovas(blk_backend, image, packed, eager):
    be = blk_backend
    s = IommuSession(be.sock, packed=packed, eager=eager)
    try:
        want = image.read_bytes()
        for k in range(8):          # reads, each checked against the image
            s.submit(k, B.VIRTIO_BLK_T_IN, 16 * k, 8192)
        s.vq.kick()
        assert sorted(t for t, _ in s.pump(8)) == list(range(8))
        for k in range(8):
            assert s.status(k) == B.VIRTIO_BLK_S_OK
            assert s.data(k, 8192) == want[8192 * k:8192 * (k + 1)]
        new = random.Random(3).randbytes(4096)
        s.submit(0, B.VIRTIO_BLK_T_OUT, 100, new)
        s.vq.kick()
        s.pump(1)
        assert s.status(0) == B.VIRTIO_BLK_S_OK
        s.submit(1, B.VIRTIO_BLK_T_IN, 100, 4096)
        s.vq.kick()
        s.pump(1)
        assert s.data(1, 4096) == new
        if eager:
            assert s.misses == []
        else:
            # the ring's areas first, then the buffers: every translation came by a miss
            kinds = {t for _, _, t in s.misses}
            assert kinds == {P.VHOST_IOTLB_MISS} and len(s.misses) >= 4
            assert s.misses[0][0] == s.vq.desc_addr or s.misses[0][0] in (
                s.vq.avail_addr, s.vq.used_addr)
        assert all(r == 0 for r in s.iommu.replies)
    finally:
        s.close()
    assert be.stop() == 0
    assert image.read_bytes()[100 * 512:100 * 512 + 4096] == new
    assert "no longer served" not in be.log()


def test_invalidated_translations_are_asked_again(blk_backend, image):
    """A lazy guest (mappings reused until flushed) and a frontend that answers misses: after
    the guest's flush invalidates the buffers, the backend misses on them again."""
    be = blk_backend
    s = IommuSession(be.sock, eager=False, lazy_guest=True)
    try:
        s.submit(0, B.VIRTIO_BLK_T_IN, 0, 4096)
        s.vq.kick()
        s.pump(1)
        before = len(s.misses)
        s.submit(0, B.VIRTIO_BLK_T_IN, 0, 4096)     # the same buffers: mappings revived
        s.vq.kick()
        s.pump(1)
        assert len(s.misses) == before and s.dma.n_revived >= 3
        assert s.dma.flush(-1) >= 3                   # INVALIDATEs reach the backend
        s.submit(0, B.VIRTIO_BLK_T_IN, 8, 4096)
        s.vq.kick()
        s.pump(1)
        assert len(s.misses) >= before + 3            # asked again: new IOVAs
        assert s.data(0, 4096) == image.read_bytes()[4096:8192]
    finally:
        s.close()
    assert be.stop() == 0


def test_unmapped_iova_in_a_descriptor_stops_the_ring(blk_backend, image):
    be = blk_backend
    s = IommuSession(be.sock, eager=True)
    try:
        vq = s.vq
        assert vq.set_dma_premapped() == 0          # the driver hands device addresses
        hdr, _buf, st = s.bufs[0]
        s.fe.ram.view(hdr, 16)[:] = B.OUTHDR.pack(B.VIRTIO_BLK_T_IN, 0, 0)
        h = vq.dma_map_single_attrs(hdr, 16, DMA_TO_DEVICE)
        t = vq.dma_map_single_attrs(st, 1, DMA_FROM_DEVICE)
        rogue = 0xDEAD_0000                           # never mapped by anyone
        assert vq.add_sgs([(h, 16)], [(rogue, 4096), (t, 1)], "rogue") == 0
        vq.kick()
        iova, perm, typ = s.backend_message(answer=False)   # the frontend cannot answer
        assert (iova, perm, typ) == (rogue, 2, P.VHOST_IOTLB_MISS)
        time.sleep(1.2)
        os.eventfd_write(s.kick, 1)                   # the next event finds it unanswered
        log = be.wait_log("not answered by the frontend")
        assert f"IOTLB miss for IOVA 0x{rogue:x} (write)" in log
        r, _, _ = select.select([s.err], [], [], 5)
        assert r, "the ring's error fd was not signalled"
    finally:
        s.close()
    # the backend lives on: a new session works
    s2 = IommuSession(be.sock, eager=True)
    try:
        s2.submit(0, B.VIRTIO_BLK_T_IN, 0, 512)
        s2.vq.kick()
        s2.pump(1)
        assert s2.status(0) == B.VIRTIO_BLK_S_OK
    finally:
        s2.close()
    assert be.stop() == 0


def test_device_write_into_a_read_only_mapping(blk_backend, image):
    be = blk_backend
    s = IommuSession(be.sock, eager=True)
    try:
        vq = s.vq
        assert vq.set_dma_premapped() == 0
        hdr, buf, st = s.bufs[0]
        s.fe.ram.view(hdr, 16)[:] = B.OUTHDR.pack(B.VIRTIO_BLK_T_IN, 0, 0)
        h = vq.dma_map_single_attrs(hdr, 16, DMA_TO_DEVICE)
        d = vq.dma_map_single_attrs(buf, 4096, DMA_TO_DEVICE)   # read-only for the device
        t = vq.dma_map_single_attrs(st, 1, DMA_FROM_DEVICE)
        s.fe.ram.view(buf, 4096)[:] = b"\x5a" * 4096
        assert vq.add_sgs([(h, 16)], [(d, 4096), (t, 1)], "ro") == 0   # ... yet writable
        vq.kick()
        iova, perm, typ = s.backend_message()
        assert (iova, perm, typ) == (d, 2, P.VHOST_IOTLB_ACCESS_FAIL)
        log = be.wait_log("no longer served")
        assert "mapped without write" in log
        assert bytes(s.fe.ram.view(buf, 4096)) == b"\x5a" * 4096    # nothing written
    finally:
        s.close()
    assert be.stop() == 0


def test_iotlb_messages_the_backend_refuses(blk_backend, image):
    be = blk_backend
    s = IommuSession(be.sock, eager=True)
    try:
        fe = s.fe

        def msg(iova: int, size: int, uaddr: int, perm: int, typ: int) -> int:
            return P.decode_u64(fe.call(Req.IOTLB_MSG, P.encode_iotlb(iova, size, uaddr, perm,
                                                                      typ), need_reply=True))
        outside = fe.uva(0x4000_0000) + fe.ram_size
        assert msg(0x1000, 0x1000, outside, 3, P.VHOST_IOTLB_UPDATE) != 0
        assert msg(0x1000, 0x1000, fe.uva(0x4000_0000) + fe.ram_size - 0x800, 3,
                   P.VHOST_IOTLB_UPDATE) != 0                 # runs past the region
        assert msg(0x1000, 0x1000, fe.uva(0x4000_0000), 7, P.VHOST_IOTLB_UPDATE) != 0
        assert msg(0x1000, 0, fe.uva(0x4000_0000), 3, P.VHOST_IOTLB_UPDATE) != 0
        assert msg(0x1000, 0x1000, 0, 3, P.VHOST_IOTLB_MISS) != 0
        assert msg(0, 0, 0, 0, P.VHOST_IOTLB_BATCH_BEGIN) == 0
        assert msg(0x1000, 0x1000, fe.uva(0x4000_0000), 3, P.VHOST_IOTLB_UPDATE) == 0
        assert msg(0, 0, 0, 0, P.VHOST_IOTLB_BATCH_END) == 0
        log = be.wait_log("permission 7")
        assert "is not within the memory regions" in log and "empty, or wraps" in log
        # the session goes on
        s.submit(0, B.VIRTIO_BLK_T_IN, 0, 512)
        s.vq.kick()
        s.pump(1)
    finally:
        s.close()
    # IOMMU_PLATFORM without BACKEND_REQ: refused, the session ends with a line
    fe = Frontend(be.sock)
    try:
        offered = P.decode_u64(fe.call(Req.GET_FEATURES))
        fe.call(Req.SET_PROTOCOL_FEATURES, P.encode_u64(pbit(ProtocolFeature.REPLY_ACK)))
        fe.pf = pbit(ProtocolFeature.REPLY_ACK)
        send_message(fe.sock, Req.SET_FEATURES, P.encode_u64(offered & (WANT | F.bit(30))))
        be.wait_log("without the protocol features it needs (REPLY_ACK and BACKEND_REQ)")
    finally:
        fe.close()
    assert be.stop() == 0


# ---- a real Linux guest behind QEMU's vIOMMU ----------------------------------------------------

@qg.needs_qemu(qg.BLK_MODULES)
@pytest.mark.timeout(180)
def test_qemu_linux_guest_behind_a_viommu(tmp_path, image):
    """Debian's kernel under QEMU TCG with an emulated Intel IOMMU (intel_iommu=on) and
    vhost-user-blk-pci with iommu_platform=on and ATS, on `vmsim backend blk`: the guest
    maps every ring and buffer through the vIOMMU, the backend sees IOVAs only and asks QEMU
    for each translation (IOTLB misses on the backend channel, UPDATEs back); the guest's
    device-IOTLB invalidations reach it as INVALIDATEs. The disk is read, written and read
    back, checked by md5 on both sides.

    The device sits behind a PCIe root port: there it is a PCIe device with an ATS
    capability, Linux enables ATS and sends device-IOTLB invalidations, which QEMU forwards
    (on the root bus it does not, and the backend keeps stale translations)."""
    orig = image.read_bytes()
    initrd = qg.initramfs(tmp_path, INIT, qg.BLK_MODULES)
    be = Backend(tmp_path, "blk", "--image", str(image), "--trace")
    console = tmp_path / "console.log"
    try:
        cmd = qg.qemu_command(initrd, console, [
            "-device", "intel-iommu,intremap=off,device-iotlb=on",
            "-chardev", f"socket,id=c,path={be.sock}",
            "-device", "pcie-root-port,id=rp1,bus=pcie.0,chassis=1",
            "-device", "vhost-user-blk-pci,bus=rp1,chardev=c,iommu_platform=on,ats=on,"
                       "disable-legacy=on"])
        k = cmd.index("-append")
        cmd[k + 1] += " intel_iommu=on"
        q = qg.run_qemu(cmd, timeout=150)
        out = console.read_text(errors="replace") if console.exists() else ""
        assert "VMSIM: done" in out, (q.stdout.decode(errors="replace"), out, be.log()[-3000:])
    finally:
        assert be.stop() == 0
    lines = qg.lines(out)
    feats = lines["features"].strip()
    assert feats[F.VIRTIO_F_ACCESS_PLATFORM] == "1"
    assert lines["before"].strip() == hashlib.md5(orig).hexdigest()
    assert lines["readback"].strip() == lines["rnd"].strip()
    disk = image.read_bytes()
    assert lines["after"].strip() == hashlib.md5(disk).hexdigest()
    assert hashlib.md5(disk[100 * 4096:164 * 4096]).hexdigest() == lines["rnd"].strip()
    log = be.log()
    assert "no longer served" not in log, log[-3000:]
    misses = log.count("-> IOTLB MISS")
    types = [bytes.fromhex(m)[25] for m in
             re.findall(r"<- IOTLB_MSG flags 0x9 ([0-9a-f]{52})", log)]
    assert misses > 10 and types.count(P.VHOST_IOTLB_UPDATE) >= misses // 2
    assert types.count(P.VHOST_IOTLB_INVALIDATE) > 0
