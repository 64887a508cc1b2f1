"""A Dask comm backend over the grid: ``gridsock://NODE:PORT`` reaches a scheduler, worker or nanny by node name.

Theory of operation
-------------------
Dask's ``distributed`` picks a comm backend by the scheme of an address; this module is the
backend of ``gridsock://`` (entry point ``gridsock`` in the group ``distributed.comm.backends``),
so an unmodified Dask cluster spans NAT, firewalls and private clusters: ``dask scheduler
--protocol gridsock``, ``dask worker gridsock://NODE:PORT`` and ``Client("gridsock://NODE:PORT")``
in processes that have an agent (``gridsock run --node NAME -- ...``, or ``$GRIDSOCK_AGENT``
naming the agent socket of a node of their host; patching is not needed).

It follows distributed's own TCP backend, piece by piece:

- **Comm** (:class:`GridsockComm`): *is* distributed's TCP comm, a tornado ``IOStream`` with
  TCP's framing, over the real socket gridsock hands out (the kernel's TCP socket for a plain
  ``tcp`` stack, else a socket the node bridges to its stack). Reusing the class keeps the
  framing byte-identical to the installed ``distributed``, whatever its version.
- **Connector** (:class:`GridsockConnector`): resolves ``NODE`` through the grid directory (the
  agent's ``resolve``; never DNS: a host the grid does not know is ``socket.gaierror``) and
  connects a :class:`~gridsock.personalities.socket.GridSocket` in a thread of its own pool
  (a blocking grid connect hands over the kernel's TCP socket itself where the stack allows;
  a non-blocking one is always bridged by the agent). If distributed gives up waiting, the
  connection that arrives later is closed. Failures are ``CommClosedError`` (an ``OSError``,
  which ``distributed.comm.connect`` retries until its timeout); no agent at all is
  ``FatalCommClosedError``.
- **Listener** (:class:`GridsockListener`): a GridSocket bound to ``("", port)`` makes the
  agent serve that grid port of this node (port 0: the agent picks one); it is readable
  exactly when a connection waits, so the event loop's reader accepts. The host of the listen
  address can only be this node: empty, a wildcard, its name, ``NAME.grid`` or its grid
  address; another node's name is ``EADDRNOTAVAIL``; a host the grid does not know (the local
  IP address a Nanny derives for its worker) still serves this node's grid port.
- **Addresses**: listeners advertise ``gridsock://THIS_NODE:PORT`` (the name from the agent's
  ``whoami``). The canonical form of a host (``resolve_address``, ``get_address_host``) is the
  node's name: ``NAME.grid`` loses its suffix, a grid address becomes its node's name, a
  wildcard becomes this node, and a plain name is kept as it is, without any I/O.
  An accepted comm's peer is ``gridsock://PEER_NODE:N`` (grid connections have no client port:
  N is the number the agent gives each connection).

Dask-level TLS is not offered (``encrypted`` is False; a ``require_encryption`` security
refuses ``gridsock://``): the grid's own stacks carry TLS where the rules ask for it.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import errno
import logging
import socket
import threading
from typing import Any, Callable, Optional, Set, Tuple

import dask
from dask.utils import parse_timedelta
from distributed.comm.addressing import parse_host_port, unparse_host_port
from distributed.comm.core import BaseListener, CommClosedError, Connector, FatalCommClosedError
from distributed.comm.registry import Backend
from distributed.comm.tcp import MAX_BUFFER_SIZE, TCP
from tornado.iostream import IOStream

from gridsock.agentclient import AgentClient
from gridsock.names import GRID_SUFFIX, grid_name, is_grid_ip
from gridsock.personalities import socket as personality

__all__ = ["SCHEME", "GridsockBackend", "GridsockComm", "GridsockConnector", "GridsockListener", "canonical_host",
           "CONNECT_THREADS", "ACCEPT_BATCH"]

logger = logging.getLogger(__name__)

#: The URI scheme (and entry-point name) of this backend.
SCHEME = "gridsock"
PREFIX = SCHEME + "://"
# Grid connects in progress at once in one process: each holds a thread until the grid has
# tried its methods (a dial gives up after a few seconds); a worker fetches from its peers a
# few at a time (distributed.worker.connections), so this is rarely the limit.
CONNECT_THREADS = 16
# Connections accepted per readiness event before the event loop serves others (tornado's
# accept handler takes a backlog's worth the same way).
ACCEPT_BATCH = 128
_WILDCARDS = ("", "0.0.0.0", "::")
_MAPPED = "::ffff:"  # an IPv4 (grid) address seen through an IPv6 socket
_NO_AGENT = ("no gridsock agent in this process: run it under `gridsock run --node NAME -- ...` "
             "or set $GRIDSOCK_AGENT to the agent socket of a node of this host")

_executor: Optional[concurrent.futures.ThreadPoolExecutor] = None
_executor_lock = threading.Lock()


def _connect_pool() -> concurrent.futures.ThreadPoolExecutor:
    global _executor
    with _executor_lock:
        if _executor is None:
            _executor = concurrent.futures.ThreadPoolExecutor(CONNECT_THREADS, thread_name_prefix="gridsock-dask")
        return _executor


async def _in_thread(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` in the backend's thread pool. A socket it returns (alone or first of a
    tuple) after the caller stopped waiting (cancelled: distributed's connect timeout) is closed."""
    future = _connect_pool().submit(fn, *args)
    try:
        return await asyncio.wrap_future(future)
    except asyncio.CancelledError:
        future.add_done_callback(_close_abandoned)
        raise


