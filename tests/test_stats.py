"""The stats region and what reads it: the record layout and who writes which word, the ring
decoded from guest RAM as a debugger would (against the driver's and device's own state,
across many laps of both formats), the sampled latency histogram, and real runs: counters
that agree with the ring and with the guest platform's own count of notifications, and the
--stats-file lines."""

import json
import mmap
import time

import pytest
from test_run import BLK_MMIO, Launch, load_json, run_vmsim, write_yaml

from vmsim.abi import features as F
from vmsim.guest.memory import DmaMemory, GuestRAM
from vmsim.guest.virtio.vring import vring_create_virtqueue
from vmsim.host.memory import GuestMemory
from vmsim.host.virtio.queue_packed import PackedQueue
from vmsim.host.virtio.queue_split import SplitQueue
from vmsim.launcher.rates import percentile_ns, queue_rates
from vmsim.launcher.ringview import RingView, picture
from vmsim.launcher.statsread import QueueSample, RunReader
from vmsim.launcher.top import running
from vmsim.machine.stats import (
    EXIT_KINDS,
    HEADER_WORDS,
    LATENCY_BUCKETS,
    LATENCY_SAMPLE_EVERY,
    RECORD_WORDS,
    D,
    Q,
    StatsRegion,
    W,
    exit_word,
    fold_histogram,
    histogram,
    latency_bucket,
    region_size,
)

BASE = 0x4000_0000
U16 = 0xFFFF
DRIVER_WORDS = set(range(0, 16)) | set(range(Q.LAT_HIST, Q.LAT_HIST + LATENCY_BUCKETS))
DEVICE_WORDS = set(range(16, Q.LAT_HIST))


# ---- the layout ------------------------------------------------------------------------------

def test_layout_fits_and_records_do_not_overlap():
    for enum in (Q, D, W):
        values = [int(f) for f in enum]
        assert len(values) == len(set(values)), enum
        assert max(values) < RECORD_WORDS, enum
    assert Q.LAT_HIST + LATENCY_BUCKETS <= RECORD_WORDS
    assert D.EXIT_KIND + len(EXIT_KINDS) <= RECORD_WORDS
    assert {int(f) for f in Q if f != Q.LAT_HIST} <= DRIVER_WORDS | DEVICE_WORDS
    mm = mmap.mmap(-1, region_size(3, 2, 1))
    StatsRegion.format(mm, 3, 2, 1)
    st = StatsRegion(mm)
    try:
        recs = [st.queue(i) for i in range(3)] + [st.device(i) for i in range(2)] \
            + [st.workload(0)]
        for i, r in enumerate(recs):
            r[RECORD_WORDS - 1] = i + 1         # the last word of each record
        words = memoryview(mm).cast("Q")
        for i in range(len(recs)):
            assert words[HEADER_WORDS + RECORD_WORDS * (i + 1) - 1] == i + 1
        assert words[5] == RECORD_WORDS and words[6] == LATENCY_BUCKETS
        words.release()
        for r in recs:
            r.release()
        with pytest.raises(IndexError):
            st.queue(3)
    finally:
        st.release()
        mm.close()


def test_exit_kinds_and_buckets():
    assert exit_word("interrupt_ack") == D.EXIT_KIND + EXIT_KINDS.index("interrupt_ack")
    assert exit_word("no such kind") == D.EXIT_KIND + EXIT_KINDS.index("other")
    assert latency_bucket(0) == 0 and latency_bucket(1) == 1 and latency_bucket(1023) == 10
    assert latency_bucket(1 << 40) == LATENCY_BUCKETS - 1
    h = [0] * 64
    h[3], h[40], h[50] = 5, 2, 1
    f = fold_histogram(h)
    assert len(f) == LATENCY_BUCKETS and f[3] == 5 and f[-1] == 3 and sum(f) == 8


def test_percentiles_of_a_log2_histogram():
    h = [0] * LATENCY_BUCKETS
    assert percentile_ns(h, 0.5) is None
    h[11] = 100                                   # all in [1024, 2048) ns
    assert 1024 <= percentile_ns(h, 0.5) < 2048
    h[21] = 1                                     # one in [1 ms, 2 ms)
    assert percentile_ns(h, 0.5) < 2048
    assert percentile_ns(h, 0.999) >= 1 << 20


# ---- a driver and a device queue in one process, and the reader ---------------------------------

def _features(ring: str, indirect: bool = False) -> int:
    f = F.bit(F.VIRTIO_F_VERSION_1) | F.bit(F.VIRTIO_RING_F_EVENT_IDX)
    if ring == "packed":
        f |= F.bit(F.VIRTIO_F_RING_PACKED)
    if indirect:
        f |= F.bit(F.VIRTIO_RING_F_INDIRECT_DESC)
    return f


