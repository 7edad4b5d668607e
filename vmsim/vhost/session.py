"""One frontend connection to a vhost-user backend, message by message (the backend side of
vhost-user.rst's "Front-end message types").

The frontend is untrusted: a malformed message, a request out of place (a protocol-feature
message before VHOST_USER_F_PROTOCOL_FEATURES was offered, a ring index past the device's
queues, a memory table vmsim cannot map) is a SessionError whose text the server logs in one
line before it closes the connection. A bad ring (what the guest wrote) is not the
frontend's fault: that ring stops being served, the error fd is signalled, the session goes on.
"""

import socket
from collections.abc import Callable

from vmsim.abi import features as F
from vmsim.host.virtio.errors import RingError
from vmsim.vhost import protocol as P
from vmsim.vhost.devices import VhostDevice
from vmsim.vhost.memory import MAX_MEM_SLOTS, MemoryTable, MemoryTableError
from vmsim.vhost.protocol import PayloadError, ProtocolFeature, Req, pbit
from vmsim.vhost.vring import Vring
from vmsim.vhost.wire import Message, send_message

PROTOCOL_FEATURES = (pbit(ProtocolFeature.MQ) | pbit(ProtocolFeature.REPLY_ACK)
                     | pbit(ProtocolFeature.CONFIG) | pbit(ProtocolFeature.RESET_DEVICE)
                     | pbit(ProtocolFeature.CONFIGURE_MEM_SLOTS))


class SessionError(Exception):
    """The frontend broke the protocol; the session ends."""


