"""One frontend connection to a vhost-user backend, message by message (the backend side of
vhost-user.rst's "Front-end message types").

The frontend is untrusted: a malformed message, a request out of place (a protocol-feature
message before VHOST_USER_F_PROTOCOL_FEATURES was offered, a ring index past the device's
queues, a memory table vmsim cannot map) is a SessionError whose text the server logs in one
line before it closes the connection. A bad ring (what the guest wrote) is not the
frontend's fault: that ring stops being served, the error fd is signalled, the session goes on.
"""

import os
import socket
import time
from collections.abc import Callable

from vmsim.abi import features as F
from vmsim.host.iommu import PERM_NAMES, IommuFault, Iotlb
from vmsim.host.iommu_rings import IotlbRingError
from vmsim.host.memory import IotlbMemory
from vmsim.host.virtio.errors import RingError
from vmsim.vhost import protocol as P
from vmsim.vhost.devices import VhostDevice
from vmsim.vhost.memory import MAX_MEM_SLOTS, MemoryTable, MemoryTableError
from vmsim.vhost.protocol import PayloadError, ProtocolFeature, Req, pbit
from vmsim.vhost.vring import Vring
from vmsim.vhost.wire import Message, send_message

PROTOCOL_FEATURES = (pbit(ProtocolFeature.MQ) | pbit(ProtocolFeature.REPLY_ACK)
                     | pbit(ProtocolFeature.CONFIG) | pbit(ProtocolFeature.RESET_DEVICE)
                     | pbit(ProtocolFeature.CONFIGURE_MEM_SLOTS)
                     | pbit(ProtocolFeature.BACKEND_REQ))
