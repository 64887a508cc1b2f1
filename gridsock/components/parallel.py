"""The ``parallel`` filter: one logical stream striped over N lower streams, GridFTP style.

Theory of operation
-------------------
A :class:`ParallelStream` carries one byte stream over ``N`` lower streams (sub-streams, one
TCP connection each, say): a single TCP connection over a long fat pipe is limited by its
congestion window and by the losses it alone suffers; N of them share the link's capacity N ways
and recover from a loss N times faster (GridFTP's parallel streams, its "mode E").

Frames. Both directions of every sub-stream carry frames, each a header of
:data:`HEADER_BYTES` (``FRAME_HEADER``, network order)::

    version: u8 | type: u8 | seq: u64 | length: u32

- ``DATA`` (type 1): ``length`` bytes of stream data follow (1 to :data:`MAX_CHUNK_BYTES`);
  ``seq`` numbers the chunks of the logical stream 0, 1, 2... across all sub-streams;
- ``END`` (type 2): no payload (``length`` 0); ``seq`` is the number of chunks sent in total.
  The sender ends every sub-stream with one END and then half-closes it.

On each sub-stream the sequence numbers of DATA frames strictly increase (each sender takes
chunks from one FIFO queue). The order of the lowers does not matter: chunks are put back in
order by ``seq`` alone; what matters is that each lower of one side is connected to exactly one
lower of the other.

Sending. ``send_all`` cuts the data into chunks of at most ``chunk`` bytes, frames each (one
copy, so the caller may reuse its buffer at once) and appends it to a queue shared by N sender
greenlets, one per lower. Whichever sender is free takes the next chunk, so a slow or lossy
sub-stream carries less and never stalls the others. A sender that finds small frames waiting
takes several at once, up to :data:`SEND_BATCH_BYTES`, and sends them in one call. Back-pressure:
``send_all`` blocks while :data:`QUEUE_CHUNKS_PER_STREAM` x N chunks are queued. ``send_eof``
queues one end mark per sender, behind everything queued before; each sender sends its END and
half-closes its lower; ``send_eof`` returns when all have (so ``send_eof(); close()`` loses
nothing).

Receiving. One reader greenlet per lower parses its frames and hands the chunks to a
:class:`Reassembler` (sans-IO: sequence bookkeeping, no I/O), from which ``receive_some`` takes
them in order. Window: a reader whose chunk is :data:`WINDOW_CHUNKS_PER_STREAM` x N chunks or
more beyond the next chunk the application will read waits before storing it (and before
reading more from its lower, which pushes back on the peer's sender of that lower). The reader
holding the next chunk never waits, and the next chunk cannot be queued behind a waiting chunk
on the same lower (sequence numbers increase per lower), so the window cannot deadlock.

Memory bound per stream. Receiving: at most ``(WINDOW_CHUNKS_PER_STREAM + 1) x N + 1`` chunks
(the window stored, one held by each reader, one being read by the application), each pinning
at most one read of :data:`RECEIVE_BYTES` besides its payload of at most :data:`MAX_CHUNK_BYTES`
(the peer's ``chunk``): 6.6 MiB with the defaults (N=4, 256 KiB chunks). Sending:
``QUEUE_CHUNKS_PER_STREAM x N`` queued chunks plus one batch (a chunk, or small frames up to
:data:`SEND_BATCH_BYTES`) per sender: 3 MiB with the defaults.

EOF. ``receive_some`` returns ``b""`` once every lower delivered its END followed by its own EOF,
the END frames agree on the count, and every chunk below that count was read.

Errors. Malformed input raises :class:`~gridsock.errors.RemoteProtocolError` in the reader:
an unknown version or type, a DATA length of 0 or above :data:`MAX_CHUNK_BYTES`, an END with a
payload, a sequence number that does not increase on its lower, a duplicate, a chunk at or
beyond an END count, anything after a lower's END, END counts that disagree or that leave out a
chunk already seen, a lower's EOF before its END or inside a frame, and a next chunk that can
never arrive (every lower that could carry it has moved past it or ended: this is what turns a
chunk "out of the window" or a hole in the sequence into an error instead of a hang). Any
failure -- that, a lower that breaks, a sender whose lower refuses data -- is logged once (at
WARNING for bad input; at INFO for a lower that broke or ended before its END, which is what a
peer that closed without EOF looks like), kills every greenlet of the stream and closes every lower (so the peer notices at once); every later
``send_all``, ``send_eof`` and ``receive_some`` raises BrokenStreamError ``from`` it (except
that ``receive_some`` keeps returning ``b""`` once it has returned EOF). ``close`` kills the
greenlets and closes every lower; idempotent.
"""
from __future__ import annotations

