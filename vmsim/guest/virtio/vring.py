"""Creating, deleting, resetting and resizing virtqueues, whatever their ring format
(vring_create_virtqueue, vring_del_virtqueue, virtqueue_reset, virtqueue_resize in
drivers/virtio/virtio_ring.c)."""

import errno
from collections.abc import Callable
from typing import Any

from vmsim.abi import features as F
from vmsim.abi import packed_ring as P
from vmsim.abi import split_ring as R
from vmsim.guest.memory import DmaMemory
from vmsim.guest.virtio.ring_packed import PackedVirtqueue
from vmsim.guest.virtio.ring_split import SplitVirtqueue
from vmsim.guest.virtio.virtqueue import Virtqueue

EINVAL = -errno.EINVAL
E2BIG = -errno.E2BIG
ENOENT = -errno.ENOENT


def _alloc_split(dma: DmaMemory, num: int, align: int) -> tuple[int, int, int, int]:
    """One contiguous, zeroed vring (desc, avail, then used at `align`), as Linux allocates a
    split ring; returns (block, desc, avail, used)."""
    gpa, _ = dma.alloc(R.vring_size(num, align), max(4096, align))
    return gpa, gpa, gpa + R.desc_table_size(num), gpa + R.used_offset_in_vring(num, align)


def _alloc_packed(dma: DmaMemory, num: int) -> tuple[int, int, int, int]:
    """The descriptor ring and the two event suppression areas (one block, each part on its
    own cache line); returns (block, desc, driver area, device area)."""
    ring = P.ring_size(num)
    gpa, _ = dma.alloc(ring + 128, 4096)
    return gpa, gpa, gpa + ring, gpa + ring + 64


def split_size_for(num: int) -> int:
    """The largest power of two <= num: a split ring's size must be one (Linux refuses a
    device whose QueueNumMax is not; vmsim takes the size below instead)."""
    return 1 << (num.bit_length() - 1) if num > 0 else 0


def vring_create_virtqueue(index: int, num: int, vring_align: int, dma: DmaMemory,
                           features: int, notify: Callable[[Virtqueue], bool],
                           callback: Callable[[Virtqueue], None] | None, name: str,
                           stats: memoryview | None = None) -> Virtqueue:
    """A packed ring if VIRTIO_F_RING_PACKED was negotiated, else a split one."""
    vq: Virtqueue
    if F.has(features, F.VIRTIO_F_RING_PACKED):
        block, desc, drv, dev = _alloc_packed(dma, num)
        vq = PackedVirtqueue(index, num, dma, desc, drv, dev, features, notify, callback, name,
                             stats)
    else:
        num = split_size_for(num)
        block, desc, avail, used = _alloc_split(dma, num, vring_align)
        vq = SplitVirtqueue(index, num, dma, desc, avail, used, features, notify, callback,
                            name, stats)
    vq.ring_gpa = block
    vq.vring_align = vring_align
    if F.has(features, F.VIRTIO_F_ACCESS_PLATFORM):
        # The DMA hook: the ring itself came from `dma` (device addresses: IOVAs behind an
        # IOMMU); the buffers drivers add are mapped per request.
        vq.use_dma_api()
    return vq


def vring_del_virtqueue(vq: Virtqueue) -> None:
    """Free the ring memory of a queue made by vring_create_virtqueue."""
    vq.release()
    vq.dma.free(vq.ring_gpa)


def _disable_and_recycle(vq: Virtqueue, recycle: Callable[[Virtqueue, Any], None]) -> int:
    """virtqueue_disable_and_recycle: reset the queue through the transport, then hand every
    buffer the device did not use back to the driver."""
    config = vq.vdev.config
    if not hasattr(config, "disable_vq_and_reset"):
        return ENOENT
    err = config.disable_vq_and_reset(vq)
    if err:
        return err
    while (buf := vq.detach_unused_buf()) is not None:
        recycle(vq, buf)
    return 0


def virtqueue_reset(vq: Virtqueue, recycle: Callable[[Virtqueue, Any], None]) -> int:
    """Reset one queue (VIRTIO_F_RING_RESET) and bring it back with the same ring, emptied."""
    err = _disable_and_recycle(vq, recycle)
    if err:
        return err
    vq.reinit()
    return vq.vdev.config.enable_vq_after_reset(vq)


def virtqueue_resize(vq: Virtqueue, num: int, recycle: Callable[[Virtqueue, Any], None]) -> int:
    """Give a queue a ring of `num` entries: reset it (unused buffers go to `recycle`), move
    it to a new ring, enable it again. 0 or -errno."""
    if num > vq.num_max:
        return E2BIG
    if num <= 0:
        return EINVAL
    if isinstance(vq, SplitVirtqueue):
        num = split_size_for(num)
    if num == vq.num:
        return 0
    err = _disable_and_recycle(vq, recycle)
    if err:
        return err
    dma = vq.dma
    old = vq.ring_gpa
    vq.release()
    if isinstance(vq, PackedVirtqueue):
        block, desc, drv, dev = _alloc_packed(dma, num)
        vq.attach(num, desc, drv, dev)
    else:
        block, desc, avail, used = _alloc_split(dma, num, vq.vring_align)
        vq.attach(num, desc, avail, used)
    dma.free(old)
    vq.ring_gpa = block
    return vq.vdev.config.enable_vq_after_reset(vq)
