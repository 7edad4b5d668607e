"""The dashboard: what it draws for a known stats snapshot (a stats region and a guest RAM
object made here, read back through the real read-only reader, rendered to text by a
recording rich Console), its keys, and real runs on a terminal (tmux): `vmsim run` shows it,
updates it, focuses, pauses and quits on q with everything cleaned up; `vmsim top` attaches to
a run from another terminal and leaves it untouched; `vmsim ps` lists runs."""

import io
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import termios
import time

import pytest
from rich.console import Console
from test_run import (
    BLK_MMIO,
    PROGRESS_RE,
    ROOT,
    SHM,
    TMP,
    Launch,
    _alive,
    _descendants,
    _run_objects,
)

from vmsim.abi import features as F
from vmsim.abi import status as S
from vmsim.guest.memory import DmaMemory, GuestRAM
from vmsim.guest.virtio.vring import vring_create_virtqueue
from vmsim.host.memory import GuestMemory
from vmsim.host.virtio.queue_split import SplitQueue
from vmsim.launcher.dashboard import UiState, render
from vmsim.launcher.live import LiveDashboard
from vmsim.launcher.rates import History
from vmsim.launcher.statsread import RunReader
from vmsim.machine import shm
from vmsim.machine.stats import D, Q, StatsRegion, W, exit_word, region_size

BASE = 0x4000_0000
PY = sys.executable


