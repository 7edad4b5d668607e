"""virtio-console, device side (QEMU hw/char/virtio-serial-bus.c and virtio-console.c).

Ports have names and host backends. Port 0's receiveq and transmitq always exist; with
VIRTIO_CONSOLE_F_MULTIPORT negotiated the device speaks the control protocol from its side:

    driver                                   device
    DEVICE_READY 1                  ->
                                    <-       DEVICE_ADD id            (each port)
    PORT_READY id 1                 ->
                                    <-       CONSOLE_PORT id 1        (a console port)
                                    <-       RESIZE id (cols, rows)   (a console port's size)
                                    <-       PORT_NAME id "name"
                                    <-       PORT_OPEN id 1           (the host end is open)
    PORT_OPEN id 1                  ->       (a guest program opened the port)

Without MULTIPORT, port 0 is the only port, a console, open on both ends.

Receive queues: the driver posts empty buffers in advance; the device takes them from the
ring as they come (so posted buffers are not "work" the loop keeps finding) and holds them,
and fills them when the host has input, in the order they were posted. Input that finds no
buffer, or a multiport port no guest program has opened, waits (QEMU's virtio-serial does not
read its chardev until the guest is ready); past PENDING_MAX the backend stops being read.
Control messages to the driver wait the same way for control receive buffers. Transmit
queues: what the guest writes goes to the port's backend, and the buffer is used at once.

Everything the driver writes is untrusted: a malformed control message, an unknown port, an
event in the wrong direction are guest errors (logged, counted, ignored); a device-readable
buffer in a receiveq or a device-writable one in a transmitq breaks a MUST of the spec and is
a device error (virtio_error: DEVICE_NEEDS_RESET).
"""

import json
import logging
import os
from collections import deque
from typing import Any

from vmsim.abi import console as C
from vmsim.abi import features as F
from vmsim.abi import ids
from vmsim.abi import status as S
from vmsim.host.devices.console.config import build_config
from vmsim.host.devices.console.metrics import ConsoleMetrics
from vmsim.host.devices.console.ports import PENDING_MAX, HostPort
from vmsim.host.devices.console.request import (
    CONTROL_READ_MAX,
    TX_READ_MAX,
    BadControl,
    parse_control,
    read_transmit,
)
from vmsim.host.memory import GuestMemory
from vmsim.host.virtio.chain import DescChain
from vmsim.host.virtio.device import QueueState, VirtioDevice
from vmsim.host.virtio.errors import Reason, RingError
from vmsim.host.virtio.queue import DeviceQueue

log = logging.getLogger("vmsim.host")

RING_FEATURES = (F.bit(F.VIRTIO_F_VERSION_1) | F.bit(F.VIRTIO_RING_F_INDIRECT_DESC)
                 | F.bit(F.VIRTIO_RING_F_EVENT_IDX) | F.bit(F.VIRTIO_F_RING_RESET))
# Control messages to the driver kept while it has posted no control receive buffer.
CONTROL_BACKLOG = 1024
WRONG = Reason.WRONG_DIRECTION.value


