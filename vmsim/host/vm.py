"""One VM on the host: its guest memory, its devices on their transports, and the trap
socket its guest connects to.

The host is the VMM: it lays out the guest-physical address space (RAM at `ram.base`, one
virtio-mmio window per device from MMIO_BASE, an interrupt line each) and publishes it to the
guest at boot as a device tree would, with the ioeventfds and irqfds a KVM VMM would register.
"""

import logging
import os
import socket
from typing import Any

from vmsim.abi import mmio as M
from vmsim.host.devices.factory import make_device
from vmsim.host.loop import EventLoop
from vmsim.host.memory import GuestMemory
from vmsim.host.virtio.device import VirtioDevice
from vmsim.host.virtio.mmio import MmioTransport
from vmsim.machine import shm
from vmsim.machine.stats import StatsRegion
from vmsim.machine.wire import Channel, ChannelClosed

log = logging.getLogger("vmsim.host")

MMIO_BASE = 0x0A00_0000     # as QEMU's arm "virt" machine places its virtio-mmio windows
FIRST_IRQ = 32


class HostVM:
    def __init__(self, spec: dict[str, Any], stats: StatsRegion, loop: EventLoop) -> None:
        self.name = spec["name"]
        self.spec = spec
        self.loop = loop
        ram = spec["ram"]
        self.mem = GuestMemory(shm.open_map(ram["name"]), ram["base"])
        self.ram_name = ram["name"]
        self.devices: list[VirtioDevice] = []
        self.transports: list[MmioTransport] = []
        self.mmio_by_base: dict[int, MmioTransport] = {}
        for i, dspec in enumerate(spec["devices"]):
            dev = make_device(dspec, self.mem, stats)
            t = MmioTransport(dev, MMIO_BASE + i * M.REGION_SIZE, FIRST_IRQ + i)
            self.devices.append(dev)
            self.transports.append(t)
            self.mmio_by_base[t.base] = t
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
        """A trapped register read or write; returns the value read, None, or an error."""
        op, addr, width = msg[0], int(msg[1]), int(msg[2])
        base = addr & ~(M.REGION_SIZE - 1)
        t = self.mmio_by_base.get(base)
        if op == "r":
            if t is None:
                self.unassigned += 1
                return (1 << (8 * width)) - 1    # an unassigned bus address reads all ones
            return t.read(addr - base, width)
        if op == "w":
            if t is not None:
                t.write(addr - base, width, int(msg[3]))
                for qi in t.pending_kicks:
                    q = t.dev.queues[qi] if qi < len(t.dev.queues) else None
                    if q is not None and q.ring is not None:
                        q.ring.n_notifies += 1
                t.pending_kicks.clear()
            else:
                self.unassigned += 1
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
        mmio, ioeventfds, irqfds = [], [], []
        for dev, t in zip(self.devices, self.transports, strict=True):
            mmio.append({"name": dev.name, "base": t.base, "size": t.size, "irq": t.irq})
            for addr, data, efd in t.ioeventfds():
                ioeventfds.append({"addr": addr, "data": data, "fd": len(fds)})
                fds.append(efd.fileno())
            irqfds.append({"irq": t.irq, "fd": len(fds)})
            fds.append(t.irqfd.fileno())
        desc = {"ram": {"name": self.ram_name, "base": self.mem.base, "size": self.mem.size},
                "mmio": mmio, "ioeventfds": ioeventfds, "irqfds": irqfds}
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
                          "trapped_notify": t.n_trapped_notifies},
                "interrupts": t.n_interrupts, "config_interrupts": dev.n_config_interrupts,
                "resets": dev.n_resets,
                "queue_sizes": [q.num for q in dev.queues],
                **dev.describe(),
            }
        return {"devices": devs, "unassigned_accesses": self.unassigned,
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
