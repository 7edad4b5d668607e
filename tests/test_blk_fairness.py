"""The virtio-blk driver's completion loop must let the workload thread submit.

Behind the IOMMU in strict mode every map and unmap of a request's buffers is a trapped
IOMMU request, so completing and resubmitting a batch takes long enough for the device to
use more meanwhile. The completion loop (interrupt thread) completes and resubmits under the
queue lock; if it kept taking the lock for the next batch, the workload thread's first
submissions (its window filled from its own thread) would wait for the lock forever and the
run would stall with a few requests in flight. These whole runs keep 8 requests in flight
(read and write, split and packed rings) and check that both workloads make progress and
that every slot of the window was issued."""

import json

import pytest

from tests.test_run import run_vmsim, write_yaml

TOPO = """
name: blk-fairness
vms:
  vm0:
    memory: 32M
    devices:
      vda: {{type: blk, transport: {transport}, ring: {ring}, backend: file, size: 8M,
             iommu: strict}}
    workloads:
      a: {{type: {workload}, device: vda, in_flight: 8{extra}}}
"""


@pytest.mark.multiprocess
@pytest.mark.timeout(150)
@pytest.mark.parametrize("transport, ring, workload", [
    ("mmio", "split", "blk-verify"), ("pci", "packed", "blk-verify"),
    ("pci", "split", "blk-bench")])
def test_strict_iommu_with_eight_in_flight_makes_progress(tmp_path, transport, ring, workload):
    extra = ", write_pct: 50, flush_every: 32" if workload == "blk-verify" else \
        ", op: mixed, block_size: 4096"
    cfg = write_yaml(tmp_path, TOPO.format(transport=transport, ring=ring, workload=workload,
                                           extra=extra))
    js = tmp_path / "summary.json"
    rc, launch = run_vmsim(tmp_path, "run", str(cfg), "--duration", "3", "--json", str(js),
                           timeout=120)
    d = json.loads(js.read_text())
    assert rc == 0 and d["outcome"] == "ok" and not d["problems"], (d["problems"],
                                                                   launch.output())
    dev = d["vms"]["vm0"]["devices"]["vda"]
    assert "ACCESS_PLATFORM" in dev["features"] and dev["errors"] == []
    w = d["workloads"]["vm0.a"]
    assert w["errors"] == 0, w
    # a stalled run completes a handful of requests in 3 s; a working one thousands
    assert w["ops"] > 500, w