import logging
import struct
from collections import deque
from typing import Any, Deque, Dict, List, Optional, Sequence, Set, Tuple

import gevent
import gevent.event
import gevent.hub
import gevent.queue

from ..errors import BrokenStreamError, ConfigError, RemoteProtocolError
from ..stack import Layer
from ..streams import DEFAULT_RECEIVE_BYTES, SocketStream, Stream

__all__ = [
    "ParallelMethod",
    "ParallelFilter",
    "ParallelStream",
    "Reassembler",
    "parse_header",
    "FRAME_HEADER",
    "HEADER_BYTES",
    "FRAME_VERSION",
    "DATA_FRAME",
    "END_FRAME",
    "DEFAULT_STREAMS",
    "MIN_STREAMS",
    "MAX_STREAMS",
    "DEFAULT_CHUNK_BYTES",
    "MIN_CHUNK_BYTES",
    "MAX_CHUNK_BYTES",
    "QUEUE_CHUNKS_PER_STREAM",
    "WINDOW_CHUNKS_PER_STREAM",
    "SEND_BATCH_BYTES",
    "RECEIVE_BYTES",
]

log = logging.getLogger(__name__)

FRAME_HEADER = struct.Struct("!BBQI")
HEADER_BYTES = FRAME_HEADER.size
FRAME_VERSION = 1
DATA_FRAME = 1
END_FRAME = 2

DEFAULT_STREAMS = 4
MIN_STREAMS = 1
# Beyond a few dozen connections a link is shared no better, and each costs two greenlets and
# a handshake.
MAX_STREAMS = 64
# Large enough that per-chunk costs (a header, a queue hop, a dict entry) vanish at Gbit/s.
DEFAULT_CHUNK_BYTES = 256 * 1024
# Smaller chunks spend more on headers and scheduling than they gain in balance.
MIN_CHUNK_BYTES = 4096
# The largest DATA payload a receiver accepts, whatever its own ``chunk``: bounds its memory.
MAX_CHUNK_BYTES = 4 * 1024 * 1024
# Chunks queued per sender before send_all blocks: enough that a sender finishing a chunk finds
# the next one waiting, few enough that queued data stays a few chunks per lower.
QUEUE_CHUNKS_PER_STREAM = 2
# How far, in chunks per lower, a reader may run ahead of the application: room for the skew
# between lowers (one waits for a retransmission while the others go on) without unbounded
# buffering.
WINDOW_CHUNKS_PER_STREAM = 4
# After our end went out in order (send_eof), close() lets the readers go on, at most this long,
# to each lower's END and EOF before closing it: closing a socket with bytes unread resets the
# peer, and a reset discards what the peer had not read yet of what we sent (the tail of an
# echo, under load: a TLS filter above returns EOF on the peer's close_notify, before the END
# frames behind it were read). In the background; close() itself returns at once.
LINGER_S = 10.0
# Small frames waiting in the queue are sent together, up to this much: one call below per
# batch instead of one per tiny send_all.
SEND_BATCH_BYTES = 64 * 1024
# What a reader asks its lower for when it needs a header after a small frame (many small frames
# per read). After a large frame it asks for the header alone, then reads the payload with
# exact-size reads that the application receives without a copy.
RECEIVE_BYTES = 64 * 1024
# A frame at least this large is read header first, and a piece at least this large is handed
# to the application as it is rather than joined with the next.
LARGE_PIECE_BYTES = 16 * 1024

