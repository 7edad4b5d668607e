"""The guest's channel subsystem driver (Linux drivers/s390/cio: the I/O instructions of
ioasm.h, cio.c's start and interrupt paths, device.c's SENSE ID, airq.c's adapter interrupts).

The I/O instructions trap to the host (Platform.css): STORE SUBCHANNEL and MODIFY SUBCHANNEL
move a SCHIB, START SUBCHANNEL hands the host an ORB pointing at a channel program, TEST
SUBCHANNEL fetches the status as an IRB, all through guest memory in s390's big-endian layouts
(vmsim.abi.ccw). Each answers a condition code; a host answer that is a string is a program
exception (a bad operand), which this driver reports as -EIO.

Each subchannel has an I/O interrupt line ("io:<bus id>"); its handler fetches the status with
TSCH, completes the channel program that was waiting for it, and lets the device driver look
at its indicators. Adapter interrupts ("airq:<isc>") carry no subchannel: their handlers run
for every registered adapter whose summary indicator byte is set (do_airq_interrupt).

Waiting for a channel program. The channel program ends inside the host's SSCH; the thread
that started it waits for the I/O interrupt to deliver the status. Two cases need more:
- on the interrupt thread itself (a config-change handler reading config space) nobody else
  can take the interrupt, so the thread fetches the status with TSCH itself (polling, as
  Linux's cio does where interrupts are off);
- a waiter whose interrupt thread is busy (blocked on the same device's I/O lock behind it)
  fetches the status itself after POLL_AFTER_S.
Whoever fetches a status completes the waiting request; indicators are looked at only by the
interrupt handler, which runs for every I/O interrupt even if a poller took its status first
(the interrupt stays signalled on its eventfd), so no indicator is left unread.
"""

import errno
import logging
import threading
import time
from collections.abc import Callable
from typing import Any, NamedTuple

from vmsim.abi import ccw as C
from vmsim.guest.memory import DmaMemory, OutOfGuestMemory
from vmsim.guest.platform import IrqController, Platform

log = logging.getLogger("vmsim.guest")

DMA_LIMIT = 1 << 31            # CCWs address 31 bits: channel programs and their data below
DEFAULT_ISC = 3                # IO_SCH_ISC: the ISC Linux gives I/O subchannels
IO_TIMEOUT_S = 5.0
POLL_AFTER_S = 0.05
MAX_SUBCHANNELS = C.MAX_SCHID + 1

EIO = -errno.EIO
EBUSY = -errno.EBUSY
ENODEV = -errno.ENODEV
EOPNOTSUPP = -errno.EOPNOTSUPP
ETIMEDOUT = -errno.ETIMEDOUT


class ProgramException(Exception):
    """The host refused an I/O instruction's operand (a program interruption on s390)."""


class CssError(Exception):
    """The channel subsystem cannot be used (no guest memory below 2 GiB for channel I/O)."""


# ---- interrupt context ---------------------------------------------------------------------------
_context = threading.local()


def in_interrupt() -> bool:
    """Whether this thread is running an interrupt handler of the channel subsystem."""
    return getattr(_context, "depth", 0) > 0


def _irq_entry(fn: Callable[..., Any]) -> Callable[..., Any]:
    def entered(*args: Any) -> Any:
        _context.depth = getattr(_context, "depth", 0) + 1
        try:
            return fn(*args)
        finally:
            _context.depth -= 1
    return entered


def dma_alloc_low(dma: DmaMemory, size: int, align: int = 8) -> tuple[int, memoryview]:
    """ccw_device_dma_zalloc: zeroed memory a CCW can address (below 2 GiB)."""
    gpa, view = dma.alloc(size, align)
    if gpa + size > DMA_LIMIT:
        view.release()
        dma.free(gpa)
        raise OutOfGuestMemory(f"no guest memory below 2 GiB for {size} bytes of channel I/O")
    return gpa, view


