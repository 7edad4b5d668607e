"""What each device brings to a vhost-user backend: its virtio feature offer, its
configuration space, its number of queues, and the service of an available queue. The
request handling is vmsim's own device code (vmsim.host.devices.*), run on the memory window
the frontend shared (vmsim.vhost.memory).
"""

import os
from collections.abc import Callable
from typing import BinaryIO

from vmsim.abi import blk as B
from vmsim.abi import console as C
from vmsim.abi import features as F
from vmsim.abi import ids
from vmsim.host.devices.blk.backend import FileBackend
from vmsim.host.devices.blk.config import build_config
from vmsim.host.devices.blk.metrics import BlkMetrics
from vmsim.host.devices.blk.request import BlkRequestHandler
from vmsim.host.memory import GuestMemory
from vmsim.host.virtio.queue import DeviceQueue

# Ring features every vhost-user device of vmsim offers (RING_PACKED unless --no-packed).
# Not RING_RESET: vhost-user has no message for a per-queue reset.
RING_FEATURES = (F.bit(F.VIRTIO_F_VERSION_1) | F.bit(F.VIRTIO_RING_F_INDIRECT_DESC)
                 | F.bit(F.VIRTIO_RING_F_EVENT_IDX))
BATCH = 64


class VhostDevice:
    """The device half of a vhost-user backend."""

    name = ""
    device_id = 0
    num_queues = 1

    def __init__(self, packed: bool) -> None:
        self.features = RING_FEATURES | (F.bit(F.VIRTIO_F_RING_PACKED) if packed else 0)
        self.acked = 0
        self.requests = 0

    def config(self) -> bytes:
        return b""

    def set_config(self, offset: int, data: bytes) -> bool:
        """A frontend's write to the config space; False if refused (read-only fields)."""
        return False

    def set_features(self, acked: int) -> None:
        self.acked = acked

    def attach(self, mem: GuestMemory | None) -> None:
        """The memory window changed (None: no memory, or it is about to change)."""

    def serve(self, index: int, q: DeviceQueue) -> int:
        """Serve what is available on queue `index`; the number of buffers used. Raises
        RingError on a malformed ring or request."""
        raise NotImplementedError

    def bind(self, ready: Callable[[int], bool] | None) -> None:
        """A session began (`ready(index)`: whether ring `index` is served now, started and
        enabled) or ended (None). A device spreading input over queues asks it."""

    def readable_fds(self) -> list[int]:
        """fds of the device's own backend to watch (console input, a TAP)."""
        return []

    def on_readable(self, fd: int) -> None:
        pass

    def pending(self) -> list[int]:
        """Queues with work the device wants to do without a kick (input that arrived)."""
        return []

    def describe(self) -> str:
        return f"{self.requests} requests"

    def close(self) -> None:
        pass


class BlkVhostDevice(VhostDevice):
    """virtio-blk on a raw image file."""

    name = "blk"
    device_id = ids.VIRTIO_ID_BLOCK
    num_queues = 1
    # QEMU's vhost-user-blk-pci has 128-entry queues by default; a request may use every
    # descriptor but the header's and status's (seg_max), as in vmsim's in-process device.
    SEG_MAX = 126

    def __init__(self, image: str, readonly: bool, packed: bool, serial: str = "vmsim-vhost"):
        super().__init__(packed)
        self.backend = FileBackend(image, None, readonly, create=False)
        self.readonly = readonly
        self.serial = serial.encode()
        self.features |= (F.bit(B.VIRTIO_BLK_F_SEG_MAX) | F.bit(B.VIRTIO_BLK_F_BLK_SIZE)
                          | F.bit(B.VIRTIO_BLK_F_FLUSH) | F.bit(B.VIRTIO_BLK_F_TOPOLOGY))
        if readonly:
            self.features |= F.bit(B.VIRTIO_BLK_F_RO)
        self.metrics = BlkMetrics()
        self.handler: BlkRequestHandler | None = None
        self._config = bytes(build_config(self.backend.size >> B.SECTOR_SHIFT, size_max=0,
                                          seg_max=self.SEG_MAX, blk_size=B.SECTOR_SIZE,
                                          num_queues=1, writeback=False))

    def config(self) -> bytes:
        return self._config

    def attach(self, mem: GuestMemory | None) -> None:
        self.handler = None
        if mem is not None:
            self.handler = BlkRequestHandler(mem, self.backend, self.readonly, self.serial,
                                             self.SEG_MAX, self.metrics)
            self.handler.flush_ok = F.has(self.acked, B.VIRTIO_BLK_F_FLUSH)

    def set_features(self, acked: int) -> None:
        super().set_features(acked)
        if self.handler is not None:
            self.handler.flush_ok = F.has(acked, B.VIRTIO_BLK_F_FLUSH)

    def serve(self, index: int, q: DeviceQueue) -> int:
        n = self.handler.serve(q, BATCH)
        self.requests += n
        return n

    def describe(self) -> str:
        m = self.metrics
        return (f"{m.reads} reads, {m.writes} writes, {m.flushes} flushes, "
                f"{m.io_errors} errors")

    def close(self) -> None:
        self.backend.close()


class ConsoleVhostDevice(VhostDevice):
    """virtio-console with port 0 only (no MULTIPORT): queue 0 receiveq (input to the
    driver), queue 1 transmitq (the driver's output). Output is written to `out`; input is
    read from the fd `input_fd` (the backend's stdin) and placed in receive buffers."""

    name = "console"
    device_id = ids.VIRTIO_ID_CONSOLE
    num_queues = 2

    def __init__(self, packed: bool, out: BinaryIO, input_fd: int | None) -> None:
        super().__init__(packed)
        self.out = out
        self.input_fd = input_fd
        self.inbuf = bytearray()
        self.bytes_out = 0
        self.bytes_in = 0
        # cols, rows, max_nr_ports, emerg_wr: none of SIZE, MULTIPORT, EMERG_WRITE is offered
        self._config = bytes(C.CONFIG_SIZE)

    def config(self) -> bytes:
        return self._config

    def serve(self, index: int, q: DeviceQueue) -> int:
        if index == 1:
            n = 0
            while chains := q.pop_batch(BATCH):
                for c in chains:
                    data = c.read_bytes(0, c.rlen)
                    self.out.write(data)
                    self.bytes_out += len(data)
                self.out.flush()
                q.fill_batch(chains, [0] * len(chains))
                n += len(chains)
            self.requests += n
            return n
        n = 0
        while self.inbuf:
            c = q.pop()
            if c is None:
                break
            k = c.write_at(0, bytes(self.inbuf[:c.wlen]))
            del self.inbuf[:k]
            self.bytes_in += k
            q.push(c, k)
            n += 1
        return n

    def readable_fds(self) -> list[int]:
        return [] if self.input_fd is None else [self.input_fd]

    def on_readable(self, fd: int) -> None:
        try:
            data = os.read(fd, 4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.input_fd = None        # end of input: stop watching it
            return
        self.inbuf += data

    def pending(self) -> list[int]:
        return [0] if self.inbuf else []

    def describe(self) -> str:
        return f"{self.bytes_out} bytes out, {self.bytes_in} bytes in"
