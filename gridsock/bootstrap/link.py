"""A message link: one socket, the wire codec, a reader, a bounded writer and a liveness check.

Theory of operation
-------------------
A link starts after its handshake (TLS, Hello/Welcome) and runs three greenlets:

- the *reader* receives bytes, feeds the :class:`~gridsock.wire.Decoder` and hands each
  message to ``on_message(link, message)``; it answers ``Ping`` itself;
- the *writer* drains the queues into the socket in a strict order of priority:

  1. *link frames*, everything that is not a routed message (``Ping``, ``Pong``, directory
     updates, ``Register``...): one FIFO, bounded by ``SEND_QUEUE_FRAMES`` frames and
     ``URGENT_QUEUE_BYTES`` bytes; a peer that lets it fill is too slow and its link is closed;
  2. routed messages that are not bulk (requests, replies, assembly requests, ``ping``);
  3. bulk routed messages (relayed data).

  Routed messages wait in one queue per *source node* (``message.src``) and class, and the
  sources take turns (deficit round robin, ``FAIR_QUANTUM_BYTES`` a turn), so one source's
  backlog delays another's frame by at most a turn of each active source. What a source may
  have queued on one link is bounded (its *share*, ``SOURCE_SHARE_BYTES``); so is a link's
  whole routed queue (``LINK_QUEUE_BYTES``) and the routed bytes queued on all the links of the
  process (``ROUTED_QUEUE_BYTES``, a :class:`QueueBudget`). Senders keep within them: a node
  waits for room before it queues a message it originates (``wait_room``), and a forwarder
  holds the link the message came from until its source has room (:meth:`Link.wait_source`,
  which :class:`~gridsock.bootstrap.routing.FloodGuard` calls), so that link's reader
  stops reading it: back-pressure towards the sender. A routed frame that would go past a hard
  bound (``SOURCE_HARD_BYTES``, the link's or the process's) anyway is dropped, never queued.
  A large frame is queued as its head and its payload, and a large payload is written as it
  is, never joined to its head nor to other frames (so the payload of a forwarded message is
  not copied between the decoder and the socket); small frames are joined into one write; on
  a socket that gathers (:class:`~gridsock.bootstrap.tlssocket.BufferedTLSSocket`, the
  bootstrap's TLS) the parts of a write go out together, many TLS records a system call. A
  link whose writer has frames but got nothing written for ``SEND_STALL_S`` is closed (its
  peer stopped reading). A TCP link keeps at most ``LINK_NOTSENT_LOWAT_BYTES`` unsent in the
  kernel (``TCP_NOTSENT_LOWAT``), so the order above is not undone by a deep socket buffer;
- the *pinger* sends ``Ping`` every ``ping_interval_s`` and closes the link when nothing at all
  arrived for ``timeout_s`` (a peer that vanished without a FIN). Any frame counts as traffic,
  and a reader this process holds on purpose (back-pressure) is not idle. A ``Ping`` is
  answered by the reader at once, on the link-frame queue, ahead of everything routed.

The reader receives straight into the decoder's buffer (``recv_into``), so a small frame's bytes
are copied once on their way in, when its payload leaves the buffer; a large one (relayed data)
is received into a buffer of its own, and its payload is a view of it, never copied (a
forwarder queues that view as it is). A gevent read returns at once
while the socket holds data, so a reader fed faster than it decodes would never let the
writers run: it yields to the other greenlets after every ``YIELD_EVERY_BYTES`` it received.
That keeps a forwarding node a pipeline (a relayed frame goes on while the next comes in)
rather than a batch (a whole flow-control window in, then all of it out).

Any ``RemoteProtocolError`` (bad frame, bad message in this state) closes the link with the
reason logged at WARNING. ``on_close(link)`` runs exactly once, whatever closed the link.
"""
from __future__ import annotations

import array
import collections
import fcntl
import itertools
import logging
import termios
import time
import weakref
from typing import Callable, Dict, Optional

