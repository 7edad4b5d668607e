"""virtio-net end to end.

In one process (tests/test_guest_core.py's Machine): the real guest driver on virtio-mmio
against the real NetDevice, attached to a real host Switch on which the test holds a port of
its own, so it can put any frame on the wire and see every frame the guest sends. Control
queue commands, link changes, checksum offload and MRG_RXBUF are checked there, frame by frame.

With real `vmsim run`s: two VMs ping-ponging and streaming over a switch (every frame once,
in order per flow, checksums good, MAC learning in the switch's table), big frames with and
without MRG_RXBUF, and a TAP interface in a network namespace answered by a guest responder
(a real `ping`).
"""

import shutil
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
from test_guest_core import Machine
from test_run import load_json, run_vmsim, write_yaml

from vmsim.abi import features as F
from vmsim.abi import net as N
from vmsim.guest.drivers.net import ENETDOWN, NetDriver, VirtioNet
from vmsim.guest.workloads import net_frames as NF
from vmsim.host.devices.net.backend import SwitchBackend
from vmsim.host.devices.net.device import NetDevice
from vmsim.host.switch import Switch

pytestmark = pytest.mark.timeout(60)

GUEST_MAC = bytes.fromhex("525400000001")
PEER_MAC = bytes.fromhex("525400000099")     # the test's port
FOREIGN = bytes.fromhex("5254000000ee")      # nobody's
MCAST = bytes.fromhex("01005e000001")


@pytest.fixture
def machine():
    made: list[Machine] = []

    def make(**kw) -> Machine:
        made.append(Machine(**kw))
        return made[-1]

    yield make
    for m in made:
        m.close()


class Wire:
    """A net device on a switch, and the test's own port on the same switch."""

    def __init__(self, machine, *, mtu: int = 1500, pairs: int = 1, offer: int = 0,
                 withhold: int = 0, packed: bool = False, queue_size: int = 16) -> None:
        self.switch = Switch("lan")
        self.seen: list[tuple[bytes, object]] = []      # frames the guest sent
        self.arrived = threading.Condition()
        self.got: list[tuple[bytes, int, int, int, int]] = []   # frames the guest received

        def make(mem) -> NetDevice:
            return NetDevice("eth0", mem, SwitchBackend(self.switch, "vm0.eth0"),
                             mac=GUEST_MAC, max_pairs=pairs, queue_size=queue_size, mtu=mtu,
                             offer=offer, withhold=withhold, packed=packed, dev_stats=None,
                             queue_stats=[None] * (2 * pairs + 1))

        self.m = machine(make_dev=make)
        self.dev: NetDevice = self.m.dev
        self.port = self.m.host.call(self.switch.attach, "probe", self._on_wire)
        assert self.m.boot(NetDriver(self.m.dma)) == 0
        self.net: VirtioNet = self.m.vdev.priv
        for et in (NF.ETH_P_VMSIM, NF.ETH_P_IP):
            self.net.register(et, self._on_guest_rx)

    def _on_wire(self, frame: bytes, meta) -> None:
        with self.arrived:
            self.seen.append((frame, meta))
            self.arrived.notify_all()

    def _on_guest_rx(self, frame: bytes, flags: int, cs: int, co: int, pair: int) -> None:
        with self.arrived:
            self.got.append((frame, flags, cs, co, pair))
            self.arrived.notify_all()

    def inject(self, frame: bytes, meta=None) -> None:
        """Put a frame on the switch from the test's port (on the host thread)."""
        self.m.host.call(self.port.send, frame, meta)

    def wait(self, what, n: int, timeout: float = 5) -> list:
        with self.arrived:
            self.arrived.wait_for(lambda: len(what) >= n, timeout)
            return list(what)

    def settle(self) -> None:
        """Let whatever is in flight arrive (for checks that something did not)."""
        time.sleep(0.15)
        self.m.host.call(lambda: None)

    def metrics(self) -> dict:
        return self.m.host.call(self.dev.metrics.as_dict)


def frame_to(dst: bytes, seq: int, payload: bytes = b"x" * 40, src: bytes = PEER_MAC) -> bytes:
    return NF.test_frame(dst, src, NF.KIND_STREAM, 0, seq, 0, payload)


