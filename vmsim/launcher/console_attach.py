"""`vmsim console VM DEV [PORT]`: attach the user's terminal to a console port of a running
VM, as `virsh console` does.

A run's host writes, for each console device, a manifest in the run directory
(<tmp>/vmsim-<pid>-<hex>-*/<vm>-<dev>.console.json) naming each port's backend and path (the
pty's slave, the socket). This finds the live run that has the device (a run whose launcher
is alive; --run chooses when several have it), opens the port's pty (or connects to its
socket), puts the terminal in raw mode, and copies bytes both ways until Ctrl-] or until the
run ends. A pty's window size follows the terminal's (the guest hears of it as the console's
size the next time the port has traffic).
"""

import errno
import fcntl
import json
import os
import re
import select
import signal
import socket
import sys
import tempfile
import termios
import time
import tty
from dataclasses import dataclass

from vmsim.machine import runname

ESCAPE = b"\x1d"             # Ctrl-]
LINGER_S = 1.0               # stdin ended (not a terminal): output read until this long idle
_RUNDIR_RE = re.compile(r"^(vmsim-(\d+)-[0-9a-f]{6})-")


class AttachError(Exception):
    """The console cannot be attached (one readable line)."""


@dataclass
class Endpoint:
    run: str
    vm: str
    device: str
    index: int
    name: str
    kind: str                # "pty" or "socket"
    path: str

    @property
    def label(self) -> str:
        return f"{self.vm}.{self.device} port {self.index} ({self.name})"


def live_runs(tmp: str | None = None) -> list[tuple[str, str]]:
    """(run name, run directory) of every run whose launcher is alive."""
    tmp = tmp or tempfile.gettempdir()
    runs = []
    try:
        entries = sorted(os.listdir(tmp))
    except OSError:
        return runs
    for e in entries:
        m = _RUNDIR_RE.match(e)
        path = os.path.join(tmp, e)
        if m and os.path.isdir(path) and runname.pid_alive(int(m.group(2))):
            runs.append((m.group(1), path))
    return runs


def find_console(vm: str, device: str, port: str | None = None, run: str | None = None,
                 tmp: str | None = None) -> Endpoint:
    """The port to attach to: PORT is a name or a number (default: port 0)."""
    runs = live_runs(tmp)
    if run is not None:
        runs = [(r, d) for r, d in runs if r == run or r.startswith(run)
                or r.split("-")[1] == run]
        if not runs:
            raise AttachError(f"no running vmsim run matches --run {run}")
    found = []
    for r, d in runs:
        manifest = os.path.join(d, f"{vm}-{device}.console.json")
        try:
            with open(manifest) as f:
                found.append((r, json.load(f)))
        except (OSError, ValueError):
            continue
    if not found:
        where = f"run {run}" if run else "any running vmsim run"
        raise AttachError(f"{vm}.{device}: no console device of that name in {where} "
                          f"(start one, e.g. vmsim run configs/console-pty.yaml)")
    if len(found) > 1:
        names = ", ".join(r for r, _ in found)
        raise AttachError(f"{vm}.{device} is in several running runs ({names}); choose one "
                          "with --run RUN")
    r, man = found[0]
    ports = man.get("ports", [])
    if port is None:
        chosen = next((p for p in ports if p.get("index") == 0), None)
    elif port.isdigit():
        chosen = next((p for p in ports if p.get("index") == int(port)), None)
    else:
        chosen = next((p for p in ports if p.get("name") == port), None)
    if chosen is None:
        known = ", ".join(f"{p.get('index')} ({p.get('name')})" for p in ports)
        raise AttachError(f"{vm}.{device} has no port {port} (ports: {known})")
    ep = Endpoint(r, vm, device, int(chosen["index"]), str(chosen["name"]),
                  str(chosen.get("backend")), str(chosen.get("path") or ""))
    if ep.kind == "file":
        raise AttachError(f"{ep.label} writes to the log file {ep.path}; there is nothing to "
                          "attach to (read the file)")
    if ep.kind not in ("pty", "socket") or not ep.path:
        raise AttachError(f"{ep.label} has no host end to attach to (backend {ep.kind})")
    return ep


