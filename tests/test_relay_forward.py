"""A relayed frame's way through a forwarder: received into a buffer of its own, its payload
passed on as that buffer (a read-only view, never copied), its header checked as before.

Loopback only (socket pairs in this process); every wait is bounded.
"""
from __future__ import annotations

import json
import logging
import random
import struct
import uuid

import gevent
import gevent.event
import pytest
from gevent import socket as gsocket

from gridsock import wire
from gridsock.bootstrap.link import Link
from gridsock.bootstrap.routing import RELAY_TOPIC, FloodGuard, as_bytes, forwarded, is_bulk
from gridsock.errors import RemoteProtocolError

WAIT_S = 20.0
SRC, DST = str(uuid.uuid4()), str(uuid.uuid4())
LARGE = wire.OWN_BUFFER_FRAME_BYTES


def relayed(payload: bytes, *, hops: int = 1, route=("src",)) -> wire.Routed:
    return wire.Routed(src=SRC, dst=DST, kind="msg", topic=RELAY_TOPIC, hops=hops, route=route, payload=payload)


def data(n: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


def drain(decoder: wire.Decoder) -> list:
    out = []
    while (message := decoder.next_message()) is not None:
        out.append(message)
    return out


def frame_with_header(header: bytes, payload: bytes, type_code: int = wire.Routed.TYPE) -> bytes:
    body = struct.pack("!I", len(header)) + header + payload
    return struct.pack("!IBB", len(body) + 2, wire.PROTOCOL_VERSION, type_code) + body


# --- the decoder -------------------------------------------------------------------------------


def test_a_large_frame_gives_a_read_only_view_of_its_own_buffer():
    payload = data(3 * LARGE)
    frame = wire.encode(relayed(payload))
    decoder = wire.Decoder()
    decoder.feed(frame[:100])
    assert decoder.next_message() is None
    # Its own buffer now: the rest of the frame is offered, exactly.
    room = decoder.recv_buffer(16)
    assert len(room) == len(frame) - 100 == decoder.missing()
    room[:] = frame[100:]
    room.release()
    decoder.received(len(frame) - 100)
    message = decoder.next_message()
    assert isinstance(message.payload, memoryview) and message.payload.readonly
    assert bytes(message.payload) == payload
    # Later input does not touch it (the shared buffer is another one).
    decoder.feed(wire.encode(relayed(bytes(len(payload)))) + wire.encode(wire.Pong(7)))
    assert [bytes(m.payload) for m in drain(decoder)[:1]] == [bytes(len(payload))]
    assert bytes(message.payload) == payload
    assert decoder.buffered == 0


def test_a_small_frame_is_still_copied_out_as_bytes():
    decoder = wire.Decoder()
    decoder.feed(wire.encode(relayed(b"x" * 1000)))
    (message,) = drain(decoder)
    assert type(message.payload) is bytes and message.payload == b"x" * 1000


@pytest.mark.parametrize("seed", range(6))
def test_large_and_small_frames_in_random_pieces_come_out_in_order(seed):
    rng = random.Random(seed)
    messages = []
    for i in range(12):
        size = rng.choice((0, 5, 1000, LARGE - 200, LARGE, 3 * LARGE + 17))
        messages.append(relayed(data(size, seed * 100 + i), route=("src", f"n{i}")))
        if rng.random() < 0.3:
            messages.append(wire.Pong(i))
    stream = b"".join(wire.encode(m) for m in messages)
    decoder, got, pos = wire.Decoder(), [], 0
    while pos < len(stream):
        if rng.random() < 0.3:  # feed() and recv_buffer() mixed, as the handshake and a link do
            n = min(rng.randint(1, 100_000), len(stream) - pos)
            decoder.feed(stream[pos : pos + n])
        else:
            room = decoder.recv_buffer(rng.choice((1, 7, decoder.missing(), 16384)))
            n = min(len(room), rng.randint(1, 100_000), len(stream) - pos)
            room[:n] = stream[pos : pos + n]
            room.release()
            decoder.received(n)
        pos += n
        got += drain(decoder)
    assert got == messages
    assert decoder.buffered == 0 and decoder.missing() == 6


def test_received_beyond_a_large_frame_is_refused():
    frame = wire.encode(relayed(data(2 * LARGE)))
    decoder = wire.Decoder()
    decoder.feed(frame[:6])
    assert decoder.next_message() is None
    room = decoder.recv_buffer()
    assert len(room) == len(frame) - 6
    room.release()
    with pytest.raises(ValueError):
        decoder.received(len(frame) - 5)


@pytest.mark.parametrize("header, reason", [
    (b"{not json", "header is not JSON"),
    (json.dumps({"src": "not-an-id", "dst": DST, "kind": "msg", "topic": "relay"}).encode(), "src"),
    (json.dumps({"src": SRC, "dst": DST, "kind": "msg", "topic": "relay", "hops": wire.MAX_HOPS + 1}).encode(),
     "hops"),
    (json.dumps({"src": SRC, "dst": DST, "kind": "msg", "topic": "relay", "route": ["a b"]}).encode(), "route"),
])
def test_a_large_frame_with_a_bad_header_is_refused(header, reason):
    decoder = wire.Decoder(peer="p")
    frame = frame_with_header(header, data(2 * LARGE))
    decoder.feed(frame[:-1])
    assert decoder.next_message() is None
    decoder.feed(frame[-1:])
    with pytest.raises(RemoteProtocolError, match=reason):
        decoder.next_message()
    with pytest.raises(RemoteProtocolError):  # and for good
        decoder.next_message()


def test_a_large_frame_whose_header_length_runs_past_it_is_refused():
    body = struct.pack("!I", 3 * LARGE) + b"{}" + data(2 * LARGE)
    frame = struct.pack("!IBB", len(body) + 2, wire.PROTOCOL_VERSION, wire.Routed.TYPE) + body
    decoder = wire.Decoder()
    decoder.feed(frame)
    with pytest.raises(RemoteProtocolError, match="runs past the frame"):
        decoder.next_message()


def test_a_large_frame_of_a_bad_version_is_refused_before_its_body():
    decoder = wire.Decoder()
    decoder.feed(struct.pack("!IBB", 4 * LARGE, 9, wire.Routed.TYPE))
    with pytest.raises(RemoteProtocolError, match="version"):
        decoder.next_message()


# --- forwarding ----------------------------------------------------------------------------------


def test_forwarded_counts_the_hop_and_keeps_the_payload_object():
    message = relayed(memoryview(data(LARGE)).toreadonly(), hops=2, route=("src", "la"))
    out = forwarded(message, "rv")
    assert (out.hops, out.route, out.src, out.dst, out.kind, out.topic) == (3, ("src", "la", "rv"), SRC, DST, "msg",
                                                                            RELAY_TOPIC)
    assert out.payload is message.payload
    assert forwarded(relayed(b"", hops=wire.MAX_HOPS), "rv") is None
    # The frame is what encoding the message with a bytes payload gives, byte for byte.
    head, payload = wire.encode_parts(out, checked=False)
    assert head + bytes(payload) == wire.encode(relayed(bytes(message.payload), hops=3, route=("src", "la", "rv")))


def test_as_bytes_gives_handlers_bytes():
    decoder = wire.Decoder()
    frame = wire.encode(wire.Routed(src=SRC, dst=DST, kind="req", topic="t", request_id=5, hops=1,
                                    route=("src",), payload=b"q" * (2 * LARGE)))
    decoder.feed(frame[:10])  # (a frame whole in one feed is decoded where it is, copied)
    assert decoder.next_message() is None
    decoder.feed(frame[10:])
    (message,) = drain(decoder)
    assert type(message.payload) is memoryview
    plain = as_bytes(message)
    assert type(plain.payload) is bytes and plain == message and plain.payload.decode() == "q" * (2 * LARGE)
    assert as_bytes(plain) is plain


class _Hop:
    """src --(link a)--> forwarder --(link b)--> dst, all in this process over socket pairs."""

    def __init__(self) -> None:
        self.src_sock, a_sock = gsocket.socketpair()
        b_sock, self.dst_sock = gsocket.socketpair()
        self.seen: list = []  # (payload type, payload object is the one forwarded)
        self.arrived: list = []
        self.closed: list = []
        self.done = gevent.event.Event()
        self.expected = 0
        self.guard = FloodGuard("fw")
        self.b = Link(b_sock, wire.Decoder(peer="b"), label="fw:b", on_message=lambda link, m: None).start()
        self.a = Link(a_sock, wire.Decoder(peer="a"), label="fw:a", on_message=self._forward,
                      on_close=lambda link: self.closed.append(link.close_reason)).start()
        self.dst = Link(self.dst_sock, wire.Decoder(peer="dst"), label="dst", on_message=self._arrive).start()
        self.src = Link(self.src_sock, wire.Decoder(peer="src"), label="src", on_message=lambda link, m: None).start()

    def _forward(self, link, message) -> None:
        out = forwarded(message, "fw")
        self.seen.append((type(message.payload), out.payload is message.payload))
        assert self.guard.forward(self.b, out)

    def _arrive(self, link, message) -> None:
        self.arrived.append(message)
        if len(self.arrived) >= self.expected:
            self.done.set()

    def close(self) -> None:
        for link in (self.src, self.a, self.b, self.dst):
            link.close()
        for link in (self.src, self.a, self.b, self.dst):
            link.join(WAIT_S)


def test_relayed_frames_forwarded_arrive_byte_exact():
    hop = _Hop()
    try:
        sizes = [LARGE, 256 * 1024, 17, 3 * LARGE + 5, 0, 256 * 1024]
        sent = [relayed(data(n, i)) for i, n in enumerate(sizes)]
        hop.expected = len(sent)
        for message in sent:
            assert hop.src.send(message, bulk=is_bulk(message))
        assert hop.done.wait(WAIT_S), f"{len(hop.arrived)} of {len(sent)} arrived"
        for message, got in zip(sent, hop.arrived):
            assert bytes(got.payload) == message.payload
            assert (got.hops, got.route) == (message.hops + 1, message.route + ("fw",))
        # At the forwarder, large payloads were views of their frames, passed on as they were.
        assert [kind for kind, _ in hop.seen] == [memoryview if n + 200 >= LARGE else bytes for n in sizes]
        assert all(same for _, same in hop.seen)
    finally:
        hop.close()


def test_a_large_frame_with_a_bad_header_drops_its_link_only(caplog):
    hop = _Hop()
    other_ours, other_theirs = gsocket.socketpair()
    other_got = gevent.event.Event()
    other = Link(other_ours, wire.Decoder(peer="other"), label="other",
                 on_message=lambda link, m: other_got.set()).start()
    other_peer = Link(other_theirs, wire.Decoder(peer="other-peer"), label="other-peer",
                      on_message=lambda link, m: None).start()
    try:
        with caplog.at_level(logging.WARNING, logger="gridsock.bootstrap.link"):
            bad = json.dumps({"src": "not-an-id", "dst": DST, "kind": "msg", "topic": "relay", "hops": 1}).encode()
            hop.src_sock.sendall(frame_with_header(bad, data(2 * LARGE)))
            with gevent.Timeout(WAIT_S):
                while not hop.a.closed:
                    gevent.sleep(0.01)
        assert "protocol error" in hop.a.close_reason and "src" in hop.a.close_reason
        assert any("protocol error" in r.getMessage() and "fw:a" in r.getMessage() for r in caplog.records)
        assert hop.closed == [hop.a.close_reason] and hop.seen == []
        # Nobody else is affected: the link ahead and another link of this process still work.
        assert not hop.b.closed and not hop.dst.closed
        assert other_peer.send(relayed(data(2 * LARGE)), bulk=True)
        assert other_got.wait(WAIT_S)
        assert not other.closed
    finally:
        other.close()
        other_peer.close()
        other.join(WAIT_S)
        other_peer.join(WAIT_S)
        hop.close()


# --- the routed header's checks, remembered ------------------------------------------------------


def decode_header(header: dict):
    decoder = wire.Decoder(peer="p")
    decoder.feed(frame_with_header(json.dumps(header).encode(), b"x"))
    return decoder.next_message()


GOOD = {"src": SRC, "dst": DST, "kind": "msg", "topic": "relay", "request_id": 3, "hops": 2, "route": ["a", "b"]}


@pytest.mark.parametrize("change, reason", [
    ({"hops": wire.MAX_HOPS + 1}, "hops"),
    ({"hops": True}, "hops"),
    ({"request_id": -1}, "request_id"),
    ({"request_id": 2**32}, "request_id"),
    ({"request_id": 1.0}, "request_id"),
    ({"route": "ab"}, "route"),
    ({"route": ["a", "b c"]}, "route"),
    ({"src": "not-an-id"}, "src"),
    ({"kind": "nope"}, "kind"),
])
def test_a_header_like_one_checked_before_is_still_checked(change, reason):
    for _ in range(2):  # (the second time, the strings of GOOD are known)
        message = decode_header(GOOD)
        assert (message.src, message.dst, message.kind, message.topic, message.request_id, message.hops,
                message.route, message.payload) == (SRC, DST, "msg", "relay", 3, 2, ("a", "b"), b"x")
    for _ in range(2):
        with pytest.raises(RemoteProtocolError, match=reason):
            decode_header(dict(GOOD, **change))


def test_a_header_without_its_defaults_is_checked_and_completed():
    header = {k: v for k, v in GOOD.items() if k not in ("request_id", "hops", "route")}
    for _ in range(2):
        message = decode_header(header)
        assert (message.request_id, message.hops, message.route) == (0, 0, ())
