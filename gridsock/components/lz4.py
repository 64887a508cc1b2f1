"""The ``lz4`` filter: one LZ4 frame per direction, flushed on every send.

Theory of operation
-------------------
Wire format: a standard LZ4 frame (the ``lz4`` command-line tool reads it) with linked blocks
(each block may refer to the previous 64 KiB, so small messages compress against earlier ones)
and both checksums: xxHash32 per block, over the block as sent, so most corruption fails at once;
and xxHash32 of the whole content, checked at the end mark, which catches what the block
checksum cannot see (a flipped "stored block" bit leaves the block bytes intact). Both cost far
less than the compression.
The frame header goes out with the first data; every ``send_all`` compresses with
``auto_flush``, so the peer can decode everything sent so far (latency: an RPC request is never
held back waiting for more). ``send_eof`` ends the frame (end mark), then half-closes below. A
direction that sent nothing sends no bytes at all.

The receiver decodes frames back to back: when one ends, what follows starts a fresh
decompressor, so a peer that starts a new frame (another implementation) is understood too.
Output per ``receive_some`` is bounded by ``max_bytes``. Corrupt input (the decoder raises
RemoteProtocolError) and input that ends inside a frame (the peer closed without EOF, died, or
the link broke) both make ``receive_some`` raise BrokenStreamError; only a frame's end mark
followed by the lower stream's EOF (or no data at all, then EOF) is a clean ``b""``.

Parameter ``level``: 0 (default) is LZ4's fast mode, several hundred MB/s; 3-16 select LZ4-HC,
slower for a somewhat better ratio.
"""
from __future__ import annotations


import lz4.frame

from ..errors import ConfigError
from ..stack import StackContext
from ..streams import Stream
from ._framing import SEND_PIECE_BYTES, CodecStream, RefeedDecoder

__all__ = ["Lz4Filter", "Lz4Stream", "DEFAULT_LEVEL", "MAX_LEVEL"]

DEFAULT_LEVEL = 0
MAX_LEVEL = 16  # lz4.frame.COMPRESSIONLEVEL_MAX


class Lz4Encoder:
    """Sans-IO: application bytes -> one LZ4 frame, flushed per send."""

    piece_bytes = SEND_PIECE_BYTES

    def __init__(self, level: int) -> None:
        self._c = lz4.frame.LZ4FrameCompressor(
            compression_level=level, block_checksum=True, content_checksum=True, auto_flush=True
        )
        self._started = False

    def compress(self, piece) -> bytes:
        if not self._started:
            self._started = True
            return self._c.begin() + self._c.compress(piece)
        return self._c.compress(piece)

    def flush(self) -> bytes:
        return b""  # auto_flush: compress() already returned everything

    def finish(self) -> bytes:
        return self._c.flush() if self._started else b""


def Lz4Decoder() -> RefeedDecoder:
    """Sans-IO: LZ4 frames -> application bytes (see :class:`RefeedDecoder`)."""
    return RefeedDecoder(lz4.frame.LZ4FrameDecompressor, (RuntimeError, ValueError, EOFError), "lz4")


class Lz4Stream(CodecStream):
    """A stream that LZ4-compresses both directions over ``lower``."""

    def __init__(self, lower: Stream, *, level: int = DEFAULT_LEVEL) -> None:
        super().__init__(lower, Lz4Encoder(level), Lz4Decoder(), name="lz4", details={"level": level})


class Lz4Filter:
    """The ``lz4`` component: ``lz4(level=N)``."""

    name = "lz4"
    kind = "filter"
    PARAMS = {"level": int}
    LIMITS = {"level": (0, MAX_LEVEL)}

    def __init__(self, level: int = DEFAULT_LEVEL) -> None:
        if not 0 <= level <= MAX_LEVEL:
            raise ConfigError(f"lz4: level must be within [0, {MAX_LEVEL}], not {level}")
        self.level = level

    def wrap(self, lower: Stream, *, context: StackContext) -> Stream:
        """Return a stream that compresses over ``lower``; does no I/O."""
        return Lz4Stream(lower, level=self.level)
