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
from gridsock.stack import Stack
from gridsock.testing.procs import gridsock_argv

from .gridsession import ECHO_PORT, NODES, make_grid

# 64 MiB each way, as the issue asks; GRIDSOCK_LAB_TRANSFER_MB makes a quick local run cheaper.
TRANSFER_BYTES = int(float(os.environ.get("GRIDSOCK_LAB_TRANSFER_MB", "64")) * (1 << 20))
TRANSFER_TIMEOUT_S = 300.0
# Cluster C's front-end fec (203.0.113.4 outside, 10.3.0.1 inside) runs a SOCKS5 proxy: every
# node may use it into C from outside, and out of C.
SOCKS_IN = "tls/socks(proxy=203.0.113.4:1080)"
SOCKS_OUT = "tls/socks(proxy=10.3.0.1:1080)"
VIA_RULES = f"""
[[via]]
from = "!cluster:C"
to = "cluster:C"
stack = "{SOCKS_IN}"
[[via]]
from = "cluster:C"
to = "!cluster:C"
stack = "{SOCKS_OUT}"
"""
RV_RULES = """
[policy]
outside_cluster = []
""" + VIA_RULES


@pytest.fixture(scope="module")
def grid(lab, tmp_path_factory):
    rules = {name: VIA_RULES for name in NODES}
    rules["rv"] = RV_RULES
    yield from make_grid(lab, tmp_path_factory, rules=rules)


def run_transfer(grid, src: str, dst: str, stack: str | None, nbytes: int = TRANSFER_BYTES, *,
                 timeout: float = 30) -> dict:
    args = {"dst": dst, "port": ECHO_PORT, "bytes": nbytes, "stack": stack, "timeout": timeout}
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


# Striped over N TCP connections: inside a cluster, and through fwb's firewall to rv with tls.
PARALLEL_CASES = [("a1", "a2", "parallel(streams=4)/tcp"), ("b2", "rv", "tls/parallel(streams=8)/tcp"),
                  ("c1", "rv", "tls/parallel(streams=4)/socks(proxy=10.3.0.1:1080)")]


@pytest.mark.parametrize("src,dst,stack", PARALLEL_CASES)
def test_parallel_streams(grid, src, dst, stack):
    check(run_transfer(grid, src, dst, stack), stack)


def test_reverse_fails_fast_with_the_reason_when_the_client_cannot_be_reached(grid):
    with pytest.raises(Exception) as excinfo:
        run_transfer(grid, "a2", "b2", "tls/reverse", 1 << 10)  # b2 cannot reach a2 behind its NAT
    assert "cannot connect back" in str(excinfo.value)


@pytest.mark.parametrize("src,dst,stack", INTERMEDIARY_CASES)
def test_socks_and_ssh_through_the_front_end(grid, src, dst, stack):
    check(run_transfer(grid, src, dst, stack, 16 << 20), stack, 16 << 20)


# What the topology calls for, for every ordered pair (auto selection: no stack named).
def expected_stack(src: str, dst: str) -> str:
    cluster = {name: (None if name == "rv" else name[0]) for name in NODES}
    if cluster[src] is not None and cluster[src] == cluster[dst]:
        return "tcp"  # one cluster network
    if dst == "rv":  # public: direct, but C has no route out and goes through its front-end
        return SOCKS_OUT if cluster[src] == "c" else "tls/tcp"
    if src == "rv":  # the node connects back: through its NAT or firewall, or C's through fec's sshd
        return "tls/reverse"
    if cluster[dst] == "c":
        return SOCKS_IN  # splice cannot cross fec (no forwarding), its SOCKS proxy can
    if cluster[src] == "c":
        return "tls/relay"  # fec cannot reach into A or B, and A and B cannot accept: only the relay
    return "tls/splice"  # NAT and firewall on both sides


AUTO_PAIRS = list(itertools.permutations(NODES, 2))


