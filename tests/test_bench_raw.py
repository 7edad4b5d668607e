"""The raw-ring benchmark: guest virtqueue and host device queue in two real processes, and
its Pipe baseline. Checked for working, not timed."""
import os

import pytest

from vmsim.bench.raw import run_pipe_raw, run_raw


@pytest.mark.timeout(60)
@pytest.mark.parametrize("batched", [False, True], ids=["scalar", "batched"])
@pytest.mark.parametrize("ring", ["split", "packed"])
def test_raw_ring_moves_buffers_and_suppresses_notifications(ring, batched):
    before = set(os.listdir("/dev/shm"))
    r = run_raw(ring, 0.5, in_flight=16, num=64, batched=batched)
    assert r["ops"] > 1000
    # under steady load, both sides poll with notifications suppressed
    assert r["kicks_per_request"] < 0.5 and r["interrupts_per_request"] < 0.5
    # (only this bench's objects: other vmsim runs on the machine come and go meanwhile)
    assert {n for n in set(os.listdir("/dev/shm")) - before if "rawbench" in n} == set()


@pytest.mark.timeout(30)
def test_pipe_raw_baseline():
    assert run_pipe_raw(0.3, in_flight=8) > 100


@pytest.mark.timeout(120)
@pytest.mark.parametrize("batched", [False, True], ids=["scalar", "batched"])
@pytest.mark.parametrize("ring", ["split", "packed"])
def test_no_lost_wakeup_with_random_pauses(ring, batched):
    """Both sides pause at random (as a descheduled vCPU or VMM thread would), so each goes
    to sleep thousands of times with the other mid-batch; neither may ever sleep through
    work it was not woken for (the event-index re-check after enabling notifications).
    VMSIM_WAKEUP_SECONDS makes it run longer (millions of buffers)."""
    secs = float(os.environ.get("VMSIM_WAKEUP_SECONDS", "2"))
    r = run_raw(ring, secs, pause_p=0.05, seed=3, batched=batched)
    assert r["lost_wakeups"] == {"driver": 0, "device": 0}, r
    assert r["ops"] > (20_000 if batched else 50_000)
    # they did sleep and wake: interrupts and kicks were needed
    assert r["interrupts_per_request"] > 0 and r["kicks_per_request"] > 0