class Rig:
    def __init__(self, ring: str, num: int, stats: bool = False) -> None:
        self.mm = mmap.mmap(-1, 1 << 20)
        self.ram = GuestRAM(self.mm, BASE)
        self.dma = DmaMemory(self.ram)
        self.rec_mm = mmap.mmap(-1, 8 * RECORD_WORDS)
        self.rec = memoryview(self.rec_mm).cast("Q") if stats else None
        self.vq = vring_create_virtqueue(0, num, 4, self.dma, _features(ring),
                                         lambda vq: True, lambda vq: None, "t", self.rec)
        cls = PackedQueue if ring == "packed" else SplitQueue
        self.mem = GuestMemory(self.mm, BASE)
        self.dev = cls(self.mem, num, self.vq.desc_addr, self.vq.avail_addr,
                       self.vq.used_addr, True, False, stats=self.rec)
        self.view = RingView(memoryview(self.mm).toreadonly(), BASE, ring, num,
                             self.vq.desc_addr, self.vq.avail_addr, self.vq.used_addr)
        self.buf, _ = self.dma.alloc(64, 8)
        self.token = 0

    def add(self) -> bool:
        self.token += 1
        return self.vq.add_inbuf([(self.buf, 64)], self.token) == 0

    def read(self):
        return self.view.read(*self.dev.ring_positions())

    def close(self) -> None:
        self.view.release()
        self.vq.release()
        self.dev.release()
        self.mem.release()
        self.ram.release()
        if self.rec is not None:
            self.rec.release()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("ring", ["split", "packed"])
def test_ring_read_from_ram_matches_both_sides(ring):
    """Over many laps: the reader's avail and used positions are the driver's and the
    device's, and its slot picture counts what is in flight on each side."""
    num = 16 if ring == "split" else 13          # a packed ring of any size
    rig = Rig(ring, num)
    popped: list = []
    added = used = 0
    try:
        for step in range(2000):
            op = (step * 7919) % 5                # a fixed, uneven mix of the four moves
            if op in (0, 1) and rig.vq.num_free:
                assert rig.add()
                added += 1
            elif op == 2:
                popped += rig.dev.pop_batch((step % 3) + 1)
            elif op == 3 and popped:
                k = (step % len(popped)) + 1
                rig.dev.fill_batch(popped[:k], [0] * k)
                popped = popped[k:]
                used += k
            else:
                while rig.vq.get_buf() is not None:
                    pass
            rs = rig.read()
            if ring == "split":
                assert rs.avail_idx == rig.vq.avail_idx_shadow
                assert rs.used_idx == rig.dev.last_used_idx
                assert rs.in_ring == (added - used) & U16
                assert rs.slots.count(2) == len(popped) == rig.dev.inflight
                assert rs.slots.count(1) == added - used - len(popped)
            else:
                pos = rig.vq.ring_positions()[0]
                assert (rs.avail_idx, rs.avail_wrap) == (pos & 0x7FFF, pos >> 15), step
                assert (rs.used_idx, rs.used_wrap) == (rig.dev.used_idx,
                                                       rig.dev.used_wrap_counter)
                # one descriptor per buffer: AVAIL != USED exactly on the buffers not used
                assert rs.in_ring == added - used
        assert added > 10 * num and used > 10 * num     # many laps
    finally:
        rig.close()


def test_picture_cells():
    slots = bytearray(16)
    slots[0:4] = b"\x02" * 4
    slots[4:6] = b"\x01" * 2
    cells = picture(slots, 4)
    assert cells == [(8, True), (4, False), (0, False), (0, False)]
    assert len(picture(bytearray(3), 10)) == 3


