"""The dashboard's picture of a run: a pure function from (manifest, recent samples, view
state) to rich renderables, so that `vmsim run`, `vmsim top` and the tests draw the same thing.

    header        run, config, time, state, keys
    one panel per VM
      per device  a title line (type, transport, backend, status, exits, a sparkline of its
                  recent throughput) and a table with a row per queue: format, size, avail
                  and used index (from guest RAM), in flight, free descriptors, ops/s, MB/s,
                  kicks and interrupts per second with the suppressed share, p50/p99 latency,
                  and a small picture of the ring's occupancy
      workloads   ops, rates, errors
    topology      switches and what is attached to them, backends, console ptys
    messages      what the launcher had to say

Focusing a VM shows only its panel; focusing a device adds its detail: each ring's flags and
event indices, the two sides' private positions, a wide ring picture, the latency histogram,
exits by kind and the negotiated features.
"""

from collections import deque
from dataclasses import dataclass, field
from typing import Any

from rich.cells import cell_len
from rich.console import Group, RenderableType
from rich.panel import Panel
from rich.text import Text

from vmsim.abi import features as F
from vmsim.abi import status as S
from vmsim.launcher.rates import History, QueueRates, sparkline
from vmsim.launcher.ringview import RingState, picture
from vmsim.launcher.summary import DEVICE_FEATURE_NAMES
from vmsim.machine.stats import LATENCY_BUCKETS

KEYS = "q quit · p pause · tab/shift-tab focus · 1-9 VM · 0 all"
BARS = " ▁▂▃▄▅▆▇█"
RING_CELLS = 16
RING_CELLS_FOCUSED = 64
SPARK_WIDTH = 24


class Grid:
    """A table drawn as aligned lines of one Text. rich's Table measures every cell through
    its renderable protocol: a dozen of them cost ~25 ms a frame, this ~1 ms, and the
    dashboard must not take a CPU from the run it shows."""

    def __init__(self, columns: list[tuple[str, str]], drop: tuple[int, ...] = ()) -> None:
        self.columns = columns                     # (header, "left" | "right")
        self.drop = drop                           # columns to leave out first when narrow
        self.rows: list[list[str | Text]] = []

    def add_row(self, *cells: str | Text) -> None:
        self.rows.append(list(cells))

    def rows_from(self, rows: list[list[str | Text]]) -> "Grid":
        self.rows = rows
        return self

    def text(self, max_width: int | None = None) -> Text:
        def width(c: str | Text) -> int:
            return cell_len(c.plain if isinstance(c, Text) else c)
        widths = [cell_len(h) for h, _ in self.columns]
        for row in self.rows:
            for i, c in enumerate(row):
                widths[i] = max(widths[i], width(c))
        keep = list(range(len(self.columns)))
        for i in self.drop:
            if max_width is None or sum(widths[k] + 1 for k in keep) - 1 <= max_width:
                break
            keep.remove(i)
        if len(keep) < len(self.columns):
            return Grid([self.columns[k] for k in keep]).rows_from(
                [[row[k] for k in keep] for row in self.rows]).text()
        out = Text(no_wrap=True, overflow="crop")
        out.append(" ".join(h.rjust(w) if j == "right" else h.ljust(w)
                            for (h, j), w in zip(self.columns, widths, strict=True)).rstrip(),
                   style="bold")
        for row in self.rows:
            # Plain cells are joined into one string: a Text append per cell is what costs.
            buf = "\n"
            for i, c in enumerate(row):
                pad = " " * (widths[i] - width(c))
                right = self.columns[i][1] == "right"
                buf += (" " if i else "") + (pad if right else "")
                if isinstance(c, Text):
                    out.append(buf)
                    out.append(c)
                    buf = ""
                else:
                    buf += c
                if not right and i < len(row) - 1:
                    buf += pad
            out.append(buf)
        return out


@dataclass
class UiState:
    """What the person looking has chosen."""
    focus: int = 0                      # index into focus_targets(); 0 is everything
    paused: bool = False
    state: str = "running"              # running, stopping, ended
    messages: deque = field(default_factory=lambda: deque(maxlen=4))


def focus_targets(manifest: dict[str, Any]) -> list[tuple[str, ...]]:
    """Everything, then each VM followed by its devices: what tab steps through."""
    out: list[tuple[str, ...]] = [()]
    for vname, vm in manifest["vms"].items():
        out.append((vname,))
        out.extend((vname, d) for d in vm["devices"])
    return out


