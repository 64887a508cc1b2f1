"""The client of the agent protocol: ask the node of this host for names and connections.

Theory of operation
-------------------
Every node serves an *agent* socket, ``<run dir>/<name>.agent`` (:mod:`gridsock.agent`), and
``gridsock run --node NAME -- program`` names it to the program in ``$GRIDSOCK_AGENT``.
:class:`AgentClient` is the program's side: blocking calls on stdlib sockets, no gevent, no
grid protocol, safe from any thread. The socket personality (:mod:`gridsock.personalities.socket`)
is built on it, and so may any program that wants grid connections without patching::

    agent = AgentClient.from_env()            # None if $GRIDSOCK_AGENT is not set
    agent.whoami()                             # {"name": "a2", "node_id": ..., "cluster": "A", "ip": "24x.x.x.x"}
    sock, info = agent.connect("b2", 8000)     # a connected socket.socket; info["stack"] says how
    with agent.listen(0) as listener:          # serve a grid port of this node (0: the agent picks)
        conn, info = listener.accept()         # a connected socket.socket; info["peer"] names the client

Each call opens its own connection to the agent (a listener keeps its own, and a socketpair on
which the agent announces its connections: see :class:`AgentListener`). Frames,
descriptor passing and the errno mapping are :mod:`gridsock.agentwire`'s. Errors are the
stdlib's: ``ConnectionRefusedError`` (no agent at the path; nothing listens on the grid port;
the server's policy refused), ``TimeoutError``, ``OSError`` (``EHOSTUNREACH``: every method
failed; ``EADDRINUSE``: the grid port is taken; ``EINVAL``: a bad argument),
``socket.gaierror(EAI_NONAME)`` (a name the grid does not know), ``ConnectionResetError`` (the
agent broke the protocol or went away).

Node restarts
-------------
A listener outlives its node: when the node behind the agent goes away (killed, restarted
with its state directory), a keeper thread of the listener reconnects with backoff
(:data:`RECONNECT_FIRST_S` doubling up to :data:`RECONNECT_MAX_S`, for at most
:data:`RECONNECT_GIVE_UP_S`) and registers the same grid port again, announced on the same
socketpair end: the program's listening socket (its descriptor, a selector's registration, a
thread blocked in ``accept()``) never changes and just waits meanwhile. Only if the keeper
gives up (the node does not come back in time, or the port is taken by then) does the
listener read EOF (``accept()``: ``ConnectionResetError``). Every other call is one request on
a connection of its own and fails as it would have (``ConnectionRefusedError`` while no agent
answers); connections made through the old node break as breaks are (:mod:`gridsock.bridge`).
"""
from __future__ import annotations

import _socket
import errno
import logging
import os
import select
import socket
import threading
import time
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

from . import agentwire, wire
from .errors import RemoteProtocolError
from .names import LocalTrustError, connect_private

__all__ = ["AgentClient", "AgentChannel", "AgentListener", "confirm", "AGENT_ENV", "AGENT_TIMEOUT_S", "NAME_CACHE_S",
           "RECONNECT_FIRST_S", "RECONNECT_MAX_S", "RECONNECT_GIVE_UP_S"]

log = logging.getLogger(__name__)

#: The environment variable naming the agent socket (``gridsock run`` sets it; children inherit it).
AGENT_ENV = "GRIDSOCK_AGENT"
#: An agent call that is not a connect answers within this long.
AGENT_TIMEOUT_S = 10.0
#: Name lookups (hits and misses) are remembered this long: a program resolving in a loop does
#: not ask the agent every time, and a node that joins is seen within this long.
NAME_CACHE_S = 5.0
# Names remembered at most (a program scanning host names does not grow the cache forever).
MAX_CACHED_NAMES = 4096
#: A listener whose node went away first tries its agent again after this long (a restarting
#: node serves its agent within a second or so: the first tries are quick)...
RECONNECT_FIRST_S = 0.05
#: ...then twice as long after each failure, up to this long between tries (a try is one
#: connect() to a Unix socket path: cheap, but a node that is down for long is not polled hot).
RECONNECT_MAX_S = 1.0
#: A listener gives up on its node after this long without one: its program's accept() then
#: reads EOF, as it did before listeners came back (a node that is gone for good).
RECONNECT_GIVE_UP_S = 600.0
# How long release() waits for the keeper thread to see the agent close the port.
_RELEASE_WAIT_S = AGENT_TIMEOUT_S

