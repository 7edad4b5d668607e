"""virtio-blk's own counters (per device), reported in the run summary."""


class BlkMetrics:
    __slots__ = ("bytes_read", "bytes_written", "flushes", "get_id", "io_errors", "reads",
                 "unsupported", "writes")

    def __init__(self) -> None:
        self.reads = self.writes = self.flushes = self.get_id = 0
        self.bytes_read = self.bytes_written = 0
        self.io_errors = self.unsupported = 0

    def as_dict(self) -> dict[str, int]:
        return {k: getattr(self, k) for k in self.__slots__}
