"""The bootstrap channel end to end: a real grid on loopback, in this process, under gevent.

The grid: a rendez-vous node; leader L1 (cluster A, TCP node port) with members m1 (TCP node
port) and m2 (Unix socket node port); leader L2 (cluster B, Unix socket node port) with member
m3, which reaches it over that Unix socket; s, a node with no cluster (its own leader). It runs
over TLS and over plain TCP. Every wait is an event (``wait_joined``, ``wait_directory``, a
directory change, a log record, a closed socket), never a sleep.
"""
from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import random
import ssl
import struct
import time
import types
import uuid

import gevent
import gevent.event
import pytest
from gevent import socket as gsocket

from gridsock import wire
from gridsock.bootstrap.control import call as control_call
from gridsock.bootstrap.directory import Directory
from gridsock.bootstrap.link import LINK_TIMEOUT_S, PING_INTERVAL_S, read_message, send_message
from gridsock.bootstrap.rendezvous import LEAVE_BOUND_S, RendezvousNode
from gridsock.bootstrap.routing import Router
from gridsock.bootstrap.transport import dial, parse_address, tls_client
from gridsock.bootstrap.uplink import RECONNECT_INITIAL_S, backoff_delays
from gridsock.errors import AuthError, GridsockError, RoutingError
from gridsock.node import RECONNECT_MAX_S, Node
from gridsock.session import CertificateAuthority, Identity, client_context, create_session, new_node_key

pytestmark = pytest.mark.timeout(60)

# Joining takes milliseconds on loopback; these bounds only stop a broken grid from hanging.
JOIN_TIMEOUT_S = 10.0
CONVERGE_TIMEOUT_S = 10.0
# A peer that must drop a connection (garbage, refusal) does it within this long.
CLOSE_TIMEOUT_S = 5.0
# A routed request over loopback answers within this long.
ANSWER_TIMEOUT_S = 5.0

NODES = ("L1", "m1", "m2", "L2", "m3", "s")
PARENT = {"L1": "rendezvous", "m1": "L1", "m2": "L1", "L2": "rendezvous", "m3": "L2", "s": "rendezvous"}
CLUSTER = {"L1": "A", "m1": "A", "m2": "A", "L2": "B", "m3": "B", "s": None}


def tree_route(src: str, dst: str) -> tuple:
    """The names a message from ``src`` to ``dst`` goes through in the tree, both ends included."""

    def up(name):
        chain = [name]
        while chain[-1] != "rendezvous":
            chain.append(PARENT[chain[-1]])
        return chain

    a, b = up(src), up(dst)
    common = next(n for n in a if n in b)
    return tuple(a[: a.index(common) + 1] + b[: b.index(common)][::-1])


def members_of(leader: str) -> list:
    return [n for n, p in PARENT.items() if p == leader]


def wait_names(directory, *, present=(), absent=(), timeout: float = CONVERGE_TIMEOUT_S) -> set:
    """Wait until ``directory`` (a Directory) names all of ``present`` and none of ``absent``."""
    deadline = time.monotonic() + timeout
    while True:
        names = {e.name for e in directory}
        if names >= set(present) and not names & set(absent):
            return names
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"after {timeout} s the directory holds {sorted(names)}; "
                                 f"wanted {sorted(present)} present, {sorted(absent)} absent")
        directory.wait_changed(remaining)


class Grid:
    """A rendez-vous node and the nodes started for one test (or one module)."""

    def __init__(self, session, rv: RendezvousNode, workdir) -> None:
        self.session = session
        self.rv = rv
        self.workdir = workdir
        self.nodes = {}
        self._started = []

    def __getitem__(self, name: str) -> Node:
        return self.nodes[name]

    def node(self, name: str, *, session=None, **kwargs) -> Node:
        """Start a node; the grid stops it when it stops."""
        kwargs.setdefault("listen_address", "127.0.0.1:0")
        kwargs.setdefault("control", "")
        node = Node(session or self.session, name, **kwargs)
        self._started.append(node)
        return node.start()

    def start_node(self, name: str, **kwargs) -> Node:
        self.nodes[name] = self.node(name, cluster=CLUSTER[name], **kwargs)
        return self.nodes[name]

    def wait_converged(self, names=NODES, timeout: float = CONVERGE_TIMEOUT_S) -> None:
        """Every node's directory and the rendez-vous directory hold exactly ``names``."""
        for node in self.nodes.values():
            held = {e["name"] for e in node.wait_directory(present=names, timeout=timeout)}
            assert held == set(names), f"{node.name} holds {sorted(held)}"
        assert wait_names(self.rv.directory, present=names, timeout=timeout) == set(names)

    def link_ids(self) -> dict:
        """Which link objects each node and the rendez-vous node hold now (to see none was dropped)."""
        out = {"rendezvous": {k: id(v) for k, v in self.rv.leaders.items() if not v.closed}}
        for name, node in self.nodes.items():
            links = {"uplink": id(node.uplink) if node.uplink and not node.uplink.closed else None}
            links.update({k: id(v) for k, v in node.members.items() if not v.closed})
            out[name] = links
        return out

    def stop(self) -> None:
        links = list(self.rv.leaders.values())
        for node in self._started:
            links += [node.uplink, *node.members.values()]
        for node in reversed(self._started):
            node.stop()
        self.rv.stop()
        # Let every link finish closing here, so that what it logs belongs to this test.
        for link in links:
            if link is not None:
                link.join(CLOSE_TIMEOUT_S)