def _open(ep: Endpoint) -> tuple[int, socket.socket | None]:
    if ep.kind == "pty":
        try:
            return os.open(ep.path, os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC), None
        except OSError as e:
            raise AttachError(f"{ep.label}: cannot open {ep.path}: {e.strerror}") from None
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(ep.path)
    except OSError as e:
        s.close()
        raise AttachError(f"{ep.label}: cannot connect to {ep.path}: {e.strerror}") from None
    return s.fileno(), s


def _winsize(fd: int) -> bytes | None:
    try:
        return fcntl.ioctl(fd, termios.TIOCGWINSZ, bytes(8))
    except OSError:
        return None


def _write_all(fd: int, data: bytes) -> None:
    while data:
        try:
            n = os.write(fd, data)
        except BlockingIOError:
            select.select([], [fd], [], 1.0)
            continue
        data = data[n:]


def attach(ep: Endpoint, stdin: int = 0, stdout: int = 1) -> int:
    """Copy bytes between the terminal and the port until Ctrl-], the end of input, or the
    run's end. Returns the exit code."""
    fd, sock = _open(ep)
    is_tty = os.isatty(stdin)
    saved = termios.tcgetattr(stdin) if is_tty else None
    old_winch = None

    def resize(*_a: object) -> None:
        ws = _winsize(stdout) or _winsize(stdin)
        if ws is not None and ep.kind == "pty":
            try:
                fcntl.ioctl(fd, termios.TIOCSWINSZ, ws)
            except OSError:
                pass

    nl = "\r\n" if is_tty else "\n"
    try:
        if is_tty:
            resize()
            old_winch = signal.signal(signal.SIGWINCH, resize)
            tty.setraw(stdin, termios.TCSANOW)
        _write_all(stdout, (f"Connected to {ep.label} ({ep.kind} {ep.path}) of {ep.run}{nl}"
                            f"Escape character is ^] (Ctrl + ]){nl}").encode())
        return _relay(fd, sock, stdin, stdout, is_tty, nl)
    finally:
        if saved is not None:
            termios.tcsetattr(stdin, termios.TCSADRAIN, saved)
        if old_winch is not None:
            signal.signal(signal.SIGWINCH, old_winch)
        if sock is not None:
            sock.close()
        else:
            os.close(fd)


def _relay(fd: int, sock: socket.socket | None, stdin: int, stdout: int, is_tty: bool,
           nl: str) -> int:
    stdin_open = True
    linger_until = 0.0
    while True:
        watch = [fd] + ([stdin] if stdin_open else [])
        try:
            ready, _, _ = select.select(watch, [], [], 0.1)
        except InterruptedError:      # SIGWINCH
            continue
        if not stdin_open and not ready and time.monotonic() > linger_until:
            return 0
        if fd in ready:
            try:
                data = sock.recv(4096) if sock is not None else os.read(fd, 4096)
            except OSError as e:
                if e.errno not in (errno.EIO, errno.ECONNRESET):
                    raise
                data = b""
            if not data:
                _write_all(stdout, f"{nl}vmsim: the console closed (the run ended){nl}"
                           .encode())
                return 0
            _write_all(stdout, data)
            linger_until = time.monotonic() + LINGER_S
        if stdin_open and stdin in ready:
            data = os.read(stdin, 1024)
            if not data:                       # end of input (not a terminal)
                stdin_open = False
                linger_until = time.monotonic() + LINGER_S
                continue
            cut = data.find(ESCAPE)
            if cut >= 0:
                if cut:
                    _write_all(fd, data[:cut])
                _write_all(stdout, nl.encode())
                return 0
            _write_all(fd, data)


def main_console(vm: str, device: str, port: str | None, run: str | None) -> int:
    """The command's body: one line on stderr for every failure."""
    try:
        return attach(find_console(vm, device, port, run))
    except AttachError as e:
        print(f"vmsim: {e}", file=sys.stderr)
        return 1
