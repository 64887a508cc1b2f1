"""A grid lab of Linux network namespaces: NAT, firewalled and private clusters around a rendez-vous host.

Theory of operation
-------------------
Every host of the lab is a network namespace named ``<prefix><host>`` (prefix ``gs-`` by
default); one more namespace, ``<prefix>inet``, holds the "internet": a bridge ``sw0`` used as a
plain layer-2 switch. Public hosts plug into it with a veth pair, cluster nodes plug into a LAN
bridge ``lan0`` inside their gateway's namespace. Every veth is created from inside a lab
namespace straight into its peer namespace, so nothing ever appears in the host's own namespace
and interface names do not depend on the prefix (``eth0`` in every host, ``<host>`` on the switch,
``lan-<node>`` on a LAN bridge)::

                    "internet" 203.0.113.0/24: bridge sw0 in namespace <p>inet
       +--------------------+-----------------------+--------------------------+
       |                    |                       |                          |
     rv .10               gwa .2                  fwb .3                     fec .4
     rendez-vous          NAT: MASQUERADE         stateful firewall          front-end, ip_forward=0
                          nothing inbound         NEW from outside: DROP     sshd 0.0.0.0:22
                                                                             danted .4:1080 + 10.3.0.1:1080
                          lan0 10.1.0.1           lan0 198.51.100.1          lan0 10.3.0.1
                           |          |            |            |             |           |
                          a1 .11     a2 .12       b1 .11       b2 .12        c1 .11      c2 .12
                          cluster A: 10.1.0.0/24  cluster B: 198.51.100.0/24 cluster C: 10.3.0.0/24
                          default via 10.1.0.1    default via .1             NO route out

Public hosts route 198.51.100.0/24 via 203.0.113.3 and have no default route, so what results is:

- A -> public: works, seen as 203.0.113.2 (MASQUERADE); public -> A: no route at all.
- B -> public: works, seen as 198.51.100.x; public -> B: new connections time out (DROP).
- C -> anything but 10.3.0.0/24: no route. Out of C only through fec: its sshd (``ssh -W``,
  ``-L``, ``-R``) or its SOCKS5 server, which also lets the public side reach into C.
- Inside each cluster, nodes reach each other directly (LAN bridges bypass iptables:
  ``net.bridge.bridge-nf-call-iptables=0``).
- A test may give another cluster a front-end too: ``start_sshd("gwa")`` runs an sshd like
  fec's in gwa (reachable at 203.0.113.2 from outside, 10.1.0.1 from cluster A).

State: everything lives under ``/run/gridsock-lab/<prefix>/``: ``state.json`` (status, namespaces,
processes the lab started, with their start times so a recycled pid is never killed), the SSH key
pair and ``known_hosts``, sshd's and danted's configurations, pid files and logs. A ``Lab`` built
from the same prefix in another process reads it back (``load()``), so ``down`` and ``exec`` work
from the command line. ``down()`` works from any state, even half built or without ``state.json``:
it ends the processes the lab started and whatever still runs inside its namespaces, deletes
exactly the namespaces ``<prefix><host>`` and the state directory, nothing else.

WAN profile (``set_wan``): the kernel has no netem, so a small user-space delayer per public host
(``gridsock.testing.delayer``) holds the packets arriving on its ``eth0`` on an NFQUEUE, releases
them after the delay and drops a fraction for loss; tbf on ``eth0`` limits the rate. No
br_netfilter: the switch stays a plain bridge, every packet crossing the internet enters exactly
one public host, so the delay there is the one-way delay.
"""
from __future__ import annotations

import argparse
import difflib
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from gridsock.errors import ConfigError, GridsockError
from gridsock.testing.procs import wait_for_line

__all__ = [
    "LAB_HOSTS",
    "GRID_NODES",
    "CLUSTERS",
    "PUBLIC_HOSTS",
    "ADDRESSES",
    "LAN_ADDRESSES",
    "DEFAULT_PREFIX",
    "STATE_ROOT",
    "SSH_PORT",
    "SOCKS_PORT",
    "LabError",
    "Lab",
    "missing_tools",
    "main",
]

log = logging.getLogger(__name__)

LAB_HOSTS = ("rv", "gwa", "a1", "a2", "fwb", "b1", "b2", "fec", "c1", "c2")
GRID_NODES = ("a1", "a2", "b1", "b2", "c1", "c2")  # cluster nodes; "rv" also runs a node
CLUSTERS = {"A": ("a1", "a2"), "B": ("b1", "b2"), "C": ("c1", "c2")}
PUBLIC_HOSTS = ("rv", "gwa", "fwb", "fec")
SWITCH = "inet"  # the namespace (after the prefix) holding the internet's switch

DEFAULT_PREFIX = "gs-"
PREFIX_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,23}$")  # safe in paths and namespace names
STATE_ROOT = Path("/run/gridsock-lab")
STATE_FILE = "state.json"

PREFIX_LEN = 24  # every lab network is a /24
PUBLIC_NET = "203.0.113.0/24"  # TEST-NET-3: the "internet"
PUBLIC_ADDRESSES = {"rv": "203.0.113.10", "gwa": "203.0.113.2", "fwb": "203.0.113.3", "fec": "203.0.113.4"}
FIREWALL_ROUTE = ("198.51.100.0/24", "203.0.113.3")  # every public host reaches cluster B via fwb

PUBLIC_IF = "eth0"  # a host's interface to the switch, and a node's to its LAN
SWITCH_BRIDGE = "sw0"
LAN_BRIDGE = "lan0"

SSH_PORT = 22
SOCKS_PORT = 1080
SSH_USER = "root"


@dataclass(frozen=True)
class _ClusterSpec:
    name: str
    gateway: str
    network: str
    gateway_addr: str  # the gateway's address on the LAN bridge
    nodes: tuple[tuple[str, str], ...]  # (node, address)
    default_route: bool  # nodes route everything via the gateway
    forward: bool  # the gateway forwards packets (net.ipv4.ip_forward)


