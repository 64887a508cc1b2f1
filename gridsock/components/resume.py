"""The ``resume`` layer: a connection that survives losing its path, and moves to a better one.

Theory of operation
-------------------
``resume`` stands right above the method in a stack string (``tls/resume/relay``,
``resume/tcp``, ``tls/resume/parallel(streams=2)/tcp``): a *method wrapper*, as ``parallel``
is. It makes its connection with the method below it, and both ends wrap that *lower* stream in
a :class:`ResumeStream`, which the filters above (``tls``) and the application use. When the
lower stream breaks, the initiator makes a new one -- an assembly request of its own, carrying a
one-time resume token -- and both ends carry on over it without losing or repeating a byte; the
filters above and the application's socket never see it. The initiator also tries, from time to
time, the better methods the rules list for the pair (``tcp``, ``reverse``, ``splice`` for a
relayed connection, as libp2p's DCUtR does) and moves to the first that connects.

Frames. Everything on a lower stream is a frame, a header of :data:`HEADER_BYTES`
(``FRAME_HEADER``, network order) ``version u8 = 1 | type u8 | value u64 | length u32`` and
``length`` bytes of payload for ``DATA`` (none for the others):

- ``DATA`` (1): ``value`` is the stream offset of the payload's first byte (1 to
  :data:`MAX_FRAME_DATA_BYTES` bytes). A receiver keeps what is beyond what it already has
  (bytes sent twice across a switch are dropped), and refuses a frame that would leave a hole;
- ``ACK`` (2): ``value`` is the *position* the receiver's application has consumed: bytes, plus
  one once it consumed the sender's EOF. The sender forgets what is acknowledged;
- ``EOF`` (3): the sender half-closed; ``value`` is its offset (every byte sent before it);
- ``RESET`` (4): the sender aborted the connection (``close()`` without ``send_eof()``);
- ``HELLO`` (5): the first frame each side sends on a lower stream that *continues* the
  connection (not on the first one): ``value`` is the position this side has *received*. Each
  side sends again, on the new lower stream, everything from the position the other's HELLO
  names: the switch happens at a byte boundary;
- ``PING`` (6), ``PONG`` (7): a side that heard nothing on its lower stream for
  :data:`KEEPALIVE_S` sends a PING (``value``: a nonce), which the peer's reader answers with a
  PONG at once. A lower stream silent for :data:`SILENT_S` is lost, as if it had broken.

Memory bound and flow. A sender keeps every byte until it is acknowledged, at most
:data:`RESUME_BUFFER_BYTES` per direction and connection (``send_all`` blocks while it is full).
Acknowledgements count what the *application consumed*, not what arrived, so the same bound is
the receiver's window: the reader never stops reading its lower stream (an ACK is never stuck
behind data the application does not read), and what it holds for the application is at most
:data:`RESUME_BUFFER_BYTES` (more is a RemoteProtocolError). A connection costs at most twice
that per side, plus a frame.

Tokens. The server issues a token (:data:`RESUME_TOKEN_BYTES` random bytes) with its answer to
the connection's assembly request (``{"resume": {"id", "token", "format"}}``), over the meta
channel: it never travels on the data path. The initiator presents it in the offer of the
assembly request that makes the next lower stream; the server accepts it only from the node the
connection belongs to (the requesting node's id, proven by the meta channel's TLS), only once,
and only while the connection lives: it answers a fresh token with its acceptance. A token dies
when it is used, when its connection ends, and when the connection could not resume within its
bound; then the request is refused ``bad-token``.

Breaks and the bound. A lower stream that breaks (or ends before the connection did) suspends
the connection: sends keep filling the buffer, receives wait. The initiator makes a new lower
stream (its method first, then the rules' other candidates) with backoff
(:data:`RETRY_INITIAL_S` doubling to :data:`RETRY_MAX_S`); the responder waits. A connection
that has no lower stream again within ``timeout`` (the ``resume(timeout=S)`` parameter,
:data:`RESUME_TIMEOUT_S` by default) is *reset* on both sides -- never ended cleanly: receives
raise BrokenStreamError after what arrived, so the application's socket gets ECONNRESET -- and so
is one whose re-assembly the server refused for good (a policy, a dead token). A lower stream
is lost when it reports an error or an end, and when it stays silent for :data:`SILENT_S`
(the PINGs above): a NAT mapping gone without a reset is noticed in seconds, not after TCP's
retransmission timeouts.

Upgrades. An initiator whose lower stream's method is of a worse tier than ``direct``
(:data:`gridsock.rules.TIERS`) tries the rules' better candidates for the pair after
:data:`UPGRADE_INITIAL_S`, then at doubling intervals up to :data:`UPGRADE_MAX_S`, at most
:data:`UPGRADE_ROUNDS` rounds (``resume(upgrade=false)`` turns it off). A candidate that
connects replaces the lower stream (the old one is closed: what was in flight on it is sent
again from the HELLO positions).

Ends. ``send_eof`` sends EOF after the data; ``close`` after it lingers (in the background, at
most :data:`CLOSE_LINGER_S`) until both directions ended and were acknowledged, then closes the
lower stream in order; ``close`` without ``send_eof`` is an abort (RESET). When both sides sent
EOF and each acknowledged the other's, the lower stream is closed and the connection forgotten.
An end finishes only once its last ACK went on the lower stream it closes: one sent on a path
that was lost may have been lost with it, and is sent again on the next (the peer would wait for
a resume that never comes). A resume ends the suspension's timer with it.
"""
from __future__ import annotations

import dataclasses
import hmac
import logging
import secrets
import struct
import time
import weakref
from collections import deque
from typing import Any, Deque, Dict, List, Optional, Tuple

import gevent
import gevent.event
import gevent.lock

from ..errors import BrokenStreamError, ConfigError, ConnectError, GridsockError, RemoteProtocolError
from ..methods import Initiation, InitiatorContext, MethodRefusal, ResponderContext
from ..streams import DEFAULT_RECEIVE_BYTES, Stream, take_chunk

