"""Several rendez-vous nodes in one session (docs/federation.md), on loopback, in this process.

The grid: rendez-vous nodes ``rendezvous`` and ``rendezvous-2`` of one session; leader L1
(cluster A) with member m1 on the first, leader L2 (cluster B) with member m2 on the second
(each leader is given a session file that lists its own rendez-vous node first). Every wait is
an event or a bounded condition, never a sleep.
"""
from __future__ import annotations

import dataclasses
import socket
import time

import gevent
import pytest

from gridsock import wire
from gridsock.bootstrap.federation import FAILOVER_GRACE_S, PEER_ROLE
from gridsock.bootstrap.link import read_message, send_message
from gridsock.bootstrap.rendezvous import RendezvousNode, rendezvous_index
from gridsock.bootstrap.transport import dial, parse_address, tls_client
from gridsock.errors import AuthError, ConfigError
from gridsock.node import Node
from gridsock.session import Session, add_rendezvous, client_context, create_session, rendezvous_name

pytestmark = pytest.mark.timeout(90)

# Bounds that only stop a broken grid from hanging (loopback answers in milliseconds).
JOIN_TIMEOUT_S = 15.0
CONVERGE_TIMEOUT_S = 15.0
ANSWER_TIMEOUT_S = 10.0
CLOSE_TIMEOUT_S = 5.0
PORT = 7
NAMES = ("L1", "m1", "L2", "m2")


def free_ports(n: int) -> list:
    """``n`` loopback ports free now (the session must list its rendez-vous ports up front)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def wait_for(condition, what: str, timeout: float = CONVERGE_TIMEOUT_S, directories=()):
    """Wait until ``condition()`` is true (re-checked at each change of ``directories``, and
    at least every 50 ms); AssertionError naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not condition():
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"not within {timeout} s: {what}")
        if directories:
            gevent.wait([gevent.spawn(d.wait_changed, min(remaining, 0.05)) for d in directories], count=1)
        else:
            gevent.sleep(min(remaining, 0.05))  # (a poll interval, not a wait for readiness)
    return True


def names_of(directory) -> set:
    return {e.name for e in directory}


class FedGrid:
    def __init__(self, workdir, bootstrap: str = "tls/tcp", grace_s: float = FAILOVER_GRACE_S) -> None:
        self.workdir = workdir
        self.ports = free_ports(2)
        self.session = create_session(workdir / "session", [f"127.0.0.1:{p}" for p in self.ports],
                                      bootstrap=bootstrap)
        self.grace_s = grace_s
        self.rvs = {}
        self.nodes = {}
        self.listeners = {}
        self._started = []

    def start_rv(self, index: int) -> RendezvousNode:
        name = rendezvous_name(index)
        rv = RendezvousNode(self.session, listen_address=f"127.0.0.1:{self.ports[index]}", control="",
                            failover_grace_s=self.grace_s).start()
        assert rv.name == name
        self.rvs[name] = rv
        return rv

    def session_first(self, index: int) -> Session:
        """The session with rendez-vous node ``index`` as the rendez-vous address (a leader
        dials it first, then the next ones of the list: ``gridsock node --rendezvous``)."""
        host, port = self.session.rendezvous_addresses[index]
        return dataclasses.replace(self.session, rendezvous_host=host, rendezvous_port=port)

    def node(self, name: str, **kwargs) -> Node:
        kwargs.setdefault("listen_address", "127.0.0.1:0")
        kwargs.setdefault("control", "")
        kwargs.setdefault("state_dir", None)
        session = kwargs.pop("session", self.session)
        node = Node(session, name, **kwargs)
        self._started.append(node)
        self.nodes[name] = node.start()
        return node

    def start(self) -> "FedGrid":
        self.start_rv(0)
        self.start_rv(1)
        self.node("L1", cluster="A", session=self.session_first(0))
        self.node("L2", cluster="B", session=self.session_first(1))
        for name in ("L1", "L2"):
            assert self.nodes[name].wait_joined(JOIN_TIMEOUT_S), f"{name} did not join"
        self.node("m1", cluster="A", leader=str(self.nodes["L1"].address))
        self.node("m2", cluster="B", leader=str(self.nodes["L2"].address))
        for name in ("m1", "m2"):
            assert self.nodes[name].wait_joined(JOIN_TIMEOUT_S), f"{name} did not join"
            self.listeners[name] = self.nodes[name].listen(PORT)
        return self

    def wait_converged(self, names=NAMES, rvs=None) -> None:
        for node in self.nodes.values():
            held = {e["name"] for e in node.wait_directory(present=names, timeout=CONVERGE_TIMEOUT_S)}
            assert held >= set(names), f"{node.name} holds {sorted(held)}"
        for rv in (rvs if rvs is not None else self.rvs.values()):
            wait_for(lambda: names_of(rv.directory) >= set(names), f"{rv.name} holds {sorted(names)}",
                     directories=[rv.directory])

    def stop(self) -> None:
        for listener in self.listeners.values():
            listener.close()
        for node in reversed(self._started):
            node.stop()
        for rv in self.rvs.values():
            rv.stop()


