"""Topology validation (vmsim.launcher.topology) and the CLI's handling of a bad config.

Every error is one line naming the file, the key path and what was expected; the CLI prints it
as one "vmsim: config error:" line on stderr, exits 2, and leaves nothing behind.
"""

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vmsim.abi import blk as B
from vmsim.abi import features as F
from vmsim.launcher.topology import (
    TopologyError,
    load_topology,
    load_topology_file,
    parse_size,
)

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
SRC = "topo.yaml"

BASE = {
    "name": "t",
    "vms": {
        "vm0": {
            "memory": "64M",
            "devices": {"vda": {"type": "blk", "backend": "memory", "size": "16M"}},
            "workloads": {"verify": {"type": "blk-verify", "device": "vda"}},
        },
    },
}


def topo(**edits) -> dict:
    """BASE with edits given as dotted paths: topo(**{"vms.vm0.memory": "1G"}); a value of
    DELETE removes the key."""
    data = copy.deepcopy(BASE)
    for path, value in edits.items():
        *parents, last = path.split(".")
        node = data
        for p in parents:
            node = node.setdefault(p, {})
        if value is DELETE:
            del node[last]
        else:
            node[last] = value
    return data


DELETE = object()
DEV = "vms.vm0.devices.vda"


def error_of(data, source: str = SRC) -> str:
    with pytest.raises(TopologyError) as exc:
        load_topology(data, source)
    msg = str(exc.value)
    assert "\n" not in msg, f"not one line: {msg!r}"
    assert msg.startswith(f"{source}: "), msg
    return msg


# ---- valid topologies ----------------------------------------------------------------------------
def test_base_topology_is_valid_and_defaults_fill_in():
    t = load_topology(BASE, SRC)
    dev = t.vms["vm0"].devices["vda"]
    assert dev.size == 16 << 20 and t.vms["vm0"].memory == 64 << 20
    assert (dev.transport, dev.ring, dev.queue_size, dev.num_queues) == ("mmio", "split", 256, 1)
    assert dev.feature_bits() == ([], [])
    assert t.vms["vm0"].workloads["verify"].device == "vda"


def test_feature_names_in_every_spelling():
    t = load_topology(topo(**{f"{DEV}.features": {
        "withhold": ["EVENT_IDX", "virtio_ring_f_indirect_desc", "VIRTIO_BLK_F_FLUSH"],
        "offer": ["geometry", "29"]}}), SRC)
    offer, withhold = t.vms["vm0"].devices["vda"].feature_bits()
    assert withhold == [F.VIRTIO_RING_F_EVENT_IDX, F.VIRTIO_RING_F_INDIRECT_DESC,
                        B.VIRTIO_BLK_F_FLUSH]
    assert offer == [B.VIRTIO_BLK_F_GEOMETRY, 29]


@pytest.mark.parametrize("text, value", [
    ("64M", 64 << 20), ("64MiB", 64 << 20), ("64 MB", 64 << 20), ("1g", 1 << 30),
    ("4096", 4096), ("4k", 4096), ("2T", 2 << 40), (512, 512), (" 8m ", 8 << 20),
])
def test_parse_size(text, value):
    assert parse_size(text) == value


@given(st.integers(0, 10**6), st.sampled_from(["", "k", "M", "g", "T"]),
       st.sampled_from(["", "B", "iB", "ib"]))
def test_parse_size_any_number_and_unit(n, unit, suffix):
    mult = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}[unit.lower()]
    assert parse_size(f"{n}{unit}{suffix}") == n * mult


@pytest.mark.parametrize("bad", ["64X", "-1", "1.5M", "", "M", "64 M B", True, 4.5, None,
                                 [64]])
def test_parse_size_rejects(bad):
    with pytest.raises(ValueError, match="expected a size"):
        parse_size(bad)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_configs_validate(path):
    t = load_topology_file(path)
    assert t.vms
    for vm in t.vms.values():
        for dev in vm.devices.values():
            dev.feature_bits()


def test_there_are_shipped_configs():
    assert CONFIGS, "configs/*.yaml is empty"


