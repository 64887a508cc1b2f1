"""The ``zlib`` filter: one zlib stream per direction, sync-flushed on every send.

Theory of operation
-------------------
Wire format: a standard zlib stream (RFC 1950/1951; Python's ``zlib.decompress`` reads it),
32 KiB window. Every ``send_all`` ends with a ``Z_SYNC_FLUSH`` (an empty stored block,
``00 00 ff ff``), so the peer can decode everything sent so far; ``send_eof`` ends the stream
with ``Z_FINISH`` (the Adler-32 trailer), then half-closes below. A direction that sent nothing
sends no bytes at all. The receiver decodes streams back to back (what follows a finished
stream starts a new one).

Decompression is bounded: each ``receive_some`` inflates at most ``max_bytes`` and keeps the
rest of the input (``unconsumed_tail``) for the next call, so a zip bomb (zlib reaches 1000:1)
costs the receiver no more memory than any other stream. Corrupt input (the decoder raises
RemoteProtocolError) and input that ends inside a stream (the peer closed without EOF, died,
or the link broke) both make ``receive_some`` raise BrokenStreamError.

Parameter ``level``: 0-9, default 6 (zlib's own default: about 50 MB/s and a quarter of the
size on JSON). The per-send sync flush costs 4-5 bytes and resets nothing: the window carries
over, so small messages compress against earlier ones.
"""
from __future__ import annotations

import zlib

from ..errors import BrokenStreamError, ConfigError, RemoteProtocolError
from ..stack import StackContext
from ..streams import Stream
from ._framing import SEND_PIECE_BYTES, CodecStream

__all__ = ["ZlibFilter", "ZlibStream", "DEFAULT_LEVEL"]

DEFAULT_LEVEL = 6


class ZlibEncoder:
    """Sans-IO: application bytes -> one zlib stream, sync-flushed per send."""

    piece_bytes = SEND_PIECE_BYTES

    def __init__(self, level: int) -> None:
        self._c = zlib.compressobj(level)
        self._started = False

    def compress(self, piece) -> bytes:
        self._started = True
        return self._c.compress(piece)

    def flush(self) -> bytes:
        return self._c.flush(zlib.Z_SYNC_FLUSH)

    def finish(self) -> bytes:
        return self._c.flush(zlib.Z_FINISH) if self._started else b""


class ZlibDecoder:
    """Sans-IO: zlib streams -> application bytes, at most ``max_bytes`` per read."""

    def __init__(self) -> None:
        self._d = zlib.decompressobj()
        self._input = b""  # fed, or left over by the decompressor (unconsumed_tail)
        self._in_stream = False
        self._maybe_more = False  # the last read filled max_bytes: output may be pending inside

    def feed(self, data) -> None:
        self._input = self._input + bytes(data) if self._input else bytes(data)

    def read(self, max_bytes: int) -> bytes:
        while True:
            if self._d.eof:
                rest = self._d.unused_data
                self._d = zlib.decompressobj()
                self._in_stream = False
                self._maybe_more = False
                self._input = rest + self._input
            if not self._input and not self._maybe_more:
                return b""
            data, self._input = self._input, b""
            self._in_stream = self._in_stream or bool(data)
            try:
                out = self._d.decompress(data, max_bytes)
            except zlib.error as exc:
                raise RemoteProtocolError(f"corrupt zlib data: {exc}") from exc
            self._input = self._d.unconsumed_tail
            self._maybe_more = len(out) >= max_bytes
            if out:
                return out
            if not self._d.eof and not self._input:
                return b""

    def end(self) -> None:
        """The input ended: raise BrokenStreamError if it ended inside a stream."""
        if self._input or (self._in_stream and not self._d.eof):
            raise BrokenStreamError("the zlib data was cut short: the peer closed without EOF, or the link broke")


class ZlibStream(CodecStream):
    """A stream that zlib-compresses both directions over ``lower``."""

    def __init__(self, lower: Stream, *, level: int = DEFAULT_LEVEL) -> None:
        super().__init__(lower, ZlibEncoder(level), ZlibDecoder(), name="zlib", details={"level": level})


class ZlibFilter:
    """The ``zlib`` component: ``zlib(level=N)``."""

    name = "zlib"
    kind = "filter"
    PARAMS = {"level": int}
    LIMITS = {"level": (0, 9)}

    def __init__(self, level: int = DEFAULT_LEVEL) -> None:
        if not 0 <= level <= 9:
            raise ConfigError(f"zlib: level must be within [0, 9], not {level}")
        self.level = level

    def wrap(self, lower: Stream, *, context: StackContext) -> Stream:
        """Return a stream that compresses over ``lower``; does no I/O."""
        return ZlibStream(lower, level=self.level)
