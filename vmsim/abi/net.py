"""virtio-net (include/uapi/linux/virtio_net.h, virtio spec 5.1)."""

import struct

# Feature bits
VIRTIO_NET_F_CSUM = 0
VIRTIO_NET_F_GUEST_CSUM = 1
VIRTIO_NET_F_CTRL_GUEST_OFFLOADS = 2
VIRTIO_NET_F_MTU = 3
VIRTIO_NET_F_MAC = 5
VIRTIO_NET_F_GUEST_TSO4 = 7
VIRTIO_NET_F_GUEST_TSO6 = 8
VIRTIO_NET_F_GUEST_ECN = 9
VIRTIO_NET_F_GUEST_UFO = 10
VIRTIO_NET_F_HOST_TSO4 = 11
VIRTIO_NET_F_HOST_TSO6 = 12
VIRTIO_NET_F_HOST_ECN = 13
VIRTIO_NET_F_HOST_UFO = 14
VIRTIO_NET_F_MRG_RXBUF = 15
VIRTIO_NET_F_STATUS = 16
VIRTIO_NET_F_CTRL_VQ = 17
VIRTIO_NET_F_CTRL_RX = 18
VIRTIO_NET_F_CTRL_VLAN = 19
VIRTIO_NET_F_CTRL_RX_EXTRA = 20
VIRTIO_NET_F_GUEST_ANNOUNCE = 21
VIRTIO_NET_F_MQ = 22
VIRTIO_NET_F_CTRL_MAC_ADDR = 23

FEATURE_NAMES = {
    VIRTIO_NET_F_CSUM: "CSUM", VIRTIO_NET_F_GUEST_CSUM: "GUEST_CSUM",
    VIRTIO_NET_F_CTRL_GUEST_OFFLOADS: "CTRL_GUEST_OFFLOADS", VIRTIO_NET_F_MTU: "MTU",
    VIRTIO_NET_F_MAC: "MAC", VIRTIO_NET_F_GUEST_TSO4: "GUEST_TSO4",
    VIRTIO_NET_F_GUEST_TSO6: "GUEST_TSO6", VIRTIO_NET_F_GUEST_ECN: "GUEST_ECN",
    VIRTIO_NET_F_GUEST_UFO: "GUEST_UFO", VIRTIO_NET_F_HOST_TSO4: "HOST_TSO4",
    VIRTIO_NET_F_HOST_TSO6: "HOST_TSO6", VIRTIO_NET_F_HOST_ECN: "HOST_ECN",
    VIRTIO_NET_F_HOST_UFO: "HOST_UFO", VIRTIO_NET_F_MRG_RXBUF: "MRG_RXBUF",
    VIRTIO_NET_F_STATUS: "STATUS", VIRTIO_NET_F_CTRL_VQ: "CTRL_VQ",
    VIRTIO_NET_F_CTRL_RX: "CTRL_RX", VIRTIO_NET_F_CTRL_VLAN: "CTRL_VLAN",
    VIRTIO_NET_F_CTRL_RX_EXTRA: "CTRL_RX_EXTRA", VIRTIO_NET_F_GUEST_ANNOUNCE: "GUEST_ANNOUNCE",
    VIRTIO_NET_F_MQ: "MQ", VIRTIO_NET_F_CTRL_MAC_ADDR: "CTRL_MAC_ADDR",
}

# struct virtio_net_config: byte offsets
CFG_MAC = 0                 # u8[6]
CFG_STATUS = 6              # le16
CFG_MAX_VIRTQUEUE_PAIRS = 8  # le16
CFG_MTU = 10                # le16
CONFIG_SIZE = 12

VIRTIO_NET_S_LINK_UP = 1
VIRTIO_NET_S_ANNOUNCE = 2

# struct virtio_net_hdr_v1 (12 bytes with VERSION_1 or MRG_RXBUF: num_buffers included)
HDR = struct.Struct("<BBHHHHH")   # flags, gso_type, hdr_len, gso_size, csum_start,
HDR_SIZE = HDR.size               # csum_offset, num_buffers
# The legacy struct virtio_net_hdr (no num_buffers): what a driver without VERSION_1 and
# without MRG_RXBUF puts before each packet (spec 5.1.6, legacy interface).
HDR_LEGACY_SIZE = 10


def hdr_size(features: int) -> int:
    """Bytes of the header before each packet, as negotiated."""
    if features >> 32 & 1 or features >> VIRTIO_NET_F_MRG_RXBUF & 1:   # VERSION_1 is bit 32
        return HDR_SIZE
    return HDR_LEGACY_SIZE
VIRTIO_NET_HDR_F_NEEDS_CSUM = 1
VIRTIO_NET_HDR_F_DATA_VALID = 2
VIRTIO_NET_HDR_F_RSC_INFO = 4
VIRTIO_NET_HDR_GSO_NONE = 0
VIRTIO_NET_HDR_GSO_TCPV4 = 1
VIRTIO_NET_HDR_GSO_UDP = 3
VIRTIO_NET_HDR_GSO_TCPV6 = 4
VIRTIO_NET_HDR_GSO_ECN = 0x80

# control virtqueue: struct virtio_net_ctrl_hdr {u8 class; u8 cmd;}, data, u8 ack
VIRTIO_NET_CTRL_RX = 0
VIRTIO_NET_CTRL_RX_PROMISC = 0
VIRTIO_NET_CTRL_RX_ALLMULTI = 1
VIRTIO_NET_CTRL_MAC = 1
VIRTIO_NET_CTRL_MAC_TABLE_SET = 0
VIRTIO_NET_CTRL_MAC_ADDR_SET = 1
VIRTIO_NET_CTRL_MQ = 4
VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET = 0
VIRTIO_NET_CTRL_MQ_VQ_PAIRS_MIN = 1
VIRTIO_NET_CTRL_MQ_VQ_PAIRS_MAX = 0x8000
VIRTIO_NET_OK = 0
VIRTIO_NET_ERR = 1

ETH_ALEN = 6
ETH_HLEN = 14
ETH_DATA_LEN = 1500
ETH_FRAME_LEN = 1514
GOOD_PACKET_LEN = ETH_HLEN + 4 + ETH_DATA_LEN   # Linux: ETH_HLEN + VLAN_HLEN + ETH_DATA_LEN
BROADCAST = b"\xff" * 6


def rx_queue(pair: int) -> int:
    """receiveqN is virtqueue 2N."""
    return 2 * pair


def tx_queue(pair: int) -> int:
    """transmitqN is virtqueue 2N+1."""
    return 2 * pair + 1


def ctrl_queue(max_pairs: int) -> int:
    """The control queue follows the last pair (with VIRTIO_NET_F_MQ: 2*max_pairs)."""
    return 2 * max_pairs


def is_multicast(mac: bytes) -> bool:
    return bool(mac[0] & 1)


def format_mac(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


def parse_mac(text: str) -> bytes:
    parts = text.split(":")
    if len(parts) != 6:
        raise ValueError(f"expected a MAC address such as 52:54:00:12:34:56, got {text!r}")
    return bytes(int(p, 16) for p in parts)


def internet_checksum(data: bytes | memoryview, initial: int = 0) -> int:
    """The 16-bit ones' complement sum of RFC 1071, folded and complemented."""
    if len(data) % 2:
        data = bytes(data) + b"\0"
    total = initial + sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF
