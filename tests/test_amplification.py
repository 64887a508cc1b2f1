"""No amplification: what one enrolled node registers cannot make the rendez-vous node connect
anywhere at will (gridsock/bootstrap/dialback.py).

The end-to-end test drives a leader by hand (enrolled with the join token, mutual TLS, ``Hello``
as a leader) that registers a thousand phantom members with eight addresses each, all pointing
at loopback listeners of this test that count the connections they get: the rendez-vous node
opens at most ``DIALBACK_BURST_PER_NODE`` of them. The limits, the plausibility rule and the
cache are also checked one by one, with an injected clock and a probe function that counts.
"""
from __future__ import annotations

import logging
import time
import uuid

import gevent
import pytest
from gevent import socket as gsocket

from gridsock import wire
from gridsock.bootstrap.dialback import (DIALBACK_BURST_PER_NODE, MAX_REGISTERED_ADDRS, DialBack, TokenBucket,
                                         plausible)
from gridsock.bootstrap.link import read_message, send_message
from gridsock.bootstrap.rendezvous import RendezvousNode
from gridsock.bootstrap.transport import Address, dial, parse_address, tls_client
from gridsock.errors import ConnectError
from gridsock.session import Identity, client_context, create_session, new_node_key

pytestmark = pytest.mark.timeout(60)

# Bounds that only stop a broken rendez-vous node from hanging the test (loopback takes ms).
ANSWER_TIMEOUT_S = 10.0
SETTLE_TIMEOUT_S = 40.0
# Listeners the phantom addresses point at: more than the per-node burst, so that the cache
# alone (one probe per address) could not keep the count under it.
LISTENERS = 4 * DIALBACK_BURST_PER_NODE
PHANTOMS = 1000