def seqs(got) -> list[int]:
    return [NF.parse_test(f)[2] for f, *_ in got]


# ---- the receive filter and the control queue ----------------------------------------------------
def test_driver_sets_rx_mode_and_the_filter_follows(machine):
    """Linux's driver turns promiscuous mode off at probe (CTRL_RX); from then on only
    frames to the device's MAC, broadcast, and what the MAC table names get in."""
    w = Wire(machine)
    assert w.m.host.call(lambda: (w.dev.promisc, w.dev.allmulti)) == (False, False)
    w.inject(frame_to(GUEST_MAC, 1))
    w.inject(frame_to(FOREIGN, 2))
    w.inject(frame_to(N.BROADCAST, 3))
    w.inject(frame_to(MCAST, 4))
    assert seqs(w.wait(w.got, 2)) == [1, 3]
    w.settle()
    assert seqs(w.got) == [1, 3]
    assert w.metrics()["rx_dropped_filter"] == 2


def test_control_queue_follows_the_first_pair_without_mq(machine):
    """A device with two pairs whose driver did not take VIRTIO_NET_F_MQ has its control
    queue at index 2 (spec 5.1.2), where the driver put it: the driver's RX-mode commands
    still reach the device."""
    w = Wire(machine, pairs=2, withhold=1 << N.VIRTIO_NET_F_MQ)
    assert not w.net.vdev.has_feature(N.VIRTIO_NET_F_MQ)
    assert w.m.host.call(lambda: (w.dev.ctrl_index, w.dev.promisc)) == (2, False)
    assert w.metrics()["ctrl_commands"] >= 1
    w.inject(frame_to(FOREIGN, 1))
    w.inject(frame_to(GUEST_MAC, 2))
    assert seqs(w.wait(w.got, 1)) == [2]


def test_promiscuous_mode_lets_foreign_frames_in(machine):
    w = Wire(machine)
    assert w.net.set_rx_mode(promisc=True, allmulti=False) == N.VIRTIO_NET_OK
    w.inject(frame_to(FOREIGN, 1))
    assert seqs(w.wait(w.got, 1)) == [1]
    assert w.net.set_rx_mode(promisc=False, allmulti=False) == N.VIRTIO_NET_OK
    w.inject(frame_to(FOREIGN, 2))
    w.inject(frame_to(GUEST_MAC, 3))
    assert seqs(w.wait(w.got, 2)) == [1, 3]
    w.settle()
    assert seqs(w.got) == [1, 3]


def test_allmulti_and_the_mac_table(machine):
    w = Wire(machine)
    w.inject(frame_to(MCAST, 1))
    w.settle()
    assert w.got == []
    assert w.net.set_rx_mode(promisc=False, allmulti=True) == N.VIRTIO_NET_OK
    w.inject(frame_to(MCAST, 2))
    assert seqs(w.wait(w.got, 1)) == [2]
    assert w.net.set_rx_mode(promisc=False, allmulti=False) == N.VIRTIO_NET_OK
    # the MAC table: one extra unicast address and one multicast group
    assert w.net.set_mac_table([FOREIGN], [MCAST]) == N.VIRTIO_NET_OK
    assert w.m.host.call(lambda: (w.dev.uni_table, w.dev.multi_table)) == ([FOREIGN], [MCAST])
    w.inject(frame_to(FOREIGN, 3))
    w.inject(frame_to(MCAST, 4))
    w.inject(frame_to(bytes.fromhex("01005e000002"), 5))     # another group: filtered
    assert seqs(w.wait(w.got, 3)) == [2, 3, 4]
    w.settle()
    assert len(w.got) == 3
    # an empty table keeps them out again
    assert w.net.set_mac_table([], []) == N.VIRTIO_NET_OK
    w.inject(frame_to(FOREIGN, 6))
    w.settle()
    assert len(w.got) == 3