def _close_abandoned(future: concurrent.futures.Future) -> None:
    if future.cancelled() or future.exception() is not None:
        return
    result = future.result()
    sock = result[0] if isinstance(result, tuple) else result
    if isinstance(sock, socket.socket):
        sock.close()


def _agent() -> AgentClient:
    """The personality's agent client (:func:`gridsock.personalities.socket.agent`, a
    :class:`gridsock.agentclient.AgentClient`); raises FatalCommClosedError if this process has none."""
    agent = personality.agent()
    if agent is None:
        raise FatalCommClosedError(_NO_AGENT)
    return agent


def _this_node() -> str:
    """This process's node name (the agent's ``whoami``, asked once)."""
    return _agent().whoami()["name"]


def _bare_ip(host: str) -> str:
    return host[len(_MAPPED):] if host.startswith(_MAPPED) else host


def canonical_host(host: str) -> str:
    """The node name ``host`` stands for, as addresses carry it.

    ``NAME.grid`` -> ``NAME``; a grid address -> its node's name (one cached agent lookup; the
    address itself if the grid does not know it); a wildcard -> this node (the address itself
    without an agent); anything else unchanged (no I/O, never DNS).
    """
    if host in _WILDCARDS:
        return _this_node() if personality.agent() is not None else host
    name = grid_name(host)
    if name is not None:
        return name
    bare = _bare_ip(host)
    if is_grid_ip(bare):
        agent = personality.agent()
        try:
            found = agent.lookup(bare) if agent is not None else None
        except OSError:
            found = None
        return found["name"] if found else bare
    return host


def _open_connection(host: str, port: int, timeout: Optional[float]) -> Tuple[socket.socket, str]:
    """Blocking: a connected GridSocket to grid port ``port`` of node ``host``, and the node's name.

    Raises ``socket.gaierror`` if the grid knows no such node, else what the personality
    raises (``ConnectionRefusedError``, ``TimeoutError``, ``OSError``).
    """
    agent = _agent()
    agent.whoami()  # asked here, in the pool's thread, once: the comm's local address needs it
    found = agent.lookup(host)
    if found is None:
        raise socket.gaierror(socket.EAI_NONAME, f"no node {grid_name(host) or host!r} in the grid")
    sock = personality.GridSocket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect((found["ip"], port))
    except BaseException:
        sock.close()
        raise
    return sock, found["name"]


def _check_encryption(address: str, connection_args: dict) -> None:
    if connection_args.get("require_encryption"):
        raise RuntimeError("encryption required by Dask configuration, refusing communication "
                           f"from/to {PREFIX + address!r} (gridsock:// is not Dask-level TLS; "
                           "the grid's rules decide where its own TLS runs)")


class GridsockComm(TCP):
    """An established grid connection: distributed's TCP comm (framing, handshake, close) over
    the socket gridsock handed out."""


class GridsockConnector(Connector):
    """Opens :class:`GridsockComm` objects to ``NODE:PORT`` locations."""

    prefix = PREFIX
    comm_class = GridsockComm
    encrypted = False

    async def connect(self, address: str, deserialize: bool = True, **connection_args: Any) -> GridsockComm:
        """A comm to ``address`` (``NODE:PORT``, ``NODE.grid:PORT`` or ``GRID_IP:PORT``).

        Raises FatalCommClosedError without an agent, CommClosedError when the grid cannot
        connect (the cause chained), ValueError for a malformed address.
        """
        _check_encryption(address, connection_args)
        host, port = parse_host_port(address)
        timeout = parse_timedelta(dask.config.get("distributed.comm.timeouts.connect"), default="seconds")
        _agent()
        try:
            sock, node = await _in_thread(_open_connection, host, port, timeout)
        except OSError as exc:
            raise CommClosedError(f"in {self.prefix}{address}: {type(exc).__name__}: {exc}") from exc
        try:
            stream = IOStream(sock, max_buffer_size=MAX_BUFFER_SIZE)
        except BaseException:
            sock.close()
            raise
        local = self.prefix + unparse_host_port(_this_node(), sock.getsockname()[1])
        return self.comm_class(stream, local, self.prefix + unparse_host_port(node, port), deserialize)


