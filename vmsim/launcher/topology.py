"""The topology file: VMs, their devices, transports, rings, features, backends, workloads.

Validated with pydantic; every error is reported as one line naming the file, the key and
what was expected, and the run does not start.
"""

import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from vmsim.abi import blk as B
from vmsim.abi import console as CON
from vmsim.abi import features as F
from vmsim.abi import net as N

MiB = 1 << 20
_SIZE_RE = re.compile(r"^\s*(\d+)\s*([kmgt]?)(i?b)?\s*$", re.I)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
NAME_RE = r"^[A-Za-z][A-Za-z0-9_-]{0,31}$"
_REL_KEY_RE = re.compile(r"^([A-Za-z_][\w-]*(?:\.[\w-]+)*): (.*)$", re.S)


class TopologyError(Exception):
    """A topology that cannot run; the message is one readable line."""


def parse_size(v: Any) -> int:
    """Bytes from an int or a string such as 64M, 64MiB, 1G, 4096."""
    if isinstance(v, bool):
        raise ValueError("expected a size such as 64M or 4096")
    if isinstance(v, int):
        return v
    if isinstance(v, str):
        m = _SIZE_RE.match(v)
        if m:
            return int(m.group(1)) * _UNITS[m.group(2).lower()]
    raise ValueError(f"expected a size such as 64M, 1G or 4096, got {v!r}")


Size = Annotated[int, BeforeValidator(parse_size)]


class Strict(BaseModel):
    # strict: a YAML `yes` is not the number 1, nor "256" a number
    model_config = ConfigDict(extra="forbid", strict=True)


def _check_device(dev: Any) -> None:
    """A split ring's size is a power of two; a legacy transport has no packed rings; only a
    PCI slot can start empty."""
    if not dev.adapter_interrupts and dev.transport != "ccw":
        raise ValueError(f"adapter_interrupts: a virtio-ccw setting, this device is on "
                         f"{dev.transport}")
    if not dev.plugged and not dev.transport.startswith("pci"):
        raise ValueError(f"plugged: only a PCI device can start unplugged (hot-plug is a PCI "
                         f"slot's), this one is on {dev.transport}")
    if dev.ring == "split" and dev.queue_size & (dev.queue_size - 1):
        raise ValueError(f"queue_size: expected a power of two from 1 to 32768 for a split "
                         f"ring, got {dev.queue_size} (a packed ring may have any size)")
    if dev.ring == "packed" and dev.transport.endswith("legacy"):
        raise ValueError(f"ring: a {dev.transport} device cannot have packed rings (legacy "
                         f"virtio predates them; use transport {dev.transport[:-7]})")
    if dev.iommu and dev.transport not in ("mmio", "pci"):
        raise ValueError(f"iommu: a device behind the IOMMU negotiates VIRTIO_F_ACCESS_PLATFORM "
                         f"(bit 33), which needs virtio 1 on mmio or pci; this one is on "
                         f"{dev.transport}")


class FeatureSpec(Strict):
    offer: list[str] = Field(default_factory=list)
    withhold: list[str] = Field(default_factory=list)


class Faults(Strict):
    refuse_features_ok: bool = False


class VhostUserSpec(Strict):
    """Where a device's data path runs when it leaves the host process: a vhost-user backend
    vmsim starts for the device (spawn) or one already listening on a socket."""
    spawn: bool = Field(False, description="start `vmsim backend TYPE` for this device")
    socket: str | None = Field(None, description="connect to a vhost-user backend listening "
                               "on this UNIX socket")

    @model_validator(mode="after")
    def _one(self) -> "VhostUserSpec":
        if self.spawn == (self.socket is not None):
            raise ValueError("expected exactly one of spawn: true or socket: PATH")
        return self


class ExternalBackendSpec(Strict):
    """`backend: {vhost_user: {...}}`: the device's rings are served by another process."""
    vhost_user: VhostUserSpec


# A blk backend by name, or {vhost_user: ...}; the discriminator keeps a mistake's error to the
# form the user wrote (not both forms' errors).
BlkBackend = Annotated[
    Annotated[Literal["file", "memory"], Tag("name")] | Annotated[ExternalBackendSpec, Tag("ext")],
    Discriminator(lambda v: "ext" if isinstance(v, dict | ExternalBackendSpec) else "name")]


