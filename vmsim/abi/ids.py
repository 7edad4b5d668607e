"""Device IDs (include/uapi/linux/virtio_ids.h) and the id-table wildcard."""

VIRTIO_ID_NET = 1
VIRTIO_ID_BLOCK = 2
VIRTIO_ID_CONSOLE = 3
VIRTIO_ID_RNG = 4

VIRTIO_DEV_ANY_ID = 0xFFFFFFFF

# The vendor ID that virtio-mmio devices of QEMU report ("QEMU" in ASCII, little-endian).
VENDOR_QEMU = 0x554D4551

NAMES = {VIRTIO_ID_NET: "net", VIRTIO_ID_BLOCK: "blk", VIRTIO_ID_CONSOLE: "console",
         VIRTIO_ID_RNG: "rng"}
