"""virtio-net's own counters (per device), reported in the run summary."""


class NetMetrics:
    __slots__ = ("csum_completed", "ctrl_commands", "ctrl_errors", "rx_bytes",
                 "rx_dropped_filter", "rx_dropped_link", "rx_dropped_no_buffer",
                 "rx_dropped_too_big", "rx_frames", "rx_merged_buffers", "rx_starved", "tx_bytes",
                 "tx_dropped_link", "tx_dropped_oversize", "tx_errors", "tx_frames")

    def __init__(self) -> None:
        for k in self.__slots__:
            setattr(self, k, 0)

    def as_dict(self) -> dict[str, int]:
        return {k: getattr(self, k) for k in self.__slots__}
