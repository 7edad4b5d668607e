"""The virtio-ccw transport, device side (virtio spec 4.3; QEMU hw/s390x/virtio-ccw.c): a
virtio device behind a subchannel of the VM's channel subsystem (vmsim.host.css).

The driver configures the device with channel programs; each virtio-ccw command arrives here
as one CCW, with its data in guest memory (big-endian communication blocks, see
vmsim.abi.ccw). Revision rules (spec 4.3.2.1): the device is non-transitional, so until
SET_VIRTIO_REV has selected revision 1 or 2 every virtio command is rejected, revision 0 is
rejected, a second SET_VIRTIO_REV is rejected, and READ_STATUS exists from revision 2 on. The
revision is forgotten when the subchannel is enabled again.

Notifications:

- driver -> device: diagnose 0x500 with the subchannel id and queue index, bound to each
  queue's kick eventfd as KVM binds a virtio-ccw ioeventfd (space "css", address = the
  subchannel id, datamatch = the queue index); a notify that matches none (notification data)
  arrives as a trap and is counted.
- device -> driver: indicator bits in guest memory, then an interrupt. Classic indicators
  (SET_IND): bit q of a big-endian 64-bit word, then an unsolicited I/O interrupt on the
  subchannel unless one is pending; the driver's handler takes it with TSCH (one exit) and
  reads the word. Adapter indicators (SET_IND_ADAPTER): bit `bit_nr + q` of the driver's
  area, then the summary indicator byte; an adapter interrupt for the ISC only if the summary
  was clear. The driver learns everything from memory: no exit per interrupt.
  Configuration changes always use the classic path (SET_CONF_IND's word, bit 0).

The device sets a bit with a read-modify-write of one aligned native unit (a byte, or the
64-bit word) while the driver may clear bits of the same unit: the driver, not the device,
makes that safe (see vmsim.guest.virtio.ccw). What the device must do is order its stores: the
used ring, then the indicator bit, then a full barrier before it reads the summary indicator,
so that a driver who cleared the summary has either seen the bit or gets an interrupt.
"""

import logging
from typing import Any

from vmsim.abi import ccw as C
from vmsim.abi import features as F
from vmsim.abi import status as S
from vmsim.host.board import Board
from vmsim.host.css import Ccw, ChannelSubsystem, Completion, Subchannel, ok, reject
from vmsim.host.virtio.device import VirtioDevice
from vmsim.host.virtio.transport import HostTransport
from vmsim.machine.barrier import full_barrier
from vmsim.machine.eventfd import EventFd

log = logging.getLogger("vmsim.host")

EINVAL = 22


