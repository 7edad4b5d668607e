"""The split virtqueue layout (virtio spec 2.7, include/uapi/linux/virtio_ring.h).

    struct vring_desc  { le64 addr; le32 len; le16 flags; le16 next; }     16 bytes, align 16
    struct vring_avail { le16 flags; le16 idx; le16 ring[num]; le16 used_event; }   align 2
    struct vring_used  { le16 flags; le16 idx; {le32 id; le32 len} ring[num];
                         le16 avail_event; }                                         align 4

Offsets here are in bytes from the start of each area. Accessors on both sides address the
fields as elements of memoryview casts ('H', 'I', 'Q'), so the helpers below also give the
element indices of those casts.
"""

import struct

# struct vring_desc. Safe to read and write whole with struct only while the other side cannot
# be looking at it: before avail->idx publishes it (driver), after it was published (device).
DESC = struct.Struct("<QIHH")
DESC_SIZE = 16
USED_ELEM_SIZE = 8

DESC_ALIGN = 16
AVAIL_ALIGN = 2
USED_ALIGN = 4
# Legacy interfaces place the used ring on the next 4096-byte boundary (VIRTIO_PCI_VRING_ALIGN).
LEGACY_VRING_ALIGN = 4096

MAX_QUEUE_SIZE = 32768

# vring_desc.flags
VRING_DESC_F_NEXT = 1
VRING_DESC_F_WRITE = 2
VRING_DESC_F_INDIRECT = 4

# avail.flags / used.flags
VRING_AVAIL_F_NO_INTERRUPT = 1
VRING_USED_F_NO_NOTIFY = 1

# The split ring's index fields are free-running 16-bit counters.
IDX_MASK = 0xFFFF


def desc_table_size(num: int) -> int:
    return DESC_SIZE * num


def avail_size(num: int) -> int:
    """flags + idx + ring[num] + used_event."""
    return 2 * (3 + num)


def used_size(num: int) -> int:
    """flags + idx + ring[num] + avail_event."""
    return 4 + USED_ELEM_SIZE * num + 2


def vring_size(num: int, align: int = USED_ALIGN) -> int:
    """Bytes of a contiguous legacy-style vring (desc, avail, then used at `align`)."""
    used_off = align_up(desc_table_size(num) + avail_size(num), align)
    return used_off + used_size(num)


def used_offset_in_vring(num: int, align: int = USED_ALIGN) -> int:
    """Byte offset of the used ring in a contiguous vring of `num` entries."""
    return align_up(desc_table_size(num) + avail_size(num), align)


def align_up(value: int, align: int) -> int:
    return (value + align - 1) & ~(align - 1)


def is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


# Element indices into an 'H' (u16) view of the avail area.
AVAIL_H_FLAGS = 0
AVAIL_H_IDX = 1
AVAIL_H_RING = 2            # ring[i] is element 2 + i


def avail_h_used_event(num: int) -> int:
    """Element index of used_event (vring_used_event) in an 'H' view of the avail area."""
    return 2 + num


# Element indices into an 'H' view of the used area (flags, idx) and an 'I' view (ring).
USED_H_FLAGS = 0
USED_H_IDX = 1


def used_i_id(i: int) -> int:
    """Element index of used.ring[i].id in an 'I' (u32) view of the used area."""
    return 1 + 2 * i


def used_h_avail_event(num: int) -> int:
    """Element index of avail_event (vring_avail_event) in an 'H' view of the used area."""
    return (4 + USED_ELEM_SIZE * num) // 2


def vring_need_event(event_idx: int, new_idx: int, old: int) -> bool:
    """Whether moving an index from `old` to `new_idx` crosses `event_idx` (virtio_ring.h).

    The notification is needed when event_idx lies in [old, new_idx) modulo 2**16."""
    return ((new_idx - event_idx - 1) & IDX_MASK) < ((new_idx - old) & IDX_MASK)
