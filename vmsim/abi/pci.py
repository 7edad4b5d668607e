"""PCI as virtio-pci uses it: the type-0 configuration header, BARs, the capability list and
MSI-X (include/uapi/linux/pci_regs.h, the PCI Local Bus and PCIe specifications), the ECAM
layout, the virtio vendor capabilities and common configuration structure, and the legacy
I/O BAR (include/uapi/linux/virtio_pci.h; virtio spec 4.1).

Every multi-byte field is little-endian.
"""

# ---- identification ------------------------------------------------------------------------------
PCI_VENDOR_ID_REDHAT_QUMRANET = 0x1AF4     # Qumranet donated 0x1000..0x10FF to virtio
PCI_VENDOR_ID_REDHAT = 0x1B36
PCI_DEVICE_ID_REDHAT_HOST_BRIDGE = 0x0008  # QEMU's generic PCIe host bridge
PCI_SUBDEVICE_ID_QEMU = 0x1100             # what QEMU puts in a modern device's subsystem ID

VIRTIO_PCI_DEVICE_ID_FIRST = 0x1000
VIRTIO_PCI_DEVICE_ID_LAST = 0x107F
VIRTIO_PCI_MODERN_DEVICE_BASE = 0x1040     # modern: 0x1040 + the virtio device ID
VIRTIO_PCI_TRANSITIONAL_LAST = 0x103F      # 0x1000..0x103F: transitional (and legacy) IDs
VIRTIO_PCI_ABI_VERSION = 0                 # the revision ID a legacy driver accepts

# Transitional PCI device IDs by virtio device ID (spec 4.1.2.1).
TRANSITIONAL_DEVICE_ID = {
    1: 0x1000,      # network
    2: 0x1001,      # block
    5: 0x1002,      # memory balloon (traditional)
    3: 0x1003,      # console
    8: 0x1004,      # SCSI host
    4: 0x1005,      # entropy source
    9: 0x1009,      # 9P transport
}

# Class codes (base class << 16 | subclass << 8 | programming interface), as QEMU gives them
PCI_CLASS_STORAGE_SCSI = 0x010000
PCI_CLASS_NETWORK_ETHERNET = 0x020000
PCI_CLASS_BRIDGE_HOST = 0x060000
PCI_CLASS_COMMUNICATION_OTHER = 0x078000
PCI_CLASS_OTHERS = 0xFF0000
VIRTIO_CLASS_CODE = {1: PCI_CLASS_NETWORK_ETHERNET, 2: PCI_CLASS_STORAGE_SCSI,
                     3: PCI_CLASS_COMMUNICATION_OTHER}

# ---- the type-0 configuration header -------------------------------------------------------------
PCI_VENDOR_ID = 0x00            # 16
PCI_DEVICE_ID = 0x02            # 16
PCI_COMMAND = 0x04              # 16
PCI_STATUS = 0x06               # 16
PCI_REVISION_ID = 0x08          # 8
PCI_CLASS_PROG = 0x09           # 8
PCI_CLASS_DEVICE = 0x0A         # 16: base class and subclass
PCI_CACHE_LINE_SIZE = 0x0C      # 8
PCI_LATENCY_TIMER = 0x0D        # 8
PCI_HEADER_TYPE = 0x0E          # 8
PCI_BIST = 0x0F                 # 8
PCI_BASE_ADDRESS_0 = 0x10       # 32 each, six of them
PCI_CARDBUS_CIS = 0x28
PCI_SUBSYSTEM_VENDOR_ID = 0x2C  # 16
PCI_SUBSYSTEM_ID = 0x2E         # 16
PCI_ROM_ADDRESS = 0x30          # 32
PCI_CAPABILITY_LIST = 0x34      # 8
PCI_INTERRUPT_LINE = 0x3C       # 8
PCI_INTERRUPT_PIN = 0x3D        # 8
PCI_MIN_GNT = 0x3E
PCI_MAX_LAT = 0x3F
PCI_STD_HEADER_SIZEOF = 0x40
PCI_STD_NUM_BARS = 6
PCI_CFG_SPACE_SIZE = 256        # conventional PCI
PCI_CFG_SPACE_EXP_SIZE = 4096   # PCI Express (what ECAM maps per function)

PCI_COMMAND_IO = 0x1
PCI_COMMAND_MEMORY = 0x2
PCI_COMMAND_MASTER = 0x4
PCI_COMMAND_SERR = 0x100
PCI_COMMAND_INTX_DISABLE = 0x400

PCI_STATUS_INTERRUPT = 0x08
PCI_STATUS_CAP_LIST = 0x10

