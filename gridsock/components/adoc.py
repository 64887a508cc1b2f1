"""The ``adoc`` filter: adaptive online compression after AdOC (Jeannot, Knutsson, Bjorkman).

Theory of operation
-------------------
Compression pays when the link is slower than the compressor: on a LAN raw bytes win, on a
congested WAN link zlib-9 does. ``adoc`` decides per chunk, from what it measures.

**Levels.** As in AdOC: 0 = raw, 1 = LZ4 (AdOC used LZF), 2-10 = zlib levels 1-9. Parameters
``min_level`` (default 0) and ``max_level`` (default 10) bound the choice.

**Chunks.** Each ``send_all`` is cut into chunks of at most :data:`CHUNK_BYTES`; each chunk is
compressed on its own (any chunk can use any level, and the receiver needs no state across
chunks) and sent at once (no chunk waits for the next send: latency as ``lz4``'s).

**Policy.** The sender keeps three estimates:

- the link's drain time per wire byte, ``spb``: the time ``send_all`` below took, over the bytes
  it took (an EWMA, quick to learn that the link is slow, slow to believe it fast again, which
  damps oscillation; sends under :data:`MIN_TIMED_BYTES` are not timed). A ``send_all`` that
  returns at once -- a kernel buffer with room, an idle link -- says the link keeps up, and pulls
  ``spb`` towards 0; one that blocks measures the link (or the reader) at its real pace.
- the compressors' speed: prior speeds per level (:data:`PRIOR_SPEED_BPS`, measured on JSON)
  times one factor learnt from the chunks actually compressed (machine and data);
- the data's compressibility: prior ratios per level (:data:`PRIOR_RATIO`) times one factor
  learnt likewise.

For each allowed level it predicts the time a raw byte costs, compression plus transmission,
``1/speed + ratio * spb`` (raw: ``spb``), and picks the cheapest, keeping the current level unless
another is :data:`HYSTERESIS` cheaper. A link faster than every compressor -- a LAN, an
in-memory pair -- gets raw chunks; a slow one gets the heaviest zlib level that still keeps it
busy. **Incompressible data:** a chunk whose compressed form is at least
:data:`INCOMPRESSIBLE_RATIO` of the raw one goes raw, and the next 1, 2, 4 ...
:data:`MAX_BACKOFF_CHUNKS` chunks skip compression (the back-off doubles while data stays
incompressible, and resets at the first chunk that compresses), so random or already
compressed data costs one compression attempt in 64 chunks.

**Wire format** (each direction; integers big-endian)::

    prelude  "AdC" | version u8 = 1                        once, before the first chunk
    chunk    codec u8 | payload_len u24 | raw_len u24 | payload     any number of times
    end      codec u8 = 255 | 0 u24 | 0 u24                      once, at send_eof

``codec`` 0 = raw (payload_len == raw_len), 1 = an LZ4 block (no size prefix), 2 = a zlib
stream (RFC 1950: header, deflate, Adler-32). ``1 <= raw_len <= CHUNK_BYTES`` and
``1 <= payload_len <= raw_len`` (a chunk that does not shrink is sent raw). A direction that
sends nothing sends no bytes at all, not even the prelude and the end marker. The receiver checks the
prelude and every header as soon as it arrives and decompresses at most ``raw_len`` bytes, so
nothing a peer sends costs more than one chunk of memory; anything else (bad magic or version,
unknown codec, oversized or inconsistent lengths, a payload that does not decode to exactly
``raw_len`` bytes, bytes after the end marker) makes the decoder raise RemoteProtocolError,
which ``receive_some`` reports as BrokenStreamError (``from`` it). Input that ends before the
end marker (inside a chunk, or between chunks: the peer closed without EOF or died) raises
BrokenStreamError too. There is no checksum: raw and LZ4 chunks rely on the layers below (TCP's
checksum, TLS) for integrity, as an uncompressed stream does.
"""
from __future__ import annotations

import struct
import time
import zlib
from typing import Any, Callable, Dict

import lz4.block

from ..errors import BrokenStreamError, ConfigError, RemoteProtocolError
from ..stack import StackContext
from ..streams import Stream
from ._framing import CodecStream

