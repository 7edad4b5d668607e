"""`vmsim backend DEVICE --socket PATH`: a standalone vhost-user backend.

It listens on PATH (a vhost-user server socket: QEMU's `-chardev socket,path=PATH`
connects), serves one frontend session at a time until it disconnects, then the next, until
SIGINT or SIGTERM. One thread: the session socket, every started ring's kick fd and the
device's own input are watched with one epoll; a kick drains the eventfd and serves the
ring until it is empty (vmsim's device-side queues and request handlers do the work).
Rings started without a kick fd (the frontend asked for polling) are served every
millisecond.
"""

import os
import select
import signal
import socket
import stat
import sys
from collections.abc import Callable

from vmsim.abi import features as F
from vmsim.vhost import protocol as P
from vmsim.vhost.devices import VhostDevice
from vmsim.vhost.session import Session, SessionError
from vmsim.vhost.wire import PeerClosed, WireError, recv_message


class BackendError(Exception):
    """The backend cannot start (the socket path is in use, the image is missing)."""


def _listen(path: str) -> socket.socket:
    """A listening socket at `path`; a stale socket file nobody listens on is replaced."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    if st is not None:
        if not stat.S_ISSOCK(st.st_mode):
            raise BackendError(f"{path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except OSError:
            os.unlink(path)         # stale: its server is gone
        else:
            raise BackendError(f"{path}: another backend is listening there")
        finally:
            probe.close()
    ls = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        ls.bind(path)
    except OSError as e:
        ls.close()
        raise BackendError(f"cannot listen on {path}: {e.strerror}") from None
    ls.listen(4)
    return ls


class Server:
    def __init__(self, device: VhostDevice, path: str,
                 log: Callable[[str], None] | None = None, trace: bool = False) -> None:
        self.device = device
        self.trace = trace
        self.path = path
        self.log = log or (lambda m: print(f"vmsim backend {device.name}: {m}",
                                           file=sys.stderr, flush=True))
        self.stop = False
        self.sessions = 0

    def run(self) -> int:
        ls = _listen(self.path)
        rfd, wfd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        old_wakeup = signal.set_wakeup_fd(wfd)
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        self.log(f"listening on {self.path}")
        try:
            while not self.stop:
                ready, _, _ = select.select([ls, rfd], [], [])
                if rfd in ready:
                    _drain(rfd)
                    continue
                conn, _ = ls.accept()
                self.sessions += 1
                self._session(conn, rfd)
        finally:
            for s, h in old.items():
                signal.signal(s, h)
            signal.set_wakeup_fd(old_wakeup)
            os.close(rfd)
            os.close(wfd)
            ls.close()
            try:
                os.unlink(self.path)
            except OSError:
                pass
            self.device.close()
        self.log(f"stopped after {self.sessions} session(s)")
        return 0

    def _on_signal(self, signum: int, frame: object) -> None:
        self.stop = True

    def _session(self, conn: socket.socket, wake_fd: int) -> None:
        n = self.sessions
        self.log(f"session {n}: frontend connected")
        s = Session(conn, self.device, lambda m: self.log(f"session {n}: {m}"), self.trace)
        why = "frontend disconnected"

        def ready(index: int) -> bool:
            # as Session.serve decides: started, not broken, enabled (or no protocol features)
            v = s.vrings[index]
            return v.queue is not None and not v.broken and (
                v.enabled or not s.features & F.bit(P.VHOST_USER_F_PROTOCOL_FEATURES))
        self.device.bind(ready)
        try:
            while not self.stop:
                # The fds are gathered afresh each pass (select, not a registered epoll set):
                # a kick fd the frontend replaces is closed here while the frontend still
                # holds the file, and an epoll registration would outlive our fd number.
                kicks = {v.kick_fd: v for v in s.vrings if v.kick_fd is not None}
                inputs = self.device.readable_fds()
                polling = any(v.started and v.kick_fd is None for v in s.vrings)
                ready, _, _ = select.select([conn, wake_fd, *kicks, *inputs], [], [],
                                            0.001 if polling else None)
                for fd in ready:
                    if fd is conn:
                        s.handle(recv_message(conn))
                        break           # the message may have changed any ring's fds
                    if fd == wake_fd:
                        _drain(fd)
                    elif fd in kicks:
                        _read_once(fd)
                        s.kick(kicks[fd])
                    elif fd in inputs:
                        self.device.on_readable(fd)
                        for i in self.device.pending():
                            s.serve(s.vrings[i])
                if polling:
                    for v in s.vrings:
                        if v.started and v.kick_fd is None:
                            s.serve(v)
            else:
                why = "stopping on a signal"
        except PeerClosed:
            pass
        except (WireError, SessionError) as e:
            why = f"closed: {e}"
        except OSError as e:
            why = f"closed: socket error: {e.strerror or e}"
        finally:
            stats = ", ".join(f"ring {v.index}: {v.kicks} kicks ({v.spurious_kicks} spurious), "
                              f"{v.calls} calls" for v in s.vrings)
            s.log(f"{why}; {s.messages} messages; {stats}; device so far: "
                  f"{self.device.describe()}")
            self.device.bind(None)
            s.close()
            conn.close()


def _read_once(fd: int) -> None:
    """Clear a kick: one read takes an eventfd's whole counter (select said readable)."""
    try:
        os.read(fd, 8)
    except OSError:
        pass


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 4096):
            pass
    except (BlockingIOError, OSError):
        pass