_CLUSTER_SPECS = (
    _ClusterSpec("A", "gwa", "10.1.0.0/24", "10.1.0.1", (("a1", "10.1.0.11"), ("a2", "10.1.0.12")), True, True),
    _ClusterSpec(
        "B", "fwb", "198.51.100.0/24", "198.51.100.1", (("b1", "198.51.100.11"), ("b2", "198.51.100.12")), True, True
    ),
    _ClusterSpec("C", "fec", "10.3.0.0/24", "10.3.0.1", (("c1", "10.3.0.11"), ("c2", "10.3.0.12")), False, False),
)
_CLUSTER_OF_GATEWAY = {spec.gateway: spec for spec in _CLUSTER_SPECS}

ADDRESSES = {**PUBLIC_ADDRESSES, **{node: addr for spec in _CLUSTER_SPECS for node, addr in spec.nodes}}
LAN_ADDRESSES = {spec.gateway: spec.gateway_addr for spec in _CLUSTER_SPECS}
FRONTEND_PUBLIC = PUBLIC_ADDRESSES["fec"]
FRONTEND_PRIVATE = LAN_ADDRESSES["fec"]

# gwa: masquerade the LAN behind the public address; forward only what the LAN started.
NAT_RULES = f"""\
*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
-A POSTROUTING -s 10.1.0.0/24 -o {PUBLIC_IF} -j MASQUERADE
COMMIT
*filter
:INPUT ACCEPT [0:0]
:FORWARD DROP [0:0]
:OUTPUT ACCEPT [0:0]
-A FORWARD -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT
-A FORWARD -i {LAN_BRIDGE} -o {PUBLIC_IF} -j ACCEPT
COMMIT
"""

# fwb: stateful firewall; the outside sees timeouts (DROP, not REJECT) for anything it starts.
FIREWALL_RULES = f"""\
*filter
:INPUT ACCEPT [0:0]
:FORWARD DROP [0:0]
:OUTPUT ACCEPT [0:0]
-A FORWARD -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT
-A FORWARD -m conntrack --ctstate INVALID -j DROP
-A FORWARD -i {LAN_BRIDGE} -m conntrack --ctstate NEW -j ACCEPT
-A FORWARD -i {PUBLIC_IF} -m conntrack --ctstate NEW -j DROP
COMMIT
"""

# Set in every namespace: IPv4 settings of a new namespace are inherited from the host's, so
# nothing is left to chance. Bridged LAN traffic must not cross iptables (br_netfilter).
BASE_SYSCTLS = {
    "net.ipv4.conf.all.rp_filter": "0",
    "net.ipv4.conf.default.rp_filter": "0",
    "net.bridge.bridge-nf-call-iptables": "0",
    "net.bridge.bridge-nf-call-ip6tables": "0",
    "net.bridge.bridge-nf-call-arptables": "0",
    # TCP Fast Open as a client (0x1) and a server (0x2), on every listener without its own
    # TCP_FASTOPEN option (0x400): ``reverse`` sends its preamble in the SYN (components/tcp.py)
    "net.ipv4.tcp_fastopen": "1027",
}

REQUIRED_TOOLS = {  # executable -> Debian package
    "ip": "iproute2",
    "iptables-restore": "iptables",
    "sysctl": "procps",
    "sshd": "openssh-server",
    "ssh": "openssh-client",
    "ssh-keygen": "openssh-client",
    "danted": "dante-server",
}
SBIN_DIRS = ("/usr/sbin", "/sbin", "/usr/local/sbin")  # sshd and danted live there, maybe off PATH

RUN_TIMEOUT_S = 30.0  # default timeout of Lab.run
SETUP_COMMAND_TIMEOUT_S = 20.0  # one ip/sysctl/iptables/ssh-keygen command while building
READY_TIMEOUT_S = 10.0  # sshd/danted must listen within this
READY_PROBE_S = 0.5  # one readiness probe subprocess keeps trying this long
READY_RETRY_S = 0.02  # pause between connection attempts of a probe
PROBE_TIMEOUT_S = 1.0  # default connect timeout of Lab.probe
STOP_TIMEOUT_S = 3.0  # SIGTERM grace before SIGKILL, and SIGKILL grace before giving up
STOP_POLL_S = 0.02  # how often down() checks that processes are gone
STOP_ROUNDS = 3  # namespace sweeps: a dying daemon may still fork once
LOG_TAIL_BYTES = 4000  # how much of a daemon's log goes into the error when it dies

# WAN profile (Lab.set_wan): a delayer (gridsock.testing.delayer) per public host holds what comes
# in on its eth0 on an NFQUEUE; tbf limits the rate of eth0's egress. No netem in the lab's kernel.
WAN_QUEUE = 7  # the NFQUEUE number in each public host; queues are per namespace, so one number
# Ingress, not egress: a packet held in its sender's namespace still counts against the sending
# socket's TCP Small Queues budget (~2 packets), which cut a delayed local sender to ~1 Mbit/s.
# Arriving through the veth, it belongs to no socket any more. In the raw table, before connection
# tracking: the delay is the wire's, so a host's NAT or firewall sees a packet when it has crossed
# it (queued after conntrack, a packet was judged on arrival, 20 ms before it had crossed: a SYN
# timed to reach fwb just after b1's own SYN left was judged before b1's SYN had left).
WAN_TABLE = "raw"
WAN_RULE = (
    "PREROUTING", "-i", PUBLIC_IF, "-m", "comment", "--comment", "gridsock-wan",
    "-j", "NFQUEUE", "--queue-num", str(WAN_QUEUE), "--queue-bypass",  # no delayer bound: pass
)
WAN_TBF_LATENCY_MS = 100  # a rate-limited uplink queues this long at most, then drops (tbf limit)
WAN_TBF_BURST_S = 0.002  # the token bucket holds 2 ms at full rate...
WAN_TBF_MIN_BURST_BYTES = 16 * 1024  # ...and at least ~10 full-size packets (timer granularity)

