"""Local TCP ports joined to grid ports: ``gridsock forward`` (ssh -L) and ``gridsock expose`` (ssh -R).

``gridsock forward [BIND:]LOCALPORT NODE:PORT``: the node listens on a local TCP port (bind
address :data:`FORWARD_BIND` by default) and joins each connection made to it to a new data
connection to grid port PORT of NODE (:meth:`gridsock.node.Node.open_stream`: the rules choose
the stack unless one is named). Any program reaches a grid service that way: ``ssh -p 2222
127.0.0.1``, ``redis-cli -p 6379``.

``gridsock expose GRIDPORT [HOST:]LOCALPORT``: the node serves grid port GRIDPORT
(:meth:`gridsock.node.Node.listen`) and joins each grid connection to it to a new TCP
connection to the local server at HOST:LOCALPORT (:data:`EXPOSE_HOST` by default). Any server
is then reachable from the grid: sshd, redis-server, a database.

Theory of operation
-------------------
Both run inside the node, for as long as the command that asked runs: the CLI's control call
(op ``forward`` or ``expose``) is held open. The operation binds its port first (an error --
port in use, grid port already served, unknown node, bad stack -- is the call's error), then
sends a first progress message (``{"event": "listening", ...}``: the CLI prints its one line
only then, when connections are really accepted), then one every :data:`REPORT_INTERVAL_S`
with the counts, until the CLI goes. The CLI stops it by half-closing the control connection
(Ctrl-C, SIGTERM): the control server cancels the operation (kills its greenlet), whose
``finally`` closes the local listener or the grid port, aborts the open connections, and sends
the final counts before the node closes the control connection; so when ``gridsock forward``
exits the port is closed. A CLI that dies without a word (SIGKILL) closes the connection, which
cancels the operation the same way. With ``--once`` the operation takes a single connection,
stops listening, and returns when that connection ends.

Node restarts: when the node goes away while it holds the operation (killed, or restarted with
its state directory), its connections break (resets at both ends) and the command, which
outlives it, says so on stderr and tries the node's control socket again with backoff
(:data:`REATTACH_FIRST_S` doubling to :data:`REATTACH_MAX_S`) for up to ``--give-up`` seconds
(:data:`REATTACH_GIVE_UP_S`); then it asks the new node for the same operation on the same
ports (a forward's local port, even one the kernel chose; an expose's grid port), as a program's
grid listener does through its agent (:mod:`gridsock.agentclient`). Its last line adds up what
every node reported (a node killed without warning may not have reported its last
:data:`REPORT_INTERVAL_S`). ``--give-up 0``, and ``--once``, end the command at once with "the
node went away" instead (exit status 2); so does a node that does not come back in time, or
cannot serve the same ports.

Each connection is a :class:`Pipe`: two greenlets copy bytes between the local TCP socket (a
:class:`~gridsock.streams.SocketStream`) and the grid stream, :data:`PIPE_CHUNK_BYTES` at a
time, so nothing is buffered beyond one chunk each way and the sockets' own buffers.

- Half-close: EOF on one side (``b""``, an orderly end) becomes ``send_eof()`` on the other (a
  FIN on the local socket, the stack's own end of stream on the grid), and the other direction
  goes on. The pipe ends in order when both directions have.
- Breaks: an error on either side (a reset, a broken grid stream, a local program that closed
  while data was still coming) aborts both: the local socket is closed with an RST
  (``SO_LINGER`` {on, 0}, as a SocketStream is while open) and the grid stream without EOF, so
  the far end sees a reset too (docs/architecture.md, "Breaks"), never a clean end.
- An exposed local server that cannot be reached (refused, no route, timeout after
  :data:`LOCAL_CONNECT_TIMEOUT_S`): the grid connection is aborted at once (its client sees a
  reset) and a warning is logged. A forward whose grid connect fails resets the local client
  the same way.
- Stop: the listener closes first (later connects are refused), then every open connection is
  aborted (reset at both ends): the forwarding lives as long as the command. Unlike ``ssh``,
  which waits for forwarded connections to end when its session ends, nothing is drained: a
  reset tells both programs that the transfer did not complete, where a quiet EOF could pass
  for a complete one. Use ``--once`` to wait for one connection to end by itself.

Every grid connection is made through the assembler, so ``gridsock status`` lists it while it
is open, with bytes each way (the pipe's counters, in ``detail["bridge"]`` as a bridge's are)
and ``via`` (``forward`` or ``expose``) and ``local`` (the local end's address) in its JSON.
"""
from __future__ import annotations

