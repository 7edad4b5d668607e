"""The virtio-mmio register map (include/uapi/linux/virtio_mmio.h, virtio spec 4.2.2).

Every register is 32 bits wide and little-endian; the device-specific configuration space
starts at CONFIG and is accessed with 8, 16 or 32-bit accesses.
"""

MAGIC_VALUE = 0x000          # R   0x74726976 ("virt")
VERSION = 0x004              # R   2 (1 for legacy devices)
DEVICE_ID = 0x008            # R
VENDOR_ID = 0x00C            # R
DEVICE_FEATURES = 0x010      # R   32 bits of features, selected by DEVICE_FEATURES_SEL
DEVICE_FEATURES_SEL = 0x014  # W
DRIVER_FEATURES = 0x020      # W
DRIVER_FEATURES_SEL = 0x024  # W
GUEST_PAGE_SIZE = 0x028      # W   legacy only
QUEUE_SEL = 0x030            # W
QUEUE_NUM_MAX = 0x034        # R
QUEUE_NUM = 0x038            # W
QUEUE_ALIGN = 0x03C          # W   legacy only
QUEUE_PFN = 0x040            # RW  legacy only
QUEUE_READY = 0x044          # RW
QUEUE_NOTIFY = 0x050         # W
INTERRUPT_STATUS = 0x060     # R
INTERRUPT_ACK = 0x064        # W
STATUS = 0x070               # RW
QUEUE_DESC_LOW = 0x080       # W
QUEUE_DESC_HIGH = 0x084      # W
QUEUE_DRIVER_LOW = 0x090     # W   ("QUEUE_AVAIL" in Linux)
QUEUE_DRIVER_HIGH = 0x094    # W
QUEUE_DEVICE_LOW = 0x0A0     # W   ("QUEUE_USED" in Linux)
QUEUE_DEVICE_HIGH = 0x0A4    # W
SHM_SEL = 0x0AC              # W
SHM_LEN_LOW = 0x0B0          # R
SHM_LEN_HIGH = 0x0B4         # R
SHM_BASE_LOW = 0x0B8         # R
SHM_BASE_HIGH = 0x0BC        # R
QUEUE_RESET = 0x0C0          # RW
CONFIG_GENERATION = 0x0FC    # R
CONFIG = 0x100               # RW  device-specific configuration space

MAGIC = 0x74726976

# InterruptStatus / InterruptACK bits
INT_VRING = 1 << 0
INT_CONFIG = 1 << 1

# The size of one device's register window as QEMU and Linux's device tree describe it.
REGION_SIZE = 0x200

NAMES = {v: k for k, v in dict(globals()).items() if k.isupper() and isinstance(v, int)
         and k not in ("MAGIC", "INT_VRING", "INT_CONFIG", "REGION_SIZE") and v < CONFIG}
NAMES[CONFIG] = "CONFIG"
