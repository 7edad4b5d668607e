"""One vhost-user message on an AF_UNIX SOCK_STREAM socket: a 12-byte header, the payload,
and fds in the ancillary data of the header's bytes (SCM_RIGHTS). Side-neutral: a backend
reads requests and writes replies with it, a frontend the other way round.

Everything received is untrusted: a wrong version, unknown flag bits, a payload larger than
any request has, more fds than a message carries, a truncated message or a peer that stops
half-way through one are WireErrors with a message saying which; the fds that came with a bad
message are closed, never leaked.
"""

import array
import os
import socket
from dataclasses import dataclass, field

from vmsim.vhost import protocol as P

# How long the rest of a message may take once its first byte arrived.
MESSAGE_TIMEOUT_S = 5.0


class WireError(Exception):
    """The peer sent something that is not a well-formed vhost-user message."""


class PeerClosed(WireError):
    """The peer closed the connection between messages (a normal end of session)."""


@dataclass
class Message:
    request: int
    flags: int
    payload: bytes = b""
    fds: list[int] = field(default_factory=list)

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & P.FLAG_NEED_REPLY)

    def take_fd(self) -> int | None:
        """The message's one fd, now the caller's to close; None if it came without."""
        return self.fds.pop(0) if self.fds else None

    def close_fds(self) -> None:
        _close(self.fds)
        self.fds.clear()


def _close(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def _recv_exact(sock: socket.socket, n: int, fds: list[int], first: bool = False) -> bytes:
    """n bytes, collecting any fds that arrive with them."""
    buf = bytearray()
    space = socket.CMSG_SPACE(P.MAX_FDS * 4)
    while len(buf) < n:
        try:
            data, anc, flags, _ = sock.recvmsg(n - len(buf), space)
        except TimeoutError:
            raise WireError(f"message truncated: {len(buf)} of {n} bytes arrived, then "
                            f"nothing for {MESSAGE_TIMEOUT_S:g} s") from None
        for level, typ, cdata in anc:
            if level == socket.SOL_SOCKET and typ == socket.SCM_RIGHTS:
                a = array.array("i")
                a.frombytes(cdata[:len(cdata) - len(cdata) % a.itemsize])
                fds.extend(a)
        if flags & socket.MSG_CTRUNC:
            raise WireError(f"more than {P.MAX_FDS} fds with one message")
        if not data:
            if first:
                raise PeerClosed("peer closed the connection")
            raise WireError(f"message truncated: {len(buf)} of {n} bytes, then end of stream")
        buf += data
    return bytes(buf)


def recv_message(sock: socket.socket) -> Message:
    """Read one message (blocking until its first byte; the rest must follow promptly)."""
    fds: list[int] = []
    old = sock.gettimeout()
    try:
        first = _recv_exact(sock, 1, fds, first=True)
        sock.settimeout(MESSAGE_TIMEOUT_S)
        header = first + _recv_exact(sock, P.HEADER_SIZE - 1, fds)
        request, flags, size = P.HEADER.unpack(header)
        if flags & P.VERSION_MASK != P.VERSION:
            raise WireError(f"{P.req_name(request)}: version {flags & P.VERSION_MASK}, "
                            f"expected {P.VERSION}")
        if flags & ~P.KNOWN_FLAGS:
            raise WireError(f"{P.req_name(request)}: unknown flag bits 0x{flags:x}")
        if size > P.MAX_PAYLOAD:
            raise WireError(f"{P.req_name(request)}: payload size {size} "
                            f"exceeds {P.MAX_PAYLOAD}")
        payload = _recv_exact(sock, size, fds) if size else b""
        if len(fds) > P.MAX_FDS:
            raise WireError(f"{P.req_name(request)}: {len(fds)} fds, at most {P.MAX_FDS}")
        return Message(request, flags, payload, fds)
    except BaseException:
        _close(fds)
        raise
    finally:
        try:
            sock.settimeout(old)
        except OSError:
            pass


def send_message(sock: socket.socket, request: int, payload: bytes = b"", *,
                 reply: bool = False, need_reply: bool = False,
                 fds: list[int] | None = None) -> None:
    """Write one message, with `fds` (SCM_RIGHTS) on its header."""
    flags = P.VERSION | (P.FLAG_REPLY if reply else 0) | (P.FLAG_NEED_REPLY if need_reply else 0)
    data = P.HEADER.pack(request, flags, len(payload)) + payload
    if fds:
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
        n = sock.sendmsg([data], anc)
    else:
        n = sock.send(data)
    if n < len(data):
        sock.sendall(data[n:])
