"""The compression filters (lz4, zlib, bz2, adoc): conformance, ratios, policy, bad input."""
from __future__ import annotations

import time
import tracemalloc
import zlib as stdlib_zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gridsock.components import adoc
from gridsock.components._framing import CodecStream
from gridsock.components.adoc import CHUNK_BYTES, MAGIC, AdocDecoder, AdocEncoder, AdocStream
from gridsock.components.bz2 import Bz2Decoder, Bz2Encoder, Bz2Stream
from gridsock.components.lz4 import Lz4Decoder, Lz4Encoder, Lz4Stream
from gridsock.components.zlib import ZlibDecoder, ZlibEncoder, ZlibStream
from gridsock.errors import BrokenStreamError, RemoteProtocolError
from gridsock.testing.streams import (
    CountingStream,
    ThrottledStream,
    check_stream,
    memory_pair,
    run_concurrently,
    sample_data,
    stream_over,
    tcp_pair,
)

pytestmark = pytest.mark.timeout(120)

MiB = 1024 * 1024
LOWER_PAIRS = {"memory": memory_pair, "tcp": tcp_pair}
# bz2 runs at 5-15 MB/s and zlib-6 at 50: smaller transfers keep their checks to a second or two.
SIZES = {
    "bz2": dict(bulk_bytes=2 * MiB, large_write_bytes=4 * MiB),
    "zlib": dict(bulk_bytes=4 * MiB, large_write_bytes=8 * MiB),
    "lz4/zlib": dict(bulk_bytes=4 * MiB, large_write_bytes=8 * MiB),
}
STREAMS = {
    "lz4": Lz4Stream,
    "zlib": ZlibStream,
    "bz2": Bz2Stream,
    "adoc": lambda lower: AdocStream(lower, min_level=2),  # zlib chunks: something to corrupt
    "adoc-raw": lambda lower: AdocStream(lower, max_level=0),
}
ALLOWED = (RemoteProtocolError, BrokenStreamError)


# --- conformance -------------------------------------------------------------------------------

@pytest.mark.parametrize("lower", sorted(LOWER_PAIRS))
def test_conformance_of_the_lower_pairs(lower):
    check_stream(LOWER_PAIRS[lower])


@pytest.mark.parametrize("lower", sorted(LOWER_PAIRS))
@pytest.mark.parametrize("filters", ["lz4", "zlib", "bz2", "adoc", "lz4/zlib"])
def test_conformance(filters, lower):
    check_stream(lambda: stream_over(LOWER_PAIRS[lower], filters), **SIZES.get(filters, {}))


def test_conformance_of_adoc_always_compressing():
    check_stream(lambda: stream_over(memory_pair, "adoc(min_level=1,max_level=3)"),
                 skip=("early_close_by_client", "early_close_by_server"))


# --- ratios --------------------------------------------------------------------------------------

def _transfer(filters, data, *, lower_pair=None, send_bytes=MiB):
    """Send ``data`` client -> server over ``filters``; return (wire bytes, client stream, seconds)."""
    lowers = {}

    def counted():
        a, b = (lower_pair or memory_pair)()
        lowers["client"] = a if isinstance(a, CountingStream) else CountingStream(a)
        return lowers["client"], b

    client, server = stream_over(counted, filters)
    with client, server:
        def send():
            for i in range(0, len(data), send_bytes):
                client.send_all(data[i : i + send_bytes])
            client.send_eof()

        def receive():
            out = bytearray()
            while True:
                chunk = server.receive_some(256 * 1024)
                if not chunk:
                    return bytes(out)
                out += chunk

        start = time.perf_counter()
        _, got = run_concurrently(send, receive)
        elapsed = time.perf_counter() - start
    assert got == data
    return lowers["client"].bytes_sent, client, elapsed


