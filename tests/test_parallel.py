"""The parallel filter: conformance, ordering under skew, flow control, bad input, cleanup, registry."""
from __future__ import annotations

import gc
import logging

import gevent
import gevent.event
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gridsock.components.parallel import (
    DATA_FRAME,
    DEFAULT_CHUNK_BYTES,
    END_FRAME,
    FRAME_HEADER,
    FRAME_VERSION,
    HEADER_BYTES,
    MAX_CHUNK_BYTES,
    MIN_CHUNK_BYTES,
    RECEIVE_BYTES,
    SEND_BATCH_BYTES,
    WINDOW_CHUNKS_PER_STREAM,
    ParallelFilter,
    ParallelStream,
    Reassembler,
    parse_header,
)
from gridsock.errors import BrokenStreamError, ConfigError, RemoteProtocolError
from gridsock.registry import default_registry
from gridsock.stack import Stack, StackContext
from gridsock.testing.streams import (
    CountingStream,
    ThrottledStream,
    check_stream,
    memory_pair,
    run_concurrently,
    sample_data,
    tcp_pair,
)

pytestmark = pytest.mark.timeout(120)

MiB = 1024 * 1024
LOWER_PAIRS = {"memory": memory_pair, "tcp": tcp_pair}
# Half the default sizes: eight stacks of up to 16 sockets each, and the point is the striping.
SIZES = dict(bulk_bytes=4 * MiB, large_write_bytes=8 * MiB)
# Every wait on the stream under test is bounded by this: a hang fails the test.
PROMPT_S = 10


def _parallel_pair(n, lower="memory", *, chunk=DEFAULT_CHUNK_BYTES, wrap_client=None, wrap_server=None):
    """(client, server) ParallelStreams over ``n`` fresh lower pairs, made by the filter."""
    pairs = [LOWER_PAIRS[lower]() for _ in range(n)]
    clients = [a for a, _ in pairs]
    servers = [b for _, b in pairs]
    if wrap_client:
        clients = wrap_client(clients)
    if wrap_server:
        servers = wrap_server(servers)
    component = ParallelFilter(streams=n, chunk=chunk)
    client = component.wrap_many(clients, context=StackContext(initiator=True))
    server = component.wrap_many(servers, context=StackContext(initiator=False))
    return client, server


def _receive_all(stream, max_bytes=256 * 1024):
    out = bytearray()
    while True:
        data = stream.receive_some(max_bytes)
        if not data:
            return bytes(out)
        out += data


def _live_greenlets():
    return {o for o in gc.get_objects() if isinstance(o, gevent.Greenlet) and not o.dead}


# --- conformance ---------------------------------------------------------------------------------

@pytest.mark.parametrize("lower", sorted(LOWER_PAIRS))
@pytest.mark.parametrize("n", [1, 2, 4, 8])
def test_conformance(n, lower):
    check_stream(lambda: _parallel_pair(n, lower), **SIZES)


@pytest.mark.parametrize("lower", sorted(LOWER_PAIRS))
def test_conformance_with_small_chunks(lower):
    """Many chunks per write, readers running into the window, senders batching small frames."""
    check_stream(lambda: _parallel_pair(3, lower, chunk=MIN_CHUNK_BYTES),
                 bulk_bytes=2 * MiB, large_write_bytes=4 * MiB, tiny_writes=3000)


# --- the wire format -----------------------------------------------------------------------------

def _data(seq, payload):
    return FRAME_HEADER.pack(FRAME_VERSION, DATA_FRAME, seq, len(payload)) + payload


def _end(count):
    return FRAME_HEADER.pack(FRAME_VERSION, END_FRAME, count, 0)


def _raw_peer(n, *, chunk=DEFAULT_CHUNK_BYTES):
    """n raw lower streams for the test to write frames to, and the ParallelStream that reads them."""
    pairs = [memory_pair() for _ in range(n)]
    return [a for a, _ in pairs], ParallelStream([b for _, b in pairs], chunk=chunk)


