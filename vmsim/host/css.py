"""The channel subsystem of one VM: subchannels, the I/O instructions a guest traps with, the
channel programs they start, and I/O and adapter interrupts (s390's channel subsystem as
QEMU's hw/s390x/css.c models it for virtual devices; virtio spec 4.3).

The guest reaches a subchannel only through trapped instructions, ("css", op, ...):

    ("stsch", schid, schib)   STORE SUBCHANNEL: the SCHIB into guest memory   -> cc 0 / 3
    ("msch", schid, schib)    MODIFY SUBCHANNEL: enable, ISC, intparm ...      -> cc 0 / 1 / 3
    ("ssch", schid, orb)      START SUBCHANNEL: run the ORB's channel program  -> cc 0 / 1 / 3
    ("tsch", schid, irb)      TEST SUBCHANNEL: the IRB into guest memory       -> cc 0 / 1 / 3
    ("csch", schid)           CLEAR SUBCHANNEL                                 -> cc 0 / 3
    ("notify", schid, data, cookie)   diagnose 0x500 when no ioeventfd took it -> host cookie

`schid` is the 32-bit subchannel-identification word (GPR1), SCHIB / ORB / IRB guest-physical
addresses. A bad operand (an address outside RAM, a malformed schid or SCHIB) is a program
exception, answered with an error string; everything about a channel program (its ORB fields,
CCW addresses, command codes, counts, data addresses) is checked and reported in the status
the guest fetches with TSCH: program check, incorrect length, or unit check with sense data.
Nothing the guest wrote raises in the host, and guest memory is reached only through
GuestMemory.

vmsim runs a channel program to its end inside the SSCH that starts it (QEMU does the same for
virtual subchannels), then makes the subchannel status pending and signals its I/O interrupt
(an irqfd, line "io:<bus id>"). A subchannel is therefore never found busy; an SSCH finds it
status pending (cc 1) until the guest's TSCH has taken the previous status.

Adapter ("thin") interrupts carry no subchannel: one irqfd per interruption subclass (line
"airq:<isc>"), which the devices' transports signal after setting indicator bits in guest
memory. Boot descriptions list irqfds per transport, so the transport of the first subchannel
publishes the adapter lines.
"""

import logging
import struct
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

from vmsim.abi import ccw as C
from vmsim.host.memory import GuestMemory, GuestMemoryError
from vmsim.machine.eventfd import EventFd

log = logging.getLogger("vmsim.host")

# A channel program longer than this is a program check: a TIC loop never ends otherwise.
MAX_CCWS = 256
FIRST_DEVNO = 0x0000
# The ISC field of a SCHIB, the summary of an adapter interrupt: 8 subclasses.
ISCS = range(C.MAX_ISC + 1)


class Ccw(NamedTuple):
    """One format-1 CCW as fetched from guest memory."""

    addr: int       # where it was fetched from
    cmd: int
    flags: int
    count: int
    cda: int

    @property
    def sli(self) -> bool:
        return bool(self.flags & C.CCW_FLAG_SLI)

    def __str__(self) -> str:
        name = C.COMMAND_NAMES.get(self.cmd, f"0x{self.cmd:02x}")
        return f"{name} flags 0x{self.flags:02x} count {self.count} cda 0x{self.cda:x}"


class Completion(NamedTuple):
    """How one CCW ended: "ok" (with the residual count), "reject" (unit check, command
    reject), "unit_check" (not enough data for the command), "length" (incorrect length),
    "program_check", "data_check"."""

    kind: str
    residual: int = 0
    reason: str = ""

    @property
    def ok(self) -> bool:
        return self.kind == "ok"


def ok(residual: int = 0) -> Completion:
    return Completion("ok", residual)


def reject(reason: str) -> Completion:
    return Completion("reject", 0, reason)


def program_check(reason: str) -> Completion:
    return Completion("program_check", 0, reason)


class SubchannelDevice(Protocol):
    """What a subchannel needs from the device behind it (the virtio-ccw transport)."""

    def handle_ccw(self, sch: "Subchannel", ccw: Ccw) -> Completion: ...
    def subchannel_enabled(self, sch: "Subchannel", enabled: bool) -> None: ...
    def count_exit(self, kind: str, write: bool) -> None: ...
    def hypercall_notify(self, data: int) -> int: ...