class ConsoleDevice(VirtioDevice):
    device_id = ids.VIRTIO_ID_CONSOLE
    feature_names = C.FEATURE_NAMES

    def __init__(self, name: str, mem: GuestMemory, ports: list[HostPort], *, multiport: bool,
                 max_nr_ports: int | None = None, queue_size: int, offer: int = 0,
                 withhold: int = 0, packed: bool = False,
                 dev_stats: memoryview | None = None,
                 queue_stats: list[memoryview | None] | None = None,
                 refuse_features_ok: bool = False, loop: Any = None) -> None:
        if not ports or [p.id for p in ports] != list(range(len(ports))):
            raise ValueError("a console device has ports 0, 1, ... in order")
        max_nr_ports = max_nr_ports or len(ports)
        if len(ports) > max_nr_ports or (len(ports) > 1 and not multiport):
            raise ValueError(f"{len(ports)} ports need MULTIPORT and max_nr_ports >= "
                             f"{len(ports)}")
        features = RING_FEATURES | F.bit(C.VIRTIO_CONSOLE_F_SIZE) \
            | F.bit(C.VIRTIO_CONSOLE_F_EMERG_WRITE)
        if multiport:
            features |= F.bit(C.VIRTIO_CONSOLE_F_MULTIPORT)
        if packed:
            features |= F.bit(F.VIRTIO_F_RING_PACKED)
        features = (features | offer) & ~withhold
        nq = C.num_queues(multiport, max_nr_ports)
        super().__init__(name, mem, nq, queue_size, features, dev_stats,
                         queue_stats or [None] * nq, refuse_features_ok)
        self.ports = ports
        self.max_nr_ports = max_nr_ports if multiport else 1
        self.size = ports[0].size
        self.metrics = ConsoleMetrics()
        self.ctrl_pending: deque[bytes] = deque()
        self.ctrl_held: deque[DescChain] = deque()
        self.ctrl_ring: DeviceQueue | None = None
        self.multiport = False          # negotiated (set at DRIVER_OK)
        self.driver_ready = False       # DEVICE_READY 1 received
        self._config = build_config(*self.size, self.max_nr_ports)
        for p in ports:
            p.backend.attach(loop, self._input_handler(p), self._state_handler(p))

    # ---- config space ----------------------------------------------------------------------------
    def config_space(self) -> bytearray:
        return self._config

    def write_config_space(self, offset: int, data: bytes) -> None:
        """emerg_wr: the low byte goes to port 0's backend, whatever the device's state (the
        spec lets a driver use it before the queues, even before negotiation)."""
        if offset == C.CFG_EMERG_WR and F.has(self.device_features,
                                              C.VIRTIO_CONSOLE_F_EMERG_WRITE):
            self.metrics.emerg_writes += 1
            self._to_backend(self.ports[0], data[:1])
            return
        super().write_config_space(offset, data)

    # ---- lifecycle -------------------------------------------------------------------------------
    def on_driver_ok(self) -> None:
        self.multiport = self.negotiated(C.VIRTIO_CONSOLE_F_MULTIPORT)
        if not self.multiport:
            # One port, a console, open at both ends: nothing to negotiate.
            p = self.ports[0]
            p.added = p.guest_ready = p.guest_open = True

    def on_reset(self) -> None:
        self.multiport = False
        self.driver_ready = False
        self.ctrl_pending.clear()
        self.ctrl_held.clear()
        self.ctrl_ring = None
        for p in self.ports:
            p.forget_driver()
            if p.pending:
                p.metrics.dropped_to_guest += len(p.pending)
                p.pending.clear()
            p.backend.resume_input()

    def queue_reset(self, q: QueueState) -> None:
        self._forget_buffers(q.index)
        super().queue_reset(q)

    def queue_disable(self, q: QueueState) -> None:
        self._forget_buffers(q.index)
        super().queue_disable(q)

    def _forget_buffers(self, index: int) -> None:
        if index == C.CONTROL_RX:
            self.ctrl_held.clear()
            self.ctrl_ring = None
            return
        where = C.port_of_queue(index)
        if where is not None and not where[1] and where[0] < len(self.ports):
            p = self.ports[where[0]]
            p.held.clear()
            p.held_ring = None

    def _live(self, q: QueueState) -> DeviceQueue | None:
        ring = q.ring
        if ring is None or q.broken or self.broken or not self.status & S.DRIVER_OK:
            return None
        return ring

    def _notify(self, q: QueueState, ring: DeviceQueue) -> None:
        if ring.need_notify() and self.transport is not None:
            self.transport.signal_used(q.index)

    # ---- queues ----------------------------------------------------------------------------------
    def handle_queue(self, q: QueueState, ring: DeviceQueue) -> int:
        i = q.index
        if i == C.CONTROL_RX or i == C.CONTROL_TX:
            if not self.multiport:
                return self._unexpected(q, ring, "a control queue without MULTIPORT")
            if i == C.CONTROL_RX:
                return self._take_control_buffers(q, ring)
            return self._control_tx(q, ring)
        port_id, transmit = C.port_of_queue(i)
        if port_id >= len(self.ports):
            return self._unexpected(q, ring, f"the queue of port {port_id}, which the device "
                                             "never added")
        p = self.ports[port_id]
        if transmit:
            return self._transmit(q, ring, p)
        return self._take_rx_buffers(q, ring, p)

    def _unexpected(self, q: QueueState, ring: DeviceQueue, what: str) -> int:
        """Buffers on a queue that carries nothing now: used empty, a guest error."""
        n = 0
        while chains := ring.pop_batch(64):
            ring.fill_batch(chains, [0] * len(chains))
            n += len(chains)
        self.guest_error(f"queue {q.index}: {n} buffers on {what}; returned unused")
        return n

    def _receive_buffers(self, q: QueueState, ring: DeviceQueue, held: deque[DescChain]) -> bool:
        """Take every posted receive buffer into `held`; False after a device error."""
        while chains := ring.pop_batch(64):
            for c in chains:
                if c.rlen:
                    self.virtio_error(f"queue {q.index}: {WRONG}: a device-readable buffer in "
                                      f"a receiveq (head {c.head}, {c.rlen} bytes)", q)
                    return False
            held.extend(chains)
        return True

    def _take_rx_buffers(self, q: QueueState, ring: DeviceQueue, p: HostPort) -> int:
        p.take_buffers(ring)
        if not self._receive_buffers(q, ring, p.held):
            return 0
        return self._deliver(p, ring)

    def _transmit(self, q: QueueState, ring: DeviceQueue, p: HostPort) -> int:
        n = 0
        while chains := ring.pop_batch(64):
            for c in chains:
                if c.wlen:
                    self.virtio_error(f"queue {q.index}: {WRONG}: a device-writable buffer in "
                                      f"a transmitq (head {c.head}, {c.wlen} bytes)", q)
                    return n
            for c in chains:
                self._to_backend(p, read_transmit(c))
                if c.rlen > TX_READ_MAX:
                    p.metrics.bytes_from_guest += c.rlen - TX_READ_MAX
                    p.metrics.dropped_from_guest += c.rlen - TX_READ_MAX
            p.metrics.writes_from_guest += len(chains)
            ring.fill_batch(chains, [0] * len(chains))
            n += len(chains)
        self._check_size(p)
        return n

    def _to_backend(self, p: HostPort, data: bytes) -> None:
        if not data:
            return
        taken = p.backend.write(data)
        p.metrics.bytes_from_guest += len(data)
        if taken < len(data):
            p.metrics.dropped_from_guest += len(data) - taken

    # ---- host input ------------------------------------------------------------------------------
    def _input_handler(self, p: HostPort):
        def on_input(data: bytes) -> None:
            self.port_input(p.id, data)
        return on_input

    def port_input(self, port_id: int, data: bytes) -> None:
        """Bytes from the host end of a port, for the guest."""
        p = self.ports[port_id]
        p.pending += data
        if len(p.pending) >= PENDING_MAX:
            p.backend.pause_input()
        q = self.queues[p.rx_q] if p.rx_q < len(self.queues) else None
        ring = self._live(q) if q is not None else None
        if ring is not None:
            try:
                if self._deliver(p, ring):
                    self._notify(q, ring)
            except RingError as e:
                self.virtio_error(f"queue {q.index}: {e}", q)
        self._check_size(p)

    def _deliver(self, p: HostPort, ring: DeviceQueue) -> int:
        """Move pending input into held receive buffers; returns the buffers used."""
        if p.held_ring is not ring or not p.guest_open:
            return 0
        pending, held = p.pending, p.held
        used = 0
        while pending and held:
            c = held.popleft()
            n = c.write_at(0, bytes(pending[:c.wlen]))
            del pending[:n]
            ring.fill(c, n)
            p.metrics.bytes_to_guest += n
            used += 1
        if used:
            ring.flush()
            if p.backend.paused and len(pending) < PENDING_MAX // 2:
                p.backend.resume_input()
        return used

    def _state_handler(self, p: HostPort):
        def on_state(connected: bool) -> None:
            self.port_state(p.id, connected)
        return on_state

    def port_state(self, port_id: int, connected: bool) -> None:
        """The host end of a port opened or closed: tell the driver (multiport)."""
        p = self.ports[port_id]
        if self.multiport and p.guest_ready and p.open_sent != connected:
            self._send_open(p, connected)

    def _send_open(self, p: HostPort, connected: bool) -> None:
        p.open_sent = connected
        self.send_control(p.id, C.VIRTIO_CONSOLE_PORT_OPEN, int(connected))

    # ---- console size ----------------------------------------------------------------------------
    def _check_size(self, p: HostPort) -> None:
        """A terminal's window size is the console's: looked at when the port has traffic
        (a pty tells nobody when its size changes)."""
        ws = p.backend.window_size()
        if ws is not None and ws != p.size and ws[0] and ws[1]:
            self.resize(p.id, *ws)

    def resize(self, port_id: int, cols: int, rows: int) -> None:
        """A console's size changed: port 0's is in config space (a config change, with
        VIRTIO_CONSOLE_F_SIZE); a multiport console port hears of it by a RESIZE message."""
        p = self.ports[port_id]
        p.size = (cols, rows)
        self.metrics.resizes += 1
        if port_id == 0:
            self.size = (cols, rows)
            self._config = build_config(cols, rows, self.max_nr_ports)
            if self.negotiated(C.VIRTIO_CONSOLE_F_SIZE):
                self.config_changed()          # generation, and the interrupt
            else:
                self.config_generation = (self.config_generation + 1) & 0xFFFFFFFF
        if self.multiport and p.console and p.guest_ready:
            self._send_resize(p)

    def _send_resize(self, p: HostPort) -> None:
        self.send_control(p.id, C.VIRTIO_CONSOLE_RESIZE, 0, C.RESIZE.pack(*p.size))

    # ---- the control protocol, device side -------------------------------------------------------
    def send_control(self, port_id: int, event: int, value: int = 0,
                     payload: bytes = b"") -> None:
        """Queue a control message for the driver and deliver what the driver has room for."""
        if len(self.ctrl_pending) >= CONTROL_BACKLOG:
            self.guest_error(f"{CONTROL_BACKLOG} control messages wait for receive buffers; "
                             f"{C.event_name(event)} for port {port_id} dropped")
            return
        self.ctrl_pending.append(C.control(port_id, event, value, payload))
        q = self.queues[C.CONTROL_RX]
        ring = self._live(q)
        if ring is not None:
            try:
                if self._flush_control(ring):
                    self._notify(q, ring)
            except RingError as e:
                self.virtio_error(f"queue {q.index}: {e}", q)

    def _take_control_buffers(self, q: QueueState, ring: DeviceQueue) -> int:
        if self.ctrl_ring is not ring:
            self.ctrl_held.clear()
            self.ctrl_ring = ring
        if not self._receive_buffers(q, ring, self.ctrl_held):
            return 0
        return self._flush_control(ring)

    def _flush_control(self, ring: DeviceQueue) -> int:
        """One message per control receive buffer, in order; returns the buffers used."""
        if self.ctrl_ring is not ring:
            return 0
        pending, held = self.ctrl_pending, self.ctrl_held
        used = 0
        while pending and held:
            msg = pending.popleft()
            c = held.popleft()
            if len(msg) > c.wlen:
                self.metrics.control_truncated += 1
                self.guest_error(f"a control receive buffer of {c.wlen} bytes for a "
                                 f"{len(msg)}-byte message; truncated")
            n = c.write_at(0, msg)
            ring.fill(c, n)
            self.metrics.control_out += 1
            used += 1
        if used:
            ring.flush()
        return used

    def _control_tx(self, q: QueueState, ring: DeviceQueue) -> int:
        n = 0
        while chains := ring.pop_batch(16):
            for c in chains:
                if c.wlen:
                    self.virtio_error(f"queue {q.index}: {WRONG}: a device-writable buffer in "
                                      f"the control transmitq (head {c.head})", q)
                    return n
            msgs = [c.read_bytes(0, min(c.rlen, CONTROL_READ_MAX)) for c in chains]
            ring.fill_batch(chains, [0] * len(chains))
            n += len(chains)
            for data in msgs:
                self.control_message(data)
                if self.broken:
                    return n
        return n

    def control_message(self, data: bytes) -> None:
        """One message from the driver."""
        m = self.metrics
        m.control_in += 1
        try:
            port_id, event, value = parse_control(data)
            if event == C.VIRTIO_CONSOLE_DEVICE_READY:
                self._device_ready(value)
                return
            if port_id >= len(self.ports) or not self.ports[port_id].added:
                raise BadControl(f"{C.event_name(event)} for port {port_id}, which the device "
                                 "never added")
            p = self.ports[port_id]
            if event == C.VIRTIO_CONSOLE_PORT_READY:
                self._port_ready(p, value)
            elif event == C.VIRTIO_CONSOLE_PORT_OPEN:
                self._port_open(p, value)
        except BadControl as e:
            m.control_errors += 1
            self.guest_error(f"control: {e}")

    def _device_ready(self, value: int) -> None:
        if value != 1:
            raise BadControl(f"the driver reports DEVICE_READY {value}: it could not set up")
        self.driver_ready = True
        for p in self.ports:
            if not p.added:
                p.added = True
                self.send_control(p.id, C.VIRTIO_CONSOLE_DEVICE_ADD)

    def _port_ready(self, p: HostPort, value: int) -> None:
        """QEMU's order: CONSOLE_PORT, the name, PORT_OPEN if the host end is open; a console
        port hears its size too (Linux's hvc takes it from RESIZE only)."""
        if value != 1:
            p.guest_failed = True
            raise BadControl(f"the driver could not set up port {p.id} (PORT_READY {value})")
        p.guest_ready = True
        if p.console:
            self.send_control(p.id, C.VIRTIO_CONSOLE_CONSOLE_PORT, 1)
            self._send_resize(p)
        if p.name:
            self.send_control(p.id, C.VIRTIO_CONSOLE_PORT_NAME, 0, p.name.encode())
        if p.backend.connected:
            self._send_open(p, True)

    def _port_open(self, p: HostPort, value: int) -> None:
        p.guest_open = bool(value)
        if p.guest_open:
            q = self.queues[p.rx_q]
            ring = self._live(q)
            if ring is not None and self._deliver(p, ring):
                self._notify(q, ring)

    # ---- report ----------------------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        return {"backend": ", ".join(f"{p.name}: {p.backend.description}" for p in self.ports),
                "multiport": self.multiport, "max_nr_ports": self.max_nr_ports,
                "size": list(self.size), "driver_ready": self.driver_ready,
                "ports": [p.describe() for p in self.ports],
                "console": self.metrics.as_dict()}

    def write_manifest(self, path: str, vm: str) -> None:
        """What `vmsim console` needs to find a port: written once, in the run directory."""
        ports = [{"index": p.id, "name": p.name, "console": p.console,
                  **p.backend.describe()} for p in self.ports]
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            json.dump({"vm": vm, "device": self.name, "pid": os.getpid(), "ports": ports}, f)
        os.replace(tmp, path)

    def close(self) -> None:
        super().close()
        for p in self.ports:
            p.backend.close()
