"""Feature bits common to every device (include/uapi/linux/virtio_config.h,
virtio_ring.h; virtio spec 6 "Reserved Feature Bits").

Bits 0..23 belong to the device type; 24..41 (the "transport" range as Linux names it is
28..41) to the ring and transport; 50+ are reserved.
"""

VIRTIO_F_NOTIFY_ON_EMPTY = 24
VIRTIO_F_ANY_LAYOUT = 27
VIRTIO_RING_F_INDIRECT_DESC = 28
VIRTIO_RING_F_EVENT_IDX = 29
VIRTIO_F_BAD_FEATURE = 30
VIRTIO_F_VERSION_1 = 32
VIRTIO_F_ACCESS_PLATFORM = 33
VIRTIO_F_RING_PACKED = 34
VIRTIO_F_IN_ORDER = 35
VIRTIO_F_ORDER_PLATFORM = 36
VIRTIO_F_SR_IOV = 37
VIRTIO_F_NOTIFICATION_DATA = 38
VIRTIO_F_NOTIF_CONFIG_DATA = 39
VIRTIO_F_RING_RESET = 40
VIRTIO_F_ADMIN_VQ = 41

VIRTIO_TRANSPORT_F_START = 28
VIRTIO_TRANSPORT_F_END = 42

# Short names, as a topology file writes them (features: {withhold: [EVENT_IDX]}).
COMMON_NAMES = {
    VIRTIO_F_NOTIFY_ON_EMPTY: "NOTIFY_ON_EMPTY",
    VIRTIO_F_ANY_LAYOUT: "ANY_LAYOUT",
    VIRTIO_RING_F_INDIRECT_DESC: "INDIRECT_DESC",
    VIRTIO_RING_F_EVENT_IDX: "EVENT_IDX",
    VIRTIO_F_VERSION_1: "VERSION_1",
    VIRTIO_F_ACCESS_PLATFORM: "ACCESS_PLATFORM",
    VIRTIO_F_RING_PACKED: "RING_PACKED",
    VIRTIO_F_IN_ORDER: "IN_ORDER",
    VIRTIO_F_ORDER_PLATFORM: "ORDER_PLATFORM",
    VIRTIO_F_SR_IOV: "SR_IOV",
    VIRTIO_F_NOTIFICATION_DATA: "NOTIFICATION_DATA",
    VIRTIO_F_NOTIF_CONFIG_DATA: "NOTIF_CONFIG_DATA",
    VIRTIO_F_RING_RESET: "RING_RESET",
    VIRTIO_F_ADMIN_VQ: "ADMIN_VQ",
}


def bit(n: int) -> int:
    """The mask of feature bit n."""
    return 1 << n


def has(features: int, n: int) -> bool:
    """Whether feature bit n is set in a 64-bit feature word."""
    return bool(features >> n & 1)


def names(features: int, device_names: dict[int, str] | None = None) -> list[str]:
    """Symbolic names of the bits set in features, lowest bit first; unknown bits as 'BIT_n'."""
    table = {**COMMON_NAMES, **(device_names or {})}
    return [table.get(n, f"BIT_{n}") for n in range(64) if features >> n & 1]


def parse_name(name: str, device_names: dict[int, str] | None = None) -> int:
    """The bit number of a feature name ('EVENT_IDX', 'VIRTIO_RING_F_EVENT_IDX', 'FLUSH', 29).

    Raises KeyError for an unknown name."""
    table = {**COMMON_NAMES, **(device_names or {})}
    key = name.upper()
    for prefix in ("VIRTIO_RING_F_", "VIRTIO_F_", "VIRTIO_BLK_F_", "VIRTIO_NET_F_",
                   "VIRTIO_CONSOLE_F_"):
        if key.startswith(prefix):
            key = key[len(prefix):]
            break
    for n, nm in table.items():
        if nm == key:
            return n
    if key.isdigit() and int(key) < 64:
        return int(key)
    raise KeyError(name)
