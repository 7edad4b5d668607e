"""What watches a run from inside the launcher: the live dashboard and the stats file, both
fed by one reader of the stats region and guest RAM. The launcher's watch loop asks when the
next of them is due, sleeps in poll until then (or until a key), and runs what is due."""

import time
from typing import Any

from rich.console import Console

from vmsim.launcher.live import DEFAULT_HZ, LiveDashboard
from vmsim.launcher.statsfile import StatsFile
from vmsim.launcher.statsread import RunReader
from vmsim.machine.stats import StatsRegion

NEVER = float("inf")


class Observers:
    def __init__(self, manifest: dict[str, Any], stats: StatsRegion, *, dashboard: bool,
                 hz: float = DEFAULT_HZ, stats_file: str | None = None,
                 stats_every: float = 1.0, started: float = 0.0,
                 console: Console | None = None) -> None:
        """`console`: draw there instead of this terminal, without keys (a benchmark
        measuring what drawing costs)."""
        self.started = started or time.monotonic()
        self.reader: RunReader | None = RunReader(manifest, stats, rings=True)
        self.dash: LiveDashboard | None = None
        self.sfile: StatsFile | None = None
        self.next_dash = self.next_file = NEVER
        self.stats_every = stats_every
        try:
            if stats_file:
                self.sfile = StatsFile(stats_file, manifest, self.reader.sample())
                self.next_file = self.started + stats_every
            if dashboard:
                self.dash = LiveDashboard(manifest, self.reader, hz, console=console,
                                          stdin_fd=None if console is not None else 0)
        except BaseException:
            self.close()
            raise

    def start(self) -> None:
        if self.dash is not None:
            self.dash.start()
            self.next_dash = time.monotonic() + self.dash.interval

    def next_due(self) -> float:
        return min(self.next_dash, self.next_file)

    def run_due(self, now: float) -> None:
        if self.sfile is not None and now >= self.next_file:
            self.sfile.write(self.reader.sample(), now - self.started)
            # Keep to the grid: a late line does not shift the ones after it.
            while self.next_file <= now:
                self.next_file += self.stats_every
        if self.dash is not None and now >= self.next_dash:
            self.dash.tick()
            self.next_dash = max(now, self.next_dash + self.dash.interval)

    def input_fd(self) -> int | None:
        return self.dash.input_fd() if self.dash is not None else None

    def on_input(self) -> bool:
        """Keys arrived; True when the person asked to quit."""
        return self.dash is not None and self.dash.on_input()

    def log(self, msg: str) -> None:
        if self.dash is not None:
            self.dash.log(msg)

    def finish(self) -> None:
        """The run is stopping: a last stats line, and the terminal back to normal."""
        if self.sfile is not None:
            self.sfile.write(self.reader.sample(), time.monotonic() - self.started, final=True)
            self.sfile.close()
            self.sfile = None
        self.next_file = NEVER
        self._stop_dash()

    def _stop_dash(self) -> None:
        if self.dash is not None:
            self.dash.stop()
        self.next_dash = NEVER

    def close(self) -> None:
        self._stop_dash()
        if self.sfile is not None:
            self.sfile.close()
            self.sfile = None
        if self.reader is not None:
            self.reader.close()
            self.reader = None

    def describe(self) -> dict[str, Any]:
        """What watching cost, for the summary: frames drawn and the time they took."""
        d: dict[str, Any] = {}
        if self.dash is not None:
            d["dashboard"] = {"frames": self.dash.frames, "hz": round(1 / self.dash.interval, 2),
                              "cpu_s": round(self.dash.busy_s, 3)}
        return d
