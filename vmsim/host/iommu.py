"""The platform IOMMU as the host models it: domains of IOVA -> guest-physical mappings, the
endpoints (devices) attached to them, and the IOTLB a device translates through.

A device whose driver negotiated VIRTIO_F_ACCESS_PLATFORM reaches guest memory only through
its endpoint's IOTLB (vmsim.host.memory.IotlbMemory); what the guest did not map, or mapped
without the permission the access needs, is refused with an IommuFault naming the IOVA, the
access and the endpoint. The guest programs the domains through the IOMMU device
(vmsim.host.iommu_device); a vhost-user frontend subscribes to an endpoint's changes to
forward them to its backend as VHOST_USER_IOTLB_MSG updates and invalidations.

Iotlb is the translation structure both sides use (the backend fills its own from IOTLB
messages): sorted, non-overlapping byte ranges, each with a target address and permissions.
"""

import bisect
from collections.abc import Callable

from vmsim.abi import iommu as I

PERM_R = 1      # VHOST_ACCESS_RO / VIRTIO_IOMMU_MAP_F_READ
PERM_W = 2      # VHOST_ACCESS_WO / VIRTIO_IOMMU_MAP_F_WRITE
PERM_RW = PERM_R | PERM_W
PERM_NAMES = {0: "none", PERM_R: "read", PERM_W: "write", PERM_RW: "read/write"}


class IommuFault(Exception):
    """A device access the IOTLB refuses: `kind` is "unmapped" (an IOTLB miss) or
    "permission" (mapped, without the access's permission)."""

    def __init__(self, kind: str, iova: int, length: int, perm: int, who: str = "",
                 have: int = 0) -> None:
        self.kind, self.iova, self.length, self.perm, self.who = kind, iova, length, perm, who
        self.have = have
        what = ("not mapped" if kind == "unmapped"
                else "mapped without " + PERM_NAMES[perm & ~have])
        where = f" ({who})" if who else ""
        super().__init__(f"IOMMU fault{where}: device {PERM_NAMES[perm]} of IOVA "
                         f"0x{iova:x}+0x{length:x}: 0x{iova:x} is {what}")


