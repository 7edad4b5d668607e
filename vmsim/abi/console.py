"""virtio-console (include/uapi/linux/virtio_console.h, virtio spec 5.3 "Console Device").

A console device has ports; each port has a receiveq (device to driver) and a transmitq
(driver to device). Port 0's pair always exists. With VIRTIO_CONSOLE_F_MULTIPORT a control
receiveq and transmitq follow it, carrying struct virtio_console_control messages, then the
pairs of ports 1 .. max_nr_ports-1:

    queue 0  receiveq(port 0)      queue 2  control receiveq     queue 2+2n  receiveq(port n)
    queue 1  transmitq(port 0)     queue 3  control transmitq    queue 3+2n  transmitq(port n)
"""

import struct

# Feature bits
VIRTIO_CONSOLE_F_SIZE = 0           # cols and rows in config space are valid
VIRTIO_CONSOLE_F_MULTIPORT = 1      # max_nr_ports is valid; control queues are used
VIRTIO_CONSOLE_F_EMERG_WRITE = 2    # emerg_wr in config space is valid

FEATURE_NAMES = {VIRTIO_CONSOLE_F_SIZE: "SIZE", VIRTIO_CONSOLE_F_MULTIPORT: "MULTIPORT",
                 VIRTIO_CONSOLE_F_EMERG_WRITE: "EMERG_WRITE"}

# struct virtio_console_config { le16 cols; le16 rows; le32 max_nr_ports; le32 emerg_wr; }
# (Linux's uapi header and every device in use have cols first; so has the spec.)
CFG_COLS = 0
CFG_ROWS = 2
CFG_MAX_NR_PORTS = 4
CFG_EMERG_WR = 8
CONFIG_SIZE = 12

# struct virtio_console_control { le32 id; le16 event; le16 value; }
CONTROL = struct.Struct("<IHH")
CONTROL_SIZE = CONTROL.size         # 8
# struct virtio_console_resize { le16 cols; le16 rows; }, after the control header of a
# VIRTIO_CONSOLE_RESIZE message (the spec's order; Linux read rows first until 2025).
RESIZE = struct.Struct("<HH")

# The id of a control message that concerns no port (DEVICE_READY).
VIRTIO_CONSOLE_BAD_ID = 0xFFFFFFFF

# Control events. Who sends each is fixed by the spec.
VIRTIO_CONSOLE_DEVICE_READY = 0     # driver: ready for control messages (value 1 ok, 0 failed)
VIRTIO_CONSOLE_DEVICE_ADD = 1       # device: a new port (Linux: VIRTIO_CONSOLE_PORT_ADD)
VIRTIO_CONSOLE_DEVICE_REMOVE = 2    # device: a port is gone (Linux: VIRTIO_CONSOLE_PORT_REMOVE)
VIRTIO_CONSOLE_PORT_READY = 3       # driver: a port is set up (value 1 ok, 0 failed)
VIRTIO_CONSOLE_CONSOLE_PORT = 4     # device: the port is a console (value 1)
VIRTIO_CONSOLE_RESIZE = 5           # device: a console's size, struct virtio_console_resize
VIRTIO_CONSOLE_PORT_OPEN = 6        # both: the sender's end is open (1) or closed (0)
VIRTIO_CONSOLE_PORT_NAME = 7        # device: the port's UTF-8 name follows, no NUL

EVENT_NAMES = {
    VIRTIO_CONSOLE_DEVICE_READY: "DEVICE_READY", VIRTIO_CONSOLE_DEVICE_ADD: "DEVICE_ADD",
    VIRTIO_CONSOLE_DEVICE_REMOVE: "DEVICE_REMOVE", VIRTIO_CONSOLE_PORT_READY: "PORT_READY",
    VIRTIO_CONSOLE_CONSOLE_PORT: "CONSOLE_PORT", VIRTIO_CONSOLE_RESIZE: "RESIZE",
    VIRTIO_CONSOLE_PORT_OPEN: "PORT_OPEN", VIRTIO_CONSOLE_PORT_NAME: "PORT_NAME",
}
DRIVER_EVENTS = frozenset({VIRTIO_CONSOLE_DEVICE_READY, VIRTIO_CONSOLE_PORT_READY,
                           VIRTIO_CONSOLE_PORT_OPEN})
DEVICE_EVENTS = frozenset({VIRTIO_CONSOLE_DEVICE_ADD, VIRTIO_CONSOLE_DEVICE_REMOVE,
                           VIRTIO_CONSOLE_CONSOLE_PORT, VIRTIO_CONSOLE_RESIZE,
                           VIRTIO_CONSOLE_PORT_OPEN, VIRTIO_CONSOLE_PORT_NAME})

# Queue numbering
CONTROL_RX = 2
CONTROL_TX = 3


def rx_queue(port: int) -> int:
    """The receiveq of a port."""
    return 0 if port == 0 else 2 + 2 * port


def tx_queue(port: int) -> int:
    """The transmitq of a port."""
    return 1 if port == 0 else 3 + 2 * port


def num_queues(multiport: bool, max_nr_ports: int) -> int:
    """How many queues a device has: port 0's pair, and with MULTIPORT the control pair and
    the pairs of ports 1 .. max_nr_ports-1."""
    return 2 * (max_nr_ports + 1) if multiport else 2


def port_of_queue(index: int) -> tuple[int, bool] | None:
    """(port, is_transmitq) of a data queue; None for the control queues."""
    if index < 2:
        return 0, index == 1
    if index < 4:
        return None
    return index // 2 - 1, bool(index & 1)


def control(port_id: int, event: int, value: int = 0, payload: bytes = b"") -> bytes:
    """A control message: the header, then what the event carries (a name, a size)."""
    return CONTROL.pack(port_id & 0xFFFFFFFF, event, value & 0xFFFF) + payload


def event_name(event: int) -> str:
    return EVENT_NAMES.get(event, f"event {event}")
