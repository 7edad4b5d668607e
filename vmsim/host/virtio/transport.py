"""What every host-side transport provides (virtio-mmio, virtio-pci, virtio-ccw): the device
model signals through it, the VM wires its registers and eventfds through it."""

from typing import Any

from vmsim.host.board import Region
from vmsim.machine.eventfd import EventFd
from vmsim.machine.stats import D, exit_word


class HostTransport:
    """Base of the transports: exit counting by kind, and the wiring interface."""

    name = ""
    dev: Any = None           # the VirtioDevice it carries (set by each transport)

    def __init__(self) -> None:
        self.exits: dict[str, int] = {}
        self.exits_read = 0
        self.exits_write = 0
        self.n_interrupts = 0

    # ---- the device model calls these ------------------------------------------------------------
    def signal_used(self, queue_index: int) -> None:
        raise NotImplementedError

    def signal_config(self) -> None:
        raise NotImplementedError

    # ---- the VM wires these ----------------------------------------------------------------------
    def regions(self) -> list[Region]:
        """Register windows in the "mmio" or "pio" space."""
        return []

    def ioeventfds(self) -> list[tuple[str, int, int, EventFd]]:
        """(space, address, datamatch, eventfd): a guest write of `datamatch` to `address`
        signals the eventfd instead of trapping (KVM's ioeventfd)."""
        return []

    def irqfds(self) -> list[tuple[Any, EventFd]]:
        """(interrupt line, eventfd) pairs the guest's interrupt controller takes."""
        return []

    def boot_node(self) -> dict[str, Any] | None:
        """What the guest's firmware tables show of the device (a device-tree node), or None
        when the guest finds it by scanning a bus."""
        return None

    def count_exit(self, kind: str, write: bool) -> None:
        """One trapped access (a VM exit): counted by kind, and published at once (exits
        are rare next to ring traffic: a store or three costs them nothing)."""
        self.exits[kind] = self.exits.get(kind, 0) + 1
        if write:
            self.exits_write += 1
        else:
            self.exits_read += 1
        s = self.dev.stats if self.dev is not None else None
        if s is not None:
            s[D.EXITS_READ] = self.exits_read
            s[D.EXITS_WRITE] = self.exits_write
            s[exit_word(kind)] += 1

    def describe(self) -> dict[str, Any]:
        return {}

    def close(self) -> None:
        pass