@pytest.mark.parametrize(
    "filters, limit",  # measured: 0.32, 0.17, 0.12, 0.26, 0.30
    [("lz4", 0.40), ("zlib", 0.20), ("bz2", 0.14), ("lz4/zlib", 0.33), ("adoc(min_level=1)", 0.40)],
)
def test_json_compresses(filters, limit):
    data = sample_data(4 * MiB, "json")
    wire, _, _ = _transfer(filters, data)
    assert wire < limit * len(data)


@pytest.mark.parametrize("filters, limit", [("lz4", 1.01), ("zlib", 1.01), ("bz2", 1.02), ("adoc", 1.001)])
def test_random_data_costs_little(filters, limit):
    data = sample_data(2 * MiB, "random")
    wire, _, _ = _transfer(filters, data)
    assert len(data) <= wire < limit * len(data)


@pytest.mark.parametrize("filters, limit", [("lz4", 0.8), ("zlib", 0.4)])
def test_small_messages_compress_against_earlier_ones(filters, limit):
    lines = [line + b"\n" for line in sample_data(300_000, "json").split(b"\n")[:1000]]
    lowers = {}

    def counted():
        a, b = memory_pair()
        lowers["client"] = CountingStream(a)
        return lowers["client"], b

    client, server = stream_over(counted, filters)
    with client, server:
        for line in lines:  # one request at a time: each must be decodable at once
            client.send_all(line)
            got = b""
            while len(got) < len(line):
                got += server.receive_some(65536)
            assert got == line
    assert lowers["client"].bytes_sent < limit * sum(map(len, lines))


def test_empty_send_and_empty_direction_send_nothing():
    for filters in ("lz4", "zlib", "bz2", "adoc"):
        lowers = {}

        def counted():
            a, b = memory_pair()
            lowers["client"] = CountingStream(a)
            return lowers["client"], b

        client, server = stream_over(counted, filters)
        with client, server:
            client.send_all(b"")
            client.send_eof()
            assert server.receive_some(10) == b""
        assert lowers["client"].bytes_sent == 0, filters


def test_info_and_receive_argument():
    client, server = stream_over(memory_pair, "adoc(max_level=4)/zlib(level=1)")
    with client, server:
        assert client.info["stack"] == "adoc(max_level=4)/zlib(level=1)/memory"
        assert client.info["zlib"] == {"level": 1} and client.info["name"] == "client"
        assert client.info["adoc"]["max_level"] == 4
        with pytest.raises(ValueError):
            server.receive_some(0)
        client.send_all(bytearray(b"x" * 1000))
        client.send_all(memoryview(b"abc"))
        assert server.receive_some(1001) == b"x" * 1000
        assert client.info["adoc"]["stats"]["raw_bytes"] == 1003  # live statistics


# --- adoc's policy -------------------------------------------------------------------------------

def _teach_link(encoder, bytes_per_s, times=10):
    for _ in range(times):
        encoder.sent(CHUNK_BYTES, CHUNK_BYTES / bytes_per_s)


def test_adoc_policy_follows_the_link():
    encoder = AdocEncoder()
    assert encoder.choose() == 0  # no evidence the link is slow: raw
    _teach_link(encoder, 1e9)
    assert encoder.choose() == 0  # faster than any compressor
    _teach_link(encoder, 1e6)
    assert encoder.choose() >= 2  # a slow link: zlib
    slow_level = encoder.level
    _teach_link(encoder, 1e9, times=100)  # 10% per chunk: fast again is believed slowly
    assert encoder.choose() == 0  # back to raw
    assert slow_level <= 10

    bounded = AdocEncoder(min_level=1, max_level=3)
    assert bounded.choose() == 1  # at least lz4, even on a fast link
    _teach_link(bounded, 1e5)
    assert bounded.choose() <= 3
    never = AdocEncoder(max_level=0)
    _teach_link(never, 1e5)
    assert never.choose() == 0
    tiny = AdocEncoder()
    tiny.sent(100, 10.0)  # too small to time
    assert tiny.spb == 0.0


