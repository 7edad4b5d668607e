"""What one virtio-net chain carries, on each queue: a frame to transmit (header + frame), a
receive buffer to fill, a control command (class, command, data, ack byte). The functions
here parse and fill chains; the device decides what happens to the frames."""

import struct
from collections import deque

from vmsim.abi import net as N
from vmsim.host.devices.net.metrics import NetMetrics
from vmsim.host.virtio.chain import DescChain
from vmsim.host.virtio.errors import Reason, RingError
from vmsim.host.virtio.queue import DeviceQueue

# The largest frame a driver can ask the device to send: a 64 KiB (GSO) packet with its
# Ethernet and VLAN headers. A transmit buffer longer than the header and this is refused
# before a byte of it is read: a chain may name up to 4 GiB of guest RAM.
TX_FRAME_MAX = 65535 + N.ETH_HLEN + 4
# The longest control command: class, command and two MAC tables of 1024 entries each
# (parse_mac_table's limit). A longer one is refused unread.
CONTROL_MAX = 2 + 2 * (4 + 6 * 1024)


class BadCommand(Exception):
    """A control command the device answers with VIRTIO_NET_ERR."""


def read_tx(chain: DescChain, hdr_len: int = N.HDR_SIZE
            ) -> tuple[tuple[int, int, int, int, int, int, int], bytes]:
    """The virtio-net header (hdr_len bytes: 12, or the legacy 10 without num_buffers) and
    the frame of a transmit chain (the driver may split them over descriptors any way it
    likes); the caller has checked rlen against TX_FRAME_MAX."""
    data = chain.read_bytes(0, chain.rlen)
    if len(data) < hdr_len:
        raise ValueError(f"a transmit buffer of {len(data)} bytes has no room for the "
                         f"{hdr_len}-byte header")
    if hdr_len < N.HDR_SIZE:
        return N.HDR.unpack(data[:hdr_len] + b"\1\0"), data[hdr_len:]
    return N.HDR.unpack_from(data), data[hdr_len:]


def complete_checksum(frame: bytes, start: int, offset: int) -> bytes:
    """Finish a partial checksum (VIRTIO_NET_HDR_F_NEEDS_CSUM): the driver put the
    pseudo-header sum at start+offset; fold the rest of the packet into it."""
    if start + offset + 2 > len(frame) or start >= len(frame):
        raise ValueError(f"csum_start {start} + csum_offset {offset} is past the "
                         f"{len(frame)}-byte frame")
    buf = bytearray(frame)
    partial = struct.unpack_from("!H", buf, start + offset)[0]
    buf[start + offset:start + offset + 2] = b"\0\0"
    csum = N.internet_checksum(bytes(buf[start:]), partial)
    struct.pack_into("!H", buf, start + offset, csum if csum else 0xFFFF)
    return bytes(buf)


def rx_header(meta: tuple[int, int, int] | None, guest_csum: bool,
              num_buffers: int) -> bytes:
    """The header a received frame carries: a partial checksum is passed on when the driver
    accepts it (VIRTIO_NET_F_GUEST_CSUM)."""
    if meta is not None and guest_csum:
        return N.HDR.pack(N.VIRTIO_NET_HDR_F_NEEDS_CSUM, N.VIRTIO_NET_HDR_GSO_NONE, 0, 0,
                          meta[1], meta[2], num_buffers)
    return N.HDR.pack(0, N.VIRTIO_NET_HDR_GSO_NONE, 0, 0, 0, 0, num_buffers)


def parse_mac_table(data: bytes) -> tuple[list[bytes], list[bytes]]:
    """VIRTIO_NET_CTRL_MAC_TABLE_SET: two struct virtio_net_ctrl_mac {le32 entries;
    u8 macs[entries][6];}, unicast then multicast."""
    tables: list[list[bytes]] = []
    off = 0
    for _ in range(2):
        if off + 4 > len(data):
            raise BadCommand("MAC table shorter than its entry count")
        (n,) = struct.unpack_from("<I", data, off)
        off += 4
        if n > 1024 or off + 6 * n > len(data):
            raise BadCommand(f"MAC table of {n} entries does not fit the command")
        tables.append([bytes(data[off + 6 * i:off + 6 * i + 6]) for i in range(n)])
        off += 6 * n
    if off != len(data):
        raise BadCommand(f"{len(data) - off} bytes after the MAC tables")
    return tables[0], tables[1]


def deliver_frames(ring: DeviceQueue, backlog: deque, hdr_len: int, mergeable: bool,
                   guest_csum: bool, m: NetMetrics) -> tuple[int, bool]:
    """Move waiting frames into posted receive buffers (several per frame with MRG_RXBUF),
    shared by the in-process device and `vmsim backend net`; (buffers used, starved: a frame
    found too little room and waits for the driver's kick)."""
    used = 0
    while backlog:
        frame, meta = backlog[0]
        if meta is not None and not guest_csum:
            # The driver cannot take a partial checksum: complete it here.
            try:
                frame = complete_checksum(frame, meta[1], meta[2])
                m.csum_completed += 1
            except ValueError:
                m.rx_dropped_filter += 1
                backlog.popleft()
                continue
            meta = None
        need = hdr_len + len(frame)
        mark = ring.mark()
        chains = []
        room = 0
        while room < need:
            got = ring.pop_batch(1)
            if not got:
                break
            c = got[0]
            # QEMU: "receive queue contains no in buffers"; with MRG_RXBUF each buffer
            # must hold at least the header (a driver requirement, spec 5.1.6.3.1).
            if not c.wlen:
                raise RingError(Reason.WRONG_DIRECTION,
                                f"receive buffer {c.head} has no device-writable byte")
            if mergeable and c.wlen < hdr_len:
                raise RingError(Reason.NET_HEADER_SHORT,
                                f"a mergeable receive buffer of {c.wlen} bytes")
            chains.append(c)
            room += c.wlen
            if not mergeable:
                break
        if room < need:
            ring.rewind(mark, chains)
            if chains and not mergeable:
                # One buffer is all a frame may take without MRG_RXBUF.
                m.rx_dropped_too_big += 1
                backlog.popleft()
                continue
            if ring.wait_for_more():
                continue                       # more were posted meanwhile: try again
            m.rx_starved += 1
            return used, True
        backlog.popleft()
        data = rx_header(meta, guest_csum, len(chains))[:hdr_len] + frame
        done = 0
        written = []
        for chain in chains:
            n = chain.write_at(0, data[done:done + chain.wlen])
            written.append(n)
            done += n
        ring.fill_batch(chains, written)
        used += len(chains)
        m.rx_frames += 1
        m.rx_bytes += len(frame)
        if len(chains) > 1:
            m.rx_merged_buffers += len(chains)
    return used, False
