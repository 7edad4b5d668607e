"""Ring features end to end: VIRTIO_F_IN_ORDER, VIRTIO_F_NOTIFICATION_DATA and the choice of
ring format, with the real guest virtio core and transport driver against the real host blk
device in one process (tests/test_guest_core.py's Machine), and with real `vmsim run`s.

In one process the queue is driven by RawBlk, a small virtio driver written here that builds
virtio-blk requests by hand (header, data, status) on the blk device's queue through the real
virtqueue API, so that every token and used length can be checked; the device is the real
BlkDevice serving the ring.
"""

import struct
import threading
from pathlib import Path

import pytest
import yaml
from test_guest_core import MMIO_BASE, Machine
from test_run import load_json, one_device, run_vmsim

from vmsim.abi import blk as B
from vmsim.abi import features as F
from vmsim.abi import ids
from vmsim.abi import mmio as M
from vmsim.guest.drivers.blk import BlkDriver
from vmsim.guest.virtio.core import VirtioDriver
from vmsim.guest.virtio.ring_packed import PackedVirtqueue
from vmsim.guest.virtio.ring_split import SplitVirtqueue
from vmsim.host.virtio.queue_packed import PackedQueue
from vmsim.host.virtio.queue_split import SplitQueue

pytestmark = pytest.mark.timeout(30)

IN_ORDER = F.bit(F.VIRTIO_F_IN_ORDER)
NOTIF_DATA = F.bit(F.VIRTIO_F_NOTIFICATION_DATA)
INDIRECT = F.bit(F.VIRTIO_RING_F_INDIRECT_DESC)
RINGS = pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
SECTOR = 512
HDR = 16

# the spec's layouts, spelled out here (split used ring; packed descriptor flags)
USED_ELEM = struct.Struct("<II")
F_AVAIL, F_USED = 1 << 7, 1 << 15


@pytest.fixture
def machine():
    made = []

    def _make(**kw) -> Machine:
        m = Machine(**kw)
        made.append(m)
        return m

    yield _make
    for m in made:
        m.close()


