"""Tests of gridsock.wire, the sans-IO codec of the bootstrap protocol (h11-style).

Every message is fed whole, byte by byte and with the next frame's first bytes behind it; one
frame is pinned byte for byte; every limit and field rule is broken once on the decoding side
(-> RemoteProtocolError, nothing else) and once on the encoding side (-> LocalProtocolError);
Hypothesis feeds random bytes, mutated frames and random valid messages.
"""
from __future__ import annotations

import json
import string
import struct
import typing

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gridsock import wire
from gridsock.errors import LocalProtocolError, ProtocolError, RemoteProtocolError

pytestmark = pytest.mark.timeout(120)

# Random but bounded: the whole file runs in seconds, and nothing is written to the repository.
FUZZ = settings(max_examples=300, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

MESSAGE_TYPES = typing.get_args(wire.Message)

ID_A = "0b5f5c1e-3f51-4f3a-9a55-2d7c7b6b9f01"
ID_B = "7c9e6679-7425-40de-944b-e07fc1f90ae7"
ID_C = "f47ac10b-58cc-4372-a567-0e02b2c3d479"

LEADER = wire.NodeEntry(node_id=ID_A, name="lead-1", cluster="c1", leader=ID_A, role="leader",
                        addrs=("192.0.2.1:7000", "[2001:db8::1]:7000", "lead-1.example.org:65535"),
                        observed="198.51.100.7:40000", inbound=True)
MEMBER = wire.NodeEntry(node_id=ID_B, name="m1.c1", cluster="c1", leader=ID_A, role="member")
LONER = wire.NodeEntry(node_id=ID_C, name="solo_2", cluster=None, leader=ID_C, inbound=False)

# One or more of each message type; the keys name them in the field-rule tables below.
BASE = {
    "enroll": wire.Enroll(token="k" * 43, csr_pem="-----BEGIN CERTIFICATE REQUEST-----\nMIIB\n", name="m1.c1"),
    "enrolled": wire.Enrolled(node_id=ID_B, cert_pem="-----BEGIN CERTIFICATE-----\nMIIB\n"),
    "hello": wire.Hello(name="lead-1", cluster="c1", role="leader", addrs=("192.0.2.1:7000",),
                        software="gridsock 0.1.0"),
    "hello-plain": wire.Hello(name="m1", cluster=None, role="member", node_id=ID_B, token="s\u00e9same"),
    "hello-probe": wire.Hello(name="rendezvous", cluster=None, role="probe"),
    "welcome": wire.Welcome(entry=LEADER, session_id=ID_C),
    "refuse": wire.Refuse(code="bad-token", reason="join token refused \u2717"),
    "register": wire.Register(entries=(MEMBER,)),
    "register-empty": wire.Register(entries=()),
    "unregister": wire.Unregister(node_ids=(ID_B, ID_C)),
    "update": wire.DirectoryUpdate(joined=(LEADER, MEMBER, LONER), left=(ID_C,), snapshot=True, more=True),
    "update-empty": wire.DirectoryUpdate(),
    "routed": wire.Routed(src=ID_B, dst="m2.c2", kind="req", topic="ping", request_id=2**32 - 1, hops=4,
                          route=("m1.c1", "lead-1", "rendezvous", "lead-2"), payload=bytes(range(256))),
    "routed-msg": wire.Routed(src=ID_A, dst=ID_B, kind="msg", topic="t"),
    "routed-rep": wire.Routed(src=ID_A, dst=ID_B, kind="rep", topic="x.y", request_id=9, hops=1,
                              route=("lead-1",), payload=b"{}"),
    "routed-err": wire.Routed(src=ID_A, dst=ID_B, kind="err", topic="enroll", request_id=1, hops=2,
                              route=("rendezvous", "lead-1"), payload="bad join token".encode()),
    "ping": wire.Ping(0),
    "ping-max": wire.Ping(2**32 - 1),
    "pong": wire.Pong(7),
    "control": wire.Control(op="status"),
    "control-args": wire.Control(op="ping", args={"dst": "m1", "timeout": 2.5, "deep": [[{"k": None}]]}),
    "reply": wire.ControlReply(ok=True, result={"links": [{"peer": "a", "since": 1.5}], "joined": True}),
    "reply-list": wire.ControlReply(ok=True, result=[1, "two", None, False, -0.5]),
    "reply-error": wire.ControlReply(ok=False, error="unknown control operation 'x'"),
    "assembly-request": wire.AssemblyRequest(port=65535, stack="tls/parallel(streams=4)/tcp", token="0f" * 32,
                                             offer={"endpoint": "203.0.113.2:40000"}),
    "assembly-request-min": wire.AssemblyRequest(port=1, stack="relay", token="00" * 32),
    "assembly-accept": wire.AssemblyAccept(answer={"endpoint": "198.51.100.11:5"}),
    "assembly-accept-empty": wire.AssemblyAccept(),
    "assembly-refuse": wire.AssemblyRefuse(code="policy", reason="b1 requires tls from nodes outside its cluster"),
}
SAMPLES = list(BASE.values())
SAMPLE_IDS = list(BASE)

# Header fields that must be present (possibly as null); every other field has a default.
REQUIRED = {
    wire.Enroll: {"token", "csr_pem", "name"},
    wire.Enrolled: {"node_id", "cert_pem"},
    wire.Hello: {"name", "cluster", "role"},
    wire.Welcome: {"entry", "session_id"},
    wire.Refuse: {"code", "reason"},
    wire.Register: {"entries"},
    wire.Unregister: {"node_ids"},
    wire.DirectoryUpdate: set(),
    wire.Routed: {"src", "dst", "kind", "topic"},
    wire.Ping: {"nonce"},
    wire.Pong: {"nonce"},
    wire.Control: {"op"},
    wire.ControlReply: {"ok"},
    wire.AssemblyRequest: {"port", "stack", "token"},
    wire.AssemblyAccept: set(),
    wire.AssemblyRefuse: {"code", "reason"},
}
ENTRY_REQUIRED = {"node_id", "name", "cluster", "leader"}

# The type codes are the wire format: they never change.
TYPE_CODES = {
    wire.Enroll: 1, wire.Enrolled: 2, wire.Hello: 3, wire.Welcome: 4, wire.Refuse: 5, wire.Register: 6,
    wire.Unregister: 7, wire.DirectoryUpdate: 8, wire.Routed: 9, wire.Ping: 10, wire.Pong: 11,
    wire.Control: 12, wire.ControlReply: 13, wire.AssemblyRequest: 14, wire.AssemblyAccept: 15,
    wire.AssemblyRefuse: 16,
}


# --- helpers ---------------------------------------------------------------------------------


def frame(type_code: int, header, payload: bytes = b"", *, version: int = wire.PROTOCOL_VERSION,
          header_len: int | None = None, length: int | None = None) -> bytes:
    """A hand-made frame; ``header`` is bytes or a JSON value; lengths may be forced."""
    if not isinstance(header, (bytes, bytearray)):
        header = json.dumps(header).encode()
    body = struct.pack("!BBI", version, type_code, len(header) if header_len is None else header_len)
    body += header + payload
    return struct.pack("!I", len(body) if length is None else length) + body


def split(data: bytes):
    """``(length, version, type, header as JSON, payload)`` of one well-formed frame."""
    length, version, type_code, header_len = struct.unpack_from("!IBBI", data)
    header = json.loads(data[10 : 10 + header_len])
    return length, version, type_code, header, data[10 + header_len :]


def header_of(message) -> dict:
    return split(wire.encode(message))[3]


def decode_one(data: bytes, **kwargs):
    """The single message in ``data``; fails if anything is left over."""
    decoder = wire.Decoder(**kwargs)
    decoder.feed(data)
    message = decoder.next_message()
    assert message is not None
    assert decoder.next_message() is None
    assert decoder.buffered == 0
    return message


def rejected(data: bytes, **kwargs) -> RemoteProtocolError:
    """Feed ``data`` whole; the decoder must raise RemoteProtocolError (and only that)."""
    decoder = wire.Decoder(**kwargs)
    decoder.feed(data)
    with pytest.raises(RemoteProtocolError) as info:
        while decoder.next_message() is not None:
            pass
    return info.value


_DELETE = object()


def edited(message, path, value=_DELETE) -> bytes:
    """The frame of ``message`` with the header value at ``path`` replaced (or deleted)."""
    _, _, type_code, header, payload = split(wire.encode(message))
    target = header
    for key in path[:-1]:
        target = target[key]
    if value is _DELETE:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return frame(type_code, json.dumps(header, allow_nan=True).encode(), payload)


def chunked(data: bytes, sizes):
    """Split ``data`` into pieces of the given sizes (cycled)."""
    sizes = list(sizes) or [len(data) or 1]
    pos, i = 0, 0
    while pos < len(data):
        yield data[pos : pos + sizes[i % len(sizes)]]
        pos += sizes[i % len(sizes)]
        i += 1


def drain(decoder: wire.Decoder):
    """``(messages, failed)``: every message available, and whether the decoder raised."""
    out = []
    while True:
        try:
            message = decoder.next_message()
        except RemoteProtocolError:
            return out, True
        if message is None:
            return out, False
        out.append(message)


def feed_chunks(data: bytes, sizes):
    """Feed ``data`` in pieces, draining after each; returns ``(messages, failed)``.

    Checks the codec's invariants on the way: only messages or RemoteProtocolError come out (any
    other exception propagates and fails the test), a broken decoder stays broken, and every
    message the decoder accepts can be encoded again and decodes to an equal message.
    """
    decoder = wire.Decoder()
    out, failed = [], False
    for piece in chunked(data, sizes):
        decoder.feed(piece)
        messages, failed = drain(decoder)
        out += messages
        if failed:
            for _ in range(2):
                with pytest.raises(RemoteProtocolError):
                    decoder.next_message()
            decoder.feed(wire.encode(wire.Ping(1)))
            with pytest.raises(RemoteProtocolError):
                decoder.next_message()
            break
    for message in out:
        assert isinstance(message, MESSAGE_TYPES)
        assert decode_one(wire.encode(message)) == message
    return out, failed


class NotAPing(wire.Ping):
    """A subclass is not a wire message: its type code would lie."""


# --- the frame format ------------------------------------------------------------------------


def test_type_codes_are_fixed():
    assert set(MESSAGE_TYPES) == set(TYPE_CODES)
    for cls, code in TYPE_CODES.items():
        assert cls.TYPE == code
        sample = next(m for m in SAMPLES if type(m) is cls)
        assert wire.encode(sample)[5] == code


def test_every_type_has_samples():
    assert {type(m) for m in SAMPLES} == set(MESSAGE_TYPES)


def test_golden_ping():
    data = wire.encode(wire.Ping(nonce=258))
    assert data == (
        b"\x00\x00\x00\x13"  # length: 19 bytes follow
        b"\x01"  # version 1
        b"\x0a"  # type 10: Ping
        b"\x00\x00\x00\x0d"  # header_len: 13
        b'{"nonce":258}'  # header: compact JSON, no payload
    )
    assert decode_one(data) == wire.Ping(258)


def test_golden_routed():
    message = wire.Routed(src=ID_A, dst="m2", kind="msg", topic="t", hops=1, route=("m1",), payload=b"\x00hi")
    header = (b'{"src":"' + ID_A.encode() + b'","dst":"m2","kind":"msg","topic":"t",'
              b'"request_id":0,"hops":1,"route":["m1"]}')
    assert wire.encode(message) == (
        struct.pack("!I", 2 + 4 + len(header) + 3) + b"\x01\x09" + struct.pack("!I", len(header))
        + header + b"\x00hi"
    )


def test_header_is_ascii_json_in_field_order():
    _, _, _, header, _ = split(wire.encode(BASE["welcome"]))
    assert list(header) == ["entry", "session_id"]
    assert list(header["entry"]) == ["node_id", "name", "cluster", "leader", "role", "addrs", "observed", "inbound"]
    assert wire.encode(BASE["refuse"]).isascii()


def test_other_json_spellings_are_accepted():
    # A second implementation may order fields differently, add whitespace or new fields.
    assert decode_one(frame(10, b' { "future" : [1, {"x": null}] ,\n "nonce" : 5 } ')) == wire.Ping(5)
    assert decode_one(frame(5, b'{"reason":"\\u00e9t\\u00e9","code":"c"}')) == wire.Refuse("c", "\u00e9t\u00e9")
    assert decode_one(frame(5, '{"reason":"\u00e9t\u00e9","code":"c"}'.encode())) == wire.Refuse("c", "\u00e9t\u00e9")


@pytest.mark.parametrize("message", SAMPLES, ids=SAMPLE_IDS)
def test_round_trip_whole(message):
    data = wire.encode(message)
    assert decode_one(data) == message
    length, version, type_code, _, payload = split(data)
    assert (length, version, type_code) == (len(data) - 4, 1, TYPE_CODES[type(message)])
    assert payload == (message.payload if isinstance(message, wire.Routed) else b"")


@pytest.mark.parametrize("message", SAMPLES, ids=SAMPLE_IDS)
def test_round_trip_byte_by_byte(message):
    data = wire.encode(message)
    decoder = wire.Decoder()
    for i in range(len(data) - 1):
        decoder.feed(data[i : i + 1])
        assert decoder.next_message() is None
        assert decoder.buffered == i + 1
    decoder.feed(data[-1:])
    assert decoder.next_message() == message
    assert decoder.next_message() is None
    assert decoder.buffered == 0


@pytest.mark.parametrize("message", SAMPLES, ids=SAMPLE_IDS)
def test_round_trip_with_trailing_bytes(message):
    data = wire.encode(message)
    follower = wire.encode(wire.Pong(3))
    for extra in range(1, len(follower)):
        decoder = wire.Decoder()
        decoder.feed(data + follower[:extra])
        assert decoder.next_message() == message
        assert decoder.next_message() is None
        assert decoder.buffered == extra
        decoder.feed(follower[extra:])
        assert decoder.next_message() == wire.Pong(3)
        assert decoder.buffered == 0


def test_several_frames_in_one_feed():
    data = b"".join(wire.encode(m) for m in SAMPLES)
    decoder = wire.Decoder()
    decoder.feed(data)
    assert drain(decoder) == (SAMPLES, False)
    assert decoder.buffered == 0


def test_several_frames_byte_by_byte_and_in_odd_chunks():
    data = b"".join(wire.encode(m) for m in SAMPLES)
    for sizes in ([1], [7, 1, 300], [4096]):
        assert feed_chunks(data, sizes) == (SAMPLES, False)


def test_many_small_frames():
    data = b"".join(wire.encode(wire.Ping(i)) for i in range(5000))
    decoder = wire.Decoder()
    for piece in chunked(data, [65536]):
        decoder.feed(piece)
    messages, failed = drain(decoder)
    assert not failed and messages == [wire.Ping(i) for i in range(5000)]


def test_feed_takes_any_bytes_like():
    data = wire.encode(BASE["routed"])
    decoder = wire.Decoder()
    decoder.feed(bytearray(data[:10]))
    decoder.feed(memoryview(data)[10:])
    assert decoder.next_message() == BASE["routed"]


def test_optional_fields_take_their_defaults():
    for message in SAMPLES:
        cls = type(message)
        for key in header_of(message):
            if key in REQUIRED[cls]:
                continue
            decoded = decode_one(edited(message, (key,)))
            assert getattr(decoded, key) == getattr(cls(**{f: getattr(message, f) for f in REQUIRED[cls]}), key)
    decoded = decode_one(frame(4, {"entry": {"node_id": ID_A, "name": "a", "cluster": None, "leader": ID_A},
                                   "session_id": ID_C}))
    assert decoded.entry == wire.NodeEntry(node_id=ID_A, name="a", cluster=None, leader=ID_A, role="leader",
                                           addrs=(), observed=None, inbound=None)


# --- limits and field rules, decoding side ---------------------------------------------------


@pytest.mark.parametrize("length", [wire.MAX_FRAME_BYTES + 1, 2**31, 2**32 - 1])
def test_oversized_length_is_rejected_after_four_bytes(length):
    decoder = wire.Decoder(peer="203.0.113.9:4000")
    decoder.feed(struct.pack("!I", length)[:3])
    assert decoder.next_message() is None
    decoder.feed(struct.pack("!I", length)[3:])
    with pytest.raises(RemoteProtocolError) as info:
        decoder.next_message()
    assert info.value.peer == "203.0.113.9:4000"
    assert str(length) in str(info.value)


def test_max_length_is_waited_for():
    decoder = wire.Decoder()
    decoder.feed(struct.pack("!IBB", wire.MAX_FRAME_BYTES, 1, 9))
    assert decoder.next_message() is None
    assert decoder.buffered == 6


def test_decoder_limit_is_a_parameter():
    data = wire.encode(wire.Ping(1))
    assert decode_one(data, max_frame_bytes=len(data) - 4) == wire.Ping(1)
    rejected(data[:4], max_frame_bytes=len(data) - 5)


def test_largest_frame_round_trips_and_one_more_byte_does_not_encode():
    empty = len(wire.encode(wire.Routed(src=ID_A, dst=ID_B, kind="msg", topic="big")))
    payload = b"\xa5" * (wire.MAX_FRAME_BYTES + 4 - empty)
    message = wire.Routed(src=ID_A, dst=ID_B, kind="msg", topic="big", payload=payload)
    data = wire.encode(message)
    assert len(data) == wire.MAX_FRAME_BYTES + 4
    assert decode_one(data) == message
    with pytest.raises(LocalProtocolError):
        wire.encode(wire.Routed(src=ID_A, dst=ID_B, kind="msg", topic="big", payload=payload + b"!"))


@pytest.mark.parametrize("length", range(0, 6))
def test_frame_too_short_for_version_type_and_header_len(length):
    rejected(struct.pack("!I", length) + b"\x01\x0a\x00\x00\x00\x00"[:length])


@pytest.mark.parametrize("version", [0, 2, 255])
def test_wrong_version_is_rejected_before_the_body(version):
    data = wire.encode(wire.Ping(1))
    rejected(data[:4] + bytes([version]) + data[5:6])
    rejected(frame(10, {"nonce": 1}, version=version))


@pytest.mark.parametrize("type_code", [0, 17, 99, 255])
def test_unknown_type_is_rejected_before_the_body(type_code):
    rejected(struct.pack("!IBB", 100, 1, type_code))
    rejected(frame(type_code, {"nonce": 1}))


@pytest.mark.parametrize("excess", [1, 2, 1000, None])
def test_header_len_past_the_frame_end(excess):
    header = json.dumps(header_of(BASE["routed"])).encode()
    for type_code, rest in ((10, b'{"nonce":1}'), (9, header + b"payload")):
        header_len = 2**32 - 1 if excess is None else len(rest) + excess
        rejected(frame(type_code, rest, header_len=header_len))


@pytest.mark.parametrize("message", [m for m in SAMPLES if not isinstance(m, wire.Routed)],
                         ids=[k for k, m in BASE.items() if not isinstance(m, wire.Routed)])
def test_payload_on_a_type_that_has_none(message):
    _, _, type_code, header, _ = split(wire.encode(message))
    assert decode_one(frame(type_code, header)) == message
    rejected(frame(type_code, header, b"\x00"))


def test_payload_of_routed_is_what_follows_the_header():
    header = header_of(BASE["routed-msg"])
    decoded = decode_one(frame(9, header, b'{"not":"a header"}'))
    assert decoded.payload == b'{"not":"a header"}'


@pytest.mark.parametrize("header", [
    b"",
    b"\xff\xfe{}",
    b'{"nonce":1}\x80',
    b'{"nonce":"\xc3"}',
    "\ufeff{\"nonce\":1}".encode(),  # a byte order mark is not JSON
    b"{nonce:1}",
    b"{'nonce':1}",
    b'{"nonce":1',
    b'{"nonce":1}}',
    b'{"nonce":1} {"nonce":2}',
    b'{"nonce":01}',
    b'{"nonce":0x1}',
    b"\x00",
], ids=repr)
def test_header_not_utf8_or_not_json(header):
    rejected(frame(10, header))


@pytest.mark.parametrize("header", [[], "nonce", 1, None, True, [{"nonce": 1}]], ids=repr)
def test_header_not_an_object(header):
    rejected(frame(10, header))


@pytest.mark.parametrize("text", [
    b"[" * 50_000,
    b"[" * 50_000 + b"]" * 50_000,
    b'{"a":' * 50_000 + b"1" + b"}" * 50_000,
    b'{"op":"x","args":' + b'{"a":[' * 30_000 + b"]}" * 30_000 + b"}",
], ids=["open-lists", "closed-lists", "objects", "in-control-args"])
def test_deeply_nested_json(text):
    rejected(frame(12, text))


def test_huge_integer():
    rejected(frame(10, b'{"nonce":' + b"9" * 50_000 + b"}"))


@pytest.mark.parametrize("literal", [b"NaN", b"Infinity", b"-Infinity"])
def test_non_json_numbers_are_rejected(literal):
    """NaN and Infinity are not JSON (RFC 8259); encode() refuses to send them, so must the decoder."""
    rejected(frame(12, b'{"op":"x","args":{"a":' + literal + b"}}"))
    rejected(frame(13, b'{"ok":true,"result":' + literal + b"}"))


@pytest.mark.parametrize("literal", [b"1e400", b"-1e400"])
def test_overflowing_numbers_are_rejected_or_can_be_sent_back(literal):
    """Whatever the decoder accepts, encode() must be able to send on (a reply may echo it)."""
    decoder = wire.Decoder()
    decoder.feed(frame(13, b'{"ok":true,"result":[' + literal + b"]}"))
    try:
        message = decoder.next_message()
    except RemoteProtocolError:
        return
    assert decode_one(wire.encode(message)) == message


# (sample, path into its header, bad value): one field rule broken per case.
BAD_FIELDS = [
    # integers: wrong JSON type, bool for int, out of range
    ("ping", ("nonce",), "1"),
    ("ping", ("nonce",), True),
    ("ping", ("nonce",), False),
    ("ping", ("nonce",), 1.0),
    ("ping", ("nonce",), None),
    ("ping", ("nonce",), -1),
    ("ping", ("nonce",), 2**32),
    ("pong", ("nonce",), [1]),
    ("routed", ("hops",), wire.MAX_HOPS + 1),
    ("routed", ("hops",), -1),
    ("routed", ("hops",), True),
    ("routed", ("hops",), "4"),
    ("routed", ("request_id",), 2**32),
    ("routed", ("request_id",), -1),
    ("routed", ("request_id",), False),
    ("routed", ("request_id",), 3.0),
    # booleans
    ("update", ("snapshot",), 1),
    ("update", ("more",), "false"),
    ("update", ("more",), None),
    ("reply", ("ok",), 1),
    ("reply", ("ok",), None),
    ("welcome", ("entry", "inbound"), 0),
    ("welcome", ("entry", "inbound"), "yes"),
    # strings and their byte limits (counted in UTF-8 bytes, not characters)
    ("refuse", ("reason",), "\u00e9" * (wire.MAX_REASON_BYTES // 2 + 1)),
    ("refuse", ("reason",), "x" * (wire.MAX_REASON_BYTES + 1)),
    ("refuse", ("reason",), None),
    ("refuse", ("reason",), 7),
    ("reply-error", ("error",), "e" * (wire.MAX_REASON_BYTES + 1)),
    ("reply-error", ("error",), None),
    ("enroll", ("token",), "t" * (wire.MAX_TOKEN_BYTES + 1)),
    ("enroll", ("token",), None),
    ("hello-plain", ("token",), "\u20ac" * (wire.MAX_TOKEN_BYTES // 3 + 1)),
    ("hello-plain", ("token",), 123),
    ("enroll", ("csr_pem",), "P" * (wire.MAX_PEM_BYTES + 1)),
    ("enroll", ("csr_pem",), ["-----BEGIN"]),
    ("enrolled", ("cert_pem",), "P" * (wire.MAX_PEM_BYTES + 1)),
    ("hello", ("software",), "s" * (wire.MAX_NAME_BYTES + 1)),
    ("hello", ("software",), None),
    ("welcome", ("session_id",), "s"),
    ("welcome", ("session_id",), ID_C.upper()),
    ("welcome", ("session_id",), None),
    # choices
    ("hello", ("role",), "admin"),
    ("hello", ("role",), "Leader"),
    ("hello", ("role",), None),
    ("hello", ("role",), ["leader"]),
    ("welcome", ("entry", "role"), "probe"),
    ("register", ("entries", 0, "role"), "rendezvous"),
    ("routed", ("kind",), "reply"),
    ("routed", ("kind",), None),
    ("routed", ("kind",), ["msg"]),
    # node ids: canonical lower-case UUIDs only
    ("enrolled", ("node_id",), ID_B.upper()),
    ("enrolled", ("node_id",), ID_B.replace("-", "")),
    ("enrolled", ("node_id",), "{" + ID_B + "}"),
    ("enrolled", ("node_id",), "urn:uuid:" + ID_B),
    ("enrolled", ("node_id",), ID_B[:-1]),
    ("enrolled", ("node_id",), ID_B[:-1] + "g"),
    ("enrolled", ("node_id",), ID_B[:8] + "_" + ID_B[9:]),
    ("enrolled", ("node_id",), int(ID_B.replace("-", ""), 16)),
    ("enrolled", ("node_id",), None),
    ("enrolled", ("node_id",), "rendezvous"),
    ("hello-plain", ("node_id",), "not-a-uuid"),
    ("welcome", ("entry", "node_id"), ID_A.upper()),
    ("welcome", ("entry", "leader"), "lead-1"),
    ("welcome", ("entry", "leader"), None),
    ("unregister", ("node_ids", 1), ID_C.upper()),
    ("unregister", ("node_ids", 0), None),
    ("update", ("left", 0), "solo_2"),
    ("update", ("joined", 2, "node_id"), "\uff10" * 8 + ID_C[8:]),  # full-width digits
    ("routed", ("src",), "m1.c1"),
    ("routed", ("src",), None),
    # destinations: a node id or a name
    ("routed", ("dst",), "-x"),
    ("routed", ("dst",), "a" * (wire.MAX_NAME_BYTES + 1)),
    ("routed", ("dst",), None),
    # names and topics
    ("routed", ("topic",), "t" * (wire.MAX_TOPIC_BYTES + 1)),
    ("routed", ("topic",), "a topic"),
    ("routed", ("topic",), None),
    ("routed", ("route", 0), "m1 c1"),
    ("routed", ("route", 3), None),
    ("routed", ("route",), ["n"] * (wire.MAX_HOPS + 2)),
    ("routed", ("route",), "m1.c1"),
    ("hello", ("cluster",), ""),
    ("hello", ("cluster",), 3),
    ("enroll", ("name",), None),
    ("welcome", ("entry", "name"), None),
    ("welcome", ("entry", "cluster"), "c 1"),
    ("refuse", ("code",), "bad token"),
    ("refuse", ("code",), None),
    ("control", ("op",), ""),
    ("control", ("op",), None),
    # addresses
    ("hello", ("addrs",), ["192.0.2.1:7000"] * (wire.MAX_ADDRS + 1)),
    ("hello", ("addrs",), "192.0.2.1:7000"),
    ("hello", ("addrs",), None),
    ("hello", ("addrs", 0), "192.0.2.1"),
    ("hello", ("addrs", 0), "192.0.2.1:"),
    ("hello", ("addrs", 0), "192.0.2.1:0"),
    ("hello", ("addrs", 0), "192.0.2.1:65536"),
    ("hello", ("addrs", 0), "192.0.2.1:123456"),
    ("hello", ("addrs", 0), "192.0.2.1:-1"),
    ("hello", ("addrs", 0), ":7000"),
    ("hello", ("addrs", 0), "2001:db8::1:7000"),
    ("hello", ("addrs", 0), "[2001:db8::1]"),
    ("hello", ("addrs", 0), "[2001:db8::zz]:7000"),
    ("hello", ("addrs", 0), "host name:7000"),
    ("hello", ("addrs", 0), "h\u00f6st:7000"),
    ("hello", ("addrs", 0), "host:7000\n"),
    ("hello", ("addrs", 0), "h" * (wire.MAX_ADDR_BYTES - 4) + ":7000"),  # one byte too long
    ("hello", ("addrs", 0), "host:\uff17\uff10"),  # full-width digits
    ("hello", ("addrs", 0), 7000),
    ("welcome", ("entry", "addrs"), ["192.0.2.1:1"] * (wire.MAX_ADDRS + 1)),
    ("welcome", ("entry", "observed"), "198.51.100.7"),
    # lists of entries and ids
    ("register", ("entries",), [MEMBER.to_json()] * (wire.MAX_ENTRIES_PER_UPDATE + 1)),
    ("register", ("entries",), MEMBER.to_json()),
    ("register", ("entries",), None),
    ("register", ("entries", 0), [ID_B, "m1.c1"]),
    ("register", ("entries", 0), None),
    ("unregister", ("node_ids",), [ID_B] * (wire.MAX_ENTRIES_PER_UPDATE + 1)),
    ("unregister", ("node_ids",), ID_B),
    ("update", ("joined",), [LONER.to_json()] * (wire.MAX_ENTRIES_PER_UPDATE + 1)),
    ("update", ("joined",), None),
    ("update", ("left",), [ID_C] * (wire.MAX_ENTRIES_PER_UPDATE + 1)),
    ("update", ("left",), {"id": ID_C}),
    ("welcome", ("entry",), None),
    ("welcome", ("entry",), [ID_A]),
    # control
    ("control-args", ("args",), None),
    ("control-args", ("args",), ["dst", "m1"]),
    ("control-args", ("args",), "dst=m1"),
    # assembly
    ("assembly-request", ("port",), 0),
    ("assembly-request", ("port",), 65536),
    ("assembly-request", ("port",), "80"),
    ("assembly-request", ("stack",), None),
    ("assembly-request", ("stack",), "x" * (wire.MAX_STACK_BYTES + 1)),
    ("assembly-request", ("token",), "0f" * 31),
    ("assembly-request", ("token",), "0F" * 32),
    ("assembly-request", ("token",), "zz" * 32),
    ("assembly-request", ("token",), 0),
    ("assembly-request", ("offer",), None),
    ("assembly-request", ("offer",), ["endpoint"]),
    ("assembly-request", ("offer",), {"pad": "x" * wire.MAX_OFFER_BYTES}),
    ("assembly-accept", ("answer",), "ok"),
    ("assembly-accept", ("answer",), {"pad": "x" * wire.MAX_OFFER_BYTES}),
    ("assembly-refuse", ("code",), "no-such-code"),
    ("assembly-refuse", ("code",), 1),
    ("assembly-refuse", ("reason",), "x" * (wire.MAX_REASON_BYTES + 1)),
]


@pytest.mark.parametrize("key,path,value", BAD_FIELDS, ids=[f"{k}-{'.'.join(map(str, p))}-{i}"
                                                           for i, (k, p, _) in enumerate(BAD_FIELDS)])
def test_bad_field_is_rejected(key, path, value):
    error = rejected(edited(BASE[key], path, value))
    assert str(path[0]) in str(error)


GOOD_FIELDS = [
    ("ping", ("nonce",), 2**32 - 1),
    ("routed", ("hops",), wire.MAX_HOPS),
    ("routed", ("hops",), 0),
    ("routed", ("route",), ["n"] * (wire.MAX_HOPS + 1)),
    ("routed", ("dst",), "rendezvous"),
    ("routed", ("dst",), ID_C),
    ("routed", ("dst",), ID_C.upper()),  # not a node id, but a valid name
    ("routed", ("topic",), "t" * wire.MAX_TOPIC_BYTES),
    ("refuse", ("reason",), "\u00e9" * (wire.MAX_REASON_BYTES // 2)),
    ("refuse", ("reason",), ""),
    ("enroll", ("token",), "t" * wire.MAX_TOKEN_BYTES),
    ("enroll", ("csr_pem",), "P" * wire.MAX_PEM_BYTES),
    ("enroll", ("name",), "a" * wire.MAX_NAME_BYTES),
    ("enroll", ("name",), "0"),
    ("enroll", ("name",), "A-b_c.9"),
    ("hello", ("software",), "s" * wire.MAX_NAME_BYTES),
    ("hello", ("addrs",), ["192.0.2.1:7000"] * wire.MAX_ADDRS),
    ("hello", ("addrs", 0), "h" * (wire.MAX_ADDR_BYTES - 5) + ":7000"),  # exactly the limit
    ("hello", ("addrs", 0), "[::1]:1"),
    ("hello", ("addrs", 0), "[::ffff:192.0.2.1]:65535"),
    ("hello", ("addrs", 0), "node-7.cluster.example:22"),
    ("register", ("entries",), [MEMBER.to_json()] * wire.MAX_ENTRIES_PER_UPDATE),
    ("unregister", ("node_ids",), []),
    ("control-args", ("args",), {}),
    ("reply", ("result",), None),
    ("reply", ("result",), "text"),
]


@pytest.mark.parametrize("key,path,value", GOOD_FIELDS, ids=[f"{k}-{'.'.join(map(str, p))}-{i}"
                                                             for i, (k, p, _) in enumerate(GOOD_FIELDS)])
def test_field_at_its_limit_is_accepted(key, path, value):
    message = decode_one(edited(BASE[key], path, value))
    assert decode_one(wire.encode(message)) == message


@pytest.mark.parametrize("message", SAMPLES, ids=SAMPLE_IDS)
def test_missing_required_field(message):
    header = header_of(message)
    required = REQUIRED[type(message)]
    assert required <= set(header)
    for key in required:
        error = rejected(edited(message, (key,)))
        assert repr(key) in str(error)


@pytest.mark.parametrize("key", sorted(ENTRY_REQUIRED))
def test_missing_required_entry_field(key):
    rejected(edited(BASE["welcome"], ("entry", key)))
    rejected(edited(BASE["register"], ("entries", 0, key)))
    rejected(edited(BASE["update"], ("joined", 1, key)))


def test_a_field_of_another_type_does_not_fill_in():
    # A Pong header under the Ping code is fine (same fields); a Ping header as a Hello is not.
    assert decode_one(frame(10, header_of(wire.Pong(4)))) == wire.Ping(4)
    rejected(frame(3, header_of(wire.Ping(4))))
    rejected(frame(9, header_of(BASE["hello"])))


# --- names and node ids ----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["a", "Z9", "0.1", "node-1.cluster_2", "x" * wire.MAX_NAME_BYTES, "rendezvous"])
def test_check_name_accepts(name):
    assert wire.check_name(name) == name


@pytest.mark.parametrize("name", [
    "", "-a", ".a", "_a", "a b", "a/b", "a:b", "a@b", "na\u00efve", "\uff41", "a\n", "a\t", "a\x00",
    "x" * (wire.MAX_NAME_BYTES + 1), None, 7, ["a"],
], ids=repr)
def test_bad_names_are_rejected_everywhere(name):
    with pytest.raises(ValueError):
        wire.check_name(name)
    places = [("enroll", ("name",)), ("hello", ("name",)), ("welcome", ("entry", "name")),
              ("routed", ("topic",)), ("routed", ("route", 1)), ("refuse", ("code",)), ("control", ("op",))]
    if name is not None:  # these may be null (no cluster) or a node id
        places += [("hello", ("cluster",)), ("register", ("entries", 0, "cluster")), ("routed", ("dst",))]
    for key, path in places:
        rejected(edited(BASE[key], path, name))


def test_is_node_id():
    assert wire.is_node_id(ID_A)
    for value in (ID_A.upper(), ID_A.replace("-", ""), "{" + ID_A + "}", ID_A + " ", ID_A[:-1], None, 1, b"x"):
        assert not wire.is_node_id(value)


# --- the decoder stays broken ----------------------------------------------------------------


@pytest.mark.parametrize("bad", [
    struct.pack("!I", wire.MAX_FRAME_BYTES + 1),
    frame(10, {"nonce": 1}, version=2),
    frame(10, {"nonce": "1"}),
    frame(10, b"[" * 50_000),
], ids=["length", "version", "field", "nesting"])
def test_decoder_stays_broken(bad):
    good = wire.encode(wire.Ping(1))
    decoder = wire.Decoder(peer="p")
    decoder.feed(good + bad + good)
    assert decoder.next_message() == wire.Ping(1)
    with pytest.raises(RemoteProtocolError) as first:
        decoder.next_message()
    for _ in range(3):
        with pytest.raises(RemoteProtocolError) as again:
            decoder.next_message()
        assert str(again.value) == str(first.value)
        assert again.value.peer == "p"
    decoder.feed(good)
    with pytest.raises(RemoteProtocolError):
        decoder.next_message()


# --- encoding side: we never send what we would refuse -----------------------------------------


def _nested(depth: int) -> list:
    top = current = []
    for _ in range(depth):
        current.append([])
        current = current[0]
    return top


def _circular() -> dict:
    d: dict = {}
    d["self"] = d
    return d


def _entries(n: int):
    return tuple(MEMBER for _ in range(n))


BAD_MESSAGES = {
    "nonce-negative": wire.Ping(-1),
    "nonce-too-big": wire.Ping(2**32),
    "nonce-bool": wire.Pong(True),
    "nonce-float": wire.Ping(1.0),
    "nonce-str": wire.Ping("1"),
    "hops": wire.Routed(src=ID_A, dst=ID_B, kind="msg", topic="t", hops=wire.MAX_HOPS + 1),
    "hops-negative": wire.Routed(src=ID_A, dst=ID_B, kind="msg", topic="t", hops=-1),
    "route-too-long": wire.Routed(src=ID_A, dst=ID_B, kind="msg", topic="t", route=("n",) * (wire.MAX_HOPS + 2)),
    "request-id": wire.Routed(src=ID_A, dst=ID_B, kind="req", topic="t", request_id=2**32),
    "kind": wire.Routed(src=ID_A, dst=ID_B, kind="reply", topic="t"),
    "topic-long": wire.Routed(src=ID_A, dst=ID_B, kind="msg", topic="t" * (wire.MAX_TOPIC_BYTES + 1)),
    "topic-bad": wire.Routed(src=ID_A, dst=ID_B, kind="msg", topic="a/b"),
    "src-name": wire.Routed(src="lead-1", dst=ID_B, kind="msg", topic="t"),
    "dst-bad": wire.Routed(src=ID_A, dst="", kind="msg", topic="t"),
    "payload-str": wire.Routed(src=ID_A, dst=ID_B, kind="msg", topic="t", payload="text"),
    "payload-too-big": wire.Routed(src=ID_A, dst=ID_B, kind="msg", topic="t", payload=bytes(wire.MAX_FRAME_BYTES)),
    "name-long": wire.Hello(name="n" * (wire.MAX_NAME_BYTES + 1), cluster=None, role="leader"),
    "name-bad": wire.Enroll(token="t", csr_pem="p", name="bad name"),
    "cluster-bad": wire.Hello(name="n", cluster="-c", role="leader"),
    "role": wire.Hello(name="n", cluster=None, role="admin"),
    "addrs-many": wire.Hello(name="n", cluster=None, role="leader", addrs=("192.0.2.1:1",) * (wire.MAX_ADDRS + 1)),
    "addr-bad": wire.Hello(name="n", cluster=None, role="leader", addrs=("192.0.2.1",)),
    "addrs-str": wire.Hello(name="n", cluster=None, role="leader", addrs="192.0.2.1:1"),
    "software-long": wire.Hello(name="n", cluster=None, role="leader", software="s" * (wire.MAX_NAME_BYTES + 1)),
    "hello-node-id": wire.Hello(name="n", cluster=None, role="member", node_id=ID_A.upper()),
    "token-long": wire.Enroll(token="t" * (wire.MAX_TOKEN_BYTES + 1), csr_pem="p", name="n"),
    "pem-long": wire.Enrolled(node_id=ID_A, cert_pem="p" * (wire.MAX_PEM_BYTES + 1)),
    "node-id": wire.Enrolled(node_id=ID_A.replace("-", ""), cert_pem="p"),
    "reason-long": wire.Refuse(code="c", reason="\u00e9" * (wire.MAX_REASON_BYTES // 2 + 1)),
    "code-bad": wire.Refuse(code="bad code", reason=""),
    "entry-role": wire.Welcome(entry=wire.NodeEntry(node_id=ID_A, name="a", cluster=None, leader=ID_A, role="probe"),
                               session_id=ID_C),
    "entry-observed": wire.Register(entries=(wire.NodeEntry(node_id=ID_A, name="a", cluster=None, leader=ID_A,
                                                            observed="nowhere"),)),
    "entry-not-entry": wire.Register(entries=("m1",)),
    "register-many": wire.Register(entries=_entries(wire.MAX_ENTRIES_PER_UPDATE + 1)),
    "unregister-many": wire.Unregister(node_ids=(ID_A,) * (wire.MAX_ENTRIES_PER_UPDATE + 1)),
    "joined-many": wire.DirectoryUpdate(joined=_entries(wire.MAX_ENTRIES_PER_UPDATE + 1)),
    "left-many": wire.DirectoryUpdate(left=(ID_A,) * (wire.MAX_ENTRIES_PER_UPDATE + 1)),
    "left-bad": wire.DirectoryUpdate(left=("m1",)),
    "snapshot-int": wire.DirectoryUpdate(snapshot=1),
    "args-list": wire.Control(op="x", args=["a"]),
    "args-set": wire.Control(op="x", args={"a": {1, 2}}),
    "args-bytes": wire.Control(op="x", args={"a": b"\x00"}),
    "args-circular": wire.Control(op="x", args=_circular()),
    "args-nan": wire.Control(op="x", args={"a": float("nan")}),
    "result-inf": wire.ControlReply(ok=True, result=[float("inf")]),
    "ok-int": wire.ControlReply(ok=1),
    "error-long": wire.ControlReply(ok=False, error="e" * (wire.MAX_REASON_BYTES + 1)),
    "args-deep": wire.Control(op="x", args={"a": _nested(100_000)}),
    "result-deep": wire.ControlReply(ok=True, result=_nested(100_000)),
    "not-a-message": object(),
    "none": None,
    "entry-alone": MEMBER,
    "subclass": NotAPing(1),
}


@pytest.mark.parametrize("message", list(BAD_MESSAGES.values()), ids=list(BAD_MESSAGES))
def test_encode_refuses_what_breaks_a_rule(message):
    with pytest.raises(LocalProtocolError):
        wire.encode(message)


def test_largest_directory_updates_fit_in_a_frame():
    address = "h" * (wire.MAX_ADDR_BYTES - 6) + ":65535"
    widest = wire.NodeEntry(node_id=ID_A, name="n" * wire.MAX_NAME_BYTES, cluster="c" * wire.MAX_NAME_BYTES,
                            leader=ID_B, role="member", addrs=(address,) * wire.MAX_ADDRS, observed=address,
                            inbound=False)
    n = wire.MAX_ENTRIES_PER_UPDATE
    for message in (
        wire.DirectoryUpdate(joined=(widest,) * n, left=(ID_C,) * n, snapshot=True, more=True),
        wire.Register(entries=(widest,) * n),
        wire.Unregister(node_ids=(ID_C,) * n),
    ):
        data = wire.encode(message)
        assert len(data) <= wire.MAX_FRAME_BYTES + 4
        assert decode_one(data) == message


def test_errors_are_protocol_errors():
    assert issubclass(RemoteProtocolError, ProtocolError)
    assert issubclass(LocalProtocolError, ProtocolError)
    assert not issubclass(LocalProtocolError, RemoteProtocolError)


# --- Hypothesis --------------------------------------------------------------------------------

NAME_START = string.ascii_letters + string.digits
NAME_CHARS = NAME_START + "._-"
# (st.from_regex would do, at four times the cost.)
names = st.builds(lambda first, rest: first + rest, st.sampled_from(NAME_START),
                  st.text(NAME_CHARS, max_size=wire.MAX_NAME_BYTES - 1))
node_ids = st.uuids().map(str)
ports = st.integers(1, 65535)
hosts = st.one_of(
    st.text(NAME_CHARS, min_size=1, max_size=60),
    st.ip_addresses(v=4).map(str),
    st.ip_addresses(v=6).map(lambda ip: f"[{ip}]"),
)
addresses = st.builds(lambda host, port: f"{host}:{port}", hosts, ports)
u32 = st.integers(0, 2**32 - 1)


def texts(max_bytes: int):
    # st.text never yields lone surrogates; four bytes per character at most.
    return st.text(max_size=max_bytes // 4)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**64), 2**64)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=20,
)
entries = st.builds(
    wire.NodeEntry,
    node_id=node_ids,
    name=names,
    cluster=st.none() | names,
    leader=node_ids,
    role=st.sampled_from(["leader", "member"]),
    addrs=st.lists(addresses, max_size=wire.MAX_ADDRS).map(tuple),
    observed=st.none() | addresses,
    inbound=st.none() | st.booleans(),
)
# A method's fields: small (well under MAX_OFFER_BYTES), as methods send them.
offers = st.dictionaries(st.text(max_size=10), st.none() | st.booleans() | u32 | st.text(max_size=40), max_size=4)
messages = st.one_of(
    st.builds(wire.Enroll, token=texts(wire.MAX_TOKEN_BYTES), csr_pem=texts(1024), name=names),
    st.builds(wire.Enrolled, node_id=node_ids, cert_pem=texts(1024)),
    st.builds(wire.Hello, name=names, cluster=st.none() | names, role=st.sampled_from(["leader", "member", "probe"]),
              addrs=st.lists(addresses, max_size=wire.MAX_ADDRS).map(tuple), software=texts(wire.MAX_NAME_BYTES),
              node_id=st.none() | node_ids, token=st.none() | texts(wire.MAX_TOKEN_BYTES)),
    st.builds(wire.Welcome, entry=entries, session_id=node_ids),
    st.builds(wire.Refuse, code=names, reason=texts(wire.MAX_REASON_BYTES)),
    st.builds(wire.Register, entries=st.lists(entries, max_size=4).map(tuple)),
    st.builds(wire.Unregister, node_ids=st.lists(node_ids, max_size=4).map(tuple)),
    st.builds(wire.DirectoryUpdate, joined=st.lists(entries, max_size=4).map(tuple),
              left=st.lists(node_ids, max_size=4).map(tuple), snapshot=st.booleans(), more=st.booleans()),
    st.builds(wire.Routed, src=node_ids, dst=node_ids | names, kind=st.sampled_from(["msg", "req", "rep", "err"]),
              topic=names, request_id=u32, hops=st.integers(0, wire.MAX_HOPS),
              route=st.lists(names, max_size=wire.MAX_HOPS + 1).map(tuple), payload=st.binary(max_size=512)),
    st.builds(wire.Ping, nonce=u32),
    st.builds(wire.Pong, nonce=u32),
    st.builds(wire.Control, op=names, args=st.dictionaries(st.text(max_size=10), json_values, max_size=5)),
    st.builds(wire.ControlReply, ok=st.booleans(), result=json_values, error=texts(wire.MAX_REASON_BYTES)),
    st.builds(wire.AssemblyRequest, port=st.integers(1, 65535), stack=texts(64),
              token=st.binary(min_size=32, max_size=32).map(bytes.hex),
              offer=offers),
    st.builds(wire.AssemblyAccept, answer=offers),
    st.builds(wire.AssemblyRefuse, code=st.sampled_from(sorted(wire.REFUSAL_CODES)),
              reason=texts(wire.MAX_REASON_BYTES)),
)
chunk_sizes = st.lists(st.integers(1, 64), min_size=1, max_size=8)

FIELD_NAMES = sorted({f for cls in MESSAGE_TYPES for f in header_of(next(m for m in SAMPLES if type(m) is cls))}
                     | set(LEADER.to_json()))
field_values = st.one_of(
    json_values, names, node_ids, addresses, u32, st.integers(-3, 10),
    st.sampled_from(["leader", "member", "probe", "msg", "req", "rep", "err"]),
    st.lists(names | node_ids | addresses, max_size=3), st.just(LEADER.to_json()), st.just([MEMBER.to_json()]),
)
json_headers = st.dictionaries(st.sampled_from(FIELD_NAMES), field_values, max_size=9).map(
    lambda header: json.dumps(header).encode())
frame_like = st.builds(
    frame,
    type_code=st.integers(0, 17),
    header=st.binary(max_size=64) | json_headers,
    payload=st.binary(max_size=16) | st.just(b""),
    version=st.sampled_from([1, 1, 1, 0, 2, 255]),
    header_len=st.none() | st.none() | st.integers(0, 2**32 - 1),
    length=st.none() | st.none() | st.integers(0, 2**32 - 1),
)


@FUZZ
@given(data=st.binary(max_size=512) | frame_like | st.lists(frame_like, max_size=4).map(b"".join), sizes=chunk_sizes)
def test_fuzz_random_bytes(data, sizes):
    feed_chunks(data, sizes)


# Frames to mutate: the hand-written samples (cheap to draw) and random valid messages.
valid_frames = st.sampled_from([wire.encode(m) for m in SAMPLES]) | messages.map(wire.encode)


@st.composite
def mutated_frames(draw):
    data = bytearray(b"".join(draw(st.lists(valid_frames, min_size=1, max_size=3))))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "set", "truncate", "delete", "insert", "splice", "duplicate"]))
        at = draw(st.integers(0, len(data)))
        if op == "flip" and at < len(data):
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and at < len(data):
            data[at] = draw(st.sampled_from([0, 1, 0x7F, 0x80, 0xFF, ord('"'), ord("["), ord("{"), ord("\\")]))
        elif op == "truncate":
            del data[at:]
        elif op == "delete":
            del data[at : at + draw(st.integers(1, 8))]
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif op == "splice":
            other = draw(valid_frames)
            data[at:] = other[draw(st.integers(0, len(other))):]
        elif op == "duplicate":
            data[at:at] = data[at : at + draw(st.integers(1, 16))]
    return bytes(data)


@FUZZ
@given(data=mutated_frames(), sizes=chunk_sizes)
def test_fuzz_mutated_frames(data, sizes):
    feed_chunks(data, sizes)


@FUZZ
@given(batch=st.lists(messages, min_size=1, max_size=4), sizes=chunk_sizes)
def test_fuzz_valid_messages_round_trip(batch, sizes):
    data = b"".join(wire.encode(m) for m in batch)
    assert feed_chunks(data, sizes) == (batch, False)
    for message in batch:
        assert wire.encode(decode_one(wire.encode(message))) == wire.encode(message)