@pytest.fixture(params=["tls/tcp", "tcp"], ids=["tls", "tcp"])
def fed(request, sock_dir):
    grid = FedGrid(sock_dir, request.param)
    try:
        grid.start()
        grid.wait_converged()
    except BaseException:
        grid.stop()
        raise
    yield grid
    grid.stop()


# --- the session -----------------------------------------------------------------------------


def test_a_session_lists_its_rendezvous_nodes_each_with_a_certificate(tmp_path):
    session = create_session(tmp_path / "s", "127.0.0.1:7001", clusters=("A",))
    assert session.rendezvous_addresses == (("127.0.0.1", 7001),)
    assert "rendezvous = \"127.0.0.1:7001\"" in session.path.read_text()  # (one: a string, as before)
    session, index = add_rendezvous(session, "127.0.0.1:7002")
    assert index == 1
    assert session.rendezvous_addresses == (("127.0.0.1", 7001), ("127.0.0.1", 7002))
    assert Session.load(tmp_path / "s" / "cluster-A.toml").rendezvous_addresses == session.rendezvous_addresses
    assert (tmp_path / "s" / "rendezvous-2-key.pem").stat().st_mode & 0o777 == 0o600
    first, second = session.rendezvous_identity(0), session.rendezvous_identity(1)
    assert first.subject == second.subject and first.cert_pem != second.cert_pem
    with pytest.raises(ConfigError, match="already"):
        add_rendezvous(session, "127.0.0.1:7002")
    with pytest.raises(ConfigError, match="0.0.0.0"):
        add_rendezvous(session, "0.0.0.0:7003")
    assert rendezvous_index(session, name="rendezvous-2") == 1
    assert rendezvous_index(session, listen_address="0.0.0.0:7002") == 1
    assert rendezvous_index(session) == 0
    with pytest.raises(ConfigError, match="rendezvous-3"):
        rendezvous_index(session, name="rendezvous-3")


def test_a_session_file_with_a_bad_rendezvous_list_is_refused(tmp_path):
    session = create_session(tmp_path / "s", ["127.0.0.1:7001", "127.0.0.1:7002"])
    text = session.path.read_text()
    for bad, why in (("[]", "1 to"), ('["127.0.0.1:7001", 7]', "string"),
                     ('["127.0.0.1:7001", "127.0.0.1:7001"]', "once"), ('["127.0.0.1:x"]', "rendezvous")):
        path = tmp_path / "bad.toml"
        path.write_text(text.replace('rendezvous = ["127.0.0.1:7001", "127.0.0.1:7002"]', f"rendezvous = {bad}"))
        with pytest.raises(ConfigError, match=why):
            Session.load(path)


# --- the federation --------------------------------------------------------------------------