def start_grid(workdir, bootstrap: str = "tls/tcp") -> Grid:
    """Start the grid of the module docstring in ``workdir`` and wait until it has converged."""
    session = create_session(workdir / "session", "127.0.0.1:1", bootstrap=bootstrap)
    rv = RendezvousNode(session, listen_address="127.0.0.1:0", control=str(workdir / "rv.ctl")).start()
    grid = Grid(dataclasses.replace(session, rendezvous_port=rv.address.port), rv, workdir)
    try:
        grid.start_node("L1")
        grid.start_node("L2", listen_address=f"unix:{workdir}/L2.node")
        grid.start_node("s", control=str(workdir / "s.ctl"))
        for name in ("L1", "L2", "s"):
            assert grid[name].wait_joined(JOIN_TIMEOUT_S), f"{name} did not join"
        grid.start_node("m1", leader=str(grid["L1"].address))
        grid.start_node("m2", leader=str(grid["L1"].address), listen_address=f"unix:{workdir}/m2.node")
        grid.start_node("m3", leader=str(grid["L2"].address))
        for name in ("m1", "m2", "m3"):
            assert grid[name].wait_joined(JOIN_TIMEOUT_S), f"{name} did not join"
        grid.wait_converged()
    except BaseException:
        grid.stop()
        raise
    return grid


@pytest.fixture(scope="module", params=["tls/tcp", "tcp"], ids=["tls", "tcp"])
def grid(request, tmp_path_factory):
    """One grid shared by the tests that leave it as they found it."""
    g = start_grid(tmp_path_factory.mktemp("g"), request.param)
    yield g
    g.stop()


@pytest.fixture
def fresh_grid(sock_dir):
    """A grid of its own, for a test that breaks it (TLS)."""
    g = start_grid(sock_dir)
    yield g
    g.stop()


@pytest.fixture(autouse=True)
def no_crashes(monkeypatch):
    """Fail the test if a greenlet died of an exception or gridsock logged a traceback.

    A test that expects a logged traceback removes it from the list this fixture yields.
    """
    crashes = []
    hub = gevent.get_hub()
    print_exception = hub.print_exception

    def record(context, type_, value, tb):
        crashes.append(f"greenlet {context!r} died: {type_.__name__}: {value}")
        print_exception(context, type_, value, tb)

    monkeypatch.setattr(hub, "print_exception", record)

    class Tracebacks(logging.Handler):
        def emit(self, record):
            if record.exc_info and record.levelno >= logging.ERROR:
                crashes.append(f"{record.name} logged a traceback: {record.getMessage()}")

    handler = Tracebacks()
    logging.getLogger("gridsock").addHandler(handler)
    try:
        yield crashes
    finally:
        logging.getLogger("gridsock").removeHandler(handler)
    assert not crashes, "\n".join(crashes)


def _is_closed_tls_read(exc) -> bool:
    return isinstance(exc, ValueError) and "closed or unwrapped SSL socket" in str(exc)


@contextlib.contextmanager
def watch_log(logger: str, predicate):
    """Yield an Event set when ``logger`` emits a record that satisfies ``predicate``."""
    event = gevent.event.Event()

    class Watch(logging.Handler):
        def emit(self, record):
            if predicate(record):
                event.set()

    handler = Watch()
    log = logging.getLogger(logger)
    log.addHandler(handler)
    try:
        yield event
    finally:
        log.removeHandler(handler)


@contextlib.contextmanager
def raw_connection(grid: Grid, address: str, *, tls: bool | None = None, identity: Identity | None = None):
    """A socket to ``address``; with ``tls`` (default: the session's), a TLS client of the session CA."""
    sock = dial(parse_address(address), timeout=CLOSE_TIMEOUT_S)
    try:
        if grid.session.tls if tls is None else tls:
            sock = tls_client(sock, client_context(grid.session, identity), timeout=CLOSE_TIMEOUT_S)
        yield sock
    finally:
        sock.close()


def read_until_closed(sock, timeout: float = CLOSE_TIMEOUT_S) -> bytes:
    """Return all that ``sock`` receives until its peer closes it; fail if it stays open."""
    data = bytearray()
    with gevent.Timeout(timeout, AssertionError(f"the peer kept the connection open for {timeout} s")):
        while True:
            try:
                chunk = sock.recv(65536)
            except (ConnectionResetError, ssl.SSLError):  # a reset or a TLS alert closes it too
                return bytes(data)
            if not chunk:
                return bytes(data)
            data += chunk


def decode_all(data: bytes) -> list:
    decoder = wire.Decoder()
    decoder.feed(data)
    messages = []
    while (message := decoder.next_message()) is not None:
        messages.append(message)
    assert decoder.buffered == 0, f"{decoder.buffered} bytes of a truncated frame"
    return messages


def enroll_by_hand(grid: Grid, name: str) -> Identity:
    """Enroll with the join token the way a node does (TLS sessions); return the new identity."""
    key_pem, csr_pem = new_node_key()
    with raw_connection(grid, str(grid.rv.address)) as sock:
        send_message(sock, wire.Enroll(token=grid.session.join_token, csr_pem=csr_pem.decode(), name=name))
        reply = read_message(sock, wire.Decoder(), timeout=ANSWER_TIMEOUT_S)
    assert isinstance(reply, wire.Enrolled), reply
    identity = Identity(reply.cert_pem.encode(), key_pem)
    assert identity.node_id == reply.node_id
    return identity


def hello(grid: Grid, name: str, role: str, cluster=None) -> wire.Hello:
    """A Hello as a node would send it: over TLS the certificate speaks for it, over TCP the token."""
    if grid.session.tls:
        return wire.Hello(name=name, cluster=cluster, role=role)
    return wire.Hello(name=name, cluster=cluster, role=role, node_id=str(uuid.uuid4()),
                      token=grid.session.join_token)


