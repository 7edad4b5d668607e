"""Where a console port's bytes go on the host (QEMU's chardevs): a pseudo-terminal a person
attaches to, a log file, a Unix socket, or nothing.

A backend reads from its fds in the host's event loop (`loop.add_reader`) and hands what it
read to the device (`on_input`); it tells the device when its host end opens or closes
(`on_state`, which the device turns into VIRTIO_CONSOLE_PORT_OPEN). Guest output goes to
`write`, which never blocks the loop: what the backend cannot take at once (nobody reads the
terminal, the socket's buffer is full) is dropped and counted by the device, as a serial line
drops what nobody takes. The device asks a backend to stop reading (`pause_input`) while the
guest has not taken what it has already, so a fast writer meets the backend's own flow
control (the pty's or the socket's buffer) instead of losing bytes.
"""

import errno
import fcntl
import os
import socket
import stat
import struct
import termios
import tty
from collections.abc import Callable
from typing import Any, Protocol

READ_CHUNK = 4096
READS_PER_WAKEUP = 16

OnInput = Callable[[bytes], None]
OnState = Callable[[bool], None]


class Loop(Protocol):
    """What a backend needs of the host's event loop."""

    def add_reader(self, fd: int, cb: Callable[[int], None]) -> None: ...
    def remove_reader(self, fd: int) -> None: ...


class ConsoleBackend:
    """The host end of one port."""

    kind = ""
    description = ""
    # Whether someone on the host end takes what the guest writes (the PORT_OPEN the device
    # announces to the driver).
    connected = False

    def __init__(self) -> None:
        self.loop: Loop | None = None
        self.on_input: OnInput = lambda data: None
        self.on_state: OnState = lambda connected: None
        self.paused = False

    def attach(self, loop: Loop | None, on_input: OnInput, on_state: OnState) -> None:
        """Start reading (in `loop`; without one the backend only writes)."""
        self.loop = loop
        self.on_input = on_input
        self.on_state = on_state

    def write(self, data: bytes) -> int:
        """Take guest output; returns how many bytes were taken (the rest is dropped)."""
        return 0

    def window_size(self) -> tuple[int, int] | None:
        """(cols, rows) of the terminal on the host end, if there is one."""
        return None

    def pause_input(self) -> None:
        self.paused = True

    def resume_input(self) -> None:
        self.paused = False

    def describe(self) -> dict[str, Any]:
        return {"backend": self.kind}

    def close(self) -> None:
        pass


class NullBackend(ConsoleBackend):
    """No host end: output is discarded, no input ever comes."""

    kind = "none"
    description = "none"


class FileBackend(ConsoleBackend):
    """Guest output appended to a log file (created if missing). No input."""

    kind = "file"
    connected = True

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        self.description = f"file {path}"

    def write(self, data: bytes) -> int:
        done = 0
        while done < len(data):
            try:
                done += os.write(self.fd, data[done:])
            except OSError:
                break
        return done

    def describe(self) -> dict[str, Any]:
        return {"backend": self.kind, "path": self.path}

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class _Reader(ConsoleBackend):
    """A backend that reads one fd at a time in the loop (the pty's master, the socket's
    client), with pause / resume."""

    _rfd = -1

    def _start_reading(self) -> None:
        if self.loop is not None and self._rfd >= 0 and not self.paused:
            self.loop.add_reader(self._rfd, self._on_readable)

    def _stop_reading(self) -> None:
        if self.loop is not None and self._rfd >= 0:
            self.loop.remove_reader(self._rfd)

    def pause_input(self) -> None:
        if not self.paused:
            self._stop_reading()
        self.paused = True

    def resume_input(self) -> None:
        if self.paused:
            self.paused = False
            self._start_reading()

    def _read(self) -> bytes | None:
        """One read: bytes, b"" for end of file, None for nothing now."""
        raise NotImplementedError

    def _on_readable(self, _fd: int) -> None:
        for _ in range(READS_PER_WAKEUP):           # a bounded batch per wake-up
            if self.paused or self._rfd < 0:
                return
            data = self._read()
            if data is None:
                return
            if not data:
                self._hangup()
                return
            self.on_input(data)

    def _hangup(self) -> None:
        self._stop_reading()