def test_mac_address_set_moves_the_filter_and_the_source(machine):
    w = Wire(machine)
    new = bytes.fromhex("5254000000aa")
    assert w.net.set_mac(new) == N.VIRTIO_NET_OK
    assert w.net.mac == new
    w.inject(frame_to(GUEST_MAC, 1))          # the old address: not ours any more
    w.inject(frame_to(new, 2))
    assert seqs(w.wait(w.got, 1)) == [2]
    # what the guest sends carries the new source, and the switch learns it
    assert w.net.send(frame_to(PEER_MAC, 7, src=w.net.mac)) == 0
    sent = w.wait(w.seen, 1)
    assert sent[0][0][6:12] == new
    assert w.m.host.call(lambda: w.switch.mac_table[new].name) == "vm0.eth0"


def test_bad_control_commands_are_nacked(machine):
    w = Wire(machine)
    assert w.net.command(N.VIRTIO_NET_CTRL_RX, 7, b"\x01") == N.VIRTIO_NET_ERR
    assert w.net.command(N.VIRTIO_NET_CTRL_RX, N.VIRTIO_NET_CTRL_RX_PROMISC,
                         b"\x01\x00") == N.VIRTIO_NET_ERR
    assert w.net.command(N.VIRTIO_NET_CTRL_MAC, N.VIRTIO_NET_CTRL_MAC_ADDR_SET,
                         b"\x01") == N.VIRTIO_NET_ERR
    # MQ was not negotiated (one queue pair): the command is refused
    assert w.net.command(N.VIRTIO_NET_CTRL_MQ, N.VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET,
                         (1).to_bytes(2, "little")) == N.VIRTIO_NET_ERR
    assert w.net.command(99, 0) == N.VIRTIO_NET_ERR
    m = w.metrics()
    assert m["ctrl_errors"] == 5
    # errors are the command's, not the device's: it keeps working
    assert not w.m.host.call(lambda: w.dev.broken)
    w.inject(frame_to(GUEST_MAC, 1))
    assert seqs(w.wait(w.got, 1)) == [1]


def test_queue_pairs_set_and_flow_steering(machine):
    w = Wire(machine, pairs=4)
    assert w.net.curr_pairs == 4 and w.m.host.call(lambda: w.dev.curr_pairs) == 4
    assert w.net.set_queue_pairs(5) == N.VIRTIO_NET_ERR
    assert w.net.set_queue_pairs(0) == N.VIRTIO_NET_ERR
    # 64 flows (IPv4/UDP, ports differ) spread over the four receive queues
    for flow in range(64):
        frame, _, _ = NF.udp_stream_frame(GUEST_MAC, PEER_MAC, bytes([10, 0, 0, 1]),
                                          bytes([10, 0, 0, 2]), flow, 0, 0, b"y" * 32)
        w.inject(frame)
    got = w.wait(w.got, 64)
    pairs = {p for *_, p in got}
    assert len(got) == 64 and len(pairs) >= 3
    # each flow stays on one queue
    by_flow = {}
    for f, *_, p in got:
        by_flow.setdefault(f[34:36], set()).add(p)
    assert all(len(s) == 1 for s in by_flow.values())
    assert w.net.set_queue_pairs(1) == N.VIRTIO_NET_OK
    w.got.clear()
    for flow in range(16):
        frame, _, _ = NF.udp_stream_frame(GUEST_MAC, PEER_MAC, bytes([10, 0, 0, 1]),
                                          bytes([10, 0, 0, 2]), flow, 1, 0, b"y" * 32)
        w.inject(frame)
    assert {p for *_, p in w.wait(w.got, 16)} == {0}


# ---- link state ----------------------------------------------------------------------------------
def test_link_down_stops_transmission_and_the_driver_sees_it(machine):
    w = Wire(machine)
    changes: list[bool] = []
    w.net.link_listeners.append(changes.append)
    assert w.net.link_up
    w.m.host.call(w.dev.set_link, False)
    deadline = time.monotonic() + 5
    while w.net.link_up and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not w.net.link_up and changes == [False]
    assert w.net.send(frame_to(PEER_MAC, 1, src=GUEST_MAC)) == ENETDOWN
    w.inject(frame_to(GUEST_MAC, 2))
    w.settle()
    assert w.seen == [] and w.got == []
    m = w.metrics()
    assert m["rx_dropped_link"] == 1
    # up again: traffic both ways
    w.m.host.call(w.dev.set_link, True)
    deadline = time.monotonic() + 5
    while not w.net.link_up and time.monotonic() < deadline:
        time.sleep(0.01)
    assert changes == [False, True]
    assert w.net.send(frame_to(PEER_MAC, 3, src=GUEST_MAC)) == 0
    w.inject(frame_to(GUEST_MAC, 4))
    assert seqs(w.wait(w.seen, 1)) == [3]
    assert seqs(w.wait(w.got, 1)) == [4]