class Iotlb:
    """IOVA ranges [start, end) -> target (guest-physical or user) addresses with permissions."""

    __slots__ = ("_ends", "_perms", "_starts", "_targets")

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._ends: list[int] = []
        self._targets: list[int] = []
        self._perms: list[int] = []

    def __len__(self) -> int:
        return len(self._starts)

    def entries(self) -> list[tuple[int, int, int, int]]:
        """(iova, size, target, perm) of every range, in IOVA order."""
        return [(s, e - s, t, p) for s, e, t, p in
                zip(self._starts, self._ends, self._targets, self._perms, strict=True)]

    def overlaps(self, iova: int, size: int) -> bool:
        k = bisect.bisect_right(self._starts, iova) - 1
        if k >= 0 and self._ends[k] > iova:
            return True
        k += 1
        return k < len(self._starts) and self._starts[k] < iova + size

    def insert(self, iova: int, size: int, target: int, perm: int) -> None:
        """Add a range; one overlapping an existing range is refused (ValueError)."""
        if size <= 0 or iova < 0 or iova + size > 1 << 64:
            raise ValueError(f"bad IOTLB range 0x{iova:x}+0x{size:x}")
        if self.overlaps(iova, size):
            raise ValueError(f"IOVA range 0x{iova:x}+0x{size:x} overlaps a mapping")
        k = bisect.bisect_left(self._starts, iova)
        self._starts.insert(k, iova)
        self._ends.insert(k, iova + size)
        self._targets.insert(k, target)
        self._perms.insert(k, perm)

    def remove(self, iova: int, size: int) -> list[tuple[int, int]]:
        """Drop [iova, iova+size) from every range (a range partly inside is cut); the
        (iova, size) pieces removed."""
        end = iova + size
        removed: list[tuple[int, int]] = []
        k = max(bisect.bisect_right(self._starts, iova) - 1, 0)
        while k < len(self._starts) and self._starts[k] < end:
            s, e, t, p = self._starts[k], self._ends[k], self._targets[k], self._perms[k]
            if e <= iova:
                k += 1
                continue
            lo, hi = max(s, iova), min(e, end)
            removed.append((lo, hi - lo))
            del self._starts[k], self._ends[k], self._targets[k], self._perms[k]
            if s < lo:          # the part before the hole stays
                self._starts.insert(k, s)
                self._ends.insert(k, lo)
                self._targets.insert(k, t)
                self._perms.insert(k, p)
                k += 1
            if hi < e:          # and the part after it
                self._starts.insert(k, hi)
                self._ends.insert(k, e)
                self._targets.insert(k, t + (hi - s))
                self._perms.insert(k, p)
                k += 1
        return removed

    def clear(self) -> None:
        self._starts, self._ends, self._targets, self._perms = [], [], [], []

    def lookup(self, iova: int) -> tuple[int, int, int, int] | None:
        """The range holding `iova` as (iova, size, target, perm), or None."""
        k = bisect.bisect_right(self._starts, iova) - 1
        if k >= 0 and iova < self._ends[k]:
            s = self._starts[k]
            return s, self._ends[k] - s, self._targets[k], self._perms[k]
        return None

    def translate(self, iova: int, length: int, perm: int,
                  who: str = "") -> list[tuple[int, int]]:
        """[iova, iova+length) as (target, length) pieces, for an access needing `perm`;
        IommuFault at the first byte that is unmapped or lacks the permission."""
        out: list[tuple[int, int]] = []
        starts, ends = self._starts, self._ends
        k = bisect.bisect_right(starts, iova) - 1
        at, left = iova, length
        while left > 0:
            if k < 0 or at >= ends[k]:
                k += 1
                if k >= len(starts) or starts[k] > at:
                    raise IommuFault("unmapped", at, left, perm, who)
            if self._perms[k] & perm != perm:
                raise IommuFault("permission", at, left, perm, who, self._perms[k])
            n = min(left, ends[k] - at)
            target = self._targets[k] + (at - starts[k])
            if out and out[-1][0] + out[-1][1] == target:
                out[-1] = (out[-1][0], out[-1][1] + n)      # physically contiguous: one piece
            else:
                out.append((target, n))
            at += n
            left -= n
        return out


# An endpoint's subscriber: (event, iova, size, gpa, perm) with event "map" or "unmap"
# (gpa and perm 0 for an unmap); called after the IOTLB changed.
Listener = Callable[[str, int, int, int, int], None]


class Domain:
    """One address space: the mappings MAP and UNMAP made, shared by its endpoints."""

    def __init__(self, ident: int) -> None:
        self.id = ident
        self.iotlb = Iotlb()
        self.endpoints: set[int] = set()