PCI_HEADER_TYPE_NORMAL = 0x00
PCI_HEADER_TYPE_MFD = 0x80      # multi-function device

PCI_INTERRUPT_PIN_INTA = 1

# Base address registers
PCI_BASE_ADDRESS_SPACE_IO = 0x01
PCI_BASE_ADDRESS_MEM_TYPE_MASK = 0x06
PCI_BASE_ADDRESS_MEM_TYPE_32 = 0x00
PCI_BASE_ADDRESS_MEM_TYPE_64 = 0x04
PCI_BASE_ADDRESS_MEM_PREFETCH = 0x08
PCI_BASE_ADDRESS_MEM_MASK = 0xFFFFFFF0
PCI_BASE_ADDRESS_IO_MASK = 0xFFFFFFFC

# ---- capabilities --------------------------------------------------------------------------------
PCI_CAP_LIST_ID = 0
PCI_CAP_LIST_NEXT = 1
PCI_CAP_ID_VNDR = 0x09
PCI_CAP_ID_MSIX = 0x11
PCI_FIND_CAP_TTL = 48           # how many links a walk follows before it gives up (a loop)

# MSI-X capability (12 bytes)
PCI_MSIX_FLAGS = 2              # 16: message control
PCI_MSIX_FLAGS_QSIZE = 0x07FF   # table size - 1
PCI_MSIX_FLAGS_MASKALL = 0x4000
PCI_MSIX_FLAGS_ENABLE = 0x8000
PCI_MSIX_TABLE = 4              # 32: table offset | BIR
PCI_MSIX_PBA = 8                # 32: PBA offset | BIR
PCI_MSIX_BIR = 0x7
PCI_MSIX_OFFSET_MASK = 0xFFFFFFF8
PCI_CAP_MSIX_SIZEOF = 12
# MSI-X table entry (16 bytes)
PCI_MSIX_ENTRY_SIZE = 16
PCI_MSIX_ENTRY_LOWER_ADDR = 0
PCI_MSIX_ENTRY_UPPER_ADDR = 4
PCI_MSIX_ENTRY_DATA = 8
PCI_MSIX_ENTRY_VECTOR_CTRL = 12
PCI_MSIX_ENTRY_CTRL_MASKBIT = 0x1
PCI_MSIX_MAX_VECTORS = 2048

# ---- ECAM ----------------------------------------------------------------------------------------
ECAM_BUS_SHIFT = 20
ECAM_DEVFN_SHIFT = 12
ECAM_BUS_SIZE = 1 << ECAM_BUS_SHIFT     # 32 devices x 8 functions x 4 KiB
PCI_SLOTS = 32
PCI_FUNCTIONS = 8


def ecam_offset(bus: int, slot: int, fn: int, reg: int) -> int:
    return bus << ECAM_BUS_SHIFT | (slot << 3 | fn) << ECAM_DEVFN_SHIFT | reg


def ecam_decode(offset: int) -> tuple[int, int, int, int]:
    """(bus, slot, function, register) of an offset into the ECAM window."""
    devfn = offset >> ECAM_DEVFN_SHIFT & 0xFF
    return offset >> ECAM_BUS_SHIFT, devfn >> 3, devfn & 7, offset & 0xFFF


# ---- virtio structure capabilities (struct virtio_pci_cap) ---------------------------------------
VIRTIO_PCI_CAP_COMMON_CFG = 1
VIRTIO_PCI_CAP_NOTIFY_CFG = 2
VIRTIO_PCI_CAP_ISR_CFG = 3
VIRTIO_PCI_CAP_DEVICE_CFG = 4
VIRTIO_PCI_CAP_PCI_CFG = 5
VIRTIO_PCI_CAP_SHARED_MEMORY_CFG = 8
VIRTIO_PCI_CAP_VENDOR_CFG = 9
CAP_TYPE_NAMES = {VIRTIO_PCI_CAP_COMMON_CFG: "common", VIRTIO_PCI_CAP_NOTIFY_CFG: "notify",
                  VIRTIO_PCI_CAP_ISR_CFG: "isr", VIRTIO_PCI_CAP_DEVICE_CFG: "device",
                  VIRTIO_PCI_CAP_PCI_CFG: "pci_cfg"}

