"""What vhost-user fixes (QEMU docs/interop/vhost-user.rst, include/uapi/linux/vhost_types.h):
request numbers, header flags, feature bits and the payload layouts. No I/O, and nothing of
either side: a frontend and a backend both build and parse messages with it.

All numbers are in the machine's byte order (vhost-user's rule); vmsim runs on little-endian
hosts only (DESIGN.md), so the layouts below are written little-endian.
"""

import struct
from enum import IntEnum

# ---- header ------------------------------------------------------------------------------------
HEADER = struct.Struct("<III")          # request, flags, size
HEADER_SIZE = HEADER.size               # 12
VERSION = 0x1
VERSION_MASK = 0x3
FLAG_REPLY = 0x4
FLAG_NEED_REPLY = 0x8
KNOWN_FLAGS = VERSION_MASK | FLAG_REPLY | FLAG_NEED_REPLY

# Largest payload vmsim accepts: a memory table of 8 regions is 8 + 8 * 32 = 264 bytes, a
# config message 12 + 256 (the largest virtio config space). Anything larger is a bad message.
MAX_PAYLOAD = 0x1000
# Most fds one message carries (a memory table of 8 regions).
MAX_FDS = 8


class Req(IntEnum):
    """Frontend requests (the "front-end message types")."""
    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    CREATE_CRYPTO_SESSION = 26
    CLOSE_CRYPTO_SESSION = 27
    POSTCOPY_ADVISE = 28
    POSTCOPY_LISTEN = 29
    POSTCOPY_END = 30
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    GPU_SET_SOCKET = 33
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40


def req_name(n: int) -> str:
    try:
        return Req(n).name
    except ValueError:
        return f"request {n}"


# Requests whose reply is a payload of their own (REPLY_ACK adds nothing to them).
HAS_REPLY = frozenset({Req.GET_FEATURES, Req.GET_PROTOCOL_FEATURES, Req.GET_VRING_BASE,
                       Req.GET_QUEUE_NUM, Req.GET_CONFIG, Req.GET_MAX_MEM_SLOTS,
                       Req.GET_STATUS})

# ---- feature bits ------------------------------------------------------------------------------
# The virtio feature bit 30 (UNUSED / BAD_FEATURE to virtio) that vhost-user reuses.
VHOST_USER_F_PROTOCOL_FEATURES = 30
VHOST_F_LOG_ALL = 26


class ProtocolFeature(IntEnum):
    MQ = 0
    LOG_SHMFD = 1
    RARP = 2
    REPLY_ACK = 3
    MTU = 4
    BACKEND_REQ = 5
    CROSS_ENDIAN = 6
    CRYPTO_SESSION = 7
    PAGEFAULT = 8
    CONFIG = 9
    BACKEND_SEND_FD = 10
    HOST_NOTIFIER = 11
    INFLIGHT_SHMFD = 12
    RESET_DEVICE = 13
    INBAND_NOTIFICATIONS = 14
    CONFIGURE_MEM_SLOTS = 15
    STATUS = 16


def pbit(f: ProtocolFeature) -> int:
    return 1 << int(f)


# ---- payloads ----------------------------------------------------------------------------------
U64 = struct.Struct("<Q")
# struct vhost_vring_state { unsigned int index; unsigned int num; }
VRING_STATE = struct.Struct("<II")
# struct vhost_vring_addr { index, flags; u64 desc_user_addr, used_user_addr, avail_user_addr,
# log_guest_addr } - desc, used, avail in that order.
VRING_ADDR = struct.Struct("<IIQQQQ")
VHOST_VRING_F_LOG = 0
# A vring fd message (KICK / CALL / ERR): u64, bits 0-7 the index, bit 8 "no fd".
VRING_IDX_MASK = 0xFF
VRING_NOFD_MASK = 1 << 8
# struct VhostUserMemoryRegion { guest_phys_addr, memory_size, userspace_addr, mmap_offset }
MEM_REGION = struct.Struct("<QQQQ")
# VhostUserMemory { u32 nregions; u32 padding; regions[8] }
MEM_TABLE_HEADER = struct.Struct("<II")
MAX_MEM_REGIONS = 8           # VHOST_MEMORY_BASELINE_NREGIONS: regions in one SET_MEM_TABLE
# VhostUserMemRegMsg { u64 padding; region }
SINGLE_REGION = struct.Struct("<QQQQQ")
# VhostUserConfig { u32 offset; u32 size; u32 flags; u8 region[size] }
CONFIG_HEADER = struct.Struct("<III")
CONFIG_FLAG_WRITABLE = 0
CONFIG_FLAG_MIGRATION = 1
MAX_CONFIG_SIZE = 256

