"""`vmsim run` end to end: the real launcher, host and guest processes, real shared memory.

Every test starts the launcher as a subprocess (`python -m vmsim ...`, in a session of its
own so that a Ctrl-C can be sent to its whole process group), watches its process tree through
/proc while it runs, and afterwards checks that the run left nothing behind: no
/dev/shm/vmsim-<launcher pid>-* object, no <tmpdir>/vmsim-<launcher pid>-* run directory and
no live process among those the launcher started. Whatever happens, the `finally` of each test
kills (by pid) and reaps what it started and removes that run's objects, so one failure does
not cascade into the next test.
"""

import hashlib
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.multiprocess

ROOT = Path(__file__).resolve().parents[1]
BLK_MMIO = ROOT / "configs" / "blk-mmio.yaml"
VMSIM = [sys.executable, "-m", "vmsim"]
SHM = "/dev/shm"
TMP = tempfile.gettempdir()          # where the launcher makes its run directory
PROGRESS_RE = re.compile(r"^\[\s*\d+\.\d+s\] .*?\b(\d+) ops\b", re.M)
MiB = 1 << 20


# ---- /proc -----------------------------------------------------------------------------------

def _stat(pid: int) -> tuple[str, int, int] | None:
    """(state, ppid, starttime) of a process, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            rest = f.read().rsplit(")", 1)[1].split()
        return rest[0], int(rest[1]), int(rest[19])
    except (OSError, IndexError, ValueError):
        return None


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def _descendants(root: int) -> dict[int, tuple[int, str]]:
    """Live descendants of `root`: pid -> (starttime, command line)."""
    parent: dict[int, tuple[int, int]] = {}
    for e in os.listdir("/proc"):
        if e.isdigit():
            st = _stat(int(e))
            if st is not None and st[0] != "Z":
                parent[int(e)] = (st[1], st[2])
    found: dict[int, tuple[int, str]] = {}
    frontier = {root}
    while frontier:
        new = {p for p, (pp, _) in parent.items() if pp in frontier and p not in found}
        for p in new:
            found[p] = (parent[p][1], _cmdline(p))
        frontier = new
    return found


def _alive(pid: int, starttime: int) -> bool:
    """Whether that very process (not a later one with the same pid) still runs."""
    st = _stat(pid)
    return st is not None and st[0] != "Z" and st[2] == starttime


def _exited(pid: int, starttime: int) -> bool:
    """Whether every thread of that process has exited (it may still be a zombie: the
    leader shows Z as soon as it exits itself, while its other threads may still run and
    hold its files open)."""
    st = _stat(pid)
    if st is None or st[2] != starttime:
        return True
    try:
        return st[0] == "Z" and os.listdir(f"/proc/{pid}/task") == [str(pid)]
    except OSError:
        return True


def _run_objects(launcher_pid: int) -> list[str]:
    """The named objects of every run of this launcher: /dev/shm objects and run dirs."""
    prefix = f"vmsim-{launcher_pid}-"
    shm = [os.path.join(SHM, e) for e in os.listdir(SHM) if e.startswith(prefix)]
    tmp = [os.path.join(TMP, e) for e in os.listdir(TMP) if e.startswith(prefix)]
    return sorted(shm + tmp)


def _remove_run_objects(launcher_pid: int) -> None:
    for path in _run_objects(launcher_pid):
        if path.startswith(SHM + "/"):
            try:
                os.unlink(path)
            except OSError:
                pass
        else:
            shutil.rmtree(path, ignore_errors=True)


# ---- one launcher ----------------------------------------------------------------------------

class Launch:
    """One `vmsim ...` process with its output in files and its process tree watched."""

    def __init__(self, tmp_path: Path, *args: str, name: str = "vmsim",
                 cwd: Path | None = None) -> None:
        self.out_path = tmp_path / f"{name}.stdout"
        self.err_path = tmp_path / f"{name}.stderr"
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            self.p = subprocess.Popen([*VMSIM, *args], stdout=out, stderr=err,
                                      stdin=subprocess.DEVNULL, cwd=cwd or tmp_path,
                                      start_new_session=True)
        self.pid = self.p.pid
        self.seen: dict[int, tuple[int, str]] = {}   # every descendant ever seen

    # -- watching
    def sample(self) -> dict[int, tuple[int, str]]:
        now = _descendants(self.pid) if self.p.poll() is None else {}
        for pid, info in now.items():
            self.seen.setdefault(pid, info)
        return now

    def children(self, module: str) -> list[int]:
        """Live children started as `python -m <module>` (vmsim.host, vmsim.guest)."""
        return [pid for pid, (_, cmd) in self.sample().items()
                if re.search(rf"-m {re.escape(module)}(\s|$)", cmd)]

    @property
    def out(self) -> str:
        return self.out_path.read_text(errors="replace")

    @property
    def err(self) -> str:
        return self.err_path.read_text(errors="replace")

    def output(self) -> str:
        return f"--- stdout\n{self.out}\n--- stderr\n{self.err}"

    def wait(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while self.p.poll() is None:
            if time.monotonic() > deadline:
                pytest.fail(f"vmsim (pid {self.pid}) still running after {timeout} s\n"
                            + self.output())
            self.sample()
            time.sleep(0.05)
        return self.p.returncode

    def wait_running(self, timeout: float = 20) -> int:
        """Until the launcher prints a progress line with ops > 0 (the run is under way);
        the number of ops it reports."""
        deadline = time.monotonic() + timeout
        while True:
            self.sample()
            for m in PROGRESS_RE.finditer(self.err):
                if int(m.group(1)) > 0:
                    return int(m.group(1))
            if self.p.poll() is not None:
                pytest.fail(f"vmsim exited ({self.p.returncode}) before it got going\n"
                            + self.output())
            if time.monotonic() > deadline:
                pytest.fail(f"no progress line with ops > 0 within {timeout} s\n"
                            + self.output())
            time.sleep(0.05)

    # -- checking
    def assert_clean(self, timeout: float = 3.0) -> None:
        """Nothing of this launcher's runs is left: objects, run dir, processes."""
        assert self.p.poll() is not None, "the launcher is still running"
        deadline = time.monotonic() + timeout
        while True:
            objects = _run_objects(self.pid)
            live = {pid: cmd for pid, (start, cmd) in self.seen.items() if _alive(pid, start)}
            if not objects and not live:
                return
            if time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert not objects, f"left behind: {objects}\n{self.output()}"
        assert not live, f"still running: {live}\n{self.output()}"

    def close(self) -> None:
        """Kill (by pid) and reap whatever is left, remove the run's objects."""
        if self.p.poll() is None:
            self.sample()
            self.p.kill()
        try:
            self.p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        for pid, (start, _) in self.seen.items():
            if _alive(pid, start):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 3
        while any(_alive(p, s) for p, (s, _) in self.seen.items()) \
                and time.monotonic() < deadline:
            time.sleep(0.05)
        _remove_run_objects(self.pid)