class ProgramException(Exception):
    """An I/O instruction's operand was invalid: the guest takes a program interruption (the
    trap answers with the message). Raised and caught inside this module only."""


class Subchannel:
    """One I/O subchannel with its virtual control unit (a virtio-ccw proxy)."""

    def __init__(self, css: "ChannelSubsystem", sch_no: int, devno: int, cu_model: int,
                 device: SubchannelDevice, name: str) -> None:
        self.css = css
        self.sch_no = sch_no
        self.schid = C.schid_word(sch_no)
        self.devno = devno
        self.bus_id = C.bus_id(devno)
        self.name = name
        self.device = device
        self.cu_type = C.VIRTIO_CCW_CU_TYPE
        self.cu_model = cu_model
        self.line = f"io:{self.bus_id}"
        self.io_efd = EventFd()
        # PMCW: a single virtual channel path (CHPID 0, type 0x32), device number valid
        self.intparm = 0
        self.pmcw_flags = C.PMCW_FLAGS_DNV
        self.lpm = 0
        self.pnom = 0
        self.lpum = 0
        self.pim = 0x80
        self.mbi = 0
        self.pom = 0xFF
        self.pam = 0x80
        self.chpids = bytes(8)
        self.chars = 0
        self.mba = 0
        # SCSW
        self.s_flags = 0
        self.s_ctrl = 0
        self.s_cpa = 0
        self.dstat = 0
        self.cstat = 0
        self.s_count = 0
        self.sense = bytearray(C.SENSE_DATA_SIZE)
        # counters
        self.n_ssch = 0
        self.n_ccws = 0
        self.n_io_interrupts = 0
        self.n_unsolicited = 0
        self.n_rejects = 0
        self.n_program_checks = 0
        self.n_length_checks = 0
        self.last_error = ""

    # ---- state -----------------------------------------------------------------------------------
    @property
    def enabled(self) -> bool:
        return bool(self.pmcw_flags & C.PMCW_FLAGS_ENA)

    @property
    def isc(self) -> int:
        return (self.pmcw_flags & C.PMCW_FLAGS_ISC) >> C.PMCW_FLAGS_ISC_SHIFT

    @property
    def status_pending(self) -> bool:
        return bool(self.s_ctrl & C.SCSW_STCTL_STATUS_PEND)

    def scsw(self) -> bytes:
        return C.SCSW.pack(self.s_flags, self.s_ctrl, self.s_cpa & 0xFFFFFFFF, self.dstat,
                           self.cstat, self.s_count & 0xFFFF)

    def schib(self) -> bytes:
        pmcw = C.PMCW.pack(self.intparm, self.pmcw_flags, self.devno, self.lpm, self.pnom,
                           self.lpum, self.pim, self.mbi, self.pom, self.pam, self.chpids,
                           self.chars)
        return pmcw + self.scsw() + C.SCHIB_TAIL.pack(self.mba, bytes(4))

    # ---- interrupts ------------------------------------------------------------------------------
    def _inject(self) -> None:
        """The I/O interrupt of a subchannel that became status pending."""
        self.n_io_interrupts += 1
        self.io_efd.signal()

    def conditional_io_interrupt(self) -> bool:
        """An unsolicited interrupt (alert status) unless one is already pending (virtio-ccw's
        classic indicators; QEMU's css_conditional_io_interrupt). A disabled subchannel is not
        made status pending. True if an interrupt was injected."""
        if not self.enabled or self.status_pending:
            return False
        self.s_ctrl = (self.s_ctrl & ~C.SCSW_CTRL_STCTL) | C.SCSW_STCTL_ALERT \
            | C.SCSW_STCTL_STATUS_PEND
        self.dstat = self.cstat = self.s_count = 0
        self.n_unsolicited += 1
        self._inject()
        return True

    # ---- data transfer for the device's commands -------------------------------------------------
    def _view(self, ccw: Ccw, length: int) -> memoryview | Completion:
        if ccw.cda > C.CDA_MAX:
            return program_check(f"{ccw}: data address beyond 31 bits")
        try:
            return self.css.mem.translate(ccw.cda, length)
        except GuestMemoryError:
            return program_check(f"{ccw}: data area 0x{ccw.cda:x}+{length} is outside "
                                 f"guest RAM")

    @staticmethod
    def _length(ccw: Ccw, need: int) -> Completion | None:
        """The architecture's length rules for a command that moves exactly `need` bytes:
        without SLI the count must match (else incorrect length); with SLI a longer count is
        accepted and a shorter one cannot execute the command (a check condition)."""
        if ccw.count == need:
            return None
        if not ccw.sli:
            return Completion("length", ccw.count, f"{ccw}: expected a count of {need}")
        if ccw.count < need:
            return Completion("unit_check", ccw.count,
                              f"{ccw}: {need} bytes needed, the count suppresses the length "
                              f"check but is shorter")
        return None

    def fetch(self, ccw: Ccw, need: int) -> bytes | Completion:
        """The `need` bytes a command takes from guest memory (a write-type command)."""
        bad = self._length(ccw, need)
        if bad is not None:
            return bad
        view = self._view(ccw, need)
        if isinstance(view, Completion):
            return view
        return bytes(view)

    def peek(self, ccw: Ccw, n: int) -> bytes | Completion:
        """The first `n` bytes of the data area (n <= count), for a command whose length
        depends on what it carries (SET_VIRTIO_REV)."""
        view = self._view(ccw, n)
        if isinstance(view, Completion):
            return view
        return bytes(view)

    def store(self, ccw: Ccw, data: bytes) -> Completion:
        """A read-type command's data into guest memory."""
        bad = self._length(ccw, len(data))
        if bad is not None:
            return bad
        view = self._view(ccw, len(data))
        if isinstance(view, Completion):
            return view
        view[:] = data
        return ok(ccw.count - len(data))

    def store_upto(self, ccw: Ccw, data: bytes, exact: bool = False) -> Completion:
        """A read of a variable-length area: the device sends at most `count` bytes; without
        SLI a count beyond the area (or, `exact`, any other count) is incorrect length.
        Config space may be read in part without SLI (virtio-ccw drivers read offset +
        length bytes); sense data not (QEMU's rule for SENSE ID and BASIC SENSE)."""
        if not ccw.sli and (ccw.count > len(data) or (exact and ccw.count != len(data))):
            return Completion("length", ccw.count,
                              f"{ccw}: the device has {len(data)} bytes to send")
        n = min(ccw.count, len(data))
        view = self._view(ccw, n)
        if isinstance(view, Completion):
            return view
        view[:] = data[:n]
        return ok(ccw.count - n)

    def fetch_upto(self, ccw: Ccw, limit: int) -> bytes | Completion:
        """A write of a variable-length area: at most `limit` bytes."""
        if ccw.count > limit and not ccw.sli:
            return Completion("length", ccw.count,
                              f"{ccw}: count beyond the {limit} bytes the device takes")
        n = min(ccw.count, limit)
        view = self._view(ccw, n)
        if isinstance(view, Completion):
            return view
        return bytes(view)

    # ---- the basic commands every device answers -------------------------------------------------
    def _basic(self, ccw: Ccw) -> Completion | None:
        if ccw.cmd == C.CCW_CMD_NOOP:
            return ok(ccw.count)
        if ccw.cmd == C.CCW_CMD_SENSE_ID:
            data = bytearray(C.SENSE_ID_SIZE)
            C.SENSE_ID.pack_into(data, 0, 0xFF, self.cu_type, self.cu_model, 0, 0, 0)
            if ccw.count < 4:
                data[0] = 0   # 0xff only when bytes 0..3 fit (QEMU)
            return self.store_upto(ccw, bytes(data), exact=True)
        if ccw.cmd == C.CCW_CMD_BASIC_SENSE:
            done = self.store_upto(ccw, bytes(self.sense), exact=True)
            if done.ok:
                self.sense[:] = bytes(C.SENSE_DATA_SIZE)
            return done
        return None

    # ---- channel programs ------------------------------------------------------------------------
    def start(self, intparm: int, ctrl0: int, lpm: int, ctrl1: int, cpa: int) -> None:
        """The start function, run to its end: interpret the channel program at `cpa`, then
        make the subchannel status pending and inject its I/O interrupt."""
        self.n_ssch += 1
        self.intparm = intparm
        self.s_flags = 0
        self.s_ctrl = C.SCSW_FCTL_START_FUNC | C.SCSW_ACTL_START_PEND
        self.dstat = self.cstat = self.s_count = 0
        self.s_cpa = cpa
        if not lpm & self.pam:
            # no usable path: a deferred condition code 3
            self.s_flags |= 3 << C.SCSW_FLAGS_CC_SHIFT
            self.s_ctrl = (self.s_ctrl & ~C.SCSW_ACTL_START_PEND) | C.SCSW_STCTL_ALERT \
                | C.SCSW_STCTL_STATUS_PEND
            self.last_error = f"ORB path mask 0x{lpm:02x} selects no installed path"
            self._inject()
            return
        if ctrl0 & C.ORB_CTRL0_INVALID or ctrl1 & C.ORB_CTRL1_INVALID:
            done, last = program_check(f"ORB with reserved bits set (0x{ctrl0:04x} "
                                       f"0x{ctrl1:02x})"), cpa - C.CCW_SIZE
        elif not ctrl0 & C.ORB_CTRL0_FMT:
            done, last = program_check("format-0 CCWs (the ORB's F bit is 0): vmsim "
                                       "implements format-1 channel programs only"), \
                cpa - C.CCW_SIZE
        else:
            done, last = self._run(cpa, bool(ctrl0 & C.ORB_CTRL0_SPND))
        self._end(done, last)
        self._inject()

    def _run(self, cpa: int, may_suspend: bool) -> tuple[Completion, int]:
        """Interpret CCWs from `cpa` while they chain; (how the last one ended, its address)."""
        mem = self.css.mem
        addr = cpa
        after_tic = False
        for _ in range(MAX_CCWS):
            if addr % C.CCW_SIZE or addr > C.CDA_MAX or not mem.check(addr, C.CCW_SIZE):
                return program_check(f"CCW address 0x{addr:x} is not a doubleword in guest "
                                     f"RAM below 2 GiB"), addr
            cmd, flags, count, cda = C.CCW1.unpack(mem.translate(addr, C.CCW_SIZE))
            ccw = Ccw(addr, cmd, flags, count, cda)
            self.n_ccws += 1
            if cmd & 0x0F == 0:
                return program_check(f"invalid command code 0x{cmd:02x}"), addr
            if cmd & 0x0F == C.CCW_CMD_TIC:
                if cmd & 0xF0:
                    return program_check(f"invalid command code 0x{cmd:02x}"), addr
                if after_tic:
                    return program_check("a TIC transfers to another TIC"), addr
                after_tic = True
                addr = cda
                continue
            after_tic = False
            if flags & (C.CCW_FLAG_DC | C.CCW_FLAG_IDA | C.CCW_FLAG_MIDA | C.CCW_FLAG_SKIP):
                return program_check(f"{ccw}: data chaining, skipping and indirect data "
                                     f"addressing are not implemented"), addr
            if flags & C.CCW_FLAG_SUSPEND:
                why = ("suspending channel programs is not implemented" if may_suspend
                       else "the S flag without the ORB's suspend control")
                return program_check(f"{ccw}: {why}"), addr
            done = self._basic(ccw)
            if done is None:
                done = self.device.handle_ccw(self, ccw)
            if not done.ok or not flags & C.CCW_FLAG_CC:
                return done, addr
            addr += C.CCW_SIZE
        return program_check(f"channel program longer than {MAX_CCWS} CCWs"), addr

    def _end(self, done: Completion, last: int) -> None:
        """Primary and secondary status for how the program ended (QEMU's
        sch_handle_start_func): channel end and device end, plus unit check with sense data,
        incorrect length, or a program check."""
        self.s_ctrl &= ~C.SCSW_ACTL_START_PEND
        stctl = C.SCSW_STCTL_PRIMARY | C.SCSW_STCTL_SECONDARY | C.SCSW_STCTL_STATUS_PEND
        self.s_cpa = (last + C.CCW_SIZE) & 0xFFFFFFFF
        self.s_count = done.residual & 0xFFFF
        kind = done.kind
        if kind == "ok":
            self.dstat = C.DEV_STAT_CHN_END | C.DEV_STAT_DEV_END
        else:
            stctl |= C.SCSW_STCTL_ALERT
            self.last_error = done.reason
            log.info("css %s: %s: %s", self.bus_id, kind, done.reason)
            if kind in ("reject", "unit_check"):
                self.n_rejects += 1
                self.dstat = C.DEV_STAT_CHN_END | C.DEV_STAT_DEV_END | C.DEV_STAT_UNIT_CHECK
                self.sense[:] = bytes(C.SENSE_DATA_SIZE)
                self.sense[0] = C.SNS0_CMD_REJECT if kind == "reject" else C.SNS0_DATA_CHECK
            elif kind == "length":
                self.n_length_checks += 1
                self.dstat = C.DEV_STAT_CHN_END | C.DEV_STAT_DEV_END
                self.cstat = C.SCHN_STAT_INCORR_LEN
            elif kind == "data_check":
                self.n_program_checks += 1
                self.cstat = C.SCHN_STAT_CHN_DATA_CHK
            else:
                self.n_program_checks += 1
                self.cstat = C.SCHN_STAT_PROG_CHECK
        self.s_ctrl = (self.s_ctrl & ~C.SCSW_CTRL_STCTL) | stctl

    def test(self) -> tuple[int, bytes]:
        """TEST SUBCHANNEL: (cc, IRB). cc 0 with the pending status, which is then cleared;
        cc 1 when no status was pending (the IRB shows the current SCSW)."""
        irb = bytearray(C.IRB_SIZE)
        flags = self.s_flags
        pending = self.status_pending
        esw0 = esw1 = 0
        if pending:
            if self.cstat & (C.SCHN_STAT_CHN_DATA_CHK | C.SCHN_STAT_CHN_CTRL_CHK
                             | C.SCHN_STAT_INTF_CTRL_CHK):
                flags |= C.SCSW_FLAGS_ESWF
                esw0 = C.IRB_ESW0_CHECK
            else:
                esw0 = C.IRB_ESW0_NORMAL
            if self.dstat & C.DEV_STAT_UNIT_CHECK and self.chars & C.PMCW_CHARS_CSENSE:
                flags |= C.SCSW_FLAGS_ESWF | C.SCSW_FLAGS_ECTL
                irb[C.SCSW.size + C.ESW_SIZE:] = self.sense
                esw1 = C.IRB_ESW1_SENSE | C.SENSE_DATA_SIZE << 8
        C.SCSW.pack_into(irb, 0, flags, self.s_ctrl, self.s_cpa & 0xFFFFFFFF, self.dstat,
                         self.cstat, self.s_count & 0xFFFF)
        struct.pack_into(">II", irb, C.SCSW.size, esw0, esw1)
        if not pending:
            return 1, bytes(irb)
        # The status is taken: the functions end, the subchannel is idle again.
        self.s_ctrl = 0
        self.s_flags &= ~(C.SCSW_FLAGS_CC | C.SCSW_FLAGS_PNO)
        if self.chars & C.PMCW_CHARS_CSENSE:
            self.sense[:] = bytes(C.SENSE_DATA_SIZE)
        return 0, bytes(irb)

    def clear(self) -> None:
        """The clear function: whatever was going on ends, status pending with no device
        status (QEMU's sch_handle_clear_func)."""
        self.s_ctrl = C.SCSW_FCTL_CLEAR_FUNC | C.SCSW_STCTL_STATUS_PEND
        self.s_flags &= ~C.SCSW_FLAGS_PNO
        self.dstat = self.cstat = 0
        self.lpum = 0x80
        if self.enabled:
            self._inject()
        else:
            self.s_ctrl = 0

    def modify(self, schib: bytes) -> None:
        """MODIFY SUBCHANNEL: take the program-modifiable fields of a SCHIB."""
        (intparm, flags, _devno, lpm, _pnom, _lpum, _pim, mbi, pom, _pam, _chpids,
         chars) = C.PMCW.unpack_from(schib, 0)
        if flags & C.PMCW_FLAGS_INVALID or chars & C.PMCW_CHARS_INVALID:
            raise ProgramException("operand exception: SCHIB with reserved bits set")
        mba, _mda = C.SCHIB_TAIL.unpack_from(schib, C.PMCW.size + C.SCSW.size)
        was = self.enabled
        mask = (C.PMCW_FLAGS_ISC | C.PMCW_FLAGS_ENA | C.PMCW_FLAGS_LM | C.PMCW_FLAGS_MME
                | C.PMCW_FLAGS_MP)
        self.intparm = intparm
        self.pmcw_flags = (self.pmcw_flags & ~mask) | (flags & mask)
        self.lpm = lpm
        self.mbi = mbi
        self.pom = pom
        cmask = C.PMCW_CHARS_MBFC | C.PMCW_CHARS_CSENSE
        self.chars = (self.chars & ~cmask) | (chars & cmask)
        self.mba = mba
        if self.enabled != was:
            self.device.subchannel_enabled(self, self.enabled)

    def describe(self) -> dict[str, Any]:
        return {"schid": self.schid, "sch_no": self.sch_no, "devno": self.devno,
                "bus_id": self.bus_id, "name": self.name, "irq": self.line,
                "cu_type": self.cu_type, "cu_model": self.cu_model}

    def counters(self) -> dict[str, Any]:
        return {"start_subchannel": self.n_ssch, "ccws": self.n_ccws,
                "io_interrupts": self.n_io_interrupts, "unsolicited": self.n_unsolicited,
                "command_rejects": self.n_rejects, "program_checks": self.n_program_checks,
                "incorrect_length": self.n_length_checks, "last_error": self.last_error,
                "enabled": self.enabled, "isc": self.isc}

    def close(self) -> None:
        self.io_efd.close()