# ---- status --------------------------------------------------------------------------------------
class Scsw(NamedTuple):
    flags: int
    ctrl: int
    cpa: int
    dstat: int
    cstat: int
    count: int

    @property
    def cc(self) -> int:
        """The deferred condition code."""
        return (self.flags & C.SCSW_FLAGS_CC) >> C.SCSW_FLAGS_CC_SHIFT

    @property
    def fctl(self) -> int:
        return self.ctrl & C.SCSW_CTRL_FCTL

    @property
    def actl(self) -> int:
        return self.ctrl & C.SCSW_CTRL_ACTL

    @property
    def stctl(self) -> int:
        return self.ctrl & C.SCSW_CTRL_STCTL


class Irb(NamedTuple):
    scsw: Scsw
    esw: bytes
    ecw: bytes

    @classmethod
    def parse(cls, data: bytes) -> "Irb":
        scsw = Scsw(*C.SCSW.unpack_from(data, 0))
        esw = bytes(data[C.SCSW.size:C.SCSW.size + C.ESW_SIZE])
        ecw = bytes(data[C.SCSW.size + C.ESW_SIZE:C.IRB_SIZE])
        return cls(scsw, esw, ecw)

    @property
    def sense_valid(self) -> bool:
        return bool(self.scsw.flags & C.SCSW_FLAGS_ECTL)


def irb_error(irb: Irb) -> int:
    """virtio_ccw's irb_is_error and its mapping: a command reject is -EOPNOTSUPP, any other
    check -EIO, clean channel end / device end 0."""
    s = irb.scsw
    if s.cstat or s.dstat & ~(C.DEV_STAT_CHN_END | C.DEV_STAT_DEV_END) or s.cc:
        if s.dstat & C.DEV_STAT_UNIT_CHECK and irb.sense_valid \
                and irb.ecw[0] & C.SNS0_CMD_REJECT:
            return EOPNOTSUPP
        return EIO
    return 0


class Schib:
    """The subchannel information block: PMCW, SCSW, measurement fields."""

    __slots__ = ("chars", "chpids", "devno", "flags", "intparm", "lpm", "lpum", "mba", "mbi",
                 "pam", "pim", "pnom", "pom", "scsw")

    def __init__(self, data: bytes) -> None:
        (self.intparm, self.flags, self.devno, self.lpm, self.pnom, self.lpum, self.pim,
         self.mbi, self.pom, self.pam, self.chpids, self.chars) = C.PMCW.unpack_from(data, 0)
        self.scsw = Scsw(*C.SCSW.unpack_from(data, C.PMCW.size))
        self.mba, _ = C.SCHIB_TAIL.unpack_from(data, C.PMCW.size + C.SCSW.size)

    def pack(self) -> bytes:
        return (C.PMCW.pack(self.intparm, self.flags, self.devno, self.lpm, self.pnom,
                            self.lpum, self.pim, self.mbi, self.pom, self.pam, self.chpids,
                            self.chars)
                + C.SCSW.pack(*self.scsw) + C.SCHIB_TAIL.pack(self.mba, bytes(4)))

    @property
    def dnv(self) -> bool:
        return bool(self.flags & C.PMCW_FLAGS_DNV)

    @property
    def enabled(self) -> bool:
        return bool(self.flags & C.PMCW_FLAGS_ENA)

    @property
    def isc(self) -> int:
        return (self.flags & C.PMCW_FLAGS_ISC) >> C.PMCW_FLAGS_ISC_SHIFT


# ---- adapter interrupts --------------------------------------------------------------------------
class Airq:
    """struct airq_struct: a handler run on an adapter interrupt of `isc` when the byte at
    `lsi_gpa` (the local summary indicator) has a bit of `lsi_mask` set."""

    def __init__(self, handler: Callable[[], None], isc: int, lsi: memoryview,
                 lsi_mask: int = 0xFF) -> None:
        self.handler = handler
        self.isc = isc
        self.lsi = lsi
        self.lsi_mask = lsi_mask


