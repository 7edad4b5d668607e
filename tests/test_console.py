"""virtio-console on both sides.

1. The ABI and the topology (ports, multiport, the `app:` shorthand, mistakes).
2. The device alone (ConsoleDevice on MmioTransport), driven by a small honest driver built by
   hand: guest-side rings programmed through the registers, control messages written into
   guest RAM. The control protocol from the device's side, queues and their buffers, what a
   malformed or misdirected message from the driver does, emergency write, resize.
3. The backends on their own (pty, socket, file) with a stand-in event loop.
4. The guest's virtio_console driver against the real device in one process (the pattern of
   test_guest_core: a host thread answering traps and serving queues), and the console apps.
5. Real runs: a pty written and read by the test, named multiport ports, log-file and socket
   backends, and `vmsim console` driven in tmux.
"""

import fcntl
import json
import mmap
import os
import re
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import termios
import threading
import time
import uuid
from pathlib import Path

import pytest
from test_guest_core import TestHost, wait_for
from test_run import Launch, load_json, write_yaml

from vmsim.abi import console as C
from vmsim.abi import features as F
from vmsim.abi import ids
from vmsim.abi import mmio as M
from vmsim.abi import status as S
from vmsim.guest.drivers.console import ConsoleDriver, Port, VirtioConsole
from vmsim.guest.memory import DmaMemory, GuestRAM
from vmsim.guest.platform import IrqController, Platform
from vmsim.guest.virtio.core import VirtioBus
from vmsim.guest.virtio.mmio import VirtioMmio
from vmsim.guest.virtio.vring import vring_create_virtqueue, vring_del_virtqueue
from vmsim.guest.workloads.console_app import ConsoleApp
from vmsim.host.devices.console.backend import (
    ConsoleBackend,
    FileBackend,
    PtyBackend,
    SocketBackend,
)
from vmsim.host.devices.console.device import ConsoleDevice
from vmsim.host.devices.console.ports import PENDING_MAX, HostPort
from vmsim.host.memory import GuestMemory
from vmsim.host.virtio.mmio import MmioTransport
from vmsim.launcher import spec as specs
from vmsim.launcher.topology import TopologyError, load_topology

ROOT = Path(__file__).resolve().parents[1]
CONSOLE_PTY = ROOT / "configs" / "console-pty.yaml"
VMSIM = [sys.executable, "-m", "vmsim"]
RAM_BASE = 0x4000_0000
RAM_SIZE = 4 << 20
MMIO_BASE = 0x0A00_0000
IRQ = 32
ACK, DRV, FOK, DOK = S.ACKNOWLEDGE, S.DRIVER, S.FEATURES_OK, S.DRIVER_OK
V1 = F.bit(F.VIRTIO_F_VERSION_1)
MULTIPORT = F.bit(C.VIRTIO_CONSOLE_F_MULTIPORT)
SIZE = F.bit(C.VIRTIO_CONSOLE_F_SIZE)
PTY_LINE = re.compile(r"^console (\S+)\.(\S+) port (\d+) \((\S+)\): pty (/dev/\S+)", re.M)
SOCK_LINE = re.compile(r"^console (\S+)\.(\S+) port (\d+) \((\S+)\): socket (\S+)", re.M)


# ==== 1. the ABI and the topology ================================================================
def test_queue_numbering():
    assert [C.rx_queue(p) for p in range(4)] == [0, 4, 6, 8]
    assert [C.tx_queue(p) for p in range(4)] == [1, 5, 7, 9]
    assert (C.CONTROL_RX, C.CONTROL_TX) == (2, 3)
    assert C.num_queues(False, 1) == 2 and C.num_queues(True, 1) == 4
    assert C.num_queues(True, 3) == 8
    assert C.port_of_queue(0) == (0, False) and C.port_of_queue(1) == (0, True)
    assert C.port_of_queue(2) is None and C.port_of_queue(3) is None
    assert C.port_of_queue(6) == (2, False) and C.port_of_queue(7) == (2, True)


def test_control_and_config_layout():
    assert C.CONTROL_SIZE == 8
    msg = C.control(3, C.VIRTIO_CONSOLE_PORT_NAME, 0, b"org.x")
    assert msg == struct.pack("<IHH", 3, 7, 0) + b"org.x"
    assert C.control(C.VIRTIO_CONSOLE_BAD_ID, 0, 1)[:4] == b"\xff\xff\xff\xff"
    assert (C.CFG_COLS, C.CFG_ROWS, C.CFG_MAX_NR_PORTS, C.CFG_EMERG_WR) == (0, 2, 4, 8)
    assert C.CONFIG_SIZE == 12
    assert C.RESIZE.pack(132, 43) == struct.pack("<HH", 132, 43)     # cols, then rows
    both_ways = C.DRIVER_EVENTS & C.DEVICE_EVENTS
    assert both_ways == {C.VIRTIO_CONSOLE_PORT_OPEN}


def _topo(devices: dict, workloads: dict | None = None):
    return load_topology({"vms": {"vm0": {"devices": devices, "workloads": workloads or {}}}},
                         "t.yaml")


def test_topology_defaults_and_app_shorthand():
    topo = _topo({"hvc0": {"type": "console"}})
    dev = topo.vms["vm0"].devices["hvc0"]
    assert dev.multiport is False and len(dev.ports) == 1
    assert dev.ports[0].name == "console" and dev.ports[0].backend == "pty"
    w = topo.vms["vm0"].workloads["hvc0-console"]
    assert (w.type, w.device, w.port, w.app) == ("console-app", "hvc0", "console", "shell")
    assert specs.queues_of(dev) == 2

    topo = _topo({"hvc0": {"type": "console", "ports": [
        {"backend": "pty", "app": "shell"}, {"name": "org.x.y", "backend": "socket",
                                             "app": "echo"}, {"backend": "none"}]}})
    dev = topo.vms["vm0"].devices["hvc0"]
    assert dev.multiport is True
    assert [p.name for p in dev.ports] == ["console", "org.x.y", "port2"]
    assert sorted(topo.vms["vm0"].workloads) == ["hvc0-console", "hvc0-org-x-y"]
    assert specs.queues_of(dev) == 8
    d = specs.console_spec("vm0", "hvc0", dev, "/run/x", Path("/cfg"))
    assert d["multiport"] and d["max_nr_ports"] == 3 and d["size"] == [80, 24]
    assert d["ports"][0]["link"] == "/run/x/vm0-hvc0-console.pty"
    assert d["ports"][1]["path"] == "/run/x/vm0-hvc0-org.x.y.sock"
    assert d["ports"][0]["console"] and not d["ports"][1]["console"]
    assert d["manifest"] == "/run/x/vm0-hvc0.console.json"
    # max_ports beyond the ports configured: more queues, and multiport
    topo = _topo({"hvc0": {"type": "console", "max_ports": 4, "ports": [{"app": "none"}]}})
    assert topo.vms["vm0"].devices["hvc0"].multiport is True
    assert specs.queues_of(topo.vms["vm0"].devices["hvc0"]) == 10


