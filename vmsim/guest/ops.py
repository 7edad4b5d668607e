"""What a scenario can ask of a running guest: single requests, workload control, device and
queue resets, suspend and resume, a rogue driver's corruptions, notification faults, and a
look at what the drivers see. The launcher sends ("op", id, name, args) on the guest's
channel; the guest's main thread runs the op and answers ("reply", id, ok, result)."""

from __future__ import annotations

import contextlib
import errno
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from vmsim.abi import blk as B
from vmsim.abi import features as F
from vmsim.abi import status as S
from vmsim.guest import rogue
from vmsim.guest.drivers.blk import VirtioBlk
from vmsim.guest.drivers.console import VirtioConsole
from vmsim.guest.drivers.net import VirtioNet
from vmsim.guest.virtio.core import VirtioDevice
from vmsim.guest.virtio.virtqueue import Virtqueue
from vmsim.guest.workloads import WorkloadError

if TYPE_CHECKING:
    from vmsim.guest.main import Guest

BLK_STATUS = {B.VIRTIO_BLK_S_OK: "OK", B.VIRTIO_BLK_S_IOERR: "IOERR",
              B.VIRTIO_BLK_S_UNSUPP: "UNSUPP"}
MAX_OP_BYTES = 1 << 20


class OpError(Exception):
    """The op could not be done as asked (a readable reason for the scenario's report)."""


