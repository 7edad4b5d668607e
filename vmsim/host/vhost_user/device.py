"""A virtio device whose rings another process serves over vhost-user (QEMU's vhost-user-blk,
vhost-user-net with hw/virtio/vhost.c): the host keeps the control plane - the transport's
registers, status, feature negotiation, config space, interrupts - and hands the data plane to
the backend: guest RAM (the shared-memory object's fd), each ring's addresses, the kick eventfd
the guest's notify writes signal (KVM's ioeventfd: the backend is woken without the host), and
a call eventfd per ring that the host turns into the transport's interrupt.

The lifecycle follows vhost_dev_start / vhost_dev_stop: at DRIVER_OK the features the driver
accepted, the memory table and every ready ring go to the backend; at a reset each ring is
stopped with GET_VRING_BASE and the backend reset (RESET_DEVICE, or RESET_OWNER before it).
Anything the backend does wrong - a nack, no reply, a closed socket, an error on a ring's error
eventfd - fails this device (virtio_error: NEEDS_RESET and a config interrupt), never the host.
"""

import ctypes
import logging
import os
import socket
from collections.abc import Callable
from typing import Any

from vmsim.abi import blk as B
from vmsim.abi import console as C
from vmsim.abi import features as F
from vmsim.abi import ids
from vmsim.abi import net as N
from vmsim.abi import status as S
from vmsim.host.devices.net.config import build_config as net_config
from vmsim.host.memory import GuestMemory
from vmsim.host.vhost_user.connection import Connection, VhostUserError
from vmsim.host.virtio.device import QueueState, VirtioDevice
from vmsim.machine import shm
from vmsim.machine.eventfd import EventFd
from vmsim.machine.stats import D, Q
from vmsim.vhost import protocol as P
from vmsim.vhost.protocol import BackendReq, MemRegion, ProtocolFeature, Req
from vmsim.vhost.wire import WireError, recv_message, send_message

log = logging.getLogger("vmsim.host")

# Ring and transport features a vhost-user backend decides (it serves the rings). Not
# NOTIFICATION_DATA (a kick eventfd carries no data) nor RING_RESET (vhost-user has no
# per-ring reset).
RING_BITS = (F.bit(F.VIRTIO_F_VERSION_1) | F.bit(F.VIRTIO_RING_F_INDIRECT_DESC)
             | F.bit(F.VIRTIO_RING_F_EVENT_IDX) | F.bit(F.VIRTIO_F_RING_PACKED)
             | F.bit(F.VIRTIO_F_IN_ORDER))


class Profile:
    """What the frontend itself knows of a device type."""

    def __init__(self, device_id: int, feature_names: dict[int, str], backend_bits: int,
                 frontend_bits: int, config_size: int, remote_config: bool) -> None:
        self.device_id = device_id
        self.feature_names = feature_names
        self.backend_bits = backend_bits        # device bits the backend offers or not
        self.frontend_bits = frontend_bits      # device bits the frontend provides itself
        self.config_size = config_size
        self.remote_config = remote_config      # config space from GET_CONFIG


def _bits(*ns: int) -> int:
    return sum(1 << n for n in ns)


