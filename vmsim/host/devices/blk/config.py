"""The virtio-blk configuration space (struct virtio_blk_config), as the device presents it."""

import struct

from vmsim.abi import blk as B


def build_config(capacity_sectors: int, size_max: int, seg_max: int, blk_size: int,
                 num_queues: int, writeback: bool) -> bytearray:
    """The config space bytes, little-endian, through num_queues."""
    cfg = bytearray(B.CONFIG_SIZE)
    struct.pack_into("<Q", cfg, B.CFG_CAPACITY, capacity_sectors)
    struct.pack_into("<I", cfg, B.CFG_SIZE_MAX, size_max)
    struct.pack_into("<I", cfg, B.CFG_SEG_MAX, seg_max)
    struct.pack_into("<I", cfg, B.CFG_BLK_SIZE, blk_size)
    # topology: one logical block per physical block, no offset, min/opt I/O of one block
    struct.pack_into("<BBHI", cfg, B.CFG_TOPOLOGY, 0, 0, 1, 0)
    cfg[B.CFG_WRITEBACK] = int(writeback)
    struct.pack_into("<H", cfg, B.CFG_NUM_QUEUES, num_queues)
    return cfg
