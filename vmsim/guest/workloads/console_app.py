"""console-app: a program on one port of a console device, so that whoever is on the host end
(a person in `vmsim console`, a test on the pty or the socket) finds the VM answering.

    echo    every byte that arrives goes back as it came
    shell   a line-oriented command shell: it echoes what is typed (the terminal is raw),
            edits the line (backspace, Ctrl-U, Ctrl-C), and answers a few commands about the
            guest: help, hostname, uname, uptime, devices, queues, ports, size, echo, stats,
            exit

The app opens its port when the port comes up (for a multiport device: when the device has
named it, PORT_NAME; a port may also be chosen by number) and closes it when the run stops.
It works where the guest takes its interrupts: input arrives on the interrupt thread and is
answered there. Counts: ops (commands run, or chunks echoed), bytes (in and out), reads
(input chunks), writes (answers written), errors (writes the device did not take, a port
that never came up).
"""

import platform
import threading
import time
from typing import Any

from vmsim import __version__
from vmsim.abi import blk as B
from vmsim.abi import console as C
from vmsim.abi import features as F
from vmsim.abi import ids
from vmsim.abi import status as S
from vmsim.guest.drivers.console import Port, VirtioConsole
from vmsim.guest.memory import DmaMemory
from vmsim.guest.virtio.core import VirtioDevice
from vmsim.guest.workloads import Workload, WorkloadError

FEATURE_NAMES = {ids.VIRTIO_ID_BLOCK: B.FEATURE_NAMES, ids.VIRTIO_ID_CONSOLE: C.FEATURE_NAMES}
LINE_MAX = 1024
BOOTED = time.monotonic()

HELP = """commands:
  help             this list
  hostname         the VM's name
  uname [-a]       the system's name (and more)
  uptime           how long the guest has run
  devices          the virtio devices, their drivers, status and features
  queues [DEV]     every virtqueue's state (of DEV only)
  ports            this guest's console ports
  size             this console's size (cols x rows)
  echo TEXT        TEXT
  stats            this shell's counters
  exit             log out (a new session starts)"""


