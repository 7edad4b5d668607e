"""virtio-net, device side (QEMU hw/net/virtio-net.c, Firecracker devices/virtio/net).

Queues: receiveq/transmitq pairs, then the control queue. Transmitted frames go to the
device's backend (a host switch port or a TAP interface); frames from the backend are
filtered (promiscuous, all-multicast, the MAC and the MAC table), steered to a queue pair by
flow, and written into the receive buffers the driver posted (several of them with
VIRTIO_NET_F_MRG_RXBUF, num_buffers in the first header). A frame that finds no buffer waits
in a short backlog until the driver posts some.
"""

import logging
import zlib
from collections import deque
from typing import Any

from vmsim.abi import features as F
from vmsim.abi import ids
from vmsim.abi import net as N
from vmsim.host.devices.net.backend import Meta, NetBackend
from vmsim.host.devices.net.config import build_config
from vmsim.host.devices.net.metrics import NetMetrics
from vmsim.host.devices.net.request import (
    CONTROL_MAX,
    TX_FRAME_MAX,
    BadCommand,
    deliver_frames,
    parse_mac_table,
    read_tx,
)
from vmsim.host.memory import GuestMemory
from vmsim.host.virtio.device import QueueState, VirtioDevice
from vmsim.host.virtio.errors import Reason, RingError
from vmsim.host.virtio.queue import DeviceQueue

RING_FEATURES = (F.bit(F.VIRTIO_F_VERSION_1) | F.bit(F.VIRTIO_RING_F_INDIRECT_DESC)
                 | F.bit(F.VIRTIO_RING_F_EVENT_IDX) | F.bit(F.VIRTIO_F_RING_RESET))
NET_FEATURES = (F.bit(N.VIRTIO_NET_F_MAC) | F.bit(N.VIRTIO_NET_F_STATUS)
                | F.bit(N.VIRTIO_NET_F_MRG_RXBUF) | F.bit(N.VIRTIO_NET_F_CTRL_VQ)
                | F.bit(N.VIRTIO_NET_F_CTRL_RX) | F.bit(N.VIRTIO_NET_F_CTRL_MAC_ADDR)
                | F.bit(N.VIRTIO_NET_F_CSUM) | F.bit(N.VIRTIO_NET_F_GUEST_CSUM))
BACKLOG = 256
log = logging.getLogger("vmsim.host")


