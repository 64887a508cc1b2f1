"""The resume layer in the lab: a relayed connection moves to a direct path when a firewall opens.

a2 (cluster A, behind gwa's NAT) talks to the echo service inside b2's node (cluster B, behind
fwb's firewall) over ``tls/resume/relay`` (a2 > a1 > rendezvous > b1 > b2), from a program
under ``gridsock run`` that sends random data all along and reads the echo. While fwb drops
everything between A and B (two rules in its FORWARD chain), the relay is the only path and
a2's tries of the better method its rules list for b2 (``splice``) fail. Then the rules go: the
next try connects, the connection moves to it at a byte boundary, and the program, told to
finish, finds every byte it sent echoed back, in order (SHA-256 both ways), never knowing.

The same connection survives the rendez-vous node's death: killed (SIGKILL) under a
``tls/resume(timeout=...)/relay`` transfer and started again, the relay path comes back once
the leaders relink, the connection resumes over it, and every byte arrives (where a plain
``tls/relay`` connection is reset: tests/lab/test_breaks.py).

From cluster C, which has no route out at all: c2 to b2 over ``tls/resume/relay`` (through the
SSH tunnel of c1's uplink); tries of ``splice`` fail (no route); then fec is made to forward
and masquerade C's packets and c2 routes through it; the next try connects, the connection
moves to ``splice``, nothing is lost. (The issue names C and A: once C has a way out, C and A
are two NATs, and a simultaneous open between two NATs is refused by each NAT's reset to the
other's first SYN -- a limit of ``splice``, not of this layer -- so the server is in B.)
"""
from __future__ import annotations

import time

import pytest

from gridsock.bootstrap.control import call
from gridsock.testing.procs import wait_for_line

from .gridsession import ECHO_PORT, REJOIN_TIMEOUT_S, make_grid
from .test_breaks import Programs, kill, restart

pytestmark = pytest.mark.timeout(600)

# A program (interpreter start, the connection, the stream) reaches each of its lines within this.
APP_TIMEOUT_S = 120.0
# An upgrade try (at most resume.ATTEMPT_TIMEOUT_S) and the backoff before the next one: the
# tries come at 2, 4, 8, 16 s intervals (UPGRADE_INITIAL_S doubling) after they fail.
UPGRADE_WAIT_S = 120.0
STACK = "tls/resume/relay"
# Both directions between cluster A (seen as gwa's address) and cluster B, at fwb.
BLOCK_A = [["FORWARD", "-s", "203.0.113.2", "-j", "DROP"], ["FORWARD", "-d", "203.0.113.2", "-j", "DROP"]]

CLIENT = """
    import hashlib, os, sys, threading
    from gridsock.agentclient import AgentClient

    peer, port, stack = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    total = int(sys.argv[4]) if len(sys.argv) > 4 else 0  # (0: stream until told to finish)
    sock, info = AgentClient.from_env().connect(peer, port, stack=stack, timeout=60)
    print("connected", info["stack"], flush=True)
    sock.settimeout(120)
    finish = threading.Event()
    sent, received = hashlib.sha256(), hashlib.sha256()
    counts = [0, 0]
    errors = []

    def send():
        try:
            while counts[0] < total if total else not finish.is_set():
                block = os.urandom(min(65536, total - counts[0]) if total else 65536)
                sock.sendall(block)
                sent.update(block)
                counts[0] += len(block)
            finish.wait()  # (with a byte count: the connection stays open until the test is done)
            sock.shutdown(1)
        except OSError as exc:
            errors.append(repr(exc))

    def receive():
        told = False
        try:
            while True:
                data = sock.recv(65536)
                if not data:
                    return
                received.update(data)
                counts[1] += len(data)
                if not told and counts[1] >= 4 << 20:
                    print("streaming", counts[1], flush=True)
                    told = True
        except OSError as exc:
            errors.append(repr(exc))

    threads = [threading.Thread(target=send), threading.Thread(target=receive)]
    for thread in threads:
        thread.start()
    sys.stdin.readline()  # the test opened the firewall and saw the upgrade meanwhile
    finish.set()
    for thread in threads:
        thread.join(600 if total else 120)
    print("RESULT", counts[0], sent.hexdigest(), counts[1], received.hexdigest(), errors or "ok", flush=True)
"""


@pytest.fixture(scope="module")
def grid(lab, tmp_path_factory):
    yield from make_grid(lab, tmp_path_factory)


@pytest.fixture
def programs(grid):
    p = Programs(grid)
    yield p
    p.stop()


def firewall(grid, action: str) -> None:
    for rule in BLOCK_A:
        grid.lab.run("fwb", ["iptables", action, *rule], check=True)


def resume_state(grid, node: str, stack: str = STACK) -> dict:
    """The resume state of ``node``'s one connection with the layer (gridsock status)."""
    found = [c["resume"] for c in call(grid.control(node), "status")["connections"]
             if c.get("resume") and c["stack"] == stack]
    assert len(found) == 1, found
    return found[0]


def wait_state(grid, node: str, condition, what: str, timeout: float, stack: str = STACK) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        state = resume_state(grid, node, stack)
        if condition(state):
            return state
        assert time.monotonic() < deadline, f"not within {timeout:g} s: {what} (last: {state})"
        time.sleep(0.2)


