"""The dashboard on a terminal: a rich Live screen redrawn a few times a second, and the keys.

It does not own a loop or a thread: its owner (the launcher's watch loop, or `vmsim top`)
waits on `input_fd()` with its other fds and calls `on_input()` when a key arrives and
`tick()` when a refresh is due, so the reader sleeps in poll between refreshes and costs the
run only the sampling and drawing themselves. rich's own refresh thread is off
(auto_refresh=False).

Keys: q quits (the owner decides what quitting means: the launcher ends the run as at the end
of its duration, top just leaves), p pauses the view (the run goes on), tab / shift-tab step
the focus through VMs and devices, 1-9 focus a VM, 0 or Esc show everything.
"""

import io
import os
import termios
import time
import tty
from typing import Any

from rich.console import Console
from rich.live import Live

from vmsim.launcher.dashboard import UiState, focus_targets, render
from vmsim.launcher.rates import History
from vmsim.launcher.statsread import RunReader

DEFAULT_HZ = 4.0


def foreground(fd: int) -> bool:
    """Whether `fd` is a terminal whose foreground process group is ours. A background job
    (`vmsim run ... &`) that read keys or changed the terminal's mode would be stopped by
    SIGTTIN / SIGTTOU; it gets no dashboard."""
    if not os.isatty(fd):
        return False
    try:
        return os.tcgetpgrp(fd) == os.getpgrp()
    except OSError:             # a terminal, but not ours to control: no job control applies
        return True


class LiveDashboard:
    def __init__(self, manifest: dict[str, Any], reader: RunReader, hz: float = DEFAULT_HZ,
                 console: Console | None = None, stdin_fd: int | None = 0) -> None:
        self.manifest = manifest
        self.reader = reader
        self.interval = 1.0 / hz
        # Sized from the terminal at each frame (not from $COLUMNS, which rich would prefer
        # and which a shell may have exported at some other size).
        self._own_console = console is None
        self.console = console or Console(highlight=False)
        self.ui = UiState()
        self.hist = History()
        self.targets = focus_targets(manifest)
        self.stdin_fd = stdin_fd if stdin_fd is not None and foreground(stdin_fd) else None
        self._saved_tty: list | None = None
        self._live: Live | None = None
        self.frames = 0
        self.busy_s = 0.0               # CPU time spent sampling and drawing (its cost)

    # ---- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        if self.stdin_fd is not None:
            # Keys without Enter and without echo; Ctrl-C still signals (ISIG stays).
            self._saved_tty = termios.tcgetattr(self.stdin_fd)
            tty.setcbreak(self.stdin_fd, termios.TCSANOW)
        self._live = Live(console=self.console, screen=True, auto_refresh=False,
                          redirect_stdout=False, redirect_stderr=False)
        self._live.start()
        self.tick()

    def stop(self) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None
        if self._saved_tty is not None:
            termios.tcsetattr(self.stdin_fd, termios.TCSADRAIN, self._saved_tty)
            self._saved_tty = None

    # ---- the owner's loop calls these ------------------------------------------------------------
    def input_fd(self) -> int | None:
        return self.stdin_fd

    def on_input(self) -> bool:
        """Handle the keys waiting on stdin; True when q was pressed."""
        try:
            data = os.read(self.stdin_fd, 64)
        except (BlockingIOError, InterruptedError):
            return False
        if not data:                      # the terminal went away: stop listening
            self.stdin_fd = None
            return False
        quit_ = False
        vms = [k for k, t in enumerate(self.targets) if len(t) == 1]
        i = 0
        while i < len(data):
            if data.startswith(b"\x1b[", i):
                # A CSI sequence (arrows, shift-tab, ...): parameters, then one final byte.
                j = i + 2
                while j < len(data) and 0x20 <= data[j] <= 0x3F:
                    j += 1
                if data[j:j + 1] == b"Z":                    # shift-tab
                    self.ui.focus = (self.ui.focus - 1) % len(self.targets)
                i = j + 1
                continue
            ch = data[i:i + 1]
            i += 1
            if ch in (b"q", b"Q"):
                quit_ = True
            elif ch in (b"p", b"P", b" "):
                self.ui.paused = not self.ui.paused
            elif ch == b"\t":
                self.ui.focus = (self.ui.focus + 1) % len(self.targets)
            elif ch in (b"0", b"\x1b"):
                self.ui.focus = 0
            elif ch.isdigit() and int(ch) - 1 < len(vms):
                self.ui.focus = vms[int(ch) - 1]
        self.draw()
        return quit_

    def tick(self) -> None:
        """A refresh: a new sample (unless paused), then draw."""
        t0 = time.thread_time()
        if not self.ui.paused:
            self.hist.add(self.reader.sample())
        self._draw()
        self.busy_s += time.thread_time() - t0

    def draw(self) -> None:
        t0 = time.thread_time()
        self._draw()
        self.busy_s += time.thread_time() - t0

    def _draw(self) -> None:
        if self._live is None:
            return
        if self._own_console:
            try:
                self.console.size = os.get_terminal_size(self.console.file.fileno())
            except (OSError, ValueError, io.UnsupportedOperation):
                pass
        started = self.manifest.get("started_mono")
        elapsed = time.monotonic() - started if started else None
        self._live.update(render(self.manifest, self.hist, self.ui, elapsed,
                                 self.console.size.width), refresh=True)
        self.frames += 1

    def log(self, msg: str) -> None:
        self.ui.messages.append(msg)