class AirqIv:
    """An interrupt vector (airq_iv_create with AIRQ_IV_ALLOC | AIRQ_IV_PTR): `bits`
    indicator bits in guest memory, numbered from the left as the architecture numbers them,
    an allocator for runs of them, and a pointer per bit.

    The driver reads and clears the vector a 64-bit word at a time with native loads and
    stores; `word_users[w]` lists (native mask, bit, pointer) for the allocated bits of word w,
    so a scan touches only words and bits in use."""

    def __init__(self, dma: DmaMemory, bits: int) -> None:
        if bits <= 0 or bits % 64:
            raise ValueError("an interrupt vector is a whole number of 64-bit words")
        self.dma = dma
        self.bits = bits
        self.gpa, self._view = dma_alloc_low(dma, bits // 8, 64)
        self.words = self._view.cast("Q")
        self.used = [False] * bits
        self.ptrs: list[Any] = [None] * bits
        self.word_users: list[list[tuple[int, int, Any]]] = [[] for _ in range(bits // 64)]

    @staticmethod
    def native_mask(bit: int) -> int:
        """Bit `bit` (from the left: 0x80 >> bit % 8 of byte bit // 8) in the value of a
        native little-endian load of its 64-bit word."""
        r = bit % 64
        return 1 << (r // 8 * 8 + 7 - r % 8)

    def alloc(self, n: int) -> int:
        """airq_iv_alloc: the first of `n` free contiguous bits, or -1."""
        run = 0
        for i, u in enumerate(self.used):
            run = 0 if u else run + 1
            if run == n:
                first = i - n + 1
                for b in range(first, first + n):
                    self.used[b] = True
                return first
        return -1

    def free(self, bit: int, n: int = 1) -> None:
        for b in range(bit, bit + n):
            self.set_ptr(b, None)
            self.used[b] = False

    def set_ptr(self, bit: int, ptr: Any) -> None:
        self.ptrs[bit] = ptr
        users = [u for u in self.word_users[bit // 64] if u[1] != bit]
        if ptr is not None:
            users.append((self.native_mask(bit), bit, ptr))
        self.word_users[bit // 64] = users

    def release(self) -> None:
        self.words.release()
        self._view.release()
        self.dma.free(self.gpa)


# ---- the channel subsystem -----------------------------------------------------------------------
class ChannelSubsystem:
    """The I/O instructions, the subchannels found by STSCH, adapter interrupt dispatch."""

    def __init__(self, platform: Platform, irqc: IrqController, dma: DmaMemory,
                 desc: dict[str, Any] | None = None) -> None:
        self.platform = platform
        self.irqc = irqc
        self.dma = dma
        desc = desc or {}
        # what firmware tells of the machine: names and interrupt lines of the subchannels
        self.nodes = {int(s["schid"]): s for s in desc.get("subchannels", [])}
        self.adapter_lines = {int(a["isc"]): a["irq"] for a in desc.get("adapter_irqs", [])}
        self._airqs: dict[int, list[Airq]] = {}
        self._airq_lock = threading.Lock()
        self.n_adapter_interrupts = 0
        self.drvdata: dict[str, Any] = {}      # per-driver state (virtio_ccw's airq areas)
        self._scratch: memoryview | None = None  # a SCHIB for the scan
        self._scratch_gpa = 0
        self._scratch_lock = threading.Lock()

    # ---- the instructions (ioasm.h) --------------------------------------------------------------
    def _insn(self, *args: Any) -> int:
        cc = self.platform.css(*args)
        if isinstance(cc, int) and 0 <= cc <= 3:
            return cc
        raise ProgramException(f"{args[0]} 0x{args[1]:x}: {cc}")

    def stsch(self, schid: int, gpa: int) -> int:
        return self._insn("stsch", schid, gpa)

    def msch(self, schid: int, gpa: int) -> int:
        return self._insn("msch", schid, gpa)

    def ssch(self, schid: int, gpa: int) -> int:
        return self._insn("ssch", schid, gpa)

    def tsch(self, schid: int, gpa: int) -> int:
        return self._insn("tsch", schid, gpa)

    def csch(self, schid: int) -> int:
        return self._insn("csch", schid)

    # ---- discovery -------------------------------------------------------------------------------
    def scan(self) -> list["Subchannel"]:
        """css_scan: STORE SUBCHANNEL from subchannel 0 on. vmsim numbers subchannels from 0
        without gaps, so the scan ends at the first one that is not operational (cc 3)
        instead of walking all 65,536 as Linux does."""
        found: list[Subchannel] = []
        try:
            if self._scratch is None:
                self._scratch_gpa, self._scratch = dma_alloc_low(self.dma, C.SCHIB_SIZE, 8)
            for sch_no in range(MAX_SUBCHANNELS):
                schid = C.schid_word(sch_no)
                with self._scratch_lock:
                    cc = self.stsch(schid, self._scratch_gpa)
                    schib = Schib(bytes(self._scratch))
                if cc == 3:
                    break
                if not schib.dnv or schib.chars & C.PMCW_CHARS_ST:
                    continue          # no device, or not an I/O subchannel
                node = self.nodes.get(schid, {})
                bus = C.bus_id(schib.devno)
                found.append(Subchannel(self, schid, schib.devno,
                                        node.get("irq", f"io:{bus}"), node.get("name", bus)))
        except OutOfGuestMemory as e:
            for sch in found:
                sch.close()
            raise CssError(str(e)) from None
        except ProgramException as e:
            raise CssError(f"STORE SUBCHANNEL: {e}") from None
        return found

    # ---- adapter interrupts (airq.c) -------------------------------------------------------------
    def register_adapter_interrupt(self, airq: Airq) -> int:
        line = self.adapter_lines.get(airq.isc)
        if line is None:
            return -errno.EINVAL
        with self._airq_lock:
            handlers = self._airqs.setdefault(airq.isc, [])
            if not handlers:
                try:
                    self.irqc.request_irq(line, _irq_entry(self._adapter_handler(airq.isc)),
                                          f"airq-{airq.isc}")
                except ValueError:
                    return -errno.EBUSY
            handlers.append(airq)
        return 0

    def unregister_adapter_interrupt(self, airq: Airq) -> None:
        with self._airq_lock:
            handlers = self._airqs.get(airq.isc, [])
            if airq in handlers:
                handlers.remove(airq)
            if not handlers and airq.isc in self.adapter_lines:
                self.irqc.free_irq(self.adapter_lines[airq.isc])
                self._airqs.pop(airq.isc, None)

    def _adapter_handler(self, isc: int) -> Callable[[Any], bool]:
        def do_airq_interrupt(_line: Any) -> bool:
            """Every adapter of the ISC whose summary indicator is set."""
            self.n_adapter_interrupts += 1
            handled = False
            for airq in list(self._airqs.get(isc, ())):
                if airq.lsi[0] & airq.lsi_mask:
                    airq.handler()
                    handled = True
            return handled
        return do_airq_interrupt

    def close(self) -> None:
        with self._airq_lock:
            for isc in list(self._airqs):
                if isc in self.adapter_lines:
                    self.irqc.free_irq(self.adapter_lines[isc])
            self._airqs.clear()
        if self._scratch is not None:
            self._scratch.release()
            self.dma.free(self._scratch_gpa)
            self._scratch = None


class Subchannel:
    """An I/O subchannel and its device as the driver sees them (struct subchannel and
    struct ccw_device together): enabling, starting channel programs, waiting for them, the
    I/O interrupt."""

    # offsets in the subchannel's I/O area
    ORB_OFF, IRB_OFF, SCHIB_OFF, CCW_OFF, DATA_OFF, AREA = 0, 32, 128, 184, 192, 448

    def __init__(self, css: ChannelSubsystem, schid: int, devno: int, line: Any,
                 name: str) -> None:
        self.css = css
        self.schid = schid
        self.devno = devno
        self.bus_id = C.bus_id(devno)
        self.line = line
        self.name = name
        self.lpm = 0x80
        self.isc = DEFAULT_ISC
        self.enabled = False
        self.irq_requested = False
        self.lock = threading.Lock()         # the ccwdev lock: SSCH, TSCH and the IRB area
        # ORB, IRB, SCHIB and a small data area (SENSE ID) in one block below 2 GiB
        self.gpa, self.area = dma_alloc_low(css.dma, self.AREA, 8)
        self.on_interrupt: Callable[[], bool] | None = None   # the driver's indicator scan
        self.poll_hook: Callable[[], None] | None = None
        self._active = False
        self._done = threading.Event()
        self._result: tuple[int, Irb | None] = (0, None)
        self._polled = 0                     # statuses a poller took before the interrupt
        self.n_interrupts = 0
        self.n_unsolicited = 0
        self.n_polls = 0
        self.n_timeouts = 0

    # ---- enabling --------------------------------------------------------------------------------
    def _stsch(self) -> tuple[int, Schib]:
        off = self.SCHIB_OFF
        cc = self.css.stsch(self.schid, self.gpa + off)
        return cc, Schib(bytes(self.area[off:off + C.SCHIB_SIZE]))

    def enable(self, isc: int = DEFAULT_ISC) -> int:
        """cio_enable_subchannel: request the I/O interrupt, then MSCH with the enable bit,
        the ISC, concurrent sense and the path mask, and STSCH until it shows enabled."""
        if not self.irq_requested:
            try:
                self.css.irqc.request_irq(self.line, _irq_entry(self._interrupt), self.name,
                                          _irq_entry(self._poll_hook))
            except ValueError as e:       # no such line, or taken
                log.warning("%s: %s", self.bus_id, e)
                return ENODEV
            self.irq_requested = True
        try:
            for _ in range(5):
                cc, schib = self._stsch()
                if cc:
                    return ENODEV
                if schib.enabled and schib.isc == isc:
                    self.enabled = True
                    self.isc = isc
                    self.lpm = schib.lpm or 0x80
                    return 0
                schib.flags = (schib.flags & ~C.PMCW_FLAGS_ISC) | isc << C.PMCW_FLAGS_ISC_SHIFT \
                    | C.PMCW_FLAGS_ENA
                schib.chars |= C.PMCW_CHARS_CSENSE
                schib.intparm = self.schid
                schib.lpm = schib.pam & schib.pom
                off = self.SCHIB_OFF
                self.area[off:off + C.SCHIB_SIZE] = schib.pack()
                cc = self.css.msch(self.schid, self.gpa + off)
                if cc == 1:
                    self.poll()          # a status in the way
                elif cc == 3:
                    return ENODEV
        except ProgramException as e:
            log.warning("%s: enabling subchannel: %s", self.bus_id, e)
            return EIO
        return EBUSY

    def disable(self) -> None:
        try:
            cc, schib = self._stsch()
            if cc == 0 and schib.enabled:
                schib.flags &= ~C.PMCW_FLAGS_ENA
                off = self.SCHIB_OFF
                self.area[off:off + C.SCHIB_SIZE] = schib.pack()
                self.css.msch(self.schid, self.gpa + off)
        except ProgramException as e:
            log.warning("%s: disabling subchannel: %s", self.bus_id, e)
        self.enabled = False

    # ---- channel programs ------------------------------------------------------------------------
    def start(self, cpa: int, intparm: int) -> int:
        """ccw_device_start: SSCH with a format-1 ORB. 0, -EBUSY (status pending), -ENODEV."""
        orb = C.ORB.pack(intparm, C.ORB_CTRL0_FMT, self.lpm, 0, cpa)
        with self.lock:
            self.area[self.ORB_OFF:self.ORB_OFF + C.ORB_SIZE] = orb
            try:
                cc = self.css.ssch(self.schid, self.gpa + self.ORB_OFF)
            except ProgramException as e:
                log.warning("%s: %s", self.bus_id, e)
                return EIO
        return (0, EBUSY, EBUSY, ENODEV)[cc]

    def poll(self) -> bool:
        """TSCH: take a pending status and complete the request that waits for it. True if
        a status was pending."""
        with self.lock:
            try:
                cc = self.css.tsch(self.schid, self.gpa + self.IRB_OFF)
            except ProgramException as e:
                log.warning("%s: %s", self.bus_id, e)
                return False
            if cc != 0:
                return False
            irb = Irb.parse(bytes(self.area[self.IRB_OFF:self.IRB_OFF + C.IRB_SIZE]))
            if self._active and irb.scsw.fctl & (C.SCSW_FCTL_START_FUNC
                                                 | C.SCSW_FCTL_CLEAR_FUNC):
                self._result = (irb_error(irb), irb)
                self._active = False
                self._done.set()
            else:
                self.n_unsolicited += 1
        return True

    def run(self, cpa: int, intparm: int = 0,
            timeout: float = IO_TIMEOUT_S) -> tuple[int, Irb | None]:
        """Start the channel program at `cpa` and wait for its status: (0 or -errno, IRB).
        One request at a time per subchannel (the driver serialises them)."""
        deadline = time.monotonic() + timeout
        self._done.clear()
        self._result = (0, None)
        self._active = True
        while True:
            rc = self.start(cpa, intparm)
            if rc != EBUSY:
                break
            if self.poll():           # the status in the way; its interrupt still runs
                self._polled += 1
            if time.monotonic() > deadline:
                self._active = False
                return EBUSY, None
        if rc:
            self._active = False
            return rc, None
        irq = in_interrupt()
        while not self._done.is_set():
            if irq or not self._done.wait(POLL_AFTER_S):
                self.n_polls += 1
                if self.poll():
                    self._polled += 1
            if not self._done.is_set() and time.monotonic() > deadline:
                self.n_timeouts += 1
                log.warning("%s: channel program at 0x%x: no status after %.1f s", self.bus_id,
                            cpa, timeout)
                try:
                    self.css.csch(self.schid)
                except ProgramException:
                    pass
                if self.poll():
                    self._polled += 1
                self._active = False
                return ETIMEDOUT, None
        return self._result

    def sense_id(self) -> tuple[int, int, int]:
        """SENSE ID: (0 or -errno, control unit type, model)."""
        self.area[self.CCW_OFF:self.CCW_OFF + C.CCW_SIZE] = C.CCW1.pack(
            C.CCW_CMD_SENSE_ID, C.CCW_FLAG_SLI, C.SENSE_ID_SIZE, self.gpa + self.DATA_OFF)
        err, _irb = self.run(self.gpa + self.CCW_OFF)
        if err:
            return err, 0, 0
        off = self.DATA_OFF
        reserved, cu_type, cu_model, _dt, _dm, _u = C.SENSE_ID.unpack_from(
            bytes(self.area[off:off + C.SENSE_ID.size]))
        if reserved != 0xFF:
            return EIO, 0, 0
        return 0, cu_type, cu_model

    # ---- the I/O interrupt -----------------------------------------------------------------------
    def _interrupt(self, _line: Any) -> bool:
        """do_cio_interrupt + the driver's handler: TSCH, complete a waiting request, then the
        driver's look at its indicators (even when a poller took the status first)."""
        self.n_interrupts += 1
        got = self.poll()
        if not got and self._polled:
            self._polled -= 1       # its status was taken by polling: not spurious
            got = True
        if self.on_interrupt is not None:
            got = self.on_interrupt() or got
        return got

    def _poll_hook(self) -> None:
        if self.poll_hook is not None:
            self.poll_hook()

    def close(self) -> None:
        if self.irq_requested:
            self.css.irqc.free_irq(self.line)
            self.irq_requested = False
        self.area.release()
        self.css.dma.free(self.gpa)