def test_adoc_backs_off_on_incompressible_data(monkeypatch):
    attempts = []
    real = adoc.compress_chunk

    def counting(level, chunk):
        attempts.append(level)
        return real(level, chunk)

    monkeypatch.setattr(adoc, "compress_chunk", counting)
    encoder = AdocEncoder()
    _teach_link(encoder, 1e6)  # slow: the policy wants compression
    noise = sample_data(CHUNK_BYTES * 8, "random")
    decoder = AdocDecoder()
    for i in range(200):
        chunk = noise[(i % 8) * CHUNK_BYTES : (i % 8 + 1) * CHUNK_BYTES]
        decoder.feed(encoder.compress(chunk))
        assert decoder.read(CHUNK_BYTES) == chunk
    assert len(attempts) <= 10  # 1 + 2 + 4 + ... 64: nine attempts in 200 chunks
    assert encoder.stats["chunks"] == {"raw": 200}

    text = sample_data(CHUNK_BYTES * 100, "json")
    resumed = None
    for i in range(100):
        wire = encoder.compress(text[i * CHUNK_BYTES : (i + 1) * CHUNK_BYTES])
        if len(wire) < CHUNK_BYTES / 2 and resumed is None:
            resumed = i
    assert resumed is not None and resumed <= adoc.MAX_BACKOFF_CHUNKS + 1
    assert sum(n for name, n in encoder.stats["chunks"].items() if name != "raw") >= 100 - resumed - 1


def test_adoc_sends_random_data_raw():
    data = sample_data(4 * MiB, "random")
    wire, client, _ = _transfer("adoc", data, lower_pair=lambda: _throttled_pair(50e6))
    chunks = len(data) // CHUNK_BYTES
    assert wire == len(data) + len(MAGIC) + adoc.HEADER_BYTES * (chunks + 1)  # + end marker
    assert client.info["adoc"]["stats"]["chunks"] == {"raw": chunks}


def _throttled_pair(bytes_per_s):
    a, b = memory_pair()
    return ThrottledStream(a, bytes_per_s), b


def test_adoc_compresses_over_a_slow_link():
    data = sample_data(4 * MiB, "json")
    wire, client, elapsed = _transfer("adoc", data, lower_pair=lambda: _throttled_pair(4e6))
    stats = client.info["adoc"]["stats"]["chunks"]
    assert wire < 0.40 * len(data), stats
    assert stats.get("raw", 0) <= 3, stats  # only until the first sends measured the link
    assert len(data) / elapsed > 4e6  # goodput beats the link


# --- bad input -----------------------------------------------------------------------------------

def _wire_of(kind, pieces):
    """The bytes a ``kind`` stream puts on its lower stream for these sends and an EOF."""
    a, b = memory_pair()
    stream = STREAMS[kind](a)
    for piece in pieces:
        stream.send_all(piece)
    stream.send_eof()
    wire = bytearray()
    while True:
        chunk = b.receive_some(1 << 20)
        if not chunk:
            break
        wire += chunk
    stream.close()
    b.close()
    return bytes(wire)


def _decode(kind, wire, max_bytes=65536):
    """Feed ``wire`` to a ``kind`` stream; return (bytes received, exception or None)."""
    a, b = memory_pair()
    a.send_all(wire)
    a.send_eof()
    stream = STREAMS[kind](b)
    out = bytearray()
    try:
        while True:
            chunk = stream.receive_some(max_bytes)
            if not chunk:
                return bytes(out), None
            out += chunk
    except ALLOWED as exc:
        return bytes(out), exc
    finally:
        stream.close()
        a.close()


SMALL = [sample_data(1500, "json", seed=1), sample_data(900, "mixed", seed=2)]


@pytest.mark.parametrize("kind", sorted(STREAMS))
def test_wire_round_trip(kind):
    wire = _wire_of(kind, SMALL)
    for max_bytes in (1, 7, 65536):
        assert _decode(kind, wire, max_bytes) == (b"".join(SMALL), None)
    assert _decode(kind, b"") == (b"", None)  # nothing sent at all: a clean EOF


