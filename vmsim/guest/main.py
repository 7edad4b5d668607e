"""The guest process: boot, probe the devices, run the workloads, report.

It is started by the launcher with one end of a lifecycle channel, receives its part of the
run's spec there, connects to its VM's trap socket on the host, and asks for the machine
description (RAM, the MMIO device list, ioeventfds and irqfds: the device tree and what KVM
would wire up). Then it behaves as a kernel would: registers drivers, probes each device
through its transport, and runs the workloads until the launcher says stop.
"""

import argparse
import logging
import select
import sys
import time
import traceback
from typing import Any

from vmsim.abi.endian import require_little_endian
from vmsim.abi.pci import PCI_VENDOR_ID_REDHAT_QUMRANET
from vmsim.guest.css import ChannelSubsystem, CssError
from vmsim.guest.drivers.blk import BlkDriver
from vmsim.guest.drivers.console import ConsoleDriver
from vmsim.guest.drivers.net import NetDriver
from vmsim.guest.iommu import IommuDriver, IommuProbeError
from vmsim.guest.memory import DeviceDma, DmaMemory, GuestRAM
from vmsim.guest.ops import GuestOps, OpError
from vmsim.guest.pci import scan_bus
from vmsim.guest.platform import IrqController, Platform
from vmsim.guest.virtio.ccw import CcwProbeError, VirtioCcw
from vmsim.guest.virtio.core import VirtioBus, VirtioDevice
from vmsim.guest.virtio.mmio import MmioProbeError, VirtioMmio
from vmsim.guest.virtio.pci_common import PciProbeError, virtio_pci_probe
from vmsim.guest.workloads import FailedWorkload, Workload, WorkloadError
from vmsim.guest.workloads.blk_bench import BlkBench
from vmsim.guest.workloads.blk_verify import BlkVerify
from vmsim.guest.workloads.console_app import ConsoleApp
from vmsim.guest.workloads.net import NET_WORKLOADS
from vmsim.machine import proc, shm
from vmsim.machine.eventfd import EventFd
from vmsim.machine.stats import StatsRegion
from vmsim.machine.wire import Channel, ChannelClosed

log = logging.getLogger("vmsim.guest")

WORKLOADS: dict[str, type] = {"blk-verify": BlkVerify, "blk-bench": BlkBench, **NET_WORKLOADS,
                              "console-app": ConsoleApp}
# Workloads that only answer what comes to them: started first in every VM.
PASSIVE_WORKLOADS = frozenset({"net-echo", "net-sink", "net-responder", "console-app"})
DRAIN_TIMEOUT_S = 5.0
PUBLISH_EVERY_MS = 100


class HostGone(Exception):
    """The host process closed the trap channel (it died or stopped)."""