def test_device_drops_what_a_driver_sends_while_the_link_is_down(machine):
    """A driver that ignores the link status (or races the change) loses its frames at the
    device, which counts them; nothing reaches the wire."""
    w = Wire(machine)
    w.m.host.call(setattr, w.dev, "link_up", False)     # no interrupt: the driver still thinks up
    assert w.net.link_up
    for i in range(3):
        assert w.net.send(frame_to(PEER_MAC, i, src=GUEST_MAC)) == 0
    deadline = time.monotonic() + 5
    while w.metrics()["tx_dropped_link"] < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert w.metrics()["tx_dropped_link"] == 3
    assert w.seen == []


# ---- checksum offload ----------------------------------------------------------------------------
def _partial_udp(dst: bytes, src: bytes = PEER_MAC, size: int = 200) -> tuple[bytes, int, int]:
    return NF.udp_stream_frame(dst, src, bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2]), 0, 5, 0,
                               bytes(range(256))[:size])


def test_partial_checksum_reaches_a_guest_that_takes_it(machine):
    w = Wire(machine)
    assert w.net.vdev.has_feature(N.VIRTIO_NET_F_GUEST_CSUM)
    frame, cs, co = _partial_udp(GUEST_MAC)
    w.inject(frame, (N.VIRTIO_NET_HDR_F_NEEDS_CSUM, cs, co))
    got, flags, gcs, gco, _ = w.wait(w.got, 1)[0]
    assert got == frame                                    # left partial, as sent
    assert flags & N.VIRTIO_NET_HDR_F_NEEDS_CSUM and (gcs, gco) == (cs, co)
    assert not NF.udp_checksum_ok(got)
    assert NF.udp_checksum_ok(NF.complete_partial(got, gcs, gco))


def test_device_completes_the_checksum_for_a_guest_without_guest_csum(machine):
    w = Wire(machine, withhold=F.bit(N.VIRTIO_NET_F_GUEST_CSUM))
    assert not w.net.vdev.has_feature(N.VIRTIO_NET_F_GUEST_CSUM)
    frame, cs, co = _partial_udp(GUEST_MAC)
    w.inject(frame, (N.VIRTIO_NET_HDR_F_NEEDS_CSUM, cs, co))
    got, flags, *_ = w.wait(w.got, 1)[0]
    assert flags == 0 and NF.udp_checksum_ok(got)
    assert got[:cs + co] == frame[:cs + co] and got[cs + co + 2:] == frame[cs + co + 2:]
    assert w.metrics()["csum_completed"] == 1


def test_guest_transmit_checksum_offload_is_carried_to_the_wire(machine):
    w = Wire(machine)
    frame, cs, co = _partial_udp(PEER_MAC, GUEST_MAC)
    assert w.net.send(frame, 0, (cs, co)) == 0
    sent, meta = w.wait(w.seen, 1)[0]
    assert sent == frame and meta == (N.VIRTIO_NET_HDR_F_NEEDS_CSUM, cs, co)
    # without VIRTIO_NET_F_CSUM the driver must complete it itself: no request goes out
    w2 = Wire(machine, withhold=F.bit(N.VIRTIO_NET_F_CSUM))
    full = NF.complete_partial(frame, cs, co)
    assert w2.net.send(full, 0, (cs, co)) == 0
    sent, meta = w2.wait(w2.seen, 1)[0]
    assert meta is None and NF.udp_checksum_ok(sent)