import gevent
import gevent.event
from gevent import socket as gsocket

from .. import memory, wire
from .._ratelog import RateLimitedLog
from ..errors import BrokenStreamError, LocalProtocolError, RemoteProtocolError

__all__ = [
    "PING_INTERVAL_S",
    "LINK_TIMEOUT_S",
    "DEAD_PEER_S",
    "HANDSHAKE_TIMEOUT_S",
    "SEND_QUEUE_FRAMES",
    "URGENT_QUEUE_BYTES",
    "SOURCE_SHARE_BYTES",
    "SOURCE_HARD_BYTES",
    "LINK_QUEUE_BYTES",
    "ROUTED_QUEUE_BYTES",
    "FAIR_QUANTUM_BYTES",
    "SEND_STALL_S",
    "RECV_CHUNK_BYTES",
    "Link",
    "QueueBudget",
    "PROCESS_BUDGET",
    "reading_link",
    "queue_ceiling_bytes",
    "read_message",
    "send_message",
    "tune_socket",
]

log = logging.getLogger(__name__)
# What peers make links log (protocol errors that drop them), rate-limited per peer label's host.
_peer_log = RateLimitedLog(log)

# A link with traffic pings nothing; an idle one pings every PING_INTERVAL_S.
PING_INTERVAL_S = 2.0
# A link on which nothing arrived for this long is dead (its peer vanished without a FIN).
LINK_TIMEOUT_S = 6.0
# The longest a link takes to notice a peer that went silent (no FIN): the timeout, plus up to
# one ping interval before the pinger looks.
DEAD_PEER_S = LINK_TIMEOUT_S + PING_INTERVAL_S
# Time for TLS and the Hello/Welcome exchange; a peer slower than this is dropped.
HANDSHAKE_TIMEOUT_S = 10.0
# Link frames (not routed: pings, pongs, directory updates...) queued for one peer before it
# counts as too slow and is dropped; and their bytes (a directory update is 2.8 MB at worst).
SEND_QUEUE_FRAMES = 4096
URGENT_QUEUE_BYTES = 32 * 1024 * 1024
# A node originating non-bulk routed messages waits while a link holds more of its frames than this.
HIGH_WATER_FRAMES = 1024
# Routed bytes one source node may have queued on one link before its sender waits (a node's own
# messages) or the link they came from is held (forwarded ones): one relayed connection's
# largest window (RELAY_MAX_WINDOW_BYTES), so a relayed connection, credit-bound end to end,
# never waits for its share.
SOURCE_SHARE_BYTES = 16 * 1024 * 1024
# What a source may have queued on one link at all: a routed frame beyond is dropped (only
# senders that do not wait for room, answers queued by the process itself, get there).
SOURCE_HARD_BYTES = 2 * SOURCE_SHARE_BYTES
# All the routed bytes queued on one link: forwarders hold their input at this, and drop beyond
# twice this.
LINK_QUEUE_BYTES = 64 * 1024 * 1024
# All the routed bytes queued on all the links of one process: a forwarded frame beyond is
# dropped. With the per-link bounds below it is the memory ceiling (docs/security.md, "Bounds").
ROUTED_QUEUE_BYTES = 128 * 1024 * 1024
# Each turn of the round robin, a source with routed frames queued may send this much more.
FAIR_QUANTUM_BYTES = 64 * 1024
# A link whose writer has had frames to write but got none written for this long is closed: its
# peer stopped reading (a slow peer still makes progress: a 4 MiB frame at 1 Mbit/s takes 34 s).
SEND_STALL_S = 60.0
# Unsent bytes a link's TCP socket may hold (TCP_NOTSENT_LOWAT, Linux): what waits in the kernel
# is out of the writer's order of priority, so a pong or a routed request queued now waits
# behind all of it. Without it the kernel takes up to tcp_wmem's 4 MiB; 128 KiB keeps loopback
# throughput (it bounds what is unsent, not what is in flight).
LINK_NOTSENT_LOWAT_BYTES = 128 * 1024
RECV_CHUNK_BYTES = 256 * 1024
# Payloads at least this large are written on their own, as they are, not joined with others.
DIRECT_WRITE_BYTES = 64 * 1024
# A frame no larger than this, sent while the writer is idle with nothing queued, is written by
# the sender at once (see Link.send): a connect's request and its answer do not wait for the
# writer greenlet's turn behind whatever else is ready.
SEND_NOW_BYTES = 16 * 1024
# A reader receives at most this much beyond the frame under way (small frames come many to a
# receive; a socket that returns many TLS records at once would otherwise read far into the
# next large frame, which the decoder then moves to its buffer's start: a copy).
RECV_AHEAD_BYTES = 16 * 1024
# A reader yields to the other greenlets (writers, the application) after receiving this much.
YIELD_EVERY_BYTES = 256 * 1024

