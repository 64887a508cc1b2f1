"""The grid keeps working without a rendez-vous node (issue 12).

An in-process grid on loopback: a rendez-vous node, two leaders, L1 (cluster A) and L2
(cluster B), and m1, a member of L1, each serving a grid port. A first connection between two
of them opens a meta link beside it. Then the rendez-vous node stops: the two nodes keep each
other in their directories (the meta link vouches for its peer), and new data connections
between them are assembled over the meta link, both ways, and echo bytes; what truly needs
the bootstrap channel (a relay) fails instead of hanging. A member keeps its peer too when
its leader, which has no link to that peer, says the peer left. When the meta link closes,
the peer leaves the directory; when the rendez-vous node is back, the directories converge
again.
"""
from __future__ import annotations

import dataclasses
import time

import gevent
import gevent.socket
import pytest

from gridsock.bootstrap.rendezvous import RendezvousNode
from gridsock.errors import ConnectError, GridsockError
from gridsock.node import Node
from gridsock.session import create_session

pytestmark = pytest.mark.timeout(120)

PORT = 5400
NAMES = ("L1", "m1", "L2")
# Joining, converging and opening a link take milliseconds on loopback; these only stop a broken
# grid hanging (generous: the CI machine is slower and busy).
READY_TIMEOUT_S = 20.0
# How often a condition that has no event of its own (a link's state) is looked at.
POLL_S = 0.05
# A connection that must fail (no bootstrap channel) is given this long.
FAIL_TIMEOUT_S = 5.0