import argparse
import errno
import logging
import signal
import socket
import sys
import time
from typing import Any, Dict, Optional, Set, Tuple

import gevent
import gevent.event
import gevent.pool
from gevent import socket as gsocket

from .bridge import BridgeStats
from .errors import BrokenStreamError, ConfigError, ConnectError, GridsockError
from .streams import SocketStream, Stream

__all__ = [
    "Pipe",
    "Forward",
    "Expose",
    "control_forward",
    "control_expose",
    "add_commands",
    "parse_local",
    "FORWARD_BIND",
    "EXPOSE_HOST",
    "PIPE_CHUNK_BYTES",
    "LOCAL_CONNECT_TIMEOUT_S",
    "REPORT_INTERVAL_S",
    "STOP_TIMEOUT_S",
    "REATTACH_GIVE_UP_S",
]

log = logging.getLogger(__name__)

# Where ``gridsock forward`` listens unless told: this host only, as ssh -L does by default.
FORWARD_BIND = "127.0.0.1"
# The local server ``gridsock expose`` connects to unless told.
EXPOSE_HOST = "127.0.0.1"
# What each direction of a pipe moves per call (as the bridge: amortises system calls, buffers little).
PIPE_CHUNK_BYTES = 64 * 1024
# A local server that does not answer a connect within this long is unreachable (a refusal is at once).
LOCAL_CONNECT_TIMEOUT_S = 10.0
# Connections accepted by the kernel but not yet by the node (the listen() backlog).
LISTEN_BACKLOG = 128
# How often a running forward/expose sends its counts to the CLI.
REPORT_INTERVAL_S = 1.0
# After Ctrl-C the CLI waits this long for the node to confirm that it has stopped.
STOP_TIMEOUT_S = 10.0
#: When its node goes away (killed, restarted with its state directory), the command waits this
#: long by default for the node's control socket to answer again, then asks the new node for
#: the same operation (the same ports); ``--give-up 0`` ends the command at once instead.
REATTACH_GIVE_UP_S = 600.0
#: The first try comes this soon after the node went away, then twice as late after each
#: failure, up to :data:`REATTACH_MAX_S` apart (a try is one connect() to a Unix socket path).
REATTACH_FIRST_S = 0.05
REATTACH_MAX_S = 1.0
# Stopping waits this long for the connections' greenlets to end (they are killed).
KILL_TIMEOUT_S = 5.0


def _format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_local(text: str, default_host: str) -> Tuple[str, int]:
    """``[HOST:]PORT`` (HOST may be ``[v6]``) -> ``(host, port)``; ConfigError if malformed."""
    host, sep, port = text.rpartition(":")
    if not sep:
        host = default_host
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not port.isdigit() or not 0 <= int(port) < 65536 or (sep and not host):
        raise ConfigError(f"bad local address {text!r}: [HOST:]PORT")
    return host, int(port)


def _parse_grid(text: str) -> Tuple[str, int]:
    node, _, port = text.rpartition(":")
    if not node or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"bad grid address {text!r}: NODE:PORT")
    return node, int(port)