# Runs inside a namespace: connect until success or until `patience` seconds have passed;
# print the outcome of the last attempt ("connected", "timeout" or an errno name).
_PROBE_SRC = r"""
import errno, socket, sys, time
addr, port, timeout, patience = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
retry = float(sys.argv[5])
deadline = time.monotonic() + patience
while True:
    try:
        socket.create_connection((addr, port), timeout=timeout).close()
        outcome = "connected"
    except socket.timeout:
        outcome = "timeout"
    except OSError as exc:
        outcome = errno.errorcode.get(exc.errno, str(exc.errno))
    if outcome == "connected" or time.monotonic() >= deadline:
        break
    time.sleep(retry)
print(outcome)
"""


class LabError(GridsockError, RuntimeError):
    """The lab could not be built, queried or torn down (missing tool, not root, daemon died...)."""


def missing_tools() -> list[tuple[str, str]]:
    """Return ``(executable, debian_package)`` for every tool the lab needs and cannot find."""
    return [(tool, pkg) for tool, pkg in REQUIRED_TOOLS.items() if _which(tool) is None]


def _which(tool: str) -> str | None:
    found = shutil.which(tool)
    if found is None:
        found = shutil.which(tool, path=os.pathsep.join(SBIN_DIRS))
    return found


def _tool(tool: str) -> str:
    path = _which(tool)
    if path is None:
        raise LabError(f"{tool} not found: install the Debian package {REQUIRED_TOOLS[tool]}")
    return path


