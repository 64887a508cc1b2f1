"""The ``relay`` method: a connection tunnelled through the bootstrap routes, the last resort.

Theory of operation
-------------------
Both ends of a relayed connection are :class:`RelayStream` objects, one in each node, named by
``(peer node id, connection id)``; the client picks the connection id. Two nodes may open
relayed connections to each other at the same moment, each picking an id, and both ids name a
connection in the same table at each end: so the ids a node picks for a peer are even when its
own node id sorts before the peer's, odd otherwise (:meth:`RelayManager.new_conn_id`), and the
two directions of a pair never pick the same id. A node's ids start at a random point (a
restarted node, same id, does not reuse what its peers may still hold) and skip any id still
in use with that peer. (A responder takes any id that is free, as older nodes picked theirs
from 1 up in both directions.) Their bytes travel as
routed messages with topic ``relay`` along the bootstrap tree (the same path for the whole
life of the connection, so the links' FIFO order is the stream's order). Each message's
payload starts with a header ``conn_id: u32 | type: u8 | value: u32``:

- ``DATA``: the rest of the payload is stream data (at most ``RELAY_CHUNK_BYTES``); ``value``
  is the stream offset of its first byte, modulo 2^32: a receiver that finds another offset
  than the bytes it has had (a frame lost when a link on the path was replaced) resets the
  connection rather than deliver a stream with a hole in it;
- ``EOF``: the sender half-closed;
- ``CREDIT``: the sender may send ``value`` more bytes: what the receiver's application
  consumed, plus the growth of its window (below);
- ``RESET``: the connection is gone (closed, or unknown at the receiver).

Ends. ``send_eof`` sends EOF: the peer's ``receive_some`` returns what came before, then
``b""``. ``close`` sends RESET (and forgets the connection). A RESET that arrives after the
peer's EOF is the tail of an orderly end (the peer sent everything, then closed): receiving
still ends with ``b""``, sending raises BrokenStreamError. A RESET *before* the peer's EOF --
the peer closed without ``send_eof``, its node reset the connection, or a malformed frame --
breaks the stream: ``receive_some`` returns the data that arrived, then raises
BrokenStreamError, as does ``send_all``. So does losing the path: the peer's node left the
grid (:meth:`RelayManager.reset_peers`, called when a route or the rendez-vous node is lost),
or a frame could not be routed. A relayed connection never reads as a clean end unless the
peer's EOF arrived.

Flow control is end to end and credit based: a sender never has more than the receiver's
window in flight, so a bulk transfer can grow no queue on any link or node beyond one window,
and links send relayed frames after their control traffic. There is no cap on bytes or
duration. The window starts at ``RELAY_WINDOW_BYTES`` and is sized for the path by the
receiver (as QUIC implementations tune theirs): it returns credit in batches of a quarter of
its window, and when the application consumed that batch faster than the path's
bandwidth-delay product needs (consumption rate x 2 round trips > window), it doubles the
window, up to ``RELAY_MAX_WINDOW_BYTES``, by granting more than was consumed. The round trip
is measured by the receiver itself: data beyond the limit a credit raised cannot arrive before
one round trip after the credit left, so that delay is a sample of the path's round trip
(forwarding time included), and the estimate is the shortest sample seen: the path's own
round trip, without the queues. A moving average would count the queue a bottleneck hop
holds (the window itself, waiting there) as path, enlarge the window for it, and so grow the
queue, up to the largest window, on every slow path.

Cost. Outside TLS, the data path copies each byte twice: the sender copies the application's
bytes into the routed payload (joined to the 9-byte header), and ``receive_some`` copies out
what it returns. In between no node copies a DATA frame's payload: each link decoder receives
a large frame into a buffer of its own and hands the payload out as a view of it
(:class:`~gridsock.wire.Decoder`), a forwarding hop writes that view to the next link as it is,
and the receiver keeps the views until the application reads them. TLS on each bootstrap link
is the rest of the per-byte cost (docs/benchmarks.md, "Relay: where the time goes").
"""
from __future__ import annotations

import collections
import logging
import secrets
import struct
import time
from typing import Any, Callable, Deque, Dict, Optional, Tuple

