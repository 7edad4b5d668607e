"""vmsim's vhost-user frontend: a host device whose rings a backend in another process serves.

Real runs only: the launcher spawns `vmsim backend ...` (`backend: {vhost_user: {spawn:
true}}`), or the test starts a backend itself and the topology connects to its socket; the
guest's drivers run unchanged on top. Backends from elsewhere (qemu-storage-daemon's
vhost-user-blk export, DPDK's vhost PMD in dpdk-testpmd) are exercised the same way when
installed.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.test_net import netns, ping_a_guest_through_tap  # noqa: F401 - a fixture
from tests.test_run import Launch, run_vmsim, write_yaml

TRANSPORTS = ["mmio", "mmio-legacy", "pci", "pci-legacy", "ccw"]


def _run(tmp_path: Path, topo: str, *args: str, ok: bool = True, timeout: float = 90) -> dict:
    cfg = write_yaml(tmp_path, topo)
    js = tmp_path / "summary.json"
    rc, launch = run_vmsim(tmp_path, "run", str(cfg), "--json", str(js), *args,
                           timeout=timeout)
    d = json.loads(js.read_text()) if js.exists() else {}
    if ok:
        assert rc == 0, launch.output()
        assert d["outcome"] == "ok" and not d["problems"], d["problems"]
    d["_rc"], d["_out"] = rc, launch.output()
    return d


def _backend(tmp_path: Path, *args: str, name: str = "be") -> tuple[subprocess.Popen, str]:
    sock = str(tmp_path / f"{name}.sock")
    log = open(tmp_path / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process
    p = subprocess.Popen([sys.executable, "-m", "vmsim", "backend", *args, "--socket", sock],
                         stdout=log, stderr=log, stdin=subprocess.DEVNULL)
    log.close()
    deadline = time.monotonic() + 15
    while not os.path.exists(sock):
        assert p.poll() is None, (tmp_path / f"{name}.log").read_text()
        assert time.monotonic() < deadline, "backend did not listen"
        time.sleep(0.02)
    return p, sock


def _stop(p: subprocess.Popen) -> int:
    if p.poll() is None:
        p.send_signal(signal.SIGINT)
    try:
        return p.wait(timeout=10)
    except subprocess.TimeoutExpired:
        p.kill()
        return p.wait()


BLK = """
vms:
  vm0:
    memory: 32M
    devices:
      vda: {{type: blk, transport: {transport}, ring: {ring}, size: 8M,
             backend: {{vhost_user: {vu}}}}}
    workloads:
      verify: {{type: blk-verify, device: vda, in_flight: 8, write_pct: 50, flush_every: 32}}
"""


@pytest.mark.timeout(120)
@pytest.mark.parametrize("transport, ring", [(t, "split") for t in TRANSPORTS]
                         + [("pci", "packed"), ("mmio", "packed"), ("ccw", "packed")])
def test_blk_on_a_spawned_backend_over_every_transport(tmp_path, transport, ring):
    """The guest's verified blk workload on every transport, its rings served by a spawned
    `vmsim backend blk`; the interrupts reach the guest through the host's call relay."""
    d = _run(tmp_path, BLK.format(transport=transport, ring=ring, vu="{spawn: true}"),
             "--duration", "1.5")
    w = d["workloads"]["vm0.verify"] if "vm0.verify" in d["workloads"] else \
        d["workloads"]["vm0"]["verify"]
    assert w["ops"] > 500 and w["errors"] == 0, w
    dev = d["vms"]["vm0"]["devices"]["vda"]
    vu = dev["info"]["vhost_user"]
    assert vu["error"] is None and vu["calls"] > 0, vu
    assert vu["socket"].endswith(".vhost.sock")
    assert ("RING_PACKED" in dev["features"]) == (ring == "packed")
    assert "RING_RESET" not in dev["features"]            # vhost-user has no ring reset
    q = dev["queues"][0]
    assert q["added"] > 500 and q["kicks"] < q["added"], q


