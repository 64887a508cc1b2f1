"""Losing a node or the rendez-vous node in the lab: what keeps working (issue 12).

A server program keeps serving across a SIGKILL and restart of its node, seen from other
clusters:
``python -m http.server`` under ``gridsock run`` on b2 (a member of cluster B, behind its
firewall). Its node is killed with SIGKILL and started again (same name, same state
directory: the lab's nodes keep theirs under the test run's ``XDG_STATE_HOME``); the server
program is never restarted. It comes back with the same node id and grid address, the
program's listener registers its grid port again with the new node, and clients under
``gridsock run`` on a2 (behind A's NAT) and c2 (in the private cluster C) fetch the same file,
byte-exact, by name and by grid address.

Without the rendez-vous node: a2 (a member behind A's NAT) and rv (the node on the rendez-vous
host, reachable from outside) have a meta link; the rendez-vous process is killed; a1 forgets
the other clusters and tells a2 so, but a2 keeps rv (the link vouches for it) and the two keep
making new connections, both ways, which echo bytes through the personality. The rendez-vous
node then restarts and the grid converges again.

Every wait is bounded; readiness is a line or a node's status.
"""
from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time

import pytest

from gridsock.bootstrap.control import call
from gridsock.testing.procs import gridsock_argv, wait_for_line

from .gridsession import ECHO_PORT, JOIN_TIMEOUT_S, NODES, make_grid

pytestmark = pytest.mark.timeout(300)

# A program under gridsock run (interpreter start, a connection across the lab, a small file)
# ends within this.
APP_TIMEOUT_S = 120.0
# The restarted node serves the program's grid port again within this (the listener's keeper
# retries at most RECONNECT_MAX_S apart; the node starts and joins within seconds).
BACK_TIMEOUT_S = 60.0
# How often the test looks whether the port is served again (a condition, polled).
POLL_S = 0.2
PAYLOAD_BYTES = 1 << 20

FETCH = """
import hashlib, sys, urllib.request
with urllib.request.urlopen(sys.argv[1], timeout=90) as response:
    print(response.status, hashlib.sha256(response.read()).hexdigest())
"""


@pytest.fixture(scope="module")
def grid(lab, tmp_path_factory):
    yield from make_grid(lab, tmp_path_factory)


def fetch(grid, node: str, url: str) -> str:
    done = grid.lab.run(node, gridsock_argv("run", "--node", node, "--", sys.executable, "-c", FETCH, url),
                        capture_output=True, text=True, env=grid.env, timeout=APP_TIMEOUT_S)
    assert done.returncode == 0, f"{node}: {done.stderr}"
    return done.stdout.strip()


def status(grid, node: str) -> dict:
    return call(grid.control(node), "status", {}, timeout=JOIN_TIMEOUT_S)


def test_an_http_server_on_b2_serves_a2_and_c2_again_after_b2_is_killed_and_restarted(grid):
    www = grid.tmp / "www"
    www.mkdir()
    payload = os.urandom(PAYLOAD_BYTES)
    (www / "data.bin").write_bytes(payload)
    digest = hashlib.sha256(payload).hexdigest()
    with open(grid.tmp / "http-server.log", "wb") as log:
        server = grid.lab.spawn("b2", gridsock_argv("run", "--node", "b2", "--", sys.executable, "-m", "http.server",
                                                    "0", "--directory", str(www)),
                                stdout=subprocess.PIPE, stderr=log, env=grid.env)
    try:
        line = wait_for_line(server, "Serving HTTP on ", timeout=APP_TIMEOUT_S)
        ip, port = line.split()[3], int(line.split()[5])
        before = status(grid, "b2")["node_id"]
        for client in ("a2", "c2"):
            assert fetch(grid, client, f"http://b2:{port}/data.bin") == f"200 {digest}"

        killed = grid.procs["b2"]
        killed.send_signal(signal.SIGKILL)
        killed.wait(timeout=JOIN_TIMEOUT_S)
        killed.stdout.close()
        again = grid.start_node("b2")
        wait_for_line(again, "joined", timeout=JOIN_TIMEOUT_S)
        assert status(grid, "b2")["node_id"] == before  # the same identity, so the same grid address
        deadline = time.monotonic() + BACK_TIMEOUT_S
        while port not in status(grid, "b2")["listening"]:  # the server's listener came back by itself
            assert time.monotonic() < deadline, f"b2 does not serve grid port {port} again"
            time.sleep(POLL_S)
        grid.wait_all(NODES)

        for client in ("a2", "c2"):
            assert fetch(grid, client, f"http://b2:{port}/data.bin") == f"200 {digest}"
            assert fetch(grid, client, f"http://{ip}:{port}/data.bin") == f"200 {digest}"
        assert server.poll() is None  # never restarted
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=JOIN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        server.stdout.close()


