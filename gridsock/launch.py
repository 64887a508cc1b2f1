"""``gridsock run``: any program on the grid, through a running node or a node of its own.

Theory of operation
-------------------
A program under ``gridsock run`` reaches the grid by up to three mechanisms at once, each for
what it can reach (docs/personality.md, "Which programs, by which mechanism"):

1. **The socket personality** (Python programs): ``$GRIDSOCK_AGENT`` and the personality's
   ``sitecustomize`` first on ``PYTHONPATH`` (:func:`gridsock.personalities.monkey.child_environment`),
   so every Python process of the program resolves grid names and connects through the node's
   agent, at Python level.
2. **proxychains-ng** (every dynamically linked program, and the C extensions of Python
   programs): the command is run as ``proxychains4 -q -f CONFIG command...``; its preloaded
   library hooks libc's ``connect`` (and, for programs that are not Python, the name lookups),
   and sends each TCP connection that does not go to loopback through the node's **front door**
   (:mod:`gridsock.frontdoor`) as a SOCKS5 request. The front door sends grid names and grid
   addresses through the grid and passes other destinations on.
3. **Proxy variables** (HTTP clients that honour them, linked statically or not: curl, wget,
   pip, Go's net/http, libcurl, gRPC): ``http_proxy``/``https_proxy`` name the front door as an
   HTTP proxy, ``ALL_PROXY`` as a SOCKS5 proxy that resolves names itself (``socks5h://``).

Name lookups under proxychains (``proxy_dns``): a name that is not in ``/etc/hosts`` gets a
made-up address in ``224.0.0.0/8`` (``remote_dns_subnet``), and a connect to it sends the *name*
to the front door, so ``curl http://b2:8000/`` or ``ssh b2`` reach node b2. Python programs get
the configuration *without* ``proxy_dns`` (:func:`proxychains_config`): their names are the
personality's and the system resolver's as before (no made-up addresses for UDP, ``getfqdn()``
or ``gethostbyname(gethostname())``, and no resolver thread shared by forked workers, which
proxychains-ng 4.16 can deadlock: its lock is a process-private mutex in shared memory); their
C extensions reach grid nodes by grid address, or by name through the proxy variables.

The configuration lives in a private directory (mode 0700, the file 0600) that goes away with
the program: with a node of its own, ``gridsock run`` waits for the program and removes it;
with ``--node``, ``gridsock run`` *becomes* the program (``exec``: same pid, signals and
terminal), so a small watcher process (started with a double fork, in a session of its own)
holds the read end of a pipe whose write end the program inherits, and removes the directory
when the last process holding that end is gone.

Where something is missing, a Python program runs without it (the personality, and the proxy
variables if the node has a front door) and one line on stderr says what it lacks; any other
program is refused (exit 2) with what to install or start.
``--no-intercept`` runs the program with the personality only: no proxychains, no proxy variables.
"""
from __future__ import annotations

import dataclasses
import os
import re
import shutil
import signal
import sys
import tempfile
from typing import Dict, List, Optional, Sequence, Tuple

__all__ = ["run_command", "RUN_JOIN_TIMEOUT_S", "PROXYCHAINS", "DEBIAN_PACKAGE", "Launch", "plan_launch",
           "proxychains_config", "proxy_environment", "is_python_program", "LOCAL_NETS", "NO_PROXY"]