class DeviceBase(Strict):
    """What every device type has: its transport and the transport's settings."""
    transport: Literal["mmio", "mmio-legacy", "pci", "pci-legacy", "ccw"] = "mmio"
    plugged: bool = Field(True, description="false: the PCI slot starts empty; a scenario "
                          "hot-plugs the device")
    adapter_interrupts: bool = Field(True, description="ccw: offer adapter (two-level) "
                                     "indicators; false: classic indicators only")
    iommu: bool | Literal["lazy", "strict"] = Field(
        False, description="true or lazy: the device sits behind the board's IOMMU and offers "
        "VIRTIO_F_ACCESS_PLATFORM; it reaches guest memory only through the mappings its "
        "driver makes, unmaps reaching the IOMMU in batches (Linux's default); strict: each "
        "unmap at once (iommu.strict=1)")


class BlkDeviceSpec(DeviceBase):
    type: Literal["blk"]
    ring: Literal["split", "packed"] = Field(
        "split", description="packed: the device offers VIRTIO_F_RING_PACKED")
    queue_size: int = 256
    num_queues: int = Field(1, ge=1, le=64)
    features: FeatureSpec = Field(default_factory=FeatureSpec)
    faults: Faults = Field(default_factory=Faults)
    poll_us: int = Field(50, ge=0, le=1_000_000, description="driver busy-poll after work")
    backend: BlkBackend = Field(
        "file", description="file, memory, or {vhost_user: {spawn: true} | {socket: PATH}}: "
        "spawn serves the image file (path/size) from a `vmsim backend blk` process")
    path: str | None = None
    size: Size = 64 * MiB
    readonly: bool = False
    serial: str | None = None
    blk_size: int = 512
    msix_vectors: int | None = Field(
        None, ge=0, le=128, description="PCI: MSI-X table size (default a vector per queue "
        "plus one; 2 forces a shared queue vector, 0 or 1 INTx)")

    @field_validator("queue_size")
    @classmethod
    def _queue_size(cls, v: int) -> int:
        if not 0 < v <= 32768:
            raise ValueError(f"expected 1 to 32768 (a power of two for a split ring), got {v}")
        return v

    @field_validator("size")
    @classmethod
    def _size(cls, v: int) -> int:
        if v < B.SECTOR_SIZE or v % B.SECTOR_SIZE:
            raise ValueError(f"expected a multiple of 512 bytes, at least 512, got {v}")
        return v

    @field_validator("blk_size")
    @classmethod
    def _blk_size(cls, v: int) -> int:
        if v < 512 or v > 65536 or v & (v - 1):
            raise ValueError(f"expected a power of two from 512 to 65536, got {v}")
        return v

    @field_validator("serial")
    @classmethod
    def _serial(cls, v: str | None) -> str | None:
        if v is not None and len(v.encode()) > B.VIRTIO_BLK_ID_BYTES:
            raise ValueError(f"expected at most {B.VIRTIO_BLK_ID_BYTES} bytes, got {len(v)}")
        return v

    @model_validator(mode="after")
    def _ring_size(self) -> "BlkDeviceSpec":
        _check_device(self)
        return self

    @model_validator(mode="after")
    def _msix(self) -> "BlkDeviceSpec":
        if self.msix_vectors is not None and not self.transport.startswith("pci"):
            raise ValueError(f"msix_vectors: only PCI transports have MSI-X (transport is "
                             f"{self.transport})")
        return self

    @model_validator(mode="after")
    def _backend(self) -> "BlkDeviceSpec":
        if self.backend == "memory" and self.path is not None:
            raise ValueError("path: a memory backend has no file; drop path or use "
                             "backend: file")
        ext = self.backend if isinstance(self.backend, ExternalBackendSpec) else None
        if ext is not None and ext.vhost_user.socket is not None and self.path is not None:
            raise ValueError("path: the backend at the socket owns the disk; drop path")
        return self

    def vhost_user(self) -> VhostUserSpec | None:
        return self.backend.vhost_user if isinstance(self.backend, ExternalBackendSpec) \
            else None

    def feature_bits(self) -> tuple[list[int], list[int]]:
        return (_feature_list(self.features.offer, B.FEATURE_NAMES, "features.offer"),
                _feature_list(self.features.withhold, B.FEATURE_NAMES, "features.withhold"))


