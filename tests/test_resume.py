"""The ``resume`` layer on loopback nodes: a transfer whose lower path is killed mid-stream
completes byte-exact both ways; tokens are single-use and bound to the pair; a connection that
cannot resume is reset, never ended cleanly; a relayed connection moves to a direct path when
one opens, without losing a byte. Plus the frame codec, whole and byte by byte."""
from __future__ import annotations

import gc
import hashlib
import os
import random
import secrets
import socket
import time

import gevent
import gevent.event
import pytest
from gevent import socket as gsocket

from gridsock import assembly, wire  # (assembly registers the resume layer)
from gridsock.components import resume
from gridsock.components.resume import (ACK, DATA, EOF, HEADER_BYTES, HELLO, MAX_FRAME_DATA_BYTES, FrameDecoder,
                                        ResumeStream, encode_frame, live_streams)
from gridsock.errors import BrokenStreamError, RemoteProtocolError
from gridsock.rules import Rules
from gridsock.stack import Stack
from gridsock.components.relay import RelayStream
from gridsock.streams import SocketStream, Stream, memory_pair
from gridsock.testing.grid import loopback_grid
from gridsock.testing.methods import CASES, LocalServer, check_method

pytestmark = pytest.mark.timeout(120)

# Every wait on a condition or a socket is bounded by this (a hang fails, never passes).
WAIT_S = 60.0
CHUNK = 64 * 1024
PORT = 7300


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    with loopback_grid(tmp_path_factory.mktemp("resume")) as running:
        yield running


@pytest.fixture(autouse=True)
def every_connection_ends(request):
    """After each test on the grid, every resumable connection of every node ends (both ends,
    within a bounded wait) once the programs closed their sockets: connections that end must
    end, and none is left for the next test to meet."""
    yield
    if "grid" in request.fixturenames:
        nodes = request.getfixturevalue("grid").nodes
        wait_for(lambda: not any(live_streams(node) for node in nodes.values()),
                 "every resumable connection of the grid ended")
        wait_for(lambda: not any(len(node.relay) for node in nodes.values()), "every relayed connection ended")


# --- the codec ---------------------------------------------------------------------------------


def frames_of(data: bytes, *, step=None):
    decoder, out = FrameDecoder(), []
    pieces = [data] if step is None else [data[i:i + step] for i in range(0, len(data), step)]
    for piece in pieces:
        decoder.feed(piece)
        while (frame := decoder.next_frame()) is not None:
            out.append(frame)
    return out, decoder


def test_frames_whole_byte_by_byte_and_with_trailing_bytes():
    frames = [(HELLO, 5, b""), (DATA, 5, b"abc" * 1000), (ACK, 2**40, b""), (EOF, 3005, b"")]
    data = b"".join(encode_frame(*f) for f in frames)
    assert frames_of(data)[0] == frames
    assert frames_of(data, step=1)[0] == frames
    got, decoder = frames_of(data + encode_frame(DATA, 0, b"xy")[:HEADER_BYTES + 1])
    assert got == frames and decoder.next_frame() is None  # the rest of the frame has not come


@pytest.mark.parametrize("bad", [
    bytes([2, DATA]) + bytes(8) + (1).to_bytes(4, "big") + b"x",  # version
    bytes([1, 9]) + bytes(12),  # type
    bytes([1, DATA]) + bytes(12),  # empty DATA
    bytes([1, DATA]) + bytes(8) + (MAX_FRAME_DATA_BYTES + 1).to_bytes(4, "big"),  # too large
    bytes([1, ACK]) + bytes(8) + (1).to_bytes(4, "big") + b"x",  # a payload on an ACK
])
def test_bad_frames_raise_remote_protocol_error_and_stay_failed(bad):
    decoder = FrameDecoder()
    decoder.feed(bad)
    with pytest.raises(RemoteProtocolError):
        decoder.next_frame()
    decoder.feed(encode_frame(ACK, 1))
    with pytest.raises(RemoteProtocolError):
        decoder.next_frame()


def test_random_bytes_give_frames_or_remote_protocol_error():
    rng = random.Random(3)
    for _ in range(300):
        decoder = FrameDecoder()
        decoder.feed(bytes([1]) + rng.randbytes(rng.randint(0, 40)))
        try:
            while decoder.next_frame() is not None:
                pass
        except RemoteProtocolError:
            pass


