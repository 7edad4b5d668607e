"""virtio_console, driver side (drivers/char/virtio_console.c).

Ports, each with a receiveq and a transmitq. Every receiveq is filled with page-sized buffers
as soon as its port exists, and each buffer goes back to the device as soon as its bytes are
copied out (Linux keeps a buffer until a reader consumed it; the copy here is the tty flip
buffer's). Writes go through a small pool of transmit buffers per port, reclaimed by polling
the used ring (hvc's put_chars polls too; no transmit interrupt is asked for).

With VIRTIO_CONSOLE_F_MULTIPORT the driver reads max_nr_ports, sets up the control queues,
fills the control receiveq, says DEVICE_READY, and builds ports as the device announces them
(DEVICE_ADD -> add_port -> PORT_READY), then takes what the device says of each port: it is a
console (CONSOLE_PORT: the driver answers PORT_OPEN 1), its name (PORT_NAME), its size
(RESIZE), whether its host end is open (PORT_OPEN). Without MULTIPORT port 0 is added at
probe and is a console. Control messages are handled on the interrupt thread (Linux's
control_work); a control message sent waits, as in Linux, until the device has used it
(polling the used ring, which the interrupt thread can do).

What the device writes is untrusted too: a used length beyond the buffer, a message shorter
than its header, an unknown port, an event the driver is meant to send are counted and
dropped, as Linux drops them.
"""

import errno
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

from vmsim.abi import console as C
from vmsim.abi import ids
from vmsim.guest.memory import DmaMemory, OutOfGuestMemory
from vmsim.guest.virtio.core import VirtioDevice, VirtioDriver
from vmsim.guest.virtio.virtqueue import Virtqueue

log = logging.getLogger("vmsim.guest")

EINVAL = -errno.EINVAL
ENOMEM = -errno.ENOMEM
EIO = -errno.EIO
EAGAIN = -errno.EAGAIN
EBUSY = -errno.EBUSY
ENODEV = -errno.ENODEV

PAGE_SIZE = 4096
RX_BUF_SIZE = PAGE_SIZE          # as Linux's fill_queue
TX_BUF_SIZE = PAGE_SIZE
TX_POOL = 16                     # transmit buffers per port
CONTROL_BUF_SIZE = PAGE_SIZE     # control receive buffers (a PORT_NAME may be long)
CONTROL_TX_POOL = 32
# More queues than this (2 * (max_nr_ports + 1)) is a device this driver will not drive.
MAX_PORTS = 64
INBUF_MAX = 64 << 10             # input kept for a port nobody reads
SEND_TIMEOUT_S = 2.0


class Buffer:
    """A buffer in guest RAM handed to the device (the token get_buf returns)."""

    __slots__ = ("gpa", "size", "view")

    def __init__(self, dma: DmaMemory, size: int) -> None:
        self.gpa, self.view = dma.alloc(size, 64, zero=False)
        self.size = size

    def free(self, dma: DmaMemory) -> None:
        self.view.release()
        dma.free(self.gpa)


class PortListener(Protocol):
    """What a program that opened a port hears (on the interrupt thread)."""

    def on_data(self, port: "Port", data: bytes) -> None: ...
    def on_open(self, port: "Port", host_connected: bool) -> None: ...
    def on_resize(self, port: "Port", cols: int, rows: int) -> None: ...


