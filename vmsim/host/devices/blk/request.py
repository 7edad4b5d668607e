"""One virtio-blk request: parse the chain (header, data, status byte), execute it against the
backend, write the status byte (virtio spec 5.2.6).

The device may not assume any framing (VERSION_1 / ANY_LAYOUT): the 16-byte header may be
split over descriptors and the status byte is the last writable byte. The common layout
(header alone, one data buffer, status alone) takes a short path that reads the header with
two native loads and moves the data with one copy between the backend and guest RAM.

Everything in the chain is the guest's and untrusted. A request the device can answer is
answered, bad or not: VIRTIO_BLK_S_IOERR for a header missing or short, data in the wrong
direction for its type (a read's data must be device-writable, a write's device-readable:
the device would otherwise read nothing and report success), a length that is not a whole
number of sectors, sectors past the capacity, more segments than seg_max, a write to a
read-only disk; VIRTIO_BLK_S_UNSUPP for a type the device does not know (spec 5.2.6.1). Each
is counted under its reason (BlkMetrics). Only a request with no writable byte for its
status cannot be answered: that is a device error (RingError, virtio_error).
"""

import numpy as np

from vmsim.abi import blk as B
from vmsim.host.devices.blk.backend import BlkBackend
from vmsim.host.devices.blk.metrics import BlkMetrics
from vmsim.host.memory import GuestMemory
from vmsim.host.virtio.chain import DescChain
from vmsim.host.virtio.errors import Reason, RingError
from vmsim.host.virtio.queue import Chains3, DeviceQueue

HDR = B.OUTHDR_SIZE
SECTOR_MASK = B.SECTOR_SIZE - 1
SHIFT = B.SECTOR_SHIFT
T_IN, T_OUT, T_FLUSH, T_GET_ID = (B.VIRTIO_BLK_T_IN, B.VIRTIO_BLK_T_OUT, B.VIRTIO_BLK_T_FLUSH,
                                  B.VIRTIO_BLK_T_GET_ID)
S_OK, S_IOERR, S_UNSUPP = B.VIRTIO_BLK_S_OK, B.VIRTIO_BLK_S_IOERR, B.VIRTIO_BLK_S_UNSUPP
# Data a batch moves before its completions are published (see execute_batch)
BYTES_PER_PUSH = 256 << 10
# Fewer requests available than this go one by one: in one process, pop_chains3 and
# execute_batch cost ~55 us for a batch of one and ~85 us for 64, pop_batch and execute
# ~2.5 us per request (measured on the development machine)
BATCH_MIN = 16


