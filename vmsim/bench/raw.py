"""The raw virtqueue between two processes, with nothing else: the guest's virtqueue
(add_sgs, kick, get_buf) in this process, the host's device queue (pop_batch, fill_batch,
need_notify) in a forked one, one-descriptor buffers, `in_flight` of them, a device that
returns each buffer at once. Notifications go through eventfds, suppression by event index.
And the baseline it is measured against: the same request/response pairs over
multiprocessing.Pipe with msgpack.

This is the ring's own cost, without a transport's exits, a device model or a workload."""

from __future__ import annotations

import multiprocessing as mp
import random
import select
import time
from os import sched_yield
from typing import Any

import msgpack
import numpy as np

from vmsim.abi import features as F
from vmsim.guest.memory import DmaMemory, GuestRAM
from vmsim.guest.virtio.vring import vring_create_virtqueue
from vmsim.host.memory import GuestMemory
from vmsim.host.virtio.queue_packed import PackedQueue
from vmsim.host.virtio.queue_split import SplitQueue
from vmsim.machine import runname, shm
from vmsim.machine.eventfd import EventFd

_CTX = mp.get_context("fork")
RAM = 8 << 20
BASE = 0x4000_0000
SPIN_NS = 50_000          # each side polls this long for more before it sleeps
# The spin yields the CPU at each turn: when the two processes share one CPU (a busy
# machine), a spinning side would otherwise keep the other from making what it waits for;
# with nothing else runnable the yield returns at once. (Measured: batched split 5.7x ->
# 26-32x Pipe with two processes on ~1.3 CPUs.)
YIELD = True


def _device(name: str, ring: str, num: int, addrs: tuple[int, int, int], kick: EventFd,
            call: EventFd, stop_at: int, pause_p: float, seed: int, batched: bool) -> None:
    mem = GuestMemory(shm.open_map(name), BASE)
    cls = PackedQueue if ring == "packed" else SplitQueue
    q = cls(mem, num, *addrs, event_idx=True, indirect=False)
    stop = mem.mv[stop_at:stop_at + 16].cast("Q")     # [stop, lost wake-ups seen here]
    rng = random.Random(seed)
    lost = 0
    pop, fill, need = q.pop_batch, q.fill_batch, q.need_notify
    pop_bufs, push_used = q.pop_bufs, q.push_used
    zeros = [0] * num
    kfd = kick.fileno()
    p = select.poll()
    p.register(kfd, select.POLLIN)
    mono = time.monotonic_ns
    idle_since = 0
    q.disable_notify()
    while not stop[0]:
        if batched:
            # the batch path: every available buffer as arrays, returned with one store
            b = pop_bufs()
            if b is None:                 # not a one-descriptor buffer: the general path
                chains = pop(1)
                fill(chains, zeros[:len(chains)])
                n = len(chains)
            else:
                n = len(b.heads)
                if n:
                    if pause_p and rng.random() < pause_p:
                        time.sleep(rng.random() * 2e-4)     # the device is descheduled
                    push_used(b.heads, 0)
        else:
            chains = pop()
            n = len(chains)
            if n:
                if pause_p and rng.random() < pause_p:
                    time.sleep(rng.random() * 2e-4)     # the device is descheduled
                fill(chains, zeros[:n])
        if n:
            if need():
                call.signal()
            idle_since = 0
            continue
        now = mono()
        if not idle_since:
            idle_since = now
            continue
        if now - idle_since < SPIN_NS:
            if YIELD:
                sched_yield()
            continue
        # Sleep: ask for a kick, re-check (the spec's race), then wait.
        if q.enable_notify():
            q.disable_notify()
            continue
        if not p.poll(100) and q.has_work() and not stop[0]:
            lost += 1          # slept through work whose kick never came
        kick.consume()
        q.disable_notify()
        idle_since = 0
    stop[1] = lost
    stop.release()
    q.release()
    mem.release()


