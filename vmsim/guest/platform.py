"""The machine as the guest kernel sees it.

- Register accesses (readl / writel ...) trap to the host: each is one synchronous request on
  the trap channel, a VM exit, answered by the host's transport emulation.
- Writes that match a registered ioeventfd (address and value, KVM's datamatch) do not exit:
  they signal the eventfd the host polls, as KVM does for virtio notify registers.
- Interrupts arrive on irqfds; the interrupt thread waits on them and runs the handlers that
  drivers registered with request_irq, as a CPU takes an interrupt.
"""

import contextlib
import logging
import select
import threading
from collections import deque
from collections.abc import Callable, Iterator

from vmsim.machine.eventfd import EventFd
from vmsim.machine.wire import Channel, ChannelClosed

log = logging.getLogger("vmsim.guest")

# The interrupt thread's safety net: it wakes this often even without an interrupt and lets
# each line's poll hook look for work a lost wake-up would have left (counted, expected 0).
IRQ_SAFETY_TIMEOUT_MS = 20


class TrapError(RuntimeError):
    """The host refused or failed a trapped access (or went away)."""


class Platform:
    """Trapped register access and ioeventfd routing (the guest's view of the bus): the
    memory space (readl / writel ...), the I/O port space (inb / outl ...), and the channel
    subsystem's instructions (css)."""

    def __init__(self, channel: Channel) -> None:
        self.channel = channel
        # (space, address, datamatch) -> eventfd; space "mmio", "pio" or "css"
        self._ioeventfds: dict[tuple[str, int, int], EventFd] = {}
        self.exits = 0
        self.exits_by_kind: dict[str, int] = {}
        self.ioeventfd_writes = 0

    def bind_ioeventfd(self, addr: int, datamatch: int, efd: EventFd,
                       space: str = "mmio") -> None:
        self._ioeventfds[(space, addr, datamatch)] = efd

    def unbind_ioeventfds(self, lo: int, hi: int, space: str = "mmio") -> None:
        for key in [k for k in self._ioeventfds if k[0] == space and lo <= k[1] < hi]:
            del self._ioeventfds[key]

    def _trap(self, kind: str, msg: tuple) -> object:
        self.exits += 1
        self.exits_by_kind[kind] = self.exits_by_kind.get(kind, 0) + 1
        reply, _fds = self.channel.call(msg)
        return reply

    def read(self, addr: int, width: int) -> int:
        reply = self._trap("mmio_read", ("r", addr, width))
        if isinstance(reply, int):
            return reply
        raise TrapError(f"read of 0x{addr:x}: {reply}")

    def write(self, addr: int, width: int, value: int) -> None:
        efd = self._ioeventfds.get(("mmio", addr, value))
        if efd is not None and width in (2, 4):
            self.ioeventfd_writes += 1
            efd.signal()
            return
        reply = self._trap("mmio_write", ("w", addr, width, value))
        if reply is not None:
            raise TrapError(f"write of 0x{addr:x}: {reply}")

    def io_read(self, port: int, width: int) -> int:
        reply = self._trap("pio_read", ("ir", port, width))
        if isinstance(reply, int):
            return reply
        raise TrapError(f"in of port 0x{port:x}: {reply}")

    def io_write(self, port: int, width: int, value: int) -> None:
        efd = self._ioeventfds.get(("pio", port, value))
        if efd is not None:
            self.ioeventfd_writes += 1
            efd.signal()
            return
        reply = self._trap("pio_write", ("iw", port, width, value))
        if reply is not None:
            raise TrapError(f"out to port 0x{port:x}: {reply}")

    def css(self, *args: object) -> object:
        """A channel-subsystem instruction (s390's SSCH, TSCH, ...), trapped."""
        return self._trap(f"css_{args[0]}", ("css", *args))

    def hypercall_notify(self, subchannel: int, queue: int, cookie: int = 0) -> object:
        """s390's diagnose 0x500 virtio notify: an ioeventfd if one is bound for the
        subchannel and queue (KVM's virtio-ccw notify ioeventfd), otherwise a trap."""
        efd = self._ioeventfds.get(("css", subchannel, queue))
        if efd is not None:
            self.ioeventfd_writes += 1
            efd.signal()
            return cookie
        return self.css("notify", subchannel, queue, cookie)

    def inb(self, port: int) -> int:
        return self.io_read(port, 1)

    def inw(self, port: int) -> int:
        return self.io_read(port, 2)

    def inl(self, port: int) -> int:
        return self.io_read(port, 4)

    def outb(self, port: int, value: int) -> None:
        self.io_write(port, 1, value)

    def outw(self, port: int, value: int) -> None:
        self.io_write(port, 2, value)

    def outl(self, port: int, value: int) -> None:
        self.io_write(port, 4, value)

    def readb(self, addr: int) -> int:
        return self.read(addr, 1)

    def readw(self, addr: int) -> int:
        return self.read(addr, 2)

    def readl(self, addr: int) -> int:
        return self.read(addr, 4)

    def writeb(self, addr: int, value: int) -> None:
        self.write(addr, 1, value)

    def writew(self, addr: int, value: int) -> None:
        self.write(addr, 2, value)

    def writel(self, addr: int, value: int) -> None:
        self.write(addr, 4, value)


