"""One VM on the host: its guest memory, its devices on their transports, and the trap
socket its guest connects to.

The host is the VMM: its board (vmsim.host.board) lays out the guest-physical address space
and I/O ports and gives each device's transport its resources; the machine description the
guest asks for at boot is what firmware tables would show (device-tree nodes for virtio-mmio,
the PCI host bridge, the channel subsystem), with the ioeventfds and irqfds a KVM VMM would
register.
"""

import logging
import os
import socket
from typing import Any

from vmsim.abi import features as F
from vmsim.abi import status as S
from vmsim.host import board
from vmsim.host.board import Board
from vmsim.host.devices.factory import make_device
from vmsim.host.iommu import Iommu
from vmsim.host.iommu_device import IommuDevice
from vmsim.host.loop import EventLoop
from vmsim.host.memory import GuestMemory, IotlbMemory
from vmsim.host.switch import Switch
from vmsim.host.virtio.device import VirtioDevice
from vmsim.host.virtio.transport import HostTransport
from vmsim.host.virtio.transports import make_transport
from vmsim.machine import shm
from vmsim.machine.stats import StatsRegion
from vmsim.machine.wire import Channel, ChannelClosed

log = logging.getLogger("vmsim.host")


class DeviceEnv:
    """What a VM's devices share with the rest of the host."""

    def __init__(self, vm: str, loop: EventLoop, switches: dict[str, Switch]) -> None:
        self.vm, self.loop, self.switches = vm, loop, switches