__all__ = [
    "AdocFilter",
    "AdocStream",
    "AdocEncoder",
    "AdocDecoder",
    "MAGIC",
    "CHUNK_BYTES",
    "MIN_LEVEL",
    "MAX_LEVEL",
    "LEVEL_NAMES",
]

MAGIC = b"AdC\x01"  # "AdC" and wire version 1
# Raw bytes per chunk: large enough for zlib to find its matches and for per-chunk costs to
# vanish, small enough that one chunk's compression (a few ms at zlib-9) never stalls a link.
CHUNK_BYTES = 128 * 1024
# Below this a chunk goes raw: a header costs more than compression could save.
MIN_COMPRESS_BYTES = 128
# Chunks and sends smaller than this are too short for their timing to mean anything.
MIN_TIMED_BYTES = 8 * 1024
# A chunk compressed to at least this fraction of its size goes raw and starts a back-off.
INCOMPRESSIBLE_RATIO = 0.95
# The longest run of chunks sent raw without trying compression, after incompressible ones.
MAX_BACKOFF_CHUNKS = 64
# Keep the current level unless another predicts a cost this many times lower.
HYSTERESIS = 1.15
# EWMA weights of the link estimate: a slower link is believed at once, a faster one slowly.
LINK_ALPHA_SLOWER = 0.5
LINK_ALPHA_FASTER = 0.1
# EWMA weight of the speed and compressibility factors.
FACTOR_ALPHA = 0.3

MIN_LEVEL, MAX_LEVEL = 0, 10
LEVEL_RAW, LEVEL_LZ4 = 0, 1
LEVEL_NAMES = ("raw", "lz4") + tuple(f"zlib-{n}" for n in range(1, 10))
CODEC_RAW, CODEC_LZ4, CODEC_ZLIB, CODEC_END = 0, 1, 2, 255

# Priors per level, measured on JSON-like records in 128 KiB chunks (one x86-64 core, 2020s):
# compression speed in input bytes per second, and compressed/raw size.
PRIOR_SPEED_BPS = (float("inf"), 660e6, 172e6, 160e6, 107e6, 99e6, 69e6, 52e6, 40e6, 15e6, 11e6)
PRIOR_RATIO = (1.0, 0.32, 0.226, 0.21, 0.198, 0.191, 0.176, 0.167, 0.164, 0.16, 0.16)

_HEADER = struct.Struct("!B3s3s")
HEADER_BYTES = _HEADER.size


def _u24(n: int) -> bytes:
    return n.to_bytes(3, "big")


def compress_chunk(level: int, chunk) -> bytes:
    """Return the payload of ``chunk`` compressed at adoc ``level`` (1 = lz4, 2-10 = zlib)."""
    if level == LEVEL_LZ4:
        return lz4.block.compress(chunk, store_size=False)
    return zlib.compress(chunk, level - 1)


