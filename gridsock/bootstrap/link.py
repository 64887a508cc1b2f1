"""A message link: one socket, the wire codec, a reader, a bounded writer and a liveness check.

Theory of operation
-------------------
A link starts after its handshake (TLS, Hello/Welcome) and runs three greenlets:

- the *reader* receives bytes, feeds the :class:`~gridsock.wire.Decoder` and hands each
  message to ``on_message(link, message)``; it answers ``Ping`` itself;
- the *writer* drains two bounded queues of encoded frames into the socket, control frames
  first and bulk frames (relayed data) after, so a bulk transfer never delays control traffic
  by more than the frame being written. A frame is queued as its head and its payload, and a
  large payload is written as it is, never joined to its head nor to other frames (so the
  payload of a forwarded message is not copied between the decoder and the socket); small
  frames are joined into one write. A router that forwards to a slow peer never blocks:
  when a queue is full the link is closed (``send queue full``), the slow peer is dropped, and
  everyone else is still served (relayed data is flow-controlled end to end, so a healthy
  peer never gets there);
- the *pinger* sends ``Ping`` every ``ping_interval_s`` and closes the link when nothing at all
  arrived for ``timeout_s`` (a peer that vanished without a FIN).

The reader receives straight into the decoder's buffer (``recv_into``), so a frame's bytes are
copied once on their way in, when its payload leaves the buffer. A gevent read returns at once
while the socket holds data, so a reader fed faster than it decodes would never let the
writers run: it yields to the other greenlets after every ``YIELD_EVERY_BYTES`` it received.
That keeps a forwarding node a pipeline (a relayed frame goes on while the next comes in)
rather than a batch (a whole flow-control window in, then all of it out).

Any ``RemoteProtocolError`` (bad frame, bad message in this state) closes the link with the
reason logged at WARNING. ``on_close(link)`` runs exactly once, whatever closed the link.
"""
from __future__ import annotations

import collections
import itertools
import logging
import time
from typing import Callable, Optional

import gevent
import gevent.event
from gevent import socket as gsocket

from .. import wire
from ..errors import BrokenStreamError, LocalProtocolError, RemoteProtocolError

__all__ = [
    "PING_INTERVAL_S",
    "LINK_TIMEOUT_S",
    "DEAD_PEER_S",
    "HANDSHAKE_TIMEOUT_S",
    "SEND_QUEUE_FRAMES",
    "RECV_CHUNK_BYTES",
    "Link",
    "read_message",
    "send_message",
    "tune_socket",
]

log = logging.getLogger(__name__)

# A link with traffic pings nothing; an idle one pings every PING_INTERVAL_S.
PING_INTERVAL_S = 2.0
# A link on which nothing arrived for this long is dead (its peer vanished without a FIN).
LINK_TIMEOUT_S = 6.0
# The longest a link takes to notice a peer that went silent (no FIN): the timeout, plus up to
# one ping interval before the pinger looks.
DEAD_PEER_S = LINK_TIMEOUT_S + PING_INTERVAL_S
# Time for TLS and the Hello/Welcome exchange; a peer slower than this is dropped.
HANDSHAKE_TIMEOUT_S = 10.0
# Control frames queued for one peer before it counts as too slow and is dropped.
SEND_QUEUE_FRAMES = 4096
# A node originating messages waits while a link holds more control frames than this (its own
# back-pressure); forwarded traffic is never held up, its senders are.
HIGH_WATER_FRAMES = 1024
# Bulk (relayed) bytes queued for one peer before it counts as too slow and is dropped. Relayed
# connections are flow-controlled end to end (one window each: 4 MiB, up to 16 MiB on a long
# fast path), so only a peer that stopped reading, or dozens of relayed connections queued
# behind one slow link at once, get there.
SEND_QUEUE_BULK_BYTES = 256 * 1024 * 1024
# A node originating relayed data waits while a link holds more bulk bytes than this.
HIGH_WATER_BULK_BYTES = 16 * 1024 * 1024
RECV_CHUNK_BYTES = 256 * 1024
# Payloads at least this large are written on their own, as they are, not joined with others.
DIRECT_WRITE_BYTES = 64 * 1024
# A reader yields to the other greenlets (writers, the application) after receiving this much.
YIELD_EVERY_BYTES = 256 * 1024

