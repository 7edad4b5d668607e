"""vmsim's IOMMU device: a minimal paravirtual IOMMU on the board's MMIO bus.

Its requests are virtio-iommu's (virtio spec "IOMMU device", include/uapi/linux/virtio_iommu.h:
ATTACH, DETACH, MAP, UNMAP with their layouts, flags and status codes); they are submitted
through registers instead of a virtqueue, so that the IOMMU needs no IOMMU of its own: the
driver writes the guest-physical address of a request array once (CMD_BASE), then each
write of a count to CMD_SUBMIT is one trapped access that executes that many 64-byte request
slots in order and writes each one's tail status before the write returns.
"""

import struct

MAGIC = 0x554D4F49              # "IOMU" little-endian
VERSION = 1
PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT     # the only granule: 4 KiB
INPUT_BITS = 48                 # IOVAs are below 2^48
REGION_SIZE = 0x100

# registers (32-bit)
REG_MAGIC = 0x00
REG_VERSION = 0x04
REG_PAGE_SIZE_MASK = 0x08       # low 32 bits of virtio-iommu's page_size_mask
REG_INPUT_BITS = 0x0C
REG_CMD_BASE_LO = 0x10
REG_CMD_BASE_HI = 0x14
REG_CMD_SUBMIT = 0x18           # write: execute this many slots from CMD_BASE
REG_CMD_DONE = 0x1C             # read: slots executed by the last submit
REG_FAULTS = 0x20               # read: device accesses refused so far (all endpoints)

SLOT_SIZE = 64
MAX_BATCH = 64                  # slots one submit may execute

# request types (VIRTIO_IOMMU_T_*)
T_ATTACH = 1
T_DETACH = 2
T_MAP = 3
T_UNMAP = 4

# MAP flags (VIRTIO_IOMMU_MAP_F_*)
MAP_F_READ = 1 << 0
MAP_F_WRITE = 1 << 1
MAP_F_MMIO = 1 << 2

# status (VIRTIO_IOMMU_S_*)
S_OK = 0
S_IOERR = 1
S_UNSUPP = 2
S_DEVERR = 3
S_INVAL = 4
S_RANGE = 5
S_NOENT = 6
S_FAULT = 7
S_NOMEM = 8

STATUS_NAMES = {S_OK: "OK", S_IOERR: "IOERR", S_UNSUPP: "UNSUPP", S_DEVERR: "DEVERR",
                S_INVAL: "INVAL", S_RANGE: "RANGE", S_NOENT: "NOENT", S_FAULT: "FAULT",
                S_NOMEM: "NOMEM"}

# Layouts, each from its head {u8 type; u8 reserved[3]} to its tail {u8 status; u8 reserved[3]}.
ATTACH = struct.Struct("<B3xIII4xB3x")      # type, domain, endpoint, flags, status: 24 bytes
DETACH = struct.Struct("<B3xII8xB3x")       # type, domain, endpoint, status: 24 bytes
MAP = struct.Struct("<B3xIQQQIB3x")         # type, domain, virt_start, virt_end (inclusive),
#                                             phys_start, flags, status: 40 bytes
UNMAP = struct.Struct("<B3xIQQ4xB3x")       # type, domain, virt_start, virt_end, status: 32
TAIL_AT = {T_ATTACH: ATTACH.size - 4, T_DETACH: DETACH.size - 4, T_MAP: MAP.size - 4,
           T_UNMAP: UNMAP.size - 4}
