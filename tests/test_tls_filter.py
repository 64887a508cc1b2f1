"""The tls filter: mutual TLS with session certificates over memory pairs and loopback TCP."""
from __future__ import annotations

import dataclasses
import hashlib
import random
import ssl
import uuid

import gevent
import pytest
from gevent import socket as gsocket

from gridsock.components import tls
from gridsock.components.tls import TlsFilter, TlsStream
from gridsock.errors import AuthError, BrokenStreamError, ConfigError
from gridsock.session import Identity, client_context, create_session, new_node_key, server_context
from gridsock.stack import StackContext
from gridsock.streams import SocketStream, memory_pair
from gridsock.testing.streams import check_stream, run_concurrently, stream_over, tcp_pair

pytestmark = pytest.mark.timeout(120)

MiB = 1024 * 1024
PAIRS = {"memory": memory_pair, "tcp": tcp_pair}


# --- fixtures ------------------------------------------------------------------------------


def _node(session) -> Identity:
    key_pem, csr_pem = new_node_key()
    return Identity(session.certificate_authority().sign_node(csr_pem, str(uuid.uuid4())), key_pem)


@dataclasses.dataclass
class World:
    session: object
    a: Identity  # the initiator in most tests
    b: Identity  # the acceptor
    foreign_session: object
    foreign: Identity  # a node of another session (another CA)

    def ctx(self, identity, *, initiator, peer_id=None, session=None) -> StackContext:
        return StackContext(
            initiator=initiator,
            session=session or self.session,
            identity=identity,
            local_id=identity.node_id,
            peer_id=peer_id,
            peer_name=f"peer-of-{identity.node_id[:8]}",
        )

    def contexts(self):
        """(client, server) contexts: a dials b, expecting b; b accepts any node."""
        return (
            self.ctx(self.a, initiator=True, peer_id=self.b.node_id),
            self.ctx(self.b, initiator=False),
        )


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    session = create_session(tmp_path_factory.mktemp("session"), "127.0.0.1:7700")
    foreign_session = create_session(tmp_path_factory.mktemp("foreign"), "127.0.0.1:7700")
    return World(session, _node(session), _node(session), foreign_session, _node(foreign_session))


def _attempt(func):
    """Run func; return ("ok", result) or ("error", exception)."""
    try:
        return "ok", func()
    except Exception as exc:
        return "error", exc


def _wrap_both(lower_pair, client_ctx, server_ctx, flt=None):
    """Handshake both ends at once; returns two (outcome, value) pairs, (client, server)."""
    flt = flt or TlsFilter()
    lower_client, lower_server = lower_pair
    return run_concurrently(
        lambda: _attempt(lambda: flt.wrap(lower_client, context=client_ctx)),
        lambda: _attempt(lambda: flt.wrap(lower_server, context=server_ctx)),
    )


def _connected(world, make_pair, contexts=None):
    (c_outcome, client), (s_outcome, server) = _wrap_both(make_pair(), *(contexts or world.contexts()))
    assert (c_outcome, s_outcome) == ("ok", "ok"), (client, server)
    return client, server


def _receive_all(stream, max_bytes=100_000) -> bytes:
    out = bytearray()
    while True:
        chunk = stream.receive_some(max_bytes)
        if not chunk:
            return bytes(out)
        out += chunk


def _data(nbytes: int, seed: int) -> bytes:
    return random.Random(seed).getrandbits(8 * nbytes).to_bytes(nbytes, "little")


# --- handshake and data ----------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(PAIRS))
def test_handshake_identifies_both_ends(world, kind):
    client, server = _connected(world, PAIRS[kind])
    try:
        assert isinstance(client, TlsStream) and isinstance(server, TlsStream)
        assert client.peer.id == world.b.node_id and server.peer.id == world.a.node_id
        for stream, peer in ((client, world.b), (server, world.a)):
            assert stream.info["tls_version"] == "TLSv1.3"
            assert stream.info["cipher"].startswith("TLS_")
            assert stream.info["peer_id"] == peer.node_id
            assert stream.info["stack"] == ("memory" if kind == "memory" else "tcp")
    finally:
        client.close()
        server.close()


