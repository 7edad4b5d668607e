"""Virtio 1.x structures are little-endian; vmsim reads them with native memoryview casts."""

import sys


def require_little_endian() -> None:
    """Refuse to run on a big-endian host rather than convert silently (DESIGN.md)."""
    if sys.byteorder != "little":
        raise SystemExit("vmsim: this host is big-endian; virtio 1.x rings are little-endian "
                         "and vmsim accesses them with native loads and stores")
