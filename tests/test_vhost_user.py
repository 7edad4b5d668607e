"""vhost-user: `vmsim backend` as a real process, driven by a minimal frontend written here
(vmsim's own driver-side virtqueues write the requests into a memfd shared over the socket),
and by QEMU booting a real Linux guest whose virtio-blk driver uses it (split and packed
rings).

The frontend below is small and honest: the messages QEMU sends for vhost-user-blk, in
QEMU's order, with the memory region's user address deliberately different from its guest
address so that the backend's translation of ring addresses is exercised.
"""

import hashlib
import os
import random
import re
import select
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import qemu_guest as qg

from vmsim.abi import blk as B
from vmsim.abi import features as F
from vmsim.guest.memory import DmaMemory, GuestRAM
from vmsim.guest.virtio.vring import vring_create_virtqueue
from vmsim.vhost import protocol as P
from vmsim.vhost.protocol import MemRegion, ProtocolFeature, Req, pbit
from vmsim.vhost.wire import PeerClosed, recv_message, send_message

pytestmark = pytest.mark.multiprocess

RAM_GPA = 0x4000_0000
UVA = 0x7F3A_0000_0000          # the frontend's "user address" of RAM: not its guest address
RAM_SIZE = 8 << 20
IMAGE_SIZE = 4 << 20


# ---- the backend process -----------------------------------------------------------------------
class Backend:
    """`python -m vmsim backend ...` in a subprocess, its stderr kept."""

    def __init__(self, tmp: Path, *args: str, stdin=subprocess.DEVNULL,
                 prefix: tuple[str, ...] = ()) -> None:
        """`prefix`: what runs it (`ip netns exec NS`, which execs it in the namespace)."""
        self.sock = str(tmp / "vhost.sock")
        self.errpath = tmp / "backend.err"
        self.err = open(self.errpath, "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [*prefix, sys.executable, "-m", "vmsim", "backend", *args, "--socket", self.sock],
            stdin=stdin, stdout=subprocess.DEVNULL, stderr=self.err)
        deadline = time.monotonic() + 15
        while not os.path.exists(self.sock):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"backend did not start: {self.log()}")
            time.sleep(0.02)

    def log(self) -> str:
        return self.errpath.read_text()

    def wait_log(self, text: str, timeout: float = 5.0) -> str:
        deadline = time.monotonic() + timeout
        while text not in self.log():
            if time.monotonic() > deadline:
                raise AssertionError(f"{text!r} not in backend log:\n{self.log()}")
            time.sleep(0.02)
        return self.log()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise
        finally:
            self.err.close()
        assert "Traceback" not in self.log(), self.log()
        return rc


@pytest.fixture
def image(tmp_path: Path) -> Path:
    p = tmp_path / "disk.img"
    p.write_bytes(random.Random(7).randbytes(IMAGE_SIZE))
    return p


