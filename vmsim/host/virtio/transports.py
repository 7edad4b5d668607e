"""Builds the transport a device is configured with, on the VM's board."""

from vmsim.host.board import Board
from vmsim.host.virtio.ccw import CcwTransport
from vmsim.host.virtio.device import VirtioDevice
from vmsim.host.virtio.mmio import MmioTransport
from vmsim.host.virtio.pci import PciTransport
from vmsim.host.virtio.transport import HostTransport

TRANSPORTS = ("mmio", "mmio-legacy", "pci", "pci-legacy", "ccw")


def make_transport(kind: str, dev: VirtioDevice, board: Board,
                   adapter_interrupts: bool = True) -> HostTransport:
    if kind == "mmio":
        return MmioTransport(dev, board.mmio_window(), board.irq(), version=2)
    if kind == "mmio-legacy":
        return MmioTransport(dev, board.mmio_window(), board.irq(), version=1)
    if kind in ("pci", "pci-legacy"):
        # msix_vectors: a topology option the device factory records (None: a vector per
        # queue plus one for configuration changes)
        return PciTransport(dev, board, legacy=kind == "pci-legacy",
                            msix_vectors=getattr(dev, "msix_vectors", None))
    if kind == "ccw":
        # without adapter interrupts the guest falls back to classic indicators
        return CcwTransport(dev, board, adapter_interrupts=adapter_interrupts)
    raise ValueError(f"transport {kind!r} is not implemented on the host")