_END_MARK = object()  # in the send queue: "send your END frame and half-close"
_EMPTY = memoryview(b"")


def parse_header(header) -> Tuple[int, int, int]:
    """Parse the first :data:`HEADER_BYTES` of ``header``; return ``(type, seq, length)``.

    Raises RemoteProtocolError for an unknown version or type, a DATA frame whose length is 0
    or above :data:`MAX_CHUNK_BYTES`, or an END frame with a payload.
    """
    version, kind, seq, length = FRAME_HEADER.unpack_from(header)
    if version != FRAME_VERSION:
        raise RemoteProtocolError(f"parallel frame of unknown version {version} (type {kind})")
    if kind == DATA_FRAME:
        if not 0 < length <= MAX_CHUNK_BYTES:
            raise RemoteProtocolError(
                f"parallel DATA frame {seq} of {length} bytes (1 to {MAX_CHUNK_BYTES} allowed)"
            )
    elif kind == END_FRAME:
        if length:
            raise RemoteProtocolError(f"parallel END frame with a {length}-byte payload")
    else:
        raise RemoteProtocolError(f"parallel frame of unknown type {kind}")
    return kind, seq, length


class Reassembler:
    """Sans-IO: the chunks of one direction, from ``streams`` lowers, back in order.

    The readers report what they parse (:meth:`data_header`, :meth:`store`, :meth:`end`,
    :meth:`lower_eof`); the application side takes chunks with :meth:`take`. Every method that
    judges the peer raises RemoteProtocolError for a violation (see the module docstring).
    """

    def __init__(self, streams: int, window_chunks: int) -> None:
        self.streams = streams
        self.window = window_chunks
        self.next_seq = 0  # the chunk take() returns next
        self.final: Optional[int] = None  # the END count, once one END arrived
        self._chunks: Dict[int, List[Any]] = {}
        self._announced: Set[int] = set()  # headers seen, not yet taken (stored or being read)
        self._last = [-1] * streams  # the last sequence number seen on each lower
        self._ended = [False] * streams
        self._eof = [False] * streams
        self._eof_count = 0
        self._max_seen = -1

    def data_header(self, lower: int, seq: int) -> None:
        """A DATA header for chunk ``seq`` arrived on ``lower``; raises if it may not."""
        if self._ended[lower]:
            raise RemoteProtocolError(f"parallel sub-stream {lower}: data after its END frame")
        if seq <= self._last[lower]:
            raise RemoteProtocolError(
                f"parallel sub-stream {lower}: chunk {seq} after chunk {self._last[lower]} (not increasing)"
            )
        if seq < self.next_seq or seq in self._announced:
            raise RemoteProtocolError(f"parallel sub-stream {lower}: duplicate chunk {seq}")
        if self.final is not None and seq >= self.final:
            raise RemoteProtocolError(f"parallel sub-stream {lower}: chunk {seq} beyond the END count {self.final}")
        self._last[lower] = seq
        self._announced.add(seq)
        if seq > self._max_seen:
            self._max_seen = seq

    def fits(self, seq: int) -> bool:
        """Whether chunk ``seq`` is within the window (may be stored now)."""
        return seq < self.next_seq + self.window

    def store(self, seq: int, pieces: List[Any]) -> None:
        """Keep chunk ``seq`` (announced by :meth:`data_header`) as a list of byte pieces."""
        self._chunks[seq] = pieces

    def end(self, lower: int, count: int) -> None:
        """An END frame saying ``count`` chunks in total arrived on ``lower``."""
        if self._ended[lower]:
            raise RemoteProtocolError(f"parallel sub-stream {lower}: a second END frame")
        if self.final is not None and count != self.final:
            raise RemoteProtocolError(
                f"parallel sub-stream {lower}: END count {count} disagrees with {self.final} on another"
            )
        if count <= self._max_seen:
            raise RemoteProtocolError(
                f"parallel sub-stream {lower}: END count {count} but chunk {self._max_seen} arrived"
            )
        self.final = count
        self._ended[lower] = True

    def ended(self, lower: int) -> bool:
        return self._ended[lower]

    def lower_eof(self, lower: int) -> None:
        """``lower`` reached EOF; raises unless its END came first."""
        if not self._ended[lower]:
            raise RemoteProtocolError(
                f"parallel sub-stream {lower} ended before its END frame (the peer closed without EOF, "
                "or the link broke)"
            )
        if not self._eof[lower]:
            self._eof[lower] = True
            self._eof_count += 1

    def ready(self) -> bool:
        """Whether :meth:`take` has a chunk to give."""
        return self.next_seq in self._chunks

    def take(self) -> Optional[List[Any]]:
        """Return the pieces of the next chunk and move on, or None if it has not arrived."""
        seq = self.next_seq
        pieces = self._chunks.pop(seq, None)
        if pieces is not None:
            self._announced.discard(seq)
            self.next_seq = seq + 1
        return pieces

    def at_eof(self) -> bool:
        """Whether the stream ended: every lower ended cleanly and every chunk was taken."""
        return self._eof_count == self.streams and self.final is not None and self.next_seq >= self.final

    def check_reachable(self) -> None:
        """Raise RemoteProtocolError if the next chunk can never arrive.

        It can arrive only on a lower that has not ended and whose last chunk is older (sequence
        numbers increase per lower); if there is none, the peer skipped it.
        """
        seq = self.next_seq
        if seq in self._announced or (self.final is not None and seq >= self.final):
            return
        last, ended = self._last, self._ended
        for i in range(self.streams):
            if not ended[i] and last[i] < seq:
                return
        raise RemoteProtocolError(
            f"parallel: chunk {seq} can never arrive (every sub-stream has passed it or ended)"
        )


