"""Gateways without rules, on loopback: what the directory carries, the candidates a node's own
gateways add, tiers, and a ``reverse`` whose dial back goes through the server's SOCKS gateway
(a small SOCKS5 server in this process that counts what it carries).

tests/lab/test_gateways.py checks the same in the lab, through cluster C's real front-end.
"""
from __future__ import annotations

import socket
import struct

import gevent
import gevent.server
import gevent.socket
import pytest

from gridsock import wire
from gridsock.rules import TIERS, Rules, gateways_of, own_gateways, tier
from gridsock.stack import Stack
from gridsock.testing.grid import JOIN_TIMEOUT_S, loopback_grid

pytestmark = pytest.mark.timeout(120)

PORT = 5300
ID = "00000000-0000-4000-8000-00000000000{}"
SSH_GATEWAY = "ssh(gateway=root@10.3.0.1:22)"
SOCKS_GATEWAY = "socks(proxy=10.3.0.1:1080)"


def entry(n: int, name: str, cluster=None, *, inbound=None, gateways=(), leader=None, role="leader"):
    return wire.NodeEntry(node_id=ID.format(n), name=name, cluster=cluster, leader=leader or ID.format(n),
                          role=role, addrs=(f"10.0.0.{n}:7701",), inbound=inbound, gateways=gateways)


# --- the directory entry -----------------------------------------------------------------------

def test_an_entry_without_gateways_reads_as_before_and_one_with_them_round_trips():
    plain = entry(1, "a1", "A", inbound=True)
    assert "gateways" not in plain.to_json()
    assert wire.NodeEntry.from_json(plain.to_json()) == plain  # (an old peer's entry: the default)
    private = entry(2, "c1", "C", inbound=False, gateways=(SSH_GATEWAY, SOCKS_GATEWAY))
    assert private.to_json()["gateways"] == [SSH_GATEWAY, SOCKS_GATEWAY]
    assert wire.NodeEntry.from_json(private.to_json()) == private


@pytest.mark.parametrize("bad", ["tcp", "ssh(gateway=10.3.0.1:22)", "socks(proxy=10.3.0.1)", "relay(x=1)",
                                 "socks(proxy=a:1)/tcp", 7, "socks(proxy=" + "h" * 400 + ":1)"])
def test_a_bad_gateway_is_refused(bad):
    data = dict(entry(1, "c1", "C").to_json(), gateways=[bad])
    with pytest.raises(ValueError, match="gateways"):
        wire.NodeEntry.from_json(data)


def test_too_many_gateways_are_refused():
    data = dict(entry(1, "c1", "C").to_json(), gateways=[SOCKS_GATEWAY] * (wire.NodeEntry.MAX_GATEWAYS + 1))
    with pytest.raises(ValueError, match="more than"):
        wire.NodeEntry.from_json(data)


# --- candidates and tiers ----------------------------------------------------------------------

def texts(stacks) -> list:
    return [str(s) for s in stacks]


def test_a_private_node_goes_out_through_its_own_gateways_to_an_inbound_peer():
    c1 = entry(1, "c1", "C", inbound=False, gateways=(SSH_GATEWAY, SOCKS_GATEWAY))
    rv = entry(2, "rv", inbound=True)
    a1 = entry(3, "a1", "A", inbound=False)
    assert texts(Rules().candidates(c1, rv)) == ["tls/tcp", "tls/" + SSH_GATEWAY, "tls/" + SOCKS_GATEWAY, "tls/relay"]
    # a1 accepts nothing: the gateway cannot reach it either, so it is no candidate
    assert texts(Rules().candidates(c1, a1)) == ["tls/splice", "tls/relay"]
    # one network: the gateway is not for its own cluster
    assert texts(Rules().candidates(c1, entry(4, "c2", "C", gateways=(SSH_GATEWAY,)))) == ["tcp", "tls/relay"]
    assert texts(Rules(tls=False).candidates(c1, rv)) == ["tcp", SSH_GATEWAY, SOCKS_GATEWAY, "relay"]
    assert texts(Rules(scheme="relay").candidates(c1, rv)) == ["tls/relay"]


def test_the_outside_reaches_a_private_node_by_a_call_back():
    rv = entry(2, "rv", inbound=True)
    c1 = entry(1, "c1", "C", inbound=False, gateways=(SSH_GATEWAY,))
    assert texts(Rules().candidates(rv, c1)) == ["tls/reverse", "tls/splice", "tls/relay"]


def test_rules_still_win_and_vias_come_before_own_gateways():
    c1 = entry(1, "c1", "C", inbound=False, gateways=(SSH_GATEWAY,))
    rv = entry(2, "rv", inbound=True)
    rules = Rules.from_dict({"via": [{"from": "cluster:C", "stack": "tls/socks(proxy=10.3.0.1:1080)"}]})
    assert texts(rules.candidates(c1, rv)) == ["tls/tcp", "tls/" + SOCKS_GATEWAY, "tls/" + SSH_GATEWAY, "tls/relay"]
    rules = Rules.from_dict({"rule": [{"from": "cluster:C", "stack": "tls/relay"}]})
    assert texts(rules.candidates(c1, rv)) == ["tls/relay"]


def test_tiers():
    assert TIERS == ("direct", "gateway", "relay")
    ranks = {text: tier(Stack.parse(text)) for text in
             ["tcp", "tls/reverse", "tls/splice", "parallel(streams=2)/tcp", "tls/" + SSH_GATEWAY,
              "tls/" + SOCKS_GATEWAY, "lz4/relay"]}
    assert ranks == {"tcp": 0, "tls/reverse": 0, "tls/splice": 0, "parallel(streams=2)/tcp": 0,
                     "tls/" + SSH_GATEWAY: 1, "tls/" + SOCKS_GATEWAY: 1, "lz4/relay": 2}

    class Slow:
        tier = "relay"

    assert tier(Stack.parse("tcp"), Slow()) == 2  # a component may say where it ranks


