"""virtio-console's own counters: per device and per port, reported in the run summary."""


class ConsoleMetrics:
    """The device's counters (the control protocol; emergency writes; size changes)."""

    __slots__ = ("control_errors", "control_in", "control_out", "control_truncated",
                 "emerg_writes", "resizes")

    def __init__(self) -> None:
        self.control_in = 0          # control messages the driver sent
        self.control_out = 0         # control messages put into the driver's buffers
        self.control_errors = 0      # malformed or misdirected messages from the driver
        self.control_truncated = 0   # messages longer than the buffer the driver posted
        self.emerg_writes = 0        # bytes written through emerg_wr
        self.resizes = 0             # size changes announced (config change or RESIZE)

    def as_dict(self) -> dict[str, int]:
        return {k: getattr(self, k) for k in self.__slots__}


class PortMetrics:
    """One port's data counters."""

    __slots__ = ("bytes_from_guest", "bytes_to_guest", "dropped_from_guest", "dropped_to_guest",
                 "writes_from_guest")

    def __init__(self) -> None:
        self.bytes_to_guest = 0      # bytes written into the port's receive buffers
        self.bytes_from_guest = 0    # bytes the guest transmitted on the port
        self.writes_from_guest = 0   # transmit buffers used
        self.dropped_to_guest = 0    # input lost (a reset with input still pending)
        self.dropped_from_guest = 0  # output the backend could not take (no reader, full)

    def as_dict(self) -> dict[str, int]:
        return {k: getattr(self, k) for k in self.__slots__}