@pytest.fixture(scope="module")
def identity(grid):
    """A node identity enrolled in the grid's session (None in a plain-TCP session)."""
    return enroll_by_hand(grid, "hand-made") if grid.session.tls else None


def assert_grid_works(grid: Grid) -> None:
    """The grid answers across the tree and the rendez-vous node still knows everyone."""
    for src, dst in (("m1", "m3"), ("m3", "m2"), ("s", "m1")):
        assert grid[src].ping(dst, timeout=ANSWER_TIMEOUT_S).route_there == tree_route(src, dst)
    assert {e.name for e in grid.rv.directory} == set(NODES)


def full_frame_message(sender: Node, dst: str, topic: str) -> wire.Routed:
    """The one-way message from ``sender`` to ``dst`` whose first frame is exactly MAX_FRAME_BYTES."""
    message = wire.Routed(src=sender.node_id, dst=dst, kind="msg", topic=topic, hops=1, route=(sender.name,))
    message = dataclasses.replace(message, payload=bytes(wire.MAX_FRAME_BYTES - (len(wire.encode(message)) - 4)))
    assert len(wire.encode(message)) == 4 + wire.MAX_FRAME_BYTES  # valid: exactly at the limit
    return message


# --- a converged grid ---------------------------------------------------------------------------


def test_every_directory_holds_every_node_with_its_place_in_the_tree(grid):
    ids = {name: grid[name].node_id for name in NODES}
    for holder in [grid.rv.directory] + [grid[n].directory for n in NODES]:
        for name in NODES:
            entry = holder.by_name(name)
            assert entry is not None and entry.node_id == ids[name]
            leader = name if PARENT[name] == "rendezvous" else PARENT[name]
            assert entry.leader == ids[leader]
            assert entry.role == ("leader" if leader == name else "member")
            assert entry.cluster == CLUSTER[name]
    assert set(grid.rv.leaders) == {ids["L1"], ids["L2"], ids["s"]}
    assert set(grid["L1"].members) == {ids["m1"], ids["m2"]}
    assert set(grid["L2"].members) == {ids["m3"]}
    assert all(grid[n].joined for n in NODES)


@pytest.mark.parametrize("src,dst", list(itertools.permutations(NODES, 2)))
def test_ping_every_ordered_pair_along_the_tree(grid, src, dst):
    result = grid[src].ping(dst, timeout=ANSWER_TIMEOUT_S)
    assert result.route_there == tree_route(src, dst)
    assert result.route_back == tree_route(dst, src)
    assert result.hops == len(result.route_there) - 1 <= wire.MAX_HOPS


def test_a_few_routes_spelled_out(grid):
    assert grid["m1"].ping("m3").route_there == ("m1", "L1", "rendezvous", "L2", "m3")
    assert grid["m1"].ping("m3").hops == 4
    assert grid["m1"].ping("m2").route_there == ("m1", "L1", "m2")
    assert grid["s"].ping("m3").route_there == ("s", "rendezvous", "L2", "m3")
    assert grid["m3"].ping(grid["m1"].node_id).route_there == ("m3", "L2", "rendezvous", "L1", "m1")


@pytest.mark.parametrize("src", NODES)
def test_ping_the_rendezvous_node(grid, src):
    result = grid[src].ping("rendezvous", timeout=ANSWER_TIMEOUT_S)
    assert result.route_there == tree_route(src, "rendezvous")
    assert result.route_back == tree_route("rendezvous", src)


def test_request_reply_with_a_custom_handler(grid):
    grid["m3"].handle("reverse", lambda d: d.payload[::-1] + b" for " + (d.src_name or "?").encode())
    reply = grid["m1"].request("m3", "reverse", b"abc", timeout=ANSWER_TIMEOUT_S)
    assert reply.payload == b"cba for m1"
    assert reply.kind == "rep" and reply.src == grid["m3"].node_id and reply.src_name == "m3"
    assert reply.route == ("m3", "L2", "rendezvous", "L1")
    # By node id, and to itself.
    assert grid["s"].request(grid["m3"].node_id, "reverse", b"xy").payload == b"yx for s"
    assert grid["m3"].request("m3", "reverse", b"me").payload == b"em for m3"


def test_a_megabyte_crosses_four_hops_both_ways(grid):
    grid["m3"].handle("echo", lambda d: d.payload)
    payload = random.Random(1).randbytes(1024 * 1024)
    assert grid["m1"].request("m3", "echo", payload, timeout=ANSWER_TIMEOUT_S).payload == payload


def test_one_way_message_reaches_the_handler(grid):
    got = gevent.event.AsyncResult()
    grid["m2"].handle("note", got.set)
    grid["m3"].send("m2", "note", b"hello")
    delivery = got.get(timeout=ANSWER_TIMEOUT_S)
    assert (delivery.kind, delivery.payload, delivery.src, delivery.src_name) == (
        "msg", b"hello", grid["m3"].node_id, "m3")
    assert delivery.route == ("m3", "L2", "rendezvous", "L1")


def test_a_failing_handler_gives_the_requester_its_message(grid, no_crashes):
    def fail(delivery):
        raise ValueError("the disk is full (code 28)")

    grid["L2"].handle("fail", fail)
    with pytest.raises(RoutingError, match=r"the disk is full \(code 28\)") as info:
        grid["m1"].request("L2", "fail", timeout=ANSWER_TIMEOUT_S)
    assert info.value.dst == "L2"
    # The node logs the handler's traceback: that is expected here.
    no_crashes[:] = [c for c in no_crashes if "handler for 'fail' failed" not in c]


