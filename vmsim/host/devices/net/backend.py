"""Where a virtio-net device's frames go: a port of a host switch, or a TAP interface of the
real host kernel (Linux tun/tap with IFF_TAP | IFF_NO_PI | IFF_VNET_HDR)."""

import errno
import fcntl
import os
import struct
from collections.abc import Callable
from typing import Any

from vmsim.abi import net as N
from vmsim.host.switch import Switch, SwitchPort

# Frames carry this with them between devices: the virtio-net header's checksum request.
# (flags, csum_start, csum_offset) or None.
Meta = tuple[int, int, int] | None
Receive = Callable[[bytes, Meta], None]


class NetBackend:
    description = ""

    def attach(self, receive: Receive) -> None:
        """Frames from the backend go to `receive(frame, meta)`."""
        raise NotImplementedError

    def send(self, frame: bytes, meta: Meta) -> None:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        return {}

    def close(self) -> None:
        pass


class SwitchBackend(NetBackend):
    def __init__(self, switch: Switch, port_name: str) -> None:
        self.switch = switch
        self.port_name = port_name
        self.port: SwitchPort | None = None
        self.description = f"switch {switch.name}"

    def attach(self, receive: Receive) -> None:
        self.port = self.switch.attach(self.port_name, receive)

    def send(self, frame: bytes, meta: Meta) -> None:
        if self.port is not None:
            self.port.send(frame, meta)

    def describe(self) -> dict[str, Any]:
        return {"switch": self.switch.name, "port": self.port_name}

    def close(self) -> None:
        if self.port is not None:
            self.switch.detach(self.port)
            self.port = None


TUNSETIFF = 0x400454CA
TUNSETVNETHDRSZ = 0x400454D8
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000


class TapError(OSError):
    """The TAP interface could not be created (tun/tap not permitted here, or no /dev/net/tun)."""


class TapBackend(NetBackend):
    """A TAP interface: frames written to it reach the host kernel's network stack (with a
    12-byte virtio-net header in front, IFF_VNET_HDR), frames the kernel sends come back."""

    def __init__(self, ifname: str, add_reader: Callable[[int, Callable[[int], None]], None],
                 remove_reader: Callable[[int], None]) -> None:
        try:
            fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as e:
            raise TapError(e.errno, f"cannot open /dev/net/tun: {e.strerror}") from None
        try:
            ifr = struct.pack("16sH", ifname.encode()[:15], IFF_TAP | IFF_NO_PI | IFF_VNET_HDR)
            ifr = fcntl.ioctl(fd, TUNSETIFF, ifr)
            fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", N.HDR_SIZE))
        except OSError as e:
            os.close(fd)
            raise TapError(e.errno, f"cannot create TAP interface {ifname}: {e.strerror}") \
                from None
        self.fd = fd
        self.ifname = ifr[:16].rstrip(b"\0").decode()
        self._add_reader = add_reader
        self._remove_reader = remove_reader
        self._receive: Receive | None = None
        self.description = f"tap {self.ifname}"
        self.rx = self.tx = self.errors = 0

    def attach(self, receive: Receive) -> None:
        self._receive = receive
        self._add_reader(self.fd, self._on_readable)

    def _on_readable(self, _fd: int) -> None:
        for _ in range(64):                  # a bounded batch per wake-up
            try:
                data = os.read(self.fd, 65536 + N.HDR_SIZE)
            except BlockingIOError:
                return
            except OSError:
                self.errors += 1
                return
            if len(data) <= N.HDR_SIZE:
                continue
            flags, _gso, _hl, _gs, cstart, coff, _nb = N.HDR.unpack_from(data)
            meta = (flags, cstart, coff) if flags & N.VIRTIO_NET_HDR_F_NEEDS_CSUM else None
            self.rx += 1
            if self._receive is not None:
                self._receive(data[N.HDR_SIZE:], meta)

    def send(self, frame: bytes, meta: Meta) -> None:
        if meta is not None:
            hdr = N.HDR.pack(meta[0], 0, 0, 0, meta[1], meta[2], 0)
        else:
            hdr = bytes(N.HDR_SIZE)
        try:
            os.write(self.fd, hdr + frame)
            self.tx += 1
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EIO):   # EIO: the interface is down
                raise
            self.errors += 1

    def describe(self) -> dict[str, Any]:
        return {"tap": self.ifname, "rx": self.rx, "tx": self.tx, "errors": self.errors}

    def close(self) -> None:
        if self.fd >= 0:
            self._remove_reader(self.fd)
            os.close(self.fd)
            self.fd = -1