def _read_wire(raw):
    """Everything a raw lower received, to its EOF."""
    return _receive_all(raw)


def _frames(wire):
    frames = []
    while wire:
        kind, seq, length = parse_header(wire)
        frames.append((kind, seq, wire[HEADER_BYTES : HEADER_BYTES + length]))
        wire = wire[HEADER_BYTES + length :]
    return frames


def test_wire_format_of_a_sender():
    pairs = [memory_pair() for _ in range(2)]
    stream = ParallelStream([a for a, _ in pairs], chunk=MIN_CHUNK_BYTES)
    data = sample_data(3 * MIN_CHUNK_BYTES + 5, "random")
    with gevent.Timeout(PROMPT_S):
        stream.send_all(data)
        stream.send_eof()
        wires = [_read_wire(b) for _, b in pairs]  # every lower half-closed after its END
    stream.close()
    frames = [_frames(wire) for wire in wires]
    for per_lower in frames:
        assert per_lower[-1] == (END_FRAME, 4, b"")  # four chunks in all, on every lower
        seqs = [seq for kind, seq, _ in per_lower[:-1]]
        assert seqs == sorted(set(seqs))  # increasing on each lower
    chunks = {seq: payload for per_lower in frames for kind, seq, payload in per_lower if kind == DATA_FRAME}
    assert sorted(chunks) == [0, 1, 2, 3]
    assert [len(chunks[i]) for i in range(4)] == [MIN_CHUNK_BYTES] * 3 + [5]
    assert b"".join(chunks[i] for i in range(4)) == data


def test_wire_format_of_a_receiver():
    raw, stream = _raw_peer(2)
    raw[1].send_all(_data(1, b"world") + _end(3))
    raw[0].send_all(_data(0, b"hello ") + _data(2, b"!"))
    raw[0].send_all(_end(3))
    for r in raw:
        r.send_eof()
    with gevent.Timeout(PROMPT_S):
        assert _receive_all(stream, 4) == b"hello world!"
        assert stream.receive_some() == b""
    stream.close()


def test_parse_header():
    assert parse_header(_data(7, b"abc")) == (DATA_FRAME, 7, 3)
    assert parse_header(_end(2**64 - 1)) == (END_FRAME, 2**64 - 1, 0)
    for bad in (b"\x02" + _end(0)[1:], FRAME_HEADER.pack(1, 3, 0, 0), FRAME_HEADER.pack(1, DATA_FRAME, 0, 0),
                FRAME_HEADER.pack(1, DATA_FRAME, 0, MAX_CHUNK_BYTES + 1), FRAME_HEADER.pack(1, END_FRAME, 0, 1)):
        with pytest.raises(RemoteProtocolError):
            parse_header(bad)


def test_reassembler_by_hand():
    r = Reassembler(2, window_chunks=2)
    r.data_header(1, 1)
    r.check_reachable()  # lower 0 may still carry chunk 0
    assert r.fits(1) and not r.fits(2)
    r.store(1, [b"b"])
    assert not r.ready() and r.take() is None
    r.data_header(0, 0)
    r.store(0, [b"a"])
    assert r.take() == [b"a"] and r.take() == [b"b"] and r.next_seq == 2
    r.end(0, 2)
    r.end(1, 2)
    assert not r.at_eof()  # the lowers' own EOFs are still due
    r.lower_eof(0)
    r.lower_eof(1)
    assert r.at_eof()
    with pytest.raises(RemoteProtocolError, match="second END"):
        r.end(0, 2)
    with pytest.raises(RemoteProtocolError, match="after its END"):
        r.data_header(0, 2)


# --- ordering under skew -------------------------------------------------------------------------

class _SlowReceiver(CountingStream):
    """Receives at most 4 KiB per call and yields to the hub first, as a congested link would."""

    def receive_some(self, max_bytes=65536):
        gevent.sleep(0.001)
        return super().receive_some(min(max_bytes, 4096))