class FakeRun:
    """A run's stats region and one VM's RAM in /dev/shm, with a split ring of 16 in RAM
    (5 buffers added, 3 taken by the device, 1 used) and counters written by hand."""

    def __init__(self) -> None:
        self.name = f"vmsim-{os.getpid()}-{secrets.token_hex(3)}"
        self.stats_name, self.ram_name = f"/{self.name}-stats", f"/{self.name}-ram-vm0"
        shm.create(self.stats_name, region_size(3, 2, 1))
        shm.create(self.ram_name, 1 << 20)
        self.stats_mm = shm.open_map(self.stats_name)
        StatsRegion.format(self.stats_mm, 3, 2, 1)
        self.st = StatsRegion(self.stats_mm)
        self.ram_mm = shm.open_map(self.ram_name)
        ram = GuestRAM(self.ram_mm, BASE)
        feats = F.bit(F.VIRTIO_F_VERSION_1) | F.bit(F.VIRTIO_RING_F_EVENT_IDX)
        self.vq = vring_create_virtqueue(0, 16, 4, DmaMemory(ram), feats, lambda vq: True,
                                         lambda vq: None, "vda")
        mem = GuestMemory(self.ram_mm, BASE)
        self.dev = SplitQueue(mem, 16, self.vq.desc_addr, self.vq.avail_addr,
                              self.vq.used_addr, True, False)
        buf, _ = self.vq.dma.alloc(64, 8)
        for t in range(5):
            assert self.vq.add_inbuf([(buf, 64)], t + 1) == 0
        chains = self.dev.pop_batch(3)
        self.dev.push(chains[0], 64)
        self._views = [ram, mem]
        q = self.st.queue(0)
        q[Q.SIZE], q[Q.RING], q[Q.READY], q[Q.LAYOUT_GEN] = 16, 0, 1, 1
        q[Q.DESC_ADDR], q[Q.DRIVER_ADDR], q[Q.DEVICE_ADDR] = (self.vq.desc_addr,
                                                               self.vq.avail_addr,
                                                               self.vq.used_addr)
        q[Q.RAM_BASE] = BASE
        q[Q.DEV_LAST_AVAIL], q[Q.DEV_USED] = self.dev.ring_positions()
        q[Q.DRV_AVAIL], q[Q.DRV_LAST_USED] = self.vq.ring_positions()
        q[Q.LAT_EVERY] = 16
        self.set(0)
        d = self.st.device(0)
        d[D.STATUS] = S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK | S.DRIVER_OK
        d[D.DRIVER_FEATURES] = feats
        d[D.EXITS_READ], d[D.EXITS_WRITE] = 10, 20
        d[exit_word("interrupt_status")] = 3
        d[D.CONFIG_GENERATION] = 2
        self.st.device(1)[D.STATUS] = d[D.STATUS]
        self.manifest = {
            "version": 1, "run": self.name, "pid": os.getpid(), "config": "fake.yaml",
            "topology": "fake", "duration": 60, "started_mono": time.monotonic() - 12.5,
            "stats": self.stats_name, "switches": {"lan0": ["vm0.eth0", "vm1.eth0"]},
            "vms": {"vm0": {
                "ram": {"name": self.ram_name, "base": BASE, "size": 1 << 20},
                "devices": {
                    "vda": {"type": "blk", "transport": "mmio", "ring": "split",
                            "queue_size": 16, "record": 0, "queues": [0],
                            "backend": "memory"},
                    "hvc0": {"type": "console", "transport": "pci", "ring": "split",
                             "queue_size": 64, "record": 1, "queues": [1, 2],
                             "backend": "console: pty",
                             "ports": [{"index": 0, "name": "console", "backend": "pty",
                                        "path": "/dev/pts/77"}]}},
                "workloads": {"verify": {"type": "blk-verify", "device": "vda",
                                         "record": 0, "peer": None}}}}}

    def set(self, step: int) -> None:
        """Counters at step 0, or one second later (step 1): 5,000 buffers used, 20 MB
        written, 40 kicks sent and 160 suppressed, 10 interrupts sent and 30 suppressed, and
        100 timed requests (90 at 16-33 µs, 10 at 1-2 ms)."""
        q = self.st.queue(0)
        ns = 10_000_000_000 + step * 1_000_000_000
        q[Q.USED] = q[Q.POPPED] = 1000 + 5000 * step
        q[Q.ADDED] = q[Q.USED] + 5
        q[Q.COMPLETED] = q[Q.USED]
        q[Q.NUM_FREE] = 11
        q[Q.BYTES_WRITTEN] = 1_000_000 + 20_000_000 * step
        q[Q.KICKS], q[Q.KICKS_SUPPRESSED] = 100 + 40 * step, 300 + 160 * step
        q[Q.INTERRUPTS], q[Q.INTERRUPTS_SUPPRESSED] = 50 + 10 * step, 150 + 30 * step
        q[Q.LAT_HIST + 15], q[Q.LAT_HIST + 21] = 90 * step, 10 * step
        q[Q.DEV_PUBLISHED_NS] = q[Q.DRV_PUBLISHED_NS] = ns
        w = self.st.workload(0)
        w[W.OPS], w[W.BYTES], w[W.PUBLISHED_NS] = 1000 + 5000 * step, 20_000_000 * step, ns

    def close(self) -> None:
        self.vq.release()
        self.dev.release()
        for v in self._views:
            v.release()
        self.st.release()
        self.stats_mm.close()
        self.ram_mm.close()
        shm.unlink(self.stats_name)
        shm.unlink(self.ram_name)


@pytest.fixture
def fake():
    f = FakeRun()
    try:
        yield f
    finally:
        f.close()


def _two_samples(fake: FakeRun) -> tuple[RunReader, History]:
    reader = RunReader(fake.manifest)          # maps both objects read-only
    hist = History()
    hist.add(reader.sample())
    fake.set(1)
    time.sleep(0.01)
    hist.add(reader.sample())
    return reader, hist


def _text(renderable, width: int = 200) -> str:
    con = Console(record=True, width=width, file=io.StringIO(), color_system=None)
    con.print(renderable)
    return con.export_text()