_DEFAULT: Any = object()  # "the client's own timeout"


class AgentChannel:
    """One connection to an agent: requests out, replies (with their descriptors) in.

    ``sock`` is the connected Unix stream socket; the channel owns it (:meth:`close` closes
    it). Descriptors that come with replies are returned as sockets of ``socket_class``
    (default: the ``socket`` module's class).
    """

    def __init__(self, sock, *, socket_class=None) -> None:
        self.sock = sock
        self._socket_class = socket_class
        self._reader = agentwire.AgentReader(wire.ControlReply, peer="agent")

    def fileno(self) -> int:
        return self.sock.fileno()

    def settimeout(self, timeout: Optional[float]) -> None:
        self.sock.settimeout(timeout)

    def send(self, op: str, args: Optional[dict] = None, *, fd: Optional[int] = None) -> None:
        """Send request ``op`` with ``args`` and descriptor ``fd`` (the caller keeps its copy).
        Raises OSError from the socket, LocalProtocolError for args the protocol cannot carry."""
        agentwire.send_frame(self.sock, agentwire.encode_request(op, args), fd)

    def receive(self) -> Tuple[Any, Optional[socket.socket]]:
        """The next reply: ``(result, socket or None)``; the socket (the descriptor that came
        with the reply) is the caller's.

        Raises the stdlib exception a failure names (see the module docstring);
        ``ConnectionResetError`` if the agent closed the connection or broke the protocol;
        ``TimeoutError`` or ``BlockingIOError`` (before a reply has begun) as the socket does.
        """
        try:
            got = agentwire.recv_message(self.sock, self._reader, wait_s=AGENT_TIMEOUT_S)
        except RemoteProtocolError as exc:
            raise ConnectionResetError(errno.ECONNRESET, f"agent: {exc}") from None
        if got is None:
            raise ConnectionResetError(errno.ECONNRESET, "agent closed the connection")
        reply, fd = got
        if not reply.ok:
            if fd is not None:
                os.close(fd)
            raise agentwire.error_for(reply)
        if fd is None:
            return reply.result, None
        cls = self._socket_class or socket.socket
        try:
            return reply.result, cls(fileno=fd)
        except BaseException:
            os.close(fd)
            raise

    def accept(self) -> Tuple[socket.socket, dict]:
        """The next connection announced on a listener: ``(socket, info)``, info
        ``{peer, ip, port, peer_port, stack, cluster}``. Raises as :meth:`receive`, and
        ``ConnectionResetError`` for an announcement without its descriptor."""
        result, sock = self.receive()
        if sock is None:
            raise ConnectionResetError(errno.ECONNRESET, "agent announced a connection without its descriptor")
        return sock, result

    def release(self, timeout: float = AGENT_TIMEOUT_S) -> None:
        """Close, after waiting (at most ``timeout``) until the agent has closed its end: once a
        listener is released, its grid port is free. Announcements still queued are dropped
        with their descriptors. Never raises OSError."""
        sock = self.sock
        try:
            sock.setblocking(True)
            sock.shutdown(socket.SHUT_WR)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and select.select([sock], [], [], deadline - time.monotonic())[0]:
                if not sock.recv(65536):
                    break
        except OSError:
            pass
        finally:
            self.close()

    def close(self) -> None:
        self._reader.close()
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def confirm(channel: AgentChannel) -> None:
    """Tell the agent that the socket its answer to a connect carried is in place (``adopted``)
    and wait for its ``{}``: the server's listener has the connection then. Raises as
    :meth:`AgentChannel.receive`."""
    channel.send("adopted")
    result, sock = channel.receive()
    if sock is not None:
        sock.close()