def classic_mask(bit: int) -> int:
    """Bit `bit` of a big-endian 64-bit indicator word, in the value a native (little-endian)
    8-byte load of that word gives: value bit n lives in byte 7 - n // 8."""
    return 1 << (8 * (7 - bit // 8) + bit % 8)


class CcwTransport(HostTransport):
    """One virtio device on a subchannel: the virtio-ccw commands and the indicators."""

    name = "ccw"

    def __init__(self, dev: VirtioDevice, board: Board, max_revision: int = C.VIRTIO_CCW_REV_MAX,
                 adapter_interrupts: bool = True) -> None:
        super().__init__()
        if not 1 <= max_revision <= C.VIRTIO_CCW_REV_MAX:
            raise ValueError(f"virtio-ccw revision {max_revision}: vmsim's devices are "
                             f"non-transitional (revision 1 or 2)")
        self.dev = dev
        self.mem = dev.mem
        self.css = ChannelSubsystem.of(board, dev.mem)
        self.sch = self.css.add_subchannel(self, dev.device_id, dev.name)
        self.max_revision = max_revision
        self.adapter_supported = adapter_interrupts
        self.revision = -1                 # unset until SET_VIRTIO_REV
        self.indicators = 0                # classic queue indicators (a word's address)
        self.indicators2 = 0               # configuration-change indicators
        self.summary = 0                   # adapter: summary indicator byte
        self.adapter_ind = 0               # adapter: the indicator area
        self.bit_nr = 0
        self.isc = 0
        self.irq_mode = ""                 # "classic" / "adapter" as last set up
        self.n_trapped_notifies = 0
        self.n_io_interrupts = 0           # unsolicited I/O interrupts for indicators
        self.n_adapter_interrupts = 0
        self.n_adapter_suppressed = 0      # summary already set: no new interrupt needed
        self.n_lost = 0                    # used-buffer notifications without indicators
        self.n_commands: dict[str, int] = {}
        dev.transport = self

    @property
    def thinint(self) -> bool:
        return self.adapter_ind != 0

    # ---- interrupts (the device model calls these) ----------------------------------------------
    def signal_used(self, queue_index: int) -> None:
        mem = self.mem
        if self.adapter_ind:
            bit = self.bit_nr + queue_index
            off = self.adapter_ind - mem.base + bit // 8
            mv = mem.mv
            mask = 0x80 >> (bit % 8)
            mv[off] |= mask                 # one byte: a single native load and store
            self.n_interrupts += 1
            # The bit must be visible before the summary is read (store-load order).
            full_barrier()
            soff = self.summary - mem.base
            if mv[soff]:
                self.n_adapter_suppressed += 1
                return
            mv[soff] = C.SUMMARY_INDICATOR_SET
            self.n_adapter_interrupts += 1
            self.css.adapter_interrupt(self.isc)
            return
        if self.indicators:
            self._set_classic(self.indicators, queue_index)
            self.n_interrupts += 1
            if self.sch.conditional_io_interrupt():
                self.n_io_interrupts += 1
            return
        self.n_lost += 1                    # the driver registered no indicators

    def signal_config(self) -> None:
        if not self.indicators2:
            self.n_lost += 1
            return
        self._set_classic(self.indicators2, C.CONFIG_CHANGE_BIT)
        self.n_interrupts += 1
        if self.sch.conditional_io_interrupt():
            self.n_io_interrupts += 1

    def _set_classic(self, addr: int, bit: int) -> None:
        """Set a bit of an aligned big-endian 64-bit indicator word with one native 8-byte
        load and store (SET_IND checked the address)."""
        i = (addr - self.mem.base) >> 3
        q = self.mem.q
        q[i] = q[i] | classic_mask(bit)

    # ---- wiring ----------------------------------------------------------------------------------
    def ioeventfds(self) -> list[tuple[str, int, int, EventFd]]:
        """Diagnose 0x500 for (subchannel, queue) signals that queue's kick eventfd."""
        return [("css", self.sch.schid, q.index, q.kick) for q in self.dev.queues]

    def irqfds(self) -> list[tuple[Any, EventFd]]:
        """The subchannel's I/O interrupt; with the first subchannel, the adapter lines."""
        lines: list[tuple[Any, EventFd]] = [(self.sch.line, self.sch.io_efd)]
        if self.css.first() is self.sch:
            lines.extend(self.css.adapter_irqfds())
        return lines

    # ---- the subchannel's callbacks --------------------------------------------------------------
    def subchannel_enabled(self, sch: Subchannel, enabled: bool) -> None:
        """The revision is unset from the time the subchannel is enabled (spec 4.3.2.1)."""
        self.revision = -1

    def hypercall_notify(self, data: int) -> int:
        """A diagnose 0x500 notify that trapped (no ioeventfd matched its value)."""
        self.count_exit("notify", True)
        dev = self.dev
        self.n_trapped_notifies += 1
        qi = data & 0xFFFF
        if qi >= len(dev.queues):
            dev.guest_error(f"notify of queue {qi}, which does not exist")
            return -EINVAL
        ring = dev.queues[qi].ring
        if ring is not None:
            if dev.negotiated(F.VIRTIO_F_NOTIFICATION_DATA) and not ring.check_notification(
                    data):
                ring.n_notify_data_errors += 1
                dev.guest_error(f"queue {qi}: notification data 0x{data:08x} is ahead of the "
                                f"ring")
            ring.n_notifies += 1
        return self.sch.sch_no     # the host cookie: any non-negative value

    def handle_ccw(self, sch: Subchannel, ccw: Ccw) -> Completion:
        """One virtio-ccw command (QEMU's virtio_ccw_cb)."""
        cmd = ccw.cmd
        name = C.COMMAND_NAMES.get(cmd)
        if cmd not in C.VIRTIO_COMMANDS:
            return reject(f"{ccw}: not a command of this device")
        self.n_commands[name] = self.n_commands.get(name, 0) + 1
        if cmd == C.CCW_CMD_SET_VIRTIO_REV:
            return self._set_rev(sch, ccw)
        if self.revision < 0:
            return reject(f"{name} before SET_VIRTIO_REV (a non-transitional device)")
        handler = self._commands[cmd]
        return handler(self, sch, ccw)

    # ---- the commands ----------------------------------------------------------------------------
    def _set_rev(self, sch: Subchannel, ccw: Ccw) -> Completion:
        if ccw.count < C.REV_INFO.size:
            return sch.fetch(ccw, C.REV_INFO.size)      # the length rules' verdict
        head = sch.peek(ccw, C.REV_INFO.size)
        if isinstance(head, Completion):
            return head
        revision, length = C.REV_INFO.unpack(head)
        if self.revision >= 0:
            return reject(f"SET_VIRTIO_REV {revision} after revision {self.revision} was set")
        if revision == 0:
            return reject("revision 0 (legacy): this device is non-transitional")
        if revision > self.max_revision:
            return reject(f"revision {revision} is beyond {self.max_revision}")
        if length:
            return reject(f"revision {revision} carries no data, got a length of {length}")
        need = C.REV_INFO.size
        whole = sch.fetch(ccw, need)
        if isinstance(whole, Completion):
            return whole
        self.revision = revision
        return ok(ccw.count - need)

    def _read_feat(self, sch: Subchannel, ccw: Ccw) -> Completion:
        data = sch.fetch(ccw, C.FEATURE_DESC.size)
        if isinstance(data, Completion):
            return data
        _, index = C.FEATURE_DESC.unpack(data)
        feats = self.dev.device_features
        word = feats >> 32 * index & 0xFFFFFFFF if index in (0, 1) else 0
        return sch.store(ccw, C.FEATURE_DESC.pack(word, index))

    def _write_feat(self, sch: Subchannel, ccw: Ccw) -> Completion:
        data = sch.fetch(ccw, C.FEATURE_DESC.size)
        if isinstance(data, Completion):
            return data
        word, index = C.FEATURE_DESC.unpack(data)
        if index in (0, 1):
            self.dev.set_driver_features(index, word)
        elif word:
            self.dev.guest_error(f"WRITE_FEAT of features[{index}] = 0x{word:x}: expected 0")
        return ok(ccw.count - C.FEATURE_DESC.size)

    def _read_conf(self, sch: Subchannel, ccw: Ccw) -> Completion:
        return sch.store_upto(ccw, bytes(self.dev.config_space()))

    def _write_conf(self, sch: Subchannel, ccw: Ccw) -> Completion:
        """The driver sends config space from offset 0 up to the end of what it changes; the
        device applies the bytes that differ (QEMU's set_config takes the whole structure and
        picks the writable fields), so unchanged read-only fields are no error."""
        dev = self.dev
        cfg = bytes(dev.config_space())
        data = sch.fetch_upto(ccw, len(cfg))
        if isinstance(data, Completion):
            return data
        i, n = 0, len(data)
        while i < n:
            if data[i] == cfg[i]:
                i += 1
                continue
            j = i
            while j < n and data[j] != cfg[j]:
                j += 1
            dev.write_config_space(i, data[i:j])
            i = j
        return ok(ccw.count - n)

    def _write_status(self, sch: Subchannel, ccw: Ccw) -> Completion:
        """A status the device does not take leaves the status unchanged and is a command
        reject (spec 4.3.2.3): FEATURES_OK refused, a bit set out of order."""
        data = sch.fetch(ccw, C.STATUS_SIZE)
        if isinstance(data, Completion):
            return data
        value = data[0]
        dev = self.dev
        if value == 0:
            self._reset()
            return ok(ccw.count - 1)
        old = dev.status
        dev.write_status(value)
        keep = ~S.DEVICE_NEEDS_RESET & 0xFF
        if dev.status & keep != value & keep:
            if dev.status != old:
                dev.status = old
                dev.publish_stats()
            return reject(f"status {S.describe(value)} not taken in {S.describe(old)}")
        return ok(ccw.count - 1)

    def _read_status(self, sch: Subchannel, ccw: Ccw) -> Completion:
        if self.revision < 2:
            return reject(f"READ_STATUS in revision {self.revision} (it needs revision 2)")
        return sch.store(ccw, bytes((self.dev.status,)))

    def _set_vq(self, sch: Subchannel, ccw: Ccw) -> Completion:
        data = sch.fetch(ccw, C.VQ_INFO_BLOCK.size)
        if isinstance(data, Completion):
            return data
        desc, _res0, index, num, driver, device = C.VQ_INFO_BLOCK.unpack(data)
        dev = self.dev
        residual = ccw.count - C.VQ_INFO_BLOCK.size
        if index >= len(dev.queues):
            return reject(f"SET_VQ of queue {index}, which does not exist")
        q = dev.queues[index]
        if desc == 0:
            # releasing the queue: Linux's del_vqs does it after the reset
            dev.queue_disable(q)
            return ok(residual)
        st = dev.status
        if not st & S.FEATURES_OK or st & (S.DRIVER_OK | S.FAILED):
            return reject(f"SET_VQ of queue {index} in status {S.describe(st)}: queues are set "
                          f"up after FEATURES_OK, before DRIVER_OK")
        if q.ready:
            return reject(f"SET_VQ of queue {index}, which is already set up")
        packed = dev.negotiated(F.VIRTIO_F_RING_PACKED)
        if not 0 < num <= q.num_max or (not packed and num & (num - 1)):
            return reject(f"SET_VQ of queue {index} with {num} entries (at most {q.num_max}"
                          f"{'' if packed else ', a power of two'})")
        q.num, q.desc, q.driver, q.device = num, desc, driver, device
        if not dev.queue_enable(q):
            q.reset()
            return reject(f"SET_VQ of queue {index}: the ring does not fit guest RAM")
        return ok(residual)

    def _read_vq_conf(self, sch: Subchannel, ccw: Ccw) -> Completion:
        data = sch.fetch(ccw, C.VQ_CONFIG_BLOCK.size)
        if isinstance(data, Completion):
            return data
        index, _ = C.VQ_CONFIG_BLOCK.unpack(data)
        if index >= C.VIRTIO_CCW_QUEUE_MAX:
            return reject(f"READ_VQ_CONF of queue {index}")
        qs = self.dev.queues
        num = qs[index].num_max if index < len(qs) else 0
        return sch.store(ccw, C.VQ_CONFIG_BLOCK.pack(index, num))

    def _vdev_reset(self, sch: Subchannel, ccw: Ccw) -> Completion:
        """The reset is complete when the command ends (spec 4.3.3.3)."""
        self._reset()
        return ok(0)

    def _reset(self) -> None:
        self.dev.write_status(0)
        self.indicators = self.indicators2 = 0
        self.summary = self.adapter_ind = self.bit_nr = 0

    def _indicator_addr(self, sch: Subchannel, ccw: Ccw) -> int | Completion:
        data = sch.fetch(ccw, C.INDICATOR_ADDR.size)
        if isinstance(data, Completion):
            return data
        (addr,) = C.INDICATOR_ADDR.unpack(data)
        if addr == 0:
            return 0
        if (addr - self.mem.base) % 8 or not self.mem.check(addr, 8):
            return reject(f"indicators at 0x{addr:x}: not an aligned 64-bit word in guest RAM")
        return addr

    def _set_ind(self, sch: Subchannel, ccw: Ccw) -> Completion:
        if self.thinint:
            return reject("SET_IND after SET_IND_ADAPTER set up adapter indicators")
        if len(self.dev.queues) > C.NR_CLASSIC_INDICATOR_BITS:
            return reject(f"{len(self.dev.queues)} queues do not fit 64 classic indicators")
        addr = self._indicator_addr(sch, ccw)
        if isinstance(addr, Completion):
            return addr
        self.indicators = addr
        if addr:
            self.irq_mode = "classic"
        return ok(ccw.count - C.INDICATOR_ADDR.size)

    def _set_conf_ind(self, sch: Subchannel, ccw: Ccw) -> Completion:
        addr = self._indicator_addr(sch, ccw)
        if isinstance(addr, Completion):
            return addr
        self.indicators2 = addr
        return ok(ccw.count - C.INDICATOR_ADDR.size)

    def _set_ind_adapter(self, sch: Subchannel, ccw: Ccw) -> Completion:
        data = sch.fetch(ccw, C.THININT_AREA.size)
        if isinstance(data, Completion):
            return data
        if not self.adapter_supported:
            return reject("adapter interrupts are not offered by this host")
        if self.indicators and not self.thinint:
            return reject("SET_IND_ADAPTER after SET_IND set up classic indicators")
        summary, ind, bit_nr, isc = C.THININT_AREA.unpack(data)
        residual = ccw.count - C.THININT_AREA.size
        if ind == 0:
            self.summary = self.adapter_ind = self.bit_nr = 0     # deregistered
            return ok(residual)
        nq = len(self.dev.queues)
        mem = self.mem
        if isc > C.MAX_ISC:
            return reject(f"SET_IND_ADAPTER with interruption subclass {isc}")
        last_byte = (bit_nr + nq - 1) // 8
        if not mem.check(summary, 1) or not mem.check(ind, last_byte + 1):
            return reject(f"adapter indicators (summary 0x{summary:x}, area 0x{ind:x} bit "
                          f"{bit_nr}) outside guest RAM")
        self.summary, self.adapter_ind, self.bit_nr, self.isc = summary, ind, bit_nr, isc
        self.indicators = 0
        self.irq_mode = "adapter"
        return ok(residual)

    _commands = {
        C.CCW_CMD_READ_FEAT: _read_feat, C.CCW_CMD_WRITE_FEAT: _write_feat,
        C.CCW_CMD_READ_CONF: _read_conf, C.CCW_CMD_WRITE_CONF: _write_conf,
        C.CCW_CMD_WRITE_STATUS: _write_status, C.CCW_CMD_READ_STATUS: _read_status,
        C.CCW_CMD_SET_VQ: _set_vq, C.CCW_CMD_READ_VQ_CONF: _read_vq_conf,
        C.CCW_CMD_VDEV_RESET: _vdev_reset, C.CCW_CMD_SET_IND: _set_ind,
        C.CCW_CMD_SET_CONF_IND: _set_conf_ind, C.CCW_CMD_SET_IND_ADAPTER: _set_ind_adapter,
    }

    def describe(self) -> dict:
        sch = self.sch
        return {"schid": sch.schid, "bus_id": sch.bus_id, "devno": sch.devno,
                "revision": self.revision, "irq_mode": self.irq_mode or "none",
                "isc": self.isc if self.irq_mode == "adapter" else sch.isc,
                "io_interrupts": self.n_io_interrupts,
                "adapter_interrupts": self.n_adapter_interrupts,
                "adapter_interrupts_suppressed": self.n_adapter_suppressed,
                "notifications_without_indicators": self.n_lost,
                "commands": dict(self.n_commands), "subchannel": sch.counters(),
                "css": self.css.counters()}

    def close(self) -> None:
        self.sch.close()
        if self.css.first() is self.sch:
            self.css.close()