class GridsockListener(BaseListener):
    """Serves a grid port of this node and hands each connection to ``comm_handler`` as a comm."""

    prefix = PREFIX
    comm_class = GridsockComm
    encrypted = False

    def __init__(self, address: str, comm_handler, deserialize: bool = True, allow_offload: bool = True,
                 default_host: Optional[str] = None, default_port: int = 0, **connection_args: Any) -> None:
        super().__init__()
        _check_encryption(address, connection_args)
        self.host, self.port = parse_host_port(address, default_port)
        self.comm_handler = comm_handler
        self.deserialize = deserialize
        self.allow_offload = allow_offload
        self._sock: Optional[socket.socket] = None
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._node: Optional[str] = None
        self._bound_port: Optional[int] = None
        self._handlers: Set[asyncio.Task] = set()

    async def start(self) -> None:
        """Serve the grid port. Raises FatalCommClosedError without an agent, OSError
        (EADDRINUSE: the port is taken on this node; EADDRNOTAVAIL: the host is another node)."""
        _agent()
        sock, node = await _in_thread(self._open)
        self._sock, self._node, self._bound_port = sock, node, sock.getsockname()[1]
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(sock.fileno(), self._accept_ready)
        logger.debug("gridsock listener serving %s", self.contact_address)

    def _open(self) -> Tuple[socket.socket, str]:
        agent = _agent()
        me = agent.whoami()
        ours = (me["name"], me["name"] + GRID_SUFFIX, me["ip"], _MAPPED + me["ip"])
        if self.host not in _WILDCARDS and self.host not in ours:
            other = agent.lookup(_bare_ip(self.host))
            if other is not None or grid_name(self.host) or is_grid_ip(_bare_ip(self.host)):
                raise OSError(errno.EADDRNOTAVAIL, f"a gridsock listener serves its own node {me['name']}, "
                                                   f"not {self.host}")
            # Not a grid host: the local address a Nanny derives for its worker, say. A grid
            # port exists only on the node, so that is where this listener is.
            logger.debug("listen address host %r is not on the grid: serving node %s", self.host, me["name"])
        sock = personality.GridSocket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.bind(("", self.port))
            sock.listen()
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        return sock, me["name"]

    def _accept_ready(self) -> None:
        for _ in range(ACCEPT_BATCH):
            sock = self._sock
            if sock is None:
                return
            try:
                conn, peer = sock.accept()
            except BlockingIOError:
                return
            except OSError as exc:  # the agent closed the listener: the node is gone
                logger.error("gridsock listener %s: the node stopped serving it: %s", self.contact_address, exc)
                self.stop()
                return
            task = asyncio.ensure_future(self._handle(conn, peer))
            self._handlers.add(task)
            task.add_done_callback(self._handled)

    def _handled(self, task: asyncio.Task) -> None:
        self._handlers.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("gridsock listener %s: an incoming connection failed", self.listen_address,
                         exc_info=task.exception())

    async def _handle(self, conn: socket.socket, peer: tuple) -> None:
        try:
            node = await _in_thread(canonical_host, peer[0])
            stream = IOStream(conn, max_buffer_size=MAX_BUFFER_SIZE)
        except BaseException:
            conn.close()
            raise
        if self._sock is None:
            # Stopped meanwhile: abort_handshaking_comms() has run and would not see this comm;
            # left open, the client would wait for the handshake forever.
            stream.close()
            return
        address = self.prefix + unparse_host_port(node, peer[1])
        logger.debug("incoming connection from %r to %r", address, self.contact_address)
        # As distributed's TCP listener: the handshake without the server's overrides.
        comm = self.comm_class(stream, self.contact_address, address, self.deserialize)
        comm.allow_offload = self.allow_offload
        try:
            await self.on_connection(comm)
        except CommClosedError:
            logger.info("connection from %s closed before the handshake completed", address)
            return
        await self.comm_handler(comm)

    def stop(self) -> None:
        """Stop serving the grid port (connections already up are left alone)."""
        sock, self._sock = self._sock, None
        if sock is None:
            return
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(sock.fileno())
        sock.close()

    def get_host_port(self) -> Tuple[str, int]:
        """``(node name, grid port)``; ValueError before :meth:`start`."""
        if self._node is None or self._bound_port is None:  # (start() sets both)
            raise ValueError("invalid operation on a gridsock listener that has not started")
        return self._node, self._bound_port

    @property
    def listen_address(self) -> str:
        return self.prefix + unparse_host_port(*self.get_host_port())

    @property
    def contact_address(self) -> str:
        return self.listen_address


class GridsockBackend(Backend):
    """The ``gridsock://`` backend (entry point ``gridsock`` of ``distributed.comm.backends``)."""

    # I/O

    def get_connector(self) -> GridsockConnector:
        return GridsockConnector()

    def get_listener(self, loc, handle_comm, deserialize, **connection_args) -> GridsockListener:
        return GridsockListener(loc, handle_comm, deserialize, **connection_args)

    # Address handling

    def get_address_host(self, loc: str) -> str:
        """The node ``loc`` is on (its name; see :func:`canonical_host`)."""
        return canonical_host(parse_host_port(loc, 0)[0])

    def get_address_host_port(self, loc: str) -> Tuple[str, int]:
        host, port = parse_host_port(loc)
        return canonical_host(host), port

    def resolve_address(self, loc: str) -> str:
        """``NODE:PORT`` in canonical form (the grid's name for the node, never a DNS answer)."""
        host, port = parse_host_port(loc)
        return unparse_host_port(canonical_host(host), port)

    def get_local_address_for(self, loc: str) -> str:
        """This node: on the grid, every node is reached by name through its own node."""
        return _this_node()
