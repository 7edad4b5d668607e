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

from vmsim.abi import blk as B
from vmsim.host.devices.blk.backend import BlkBackend
from vmsim.host.devices.blk.metrics import BlkMetrics
from vmsim.host.memory import GuestMemory
from vmsim.host.virtio.chain import DescChain
from vmsim.host.virtio.errors import Reason, RingError

HDR = B.OUTHDR_SIZE
SECTOR_MASK = B.SECTOR_SIZE - 1
SHIFT = B.SECTOR_SHIFT
T_IN, T_OUT, T_FLUSH, T_GET_ID = (B.VIRTIO_BLK_T_IN, B.VIRTIO_BLK_T_OUT, B.VIRTIO_BLK_T_FLUSH,
                                  B.VIRTIO_BLK_T_GET_ID)
S_OK, S_IOERR, S_UNSUPP = B.VIRTIO_BLK_S_OK, B.VIRTIO_BLK_S_IOERR, B.VIRTIO_BLK_S_UNSUPP


class BlkRequestHandler:
    """Executes requests for one device; holds what every request needs."""

    __slots__ = ("backend", "capacity_bytes", "flush_ok", "metrics", "ram", "ram_i", "ram_q",
                 "readonly", "seg_max", "serial")

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
