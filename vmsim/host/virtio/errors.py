"""Guest-caused ring errors: one flat set of reasons, named after the virtio spec's words.

A RingError is raised inside the ring code and caught at the device boundary, which turns it
into the spec's outcome (virtio_error: DEVICE_NEEDS_RESET, a config-change interrupt, the
queue marked broken). It never escapes a device.
"""

from enum import Enum


class Reason(Enum):
    """Why a ring or a chain is malformed. The value is the message."""
    INVALID_RING_SIZE = "queue size is zero, above the maximum, or not a power of two"
    MISALIGNED_RING = "a ring area is not aligned as the spec requires"
    RING_OUT_OF_RANGE = "a ring area lies outside guest RAM"
    INVALID_AVAIL_IDX = "avail idx moved ahead of the last seen by more than the queue size"
    INVALID_HEAD = "a head index in the avail ring is >= the queue size"
    TOO_MANY_IN_FLIGHT = "more chains in flight than the queue size"
    INVALID_NEXT = "a descriptor's next index is >= the size of its table"
    CHAIN_TOO_LONG = "a chain is longer than its table (a loop)"
    READABLE_AFTER_WRITABLE = "a device-readable descriptor follows a device-writable one"
    ZERO_LENGTH = "a descriptor has length 0"
    CHAIN_TOO_BIG = "a chain is longer than 2^32 bytes in total"
    ADDRESS_OUT_OF_RANGE = "a buffer lies outside guest RAM"
    INDIRECT_NOT_NEGOTIATED = "an indirect descriptor without VIRTIO_RING_F_INDIRECT_DESC"
    INDIRECT_WITH_NEXT = "a descriptor has both INDIRECT and NEXT set"
    NESTED_INDIRECT = "an indirect table holds an INDIRECT descriptor"
    INDIRECT_BAD_LENGTH = "an indirect table's length is 0 or not a multiple of 16"
    INDIRECT_OUT_OF_RANGE = "an indirect table lies outside guest RAM"
    QUEUE_NOT_READY = "the driver notified a queue that is not ready"
    INVALID_BUFFER_ID = "a packed buffer id is >= the queue size"
    BUFFER_ID_IN_FLIGHT = "a packed buffer id still in flight was made available again"
    USED_FLAG_BY_DRIVER = "a descriptor the device has not used carries the device's used flags"
    INDIRECT_IN_CHAIN = "an INDIRECT descriptor inside a chain of several (packed)"
    MALFORMED_REQUEST = "a request the device cannot answer (no room for its status)"
    NET_HEADER_SHORT = "a virtio-net buffer has no room for the virtio-net header"
    WRONG_DIRECTION = "a buffer in the wrong direction for its queue"
    CONTROL_MALFORMED = "a control command without its class and command, or its ack byte"


class RingError(Exception):
    """A malformed ring or chain, with its reason and details."""

    def __init__(self, reason: Reason, detail: str = "") -> None:
        super().__init__(f"{reason.value}{': ' + detail if detail else ''}")
        self.reason = reason
        self.detail = detail