@pytest.mark.parametrize("kind", sorted(PAIRS))
def test_bulk_both_ways_concurrently(world, kind):
    client, server = _connected(world, PAIRS[kind])
    up, down = _data(8 * MiB, 1), _data(8 * MiB, 2)

    def send(stream, data, seed):
        rnd, view, pos = random.Random(seed), memoryview(data), 0
        while pos < len(data):
            size = rnd.choice((1, 700, 16 * 1024, 16 * 1024 + 1, 100_000, MiB))
            stream.send_all(view[pos : pos + size])
            pos += size
        stream.send_eof()

    def digest(stream):
        h = hashlib.sha256()
        while True:
            chunk = stream.receive_some(random.choice((1, 5000, 65536, 262144)))
            if not chunk:
                return h.hexdigest()
            h.update(chunk)

    try:
        _, _, at_server, at_client = run_concurrently(
            lambda: send(client, up, 1),
            lambda: send(server, down, 2),
            lambda: digest(server),
            lambda: digest(client),
        )
    finally:
        client.close()
        server.close()
    assert at_server == hashlib.sha256(up).hexdigest()
    assert at_client == hashlib.sha256(down).hexdigest()


@pytest.mark.parametrize("kind", sorted(PAIRS))
def test_half_close(world, kind):
    client, server = _connected(world, PAIRS[kind])
    request, reply = _data(300_000, 3), _data(500_000, 4)

    def client_side():
        client.send_all(request)
        client.send_eof()
        client.send_eof()  # harmless twice
        with pytest.raises(BrokenStreamError):
            client.send_all(b"x")
        got = _receive_all(client)
        assert client.receive_some(10) == b""
        return got

    def server_side():
        got = _receive_all(server)
        assert server.receive_some(10) == b"" and server.receive_some(10) == b""
        server.send_all(reply)  # the peer's EOF leaves this direction open
        server.send_eof()
        return got

    try:
        at_client, at_server = run_concurrently(client_side, server_side)
    finally:
        client.close()
        server.close()
    assert at_server == request and at_client == reply


def test_send_eof_before_reading_anything(world):
    """The client half-closes at once, before the server's session tickets are read, and
    with the server's data already waiting: both still reach it."""
    client, server = _connected(world, memory_pair)
    try:
        server.send_all(b"early")
        gevent.sleep(0.01)  # the early data sits, still encrypted, below the client
        client.send_eof()
        assert _receive_all(server) == b""
        server.send_all(b" and late")
        server.send_eof()
        assert _receive_all(client) == b"early and late"
    finally:
        client.close()
        server.close()


def test_tls_over_tls(world):
    inner_contexts = (
        world.ctx(world.b, initiator=True, peer_id=world.a.node_id),  # roles swapped inside
        world.ctx(world.a, initiator=False),
    )
    outer_client, outer_server = _connected(world, memory_pair)
    client, server = _connected(world, lambda: (outer_client, outer_server), inner_contexts)
    up, down = _data(2 * MiB, 5), _data(1 * MiB, 6)

    def side(stream, data):
        stream.send_all(data)
        stream.send_eof()
        return _receive_all(stream)

    try:
        assert client.peer.id == world.a.node_id and client.lower.peer.id == world.b.node_id
        at_client, at_server = run_concurrently(lambda: side(client, up), lambda: side(server, down))
    finally:
        client.close()
        server.close()
    assert (at_client, at_server) == (down, up)
    with pytest.raises(BrokenStreamError):
        outer_client.receive_some(1)  # closing the inner stream closed the outer one


@pytest.mark.parametrize("kind", sorted(PAIRS))
def test_check_stream(world, kind):
    timings = check_stream(lambda: stream_over(PAIRS[kind], "tls", world.contexts()))
    assert set(timings) >= {"bulk_both_ways", "half_close", "early_close_by_client"}


def test_check_stream_tls12(world, monkeypatch):
    """TLS 1.2 (never chosen by two gridsock nodes, but allowed by the session contexts) keeps
    the same stream semantics."""
    def tls12_context(session, identity, initiator):
        ctx = (client_context(session, identity) if initiator
               else server_context(session, identity, require_client_cert=True))
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
        ctx.options |= ssl.OP_NO_RENEGOTIATION
        return ctx

    monkeypatch.setattr(tls, "_ssl_context", tls12_context)
    client, server = _connected(world, memory_pair)
    assert client.info["tls_version"] == server.info["tls_version"] == "TLSv1.2"
    client.close()
    server.close()
    check_stream(lambda: stream_over(memory_pair, "tls", world.contexts()), bulk_bytes=2 * MiB,
                 large_write_bytes=2 * MiB, tiny_writes=1000, ping_pongs=50)


def test_contexts_are_cached(world):
    client_ctx = tls._ssl_context(world.session, world.a, True)
    assert tls._ssl_context(world.session, world.a, True) is client_ctx
    assert tls._ssl_context(world.session, world.a, False) is not client_ctx