class Port:
    """struct port: one port of a console device."""

    def __init__(self, console: "VirtioConsole", port_id: int, in_vq: Virtqueue,
                 out_vq: Virtqueue) -> None:
        self.console = console
        self.id = port_id
        self.name: str | None = None
        self.in_vq = in_vq
        self.out_vq = out_vq
        self.in_lock = threading.RLock()     # inbuf_lock
        self.out_lock = threading.RLock()    # outvq_lock
        self.is_console = False
        self.host_connected = False
        self.guest_connected = False
        self.size = (0, 0)                   # (cols, rows) as the device said
        self.rx_bufs: list[Buffer] = []
        self.tx_bufs: list[Buffer] = []
        self.tx_free: list[Buffer] = []
        self.inbuf: deque[bytes] = deque()
        self.inbuf_bytes = 0
        self.listener: PortListener | None = None
        self.removed = False
        # counters
        self.bytes_in = self.bytes_out = self.writes = 0
        self.discarded = 0                   # input while no program had the port open
        self.write_errors = 0

    # ---- what programs call ----------------------------------------------------------------------
    def open(self, listener: PortListener | None = None) -> int:
        """port_fops_open: one program at a time; the host hears PORT_OPEN 1. A console port
        is open already (hvc holds it); a program may still listen to it."""
        with self.in_lock:
            if self.listener is not None:
                return -errno.EMFILE
            self.listener = listener
            queued = list(self.inbuf)
            self.inbuf.clear()
            self.inbuf_bytes = 0
        if not self.is_console:
            if self.guest_connected:
                return -errno.EMFILE
            self.guest_connected = True
            self.console.send_control(self.id, C.VIRTIO_CONSOLE_PORT_OPEN, 1)
        if listener is not None and queued:
            listener.on_data(self, b"".join(queued))
        return 0

    def close(self) -> None:
        """port_fops_release: the host hears PORT_OPEN 0; unread input is dropped."""
        with self.in_lock:
            self.listener = None
            self.inbuf.clear()
            self.inbuf_bytes = 0
        if not self.is_console and self.guest_connected:
            self.guest_connected = False
            if not self.removed:
                self.console.send_control(self.id, C.VIRTIO_CONSOLE_PORT_OPEN, 0)

    def read(self) -> bytes:
        """What arrived while no listener was attached."""
        with self.in_lock:
            data = b"".join(self.inbuf)
            self.inbuf.clear()
            self.inbuf_bytes = 0
        return data

    def write(self, data: bytes, timeout: float = SEND_TIMEOUT_S) -> int:
        """send_buf: queue `data` in page-sized buffers; returns the bytes queued (fewer if
        the device kept every transmit buffer for `timeout`), or -EIO."""
        vq = self.out_vq
        done = 0
        deadline = time.monotonic() + timeout
        with self.out_lock:
            if self.removed or vq.broken:
                return EIO
            while done < len(data):
                buf = self._tx_buffer(deadline)
                if buf is None:
                    break
                chunk = data[done:done + TX_BUF_SIZE]
                buf.view[:len(chunk)] = chunk
                err = vq.add_outbuf(((buf.gpa, len(chunk)),), buf)
                if err:
                    self.tx_free.append(buf)
                    if done == 0:
                        self.write_errors += 1
                        return err
                    break
                done += len(chunk)
                self.writes += 1
                if vq.kick_prepare():
                    vq.notify()
        self.bytes_out += done
        if done < len(data):
            self.write_errors += 1
        return done

    def _tx_buffer(self, deadline: float) -> Buffer | None:
        """A free transmit buffer, reclaiming used ones; waits (polling the used ring, never
        for an interrupt: this may run on the interrupt thread) until `deadline`."""
        while True:
            self._reclaim()
            if self.tx_free:
                return self.tx_free.pop()
            if self.out_vq.broken or time.monotonic() > deadline:
                return None
            time.sleep(0.0002)

    def _reclaim(self) -> None:
        """reclaim_consumed_buffers."""
        vq = self.out_vq
        while (r := vq.get_buf()) is not None:
            self.tx_free.append(r[0])

    # ---- state -----------------------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "console": self.is_console,
                "host_connected": self.host_connected, "guest_connected": self.guest_connected,
                "size": list(self.size), "bytes_in": self.bytes_in, "bytes_out": self.bytes_out,
                "discarded": self.discarded, "rx_buffers": len(self.rx_bufs)}


PortWatcher = Callable[[Port], None]


