"""Figures from two samples of a run: rates per second, suppressed shares, latency
percentiles, and a short history for sparklines.

Rates divide by the writers' own publish times (DRV_PUBLISHED_NS for what the driver counts,
DEV_PUBLISHED_NS for the device, W.PUBLISHED_NS for workloads), not by when the reader looked:
counters move in steps of a publish interval, and the writer's clock says what time a step
covers. Counters that went backwards (a device reset and probed again) count as 0.
"""

from collections import deque
from dataclasses import dataclass, field

from vmsim.launcher.statsread import Key, QueueSample, Sample

SPARK = "▁▂▃▄▅▆▇█"


def _d(cur: dict[str, int], prev: dict[str, int], k: str) -> int:
    return max(0, cur[k] - prev[k])


def _dt(cur: dict[str, int], prev: dict[str, int], k: str, fallback: float) -> float:
    d = (cur[k] - prev[k]) / 1e9
    return d if d > 0 else fallback


def percentile_ns(hist: list[int], q: float) -> float | None:
    """The q-quantile (0..1) of a log2 histogram (bucket i: [2**(i-1), 2**i) ns),
    interpolated linearly inside its bucket; None without samples."""
    total = sum(hist)
    if total <= 0:
        return None
    rank = q * total
    seen = 0
    for i, n in enumerate(hist):
        if n and seen + n >= rank:
            lo = 0 if i == 0 else 1 << (i - 1)
            hi = 1 if i == 0 else 1 << i
            return lo + (hi - lo) * max(0.0, rank - seen) / n
        seen += n
    return float(1 << (len(hist) - 1))


def hist_delta(cur: list[int], prev: list[int] | None) -> list[int]:
    if prev is None:
        return list(cur)
    d = [max(0, a - b) for a, b in zip(cur, prev, strict=True)]
    # a queue that started over: its histogram is new, not a difference
    return d if any(d) or sum(cur) >= sum(prev) else list(cur)


@dataclass
class QueueRates:
    ops_per_s: float = 0.0          # buffers the device used, per second
    mb_per_s: float = 0.0           # bytes the device read + wrote, 10**6 per second
    kicks_per_s: float = 0.0
    kicks_suppressed: float | None = None       # share of kick decisions that said no
    irqs_per_s: float = 0.0
    irqs_suppressed: float | None = None        # share of interrupt decisions that said no
    p50_ns: float | None = None
    p99_ns: float | None = None


def queue_rates(cur: QueueSample, prev: QueueSample | None, dt: float) -> QueueRates:
    """Rates of one queue between two samples `dt` seconds apart (prev None: none yet)."""
    if prev is None or dt <= 0:
        h = cur.hist
        return QueueRates(p50_ns=percentile_ns(h, 0.5), p99_ns=percentile_ns(h, 0.99))
    c, p = cur.c, prev.c
    dev_dt = _dt(c, p, "dev_published_ns", dt)
    drv_dt = _dt(c, p, "drv_published_ns", dt)
    k, ks = _d(c, p, "kicks"), _d(c, p, "kicks_suppressed")
    i, is_ = _d(c, p, "interrupts"), _d(c, p, "interrupts_suppressed")
    h = hist_delta(cur.hist, prev.hist)
    if not any(h):
        h = cur.hist         # nothing timed in the window: the run's figures so far
    return QueueRates(
        ops_per_s=_d(c, p, "used") / dev_dt,
        mb_per_s=(_d(c, p, "bytes_read") + _d(c, p, "bytes_written")) / dev_dt / 1e6,
        kicks_per_s=k / drv_dt,
        kicks_suppressed=ks / (k + ks) if k + ks else None,
        irqs_per_s=i / dev_dt,
        irqs_suppressed=is_ / (i + is_) if i + is_ else None,
        p50_ns=percentile_ns(h, 0.5), p99_ns=percentile_ns(h, 0.99))


@dataclass
class WorkloadRates:
    ops_per_s: float = 0.0
    mb_per_s: float = 0.0


def workload_rates(cur: dict[str, int], prev: dict[str, int] | None,
                   dt: float) -> WorkloadRates:
    if prev is None or dt <= 0:
        return WorkloadRates()
    wdt = _dt(cur, prev, "published_ns", dt)
    return WorkloadRates(_d(cur, prev, "ops") / wdt, _d(cur, prev, "bytes") / wdt / 1e6)


@dataclass
class History:
    """Recent samples of a run: rates over `window` seconds, and per-device series of
    ops/s for sparklines (`points` values, one per sample)."""
    window: float = 1.0
    points: int = 48
    samples: deque = field(default_factory=lambda: deque(maxlen=256))
    series: dict[Key, deque] = field(default_factory=dict)

    def add(self, s: Sample) -> None:
        self.samples.append(s)
        base = self.base()
        dt = s.t - base.t if base is not None else 0.0
        for key, dev in s.devices.items():
            prev = base.devices.get(key) if base is not None else None
            ops = 0.0
            for q in dev.queues:
                pq = prev.queues[q.index] if prev is not None and q.index < len(prev.queues) \
                    else None
                ops += queue_rates(q, pq, dt).ops_per_s
            self.series.setdefault(key, deque(maxlen=self.points)).append(ops)
        while len(self.samples) > 2 and self.samples[1].t <= s.t - 4 * self.window:
            self.samples.popleft()

    @property
    def latest(self) -> Sample | None:
        return self.samples[-1] if self.samples else None

    def base(self) -> Sample | None:
        """The newest sample at least `window` older than the latest (else the oldest)."""
        if len(self.samples) < 2:
            return None
        now = self.samples[-1].t
        for s in reversed(self.samples):
            if s is not self.samples[-1] and now - s.t >= self.window:
                return s
        return self.samples[0]

    def queue(self, key: Key, index: int) -> QueueRates:
        cur, base = self.latest, self.base()
        q = cur.devices[key].queues[index]
        prev = None
        if base is not None and key in base.devices and index < len(base.devices[key].queues):
            prev = base.devices[key].queues[index]
        return queue_rates(q, prev, cur.t - base.t if base is not None else 0.0)

    def workload(self, key: Key) -> WorkloadRates:
        cur, base = self.latest, self.base()
        prev = base.workloads.get(key) if base is not None else None
        return workload_rates(cur.workloads[key], prev, cur.t - base.t if base else 0.0)

    def exits_per_s(self, key: Key) -> float:
        cur, base = self.latest, self.base()
        if base is None or key not in base.devices:
            return 0.0
        c, p = cur.devices[key].c, base.devices[key].c
        n = _d(c, p, "exits_read") + _d(c, p, "exits_write")
        return n / max(1e-9, cur.t - base.t)


def sparkline(values: list[float] | deque, width: int) -> str:
    """The last `width` values as bars scaled to their maximum."""
    vals = list(values)[-width:]
    top = max(vals, default=0.0)
    if top <= 0:
        return SPARK[0] * len(vals)
    return "".join(SPARK[min(len(SPARK) - 1, int(v / top * (len(SPARK) - 1) + 0.5))]
                   for v in vals)

