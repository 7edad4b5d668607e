"""The virtio-console configuration space (struct virtio_console_config), as the device
presents it: cols and rows of port 0's console, max_nr_ports, and emerg_wr (which reads 0)."""

import struct

from vmsim.abi import console as C


def build_config(cols: int, rows: int, max_nr_ports: int) -> bytearray:
    cfg = bytearray(C.CONFIG_SIZE)
    struct.pack_into("<HHII", cfg, 0, cols & 0xFFFF, rows & 0xFFFF, max_nr_ports, 0)
    return cfg
