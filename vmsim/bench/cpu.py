"""How much real parallelism two processes get right now: 2.0 is two full CPUs, 1.0 means they
share one (a busy neighbour on a shared machine). Spin-polling rings need about 2.0, so every
benchmark result is recorded with this figure."""

import multiprocessing as mp
import statistics
import time

_CTX = mp.get_context("fork")


def _count_for(seconds: float) -> int:
    end = time.perf_counter() + seconds
    n = 0
    while time.perf_counter() < end:
        n += 1
    return n


def _child(q, seconds: float) -> None:
    q.put(_count_for(seconds))


def parallelism(seconds: float = 0.3, rounds: int = 3) -> float:
    """The median over `rounds` of (work of two processes together) / (work of one alone)."""
    out = []
    for _ in range(rounds):
        alone = _count_for(seconds)
        q = _CTX.Queue()
        ps = [_CTX.Process(target=_child, args=(q, seconds)) for _ in range(2)]
        for p in ps:
            p.start()
        pair = q.get() + q.get()
        for p in ps:
            p.join()
        out.append(pair / max(1, alone))
    return round(statistics.median(out), 2)