def run_raw(ring: str, seconds: float, in_flight: int = 64, num: int = 256,
            pause_p: float = 0.0, seed: int = 1, batched: bool = False) -> dict[str, Any]:
    """Buffers per second through the raw ring, and notifications per buffer. With pause_p,
    each side pauses (up to 0.2 ms) before that share of its batches, and counts the times
    it slept through work it was not woken for (lost wake-ups: there must be none).
    batched: both sides use the batch paths (guest add_bufs / get_bufs, host pop_bufs /
    push_used) instead of one buffer per call."""
    name = f"/{runname.new_run_name()}-rawbench"
    shm.create(name, RAM)
    try:
        ram = GuestRAM(shm.open_map(name), BASE)
        dma = DmaMemory(ram)
        kick, call = EventFd(), EventFd()
        feats = (1 << F.VIRTIO_F_VERSION_1) | (1 << F.VIRTIO_RING_F_EVENT_IDX)
        if ring == "packed":
            feats |= 1 << F.VIRTIO_F_RING_PACKED

        def notify(_vq: Any) -> bool:
            kick.signal()
            return True

        vq = vring_create_virtqueue(0, num, 4096, dma, feats, notify, None, "raw")
        addrs = (vq.desc_addr, vq.avail_addr, vq.used_addr)
        stop_gpa, _ = dma.alloc(16, 8)
        stop = ram.view(stop_gpa, 16).cast("Q")
        stop[0] = stop[1] = 0
        rng = random.Random(seed + 1)
        lost = 0
        bufs = [dma.alloc(64, 64)[0] for _ in range(in_flight)]
        sgs = [[(gpa, 64)] for gpa in bufs]
        buf_np = np.array(bufs, np.uint64)
        child = _CTX.Process(target=_device, args=(name, vq.ring, vq.num, addrs, kick, call,
                                                  stop_gpa - BASE, pause_p, seed, batched),
                             daemon=True)
        child.start()
        add, kick_prepare, get_buf = vq.add_sgs, vq.kick_prepare, vq.get_buf
        none: list = []
        if batched:
            # a buffer's token is its address: what comes back is what goes out again
            add_bufs, get_bufs = vq.add_bufs, vq.get_bufs
            # Completions taken per pass, a budget as NAPI's: on the split ring half the
            # window lets the device start on the first half while the driver re-adds the
            # second, so the two processes overlap instead of taking turns (measured
            # 3.35-3.5 -> 3.62-3.69 M buffers/s; a quarter is worse, per-batch costs then
            # dominate; the packed ring showed no gain).
            budget = max(1, in_flight // 2) if ring == "split" else 1 << 16
            fromiter, u64, ndarray = np.fromiter, np.uint64, np.ndarray
            add_bufs(buf_np, 64, bufs, True)
        else:
            for i in range(in_flight):
                add(none, sgs[i], i)
        if kick_prepare():
            vq.notify()
        cfd = call.fileno()
        p = select.poll()
        p.register(cfd, select.POLLIN)
        mono = time.monotonic_ns
        done = 0
        t0 = mono()
        end = t0 + int(seconds * 1e9)
        idle_since = 0
        irqs = 0
        vq.disable_cb()
        while True:
            if batched:
                # every used buffer at once, and all of them added again with one call
                toks, _lens = get_bufs(budget)
                n = len(toks)
                if n:
                    # (an object array of ints converts in one call, a list by iteration)
                    add_bufs(toks.astype(u64) if type(toks) is ndarray else fromiter(toks, u64, n),
                             64, toks, True)
            else:
                n = 0
                while (r := get_buf()) is not None:
                    tok = r[0]
                    add(none, sgs[tok], tok)
                    n += 1
            if n:
                done += n
                if pause_p and rng.random() < pause_p:
                    time.sleep(rng.random() * 2e-4)     # the driver is descheduled
                if kick_prepare():
                    vq.notify()
                idle_since = 0
                if done & 0x3FF < n and mono() >= end:
                    break
                continue
            now = mono()
            if now >= end:
                break
            if not idle_since:
                idle_since = now
                continue
            if now - idle_since < SPIN_NS:
                if YIELD:
                    sched_yield()
                continue
            if not vq.enable_cb():          # something came in meanwhile
                vq.disable_cb()
                continue
            if not p.poll(100) and vq.more_used():
                lost += 1      # slept through buffers whose interrupt never came
            irqs += call.consume()
            vq.disable_cb()
            idle_since = 0
        irqs += call.consume()
        elapsed = (mono() - t0) / 1e9
        vq.publish_stats()
        stop[0] = 1
        kick.signal()
        child.join(5)
        if child.is_alive():
            child.kill()
            child.join()
        lost_device = int(stop[1])
        stop.release()
        if child.exitcode != 0:
            raise RuntimeError(f"the raw bench's device process failed (exit {child.exitcode})")
        return {"requests_per_s": done / elapsed, "ops": done,
                "kicks_per_request": vq.n_kicks / max(1, done),
                # interrupts the device sent: the call eventfd's count
                "interrupts_per_request": irqs / max(1, done),
                "lost_wakeups": {"driver": lost, "device": lost_device}}
    finally:
        try:
            ram.release()
        except Exception:
            pass
        shm.unlink(name)


def _echo(conn: Any) -> None:
    """The Pipe "device": decode each request, answer it (stream_throughput.py's mp_pipe)."""
    recv, send = conn.recv_bytes, conn.send_bytes
    packb, unpackb = msgpack.packb, msgpack.unpackb
    while True:
        m = unpackb(recv())
        if m is None:
            break
        send(packb([m[0], 0]))
    conn.close()


def run_pipe_raw(seconds: float, in_flight: int = 64) -> float:
    """Request/response pairs per second over multiprocessing.Pipe with msgpack: the issue's
    baseline (../shared/bench/baselines/stream_throughput.py, mp_pipe reqresp): one message
    per request ([seq, 64-byte payload]) and one per response ([seq, status]), each packed
    and unpacked, `in_flight` requests outstanding."""
    a, b = _CTX.Pipe()
    child = _CTX.Process(target=_echo, args=(b,), daemon=True)
    child.start()
    b.close()
    packb, unpackb = msgpack.packb, msgpack.unpackb
    send, recv = a.send_bytes, a.recv_bytes
    payload = bytes(range(64))
    for i in range(in_flight):
        send(packb([i, payload]))
    done = 0
    t0 = time.monotonic()
    end = t0 + seconds
    while True:
        unpackb(recv())
        done += 1
        send(packb([done + in_flight, payload]))
        if done & 0x3FF == 0 and time.monotonic() >= end:
            break
    elapsed = time.monotonic() - t0
    for _ in range(in_flight):
        recv()
    send(packb(None))
    child.join(5)
    a.close()
    return done / elapsed