# --- refusals --------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(PAIRS))
def test_wrong_peer_id_fails_on_the_initiator(world, kind):
    """A connection that reaches another node than the one expected (a NAT remapping a port)."""
    someone_else = str(uuid.uuid4())
    contexts = (
        world.ctx(world.a, initiator=True, peer_id=someone_else),
        world.ctx(world.b, initiator=False),
    )
    lower_client, lower_server = PAIRS[kind]()
    (c_outcome, c_value), (s_outcome, s_value) = _wrap_both((lower_client, lower_server), *contexts)
    assert c_outcome == "error" and type(c_value) is AuthError, c_value
    assert world.b.node_id in str(c_value) and someone_else in str(c_value)
    with pytest.raises(BrokenStreamError):
        lower_client.receive_some(1)  # closed by the failed wrap
    # The acceptor never gets a working stream: its wrap fails, or its first receive does.
    if s_outcome == "ok":
        with pytest.raises(BrokenStreamError):
            s_value.receive_some(10)
        s_value.close()
    else:
        assert isinstance(s_value, BrokenStreamError), s_value


def test_wrong_peer_id_fails_on_the_acceptor(world):
    """The acceptor's own expectation; under TLS 1.3 the initiator hears of it on receive."""
    contexts = (
        world.ctx(world.a, initiator=True),
        world.ctx(world.b, initiator=False, peer_id=str(uuid.uuid4())),
    )
    (c_outcome, c_value), (s_outcome, s_value) = _wrap_both(memory_pair(), *contexts)
    assert s_outcome == "error" and type(s_value) is AuthError, s_value
    if c_outcome == "ok":
        with pytest.raises(BrokenStreamError):
            c_value.receive_some(10)
        c_value.close()
    else:
        assert isinstance(c_value, BrokenStreamError), c_value


@pytest.mark.parametrize("foreign_side", ["initiator", "acceptor"])
@pytest.mark.parametrize("kind", sorted(PAIRS))
def test_certificate_of_another_session_fails_on_both_sides(world, kind, foreign_side):
    def foreign(initiator):
        return world.ctx(world.foreign, initiator=initiator, session=world.foreign_session)

    if foreign_side == "initiator":
        contexts = (foreign(True), world.ctx(world.b, initiator=False))
    else:
        contexts = (world.ctx(world.a, initiator=True), foreign(False))
    (c_outcome, c_value), (s_outcome, s_value) = _wrap_both(PAIRS[kind](), *contexts)
    assert (c_outcome, s_outcome) == ("error", "error")
    assert type(c_value) is AuthError and type(s_value) is AuthError, (c_value, s_value)
    assert isinstance(c_value.__cause__, ssl.SSLError)
    assert "certificate verify failed" in str(c_value)  # the client checks the server first


def test_client_without_certificate_is_refused(world):
    """A plain TLS client (trusts the session CA, presents no certificate)."""
    client_sock, server_stream = _tcp_socket_and_stream()
    server = gevent.spawn(_accept, world, server_stream)
    plain = client_context(world.session, None).wrap_socket(client_sock)  # handshake done here
    try:
        # TLS 1.3: the client's handshake completes; the refusal is an alert on its first read.
        with pytest.raises((ssl.SSLError, ConnectionError)):
            if plain.recv(10) == b"":
                raise ConnectionResetError("EOF")
    finally:
        plain.close()
    outcome, value = server.get()
    assert outcome == "error" and type(value) is AuthError, value


def test_peer_that_does_not_speak_tls_is_refused(world):
    client_stream, server_stream = memory_pair()
    server = gevent.spawn(_accept, world, server_stream)
    client_stream.send_all(b"GET / HTTP/1.0\r\n\r\n")
    outcome, value = server.get()
    assert outcome == "error" and type(value) is AuthError, value
    client_stream.close()


def test_rendezvous_certificate_is_not_a_node(world):
    rendezvous = world.session.rendezvous_identity()
    contexts = (world.ctx(world.a, initiator=True), world.ctx(rendezvous, initiator=False))
    (c_outcome, c_value), (s_outcome, s_value) = _wrap_both(memory_pair(), *contexts)
    assert c_outcome == "error" and type(c_value) is AuthError and "rendezvous" in str(c_value)
    if s_outcome == "ok":
        s_value.close()


def test_no_session_is_a_config_error(world):
    lower_client, lower_server = memory_pair()
    with pytest.raises(ConfigError):
        TlsFilter().wrap(lower_client, context=StackContext(initiator=True))
    with pytest.raises(BrokenStreamError):
        lower_client.send_all(b"x")  # closed
    lower_server.close()
    with pytest.raises(ConfigError):
        TlsFilter(version="1.3")


# --- broken and truncated lower streams -----------------------------------------------------