class IrqLine:
    __slots__ = ("efd", "handler", "irq", "name", "poll_hook")

    def __init__(self, irq: object, efd: EventFd) -> None:
        self.irq = irq
        self.efd = efd
        self.handler: Callable[[object], bool] | None = None
        self.poll_hook: Callable[[], None] | None = None
        self.name = ""


class IrqController:
    """Interrupt lines backed by irqfds, and the thread that takes them."""

    def __init__(self) -> None:
        self._lines: dict[object, IrqLine] = {}   # by line: an irq number, "msix:...", ...
        self._by_fd: dict[int, IrqLine] = {}
        self._ep = select.epoll()
        self._wake = EventFd()
        self._ep.register(self._wake.fileno(), select.EPOLLIN)
        self._thread: threading.Thread | None = None
        self._stop = False
        self.handled = 0
        self.unhandled = 0
        self.safety_wakeups = 0
        self.error: BaseException | None = None
        # Held while a handler or poll hook runs: synchronize_irq waits on it (reentrant, so
        # a handler that frees an irq does not wait for itself).
        self._running = threading.RLock()
        # Work a handler left for later (schedule): run after the interrupts of each pass.
        self._deferred: deque[Callable[[], None]] = deque()
        self.deferred_runs = 0

    def add_line(self, irq: object, efd: EventFd) -> None:
        line = IrqLine(irq, efd)
        self._lines[irq] = line
        self._by_fd[efd.fileno()] = line
        self._ep.register(efd.fileno(), select.EPOLLIN)

    def request_irq(self, irq: object, handler: Callable[[object], bool], name: str,
                    poll_hook: Callable[[], None] | None = None) -> None:
        """Install `handler(irq) -> handled` on a line (one handler per line here)."""
        line = self._lines.get(irq)
        if line is None:
            raise ValueError(f"no interrupt line {irq}")
        if line.handler is not None:
            raise ValueError(f"interrupt line {irq} is already used by {line.name}")
        line.name = name
        line.poll_hook = poll_hook
        line.handler = handler

    def schedule(self, work: Callable[[], None]) -> None:
        """Run `work` on this thread after the interrupts now pending (NAPI's napi_schedule):
        a handler with more to do than its budget returns and continues there, so that one
        busy device does not keep the others' interrupts waiting. Called from a handler."""
        self._deferred.append(work)

    def free_irq(self, irq: object) -> None:
        """Remove a line's handler; as Linux's, returns only once no handler runs any more."""
        line = self._lines.get(irq)
        if line is not None:
            line.handler = None
            line.poll_hook = None
        self.synchronize_irq()

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        """No handler runs inside this block (disable_irq / enable_irq for every line):
        interrupts that arrive wait, and are taken after it."""
        with self._running:
            yield

    def synchronize_irq(self) -> None:
        """Wait for a handler that is running now to return (synchronize_irq): after it, a
        handler that starts sees whatever the caller changed before."""
        with self._running:
            pass

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="vmsim-irq", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop = True
        self._wake.signal()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    def _run(self) -> None:
        try:
            deferred = self._deferred
            while not self._stop:
                events = self._ep.poll(0 if deferred else IRQ_SAFETY_TIMEOUT_MS / 1000)
                if not events and not deferred:
                    self.safety_wakeups += 1
                    with self._running:
                        for line in list(self._lines.values()):
                            hook = line.poll_hook
                            if hook is not None:
                                hook()
                    continue
                with self._running:
                    for fd, _ in events:
                        line = self._by_fd.get(fd)
                        if line is None:
                            continue
                        line.efd.consume()
                        handler = line.handler
                        if handler is None:
                            self.unhandled += 1
                        elif handler(line.irq):
                            self.handled += 1
                        else:
                            self.unhandled += 1
                    # what handlers left for later, once each (what they schedule again
                    # waits for the next pass, after the interrupts that came meanwhile)
                    for _ in range(len(deferred)):
                        deferred.popleft()()
                        self.deferred_runs += 1
        except ChannelClosed as e:   # the host went away mid-exit; the main thread reports it
            self.error = e
        except BaseException as e:  # a guest bug: the main thread reports it
            log.exception("interrupt thread failed")
            self.error = e
