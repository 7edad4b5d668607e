"""POSIX shared-memory objects: guest RAM and the stats region."""

import mmap
import os

import posix_ipc


def create(name: str, size: int) -> None:
    """Create a new object of `size` bytes; fails if the name exists (O_CREX)."""
    obj = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, mode=0o600, size=size)
    obj.close_fd()


def open_map(name: str) -> mmap.mmap:
    """Map an existing object read-write, shared; the fd is closed once mapped."""
    obj = posix_ipc.SharedMemory(name)
    try:
        return mmap.mmap(obj.fd, obj.size)
    finally:
        obj.close_fd()


def open_map_readonly(name: str) -> mmap.mmap:
    """Map an existing object read-only (a reader: the dashboard, `vmsim top`). A store
    through it faults, so a reader cannot disturb the run it watches."""
    obj = posix_ipc.SharedMemory(name, read_only=True)
    try:
        return mmap.mmap(obj.fd, obj.size, prot=mmap.PROT_READ)
    finally:
        obj.close_fd()


def open_fd(name: str) -> int:
    """An fd of an existing object (for handing it on, as a VMM hands RAM to vhost-user)."""
    obj = posix_ipc.SharedMemory(name)
    return obj.fd


def unlink(name: str) -> bool:
    """Remove an object; False if it was already gone."""
    try:
        posix_ipc.unlink_shared_memory(name)
        return True
    except posix_ipc.ExistentialError:
        return False


def exists(name: str) -> bool:
    return os.path.exists("/dev/shm/" + name.lstrip("/"))
