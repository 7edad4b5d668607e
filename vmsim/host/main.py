"""The host process: builds every VM's devices from the run spec, serves traps and rings in
one event loop until the launcher says stop, then reports."""

import argparse
import logging
import sys
import traceback
from typing import Any

from vmsim.abi.endian import require_little_endian
from vmsim.host.loop import EventLoop
from vmsim.host.ops import HostOps, OpError
from vmsim.host.switch import Switch
from vmsim.host.vm import HostVM
from vmsim.machine import proc, shm
from vmsim.machine.stats import StatsRegion
from vmsim.machine.wire import Channel, ChannelClosed

log = logging.getLogger("vmsim.host")


class Host:
    def __init__(self, spec: dict[str, Any], lch: Channel) -> None:
        self.spec = spec
        self.lch = lch
        self.loop = EventLoop(int(spec.get("poll_us", 100)), bool(spec.get("live_stats", True)))
        self.stats = StatsRegion(shm.open_map(spec["stats"]))
        self.switches = {name: Switch(name) for name in spec.get("switches", [])}
        self.vms: list[HostVM] = []
        for vm in spec["vms"]:
            self.vms.append(HostVM(vm, self.stats, self.loop, self.switches))
        self.loop.add_reader(lch.fileno(), self._on_launcher)
        self.ops = HostOps(self.vms, self._wake)

    def _wake(self) -> None:
        # an op may have changed which queues are live (a stall, a reset): look again
        self.loop.dirty = True

    def _on_launcher(self, _fd: int) -> None:
        try:
            msg = self.lch.recv_obj()
        except ChannelClosed:
            self.loop.stop()
            return
        if msg and msg[0] == "stop":
            self.loop.stop()
        elif msg and msg[0] == "op":
            self._op(msg)

    def _op(self, msg: list) -> None:
        """A scenario's request: ("op", id, name, args) -> ("reply", id, ok, result)."""
        _, rid, name, args = msg
        try:
            result, ok = self.ops.handle(name, args or {}), True
        except OpError as e:
            result, ok = str(e), False
        except Exception as e:
            log.warning("op %s failed:\n%s", name, traceback.format_exc())
            result, ok = f"{type(e).__name__}: {e}", False
        self.lch.send(("reply", rid, ok, result))

    def report(self) -> dict[str, Any]:
        return {"vms": {vm.name: vm.report() for vm in self.vms},
                "switches": {name: sw.describe() for name, sw in self.switches.items()},
                "loop": {"passes": self.loop.passes, "empty_passes": self.loop.empty_passes,
                         "busy_s": round(self.loop.busy_ns / 1e9, 3),
                         "sleeps": self.loop.sleeps,
                         "safety_wakeups": self.loop.safety_wakeups}}

    def close(self) -> None:
        for vm in self.vms:
            vm.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="vmsim-host")
    ap.add_argument("--channel-fd", type=int, required=True)
    args = ap.parse_args(argv)
    proc.die_with_parent()
    proc.ignore_sigint()
    proc.set_name("vmsim-host")
    require_little_endian()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="vmsim host %(message)s")
    lch = Channel.from_fd(args.channel_fd)
    try:
        spec = lch.recv_obj(timeout=30)
    except (ChannelClosed, TimeoutError) as e:
        print(f"vmsim host: no spec from the launcher: {e}", file=sys.stderr)
        return 2
    host = None
    try:
        host = Host(spec, lch)
        lch.send(("ready",))
        host.loop.run()
        lch.send(("report", host.report()))
        return 0
    except ChannelClosed:
        return 3
    except Exception as e:
        try:
            lch.send(("error", f"host: {type(e).__name__}: {e}", traceback.format_exc(), {}))
        except ChannelClosed:
            traceback.print_exc()
        return 2
    finally:
        if host is not None:
            host.close()