def _check_host(host: str, allowed: Sequence[str]) -> None:
    if host not in allowed:
        hint = difflib.get_close_matches(host, allowed, n=1)
        raise ConfigError(f"unknown lab host {host!r}" + (f" (did you mean {hint[0]!r}?)" if hint else ""))


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """Return ``(state, start_time_ticks)`` of a process, or None when it does not exist."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2 :].split()  # the command name may hold spaces and parens
    return fields[0], int(fields[19])


def _alive(pid: int) -> bool:
    stat = _proc_stat(pid)
    return stat is not None and stat[0] not in ("Z", "X")


def _program_name(proc: subprocess.Popen[Any]) -> str:
    """Return the name of the program that ``proc`` runs: the word after ``ip netns exec NS``
    for a process started by :meth:`Lab.spawn`, else its first word."""
    args = proc.args
    argv = [args] if isinstance(args, (str, bytes, os.PathLike)) else list(args)
    return Path(os.fsdecode(argv[4] if len(argv) > 4 else argv[0])).name


def _log_tail(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - LOG_TAIL_BYTES))
            return f.read().decode("utf-8", "replace")
    except OSError as exc:
        return f"(no log: {exc})"


class Lab:
    """The grid lab for one prefix: build it with :meth:`up`, use it, tear it down with :meth:`down`.

    ``Lab(prefix)`` only computes names and paths; it touches nothing. Use it as a context manager
    to get ``up()`` on entry and ``down()`` on exit.
    """

    def __init__(self, prefix: str = DEFAULT_PREFIX, *, state_root: str | os.PathLike[str] = STATE_ROOT) -> None:
        if not PREFIX_RE.match(prefix):
            raise ConfigError(f"bad lab prefix {prefix!r}: letters, digits, '-', '_', '.', at most 24")
        self.prefix = prefix
        self.state_dir = Path(state_root) / prefix
        ssh_dir = self.state_dir / "ssh"
        self.ssh_client_key = str(ssh_dir / "id_ed25519")
        self.ssh_known_hosts = str(ssh_dir / "known_hosts")
        self.ssh_gateway = f"{SSH_USER}@{FRONTEND_PRIVATE}:{SSH_PORT}"  # as seen from inside C
        self.ssh_gateway_public = f"{SSH_USER}@{FRONTEND_PUBLIC}:{SSH_PORT}"
        self.socks_proxy = (FRONTEND_PRIVATE, SOCKS_PORT)  # as seen from inside C
        self.socks_proxy_public = (FRONTEND_PUBLIC, SOCKS_PORT)
        self._procs: list[subprocess.Popen[Any]] = []  # children of this process, reaped by down()
        self._state: dict[str, Any] = self._blank_state()
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"Lab(prefix={self.prefix!r})"

    def __enter__(self) -> Lab:
        self.up()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.down()

    # -- names and addresses ------------------------------------------------------------------

    def netns(self, host: str) -> str:
        """Return the namespace name of ``host`` (one of LAB_HOSTS, or "inet" for the switch)."""
        _check_host(host, LAB_HOSTS + (SWITCH,))
        return self.prefix + host

    def addr(self, host: str) -> str:
        """Return the primary address of ``host``: public for rv and the gateways, else its LAN one."""
        _check_host(host, LAB_HOSTS)
        return ADDRESSES[host]

    def namespaces(self) -> list[str]:
        """Return the names of every namespace of this lab, switch first."""
        return [self.netns(SWITCH)] + [self.netns(h) for h in LAB_HOSTS]

    def command(self, host: str, argv: Sequence[str]) -> list[str]:
        """Return the argv that runs ``argv`` inside the namespace of ``host``."""
        return ["ip", "netns", "exec", self.netns(host), *argv]

    # -- running things inside --------------------------------------------------------------------

    def run(self, host: str, argv: Sequence[str], **kw: Any) -> subprocess.CompletedProcess[Any]:
        """Run ``argv`` in the namespace of ``host``; ``kw`` goes to :func:`subprocess.run`.

        The default timeout is RUN_TIMEOUT_S (pass ``timeout=None`` for none). Raises what
        ``subprocess.run`` raises (``TimeoutExpired``, ``CalledProcessError`` with ``check=True``).
        """
        kw.setdefault("timeout", RUN_TIMEOUT_S)
        return subprocess.run(self.command(host, argv), **kw)

    def spawn(self, host: str, argv: Sequence[str], **kw: Any) -> subprocess.Popen[Any]:
        """Start ``argv`` in the namespace of ``host`` and track it so that :meth:`down` ends it.

        ``kw`` goes to :class:`subprocess.Popen`; by default stdin is /dev/null and the child gets
        its own session (a Ctrl-C in the terminal does not reach the lab's daemons).
        """
        kw.setdefault("stdin", subprocess.DEVNULL)
        kw.setdefault("start_new_session", True)
        proc = subprocess.Popen(self.command(host, argv), **kw)
        stat = _proc_stat(proc.pid)
        with self._lock:
            self._procs.append(proc)
            self._state["processes"].append(
                {"pid": proc.pid, "start": stat[1] if stat else None, "host": host, "argv": [str(a) for a in argv]}
            )
            if self.state_dir.is_dir():
                self._save_state()
        log.debug("spawned %s in %s: pid %d", argv[0] if argv else "?", host, proc.pid)
        return proc

    def probe(self, host: str, addr: str, port: int, *, timeout_s: float = PROBE_TIMEOUT_S) -> str:
        """Try one TCP connection from ``host`` to ``addr:port``.

        Returns "connected", "timeout", or the errno name of the failure ("ECONNREFUSED",
        "ENETUNREACH", "EHOSTUNREACH"...).
        """
        return self._probe(host, addr, port, timeout_s, 0.0)

    def wait_listening(
        self,
        host: str,
        addr: str,
        port: int,
        *,
        timeout_s: float = READY_TIMEOUT_S,
        proc: subprocess.Popen[Any] | None = None,
        log_path: str | os.PathLike[str] | None = None,
    ) -> None:
        """Return once ``addr:port`` accepts connections from inside ``host``.

        Raises LabError if ``proc`` exits first or ``timeout_s`` passes; the error holds the end of
        ``log_path`` when given.
        """
        deadline = time.monotonic() + timeout_s
        outcome = "not tried"
        while True:
            if proc is not None and proc.poll() is not None:
                raise LabError(self._died(f"{_program_name(proc)} exited with {proc.returncode}", log_path))
            left = deadline - time.monotonic()
            if left <= 0:
                raise LabError(self._died(f"{addr}:{port} not listening after {timeout_s} s ({outcome})", log_path))
            outcome = self._probe(host, addr, port, min(left, READY_PROBE_S), min(left, READY_PROBE_S))
            if outcome == "connected":
                return

    def _probe(self, host: str, addr: str, port: int, timeout_s: float, patience_s: float) -> str:
        argv = [sys.executable, "-c", _PROBE_SRC, addr, str(port), str(timeout_s), str(patience_s), str(READY_RETRY_S)]
        done = self.run(host, argv, capture_output=True, text=True, timeout=timeout_s + patience_s + RUN_TIMEOUT_S)
        if done.returncode != 0:
            raise LabError(f"probe from {host} failed: {done.stderr.strip()}")
        return done.stdout.strip()

    @staticmethod
    def _died(what: str, log_path: str | os.PathLike[str] | None) -> str:
        if log_path is None:
            return what
        return f"{what}; end of {log_path}:\n{_log_tail(Path(log_path))}"

    # -- state ----------------------------------------------------------------------------------

    def _blank_state(self) -> dict[str, Any]:
        return {"prefix": self.prefix, "status": "absent", "namespaces": [], "processes": []}

    def _save_state(self) -> None:
        path = self.state_dir / STATE_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self._state, indent=2) + "\n")
        os.replace(tmp, path)

    def load(self) -> Lab:
        """Read back the state a lab of this prefix left (from another process). Returns self.

        Raises LabError when there is no state to read.
        """
        path = self.state_dir / STATE_FILE
        try:
            state = json.loads(path.read_text())
        except FileNotFoundError:
            raise LabError(f"no lab {self.prefix!r}: {path} does not exist") from None
        except (OSError, ValueError) as exc:
            raise LabError(f"cannot read {path}: {exc}") from exc
        with self._lock:
            self._state = {**self._blank_state(), **state}
        return self

    def existing_namespaces(self) -> list[str]:
        """Return the namespaces of this lab that exist now."""
        done = subprocess.run(
            ["ip", "netns", "list"], capture_output=True, text=True, timeout=SETUP_COMMAND_TIMEOUT_S
        )
        if done.returncode != 0:
            raise LabError(f"ip netns list: {done.stderr.strip()}")
        present = {line.split()[0] for line in done.stdout.splitlines() if line.strip()}
        return [ns for ns in self.namespaces() if ns in present]

    def exists(self) -> bool:
        """Return True when anything of this lab exists: a namespace or the state directory."""
        return self.state_dir.exists() or bool(self.existing_namespaces())

    def status(self) -> dict[str, Any]:
        """Return what exists: ``status`` ("up", "building", "absent" or "broken"), namespaces, processes."""
        try:
            self.load()
        except LabError:
            pass
        present = set(self.existing_namespaces())
        processes = []
        for rec in self._state["processes"]:
            stat = _proc_stat(rec["pid"])
            alive = stat is not None and stat[0] not in ("Z", "X") and stat[1] == rec.get("start")
            processes.append({**rec, "alive": alive})
        status = self._state["status"] if self.state_dir.exists() else "absent"
        if status == "up" and len(present) != len(self.namespaces()):
            status = "broken"
        if status == "absent" and present:
            status = "broken"
        return {
            "prefix": self.prefix,
            "state_dir": str(self.state_dir),
            "status": status,
            "namespaces": {ns: ns in present for ns in self.namespaces()},
            "processes": processes,
        }

    # -- up -------------------------------------------------------------------------------------

    def up(self) -> None:
        """Build the whole lab; a stale lab of the same prefix is torn down first.

        Raises LabError (not root, missing tool, a command or daemon failed); whatever was built
        is torn down before the error propagates.
        """
        if os.geteuid() != 0:
            raise LabError("the grid lab needs root (network namespaces, iptables)")
        missing = missing_tools()
        if missing:
            raise LabError(
                "the grid lab needs " + ", ".join(f"{t} (Debian package {p})" for t, p in missing)
            )
        if self.exists():
            log.warning("lab %s: stale namespaces or state found, tearing them down first", self.prefix)
            self.down()
        started = time.monotonic()
        try:
            self._build()
        except BaseException:
            log.error("lab %s: build failed, tearing down what was built", self.prefix)
            try:
                self.down()
            except Exception:  # the build error matters more than a cleanup error
                log.exception("lab %s: teardown after a failed build failed too", self.prefix)
            raise
        log.info("lab %s up in %.2f s", self.prefix, time.monotonic() - started)

    def _build(self) -> None:
        self.state_dir.mkdir(parents=True, mode=0o700)
        self._state = {**self._blank_state(), "status": "building", "created": time.time(), "addresses": ADDRESSES}
        self._save_state()
        for ns in self.namespaces():
            self._setup_cmd(["ip", "netns", "add", ns])
            self._state["namespaces"].append(ns)
            self._save_state()
        for host in (SWITCH,) + LAB_HOSTS:
            sysctls = dict(BASE_SYSCTLS)
            spec = _CLUSTER_OF_GATEWAY.get(host)
            sysctls["net.ipv4.ip_forward"] = "1" if spec is not None and spec.forward else "0"
            # -e: br_netfilter's keys exist only while that module is loaded
            self._setup_cmd(self.command(host, ["sysctl", "-q", "-e", "-w", *(f"{k}={v}" for k, v in sysctls.items())]))
        self._build_links()
        self._setup_cmd(self.command("gwa", ["iptables-restore"]), stdin=NAT_RULES)
        self._setup_cmd(self.command("fwb", ["iptables-restore"]), stdin=FIREWALL_RULES)
        self._write_ssh_files()
        self._start_daemons()
        self._state["status"] = "up"
        self._save_state()

    def _build_links(self) -> None:
        # One `ip -batch` per namespace; veths are created from the switch or gateway side
        # directly into the peer namespace, which must therefore be configured afterwards.
        switch = [f"link add {SWITCH_BRIDGE} type bridge stp_state 0 forward_delay 0", f"link set {SWITCH_BRIDGE} up"]
        for host in PUBLIC_HOSTS:
            switch += [
                f"link add {host} type veth peer name {PUBLIC_IF} netns {self.netns(host)}",
                f"link set {host} master {SWITCH_BRIDGE} up",
            ]
        self._ip_batch(SWITCH, switch)
        for spec in _CLUSTER_SPECS:
            lan = [
                f"link add {LAN_BRIDGE} type bridge stp_state 0 forward_delay 0",
                f"addr add {spec.gateway_addr}/{PREFIX_LEN} dev {LAN_BRIDGE}",
                f"link set {LAN_BRIDGE} up",
            ]
            for node, _ in spec.nodes:
                lan += [
                    f"link add lan-{node} type veth peer name {PUBLIC_IF} netns {self.netns(node)}",
                    f"link set lan-{node} master {LAN_BRIDGE} up",
                ]
            self._ip_batch(spec.gateway, lan)
        for host in PUBLIC_HOSTS:
            cmds = ["link set lo up", f"addr add {PUBLIC_ADDRESSES[host]}/{PREFIX_LEN} dev {PUBLIC_IF}"]
            cmds.append(f"link set {PUBLIC_IF} up")
            if PUBLIC_ADDRESSES[host] != FIREWALL_ROUTE[1]:
                cmds.append(f"route add {FIREWALL_ROUTE[0]} via {FIREWALL_ROUTE[1]}")
            self._ip_batch(host, cmds)
        self._ip_batch(SWITCH, ["link set lo up"])
        for spec in _CLUSTER_SPECS:
            for node, address in spec.nodes:
                cmds = ["link set lo up", f"addr add {address}/{PREFIX_LEN} dev {PUBLIC_IF}"]
                cmds.append(f"link set {PUBLIC_IF} up")
                if spec.default_route:
                    cmds.append(f"route add default via {spec.gateway_addr}")
                self._ip_batch(node, cmds)

    def _ip_batch(self, host: str, lines: list[str]) -> None:
        self._setup_cmd(["ip", "-n", self.netns(host), "-batch", "-"], stdin="\n".join(lines) + "\n")

    def _setup_cmd(self, argv: list[str], stdin: str | None = None) -> str:
        log.debug("lab %s: %s", self.prefix, " ".join(argv))
        try:
            done = subprocess.run(
                argv, input=stdin, capture_output=True, text=True, timeout=SETUP_COMMAND_TIMEOUT_S
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise LabError(f"{' '.join(argv)}: {exc}") from exc
        if done.returncode != 0:
            detail = (done.stderr or done.stdout).strip()
            raise LabError(f"{' '.join(argv)} exited with {done.returncode}: {detail}")
        return done.stdout

    def _write_ssh_files(self) -> None:
        ssh_dir = Path(self.ssh_client_key).parent
        ssh_dir.mkdir(mode=0o700)
        host_key = ssh_dir / "fec_host_ed25519"
        keygen = _tool("ssh-keygen")
        for path, comment in ((self.ssh_client_key, "gridsock-lab"), (str(host_key), "fec")):
            self._setup_cmd([keygen, "-q", "-t", "ed25519", "-N", "", "-C", f"{comment} {self.prefix}", "-f", path])
        client_pub = Path(self.ssh_client_key + ".pub").read_text().strip()
        (ssh_dir / "authorized_keys").write_text(client_pub + "\n")
        key_type, key_b64 = Path(str(host_key) + ".pub").read_text().split()[:2]
        Path(self.ssh_known_hosts).write_text(
            "".join(f"{addr} {key_type} {key_b64}\n" for addr in (FRONTEND_PUBLIC, FRONTEND_PRIVATE))
        )
        (self.state_dir / "sshd_config").write_text(self._sshd_config(host_key, self.state_dir / "sshd.pid"))
        lab_nets = (PUBLIC_NET, *(spec.network for spec in _CLUSTER_SPECS))
        reachable = (PUBLIC_NET, _CLUSTER_OF_GATEWAY["fwb"].network, _CLUSTER_OF_GATEWAY["fec"].network)
        lines = [
            "logoutput: stderr",
            f"internal: {FRONTEND_PRIVATE} port = {SOCKS_PORT}",
            f"internal: {FRONTEND_PUBLIC} port = {SOCKS_PORT}",
            f"external: {FRONTEND_PUBLIC}",
            f"external: {FRONTEND_PRIVATE}",
            "external.rotation: route",  # the source address follows the route to the destination
            "clientmethod: none",
            "socksmethod: none",
            "user.privileged: root",
            "user.unprivileged: nobody",
            "timeout.io: 0",
        ]
        lines += [f"client pass {{ from: {net} to: 0.0.0.0/0 }}" for net in lab_nets]
        lines.append("client block { from: 0.0.0.0/0 to: 0.0.0.0/0 log: connect error }")
        lines += [f"socks pass {{ from: 0.0.0.0/0 to: {net} }}" for net in reachable]
        lines.append("socks block { from: 0.0.0.0/0 to: 0.0.0.0/0 log: connect error }")
        (self.state_dir / "danted.conf").write_text("\n".join(lines) + "\n")

    def _sshd_config(self, host_key: Path, pid_file: Path) -> str:
        """The sshd_config of a lab front-end: the lab's client key logs in as root, TCP
        forwarding allowed both ways (``-L``/``-W`` and ``-R``, which may bind any address:
        ``GatewayPorts clientspecified``)."""
        return "\n".join(
            [
                f"Port {SSH_PORT}",
                "ListenAddress 0.0.0.0",
                "AddressFamily inet",
                f"HostKey {host_key}",
                f"PidFile {pid_file}",
                f"AuthorizedKeysFile {Path(self.ssh_client_key).parent / 'authorized_keys'}",
                "PermitRootLogin prohibit-password",
                "PubkeyAuthentication yes",
                "PasswordAuthentication no",
                "KbdInteractiveAuthentication no",
                "UsePAM no",
                "StrictModes no",
                "AllowTcpForwarding yes",
                "GatewayPorts clientspecified",
                "PermitTunnel no",
                "X11Forwarding no",
                "PrintMotd no",
                "UseDNS no",
                "MaxStartups 100:30:200",  # tests open many tunnels at once
                "MaxSessions 100",
                "LogLevel INFO",
                "",
            ]
        )

    def start_sshd(self, host: str) -> str:
        """Run an OpenSSH sshd in the gateway ``host`` too (fec's starts with the lab): a
        front-end given to its cluster, configured as fec's, with a host key of its own that
        known_hosts lists under each of the host's addresses. Returns the gateway as seen from
        the public side (``root@PUBLIC_ADDRESS:22``) once sshd listens (at once if it already
        runs); :meth:`down` ends it. Raises ConfigError for a host that is not a cluster's
        gateway, LabError if sshd fails.
        """
        _check_host(host, tuple(_CLUSTER_OF_GATEWAY))
        gateway = f"{SSH_USER}@{PUBLIC_ADDRESSES[host]}:{SSH_PORT}"
        running = self._state.get("daemons", {}).get(f"sshd-{host}")
        if host == "fec" or (running is not None and _alive(running)):
            return gateway  # (already there: once per lab)
        ssh_dir = Path(self.ssh_client_key).parent
        host_key = ssh_dir / f"{host}_host_ed25519"
        for stale in (host_key, Path(str(host_key) + ".pub")):  # (an sshd started before, now dead)
            stale.unlink(missing_ok=True)
        self._setup_cmd([_tool("ssh-keygen"), "-q", "-t", "ed25519", "-N", "", "-C", f"{host} {self.prefix}",
                         "-f", str(host_key)])
        key_type, key_b64 = Path(str(host_key) + ".pub").read_text().split()[:2]
        with open(self.ssh_known_hosts, "a") as known_hosts:
            for addr in (PUBLIC_ADDRESSES[host], LAN_ADDRESSES[host]):
                known_hosts.write(f"{addr} {key_type} {key_b64}\n")
        config = self.state_dir / f"sshd-{host}_config"
        config.write_text(self._sshd_config(host_key, self.state_dir / f"sshd-{host}.pid"))
        log_path = self.state_dir / f"sshd-{host}.log"
        with open(log_path, "ab") as out:
            sshd = self.spawn(host, [_tool("sshd"), "-D", "-e", "-f", str(config)], stdout=out, stderr=out)
        with self._lock:
            self._state.setdefault("daemons", {})[f"sshd-{host}"] = sshd.pid
            self._save_state()
        self.wait_listening(host, PUBLIC_ADDRESSES[host], SSH_PORT, proc=sshd, log_path=log_path)
        return gateway

    def _start_daemons(self) -> None:
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation directory
        sshd_log = self.state_dir / "sshd.log"
        danted_log = self.state_dir / "danted.log"
        with open(sshd_log, "ab") as out:
            sshd = self.spawn(
                "fec", [_tool("sshd"), "-D", "-e", "-f", str(self.state_dir / "sshd_config")], stdout=out, stderr=out
            )
        with open(danted_log, "ab") as out:
            danted = self.spawn(
                "fec",
                [_tool("danted"), "-f", str(self.state_dir / "danted.conf"), "-p", str(self.state_dir / "danted.pid")],
                stdout=out,
                stderr=out,
            )
        self._state["daemons"] = {"sshd": sshd.pid, "danted": danted.pid}
        self._save_state()
        self.wait_listening("fec", FRONTEND_PRIVATE, SSH_PORT, proc=sshd, log_path=sshd_log)
        for addr in (FRONTEND_PRIVATE, FRONTEND_PUBLIC):
            self.wait_listening("fec", addr, SOCKS_PORT, proc=danted, log_path=danted_log)

    # -- WAN profile ----------------------------------------------------------------------------

    def set_wan(
        self,
        delay_ms: float = 0.0,
        loss: float = 0.0,
        rate_mbit: float | None = None,
        hosts: Sequence[str] = PUBLIC_HOSTS,
        *,
        jitter_ms: float = 0.0,
    ) -> None:
        """Make the internet a WAN between ``hosts``: delay, random loss and a rate limit.

        Every packet reaching a host of ``hosts`` from the switch (for itself, or to forward into
        its cluster) is held ``delay_ms`` (+- ``jitter_ms``, order kept per flow) and dropped with
        probability ``loss``; every packet such a host sends onto the switch shares a
        ``rate_mbit`` uplink (tbf). A packet crosses the internet into exactly one host, so
        ``delay_ms`` is the one-way delay and ``loss`` the loss rate per direction: between two
        hosts of ``hosts`` the RTT grows by ``2 * delay_ms``. A new profile replaces the previous
        one on every public host; ``set_wan()`` with the defaults removes it.

        How: one ``python -m gridsock.testing.delayer`` per host (spawned and tracked, so
        :meth:`down` ends them), fed by a raw PREROUTING rule (before conntrack) ``-i eth0 -j NFQUEUE
        --queue-bypass`` (should a delayer die, packets pass undelayed instead of vanishing), and
        ``tc qdisc replace dev eth0 root tbf``. Returns once every delayer is bound. Raises
        ConfigError on bad values, LabError when a delayer, iptables or tc fails (after removing
        the profile again).
        """
        for host in hosts:
            _check_host(host, PUBLIC_HOSTS)
        if delay_ms < 0 or jitter_ms < 0:
            raise ConfigError(f"WAN delay and jitter must be >= 0 ms, not {delay_ms} and {jitter_ms}")
        if not 0.0 <= loss < 1.0:
            raise ConfigError(f"WAN loss is a probability in [0, 1), not {loss}")
        if rate_mbit is not None and rate_mbit <= 0:
            raise ConfigError(f"WAN rate must be > 0 Mbit/s, not {rate_mbit}")
        self._clear_wan()
        shaping = bool(delay_ms or jitter_ms or loss)
        if not hosts or not (shaping or rate_mbit):
            return
        profile = {"delay_ms": delay_ms, "jitter_ms": jitter_ms, "loss": loss, "rate_mbit": rate_mbit}
        with self._lock:
            self._state["wan"] = {"profile": profile, "hosts": list(hosts), "delayers": []}
            self._save_state()
        try:
            if shaping:
                self._start_delayers(hosts, delay_ms, jitter_ms, loss)
            if rate_mbit:
                rate_bytes_s = rate_mbit * 1e6 / 8
                burst = max(WAN_TBF_MIN_BURST_BYTES, int(rate_bytes_s * WAN_TBF_BURST_S))
                tbf = ["tbf", "rate", f"{rate_mbit}mbit", "burst", str(burst), "latency", f"{WAN_TBF_LATENCY_MS}ms"]
                for host in hosts:
                    self._setup_cmd(self.command(host, ["tc", "qdisc", "replace", "dev", PUBLIC_IF, "root", *tbf]))
        except BaseException:
            self._clear_wan()
            raise
        log.info("lab %s: WAN %s on %s", self.prefix, profile, ", ".join(hosts))

    def _start_delayers(self, hosts: Sequence[str], delay_ms: float, jitter_ms: float, loss: float) -> None:
        argv = [sys.executable, "-m", "gridsock.testing.delayer", "--queue", str(WAN_QUEUE), "--verbose"]
        argv += ["--delay-ms", str(delay_ms), "--jitter-ms", str(jitter_ms), "--loss", str(loss)]
        started = []
        for host in hosts:  # start them all, then wait: their interpreters start in parallel
            log_path = self.state_dir / f"delayer-{host}.log"
            with open(log_path, "ab") as err:
                proc = self.spawn(host, argv, stdout=subprocess.PIPE, stderr=err)
            stat = _proc_stat(proc.pid)
            with self._lock:
                self._state["wan"]["delayers"].append(
                    {"host": host, "pid": proc.pid, "start": stat[1] if stat else None}
                )
                self._save_state()
            started.append((host, proc, log_path))
        for host, proc, log_path in started:
            try:
                wait_for_line(proc, "ready", timeout=READY_TIMEOUT_S)
            except (RuntimeError, TimeoutError) as exc:
                raise LabError(self._died(f"delayer in {host}: {exc}", log_path)) from exc
            self._setup_cmd(self.command(host, ["iptables", "-t", WAN_TABLE, "-A", *WAN_RULE]))

    def _clear_wan(self) -> None:
        # Rules first: from then on nothing new is queued, and the delayers, on SIGTERM, release
        # what they hold. Every public host is swept, whatever the state says.
        for host in PUBLIC_HOSTS:
            for _ in range(STOP_ROUNDS):  # the rule is there once; more only after a crash mid-way
                done = self.run(host, ["iptables", "-t", WAN_TABLE, "-D", *WAN_RULE], capture_output=True)
                if done.returncode != 0:
                    break
            shown = self.run(host, ["tc", "qdisc", "show", "dev", PUBLIC_IF, "root"], capture_output=True, text=True)
            if " tbf " in shown.stdout:
                self.run(host, ["tc", "qdisc", "del", "dev", PUBLIC_IF, "root"], capture_output=True)
        wan = self._state.get("wan")
        if not wan:
            return
        own = {proc.pid: proc for proc in self._procs}

        def alive(rec: dict[str, Any]) -> bool:  # the same process, not a recycled pid
            stat = _proc_stat(rec["pid"])
            return stat is not None and stat[1] == rec["start"] and self._running(rec["pid"], own)

        pids = {rec["pid"] for rec in wan["delayers"] if alive(rec)}
        if pids:
            self._signal_and_wait(pids, own)
        gone = {rec["pid"] for rec in wan["delayers"] if not alive(rec)}
        with self._lock:
            for proc in self._procs:
                if proc.pid in gone and proc.stdout is not None:
                    proc.stdout.close()
            self._procs = [proc for proc in self._procs if proc.pid not in gone]
            self._state["processes"] = [rec for rec in self._state["processes"] if rec["pid"] not in gone]
            self._state.pop("wan", None)
            if self.state_dir.is_dir():
                self._save_state()

    # -- down -----------------------------------------------------------------------------------

    def down(self) -> None:
        """Tear the lab down; idempotent, and works on a half-built or foreign-process lab.

        Ends only processes the lab started (tracked pids whose start time still matches) and
        processes living in its namespaces, deletes its namespaces, removes its state directory.
        Raises LabError if a namespace cannot be deleted.
        """
        started = time.monotonic()
        if os.geteuid() != 0:
            if self.exists():
                raise LabError("tearing the grid lab down needs root (network namespaces)")
            return
        if (self.state_dir / STATE_FILE).exists():
            try:
                self.load()
            except LabError as exc:
                log.warning("lab %s: %s; tearing down by name", self.prefix, exc)
        self._stop_processes()
        errors = []
        for ns in self.existing_namespaces():
            done = subprocess.run(
                ["ip", "netns", "delete", ns], capture_output=True, text=True, timeout=SETUP_COMMAND_TIMEOUT_S
            )
            if done.returncode != 0:
                errors.append(f"{ns}: {done.stderr.strip()}")
        if errors:
            raise LabError("cannot delete namespaces: " + "; ".join(errors))
        # STATE_ROOT itself stays: removing it could race with another prefix's up()
        shutil.rmtree(self.state_dir, ignore_errors=True)
        with self._lock:
            self._state = self._blank_state()
        log.info("lab %s down in %.2f s", self.prefix, time.monotonic() - started)

    def _stop_processes(self) -> None:
        own = {proc.pid: proc for proc in self._procs}
        victims: set[int] = {pid for pid, proc in own.items() if proc.poll() is None}
        for rec in self._state["processes"]:
            stat = _proc_stat(rec["pid"])
            if stat is not None and stat[1] == rec.get("start"):  # same process, not a recycled pid
                victims.add(rec["pid"])
        for _ in range(STOP_ROUNDS):
            victims |= self._namespace_pids()
            victims.discard(os.getpid())
            victims = {pid for pid in victims if self._running(pid, own)}
            if not victims:
                break
            self._signal_and_wait(victims, own)
            victims = set()
        for proc in self._procs:
            for stream in (proc.stdin, proc.stdout, proc.stderr):
                if stream is not None:
                    stream.close()
        self._procs = [proc for proc in self._procs if proc.returncode is None]

    def _namespace_pids(self) -> set[int]:
        pids: set[int] = set()
        for ns in self.existing_namespaces():
            done = subprocess.run(
                ["ip", "netns", "pids", ns], capture_output=True, text=True, timeout=SETUP_COMMAND_TIMEOUT_S
            )
            pids.update(int(word) for word in done.stdout.split() if word.isdigit())
        return pids

    @staticmethod
    def _running(pid: int, own: dict[int, subprocess.Popen[Any]]) -> bool:
        if pid in own:
            return own[pid].poll() is None  # also reaps our own children
        return _alive(pid)

    def _signal_and_wait(self, pids: set[int], own: dict[int, subprocess.Popen[Any]]) -> None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + STOP_TIMEOUT_S
            while True:
                pids = {pid for pid in pids if self._running(pid, own)}
                if not pids or time.monotonic() >= deadline:
                    break
                time.sleep(STOP_POLL_S)
            if not pids:
                return
            log.warning("lab %s: %s ignored %s", self.prefix, sorted(pids), sig.name)
        log.error("lab %s: processes %s survive SIGKILL", self.prefix, sorted(pids))


# -- command line ---------------------------------------------------------------------------------


def _print_status(status: dict[str, Any]) -> None:
    print(f"lab {status['prefix']}: {status['status']} (state in {status['state_dir']})")
    for ns, present in status["namespaces"].items():
        host = ns[len(status["prefix"]) :]
        print(f"  {ns:<24} {ADDRESSES.get(host, 'switch'):<15} {'present' if present else 'absent'}")
    for rec in status["processes"]:
        state = "alive" if rec["alive"] else "gone"
        print(f"  pid {rec['pid']:<8} {rec['host']:<4} {state:<6} {' '.join(rec['argv'])[:60]}")


def _print_up(lab: Lab) -> None:
    print(f"lab {lab.prefix} is up; state in {lab.state_dir}")
    for host in LAB_HOSTS:
        print(f"  {host:<4} {lab.netns(host):<24} {lab.addr(host)}")
    print(f"ssh gateway  {lab.ssh_gateway} (public {lab.ssh_gateway_public})")
    print(f"  key {lab.ssh_client_key}, known_hosts {lab.ssh_known_hosts}")
    print(f"socks proxy  {lab.socks_proxy[0]}:{lab.socks_proxy[1]} (public {lab.socks_proxy_public[0]}:{SOCKS_PORT})")


def main(argv: list[str] | None = None) -> int:
    """Run the lab command line (``gridsock lab ...``); return the exit status.

    ``up``, ``down``, ``status`` (exit 0 only when the lab is fully up) and ``exec NODE CMD...``
    (exit status of CMD).
    """
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--prefix", default=argparse.SUPPRESS, help=f"namespace prefix (default {DEFAULT_PREFIX!r})")
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="log what is done")
    parser = argparse.ArgumentParser(
        prog="gridsock lab",
        description="The grid lab: clusters behind NAT, a firewall and a front-end, in network namespaces.",
    )
    parser.add_argument("--prefix", default=DEFAULT_PREFIX, help=f"namespace prefix (default {DEFAULT_PREFIX!r})")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what is done")
    sub = parser.add_subparsers(dest="action", required=True)
    sub.add_parser("up", parents=[common], help="build the lab (tearing down a stale one first)")
    sub.add_parser("down", parents=[common], help="tear the lab down")
    sub.add_parser("status", parents=[common], help="show what exists")
    exe = sub.add_parser("exec", parents=[common], help="run a command in a host's namespace")
    exe.add_argument("host", help="one of " + ", ".join(LAB_HOSTS))
    exe.add_argument("cmd", nargs=argparse.REMAINDER, help="the command and its arguments")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    try:
        lab = Lab(args.prefix)
        if args.action == "up":
            lab.up()
            _print_up(lab)
        elif args.action == "down":
            lab.down()
        elif args.action == "status":
            status = lab.status()
            _print_status(status)
            return 0 if status["status"] == "up" else 1
        else:
            if not args.cmd:
                parser.error("exec needs a command")
            namespace = lab.netns(args.host)
            if namespace not in lab.existing_namespaces():
                raise LabError(f"lab {lab.prefix!r} is not up: no namespace {namespace}")
            return lab.run(args.host, args.cmd, timeout=None).returncode
    except (LabError, ConfigError) as exc:
        print(f"gridsock lab: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
