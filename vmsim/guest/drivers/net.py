"""virtio_net, driver side (drivers/net/virtio_net.c), with a minimal network interface the
guest's workloads use (send a frame; receive frames by EtherType).

Queues: receiveq/transmitq pairs, then the control queue. Receive buffers are posted in
advance, as Linux posts them: mergeable buffers (VIRTIO_NET_F_MRG_RXBUF, a frame may span
several, num_buffers in the first header), or without it one "small" buffer per frame (header
plus a full Ethernet frame), or "big" buffers (a chain of pages) when the MTU is above 1500.
Each queue pair has transmit slots (header and frame in one buffer) allocated once.
Completions follow the NAPI pattern: disable callbacks, drain, re-enable and re-check.
"""

import errno
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from vmsim.abi import ids
from vmsim.abi import net as N
from vmsim.guest.memory import DmaMemory
from vmsim.guest.virtio.core import VirtioDevice, VirtioDriver
from vmsim.guest.virtio.virtqueue import Virtqueue

log = logging.getLogger("vmsim.guest")

EAGAIN = -errno.EAGAIN
ENETDOWN = -errno.ENETDOWN
EMSGSIZE = -errno.EMSGSIZE
EIO = -errno.EIO
MERGE_BUF = 2048                 # bytes per mergeable receive buffer
PAGE = 4096

# A received frame: (frame bytes, virtio-net header flags, csum_start, csum_offset, pair)
Handler = Callable[[bytes, int, int, int, int], None]


class RxBuf:
    """A posted receive buffer (or a chain of pages for big packets)."""

    __slots__ = ("gpa", "sgs", "size", "view")

    def __init__(self, gpa: int, view: memoryview, sgs: list[tuple[int, int]]) -> None:
        self.gpa, self.view, self.sgs = gpa, view, sgs
        self.size = len(view)


class TxSlot:
    __slots__ = ("gpa", "view")

    def __init__(self, gpa: int, view: memoryview) -> None:
        self.gpa, self.view = gpa, view


class NetQueuePair:
    __slots__ = (
        "_pending",
        "index",
        "rx",
        "rx_bufs",
        "rx_frames",
        "rx_lock",
        "tx",
        "tx_frames",
        "tx_free",
        "tx_lock",
        "tx_slots",
    )

    def __init__(self, index: int, rx: Virtqueue, tx: Virtqueue) -> None:
        self.index = index
        self.rx, self.tx = rx, tx
        self.rx_lock = threading.RLock()
        self.tx_lock = threading.RLock()
        self.rx_bufs: list[RxBuf] = []
        self.tx_slots: list[TxSlot] = []
        self.tx_free: list[TxSlot] = []
        self.rx_frames = 0
        self.tx_frames = 0
        self._pending: list[tuple[RxBuf, int]] = []   # buffers of a merged frame so far