_link_ids = itertools.count(1)


class QueueBudget:
    """The routed bytes queued on all the links that share it (one per process by default:
    :data:`PROCESS_BUDGET`), against ``limit_bytes``; ``peak_bytes`` is the most seen."""

    def __init__(self, limit_bytes: int = ROUTED_QUEUE_BYTES) -> None:
        self.limit_bytes = limit_bytes
        self.queued_bytes = 0
        self.peak_bytes = 0

    def take(self, n: int) -> bool:
        """Count ``n`` more bytes queued; False (nothing counted) if that would pass the limit."""
        if self.queued_bytes + n > self.limit_bytes:
            return False
        self.queued_bytes += n
        if self.queued_bytes > self.peak_bytes:
            self.peak_bytes = self.queued_bytes
        return True

    def give(self, n: int) -> None:
        self.queued_bytes -= n


# The budget of every link that is given none: the routed bytes queued in this process.
PROCESS_BUDGET = QueueBudget()

# The link whose reader each greenlet is (a greenlet reads one link at most): see reading_link().
_readers: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def reading_link() -> Optional["Link"]:
    """The link whose reader runs the calling code (a message handler), or None.

    A forwarder holds that link (waits without reading it) when a source has no room ahead."""
    return _readers.get(gevent.getcurrent())


def queue_ceiling_bytes(links: int, budget_bytes: int = ROUTED_QUEUE_BYTES) -> int:
    """The most that the queues and receive buffers of a process with ``links`` links hold,
    whatever peers send: the routed queues' budget, and for each link its link-frame queue, the
    frame being received and one decoded frame its reader holds (docs/security.md, "Bounds")."""
    return budget_bytes + links * (URGENT_QUEUE_BYTES + 2 * wire.MAX_FRAME_BYTES)


def _frame_bytes(frame) -> int:
    return len(frame[0]) + len(frame[1])


class _SourceQueue:
    """The routed frames of one source node queued on one link: non-bulk and bulk, in order."""

    __slots__ = ("control", "bulk", "bytes", "deficit_control", "deficit_bulk")

    def __init__(self) -> None:
        self.control: collections.deque = collections.deque()
        self.bulk: collections.deque = collections.deque()
        self.bytes = 0
        self.deficit_control = 0
        self.deficit_bulk = 0


def send_message(sock, message) -> None:
    """Encode ``message`` and write it whole to ``sock`` (handshake phase, before a Link)."""
    sock.sendall(wire.encode(message))