def test_no_handler_for_the_topic(grid):
    with pytest.raises(RoutingError, match="no handler"):
        grid["m1"].request("m3", "nobody-handles-this", timeout=ANSWER_TIMEOUT_S)
    with pytest.raises(RoutingError, match="no service"):
        grid["m1"].request("rendezvous", "nobody-handles-this", timeout=ANSWER_TIMEOUT_S)


@pytest.mark.parametrize("src", ["m1", "L1", "s"])
@pytest.mark.parametrize("dst", ["nobody", "00000000-0000-4000-8000-000000000000"])
def test_unknown_destination_fails_fast(grid, src, dst):
    # A RoutingError is the rendez-vous node's answer; no answer would be a TimeoutError.
    with pytest.raises(RoutingError, match="unknown destination") as info:
        grid[src].request(dst, "ping", timeout=ANSWER_TIMEOUT_S)
    assert info.value.dst == dst


def test_a_payload_larger_than_a_frame_is_refused_at_once(grid):
    before = grid.link_ids()
    with pytest.raises(GridsockError):
        grid["m1"].send("m3", "sink", bytes(wire.MAX_FRAME_BYTES))
    assert grid.link_ids() == before
    assert_grid_works(grid)


@pytest.mark.parametrize("sender", ["m1", "L1"])
def test_a_frame_that_outgrows_the_limit_when_forwarded_drops_no_link(grid, sender):
    # The sender's frame is exactly MAX_FRAME_BYTES: valid. Each forwarder appends its name to
    # the route, so the next frame is a few bytes too long. The forwarder must refuse that message
    # (or the sender refuse to send it), not treat it as a bug and drop the sender's link (and,
    # at the rendez-vous node, the sender's whole cluster with it).
    node = grid[sender]
    before = grid.link_ids()
    try:
        node.send("m3", "sink", full_frame_message(node, "m3", "sink").payload)
    except GridsockError:
        pass  # refusing it up front is fine too
    try:
        node.ping("m3", timeout=2.0)  # behind the big message on the same links: a barrier
    except (RoutingError, TimeoutError) as exc:
        pytest.fail(f"the grid broke: ping after the big message failed: {exc!r}; links before "
                    f"{before}, after {grid.link_ids()}")
    assert grid.link_ids() == before


def test_a_reply_larger_than_a_frame_becomes_an_error_for_the_requester(grid):
    grid["L2"].handle("huge", lambda d: bytes(wire.MAX_FRAME_BYTES))
    with pytest.raises(RoutingError):
        grid["m1"].request("L2", "huge", timeout=3.0)
    assert_grid_works(grid)


def test_control_socket_answers_status_ping_and_wait(grid):
    path = str(grid.workdir / "s.ctl")
    status = control_call(path, "status")
    assert status["name"] == "s" and status["joined"] and status["role"] == "leader"
    assert {e["name"] for e in status["directory"]} == set(NODES)
    assert control_call(path, "ping", {"dst": "m2"})["route_there"] == list(tree_route("s", "m2"))
    assert {e["name"] for e in control_call(path, "wait", {"present": list(NODES), "timeout": 1})} == set(NODES)
    with pytest.raises(GridsockError, match="unknown control operation"):
        control_call(path, "reboot")
    rv_status = control_call(str(grid.workdir / "rv.ctl"), "status")
    assert rv_status["role"] == "rendezvous"
    assert {link["peer"] for link in rv_status["links"]} == {"L1", "L2", "s"}


# --- security ----------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["rendezvous", "leader"])
def test_a_wrong_join_token_is_refused_for_good(grid, where):
    intruder_session = dataclasses.replace(grid.session, join_token="x" * 43)
    kwargs = {"leader": str(grid["L1"].address), "cluster": "A"} if where == "leader" else {}
    intruder = grid.node(f"intruder-{where}", session=intruder_session, **kwargs)
    try:
        with pytest.raises(AuthError) as info:
            intruder.wait_joined(JOIN_TIMEOUT_S)
        assert info.value.method == "bad-token"
        assert intruder.fatal_error is info.value and not intruder.joined
        for directory in (grid.rv.directory, grid["L1"].directory, grid["m1"].directory):
            assert directory.by_name(intruder.name) is None
    finally:
        intruder.stop()
    assert_grid_works(grid)


@pytest.mark.parametrize("where", ["rendezvous", "leader"])
def test_a_node_of_another_session_fails_tls_and_never_appears(grid, where, tmp_path):
    if not grid.session.tls:
        pytest.skip("a plain-TCP session has no CA")
    other = create_session(tmp_path / "other", "127.0.0.1:1")
    other = dataclasses.replace(other, rendezvous_port=grid.rv.address.port)
    kwargs = {"leader": str(grid["L1"].address), "cluster": "A"} if where == "leader" else {}

    def tls_failure(record):
        return record.msg.startswith("node %s: uplink to %s failed") and record.args[0] == f"alien-{where}" \
            and isinstance(record.args[2], AuthError) and isinstance(record.args[2].__cause__, ssl.SSLError)

    with watch_log("gridsock.bootstrap.uplink", tls_failure) as failed:
        alien = grid.node(f"alien-{where}", session=other, **kwargs)
        try:
            assert failed.wait(JOIN_TIMEOUT_S), "the node did not report a TLS failure"
            assert not alien.joined and alien.identity is None
            for directory in (grid.rv.directory, grid["L1"].directory, grid["m1"].directory):
                assert directory.by_name(alien.name) is None
        finally:
            alien.stop()
    assert_grid_works(grid)


