"""Names of a run's objects. Every named object of a run starts with the run's name,
`vmsim-<launcher pid>-<random>`, so a run's objects can be found and removed together, and a
run whose launcher died can be recognised and swept."""

import os
import re
import secrets

PREFIX = "vmsim-"
_RUN_RE = re.compile(r"^vmsim-(\d+)-([0-9a-f]{6})")


def new_run_name() -> str:
    return f"{PREFIX}{os.getpid()}-{secrets.token_hex(3)}"


def ram_name(run: str, vm: str) -> str:
    return f"/{run}-ram-{vm}"


def stats_name(run: str) -> str:
    return f"/{run}-stats"


def run_of(shm_entry: str) -> str | None:
    """The run name an entry of /dev/shm belongs to, or None if it is not vmsim's."""
    m = _RUN_RE.match(shm_entry.lstrip("/"))
    return m.group(0) if m else None


def launcher_pid(run: str) -> int:
    m = _RUN_RE.match(run)
    if not m:
        raise ValueError(run)
    return int(m.group(1))


def list_shm_runs() -> dict[str, list[str]]:
    """Runs with objects in /dev/shm: run name -> object names (with the leading '/')."""
    runs: dict[str, list[str]] = {}
    try:
        entries = os.listdir("/dev/shm")
    except FileNotFoundError:  # pragma: no cover
        return runs
    for e in entries:
        r = run_of(e)
        if r:
            runs.setdefault(r, []).append("/" + e)
    return runs


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists. A run whose launcher is alive is never swept,
    whatever that process is (a launcher may be a test runner or a benchmark calling vmsim as
    a library); a reused pid only delays the sweep of a dead run's objects."""
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
