"""Messages between processes: msgpack over a Unix SOCK_SEQPACKET socket, fds by SCM_RIGHTS.

SEQPACKET keeps message boundaries, so one send is one message and fds travel with it. This
carries the traps (a guest's register accesses, answered by the host's transport emulation)
and the launcher's lifecycle messages; never the data path, which is rings and eventfds.
"""

import array
import select
import socket
import threading
from typing import Any

import msgpack

MAX_MESSAGE = 1 << 20
MAX_FDS = 253  # SCM_MAX_FD
_FDS_AHEAD = b"\xc1fds"      # 0xc1 is never the first byte of a msgpack object


class ChannelClosed(ConnectionError):
    """The peer closed the channel or died."""


class ChannelTimeout(TimeoutError):
    """No message arrived in time."""


def _pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def _unpack(data: bytes) -> Any:
    return msgpack.unpackb(data, raw=False, strict_map_key=False)


class Channel:
    """One end of a message channel. `call` is a locked request/response for threads that
    share the end (a guest's vCPU threads taking exits)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._lock = threading.Lock()

    @classmethod
    def pair(cls) -> tuple["Channel", "Channel"]:
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        return cls(a), cls(b)

    @classmethod
    def connect(cls, path: str) -> "Channel":
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        s.connect(path)
        return cls(s)

    @classmethod
    def from_fd(cls, fd: int) -> "Channel":
        return cls(socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET, fileno=fd))

    def fileno(self) -> int:
        return self.sock.fileno()

    def send(self, obj: Any, fds: list[int] | tuple[int, ...] = ()) -> None:
        # The kernel passes at most SCM_MAX_FD descriptors per message: more (a VM with a
        # hundred queues has two eventfds each) go ahead in messages of their own, which the
        # receiver gathers into the message that follows them.
        while len(fds) > MAX_FDS:
            self._send(_FDS_AHEAD, fds[:MAX_FDS])
            fds = fds[MAX_FDS:]
        self._send(_pack(obj), fds)

    def _send(self, data: bytes, fds: list[int] | tuple[int, ...]) -> None:
        try:
            if fds:
                self.sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                            array.array("i", fds))])
            else:
                self.sock.send(data)
        except (BrokenPipeError, ConnectionResetError, OSError) as e:
            raise ChannelClosed(str(e)) from e

    def recv(self, timeout: float | None = None) -> tuple[Any, list[int]]:
        """The next message and the fds that came with it (owned by the caller)."""
        if timeout is not None:
            p = select.poll()
            p.register(self.sock.fileno(), select.POLLIN)
            if not p.poll(max(0, int(timeout * 1000))):
                raise ChannelTimeout(f"no message in {timeout} s")
        ahead: list[int] = []
        while True:
            try:
                data, fds, _flags, _addr = socket.recv_fds(self.sock, MAX_MESSAGE, MAX_FDS,
                                                           socket.MSG_CMSG_CLOEXEC)
            except (ConnectionResetError, OSError) as e:
                for fd in ahead:
                    _close(fd)
                raise ChannelClosed(str(e)) from e
            if not data:
                for fd in ahead + fds:
                    _close(fd)
                raise ChannelClosed("peer closed the channel")
            if data == _FDS_AHEAD:
                ahead.extend(fds)
                continue
            return _unpack(data), ahead + fds

    def recv_obj(self, timeout: float | None = None) -> Any:
        """The next message, refusing fds (closed if any came)."""
        obj, fds = self.recv(timeout)
        for fd in fds:
            _close(fd)
        return obj

    def call(self, obj: Any, timeout: float | None = None) -> tuple[Any, list[int]]:
        """Send a request and wait for its answer, one caller at a time."""
        with self._lock:
            self.send(obj)
            return self.recv(timeout)

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def _close(fd: int) -> None:
    import os
    try:
        os.close(fd)
    except OSError:
        pass