@pytest.mark.parametrize("where", ["rendezvous", "leader"])
def test_a_certificate_of_another_ca_is_refused(grid, where):
    if not grid.session.tls:
        pytest.skip("a plain-TCP session has no certificates")
    key_pem, csr_pem = new_node_key()
    node_id = str(uuid.uuid4())
    foreign = Identity(CertificateAuthority.create(str(uuid.uuid4())).sign_node(csr_pem, node_id), key_pem)
    address = str(grid.rv.address if where == "rendezvous" else grid["L1"].address)
    role, cluster = ("leader", None) if where == "rendezvous" else ("member", "A")
    received = b""
    try:
        with raw_connection(grid, address, identity=foreign) as sock:
            # TLS 1.3: the client may finish its handshake before the server checks its certificate.
            send_message(sock, wire.Hello(name="forger", cluster=cluster, role=role))
            received = read_until_closed(sock)
    except (AuthError, ssl.SSLError, ConnectionResetError, BrokenPipeError):
        pass  # refused during the handshake
    assert not any(isinstance(m, (wire.Welcome, wire.DirectoryUpdate)) for m in decode_all(received))
    assert grid.rv.directory.get(node_id) is None and grid["L1"].directory.get(node_id) is None
    assert_grid_works(grid)


@pytest.mark.parametrize("where", ["rendezvous", "leader", "member"])
def test_hello_without_credentials_gets_only_a_refuse(grid, where):
    address = {"rendezvous": grid.rv.address, "leader": grid["L1"].address, "member": grid["m2"].address}[where]
    role = "leader" if where == "rendezvous" else "member"
    if grid.session.tls:
        greeting = wire.Hello(name="spy", cluster="A", role=role)  # no client certificate
        code = "not-a-leader" if where == "member" else "no-certificate"
    else:
        greeting = wire.Hello(name="spy", cluster="A", role=role, node_id=str(uuid.uuid4()), token="y" * 43)
        code = "not-a-leader" if where == "member" else "bad-token"
    with raw_connection(grid, str(address)) as sock:
        send_message(sock, greeting)
        messages = decode_all(read_until_closed(sock))
    assert len(messages) == 1 and isinstance(messages[0], wire.Refuse), messages
    assert messages[0].code == code
    assert "spy" not in {e.name for e in grid.rv.directory}
    assert grid.rv.address.port  # still listening
    assert_grid_works(grid)


def test_enroll_with_a_wrong_token_gets_only_a_refuse(grid):
    if not grid.session.tls:
        pytest.skip("a plain-TCP session has no enrollment")
    for address in (grid.rv.address, grid["L1"].address):
        _, csr_pem = new_node_key()
        with raw_connection(grid, str(address)) as sock:
            send_message(sock, wire.Enroll(token="z" * 43, csr_pem=csr_pem.decode(), name="thief"))
            messages = decode_all(read_until_closed(sock))
        assert [type(m) for m in messages] == [wire.Refuse] and messages[0].code == "bad-token"


@pytest.mark.parametrize("where,role,name,cluster,code", [
    ("rendezvous", "member", "newcomer", "A", "not-a-leader"),
    ("rendezvous", "leader", "rendezvous", None, "name-reserved"),
    ("rendezvous", "leader", "L2", None, "name-taken"),
    ("rendezvous", "leader", "m2", None, "name-taken"),
    ("leader", "leader", "newcomer", "A", "not-a-member"),
    ("leader", "member", "newcomer", "B", "wrong-cluster"),
    ("leader", "member", "m2", "A", "name-taken"),
    ("leader", "member", "L1", "A", "name-taken"),
    ("leader", "member", "s", "A", "name-taken"),
])
def test_a_session_member_is_refused_what_it_may_not_do(grid, identity, where, role, name, cluster, code):
    address = grid.rv.address if where == "rendezvous" else grid["L1"].address
    before = grid.link_ids()
    with raw_connection(grid, str(address), identity=identity) as sock:
        send_message(sock, hello(grid, name, role, cluster))
        messages = decode_all(read_until_closed(sock))
    assert [type(m) for m in messages] == [wire.Refuse] and messages[0].code == code, messages
    assert grid.link_ids() == before
    assert_grid_works(grid)


# --- garbage -----------------------------------------------------------------------------------

GARBAGE = {
    "random": random.Random(20).randbytes(4096),
    "oversized": b"\xff\xff\xff\xff" + b"\x01\x09" + bytes(64),
    "bad-version": struct.pack("!IBBI", 8, 2, 3, 2) + b"{}",
    # A frame of a plausible length and a known type, then noise.
    "random-frame": struct.pack("!IBB", 4094, 1, 9) + random.Random(21).randbytes(4092),
}


def _garbage_cases():
    for target in ("rendezvous", "leader", "member", "control", "rendezvous-control"):
        for layer in (("raw",) if target.endswith("control") else ("raw", "tls")):
            for kind in GARBAGE:
                yield pytest.param(target, layer, kind, id=f"{target}-{layer}-{kind}")