class Iommu:
    """The IOMMU of one VM: endpoints (device ids from the firmware description), the domain
    each is attached to, and subscriptions to an endpoint's mapping changes."""

    def __init__(self, ram_base: int, ram_size: int) -> None:
        self.ram_base, self.ram_end = ram_base, ram_base + ram_size
        self.endpoints: dict[int, str] = {}              # id -> device name
        self.attached: dict[int, Domain] = {}            # endpoint -> its domain
        self.domains: dict[int, Domain] = {}
        self.listeners: dict[int, list[Listener]] = {}
        self.faults = 0
        self.n_maps = self.n_unmaps = 0
        self._empty = Iotlb()           # what an endpoint attached to nothing translates by

    def add_endpoint(self, ident: int, name: str) -> None:
        self.endpoints[ident] = name

    def iotlb(self, endpoint: int) -> Iotlb:
        """The IOTLB the endpoint translates through now (an empty one while detached: a
        device behind the IOMMU reaches nothing until its driver maps something)."""
        dom = self.attached.get(endpoint)
        return dom.iotlb if dom is not None else self._empty

    def subscribe(self, endpoint: int, listener: Listener) -> Callable[[], None]:
        """Call `listener` on every map and unmap the endpoint's domain sees (and an unmap
        of everything when it is detached or moved); returns the unsubscribe call."""
        self.listeners.setdefault(endpoint, []).append(listener)
        return lambda: self.listeners.get(endpoint, []).remove(listener)

    def _notify(self, dom: Domain, event: str, iova: int, size: int, gpa: int,
                perm: int) -> None:
        for ep in dom.endpoints:
            for listener in list(self.listeners.get(ep, ())):
                listener(event, iova, size, gpa, perm)

    # ---- the requests (virtio-iommu semantics) ---------------------------------------------------
    def attach(self, domain: int, endpoint: int) -> int:
        if endpoint not in self.endpoints:
            return I.S_NOENT
        old = self.attached.get(endpoint)
        if old is not None and old.id == domain:
            return I.S_OK
        if old is not None:
            self._detach(old, endpoint)
        dom = self.domains.get(domain)
        if dom is None:
            dom = self.domains[domain] = Domain(domain)
        dom.endpoints.add(endpoint)
        self.attached[endpoint] = dom
        for iova, size, gpa, perm in dom.iotlb.entries():
            for listener in list(self.listeners.get(endpoint, ())):
                listener("map", iova, size, gpa, perm)
        return I.S_OK

    def detach(self, domain: int, endpoint: int) -> int:
        dom = self.attached.get(endpoint)
        if endpoint not in self.endpoints:
            return I.S_NOENT
        if dom is None or dom.id != domain:
            return I.S_INVAL
        self._detach(dom, endpoint)
        return I.S_OK

    def _detach(self, dom: Domain, endpoint: int) -> None:
        dom.endpoints.discard(endpoint)
        del self.attached[endpoint]
        for listener in list(self.listeners.get(endpoint, ())):
            listener("unmap", 0, 1 << 64, 0, 0)
        if not dom.endpoints:
            del self.domains[dom.id]    # "the driver can reuse its ID for another domain"

    def map(self, domain: int, virt_start: int, virt_end: int, phys: int, flags: int) -> int:
        dom = self.domains.get(domain)
        if dom is None:
            return I.S_NOENT
        size = virt_end - virt_start + 1
        mask = I.PAGE_SIZE - 1
        if flags & ~(I.MAP_F_READ | I.MAP_F_WRITE | I.MAP_F_MMIO) or size <= 0 \
                or virt_start & mask or size & mask or phys & mask:
            return I.S_INVAL
        if flags & I.MAP_F_MMIO:
            return I.S_UNSUPP
        if virt_end >= 1 << I.INPUT_BITS:
            return I.S_RANGE
        if phys < self.ram_base or phys + size > self.ram_end:
            return I.S_RANGE                # only RAM is mappable
        if dom.iotlb.overlaps(virt_start, size):
            return I.S_INVAL
        perm = flags & PERM_RW
        dom.iotlb.insert(virt_start, size, phys, perm)
        self.n_maps += 1
        self._notify(dom, "map", virt_start, size, phys, perm)
        return I.S_OK

    def unmap(self, domain: int, virt_start: int, virt_end: int) -> int:
        dom = self.domains.get(domain)
        if dom is None:
            return I.S_NOENT
        if virt_end < virt_start:
            return I.S_INVAL
        for iova, size in dom.iotlb.remove(virt_start, virt_end - virt_start + 1):
            self.n_unmaps += 1
            self._notify(dom, "unmap", iova, size, 0, 0)
        return I.S_OK

    def describe(self) -> dict:
        return {"endpoints": {n: i for i, n in self.endpoints.items()},
                "domains": {d.id: len(d.iotlb) for d in self.domains.values()},
                "maps": self.n_maps, "unmaps": self.n_unmaps, "faults": self.faults}