class Guest:
    def __init__(self, spec: dict[str, Any], lch: Channel) -> None:
        self.spec = spec
        self.vm = spec["vm"]
        self.lch = lch
        self.trap: Channel | None = None
        self.ram: GuestRAM | None = None
        self.dma: DmaMemory | None = None
        self.iommu: IommuDriver | None = None
        self.stats: StatsRegion | None = None
        self.platform: Platform | None = None
        self.irqc = IrqController()
        self.bus = VirtioBus()
        self.transports: dict[str, VirtioMmio] = {}
        self.devices: dict[str, VirtioDevice] = {}
        self.probe_errors: dict[str, str] = {}
        self.bound: dict[str, str] = {}          # device -> the driver that probed it
        self.driver_info: dict[str, dict] = {}   # device -> its driver's state at the end
        self.workloads: list[Workload] = []
        self.eventfds: list[EventFd] = []
        self.ops = GuestOps(self)
        self.pci_bus: dict[str, Any] | None = None
        self.deferred: dict[str, tuple[Any, dict[str, Any], Any]] = {}
        self._workloads_made = False
        self._started: list[Workload] = []
        # Off (a benchmark measuring what stats cost): queue counters reach the stats region
        # only at the end, and no request is timed.
        self.live_stats = bool(spec.get("live_stats", True))

    # ---- boot ------------------------------------------------------------------------------------
    def boot(self) -> None:
        spec = self.spec
        self.trap = self._connect(spec["control"])
        desc, fds = self.trap.call(("boot",), timeout=30)
        if not isinstance(desc, dict):
            raise RuntimeError(f"host refused to boot this VM: {desc}")
        ram = desc["ram"]
        self.ram = GuestRAM(shm.open_map(ram["name"]), ram["base"])
        self.dma = DmaMemory(self.ram)
        self.stats = StatsRegion(shm.open_map(spec["stats"]))
        self.platform = Platform(self.trap)
        fd_of = {i: fd for i, fd in enumerate(fds)}
        for e in desc["ioeventfds"]:
            efd = EventFd(fd_of[e["fd"]])
            self.eventfds.append(efd)
            self.platform.bind_ioeventfd(e["addr"], e["data"], efd, e.get("space", "mmio"))
        for e in desc["irqfds"]:
            efd = EventFd(fd_of[e["fd"]])
            self.eventfds.append(efd)
            line = e["irq"]     # a number, or a tuple such as ("msix", slot, vector)
            self.irqc.add_line(tuple(line) if isinstance(line, list) else line, efd)
        self.irqc.start()
        if desc.get("iommu"):
            self._probe_iommu(desc["iommu"])
        poll = spec.get("driver_poll_us", {})
        self.bus.register_driver(BlkDriver(self.dma, lambda name: int(poll.get(name, 0))))
        self.bus.register_driver(ConsoleDriver(self.dma))
        self.bus.register_driver(NetDriver(self.dma, lambda name: int(poll.get(name, 0))))
        for node in desc["mmio"]:
            self._probe_mmio(node)
        if desc.get("pci"):
            self._probe_pci(desc["pci"])
        if desc.get("css"):
            self._probe_css(desc["css"])

    def _connect(self, path: str) -> Channel:
        deadline = time.monotonic() + 10
        while True:
            try:
                return Channel.connect(path)
            except (FileNotFoundError, ConnectionRefusedError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)

    def _queue_stats(self, dev: str):
        recs = self.spec["queue_records"].get(dev, [])

        def rec(i: int) -> memoryview | None:
            return self.stats.queue(recs[i]) if i < len(recs) else None
        return rec

    def _probe_iommu(self, node: dict[str, Any]) -> None:
        """The IOMMU first (as the kernel probes it before the devices behind it): each of
        its endpoints is attached to a domain of its own."""
        try:
            self.iommu = IommuDriver(self.platform, self.dma, node)
        except IommuProbeError as e:
            for name in node.get("endpoints", {}):
                self.probe_errors[name] = f"iommu: {e}"
            log.warning("iommu: %s", e)
            return
        for name, ep in self.iommu.endpoints.items():
            status = self.iommu.attach(ep, ep)
            if status:
                self.probe_errors[name] = f"iommu: ATTACH of endpoint {ep} failed ({status})"

    def _dev_dma(self, name: str) -> Any:
        """The DMA object of a device: its own, translating through its IOMMU domain, when
        the firmware puts it behind the IOMMU; else the shared direct one."""
        if self.iommu is not None and name in self.iommu.endpoints:
            ep = self.iommu.endpoints[name]
            return DeviceDma(self.dma, self.iommu, ep, strict=name in self.iommu.strict)
        return self.dma

    def _probe_mmio(self, node: dict[str, Any]) -> None:
        name = node["name"]
        t = VirtioMmio(self.platform, self.irqc, self._dev_dma(name), node["base"], node["irq"],
                       self._queue_stats(name))
        try:
            vdev = t.probe(name, self._dev_stats(name))
        except MmioProbeError as e:
            self.probe_errors[name] = str(e)
            log.warning("%s: %s", name, e)
            return
        self._register(name, t, vdev)

    def _dev_stats(self, name: str) -> memoryview | None:
        rec = self.spec["device_records"].get(name)
        return self.stats.device(rec) if rec is not None else None

    def _register(self, name: str, t: Any, vdev: VirtioDevice) -> None:
        """A device its transport found: onto the virtio bus, which probes its driver."""
        self.transports[name] = t
        self.devices[name] = vdev
        vdev.dma = getattr(t, "dma", None)
        err = self.bus.register_device(vdev)
        if err or vdev.driver is None:
            self.probe_errors[name] = vdev.probe_error or f"probe failed ({err})"
        else:
            self.bound[name] = vdev.driver.name

    def _probe_css(self, css_desc: dict[str, Any]) -> None:
        """The channel subsystem: STSCH finds the subchannels, virtio_ccw onlines each
        (enable, SENSE ID, SET_VIRTIO_REV); the firmware description names them."""
        css = ChannelSubsystem(self.platform, self.irqc, self.dma, css_desc)
        try:
            subchannels = css.scan()
        except CssError as e:
            for node in css_desc.get("subchannels", []):
                self.probe_errors[node["name"]] = f"channel subsystem: {e}"
            log.warning("channel subsystem: %s", e)
            return
        for sch in subchannels:
            name = sch.name
            try:
                t = VirtioCcw(css, sch, self.dma, self._queue_stats(name))
                vdev = t.probe(name, self._dev_stats(name))
            except CcwProbeError as e:
                self.probe_errors[name] = str(e)
                log.warning("%s: %s", name, e)
                continue
            self._register(name, t, vdev)

    def _probe_pci(self, bus: dict[str, Any]) -> list[str]:
        """Enumerate the PCI bus through its ECAM window and probe each virtio function not
        yet probed (at boot, and on a rescan after a hot-plug); the firmware tables name the
        slots. The names of the devices found."""
        self.pci_bus = bus
        names = {f["slot"]: f["name"] for f in bus.get("functions", [])}
        found = []
        for pdev in scan_bus(self.platform, bus["ecam"], bus.get("bus", 0)):
            if pdev.vendor != PCI_VENDOR_ID_REDHAT_QUMRANET:
                continue        # the host bridge, or another vendor's device
            name = names.get(pdev.slot, f"pci-{pdev.slot:02x}")
            if name in self.devices:
                continue        # probed before
            found.append(name)
            self.probe_errors.pop(name, None)
            try:
                t = virtio_pci_probe(self.platform, self.irqc, self._dev_dma(name), pdev, name,
                                     self._dev_stats(name),
                                     self._queue_stats(name))
            except PciProbeError as e:
                self.probe_errors[name] = str(e)
                log.warning("%s: %s", name, e)
                continue
            vdev = t.vdev
            self._register(name, t, vdev)
        return found

    def remove_device(self, name: str) -> None:
        """An orderly hot-unplug: the driver is removed (it resets the device and gives its
        queues back), the function disabled; the slot may then be emptied."""
        vdev = self.devices.pop(name)
        t = self.transports.pop(name)
        self.bus.unregister_device(vdev)
        pdev = getattr(t, "pdev", None)
        if pdev is not None:
            pdev.disable_device()
        self.bound.pop(name, None)
        self.probe_errors.pop(name, None)

    # ---- workloads -------------------------------------------------------------------------------
    def start_workloads(self, passive: bool = False) -> None:
        """Make every workload, start those that only answer (passive: echo, sink, console
        apps); called again without passive, start the rest."""
        if not self._workloads_made:
            self._make_workloads()
            self._workloads_made = True
        for wl in self.workloads:
            if wl in self._started:
                continue
            if passive and wl.spec.get("type") not in PASSIVE_WORKLOADS:
                continue
            self._started.append(wl)
            try:
                wl.start()
            except WorkloadError as e:
                wl.fail(str(e))

    def _make_workloads(self) -> None:
        if not self.live_stats:
            for vdev in self.devices.values():
                for vq in vdev.vqs:
                    vq.stop_sampling()
        recs = self.spec["workload_records"]
        for w in self.spec["workloads"]:
            cls = WORKLOADS.get(w["type"])
            if cls is None:
                raise WorkloadError(f"unknown workload type {w['type']!r}")
            rec = recs.get(w["name"])
            stats = self.stats.workload(rec) if rec is not None else None
            if not w.get("autostart", True):
                # A scenario starts it, perhaps on a device hot-plugged meanwhile: it is
                # made then.
                self.deferred[w["name"]] = (cls, w, stats)
                continue
            try:
                wl = cls(w["name"], w, self.devices, stats, self.dma)
            except WorkloadError as e:
                # A workload that cannot start is that workload's error, not the guest's.
                wl = FailedWorkload(w["name"], w, self.devices, stats, str(e))
            self.workloads.append(wl)

    def start_deferred(self, name: str) -> Workload:
        """Make and start a workload that waited for a scenario; WorkloadError if it cannot."""
        cls, w, stats = self.deferred.pop(name)
        wl = cls(w["name"], w, self.devices, stats, self.dma)
        self.workloads.append(wl)
        self._started.append(wl)
        wl.start()
        return wl

    def workloads_finished(self) -> bool:
        return all(w.finished_event.is_set() for w in self.workloads)

    def publish(self, queues: bool = True) -> None:
        """Copy every running count into the stats region (from the main thread)."""
        for w in self.workloads:
            w.publish_stats()
        for vdev in self.devices.values():
            if isinstance(vdev.dma, DeviceDma):
                # lazy IOMMU mode: unmaps deferred more than 10 ms reach the IOMMU now
                vdev.dma.flush()
        if not queues:
            return
        for vdev in self.devices.values():
            for vq in vdev.vqs:
                vq.publish_stats()

    # ---- run -------------------------------------------------------------------------------------
    def _op(self, msg: list) -> None:
        """A scenario's request: ("op", id, name, args) -> ("reply", id, ok, result)."""
        _, rid, name, args = msg
        try:
            result, ok = self.ops.handle(name, args or {}), True
        except OpError as e:
            result, ok = str(e), False
        except (HostGone, ChannelClosed):
            raise
        except Exception as e:
            log.warning("op %s failed:\n%s", name, traceback.format_exc())
            result, ok = f"{type(e).__name__}: {e}", False
        self.lch.send(("reply", rid, ok, result))

    def _host_gone(self) -> bool:
        p = select.poll()
        p.register(self.trap.fileno(), select.POLLRDHUP)
        return any(ev & (select.POLLRDHUP | select.POLLHUP | select.POLLERR)
                   for _fd, ev in p.poll(0))

    def wait_for_stop(self) -> None:
        """Until the launcher says stop; tell it once when every workload has finished."""
        p = select.poll()
        p.register(self.lch.fileno(), select.POLLIN)
        p.register(self.trap.fileno(), select.POLLRDHUP)
        told_done = False
        trap_fd = self.trap.fileno()
        while True:
            events = p.poll(PUBLISH_EVERY_MS)
            # the host's end first: a stop that comes with it must not start a drain that
            # waits for requests a dead host will never complete
            if any(fd == trap_fd and ev & (select.POLLRDHUP | select.POLLHUP | select.POLLERR)
                   for fd, ev in events):
                raise HostGone("the host closed this VM's trap channel")
            for fd, ev in events:
                if fd == self.lch.fileno():
                    msg = self.lch.recv_obj()
                    if msg and msg[0] == "stop":
                        return
                    if msg and msg[0] == "op":
                        self._op(msg)
                elif ev & (select.POLLRDHUP | select.POLLHUP | select.POLLERR):
                    raise HostGone("the host closed this VM's trap channel")
            if isinstance(self.irqc.error, ChannelClosed):
                raise HostGone("the host closed this VM's trap channel")
            if self.irqc.error is not None:
                raise RuntimeError(f"interrupt thread failed: {self.irqc.error!r}")
            self.publish(self.live_stats)
            now = time.monotonic_ns()
            for w in self.workloads:
                w.tick(now)
            if not told_done and self.workloads and self.workloads_finished():
                # The rings are quiet now: what a reader sees from here on is final.
                self.publish()
                self.lch.send(("done",))
                told_done = True

    def shutdown(self) -> None:
        """Stop the workloads, let what is in flight complete, remove the devices."""
        for w in self.workloads:
            w.stop()
        deadline = time.monotonic() + DRAIN_TIMEOUT_S
        for w in self.workloads:
            # in steps, looking at the trap channel: with the host gone (killed as the stop
            # came) nothing in flight will complete, and the guest fails now, not in 5 s
            while not w.idle_event.wait(min(0.05, max(0.0, deadline - time.monotonic()))):
                if self._host_gone():
                    raise HostGone("the host closed this VM's trap channel")
                if time.monotonic() >= deadline:
                    w.error(f"{w.in_flight} requests still in flight after {DRAIN_TIMEOUT_S} s")
                    break
        self.publish()
        for name, vdev in self.devices.items():
            if vdev.priv is not None and hasattr(vdev.priv, "describe"):
                self.driver_info[name] = vdev.priv.describe()
        for vdev in list(self.bus.devices):
            self.bus.unregister_device(vdev)
        for w in self.workloads:
            w.close()
        self.irqc.stop()

    def report(self) -> dict[str, Any]:
        devices = {}
        for name, vdev in self.devices.items():
            t = self.transports[name]
            devices[name] = {
                "driver": self.bound.get(name),
                "driver_info": self.driver_info.get(name, {}),
                "probe_error": self.probe_errors.get(name, ""),
                "features": vdev.features,
                "device_features": vdev.device_features,
                "needs_reset": vdev.needs_reset,
                "interrupts": t.interrupts,
                "config_interrupts": t.config_interrupts,
                "safety_polls": t.safety_polls,
                "irq_mode": getattr(t, "irq_mode", "") or None,   # how interrupts come
                "dma": vdev.dma.describe() if isinstance(vdev.dma, DeviceDma) else None,
            }
        for name, err in self.probe_errors.items():
            devices.setdefault(name, {"driver": None, "probe_error": err})
        return {"vm": self.vm, "devices": devices,
                "workloads": {w.name: w.report() for w in self.workloads},
                "exits": self.platform.exits if self.platform else 0,
                "ioeventfd_writes": self.platform.ioeventfd_writes if self.platform else 0,
                "irq": {"handled": self.irqc.handled, "unhandled": self.irqc.unhandled,
                        "safety_wakeups": self.irqc.safety_wakeups}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="vmsim-guest")
    ap.add_argument("--channel-fd", type=int, required=True)
    args = ap.parse_args(argv)
    proc.die_with_parent()
    proc.ignore_sigint()
    require_little_endian()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="vmsim guest %(message)s")
    lch = Channel.from_fd(args.channel_fd)
    try:
        spec = lch.recv_obj(timeout=30)
    except (ChannelClosed, TimeoutError) as e:
        print(f"vmsim guest: no spec from the launcher: {e}", file=sys.stderr)
        return 2
    proc.set_name(f"vmsim-g-{spec['vm']}")
    g = Guest(spec, lch)
    try:
        g.boot()
        # Every VM boots, then the launcher starts them together (a peer must be up before
        # a workload talks to it).
        lch.send(("booted",))
        while True:
            msg = lch.recv_obj()
            if msg and msg[0] == "start_passive":
                g.start_workloads(passive=True)
                lch.send(("passive",))
                continue
            if msg and msg[0] == "start":
                break
            if msg and msg[0] == "stop":
                g.shutdown()
                lch.send(("report", g.report()))
                return 0
        g.start_workloads()
        lch.send(("running", {"devices": sorted(g.devices),
                              "probe_errors": g.probe_errors}))
        g.wait_for_stop()
        g.shutdown()
        lch.send(("report", g.report()))
        return 0
    except HostGone as e:
        _send_error(lch, f"{spec['vm']}: {e}", g)
        return 3
    except ChannelClosed:
        return 3   # the launcher went away; nothing to report to
    except Exception as e:
        tb = traceback.format_exc()
        _send_error(lch, f"{spec['vm']}: {type(e).__name__}: {e}", g, tb)
        return 2


def _send_error(lch: Channel, msg: str, g: Guest, tb: str = "") -> None:
    try:
        rep = g.report()
    except Exception:
        rep = {}
    try:
        lch.send(("error", msg, tb, rep))
    except ChannelClosed:
        print(f"vmsim guest: {msg}", file=sys.stderr)
