"""The session's processes in the lab, shared by the lab test modules (fixture ``grid``)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path


from gridsock.bootstrap.control import call
from gridsock.node import RECONNECT_MAX_S
from gridsock.testing.procs import gridsock_argv, stop_process, wait_for_line

RV_PORT = 7700
NODE_PORT = 7701
ECHO_PORT = 9000  # every lab node serves an echo service on this grid port
NODES = ("rv", "a1", "a2", "b1", "b2", "c1", "c2")
LEADERS = {"A": "a1", "B": "b1", "C": "c1"}
# The lab's session defines its clusters: a cluster's nodes join with its session file, which
# holds its join token (docs/security.md, "Clusters are attested, not declared").
CLUSTERS = tuple(LEADERS)
# Joining, and rejoining after the rendez-vous node restarts (backoff at most RECONNECT_MAX_S).
JOIN_TIMEOUT_S = 30.0
REJOIN_TIMEOUT_S = RECONNECT_MAX_S * 2 + 20.0


class Grid:
    """The session's processes in the lab, by node name."""

    def __init__(self, lab, tmp) -> None:
        self.lab = lab
        self.tmp = tmp
        self.run_dir = str(tmp / "run")
        self.env = dict(os.environ, GRIDSOCK_RUN_DIR=self.run_dir, PYTHONUNBUFFERED="1")
        self.session = str(tmp / "session" / "session.toml")
        self.procs: dict = {}
        self.logs: dict = {}
        self.rules: dict = {}  # node name -> rules file text

    def session_for(self, cluster) -> str:
        """The session file a node of ``cluster`` is handed (the session's own for None)."""
        return self.session if cluster is None else str(Path(self.session).with_name(f"cluster-{cluster}.toml"))

    def control(self, name: str) -> str:
        return os.path.join(self.run_dir, f"{name}.sock")

    def spawn(self, host: str, name: str, *args: str) -> subprocess.Popen:
        log = open(self.tmp / f"{name}.log", "ab")
        self.logs[name] = self.tmp / f"{name}.log"
        proc = self.lab.spawn(host, gridsock_argv("-v", *args), stdout=subprocess.PIPE, stderr=log, env=self.env)
        log.close()
        self.procs[name] = proc
        return proc

    def start_rendezvous(self) -> None:
        proc = self.spawn("rv", "rendezvous", "rendezvous", "--session", self.session)
        wait_for_line(proc, "rendezvous listening", timeout=JOIN_TIMEOUT_S)

    def node_args(self, name: str) -> list:
        cluster = name[0].upper() if name != "rv" else None
        args = ["node", "--session", self.session_for(cluster), "--name", name,
                "--listen", f"{self.lab.addr(name)}:{NODE_PORT}", "--echo", str(ECHO_PORT),
                "--ssh-key", self.lab.ssh_client_key, "--ssh-known-hosts", self.lab.ssh_known_hosts]
        if name in self.rules:
            path = self.tmp / f"{name}-rules.toml"
            path.write_text(self.rules[name])
            args += ["--rules", str(path)]
        if cluster:
            args += ["--cluster", cluster]
            leader = LEADERS[cluster]
            if name != leader:
                args += ["--leader", f"{self.lab.addr(leader)}:{NODE_PORT}"]
            elif cluster == "C":
                args += ["--ssh-gateway", self.lab.ssh_gateway]
        return args

    def start_node(self, name: str) -> subprocess.Popen:
        return self.spawn(name, name, *self.node_args(name))

    def wait_all(self, names=NODES, *, present=NODES, absent=(), timeout=JOIN_TIMEOUT_S) -> None:
        for name in names:
            call(self.control(name), "wait", {"present": list(present), "absent": list(absent), "timeout": timeout},
                 timeout=timeout + 5)

    def directory(self, name: str) -> dict:
        return {e["name"]: e for e in call(self.control(name), "status")["directory"]}

    def logs_tail(self) -> str:
        out = []
        for name, path in self.logs.items():
            lines = path.read_text(errors="replace").splitlines()[-15:]
            out.append(f"--- {name}\n" + "\n".join(lines))
        return "\n".join(out)


def make_grid(lab, tmp_path_factory, rules=None):
    tmp = tmp_path_factory.mktemp("grid")
    g = Grid(lab, tmp)
    g.rules.update(rules or {})
    subprocess.run(gridsock_argv("session", "new", str(tmp / "session"), "--rendezvous", f"{lab.addr('rv')}:{RV_PORT}",
                                 *(arg for cluster in CLUSTERS for arg in ("--cluster", cluster))),
                   check=True, env=g.env, stdout=subprocess.DEVNULL)
    yield from run_grid(g, g.start_rendezvous)


def run_grid(g, start_rendezvous):
    """Start the rendez-vous node(s) (``start_rendezvous()``), the leaders, then the members of
    grid ``g``; yield it (a module fixture's body); then stop every process it started (SIGCONT
    first: a test may have stopped one)."""
    try:
        start_rendezvous()
        for name in ("rv", "a1", "b1", "c1"):
            g.start_node(name)
        for name in ("rv", "a1", "b1", "c1"):
            wait_for_line(g.procs[name], "joined", timeout=JOIN_TIMEOUT_S)
        for name in ("a2", "b2", "c2"):
            g.start_node(name)
        for name in ("a2", "b2", "c2"):
            wait_for_line(g.procs[name], "joined", timeout=JOIN_TIMEOUT_S)
        g.wait_all()
        yield g
    except Exception:
        print(g.logs_tail(), file=sys.stderr)
        raise
    finally:
        for proc in g.procs.values():
            if proc.poll() is None:
                try:
                    proc.send_signal(signal.SIGCONT)
                except ProcessLookupError:
                    pass
            stop_process(proc)