@pytest.mark.parametrize("ring", ["split", "packed"])
def test_latency_is_sampled_and_each_side_writes_only_its_words(ring):
    rig = Rig(ring, 16, stats=True)
    try:
        rec = rig.rec
        for i in range(RECORD_WORDS):
            rec[i] = 0xDEAD
        n = 4 * LATENCY_SAMPLE_EVERY
        for _ in range(n):
            assert rig.add()
            chains = rig.dev.pop_batch()
            rig.dev.fill_batch(chains, [8] * len(chains))
            assert rig.vq.get_buf() is not None
        rig.vq.publish_stats()
        changed = {i for i in range(RECORD_WORDS) if rec[i] != 0xDEAD}
        assert changed <= DRIVER_WORDS, sorted(changed - DRIVER_WORDS)
        assert sum(histogram(rec)) == n // LATENCY_SAMPLE_EVERY
        assert rec[Q.LAT_EVERY] == LATENCY_SAMPLE_EVERY and rec[Q.ADDED] == n
        assert rec[Q.DRV_AVAIL] == rig.vq.ring_positions()[0]
        before = set(changed)
        rig.dev.publish_stats()
        changed = {i for i in range(RECORD_WORDS) if rec[i] != 0xDEAD} - before
        assert changed <= DEVICE_WORDS, sorted(changed - DEVICE_WORDS)
        assert rec[Q.USED] == n and rec[Q.BYTES_WRITTEN] == 8 * n and rec[Q.DEV_IN_FLIGHT] == 0
        # sampling off: no more samples
        rig.vq.stop_sampling()
        for _ in range(n):
            assert rig.add()
            rig.dev.fill_batch(rig.dev.pop_batch(), [8])
            assert rig.vq.get_buf() is not None
        rig.vq.publish_stats()
        assert sum(histogram(rec)) == n // LATENCY_SAMPLE_EVERY
        # a buffer taken back unused leaves no stamp for the next user of its ID
        rig.vq.lat_mask = LATENCY_SAMPLE_EVERY - 1
        for _ in range(LATENCY_SAMPLE_EVERY):
            assert rig.add()
        assert any(rig.vq.lat_t)
        while rig.vq.detach_unused_buf() is not None:
            pass
        assert not any(rig.vq.lat_t)
    finally:
        rig.close()


def test_rates_use_the_writers_clock():
    base = {f.name.lower(): 0 for f in Q}
    prev = QueueSample(0, dict(base, dev_published_ns=1_000_000_000,
                               drv_published_ns=1_000_000_000), [0] * LATENCY_BUCKETS)
    cur_c = dict(base, dev_published_ns=3_000_000_000, drv_published_ns=2_000_000_000,
                 used=10_000, bytes_read=4_000_000, kicks=30, kicks_suppressed=10,
                 interrupts=5, interrupts_suppressed=45)
    hist = [0] * LATENCY_BUCKETS
    hist[15] = 10                                   # [16.4, 32.8) µs
    r = queue_rates(QueueSample(0, cur_c, hist), prev, dt=0.25)
    assert r.ops_per_s == pytest.approx(5000)       # over the device's 2 s, not the 0.25 s
    assert r.mb_per_s == pytest.approx(2.0)
    assert r.kicks_per_s == pytest.approx(30) and r.kicks_suppressed == pytest.approx(0.25)
    assert r.irqs_per_s == pytest.approx(2.5) and r.irqs_suppressed == pytest.approx(0.9)
    assert 16384 <= r.p50_ns < 32768


# ---- real runs -------------------------------------------------------------------------------

RING_CHECK = """\
name: ring-check
duration: 40
vms:
  split0:
    memory: 16M
    devices:
      vda: {type: blk, backend: memory, size: 4M, queue_size: 64}
    workloads:
      verify: {type: blk-verify, device: vda, in_flight: 8, ops: 3000}
  packed0:
    memory: 16M
    devices:
      vda: {type: blk, backend: memory, size: 4M, queue_size: 48, ring: packed}
    workloads:
      verify: {type: blk-verify, device: vda, in_flight: 8, ops: 3000}
  busy:
    memory: 16M
    devices:
      vda: {type: blk, backend: memory, size: 4M}
    workloads:
      verify: {type: blk-verify, device: vda, in_flight: 4}
"""


def _reader_of(launch: Launch, timeout: float = 20) -> tuple[dict, RunReader]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for run, _, m in running():
            if run.startswith(f"vmsim-{launch.pid}-") and m is not None:
                return m, RunReader(m)
        launch.sample()
        assert launch.p.poll() is None, launch.output()
        time.sleep(0.05)
    pytest.fail("no manifest for the run\n" + launch.output())