__all__ = [
    "ResumeMethod",
    "ResumeStream",
    "FrameDecoder",
    "encode_frame",
    "live_streams",
    "reset_all",
    "FRAME_HEADER",
    "HEADER_BYTES",
    "FRAME_VERSION",
    "DATA",
    "ACK",
    "EOF",
    "RESET",
    "HELLO",
    "PING",
    "PONG",
    "KEEPALIVE_S",
    "SILENT_S",
    "RESUME_FORMAT",
    "RESUME_BUFFER_BYTES",
    "RESUME_TIMEOUT_S",
    "RESUME_TOKEN_BYTES",
    "ATTEMPT_TIMEOUT_S",
    "RETRY_INITIAL_S",
    "RETRY_MAX_S",
    "RETRY_CODES",
    "UPGRADE_INITIAL_S",
    "UPGRADE_MAX_S",
    "UPGRADE_ROUNDS",
    "CLOSE_LINGER_S",
    "MAX_FRAME_DATA_BYTES",
]

log = logging.getLogger(__name__)

FRAME_HEADER = struct.Struct("!BBQI")
HEADER_BYTES = FRAME_HEADER.size
FRAME_VERSION = 1
DATA, ACK, EOF, RESET, HELLO, PING, PONG = 1, 2, 3, 4, 5, 6, 7
_TYPES = {DATA: "DATA", ACK: "ACK", EOF: "EOF", RESET: "RESET", HELLO: "HELLO", PING: "PING", PONG: "PONG"}
# The layer's framing and tokens, in the assembly request's offer: both ends must agree.
RESUME_FORMAT = 1

# Unacknowledged bytes per connection and direction: what a sender keeps to send again after a
# switch, and the receiver's window. 4 MiB keeps a LAN or a relay path busy (the relay's own
# first window is the same) and costs at most 8 MiB per connection and side.
RESUME_BUFFER_BYTES = 4 * 1024 * 1024
# A connection without a lower stream for this long is reset: long enough for a rendez-vous
# node's failover or a leader's reconnection (seconds), short enough that a program learns.
RESUME_TIMEOUT_S = 30.0
# One attempt at a new lower stream (an assembly request and its method).
ATTEMPT_TIMEOUT_S = 10.0
# Re-assembly after a break: the first retry waits this long, doubling to RETRY_MAX_S.
RETRY_INITIAL_S = 0.2
RETRY_MAX_S = 4.0
# Upgrades of a relayed (or gatewayed) connection: the first try this long after it opened,
# then at doubling intervals up to UPGRADE_MAX_S; at most UPGRADE_ROUNDS rounds in all.
UPGRADE_INITIAL_S = 2.0
UPGRADE_MAX_S = 300.0
UPGRADE_ROUNDS = 16
# A lower stream on which nothing arrived for KEEPALIVE_S gets a PING (answered at once by the
# peer's reader, which never stops reading); one silent for SILENT_S is lost (a NAT mapping gone
# without a reset, a dead relay route): well before TCP's own retransmission timeouts.
KEEPALIVE_S = 5.0
SILENT_S = 15.0
# A closed connection waits at most this long for its last bytes to be acknowledged.
CLOSE_LINGER_S = 60.0
# 256 random bits: a token cannot be guessed.
RESUME_TOKEN_BYTES = 32
# Data per frame sent: large enough that a header is nothing; the most a receiver accepts.
FRAME_DATA_BYTES = 256 * 1024
MAX_FRAME_DATA_BYTES = 1024 * 1024
# A payload under this size is joined to its header (one send below), a larger one sent alone.
SMALL_FRAME_BYTES = 16 * 1024
# What the reader asks its lower stream for at a time.
RECEIVE_BYTES = 256 * 1024
# An acknowledgement goes when this much was consumed since the last, or ACK_DELAY_S after
# the first byte not acknowledged yet, or with any frame sent anyway.
ACK_BYTES = RESUME_BUFFER_BYTES // 4
ACK_DELAY_S = 0.02
# Refusals that may change while the connection waits: the method failed on the server's side,
# or the server does not know the client yet (both relinking after a rendez-vous node's restart).
RETRY_CODES = ("unreachable", "unknown-node")
# A RESET frame, best effort: a lower stream that cannot take 14 bytes within this is closed anyway.
RESET_SEND_S = 1.0
# The server waits this long for a new lower stream's nomination (as the assembler does).
NOMINATION_TIMEOUT_S = 10.0

# node -> {(side, session id): stream}: the live connections of each node with this layer.
_LIVE: "weakref.WeakKeyDictionary[Any, Dict[Tuple[str, int], ResumeStream]]" = weakref.WeakKeyDictionary()


def live_streams(node) -> List["ResumeStream"]:
    """The live resumable connections of ``node`` (both sides), oldest first."""
    return list(_LIVE.get(node, {}).values())


def reset_all(node, reason: str) -> None:
    """Reset every live resumable connection of ``node`` (it stops: nothing can resume them)."""
    for stream in live_streams(node):
        stream._fail(reason, send_reset=True, log_level=logging.DEBUG)


def _table(node) -> Dict[Tuple[str, int], "ResumeStream"]:
    table = _LIVE.get(node)
    if table is None:
        table = _LIVE[node] = {}
    return table


def encode_frame(kind: int, value: int, payload: bytes = b"") -> bytes:
    """One frame; LocalProtocolError-free by construction (callers pass valid values)."""
    return FRAME_HEADER.pack(FRAME_VERSION, kind, value, len(payload)) + payload