@pytest.mark.timeout(30)
def test_dashboard_shows_the_figures_of_a_known_snapshot(fake):
    reader, hist = _two_samples(fake)
    try:
        out = _text(render(fake.manifest, hist, UiState(), elapsed=12.5))
    finally:
        reader.close()
    assert fake.name in out and "fake.yaml" in out and "12.5 s / 60 s" in out
    head = next(line for line in out.splitlines() if "avail idx" in line)
    for col in ("ring", "size", "used idx", "in flight", "free", "ops/s", "MB/s", "kicks/s",
                "supp.", "irqs/s", "p50", "p99"):
        assert col in head
    row = next(line for line in out.splitlines() if re.search(r"\b0 split\b", line))
    cells = row.strip("│ ").split()
    # q, ring, size, avail idx and used idx (read from RAM), in flight, free, ops/s, MB/s,
    # kicks/s and their suppressed share, irqs/s and theirs, p50, p99, the ring picture
    assert cells[:15] == ["0", "split", "16", "5", "1", "5", "11", "5.0k", "20.0", "40",
                          "80%", "10", "75%", "25.5µs", "1.99ms"], row
    # slot 0 used, 1-2 with the device, 3-4 waiting for it, the rest free
    assert cells[15] == "[·████···········]", row
    assert "vda  blk over mmio  memory  DRIVER_OK  exits 30" in out
    wl = next(line for line in out.splitlines() if "blk-verify" in line).strip("│ ").split()
    assert wl == ["verify", "blk-verify", "vda", "6,000", "5.0k", "20.0", "0"]
    assert "switch lan0: vm0.eth0 ↔ vm1.eth0" in out
    assert "port 0 (console): pty /dev/pts/77  (attach: vmsim console vm0 hvc0)" in out
    assert "not ready" in out                   # the console's queues


@pytest.mark.timeout(30)
def test_focused_device_and_pause(fake):
    reader, hist = _two_samples(fake)
    try:
        ui = UiState(focus=2)                   # everything, vm0, vm0.vda, ...
        out = _text(render(fake.manifest, hist, ui, elapsed=1.0))
        assert "focus vm0.vda" in out
        assert "hvc0" not in out and "topology" not in out
        assert "avail flags 0x0 idx 5" in out and "used flags" in out and "idx 1" in out
        assert "last seen: driver used 0, device avail 3" in out
        assert "exits by kind: interrupt_status 3" in out
        assert "features: EVENT_IDX VERSION_1" in out and "config generation 2" in out
        assert "100 samples, 1 request in 16 timed" in out
        ui = UiState(focus=1, paused=True)
        out = _text(render(fake.manifest, hist, ui, elapsed=1.0))
        assert "paused" in out and "focus vm0" in out and "hvc0" in out
    finally:
        reader.close()


@pytest.mark.timeout(30)
def test_keys(fake):
    master, slave = os.openpty()
    reader = RunReader(fake.manifest)
    before = termios.tcgetattr(slave)
    con = Console(file=io.StringIO(), force_terminal=True, width=160, height=40)
    dash = LiveDashboard(fake.manifest, reader, console=con, stdin_fd=slave)
    try:
        dash.start()
        assert not termios.tcgetattr(slave)[3] & termios.ICANON     # keys without Enter
        assert dash.ui.focus == 0 and dash.frames == 1

        def key(b: bytes) -> bool:
            os.write(master, b)
            time.sleep(0.02)
            return dash.on_input()

        assert not key(b"\t") and dash.ui.focus == 1       # vm0
        assert not key(b"\t") and dash.ui.focus == 2       # vm0.vda
        assert not key(b"\x1b[Z") and dash.ui.focus == 1   # shift-tab
        assert not key(b"0") and dash.ui.focus == 0
        assert not key(b"1") and dash.ui.focus == 1
        assert not key(b"9") and dash.ui.focus == 1        # no ninth VM
        assert not key(b"\x1b") and dash.ui.focus == 0
        assert not key(b"\x1b[1;5C") and dash.ui.focus == 0    # ctrl-right: ignored whole
        assert not key(b"p") and dash.ui.paused
        n = len(dash.hist.samples)
        dash.tick()
        assert len(dash.hist.samples) == n                 # paused: no new sample
        assert not key(b"p") and not dash.ui.paused
        assert key(b"q")
        assert "q quit" in con.file.getvalue()
    finally:
        dash.stop()
        reader.close()
        after = termios.tcgetattr(slave)
        os.close(master)
        os.close(slave)
    assert after == before


# ---- real runs on a terminal -----------------------------------------------------------------

