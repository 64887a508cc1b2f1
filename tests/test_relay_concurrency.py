"""Bursts of connections (issue 16): relayed connections opened at once, in both directions,
between several pairs of nodes, never collide (the ids the two nodes of a pair pick are
disjoint); a connection that finds its port's backlog full waits for room."""
from __future__ import annotations

import dataclasses
import hashlib
import os
import uuid

import gevent
import gevent.pool
import pytest

from gridsock.components.relay import RelayManager
from gridsock.rules import Rules
from gridsock.testing.grid import JOIN_TIMEOUT_S, NAMES

pytestmark = pytest.mark.timeout(240)

PORT = 5400
# Connections each ordered pair of the grid's four nodes opens at once (12 pairs).
PER_PAIR = 12
# Bytes each connection sends and gets back.
ECHO_BYTES = 32 * 1024
# Every connection of the burst is up and echoed within this (loaded 2-core machine).
BURST_TIMEOUT_S = 120.0


# --- the ids themselves ----------------------------------------------------------------------


def test_the_two_nodes_of_a_pair_pick_disjoint_ids():
    a, b = str(uuid.uuid4()), str(uuid.uuid4())
    ma, mb = RelayManager(lambda dst, payload: None), RelayManager(lambda dst, payload: None)
    ma._next_conn_id = mb._next_conn_id = 41  # the worst case: both counters at the same place
    from_a = {ma.new_conn_id(b, a) for _ in range(1000)}
    from_b = {mb.new_conn_id(a, b) for _ in range(1000)}
    assert len(from_a) == len(from_b) == 1000
    assert not from_a & from_b
    assert len({i % 2 for i in from_a}) == len({i % 2 for i in from_b}) == 1


def test_an_id_still_in_use_with_the_peer_is_skipped_and_ids_wrap():
    a, b = "a" * 36, "b" * 36  # a sorts first: even ids
    manager = RelayManager(lambda dst, payload: None)
    manager._next_conn_id = 2**32 - 2
    held = manager.open(b, 2**32 - 2)  # open already, e.g. from before a restart
    assert manager.new_conn_id(b, a) == 0  # skipped, wrapped
    assert manager.new_conn_id(b, a) % 2 == 0
    held.close()


def test_both_directions_open_at_once_through_two_managers():
    # Node A and node B open 500 relayed connections to each other at the same moment; each
    # responder opens its end under the initiator's id, as RelayMethod.respond does.
    a, b = str(uuid.uuid4()), str(uuid.uuid4())
    managers: dict = {}
    managers[a] = RelayManager(lambda dst, payload: managers[dst].on_message(a, payload))
    managers[b] = RelayManager(lambda dst, payload: managers[dst].on_message(b, payload))
    for manager in managers.values():
        manager._next_conn_id = 7
    pairs = []
    for _ in range(500):
        for src, dst in ((a, b), (b, a)):
            conn = managers[src].new_conn_id(dst, src)
            pairs.append((managers[src].open(dst, conn), managers[dst].open(src, conn)))  # never "exists already"
    assert len(managers[a]) == len(managers[b]) == 1000
    for initiator, responder in pairs:
        initiator.send_all(b"x")
        assert responder.receive_some(10) == b"x"
        initiator.close()
    assert len(managers[a]) == len(managers[b]) == 0


