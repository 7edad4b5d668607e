"""A port as the device keeps it: its name and backend, its queues, what the driver said of
it (PORT_READY, PORT_OPEN), the receive buffers the driver posted and the host's input
waiting for them."""

from collections import deque
from typing import Any

from vmsim.abi import console as C
from vmsim.host.devices.console.backend import ConsoleBackend
from vmsim.host.devices.console.metrics import PortMetrics
from vmsim.host.virtio.chain import DescChain
from vmsim.host.virtio.queue import DeviceQueue

# Host input kept for a port whose driver has not posted buffers (or not opened the port);
# past this the backend stops being read until the guest catches up.
PENDING_MAX = 64 << 10


class HostPort:
    __slots__ = ("added", "backend", "console", "guest_failed", "guest_open", "guest_ready",
                 "held", "held_ring", "id", "metrics", "name", "open_sent", "pending", "rx_q",
                 "size", "tx_q")

    def __init__(self, port_id: int, name: str, backend: ConsoleBackend, console: bool,
                 size: tuple[int, int]) -> None:
        self.id = port_id
        self.name = name
        self.backend = backend
        self.console = console
        self.size = size
        self.rx_q = C.rx_queue(port_id)
        self.tx_q = C.tx_queue(port_id)
        self.metrics = PortMetrics()
        # receive buffers taken from the ring, waiting for input (device-writable chains)
        self.held: deque[DescChain] = deque()
        self.held_ring: DeviceQueue | None = None
        self.pending = bytearray()
        self.forget_driver()

    def forget_driver(self) -> None:
        """The driver's view of the port is gone (a reset)."""
        self.added = False          # DEVICE_ADD sent
        self.guest_ready = False    # PORT_READY 1 received
        self.guest_failed = False   # PORT_READY 0 received
        self.guest_open = False     # PORT_OPEN from the driver: a guest program has it open
        self.open_sent: bool | None = None   # the last PORT_OPEN value sent to the driver
        self.held.clear()
        self.held_ring = None

    def take_buffers(self, ring: DeviceQueue) -> None:
        """Buffers held from an older ring (before a queue reset) are not this ring's."""
        if self.held_ring is not ring:
            self.held.clear()
            self.held_ring = ring

    def describe(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "console": self.console,
                "size": list(self.size), **self.backend.describe(),
                "added": self.added, "guest_ready": self.guest_ready,
                "guest_open": self.guest_open, "host_open": self.backend.connected,
                "pending": len(self.pending), "buffers_posted": len(self.held),
                **self.metrics.as_dict()}
