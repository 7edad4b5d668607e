"""Builds a device (and its backend) from its part of the run spec."""

from typing import Any

from vmsim.host.devices.blk.backend import FileBackend, MemoryBackend
from vmsim.host.devices.blk.device import BlkDevice
from vmsim.host.memory import GuestMemory
from vmsim.host.virtio.device import VirtioDevice
from vmsim.machine.stats import StatsRegion


def make_device(spec: dict[str, Any], mem: GuestMemory, stats: StatsRegion) -> VirtioDevice:
    dev_stats = stats.device(spec["device_record"])
    queue_stats = [stats.queue(i) for i in spec["queue_records"]]
    offer = sum(1 << b for b in spec.get("offer", []))
    withhold = sum(1 << b for b in spec.get("withhold", []))
    faults = spec.get("faults", {})
    if spec["type"] == "blk":
        b = spec["blk"]
        if b["backend"] == "memory":
            backend = MemoryBackend(b["size"])
        else:
            backend = FileBackend(b["path"], b.get("size"), b.get("readonly", False))
        return BlkDevice(spec["name"], mem, backend, readonly=b.get("readonly", False),
                         num_queues=spec.get("num_queues", 1), queue_size=spec["queue_size"],
                         offer=offer, withhold=withhold, packed=spec.get("ring") == "packed",
                         blk_size=b.get("blk_size", 512),
                         serial=b.get("serial", spec["name"]), dev_stats=dev_stats,
                         queue_stats=queue_stats,
                         refuse_features_ok=faults.get("refuse_features_ok", False))
    raise ValueError(f"device type {spec['type']!r} is not implemented on the host")