@pytest.mark.timeout(120)
def test_blk_on_a_backend_at_a_socket_writes_the_image(tmp_path):
    """`socket: PATH`: a backend the test started; what the guest writes lands in the image
    the backend serves, at the sectors it wrote, and nowhere else."""
    img = tmp_path / "disk.img"
    orig = os.urandom(4 << 20)
    img.write_bytes(orig)
    be, sock = _backend(tmp_path, "blk", "--image", str(img))
    try:
        scen = write_yaml(tmp_path, f"""
            name: socket-blk
            topology:
              vms:
                vm0:
                  memory: 32M
                  devices:
                    vda: {{type: blk, transport: ccw, backend: {{vhost_user: {{socket: {sock}}}}}}}
            steps:
              - guest: {{vm: vm0, op: blk, device: vda, request: read, sector: 0, sectors: 8}}
                expect: {{status: OK}}
              - guest: {{vm: vm0, op: blk, device: vda, request: write, sector: 100,
                         sectors: 16, pattern: 0x5a}}
                expect: {{status: OK}}
              - guest: {{vm: vm0, op: blk, device: vda, request: flush}}
                expect: {{status: OK}}
              - guest: {{vm: vm0, op: blk, device: vda, request: read, sector: 100,
                         sectors: 16, expect: 0x5a}}
                expect: {{status: OK, data_ok: true}}
            """, "scen.yaml")
        rc, launch = run_vmsim(tmp_path, "scenario", str(scen), timeout=60)
        assert rc == 0, launch.output()
    finally:
        assert _stop(be) == 0
    disk = img.read_bytes()
    from vmsim.guest.ops import pattern_bytes
    assert disk[100 * 512:116 * 512] == pattern_bytes(0x5A, 100, 16 * 512)
    assert disk[:100 * 512] == orig[:100 * 512] and disk[116 * 512:] == orig[116 * 512:]
    log = (tmp_path / "be.log").read_text()
    assert "frontend connected" in log and "1 flushes" in log.replace(",", ""), log
    # CONFIGURE_MEM_SLOTS negotiated: guest RAM goes as one ADD_MEM_REG, as QEMU sends it
    assert "memory: added MemRegion(" in log, log


CONSOLE = """
vms:
  vm0:
    memory: 32M
    devices:
      hvc0:
        type: console
        transport: {transport}
        backend: {{vhost_user: {{spawn: true}}}}
        ports:
          - {{backend: file, path: {out}, app: none}}
"""


@pytest.mark.timeout(120)
@pytest.mark.parametrize("transport", ["pci", "mmio"])
def test_console_on_a_spawned_backend(tmp_path, transport):
    """virtio-console's port 0 served by `vmsim backend console`: what the guest's driver
    writes reaches the backend's output file."""
    out = tmp_path / "console.out"
    topo = CONSOLE.format(transport=transport, out=out)
    scen = write_yaml(tmp_path, "name: vu-console\ntopology:\n"
                      + "\n".join("  " + line for line in topo.strip().splitlines())
                      + "\nsteps:\n"
                      + "  - guest: {vm: vm0, op: console_write, device: hvc0, "
                        "data: 'hello through vhost-user'}\n"
                      + "    expect: {written: 24}\n", "scen.yaml")
    rc, launch = run_vmsim(tmp_path, "scenario", str(scen), timeout=60)
    assert rc == 0, launch.output()
    assert b"hello through vhost-user" in out.read_bytes()


@pytest.mark.timeout(120)
def test_backend_killed_mid_run_fails_the_device_not_the_host(tmp_path):
    """SIGKILL of the backend under load: the host sees its socket close, the device goes
    NEEDS_RESET, the guest stops its I/O, and the run ends on time, reported, clean."""
    img = tmp_path / "disk.img"
    img.write_bytes(bytes(8 << 20))
    be, sock = _backend(tmp_path, "blk", "--image", str(img))
    cfg = write_yaml(tmp_path, BLK.format(transport="pci", ring="split",
                                          vu="{socket: " + sock + "}"))
    js = tmp_path / "summary.json"
    launch = Launch(tmp_path, "run", str(cfg), "--duration", "3", "--json", str(js))
    try:
        time.sleep(1.5)
        be.kill()
        be.wait()
        t0 = time.monotonic()
        rc = launch.wait(60)
        assert time.monotonic() - t0 < 10
        launch.assert_clean()
    finally:
        launch.close()
        _stop(be)
    d = json.loads(js.read_text())
    assert rc == 1 and d["outcome"] == "errors", launch.output()
    dev = d["vms"]["vm0"]["devices"]["vda"]
    assert any("closed the connection" in e for e in dev["errors"]), dev["errors"]
    assert "NEEDS_RESET" in str(dev["status"]) or dev["info"]["vhost_user"]["error"]


@pytest.mark.timeout(60)
def test_no_backend_at_the_socket_is_one_line(tmp_path):
    d = _run(tmp_path, BLK.format(transport="mmio", ring="split",
                                  vu="{socket: " + str(tmp_path / "nobody.sock") + "}"),
             "--duration", "1", ok=False)
    assert d["_rc"] != 0
    assert any("no vhost-user backend listening at" in p for p in d["problems"]), d["problems"]
    assert "Traceback" not in d["_out"]


@pytest.mark.timeout(60)
def test_a_spawned_backend_that_fails_is_one_line(tmp_path):
    d = _run(tmp_path, CONSOLE.format(transport="pci", out=tmp_path / "no" / "such" / "dir"),
             "--duration", "1", ok=False)
    assert d["_rc"] == 3, d["_out"]
    assert any("vhost-user backend of vm0.hvc0 exited with code" in p for p in d["problems"]), \
        d["problems"]
    assert "Traceback" not in d["_out"]


