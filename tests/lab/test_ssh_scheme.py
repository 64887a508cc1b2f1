"""The paper's SSH scheme: the rendez-vous node on a host no cluster can reach, through SSH.

The rendez-vous node runs on rv, made a user's machine that nothing can reach: its firewall
drops every new connection that comes in on its interface. It logs in to two front-ends and asks
each for a remote forward (``tcpip-forward``): fec, cluster C's front-end, binds RV_PORT on every
address (10.3.0.1 for C, 203.0.113.4 for B, which has a way out but cannot enter rv either), and
gwa, given an sshd of its own as cluster A's front-end, binds RV_PORT on its LAN address
10.1.0.1 only (``gridsock rendezvous --ssh-forward``). Each cluster's nodes are told the
forwarded port they can reach (``gridsock node --rendezvous``); the public node ``rv`` (on the
rendez-vous host itself) uses the session file's address. Every process is the real ``gridsock`` CLI in its namespace, as in the other
lab modules. Then, as with a public
rendez-vous node: the 42 ordered pings, a data connection per ordered pair, and a forward that
breaks is opened again and its cluster comes back.
"""
from __future__ import annotations

import itertools
import subprocess
import time
from pathlib import Path

import pytest

from gridsock.bootstrap.control import call
from gridsock.testing.lab import ADDRESSES, LAN_ADDRESSES
from gridsock.testing.procs import gridsock_argv, wait_for_line

from .gridsession import ECHO_PORT, JOIN_TIMEOUT_S, LEADERS, NODES, REJOIN_TIMEOUT_S, Grid, run_grid

RV_PORT = 7710  # the rendez-vous port on rv, and the port each front-end forwards to it
# The front-ends' forwarded ports, by cluster: what each cluster's leader dials (and its members
# never do). B has no front-end: its way out reaches fec's public address.
FRONT_ENDS = {
    "A": f"{LAN_ADDRESSES['gwa']}:{RV_PORT}",
    "B": f"{ADDRESSES['fec']}:{RV_PORT}",
    "C": f"{LAN_ADDRESSES['fec']}:{RV_PORT}",
}
FIREWALL_RULE = ["INPUT", "-i", "eth0", "-m", "conntrack", "--ctstate", "NEW",
                 "-m", "comment", "--comment", "gridsock-ssh-scheme", "-j", "DROP"]
FORWARDS_UP_TIMEOUT_S = 60.0
TRANSFER_BYTES = 1 << 20
TRANSFER_TIMEOUT_S = 60.0

def cluster_of(name: str):
    return None if name == "rv" else name[0].upper()


class SchemeGrid(Grid):
    """The lab grid of gridsession, with the rendez-vous node behind SSH forwards."""

    def start_rendezvous(self) -> None:
        lab = self.lab
        proc = self.spawn("rv", "rendezvous", "rendezvous", "--session", self.session,
                          "--ssh-forward", f"{lab.start_sshd('gwa')}={LAN_ADDRESSES['gwa']}:{RV_PORT}",
                          "--ssh-forward", f"{lab.ssh_gateway_public}=0.0.0.0:{RV_PORT}",
                          "--ssh-key", lab.ssh_client_key, "--ssh-known-hosts", lab.ssh_known_hosts)
        wait_for_line(proc, "rendezvous listening", timeout=JOIN_TIMEOUT_S)
        wait_for_line(proc, "ssh forwards up", timeout=FORWARDS_UP_TIMEOUT_S)

    def node_args(self, name: str) -> list:
        args = super().node_args(name)
        cluster = cluster_of(name)
        if cluster is not None:  # its cluster's front-end's forwarded port, not the session file's address
            args += ["--rendezvous", FRONT_ENDS[cluster]]
        if "--ssh-gateway" in args:  # c1 dials its front-end's forwarded port, not through SSH
            at = args.index("--ssh-gateway")
            del args[at:at + 2]
        return args + ["--state-dir", "off"]