def test_directories_converge_across_rendezvous_nodes(fed):
    rv1, rv2 = fed.rvs["rendezvous"], fed.rvs["rendezvous-2"]
    assert set(rv1.leaders) == {fed.nodes["L1"].node_id}
    assert set(rv2.leaders) == {fed.nodes["L2"].node_id}
    assert names_of(rv1.federation.local) == {"L1", "m1"}
    assert names_of(rv2.federation.local) == {"L2", "m2"}
    # A dial-back verdict made on one rendez-vous node reaches the other's directory.
    l2 = fed.nodes["L2"].node_id
    wait_for(lambda: rv1.directory.get(l2) is not None and rv1.directory.get(l2).inbound is not None,
             "L2's dial-back verdict at rendezvous", directories=[rv1.directory])
    status = rv1._control_op("status", {})
    assert status["federation"]["peers"]["rendezvous-2"]["linked"] is True


def test_routed_ping_crosses_two_rendezvous_nodes(fed):
    result = fed.nodes["m1"].ping("m2", timeout=ANSWER_TIMEOUT_S)
    assert result.route_there == ("m1", "L1", "rendezvous", "rendezvous-2", "L2", "m2")
    assert result.hops == 5 == wire.MAX_HOPS
    # A rendez-vous node answers by its name, from either side.
    assert fed.nodes["m1"].ping("rendezvous-2", timeout=ANSWER_TIMEOUT_S).route_there[-1] == "rendezvous-2"
    assert fed.nodes["m2"].ping("rendezvous", timeout=ANSWER_TIMEOUT_S).route_there[-1] in ("rendezvous-2", "rendezvous")


def relay_stack(grid) -> str:
    """A relayed stack a node outside the server's cluster may use (TLS in a TLS session)."""
    return "tls/relay" if grid.session.tls else "relay"


def test_a_relayed_connection_crosses_two_rendezvous_nodes(fed):
    stack = relay_stack(fed)
    client, _ = fed.nodes["m1"].open_stream("m2", PORT, stack=stack, timeout=ANSWER_TIMEOUT_S)
    server, _ = fed.listeners["m2"].accept_stream(timeout=ANSWER_TIMEOUT_S)
    try:
        data = bytes(range(256)) * 4096  # 1 MiB
        sender = gevent.spawn(client.send_all, data)
        got = bytearray()
        while len(got) < len(data):
            chunk = server.receive_some(65536)
            assert chunk, "the relayed stream ended early"
            got += chunk
        sender.get(timeout=ANSWER_TIMEOUT_S)
        assert bytes(got) == data
        server.send_all(b"and back")
        assert client.receive_some(100) == b"and back"
    finally:
        client.close()
        server.close()


def test_a_rendezvous_link_from_a_node_certificate_is_refused(fed):
    if not fed.session.tls:
        pytest.skip("certificates: TLS sessions")
    rv2 = fed.rvs["rendezvous-2"]
    identity = fed.nodes["m1"].identity  # a node's certificate of this very session
    sock = dial(parse_address(f"127.0.0.1:{fed.ports[1]}"), timeout=CLOSE_TIMEOUT_S)
    try:
        sock = tls_client(sock, client_context(fed.session, identity), timeout=CLOSE_TIMEOUT_S)
        send_message(sock, wire.Hello(name="rendezvous", cluster=None, role=PEER_ROLE))
        reply = read_message(sock, wire.Decoder(peer="rv2"), timeout=CLOSE_TIMEOUT_S)
    finally:
        sock.close()
    assert isinstance(reply, wire.Refuse) and reply.code == "not-a-rendezvous"
    assert rv2.federation.counters["refused"] >= 1
    assert rv2.federation.link_to_peer("rendezvous") is not None  # the real one is still linked


