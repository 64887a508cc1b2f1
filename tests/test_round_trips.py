"""Round trips a connect waits for, counted rather than timed.

- The ``tls`` filter: a client whose certificate the session's CA issued (the common case)
  waits for one round trip (the server's flight), not for the session ticket after it; a
  client with another certificate still waits for the server's verdict (a second round trip),
  so a refusal fails its ``wrap``.
- ``tls`` resumption: an initiator offers the ticket a server node gave it on its next
  connection to that node, and only to it: one round trip, no certificate work, the identity
  checks unchanged (a connection that lands on another node is a full handshake and refused;
  a peer whose certificate expired since is refused; a restarted server makes a full handshake).
- First contact: the assembly request takes the bootstrap channel at once while the meta link
  opens beside it (``MetaChannel.counters``); the next request takes the link.
- ``reverse``: the server's connection back, which carries the token, is its acceptance: a
  client that heard from that server that it dials back directly completes on it without
  waiting for the answer (held back here until the connection is in use); a first connection
  waits for the answer, and a refusal still comes as the answer.

A round trip is counted on the client's lower stream each time it waits to receive after it
has sent (:class:`TurnCounter`): however the peer's flight is cut into reads, one turn of the
conversation counts once.
"""
from __future__ import annotations

import contextlib
import dataclasses
import uuid
from typing import Any, Dict

import pytest

from gridsock.components.tls import TlsFilter
from gridsock.errors import AuthError
from gridsock.session import Identity, create_session, new_node_key
from gridsock.stack import StackContext
from gridsock.streams import Stream, memory_pair
from gridsock.testing.grid import JOIN_TIMEOUT_S, loopback_grid
from gridsock.testing.streams import run_concurrently

pytestmark = pytest.mark.timeout(120)

PORT = 5000


class TurnCounter(Stream):
    """A stream that passes everything to ``lower`` and counts the round trips its user waits
    for: a ``receive_some`` that follows a ``send_all`` starts one."""

    def __init__(self, lower: Stream) -> None:
        self.lower = lower
        self.info: Dict[str, Any] = dict(getattr(lower, "info", {}))
        self.round_trips = 0
        self._sent = False

    def send_all(self, data) -> None:
        self._sent = True
        self.lower.send_all(data)

    def receive_some(self, max_bytes: int = 65536) -> bytes:
        if self._sent:
            self.round_trips += 1
            self._sent = False
        return self.lower.receive_some(max_bytes)

    def send_eof(self) -> None:
        self.lower.send_eof()

    def close(self) -> None:
        self.lower.close()


def _node(session) -> Identity:
    key_pem, csr_pem = new_node_key()
    return Identity(session.certificate_authority().sign_node(csr_pem, str(uuid.uuid4())), key_pem)


@dataclasses.dataclass
class World:
    session: Any
    a: Identity
    b: Identity
    foreign: Identity  # a node of another session (another CA)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    session = create_session(tmp_path_factory.mktemp("session"), "127.0.0.1:7700")
    foreign_session = create_session(tmp_path_factory.mktemp("foreign"), "127.0.0.1:7700")
    return World(session, _node(session), _node(session), _node(foreign_session))


def _ctx(world: World, identity: Identity, *, initiator: bool, peer_id=None) -> StackContext:
    return StackContext(initiator=initiator, session=world.session, identity=identity, local_id=identity.node_id,
                        peer_id=peer_id, peer_name="peer")


def _wraps(client_ctx: StackContext, server_ctx: StackContext):
    """Both ends' ``tls`` wraps at once over a memory pair, the client's lower stream counted:
    ``(round_trips, client, server)``, each end ``("ok", stream)`` or ``("error", exception)``."""
    lower_client, lower_server = memory_pair()
    counted = TurnCounter(lower_client)

    def attempt(fn):
        try:
            return "ok", fn()
        except Exception as exc:
            return "error", exc

    client, server = run_concurrently(
        lambda: attempt(lambda: TlsFilter().wrap(counted, context=client_ctx)),
        lambda: attempt(lambda: TlsFilter().wrap(lower_server, context=server_ctx)),
    )
    return counted.round_trips, client, server


