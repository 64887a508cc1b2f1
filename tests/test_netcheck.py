"""``gridsock netcheck``: the report's facts and verdicts on the loopback grid, and the command.

On loopback every node is reachable and behind no NAT; the gateways are small servers this
test runs (a SOCKS5 greeter, an sshd banner, a closed port), named in a node's rules.
tests/lab/test_netcheck.py checks the verdicts on the lab's NAT, firewall and private cluster.
"""
from __future__ import annotations

import json
import socket

import gevent
import gevent.server
import pytest

from gridsock import cli
from gridsock.bootstrap.control import ControlServer
from gridsock.errors import ConfigError
from gridsock.netcheck import control_netcheck, format_netcheck
from gridsock.rules import Rule, Rules
from gridsock.testing.grid import loopback_grid

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def loopback(tmp_path_factory):
    with loopback_grid(tmp_path_factory.mktemp("netcheck")) as running:
        path = str(tmp_path_factory.mktemp("c") / "m1.sock")
        node = running["m1"]

        def handle(op: str, args: dict):
            if op == "netcheck":
                return control_netcheck(node, args)
            raise ConfigError(f"unknown control operation {op!r}")

        control = ControlServer(path, handle).start()
        try:
            yield running, path
        finally:
            control.stop()


def by_method(report: dict) -> dict:
    return {m["method"]: (m["verdict"], m["why"]) for m in report["methods"]}


def test_a_member_reports_reachability_address_round_trips_and_methods(loopback):
    grid, _ = loopback
    m1 = grid["m1"]
    report = control_netcheck(m1, {"pings": 4})
    json.dumps(report)  # (it crosses the control socket as JSON)
    assert (report["name"], report["role"], report["cluster"], report["joined"]) == ("m1", "member", "A", True)
    assert report["inbound"] is True and "dialed back" in report["inbound_detail"]
    assert report["addrs"] == [str(m1.address)]
    address = report["address"]
    assert address["observed_of"] == "leader" and address["observed"] == grid["L1"].entry.observed
    assert address["nat"] is False and address["nat_keeps_port"] is None  # (measured at the leader)
    assert report["uplink"] == {"to": "leader", "target": str(grid["L1"].address), "via": None, "up": True}
    rv, leader = report["rtt"]["rendezvous"], report["rtt"]["leader"]
    assert (rv["sent"], rv["received"], rv["error"]) == (4, 4, None)
    assert 0 < rv["min_ms"] <= rv["median_ms"] and rv["route"] == ["m1", "L1", "rendezvous"]
    assert (leader["dst"], leader["received"], leader["route"]) == ("L1", 4, ["m1", "L1"])
    methods = by_method(report)
    assert methods["tcp from outside"][0] == "yes" and methods["reverse"][0] == "yes"
    assert methods["relay"][0] == "yes" and methods["splice"][0] == "possible"
    assert report["gateways"] == []
    me = m1.directory.get(m1.node_id)
    assert report["candidates"] == {e.name: [str(s) for s in m1.rules.candidates(me, e)]
                                    for e in m1.directory if e.name != "m1"}
    assert report["candidates"]["L1"] == ["tcp", "tls/relay"]


def test_a_leader_compares_its_uplinks_local_and_observed_address(loopback):
    grid, _ = loopback
    l2 = grid["L2"]
    report = control_netcheck(l2, {"pings": 1})
    address = report["address"]
    local = l2.uplink.sock.getsockname()
    assert address["local"] == f"{local[0]}:{local[1]}" and address["observed_of"] == "self"
    assert address["observed"] == l2.entry.observed
    assert address["nat"] is (address["observed"].rsplit(":", 1)[0] != local[0])
    assert address["nat"] is False  # loopback: the rendez-vous node sees the uplink's own address
    assert report["rtt"]["leader"] is None and report["rtt"]["rendezvous"]["route"] == ["L2", "rendezvous"]
    text = format_netcheck(report)
    assert "leader: this node" in text and "no NAT" in text


