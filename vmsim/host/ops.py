"""What a scenario can ask of the host while a run goes on: device-side changes (a blk resize,
a console resize, a net link going down), backend faults (a stalled device, I/O errors on a
sector range), a device error of the host's own making, and a look at each device's state.

The launcher sends ("op", id, name, args) on the host's channel; the event loop runs the op
between service passes and answers ("reply", id, ok, result)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from vmsim.abi import features as F
from vmsim.abi import status as S
from vmsim.host.devices.blk.device import BlkDevice
from vmsim.host.devices.blk.faults import clear_faults, fail_io
from vmsim.host.devices.console.device import ConsoleDevice
from vmsim.host.devices.net.device import NetDevice
from vmsim.host.virtio.device import VirtioDevice
from vmsim.host.vm import HostVM


class OpError(Exception):
    pass


def _size(v: Any) -> int:
    """Bytes from an int or a string like 32M / 1G / 4096."""
    if isinstance(v, int):
        return v
    s = str(v).strip().upper()
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    if s and s[-1] in mult:
        return int(float(s[:-1]) * mult[s[-1]])
    return int(s)


class HostOps:
    def __init__(self, vms: list[HostVM], wake: Callable[[], None]) -> None:
        self.vms = {vm.name: vm for vm in vms}
        self.wake = wake            # the loop re-checks every queue after an op
        self.handlers: dict[str, Callable[[dict[str, Any]], Any]] = {
            "query": self.query, "resize": self.resize, "link": self.link,
            "stall": self.stall, "fail_io": self.fail_io, "device_error": self.device_error,
            "plug": self.plug,
        }

    def handle(self, name: str, args: dict[str, Any]) -> Any:
        fn = self.handlers.get(name)
        if fn is None:
            raise OpError(f"no host op {name!r} (ops: {', '.join(sorted(self.handlers))})")
        result = fn(args)
        self.wake()
        return result

    def _dev(self, args: dict[str, Any], kind: type = VirtioDevice) -> Any:
        return self._vm_dev(args, kind)[1]

    def _vm_dev(self, args: dict[str, Any], kind: type = VirtioDevice) -> tuple[HostVM, Any]:
        vm = self.vms.get(args.get("vm"))
        if vm is None:
            raise OpError(f"no VM {args.get('vm')!r} (VMs: {', '.join(sorted(self.vms))})")
        name = args.get("device")
        dev = next((d for d in vm.devices if d.name.split(".")[-1] == name
                    or d.name == name), None)
        if dev is None:
            raise OpError(f"{vm.name} has no device {name!r}")
        if not isinstance(dev, kind):
            raise OpError(f"{vm.name}.{name} is not a {kind.__name__}")
        return vm, dev

    def query(self, args: dict[str, Any]) -> dict[str, Any]:
        dev = self._dev(args)
        return {"status": S.describe(dev.status), "broken": dev.broken,
                "needs_reset": bool(dev.status & S.DEVICE_NEEDS_RESET),
                "errors": list(dev.errors), "guest_errors": list(dev.guest_errors[-10:]),
                "features": F.names(dev.driver_features),
                "broken_queues": [q.index for q in dev.queues if q.broken],
                "stalled": getattr(dev, "stalled", False),
                "config_generation": dev.config_generation,
                "info": dev.describe()}

    def resize(self, args: dict[str, Any]) -> dict[str, Any]:
        """blk: a new capacity (`size`); console: a new window (`cols`, `rows`, `port`)."""
        dev = self._dev(args)
        if isinstance(dev, BlkDevice):
            size = _size(args.get("size"))
            if size <= 0 or size % 512:
                raise OpError(f"size: expected a positive multiple of 512, got {size}")
            dev.resize(size)
            return {"capacity_bytes": dev.backend.size}
        if isinstance(dev, ConsoleDevice):
            dev.resize(int(args.get("port", 0)), int(args["cols"]), int(args["rows"]))
            return {"cols": int(args["cols"]), "rows": int(args["rows"])}
        raise OpError(f"{args.get('vm')}.{args.get('device')}: resize is for blk or console")

    def link(self, args: dict[str, Any]) -> dict[str, Any]:
        dev: NetDevice = self._dev(args, NetDevice)
        dev.set_link(bool(args.get("up", True)))
        return {"link_up": dev.link_up}

    def stall(self, args: dict[str, Any]) -> dict[str, Any]:
        """A stalled device serves none of its queues (a hung disk, a paused switch port):
        requests stay in flight until it is released. Other devices go on."""
        dev = self._dev(args)
        dev.stalled = bool(args.get("on", True))
        return {"stalled": dev.stalled}

    def fail_io(self, args: dict[str, Any]) -> dict[str, Any]:
        """blk: requests touching sectors [first, end) fail with EIO (`kind`: read, write or
        any); `clear: true` removes every fault."""
        dev: BlkDevice = self._dev(args, BlkDevice)
        if args.get("clear"):
            return {"failed": clear_faults(dev.handler)}
        first = int(args.get("first", 0))
        end = int(args.get("end", first + 1))
        op = str(args.get("kind", "any"))
        if op not in ("read", "write", "any") or end <= first or first < 0:
            raise OpError(f"fail_io: expected 0 <= first < end and kind read|write|any, got "
                          f"{first}..{end} {op}")
        fail_io(dev.handler, first, end, op)
        return {"first": first, "end": end, "kind": op}

    def plug(self, args: dict[str, Any]) -> dict[str, Any]:
        """PCI hot-plug: the device's function enters (`present: true`) or leaves its slot.
        The guest learns of it by rescanning the bus (its hot-plug interrupt handler's job);
        an orderly unplug removes the driver in the guest first."""
        vm, dev = self._vm_dev(args)
        t = vm.transports[vm.devices.index(dev)]
        if not hasattr(t, "set_present"):
            raise OpError(f"{vm.name}.{args.get('device')}: hot-plug is for PCI devices")
        t.set_present(bool(args.get("present", True)))
        return {"present": t.fn.present, "slot": t.slot}

    def device_error(self, args: dict[str, Any]) -> dict[str, Any]:
        """The device fails of its own accord (virtio_error): DEVICE_NEEDS_RESET and a
        config-change interrupt."""
        dev = self._dev(args)
        dev.virtio_error(str(args.get("reason", "injected device error")))
        return {"status": S.describe(dev.status)}
