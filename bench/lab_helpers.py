"""A gridsock session in the grid lab for benchmarks: the real processes, each in its namespace.

Theory of operation
-------------------
After ``tests/lab/gridsession.py`` (benchmarks do not import the tests): a :class:`LabGrid` owns a
work directory with the session (``gridsock session new``), the run directory of the control
sockets (``GRIDSOCK_RUN_DIR``) and one log per process. ``start_rendezvous()`` runs ``gridsock
rendezvous`` in ``rv``; ``start_node(name)`` runs ``gridsock node`` in the namespace of the same
name (``rv`` runs a node too) with an echo service on grid port ``ECHO_PORT``, or any other argv
that takes the same arguments (a bench driver). Readiness is a line on the process's stdout
(``rendezvous listening``, ``joined``), never a sleep. ``stop()`` ends every process it started,
whatever state they are in; the lab itself (``Lab.down()``) is the caller's to tear down.
"""
from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from gridsock.bootstrap.control import call
from gridsock.testing.lab import Lab
from gridsock.testing.procs import gridsock_argv, stop_process, wait_for_line

__all__ = [
    "RV_PORT",
    "NODE_PORT",
    "ECHO_PORT",
    "LEADERS",
    "JOIN_TIMEOUT_S",
    "LabGrid",
    "proc_cpu_s",
    "replace_section",
]

RV_PORT = 7700
NODE_PORT = 7701
ECHO_PORT = 9000  # every node serves an echo service on this grid port
LEADERS = {"A": "a1", "B": "b1", "C": "c1"}
JOIN_TIMEOUT_S = 30.0  # a node joins (enrolls, links, gets the snapshot) within this long
STOP_TIMEOUT_S = 10.0
LOG_TAIL_LINES = 15
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def proc_cpu_s(pid: int) -> Optional[float]:
    """CPU seconds (user + system, all threads, exited ones included) of process ``pid``, or None.

    From ``/proc/PID/stat``: clock ticks (``SC_CLK_TCK``, 10 ms here), so use it over spans
    of several hundred milliseconds or more.
    """
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2 :].split()  # the command name may hold spaces and parens
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def replace_section(path: Path, title: str, text: str) -> None:
    """Replace the section headed ``title`` (a ``## `` line) of Markdown file ``path`` with ``text``.

    The section runs to the next ``## `` heading or the end of the file; everything else is kept.
    Without such a section, ``text`` is appended; without the file, it starts as ``# Benchmarks``.
    """
    path = Path(path)
    old = path.read_text() if path.exists() else "# Benchmarks\n"
    marker = "\n" + title + "\n"
    start = old.find(marker)
    if start < 0:
        new = old.rstrip("\n") + "\n\n" + text
    else:
        end = old.find("\n## ", start + len(marker))
        rest = old[end:] if end >= 0 else ""
        new = old[:start].rstrip("\n") + "\n\n" + text.rstrip("\n") + "\n" + rest
    path.write_text(new)


