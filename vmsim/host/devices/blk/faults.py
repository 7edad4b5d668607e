"""Backend faults a scenario injects at run time: I/O errors on a sector range.

The wrapper is put in front of the real backend only while a fault is set, so a disk without
faults pays nothing for them. It has no `mem`: requests go through read_one / write_one, where
the range is checked."""

from __future__ import annotations

import errno
from collections.abc import Sequence

from vmsim.host.devices.blk.backend import BlkBackend

SECTOR = 512


class FaultyBackend(BlkBackend):
    def __init__(self, inner: BlkBackend) -> None:
        self.inner = inner
        self.size = inner.size
        self.description = inner.description
        # (first sector, end sector exclusive, "read" | "write" | "any")
        self.ranges: list[tuple[int, int, str]] = []
        self.failed = 0

    def _check(self, offset: int, length: int, op: str) -> None:
        first, end = offset // SECTOR, (offset + max(length, 1) + SECTOR - 1) // SECTOR
        for lo, hi, kind in self.ranges:
            if first < hi and lo < end and kind in (op, "any"):
                self.failed += 1
                raise OSError(errno.EIO, f"injected I/O error at sectors {lo}..{hi - 1}")

    def read_into(self, offset: int, bufs: Sequence[memoryview]) -> int:
        self._check(offset, sum(len(b) for b in bufs), "read")
        return self.inner.read_into(offset, bufs)

    def write_from(self, offset: int, bufs: Sequence[memoryview]) -> int:
        self._check(offset, sum(len(b) for b in bufs), "write")
        return self.inner.write_from(offset, bufs)

    def read_one(self, offset: int, ram: memoryview, at: int, length: int) -> None:
        self._check(offset, length, "read")
        if self.inner.mem is not None:
            ram[at:at + length] = self.inner.mem[offset:offset + length]
        else:
            self.inner.read_one(offset, ram, at, length)

    def write_one(self, offset: int, ram: memoryview, at: int, length: int) -> None:
        self._check(offset, length, "write")
        if self.inner.mem is not None:
            self.inner.mem[offset:offset + length] = ram[at:at + length]
        else:
            self.inner.write_one(offset, ram, at, length)

    def flush(self) -> None:
        self.inner.flush()

    def resize(self, size: int) -> None:
        self.inner.resize(size)
        self.size = self.inner.size

    def close(self) -> None:
        self.inner.close()


def fail_io(handler: object, first: int, end: int, op: str) -> FaultyBackend:
    """Make requests touching sectors [first, end) fail with EIO (op: read, write or any)."""
    backend = handler.backend
    if not isinstance(backend, FaultyBackend):
        backend = FaultyBackend(backend)
        handler.backend = backend
    backend.ranges.append((first, end, op))
    return backend


def clear_faults(handler: object) -> int:
    """Remove every injected fault; how many requests they failed."""
    backend = handler.backend
    if isinstance(backend, FaultyBackend):
        handler.backend = backend.inner
        return backend.failed
    return 0
