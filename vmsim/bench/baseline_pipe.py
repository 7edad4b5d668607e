"""The baseline: the same virtio-blk-like requests between two processes over
multiprocessing.Pipe with msgpack, as ../shared/bench/baselines/stream_throughput.py measures a
Pipe (one message per request and per response, a window of requests in flight).

A request is [seq, type, sector] (+ the data for a write); the "device" process keeps the disk
in memory and answers [seq, status] (+ the data for a read)."""

import multiprocessing as mp
import random
import time

import msgpack

_CTX = mp.get_context("fork")
T_IN, T_OUT = 0, 1


def _device(conn, disk_bytes: int, block: int) -> None:
    disk = memoryview(bytearray(disk_bytes))
    packb, unpackb = msgpack.packb, msgpack.unpackb
    recv, send = conn.recv_bytes, conn.send_bytes
    while True:
        m = unpackb(recv())
        if m is None:
            break
        seq, typ, sector = m[0], m[1], m[2]
        off = sector * 512
        if typ == T_IN:
            send(packb([seq, 0, disk[off:off + block]]))
        else:
            disk[off:off + block] = m[3]
            send(packb([seq, 0]))
    conn.close()


def run_pipe_blk(op: str, seconds: float, block: int = 4096, in_flight: int = 64,
                 disk_bytes: int = 64 << 20, seed: int = 1) -> float:
    """Requests per second completed over the Pipe for `seconds` (op: read, write, mixed)."""
    a, b = _CTX.Pipe()
    p = _CTX.Process(target=_device, args=(b, disk_bytes, block), daemon=True)
    p.start()
    b.close()
    packb, unpackb = msgpack.packb, msgpack.unpackb
    rng = random.Random(seed)
    nblocks = disk_bytes // block
    spb = block // 512
    buf = bytearray(block)
    kinds = {"read": (T_IN,), "write": (T_OUT,), "mixed": (T_IN, T_OUT)}[op]
    send, recv = a.send_bytes, a.recv_bytes

    def submit(seq: int) -> None:
        typ = kinds[rng.randrange(len(kinds))]
        sector = rng.randrange(nblocks) * spb
        if typ == T_IN:
            send(packb([seq, typ, sector]))
        else:
            send(packb([seq, typ, sector, bytes(buf)]))

    try:
        for seq in range(in_flight):
            submit(seq)
        done = 0
        outstanding = in_flight
        t0 = time.perf_counter()
        end = t0 + seconds
        while outstanding:
            r = unpackb(recv())
            outstanding -= 1
            done += 1
            if len(r) > 2:
                buf[:] = r[2]
            if time.perf_counter() < end:
                submit(done + in_flight)
                outstanding += 1
        elapsed = time.perf_counter() - t0
        send(packb(None))
    finally:
        p.join(timeout=5)
        if p.is_alive():
            p.kill()
        a.close()
    return done / elapsed