class VirtioNet:
    """struct virtnet_info: one probed network interface."""

    def __init__(self, vdev: VirtioDevice, dma: DmaMemory, poll_us: int) -> None:
        self.vdev = vdev
        self.dma = dma
        self.poll_ns = poll_us * 1000
        self.mac = b"\x52\x54\x00\x00\x00\x00"
        self.mtu = N.ETH_DATA_LEN
        self.link_up = True
        self.mergeable = False
        self.big_packets = False
        self.max_pairs = 1
        self.curr_pairs = 1
        self.pairs: list[NetQueuePair] = []
        self.ctrl: Virtqueue | None = None
        self.ctrl_lock = threading.Lock()
        self._ctrl_buf: tuple[int, memoryview] | None = None
        self.handlers: dict[int, Handler] = {}
        self.link_listeners: list[Callable[[bool], None]] = []
        self.tx_listeners: list[Callable[[int], None]] = []   # a transmit slot came free
        self.rx_dropped = 0
        self.rx_errors = 0
        self.removed = False
        self.hdr_len = N.HDR_SIZE

    # ---- setup (virtnet_probe) -------------------------------------------------------------------
    def init(self) -> int:
        vdev = self.vdev
        if vdev.has_feature(N.VIRTIO_NET_F_MAC):
            self.mac = vdev.config.get(vdev, N.CFG_MAC, 6)
        if vdev.has_feature(N.VIRTIO_NET_F_MTU):
            self.mtu = vdev.cread(N.CFG_MTU, 2)
        if vdev.has_feature(N.VIRTIO_NET_F_MQ):
            self.max_pairs = max(1, vdev.cread(N.CFG_MAX_VIRTQUEUE_PAIRS, 2))
        self.mergeable = vdev.has_feature(N.VIRTIO_NET_F_MRG_RXBUF)
        # 12 bytes with VERSION_1 or MRG_RXBUF, the legacy 10 otherwise (virtnet_probe)
        self.hdr_len = N.hdr_size(vdev.features)
        self.big_packets = not self.mergeable and self.mtu > N.ETH_DATA_LEN
        nvqs = 2 * self.max_pairs
        callbacks: list[Callable[[Virtqueue], None] | None] = []
        names = []
        for p in range(self.max_pairs):
            callbacks += [self._rx_done, self._tx_done]
            names += [f"input.{p}", f"output.{p}"]
        has_ctrl = vdev.has_feature(N.VIRTIO_NET_F_CTRL_VQ)
        if has_ctrl:
            callbacks.append(None)                 # polled, as Linux's virtnet_send_command
            names.append("control")
            nvqs += 1
        vqs = vdev.config.find_vqs(vdev, nvqs, callbacks, names)
        for p in range(self.max_pairs):
            pair = NetQueuePair(p, vqs[2 * p], vqs[2 * p + 1])
            vqs[2 * p].priv = vqs[2 * p + 1].priv = pair
            self.pairs.append(pair)
            self._alloc_tx(pair)
        if has_ctrl:
            self.ctrl = vqs[-1]
            self._ctrl_buf = self.dma.alloc(256, 64)
        self.link_up = self._read_link()
        vdev.device_ready()
        for pair in self.pairs:
            self._refill(pair)
        if has_ctrl:
            if vdev.has_feature(N.VIRTIO_NET_F_MQ) and self.max_pairs > 1:
                self.set_queue_pairs(self.max_pairs)
            if vdev.has_feature(N.VIRTIO_NET_F_CTRL_RX):
                self.set_rx_mode(promisc=False, allmulti=False)
        return 0

    def _read_link(self) -> bool:
        vdev = self.vdev
        if not vdev.has_feature(N.VIRTIO_NET_F_STATUS):
            return True
        return bool(vdev.cread(N.CFG_STATUS, 2) & N.VIRTIO_NET_S_LINK_UP)

    def _alloc_tx(self, pair: NetQueuePair) -> None:
        size = self.hdr_len + self.mtu + N.ETH_HLEN + 4
        n = max(1, pair.tx.num_free // 2)
        for _ in range(n):
            gpa, view = self.dma.alloc(size, 64, zero=False)
            pair.tx_slots.append(TxSlot(gpa, view))
        pair.tx_free = list(pair.tx_slots)

    def _new_rx_buf(self) -> RxBuf:
        if self.mergeable:
            gpa, view = self.dma.alloc(MERGE_BUF, 64, zero=False)
            return RxBuf(gpa, view, [(gpa, MERGE_BUF)])
        if self.big_packets:
            # the header alone, then pages for the frame (add_recvbuf_big)
            pages = (self.mtu + N.ETH_HLEN + 4 + PAGE - 1) // PAGE
            gpa, view = self.dma.alloc(self.hdr_len + pages * PAGE, PAGE, zero=False)
            sgs = [(gpa, self.hdr_len)] + [(gpa + self.hdr_len + k * PAGE, PAGE)
                                         for k in range(pages)]
            return RxBuf(gpa, view, sgs)
        size = self.hdr_len + N.GOOD_PACKET_LEN       # add_recvbuf_small
        gpa, view = self.dma.alloc(size, 64, zero=False)
        return RxBuf(gpa, view, [(gpa, size)])

    def _refill(self, pair: NetQueuePair) -> None:
        """try_fill_recv: post buffers until the ring is full, then kick once."""
        with pair.rx_lock:
            vq = pair.rx
            added = 0
            while vq.num_free:
                buf = pair.rx_bufs.pop() if pair.rx_bufs else self._new_rx_buf()
                if vq.add_inbuf(buf.sgs, buf):
                    pair.rx_bufs.append(buf)
                    break
                added += 1
            kick = added and vq.kick_prepare()
        if kick:
            vq.notify()

    # ---- the interface the guest's workloads use -------------------------------------------------
    def register(self, ethertype: int, handler: Handler) -> None:
        self.handlers[ethertype] = handler

    def send(self, frame: bytes | memoryview, flow: int = 0,
             csum: tuple[int, int] | None = None) -> int:
        """Queue one frame on the pair its flow maps to; `csum` = (start, offset) asks the
        device to complete a partial checksum (VIRTIO_NET_F_CSUM). 0, EAGAIN (no free slot or
        descriptor: retry after a transmit completion), ENETDOWN, EMSGSIZE."""
        if not self.link_up:
            return ENETDOWN
        n = len(frame)
        if n > self.mtu + N.ETH_HLEN + 4:
            return EMSGSIZE
        pair = self.pairs[flow % self.curr_pairs]
        with pair.tx_lock:
            if not pair.tx_free:
                self._free_old_xmit(pair)
                if not pair.tx_free:
                    return EAGAIN
            slot = pair.tx_free.pop()
            if csum is not None and self.vdev.has_feature(N.VIRTIO_NET_F_CSUM):
                N.HDR.pack_into(slot.view, 0, N.VIRTIO_NET_HDR_F_NEEDS_CSUM, 0, 0, 0,
                                csum[0], csum[1], 0)
            else:
                N.HDR.pack_into(slot.view, 0, 0, 0, 0, 0, 0, 0, 0)
            slot.view[self.hdr_len:self.hdr_len + n] = frame
            err = pair.tx.add_outbuf(((slot.gpa, self.hdr_len + n),), slot)
            if err:
                pair.tx_free.append(slot)
                return EAGAIN if err == -errno.ENOSPC else err
            pair.tx_frames += 1
            kick = pair.tx.kick_prepare()
        if kick:
            pair.tx.notify()
        return 0

    def _free_old_xmit(self, pair: NetQueuePair) -> int:
        n = 0
        while (r := pair.tx.get_buf()) is not None:
            pair.tx_free.append(r[0])
            n += 1
        return n

    # ---- completions -----------------------------------------------------------------------------
    def _tx_done(self, vq: Virtqueue) -> None:
        pair: NetQueuePair = vq.priv
        with pair.tx_lock:
            while True:
                vq.disable_cb()
                self._free_old_xmit(pair)
                if vq.enable_cb():
                    break
        for fn in self.tx_listeners:
            fn(pair.index)

    def _rx_done(self, vq: Virtqueue) -> None:
        """virtnet_poll: receive everything used, hand frames up, repost the buffers."""
        pair: NetQueuePair = vq.priv
        poll_until = 0
        while True:
            frames: list[tuple[bytes, int, int, int]] = []
            with pair.rx_lock:
                vq.disable_cb()
                while (r := vq.get_buf()) is not None:
                    got = self._receive_buf(pair, r[0], r[1])
                    if got is not None:
                        frames.append(got)
                recycled = bool(frames) or pair.rx_bufs
            for frame, flags, cstart, coff in frames:
                pair.rx_frames += 1
                handler = self.handlers.get(int.from_bytes(frame[12:14], "big"))
                if handler is None:
                    self.rx_dropped += 1
                else:
                    handler(frame, flags, cstart, coff, pair.index)
            if recycled:
                self._refill(pair)
            if frames:
                if self.poll_ns:
                    poll_until = time.monotonic_ns() + self.poll_ns
                continue
            if poll_until and time.monotonic_ns() < poll_until and not vq.broken:
                continue
            with pair.rx_lock:
                if vq.enable_cb():
                    break

    def _receive_buf(self, pair: NetQueuePair, buf: RxBuf,
                     ln: int) -> tuple[bytes, int, int, int] | None:
        """One used buffer; a frame when it is complete (mergeable frames span several)."""
        pair.rx_bufs.append(buf)                   # reposted by _refill
        if ln > buf.size or ln < (self.hdr_len if not pair._pending else 1):
            self.rx_errors += 1
            pair._pending.clear()
            return None
        pending = pair._pending
        pending.append((buf, ln))
        flags, _gso, _hl, _gs, cstart, coff, nbufs = N.HDR.unpack_from(pending[0][0].view, 0)
        if self.mergeable and len(pending) < max(1, nbufs):
            return None                            # more buffers of this frame follow
        if self.big_packets:
            data = bytes(pending[0][0].view[self.hdr_len:ln])
        else:
            parts = [bytes(pending[0][0].view[self.hdr_len:pending[0][1]])]
            parts += [bytes(b.view[:n]) for b, n in pending[1:]]
            data = b"".join(parts)
        pending.clear()
        return data, flags, cstart, coff

    # ---- control queue (virtnet_send_command) ----------------------------------------------------
    def command(self, cls: int, cmd: int, data: bytes = b"") -> int:
        """Send a control command and spin for its ack (VIRTIO_NET_OK / VIRTIO_NET_ERR), as
        virtnet_send_command does. EIO if the device never answers."""
        if self.ctrl is None or self._ctrl_buf is None:
            return -errno.EOPNOTSUPP
        gpa, view = self._ctrl_buf
        with self.ctrl_lock:
            n = 2 + len(data)
            view[0] = cls
            view[1] = cmd
            view[2:n] = data
            view[n] = 0xFF
            if self.ctrl.add_sgs(((gpa, n),), ((gpa + n, 1),), "ctrl"):
                return EIO
            self.ctrl.kick()
            deadline = time.monotonic() + 5
            while self.ctrl.get_buf() is None:
                if self.ctrl.broken or time.monotonic() > deadline:
                    return EIO
                time.sleep(0)
            return view[n]

    def set_rx_mode(self, promisc: bool, allmulti: bool) -> int:
        a = self.command(N.VIRTIO_NET_CTRL_RX, N.VIRTIO_NET_CTRL_RX_PROMISC, bytes([promisc]))
        b = self.command(N.VIRTIO_NET_CTRL_RX, N.VIRTIO_NET_CTRL_RX_ALLMULTI, bytes([allmulti]))
        return a or b

    def set_mac_table(self, unicast: list[bytes], multicast: list[bytes]) -> int:
        data = len(unicast).to_bytes(4, "little") + b"".join(unicast)
        data += len(multicast).to_bytes(4, "little") + b"".join(multicast)
        return self.command(N.VIRTIO_NET_CTRL_MAC, N.VIRTIO_NET_CTRL_MAC_TABLE_SET, data)

    def set_mac(self, mac: bytes) -> int:
        err = self.command(N.VIRTIO_NET_CTRL_MAC, N.VIRTIO_NET_CTRL_MAC_ADDR_SET, mac)
        if err == N.VIRTIO_NET_OK:
            self.mac = mac
        return err

    def set_queue_pairs(self, pairs: int) -> int:
        err = self.command(N.VIRTIO_NET_CTRL_MQ, N.VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET,
                           pairs.to_bytes(2, "little"))
        if err == N.VIRTIO_NET_OK:
            self.curr_pairs = pairs
        return err

    def config_changed(self) -> None:
        """virtnet_config_changed_work: the link came up or went down."""
        up = self._read_link()
        if up != self.link_up:
            log.info("%s: link %s", self.vdev.name, "up" if up else "down")
            self.link_up = up
            for fn in self.link_listeners:
                fn(up)

    # ---- teardown --------------------------------------------------------------------------------
    def remove(self) -> None:
        vdev = self.vdev
        self.removed = True
        vdev.reset_device()
        for vq in vdev.vqs:
            while vq.detach_unused_buf() is not None:
                pass
        vdev.config.del_vqs(vdev)

    def describe(self) -> dict[str, Any]:
        return {"mac": N.format_mac(self.mac), "link_up": self.link_up, "hdr_len": self.hdr_len,
                "queue_pairs": self.curr_pairs, "mergeable": self.mergeable,
                "big_packets": self.big_packets,
                "rx_frames_per_pair": [p.rx_frames for p in self.pairs],
                "tx_frames_per_pair": [p.tx_frames for p in self.pairs],
                "rx_dropped": self.rx_dropped, "rx_errors": self.rx_errors}


class NetDriver(VirtioDriver):
    name = "virtio_net"
    id_table = ((ids.VIRTIO_ID_NET, ids.VIRTIO_DEV_ANY_ID),)
    feature_table = (N.VIRTIO_NET_F_CSUM, N.VIRTIO_NET_F_GUEST_CSUM, N.VIRTIO_NET_F_MTU,
                     N.VIRTIO_NET_F_MAC, N.VIRTIO_NET_F_MRG_RXBUF, N.VIRTIO_NET_F_STATUS,
                     N.VIRTIO_NET_F_CTRL_VQ, N.VIRTIO_NET_F_CTRL_RX, N.VIRTIO_NET_F_MQ,
                     N.VIRTIO_NET_F_CTRL_MAC_ADDR)

    def __init__(self, dma: DmaMemory, poll_us: Callable[[str], int] | None = None) -> None:
        self.dma = dma
        self.poll_us = poll_us or (lambda name: 0)

    def validate(self, vdev: VirtioDevice) -> int:
        """virtnet_validate: the control-queue features need the control queue."""
        if not vdev.has_feature(N.VIRTIO_NET_F_CTRL_VQ):
            for bit in (N.VIRTIO_NET_F_CTRL_RX, N.VIRTIO_NET_F_MQ,
                        N.VIRTIO_NET_F_CTRL_MAC_ADDR):
                vdev.clear_bit(bit)
        return 0

    def probe(self, vdev: VirtioDevice) -> int:
        net = VirtioNet(vdev, self.dma, self.poll_us(vdev.name))
        vdev.priv = net
        err = net.init()
        if err:
            vdev.config.del_vqs(vdev)
            vdev.priv = None
        return err

    def remove(self, vdev: VirtioDevice) -> None:
        net: VirtioNet | None = vdev.priv
        if net is not None:
            net.remove()
        vdev.priv = None

    def config_changed(self, vdev: VirtioDevice) -> None:
        net: VirtioNet | None = vdev.priv
        if net is not None and not vdev.needs_reset:
            net.config_changed()

