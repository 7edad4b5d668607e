"""Scenarios: every file in scenarios/ is a test (a real `vmsim scenario` run that must pass
and leave nothing behind); and the engine itself: a wrong expectation fails, a mistake in a
file is one readable line, conditions and lookups behave."""
import json
from pathlib import Path

import pytest

from tests.test_run import run_vmsim, write_yaml
from vmsim.scenario import conditions as C

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = sorted((ROOT / "scenarios").glob("*.yaml"))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("path", LIBRARY, ids=[p.stem for p in LIBRARY])
def test_scenario_library(tmp_path, path):
    js = tmp_path / "report.json"
    rc, launch = run_vmsim(tmp_path, "scenario", str(path), "--json", str(js), timeout=100)
    assert rc == 0, launch.output()
    report = json.loads(js.read_text())
    assert report["passed"] == 1 and report["failed"] == 0
    steps = report["scenarios"][0]["steps"]
    assert steps and all(s["ok"] for s in steps), steps
    assert "PASS " + report["scenarios"][0]["name"] in launch.out


def test_library_covers_faults():
    texts = [p.read_text().lower() for p in LIBRARY]
    assert len(LIBRARY) >= 12
    assert sum("kill" in t for t in texts) >= 2
    assert sum(any(w in t for w in ("corrupt", "rogue", "malformed")) for t in texts) >= 4


WRONG = """
name: wrong
topology:
  vms:
    vm0:
      memory: 32M
      devices:
        vda: {type: blk, transport: mmio, backend: memory, size: 4M}
steps:
  - guest: {vm: vm0, op: blk, device: vda, request: write, sector: 0, pattern: 1}
    expect: {status: IOERR}
  - guest: {vm: vm0, op: query}
"""


@pytest.mark.timeout(60)
def test_a_wrong_expectation_fails_the_scenario(tmp_path):
    sc = write_yaml(tmp_path, WRONG, name="wrong.yaml")
    js = tmp_path / "r.json"
    rc, launch = run_vmsim(tmp_path, "scenario", str(sc), "--json", str(js), timeout=50)
    assert rc == 1, launch.output()
    steps = json.loads(js.read_text())["scenarios"][0]["steps"]
    assert steps[0]["ok"] is False and "status = 'OK', expected 'IOERR'" in steps[0]["detail"]
    assert steps[1]["ok"] is None                  # not run after a failure
    assert "FAIL step 1" in launch.out and "FAIL wrong" in launch.out


UNTIL = """
name: never
topology:
  vms:
    vm0:
      memory: 32M
      devices:
        vda: {type: blk, transport: mmio, backend: memory, size: 4M}
steps:
  - until: vm0.vda.q0.used >= 1
    timeout: 0.5
"""


@pytest.mark.timeout(60)
def test_an_until_that_never_holds_times_out(tmp_path):
    sc = write_yaml(tmp_path, UNTIL, name="never.yaml")
    rc, launch = run_vmsim(tmp_path, "scenario", str(sc), timeout=50)
    assert rc == 1
    assert "not within 0.5 s (vm0.vda.q0.used = 0)" in launch.out


@pytest.mark.parametrize("text, err", [
    ("name: x\ntopology: {vms: {a: {devices: {}}}}\nsteps: [{sleep: 1, until: a}]\n",
     "exactly one of"),
    ("name: x\ntopology: {vms: {a: {devices: {}}}}\nsteps: [{guest: {vm: a}}]\n",
     "'op' key is required"),
    ("name: x\ntopology: nosuch.yaml\nsteps: [{sleep: 1}]\n", "nosuch.yaml: no such file"),
    ("name: x\ntopology: {vms: {a: {devices: {d: {type: blk, queue_size: 3}}}}}\n"
     "steps: [{sleep: 1}]\n", "queue_size"),
    ("name: x\ntopology: {vms: {}}\nsteps: []\n", "steps"),
    ("- 1\n", "expected a mapping"),
])
def test_scenario_file_mistakes_are_one_line(tmp_path, text, err):
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    rc, launch = run_vmsim(tmp_path, "scenario", str(p), timeout=30)
    assert rc == 2
    lines = launch.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vmsim: scenario error: ") and err in lines[0]


def test_conditions():
    parts = C.parse_condition("a.b >= 3 and c == 0")
    assert parts == [("a.b", ">=", 3), ("c", "==", 0)]
    vals = {"a.b": 5, "c": 1}
    ok, seen = C.holds(parts, vals.__getitem__)
    assert not ok and seen == "a.b = 5, c = 1"
    vals["c"] = 0
    assert C.holds(parts, vals.__getitem__)[0]
    with pytest.raises(C.ConditionError):
        C.parse_condition("a.b => 3")


def test_lookup_and_matches():
    data = {"workloads": {"vm0.verify": {"errors": 0}}, "devices": {"vda": {"q": [4, 5]}}}
    assert C.lookup(data, "workloads.vm0.verify.errors") == 0
    assert C.lookup(data, "devices.vda.q.1") == 5
    with pytest.raises(KeyError):
        C.lookup(data, "devices.vdb")
    assert C.matches(3, ">= 2") and not C.matches(1, ">= 2")
    assert C.matches("ACK|DRIVER_OK", "~ DRIVER_OK") and C.matches(["A", "B"], "has B")
    assert C.matches(["A"], "not has B") and not C.matches({"vdb": 1}, "not has vdb")
    assert C.check_expectations({"problems": ["host x killed"]}, {"problems": ["host"]}) == []
    assert C.check_expectations({"problems": []}, {"problems": ["host"]})
