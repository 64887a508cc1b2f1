"""The assembly codec byte by byte: request/accept/refuse payloads, the data preamble, nomination.

The frames themselves (every field rule, round trips whole, byte by byte and with trailing
bytes, fuzzing) are covered with the other message types in tests/test_wire.py; here is what is
particular to assembly: one frame per payload, the fixed-size preamble, the refusal codes.
"""
from __future__ import annotations

import errno
import struct

import pytest
from hypothesis import given, settings, strategies as st

from gridsock import wire
from gridsock.assembly import errno_of
from gridsock.errors import ConnectError, ConnectTimeoutError, LocalProtocolError, RemoteProtocolError

TOKEN = bytes(range(32))
REQUEST = wire.AssemblyRequest(port=5000, stack="tls/tcp", token=TOKEN.hex(), offer={"conn": 7})
FUZZ = settings(max_examples=300, deadline=None, database=None)


# --- assembly payloads ---------------------------------------------------------------------


def test_golden_request():
    header = b'{"port":5000,"stack":"tls/tcp","token":"' + TOKEN.hex().encode() + b'","offer":{"conn":7}}'
    expected = struct.pack("!IBBI", 2 + 4 + len(header), 1, 14, len(header)) + header
    assert wire.encode_assembly(REQUEST) == expected
    assert wire.decode_assembly(expected) == REQUEST
    assert REQUEST.token_bytes == TOKEN


@pytest.mark.parametrize("message", [REQUEST, wire.AssemblyAccept({"endpoint": "203.0.113.2:9"}),
                                     wire.AssemblyRefuse("refused", "nothing listens on port 5000 of b1")])
def test_a_payload_is_exactly_one_frame(message):
    payload = wire.encode_assembly(message)
    assert wire.decode_assembly(payload) == message
    for cut in range(len(payload)):  # every truncation is refused, none hangs or half-decodes
        with pytest.raises(RemoteProtocolError):
            wire.decode_assembly(payload[:cut])
    with pytest.raises(RemoteProtocolError, match="after the assembly message"):
        wire.decode_assembly(payload + b"\x00")
    with pytest.raises(RemoteProtocolError, match="after the assembly message"):
        wire.decode_assembly(payload + payload)


def test_other_message_types_are_not_assembly_messages():
    with pytest.raises(RemoteProtocolError, match="not an assembly message"):
        wire.decode_assembly(wire.encode(wire.Ping(1)))
    with pytest.raises(LocalProtocolError):
        wire.encode_assembly(wire.Ping(1))


def test_the_old_json_request_is_refused_with_a_protocol_error():
    with pytest.raises(RemoteProtocolError):
        wire.decode_assembly(b'{"port": 5000, "stack": "tcp", "token": "00"}')


def test_every_refusal_code_names_an_errno():
    for code, name in wire.REFUSAL_CODES.items():
        assert isinstance(getattr(errno, name), int), code
    refused = ConnectError("b1 refused tcp", code="refused")
    assert errno_of(refused) == errno.ECONNREFUSED
    assert errno_of(ConnectError("b1 refused", code="unknown-node")) == errno.EHOSTUNREACH
    assert errno_of(ConnectError("no method worked")) == errno.EHOSTUNREACH
    assert errno_of(ConnectTimeoutError("every SYN went unanswered")) == errno.ETIMEDOUT


def test_connect_errors_keep_their_code_across_pickling():
    import pickle

    error = pickle.loads(pickle.dumps(ConnectError("x", peer="b1", method="tcp", tried=[("tcp", "y")], code="policy")))
    assert (error.code, error.peer, error.method, error.tried) == ("policy", "b1", "tcp", [("tcp", "y")])


# --- the data preamble ---------------------------------------------------------------------


def test_golden_preamble():
    preamble = wire.encode_preamble(TOKEN, 3)
    assert preamble == b"GSDC\x02" + TOKEN + b"\x03"
    assert len(preamble) == wire.PREAMBLE_BYTES == 38
    assert wire.decode_preamble(preamble) == wire.DataPreamble(TOKEN, 3)


def test_preamble_byte_by_byte_and_with_trailing_bytes():
    preamble = wire.encode_preamble(TOKEN)
    for n in range(wire.PREAMBLE_BYTES):
        assert wire.decode_preamble(preamble[:n]) is None  # needs more, never an error
    assert wire.decode_preamble(preamble + b"\x16\x03\x01") == wire.DataPreamble(TOKEN, 0)


@pytest.mark.parametrize("data,why", [
    (b"X", "magic"),
    (b"GSDX", "magic"),
    (b"\x16\x03\x01\x00", "magic"),  # a TLS client hello is not a data connection
    (b"GSDC\x01" + TOKEN, "version 1"),
    (b"GSDC\x03", "version 3"),
])
def test_a_bad_preamble_is_refused_as_soon_as_it_shows(data, why):
    with pytest.raises(RemoteProtocolError, match=why):
        wire.decode_preamble(data)


@pytest.mark.parametrize("token,index", [(TOKEN[:31], 0), (TOKEN + b"x", 0), (TOKEN, 256), (TOKEN, -1)])
def test_encode_preamble_refuses_what_the_peer_would_refuse(token, index):
    with pytest.raises(LocalProtocolError):
        wire.encode_preamble(token, index)


def test_nomination_is_one_byte_and_not_a_preamble_start():
    assert len(wire.NOMINATE) == 1 and wire.NOMINATE != wire.DATA_MAGIC[:1]


# --- fuzz ------------------------------------------------------------------------------------


@FUZZ
@given(data=st.binary(max_size=96))
def test_fuzz_preamble(data):
    try:
        result = wire.decode_preamble(data)
    except RemoteProtocolError:
        return
    if result is None:
        assert len(data) < wire.PREAMBLE_BYTES
    else:
        assert wire.encode_preamble(result.token, result.index) == data[: wire.PREAMBLE_BYTES]


@FUZZ
@given(data=st.binary(max_size=256) | st.sampled_from([wire.encode_assembly(REQUEST)]).flatmap(
    lambda frame: st.integers(0, len(frame) - 1).flatmap(
        lambda at: st.integers(0, 255).map(lambda b: frame[:at] + bytes([b]) + frame[at + 1:]))))
def test_fuzz_assembly_payloads(data):
    try:
        message = wire.decode_assembly(data)
    except RemoteProtocolError:
        return
    assert isinstance(message, (wire.AssemblyRequest, wire.AssemblyAccept, wire.AssemblyRefuse))
    assert wire.decode_assembly(wire.encode_assembly(message)) == message