PROFILES = {
    "blk": Profile(ids.VIRTIO_ID_BLOCK, B.FEATURE_NAMES, _bits(*B.FEATURE_NAMES), 0,
                   B.CONFIG_SIZE, True),
    "console": Profile(ids.VIRTIO_ID_CONSOLE, C.FEATURE_NAMES,
                       _bits(C.VIRTIO_CONSOLE_F_SIZE, C.VIRTIO_CONSOLE_F_EMERG_WRITE), 0,
                       C.CONFIG_SIZE, True),
    # As QEMU's vhost-user net: the backend decides offloads and buffer layout; MAC and link
    # status are the frontend's (config space is its own); no control queue (QEMU serves it
    # in-process: vmsim's vhost-user net runs one pair without one).
    "net": Profile(ids.VIRTIO_ID_NET, N.FEATURE_NAMES,
                   _bits(N.VIRTIO_NET_F_CSUM, N.VIRTIO_NET_F_GUEST_CSUM,
                         N.VIRTIO_NET_F_GUEST_TSO4, N.VIRTIO_NET_F_GUEST_TSO6,
                         N.VIRTIO_NET_F_GUEST_ECN, N.VIRTIO_NET_F_GUEST_UFO,
                         N.VIRTIO_NET_F_HOST_TSO4, N.VIRTIO_NET_F_HOST_TSO6,
                         N.VIRTIO_NET_F_HOST_ECN, N.VIRTIO_NET_F_HOST_UFO,
                         N.VIRTIO_NET_F_MRG_RXBUF),
                   _bits(N.VIRTIO_NET_F_MAC, N.VIRTIO_NET_F_STATUS), N.CONFIG_SIZE, False),
}


def _address_of(buf: Any) -> int:
    """The virtual address of a mapping in this process (the "frontend virtual address"
    vhost-user ring addresses are given in, as QEMU gives its own)."""
    c = ctypes.c_char.from_buffer(buf)
    try:
        return ctypes.addressof(c)
    finally:
        del c


class RingLink:
    """One ring's eventfds on the frontend side and whether the backend runs it."""

    __slots__ = ("call", "err", "started")

    def __init__(self) -> None:
        self.call = EventFd()
        self.err = EventFd()
        self.started = False

    def close(self) -> None:
        self.call.close()
        self.err.close()