@pytest.mark.parametrize("kind", sorted(STREAMS))
def test_truncated_input_is_detected(kind):
    data = b"".join(SMALL)
    wire = _wire_of(kind, SMALL)
    for cut in range(1, len(wire)):
        out, exc = _decode(kind, wire[:cut])
        assert isinstance(exc, ALLOWED), f"cut at {cut} of {len(wire)}: clean EOF"
        assert data.startswith(out), f"cut at {cut}: received bytes that were never sent"


@pytest.mark.parametrize("kind", sorted(STREAMS))
def test_corrupt_input_raises_only_protocol_errors(kind):
    data = b"".join(SMALL)
    wire = _wire_of(kind, SMALL)
    checksummed = kind in ("lz4", "zlib", "bz2")  # adoc relies on the layers below for integrity
    for pos in range(len(wire)):
        for flip in (0x01, 0x80, 0xFF):
            bad = bytearray(wire)
            bad[pos] ^= flip
            out, exc = _decode(kind, bytes(bad))
            if checksummed:
                assert exc is not None or out == data, f"byte {pos} ^ {flip:#x}: wrong data, no error"


@pytest.mark.parametrize("kind", sorted(STREAMS))
def test_data_after_the_end_raises(kind):
    wire = _wire_of(kind, SMALL)
    out, exc = _decode(kind, wire + b"garbage and more garbage")
    assert isinstance(exc, BrokenStreamError)
    assert isinstance(exc.__cause__, RemoteProtocolError) or kind == "lz4"  # lz4: a cut frame


@pytest.mark.parametrize("sender, receiver", [("lz4", "zlib"), ("zlib", "lz4"), ("bz2", "adoc"), ("adoc", "bz2")])
def test_mismatched_filters_break_the_stream(sender, receiver):
    """Corrupt input is a broken stream to the reader (the Stream contract), the decoder's
    RemoteProtocolError its cause."""
    out, exc = _decode(receiver, _wire_of(sender, SMALL))
    assert isinstance(exc, BrokenStreamError) and isinstance(exc.__cause__, RemoteProtocolError)
    assert out == b""


def test_a_failed_receive_stays_failed():
    a, b = memory_pair()
    a.send_all(b"not lz4 at all")
    stream = Lz4Stream(b)
    with pytest.raises(BrokenStreamError) as excinfo:
        stream.receive_some()
    assert isinstance(excinfo.value.__cause__, RemoteProtocolError)
    with pytest.raises(BrokenStreamError):
        stream.receive_some()
    stream.close()
    a.close()


DECODERS = {"lz4": Lz4Decoder, "zlib": ZlibDecoder, "bz2": Bz2Decoder, "adoc": AdocDecoder}


def _drain(decoder, data, piece):
    """Feed ``data`` in pieces, read everything; only protocol errors may escape."""
    out = bytearray()
    try:
        for i in range(0, len(data), piece):
            decoder.feed(data[i : i + piece])
            while True:
                chunk = decoder.read(4096)
                assert len(chunk) <= 4096
                if not chunk:
                    break
                out += chunk
        decoder.end()
    except ALLOWED:
        pass
    return bytes(out)


@pytest.mark.parametrize("kind", sorted(DECODERS))
@settings(max_examples=150, deadline=None)
@given(data=st.binary(max_size=2000), piece=st.integers(1, 300))
def test_fuzz_random_bytes(kind, data, piece):
    _drain(DECODERS[kind](), data, piece)


_VALID = {kind: _wire_of(kind, SMALL) for kind in ("lz4", "zlib", "bz2", "adoc")}


@pytest.mark.parametrize("kind", sorted(DECODERS))
@settings(max_examples=150, deadline=None)
@given(data=st.data(), piece=st.integers(1, 500))
def test_fuzz_mutated_streams(kind, data, piece):
    wire = bytearray(_VALID[kind])
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(wire) - 1))
        wire[pos] = data.draw(st.integers(0, 255))
    _drain(DECODERS[kind](), bytes(wire), piece)


# --- decompression bombs -------------------------------------------------------------------------