# ``gridsock run`` with a node of its own gives up if the node has not joined within this long.
RUN_JOIN_TIMEOUT_S = 60.0
# The proxychains-ng launcher, and the Debian package that has it.
PROXYCHAINS = "proxychains4"
DEBIAN_PACKAGE = "proxychains4"
# Reaching the front door itself (a loopback port: it answers at once or is not there).
FRONT_DOOR_DIAL_TIMEOUT_S = 8.0
# The front door's SOCKS5 reply comes once the grid connection is made or has failed, within its
# own connect timeout (frontdoor.CONNECT_TIMEOUT_S); proxychains waits that and this margin.
FRONT_DOOR_REPLY_MARGIN_S = 5.0
# Made-up addresses of names proxychains resolves for the front door: 224.0.0.0/8 (multicast,
# never a TCP destination; away from the grid's own 240.0.0.0/4 and from loopback).
REMOTE_DNS_SUBNET = 224
# Destinations that stay direct: loopback (the front door itself, local services), v4 and v6.
LOCAL_NETS = ("127.0.0.0/255.0.0.0", "::1/128")
# What HTTP clients must not send to the proxy (merged with the program's own no_proxy).
NO_PROXY = ("localhost", "127.0.0.1", "::1")
# Interpreter names that make a command a Python program (python, python3, python3.11, pypy3...).
_PYTHON_NAME = re.compile(r"(python|pypy)[0-9.]*(-dbg)?")
# A script's first line, read to find a Python shebang, at most.
SHEBANG_BYTES = 256


@dataclasses.dataclass
class Launch:
    """What to run: ``command`` with ``env``, wrapped by ``proxychains`` (its path) with
    ``config`` (the text of its configuration) when both are set."""

    command: List[str]
    env: Dict[str, str]
    proxychains: Optional[str] = None
    config: Optional[str] = None

    def argv(self, config_path: Optional[str] = None) -> List[str]:
        """The argv to execute; ``config_path`` is where :attr:`config` was written."""
        if self.proxychains is None or self.config is None:
            return list(self.command)
        if config_path is None:
            raise ValueError("the proxychains configuration must be written first")
        return [self.proxychains, "-q", "-f", config_path, *self.command]


def is_python_program(command: Sequence[str], env: Optional[Dict[str, str]] = None) -> bool:
    """True if ``command`` runs a Python interpreter: its executable is named like one (python3,
    python3.11, pypy3) or is this interpreter, or it is a script whose ``#!`` line names Python.
    ``env``'s PATH (default ours) finds the executable."""
    if not command:
        return False
    path = shutil.which(command[0], path=(env or os.environ).get("PATH"))
    if path is None:
        return bool(_PYTHON_NAME.fullmatch(os.path.basename(command[0])))
    if _PYTHON_NAME.fullmatch(os.path.basename(path)):
        return True
    real = os.path.realpath(path)
    if _PYTHON_NAME.fullmatch(os.path.basename(real)) or real == os.path.realpath(sys.executable):
        return True
    try:
        with open(path, "rb") as script:
            first = script.read(SHEBANG_BYTES).split(b"\n", 1)[0]
    except OSError:
        return False
    return first.startswith(b"#!") and re.search(rb"\b(python|pypy)[0-9.]*\b", first) is not None


def proxychains_config(host: str, port: int, *, proxy_dns: bool, node: str = "") -> str:
    """The proxychains-ng configuration that sends TCP connections through the front door at
    ``host:port`` (a numeric address): one proxy, strict chain, quiet, loopback direct;
    ``proxy_dns``: names not in /etc/hosts are resolved by the front door."""
    from .frontdoor import CONNECT_TIMEOUT_S

    lines = [
        f"# gridsock run: the program's TCP connections go through the front door of node {node or '?'}",
        "# (written by gridsock/launch.py; removed when the program ends)",
        "strict_chain",
        "quiet_mode",
    ]
    if proxy_dns:
        lines += ["proxy_dns", f"remote_dns_subnet {REMOTE_DNS_SUBNET}"]
    lines += [f"tcp_connect_time_out {int(FRONT_DOOR_DIAL_TIMEOUT_S * 1000)}",
              f"tcp_read_time_out {int((CONNECT_TIMEOUT_S + FRONT_DOOR_REPLY_MARGIN_S) * 1000)}"]
    lines += [f"localnet {net}" for net in LOCAL_NETS]
    lines += ["[ProxyList]", f"socks5 {host} {port}", ""]
    return "\n".join(lines)