# ---- invalid topologies: one line, file, key path, what was expected ----------------------------
@pytest.mark.parametrize("edits, where, expected", [
    # unknown keys, at every level
    ({"colour": "red"}, "colour", "unknown key"),
    ({"vms.vm0.cpus": 2}, "vms.vm0.cpus", "unknown key"),
    ({f"{DEV}.colour": "red"}, f"{DEV}.colour", "unknown key"),
    ({f"{DEV}.features.enable": ["FLUSH"]}, f"{DEV}.features.enable", "unknown key"),
    ({f"{DEV}.faults.explode": True}, f"{DEV}.faults.explode", "unknown key"),
    ({"vms.vm0.workloads.verify.speed": 3}, "vms.vm0.workloads.verify.speed", "unknown key"),
    ({"host.threads": 4}, "host.threads", "unknown key"),
    # wrong types
    ({f"{DEV}.queue_size": "big"}, f"{DEV}.queue_size", "valid integer"),
    ({f"{DEV}.readonly": "maybe"}, f"{DEV}.readonly", "valid boolean"),
    ({f"{DEV}.serial": 12}, f"{DEV}.serial", "valid string"),
    ({f"{DEV}.features.withhold": "EVENT_IDX"}, f"{DEV}.features.withhold", "valid list"),
    ({f"{DEV}.num_queues": [1]}, f"{DEV}.num_queues", "valid integer"),
    ({"vms.vm0.devices": ["vda"]}, "vms.vm0.devices", "valid dictionary"),
    ({"vms.vm0": "big"}, "vms.vm0", "valid dictionary"),
    ({"duration": "long"}, "duration", "valid number"),
    # sizes
    ({f"{DEV}.size": "64X"}, f"{DEV}.size", "expected a size such as 64M"),
    ({f"{DEV}.size": "1.5G"}, f"{DEV}.size", "expected a size such as 64M"),
    ({f"{DEV}.size": 1000}, f"{DEV}.size", "multiple of 512"),
    ({f"{DEV}.size": 0}, f"{DEV}.size", "at least 512"),
    ({"vms.vm0.memory": "64X"}, "vms.vm0.memory", "expected a size such as 64M"),
    ({"vms.vm0.memory": "512K"}, "vms.vm0.memory", "expected 1M to 16G"),
    ({"vms.vm0.workloads.verify.region": "lots"}, "vms.vm0.workloads.verify.region",
     "expected a size"),
    # queue sizes
    ({f"{DEV}.queue_size": 100}, f"{DEV}.queue_size", "power of two"),
    ({f"{DEV}.queue_size": 0}, f"{DEV}.queue_size", "power of two"),
    ({f"{DEV}.queue_size": -8}, f"{DEV}.queue_size", "power of two"),
    ({f"{DEV}.queue_size": 65536}, f"{DEV}.queue_size", "1 to 32768"),
    ({f"{DEV}.blk_size": 1000}, f"{DEV}.blk_size", "power of two"),
    ({f"{DEV}.num_queues": 0}, f"{DEV}.num_queues", "greater than or equal to 1"),
    # features
    ({f"{DEV}.features": {"withhold": ["EVENT_IDXX"]}}, f"{DEV}.features.withhold",
     "unknown feature 'EVENT_IDXX'"),
    ({f"{DEV}.features": {"offer": ["NOPE"]}}, f"{DEV}.features.offer",
     "unknown feature 'NOPE'"),
    ({f"{DEV}.features": {"offer": ["64"]}}, f"{DEV}.features.offer", "unknown feature '64'"),
    # literals and discriminators
    ({f"{DEV}.type": "scsi"}, DEV, "unknown type 'scsi'"),
    ({f"{DEV}.type": DELETE}, DEV, "'type' key is required"),
    ({f"{DEV}.transport": "usb"}, f"{DEV}.transport", "'mmio', 'mmio-legacy', 'pci'"),
    ({f"{DEV}.ring": "ring-buffer"}, f"{DEV}.ring", "'split' or 'packed'"),
    ({f"{DEV}.backend": "nbd"}, f"{DEV}.backend", "'file' or 'memory'"),
    ({"vms.vm0.workloads.verify.type": "fio"}, "vms.vm0.workloads.verify", "unknown type"),
    ({"vms.vm0.workloads.verify.device": DELETE}, "vms.vm0.workloads.verify.device",
     "required key is missing"),
    ({f"{DEV}.serial": "x" * 21}, f"{DEV}.serial", "at most 20 bytes"),
    ({f"{DEV}.path": "/tmp/disk.img"}, DEV, "a memory backend has no file"),
    # transport-specific settings
    ({f"{DEV}.transport": "pci-legacy", f"{DEV}.ring": "packed"}, f"{DEV}.ring",
     "cannot have packed rings"),
    ({f"{DEV}.plugged": False}, f"{DEV}.plugged", "only a PCI device can start unplugged"),
    ({f"{DEV}.adapter_interrupts": False}, f"{DEV}.adapter_interrupts", "virtio-ccw setting"),
    # names
    ({"vms": {"0vm": {}}}, "vms.0vm", "pattern"),
    # ranges
    ({"duration": 0}, "duration", "greater than 0"),
    ({"host.poll_us": -1}, "host.poll_us", "greater than or equal to 0"),
    # no VMs
    ({"vms": {}}, "vms", "at least one VM"),
    ({"vms": DELETE}, "vms", "required key is missing"),
])
def test_invalid_topology_names_the_key(edits, where, expected):
    msg = error_of(topo(**edits))
    assert msg.startswith(f"{SRC}: {where}"), msg
    assert expected in msg, msg


