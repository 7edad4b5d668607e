"""Network workloads: echo ping-pong between VMs, a verified stream (per-frame sequence
numbers and checksums, loss / reordering / corruption counted, flows spread over queue pairs),
and an IPv4 responder (ARP and ICMP echo) so that a real host can ping a guest.

They run where the frames arrive (the interrupt thread); `tick` runs on the guest's main
thread a few times a second for timeouts.
"""

import struct
import threading
import time
from typing import Any

from vmsim.abi import net as N
from vmsim.guest.drivers.net import EAGAIN, VirtioNet
from vmsim.guest.memory import DmaMemory
from vmsim.guest.virtio.core import VirtioDevice
from vmsim.guest.workloads import Workload, WorkloadError
from vmsim.guest.workloads import net_frames as NF


class NetWorkload(Workload):
    def __init__(self, name: str, spec: dict[str, Any], devices: dict[str, VirtioDevice],
                 stats: memoryview | None, dma: DmaMemory | None = None) -> None:
        super().__init__(name, spec, devices, stats)
        dev = self.device(spec["device"])
        if not isinstance(dev.priv, VirtioNet):
            raise WorkloadError(f"workload {name}: device {spec['device']!r} is not a "
                                f"network device")
        self.net: VirtioNet = dev.priv
        self.lock = threading.RLock()

    def peer_mac(self) -> bytes:
        peer = self.spec.get("peer_mac")
        if not peer:
            raise WorkloadError(f"workload {self.name}: no peer MAC address")
        return N.parse_mac(peer)

    def tick(self, now_ns: int) -> None:
        pass


class NetEcho(NetWorkload):
    """Answers echo requests (the other side of net-ping)."""

    kind = "net-echo"

    def start(self) -> None:
        super().start()
        self.net.register(NF.ETH_P_VMSIM, self._on_frame)
        self.idle_event.set()

    def _on_frame(self, frame: bytes, flags: int, cs: int, co: int, pair: int) -> None:
        kind, flow, seq, t, ok, payload = NF.parse_test(frame)
        if kind != NF.KIND_ECHO_REQUEST or self.stopping:
            return
        if not ok:
            self.error(f"echo request {seq}: payload corrupted")
            return
        reply = NF.test_frame(frame[6:12], self.net.mac, NF.KIND_ECHO_REPLY, flow, seq, t,
                              payload)
        if self.net.send(reply, flow) == 0:
            self.ops += 1
            self.bytes += len(payload)

    def stop(self) -> None:
        self.stopping = True
        self._finish()