class CountingListeners:
    """Loopback listeners that accept, count and close every connection at once."""

    def __init__(self, n: int) -> None:
        self.socks = []
        for _ in range(n):
            sock = gsocket.socket(gsocket.AF_INET, gsocket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            sock.listen(128)
            self.socks.append(sock)
        self.count = 0
        self._greenlets = [gevent.spawn(self._serve, s) for s in self.socks]

    @property
    def ports(self):
        return [s.getsockname()[1] for s in self.socks]

    def _serve(self, sock) -> None:
        while True:
            conn, _ = sock.accept()
            self.count += 1
            conn.close()

    def close(self) -> None:
        gevent.killall(self._greenlets)
        for s in self.socks:
            s.close()


@pytest.fixture
def rv(tmp_path):
    session = create_session(tmp_path / "session", "127.0.0.1:1")
    # No refill of the per-node budget: the bound is the burst, however long the test takes.
    node = RendezvousNode(session, listen_address="127.0.0.1:0", control="",
                          dialback_options={"rate_per_node": 0.0}).start()
    try:
        yield node
    finally:
        node.stop()


def enroll(rv: RendezvousNode, name: str) -> Identity:
    key_pem, csr_pem = new_node_key()
    sock = tls_client(dial(rv.address, timeout=ANSWER_TIMEOUT_S), client_context(rv.session, None), timeout=ANSWER_TIMEOUT_S)
    try:
        send_message(sock, wire.Enroll(token=rv.session.join_token, csr_pem=csr_pem.decode(), name=name))
        reply = read_message(sock, wire.Decoder(), timeout=ANSWER_TIMEOUT_S)
    finally:
        sock.close()
    assert isinstance(reply, wire.Enrolled), reply
    return Identity(reply.cert_pem.encode(), key_pem)


def settled(rv: RendezvousNode, names) -> None:
    """Wait until the rendez-vous directory holds every name in ``names`` with a verdict."""
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    while True:
        entries = {e.name: e for e in rv.directory}
        if all(n in entries and entries[n].inbound is not None for n in names):
            return
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"not settled after {SETTLE_TIMEOUT_S} s"
        rv.directory.wait_changed(remaining)


def test_phantom_members_with_many_addresses_make_few_connections(rv, caplog):
    listeners = CountingListeners(LISTENERS)
    try:
        spellings = [f"127.0.0.1:{p}" for p in listeners.ports] + [f"localhost:{p}" for p in listeners.ports]
        identity = enroll(rv, "attacker")
        sock = tls_client(dial(rv.address, timeout=ANSWER_TIMEOUT_S), client_context(rv.session, identity),
                          timeout=ANSWER_TIMEOUT_S)
        try:
            # Its own addresses first: eight of the listeners.
            send_message(sock, wire.Hello(name="attacker", cluster="X", role="leader", addrs=tuple(spellings[:wire.MAX_ADDRS])))
            decoder = wire.Decoder()
            welcome = read_message(sock, decoder, timeout=ANSWER_TIMEOUT_S)
            assert isinstance(welcome, wire.Welcome), welcome
            me = welcome.entry.node_id
            assert len(welcome.entry.addrs) == MAX_REGISTERED_ADDRS  # (cut, with a log line)
            phantoms = []
            for i in range(PHANTOMS):
                addrs = tuple(spellings[(i * wire.MAX_ADDRS + k) % len(spellings)] for k in range(wire.MAX_ADDRS))
                phantoms.append(wire.NodeEntry(node_id=str(uuid.uuid4()), name=f"phantom{i}", cluster="X", leader=me,
                                               role="member", addrs=addrs))
            with caplog.at_level(logging.WARNING, logger="gridsock.bootstrap"):
                send_message(sock, wire.Register(tuple(phantoms)))
                settled(rv, ["attacker"] + [p.name for p in phantoms])
        finally:
            sock.close()
        # Every phantom got a verdict, and the listeners saw at most the per-node burst.
        assert 0 < listeners.count <= DIALBACK_BURST_PER_NODE, listeners.count
        counters = rv.dialback.counters
        assert counters["probes"] <= DIALBACK_BURST_PER_NODE
        assert counters["limited"] > 0
        assert all(len(e.addrs) <= MAX_REGISTERED_ADDRS for e in rv.directory)
        assert not any(e.inbound for e in rv.directory)
        messages = [r.getMessage() for r in caplog.records]
        assert any("MAX_REGISTERED_ADDRS" in m for m in messages)
        assert sum("budget is spent" in m for m in messages) == 1  # (once per node and interval)
    finally:
        listeners.close()


def test_a_real_leader_is_still_found_reachable(rv, tmp_path):
    # The bounds keep the check itself working: a node that answers on its node port is inbound.
    import dataclasses

    from gridsock.node import Node

    session = dataclasses.replace(rv.session, rendezvous_port=rv.address.port)
    node = Node(session, "real", listen_address="127.0.0.1:0", control="", front_door=None, loop="caller").start()
    try:
        assert node.wait_joined(ANSWER_TIMEOUT_S)
        settled(rv, ["real"])
        assert rv.directory.by_name("real").inbound is True
        assert rv.dialback.counters["probes"] == 1
    finally:
        node.stop()


# --- the rules one by one ------------------------------------------------------------------------

@pytest.mark.parametrize("ip, observed, ok", [
    ("127.0.0.1", "127.0.0.1", True),
    ("127.0.0.2", "127.0.0.1", True),           # loopback from loopback
    ("10.0.0.7", "127.0.0.1", False),           # a private network, from loopback
    ("10.1.0.11", "10.1.0.11", True),
    ("10.2.0.5", "10.1.0.11", True),            # private from private: a private grid
    ("203.0.113.9", "10.1.0.11", False),        # public, from a private source
    ("198.51.100.12", "198.51.100.11", True),   # the same /24
    ("198.51.101.12", "198.51.100.11", False),  # another /24
    ("10.1.0.12", "203.0.113.5", False),        # private, from a public source (behind a NAT)
    ("::1", "127.0.0.1", False),                # another family
    ("2001:db8::2", "2001:db8::1", True),       # the same /64
    ("2001:db8:0:1::2", "2001:db8::1", False),
    ("::ffff:127.0.0.1", "127.0.0.1", True),    # IPv4-mapped
    ("0.0.0.0", "198.51.100.11", False),
    ("224.0.0.1", "10.0.0.1", False),
])
def test_plausible(ip, observed, ok):
    assert (plausible(ip, observed) is None) == ok, plausible(ip, observed)


def test_plausible_without_a_source_dials_nothing():
    assert plausible("127.0.0.1", None)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_token_bucket_burst_then_rate():
    clock = Clock()
    bucket = TokenBucket(3, 2.0, clock)
    for _ in range(3):
        assert bucket.wait_for_one() == 0
        bucket.take()
    assert bucket.wait_for_one() == pytest.approx(0.5)
    clock.now += 0.5
    assert bucket.wait_for_one() == 0
    assert TokenBucket(0, 0.0, clock).wait_for_one() == float("inf")


def counting_probe(answers):
    """A probe that counts its calls and answers as ``answers[(ip, port)]`` (an id), or fails."""
    calls = []

    def probe(address: Address, node_id: str) -> str:
        calls.append((address.host, address.port))
        answer = answers.get((address.host, address.port))
        if answer is None:
            raise ConnectError(f"cannot connect to {address}: refused")
        return answer

    return probe, calls


def test_results_are_cached_per_address_for_any_node():
    clock = Clock()
    probe, calls = counting_probe({("127.0.0.1", 7000): "node-a"})
    dialback = DialBack(probe, clock=clock, cache_s=30.0)
    assert dialback.check("node-a", ["127.0.0.1:7000"], registrar="L", observed="127.0.0.1:5000") == (True, [])
    inbound, reasons = dialback.check("node-b", ["127.0.0.1:7000"], registrar="L", observed="127.0.0.1:5000")
    assert not inbound and "node-a answers there" in reasons[0]
    assert calls == [("127.0.0.1", 7000)]
    clock.now += 31.0
    dialback.check("node-a", ["127.0.0.1:7000"], registrar="L", observed="127.0.0.1:5000")
    assert len(calls) == 2


def test_limits_per_node_and_global():
    clock = Clock()
    probe, calls = counting_probe({})
    dialback = DialBack(probe, clock=clock, burst_per_node=2, rate_per_node=0.0, burst_global=3, rate_global=0.0)
    for port in range(7000, 7005):
        dialback.check("n", [f"127.0.0.1:{port}"], registrar="L1", observed="127.0.0.1:1")
    assert len(calls) == 2  # L1's burst
    for port in range(8000, 8005):
        dialback.check("n", [f"127.0.0.1:{port}"], registrar="L2", observed="127.0.0.1:1")
    assert len(calls) == 3  # the global burst
    assert dialback.counters["limited"] == 7


def test_implausible_and_extra_addresses_are_not_dialed():
    probe, calls = counting_probe({})
    dialback = DialBack(probe)
    addrs = ["203.0.113.7:7000"] + [f"127.0.0.1:{7000 + i}" for i in range(wire.MAX_ADDRS)]
    inbound, reasons = dialback.check("n", addrs, registrar="L", observed="127.0.0.1:1")
    assert not inbound
    assert "not dialed" in reasons[0]
    assert len(calls) == MAX_REGISTERED_ADDRS - 1  # the first of the kept four was implausible
    assert dialback.counters["implausible"] == 1


def test_a_rate_limited_probe_waits_for_its_turn():
    probe, calls = counting_probe({("127.0.0.1", 7001): "n"})
    dialback = DialBack(probe, burst_per_node=1, rate_per_node=50.0)
    dialback.check("n", ["127.0.0.1:7000"], registrar="L", observed="127.0.0.1:1")
    # The second probe waits for a token (1/50 s), then is made.
    assert dialback.check("n", ["127.0.0.1:7001"], registrar="L", observed="127.0.0.1:1") == (True, [])
    assert len(calls) == 2


def test_parse_errors_are_reasons():
    probe, calls = counting_probe({})
    inbound, reasons = DialBack(probe).check("n", ["no-port"], registrar="L", observed="127.0.0.1:1")
    assert not inbound and reasons and not calls
    assert parse_address("127.0.0.1:1").port == 1