class ChannelSubsystem:
    """The VM's channel subsystem (css 0, subchannel set 0): subchannels by number, the
    instructions' trap handlers, adapter interrupts."""

    def __init__(self, mem: GuestMemory) -> None:
        self.mem = mem
        self.subchannels: dict[int, Subchannel] = {}
        self.adapter_efds = {isc: EventFd() for isc in ISCS}
        self.adapter_lines = {isc: f"airq:{isc}" for isc in ISCS}
        self.n_adapter_interrupts = {isc: 0 for isc in ISCS}
        self.unassigned = 0           # instructions for subchannels that do not exist
        self.program_exceptions = 0
        self._ops: dict[str, Callable[..., Any]] = {
            "stsch": self._stsch, "msch": self._msch, "ssch": self._ssch,
            "tsch": self._tsch, "csch": self._csch, "notify": self._notify,
        }

    @classmethod
    def of(cls, board: Any, mem: GuestMemory) -> "ChannelSubsystem":
        """The board's channel subsystem, made on first use."""
        if board.css is None:
            board.css = cls(mem)
        return board.css

    def add_subchannel(self, device: SubchannelDevice, cu_model: int,
                       name: str) -> Subchannel:
        """The next free subchannel (numbers and device numbers from 0, as QEMU assigns
        them for devices without an explicit devno)."""
        sch_no = len(self.subchannels)
        if sch_no > C.MAX_SCHID:
            raise ValueError("subchannel set 0 is full")
        sch = Subchannel(self, sch_no, FIRST_DEVNO + sch_no, cu_model, device, name)
        self.subchannels[sch_no] = sch
        return sch

    def first(self) -> Subchannel | None:
        return self.subchannels.get(0)

    def adapter_irqfds(self) -> list[tuple[str, EventFd]]:
        return [(self.adapter_lines[isc], self.adapter_efds[isc]) for isc in ISCS]

    def adapter_interrupt(self, isc: int) -> None:
        """An adapter interrupt for `isc` (QEMU's css_adapter_interrupt)."""
        self.n_adapter_interrupts[isc] += 1
        self.adapter_efds[isc].signal()

    # ---- traps -----------------------------------------------------------------------------------
    def trap(self, args: list) -> Any:
        """A trapped channel-subsystem instruction: its condition code, or (a program
        exception) an error string."""
        if not args:
            return "malformed channel-subsystem instruction"
        op = self._ops.get(args[0]) if isinstance(args[0], str) else None
        if op is None:
            return f"operation exception: unknown channel-subsystem instruction {args[0]!r}"
        try:
            return op(*args[1:])
        except ProgramException as e:
            self.program_exceptions += 1
            return str(e)

    def _subchannel(self, word: Any) -> Subchannel | None:
        """The subchannel a subchannel-identification word names (None: not operational)."""
        if not isinstance(word, int) or isinstance(word, bool):
            raise ProgramException(f"operand exception: subchannel id {word!r}")
        word &= 0xFFFF_FFFF
        if not word & C.SCHID_ONE or word & (C.SCHID_M | C.SCHID_CSSID):
            raise ProgramException(f"operand exception: 0x{word:08x} is not a "
                                   f"subchannel-identification word")
        if word & C.SCHID_SSID:
            return None           # vmsim has subchannel set 0 only
        return self.subchannels.get(word & C.SCHID_NR)

    def _area(self, addr: Any, length: int, align: int) -> memoryview:
        if not isinstance(addr, int) or isinstance(addr, bool):
            raise ProgramException(f"operand exception: address {addr!r}")
        if addr % align:
            raise ProgramException(f"specification exception: operand 0x{addr:x} is not "
                                   f"{align}-byte aligned")
        try:
            return self.mem.translate(addr, length)
        except GuestMemoryError as e:
            raise ProgramException(f"addressing exception: {e}") from None

    def _stsch(self, schid: Any, addr: Any) -> int:
        sch = self._subchannel(schid)
        view = self._area(addr, C.SCHIB_SIZE, 4)
        if sch is None:
            self.unassigned += 1
            return 3
        sch.device.count_exit("stsch", False)
        view[:] = sch.schib()
        return 0

    def _msch(self, schid: Any, addr: Any) -> int:
        sch = self._subchannel(schid)
        view = self._area(addr, C.SCHIB_SIZE, 4)
        if sch is None:
            self.unassigned += 1
            return 3
        sch.device.count_exit("msch", True)
        schib = bytes(view)
        if sch.status_pending:
            return 1
        sch.modify(schib)
        return 0

    def _ssch(self, schid: Any, addr: Any) -> int:
        sch = self._subchannel(schid)
        view = self._area(addr, C.ORB_SIZE, 4)
        if sch is None:
            self.unassigned += 1
            return 3
        sch.device.count_exit("ssch", True)
        if not sch.enabled:
            return 3
        if sch.status_pending:
            return 1
        sch.start(*C.ORB.unpack(view))
        return 0

    def _tsch(self, schid: Any, addr: Any) -> int:
        sch = self._subchannel(schid)
        view = self._area(addr, C.IRB_SIZE, 4)
        if sch is None:
            self.unassigned += 1
            return 3
        sch.device.count_exit("tsch", False)
        cc, irb = sch.test()
        view[:] = irb
        return cc

    def _csch(self, schid: Any) -> int:
        sch = self._subchannel(schid)
        if sch is None:
            self.unassigned += 1
            return 3
        sch.device.count_exit("csch", True)
        sch.clear()
        return 0

    def _notify(self, schid: Any, data: Any, cookie: Any = 0) -> int:
        """Diagnose 0x500 subcode 3 that no ioeventfd matched: the virtio-ccw notify. The
        device ignores bits 0-31 of GPR2; it answers with a host cookie, or a negative errno
        the driver treats as a broken queue."""
        if not isinstance(data, int) or isinstance(data, bool):
            return -22
        try:
            sch = self._subchannel(schid if isinstance(schid, int) else -1)
        except ProgramException:
            return -22
        if sch is None:
            self.unassigned += 1
            return -22
        return sch.device.hypercall_notify(data & 0xFFFF_FFFF)

    def describe(self) -> dict[str, Any]:
        """The channel subsystem in the boot description: the subchannels and their I/O
        interrupt lines, the adapter-interrupt lines by ISC."""
        return {"subchannels": [s.describe() for s in self.subchannels.values()],
                "adapter_irqs": [{"isc": isc, "irq": self.adapter_lines[isc]} for isc in ISCS]}

    def counters(self) -> dict[str, Any]:
        return {"adapter_interrupts": {str(k): v for k, v in self.n_adapter_interrupts.items()
                                       if v},
                "unassigned": self.unassigned, "program_exceptions": self.program_exceptions}

    def close(self) -> None:
        for efd in self.adapter_efds.values():
            efd.close()