# ---- receive buffers: mergeable, big, small ------------------------------------------------------
@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_mergeable_buffers_carry_a_big_frame(machine, packed):
    w = Wire(machine, mtu=9000, packed=packed)
    assert w.net.mergeable and not w.net.big_packets
    payload = bytes((i * 7) & 0xFF for i in range(8000))
    frame = frame_to(GUEST_MAC, 1, payload)
    w.inject(frame)
    w.inject(frame_to(GUEST_MAC, 2))                       # a small one after it
    got = w.wait(w.got, 2)
    assert [g[0] for g in got] == [frame, frame_to(GUEST_MAC, 2)]
    m = w.metrics()
    assert m["rx_merged_buffers"] == -(-(N.HDR_SIZE + len(frame)) // 2048)


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_big_packets_without_mrg_rxbuf(machine, packed):
    """No MRG_RXBUF and an MTU above 1500: Linux posts "big" buffers (header, then pages),
    one per frame."""
    w = Wire(machine, mtu=9000, packed=packed, withhold=F.bit(N.VIRTIO_NET_F_MRG_RXBUF))
    assert w.net.big_packets and not w.net.mergeable
    payload = bytes((i * 11) & 0xFF for i in range(8900))
    frame = frame_to(GUEST_MAC, 1, payload)
    w.inject(frame)
    assert w.wait(w.got, 1)[0][0] == frame
    assert w.metrics()["rx_merged_buffers"] == 0
    # the driver refuses to send more than its MTU allows
    assert w.net.send(frame_to(PEER_MAC, 2, bytes(9100), src=GUEST_MAC)) == -90   # EMSGSIZE


def test_small_buffers_drop_a_frame_too_big_for_one(machine):
    """No MRG_RXBUF, MTU 1500: "small" buffers of one full Ethernet frame; a jumbo frame
    cannot be taken and is dropped and counted; the next one is fine."""
    w = Wire(machine, withhold=F.bit(N.VIRTIO_NET_F_MRG_RXBUF))
    assert not w.net.big_packets and not w.net.mergeable
    w.inject(frame_to(GUEST_MAC, 1, bytes(3000)))
    w.inject(frame_to(GUEST_MAC, 2, bytes(1400)))
    assert seqs(w.wait(w.got, 1)) == [2]
    assert w.metrics()["rx_dropped_too_big"] == 1


def test_frames_wait_for_buffers_and_none_is_lost(machine):
    """More frames than posted buffers, delivered while the guest drains: the backlog holds
    them until buffers come back; every frame arrives once, in order."""
    w = Wire(machine, queue_size=8)
    n = 100
    for i in range(n):
        w.inject(frame_to(GUEST_MAC, i))
    got = w.wait(w.got, n, timeout=10)
    assert seqs(got) == list(range(n))
    m = w.metrics()
    assert m["rx_frames"] == n and m["rx_dropped_no_buffer"] == 0
    # a queue out of buffers waits for the driver's kick; it is not retried on every pass
    assert m["rx_starved"] <= n


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_starved_receive_queue_waits_for_the_kick(machine, packed):
    """Frames of two mergeable buffers each on a ring of four: the third frame finds one
    buffer too few; the device waits for the driver to post more (a kick, even with
    EVENT_IDX, whose avail_event must then name the driver's current index) and delivers."""
    w = Wire(machine, queue_size=4, packed=packed)
    assert w.net.mergeable
    frames = [frame_to(GUEST_MAC, i, bytes([i]) * 3000) for i in range(12)]
    # With the guest's interrupts held off it cannot repost buffers: after two frames the
    # queue is certainly starved (not merely by timing).
    with w.m.irqc.disabled():
        for f in frames:
            w.inject(f)
        w.m.host.call(lambda: None)
        assert w.metrics()["rx_starved"] >= 1
    got = w.wait(w.got, len(frames), timeout=10)
    assert [g[0] for g in got] == frames
    m = w.metrics()
    assert 1 <= m["rx_starved"] <= len(frames)
    assert m["rx_merged_buffers"] == 2 * len(frames)


# ---- real runs -----------------------------------------------------------------------------------
def test_two_vms_ping_pong_over_a_switch(tmp_path):
    js = tmp_path / "s.json"
    rc, launch = run_vmsim(tmp_path, "run", str(CONFIGS / "net-ping.yaml"), "--duration", "3",
                           "--json", str(js), "-q", timeout=60)
    assert rc == 0, launch.output()
    s = load_json(js)
    ping = s["workloads"]["vm0.ping"]
    echo = s["workloads"]["vm1.echo"]
    assert ping["errors"] == 0 and echo["errors"] == 0, (ping, echo)
    assert ping["ops"] > 50 and ping["lost"] == 0
    assert echo["ops"] in (ping["ops"], ping["ops"] + 1)   # the last reply may be in flight
    macs = {v["devices"]["eth0"]["info"]["mac"]: vm for vm, v in s["vms"].items()}
    table = s["switches"]["lan0"]["mac_table"]
    assert {table[mac] for mac in macs} == {"vm0.eth0", "vm1.eth0"}, table


def test_multiqueue_stream_every_frame_once_in_order(tmp_path):
    js = tmp_path / "s.json"
    rc, launch = run_vmsim(tmp_path, "run", str(CONFIGS / "net-stream.yaml"), "--duration",
                           "3", "--json", str(js), "-q", timeout=60)
    assert rc == 0, launch.output()
    s = load_json(js)
    sink = s["workloads"]["rx.sink"]
    stream = s["workloads"]["tx.stream"]
    assert sink["errors"] == 0 and stream["errors"] == 0, (sink, stream)
    assert sink["received"] > 1000
    assert sink["lost"] == sink["reordered"] == sink["corrupted"] == 0
    # every frame the sender had acknowledged arrived; nothing arrived twice
    assert stream["acked"] <= sink["received"] <= stream["sent"]
    # flows spread over both receive queue pairs; checksums completed by the device
    assert len(sink["per_queue_pair"]) == 2 and min(sink["per_queue_pair"].values()) > 0
    rx_dev = s["vms"]["rx"]["devices"]["eth0"]["info"]
    # (the device may have delivered a few the sink had not read when the run stopped)
    assert sink["received"] <= rx_dev["frames"]["csum_completed"] <= stream["sent"]
    assert sink["csum"]["checked"] == sink["received"]


@pytest.mark.parametrize("mrg", [True, False], ids=["mrg", "no-mrg"])
def test_big_frames_stream_with_and_without_mrg_rxbuf(tmp_path, mrg):
    withhold = "" if mrg else ", features: {withhold: [MRG_RXBUF]}"
    cfg = write_yaml(tmp_path, f"""
        name: jumbo
        duration: 3
        switches: {{lan0: {{}}}}
        vms:
          a:
            memory: 32M
            devices:
              eth0: {{type: net, mtu: 9000, backend: {{switch: lan0}}{withhold}}}
            workloads:
              stream: {{type: net-stream, device: eth0, peer: b.eth0, size: 7000, window: 32}}
          b:
            memory: 32M
            devices:
              eth0: {{type: net, mtu: 9000, backend: {{switch: lan0}}{withhold}}}
            workloads:
              sink: {{type: net-sink, device: eth0}}
        """)
    js = tmp_path / "s.json"
    rc, launch = run_vmsim(tmp_path, "run", str(cfg), "--json", str(js), "-q", timeout=60)
    assert rc == 0, launch.output()
    s = load_json(js)
    sink = s["workloads"]["b.sink"]
    assert sink["errors"] == 0 and sink["received"] > 100, sink
    assert sink["lost"] == sink["corrupted"] == 0
    dev = s["vms"]["b"]["devices"]["eth0"]
    drv = dev["driver_info"]
    assert drv["mergeable"] is mrg and drv["big_packets"] is (not mrg)
    merged = dev["info"]["frames"]["rx_merged_buffers"]
    if mrg:
        assert merged >= 4 * sink["received"]          # 7000+ bytes in 2 KiB buffers
    else:
        assert merged == 0


# ---- TAP: the real host kernel -------------------------------------------------------------------
def _tap_blocker() -> str | None:
    if sys.platform != "linux":
        return "TAP interfaces are Linux's"
    if shutil.which("ip") is None:
        return "the ip command (iproute2) is not installed"
    if shutil.which("ping") is None:
        return "the ping command (iputils-ping) is not installed"
    ns = f"vmsim-probe-{uuid.uuid4().hex[:6]}"
    r = subprocess.run(["ip", "netns", "add", ns], capture_output=True, text=True)
    if r.returncode:
        return f"cannot create a network namespace: {r.stderr.strip()}"
    try:
        r = subprocess.run(["ip", "netns", "exec", ns, "ip", "tuntap", "add", "dev", "probe0",
                            "mode", "tap"], capture_output=True, text=True)
        if r.returncode:
            return f"tun/tap is not permitted here: {r.stderr.strip()}"
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
    return None


@pytest.fixture
def netns():
    blocker = _tap_blocker()
    if blocker:
        pytest.skip(blocker)
    ns = f"vmsim-t-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        yield ns
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def _in_ns(ns: str, *cmd: str, timeout: float = 20) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", "netns", "exec", ns, *cmd], capture_output=True, text=True,
                          timeout=timeout)