@pytest.mark.parametrize(
    "kind, encoder, bomb_mib",
    [("lz4", lambda: Lz4Encoder(0), 128), ("zlib", lambda: ZlibEncoder(9), 128), ("bz2", lambda: Bz2Encoder(9), 16)],
)
def test_decompression_bomb_is_bounded(kind, encoder, bomb_mib):
    enc = encoder()
    zeros = bytes(MiB)
    wire = b"".join(enc.compress(zeros) for _ in range(bomb_mib)) + enc.flush() + enc.finish()
    assert len(wire) < bomb_mib * MiB / 200
    a, b = memory_pair()
    a.send_all(wire)
    lower = CountingStream(b)
    stream = STREAMS[kind](lower)
    tracemalloc.start()
    try:
        for _ in range(64):
            chunk = stream.receive_some(64 * 1024)
            assert 0 < len(chunk) <= 64 * 1024 and chunk == bytes(len(chunk))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        stream.close()
        a.close()
    assert peak < 4 * MiB, f"{peak / MiB:.1f} MiB to inflate 4 MiB of a {bomb_mib} MiB bomb"
    if kind == "zlib":  # bz2 and lz4 bombs arrive in one read: they are that small
        assert lower.bytes_received < len(wire)


def _adoc_header(codec, payload_len, raw_len):
    return bytes([codec]) + payload_len.to_bytes(3, "big") + raw_len.to_bytes(3, "big")


@pytest.mark.parametrize(
    "wire, fragment",
    [
        (MAGIC + _adoc_header(2, 100, CHUNK_BYTES + 1), "limit"),  # rejected before any payload
        (MAGIC + _adoc_header(0, 10, 11), "payload"),
        (MAGIC + _adoc_header(2, 200, 100), "payload"),
        (MAGIC + _adoc_header(2, 0, 100), "payload"),
        (MAGIC + _adoc_header(7, 10, 10), "unknown codec"),
        (MAGIC + _adoc_header(255, 0, 1), "end marker"),
        (b"AdC\x02", "another version"),
        (b"GET / HTTP/1.1\r\n", "not an adoc stream"),
    ],
)
def test_adoc_rejects_bad_headers_at_once(wire, fragment):
    decoder = AdocDecoder()
    decoder.feed(wire)
    with pytest.raises(RemoteProtocolError, match=fragment):
        decoder.read(1000)


def test_adoc_chunk_inflating_beyond_its_size():
    payload = stdlib_zlib.compress(bytes(10 * MiB), 9)  # 10 KB announcing 100 KB
    decoder = AdocDecoder()
    decoder.feed(MAGIC + _adoc_header(2, len(payload), 100 * 1024) + payload)
    with pytest.raises(RemoteProtocolError, match="does not end where announced"):
        decoder.read(1000)


def test_codec_stream_is_the_driver():
    assert all(issubclass(cls, CodecStream) for cls in (Lz4Stream, ZlibStream, Bz2Stream, AdocStream))


# --- the conformance suite catches broken streams ---------------------------------------------------

class _Lossy(CountingStream):
    """Drops the 500th byte it sends."""

    def send_all(self, data):
        data = bytes(data)
        if self.bytes_sent <= 499 < self.bytes_sent + len(data):
            cut = 499 - self.bytes_sent
            data = data[:cut] + data[cut + 1 :]
        super().send_all(data)


class _NoEof(CountingStream):
    def send_eof(self):
        pass


def _wrapped_pair(cls):
    a, b = memory_pair()
    return cls(a), cls(b)


def test_check_stream_catches_lost_bytes():
    with pytest.raises(AssertionError, match="check_stream tiny_writes"):
        check_stream(lambda: _wrapped_pair(_Lossy), only=["tiny_writes"])


def test_check_stream_catches_hangs():
    with pytest.raises(AssertionError, match="check_stream half_close: timed out"):
        check_stream(lambda: _wrapped_pair(_NoEof), only=["half_close"], deadline_s=0.5)


def test_check_stream_rejects_unknown_checks():
    with pytest.raises(ValueError):
        check_stream(memory_pair, only=["nope"])
