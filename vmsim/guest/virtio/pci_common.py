"""The virtio-pci transport driver, what modern and legacy devices share
(drivers/virtio/virtio_pci_common.c): the probe that tries the modern interface and falls back
to the legacy one, finding the queues with their interrupts, and the interrupt handlers.

Interrupts, as Linux's vp_find_vqs chooses them:

1. MSI-X with a vector per queue plus one for configuration changes ("msix-per-queue"): the
   vector that fired says which queue (or the configuration) it is about; no register is read.
2. If the function cannot give that many vectors (its MSI-X table is smaller, or mapping an
   event to a vector fails): MSI-X with one vector for configuration changes and one shared
   by every queue ("msix-shared"); the handler looks at each queue.
3. Otherwise INTx ("intx"): one line for everything; the handler reads the ISR status (an
   exit, which also clears it) to learn whether the configuration changed and looks at every
   queue.

The choice is kept in `irq_mode` and shows in the run summary.
"""

import errno
import logging
from collections.abc import Callable, Sequence
from typing import Any

from vmsim.abi import pci as P
from vmsim.guest.memory import DmaMemory
from vmsim.guest.pci import PciDev
from vmsim.guest.platform import IrqController, Platform
from vmsim.guest.virtio.core import VirtioDevice, virtio_config_changed
from vmsim.guest.virtio.virtqueue import Virtqueue

log = logging.getLogger("vmsim.guest")

NO_VECTOR = P.VIRTIO_MSI_NO_VECTOR
VP_MSIX_CONFIG_VECTOR = 0
VP_MSIX_VQ_VECTOR = 1

IRQ_MODES = ("msix-per-queue", "msix-shared", "intx")


class PciProbeError(Exception):
    """The function is not a device this transport drives; `errno` as Linux's probe returns
    it (ENODEV: leave it to another driver, e.g. legacy after modern)."""

    def __init__(self, err: int, msg: str) -> None:
        super().__init__(msg)
        self.errno = err


class VqInfo:
    """struct virtio_pci_vq_info: a queue and the vector its interrupts use."""

    __slots__ = ("active", "msix_vector", "vq")

    def __init__(self, vq: Virtqueue, msix_vector: int) -> None:
        self.vq = vq
        self.msix_vector = msix_vector
        self.active = True          # on the handlers' list (off between a reset and enable)