class Pipe:
    """One local TCP connection joined to one grid stream (see the module docstring).

    Owns both streams and closes them when it ends: in order when both directions ended with
    an EOF, abortively (a reset at both ends) on any error or on :meth:`close`. ``stats``
    counts the bytes: ``bytes_to_stream`` went from the local socket to the grid,
    ``bytes_from_stream`` the other way (the names a bridge's counters have, so that ``gridsock
    status`` and the metrics read them the same way).
    """

    def __init__(self, local: Stream, grid: Stream, name: str) -> None:
        self.local = local
        self.grid = grid
        self.name = name
        self.stats = BridgeStats(name=name, app_fileno=-1, opened_at=time.time())
        self._done = gevent.event.Event()
        self._directions_done = 0
        self._closed = False
        self._greenlets = [gevent.spawn(self._pump, local, grid, "local -> grid"),
                           gevent.spawn(self._pump, grid, local, "grid -> local")]

    def __repr__(self) -> str:
        state = "open" if self.stats.open else "closed"
        return f"<Pipe {self.name} {state} up={self.stats.bytes_to_stream} down={self.stats.bytes_from_stream}>"

    @property
    def closed(self) -> bool:
        return self._closed

    def join(self, timeout: Optional[float] = None) -> bool:
        """Wait until the pipe has ended; False if ``timeout`` expired first."""
        return self._done.wait(timeout)

    def close(self) -> None:
        """Abort: both ends are reset; idempotent."""
        self._end("closed by the node")

    def _pump(self, src: Stream, dst: Stream, direction: str) -> None:
        to_grid = dst is self.grid
        try:
            while True:
                data = src.receive_some(PIPE_CHUNK_BYTES)
                if not data:
                    break
                dst.send_all(data)
                if to_grid:
                    self.stats.bytes_to_stream += len(data)
                else:
                    self.stats.bytes_from_stream += len(data)
            dst.send_eof()  # the EOF passes as an EOF; the other direction goes on
        except (BrokenStreamError, OSError) as exc:
            self._end(f"{direction}: {exc}")
            return
        except Exception as exc:  # a bug: end the pipe rather than leave it half-dead
            log.exception("pipe %s: %s", self.name, direction)
            self._end(f"{direction}: {type(exc).__name__}: {exc}")
            return
        self._directions_done += 1
        if self._directions_done == 2:
            self._end(None)

    def _end(self, error: Optional[str]) -> None:
        if self._closed:
            return
        self._closed = True
        self.stats.error = error
        self.stats.closed_at = time.time()
        if error is None:
            log.debug("pipe %s ended in order: %r", self.name, self)
        else:
            log.info("pipe %s ended: %s", self.name, error)
        # Without send_eof() first, close() is an abort: a reset for the local program, a
        # break for the grid peer. After both EOFs it is an orderly close.
        for stream in (self.local, self.grid):
            try:
                stream.close()
            except Exception as exc:  # closing is best effort
                log.debug("pipe %s: closing %r: %s", self.name, stream, exc)
        current = gevent.getcurrent()
        for greenlet in self._greenlets:
            if greenlet is not current:
                greenlet.kill(block=False)
        self._done.set()


