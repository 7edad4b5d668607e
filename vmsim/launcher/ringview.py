"""A queue's ring read straight from guest RAM, as a debugger would: the reader maps the VM's
RAM object read-only and decodes the ring at the guest-physical addresses the device published
in the queue's stats record when the queue became ready (vmsim.machine.stats.Q.DESC_ADDR..).

Split (spec 2.7): avail flags and idx, used flags and idx, used_event and avail_event, read
through 'H' casts of the two areas (each field one aligned native load, DESIGN.md).

Packed (spec 2.8): the descriptors' flags (every slot's AVAIL and USED bits) and both event
suppression areas. The driver's next available position is not stored in RAM, but the AVAIL
bits tell it: both sides write the ring in order, each slot with AVAIL = the wrap counter of
the lap in which it was last written (the driver's avail flags, the device's used flags), so
the slots before the driver's position carry its current wrap counter and the slots from it
on carry the previous one. The device's positions come from its record (DEV_USED ..).

The ring's data is untrusted input here as everywhere: addresses are checked against the RAM
object before any view is made, and nothing read is used as an address.
"""

from dataclasses import dataclass, field

from vmsim.abi import packed_ring as P
from vmsim.abi import split_ring as R

IDX = 0xFFFF
WRAP_SHIFT = P.VRING_PACKED_EVENT_F_WRAP_CTR


@dataclass
class RingState:
    """What a reader sees of one ring at one moment."""
    ring: str                         # "split" or "packed"
    size: int
    avail_idx: int                    # split: avail->idx; packed: the driver's next position
    used_idx: int                     # split: used->idx; packed: the device's next position
    avail_wrap: int = 0               # packed: wrap counters of those positions
    used_wrap: int = 0
    avail_flags: int = 0              # split: avail->flags (NO_INTERRUPT)
    used_flags: int = 0               # split: used->flags (NO_NOTIFY)
    used_event: int = 0               # split: what the driver asks (EVENT_IDX)
    avail_event: int = 0              # split: what the device asks (EVENT_IDX)
    driver_event: tuple[int, int] = (0, 0)   # packed: (off_wrap, flags) the driver wrote
    device_event: tuple[int, int] = (0, 0)   # packed: (off_wrap, flags) the device wrote
    in_ring: int = 0                  # buffers (split) / descriptors (packed) not yet used
    # The ring's slots in order: 0 free or used, 1 made available and not yet taken by the
    # device, 2 taken by the device and not yet used. Split: avail ring slots; packed:
    # descriptors (the device's take is not visible per slot there: 1 means AVAIL != USED).
    slots: bytearray = field(default_factory=bytearray)


class RingView:
    """Views of one ring in a read-only RAM mapping; rebuilt when the layout changes."""

    def __init__(self, ram: memoryview, ram_base: int, ring: str, size: int, desc: int,
                 driver: int, device: int) -> None:
        self.ring, self.size = ring, size
        self.key = (ring, size, desc, driver, device)
        self._views: list[memoryview] = []
        if ring == "split":
            self.avail_h = self._view(ram, ram_base, driver, R.avail_size(size), "H")
            self.used_h = self._view(ram, ram_base, device, R.used_size(size), "H")
            self.used_event_at = R.avail_h_used_event(size)
            self.avail_event_at = R.used_h_avail_event(size)
        else:
            self.ring_h = self._view(ram, ram_base, desc, P.ring_size(size), "H")
            self.drv_ev = self._view(ram, ram_base, driver, P.EVENT_SIZE, "H")
            self.dev_ev = self._view(ram, ram_base, device, P.EVENT_SIZE, "H")

    def _view(self, ram: memoryview, base: int, gpa: int, length: int, fmt: str) -> memoryview:
        off = gpa - base
        if off < 0 or off + length > len(ram):
            raise ValueError(f"ring area 0x{gpa:x}+{length} is outside guest RAM")
        if off % 4:
            raise ValueError(f"ring area 0x{gpa:x} is misaligned")
        v = ram[off:off + length].cast(fmt)
        self._views.append(v)
        return v

    def read(self, dev_last_avail: int, dev_used: int) -> RingState:
        """The ring now. `dev_last_avail` and `dev_used` are the device's positions from its
        record (split: free-running 16-bit indices; packed: position | wrap << 15)."""
        if self.ring == "split":
            return self._read_split(dev_last_avail)
        return self._read_packed(dev_used)

    def _read_split(self, dev_last_avail: int) -> RingState:
        a, u, num = self.avail_h, self.used_h, self.size
        # used idx first: whatever it shows was made available before avail idx is read.
        used_idx = u[R.USED_H_IDX]
        avail_idx = a[R.AVAIL_H_IDX]
        in_ring = (avail_idx - used_idx) & IDX
        # A device position outside [used idx, avail idx] is stale (published earlier).
        taken = (dev_last_avail - used_idx) & IDX
        if taken > in_ring:
            taken = 0
        slots = bytearray(num)
        if in_ring <= num:
            _fill(slots, used_idx, taken, 2)
            _fill(slots, used_idx + taken, in_ring - taken, 1)
        return RingState("split", num, avail_idx, used_idx, avail_flags=a[R.AVAIL_H_FLAGS],
                         used_flags=u[R.USED_H_FLAGS], used_event=a[self.used_event_at],
                         avail_event=u[self.avail_event_at], in_ring=in_ring, slots=slots)

    def _read_packed(self, dev_used: int) -> RingState:
        num = self.size
        flags = self.ring_h[7::8].tolist()     # each one 16-bit load
        lap = [f >> P.VRING_PACKED_DESC_F_AVAIL & 1 for f in flags]
        slots = bytearray((f >> P.VRING_PACKED_DESC_F_AVAIL ^ f >> P.VRING_PACKED_DESC_F_USED)
                          & 1 for f in flags)
        first = lap[0] if lap else 0
        pos = next((i for i, x in enumerate(lap) if x != first), None)
        if pos is None:                        # a whole lap in one wrap: the driver is at 0
            avail, avail_wrap = 0, first ^ 1
        else:
            avail, avail_wrap = pos, first
        d0, d1 = self.drv_ev[P.EVENT_H_OFF_WRAP], self.drv_ev[P.EVENT_H_FLAGS]
        e0, e1 = self.dev_ev[P.EVENT_H_OFF_WRAP], self.dev_ev[P.EVENT_H_FLAGS]
        return RingState("packed", num, avail, dev_used & ~(1 << WRAP_SHIFT),
                         avail_wrap=avail_wrap, used_wrap=dev_used >> WRAP_SHIFT & 1,
                         driver_event=(d0, d1), device_event=(e0, e1),
                         in_ring=num - slots.count(0), slots=slots)

    def release(self) -> None:
        for v in self._views:
            v.release()
        self._views = []


def _fill(slots: bytearray, start: int, n: int, state: int) -> None:
    """Mark `n` slots from ring position `start` (wrapping) with `state`."""
    num = len(slots)
    start %= num
    first = min(n, num - start)
    slots[start:start + first] = bytes([state]) * first
    slots[:n - first] = bytes([state]) * (n - first)


def picture(slots: bytearray, width: int) -> list[tuple[int, bool]]:
    """The ring squeezed into at most `width` cells, each (eighths of its slots in use,
    whether any of them is with the device)."""
    n = len(slots)
    cells = min(width, n)
    out = []
    for c in range(cells):
        part = slots[c * n // cells:(c + 1) * n // cells]
        busy = len(part) - part.count(0)
        out.append((-(-busy * 8 // len(part)), 2 in part))     # any use shows
    return out
