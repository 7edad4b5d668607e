"""Shared fixtures. Every test must leave /dev/shm and the process table as it found them:
the autouse fixture below checks both after each test."""

import os
import time

import pytest


def _vmsim_shm() -> set[str]:
    try:
        return {e for e in os.listdir("/dev/shm") if e.startswith("vmsim-")}
    except FileNotFoundError:
        return set()


def _ours(entry: str) -> bool:
    """Whether a /dev/shm entry can belong to this test session: its launcher is this process,
    one of its descendants, or gone. A live launcher elsewhere (another session's run on the
    same machine) is none of our business, and its objects are never touched."""
    try:
        pid = int(entry.split("-")[1])
    except (IndexError, ValueError):
        return False
    if pid == os.getpid():
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return True              # the launcher is gone: what it left is a leak
    ppid = int(fields[1])
    me = os.getpid()
    while ppid > 1:
        if ppid == me:
            return True
        try:
            with open(f"/proc/{ppid}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except OSError:
            return False
    return False


def _vmsim_children() -> set[int]:
    """Live descendants of this test process whose command line mentions vmsim."""
    me = os.getpid()
    kids = set()
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            if int(fields[1]) != me or fields[0] == "Z":
                continue
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"vmsim" in f.read():
                    kids.add(int(pid))
        except (OSError, IndexError, ValueError):
            continue
    return kids


@pytest.fixture(autouse=True)
def no_leaks():
    """Fail a test that leaves vmsim objects in /dev/shm or vmsim child processes behind."""
    before = _vmsim_shm()
    yield
    deadline = time.monotonic() + 3
    while True:
        leaked = {e for e in _vmsim_shm() - before if _ours(e)}
        kids = _vmsim_children()
        if not leaked and not kids:
            return
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)
    for name in leaked:
        try:
            os.unlink("/dev/shm/" + name)
        except OSError:
            pass
    assert not leaked, f"left in /dev/shm: {sorted(leaked)}"
    assert not kids, f"child processes left running: {sorted(kids)}"