# ---- the minimal frontend ----------------------------------------------------------------------
class Frontend:
    """A vhost-user frontend: guest RAM in a memfd, one region, rings built by vmsim's
    driver-side virtqueue code, kick and call eventfds."""

    def __init__(self, path: str, ram_size: int = RAM_SIZE) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.memfd = os.memfd_create("vmsim-test-ram", os.MFD_CLOEXEC)
        os.ftruncate(self.memfd, ram_size)
        import mmap
        self.mm = mmap.mmap(self.memfd, ram_size)
        self.ram = GuestRAM(self.mm, RAM_GPA)
        self.dma = DmaMemory(self.ram)
        self.ram_size = ram_size
        self.vqs: list = []
        self.kicks: list[int] = []
        self.calls: list[int] = []
        self.features = 0
        self.pf = 0

    # messages
    def call(self, req: Req, payload: bytes = b"", fds: list[int] | None = None,
             need_reply: bool = False) -> bytes | None:
        send_message(self.sock, req, payload, fds=fds, need_reply=need_reply)
        if req in P.HAS_REPLY or (need_reply and self.pf & pbit(ProtocolFeature.REPLY_ACK)):
            m = recv_message(self.sock)
            assert m.request == req and m.flags & P.FLAG_REPLY, m
            return m.payload
        return None

    def negotiate(self, want: int, extra_pf: int = 0) -> int:
        offered = P.decode_u64(self.call(Req.GET_FEATURES))
        assert offered & F.bit(P.VHOST_USER_F_PROTOCOL_FEATURES)
        pf = P.decode_u64(self.call(Req.GET_PROTOCOL_FEATURES))
        self.pf = pf & (pbit(ProtocolFeature.REPLY_ACK) | pbit(ProtocolFeature.CONFIG)
                        | pbit(ProtocolFeature.MQ) | extra_pf)
        self.call(Req.SET_PROTOCOL_FEATURES, P.encode_u64(self.pf))
        assert P.decode_u64(self.call(Req.GET_QUEUE_NUM)) >= 1
        self.call(Req.SET_OWNER)
        self.features = (offered & want) | F.bit(P.VHOST_USER_F_PROTOCOL_FEATURES)
        self.call(Req.SET_FEATURES, P.encode_u64(self.features), need_reply=True)
        return offered

    def config(self, size: int) -> bytes:
        _, n, _, data = P.decode_config(self.call(Req.GET_CONFIG, P.encode_config(
            0, 0, bytes(size))))
        assert n == size
        return data

    def set_mem_table(self) -> None:
        r = MemRegion(RAM_GPA, self.ram_size, UVA, 0)
        ack = self.call(Req.SET_MEM_TABLE, P.encode_mem_table([r]), fds=[self.memfd],
                        need_reply=True)
        assert ack is None or P.decode_u64(ack) == 0

    def uva(self, gpa: int) -> int:
        return gpa - RAM_GPA + UVA

    def setup_ring(self, index: int, num: int = 128, enable: bool = True) -> object:
        kick = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        call = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)

        def notify(vq) -> bool:
            os.eventfd_write(self.kicks[vq.index], 1)     # the ring's current kick fd
            return True
        vq = vring_create_virtqueue(index, num, 4096, self.dma, self.features & ~F.bit(30),
                                    notify, None, f"vq{index}")
        self.call(Req.SET_VRING_NUM, P.encode_state(index, vq.num))
        base = (1 << 15 | 1 << 31) if vq.ring == "packed" else 0
        self.call(Req.SET_VRING_BASE, P.encode_state(index, base))
        self.call(Req.SET_VRING_ADDR, P.encode_addr(index, 0, self.uva(vq.desc_addr),
                                                    self.uva(vq.used_addr),
                                                    self.uva(vq.avail_addr)))
        self.call(Req.SET_VRING_KICK, P.encode_u64(index), fds=[kick])
        self.call(Req.SET_VRING_CALL, P.encode_u64(index), fds=[call])
        if enable:
            self.call(Req.SET_VRING_ENABLE, P.encode_state(index, 1))
        self.vqs.append(vq)
        self.kicks.append(kick)
        self.calls.append(call)
        return vq

    def replace_call(self, index: int) -> None:
        old = self.calls[index]
        new = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.call(Req.SET_VRING_CALL, P.encode_u64(index), fds=[new])
        self.calls[index] = new
        os.close(old)

    def restart_ring(self, index: int) -> None:
        """Stop the ring (GET_VRING_BASE) and start it again where it stopped, with a new
        kick fd, as QEMU does around a device stop / start."""
        vq = self.vqs[index]
        base = self.get_vring_base(index)
        assert base == vq.ring_positions()[0] if vq.ring == "split" else True
        self.call(Req.SET_VRING_BASE, P.encode_state(index, base))
        self.call(Req.SET_VRING_ADDR, P.encode_addr(index, 0, self.uva(vq.desc_addr),
                                                    self.uva(vq.used_addr),
                                                    self.uva(vq.avail_addr)))
        kick = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.call(Req.SET_VRING_KICK, P.encode_u64(index), fds=[kick])
        os.close(self.kicks[index])
        self.kicks[index] = kick

    def wait_used(self, index: int, n: int, timeout: float = 5.0) -> list:
        """n used buffers of ring `index`, waiting on its call eventfd."""
        vq = self.vqs[index]
        got: list = []
        deadline = time.monotonic() + timeout
        while len(got) < n:
            while (b := vq.get_buf()) is not None:
                got.append(b)
            if len(got) >= n:
                break
            left = deadline - time.monotonic()
            assert left > 0, f"{len(got)} of {n} used on ring {index}"
            if not vq.enable_cb():      # re-arm the interrupt (used_event); more came
                continue
            r, _, _ = select.select([self.calls[index]], [], [], min(left, 0.05))
            if r:
                os.eventfd_read(self.calls[index])
        return got

    def get_vring_base(self, index: int) -> int:
        i, num = P.decode_state(self.call(Req.GET_VRING_BASE, P.encode_state(index, 0)))
        assert i == index
        return num

    def close(self) -> None:
        self.sock.close()
        for vq in self.vqs:
            vq.release()
        for fd in self.kicks + self.calls:
            os.close(fd)
        self.ram.release()
        try:
            self.mm.close()
        except BufferError:
            pass                # a test still holds a view: the mapping goes with it
        os.close(self.memfd)