@pytest.mark.parametrize("target,layer,kind", list(_garbage_cases()))
def test_garbage_closes_that_connection_only(grid, target, layer, kind):
    if layer == "tls" and not grid.session.tls:
        pytest.skip("no TLS in a plain-TCP session: the raw case reaches the decoder")
    address = {
        "rendezvous": str(grid.rv.address),
        "leader": str(grid["L1"].address),
        "member": str(grid["m2"].address),
        "control": f"unix:{grid.workdir / 's.ctl'}",
        "rendezvous-control": f"unix:{grid.workdir / 'rv.ctl'}",
    }[target]
    before = grid.link_ids()
    with raw_connection(grid, address, tls=(layer == "tls")) as sock:
        sock.sendall(GARBAGE[kind])
        received = read_until_closed(sock)
    assert decode_all(received) == []  # not even a Refuse: garbage learns nothing
    assert grid.link_ids() == before
    assert_grid_works(grid)
    if target == "control":
        assert control_call(str(grid.workdir / "s.ctl"), "status")["joined"]
    if target == "rendezvous-control":
        assert control_call(str(grid.workdir / "rv.ctl"), "status")["role"] == "rendezvous"


@pytest.mark.parametrize("where", ["rendezvous", "leader"])
def test_garbage_from_an_authenticated_peer_drops_its_link_only(grid, identity, where):
    name = f"rogue-{where}"
    address, role, cluster = {
        "rendezvous": (grid.rv.address, "leader", None),
        "leader": (grid["L1"].address, "member", "A"),
    }[where]
    before = grid.link_ids()
    with raw_connection(grid, str(address), identity=identity) as sock:
        send_message(sock, hello(grid, name, role, cluster))
        decoder = wire.Decoder()
        welcome = read_message(sock, decoder, timeout=ANSWER_TIMEOUT_S)
        assert isinstance(welcome, wire.Welcome) and welcome.entry.name == name
        for node in ("s", "m3", "m1"):
            grid[node].wait_directory(present=[name], timeout=CONVERGE_TIMEOUT_S)
        sock.sendall(GARBAGE["oversized"])
        read_until_closed(sock)
    for node in NODES:
        grid[node].wait_directory(absent=[name], timeout=CONVERGE_TIMEOUT_S)
    wait_names(grid.rv.directory, absent=[name])
    assert grid.link_ids() == before
    assert_grid_works(grid)


def test_closing_a_link_while_data_arrives_logs_no_traceback(grid, identity):
    # Link.close() from another greenlet (stop(), a ping timeout, a full send queue, a newer link
    # of the same leader) while the peer's data arrives in the same poll: the link's reader wakes
    # up on a socket closed under it. That is a normal end, not "a bug while handling a message".
    if not grid.session.tls:
        pytest.skip("gevent raises ValueError only for a TLS socket closed under its reader")

    def traceback_of_a_closed_read(record):
        return record.exc_info is not None and _is_closed_tls_read(record.exc_info[1])

    with watch_log("gridsock", traceback_of_a_closed_read) as logged:
        for attempt in range(5):
            with raw_connection(grid, str(grid.rv.address), identity=identity) as sock:
                send_message(sock, hello(grid, f"closing-{attempt}", "leader"))
                assert isinstance(read_message(sock, wire.Decoder(), timeout=ANSWER_TIMEOUT_S), wire.Welcome)
                link = grid.rv.leaders[identity.node_id]
                wake, waiter = gsocket.socketpair()
                with wake, waiter:
                    closer = gevent.spawn(lambda: (waiter.recv(1), link.close("closed by another greenlet")))
                    gevent.idle()  # the closer now waits on its socket
                    sock.sendall(wire.encode(wire.Ping(attempt)))  # the link's socket turns readable...
                    wake.sendall(b"!")  # ...in the same poll as the closer's
                    closer.get(timeout=ANSWER_TIMEOUT_S)
                    link.join(CLOSE_TIMEOUT_S)
            wait_names(grid.rv.directory, absent=[f"closing-{attempt}"])
    assert not logged.is_set(), "a link closed locally logged a traceback as 'bug while handling a message'"
    assert_grid_works(grid)


# --- authenticated peers that overstep ------------------------------------------------------


@pytest.mark.parametrize("where", ["rendezvous", "leader"])
def test_a_node_cannot_send_in_another_nodes_name(grid, identity, where):
    # The first router knows who is at the other end of each link (its certificate, or its Hello
    # in a plain-TCP session): a routed message whose src is someone else is a forgery. Accepted,
    # it would let any node of the session speak, and answer pending requests, as any other.
    name = f"impostor-{where}"
    address, role, cluster = {
        "rendezvous": (grid.rv.address, "leader", None),
        "leader": (grid["L1"].address, "member", "A"),
    }[where]
    victim = grid["m2"]
    got = []
    genuine_arrived = gevent.event.Event()

    def note(delivery):
        got.append(delivery)
        if delivery.payload == b"genuine":
            genuine_arrived.set()

    grid["m3"].handle("spoof", note)
    with raw_connection(grid, str(address), identity=identity) as sock:
        send_message(sock, hello(grid, name, role, cluster))
        welcome = read_message(sock, wire.Decoder(), timeout=ANSWER_TIMEOUT_S)
        assert isinstance(welcome, wire.Welcome)
        me = welcome.entry.node_id
        forged = wire.Routed(src=victim.node_id, dst="m3", kind="msg", topic="spoof", hops=1, route=("m2",),
                             payload=b"forged")
        genuine = wire.Routed(src=me, dst="m3", kind="msg", topic="spoof", hops=1, route=(name,),
                              payload=b"genuine")
        closed = gevent.spawn(read_until_closed, sock, CONVERGE_TIMEOUT_S)
        sock.sendall(wire.encode(forged) + wire.encode(genuine))  # same path, in this order
        # The router may drop the forged message, or the forger's link with it: both are fine.
        gevent.wait([genuine_arrived, closed], count=1, timeout=ANSWER_TIMEOUT_S)
        assert genuine_arrived.is_set() or closed.successful(), "neither delivered nor refused"
        closed.kill()
    # Whatever the router forwarded before that is ahead of this ping on the same links.
    grid["m1" if where == "leader" else "s"].ping("m3", timeout=ANSWER_TIMEOUT_S)
    for node in NODES:
        grid[node].wait_directory(absent=[name], timeout=CONVERGE_TIMEOUT_S)
    wait_names(grid.rv.directory, absent=[name])
    assert b"forged" not in [d.payload for d in got], "m3 took a message forged in m2's name"
    assert all(d.src == me for d in got)


