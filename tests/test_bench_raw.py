"""The raw-ring benchmark: guest virtqueue and host device queue in two real processes, and
its Pipe baseline. Checked for working, not timed."""
import os

import pytest

from vmsim.bench.raw import run_pipe_raw, run_raw


@pytest.mark.timeout(60)
@pytest.mark.parametrize("ring", ["split", "packed"])
def test_raw_ring_moves_buffers_and_suppresses_notifications(ring):
    before = set(os.listdir("/dev/shm"))
    r = run_raw(ring, 0.5, in_flight=16, num=64)
    assert r["ops"] > 1000
    # under steady load, both sides poll with notifications suppressed
    assert r["kicks_per_request"] < 0.5 and r["interrupts_per_request"] < 0.5
    assert set(os.listdir("/dev/shm")) - before == set()


@pytest.mark.timeout(30)
def test_pipe_raw_baseline():
    assert run_pipe_raw(0.3, in_flight=8) > 100