def run_vmsim(tmp_path: Path, *args: str, timeout: float = 60, name: str = "vmsim",
              cwd: Path | None = None) -> tuple[int, Launch]:
    """Run vmsim to its end; check it left nothing behind; (exit code, the launch)."""
    launch = Launch(tmp_path, *args, name=name, cwd=cwd)
    try:
        rc = launch.wait(timeout)
        launch.assert_clean()
        return rc, launch
    finally:
        launch.close()


def write_yaml(tmp_path: Path, text: str, name: str = "topo.yaml") -> Path:
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p


def load_json(path: Path) -> dict:
    assert path.exists(), f"no JSON summary at {path}"
    return json.loads(path.read_text())


def one_device(summary: dict, vm: str = "vm0", dev: str = "vda") -> dict:
    return summary["vms"][vm]["devices"][dev]


def assert_queue_invariants(q: dict) -> None:
    """What the summary defines: added counts chains the driver made available, used the
    chains the device returned, completed/detached what the driver took back (get_buf /
    detach_unused_buf), in_flight = added - completed - detached."""
    for key in ("index", "ring", "size", "added", "used", "kicks", "kicks_suppressed",
                "interrupts", "interrupts_suppressed", "in_flight"):
        assert key in q, f"queue summary lacks {key!r}: {q}"
    assert 0 <= q["used"] <= q["added"]
    assert q["completed"] <= q["used"]
    assert q["in_flight"] == q["added"] - q["completed"] - q["detached"]
    assert q["in_flight"] >= 0


