"""The relay's fast path: the decoder's receive buffer, frames written without copies, large
relay frames, a window that grows with the path, and the checks that still drop bad input."""
from __future__ import annotations

import hashlib
import logging
import random
import struct
import uuid

import gevent
import gevent.event
import gevent.queue
import pytest

from gridsock import wire
from gridsock.bootstrap.link import DIRECT_WRITE_BYTES, Link
from gridsock.components.relay import (RELAY_CHUNK_BYTES, RELAY_MAX_WINDOW_BYTES, RELAY_WINDOW_BYTES,
                                       RelayManager)
from gridsock.errors import BrokenStreamError, RemoteProtocolError

SRC = str(uuid.uuid4())
DST = str(uuid.uuid4())


def routed(payload: bytes, topic: str = "relay") -> wire.Routed:
    return wire.Routed(src=SRC, dst=DST, kind="msg", topic=topic, hops=1, route=("a",), payload=payload)


def some_messages() -> list:
    rng = random.Random(7)
    return [
        wire.Ping(1),
        routed(rng.randbytes(3 * RELAY_CHUNK_BYTES // 2)),
        wire.Pong(2),
        routed(b""),
        routed(rng.randbytes(100)),
        routed(rng.randbytes(RELAY_CHUNK_BYTES + 9)),
        wire.Ping(3),
    ]


# --- the decoder's receive buffer ------------------------------------------------------------


def drain(decoder: wire.Decoder) -> list:
    out = []
    while (message := decoder.next_message()) is not None:
        out.append(message)
    return out


@pytest.mark.parametrize("seed", range(5))
def test_recv_buffer_in_random_pieces_gives_what_feed_gives(seed):
    messages = some_messages()
    data = b"".join(wire.encode(m) for m in messages)
    rng = random.Random(seed)
    decoder, got, pos = wire.Decoder(), [], 0
    while pos < len(data):
        room = decoder.recv_buffer(rng.choice((1, 7, 16384)))
        n = min(len(room), rng.randint(1, 40000), len(data) - pos)
        room[:n] = data[pos : pos + n]
        room.release()
        decoder.received(n)
        pos += n
        got += drain(decoder)
    assert got == messages
    assert decoder.buffered == 0


def test_missing_asks_for_the_first_six_bytes_then_the_rest_of_the_frame():
    frame = wire.encode(routed(bytes(100_000)))
    decoder = wire.Decoder()
    assert decoder.missing() == 6
    decoder.feed(frame[:2])
    assert decoder.missing() == 4
    decoder.feed(frame[2:6])
    assert decoder.next_message() is None
    assert decoder.missing() == len(frame) - 6
    room = decoder.recv_buffer(decoder.missing())
    assert len(room) >= len(frame) - 6  # room for the whole frame: it is received in place
    room.release()
    decoder.feed(frame[6:-1])
    assert decoder.missing() == 1
    decoder.feed(frame[-1:])
    assert drain(decoder) == [routed(bytes(100_000))]


def test_a_bad_version_is_refused_after_six_bytes_whatever_the_length():
    decoder = wire.Decoder()
    decoder.feed(struct.pack("!IBB", 1_000_000, 9, 9))  # a driver decodes before receiving the rest
    with pytest.raises(RemoteProtocolError, match="version"):
        decoder.next_message()


def test_received_beyond_the_buffer_is_refused():
    decoder = wire.Decoder()
    room = decoder.recv_buffer(10)
    with pytest.raises(ValueError):
        decoder.received(len(room) + 1)


def test_the_payload_is_copied_out_of_the_buffer():
    # The decoder reuses its buffer: a payload handed out must not change with later input.
    first, second = routed(b"A" * 70000), routed(b"B" * 70000)
    decoder = wire.Decoder()
    decoder.feed(wire.encode(first))
    got = decoder.next_message()
    decoder.feed(wire.encode(second))
    assert drain(decoder) == [second]
    assert got == first and isinstance(got.payload, bytes)


# --- encoding and writing without copies -----------------------------------------------------


def test_encode_parts_is_encode_and_keeps_the_payload_object():
    message = routed(bytes(range(256)) * 4096)
    head, payload = wire.encode_parts(message)
    assert payload is message.payload
    assert head + payload == wire.encode(message)
    assert wire.encode_parts(wire.Ping(5)) == (wire.encode(wire.Ping(5)), b"")


class RecordingSocket:
    """A socket that keeps what is written and receives nothing (until closed)."""

    family = None

    def __init__(self) -> None:
        self.writes: list = []
        self.closed = gevent.event.Event()

    def sendall(self, data) -> None:
        self.writes.append(data)

    def recv_into(self, buffer, nbytes=None) -> int:
        self.closed.wait()
        return 0

    def close(self) -> None:
        self.closed.set()


def test_a_link_writes_control_first_and_a_large_payload_as_it_is():
    sock = RecordingSocket()
    link = Link(sock, wire.Decoder(), label="test", on_message=lambda link, message: None)
    big = routed(bytes(2 * DIRECT_WRITE_BYTES))
    small = routed(b"x" * 10)
    assert link.send(big, bulk=True)
    assert link.send(small, bulk=True)
    assert link.send(wire.Ping(9))  # queued after the bulk frames, written before them
    link.start()
    try:
        with gevent.Timeout(10):
            while sum(len(w) for w in sock.writes) < len(wire.encode(big)) + len(wire.encode(small)) + 21:
                gevent.sleep(0.001)
        assert b"".join(bytes(w) for w in sock.writes) == wire.encode(wire.Ping(9)) + wire.encode(big) + wire.encode(small)
        assert any(w is big.payload for w in sock.writes), "the large payload was copied on its way out"
    finally:
        link.close()


# --- relay frames and the window -------------------------------------------------------------


class DelayedWorld:
    """Two RelayManagers ("A", "B") joined by FIFO paths that each take ``delay_s`` one way."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.delay_s = delay_s
        self.sent: dict = {"A": [], "B": []}
        self.managers = {"A": RelayManager(self._sender("A")), "B": RelayManager(self._sender("B"))}
        self._paths = {src: gevent.queue.Queue() for src in ("A", "B")}
        self._pumps = [gevent.spawn(self._pump, src) for src in ("A", "B")]
        self.a = self.managers["A"].open("B", 1)
        self.b = self.managers["B"].open("A", 1)

    def _sender(self, src):
        def send(dst, payload):
            self.sent[src].append(len(payload))
            if self.delay_s:
                self._paths[src].put((gevent.get_hub().loop.now() + self.delay_s, dst, payload))
            else:
                self.managers[dst].on_message(src, payload)
        return send

    def _pump(self, src) -> None:
        while True:
            due, dst, payload = self._paths[src].get()
            wait = due - gevent.get_hub().loop.now()
            if wait > 0:
                gevent.sleep(wait)
            self.managers[dst].on_message(src, payload)

    def stop(self) -> None:
        gevent.killall(self._pumps)


def transfer(world: DelayedWorld, data: bytes) -> bytes:
    received = []

    def read():
        while chunk := world.b.receive_some(1 << 20):
            received.append(chunk)

    reader = gevent.spawn(read)
    world.a.send_all(data)
    world.a.send_eof()
    reader.get(timeout=120)
    return b"".join(received)


def test_relay_frames_are_large():
    world = DelayedWorld()
    try:
        data = random.Random(1).randbytes(3 * RELAY_CHUNK_BYTES)
        assert transfer(world, data) == data
        data_frames = [n for n in world.sent["A"] if n > 9]
        assert max(data_frames) == 9 + RELAY_CHUNK_BYTES  # the 9-byte header, then a whole chunk
        assert len(data_frames) == 3
    finally:
        world.stop()


def test_the_window_grows_on_a_long_path_and_stays_bounded():
    # 50 ms each way and a reader that keeps up: one window per round trip is the limit, so the
    # receiver enlarges it (never past the maximum); the stream stays whole.
    world = DelayedWorld(delay_s=0.05)
    try:
        data = random.Random(2).randbytes(8 * RELAY_MAX_WINDOW_BYTES // 4)
        got = transfer(world, data)
        assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()
        assert RELAY_WINDOW_BYTES < world.b.window <= RELAY_MAX_WINDOW_BYTES
        assert world.b.rtt_s is not None and world.b.rtt_s > 0
    finally:
        world.stop()


def test_a_reader_that_does_not_read_keeps_the_first_window():
    world = DelayedWorld()
    try:
        sender = gevent.spawn(world.a.send_all, bytes(2 * RELAY_WINDOW_BYTES))
        with gevent.Timeout(10):
            while world.a.bytes_sent < RELAY_WINDOW_BYTES:
                gevent.sleep(0.001)
        for _ in range(10):
            gevent.sleep(0)  # every chance to send more
        assert not sender.ready()
        assert world.a.bytes_sent == RELAY_WINDOW_BYTES  # one window, then it waits for credit
        assert world.b.window == RELAY_WINDOW_BYTES
        sender.kill()
    finally:
        world.stop()


def test_data_beyond_the_window_resets_with_a_logged_reason(caplog):
    world = DelayedWorld()
    try:
        chunk = bytes(RELAY_CHUNK_BYTES)
        header = struct.Struct("!IBI")
        offset = 0
        with caplog.at_level(logging.WARNING, logger="gridsock.components.relay"):
            for _ in range(RELAY_WINDOW_BYTES // RELAY_CHUNK_BYTES + 1):  # one chunk past the window, no credit asked
                world.managers["B"].on_message("A", header.pack(1, 1, offset) + chunk)
                offset += len(chunk)
        assert "beyond its window" in caplog.text
        with pytest.raises(BrokenStreamError):
            while world.b.receive_some():
                pass
    finally:
        world.stop()


def test_an_oversized_relay_frame_resets_with_a_logged_reason(caplog):
    world = DelayedWorld()
    try:
        with caplog.at_level(logging.WARNING, logger="gridsock.components.relay"):
            world.managers["B"].on_message("A", struct.pack("!IBI", 1, 1, 0) + bytes(RELAY_CHUNK_BYTES + 1))
        assert "malformed frame" in caplog.text
        with pytest.raises(BrokenStreamError):
            world.b.receive_some()
    finally:
        world.stop()


def test_credit_beyond_the_largest_window_resets():
    world = DelayedWorld()
    try:
        world.managers["A"].on_message("B", struct.pack("!IBI", 1, 3, RELAY_MAX_WINDOW_BYTES))
        with pytest.raises(BrokenStreamError):
            world.a.send_all(b"x")
    finally:
        world.stop()


# --- the format is offered -------------------------------------------------------------------


def test_the_responder_refuses_another_relay_format():
    from types import SimpleNamespace

    from gridsock.components.relay import RELAY_FORMAT, RelayMethod

    delivered = []
    manager = RelayManager(lambda dst, payload: None)
    ctx = SimpleNamespace(node=SimpleNamespace(relay=manager), client=SimpleNamespace(node_id=SRC),
                          deliver=delivered.append, offer={"conn": 5})  # format 1 said nothing
    with pytest.raises(RemoteProtocolError, match="relay format 1"):
        RelayMethod().respond(ctx)  # type: ignore[arg-type]
    assert len(manager) == 0
    ctx.offer = {"conn": 5, "format": RELAY_FORMAT}
    assert RelayMethod().respond(ctx) == {}  # type: ignore[arg-type]
    assert len(manager) == 1
    gevent.sleep(0)
    assert len(delivered) == 1