class _Joiner:
    """What Forward and Expose share: the connections' greenlets and pipes, the counts, stop."""

    via = ""

    def __init__(self, node: Any, *, once: bool) -> None:
        self.node = node
        self.once = once
        self.connections = 0  # grid connections made (forward) or accepted (expose)
        self.failed = 0  # local connections whose other end could not be reached
        self._ended_up = 0  # bytes of pipes that ended, local -> grid
        self._ended_down = 0
        self._pipes: Set[Pipe] = set()
        self._group = gevent.pool.Group()
        self._acceptor: Optional[gevent.Greenlet] = None
        self._finished = gevent.event.Event()
        self._stopped = False

    def describe(self) -> str:
        raise NotImplementedError

    def summary(self) -> Dict[str, Any]:
        """The counts, as JSON: connections, failed, open, bytes each way (live pipes included)."""
        up = self._ended_up + sum(p.stats.bytes_to_stream for p in self._pipes)
        down = self._ended_down + sum(p.stats.bytes_from_stream for p in self._pipes)
        return {"via": self.via, "node": self.node.name, "what": self.describe(), "connections": self.connections,
                "failed": self.failed, "open": len(self._pipes), "bytes_to_grid": up, "bytes_from_grid": down}

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Wait until done (``once``: its connection ended; or stopped); False on timeout."""
        return self._finished.wait(timeout)

    def stop(self) -> None:
        """Stop listening, then abort every open connection (a reset at both ends); idempotent."""
        if self._stopped:
            return
        self._stopped = True
        self._close_listener()
        if self._acceptor is not None:
            self._acceptor.kill(block=False)
        for pipe in list(self._pipes):
            pipe.close()
        self._group.kill(block=True, timeout=KILL_TIMEOUT_S)
        self._finished.set()

    def _close_listener(self) -> None:
        raise NotImplementedError

    def _run_pipe(self, local: Stream, grid: Stream, info: Any, local_address: str) -> None:
        """Join ``local`` and ``grid`` (grid connection ``info``) until the pipe ends."""
        name = f"{self.via} #{info.conn} {local_address} {info.peer_name}:{info.port}"
        pipe = Pipe(local, grid, name)
        info.detail["bridge"] = pipe  # its counters: gridsock status, the metrics
        info.detail["via"] = self.via
        info.detail["local"] = local_address
        self._pipes.add(pipe)
        try:
            pipe.join()
        finally:
            pipe.close()  # (killed: the pipe goes with us)
            self._pipes.discard(pipe)
            self._ended_up += pipe.stats.bytes_to_stream
            self._ended_down += pipe.stats.bytes_from_stream

    def _connection_done(self) -> None:
        if self.once:
            self._finished.set()


class Forward(_Joiner):
    """A local TCP port whose connections go to grid port ``port`` of node ``peer``.

    ``start()`` binds ``bind:local_port`` (port 0: the kernel chooses; :attr:`address` says
    which); ``stop()`` closes it and aborts the open connections. ``stack`` names the stack
    (default: the rules choose); ``timeout`` bounds each grid connect (default: the
    assembler's). With ``once``, the first connection is the only one (:meth:`wait` returns
    when it has ended).
    """

    via = "forward"

    def __init__(self, node: Any, peer: str, port: int, *, bind: str = FORWARD_BIND, local_port: int = 0,
                 stack: Optional[str] = None, timeout: Optional[float] = None, once: bool = False) -> None:
        super().__init__(node, once=once)
        self.peer = peer
        self.port = port
        self.bind = bind
        self.local_port = local_port
        self.stack = stack
        self.timeout = timeout
        self.address: Optional[Tuple[str, int]] = None
        self._sock: Optional[gsocket.socket] = None

    def describe(self) -> str:
        host, port = self.address if self.address is not None else (self.bind, self.local_port)
        return f"{_format_address(host, port)} -> {self.peer}:{self.port}"

    def summary(self) -> Dict[str, Any]:
        """As :meth:`_Joiner.summary`, plus ``local_port``: the port bound (the kernel's choice
        for port 0), which the CLI asks for again of a restarted node."""
        return {**super().summary(), "local_port": self.address[1] if self.address is not None else self.local_port}

    def start(self) -> "Forward":
        """Bind and listen; return self. ConfigError: the port is in use, the address cannot
        be bound, the peer is not in the directory, or the stack string is bad."""
        from .stack import Stack

        if self.stack is not None:
            Stack.parse(self.stack, self.node.assembler.registry)  # ConfigError before anything is bound
        if self.node.directory.resolve(self.peer) is None:
            raise ConfigError(f"no node {self.peer!r} in {self.node.name}'s directory")
        where = _format_address(self.bind, self.local_port)
        try:
            infos = socket.getaddrinfo(self.bind or None, self.local_port, type=socket.SOCK_STREAM,
                                       flags=socket.AI_PASSIVE)
        except socket.gaierror as exc:
            raise ConfigError(f"cannot listen on {where}: {exc.strerror}") from exc
        family, _, _, _, sockaddr = infos[0]
        sock = gsocket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # (TIME_WAIT of earlier runs)
            sock.bind(sockaddr)
            sock.listen(LISTEN_BACKLOG)
        except OSError as exc:
            sock.close()
            if exc.errno == errno.EADDRINUSE:
                raise ConfigError(f"{where} is in use") from exc
            raise ConfigError(f"cannot listen on {where}: {exc.strerror or exc}") from exc
        self._sock = sock
        host, port = sock.getsockname()[:2]
        self.address = (host, port)
        self._acceptor = gevent.spawn(self._serve)
        log.info("node %s forwarding %s", self.node.name, self.describe())
        return self

    def _close_listener(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()

    def _serve(self) -> None:
        while self._sock is not None:
            try:
                conn, addr = self._sock.accept()
            except OSError as exc:  # closed under us (stop), or out of descriptors
                if self._sock is not None:
                    log.warning("forward %s: accept failed: %s", self.describe(), exc)
                    gevent.sleep(0.1)  # (EMFILE: do not spin)
                continue
            self._group.spawn(self._handle, conn, _format_address(addr[0], addr[1]))
            if self.once:
                self._close_listener()
                return

    def _handle(self, conn: gsocket.socket, client: str) -> None:
        local = SocketStream(conn)
        try:
            try:
                grid, info = self.node.open_stream(self.peer, self.port, stack=self.stack, timeout=self.timeout)
            except GridsockError as exc:
                self.failed += 1
                log.warning("forward %s: connection from %s: cannot reach %s:%d: %s", self.describe(), client,
                            self.peer, self.port, exc)
                return  # (the local client gets a reset: closed below without EOF)
            self.connections += 1
            log.info("forward %s: %s joined to #%d over %s", self.describe(), client, info.conn, info.stack)
            self._run_pipe(local, grid, info, client)
        finally:
            local.close()
            self._connection_done()


class Expose(_Joiner):
    """Grid port ``port`` of ``node`` whose connections go to the local TCP server ``host:local_port``.

    ``start()`` serves the grid port; ``stop()`` closes it and aborts the open connections.
    With ``once``, the first grid connection is the only one.
    """

    via = "expose"

    def __init__(self, node: Any, port: int, local_port: int, *, host: str = EXPOSE_HOST,
                 connect_timeout: float = LOCAL_CONNECT_TIMEOUT_S, once: bool = False) -> None:
        super().__init__(node, once=once)
        self.port = port
        self.host = host
        self.local_port = local_port
        self.connect_timeout = connect_timeout
        self._listener: Any = None

    def describe(self) -> str:
        return f"{self.node.name}:{self.port} -> {_format_address(self.host, self.local_port)}"

    def start(self) -> "Expose":
        """Serve the grid port; return self. ConfigError if it is served already or invalid."""
        if not 0 < self.local_port < 65536:
            raise ConfigError(f"bad local port {self.local_port}")
        self._listener = self.node.listen(self.port)
        self._acceptor = gevent.spawn(self._serve)
        log.info("node %s exposing %s", self.node.name, self.describe())
        return self

    def _close_listener(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()

    def _serve(self) -> None:
        while self._listener is not None:
            try:
                grid, info = self._listener.accept_stream()
            except ConnectError:  # the listener was closed (stop)
                return
            self._group.spawn(self._handle, grid, info)
            if self.once:
                self._close_listener()
                return

    def _handle(self, grid: Stream, info: Any) -> None:
        target = _format_address(self.host, self.local_port)
        try:
            self.connections += 1
            try:
                sock = gsocket.create_connection((self.host, self.local_port), timeout=self.connect_timeout)
            except OSError as exc:
                self.failed += 1
                log.warning("expose %s: connection #%d from %s: the local server %s is unreachable: %s",
                            self.describe(), info.conn, info.peer_name, target, exc)
                return  # (the grid client gets a reset: closed below without EOF)
            sock.settimeout(None)
            log.info("expose %s: #%d from %s joined to %s", self.describe(), info.conn, info.peer_name, target)
            self._run_pipe(SocketStream(sock), grid, info, target)
        finally:
            grid.close()
            self._connection_done()


# --- the control operations (in the node) ---------------------------------------------------------


def _run_held(joiner: _Joiner) -> Dict[str, Any]:
    """Report, serve until done or cancelled, stop; return the last counts."""
    from .bootstrap.control import report_progress

    try:
        report_progress({"event": "listening", **joiner.summary()}, force=True)
        last: Dict[str, Any] = {}
        while not joiner.wait(REPORT_INTERVAL_S):
            now = joiner.summary()
            if now != last:
                report_progress(now)
                last = now
        return joiner.summary()
    finally:
        joiner.stop()
        # Cancelled (the CLI half-closed the control connection): it still reads these.
        report_progress({"event": "stopped", **joiner.summary()}, force=True)


def control_forward(node: Any, args: Dict[str, Any]) -> Dict[str, Any]:
    """The ``forward`` control op: ``{"peer", "port", "bind", "local_port", "stack", "once", "timeout"}``.

    Runs until cancelled (or, ``once``, until its connection ended); returns the counts.
    """
    forward = Forward(node, str(args["peer"]), int(args["port"]), bind=str(args.get("bind") or FORWARD_BIND),
                      local_port=int(args.get("local_port", 0)), stack=args.get("stack"),
                      timeout=args.get("timeout"), once=bool(args.get("once", False))).start()
    return _run_held(forward)


def control_expose(node: Any, args: Dict[str, Any]) -> Dict[str, Any]:
    """The ``expose`` control op: ``{"port", "host", "local_port", "once"}``; as control_forward."""
    expose = Expose(node, int(args["port"]), int(args["local_port"]), host=str(args.get("host") or EXPOSE_HOST),
                    once=bool(args.get("once", False))).start()
    return _run_held(expose)


# --- the commands ---------------------------------------------------------------------------------


FORWARD_DESCRIPTION = """\
Listen on a local TCP port (default bind 127.0.0.1) in the node and join each connection to
grid port PORT of node NODE, as ssh -L does: any program reaches a grid service through it
(ssh -p 2222 127.0.0.1). The rules choose each connection's stack unless --stack names one.
Runs until Ctrl-C (or SIGTERM): then the port is closed and open connections are reset.
"""

EXPOSE_DESCRIPTION = """\
Serve grid port GRIDPORT of the node and join each grid connection to the local TCP server at
HOST:LOCALPORT (default host 127.0.0.1), as ssh -R does: any server becomes reachable from the
grid (gridsock forward, gridsock run, a node's connect()). Runs until Ctrl-C (or SIGTERM): then
the grid port is closed and open connections are reset.
"""


def _add_give_up(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--give-up", type=float, default=REATTACH_GIVE_UP_S, metavar="SECONDS",
                        help="when the node goes away, wait this long for it to come back and serve the same "
                             f"ports again (default {REATTACH_GIVE_UP_S:g}; 0: end at once)")


def add_commands(sub: Any) -> None:
    """Add ``gridsock forward`` and ``gridsock expose`` to the ``gridsock`` parser."""
    from .cli import _add_target

    forward = sub.add_parser("forward", help="a local TCP port whose connections go to a grid port (ssh -L)",
                             description=FORWARD_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_target(forward)
    forward.add_argument("--stack", help="stack string (default: what the rules choose)")
    forward.add_argument("--once", action="store_true", help="take one connection, stop when it ends")
    _add_give_up(forward)
    forward.add_argument("local", metavar="[BIND:]LOCALPORT", help="where to listen (port 0: the kernel chooses)")
    forward.add_argument("dst", metavar="NODE:PORT", help="the grid port each connection goes to")
    forward.set_defaults(handler=_cmd_forward)

    expose = sub.add_parser("expose", help="a grid port whose connections go to a local TCP server (ssh -R)",
                            description=EXPOSE_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_target(expose)
    expose.add_argument("--once", action="store_true", help="take one connection, stop when it ends")
    _add_give_up(expose)
    expose.add_argument("port", type=int, metavar="GRIDPORT", help="the grid port of this node to serve")
    expose.add_argument("local", metavar="[HOST:]LOCALPORT", help="the local TCP server")
    expose.set_defaults(handler=_cmd_expose)


def _cmd_forward(args: argparse.Namespace) -> int:
    bind, local_port = parse_local(args.local, FORWARD_BIND)
    peer, port = _parse_grid(args.dst)
    return _hold(args, "forward", {"peer": peer, "port": port, "bind": bind, "local_port": local_port,
                                   "stack": args.stack, "once": args.once})


def _cmd_expose(args: argparse.Namespace) -> int:
    host, local_port = parse_local(args.local, EXPOSE_HOST)
    if not 0 < args.port < 65536:
        raise ConfigError(f"bad grid port {args.port}")
    if not local_port:
        raise ConfigError("the local port cannot be 0")
    return _hold(args, "expose", {"port": args.port, "host": host, "local_port": local_port, "once": args.once})


class _Interrupted(Exception):
    """Ctrl-C or SIGTERM while the command holds its operation."""


def _format_bytes(count: int) -> str:
    from .cli import _format_bytes as format_bytes

    return format_bytes(count)


def _final_line(counts: Dict[str, Any]) -> str:
    what = "forwarding" if counts.get("via") == "forward" else "exposing"
    failed = f", {counts['failed']} failed" if counts.get("failed") else ""
    return (f"stopped {what} {counts.get('what', '')}: {counts.get('connections', 0)} connection(s){failed}, "
            f"{_format_bytes(int(counts.get('bytes_to_grid', 0)))} to the grid, "
            f"{_format_bytes(int(counts.get('bytes_from_grid', 0)))} from it")


def _connect_control(sock: gsocket.socket, path: str) -> None:
    """Connect to a control socket as :func:`gridsock.bootstrap.control.call` does: through
    ``gridsock.names.connect_private`` (only a socket of this user's, served by this user or
    root) where this version has it. Raises ConnectError if nothing serves ``path``, the
    GridsockError of the trust check."""
    from . import names

    connect = getattr(names, "connect_private", None)
    try:
        if connect is not None:
            connect(sock, path)
        else:
            sock.connect(path)
    except GridsockError:
        raise
    except OSError as exc:
        raise ConnectError(f"no gridsock process serves {path}: {exc.strerror or exc}", peer=path) from exc


class _NodeGone(Exception):
    """The node went away while it held the operation (its reason in ``args[0]``)."""


_COUNTED = ("connections", "failed", "bytes_to_grid", "bytes_from_grid")


def _added(carried: Dict[str, Any], counts: Dict[str, Any]) -> Dict[str, Any]:
    """``counts`` (the current node's) plus what earlier nodes counted for this command."""
    return {**counts, **{key: int(counts.get(key, 0)) + int(carried.get(key, 0)) for key in _COUNTED}}


def _hold(args: argparse.Namespace, op: str, op_args: Dict[str, Any]) -> int:
    """Run ``op`` in the node and hold it until it ends, Ctrl-C or SIGTERM; return the exit status.

    Prints one line once the node listens, and one with the counts at the end. On a signal the
    control connection is half-closed (the node cancels the operation: it closes the port and
    the connections) and the node's last counts and its close are awaited, at most
    :data:`STOP_TIMEOUT_S`. Raises GridsockError with the node's reason if the operation
    could not start. If the node goes away once the operation runs (killed, restarted with its
    state directory), the command waits up to ``--give-up`` seconds for it to come back and asks
    it for the same operation on the same ports (a forward's local port, an expose's grid port);
    connections open through the old node were reset with it. Raises GridsockError if it does
    not come back in time, or the new node cannot serve the operation.
    """
    from . import wire
    from .bootstrap.control import PROGRESS_ARG, PROGRESS_OP
    from .bootstrap.link import read_message, send_message
    from .cli import _control_target

    path = _control_target(args)
    give_up_s = float(getattr(args, "give_up", REATTACH_GIVE_UP_S))
    main_greenlet = gevent.getcurrent()
    handlers = [gevent.signal_handler(signum, lambda: main_greenlet.throw(_Interrupted()))
                for signum in (signal.SIGINT, signal.SIGTERM)]
    counts: Dict[str, Any] = {}
    carried: Dict[str, Any] = {}  # what the nodes that went away counted
    forever = 10 * 365 * 86400.0  # (read_message needs a number)
    what = "forwarding" if op == "forward" else "exposing"
    sock: Optional[gsocket.socket] = None

    def run_once(attached_before: bool) -> int:
        """One node: send the op, follow its progress; the exit status, or _NodeGone."""
        nonlocal counts
        decoder = wire.Decoder(peer=path)
        assert sock is not None
        try:
            send_message(sock, wire.Control(op, {**op_args, PROGRESS_ARG: REPORT_INTERVAL_S}))
            while True:
                message = read_message(sock, decoder, timeout=forever)
                if isinstance(message, wire.Control) and message.op == PROGRESS_OP:
                    if message.args.get("event") == "listening":
                        if attached_before:
                            print(f"gridsock {op}: the node is back", file=sys.stderr, flush=True)
                        else:
                            print(f"{what} {message.args.get('what')} (Ctrl-C to stop)", flush=True)
                        if "local_port" in message.args:  # (a restarted node binds the same port)
                            op_args["local_port"] = int(message.args["local_port"])
                    counts = dict(message.args)
                    continue
                if not isinstance(message, wire.ControlReply):
                    raise GridsockError(f"unexpected {type(message).__name__} from the node")
                if not message.ok:
                    raise GridsockError(message.error)
                print(_final_line(_added(carried, dict(message.result))), flush=True)  # (--once: it ended)
                return 0
        except BrokenStreamError:
            raise _NodeGone("the node went away") from None
        except OSError as exc:  # (a node that died resets the control connection)
            raise _NodeGone(f"the node went away: {exc.strerror or exc}") from None

    def reattach(reason: str) -> None:
        """Wait for the node's control socket to answer again (backoff, at most give_up_s)."""
        nonlocal sock, counts, carried
        carried = _added(carried, counts)
        counts = {}
        if give_up_s <= 0 or op_args.get("once"):
            raise GridsockError(reason)
        print(f"gridsock {op}: {reason}; waiting up to {give_up_s:g} s for it to come back", file=sys.stderr,
              flush=True)
        deadline = time.monotonic() + give_up_s
        delay = REATTACH_FIRST_S
        while True:
            sock = gsocket.socket(gsocket.AF_UNIX, gsocket.SOCK_STREAM)
            try:
                _connect_control(sock, path)
                return
            except ConnectError:
                sock.close()
                sock = None
            if time.monotonic() + delay > deadline:
                raise GridsockError(f"{reason}, and did not come back within {give_up_s:g} s")
            gevent.sleep(delay)
            delay = min(delay * 2, REATTACH_MAX_S)

    try:
        try:
            sock = gsocket.socket(gsocket.AF_UNIX, gsocket.SOCK_STREAM)
            _connect_control(sock, path)
            attached_before = False
            while True:
                try:
                    return run_once(attached_before)
                except _NodeGone as gone:
                    if sock is not None:
                        sock.close()
                        sock = None
                    reattach(str(gone))
                    attached_before = True
        except _Interrupted:
            pass
        # Ctrl-C or SIGTERM: half-close, so the node stops; its last counts, then its close.
        if sock is not None:
            decoder = wire.Decoder(peer=path)
            try:
                sock.shutdown(socket.SHUT_WR)
                with gevent.Timeout(STOP_TIMEOUT_S, TimeoutError):
                    while True:
                        message = read_message(sock, decoder, timeout=STOP_TIMEOUT_S)
                        if isinstance(message, wire.Control) and message.op == PROGRESS_OP:
                            counts = dict(message.args)
            except (BrokenStreamError, OSError, TimeoutError, _Interrupted):
                pass  # closed (what we wait for), or no confirmation in time, or a second signal
        if counts or carried:
            print(_final_line(_added(carried, counts)), flush=True)
        return 0
    finally:
        for handler in handlers:
            handler.cancel()
        if sock is not None:
            sock.close()
        sys.stdout.flush()