def _handshake(world: World, client_identity: Identity):
    return _wraps(_ctx(world, client_identity, initiator=True, peer_id=world.b.node_id),
                  _ctx(world, world.b, initiator=False))


def test_tls_costs_one_round_trip_for_a_client_of_the_session(world):
    round_trips, (c_outcome, client), (s_outcome, server) = _handshake(world, world.a)
    assert (c_outcome, s_outcome) == ("ok", "ok"), (client, server)
    try:
        assert round_trips == 1
        client.send_all(b"ping")  # and the connection works both ways
        assert server.receive_some(10) == b"ping"
        server.send_all(b"pong")
        assert client.receive_some(10) == b"pong"
    finally:
        client.close()
        server.close()


def _early_pair(world: World, client_identity: Identity, server_identity: Identity, expected_id: str, *,
                taken: bool = True):
    """The early handshake (``tls`` begun with the assembly): the client's hello to the server
    as a request would carry it, the server's flight back as an answer would (or no flight:
    ``taken`` False, a server that predates it), then both wraps over a memory pair, the
    client's lower stream counted: ``(round_trips, client, server)`` as :func:`_wrap_pair`."""
    client_ctx = _ctx(world, client_identity, initiator=True, peer_id=expected_id)
    server_ctx = _ctx(world, server_identity, initiator=False)
    begun = TlsFilter.begin(client_ctx)
    assert begun.hello.startswith(b"\x16\x03")  # a TLS handshake record: the ClientHello
    if taken:
        answer = TlsFilter.answer_early(server_ctx, begun.hello)
        begun.answered(answer.flight)
        server_ctx = dataclasses.replace(server_ctx, tls_early=answer)
    else:
        begun.answered(None)
    return _wraps(dataclasses.replace(client_ctx, tls_early=begun), server_ctx)


def test_tls_begun_with_the_assembly_costs_the_connection_no_round_trip(world):
    client_identity, server_identity = _fresh_pair(world)
    round_trips, (c_outcome, client), (s_outcome, server) = _early_pair(world, client_identity, server_identity,
                                                                          server_identity.node_id)
    assert (c_outcome, s_outcome) == ("ok", "ok"), (client, server)
    assert round_trips == 0  # the server's flight came with the answer: nothing awaited on the connection
    assert client.peer.id == server_identity.node_id and server.peer.id == client_identity.node_id
    assert not client.info["tls_resumed"]
    _talk(client, server)  # (the client keeps the server's ticket, read with the answer)
    round_trips, (c_outcome, client), (s_outcome, server) = _early_pair(world, client_identity, server_identity,
                                                                          server_identity.node_id)
    assert (c_outcome, s_outcome) == ("ok", "ok"), (client, server)
    assert round_trips == 0 and client.info["tls_resumed"] and server.info["tls_resumed"]
    _talk(client, server)


def test_tls_hello_a_server_did_not_take_goes_over_the_connection(world):
    client_identity, server_identity = _fresh_pair(world)
    round_trips, (c_outcome, client), (s_outcome, server) = _early_pair(world, client_identity, server_identity,
                                                                          server_identity.node_id, taken=False)
    assert (c_outcome, s_outcome) == ("ok", "ok"), (client, server)
    assert round_trips == 1  # as a handshake that began on the connection
    _talk(client, server)


def test_tls_begun_with_the_assembly_still_checks_both_identities(world):
    # The connection reached another node than the one asked for (a NAT's doing): refused.
    client_identity, server_identity = _fresh_pair(world)
    _, (c_outcome, client), (s_outcome, server) = _early_pair(world, client_identity, server_identity,
                                                              world.a.node_id)
    assert c_outcome == "error" and isinstance(client, AuthError) and "not the expected node" in str(client)
    # A client of another CA: the server's flight is made, but the client's certificate is
    # refused when it comes over the connection, and the client learns it at wrap.
    _, (c_outcome, client), (s_outcome, server) = _early_pair(world, world.foreign, world.b, world.b.node_id)
    assert (c_outcome, s_outcome) == ("error", "error"), (client, server)
    assert isinstance(server, AuthError) and isinstance(client, AuthError)