# ---- formatting ------------------------------------------------------------------------------
def fmt_rate(x: float) -> str:
    """A compact count per second: 950, 12.3k, 4.56M."""
    if x < 1000:
        return f"{x:.0f}"
    if x < 1e6:
        return f"{x / 1e3:.1f}k"
    return f"{x / 1e6:.2f}M"


def fmt_ns(ns: float | None) -> str:
    if ns is None:
        return "-"
    if ns < 1e3:
        return f"{ns:.0f}ns"
    if ns < 1e6:
        return f"{ns / 1e3:.1f}µs"
    if ns < 1e9:
        return f"{ns / 1e6:.2f}ms"
    return f"{ns / 1e9:.2f}s"


def fmt_share(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def short_status(status: int) -> str:
    """The furthest step of the status sequence, and the two bad bits."""
    if status == 0:
        return "RESET"
    best = next((S.NAMES[b] for b in (S.DRIVER_OK, S.FEATURES_OK, S.DRIVER, S.ACKNOWLEDGE)
                 if status & b), "")
    bad = [S.NAMES[b] for b in (S.DEVICE_NEEDS_RESET, S.FAILED) if status & b]
    return "|".join([best, *bad]) if best else S.describe(status)


def ring_picture(rs: RingState | None, cells: int) -> Text:
    """The ring as a strip: each cell a bar as high as the share of its slots in use, green
    where the device holds buffers, yellow where they wait for it."""
    if rs is None:
        return Text("-", style="dim")
    t = Text("[")
    for eighths, with_device in picture(rs.slots, cells):
        if not eighths:
            t.append("·", style="dim")
        else:
            t.append(BARS[eighths], style="green" if with_device else "yellow")
    t.append("]")
    return t


def _position(rs: RingState | None, which: str) -> str:
    if rs is None:
        return "-"
    if rs.ring == "split":
        return str(rs.avail_idx if which == "avail" else rs.used_idx)
    pos, wrap = (rs.avail_idx, rs.avail_wrap) if which == "avail" else (rs.used_idx,
                                                                         rs.used_wrap)
    return f"{pos}/w{wrap}"


# ---- pieces ----------------------------------------------------------------------------------
def header(manifest: dict[str, Any], ui: UiState, elapsed: float | None) -> Text:
    t = Text()
    t.append("vmsim ", style="bold")
    t.append(manifest["run"], style="bold cyan")
    t.append(f"  {manifest.get('config', '')}")
    if elapsed is not None:
        dur = manifest.get("duration")
        t.append(f"  {elapsed:6.1f} s" + (f" / {dur:g} s" if dur else ""))
    state = "paused" if ui.paused else ui.state
    t.append(f"  {state}", style={"running": "green", "paused": "yellow"}.get(state, "red"))
    target = focus_targets(manifest)[ui.focus] if ui.focus < len(focus_targets(manifest)) \
        else ()
    if target:
        t.append(f"  focus {'.'.join(target)}", style="magenta")
    t.append(f"   {KEYS}", style="dim")
    return t


QUEUE_COLUMNS = [(c, "left" if c in ("ring", "occupancy") else "right") for c in (
    "q", "ring", "size", "avail idx", "used idx", "in flight", "free", "ops/s", "MB/s",
    "kicks/s", "supp.", "irqs/s", "supp.", "p50", "p99", "occupancy")]
# On a narrow terminal: free, size, MB/s, p99, in flight, then the suppressed shares go first.
QUEUE_DROP = (6, 2, 8, 14, 5, 12, 10)


def queue_table(key: tuple[str, str], hist: History, ring_cells: int,
                max_width: int | None = None) -> Text:
    t = Grid(QUEUE_COLUMNS, QUEUE_DROP)
    dev = hist.latest.devices[key]
    for q in dev.queues:
        r: QueueRates = hist.queue(key, q.index)
        c = q.c
        if not c["ready"] and not c["added"]:
            t.add_row(str(q.index), "-", "-", "-", "-", "-", "-", "-", "-", "-", "-", "-",
                      "-", "-", "-", Text("not ready", style="dim"))
            continue
        in_flight = c["added"] - c["completed"] - c["detached"]
        t.add_row(
            str(q.index), "packed" if c["ring"] else "split", str(c["size"]),
            _position(q.ring, "avail"), _position(q.ring, "used"), f"{in_flight:,}",
            f"{c['num_free']:,}", fmt_rate(r.ops_per_s), f"{r.mb_per_s:.1f}",
            fmt_rate(r.kicks_per_s), fmt_share(r.kicks_suppressed), fmt_rate(r.irqs_per_s),
            fmt_share(r.irqs_suppressed), fmt_ns(r.p50_ns), fmt_ns(r.p99_ns),
            ring_picture(q.ring, ring_cells) if q.ring is not None
            else Text(q.ring_error or "-", style="dim"))
    return t.text(max_width)


def device_title(key: tuple[str, str], dev: dict[str, Any], hist: History) -> Text:
    ds = hist.latest.devices[key]
    c = ds.c
    t = Text()
    t.append(key[1], style="bold")
    t.append(f"  {dev['type']} over {dev['transport']}")
    if dev.get("backend"):
        t.append(f"  {dev['backend']}", style="dim")
    st = short_status(c["status"])
    t.append(f"  {st}", style="red" if "FAILED" in st or "NEEDS" in st
             else "green" if "DRIVER_OK" in st else "yellow")
    exits = c["exits_read"] + c["exits_write"]
    t.append(f"  exits {exits:,} ({fmt_rate(hist.exits_per_s(key))}/s)")
    if c["device_errors"]:
        t.append(f"  {c['device_errors']} errors", style="bold red")
    series = hist.series.get(key)
    if series:
        t.append("  ")
        t.append(sparkline(series, SPARK_WIDTH), style="cyan")
        t.append(f" {fmt_rate(series[-1])} ops/s")
    return t


def device_detail(key: tuple[str, str], dev: dict[str, Any], hist: History) -> Group:
    """What focusing a device adds: ring internals, latency histogram, exits, features."""
    ds = hist.latest.devices[key]
    parts: list[RenderableType] = []
    for q in ds.queues:
        c, rs = q.c, q.ring
        line = Text(f"queue {q.index}: ", style="bold")
        if rs is None:
            line.append(q.ring_error or "not ready", style="dim")
        elif rs.ring == "split":
            line.append(f"avail flags 0x{rs.avail_flags:x} idx {rs.avail_idx} used_event "
                        f"{rs.used_event} | used flags 0x{rs.used_flags:x} idx {rs.used_idx} "
                        f"avail_event {rs.avail_event} | last seen: driver used "
                        f"{c['drv_last_used']}, device avail {c['dev_last_avail']}")
        else:
            line.append(f"driver event off {rs.driver_event[0] & 0x7FFF}/w"
                        f"{rs.driver_event[0] >> 15} flags {rs.driver_event[1]} | device "
                        f"event off {rs.device_event[0] & 0x7FFF}/w{rs.device_event[0] >> 15}"
                        f" flags {rs.device_event[1]} | driver next {rs.avail_idx}/w"
                        f"{rs.avail_wrap}, device avail {c['dev_last_avail'] & 0x7FFF}/w"
                        f"{c['dev_last_avail'] >> 15}, device used {rs.used_idx}/w"
                        f"{rs.used_wrap}")
        line.append(f" | spurious {c['spurious']:,} missed {c['missed']:,}"
                    f" read {fmt_bytes(c['bytes_read'])} written "
                    f"{fmt_bytes(c['bytes_written'])}")
        parts.append(line)
        if rs is not None:
            parts.append(Text("  ").append_text(ring_picture(rs, RING_CELLS_FOCUSED)))
        parts.append(latency_bars(q.hist, c["lat_every"]))
    if ds.exits_by_kind:
        parts.append(Text("exits by kind: " + ", ".join(
            f"{k} {v:,}" for k, v in sorted(ds.exits_by_kind.items()))))
    names = DEVICE_FEATURE_NAMES.get(dev["type"], {})
    c = ds.c
    feats = c["driver_features"] if c["status"] & (S.FEATURES_OK | S.DRIVER_OK) else 0
    parts.append(Text("features: " + (" ".join(F.names(feats, names)) or "(none negotiated)")
                      + f"   config generation {c['config_generation']}, config interrupts "
                        f"{c['config_interrupts']}, resets {c['resets']}"))
    return Group(*parts)


def latency_bars(hist: list[int], every: int) -> Text:
    """The histogram's occupied buckets as one line of bars, labelled at the ends."""
    used = [i for i, n in enumerate(hist) if n]
    t = Text("  latency ", style="dim")
    if not used:
        return t.append("(no samples)", style="dim")
    lo, hi = used[0], used[-1]
    top = max(hist)
    t.append(f"{fmt_ns(0 if lo == 0 else 1 << (lo - 1))} ", style="dim")
    for i in range(lo, hi + 1):
        t.append(BARS[min(8, -(-hist[i] * 8 // top))] if hist[i] else "·", style="cyan")
    t.append(f" {fmt_ns(1 << hi)}", style="dim")
    upper = "+" if hi == LATENCY_BUCKETS - 1 else ""
    t.append(f"{upper}  ({sum(hist):,} samples, 1 request in {every or '-'} timed)",
             style="dim")
    return t


def workloads_table(vname: str, vm: dict[str, Any], hist: History) -> Text | None:
    if not vm["workloads"]:
        return None
    t = Grid([(c, "left" if c in ("workload", "type", "device") else "right")
              for c in ("workload", "type", "device", "ops", "ops/s", "MB/s", "errors")])
    for wname, w in vm["workloads"].items():
        c = hist.latest.workloads[(vname, wname)]
        r = hist.workload((vname, wname))
        err = Text(f"{c['errors']:,}", style="bold red" if c["errors"] else "")
        t.add_row(wname, w["type"], w["device"], f"{c['ops']:,}", fmt_rate(r.ops_per_s),
                  f"{r.mb_per_s:.1f}", err)
    return t.text()


def vm_panel(vname: str, vm: dict[str, Any], hist: History, focus_dev: str | None,
             width: int | None = None) -> Panel:
    parts: list[RenderableType] = []
    for dname, dev in vm["devices"].items():
        if focus_dev is not None and dname != focus_dev:
            continue
        key = (vname, dname)
        parts.append(device_title(key, dev, hist))
        cells = RING_CELLS_FOCUSED // 2 if focus_dev else RING_CELLS
        parts.append(queue_table(key, hist, cells, width - 4 if width else None))
        if focus_dev is not None:
            parts.append(device_detail(key, dev, hist))
    wt = workloads_table(vname, vm, hist)
    if wt is not None and focus_dev is None:
        parts.append(wt)
    ram = vm["ram"]
    title = f"[bold]{vname}[/]  RAM {fmt_bytes(ram['size'])} at 0x{ram['base']:x}"
    return Panel(Group(*parts), title=title, title_align="left", border_style="blue")


def topology_panel(manifest: dict[str, Any]) -> Panel:
    lines: list[Text] = []
    for sw, ports in manifest.get("switches", {}).items():
        lines.append(Text(f"switch {sw}: " + (" ↔ ".join(ports) or "(nothing attached)")))
    for vname, vm in manifest["vms"].items():
        for dname, dev in vm["devices"].items():
            line = Text(f"{vname}.{dname}: {dev['type']} over {dev['transport']}, "
                        f"{dev['ring']} ring, {dev['backend']}")
            if dev.get("mac"):
                line.append(f", mac {dev['mac']}")
            lines.append(line)
            for p in dev.get("ports", []):
                if p["backend"] == "pty" and p["path"]:
                    cmd = f"vmsim console {vname} {dname}" + (f" {p['name']}" if p["index"]
                                                              else "")
                    lines.append(Text(f"  port {p['index']} ({p['name']}): pty {p['path']}  "
                                      f"(attach: {cmd})", style="dim"))
                elif p["path"]:
                    lines.append(Text(f"  port {p['index']} ({p['name']}): {p['backend']} "
                                      f"{p['path']}", style="dim"))
    return Panel(Group(*lines), title="topology", title_align="left", border_style="dim")


def render(manifest: dict[str, Any], hist: History, ui: UiState,
           elapsed: float | None = None, width: int | None = None) -> RenderableType:
    """The whole dashboard for the latest sample in `hist`, for a screen `width` wide (the
    queue tables leave out their least important columns to fit)."""
    parts: list[RenderableType] = [header(manifest, ui, elapsed)]
    targets = focus_targets(manifest)
    target = targets[ui.focus] if ui.focus < len(targets) else ()
    if hist.latest is None:
        parts.append(Text("waiting for the first sample...", style="dim"))
        return Group(*parts)
    for vname, vm in manifest["vms"].items():
        if target and target[0] != vname:
            continue
        parts.append(vm_panel(vname, vm, hist, target[1] if len(target) > 1 else None,
                              width))
    if not target:
        parts.append(topology_panel(manifest))
    for m in ui.messages:
        parts.append(Text(m, style="yellow"))
    return Group(*parts)