@pytest.mark.parametrize("devices, workloads, expect", [
    ({"hvc0": {"type": "console", "ports": [{"backend": "file"}]}}, {},
     "vms.vm0.devices.hvc0.ports.0.path: a file backend needs"),
    ({"hvc0": {"type": "console", "multiport": False,
               "ports": [{"app": "none"}, {"app": "none"}]}}, {},
     "multiport: more than one port needs multiport"),
    ({"hvc0": {"type": "console", "ports": [{"name": "a"}, {"name": "a"}]}}, {},
     "ports.1.name: 'a' names two ports"),
    ({"hvc0": {"type": "console", "ports": [{"name": "9bad"}]}}, {}, "ports.0.name"),
    ({"hvc0": {"type": "console", "queue_size": 48}}, {}, "queue_size: expected a power of two"),
    ({"hvc0": {"type": "console", "ports": [{"app": "shell"}]}},
     {"w": {"type": "console-app", "device": "hvc0", "port": 0}},
     "workloads.hvc0-console.port: port 0 of 'hvc0' is w's already"),
    ({"hvc0": {"type": "console", "ports": [{"app": "none"}]}},
     {"w": {"type": "console-app", "device": "hvc0", "port": "nosuch"}},
     "workloads.w.port: 'hvc0' has no port 'nosuch'"),
    ({"vda": {"type": "blk", "backend": "memory"}},
     {"w": {"type": "console-app", "device": "vda"}},
     "workloads.w.device: 'vda' is a blk device; console-app needs a console device"),
    ({"hvc0": {"type": "console", "features": {"withhold": ["NOPE"]}}}, {},
     "unknown feature 'NOPE'"),
])
def test_topology_mistakes(devices, workloads, expect):
    with pytest.raises(TopologyError, match=re.escape(expect)):
        _topo(devices, workloads)


def test_a_device_named_like_a_type_keeps_its_name_in_errors():
    with pytest.raises(TopologyError, match=r"devices\.console\.queue_size"):
        _topo({"console": {"type": "console", "queue_size": 3}})


# ==== 2. the device alone, with a driver built by hand ===========================================
class FakeBackend(ConsoleBackend):
    """A host end that keeps what it gets."""

    kind = "fake"

    def __init__(self, connected: bool = True, size: tuple[int, int] | None = None) -> None:
        super().__init__()
        self.connected = connected
        self.size = size
        self.out = bytearray()
        self.limit: int | None = None
        self.description = "fake"

    def write(self, data: bytes) -> int:
        n = len(data) if self.limit is None else min(self.limit, len(data))
        self.out += data[:n]
        return n

    def window_size(self) -> tuple[int, int] | None:
        return self.size


def control_msgs(raw: list[bytes]) -> list[tuple]:
    out = []
    for m in raw:
        pid, ev, val = C.CONTROL.unpack_from(m)
        out.append((pid, C.event_name(ev), val, m[C.CONTROL_SIZE:]))
    return out


class Rig:
    """A console device on its MMIO window over anonymous guest RAM, and a driver's rings."""

    def __init__(self, names=("console", "org.test.1"), multiport: bool = True,
                 queue_size: int = 8, backends=None, **kw) -> None:
        self.mm = mmap.mmap(-1, RAM_SIZE)
        self.mem = GuestMemory(self.mm, RAM_BASE)
        self.dma = DmaMemory(GuestRAM(self.mm, RAM_BASE))
        self.backends = backends or [FakeBackend() for _ in names]
        ports = [HostPort(i, n, b, i == 0, (80, 24))
                 for i, (n, b) in enumerate(zip(names, self.backends, strict=True))]
        self.dev = ConsoleDevice("hvc0", self.mem, ports, multiport=multiport,
                                 queue_size=queue_size, **kw)
        self.t = MmioTransport(self.dev, MMIO_BASE, IRQ)
        self.vqs: dict[int, object] = {}
        self.bufs: list[int] = []

    def r(self, off: int) -> int:
        return self.t.read(off, 4)

    def w(self, off: int, value: int) -> None:
        self.t.write(off, 4, value)

    def cfg(self, off: int, width: int) -> int:
        return self.t.read(M.CONFIG + off, width)

    def boot(self, features: int | None = None, queues: int | None = None) -> None:
        """ACKNOWLEDGE .. FEATURES_OK with `features` (default: all offered), the queues set
        up and ready, DRIVER_OK."""
        offered = self.device_features()
        features = offered if features is None else features
        self.w(M.STATUS, ACK)
        self.w(M.STATUS, ACK | DRV)
        self.w(M.DRIVER_FEATURES_SEL, 1)
        self.w(M.DRIVER_FEATURES, features >> 32)
        self.w(M.DRIVER_FEATURES_SEL, 0)
        self.w(M.DRIVER_FEATURES, features & 0xFFFFFFFF)
        self.w(M.STATUS, ACK | DRV | FOK)
        assert self.r(M.STATUS) == ACK | DRV | FOK
        nq = queues if queues is not None else C.num_queues(
            bool(features & MULTIPORT), self.dev.max_nr_ports)
        for i in range(nq):
            vq = vring_create_virtqueue(i, 8, 4096, self.dma, features,
                                        notify=lambda q: True, callback=lambda q: None,
                                        name=f"q{i}")
            self.vqs[i] = vq
            self.w(M.QUEUE_SEL, i)
            self.w(M.QUEUE_NUM, 8)
            for lo, addr in ((M.QUEUE_DESC_LOW, vq.desc_addr), (M.QUEUE_DRIVER_LOW,
                             vq.avail_addr), (M.QUEUE_DEVICE_LOW, vq.used_addr)):
                self.w(lo, addr & 0xFFFFFFFF)
                self.w(lo + 4, addr >> 32)
            self.w(M.QUEUE_READY, 1)
        self.w(M.STATUS, ACK | DRV | FOK | DOK)
        assert self.r(M.STATUS) == ACK | DRV | FOK | DOK

    def device_features(self) -> int:
        self.w(M.DEVICE_FEATURES_SEL, 1)
        hi = self.r(M.DEVICE_FEATURES)
        self.w(M.DEVICE_FEATURES_SEL, 0)
        return hi << 32 | self.r(M.DEVICE_FEATURES)

    def service(self, qi: int) -> int:
        return self.dev.service(self.dev.queues[qi])

    def _buf(self, data: bytes | int) -> tuple[int, memoryview]:
        n = data if isinstance(data, int) else len(data)
        gpa, view = self.dma.alloc(n, 16)
        if not isinstance(data, int):
            view[:] = data
        self.bufs.append(gpa)
        return gpa, view

    def post(self, qi: int, count: int = 4, size: int = 64) -> None:
        """Receive buffers on queue qi, then the device's service pass."""
        vq = self.vqs[qi]
        for _ in range(count):
            gpa, view = self._buf(size)
            assert vq.add_inbuf(((gpa, size),), view) == 0
        self.service(qi)

    def send(self, qi: int, data: bytes) -> None:
        """A device-readable buffer on queue qi, then the device's service pass."""
        gpa, view = self._buf(data)
        assert self.vqs[qi].add_outbuf(((gpa, len(data)),), view) == 0
        self.service(qi)

    def used(self, qi: int) -> list[bytes]:
        out = []
        while (r := self.vqs[qi].get_buf()) is not None:
            view, ln = r
            out.append(bytes(view[:ln]))
        return out

    def ctl(self, port_id: int, event: int, value: int = 1) -> None:
        self.send(C.CONTROL_TX, C.control(port_id, event, value))

    def control(self, repost: int = 256) -> list[tuple]:
        """The control messages used so far; as many fresh buffers go back (as a driver
        re-adds each after handling it), of `repost` bytes (0: none)."""
        raw = self.used(C.CONTROL_RX)
        if raw and repost:
            self.post(C.CONTROL_RX, len(raw), repost)
        return control_msgs(raw)

    def handshake(self) -> list[tuple]:
        """Control buffers posted, DEVICE_READY, PORT_READY for every port added."""
        self.post(C.CONTROL_RX, self.vqs[C.CONTROL_RX].num_free, 256)
        self.ctl(C.VIRTIO_CONSOLE_BAD_ID, C.VIRTIO_CONSOLE_DEVICE_READY, 1)
        msgs = self.control()
        for pid, ev, _, _ in list(msgs):
            if ev == "DEVICE_ADD":
                self.ctl(pid, C.VIRTIO_CONSOLE_PORT_READY, 1)
                msgs += self.control()
        return msgs

    def close(self) -> None:
        for vq in self.vqs.values():
            vring_del_virtqueue(vq)
        self.dev.close()
        self.t.close()
        self.dma.ram.release()
        self.mem.release()
        try:
            self.mm.close()
        except BufferError:
            pass