def proxy_environment(host: str, port: int, env: Dict[str, str]) -> Dict[str, str]:
    """``env`` with the proxy variables naming the front door at ``host:port``.

    ``http_proxy``/``https_proxy`` (and upper case) are the front door as an HTTP proxy,
    ``ALL_PROXY``/``all_proxy`` as SOCKS5 with remote names; values the program had are replaced
    (the front door passes destinations outside the grid on). ``no_proxy``/``NO_PROXY`` keep the
    program's entries and get loopback added.
    """
    env = dict(env)
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        env[name] = f"http://{where}"
    for name in ("ALL_PROXY", "all_proxy"):
        env[name] = f"socks5h://{where}"
    for name in ("no_proxy", "NO_PROXY"):
        entries = [e.strip() for e in env.get(name, "").split(",") if e.strip()]
        env[name] = ",".join(entries + [e for e in NO_PROXY if e not in entries])
    return env


def _front_door_host_port(address: str) -> Tuple[str, int]:
    """``host, port`` a program on this host dials for the front door at ``address``; raises
    ConfigError for an address that is not a numeric IP and port."""
    import ipaddress

    from .bootstrap.transport import parse_address
    from .errors import ConfigError

    parsed = parse_address(address)
    if parsed.is_unix or not parsed.host or not parsed.port:
        raise ConfigError(f"front door {address!r}: not HOST:PORT")
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(parsed.host, parsed.host)
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ConfigError(f"front door {address!r}: proxychains needs a numeric address") from None
    return host, parsed.port


def plan_launch(command: List[str], env: Dict[str, str], front_door: Optional[str], *, node: str,
                intercept: bool = True, why_no_front_door: str = "") -> Launch:
    """How to run ``command`` (``env``: its environment, the personality's already in) through
    node ``node``'s front door at ``front_door`` (``HOST:PORT``, or None: the node has none).

    Returns the :class:`Launch`. A Python program that cannot have the interception runs with
    the personality only, and one line on stderr says why; any other program raises ConfigError
    (the CLI exits 2) naming what to install or start.
    """
    from .errors import ConfigError

    if not intercept:
        return Launch(list(command), dict(env))
    python = is_python_program(command, env)
    if front_door is None:
        reason = f"node {node} serves no front door{why_no_front_door} (start it with --front-door 127.0.0.1:0)"
        if not python:
            raise ConfigError(f"{reason}: a program that is not Python reaches the grid only through it "
                              f"(or run it with --no-intercept)")
        _note(f"{reason}: only the Python sockets of this program reach the grid, not those of its C extensions")
        return Launch(list(command), dict(env))
    host, port = _front_door_host_port(front_door)
    env = proxy_environment(host, port, env)
    proxychains = shutil.which(PROXYCHAINS, path=env.get("PATH"))
    if proxychains is None:
        reason = f"{PROXYCHAINS} (proxychains-ng) is not on PATH: install the Debian package {DEBIAN_PACKAGE}"
        if not python:
            raise ConfigError(f"{reason} (apt-get install {DEBIAN_PACKAGE}); or run with --no-intercept")
        _note(f"{reason}: the C extensions of this Python program do not reach the grid "
              f"(its Python sockets do, and HTTP clients honouring http_proxy)")
        return Launch(list(command), env)
    return Launch(list(command), env, proxychains,
                  proxychains_config(host, port, proxy_dns=not python, node=node))


def _note(text: str) -> None:
    sys.stderr.write(f"gridsock run: {text}\n")
    sys.stderr.flush()


def _write_config(directory: str, text: str) -> str:
    path = os.path.join(directory, "proxychains.conf")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text)
    return path


def _remove_when_done(directory: str) -> int:
    """Start a watcher that removes ``directory`` when every holder of the returned descriptor
    (the write end of a pipe, inheritable) has closed it or exited; return that descriptor.

    The watcher is a grandchild (double fork: the program never sees a child it did not start),
    in a session of its own (a Ctrl-C on the terminal does not reach it), with nothing of ours
    open but the pipe's read end (it holds no terminal or output pipe of the program's).
    """
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        status = 1
        try:
            os.setsid()
            if os.fork() == 0:
                os.close(write_end)
                devnull = os.open(os.devnull, os.O_RDWR)
                for fd in (0, 1, 2):
                    os.dup2(devnull, fd)
                os.closerange(3, read_end)
                os.closerange(read_end + 1, os.sysconf("SC_OPEN_MAX"))
                signal.signal(signal.SIGINT, signal.SIG_IGN)
                signal.signal(signal.SIGHUP, signal.SIG_IGN)
                while os.read(read_end, 4096):
                    pass
                shutil.rmtree(directory, ignore_errors=True)
            status = 0
        finally:
            os._exit(status)
    os.close(read_end)
    os.waitpid(pid, 0)
    os.set_inheritable(write_end, True)
    return write_end


