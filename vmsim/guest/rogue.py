"""A rogue driver: writes one malformed item into a live queue's ring, bypassing the virtqueue
API, and notifies the device, so a scenario can check that the device rejects it as the spec
says (DEVICE_NEEDS_RESET, the queue broken) and that nothing else suffers.

Each corruption publishes one bad buffer the way a buggy driver would: a descriptor (or an
avail ring entry, or the avail index itself) is written with plain stores, then the index is
advanced and the device notified. The driver's own bookkeeping is left alone: the queue is
expected to break, and recovery is a reset (freeze and restore) of the device.
"""

from __future__ import annotations

from typing import Any

from vmsim.abi import packed_ring as P
from vmsim.abi import split_ring as R
from vmsim.guest.virtio.virtqueue import Virtqueue

# Outside any guest RAM this simulator maps (RAM sits low in the guest-physical space).
FAR_AWAY = 0xFFFF_FFFF_FFFF_F000

SPLIT_CORRUPTIONS = ("avail_idx_ahead", "head_out_of_range", "next_out_of_range", "chain_loop",
                     "addr_outside_ram", "addr_overflow", "zero_length", "indirect_with_next",
                     "indirect_bad_length", "readable_after_writable")
PACKED_CORRUPTIONS = ("bad_id", "addr_outside_ram", "zero_length", "indirect_with_next",
                      "indirect_bad_length")


class RogueError(Exception):
    pass


def corrupt(vq: Virtqueue, what: str, scratch_gpa: int) -> str:
    """Write corruption `what` into vq's ring and notify; a description of what was written.
    `scratch_gpa` is 4 KiB of guest RAM the bad descriptors may point at (valid memory, so the
    one fault is the one named)."""
    if vq.ring == "packed":
        if what not in PACKED_CORRUPTIONS:
            raise RogueError(f"packed rings: corruption {what!r} unknown "
                             f"(one of {', '.join(PACKED_CORRUPTIONS)})")
        text = _packed(vq, what, scratch_gpa)
    else:
        if what not in SPLIT_CORRUPTIONS:
            raise RogueError(f"split rings: corruption {what!r} unknown "
                             f"(one of {', '.join(SPLIT_CORRUPTIONS)})")
        text = _split(vq, what, scratch_gpa)
    vq.notify()
    return text


def _split(vq: Any, what: str, gpa: int) -> str:
    num = vq.num
    shadow = vq.avail_idx_shadow
    avail = vq.avail_h
    desc = vq.desc_mv
    if what == "avail_idx_ahead":
        bad = (shadow + num + 1) & R.IDX_MASK
        avail[R.AVAIL_H_IDX] = bad
        return f"avail idx {bad} written, {num + 1} ahead of {shadow}"
    if what == "head_out_of_range":
        avail[R.AVAIL_H_RING + (shadow & (num - 1))] = num + 3
        avail[R.AVAIL_H_IDX] = (shadow + 1) & R.IDX_MASK
        return f"avail ring entry {shadow & (num - 1)} = head {num + 3} (queue size {num})"
    # The rest write descriptors: use the first descriptor the driver has free, or slot 0.
    head = vq.free_head if vq.num_free else 0
    other = (head + 1) % num

    def put(i: int, addr: int, length: int, flags: int, nxt: int) -> None:
        R.DESC.pack_into(desc, i * R.DESC_SIZE, addr, length, flags, nxt)

    if what == "next_out_of_range":
        put(head, gpa, 16, R.VRING_DESC_F_NEXT, num + 5)
        text = f"descriptor {head}: NEXT to {num + 5} (table of {num})"
    elif what == "chain_loop":
        put(head, gpa, 16, R.VRING_DESC_F_NEXT, other)
        put(other, gpa + 16, 16, R.VRING_DESC_F_NEXT, head)
        text = f"descriptors {head} -> {other} -> {head}: a loop"
    elif what == "addr_outside_ram":
        put(head, FAR_AWAY, 512, R.VRING_DESC_F_WRITE, 0)
        text = f"descriptor {head}: buffer at 0x{FAR_AWAY:x}, outside guest RAM"
    elif what == "addr_overflow":
        put(head, (1 << 64) - 256, 4096, R.VRING_DESC_F_WRITE, 0)
        text = f"descriptor {head}: address + length overflows 64 bits"
    elif what == "zero_length":
        put(head, gpa, 0, 0, 0)
        text = f"descriptor {head}: length 0"
    elif what == "indirect_with_next":
        put(head, gpa, 32, R.VRING_DESC_F_INDIRECT | R.VRING_DESC_F_NEXT, other)
        text = f"descriptor {head}: INDIRECT together with NEXT"
    elif what == "indirect_bad_length":
        put(head, gpa, 17, R.VRING_DESC_F_INDIRECT, 0)
        text = f"descriptor {head}: indirect table of 17 bytes (not a multiple of 16)"
    else:  # readable_after_writable
        put(head, gpa, 16, R.VRING_DESC_F_WRITE | R.VRING_DESC_F_NEXT, other)
        put(other, gpa + 16, 16, 0, 0)
        text = f"descriptors {head} (writable) -> {other} (readable)"
    avail[R.AVAIL_H_RING + (shadow & (num - 1))] = head
    avail[R.AVAIL_H_IDX] = (shadow + 1) & R.IDX_MASK
    return text


def _packed(vq: Any, what: str, gpa: int) -> str:
    num = vq.num
    i = vq.next_avail_idx
    flags_avail = vq.avail_used_flags           # AVAIL/USED as this lap's wrap counter wants
    bid = vq.free_head if vq.num_free else 0
    if what == "bad_id":
        addr, length, bid, flags = gpa, 16, num + 9, 0
        text = f"ring slot {i}: buffer id {num + 9} (queue size {num})"
    elif what == "addr_outside_ram":
        addr, length, flags = FAR_AWAY, 512, P.VRING_DESC_F_WRITE
        text = f"ring slot {i}: buffer at 0x{FAR_AWAY:x}, outside guest RAM"
    elif what == "zero_length":
        addr, length, flags = gpa, 0, 0
        text = f"ring slot {i}: length 0"
    elif what == "indirect_with_next":
        addr, length, flags = gpa, 32, P.VRING_DESC_F_INDIRECT | P.VRING_DESC_F_NEXT
        text = f"ring slot {i}: INDIRECT together with NEXT"
    else:  # indirect_bad_length
        addr, length, flags = gpa, 17, P.VRING_DESC_F_INDIRECT
        text = f"ring slot {i}: indirect table of 17 bytes"
    ring = vq.ring_mv
    # addr, len and id first; the flags word (which makes it available) last, as a driver must
    P.DESC.pack_into(ring, i * P.DESC_SIZE, addr, length, bid, 0)
    vq.ring_h[P.desc_h_flags(i)] = flags | flags_avail
    return text