_link_ids = itertools.count(1)


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
        self._control: collections.deque = collections.deque()
        self._bulk: collections.deque = collections.deque()
        self._bulk_bytes = 0
        self._max_frames = send_queue_frames
        self._wakeup = gevent.event.Event()
        self._drained = gevent.event.Event()
        self.bytes_sent = 0
        self.bytes_received = 0
        self._last_rx = time.monotonic()
        self._greenlets: list = []
        self._nonce = itertools.count(1)

    def __repr__(self) -> str:
        return f"<Link {self.id} {self.label}{' closed' if self.closed else ''}>"

    @property
    def closed(self) -> bool:
        return self.close_reason is not None

    def start(self) -> "Link":
        self._greenlets = [
            gevent.spawn(self._read_loop),
            gevent.spawn(self._write_loop),
            gevent.spawn(self._ping_loop),
        ]
        return self

    def send(self, message, *, bulk: bool = False, checked: bool = True) -> bool:
        """Queue ``message``; return False if the link is closed (or just closed as too slow).

        ``bulk`` frames (relayed data) wait behind every control frame; ``checked=False`` is for
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
        if bulk:
            size = len(frame[0]) + len(frame[1])
            if self._bulk_bytes + size > SEND_QUEUE_BULK_BYTES:
                self.close(f"bulk send queue full ({SEND_QUEUE_BULK_BYTES} bytes): peer too slow")
                return False
            self._bulk.append(frame)
            self._bulk_bytes += size
        else:
            if len(self._control) >= self._max_frames:
                self.close(f"send queue full ({self._max_frames} frames): peer too slow")
                return False
            self._control.append(frame)
        self._wakeup.set()
        return True

    def wait_room(self, *, bulk: bool = False) -> None:
        """Block (cooperatively) while the queue is above its high-water mark."""
        while not self.closed and (self._bulk_bytes > HIGH_WATER_BULK_BYTES if bulk
                                   else len(self._control) > HIGH_WATER_FRAMES):
            self._drained.clear()
            self._drained.wait()

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
        try:
            decoder = self._decoder
            self._dispatch_buffered()
            unyielded = 0
            recv_into = self.sock.recv_into
            while not self.closed:
                # Receive at least what the frame under way still lacks before decoding again
                # (a TLS socket gives one record, at most 16 KiB, per call).
                missing = decoder.missing()
                n = 0
                with decoder.recv_buffer(missing) as room:
                    while n < missing:
                        got = recv_into(room[n:])
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
                self._dispatch_buffered()
                unyielded += n
                if unyielded >= YIELD_EVERY_BYTES:
                    unyielded = 0
                    gevent.sleep(0)
        except RemoteProtocolError as exc:
            log.warning("dropping %s: protocol error: %s", self.label, exc)
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

    def _dispatch_buffered(self) -> None:
        while not self.closed:
            message = self._decoder.next_message()
            if message is None:
                return
            if isinstance(message, wire.Ping):
                self.send(wire.Pong(message.nonce))
            elif isinstance(message, wire.Pong):
                pass
            else:
                self._on_message(self, message)

    def _write_loop(self) -> None:
        try:
            while not self.closed:
                if not self._control and not self._bulk:
                    self._wakeup.clear()
                    self._wakeup.wait()
                    continue
                # Control frames first, then bulk ones, at most one chunk's worth (or one large
                # frame), so control never waits long behind bulk.
                frames, size = [], 0
                while self._control and size < RECV_CHUNK_BYTES:
                    frame = self._control.popleft()
                    frames.append(frame)
                    size += len(frame[0]) + len(frame[1])
                while self._bulk and size < RECV_CHUNK_BYTES:
                    frame = self._bulk.popleft()
                    n = len(frame[0]) + len(frame[1])
                    self._bulk_bytes -= n
                    frames.append(frame)
                    size += n
                if len(self._control) <= HIGH_WATER_FRAMES // 2 and self._bulk_bytes <= HIGH_WATER_BULK_BYTES // 2:
                    self._drained.set()
                self._write(frames)
                self.bytes_sent += size
        except (OSError, ValueError) as exc:
            self.close(f"send failed: {exc or type(exc).__name__}")

    def _write(self, frames: list) -> None:
        """Write ``frames`` (head, payload) in order: small parts joined into one write (fewer
        syscalls and TLS records), each large payload on its own, uncopied."""
        sendall = self.sock.sendall
        small: list = []
        for head, payload in frames:
            small.append(head)
            if len(payload) >= DIRECT_WRITE_BYTES:
                sendall(b"".join(small) if len(small) > 1 else small[0])
                small = []
                sendall(payload)
            elif payload:
                small.append(payload)
        if small:
            sendall(b"".join(small) if len(small) > 1 else small[0])

    def _ping_loop(self) -> None:
        while not self.closed:
            gevent.sleep(self._ping_interval_s)
            idle = time.monotonic() - self._last_rx
            if idle > self._timeout_s:
                self.close(f"no traffic for {idle:.1f} s (limit {self._timeout_s:.1f} s)")
                return
            if idle >= self._ping_interval_s:
                self.send(wire.Ping(next(self._nonce) & 0xFFFFFFFF))


def tune_socket(sock) -> None:
    """TCP no-delay (small control messages must not wait for Nagle) and keepalive; no-op for Unix sockets."""
    if sock.family in (gsocket.AF_INET, gsocket.AF_INET6):
        sock.setsockopt(gsocket.IPPROTO_TCP, gsocket.TCP_NODELAY, 1)
        sock.setsockopt(gsocket.SOL_SOCKET, gsocket.SO_KEEPALIVE, 1)