def test_a_relayed_connection_moves_to_a_direct_path_when_the_firewall_opens(grid, programs):
    firewall(grid, "-I")
    opened = False
    try:
        proc = programs.script("a2", CLIENT, "b2", str(ECHO_PORT), STACK)
        assert wait_for_line(proc, "connected", timeout=APP_TIMEOUT_S).split()[1] == STACK
        wait_for_line(proc, "streaming", timeout=APP_TIMEOUT_S)
        state = wait_state(grid, "a2", lambda s: s["upgrade_tries"] >= 1 and s["last_upgrade_error"],
                           "a failed upgrade try while the firewall drops A<->B", UPGRADE_WAIT_S)
        assert state["method"] == "relay" and state["upgrades"] == 0, state
        firewall(grid, "-D")
        opened = True
        state = wait_state(grid, "a2", lambda s: s["upgrades"] >= 1, "the upgrade", UPGRADE_WAIT_S)
        assert state["method"] == "splice", state
        assert resume_state(grid, "b2")["method"] == "splice"
        finish(proc)
    finally:
        if not opened:
            firewall(grid, "-D")


def finish(proc) -> int:
    """Tell the client to finish (with a byte count given: once it has sent them); check that
    everything it sent came back, in order; return the count."""
    proc.stdin.write(b"finish\n")
    proc.stdin.flush()
    result = wait_for_line(proc, "RESULT", timeout=APP_TIMEOUT_S).split()
    sent_n, sent_sha, received_n, received_sha, errors = result[1:6]
    assert errors == "ok", result
    assert int(sent_n) > 4 << 20 and (sent_n, sent_sha) == (received_n, received_sha), result
    return int(sent_n)


# Long enough for the leaders to relink to a restarted rendez-vous node (their backoff).
RV_STACK = f"tls/resume(timeout={REJOIN_TIMEOUT_S + 30:.1f},upgrade=false)/relay"


def test_a_relayed_connection_survives_the_rendezvous_node_restarting(grid, programs):
    try:
        proc = programs.script("a2", CLIENT, "b2", str(ECHO_PORT), RV_STACK)
        assert wait_for_line(proc, "connected", timeout=APP_TIMEOUT_S).split()[1] == RV_STACK
        wait_for_line(proc, "streaming", timeout=APP_TIMEOUT_S)
        kill(grid, "rendezvous")
        wait_state(grid, "a2", lambda s: s["suspended"], "the relay path lost", UPGRADE_WAIT_S, RV_STACK)
        restart(grid, "rendezvous")
        state = wait_state(grid, "a2", lambda s: s["resumes"] >= 1 and not s["suspended"], "the resume",
                           REJOIN_TIMEOUT_S, RV_STACK)
        assert state["method"] == "relay", state
        finish(proc)
    finally:
        programs.stop()
        restart(grid, "rendezvous")


# Cluster C given a way out for a while: fec forwards and masquerades C's packets, as gwa does
# A's, and c2 routes through it. (The lab's C has no route out at all.)
OPEN_C = [
    ("fec", ["sysctl", "-qw", "net.ipv4.ip_forward=1"]),
    ("fec", ["iptables", "-t", "nat", "-A", "POSTROUTING", "-s", "10.3.0.0/24", "-o", "eth0", "-j", "MASQUERADE"]),
    ("c2", ["ip", "route", "add", "default", "via", "10.3.0.1"]),
]
CLOSE_C = [
    ("c2", ["ip", "route", "del", "default", "via", "10.3.0.1"]),
    ("fec", ["iptables", "-t", "nat", "-D", "POSTROUTING", "-s", "10.3.0.0/24", "-o", "eth0", "-j", "MASQUERADE"]),
    ("fec", ["sysctl", "-qw", "net.ipv4.ip_forward=0"]),
]


def test_a_relayed_connection_from_c_moves_to_splice_when_c_gets_a_way_out(grid, programs):
    # c2 to b2: a splice needs one end at an address of its own (two NATs refuse each other's
    # first SYN, whatever the resume layer does), so the server is in cluster B, not A.
    proc = programs.script("c2", CLIENT, "b2", str(ECHO_PORT), STACK)
    assert wait_for_line(proc, "connected", timeout=APP_TIMEOUT_S).split()[1] == STACK
    wait_for_line(proc, "streaming", timeout=APP_TIMEOUT_S)
    state = wait_state(grid, "c2", lambda s: s["upgrade_tries"] >= 1 and s["last_upgrade_error"],
                       "a failed upgrade try while C has no route out", UPGRADE_WAIT_S)
    assert state["method"] == "relay" and state["upgrades"] == 0, state
    try:
        for host, argv in OPEN_C:
            grid.lab.run(host, argv, check=True)
        state = wait_state(grid, "c2", lambda s: s["upgrades"] >= 1, "the upgrade", UPGRADE_WAIT_S)
        assert state["method"] == "splice", state
        assert resume_state(grid, "b2")["method"] == "splice"
        finish(proc)
    finally:
        for host, argv in CLOSE_C:
            grid.lab.run(host, argv)
