"""In the lab: a cluster is joined with its credential, not by saying so (issue 16).

A session of its own (ports apart from the shared grid's) that defines cluster B: its leader
on b1 (behind cluster B's firewall) and a member on b2 hold B's session file; a node without
a cluster on the rendez-vous host holds the session's own. A node on a1 (behind A's NAT) that
declares cluster B with the session's own file is refused and ``gridsock node`` exits 2 with
the reason; the node outside B gets no plain ``tcp`` to b1 (the server's policy refuses it),
while b1's member does. Readiness is a printed line, never a sleep.
"""
from __future__ import annotations

import os
import subprocess

import pytest

from gridsock.session import cluster_file_name, create_session
from gridsock.testing.procs import gridsock_argv, stop_process, wait_for_line

# Ports of this module's session: the shared grid's are 7700 and 7701.
RV_PORT = 7790
NODE_PORT = 7791
ECHO_PORT = 9190
# Starting a gridsock process in a namespace and joining takes well under this.
READY_TIMEOUT_S = 60.0
RUN_TIMEOUT_S = 120.0


@pytest.fixture
def attested(lab, tmp_path):
    """The session's processes (rendez-vous node, b1x leader of B, b2x member, rvx without a
    cluster), running; yields ``(env, control socket by name, the session directory)``."""
    session_dir = tmp_path / "session"
    create_session(session_dir, f"{lab.addr('rv')}:{RV_PORT}", clusters=("B",))
    run_dir = tmp_path / "run"
    env = dict(os.environ, GRIDSOCK_RUN_DIR=str(run_dir), PYTHONUNBUFFERED="1")
    procs = []
    control = {}

    def spawn(host, name, *args):
        control[name] = str(tmp_path / f"{name}.sock")
        with open(tmp_path / f"{name}.log", "ab") as log:
            proc = lab.spawn(host, gridsock_argv("-v", *args, "--control", control[name]), stdout=subprocess.PIPE,
                             stderr=log, env=env)
        procs.append(proc)
        return proc

    def node(host, name, session_file, *extra):
        return spawn(host, name, "node", "--session", str(session_dir / session_file), "--name", name,
                     "--listen", f"{lab.addr(host)}:{NODE_PORT}", "--echo", str(ECHO_PORT), "--front-door", "off",
                     "--state-dir", "off", *extra)

    try:
        rv = spawn("rv", "rendezvous", "rendezvous", "--session", str(session_dir / "session.toml"))
        wait_for_line(rv, "rendezvous listening", timeout=READY_TIMEOUT_S)
        b1 = node("b1", "b1x", cluster_file_name("B"), "--cluster", "B")
        rvx = node("rv", "rvx", "session.toml")
        for proc in (b1, rvx):
            wait_for_line(proc, "joined", timeout=READY_TIMEOUT_S)
        b2 = node("b2", "b2x", cluster_file_name("B"), "--cluster", "B", "--leader", f"{lab.addr('b1')}:{NODE_PORT}")
        wait_for_line(b2, "joined", timeout=READY_TIMEOUT_S)
        yield env, control, session_dir
    except Exception:
        for path in sorted(tmp_path.glob("*.log")):
            print(f"--- {path.name}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-15:]))
        raise
    finally:
        for proc in reversed(procs):
            stop_process(proc)


def test_a_node_without_the_clusters_credential_is_refused_and_gets_no_raw_stack(lab, attested):
    env, control, session_dir = attested
    rogue = lab.run("a1", gridsock_argv("node", "--session", str(session_dir / "session.toml"), "--name", "rogue",
                                        "--cluster", "B", "--listen", f"{lab.addr('a1')}:0", "--control", "",
                                        "--front-door", "off", "--state-dir", "off"),
                    env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert rogue.returncode == 2, rogue.stderr
    assert "rogue declares cluster 'B', but its certificate names no cluster" in rogue.stderr, rogue.stderr
    assert "Traceback" not in rogue.stderr
    # Outside B (a node without a cluster): plain tcp to b1 is refused by b1's policy...
    outside = lab.run("rv", gridsock_argv("transfer", "--control", control["rvx"], f"b1x:{ECHO_PORT}",
                                          "--stack", "tcp", "--bytes", "1K"),
                      env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert outside.returncode != 0, outside.stdout
    assert "requires tls" in outside.stderr + outside.stdout, outside.stderr
    # ...and tls over the relay works; inside B (b1's member, attested) plain tcp does.
    for name, stack in (("rvx", "tls/relay"), ("b2x", "tcp")):
        done = lab.run("rv" if name == "rvx" else "b2", gridsock_argv("transfer", "--control", control[name],
                                                                       f"b1x:{ECHO_PORT}", "--stack", stack,
                                                                       "--bytes", "64K"),
                       env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
        assert done.returncode == 0, (stack, done.stdout, done.stderr)
        assert stack in done.stdout, done.stdout