class NetPing(NetWorkload):
    """Sends echo requests to a peer one at a time and times the replies."""

    kind = "net-ping"

    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.peer = self.peer_mac()
        self.count = self.spec.get("count")
        self.payload = bytes(range(256)) * (int(self.spec.get("size", 64)) // 256 + 1)
        self.payload = self.payload[:int(self.spec.get("size", 64))]
        self.timeout_ns = int(self.spec.get("timeout_ms", 1000)) * 1_000_000
        # Until the peer first answers (its workload may start a moment after this one, as a
        # real peer may still be coming up), an unanswered request is a probe, not a loss.
        self.peer_wait_ns = int(self.spec.get("peer_wait_ms", 10_000)) * 1_000_000
        self.first_sent_ns = 0
        self.answered = False
        self.probes = 0
        self.late = 0
        self.seq = 0
        self.sent_ns = 0
        self.waiting = False
        self.rtts: list[int] = []
        self.lost = 0

    def start(self) -> None:
        super().start()
        self.net.register(NF.ETH_P_VMSIM, self._on_frame)
        self.idle_event.clear()
        self._send_next()

    def _send_next(self) -> None:
        with self.lock:
            if self.stopping or (self.count is not None and self.seq >= self.count):
                self.waiting = False
                self.idle_event.set()
                self._finish()
                return
            self.seq += 1
            self.sent_ns = time.monotonic_ns()
            if not self.first_sent_ns:
                self.first_sent_ns = self.sent_ns
            frame = NF.test_frame(self.peer, self.net.mac, NF.KIND_ECHO_REQUEST, 0, self.seq,
                                  self.sent_ns, self.payload)
            self.waiting = self.net.send(frame) == 0

    def _on_frame(self, frame: bytes, flags: int, cs: int, co: int, pair: int) -> None:
        kind, _flow, seq, t, ok, _payload = NF.parse_test(frame)
        if kind != NF.KIND_ECHO_REPLY:
            return
        with self.lock:
            if self.stopping:
                return
            if seq < self.seq or (seq == self.seq and not self.waiting):
                self.late += 1          # the reply to a request already given up on
                return
            if seq != self.seq:
                self.error(f"reply {seq} to a request never sent (last sent {self.seq})")
                return
            self.answered = True
            if not ok:
                self.error(f"reply {seq}: payload corrupted")
            self.waiting = False
            self.ops += 1
            self.bytes += len(self.payload)
            self.rtts.append(time.monotonic_ns() - t)
        self._send_next()

    def tick(self, now_ns: int) -> None:
        with self.lock:
            late = now_ns - self.sent_ns > self.timeout_ns
            if self.finished_event.is_set() or not late:
                return
            if self.waiting and not self.answered \
                    and now_ns - self.first_sent_ns < self.peer_wait_ns:
                self.probes += 1
            elif self.waiting:
                self.lost += 1
                what, ns = (("within", self.timeout_ns) if self.answered
                            else ("from the peer at all in", self.peer_wait_ns))
                self.error(f"request {self.seq}: no reply {what} {ns // 1e6:.0f} ms")
        self._send_next()

    def stop(self) -> None:
        """Stop now: a request still waiting for its reply is abandoned, not lost (its peer
        may be stopping too)."""
        with self.lock:
            self.stopping = True
            self.waiting = False
            self.idle_event.set()
            self._finish()

    def report(self) -> dict[str, Any]:
        r = super().report()
        rt = sorted(self.rtts)
        if rt:
            r["rtt_us"] = {"p50": round(rt[len(rt) // 2] / 1e3, 1),
                           "p99": round(rt[min(len(rt) - 1, len(rt) * 99 // 100)] / 1e3, 1),
                           "min": round(rt[0] / 1e3, 1)}
        r["lost"] = self.lost
        r["probes"] = self.probes       # requests sent before the peer first answered
        r["late"] = self.late           # replies that came after their request timed out
        return r


class NetStream(NetWorkload):
    """Sends `frames` frames over `flows` flows to a net-sink, at most `window` ahead of what
    the sink acknowledged; each carries a sequence number per flow and a payload checksum."""

    kind = "net-stream"

    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        s = self.spec
        self.peer = self.peer_mac()
        self.frames = s.get("frames")
        self.flows = max(1, int(s.get("flows", 1)))
        self.window = max(1, int(s.get("window", 128)))
        size = max(0, int(s.get("size", 256)))
        self.payload = (bytes(range(251)) * (size // 251 + 1))[:size]
        self.csum_offload = bool(s.get("csum_offload", False))
        self.src_ip = bytes(int(x) for x in s.get("src_ip", "10.77.0.1").split("."))
        self.dst_ip = bytes(int(x) for x in s.get("dst_ip", "10.77.0.2").split("."))
        self.sent = 0
        self.acked = 0
        self.flow_seq = [0] * self.flows
        self.last_progress = 0
        self.stalls = 0
        self.outstanding = 0

    def start(self) -> None:
        super().start()
        self.net.register(NF.ETH_P_VMSIM, self._on_frame)
        self.net.tx_listeners.append(self._on_tx_free)
        self.idle_event.clear()
        self.last_progress = time.monotonic_ns()
        self._pump()

    def _pump(self) -> None:
        with self.lock:
            while (not self.stopping and self.sent - self.acked < self.window
                   and (self.frames is None or self.sent < self.frames)):
                flow = self.sent % self.flows
                seq = self.flow_seq[flow]
                now = time.monotonic_ns()
                if self.csum_offload:
                    frame, cstart, coff = NF.udp_stream_frame(
                        self.peer, self.net.mac, self.src_ip, self.dst_ip, flow, seq, now,
                        self.payload)
                    err = self.net.send(frame, flow, (cstart, coff))
                else:
                    frame = NF.test_frame(self.peer, self.net.mac, NF.KIND_STREAM, flow, seq,
                                          now, self.payload)
                    err = self.net.send(frame, flow)
                if err == EAGAIN:
                    return                     # a transmit completion calls us again
                if err:
                    self.error(f"send failed: errno {-err}")
                    return
                self.flow_seq[flow] = seq + 1
                self.sent += 1
            self._check_done()

    def _check_done(self) -> None:
        if self.acked >= self.sent and (self.stopping or (self.frames is not None
                                                          and self.sent >= self.frames)):
            self.idle_event.set()
            self._finish()

    def _on_tx_free(self, pair: int) -> None:
        self._pump()

    def _on_frame(self, frame: bytes, flags: int, cs: int, co: int, pair: int) -> None:
        kind, _flow, seq, _t, _ok, _payload = NF.parse_test(frame)
        if kind != NF.KIND_ACK:
            return
        with self.lock:
            if seq > self.acked:
                newly = seq - self.acked
                self.acked = seq
                self.ops += newly
                self.bytes += newly * len(self.payload)
                self.last_progress = time.monotonic_ns()
        self._pump()

    def tick(self, now_ns: int) -> None:
        with self.lock:
            stalled = (self.sent > self.acked
                       and now_ns - self.last_progress > 1_000_000_000)
            if stalled:
                # the sink lost frames or acks: count it, and give up on those frames
                self.stalls += 1
                self.error(f"no acknowledgement for 1 s ({self.sent - self.acked} frames "
                           f"outstanding)")
                self.acked = self.sent
                self.last_progress = now_ns
        self._pump()

    def stop(self) -> None:
        """Stop sending; frames not yet acknowledged are abandoned (the sink may be stopping
        too), and reported as outstanding."""
        with self.lock:
            self.stopping = True
            self.outstanding = self.sent - self.acked
            self.idle_event.set()
            self._finish()

    def report(self) -> dict[str, Any]:
        r = super().report()
        r.update(sent=self.sent, acked=self.acked, flows=self.flows, stalls=self.stalls,
                 outstanding_at_stop=self.outstanding)
        return r


class NetSink(NetWorkload):
    """Receives a net-stream: checks each frame's flow sequence and checksum, counts loss,
    reordering, duplicates and corruption, the frames per receive queue pair, and
    acknowledges progress so the sender can keep its window."""

    kind = "net-sink"
    ACK_EVERY = 16

    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.expect = self.spec.get("expect")
        self.next_seq: dict[int, int] = {}
        self.received = 0
        self.lost = self.reordered = self.corrupted = 0
        self.per_pair: dict[int, int] = {}
        self.sender: bytes | None = None
        self.unacked = 0
        self.csum_partial = self.csum_valid = self.csum_checked = 0

    def start(self) -> None:
        super().start()
        self.net.register(NF.ETH_P_VMSIM, self._on_frame)
        self.net.register(NF.ETH_P_IP, self._on_ip)
        self.idle_event.set()

    def _on_ip(self, frame: bytes, flags: int, cs: int, co: int, pair: int) -> None:
        if len(frame) < N.ETH_HLEN + NF.IP_HLEN + NF.UDP_HLEN or frame[23] != 17:
            return
        if flags & N.VIRTIO_NET_HDR_F_NEEDS_CSUM:
            # CHECKSUM_PARTIAL: the sender's stack asked for it; complete and check
            self.csum_partial += 1
            good = NF.udp_checksum_ok(NF.complete_partial(frame, cs, co))
        elif flags & N.VIRTIO_NET_HDR_F_DATA_VALID:
            self.csum_valid += 1
            good = True
        else:
            self.csum_checked += 1
            good = NF.udp_checksum_ok(frame)
        self._account(frame, N.ETH_HLEN + NF.IP_HLEN + NF.UDP_HLEN, pair, good)

    def _on_frame(self, frame: bytes, flags: int, cs: int, co: int, pair: int) -> None:
        self._account(frame, N.ETH_HLEN, pair, True)

    def _account(self, frame: bytes, offset: int, pair: int, csum_good: bool) -> None:
        kind, flow, seq, _t, ok, payload = NF.parse_test(frame, offset)
        if kind != NF.KIND_STREAM:
            return
        with self.lock:
            self.sender = frame[6:12]
            self.received += 1
            self.per_pair[pair] = self.per_pair.get(pair, 0) + 1
            expected = self.next_seq.get(flow, 0)
            if not ok or not csum_good:
                self.corrupted += 1
                self.error(f"flow {flow} frame {seq}: "
                           f"{'payload' if not ok else 'UDP checksum'} corrupted")
            if seq == expected:
                self.next_seq[flow] = seq + 1
            elif seq > expected:
                self.lost += seq - expected
                self.error(f"flow {flow}: frames {expected}..{seq - 1} lost")
                self.next_seq[flow] = seq + 1
            else:
                self.reordered += 1
                self.error(f"flow {flow}: frame {seq} after {expected - 1} (reordered or "
                           f"duplicated)")
            self.ops += 1
            self.bytes += len(payload)
            self.unacked += 1
            if self.unacked >= self.ACK_EVERY:
                self._ack()
            if self.expect is not None and self.received >= self.expect:
                self._ack()
                self._finish()

    def _ack(self) -> None:
        if self.sender is None:
            return
        self.unacked = 0
        frame = NF.test_frame(self.sender, self.net.mac, NF.KIND_ACK, 0, self.received,
                              time.monotonic_ns(), b"")
        self.net.send(frame)

    def tick(self, now_ns: int) -> None:
        with self.lock:
            if self.unacked:
                self._ack()

    def stop(self) -> None:
        with self.lock:
            self.stopping = True
            if self.expect is not None and self.received < self.expect:
                missing = self.expect - self.received
                self.lost += missing
                self.error(f"{missing} of {self.expect} frames never arrived")
            self._finish()

    def report(self) -> dict[str, Any]:
        r = super().report()
        r.update(received=self.received, lost=self.lost, reordered=self.reordered,
                 corrupted=self.corrupted,
                 per_queue_pair={str(k): v for k, v in sorted(self.per_pair.items())},
                 csum={"partial": self.csum_partial, "data_valid": self.csum_valid,
                       "checked": self.csum_checked})
        return r


class NetResponder(NetWorkload):
    """An IPv4 host on the device: answers ARP requests for its address and ICMP echo
    requests to it, so that `ping` from the real host (through a TAP) reaches the guest."""

    kind = "net-responder"

    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        try:
            self.ip = bytes(int(x) for x in str(self.spec["ip"]).split("."))
        except (KeyError, ValueError):
            raise WorkloadError(f"workload {self.name}: ip must be an IPv4 address") from None
        self.arp_replies = 0

    def start(self) -> None:
        super().start()
        self.net.register(NF.ETH_P_ARP, self._on_arp)
        self.net.register(NF.ETH_P_IP, self._on_ip)
        self.idle_event.set()

    def _on_arp(self, frame: bytes, flags: int, cs: int, co: int, pair: int) -> None:
        arp = frame[N.ETH_HLEN:N.ETH_HLEN + 28]
        if len(arp) < 28:
            return
        htype, ptype, hlen, plen, op = struct.unpack_from("!HHBBH", arp)
        tpa = arp[24:28]
        if (htype, ptype, hlen, plen, op) != (1, 0x0800, 6, 4, 1) or tpa != self.ip:
            return
        sha, spa = arp[8:14], arp[14:18]
        reply = (NF.ETH.pack(sha, self.net.mac, NF.ETH_P_ARP)
                 + struct.pack("!HHBBH", 1, 0x0800, 6, 4, 2)
                 + self.net.mac + self.ip + sha + spa)
        if self.net.send(reply) == 0:
            self.arp_replies += 1
            self.other += 1

    def _on_ip(self, frame: bytes, flags: int, cs: int, co: int, pair: int) -> None:
        ip = frame[N.ETH_HLEN:]
        if len(ip) < 20 or ip[0] >> 4 != 4 or ip[9] != 1 or ip[16:20] != self.ip:
            return
        ihl = (ip[0] & 0xF) * 4
        total = struct.unpack_from("!H", ip, 2)[0]
        icmp = bytearray(ip[ihl:total])
        if len(icmp) < 8 or icmp[0] != 8:           # echo request
            return
        if N.internet_checksum(bytes(icmp)) != 0:
            self.error("ICMP echo request with a bad checksum")
            return
        icmp[0] = 0                                # echo reply
        icmp[2:4] = b"\0\0"
        struct.pack_into("!H", icmp, 2, N.internet_checksum(bytes(icmp)))
        hdr = bytearray(ip[:ihl])
        hdr[8] = 64
        hdr[12:16], hdr[16:20] = ip[16:20], ip[12:16]
        hdr[10:12] = b"\0\0"
        struct.pack_into("!H", hdr, 10, N.internet_checksum(bytes(hdr)))
        reply = NF.ETH.pack(frame[6:12], self.net.mac, NF.ETH_P_IP) + bytes(hdr) + bytes(icmp)
        if self.net.send(reply) == 0:
            self.ops += 1
            self.bytes += len(icmp)

    def stop(self) -> None:
        self.stopping = True
        self._finish()

    def report(self) -> dict[str, Any]:
        r = super().report()
        r["arp_replies"] = self.arp_replies
        return r


NET_WORKLOADS = {c.kind: c for c in (NetEcho, NetPing, NetStream, NetSink, NetResponder)}