def test_workload_referring_to_a_missing_device():
    msg = error_of(topo(**{"vms.vm0.workloads.verify.device": "vdb"}))
    assert "vms.vm0" in msg and "workloads.verify.device" in msg
    assert "no device 'vdb'" in msg and "vda" in msg       # and which devices there are


@pytest.mark.parametrize("edits, where", [
    ({"vms.vm0.workloads.verify.device": "vdb"}, "vms.vm0.workloads.verify.device"),
    ({f"{DEV}.path": "/tmp/disk.img"}, f"{DEV}.path"),
])
def test_model_level_errors_use_one_dotted_key_path(edits, where):
    assert error_of(topo(**edits)).startswith(f"{SRC}: {where}: ")


@pytest.mark.parametrize("key", ["queue_size", "num_queues"])
def test_boolean_is_not_an_integer(key):
    error_of(topo(**{f"{DEV}.{key}": True}))


def test_several_problems_still_one_line():
    msg = error_of(topo(**{f"{DEV}.queue_size": 0, f"{DEV}.size": "1X", f"{DEV}.colour": 1}))
    assert "[and 2 more problems]" in msg


@pytest.mark.parametrize("data", [None, [], ["vms"], "vms", 42])
def test_top_level_must_be_a_mapping(data):
    assert "expected a mapping with a 'vms' key" in error_of(data)


# ---- files ---------------------------------------------------------------------------------------
def test_load_file(tmp_path):
    path = tmp_path / "ok.yaml"
    path.write_text("vms:\n  vm0:\n    devices:\n      vda: {type: blk, size: 8M}\n")
    t = load_topology_file(path)
    assert t.vms["vm0"].devices["vda"].size == 8 << 20


def test_file_errors_name_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("vms:\n  vm0:\n    devices:\n      vda: {type: blk, queue_size: 100}\n")
    with pytest.raises(TopologyError) as exc:
        load_topology_file(path)
    assert str(exc.value) == (f"{path}: vms.vm0.devices.vda.queue_size: expected a power of "
                              "two from 1 to 32768 for a split ring, got 100 (a packed ring may "
                              "have any size)")


@pytest.mark.parametrize("text, line", [
    ("vms:\n  vm0:\n    memory: 64M\n   devices: {}\n", 4),
    ("vms:\n  vm0:\n    devices:\n      vda: {type: blk\n", 5),
    ("vms:\n  vm0:\n    devices:\n      vda:\n        type: blk\n\tqueue_size: 3\n", 6),
    ("vms: [1, 2\n", 2),
    ("name: 'unterminated\nvms: {}\n", 3),
])
def test_invalid_yaml_reports_the_line(tmp_path, text, line):
    path = tmp_path / "broken.yaml"
    path.write_text(text)
    with pytest.raises(TopologyError) as exc:
        load_topology_file(path)
    msg = str(exc.value)
    assert "\n" not in msg
    assert msg.startswith(f"{path}: line {line}, column "), msg
    assert "not valid YAML" in msg