def test_a_leader_cannot_register_another_clusters_node_as_its_member(fresh_grid):
    # A leader speaks for its own members only. Registering m3 (L2's member) under itself would
    # make the rendez-vous node route m3's traffic to it (and drop m3 when it leaves). A grid of
    # its own: if that happens, the damage stays in this test.
    grid = fresh_grid
    identity = enroll_by_hand(grid, "hijacker")
    name = "hijacker"
    m3 = grid.rv.directory.by_name("m3")
    with raw_connection(grid, str(grid.rv.address), identity=identity) as sock:
        # (a cluster of its own: claiming m3's cluster B is refused outright, cluster-taken)
        send_message(sock, hello(grid, name, "leader", "H"))
        decoder = wire.Decoder()
        welcome = read_message(sock, decoder, timeout=ANSWER_TIMEOUT_S)
        assert isinstance(welcome, wire.Welcome)
        me = welcome.entry.node_id
        stolen = dataclasses.replace(m3, leader=me, cluster="H", addrs=(), observed=None, inbound=None)
        send_message(sock, wire.Register((stolen,)))
        # The rendez-vous node handles a link's messages in order: its answer to this request
        # comes after it dealt with the Register.
        send_message(sock, wire.Routed(src=me, dst="rendezvous", kind="req", topic="ping", request_id=7, hops=1,
                                       route=(name,)))
        with gevent.Timeout(ANSWER_TIMEOUT_S):
            while not (isinstance(message := read_message(sock, decoder), wire.Routed) and message.request_id == 7):
                pass
        assert grid.rv.directory.get(m3.node_id).leader == grid["L2"].node_id, "m3 was registered under the hijacker"
    wait_names(grid.rv.directory, absent=[name])
    for node in NODES:
        grid[node].wait_directory(present=["m3"], absent=[name], timeout=CONVERGE_TIMEOUT_S)
    assert grid["s"].ping("m3", timeout=ANSWER_TIMEOUT_S).route_there == tree_route("s", "m3")


# --- nodes that leave --------------------------------------------------------------------------


def test_a_member_that_stops_is_removed_everywhere_and_can_come_back(fresh_grid):
    grid = fresh_grid
    old = grid["m1"]
    old.stop()
    others = [n for n in NODES if n != "m1"]
    for name in others:
        grid[name].wait_directory(absent=["m1"], timeout=CONVERGE_TIMEOUT_S)
    wait_names(grid.rv.directory, absent=["m1"])
    with pytest.raises(RoutingError, match="unknown destination"):
        grid["m3"].request("m1", "ping", timeout=ANSWER_TIMEOUT_S)
    # The same node (same certificate, same id) comes back.
    new = grid.start_node("m1", leader=str(grid["L1"].address), identity=old.identity)
    assert new.wait_joined(JOIN_TIMEOUT_S) and new.node_id == old.node_id
    grid.wait_converged()
    assert grid["m3"].ping("m1").route_there == tree_route("m3", "m1")


@pytest.mark.parametrize("leader", ["L1", "L2"])
def test_a_leader_that_stops_takes_its_cluster_away_and_members_rejoin_its_successor(fresh_grid, leader):
    grid = fresh_grid
    old = grid[leader]
    address = str(old.address)
    gone = [leader] + members_of(leader)
    staying = [n for n in NODES if n not in gone]
    old.stop()
    for name in staying:
        grid[name].wait_directory(absent=gone, timeout=LINK_TIMEOUT_S + 2)
    wait_names(grid.rv.directory, absent=gone, timeout=LINK_TIMEOUT_S + 2)
    for member in members_of(leader):  # a member without its leader knows only itself
        grid[member].wait_directory(absent=[n for n in NODES if n != member], timeout=LINK_TIMEOUT_S + 2)
    # A new leader (a new identity) on the same node port: the members, still retrying, rejoin it.
    new = grid.start_node(leader, listen_address=address)
    assert new.wait_joined(JOIN_TIMEOUT_S) and new.node_id != old.node_id
    grid.wait_converged(timeout=RECONNECT_MAX_S + CONVERGE_TIMEOUT_S)
    for member in members_of(leader):
        assert grid[member].ping("s").route_there == tree_route(member, "s")
        assert grid["s"].ping(member).route_there == tree_route("s", member)