def _front_door_of_running_node(name: str) -> Tuple[Optional[str], str]:
    """``(address or None, why none)`` of the front door of node ``name`` on this host."""
    from .bootstrap.control import call, control_path
    from .errors import GridsockError

    try:
        status = call(control_path(name), "status")
    except (OSError, GridsockError) as exc:
        return None, f" (its control socket {control_path(name)} did not answer: {exc})"
    return status.get("front_door"), ""


def run_command(args) -> int:
    """Run ``args.program`` on the grid: with a running node's agent and front door (``--node``:
    this process becomes the program), or a node of our own (returns the program's exit status).
    Raises ConfigError for bad arguments, no such node, or a program that cannot be intercepted."""
    import socket as stdsocket

    from .agent import agent_path
    from .errors import ConfigError
    from .names import LocalTrustError, connect_private
    # The launcher of the personality: the one place the framework names it.
    from .personalities.monkey import child_environment

    command = args.program[1:] if args.program[:1] == ["--"] else args.program
    if not command:
        raise ConfigError("nothing to run: gridsock run [options] -- command [args...]")
    if shutil.which(command[0]) is None:
        raise ConfigError(f"no program {command[0]!r} (not on PATH, or not executable)")
    intercept = not getattr(args, "no_intercept", False)
    if args.node:
        if args.session or args.name:
            raise ConfigError("give either --node NAME (a running node) or --session and --name (a node of its own)")
        agent = agent_path(args.node)
        probe = stdsocket.socket(stdsocket.AF_UNIX)
        try:
            connect_private(probe, agent)  # only our user's agent, served by our user or root
        except LocalTrustError:
            raise
        except OSError as exc:
            raise ConfigError(f"no node {args.node} runs here (agent socket {agent}: {exc.strerror or exc})") from None
        finally:
            probe.close()
        front_door, why = _front_door_of_running_node(args.node) if intercept else (None, "")
        launch = plan_launch(command, child_environment(agent), front_door, node=args.node, intercept=intercept,
                             why_no_front_door=why)
        config_path = None
        if launch.config is not None:
            try:
                directory = tempfile.mkdtemp(prefix="gridsock-run-")
                config_path = _write_config(directory, launch.config)
                _remove_when_done(directory)  # (its descriptor stays open in the program)
            except OSError as exc:
                raise ConfigError(f"cannot write the proxychains configuration: {exc}") from exc
        argv = launch.argv(config_path)
        os.execvpe(argv[0], argv, launch.env)
    if not (args.session and args.name):
        raise ConfigError("gridsock run needs --node NAME, or --session FILE and --name NAME for a node of its own")
    import gevent
    import gevent.subprocess

    from .cli import _make_node

    node = _make_node(args)
    try:
        if not node.wait_joined(RUN_JOIN_TIMEOUT_S):
            raise ConfigError(f"node {node.name} did not join its grid within {RUN_JOIN_TIMEOUT_S:g} s")
        front_door = node.status().get("front_door") if intercept else None
        launch = plan_launch(command, child_environment(node._agent_path), front_door, node=node.name,
                             intercept=intercept)
        with tempfile.TemporaryDirectory(prefix="gridsock-run-") as directory:
            config_path = _write_config(directory, launch.config) if launch.config is not None else None
            child = gevent.subprocess.Popen(launch.argv(config_path), env=launch.env)

            def forward(signum):
                if child.poll() is None:
                    child.send_signal(signum)

            gevent.signal_handler(signal.SIGTERM, forward, signal.SIGTERM)
            gevent.signal_handler(signal.SIGINT, forward, signal.SIGINT)
            return child.wait()
    finally:
        node.stop()
