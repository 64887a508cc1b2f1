"""Data connections on the lab grid: every pair over tls/relay, direct stacks where they can work.

Every node serves an echo service on grid port ECHO_PORT; ``transfer`` (run inside the sending
node process through its control socket) sends random bytes over a data connection built with
the given stack and reads the echo back: the bytes cross the grid both ways, and both SHA-256
must match. The public node ``rv`` accepts plain tcp from outside its cluster (its rules file
says so), so direct stacks can be checked towards it.
"""
from __future__ import annotations

import itertools
import json
import os

import pytest

from gridsock.bootstrap.control import call
from gridsock.testing.procs import gridsock_argv

from .gridsession import ECHO_PORT, NODES, make_grid

# 64 MiB each way, as the issue asks; GRIDSOCK_LAB_TRANSFER_MB makes a quick local run cheaper.
TRANSFER_BYTES = int(float(os.environ.get("GRIDSOCK_LAB_TRANSFER_MB", "64")) * (1 << 20))
TRANSFER_TIMEOUT_S = 300.0
RV_RULES = """
[policy]
outside_cluster = []
"""


@pytest.fixture(scope="module")
def grid(lab, tmp_path_factory):
    yield from make_grid(lab, tmp_path_factory, rules={"rv": RV_RULES})


def run_transfer(grid, src: str, dst: str, stack: str | None, nbytes: int = TRANSFER_BYTES) -> dict:
    args = {"dst": dst, "port": ECHO_PORT, "bytes": nbytes, "stack": stack, "timeout": 30}
    return call(grid.control(src), "transfer", args, timeout=TRANSFER_TIMEOUT_S)


def check(result: dict, stack: str | None, nbytes: int = TRANSFER_BYTES) -> None:
    assert result["bytes"] == nbytes
    assert result["sha256_received"] == result["sha256_sent"]
    if stack is not None:
        assert result["stack"] == stack


@pytest.mark.parametrize("src,dst", list(itertools.permutations(NODES, 2)))
def test_tls_relay_between_every_ordered_pair(grid, src, dst):
    check(run_transfer(grid, src, dst, "tls/relay"), "tls/relay")


# Inside each cluster, and towards rv from the clusters with a way out (C has none: no route).
DIRECT_PAIRS = [(a, b) for a, b in itertools.permutations(NODES, 2)
                if (a != "rv" and a[0] == b[0]) or (b == "rv" and a[0] in "ab")]


@pytest.mark.parametrize("stack", ["tcp", "tls/tcp"])
@pytest.mark.parametrize("src,dst", DIRECT_PAIRS)
def test_direct_stacks_where_the_network_allows(grid, src, dst, stack):
    check(run_transfer(grid, src, dst, stack), stack)


# Through cluster C's front-end (203.0.113.4 outside, 10.3.0.1 inside): its SOCKS5 server and sshd.
INTERMEDIARY_CASES = [
    ("a1", "c2", "tls/socks(proxy=203.0.113.4:1080)"),
    ("b2", "c1", "tls/ssh(gateway=root@203.0.113.4:22)"),
    ("c1", "rv", "tls/socks(proxy=10.3.0.1:1080)"),
    ("c2", "rv", "tls/ssh(gateway=root@10.3.0.1:22)"),
    ("c2", "rv", "socks(proxy=10.3.0.1:1080)"),  # rv takes plain tcp from outside: a raw socket
]


# The server connects back: nodes that can connect out but not accept, serving a public client.
REVERSE_CASES = [("rv", "a1"), ("rv", "b2")]  # (c1 has no route out at all: no reverse into C)


@pytest.mark.parametrize("src,dst", REVERSE_CASES)
def test_reverse_from_behind_nat_and_firewall(grid, src, dst):
    check(run_transfer(grid, src, dst, "tls/reverse", 16 << 20), "tls/reverse", 16 << 20)


# Both behind NAT or firewall: TCP simultaneous open through gwa's NAT and fwb's firewall.
SPLICE_CASES = [("a2", "b2"), ("b1", "a1"), ("a1", "b2")]


@pytest.mark.parametrize("src,dst", SPLICE_CASES)
def test_splice_between_nat_and_firewall(grid, src, dst):
    check(run_transfer(grid, src, dst, "tls/splice", 16 << 20), "tls/splice", 16 << 20)


def test_reverse_fails_fast_with_the_reason_when_the_client_cannot_be_reached(grid):
    with pytest.raises(Exception) as excinfo:
        run_transfer(grid, "a2", "b2", "tls/reverse", 1 << 10)  # b2 cannot reach a2 behind its NAT
    assert "cannot connect back" in str(excinfo.value)


@pytest.mark.parametrize("src,dst,stack", INTERMEDIARY_CASES)
def test_socks_and_ssh_through_the_front_end(grid, src, dst, stack):
    check(run_transfer(grid, src, dst, stack, 16 << 20), stack, 16 << 20)


def test_the_rules_pick_what_the_topology_allows(grid):
    assert run_transfer(grid, "a1", "a2", None, 1 << 20)["stack"] == "tcp"
    assert run_transfer(grid, "a2", "b2", None, 1 << 20)["stack"] == "tls/splice"  # NAT to firewall
    assert run_transfer(grid, "b2", "rv", None, 1 << 20)["stack"] == "tls/tcp"  # rv accepts inbound
    # rv accepts inbound, but C has no route out: tls/tcp fails at once and the relay takes over.
    assert run_transfer(grid, "c2", "rv", None, 1 << 20)["stack"] == "tls/relay"
    # a1 is behind NAT but can connect out, and rv accepts: rv's connection is made backwards.
    assert run_transfer(grid, "rv", "a1", None, 1 << 20)["stack"] == "tls/reverse"
    # c1 has no route out: reverse fails (c1 says why) and the relay takes over.
    assert run_transfer(grid, "rv", "c1", None, 1 << 20)["stack"] == "tls/relay"


def test_policy_refuses_plain_tcp_from_outside_the_cluster(grid):
    with pytest.raises(Exception) as excinfo:
        run_transfer(grid, "a1", "b2", "relay", 1 << 10)
    assert "requires tls" in str(excinfo.value)


def test_status_lists_connections_and_meta_links(grid):
    run_transfer(grid, "a2", "a1", "tls/tcp", 1 << 10)
    out = grid.lab.run("a2", gridsock_argv("status", "--node", "a2"), env=grid.env, capture_output=True,
                       text=True, check=True).stdout
    assert "meta links:" in out and "a1" in out.split("meta links:")[1]
    status = json.loads(grid.lab.run("a1", gridsock_argv("status", "--node", "a1", "--json"), env=grid.env,
                                     capture_output=True, text=True, check=True).stdout)
    assert ECHO_PORT in status["listening"]