def serve(handler) -> gevent.server.StreamServer:
    server = gevent.server.StreamServer(("127.0.0.1", 0), handler)
    server.start()
    return server


def socks_greeter(sock, _address) -> None:
    if sock.recv(3) == b"\x05\x01\x00":
        sock.sendall(b"\x05\x00")
    sock.close()


def ssh_banner(sock, _address) -> None:
    sock.sendall(b"SSH-2.0-OpenSSH_9.2p1 Debian\r\n")
    sock.recv(10)
    sock.close()


def closed_port() -> int:
    """A loopback port nothing listens on (bound, never listened, then closed)."""
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    return port


def test_gateways_named_in_the_rules_are_probed(loopback, monkeypatch):
    grid, _ = loopback
    m1 = grid["m1"]
    socks, sshd = serve(socks_greeter), serve(ssh_banner)
    dead = closed_port()
    try:
        good_socks = f"tls/socks(proxy=127.0.0.1:{socks.server_port})"
        dead_socks = f"tls/socks(proxy=127.0.0.1:{dead})"
        ssh = f"tls/ssh(gateway=root@127.0.0.1:{sshd.server_port})"
        rules = Rules(vias=(Rule("*", "cluster:B", good_socks), Rule("*", "name:L1", dead_socks),
                            Rule("*", "name:nobody", ssh)))
        monkeypatch.setattr(m1.assembler, "rules", rules)
        report = control_netcheck(m1, {"pings": 1})
    finally:
        socks.stop()
        sshd.stop()
    gateways = {g["address"]: g for g in report["gateways"]}
    assert set(gateways) == {f"127.0.0.1:{socks.server_port}", f"127.0.0.1:{dead}",
                             f"root@127.0.0.1:{sshd.server_port}"}
    ok = gateways[f"127.0.0.1:{socks.server_port}"]
    assert (ok["kind"], ok["source"], ok["usable"], ok["stacks"]) == ("socks", "rules", True, [good_socks])
    assert ok["ms"] > 0 and ok["rules"] == ["via from * to cluster:B"]
    down = gateways[f"127.0.0.1:{dead}"]
    assert down["usable"] is False and "cannot dial it" in down["detail"]
    banner = gateways[f"root@127.0.0.1:{sshd.server_port}"]
    assert banner["usable"] is True and "SSH-2.0-OpenSSH_9.2p1" in banner["detail"]
    methods = by_method(report)
    assert methods[good_socks][0] == "yes" and "L2" in methods[good_socks][1] and "m2" in methods[good_socks][1]
    assert methods[dead_socks][0] == "no" and "not usable" in methods[dead_socks][1]
    assert methods[ssh][0] == "no" and "towards no peer" in methods[ssh][1]  # (sshd answers; no peer matches)
    # (the same facts the assembler races: the via stack is a candidate towards cluster B)
    assert good_socks in report["candidates"]["L2"] and good_socks not in report["candidates"]["L1"]


def test_the_command_prints_the_report_and_json(loopback, capsys):
    _, path = loopback
    assert cli.main(["netcheck", "--control", path, "--pings", "2"]) == 0
    text = capsys.readouterr().out
    lines = text.splitlines()
    assert lines[0].startswith("netcheck of m1 (member, cluster A): joined")
    assert any(line.startswith("  inbound:  yes: the rendez-vous node dialed back") for line in lines)
    assert any(line.strip().startswith("rendez-vous node: 2/2 answered, min ") for line in lines)
    assert any(line.strip().startswith("leader L1: 2/2 answered") for line in lines)
    assert any(line.strip().startswith("relay:") and " yes " in line for line in lines)

    assert cli.main(["netcheck", "--control", path, "--json", "--pings", "1"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["name"] == "m1" and report["rtt"]["rendezvous"]["received"] == 1


def test_the_command_without_a_node_says_so(tmp_path, capsys):
    assert cli.main(["netcheck", "--control", str(tmp_path / "none.sock")]) == 2
    assert "gridsock netcheck: no gridsock process serves" in capsys.readouterr().err
