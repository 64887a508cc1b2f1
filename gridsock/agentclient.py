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

Each call opens its own connection to the agent (a listener keeps its own: it *is* the
listener, readable when a connection waits, and closing it frees the grid port). Frames,
descriptor passing and the errno mapping are :mod:`gridsock.agentwire`'s. Errors are the
stdlib's: ``ConnectionRefusedError`` (no agent at the path; nothing listens on the grid port;
the server's policy refused), ``TimeoutError``, ``OSError`` (``EHOSTUNREACH``: every method
failed; ``EADDRINUSE``: the grid port is taken; ``EINVAL``: a bad argument),
``socket.gaierror(EAI_NONAME)`` (a name the grid does not know), ``ConnectionResetError`` (the
agent broke the protocol or went away).
"""
from __future__ import annotations

import errno
import os
import select
import socket
import threading
import time
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

from . import agentwire, wire
from .errors import RemoteProtocolError
from .names import LocalTrustError, connect_private

__all__ = ["AgentClient", "AgentChannel", "AgentListener", "confirm", "AGENT_ENV", "AGENT_TIMEOUT_S", "NAME_CACHE_S"]

#: The environment variable naming the agent socket (``gridsock run`` sets it; children inherit it).
AGENT_ENV = "GRIDSOCK_AGENT"
#: An agent call that is not a connect answers within this long.
AGENT_TIMEOUT_S = 10.0
#: Name lookups (hits and misses) are remembered this long: a program resolving in a loop does
#: not ask the agent every time, and a node that joins is seen within this long.
NAME_CACHE_S = 5.0
# Names remembered at most (a program scanning host names does not grow the cache forever).
MAX_CACHED_NAMES = 4096

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
    listener is readable (``select``) exactly when a connection waits; closing it (or better,
    :meth:`release`) stops the node serving the port."""

    port: int
    ip: Optional[str]

    def start(self) -> None:
        """Start serving the port of a listener made with ``listen(port, deferred=True)`` (which
        only reserved it: connections to it were refused until now). Raises what
        :meth:`AgentClient.listen` raises."""
        self.send("listen", {"port": self.port})
        result, sock = self.receive()
        if sock is not None:
            sock.close()
        self.port, self.ip = result["port"], result.get("ip")


class AgentClient:
    """The agent at ``path``: blocking calls, each on a connection of its own; thread-safe.

    ``socket_class``: the class of the sockets it makes and returns (default: the ``socket``
    module's class when called; the personality passes the original class). ``timeout``: how
    long a call other than ``connect`` may take. ``name_cache_s``: how long :meth:`lookup`
    remembers an answer.
    """

    def __init__(self, path: str, *, socket_class=None, timeout: Optional[float] = AGENT_TIMEOUT_S,
                 name_cache_s: float = NAME_CACHE_S) -> None:
        self.path = path
        self.socket_class = socket_class
        self.timeout = timeout
        self.name_cache_s = name_cache_s
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
        listener = AgentListener(channel.sock, socket_class=self.socket_class)
        try:
            listener.send("listen", {"port": int(port), "deferred": True} if deferred else {"port": int(port)})
            result, sock = listener.receive()
            if sock is not None:
                sock.close()
        except BaseException:
            listener.close()
            raise
        listener.port, listener.ip = result["port"], result.get("ip")
        return listener
