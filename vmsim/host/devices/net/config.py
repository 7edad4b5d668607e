"""The virtio-net configuration space (struct virtio_net_config), as the device presents it."""

import struct

from vmsim.abi import net as N


def build_config(mac: bytes, link_up: bool, max_pairs: int, mtu: int) -> bytearray:
    cfg = bytearray(N.CONFIG_SIZE)
    cfg[N.CFG_MAC:N.CFG_MAC + 6] = mac
    struct.pack_into("<H", cfg, N.CFG_STATUS, N.VIRTIO_NET_S_LINK_UP if link_up else 0)
    struct.pack_into("<H", cfg, N.CFG_MAX_VIRTQUEUE_PAIRS, max_pairs)
    struct.pack_into("<H", cfg, N.CFG_MTU, mtu)
    return cfg
