"""The packed virtqueue layout (virtio spec 2.8, include/uapi/linux/virtio_ring.h).

    struct vring_packed_desc       { le64 addr; le32 len; le16 id; le16 flags; }  16 bytes
    struct vring_packed_desc_event { le16 off_wrap; le16 flags; }                 4 bytes

One ring of `num` descriptors (align 16, any num up to 32768), a driver event suppression area
(written by the driver, read by the device: controls used-buffer notifications) and a device
event suppression area (written by the device, read by the driver: controls kicks), each
align 4. A descriptor is available when its AVAIL bit equals the driver's wrap counter and its
USED bit does not; used when both equal the device's wrap counter.

The flags word is the one field the other side polls: it is written last, with a single
native 16-bit store (element 8i+7 of an 'H' view of the ring); the rest of a descriptor may be
written with struct before it.
"""

import struct

DESC = struct.Struct("<QIHH")          # addr, len, id, flags
DESC_SIZE = 16
DESC_ALIGN = 16
EVENT_SIZE = 4
EVENT_ALIGN = 4

MAX_QUEUE_SIZE = 32768

# descriptor flags (the low three as in the split ring)
VRING_DESC_F_NEXT = 1
VRING_DESC_F_WRITE = 2
VRING_DESC_F_INDIRECT = 4
VRING_PACKED_DESC_F_AVAIL = 7          # bit numbers
VRING_PACKED_DESC_F_USED = 15
F_AVAIL = 1 << VRING_PACKED_DESC_F_AVAIL
F_USED = 1 << VRING_PACKED_DESC_F_USED

# event suppression flags
VRING_PACKED_EVENT_FLAG_ENABLE = 0x0
VRING_PACKED_EVENT_FLAG_DISABLE = 0x1
VRING_PACKED_EVENT_FLAG_DESC = 0x2     # only with VIRTIO_RING_F_EVENT_IDX
VRING_PACKED_EVENT_F_WRAP_CTR = 15     # off_wrap: offset in bits 0..14, wrap counter bit 15

# Element indices in an 'H' (u16) view of the ring / of an event area.
def desc_h_flags(i: int) -> int:
    """Element index of desc[i].flags in an 'H' view of the ring."""
    return 8 * i + 7


def desc_h_id(i: int) -> int:
    return 8 * i + 6


EVENT_H_OFF_WRAP = 0
EVENT_H_FLAGS = 1


def ring_size(num: int) -> int:
    return DESC_SIZE * num


def avail_flags(wrap: int) -> int:
    """AVAIL/USED bits of a descriptor made available with driver wrap counter `wrap`."""
    return F_AVAIL if wrap else F_USED


def used_flags(wrap: int) -> int:
    """AVAIL/USED bits of a descriptor marked used with device wrap counter `wrap`."""
    return F_AVAIL | F_USED if wrap else 0


def is_avail(flags: int, wrap: int) -> bool:
    """Made available in the lap of driver wrap counter `wrap`."""
    return bool(flags & F_AVAIL) == bool(wrap) and bool(flags & F_USED) != bool(wrap)


def is_used(flags: int, wrap: int) -> bool:
    """Marked used in the lap of device wrap counter `wrap`."""
    return bool(flags & F_AVAIL) == bool(flags & F_USED) == bool(wrap)


def off_wrap(offset: int, wrap: int) -> int:
    return offset | (wrap & 1) << VRING_PACKED_EVENT_F_WRAP_CTR


def event_idx(off_wrap_value: int, wrap: int, num: int) -> int:
    """The event offset as a free-running position for vring_need_event: an event in the
    other lap than `wrap` is taken as `num` earlier (Linux's kick_prepare_packed, QEMU's
    vring_packed_need_event)."""
    off = off_wrap_value & ~(1 << VRING_PACKED_EVENT_F_WRAP_CTR)
    if (off_wrap_value >> VRING_PACKED_EVENT_F_WRAP_CTR) != (wrap & 1):
        off -= num
    return off & 0xFFFF