class LabGrid:
    """The session's processes in ``lab``, by name; see the module docstring."""

    def __init__(self, lab: Lab, workdir: Path) -> None:
        self.lab = lab
        self.workdir = Path(workdir)
        self.run_dir = str(self.workdir / "run")
        self.env = dict(os.environ, GRIDSOCK_RUN_DIR=self.run_dir, PYTHONUNBUFFERED="1")
        self.session = str(self.workdir / "session" / "session.toml")
        self.procs: Dict[str, subprocess.Popen] = {}
        self.logs: Dict[str, Path] = {}

    def control(self, name: str) -> str:
        """The control socket of process ``name`` (``rendezvous`` or a node name)."""
        return os.path.join(self.run_dir, f"{name}.sock")

    def new_session(self) -> None:
        """Create the session (TLS: a CA, join token) with the rendez-vous node on ``rv``."""
        subprocess.run(gridsock_argv("session", "new", str(self.workdir / "session"), "--rendezvous",
                                     f"{self.lab.addr('rv')}:{RV_PORT}"),
                       check=True, env=self.env, stdout=subprocess.DEVNULL, timeout=60)

    def spawn(self, host: str, name: str, argv: Sequence[str]) -> subprocess.Popen:
        """Run ``argv`` in ``host``'s namespace: stdout piped (readiness lines), stderr to a log."""
        path = self.workdir / f"{name}.log"
        self.logs[name] = path
        with open(path, "ab") as log:
            proc = self.lab.spawn(host, list(argv), stdout=subprocess.PIPE, stderr=log, env=self.env)
        self.procs[name] = proc
        return proc

    def start_rendezvous(self) -> None:
        proc = self.spawn("rv", "rendezvous", gridsock_argv("-v", "rendezvous", "--session", self.session))
        wait_for_line(proc, "rendezvous listening", timeout=JOIN_TIMEOUT_S)

    def node_args(self, name: str, *, rules: Optional[str] = None, echo: bool = True) -> List[str]:
        """The ``gridsock node`` arguments of lab node ``name`` (``rv`` or a cluster node)."""
        args = ["--session", self.session, "--name", name, "--listen", f"{self.lab.addr(name)}:{NODE_PORT}"]
        if echo:
            args += ["--echo", str(ECHO_PORT)]
        if rules is not None:
            path = self.workdir / f"{name}-rules.toml"
            path.write_text(rules)
            args += ["--rules", str(path)]
        cluster = name[0].upper() if name != "rv" else None
        if cluster:
            args += ["--cluster", cluster]
            leader = LEADERS[cluster]
            if name != leader:
                args += ["--leader", f"{self.lab.addr(leader)}:{NODE_PORT}"]
            elif cluster == "C":  # no route out of cluster C: its leader goes through fec's sshd
                args += ["--ssh-gateway", self.lab.ssh_gateway, "--ssh-key", self.lab.ssh_client_key,
                         "--ssh-known-hosts", self.lab.ssh_known_hosts]
        return args

    def start_node(self, name: str, *, program: Optional[Sequence[str]] = None, rules: Optional[str] = None,
                   echo: bool = True) -> subprocess.Popen:
        """Start node ``name`` in its namespace: ``gridsock -v node ...`` or ``program + node args``."""
        prefix = list(program) if program is not None else gridsock_argv("-v", "node")
        return self.spawn(name, name, prefix + self.node_args(name, rules=rules, echo=echo))

    def wait_joined(self, names: Sequence[str]) -> None:
        for name in names:
            wait_for_line(self.procs[name], "joined", timeout=JOIN_TIMEOUT_S)

    def wait_directory(self, names: Sequence[str], present: Sequence[str], *, timeout: float = JOIN_TIMEOUT_S) -> None:
        """Wait until every node of ``names`` knows every node of ``present``."""
        for name in names:
            call(self.control(name), "wait", {"present": list(present), "timeout": timeout}, timeout=timeout + 5)

    def pid(self, name: str) -> int:
        return self.procs[name].pid

    def logs_tail(self) -> str:
        out = []
        for name, path in self.logs.items():
            try:
                lines = path.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:]
            except OSError:
                lines = ["(no log)"]
            out.append(f"--- {name}\n" + "\n".join(lines))
        return "\n".join(out)

    def stop(self) -> None:
        """End every process this grid started (SIGTERM, then SIGKILL); never raises for a dead one.

        Last started, first stopped: the nodes go before the rendez-vous node, so they do not
        spend their last moments dialing it again.
        """
        for proc in reversed(list(self.procs.values())):
            if proc.poll() is None:
                try:
                    proc.send_signal(signal.SIGCONT)  # a stopped process would not see SIGTERM
                except ProcessLookupError:
                    pass
            try:
                stop_process(proc, timeout=STOP_TIMEOUT_S)
            except (OSError, subprocess.SubprocessError):
                pass