class VirtioConsole:
    """struct ports_device: one probed console device."""

    def __init__(self, vdev: VirtioDevice, dma: DmaMemory) -> None:
        self.vdev = vdev
        self.dma = dma
        self.multiport = False
        self.max_nr_ports = 1
        self.in_vqs: list[Virtqueue] = []
        self.out_vqs: list[Virtqueue] = []
        self.c_ivq: Virtqueue | None = None
        self.c_ovq: Virtqueue | None = None
        self.c_lock = threading.RLock()          # cvq_lock
        # Held while the interrupt thread runs this device's callbacks: removal takes it
        # once the device is reset, so that no callback still uses what it frees (Linux:
        # cancel_work_sync, synchronize_irq).
        self.cb_lock = threading.RLock()
        self.ports_lock = threading.Lock()
        self.ports: dict[int, Port] = {}
        self.ctrl_rx: list[Buffer] = []
        self.ctrl_tx: list[Buffer] = []
        self.ctrl_free: list[Buffer] = []
        self.size = (0, 0)                       # port 0's size from config space
        self.watchers: list[PortWatcher] = []
        self.removed = False
        # counters
        self.control_in = 0
        self.control_out = 0
        self.bad_control = 0
        self.bad_used_len = 0
        self.emerg_writes = 0

    # ---- setup (virtcons_probe) ------------------------------------------------------------------
    def init(self) -> int:
        vdev = self.vdev
        self.multiport = vdev.has_feature(C.VIRTIO_CONSOLE_F_MULTIPORT)
        if self.multiport:
            n = vdev.cread(C.CFG_MAX_NR_PORTS, 4)
            if not 1 <= n <= MAX_PORTS:
                vdev.probe_error = f"max_nr_ports {n}: this driver drives 1 to {MAX_PORTS}"
                return EINVAL
            self.max_nr_ports = n
        nvqs = C.num_queues(self.multiport, self.max_nr_ports)
        callbacks: list[Callable[[Virtqueue], None] | None] = []
        names = []
        for i in range(nvqs):
            where = C.port_of_queue(i)
            if where is None:
                callbacks.append(self._control_intr if i == C.CONTROL_RX else None)
                names.append("control-i" if i == C.CONTROL_RX else "control-o")
            else:
                callbacks.append(None if where[1] else self._in_intr)
                names.append(f"{'output' if where[1] else 'input'}.{where[0]}")
        try:
            vqs = vdev.config.find_vqs(vdev, nvqs, callbacks, names)
        except (OSError, MemoryError) as e:
            vdev.probe_error = f"cannot set up {nvqs} queues: {e}"
            return ENODEV
        for p in range(self.max_nr_ports):
            self.in_vqs.append(vqs[C.rx_queue(p)])
            self.out_vqs.append(vqs[C.tx_queue(p)])
        if self.multiport:
            self.c_ivq, self.c_ovq = vqs[C.CONTROL_RX], vqs[C.CONTROL_TX]
        if vdev.has_feature(C.VIRTIO_CONSOLE_F_SIZE):
            self.size = (vdev.cread(C.CFG_COLS, 2), vdev.cread(C.CFG_ROWS, 2))
        # Queues are live from here (virtio_device_ready before the first buffer).
        vdev.device_ready()
        if self.multiport:
            try:
                self._fill_control()
            except OutOfGuestMemory:
                self.send_control(C.VIRTIO_CONSOLE_BAD_ID, C.VIRTIO_CONSOLE_DEVICE_READY, 0)
                vdev.probe_error = "no guest memory for the control queue's buffers"
                return ENOMEM
            self.send_control(C.VIRTIO_CONSOLE_BAD_ID, C.VIRTIO_CONSOLE_DEVICE_READY, 1)
        else:
            err = self.add_port(0)
            if err:
                vdev.probe_error = "cannot set up port 0"
                return err
        return 0

    def _fill_control(self) -> None:
        vq = self.c_ivq
        for _ in range(vq.num):
            buf = Buffer(self.dma, CONTROL_BUF_SIZE)
            if vq.add_inbuf(((buf.gpa, buf.size),), buf):
                buf.free(self.dma)
                break
            self.ctrl_rx.append(buf)
        for _ in range(min(CONTROL_TX_POOL, self.c_ovq.num)):
            buf = Buffer(self.dma, C.CONTROL_SIZE + 8)
            self.ctrl_tx.append(buf)
            self.ctrl_free.append(buf)
        if vq.kick_prepare():
            vq.notify()

    # ---- ports -----------------------------------------------------------------------------------
    def add_port(self, port_id: int) -> int:
        """add_port: fill its receiveq, make it a console if there is no multiport, tell the
        device PORT_READY (1, or 0 if it could not be set up)."""
        port = Port(self, port_id, self.in_vqs[port_id], self.out_vqs[port_id])
        vq = port.in_vq
        try:
            for _ in range(vq.num):
                buf = Buffer(self.dma, RX_BUF_SIZE)
                if vq.add_inbuf(((buf.gpa, buf.size),), buf):
                    buf.free(self.dma)
                    break
                port.rx_bufs.append(buf)
            for _ in range(min(TX_POOL, port.out_vq.num)):
                buf = Buffer(self.dma, TX_BUF_SIZE)
                port.tx_bufs.append(buf)
                port.tx_free.append(buf)
        except OutOfGuestMemory:
            pass
        if not port.rx_bufs or not port.tx_bufs:
            log.warning("%s: no guest memory for port %d's buffers", self.vdev.name, port_id)
            self._free_port(port)
            self.send_control(port_id, C.VIRTIO_CONSOLE_PORT_READY, 0)
            return ENOMEM
        if vq.kick_prepare():
            vq.notify()
        if not self.multiport:
            # The only port: a console whose host end is as open as it will ever be.
            port.size = self.size
            port.host_connected = True
            self.init_port_console(port)
        with self.ports_lock:
            self.ports[port_id] = port
        self.send_control(port_id, C.VIRTIO_CONSOLE_PORT_READY, 1)
        self._tell_watchers(port)
        return 0

    def init_port_console(self, port: Port) -> None:
        """The host made the port a console (hvc): open on the guest's side, for good."""
        port.is_console = True
        port.guest_connected = True
        self.send_control(port.id, C.VIRTIO_CONSOLE_PORT_OPEN, 1)

    def unplug_port(self, port: Port) -> None:
        """DEVICE_REMOVE (or the driver's removal): the port goes, its buffers come back."""
        with self.ports_lock:
            self.ports.pop(port.id, None)
        with port.in_lock, port.out_lock:
            port.removed = True
        listener = port.listener
        port.listener = None
        port.host_connected = False
        if listener is not None:
            listener.on_open(port, False)
        with port.in_lock:
            while port.in_vq.detach_unused_buf() is not None:
                pass
        with port.out_lock:
            port._reclaim()
            while port.out_vq.detach_unused_buf() is not None:
                pass
        self._free_port(port)

    def _free_port(self, port: Port) -> None:
        for buf in port.rx_bufs + port.tx_bufs:
            buf.free(self.dma)
        port.rx_bufs, port.tx_bufs, port.tx_free = [], [], []

    def find_port(self, port_id: int | None = None, name: str | None = None) -> Port | None:
        with self.ports_lock:
            for p in self.ports.values():
                if (port_id is None or p.id == port_id) and (name is None or p.name == name):
                    return p
        return None

    def watch_ports(self, watcher: PortWatcher) -> None:
        """`watcher(port)` now for every port, and later whenever a port is added or named
        (it may hear of a port twice)."""
        with self.ports_lock:
            self.watchers.append(watcher)
            now = list(self.ports.values())
        for p in now:
            watcher(p)

    def unwatch_ports(self, watcher: PortWatcher) -> None:
        with self.ports_lock:
            if watcher in self.watchers:
                self.watchers.remove(watcher)

    def _tell_watchers(self, port: Port) -> None:
        with self.ports_lock:
            watchers = list(self.watchers)
        for w in watchers:
            w(port)

    # ---- receive (in_intr) -----------------------------------------------------------------------
    def _in_intr(self, vq: Virtqueue) -> None:
        with self.cb_lock:
            if not self.removed:
                self._receive(vq)

    def _receive(self, vq: Virtqueue) -> None:
        port_id = C.port_of_queue(vq.index)[0]
        port = self.ports.get(port_id)
        if port is None:
            return
        chunks: list[bytes] = []
        with port.in_lock:
            if port.removed:
                return
            while True:
                vq.disable_cb()
                while (r := vq.get_buf()) is not None:
                    buf, ln = r
                    if ln > buf.size:
                        self.bad_used_len += 1
                        ln = buf.size
                    if ln:
                        chunks.append(bytes(buf.view[:ln]))
                    if vq.add_inbuf(((buf.gpa, buf.size),), buf):
                        log.warning("%s: port %d: failed to re-add a receive buffer",
                                    self.vdev.name, port.id)
                if vq.enable_cb():
                    break
            kick = vq.kick_prepare()
        if kick:
            vq.notify()
        if not chunks:
            return
        data = b"".join(chunks)
        port.bytes_in += len(data)
        if not port.guest_connected:
            # "Don't queue up data when port is closed."
            port.discarded += len(data)
            return
        listener = port.listener
        if listener is not None:
            listener.on_data(port, data)
            return
        with port.in_lock:
            port.inbuf.append(data)
            port.inbuf_bytes += len(data)
            while port.inbuf_bytes > INBUF_MAX:
                port.inbuf_bytes -= len(port.inbuf.popleft())

    # ---- the control protocol, driver side -------------------------------------------------------
    def send_control(self, port_id: int, event: int, value: int) -> int:
        """__send_control_msg (without MULTIPORT there is no control queue: nothing to do)."""
        vq = self.c_ovq
        if not self.multiport or vq is None:
            return 0
        deadline = time.monotonic() + SEND_TIMEOUT_S
        with self.c_lock:
            while True:
                while (r := vq.get_buf()) is not None:
                    self.ctrl_free.append(r[0])
                if self.ctrl_free or vq.broken:
                    break
                if time.monotonic() > deadline:
                    log.warning("%s: control queue full for %.0f s; %s dropped",
                                self.vdev.name, SEND_TIMEOUT_S, C.event_name(event))
                    return EAGAIN
                time.sleep(0.0002)
            if vq.broken:
                return EIO
            buf = self.ctrl_free.pop()
            C.CONTROL.pack_into(buf.view, 0, port_id & 0xFFFFFFFF, event, value)
            err = vq.add_outbuf(((buf.gpa, C.CONTROL_SIZE),), buf)
            if err:
                self.ctrl_free.append(buf)
                return err
            self.control_out += 1
            kick = vq.kick_prepare()
        if kick:
            vq.notify()
        # As Linux, wait until the device has used it: then it has the message (a PORT_OPEN 0
        # just before a reset is not lost). The used ring is polled: this may run on the
        # interrupt thread, which cannot wait for an interrupt.
        while True:
            with self.c_lock:
                while (r := vq.get_buf()) is not None:
                    self.ctrl_free.append(r[0])
                if vq.broken or any(b is buf for b in self.ctrl_free):
                    return 0
            if time.monotonic() > deadline:
                log.warning("%s: the device did not take %s in %.0f s", self.vdev.name,
                            C.event_name(event), SEND_TIMEOUT_S)
                return EAGAIN
            time.sleep(0.0001)

    def _control_intr(self, vq: Virtqueue) -> None:
        """control_intr + control_work_handler: take the messages, give the buffers back,
        then act on each in order."""
        with self.cb_lock:
            if not self.removed:
                self._control_work(vq)

    def _control_work(self, vq: Virtqueue) -> None:
        msgs: list[bytes] = []
        with self.c_lock:
            while True:
                vq.disable_cb()
                while (r := vq.get_buf()) is not None:
                    buf, ln = r
                    if ln > buf.size:
                        self.bad_used_len += 1
                        ln = buf.size
                    msgs.append(bytes(buf.view[:ln]))
                    if vq.add_inbuf(((buf.gpa, buf.size),), buf):
                        log.warning("%s: failed to re-add a control buffer", self.vdev.name)
                if vq.enable_cb():
                    break
            kick = vq.kick_prepare()
        if kick:
            vq.notify()
        for m in msgs:
            self.handle_control_message(m)

    def handle_control_message(self, data: bytes) -> None:
        self.control_in += 1
        if len(data) < C.CONTROL_SIZE:
            self._bad(f"a control message of {len(data)} bytes")
            return
        port_id, event, value = C.CONTROL.unpack_from(data)
        port = self.ports.get(port_id)
        if port is None and event != C.VIRTIO_CONSOLE_DEVICE_ADD:
            self._bad(f"{C.event_name(event)} for port {port_id}, which does not exist")
            return
        if event == C.VIRTIO_CONSOLE_DEVICE_ADD:
            if port is not None:
                # "Port %u already added": say ready again.
                self.send_control(port_id, C.VIRTIO_CONSOLE_PORT_READY, 1)
                return
            if port_id >= self.max_nr_ports:
                self._bad(f"DEVICE_ADD for port {port_id}, beyond max_nr_ports "
                          f"{self.max_nr_ports}")
                return
            self.add_port(port_id)
        elif event == C.VIRTIO_CONSOLE_DEVICE_REMOVE:
            self.unplug_port(port)
        elif event == C.VIRTIO_CONSOLE_CONSOLE_PORT:
            if value and not port.is_console:
                self.init_port_console(port)
        elif event == C.VIRTIO_CONSOLE_RESIZE:
            if not port.is_console:
                return
            if len(data) < C.CONTROL_SIZE + C.RESIZE.size:
                self._bad(f"RESIZE for port {port_id} without its size")
                return
            cols, rows = C.RESIZE.unpack_from(data, C.CONTROL_SIZE)
            self._set_size(port, cols, rows)
        elif event == C.VIRTIO_CONSOLE_PORT_OPEN:
            port.host_connected = bool(value)
            with port.out_lock:
                if not port.removed:
                    port._reclaim()
            listener = port.listener
            if listener is not None:
                listener.on_open(port, port.host_connected)
        elif event == C.VIRTIO_CONSOLE_PORT_NAME:
            if port.name is not None:
                return                        # a port is named once
            port.name = data[C.CONTROL_SIZE:].split(b"\0", 1)[0].decode("utf-8", "replace")
            self._tell_watchers(port)
        else:
            self._bad(f"{C.event_name(event)} for port {port_id}: not a device's message")

    def _bad(self, what: str) -> None:
        self.bad_control += 1
        log.info("%s: control message dropped: %s", self.vdev.name, what)

    def _set_size(self, port: Port, cols: int, rows: int) -> None:
        port.size = (cols, rows)
        listener = port.listener
        if listener is not None:
            listener.on_resize(port, cols, rows)

    # ---- config changes (config_intr) ------------------------------------------------------------
    def config_changed(self) -> None:
        """Without MULTIPORT the console's size is in config space (port 0 only)."""
        vdev = self.vdev
        if self.multiport or not vdev.has_feature(C.VIRTIO_CONSOLE_F_SIZE):
            return
        size = (vdev.cread(C.CFG_COLS, 2), vdev.cread(C.CFG_ROWS, 2))
        self.size = size
        port = self.ports.get(0)
        if port is not None and port.size != size:
            self._set_size(port, *size)

    def emerg_write(self, data: bytes) -> int:
        """Emergency write: each byte through emerg_wr in config space (a register write per
        byte), which works without queues, even without negotiation, if the device offers
        VIRTIO_CONSOLE_F_EMERG_WRITE."""
        vdev = self.vdev
        if not vdev.device_features >> C.VIRTIO_CONSOLE_F_EMERG_WRITE & 1:
            return -errno.EOPNOTSUPP
        for b in data:
            vdev.config.set(vdev, C.CFG_EMERG_WR, b.to_bytes(4, "little"))
            self.emerg_writes += 1
        return len(data)

    # ---- teardown (virtcons_remove) --------------------------------------------------------------
    def remove(self) -> None:
        """Reset the device (its queues stop), unplug every port, take every buffer back,
        delete the queues."""
        vdev = self.vdev
        vdev.reset_device()
        with self.cb_lock:
            self.removed = True
        for port in list(self.ports.values()):
            self.unplug_port(port)
        if self.c_ivq is not None:
            with self.c_lock:
                while self.c_ivq.get_buf() is not None:
                    pass
                while self.c_ivq.detach_unused_buf() is not None:
                    pass
                while self.c_ovq.get_buf() is not None:
                    pass
                while self.c_ovq.detach_unused_buf() is not None:
                    pass
        for buf in self.ctrl_rx + self.ctrl_tx:
            buf.free(self.dma)
        self.ctrl_rx, self.ctrl_tx, self.ctrl_free = [], [], []
        vdev.config.del_vqs(vdev)

    def describe(self) -> dict[str, Any]:
        return {"multiport": self.multiport, "max_nr_ports": self.max_nr_ports,
                "size": list(self.size), "control_in": self.control_in,
                "control_out": self.control_out, "bad_control": self.bad_control,
                "ports": [p.describe() for p in sorted(self.ports.values(), key=lambda p: p.id)]}


