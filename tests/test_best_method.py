"""Best, not first: a race won by a lower tier (relay) lets a better candidate finish in the
background; the better one is cached for the next connection, its late connection is never
delivered, and ``gridsock status`` paths show the ranking and why.

The loopback grid (:mod:`gridsock.testing.grid`), m1 -> L1 (one cluster: no filter required).
The better candidate is ``held``: ``tcp`` whose dial waits for the test to open its gate, so the
relay connects first whatever the machine's load, with no clock in the test.
"""
from __future__ import annotations

import gevent.event
import pytest

from gridsock import assembly
from gridsock.bootstrap.transport import Address
from gridsock.components.tcp import TcpMethod
from gridsock.testing.grid import JOIN_TIMEOUT_S, loopback_grid
from gridsock.testing.methods import FixedRules, wait_until

pytestmark = pytest.mark.timeout(120)

PORT = 5200


class HeldMethod(TcpMethod):
    """``tcp`` whose dials wait until :attr:`gate` is open (register it as ``held``)."""

    name = "held"
    gate = gevent.event.Event()
    cancelled = 0

    def dial(self, address: Address, *, node, timeout: float = 5.0):
        try:
            HeldMethod.gate.wait(60)
        except gevent.GreenletExit:
            HeldMethod.cancelled += 1
            raise
        return super().dial(address, node=node, timeout=timeout)


@pytest.fixture(scope="module")
def loopback(tmp_path_factory):
    from gridsock.registry import default_registry

    default_registry.register("held", HeldMethod)
    try:
        with loopback_grid(tmp_path_factory.mktemp("best")) as running:
            yield running, running["L1"].listen(PORT)
    finally:
        default_registry.unregister("held")


@pytest.fixture
def m1(loopback, monkeypatch):
    grid, _ = loopback
    node = grid["m1"]
    monkeypatch.setattr(assembly, "STAGGER_S", 0.01)  # the relay starts at once behind the held dial
    monkeypatch.setattr(assembly, "CACHED_HEAD_START_S", 3600.0)  # a cached winner runs alone unless it fails
    monkeypatch.setattr(node.assembler, "rules", FixedRules(order=("held", "relay")))
    node.assembler._winners.clear()
    HeldMethod.gate.clear()
    yield node
    HeldMethod.gate.set()  # (a dial still held ends)
    node.assembler._winners.clear()


def path_to(node, peer: str) -> dict:
    return {p["peer"]: p for p in node.status()["paths"]}[peer]


def echo_once(client, server, data: bytes) -> None:
    client.send_all(data)
    got = b""
    while len(got) < len(data):
        chunk = server.receive_some(65536)
        assert chunk, "closed early"
        got += chunk
    assert got == data


def test_relay_first_then_the_better_method_is_cached_and_used_next(loopback, m1):
    _, listener = loopback
    counters = loopback[0]["L1"].assembler.counters
    before = dict(counters)

    client, info = m1.open_stream("L1", PORT)
    server, server_info = listener.accept_stream(timeout=JOIN_TIMEOUT_S)
    assert info.stack == server_info.stack == "relay"
    assert info.detail["tried"] == [("held", "still trying in the background: relay connected first")]
    echo_once(client, server, b"relayed")
    path = path_to(m1, "L1")
    assert path["stack"] == "relay" and path["cached"]["stack"] == "relay" and path["better_later"] is None
    assert path["ranking"] == [{"stack": "held", "tier": "direct"}, {"stack": "relay", "tier": "relay"}]

    HeldMethod.gate.set()  # the better method connects now, after the race
    wait_until(lambda: path_to(m1, "L1")["better_later"] == "held", JOIN_TIMEOUT_S, "held finished later")
    wait_until(lambda: counters["not_taken"] == before["not_taken"] + 1, JOIN_TIMEOUT_S,
               "the server closed the late connection")
    path = path_to(m1, "L1")
    assert path["cached"]["stack"] == "held"
    reasons = {r["stack"]: r["reason"] for r in path["reasons"]}
    assert reasons["held"].startswith("finished later: better than relay")
    assert path["tried"] == [["held", reasons["held"]]]
    assert counters["delivered"] == before["delivered"] + 1  # the late one was never delivered
    echo_once(server, client, b"still relayed")  # the application's connection is untouched

    again, again_info = m1.open_stream("L1", PORT)
    again_server, again_server_info = listener.accept_stream(timeout=JOIN_TIMEOUT_S)
    assert again_info.stack == again_server_info.stack == "held"
    assert "tried" not in again_info.detail  # the cached better method won alone
    echo_once(again, again_server, b"direct now")
    path = path_to(m1, "L1")
    assert (path["stack"], path["cached"]["stack"], path["direct"]) == ("held", "held", True)
    assert "held" not in {r["stack"] for r in path["reasons"]}
    assert counters["delivered"] == before["delivered"] + 2
    for stream in (client, server, again, again_server):
        stream.close()


def test_a_better_method_that_does_not_connect_in_time_is_cancelled_and_relay_stays(loopback, m1, monkeypatch):
    _, listener = loopback
    monkeypatch.setattr(assembly, "BETTER_LATE_S", 0.2)
    cancelled = HeldMethod.cancelled

    client, info = m1.open_stream("L1", PORT)
    server, _ = listener.accept_stream(timeout=JOIN_TIMEOUT_S)
    assert info.stack == "relay"
    wait_until(lambda: HeldMethod.cancelled == cancelled + 1, JOIN_TIMEOUT_S, "the held dial was cancelled")
    wait_until(lambda: "cancelled" in {r["stack"]: r["reason"] for r in path_to(m1, "L1")["reasons"]}.get("held", ""),
               JOIN_TIMEOUT_S, "the reason says so")
    path = path_to(m1, "L1")
    why = {r["stack"]: r["reason"] for r in path["reasons"]}["held"]
    assert why == "cancelled: not connected within 0.2 s after relay connected"
    assert path["cached"]["stack"] == "relay" and path["better_later"] is None
    echo_once(client, server, b"relay kept")
    client.close()
    server.close()


def test_a_winner_of_the_best_tier_cancels_the_others_at_once(loopback, m1, monkeypatch):
    _, listener = loopback
    monkeypatch.setattr(m1.assembler, "rules", FixedRules(order=("held", "tcp")))
    cancelled = HeldMethod.cancelled

    client, info = m1.open_stream("L1", PORT)
    server, _ = listener.accept_stream(timeout=JOIN_TIMEOUT_S)
    assert info.stack == "tcp"
    assert info.detail["tried"] == [("held", "cancelled: tcp connected first")]  # same tier: not better
    assert HeldMethod.cancelled == cancelled + 1
    client.close()
    server.close()