class ParallelStream(Stream):
    """One stream over the streams ``lowers``; see the module docstring.

    ``chunk`` is the largest DATA payload this side sends; ``peer_name`` names the peer in logs.
    Starts one sender and one reader greenlet per lower at once; does no I/O itself.
    Raises ConfigError if there are no lowers, more than :data:`MAX_STREAMS`, or ``chunk`` is
    out of its limits.
    """

    def __init__(self, lowers: Sequence[Stream], *, chunk: int = DEFAULT_CHUNK_BYTES,
                 peer_name: Optional[str] = None) -> None:
        lowers = list(lowers)
        if not MIN_STREAMS <= len(lowers) <= MAX_STREAMS:
            raise ConfigError(f"parallel needs {MIN_STREAMS} to {MAX_STREAMS} lower streams, not {len(lowers)}")
        if not MIN_CHUNK_BYTES <= chunk <= MAX_CHUNK_BYTES:
            raise ConfigError(f"parallel: chunk must be within [{MIN_CHUNK_BYTES}, {MAX_CHUNK_BYTES}], not {chunk}")
        n = len(lowers)
        self.lowers = lowers
        self.chunk = chunk
        self.peer_name = peer_name
        self._n = n
        self.bytes_sent = [0] * n  # wire bytes per lower
        self.bytes_received = [0] * n
        first = dict(getattr(lowers[0], "info", None) or {})
        params: Tuple[Tuple[str, Any], ...] = (("streams", n),)
        if chunk != DEFAULT_CHUNK_BYTES:
            params += (("chunk", chunk),)
        layer = str(Layer("parallel", params))
        below = first.get("stack")
        self.info: Dict[str, Any] = {
            **first,
            "stack": f"{layer}/{below}" if below else layer,
            "streams": n,
            "parallel": {
                "streams": n,
                "chunk": chunk,
                "bytes_sent": self.bytes_sent,
                "bytes_received": self.bytes_received,
                "sub_streams": [getattr(lower, "info", {}) for lower in lowers],
            },
        }
        self._closed = False
        self._error: Optional[BaseException] = None
        # sending
        self._outbox: gevent.queue.Queue = gevent.queue.Queue()
        self._queued = 0  # data frames in the outbox
        self._queue_limit = QUEUE_CHUNKS_PER_STREAM * n
        self._room = gevent.event.Event()
        self._send_seq = 0
        self._eof_sent = False
        self._end_count = 0
        self._senders_done = 0
        self._eof_done = gevent.event.Event()
        # receiving
        self._reassembly = Reassembler(n, WINDOW_CHUNKS_PER_STREAM * n)
        self._current: Deque[Any] = deque()  # pieces of the chunk being read, in order
        self._readable = gevent.event.Event()
        self._held: Dict[int, int] = {}  # reader index -> the chunk it waits to store
        self._wakeups = [gevent.event.Event() for _ in range(n)]
        self._eof_returned = False
        self._readers = [gevent.spawn(self._run, self._read_loop, i, lower) for i, lower in enumerate(lowers)]
        self._greenlets: List[gevent.Greenlet] = \
            [gevent.spawn(self._run, self._send_loop, i, lower) for i, lower in enumerate(lowers)] + self._readers

    def __repr__(self) -> str:
        return f"<ParallelStream x{self._n} over {self.lowers[0]!r}>"

    # --- Stream ------------------------------------------------------------------------------

    def send_all(self, data) -> None:
        self._check_sendable()
        view = memoryview(data).cast("B")
        total = len(view)
        step = self.chunk
        pack = FRAME_HEADER.pack
        for offset in range(0, total, step):
            while self._queued >= self._queue_limit:
                self._check_sendable()  # a failure or close() wakes us: check before waiting
                self._room.clear()
                self._room.wait()
            if self._error is not None or self._closed:
                self._check_sendable()
            piece = view[offset : offset + step]
            self._outbox.put(pack(FRAME_VERSION, DATA_FRAME, self._send_seq, len(piece)) + piece)
            self._send_seq += 1
            self._queued += 1

    def receive_some(self, max_bytes: int = DEFAULT_RECEIVE_BYTES) -> bytes:
        if max_bytes < 1:
            raise ValueError("max_bytes must be at least 1")
        r = self._reassembly
        while True:
            if self._closed:
                raise BrokenStreamError("stream is closed")
            if self._eof_returned:
                return b""
            if self._error is not None:
                raise self._broken()
            if self._current or self._take():
                return self._read_current(max_bytes)
            if r.at_eof():
                self._eof_returned = True
                return b""
            try:
                r.check_reachable()
            except RemoteProtocolError as exc:
                self._fail(exc)
                continue
            self._readable.clear()
            self._readable.wait()

    def send_eof(self) -> None:
        if self._closed or self._eof_sent:
            return
        if self._error is not None:
            raise self._broken()
        self._eof_sent = True
        self._end_count = self._send_seq
        for _ in range(self._n):
            self._outbox.put(_END_MARK)
        while self._senders_done < self._n:
            if self._closed:
                raise BrokenStreamError("stream closed during send_eof()")
            if self._error is not None:
                raise self._broken()
            self._eof_done.clear()
            self._eof_done.wait()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._wake_all()
        current = gevent.getcurrent()
        readers: List[gevent.Greenlet] = []
        if self._eof_sent and self._error is None:
            # Sent in order: the readers go on to each lower's END and EOF (LINGER_S).
            readers = [g for g in self._readers if g is not current and not g.dead]
        alive = [g for g in self._greenlets if g is not current and not g.dead and g not in readers]
        if alive:
            # From the hub (a callback) we cannot wait; the kills still happen at once.
            gevent.killall(alive, block=not isinstance(current, gevent.hub.Hub))
        if readers:
            gevent.spawn(self._linger_then_close, readers)
        else:
            self._close_lowers()

    def _linger_then_close(self, readers: List[gevent.Greenlet]) -> None:
        """After our end went out in order: let the readers reach each lower's END and EOF (a
        reader that would wait for the application, gone, ends at once: what it leaves unread
        resets the peer, as it must), at most LINGER_S, then close the lowers."""
        try:
            gevent.joinall(readers, timeout=LINGER_S)
        finally:
            gevent.killall([g for g in readers if not g.dead], block=False)
            self._close_lowers()

    # --- the application side ----------------------------------------------------------------

    def _check_sendable(self) -> None:
        if self._closed:
            raise BrokenStreamError("stream is closed")
        if self._eof_sent:
            raise BrokenStreamError("cannot send after send_eof()")
        if self._error is not None:
            raise self._broken()

    def _broken(self) -> BrokenStreamError:
        exc = BrokenStreamError(f"parallel stream broken: {self._error}")
        exc.__cause__ = self._error
        return exc

    def _take(self) -> bool:
        pieces = self._reassembly.take()
        if pieces is None:
            return False
        self._current.extend(pieces)
        if self._held:  # the window moved: wake the readers whose chunk now fits
            fits = self._reassembly.fits
            for i, seq in self._held.items():
                if fits(seq):
                    self._wakeups[i].set()
        return True

    def _read_current(self, max_bytes: int) -> bytes:
        current = self._current
        first = current[0]
        n = len(first)
        if n >= max_bytes or (n >= LARGE_PIECE_BYTES and type(first) is bytes):
            if n <= max_bytes:
                current.popleft()
                return first if type(first) is bytes else bytes(first)
            view = memoryview(first)
            current[0] = view[max_bytes:]
            return bytes(view[:max_bytes])
        # Small pieces: join what is there, across chunks, up to max_bytes.
        out = []
        size = 0
        while size < max_bytes and (current or self._take()):
            piece = current[0]
            room = max_bytes - size
            if len(piece) > room:
                view = memoryview(piece)
                out.append(view[:room])
                current[0] = view[room:]
                break
            out.append(current.popleft())
            size += len(piece)
        return b"".join(out)

    # --- the greenlets -----------------------------------------------------------------------

    def _run(self, body, index: int, lower: Stream) -> None:
        try:
            body(index, lower)
        except Exception as exc:  # a lower's error, the peer's bad input: this stream is broken
            if not isinstance(exc, (RemoteProtocolError, BrokenStreamError)):
                log.debug("parallel sub-stream %d raised %r", index, exc, exc_info=True)
            self._fail(exc, level=logging.WARNING if isinstance(exc, RemoteProtocolError) else logging.INFO)

    def _send_loop(self, index: int, lower: Stream) -> None:
        outbox = self._outbox
        while True:
            item = outbox.get()
            frames = []
            size = 0
            end = False
            while True:
                if item is _END_MARK:
                    end = True
                    break
                frames.append(item)
                size += len(item)
                if size >= SEND_BATCH_BYTES or not outbox.qsize():
                    break
                following = outbox.peek_nowait()
                if following is not _END_MARK and size + len(following) > SEND_BATCH_BYTES:
                    break
                item = outbox.get_nowait()
            if frames:
                self._queued -= len(frames)
                self._room.set()
            if end:
                frames.append(FRAME_HEADER.pack(FRAME_VERSION, END_FRAME, self._end_count, 0))
            wire = frames[0] if len(frames) == 1 else b"".join(frames)
            lower.send_all(wire)
            self.bytes_sent[index] += len(wire)
            if end:
                lower.send_eof()
                self._senders_done += 1
                if self._senders_done == self._n:
                    self._eof_done.set()
                return

    def _read_loop(self, index: int, lower: Stream) -> None:
        r = self._reassembly
        received = self.bytes_received
        buf = _EMPTY  # bytes read from the lower, not parsed yet
        ask = RECEIVE_BYTES
        while True:
            while len(buf) < HEADER_BYTES:
                data = lower.receive_some(ask if ask > HEADER_BYTES else HEADER_BYTES - len(buf))
                if not data:
                    if len(buf):
                        raise RemoteProtocolError(f"parallel sub-stream {index} ended inside a frame header")
                    try:
                        r.lower_eof(index)
                    except RemoteProtocolError as exc:
                        self._fail(exc, level=logging.INFO)  # what a peer that closed looks like
                        return
                    self._readable.set()
                    r.check_reachable()
                    return
                received[index] += len(data)
                if r.ended(index):
                    raise RemoteProtocolError(f"parallel sub-stream {index}: data after its END frame")
                buf = memoryview(bytes(buf) + data) if len(buf) else memoryview(data)
            kind, seq, length = parse_header(buf)
            if kind == END_FRAME:
                r.end(index, seq)
                buf = buf[HEADER_BYTES:]
                if len(buf):
                    raise RemoteProtocolError(f"parallel sub-stream {index}: data after its END frame")
                r.check_reachable()
                self._readable.set()
                continue
            r.data_header(index, seq)
            r.check_reachable()
            end = HEADER_BYTES + length
            pieces: List[Any]
            if len(buf) >= end:
                pieces = [buf[HEADER_BYTES:end]]
                buf = buf[end:]
            else:
                pieces = [buf[HEADER_BYTES:]] if len(buf) > HEADER_BYTES else []
                need = end - len(buf)
                buf = _EMPTY
                while need:
                    data = lower.receive_some(need)
                    if not data:
                        raise RemoteProtocolError(f"parallel sub-stream {index} ended inside chunk {seq}")
                    received[index] += len(data)
                    pieces.append(data)
                    need -= len(data)
            ask = HEADER_BYTES if length >= LARGE_PIECE_BYTES else RECEIVE_BYTES
            if not r.fits(seq):
                wakeup = self._wakeups[index]
                self._held[index] = seq
                try:
                    while not r.fits(seq):
                        if self._closed:
                            return  # (nobody reads it any more: see close())
                        wakeup.clear()
                        wakeup.wait()
                finally:
                    del self._held[index]
            r.store(seq, pieces)
            if seq == r.next_seq:
                self._readable.set()

    # --- failure -----------------------------------------------------------------------------

    def _fail(self, exc: BaseException, *, level: int = logging.WARNING) -> None:
        """Record the first failure, log it, stop every greenlet but the caller, close the lowers."""
        if self._error is not None or self._closed:
            return
        self._error = exc
        whom = f" with {self.peer_name}" if self.peer_name else ""
        log.log(level, "parallel stream%s broken: %s; closing its %d sub-streams", whom, exc, self._n)
        current = gevent.getcurrent()
        others = [g for g in self._greenlets if g is not current and not g.dead]
        gevent.killall(others, block=False)
        self._close_lowers()
        self._wake_all()

    def _wake_all(self) -> None:
        self._readable.set()
        self._room.set()
        self._eof_done.set()
        for wakeup in self._wakeups:
            wakeup.set()

    def _close_lowers(self) -> None:
        for lower in self.lowers:
            try:
                lower.close()
            except Exception as exc:  # closing is best effort
                log.debug("closing parallel sub-stream %r: %s", lower, exc)