def pattern_bytes(pattern: int, sector: int, length: int) -> bytes:
    """A deterministic fill: a byte value mixed with the sector, so a block in the wrong place
    does not pass for the right one."""
    out = bytearray(length)
    for s in range(0, length, 512):
        v = (pattern + (sector + s // 512) * 131) & 0xFF
        out[s:s + 512] = bytes([v]) * min(512, length - s)
    return bytes(out)


class GuestOps:
    def __init__(self, guest: Guest) -> None:
        self.g = guest
        self.handlers: dict[str, Callable[[dict[str, Any]], Any]] = {
            "query": self.query, "workload": self.workload, "blk": self.blk,
            "net_send": self.net_send, "console_write": self.console_write,
            "queue_reset": self.queue_reset, "reset": self.reset,
            "suspend": self.suspend, "resume": self.resume, "rogue": self.rogue,
            "notify_fault": self.notify_fault, "rescan": self.rescan, "remove": self.remove,
        }

    def handle(self, name: str, args: dict[str, Any]) -> Any:
        fn = self.handlers.get(name)
        if fn is None:
            raise OpError(f"no guest op {name!r} (ops: {', '.join(sorted(self.handlers))})")
        return fn(args)

    # ---- lookups ---------------------------------------------------------------------------------
    def _dev(self, args: dict[str, Any]) -> VirtioDevice:
        name = args.get("device")
        dev = self.g.devices.get(name)
        if dev is None:
            raise OpError(f"{self.g.vm} has no device {name!r} "
                          f"(devices: {', '.join(sorted(self.g.devices)) or 'none'})")
        return dev

    def _driver(self, args: dict[str, Any], kind: type) -> Any:
        dev = self._dev(args)
        drv = dev.priv
        if not isinstance(drv, kind):
            raise OpError(f"{self.g.vm}.{dev.name}: not a working {kind.__name__} device "
                          f"({dev.probe_error or 'no driver bound'})")
        return drv

    def _vq(self, dev: VirtioDevice, args: dict[str, Any]) -> Virtqueue:
        q = int(args.get("queue", 0))
        for vq in dev.vqs:
            if vq.index == q:
                return vq
        raise OpError(f"{self.g.vm}.{dev.name}: no queue {q} "
                      f"(queues: {[vq.index for vq in dev.vqs]})")

    # ---- observation -----------------------------------------------------------------------------
    def query(self, args: dict[str, Any]) -> dict[str, Any]:
        """What the drivers see: per device its status as read from the device, negotiated
        features, whether it needs a reset, broken queues; per workload its report."""
        devices = {}
        for name, dev in self.g.devices.items():
            try:
                status = dev.config.get_status(dev)
            except Exception as e:                  # the host may be gone
                status = -1
                err = str(e)
            else:
                err = ""
            d: dict[str, Any] = {
                "driver": self.g.bound.get(name), "status": S.describe(status)
                if status >= 0 else f"unreadable: {err}",
                "features": F.names(dev.features), "needs_reset": dev.needs_reset,
                "config_changed": dev.n_config_changed,
                "broken_queues": {vq.index: vq.broken_reason for vq in dev.vqs if vq.broken},
                "queues": len(dev.vqs)}
            drv = dev.priv
            if isinstance(drv, VirtioBlk):
                d.update(capacity_sectors=drv.capacity, in_flight=drv.in_flight(),
                         frozen=drv.frozen, retried=drv.retried, readonly=drv.readonly)
            elif isinstance(drv, (VirtioNet, VirtioConsole)):
                d.update(drv.describe())
            devices[name] = d
        return {"devices": devices,
                "workloads": {w.name: w.report() for w in self.g.workloads}}

    # ---- workloads -------------------------------------------------------------------------------
    def workload(self, args: dict[str, Any]) -> dict[str, Any]:
        name, action = args.get("name"), args.get("action")
        if action == "start" and name in self.g.deferred:
            try:
                return self.g.start_deferred(name).report()
            except WorkloadError as e:
                raise OpError(f"workload {name} cannot start: {e}") from None
        w = next((w for w in self.g.workloads if w.name == name), None)
        if w is None:
            raise OpError(f"{self.g.vm} has no workload {name!r}")
        if action == "start":
            raise OpError(f"workload {name} is already started")
        elif action == "stop":
            w.stop()
            if not w.idle_event.wait(float(args.get("timeout", 10))):
                raise OpError(f"workload {name}: requests still in flight after stop")
        else:
            raise OpError(f"workload action {action!r}: expected start or stop")
        return w.report()

    # ---- single requests -------------------------------------------------------------------------
    def blk(self, args: dict[str, Any]) -> dict[str, Any]:
        """One request at a sector: read (compared with `expect` when given), write (of
        `pattern`), flush, or get_id; the status the device returned."""
        blk: VirtioBlk = self._driver(args, VirtioBlk)
        op = args.get("request", "read")
        sector = int(args.get("sector", 0))
        sectors = int(args.get("sectors", 8))
        length = sectors * 512
        if not 0 < length <= MAX_OP_BYTES:
            raise OpError(f"sectors: expected 1..{MAX_OP_BYTES // 512}, got {sectors}")
        timeout = float(args.get("timeout", 10))
        dma = self.g.dma
        gpa, view = dma.alloc(length, 512)
        try:
            result: dict[str, Any] = {}
            if op == "write":
                data = pattern_bytes(int(args.get("pattern", 0xA5)), sector, length)
                view[:] = data
                st = blk.sync(B.VIRTIO_BLK_T_OUT, sector, [(gpa, length)], timeout)
            elif op == "read":
                st = blk.sync(B.VIRTIO_BLK_T_IN, sector, [(gpa, length)], timeout)
                if st == B.VIRTIO_BLK_S_OK and "expect" in args:
                    want = pattern_bytes(int(args["expect"]), sector, length)
                    got = bytes(view)
                    bad = next((i for i in range(0, length, 512)
                                if got[i:i + 512] != want[i:i + 512]), None)
                    result["data_ok"] = bad is None
                    if bad is not None:
                        result["first_bad_sector"] = sector + bad // 512
            elif op == "flush":
                st = blk.sync(B.VIRTIO_BLK_T_FLUSH, 0, [], timeout)
            elif op == "get_id":
                st = blk.sync(B.VIRTIO_BLK_T_GET_ID, 0, [(gpa, B.VIRTIO_BLK_ID_BYTES)], timeout)
                if st == B.VIRTIO_BLK_S_OK:
                    result["id"] = bytes(view[:B.VIRTIO_BLK_ID_BYTES]).rstrip(b"\0").decode(
                        errors="replace")
            else:
                raise OpError(f"blk request {op!r}: expected read, write, flush or get_id")
        except TimeoutError as e:
            raise OpError(str(e)) from None
        finally:
            view.release()
            dma.free(gpa)
        result["status"] = BLK_STATUS.get(st, errno.errorcode.get(st, str(st)))
        return result

    def net_send(self, args: dict[str, Any]) -> dict[str, Any]:
        """`count` test frames of `size` payload bytes to MAC `to` (the launcher resolves a
        VM.DEVICE name to its MAC)."""
        from vmsim.guest.workloads import net_frames as NF
        net: VirtioNet = self._driver(args, VirtioNet)
        dst = bytes.fromhex(str(args["to"]).replace(":", ""))
        size = int(args.get("size", 64))
        sent = failed = 0
        for seq in range(int(args.get("count", 1))):
            frame = NF.test_frame(dst, net.mac, NF.KIND_SCENARIO, 0, seq, time.monotonic_ns(),
                                  bytes(size))
            if net.send(frame) == 0:
                sent += 1
            else:
                failed += 1
        return {"sent": sent, "failed": failed}

    def console_write(self, args: dict[str, Any]) -> dict[str, Any]:
        con: VirtioConsole = self._driver(args, VirtioConsole)
        port_arg = args.get("port", 0)
        port = (con.find_port(port_id=port_arg) if isinstance(port_arg, int)
                else con.find_port(name=str(port_arg)))
        if port is None:
            raise OpError(f"no port {port_arg!r} on {self.g.vm}.{args.get('device')}")
        data = str(args.get("data", "")).encode()
        n = port.write(data)
        if n < 0:
            raise OpError(f"port write failed: {errno.errorcode.get(-n, n)}")
        return {"written": n}

    # ---- resets, suspend, resume -----------------------------------------------------------------
    def queue_reset(self, args: dict[str, Any]) -> dict[str, Any]:
        """Reset one queue through the transport (VIRTIO_F_RING_RESET); its unused requests
        are sent again."""
        dev = self._dev(args)
        blk = dev.priv
        if not isinstance(blk, VirtioBlk):
            raise OpError(f"{self.g.vm}.{dev.name}: queue reset is done for blk devices")
        vq = self._vq(dev, args)
        with self.g.irqc.disabled():
            err, retried = blk.reset_queue(vq.index)
        if err:
            raise OpError(f"queue reset failed: {errno.errorcode.get(-err, err)}"
                          + (" (VIRTIO_F_RING_RESET not negotiated)"
                             if not dev.has_feature(F.VIRTIO_F_RING_RESET) else ""))
        return {"retried": retried}

    def suspend(self, args: dict[str, Any]) -> dict[str, Any]:
        """virtio_device_freeze on one device (or every device): the drivers quiesce, the
        devices are reset; requests submitted meanwhile wait."""
        devs = [self._dev(args)] if args.get("device") else list(self.g.devices.values())
        out = {}
        for dev in devs:
            err = self.g.bus.freeze(dev)
            if err:
                raise OpError(f"{self.g.vm}.{dev.name}: the driver cannot be suspended "
                              f"({errno.errorcode.get(-err, err)})")
            out[dev.name] = {"held": len(getattr(dev.priv, "held", ()))}
        return out

    def resume(self, args: dict[str, Any]) -> dict[str, Any]:
        """virtio_device_restore: reset, re-negotiate, rebuild the queues, requeue."""
        devs = [self._dev(args)] if args.get("device") else list(self.g.devices.values())
        out = {}
        for dev in devs:
            err = self.g.bus.restore(dev)
            if err:
                raise OpError(f"{self.g.vm}.{dev.name}: restore failed "
                              f"({errno.errorcode.get(-err, err)})")
            out[dev.name] = {"features": F.names(dev.features)}
        return out

    def reset(self, args: dict[str, Any]) -> dict[str, Any]:
        """The driver resets its device and recovers (after DEVICE_NEEDS_RESET, say): freeze
        and restore, requests it had not got back sent again."""
        dev = self._dev(args)
        before = getattr(dev.priv, "retried", 0)
        self.suspend(args)
        self.resume(args)
        return {"retried": getattr(dev.priv, "retried", 0) - before,
                "needs_reset": dev.needs_reset}

    # ---- hot-plug --------------------------------------------------------------------------------
    def rescan(self, args: dict[str, Any]) -> dict[str, Any]:
        """What the PCI hot-plug interrupt's handler does: rescan the bus, probe what is
        new. Devices found, and those whose probe failed."""
        if self.g.pci_bus is None:
            raise OpError(f"{self.g.vm} has no PCI bus")
        found = self.g._probe_pci(self.g.pci_bus)
        return {"found": found, "bound": {n: self.g.bound.get(n) for n in found},
                "errors": {n: self.g.probe_errors[n] for n in found if n in self.g.probe_errors}}

    def remove(self, args: dict[str, Any]) -> dict[str, Any]:
        """Orderly hot-unplug, the guest's half: remove the device's driver (the attention
        button's path). A device a running workload uses is refused."""
        dev = self._dev(args)
        if getattr(self.g.transports.get(dev.name), "pdev", None) is None:
            raise OpError(f"{self.g.vm}.{dev.name}: hot-unplug is for PCI devices")
        busy = [w.name for w in self.g.workloads
                if w.spec.get("device") == dev.name and w.started_ns
                and not w.finished_event.is_set()]
        if busy:
            raise OpError(f"{self.g.vm}.{dev.name} is in use by workload {', '.join(busy)}: "
                          f"stop it first")
        self.g.remove_device(dev.name)
        return {"removed": dev.name}

    # ---- faults ----------------------------------------------------------------------------------
    def rogue(self, args: dict[str, Any]) -> dict[str, Any]:
        """Corrupt one ring item of a live queue (see vmsim.guest.rogue)."""
        dev = self._dev(args)
        vq = self._vq(dev, args)
        what = str(args.get("corrupt", ""))
        gpa, view = self.g.dma.alloc(4096, 4096)
        view.release()
        # The scratch page stays allocated: the device may still look at it. The driver's
        # queue lock (where it has one) keeps its own adds out of the ring meanwhile.
        lock = getattr(vq.priv, "lock", None)
        try:
            with lock if lock is not None else contextlib.nullcontext():
                text = rogue.corrupt(vq, what, gpa)
        except rogue.RogueError as e:
            raise OpError(str(e)) from None
        return {"wrote": text}

    def notify_fault(self, args: dict[str, Any]) -> dict[str, Any]:
        """The next `drop` notifications of a queue are not sent, or the next `duplicate`
        are sent twice."""
        dev = self._dev(args)
        vq = self._vq(dev, args)
        drop, dup = int(args.get("drop", 0)), int(args.get("duplicate", 0))
        if drop <= 0 and dup <= 0:
            raise OpError("notify_fault: give drop: N or duplicate: N")
        real = getattr(vq._notify, "real", vq._notify)
        left = [drop or dup]

        def faulty(q: Virtqueue) -> bool:
            left[0] -= 1
            if left[0] <= 0:
                q._notify = real
            if drop:
                return True                 # "sent", as far as the driver knows
            return real(q) and real(q)

        faulty.real = real  # type: ignore[attr-defined]
        vq._notify = faulty
        return {"armed": drop or dup, "kind": "drop" if drop else "duplicate"}