# --- a node's gateways -------------------------------------------------------------------------

class FakeDirectory(dict):
    def get(self, node_id, default=None):
        return super().get(node_id, default)


class FakeNode:
    def __init__(self, entry, *, ssh_gateway=None, socks_gateway=None, directory=()):
        self.entry = entry
        self.ssh_gateway = ssh_gateway
        self.socks_gateway = socks_gateway
        self.directory = FakeDirectory({e.node_id: e for e in directory})


def test_gateways_of_a_node_its_own_then_its_entrys_then_its_leaders():
    from gridsock.bootstrap.sshtunnel import SSHGateway

    leader = entry(1, "c1", "C", gateways=(SSH_GATEWAY,))
    c1 = FakeNode(leader, ssh_gateway=SSHGateway.parse("root@10.3.0.1:22"))
    assert own_gateways(c1) == gateways_of(c1) == (SSH_GATEWAY,)  # (its own, and its entry's: once)
    member = entry(2, "c2", "C", leader=leader.node_id, role="member")
    assert own_gateways(FakeNode(member, directory=[leader])) == ()
    assert gateways_of(FakeNode(member, directory=[leader])) == (SSH_GATEWAY,)
    c3 = FakeNode(member, socks_gateway="10.3.0.1:1080", directory=[leader])
    assert gateways_of(c3) == own_gateways(c3) == (SOCKS_GATEWAY,)  # its own first: not the leader's
    assert gateways_of(FakeNode(entry(5, "x", None))) == ()


# --- reverse through the server's SOCKS gateway, on loopback ---------------------------------------

def _recv_exactly(sock, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    return data


class Socks5Server:
    """The CONNECT command of SOCKS5 without authentication; counts where it connected."""

    def __init__(self) -> None:
        self.connected: list = []
        self.server = gevent.server.StreamServer(("127.0.0.1", 0), self._handle)
        self.server.start()
        self.address = f"127.0.0.1:{self.server.server_port}"

    def _handle(self, client, _address) -> None:
        try:
            _, count = _recv_exactly(client, 2)
            _recv_exactly(client, count)
            client.sendall(b"\x05\x00")
            _, command, _, kind = _recv_exactly(client, 4)
            if kind == 1:
                host = socket.inet_ntoa(_recv_exactly(client, 4))
            else:
                host = _recv_exactly(client, _recv_exactly(client, 1)[0]).decode()
            (port,) = struct.unpack("!H", _recv_exactly(client, 2))
            assert command == 1
            upstream = gevent.socket.create_connection((host, port), timeout=5)
        except (OSError, AssertionError, ConnectionError):
            client.close()
            return
        self.connected.append((host, port))
        client.sendall(b"\x05\x00\x00\x01" + socket.inet_aton("127.0.0.1") + b"\x00\x00")

        def pipe(src, dst) -> None:
            try:
                while True:
                    data = src.recv(65536)
                    if not data:
                        break
                    dst.sendall(data)
                dst.shutdown(socket.SHUT_WR)
            except OSError:
                pass

        gevent.joinall([gevent.spawn(pipe, client, upstream), gevent.spawn(pipe, upstream, client)])
        client.close()
        upstream.close()

    def stop(self) -> None:
        self.server.stop()


@pytest.fixture(scope="module")
def loopback(tmp_path_factory):
    with loopback_grid(tmp_path_factory.mktemp("gateways")) as running:
        yield running, {name: node.listen(PORT) for name, node in running.nodes.items()}


def test_a_reverse_dials_back_through_the_servers_socks_gateway(loopback, monkeypatch):
    grid, listeners = loopback
    proxy = Socks5Server()
    try:
        m2 = grid["m2"]
        monkeypatch.setattr(m2, "socks_gateway", proxy.address, raising=False)
        client, info = grid["L1"].open_stream("m2", PORT, stack="tls/reverse")
        server, server_info = listeners["m2"].accept_stream(timeout=JOIN_TIMEOUT_S)
        assert info.stack == server_info.stack == "tls/reverse"
        assert info.detail["via"] == server_info.detail["via"] == f"socks(proxy={proxy.address})"
        assert proxy.connected == [(grid["L1"].address.host, grid["L1"].address.port)]
        client.send_all(b"through the proxy")
        assert server.receive_some(100) == b"through the proxy"
        client.close()
        server.close()

        # Inside its cluster, the gateway is not used: m2 dials its leader directly.
        client, info = grid["L2"].open_stream("m2", PORT, stack="reverse")
        server, _ = listeners["m2"].accept_stream(timeout=JOIN_TIMEOUT_S)
        assert "via" not in info.detail and len(proxy.connected) == 1
        client.close()
        server.close()
    finally:
        proxy.stop()


def test_a_gateway_that_fails_falls_back_to_a_direct_dial_back(loopback, monkeypatch):
    grid, listeners = loopback
    monkeypatch.setattr(grid["m2"], "socks_gateway", "127.0.0.1:1", raising=False)  # nothing listens
    client, info = grid["L1"].open_stream("m2", PORT, stack="tls/reverse")
    server, _ = listeners["m2"].accept_stream(timeout=JOIN_TIMEOUT_S)
    assert info.stack == "tls/reverse" and "via" not in info.detail
    client.close()
    server.close()