import gevent
import gevent.event

from .. import memory
from .._ratelog import RateLimitedLog
from ..errors import BrokenStreamError, RemoteProtocolError
from ..methods import Initiation, InitiatorContext, Method, ResponderContext
from ..streams import DEFAULT_RECEIVE_BYTES, Stream, take_chunk

__all__ = ["RelayMethod", "RelayStream", "RelayManager", "RELAY_WINDOW_BYTES", "RELAY_MAX_WINDOW_BYTES",
           "RELAY_CHUNK_BYTES", "RELAY_FORMAT"]

log = logging.getLogger(__name__)

# The window a relayed connection starts with (bytes a sender may have in flight): fills a
# 4-hop path on a LAN; a receiver enlarges it for a longer path (see the module docstring).
RELAY_WINDOW_BYTES = 4 * 1024 * 1024
# The largest window: about 800 MB/s over 20 ms of round trip. It bounds what one relayed
# connection can queue on a node (a link holds SOURCE_SHARE_BYTES, as much, of one source).
RELAY_MAX_WINDOW_BYTES = 16 * 1024 * 1024
# Data per routed message: large enough that per-message work (header, routing, a write:
# about 20 us a hop) is a few per cent of the copy and the TLS of its bytes; small enough
# that a control frame, which waits behind at most one of these on a link, waits no longer
# than behind the links' usual coalesced write (RECV_CHUNK_BYTES), and that the initial window
# holds 16 of them, which keeps the pipe full while credit returns.
RELAY_CHUNK_BYTES = 256 * 1024
# Many connections with one peer share its path: the DATA frames their senders put in line at
# once total about this much (each frame is at most this divided by the connections open with
# the peer, and at least RELAY_MIN_CHUNK_BYTES), so that the first frames of a connection that
# just opened (its TLS handshake) wait behind this much, not behind a full frame of each of
# hundreds of connections (128 MB for 500: longer than a TLS handshake may take). Up to 32
# connections with a peer still send full frames.
RELAY_LINE_BYTES = 8 * 1024 * 1024
RELAY_MIN_CHUNK_BYTES = 16 * 1024
_HEADER = struct.Struct("!IBI")
# The relay's framing and flow control, offered in the assembly request. 2: DATA of up to
# 256 KiB and a receiver-sized window (format 1: 64 KiB and a fixed 1 MiB window).
RELAY_FORMAT = 2
DATA, EOF, CREDIT, RESET = 1, 2, 3, 4
_TYPES = {DATA: "DATA", EOF: "EOF", CREDIT: "CREDIT", RESET: "RESET"}


class _RelayOpening(Initiation):
    def __init__(self, stream: "RelayStream") -> None:
        self.offer: Dict[str, Any] = {"conn": stream.conn_id, "format": RELAY_FORMAT}
        self._stream = stream

    def complete(self, answer: Dict[str, Any]) -> Stream:
        return self._stream

    def abort(self) -> None:
        self._stream.close()


class RelayMethod(Method):
    """``relay``: both ends are :class:`RelayStream` objects of the nodes' :class:`RelayManager`.

    Initiator: open our end under a new connection id and offer the id and the relay format
    (``{"conn": id, "format": RELAY_FORMAT}``). Responder: refuse another format (the request
    is ``bad-request``: both ends must frame and credit alike), else open the other end under
    that id and deliver it at once.
    """

    name = "relay"

    def initiate(self, ctx: InitiatorContext) -> Initiation:
        relay = ctx.node.relay
        return _RelayOpening(relay.open(ctx.peer.node_id, relay.new_conn_id(ctx.peer.node_id, ctx.me.node_id)))

    def respond(self, ctx: ResponderContext) -> Dict[str, Any]:
        conn = ctx.offer.get("conn")
        if type(conn) is not int or not 0 <= conn < 2**32:
            raise RemoteProtocolError(f"bad relay connection id {conn!r}")
        form = ctx.offer.get("format", 1)  # format 1 did not say
        if form != RELAY_FORMAT:
            raise RemoteProtocolError(f"relay format {form!r} offered, this node speaks {RELAY_FORMAT} "
                                      "(256 KiB frames, a growing window): run the same gridsock on both nodes")
        stream = ctx.node.relay.open(ctx.client.node_id, conn)
        gevent.spawn(ctx.deliver, stream)
        return {}


