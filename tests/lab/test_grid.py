"""The bootstrap channel on a real grid: NAT, a stateful firewall, a private cluster behind SSH.

One session for the module: the rendez-vous node and a public node ``rv`` on the rendez-vous
host; cluster A (a1 leads, a2) behind NAT; cluster B (b1 leads, b2) behind a firewall that
drops inbound connections; cluster C (c1 leads, out through the front-end's sshd; c2) on a
private network with no route out. Every process is the real ``gridsock`` CLI inside its
namespace; tests talk to them through their control sockets. The tests run in file order: the
later ones kill and restart parts of the grid and check that it heals.
"""
from __future__ import annotations

import itertools
import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from gridsock.bootstrap.control import call
from gridsock.bootstrap.link import DEAD_PEER_S
from gridsock.bootstrap.rendezvous import LEAVE_BOUND_S
from gridsock.testing.procs import gridsock_argv, stop_process, wait_for_line

from .gridsession import JOIN_TIMEOUT_S, LEADERS, NODE_PORT, NODES, REJOIN_TIMEOUT_S, RV_PORT, make_grid

grid = pytest.fixture(scope="module")(make_grid)

def expected_route(src: str, dst: str) -> list:
    """The tree route between two lab nodes: member -> leader -> rendezvous -> leader -> member."""
    def cluster(n):
        return None if n == "rv" else n[0].upper()

    def up(n):
        c = cluster(n)
        return [n] if c is None or LEADERS[c] == n else [n, LEADERS[c]]

    if cluster(src) is not None and cluster(src) == cluster(dst):
        path = up(src)
        return path + [dst] if path[-1] != dst else path
    return up(src) + ["rendezvous"] + list(reversed(up(dst)))


def ping_all(grid) -> dict:
    results = {}
    for src, dst in itertools.permutations(NODES, 2):
        results[src, dst] = call(grid.control(src), "ping", {"dst": dst, "timeout": 10}, timeout=20)
    return results


def test_ping_every_ordered_pair_within_four_hops(grid):
    results = ping_all(grid)
    assert len(results) == 42
    for (src, dst), r in results.items():
        assert r["route_there"] == expected_route(src, dst), (src, dst)
        assert r["route_back"] == expected_route(dst, src), (src, dst)
        assert 1 <= r["hops"] <= 4


def test_cli_ping_and_status_show_the_route(grid):
    out = grid.lab.run("a2", gridsock_argv("ping", "--from", "a2", "c2"), env=grid.env, capture_output=True,
                       text=True, check=True).stdout
    assert "4 hop(s): a2 > a1 > rendezvous > c1 > c2" in out
    status = json.loads(grid.lab.run("a2", gridsock_argv("status", "--node", "a2", "--json"), env=grid.env,
                                     capture_output=True, text=True, check=True).stdout)
    names = {e["node_id"]: e["name"] for e in status["directory"]}
    routes = {names[i]: r for i, r in status["routes"].items()}
    assert set(routes) == set(NODES)
    for dst in NODES:
        assert routes[dst] == (expected_route("a2", dst) if dst != "a2" else ["a2"])
        assert len(routes[dst]) - 1 <= 4
    text = grid.lab.run("a2", gridsock_argv("status", "--node", "a2"), env=grid.env, capture_output=True,
                        text=True, check=True).stdout
    assert "a2 > a1 > rendezvous > b1 > b2" in text


def test_directory_has_clusters_leaders_and_reachability(grid):
    directory = grid.directory("c2")
    assert set(directory) == set(NODES)
    ids = {name: e["node_id"] for name, e in directory.items()}
    for name, e in directory.items():
        cluster = None if name == "rv" else name[0].upper()
        assert e["cluster"] == cluster
        assert e["leader"] == ids[LEADERS[cluster] if cluster else name]
    # Dial-back results: only the public node accepts inbound connections from the internet.
    call(grid.control("c2"), "wait", {"present": list(NODES), "settled": True, "timeout": JOIN_TIMEOUT_S},
         timeout=JOIN_TIMEOUT_S + 5)
    directory = grid.directory("c2")
    inbound = {name: e["inbound"] for name, e in directory.items()}
    assert inbound == {"rv": True, "a1": False, "a2": False, "b1": False, "b2": False, "c1": False, "c2": False}
    assert directory["a1"]["observed"].startswith(grid.lab.addr("gwa") + ":")  # seen through the NAT
    assert directory["b1"]["observed"].startswith(grid.lab.addr("b1") + ":")  # public, firewalled
    assert directory["c1"]["observed"].startswith(grid.lab.addr("fec") + ":")  # out through sshd on the front-end


