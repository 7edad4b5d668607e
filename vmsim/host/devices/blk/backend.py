"""Where a virtio-blk device keeps its data: a raw image file, or memory."""

import errno
import mmap
import os
from collections.abc import Sequence


def _iov_max() -> int:
    """The most buffers one preadv / pwritev takes (1024 on Linux)."""
    try:
        n = os.sysconf("SC_IOV_MAX")
    except (ValueError, OSError):
        n = -1
    return n if n > 0 else 1024


IOV_MAX = _iov_max()


class BlkBackend:
    """Byte-addressed storage of a fixed size."""

    size: int
    description: str
    # The bytes themselves when the backend is memory (a RAM disk); requests copy straight
    # between it and guest RAM.
    mem: memoryview | None = None

    def read_into(self, offset: int, bufs: Sequence[memoryview]) -> int:
        """Read from `offset` into the buffers, in order."""
        raise NotImplementedError

    def write_from(self, offset: int, bufs: Sequence[memoryview]) -> int:
        """Write the buffers, in order, at `offset`."""
        raise NotImplementedError

    def read_one(self, offset: int, ram: memoryview, at: int, length: int) -> None:
        """Read `length` bytes from `offset` into ram[at:at+length] (one segment)."""
        self.read_into(offset, (ram[at:at + length],))

    def write_one(self, offset: int, ram: memoryview, at: int, length: int) -> None:
        """Write ram[at:at+length] at `offset` (one segment)."""
        self.write_from(offset, (ram[at:at + length],))

    def flush(self) -> None:
        raise NotImplementedError

    def resize(self, size: int) -> None:
        """Change the capacity (a host-side resize)."""
        raise NotImplementedError

    def close(self) -> None:
        pass


class FileBackend(BlkBackend):
    """A raw image file, read and written in place with preadv / pwritev straight between the
    file and guest RAM (no copy through Python objects); flush is fsync."""

    def __init__(self, path: str, size: int | None, readonly: bool, create: bool = True) -> None:
        self.path = path
        exists = os.path.exists(path)
        if not exists and not create:
            raise FileNotFoundError(path)
        flags = os.O_RDONLY if readonly and exists else os.O_RDWR | os.O_CREAT
        self.fd = os.open(path, flags | os.O_CLOEXEC, 0o644)
        cur = os.fstat(self.fd).st_size
        if size is not None and cur < size and not readonly:
            os.ftruncate(self.fd, size)   # a sparse raw image of the configured size
            cur = size
        self.size = cur
        self.description = f"file {path}"

    def read_into(self, offset: int, bufs: Sequence[memoryview]) -> int:
        want = sum(len(b) for b in bufs)
        n = 0
        # preadv takes at most IOV_MAX buffers; a request may have more (seg_max is the
        # queue size less two, as QEMU sets it)
        for k in range(0, len(bufs), IOV_MAX):
            part = bufs[k:k + IOV_MAX]
            got = os.preadv(self.fd, part, offset + n)
            n += got
            if got < sum(len(b) for b in part):
                break
        if n < want:
            # Past the end of the file (it shrank under us): zeros, as a sparse image reads.
            skip = n
            for b in bufs:
                if skip >= len(b):
                    skip -= len(b)
                    continue
                b[skip:] = bytes(len(b) - skip)
                skip = 0
        return want

    def write_from(self, offset: int, bufs: Sequence[memoryview]) -> int:
        done = 0
        for k in range(0, len(bufs), IOV_MAX):
            part = bufs[k:k + IOV_MAX]
            n = os.pwritev(self.fd, part, offset + done)
            done += n
            if n < sum(len(b) for b in part):
                raise OSError(errno.EIO, f"short write at {offset + done}")
        return done

    def flush(self) -> None:
        os.fsync(self.fd)

    def resize(self, size: int) -> None:
        os.ftruncate(self.fd, size)
        self.size = size

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class MemoryBackend(BlkBackend):
    """Anonymous memory: a RAM disk (for benchmarks and scratch devices)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._mm = mmap.mmap(-1, max(size, 1))
        self._mv = self.mem = memoryview(self._mm)
        self.description = "memory"

    def read_into(self, offset: int, bufs: Sequence[memoryview]) -> int:
        mv = self._mv
        done = 0
        for b in bufs:
            n = len(b)
            b[:] = mv[offset:offset + n]
            offset += n
            done += n
        return done

    def write_from(self, offset: int, bufs: Sequence[memoryview]) -> int:
        mv = self._mv
        done = 0
        for b in bufs:
            n = len(b)
            mv[offset:offset + n] = b
            offset += n
            done += n
        return done

    def read_one(self, offset: int, ram: memoryview, at: int, length: int) -> None:
        ram[at:at + length] = self._mv[offset:offset + length]

    def resize(self, size: int) -> None:
        mm = mmap.mmap(-1, max(size, 1))
        keep = min(size, self.size)
        mm[:keep] = self._mv[:keep]
        self._mv.release()
        self._mm.close()
        self._mm = mm
        self._mv = self.mem = memoryview(mm)
        self.size = size

    def write_one(self, offset: int, ram: memoryview, at: int, length: int) -> None:
        self._mv[offset:offset + length] = ram[at:at + length]

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self._mv.release()
        self._mm.close()