class Tmux:
    """A private tmux server (its own socket) with one session."""

    def __init__(self, cmd: str, width: int = 170, height: int = 48) -> None:
        if shutil.which("tmux") is None:
            pytest.fail("these tests need tmux (apt-get install tmux)")
        self.sock = f"vmsimtest{os.getpid()}{secrets.token_hex(2)}"
        self.sessions = 0
        self.new(cmd, width, height)

    def tmux(self, *args: str) -> str:
        return subprocess.run(["tmux", "-L", self.sock, *args], capture_output=True,
                              text=True, timeout=10).stdout

    def new(self, cmd: str, width: int = 170, height: int = 48) -> str:
        name = f"s{self.sessions}"
        self.sessions += 1
        subprocess.run(["tmux", "-L", self.sock, "new-session", "-d", "-s", name, "-x",
                        str(width), "-y", str(height), cmd], check=True, timeout=10)
        return name

    def capture(self, session: str = "s0") -> str:
        return self.tmux("capture-pane", "-p", "-t", session)

    def keys(self, keys: str, session: str = "s0") -> None:
        self.tmux("send-keys", "-t", session, keys)

    def wait_for(self, pattern: str, session: str = "s0", timeout: float = 20) -> str:
        deadline = time.monotonic() + timeout
        while True:
            text = self.capture(session)
            if re.search(pattern, text):
                return text
            if time.monotonic() > deadline:
                pytest.fail(f"no {pattern!r} on the terminal within {timeout} s:\n{text}")
            time.sleep(0.1)

    def kill(self) -> None:
        subprocess.run(["tmux", "-L", self.sock, "kill-server"], capture_output=True,
                       timeout=10)


def _rows(screen: str) -> list[str]:
    """The queue rows of a dashboard screen."""
    return [line for line in screen.splitlines() if re.search(r"\b\d+ (split|packed)\b", line)]


