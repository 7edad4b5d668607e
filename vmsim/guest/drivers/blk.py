"""virtio_blk, driver side (drivers/block/virtio_blk.c).

A request is a chain: the 16-byte header (readable), the data buffers (readable for a write,
writable for a read or get-id), and the one-byte status (writable). Each queue has a fixed set
of request slots ("tags"), each with its header and status byte allocated once in guest
memory, so submitting a request allocates nothing in guest RAM.

Completion follows virtblk_done: disable callbacks, drain get_buf, re-enable and re-check.
The driver may also busy-poll a queue for a short while after work (`poll_us`, like
io_uring's or virtio_blk's poll queues) before it re-arms the interrupt; completions that
arrive meanwhile need no interrupt at all.
"""

import errno
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from operator import attrgetter
from typing import Any

import numpy as np

from vmsim.abi import blk as B
from vmsim.abi import features as F
from vmsim.abi import ids
from vmsim.guest.memory import DmaMemory
from vmsim.guest.virtio.core import VirtioDevice, VirtioDriver
from vmsim.guest.virtio.virtqueue import ENOSPC, Sg, Virtqueue
from vmsim.guest.virtio.vring import virtqueue_reset

log = logging.getLogger("vmsim.guest")

EAGAIN = -errno.EAGAIN
EROFS = -errno.EROFS
EINVAL = -errno.EINVAL
EIO = -errno.EIO
ENODEV = -errno.ENODEV

STATUS_PENDING = 0xFF          # what sync() reports if a request never completed
SLOT = 32                      # bytes per request slot: header at 0, status at 16
STEP_ASIDE_NS = 20_000_000     # longest the completion loop waits for blocked submitters
# Completions taken per turn of the completion loop. Smaller keeps both sides busy (the
# next requests go out sooner); larger spreads a batch's fixed cost over more requests.
COMPLETION_CHUNK = 64
# Longest one run of the completion loop keeps the interrupt thread from other devices
SLICE_NS = 2_000_000

Callback = Callable[[int, Any], None]   # (status byte, the caller's argument)
# submit_batch's completion: (status bytes, the callers' int arguments), a batch at a time
BatchCallback = Callable[[np.ndarray, np.ndarray], None]
_TAG = attrgetter("tag")


class BlkRequest:
    """One request slot (a blk-mq tag with its pdu: struct virtblk_req)."""

    __slots__ = ("arg", "callback", "hdr", "hdr_only", "hdr_sg", "in1", "out1", "queue",
                 "sgs", "status", "status_only", "status_sg", "tag")

    def __init__(self, tag: int, queue: "BlkQueue", gpa: int, view: memoryview) -> None:
        self.tag = tag
        self.queue = queue
        # struct virtio_blk_outhdr {le32 type; le32 ioprio; le64 sector} as two u64 words: the
        # slot is 32-byte aligned, and the device reads it only after avail->idx publishes it.
        self.hdr = view[0:B.OUTHDR_SIZE].cast("Q")
        self.status = view[16:17]
        self.hdr_sg = (gpa, B.OUTHDR_SIZE)
        self.status_sg = (gpa + 16, 1)
        self.hdr_only = (self.hdr_sg,)
        self.status_only = (self.status_sg,)
        # Reused scatter lists for the one-data-buffer case (the common one).
        self.out1: list[Sg] = [self.hdr_sg, self.hdr_sg]
        self.in1: list[Sg] = [self.status_sg, self.status_sg]
        self.callback: Callback | None = None
        self.arg: Any = None
        self.sgs: Sequence[Sg] = ()            # the data buffers: a retry after a reset


