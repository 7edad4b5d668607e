"""The frontend's end of one vhost-user connection (QEMU's hw/virtio/vhost-user.c): connect to
a backend's socket, send requests, wait for replies, and for a request without a reply of its
own ask for an ack (VHOST_USER_PROTOCOL_F_REPLY_ACK) so an error the backend finds is seen at
the request that caused it, not later.

The backend is another program: anything it answers is untrusted. A reply to another request,
a short payload, a nack, silence for REPLY_TIMEOUT_S or a closed socket is a VhostUserError
whose text names the request; the device then fails (virtio_error), the host goes on.
"""

import socket
import time

from vmsim.vhost import protocol as P
from vmsim.vhost.protocol import ProtocolFeature, Req, pbit
from vmsim.vhost.wire import PeerClosed, WireError, recv_message, send_message

# A reply slower than this is a hung backend.
REPLY_TIMEOUT_S = 5.0
# How long a backend may take to start listening (a spawned one is a new Python process).
CONNECT_TIMEOUT_S = 5.0

# What this frontend can use of the backend's protocol features.
FRONTEND_PROTOCOL_FEATURES = (pbit(ProtocolFeature.MQ) | pbit(ProtocolFeature.REPLY_ACK)
                              | pbit(ProtocolFeature.CONFIG)
                              | pbit(ProtocolFeature.RESET_DEVICE)
                              | pbit(ProtocolFeature.CONFIGURE_MEM_SLOTS))


class VhostUserError(Exception):
    """The backend is unreachable, closed the connection, or broke the protocol."""


def connect(path: str, timeout: float = CONNECT_TIMEOUT_S) -> socket.socket:
    """A connected socket to the backend listening at `path`, retried while it is starting."""
    deadline = time.monotonic() + timeout
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(path)
            return s
        except (FileNotFoundError, ConnectionRefusedError) as e:
            s.close()
            if time.monotonic() >= deadline:
                raise VhostUserError(f"no vhost-user backend listening at {path} after "
                                     f"{timeout:g} s: {e.strerror}") from None
            time.sleep(0.05)
        except OSError as e:
            s.close()
            raise VhostUserError(f"cannot connect to vhost-user backend at {path}: "
                                 f"{e.strerror}") from None


class Connection:
    """Request/reply over one connected socket; `features` and `protocol_features` are what
    the backend offered, `acked_protocol` what this frontend set."""

    def __init__(self, sock: socket.socket, label: str, path: str = "") -> None:
        self.sock = sock
        self.label = label
        self.path = path
        self.features = 0
        self.protocol_features = 0
        self.acked_protocol = 0
        self.messages = 0
        self.closed = False

    def fileno(self) -> int:
        return self.sock.fileno()

    def has_protocol(self, f: ProtocolFeature) -> bool:
        return bool(self.acked_protocol & pbit(f))

    def _send(self, req: Req, payload: bytes, fds: list[int] | None, need_reply: bool) -> None:
        if self.closed:
            raise VhostUserError(f"{self.label}: {req.name}: the connection is closed")
        try:
            send_message(self.sock, req, payload, need_reply=need_reply, fds=fds)
        except OSError as e:
            raise VhostUserError(f"{self.label}: {req.name}: sending failed: "
                                 f"{e.strerror or e}") from None
        self.messages += 1

    def _reply(self, req: Req) -> bytes:
        self.sock.settimeout(REPLY_TIMEOUT_S)
        try:
            msg = recv_message(self.sock)
        except TimeoutError:
            raise VhostUserError(f"{self.label}: {req.name}: no reply within "
                                 f"{REPLY_TIMEOUT_S:g} s") from None
        except PeerClosed:
            raise VhostUserError(f"{self.label}: {req.name}: the backend closed the "
                                 f"connection") from None
        except (WireError, OSError) as e:
            raise VhostUserError(f"{self.label}: {req.name}: bad reply: {e}") from None
        finally:
            try:
                self.sock.settimeout(None)
            except OSError:
                pass
        msg.close_fds()          # no reply a frontend asks for carries fds
        if msg.request != req or not msg.flags & P.FLAG_REPLY:
            raise VhostUserError(f"{self.label}: {req.name}: the reply is "
                                 f"{P.req_name(msg.request)} flags 0x{msg.flags:x}")
        return msg.payload

    def get(self, req: Req, payload: bytes = b"") -> bytes:
        """A request with a reply of its own (GET_*)."""
        self._send(req, payload, None, False)
        return self._reply(req)

    def get_u64(self, req: Req) -> int:
        try:
            return P.decode_u64(self.get(req))
        except P.PayloadError as e:
            raise VhostUserError(f"{self.label}: {req.name}: {e}") from None

    def set(self, req: Req, payload: bytes = b"", fds: list[int] | None = None,
            ack: bool = True) -> None:
        """A request without a reply; acked when REPLY_ACK was negotiated."""
        ack = ack and self.has_protocol(ProtocolFeature.REPLY_ACK)
        self._send(req, payload, fds, ack)
        if ack:
            try:
                status = P.decode_u64(self._reply(req))
            except P.PayloadError as e:
                raise VhostUserError(f"{self.label}: {req.name}: ack: {e}") from None
            if status:
                raise VhostUserError(f"{self.label}: {req.name}: the backend refused it "
                                     f"(status {status})")

    def handshake(self, backend_req: bool = False) -> None:
        """QEMU's vhost_user_backend_init: the features, then the protocol features, then
        SET_OWNER. `backend_req`: ask for the backend's request channel too (a device behind
        an IOMMU: IOTLB misses come on it)."""
        self.features = self.get_u64(Req.GET_FEATURES)
        if self.features & (1 << P.VHOST_USER_F_PROTOCOL_FEATURES):
            self.protocol_features = self.get_u64(Req.GET_PROTOCOL_FEATURES)
            want = FRONTEND_PROTOCOL_FEATURES
            if backend_req:
                want |= pbit(ProtocolFeature.BACKEND_REQ)
            acked = self.protocol_features & want
            # not acked: REPLY_ACK applies from the next message on (QEMU asks no ack here)
            self.set(Req.SET_PROTOCOL_FEATURES, P.encode_u64(acked), ack=False)
            self.acked_protocol = acked
        self.set(Req.SET_OWNER)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.sock.close()