@pytest.mark.multiprocess
@pytest.mark.timeout(120)
def test_run_dashboard_in_a_terminal(tmp_path):
    cmd = (f"cd {ROOT} && {PY} -m vmsim run {BLK_MMIO} --duration 60 --json "
           f"{tmp_path / 's.json'}; echo EXITED=$?; sleep 60")
    t = Tmux(cmd)
    pid = None
    seen: dict[int, tuple[int, str]] = {}
    try:
        a = t.wait_for(r"kicks/s[\s\S]*\b0 split\b")
        pid = int(re.search(r"vmsim-(\d+)-[0-9a-f]{6}", a).group(1))
        seen.update(_descendants(pid))
        assert any("vmsim.guest" in cmd for _, cmd in seen.values())
        assert "avail idx" in a and "used idx" in a and "occupancy" in a, a
        time.sleep(1.5)
        b = t.capture()
        assert _rows(a) and _rows(a) != _rows(b), "the figures did not move"
        assert re.search(r"\d[\d.]*[kM]? ops/s", b), b
        t.keys("Tab")
        t.wait_for(r"focus vm0 ")
        t.keys("Tab")
        t.wait_for(r"focus vm0\.vda[\s\S]*avail flags 0x[0-9a-f]+ idx \d+")
        t.keys("0")
        t.wait_for(r"topology")
        t.keys("p")
        c = t.wait_for(r"paused")
        time.sleep(1.0)
        d = t.capture()
        assert _rows(c) == _rows(d), "a paused view changed"
        t.keys("p")
        t.wait_for(r"running")
        seen.update(_descendants(pid))
        t.keys("q")
        out = t.wait_for(r"EXITED=\d+", timeout=30)
        assert "EXITED=0" in out, out
        assert re.search(r"outcome\s+ok", out), out
        summary = json.loads((tmp_path / "s.json").read_text())
        assert summary["outcome"] == "ok" and summary["elapsed_s"] < 30
        assert 3.5 <= summary["dashboard"]["hz"] <= 4.5 and summary["dashboard"]["frames"] > 8
        deadline = time.monotonic() + 5
        while _run_objects(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _run_objects(pid)
        live = [p for p, (st, _) in seen.items() if _alive(p, st)]
        assert not live, f"left running: {live}"
    finally:
        t.kill()
        if pid is not None:
            for p, (st, _) in seen.items():
                if _alive(p, st):
                    os.kill(p, 9)
            for e in os.listdir(SHM):
                if e.startswith(f"vmsim-{pid}-"):
                    os.unlink(os.path.join(SHM, e))
            for e in os.listdir(TMP):
                if e.startswith(f"vmsim-{pid}-"):
                    shutil.rmtree(os.path.join(TMP, e), ignore_errors=True)


@pytest.mark.multiprocess
@pytest.mark.timeout(120)
def test_top_and_ps_attach_to_a_run(tmp_path):
    launch = Launch(tmp_path, "run", str(BLK_MMIO), "--duration", "12")
    t = None
    try:
        launch.wait_running()
        ps = json.loads(subprocess.run([PY, "-m", "vmsim", "ps", "--json"], capture_output=True,
                                       text=True, timeout=30).stdout)
        mine = [r for r in ps if r["pid"] == launch.pid]
        assert len(mine) == 1, ps
        run = mine[0]["run"]
        assert mine[0]["config"] == str(BLK_MMIO) and mine[0]["vms"] == {"vm0": ["vda"]}
        text = subprocess.run([PY, "-m", "vmsim", "ps"], capture_output=True, text=True,
                              timeout=30).stdout
        assert run in text and "vm0: vda" in text
        # not a terminal: one frame
        once = subprocess.run([PY, "-m", "vmsim", "top", run], capture_output=True,
                              text=True, timeout=30)
        assert once.returncode == 0, once.stderr
        assert run in once.stdout and "kicks/s" in once.stdout and "avail idx" in once.stdout
        row = _rows(once.stdout)
        assert row and "k" in row[0].strip("│ ").split()[7], row     # thousands of ops/s
        js = subprocess.run([PY, "-m", "vmsim", "top", str(launch.pid), "--json"],
                            capture_output=True, text=True, timeout=30)
        line = json.loads(js.stdout)
        assert line["run"] == run and line["workloads"]["vm0.verify"]["ops_per_s"] > 0
        # on a terminal: q leaves top, the run goes on; a second top ends with the run
        t = Tmux(f"{PY} -m vmsim top {run}; echo TOPEXIT=$?; sleep 60")
        t.wait_for(r"kicks/s[\s\S]*\b0 split\b")
        s2 = t.new(f"{PY} -m vmsim top; echo TOPEXIT=$?; sleep 60")
        t.wait_for(r"kicks/s", session=s2)
        t.keys("q")
        t.wait_for(r"TOPEXIT=0")
        assert launch.p.poll() is None, "leaving top ended the run"
        rc = launch.wait(30)
        assert rc == 0, launch.output()
        out = t.wait_for(r"TOPEXIT=\d", session=s2, timeout=10)
        assert "TOPEXIT=0" in out and "has ended" in out, out
        launch.assert_clean()
        gone = subprocess.run([PY, "-m", "vmsim", "top", run], capture_output=True,
                              text=True, timeout=30)
        assert gone.returncode == 1 and "no vmsim run in progress" in gone.stderr
    finally:
        if t is not None:
            t.kill()
        launch.close()


@pytest.mark.multiprocess
@pytest.mark.timeout(60)
def test_no_dashboard_on_a_terminal_when_asked(tmp_path):
    """--no-dashboard on a terminal: the progress lines tests/test_run.py parses, no screen."""
    t = Tmux(f"cd {ROOT} && {PY} -m vmsim run {BLK_MMIO} --duration 2.5 --no-dashboard; "
             "echo EXITED=$?; sleep 60")
    try:
        out = t.wait_for(r"EXITED=\d", timeout=40)
        assert "EXITED=0" in out and re.search(r"outcome\s+ok", out), out
        assert PROGRESS_RE.search(out), out
        assert "kicks/s" not in out and "q quit" not in out
    finally:
        t.kill()
