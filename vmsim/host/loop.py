"""The host's event loop: one thread serves every device of every VM.

Each pass services every live queue that has work (everything available, one interrupt
decision per queue per pass), then looks at the fds (traps, kicks, the launcher) without
blocking. While work keeps coming the loop keeps polling with the queues' notifications
disabled (VRING_USED_F_NO_NOTIFY / a stale avail_event), so a busy driver need not kick.
After `poll_us` without work it re-enables notifications, re-checks the rings (a buffer may
have slipped in: the spec's race), and sleeps in epoll until a kick or a trap arrives, with a
timeout as a safety net against a lost wake-up (counted per queue as `missed`).
"""

import select
import time
from collections.abc import Callable
from os import sched_yield

from vmsim.host.virtio.device import QueueState, VirtioDevice

SAFETY_TIMEOUT_S = 0.05
# Counters reach the stats region from here, not from the data path.
PUBLISH_EVERY_NS = 50_000_000


class EventLoop:
    def __init__(self, poll_us: int, live_stats: bool = True) -> None:
        self.ep = select.epoll()
        self.readers: dict[int, Callable[[int], None]] = {}
        self.devices: list[VirtioDevice] = []
        self.poll_ns = poll_us * 1000
        # Off (a benchmark measuring what stats cost): counters are published at the end only.
        self.live_stats = live_stats
        self.live: list[tuple[VirtioDevice, QueueState]] = []
        self.dirty = True
        self.stopping = False
        self.passes = 0
        self.empty_passes = 0
        self.busy_ns = 0
        self.sleeps = 0
        self.safety_wakeups = 0

    def add_reader(self, fd: int, cb: Callable[[int], None]) -> None:
        self.readers[fd] = cb
        self.ep.register(fd, select.EPOLLIN)

    def remove_reader(self, fd: int) -> None:
        if self.readers.pop(fd, None) is not None:
            try:
                self.ep.unregister(fd)
            except (OSError, ValueError):
                pass

    def add_device(self, dev: VirtioDevice) -> None:
        self.devices.append(dev)
        for q in dev.queues if dev.rings_in_process else ():
            self.add_reader(q.kick.fileno(), self._kick_handler(dev, q))
        self.dirty = True

    def remove_device(self, dev: VirtioDevice) -> None:
        for q in dev.queues:
            self.remove_reader(q.kick.fileno())
        if dev in self.devices:
            self.devices.remove(dev)
        self.dirty = True

    def _kick_handler(self, dev: VirtioDevice, q: QueueState) -> Callable[[int], None]:
        def on_kick(_fd: int) -> None:
            q.kick.consume()
            if q.ring is not None:
                q.ring.n_notifies += 1
                dev.kicked(q)
        return on_kick

    def _rebuild(self) -> None:
        self.live = [(dev, q) for dev in self.devices for q in dev.live_queues()]
        self.dirty = False

    def stop(self) -> None:
        self.stopping = True

    def _dispatch(self, events: list[tuple[int, int]]) -> None:
        for fd, _ in events:
            cb = self.readers.get(fd)
            if cb is not None:
                cb(fd)

    def publish_stats(self) -> None:
        for dev in self.devices:
            dev.publish_stats()

    def run(self) -> None:
        mono = time.monotonic_ns
        poll = self.ep.poll
        last_work = mono()
        next_publish = last_work + PUBLISH_EVERY_NS if self.live_stats else 1 << 63
        while not self.stopping:
            if self.dirty:
                self._rebuild()
            self.passes += 1
            n = 0
            for dev, q in self.live:
                ring = q.ring
                if ring is not None and ring.has_work() and dev.wants_service(q):
                    t0 = mono()
                    n += dev.service(q)
                    self.busy_ns += mono() - t0
                    if dev.broken or q.broken:
                        self.dirty = True
            # While the queues keep finding work, look at the fds every 8th pass only (an
            # epoll_wait per pass was ~18% of the host's CPU under load, py-spy); kicks are
            # suppressed then anyway, traps wait a few passes at most, an idle pass looks.
            events = poll(0) if not n or not self.passes & 7 else None
            if events:
                self._dispatch(events)
            if n:
                last_work = now = mono()
                if now >= next_publish:
                    self.publish_stats()
                    next_publish = now + PUBLISH_EVERY_NS
                continue
            self.empty_passes += 1
            if events:
                continue
            if mono() - last_work < self.poll_ns:
                # let a process sharing this CPU run (the guest: what the spin waits for)
                sched_yield()
                continue
            # Idle long enough: ask for kicks again, re-check, then sleep.
            if self._arm():
                self._disarm()
                continue
            self.sleeps += 1
            if self.live_stats:
                self.publish_stats()
            events = poll(SAFETY_TIMEOUT_S)
            self._disarm()
            if events:
                self._dispatch(events)
            else:
                self.safety_wakeups += 1
                for dev, q in self.live:
                    if q.ring is not None and q.ring.has_work() and dev.wants_service(q):
                        q.ring.n_missed += 1
            last_work = mono()
        self.publish_stats()

    def _arm(self) -> bool:
        slipped = False
        for dev, q in self.live:
            if q.ring is not None and dev.wants_service(q) and q.ring.enable_notify():
                slipped = True
        return slipped

    def _disarm(self) -> None:
        for dev, q in self.live:
            if q.ring is not None and not dev.waits_for_kick(q):
                q.ring.disable_notify()