def test_resume_is_a_known_layer_above_a_method():
    stack = Stack.parse("tls/resume(timeout=5)/relay")
    assert str(stack) == "tls/resume(timeout=5.0)/relay"
    method, filters = assembly.method_of(stack)
    assert (type(method).__name__, method.inner.name, str(filters)) == ("ResumeMethod", "relay", "tls/relay")


# --- helpers ------------------------------------------------------------------------------------


def streams_of(node, *, initiator: bool):
    return node.call(lambda: [s for s in live_streams(node) if s.initiator == initiator], timeout=WAIT_S)


def the_stream(node, *, initiator: bool):
    found = streams_of(node, initiator=initiator)
    assert len(found) == 1, found
    return found[0]


def wait_for(condition, what: str) -> None:
    """Wait (bounded) until ``condition()`` holds; polls twenty times a second."""
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, f"not within {WAIT_S:g} s: {what}"
        gevent.sleep(0.05)


class Side:
    """One application end of a transfer: sends ``send_bytes`` (or, with ``until``, chunks
    until that event is set and then ``send_bytes`` more), then EOF; reads to EOF. Greenlets
    (the loopback grid's nodes run in this thread's hub)."""

    def __init__(self, sock, send_bytes: int, seed: int, *, until=None):
        self.sock = sock
        sock.settimeout(WAIT_S)
        self.sent = hashlib.sha256()
        self.received = hashlib.sha256()
        self.sent_bytes = 0
        self.received_bytes = 0
        self.error = None
        self._rng = random.Random(seed)
        self._send_bytes = send_bytes
        self._until = until
        self._greenlets = [gevent.spawn(self._send), gevent.spawn(self._receive)]

    def _chunk(self) -> bytes:
        return self._rng.randbytes(CHUNK)

    def _send(self) -> None:
        try:
            if self._until is not None:
                while not self._until.is_set():
                    self._put(self._chunk())
                    if self.sent_bytes > 2 * 1024**3:
                        raise AssertionError("the event never came")
            end = self.sent_bytes + self._send_bytes
            while self.sent_bytes < end:
                self._put(self._chunk()[: end - self.sent_bytes])
            self.sock.shutdown(socket.SHUT_WR)
        except BaseException as exc:
            self.error = exc

    def _put(self, data: bytes) -> None:
        self.sock.sendall(data)
        self.sent.update(data)
        self.sent_bytes += len(data)

    def _receive(self) -> None:
        try:
            while True:
                data = self.sock.recv(256 * 1024)
                if not data:
                    return
                self.received.update(data)
                self.received_bytes += len(data)
        except BaseException as exc:
            self.error = exc

    def join(self) -> None:
        done = gevent.joinall(self._greenlets, timeout=WAIT_S)
        assert len(done) == len(self._greenlets), "a transfer greenlet hangs"
        assert self.error is None, repr(self.error)


class cooperative:
    """The application's real socket, used from greenlets of this thread through gevent's
    socket over a duplicate of its descriptor; the socket itself stays open until this closes
    (so the node lists the connection meanwhile)."""

    def __init__(self, sock) -> None:
        self.original = sock
        self.socket = gsocket.socket(sock.family, sock.type, fileno=os.dup(sock.fileno()))

    def __getattr__(self, name):
        return getattr(self.socket, name)

    def close(self) -> None:
        self.socket.close()
        self.original.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def open_pair(grid, client: str, server: str, stack: str, port: int):
    listener = grid[server].listen(port)
    try:
        sock, info = grid[client].connect(server, port, stack=stack, timeout=WAIT_S)
        server_sock, server_info = listener.accept(timeout=WAIT_S)
    finally:
        listener.close()
    assert info.stack == server_info.stack == str(Stack.parse(stack))
    return cooperative(sock), cooperative(server_sock)