class FrameDecoder:
    """Sans-IO: :meth:`feed` bytes from a lower stream, :meth:`next_frame` gives
    ``(type, value, payload)`` or None (more bytes needed). Raises RemoteProtocolError for an
    unknown version or type, a DATA frame of 0 or more than :data:`MAX_FRAME_DATA_BYTES`
    bytes, or a payload on another type; then stays failed."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._failed: Optional[RemoteProtocolError] = None

    def feed(self, data) -> None:
        self._buffer += data

    def next_frame(self) -> Optional[Tuple[int, int, bytes]]:
        if self._failed is not None:
            raise self._failed
        buffer = self._buffer
        if len(buffer) < HEADER_BYTES:
            return None
        version, kind, value, length = FRAME_HEADER.unpack_from(buffer)
        if version != FRAME_VERSION:
            self._failed = RemoteProtocolError(f"resume frame of unknown version {version}")
        elif kind not in _TYPES:
            self._failed = RemoteProtocolError(f"resume frame of unknown type {kind}")
        elif kind == DATA and not 0 < length <= MAX_FRAME_DATA_BYTES:
            self._failed = RemoteProtocolError(f"resume DATA frame of {length} bytes (1 to {MAX_FRAME_DATA_BYTES})")
        elif kind != DATA and length:
            self._failed = RemoteProtocolError(f"resume {_TYPES[kind]} frame with a {length}-byte payload")
        if self._failed is not None:
            raise self._failed
        end = HEADER_BYTES + length
        if len(buffer) < end:
            return None
        if not length:
            payload = b""
        else:
            with memoryview(buffer) as view:  # one copy (a bytearray slice would copy twice)
                payload = bytes(view[HEADER_BYTES:end])
        del buffer[:end]
        return kind, value, payload


class ResumeStream(Stream):
    """One end of a resumable connection over a lower stream; see the module docstring.

    ``initiator``: this side makes new lower streams (``reopen(layers, timeout)`` returns one,
    nominated, for the method layers given; ConnectError if it cannot) and tries upgrades
    (``upgrades()`` returns the better candidates' method layers, best first, or an empty list).
    """

    def __init__(self, lower: Stream, *, initiator: bool, session_id: int, token: Optional[bytes],
                 peer_id: str, peer_name: str, node: Any = None, timeout_s: float = RESUME_TIMEOUT_S,
                 method: str = "", reopen: Any = None, upgrades: Any = None, current_layers: Any = None) -> None:
        self.initiator = initiator
        self.session_id = session_id
        self.peer_id = peer_id
        self.peer_name = peer_name
        self.timeout_s = timeout_s
        self._node = node
        self._token = token  # initiator: the token to present next; responder: the one to accept
        self._reopen = reopen
        self._upgrades = upgrades
        self._current_layers = current_layers  # initiator: the method layers of the lower stream now
        #: What ``gridsock status`` shows of this layer (live): the method under it, resumes, upgrades
    #: (and upgrade attempts, with the last one's error), whether it is suspended, the last break.
        self.state: Dict[str, Any] = {"id": session_id, "method": method, "resumes": 0, "upgrades": 0,
                                      "upgrade_tries": 0, "last_upgrade_error": None, "suspended": False,
                                      "last_break": None}
        detail = dict(lower.info.get("detail") or {}) if isinstance(lower.info, dict) else {}
        detail["resume"] = self.state
        self.info = {**(lower.info if isinstance(lower.info, dict) else {}), "resume": self.state, "detail": detail}
        self._lower: Optional[Stream] = lower
        self._gen = 0
        self._hello_done = True  # the first lower stream has no HELLO
        # Sending: the bytes [acked, sent_total) are kept; send_pos is the next to go on this lower.
        self._buffer = bytearray()
        self._acked = 0  # the peer's ACK position (bytes, + 1 once it consumed our EOF)
        self._sent_total = 0
        self._send_pos = 0
        self._eof_wanted = False
        self._eof_put = False  # our EOF went on this lower
        # Receiving.
        self._chunks: Deque[bytes] = deque()
        self._received = 0
        self._consumed = 0
        self._acked_sent = 0  # the last ACK position sent
        # The lower stream (generation) the last ACK went on: one that went on a lost path may
        # be lost with it, so an end finishes only once its last ACK went on the path it closes.
        self._ack_gen = -1
        self._force_ack = False
        self._pong_due: Optional[int] = None  # a PING's nonce to answer
        self._ping_due = False
        self._last_heard = time.monotonic()  # when the lower stream last gave us a byte
        self._peer_eof = False
        self._broken: Optional[str] = None
        self._closed = False
        self._finished = False
        self._suspended_at: Optional[float] = None
        self._readable = gevent.event.Event()
        self._writable = gevent.event.Event()
        self._wake = gevent.event.Event()
        self._changed = gevent.event.Event()  # a new lower stream, an end: for the resumer
        self._greenlets: List[gevent.Greenlet] = []
        self._background: List[gevent.Greenlet] = []
        # The suspension's timer (asleep up to timeout_s): a resume or an upgrade that ends the
        # suspension kills it, or every resume would leave one asleep for timeout_s.
        self._expiry: Optional[gevent.Greenlet] = None
        # One new lower stream at a time (a resume and an upgrade would spend the same token).
        self._reopening = gevent.lock.Semaphore()
        if node is not None:
            _table(node)[("client" if initiator else "server", session_id)] = self
        self._start(lower, resumed=False)
        if initiator and upgrades is not None:
            self._background.append(gevent.spawn(self._upgrade_loop))

    def __repr__(self) -> str:
        return f"<ResumeStream {'client' if self.initiator else 'server'} #{self.session_id:x} with {self.peer_name}>"

    @property
    def lower(self) -> Optional[Stream]:
        """The lower stream in use now (None while the connection is suspended)."""
        return self._lower

    # --- Stream ------------------------------------------------------------------------------

    def send_all(self, data) -> None:
        """Keep ``data`` for sending (blocking while :data:`RESUME_BUFFER_BYTES` are not
        acknowledged); raises BrokenStreamError after a reset, ``close()`` or ``send_eof()``."""
        view = memoryview(data).cast("B")
        while len(view):
            self._check_sendable()
            room = RESUME_BUFFER_BYTES - (self._sent_total - min(self._acked, self._sent_total))
            if room <= 0:
                self._writable.clear()
                self._writable.wait()
                continue
            n = min(room, len(view))
            self._buffer += view[:n]
            self._sent_total += n
            view = view[n:]
            self._wake.set()
        gevent.sleep(0)  # let the sender take it now

    def receive_some(self, max_bytes: int = DEFAULT_RECEIVE_BYTES) -> bytes:
        """1 to ``max_bytes`` bytes, or ``b""`` after the peer's EOF and everything before it.
        Raises BrokenStreamError once what arrived is read, if the connection was reset."""
        while True:
            if self._closed:
                raise BrokenStreamError("stream is closed")
            if self._chunks:
                chunk = take_chunk(self._chunks, max_bytes)
                self._consumed += len(chunk)
                if self._ack_position() - self._acked_sent >= ACK_BYTES or (self._peer_eof and not self._chunks):
                    self._wake.set()
                elif self._consumed > self._acked_sent:
                    self._wake.set()  # (the sender acknowledges it after ACK_DELAY_S)
                return chunk
            if self._peer_eof:
                return b""
            if self._broken is not None:
                raise BrokenStreamError(f"resumable connection with {self.peer_name}: {self._broken}")
            self._readable.clear()
            self._readable.wait()

    def send_eof(self) -> None:
        if self._closed or self._eof_wanted or self._broken is not None:
            return
        self._eof_wanted = True
        self._wake.set()

    def close(self) -> None:
        """After ``send_eof()``: linger (in the background) until both directions ended, then
        close the lower stream in order. Without: an abort (RESET), at once. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._readable.set()
        self._writable.set()
        # What arrives from now on nobody reads: count it consumed, so the peer can finish.
        self._chunks.clear()
        self._consumed = self._received
        if self._broken is not None or self._finished:
            self._forget()
            self._stop_background()
            return
        if not self._eof_wanted:
            self._fail("closed without EOF", send_reset=True, log_level=logging.DEBUG)
            return
        self._wake.set()
        self._background.append(gevent.spawn(self._linger))

    # --- internals: sending and receiving ----------------------------------------------------

    def _check_sendable(self) -> None:
        if self._closed:
            raise BrokenStreamError("stream is closed")
        if self._eof_wanted:
            raise BrokenStreamError("cannot send after send_eof()")
        if self._broken is not None:
            raise BrokenStreamError(f"resumable connection with {self.peer_name}: {self._broken}")

    def _ack_position(self) -> int:
        """What to acknowledge: the bytes consumed, + 1 once everything before the peer's EOF was."""
        return self._consumed + (1 if self._peer_eof and self._consumed == self._received else 0)

    def _start(self, lower: Stream, *, resumed: bool) -> None:
        gen = self._gen
        self._last_heard = time.monotonic()
        self._ping_due = False
        self._pong_due = None
        self._greenlets = [gevent.spawn(self._read_loop, gen, lower, resumed),
                           gevent.spawn(self._send_loop, gen, lower, resumed),
                           gevent.spawn(self._keepalive, gen)]

    def _keepalive(self, gen: int) -> None:
        """PING a lower stream that went quiet; declare it lost once silent for SILENT_S."""
        while gen == self._gen and self._broken is None:
            quiet = time.monotonic() - self._last_heard
            if quiet >= SILENT_S:
                self._lost(gen, f"nothing arrived for {quiet:.1f} s")
                return
            if quiet >= KEEPALIVE_S:
                self._ping_due = True  # (again each KEEPALIVE_S while nothing comes)
                self._wake.set()
            gevent.sleep(max(0.01, min(KEEPALIVE_S, SILENT_S - quiet) if quiet >= KEEPALIVE_S else KEEPALIVE_S - quiet))

    def _send_loop(self, gen: int, lower: Stream, resumed: bool) -> None:
        try:
            if resumed:
                lower.send_all(encode_frame(HELLO, self._received + (1 if self._peer_eof else 0)))
                while gen == self._gen and not self._hello_done:
                    self._wake.clear()
                    self._wake.wait()
            waited = False
            while gen == self._gen and self._broken is None:
                ack = self._ack_position()
                pending = ack - self._acked_sent
                data_waiting = self._send_pos < self._sent_total
                eof_waiting = (self._eof_wanted and not self._eof_put and self._send_pos == self._sent_total
                               and self._acked <= self._sent_total)
                control = self._ping_due or self._pong_due is not None
                if (data_waiting or eof_waiting or control
                        or (pending > 0 and (pending >= ACK_BYTES or waited or self._force_ack or ack > self._consumed))
                        or (self._force_ack and ack > 0)):
                    head = b""
                    payload = b""
                    acks = False
                    if self._pong_due is not None:
                        head += encode_frame(PONG, self._pong_due)
                        self._pong_due = None
                    if self._ping_due and self._hello_done:
                        head += encode_frame(PING, int(self._last_heard * 1000) & 0xFFFFFFFF)
                        self._ping_due = False
                    if pending > 0 or self._force_ack:
                        head += encode_frame(ACK, ack)
                        self._acked_sent = max(self._acked_sent, ack)
                        self._force_ack = False
                        acks = True
                    if data_waiting:
                        n = min(FRAME_DATA_BYTES, self._sent_total - self._send_pos)
                        start = self._send_pos - self._acked
                        with memoryview(self._buffer) as view:  # (released before anything yields)
                            payload = bytes(view[start:start + n])
                        head += FRAME_HEADER.pack(FRAME_VERSION, DATA, self._send_pos, n)
                        self._send_pos += n
                    elif eof_waiting:
                        head += encode_frame(EOF, self._sent_total)
                        self._eof_put = True
                    if len(payload) < SMALL_FRAME_BYTES:
                        lower.send_all(head + payload)
                    else:  # a large payload goes as it is, not copied behind its header
                        lower.send_all(head)
                        lower.send_all(payload)
                    if acks:
                        self._ack_gen = gen
                    waited = False
                    self._maybe_finish()
                    continue
                self._wake.clear()
                waited = not self._wake.wait(timeout=ACK_DELAY_S if pending > 0 else None)
        except BrokenStreamError as exc:
            self._lost(gen, f"sending: {exc}")
        except Exception as exc:  # a bug: reset rather than hang
            log.exception("%r: sender", self)
            self._fail(f"{type(exc).__name__}: {exc}", send_reset=True)

    def _read_loop(self, gen: int, lower: Stream, resumed: bool) -> None:
        decoder = FrameDecoder()
        first = resumed
        try:
            while True:
                data = lower.receive_some(RECEIVE_BYTES)
                if gen != self._gen:
                    return
                if not data:
                    self._lost(gen, "the lower stream ended")
                    return
                self._last_heard = time.monotonic()
                decoder.feed(data)
                while gen == self._gen:
                    frame = decoder.next_frame()
                    if frame is None:
                        break
                    kind, value, payload = frame
                    if first != (kind == HELLO):
                        raise RemoteProtocolError("HELLO must come first on a resumed lower stream, and only there")
                    first = False
                    self._on_frame(kind, value, payload)
                if self._broken is not None:
                    return
        except BrokenStreamError as exc:
            self._lost(gen, f"receiving: {exc}")
        except RemoteProtocolError as exc:
            if gen == self._gen:
                self._fail(f"bad input: {exc}", send_reset=True, log_level=logging.WARNING)
        except Exception as exc:
            log.exception("%r: reader", self)
            self._fail(f"{type(exc).__name__}: {exc}", send_reset=True)

    def _on_frame(self, kind: int, value: int, payload: bytes) -> None:
        if kind == DATA:
            if self._peer_eof:
                raise RemoteProtocolError("data after EOF")
            if value > self._received:
                raise RemoteProtocolError(f"data at offset {value}, but only {self._received} bytes arrived")
            skip = self._received - value
            if skip >= len(payload):
                return  # sent again across a switch: we have it
            tail = payload[skip:] if skip else payload
            self._received += len(tail)
            if self._received - self._acked_sent > RESUME_BUFFER_BYTES:
                raise RemoteProtocolError(f"the peer sent {self._received - self._acked_sent} bytes beyond what we "
                                          f"acknowledged (window {RESUME_BUFFER_BYTES})")
            if self._closed:
                self._consumed = self._received
                self._wake.set()
            else:
                self._chunks.append(tail)
                self._readable.set()
        elif kind == ACK:
            limit = self._sent_total + (1 if self._eof_wanted else 0)
            if value > limit:
                raise RemoteProtocolError(f"ACK of position {value}, beyond what was sent ({limit})")
            if value > self._acked:
                drop = min(value, self._sent_total) - min(self._acked, self._sent_total)
                if drop:
                    del self._buffer[:drop]
                self._acked = value
                if self._send_pos < min(value, self._sent_total):  # (cannot happen on a sane path)
                    self._send_pos = min(value, self._sent_total)
                self._writable.set()
                self._maybe_finish()
        elif kind == EOF:
            if self._peer_eof:
                if value != self._received:
                    raise RemoteProtocolError("a second EOF at another offset")
                return
            if value != self._received:
                raise RemoteProtocolError(f"EOF at offset {value}, but {self._received} bytes arrived")
            self._peer_eof = True
            self._readable.set()
            self._wake.set()
        elif kind == RESET:
            self._fail("the peer reset the connection", send_reset=False, log_level=logging.INFO)
        elif kind == PING:
            self._pong_due = value
            self._wake.set()
        elif kind == PONG:
            pass  # (what it proves, that the path carries bytes, the reader noted on arrival)
        elif kind == HELLO:
            limit = self._sent_total + (1 if self._eof_wanted else 0)
            if not min(self._acked, self._sent_total) <= value <= limit:
                raise RemoteProtocolError(f"HELLO at position {value}: outside [{self._acked}, {limit}]")
            self._send_pos = min(value, self._sent_total)
            self._eof_put = value > self._sent_total
            self._hello_done = True
            self._force_ack = True
            self._wake.set()

    def _maybe_finish(self) -> None:
        """Both directions ended and each was acknowledged: close the lower stream in order."""
        if self._finished or self._broken is not None:
            return
        if not (self._eof_wanted and self._acked == self._sent_total + 1 and self._peer_eof
                and self._acked_sent == self._received + 1 and self._ack_gen == self._gen):
            return  # (an ACK sent on a lost path goes again on the next, after the peer's HELLO)
        self._finished = True
        lower, self._lower = self._lower, None
        self._gen += 1
        self._readable.set()
        self._changed.set()
        self._wake.set()  # (the send loop of this generation waits on it: it ends now)
        self._forget()
        self._stop_background()
        if lower is not None:
            gevent.spawn(_close_orderly, lower)

    # --- breaks, resumes, upgrades -----------------------------------------------------------

    def _lost(self, gen: int, why: str) -> None:
        """Lower stream ``gen`` broke or ended: suspend, and resume (initiator) or wait."""
        if gen != self._gen or self._broken is not None:
            return
        if self._finished:
            return
        lower, self._lower = self._lower, None
        self._gen += 1
        if lower is not None:
            _close_quietly(lower)
        self._wake.set()  # (a sender waiting for a HELLO on it)
        self._stop_keepalive()  # (the old path's, asleep: the next path gets its own)
        log.info("%r: lower stream lost (%s); resuming within %g s", self, why, self.timeout_s)
        self.state["suspended"] = True
        self.state["last_break"] = why
        self._suspended_at = time.monotonic()
        self._background = [g for g in self._background if not g.dead]
        self._stop_expiry()  # (a previous suspension's, if its resume raced this loss)
        self._expiry = gevent.spawn(self._expire, self._gen)
        self._background.append(self._expiry)
        if self.initiator:
            self._background.append(gevent.spawn(self._resume_loop, self._gen))

    def _expire(self, gen: int) -> None:
        gevent.sleep(self.timeout_s)
        if self._gen == gen and self._lower is None and self._broken is None and not self._finished:
            self._fail(f"no path again within {self.timeout_s:g} s", send_reset=False)

    def _resume_loop(self, gen: int) -> None:
        assert self._suspended_at is not None
        deadline = self._suspended_at + self.timeout_s
        delay = RETRY_INITIAL_S
        while self._gen == gen and self._broken is None and not self._finished:
            choices = [self._current_layers] + [c for c in (self._upgrades() if self._upgrades else [])
                                                if c != self._current_layers]
            for layers in choices:
                left = deadline - time.monotonic()
                if left <= 0 or self._gen != gen or self._broken is not None:
                    break
                try:
                    with self._reopening:
                        if self._gen != gen or self._broken is not None:
                            return  # an upgrade under way found a path meanwhile
                        lower = self._reopen(layers, min(ATTEMPT_TIMEOUT_S, left))
                except ConnectError as exc:
                    if exc.code is not None and exc.code not in RETRY_CODES:
                        self._fail(f"the peer refused to resume ({exc.code}): {exc}", send_reset=False)
                        return
                    log.info("%r: resuming over %s failed: %s", self, _layers_text(layers), exc)
                    continue
                if self._gen != gen or self._broken is not None:
                    _close_quietly(lower)
                    return
                self._switch(lower, layers, resumed=True)
                return
            left = deadline - time.monotonic()
            if left <= 0:
                self._fail(f"no path again within {self.timeout_s:g} s", send_reset=False)
                return
            gevent.sleep(min(delay, left))
            delay = min(delay * 2, RETRY_MAX_S)

    def _upgrade_loop(self) -> None:
        delay = UPGRADE_INITIAL_S
        for _ in range(UPGRADE_ROUNDS):
            gevent.sleep(delay)
            delay = min(delay * 2, UPGRADE_MAX_S)
            if self._over():
                return
            if self._lower is None:
                continue  # the resumer is at work
            better = self._upgrades()  # (none now: a firewall may open later)
            for layers in better:
                self.state["upgrade_tries"] += 1
                try:
                    with self._reopening:
                        lower = self._reopen(layers, ATTEMPT_TIMEOUT_S)
                except ConnectError as exc:
                    self.state["last_upgrade_error"] = f"{_layers_text(layers)}: {exc}"[:200]
                    if exc.code is not None and exc.code not in RETRY_CODES:
                        log.info("%r: %s refused an upgrade to %s (%s): not trying again", self, self.peer_name,
                                 _layers_text(layers), exc.code)
                        return
                    log.info("%r: upgrade to %s failed: %s", self, _layers_text(layers), exc)
                    continue
                if self._over():  # (while it was being made)
                    _close_quietly(lower)
                    return
                log.info("%r: upgraded to %s", self, _layers_text(layers))
                self._switch(lower, layers, resumed=True)
                self.state["upgrades"] += 1
                break
            if better and not self._upgrades():
                return  # on the best tier now

    def _over(self) -> bool:
        """Whether the connection is done with upgrades: reset, finished or closed."""
        return self._broken is not None or self._finished or self._closed

    def _switch(self, lower: Stream, layers: Any, *, resumed: bool) -> None:
        """Carry on over ``lower`` (the old lower stream, if any, is closed: what was in flight
        on it goes again from the HELLO positions)."""
        old, self._lower = self._lower, lower
        self._gen += 1
        self._hello_done = False
        if layers is not None:
            self._current_layers = layers
            self.state["method"] = _layers_text(layers)
        if old is not None:
            _close_quietly(old)
        self.state["suspended"] = False
        self.state["resumes"] += 1
        self._suspended_at = None
        self._changed.set()
        self._wake.set()  # (the old sender, if it waits: it finds its lower replaced)
        self._stop_keepalive()  # (the old path's, asleep: the next path gets its own)
        self._stop_expiry()  # (the suspension is over)
        self._background = [g for g in self._background if not g.dead]
        self._start(lower, resumed=resumed)

    # --- the responder's side of a resume ----------------------------------------------------

    def take_token(self, token: bytes, client_id: str) -> Optional[bytes]:
        """Responder: the token of a resume request from ``client_id``; the next token if it is
        the one issued (it is then spent), else None."""
        if (self._broken is not None or self._finished or self._token is None
                or client_id != self.peer_id or not hmac.compare_digest(token, self._token)):
            return None
        self._token = secrets.token_bytes(RESUME_TOKEN_BYTES)
        return self._token

    def adopt(self, lower: Stream, token: bytes) -> None:
        """Responder: a new lower stream made with ``token`` (the token it answered): wait for
        its nomination, then carry on over it; a stale one (a later resume came) is closed."""
        from ..assembly import NOMINATE

        try:
            with gevent.Timeout(NOMINATION_TIMEOUT_S, TimeoutError("not nominated")):
                first = lower.receive_some(len(NOMINATE))
            if first != NOMINATE:
                raise RemoteProtocolError("closed before nomination" if not first else "bad nomination byte")
        except (GridsockError, TimeoutError, OSError) as exc:
            log.info("%r: a new lower stream was not taken: %s", self, exc)
            _close_quietly(lower)
            return
        if self._token != token or self._broken is not None or self._finished:
            _close_quietly(lower)
            return
        log.info("%r: resumed over %s", self, lower.info.get("method", "?") if isinstance(lower.info, dict) else "?")
        self.state["method"] = lower.info.get("method", "") if isinstance(lower.info, dict) else ""
        self._switch(lower, None, resumed=True)

    # --- ends --------------------------------------------------------------------------------

    def _linger(self) -> None:
        until = time.monotonic() + CLOSE_LINGER_S
        while not self._finished and self._broken is None:
            left = until - time.monotonic()
            if left <= 0:
                self._fail(f"not ended by the peer within {CLOSE_LINGER_S:g} s of close()", send_reset=True,
                           log_level=logging.INFO)
                return
            self._changed.clear()
            self._changed.wait(timeout=min(left, 1.0))

    def _fail(self, reason: str, *, send_reset: bool, log_level: int = logging.INFO) -> None:
        """Reset for good: wake everyone, close the lower stream (after a RESET frame if asked)."""
        if self._broken is not None or self._finished:
            return
        self._broken = reason
        log.log(log_level, "%r reset: %s", self, reason)
        lower, self._lower = self._lower, None
        self._gen += 1
        self._readable.set()
        self._writable.set()
        self._wake.set()
        self._changed.set()
        self._token = None
        self._forget()
        if lower is not None:
            if send_reset:
                gevent.spawn(_reset_and_close, lower)
            else:
                _close_quietly(lower)
        self._stop_background()

    def _stop_background(self) -> None:
        """Kill the background greenlets (resume, expiry, upgrade, linger) and the current
        generation's keepalive (asleep up to KEEPALIVE_S); the read and send loops end by
        themselves once their generation is over and they are woken."""
        current = gevent.getcurrent()
        for greenlet in self._background:
            if greenlet is not current:
                greenlet.kill(block=False)
        self._background = [g for g in self._background if g is current]
        self._stop_keepalive()

    def _stop_expiry(self) -> None:
        """Kill the suspension's timer (see _lost), unless it is the caller."""
        expiry, self._expiry = self._expiry, None
        if expiry is not None and expiry is not gevent.getcurrent():
            expiry.kill(block=False)

    def _stop_keepalive(self) -> None:
        """Kill the current generation's keepalive (see _start), unless it is the caller."""
        for greenlet in self._greenlets[2:]:
            if greenlet is not gevent.getcurrent():
                greenlet.kill(block=False)

    def _forget(self) -> None:
        if self._node is not None:
            table = _LIVE.get(self._node)
            key = ("client" if self.initiator else "server", self.session_id)
            if table is not None and table.get(key) is self:
                del table[key]


def _close_quietly(stream: Stream) -> None:
    try:
        stream.close()
    except Exception as exc:
        log.debug("closing %r: %s", stream, exc)


def _close_orderly(stream: Stream) -> None:
    try:
        stream.send_eof()
    except Exception as exc:
        log.debug("send_eof on %r: %s", stream, exc)
    _close_quietly(stream)


def _reset_and_close(stream: Stream) -> None:
    try:
        with gevent.Timeout(RESET_SEND_S):
            stream.send_all(encode_frame(RESET, 0))
    except (Exception, gevent.Timeout) as exc:
        log.debug("RESET on %r: %s", stream, exc)
    _close_quietly(stream)


def _layers_text(layers) -> str:
    return "/".join(str(layer) for layer in layers) if layers else "?"


# --- the component ---------------------------------------------------------------------------


class _Opening(Initiation):
    """The first lower stream of a resumable connection, by the method below."""

    def __init__(self, component: "ResumeMethod", ctx: InitiatorContext, inner: Initiation) -> None:
        self.offer: Dict[str, Any] = {**inner.offer, "resume": {"format": RESUME_FORMAT}}
        self._component = component
        self._ctx = ctx
        self._inner = inner

    def complete(self, answer: Dict[str, Any]) -> Stream:
        spec = answer.get("resume")
        if not isinstance(spec, dict):
            raise RemoteProtocolError(f"{self._ctx.peer.name} answered a resumable connection without a resume token")
        session_id, token = spec.get("id"), spec.get("token")
        if type(session_id) is not int or not 0 <= session_id < 2**63 or not isinstance(token, str):
            raise RemoteProtocolError("malformed resume fields in the answer")
        try:
            token_bytes = bytes.fromhex(token)
        except ValueError:
            raise RemoteProtocolError("malformed resume token in the answer") from None
        if len(token_bytes) != RESUME_TOKEN_BYTES:
            raise RemoteProtocolError("malformed resume token in the answer")
        lower = self._inner.complete({k: v for k, v in answer.items() if k != "resume"})
        return self._component._client_stream(self._ctx, lower, session_id, token_bytes)

    def abort(self) -> None:
        self._inner.abort()


class _Rejoin:
    """Drives the method below for a new lower stream of a live connection: its offer carries
    the resume token; the answer's next token replaces it."""

    name = "resume"
    kind = "method"

    def __init__(self, inner: Any, stream: ResumeStream) -> None:
        self.inner = inner
        self._stream = stream

    def initiate(self, ctx: InitiatorContext) -> Initiation:
        stream = self._stream
        if stream._token is None:
            raise ctx.fail("no resume token left", method="resume")
        inner = self.inner.initiate(ctx)
        outer = _RejoinInitiation(inner, stream)
        outer.offer = {**inner.offer, "resume": {"format": RESUME_FORMAT, "id": stream.session_id,
                                                 "token": stream._token.hex()}}
        return outer


class _RejoinInitiation(Initiation):
    def __init__(self, inner: Initiation, stream: ResumeStream) -> None:
        self._inner = inner
        self._stream = stream

    def complete(self, answer: Dict[str, Any]) -> Stream:
        spec = answer.get("resume")
        token = spec.get("token") if isinstance(spec, dict) else None
        try:
            token_bytes = bytes.fromhex(token) if isinstance(token, str) else b""
        except ValueError:
            token_bytes = b""
        if len(token_bytes) != RESUME_TOKEN_BYTES:
            self._stream._token = None
            raise RemoteProtocolError("the answer to a resume carries no next token")
        self._stream._token = token_bytes  # the old one is spent, whatever happens next
        return self._inner.complete({k: v for k, v in answer.items() if k != "resume"})

    def abort(self) -> None:
        self._inner.abort()


class ResumeMethod:
    """The ``resume`` component: ``resume(timeout=S,upgrade=BOOL)`` right above a method
    (``tls/resume/relay``); see the module docstring.

    A *method wrapper* (``wraps_method``), as ``parallel``: the assembly calls :meth:`over` with
    the method below and drives the result. Initiator: the method's attempt, offering the
    resume format; the server's answer carries the connection's id and first token, and the
    connection is a :class:`ResumeStream`. Responder: for a new connection, the method's
    response plus the id and token, and its stream wrapped; for a request that continues a
    connection (the offer names its id and token), the method's new lower stream is given to
    that connection (nothing is delivered to the listener), or ``bad-token``.
    """

    name = "resume"
    kind = "filter"
    PARAMS = {"timeout": float, "upgrade": bool}
    LIMITS = {"timeout": (0.1, 3600.0)}
    wraps_method = True

    def __init__(self, timeout: float = RESUME_TIMEOUT_S, upgrade: bool = True) -> None:
        if not 0.1 <= timeout <= 3600.0:
            raise ConfigError(f"resume: timeout must be within [0.1, 3600] s, not {timeout}")
        self.timeout = float(timeout)
        self.upgrade = bool(upgrade)
        self.inner: Any = None

    def over(self, method) -> "ResumeMethod":
        """This wrapper driving ``method``."""
        self.inner = method
        return self

    @staticmethod
    def continues(offer: Dict[str, Any]) -> bool:
        """Whether a request with ``offer`` continues a live connection (needs no listener)."""
        spec = offer.get("resume")
        return isinstance(spec, dict) and "id" in spec

    def wrap(self, lower: Stream, *, context) -> Stream:
        """Always raises ConfigError: resume makes its own lower streams (a method wrapper)."""
        raise ConfigError("resume stands right above the method (it makes connections), not among the filters")

    # --- initiator ---------------------------------------------------------------------------

    def initiate(self, ctx: InitiatorContext) -> Initiation:
        return _Opening(self, ctx, self.inner.initiate(ctx))

    def _client_stream(self, ctx: InitiatorContext, lower: Stream, session_id: int, token: bytes) -> ResumeStream:
        from ..assembly import method_of
        from ..rules import tier
        from ..stack import Stack

        node, peer, port = ctx.node, ctx.peer, ctx.port
        stack: Optional[Stack] = ctx.stack
        if stack is None or not port:
            raise ConfigError("resume needs the assembler's context (the stack and port of the connection)")
        names = [layer.name for layer in stack.layers]
        at = names.index(self.name)
        upper, below = stack.layers[: at + 1], stack.layers[at + 1:]
        registry = node.assembler.registry

        def reopen(layers, timeout: float) -> Stream:
            full = Stack.parse("/".join(str(layer) for layer in upper + tuple(layers)), registry)
            component, _ = method_of(full, registry)
            return node.assembler.open_method_stream(peer.node_id, port, full, _Rejoin(component.inner, stream),
                                                     timeout=timeout)

        def tier_of(layers) -> int:
            try:
                component = registry.get(layers[-1].name)
            except ConfigError:
                component = None
            return tier(Stack(tuple(layers)), component)

        def upgrades() -> list:
            """The rules' candidates of a better tier than the lower stream's now, best first."""
            me, entry = node.entry, node.directory.get(peer.node_id)
            if me is None or entry is None:
                return []
            now = tier_of(stream._current_layers)
            out = []
            for candidate in node.assembler.rules.candidates(me, entry):
                layers = (candidate.method,)
                if tier_of(layers) < now and layers not in out:
                    out.append(layers)
            return out

        stream = ResumeStream(lower, initiator=True, session_id=session_id, token=token, peer_id=peer.node_id,
                              peer_name=peer.name, node=node, timeout_s=self.timeout, method=_layers_text(below),
                              reopen=reopen, upgrades=upgrades if self.upgrade and tier_of(below) > 0 else None,
                              current_layers=tuple(below))
        return stream

    # --- responder ---------------------------------------------------------------------------

    def respond(self, ctx: ResponderContext) -> Dict[str, Any]:
        spec = ctx.offer.get("resume")
        if not isinstance(spec, dict):
            raise RemoteProtocolError("a resumable connection's offer carries no 'resume' object")
        if spec.get("format") != RESUME_FORMAT:
            raise RemoteProtocolError(f"resume format {spec.get('format')!r} offered, this node speaks "
                                      f"{RESUME_FORMAT}: run the same gridsock on both nodes")
        request = dataclasses.replace(ctx.request, offer={k: v for k, v in ctx.offer.items() if k != "resume"})
        if "id" in spec:
            return self._rejoin(ctx, request, spec)
        session_id = secrets.randbits(63)
        token = secrets.token_bytes(RESUME_TOKEN_BYTES)
        client = ctx.client

        def deliver(lower: Stream) -> None:
            ctx.deliver(ResumeStream(lower, initiator=False, session_id=session_id, token=token,
                                     peer_id=client.node_id, peer_name=client.name, node=ctx.node,
                                     timeout_s=self.timeout, method=_method_name(lower)))

        answer = dict(self.inner.respond(dataclasses.replace(ctx, request=request, deliver=deliver)))
        answer["resume"] = {"format": RESUME_FORMAT, "id": session_id, "token": token.hex()}
        return answer

    def _rejoin(self, ctx: ResponderContext, request, spec: Dict[str, Any]) -> Dict[str, Any]:
        session_id, token = spec.get("id"), spec.get("token")
        if type(session_id) is not int or not isinstance(token, str):
            raise RemoteProtocolError("malformed resume fields")
        try:
            token_bytes = bytes.fromhex(token)
        except ValueError:
            raise RemoteProtocolError("malformed resume token") from None
        stream = _LIVE.get(ctx.node, {}).get(("server", session_id))
        next_token = stream.take_token(token_bytes, ctx.client.node_id) if stream is not None else None
        if stream is None or next_token is None:
            log.warning("node %s: refused a resume of connection #%x from %s: unknown connection, spent token "
                        "or another node", getattr(ctx.node, "name", "?"), session_id, ctx.client.name)
            raise MethodRefusal("bad-token", "no live connection takes this resume token from this node")

        def deliver(lower: Stream) -> None:
            stream.adopt(lower, next_token)

        answer = dict(self.inner.respond(dataclasses.replace(ctx, request=request, deliver=deliver)))
        answer["resume"] = {"token": next_token.hex()}
        return answer


def _method_name(lower: Stream) -> str:
    info = getattr(lower, "info", None)
    return str(info.get("method", "")) if isinstance(info, dict) else ""