@pytest.fixture(scope="module")
def grid(lab, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sshscheme")
    g = SchemeGrid(lab, tmp)
    clusters = [arg for cluster in FRONT_ENDS for arg in ("--cluster", cluster)]
    subprocess.run(gridsock_argv("session", "new", str(tmp / "session"), "--rendezvous", f"{lab.addr('rv')}:{RV_PORT}",
                                 *clusters), check=True, env=g.env, stdout=subprocess.DEVNULL)
    lab.run("rv", ["iptables", "-A", *FIREWALL_RULE], check=True)
    try:
        yield from run_grid(g, g.start_rendezvous)
    finally:
        lab.run("rv", ["iptables", "-D", *FIREWALL_RULE])


def expected_route(src: str, dst: str) -> list:
    """The tree route: member -> leader -> rendezvous -> leader -> member."""
    def up(n):
        c = cluster_of(n)
        return [n] if c is None or LEADERS[c] == n else [n, LEADERS[c]]

    if cluster_of(src) is not None and cluster_of(src) == cluster_of(dst):
        path = up(src)
        return path + [dst] if path[-1] != dst else path
    return up(src) + ["rendezvous"] + list(reversed(up(dst)))


def rendezvous_directory(grid) -> dict:
    return {e["name"]: e for e in call(grid.control("rendezvous"), "status")["directory"]}


def test_no_cluster_reaches_the_rendezvous_host(grid):
    for host in ("a1", "b1", "c1"):
        assert grid.lab.probe(host, grid.lab.addr("rv"), RV_PORT) != "connected", host
    assert grid.lab.probe("rv", grid.lab.addr("rv"), RV_PORT) == "connected"  # it does listen


def test_leaders_came_through_their_front_ends(grid):
    """Each leader's link arrived through a forward: the rendez-vous node saw it come from
    where the front-end's sshd saw it (A's and C's private addresses, B's own)."""
    seen = {name: entry["observed"].rsplit(":", 1)[0] for name, entry in rendezvous_directory(grid).items()
            if entry["role"] == "leader"}
    assert seen == {"a1": grid.lab.addr("a1"), "b1": grid.lab.addr("b1"), "c1": grid.lab.addr("c1"),
                    "rv": grid.lab.addr("rv")}


def test_ping_every_ordered_pair(grid):
    results = {}
    for src, dst in itertools.permutations(NODES, 2):
        results[src, dst] = call(grid.control(src), "ping", {"dst": dst, "timeout": 10}, timeout=20)
    assert len(results) == 42
    for (src, dst), r in results.items():
        assert r["route_there"] == expected_route(src, dst), (src, dst)
        assert r["route_back"] == expected_route(dst, src), (src, dst)


@pytest.mark.parametrize("src,dst", list(itertools.permutations(NODES, 2)))
def test_a_data_connection_between_every_ordered_pair(grid, src, dst):
    args = {"dst": dst, "port": ECHO_PORT, "bytes": TRANSFER_BYTES, "stack": None, "timeout": 30}
    result = call(grid.control(src), "transfer", args, timeout=TRANSFER_TIMEOUT_S)
    assert result["bytes"] == TRANSFER_BYTES
    assert result["sha256_received"] == result["sha256_sent"]


def uplinks_up(grid, name: str) -> int:
    """How many times ``name``'s uplink came up (its status's uplink history)."""
    return sum(1 for event in call(grid.control(name), "status")["uplink_history"] if event["state"] == "up")


def test_a_broken_forward_is_opened_again_and_its_cluster_comes_back(grid):
    """The SSH connection to gwa is cut (its sshd's process for our session is killed): the
    forwarder dials again and asks for the forward again; a1 relinks through it."""
    lab = grid.lab
    (sshd_pid,) = [rec["pid"] for rec in lab.status()["processes"]
                   if rec["host"] == "gwa" and Path(rec["argv"][0]).name == "sshd"]
    sessions = Path(f"/proc/{sshd_pid}/task/{sshd_pid}/children").read_text().split()
    assert len(sessions) == 1, "gwa's sshd should serve one session: the forwarder's"
    before = uplinks_up(grid, "a1")
    lab.run("gwa", ["kill", "-KILL", sessions[0]], check=True)
    deadline = time.monotonic() + REJOIN_TIMEOUT_S
    while uplinks_up(grid, "a1") == before:  # a condition polled, bounded in time
        assert time.monotonic() < deadline, "a1 did not link again"
        time.sleep(0.2)
    grid.wait_all(present=NODES, timeout=REJOIN_TIMEOUT_S)
    r = call(grid.control("a2"), "ping", {"dst": "c2", "timeout": 10}, timeout=20)
    assert r["route_there"] == expected_route("a2", "c2")
    assert rendezvous_directory(grid)["a1"]["observed"].rsplit(":", 1)[0] == lab.addr("a1")
    log = grid.logs["rendezvous"].read_text()
    assert log.count(f"listens on {LAN_ADDRESSES['gwa']}:{RV_PORT}") == 2, log[-3000:]