def test_a_rendezvous_link_naming_an_unknown_rendezvous_node_is_refused(fed):
    if not fed.session.tls:
        pytest.skip("certificates: TLS sessions")
    identity = fed.session.rendezvous_identity(0)
    sock = dial(parse_address(f"127.0.0.1:{fed.ports[1]}"), timeout=CLOSE_TIMEOUT_S)
    try:
        sock = tls_client(sock, client_context(fed.session, identity), timeout=CLOSE_TIMEOUT_S)
        send_message(sock, wire.Hello(name="rendezvous-9", cluster=None, role=PEER_ROLE))
        reply = read_message(sock, wire.Decoder(peer="rv2"), timeout=CLOSE_TIMEOUT_S)
    finally:
        sock.close()
    assert isinstance(reply, wire.Refuse) and reply.code == "unknown-rendezvous"


def test_killing_a_rendezvous_node_loses_nobody_and_it_catches_up_when_restarted(fed):
    # The TLS grid loses rendezvous-2 (which accepted the rendez-vous link), the plain-TCP grid
    # rendezvous (which dialed it): each side of the link is lost once.
    lost_index = 1 if fed.session.tls else 0
    victim, survivor = rendezvous_name(lost_index), rendezvous_name(1 - lost_index)
    pairs = [("L1", "m1"), ("L2", "m2")]  # (leader, member) on rendezvous, on rendezvous-2
    moving, staying = pairs[lost_index], pairs[1 - lost_index]
    rv = fed.rvs[survivor]
    lost = []

    def record(directory, label):
        def listener(joined, left):
            for entry in left:
                lost.append((label, entry.name, time.monotonic()))
        directory.add_listener(listener)

    record(rv.directory, survivor)
    for name, node in fed.nodes.items():
        record(node.directory, name)

    fed.rvs.pop(victim).stop()  # its leader and that leader's member must fail over to the survivor
    wait_for(lambda: fed.nodes[moving[0]].node_id in rv.leaders, f"{moving[0]} fails over to {survivor}",
             timeout=FAILOVER_GRACE_S + JOIN_TIMEOUT_S)
    fed.wait_converged(rvs=[rv])
    # Nobody left any directory meanwhile (the grace kept them until their leader re-attached).
    assert not lost, f"nodes left directories during the failover: {lost}"
    # New connections and routed messages work through the survivor.
    assert fed.nodes["m1"].ping("m2", timeout=ANSWER_TIMEOUT_S).route_there == ("m1", "L1", survivor, "L2", "m2")
    client, _ = fed.nodes[moving[1]].open_stream(staying[1], PORT, stack=relay_stack(fed), timeout=ANSWER_TIMEOUT_S)
    server, _ = fed.listeners[staying[1]].accept_stream(timeout=ANSWER_TIMEOUT_S)
    try:
        client.send_all(b"after the failover")
        assert server.receive_some(100) == b"after the failover"
    finally:
        client.close()
        server.close()
    # The grace ends: nothing kept only for the dead node is left, everyone else stays.
    wait_for(lambda: rv.federation.counters["expired"] >= 1, f"the grace of {victim} ends",
             timeout=FAILOVER_GRACE_S + CONVERGE_TIMEOUT_S)
    assert names_of(rv.directory) >= set(NAMES) and not lost
    # Restarted, it catches up from the other one (its snapshot), with nobody attached to it.
    back = fed.start_rv(lost_index)
    wait_for(lambda: names_of(back.directory) >= set(NAMES), f"the restarted {victim} catches up",
             directories=[back.directory])
    assert not back.leaders and not len(back.federation.local)
    assert {fed.nodes["L1"].node_id, fed.nodes["L2"].node_id} == set(rv.leaders)