class VirtioPciDevice:
    """struct virtio_pci_device: the part of the transport both interfaces share. A subclass
    (modern or legacy) provides the config ops and setup_vq / del_vq / config_vector."""

    transport_name = "pci"

    def __init__(self, platform: Platform, irqc: IrqController, dma: DmaMemory, pdev: PciDev,
                 queue_stats: Callable[[int], memoryview | None]) -> None:
        self.platform = platform
        self.irqc = irqc
        self.dma = dma
        self.pdev = pdev
        self.queue_stats = queue_stats
        self.vdev: VirtioDevice | None = None
        self.vqs: dict[int, VqInfo] = {}
        self.msix_enabled = False
        self.msix_vectors = 0
        self.msix_used_vectors = 0
        self.intx_enabled = False
        self.per_vq_vectors = False
        self.irq_mode = ""
        self._irqs: list[Any] = []          # lines with a handler of ours
        self.interrupts = 0
        self.config_interrupts = 0
        self.safety_polls = 0
        self.isr_reads = 0
        self.affinity: dict[int, frozenset[int] | None] = {}   # vector -> CPUs (a hint)

    # ---- what each interface provides ------------------------------------------------------------
    def setup_vq(self, vdev: VirtioDevice, index: int,
                 callback: Callable[[Virtqueue], None] | None, name: str, want: int,
                 msix_vec: int) -> Virtqueue:
        """Create queue `index` and tell the device about it; raises OSError."""
        raise NotImplementedError

    def del_vq(self, info: VqInfo) -> None:
        raise NotImplementedError

    def config_vector(self, vector: int) -> int:
        """Map configuration changes to `vector`; what the device reads back."""
        raise NotImplementedError

    def read_isr(self) -> int:
        raise NotImplementedError

    # ---- config ops both interfaces share --------------------------------------------------------
    def bus_name(self, vdev: VirtioDevice) -> str:
        return self.pdev.name

    def synchronize_cbs(self, vdev: VirtioDevice) -> None:
        self.vp_synchronize_vectors()

    def vp_synchronize_vectors(self) -> None:
        """Wait for a handler running now on the interrupt thread to return."""
        self.irqc.synchronize_irq()

    def set_vq_affinity(self, vq: Virtqueue, cpu_mask: frozenset[int] | None) -> int:
        """vp_set_vq_affinity: the affinity hint of the vector a queue's interrupts use (a
        per-queue vector, or the shared one); INTx ignores it. This guest takes every
        interrupt on its one interrupt thread, so the hint is kept, not applied."""
        if vq.callback is None:
            return -errno.EINVAL
        info = self.vqs.get(vq.index)
        if self.msix_enabled and info is not None and info.msix_vector != NO_VECTOR:
            self.affinity[info.msix_vector] = None if cpu_mask is None else frozenset(cpu_mask)
        return 0

    def get_vq_affinity(self, vdev: VirtioDevice, index: int) -> frozenset[int] | None:
        """vp_get_vq_affinity: the CPUs of a queue's own vector; None without one."""
        info = self.vqs.get(index)
        if not self.per_vq_vectors or info is None or info.msix_vector == NO_VECTOR:
            return None
        return self.affinity.get(info.msix_vector) or frozenset({0})

    def find_vqs(self, vdev: VirtioDevice, nvqs: int,
                 callbacks: Sequence[Callable[[Virtqueue], None] | None],
                 names: Sequence[str], sizes: Sequence[int] | None = None) -> list[Virtqueue]:
        """vp_find_vqs: MSI-X with a vector per queue, then MSI-X with a shared queue vector,
        then INTx. Raises OSError when none works."""
        err = 0
        for mode, use_msix, per_vq in (("msix-per-queue", True, True),
                                       ("msix-shared", True, False),
                                       ("intx", False, False)):
            if not use_msix and not self.pdev.irq:
                break        # "Is there an interrupt? If not give up."
            err = self._try_find_vqs(vdev, nvqs, callbacks, names, sizes, use_msix, per_vq)
            if not err:
                self.irq_mode = mode
                return vdev.vqs
            log.info("%s: %s interrupts unavailable (%s)", vdev.name, mode,
                     errno.errorcode.get(-err, err))
        raise OSError(-err or errno.ENODEV, f"{vdev.name}: no usable interrupt")

    def _try_find_vqs(self, vdev: VirtioDevice, nvqs: int,
                      callbacks: Sequence[Callable[[Virtqueue], None] | None],
                      names: Sequence[str], sizes: Sequence[int] | None,
                      use_msix: bool, per_vq: bool) -> int:
        """vp_try_to_find_vqs: 0, or -errno with everything undone."""
        if not use_msix:
            err = self._request_intx(vdev)
        else:
            nvectors = 1 + sum(1 for cb in callbacks[:nvqs] if cb is not None) if per_vq else 2
            err = self._request_msix_vectors(vdev, nvectors, per_vq)
        if err:
            self.del_vqs(vdev)
            return err
        self.per_vq_vectors = per_vq
        allocated = self.msix_used_vectors
        for i in range(nvqs):
            cb = callbacks[i]
            if cb is None or not self.msix_enabled:
                vec = NO_VECTOR
            elif per_vq:
                vec = allocated
                allocated += 1
            else:
                vec = VP_MSIX_VQ_VECTOR
            try:
                vq = self.setup_vq(vdev, i, cb, names[i], sizes[i] if sizes else 0, vec)
            except OSError as e:
                self.del_vqs(vdev)
                return -(e.errno or errno.EIO)
            self.vqs[i] = VqInfo(vq, vec)
            vdev.vqs.append(vq)
            if not per_vq or vec == NO_VECTOR:
                continue
            err = self._request_irq(self.pdev.irq_vector(vec), self._vq_handler(vq),
                                    f"{vdev.name}-{names[i]}", self._poll_hook([vq]), vec)
            if err:
                self.del_vqs(vdev)
                return err
        return 0

    def _request_msix_vectors(self, vdev: VirtioDevice, nvectors: int, per_vq: bool) -> int:
        """vp_request_msix_vectors: enable MSI-X with exactly `nvectors` vectors; the first
        for configuration changes, the second shared by the queues unless `per_vq`."""
        self.msix_vectors = nvectors
        err = self.pdev.enable_msix_exact(nvectors)
        if err:
            return err
        self.msix_enabled = True
        v = self.msix_used_vectors
        err = self._request_irq(self.pdev.irq_vector(v), self._vp_config_changed,
                                f"{vdev.name}-config", None, v)
        if err:
            return err
        self.msix_used_vectors += 1
        if self.config_vector(v) == NO_VECTOR:
            return -errno.EBUSY     # the device could not map it
        if not per_vq:
            v = self.msix_used_vectors
            err = self._request_irq(self.pdev.irq_vector(v), self._vp_vring_interrupt,
                                    f"{vdev.name}-virtqueues", self._poll_hook(None), v)
            if err:
                return err
            self.msix_used_vectors += 1
        return 0

    def _request_intx(self, vdev: VirtioDevice) -> int:
        err = self._request_irq(self.pdev.irq, self._vp_interrupt, vdev.name,
                                self._poll_hook(None), None)
        if not err:
            self.intx_enabled = True
        return err

    def _request_irq(self, line: Any, handler: Callable[[Any], bool], name: str,
                     poll_hook: Callable[[], None] | None, vector: int | None) -> int:
        """request_irq, and the MSI-X entry unmasked (irq_startup)."""
        if line is None:
            return -errno.EINVAL
        try:
            self.irqc.request_irq(line, handler, name, poll_hook)
        except ValueError as e:
            log.info("request_irq(%r): %s", line, e)
            return -errno.EINVAL
        self._irqs.append(line)
        if vector is not None:
            self.pdev.msix_unmask_vector(vector)
        return 0

    def _free_irq(self, line: Any, vector: int | None) -> None:
        """free_irq, and the MSI-X entry masked (irq_shutdown)."""
        if line in self._irqs:
            if vector is not None:
                self.pdev.msix_mask_vector(vector)
            self.irqc.free_irq(line)
            self._irqs.remove(line)

    def _free_vectors(self) -> None:
        """vp_free_vectors."""
        if self.intx_enabled:
            self._free_irq(self.pdev.irq, None)
            self.intx_enabled = False
        for v in range(self.msix_used_vectors):
            self._free_irq(self.pdev.irq_vector(v), v)
        if self.msix_enabled:
            self.config_vector(NO_VECTOR)     # "Disable the vector used for configuration"
            self.pdev.disable_msix()
            self.msix_enabled = False
        self.msix_vectors = 0
        self.msix_used_vectors = 0
        self.affinity = {}

    def del_vqs(self, vdev: VirtioDevice) -> None:
        """vp_del_vqs: each queue's vector freed and the queue deleted, then the vectors."""
        infos = [self.vqs[vq.index] for vq in vdev.vqs if vq.index in self.vqs]
        # Off the tables the handlers read first, and no handler still using them.
        vdev.vqs = []
        self.vqs = {}
        self.irqc.synchronize_irq()
        for info in infos:
            if self.per_vq_vectors and info.msix_vector != NO_VECTOR:
                self._free_irq(self.pdev.irq_vector(info.msix_vector), info.msix_vector)
            info.vq.publish_stats()
            self.del_vq(info)
        self.per_vq_vectors = False
        self._free_vectors()

    # ---- interrupt handlers (the interrupt thread runs these) -----------------------------------
    def _vp_config_changed(self, irq: Any) -> bool:
        self.interrupts += 1
        self.config_interrupts += 1
        if self.vdev is not None:
            virtio_config_changed(self.vdev)
        return True

    def _vp_vring_interrupt(self, irq: Any) -> bool:
        """Every queue with a callback: the shared queue vector, or INTx's queue bit."""
        self.interrupts += 1
        return self._vring_all()

    def _vring_all(self) -> bool:
        handled = False
        for info in list(self.vqs.values()):
            if info.active and info.vq.callback is not None:
                handled |= info.vq.vring_interrupt()
        return handled

    def _vq_handler(self, vq: Virtqueue) -> Callable[[Any], bool]:
        """A queue's own vector: vring_interrupt on that queue alone."""
        def handler(irq: Any) -> bool:
            self.interrupts += 1
            info = self.vqs.get(vq.index)
            if info is None or not info.active:
                return False
            return vq.vring_interrupt()
        return handler

    def _vp_interrupt(self, irq: Any) -> bool:
        """vp_interrupt (INTx): reading the ISR clears it, so its value is all there is."""
        self.interrupts += 1
        isr = self.read_isr()
        self.isr_reads += 1
        if not isr:
            return False        # not us: the line is shared in principle
        handled = False
        if isr & P.VIRTIO_PCI_ISR_CONFIG:
            self.config_interrupts += 1
            if self.vdev is not None:
                virtio_config_changed(self.vdev)
            handled = True
        return self._vring_all() or handled

    def _poll_hook(self, vqs: list[Virtqueue] | None) -> Callable[[], None]:
        """The interrupt thread's safety net for a line: a queue whose driver waits for an
        interrupt but whose used ring moved lost a wake-up (counted, expected 0)."""
        def poll() -> None:
            targets = vqs if vqs is not None else [i.vq for i in list(self.vqs.values())
                                                   if i.active]
            for vq in targets:
                if vq.callback is not None and vq.callbacks_enabled() and vq.more_used():
                    self.safety_polls += 1
                    vq.vring_interrupt()
        return poll