class AdocEncoder:
    """Sans-IO: application bytes -> adoc chunks at adaptively chosen levels.

    ``compress(chunk)`` returns the wire bytes of one chunk (the prelude first, once);
    ``sent(nbytes, seconds)`` reports how long the lower stream took to take ``nbytes``.
    ``stats`` counts chunks per level name and bytes in and out.
    """

    piece_bytes = CHUNK_BYTES
    batch_bytes = 1  # send every chunk at once: the link drains it while we compress the next

    def __init__(self, min_level: int = MIN_LEVEL, max_level: int = MAX_LEVEL, *,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.min_level = min_level
        self.max_level = max_level
        self._clock = clock
        self._started = False
        self.level = min_level
        self.spb = 0.0  # link seconds per wire byte; 0 until a send shows the link is slow
        self.speed_factor = 1.0
        self.ratio_factor = 1.0
        self._skip = 0  # chunks still to send raw without trying
        self._backoff = 0  # the current back-off length
        self.stats: Dict[str, Any] = {"raw_bytes": 0, "wire_bytes": 0, "chunks": {}}

    # --- policy ------------------------------------------------------------------------------

    def cost(self, level: int) -> float:
        """Predicted seconds per raw byte at ``level``: compression plus transmission."""
        if level == LEVEL_RAW:
            return self.spb
        ratio = min(1.0, PRIOR_RATIO[level] * self.ratio_factor)
        return 1.0 / (PRIOR_SPEED_BPS[level] * self.speed_factor) + ratio * self.spb

    def choose(self) -> int:
        """Return the level for the next chunk (and remember it)."""
        costs = {lvl: self.cost(lvl) for lvl in range(self.min_level, self.max_level + 1)}
        best = min(costs, key=costs.__getitem__)
        if costs[self.level] > costs[best] * HYSTERESIS:
            self.level = best
        return self.level

    def sent(self, nbytes: int, seconds: float) -> None:
        """The lower stream took ``seconds`` to accept ``nbytes``: update the link estimate."""
        if nbytes < MIN_TIMED_BYTES:
            return
        sample = max(0.0, seconds) / nbytes
        alpha = LINK_ALPHA_SLOWER if sample > self.spb else LINK_ALPHA_FASTER
        self.spb += alpha * (sample - self.spb)

    # --- encoding ----------------------------------------------------------------------------

    def compress(self, chunk) -> bytes:
        raw_len = len(chunk)
        level = LEVEL_RAW
        payload = chunk
        if self._skip > 0:
            self._skip -= 1
        elif raw_len >= MIN_COMPRESS_BYTES:
            level = self.choose()
            if level != LEVEL_RAW:
                start = self._clock()
                payload = compress_chunk(level, chunk)
                elapsed = self._clock() - start
                self._learn(level, raw_len, len(payload), elapsed)
                if len(payload) >= INCOMPRESSIBLE_RATIO * raw_len:
                    self._backoff = min(max(1, 2 * self._backoff), MAX_BACKOFF_CHUNKS)
                    self._skip = self._backoff
                    level, payload = LEVEL_RAW, chunk
                else:
                    self._backoff = 0
        codec = CODEC_RAW if level == LEVEL_RAW else CODEC_LZ4 if level == LEVEL_LZ4 else CODEC_ZLIB
        header = _HEADER.pack(codec, _u24(len(payload)), _u24(raw_len))
        prelude = b"" if self._started else MAGIC
        self._started = True
        stats = self.stats
        stats["raw_bytes"] += raw_len
        stats["wire_bytes"] += len(prelude) + HEADER_BYTES + len(payload)
        name = LEVEL_NAMES[level]
        stats["chunks"][name] = stats["chunks"].get(name, 0) + 1
        return b"".join((prelude, header, payload))

    def _learn(self, level: int, raw_len: int, wire_len: int, seconds: float) -> None:
        if raw_len < MIN_TIMED_BYTES:
            return
        if seconds > 0:
            sample = raw_len / seconds / PRIOR_SPEED_BPS[level]
            self.speed_factor += FACTOR_ALPHA * (sample - self.speed_factor)
        ratio = wire_len / raw_len
        if ratio < INCOMPRESSIBLE_RATIO:  # incompressible data is the back-off's business
            self.ratio_factor += FACTOR_ALPHA * (ratio / PRIOR_RATIO[level] - self.ratio_factor)

    def flush(self) -> bytes:
        return b""  # every chunk went out whole

    def finish(self) -> bytes:
        return _HEADER.pack(CODEC_END, _u24(0), _u24(0)) if self._started else b""


class AdocDecoder:
    """Sans-IO: adoc chunks -> application bytes (see the module docstring for the checks)."""

    def __init__(self) -> None:
        self._wire = bytearray()  # at most one chunk plus one read of the lower stream
        self._prelude_ok = False
        self._ended = False  # the end marker arrived
        self._out = b""
        self._out_pos = 0

    def feed(self, data) -> None:
        self._wire += data

    def read(self, max_bytes: int) -> bytes:
        while True:
            if self._out_pos < len(self._out):
                piece = self._out[self._out_pos : self._out_pos + max_bytes]
                self._out_pos += len(piece)
                return piece
            wire = self._wire
            if not self._prelude_ok:
                n = min(len(wire), len(MAGIC))
                if wire[:n] != MAGIC[:n]:
                    raise RemoteProtocolError(f"not an adoc stream, or another version: starts {bytes(wire[:4])!r}")
                if n < len(MAGIC):
                    return b""
                del wire[: len(MAGIC)]
                self._prelude_ok = True
            if self._ended:
                if wire:
                    raise RemoteProtocolError("adoc data after the end marker")
                return b""
            if len(wire) < HEADER_BYTES:
                return b""
            codec, payload_len, raw_len = _HEADER.unpack_from(wire)
            payload_len = int.from_bytes(payload_len, "big")
            raw_len = int.from_bytes(raw_len, "big")
            if codec == CODEC_END:
                if payload_len or raw_len:
                    raise RemoteProtocolError("adoc end marker with non-zero lengths")
                del wire[:HEADER_BYTES]
                self._ended = True
                continue
            if codec not in (CODEC_RAW, CODEC_LZ4, CODEC_ZLIB):
                raise RemoteProtocolError(f"adoc chunk with unknown codec {codec}")
            if not 1 <= raw_len <= CHUNK_BYTES:
                raise RemoteProtocolError(f"adoc chunk of {raw_len} bytes (limit {CHUNK_BYTES})")
            if payload_len > raw_len or (codec == CODEC_RAW and payload_len != raw_len) or payload_len == 0:
                raise RemoteProtocolError(f"adoc chunk of {raw_len} bytes with a {payload_len}-byte payload")
            end = HEADER_BYTES + payload_len
            if len(wire) < end:
                return b""
            payload = bytes(wire[HEADER_BYTES:end])
            del wire[:end]
            self._out = _decode_chunk(codec, payload, raw_len)
            self._out_pos = 0

    def end(self) -> None:
        """The input ended: raise BrokenStreamError unless after the end marker (or at once)."""
        if self._wire or (self._prelude_ok and not self._ended):
            raise BrokenStreamError("the adoc data was cut short: the peer closed without EOF, or the link broke")


def _decode_chunk(codec: int, payload: bytes, raw_len: int) -> bytes:
    if codec == CODEC_RAW:
        return payload
    if codec == CODEC_LZ4:
        try:
            out = lz4.block.decompress(payload, uncompressed_size=raw_len)
        except lz4.block.LZ4BlockError as exc:
            raise RemoteProtocolError(f"corrupt adoc lz4 chunk: {exc}") from exc
    else:
        d = zlib.decompressobj()
        try:
            out = d.decompress(payload, raw_len)  # never more than announced: no bomb
        except zlib.error as exc:
            raise RemoteProtocolError(f"corrupt adoc zlib chunk: {exc}") from exc
        if not d.eof or d.unconsumed_tail or d.unused_data:
            raise RemoteProtocolError("adoc zlib chunk does not end where announced")
    if len(out) != raw_len:
        raise RemoteProtocolError(f"adoc chunk decodes to {len(out)} bytes, announced {raw_len}")
    return out


class AdocStream(CodecStream):
    """A stream that compresses adaptively over ``lower``; ``info["adoc"]["stats"]`` is live."""

    def __init__(self, lower: Stream, *, min_level: int = MIN_LEVEL, max_level: int = MAX_LEVEL) -> None:
        encoder = AdocEncoder(min_level, max_level)
        details = {"min_level": min_level, "max_level": max_level, "stats": encoder.stats}
        super().__init__(lower, encoder, AdocDecoder(), name="adoc", details=details)
        self.encoder = encoder


class AdocFilter:
    """The ``adoc`` component: ``adoc(min_level=N,max_level=M)``, levels 0-10."""

    name = "adoc"
    kind = "filter"
    PARAMS = {"min_level": int, "max_level": int}
    LIMITS = {"min_level": (MIN_LEVEL, MAX_LEVEL), "max_level": (MIN_LEVEL, MAX_LEVEL)}

    def __init__(self, min_level: int = MIN_LEVEL, max_level: int = MAX_LEVEL) -> None:
        for key, value in (("min_level", min_level), ("max_level", max_level)):
            if not MIN_LEVEL <= value <= MAX_LEVEL:
                raise ConfigError(f"adoc: {key} must be within [{MIN_LEVEL}, {MAX_LEVEL}], not {value}")
        if min_level > max_level:
            raise ConfigError(f"adoc: min_level {min_level} is above max_level {max_level}")
        self.min_level = min_level
        self.max_level = max_level

    def wrap(self, lower: Stream, *, context: StackContext) -> Stream:
        """Return a stream that compresses adaptively over ``lower``; does no I/O."""
        return AdocStream(lower, min_level=self.min_level, max_level=self.max_level)
