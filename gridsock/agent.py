"""The agent socket: how patched application processes use the node of their host.

Theory of operation
-------------------
An application under the socket personality (``gridsock.personalities``) runs no gevent and
no grid protocol: it asks a node process on its host. Every node serves, next to its control
socket, a Unix socket ``<run dir>/<name>.agent`` (mode 0600: only its user). A client sends
``Control(op, args)`` frames (the wire codec) and gets ``ControlReply`` frames back:

- ``whoami`` -> ``{name, node_id, cluster, ip}``: this node, and its grid address.
- ``resolve {host}`` -> ``{name, node_id, ip}`` for a node name, ``NAME.grid`` or a grid address;
  error ``EAI_NONAME`` if the grid knows no such node.
- ``connect {host, port, timeout, stack}`` -> ``{peer, ip, port, local_port, stack, tried}`` with the
  connected socket's descriptor attached (``SCM_RIGHTS``): the kernel TCP socket itself for a
  plain ``tcp`` stack, else one end of a loopback TCP pair the node bridges to the stack (TCP,
  so that TCP options and ``ssl`` work on it as on any TCP socket). The agent
  closes its copy: from then on the descriptor is the application's alone. The node keeps a
  record of the connection, with the application's pid (``SO_PEERCRED``), until the application
  closes it (:meth:`gridsock.assembly.Assembler.hand_over`): ``gridsock status`` lists it.
- ``listen {port}`` -> ``{port, ip}`` (port 0: the agent picks a free grid port); the same Unix
  connection then carries one ``ControlReply`` per connection accepted on that grid port,
  ``{peer, ip, port, peer_port, stack}`` with its descriptor attached. The application's listening socket
  *is* this connection, so it is readable exactly when a connection waits to be accepted. When
  the application closes it, the node stops serving the port. ``peer_port`` is the client port
  the client's node sent in its assembly request, which its agent answered the client as
  ``local_port``: the server's getpeername() is the client's getsockname().
- A connect to a grid port of this node that a program of this agent listens on is answered
  with ``confirm: true``: the client puts the socket in place and sends ``adopted``; the
  listener is told of the connection then, and the client gets ``{}`` once it has been: the
  server cannot accept before the client's socket is connected, and the connection is in the
  backlog when the client's connect returns, as on TCP's loopback.
- ``listen {port, deferred: true}`` -> ``{port, ip}``: the port is only reserved (a socket that is
  bound but not listening): the node refuses connections to it, as TCP does, and no other
  ``listen`` gets it. The client's next request on that connection, ``listen {port}`` with the
  reserved port, starts serving it and is answered as above.
- ``listen {port}`` may come with a descriptor attached, one end of a Unix socketpair whose
  other end the client keeps (:class:`gridsock.agentclient.AgentListener` always sends one):
  the announcements then go to that end instead of the agent connection, and the node serves
  the port until either the agent connection closes or the client's end is closed everywhere.
  The client's end outlives this node, so a client whose node restarts sends the same listen,
  with the same end, to the node's successor and its program's listening socket never changes.

Failures are ``ControlReply(ok=False, result={"errno": NAME}, error=reason)``: ``ECONNREFUSED``
(nothing listens, or the server's policy refused), ``ETIMEDOUT``, ``EHOSTUNREACH`` (every
method failed), ``EADDRINUSE``, ``EAI_NONAME``; the personality raises the stdlib exception
that errno names. A descriptor always travels on the first byte of its frame, in one
``sendmsg``; frames without one are plain writes.

The framing, the descriptor rules and the errno mapping are :mod:`gridsock.agentwire`'s (one
codec for both sides); the client is :class:`gridsock.agentclient.AgentClient`, re-exported
here. A client that breaks the protocol is dropped (and logged); the agent serves on.
"""
from __future__ import annotations

import errno
import logging
import os
import socket
import struct
import time
from typing import Any, Dict, List, Optional, Tuple

import gevent
import gevent.event
from gevent import socket as gsocket