def test_topology_errors_for_vhost_user(tmp_path):
    bad = {
        "{vhost_user: {}}": "exactly one of spawn",
        "{vhost_user: {spawn: true, socket: /x}}": "exactly one of spawn",
    }
    for backend, msg in bad.items():
        cfg = write_yaml(tmp_path, f"""
            vms:
              vm0:
                devices:
                  vda: {{type: blk, backend: {backend}}}
            """)
        rc, launch = run_vmsim(tmp_path, "check", str(cfg), timeout=30)
        assert rc == 2 and msg in launch.output(), launch.output()
    cfg = write_yaml(tmp_path, """
        vms:
          vm0:
            devices:
              eth0: {type: net, queue_pairs: 2, backend: {vhost_user: {socket: /x}}}
        """)
    rc, launch = run_vmsim(tmp_path, "check", str(cfg), timeout=30)
    assert rc == 2 and "one pair" in launch.output(), launch.output()


QSD = shutil.which("qemu-storage-daemon")


@pytest.mark.skipif(QSD is None, reason="qemu-storage-daemon not installed (Debian package "
                    "qemu-system-common; .ci/run installs it)")
@pytest.mark.timeout(120)
@pytest.mark.parametrize("ring", ["split", "packed"])
def test_guest_on_qemu_storage_daemon_vhost_user_blk_export(tmp_path, ring):
    """QEMU's own vhost-user-blk backend (qemu-storage-daemon's export, libvhost-user) under
    vmsim's frontend and guest: verified I/O on split and packed rings."""
    img = tmp_path / "disk.img"
    img.write_bytes(bytes(8 << 20))
    sock = tmp_path / "qsd.sock"
    qsd = subprocess.Popen(
        [QSD, "--blockdev", f"driver=file,node-name=file0,filename={img}",
         "--export", f"type=vhost-user-blk,id=exp0,node-name=file0,writable=on,"
                     f"addr.type=unix,addr.path={sock}"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 15
        while not sock.exists():
            assert qsd.poll() is None, qsd.stdout.read().decode()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        d = _run(tmp_path, BLK.format(transport="pci", ring=ring,
                                      vu="{socket: " + str(sock) + "}"), "--duration", "2")
    finally:
        qsd.terminate()
        try:
            qsd.wait(timeout=10)
        except subprocess.TimeoutExpired:
            qsd.kill()
            qsd.wait()
    w = d["workloads"]["vm0.verify"] if "vm0.verify" in d["workloads"] else \
        d["workloads"]["vm0"]["verify"]
    assert w["ops"] > 100 and w["errors"] == 0, w
    dev = d["vms"]["vm0"]["devices"]["vda"]
    # libvhost-user (QEMU 7.2) serves split rings only: it does not offer RING_PACKED, so a
    # device asked for packed rings runs split - the backend's offer decides
    offered = dev["info"]["vhost_user"]["backend_features"]
    assert not offered & 1 << 34
    assert "RING_PACKED" not in dev["features"] and "VERSION_1" in dev["features"]
    assert dev["info"]["vhost_user"]["calls"] > 0


TESTPMD = shutil.which("dpdk-testpmd")
NET_PAIR = """
vms:
  vm0:
    memory: 32M
    devices:
      eth0: {{type: net, transport: pci, ring: {ring},
              backend: {{vhost_user: {{socket: {s0}}}}}}}
    workloads:
      {w0}
  vm1:
    memory: 32M
    devices:
      eth0: {{type: net, transport: {t1}, ring: {ring},
              backend: {{vhost_user: {{socket: {s1}}}}}}}
    workloads:
      {w1}
"""


class DpdkTestpmd:
    """dpdk-testpmd forwarding between two vhost-user ports (DPDK's vhost PMD, the server
    side of each socket), without hugepages or PCI devices."""

    def __init__(self, tmp: Path) -> None:
        self.prefix = f"vmsim-{os.getpid()}-{tmp.name[-12:]}"
        self.socks = [str(tmp / "dp0.sock"), str(tmp / "dp1.sock")]
        self.log = tmp / "testpmd.log"
        with open(self.log, "wb") as log:
            self.p = subprocess.Popen(
                [TESTPMD, "--no-huge", "-m", "256", "--no-pci", "--file-prefix", self.prefix,
                 "-l", "0-1", "--vdev", f"net_vhost0,iface={self.socks[0]},queues=1",
                 "--vdev", f"net_vhost1,iface={self.socks[1]},queues=1", "--",
                 "--forward-mode=io", "--auto-start", "--nb-cores=1",
                 "--total-num-mbufs=8192"],
                stdin=subprocess.PIPE, stdout=log, stderr=log)
        deadline = time.monotonic() + 30
        while not all(os.path.exists(s) for s in self.socks):
            assert self.p.poll() is None, self.log.read_text()
            assert time.monotonic() < deadline, self.log.read_text()
            time.sleep(0.05)

    def stop(self) -> str:
        if self.p.poll() is None:
            try:
                self.p.stdin.write(b"\n")            # "Press enter to exit"
                self.p.stdin.close()
            except BrokenPipeError:
                pass
            try:
                self.p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()
        shutil.rmtree(f"/var/run/dpdk/{self.prefix}", ignore_errors=True)
        return self.log.read_text(errors="replace")


@pytest.mark.skipif(TESTPMD is None, reason="dpdk-testpmd not installed (Debian package "
                    "dpdk-dev; .ci/run installs it)")
@pytest.mark.timeout(120)
@pytest.mark.parametrize("ring, t1", [("split", "mmio"), ("packed", "ccw")])
def test_two_guests_through_dpdk_testpmd(tmp_path, ring, t1):
    """Two vmsim guests whose virtio-net rings DPDK's vhost-user PMD serves, dpdk-testpmd
    forwarding frames between the two ports: ping round trips and a checked stream arrive,
    split and packed."""
    pmd = DpdkTestpmd(tmp_path)
    try:
        d = _run(tmp_path, NET_PAIR.format(
            ring=ring, t1=t1, s0=pmd.socks[0], s1=pmd.socks[1],
            w0="ping: {type: net-ping, device: eth0, peer: vm1.eth0}",
            w1="echo: {type: net-echo, device: eth0}"), "--duration", "2")
    finally:
        log = pmd.stop()
    w = d["workloads"]
    ping = w["vm0.ping"] if "vm0.ping" in w else w["vm0"]["ping"]
    assert ping["ops"] > 100 and ping["errors"] == 0, ping
    for vm in ("vm0", "vm1"):
        dev = d["vms"][vm]["devices"]["eth0"]
        assert ("RING_PACKED" in dev["features"]) == (ring == "packed"), dev["features"]
        assert "MAC" in dev["features"] and dev["info"]["vhost_user"]["calls"] > 0
    assert "negotiated Vhost-user protocol features" in log


@pytest.mark.timeout(90)
def test_real_ping_through_a_spawned_net_backend_on_a_tap(tmp_path, netns):  # noqa: F811
    """`backend: {tap: ..., vhost_user: {spawn: true}}`: the rings are served by `vmsim
    backend net` in its own process, onto the TAP; the real `ping` of the host kernel reaches
    the guest's responder through it and back."""
    cfg = write_yaml(tmp_path, """
        name: vu-tap
        duration: 30
        vms:
          vm0:
            memory: 32M
            devices:
              eth0: {type: net, transport: pci, ring: packed,
                     backend: {tap: vmsimvu0, vhost_user: {spawn: true}}}
            workloads:
              ip: {type: net-responder, device: eth0, ip: 10.198.0.2}
        """)
    s = ping_a_guest_through_tap(tmp_path, netns, cfg, "vmsimvu0", "10.198.0.1",
                                 "10.198.0.2")
    ip = s["workloads"]["vm0.ip"]
    assert ip["errors"] == 0 and ip["ops"] >= 5 and ip["arp_replies"] >= 1, ip
    dev = s["vms"]["vm0"]["devices"]["eth0"]
    assert "RING_PACKED" in dev["features"] and dev["info"]["vhost_user"]["calls"] >= 5
    assert not s["problems"], s["problems"]


@pytest.mark.timeout(120)
def test_vhost_scaling_bench_measures_both_ways(tmp_path, monkeypatch):
    """The scaling benchmark's machinery (not its figures): one VM each way, a short window,
    requests counted from the stats region and CPU read from /proc for every process kind."""
    monkeypatch.chdir(tmp_path)
    from vmsim.bench.vhost_scaling import format_table, run_case
    rs = [run_case(1, False, 0.5), run_case(1, True, 0.5)]
    for r in rs:
        assert r["requests"] > 100 and r["requests_per_s"] > 0, r
        assert r["guest_cpu_us_per_request"] > 0, r
    # In-process the host serves the rings; over vhost-user it only relays the (rare, with
    # event index and polling) interrupts and may use less than /proc's 10 ms tick in 0.5 s.
    assert rs[0]["host_cpu_us_per_request"] > 0, rs[0]
    assert rs[1]["host_cpu_us_per_request"] >= 0, rs[1]
    assert rs[0]["backend_cpu_us_per_request"] == 0
    assert rs[1]["backend_cpu_us_per_request"] > 0
    assert len(format_table(rs)) == 3