# ---- the command line ------------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_help():
    script = shutil.which("vmsim")
    cmds = [VMSIM] + ([[script]] if script else [])
    for base in cmds:
        top = subprocess.run([*base, "--help"], capture_output=True, text=True, timeout=30)
        assert top.returncode == 0, top.stderr
        for word in ("run", "clean", "bench"):
            assert re.search(rf"^\s+{word}\b", top.stdout, re.M), top.stdout
        sub = subprocess.run([*base, "run", "--help"], capture_output=True, text=True,
                             timeout=30)
        assert sub.returncode == 0, sub.stderr
        for opt in ("--duration", "--json", "--quiet", "CONFIG"):
            assert opt in sub.stdout, sub.stdout


# ---- normal runs -----------------------------------------------------------------------------

@pytest.mark.timeout(90)
def test_shipped_blk_mmio_config(tmp_path):
    js = tmp_path / "summary.json"
    rc, launch = run_vmsim(tmp_path, "run", str(BLK_MMIO), "--duration", "3", "--json",
                           str(js))
    assert rc == 0, launch.output()
    roles = sorted(cmd.split(" -m ", 1)[1].split()[0] for _, cmd in launch.seen.values()
                   if " -m vmsim." in cmd)
    assert roles == ["vmsim.guest", "vmsim.host"], launch.seen

    s = load_json(js)
    assert s["exit_code"] == 0 and s["outcome"] == "ok"
    assert s["problems"] == []
    assert s["topology"] == "blk-mmio"
    assert s["run"].startswith(f"vmsim-{launch.pid}-")
    assert 2.5 <= s["elapsed_s"] < 10
    for key in ("workload_ops", "workload_bytes", "workload_errors", "device_errors"):
        assert key in s["totals"]
    assert s["totals"]["workload_errors"] == 0 and s["totals"]["device_errors"] == 0

    w = s["workloads"]["vm0.verify"]
    assert w["ops"] > 0 and w["bytes"] > 0 and w["errors"] == 0, w
    assert w["reads"] > 0 and w["writes"] > 0 and w["flushes"] > 0, w
    assert w["error_messages"] == []

    d = one_device(s)
    assert d["type"] == "blk"
    assert d["transport"] == "mmio"
    assert d["driver"] == "virtio_blk" and d["probe_error"] == ""
    assert "VERSION_1" in d["features"]
    assert set(d["features"]) <= set(d["device_features"])
    assert "DRIVER_OK" in d["status"] and "FAILED" not in d["status"]
    assert d["errors"] == []
    assert len(d["queues"]) == 1
    q = d["queues"][0]
    assert q["index"] == 0 and q["ring"] == "split" and q["size"] == 256
    assert_queue_invariants(q)
    # The run ended with a drain: every request came back, none is left in flight.
    assert q["in_flight"] == 0 and q["used"] == q["added"], q
    # The ring also carried blk-verify's get-id request, which is not a workload op.
    assert q["added"] == w["ops"] + 1, (q, w)
    assert q["kicks"] > 0 and q["interrupts"] > 0

    # The text summary went to stdout, progress lines to stderr.
    assert "outcome ok" in launch.out
    assert "vm0.verify" in launch.out
    assert PROGRESS_RE.search(launch.err), launch.err


@pytest.mark.timeout(60)
def test_builtin_default_topology(tmp_path):
    js = tmp_path / "summary.json"
    rc, launch = run_vmsim(tmp_path, "run", "--duration", "2", "--json", str(js))
    assert rc == 0, launch.output()
    s = load_json(js)
    assert s["outcome"] == "ok" and s["problems"] == []
    assert s["config"] == "<built-in default>"
    w = s["workloads"]["vm0.verify"]
    assert w["ops"] > 0 and w["errors"] == 0
    d = one_device(s)
    assert d["transport"] == "mmio" and "VERSION_1" in d["features"]
    assert_queue_invariants(d["queues"][0])
    assert list(tmp_path.glob("*.img")) == [], "scratch image written next to the cwd"


OPS_TOPOLOGY = """\
    duration: 30
    vms:
      vm0:
        memory: 16M
        devices:
          vda: {type: blk, backend: memory, size: 4M}
        workloads:
          verify: {type: blk-verify, device: vda, in_flight: 16, ops: 2000}
    """