def _quiet(reader: RunReader, vm: str, timeout: float = 20):
    """A sample in which `vm`'s workload has ended and its queue's counters stand still."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        s = reader.sample()
        w = s.workloads[(vm, "verify")]
        q = s.devices[(vm, "vda")].queues[0]
        c = q.c
        key = (c["added"], c["completed"], c["used"], c["dev_last_avail"], c["dev_used"])
        if w["ended_ns"] and c["drv_published_ns"] > w["ended_ns"] \
                and c["dev_published_ns"] > w["ended_ns"] and key == last:
            return s
        last = key if w["ended_ns"] else None
        time.sleep(0.2)
    pytest.fail(f"{vm} did not go quiet")


@pytest.mark.timeout(90)
def test_counters_agree_with_the_ring(tmp_path):
    """Two VMs finish their ops while a third keeps the run going: their rings, read from
    guest RAM, agree with the counters exactly; the busy one stays within its bounds."""
    topo = write_yaml(tmp_path, RING_CHECK)
    js = tmp_path / "s.json"
    launch = Launch(tmp_path, "run", str(topo), "--no-dashboard", "--json", str(js))
    reader = None
    try:
        _, reader = _reader_of(launch)
        for vm in ("split0", "packed0"):
            s = _quiet(reader, vm)
            q = s.devices[(vm, "vda")].queues[0]
            c, rs = q.c, q.ring
            assert rs is not None, q.ring_error
            added = c["added"]
            assert added == 3001, c          # 3000 ops and blk-verify's GET_ID
            # added == used + in flight, on both sides
            assert c["used"] == c["popped"] == c["completed"] == added
            assert c["dev_in_flight"] == 0 and c["num_free"] == c["size"]
            if vm == "split0":
                assert rs.avail_idx == added & U16 == c["drv_avail"]
                assert rs.used_idx == c["used"] & U16 == c["dev_used"] == c["drv_last_used"]
                assert c["dev_last_avail"] == rs.avail_idx
                assert rs.in_ring == 0 and not any(rs.slots)
            else:
                assert (rs.avail_idx | rs.avail_wrap << 15) == c["drv_avail"]
                assert (rs.used_idx | rs.used_wrap << 15) == c["dev_used"] == c["drv_last_used"]
                assert rs.in_ring == 0          # indirect: one descriptor per buffer, all used
            # kick decisions: one per batch of adds, each sent or suppressed
            assert 1 <= c["kicks"] + c["kicks_suppressed"] <= added
            assert c["notifies"] <= c["kicks"]
            assert sum(q.hist) == added // c["lat_every"]
        s = reader.sample()
        q = s.devices[("busy", "vda")].queues[0]
        assert 0 <= q.ring.in_ring <= q.c["size"] and q.c["added"] > 0
        launch.p.send_signal(2)           # SIGINT: end it now
        rc = launch.wait(30)
        assert rc == 130, launch.output()
        launch.assert_clean()
    finally:
        if reader is not None:
            reader.close()
        launch.close()
    # After the run: every kick the queues counted is a write of an ioeventfd the guest
    # platform counted on its own (MMIO, no notification data), per VM.
    summary = load_json(js)
    for vm in ("split0", "packed0", "busy"):
        v = summary["vms"][vm]
        q = v["devices"]["vda"]["queues"][0]
        assert sum(q["kicks"] for q in v["devices"]["vda"]["queues"]) == v["ioeventfd_writes"]
        assert q["added"] == q["used"] + q["in_flight"]
        lat = q["latency"]
        assert lat["samples"] > 0 and lat["p50_us"] <= lat["p99_us"]


@pytest.mark.timeout(60)
def test_stats_file_lines(tmp_path):
    sf = tmp_path / "stats.jsonl"
    js = tmp_path / "s.json"
    rc, launch = run_vmsim(tmp_path, "run", str(BLK_MMIO), "--duration", "2.6", "--json",
                           str(js), "--stats-every", "0.5", "--stats-file", str(sf))
    assert rc == 0, launch.output()
    lines = [json.loads(x) for x in sf.read_text().splitlines()]
    assert 5 <= len(lines) <= 7, len(lines)
    assert [x["final"] for x in lines] == [False] * (len(lines) - 1) + [True]
    ts = [x["t"] for x in lines]
    assert ts == sorted(ts)
    for x in lines[:-1]:
        assert x["interval_s"] == pytest.approx(0.5, abs=0.2)
    summary = load_json(js)
    assert all(x["run"] == summary["run"] for x in lines)
    prev_ops = 0
    for x in lines:
        w = x["workloads"]["vm0.verify"]
        q = x["vms"]["vm0"]["vda"]["queues"][0]
        assert w["ops"] >= prev_ops
        prev_ops = w["ops"]
        assert q["ring"] == "split" and q["size"] == 256 and q["ready"]
    mid = lines[2]
    q = mid["vms"]["vm0"]["vda"]["queues"][0]
    assert mid["workloads"]["vm0.verify"]["ops_per_s"] > 0 and q["ops_per_s"] > 0
    assert q["kicks_per_s"] + q["interrupts_per_s"] > 0
    assert q["latency_p50_us"] is not None
    assert mid["vms"]["vm0"]["vda"]["exits_by_kind"]["interrupt_status"] > 0
    assert lines[-1]["workloads"]["vm0.verify"]["ops"] <= summary["workloads"]["vm0.verify"][
        "ops"]


@pytest.mark.timeout(30)
def test_stats_every_needs_a_file(tmp_path):
    rc, launch = run_vmsim(tmp_path, "run", str(BLK_MMIO), "--stats-every", "1")
    assert rc == 2 and "--stats-file" in launch.err