@pytest.mark.parametrize("src,dst", AUTO_PAIRS)
def test_auto_selection_picks_what_the_topology_calls_for(grid, src, dst):
    result = run_transfer(grid, src, dst, None)  # the pair's first auto connect: nothing cached
    check(result, expected_stack(src, dst))
    tried = dict(result["tried"])
    assert all(tried.values()), "every loser says why"
    if src[0] == "c" and dst[0] in "ab":  # what failed before the relay, and why
        assert set(tried) == {"tls/splice", SOCKS_OUT}
        assert "no route" in tried["tls/splice"]


# Each method named explicitly where the network cannot carry it: a clear reason, not a timeout.
FORCED_FAILURES = [
    ("c1", "rv", "tls/tcp", "Network is unreachable"),  # C has no route out
    ("a1", "c1", "tls/tcp", "Network is unreachable"),  # C's addresses are private
    ("a1", "b1", "tls/tcp", "accepts no connection from outside"),  # fwb drops the SYN: 5 s
    ("c1", "a1", "tls/splice", "no route for a splice"),
    ("a1", "c1", "tls/splice", "c1 has no route to a1's endpoint"),
    ("c1", "a1", SOCKS_OUT, "not allowed by ruleset"),  # fec's dante: A is not its business
    ("a1", "c1", SOCKS_OUT, "Network is unreachable"),  # fec's inside address, from outside
    ("c1", "a1", "tls/ssh(gateway=root@10.3.0.1:22)", "gateway refused the channel"),
    ("rv", "a1", "tls/ssh(gateway=root@203.0.113.4:22)", "gateway refused the channel"),
]


@pytest.mark.parametrize("src,dst,stack,why", FORCED_FAILURES)
def test_a_forced_method_that_cannot_work_fails_with_the_reason(grid, src, dst, stack, why):
    with pytest.raises(Exception) as excinfo:  # (within the 10 s budget: not "no connection within")
        run_transfer(grid, src, dst, stack, 1 << 10, timeout=10)
    assert why in str(excinfo.value)


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


# --- check_method for the methods that need the lab ---------------------------------------------
# A client node of its own (in the namespace of the host named first, in that host's cluster)
# runs the whole conformance kit against a lab node through its control socket.
CHECK_METHOD_CASES = [
    # (client host, client cluster, leader host, server, stack, refused by the server's policy, port)
    ("a2", "A", "a1", "b1", "tls/splice", "splice", 6200),
    ("rv", None, None, "c1", SOCKS_IN, SOCKS_IN[len("tls/"):], 6210),
    ("rv", None, None, "c2", "tls/ssh(gateway=root@203.0.113.4:22)", "ssh(gateway=root@203.0.113.4:22)", 6220),
]


@pytest.mark.parametrize("host,cluster,leader,server,stack,refused,port", CHECK_METHOD_CASES,
                         ids=[case[4] for case in CHECK_METHOD_CASES])
def test_check_method_in_the_lab(grid, host, cluster, leader, server, stack, refused, port):
    import subprocess
    import sys

    from .gridsession import NODE_PORT

    lab = grid.lab
    argv = [sys.executable, "-m", "gridsock.testing.methods", "--session", grid.session_for(cluster),
            "--name", f"probe-{port}", "--listen", f"{lab.addr(host)}:0", "--server", server,
            "--server-control", grid.control(server), "--stack", stack, "--refused", refused, "--port", str(port),
            "--ssh-key", lab.ssh_client_key, "--ssh-known-hosts", lab.ssh_known_hosts]
    if cluster:
        argv += ["--cluster", cluster]
    if leader:
        argv += ["--leader", f"{lab.addr(leader)}:{NODE_PORT}"]
    result = lab.run(host, argv, env=grid.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=240)
    out = result.stdout.decode(errors="replace")
    assert result.returncode == 0 and out.startswith("check_method ok"), out + result.stderr.decode(errors="replace")[-3000:]


# --- gridsock status: how a1 reaches each peer, and why not otherwise ----------------------------
STATUS_PEERS = ("b1", "c1", "rv")