class Session:
    """The state one frontend set up, and the service of its rings."""

    def __init__(self, sock: socket.socket, device: VhostDevice,
                 log: Callable[[str], None], trace: bool = False) -> None:
        self.sock = sock
        self.trace = trace
        self.device = device
        self.log = log
        self.offered = device.features | F.bit(P.VHOST_USER_F_PROTOCOL_FEATURES)
        self.features = 0
        self.protocol_features = 0
        self.owner = False
        self.mem = MemoryTable()
        self.vrings = [Vring(i) for i in range(device.num_queues)]
        self.messages = 0

    # ---- messages --------------------------------------------------------------------------------
    def handle(self, msg: Message) -> None:
        """Act on one message and send its reply, if it has one."""
        self.messages += 1
        try:
            req = Req(msg.request)
        except ValueError:
            msg.close_fds()
            raise SessionError(f"unknown request {msg.request}") from None
        if self.trace:
            self.log(f"<- {req.name} flags 0x{msg.flags:x} {msg.payload[:48].hex()} "
                     f"fds {len(msg.fds)}")
        handler = getattr(self, "_" + req.name.lower(), None)
        if handler is None:
            msg.close_fds()
            raise SessionError(f"{req.name} is not supported by this backend")
        try:
            reply = handler(msg)
        except (PayloadError, MemoryTableError) as e:
            raise SessionError(f"{req.name}: {e}") from None
        finally:
            msg.close_fds()         # any fd the handler did not take
        if req in P.HAS_REPLY:
            send_message(self.sock, req, reply or b"", reply=True)
        elif msg.need_reply and self.protocol_features & pbit(ProtocolFeature.REPLY_ACK):
            ok = reply is None or reply is True
            send_message(self.sock, req, P.encode_u64(0 if ok else 1), reply=True)

    def _vring(self, index: int, req: str) -> Vring:
        if index >= len(self.vrings):
            raise SessionError(f"{req}: ring {index}, the device has {len(self.vrings)}")
        return self.vrings[index]

    def _need_protocol(self, req: str) -> None:
        if not self.offered & F.bit(P.VHOST_USER_F_PROTOCOL_FEATURES):
            raise SessionError(f"{req} without VHOST_USER_F_PROTOCOL_FEATURES")

    def _get_features(self, msg: Message) -> bytes:
        return P.encode_u64(self.offered)

    def _set_features(self, msg: Message) -> None:
        acked = P.decode_u64(msg.payload)
        if acked & ~self.offered:
            raise SessionError(f"SET_FEATURES 0x{acked:x} has bits not offered "
                               f"(0x{acked & ~self.offered:x})")
        self.features = acked
        self.device.set_features(acked & ~F.bit(P.VHOST_USER_F_PROTOCOL_FEATURES))

    def _get_protocol_features(self, msg: Message) -> bytes:
        self._need_protocol("GET_PROTOCOL_FEATURES")
        return P.encode_u64(PROTOCOL_FEATURES)

    def _set_protocol_features(self, msg: Message) -> None:
        self._need_protocol("SET_PROTOCOL_FEATURES")
        pf = P.decode_u64(msg.payload)
        if pf & ~PROTOCOL_FEATURES:
            raise SessionError(f"SET_PROTOCOL_FEATURES 0x{pf:x} has bits not offered")
        self.protocol_features = pf

    def _has_protocol(self, f: ProtocolFeature, req: str) -> None:
        if not self.protocol_features & pbit(f):
            raise SessionError(f"{req} without protocol feature {f.name}")

    def _set_owner(self, msg: Message) -> None:
        self.owner = True

    def _reset_owner(self, msg: Message) -> None:
        # Deprecated; the spec recommends treating it as "disable all rings".
        for v in self.vrings:
            v.stop()
            v.set_kick(None)
            v.enabled = False

    def _reset_device(self, msg: Message) -> None:
        self._has_protocol(ProtocolFeature.RESET_DEVICE, "RESET_DEVICE")
        self.reset()

    def reset(self) -> None:
        """Every ring stopped and forgotten; features back to none; memory kept (the
        frontend sends a new table when it starts the device again)."""
        for v in self.vrings:
            v.close()
        self.vrings = [Vring(i) for i in range(self.device.num_queues)]
        self.features = 0
        self.device.set_features(0)

    def _get_queue_num(self, msg: Message) -> bytes:
        self._has_protocol(ProtocolFeature.MQ, "GET_QUEUE_NUM")
        return P.encode_u64(self.device.num_queues)

    def _get_max_mem_slots(self, msg: Message) -> bytes:
        self._has_protocol(ProtocolFeature.CONFIGURE_MEM_SLOTS, "GET_MAX_MEM_SLOTS")
        return P.encode_u64(MAX_MEM_SLOTS)

    # ---- memory ----------------------------------------------------------------------------------
    def _remap(self, change: Callable[[], None]) -> None:
        """Change the memory table with the running rings rebuilt on the new window."""
        running = [(v, v.positions()) for v in self.vrings if v.started]
        for v, _ in running:
            v.stop()
        self.device.attach(None)
        change()
        self.device.attach(self.mem.mem)
        for v, base in running:
            v.base = base
            self._start(v)

    def _set_mem_table(self, msg: Message) -> None:
        regions = P.decode_mem_table(msg.payload)
        fds, msg.fds = msg.fds, []
        self._remap(lambda: self.mem.set_table(regions, fds))
        self.log(f"memory: {self.mem.describe()}")

    def _add_mem_reg(self, msg: Message) -> None:
        self._has_protocol(ProtocolFeature.CONFIGURE_MEM_SLOTS, "ADD_MEM_REG")
        r = P.decode_single_region(msg.payload)
        if len(msg.fds) != 1:
            raise SessionError(f"ADD_MEM_REG with {len(msg.fds)} fds, expected 1")
        fd = msg.take_fd()
        self._remap(lambda: self.mem.add_region(r, fd))
        self.log(f"memory: added {r}")

    def _rem_mem_reg(self, msg: Message) -> None:
        self._has_protocol(ProtocolFeature.CONFIGURE_MEM_SLOTS, "REM_MEM_REG")
        r = P.decode_single_region(msg.payload)
        self._remap(lambda: self.mem.remove_region(r))
        self.log(f"memory: removed {r}")

    # ---- rings -----------------------------------------------------------------------------------
    def _set_vring_num(self, msg: Message) -> None:
        index, num = P.decode_state(msg.payload)
        v = self._vring(index, "SET_VRING_NUM")
        if not 0 < num <= 32768:
            raise SessionError(f"SET_VRING_NUM: ring {index} size {num}")
        v.num = num

    def _set_vring_base(self, msg: Message) -> None:
        index, num = P.decode_state(msg.payload)
        self._vring(index, "SET_VRING_BASE").base = num

    def _set_vring_addr(self, msg: Message) -> None:
        index, flags, desc, used, avail, _log = P.decode_addr(msg.payload)
        v = self._vring(index, "SET_VRING_ADDR")
        if flags & (1 << P.VHOST_VRING_F_LOG):
            raise SessionError("SET_VRING_ADDR asks for used-ring logging, which was not offered")
        v.desc_uva, v.used_uva, v.avail_uva = desc, used, avail
        v.addr_set = True

    def _get_vring_base(self, msg: Message) -> bytes:
        index, _ = P.decode_state(msg.payload)
        v = self._vring(index, "GET_VRING_BASE")
        base = v.stop()
        v.set_kick(None)        # stopped: a later kick must not restart it
        return P.encode_state(index, base)

    def _vring_fd(self, msg: Message, req: str) -> tuple[Vring, int | None]:
        u = P.decode_u64(msg.payload)
        v = self._vring(u & P.VRING_IDX_MASK, req)
        nofd = bool(u & P.VRING_NOFD_MASK)
        if nofd != (not msg.fds) or len(msg.fds) > 1:
            raise SessionError(f"{req}: {len(msg.fds)} fds with the no-fd flag "
                               f"{'set' if nofd else 'clear'}")
        return v, msg.take_fd()

    def _set_vring_kick(self, msg: Message) -> None:
        v, fd = self._vring_fd(msg, "SET_VRING_KICK")
        v.set_kick(fd)
        if not v.started:       # started now (vhost-user: on the kick fd, or its first kick)
            self._start(v)

    def _set_vring_call(self, msg: Message) -> None:
        v, fd = self._vring_fd(msg, "SET_VRING_CALL")
        v.set_call(fd)

    def _set_vring_err(self, msg: Message) -> None:
        v, fd = self._vring_fd(msg, "SET_VRING_ERR")
        v.set_err(fd)

    def _set_vring_enable(self, msg: Message) -> None:
        index, num = P.decode_state(msg.payload)
        v = self._vring(index, "SET_VRING_ENABLE")
        if not self.features & F.bit(P.VHOST_USER_F_PROTOCOL_FEATURES):
            raise SessionError("SET_VRING_ENABLE without VHOST_USER_F_PROTOCOL_FEATURES")
        v.enabled = bool(num)
        if v.enabled:
            self.serve(v)       # kicks that came while it was disabled were not served

    def _get_config(self, msg: Message) -> bytes:
        self._has_protocol(ProtocolFeature.CONFIG, "GET_CONFIG")
        offset, size, flags, _ = P.decode_config(msg.payload)
        cfg = self.device.config()
        data = cfg[offset:offset + size].ljust(size, b"\0")
        return P.encode_config(offset, flags, data)

    def _set_config(self, msg: Message) -> bool:
        self._has_protocol(ProtocolFeature.CONFIG, "SET_CONFIG")
        offset, _size, _flags, data = P.decode_config(msg.payload)
        ok = self.device.set_config(offset, data)
        if not ok:
            self.log(f"SET_CONFIG of {len(data)} bytes at {offset} refused (read-only)")
        return ok

    # ---- ring service ----------------------------------------------------------------------------
    def _start(self, v: Vring) -> None:
        """Build the ring's queue if everything it needs is there."""
        mem = self.mem.mem
        if v.started or not v.addr_set or not v.num or mem is None:
            return
        packed = bool(self.features & F.bit(F.VIRTIO_F_RING_PACKED))
        try:
            # user addresses of desc, avail (driver area), used (device area) -> guest-physical
            gpas = (self.mem.uva_to_gpa(v.desc_uva, 16),
                    self.mem.uva_to_gpa(v.avail_uva, 4),
                    self.mem.uva_to_gpa(v.used_uva, 4))
            v.start(mem, gpas, packed, F.has(self.features, F.VIRTIO_RING_F_EVENT_IDX),
                    F.has(self.features, F.VIRTIO_RING_F_INDIRECT_DESC))
        except (RingError, MemoryTableError) as e:
            self._broken(v, str(e))
            return
        self.serve(v)       # buffers made available before the ring (re)started

    def _broken(self, v: Vring, why: str) -> None:
        v.broken = why
        self.log(f"ring {v.index}: {why}; the ring is no longer served")
        v.signal_error()

    def kick(self, v: Vring) -> None:
        """The ring's kick fd was readable (already drained by the caller)."""
        v.kicks += 1
        if not v.started:
            self._start(v)
        if not self.serve(v):
            v.spurious_kicks += 1

    def serve(self, v: Vring) -> int:
        """Serve a started, enabled ring until it is empty; the buffers used."""
        q = v.queue
        if q is None or v.broken:
            return 0
        # Without protocol features rings are enabled once started; with them, only after
        # SET_VRING_ENABLE 1.
        if not v.enabled and self.features & F.bit(P.VHOST_USER_F_PROTOCOL_FEATURES):
            return 0
        total = 0
        idle = 0
        try:
            while True:
                q.disable_notify()
                n = self.device.serve(v.index, q)
                total += n
                if n and q.need_notify():
                    v.call()
                # Re-arm, then look once more: buffers made available meanwhile would
                # otherwise wait for a kick the driver will not send. A device that cannot
                # use what is there (a console with no input) stops after a pass that did
                # nothing.
                if not q.enable_notify():
                    break
                idle = 0 if n else idle + 1
                if idle >= 2:
                    break
        except RingError as e:
            self._broken(v, str(e))
        return total

    def close(self) -> None:
        for v in self.vrings:
            v.close()
        self.device.attach(None)
        self.mem.close()