class VhostUserDevice(VirtioDevice):
    """The host's half of a device served by a vhost-user backend."""

    # the host loop neither serves these rings nor takes their kicks: the backend does
    rings_in_process = False

    def __init__(self, name: str, kind: str, mem: GuestMemory, ram_name: str,
                 conn: Connection, *, num_queues: int, queue_size: int, offer: int,
                 withhold: int, packed: bool, dev_stats: memoryview | None,
                 queue_stats: list[memoryview | None],
                 add_reader: Callable[[int, Callable[[int], None]], None],
                 remove_reader: Callable[[int], None], refuse_features_ok: bool = False,
                 mac: bytes = b"\0" * 6, mtu: int = N.ETH_DATA_LEN) -> None:
        self.kind = kind
        self.profile = p = PROFILES[kind]
        self.device_id = p.device_id
        self.feature_names = p.feature_names
        self.conn = conn
        self.ram_name = ram_name
        self._add_reader, self._remove_reader = add_reader, remove_reader
        self.mac, self.mtu, self.link_up = mac, mtu, True
        self.n_calls = 0
        self.live = False          # the backend has the features and memory (DRIVER_OK)
        self.mem_sent = False
        self.n_ring_errors = 0
        self.backend_error = ""
        backend = conn.features & ~F.bit(P.VHOST_USER_F_PROTOCOL_FEATURES)
        # Behind an IOMMU (the host hands a translating memory): the backend must translate
        # IOVAs itself (VIRTIO_F_IOMMU_PLATFORM, with its request channel for misses); the
        # host adds ACCESS_PLATFORM to the offer (vm.py) as for any device behind it.
        self.ram = mem.ram if getattr(mem, "translating", False) else mem
        self.iommu = getattr(mem, "iommu", None) if self.ram is not mem else None
        self.endpoint = getattr(mem, "endpoint", 0)
        if self.iommu is not None:
            if not backend & F.bit(F.VIRTIO_F_ACCESS_PLATFORM):
                raise VhostUserError(f"{conn.label}: the device is behind an IOMMU and the "
                                     f"backend does not offer VIRTIO_F_IOMMU_PLATFORM")
            for need in (ProtocolFeature.BACKEND_REQ, ProtocolFeature.REPLY_ACK):
                if not conn.has_protocol(need):
                    raise VhostUserError(f"{conn.label}: the device is behind an IOMMU and "
                                         f"the backend does not offer protocol feature "
                                         f"{need.name} (IOTLB messages need it)")
        features = backend & (RING_BITS | p.backend_bits) | p.frontend_bits
        if not packed:
            features &= ~F.bit(F.VIRTIO_F_RING_PACKED)
        features = (features | (offer & backend)) & ~withhold
        if p.remote_config and not conn.has_protocol(ProtocolFeature.CONFIG):
            raise VhostUserError(f"{conn.label}: the backend offers no "
                                 f"VHOST_USER_PROTOCOL_F_CONFIG; a vhost-user {kind} device "
                                 f"needs its config space")
        if conn.has_protocol(ProtocolFeature.MQ):
            have = conn.get_u64(Req.GET_QUEUE_NUM)
            if have < num_queues:
                raise VhostUserError(f"{conn.label}: the backend serves {have} queues, the "
                                     f"device needs {num_queues}")
        elif num_queues > (2 if kind == "net" else 1):
            raise VhostUserError(f"{conn.label}: {num_queues} queues need "
                                 f"VHOST_USER_PROTOCOL_F_MQ, which the backend does not offer")
        super().__init__(name, mem, num_queues, queue_size, features, dev_stats, queue_stats,
                         refuse_features_ok)
        self.links = [RingLink() for _ in range(num_queues)]
        for i, link in enumerate(self.links):
            add_reader(link.call.fileno(), self._call_handler(i))
            add_reader(link.err.fileno(), self._err_handler(i))
        # the backend closing its end (or writing unasked) is seen between requests
        add_reader(conn.fileno(), self._on_backend_readable)
        self.uva = _address_of(self.ram.mm)
        self.backend_chan: socket.socket | None = None
        self.n_iotlb_misses = self.n_iotlb_updates = self.n_iotlb_invalidates = 0
        self._unsubscribe = None
        if self.iommu is not None:
            self._open_backend_channel()
        self._config = bytearray(p.config_size)
        self.fetch_config()

    # ---- config space ----------------------------------------------------------------------------
    def fetch_config(self) -> None:
        """The backend's config space (GET_CONFIG), kept until the next reset."""
        if not self.profile.remote_config:
            return
        size = self.profile.config_size
        try:
            reply = self.conn.get(Req.GET_CONFIG, P.encode_config(0, 0, bytes(size)))
            _off, got, _flags, data = P.decode_config(reply)
        except P.PayloadError as e:
            raise VhostUserError(f"{self.conn.label}: GET_CONFIG: {e}") from None
        if got != size:
            raise VhostUserError(f"{self.conn.label}: GET_CONFIG: {got} bytes, asked {size}")
        self._config = bytearray(data)

    def config_space(self) -> bytearray:
        if self.profile.remote_config:
            return self._config
        return net_config(self.mac, self.link_up, 1, self.mtu)

    def write_config_space(self, offset: int, data: bytes) -> None:
        if not self.profile.remote_config:
            super().write_config_space(offset, data)
            return
        self._backend_call(lambda: self.conn.set(
            Req.SET_CONFIG, P.encode_config(offset, P.CONFIG_FLAG_WRITABLE, data)))
        self._config[offset:offset + len(data)] = data

    def set_link(self, up: bool) -> None:
        if not self.profile.remote_config and up != self.link_up:
            self.link_up = up
            self.config_changed()

    # ---- the data plane, handed over ------------------------------------------------------------
    def live_queues(self) -> list[QueueState]:
        return []

    def queue_enable(self, q: QueueState) -> bool:
        """The ring is the backend's to build; here only its registers are checked and its
        layout published for the dashboard (which reads the ring from guest RAM)."""
        if q.num > q.num_max:
            self.virtio_error(f"queue {q.index}: size {q.num}, the queue's maximum "
                              f"{q.num_max}")
            return False
        for addr, n in ((q.desc, 16), (q.driver, 4), (q.device, 4)):
            if not self.mem.check(addr, n):
                self.virtio_error(f"queue {q.index}: ring address 0x{addr:x} is outside "
                                  f"guest RAM")
                return False
        q.ready = True
        s = q.stats
        if s is not None:
            s[Q.SIZE] = q.num
            s[Q.RING] = int(self.negotiated(F.VIRTIO_F_RING_PACKED))
            s[Q.DESC_ADDR], s[Q.DRIVER_ADDR], s[Q.DEVICE_ADDR] = q.desc, q.driver, q.device
            s[Q.RAM_BASE] = self.ram.base
            s[Q.DEV_FEATURES] = self.driver_features
            s[Q.LAYOUT_GEN] += 1
            s[Q.READY] = 1
        if self.live and not self.links[q.index].started:   # enabled while live
            self._backend_call(lambda: self._start_ring(q))
        return True

    def on_driver_ok(self) -> None:
        self._backend_call(self._start)

    def _start(self) -> None:
        """vhost_dev_start: features, memory, then every ready ring."""
        c = self.conn
        # only what the backend offered (QEMU's vhost_ack_features): bits the frontend provides
        # itself (a net device's MAC, STATUS) are none of the backend's business
        acked = self.driver_features & c.features
        if c.features & F.bit(P.VHOST_USER_F_PROTOCOL_FEATURES):
            acked |= F.bit(P.VHOST_USER_F_PROTOCOL_FEATURES)
        c.set(Req.SET_FEATURES, P.encode_u64(acked))
        if not self.mem_sent:
            fd = shm.open_fd(self.ram_name)
            try:
                region = MemRegion(self.ram.base, self.ram.size, self.uva, 0)
                if c.has_protocol(ProtocolFeature.CONFIGURE_MEM_SLOTS):
                    # as QEMU: the slots the backend has, then the region on its own
                    if c.get_u64(Req.GET_MAX_MEM_SLOTS) < 1:
                        raise VhostUserError(f"{c.label}: GET_MAX_MEM_SLOTS: no slot")
                    c.set(Req.ADD_MEM_REG, P.encode_single_region(region), fds=[fd])
                else:
                    c.set(Req.SET_MEM_TABLE, P.encode_mem_table([region]), fds=[fd])
            finally:
                os.close(fd)
            # the backend keeps its memory across a device reset: sent once per connection
            self.mem_sent = True
        self.live = True
        for q in self.queues:
            if q.ready and not self.links[q.index].started:
                self._start_ring(q)

    def _start_ring(self, q: QueueState) -> None:
        c, i, link = self.conn, q.index, self.links[q.index]
        packed = self.negotiated(F.VIRTIO_F_RING_PACKED)
        # a fresh ring: index 0; a packed ring's wrap counters start at 1, on both sides
        base = P.packed_base(0, 1, 0, 1) if packed else 0
        c.set(Req.SET_VRING_NUM, P.encode_state(i, q.num))
        c.set(Req.SET_VRING_BASE, P.encode_state(i, base))
        # desc, used, avail in that order, as this process's virtual addresses
        c.set(Req.SET_VRING_ADDR, P.encode_addr(i, 0, self._uva(q.desc), self._uva(q.device),
                                                self._uva(q.driver)))
        # call and err before kick: the backend starts the ring on its kick fd
        c.set(Req.SET_VRING_CALL, P.encode_u64(i), fds=[link.call.fileno()])
        c.set(Req.SET_VRING_ERR, P.encode_u64(i), fds=[link.err.fileno()])
        c.set(Req.SET_VRING_KICK, P.encode_u64(i), fds=[q.kick.fileno()])
        if c.features & F.bit(P.VHOST_USER_F_PROTOCOL_FEATURES):
            c.set(Req.SET_VRING_ENABLE, P.encode_state(i, 1))
        link.started = True

    def _uva(self, addr: int) -> int:
        """A ring address as SET_VRING_ADDR carries it: the frontend's virtual address of a
        guest-physical one, or the IOVA itself behind an IOMMU (vhost's rule)."""
        if self.iommu is not None:
            return addr
        return self.uva + (addr - self.ram.base)

    # ---- the IOTLB (a device behind the IOMMU) ---------------------------------------------------
    def _open_backend_channel(self) -> None:
        """SET_BACKEND_REQ_FD: one end of a socket pair for the backend's requests (IOTLB
        misses, access failures); the endpoint's unmaps are forwarded as invalidations."""
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.conn.set(Req.SET_BACKEND_REQ_FD, fds=[theirs.fileno()])
        finally:
            theirs.close()
        self.backend_chan = mine
        self._add_reader(mine.fileno(), self._on_backend_request)
        self._unsubscribe = self.iommu.subscribe(self.endpoint, self._on_mapping)

    def _on_mapping(self, event: str, iova: int, size: int, _gpa: int, _perm: int) -> None:
        """The guest unmapped (or the endpoint was detached): the backend's IOTLB must forget
        it before the unmap completes (QEMU's vhost_iommu_unmap_notify). Maps are sent when
        the backend misses them, as QEMU does."""
        if event != "unmap" or self.conn.closed:
            return
        self.n_iotlb_invalidates += 1
        size = min(size, (1 << 64) - 1 - iova)      # a detach unmaps [0, 2^64): a u64 holds less
        self._backend_call(lambda: self.conn.set(Req.IOTLB_MSG, P.encode_iotlb(
            iova, size, 0, 0, P.VHOST_IOTLB_INVALIDATE)))

    def _on_backend_request(self, _fd: int) -> None:
        chan = self.backend_chan
        try:
            msg = recv_message(chan)
        except WireError as e:          # closed, or garbage: the backend is not to be trusted
            self._close_backend_channel()
            if not self.conn.closed:
                log.info("%s: backend request channel: %s", self.name, e)
            return
        msg.close_fds()
        ok = True
        if msg.request == BackendReq.IOTLB_MSG:
            try:
                iova, _size, _uaddr, perm, typ = P.decode_iotlb(msg.payload)
            except P.PayloadError as e:
                ok = False
                log.info("%s: backend IOTLB message: %s", self.name, e)
            else:
                if typ == P.VHOST_IOTLB_MISS:
                    ok = self._answer_miss(iova, perm)
                elif typ == P.VHOST_IOTLB_ACCESS_FAIL:
                    self.virtio_error(f"the vhost-user backend reports an IOMMU access "
                                      f"failure at IOVA 0x{iova:x}")
                else:
                    ok = False
        else:
            ok = False
        if msg.need_reply:
            try:
                send_message(chan, msg.request, P.encode_u64(0 if ok else 1), reply=True)
            except OSError:
                self._close_backend_channel()

    def _answer_miss(self, iova: int, perm: int) -> bool:
        """The backend needs the translation of `iova`: the endpoint's mapping as an UPDATE
        (host virtual address of its guest-physical target), or nothing if the guest did not
        map it - the backend then fails that access."""
        self.n_iotlb_misses += 1
        hit = self.iommu.iotlb(self.endpoint).lookup(iova)
        if hit is None:
            log.info("%s: IOTLB miss at IOVA 0x%x: not mapped by the guest", self.name, iova)
            return False
        start, size, gpa, have = hit
        self.n_iotlb_updates += 1
        self._backend_call(lambda: self.conn.set(Req.IOTLB_MSG, P.encode_iotlb(
            start, size, self.uva + (gpa - self.ram.base), have, P.VHOST_IOTLB_UPDATE)))
        return True

    def _close_backend_channel(self) -> None:
        if self.backend_chan is not None:
            self._remove_reader(self.backend_chan.fileno())
            self.backend_chan.close()
            self.backend_chan = None
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None

    def _stop(self) -> None:
        """vhost_dev_stop: every started ring stopped (GET_VRING_BASE), then the backend
        reset to its initial state."""
        c = self.conn
        self.live = False
        for i, link in enumerate(self.links):
            if link.started:
                link.started = False
                reply = c.get(Req.GET_VRING_BASE, P.encode_state(i, 0))
                try:
                    P.decode_state(reply)
                except P.PayloadError as e:
                    raise VhostUserError(f"{c.label}: GET_VRING_BASE: {e}") from None
        if c.has_protocol(ProtocolFeature.RESET_DEVICE):
            c.set(Req.RESET_DEVICE)
        else:
            c.set(Req.RESET_OWNER, ack=False)
            c.set(Req.SET_OWNER)

    def reset(self) -> None:
        was_live = self.live
        super().reset()
        if was_live and not self.conn.closed:
            self._backend_call(self._stop)
        if not self.conn.closed:
            self._backend_call(self.fetch_config)

    def queue_reset(self, q: QueueState) -> None:
        # RING_RESET is never offered (withheld above): nothing reaches here from a driver
        # that negotiated correctly; the queue is only forgotten.
        super().queue_reset(q)

    # ---- eventfds from the backend ---------------------------------------------------------------
    def _call_handler(self, i: int) -> Callable[[int], None]:
        link = self.links[i]

        def on_call(_fd: int) -> None:
            link.call.consume()
            self.n_calls += 1
            s = self.queues[i].stats
            if s is not None:
                s[Q.INTERRUPTS] += 1
            if self.transport is not None and self.status & S.DRIVER_OK:
                self.transport.signal_used(i)
        return on_call

    def _err_handler(self, i: int) -> Callable[[int], None]:
        link = self.links[i]

        def on_err(_fd: int) -> None:
            link.err.consume()
            self.n_ring_errors += 1
            q = self.queues[i]
            if not self.broken:
                self.virtio_error(f"queue {i}: the vhost-user backend reported an error on "
                                  f"the ring (its error eventfd)", q)
        return on_err

    def _on_backend_readable(self, _fd: int) -> None:
        """Between requests the backend has nothing to say: readable means it closed the
        connection (or broke the protocol)."""
        self._backend_gone(f"{self.conn.label}: the backend closed the connection")

    def _backend_gone(self, why: str) -> None:
        self._remove_reader(self.conn.fileno())
        self.conn.close()
        self.backend_error = why
        self.live = False
        for link in self.links:
            link.started = False
        if not self.broken:
            self.virtio_error(why)

    def _backend_call(self, fn: Callable[[], None]) -> None:
        """Run a request sequence; a backend failure fails this device, not the host."""
        if self.conn.closed:
            if not self.broken:
                self.virtio_error(self.backend_error or "the vhost-user backend is gone")
            return
        try:
            fn()
        except VhostUserError as e:
            log.warning("%s: %s", self.name, e)
            self._backend_gone(str(e))

    # ---- report ----------------------------------------------------------------------------------
    def describe(self) -> dict:
        iotlb = ({"misses": self.n_iotlb_misses, "updates": self.n_iotlb_updates,
                  "invalidates": self.n_iotlb_invalidates} if self.iommu is not None else None)
        return {"vhost_user": {"socket": self.conn.path, "messages": self.conn.messages,
                               "iotlb": iotlb,
                               "backend_features": self.conn.features,
                               "protocol_features": self.conn.acked_protocol,
                               "calls": self.n_calls, "ring_errors": self.n_ring_errors,
                               "error": self.backend_error or None}}

    def publish_stats(self) -> None:
        super().publish_stats()
        if self.stats is not None:
            self.stats[D.INTERRUPTS] = getattr(self.transport, "n_interrupts", 0)

    def close(self) -> None:
        if not self.conn.closed:
            self._remove_reader(self.conn.fileno())
            if self.live:
                try:
                    self._stop()
                except VhostUserError:
                    pass
            self.conn.close()
        self._close_backend_channel()
        for link in self.links:
            self._remove_reader(link.call.fileno())
            self._remove_reader(link.err.fileno())
            link.close()
        super().close()