def virtio_pci_probe(platform: Platform, irqc: IrqController, dma: DmaMemory, pdev: PciDev,
                     name: str, dev_stats: memoryview | None,
                     queue_stats: Callable[[int], memoryview | None],
                     force_legacy: bool = False) -> VirtioPciDevice:
    """virtio_pci_probe: enable the function, then the modern interface if the device has
    one, else the legacy one (force_legacy: the other way round); bus mastering on. Returns
    the transport, whose `vdev` is ready to register on the virtio bus. Raises PciProbeError."""
    from vmsim.guest.virtio.pci_legacy import VirtioPciLegacy
    from vmsim.guest.virtio.pci_modern import VirtioPciModern

    if pdev.vendor != P.PCI_VENDOR_ID_REDHAT_QUMRANET:
        raise PciProbeError(errno.ENODEV, f"vendor 0x{pdev.vendor:04x} is not virtio's")
    pdev.enable_device()
    order = (VirtioPciLegacy, VirtioPciModern) if force_legacy else (VirtioPciModern,
                                                                     VirtioPciLegacy)
    err: PciProbeError | None = None
    for cls in order:
        vp = cls(platform, irqc, dma, pdev, queue_stats)
        try:
            vp.probe(name, dev_stats)
        except PciProbeError as e:
            err = e
            if e.errno == errno.ENODEV:
                continue
            break
        pdev.set_master()
        return vp
    pdev.disable_device()
    assert err is not None
    raise err
