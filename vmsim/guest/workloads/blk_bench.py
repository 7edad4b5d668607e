"""blk-bench: a fixed window of same-size requests (read, write or a mix) as fast as the
device answers them, without verification: the throughput workload `vmsim bench` runs."""

import random
from typing import Any

import numpy as np

from vmsim.abi import blk as B
from vmsim.guest.drivers.blk import EAGAIN, VirtioBlk
from vmsim.guest.memory import DmaMemory
from vmsim.guest.virtio.core import VirtioDevice
from vmsim.guest.workloads import WindowWorkload, WorkloadError

TABLE_SIZE = 1 << 16
TABLE_MASK = TABLE_SIZE - 1


class BlkBench(WindowWorkload):
    kind = "blk-bench"

    def __init__(self, name: str, spec: dict[str, Any], devices: dict[str, VirtioDevice],
                 stats: memoryview | None, dma: DmaMemory) -> None:
        super().__init__(name, spec, devices, stats)
        self.dma = dma
        self.dev = self.device(spec["device"])
        self.blk: VirtioBlk = self.dev.priv
        self.bs = int(spec.get("block_size", 4096))
        if self.bs % B.SECTOR_SIZE:
            raise WorkloadError(f"workload {name}: block_size must be a multiple of 512")
        op = spec.get("op", "read")
        if op not in ("read", "write", "mixed"):
            raise WorkloadError(f"workload {name}: op must be read, write or mixed")
        if op != "read" and self.blk.readonly:
            raise WorkloadError(f"workload {name}: device {self.dev.name} is read-only")
        self.op = op
        cap = self.blk.capacity * B.SECTOR_SIZE
        self.nblocks = max(1, min(int(spec.get("region") or cap), cap) // self.bs)
        self.window = max(1, min(int(spec.get("in_flight", 64)), self.blk.queue_depth))
        self.sequential = spec.get("pattern", "random") == "sequential"
        self.rng = random.Random(spec.get("seed", 1))
        self.spb = self.bs // B.SECTOR_SIZE
        rng = self.rng
        if self.sequential:
            blocks = [k % self.nblocks for k in range(TABLE_SIZE)]
        else:
            blocks = [rng.randrange(self.nblocks) for _ in range(TABLE_SIZE)]
        self.sectors = [b * self.spb for b in blocks]
        kinds = {"read": (B.VIRTIO_BLK_T_IN,), "write": (B.VIRTIO_BLK_T_OUT,),
                 "mixed": (B.VIRTIO_BLK_T_IN, B.VIRTIO_BLK_T_OUT)}[op]
        self.ops_table = [kinds[rng.randrange(len(kinds))] for _ in range(TABLE_SIZE)]
        self.reads_prefix = [0]
        for t in self.ops_table:
            self.reads_prefix.append(self.reads_prefix[-1] + (t == B.VIRTIO_BLK_T_IN))
        self.cursor = 0
        self.submit = self.blk.submit
        self.done_cb = self._done      # one bound method, not one per request
        self.bufs: list[tuple[tuple[int, int],]] = []
        # The tables as arrays for submit_batch, and each slot's buffer address.
        self.ops_np = np.array(self.ops_table, np.uint64)
        self.sectors_np = np.array(self.sectors, np.uint64)
        self.buf_addr = np.zeros(self.window, np.int64)
        self.buf_len = np.full(self.window, self.bs, np.int64)
        # Slots whose request completed in the current batch of completions (arrays):
        # issued again together by _flush (the driver's completion hook), one submit_batch.
        self.ready: list[np.ndarray] = []
        self.submit_batch = self.blk.submit_batch
        self.batch_done = self._batch_done

    def start(self) -> None:
        super().start()
        for _ in range(self.window):
            gpa, view = self.dma.alloc(self.bs, 4096, zero=False)
            view.release()
            self.buf_addr[len(self.bufs)] = gpa
            self.bufs.append(((gpa, self.bs),))
        self.blk.completion_hooks.append(self._flush)
        self.fill_window(self.blk, self.window)

    def _issue(self, slot: int) -> None:
        if self.stopping or self.budget <= 0:
            self._slot_idle()
            return
        # The offsets and ops come from tables drawn once at start: a draw per request would
        # cost more than the rest of this function.
        k = self.cursor
        err = self.submit(self.ops_table[k], self.sectors[k], self.bufs[slot], self.done_cb, slot)
        if not err:
            self.cursor = (k + 1) & TABLE_MASK
            self.budget -= 1
        elif err == EAGAIN:
            self.deferred.append(slot)
        else:
            self.error(f"submit failed: errno {-err}")
            self._slot_idle()

    def _done(self, status: int, slot: int) -> None:
        """A request of the first window (submitted one by one) completed."""
        self._batch_done(np.array([status], np.uint8), np.array([slot], np.int64))

    def _batch_done(self, statuses: np.ndarray, slots: np.ndarray) -> None:
        self.ops += len(slots)
        if statuses.any():
            for st in statuses[statuses != B.VIRTIO_BLK_S_OK].tolist():
                self.error(f"request failed with status {st}")
        self.ready.append(slots)

    def _flush(self) -> None:
        """After a batch of completions: issue the next request on every slot that finished,
        and on those that were waiting, with one submit_batch."""
        ready = self.ready
        if not ready:
            return
        parts = ready
        if self.deferred:
            parts = [np.array(self.deferred, np.int64), *ready]
            self.deferred = []
        slots = parts[0] if len(parts) == 1 else np.concatenate(parts)
        self.ready = []
        if self.stopping or self.budget <= 0:
            for _ in range(len(slots)):
                self._slot_idle()
            return
        n = min(len(slots), self.budget)
        k = self.cursor
        ks = (k + np.arange(n)) & TABLE_MASK
        go = slots[:n]
        done, err = self.submit_batch(self.ops_np[ks], self.sectors_np[ks], self.buf_addr[go],
                                      self.buf_len[go], self.batch_done, go)
        self.cursor = (k + done) & TABLE_MASK
        self.budget -= done
        rest = slots[done:]
        if not len(rest):
            return
        if err == EAGAIN:
            self.deferred.extend(rest.tolist())    # the ring is full: the next completion
            return
        if err:
            self.error(f"submit failed: errno {-err}")
        for _ in range(len(rest)):          # failed, or the budget ran out
            self._slot_idle()

    def publish_stats(self) -> None:
        # Derived rather than counted per request: requests are issued in table order, so the
        # reads among the first `ops` table entries are the reads done (exact once drained).
        self.bytes = (self.ops - self.errors) * self.bs
        full, part = divmod(self.ops, TABLE_SIZE)
        self.reads = full * self.reads_prefix[TABLE_SIZE] + self.reads_prefix[part]
        self.writes = self.ops - self.reads
        super().publish_stats()

    def report(self) -> dict[str, Any]:
        self.publish_stats()
        return super().report()

    def close(self) -> None:
        if self._flush in self.blk.completion_hooks:
            self.blk.completion_hooks.remove(self._flush)
        for ((gpa, _),) in self.bufs:
            self.dma.free(gpa)
        self.bufs = []