class ConsoleApp(Workload):
    kind = "console-app"

    def __init__(self, name: str, spec: dict[str, Any], devices: dict[str, VirtioDevice],
                 stats: memoryview | None, dma: DmaMemory | None = None) -> None:
        super().__init__(name, spec, devices, stats)
        self.dev = self.device(spec["device"])
        if not isinstance(self.dev.priv, VirtioConsole):
            raise WorkloadError(f"workload {name}: device {spec['device']!r} is not a console")
        self.console: VirtioConsole = self.dev.priv
        self.app = spec.get("app", "shell")
        if self.app not in ("echo", "shell"):
            raise WorkloadError(f"workload {name}: app must be echo or shell, got {self.app!r}")
        self.want: int | str = spec.get("port", 0)
        self.vm = spec.get("vm") or "guest"
        self.port: Port | None = None
        self.lock = threading.RLock()
        self.line = bytearray()
        self.esc = 0
        self.last_cr = False
        self.sessions = 0
        self.unknown = 0
        self.bound: tuple[int, str | None] | None = None

    # ---- binding to the port ---------------------------------------------------------------------
    def start(self) -> None:
        super().start()
        self.console.watch_ports(self._maybe_bind)

    def _matches(self, port: Port) -> bool:
        if isinstance(self.want, int):
            return port.id == self.want
        if not self.console.multiport:
            return port.id == 0             # the only port: no names without MULTIPORT
        return port.name == self.want

    def _maybe_bind(self, port: Port) -> None:
        with self.lock:
            if self.port is not None or self.stopping or not self._matches(port):
                return
            err = port.open(self)
            if err:
                self.error(f"cannot open port {port.id} ({port.name}): errno {-err}")
                return
            self.port = port
            self.bound = (port.id, port.name)
        if port.host_connected:
            self.on_open(port, True)

    def stop(self) -> None:
        self.console.unwatch_ports(self._maybe_bind)
        with self.lock:
            port, self.port = self.port, None
            if port is None:
                self.error(f"port {self.want!r} of {self.dev.name} never came up")
        if port is not None:
            port.close()
        super().stop()

    # ---- what the port says (interrupt thread) ---------------------------------------------------
    def on_open(self, port: Port, host_connected: bool) -> None:
        if host_connected and self.app == "shell":
            with self.lock:
                self.sessions += 1
                self.line.clear()
                self._write(self._banner() + self._prompt())

    def on_resize(self, port: Port, cols: int, rows: int) -> None:
        pass                       # the size is read when asked for (`size`)

    def on_data(self, port: Port, data: bytes) -> None:
        with self.lock:
            self.reads += 1
            self.bytes += len(data)
            if self.app == "echo":
                self._count_op()
                self._write_bytes(data)
                return
            out = self._discipline(data)
            if out:
                self._write_bytes(out)

    def _count_op(self) -> None:
        self.ops += 1
        self.budget -= 1
        if self.budget == 0:
            self._finish()          # `ops:` reached: the run may end (the app still answers)

    # ---- output ----------------------------------------------------------------------------------
    def _write(self, text: str) -> None:
        self._write_bytes(text.replace("\r\n", "\n").replace("\n", "\r\n").encode())

    def _write_bytes(self, data: bytes) -> None:
        port = self.port
        if port is None:
            return
        n = port.write(data)
        self.writes += 1
        if n < 0:
            self.error(f"write to port {port.id}: errno {-n}")
            return
        self.bytes += n
        if n < len(data):
            self.error(f"write to port {port.id}: {n} of {len(data)} bytes taken")

    def _prompt(self) -> str:
        return f"{self.vm}$ "

    def _banner(self) -> str:
        port = self.port
        where = f"{self.dev.name} port {port.id}" if port is not None else self.dev.name
        if port is not None and port.name:
            where += f" ({port.name})"
        return f"\nvmsim guest {self.vm}, {where}. Type 'help'.\n"

    # ---- the line discipline ---------------------------------------------------------------------
    def _discipline(self, data: bytes) -> bytes:
        """Echo, edit, and run complete lines; returns what to write back."""
        out = bytearray()
        line = self.line
        for b in data:
            if self.esc == 1:                       # ESC: a CSI or SS3 sequence follows
                self.esc = 2 if b in (0x5B, 0x4F) else 0
                continue
            if self.esc == 2:                       # skip to the sequence's final byte
                if 0x40 <= b <= 0x7E:
                    self.esc = 0
                continue
            if b == 0x1B:
                self.esc = 1
                continue
            if b in (0x0D, 0x0A):
                if b == 0x0A and self.last_cr:      # CR LF is one end of line
                    self.last_cr = False
                    continue
                self.last_cr = b == 0x0D
                out += b"\r\n"
                text = line.decode("utf-8", "replace").strip()
                line.clear()
                reply = self.run(text) if text else ""
                if reply:
                    out += (reply.rstrip("\n") + "\n").replace("\n", "\r\n").encode()
                out += self._prompt().encode()
                continue
            self.last_cr = False
            if b in (0x7F, 0x08):                   # backspace: one character
                if line:
                    while len(line) > 1 and line[-1] & 0xC0 == 0x80:
                        line.pop()
                    line.pop()
                    out += b"\b \b"
            elif b == 0x15:                         # Ctrl-U: the whole line
                out += b"\b \b" * len(line.decode("utf-8", "replace"))
                line.clear()
            elif b == 0x03:                         # Ctrl-C
                out += b"^C\r\n" + self._prompt().encode()
                line.clear()
            elif b == 0x04:                         # Ctrl-D on an empty line: log out
                if not line:
                    out += ("\n" + self._logout() + self._prompt()).replace(
                        "\n", "\r\n").encode()
            elif b >= 0x20 and len(line) < LINE_MAX:
                line.append(b)
                out.append(b)
        return bytes(out)

    def _logout(self) -> str:
        """The session ends; a new one starts at once (a getty respawns)."""
        self.sessions += 1
        return "logout\n" + self._banner()

    # ---- commands --------------------------------------------------------------------------------
    def run(self, text: str) -> str:
        """One command line; returns its output (lines separated by \\n)."""
        self._count_op()
        words = text.split()
        cmd, args = words[0], words[1:]
        fn = getattr(self, f"cmd_{cmd}", None)
        if fn is None:
            self.unknown += 1
            return f"{cmd}: command not found (try 'help')"
        try:
            return fn(args)
        except Exception as e:   # a command's bug must not take the shell down
            self.error(f"command {cmd!r} failed: {type(e).__name__}: {e}")
            return f"{cmd}: internal error: {e}"

    def cmd_help(self, args: list[str]) -> str:
        return HELP

    def cmd_hostname(self, args: list[str]) -> str:
        return self.vm

    def cmd_uname(self, args: list[str]) -> str:
        if "-a" in args:
            return (f"vmsim {self.vm} {__version__} virtio guest python-"
                    f"{platform.python_version()} {platform.machine()}")
        return "vmsim"

    def cmd_uptime(self, args: list[str]) -> str:
        return f"up {time.monotonic() - BOOTED:.1f} s"

    def cmd_echo(self, args: list[str]) -> str:
        return " ".join(args)

    def cmd_exit(self, args: list[str]) -> str:
        return self._logout()

    cmd_logout = cmd_exit

    def cmd_size(self, args: list[str]) -> str:
        port = self.port
        if port is None:
            return "no port"
        cols, rows = port.size
        return f"{cols} x {rows}" if cols and rows else "unknown (the device gave no size)"

    def cmd_stats(self, args: list[str]) -> str:
        return (f"commands {self.ops}, unknown {self.unknown}, sessions {self.sessions}, "
                f"bytes {self.bytes}, reads {self.reads}, writes {self.writes}, "
                f"errors {self.errors}")

    def cmd_devices(self, args: list[str]) -> str:
        lines = []
        for name in sorted(self.devices):
            vdev = self.devices[name]
            kind = ids.NAMES.get(vdev.id[0], f"id {vdev.id[0]}")
            try:
                status = S.describe(vdev.config.get_status(vdev))
            except Exception as e:   # a trapped read the host refused
                status = f"? ({e})"
            feats = " ".join(F.names(vdev.features, FEATURE_NAMES.get(vdev.id[0])))
            driver = vdev.driver.name if vdev.driver is not None else "(none)"
            lines.append(f"{name}: {kind}, driver {driver}, {len(vdev.vqs)} queues, "
                         f"status {status}")
            lines.append(f"  features: {feats or '(none)'}")
            if vdev.needs_reset:
                lines.append("  DEVICE_NEEDS_RESET")
        return "\n".join(lines) or "no devices"

    def cmd_queues(self, args: list[str]) -> str:
        names = args or sorted(self.devices)
        lines = [f"{'dev':<8} {'q':>3} {'name':<10} {'ring':<6} {'size':>5} {'free':>5} "
                 f"{'added':>8} {'done':>8} {'kicks':>7} {'irqs':>7}  state"]
        for name in names:
            vdev = self.devices.get(name)
            if vdev is None:
                lines.append(f"{name}: no such device")
                continue
            for vq in vdev.vqs:
                state = f"broken: {vq.broken_reason}" if vq.broken else \
                    f"{vq.in_flight()} in flight"
                lines.append(f"{name:<8} {vq.index:>3} {vq.name[:10]:<10} {vq.ring:<6} "
                             f"{vq.num:>5} {vq.num_free:>5} {vq.n_added:>8} "
                             f"{vq.n_completed:>8} {vq.n_kicks:>7} {vq.n_irqs:>7}  {state}")
        return "\n".join(lines)

    def cmd_ports(self, args: list[str]) -> str:
        lines = []
        for name in sorted(self.devices):
            con = self.devices[name].priv
            if not isinstance(con, VirtioConsole):
                continue
            mode = f"multiport, max {con.max_nr_ports}" if con.multiport else "single port"
            lines.append(f"{name}: {mode}")
            for p in sorted(list(con.ports.values()), key=lambda p: p.id):
                cols, rows = p.size
                lines.append(f"  port {p.id} {p.name or '(no name)'}: "
                             f"{'console' if p.is_console else 'generic'}, "
                             f"host {'open' if p.host_connected else 'closed'}, "
                             f"guest {'open' if p.guest_connected else 'closed'}, "
                             f"size {cols}x{rows}, in {p.bytes_in} B, out {p.bytes_out} B"
                             + (" <- this shell" if p is self.port else ""))
        return "\n".join(lines) or "no console devices"

    def report(self) -> dict[str, Any]:
        r = super().report()
        r.update({"app": self.app, "port": self.want, "sessions": self.sessions,
                  "unknown_commands": self.unknown,
                  "bound_port": list(self.bound) if self.bound else None})
        return r
