"""Builds a device (and its backend) from its part of the run spec."""

from typing import Any

from vmsim.abi import net as N
from vmsim.host.devices.blk.backend import FileBackend, MemoryBackend
from vmsim.host.devices.blk.device import BlkDevice
from vmsim.host.devices.console.backend import make_backend as make_console_backend
from vmsim.host.devices.console.device import ConsoleDevice
from vmsim.host.devices.console.ports import HostPort
from vmsim.host.devices.net.backend import NetBackend, SwitchBackend, TapBackend
from vmsim.host.devices.net.device import NetDevice
from vmsim.host.memory import GuestMemory
from vmsim.host.vhost_user.connection import Connection, connect
from vmsim.host.vhost_user.device import VhostUserDevice
from vmsim.host.virtio.device import VirtioDevice
from vmsim.machine.stats import StatsRegion


def make_device(spec: dict[str, Any], mem: GuestMemory, stats: StatsRegion,
                env: Any = None) -> VirtioDevice:
    """`env` is what devices share across the host: `switches` by name, the event `loop`."""
    dev_stats = stats.device(spec["device_record"])
    queue_stats = [stats.queue(i) for i in spec["queue_records"]]
    offer = sum(1 << b for b in spec.get("offer", []))
    withhold = sum(1 << b for b in spec.get("withhold", []))
    faults = spec.get("faults", {})
    if spec.get("vhost_user") is not None:
        return _make_vhost_user(spec, mem, dev_stats, queue_stats, offer, withhold, env)
    if spec["type"] == "blk":
        b = spec["blk"]
        if b["backend"] == "memory":
            backend = MemoryBackend(b["size"])
        else:
            backend = FileBackend(b["path"], b.get("size"), b.get("readonly", False))
        disk = BlkDevice(spec["name"], mem, backend, readonly=b.get("readonly", False),
                         num_queues=spec.get("num_queues", 1), queue_size=spec["queue_size"],
                         offer=offer, withhold=withhold, packed=spec.get("ring") == "packed",
                         blk_size=b.get("blk_size", 512),
                         serial=b.get("serial", spec["name"]), dev_stats=dev_stats,
                         queue_stats=queue_stats,
                         refuse_features_ok=faults.get("refuse_features_ok", False))
        disk.msix_vectors = spec.get("msix_vectors")  # PCI: MSI-X table size (None: q + 1)
        return disk
    if spec["type"] == "net":
        n = spec["net"]
        if "tap" in n["backend"]:
            net_backend: NetBackend = TapBackend(n["backend"]["tap"], env.loop.add_reader,
                                                 env.loop.remove_reader)
        else:
            sw = env.switches[n["backend"]["switch"]]
            net_backend = SwitchBackend(sw, f"{env.vm}.{spec['name']}")
        return NetDevice(spec["name"], mem, net_backend, mac=N.parse_mac(n["mac"]),
                         max_pairs=n["queue_pairs"], queue_size=spec["queue_size"],
                         mtu=n["mtu"], offer=offer, withhold=withhold,
                         packed=spec.get("ring") == "packed", dev_stats=dev_stats,
                         queue_stats=queue_stats,
                         refuse_features_ok=faults.get("refuse_features_ok", False),
                         link_up=n.get("link_up", True))
    if spec["type"] == "console":
        return _make_console(spec, mem, dev_stats, queue_stats, offer, withhold,
                             faults.get("refuse_features_ok", False), env)
    raise ValueError(f"device type {spec['type']!r} is not implemented on the host")


def _make_console(spec: dict[str, Any], mem: GuestMemory, dev_stats: memoryview | None,
                  queue_stats: list[memoryview | None], offer: int, withhold: int,
                  refuse_features_ok: bool, env: Any) -> VirtioDevice:
    c = spec["console"]
    size = (int(c["size"][0]), int(c["size"][1]))
    ports: list[HostPort] = []
    try:
        for i, p in enumerate(c["ports"]):
            backend = make_console_backend(p["backend"], p.get("path"), p.get("link"), size)
            ports.append(HostPort(i, p["name"], backend, bool(p.get("console", i == 0)), size))
        dev = ConsoleDevice(spec["name"], mem, ports, multiport=c["multiport"],
                            max_nr_ports=c.get("max_nr_ports"), queue_size=spec["queue_size"],
                            offer=offer, withhold=withhold, packed=spec.get("ring") == "packed",
                            dev_stats=dev_stats, queue_stats=queue_stats,
                            refuse_features_ok=refuse_features_ok,
                            loop=getattr(env, "loop", None))
        if c.get("manifest"):
            dev.write_manifest(c["manifest"], getattr(env, "vm", ""))
    except BaseException:
        for p in ports:
            p.backend.close()
        raise
    return dev


def _make_vhost_user(spec: dict[str, Any], mem: GuestMemory, dev_stats: memoryview | None,
                     queue_stats: list[memoryview | None], offer: int, withhold: int,
                     env: Any) -> VirtioDevice:
    """A device whose rings a vhost-user backend serves: connect, handshake, and build the
    host's half on what the backend offers."""
    path = spec["vhost_user"]["socket"]
    label = f"{env.vm}.{spec['name']}: vhost-user {path}"
    conn = Connection(connect(path), label, path)
    try:
        conn.handshake(backend_req=getattr(mem, "translating", False))
        net = spec.get("net", {})
        dev = VhostUserDevice(
            spec["name"], spec["type"], mem, spec["vhost_user"]["ram"], conn,
            num_queues=spec.get("num_queues", 1) if spec["type"] != "net" else 2,
            queue_size=spec["queue_size"], offer=offer, withhold=withhold,
            packed=spec.get("ring") == "packed", dev_stats=dev_stats, queue_stats=queue_stats,
            add_reader=env.loop.add_reader, remove_reader=env.loop.remove_reader,
            refuse_features_ok=spec.get("faults", {}).get("refuse_features_ok", False),
            mac=N.parse_mac(net["mac"]) if net else b"\0" * 6,
            mtu=net.get("mtu", N.ETH_DATA_LEN))
    except BaseException:
        conn.close()
        raise
    dev.msix_vectors = spec.get("msix_vectors")
    return dev