# Packed rings: a ring's base is "index | wrap << 15"; QEMU puts the used side's the same way
# in the upper 16 bits (virtio_queue_packed_get_last_avail_idx).
PACKED_WRAP_BIT = 15


class MemRegion:
    """One memory region as the frontend describes it."""

    __slots__ = ("gpa", "mmap_offset", "size", "uva")

    def __init__(self, gpa: int, size: int, uva: int, mmap_offset: int) -> None:
        self.gpa = gpa
        self.size = size
        self.uva = uva
        self.mmap_offset = mmap_offset

    def pack(self) -> bytes:
        return MEM_REGION.pack(self.gpa, self.size, self.uva, self.mmap_offset)

    def __repr__(self) -> str:
        return (f"MemRegion(gpa=0x{self.gpa:x}, size=0x{self.size:x}, uva=0x{self.uva:x}, "
                f"offset=0x{self.mmap_offset:x})")


class PayloadError(ValueError):
    """A payload of the wrong size or content for its request."""


def _need(payload: bytes, n: int, what: str) -> None:
    if len(payload) < n:
        raise PayloadError(f"{what}: payload of {len(payload)} bytes, expected {n}")


def encode_u64(v: int) -> bytes:
    return U64.pack(v)


def decode_u64(payload: bytes) -> int:
    _need(payload, U64.size, "u64")
    return U64.unpack_from(payload)[0]


def encode_state(index: int, num: int) -> bytes:
    return VRING_STATE.pack(index, num)


def decode_state(payload: bytes) -> tuple[int, int]:
    _need(payload, VRING_STATE.size, "vring state")
    return VRING_STATE.unpack_from(payload)


def encode_addr(index: int, flags: int, desc: int, used: int, avail: int, log: int = 0) -> bytes:
    return VRING_ADDR.pack(index, flags, desc, used, avail, log)


def decode_addr(payload: bytes) -> tuple[int, int, int, int, int, int]:
    """(index, flags, desc, used, avail, log)."""
    _need(payload, VRING_ADDR.size, "vring address")
    return VRING_ADDR.unpack_from(payload)


def encode_mem_table(regions: list[MemRegion]) -> bytes:
    if len(regions) > MAX_MEM_REGIONS:
        raise PayloadError(f"{len(regions)} regions, at most {MAX_MEM_REGIONS}")
    body = b"".join(r.pack() for r in regions)
    # QEMU always sends the whole array (8 slots); so does vmsim
    return MEM_TABLE_HEADER.pack(len(regions), 0) + body.ljust(
        MAX_MEM_REGIONS * MEM_REGION.size, b"\0")


def decode_mem_table(payload: bytes) -> list[MemRegion]:
    _need(payload, MEM_TABLE_HEADER.size, "memory table")
    n, _ = MEM_TABLE_HEADER.unpack_from(payload)
    if n > MAX_MEM_REGIONS:
        raise PayloadError(f"memory table of {n} regions, at most {MAX_MEM_REGIONS}")
    _need(payload, MEM_TABLE_HEADER.size + n * MEM_REGION.size, f"memory table of {n} regions")
    return [MemRegion(*MEM_REGION.unpack_from(payload, MEM_TABLE_HEADER.size
                                              + k * MEM_REGION.size)) for k in range(n)]


def encode_single_region(r: MemRegion) -> bytes:
    return U64.pack(0) + r.pack()


def decode_single_region(payload: bytes) -> MemRegion:
    _need(payload, SINGLE_REGION.size, "memory region")
    return MemRegion(*SINGLE_REGION.unpack_from(payload)[1:])