def test_tls_hello_that_is_not_tls_is_refused_with_its_reason(world):
    with pytest.raises(AuthError, match="ClientHello refused"):
        TlsFilter.answer_early(_ctx(world, world.b, initiator=False), b"GET / HTTP/1.1\r\n\r\n")
    hello = TlsFilter.begin(_ctx(world, world.a, initiator=True, peer_id=world.b.node_id)).hello
    with pytest.raises(AuthError, match="incomplete"):
        TlsFilter.answer_early(_ctx(world, world.b, initiator=False), hello[: len(hello) // 2])


def _wrap_pair(world: World, client_identity: Identity, server_identity: Identity, expected_id: str):
    """Both ends' handshakes at once over a memory pair (:func:`_wraps`)."""
    return _wraps(_ctx(world, client_identity, initiator=True, peer_id=expected_id),
                  _ctx(world, server_identity, initiator=False))


def _talk(client, server) -> None:
    """A request and its answer (the client reads the server's ticket with the answer); close."""
    try:
        client.send_all(b"ping")
        assert server.receive_some(10) == b"ping"
        server.send_all(b"pong")
        assert client.receive_some(10) == b"pong"
    finally:
        client.close()
        server.close()


def _fresh_pair(world: World):
    """Two new nodes of the session, (client, server), that have never met."""
    return _node(world.session), _node(world.session)


def test_tls_resumes_with_the_ticket_of_the_same_node_in_one_round_trip(world):
    a, b = _fresh_pair(world)
    _, (_, client), (_, server) = _wrap_pair(world, a, b, b.node_id)
    assert not client.info["tls_resumed"] and not server.info["tls_resumed"]
    _talk(client, server)
    round_trips, (c_outcome, client), (s_outcome, server) = _wrap_pair(world, a, b, b.node_id)
    assert (c_outcome, s_outcome) == ("ok", "ok"), (client, server)
    assert client.info["tls_resumed"] and server.info["tls_resumed"]
    assert round_trips == 1
    assert (client.peer.id, server.peer.id) == (b.node_id, a.node_id)  # the identities, as in full
    _talk(client, server)


def test_tls_ticket_for_a_node_reaching_another_is_a_full_handshake_and_refused(world):
    a, b = _fresh_pair(world)
    other = _node(world.session)
    _, (_, client), (_, server) = _wrap_pair(world, a, b, b.node_id)
    _talk(client, server)
    # A NAT sends the next connection for b to another node: it cannot read b's ticket.
    _, (c_outcome, client), (s_outcome, server) = _wrap_pair(world, a, other, b.node_id)
    assert c_outcome == "error" and type(client) is AuthError and "not the expected node" in str(client)
    if s_outcome == "ok":
        assert not server.info["tls_resumed"]
        server.close()
    # b's ticket is still b's: the next connection that reaches b resumes.
    _, (_, client), (_, server) = _wrap_pair(world, a, b, b.node_id)
    assert client.info["tls_resumed"] and server.info["tls_resumed"]
    _talk(client, server)


def test_tls_resumed_peer_whose_certificate_expired_since_is_refused(world, monkeypatch):
    from datetime import timedelta

    from gridsock.components import tls

    a, b = _fresh_pair(world)
    _, (_, client), (_, server) = _wrap_pair(world, a, b, b.node_id)
    _talk(client, server)
    expired = (min(a.not_valid_after, b.not_valid_after) + timedelta(seconds=1)).timestamp()
    monkeypatch.setattr(tls, "_now", lambda: expired)
    _, (c_outcome, client), (s_outcome, server) = _wrap_pair(world, a, b, b.node_id)
    assert (c_outcome, s_outcome) == ("error", "error"), (client, server)
    assert type(server) is AuthError and "expired" in str(server)


def test_tls_server_that_lost_its_ticket_keys_makes_a_full_handshake(world):
    from gridsock.components import tls

    a, b = _fresh_pair(world)
    _, (_, client), (_, server) = _wrap_pair(world, a, b, b.node_id)
    _talk(client, server)
    tls._contexts.pop(b)  # b restarted: a new server context, new ticket keys
    round_trips, (c_outcome, client), (s_outcome, server) = _wrap_pair(world, a, b, b.node_id)
    assert (c_outcome, s_outcome) == ("ok", "ok"), (client, server)
    assert not client.info["tls_resumed"] and not server.info["tls_resumed"] and round_trips == 1
    _talk(client, server)


def test_tls_client_of_another_ca_waits_for_the_verdict_and_fails_at_wrap(world):
    round_trips, (c_outcome, client), (s_outcome, server) = _handshake(world, world.foreign)
    assert (c_outcome, s_outcome) == ("error", "error"), (client, server)
    assert type(client) is AuthError and "refused" in str(client)
    assert round_trips == 2


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    with loopback_grid(tmp_path_factory.mktemp("rt")) as running:
        listeners = {name: node.listen(PORT) for name, node in running.nodes.items()}
        yield running.nodes, listeners


def _exchange(client, server) -> None:
    """A byte each way (nothing before them on either side), then both ends closed."""
    client.send_all(b"x")
    assert server.receive_some(1) == b"x"
    server.send_all(b"y")
    assert client.receive_some(1) == b"y"
    client.close()
    server.close()


def _connect(nodes, listeners, src: str, dst: str, stack: str) -> None:
    client, _ = nodes[src].open_stream(dst, PORT, stack=stack)
    server, _ = listeners[dst].accept_stream(timeout=JOIN_TIMEOUT_S)
    _exchange(client, server)


def test_first_contact_does_not_wait_for_the_meta_link(grid):
    nodes, listeners = grid
    m1, peer = nodes["m1"], nodes["L2"]
    assert peer.node_id not in m1.meta.links
    before = dict(m1.meta.counters)
    _connect(nodes, listeners, "m1", "L2", "tls/tcp")
    after = dict(m1.meta.counters)
    assert (after["on_bootstrap"] - before["on_bootstrap"], after["on_link"] - before["on_link"]) == (1, 0)
    link = m1.meta.link_for(peer.node_id)  # the link opened beside the request: wait for it
    assert link is not None and not link.closed
    _connect(nodes, listeners, "m1", "L2", "tls/tcp")
    later = dict(m1.meta.counters)
    assert (later["on_bootstrap"] - after["on_bootstrap"], later["on_link"] - after["on_link"]) == (0, 1)
    assert later["opened"] - before["opened"] == 1


def _captured_assembly(node):
    """Record the assembly requests ``node`` is sent and its answers: ``(seen, restore)``,
    ``seen`` a list of (request, answer) decoded."""
    from gridsock import wire
    from gridsock.assembly import ASSEMBLE_TOPIC

    seen = []
    real = node.router.handlers[ASSEMBLE_TOPIC]

    def captured(delivery):
        reply = real(delivery)
        seen.append((wire.decode_assembly(delivery.payload), wire.decode_assembly(reply)))
        return reply

    node.router.handlers[ASSEMBLE_TOPIC] = captured
    return seen, lambda: node.router.handlers.__setitem__(ASSEMBLE_TOPIC, real)


@pytest.mark.parametrize("stack, flight", [("tls/tcp", "answer"), ("lz4/tls/tcp", "answer"),
                                           ("tls/reverse", "connection"), ("tcp", None), ("tls/lz4/tcp", None)])
def test_tls_right_above_the_method_travels_with_the_assembly(grid, stack, flight):
    nodes, listeners = grid
    seen, restore = _captured_assembly(nodes["m1"])
    try:
        _connect(nodes, listeners, "L1", "m1", stack)
    finally:
        restore()
    ((request, answer),) = seen
    if flight is None:  # no tls right above the method: a plain request and answer
        assert request.tls_hello is None and answer.tls_flight is None and answer.tls_flight_follows is None
        return
    assert request.tls_hello is not None and request.tls_hello_bytes.startswith(b"\x16\x03")
    if flight == "connection":  # the server makes the connection: its flight is on it, behind the preamble
        assert answer.tls_flight is None and answer.tls_flight_follows is True
    else:
        assert answer.tls_flight_bytes.startswith(b"\x16\x03") and answer.tls_flight_follows is None


def test_a_server_that_predates_the_tls_hello_still_connects(grid):
    """A server that ignores ``tls_hello`` (an older node: unknown fields are ignored) answers
    without a flight; the client sends its hello over the connection."""
    import json

    from gridsock import wire
    from gridsock.assembly import ASSEMBLE_TOPIC

    nodes, listeners = grid
    node = nodes["m2"]
    real = node.router.handlers[ASSEMBLE_TOPIC]
    stripped = []

    def older(delivery):
        request = wire.decode_assembly(delivery.payload)
        if request.tls_hello is not None:
            stripped.append(request)
            header = request.header()
            del header["tls_hello"]
            assert "tls_hello" not in json.dumps(header)
            request = dataclasses.replace(request, tls_hello=None)
            delivery = dataclasses.replace(delivery, payload=wire.encode_assembly(request))
        return real(delivery)

    node.router.handlers[ASSEMBLE_TOPIC] = older
    try:
        _connect(nodes, listeners, "L1", "m2", "tls/tcp")
    finally:
        node.router.handlers[ASSEMBLE_TOPIC] = real
    assert len(stripped) == 1


def test_a_tls_hello_for_a_stack_without_tls_is_refused(grid):
    """A request whose hello does not go with its stack (no ``tls`` right above the method) is
    refused ``bad-request``, and the node serves the next request."""
    import base64
    import secrets

    from gridsock import wire
    from gridsock.assembly import ASSEMBLE_TOPIC

    nodes, listeners = grid
    request = wire.AssemblyRequest(port=PORT, stack="tcp", token=secrets.token_hex(wire.TOKEN_BYTES),
                                   tls_hello=base64.b64encode(b"\x16\x03\x01hello").decode())
    reply = nodes["L1"].meta_request(nodes["m1"].node_id, ASSEMBLE_TOPIC, wire.encode_assembly(request),
                                     timeout=JOIN_TIMEOUT_S)
    answer = wire.decode_assembly(reply.payload)
    assert isinstance(answer, wire.AssemblyRefuse) and answer.code == "bad-request"
    _connect(nodes, listeners, "L1", "m1", "tls/tcp")


def _hold_answers(node):
    """Make ``node`` hold back its answers to assembly requests (after it did the work: for
    ``reverse``, its connection back is made) until the returned event is set; returns
    ``(release, worked, answered, restore)``: ``worked`` is set once an answer is held back,
    ``answered`` lists the answers given."""
    import gevent.event

    from gridsock.assembly import ASSEMBLE_TOPIC

    release, worked = gevent.event.Event(), gevent.event.Event()
    answered = []
    real = node.router.handlers[ASSEMBLE_TOPIC]

    def held(delivery):
        reply = real(delivery)
        worked.set()
        release.wait(JOIN_TIMEOUT_S)  # (bounded: the test sets it at its end whatever happens)
        answered.append(reply)
        return reply

    node.router.handlers[ASSEMBLE_TOPIC] = held
    return release, worked, answered, lambda: node.router.handlers.__setitem__(ASSEMBLE_TOPIC, real)


# A client that would complete on the connection back has it well within this after the server
# made it (a loopback connection and a preamble): the bound of a wait for what must not happen.
EARLY_COMPLETION_BOUND_S = 2.0


@pytest.mark.parametrize("stack", ["reverse", "tls/reverse"])
def test_reverse_completes_on_the_connection_back_without_the_answer(grid, stack):
    # With tls/reverse, the server's first TLS flight is on that connection too.
    nodes, listeners = grid
    _connect(nodes, listeners, "L1", "m1", stack)  # m1's answer: it dials L1 back directly (the flight follows)
    release, _, answered, restore = _hold_answers(nodes["m1"])  # m1 dials L1 back, and does not answer
    try:
        client, info = nodes["L1"].open_stream("m1", PORT, stack=stack)
        server, _ = listeners["m1"].accept_stream(timeout=JOIN_TIMEOUT_S)
        try:
            assert info.stack == stack and not answered  # connected, the answer still held back
            if stack.startswith("tls/"):
                assert client.peer.id == nodes["m1"].node_id
            client.send_all(b"x")
            assert server.receive_some(1) == b"x"
            server.send_all(b"y")
            assert client.receive_some(1) == b"y"
        finally:
            client.close()
            server.close()
    finally:
        release.set()
        restore()


def test_reverse_first_connection_waits_for_the_answer(grid):
    import gevent

    nodes, listeners = grid
    release, worked, answered, restore = _hold_answers(nodes["L2"])  # m2 has not connected to L2 by reverse
    attempt = gevent.spawn(nodes["m2"].open_stream, "L2", PORT, stack="reverse")
    try:
        assert worked.wait(JOIN_TIMEOUT_S)  # L2's connection back is made; its answer is held back
        attempt.join(timeout=EARLY_COMPLETION_BOUND_S)
        assert not attempt.ready()  # the client waits for L2's answer (which says how it dialed)
        release.set()
        client, info = attempt.get(timeout=JOIN_TIMEOUT_S)
        server, _ = listeners["L2"].accept_stream(timeout=JOIN_TIMEOUT_S)
        assert info.stack == "reverse" and answered
        client.send_all(b"x")
        assert server.receive_some(1) == b"x"
        client.close()
        server.close()
    finally:
        release.set()
        attempt.kill()
        restore()


def test_reverse_refusal_still_fails_the_connect(grid):
    from gridsock.errors import ConnectError

    nodes, _ = grid
    with pytest.raises(ConnectError) as caught:
        nodes["L1"].open_stream("m1", PORT + 1, stack="reverse")  # nothing listens there
    assert caught.value.code == "refused"


# --- the nomination of a lone candidate -------------------------------------------------------


@contextlib.contextmanager
def _connect_held(nodes, src: str, dst: str, stack):
    """``src`` connects to ``dst`` over ``stack`` in a greenlet while ``dst`` holds back its
    answer (see :func:`_hold_answers`); yields ``(attempt, release, worked, answered)``."""
    import gevent

    release, worked, answered, restore = _hold_answers(nodes[dst])
    attempt = gevent.spawn(nodes[src].open_stream, dst, PORT, stack=stack)
    try:
        yield attempt, release, worked, answered
    finally:
        release.set()
        attempt.kill()
        restore()


def test_a_lone_candidate_is_nominated_with_its_preamble(grid):
    # A stack the caller named is the connect's only candidate: its connection says it is the
    # one in its first packet, so the server delivers it without waiting for anything more.
    nodes, listeners = grid
    with _connect_held(nodes, "L1", "m1", "tcp") as (attempt, release, worked, answered):
        server, _ = listeners["m1"].accept_stream(timeout=JOIN_TIMEOUT_S)
        assert worked.is_set() and not answered and not attempt.ready()  # delivered, the answer held back
        release.set()
        client, info = attempt.get(timeout=JOIN_TIMEOUT_S)
        assert info.stack == "tcp"
        _exchange(client, server)  # (one nomination byte: nothing more before the data)


def test_raced_candidates_are_nominated_only_after_the_answer(grid):
    nodes, listeners = grid
    with _connect_held(nodes, "L2", "m2", ["tcp", "relay"]) as (attempt, release, worked, _):
        assert worked.wait(JOIN_TIMEOUT_S)
        with pytest.raises(Exception):  # nothing is delivered while the client has not chosen
            listeners["m2"].accept_stream(timeout=EARLY_COMPLETION_BOUND_S)
        release.set()
        client, info = attempt.get(timeout=JOIN_TIMEOUT_S)
        server, _ = listeners["m2"].accept_stream(timeout=JOIN_TIMEOUT_S)
        _exchange(client, server)


def test_a_callers_own_timeout_around_a_lone_candidate_stays_the_callers(grid):
    # The lone candidate runs in the caller's greenlet: a gevent.Timeout of the caller's is
    # not turned into the connect's ConnectTimeoutError, and what the attempt made is closed.
    import gevent

    nodes, listeners = grid
    release, worked, _, restore = _hold_answers(nodes["m2"])
    mine = gevent.Timeout(1.0)
    try:
        with pytest.raises(gevent.Timeout) as caught:
            with mine:
                nodes["L1"].open_stream("m2", PORT, stack="tcp")
        assert caught.value is mine and worked.is_set()
    finally:
        release.set()
        restore()
    # Nominated with its preamble, the connection was delivered; the abort reset it, so the
    # server's program reads a break, not an end.
    from gridsock.errors import BrokenStreamError

    phantom, _ = listeners["m2"].accept_stream(timeout=JOIN_TIMEOUT_S)
    with pytest.raises(BrokenStreamError):
        phantom.receive_some(1)
    phantom.close()
    _connect(nodes, listeners, "L1", "m2", "tcp")  # unharmed: the next connect works


# --- an SSH gateway's transport, kept ahead of need ------------------------------------------


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    from test_sshtunnel import Sshd

    server = Sshd(tmp_path_factory.mktemp("sshd"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def ssh_gateway(sshd, tmp_path, monkeypatch):
    import getpass

    from gridsock.bootstrap import sshtunnel

    monkeypatch.setattr(sshtunnel, "SSH_KEEPER_CHECK_S", 0.02)  # (time injected: no test waits seconds)
    yield sshtunnel.SSHGateway("127.0.0.1", sshd.port, user=getpass.getuser(), key_filename=str(sshd.client_key),
                               known_hosts=sshd.known_hosts(tmp_path / "known_hosts"))
    sshtunnel.close_all_transports()


@pytest.fixture
def echo_port():
    import gevent.server

    from test_sshtunnel import echo_handler

    server = gevent.server.StreamServer(("127.0.0.1", 0), echo_handler)
    server.start()
    yield server.server_port
    server.stop(timeout=5)


def _until(condition, limit: int = 500) -> bool:
    """Wait (bounded: ``limit`` polls of 10 ms) until ``condition()`` holds."""
    import gevent

    for _ in range(limit):
        if condition():
            return True
        gevent.sleep(0.01)
    return bool(condition())


def _echo_once(gateway, port: int) -> None:
    from gridsock.bootstrap.sshtunnel import open_ssh_tunnel

    with open_ssh_tunnel(gateway, "127.0.0.1", port) as sock:
        sock.sendall(b"x")
        assert sock.recv(1) == b"x"


def test_a_used_gateway_transport_is_dialed_again_ahead_of_need(ssh_gateway, echo_port):
    from gridsock.bootstrap import sshtunnel

    _echo_once(ssh_gateway, echo_port)
    first = sshtunnel._TRANSPORTS[ssh_gateway]
    redialed = sshtunnel.KEEPER_COUNTERS["redialed"]
    first.close()  # the gateway dropped it (a NAT timeout, sshd restarted...)
    assert _until(lambda: sshtunnel.KEEPER_COUNTERS["redialed"] > redialed)
    kept = sshtunnel._TRANSPORTS[ssh_gateway]
    assert kept is not first and kept.is_active()
    _echo_once(ssh_gateway, echo_port)  # the next connection rides the transport kept for it
    assert sshtunnel._TRANSPORTS[ssh_gateway] is kept


def test_an_idle_gateway_transport_is_closed(ssh_gateway, echo_port, monkeypatch):
    from gridsock.bootstrap import sshtunnel

    _echo_once(ssh_gateway, echo_port)
    transport = sshtunnel._TRANSPORTS[ssh_gateway]
    closed = sshtunnel.KEEPER_COUNTERS["closed_idle"]
    monkeypatch.setattr(sshtunnel, "SSH_IDLE_CLOSE_S", 0.0)
    assert _until(lambda: sshtunnel.KEEPER_COUNTERS["closed_idle"] > closed)
    assert ssh_gateway not in sshtunnel._TRANSPORTS
    assert _until(lambda: not transport.is_active())