def read_message(sock, decoder: wire.Decoder, *, timeout: float = HANDSHAKE_TIMEOUT_S):
    """Return the next message from ``sock`` (handshake phase, before a Link exists).

    Raises RemoteProtocolError for a bad frame, BrokenStreamError when the peer closes first,
    and gevent.Timeout (as ``TimeoutError``) after ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        message = decoder.next_message()
        if message is not None:
            return message
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"no message from {decoder.peer} within {timeout:.1f} s")
        with gevent.Timeout(remaining, TimeoutError(f"no message from {decoder.peer} within {timeout:.1f} s")):
            data = sock.recv(RECV_CHUNK_BYTES)
        if not data:
            raise BrokenStreamError(f"{decoder.peer} closed the connection")
        decoder.feed(data)


class Link:
    """An established message link to one peer; see the module docstring."""

    def __init__(
        self,
        sock,
        decoder: wire.Decoder,
        *,
        label: str,
        on_message: Callable[["Link", object], None],
        on_close: Callable[["Link"], None] = lambda link: None,
        ping_interval_s: float = PING_INTERVAL_S,
        timeout_s: float = LINK_TIMEOUT_S,
        send_queue_frames: int = SEND_QUEUE_FRAMES,
        source_share_bytes: int = SOURCE_SHARE_BYTES,
        link_queue_bytes: int = LINK_QUEUE_BYTES,
        send_stall_s: float = SEND_STALL_S,
        budget: Optional[QueueBudget] = None,
    ) -> None:
        self.id = next(_link_ids)
        self.sock = sock
        self.label = label
        self.peer_id: Optional[str] = None
        self.entry: Optional[wire.NodeEntry] = None
        self.close_reason: Optional[str] = None
        self.opened_at = time.time()
        self._decoder = decoder
        self._on_message = on_message
        self._on_close = on_close
        self._ping_interval_s = ping_interval_s
        self._timeout_s = timeout_s
        self._send_stall_s = send_stall_s
        self._max_frames = send_queue_frames
        self.source_share_bytes = source_share_bytes
        self.link_queue_bytes = link_queue_bytes
        self.budget = budget if budget is not None else PROCESS_BUDGET
        # Link frames (not routed), first out.
        self._urgent: collections.deque = collections.deque()
        self._urgent_bytes = 0
        # Routed frames by source, and the sources that have some of each class, in turn order.
        self._sources: Dict[str, _SourceQueue] = {}
        self._turns_control: collections.deque = collections.deque()
        self._turns_bulk: collections.deque = collections.deque()
        self._control_frames = 0
        self._routed_bytes = 0
        self._wakeup = gevent.event.Event()
        self._writer_idle = False  # the writer waits for frames, none queued (Link.send may write)
        self._try_send = getattr(sock, "try_sendall_parts", None)  # (a socket that can write without waiting)
        self._drained = gevent.event.Event()
        self.bytes_sent = 0
        self.bytes_received = 0
        # Routed frames refused for want of room (a hard bound), and the most routed bytes queued.
        self.frames_dropped = 0
        self.peak_routed_bytes = 0
        self._last_rx = time.monotonic()
        self._last_tx = time.monotonic()
        self._held = 0  # greenlets holding this link's reader (back-pressure): it is not idle
        self._greenlets: list = []
        self._nonce = itertools.count(1)
        _limit_unsent(sock)

    def __repr__(self) -> str:
        return f"<Link {self.id} {self.label}{' closed' if self.closed else ''}>"

    @property
    def closed(self) -> bool:
        return self.close_reason is not None

    @property
    def routed_bytes(self) -> int:
        """The routed bytes queued on this link now."""
        return self._routed_bytes

    def queued_from(self, src: str) -> int:
        """The routed bytes of source ``src`` queued on this link now."""
        queue = self._sources.get(src)
        return queue.bytes if queue is not None else 0

    def start(self) -> "Link":
        self._greenlets = [
            gevent.spawn(self._read_loop),
            gevent.spawn(self._write_loop),
            gevent.spawn(self._ping_loop),
        ]
        return self

    def send(self, message, *, bulk: bool = False, checked: bool = True) -> bool:
        """Queue ``message``; return False if it was not queued: the link is closed (or just
        closed as too slow), or a routed message found no room (its source's hard bound, the
        link's or the process's; see the module docstring).

        A routed message waits in its source's queue, ``bulk`` ones (relayed data) behind every
        other frame; anything else is a link frame, first out. ``checked=False`` is for
        forwarded messages, whose fields the decoder checked already (see ``wire.encode``).
        """
        if self.closed:
            return False
        try:
            frame = wire.encode_parts(message, checked=checked)
        except LocalProtocolError as exc:
            # Our bug or an oversized message to forward: drop the message, never the link.
            log.error("%s: not sending %s: %s", self.label, type(message).__name__, exc)
            return False
        size = _frame_bytes(frame)
        if self._writer_idle and not bulk and size <= SEND_NOW_BYTES and not self._urgent and not self._routed_bytes \
                and self._send_now(frame, size):
            return True
        if isinstance(message, wire.Routed):
            return self._queue_routed(message.src, frame, size, bulk)
        if len(self._urgent) >= self._max_frames or self._urgent_bytes + size > URGENT_QUEUE_BYTES:
            self.close(f"send queue full ({len(self._urgent)} frames, {self._urgent_bytes} bytes): peer too slow")
            return False
        self._urgent.append(frame)
        self._urgent_bytes += size
        self._wakeup.set()
        return True

    def _send_now(self, frame, size: int) -> bool:
        """Write a small frame at once, in the sender's greenlet, without waiting: only while
        the writer is idle (nothing queued, so the order is kept). False if the socket cannot
        (another write under way): queue it then. What the kernel does not take now stays in
        the socket, and the writer is woken to send it."""
        if self._try_send is None:
            return False
        head, payload = frame
        try:
            if not self._try_send((head, payload) if payload else (head,)):
                return False
        except (OSError, ValueError) as exc:
            self.close(f"send failed: {exc or type(exc).__name__}")
            return True  # (the frame went with the link, as a queued one would)
        self.bytes_sent += size
        self._last_tx = time.monotonic()
        if self.sock.unsent:
            self._wakeup.set()
        return True

    def _queue_routed(self, src: str, frame, size: int, bulk: bool) -> bool:
        queue = self._sources.get(src)
        if (queue is not None and queue.bytes + size > 2 * self.source_share_bytes) \
                or self._routed_bytes + size > 2 * self.link_queue_bytes or not self.budget.take(size):
            self.frames_dropped += 1
            return False
        if queue is None:
            queue = self._sources[src] = _SourceQueue()
        if bulk:
            if not queue.bulk:
                self._turns_bulk.append(src)
            queue.bulk.append(frame)
        else:
            if not queue.control:
                self._turns_control.append(src)
            queue.control.append(frame)
            self._control_frames += 1
        queue.bytes += size
        self._routed_bytes += size
        if self._routed_bytes > self.peak_routed_bytes:
            self.peak_routed_bytes = self._routed_bytes
        self._wakeup.set()
        return True

    def has_room(self, src: str) -> bool:
        """True if source ``src`` is within its share of this link and the link within its bound."""
        queue = self._sources.get(src)
        return (queue is None or queue.bytes < self.source_share_bytes) and self._routed_bytes < self.link_queue_bytes

    def wait_source(self, src: str, timeout: Optional[float] = None) -> bool:
        """Block (cooperatively) until source ``src`` has room on this link (``has_room``).

        Returns True when it has, False after ``timeout`` seconds or if the link closed."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.closed and not self.has_room(src):
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return False
            self._drained.clear()
            self._drained.wait(remaining)
        return not self.closed

    def wait_room(self, *, bulk: bool = False, src: Optional[str] = None) -> None:
        """Block (cooperatively) until a message this node originates has room: below the
        high-water mark of non-bulk frames, or, for ``bulk`` ones (and any of source ``src``),
        within the source's share (``wait_source``)."""
        if src is not None:
            self.wait_source(src)
        if bulk:
            return
        while not self.closed and self._control_frames + len(self._urgent) > HIGH_WATER_FRAMES:
            self._drained.clear()
            self._drained.wait()

    @property
    def stalled_s(self) -> float:
        """How long the writer has had frames but written none (0 when it has nothing to write)."""
        if not (self._urgent or self._routed_bytes):
            return 0.0
        return max(0.0, time.monotonic() - self._last_tx)

    def hold(self) -> "_Hold":
        """A context in which this link's reader is held on purpose (back-pressure): the pinger
        does not count the time as silence. Use it around a wait in the link's reader."""
        return _Hold(self)

    def close(self, reason: str = "closed locally") -> None:
        """Close the link (idempotent); ``on_close`` runs once."""
        if self.closed:
            return
        self.close_reason = reason
        log.info("link %s closed: %s", self.label, reason)
        try:
            self.sock.close()
        except OSError:
            pass
        self._drained.set()
        # Its queues go: give their bytes back to the budget.
        self.budget.give(self._routed_bytes)
        self._routed_bytes = 0
        self._sources.clear()
        self._turns_control.clear()
        self._turns_bulk.clear()
        self._urgent.clear()
        self._urgent_bytes = 0
        self._control_frames = 0
        memory.trim_soon()  # its queues and receive buffer (megabytes when it carried relayed data)
        current = gevent.getcurrent()
        for g in self._greenlets:
            if g is not current:
                g.kill(block=False)
        try:
            self._on_close(self)
        except Exception:  # a bug in the owner must not leave the link half-closed
            log.exception("on_close handler of %s failed", self.label)

    def join(self, timeout: float | None = None) -> None:
        gevent.joinall(self._greenlets, timeout=timeout)

    # --- greenlets ---------------------------------------------------------------------------

    def _read_loop(self) -> None:
        _readers[gevent.getcurrent()] = self
        try:
            decoder = self._decoder
            self._dispatch_buffered()
            unyielded = 0
            recv_into = self.sock.recv_into
            while not self.closed:
                # Receive at least what the frame under way still lacks before decoding again
                # (gevent's TLS socket gives one record, at most 16 KiB, per call).
                missing = decoder.missing()
                n = 0
                with decoder.recv_buffer(missing) as room:
                    # Not much beyond it: what comes after the frame would be moved to the
                    # buffer's start (copied) before the next frame is received.
                    limit = max(missing, RECV_AHEAD_BYTES)
                    while n < missing:
                        got = recv_into(room[n:limit])
                        if not got:
                            break
                        n += got
                        self._last_rx = time.monotonic()  # a slow link's large frame is traffic too
                if n:
                    decoder.received(n)
                    self.bytes_received += n
                if n < missing:
                    self.close("peer closed the connection")
                    return
                unyielded += n
                if self._dispatch_buffered() or unyielded >= YIELD_EVERY_BYTES:
                    # (a request's handler, a reply's waiter run first: not after this
                    # reader's next receive finds nothing and waits)
                    unyielded = 0
                    gevent.sleep(0)
        except RemoteProtocolError as exc:
            _peer_log.warning(self.label.rpartition(":")[0] or self.label, "dropping %s: protocol error: %s",
                              self.label, exc)
            self.close(f"protocol error: {exc}")
        except (OSError, BrokenStreamError) as exc:
            self.close(f"connection lost: {exc or type(exc).__name__}")
        except gevent.GreenletExit:
            raise
        except Exception as exc:
            if self.closed:
                return  # closed under us (e.g. a TLS socket closed while data arrived)
            log.exception("bug while handling a message from %s", self.label)
            self.close(f"internal error: {exc!r}")

    def _dispatch_buffered(self) -> bool:
        """Hand every whole message received to ``on_message``; True if one was a routed
        request or reply (someone waits on it, or a handler starts)."""
        woke = False
        while not self.closed:
            message = self._decoder.next_message()
            if message is None:
                break
            if isinstance(message, wire.Ping):
                self.send(wire.Pong(message.nonce))  # a link frame: out before anything routed
            elif isinstance(message, wire.Pong):
                pass
            else:
                woke = woke or isinstance(message, wire.Routed) and message.kind != "msg"
                self._on_message(self, message)
        return woke

    def _next_frames(self) -> list:
        """The frames of the next write, in priority order: link frames, then routed non-bulk
        frames, then bulk ones, the sources taking turns; about one chunk's worth (or one
        large frame)."""
        frames: list = []
        size = 0
        while self._urgent and size < RECV_CHUNK_BYTES:
            frame = self._urgent.popleft()
            n = _frame_bytes(frame)
            self._urgent_bytes -= n
            frames.append(frame)
            size += n
        if size < RECV_CHUNK_BYTES and self._turns_control:
            size = self._take_turns(self._turns_control, False, frames, size)
        if size < RECV_CHUNK_BYTES and self._turns_bulk:
            size = self._take_turns(self._turns_bulk, True, frames, size)
        return frames

    def _take_turns(self, turns: collections.deque, bulk: bool, frames: list, size: int) -> int:
        """Deficit round robin over the sources in ``turns`` until ``size`` reaches a chunk."""
        sources = self._sources
        while turns and size < RECV_CHUNK_BYTES:
            src = turns.popleft()
            queue = sources[src]
            frames_of = queue.bulk if bulk else queue.control
            deficit = (queue.deficit_bulk if bulk else queue.deficit_control) + FAIR_QUANTUM_BYTES
            if not turns:  # alone: no need to wait turns to save up for a large frame
                deficit = max(deficit, _frame_bytes(frames_of[0]))
            while frames_of and size < RECV_CHUNK_BYTES:
                n = _frame_bytes(frames_of[0])
                if n > deficit:
                    break
                frames.append(frames_of.popleft())
                deficit -= n
                size += n
                queue.bytes -= n
                self._routed_bytes -= n
                self.budget.give(n)
                if not bulk:
                    self._control_frames -= 1
            if frames_of:
                turns.append(src)
            else:
                deficit = 0
            if bulk:
                queue.deficit_bulk = deficit
            else:
                queue.deficit_control = deficit
            if not queue.control and not queue.bulk:
                del sources[src]
        return size

    def _write_loop(self) -> None:
        try:
            unsent = (lambda: self.sock.unsent) if self._try_send is not None else (lambda: False)
            while not self.closed:
                if not self._urgent and not self._routed_bytes:
                    if unsent():  # (what Link.send wrote and the kernel did not take yet)
                        self.sock.sendall_parts(())
                        self._last_tx = time.monotonic()
                        continue
                    self._wakeup.clear()
                    self._writer_idle = True
                    try:
                        self._wakeup.wait()
                    finally:
                        self._writer_idle = False
                    self._last_tx = time.monotonic()  # (a stall counts from here)
                    continue
                frames = self._next_frames()
                # Anyone waiting for room looks again (a source's share, the high-water marks).
                self._drained.set()
                size = self._write(frames)
                self._last_tx = time.monotonic()
                self.bytes_sent += size
        except (OSError, ValueError) as exc:
            self.close(f"send failed: {exc or type(exc).__name__}")
        except AttributeError:
            # gevent's SSL socket, closed under a write in progress (by the reader, whose peer
            # closed), has no SSL object left to write with; anything else is a bug.
            if not self.closed:
                raise

    def _write(self, frames: list) -> int:
        """Write ``frames`` (head, payload) in order: small parts joined (fewer TLS records),
        each large payload as it is, uncopied; all in one call of a socket that gathers
        (``sendall_parts``: many records a system call), else one ``sendall`` a part. Returns
        the bytes."""
        parts: list = []
        small: list = []
        size = 0
        for head, payload in frames:
            small.append(head)
            size += len(head) + len(payload)
            if len(payload) >= DIRECT_WRITE_BYTES:
                parts.append(b"".join(small) if len(small) > 1 else small[0])
                small = []
                parts.append(payload)
            elif payload:
                small.append(payload)
        if small:
            parts.append(b"".join(small) if len(small) > 1 else small[0])
        sendall_parts = getattr(self.sock, "sendall_parts", None)
        if sendall_parts is not None:
            sendall_parts(parts)
        else:
            sendall = self.sock.sendall
            for part in parts:
                sendall(part)
                self._last_tx = time.monotonic()
        return size

    def _ping_loop(self) -> None:
        woke = time.monotonic()
        while not self.closed:
            gevent.sleep(self._ping_interval_s)
            now = time.monotonic()
            # Woken this much later than asked: this process (or its host) did not run meanwhile,
            # so neither could a peer in it, nor could we read one elsewhere. Silence is counted
            # on the time this process ran, not on its stalls (a loaded machine's nodes in one
            # process dropped each other's links as "silent" after a stall of a few seconds).
            late = now - woke - self._ping_interval_s
            woke = now
            if late > self._ping_interval_s:
                self._last_rx = min(now, self._last_rx + late)
            if self._held:
                self._last_rx = now  # held by us, not silent
            if now - self._last_rx > self._timeout_s and _bytes_waiting(self.sock):
                self._last_rx = now  # the peer spoke; this process was too busy to read it
            idle = now - self._last_rx
            if idle > self._timeout_s:
                self.close(f"no traffic for {idle:.1f} s (limit {self._timeout_s:.1f} s)")
                return
            stalled = self.stalled_s
            if stalled > self._send_stall_s:
                self.close(f"nothing written for {stalled:.1f} s with frames queued (limit {self._send_stall_s:.1f} s): "
                           "peer too slow")
                return
            if idle >= self._ping_interval_s:
                self.send(wire.Ping(next(self._nonce) & 0xFFFFFFFF))