def _feature_list(names: list[str], device_names: dict[int, str], key: str) -> list[int]:
    bits = []
    for n in names:
        try:
            bits.append(F.parse_name(str(n), device_names))
        except KeyError:
            known = ", ".join(sorted(set(F.COMMON_NAMES.values()) | set(device_names.values())))
            raise ValueError(f"{key}: unknown feature {n!r} (known: {known})") from None
    return bits


class NetBackendSpec(Strict):
    switch: str | None = None
    tap: str | None = None
    vhost_user: VhostUserSpec | None = Field(
        None, description="{socket: PATH}: a vhost-user net backend serves the rings; "
        "{spawn: true} with tap: `vmsim backend net` serves them onto the TAP")

    @model_validator(mode="after")
    def _one(self) -> "NetBackendSpec":
        vu = self.vhost_user
        if vu is not None and vu.socket is not None:
            if self.switch is not None or self.tap is not None:
                raise ValueError("vhost_user.socket: the backend at the socket owns the "
                                 "frames; drop switch/tap")
        elif vu is not None and self.tap is None:
            raise ValueError("vhost_user.spawn: a spawned net backend needs tap: IFNAME "
                             "(a switch lives in the host process)")
        elif vu is None and (self.switch is None) == (self.tap is None):
            raise ValueError("expected exactly one of switch: NAME, tap: IFNAME or "
                             "vhost_user: {socket: PATH}")
        if self.tap is not None and not re.fullmatch(r"[A-Za-z0-9_.-]{1,15}", self.tap):
            raise ValueError(f"tap: expected an interface name of 1 to 15 characters, "
                             f"got {self.tap!r}")
        return self


