"""virtio-net as a vhost-user backend: receiveq/transmitq pairs over a TAP interface.

The frame handling is vmsim's own net device code: the TAP backend
(vmsim.host.devices.net.backend.TapBackend, IFF_VNET_HDR), the parsing of transmit chains and
the receive header (vmsim.host.devices.net.request), the counters (NetMetrics) and the config
space (build_config). What differs from the in-process device is what vhost-user leaves to the
frontend: the control queue is the frontend's (QEMU answers it itself), so there is no RX
filtering here (every frame the TAP hands over goes to the guest, as in DPDK's vhost), and the
queue pairs in use are those whose receive ring the frontend enabled (SET_VRING_ENABLE per
pair), which the server tells the device through `bind`.
"""

import zlib
from collections import deque
from collections.abc import Callable

from vmsim.abi import features as F
from vmsim.abi import ids
from vmsim.abi import net as N
from vmsim.host.devices.net.backend import Meta, TapBackend
from vmsim.host.devices.net.config import build_config
from vmsim.host.devices.net.metrics import NetMetrics
from vmsim.host.devices.net.request import TX_FRAME_MAX, deliver_frames, read_tx
from vmsim.host.virtio.errors import Reason, RingError
from vmsim.host.virtio.queue import DeviceQueue
from vmsim.vhost.devices import BATCH, VhostDevice

# Frames from the TAP that wait for receive buffers, per pair (as the in-process device).
BACKLOG = 256
MAX_PAIRS = 16


