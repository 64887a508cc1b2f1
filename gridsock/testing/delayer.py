"""A packet delayer for the grid lab: hold packets on an NFQUEUE, release them after a delay.

The lab's kernel has no ``netem`` qdisc, so WAN latency and loss are made in user space: an
iptables rule (``-j NFQUEUE --queue-num N --queue-bypass``) hands packets to this process, which
answers each with a verdict (accept or drop) once its delay has passed. It speaks the
nfnetlink_queue protocol directly over an ``AF_NETLINK``/``NETLINK_NETFILTER`` socket: no
libnetfilter_queue, no extra package.

Theory of operation
-------------------
Codec (no I/O): :func:`encode_config` binds a queue and sets it up, :func:`encode_verdicts`
answers packets, :func:`parse_messages` turns what the socket reads into :class:`Packet` and
:class:`Ack` records. The kernel sends one ``NFQNL_MSG_PACKET`` per queued packet with a
packet id; the packet stays in the kernel until a ``NFQNL_MSG_VERDICT`` names that id. Only the
first COPY_RANGE_BYTES of each packet are copied to us (enough for the flow key). Without loss,
GSO packets are queued whole (``NFQA_CFG_F_GSO``), so a 64 KiB TCP burst costs one message;
with loss, the kernel cuts them into wire packets first, so each wire packet draws its own fate.

Scheduler (no I/O): :class:`DelayScheduler` decides each packet's fate when it arrives: dropped
at once (a ``loss`` draw, or more than ``max_held`` packets held), or held until
``arrival + delay + uniform(-jitter, +jitter)``. Held packets sit in a heap ordered by release
time, then arrival. Invariant: packets of one flow (addresses, protocol, ports) leave in the
order they came: with a constant delay release times only grow; with jitter a packet is never
released before the previous packet of its flow.

Driver: :func:`serve_delayer` binds the queue, calls ``on_ready``, then loops: read every
waiting packet message, admit it, send one batch of verdicts for every packet due, sleep in
``select`` until the next release or the next packet. It returns when ``stop_fd`` becomes
readable: every packet held or still unread is accepted at once and the socket closed, which
unbinds the queue. Packets the kernel queues after that moment are dropped by the kernel (TCP
retransmits them); with ``--queue-bypass`` on the rule, packets flow undelayed while no process
is bound, so a dead delayer never cuts the network.

Queues are per network namespace: a delayer serves the queue number of the namespace it runs in.

Command line: ``python -m gridsock.testing.delayer --queue N --delay-ms D [--jitter-ms J]
[--loss P] [--seed S]``; prints ``ready`` once bound and runs until SIGTERM or SIGINT.
"""
from __future__ import annotations

import argparse
import errno
import heapq
import itertools
import logging
import os
import random
import select
import signal
import socket
import struct
import sys
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence, Union

from gridsock.errors import ConfigError, RemoteProtocolError

__all__ = [
    "MAX_HELD_PACKETS",
    "COPY_RANGE_BYTES",
    "NF_DROP",
    "NF_ACCEPT",
    "Packet",
    "Ack",
    "encode_config",
    "encode_verdicts",
    "parse_messages",
    "flow_key",
    "DelayScheduler",
    "serve_delayer",
    "main",
]

log = logging.getLogger(__name__)

# -- limits ---------------------------------------------------------------------------------------

MAX_HELD_PACKETS = 10_000  # a router's buffer: ~100 ms of full-size packets at 1 Gbit/s, then drop
COPY_RANGE_BYTES = 64  # an IPv4 header with options (60 bytes) and the 4 bytes of ports
RCVBUF_BYTES = 8 << 20  # ~40,000 packet messages of ~200 bytes: bursts wait here, not in drops
RECV_BYTES = 65536  # one netlink datagram; with COPY_RANGE_BYTES a message is ~200 bytes
MAX_READS_PER_ROUND = 256  # then release what is due, so a flood cannot starve the releases
MAX_VERDICTS_PER_SEND = 512  # 32 bytes each: one 16 KiB datagram
BIND_TIMEOUT_S = 5.0  # the kernel answers a config request at once; this is for a loaded machine

