"""Process plumbing for the children of a run."""

import ctypes
import os
import signal

_PR_SET_NAME = 15
_PR_SET_PDEATHSIG = 1

# By name, not ctypes.util.find_library: that runs ldconfig in a subprocess, a fork of every
# vmsim process at import (seen as a second host in the process table, and slower).
try:
    _libc = ctypes.CDLL("libc.so.6", use_errno=True)
except OSError:  # pragma: no cover - not glibc
    _libc = ctypes.CDLL(None, use_errno=True)


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """Ask the kernel to send `sig` when the launcher dies, so no child outlives a run.

    If the parent is already gone by the time this runs, exit at once."""
    if _libc is not None:
        _libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    if os.getppid() == 1:
        os._exit(3)


def set_name(name: str) -> None:
    """The name ps/top show for this thread (at most 15 bytes)."""
    if _libc is not None:
        _libc.prctl(_PR_SET_NAME, ctypes.c_char_p(name.encode()[:15]), 0, 0, 0)


def ignore_sigint() -> None:
    """Children leave Ctrl-C to the launcher, which stops them in order."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