def test_a_slow_sending_lower_carries_less_and_order_holds():
    slow = {}

    def throttle_first(lowers):
        slow["lower"] = ThrottledStream(lowers[0], 2e6)
        return [slow["lower"]] + [CountingStream(lower) for lower in lowers[1:]]

    client, server = _parallel_pair(4, chunk=16 * 1024, wrap_client=throttle_first)
    data = sample_data(4 * MiB, "random")

    def send():
        client.send_all(data)
        client.send_eof()

    with client, server, gevent.Timeout(60):
        _, got = run_concurrently(send, lambda: _receive_all(server, 100_000))
    assert got == data
    shares = [lower.bytes_sent for lower in client.lowers]
    assert sum(shares) > len(data)
    assert shares[0] < sum(shares) / 4  # the others did not wait for it: they took more chunks


@pytest.mark.parametrize("lower", sorted(LOWER_PAIRS))
def test_a_slow_receiving_lower_keeps_order(lower):
    client, server = _parallel_pair(
        4, lower, chunk=MIN_CHUNK_BYTES,
        wrap_server=lambda lowers: [_SlowReceiver(lowers[0])] + lowers[1:],
    )
    up = sample_data(1 * MiB, "random", seed=1)
    down = sample_data(1 * MiB, "random", seed=2)

    def send(stream, data):
        stream.send_all(data)
        stream.send_eof()

    with client, server, gevent.Timeout(60):
        _, _, at_server, at_client = run_concurrently(
            lambda: send(client, up), lambda: send(server, down),
            lambda: _receive_all(server, 10_000), lambda: _receive_all(client, 10_000),
        )
    assert at_server == up and at_client == down


# --- flow control and memory ---------------------------------------------------------------------

class _GatedStream(CountingStream):
    """Its sends wait for ``gate``; ``offered`` counts the bytes it was asked to send."""

    def __init__(self, lower, gate):
        super().__init__(lower)
        self.gate = gate
        self.offered = 0

    def send_all(self, data):
        self.offered += len(data)
        self.gate.wait()
        super().send_all(data)


def test_send_all_blocks_while_the_lowers_are_stalled():
    gate = gevent.event.Event()
    client, server = _parallel_pair(
        2, chunk=MIN_CHUNK_BYTES, wrap_client=lambda lowers: [_GatedStream(x, gate) for x in lowers]
    )
    data = sample_data(64 * MIN_CHUNK_BYTES, "random")
    with client, server, gevent.Timeout(PROMPT_S):
        sender = gevent.spawn(client.send_all, data)
        gevent.idle()  # everything runs until it blocks
        assert not sender.ready()  # back-pressure: the queue is full, the lowers hold a batch each
        offered = sum(lower.offered for lower in client.lowers)
        assert 0 < offered <= 2 * SEND_BATCH_BYTES
        gate.set()
        sender.get()
        client.send_eof()
        assert _receive_all(server) == data


def test_the_receive_window_bounds_what_is_read_ahead():
    n, chunk = 4, MIN_CHUNK_BYTES
    client, server = _parallel_pair(n, chunk=chunk)
    data = sample_data(400 * chunk, "random")
    with client, server, gevent.Timeout(PROMPT_S):
        client.send_all(data)  # memory lowers never push back: all of it is sent
        client.send_eof()
        gevent.idle()  # the server's readers read until the window stops them
        read_ahead = sum(server.bytes_received)
        bound = (WINDOW_CHUNKS_PER_STREAM * n + n) * (chunk + HEADER_BYTES) + n * RECEIVE_BYTES
        assert 0 < read_ahead <= bound < len(data)
        assert _receive_all(server, 3000) == data


def test_send_eof_then_close_loses_nothing():
    client, server = _parallel_pair(4, "tcp")
    data = sample_data(8 * MiB, "random")
    with client, server, gevent.Timeout(PROMPT_S * 3):
        receiver = gevent.spawn(_receive_all, server)
        client.send_all(data)
        client.send_eof()  # returns once every lower has the data, its END and its half-close
        client.close()
        assert receiver.get() == data