# -- nfnetlink_queue protocol (linux/netlink.h, linux/netfilter/nfnetlink*.h) ------------------------

NETLINK_NETFILTER = 12
SO_RCVBUFFORCE = 33
SOL_NETLINK = 270
NETLINK_NO_ENOBUFS = 5

NLMSG_HDR = struct.Struct("=IHHII")  # len, type, flags, seq, portid: host byte order
NFGEN_HDR = struct.Struct("!BBH")  # family, version, res_id (the queue number): network order
NLA_HDR = struct.Struct("=HH")  # len (with this header), type
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLA_TYPE_MASK = 0x3FFF  # drops NLA_F_NESTED and NLA_F_NET_BYTEORDER
NFNETLINK_V0 = 0

NFNL_SUBSYS_QUEUE = 3
NFQNL_MSG_PACKET = NFNL_SUBSYS_QUEUE << 8 | 0
NFQNL_MSG_VERDICT = NFNL_SUBSYS_QUEUE << 8 | 1
NFQNL_MSG_CONFIG = NFNL_SUBSYS_QUEUE << 8 | 2

NFQA_PACKET_HDR = 1  # struct nfqnl_msg_packet_hdr: be32 packet_id, be16 hw_protocol, u8 hook
NFQA_VERDICT_HDR = 2  # struct nfqnl_msg_verdict_hdr: be32 verdict, be32 id
NFQA_PAYLOAD = 10
NFQA_CAP_LEN = 13  # the packet's real length, present when the payload was cut at the copy range

NFQA_CFG_CMD = 1  # struct nfqnl_msg_config_cmd: u8 command, u8 pad, be16 pf
NFQA_CFG_PARAMS = 2  # struct nfqnl_msg_config_params: be32 copy_range, u8 copy_mode (packed)
NFQA_CFG_QUEUE_MAXLEN = 3  # be32
NFQA_CFG_MASK = 4  # be32: which flags NFQA_CFG_FLAGS sets
NFQA_CFG_FLAGS = 5  # be32
NFQNL_CFG_CMD_BIND = 1
NFQNL_COPY_PACKET = 2
NFQA_CFG_F_GSO = 0x4  # queue GSO packets whole instead of segmenting them first

NF_DROP = 0
NF_ACCEPT = 1

IPPROTO_WITH_PORTS = (6, 17, 33, 132, 136)  # TCP, UDP, DCCP, SCTP, UDP-Lite: ports lead the header


# -- codec ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Packet:
    """A queued packet: its id (for the verdict), the queue, and the first bytes of its IP packet."""

    packet_id: int
    queue: int
    payload: bytes


@dataclass(frozen=True)
class Ack:
    """The kernel's answer to a request: ``error`` is 0 or a positive errno."""

    seq: int
    error: int


Message = Union[Packet, Ack]


def _attr(attr_type: int, value: bytes) -> bytes:
    raw = NLA_HDR.pack(NLA_HDR.size + len(value), attr_type) + value
    return raw + b"\0" * (-len(raw) % 4)


def _message(msg_type: int, flags: int, seq: int, queue: int, attrs: bytes) -> bytes:
    body = NFGEN_HDR.pack(socket.AF_UNSPEC, NFNETLINK_V0, queue) + attrs
    return NLMSG_HDR.pack(NLMSG_HDR.size + len(body), msg_type, flags, seq, 0) + body