from . import agentwire, wire
from ._ratelog import RateLimitedLog
from .assembly import errno_of
from .agentclient import AgentClient
from .bootstrap.control import UnixServer, run_dir
from .bridge import Bridge, hand_out
from .errors import ConfigError, ConnectError, GridsockError, RemoteProtocolError
from .names import grid_ip, grid_name, is_grid_ip
from .stack import Stack

__all__ = ["AgentServer", "AgentClient", "agent_path", "EPHEMERAL_PORTS"]

log = logging.getLogger(__name__)

# Grid ports the agent hands out for ``listen`` on port 0 (IANA's dynamic range).
EPHEMERAL_PORTS = range(49152, 65536)
# What getpeername() gives as the port of an accepted connection's client when its node did not
# say (a node that predates the assembly request's client_port): distinct per connection.
PEER_PORTS = range(1024, 65536)
# A connect to a grid port of this very node that a program of this agent serves returns only
# once the connection is announced on the listening socket (in its backlog, as TCP's loopback
# connections are), or after this long (the server dropped it: its backlog was full, it closed).
ANNOUNCE_WAIT_S = 5.0
# Announcements of connections between programs of this node kept for a connect to wait on
# (a connect made without the agent, Node.connect in process, leaves one: the oldest go).
MAX_ANNOUNCED = 1024
# Between programs of this node, the listener is told of a connection only once the client has
# put the connection's socket in place (its ``adopted``, see AgentServer._confirm), so that the
# server cannot accept before the client's socket is connected; this bounds the wait for it.
ADOPT_WAIT_S = 5.0
# A non-blocking connect's filler (see AgentServer._connect_into): a socketpair's send buffer at
# its smallest is a few KiB; this bounds what the agent reads for a client.
MAX_FILLER_BYTES = 1 << 20
# The longest a non-blocking connect may ask the agent to try before answering (``handover``):
# the program waits that long in its connect() for the chance of the connection's own socket.
MAX_HANDOVER_S = 1.0
# An idle agent client is dropped after this long without a request (listeners excepted).
IDLE_TIMEOUT_S = 3600.0


def agent_path(name: str) -> str:
    """Where node ``name`` serves its agent socket."""
    return os.path.join(run_dir(), f"{name}.agent")