VIRTIO_PCI_CAP_VNDR = 0         # u8  PCI_CAP_ID_VNDR
VIRTIO_PCI_CAP_NEXT = 1         # u8
VIRTIO_PCI_CAP_LEN = 2          # u8  length of the whole capability
VIRTIO_PCI_CAP_CFG_TYPE = 3     # u8
VIRTIO_PCI_CAP_BAR = 4          # u8
VIRTIO_PCI_CAP_ID = 5           # u8
VIRTIO_PCI_CAP_OFFSET = 8       # le32 offset within the BAR
VIRTIO_PCI_CAP_LENGTH = 12      # le32 length of the structure
VIRTIO_PCI_CAP_SIZEOF = 16
# struct virtio_pci_cap64 (shared memory regions): the cap, then le32 offset_hi, length_hi
VIRTIO_PCI_CAP64_OFFSET_HI = 16
VIRTIO_PCI_CAP64_LENGTH_HI = 20
VIRTIO_PCI_CAP64_SIZEOF = 24
# struct virtio_pci_notify_cap: the cap, then le32 notify_off_multiplier
VIRTIO_PCI_NOTIFY_CAP_MULT = 16
VIRTIO_PCI_NOTIFY_CAP_SIZEOF = 20
# struct virtio_pci_cfg_cap: the cap, then u8 pci_cfg_data[4]
VIRTIO_PCI_CFG_CAP_DATA = 16
VIRTIO_PCI_CFG_CAP_SIZEOF = 20

# ---- struct virtio_pci_common_cfg (+ virtio_pci_modern_common_cfg) -------------------------------
VIRTIO_PCI_COMMON_DFSELECT = 0       # le32 device_feature_select   RW
VIRTIO_PCI_COMMON_DF = 4             # le32 device_feature          R
VIRTIO_PCI_COMMON_GFSELECT = 8       # le32 driver_feature_select   RW
VIRTIO_PCI_COMMON_GF = 12            # le32 driver_feature          RW
VIRTIO_PCI_COMMON_MSIX = 16          # le16 config_msix_vector      RW
VIRTIO_PCI_COMMON_NUMQ = 18          # le16 num_queues              R
VIRTIO_PCI_COMMON_STATUS = 20        # u8   device_status           RW
VIRTIO_PCI_COMMON_CFGGENERATION = 21  # u8  config_generation       R
VIRTIO_PCI_COMMON_Q_SELECT = 22      # le16 queue_select            RW
VIRTIO_PCI_COMMON_Q_SIZE = 24        # le16 queue_size              RW
VIRTIO_PCI_COMMON_Q_MSIX = 26        # le16 queue_msix_vector       RW
VIRTIO_PCI_COMMON_Q_ENABLE = 28      # le16 queue_enable            RW
VIRTIO_PCI_COMMON_Q_NOFF = 30        # le16 queue_notify_off        R
VIRTIO_PCI_COMMON_Q_DESCLO = 32      # le64 queue_desc, as two le32 halves
VIRTIO_PCI_COMMON_Q_DESCHI = 36
VIRTIO_PCI_COMMON_Q_AVAILLO = 40     # le64 queue_driver
VIRTIO_PCI_COMMON_Q_AVAILHI = 44
VIRTIO_PCI_COMMON_Q_USEDLO = 48      # le64 queue_device
VIRTIO_PCI_COMMON_Q_USEDHI = 52
VIRTIO_PCI_COMMON_Q_NDATA = 56       # le16 queue_notify_data       R (NOTIF_CONFIG_DATA)
VIRTIO_PCI_COMMON_Q_RESET = 58       # le16 queue_reset             RW (RING_RESET)
VIRTIO_PCI_COMMON_ADM_Q_IDX = 60     # le16 admin_queue_index       R (ADMIN_VQ)
VIRTIO_PCI_COMMON_ADM_Q_NUM = 62     # le16 admin_queue_num         R (ADMIN_VQ)
VIRTIO_PCI_COMMON_CFG_SIZEOF = 56    # struct virtio_pci_common_cfg
VIRTIO_PCI_MODERN_COMMON_CFG_SIZEOF = 64  # struct virtio_pci_modern_common_cfg