def test_missing_file(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(TopologyError, match=r"nope\.yaml: no such file$"):
        load_topology_file(path)


def test_directory_instead_of_file(tmp_path):
    with pytest.raises(TopologyError, match="is a directory"):
        load_topology_file(tmp_path)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing here\n")
    with pytest.raises(TopologyError, match=r"empty\.yaml: expected a mapping"):
        load_topology_file(path)


def test_empty_vms_in_a_file(tmp_path):
    path = tmp_path / "novms.yaml"
    path.write_text("name: x\nvms: {}\n")
    with pytest.raises(TopologyError) as exc:
        load_topology_file(path)
    assert str(exc.value) == f"{path}: vms: expected at least one VM"


# ---- the CLI -------------------------------------------------------------------------------------
def _vmsim(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run the CLI; also check that it left no object of its own in /dev/shm (a run's objects
    are named after its launcher's pid, which is this process: other runs on the machine may
    come and go meanwhile)."""
    with subprocess.Popen([sys.executable, "-m", "vmsim", *args], cwd=cwd, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE) as p:
        try:
            out, err = p.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            p.kill()
            raise
    mine = [e for e in os.listdir("/dev/shm") if e.startswith(f"vmsim-{p.pid}-")]
    assert mine == [], f"left in /dev/shm: {mine}"
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


BAD_FILES = {
    "bad-queue.yaml": "vms:\n  vm0:\n    devices:\n      vda: {type: blk, queue_size: 100}\n",
    "bad-yaml.yaml": "vms:\n  vm0:\n    devices: [\n",
    "bad-feature.yaml": ("vms:\n  vm0:\n    devices:\n      vda:\n        type: blk\n"
                         "        features: {withhold: [EVENT_IDXX]}\n"),
    "no-vms.yaml": "vms: {}\n",
}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("command", ["check", "run"])
@pytest.mark.parametrize("name", [*BAD_FILES, "missing.yaml"])
def test_cli_config_error(tmp_path, command, name):
    if name in BAD_FILES:
        (tmp_path / name).write_text(BAD_FILES[name])
    r = _vmsim(command, name, cwd=tmp_path)
    lines = r.stderr.splitlines()
    assert r.returncode == 2, r.stderr
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith(f"vmsim: config error: {name}: "), r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""
    assert list(tmp_path.iterdir()) == ([tmp_path / name] if name in BAD_FILES else [])


@pytest.mark.timeout(60)
@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_cli_check_accepts_shipped_configs(path):
    t = load_topology_file(path)
    r = _vmsim("check", str(path), cwd=ROOT)
    assert r.returncode == 0, r.stderr
    n_dev = sum(len(vm.devices) for vm in t.vms.values())
    n_wl = sum(len(vm.workloads) for vm in t.vms.values())
    assert r.stdout == f"{path}: ok ({len(t.vms)} VM(s), {n_dev} device(s), {n_wl} workload(s))\n"
    assert r.stderr == ""


@pytest.mark.parametrize("mtu, size, csum, ok", [
    (1500, 1480, False, True), (1500, 1481, False, False),
    (1500, 1452, True, True), (1500, 1453, True, False),
    (9000, 8000, False, True), (9000, 8980, False, True),
])
def test_net_payload_must_fit_the_mtu(mtu, size, csum, ok):
    data = {"switches": {"lan0": {}}, "vms": {
        "a": {"devices": {"eth0": {"type": "net", "mtu": mtu, "backend": {"switch": "lan0"}}},
              "workloads": {"s": {"type": "net-stream", "device": "eth0", "peer": "b.eth0",
                                  "size": size, "csum_offload": csum}}},
        "b": {"devices": {"eth0": {"type": "net", "backend": {"switch": "lan0"}}},
              "workloads": {"k": {"type": "net-sink", "device": "eth0"}}}}}
    if ok:
        load_topology(data, SRC)
    else:
        msg = error_of(data)
        assert "vms.a" in msg and "workloads.s.size" in msg and f"MTU of {mtu}" in msg, msg
