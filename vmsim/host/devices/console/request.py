"""What the driver sends on a console device: control messages (struct
virtio_console_control) on the control transmitq, bytes on a port's transmitq. Both come
from guest memory and are untrusted: a message shorter than its header, an event only the
device may send, a port the device never added are the driver's errors, reported as values."""

from vmsim.abi import console as C
from vmsim.host.virtio.chain import DescChain

# A control message is 8 bytes; anything a driver appends is ignored (but not read past this).
CONTROL_READ_MAX = 64
# A port's transmit buffer is read whole, up to this much (Linux sends at most 32 KiB at once).
TX_READ_MAX = 1 << 20


class BadControl(ValueError):
    """A control message the device cannot act on (the text says why)."""


def parse_control(data: bytes) -> tuple[int, int, int]:
    """(port id, event, value) of a control message from the driver."""
    if len(data) < C.CONTROL_SIZE:
        raise BadControl(f"a control message of {len(data)} bytes, shorter than the "
                         f"{C.CONTROL_SIZE}-byte struct virtio_console_control")
    port_id, event, value = C.CONTROL.unpack_from(data)
    if event not in C.DRIVER_EVENTS:
        if event in C.DEVICE_EVENTS:
            raise BadControl(f"{C.event_name(event)} for port {port_id} is the device's to "
                             "send, not the driver's")
        raise BadControl(f"unknown control event {event} for port {port_id}")
    return port_id, event, value


def read_transmit(chain: DescChain) -> bytes:
    """The bytes of one transmit buffer."""
    return chain.read_bytes(0, min(chain.rlen, TX_READ_MAX))