class RawBlk(VirtioDriver):
    """A virtio driver for the blk device that builds requests itself: one queue, tokens are
    ints, completions (token, used length) collected NAPI-style on the interrupt thread."""

    name = "raw-blk"
    id_table = ((ids.VIRTIO_ID_BLOCK, ids.VIRTIO_DEV_ANY_ID),)

    def __init__(self, m: Machine, slots: int = 64, max_sectors: int = 4) -> None:
        self.m = m
        self.lock = threading.Lock()
        self.cond = threading.Condition(self.lock)
        self.done: list[tuple[int, int]] = []
        self.vq = None
        self.slots = slots
        self.max_sectors = max_sectors
        self.kick_values: list[int] = []          # expected notification data of each kick
        self.desc_pos = 0                         # free-running descriptors made available
        self.n_added = 0

    # -- the driver model
    def probe(self, vdev) -> int:
        [self.vq] = vdev.config.find_vqs(vdev, 1, [self._callback], ["req.0"])
        dma = self.m.dma
        self.hdr_gpa, self.hdr = dma.alloc(32 * self.slots, 64)
        self.data_gpa, self.data = dma.alloc(SECTOR * self.max_sectors * self.slots, SECTOR)
        return 0

    def remove(self, vdev) -> None:
        vdev.reset_device()
        while self.vq.detach_unused_buf() is not None:
            pass
        vdev.config.del_vqs(vdev)
        self.hdr.release()
        self.data.release()
        self.m.dma.free(self.hdr_gpa)
        self.m.dma.free(self.data_gpa)

    def _callback(self, vq) -> None:
        with self.cond:
            while True:
                vq.disable_cb()
                while (r := vq.get_buf()) is not None:
                    self.done.append(r)
                if vq.enable_cb():
                    break
            self.cond.notify_all()

    # -- requests
    def add(self, tok: int, write: bool, nsect: int, sector: int) -> int:
        """Queue request `tok` (slot tok % slots): returns the used length it must get back
        (status byte, plus the data for a read). Caller holds the lock."""
        s = tok % self.slots
        hdr = self.hdr_gpa + 32 * s
        status = hdr + 16
        data = self.data_gpa + SECTOR * self.max_sectors * s
        struct.pack_into("<IIQ", self.hdr, 32 * s, B.VIRTIO_BLK_T_OUT if write
                         else B.VIRTIO_BLK_T_IN, 0, sector)
        self.hdr[32 * s + 16] = 0xFF
        dlen = SECTOR * nsect
        if write:
            err = self.vq.add_sgs([(hdr, HDR), (data, dlen)], [(status, 1)], tok)
        else:
            err = self.vq.add_sgs([(hdr, HDR)], [(data, dlen), (status, 1)], tok)
        assert err == 0
        self.n_added += 1
        self.desc_pos += 1 if self.vq.indirect else 3
        return 1 if write else dlen + 1

    def kick(self) -> bool:
        with self.lock:
            needed = self.vq.kick_prepare()
            if needed:
                self.kick_values.append(self.expected_notification())
        if needed:
            assert self.vq.notify()
        return needed

    def expected_notification(self) -> int:
        """vqn | next << 16, computed from the count of what was made available: split, the
        avail idx (mod 2^16); packed, next_off | next_wrap << 15 (wrap counter from 1)."""
        if isinstance(self.vq, PackedVirtqueue):
            num = self.vq.num
            nxt = self.desc_pos % num | (1 ^ (self.desc_pos // num) & 1) << 15
        else:
            nxt = self.n_added & 0xFFFF
        return self.vq.index | nxt << 16

    def wait_done(self, n: int) -> None:
        with self.cond:
            assert self.cond.wait_for(lambda: len(self.done) >= n, timeout=5), \
                f"{len(self.done)} of {n} completed"


def boot_raw(machine, **dev_kw) -> tuple[Machine, RawBlk]:
    m = machine(dev_kw=dev_kw)
    drv = RawBlk(m)
    assert m.boot(drv) == 0
    return m, drv


def host_ring(m: Machine):
    return m.host.call(lambda: m.dev.queues[0].ring)


def host_serve(m: Machine, n: int) -> int:
    """One device pass on the host thread: pop n, execute, fill_batch (one flush), notify."""

    def job() -> int:
        q = m.dev.queues[0]
        ring = q.ring
        chains = ring.pop_batch(n)
        ring.fill_batch(chains, [m.dev.handler.execute(c) for c in chains])
        if chains and ring.need_notify():
            m.t.signal_used(0)
        return len(chains)

    return m.host.call(job)


# ---- VIRTIO_F_IN_ORDER ---------------------------------------------------------------------------
@RINGS
@pytest.mark.parametrize("indirect", [True, False], ids=["indirect", "direct"])
def test_in_order_one_used_entry_per_batch(machine, packed, indirect):
    """With IN_ORDER the device marks a batch used with one entry: split, one used element
    at the batch's first slot naming its last head, used->idx moved by the batch; packed, one
    used descriptor at the batch's first position with its last buffer's id, the position
    skipping every descriptor of the batch. The other buffers of the batch are "used
    completely": the driver hands each token back with its whole writable length, in
    submission order. Batches of 1, 5, 7 and 3 (reads of 1-3 sectors and writes) on a
    16-entry queue, several times round the ring."""
    m, drv = boot_raw(machine, packed=packed, queue_size=16, offer=IN_ORDER,
                      withhold=0 if indirect else INDIRECT)
    vq = drv.vq
    assert m.vdev.has_feature(F.VIRTIO_F_IN_ORDER) and vq.in_order
    assert vq.indirect == indirect
    ring = host_ring(m)
    assert ring.in_order and isinstance(ring, PackedQueue if packed else SplitQueue)
    m.host.set_serving(False)
    mm = m.mm
    base = m.ram.base
    expect: list[tuple[int, int]] = []
    tok = 0
    sizes = [1, 5, 7, 3] if indirect else [1, 5, 3, 2]     # direct: 3 descriptors each
    for rnd in range(12):
        b = sizes[rnd % len(sizes)]
        first_tok = tok
        with drv.lock:
            if packed:
                pos0 = vq.next_avail_idx
                wrap0 = vq.avail_wrap_counter
            else:
                used0 = vq.last_used_idx
                # fill the used slots of this batch with a sentinel (the test reads them
                # back: only the first may change)
                for i in range(b):
                    at = vq.used_addr + 4 + 8 * ((used0 + i) % vq.num) - base
                    USED_ELEM.pack_into(mm, at, 0xDEAD, 0xBEEF)
            heads = []
            for _ in range(b):
                write = tok % 3 == 0
                nsect = 1 + tok % 3
                heads.append(vq.free_head)      # the head (split) / buffer id (packed)
                expect.append((tok, drv.add(tok, write, nsect, tok % 64 * 4)))
                tok += 1
        drv.kick()
        assert host_serve(m, b) == b                       # one pass: one fill_batch
        drv.wait_done(tok)
        if packed:
            ndesc = 1 if indirect else 3
            flags = struct.unpack_from("<H", mm, vq.desc_addr + 16 * pos0 + 14 - base)[0]
            bid = struct.unpack_from("<H", mm, vq.desc_addr + 16 * pos0 + 12 - base)[0]
            used_bits = F_AVAIL | F_USED if wrap0 else 0
            assert flags & (F_AVAIL | F_USED) == used_bits
            assert bid == heads[-1]
            ln = struct.unpack_from("<I", mm, vq.desc_addr + 16 * pos0 + 8 - base)[0]
            assert ln == expect[-1][1]
            # every other descriptor of the batch still shows the driver's avail bits
            for j in range(1, b * ndesc):
                p = pos0 + j
                w = wrap0 ^ (p >= vq.num)
                p %= vq.num
                fl = struct.unpack_from("<H", mm, vq.desc_addr + 16 * p + 14 - base)[0]
                assert fl & (F_AVAIL | F_USED) == (F_AVAIL if w else F_USED), (rnd, j)
        else:
            idx = struct.unpack_from("<H", mm, vq.used_addr + 2 - base)[0]
            assert idx == (used0 + b) & 0xFFFF
            elems = [USED_ELEM.unpack_from(mm, vq.used_addr + 4 + 8 * ((used0 + i) % vq.num)
                                           - base) for i in range(b)]
            assert elems[0][0] == heads[-1]
            assert elems[0][1] == expect[-1][1]
            assert elems[1:] == [(0xDEAD, 0xBEEF)] * (b - 1)
        assert drv.done[first_tok:] == expect[first_tok:]
    assert drv.done == expect
    assert ring.n_used == tok and ring.inflight == 0
    assert vq.num_free == vq.num and vq.in_flight() == 0
    assert m.dev.errors == [] and m.dev.guest_errors == []


@RINGS
def test_in_order_with_the_blk_driver_and_the_host_loop(machine, packed):
    """The real virtio_blk driver and the host's own service loop (batches of up to 64 per
    fill_batch) with IN_ORDER, on a non-power-of-two packed ring: 600 writes then reads of
    distinct sectors with up to the queue depth in flight, all verified."""
    m = machine(dev_kw=dict(packed=packed, queue_size=24 if packed else 16, offer=IN_ORDER))
    assert m.boot() == 0
    blk = m.blk
    vq = m.vdev.vqs[0]
    assert vq.in_order and vq.num == (24 if packed else 16)
    depth = blk.queue_depth
    bufs = [m.dma.alloc(SECTOR, SECTOR) for _ in range(depth)]
    cond = threading.Condition()
    results: dict[int, int] = {}

    def done(status: int, arg: int) -> None:
        with cond:
            results[arg] = status
            cond.notify_all()

    def run(kind: int, lo: int, hi: int) -> None:
        k = lo
        while k < hi:
            n = min(depth, hi - k)
            with blk.plug():
                for j in range(n):
                    gpa, view = bufs[j]
                    if kind == B.VIRTIO_BLK_T_OUT:
                        view[:] = bytes([(k + j) & 0xFF or 1]) * SECTOR
                    else:
                        view[:] = bytes(SECTOR)
                    assert blk.submit(kind, k + j, [(gpa, SECTOR)], done, (kind, k + j)) == 0
            batch = [(kind, k + j) for j in range(n)]
            with cond:
                assert cond.wait_for(lambda b=batch: all(key in results for key in b),
                                     timeout=5)
            if kind == B.VIRTIO_BLK_T_IN:
                for j in range(n):
                    assert bytes(bufs[j][1]) == bytes([(k + j) & 0xFF or 1]) * SECTOR
            k += n

    run(B.VIRTIO_BLK_T_OUT, 0, 600)
    run(B.VIRTIO_BLK_T_IN, 0, 600)
    assert len(results) == 1200 and set(results.values()) == {B.VIRTIO_BLK_S_OK}
    ring = host_ring(m)
    assert ring.n_used == vq.n_completed == 1200
    assert m.dev.errors == [] and m.dev.guest_errors == []


# ---- VIRTIO_F_NOTIFICATION_DATA ------------------------------------------------------------------
def record_notifies(m: Machine) -> list[int]:
    """Every trapped QueueNotify value the transport receives (a spy around the real
    MmioTransport.write, which still handles the access)."""
    seen: list[int] = []
    real = m.t.write

    def write(offset: int, width: int, value: int) -> None:
        if offset == M.QUEUE_NOTIFY:
            seen.append(value)
        real(offset, width, value)

    m.t.write = write
    return seen


@RINGS
@pytest.mark.parametrize("indirect", [True, False], ids=["indirect", "direct"])
def test_notification_data_every_kick_carries_the_next_position(machine, packed, indirect):
    """Each kick is a QueueNotify write of vqn | next << 16: split, next = the avail idx
    after the adds; packed, next_off | next_wrap << 15 - computed here from the count of
    descriptors made available. Those values never match the queue's ioeventfd (it matches
    the bare queue index) so each is a trapped write, which the host checks against the ring
    (all consistent: no guest error). The one exception, checked too: a packed position of
    offset 0 with wrap counter 0 makes the value equal the bare index, which the ioeventfd
    takes (no exit, no check), as with KVM's datamatch. Batches of 1..7 requests on a packed
    ring of 13 wrap it many times."""
    m = machine(dev_kw=dict(packed=packed, queue_size=13 if packed else 16, offer=NOTIF_DATA,
                            withhold=0 if indirect else INDIRECT))
    seen = record_notifies(m)
    drv = RawBlk(m)
    assert m.boot(drv) == 0
    vq = drv.vq
    assert m.vdev.has_feature(F.VIRTIO_F_NOTIFICATION_DATA)
    assert m.dev.negotiated(F.VIRTIO_F_NOTIFICATION_DATA)
    exits0 = m.t.n_trapped_notifies
    ioev0 = m.platform.ioeventfd_writes
    assert seen == []
    tok = 0
    cap = vq.num if indirect else vq.num // 3
    for rnd in range(40):
        b = 1 + rnd % min(7, cap)
        with drv.lock:
            for _ in range(b):
                drv.add(tok, tok % 2 == 0, 1, tok % 64)
                tok += 1
        drv.kick()
        drv.wait_done(tok)
    assert vq.n_kicks == len(drv.kick_values) > 0
    trapped = [v for v in drv.kick_values if v != vq.index]
    assert seen == trapped
    assert m.t.n_trapped_notifies - exits0 == len(trapped)
    assert m.platform.ioeventfd_writes - ioev0 == len(drv.kick_values) - len(trapped)
    if packed:
        assert drv.desc_pos > 5 * vq.num
    assert all(v & 0xFFFF == 0 for v in seen)
    assert m.dev.guest_errors == [] and host_ring(m).n_notify_data_errors == 0
    assert sorted(t for t, _ in drv.done) == list(range(tok))


def _notify_by_hand(m: Machine, value: int) -> tuple[int, int]:
    """Write QueueNotify by hand (a trapped write: the value matches no ioeventfd); the new
    guest errors and notification data errors it caused."""
    e0 = len(m.dev.guest_errors)
    n0 = host_ring(m).n_notify_data_errors
    t0 = m.t.n_trapped_notifies
    m.platform.writel(MMIO_BASE + M.QUEUE_NOTIFY, value)
    assert m.t.n_trapped_notifies == t0 + 1
    return len(m.dev.guest_errors) - e0, host_ring(m).n_notify_data_errors - n0


@RINGS
def test_notification_data_is_checked_by_the_host(machine, packed):
    """A QueueNotify whose position is ahead of what the driver made available is a guest
    error, counted in ring.n_notify_data_errors; the exact position (and, with buffers
    available but not yet taken, any position up to their end - up to a full ring) is
    not. Values written by hand are trapped (they match no ioeventfd)."""
    m, drv = boot_raw(machine, packed=packed, queue_size=13 if packed else 16,
                      offer=NOTIF_DATA)
    vq = drv.vq
    tok = 0
    # 20 requests first: the positions used below then never include packed offset 0 with
    # wrap counter 0, whose value would be the bare queue index (the ioeventfd's, no trap)
    for _ in range(5):
        with drv.lock:
            for _ in range(4):
                drv.add(tok, True, 1, tok)
                tok += 1
        drv.kick()
        drv.wait_done(tok)

    def at(n_ahead: int) -> int:
        """vqn | the position n_ahead descriptors after the driver's, << 16."""
        if packed:
            p = drv.desc_pos + n_ahead
            return p % vq.num | (1 ^ (p // vq.num) & 1) << 15
        return (drv.n_added + n_ahead) & 0xFFFF

    assert _notify_by_hand(m, 0 | at(0) << 16) == (0, 0)
    assert _notify_by_hand(m, 0 | at(1) << 16) == (1, 1)
    assert _notify_by_hand(m, 0 | at(3) << 16) == (1, 1)
    assert "ahead of the ring" in m.dev.guest_errors[-1]
    # the whole ring made available, none of it taken yet by the (paused) device: every
    # position from the device's to the driver's (a full lap ahead) is consistent
    m.host.set_serving(False)
    k = vq.num_free
    with drv.lock:
        for _ in range(k):
            drv.add(tok, True, 1, tok)
            tok += 1
    assert vq.num_free == 0
    for ahead in range(-k, 1):
        assert _notify_by_hand(m, 0 | at(ahead) << 16) == (0, 0), ahead
    if not packed:
        # a full ring and one ahead: the split ring's 16-bit index says so; a packed ring's
        # one-bit wrap counter reads it as a lap less one behind (a late kick), which is fine
        assert _notify_by_hand(m, 0 | at(1) << 16) == (1, 1)
    m.host.set_serving(True)
    drv.kick()
    drv.wait_done(tok)
    assert host_ring(m).n_notify_data_errors == (2 if packed else 3)
    assert m.dev.errors == []                   # a guest error, not a broken device




@RINGS
def test_notification_data_late_kick_is_not_an_error(request, machine, packed):
    """Linux computes the notification data when it notifies, after dropping the queue lock
    (virtio_blk: kick_prepare under the lock, notify outside it), so a kick can reach the
    device after the device has already taken the buffers it announces and more made
    available since: its position is behind the device's, never ahead. The split ring's
    check accepts that (behind the avail idx by at most the queue size); the packed one
    must too. Here: the driver makes 2 buffers available (kick value V), then 2 more; the
    device takes all 4; then the kick with V arrives."""
    m, drv = boot_raw(machine, packed=packed, queue_size=13 if packed else 16,
                      offer=NOTIF_DATA)
    m.host.set_serving(False)
    with drv.lock:
        for tok in range(2):
            drv.add(tok, True, 1, tok)
        late = 0 | drv.expected_notification()
        for tok in range(2, 4):
            drv.add(tok, True, 1, tok)
    assert host_serve(m, 4) == 4
    assert _notify_by_hand(m, late) == (0, 0)
    drv.wait_done(4)


# ---- the ring format -----------------------------------------------------------------------------
@pytest.mark.parametrize("packed,size,want", [(True, 100, 100), (False, 100, 64),
                                              (True, 16, 16), (False, 16, 16)],
                         ids=["packed-100", "split-100", "packed-16", "split-16"])
def test_ring_format_follows_the_device_offer(machine, packed, size, want):
    """A device offering RING_PACKED is driven with a packed ring (any size); one that does
    not offer it gets a split ring, whose size the driver rounds down to a power of two when
    QueueNumMax is not one (100 -> 64). Both sides agree, and I/O works."""
    m = machine(dev_kw=dict(packed=packed, queue_size=size))
    assert m.boot(BlkDriver(m.dma)) == 0
    vq = m.vdev.vqs[0]
    assert m.vdev.has_feature(F.VIRTIO_F_RING_PACKED) == packed
    assert m.dev.negotiated(F.VIRTIO_F_RING_PACKED) == packed
    assert isinstance(vq, PackedVirtqueue if packed else SplitVirtqueue)
    assert vq.ring == ("packed" if packed else "split")
    ring = host_ring(m)
    assert isinstance(ring, PackedQueue if packed else SplitQueue)
    assert vq.num == ring.num == want
    assert vq.num_max == size
    gpa, view = m.dma.alloc(4096, 512)
    view[:] = bytes(range(256)) * 16
    assert m.blk.sync(B.VIRTIO_BLK_T_OUT, 8, [(gpa, 4096)]) == B.VIRTIO_BLK_S_OK
    view[:] = bytes(4096)
    assert m.blk.sync(B.VIRTIO_BLK_T_IN, 8, [(gpa, 4096)]) == B.VIRTIO_BLK_S_OK
    assert bytes(view) == bytes(range(256)) * 16
    assert m.dev.errors == [] and m.dev.guest_errors == []


# ---- real runs ---------------------------------------------------------------------------------
def topology(ring: str, queue_size: int, offer: list[str]) -> dict:
    dev = {"type": "blk", "transport": "mmio", "ring": ring, "queue_size": queue_size,
           "backend": "memory", "size": "4M"}
    if offer:
        dev["features"] = {"offer": offer}
    return {"name": f"features-{ring}", "vms": {"vm0": {
        "memory": "16M",
        "devices": {"vda": dev},
        "workloads": {"verify": {"type": "blk-verify", "device": "vda", "in_flight": 16,
                                 "write_pct": 50, "flush_every": 32}}}}}


@pytest.mark.multiprocess
@pytest.mark.timeout(60)
@pytest.mark.parametrize("ring,size,offer", [
    ("packed", 100, []),
    ("split", 64, ["IN_ORDER", "NOTIFICATION_DATA"]),
    ("packed", 100, ["IN_ORDER", "NOTIFICATION_DATA"]),
], ids=["packed-100", "split-in-order-notif-data", "packed-100-in-order-notif-data"])
def test_vmsim_run_with_ring_features(tmp_path: Path, ring, size, offer):
    """A real run (launcher, host and guest processes): a packed ring of 100 entries, and both
    rings with IN_ORDER and NOTIFICATION_DATA offered. The run ends cleanly with verified I/O
    and no error of any kind (guest errors included: every notification's data was
    consistent), the queue has the ring format and size asked for, and the negotiated
    features list what was offered."""
    cfg = tmp_path / "topo.yaml"
    cfg.write_text(yaml.safe_dump(topology(ring, size, offer)))
    js = tmp_path / "summary.json"
    rc, launch = run_vmsim(tmp_path, "run", str(cfg), "--duration", "2", "--json", str(js),
                           "-q", timeout=45)
    assert rc == 0, launch.output()
    s = load_json(js)
    assert s["outcome"] == "ok" and s["problems"] == []
    assert s["totals"]["workload_errors"] == 0 and s["totals"]["device_errors"] == 0
    w = s["workloads"]["vm0.verify"]
    assert w["ops"] > 0 and w["errors"] == 0, w
    d = one_device(s)
    feats = set(d["features"])
    assert ("RING_PACKED" in feats) == (ring == "packed")
    for name in offer:
        assert name in feats, d["features"]
    assert {"VERSION_1", "EVENT_IDX", "INDIRECT_DESC", "RING_RESET"} <= feats
    assert d["errors"] == [] and d["guest_errors"] == []
    [q] = d["queues"]
    assert q["ring"] == ring and q["size"] == size
    assert q["in_flight"] == 0 and q["used"] == q["added"] > 0
    assert q["ring_errors"] == 0