class BlkDriver:
    """Block requests through a Frontend's ring 0 (header, data, status in guest RAM)."""

    def __init__(self, fe: Frontend, slots: int = 32, max_len: int = 64 << 10) -> None:
        self.fe = fe
        self.vq = fe.vqs[0]
        self.bufs = []
        for _ in range(slots):
            hdr, _ = fe.dma.alloc(16)
            data, _ = fe.dma.alloc(max_len, 4096)
            st, _ = fe.dma.alloc(1)
            self.bufs.append((hdr, data, st))

    def submit(self, slot: int, typ: int, sector: int, payload: bytes | int) -> None:
        hdr, data, st = self.bufs[slot]
        self.fe.ram.view(hdr, 16)[:] = B.OUTHDR.pack(typ, 0, sector)
        self.fe.ram.view(st, 1)[0] = 0xFF
        if typ == B.VIRTIO_BLK_T_OUT:
            self.fe.ram.view(data, len(payload))[:] = payload
            self.vq.add_sgs([(hdr, 16), (data, len(payload))], [(st, 1)], slot)
        elif typ == B.VIRTIO_BLK_T_FLUSH:
            self.vq.add_sgs([(hdr, 16)], [(st, 1)], slot)
        else:
            self.vq.add_sgs([(hdr, 16)], [(data, payload), (st, 1)], slot)

    def status(self, slot: int) -> int:
        return self.fe.ram.view(self.bufs[slot][2], 1)[0]

    def data(self, slot: int, n: int) -> bytes:
        return bytes(self.fe.ram.view(self.bufs[slot][1], n))

    def one(self, typ: int, sector: int, payload: bytes | int) -> tuple[int, int]:
        self.submit(0, typ, sector, payload)
        self.vq.kick()
        (tok, written), = self.fe.wait_used(0, 1)
        assert tok == 0
        return self.status(0), written


BLK_WANT = (F.bit(F.VIRTIO_F_VERSION_1) | F.bit(F.VIRTIO_RING_F_EVENT_IDX)
            | F.bit(F.VIRTIO_RING_F_INDIRECT_DESC) | F.bit(B.VIRTIO_BLK_F_FLUSH)
            | F.bit(B.VIRTIO_BLK_F_SEG_MAX) | F.bit(B.VIRTIO_BLK_F_BLK_SIZE)
            | F.bit(B.VIRTIO_BLK_F_RO))


def blk_session(path: str, packed: bool) -> tuple[Frontend, BlkDriver]:
    fe = Frontend(path)
    fe.negotiate(BLK_WANT | (F.bit(F.VIRTIO_F_RING_PACKED) if packed else 0))
    fe.set_mem_table()
    fe.setup_ring(0)
    return fe, BlkDriver(fe)


# ---- the codec ---------------------------------------------------------------------------------
def test_codec_round_trips_and_layouts():
    assert P.HEADER_SIZE == 12 and P.VRING_ADDR.size == 40 and P.MEM_REGION.size == 32
    assert P.SINGLE_REGION.size == 40 and P.CONFIG_HEADER.size == 12
    regions = [MemRegion(0, 0xA0000, 0x7F00_0000_0000, 0),
               MemRegion(0x10_0000, 0xFF0_0000, 0x7F00_0010_0000, 0x10_0000)]
    table = P.encode_mem_table(regions)
    assert len(table) == 8 + 8 * 32
    assert [(r.gpa, r.size, r.uva, r.mmap_offset) for r in P.decode_mem_table(table)] == \
        [(r.gpa, r.size, r.uva, r.mmap_offset) for r in regions]
    r = P.decode_single_region(P.encode_single_region(regions[1]))
    assert (r.gpa, r.mmap_offset) == (0x10_0000, 0x10_0000)
    assert P.decode_addr(P.encode_addr(1, 0, 10, 20, 30)) == (1, 0, 10, 20, 30, 0)
    assert P.decode_config(P.encode_config(4, 0, b"abcd")) == (4, 4, 0, b"abcd")
    assert P.split_packed_base(P.packed_base(5, 1, 3, 0)) == (5, 1, 3, 0)
    assert P.split_packed_base(0x8005) == (5, 1, 5, 1)     # the lower half alone
    with pytest.raises(P.PayloadError):
        P.decode_mem_table(struct.pack("<II", 9, 0) + bytes(9 * 32))
    with pytest.raises(P.PayloadError):
        P.decode_state(b"\0" * 7)
    with pytest.raises(P.PayloadError):
        P.decode_config(P.CONFIG_HEADER.pack(0, 300, 0) + bytes(300))