class RelayStream(Stream):
    """One end of a relayed connection; see the module docstring."""

    def __init__(self, manager: "RelayManager", peer_id: str, conn_id: int) -> None:
        self.info = {"method": "relay", "peer_id": peer_id, "conn_id": conn_id}
        self._manager = manager
        self.peer_id = peer_id
        self.conn_id = conn_id
        self._chunks: Deque[memoryview] = collections.deque()  # received, not yet read
        self._credit = RELAY_WINDOW_BYTES  # what we may still send
        # Receiving: the window we give the peer, what the application consumed that we have
        # not credited back yet, and what arrived and was not credited (bounds a misbehaving
        # sender); the window's tuning: the peer's limit (bytes it may send in all), the
        # pending round-trip probe (when a credit left, the limit before it), the shortest
        # round trip seen, and when the last credit left.
        self._window = RELAY_WINDOW_BYTES
        self._received_unacked = 0
        self._in_flight_to_us = 0
        self._limit = RELAY_WINDOW_BYTES
        self._probe: Optional[Tuple[float, int]] = None
        self.rtt_s: Optional[float] = None
        self._last_credit_at = time.monotonic()
        self._peer_eof = False
        self._reset = False
        self._reset_reason = "the peer reset the relayed connection"
        self._eof_sent = False
        self._closed = False
        self._readable = gevent.event.Event()
        self._writable = gevent.event.Event()
        self.bytes_sent = 0
        self.bytes_received = 0

    def __repr__(self) -> str:
        return f"<RelayStream {self.peer_id[:8]}#{self.conn_id}>"

    # --- Stream ------------------------------------------------------------------------------

    def send_all(self, data) -> None:
        """Send all of ``data``, waiting for credit; raises BrokenStreamError (see "Ends")."""
        view = memoryview(data).cast("B")
        while len(view):
            self._check_sendable()
            if self._credit <= 0:
                self._writable.clear()
                self._writable.wait()
                continue
            n = min(len(view), self._credit, self._manager.chunk_bytes(self.peer_id))
            self._credit -= n
            self._manager.transmit(self, DATA, self.bytes_sent & 0xFFFFFFFF, view[:n])
            self.bytes_sent += n
            view = view[n:]
            gevent.sleep(0)  # let the link's writer take the frame now: a pipeline, not a batch

    def receive_some(self, max_bytes: int = DEFAULT_RECEIVE_BYTES) -> bytes:
        """Return 1 to ``max_bytes`` bytes, or ``b""`` after the peer's EOF. Raises
        BrokenStreamError once the data that arrived is read if the connection was reset
        before the peer's EOF (see "Ends" in the module docstring), or after ``close()``."""
        while True:
            if self._closed:
                raise BrokenStreamError("stream is closed")
            if self._chunks:
                chunk = take_chunk(self._chunks, max_bytes)
                data = bytes(chunk)
                self._consumed(len(data))
                return data
            if self._peer_eof:
                return b""
            if self._reset:
                raise BrokenStreamError(f"relay with {self.peer_id}: {self._reset_reason}")
            self._readable.clear()
            self._readable.wait()

    def send_eof(self) -> None:
        if self._closed or self._eof_sent or self._reset:
            return
        self._eof_sent = True
        self._manager.transmit(self, EOF, 0, b"")

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if not self._reset:
            self._manager.transmit(self, RESET, 0, b"", quiet=True)
        self._manager.forget(self)
        self._chunks.clear()  # what arrived and was never read goes now, not with the object
        self._readable.set()
        self._writable.set()

    # --- from the manager --------------------------------------------------------------------

    def _check_sendable(self) -> None:
        if self._closed:
            raise BrokenStreamError("stream is closed")
        if self._eof_sent:
            raise BrokenStreamError("cannot send after send_eof()")
        if self._reset:
            raise BrokenStreamError(f"relay with {self.peer_id}: {self._reset_reason}")

    def _consumed(self, n: int) -> None:
        self._received_unacked += n
        self._in_flight_to_us -= n
        if self._received_unacked >= self._window // 4 and not self._reset:
            now = time.monotonic()
            grow = self._growth(self._received_unacked, now - self._last_credit_at)
            credit, self._received_unacked = self._received_unacked + grow, 0
            self._window += grow
            if self._probe is None:
                self._probe = (now, self._limit)
            self._limit += credit
            self._last_credit_at = now
            self._manager.transmit(self, CREDIT, credit, b"", quiet=True)

    def _growth(self, consumed: int, elapsed_s: float) -> int:
        """How much to enlarge the window at a credit: double it while the application
        consumes faster than the window allows for two round trips, else nothing."""
        if self.rtt_s is None or self._window >= RELAY_MAX_WINDOW_BYTES:
            return 0
        if consumed * 2 * self.rtt_s > self._window * elapsed_s:  # rate * 2 RTT > window
            return min(self._window, RELAY_MAX_WINDOW_BYTES - self._window)
        return 0

    @property
    def window(self) -> int:
        """The receive window this end gives its peer now (bytes)."""
        return self._window

    def _on_frame(self, kind: int, value: int, data) -> None:
        if kind == DATA:
            if self._peer_eof:
                raise RemoteProtocolError("relay data after EOF")
            if value != self.bytes_received & 0xFFFFFFFF:
                raise RemoteProtocolError(f"relay data at offset {value}, expected {self.bytes_received & 0xFFFFFFFF} "
                                          "(a frame was lost on the path)")
            self._in_flight_to_us += len(data)
            if self._in_flight_to_us > self._window:
                raise RemoteProtocolError(f"relay peer sent beyond its window ({self._in_flight_to_us} bytes)")
            self.bytes_received += len(data)
            probe = self._probe
            if probe is not None and self.bytes_received > probe[1]:  # sent after our credit came
                sample = time.monotonic() - probe[0]
                self.rtt_s = sample if self.rtt_s is None else min(self.rtt_s, sample)
                self._probe = None
            if not self._closed and data:
                self._chunks.append(data)
            self._readable.set()
        elif kind == EOF:
            self._peer_eof = True
            self._readable.set()
        elif kind == CREDIT:
            self._credit += value
            if self._credit > RELAY_MAX_WINDOW_BYTES:
                raise RemoteProtocolError("relay peer granted more credit than the window")
            self._writable.set()
        elif kind == RESET:
            self._break(None)

    def _break(self, reason) -> None:
        """The connection is gone (a RESET, a lost path): wake both directions; ``reason``
        replaces the default one in later errors."""
        if reason is not None and not self._reset:
            self._reset_reason = reason
        self._reset = True
        self._readable.set()
        self._writable.set()
        self._manager.forget(self)