def encode_config(
    queue: int,
    *,
    seq: int = 1,
    max_held: int = MAX_HELD_PACKETS,
    copy_range: int = COPY_RANGE_BYTES,
    gso: bool = True,
) -> bytes:
    """Return the request that binds ``queue`` to the sending socket and sets it up.

    Copy mode "packet" cut at ``copy_range`` bytes, at most ``max_held`` packets waiting for a
    verdict (the kernel drops the rest), GSO packets queued whole when ``gso`` (else the kernel
    cuts them into wire packets first). The kernel acks it (NLM_F_ACK).
    """
    if not 0 <= queue <= 0xFFFF:
        raise ConfigError(f"NFQUEUE number {queue} out of range 0..65535")
    attrs = (
        _attr(NFQA_CFG_CMD, struct.pack("!BBH", NFQNL_CFG_CMD_BIND, 0, socket.AF_INET))
        + _attr(NFQA_CFG_PARAMS, struct.pack("!IB", copy_range, NFQNL_COPY_PACKET))
        + _attr(NFQA_CFG_QUEUE_MAXLEN, struct.pack("!I", max_held))
        + _attr(NFQA_CFG_MASK, struct.pack("!I", NFQA_CFG_F_GSO))
        + _attr(NFQA_CFG_FLAGS, struct.pack("!I", NFQA_CFG_F_GSO if gso else 0))
    )
    return _message(NFQNL_MSG_CONFIG, NLM_F_REQUEST | NLM_F_ACK, seq, queue, attrs)


_VERDICT_HDR = struct.Struct("!II")


def encode_verdicts(queue: int, verdicts: Iterable[tuple[int, int]]) -> bytes:
    """Return one datagram holding a verdict message per ``(packet_id, verdict)``, in order.

    The kernel processes every message of a datagram; errors (an unknown id) come back as
    NLMSG_ERROR messages, successes are not acked.
    """
    return b"".join(
        _message(NFQNL_MSG_VERDICT, NLM_F_REQUEST, 0, queue, _attr(NFQA_VERDICT_HDR, _VERDICT_HDR.pack(v, pid)))
        for pid, v in verdicts
    )


def _attrs(data: bytes, start: int, end: int) -> dict[int, bytes]:
    found = {}
    pos = start
    while pos + NLA_HDR.size <= end:
        length, attr_type = NLA_HDR.unpack_from(data, pos)
        if length < NLA_HDR.size or pos + length > end:
            raise RemoteProtocolError(f"netlink attribute of length {length} at {pos} overruns its message")
        found[attr_type & NLA_TYPE_MASK] = data[pos + NLA_HDR.size : pos + length]
        pos += (length + 3) & ~3
    return found


def parse_messages(data: bytes) -> list[Message]:
    """Return the packets and acks of one datagram read from the queue's socket.

    Other message types are skipped. Raises RemoteProtocolError on a truncated or malformed
    message.
    """
    out: list[Message] = []
    pos = 0
    while pos < len(data):
        if pos + NLMSG_HDR.size > len(data):
            raise RemoteProtocolError(f"truncated netlink header at {pos} of {len(data)}")
        length, msg_type, _flags, seq, _portid = NLMSG_HDR.unpack_from(data, pos)
        end = pos + length
        if length < NLMSG_HDR.size or end > len(data):
            raise RemoteProtocolError(f"netlink message of length {length} at {pos} overruns {len(data)} bytes")
        body = pos + NLMSG_HDR.size
        if msg_type == NLMSG_ERROR:
            if end - body < 4:
                raise RemoteProtocolError("truncated netlink error message")
            (code,) = struct.unpack_from("=i", data, body)
            out.append(Ack(seq, -code))
        elif msg_type == NFQNL_MSG_PACKET:
            if end - body < NFGEN_HDR.size:
                raise RemoteProtocolError("truncated nfgenmsg header")
            _family, _version, queue = NFGEN_HDR.unpack_from(data, body)
            attrs = _attrs(data, body + NFGEN_HDR.size, end)
            hdr = attrs.get(NFQA_PACKET_HDR)
            if hdr is None or len(hdr) < 4:
                raise RemoteProtocolError("queued packet without a packet header")
            (packet_id,) = struct.unpack_from("!I", hdr)
            out.append(Packet(packet_id, queue, attrs.get(NFQA_PAYLOAD, b"")))
        elif msg_type == NLMSG_DONE:
            pass
        pos += (length + 3) & ~3
    return out