def wait_until(condition, what: str, timeout: float = READY_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s"
        gevent.sleep(POLL_S)


def meta_link_up(node: Node, peer: Node) -> bool:
    link = node.meta.links.get(peer.node_id)
    return link is not None and not link.closed


@pytest.fixture
def grid(tmp_path):
    session = create_session(tmp_path / "session", "127.0.0.1:7700")
    rv = RendezvousNode(session, listen_address="127.0.0.1:0", control="").start()
    session = dataclasses.replace(session, rendezvous_port=rv.address.port)
    nodes = {}
    running = {"rv": rv}  # (a test may start another rendez-vous node in its place)
    try:
        for name, cluster, leader in (("L1", "A", None), ("m1", "A", "L1"), ("L2", "B", None)):
            nodes[name] = Node(session, name, cluster=cluster, leader=str(nodes[leader].address) if leader else None,
                               listen_address="127.0.0.1:0", control="").start()
            assert nodes[name].wait_joined(READY_TIMEOUT_S), f"{name} did not join"
        for node in nodes.values():
            node.wait_directory(present=list(NAMES), timeout=READY_TIMEOUT_S)
            # (the peers' dial-back verdicts: a meta link is opened only to a peer that accepts inbound
            # connections, or of the same cluster)
            wait_until(lambda: all(e.inbound is not None for e in node.directory if e.node_id != node.node_id),
                       f"the dial-back verdicts in {node.name}'s directory")
        listeners = {name: node.listen(PORT) for name, node in nodes.items()}
        running.update(session=session, listeners=listeners, **nodes)
        yield running
    finally:
        for node in nodes.values():
            node.stop()
        running["rv"].stop()
        gevent.idle()  # (the greenlets they killed without waiting end now, in this module)


def echo(grid, src: str, dst: str, *, stack=None) -> str:
    """Connect ``src`` to ``dst``'s grid port, send bytes both ways; return the stack used."""
    sock, info = grid[src].connect(dst, PORT, stack=stack, timeout=READY_TIMEOUT_S)
    server, _ = grid["listeners"][dst].accept(timeout=READY_TIMEOUT_S)
    # (the nodes run in this thread's hub: its sockets must wait the gevent way)
    sock, server = (gevent.socket.socket(fileno=s.detach()) for s in (sock, server))
    with sock, server:
        payload = f"{src} to {dst} over {info.stack}".encode()
        sock.sendall(payload)
        got = b""
        while len(got) < len(payload):
            chunk = server.recv(len(payload) - len(got))
            assert chunk, "EOF before the payload"
            got += chunk
        assert got == payload
        server.sendall(got.upper())
        back = b""
        while len(back) < len(payload):
            chunk = sock.recv(len(payload) - len(back))
            assert chunk, "EOF before the echo"
            back += chunk
        assert back == payload.upper()
    return info.stack


def stop_rendezvous(grid) -> None:
    grid["rv"].stop()
    for name in ("L1", "L2"):
        wait_until(lambda: grid[name].uplink is None, f"{name} sees its uplink down")


def open_meta_link(grid, src: str, dst: str) -> None:
    """A first connection from ``src`` to ``dst``; return once a meta link joins the two."""
    echo(grid, src, dst, stack="tls/tcp")  # (its request takes the bootstrap channel; the link opens beside it)
    wait_until(lambda: meta_link_up(grid[src], grid[dst]) and meta_link_up(grid[dst], grid[src]),
               f"a meta link between {src} and {dst}")


def test_new_data_connections_go_over_the_meta_link_while_the_rendezvous_is_down(grid):
    L1, L2 = grid["L1"], grid["L2"]
    open_meta_link(grid, "L1", "L2")
    stop_rendezvous(grid)

    # Each still knows the other (the link vouches for it), and its own cluster.
    assert {e["name"] for e in L1.wait_directory(present=["L2"], timeout=READY_TIMEOUT_S)} == {"L1", "m1", "L2"}
    assert {e["name"] for e in L2.wait_directory(present=["L1"], timeout=READY_TIMEOUT_S)} == {"L1", "L2"}
    before = dict(L1.meta.counters)
    assert echo(grid, "L1", "L2", stack="tls/tcp") == "tls/tcp"
    assert echo(grid, "L2", "L1", stack="tls/tcp") == "tls/tcp"
    assert echo(grid, "L1", "L2") != "tls/relay"  # the rules' race: a direct method wins, the relay cannot
    assert L1.meta.counters["on_link"] >= before["on_link"] + 2
    assert L1.meta.counters["on_bootstrap"] == before["on_bootstrap"]
    assert meta_link_up(L1, L2)

    # What needs the bootstrap channel fails (it does not hang): a relayed connection.
    with pytest.raises(ConnectError):
        L1.connect("L2", PORT, stack="relay", timeout=FAIL_TIMEOUT_S)


def test_without_a_meta_link_the_peer_leaves_and_the_directories_converge_again(grid):
    L1, L2 = grid["L1"], grid["L2"]
    open_meta_link(grid, "L1", "L2")
    port = grid["rv"].address.port
    stop_rendezvous(grid)
    L1.wait_directory(present=["L2"], timeout=READY_TIMEOUT_S)

    link = L1.meta.links[L2.node_id]
    L1.call(link.close, "test: the meta link goes")  # nothing vouches for L2 any more
    L1.wait_directory(absent=["L2"], timeout=READY_TIMEOUT_S)
    with pytest.raises(GridsockError):
        L1.connect("L2", PORT, timeout=FAIL_TIMEOUT_S)

    grid["rv"] = RendezvousNode(grid["session"], listen_address=f"127.0.0.1:{port}", control="").start()
    for name in NAMES:
        grid[name].wait_directory(present=list(NAMES), timeout=READY_TIMEOUT_S + 10)
    assert echo(grid, "L1", "L2", stack="tls/tcp") == "tls/tcp"


def test_a_member_keeps_its_peer_when_its_leader_says_the_peer_left(grid):
    m1, L1, L2 = grid["m1"], grid["L1"], grid["L2"]
    open_meta_link(grid, "m1", "L2")
    assert not meta_link_up(L1, L2)  # (L1 has none: it forgets L2 when the rendez-vous node goes)
    stop_rendezvous(grid)
    L1.wait_directory(absent=["L2"], timeout=READY_TIMEOUT_S)
    # m1's uplink (to L1) is up, and L1 tells it L2 left (with its next broadcast); m1's link to L2
    # keeps it.
    assert m1.uplink is not None
    wait_until(lambda: L2.node_id in m1.meta.kept, "m1 keeps L2 that L1 said left")
    assert {e.name for e in m1.directory} == set(NAMES)
    assert echo(grid, "m1", "L2", stack="tls/tcp") == "tls/tcp"
    assert echo(grid, "L2", "m1", stack="tls/tcp") == "tls/tcp"

    link = m1.meta.links[L2.node_id]
    m1.call(link.close, "test: the meta link goes")
    m1.wait_directory(absent=["L2"], timeout=READY_TIMEOUT_S)
    assert L2.node_id not in m1.meta.kept