def test_frames_shrink_as_connections_with_a_peer_multiply():
    # A handshake frame of a new connection waits behind one frame of each busy connection
    # with the same peer: with hundreds of them, the frames are small.
    from gridsock.components.relay import RELAY_CHUNK_BYTES, RELAY_LINE_BYTES, RELAY_MIN_CHUNK_BYTES

    a, b = "a" * 36, "b" * 36
    sent: list = []
    manager = RelayManager(lambda dst, payload: sent.append(len(payload) - 9))
    first = manager.open(b, manager.new_conn_id(b, a))
    first.send_all(bytes(RELAY_CHUNK_BYTES))
    assert sent == [RELAY_CHUNK_BYTES]  # one connection: full frames
    others = [manager.open(b, manager.new_conn_id(b, a)) for _ in range(499)]
    assert manager.chunk_bytes(b) == max(RELAY_MIN_CHUNK_BYTES, RELAY_LINE_BYTES // 500)
    sent.clear()
    others[0].send_all(bytes(100_000))
    assert max(sent) == manager.chunk_bytes(b) and sum(sent) == 100_000
    for stream in others:
        stream.close()
    assert manager.chunk_bytes(b) == RELAY_CHUNK_BYTES  # the others closed: full frames again
    assert manager.chunk_bytes(a) == RELAY_CHUNK_BYTES  # (another peer's count is its own)
    first.close()


# --- between the nodes of a loopback grid ----------------------------------------------------


# Stopped nodes' greenlets end within this.
STOP_TIMEOUT_S = 10.0


def _live_greenlets() -> set:
    import gc

    return {obj for obj in gc.get_objects() if isinstance(obj, gevent.Greenlet) and not obj.dead}


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    from gridsock.bootstrap.rendezvous import RendezvousNode
    from gridsock.node import Node
    from gridsock.session import create_session

    before = _live_greenlets()
    session = create_session(tmp_path_factory.mktemp("relayc") / "session", "127.0.0.1:7700")
    rv = RendezvousNode(session, listen_address="127.0.0.1:0", control="").start()
    session = dataclasses.replace(session, rendezvous_port=rv.address.port)
    nodes: dict = {}
    try:
        # Two clusters of a leader and a member, as gridsock.testing.grid's; everybody accepts
        # plain relay (no tls: the ids are what is tested, not the filters).
        for name, cluster, leader in (("L1", "A", None), ("m1", "A", "L1"), ("L2", "B", None), ("m2", "B", "L2")):
            nodes[name] = Node(session, name, cluster=cluster, leader=str(nodes[leader].address) if leader else None,
                               listen_address="127.0.0.1:0", control="", agent="",
                               rules=Rules(outside_cluster=())).start()
            assert nodes[name].wait_joined(JOIN_TIMEOUT_S), f"{name} did not join"
        for node in nodes.values():
            node.wait_directory(present=NAMES, timeout=JOIN_TIMEOUT_S)
        yield nodes
    finally:
        for node in nodes.values():
            node.stop()
        rv.stop()
        # (stop() kills the nodes' greenlets without waiting: they end here, not in the next module)
        gevent.joinall(list(_live_greenlets() - before), timeout=STOP_TIMEOUT_S)


def _echo(stream) -> None:
    try:
        while True:
            data = stream.receive_some(65536)
            if not data:
                break
            stream.send_all(data)
        stream.send_eof()
    finally:
        stream.close()


def test_many_relayed_connections_at_once_between_every_pair_in_both_directions(grid):
    listeners = {name: node.listen(PORT) for name, node in grid.items()}
    servers = gevent.pool.Group()

    def serve(listener) -> None:
        while True:
            stream, _ = listener.accept_stream()
            servers.spawn(_echo, stream)

    acceptors = [gevent.spawn(serve, listener) for listener in listeners.values()]
    payload = os.urandom(ECHO_BYTES)
    digest = hashlib.sha256(payload).digest()

    def one(src: str, dst: str) -> str:
        stream, info = grid[src].open_stream(dst, PORT, stack="relay", timeout=BURST_TIMEOUT_S)
        try:
            assert info.stack == "relay" and "tried" not in info.detail, info.detail.get("tried")
            sender = gevent.spawn(lambda: (stream.send_all(payload), stream.send_eof()))
            got = bytearray()
            while True:
                data = stream.receive_some(65536)
                if not data:
                    break
                got += data
            sender.get()
            assert hashlib.sha256(got).digest() == digest
            return f"{src}->{dst}"
        finally:
            stream.close()

    try:
        jobs = [gevent.spawn(one, src, dst) for src in grid for dst in grid if src != dst for _ in range(PER_PAIR)]
        gevent.joinall(jobs, timeout=BURST_TIMEOUT_S)
        failures = [job.exception for job in jobs if job.ready() and not job.successful()]
        assert not failures, f"{len(failures)} of {len(jobs)} failed, first: {failures[0]!r}"
        assert all(job.ready() for job in jobs), "the burst did not finish"
        done = sorted(job.value for job in jobs)
        assert len(done) == 12 * PER_PAIR and len(set(done)) == 12
        refused = {name: node.assembler.counters["not_taken"] for name, node in grid.items()}
        assert refused == {name: 0 for name in grid}
    finally:
        gevent.killall(acceptors)
        servers.kill()
        for listener in listeners.values():
            listener.close()
    with gevent.Timeout(JOIN_TIMEOUT_S, AssertionError("relayed connections left open")):
        while any(len(node.relay) for node in grid.values()):
            gevent.sleep(0.05)


# --- a full backlog -------------------------------------------------------------------------


def test_a_connection_that_finds_the_backlog_full_waits_for_room():
    from gridsock.assembly import LISTEN_BACKLOG, DataListener

    class _Assembler:
        listeners: dict = {}

    listener = DataListener(_Assembler(), 1)
    for i in range(LISTEN_BACKLOG):
        assert listener._deliver((f"conn {i}", None))
    assert not listener._deliver(("refused at once", None))  # no wait asked for
    late = gevent.spawn(listener._deliver, ("late", None), timeout=30.0)
    gevent.sleep(0)
    assert not late.ready()  # waiting for room, not dropped
    assert listener.accept_stream(timeout=1)[0] == "conn 0"
    assert late.get(timeout=30) is True
    taken = [listener.accept_stream(timeout=1)[0] for _ in range(LISTEN_BACKLOG)]
    assert taken[-1] == "late"