def flow_key(payload: bytes) -> bytes:
    """Return what identifies the flow of an IP packet: addresses, protocol and, if any, ports.

    Fragments after the first carry no ports; every fragment is keyed without them. Anything
    that is not IPv4 or IPv6 gets the empty key (one flow).
    """
    if not payload:
        return b""
    version = payload[0] >> 4
    if version == 4 and len(payload) >= 20:
        proto = payload[9]
        key = payload[12:20] + bytes((proto,))
        fragment = struct.unpack_from("!H", payload, 6)[0] & 0x3FFF  # MF flag or an offset
        ihl = (payload[0] & 0x0F) * 4
        if proto in IPPROTO_WITH_PORTS and not fragment:
            key += payload[ihl : ihl + 4]
        return key
    if version == 6 and len(payload) >= 40:
        proto = payload[6]  # extension headers make this the first one: still one flow per pair
        key = payload[8:40] + bytes((proto,))
        if proto in IPPROTO_WITH_PORTS:
            key += payload[40:44]
        return key
    return b""


# -- scheduler --------------------------------------------------------------------------------------


class DelayScheduler:
    """Decide when each packet leaves: held ``delay_s`` (+- ``jitter_s``), dropped with ``loss``.

    ``admit`` returns False for a packet to drop now; ``pop_due`` returns the ids due by ``now``
    in release order. Counters: ``admitted``, ``lost`` (loss draws), ``overflowed`` (more than
    ``max_held`` held), ``released``.
    """

    def __init__(
        self,
        delay_s: float,
        *,
        jitter_s: float = 0.0,
        loss: float = 0.0,
        max_held: int = MAX_HELD_PACKETS,
        rng: random.Random | None = None,
    ) -> None:
        if delay_s < 0 or jitter_s < 0:
            raise ConfigError(f"delay and jitter must be >= 0, not {delay_s} and {jitter_s}")
        if not 0.0 <= loss <= 1.0:
            raise ConfigError(f"loss is a probability in [0, 1], not {loss}")
        if max_held < 1:
            raise ConfigError(f"max_held must be >= 1, not {max_held}")
        self.delay_s = delay_s
        self.jitter_s = jitter_s
        self.loss = loss
        self.max_held = max_held
        self._rng = rng if rng is not None else random.Random()
        self._heap: list[tuple[float, int, int, bytes]] = []  # (release, arrival seq, packet id, flow)
        self._seq = itertools.count()
        self._flows: dict[bytes, list] = {}  # flow -> [latest release, packets held]; jitter only
        self.admitted = self.lost = self.overflowed = self.released = 0

    @property
    def held(self) -> int:
        """How many packets are waiting for their release."""
        return len(self._heap)

    def admit(self, now: float, packet_id: int, flow: bytes = b"") -> bool:
        """Hold packet ``packet_id`` (arrived at ``now``) and return True, or return False: drop it."""
        if self.loss and self._rng.random() < self.loss:
            self.lost += 1
            return False
        if len(self._heap) >= self.max_held:
            self.overflowed += 1
            return False
        release = now + self.delay_s
        if self.jitter_s:
            release = max(now, release + self._rng.uniform(-self.jitter_s, self.jitter_s))
            state = self._flows.get(flow)
            if state is None:
                self._flows[flow] = [release, 1]
            else:
                release = max(release, state[0])  # never overtake the flow's previous packet
                state[0] = release
                state[1] += 1
        heapq.heappush(self._heap, (release, next(self._seq), packet_id, flow))
        self.admitted += 1
        return True

    def next_release(self) -> float | None:
        """Return the release time of the next packet due, or None when nothing is held."""
        return self._heap[0][0] if self._heap else None

    def pop_due(self, now: float, limit: int | None = None) -> list[int]:
        """Remove and return the ids of packets due by ``now`` (at most ``limit``), in release order."""
        due: list[int] = []
        heap = self._heap
        while heap and heap[0][0] <= now and (limit is None or len(due) < limit):
            _, _, packet_id, flow = heapq.heappop(heap)
            due.append(packet_id)
            if self.jitter_s:
                state = self._flows[flow]
                state[1] -= 1
                if not state[1]:
                    del self._flows[flow]
        self.released += len(due)
        return due

    def drain(self) -> list[int]:
        """Remove and return the ids of every held packet, in release order."""
        return self.pop_due(float("inf"))