def ping_a_guest_through_tap(tmp_path: Path, netns: str, cfg: Path, tap: str, host_ip: str,
                             guest_ip: str) -> dict:
    """`vmsim run cfg` inside the namespace; once its TAP appears, give it `host_ip`/24 and
    ping the guest's responder at `guest_ip` with the real `ping` (0% loss); stop the run
    with Ctrl-C; the summary."""
    js = tmp_path / "s.json"
    out = open(tmp_path / "vmsim.out", "wb")  # noqa: SIM115 (closed below, after the run)
    p = subprocess.Popen(["ip", "netns", "exec", netns, sys.executable, "-m", "vmsim", "run",
                          str(cfg), "--json", str(js), "-q"], stdout=out,
                         stderr=subprocess.STDOUT, cwd=tmp_path, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while _in_ns(netns, "ip", "link", "show", tap).returncode:
            assert p.poll() is None, (tmp_path / "vmsim.out").read_text()
            assert time.monotonic() < deadline, "the TAP interface never appeared"
            time.sleep(0.1)
        assert _in_ns(netns, "ip", "addr", "add", f"{host_ip}/24", "dev", tap).returncode == 0
        assert _in_ns(netns, "ip", "link", "set", tap, "up").returncode == 0
        r = _in_ns(netns, "ping", "-c", "5", "-i", "0.2", "-W", "3", guest_ip, timeout=40)
        assert r.returncode == 0, r.stdout + r.stderr
        assert " 0% packet loss" in r.stdout, r.stdout
    finally:
        if p.poll() is None:
            p.send_signal(2)                          # Ctrl-C: a clean stop with a summary
        try:
            p.wait(20)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
        out.close()
    assert p.returncode == 130, (tmp_path / "vmsim.out").read_text()   # stopped by SIGINT
    return load_json(js)



@pytest.mark.timeout(90)
def test_real_ping_reaches_a_guest_through_tap(tmp_path, netns):
    """vmsim runs inside a fresh network namespace with a TAP backend; the test gives the
    TAP interface an address and pings the guest's responder with the real `ping`: ARP and
    ICMP go through the host kernel, the TAP, the device, the ring and the guest, and back."""
    cfg = write_yaml(tmp_path, """
        name: tap
        duration: 30
        vms:
          vm0:
            memory: 32M
            devices:
              eth0: {type: net, backend: {tap: vmsimtap0}}
            workloads:
              ip: {type: net-responder, device: eth0, ip: 10.199.0.2}
        """)
    s = ping_a_guest_through_tap(tmp_path, netns, cfg, "vmsimtap0", "10.199.0.1",
                                 "10.199.0.2")
    ip = s["workloads"]["vm0.ip"]
    assert ip["errors"] == 0 and ip["ops"] >= 5 and ip["arp_replies"] >= 1, ip
    info = s["vms"]["vm0"]["devices"]["eth0"]["info"]
    assert info["backend_info"]["tap"] == "vmsimtap0"
    assert info["backend_info"]["rx"] >= 6 and info["backend_info"]["tx"] >= 6


CONFIGS = Path(__file__).resolve().parent.parent / "configs"
