"""Gateways without rules: cluster C (no route out) and the outside reach each other through C's
front-end, with no rules file anywhere.

c1 is C's leader and links to the rendez-vous node through the SSH gateway fec (10.3.0.1:22 as
seen from inside C). Out of C, c1 dials through that gateway (``tls/ssh(gateway=...)``); into
C, the public rv asks c1 to connect back to it (``tls/reverse``), and c1's dial goes through
the same gateway. ``relay`` is for pairs where nothing else works: a1 (behind NAT) and c1
cannot reach each other any other way. Every transfer checks its bytes both ways (SHA-256).
"""
from __future__ import annotations

import json

import pytest

from gridsock.testing.procs import gridsock_argv, wait_for_line

from .gridsession import ECHO_PORT, JOIN_TIMEOUT_S, NODE_PORT, NODES, make_grid
from .test_data import check, run_transfer

GATEWAY = "ssh(gateway=root@10.3.0.1:22)"  # fec, as c1 sees it (gridsession: --ssh-gateway)
TRANSFER_BYTES = 4 << 20


@pytest.fixture(scope="module")
def grid(lab, tmp_path_factory):
    yield from make_grid(lab, tmp_path_factory)  # no rules file for any node


def status(grid, name: str) -> dict:
    return json.loads(grid.lab.run(name, gridsock_argv("status", "--node", name, "--json"), env=grid.env,
                                   capture_output=True, text=True, check=True).stdout)


def path_to(grid, src: str, dst: str) -> dict:
    return {p["peer"]: p for p in status(grid, src)["paths"]}[dst]


def test_c1_reaches_rv_through_its_own_ssh_gateway(grid):
    result = run_transfer(grid, "c1", "rv", None, TRANSFER_BYTES)
    check(result, "tls/" + GATEWAY, TRANSFER_BYTES)
    tried = dict(result["tried"])
    assert "Network is unreachable" in tried["tls/tcp"]  # C has no route out: the gateway does
    path = path_to(grid, "c1", "rv")
    assert (path["method"], path["cached"]["stack"]) == ("ssh", "tls/" + GATEWAY)
    assert [r["tier"] for r in path["ranking"]] == ["direct", "gateway", "relay"]
    assert "tls/relay" in {r["stack"] for r in path["reasons"]}  # a candidate, not needed
    # The next connection: the cached gateway method alone.
    again = run_transfer(grid, "c1", "rv", None, TRANSFER_BYTES)
    check(again, "tls/" + GATEWAY, TRANSFER_BYTES)
    assert again["tried"] == []


def test_rv_reaches_c1_by_a_call_back_through_c1s_gateway(grid):
    result = run_transfer(grid, "rv", "c1", None, TRANSFER_BYTES)
    check(result, "tls/reverse", TRANSFER_BYTES)
    path = path_to(grid, "rv", "c1")
    assert (path["stack"], path["via"], path["direct"]) == ("tls/reverse", GATEWAY, True)
    assert path["ranking"][-1] == {"stack": "tls/relay", "tier": "relay"}


def test_a_forced_reverse_into_c_goes_through_the_gateway(grid):
    check(run_transfer(grid, "rv", "c1", "tls/reverse", TRANSFER_BYTES), "tls/reverse", TRANSFER_BYTES)
    assert path_to(grid, "rv", "c1")["via"] == GATEWAY


def test_members_of_c_use_their_leaders_gateway(grid):
    if not grid.directory("rv")["c1"].get("gateways"):
        pytest.skip("the directory does not carry gateways yet (Hello.gateways: see the report of issue 11)")
    assert grid.directory("c2")["c1"]["gateways"] == [GATEWAY]
    check(run_transfer(grid, "c2", "rv", None, TRANSFER_BYTES), "tls/" + GATEWAY, TRANSFER_BYTES)
    check(run_transfer(grid, "rv", "c2", None, TRANSFER_BYTES), "tls/reverse", TRANSFER_BYTES)
    assert path_to(grid, "rv", "c2")["via"] == GATEWAY


SOCKS_GATEWAY = "socks(proxy=10.3.0.1:1080)"  # fec's SOCKS5 server, as C sees it


@pytest.fixture(scope="module")
def c3(grid):
    """One more member of C (in c2's host) whose way out is fec's SOCKS proxy, given on its
    command line (``gridsock node --socks-gateway``)."""
    import subprocess

    helped = subprocess.run(gridsock_argv("node", "--help"), capture_output=True, text=True, env=grid.env).stdout
    if "--socks-gateway" not in helped:
        pytest.skip("gridsock node has no --socks-gateway yet (see the report of issue 11)")
    args = grid.node_args("c2")
    args[args.index("--name") + 1] = "c3"
    args[args.index("--listen") + 1] = f"{grid.lab.addr('c2')}:{NODE_PORT + 1}"
    args += ["--socks-gateway", "10.3.0.1:1080"]
    wait_for_line(grid.spawn("c2", "c3", *args), "joined", timeout=JOIN_TIMEOUT_S)
    grid.wait_all(("rv", "c3"), present=NODES + ("c3",))
    return "c3"


