"""The frames vmsim's network workloads exchange.

Test frames use EtherType 0x88B5 (IEEE 802 local experimental):

    dst(6) src(6) type(2) | kind u8 | flow u8 | pad u16 | seq u32 | time_ns u64 |
    payload crc32 u32 | payload

With checksum offload a stream frame is IPv4/UDP instead (the same header in the UDP payload)
and its UDP checksum is left partial for the device (VIRTIO_NET_HDR_F_NEEDS_CSUM). The IP
responder speaks ARP and ICMP echo (IPv4) so that a real `ping` reaches a guest.
"""

import struct
import zlib

from vmsim.abi import net as N

ETH_P_VMSIM = 0x88B5
ETH_P_IP = 0x0800
ETH_P_ARP = 0x0806
ETH = struct.Struct("!6s6sH")
TEST = struct.Struct("!BBHIQI")      # kind, flow, pad, seq, time_ns, crc
KIND_ECHO_REQUEST = 1
KIND_ECHO_REPLY = 2
KIND_STREAM = 3
KIND_ACK = 4
KIND_SCENARIO = 5          # single frames a scenario sends; no workload answers them
TEST_HLEN = N.ETH_HLEN + TEST.size
IP = struct.Struct("!BBHHHBBH4s4s")
UDP = struct.Struct("!HHHH")
UDP_PORT = 47000
IP_HLEN = 20
UDP_HLEN = 8


def test_frame(dst: bytes, src: bytes, kind: int, flow: int, seq: int, time_ns: int,
               payload: bytes) -> bytes:
    return (ETH.pack(dst, src, ETH_P_VMSIM)
            + TEST.pack(kind, flow & 0xFF, 0, seq & 0xFFFFFFFF, time_ns, zlib.crc32(payload))
            + payload)


def parse_test(frame: bytes, offset: int = N.ETH_HLEN) -> tuple[int, int, int, int, bool,
                                                               bytes]:
    """(kind, flow, seq, time_ns, payload intact, payload)."""
    kind, flow, _pad, seq, t, crc = TEST.unpack_from(frame, offset)
    payload = frame[offset + TEST.size:]
    return kind, flow, seq, t, zlib.crc32(payload) == crc, payload


def ip_checksum(header: bytes) -> int:
    return N.internet_checksum(header)


def udp_stream_frame(dst: bytes, src: bytes, src_ip: bytes, dst_ip: bytes, flow: int,
                     seq: int, time_ns: int, payload: bytes) -> tuple[bytes, int, int]:
    """An IPv4/UDP frame carrying a stream header, its UDP checksum left partial: the
    pseudo-header sum in the checksum field, for the device to complete. Returns (frame,
    csum_start, csum_offset)."""
    body = TEST.pack(KIND_STREAM, flow & 0xFF, 0, seq & 0xFFFFFFFF, time_ns,
                     zlib.crc32(payload)) + payload
    ulen = UDP_HLEN + len(body)
    ip = bytearray(IP.pack(0x45, 0, IP_HLEN + ulen, seq & 0xFFFF, 0, 64, 17, 0, src_ip, dst_ip))
    struct.pack_into("!H", ip, 10, ip_checksum(bytes(ip)))
    pseudo = src_ip + dst_ip + struct.pack("!BBH", 0, 17, ulen)
    partial = ~N.internet_checksum(pseudo) & 0xFFFF    # the folded sum, not complemented
    udp = UDP.pack(UDP_PORT + (flow & 0xFF), UDP_PORT, ulen, partial)
    frame = ETH.pack(dst, src, ETH_P_IP) + bytes(ip) + udp + body
    return frame, N.ETH_HLEN + IP_HLEN, 6


def udp_checksum_ok(frame: bytes) -> bool:
    """Verify a received IPv4/UDP frame's UDP checksum (0 means none)."""
    ip = frame[N.ETH_HLEN:N.ETH_HLEN + IP_HLEN]
    src, dst = ip[12:16], ip[16:20]
    udp = frame[N.ETH_HLEN + IP_HLEN:]
    (ulen,) = struct.unpack_from("!H", udp, 4)
    (csum,) = struct.unpack_from("!H", udp, 6)
    if csum == 0:
        return True
    pseudo = src + dst + struct.pack("!BBH", 0, 17, ulen)
    return N.internet_checksum(pseudo + bytes(udp[:ulen])) == 0


def complete_partial(frame: bytes, start: int, offset: int) -> bytes:
    """What the network stack does with CHECKSUM_PARTIAL before checking it."""
    buf = bytearray(frame)
    partial = struct.unpack_from("!H", buf, start + offset)[0]
    buf[start + offset:start + offset + 2] = b"\0\0"
    csum = N.internet_checksum(bytes(buf[start:]), partial)
    struct.pack_into("!H", buf, start + offset, csum or 0xFFFF)
    return bytes(buf)