# VIRTIO_F_IOMMU_PLATFORM (the spec's ACCESS_PLATFORM): offered always, as DPDK's backends do
# with IOMMU support; a frontend acks it only when its device sits behind a vIOMMU. It needs
# REPLY_ACK and BACKEND_REQ (QEMU refuses it without them): IOTLB updates are acknowledged,
# misses are asked on the backend channel.
IOMMU_PLATFORM = F.bit(F.VIRTIO_F_ACCESS_PLATFORM)
IOMMU_PROTOCOL = pbit(ProtocolFeature.REPLY_ACK) | pbit(ProtocolFeature.BACKEND_REQ)
# A ring waiting for the translation of an IOTLB miss longer than this is stopped at the next
# event (a message or a kick): the frontend sends nothing for an IOVA its guest did not map.
IOTLB_MISS_TIMEOUT_S = 1.0


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
        self.offered = (device.features | F.bit(P.VHOST_USER_F_PROTOCOL_FEATURES)
                        | IOMMU_PLATFORM)
        self.features = 0
        self.protocol_features = 0
        self.owner = False
        self.mem = MemoryTable()
        self.vrings = [Vring(i) for i in range(device.num_queues)]
        self.messages = 0
        # ADD_MEM_REG of a region already there, counted (see _add_mem_reg)
        self.region_refs: dict[tuple[int, int, int], int] = {}
        self.backend_sock: socket.socket | None = None   # SET_BACKEND_REQ_FD's channel
        # IOTLB: the frontend's entries (targets its user addresses) and the same entries
        # by guest-physical address in the memory window (what the rings translate with)
        self.iotlb_uva = Iotlb()
        self.iotlb_gpa = Iotlb()
        self.iotlb_mem: IotlbMemory | None = None
        self.misses = self.iotlb_updates = self.iotlb_invalidates = 0

    # ---- messages --------------------------------------------------------------------------------
    def handle(self, msg: Message) -> None:
        """Act on one message and send its reply, if it has one."""
        self.messages += 1
        self._check_misses()
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
        if acked & IOMMU_PLATFORM and self.protocol_features & IOMMU_PROTOCOL != IOMMU_PROTOCOL:
            raise SessionError("SET_FEATURES acks VIRTIO_F_IOMMU_PLATFORM without the protocol "
                               "features it needs (REPLY_ACK and BACKEND_REQ)")
        self.features = acked
        self.device.set_features(acked & ~(F.bit(P.VHOST_USER_F_PROTOCOL_FEATURES)
                                           | IOMMU_PLATFORM))

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
        self.iotlb_uva.clear()
        self.iotlb_gpa.clear()

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
        self._rebuild_iotlb()
        for v, base in running:
            v.base = base
            self._start(v)

    def _set_mem_table(self, msg: Message) -> None:
        regions = P.decode_mem_table(msg.payload)
        fds, msg.fds = msg.fds, []
        self._remap(lambda: self.mem.set_table(regions, fds))
        self.region_refs = {(r.gpa, r.size, r.uva): 1 for r in regions}
        self.log(f"memory: {self.mem.describe()}")

    def _add_mem_reg(self, msg: Message) -> None:
        """A multiqueue vhost-user netdev is one vhost device per queue pair on one
        connection, each sending the memory map: the same region (guest address, size, user
        address) comes once per pair. As libvhost-user, a duplicate is kept: counted, its fd
        closed, and the region removed with the last REM_MEM_REG of it."""
        self._has_protocol(ProtocolFeature.CONFIGURE_MEM_SLOTS, "ADD_MEM_REG")
        r = P.decode_single_region(msg.payload)
        if len(msg.fds) != 1:
            raise SessionError(f"ADD_MEM_REG with {len(msg.fds)} fds, expected 1")
        key = (r.gpa, r.size, r.uva)
        if self.region_refs.get(key) and any(
                (sl.region.gpa, sl.region.size, sl.region.uva) == key for sl in self.mem.slots):
            self.region_refs[key] += 1
            msg.close_fds()
            return
        fd = msg.take_fd()
        self._remap(lambda: self.mem.add_region(r, fd))
        self.region_refs[key] = 1
        self.log(f"memory: added {r}")

    def _rem_mem_reg(self, msg: Message) -> None:
        self._has_protocol(ProtocolFeature.CONFIGURE_MEM_SLOTS, "REM_MEM_REG")
        r = P.decode_single_region(msg.payload)
        key = (r.gpa, r.size, r.uva)
        if self.region_refs.get(key, 0) > 1:
            self.region_refs[key] -= 1
            msg.close_fds()
            return
        self._remap(lambda: self.mem.remove_region(r))
        self.region_refs.pop(key, None)
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
        # the bit offered, not acked: QEMU's virtio-net sends one per pair when the device is
        # realized, before SET_FEATURES (peer_attach / peer_detach)
        if not self.offered & F.bit(P.VHOST_USER_F_PROTOCOL_FEATURES):
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
            if self.iommu:
                # "Guest addresses are also called I/O virtual addresses (IOVAs). They are
                # translated to user addresses via the IOTLB": ring addresses too.
                v.start(self._iotlb_memory(), (v.desc_uva, v.avail_uva, v.used_uva), packed,
                        F.has(self.features, F.VIRTIO_RING_F_EVENT_IDX),
                        F.has(self.features, F.VIRTIO_RING_F_INDIRECT_DESC))
            else:
                # user addresses of desc, avail (driver area), used (device area) ->
                # guest-physical
                gpas = (self.mem.uva_to_gpa(v.desc_uva, 16),
                        self.mem.uva_to_gpa(v.avail_uva, 4),
                        self.mem.uva_to_gpa(v.used_uva, 4))
                v.start(mem, gpas, packed, F.has(self.features, F.VIRTIO_RING_F_EVENT_IDX),
                        F.has(self.features, F.VIRTIO_RING_F_INDIRECT_DESC))
        except IotlbRingError as e:
            self._iotlb_fault(v, e)
            return
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
        self._check_misses()
        if not v.started and not v.broken:
            self._start(v)
        if not self.serve(v):
            v.spurious_kicks += 1

    def serve(self, v: Vring) -> int:
        """Serve a started, enabled ring until it is empty; the buffers used."""
        q = v.queue
        if q is None or v.broken or v.iotlb_wait is not None:
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
        except IotlbRingError as e:
            self._iotlb_fault(v, e)
        except RingError as e:
            self._broken(v, str(e))
        return total

    def close(self) -> None:
        for v in self.vrings:
            v.close()
        self.device.attach(None)
        self.mem.close()
        if self.backend_sock is not None:
            self.backend_sock.close()
            self.backend_sock = None

    # ---- IOTLB (VIRTIO_F_IOMMU_PLATFORM) -----------------------------------------------------
    @property
    def iommu(self) -> bool:
        return bool(self.features & IOMMU_PLATFORM)

    def _iotlb_memory(self) -> IotlbMemory:
        window = self.mem.mem
        if self.iotlb_mem is None or self.iotlb_mem.ram is not window:
            self.iotlb_mem = IotlbMemory(window, lambda: self.iotlb_gpa, "vhost-user IOTLB")
        return self.iotlb_mem

    def _set_backend_req_fd(self, msg: Message) -> None:
        self._has_protocol(ProtocolFeature.BACKEND_REQ, "SET_BACKEND_REQ_FD")
        if len(msg.fds) != 1:
            raise SessionError(f"SET_BACKEND_REQ_FD with {len(msg.fds)} fds, expected 1")
        fd = msg.take_fd()
        try:
            sock = socket.socket(fileno=fd)
        except OSError as e:
            os.close(fd)
            raise SessionError(f"SET_BACKEND_REQ_FD: not a socket ({e.strerror})") from None
        if self.backend_sock is not None:
            self.backend_sock.close()
        self.backend_sock = sock
        self.log("backend channel set")

    def _gpa_pieces(self, uaddr: int, size: int) -> list[tuple[int, int]] | None:
        """[uaddr, uaddr+size) of the frontend as guest-physical pieces (one per memory
        region it crosses), or None if a byte of it is in no region."""
        out = []
        at, left = uaddr, size
        while left:
            for sl in self.mem.slots:
                r = sl.region
                if r.uva <= at < r.uva + r.size:
                    n = min(left, r.uva + r.size - at)
                    out.append((at - r.uva + r.gpa, n))
                    at += n
                    left -= n
                    break
            else:
                return None
        return out

    def _insert_gpa(self, iova: int, size: int, uaddr: int, perm: int) -> bool:
        pieces = self._gpa_pieces(uaddr, size)
        if pieces is None:
            return False
        for gpa, n in pieces:
            self.iotlb_gpa.insert(iova, n, gpa, perm)
            iova += n
        return True

    def _rebuild_iotlb(self) -> None:
        """The memory table changed: the entries' user addresses may lie elsewhere now."""
        self.iotlb_gpa.clear()
        for iova, size, uaddr, perm in self.iotlb_uva.entries():
            if not self._insert_gpa(iova, size, uaddr, perm):
                self.iotlb_uva.remove(iova, size)
                self.log(f"IOTLB entry IOVA 0x{iova:x}+0x{size:x} dropped: its user address "
                         f"0x{uaddr:x} is in no memory region now")

    def _iotlb_msg(self, msg: Message) -> bool:
        """IOTLB_MSG: an UPDATE or INVALIDATE from the frontend; False (a non-zero reply)
        for one the backend cannot take, with a line saying why."""
        iova, size, uaddr, perm, typ = P.decode_iotlb(msg.payload)
        name = P.IOTLB_TYPE_NAMES.get(typ, f"type {typ}")

        def refuse(why: str) -> bool:
            self.log(f"IOTLB_MSG {name} IOVA 0x{iova:x}+0x{size:x} refused: {why}")
            return False
        if typ in (P.VHOST_IOTLB_UPDATE, P.VHOST_IOTLB_MISS) and not self.iommu:
            # (an INVALIDATE is taken any time: a frontend forwards the guest's unmaps after
            # a RESET_DEVICE too, and forgetting a translation is always safe)
            return refuse("VIRTIO_F_IOMMU_PLATFORM was not negotiated")
        if typ in (P.VHOST_IOTLB_BATCH_BEGIN, P.VHOST_IOTLB_BATCH_END):
            return True         # hints: each update takes effect at once here
        if typ not in (P.VHOST_IOTLB_UPDATE, P.VHOST_IOTLB_INVALIDATE):
            return refuse("a frontend sends UPDATE or INVALIDATE")
        if size == 0 or iova + size > 1 << 64:
            return refuse("empty, or wraps past 2^64")
        if typ == P.VHOST_IOTLB_INVALIDATE:
            self.iotlb_invalidates += 1
            self.iotlb_uva.remove(iova, size)
            self.iotlb_gpa.remove(iova, size)
            self._invalidate_rings(iova, size)
            return True
        if perm not in (P.VHOST_ACCESS_RO, P.VHOST_ACCESS_WO, P.VHOST_ACCESS_RW):
            return refuse(f"permission {perm}")
        if uaddr + size > 1 << 64 or self._gpa_pieces(uaddr, size) is None:
            return refuse(f"user address range 0x{uaddr:x}+0x{size:x} is not within the "
                          f"memory regions")
        self.iotlb_updates += 1
        # An update replaces what it overlaps (a mapping changed under the same IOVA).
        self.iotlb_uva.remove(iova, size)
        self.iotlb_gpa.remove(iova, size)
        self.iotlb_uva.insert(iova, size, uaddr, perm)
        self._insert_gpa(iova, size, uaddr, perm)
        self._retry(iova, size)
        return True

    def _invalidate_rings(self, iova: int, size: int) -> None:
        """A started ring whose areas were invalidated is rebuilt where it is (and asks for
        the translation again), as vhost drops its cached ring translations."""
        for v in self.vrings:
            q = v.queue
            if q is None:
                continue
            areas = ((q.desc_addr, 1), (q.avail_addr, 1), (q.used_addr, 1))
            if any(a < iova + size and iova < a + n for a, n in areas) or any(
                    iova <= a < iova + size for a, _ in areas):
                v.base = v.positions()
                v.stop()
                self._start(v)

    def _retry(self, iova: int, size: int) -> None:
        """Rings that waited for a translation in [iova, iova+size) go on."""
        for v in self.vrings:
            w = v.iotlb_wait
            if w is not None and iova <= w[0] < iova + size:
                v.iotlb_wait = None
                if v.started:
                    self.serve(v)
                else:
                    self._start(v)

    def _iotlb_fault(self, v: Vring, e: IotlbRingError) -> None:
        """A translation the ring needs is missing (ask the frontend: IOTLB miss) or lacks
        the access's permission (the guest's error: ACCESS_FAIL, the ring stops)."""
        f: IommuFault = e.fault
        perm = f.perm
        if f.kind == "unmapped" and self.backend_sock is not None:
            self.misses += 1
            w = v.iotlb_wait
            since = w[2] if w is not None and w[:2] == (f.iova, perm) else time.monotonic()
            v.iotlb_wait = (f.iova, perm, since)
            self._send_backend(f.iova, perm, P.VHOST_IOTLB_MISS)
            return
        if f.kind == "permission":
            self._send_backend(f.iova, perm, P.VHOST_IOTLB_ACCESS_FAIL)
            self._broken(v, str(e))
            return
        self._broken(v, f"{e}; no backend channel (BACKEND_REQ) to ask the frontend for it")

    def _send_backend(self, iova: int, perm: int, typ: int) -> None:
        sock = self.backend_sock
        if self.trace:
            self.log(f"-> IOTLB {P.IOTLB_TYPE_NAMES[typ]} IOVA 0x{iova:x} "
                     f"{PERM_NAMES.get(perm, perm)}")
        if sock is None:
            return
        try:
            send_message(sock, P.BackendReq.IOTLB_MSG, P.encode_iotlb(iova, 0, 0, perm, typ))
        except OSError as err:
            self.log(f"backend channel: {err.strerror or err}; closed")
            sock.close()
            self.backend_sock = None

    def _check_misses(self) -> None:
        """Stop the rings whose miss the frontend left unanswered too long."""
        now = time.monotonic()
        for v in self.vrings:
            w = v.iotlb_wait
            if w is not None and now - w[2] > IOTLB_MISS_TIMEOUT_S:
                v.iotlb_wait = None
                self._broken(v, f"IOTLB miss for IOVA 0x{w[0]:x} ({PERM_NAMES[w[1]]}) not "
                                f"answered by the frontend within {IOTLB_MISS_TIMEOUT_S:g} s: "
                                f"the guest did not map it")