def encode_config(offset: int, flags: int, data: bytes) -> bytes:
    return CONFIG_HEADER.pack(offset, len(data), flags) + data


def decode_config(payload: bytes) -> tuple[int, int, int, bytes]:
    """(offset, size, flags, data). `data` is what follows the header (GET_CONFIG sends
    `size` bytes of room; SET_CONFIG the new bytes)."""
    _need(payload, CONFIG_HEADER.size, "config")
    offset, size, flags = CONFIG_HEADER.unpack_from(payload)
    data = bytes(payload[CONFIG_HEADER.size:])
    if size > MAX_CONFIG_SIZE or offset > MAX_CONFIG_SIZE or len(data) != size:
        raise PayloadError(f"config: offset {offset} size {size} with {len(data)} bytes")
    return offset, size, flags, data


def packed_base(avail_idx: int, avail_wrap: int, used_idx: int, used_wrap: int) -> int:
    """A packed ring's base as GET_VRING_BASE reports it."""
    return (avail_idx | avail_wrap << PACKED_WRAP_BIT
            | (used_idx | used_wrap << PACKED_WRAP_BIT) << 16)


def split_packed_base(num: int) -> tuple[int, int, int, int]:
    """(avail_idx, avail_wrap, used_idx, used_wrap) of a SET_VRING_BASE on a packed ring.
    A frontend that sends only the lower half (DPDK, the spec's text) starts the used side
    where the avail side is: nothing is in flight when a ring starts."""
    avail = num & 0xFFFF
    used = num >> 16 & 0xFFFF or avail
    return (avail & 0x7FFF, avail >> PACKED_WRAP_BIT & 1,
            used & 0x7FFF, used >> PACKED_WRAP_BIT & 1)


# ---- IOTLB (VIRTIO_F_IOMMU_PLATFORM, the spec's VIRTIO_F_ACCESS_PLATFORM) ------------------------
class BackendReq(IntEnum):
    """Back-end requests, sent on the channel SET_BACKEND_REQ_FD gave (previously "slave")."""
    IOTLB_MSG = 1
    CONFIG_CHANGE_MSG = 2
    VRING_HOST_NOTIFIER_MSG = 3
    VRING_CALL = 4
    VRING_ERR = 5


# struct vhost_iotlb_msg { u64 iova; u64 size; u64 uaddr; u8 perm; u8 type; } - 26 bytes of
# fields, 32 with the C struct's tail padding (what QEMU and DPDK send).
IOTLB = struct.Struct("<QQQBB")
IOTLB_WIRE_SIZE = 32
VHOST_ACCESS_RO = 0x1
VHOST_ACCESS_WO = 0x2
VHOST_ACCESS_RW = 0x3
VHOST_IOTLB_MISS = 1
VHOST_IOTLB_UPDATE = 2
VHOST_IOTLB_INVALIDATE = 3
VHOST_IOTLB_ACCESS_FAIL = 4
VHOST_IOTLB_BATCH_BEGIN = 5
VHOST_IOTLB_BATCH_END = 6
IOTLB_TYPE_NAMES = {VHOST_IOTLB_MISS: "MISS", VHOST_IOTLB_UPDATE: "UPDATE",
                    VHOST_IOTLB_INVALIDATE: "INVALIDATE", VHOST_IOTLB_ACCESS_FAIL: "ACCESS_FAIL",
                    VHOST_IOTLB_BATCH_BEGIN: "BATCH_BEGIN", VHOST_IOTLB_BATCH_END: "BATCH_END"}


def encode_iotlb(iova: int, size: int, uaddr: int, perm: int, typ: int) -> bytes:
    return IOTLB.pack(iova, size, uaddr, perm, typ).ljust(IOTLB_WIRE_SIZE, b"\0")


def decode_iotlb(payload: bytes) -> tuple[int, int, int, int, int]:
    """(iova, size, uaddr, perm, type)."""
    _need(payload, IOTLB.size, "vhost_iotlb_msg")
    return IOTLB.unpack_from(payload)