@pytest.mark.timeout(60)
def test_ops_limit_ends_the_run_early(tmp_path):
    cfg = write_yaml(tmp_path, OPS_TOPOLOGY)
    js = tmp_path / "summary.json"
    t0 = time.monotonic()
    rc, launch = run_vmsim(tmp_path, "run", str(cfg), "--json", str(js), "-q")
    wall = time.monotonic() - t0
    assert rc == 0, launch.output()
    assert wall < 15, f"took {wall:.1f} s of a 30 s duration"
    s = load_json(js)
    assert s["elapsed_s"] < 10
    w = s["workloads"]["vm0.verify"]
    # `ops:` bounds what is issued, not only what completes: exactly 2000, not 2000 plus
    # whatever else was in flight when the 2000th completed.
    assert w["ops"] == 2000 and w["errors"] == 0, w
    q = one_device(s)["queues"][0]
    assert_queue_invariants(q)
    assert q["in_flight"] == 0 and q["added"] == 2000 + 1      # + blk-verify's get-id


# ---- file-backed and read-only devices -------------------------------------------------------

@pytest.mark.timeout(60)
def test_file_backend_with_explicit_path_keeps_the_data(tmp_path):
    img = tmp_path / "disk.img"
    size = 8 * MiB
    cfg = write_yaml(tmp_path, f"""\
        vms:
          vm0:
            memory: 16M
            devices:
              vda: {{type: blk, backend: file, path: "{img}", size: 8M}}
            workloads:
              verify: {{type: blk-verify, device: vda, block_size: 4096, write_pct: 70,
                        ops: 3000}}
        """)
    js = tmp_path / "summary.json"
    rc, launch = run_vmsim(tmp_path, "run", str(cfg), "--duration", "20", "--json", str(js),
                           "-q")
    assert rc == 0, launch.output()
    s = load_json(js)
    w = s["workloads"]["vm0.verify"]
    assert w["writes"] > 0 and w["errors"] == 0, w
    d = one_device(s)
    assert d["readonly"] is False and d["capacity_bytes"] == size
    assert str(img) in d["backend"]

    # The image outlives the run, at its configured size, holding what blk-verify wrote:
    # each written 4 KiB block starts with (block number, generation).
    assert img.exists()
    assert img.stat().st_size == size
    data = img.read_bytes()
    stamped = 0
    for block in range(size // 4096):
        chunk = data[block * 4096:(block + 1) * 4096]
        if chunk.count(0) == len(chunk):
            continue
        got_block, gen = struct.unpack_from("<QQ", chunk)
        assert got_block == block and gen >= 1, (block, got_block, gen)
        stamped += 1
    assert stamped > 0, "the image is all zeros"
    assert stamped <= w["writes"]


def _random_image(path: Path, size: int) -> str:
    path.write_bytes(os.urandom(size))
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.timeout(60)
def test_readonly_device_serves_a_read_bench(tmp_path):
    img = tmp_path / "ro.img"
    digest = _random_image(img, 4 * MiB)
    os.chmod(img, 0o444)
    cfg = write_yaml(tmp_path, f"""\
        vms:
          vm0:
            memory: 16M
            devices:
              vda: {{type: blk, backend: file, path: "{img}", size: 4M, readonly: true}}
            workloads:
              bench: {{type: blk-bench, device: vda, op: read, in_flight: 32, ops: 3000}}
        """)
    js = tmp_path / "summary.json"
    rc, launch = run_vmsim(tmp_path, "run", str(cfg), "--duration", "20", "--json", str(js),
                           "-q")
    assert rc == 0, launch.output()
    s = load_json(js)
    assert s["outcome"] == "ok" and s["problems"] == []
    w = s["workloads"]["vm0.bench"]
    assert w["ops"] == 3000 and w["errors"] == 0, w
    assert w["reads"] == 3000 and w["writes"] == 0, w
    assert w["bytes"] == 3000 * 4096
    d = one_device(s)
    assert d["readonly"] is True
    assert "RO" in d["features"]
    q = d["queues"][0]
    assert_queue_invariants(q)
    assert q["added"] == q["used"] == w["ops"]
    assert hashlib.sha256(img.read_bytes()).hexdigest() == digest, "read-only image changed"


@pytest.mark.timeout(60)
def test_verify_workload_on_readonly_device_fails_clearly(tmp_path):
    """A writing workload on a read-only disk is a topology mistake: one line, no run."""
    img = tmp_path / "ro.img"
    digest = _random_image(img, 4 * MiB)
    cfg = write_yaml(tmp_path, f"""\
        vms:
          vm0:
            memory: 16M
            devices:
              vda: {{type: blk, backend: file, path: "{img}", size: 4M, readonly: true}}
            workloads:
              verify: {{type: blk-verify, device: vda, ops: 500}}
        """)
    js = tmp_path / "summary.json"
    rc, launch = run_vmsim(tmp_path, "run", str(cfg), "--duration", "20", "--json", str(js))
    assert rc == 2, launch.output()
    lines = launch.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vmsim: config error: "), launch.output()
    assert "workloads.verify.device" in lines[0] and "read-only" in lines[0]
    assert not js.exists()
    assert hashlib.sha256(img.read_bytes()).hexdigest() == digest, "read-only image changed"


# ---- processes that die, signals -------------------------------------------------------------

LONG_TOPOLOGY = """\
    vms:
      vm0:
        memory: 32M
        devices:
          vda: {type: blk, backend: file, size: 16M}
        workloads:
          verify: {type: blk-verify, device: vda, in_flight: 16}
    """


def _sigkill_child(tmp_path: Path, victim: str, launcher_busy: bool) -> None:
    cfg = write_yaml(tmp_path, LONG_TOPOLOGY)
    js = tmp_path / "summary.json"
    launch = Launch(tmp_path, "run", str(cfg), "--duration", "30", "--json", str(js))
    try:
        launch.wait_running()
        assert any(p.startswith(SHM) for p in _run_objects(launch.pid))
        kids = dict(launch.sample())
        pids = launch.children(f"vmsim.{victim}")
        assert len(pids) == 1, launch.seen
        if launcher_busy:
            # The launcher does not run while the child dies (as when it is descheduled on a
            # loaded machine): the child's exit and its closed channel wait for it together,
            # and for a killed host so does the guest's own failure and exit.
            os.kill(launch.pid, signal.SIGSTOP)
            deadline = time.monotonic() + 5
            while (_stat(launch.pid) or ("?",))[0] != "T":
                assert time.monotonic() < deadline, "the launcher did not stop"
                time.sleep(0.01)
        try:
            os.kill(pids[0], signal.SIGKILL)
            if launcher_busy:
                # A killed guest's host runs on; a killed host's guest fails and exits.
                gone = {p: kids[p][0] for p in kids
                        if p == pids[0] or (victim == "host" and "vmsim.guest" in kids[p][1])}
                deadline = time.monotonic() + 10
                while not all(_exited(p, st) for p, st in gone.items()):
                    assert time.monotonic() < deadline, f"{gone} did not exit"
                    time.sleep(0.05)
        finally:
            if launcher_busy:
                os.kill(launch.pid, signal.SIGCONT)
        t0 = time.monotonic()
        rc = launch.wait(20)
        took = time.monotonic() - t0
        # However the launcher ends, it ends soon, non-zero, and cleans up.
        assert rc != 0, launch.output()
        assert took < 5, f"the launcher took {took:.1f} s to notice"
        launch.assert_clean()
        # A child's exit and its channel's hang-up may be seen in the same poll (the busy
        # variant makes sure of it): the launcher must still end with a summary, not a crash.
        assert "Traceback" not in launch.err, launch.output()
        assert rc == 3, launch.output()
        label = "guest vm0" if victim == "guest" else "host"
        what = f"{label} (pid {pids[0]}) was killed by signal SIGKILL"
        assert what in launch.out, launch.output()
        s = load_json(js)
        assert s["outcome"] == "failed" and s["exit_code"] == 3
        assert what in s["problems"], s["problems"]
    finally:
        launch.close()


@pytest.mark.parametrize("victim", ["guest", "host"])
@pytest.mark.timeout(90)
def test_sigkill_of_a_child_ends_the_run(tmp_path, victim):
    _sigkill_child(tmp_path, victim, launcher_busy=False)


@pytest.mark.parametrize("victim", ["guest", "host"])
@pytest.mark.timeout(90)
def test_sigkill_of_a_child_while_the_launcher_is_busy(tmp_path, victim):
    _sigkill_child(tmp_path, victim, launcher_busy=True)


@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM"])
@pytest.mark.timeout(90)
def test_signal_to_the_launcher_interrupts_cleanly(tmp_path, signame):
    cfg = write_yaml(tmp_path, LONG_TOPOLOGY)
    js = tmp_path / "summary.json"
    launch = Launch(tmp_path, "run", str(cfg), "--duration", "30", "--json", str(js))
    try:
        launch.wait_running()
        assert len(launch.children("vmsim.guest")) == 1
        assert len(launch.children("vmsim.host")) == 1
        if signame == "SIGINT":
            # Ctrl-C: the terminal signals the whole foreground process group.
            os.killpg(launch.pid, signal.SIGINT)
        else:
            os.kill(launch.pid, signal.SIGTERM)
        t0 = time.monotonic()
        rc = launch.wait(30)
        took = time.monotonic() - t0
        assert rc == 130, launch.output()
        assert took < 10, f"stopping took {took:.1f} s"
        assert f"{signame}: stopping the run" in launch.err
        assert "outcome interrupted" in launch.out, launch.output()
        s = load_json(js)
        assert s["outcome"] == "interrupted" and s["exit_code"] == 130
        assert s["problems"] == [], s["problems"]
        w = s["workloads"]["vm0.verify"]
        assert w["ops"] > 0 and w["errors"] == 0, w
        q = one_device(s)["queues"][0]
        assert_queue_invariants(q)
        assert q["in_flight"] == 0
        launch.assert_clean()
    finally:
        launch.close()


# ---- feature negotiation ---------------------------------------------------------------------

@pytest.mark.parametrize("with_workload", [True, False], ids=["workload", "no-workload"])
@pytest.mark.timeout(60)
def test_device_refusing_features_ok_is_reported(tmp_path, with_workload):
    vm = {"memory": "16M",
          "devices": {"vda": {"type": "blk", "backend": "memory", "size": "4M",
                              "faults": {"refuse_features_ok": True}}}}
    if with_workload:
        vm["workloads"] = {"verify": {"type": "blk-verify", "device": "vda", "ops": 500}}
    text = yaml.safe_dump({"vms": {"vm0": vm}})
    cfg = write_yaml(tmp_path, text)
    js = tmp_path / "summary.json"
    rc, launch = run_vmsim(tmp_path, "run", str(cfg), "--duration", "1", "--json", str(js))
    assert rc != 0, launch.output()
    s = load_json(js)
    assert s["exit_code"] == rc and s["outcome"] != "ok"
    assert any("vda" in p and "refuses features" in p for p in s["problems"]), s["problems"]
    assert "refuses features" in launch.out
    d = one_device(s)
    assert "refuses features" in d["probe_error"]
    assert d["driver"] is None
    assert "DRIVER_OK" not in d["status"]
    assert d["queues"][0]["added"] == 0


@pytest.mark.timeout(60)
def test_withheld_features_are_not_negotiated(tmp_path):
    cfg = write_yaml(tmp_path, """\
        vms:
          vm0:
            memory: 16M
            devices:
              vda:
                type: blk
                backend: memory
                size: 4M
                features: {withhold: [EVENT_IDX, INDIRECT_DESC]}
            workloads:
              verify: {type: blk-verify, device: vda, in_flight: 16, ops: 3000}
        """)
    js = tmp_path / "summary.json"
    rc, launch = run_vmsim(tmp_path, "run", str(cfg), "--duration", "20", "--json", str(js),
                           "-q")
    assert rc == 0, launch.output()
    s = load_json(js)
    d = one_device(s)
    for f in ("EVENT_IDX", "INDIRECT_DESC"):
        assert f not in d["features"], d["features"]
        assert f not in d["device_features"], d["device_features"]
    assert "VERSION_1" in d["features"]
    w = s["workloads"]["vm0.verify"]
    assert w["ops"] == 3000 and w["errors"] == 0, w
    q = d["queues"][0]
    assert_queue_invariants(q)
    assert q["indirect"] == 0, "indirect descriptors used though not negotiated"
    assert q["in_flight"] == 0 and q["added"] == w["ops"] + 1


# ---- vmsim clean -----------------------------------------------------------------------------

def _dead_pid() -> int:
    for pid in (999999, 4194303, 4194000):
        if not os.path.exists(f"/proc/{pid}"):
            return pid
    pytest.skip("no free pid to fake a dead launcher with")


@pytest.mark.timeout(60)
def test_clean_removes_objects_of_dead_runs(tmp_path):
    pid = _dead_pid()
    shm_obj = Path(SHM) / f"vmsim-{pid}-abcdef-stats"
    ram_obj = Path(SHM) / f"vmsim-{pid}-abcdef-ram-vm0"
    rundir = Path(TMP) / f"vmsim-{pid}-abcdef-q1w2e3"
    try:
        shm_obj.write_bytes(b"\0" * 4096)
        ram_obj.write_bytes(b"\0" * 4096)
        rundir.mkdir()
        (rundir / "vm0-vda.img").write_bytes(b"x")
        r = subprocess.run([*VMSIM, "clean"], capture_output=True, text=True, timeout=30,
                           cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        assert not shm_obj.exists() and not ram_obj.exists()
        assert not rundir.exists()
        assert "removed 2 stale objects" in r.stdout, r.stdout
        assert shm_obj.name in r.stdout
        again = subprocess.run([*VMSIM, "clean"], capture_output=True, text=True, timeout=30,
                               cwd=tmp_path)
        assert again.returncode == 0 and "removed 0 stale objects" in again.stdout
    finally:
        for p in (shm_obj, ram_obj):
            p.unlink(missing_ok=True)
        shutil.rmtree(rundir, ignore_errors=True)


@pytest.mark.timeout(90)
def test_clean_spares_a_live_run(tmp_path):
    pid = _dead_pid()
    stale = Path(SHM) / f"vmsim-{pid}-abcdef-stats"
    js = tmp_path / "summary.json"
    launch = Launch(tmp_path, "run", str(BLK_MMIO), "--duration", "4", "--json", str(js))
    try:
        launch.wait_running()
        live = _run_objects(launch.pid)
        assert any(p.startswith(SHM) for p in live) and any(p.startswith(TMP) for p in live)
        # Made after the run started: every run sweeps stale objects as it starts.
        stale.write_bytes(b"\0" * 4096)
        r = subprocess.run([*VMSIM, "clean"], capture_output=True, text=True, timeout=30,
                           cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        assert not stale.exists(), r.stdout
        assert _run_objects(launch.pid) == live, r.stdout
        assert launch.p.poll() is None, "the run did not survive `vmsim clean`"
        rc = launch.wait(30)
        assert rc == 0, launch.output()
        s = load_json(js)
        assert s["outcome"] == "ok" and s["workloads"]["vm0.verify"]["errors"] == 0
        launch.assert_clean()
    finally:
        stale.unlink(missing_ok=True)
        launch.close()


@pytest.mark.timeout(90)
def test_killed_launcher_takes_its_children_and_clean_sweeps_the_rest(tmp_path):
    cfg = write_yaml(tmp_path, LONG_TOPOLOGY)
    launch = Launch(tmp_path, "run", str(cfg), "--duration", "30")
    try:
        launch.wait_running()
        kids = dict(launch.sample())
        assert len(kids) == 2, kids
        objects = _run_objects(launch.pid)
        assert len(objects) == 3, objects        # vm0's RAM, the stats region, the run dir
        launch.p.send_signal(signal.SIGKILL)
        launch.p.wait(10)
        deadline = time.monotonic() + 5
        while any(_alive(p, s) for p, (s, _) in kids.items()):
            assert time.monotonic() < deadline, f"children outlived the launcher: {kids}"
            time.sleep(0.05)
        # Nobody could clean up after a SIGKILL: that is what `vmsim clean` is for.
        assert _run_objects(launch.pid) == objects
        r = subprocess.run([*VMSIM, "clean"], capture_output=True, text=True, timeout=30,
                           cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        assert "removed 2 stale objects" in r.stdout, r.stdout
        assert _run_objects(launch.pid) == []
    finally:
        launch.close()
