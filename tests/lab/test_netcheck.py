"""``gridsock netcheck`` on the lab's networks: the verdicts say what the namespaces are.

a1 leads cluster A behind gwa's MASQUERADE (seen as 203.0.113.2, no way in); b1 leads cluster B
behind fwb's stateful firewall (its own public address, new connections from outside dropped);
c1 leads the private cluster C, out only through fec's sshd (its uplink) or its SOCKS5 proxy
(the rules name it, as tests/lab/test_data.py's do).
"""
from __future__ import annotations

import subprocess

import pytest

from gridsock.bootstrap.control import call
from gridsock.testing.procs import gridsock_argv

from .gridsession import JOIN_TIMEOUT_S, NODES, make_grid
from .test_data import VIA_RULES

# A netcheck answers within NETCHECK_TIMEOUT_S; the control call allows a little more.
CALL_TIMEOUT_S = 30.0
PINGS = 4


@pytest.fixture(scope="module")
def grid(lab, tmp_path_factory):
    yield from make_grid(lab, tmp_path_factory, rules={name: VIA_RULES for name in NODES})


@pytest.fixture(scope="module")
def reports(grid):
    for name in ("a1", "b1", "c1"):  # every dial-back verdict in
        call(grid.control(name), "wait", {"present": list(NODES), "settled": True, "timeout": JOIN_TIMEOUT_S},
             timeout=JOIN_TIMEOUT_S + 5)
    return {name: call(grid.control(name), "netcheck", {"pings": PINGS}, timeout=CALL_TIMEOUT_S)
            for name in ("a1", "a2", "b1", "c1")}


def methods(report: dict) -> dict:
    return {m["method"]: m["verdict"] for m in report["methods"]}


def test_a1_is_behind_nat_and_not_reachable(grid, reports):
    report = reports["a1"]
    address = report["address"]
    assert address["local"].startswith(grid.lab.addr("a1") + ":")
    assert address["observed"].startswith("203.0.113.2:")  # gwa's public address
    assert address["nat"] is True and address["nat_keeps_port"] is True  # MASQUERADE keeps a free port
    assert report["inbound"] is False and "could not dial back" in report["inbound_detail"]
    verdicts = methods(report)
    assert verdicts["tcp from outside"] == "no" and verdicts["reverse"] == "no"
    assert verdicts["tcp to others"] == "yes" and verdicts["splice"] == "possible"


def test_a2_reports_its_leaders_nat(reports):
    report = reports["a2"]
    assert report["address"]["observed_of"] == "leader" and report["address"]["nat"] is True
    leader = report["rtt"]["leader"]
    assert (leader["dst"], leader["received"]) == ("a1", PINGS) and leader["min_ms"] > 0


def test_b1_is_firewalled_without_nat(grid, reports):
    report = reports["b1"]
    assert report["inbound"] is False
    address = report["address"]
    assert address["nat"] is False and address["observed"].startswith(grid.lab.addr("b1") + ":")
    assert methods(report)["tcp from outside"] == "no" and methods(report)["splice"] == "possible"


def test_c1_goes_out_through_a_usable_ssh_gateway(grid, reports):
    report = reports["c1"]
    assert report["uplink"]["via"] is not None and report["uplink"]["up"] is True
    [uplink_gateway] = [g for g in report["gateways"] if g["source"] == "uplink"]
    assert uplink_gateway["kind"] == "ssh" and uplink_gateway["usable"] is True, uplink_gateway
    assert uplink_gateway["address"].endswith(grid.lab.ssh_gateway.split("@")[1])
    socks = {g["address"]: g for g in report["gateways"] if g["kind"] == "socks"}
    assert socks["10.3.0.1:1080"]["usable"] is True  # the front-end's proxy, inside C
    assert report["route_out"] is False and methods(report)["tcp to others"] == "no"
    assert report["address"]["nat"] is None  # seen from the gateway: no verdict


def test_every_node_measured_its_round_trip_to_the_rendezvous_node(reports):
    for name, report in reports.items():
        rtt = report["rtt"]["rendezvous"]
        assert (rtt["sent"], rtt["received"]) == (PINGS, PINGS), (name, rtt)
        assert 0 < rtt["min_ms"] <= rtt["median_ms"]
        assert rtt["route"][-1] == "rendezvous"


def test_the_command_inside_the_lab(grid, reports):
    # (the control socket is a file: the command reaches it from outside c1's namespace)
    done = subprocess.run(gridsock_argv("netcheck", "--control", grid.control("c1"), "--pings", "1"),
                          env=grid.env, capture_output=True, timeout=CALL_TIMEOUT_S)
    assert done.returncode == 0, done.stderr
    text = done.stdout.decode()
    assert text.startswith("netcheck of c1 (leader, cluster C): joined")
    assert "ssh root@" in text and "(the uplink): usable" in text
    assert "rendez-vous node: 1/1 answered" in text
