"""The vhost-user backends a run spawns (`backend: {vhost_user: {spawn: true}}`): one
`vmsim backend TYPE` process per such device, started before the host (which connects to
them), stopped after it, each with its output in the run directory.

They run in a session of their own, so a Ctrl-C at the terminal reaches the launcher only
(which stops the run in order: guests, host, then backends), and they die with the launcher.
"""

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

from vmsim.machine import proc

START_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 5.0


class BackendStartError(Exception):
    """A backend did not come up (one readable line)."""


@dataclass
class Spawned:
    label: str            # "<vm>.<device>"
    socket: str
    popen: subprocess.Popen
    log_path: str
    returncode: int | None = None

    def last_line(self) -> str:
        try:
            with open(self.log_path, "rb") as f:
                lines = f.read().decode(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return lines[-1] if lines else ""


def _prepare_image(d: dict[str, Any]) -> None:
    """A spawned blk backend serves a file: create it at its size if it does not exist (as
    the in-process file backend does)."""
    b = d.get("blk")
    if not b or not b.get("path") or os.path.exists(b["path"]):
        return
    with open(b["path"], "wb") as f:
        f.truncate(b["size"])


class Backends:
    def __init__(self, rundir: str) -> None:
        self.rundir = rundir
        self.spawned: list[Spawned] = []

    def start(self, host_spec: dict[str, Any]) -> None:
        """Start every spawned backend and wait until each listens on its socket."""
        for vm in host_spec["vms"]:
            for d in vm["devices"]:
                vu = d.get("vhost_user")
                if vu is None or not vu.get("spawn"):
                    continue
                _prepare_image(d)
                label = f"{vm['name']}.{d['name']}"
                log_path = os.path.join(self.rundir, f"{label}.backend.log")
                with open(log_path, "wb") as log:
                    p = subprocess.Popen([sys.executable, "-m", "vmsim", *vu["spawn"]],
                                         stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                         start_new_session=True,
                                         preexec_fn=proc.die_with_parent)
                self.spawned.append(Spawned(label, vu["socket"], p, log_path))
        deadline = time.monotonic() + START_TIMEOUT_S
        for s in self.spawned:
            while not os.path.exists(s.socket):
                rc = s.popen.poll()
                if rc is not None:
                    s.returncode = rc
                    raise BackendStartError(f"vhost-user backend of {s.label} exited with "
                                            f"code {rc}: {s.last_line()}")
                if time.monotonic() > deadline:
                    raise BackendStartError(f"vhost-user backend of {s.label} did not listen "
                                            f"on {s.socket} within {START_TIMEOUT_S:g} s")
                time.sleep(0.02)

    def died(self) -> list[str]:
        """Problems: backends that exited while the run went on."""
        out = []
        for s in self.spawned:
            if s.returncode is None and s.popen.poll() is not None:
                s.returncode = s.popen.returncode
                out.append(f"vhost-user backend of {s.label} (pid {s.popen.pid}) exited with "
                           f"code {s.returncode} during the run: {s.last_line()}")
        return out

    def stop(self) -> list[str]:
        """SIGINT each (a backend's normal end), then wait; problems for any that failed."""
        problems = []
        for s in self.spawned:
            if s.popen.poll() is None:
                s.popen.send_signal(signal.SIGINT)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for s in self.spawned:
            try:
                rc = s.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                s.popen.kill()
                rc = s.popen.wait()
                problems.append(f"vhost-user backend of {s.label} did not stop within "
                                f"{STOP_TIMEOUT_S:g} s; killed")
            if s.returncode is None and rc != 0:
                problems.append(f"vhost-user backend of {s.label} exited with code {rc}: "
                                f"{s.last_line()}")
            s.returncode = rc
        return problems

    def kill(self) -> None:
        for s in self.spawned:
            if s.popen.poll() is None:
                s.popen.kill()
                s.popen.wait()

    def describe(self) -> list[dict[str, Any]]:
        return [{"device": s.label, "socket": s.socket, "pid": s.popen.pid,
                 "exit_code": s.returncode} for s in self.spawned]