# ---- the blk backend end to end ----------------------------------------------------------------
@pytest.mark.timeout(60)
@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_blk_backend_reads_writes_flushes(tmp_path, image, packed):
    be = Backend(tmp_path, "blk", "--image", str(image))
    try:
        fe, drv = blk_session(be.sock, packed)
        assert fe.vqs[0].ring == ("packed" if packed else "split")
        assert fe.features & F.bit(F.VIRTIO_RING_F_EVENT_IDX)
        cfg = fe.config(60)
        assert struct.unpack_from("<Q", cfg, B.CFG_CAPACITY)[0] == IMAGE_SIZE // 512
        assert cfg[36:] == bytes(24)        # asked for more than the device has: zeros
        orig = image.read_bytes()
        # reads match the image
        for sector in (0, 17, IMAGE_SIZE // 512 - 8):
            st, written = drv.one(B.VIRTIO_BLK_T_IN, sector, 4096)
            assert (st, written) == (B.VIRTIO_BLK_S_OK, 4097)
            assert drv.data(0, 4096) == orig[sector * 512:sector * 512 + 4096]
        # a batch of writes in flight together, then a flush
        rng = random.Random(1)
        want = {}
        for slot in range(16):
            sector = slot * 40 + 3
            data = rng.randbytes(8192)
            want[sector] = data
            drv.submit(slot, B.VIRTIO_BLK_T_OUT, sector, data)
        drv.vq.kick()
        used = fe.wait_used(0, 16)
        assert sorted(t for t, _ in used) == list(range(16))
        assert all(drv.status(s) == B.VIRTIO_BLK_S_OK for s in range(16))
        assert drv.one(B.VIRTIO_BLK_T_FLUSH, 0, 0)[0] == B.VIRTIO_BLK_S_OK
        # past the end: IOERR, and the session goes on
        assert drv.one(B.VIRTIO_BLK_T_IN, IMAGE_SIZE // 512, 512)[0] == B.VIRTIO_BLK_S_IOERR
        disk = image.read_bytes()
        for sector, data in want.items():
            assert disk[sector * 512:sector * 512 + len(data)] == data
        # a ring's base after 3 + 16 + 1 + 1 requests
        base = fe.get_vring_base(0)
        n = 21
        if packed:
            # 21 chains, each one indirect descriptor in the ring, on a ring of 128: the
            # device is at 21 on its first lap (wrap counter 1), used side the same
            assert P.split_packed_base(base) == (n, 1, n, 1)
        else:
            assert base == n
        fe.close()
        be.wait_log("frontend disconnected")
    finally:
        assert be.stop() == 0
    assert not os.path.exists(be.sock)


@pytest.mark.timeout(60)
def test_blk_backend_sessions_call_replaced_spurious_kicks(tmp_path, image):
    """Several sessions over the backend's life; a call eventfd replaced while the ring runs;
    kicks with nothing new; a session that stops its ring and restarts it at its base."""
    be = Backend(tmp_path, "blk", "--image", str(image), "--no-packed")
    try:
        for k in range(3):
            fe, drv = blk_session(be.sock, packed=True)   # --no-packed: split it is
            assert fe.vqs[0].ring == "split"
            assert not fe.features & F.bit(F.VIRTIO_F_RING_PACKED)
            for i in range(5):
                st, _ = drv.one(B.VIRTIO_BLK_T_OUT, 100 + i, bytes([k]) * 512)
                assert st == B.VIRTIO_BLK_S_OK
                if i == 2:
                    fe.replace_call(0)
                if i == 3 and k == 1:
                    fe.restart_ring(0)
                os.eventfd_write(fe.kicks[0], 1)          # spurious
                time.sleep(0.02)        # taken alone, not merged with the next real kick
            os.eventfd_write(fe.kicks[0], 1)    # spurious for sure: nothing follows it
            time.sleep(0.2)
            fe.close()
            be.wait_log(f"session {k + 1}: frontend disconnected")
        assert image.read_bytes()[100 * 512:105 * 512] == bytes([2]) * (5 * 512)
        log = be.log()
        assert "(0 spurious)" not in log.split("session 3: frontend disconnected")[1]
    finally:
        assert be.stop() == 0


@pytest.mark.timeout(60)
def test_blk_backend_readonly(tmp_path, image):
    be = Backend(tmp_path, "blk", "--image", str(image), "--readonly")
    try:
        fe, drv = blk_session(be.sock, packed=False)
        assert fe.features & F.bit(B.VIRTIO_BLK_F_RO)
        assert drv.one(B.VIRTIO_BLK_T_OUT, 0, bytes(512))[0] == B.VIRTIO_BLK_S_IOERR
        assert drv.one(B.VIRTIO_BLK_T_IN, 0, 512)[0] == B.VIRTIO_BLK_S_OK
        fe.close()
    finally:
        assert be.stop() == 0


@pytest.mark.timeout(60)
def test_mem_slots_and_tables_replaced_while_running(tmp_path, image):
    """CONFIGURE_MEM_SLOTS: RAM added as two regions at unrelated user addresses, one
    removed and added back while the ring runs, then the whole table replaced by
    SET_MEM_TABLE while it runs; requests go on across every change."""
    be = Backend(tmp_path, "blk", "--image", str(image))
    half = RAM_SIZE // 2
    regions = [MemRegion(RAM_GPA, half, UVA, 0),
               MemRegion(RAM_GPA + half, half, UVA + (1 << 32), half)]
    try:
        fe = Frontend(be.sock)
        fe.negotiate(BLK_WANT, pbit(ProtocolFeature.CONFIGURE_MEM_SLOTS))
        assert fe.pf & pbit(ProtocolFeature.CONFIGURE_MEM_SLOTS)
        assert P.decode_u64(fe.call(Req.GET_MAX_MEM_SLOTS)) == 32
        for r in regions:
            ack = fe.call(Req.ADD_MEM_REG, P.encode_single_region(r), fds=[fe.memfd],
                          need_reply=True)
            assert P.decode_u64(ack) == 0
        fe.setup_ring(0)
        drv = BlkDriver(fe, slots=4)
        # a buffer in the second region, reached through its own translation
        far, _ = fe.dma.alloc(4096, 4096)
        while far < RAM_GPA + half:
            far, _ = fe.dma.alloc(4096, 4096)
        drv.bufs[3] = (drv.bufs[3][0], far, drv.bufs[3][2])

        def check(tag: int) -> None:
            data = bytes([tag]) * 4096
            drv.submit(3, B.VIRTIO_BLK_T_OUT, 64, data)
            drv.vq.kick()
            fe.wait_used(0, 1)
            assert drv.status(3) == B.VIRTIO_BLK_S_OK
            assert drv.one(B.VIRTIO_BLK_T_IN, 64, 4096)[0] == B.VIRTIO_BLK_S_OK
            assert drv.data(0, 4096) == data
        check(1)
        fe.call(Req.REM_MEM_REG, P.encode_single_region(regions[1]), need_reply=True)
        fe.call(Req.ADD_MEM_REG, P.encode_single_region(regions[1]), fds=[fe.memfd],
                need_reply=True)
        check(2)
        fe.set_mem_table()                   # one region now, replacing both
        check(3)
        # removing a region that is not there ends the session
        fe.sock.settimeout(5)
        send_message(fe.sock, Req.REM_MEM_REG, P.encode_single_region(regions[1]))
        with pytest.raises(PeerClosed):
            recv_message(fe.sock)
        fe.close()
        be.wait_log("no such region")
    finally:
        assert be.stop() == 0
    assert image.read_bytes()[64 * 512:64 * 512 + 4096] == bytes([3]) * 4096


@pytest.mark.timeout(60)
def test_without_protocol_features_rings_start_enabled(tmp_path, image):
    """A frontend of the first vhost-user generation: no bit 30, no protocol-feature
    messages, no SET_VRING_ENABLE; its ring is served once started (vhost-user.rst "Ring
    states"). A disabled ring of a protocol-features frontend is not served."""
    be = Backend(tmp_path, "blk", "--image", str(image))
    try:
        fe = Frontend(be.sock)
        offered = P.decode_u64(fe.call(Req.GET_FEATURES))
        fe.call(Req.SET_OWNER)
        fe.features = offered & BLK_WANT & ~F.bit(B.VIRTIO_BLK_F_RO)
        fe.call(Req.SET_FEATURES, P.encode_u64(fe.features))
        fe.set_mem_table()
        fe.setup_ring(0, enable=False)
        drv = BlkDriver(fe, slots=2)
        assert drv.one(B.VIRTIO_BLK_T_IN, 0, 512)[0] == B.VIRTIO_BLK_S_OK
        fe.close()

        fe, drv = blk_session(be.sock, packed=False)
        # REPLY_ACK: the backend has taken the earlier messages (ENABLE 1 included) too
        fe.call(Req.SET_VRING_ENABLE, P.encode_state(0, 0), need_reply=True)
        drv.submit(0, B.VIRTIO_BLK_T_IN, 0, 512)
        drv.vq.kick()
        with pytest.raises(AssertionError, match="0 of 1 used"):
            fe.wait_used(0, 1, timeout=0.3)
        fe.call(Req.SET_VRING_ENABLE, P.encode_state(0, 1))
        drv.vq.kick()
        fe.wait_used(0, 1)
        assert drv.status(0) == B.VIRTIO_BLK_S_OK
        fe.close()
    finally:
        assert be.stop() == 0


def _raw(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    return s


def _closed_by_backend(s: socket.socket) -> bool:
    s.settimeout(5)
    try:
        recv_message(s)
    except PeerClosed:
        return True
    finally:
        s.close()
    return False


BAD = {
    "version 2": lambda s: s.sendall(P.HEADER.pack(Req.GET_FEATURES, 2, 0)),
    "unknown flags": lambda s: s.sendall(P.HEADER.pack(Req.GET_FEATURES, 0x101, 0)),
    "payload too big": lambda s: s.sendall(P.HEADER.pack(Req.SET_FEATURES, 1, 1 << 30)),
    "unknown request": lambda s: send_message(s, 999),
    "unsupported request": lambda s: send_message(s, Req.SET_LOG_BASE, P.encode_u64(0)),
    "short payload": lambda s: send_message(s, Req.SET_VRING_NUM, b"\0\0"),
    "ring index": lambda s: send_message(s, Req.SET_VRING_NUM, P.encode_state(7, 128)),
    "ring size": lambda s: send_message(s, Req.SET_VRING_NUM, P.encode_state(0, 0)),
    "features not offered": lambda s: send_message(s, Req.SET_FEATURES,
                                                   P.encode_u64(1 << 63)),
    "kick without fd": lambda s: send_message(s, Req.SET_VRING_KICK, P.encode_u64(0)),
    "truncated": lambda s: (s.sendall(P.HEADER.pack(Req.SET_FEATURES, 1, 8) + b"\0\0"),
                            s.shutdown(socket.SHUT_WR)),
    "protocol feature not negotiated": lambda s: send_message(s, Req.GET_CONFIG,
                                                              P.encode_config(0, 0, bytes(8))),
}


@pytest.mark.timeout(90)
def test_bad_messages_close_the_session_with_a_line(tmp_path, image):
    be = Backend(tmp_path, "blk", "--image", str(image))
    try:
        for name, send in BAD.items():
            s = _raw(be.sock)
            send(s)
            assert _closed_by_backend(s), name
        # a memory table the backend must refuse: a region past the end of its fd
        fd = os.memfd_create("vmsim-test-small", os.MFD_CLOEXEC)
        os.ftruncate(fd, 4096)
        s = _raw(be.sock)
        send_message(s, Req.SET_MEM_TABLE, P.encode_mem_table(
            [MemRegion(0, 1 << 20, UVA, 0)]), fds=[fd])
        os.close(fd)
        assert _closed_by_backend(s)
        # regions whose count does not match the fds
        s = _raw(be.sock)
        send_message(s, Req.SET_MEM_TABLE, P.encode_mem_table([MemRegion(0, 4096, UVA, 0)]))
        assert _closed_by_backend(s)
        # a ring whose addresses are in no region: the ring is broken, the error fd fires,
        # the session goes on
        fe = Frontend(be.sock)
        fe.negotiate(BLK_WANT)
        fe.set_mem_table()
        err = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        fe.call(Req.SET_VRING_ERR, P.encode_u64(0), fds=[err])
        fe.call(Req.SET_VRING_NUM, P.encode_state(0, 64))
        fe.call(Req.SET_VRING_ADDR, P.encode_addr(0, 0, 0x1000, 0x2000, 0x3000))
        kick = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        fe.call(Req.SET_VRING_KICK, P.encode_u64(0), fds=[kick])
        r, _, _ = select.select([err], [], [], 5)
        assert r, be.log()
        assert P.decode_u64(fe.call(Req.GET_FEATURES)) & F.bit(F.VIRTIO_F_VERSION_1)
        fe.close()
        os.close(err)
        os.close(kick)
        # and a good session after all that
        fe, drv = blk_session(be.sock, packed=True)
        assert drv.one(B.VIRTIO_BLK_T_IN, 0, 512)[0] == B.VIRTIO_BLK_S_OK
        fe.close()
        log = be.wait_log(f"session {len(BAD) + 4}: frontend disconnected")
    finally:
        assert be.stop() == 0
    for text in ("version 2", "unknown flag bits", "exceeds", "unknown request 999",
                 "SET_LOG_BASE is not supported", "vring state: payload of 2 bytes",
                 "ring 7, the device has 1", "ring 0 size 0", "has bits not offered",
                 "0 fds with the no-fd flag clear", "message truncated",
                 "without protocol feature CONFIG", "extends past the end of its fd",
                 "1 regions with 0 fds", "is in no region"):
        assert text in log, (text, log)


@pytest.mark.timeout(60)
def test_console_backend(tmp_path):
    out = tmp_path / "console.out"
    r, w = os.pipe()
    be = Backend(tmp_path, "console", "--output", str(out), stdin=r)
    os.close(r)
    try:
        fe = Frontend(be.sock)
        fe.negotiate(F.bit(F.VIRTIO_F_VERSION_1) | F.bit(F.VIRTIO_F_RING_PACKED))
        fe.set_mem_table()
        rx = fe.setup_ring(0, 64)
        tx = fe.setup_ring(1, 64)
        assert rx.ring == "packed"
        # output: the driver's transmit buffers land in the file
        bufs = []
        for k in range(3):
            gpa, mv = fe.dma.alloc(64)
            text = f"hello {k}\n".encode()
            mv[:len(text)] = text
            tx.add_outbuf([(gpa, len(text))], k)
            bufs.append(gpa)
        tx.kick()
        fe.wait_used(1, 3)
        assert out.read_bytes() == b"hello 0\nhello 1\nhello 2\n"
        # input: the backend's stdin fills the driver's receive buffers
        rxbuf, rxmv = fe.dma.alloc(256)
        rx.add_inbuf([(rxbuf, 256)], "rx")
        rx.kick()
        os.write(w, b"typed line\n")
        (tok, n), = fe.wait_used(0, 1)
        assert (tok, bytes(rxmv[:n])) == ("rx", b"typed line\n")
        fe.close()
    finally:
        os.close(w)
        assert be.stop() == 0


@pytest.mark.timeout(60)
def test_sigint_stops_the_backend(tmp_path, image):
    be = Backend(tmp_path, "blk", "--image", str(image))
    fe = Frontend(be.sock)
    fe.negotiate(BLK_WANT)
    be.proc.send_signal(signal.SIGINT)
    assert be.proc.wait(10) == 0
    fe.close()
    be.stop()
    assert "stopping on a signal" in be.log()
    assert not os.path.exists(be.sock)


def measure(path: str, packed: bool, seconds: float, depth: int) -> float:
    """Requests per second: 4 KiB reads, `depth` in flight, through the backend."""
    fe, drv = blk_session(path, packed)
    try:
        for s in range(depth):
            drv.submit(s, B.VIRTIO_BLK_T_IN, s * 8, 4096)
        drv.vq.kick()
        n = 0
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            for tok, _ in fe.wait_used(0, 1):
                n += 1
                drv.submit(tok, B.VIRTIO_BLK_T_IN, tok * 8, 4096)
            drv.vq.kick()
        rate = n / (time.perf_counter() - t0)
        fe.wait_used(0, depth)         # what is still in flight
    finally:
        fe.close()
    return rate


@pytest.mark.timeout(60)
def test_blk_backend_throughput(tmp_path, image):
    """The per-request cost through vhost-user (reported; asserted only loosely)."""
    be = Backend(tmp_path, "blk", "--image", str(image))
    try:
        rates = {(ring, d): measure(be.sock, ring == "packed", 1.0, d)
                 for ring in ("split", "packed") for d in (1, 32)}
    finally:
        assert be.stop() == 0
    print("\nvhost-user blk, 4 KiB reads, requests/s:",
          ", ".join(f"{r} depth {d}: {v:,.0f}" for (r, d), v in rates.items()))
    assert all(v > 200 for v in rates.values()), rates


# ---- QEMU: a real Linux guest ------------------------------------------------------------------
INIT = """i=0
while [ ! -b /dev/vda ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i+1)); done
echo "VMSIM: features $(cat /sys/block/vda/device/features 2>/dev/null)"
echo "VMSIM: size $(cat /sys/block/vda/size)"
echo "VMSIM: before $(md5sum /dev/vda | cut -d' ' -f1)"
dd if=/dev/vda of=/dev/null bs=64k 2>/dev/null
echo "VMSIM: first $(dd if=/dev/vda bs=512 count=1 2>/dev/null | md5sum | cut -d' ' -f1)"
printf 'written by a real linux guest through vhost-user' > /tmp/msg
dd if=/tmp/msg of=/dev/vda bs=512 seek=8 conv=notrunc,fsync 2>/dev/null
dd if=/dev/urandom of=/tmp/rnd bs=4096 count=64 2>/dev/null
dd if=/tmp/rnd of=/dev/vda bs=4096 seek=100 oflag=direct 2>/dev/null
sync
echo 3 > /proc/sys/vm/drop_caches
echo "VMSIM: rnd $(md5sum /tmp/rnd | cut -d' ' -f1)"
dd if=/dev/vda of=/tmp/back bs=4096 skip=100 count=64 iflag=direct 2>/dev/null
echo "VMSIM: readback $(md5sum /tmp/back | cut -d' ' -f1)"
echo "VMSIM: after $(md5sum /dev/vda | cut -d' ' -f1)"
echo "VMSIM: done"
poweroff -f
"""


def _md5(b: bytes) -> str:
    return hashlib.md5(b).hexdigest()


@qg.needs_qemu(qg.BLK_MODULES)
@pytest.mark.timeout(180)
@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_qemu_linux_guest_on_vhost_user_blk(tmp_path, image, packed):
    """A real Linux virtio-blk driver (Debian's kernel under QEMU TCG) on `vmsim backend
    blk`: it reads the whole disk, writes, and reads back with O_DIRECT; the host checks the
    image afterwards."""
    orig = image.read_bytes()
    initrd = qg.initramfs(tmp_path, INIT, qg.BLK_MODULES)
    be = Backend(tmp_path, "blk", "--image", str(image), "--trace")
    console = tmp_path / "console.log"
    try:
        cmd = qg.qemu_command(initrd, console, [
            "-chardev", f"socket,id=c,path={be.sock}",
            "-device", "vhost-user-blk-pci,chardev=c" + (",packed=on" if packed else "")])
        q = qg.run_qemu(cmd, timeout=150)
        out = console.read_text(errors="replace") if console.exists() else ""
        assert "VMSIM: done" in out, (q.stdout.decode(errors="replace"), out, be.log())
    finally:
        assert be.stop() == 0
    lines = qg.lines(out)
    feats = lines["features"].strip()
    # the negotiated bits as Linux shows them: one character per bit, from bit 0
    assert feats[F.VIRTIO_F_VERSION_1] == "1"
    assert feats[F.VIRTIO_F_RING_PACKED] == ("1" if packed else "0")
    assert int(lines["size"]) == IMAGE_SIZE // 512
    assert lines["before"].strip() == _md5(orig)
    assert lines["first"].strip() == _md5(orig[:512])
    assert lines["readback"].strip() == lines["rnd"].strip()
    disk = image.read_bytes()
    assert lines["after"].strip() == _md5(disk)
    msg = b"written by a real linux guest through vhost-user"
    assert disk[8 * 512:8 * 512 + len(msg)] == msg
    assert _md5(disk[100 * 4096:164 * 4096]) == lines["rnd"].strip()
    assert disk[:8 * 512] == orig[:8 * 512]
    log = be.log()
    assert "memory: added MemRegion(" in log      # QEMU uses ADD_MEM_REG (CONFIGURE_MEM_SLOTS)
    reads, writes = map(int, re.search(r"(\d+) reads, (\d+) writes", log).groups())
    assert reads > 0 and writes > 0, log
