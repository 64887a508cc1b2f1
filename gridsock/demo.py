"""``gridsock demo``: a session on this machine, messages routed between its nodes.

It makes a session in a temporary directory, starts a rendez-vous node on loopback and six node
processes (cluster A: leader ``alpha`` with members ``a1``, ``a2`` on a Unix socket; cluster B:
leader ``beta`` with member ``b1`` on loopback TCP; ``solo`` with no cluster), pings every
ordered pair over the bootstrap channel, shows the routes and one node's status, and stops them.
Everything it starts runs with ``sys.executable -m gridsock``, exactly as a user would.
"""
from __future__ import annotations

import itertools
import os
import shutil
import socket
import subprocess
import tempfile

from .bootstrap.control import call
from .testing.procs import gridsock_argv, stop_process, wait_for_line

__all__ = ["run_demo"]

# Joining takes well under a second here; the bound only stops a broken demo from hanging.
DEMO_READY_TIMEOUT_S = 30.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_demo(*, keep: bool = False) -> int:
    """Run the demo; return 0 if every ordered pair of nodes could ping, 1 otherwise."""
    workdir = tempfile.mkdtemp(prefix="gridsock-demo-")
    # (the nodes' identities, which gridsock node keeps in a state directory, stay in the demo's)
    env = dict(os.environ, GRIDSOCK_RUN_DIR=os.path.join(workdir, "run"), XDG_STATE_HOME=os.path.join(workdir, "state"),
               PYTHONUNBUFFERED="1")
    procs = []

    def start(name, *args):
        proc = subprocess.Popen(gridsock_argv(*args), stdout=subprocess.PIPE, text=True, env=env)
        procs.append((name, proc))
        return proc

    try:
        session_dir = os.path.join(workdir, "session")
        port = _free_port()
        subprocess.run(gridsock_argv("session", "new", session_dir, "--rendezvous", f"127.0.0.1:{port}"),
                       check=True, env=env, stdout=subprocess.DEVNULL)
        session = os.path.join(session_dir, "session.toml")
        print(f"session in {session_dir}; rendez-vous node on 127.0.0.1:{port}")
        rv = start("rendezvous", "rendezvous", "--session", session, "--listen", f"127.0.0.1:{port}")
        wait_for_line(rv, "rendezvous listening", timeout=DEMO_READY_TIMEOUT_S)

        alpha_sock = os.path.join(workdir, "alpha.node")
        nodes = {
            "alpha": start("alpha", "node", "--session", session, "--name", "alpha", "--cluster", "A",
                           "--listen", f"unix:{alpha_sock}"),
            "beta": start("beta", "node", "--session", session, "--name", "beta", "--cluster", "B",
                          "--listen", "127.0.0.1:0"),
            "solo": start("solo", "node", "--session", session, "--name", "solo", "--listen", "127.0.0.1:0"),
        }
        beta_addr = wait_for_line(nodes["beta"], "node beta listening").split()[-1]
        for name in nodes:
            wait_for_line(nodes[name], "joined", timeout=DEMO_READY_TIMEOUT_S)
        members = {
            "a1": ("A", f"unix:{alpha_sock}"),
            "a2": ("A", f"unix:{alpha_sock}"),
            "b1": ("B", beta_addr),
        }
        for name, (cluster, leader) in members.items():
            nodes[name] = start(name, "node", "--session", session, "--name", name, "--cluster", cluster,
                                "--leader", leader, "--listen", "127.0.0.1:0")
        for name in members:
            wait_for_line(nodes[name], "joined", timeout=DEMO_READY_TIMEOUT_S)
        names = sorted(nodes)
        print(f"{len(names)} nodes joined: {', '.join(names)}")
        _wait_directories(env, names)

        failures = 0
        print("\nping over the bootstrap channel, every ordered pair:")
        for src, dst in itertools.permutations(names, 2):
            path = os.path.join(env["GRIDSOCK_RUN_DIR"], f"{src}.sock")
            try:
                r = call(path, "ping", {"dst": dst, "timeout": 10})
            except Exception as exc:  # the demo reports every failure and goes on
                failures += 1
                print(f"  {src:>5} -> {dst:<5} FAILED: {exc}")
                continue
            print(f"  {src:>5} -> {dst:<5} {r['rtt_ms']:7.2f} ms  {r['hops']} hop(s)  {' > '.join(r['route_there'])}")
        print("\n$ gridsock status --node a1")
        subprocess.run(gridsock_argv("status", "--node", "a1"), env=env, check=False)
        print(f"\n{len(names) * (len(names) - 1) - failures} of {len(names) * (len(names) - 1)} pings answered")
        if keep:
            print(f"processes left running; GRIDSOCK_RUN_DIR={env['GRIDSOCK_RUN_DIR']}; Ctrl-C stops them")
            try:
                rv.wait()
            except KeyboardInterrupt:
                pass
        return 1 if failures else 0
    finally:
        for _, proc in reversed(procs):
            stop_process(proc)
        shutil.rmtree(workdir, ignore_errors=True)


def _wait_directories(env, names) -> None:
    """Wait until every node's directory lists every node (bounded)."""
    for name in names:
        path = os.path.join(env["GRIDSOCK_RUN_DIR"], f"{name}.sock")
        call(path, "wait", {"present": names, "timeout": DEMO_READY_TIMEOUT_S}, timeout=DEMO_READY_TIMEOUT_S + 5)