class HostVM:
    def __init__(self, spec: dict[str, Any], stats: StatsRegion, loop: EventLoop,
                 switches: dict[str, Switch] | None = None) -> None:
        self.name = spec["name"]
        self.spec = spec
        self.loop = loop
        ram = spec["ram"]
        self.mem = GuestMemory(shm.open_map(ram["name"]), ram["base"])
        self.ram_name = ram["name"]
        self.board = Board()
        self.devices: list[VirtioDevice] = []
        self.transports: list[HostTransport] = []
        env = DeviceEnv(self.name, loop, switches or {})
        self.iommu: IommuDevice | None = None
        for dspec in spec["devices"]:
            dev = make_device(dspec, self._device_memory(dspec), stats, env)
            if dspec.get("iommu"):
                # Behind the IOMMU the device offers ACCESS_PLATFORM: its driver must map.
                dev.device_features |= 1 << F.VIRTIO_F_ACCESS_PLATFORM
            t = make_transport(dspec.get("transport", "mmio"), dev, self.board,
                               adapter_interrupts=dspec.get("adapter_interrupts", True))
            if not dspec.get("plugged", True):
                t.set_present(False)        # an empty slot until a scenario plugs it
            for region in t.regions():
                (self.board.mmio if region.space == "mmio" else self.board.pio).add(region)
            self.devices.append(dev)
            self.transports.append(t)
            loop.add_device(dev)
        self.unassigned = 0
        self.host_errors: list[str] = []
        self.conn: Channel | None = None
        self.guest_gone = False
        self.control_path = spec["control"]
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.listener.bind(self.control_path)
        self.listener.listen(1)
        loop.add_reader(self.listener.fileno(), self._on_accept)

    def _device_memory(self, dspec: dict[str, Any]) -> GuestMemory | IotlbMemory:
        """What a device reaches guest memory through: RAM, or behind the IOMMU its
        endpoint's IOTLB (the IOMMU and its register window are made with the first such
        device; endpoints are numbered from 1 in device order)."""
        if not dspec.get("iommu"):
            return self.mem
        if self.iommu is None:
            self.iommu = IommuDevice(Iommu(self.mem.base, self.mem.size), self.mem,
                                     board.IOMMU_BASE)
            self.board.mmio.add(self.iommu.region())
        iommu = self.iommu.iommu
        ep = len(iommu.endpoints) + 1
        iommu.add_endpoint(ep, dspec["name"])
        if dspec["iommu"] == "strict":
            self.iommu.strict.add(dspec["name"])

        def fault(_e: Exception) -> None:
            iommu.faults += 1
        mem = IotlbMemory(self.mem, lambda: iommu.iotlb(ep), f"{dspec['name']}, endpoint {ep}",
                          fault)
        # For whoever serves the device's rings elsewhere (a vhost-user frontend subscribes
        # to the endpoint's mappings and forwards them as IOTLB messages).
        mem.iommu, mem.endpoint = iommu, ep
        return mem

    # ---- the trap channel ------------------------------------------------------------------------
    def _on_accept(self, _fd: int) -> None:
        sock, _ = self.listener.accept()
        if self.conn is not None:
            sock.close()     # one guest per VM
            return
        self.conn = Channel(sock)
        self.guest_gone = False
        self.loop.add_reader(sock.fileno(), self._on_trap)

    def _on_trap(self, _fd: int) -> None:
        conn = self.conn
        try:
            msg, fds = conn.recv()
        except ChannelClosed:
            self._guest_disconnected()
            return
        for fd in fds:
            os.close(fd)
        try:
            if msg[0] == "boot":
                desc, out_fds = self.boot_description()
                conn.send(desc, out_fds)
                return
            reply = self.handle_access(msg)
        except (IndexError, TypeError, ValueError, KeyError) as e:
            reply = f"malformed trap {msg!r}: {e}"
        except ChannelClosed:
            self._guest_disconnected()
            return
        except Exception as e:  # a host bug: report it, keep serving every other device
            log.exception("%s: trap %r failed", self.name, msg)
            self.host_errors.append(f"trap {msg!r}: {type(e).__name__}: {e}")
            reply = f"host error: {type(e).__name__}: {e}"
        self.loop.dirty = True
        try:
            conn.send(reply)
        except ChannelClosed:
            self._guest_disconnected()

    def handle_access(self, msg: list) -> Any:
        """A trapped access: ("r"/"w", addr, width[, value]) in the memory space, ("ir"/"iw",
        port, width[, value]) in the I/O space, or a channel-subsystem instruction ("css",
        ...). Returns the value read, None, or an error string."""
        op = msg[0]
        if op == "css":
            css = self.board.css
            if css is None:
                self.unassigned += 1
                return "no channel subsystem on this machine"
            return css.trap(msg[1:])
        addr, width = int(msg[1]), int(msg[2])
        space = self.board.pio if op in ("ir", "iw") else self.board.mmio
        region = space.find(addr)
        if op in ("r", "ir"):
            if region is None:
                self.unassigned += 1
                return (1 << (8 * width)) - 1    # an unassigned bus address reads all ones
            return region.read(addr - region.base, width)
        if op in ("w", "iw"):
            if region is None:
                self.unassigned += 1
                return None
            region.write(addr - region.base, width, int(msg[3]))
            for t in self.transports:
                kicks = getattr(t, "pending_kicks", None)
                if kicks:
                    for qi in kicks:
                        q = t.dev.queues[qi] if qi < len(t.dev.queues) else None
                        if q is not None and q.ring is not None:
                            q.ring.n_notifies += 1
                            t.dev.kicked(q)
                    kicks.clear()
            return None
        return f"unknown trap {op!r}"

    def _guest_disconnected(self) -> None:
        """The guest closed its channel (it exited or died): its devices stop."""
        if self.conn is not None:
            self.loop.remove_reader(self.conn.fileno())
            self.conn.close()
            self.conn = None
        self.guest_gone = True
        for dev in self.devices:
            dev.reset()
        self.loop.dirty = True

    def boot_description(self) -> tuple[dict[str, Any], list[int]]:
        """The machine as the guest should see it, with the fds it needs."""
        fds: list[int] = []
        nodes, ioeventfds, irqfds = [], [], []
        for t in self.transports:
            node = t.boot_node()
            if node is not None:
                nodes.append(node)
            for space, addr, data, efd in t.ioeventfds():
                ioeventfds.append({"space": space, "addr": addr, "data": data, "fd": len(fds)})
                fds.append(efd.fileno())
            for line, efd in t.irqfds():
                irqfds.append({"irq": line, "fd": len(fds)})
                fds.append(efd.fileno())
        desc = {"ram": {"name": self.ram_name, "base": self.mem.base, "size": self.mem.size},
                "mmio": [n for n in nodes if n["type"] == "virtio-mmio"],
                "pci": self.board.pci.describe() if self.board.pci is not None else None,
                "css": self.board.css.describe() if self.board.css is not None else None,
                "ioeventfds": ioeventfds, "irqfds": irqfds,
                "iommu": self.iommu.boot_node() if self.iommu is not None else None}
        return desc, fds

    # ---- report & teardown -----------------------------------------------------------------------
    def report(self) -> dict[str, Any]:
        devs = {}
        for dev, t in zip(self.devices, self.transports, strict=True):
            dev.publish_stats()
            devs[dev.name] = {
                "transport": t.name, "transport_info": t.describe(),
                "device_features": dev.device_features, "driver_features": dev.driver_features,
                "status": dev.status, "errors": list(dev.errors),
                "guest_errors": list(dev.guest_errors),
                "exits": {"read": t.exits_read, "write": t.exits_write,
                          "by_kind": dict(t.exits),
                          "trapped_notify": getattr(t, "n_trapped_notifies", 0)},
                "interrupts": t.n_interrupts, "config_interrupts": dev.n_config_interrupts,
                "resets": dev.n_resets,
                "queue_sizes": [q.num for q in dev.queues],
                **(dev.live_info if dev.live_info is not None
                   and not dev.status & S.DRIVER_OK else dev.describe()),
            }
        return {"devices": devs, "unassigned_accesses": self.unassigned,
                "iommu": self.iommu.describe() if self.iommu is not None else None,
                "guest_gone": self.guest_gone, "host_errors": list(self.host_errors)}

    def close(self) -> None:
        for dev, t in zip(self.devices, self.transports, strict=True):
            self.loop.remove_device(dev)
            dev.close()
            t.close()
        if self.conn is not None:
            self.loop.remove_reader(self.conn.fileno())
            self.conn.close()
        self.loop.remove_reader(self.listener.fileno())
        self.listener.close()
        try:
            os.unlink(self.control_path)
        except FileNotFoundError:
            pass
        self.mem.release()
