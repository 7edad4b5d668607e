"""blk-verify: write, read back and verify data at random offsets, several requests in flight.

Every block written carries its block number and a generation in its first 16 bytes and a
deterministic pseudo-random pattern after them, so a read proves both the content and that it
came from the right place and the latest write. Reads only target blocks this run wrote (an
existing image's old contents are unknown); no two requests in flight touch the same block.
A flush is issued every `flush_every` writes.
"""

import random
import struct
from typing import Any

from vmsim.abi import blk as B
from vmsim.guest.drivers.blk import EAGAIN, VirtioBlk
from vmsim.guest.memory import DmaMemory
from vmsim.guest.virtio.core import VirtioDevice
from vmsim.guest.workloads import WindowWorkload, WorkloadError

STAMP = struct.Struct("<QQ")
POOL_BYTES = 1 << 20


class BlkVerify(WindowWorkload):
    kind = "blk-verify"

    def __init__(self, name: str, spec: dict[str, Any], devices: dict[str, VirtioDevice],
                 stats: memoryview | None, dma: DmaMemory) -> None:
        super().__init__(name, spec, devices, stats)
        self.dma = dma
        self.dev = self.device(spec["device"])
        self.blk: VirtioBlk = self.dev.priv
        self.bs = int(spec.get("block_size", 4096))
        if self.bs % B.SECTOR_SIZE or self.bs % self.blk.blk_size:
            raise WorkloadError(f"workload {name}: block_size {self.bs} is not a multiple of "
                                f"the disk's block size {self.blk.blk_size}")
        cap_bytes = self.blk.capacity * B.SECTOR_SIZE
        region = int(spec.get("region") or cap_bytes)
        self.nblocks = min(region, cap_bytes) // self.bs
        if self.nblocks < 1:
            raise WorkloadError(f"workload {name}: the disk is smaller than one block")
        self.window = max(1, min(int(spec.get("in_flight", 16)), self.blk.queue_depth,
                                 self.nblocks))
        self.write_pct = float(spec.get("write_pct", 50))
        self.flush_every = int(spec.get("flush_every", 64)) if self.blk.has_flush else 0
        self.rng = random.Random(spec.get("seed", 1))
        self.pool = memoryview(self.rng.randbytes(POOL_BYTES + self.bs))
        self.gen: dict[int, int] = {}          # block -> generation on disk
        self.written: list[int] = []           # blocks with known contents (random choice)
        self.busy: set[int] = set()
        self.writes_since_flush = 0
        self.bufs: list[tuple[int, memoryview]] = []
        self.sectors_per_block = self.bs // B.SECTOR_SIZE
        self.readonly = self.blk.readonly
        self.identity = b""

    def _pattern_at(self, block: int, gen: int) -> int:
        return ((block * 2654435761 + gen * 40503) % POOL_BYTES) & ~7

    def start(self) -> None:
        super().start()
        if self.readonly:
            raise WorkloadError(f"workload {self.name}: device {self.dev.name} is read-only")
        gpa, view = self.dma.alloc(B.VIRTIO_BLK_ID_BYTES, 8)
        try:
            st = self.blk.sync(B.VIRTIO_BLK_T_GET_ID, 0, [(gpa, B.VIRTIO_BLK_ID_BYTES)])
            if st != B.VIRTIO_BLK_S_OK:
                self.error(f"get-id failed with status {st}")
            self.identity = bytes(view).rstrip(b"\0")
            self.other += 1
        finally:
            view.release()
            self.dma.free(gpa)
        for _ in range(self.window):
            self.bufs.append(self.dma.alloc(self.bs, 4096, zero=False))
        self.fill_window(self.blk, self.window)

    # ---- one slot's life: issue, complete, issue again -------------------------------------------
    def _issue(self, slot: int) -> None:
        """Issue the next request on `slot` (in_flight already counts it)."""
        if self.stopping or self.budget <= 0:
            self._slot_idle()
            return
        rng = self.rng
        gpa, buf = self.bufs[slot]
        sgs = ((gpa, self.bs),)
        if self.flush_every and self.writes_since_flush >= self.flush_every:
            self.writes_since_flush = 0
            err = self.blk.flush(self._flush_done, slot)
        elif not self.written or rng.random() * 100 < self.write_pct:
            block = self._free_block()
            if block < 0:
                self._defer(slot)
                return
            gen = self.gen.get(block, 0) + 1
            off = self._pattern_at(block, gen)
            buf[:] = self.pool[off:off + self.bs]
            STAMP.pack_into(buf, 0, block, gen)
            self.busy.add(block)
            err = self.blk.write(block * self.sectors_per_block, sgs, self._write_done,
                                 (slot, block, gen))
            if err:
                self.busy.discard(block)
        else:
            block = self._written_block()
            if block < 0:
                self._defer(slot)
                return
            self.busy.add(block)
            err = self.blk.read(block * self.sectors_per_block, sgs, self._read_done,
                                (slot, block, self.gen[block]))
            if err:
                self.busy.discard(block)
        if not err:
            self.budget -= 1
        elif err == EAGAIN:
            self._defer(slot)
        else:
            self.error(f"submit failed: errno {-err}")
            self._slot_idle()

    def _free_block(self) -> int:
        for _ in range(8):
            b = self.rng.randrange(self.nblocks)
            if b not in self.busy:
                return b
        return -1

    def _written_block(self) -> int:
        for _ in range(8):
            b = self.written[self.rng.randrange(len(self.written))]
            if b not in self.busy:
                return b
        return -1

    def _defer(self, slot: int) -> None:
        self.deferred.append(slot)

    def _write_done(self, status: int, arg: tuple[int, int, int]) -> None:
        slot, block, gen = arg
        self.busy.discard(block)
        self.ops += 1
        self.writes += 1
        if status == B.VIRTIO_BLK_S_OK:
            if block not in self.gen:
                self.written.append(block)
            self.gen[block] = gen
            self.bytes += self.bs
            self.writes_since_flush += 1
        else:
            self.error(f"write of block {block} failed with status {status}")
        self._next(slot)

    def _read_done(self, status: int, arg: tuple[int, int, int]) -> None:
        slot, block, gen = arg
        self.busy.discard(block)
        self.ops += 1
        self.reads += 1
        if status != B.VIRTIO_BLK_S_OK:
            self.error(f"read of block {block} failed with status {status}")
        else:
            self.bytes += self.bs
            buf = self.bufs[slot][1]
            got_block, got_gen = STAMP.unpack_from(buf, 0)
            off = self._pattern_at(block, gen)
            if (got_block, got_gen) != (block, gen):
                self.error(f"block {block}: read back block {got_block} generation {got_gen}, "
                           f"expected generation {gen}")
            elif buf[16:] != self.pool[off + 16:off + self.bs]:
                self.error(f"block {block} generation {gen}: data differs from what was written")
        self._next(slot)

    def _flush_done(self, status: int, slot: int) -> None:
        self.ops += 1
        self.flushes += 1
        if status != B.VIRTIO_BLK_S_OK:
            self.error(f"flush failed with status {status}")
        self._next(slot)

    def report(self) -> dict[str, Any]:
        r = super().report()
        r["device_id"] = self.identity.decode(errors="replace")
        r["blocks_written"] = len(self.written)
        return r

    def close(self) -> None:
        for gpa, view in self.bufs:
            view.release()
            self.dma.free(gpa)
        self.bufs = []