class NetVhostDevice(VhostDevice):
    """virtio-net: queue 2N receiveqN, 2N+1 transmitqN; no control queue."""

    name = "net"
    device_id = ids.VIRTIO_ID_NET

    def __init__(self, tap: str, mac: bytes, mtu: int, pairs: int, packed: bool) -> None:
        super().__init__(packed)
        if not 1 <= pairs <= MAX_PAIRS:
            raise ValueError(f"{pairs} queue pairs: 1 to {MAX_PAIRS}")
        if not 68 <= mtu <= 65535:
            raise ValueError(f"MTU {mtu}: 68 to 65535")
        self.pairs = pairs
        self.num_queues = 2 * pairs
        self.mac = mac
        self.mtu = mtu
        self.features |= (F.bit(N.VIRTIO_NET_F_MRG_RXBUF) | F.bit(N.VIRTIO_NET_F_CSUM)
                          | F.bit(N.VIRTIO_NET_F_GUEST_CSUM) | F.bit(N.VIRTIO_NET_F_STATUS)
                          | F.bit(N.VIRTIO_NET_F_MAC))
        if pairs > 1:
            self.features |= F.bit(N.VIRTIO_NET_F_MQ)
        if mtu != N.ETH_DATA_LEN:
            self.features |= F.bit(N.VIRTIO_NET_F_MTU)
        self.hdr_len = N.HDR_SIZE
        self.metrics = NetMetrics()
        self.backlog: list[deque[tuple[bytes, Meta]]] = [deque() for _ in range(pairs)]
        self._readers: dict[int, Callable[[int], None]] = {}
        self._ready: Callable[[int], bool] = lambda index: True
        self._config = bytes(build_config(mac, True, pairs, mtu))
        self.tap = TapBackend(tap, self._readers.__setitem__,
                              lambda fd: self._readers.pop(fd, None))
        self.tap.attach(self.receive)

    def config(self) -> bytes:
        return self._config

    def set_features(self, acked: int) -> None:
        super().set_features(acked)
        self.hdr_len = N.hdr_size(acked)       # the legacy 10 bytes without VERSION_1/MRG

    def bind(self, ready: Callable[[int], bool] | None) -> None:
        self._ready = ready or (lambda index: True)

    # ---- the TAP side ----------------------------------------------------------------------------
    def readable_fds(self) -> list[int]:
        return list(self._readers)

    def on_readable(self, fd: int) -> None:
        cb = self._readers.get(fd)
        if cb is not None:
            cb(fd)

    def receive(self, frame: bytes, meta: Meta) -> None:
        """A frame from the TAP: kept for the receive ring of its flow's pair."""
        m = self.metrics
        if len(frame) < N.ETH_HLEN:
            m.rx_dropped_filter += 1
            return
        backlog = self.backlog[self._steer(frame)]
        if len(backlog) >= BACKLOG:
            m.rx_dropped_no_buffer += 1
            return
        backlog.append((frame, meta))

    def _steer(self, frame: bytes) -> int:
        """A pair per flow among those the frontend enabled (the addresses and, for IPv4
        TCP/UDP, the ports: the in-process device's key); pair 0 while none is."""
        live = [p for p in range(self.pairs) if self._ready(N.rx_queue(p))]
        if len(live) <= 1:
            return live[0] if live else 0
        key = frame[0:14]
        if frame[12:14] == b"\x08\x00" and len(frame) >= 38:
            ihl = (frame[14] & 0xF) * 4
            key += frame[26:34] + frame[14 + ihl:14 + ihl + 4]
        return live[zlib.crc32(key) % len(live)]

    def pending(self) -> list[int]:
        return [N.rx_queue(p) for p in range(self.pairs) if self.backlog[p]]

    # ---- rings -----------------------------------------------------------------------------------
    def serve(self, index: int, q: DeviceQueue) -> int:
        n = self._transmit(q) if index % 2 else self._deliver(index // 2, q)
        self.requests += n
        return n

    def _transmit(self, q: DeviceQueue) -> int:
        m = self.metrics
        csum_ok = F.has(self.acked, N.VIRTIO_NET_F_CSUM)
        n = 0
        while chains := q.pop_batch(BATCH):
            for chain in chains:
                if chain.rlen > self.hdr_len + TX_FRAME_MAX:
                    m.tx_dropped_oversize += 1       # refused unread
                    continue
                try:
                    (flags, _gso, _hl, _gs, cstart, coff, _nb), frame = read_tx(chain,
                                                                               self.hdr_len)
                except ValueError as e:
                    raise RingError(Reason.NET_HEADER_SHORT, str(e)) from None
                meta: Meta = None
                if flags & N.VIRTIO_NET_HDR_F_NEEDS_CSUM:
                    if not csum_ok:
                        raise RingError(Reason.NET_HEADER_SHORT,
                                        "NEEDS_CSUM without VIRTIO_NET_F_CSUM negotiated")
                    meta = (flags, cstart, coff)
                if len(frame) < N.ETH_HLEN:
                    m.tx_errors += 1
                    continue
                try:
                    self.tap.send(frame, meta)
                except OSError:
                    m.tx_errors += 1    # the kernel refused it (a bad checksum request)
                    continue
                m.tx_frames += 1
                m.tx_bytes += len(frame)
            q.fill_batch(chains, [0] * len(chains))
            n += len(chains)
        return n

    def _deliver(self, pair: int, q: DeviceQueue) -> int:
        """Waiting frames into posted buffers (several per frame with MRG_RXBUF); the
        buffers used. A frame that finds too little room waits for the next kick."""
        return deliver_frames(q, self.backlog[pair], self.hdr_len,
                              F.has(self.acked, N.VIRTIO_NET_F_MRG_RXBUF),
                              F.has(self.acked, N.VIRTIO_NET_F_GUEST_CSUM), self.metrics)[0]

    def describe(self) -> str:
        m = self.metrics
        t = self.tap
        return (f"rx {m.rx_frames} frames {m.rx_bytes} bytes, tx {m.tx_frames} frames "
                f"{m.tx_bytes} bytes, rx dropped {m.rx_dropped_no_buffer} no buffer "
                f"{m.rx_dropped_too_big} too big, tx errors {m.tx_errors}, "
                f"tap {t.ifname} {t.rx} in {t.tx} out {t.errors} errors")

    def close(self) -> None:
        self.tap.close()
