"""Shared machinery of the compression filters: a Stream driven by a sans-IO encoder and decoder.

Theory of operation
-------------------
Each compression filter is two small sans-IO objects plus :class:`CodecStream`, the driver:

- an *encoder* turns what the application sends into wire bytes: ``compress(piece)`` (any
  output so far, possibly nothing), ``flush()`` at the end of each ``send_all`` (everything sent
  so far becomes decodable by the peer: latency before ratio), ``finish()`` at ``send_eof`` (the
  trailer), and optionally ``sent(nbytes, seconds)`` to learn how fast the lower stream drains;
- a *decoder* turns wire bytes back: ``feed(data)``, ``read(max_bytes)`` (at most ``max_bytes``
  of output, ``b""`` when it needs more input), ``end()`` when the input ended (raises
  BrokenStreamError if it ended inside a compressed stream). Corrupt input raises
  RemoteProtocolError, never a codec's own exception.

The driver keeps the Stream contract. Sending: the data is cut into pieces of at most
``encoder.piece_bytes`` and wire bytes are gathered up to :data:`SEND_BATCH_BYTES` before a
lower ``send_all``, so a 16 MiB write never holds 16 MiB of compressed output; one
``send_all`` of the application normally costs one ``send_all`` below. ``send_eof`` sends the
trailer, then half-closes below. Receiving: the decoder is drained before reading more from
below, and the driver reads at most :data:`RECEIVE_BYTES` at a time, so the compressed bytes
buffered are bounded by one read plus the decoder's own bounded state, and each
``receive_some`` returns at most ``max_bytes`` however much the input inflates (no zip bomb).
``receive_some`` returns ``b""`` exactly when the lower stream ended at a stream boundary.

Errors keep the Stream contract too: the decoders raise RemoteProtocolError for corrupt input,
and the driver turns it into BrokenStreamError (``from`` it, so the reason stays in
``__cause__``): to whoever reads the stream, bad input and a dead peer are the same thing, a
stream that cannot go on (the bridge resets the application's socket for both).

After a send fails the encoder's state no longer matches what the peer got: later sends raise
BrokenStreamError. After a receive fails (corrupt or truncated input, broken lower stream), it
and every later receive raise BrokenStreamError. ``close`` closes the lower stream; idempotent.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Dict, Optional, Tuple, Type

from ..errors import BrokenStreamError, RemoteProtocolError
from ..streams import DEFAULT_RECEIVE_BYTES, Stream

__all__ = [
    "SEND_PIECE_BYTES",
    "SEND_BATCH_BYTES",
    "RECEIVE_BYTES",
    "CodecStream",
    "RefeedDecoder",
]

# Input handed to a compressor at once: bounds its output buffer; large enough that per-call
# overhead vanishes.
SEND_PIECE_BYTES = 256 * 1024
# Wire bytes gathered before a lower send_all: one write per send for most sends, and a bound on
# the compressed bytes held at once. An encoder may set its own ``batch_bytes``.
SEND_BATCH_BYTES = 256 * 1024
# What the driver asks the lower stream for: the compressed bytes buffered at once.
RECEIVE_BYTES = 64 * 1024


class CodecStream(Stream):
    """A Stream that compresses what it sends and decompresses what it receives."""

    def __init__(self, lower: Stream, encoder: Any, decoder: Any, *, name: str, details: Dict[str, Any]) -> None:
        self.lower = lower
        self.info = {**getattr(lower, "info", {}), name: dict(details)}
        self._name = name
        self._encoder = encoder
        self._decoder = decoder
        self._sent_hook: Optional[Callable[[int, float], None]] = getattr(encoder, "sent", None)
        self._batch_bytes: int = getattr(encoder, "batch_bytes", SEND_BATCH_BYTES)
        self._closed = False
        self._eof_sent = False
        self._eof_received = False
        self._send_error: Optional[BaseException] = None
        self._receive_error: Optional[BaseException] = None
        self.bytes_in = 0  # application bytes sent
        self.bytes_out = 0  # wire bytes sent

    def __repr__(self) -> str:
        return f"<{type(self).__name__} over {self.lower!r}>"

    # --- sending -----------------------------------------------------------------------------

    def _check_sendable(self) -> None:
        if self._closed:
            raise BrokenStreamError("stream is closed")
        if self._eof_sent:
            raise BrokenStreamError("cannot send after send_eof()")
        if self._send_error is not None:
            raise BrokenStreamError(f"{self._name}: an earlier send failed: {self._send_error}")

    def _send_lower(self, wire) -> None:
        try:
            start = time.perf_counter()
            self.lower.send_all(wire)
            if self._sent_hook is not None:
                self._sent_hook(len(wire), time.perf_counter() - start)
        except BaseException as exc:
            self._send_error = exc
            if self._closed and isinstance(exc, Exception):
                raise BrokenStreamError("stream is closed") from exc
            raise
        self.bytes_out += len(wire)

    def send_all(self, data) -> None:
        self._check_sendable()
        view = memoryview(data).cast("B")
        if not len(view):
            return
        batch = bytearray()
        step = self._encoder.piece_bytes
        for offset in range(0, len(view), step):
            batch += self._encoder.compress(view[offset : offset + step])
            if len(batch) >= self._batch_bytes:
                self._send_lower(batch)
                batch = bytearray()
        batch += self._encoder.flush()
        if batch:
            self._send_lower(batch)
        self.bytes_in += len(view)

    def send_eof(self) -> None:
        if self._closed or self._eof_sent:
            return
        if self._send_error is not None:
            raise BrokenStreamError(f"{self._name}: an earlier send failed: {self._send_error}")
        self._eof_sent = True
        trailer = self._encoder.finish()
        if trailer:
            self._send_lower(trailer)
        self.lower.send_eof()

    # --- receiving ---------------------------------------------------------------------------

    def receive_some(self, max_bytes: int = DEFAULT_RECEIVE_BYTES) -> bytes:
        """Return 1 to ``max_bytes`` decompressed bytes, or ``b""`` once the lower stream ended
        at a stream boundary. Raises BrokenStreamError if the lower stream broke, ended inside
        compressed data (truncated), or carried corrupt data (``__cause__`` is the decoder's
        RemoteProtocolError), and on every call after such a failure or ``close()``.
        """
        if max_bytes < 1:
            raise ValueError("max_bytes must be at least 1")
        if self._closed:
            raise BrokenStreamError("stream is closed")
        if self._receive_error is not None:
            raise BrokenStreamError(f"{self._name}: an earlier receive failed: {self._receive_error}")
        try:
            while True:
                out = self._decoder.read(max_bytes)
                if out:
                    return out
                if self._eof_received:
                    return b""
                data = self.lower.receive_some(RECEIVE_BYTES)
                if not data:
                    self._decoder.end()
                    self._eof_received = True
                    return b""
                self._decoder.feed(data)
        except (RemoteProtocolError, BrokenStreamError) as exc:
            self._receive_error = exc
            if self._closed:
                raise BrokenStreamError("stream is closed") from exc
            if isinstance(exc, RemoteProtocolError):
                raise BrokenStreamError(f"{self._name}: {exc}") from exc
            raise

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.lower.close()


class RefeedDecoder:
    """A decoder over a decompressor with the ``bz2``/``lz4.frame`` API, across stream ends.

    ``factory()`` makes a decompressor with ``decompress(data, max_length)``, ``eof``,
    ``unused_data`` and ``needs_input``; ``errors`` are the exceptions it raises for bad input.
    When one compressed stream (frame) ends, what follows is fed to a fresh decompressor, so a
    peer may send any number of streams back to back. With ``end_marker``, a stream that
    decodes to nothing marks the end of the data: input after it is an error, and input that
    ends without it was cut short.
    """

    def __init__(self, factory: Callable[[], Any], errors: Tuple[Type[BaseException], ...], what: str,
                 *, end_marker: bool = False) -> None:
        self._factory = factory
        self._errors = errors
        self._what = what
        self._end_marker = end_marker
        self._d = factory()
        self._input = b""  # fed, not yet given to the decompressor
        self._in_stream = False  # the current decompressor has been given input
        self._stream_out = 0  # bytes the current decompressor produced
        self._seen_input = False
        self._ended = False  # the end marker arrived
        self._maybe_more = False  # the last read filled max_bytes: output may be pending inside

    def feed(self, data) -> None:
        self._input = self._input + bytes(data) if self._input else bytes(data)
        self._seen_input = True

    def read(self, max_bytes: int) -> bytes:
        while True:
            d = self._d
            if d.eof:
                rest = d.unused_data or b""  # lz4 gives None when nothing followed
                if self._end_marker and self._stream_out == 0:
                    self._ended = True
                self._d = d = self._factory()
                self._in_stream = False
                self._stream_out = 0
                self._input = rest + self._input
            if self._ended and self._input:
                raise RemoteProtocolError(f"{self._what} data after the end-of-data marker")
            if not self._input and not self._maybe_more and d.needs_input:
                return b""
            data, self._input = self._input, b""
            self._in_stream = self._in_stream or bool(data)
            try:
                out = d.decompress(data, max_bytes)
            except self._errors as exc:
                raise RemoteProtocolError(f"corrupt {self._what} data: {exc}") from exc
            self._maybe_more = len(out) >= max_bytes or not d.needs_input
            self._stream_out += len(out)
            if out:
                return out
            if not d.eof and not self._input and not self._maybe_more:
                return b""
            if not d.eof and not self._input and not data:
                return b""  # no input, no output, no end: nothing more to get now

    def end(self) -> None:
        """The input ended: raise BrokenStreamError if it ended inside a stream (or before the
        end marker, if there is one)."""
        cut = self._input or (self._in_stream and not self._d.eof)
        if self._end_marker and self._seen_input and not self._ended:
            cut = True
        if cut:
            raise BrokenStreamError(
                f"the {self._what} data was cut short: the peer closed without EOF, or the link broke"
            )
