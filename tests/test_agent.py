"""The agent protocol: its codec byte by byte (gridsock.agentwire), and the public client
(gridsock.agent.AgentClient) against the agent of a real node on loopback."""
from __future__ import annotations

import errno
import os
import socket

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gridsock import agentwire, wire
from gridsock.agent import AgentClient
from gridsock.agentclient import AGENT_ENV
from gridsock.errors import RemoteProtocolError
from gridsock.names import grid_ip
from test_personality import grid  # noqa: F401 (the fixture: a rendez-vous node, nodes na and nb)

pytestmark = pytest.mark.timeout(120)

FUZZ = settings(max_examples=300, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

REQUESTS = [
    wire.Control("whoami", {}),
    wire.Control("resolve", {"host": "nb.grid"}),
    wire.Control("connect", {"host": "240.1.2.3", "port": 8000, "timeout": 2.5, "stack": "tls/tcp"}),
    wire.Control("connect", {"host": "nb", "port": 80, "timeout": None, "stack": None, "filler": 4608}),
    wire.Control("listen", {"port": 0}),
]
REPLIES = [
    wire.ControlReply(True, {"name": "na", "node_id": "0b5f5c1e-3f51-4f3a-9a55-2d7c7b6b9f01", "cluster": "A",
                             "ip": "241.2.3.4"}),
    wire.ControlReply(True, {"peer": "nb", "ip": "241.2.3.5", "port": 80, "stack": "tcp", "tried": [["tcp", "ok"]]}),
    agentwire.failure("ECONNREFUSED", "nothing listens on grid port 80 of nb"),
    agentwire.failure("EAI_NONAME", "no node 'nobody' in the grid of na"),
]
CASES = [(wire.Control, m) for m in REQUESTS] + [(wire.ControlReply, m) for m in REPLIES]
CASE_IDS = [f"{type(m).__name__}-{i}" for i, (_, m) in enumerate(CASES)]


def a_descriptor() -> int:
    """A real descriptor to pass around (the read end of a pipe whose write end is closed)."""
    read_end, write_end = os.pipe()
    os.close(write_end)
    return read_end


def is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
        return True
    except OSError:
        return False


def drain(reader: agentwire.AgentReader) -> list:
    out = []
    while (got := reader.next_message()) is not None:
        out.append(got)
    return out


# --- the codec, byte by byte ---------------------------------------------------------------------


@pytest.mark.parametrize("expect, message", CASES, ids=CASE_IDS)
def test_each_message_whole(expect, message):
    reader = agentwire.AgentReader(expect)
    reader.feed(wire.encode(message))
    assert drain(reader) == [(message, None)]
    assert reader.buffered == 0 and reader.eof() is None


@pytest.mark.parametrize("expect, message", CASES, ids=CASE_IDS)
def test_each_message_byte_by_byte_never_wanting_past_its_end(expect, message):
    frame = wire.encode(message)
    reader = agentwire.AgentReader(expect)
    for i in range(len(frame) - 1):
        assert 0 < reader.bytes_wanted <= len(frame) - i
        reader.feed(frame[i:i + 1])
        assert reader.next_message() is None
    assert reader.bytes_wanted == 1
    reader.feed(frame[-1:])
    assert reader.next_message() == (message, None)
    assert reader.bytes_wanted == 4  # the next frame's length field


@pytest.mark.parametrize("expect, message", CASES, ids=CASE_IDS)
def test_each_message_with_trailing_bytes(expect, message):
    frame = wire.encode(message)
    reader = agentwire.AgentReader(expect)
    reader.feed(frame + frame[:7])
    assert reader.next_message() == (message, None)
    assert reader.next_message() is None and reader.buffered == 7
    assert reader.bytes_wanted == len(frame) - 7
    reader.feed(frame[7:])
    assert drain(reader) == [(message, None)]
    with pytest.raises(RemoteProtocolError):  # and the peer closes inside a third frame
        reader.feed(frame[:1])
        reader.eof()


def test_a_descriptor_travels_with_the_first_byte_of_its_frame():
    first, second = (wire.encode(m) for m in REQUESTS[:2])
    reader = agentwire.AgentReader(wire.Control)
    fd = a_descriptor()
    reader.feed(first[:1], [fd])  # byte by byte, the descriptor on the first
    for i in range(1, len(first)):
        assert reader.next_message() is None
        reader.feed(first[i:i + 1])
    assert reader.next_message() == (REQUESTS[0], fd)
    other = a_descriptor()
    reader.feed(second, [other])  # whole, after a frame that had one
    assert reader.next_message() == (REQUESTS[1], other)
    reader.feed(first)  # and the next has none
    assert reader.next_message() == (REQUESTS[0], None)
    reader.close()
    assert is_open(fd) and is_open(other)  # handed out: the caller's, not closed by the reader
    os.close(fd)
    os.close(other)


def test_a_descriptor_after_trailing_bytes_belongs_to_the_next_frame():
    first, second = (wire.encode(m) for m in REPLIES[:2])
    reader = agentwire.AgentReader(wire.ControlReply)
    fd = a_descriptor()
    reader.feed(first)
    reader.feed(second, [fd])
    assert drain(reader) == [(REPLIES[0], None), (REPLIES[1], fd)]
    os.close(fd)


@pytest.mark.parametrize("at", [1, 3, 4, 5, 20, -1])
def test_a_descriptor_inside_a_frame_is_a_protocol_error_and_is_closed(at):
    frame = wire.encode(REQUESTS[2])
    at = at % len(frame)
    reader = agentwire.AgentReader(wire.Control)
    fd, later = a_descriptor(), a_descriptor()
    reader.feed(frame[:at])
    reader.feed(frame[at:], [fd])
    with pytest.raises(RemoteProtocolError, match="inside a frame"):
        reader.next_message()
    assert not is_open(fd)
    reader.feed(frame, [later])  # broken for good: what comes later is closed too
    with pytest.raises(RemoteProtocolError):
        reader.next_message()
    assert not is_open(later)


def test_two_descriptors_with_one_frame_a_descriptor_without_bytes_and_eof_after_one():
    frame = wire.encode(REQUESTS[2])
    fds = [a_descriptor(), a_descriptor()]
    reader = agentwire.AgentReader(wire.Control)
    reader.feed(frame, fds)
    with pytest.raises(RemoteProtocolError, match="more than 1 descriptor"):
        reader.next_message()
    assert not any(map(is_open, fds))

    fd = a_descriptor()
    reader = agentwire.AgentReader(wire.Control)
    reader.feed(b"", [fd])
    with pytest.raises(RemoteProtocolError, match="without a byte"):
        reader.next_message()
    assert not is_open(fd)

    fd = a_descriptor()
    reader = agentwire.AgentReader(wire.Control)
    reader.feed(frame[:2], [fd])
    assert reader.next_message() is None
    with pytest.raises(RemoteProtocolError, match="closed inside a frame"):
        reader.eof()
    assert not is_open(fd)


def test_close_closes_the_descriptors_still_held():
    fd = a_descriptor()
    reader = agentwire.AgentReader(wire.ControlReply)
    reader.feed(wire.encode(REPLIES[1])[:10], [fd])
    assert reader.next_message() is None and is_open(fd)
    reader.close()
    assert not is_open(fd)


@pytest.mark.parametrize("data, why", [
    ((wire.MAX_FRAME_BYTES + 1).to_bytes(4, "big"), "exceeds the limit"),  # before the body arrives
    (b"\x00\x00\x00\x01\x01", "too short"),
    (b"\x00\x00\x00\x06\x02\x0c\x00\x00\x00\x00", "unsupported protocol version"),
    (b"\x00\x00\x00\x08\x01\x0c\x00\x00\x00\x02{]", "not JSON"),
    (wire.encode(REPLIES[0]), "expected Control, got ControlReply"),
    (wire.encode(wire.Ping(7)), "expected Control, got Ping"),
    (wire.encode(wire.Control("connect", {})).replace(b'"args":{}', b'"args":[]'), "must be an object"),
])
def test_bad_input_is_a_remote_protocol_error(data, why):
    reader = agentwire.AgentReader(wire.Control, peer="test")
    reader.feed(data)
    with pytest.raises(RemoteProtocolError, match=why) as caught:
        reader.next_message()
    assert caught.value.peer == "test"
    with pytest.raises(RemoteProtocolError):
        reader.next_message()  # and again: broken for good


@pytest.mark.parametrize("name, cls, code", [
    ("ECONNREFUSED", ConnectionRefusedError, errno.ECONNREFUSED),
    ("ETIMEDOUT", TimeoutError, errno.ETIMEDOUT),
    ("EHOSTUNREACH", OSError, errno.EHOSTUNREACH),
    ("EADDRINUSE", OSError, errno.EADDRINUSE),
    ("EINVAL", OSError, errno.EINVAL),
    ("EAI_NONAME", socket.gaierror, socket.EAI_NONAME),
    ("EWHATEVER", OSError, errno.EIO),
    ("errorcode", OSError, errno.EIO),
])
def test_failures_are_the_stdlib_exceptions_their_errno_names(name, cls, code):
    reader = agentwire.AgentReader(wire.ControlReply)
    reader.feed(wire.encode(agentwire.failure(name, "why " * 1000)))
    (reply, _), = drain(reader)
    assert len(reply.error) == wire.MAX_REASON_BYTES
    with pytest.raises(cls) as caught:
        agentwire.result_of(reply)
    assert type(caught.value) is cls and caught.value.errno == code and caught.value.strerror == reply.error


def test_a_failure_without_an_errno_is_eio_and_a_success_is_its_result():
    for result in (None, [], {"errno": 5}, "ECONNREFUSED"):
        error = agentwire.error_for(wire.ControlReply(False, result, "odd"))
        assert type(error) is OSError and error.errno == errno.EIO
    assert agentwire.result_of(REPLIES[0]) == REPLIES[0].result
    assert all(name in agentwire.ERRNO_NAMES for name in ("ECONNREFUSED", "ETIMEDOUT", "EAI_NONAME"))


# --- fuzz ----------------------------------------------------------------------------------------

valid_frames = st.sampled_from([wire.encode(m) for m in REQUESTS + REPLIES])
stream_bytes = (st.binary(max_size=256)
                | st.lists(valid_frames, min_size=1, max_size=3).map(b"".join)
                | st.tuples(st.lists(valid_frames, max_size=2).map(b"".join), st.binary(max_size=32)).map(b"".join))


@FUZZ
@given(expect=st.sampled_from([wire.Control, wire.ControlReply]), data=stream_bytes,
       cuts=st.lists(st.integers(0, 300), max_size=8), with_fds=st.lists(st.booleans(), max_size=9),
       close=st.booleans())
def test_fuzz_only_messages_or_remote_protocol_error_and_no_descriptor_leaks(expect, data, cuts, with_fds, close):
    bounds = sorted({0, len(data), *(c for c in cuts if c < len(data))})
    chunks = [data[a:b] for a, b in zip(bounds, bounds[1:])] or [b""]
    given_fds, handed_out = [], []
    reader = agentwire.AgentReader(expect)
    try:
        for i, chunk in enumerate(chunks):
            fds = [a_descriptor()] if i < len(with_fds) and with_fds[i] else []
            given_fds += fds
            reader.feed(chunk, fds)
            while (got := reader.next_message()) is not None:
                message, fd = got
                assert isinstance(message, expect) and (fd is None or fd in given_fds)
                if fd is not None:
                    handed_out.append(fd)
        if close:
            reader.eof()
    except RemoteProtocolError:
        pass
    reader.close()
    for fd in handed_out:
        os.close(fd)
    assert not any(map(is_open, given_fds))  # each one handed out (and closed above) or closed by the reader


# --- the drivers over a real socketpair ----------------------------------------------------------


def test_recv_message_takes_each_descriptor_with_its_own_frame():
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    extra_a, extra_b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with ours, theirs, extra_a, extra_b:
        # Three frames queued at once: none, one with a descriptor, none. A read that ran over
        # the end of the first frame would take the second's descriptor with it.
        agentwire.send_frame(theirs, wire.encode(REPLIES[0]))
        agentwire.send_frame(theirs, wire.encode(REPLIES[1]), extra_b.fileno())
        for byte in wire.encode(REPLIES[2]):  # the third, dribbled
            theirs.send(bytes([byte]))
        theirs.shutdown(socket.SHUT_WR)
        reader = agentwire.AgentReader(wire.ControlReply)
        assert agentwire.recv_message(ours, reader) == (REPLIES[0], None)
        reply, fd = agentwire.recv_message(ours, reader)
        assert reply == REPLIES[1] and fd is not None and not os.get_inheritable(fd)
        with socket.socket(fileno=fd) as passed:
            extra_a.sendall(b"through")
            assert passed.recv(100) == b"through"
        assert agentwire.recv_message(ours, reader) == (REPLIES[2], None)
        assert agentwire.recv_message(ours, reader) is None  # closed between frames


def test_recv_message_on_a_closed_half_frame_and_a_non_blocking_socket():
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with ours, theirs:
        ours.setblocking(False)
        reader = agentwire.AgentReader(wire.ControlReply)
        with pytest.raises(BlockingIOError):  # nothing yet: the caller's to wait
            agentwire.recv_message(ours, reader)
        theirs.sendall(wire.encode(REPLIES[0])[:9])
        theirs.close()
        with pytest.raises(RemoteProtocolError, match="closed inside a frame"):
            agentwire.recv_message(ours, reader)


# --- the client against a real node --------------------------------------------------------------


@pytest.fixture(scope="module")
def agents(grid):  # noqa: F811 (the fixture imported above)
    return (AgentClient(str(grid.run_dir / "na.agent")), AgentClient(str(grid.run_dir / "nb.agent")))


def test_whoami_resolve_and_lookup(grid, agents):  # noqa: F811
    na, nb = agents
    me = na.whoami()
    assert me["name"] == "na" and me["cluster"] == "A" and me["ip"] == grid_ip(grid.node_id("na"))
    ip = grid_ip(grid.node_id("nb"))
    for host in ("nb", "nb.grid", ip):
        assert na.resolve(host) == {"name": "nb", "node_id": grid.node_id("nb"), "ip": ip}
    with pytest.raises(socket.gaierror) as caught:
        na.resolve("nobody.grid")
    assert caught.value.errno == socket.EAI_NONAME and "nobody" in str(caught.value)
    assert na.lookup("nobody") is None and na.lookup("nb")["ip"] == ip


def test_listen_connect_accept_and_the_stdlib_errors(agents):
    na, nb = agents
    with nb.listen(0) as listener:
        assert listener.port > 0 and listener.ip == nb.whoami()["ip"]
        sock, info = na.connect("nb", listener.port, timeout=10)
        conn, announced = listener.accept()
        with sock, conn:
            assert isinstance(sock, socket.socket) and sock.type == socket.SOCK_STREAM
            assert info["peer"] == "nb" and info["port"] == listener.port and info["stack"]
            assert announced["peer"] == "na" and announced["port"] == listener.port
            sock.sendall(b"ping")
            assert conn.recv(100) == b"ping"
            conn.sendall(b"pong")
            assert sock.recv(100) == b"pong"
        with pytest.raises(OSError) as caught:
            nb.listen(listener.port)
        assert caught.value.errno == errno.EADDRINUSE
        port = listener.port
        listener.release()
    with nb.listen(port) as again:  # released: the port is free at once
        assert again.port == port
    with pytest.raises(ConnectionRefusedError):
        na.connect("nb", port, timeout=10)
    with pytest.raises(socket.gaierror):
        na.connect("nobody.grid", 80)
    with pytest.raises(OSError) as caught:
        na.connect("nb", 70000)
    assert caught.value.errno == errno.EINVAL


def test_connect_into_a_socketpair_end(agents):
    na, nb = agents
    with nb.listen(0) as listener:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        with ours, theirs:
            ours.sendall(b"x" * 100)  # the filler: the agent reads it away before bridging
            channel = na.connect_into("nb", listener.port, theirs.fileno(), filler=100)
            theirs.close()
            with channel:
                result, sock = channel.receive()
            assert result["peer"] == "nb" and sock is None
            conn, _ = listener.accept()
            with conn:
                ours.sendall(b"bridged")
                got = b""
                while len(got) < 7:
                    got += conn.recv(100)
                assert got == b"bridged"


def test_a_client_that_breaks_the_protocol_is_dropped_and_the_agent_serves_on(agents):
    na, _ = agents
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as rogue:
        rogue.settimeout(10)
        rogue.connect(na.path)
        rogue.sendall(wire.encode(REPLIES[0]))  # a reply where a request belongs
        assert rogue.recv(100) == b""  # dropped
    assert AgentClient(na.path).whoami()["name"] == "na"


def test_from_env_and_no_agent(agents, tmp_path):
    na, _ = agents
    assert AgentClient.from_env({}) is None and AgentClient.from_env({AGENT_ENV: ""}) is None
    client = AgentClient.from_env({AGENT_ENV: na.path}, timeout=5)
    assert client.path == na.path and client.timeout == 5 and client.whoami()["name"] == "na"
    with pytest.raises(ConnectionRefusedError, match="no gridsock agent"):
        AgentClient(str(tmp_path / "none.agent")).whoami()
