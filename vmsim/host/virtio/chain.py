"""A descriptor chain as the device sees it: its head id and the guest buffers it names.

The ring code validates every buffer against guest RAM and records it as (RAM offset, length);
`readable` / `writable` hand the buffers out as memoryviews of guest RAM (no copies), made on
demand so that a device that reads a header with one native load, or writes a status byte,
does not pay for views it does not use. Readable segments come first, then writable ones.
"""

from vmsim.host.memory import GuestMemory

# "Drivers MUST NOT add a descriptor chain longer than 2^32 bytes in total."
MAX_CHAIN_BYTES = 1 << 32
# Entries an indirect table may hold, if the queue is smaller. The spec bounds a chain by the
# queue size, but Linux builds one table for any number of segments when INDIRECT_DESC is
# negotiated, and QEMU accepts up to 1024 of them (VIRTQUEUE_MAX_SIZE); so do we.
INDIRECT_TABLE_MAX = 1024


def indirect_table_max(num: int) -> int:
    """The most entries an indirect table may hold on a queue of `num`."""
    return max(num, INDIRECT_TABLE_MAX)


class DescChain:
    """One available buffer."""

    __slots__ = ("head", "mem", "ndescs", "r_len", "r_off", "rlen", "w_len", "w_off", "wlen")

    def __init__(self, mem: GuestMemory) -> None:
        self.mem = mem
        self.head = 0
        self.r_off: list[int] = []
        self.r_len: list[int] = []
        self.w_off: list[int] = []
        self.w_len: list[int] = []
        self.rlen = 0
        self.wlen = 0
        self.ndescs = 0

    @property
    def readable(self) -> list[memoryview]:
        mv = self.mem.mv
        return [mv[o:o + n] for o, n in zip(self.r_off, self.r_len, strict=True)]

    @property
    def writable(self) -> list[memoryview]:
        mv = self.mem.mv
        return [mv[o:o + n] for o, n in zip(self.w_off, self.w_len, strict=True)]

    def _views(self, offs: list[int], lens: list[int], offset: int,
               length: int) -> list[memoryview]:
        mv = self.mem.mv
        views = []
        for o, n in zip(offs, lens, strict=True):
            if length <= 0:
                break
            if offset >= n:
                offset -= n
                continue
            take = min(n - offset, length)
            views.append(mv[o + offset:o + offset + take])
            length -= take
            offset = 0
        return views

    def readable_views(self, offset: int, length: int) -> list[memoryview]:
        """The readable part [offset, offset+length) as views (for pwritev)."""
        return self._views(self.r_off, self.r_len, offset, length)

    def writable_views(self, offset: int, length: int) -> list[memoryview]:
        """The writable part [offset, offset+length) as views (for preadv)."""
        return self._views(self.w_off, self.w_len, offset, length)

    def read_bytes(self, offset: int, length: int) -> bytes:
        """Up to `length` bytes of the readable part from `offset`, gathered across segments."""
        return b"".join(bytes(v) for v in self.readable_views(offset, length))

    def write_at(self, offset: int, data: bytes) -> int:
        """Scatter `data` into the writable part from `offset`; returns bytes written."""
        done = 0
        for view in self.writable_views(offset, len(data)):
            n = len(view)
            view[:] = data[done:done + n]
            done += n
        return done