class AgentListener(AgentChannel):
    """A grid port this node serves for us (:meth:`AgentClient.listen`): ``port`` and ``ip``
    (this node's grid address) say where; :meth:`accept` takes the next connection. The
    listener is readable (``select``) exactly when a connection waits; :meth:`release` (or
    :meth:`close`) stops the node serving the port.

    Theory of operation: the listener holds a *control* connection to the agent (the listen
    request and its answer; the agent serves the port while it is open) and one end of a Unix
    socketpair, ``sock``, on which the agent announces connections (the other end went to the
    agent with the request; the listener keeps a copy). ``sock`` is ours, not the agent's, so it
    outlives the node: once serving (:meth:`start`, or a listen that was not deferred), a
    keeper thread waits for the agent to close the control connection; if nobody released the
    listener, it reconnects (see "Node restarts" in the module docstring) and sends the same
    listen with the same end. ``reconnects`` counts the times it did.

    :meth:`hand_off` gives ``sock`` away (the socket personality puts it in place of the
    program's listening socket): the port is then served, and kept through restarts, until that
    descriptor is closed everywhere or the listener is released.
    """

    port: int
    ip: Optional[str]

    def __init__(self, client: "AgentClient", control: AgentChannel) -> None:
        ours, theirs = _socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        cls = client.socket_class or socket.socket
        super().__init__(cls(fileno=ours.detach()), socket_class=client.socket_class)
        self.sock.settimeout(client.timeout)  # (accept() waits as long as any call of the client)
        self._theirs = cls(fileno=theirs.detach())
        self._client = client
        self._control = control
        self._lock = threading.Lock()  # guards _control (the keeper swaps it) and the closing of both
        self._stop = threading.Event()  # released: the keeper must not reconnect
        self._ended = threading.Event()  # the keeper is done (its agent closed the port, or it gave up)
        self._keeper: Optional[threading.Thread] = None
        self._keeper_pid = 0
        self.give_up_s = client.reconnect_give_up_s
        self.reconnects = 0

    def _serve(self, control: AgentChannel, args: dict) -> None:
        """Send ``listen args`` on ``control`` (with our announcement end unless it is a deferred
        one) and take the answer's ``port`` and ``ip``. Raises what the agent answers."""
        control.send("listen", args, fd=None if args.get("deferred") else self._theirs.fileno())
        result, sock = control.receive()
        if sock is not None:
            sock.close()
        self.port, self.ip = result["port"], result.get("ip") or getattr(self, "ip", None)

    def _request(self, port: int, deferred: bool) -> None:
        """The first listen (:meth:`AgentClient.listen`); raises what the agent answers."""
        self._serve(self._control, {"port": int(port), "deferred": True} if deferred else {"port": int(port)})
        if not deferred:
            self._keep()

    def start(self) -> None:
        """Start serving the port of a listener made with ``listen(port, deferred=True)`` (which
        only reserved it: connections to it were refused until now). If the node went away
        since, its successor is asked (once). Raises what :meth:`AgentClient.listen` raises."""
        try:
            self._serve(self._control, {"port": self.port})
        except (BrokenPipeError, ConnectionResetError):
            control = self._client.open()
            with self._lock:
                old, self._control = self._control, control
            old.close()
            self._serve(control, {"port": self.port})
        self._keep()

    def hand_off(self) -> int:
        """Give the announcement end away: return a descriptor of it (the caller's; the listener
        closes its own copy), on which connections are announced as :meth:`accept` reads them.
        The port is served until that descriptor is closed everywhere (or :meth:`release`)."""
        fd = os.dup(self.sock.fileno())
        self.sock.close()
        return fd

    def _keep(self) -> None:
        self._control.settimeout(None)  # (the keeper waits on it for as long as the port is served)
        self._keeper_pid = os.getpid()
        self._keeper = threading.Thread(target=self._keep_serving, name=f"gridsock-listener-{self.port}",
                                        daemon=True)
        self._keeper.start()

    def _keep_serving(self) -> None:
        try:
            while True:
                _wait_closed(self._control.sock)
                if self._stop.is_set() or _peer_closed(self._theirs):
                    return
                control = self._reconnect()
                if control is None:
                    return
                with self._lock:
                    old, self._control = self._control, control
                    old.close()
                    if self._stop.is_set():  # released while we reconnected: release this one too
                        _shutdown(control.sock, socket.SHUT_WR)
        finally:
            with self._lock:
                self._control.close()
                self._theirs.close()
            self._ended.set()

    def _reconnect(self) -> Optional[AgentChannel]:
        """Listen on the same port, with the same end, through the agent at our client's path once
        one answers (backoff: RECONNECT_FIRST_S doubling to RECONNECT_MAX_S, up to ``give_up_s``);
        the new control connection, or None (released, our end closed, or given up)."""
        log.info("agent %s went away: grid port %d waits for it to come back", self._client.path, self.port)
        deadline = time.monotonic() + self.give_up_s
        delay = RECONNECT_FIRST_S
        while not self._stop.is_set() and not _peer_closed(self._theirs):
            try:
                control = self._client.open()
            except PermissionError as exc:  # (LocalTrustError: not our user's agent any more)
                log.warning("grid port %d: %s; the listener gives up", self.port, exc)
                return None
            except OSError:
                control = None
            if control is not None:
                try:
                    self._serve(control, {"port": self.port})
                except (ConnectionError, TimeoutError) as exc:  # (the node is still starting, or went again)
                    control.close()
                    log.debug("grid port %d: agent not ready: %s", self.port, exc)
                except OSError as exc:  # EADDRINUSE (another program took the port meanwhile), EINVAL
                    control.close()
                    log.warning("grid port %d is not served again: %s", self.port, exc)
                    return None
                except BaseException:
                    control.close()
                    raise
                else:
                    self.reconnects += 1
                    self._client._forget()  # (the node may not be the same one)
                    control.settimeout(None)
                    log.info("agent %s is back: grid port %d is served again", self._client.path, self.port)
                    return control
            if time.monotonic() + delay > deadline:
                log.warning("grid port %d: no agent at %s for %g s; the listener gives up", self.port,
                            self._client.path, self.give_up_s)
                return None
            self._stop.wait(delay)
            delay = min(delay * 2, RECONNECT_MAX_S)
        return None

    def release(self, timeout: float = AGENT_TIMEOUT_S) -> None:
        """Stop serving the port and close, after waiting (at most ``timeout``) until the agent has
        closed its end: once a listener is released, its grid port is free. Announcements still
        queued are dropped with their descriptors. Never raises OSError."""
        self._stop.set()
        keeper = self._keeper
        if keeper is None or self._keeper_pid != os.getpid():  # (not serving, or a forked child)
            with self._lock:
                control = self._control
            control.release(timeout)
            self._theirs.close()
        else:
            with self._lock:
                _shutdown(self._control.sock, socket.SHUT_WR)
            self._ended.wait(timeout)
        self._reader.close()
        self.sock.close()

    def close(self) -> None:
        """Stop serving the port and close, without waiting for the agent."""
        self._stop.set()
        with self._lock:
            if self._keeper is not None and self._keeper_pid == os.getpid():
                _shutdown(self._control.sock, socket.SHUT_RDWR)  # (wakes the keeper, which closes)
            else:
                self._control.close()
                self._theirs.close()
        super().close()