def test_a_leader_that_vanishes_without_a_word_is_dropped_after_the_link_timeout(fresh_grid):
    grid = fresh_grid
    frozen = grid["L1"]
    # A crashed host: its greenlets stop, its sockets stay open, no FIN ever comes.
    greenlets = list(frozen._greenlets)
    for link in [frozen.uplink, *frozen.members.values()]:
        greenlets += link._greenlets
    gevent.killall(greenlets)
    start = time.monotonic()
    bound = LEAVE_BOUND_S  # the documented bound: a dead link noticed, then one update sent on
    gone = ["L1", "m1", "m2"]
    wait_names(grid.rv.directory, absent=gone, timeout=bound)
    for name in ("L2", "m3", "s"):
        grid[name].wait_directory(absent=gone, timeout=bound - (time.monotonic() - start))
    for member in ("m1", "m2"):
        grid[member].wait_directory(absent=[n for n in NODES if n != member],
                                    timeout=bound - (time.monotonic() - start))
    # It was the timeout, not a FIN: the last frame from L1 came at most one ping interval before.
    assert time.monotonic() - start > LINK_TIMEOUT_S - PING_INTERVAL_S - 0.5
    assert grid["m3"].ping("s").route_there == ("m3", "L2", "rendezvous", "s")


@pytest.mark.parametrize("bootstrap", ["tls/tcp", "tcp"], ids=["tls", "tcp"])
def test_every_node_comes_back_after_the_rendezvous_node_restarts(sock_dir, bootstrap):
    grid = start_grid(sock_dir, bootstrap)
    try:
        port = grid.rv.address.port
        grid.rv.stop()
        for leader in ("L1", "L2", "s"):
            cluster = [leader] + members_of(leader)
            for name in cluster:
                grid[name].wait_directory(absent=[n for n in NODES if n not in cluster], timeout=LINK_TIMEOUT_S + 2)
        grid.rv = RendezvousNode(grid.session, listen_address=f"127.0.0.1:{port}", control="").start()
        grid.wait_converged(timeout=RECONNECT_MAX_S + CONVERGE_TIMEOUT_S)
        for src, dst in itertools.permutations(NODES, 2):
            assert grid[src].ping(dst, timeout=ANSWER_TIMEOUT_S).route_there == tree_route(src, dst)
    finally:
        grid.stop()


# --- the roles alone: the router with recording links, the uplink's backoff -----------------


class RecordingLink:
    """A link that keeps what it is given (a router needs only send and wait_room)."""

    def __init__(self) -> None:
        self.sent = []

    def send(self, message, *, bulk: bool = False, checked: bool = True) -> bool:
        self.sent.append(message)
        return True

    def wait_room(self, *, bulk: bool = False) -> None:
        pass


def lone_router(*, leader: bool):
    """A router for node "L" (leader of member "m", id "id-m") or for member "m"; its two links."""
    directory = Directory()
    directory.put([wire.NodeEntry(node_id="id-L", name="L", cluster="A", leader="id-L"),
                   wire.NodeEntry(node_id="id-m", name="m", cluster="A", leader="id-L", role="member")])
    host = types.SimpleNamespace(name="L" if leader else "m", node_id="id-L" if leader else "id-m",
                                 directory=directory)
    up, down = RecordingLink(), RecordingLink()
    router = Router(host, up=lambda: up, down=(lambda node_id: down if node_id == "id-m" else None) if leader else None)
    return router, up, down


def test_a_leaders_router_sends_down_to_its_member_and_up_for_anyone_else():
    router, up, down = lone_router(leader=True)
    router.route(wire.Routed(src="id-x", dst="m", kind="msg", topic="t", hops=2, route=("x", "rendezvous")))
    router.send("x", "t", b"up")
    (forwarded,) = down.sent
    assert (forwarded.dst, forwarded.hops, forwarded.route) == ("m", 3, ("x", "rendezvous", "L"))
    (sent,) = up.sent
    assert (sent.src, sent.dst, sent.hops, sent.route, sent.payload) == ("id-L", "x", 1, ("L",), b"up")


def test_a_request_past_the_hop_limit_is_answered_with_an_error():
    router, up, down = lone_router(leader=True)
    router.route(wire.Routed(src="id-x", dst="m", kind="req", topic="t", request_id=7, hops=wire.MAX_HOPS,
                             route=("x",)))
    assert down.sent == []
    (answer,) = up.sent
    assert (answer.kind, answer.dst, answer.request_id) == ("err", "id-x", 7)
    assert b"hop limit" in answer.payload


def test_a_members_router_drops_what_is_not_addressed_to_it():
    router, up, down = lone_router(leader=False)
    router.route(wire.Routed(src="id-x", dst="L", kind="req", topic="t", request_id=1, hops=2, route=("x",)))
    assert up.sent == [] and down.sent == []


def test_a_request_to_this_node_is_answered_without_a_link():
    router, up, down = lone_router(leader=False)
    router.handle("echo", lambda delivery: delivery.payload[::-1])
    assert router.request("m", "echo", b"abc").payload == b"cba"
    assert router.ping("id-m").route_there == ("m", "m")
    assert up.sent == [] and down.sent == []


def test_no_node_id_yet_means_no_route():
    router, up, down = lone_router(leader=False)
    router.host.node_id = None
    with pytest.raises(RoutingError, match="not joined"):
        router.send("L", "t")


@pytest.mark.parametrize("initial_s, max_s", [(RECONNECT_INITIAL_S, RECONNECT_MAX_S), (0.001, 0.004)])
def test_reconnect_backoff_doubles_up_to_its_cap_with_jitter(initial_s, max_s):
    delays = backoff_delays(initial_s, max_s, rng=random.Random(1))
    for attempt in range(12):
        base = min(initial_s * 2 ** attempt, max_s)
        assert base * 0.5 <= next(delays) < base


def test_the_jitter_comes_from_the_given_random_source():
    first = list(itertools.islice(backoff_delays(rng=random.Random(3)), 8))
    assert first == list(itertools.islice(backoff_delays(rng=random.Random(3)), 8))
    assert first != list(itertools.islice(backoff_delays(rng=random.Random(4)), 8))
