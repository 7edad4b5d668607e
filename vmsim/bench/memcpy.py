"""This machine's single-process memcpy bandwidth, measured as
../shared/bench/baselines/bulk_throughput.py measures it (numpy.copyto between two 64 MiB
arrays, the median of 10 copies): the limit for any copy-based transfer, and the anchor of
the 64 KiB sequential-read case."""

import statistics
import time

import numpy as np


def memcpy_mb_s(nbytes: int = 64 << 20, reps: int = 10) -> float:
    """MB/s (1e6 bytes) of payload copied."""
    src = np.ones(nbytes, np.uint8)
    dst = np.empty_like(src)
    np.copyto(dst, src)                                  # fault the pages in
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        np.copyto(dst, src)
        times.append(time.perf_counter() - t)
    return nbytes / statistics.median(times) / 1e6