class _Hold:
    """See :meth:`Link.hold`."""

    __slots__ = ("_link",)

    def __init__(self, link: Link) -> None:
        self._link = link

    def __enter__(self) -> Link:
        self._link._held += 1
        return self._link

    def __exit__(self, *exc) -> None:
        self._link._held -= 1
        self._link._last_rx = time.monotonic()


def _bytes_waiting(sock) -> bool:
    """True if ``sock`` has received bytes nobody read yet (TLS-buffered, or in the kernel's
    receive queue): a link whose peer spoke while this process was stalled is not silent, and
    closing it would only add a relink to the load that stalled it."""
    try:
        pending = getattr(sock, "pending", None)
        if pending is not None and pending() > 0:
            return True
        count = array.array("i", [0])
        fcntl.ioctl(sock.fileno(), termios.FIONREAD, count)
        return count[0] > 0
    except (OSError, ValueError, AttributeError):
        return False


def _limit_unsent(sock) -> None:
    """Keep at most LINK_NOTSENT_LOWAT_BYTES unsent in a TCP socket's buffer (where the kernel can)."""
    option = getattr(gsocket, "TCP_NOTSENT_LOWAT", None)
    try:
        if option is not None and sock.family in (gsocket.AF_INET, gsocket.AF_INET6):
            sock.setsockopt(gsocket.IPPROTO_TCP, option, LINK_NOTSENT_LOWAT_BYTES)
    except (OSError, AttributeError):  # not TCP after all, or not a real socket (tests)
        pass


def tune_socket(sock) -> None:
    """TCP no-delay (small control messages must not wait for Nagle) and keepalive; no-op for Unix sockets."""
    if sock.family in (gsocket.AF_INET, gsocket.AF_INET6):
        sock.setsockopt(gsocket.IPPROTO_TCP, gsocket.TCP_NODELAY, 1)
        sock.setsockopt(gsocket.SOL_SOCKET, gsocket.SO_KEEPALIVE, 1)
