"""Crash safety: whatever process dies, whenever it dies, the run ends with nothing left in
/dev/shm and no process running, and what a guest saw flushed is on disk.

The kill test runs many times with random victims at random moments, including during
start-up and shutdown (VMSIM_CRASH_ROUNDS raises the count for a longer soak)."""
import os
import random
import signal
import time
from pathlib import Path

import pytest

from tests.test_run import Launch, write_yaml

ROUNDS = int(os.environ.get("VMSIM_CRASH_ROUNDS", "8"))

TOPO = """
name: crash
duration: 2.5
switches: {lan0: {}}
vms:
  vm0:
    memory: 32M
    devices:
      vda: {type: blk, transport: pci, backend: file, size: 8M}
      eth0: {type: net, transport: mmio, backend: {switch: lan0}}
    workloads:
      verify: {type: blk-verify, device: vda, in_flight: 8, flush_every: 8}
      ping: {type: net-ping, device: eth0, peer: vm1.eth0}
  vm1:
    memory: 32M
    devices:
      vda: {type: blk, transport: ccw, backend: memory, size: 4M}
      eth0: {type: net, transport: pci-legacy, backend: {switch: lan0}}
    workloads:
      verify: {type: blk-verify, device: vda, in_flight: 8}
      echo: {type: net-echo, device: eth0}
"""


@pytest.mark.timeout(60 + 25 * ROUNDS)
def test_random_kills_leave_nothing_behind(tmp_path):
    rng = random.Random(int(os.environ.get("VMSIM_CRASH_SEED", "1")))
    cfg = write_yaml(tmp_path, TOPO)
    outcomes = []
    for r in range(ROUNDS):
        d = tmp_path / f"round{r}"
        d.mkdir()
        launch = Launch(d, "run", str(cfg), "-q", name=f"round{r}")
        try:
            victim_kind = rng.choice(["vmsim.host", "vmsim.guest", "vmsim.guest", "launcher"])
            at = rng.uniform(0.05, 3.0)       # start-up, the run, or shutdown
            deadline = time.monotonic() + at
            while time.monotonic() < deadline and launch.p.poll() is None:
                launch.sample()
                time.sleep(0.01)
            victim = None
            if victim_kind == "launcher":
                if launch.p.poll() is None:
                    victim = launch.pid
                    os.kill(victim, signal.SIGKILL)
            else:
                pids = launch.children(victim_kind)
                if pids:
                    victim = rng.choice(pids)
                    try:
                        os.kill(victim, signal.SIGKILL)
                    except ProcessLookupError:
                        victim = None
            rc = launch.wait(30)
            if victim_kind == "launcher" and victim is not None:
                # nobody is left to clean up after a killed launcher: its children follow it
                # (they die with their parent) and `vmsim clean` sweeps its objects
                from tests.test_run import run_vmsim
                rc2, _ = run_vmsim(d, "clean", name="clean")
                assert rc2 == 0
            launch.assert_clean(timeout=5)
            outcomes.append((victim_kind, round(at, 2), victim is not None, rc))
        finally:
            launch.close()
    # the kills landed (most rounds had a victim to kill)
    assert sum(1 for *_, hit, _rc in outcomes if hit) >= ROUNDS // 2, outcomes


FLUSHED = """
name: flushed
topology:
  vms:
    vm0:
      memory: 32M
      devices:
        vda: {{type: blk, transport: mmio, backend: file, path: {img}, size: 4M}}
steps:
  - guest: {{vm: vm0, op: blk, device: vda, request: write, sector: 2048, sectors: 8,
             pattern: 0x3c}}
    expect: {{status: OK}}
  - guest: {{vm: vm0, op: blk, device: vda, request: flush}}
    expect: {{status: OK}}
  - kill: host
  - until: vm0.alive == 0
    timeout: 1.5
expect:
  outcome: failed
  problems: ["host .*SIGKILL"]
"""


@pytest.mark.timeout(60)
def test_flushed_data_survives_a_host_kill(tmp_path):
    """A write the guest saw completed and flushed is in the image after SIGKILL of the
    host (the device wrote it with pwritev and fsync'd it before answering the flush)."""
    from tests.test_run import run_vmsim
    from vmsim.guest.ops import pattern_bytes
    img = tmp_path / "disk.img"
    sc = write_yaml(tmp_path, FLUSHED.format(img=img), name="flushed.yaml")
    rc, launch = run_vmsim(tmp_path, "scenario", str(sc), timeout=50)
    assert rc == 0, launch.output()
    data = Path(img).read_bytes()[2048 * 512:2056 * 512]
    assert data == pattern_bytes(0x3C, 2048, 8 * 512)