# -- driver -----------------------------------------------------------------------------------------


def _open_queue(queue: int, max_held: int, gso: bool) -> socket.socket:
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
    try:
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RCVBUF_BYTES)  # root may pass rmem_max
        except OSError:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF_BYTES)
        # A full receive buffer makes the kernel drop the packet (counted in
        # /proc/net/netfilter/nfnetlink_queue); the ENOBUFS error telling us so is useless.
        sock.setsockopt(SOL_NETLINK, NETLINK_NO_ENOBUFS, 1)
        sock.bind((0, 0))
        sock.settimeout(BIND_TIMEOUT_S)
        sock.send(encode_config(queue, seq=1, max_held=max_held, gso=gso))
        deadline = time.monotonic() + BIND_TIMEOUT_S
        while True:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no answer to binding NFQUEUE {queue}")
            for msg in parse_messages(sock.recv(RECV_BYTES)):
                if isinstance(msg, Ack) and msg.seq == 1:
                    if msg.error:
                        raise OSError(msg.error, f"binding NFQUEUE {queue}: {os.strerror(msg.error)}")
                    sock.setblocking(False)
                    return sock
    except BaseException:
        sock.close()
        raise


def serve_delayer(
    queue: int,
    delay_s: float,
    *,
    jitter_s: float = 0.0,
    loss: float = 0.0,
    max_held: int = MAX_HELD_PACKETS,
    seed: int | None = None,
    stop_fd: int | None = None,
    on_ready: Callable[[], None] | None = None,
) -> DelayScheduler:
    """Serve NFQUEUE ``queue`` of this network namespace until ``stop_fd`` is readable.

    Calls ``on_ready()`` once the queue is bound. Returns the scheduler (its counters). Raises
    OSError when the queue cannot be bound (EPERM: not root, or another socket holds the queue),
    ConfigError on bad parameters.
    """
    sched = DelayScheduler(delay_s, jitter_s=jitter_s, loss=loss, max_held=max_held, rng=random.Random(seed))
    # Loss is drawn per wire packet: a lost GSO packet would be a burst of up to 45 lost at once.
    sock = _open_queue(queue, max_held, gso=not loss)
    clock = time.monotonic
    track_flows = bool(jitter_s)
    fds = [sock.fileno()] + ([stop_fd] if stop_fd is not None else [])
    try:
        if on_ready is not None:
            on_ready()
        while True:
            # Read what waits, deciding each packet's fate as it comes.
            drops: list[tuple[int, int]] = []
            for _ in range(MAX_READS_PER_ROUND):
                try:
                    data = sock.recv(RECV_BYTES)
                except BlockingIOError:
                    break
                except OSError as exc:
                    if exc.errno == errno.ENOBUFS:
                        continue
                    raise
                now = clock()
                for msg in parse_messages(data):
                    if isinstance(msg, Packet):
                        flow = flow_key(msg.payload) if track_flows else b""
                        if not sched.admit(now, msg.packet_id, flow):
                            drops.append((msg.packet_id, NF_DROP))
                    elif msg.error:
                        log.warning("NFQUEUE %d: the kernel refused a verdict: %s", queue, os.strerror(msg.error))
            if drops:
                _send_all(sock, queue, drops)
            # Release what is due.
            while True:
                due = sched.pop_due(clock(), MAX_VERDICTS_PER_SEND)
                if not due:
                    break
                _send_all(sock, queue, [(pid, NF_ACCEPT) for pid in due])
            nxt = sched.next_release()
            timeout = None if nxt is None else max(0.0, nxt - clock())
            ready, _, _ = select.select(fds, [], [], timeout)
            if stop_fd is not None and stop_fd in ready:
                break
    finally:
        try:
            # Let go of everything, held or still unread: closing the socket would drop it.
            last = sched.drain()
            while True:
                try:
                    messages = parse_messages(sock.recv(RECV_BYTES))
                except (OSError, RemoteProtocolError):  # nothing left (EAGAIN), or nothing to save
                    break
                else:
                    last += [msg.packet_id for msg in messages if isinstance(msg, Packet)]
            for start in range(0, len(last), MAX_VERDICTS_PER_SEND):
                _send_all(sock, queue, [(pid, NF_ACCEPT) for pid in last[start : start + MAX_VERDICTS_PER_SEND]])
        finally:
            sock.close()
    return sched