def test_strangers_are_refused_and_learn_nothing(grid, tmp_path):
    lab = grid.lab
    # Another session, same rendez-vous address: its CA signs the "foreign" certificate.
    other = tmp_path / "other"
    subprocess.run(gridsock_argv("session", "new", str(other), "--rendezvous", f"{lab.addr('rv')}:{RV_PORT}"),
                   check=True, stdout=subprocess.DEVNULL)
    targets = [("a1", "rv", RV_PORT), ("b2", "b1", NODE_PORT), ("c2", "c1", NODE_PORT), ("a2", "a1", NODE_PORT)]
    for from_host, to_host, port in targets:
        addr = lab.addr(to_host)
        for mode, extra in (("hello-nocert", []), ("foreign", [str(other / "session.toml")])):
            out = lab.run(from_host, [sys.executable, "-m", "gridsock.testing.probes", mode, addr, str(port),
                                      grid.session, *extra], capture_output=True, text=True, check=True).stdout
            result = json.loads(out)
            assert result["outcome"] == "closed", (mode, to_host, result)
            assert set(result["received"]) <= {"Refuse"}, (mode, to_host, result)

    # A node with the right CA but a wrong join token is refused for good, by the rendez-vous
    # node (as a leader) and by a leader (as a member), and never appears in any directory.
    bad = tmp_path / "bad-token.toml"
    text = Path(grid.session).read_text()
    token_line = next(line for line in text.splitlines() if line.startswith("join_token"))
    bad.write_text(text.replace(token_line, 'join_token = "' + "x" * 43 + '"'))
    for host, extra in (("a1", []), ("b2", ["--cluster", "B", "--leader", f"{lab.addr('b1')}:{NODE_PORT}"])):
        proc = lab.run(host, gridsock_argv("node", "--session", str(bad), "--name", "intruder", "--listen",
                                           f"{lab.addr(host)}:0", "--control", "", *extra),
                       env=grid.env, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2, proc.stderr
        assert "refused" in proc.stderr and "token" in proc.stderr
    for name in NODES:
        assert "intruder" not in grid.directory(name)


def test_garbage_and_oversized_frames_drop_only_the_sender(grid):
    lab = grid.lab
    ports = [("a2", "rv", RV_PORT)] + [(peer, name, NODE_PORT) for name, peer in
                                       (("rv", "a1"), ("a1", "a2"), ("a2", "a1"), ("b1", "b2"), ("b2", "b1"),
                                        ("c1", "c2"), ("c2", "c1"))]
    for from_host, to_host, port in ports:
        for mode in ("garbage", "oversized"):
            out = lab.run(from_host, [sys.executable, "-m", "gridsock.testing.probes", mode, lab.addr(to_host),
                                      str(port), grid.session], capture_output=True, text=True, check=True).stdout
            result = json.loads(out)
            assert result["outcome"] == "closed", (mode, to_host, result)
            assert result["received"] == [], (mode, to_host, result)
    # Everyone is still served.
    results = ping_all(grid)
    assert all(r["hops"] <= 4 for r in results.values())


def test_a_dead_leader_and_its_members_leave_every_directory(grid):
    assert LEAVE_BOUND_S >= DEAD_PEER_S
    others = [n for n in NODES if n not in ("b1", "b2")]
    # Silent death first: a frozen leader sends no FIN; the links' liveness checks must notice.
    grid.procs["b1"].send_signal(signal.SIGSTOP)
    try:
        grid.wait_all(others, present=others, absent=["b1", "b2"], timeout=LEAVE_BOUND_S)
    finally:
        grid.procs["b1"].send_signal(signal.SIGCONT)
    # Thawed, it relinks and its member comes back through it.
    grid.wait_all(timeout=REJOIN_TIMEOUT_S)
    # Then a hard kill: the kernel closes its sockets.
    grid.procs["b1"].kill()
    grid.procs["b1"].wait(timeout=10)
    grid.wait_all(others, present=others, absent=["b1", "b2"], timeout=LEAVE_BOUND_S)
    # A new b1 on the same node port: b2, which kept retrying, rejoins through it.
    proc = grid.start_node("b1")
    wait_for_line(proc, "joined", timeout=JOIN_TIMEOUT_S)
    grid.wait_all(timeout=REJOIN_TIMEOUT_S)
    assert call(grid.control("a2"), "ping", {"dst": "b2"})["route_there"] == expected_route("a2", "b2")


def test_restarting_the_rendezvous_node_brings_every_node_back(grid):
    stop_process(grid.procs["rendezvous"])
    # Leaders lose their uplink: each forgets the other clusters.
    for name, cluster_nodes in (("a2", ["a1", "a2"]), ("c2", ["c1", "c2"]), ("rv", ["rv"])):
        gone = [n for n in NODES if n not in cluster_nodes]
        grid.wait_all([name], present=cluster_nodes, absent=gone, timeout=JOIN_TIMEOUT_S)
    grid.start_rendezvous()
    grid.wait_all(timeout=REJOIN_TIMEOUT_S)
    results = ping_all(grid)
    for (src, dst), r in results.items():
        assert r["route_there"] == expected_route(src, dst)