def test_close_after_its_end_went_out_lets_the_peer_finish_reading():
    # A filter above (TLS: EOF on close_notify) may close before the peer's END frames came: the
    # peer, which has not read what was sent yet, must get all of it, not a reset. (Small enough
    # to sit in the kernel's buffers whole: the server's send_eof returns without the client
    # reading.)
    client, server = _parallel_pair(4, "tcp", chunk=64 * 1024)
    data = sample_data(256 * 1024, "random")
    with client, server, gevent.Timeout(PROMPT_S * 3):
        client.send_all(b"hello")
        got = b""
        while len(got) < 5:
            got += server.receive_some(5 - len(got))
        server.send_all(data)
        server.send_eof()
        server.close()  # before the client's END frames: it has not ended yet
        client.send_eof()  # its END frames reach the closed server's lowers now
        assert _receive_all(client) == data


# --- failures ------------------------------------------------------------------------------------

class _BreakingStream(CountingStream):
    """Sends fail once ``limit`` bytes have passed, as a link that went down."""

    def __init__(self, lower, limit):
        super().__init__(lower)
        self.limit = limit

    def send_all(self, data):
        if self.bytes_sent >= self.limit:
            raise BrokenStreamError("the link went down")
        super().send_all(data)


def test_a_failed_sender_breaks_both_directions_and_the_peer():
    client, server = _parallel_pair(
        3, wrap_client=lambda lowers: lowers[:2] + [_BreakingStream(lowers[2], 100_000)]
    )
    piece = sample_data(64 * 1024, "random")
    with client, server, gevent.Timeout(PROMPT_S):
        with pytest.raises(BrokenStreamError) as info:
            while True:
                client.send_all(piece)
        assert "the link went down" in str(info.value)
        with pytest.raises(BrokenStreamError):
            client.receive_some()
        with pytest.raises(BrokenStreamError):
            client.send_eof()
        with pytest.raises(BrokenStreamError):  # its lowers were closed: the peer knows at once
            while server.receive_some():
                pass


EOF = object()  # in a case: half-close that raw lower


def _hdr(kind, seq, length, version=FRAME_VERSION):
    return FRAME_HEADER.pack(version, kind, seq, length)