class AgentServer(UnixServer):
    """Serves the agent protocol of ``node`` on a Unix socket until stopped."""

    def __init__(self, node, path: str) -> None:
        super().__init__(path)
        self._client_log = RateLimitedLog(log)  # (this module's logger)
        self.node = node
        self._next_port = EPHEMERAL_PORTS.start
        self._reserved: set = set()  # grid ports bound by programs that do not listen yet
        self._serving: set = set()  # grid ports that programs of this agent listen on
        # (port, client port) of a connection between two programs of this node -> set once the
        # listening program has it (see ANNOUNCE_WAIT_S), oldest first.
        self._announced: Dict[Tuple[int, int], gevent.event.Event] = {}
        # Grid port of this node -> connects to it by programs of this agent whose client has not
        # yet adopted its socket (or turned out not to), and the (port, client port) adopted since
        # (the listener announces those at once), oldest first; _changed is set at every change.
        self._inflight: Dict[int, int] = {}
        self._adopted: Dict[Tuple[int, int], None] = {}
        self._changed = gevent.event.Event()

    def _handle(self, conn) -> None:
        app = None
        reader = agentwire.AgentReader(wire.Control, peer="agent client")
        try:
            while True:
                with gevent.Timeout(IDLE_TIMEOUT_S, TimeoutError("idle agent client")):
                    message, app = _read_request(conn, reader)
                if message is None:
                    return
                if message.op == "listen":
                    self._listen(conn, message.args, reader, app)  # (app: where to announce, if given)
                    return  # the connection was the listener's; it is over
                if app is not None:
                    if message.op != "connect":
                        raise RemoteProtocolError(f"a descriptor came with {message.op!r}")
                    self._connect_into(conn, message.args, app, reader)
                    app = None
                    return
                if message.op == "connect":
                    self._connect(conn, message.args, reader)
                    continue
                fd = None
                try:
                    result, fd = self._op(message.op, message.args, conn)
                    reply = wire.ControlReply(True, result)
                except _Failure as exc:
                    reply = agentwire.failure(exc.errno, str(exc))
                try:
                    _send(conn, reply, fd)
                finally:
                    if fd is not None:
                        fd.close()
        except RemoteProtocolError as exc:
            self._client_log.warning("client", "dropping agent client: %s", exc)
        except (OSError, TimeoutError) as exc:
            log.debug("agent client gone: %s", exc)
        finally:
            if app is not None:
                app.close()
            reader.close()
            conn.close()

    # --- operations ----------------------------------------------------------------------------

    def _op(self, op: str, args: Dict[str, Any], conn=None):
        if op == "whoami":
            me = self.node.entry
            if me is None:
                raise _Failure("EHOSTUNREACH", f"node {self.node.name} has not joined its grid yet")
            return {"name": me.name, "node_id": me.node_id, "cluster": me.cluster, "ip": grid_ip(me.node_id)}, None
        if op == "resolve":
            entry = self._resolve(args.get("host"))
            return {"name": entry.name, "node_id": entry.node_id, "ip": grid_ip(entry.node_id)}, None
        raise _Failure("EINVAL", f"unknown agent operation {op!r} (whoami, resolve, connect, listen)")

    def _resolve(self, host: Any) -> wire.NodeEntry:
        if not isinstance(host, str) or not host or len(host.encode("utf-8", "replace")) > wire.MAX_ADDR_BYTES:
            raise _Failure("EAI_NONAME", f"bad host {_shown(host)}")
        name = grid_name(host) or host
        if is_grid_ip(name):
            matches = [e for e in self.node.directory if grid_ip(e.node_id) == name]
            if len(matches) > 1:
                raise _Failure("EAI_NONAME", f"grid address {name} is shared by "
                                             f"{', '.join(e.name for e in matches)}: use a name")
            entry = matches[0] if matches else None
        else:
            entry = self.node.directory.resolve(name)
        if entry is None:
            raise _Failure("EAI_NONAME", f"no node {name!r} in the grid of {self.node.name}")
        return entry

    def _connect_args(self, args: Dict[str, Any]):
        entry = self._resolve(args.get("host"))
        port, timeout, stack = args.get("port"), args.get("timeout"), args.get("stack")
        if type(port) is not int or not 0 < port < 65536:
            raise _Failure("EINVAL", f"bad port {_shown(port)}")
        if timeout is not None and not (type(timeout) in (int, float) and 0 < timeout < float("inf")):
            raise _Failure("EINVAL", f"bad timeout {_shown(timeout)}")
        if stack is not None and not (isinstance(stack, str) and len(stack.encode("utf-8", "replace")) <= wire.MAX_STACK_BYTES):
            raise _Failure("EINVAL", f"bad stack {_shown(stack)}")
        return entry, port, timeout, stack

    def _connect(self, conn, args: Dict[str, Any], reader: agentwire.AgentReader) -> None:
        """``connect``: answer with the connection's socket (confirmed, between programs of this
        node: :meth:`_confirm`), or the failure."""
        local: Optional[int] = None
        try:
            entry, port, timeout, stack = self._connect_args(args)
            local = self._begin_local(entry, port)
            try:
                sock, info = self.node.connect(entry.node_id, port, stack=stack, timeout=timeout, tcp_bridge=True)
            except ConfigError as exc:
                raise _Failure("EINVAL", str(exc)) from exc
            except ConnectError as exc:
                raise _Failure(_errno_of(exc), str(exc)) from exc
        except _Failure as exc:
            if local is not None:
                self._end_local(local)
            _send(conn, agentwire.failure(exc.errno, str(exc)))
            return
        try:
            self.node.assembler.hand_over(info, sock, _peer_pid(conn))  # listed until the program closes it
            self._confirm(conn, reader, self._connected(entry, port, info), sock, local)
        finally:
            sock.close()

    def _connected(self, entry: wire.NodeEntry, port: int, info) -> Dict[str, Any]:
        """The answer to a connect that succeeded: ``{peer, ip, port, local_port, stack, tried}``
        (``local_port``: the client port the server was told, what its getpeername() gives)."""
        return {"peer": entry.name, "ip": grid_ip(entry.node_id), "port": port,
                "local_port": info.detail.get("client_port"), "stack": info.stack,
                "tried": [list(t) for t in info.detail.get("tried", [])]}

    def _confirm(self, conn, reader: agentwire.AgentReader, result: Dict[str, Any], sock, local: Optional[int]) -> None:
        """Send ``result`` with ``sock``. Between programs of this node (``local``: the port, a
        connect counted by :meth:`_begin_local`) the answer says ``confirm: true``: the client
        puts the socket in place and sends ``adopted``; the listener is told of the connection
        then (not before: the server cannot accept before the client's socket is connected), and
        once it has been, the client gets ``{}`` and its connect returns (the connection is in the
        server's backlog, as on TCP's loopback). A client that closes instead (one that predates
        the confirmation) counts as having adopted its socket."""
        client_port = result.get("local_port")
        if local is None or not client_port:
            if local is not None:
                self._end_local(local)
            _send(conn, wire.ControlReply(True, result), sock)
            return
        message = None
        try:
            _send(conn, wire.ControlReply(True, dict(result, confirm=True)), sock)
            with gevent.Timeout(ADOPT_WAIT_S, TimeoutError(f"no adopted within {ADOPT_WAIT_S:g} s")):
                message, fd = _read_request(conn, reader)
            if fd is not None:
                fd.close()
                raise RemoteProtocolError("a descriptor came with adopted", peer="agent client")
            if message is not None and message.op != "adopted":
                raise RemoteProtocolError(f"expected adopted after a connect, got {message.op!r}", peer="agent client")
        finally:
            self._end_local(local, client_port)
        if message is None:
            return  # (the client went away, or predates the confirmation)
        self._await_announced(local, client_port)
        _send(conn, wire.ControlReply(True, {}))

    def _begin_local(self, entry: wire.NodeEntry, port: int) -> Optional[int]:
        """Count a connect to ``port`` of this node that a program of this agent serves (the
        listener waits for such connects to be adopted: :meth:`_await_adopted`); return the port,
        or None for any other connect."""
        if entry.node_id != self.node.node_id or port not in self._serving:
            return None
        self._inflight[port] = self._inflight.get(port, 0) + 1
        return port

    def _end_local(self, port: int, client_port: Optional[int] = None) -> None:
        """A connect counted by :meth:`_begin_local` is resolved: its socket was adopted by the
        client (``client_port``), or it failed, or it is bridged (None)."""
        if client_port:
            self._adopted[(port, client_port)] = None
            while len(self._adopted) > MAX_ANNOUNCED:
                self._adopted.pop(next(iter(self._adopted)))
        left = self._inflight.get(port, 0) - 1
        if left > 0:
            self._inflight[port] = left
        else:
            self._inflight.pop(port, None)
        changed, self._changed = self._changed, gevent.event.Event()
        changed.set()

    def _await_adopted(self, port: int, client_port: int) -> None:
        """In the listener of ``port``: wait (at most ADOPT_WAIT_S) until the connection from
        ``client_port`` (of this node) was adopted by its client, or no connect of a program of
        this agent to the port is unresolved (it came from elsewhere: Node.connect, a forward)."""
        deadline = time.monotonic() + ADOPT_WAIT_S
        while (port, client_port) not in self._adopted and self._inflight.get(port):
            left = deadline - time.monotonic()
            if left <= 0:
                log.info("agent: connection from client port %d to grid port %d not adopted within %g s",
                         client_port, port, ADOPT_WAIT_S)
                break
            self._changed.wait(left)
        self._adopted.pop((port, client_port), None)

    def _announced_event(self, port: int, client_port: int) -> gevent.event.Event:
        event = self._announced.get((port, client_port))
        if event is None:
            event = self._announced[(port, client_port)] = gevent.event.Event()
            while len(self._announced) > MAX_ANNOUNCED:
                self._announced.pop(next(iter(self._announced)))
        return event

    def _await_announced(self, port: int, client_port: int) -> None:
        """Wait (at most ANNOUNCE_WAIT_S) until the connection from ``client_port`` to ``port`` of
        this node has been announced to the program listening there."""
        event = self._announced_event(port, client_port)
        try:
            if not event.wait(ANNOUNCE_WAIT_S):
                log.info("agent: connection from client port %d to grid port %d not announced within %g s",
                         client_port, port, ANNOUNCE_WAIT_S)
        finally:
            self._announced.pop((port, client_port), None)

    def _connect_into(self, conn, args: Dict[str, Any], app, reader: agentwire.AgentReader) -> None:
        """``connect`` for a non-blocking connect: the application sent its end of a socketpair,
        whose send buffer it filled with ``filler`` bytes so that it does not look writable.

        With ``handover`` (seconds, at most MAX_HANDOVER_S): a connection made within that long
        is answered as a blocking ``connect`` is, its socket attached (the kernel's TCP socket
        for a plain ``tcp`` stack), and the socketpair end is closed; a failure within that
        long is answered as such (a connection between programs of this node is confirmed:
        :meth:`_confirm`). Else (or without ``handover``) the agent first answers
        ``{pending: true}``, and then as below.

        Answer first, then drain the filler (on success: the application sees its socket turn
        writable and finds the answer waiting) or close the end (on failure: the same, and its
        reads see EOF); on success, bridge the connection's stream to it."""
        filler, handover = args.get("filler"), args.get("handover")
        opening: Optional[gevent.Greenlet] = None
        local: Optional[int] = None
        try:
            if type(filler) is not int or not 0 <= filler <= MAX_FILLER_BYTES:
                raise _Failure("EINVAL", f"bad filler {_shown(filler)}")
            if handover is not None and (type(handover) not in (int, float) or not 0 <= handover <= MAX_HANDOVER_S):
                raise _Failure("EINVAL", f"bad handover {_shown(handover)}")
            entry, port, timeout, stack = self._connect_args(args)
            if handover is not None:
                local = self._begin_local(entry, port)
            opening = gevent.spawn(self._open_stream, entry, port, stack, timeout)
            if handover is not None:
                opening.join(handover)
                if opening.ready():
                    stream, info = _outcome(opening)
                    local, counted = None, local
                    self._hand_over_now(conn, reader, entry, port, stream, info, counted)
                    app.close()
                    return
                if local is not None:  # (bridged: our end is the program's socket already)
                    self._end_local(local)
                    local = None
                _send(conn, wire.ControlReply(True, {"pending": True}))
            opening.join()
            stream, info = _outcome(opening)
            try:
                result = self._connected(entry, port, info)
                if result["local_port"] and entry.node_id == self.node.node_id and port in self._serving:
                    self._await_announced(port, result["local_port"])
                _send(conn, wire.ControlReply(True, result))
            except BaseException:
                stream.close()  # (the client went away: nobody will take it)
                raise
        except _Failure as exc:
            _send(conn, agentwire.failure(exc.errno, str(exc)))
            app.close()
            return
        finally:
            if local is not None:
                self._end_local(local)
            if opening is not None and not opening.ready():  # (the client went away meanwhile)
                opening.kill()
        try:
            with gevent.Timeout(IDLE_TIMEOUT_S, TimeoutError("filler not drained")):
                left = filler
                while left:
                    chunk = app.recv(min(left, 65536))
                    if not chunk:
                        raise OSError(errno.ECONNRESET, "application closed before the connection was up")
                    left -= len(chunk)
        except (OSError, TimeoutError) as exc:
            log.info("agent: non-blocking connect to %s abandoned: %s", entry.name, exc)
            stream.close()
            app.close()
            return
        bridge = Bridge(stream, app, -1, f"{entry.name}:{port}")
        self.node.assembler.hand_over(info, None, _peer_pid(conn), bridge=bridge)

    def _open_stream(self, entry: wire.NodeEntry, port: int, stack: Optional[str], timeout: Optional[float]):
        """``node.open_stream``'s ``(stream, info)``, or its failure as a _Failure (returned, not
        raised: it runs in a greenlet of its own, whose outcome :func:`_outcome` gives)."""
        try:
            return self.node.open_stream(entry.node_id, port, stack=stack, timeout=timeout)
        except ConfigError as exc:
            return _Failure("EINVAL", str(exc))
        except ConnectError as exc:
            return _Failure(_errno_of(exc), str(exc))

    def _hand_over_now(self, conn, reader: agentwire.AgentReader, entry: wire.NodeEntry, port: int, stream, info,
                       local: Optional[int]) -> None:
        """Answer a non-blocking connect made within its ``handover`` time as a blocking one:
        the socket a blocking connect gets (the kernel's TCP socket for a plain stack, else a
        loopback TCP bridge end) goes with the answer, confirmed as a blocking connect's is
        (``local``: counted by :meth:`_begin_local`, resolved here)."""
        try:
            plain = not Stack.parse(info.stack, self.node.assembler.registry).filters
            sock, bridge = hand_out(stream, plain=plain, name=f"{entry.name}:{port}", tcp=True)
        except BaseException:
            if local is not None:
                self._end_local(local)
            raise
        info.detail["bridged"] = bridge is not None  # (as Assembler.connect says of its sockets)
        try:
            self.node.assembler.hand_over(info, sock, _peer_pid(conn), bridge=bridge)
            self._confirm(conn, reader, self._connected(entry, port, info), sock, local)
        finally:
            sock.close()

    def _listen(self, conn, args: Dict[str, Any], reader: agentwire.AgentReader, announce=None) -> None:
        """``listen``: serve the port until the client closes ``conn`` (or ``announce``, the
        socketpair end the announcements go to instead of ``conn``, is closed at the other end).
        The caller closes ``announce``."""
        port = args.get("port")
        if type(port) is not int or not 0 <= port < 65536:
            _send(conn, agentwire.failure("EINVAL", f"bad port {port!r}"))
            return
        if args.get("deferred"):
            if announce is not None:
                raise RemoteProtocolError("a descriptor came with a deferred listen", peer="agent client")
            reserved = self._reserve(conn, port, reader)
            if reserved is None:
                return
            port, announce = reserved
            if announce is not None:  # (served as a listen that came with it; ours to close)
                try:
                    self._listen(conn, {"port": port}, reader, announce)
                finally:
                    announce.close()
                return
        try:
            listener = self.node.listen(port or self._free_port())
        except ConfigError as exc:
            _send(conn, agentwire.failure("EADDRINUSE", str(exc)))
            return
        me = self.node.entry
        _send(conn, wire.ControlReply(True, {"port": listener.port, "ip": grid_ip(me.node_id) if me else None}))
        watchers = [gevent.spawn(_wait_closed, end) for end in (conn, announce) if end is not None]
        pid = _peer_pid(conn)
        self._serving.add(listener.port)
        try:
            while not any(watcher.ready() for watcher in watchers):
                accepting = gevent.spawn(listener.accept, tcp_bridge=True)
                both: List[gevent.Greenlet] = [accepting, *watchers]
                gevent.joinall(both, count=1)
                if not accepting.ready():
                    accepting.kill()
                    break
                sock, info = accepting.get()
                peer = self.node.directory.get(info.peer_id)
                client_port = info.detail.get("client_port")
                if client_port and info.peer_id == self.node.node_id:  # a program of this node's
                    self._await_adopted(info.port, client_port)
                result = {"peer": info.peer_name, "ip": grid_ip(info.peer_id), "port": info.port,
                          "peer_port": client_port or PEER_PORTS.start + info.conn % len(PEER_PORTS),
                          "stack": info.stack, "cluster": peer.cluster if peer else None}
                self.node.assembler.hand_over(info, sock, pid)  # listed until the program closes it
                try:
                    _send(conn if announce is None else announce, wire.ControlReply(True, result), sock)
                finally:
                    sock.close()
                if client_port and info.peer_id == self.node.node_id:  # its connect may return now
                    self._announced_event(info.port, client_port).set()
        except (OSError, GridsockError) as exc:
            log.info("agent listener on grid port %d ends: %s", listener.port, exc)
        finally:
            self._serving.discard(listener.port)
            for watcher in watchers:
                watcher.kill()
            listener.close()

    def _reserve(self, conn, port: int, reader: agentwire.AgentReader):
        """``listen {port, deferred}``: hold ``port`` (0: a free one) without serving it until the
        client's ``listen {port}``; return ``(port, the descriptor that came with that listen, as a
        socket, or None)`` then, or None if the client went away (or the port is taken: the
        failure is sent). Raises RemoteProtocolError for another request."""
        try:
            port = port or self._free_port()
        except ConfigError as exc:
            _send(conn, agentwire.failure("EADDRINUSE", str(exc)))
            return None
        if port in self.node.assembler.listeners or port in self._reserved:
            _send(conn, agentwire.failure("EADDRINUSE", f"port {port} of node {self.node.name} is already served"))
            return None
        self._reserved.add(port)
        try:
            me = self.node.entry
            _send(conn, wire.ControlReply(True, {"port": port, "ip": grid_ip(me.node_id) if me else None}))
            message, announce = _read_request(conn, reader)
            if message is None:
                return None  # closed while bound: the port is free again
            if message.op != "listen" or message.args.get("port") != port or message.args.get("deferred"):
                if announce is not None:
                    announce.close()
                raise RemoteProtocolError(f"expected listen {{port: {port}}} on a bound port, got {message.op!r}",
                                          peer="agent client")
        finally:
            self._reserved.discard(port)
        return port, announce

    def _free_port(self) -> int:
        for _ in range(len(EPHEMERAL_PORTS)):
            port = self._next_port
            self._next_port = port + 1 if port + 1 < EPHEMERAL_PORTS.stop else EPHEMERAL_PORTS.start
            if port not in self.node.assembler.listeners and port not in self._reserved \
                    and not self.node.assembler.expected_back(port):  # (a program's after a restart)
                return port
        raise ConfigError("no free grid port")


