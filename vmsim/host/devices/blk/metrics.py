"""virtio-blk's own counters (per device), reported in the run summary.

`io_errors` counts every request answered VIRTIO_BLK_S_IOERR; the counters after it say why
(each such request counts in exactly one of them): a header missing or shorter than 16 bytes,
data in the wrong direction for the request type (readable data on a read, writable on a
write), a data length not a multiple of 512, sectors past the capacity, more data segments
than seg_max, a write to a read-only disk, an error of the backend."""


class BlkMetrics:
    __slots__ = ("backend_errors", "bad_direction", "bad_header", "bad_length", "bytes_read",
                 "bytes_written", "flushes", "get_id", "io_errors", "out_of_range",
                 "readonly_writes", "reads", "too_many_segments", "unsupported", "writes")

    def __init__(self) -> None:
        self.reads = self.writes = self.flushes = self.get_id = 0
        self.bytes_read = self.bytes_written = 0
        self.io_errors = self.unsupported = 0
        self.bad_header = self.bad_direction = self.bad_length = self.out_of_range = 0
        self.too_many_segments = self.readonly_writes = self.backend_errors = 0

    def as_dict(self) -> dict[str, int]:
        return {k: getattr(self, k) for k in self.__slots__}