MALFORMED = {
    "garbage header": ([(0, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")], "unknown version"),
    "another version": ([(0, _hdr(DATA_FRAME, 0, 1, version=2) + b"x")], "unknown version"),
    "unknown type": ([(0, _hdr(9, 0, 0))], "unknown type"),
    "empty chunk": ([(0, _hdr(DATA_FRAME, 0, 0))], "of 0 bytes"),
    "oversized chunk": ([(0, _hdr(DATA_FRAME, 0, MAX_CHUNK_BYTES + 1))], f"of {MAX_CHUNK_BYTES + 1} bytes"),
    "end with payload": ([(0, _hdr(END_FRAME, 0, 3) + b"abc")], "END frame with a 3-byte payload"),
    "duplicate on two lowers": ([(0, _data(0, b"a")), (1, _data(0, b"b"))], "duplicate chunk 0"),
    "duplicate on one lower": ([(0, _data(1, b"a") + _data(1, b"b"))], "not increasing"),
    "decreasing on one lower": ([(1, _data(1, b"b") + _data(0, b"a"))], "chunk 0 after chunk 1"),
    "data after end": ([(0, _end(0) + _data(0, b"a"))], "data after its END"),
    "data after end, later": ([(0, _end(1)), (1, _data(0, b"a") + _end(1)), (0, b"late")], "data after its END"),
    "end counts disagree": ([(0, _end(1)), (1, _end(2))], "disagrees"),
    "end omits a chunk": ([(0, _data(3, b"d")), (1, _end(2))], "END count 2"),
    "hole in the sequence": ([(0, _data(1, b"b")), (1, _data(2, b"c"))], "chunk 0 can never arrive"),
    "hole before the end": ([(0, _data(1, b"b") + _end(2)), (1, _end(2)), (0, EOF), (1, EOF)],
                            "chunk 0 can never arrive"),
    "far beyond the window": ([(0, _data(10**12, b"z")), (1, _data(1, b"b"))], "chunk 0 can never arrive"),
    "premature eof": ([(0, _data(0, b"a")), (0, EOF), (1, _end(1)), (1, EOF)], "ended before its END"),
    "eof inside a chunk": ([(0, _hdr(DATA_FRAME, 0, 10) + b"abc"), (0, EOF)], "ended inside chunk 0"),
    "eof inside a header": ([(0, b"\x01\x01\x00"), (0, EOF)], "inside a frame header"),
}


def _play(raw, actions):
    """Send each (lower, bytes or EOF) on the raw lowers; stop when the stream under test
    already closed them (it broke: later actions cannot matter)."""
    try:
        for lower, data in actions:
            if data is EOF:
                raw[lower].send_eof()
            else:
                raw[lower].send_all(data)
    except BrokenStreamError:
        pass


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_input_breaks_the_stream_promptly(case, caplog):
    actions, fragment = MALFORMED[case]
    raw, stream = _raw_peer(2)
    with caplog.at_level(logging.INFO, logger="gridsock.components.parallel"), gevent.Timeout(PROMPT_S):
        _play(raw, actions)
        with pytest.raises(BrokenStreamError):
            while True:
                got = stream.receive_some()
                assert got, "a clean EOF from malformed input"
        with pytest.raises(BrokenStreamError):
            stream.send_all(b"x")
        for r in raw:  # the stream closed its lowers (an abort): the peer sees it at once
            with pytest.raises(BrokenStreamError):
                _receive_all(r)
    assert any(fragment in record.getMessage() for record in caplog.records), [r.getMessage() for r in caplog.records]
    stream.close()


def test_a_duplicate_of_a_chunk_already_read_breaks_the_stream(caplog):
    raw, stream = _raw_peer(2)
    with caplog.at_level(logging.INFO, logger="gridsock.components.parallel"), gevent.Timeout(PROMPT_S):
        raw[0].send_all(_data(0, b"a"))
        assert stream.receive_some() == b"a"
        raw[1].send_all(_data(0, b"a"))
        with pytest.raises(BrokenStreamError):
            stream.receive_some()
    assert any("duplicate chunk 0" in record.getMessage() for record in caplog.records)
    stream.close()


def _wire_of(chunks, n=2):
    """What n raw lowers receive from a ParallelStream sending ``chunks`` then EOF."""
    pairs = [memory_pair() for _ in range(n)]
    stream = ParallelStream([a for a, _ in pairs], chunk=MIN_CHUNK_BYTES)
    with gevent.Timeout(PROMPT_S):
        for piece in chunks:
            stream.send_all(piece)
        stream.send_eof()
        wires = [_read_wire(b) for _, b in pairs]
    stream.close()
    return wires


_VALID_WIRE = _wire_of([sample_data(MIN_CHUNK_BYTES + 100, "random"), b"abc", b"defg" * 300])


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_fuzz_mutated_wire_breaks_or_ends_never_hangs(data):
    wires = [bytearray(w) for w in _VALID_WIRE]
    for _ in range(data.draw(st.integers(1, 3))):
        wire = wires[data.draw(st.integers(0, len(wires) - 1))]
        pos = data.draw(st.integers(0, len(wire) - 1))
        wire[pos] = data.draw(st.integers(0, 255))
    raw, stream = _raw_peer(2, chunk=MIN_CHUNK_BYTES)
    try:
        with gevent.Timeout(PROMPT_S):
            _play(raw, [(i, bytes(wire)) for i, wire in enumerate(wires)] + [(0, EOF), (1, EOF)])
            try:
                _receive_all(stream, 1000)
            except BrokenStreamError:
                pass
    finally:
        stream.close()


# --- cleanup -------------------------------------------------------------------------------------

@pytest.mark.parametrize("lower", sorted(LOWER_PAIRS))
def test_close_leaves_no_greenlets_and_closes_the_lowers(lower):
    before = _live_greenlets()
    client, server = _parallel_pair(8, lower)
    ours = _live_greenlets() - before
    assert len(ours) == 2 * 2 * 8  # a sender and a reader per lower, on both sides
    with gevent.Timeout(PROMPT_S):
        client.send_all(sample_data(MiB, "random"))  # data still queued and in flight
        assert server.receive_some(1000)
    client.close()
    server.close()
    assert not any(g for g in ours if not g.dead)
    for stream in (client, server):
        for sub in stream.lowers:
            with pytest.raises(BrokenStreamError, match="closed"):
                sub.receive_some(10)


def test_a_broken_stream_leaves_no_greenlets():
    before = _live_greenlets()
    raw, stream = _raw_peer(4)
    ours = _live_greenlets() - before
    with gevent.Timeout(PROMPT_S):
        raw[2].send_all(b"\xff" * HEADER_BYTES)
        with pytest.raises(BrokenStreamError):
            stream.receive_some()
    stream.close()
    stream.close()  # idempotent
    assert len(ours) == 8 and not any(g for g in ours if not g.dead)


# --- info and the component ----------------------------------------------------------------------

def test_info():
    client, server = _parallel_pair(2, chunk=64 * 1024)
    with client, server, gevent.Timeout(PROMPT_S):
        assert client.info["stack"] == "parallel(chunk=65536,streams=2)/memory"
        assert client.info["streams"] == 2 and client.info["name"] == "client"  # the first lower's keys
        assert client.info["parallel"]["chunk"] == 64 * 1024
        assert [sub["name"] for sub in server.info["parallel"]["sub_streams"]] == ["server", "server"]
        client.send_all(bytes(200_000))
        client.send_eof()
        assert len(_receive_all(server)) == 200_000
        assert sum(client.info["parallel"]["bytes_sent"]) == 200_000 + 4 * HEADER_BYTES + 2 * HEADER_BYTES
        assert client.info["parallel"]["bytes_sent"] == server.info["parallel"]["bytes_received"]
        assert _parallel_pair(1)[0].info["stack"] == "parallel(streams=1)/memory"


def test_registry_entry():
    stack = Stack.parse("parallel(streams=8)/tcp")
    assert str(stack) == "parallel(streams=8)/tcp" and Stack.parse(str(stack)) == stack
    spaced = Stack.parse("tls / parallel( streams=2, chunk=65536 ) / tcp")
    assert str(spaced) == "tls/parallel(chunk=65536,streams=2)/tcp"
    component = default_registry.create(stack.filters[0])
    assert isinstance(component, ParallelFilter)
    assert component.streams == 8 and component.chunk == DEFAULT_CHUNK_BYTES and component.multi is True
    assert default_registry.create(Stack.parse("parallel/tcp").filters[0]).streams == 4
    assert default_registry.kind("parallel") == "filter"


@pytest.mark.parametrize(
    "text",
    ["parallel(streams=0)/tcp", "parallel(streams=65)/tcp", "parallel(chunk=4095)/tcp",
     f"parallel(chunk={MAX_CHUNK_BYTES + 1})/tcp", "parallel(streams=two)/tcp", "parallel(stream=2)/tcp"],
)
def test_registry_rejects_bad_parameters(text):
    with pytest.raises(ConfigError):
        Stack.parse(text)


def test_wrap_of_one_stream_is_refused():
    component = default_registry.create(Stack.parse("parallel(streams=2)/tcp").filters[0])
    a, b = memory_pair()
    with a, b:
        with pytest.raises(ConfigError, match="sub-connections"):
            component.wrap(a, context=StackContext(initiator=True))
        with pytest.raises(ConfigError, match="given 1 lower"):
            component.wrap_many([a], context=StackContext(initiator=True))
    with pytest.raises(ConfigError):
        ParallelFilter(streams=65)
    with pytest.raises(ConfigError):
        ParallelStream([])
