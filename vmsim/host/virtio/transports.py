"""Builds the transport a device is configured with, on the VM's board."""

from vmsim.host.board import Board
from vmsim.host.virtio.device import VirtioDevice
from vmsim.host.virtio.mmio import MmioTransport
from vmsim.host.virtio.transport import HostTransport

TRANSPORTS = ("mmio", "mmio-legacy", "pci", "pci-legacy", "ccw")


def make_transport(kind: str, dev: VirtioDevice, board: Board) -> HostTransport:
    if kind == "mmio":
        return MmioTransport(dev, board.mmio_window(), board.irq(), version=2)
    if kind == "mmio-legacy":
        return MmioTransport(dev, board.mmio_window(), board.irq(), version=1)
    raise ValueError(f"transport {kind!r} is not implemented on the host")