class RelayManager:
    """All relayed connections of one node; ``send(dst_id, payload)`` routes a relay message."""

    def __init__(self, send: Callable[[str, bytes], None]) -> None:
        self._send = send
        # What peers make us log (malformed relay messages), rate-limited per source node.
        self._peer_log = RateLimitedLog(log)
        self._streams: Dict[Tuple[str, int], RelayStream] = {}
        self._per_peer: Dict[str, int] = {}  # peer id -> connections open with it
        # The next id is drawn from here (its parity is set by the pair: see new_conn_id);
        # a random start, so that a node restarted under the same id does not reuse the ids
        # of its previous life that its peers may still hold.
        self._next_conn_id = secrets.randbelow(2**32)

    def __len__(self) -> int:
        return len(self._streams)

    def new_conn_id(self, peer_id: str, local_id: str) -> int:
        """A connection id for a new relayed connection this node opens to ``peer_id``: even
        if ``local_id`` (this node's id) sorts before ``peer_id``, odd if after, so that the
        ids the two nodes of a pair pick never meet (see the module docstring); never one in
        use with ``peer_id``. Raises RuntimeError if every id of that parity is in use (2^31
        connections with one peer: never)."""
        parity = 0 if local_id < peer_id else 1
        for _ in range(len(self._streams) + 1):  # a free one among the next len + 1 candidates
            conn_id = ((self._next_conn_id & ~1) | parity) & 0xFFFFFFFF
            self._next_conn_id = (conn_id + 2) & 0xFFFFFFFF
            if (peer_id, conn_id) not in self._streams:
                return conn_id
        raise RuntimeError(f"no free relayed connection id with {peer_id}")

    def open(self, peer_id: str, conn_id: int) -> RelayStream:
        """Make the local end of relayed connection ``conn_id`` with ``peer_id``."""
        key = (peer_id, conn_id)
        if key in self._streams:
            raise RemoteProtocolError(f"relayed connection {conn_id} with {peer_id} exists already")
        stream = RelayStream(self, peer_id, conn_id)
        self._streams[key] = stream
        self._per_peer[peer_id] = self._per_peer.get(peer_id, 0) + 1
        return stream

    def chunk_bytes(self, peer_id: str) -> int:
        """The largest DATA frame a connection with ``peer_id`` sends now (see RELAY_LINE_BYTES)."""
        share = RELAY_LINE_BYTES // max(1, self._per_peer.get(peer_id, 1))
        return max(RELAY_MIN_CHUNK_BYTES, min(RELAY_CHUNK_BYTES, share))

    def forget(self, stream: RelayStream) -> None:
        if self._streams.get((stream.peer_id, stream.conn_id)) is stream:
            del self._streams[(stream.peer_id, stream.conn_id)]
            left = self._per_peer.pop(stream.peer_id, 1) - 1
            if left > 0:
                self._per_peer[stream.peer_id] = left
            memory.trim_soon()  # its window's worth of frames may have been freed just now

    def transmit(self, stream: RelayStream, kind: int, value: int, data, *, quiet: bool = False) -> None:
        # The one copy of the data on this node: into the payload, after its header.
        payload = _HEADER.pack(stream.conn_id, kind, value) + data
        try:
            self._send(stream.peer_id, payload)
        except Exception as exc:  # any routing failure breaks this connection only
            if quiet:
                log.debug("relay %s: %s not sent: %s", stream, _TYPES[kind], exc)
                return
            stream._break(f"sending {_TYPES[kind]} failed: {exc}")
            raise BrokenStreamError(f"relay to {stream.peer_id}: {exc}") from exc

    def on_message(self, src: str, payload: bytes) -> None:
        """A relay message from node ``src`` arrived. Raises nothing: bad input resets."""
        if len(payload) < _HEADER.size:
            self._peer_log.warning(src, "dropping a short relay message from %s", src)
            return
        conn_id, kind, value = _HEADER.unpack_from(payload)
        data = memoryview(payload)[_HEADER.size :]  # kept as it is until the application reads it
        stream = self._streams.get((src, conn_id))
        if stream is None:
            if kind != RESET:
                log.debug("relay %s from %s for unknown connection %d: resetting", _TYPES.get(kind, kind), src, conn_id)
                try:
                    self._send(src, _HEADER.pack(conn_id, RESET, 0))
                except Exception:
                    pass
            return
        if kind not in _TYPES or (kind != DATA and data) or len(data) > RELAY_CHUNK_BYTES:
            self._peer_log.warning(src, "relay from %s: malformed frame (type %s, %d bytes): resetting", src, kind,
                                   len(data))
            stream._break(f"malformed relay frame (type {kind}, {len(data)} bytes)")
            self._send_reset(stream)
            return
        try:
            stream._on_frame(kind, value, data)
        except RemoteProtocolError as exc:
            self._peer_log.warning(src, "relay from %s: %s: resetting", src, exc)
            stream._break(str(exc))
            self._send_reset(stream)

    def _send_reset(self, stream: RelayStream) -> None:
        try:
            self._send(stream.peer_id, _HEADER.pack(stream.conn_id, RESET, 0))
        except Exception:
            pass

    def reset_peers(self, peer_ids, reason: str) -> None:
        """Break the relayed connections with ``peer_ids`` (all of them for None): the path
        is lost. Their readers get what arrived, then BrokenStreamError (``b""`` if the peer's
        EOF had arrived); their writers BrokenStreamError."""
        for (peer_id, conn_id), stream in list(self._streams.items()):
            if peer_ids is None or peer_id in peer_ids:
                log.info("relay %s reset: %s", stream, reason)
                stream._break(reason)
