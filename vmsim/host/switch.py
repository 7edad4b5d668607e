"""A learning Ethernet switch inside the host: it forwards frames between the net devices
(and TAP interfaces) attached to it, as a Linux bridge does: learn the source MAC's port, send
to the learnt port of the destination, flood broadcast, multicast and unknown destinations to
every other port."""

from collections.abc import Callable
from typing import Any

from vmsim.abi import net as N

Deliver = Callable[[bytes, Any], None]


class SwitchPort:
    """One attachment: `deliver(frame, meta)` hands a frame to whatever is attached."""

    def __init__(self, switch: "Switch", name: str, deliver: Deliver) -> None:
        self.switch = switch
        self.name = name
        self.deliver = deliver
        self.rx_frames = 0      # frames the switch delivered to this port
        self.tx_frames = 0      # frames this port sent into the switch
        self.paused = False     # a stalled port drops what it would send or get

    def send(self, frame: bytes, meta: Any = None) -> None:
        """A frame from the attached device into the switch."""
        self.tx_frames += 1
        self.switch.forward(self, frame, meta)


class Switch:
    def __init__(self, name: str) -> None:
        self.name = name
        self.ports: list[SwitchPort] = []
        self.mac_table: dict[bytes, SwitchPort] = {}
        self.forwarded = 0
        self.flooded = 0
        self.dropped = 0

    def attach(self, name: str, deliver: Deliver) -> SwitchPort:
        port = SwitchPort(self, name, deliver)
        self.ports.append(port)
        return port

    def detach(self, port: SwitchPort) -> None:
        if port in self.ports:
            self.ports.remove(port)
        for mac in [m for m, p in self.mac_table.items() if p is port]:
            del self.mac_table[mac]

    def forward(self, ingress: SwitchPort, frame: bytes, meta: Any) -> None:
        if len(frame) < N.ETH_HLEN or ingress.paused:
            self.dropped += 1
            return
        dst = frame[0:6]
        src = frame[6:12]
        if not N.is_multicast(src):
            self.mac_table[src] = ingress          # learn
        out = None if N.is_multicast(dst) else self.mac_table.get(dst)
        if out is not None:
            if out is not ingress:
                self._deliver(out, frame, meta)
                self.forwarded += 1
            return
        self.flooded += 1
        for port in self.ports:
            if port is not ingress:
                self._deliver(port, frame, meta)

    def _deliver(self, port: SwitchPort, frame: bytes, meta: Any) -> None:
        if port.paused:
            self.dropped += 1
            return
        port.rx_frames += 1
        port.deliver(frame, meta)

    def describe(self) -> dict[str, Any]:
        return {"ports": [p.name for p in self.ports],
                "mac_table": {N.format_mac(m): p.name for m, p in self.mac_table.items()},
                "forwarded": self.forwarded, "flooded": self.flooded, "dropped": self.dropped}