@pytest.mark.parametrize("how", ["close", "eof"])
@pytest.mark.parametrize("kind", sorted(PAIRS))
def test_truncated_lower_stream(world, kind, how):
    """The lower stream ends without close_notify: truncation, not EOF."""
    client, server = _connected(world, PAIRS[kind])
    try:
        server.send_all(b"partial answer")
        if how == "close":
            server.close()  # an abort: no close_notify
        else:
            server.lower.send_eof()  # a FIN without close_notify (an attacker could forge it)
        got = bytearray()
        # close() without send_eof() is an abort below too (a TCP reset, a broken memory
        # stream); a FIN without close_notify is a truncation: all break the TLS stream.
        with pytest.raises(BrokenStreamError, match="truncated|reset|without EOF"):
            while True:
                chunk = client.receive_some(100)
                assert chunk, "truncation read as EOF"
                got += chunk
        assert got == b"partial answer"
        with pytest.raises(BrokenStreamError):
            client.receive_some(100)  # and it stays broken
    finally:
        client.close()
        server.close()


def test_forged_record_breaks_the_stream_and_alerts_the_peer(world):
    client, server = _connected(world, memory_pair)
    try:
        server.lower.send_all(b"\x17\x03\x03\x00\x20" + bytes(32))  # application data, bad MAC
        with pytest.raises(BrokenStreamError) as info:
            client.receive_some(10)
        assert isinstance(info.value.__cause__, ssl.SSLError)
        with pytest.raises(BrokenStreamError):
            client.receive_some(10)  # it stays broken
        with pytest.raises(BrokenStreamError, match="(?i)alert"):
            server.receive_some(10)  # the client's receiver sent an alert
    finally:
        client.close()
        server.close()


def test_lower_stream_ends_during_handshake(world):
    lower_client, lower_server = memory_pair()

    def hang_up():
        lower_server.receive_some()  # the ClientHello
        lower_server.close()

    hanger = gevent.spawn(hang_up)
    with pytest.raises(BrokenStreamError) as info:
        TlsFilter().wrap(lower_client, context=world.contexts()[0])
    assert not isinstance(info.value, AuthError)
    hanger.get()


def test_handshake_timeout(world):
    lower_client, lower_server = memory_pair()
    flt = TlsFilter()
    flt.handshake_timeout_s = 0.2
    with pytest.raises(BrokenStreamError, match="timed out"):
        flt.wrap(lower_client, context=world.contexts()[0])  # the server never answers
    with pytest.raises(BrokenStreamError):
        lower_client.receive_some(1)  # closed
    lower_server.close()


def test_close_is_an_abort_and_idempotent(world):
    client, server = _connected(world, memory_pair)
    client.close()
    client.close()
    client.send_eof()  # harmless after close
    for call in (lambda: client.send_all(b"x"), lambda: client.receive_some(1)):
        with pytest.raises(BrokenStreamError):
            call()
    with pytest.raises(BrokenStreamError):
        server.receive_some(1)
    server.close()


def test_close_unblocks_a_receiver(world):
    client, server = _connected(world, tcp_pair)
    receiver = gevent.spawn(_attempt, lambda: server.receive_some(10))
    gevent.sleep(0.01)
    server.close()
    outcome, value = receiver.get(timeout=5)
    assert outcome == "error" and isinstance(value, BrokenStreamError)
    client.close()


# --- helpers ---------------------------------------------------------------------------------


def _accept(world, lower):
    """Accept a TLS connection over ``lower`` as node b; returns an _attempt outcome."""
    return _attempt(lambda: TlsFilter().wrap(lower, context=world.ctx(world.b, initiator=False)))


def _tcp_socket_and_stream():
    """A connected (gevent socket, SocketStream) pair over loopback TCP."""
    listener = gsocket.socket()
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        client = gsocket.create_connection(listener.getsockname())
        server, _ = listener.accept()
    finally:
        listener.close()
    return client, SocketStream(server, info={"stack": "tcp"})


@pytest.mark.parametrize("kind", sorted(PAIRS))
def test_a_refused_client_certificate_fails_the_initiator_at_connect_time(world, kind):
    # The initiator trusts the server (same session CA) but presents another CA's certificate.
    # Under TLS 1.3 its handshake completes before the server's check: wrap() must still fail,
    # with the server's refusal, rather than hand out a stream that breaks at the first read.
    contexts = (world.ctx(world.foreign, initiator=True), world.ctx(world.b, initiator=False))
    (c_outcome, c_value), (s_outcome, s_value) = _wrap_both(PAIRS[kind](), *contexts)
    assert (c_outcome, s_outcome) == ("error", "error"), (c_value, s_value)
    assert type(c_value) is AuthError and "refused" in str(c_value), c_value
    assert type(s_value) is AuthError, s_value