@pytest.fixture
def make():
    rigs = []

    def _make(**kw) -> Rig:
        rig = Rig(**kw)
        rigs.append(rig)
        return rig

    yield _make
    for rig in rigs:
        rig.close()


RING = V1 | F.bit(F.VIRTIO_RING_F_INDIRECT_DESC) | F.bit(F.VIRTIO_RING_F_EVENT_IDX) \
    | F.bit(F.VIRTIO_F_RING_RESET)


def test_device_identity_features_and_config(make):
    rig = make()
    assert rig.r(M.DEVICE_ID) == ids.VIRTIO_ID_CONSOLE == 3
    assert rig.device_features() == RING | SIZE | MULTIPORT \
        | F.bit(C.VIRTIO_CONSOLE_F_EMERG_WRITE)
    assert (rig.cfg(C.CFG_COLS, 2), rig.cfg(C.CFG_ROWS, 2)) == (80, 24)
    assert rig.cfg(C.CFG_MAX_NR_PORTS, 4) == 2
    assert rig.cfg(C.CFG_EMERG_WR, 4) == 0
    assert len(rig.dev.queues) == 6
    single = make(names=("console",), multiport=False)
    assert not single.device_features() & MULTIPORT and len(single.dev.queues) == 2
    more = make(names=("console",), max_nr_ports=5)
    assert more.cfg(C.CFG_MAX_NR_PORTS, 4) == 5 and len(more.dev.queues) == 12
    with pytest.raises(ValueError):
        ConsoleDevice("x", rig.mem, [HostPort(0, "a", FakeBackend(), True, (80, 24)),
                                     HostPort(1, "b", FakeBackend(), False, (80, 24))],
                      multiport=False, queue_size=8)


def test_multiport_handshake_from_the_device_side(make):
    rig = make(names=("console", "org.test.1"))
    rig.backends[1].connected = False            # nobody on port 1's host end yet
    rig.boot()
    assert rig.dev.multiport
    rig.post(C.CONTROL_RX, 8, 256)
    assert rig.control() == []                   # nothing until the driver is ready
    rig.ctl(C.VIRTIO_CONSOLE_BAD_ID, C.VIRTIO_CONSOLE_DEVICE_READY, 1)
    assert rig.control() == [(0, "DEVICE_ADD", 0, b""), (1, "DEVICE_ADD", 0, b"")]
    rig.ctl(0, C.VIRTIO_CONSOLE_PORT_READY, 1)
    assert rig.control() == [(0, "CONSOLE_PORT", 1, b""),
                             (0, "RESIZE", 0, C.RESIZE.pack(80, 24)),
                             (0, "PORT_NAME", 0, b"console"),
                             (0, "PORT_OPEN", 1, b"")]
    rig.ctl(1, C.VIRTIO_CONSOLE_PORT_READY, 1)
    assert rig.control() == [(1, "PORT_NAME", 0, b"org.test.1")]     # not open, no console
    # the host end opens and closes: the driver hears each change once
    rig.dev.port_state(1, True)
    rig.dev.port_state(1, True)
    rig.dev.port_state(1, False)
    assert rig.control() == [(1, "PORT_OPEN", 1, b""), (1, "PORT_OPEN", 0, b"")]
    # a guest program opens the port
    rig.ctl(1, C.VIRTIO_CONSOLE_PORT_OPEN, 1)
    ports = rig.dev.describe()["ports"]
    assert [(p["guest_ready"], p["guest_open"]) for p in ports] == [(True, False), (True, True)]
    assert rig.dev.metrics.control_in == 4 and rig.dev.metrics.control_errors == 0
    assert rig.dev.guest_errors == [] and rig.dev.errors == []
    # a second DEVICE_READY adds nothing again
    rig.ctl(C.VIRTIO_CONSOLE_BAD_ID, C.VIRTIO_CONSOLE_DEVICE_READY, 1)
    assert rig.control() == []


def test_control_messages_wait_for_control_buffers(make):
    rig = make()
    rig.boot()
    rig.ctl(C.VIRTIO_CONSOLE_BAD_ID, C.VIRTIO_CONSOLE_DEVICE_READY, 1)
    assert len(rig.dev.ctrl_pending) == 2
    rig.post(C.CONTROL_RX, 1, 64)
    assert [m[:2] for m in rig.control(repost=0)] == [(0, "DEVICE_ADD")]
    rig.post(C.CONTROL_RX, 3, 64)
    assert [m[:2] for m in rig.control(repost=0)] == [(1, "DEVICE_ADD")]
    assert not rig.dev.ctrl_pending


def test_input_waits_for_buffers_and_for_the_port_to_open(make):
    rig = make()
    rig.boot()
    rig.handshake()
    rx1 = C.rx_queue(1)
    rig.dev.port_input(1, b"early bytes ")           # no buffers posted yet
    rig.post(rx1, 4, 8)
    assert rig.used(rx1) == []                       # posted, but the port is not open
    rig.dev.port_input(1, b"and later")
    rig.ctl(1, C.VIRTIO_CONSOLE_PORT_OPEN, 1)
    got = rig.used(rx1)
    # in order, one buffer after another, each filled
    assert got == [b"early by", b"tes and ", b"later"]
    assert rig.dev.ports[1].metrics.bytes_to_guest == 21
    assert rig.dev.ports[1].pending == bytearray()
    rig.dev.port_input(1, b"x" * 20)                 # one buffer left: 8 bytes now
    assert rig.used(rx1) == [b"x" * 8] and len(rig.dev.ports[1].pending) == 12
    rig.post(rx1, 2, 8)
    assert rig.used(rx1) == [b"x" * 8, b"x" * 4]


def test_console_port_takes_input_without_a_program(make):
    rig = make()
    rig.boot()
    rig.handshake()
    rig.ctl(0, C.VIRTIO_CONSOLE_PORT_OPEN, 1)        # what Linux's init_port_console sends
    rig.post(C.rx_queue(0), 2, 64)
    rig.dev.port_input(0, b"ls\r")
    assert rig.used(0) == [b"ls\r"]