class PtyBackend(_Reader):
    """A pseudo-terminal: the host holds the master, a person (or `vmsim console`, screen,
    minicom) opens the slave. The slave is raw (no echo, no line discipline: the guest's
    console does its own), and the host keeps it open, so the terminal is always "connected"
    and what the guest wrote while nobody watched waits in the pty's buffer for the next
    reader. The slave's path is linked from `link` (in the run directory) for tools to find.
    The terminal's window size (which `vmsim console` sets from the user's terminal) is the
    console's size."""

    kind = "pty"
    connected = True

    def __init__(self, link: str | None = None, size: tuple[int, int] = (80, 24)) -> None:
        super().__init__()
        master, slave = os.openpty()
        self.master, self.slave = master, slave
        self._rfd = master
        try:
            os.set_blocking(master, False)
            tty.setraw(slave, termios.TCSANOW)
            self.set_window_size(*size)
            self.path = os.ttyname(slave)
            self.link = link
            if link:
                try:
                    os.unlink(link)
                except FileNotFoundError:
                    pass
                os.symlink(self.path, link)
        except BaseException:
            os.close(master)
            os.close(slave)
            raise
        self.description = f"pty {self.path}"

    def attach(self, loop: Loop | None, on_input: OnInput, on_state: OnState) -> None:
        super().attach(loop, on_input, on_state)
        self._start_reading()

    def _read(self) -> bytes | None:
        try:
            return os.read(self.master, READ_CHUNK)
        except BlockingIOError:
            return None
        except OSError as e:
            if e.errno == errno.EIO:    # no slave open (the host holds one: not expected)
                return None
            raise

    def write(self, data: bytes) -> int:
        try:
            return os.write(self.master, data)
        except (BlockingIOError, InterruptedError):
            return 0                     # the pty's buffer is full: nobody reads
        except OSError:
            return 0

    def set_window_size(self, cols: int, rows: int) -> None:
        fcntl.ioctl(self.master, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))

    def window_size(self) -> tuple[int, int] | None:
        try:
            rows, cols, _, _ = struct.unpack(
                "HHHH", fcntl.ioctl(self.master, termios.TIOCGWINSZ, bytes(8)))
        except OSError:
            return None
        return cols, rows

    def describe(self) -> dict[str, Any]:
        return {"backend": self.kind, "path": self.path, "link": self.link}

    def close(self) -> None:
        if self.master >= 0:
            self._stop_reading()
            os.close(self.master)
            os.close(self.slave)
            self.master = self.slave = self._rfd = -1
        if self.link:
            try:
                if os.path.islink(self.link):
                    os.unlink(self.link)
            except OSError:
                pass


class SocketBackend(_Reader):
    """A listening Unix stream socket; one client at a time is the port's host end (a
    second one is refused: accepted and closed at once). The port is open while a client is
    connected."""

    kind = "socket"

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path
        if os.path.exists(path) or os.path.islink(path):
            if not stat.S_ISSOCK(os.lstat(path).st_mode):
                raise FileExistsError(errno.EEXIST, f"{path} exists and is not a socket")
            os.unlink(path)
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.listener.bind(path)
            self.listener.listen(1)
            self.listener.setblocking(False)
        except BaseException:
            self.listener.close()
            raise
        self.client: socket.socket | None = None
        self.clients = 0
        self.refused = 0
        self.description = f"socket {path}"

    def attach(self, loop: Loop | None, on_input: OnInput, on_state: OnState) -> None:
        super().attach(loop, on_input, on_state)
        if loop is not None:
            loop.add_reader(self.listener.fileno(), self._on_accept)

    def _on_accept(self, _fd: int) -> None:
        try:
            sock, _ = self.listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        if self.client is not None:
            self.refused += 1             # one client at a time
            sock.close()
            return
        sock.setblocking(False)
        self.client = sock
        self._rfd = sock.fileno()
        self.clients += 1
        self.connected = True
        self._start_reading()
        self.on_state(True)

    def _read(self) -> bytes | None:
        if self.client is None:
            return None
        try:
            return self.client.recv(READ_CHUNK)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError:
            return b""

    def _hangup(self) -> None:
        self._drop_client()

    def _drop_client(self) -> None:
        if self.client is None:
            return
        self._stop_reading()
        self.client.close()
        self.client = None
        self._rfd = -1
        self.connected = False
        self.on_state(False)

    def write(self, data: bytes) -> int:
        if self.client is None:
            return 0
        try:
            return self.client.send(data)
        except (BlockingIOError, InterruptedError):
            return 0
        except OSError:
            self._drop_client()
            return 0

    def describe(self) -> dict[str, Any]:
        return {"backend": self.kind, "path": self.path, "connected": self.connected,
                "clients": self.clients, "refused": self.refused}

    def close(self) -> None:
        if self.client is not None:
            self._stop_reading()
            self.client.close()
            self.client = None
            self.connected = False
        if self.listener.fileno() >= 0:
            if self.loop is not None:
                self.loop.remove_reader(self.listener.fileno())
            self.listener.close()
            try:
                os.unlink(self.path)
            except OSError:
                pass


def make_backend(kind: str, path: str | None, link: str | None,
                 size: tuple[int, int]) -> ConsoleBackend:
    """A backend from a port's spec."""
    if kind == "pty":
        return PtyBackend(link, size)
    if kind == "file":
        if not path:
            raise ValueError("a file backend needs a path")
        return FileBackend(path)
    if kind == "socket":
        if not path:
            raise ValueError("a socket backend needs a path")
        return SocketBackend(path)
    if kind == "none":
        return NullBackend()
    raise ValueError(f"console backend {kind!r} does not exist")