ECHO = """
import socket, sys
from gridsock.personalities.socket import agent
host, port, stack = sys.argv[1], int(sys.argv[2]), sys.argv[3] if len(sys.argv) > 3 else None
payload = b"through the meta link " * 1000
if stack:  # (a stack named: the agent client's connect)
    sock = agent().connect(host, port, stack=stack, timeout=60)[0]
else:
    sock = socket.create_connection((host, port), timeout=60)
with sock:
    sock.sendall(payload)
    sock.shutdown(socket.SHUT_WR)
    got = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            break
        got += chunk
print("echoed", got == payload)
"""


def echo(grid, node: str, host: str, *stack: str) -> str:
    done = grid.lab.run(node, gridsock_argv("run", "--node", node, "--", sys.executable, "-c", ECHO, host,
                                            str(ECHO_PORT), *stack),
                        capture_output=True, text=True, env=grid.env, timeout=APP_TIMEOUT_S)
    assert done.returncode == 0, f"{node}: {done.stderr}"
    return done.stdout.strip()


def meta_link_up(grid, node: str, peer: str) -> bool:
    return any(link["peer"] == peer and link["label"] not in ("opening",) and link["stack"] != "bootstrap"
               for link in status(grid, node)["meta_links"])


def wait_until(condition, what: str, timeout: float = BACK_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s"
        time.sleep(POLL_S)


def test_a2_and_the_rv_node_keep_connecting_over_their_meta_link_while_the_rendezvous_is_down(grid):
    # rv (the node on the rendez-vous host) is reachable from outside: a2 (a member behind A's
    # NAT) opens a meta link to it with its first connection.
    assert echo(grid, "a2", "rv") == "echoed True"
    wait_until(lambda: meta_link_up(grid, "a2", "rv") and meta_link_up(grid, "rv", "a2"), "a meta link a2 <-> rv")
    rendezvous = grid.procs["rendezvous"]
    rendezvous.send_signal(signal.SIGKILL)
    rendezvous.wait(timeout=JOIN_TIMEOUT_S)
    rendezvous.stdout.close()
    try:
        # a1 (no meta link to rv) forgets every other cluster and tells a2; a2's link keeps rv.
        grid.wait_all(["a2"], present=["a1", "a2"], absent=["b1", "c1"], timeout=BACK_TIMEOUT_S)
        assert "rv" not in grid.directory("a1")  # (a1 asked rv for nothing: no link vouches for it there)
        assert "rv" in grid.directory("a2") and "a2" in grid.directory("rv")
        assert echo(grid, "a2", "rv") == "echoed True"
        # Into A's NAT: a2 dials back, asked over the link. (The stack is named: the rules offer
        # reverse only where rv's own entry says it accepts inbound connections, and a leader's
        # own entry can lack its dial-back verdict, which the rules then read as "no".)
        assert echo(grid, "rv", "a2", "tls/reverse") == "echoed True"
    finally:
        grid.start_rendezvous()
    grid.wait_all(NODES, timeout=BACK_TIMEOUT_S)
    assert echo(grid, "a2", "b2") == "echoed True"