def test_output_goes_to_the_backend(make):
    rig = make()
    rig.boot()
    rig.handshake()
    rig.send(C.tx_queue(1), b"hello ")
    rig.send(C.tx_queue(1), b"host")
    assert bytes(rig.backends[1].out) == b"hello host"
    assert rig.used(C.tx_queue(1)) == [b"", b""]     # transmit buffers come back with len 0
    rig.backends[0].limit = 3                        # a backend that takes only some of it
    rig.send(C.tx_queue(0), b"abcdef")
    m = rig.dev.ports[0].metrics
    assert (m.bytes_from_guest, m.dropped_from_guest) == (6, 3)


def test_single_port_device_without_multiport(make):
    rig = make(names=("console",), multiport=False)
    rig.boot()
    p = rig.dev.ports[0]
    assert (p.guest_ready, p.guest_open) == (True, True)
    rig.post(0, 2, 16)
    rig.dev.port_input(0, b"echo hi\r")
    assert rig.used(0) == [b"echo hi\r"]
    rig.send(1, b"hi\r\n")
    assert bytes(rig.backends[0].out) == b"hi\r\n"


def test_driver_may_refuse_multiport(make):
    rig = make(names=("console",))
    rig.boot(features=rig.device_features() & ~MULTIPORT)
    assert not rig.dev.multiport
    rig.post(0, 1, 16)
    rig.dev.port_input(0, b"x")
    assert rig.used(0) == [b"x"]


@pytest.mark.parametrize("message, why", [
    (b"\x00\x00\x00\x00", "a control message of 4 bytes"),
    (C.control(7, C.VIRTIO_CONSOLE_PORT_READY, 1), "PORT_READY for port 7, which the device"),
    (C.control(0, C.VIRTIO_CONSOLE_DEVICE_ADD, 0), "DEVICE_ADD for port 0 is the device's"),
    (C.control(0, C.VIRTIO_CONSOLE_PORT_NAME, 0) + b"x", "PORT_NAME for port 0 is the device's"),
    (C.control(0, 99, 0), "unknown control event 99"),
    (C.control(C.VIRTIO_CONSOLE_BAD_ID, C.VIRTIO_CONSOLE_DEVICE_READY, 0), "DEVICE_READY 0"),
])
def test_bad_control_messages_are_guest_errors(make, message, why):
    rig = make()
    rig.boot()
    rig.post(C.CONTROL_RX, 8, 64)
    rig.send(C.CONTROL_TX, message)
    assert rig.dev.metrics.control_errors == 1
    assert any(why in e for e in rig.dev.guest_errors), rig.dev.guest_errors
    assert not rig.r(M.STATUS) & S.DEVICE_NEEDS_RESET and rig.dev.errors == []
    assert rig.used(C.CONTROL_TX) == [b""]           # the buffer is returned all the same
    # the device goes on: the handshake still works
    assert (1, "PORT_NAME", 0, b"org.test.1") in rig.handshake()


def test_port_ready_before_device_ready_is_refused(make):
    rig = make()
    rig.boot()
    rig.post(C.CONTROL_RX, 4, 64)
    rig.ctl(0, C.VIRTIO_CONSOLE_PORT_READY, 1)
    assert "never added" in rig.dev.guest_errors[-1]
    assert rig.control() == []


@pytest.mark.parametrize("queue, readable", [(0, True), (C.CONTROL_RX, True), (1, False),
                                             (C.CONTROL_TX, False)])
def test_wrong_direction_buffers_are_device_errors(make, queue, readable):
    """A device-readable buffer in a receiveq, a device-writable one in a transmitq: the
    driver broke a MUST; the device needs a reset."""
    rig = make()
    rig.boot()
    gpa, view = rig._buf(16)
    vq = rig.vqs[queue]
    if readable:
        vq.add_outbuf(((gpa, 16),), view)
    else:
        vq.add_inbuf(((gpa, 16),), view)
    rig.service(queue)
    assert rig.r(M.STATUS) & S.DEVICE_NEEDS_RESET
    assert rig.dev.broken and "buffer in" in rig.dev.errors[0]
    assert rig.t.interrupt_status & M.INT_CONFIG


def test_short_control_buffer_truncates_the_message(make):
    rig = make(names=("console", "a-rather-long-port-name"))
    rig.boot()
    rig.post(C.CONTROL_RX, 8, 12)
    rig.ctl(C.VIRTIO_CONSOLE_BAD_ID, C.VIRTIO_CONSOLE_DEVICE_READY, 1)
    rig.control(repost=12)
    rig.ctl(1, C.VIRTIO_CONSOLE_PORT_READY, 1)
    assert rig.control()[0] == (1, "PORT_NAME", 0, b"a-ra")
    assert rig.dev.metrics.control_truncated == 1


def test_emergency_write_reaches_port_0(make):
    rig = make()
    # before any negotiation: the spec lets a driver use it at once
    for ch in b"OOPS":
        rig.t.write(M.CONFIG + C.CFG_EMERG_WR, 4, ch)
    assert bytes(rig.backends[0].out) == b"OOPS"
    assert rig.dev.metrics.emerg_writes == 4
    withheld = make(withhold=F.bit(C.VIRTIO_CONSOLE_F_EMERG_WRITE))
    withheld.t.write(M.CONFIG + C.CFG_EMERG_WR, 4, ord("x"))
    assert withheld.backends[0].out == bytearray() and withheld.dev.guest_errors
    rig.t.write(M.CONFIG + C.CFG_COLS, 2, 1)         # the rest is read-only
    assert "read-only" in rig.dev.guest_errors[-1]


def test_resize_through_config_space(make):
    rig = make(names=("console",), multiport=False)
    rig.boot()
    gen = rig.r(M.CONFIG_GENERATION)
    rig.dev.resize(0, 132, 43)
    assert (rig.cfg(C.CFG_COLS, 2), rig.cfg(C.CFG_ROWS, 2)) == (132, 43)
    assert rig.r(M.CONFIG_GENERATION) == gen + 1
    assert rig.t.interrupt_status & M.INT_CONFIG
    # a terminal's size is picked up when the port has traffic
    rig.backends[0].size = (100, 30)
    rig.send(1, b"$ ")
    assert rig.dev.ports[0].size == (100, 30) and rig.cfg(C.CFG_COLS, 2) == 100


def test_resize_message_for_a_multiport_console(make):
    rig = make()
    rig.boot()
    rig.handshake()
    rig.dev.resize(0, 120, 50)
    assert rig.control() == [(0, "RESIZE", 0, C.RESIZE.pack(120, 50))]
    rig.dev.resize(1, 10, 10)                        # not a console port: no message
    assert rig.control() == []


