"""Device status bits (include/uapi/linux/virtio_config.h, virtio spec 2.1)."""

ACKNOWLEDGE = 1
DRIVER = 2
DRIVER_OK = 4
FEATURES_OK = 8
DEVICE_NEEDS_RESET = 0x40
FAILED = 0x80

# In the order a driver sets them.
NAMES = {
    ACKNOWLEDGE: "ACKNOWLEDGE",
    DRIVER: "DRIVER",
    FEATURES_OK: "FEATURES_OK",
    DRIVER_OK: "DRIVER_OK",
    DEVICE_NEEDS_RESET: "DEVICE_NEEDS_RESET",
    FAILED: "FAILED",
}


def describe(status: int) -> str:
    """'ACKNOWLEDGE|DRIVER|...' for a status byte; 'RESET' for 0."""
    if status == 0:
        return "RESET"
    parts = [name for bit, name in NAMES.items() if status & bit]
    rest = status & ~sum(NAMES)
    if rest:
        parts.append(f"0x{rest:x}")
    return "|".join(parts)