class BlkRequestHandler:
    """Executes requests for one device; holds what every request needs."""

    __slots__ = ("backend", "capacity_bytes", "flush_ok", "metrics", "ram", "ram_i", "ram_q",
                 "ram_q_np", "ram_u8", "readonly", "scratch", "seg_max", "serial")

    def __init__(self, mem: GuestMemory, backend: BlkBackend, readonly: bool, serial: bytes,
                 seg_max: int, metrics: BlkMetrics) -> None:
        self.ram = mem.mv
        self.ram_i = mem.i
        self.ram_q = mem.q
        self.backend = backend
        self.capacity_bytes = backend.size & ~SECTOR_MASK
        self.readonly = readonly
        self.serial = serial[:B.VIRTIO_BLK_ID_BYTES]
        self.flush_ok = False
        self.seg_max = seg_max
        self.metrics = metrics
        # the batch path's views: headers as u64 words, status bytes
        self.ram_q_np = np.ndarray(len(mem.mm) >> 3, np.uint64, mem.mm)
        self.ram_u8 = np.ndarray(len(mem.mm), np.uint8, mem.mm)
        self.scratch = DescChain(mem)       # a batch's odd request, for execute

    def serve(self, ring: DeviceQueue, batch: int = 128) -> int:
        """Serve every available request on the ring, in batches of at most `batch`;
        returns how many. Three-segment requests go as arrays (execute_batch) where the
        ring has that path and enough are waiting; anything else, and every fault, through
        pop_batch and execute."""
        execute = self.execute
        n = 0
        if not ring.batch3:
            while chains := ring.pop_batch(batch):
                ring.fill_batch(chains, [execute(c) for c in chains])
                n += len(chains)
            return n
        pop3 = ring.pop_chains3
        while True:
            if not ring.has_at_least(BATCH_MIN):
                # a few: a batch's numpy operations cost more than these requests' Python
                chains = ring.pop_batch(BATCH_MIN - 1)
                if not chains:
                    break
                ring.fill_batch(chains, [execute(c) for c in chains])
                n += len(chains)
                continue
            ch = pop3(batch)
            if ch is None:
                # the next one is not a three-segment chain (a flush, a long chain, a
                # fault): one by one, then back to the batch path
                chains = ring.pop_batch(1)
                if not chains:
                    break
                ring.fill_batch(chains, [execute(chains[0])])
                n += 1
                continue
            k = len(ch.heads)
            if not k:
                break
            self.execute_batch(ch, ring)
            n += k
        return n

    def execute_batch(self, ch: Chains3, ring: DeviceQueue | None = None) -> np.ndarray:
        """Run a batch of three-segment requests; returns the used length of each, and
        with `ring` also returns them to it (push_used). The common request - a 16-byte
        header alone (8-aligned: two native loads), one data segment, a one-byte status - is
        checked for the batch with numpy operations, its data moved with one copy (or
        backend call) each, its status written with one store per part; anything else in
        the batch goes through execute, with the same answers. A batch of such requests
        alone goes back to the ring in parts of BYTES_PER_PUSH of data: the driver completes
        and resubmits the first while the rest is copied (one push for a whole batch of
        64 KiB reads left it idle long enough to sleep)."""
        heads, off, ln, wr = ch
        o0 = off[:, 0]
        dlen = ln[:, 1]
        shape = (ln[:, 0] == HDR) & (o0 & 7 == 0) & ~wr[:, 0] & wr[:, 2] & (ln[:, 2] == 1) \
            & (dlen & SECTOR_MASK == 0)
        at = np.where(shape, o0 >> 3, 0)
        words = self.ram_q_np
        typ = words[at] & 0xFFFFFFFF            # le32 type, le32 ioprio: the low half
        sector = words[at + 1]
        cap = self.capacity_bytes
        # (sector clamped before the shift: a huge one must not wrap into range)
        pos = np.minimum(sector, cap >> SHIFT).astype(np.int64) << SHIFT
        shape &= (sector <= cap >> SHIFT) & (pos + dlen <= cap)
        reads = shape & (typ == T_IN) & wr[:, 1]
        writes = shape & (typ == T_OUT) & ~wr[:, 1]
        if self.readonly:
            writes[:] = False
        written = np.where(reads, dlen + 1, 1)
        answered = reads | writes
        k = len(heads)
        if ring is not None and answered.all() and k > 1:
            ends = np.cumsum(dlen)
            if int(ends[-1]) > BYTES_PER_PUSH:
                i = 0
                while i < k:
                    j = max(i + 1, int(np.searchsorted(ends, int(ends[i] - dlen[i])
                                                       + BYTES_PER_PUSH, "right")))
                    self._move(i, j, reads, off, pos, dlen, status_of=off[:, 2],
                               written=written)
                    ring.push_used(heads[i:j], written[i:j])
                    i = j
                return written
        if answered.all():
            self._move(0, k, reads, off, pos, dlen, off[:, 2], written)
        else:
            # in ring order, as execute would take them one by one: the checked ones before
            # the first odd request together, then each after it by itself
            first = int((~answered).argmax())
            self._move(0, first, reads, off, pos, dlen, off[:, 2], written)
            chain = self.scratch
            for i in range(first, k):
                if answered[i]:
                    self._move(i, i + 1, reads, off, pos, dlen, off[:, 2], written)
                    continue
                w = wr[i].tolist()
                o = off[i].tolist()
                n = ln[i].tolist()
                r = w.count(False)
                chain.head = int(heads[i])
                chain.r_off, chain.r_len = o[:r], n[:r]
                chain.w_off, chain.w_len = o[r:], n[r:]
                chain.rlen, chain.wlen = sum(n[:r]), sum(n[r:])
                chain.ndescs = 3
                written[i] = self.execute(chain)
        if ring is not None:
            ring.push_used(heads, written)
        return written

    def _move(self, i: int, j: int, reads: np.ndarray, off: np.ndarray, pos: np.ndarray,
              dlen: np.ndarray, status_of: np.ndarray, written: np.ndarray) -> None:
        """The data of rows [i, j), checked reads and writes all, then their status bytes:
        OK, or IOERR where the backend failed (written is then 1)."""
        if j <= i:
            return
        rows = np.arange(i, j)
        ram = self.ram
        mem = self.backend.mem
        m = self.metrics
        rd = reads[rows]
        ok = np.ones(len(rows), bool)
        at_l, p_l, n_l = off[rows, 1].tolist(), pos[rows].tolist(), dlen[rows].tolist()
        nr = int(np.count_nonzero(rd))
        if mem is not None:                 # a RAM disk: one copy each, no call
            if nr == len(rows):             # (all reads, or all writes: the loop alone)
                for at_, p, n in zip(at_l, p_l, n_l, strict=True):
                    ram[at_:at_ + n] = mem[p:p + n]
            elif nr == 0:
                for at_, p, n in zip(at_l, p_l, n_l, strict=True):
                    mem[p:p + n] = ram[at_:at_ + n]
            else:
                for r, at_, p, n in zip(rd.tolist(), at_l, p_l, n_l, strict=True):
                    if r:
                        ram[at_:at_ + n] = mem[p:p + n]
                    else:
                        mem[p:p + n] = ram[at_:at_ + n]
        else:                               # a file, a faulty disk: a backend call each
            read_one, write_one = self.backend.read_one, self.backend.write_one
            for x, (r, at_, p, n) in enumerate(zip(rd.tolist(), at_l, p_l, n_l,
                                                   strict=True)):
                try:
                    (read_one if r else write_one)(p, ram, at_, n)
                except OSError:
                    ok[x] = False
        if not ok.all():
            for x in np.flatnonzero(~ok).tolist():
                written[rows[x]] = self._ioerr(int(status_of[rows[x]]), "backend_errors")
            rows, rd = rows[ok], rd[ok]
        nbytes = dlen[rows]
        nr = int(np.count_nonzero(rd))
        m.reads += nr
        m.writes += len(rows) - nr
        m.bytes_read += int(nbytes[rd].sum())
        m.bytes_written += int(nbytes[~rd].sum())
        self.ram_u8[status_of[rows]] = S_OK

    def execute(self, chain: DescChain) -> int:
        """Run the request; returns the used length (bytes written, status byte included)."""
        w_off = chain.w_off
        if not w_off:
            raise RingError(Reason.MALFORMED_REQUEST,
                            f"request at head {chain.head} has no writable status byte")
        w_len = chain.w_len
        status_at = w_off[-1] + w_len[-1] - 1
        ram = self.ram
        r_off = chain.r_off
        if r_off and chain.r_len[0] >= HDR and not r_off[0] & 7:
            off = r_off[0]
            typ = self.ram_i[off >> 2]
            sector = self.ram_q[(off >> 3) + 1]
        elif chain.rlen >= HDR:
            typ, _ioprio, sector = B.OUTHDR.unpack(chain.read_bytes(0, HDR))
        else:
            return self._ioerr(status_at, "bad_header")

        if typ == T_IN:
            length = chain.wlen - 1
            nsegs = len(w_off) - (w_len[-1] == 1)
            pos = sector << SHIFT
            # the data device-writable, a multiple of 512, within capacity and seg_max
            if chain.rlen != HDR or length & SECTOR_MASK or pos + length > self.capacity_bytes \
                    or nsegs > self.seg_max:
                return self._refuse(status_at, chain.rlen != HDR, length, pos)
            try:
                if nsegs == 1 and w_len[-1] == 1:
                    mem = self.backend.mem
                    if mem is not None:      # a RAM disk: one copy, no call
                        at = w_off[0]
                        ram[at:at + length] = mem[pos:pos + length]
                    else:
                        self.backend.read_one(pos, ram, w_off[0], length)
                else:
                    self.backend.read_into(pos, chain.writable_views(0, length))
            except OSError:
                return self._ioerr(status_at, "backend_errors")
            m = self.metrics
            m.reads += 1
            m.bytes_read += length
            ram[status_at] = S_OK
            return length + 1

        if typ == T_OUT:
            length = chain.rlen - HDR
            if chain.r_len[0] == HDR:
                nsegs = len(r_off) - 1
                simple = nsegs == 1
            else:
                nsegs = len(chain.readable_views(HDR, length))
                simple = False
            if self.readonly:
                return self._ioerr(status_at, "readonly_writes")
            pos = sector << SHIFT
            # the data device-readable, a multiple of 512, within capacity and seg_max
            if chain.wlen != 1 or length & SECTOR_MASK or pos + length > self.capacity_bytes \
                    or nsegs > self.seg_max:
                return self._refuse(status_at, chain.wlen != 1, length, pos)
            try:
                if simple:
                    mem = self.backend.mem
                    if mem is not None:
                        at = r_off[1]
                        mem[pos:pos + length] = ram[at:at + length]
                    else:
                        self.backend.write_one(pos, ram, r_off[1], length)
                elif length:
                    self.backend.write_from(pos, chain.readable_views(HDR, length))
            except OSError:
                return self._ioerr(status_at, "backend_errors")
            m = self.metrics
            m.writes += 1
            m.bytes_written += length
            ram[status_at] = S_OK
            return 1

        if typ == T_FLUSH and self.flush_ok:
            try:
                self.backend.flush()
            except OSError:
                return self._ioerr(status_at, "backend_errors")
            self.metrics.flushes += 1
            ram[status_at] = S_OK
            return 1

        if typ == T_GET_ID:
            room = chain.wlen - 1
            ident = self.serial.ljust(B.VIRTIO_BLK_ID_BYTES, b"\0")[:room]
            n = chain.write_at(0, ident)
            self.metrics.get_id += 1
            ram[status_at] = S_OK
            return n + 1

        self.metrics.unsupported += 1
        ram[status_at] = S_UNSUPP
        return 1

    def _ioerr(self, status_at: int, reason: str) -> int:
        """Answer VIRTIO_BLK_S_IOERR, counted under `reason` (a BlkMetrics field)."""
        m = self.metrics
        m.io_errors += 1
        setattr(m, reason, getattr(m, reason) + 1)
        self.ram[status_at] = S_IOERR
        return 1

    def _refuse(self, status_at: int, misdirected: bool, length: int, pos: int) -> int:
        """A read or write the checks refused: IOERR under the first reason that applies."""
        if misdirected:
            return self._ioerr(status_at, "bad_direction")
        if length & SECTOR_MASK:
            return self._ioerr(status_at, "bad_length")
        if pos + length > self.capacity_bytes:
            return self._ioerr(status_at, "out_of_range")
        return self._ioerr(status_at, "too_many_segments")