def test_a_member_with_a_socks_gateway_goes_out_and_is_called_back_through_it(grid, c3):
    assert grid.directory("rv")[c3]["gateways"] == [SOCKS_GATEWAY]
    check(run_transfer(grid, c3, "rv", None, TRANSFER_BYTES), "tls/" + SOCKS_GATEWAY, TRANSFER_BYTES)
    check(run_transfer(grid, "rv", c3, None, TRANSFER_BYTES), "tls/reverse", TRANSFER_BYTES)
    assert path_to(grid, "rv", c3)["via"] == SOCKS_GATEWAY


def test_a1_and_c1_can_only_be_relayed(grid):
    # a1 accepts nothing (NAT), c1's gateway cannot reach into A: the relay is all there is.
    for src, dst in (("a1", "c1"), ("c1", "a1")):
        result = run_transfer(grid, src, dst, None, TRANSFER_BYTES)
        check(result, "tls/relay", TRANSFER_BYTES)
        assert all(why for _, why in result["tried"])
    assert ECHO_PORT in status(grid, "c1")["listening"]


# --- best, not first, with a forced slow gateway ------------------------------------------------
# A node of this test's own (in c2's host, a member of C) whose SSH dials wait for a gate: its
# first connection to rv is relayed (tls/tcp has no route, the held ssh loses to the relay); the
# gate opens, the ssh connection is made after the race, closed unnominated and cached; the
# second connection goes through the gateway. Its [[via]] names fec's sshd (a member of C has
# no gateway of its own).
SLOW_GATEWAY_CLIENT = """
import json, sys, time
import gevent, gevent.event
from gridsock.components import ssh
from gridsock.node import Node
from gridsock.rules import Rules
from gridsock.session import Session

session, leader, listen, key, known_hosts, port = sys.argv[1:7]
gate = gevent.event.Event()
real_open = ssh.open_ssh_tunnel

def held_open(*args, **kwargs):
    gate.wait(60)
    return real_open(*args, **kwargs)

ssh.open_ssh_tunnel = held_open
rules = Rules.from_dict({"via": [{"to": "name:rv", "stack": "tls/ssh(gateway=root@10.3.0.1:22)"}]})
node = Node(Session.load(session), "slowgw", cluster="C", leader=leader, listen_address=listen, control="",
            agent="", ssh_key=key, ssh_known_hosts=known_hosts, rules=rules, loop="caller").start()

def echo(stream, data):
    stream.send_all(data)
    stream.send_eof()
    got = b""
    while True:
        chunk = stream.receive_some(65536)
        if not chunk:
            break
        got += chunk
    stream.close()
    return got == data

def path():
    return {p["peer"]: p for p in node.status()["paths"]}["rv"]

try:
    assert node.wait_joined(30), "did not join"
    node.wait_directory(present=["rv"], settled=True, timeout=30)
    out = {}
    stream, info = node.open_stream("rv", int(port))
    out["first"], out["first_tried"] = info.stack, info.detail.get("tried", [])
    out["first_echo"] = echo(stream, b"relayed first" * 1000)
    gate.set()
    deadline = time.monotonic() + 30
    while path()["better_later"] is None and time.monotonic() < deadline:
        gevent.sleep(0.05)
    out["path"] = path()
    stream, info = node.open_stream("rv", int(port))
    out["second"], out["second_tried"] = info.stack, info.detail.get("tried", [])
    out["second_echo"] = echo(stream, b"then the gateway" * 1000)
    print("result " + json.dumps(out), flush=True)
finally:
    node.stop()
"""


def test_a_slow_gateway_loses_the_first_race_to_the_relay_and_wins_the_next(grid, tmp_path):
    import subprocess
    import sys

    from gridsock.bootstrap.control import call

    script = tmp_path / "slow_gateway_client.py"
    script.write_text(SLOW_GATEWAY_CLIENT)
    lab = grid.lab
    not_taken = call(grid.control("rv"), "status")["assembly"]["not_taken"]
    done = lab.run("c2", [sys.executable, str(script), grid.session_for("C"), f"{lab.addr('c1')}:{NODE_PORT}",
                          f"{lab.addr('c2')}:0", lab.ssh_client_key, lab.ssh_known_hosts, str(ECHO_PORT)],
                   env=grid.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=180)
    lines = [line for line in done.stdout.splitlines() if line.startswith("result ")]
    assert done.returncode == 0 and lines, done.stdout + done.stderr[-3000:]
    out = json.loads(lines[-1][len("result "):])
    slow = "tls/ssh(gateway=root@10.3.0.1:22)"
    assert (out["first"], out["first_echo"]) == ("tls/relay", True)
    assert [slow, "still trying in the background: tls/relay connected first"] in out["first_tried"]
    path = out["path"]
    assert path["better_later"] == slow and path["cached"]["stack"] == slow
    reasons = {r["stack"]: r["reason"] for r in path["reasons"]}
    assert reasons[slow].startswith("finished later: better than tls/relay")
    assert [r["tier"] for r in path["ranking"]] == ["direct", "gateway", "relay"]
    assert (out["second"], out["second_echo"], out["second_tried"]) == (slow, True, [])
    # rv closed the late ssh connection without delivering it to its echo service
    assert call(grid.control("rv"), "status")["assembly"]["not_taken"] >= not_taken + 1