def transfer_with(grid, client, server, stack, port, *, size, during, until=None):
    """Both ways at once, ``size`` bytes each (plus what ``until`` adds); ``during()`` runs once
    the client received a third of it. Returns the two sides (checked equal)."""
    sock, server_sock = open_pair(grid, client, server, stack, port)
    with sock, server_sock:
        a = Side(sock, size, 1, until=until)
        b = Side(server_sock, size, 2)
        wait_for(lambda: a.received_bytes >= size // 3 or a.error or b.error, "a third of the transfer")
        during()
        a.join()
        b.join()
    assert (a.sent_bytes, a.sent.hexdigest()) == (b.received_bytes, b.received.hexdigest())
    assert (b.sent_bytes, b.sent.hexdigest()) == (a.received_bytes, a.received.hexdigest())
    return a, b


# --- the method conformance cases ---------------------------------------------------------------


@pytest.mark.parametrize("stack,refused,port", [
    ("tls/resume/tcp", "resume/tcp", PORT + 100),
    ("tls/resume/relay", "resume/relay", PORT + 110),
])
def test_check_method(grid, stack, refused, port):
    server = LocalServer(grid["L2"])
    try:
        assert check_method(grid["m1"], server, stack, port=port, refused_stack=refused) == {c: "ok" for c in CASES}
    finally:
        server.close()


# --- breaks: the path is killed mid-stream ------------------------------------------------------


def kill_tcp_under(node, stream) -> None:
    """Shut down the kernel socket under ``stream``, ``node``'s end of a resumable
    connection over tcp."""
    def kill():
        assert isinstance(stream.lower, SocketStream), stream.lower
        stream.lower.socket.shutdown(socket.SHUT_RDWR)

    node.call(kill, timeout=WAIT_S)


def kill_relay_under(node, stream) -> None:
    """Reset ``node``'s relay channel under ``stream`` (``node``'s relayed connections with the
    peer break there; the peer's end learns it from the RESET its next frame gets)."""
    def kill():
        assert isinstance(stream.lower, RelayStream), stream.lower
        node.relay.reset_peers({stream.peer_id}, "the test closed the relay channel")

    node.call(kill, timeout=WAIT_S)


@pytest.mark.parametrize("stack,kill", [
    ("tls/resume/tcp", kill_tcp_under),
    ("resume/tcp", kill_tcp_under),
    ("tls/resume(upgrade=false)/relay", kill_relay_under),
])
def test_a_transfer_survives_its_killed_path(grid, stack, kill):
    client, server = ("L1", "m1") if stack == "resume/tcp" else ("m1", "L2")
    port = PORT + len(stack)
    seen = []

    def kill_it():
        seen.append(the_stream(grid[client], initiator=True))
        seen.append(the_stream(grid[server], initiator=False))
        kill(grid[client], seen[0])

    transfer_with(grid, client, server, stack, port, size=12 * 1024 * 1024, during=kill_it)
    assert [stream.state["resumes"] for stream in seen] == [1, 1]
    # Both ends ended in order and forgot the connection (its token with it).
    wait_for(lambda: not streams_of(grid[client], initiator=True), "the client's connection ended")
    wait_for(lambda: not streams_of(grid[server], initiator=False), "the server's connection ended")


def test_a_transfer_survives_several_kills(grid):
    node = grid["m1"]

    seen = []

    def kill_three_times():
        stream = the_stream(node, initiator=True)
        seen.append(stream)
        for count in (1, 2, 3):
            kill_tcp_under(node, stream)
            wait_for(lambda: stream.state["resumes"] == count, "a resume")

    transfer_with(grid, "m1", "L2", "tls/resume/tcp", PORT + 40, size=16 * 1024 * 1024, during=kill_three_times)
    assert seen[0].state["resumes"] == 3


# --- tokens ---------------------------------------------------------------------------------------


def resume_request(node, server, port: int, stack: str, session_id: int, token: bytes):
    """A resume request as ``node`` would send it (over its meta channel), answered by ``server``."""
    request = wire.AssemblyRequest(port=port, stack=stack, token=secrets.token_hex(wire.TOKEN_BYTES),
                                   offer={"resume": {"format": resume.RESUME_FORMAT, "id": session_id,
                                                     "token": token.hex()}})
    reply = node.meta_request(server.node_id, "assemble", wire.encode_assembly(request), timeout=WAIT_S)
    return wire.decode_assembly(reply.payload)


def test_a_token_is_used_once_and_only_by_its_node(grid):
    client, server = grid["m1"], grid["L2"]
    port = PORT + 50
    sock, server_sock = open_pair(grid, "m1", "L2", "tls/resume/relay", port)
    with sock, server_sock:
        stream = the_stream(client, initiator=True)
        first = stream._token
        # Another node of the session, with the right id and token: refused; the token stays good.
        answer = resume_request(grid["m2"], server, port, "tls/resume/relay", stream.session_id, first)
        assert isinstance(answer, wire.AssemblyRefuse) and answer.code == "bad-token", answer
        kill_relay_under(client, stream)
        wait_for(lambda: stream.state["resumes"] == 1, "the resume")
        assert stream._token != first
        # Its own node, the token spent: refused.
        answer = resume_request(client, server, port, "tls/resume/relay", stream.session_id, first)
        assert isinstance(answer, wire.AssemblyRefuse) and answer.code == "bad-token", answer
        # And the connection is whole.
        sock.settimeout(WAIT_S)
        server_sock.settimeout(WAIT_S)
        sock.sendall(b"ping")
        assert server_sock.recv(4) == b"ping"
        server_sock.sendall(b"pong")
        assert sock.recv(4) == b"pong"


# --- a connection that cannot resume is reset -----------------------------------------------------


def expect_reset(sock) -> None:
    sock.settimeout(WAIT_S)
    with pytest.raises(ConnectionResetError):
        while sock.recv(65536):
            pass  # (what arrived before the break may be read first; an EOF fails the test)


def test_a_connection_that_cannot_resume_is_reset_on_both_sides(grid):
    client, server = grid["m1"], grid["L2"]
    sock, server_sock = open_pair(grid, "m1", "L2", "tls/resume(timeout=2.0,upgrade=false)/tcp", PORT + 60)
    with sock, server_sock:
        sock.sendall(b"x" * 100_000)
        server_sock.settimeout(WAIT_S)
        got = 0
        while got < 100_000:
            got += len(server_sock.recv(65536))
        server.assembler.rules = Rules(outside_cluster=("tls", "lz4"))  # the server now refuses the stack
        try:
            kill_tcp_under(client, the_stream(client, initiator=True))
            expect_reset(sock)  # the client: its resume was refused
            expect_reset(server_sock)  # the server: nobody came back within the bound
        finally:
            server.assembler.rules = server.rules
    wait_for(lambda: not streams_of(server, initiator=False), "the server forgot the connection")


def test_a_client_that_vanishes_is_reset_after_the_bound(grid):
    client, server = grid["m1"], grid["L2"]
    sock, server_sock = open_pair(grid, "m1", "L2", "tls/resume(timeout=1.0,upgrade=false)/tcp", PORT + 70)
    with sock, server_sock:
        # The client's side ends without a word (as if its node died): its lower stream is reset.
        def vanish():
            stream = the_stream(client, initiator=True)
            stream._fail("the test made it vanish", send_reset=False)

        client.call(vanish, timeout=WAIT_S)
        expect_reset(server_sock)


# --- upgrades -------------------------------------------------------------------------------------


def test_a_relayed_connection_moves_to_a_direct_path_when_one_opens(grid, monkeypatch):
    monkeypatch.setattr(resume, "UPGRADE_INITIAL_S", 0.2)
    monkeypatch.setattr(resume, "UPGRADE_MAX_S", 0.4)
    monkeypatch.setattr(resume, "UPGRADE_ROUNDS", 10_000)
    client = grid["m1"]
    client.assembler.rules = Rules(scheme="relay")  # no direct path yet: the rules know only the relay
    upgraded = gevent.event.Event()

    seen = []

    def open_the_way():
        stream = the_stream(client, initiator=True)
        seen.append(stream)
        seen.append(the_stream(grid["L2"], initiator=False))
        assert stream.state["method"] == "relay" and stream.state["upgrades"] == 0
        listed = [c["resume"] for c in client.status()["connections"] if "resume" in c]
        assert listed == [stream.state], listed  # gridsock status shows the layer's state
        client.assembler.rules = client.rules  # "the firewall opens": direct methods are candidates
        wait_for(lambda: stream.state["upgrades"] >= 1, "the upgrade")
        upgraded.set()

    try:
        a, _ = transfer_with(grid, "m1", "L2", "tls/resume/relay", PORT + 80, size=4 * 1024 * 1024,
                             during=open_the_way, until=upgraded)
    finally:
        client.assembler.rules = client.rules
    assert a.sent_bytes > 4 * 1024 * 1024  # bytes went before, during and after the switch
    client_end, server_end = seen
    assert client_end.state["upgrade_tries"] >= 1
    assert client_end.state["method"] in ("tcp", "reverse") and client_end.state["upgrades"] == 1
    assert server_end.state["method"] == client_end.state["method"] and server_end.state["resumes"] == 1


# --- a silent path, without nodes ------------------------------------------------------------------


class Freezable(Stream):
    """A lower stream that can go silent: after ``freeze()`` nothing it sends arrives and its
    receives block (a NAT mapping dropped without a reset), with no error on either side."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.info = {"method": "memory"}
        self.frozen = gevent.event.Event()
        self.closed = gevent.event.Event()

    def send_all(self, data) -> None:
        if not self.frozen.is_set():
            self.inner.send_all(data)

    def receive_some(self, max_bytes=65536) -> bytes:
        getter = gevent.spawn(self._receive, max_bytes)
        gevent.wait([getter, self.frozen], count=1)
        if self.frozen.is_set():
            getter.kill()
            self.closed.wait()  # silence, until the resume layer drops this path
            raise BrokenStreamError("closed")
        data, error = getter.get()
        if error is not None:
            raise error
        return data

    def _receive(self, max_bytes):
        """The inner stream's bytes, or its error (returned: a greenlet that dies of it is printed)."""
        try:
            return self.inner.receive_some(max_bytes), None
        except BrokenStreamError as exc:
            return b"", exc

    def send_eof(self) -> None:
        self.inner.send_eof()

    def close(self) -> None:
        self.frozen.set()
        self.closed.set()
        self.inner.close()


def memory_connection(*, client_lower=lambda stream: stream, next_client_lower=lambda stream: stream, **options):
    """A resumable connection in memory: ``(client, server, first)``, ``first`` the two ends of
    its first path (:class:`Freezable`); a new path is made as the assembler would. The client
    uses ``client_lower(first[0])`` and ``next_client_lower(its end)`` of each new path."""
    a, b = memory_pair()
    first = (Freezable(a), Freezable(b))
    token = secrets.token_bytes(resume.RESUME_TOKEN_BYTES)

    def reopen(layers, timeout):  # what the assembler does for a new path, in memory
        new_a, new_b = memory_pair()
        next_token = server.take_token(client._token, "the-client")
        assert next_token is not None
        client._token = next_token
        gevent.spawn(server.adopt, new_b, next_token)
        new_a.send_all(assembly.NOMINATE)
        return next_client_lower(new_a)

    client = ResumeStream(client_lower(first[0]), initiator=True, session_id=1, token=token, peer_id="the-server",
                          peer_name="server", reopen=reopen, current_layers=("memory",), **options)
    server = ResumeStream(first[1], initiator=False, session_id=1, token=token, peer_id="the-client",
                          peer_name="client", **options)
    return client, server, first


def pump(stream, data, *, at=None, then=None):
    """Send ``data`` in pieces (calling ``then()`` once ``at`` bytes went), then EOF."""
    for i in range(0, len(data), 100_000):
        stream.send_all(data[i:i + 100_000])
        if i == at:
            then()
    stream.send_eof()


def drain(stream) -> bytes:
    out = bytearray()
    while True:
        chunk = stream.receive_some(1 << 20)
        if not chunk:
            return bytes(out)
        out += chunk


def test_a_silent_path_is_noticed_and_replaced(monkeypatch):
    monkeypatch.setattr(resume, "KEEPALIVE_S", 0.1)
    monkeypatch.setattr(resume, "SILENT_S", 0.5)
    client, server, first = memory_connection()
    up, down = random.Random(5).randbytes(3_000_000), random.Random(6).randbytes(2_000_000)

    def freeze():  # both directions of the path go silent
        first[0].frozen.set()
        first[1].frozen.set()

    with gevent.Timeout(WAIT_S):
        jobs = [gevent.spawn(pump, client, up, at=1_000_000, then=freeze), gevent.spawn(pump, server, down),
                gevent.spawn(drain, server), gevent.spawn(drain, client)]
        gevent.joinall(jobs, raise_error=True)
    assert jobs[2].value == up and jobs[3].value == down
    assert client.state["resumes"] == server.state["resumes"] == 1
    assert "nothing arrived" in client.state["last_break"]
    client.close()
    server.close()


def running(stream):
    """The names of the methods of ``stream`` that greenlets still run."""
    return sorted(g._run.__name__ for g in gc.get_objects()
                  if isinstance(g, gevent.Greenlet) and not g.dead and getattr(g._run, "__self__", None) is stream)


def test_a_resumed_connection_keeps_nothing_of_its_suspension_and_ends_whole():
    # A bound longer than the waits below: a timer of the suspension left asleep would outlive them.
    client, server, first = memory_connection(timeout_s=2 * WAIT_S)
    up, down = random.Random(7).randbytes(1_000_000), random.Random(8).randbytes(1_000_000)
    with gevent.Timeout(2 * WAIT_S):
        readers = [gevent.spawn(drain, server), gevent.spawn(drain, client)]
        client.send_all(up[:300_000])
        server.send_all(down[:300_000])
        first[0].close()  # the client's end of the path is gone: both ends lose it
        wait_for(lambda: client.state["resumes"] == server.state["resumes"] == 1, "the resume")
        # Each end runs its new path's reader, sender and keepalive, and nothing else: no timer
        # of the suspension left asleep for its bound.
        for stream in (client, server):
            wait_for(lambda: running(stream) == ["_keepalive", "_read_loop", "_send_loop"],
                     f"{stream!r} running its path only (it runs {running(stream)})")
        client.send_all(up[300_000:])
        server.send_all(down[300_000:])
        client.send_eof()
        server.send_eof()
        gevent.joinall(readers, raise_error=True)
        assert readers[0].value == up and readers[1].value == down
        client.close()
        server.close()
        # Both ended in order: their paths closed, nothing of them running.
        for stream in (client, server):
            wait_for(lambda: stream.lower is None and not running(stream),
                     f"{stream!r} ended (it runs {running(stream)})")


class BreaksAt(Stream):
    """A lower stream whose path breaks (both ends, an abort) when it is given ``frame`` to
    send: that frame is lost with the path."""

    def __init__(self, inner, frame: bytes) -> None:
        self.inner = inner
        self.info = inner.info
        self.frame = frame

    def send_all(self, data) -> None:
        if self.frame in bytes(data):
            self.inner.close()
            raise BrokenStreamError("the path broke")
        self.inner.send_all(data)

    def receive_some(self, max_bytes=65536) -> bytes:
        return self.inner.receive_some(max_bytes)

    def send_eof(self) -> None:
        self.inner.send_eof()

    def close(self) -> None:
        self.inner.close()


class Gathering(Stream):
    """A lower stream whose first receive waits for ``count`` bytes (frames that came in one
    segment are read at once)."""

    def __init__(self, inner, count: int) -> None:
        self.inner = inner
        self.info = {"method": "memory"}
        self.count = count

    def receive_some(self, max_bytes=65536) -> bytes:
        got = bytearray()
        while len(got) < self.count:
            data = self.inner.receive_some(self.count - len(got))
            if not data:
                break
            got += data
        self.count = 0
        return bytes(got) if got else self.inner.receive_some(max_bytes)

    def send_all(self, data) -> None:
        self.inner.send_all(data)

    def send_eof(self) -> None:
        self.inner.send_eof()

    def close(self) -> None:
        self.inner.close()


def test_an_end_whose_last_ack_was_lost_with_its_path_sends_it_again_before_it_finishes():
    # The client's acknowledgement of the server's EOF is lost with the path; on the new path
    # the server's HELLO and its acknowledgement of the client's EOF come together. The client
    # must acknowledge again before it finishes: else the server waits for a resume that never
    # comes (for its bound, longer than this test's waits).
    up, down = b"u" * 1000, b"d" * 2000
    client, server, first = memory_connection(
        client_lower=lambda end: BreaksAt(end, encode_frame(ACK, len(down) + 1)),
        next_client_lower=lambda end: Gathering(end, 2 * HEADER_BYTES), timeout_s=2 * WAIT_S)
    with gevent.Timeout(2 * WAIT_S):
        readers = [gevent.spawn(drain, server), gevent.spawn(drain, client)]
        client.send_all(up)
        server.send_all(down)
        client.send_eof()
        server.send_eof()
        gevent.joinall(readers, raise_error=True)
        assert readers[0].value == up and readers[1].value == down
        wait_for(lambda: client.state["resumes"] == 1, "the resume")
        client.close()
        server.close()
        for stream in (client, server):
            wait_for(lambda: stream.lower is None and not running(stream),
                     f"{stream!r} ended (it runs {running(stream)}, {stream.state})")
            assert stream._finished and stream._broken is None, (stream, stream._broken)  # in order, not reset
        assert server.state["resumes"] == 1