# offset -> (field name, width in bytes): the driver accesses each field with its own width
# (spec 4.1.3.1), a 64-bit field as two 32-bit halves.
COMMON_FIELDS = {
    VIRTIO_PCI_COMMON_DFSELECT: ("device_feature_select", 4),
    VIRTIO_PCI_COMMON_DF: ("device_feature", 4),
    VIRTIO_PCI_COMMON_GFSELECT: ("driver_feature_select", 4),
    VIRTIO_PCI_COMMON_GF: ("driver_feature", 4),
    VIRTIO_PCI_COMMON_MSIX: ("config_msix_vector", 2),
    VIRTIO_PCI_COMMON_NUMQ: ("num_queues", 2),
    VIRTIO_PCI_COMMON_STATUS: ("device_status", 1),
    VIRTIO_PCI_COMMON_CFGGENERATION: ("config_generation", 1),
    VIRTIO_PCI_COMMON_Q_SELECT: ("queue_select", 2),
    VIRTIO_PCI_COMMON_Q_SIZE: ("queue_size", 2),
    VIRTIO_PCI_COMMON_Q_MSIX: ("queue_msix_vector", 2),
    VIRTIO_PCI_COMMON_Q_ENABLE: ("queue_enable", 2),
    VIRTIO_PCI_COMMON_Q_NOFF: ("queue_notify_off", 2),
    VIRTIO_PCI_COMMON_Q_DESCLO: ("queue_desc_lo", 4),
    VIRTIO_PCI_COMMON_Q_DESCHI: ("queue_desc_hi", 4),
    VIRTIO_PCI_COMMON_Q_AVAILLO: ("queue_driver_lo", 4),
    VIRTIO_PCI_COMMON_Q_AVAILHI: ("queue_driver_hi", 4),
    VIRTIO_PCI_COMMON_Q_USEDLO: ("queue_device_lo", 4),
    VIRTIO_PCI_COMMON_Q_USEDHI: ("queue_device_hi", 4),
    VIRTIO_PCI_COMMON_Q_NDATA: ("queue_notify_data", 2),
    VIRTIO_PCI_COMMON_Q_RESET: ("queue_reset", 2),
    VIRTIO_PCI_COMMON_ADM_Q_IDX: ("admin_queue_index", 2),
    VIRTIO_PCI_COMMON_ADM_Q_NUM: ("admin_queue_num", 2),
}

# ISR status bits
VIRTIO_PCI_ISR_QUEUE = 0x1
VIRTIO_PCI_ISR_CONFIG = 0x2

# config_msix_vector / queue_msix_vector: no vector (and a failed mapping reads back as this)
VIRTIO_MSI_NO_VECTOR = 0xFFFF

# ---- the legacy interface: registers at the start of I/O BAR 0 -----------------------------------
VIRTIO_PCI_HOST_FEATURES = 0         # le32 R   device features 0..31
VIRTIO_PCI_GUEST_FEATURES = 4        # le32 RW  driver features 0..31
VIRTIO_PCI_QUEUE_PFN = 8             # le32 RW  ring address >> 12 (0: deactivate)
VIRTIO_PCI_QUEUE_NUM = 12            # le16 R   queue size (fixed by the device)
VIRTIO_PCI_QUEUE_SEL = 14            # le16 RW
VIRTIO_PCI_QUEUE_NOTIFY = 16         # le16 RW
VIRTIO_PCI_STATUS = 18               # u8   RW
VIRTIO_PCI_ISR = 19                  # u8   R   read to clear
VIRTIO_MSI_CONFIG_VECTOR = 20        # le16 RW  only while MSI-X is enabled
VIRTIO_MSI_QUEUE_VECTOR = 22         # le16 RW  only while MSI-X is enabled
VIRTIO_PCI_QUEUE_ADDR_SHIFT = 12
VIRTIO_PCI_VRING_ALIGN = 4096

LEGACY_FIELDS = {
    VIRTIO_PCI_HOST_FEATURES: ("host_features", 4),
    VIRTIO_PCI_GUEST_FEATURES: ("guest_features", 4),
    VIRTIO_PCI_QUEUE_PFN: ("queue_pfn", 4),
    VIRTIO_PCI_QUEUE_NUM: ("queue_num", 2),
    VIRTIO_PCI_QUEUE_SEL: ("queue_sel", 2),
    VIRTIO_PCI_QUEUE_NOTIFY: ("queue_notify", 2),
    VIRTIO_PCI_STATUS: ("status", 1),
    VIRTIO_PCI_ISR: ("isr", 1),
}
LEGACY_MSIX_FIELDS = {
    VIRTIO_MSI_CONFIG_VECTOR: ("config_vector", 2),
    VIRTIO_MSI_QUEUE_VECTOR: ("queue_vector", 2),
}


def virtio_pci_config_off(msix_enabled: bool) -> int:
    """VIRTIO_PCI_CONFIG_OFF: where the device-specific config starts in the legacy BAR
    (after the two MSI-X vector registers while MSI-X is enabled)."""
    return 24 if msix_enabled else 20


def legacy_region_size(config_len: int) -> int:
    """The legacy I/O BAR's size: the header with the MSI-X registers and the device config,
    rounded up to a power of two as a BAR's size must be."""
    need = max(32, virtio_pci_config_off(True) + config_len)
    return 1 << (need - 1).bit_length()