def _send_all(sock: socket.socket, queue: int, verdicts: list[tuple[int, int]]) -> None:
    data = encode_verdicts(queue, verdicts)
    while True:
        try:
            sock.send(data)
            return
        except BlockingIOError:  # the send buffer is full only under extreme load: wait for room
            select.select([], [sock], [])


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m gridsock.testing.delayer",
        description="Hold the packets of an NFQUEUE for a delay, drop a fraction; runs until SIGTERM.",
    )
    parser.add_argument("--queue", type=int, required=True, help="NFQUEUE number (of this network namespace)")
    parser.add_argument("--delay-ms", type=float, required=True, help="how long each packet is held")
    parser.add_argument("--jitter-ms", type=float, default=0.0, help="uniform +- jitter; per-flow order is kept")
    parser.add_argument("--loss", type=float, default=0.0, help="fraction of packets dropped, 0..1")
    parser.add_argument("--max-held", type=int, default=MAX_HELD_PACKETS, help="drop beyond this many held packets")
    parser.add_argument("--seed", type=int, default=None, help="seed of the loss and jitter draws")
    parser.add_argument("-v", "--verbose", action="store_true", help="log the counters at exit")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the delayer command line; return the exit status (0 after SIGTERM/SIGINT, 1 on error)."""
    args = _parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="delayer: %(message)s")
    wake_r, wake_w = socket.socketpair()
    wake_r.setblocking(False)
    wake_w.setblocking(False)
    # The handlers do nothing: the signal's byte on the wakeup fd ends the loop.
    old_wakeup = signal.set_wakeup_fd(wake_w.fileno())
    old_handlers = {sig: signal.signal(sig, lambda signum, frame: None) for sig in (signal.SIGTERM, signal.SIGINT)}

    def ready() -> None:
        sys.stdout.write("ready\n")
        sys.stdout.flush()

    try:
        sched = serve_delayer(
            args.queue,
            args.delay_ms / 1000.0,
            jitter_s=args.jitter_ms / 1000.0,
            loss=args.loss,
            max_held=args.max_held,
            seed=args.seed,
            stop_fd=wake_r.fileno(),
            on_ready=ready,
        )
    except (OSError, ConfigError, RemoteProtocolError) as exc:
        print(f"delayer: {exc}", file=sys.stderr)
        return 1
    finally:
        signal.set_wakeup_fd(old_wakeup)
        for sig, handler in old_handlers.items():
            signal.signal(sig, handler)
        wake_r.close()
        wake_w.close()
    log.info(
        "queue %d: admitted %d, released %d, lost %d, overflowed %d",
        args.queue, sched.admitted, sched.released, sched.lost, sched.overflowed,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