def test_pending_input_pauses_the_backend(make):
    rig = make()
    rig.boot()
    rig.handshake()
    b = rig.backends[1]
    rig.dev.port_input(1, b"z" * PENDING_MAX)
    assert b.paused
    rig.ctl(1, C.VIRTIO_CONSOLE_PORT_OPEN, 1)
    for _ in range(PENDING_MAX // (8 * 4096) + 1):
        rig.post(C.rx_queue(1), 8, 4096)
        rig.used(C.rx_queue(1))
    assert not b.paused and not rig.dev.ports[1].pending


def test_reset_forgets_the_driver(make):
    rig = make()
    rig.boot()
    rig.handshake()
    rig.dev.port_input(1, b"lost")
    rig.w(M.STATUS, 0)
    assert not any(p.added for p in rig.dev.ports)
    assert rig.dev.ports[1].metrics.dropped_to_guest == 4
    for vq in rig.vqs.values():
        vring_del_virtqueue(vq)
    rig.vqs.clear()
    rig.boot()
    assert [m[:2] for m in rig.handshake()][:2] == [(0, "DEVICE_ADD"), (1, "DEVICE_ADD")]


def test_queue_reset_drops_held_buffers(make):
    rig = make()
    rig.boot()
    rig.handshake()
    rig.post(C.rx_queue(1), 4, 8)
    assert len(rig.dev.ports[1].held) == 4
    rig.w(M.QUEUE_SEL, C.rx_queue(1))
    rig.w(M.QUEUE_RESET, 1)
    assert len(rig.dev.ports[1].held) == 0


# ==== 3. the backends ============================================================================
class StubLoop:
    def __init__(self) -> None:
        self.readers: dict[int, object] = {}

    def add_reader(self, fd: int, cb) -> None:
        self.readers[fd] = cb

    def remove_reader(self, fd: int) -> None:
        self.readers.pop(fd, None)

    def pump(self, timeout: float = 1.0) -> None:
        """Call the readers whose fds are readable (once each)."""
        if not self.readers:
            return
        ready, _, _ = select.select(list(self.readers), [], [], timeout)
        for fd in ready:
            cb = self.readers.get(fd)
            if cb is not None:
                cb(fd)


def _read_until(fd: int, want: bytes, timeout: float = 5.0) -> bytes:
    got = b""
    deadline = time.monotonic() + timeout
    while want not in got:
        left = deadline - time.monotonic()
        assert left > 0, f"timed out waiting for {want!r}; got {got!r}"
        r, _, _ = select.select([fd], [], [], left)
        if r:
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            got += chunk
    return got


def test_pty_backend(tmp_path):
    loop = StubLoop()
    link = str(tmp_path / "vm0-hvc0-console.pty")
    b = PtyBackend(link, (90, 33))
    got = []
    try:
        b.attach(loop, got.append, lambda c: None)
        assert b.connected and os.readlink(link) == b.path
        assert b.window_size() == (90, 33)
        user = os.open(b.path, os.O_RDWR | os.O_NOCTTY)
        try:
            assert b.write(b"guest says hi\r\n") == 15
            assert _read_until(user, b"hi\r\n").endswith(b"guest says hi\r\n")   # raw: as is
            os.write(user, b"typed\r")
            deadline = time.monotonic() + 5
            while b"".join(got) != b"typed\r" and time.monotonic() < deadline:
                loop.pump(0.2)
            assert b"".join(got) == b"typed\r"                # no echo, no CR translation
            fcntl_winsize(user, 120, 40)
            assert b.window_size() == (120, 40)
            b.pause_input()
            assert not loop.readers
            b.resume_input()
            assert loop.readers
        finally:
            os.close(user)
    finally:
        b.close()
    assert not os.path.lexists(link) and not loop.readers


def fcntl_winsize(fd: int, cols: int, rows: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def test_socket_backend_one_client_at_a_time(tmp_path):
    loop = StubLoop()
    path = str(tmp_path / "port.sock")
    b = SocketBackend(path)
    got, states = [], []
    try:
        b.attach(loop, got.append, states.append)
        assert not b.connected and b.write(b"nobody") == 0
        c1 = socket.socket(socket.AF_UNIX)
        c1.connect(path)
        loop.pump()
        assert b.connected and states == [True]
        c2 = socket.socket(socket.AF_UNIX)
        c2.connect(path)
        loop.pump()
        assert c2.recv(10) == b"" and b.refused == 1        # refused: closed at once
        c1.sendall(b"from the host side")
        while b"".join(got) != b"from the host side":
            loop.pump()
        assert b.write(b"to the client") == 13
        assert c1.recv(100) == b"to the client"
        c1.close()
        while b.connected:
            loop.pump()
        assert states == [True, False]
        c2.close()
    finally:
        b.close()
    assert not os.path.exists(path)


def test_file_backend_appends(tmp_path):
    path = tmp_path / "guest.log"
    path.write_bytes(b"before\n")
    b = FileBackend(str(path))
    assert b.connected
    assert b.write(b"after\n") == 6
    b.close()
    assert path.read_bytes() == b"before\nafter\n"


# ==== 4. the guest's driver against the device, in one process ===================================
class Recorder:
    """A program on a port: what it heard."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.opens: list[bool] = []
        self.sizes: list[tuple[int, int]] = []
        self.lock = threading.Lock()

    def on_data(self, port: Port, data: bytes) -> None:
        with self.lock:
            self.data += data

    def on_open(self, port: Port, connected: bool) -> None:
        self.opens.append(connected)

    def on_resize(self, port: Port, cols: int, rows: int) -> None:
        self.sizes.append((cols, rows))


class Machine:
    """Guest RAM, the console device on MMIO served by a host thread, the guest's view."""

    def __init__(self, names=("console", "org.vmsim.a", "org.vmsim.b"), multiport=None,
                 backends=None, version: int = 2, **kw) -> None:
        self.mm = mmap.mmap(-1, RAM_SIZE)
        self.hmem = GuestMemory(self.mm, RAM_BASE)
        self.ram = GuestRAM(self.mm, RAM_BASE)
        self.dma = DmaMemory(self.ram)
        self.backends = backends or [FakeBackend() for _ in names]
        ports = [HostPort(i, n, b, i == 0, (80, 24))
                 for i, (n, b) in enumerate(zip(names, self.backends, strict=True))]
        mp = len(names) > 1 if multiport is None else multiport
        self.dev = ConsoleDevice("hvc0", self.hmem, ports, multiport=mp, queue_size=16, **kw)
        self.t = MmioTransport(self.dev, MMIO_BASE, IRQ, version=version)
        self.host = TestHost([self.t])
        self.host.start()
        self.platform = Platform(self.host.guest_ch)
        self.irqc = IrqController()
        for space, addr, data, efd in self.t.ioeventfds():
            self.platform.bind_ioeventfd(addr, data, efd, space)
        self.irqc.add_line(self.t.irq, self.t.irqfd)
        self.irqc.start()
        self.bus = VirtioBus()
        self.vm = VirtioMmio(self.platform, self.irqc, self.dma, MMIO_BASE, IRQ,
                             queue_stats=lambda i: None)
        self.vdev = None

    def boot(self) -> int:
        self.vdev = self.vm.probe("hvc0", None)
        self.bus.register_driver(ConsoleDriver(self.dma))
        return self.bus.register_device(self.vdev)

    @property
    def console(self) -> VirtioConsole:
        assert isinstance(self.vdev.priv, VirtioConsole)
        return self.vdev.priv

    def out(self, port: int) -> bytes:
        return self.host.call(lambda: bytes(self.backends[port].out))

    def wait_out(self, port: int, want: bytes, timeout: float = 5.0) -> bytes:
        wait_for(lambda: want in self.out(port), timeout, f"{want!r} on port {port}'s host end")
        return self.out(port)

    def close(self) -> None:
        try:
            if self.vdev is not None and self.vdev.driver is not None:
                self.bus.unregister_device(self.vdev)
        finally:
            self.irqc.stop()
            self.host.stop()
            self.dev.close()
            self.t.close()
            self.ram.release()
            self.hmem.release()
            try:
                self.mm.close()
            except BufferError:
                pass
        assert self.host.error is None, f"host thread failed: {self.host.error!r}"
        assert self.irqc.error is None, f"interrupt thread failed: {self.irqc.error!r}"


@pytest.fixture
def machine():
    made = []

    def _make(**kw) -> Machine:
        m = Machine(**kw)
        made.append(m)
        return m

    yield _make
    for m in made:
        m.close()


def _named(m: Machine, names) -> None:
    wait_for(lambda: all(m.console.find_port(name=n) is not None for n in names), 5,
             f"ports {names} named by PORT_NAME")


@pytest.mark.parametrize("kw", [{}, {"packed": True}, {"version": 1}],
                         ids=["split", "packed", "mmio-v1-legacy"])
def test_guest_driver_brings_up_named_ports(machine, kw):
    m = machine(**kw)
    assert m.boot() == 0
    assert m.vdev.has_feature(F.VIRTIO_F_RING_PACKED) == bool(kw.get("packed"))
    con = m.console
    assert con.multiport and con.max_nr_ports == 3
    _named(m, ["console", "org.vmsim.a", "org.vmsim.b"])
    p0, p1 = con.find_port(0), con.find_port(1)
    # PORT_OPEN follows PORT_NAME, each way: let both sides hear the last of it
    wait_for(lambda: p0.host_connected and p1.host_connected, what="PORT_OPEN from the host")
    wait_for(lambda: [p["guest_open"] for p in m.host.call(m.dev.describe)["ports"]]
             == [True, False, False], what="PORT_OPEN 1 for the console port")
    assert p0.is_console and p0.guest_connected
    assert p0.size == (80, 24)                       # from RESIZE
    assert not p1.is_console and not p1.guest_connected
    assert len(p1.rx_bufs) == 16                     # the whole receiveq, filled in advance
    dev = m.host.call(m.dev.describe)
    assert [p["guest_ready"] for p in dev["ports"]] == [True, True, True]
    assert m.dev.guest_errors == [] and con.bad_control == 0
    assert m.vdev.has_feature(C.VIRTIO_CONSOLE_F_MULTIPORT)
    assert not m.vdev.has_feature(C.VIRTIO_CONSOLE_F_EMERG_WRITE)   # used, not negotiated


def test_guest_data_round_trip(machine):
    m = machine()
    assert m.boot() == 0
    _named(m, ["org.vmsim.a"])
    port = m.console.find_port(name="org.vmsim.a")
    rec = Recorder()
    m.host.call(m.dev.port_input, 1, b"sent before the port was open ")
    assert port.open(rec) == 0                       # PORT_OPEN 1: now the device sends
    wait_for(lambda: m.host.call(lambda: m.dev.ports[1].guest_open), what="PORT_OPEN 1")
    m.host.call(m.dev.port_input, 1, b"and after")
    wait_for(lambda: bytes(rec.data) == b"sent before the port was open and after",
             what="input in order")
    big = bytes(range(256)) * 80                     # five page-sized transmit buffers
    assert port.write(big) == len(big)
    assert m.wait_out(1, big[-300:]) == big
    assert port.open(Recorder()) < 0                 # one program at a time
    port.close()
    wait_for(lambda: not m.host.call(lambda: m.dev.ports[1].guest_open), what="PORT_OPEN 0")
    m.host.call(m.dev.port_state, 1, False)
    wait_for(lambda: not port.host_connected, what="the host end closing")


def test_single_port_console_and_config_resize(machine):
    m = machine(names=("console",))
    assert m.boot() == 0
    con = m.console
    assert not con.multiport and con.size == (80, 24)
    port = con.find_port(0)
    assert port is not None and port.is_console and port.host_connected
    rec = Recorder()
    assert port.open(rec) == 0
    m.host.call(m.dev.resize, 0, 132, 43)
    wait_for(lambda: rec.sizes == [(132, 43)], what="the config change")
    assert port.size == (132, 43) and m.vdev.n_config_changed == 1
    m.host.call(m.dev.port_input, 0, b"x")
    wait_for(lambda: rec.data == b"x")
    assert con.emerg_write(b"!!") == 2
    assert m.wait_out(0, b"!!")


def test_guest_driver_drops_bad_device_messages(machine):
    m = machine()
    assert m.boot() == 0
    _named(m, ["org.vmsim.b"])
    con = m.console
    before = con.bad_control
    for msg in (b"\x01", C.control(9, C.VIRTIO_CONSOLE_PORT_OPEN, 1),
                C.control(0, C.VIRTIO_CONSOLE_RESIZE, 0),
                C.control(1, C.VIRTIO_CONSOLE_PORT_READY, 1),
                C.control(1, 77, 0), C.control(40, C.VIRTIO_CONSOLE_DEVICE_ADD, 0)):
        con.handle_control_message(msg)
    assert con.bad_control == before + 6
    con.handle_control_message(C.control(1, C.VIRTIO_CONSOLE_PORT_NAME, 0) + b"renamed")
    assert con.find_port(1).name == "org.vmsim.a"        # a port is named once
    con.handle_control_message(C.control(1, C.VIRTIO_CONSOLE_RESIZE, 0) + C.RESIZE.pack(1, 1))
    assert con.find_port(1).size == (0, 0)               # not a console: no size


def test_removal_gives_every_buffer_back(machine):
    m = machine()
    allocs = m.dma.allocator.allocations
    free = m.dma.allocator.free_bytes
    assert m.boot() == 0
    _named(m, ["console", "org.vmsim.a", "org.vmsim.b"])
    port = m.console.find_port(2)
    assert port.write(b"pending?") == 8
    m.bus.unregister_device(m.vdev)
    assert m.host.call(lambda: m.dev.status) == ACK
    assert m.vdev.vqs == [] and m.vdev.priv is None
    assert (m.dma.allocator.allocations, m.dma.allocator.free_bytes) == (allocs, free)


def _app(m: Machine, port, app: str = "shell", **kw) -> ConsoleApp:
    spec = {"type": "console-app", "device": "hvc0", "port": port, "app": app, "vm": "vmX",
            **kw}
    a = ConsoleApp(f"{app}-{port}", spec, {"hvc0": m.vdev}, None)
    a.start()
    return a


def test_shell_app_answers_on_the_console(machine):
    m = machine()
    assert m.boot() == 0
    sh = _app(m, "console")
    out = m.wait_out(0, b"vmX$ ")
    assert b"vmsim guest vmX, hvc0 port 0 (console)" in out
    m.host.call(m.dev.port_input, 0, b"hostnamx\x7fe\r")     # a typo, backspace, enter
    out = m.wait_out(0, b"hostnamx\b \be\r\nvmX\r\nvmX$ ")  # echoed, erased, run
    m.host.call(m.dev.port_input, 0, b"ports\r\n")
    out = m.wait_out(0, b"org.vmsim.b")
    assert b"port 1 org.vmsim.a: generic" in out and b"<- this shell" in out
    m.host.call(m.dev.port_input, 0, b"bogus\rqueues hvc0\r")
    out = m.wait_out(0, b"control-o")
    assert b"bogus: command not found" in out and b"input.2" in out
    m.host.call(m.dev.port_input, 0, b"\x1b[Auname -a\r\x03")  # an arrow key, Ctrl-C
    out = m.wait_out(0, b"^C\r\n")
    assert b"vmsim vmX " in out
    assert sh.ops == 5 and sh.unknown == 1 and sh.errors == 0
    sh.stop()
    assert sh.finished_event.is_set() and sh.errors == 0


def test_echo_app_on_a_generic_port(machine):
    m = machine()
    assert m.boot() == 0
    echo = _app(m, "org.vmsim.b", "echo", ops=2)
    wait_for(lambda: m.host.call(lambda: m.dev.ports[2].guest_open), what="PORT_OPEN 1")
    m.host.call(m.dev.port_input, 2, b"ping\n")
    m.wait_out(2, b"ping\n")
    assert not echo.finished_event.is_set()
    m.host.call(m.dev.port_input, 2, b"\x00\xffbinary")
    m.wait_out(2, b"\x00\xffbinary")
    assert echo.finished_event.is_set() and echo.ops == 2    # `ops:` reached
    echo.stop()
    wait_for(lambda: not m.host.call(lambda: m.dev.ports[2].guest_open), what="PORT_OPEN 0")
    assert echo.report()["bound_port"] == [2, "org.vmsim.b"]


def test_app_on_a_port_that_never_comes_up(machine):
    m = machine(names=("console", "org.vmsim.a"))
    assert m.boot() == 0
    a = _app(m, 7, "echo")
    a.stop()
    assert a.errors == 1 and "never came up" in a.error_messages[0]


# ==== 5. real runs ===============================================================================
def _wait_err(launch: Launch, pattern: re.Pattern, timeout: float = 30.0) -> list[tuple]:
    deadline = time.monotonic() + timeout
    while True:
        launch.sample()
        found = pattern.findall(launch.err)
        if found:
            return found
        if launch.p.poll() is not None:
            pytest.fail(f"vmsim exited ({launch.p.returncode}) before it printed a console\n"
                        + launch.output())
        if time.monotonic() > deadline:
            pytest.fail(f"no console line within {timeout} s\n" + launch.output())
        time.sleep(0.05)


class Term:
    """The test's end of a pty: write, and read until something appears."""

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_RDWR | os.O_NOCTTY)
        self.seen = b""

    def expect(self, want: bytes, timeout: float = 10.0) -> bytes:
        start = len(self.seen)
        deadline = time.monotonic() + timeout
        while want not in self.seen[start:]:
            left = deadline - time.monotonic()
            assert left > 0, f"timed out waiting for {want!r}; got {self.seen[start:]!r}"
            r, _, _ = select.select([self.fd], [], [], left)
            if r:
                self.seen += os.read(self.fd, 4096)
        return self.seen[start:]

    def send(self, data: bytes) -> None:
        os.write(self.fd, data)

    def close(self) -> None:
        os.close(self.fd)


def _stop(launch: Launch, timeout: float = 30) -> int:
    """End the run early (SIGINT, as Ctrl-C) and wait for it."""
    launch.p.send_signal(signal.SIGINT)
    return launch.wait(timeout)


@pytest.mark.multiprocess
@pytest.mark.timeout(90)
def test_pty_round_trip_with_the_shipped_config(tmp_path):
    js = tmp_path / "summary.json"
    launch = Launch(tmp_path, "run", str(CONSOLE_PTY), "--duration", "60", "--json", str(js))
    term = None
    try:
        (vm, dev, idx, name, pty), = _wait_err(launch, PTY_LINE)
        assert (vm, dev, idx, name) == ("vm0", "hvc0", "0", "console")
        (_, _, _, sname, sock_path), = _wait_err(launch, SOCK_LINE)
        assert sname == "org.vmsim.echo"
        rundir = Path(sock_path).parent
        assert os.readlink(rundir / "vm0-hvc0-console.pty") == pty
        term = Term(pty)
        term.expect(b"Type 'help'.\r\nvm0$ ")           # what the guest wrote before we came
        term.send(b"hostname\r")
        assert term.expect(b"vm0$ ").startswith(b"hostname\r\nvm0\r\n")
        term.send(b"ports\r")
        out = term.expect(b"vm0$ ")
        assert b"hvc0: multiport, max 2" in out
        assert b"port 0 console: console, host open, guest open" in out
        assert b"port 1 org.vmsim.echo: generic" in out        # named by PORT_NAME
        term.send(b"devices\r")
        assert b"hvc0: console, driver virtio_console" in term.expect(b"vm0$ ")
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(sock_path)
            s.sendall(b"echo me\n")
            got = b""
            while got != b"echo me\n":
                chunk = s.recv(100)
                assert chunk, "the socket closed"
                got += chunk
        assert _stop(launch) == 130, launch.output()
        launch.assert_clean()
    finally:
        if term is not None:
            term.close()
        launch.close()
    s = load_json(js)
    d = s["vms"]["vm0"]["devices"]["hvc0"]
    assert d["type"] == "console" and d["driver"] == "virtio_console" and d["errors"] == []
    assert "MULTIPORT" in d["features"] and "SIZE" in d["features"]
    assert [p["name"] for p in d["driver_info"]["ports"]] == ["console", "org.vmsim.echo"]
    ports = d["info"]["ports"]
    assert ports[0]["backend"] == "pty" and ports[0]["path"] == pty
    assert ports[0]["bytes_to_guest"] > 0 and ports[0]["bytes_from_guest"] > 0
    assert ports[1]["bytes_to_guest"] == ports[1]["bytes_from_guest"] == 8
    ctl = d["info"]["console"]          # DEVICE_READY, 2 PORT_READY, 2 PORT_OPEN 1, 1 PORT_OPEN 0
    assert ctl["control_in"] == 6 and ctl["control_errors"] == 0 and ctl["control_out"] >= 8
    w = s["workloads"]
    assert w["vm0.hvc0-console"]["ops"] == 3 and w["vm0.hvc0-console"]["errors"] == 0
    assert w["vm0.hvc0-org-vmsim-echo"]["ops"] >= 1
    assert s["totals"]["device_errors"] == 0


@pytest.mark.multiprocess
@pytest.mark.timeout(90)
def test_log_file_and_socket_backends(tmp_path):
    log = tmp_path / "guest.log"
    sock_path = tmp_path / "echo.sock"
    cfg = write_yaml(tmp_path, f"""
        name: console-backends
        vms:
          vm1:
            memory: 16M
            devices:
              hvc0:
                type: console
                ports:
                  - {{name: console, backend: pty}}
                  - {{name: log, backend: file, path: {log}, app: shell}}
                  - {{name: org.echo, backend: socket, path: {sock_path}}}
              hvc1:
                type: console
                ring: packed
                ports: [{{backend: socket, app: echo}}]
            workloads:
              echo:
                type: console-app
                device: hvc0
                port: org.echo
                app: echo
                ops: 2
        """)
    js = tmp_path / "summary.json"
    launch = Launch(tmp_path, "run", str(cfg), "--duration", "60", "--json", str(js))
    try:
        socks = {(d, n): p for _, d, _, n, p in _wait_err(launch, SOCK_LINE)}
        assert socks[("hvc0", "org.echo")] == str(sock_path)
        attach = [*VMSIM, "console", "--run", str(launch.pid), "vm1"]
        r = subprocess.run([*attach, "hvc0", "log"], capture_output=True, text=True,
                           timeout=30)
        assert r.returncode == 1 and "writes to the log file" in r.stderr
        r = subprocess.run([*attach, "hvc0", "nosuch"], capture_output=True,
                           text=True, timeout=30)
        assert r.returncode == 1 and "has no port nosuch" in r.stderr
        # the single-port device (no MULTIPORT), on a packed ring: its socket through
        # `vmsim console` with piped input
        r = subprocess.run([*attach, "hvc1"], input="one line\n", capture_output=True,
                           text=True, timeout=30)
        assert r.returncode == 0 and r.stdout.endswith("one line\n"), r
        for k in range(2):                              # the echo app's `ops: 2`
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(str(sock_path))
                s.sendall(f"msg {k}\n".encode())
                assert s.recv(100) == f"msg {k}\n".encode()
        assert _stop(launch) == 130, launch.output()
        launch.assert_clean()
    finally:
        launch.close()
    assert b"vmsim guest vm1, hvc0 port 1 (log)" in log.read_bytes()
    s = load_json(js)
    devs = s["vms"]["vm1"]["devices"]
    assert "MULTIPORT" not in devs["hvc1"]["features"]
    assert "RING_PACKED" in devs["hvc1"]["features"]
    assert devs["hvc0"]["info"]["ports"][1]["backend"] == "file"
    assert s["workloads"]["vm1.echo"]["ops"] == 2
    assert s["totals"]["device_errors"] == 0 and s["totals"]["workload_errors"] == 0


def _tmux() -> str:
    path = shutil.which("tmux")
    if path is None:
        pytest.skip("tmux is not installed (apt-get install tmux)")
    return path


@pytest.mark.multiprocess
@pytest.mark.timeout(120)
def test_vmsim_console_in_tmux(tmp_path):
    tmux = _tmux()
    server = f"vmsim-test-{uuid.uuid4().hex[:8]}"
    launch = Launch(tmp_path, "run", str(CONSOLE_PTY), "--duration", "90")

    def tm(*args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run([tmux, "-L", server, *args], capture_output=True, text=True,
                              timeout=30, check=check)

    def screen() -> str:
        return tm("capture-pane", "-p", "-t", "c").stdout

    def wait_screen(pattern: str, timeout: float = 20) -> str:
        deadline = time.monotonic() + timeout
        while not re.search(pattern, screen(), re.M):
            assert time.monotonic() < deadline, f"no {pattern!r} on the screen:\n{screen()}"
            time.sleep(0.1)
        return screen()

    try:
        _wait_err(launch, PTY_LINE)
        cmd = " ".join([*VMSIM, "console", "--run", str(launch.pid), "vm0", "hvc0"])
        tm("new-session", "-d", "-s", "c", "-x", "100", "-y", "30", cmd)
        wait_screen(r"Escape character is \^\]")
        tm("send-keys", "-t", "c", "hostname", "Enter")
        wait_screen(r"^vm0\$ hostname\s*\n^vm0\s*$")
        tm("send-keys", "-t", "c", "size", "Enter")
        out = wait_screen(r"^\d+ x \d+\s*$")
        assert "100 x 30" in out, out                 # the terminal's size reached the guest
        tm("send-keys", "-t", "c", "uname -a", "Enter")
        wait_screen(r"^vmsim vm0 \S+ virtio guest")
        tm("send-keys", "-t", "c", "C-]")
        deadline = time.monotonic() + 10
        while tm("has-session", "-t", "c", check=False).returncode == 0:
            assert time.monotonic() < deadline, "Ctrl-] did not end vmsim console"
            time.sleep(0.1)
        assert _stop(launch) == 130, launch.output()
        launch.assert_clean()
    finally:
        tm("kill-server", check=False)
        launch.close()


@pytest.mark.timeout(60)
def test_vmsim_console_without_a_run(tmp_path):
    r = subprocess.run([*VMSIM, "console", "nosuchvm", "hvc0"], capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 1
    assert r.stderr.strip().startswith("vmsim: nosuchvm.hvc0: no console device")
    assert len(r.stderr.strip().splitlines()) == 1


def test_vmsim_console_finds_the_port(tmp_path):
    """The run directories of live runs, their manifests, --run, PORT by name or number."""
    from vmsim.launcher.console_attach import AttachError, find_console

    me = os.getpid()
    ports = [{"index": 0, "name": "console", "backend": "pty", "path": "/dev/pts/77"},
             {"index": 1, "name": "log", "backend": "file", "path": "/tmp/x.log"},
             {"index": 2, "name": "org.s", "backend": "socket", "path": "/tmp/s.sock"},
             {"index": 3, "name": "off", "backend": "none"}]
    for run in (f"vmsim-{me}-aaaaaa", f"vmsim-{me}-bbbbbb"):
        d = tmp_path / f"{run}-xyz"
        d.mkdir()
        (d / "vm0-hvc0.console.json").write_text(json.dumps({"vm": "vm0", "device": "hvc0",
                                                             "ports": ports}))
    (tmp_path / "vmsim-999999999-cccccc-dead").mkdir()       # a dead launcher's: not live
    with pytest.raises(AttachError, match=r"several running runs.*--run"):
        find_console("vm0", "hvc0", tmp=str(tmp_path))
    ep = find_console("vm0", "hvc0", run=f"vmsim-{me}-bbbbbb", tmp=str(tmp_path))
    assert (ep.run, ep.index, ep.kind, ep.path) == (f"vmsim-{me}-bbbbbb", 0, "pty", "/dev/pts/77")
    ep = find_console("vm0", "hvc0", "2", run=f"vmsim-{me}-aaaaaa", tmp=str(tmp_path))
    assert (ep.name, ep.kind, ep.path) == ("org.s", "socket", "/tmp/s.sock")
    assert find_console("vm0", "hvc0", "org.s", run=f"vmsim-{me}-aaaaaa",
                        tmp=str(tmp_path)).index == 2
    for port, why in (("log", "writes to the log file /tmp/x.log"), ("off", "no host end"),
                      ("9", "has no port 9"), ("nope", "has no port nope")):
        with pytest.raises(AttachError, match=re.escape(why)):
            find_console("vm0", "hvc0", port, run=f"vmsim-{me}-aaaaaa", tmp=str(tmp_path))
    with pytest.raises(AttachError, match="no running vmsim run matches --run vmsim-1-"):
        find_console("vm0", "hvc0", run="vmsim-1-", tmp=str(tmp_path))
    with pytest.raises(AttachError, match=r"vm0\.hvc9: no console device"):
        find_console("vm0", "hvc9", run=f"vmsim-{me}-aaaaaa", tmp=str(tmp_path))