def _wait_closed(sock) -> None:
    """Return when the other end of ``sock`` closes (or it fails); what comes is dropped."""
    while True:
        try:
            if not sock.recv(4096):
                return
        except InterruptedError:
            continue
        except OSError:
            return


def _peer_closed(sock) -> bool:
    """Whether every descriptor of the other end of socketpair end ``sock`` is closed."""
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except (BlockingIOError, InterruptedError):
        return False
    except OSError:
        return True


def _shutdown(sock, how: int) -> None:
    try:
        sock.shutdown(how)
    except OSError:
        pass


class AgentClient:
    """The agent at ``path``: blocking calls, each on a connection of its own; thread-safe.

    ``socket_class``: the class of the sockets it makes and returns (default: the ``socket``
    module's class when called; the personality passes the original class). ``timeout``: how
    long a call other than ``connect`` may take. ``name_cache_s``: how long :meth:`lookup`
    remembers an answer. ``reconnect_give_up_s``: how long a listener made from now on waits
    for its node to come back (see "Node restarts" in the module docstring).
    """

    def __init__(self, path: str, *, socket_class=None, timeout: Optional[float] = AGENT_TIMEOUT_S,
                 name_cache_s: float = NAME_CACHE_S, reconnect_give_up_s: float = RECONNECT_GIVE_UP_S) -> None:
        self.path = path
        self.socket_class = socket_class
        self.timeout = timeout
        self.name_cache_s = name_cache_s
        self.reconnect_give_up_s = reconnect_give_up_s
        self._names: Dict[str, Tuple[float, Optional[dict]]] = {}
        self._me: Optional[dict] = None
        self._lock = threading.Lock()

    @classmethod
    def from_env(cls, environ: Optional[Mapping[str, str]] = None, **kwargs: Any) -> Optional["AgentClient"]:
        """A client of the agent ``$GRIDSOCK_AGENT`` names (in ``environ``, default
        ``os.environ``), or None if it names none. ``kwargs`` go to the constructor."""
        path = (os.environ if environ is None else environ).get(AGENT_ENV)
        return cls(path, **kwargs) if path else None

    def __repr__(self) -> str:
        return f"AgentClient({self.path!r})"

    def open(self, *, timeout: Optional[float] = _DEFAULT) -> AgentChannel:
        """A new connection to the agent (socket timeout ``timeout``, default the client's).
        Raises ConnectionRefusedError if no agent answers at ``path``; LocalTrustError (a
        PermissionError) if the socket or its directory is not this user's, or its server runs
        as another user."""
        cls = self.socket_class or socket.socket
        sock = cls(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout if timeout is _DEFAULT else timeout)
            connect_private(sock, self.path)  # only our user's socket, served by our user or root
        except LocalTrustError:
            sock.close()
            raise
        except OSError as exc:
            sock.close()
            raise ConnectionRefusedError(errno.ECONNREFUSED,
                                         f"no gridsock agent at {self.path}: {exc.strerror or exc}") from None
        return AgentChannel(sock, socket_class=self.socket_class)

    def call(self, op: str, args: Optional[dict] = None, *, timeout: Optional[float] = _DEFAULT) -> Any:
        """Run ``op`` (one of :data:`gridsock.agentwire.OPS` but ``listen``) and return its result;
        a descriptor that comes with it is closed. Raises the stdlib exception the agent names."""
        with self.open(timeout=timeout) as channel:
            channel.send(op, args)
            result, sock = channel.receive()
        if sock is not None:
            sock.close()
        return result

    def _forget(self) -> None:
        """Drop what was learnt from the node (a listener found it restarted)."""
        with self._lock:
            self._me = None
            self._names.clear()

    def whoami(self) -> dict:
        """This node: ``{name, node_id, cluster, ip}`` (asked once, then remembered).
        Raises OSError(EHOSTUNREACH) while the node has not joined its grid."""
        if self._me is None:
            self._me = self.call("whoami")
        return self._me

    def resolve(self, host: str) -> dict:
        """``{name, node_id, ip}`` of the node ``host`` names (a node name, ``NAME.grid`` or a
        grid address). Raises ``socket.gaierror(EAI_NONAME)`` if the grid knows no such node."""
        return self.call("resolve", {"host": host})

    def lookup(self, host: str) -> Optional[dict]:
        """:meth:`resolve`, or None for a host the grid does not know; answers (hits and misses)
        are remembered ``name_cache_s``. Raises what :meth:`resolve` raises but gaierror."""
        now = time.monotonic()
        with self._lock:
            hit = self._names.get(host)
        if hit is not None and hit[0] > now:
            return hit[1]
        try:
            found: Optional[dict] = self.resolve(host)
        except socket.gaierror:
            found = None
        with self._lock:
            if len(self._names) >= MAX_CACHED_NAMES:
                self._names.clear()
            self._names[host] = (now + self.name_cache_s, found)
        return found

    def connect(self, host: str, port: int, *, timeout: Optional[float] = None, stack: Optional[str] = None,
                adopt: Optional[Callable[[socket.socket], None]] = None) -> Tuple[socket.socket, dict]:
        """A connection to grid port ``port`` of node ``host``: ``(socket, info)``, info
        ``{peer, ip, port, local_port, stack, tried}`` (``local_port``: the client port the
        server's accept reports as its peer's, or None from an older agent). The socket is a
        connected TCP socket: the kernel's own to the peer for a plain ``tcp`` stack, else one
        the node bridges to the stack.

        ``timeout``: how long the node may try (None: its default); ``stack``: a stack string
        instead of the node's rules. Raises ``socket.gaierror`` (unknown node),
        ``ConnectionRefusedError`` (nothing listens, or the server's policy refused),
        ``TimeoutError``, ``OSError(EHOSTUNREACH)`` (every method failed), ``OSError(EINVAL)``.

        ``adopt``: called with the socket as soon as it comes (the personality puts it in place
        of the program's own). To a program of this node, the agent then confirms (its answer
        says ``confirm``): we send ``adopted`` and return once the server's listener has the
        connection, as a loopback TCP connect returns once the connection is in the backlog.
        """
        with self.open(timeout=None) as channel:
            channel.send("connect", {"host": host, "port": int(port), "timeout": timeout, "stack": stack})
            result, sock = channel.receive()
            if sock is None:
                raise ConnectionResetError(errno.ECONNRESET, "agent answered a connect without its descriptor")
            if adopt is not None:
                adopt(sock)
            if result.get("confirm"):
                confirm(channel)
        return sock, result

    def connect_into(self, host: str, port: int, end: int, *, filler: int, timeout: Optional[float] = None,
                     stack: Optional[str] = None, handover: Optional[float] = None) -> AgentChannel:
        """Start a connection to ``host:port`` that arrives on descriptor ``end`` (one end of a
        Unix socketpair whose other end's send buffer holds ``filler`` bytes; the caller keeps
        its copy of ``end``); return at once. The agent answers on the returned channel
        (:meth:`AgentChannel.receive`: ``info`` as :meth:`connect`'s, or the error), then reads
        the filler away and bridges the connection to ``end`` (on failure it closes ``end``):
        the caller's end turns writable only once the answer is waiting. The personality's
        non-blocking ``connect()`` is built on it.

        ``handover`` (seconds, at most 1): a connection the agent makes within that long comes
        as the first answer with its own socket attached, as :meth:`connect`'s does (the agent
        closes ``end``; a failure within that long is the first answer too); later, the first
        answer is ``{"pending": True}`` and the connection comes to ``end`` as above.
        Raises ConnectionRefusedError if no agent answers.
        """
        channel = self.open()
        args = {"host": host, "port": int(port), "timeout": timeout, "stack": stack, "filler": int(filler)}
        if handover is not None:
            args["handover"] = float(handover)
        try:
            channel.send("connect", args, fd=end)
        except BaseException:
            channel.close()
            raise
        return channel

    def listen(self, port: int = 0, *, deferred: bool = False) -> AgentListener:
        """Serve grid port ``port`` of this node (0: the agent picks a free one) until the
        listener is closed. ``deferred``: only reserve the port (connections to it are refused,
        as to a TCP port bound but not listening) until :meth:`AgentListener.start`.
        Raises ``OSError(EADDRINUSE)`` if the port is taken, ``OSError(EINVAL)`` for a bad
        port, ConnectionRefusedError if no agent answers."""
        channel = self.open()
        try:
            listener = AgentListener(self, channel)
        except BaseException:
            channel.close()
            raise
        try:
            listener._request(port, deferred)
        except BaseException:
            listener.close()
            raise
        return listener
