"""Notifications between the processes: an eventfd (KVM's ioeventfd / irqfd), or a pipe
standing in where os.eventfd does not exist, behind one small interface."""

import os


class EventFd:
    """A counter the other side can signal and this side can wait on (poll `fileno()`).

    With an eventfd, `rfd == wfd`; the pipe stand-in has two ends, both passed along."""

    __slots__ = ("rfd", "wfd")

    def __init__(self, rfd: int | None = None, wfd: int | None = None) -> None:
        if rfd is None:
            if hasattr(os, "eventfd"):
                rfd = wfd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            else:  # pragma: no cover - Linux always has eventfd
                rfd, wfd = os.pipe()
                os.set_blocking(rfd, False)
                os.set_blocking(wfd, False)
        self.rfd = rfd
        self.wfd = rfd if wfd is None else wfd

    @property
    def is_eventfd(self) -> bool:
        return self.rfd == self.wfd

    def fileno(self) -> int:
        return self.rfd

    def fds(self) -> list[int]:
        """The fds to send to the other process (one for an eventfd, two for a pipe)."""
        return [self.rfd] if self.is_eventfd else [self.rfd, self.wfd]

    def signal(self) -> None:
        """Add one to the counter (wakes a waiter)."""
        try:
            if self.rfd == self.wfd:
                os.eventfd_write(self.wfd, 1)
            else:  # pragma: no cover
                os.write(self.wfd, b"\x01")
        except BlockingIOError:  # counter saturated / pipe full: the waiter is already woken
            pass

    def consume(self) -> int:
        """Read and clear the counter; 0 if it was not signalled."""
        try:
            if self.rfd == self.wfd:
                return os.eventfd_read(self.rfd)
            return len(os.read(self.rfd, 4096))  # pragma: no cover
        except BlockingIOError:
            return 0

    def close(self) -> None:
        for fd in {self.rfd, self.wfd}:
            try:
                os.close(fd)
            except OSError:
                pass