def test_leaders_not_reattached_within_the_grace_leave_every_directory(sock_dir):
    # L2 knows only rendezvous-2 (its session file lists that one alone): it cannot fail over.
    grid = FedGrid(sock_dir, grace_s=1.0)
    grid.session_first = lambda index, full=grid.session_first: (
        full(index) if index == 0 else dataclasses.replace(full(index), rendezvous_list=()))
    try:
        grid.start()
        grid.wait_converged()
        rv1 = grid.rvs["rendezvous"]
        kept = []
        rv1.directory.add_listener(lambda joined, left: kept.extend(e.name for e in left))
        grid.rvs.pop("rendezvous-2").stop()
        wait_for(lambda: rv1.federation.counters["lost"] >= 1, "rendezvous notices rendezvous-2 is gone")
        assert names_of(rv1.directory) >= set(NAMES) and not kept  # kept for the grace
        wait_for(lambda: not names_of(rv1.directory) & {"L2", "m2"}, "L2 and m2 leave after the grace",
                 timeout=1.0 + CONVERGE_TIMEOUT_S, directories=[rv1.directory])
        assert rv1.federation.counters["expired"] == 1
        grid.nodes["m1"].wait_directory(present=("L1", "m1"), absent=("L2", "m2"), timeout=CONVERGE_TIMEOUT_S)
    finally:
        grid.stop()


@pytest.mark.parametrize("name,cluster,code", [
    ("L1", None, "name-taken"),  # L1's name, held at the other rendez-vous node
    ("m1", None, "name-taken"),
    ("newcomer", "A", "cluster-taken"),  # L1 leads A, at the other rendez-vous node
    ("rendezvous-2", None, "name-reserved"),
])
def test_names_and_clusters_held_at_another_rendezvous_node_are_refused(fed, name, cluster, code):
    node = Node(fed.session_first(1), name, cluster=cluster, listen_address="127.0.0.1:0", control="").start()
    try:
        with pytest.raises(AuthError) as info:
            node.wait_joined(JOIN_TIMEOUT_S)
        assert info.value.method == code
    finally:
        node.stop()
    assert fed.nodes["m1"].ping("m2", timeout=ANSWER_TIMEOUT_S).hops == 5


def test_three_rendezvous_nodes_route_every_pair_and_a_lost_one_s_leader_moves_to_the_next(sock_dir):
    ports = free_ports(3)
    session = create_session(sock_dir / "session3", [f"127.0.0.1:{p}" for p in ports])
    rvs, nodes = [], []
    try:
        for i, port in enumerate(ports):
            rvs.append(RendezvousNode(session, listen_address=f"127.0.0.1:{port}", control="").start())
        for i, port in enumerate(ports):  # K0 on rendezvous, K1 on rendezvous-2, K2 on rendezvous-3
            nodes.append(Node(dataclasses.replace(session, rendezvous_port=port), f"K{i}", cluster=f"C{i}",
                              listen_address="127.0.0.1:0", control="").start())
        for node in nodes:
            assert node.wait_joined(JOIN_TIMEOUT_S)
            node.wait_directory(present=("K0", "K1", "K2"), timeout=CONVERGE_TIMEOUT_S)
        for a, b in ((0, 1), (1, 2), (2, 0), (0, 2)):
            route = nodes[a].ping(f"K{b}", timeout=ANSWER_TIMEOUT_S).route_there
            assert route == (f"K{a}", rendezvous_name(a), rendezvous_name(b), f"K{b}")
        rvs[1].stop()  # K1 moves to the next one of the list: rendezvous-3
        wait_for(lambda: nodes[1].node_id in rvs[2].leaders, "K1 fails over to rendezvous-3",
                 timeout=FAILOVER_GRACE_S + JOIN_TIMEOUT_S)
        # (rendezvous hears of it with rendezvous-3's next broadcast)
        wait_for(lambda: rvs[0].federation.authority(nodes[1].node_id) == "rendezvous-3",
                 "rendezvous learns that K1 is at rendezvous-3", directories=[rvs[0].directory])
        for a, b in ((0, 1), (1, 0), (2, 1)):
            assert nodes[a].ping(f"K{b}", timeout=ANSWER_TIMEOUT_S).hops <= 3
    finally:
        for node in nodes:
            node.stop()
        for rv in rvs:
            rv.stop()