class ConsoleDriver(VirtioDriver):
    """The virtio_console driver registered on the bus."""

    name = "virtio_console"
    id_table = ((ids.VIRTIO_ID_CONSOLE, ids.VIRTIO_DEV_ANY_ID),)
    # Linux's table: EMERG_WRITE needs no negotiation to be used.
    feature_table = (C.VIRTIO_CONSOLE_F_SIZE, C.VIRTIO_CONSOLE_F_MULTIPORT)

    def __init__(self, dma: DmaMemory) -> None:
        self.dma = dma

    def probe(self, vdev: VirtioDevice) -> int:
        console = VirtioConsole(vdev, self.dma)
        vdev.priv = console
        err = console.init()
        if err:
            if vdev.vqs:
                vdev.reset_device()           # the device lets go of every buffer first
            for port in list(console.ports.values()):
                console.unplug_port(port)
            for buf in console.ctrl_rx + console.ctrl_tx:
                buf.free(self.dma)
            if vdev.vqs:
                vdev.config.del_vqs(vdev)
            vdev.priv = None
        return err

    def remove(self, vdev: VirtioDevice) -> None:
        console: VirtioConsole | None = vdev.priv
        if console is not None:
            console.remove()
        vdev.priv = None

    def config_changed(self, vdev: VirtioDevice) -> None:
        console: VirtioConsole | None = vdev.priv
        if console is not None and not vdev.needs_reset:
            console.config_changed()