def test_status_says_how_a1_reaches_each_peer_and_why_not_otherwise(grid):
    for peer in STATUS_PEERS:  # the rules choose (the winner may be cached from earlier tests)
        check(run_transfer(grid, "a1", peer, None, 1 << 20), expected_stack("a1", peer), 1 << 20)
    status = json.loads(grid.lab.run("a1", gridsock_argv("status", "--node", "a1", "--json"), env=grid.env,
                                     capture_output=True, text=True, check=True).stdout)
    paths = {p["peer"]: p for p in status["paths"]}
    for peer in STATUS_PEERS:
        path, expected = paths[peer], expected_stack("a1", peer)
        assert (path["stack"], path["chosen"], path["direct"]) == (expected, "rules", True), path
        assert path["method"] == Stack.parse(expected).method.name
        assert path["cached"]["stack"] == expected and path["cached"]["until"] > path["at"]
        reasons = {r["stack"]: r["reason"] for r in path["reasons"]}
        assert expected not in reasons and all(reasons.values()), path
        assert "tls/relay" in reasons, path  # always a candidate, never the winner here: it says why
    assert "no route" in {r["stack"]: r["reason"] for r in paths["c1"]["reasons"]}["tls/splice"]

    text = grid.lab.run("a1", gridsock_argv("status", "--node", "a1"), env=grid.env, capture_output=True,
                        text=True, check=True).stdout
    part = text.split("paths (how this node last reached each peer):\n", 1)[1]
    rows = {line.split()[0]: line.split()[1:4] for line in part.splitlines() if line.startswith("  ") and
            not line.startswith("   ")}
    for peer in STATUS_PEERS:
        expected = expected_stack("a1", peer)
        assert rows[peer] == ["direct", Stack.parse(expected).method.name, expected], rows


# An unmodified program under `gridsock run`: holds a connection to b1's echo service until told.
HOLDER = """
import socket, sys
sock = socket.create_connection(("b1", int(sys.argv[1])), timeout=60)
sock.sendall(b"ping")
got = b""
while len(got) < 4:
    got += sock.recv(4 - len(got))
print("connected", got.decode(), flush=True)
assert sys.stdin.readline() == "close\\n"
sock.close()
print("closed", flush=True)
sys.stdin.read()
"""


def test_status_lists_a_programs_connection_while_it_is_open_and_not_after(grid, tmp_path):
    import subprocess
    import sys

    from gridsock.testing.procs import wait_for_line

    script = tmp_path / "holder.py"
    script.write_text(HOLDER)
    argv = gridsock_argv("run", "--node", "a1", "--", sys.executable, str(script), str(ECHO_PORT))
    holder = grid.lab.spawn("a1", argv, env=grid.env, stdin=subprocess.PIPE, stdout=subprocess.PIPE)

    def a1_status() -> dict:
        return json.loads(grid.lab.run("a1", gridsock_argv("status", "--node", "a1", "--json"), env=grid.env,
                                       capture_output=True, text=True, check=True).stdout)

    try:
        assert wait_for_line(holder, "connected ", timeout=120) == "connected ping"
        status = a1_status()
        [held] = [c for c in status["connections"] if c["pid"] == holder.pid]
        assert (held["peer"], held["port"], held["side"], held["handed"]) == ("b1", ECHO_PORT, "client", True)
        assert held["stack"] == {p["peer"]: p for p in status["paths"]}["b1"]["stack"]
        if held["bridged"]:  # (anything but plain tcp: a1 and b1 are in different clusters)
            assert (held["bytes_sent"], held["bytes_received"]) == (4, 4)
        assert holder.stdin is not None
        holder.stdin.write(b"close\n")
        holder.stdin.flush()
        wait_for_line(holder, "closed", timeout=60)
        assert not [c for c in a1_status()["connections"] if c["pid"] == holder.pid]
    finally:
        if holder.stdin is not None:
            holder.stdin.close()
        holder.wait(60)
        if holder.stdout is not None:
            holder.stdout.close()
