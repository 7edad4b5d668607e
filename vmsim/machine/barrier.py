"""A full memory barrier for the two places virtio needs a store-load fence.

x86 (TSO) keeps stores in order and loads in order, which covers the spec's write barriers
(buffer, descriptor, ring entry, then index). What TSO does not order is a store followed by a
load of another location: "publish my index, then read the other side's event index" on the
driver (kick_prepare) and "enable notifications, then re-check the ring" on both sides. Linux
puts virtio_mb() (mfence / a locked instruction) there. Pure Python has no fence, but taking
an uncontended threading.Lock runs a locked compare-and-exchange in the C library
(sem_trywait / sem_post), which is a full barrier on x86. A sleeping side also waits with a
timeout as a safety net, so even a missed wake-up would only cost latency, never a hang.
"""

import threading

_fence = threading.Lock()
_acquire = _fence.acquire
_release = _fence.release


def full_barrier() -> None:
    """smp_mb(): order every earlier store before every later load."""
    _acquire()
    _release()