def _shown(value: Any) -> str:
    """A client's bad argument, as a reason may quote it: short (never a whole container)."""
    if isinstance(value, str):
        return repr(value[:40]) + ("..." if len(value) > 40 else "")
    if isinstance(value, (bool, int, float)) and len(str(value)) <= 40:
        return repr(value)
    return f"a {type(value).__name__}"


class _Failure(Exception):
    def __init__(self, errno_name: str, reason: str) -> None:
        super().__init__(reason)
        self.errno = errno_name


def _outcome(opening: gevent.Greenlet):
    """What the finished greenlet of :meth:`AgentServer._open_stream` made: ``(stream, info)``;
    raises its _Failure."""
    result = opening.get()
    if isinstance(result, _Failure):
        raise result
    return result


def _errno_of(exc: ConnectError) -> str:
    """The errno name a program gets for a failed connect (chosen from the refusal code)."""
    return errno.errorcode[errno_of(exc)]


def _read_request(conn, reader: agentwire.AgentReader):
    """One request from a client, and the socketpair end that came with it (as a gevent socket),
    or ``(None, None)`` when the client closes between requests. Raises RemoteProtocolError for
    bad input, a descriptor that is not a Unix stream socket included."""
    got = agentwire.recv_message(conn, reader)
    if got is None:
        return None, None
    message, fd = got
    if fd is None:
        return message, None
    if not _is_stream_socket(fd):
        os.close(fd)
        raise RemoteProtocolError(f"{message.op!r} came with a descriptor that is not a Unix stream socket",
                                  peer="agent client")
    return message, gsocket.socket(fileno=fd)


def _is_stream_socket(fd: int) -> bool:
    try:
        probe = socket.socket(fileno=os.dup(fd))
    except OSError:
        return False
    try:
        return probe.type == socket.SOCK_STREAM and probe.family == socket.AF_UNIX
    finally:
        probe.close()


def _peer_pid(conn) -> Optional[int]:
    """The pid of the process at the other end of agent connection ``conn`` (SO_PEERCRED), or
    None where the platform does not say."""
    if conn is None or not hasattr(socket, "SO_PEERCRED"):
        return None
    try:
        pid, _, _ = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
    except OSError:
        return None
    return int(pid) or None


def _wait_closed(conn) -> None:
    """Return when the client closes its end (anything it sends on a listener is ignored)."""
    while True:
        try:
            if not conn.recv(4096):
                return
        except OSError:
            return


def _send(conn, reply: wire.ControlReply, sock: Optional[socket.socket] = None) -> None:
    agentwire.send_frame(conn, agentwire.encode_reply(reply), None if sock is None else sock.fileno())