class NetDeviceSpec(DeviceBase):
    type: Literal["net"]
    ring: Literal["split", "packed"] = "split"
    queue_size: int = 256
    queue_pairs: int = Field(1, ge=1, le=16)
    mac: str | None = None
    mtu: int = Field(1500, ge=68, le=9000)
    link: Literal["up", "down"] = "up"
    backend: NetBackendSpec
    features: FeatureSpec = Field(default_factory=FeatureSpec)
    faults: Faults = Field(default_factory=Faults)
    poll_us: int = Field(50, ge=0, le=1_000_000, description="driver busy-poll after work")

    @field_validator("queue_size")
    @classmethod
    def _queue_size(cls, v: int) -> int:
        if not 0 < v <= 32768:
            raise ValueError(f"expected 1 to 32768 (a power of two for a split ring), got {v}")
        return v

    @field_validator("mac")
    @classmethod
    def _mac(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                mac = N.parse_mac(v)
            except ValueError:
                raise ValueError(f"expected a MAC address such as 52:54:00:12:34:56, "
                                 f"got {v!r}") from None
            if N.is_multicast(mac):
                raise ValueError(f"{v} is a multicast address")
        return v

    @model_validator(mode="after")
    def _ring_size(self) -> "NetDeviceSpec":
        _check_device(self)
        if self.backend.vhost_user is not None and self.queue_pairs != 1:
            raise ValueError("queue_pairs: a vhost-user net device has one pair (no control "
                             "queue in the backend)")
        return self

    def vhost_user(self) -> VhostUserSpec | None:
        return self.backend.vhost_user

    def feature_bits(self) -> tuple[list[int], list[int]]:
        return (_feature_list(self.features.offer, N.FEATURE_NAMES, "features.offer"),
                _feature_list(self.features.withhold, N.FEATURE_NAMES, "features.withhold"))


PORT_NAME_RE = r"^[A-Za-z][A-Za-z0-9_.-]{0,62}$"
CONSOLE_MAX_PORTS = 64


class ConsoleSize(Strict):
    cols: int = Field(80, ge=1, le=65535)
    rows: int = Field(24, ge=1, le=65535)


class ConsolePortSpec(Strict):
    """One port of a console device: its name (PORT_NAME), where its bytes go on the host,
    and the guest program on it."""
    name: str | None = Field(None, pattern=PORT_NAME_RE,
                             description="default: console for port 0, port<N> after")
    backend: Literal["pty", "file", "socket", "none"] = "pty"
    path: str | None = Field(None, description="file: the log (required); socket: where it "
                                               "listens (default: in the run directory)")
    app: Literal["echo", "shell", "none"] = "none"
    console: bool | None = Field(None, description="a console port (CONSOLE_PORT); "
                                                   "default: port 0 only")

    @model_validator(mode="after")
    def _path(self) -> "ConsolePortSpec":
        if self.backend == "file" and not self.path:
            raise ValueError("path: a file backend needs the log file's path")
        if self.backend in ("pty", "none") and self.path is not None:
            raise ValueError(f"path: a {self.backend} backend has no path")
        return self


class ConsoleDeviceSpec(DeviceBase):
    type: Literal["console"]
    ring: Literal["split", "packed"] = "split"
    queue_size: int = 64
    multiport: bool | None = Field(None, description="VIRTIO_CONSOLE_F_MULTIPORT; default: on "
                                                     "with more than one port")
    max_ports: int | None = Field(None, ge=1, le=CONSOLE_MAX_PORTS,
                                  description="max_nr_ports; default: the number of ports")
    size: ConsoleSize = Field(default_factory=ConsoleSize)
    ports: list[ConsolePortSpec] = Field(
        default_factory=lambda: [ConsolePortSpec(app="shell")])
    features: FeatureSpec = Field(default_factory=FeatureSpec)
    faults: Faults = Field(default_factory=Faults)
    poll_us: int = Field(0, ge=0, le=1_000_000, description="unused by the console driver")
    backend: ExternalBackendSpec | None = Field(
        None, description="{vhost_user: ...}: the rings are served by a vhost-user console "
        "backend (one port; spawn writes it to the port's file)")

    @field_validator("queue_size")
    @classmethod
    def _queue_size(cls, v: int) -> int:
        if not 0 < v <= 32768:
            raise ValueError(f"expected 1 to 32768 (a power of two for a split ring), got {v}")
        return v

    @model_validator(mode="after")
    def _ports(self) -> "ConsoleDeviceSpec":
        _check_device(self)
        n = len(self.ports)
        if not 1 <= n <= CONSOLE_MAX_PORTS:
            raise ValueError(f"ports: expected 1 to {CONSOLE_MAX_PORTS} ports, got {n}")
        if self.max_ports is not None and self.max_ports < n:
            raise ValueError(f"max_ports: {self.max_ports} is fewer than the {n} ports")
        if self.multiport is None:
            self.multiport = n > 1 or (self.max_ports or 1) > 1
        elif not self.multiport and (n > 1 or (self.max_ports or 1) > 1):
            raise ValueError("multiport: more than one port needs multiport")
        seen: set[str] = set()
        for i, p in enumerate(self.ports):
            if p.name is None:
                p.name = "console" if i == 0 else f"port{i}"
            if p.name in seen:
                raise ValueError(f"ports.{i}.name: {p.name!r} names two ports")
            seen.add(p.name)
            if p.console and i and not self.multiport:
                raise ValueError(f"ports.{i}.console: only port 0 without multiport")
        if self.backend is not None:
            p0 = self.ports[0]
            if n > 1 or self.multiport:
                raise ValueError("backend: a vhost-user console has port 0 only (no "
                                 "multiport)")
            if self.backend.vhost_user.spawn and (p0.backend != "file" or p0.app != "none"):
                raise ValueError("ports.0: a spawned vhost-user console writes the port to a "
                                 "file: backend: file, path: LOG, app: none")
        return self

    def vhost_user(self) -> VhostUserSpec | None:
        return self.backend.vhost_user if self.backend is not None else None

    def feature_bits(self) -> tuple[list[int], list[int]]:
        return (_feature_list(self.features.offer, CON.FEATURE_NAMES, "features.offer"),
                _feature_list(self.features.withhold, CON.FEATURE_NAMES, "features.withhold"))


DeviceSpec = Annotated[BlkDeviceSpec | NetDeviceSpec | ConsoleDeviceSpec,
                       Field(discriminator="type")]


class WorkloadBase(Strict):
    # false: the workload is set up but waits for a scenario step to start it
    autostart: bool = True


class BlkVerifySpec(WorkloadBase):
    type: Literal["blk-verify"]
    device: str
    block_size: int = 4096
    in_flight: int = Field(16, ge=1, le=4096)
    write_pct: float = Field(50, ge=0, le=100)
    region: Size | None = None
    flush_every: int = Field(64, ge=0)
    ops: int | None = Field(None, ge=1)
    seed: int = 1


class BlkBenchSpec(WorkloadBase):
    type: Literal["blk-bench"]
    device: str
    op: Literal["read", "write", "mixed"] = "read"
    block_size: int = 4096
    in_flight: int = Field(64, ge=1, le=4096)
    pattern: Literal["random", "sequential"] = "random"
    region: Size | None = None
    ops: int | None = Field(None, ge=1)
    seed: int = 1


class NetEchoSpec(WorkloadBase):
    type: Literal["net-echo"]
    device: str


class NetPingSpec(WorkloadBase):
    type: Literal["net-ping"]
    device: str
    peer: str = Field(description="VM.DEVICE of the net-echo side")
    count: int | None = Field(None, ge=1)
    size: int = Field(64, ge=0, le=9000, description="payload bytes; the frame must fit the MTU")
    timeout_ms: int = Field(1000, ge=1)
    peer_wait_ms: int = Field(10_000, ge=0, description="how long the peer may take to answer "
                              "at all; requests before its first answer are probes, not losses")


class NetStreamSpec(WorkloadBase):
    type: Literal["net-stream"]
    device: str
    peer: str = Field(description="VM.DEVICE of the net-sink side")
    frames: int | None = Field(None, ge=1)
    flows: int = Field(1, ge=1, le=256)
    size: int = Field(256, ge=0, le=9000, description="payload bytes; the frame must fit the MTU")
    window: int = Field(128, ge=1, le=4096)
    csum_offload: bool = False


class NetSinkSpec(WorkloadBase):
    type: Literal["net-sink"]
    device: str
    expect: int | None = Field(None, ge=1)


class NetResponderSpec(WorkloadBase):
    type: Literal["net-responder"]
    device: str
    ip: str = Field(pattern=r"^\d{1,3}(\.\d{1,3}){3}$")


NET_WORKLOAD_TYPES = ("net-echo", "net-ping", "net-stream", "net-sink", "net-responder")

class ConsoleAppSpec(WorkloadBase):
    """A program on a console port (a port's `app:` declares one too, named DEV-PORT)."""
    type: Literal["console-app"]
    device: str
    port: str | int = Field(0, description="the port's name or number")
    app: Literal["echo", "shell"] = "shell"
    ops: int | None = Field(None, ge=1, description="finish after this many commands/echoes")


WorkloadSpec = Annotated[BlkVerifySpec | BlkBenchSpec | NetEchoSpec | NetPingSpec
                         | NetStreamSpec | NetSinkSpec | NetResponderSpec | ConsoleAppSpec,
                         Field(discriminator="type")]


class VMSpec(Strict):
    memory: Size = 64 * MiB
    memory_base: int = 0x4000_0000
    devices: dict[Annotated[str, Field(pattern=NAME_RE)], DeviceSpec] = Field(default_factory=dict)
    workloads: dict[Annotated[str, Field(pattern=NAME_RE)], WorkloadSpec] = \
        Field(default_factory=dict)

    @field_validator("memory")
    @classmethod
    def _memory(cls, v: int) -> int:
        if v < 1 * MiB or v > 16 << 30 or v % 4096:
            raise ValueError(f"expected 1M to 16G in whole pages, got {v}")
        return v

    @model_validator(mode="after")
    def _refs(self) -> "VMSpec":
        for wname, w in self.workloads.items():
            dev = self.devices.get(w.device)
            if dev is None:
                raise ValueError(f"workloads.{wname}.device: no device {w.device!r} in this VM "
                                 f"(devices: {', '.join(self.devices) or 'none'})")
            if w.type.startswith("blk") and dev.type != "blk":
                raise ValueError(f"workloads.{wname}.device: {w.device!r} is a {dev.type} "
                                 f"device; {w.type} needs a blk device")
            if w.type.startswith("net") and dev.type != "net":
                raise ValueError(f"workloads.{wname}.device: {w.device!r} is a {dev.type} "
                                 f"device; {w.type} needs a net device")
            if w.type in ("net-ping", "net-stream"):
                # the test header (20 bytes), and IPv4 + UDP with checksum offload
                l3 = w.size + 20 + (28 if getattr(w, "csum_offload", False) else 0)
                if l3 > dev.mtu:
                    raise ValueError(f"workloads.{wname}.size: {w.size} bytes make {l3}-byte "
                                     f"packets, more than {w.device!r}'s MTU of {dev.mtu}")
            writes = w.type == "blk-verify" or (w.type == "blk-bench" and w.op != "read")
            if writes and getattr(dev, "readonly", False):
                raise ValueError(f"workloads.{wname}.device: {w.device!r} is read-only and "
                                 f"this {w.type} workload writes")
        if len(self.devices) > 32:
            raise ValueError("devices: at most 32 devices per VM")
        return self

    @model_validator(mode="after")
    def _console_apps(self) -> "VMSpec":
        """A console port's `app:` becomes a console-app workload named DEV-PORT; every
        console-app names a port its console device has, and no port has two."""
        for dname, dev in self.devices.items():
            if dev.type != "console":
                continue
            for i, p in enumerate(dev.ports):
                if p.app == "none":
                    continue
                wname = re.sub(r"[^A-Za-z0-9_-]", "-", f"{dname}-{p.name}")[:32]
                if wname in self.workloads:
                    raise ValueError(f"devices.{dname}.ports.{i}.app: its workload would be "
                                     f"named {wname!r}, which a workload of this VM already is")
                self.workloads[wname] = ConsoleAppSpec(type="console-app", device=dname,
                                                       port=p.name, app=p.app)
        taken: dict[tuple[str, int], str] = {}
        for wname, w in self.workloads.items():
            if w.type != "console-app":
                continue
            dev = self.devices.get(w.device)
            if dev is None or dev.type != "console":
                kind = f"a {dev.type} device" if dev is not None else "not a device here"
                raise ValueError(f"workloads.{wname}.device: {w.device!r} is {kind}; "
                                 "console-app needs a console device")
            names = [p.name for p in dev.ports]
            if isinstance(w.port, int):
                if not 0 <= w.port < len(names):
                    raise ValueError(f"workloads.{wname}.port: {dev.type} device {w.device!r} "
                                     f"has ports 0 to {len(names) - 1}, not {w.port}")
                index = w.port
            elif w.port in names:
                index = names.index(w.port)
            else:
                raise ValueError(f"workloads.{wname}.port: {w.device!r} has no port "
                                 f"{w.port!r} (ports: {', '.join(names)})")
            other = taken.setdefault((w.device, index), wname)
            if other != wname:
                raise ValueError(f"workloads.{wname}.port: port {index} of {w.device!r} is "
                                 f"{other}'s already (a port has one program)")
        return self


class HostSpec(Strict):
    poll_us: int = Field(100, ge=0, le=1_000_000,
                         description="the host keeps polling rings this long after work")


class SwitchSpec(Strict):
    """A learning Ethernet switch in the host (no settings yet)."""


class Topology(Strict):
    name: str | None = None
    description: str | None = None
    duration: float | None = Field(None, gt=0)
    host: HostSpec = Field(default_factory=HostSpec)
    switches: dict[Annotated[str, Field(pattern=NAME_RE)], SwitchSpec] = \
        Field(default_factory=dict)
    vms: dict[Annotated[str, Field(pattern=NAME_RE)], VMSpec]

    @field_validator("vms")
    @classmethod
    def _vms(cls, v: dict) -> dict:
        if not v:
            raise ValueError("expected at least one VM")
        return v

    @model_validator(mode="after")
    def _wiring(self) -> "Topology":
        """Switches named by devices exist; a peer names a net device of some VM."""
        for vname, vm in self.vms.items():
            for dname, dev in vm.devices.items():
                sw = getattr(getattr(dev, "backend", None), "switch", None)
                if dev.type == "net" and sw is not None and sw not in self.switches:
                    raise ValueError(f"vms.{vname}.devices.{dname}.backend.switch: no switch "
                                     f"{sw!r} (switches: {', '.join(self.switches) or 'none'})")
            for wname, w in vm.workloads.items():
                peer = getattr(w, "peer", None)
                if peer is None:
                    continue
                pvm, _, pdev = peer.partition(".")
                target = self.vms.get(pvm, None)
                if target is None or target.devices.get(pdev) is None \
                        or target.devices[pdev].type != "net":
                    raise ValueError(f"vms.{vname}.workloads.{wname}.peer: expected VM.DEVICE "
                                     f"of a net device, got {peer!r}")
        return self

    @model_validator(mode="after")
    def _features(self) -> "Topology":
        for vname, vm in self.vms.items():
            for dname, dev in vm.devices.items():
                try:
                    dev.feature_bits()
                except ValueError as e:
                    raise ValueError(f"vms.{vname}.devices.{dname}.{e}") from None
        return self


_TAGS = frozenset({"blk", "net", "console", "blk-verify", "blk-bench", "console-app",
                   "net-echo", "net-ping", "net-stream", "net-sink", "net-responder"})


def _format_error(source: str, err: ValidationError) -> str:
    e = err.errors()[0]
    loc = [str(p) for p in e["loc"]]
    # Drop pydantic's union/discriminator tags from the path.
    loc = [p for p in loc if not p.startswith(("function-", "tagged-union"))]
    # A tag follows the name of a device or workload ("vda.blk.size"); a device may itself be
    # named like a tag ("console"), so only that position is dropped.
    loc = [p for i, p in enumerate(loc)
           if not (i >= 2 and loc[i - 2] in ("devices", "workloads") and p in _TAGS)]
    msg = e["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
        # Validators of a whole mapping name the key below it as "key.path: message".
        m = _REL_KEY_RE.match(msg)
        if m:
            loc = [*loc, *m.group(1).split(".")]
            msg = m.group(2)
    if e["type"] == "extra_forbidden":
        msg = "unknown key"
    elif e["type"] == "missing":
        msg = "required key is missing"
    elif e["type"] == "union_tag_invalid":
        msg = f"unknown type {e['input'].get('type')!r}" if isinstance(e["input"], dict) else msg
        if isinstance(e.get("ctx"), dict) and "expected_tags" in e["ctx"]:
            msg += f" (expected one of {e['ctx']['expected_tags']})"
    elif e["type"] == "union_tag_not_found":
        msg = "a 'type' key is required"
    elif "input" in e and e["type"] not in ("value_error",):
        msg += f" (got {e['input']!r})"
    where = ".".join(loc)
    more = len(err.errors()) - 1
    tail = f" [and {more} more problem{'s' if more > 1 else ''}]" if more else ""
    return f"{source}: {where}: {msg}{tail}" if where else f"{source}: {msg}{tail}"


def load_topology(data: Any, source: str) -> Topology:
    """Validate parsed data; raises TopologyError with one readable line."""
    if not isinstance(data, dict):
        raise TopologyError(f"{source}: expected a mapping with a 'vms' key at the top level")
    try:
        return Topology.model_validate(data)
    except ValidationError as e:
        raise TopologyError(_format_error(source, e)) from None


def load_topology_file(path: str | Path) -> Topology:
    p = Path(path)
    try:
        text = p.read_text()
    except FileNotFoundError:
        raise TopologyError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise TopologyError(f"{path}: is a directory, expected a topology file") from None
    except OSError as e:
        raise TopologyError(f"{path}: cannot read: {e.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise TopologyError(f"{path}: {where}not valid YAML: {problem}") from None
    return load_topology(data, str(path))