class ParallelMethod:
    """The ``parallel`` component: ``parallel(streams=N,chunk=BYTES)`` right above a method that
    dials node ports (``parallel(streams=4)/tcp``, ``tls/parallel(streams=8)/socks(...)``).

    A *method wrapper* (``wraps_method``): it sits in the stack string among the filters, but it
    makes connections. The assembly calls :meth:`over` with the method below it, and drives the
    result as a method (:mod:`gridsock.methods`). Initiator: dial the server's node port
    :attr:`streams` times with the method below, each connection's preamble carrying the token
    and its index, and stripe over them (:class:`ParallelStream`). Responder: await the
    :attr:`streams` connections of the token on the node port, then stripe over them. The
    client's nomination travels as the striped stream's first byte.
    """

    name = "parallel"
    kind = "filter"
    PARAMS = {"streams": int, "chunk": int}
    LIMITS = {"streams": (MIN_STREAMS, MAX_STREAMS), "chunk": (MIN_CHUNK_BYTES, MAX_CHUNK_BYTES)}
    #: Not a filter over one stream: it makes the connections (see the class docstring).
    wraps_method = True
    #: Needs several lower streams: :meth:`wrap_many`, not :meth:`wrap`.
    multi = True

    def __init__(self, streams: int = DEFAULT_STREAMS, chunk: int = DEFAULT_CHUNK_BYTES) -> None:
        if not MIN_STREAMS <= streams <= MAX_STREAMS:
            raise ConfigError(f"parallel: streams must be within [{MIN_STREAMS}, {MAX_STREAMS}], not {streams}")
        if not MIN_CHUNK_BYTES <= chunk <= MAX_CHUNK_BYTES:
            raise ConfigError(f"parallel: chunk must be within [{MIN_CHUNK_BYTES}, {MAX_CHUNK_BYTES}], not {chunk}")
        self.streams = streams
        self.chunk = chunk
        self.inner: Any = None  # the method below, once over() is called

    def over(self, method) -> "ParallelMethod":
        """This wrapper driving ``method`` (which must dial node ports); ConfigError if not."""
        if not getattr(method, "dials_node_port", False):
            raise ConfigError(f"parallel needs a method that dials (tcp, socks, ssh), not {method.name}")
        self.inner = method
        return self

    def initiate(self, ctx):
        from .tcp import DialInitiation

        inner = self.inner
        if not ctx.peer.addrs:
            raise ctx.fail(f"{ctx.peer.name} advertises no address for a {inner.name} connection", method=inner.name)
        return DialInitiation(inner, ctx, self.streams, lambda socks: self._stripe(socks, ctx.peer.name))

    def respond(self, ctx):
        from .tcp import serve_arrival

        arrival = ctx.expect(self.streams)
        gevent.spawn(serve_arrival, ctx, arrival, lambda socks: self._stripe(socks, ctx.client.name),
                     f"parallel({self.streams}) connection")
        return {}

    def _stripe(self, socks, peer_name: str) -> "ParallelStream":
        lowers = [SocketStream(sock, info={"method": self.inner.name, "sub": i}) for i, sock in enumerate(socks)]
        return ParallelStream(lowers, chunk=self.chunk, peer_name=peer_name)

    def wrap(self, lower: Stream, *, context) -> Stream:
        """Always raises ConfigError: parallel stripes over several connections, not one."""
        raise ConfigError(
            f"parallel(streams={self.streams}) cannot wrap a single stream: it needs {self.streams} "
            "sub-connections made by the method below it"
        )

    def wrap_many(self, lowers: Sequence[Stream], *, context) -> ParallelStream:
        """Return a ParallelStream over ``lowers`` (exactly :attr:`streams` of them); no I/O.

        Both sides must pass lowers connected one to one (their order does not matter).
        ``context`` is the StackContext (its ``peer_name`` or ``peer_id`` names the peer in logs).
        Raises ConfigError for a wrong number of lowers; it leaves closing them to the caller.
        """
        if len(lowers) != self.streams:
            raise ConfigError(f"parallel(streams={self.streams}) given {len(lowers)} lower streams")
        peer_name = getattr(context, "peer_name", None) or getattr(context, "peer_id", None)
        return ParallelStream(lowers, chunk=self.chunk, peer_name=peer_name)


#: The name this component had while it was a filter.
ParallelFilter = ParallelMethod