class BlkQueue:
    """struct virtio_blk_vq: a request queue, its lock and its free slots."""

    __slots__ = ("batch_addr", "batch_arg", "batch_cb", "batch_len", "dead", "free", "hdr_np",
                 "index", "lock", "slot_gpa_np", "slots", "slots_gpa", "slots_np", "status_np",
                 "vq", "waiting")

    def __init__(self, vq: Virtqueue) -> None:
        self.vq = vq
        # Re-entrant: completion callbacks run under it and may submit again.
        self.lock = threading.RLock()
        self.free: list[BlkRequest] = []
        self.slots: list[BlkRequest] = []
        self.slots_gpa = 0
        self.index = vq.index
        self.dead = False          # deleted by a freeze: a submitter that raced it holds
        # One entry per submitter blocked on the lock (list append / pop are atomic under
        # the GIL): the completion loop steps aside while there is any (see _done).
        self.waiting: list[None] = []
        # submit_batch's per-slot state, by tag (set up with the slots): headers as u64
        # words, status bytes, the batch callback (None: the slot's own callback, or free),
        # argument and data buffer of each request it queued
        self.hdr_np = self.status_np = self.slot_gpa_np = self.slots_np = np.zeros(0)
        self.batch_cb = self.batch_arg = self.batch_addr = self.batch_len = np.zeros(0)

    def setup_batch(self, gpa: int, view: memoryview, depth: int) -> None:
        self.hdr_np = np.ndarray((depth, SLOT // 8), np.uint64, view)
        self.status_np = np.ndarray(depth, np.uint8, view, 16, (SLOT,))
        self.slot_gpa_np = gpa + SLOT * np.arange(depth, dtype=np.int64)
        self.slots_np = np.empty(depth, object)
        self.slots_np[:] = self.slots
        self.batch_cb = np.full(depth, None, object)
        self.batch_arg = np.zeros(depth, np.int64)
        self.batch_addr = np.zeros(depth, np.int64)
        self.batch_len = np.zeros(depth, np.int64)

    def take_back(self, req: "BlkRequest") -> tuple[int, int, Sequence[Sg], Callback, Any]:
        """What a request not completed was (type, sector, data, callback, argument), to
        send again or fail; its slot is free of it after."""
        hdr = req.hdr
        typ, sector = hdr[0] & 0xFFFFFFFF, hdr[1]
        cb, arg, sgs = req.callback, req.arg, req.sgs
        t = req.tag
        bcb = self.batch_cb[t] if t < len(self.batch_cb) else None
        if bcb is not None:
            cb, arg = _one_of_batch(bcb), int(self.batch_arg[t])
            sgs = ((int(self.batch_addr[t]), int(self.batch_len[t])),)
            self.batch_cb[t] = None
        req.callback = req.arg = None
        req.sgs = ()
        return typ, sector, sgs, cb, arg


def _one_of_batch(done: BatchCallback) -> Callback:
    """A batch callback as a one-request callback (a batch request sent again one by one)."""
    def one(status: int, arg: Any) -> None:
        done(np.array([status], np.uint8), np.array([arg], np.int64))
    return one


def _acquire_waiting(q: BlkQueue) -> None:
    """Take q.lock after a non-blocking try failed, counted as waiting meanwhile. Python's
    locks are not fair: a thread that releases and takes a lock again at once nearly always
    wins over one woken to take it, so the completion loop needs to know it is wanted."""
    q.waiting.append(None)
    try:
        q.lock.acquire()
    finally:
        q.waiting.pop()


class VirtioBlk:
    """struct virtio_blk: one probed disk."""

    def __init__(self, vdev: VirtioDevice, dma: DmaMemory, poll_us: int) -> None:
        self.vdev = vdev
        self.dma = dma
        self.poll_ns = poll_us * 1000
        self.capacity = 0                      # in 512-byte sectors
        self.blk_size = B.SECTOR_SIZE
        self.seg_max = 1
        self.readonly = False
        self.has_flush = False
        self.queues: list[BlkQueue] = []
        self.serial = b""
        self._plug = threading.local()
        self.capacity_listeners: list[Callable[[int], None]] = []
        self.removed = False
        # Suspend: requests submitted while frozen, and those the reset took back, wait here
        # (type, sector, sgs, callback, arg, queue) and go out again on restore.
        self.frozen = False
        self.held: list[tuple[int, int, Sequence[Sg], Callback, Any, int]] = []
        self._held_lock = threading.Lock()
        self.retried = 0
        # Run after each batch of completions, inside its plug (blk-mq runs the hardware
        # queues after completing requests): a submitter that batches its next requests
        # (submit_batch) does so here, with one kick decision for the lot.
        self.completion_hooks: list[Callable[[], None]] = []
        # The interrupt thread's controller (the transport's): _done leaves work there
        self.irqc = getattr(vdev.config, "irqc", None)

    # ---- setup (virtblk_probe) -------------------------------------------------------------------
    def init(self) -> int:
        vdev = self.vdev
        nvqs = 1
        if vdev.has_feature(B.VIRTIO_BLK_F_MQ):
            nvqs = max(1, vdev.cread(B.CFG_NUM_QUEUES, 2))
        vqs = vdev.config.find_vqs(vdev, nvqs, [self._done] * nvqs,
                                   [f"req.{i}" for i in range(nvqs)])
        for vq in vqs:
            q = BlkQueue(vq)
            vq.priv = q
            self.queues.append(q)
        self.capacity = vdev.cread(B.CFG_CAPACITY, 8)
        seg = vdev.cread_feature(B.VIRTIO_BLK_F_SEG_MAX, B.CFG_SEG_MAX, 4)
        self.seg_max = seg if seg else 1
        bs = vdev.cread_feature(B.VIRTIO_BLK_F_BLK_SIZE, B.CFG_BLK_SIZE, 4)
        if bs:
            if bs < B.SECTOR_SIZE or bs & (bs - 1):
                log.warning("%s: invalid block size %d", vdev.name, bs)
                return EINVAL
            self.blk_size = bs
        self.readonly = vdev.has_feature(B.VIRTIO_BLK_F_RO)
        self.has_flush = vdev.has_feature(B.VIRTIO_BLK_F_FLUSH)
        for q in self.queues:
            self._alloc_slots(q)
        vdev.device_ready()
        return 0

    def _alloc_slots(self, q: BlkQueue) -> None:
        """The queue depth: one slot per descriptor with indirect descriptors, else half the
        ring (a request takes at least 2 descriptors), as virtio_blk sizes its tag set."""
        depth = q.vq.num_free
        if not self.vdev.has_feature(F.VIRTIO_RING_F_INDIRECT_DESC):
            depth //= 2
        depth = max(1, depth)
        gpa, view = self.dma.alloc(depth * SLOT, 64)
        q.slots_gpa = gpa
        for t in range(depth):
            q.slots.append(BlkRequest(t, q, gpa + t * SLOT, view[t * SLOT:(t + 1) * SLOT]))
        q.free = list(reversed(q.slots))
        q.setup_batch(gpa, view, depth)

    @property
    def queue_depth(self) -> int:
        return len(self.queues[0].slots) if self.queues else 0

    # ---- submission (virtio_queue_rq) ------------------------------------------------------------
    def submit(self, typ: int, sector: int, sgs: Sequence[Sg], callback: Callback, arg: Any,
               qid: int = 0) -> int:
        """Queue one request; `callback(status, arg)` runs on completion (interrupt thread).
        Returns 0, EAGAIN when every slot or descriptor is busy (retry after a completion),
        EROFS, EINVAL or EIO."""
        nsg = len(sgs)
        if nsg > self.seg_max:
            return EINVAL
        if typ == B.VIRTIO_BLK_T_OUT and self.readonly:
            return EROFS
        if self.frozen:
            return self._hold(typ, sector, sgs, callback, arg, qid)
        q = self.queues[qid]
        plugged = getattr(self._plug, "queues", None)
        lock = q.lock
        if not lock.acquire(False):
            _acquire_waiting(q)
        try:
            if q.dead:              # frozen since we looked
                return self._hold(typ, sector, sgs, callback, arg, qid)
            free = q.free
            if not free:
                return EAGAIN
            req = free.pop()
            hdr = req.hdr
            hdr[0] = typ             # type, and ioprio 0 in the upper half
            hdr[1] = sector
            req.callback = callback
            req.arg = arg
            req.sgs = sgs
            vq = q.vq
            if nsg == 1:
                if typ == B.VIRTIO_BLK_T_OUT:
                    out = req.out1
                    out[1] = sgs[0]
                    err = vq.add_sgs(out, req.status_only, req)
                else:
                    inn = req.in1
                    inn[0] = sgs[0]
                    err = vq.add_sgs(req.hdr_only, inn, req)
            elif typ == B.VIRTIO_BLK_T_OUT:
                err = vq.add_sgs([req.hdr_sg, *sgs], req.status_only, req)
            elif sgs:
                err = vq.add_sgs(req.hdr_only, [*sgs, req.status_sg], req)
            else:
                err = vq.add_sgs(req.hdr_only, req.status_only, req)
            if err:
                req.callback = req.arg = None
                free.append(req)
                return EAGAIN if err == ENOSPC else err
            if plugged is not None:
                plugged.add(q)
                kick = False
            else:
                kick = vq.kick_prepare()
        finally:
            lock.release()
        if kick:
            vq.notify()
        return 0

    def submit_batch(self, typs: np.ndarray, sectors: np.ndarray, addrs: np.ndarray,
                     lens: np.ndarray, done: BatchCallback, args: np.ndarray,
                     qid: int = 0) -> tuple[int, int]:
        """Queue many reads and writes of one data buffer each, as arrays (type, sector,
        buffer address and length, an int argument), under one lock and one kick decision
        (blk-mq's queue_rqs); `done(statuses, args)` runs for each batch of completions
        (interrupt thread). Returns (how many were queued, the error of the first that was
        not: 0, EAGAIN, EROFS or EIO); those after it were not tried. Headers, tables and
        ring entries are written for the batch with numpy operations (add_chains3)."""
        n = len(typs)
        q = self.queues[qid]
        if self.readonly and (typs == B.VIRTIO_BLK_T_OUT).any():
            k = int((typs == B.VIRTIO_BLK_T_OUT).argmax())
            done_k, err = (self.submit_batch(typs[:k], sectors[:k], addrs[:k], lens[:k], done,
                                             args[:k], qid) if k else (0, 0))
            return done_k, err or EROFS
        if self.frozen or q.dead:
            one = _one_of_batch(done)
            for i in range(n):
                err = self.submit(int(typs[i]), int(sectors[i]),
                                  ((int(addrs[i]), int(lens[i])),), one, int(args[i]), qid)
                if err:
                    return i, err
            return n, 0
        plugged = getattr(self._plug, "queues", None)
        lock = q.lock
        if not lock.acquire(False):
            _acquire_waiting(q)
        try:
            free = q.free
            k = min(n, len(free))
            if not k:
                return 0, EAGAIN
            reqs = free[-k:]
            del free[-k:]
            tags = np.fromiter(map(_TAG, reqs), np.intp, k)
            typs, sectors, addrs, lens, args = (typs[:k], sectors[:k], addrs[:k], lens[:k],
                                                args[:k])
            hdr = q.hdr_np
            hdr[tags, 0] = typs                 # type, and ioprio 0 in the upper half
            hdr[tags, 1] = sectors
            q.batch_cb[tags] = done
            q.batch_arg[tags] = args
            q.batch_addr[tags] = addrs
            q.batch_len[tags] = lens
            gpas = q.slot_gpa_np[tags]
            seg_addr = np.empty((k, 3), np.int64)
            seg_addr[:, 0] = gpas
            seg_addr[:, 1] = addrs
            seg_addr[:, 2] = gpas + 16
            seg_len = np.empty((k, 3), np.int64)
            seg_len[:, 0] = B.OUTHDR_SIZE
            seg_len[:, 1] = lens
            seg_len[:, 2] = 1
            n_out = np.where(typs == B.VIRTIO_BLK_T_OUT, 2, 1)
            vq = q.vq
            added, e = vq.add_chains3(seg_addr, seg_len, n_out, q.slots_np[tags])
            err = 0
            if added < k:
                q.batch_cb[tags[added:]] = None
                free.extend(reqs[added:])
                err = EAGAIN if e == ENOSPC else e
            if plugged is not None:
                plugged.add(q)
                kick = False
            else:
                kick = bool(added) and vq.kick_prepare()
        finally:
            lock.release()
        if kick:
            vq.notify()
        return added, err or (EAGAIN if k < n else 0)

    def read(self, sector: int, sgs: Sequence[Sg], callback: Callback, arg: Any = None,
             qid: int = 0) -> int:
        return self.submit(B.VIRTIO_BLK_T_IN, sector, sgs, callback, arg, qid)

    def write(self, sector: int, sgs: Sequence[Sg], callback: Callback, arg: Any = None,
              qid: int = 0) -> int:
        return self.submit(B.VIRTIO_BLK_T_OUT, sector, sgs, callback, arg, qid)

    def flush(self, callback: Callback, arg: Any = None, qid: int = 0) -> int:
        return self.submit(B.VIRTIO_BLK_T_FLUSH, 0, (), callback, arg, qid)

    def get_id(self, sg: Sg, callback: Callback, arg: Any = None, qid: int = 0) -> int:
        return self.submit(B.VIRTIO_BLK_T_GET_ID, 0, (sg,), callback, arg, qid)

    @contextmanager
    def plug(self):
        """blk_start_plug / blk_finish_plug: requests submitted inside are kicked once."""
        outer = getattr(self._plug, "queues", None)
        if outer is not None:
            yield
            return
        self._plug.queues = queues = set()
        try:
            yield
        finally:
            self._plug.queues = None
            for q in queues:
                self._kick(q)

    @staticmethod
    def _kick(q: BlkQueue) -> None:
        with q.lock:
            kick = q.vq.kick_prepare()
        if kick:
            q.vq.notify()

    def sync(self, typ: int, sector: int, sgs: Sequence[Sg], timeout: float = 10.0) -> int:
        """Submit one request and wait for its status (for setup and tests, not hot paths)."""
        done = threading.Event()
        result = [STATUS_PENDING]

        def cb(status: int, _arg: Any) -> None:
            result[0] = status
            done.set()

        deadline = time.monotonic() + timeout
        while True:
            err = self.submit(typ, sector, sgs, cb, None)
            if err != EAGAIN:
                break
            if time.monotonic() > deadline:
                return EAGAIN
            time.sleep(0.001)
        if err:
            return err
        if not done.wait(timeout):
            raise TimeoutError(f"{self.vdev.name}: request not completed in {timeout} s")
        return result[0]

    # ---- completion (virtblk_done) ---------------------------------------------------------------
    def _done(self, vq: Virtqueue, resumed: bool = False) -> None:
        """virtblk_done: disable callbacks, complete what was used, re-enable, re-check.

        Completions run under the queue's (re-entrant) lock, as in Linux; a completion
        callback may submit again at once (the slot it freed), and those submissions are
        plugged: one kick decision for the batch. Requests queued by submit_batch complete
        with one call of their batch callback per turn. After SLICE_NS the loop leaves the
        rest to the interrupt thread (callbacks still off) and is resumed from there once
        other devices' interrupts have run (`resumed`)."""
        q: BlkQueue = vq.priv
        lock = q.lock
        free = q.free
        get_bufs = vq.get_bufs
        hooks = self.completion_hooks
        poll_ns = self.poll_ns
        # resumed after its time slice: still within its poll window (the device is busy)
        poll_until = time.monotonic_ns() + poll_ns if resumed and poll_ns else 0
        plug = self._plug
        plug.queues = kicks = set()
        # At most a chunk of completions per hold of the lock: while the device keeps using
        # buffers (a slow DMA API, a fast device) draining "until empty" would never end,
        # and a submitter blocked on the lock would wait forever.
        chunk = max(1, min(COMPLETION_CHUNK, len(q.slots)))
        nslots = len(q.slots)
        waiting = q.waiting
        irqc = self.irqc
        slice_end = time.monotonic_ns() + SLICE_NS
        try:
            while True:
                n = 0
                with lock:
                    vq.disable_cb()
                    # what is used, at most `chunk` (one read of used->idx, a batch
                    # detach): the hooks then send the next requests at once, so the
                    # device has work while this side completes the next chunk
                    # (half of what is in flight at most: taking a whole window at once
                    # made the two sides take turns, each idle while the other worked)
                    reqs, _ = get_bufs(max(8, min(chunk, (nslots - len(free)) >> 1)))
                    n = k = len(reqs)
                    if k:
                        tags = np.fromiter(map(_TAG, reqs), np.intp, k)
                        bcbs = q.batch_cb[tags]
                        bcb = bcbs[0]
                        if bcb is not None and (k == 1 or (bcbs == bcb).all()):
                            # all from one submit_batch caller: one call for the lot
                            statuses = q.status_np[tags]
                            args = q.batch_arg[tags]
                            q.batch_cb[tags] = None
                            free.extend(reqs)
                            bcb(statuses, args)
                        else:
                            for req in reqs:
                                self._complete_one(q, req)
                    if n:
                        for hook in hooks:
                            hook()
                if n:
                    if kicks:
                        for kq in kicks:
                            self._kick(kq)
                        kicks.clear()
                    if waiting:
                        self._step_aside(q)
                    now = time.monotonic_ns()
                    if now >= slice_end and irqc is not None:
                        # Its time slice is up: the rest waits for the interrupts of other
                        # devices on this thread (NAPI's budget; callbacks stay off, as
                        # they do while NAPI is scheduled).
                        irqc.schedule(lambda: self._resume(q, vq))
                        return
                    if poll_ns:
                        poll_until = now + poll_ns
                    continue
                if poll_until and time.monotonic_ns() < poll_until and not vq.broken:
                    # yield at each turn of the poll: on a busy machine the host may be
                    # waiting for this CPU to produce what we poll for
                    os.sched_yield()
                    continue
                with lock:
                    if vq.enable_cb():
                        break
        finally:
            plug.queues = None
            for kq in kicks:
                self._kick(kq)

    def _resume(self, q: BlkQueue, vq: Virtqueue) -> None:
        """The completion loop again, after other devices' interrupts (see _done), unless
        the queue went away meanwhile (a reset, a suspend, removal)."""
        if q.vq is vq and not q.dead and any(x is q for x in self.queues):
            self._done(vq, resumed=True)

    @staticmethod
    def _complete_one(q: BlkQueue, req: BlkRequest) -> None:
        status = req.status[0]
        t = req.tag
        bcb = q.batch_cb[t]
        if bcb is not None:
            arg = q.batch_arg[t]
            q.batch_cb[t] = None
            q.free.append(req)
            bcb(np.array([status], np.uint8), np.array([arg], np.int64))
            return
        cb = req.callback
        arg = req.arg
        req.callback = req.arg = None
        q.free.append(req)
        cb(status, arg)

    @staticmethod
    def _step_aside(q: BlkQueue) -> None:
        """Let the submitters blocked on q.lock take it before the completion loop takes it
        again (it would win the race for it every time: Python's locks are not fair). The
        wait is bounded: a submitter counts as waiting until it has the lock and the GIL,
        which the interpreter hands over within its switch interval."""
        deadline = time.monotonic_ns() + STEP_ASIDE_NS
        while q.waiting and time.monotonic_ns() < deadline:
            os.sched_yield()            # releases the GIL and the CPU

    # ---- suspend and resume (virtblk_freeze / virtblk_restore) ----------------------------------
    def _hold(self, typ: int, sector: int, sgs: Sequence[Sg], callback: Callback, arg: Any,
              qid: int) -> int:
        with self._held_lock:
            if not self.frozen:         # restored meanwhile
                return self.submit(typ, sector, sgs, callback, arg, qid)
            self.held.append((typ, sector, sgs, callback, arg, qid))
        return 0

    def freeze(self, drain_s: float = 5.0) -> None:
        """Stop taking requests, let the device finish what it has (up to drain_s: a broken
        queue never will), reset it, take back what it did not use (to retry after restore),
        delete the queues."""
        for q in self.queues:
            with q.lock:
                self.frozen = True
        self.frozen = True
        deadline = time.monotonic() + drain_s
        while self.in_flight() and time.monotonic() < deadline \
                and not any(q.vq.broken for q in self.queues):
            time.sleep(0.001)
        self.vdev.reset_device()
        for q in self.queues:
            with q.lock:
                q.dead = True
                while (req := q.vq.detach_unused_buf()) is not None:
                    with self._held_lock:
                        self.held.append((*q.take_back(req), q.index))
                    self.retried += 1
                    q.free.append(req)
        self._delete_queues()

    def restore(self, timeout: float = 10.0) -> int:
        """Rebuild the queues (virtblk_probe's init again) and send what was held."""
        err = self.init()
        if err:
            return err
        with self._held_lock:
            self.frozen = False
            held, self.held = self.held, []
        deadline = time.monotonic() + timeout
        for i, (typ, sector, sgs, cb, arg, qid) in enumerate(held):
            qid = qid if qid < len(self.queues) else 0
            while (err := self.submit(typ, sector, sgs, cb, arg, qid)) == EAGAIN:
                if time.monotonic() > deadline:
                    for _t, _s, _g, cb2, arg2, _q in held[i:]:
                        cb2(B.VIRTIO_BLK_S_IOERR, arg2)
                    return -errno.ETIMEDOUT
                time.sleep(0.0005)
            if err:
                cb(B.VIRTIO_BLK_S_IOERR, arg)
        return 0

    def reset_queue(self, qid: int) -> tuple[int, int]:
        """Reset one queue (VIRTIO_F_RING_RESET) and send again what it had not used:
        (0 or -errno, requests retried). The caller keeps interrupts off (the queue's
        handler must not run meanwhile)."""
        q = self.queues[qid]
        back: list[BlkRequest] = []
        with q.lock:
            err = virtqueue_reset(q.vq, lambda _vq, req: back.append(req))
            retry = []
            for req in back:
                retry.append(q.take_back(req))
                q.free.append(req)
        for typ, sector, sgs, cb, arg in retry:
            while (e := self.submit(typ, sector, sgs, cb, arg, qid)) == EAGAIN:
                time.sleep(0.0005)
            if e:
                cb(B.VIRTIO_BLK_S_IOERR, arg)
        self.retried += len(retry)
        return err, len(retry)

    # ---- teardown (virtblk_remove) ---------------------------------------------------------------
    def in_flight(self) -> int:
        return sum(len(q.slots) - len(q.free) for q in self.queues)

    def remove(self) -> None:
        """Reset the device (its queues stop), fail what it never used, delete the queues."""
        vdev = self.vdev
        self.removed = True
        vdev.reset_device()
        failed = []
        for q in self.queues:
            with q.lock:
                while (req := q.vq.detach_unused_buf()) is not None:
                    _typ, _sector, _sgs, cb, arg = q.take_back(req)
                    failed.append((cb, arg))
                    q.free.append(req)
        for cb, arg in failed:
            if cb is not None:
                cb(B.VIRTIO_BLK_S_IOERR, arg)
        with self._held_lock:
            held, self.held = self.held, []
        for _t, _s, _g, cb, arg, _q in held:
            cb(B.VIRTIO_BLK_S_IOERR, arg)
        self._delete_queues()

    def _delete_queues(self) -> None:
        vdev = self.vdev
        vdev.config.del_vqs(vdev)
        for q in self.queues:
            if q.slots_gpa:
                for r in q.slots:
                    r.hdr.release()
                    r.status.release()
                q.hdr_np = q.status_np = np.zeros(0)     # exports of the slots' memory
                self.dma.free(q.slots_gpa)
        self.queues = []

    def update_capacity(self) -> None:
        """virtblk_update_capacity: re-read capacity after a config change."""
        cap = self.vdev.cread(B.CFG_CAPACITY, 8)
        if cap != self.capacity:
            log.info("%s: capacity changed from %d to %d sectors", self.vdev.name,
                     self.capacity, cap)
            self.capacity = cap
            for fn in self.capacity_listeners:
                fn(cap)


class BlkDriver(VirtioDriver):
    """The virtio_blk driver registered on the bus."""

    name = "virtio_blk"
    id_table = ((ids.VIRTIO_ID_BLOCK, ids.VIRTIO_DEV_ANY_ID),)
    feature_table = (B.VIRTIO_BLK_F_SEG_MAX, B.VIRTIO_BLK_F_RO, B.VIRTIO_BLK_F_BLK_SIZE,
                     B.VIRTIO_BLK_F_FLUSH, B.VIRTIO_BLK_F_TOPOLOGY, B.VIRTIO_BLK_F_MQ)

    def __init__(self, dma: DmaMemory, poll_us: Callable[[str], int] | None = None) -> None:
        self.dma = dma
        self.poll_us = poll_us or (lambda name: 0)

    def validate(self, vdev: VirtioDevice) -> int:
        """virtblk_validate: this driver needs config space access."""
        if not hasattr(vdev.config, "get"):
            return EINVAL
        return 0

    def probe(self, vdev: VirtioDevice) -> int:
        blk = VirtioBlk(vdev, self.dma, self.poll_us(vdev.name))
        vdev.priv = blk
        err = blk.init()
        if err:
            vdev.config.del_vqs(vdev)
            vdev.priv = None
        return err

    def remove(self, vdev: VirtioDevice) -> None:
        blk: VirtioBlk | None = vdev.priv
        if blk is not None:
            blk.remove()
        vdev.priv = None

    def config_changed(self, vdev: VirtioDevice) -> None:
        blk: VirtioBlk | None = vdev.priv
        if blk is not None and not vdev.needs_reset:
            blk.update_capacity()

    def freeze(self, vdev: VirtioDevice) -> int:
        blk: VirtioBlk | None = vdev.priv
        if blk is not None:
            blk.freeze()
        return 0

    def restore(self, vdev: VirtioDevice) -> int:
        blk: VirtioBlk | None = vdev.priv
        return blk.restore() if blk is not None else 0

