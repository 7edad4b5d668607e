"""A real Linux guest for the vhost-user interop tests: Debian's kernel under
qemu-system-x86_64 TCG, an initramfs built here from busybox-static, the kernel's own virtio
modules and an init script the test writes, its RAM a shared memfd a vhost-user backend maps.
"""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

QEMU = shutil.which("qemu-system-x86_64")
BUSYBOX = shutil.which("busybox")

# Debian builds virtio as modules; paths under /lib/modules/VERSION/kernel, loaded in order.
VIRTIO_MODULES = ("drivers/virtio/virtio_ring.ko", "drivers/virtio/virtio.ko",
                  "drivers/virtio/virtio_pci_legacy_dev.ko",
                  "drivers/virtio/virtio_pci_modern_dev.ko", "drivers/virtio/virtio_pci.ko")
BLK_MODULES = (*VIRTIO_MODULES, "drivers/block/virtio_blk.ko")
NET_MODULES = (*VIRTIO_MODULES, "net/core/failover.ko", "drivers/net/net_failover.ko",
               "drivers/net/virtio_net.ko")


def kernel() -> str | None:
    ks = sorted(Path("/boot").glob("vmlinuz-*"))
    return str(ks[-1]) if ks else None


def modules_dir(k: str | None, modules: tuple[str, ...]) -> Path | None:
    if k is None:
        return None
    d = Path("/lib/modules") / Path(k).name.removeprefix("vmlinuz-") / "kernel"
    return d if all((d / m).is_file() for m in modules) else None


def _static(exe: str | None) -> bool:
    """A statically linked executable (no ELF interpreter): busybox-static's, not busybox's."""
    if exe is None:
        return False
    with open(exe, "rb") as f:
        head = f.read(4096)
    return b"/ld-linux" not in head and b"ld-musl" not in head


def available(modules: tuple[str, ...]) -> bool:
    k = kernel()
    return bool(QEMU and _static(BUSYBOX) and k and os.access(k, os.R_OK)
                and modules_dir(k, modules) is not None)


def needs_qemu(modules: tuple[str, ...]) -> pytest.MarkDecorator:
    return pytest.mark.skipif(
        not available(modules),
        reason="needs qemu-system-x86 (qemu-system-x86_64), linux-image-amd64 "
               "(/boot/vmlinuz-*, its virtio modules) and busybox-static: .ci/run installs "
               "them with apt-get")


def cpio_newc(entries: list[tuple[str, int, bytes]]) -> bytes:
    """A cpio archive in the newc format the kernel unpacks as its initramfs."""
    out = bytearray()
    ino = 1
    for name, mode, data in [*entries, ("TRAILER!!!", 0, b"")]:
        nb = name.encode() + b"\0"
        hdr = "070701" + "".join(f"{v:08x}" for v in (
            ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(nb), 0))
        out += hdr.encode() + nb
        out += bytes(-len(out) % 4)
        out += data
        out += bytes(-len(out) % 4)
        ino += 1
    return bytes(out)


# What every init script starts with: busybox's applets, the pseudo file systems, the modules
# (numbered in the archive: the shell's glob keeps the load order).
INIT_HEAD = """#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
echo "VMSIM: booted"
for m in /modules/*.ko; do insmod $m; done
"""


def initramfs(tmp: Path, init_body: str, modules: tuple[str, ...]) -> Path:
    """An initramfs whose /init is INIT_HEAD then `init_body`."""
    entries = [("bin", 0o40755, b""), ("dev", 0o40755, b""), ("proc", 0o40755, b""),
               ("sys", 0o40755, b""), ("tmp", 0o41777, b""), ("modules", 0o40755, b""),
               ("bin/busybox", 0o100755, Path(BUSYBOX).read_bytes()),
               ("init", 0o100755, (INIT_HEAD + init_body).encode())]
    mods = modules_dir(kernel(), modules)
    for k, m in enumerate(modules):
        entries.append((f"modules/{k:02d}-{Path(m).name}", 0o100644, (mods / m).read_bytes()))
    p = tmp / "initramfs.cpio"
    p.write_bytes(cpio_newc(entries))
    return p


def qemu_command(initrd: Path, console: Path, devices: list[str], mem: str = "256M",
                 smp: int = 1) -> list[str]:
    """QEMU TCG booting the kernel on `initrd`, its serial console to `console`, RAM a
    shared memfd (what a vhost-user backend maps), then the `devices` arguments."""
    return [QEMU, "-machine", "q35", "-accel", "tcg", "-m", mem, "-smp", str(smp),
            "-nographic", "-no-reboot", "-nodefaults", "-serial", f"file:{console}",
            "-kernel", kernel(), "-initrd", str(initrd),
            "-append", "console=ttyS0 quiet panic=-1 rdinit=/init",
            "-object", f"memory-backend-memfd,id=mem,size={mem},share=on",
            "-numa", "node,memdev=mem", *devices]


def lines(console_text: str) -> dict[str, str]:
    """The guest's `VMSIM: key value` lines."""
    out = {}
    for line in console_text.splitlines():
        if line.startswith("VMSIM: "):
            key, _, val = line[7:].partition(" ")
            out[key] = val.strip()
    return out


def run_qemu(cmd: list[str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          timeout=timeout)