class NetDevice(VirtioDevice):
    device_id = ids.VIRTIO_ID_NET
    feature_names = N.FEATURE_NAMES

    def __init__(self, name: str, mem: GuestMemory, backend: NetBackend, *, mac: bytes,
                 max_pairs: int, queue_size: int, mtu: int, offer: int, withhold: int,
                 packed: bool, dev_stats: memoryview | None,
                 queue_stats: list[memoryview | None], refuse_features_ok: bool = False,
                 link_up: bool = True) -> None:
        features = RING_FEATURES | NET_FEATURES
        if max_pairs > 1:
            features |= F.bit(N.VIRTIO_NET_F_MQ)
        if mtu != N.ETH_DATA_LEN:
            features |= F.bit(N.VIRTIO_NET_F_MTU)
        if packed:
            features |= F.bit(F.VIRTIO_F_RING_PACKED)
        features = (features | offer) & ~withhold
        super().__init__(name, mem, 2 * max_pairs + 1, queue_size, features, dev_stats,
                         queue_stats, refuse_features_ok)
        self.backend = backend
        self.configured_mac = mac
        self.max_pairs = max_pairs
        self.ctrl_index = N.ctrl_queue(max_pairs)
        self.hdr_len = N.HDR_SIZE          # the legacy 10 bytes once a legacy driver is live
        self.mtu = mtu
        self.link_up = link_up
        self.metrics = NetMetrics()
        self.backlog: list[deque[tuple[bytes, Meta]]] = [deque() for _ in range(max_pairs)]
        # A receive queue whose buffers cannot take the next frame waits for a kick (the
        # driver posted more) instead of being retried on every pass of the host loop.
        self.rx_starved = [False] * max_pairs
        self._reset_filters()
        backend.attach(self.receive)

    def _reset_filters(self) -> None:
        self.mac = self.configured_mac
        self.promisc = True          # as QEMU: until the driver sets an RX mode
        self.allmulti = False
        self.uni_table: list[bytes] = []
        self.multi_table: list[bytes] = []
        self.curr_pairs = 1
        for b in self.backlog:
            b.clear()
        self.rx_starved = [False] * self.max_pairs

    def config_space(self) -> bytearray:
        return build_config(self.mac, self.link_up, self.max_pairs, self.mtu)

    def on_reset(self) -> None:
        self._reset_filters()

    def on_driver_ok(self) -> None:
        # Without VIRTIO_NET_F_MQ the control queue follows the first pair (queue 2), however
        # many pairs the device has (spec 5.1.2).
        pairs = self.max_pairs if self.negotiated(N.VIRTIO_NET_F_MQ) else 1
        self.ctrl_index = N.ctrl_queue(pairs)
        self.hdr_len = N.hdr_size(self.driver_features)

    # ---- host-side changes -----------------------------------------------------------------------
    def set_link(self, up: bool) -> None:
        """Link up or down: the status in config space changes and the driver hears of it by
        a config-change interrupt."""
        if up != self.link_up:
            self.link_up = up
            self.config_changed()

    # ---- queues ----------------------------------------------------------------------------------
    def wants_service(self, q: QueueState) -> bool:
        """Receive queues need the device only when frames wait for buffers; their posted
        buffers alone are no work."""
        i = q.index
        if i < self.ctrl_index and i % 2 == 0:
            return bool(self.backlog[i // 2]) and not self.rx_starved[i // 2]
        return True

    def waits_for_kick(self, q: QueueState) -> bool:
        i = q.index
        return i < self.ctrl_index and i % 2 == 0 and self.rx_starved[i // 2]

    def kicked(self, q: QueueState) -> None:
        i = q.index
        if i < self.ctrl_index and i % 2 == 0:
            self.rx_starved[i // 2] = False

    def handle_queue(self, q: QueueState, ring: DeviceQueue) -> int:
        i = q.index
        if i == self.ctrl_index:
            return self._control(ring)
        if i % 2:
            return self._transmit(ring)
        return self._deliver(q, ring)

    def _transmit(self, ring: DeviceQueue) -> int:
        n = 0
        m = self.metrics
        csum_ok = self.negotiated(N.VIRTIO_NET_F_CSUM)
        while chains := ring.pop_batch(64):
            for chain in chains:
                if chain.rlen > self.hdr_len + TX_FRAME_MAX:
                    m.tx_dropped_oversize += 1       # refused unread
                    continue
                try:
                    (flags, _gso, _hl, _gs, cstart, coff, _nb), frame = read_tx(chain, self.hdr_len)
                except ValueError as e:
                    raise RingError(Reason.NET_HEADER_SHORT, str(e)) from None
                meta = None
                if flags & N.VIRTIO_NET_HDR_F_NEEDS_CSUM:
                    if not csum_ok:
                        self.guest_error("NEEDS_CSUM without VIRTIO_NET_F_CSUM")
                    meta = (flags, cstart, coff)
                if not self.link_up:
                    m.tx_dropped_link += 1
                elif len(frame) < N.ETH_HLEN:
                    m.tx_errors += 1
                else:
                    m.tx_frames += 1
                    m.tx_bytes += len(frame)
                    self.backend.send(frame, meta)
            ring.fill_batch(chains, [0] * len(chains))
            n += len(chains)
        return n

    # ---- receive ---------------------------------------------------------------------------------
    def receive(self, frame: bytes, meta: Meta) -> None:
        """A frame from the backend: filter, steer, and put it into guest buffers (or the
        backlog until the driver posts some)."""
        m = self.metrics
        if not self.link_up:
            m.rx_dropped_link += 1
            return
        if not self._accept(frame):
            m.rx_dropped_filter += 1
            return
        pair = self._steer(frame) if self.curr_pairs > 1 else 0
        backlog = self.backlog[pair]
        if len(backlog) >= BACKLOG:
            m.rx_dropped_no_buffer += 1
            return
        backlog.append((frame, meta))
        q = self.queues[N.rx_queue(pair)]
        ring = q.ring
        if ring is None or q.broken or self.broken or self.rx_starved[pair] or self.stalled:
            return                     # kept until the queue is set up, or has buffers
        try:
            n = self._deliver(q, ring)
        except RingError as e:
            self.virtio_error(f"queue {q.index}: {e}", q)
            return
        except Exception as e:  # a host bug: stop this device, not the sender's (as service)
            log.exception("%s: queue %d: internal error", self.name, q.index)
            self.virtio_error(f"queue {q.index}: internal device error: "
                              f"{type(e).__name__}: {e}", q)
            return
        if n and ring.need_notify() and self.transport is not None:
            self.transport.signal_used(q.index)

    def _accept(self, frame: bytes) -> bool:
        if len(frame) < N.ETH_HLEN:
            return False
        if self.promisc:
            return True
        dst = frame[0:6]
        if dst == N.BROADCAST or dst == self.mac:
            return True
        if N.is_multicast(dst):
            return self.allmulti or dst in self.multi_table
        return dst in self.uni_table

    def _steer(self, frame: bytes) -> int:
        """A queue pair per flow: the addresses and, for IPv4 TCP/UDP, the ports."""
        key = frame[0:14]
        if frame[12:14] == b"\x08\x00" and len(frame) >= 38:
            ihl = (frame[14] & 0xF) * 4
            key += frame[26:34] + frame[14 + ihl:14 + ihl + 4]
        return zlib.crc32(key) % self.curr_pairs    # the same pair in every run (not hash())

    def _deliver(self, q: QueueState, ring: DeviceQueue) -> int:
        """Move waiting frames into posted buffers; returns the buffers used."""
        used, starved = deliver_frames(
            ring, self.backlog[q.index // 2], self.hdr_len,
            self.negotiated(N.VIRTIO_NET_F_MRG_RXBUF),
            self.negotiated(N.VIRTIO_NET_F_GUEST_CSUM), self.metrics)
        if starved:
            self.rx_starved[q.index // 2] = True
        return used

    # ---- control queue ---------------------------------------------------------------------------
    def _control(self, ring: DeviceQueue) -> int:
        n = 0
        m = self.metrics
        while chains := ring.pop_batch(16):
            for chain in chains:
                if chain.wlen < 1 or chain.rlen < 2:
                    raise RingError(Reason.CONTROL_MALFORMED,
                                    f"control command of {chain.rlen} + {chain.wlen} bytes")
                data = chain.read_bytes(0, min(chain.rlen, CONTROL_MAX))
                m.ctrl_commands += 1
                try:
                    if chain.rlen > CONTROL_MAX:
                        raise BadCommand(f"{chain.rlen} bytes, longer than any command")
                    self._command(data[0], data[1], data[2:])
                    ack = N.VIRTIO_NET_OK
                except BadCommand as e:
                    m.ctrl_errors += 1
                    self.guest_error(f"control command {data[0]}/{data[1]}: {e}")
                    ack = N.VIRTIO_NET_ERR
                chain.write_at(chain.wlen - 1, bytes([ack]))
                ring.fill(chain, 1)
            ring.flush()
            n += len(chains)
        return n

    def _command(self, cls: int, cmd: int, data: bytes) -> None:
        if cls == N.VIRTIO_NET_CTRL_RX and self.negotiated(N.VIRTIO_NET_F_CTRL_RX):
            if len(data) != 1:
                raise BadCommand(f"RX mode takes 1 byte, got {len(data)}")
            if cmd == N.VIRTIO_NET_CTRL_RX_PROMISC:
                self.promisc = bool(data[0])
            elif cmd == N.VIRTIO_NET_CTRL_RX_ALLMULTI:
                self.allmulti = bool(data[0])
            else:
                raise BadCommand(f"unknown RX command {cmd}")
        elif cls == N.VIRTIO_NET_CTRL_MAC and cmd == N.VIRTIO_NET_CTRL_MAC_TABLE_SET \
                and self.negotiated(N.VIRTIO_NET_F_CTRL_RX):
            self.uni_table, self.multi_table = parse_mac_table(data)
        elif cls == N.VIRTIO_NET_CTRL_MAC and cmd == N.VIRTIO_NET_CTRL_MAC_ADDR_SET \
                and self.negotiated(N.VIRTIO_NET_F_CTRL_MAC_ADDR):
            if len(data) != 6:
                raise BadCommand(f"MAC address of {len(data)} bytes")
            self.mac = bytes(data)
        elif cls == N.VIRTIO_NET_CTRL_MQ and cmd == N.VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET \
                and self.negotiated(N.VIRTIO_NET_F_MQ):
            if len(data) != 2:
                raise BadCommand(f"VQ_PAIRS_SET takes 2 bytes, got {len(data)}")
            pairs = int.from_bytes(data, "little")
            if not 1 <= pairs <= self.max_pairs:
                raise BadCommand(f"{pairs} queue pairs, the device has 1 to {self.max_pairs}")
            self.curr_pairs = pairs
        else:
            raise BadCommand("unsupported or not negotiated")

    def describe(self) -> dict[str, Any]:
        return {"mac": N.format_mac(self.mac), "link_up": self.link_up,
                "promisc": self.promisc, "allmulti": self.allmulti,
                "mac_table": [N.format_mac(x) for x in self.uni_table + self.multi_table],
                "queue_pairs": self.curr_pairs, "max_queue_pairs": self.max_pairs,
                "mtu": self.mtu, "backend": self.backend.description,
                "backend_info": self.backend.describe(), "frames": self.metrics.as_dict()}

    def close(self) -> None:
        super().close()
        self.backend.close()
