"""virtio-blk (include/uapi/linux/virtio_blk.h, virtio spec 5.2)."""

import struct

SECTOR_SIZE = 512
SECTOR_SHIFT = 9

# Feature bits
VIRTIO_BLK_F_BARRIER = 0        # legacy
VIRTIO_BLK_F_SIZE_MAX = 1
VIRTIO_BLK_F_SEG_MAX = 2
VIRTIO_BLK_F_GEOMETRY = 4
VIRTIO_BLK_F_RO = 5
VIRTIO_BLK_F_BLK_SIZE = 6
VIRTIO_BLK_F_SCSI = 7           # legacy
VIRTIO_BLK_F_FLUSH = 9
VIRTIO_BLK_F_TOPOLOGY = 10
VIRTIO_BLK_F_CONFIG_WCE = 11
VIRTIO_BLK_F_MQ = 12
VIRTIO_BLK_F_DISCARD = 13
VIRTIO_BLK_F_WRITE_ZEROES = 14
VIRTIO_BLK_F_LIFETIME = 15
VIRTIO_BLK_F_SECURE_ERASE = 16

FEATURE_NAMES = {
    VIRTIO_BLK_F_BARRIER: "BARRIER", VIRTIO_BLK_F_SIZE_MAX: "SIZE_MAX",
    VIRTIO_BLK_F_SEG_MAX: "SEG_MAX", VIRTIO_BLK_F_GEOMETRY: "GEOMETRY",
    VIRTIO_BLK_F_RO: "RO", VIRTIO_BLK_F_BLK_SIZE: "BLK_SIZE", VIRTIO_BLK_F_SCSI: "SCSI",
    VIRTIO_BLK_F_FLUSH: "FLUSH", VIRTIO_BLK_F_TOPOLOGY: "TOPOLOGY",
    VIRTIO_BLK_F_CONFIG_WCE: "CONFIG_WCE", VIRTIO_BLK_F_MQ: "MQ",
    VIRTIO_BLK_F_DISCARD: "DISCARD", VIRTIO_BLK_F_WRITE_ZEROES: "WRITE_ZEROES",
    VIRTIO_BLK_F_LIFETIME: "LIFETIME", VIRTIO_BLK_F_SECURE_ERASE: "SECURE_ERASE",
}

# struct virtio_blk_config: byte offsets of the fields vmsim uses
CFG_CAPACITY = 0            # le64, in 512-byte sectors
CFG_SIZE_MAX = 8            # le32
CFG_SEG_MAX = 12            # le32
CFG_GEOMETRY = 16           # le16 cylinders, u8 heads, u8 sectors
CFG_BLK_SIZE = 20           # le32
CFG_TOPOLOGY = 24           # u8 physical_block_exp, u8 alignment_offset, le16 min_io, le32 opt_io
CFG_WRITEBACK = 32          # u8
CFG_NUM_QUEUES = 34         # le16
CONFIG_SIZE = 36            # through num_queues; the rest (discard, ...) is not offered

# Request types (struct virtio_blk_outhdr.type)
VIRTIO_BLK_T_IN = 0
VIRTIO_BLK_T_OUT = 1
VIRTIO_BLK_T_SCSI_CMD = 2
VIRTIO_BLK_T_FLUSH = 4
VIRTIO_BLK_T_GET_ID = 8
VIRTIO_BLK_T_GET_LIFETIME = 10
VIRTIO_BLK_T_DISCARD = 11
VIRTIO_BLK_T_WRITE_ZEROES = 13
VIRTIO_BLK_T_SECURE_ERASE = 14

REQUEST_NAMES = {VIRTIO_BLK_T_IN: "read", VIRTIO_BLK_T_OUT: "write",
                 VIRTIO_BLK_T_FLUSH: "flush", VIRTIO_BLK_T_GET_ID: "get_id"}

# Status byte (the last byte the device writes)
VIRTIO_BLK_S_OK = 0
VIRTIO_BLK_S_IOERR = 1
VIRTIO_BLK_S_UNSUPP = 2

# struct virtio_blk_outhdr { le32 type; le32 ioprio; le64 sector; }
OUTHDR = struct.Struct("<IIQ")
OUTHDR_SIZE = OUTHDR.size     # 16

VIRTIO_BLK_ID_BYTES = 20
