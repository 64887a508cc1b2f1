"""The socket personality: stdlib sockets and name functions that know the grid.

Theory of operation
-------------------
Installed by :mod:`gridsock.personalities.monkey`, :class:`GridSocket` replaces
``socket.socket`` and the functions below replace the stdlib's name functions. Everything that
is not about a grid node passes through to the originals, untouched.

Grid hosts are node names, ``NAME.grid`` and grid addresses (``240.0.0.0/4``, one per node,
the same on every host: :mod:`gridsock.names`). The application runs no gevent and speaks no
grid protocol: it asks the node process of its host, the *agent* (:mod:`gridsock.agent`), over
a Unix socket, with the original socket class.

- **connect** to a grid host: the agent builds the connection (its rules, its methods) and
  sends back the descriptor, which is put in place of the socket's own with ``dup2``, so the
  socket object, its ``fileno()`` and its timeout stay what the application knows. For a plain
  ``tcp`` stack the application then holds the kernel's TCP socket to the peer itself.
- **bind** of an IPv4 socket to the wildcard address, the node's grid address or its name: the
  agent reserves that grid port (port 0: it picks one, which ``getsockname()`` then tells), and
  refuses connections to it, as TCP does, until **listen**, which has it served and puts the
  listener's announcement end (:class:`gridsock.agentclient.AgentListener`) in place of the
  socket's descriptor, so the listening socket is readable exactly when a connection waits;
  **accept** reads one announcement and its descriptor. The listener keeps the port through a
  restart of the node (its keeper registers it again with the node's successor; the
  descriptor stays the same). Any other bind (127.0.0.1, a real interface) is an ordinary
  local socket.
- ``getpeername()`` gives the peer's grid address, ``getsockname()`` this node's; a socket whose
  descriptor is a Unix socketpair end (a stack that transforms bytes) accepts and remembers TCP
  options it cannot apply, as a TCP socket would.
- **TLS**: once patched in, ``ssl.SSLContext.wrap_socket`` makes ``GridSSLSocket``
  (:func:`ssl_socket_class`); the wrapped socket's grid state (a grid port bound, a listener,
  grid addresses) moves with its descriptor to the SSL socket (:func:`_hand_over`), so TLS
  servers and clients, STARTTLS upgrades included, work on grid sockets as on kernel ones.
- Names: a grid name resolves to its grid address (``getaddrinfo`` returns the stdlib's
  ``AddressFamily`` and ``SocketKind`` enums); a ``.grid`` name the grid does not know is
  ``gaierror(EAI_NONAME)`` and never reaches the system resolver; other names go to the system
  resolver after one agent lookup (cached ``NAME_CACHE_S``).

The agent calls go through the public client, :class:`gridsock.agentclient.AgentClient`
(:func:`agent` gives the personality's). Errors are the stdlib's: ``ConnectionRefusedError``
(nothing listens, or policy), ``TimeoutError``, ``OSError(EHOSTUNREACH)``, ``socket.gaierror``.
"""
from __future__ import annotations

import errno
import os
import select
import socket as _socket
import _socket as _csocket
import threading
from typing import TYPE_CHECKING, Any, Dict, NoReturn, Optional, Tuple

from gridsock.agentclient import AGENT_TIMEOUT_S, NAME_CACHE_S, AgentChannel, AgentClient, AgentListener, confirm
from gridsock.names import GRID_SUFFIX, grid_name, is_grid_ip

from .monkey import get_original

__all__ = ["GridSocket", "ssl_socket_class", "configure", "agent", "create_connection", "is_grid_host", "getaddrinfo",
           "gethostbyname", "gethostbyname_ex", "gethostbyaddr", "getnameinfo", "getfqdn", "NAME_CACHE_S"]

if TYPE_CHECKING:  # the original class is the stdlib's (or gevent's, which has its interface)
    _RealSocket = _socket.socket
else:
    _RealSocket = get_original("socket", "socket")
_real_create_connection = get_original("socket", "create_connection")
(_real_getaddrinfo, _real_gethostbyname, _real_gethostbyname_ex, _real_gethostbyaddr, _real_getnameinfo,
 _real_getfqdn) = get_original("socket", ["getaddrinfo", "gethostbyname", "gethostbyname_ex", "gethostbyaddr",
                                           "getnameinfo", "getfqdn"])

# socket.create_connection's "no timeout given" sentinel (typeshed does not declare this private name).
_GLOBAL_DEFAULT_TIMEOUT: object = _socket._GLOBAL_DEFAULT_TIMEOUT  # type: ignore[attr-defined]
_WILDCARDS = ("", "0.0.0.0", "::")
_MAPPED = "::ffff:"  # an IPv4 address seen through an IPv6 socket
# Options a server sets before bind() whose value getsockopt() must still give once the
# listening socket is the agent connection.
_CLOSE_LOCK = threading.Lock()
_KEPT_OPTIONS = tuple(getattr(_socket, name) for name in ("SO_REUSEADDR", "SO_REUSEPORT", "SO_KEEPALIVE")
                      if hasattr(_socket, name))
_agent: Optional[AgentClient] = None
# Force mode ($GRIDSOCK_FORCE=1): loopback TCP goes through the grid too, to this very node, so
# a test suite that talks to itself on 127.0.0.1 exercises the whole path.
_force = False
# (IPv4 only: an IPv6 "::1" server may sit on a V6ONLY wildcard next to an IPv4 one of the same
# port, which the grid, with one port space per node, cannot tell apart.)
_LOOPBACK = ("127.0.0.1", "localhost", "::ffff:127.0.0.1", "0.0.0.0")
# A non-blocking connect waits this long for the agent to make the connection, so that it gets
# the connection's own socket (full speed: no bridge); a slower connection goes on in the
# background, bridged (see GridSocket._grid_connect_nonblocking). The most an event loop stalls.
NONBLOCKING_HANDOVER_S = 0.05


def configure(path: Optional[str], *, force: Optional[bool] = None) -> None:
    """Use the agent at ``path`` (None: none; the personality then passes everything through).

    ``force`` (default: ``$GRIDSOCK_FORCE == "1"``) sends loopback TCP through the grid as well.
    """
    global _agent, _force
    _agent = AgentClient(path, socket_class=_RealSocket) if path else None
    _force = os.environ.get("GRIDSOCK_FORCE") == "1" if force is None else force


def agent() -> Optional[AgentClient]:
    """The agent client the personality uses (:class:`gridsock.agentclient.AgentClient`, on the
    original socket class), or None when this process has no agent: the personality then passes
    everything through. Set from ``$GRIDSOCK_AGENT`` at import, by :func:`configure` and by
    ``patch_all(agent=PATH)``. The shims ask it whether there is an agent, and the Dask backend
    for this node's name and for name lookups (which share its cache)."""
    return _agent


def is_grid_host(host) -> bool:
    """True if a connection to ``host`` goes through the grid: a node name, ``NAME.grid`` (an
    unknown one too: connecting then fails to resolve), a grid address, or loopback in force
    mode; always False without an agent. Asks the agent at most once per ``NAME_CACHE_S``."""
    try:
        return _grid_host(host) is not None
    except _socket.gaierror:
        return True


def create_connection(address, timeout=_GLOBAL_DEFAULT_TIMEOUT, source_address=None, **kwargs):
    """``socket.create_connection`` with grid hosts, whether or not the personality is patched in
    (the shims use it): a grid host gives a connected :class:`GridSocket`. ``all_errors``
    (Python 3.11+) goes to the stdlib for other hosts; a grid connect has one error anyway."""
    host, port = address[0], address[1]
    if _grid_host(host) is None:
        return _real_create_connection(address, timeout, source_address, **kwargs)
    port = _port_number(port)  # ("25", "smtp": as the stdlib's getaddrinfo takes them)
    # Patched in, the module's class (ours, or whatever a test put there); else ours.
    cls = _socket.socket if _socket.socket is not _RealSocket else GridSocket
    sock = cls(_socket.AF_INET, _socket.SOCK_STREAM)
    try:
        if timeout is not _GLOBAL_DEFAULT_TIMEOUT:
            sock.settimeout(timeout)
        if source_address:
            sock.bind(source_address)
        sock.connect((host, port))
    except OSError as exc:
        sock.close()
        if kwargs.get("all_errors"):
            raise ExceptionGroup("create_connection failed", [exc]) from None  # noqa: F821 (3.11+)
        raise
    except BaseException:
        sock.close()
        raise
    return sock


configure(os.environ.get("GRIDSOCK_AGENT"))  # patched or not, a process started with an agent uses it


def _grid_host(host: Any) -> Optional[str]:
    """The grid host ``host`` names, or None (not a grid host, or no agent)."""
    if _agent is None or not isinstance(host, str) or not host:
        return None
    if host.startswith(_MAPPED) and is_grid_ip(host[len(_MAPPED):]):
        return host[len(_MAPPED):]
    if _force and _is_loopback(host):
        return _agent.whoami()["ip"]
    if is_grid_ip(host):
        return host
    if host in ("localhost",) or _is_ip_literal(host):
        return None
    found = _agent.lookup(host)
    if found is None and grid_name(host):
        raise _socket.gaierror(_socket.EAI_NONAME, f"no node {grid_name(host)!r} in the grid")
    return found["ip"] if found else None


def _port_number(port) -> int:
    """``port`` as ``getaddrinfo`` takes it (an int, digits, a TCP service name, None) as a
    number; raises what the stdlib's ``getaddrinfo`` raises for a bad one (``gaierror``,
    ``OverflowError``, ``TypeError`` for a type it does not take)."""
    if type(port) is int:
        return port
    infos = _real_getaddrinfo("127.0.0.1", port, _socket.AF_INET, _socket.SOCK_STREAM, 0, _socket.AI_NUMERICHOST)
    return int(infos[0][4][1])


def _loopback_literal(host: str) -> str:
    """What the kernel reports for loopback ``host`` (a name or 0.0.0.0: 127.0.0.1)."""
    return host if host.startswith(("127.", _MAPPED + "127.")) else "127.0.0.1"


def _check_port(op: str, port) -> None:
    """What CPython's socket module says of a bad port, before any system call."""
    if not isinstance(port, int):
        raise TypeError(f"'{type(port).__name__}' object cannot be interpreted as an integer")
    if not 0 <= port <= 65535:
        raise OverflowError(f"{op}(): port must be 0-65535.")


def _check_address(op: str, address: tuple) -> None:
    """CPython's checks of an (IPv4 or IPv6) socket address, before any system call."""
    _check_port(op, address[1])
    if len(address) > 2 and isinstance(address[2], int) and not 0 <= address[2] <= 0xFFFFF:
        raise OverflowError(f"{op}(): flowinfo must be 0-1048575.")


def _agent_or_refuse() -> AgentClient:
    """The agent, for a grid operation already under way (the personality found a grid host, or
    a grid connect is pending); refuses the connection if :func:`configure` has dropped it since."""
    if _agent is None:
        raise ConnectionRefusedError(errno.ECONNREFUSED, "no gridsock agent (the personality was reconfigured)")
    return _agent


def _is_loopback(host: str) -> bool:
    return host in _LOOPBACK or host.startswith("127.")


def _readable(sock) -> bool:
    return bool(select.select([sock], [], [], 0)[0])


def _domain(fd: int) -> int:
    """The address family of the socket behind descriptor ``fd``."""
    probe = _RealSocket(fileno=os.dup(fd))
    try:
        return probe.family
    finally:
        probe.close()


def _is_ip_literal(host: str) -> bool:
    try:
        _socket.inet_pton(_socket.AF_INET6 if ":" in host else _socket.AF_INET, host.split("%")[0])
        return True
    except OSError:
        return False


# What makes a GridSocket a grid socket: the state :func:`_hand_over` moves to a new object.
_GRID_STATE = ("_grid_peer", "_grid_local", "_grid_channel", "_grid_unix", "_grid_opts", "_grid_pending",
               "_grid_requested", "_grid_listener")
# Descriptor -> (its socket's inode, the grid state of the socket that held it): a socket that
# gives its descriptor to a new object (ssl's SSLSocket._create does) gives its grid state with it.
_handed_over: Dict[int, Tuple[int, Dict[str, Any]]] = {}
_HAND_OVER_LOCK = threading.Lock()


def _inode(fd: int) -> int:
    try:
        return os.fstat(fd).st_ino
    except OSError:
        return -1


def _hand_over(sock: "GridSocket") -> None:
    """Move the grid state of ``sock`` to the next GridSocket made on its descriptor (a
    ``GridSocket(fileno=...)``, which an ``SSLSocket`` is): ``sock`` is a plain socket after.
    A state never taken (its descriptor closed or reused meanwhile) is dropped, and its agent
    connections closed, at the next hand-over."""
    fd = sock.fileno()
    if fd < 0:
        return
    state = {name: getattr(sock, name) for name in _GRID_STATE}
    sock._grid_peer = sock._grid_local = sock._grid_channel = sock._grid_pending = sock._grid_requested = None
    sock._grid_listener = None
    sock._grid_unix, sock._grid_opts = False, {}
    with _HAND_OVER_LOCK:
        for stale, (inode, old) in list(_handed_over.items()):
            if _inode(stale) != inode:
                del _handed_over[stale]
                _drop_state(old)
        _handed_over[fd] = (_inode(fd), state)


def _take_over(fd: int) -> Optional[Dict[str, Any]]:
    """The grid state handed over with descriptor ``fd`` (see :func:`_hand_over`), or None."""
    with _HAND_OVER_LOCK:
        entry = _handed_over.pop(fd, None)
    if entry is None:
        return None
    if _inode(fd) != entry[0]:  # (a stale entry: that descriptor was closed, its number reused)
        _drop_state(entry[1])
        return None
    return entry[1]


def _give_back(sock: "GridSocket") -> None:
    """Undo :func:`_hand_over` if nobody took the state (the wrap failed before it began)."""
    state = _take_over(sock.fileno()) if sock.fileno() >= 0 else None
    if state is not None:
        for name, value in state.items():
            setattr(sock, name, value)


def _drop_state(state: Dict[str, Any]) -> None:
    for channel in (state["_grid_channel"], state["_grid_pending"] and state["_grid_pending"][0],
                    state["_grid_listener"]):
        if channel is not None:
            channel.close()


class _RawView:
    """The socket module's own ``recvmsg`` on a grid socket: the agent announcements on a
    listening socket are read with it, whatever the class (``SSLSocket`` refuses ``recvmsg``)."""

    def __init__(self, sock: "GridSocket") -> None:
        self._sock = sock

    def fileno(self) -> int:
        return self._sock.fileno()

    def recvmsg(self, *args: Any) -> Any:
        return _RealSocket.recvmsg(self._sock, *args)


# A non-blocking connect in progress: (agent connection, port, the address bound before it or
# None, the host the program asked for, our end's send buffer size before it was shrunk).
_Pending = Tuple[AgentChannel, int, Optional[tuple], Optional[str], int]


class GridSocket(_RealSocket):
    """``socket.socket``, reaching grid nodes too; see the module docstring."""

    __slots__ = ("_grid_peer", "_grid_local", "_grid_channel", "_grid_unix", "_grid_opts", "_grid_pending",
                 "_grid_requested", "_grid_listener")

    def __init__(self, family=-1, type=-1, proto=-1, fileno=None):
        super().__init__(family, type, proto, fileno)
        self._grid_peer: Optional[tuple] = None  # (grid ip, port) of the peer
        self._grid_local: Optional[tuple] = None  # (grid ip, port) of this end
        self._grid_channel: Optional[AgentListener] = None  # bound on the grid, not listening yet
        self._grid_unix = False  # the descriptor is a Unix socketpair end
        self._grid_opts: Dict[tuple, Any] = {}
        self._grid_pending: Optional[_Pending] = None  # a non-blocking connect in progress
        self._grid_requested: Optional[str] = None  # the host the program asked to connect to
        self._grid_listener: Optional[AgentListener] = None  # serving: the listener behind our descriptor
        if fileno is not None and _handed_over:
            state = _take_over(fileno)
            if state is not None:
                for name, value in state.items():
                    setattr(self, name, value)

    def _grid_capable(self) -> bool:
        return _agent is not None and self.family in (_socket.AF_INET, _socket.AF_INET6) \
            and self.type == _socket.SOCK_STREAM

    # --- client ----------------------------------------------------------------------------

    def connect(self, address):
        host = _grid_host(address[0]) if self._grid_capable() and isinstance(address, tuple) else None
        if host is None:
            self._no_datagrams_to_the_grid(address)
            return super().connect(address)
        _check_address("connect", address)
        self._grid_requested = address[0]
        self._grid_connect(host, address[1])
        self._forced_names(address[0])

    def connect_ex(self, address):
        host = _grid_host(address[0]) if self._grid_capable() and isinstance(address, tuple) else None
        if host is None:
            self._no_datagrams_to_the_grid(address)
            return super().connect_ex(address)
        self._grid_requested = address[0]
        try:
            self._grid_connect(host, address[1])
        except TimeoutError:
            return errno.ETIMEDOUT
        except OSError as exc:
            return exc.errno or errno.EIO
        self._forced_names(address[0])
        return 0

    def _no_datagrams_to_the_grid(self, address) -> None:
        """A UDP (or raw) socket connected to a grid name would send the name to the system
        resolver: refuse it here, as an unknown name (the grid carries TCP streams only)."""
        if _agent is None or self.type == _socket.SOCK_STREAM or self.family not in (_socket.AF_INET,
                                                                                    _socket.AF_INET6):
            return
        host = address[0] if isinstance(address, tuple) and address else None
        if isinstance(host, str) and host and not _is_ip_literal(host) and host != "localhost" \
                and (grid_name(host) or _agent.lookup(host) is not None):
            raise _socket.gaierror(_socket.EAI_NONAME, f"{host} is a grid node: the grid carries TCP streams only")

    def _forced_names(self, requested: str) -> None:
        """In force mode a loopback connection keeps loopback addresses, as the program expects."""
        if _force and _is_loopback(requested) and self._grid_peer is not None:
            loopback = self._addr(_loopback_literal(requested), 0)[0] if not requested.startswith(_MAPPED) \
                else requested
            self._grid_peer = (loopback,) + tuple(self._grid_peer[1:])
            if self._grid_local is not None and not _is_loopback(self._grid_local[0]):
                self._grid_local = (loopback,) + tuple(self._grid_local[1:])

    def _grid_connect(self, host: str, port: int) -> None:
        _check_port("connect", port)
        if self._grid_peer is not None:
            raise OSError(errno.EISCONN, "Transport endpoint is already connected")
        if self._grid_pending is not None:
            raise OSError(errno.EALREADY, "Operation already in progress")
        agent = _agent_or_refuse()
        bound = None
        if self._grid_channel is not None:  # bound as a source address: it serves nothing now
            bound, self._grid_local = self._grid_local, None
            self._grid_channel.close()
            self._grid_channel = None
        timeout = self.gettimeout()
        if timeout == 0.0:
            self._grid_connect_nonblocking(agent, host, port, bound)
        # (in place before the agent's confirmation: a server of this node accepts only after)
        try:
            _, result = agent.connect(host, int(port), timeout=timeout or None,
                                      adopt=lambda conn: self._adopt(conn.detach()))
        except TimeoutError as exc:
            if timeout is None:
                raise
            # A socket whose timeout ran out raises socket.timeout("timed out"), as the kernel's
            # connect does (on 3.9 a class of its own, not TimeoutError: programs, and imaplib's
            # tests, catch it by that name); the grid's reason stays in __cause__.
            raise _csocket.timeout("timed out") from exc
        me = agent.whoami()
        self._grid_peer = self._addr(result["ip"], int(port))
        # (the client port the server was told: its getpeername() and our getsockname() agree)
        self._grid_local = bound or self._addr(me["ip"], int(result.get("local_port") or 0))

    def _grid_connect_nonblocking(self, agent: AgentClient, host: str, port: int, bound: Optional[tuple]) -> NoReturn:
        """Start a connect and raise BlockingIOError(EINPROGRESS); the socket turns writable when
        it is done, and ``getsockopt(SOL_SOCKET, SO_ERROR)`` then tells how it went.

        A connection the agent makes within ``NONBLOCKING_HANDOVER_S`` is put in place at once,
        as a blocking connect's is (for a plain ``tcp`` stack, the kernel's TCP socket to the
        peer: nothing of gridsock on the data path), before the program can have registered
        the socket with a selector; a failure within that long is raised at once (as a kernel's
        non-blocking connect to loopback may).

        Otherwise the socket becomes one end of a socketpair whose send buffer is filled (so it
        is not writable); the other end went to the agent, which answers on the agent connection
        and then drains the filler (success: the connection is bridged to our end) or closes it
        (failure). Either way our end turns writable only once the answer is waiting. Its send
        buffer gets its usual size back once the connect is done (:meth:`_grid_finish`): at the
        minimum, one chunk the bridge has not wholly consumed (it holds a byte back to be able
        to reset the application) would use up the whole buffer, and sends would stall.
        """
        # (the C module's: a program may have replaced socket.socketpair, as 3.13's test_socket
        # puts the pure-Python one, which refuses AF_UNIX, in its place)
        ours, theirs = _csocket.socketpair(_socket.AF_UNIX, _socket.SOCK_STREAM)
        ours = _RealSocket(fileno=ours.detach())
        theirs = _RealSocket(fileno=theirs.detach())
        channel: Optional[AgentChannel] = None
        try:
            sndbuf = ours.getsockopt(_socket.SOL_SOCKET, _socket.SO_SNDBUF)
            ours.setsockopt(_socket.SOL_SOCKET, _socket.SO_SNDBUF, 1)  # the kernel's minimum
            ours.setblocking(False)
            filler = 0
            block = bytes(4096)
            while True:
                try:
                    filler += ours.send(block)
                except BlockingIOError:
                    break
            channel = agent.connect_into(host, int(port), theirs.fileno(), filler=filler,
                                         handover=NONBLOCKING_HANDOVER_S)
            theirs.close()
            channel.settimeout(NONBLOCKING_HANDOVER_S + AGENT_TIMEOUT_S)
            first, conn = channel.receive()  # (a failure within the hand-over time raises here)
            if conn is not None:  # the connection itself, made within the hand-over time
                ours.close()
                self._adopt(conn.detach())
                try:
                    if first.get("confirm"):
                        confirm(channel)  # (to a program of this node: in its backlog now)
                finally:
                    channel.close()
                self._grid_peer = self._addr(first["ip"], int(port))
                self._grid_local = bound or self._addr(agent.whoami()["ip"], int(first.get("local_port") or 0))
                if self._grid_requested:
                    self._forced_names(self._grid_requested)
                raise BlockingIOError(errno.EINPROGRESS, "Operation now in progress")
            if not first.get("pending"):
                raise ConnectionResetError(errno.ECONNRESET, "agent answered a non-blocking connect without "
                                                             "its descriptor")
            self._adopt(os.dup(ours.fileno()))
            ours.close()
        except BlockingIOError:
            raise
        except BaseException:
            for sock in (ours, theirs, channel):
                if sock is not None:
                    sock.close()
            raise
        self._grid_pending = (channel, int(port), bound, self._grid_requested, sndbuf)
        raise BlockingIOError(errno.EINPROGRESS, "Operation now in progress")

    def _grid_finish(self, pending: _Pending) -> int:
        """The outcome of the non-blocking connect ``pending`` (ours: 0 or an errno); waits for
        it if need be."""
        channel, port, bound, requested, sndbuf = pending
        self._grid_pending = None
        try:
            channel.settimeout(None)
            result, conn = channel.receive()
            if conn is not None:
                conn.close()
        except TimeoutError:
            return errno.ETIMEDOUT
        except _socket.gaierror:
            return errno.EHOSTUNREACH
        except OSError as exc:
            return exc.errno or errno.EIO
        finally:
            channel.close()
        try:  # (Linux doubles what is set, and getsockopt() gave the doubled size)
            _RealSocket.setsockopt(self, _socket.SOL_SOCKET, _socket.SO_SNDBUF, max(sndbuf // 2, 1))
        except OSError:
            pass
        self._grid_peer = self._addr(result["ip"], port)
        self._grid_local = bound or self._addr(_agent_or_refuse().whoami()["ip"], int(result.get("local_port") or 0))
        if requested:
            self._forced_names(requested)
        return 0

    def _adopt(self, fd: int) -> None:
        """Put descriptor ``fd`` in place of ours (same number, our timeout), and close ``fd``."""
        try:
            self._grid_unix = _domain(fd) == _socket.AF_UNIX
            # (os.dup2 makes the copy inheritable unless told: keep the socket's own flag, so no
            # grid connection leaks into the program's child processes.)
            os.dup2(fd, self.fileno(), inheritable=self.get_inheritable())
        finally:
            os.close(fd)
        super().settimeout(self.gettimeout())  # O_NONBLOCK belongs to the new file: set it again

    # --- server ----------------------------------------------------------------------------

    def bind(self, address):
        if not (self._grid_capable() and isinstance(address, tuple) and self._binds_grid(address[0])):
            return super().bind(address)
        if self._grid_channel is not None or self._grid_local is not None:
            raise OSError(errno.EINVAL, "Invalid argument (already bound)")
        _check_address("bind", address)
        # (reserved only: connections to it are refused until listen(), as to a TCP port)
        channel = _agent_or_refuse().listen(int(address[1]), deferred=True)
        self._grid_channel = channel
        # (No grid address while the node has not joined its grid: the wildcard, until it has.)
        self._grid_local = self._addr(channel.ip or "0.0.0.0", channel.port)
        if _force and isinstance(address[0], str) and (_is_loopback(address[0]) or address[0] in _WILDCARDS):
            local = address[0] if address[0] in _WILDCARDS or _is_ip_literal(address[0]) else "127.0.0.1"
            self._grid_local = (local or "0.0.0.0",) + self._grid_local[1:]

    def _addr(self, ip: str, port: int) -> tuple:
        """A socket address of our family for grid address ``ip`` (IPv4-mapped on IPv6 sockets)."""
        return (ip, port) if self.family == _socket.AF_INET else (_MAPPED + ip, port, 0, 0)

    def _binds_grid(self, host) -> bool:
        if isinstance(host, str) and host.startswith(_MAPPED) and is_grid_ip(host[len(_MAPPED):]):
            return True
        if _force and isinstance(host, str) and _is_loopback(host):
            return True
        if self.family == _socket.AF_INET6:
            # Grid addresses are IPv4: a dual-stack wildcard (http.server's) serves the grid, a
            # V6ONLY one (asyncio's twin of its IPv4 socket) stays local.
            return host in ("", "::") and not super().getsockopt(_socket.IPPROTO_IPV6, _socket.IPV6_V6ONLY)
        if host in _WILDCARDS:
            return True
        if not isinstance(host, str) or (_is_ip_literal(host) and not is_grid_ip(host)) or host == "localhost":
            return False
        me = _agent_or_refuse().whoami()
        return host in (me["ip"], me["name"], me["name"] + GRID_SUFFIX)

    def listen(self, backlog=None):
        channel = self._grid_channel
        if channel is None and ("listening",) in self._grid_opts:
            return None  # listening already (a second listen() only changes the kernel's backlog)
        if channel is None:
            return super().listen() if backlog is None else super().listen(backlog)
        if backlog is not None and not -2**31 <= int(backlog) < 2**31:
            raise OverflowError("signed integer is greater than maximum" if backlog > 0
                                else "signed integer is less than minimum")
        kept = {}
        for option in _KEPT_OPTIONS:  # set on the socket before it was bound: still true after
            kept[(_socket.SOL_SOCKET, option)] = super().getsockopt(_socket.SOL_SOCKET, option)
        if self.family == _socket.AF_INET6:
            v6only = (_socket.IPPROTO_IPV6, _socket.IPV6_V6ONLY)
            kept[v6only] = super().getsockopt(*v6only)
        channel.start()
        self._grid_channel = None
        self._adopt(channel.hand_off())  # (the listener keeps the port, through node restarts too)
        self._grid_listener = channel
        self._grid_unix = True
        self._grid_opts.update(kept)
        self._grid_opts[("listening",)] = True

    def accept(self):
        if ("listening",) not in self._grid_opts:
            return super().accept()
        try:
            # (a channel over our own descriptor, which it does not own: never closed here)
            announced, result = AgentChannel(_RawView(self), socket_class=_RealSocket).accept()
        except ConnectionResetError:
            self._grid_orphaned()
            raise
        unix = announced.family == _socket.AF_UNIX
        conn = self._grid_accepted_class()(self.family, self.type, self.proto, fileno=announced.detach())
        conn._grid_unix = unix
        peer = self._addr(result["ip"], int(result.get("peer_port") or 0))
        local = self._grid_local
        if _force and local is not None and _is_loopback(local[0]):  # a loopback server sees loopback clients
            peer = ("127.0.0.1" if local[0] in _WILDCARDS else local[0],) + peer[1:]
        conn._grid_peer, conn._grid_local = peer, local
        if _socket.getdefaulttimeout() is None and self.gettimeout():
            conn.setblocking(True)
        else:
            conn.settimeout(_socket.getdefaulttimeout())
        return conn, peer

    def _grid_accepted_class(self) -> type:
        """The class of the sockets :meth:`accept` returns (the stdlib's: the listener's own)."""
        return type(self)

    def _grid_orphaned(self) -> None:
        """The node behind this listener went away for good (its listener gave up waiting for it
        to come back): put a listening socket that never gets a connection in place of ours, so a
        server loop waits (its accept times out or blocks) instead of finding the socket readable,
        and failing, forever."""
        listener, self._grid_listener = self._grid_listener, None
        if listener is not None:
            listener.close()
        idle = _RealSocket(_socket.AF_INET, _socket.SOCK_STREAM)
        try:
            idle.bind(("127.0.0.1", 0))
            idle.listen(1)
            os.dup2(idle.fileno(), self.fileno(), inheritable=self.get_inheritable())
        finally:
            idle.close()
        super().settimeout(self.gettimeout())
        self._grid_opts.pop(("listening",), None)
        self._grid_unix = False

    # --- data ------------------------------------------------------------------------------
    # A grid connection bridged over a Unix socketpair end (a non-blocking connect's): the node
    # resets it by closing its end with a byte unread, which Linux reports as ECONNRESET to recv
    # but as EPIPE to send. A kernel TCP socket reports a reset to the first call that looks,
    # send included: so does this, from the pending ECONNRESET (SO_ERROR) behind the EPIPE.

    def send(self, *args, **kwargs):  # (data, flags=0; gevent's class takes a timeout too)
        try:
            return super().send(*args, **kwargs)
        except BrokenPipeError as exc:
            raise self._grid_broken(exc) from None

    def sendall(self, *args, **kwargs):
        try:
            return super().sendall(*args, **kwargs)
        except BrokenPipeError as exc:
            raise self._grid_broken(exc) from None

    def sendmsg(self, *args, **kwargs):
        try:
            return super().sendmsg(*args, **kwargs)
        except BrokenPipeError as exc:
            raise self._grid_broken(exc) from None

    def _grid_broken(self, exc: OSError) -> OSError:
        """``exc`` (EPIPE from a send), or ConnectionResetError if it hides a reset."""
        if self._grid_unix and ("listening",) not in self._grid_opts:
            try:
                pending = _RealSocket.getsockopt(self, _socket.SOL_SOCKET, _socket.SO_ERROR)
            except OSError:
                return exc
            if pending == errno.ECONNRESET:
                return ConnectionResetError(errno.ECONNRESET, os.strerror(errno.ECONNRESET))
        return exc

    # --- addresses and options -------------------------------------------------------------

    def getpeername(self):
        if ("listening",) in self._grid_opts:  # (the descriptor is the agent connection)
            raise OSError(errno.ENOTCONN, "Transport endpoint is not connected")
        if self._grid_peer is not None and self.fileno() == -1:
            raise OSError(errno.EBADF, "Bad file descriptor")
        pending = self._grid_pending
        if pending is not None and _readable(pending[0]):
            self._grid_finish(pending)  # (asyncio asks SO_ERROR first; a selector loop may not)
        if self._grid_peer is not None:
            if not self._grid_unix:
                # A TCP descriptor (the peer's own, or a bridge's): once reset it is not connected
                # any more, as the kernel says (ssl's wrap_socket asks, to refuse pre-handshake data).
                try:
                    super().getpeername()
                except OSError as exc:
                    if exc.errno == errno.ENOTCONN:
                        raise
            return self._grid_peer
        return super().getpeername()

    def getsockname(self):
        if self._grid_local is not None:
            if self.fileno() == -1:
                raise OSError(errno.EBADF, "Bad file descriptor")
            return self._grid_local
        return super().getsockname()

    def setsockopt(self, level, optname, value, optlen=None):
        args = (level, optname, value) if optlen is None else (level, optname, value, optlen)
        if self._grid_unix and level in (_socket.IPPROTO_TCP, _socket.IPPROTO_IP, _socket.IPPROTO_IPV6):
            self._grid_opts[(level, optname)] = value
            return None
        try:
            return super().setsockopt(*args)
        except OSError as exc:
            if self._grid_unix and exc.errno in (errno.EOPNOTSUPP, errno.ENOPROTOOPT, errno.EINVAL):
                self._grid_opts[(level, optname)] = value
                return None
            raise

    def getsockopt(self, level, optname, buflen=None):
        pending = self._grid_pending
        if pending is not None and level == _socket.SOL_SOCKET and optname == _socket.SO_ERROR:
            error = self._grid_finish(pending)
            return error if buflen is None else error.to_bytes(4, "little")[:buflen]
        if (level, optname) in self._grid_opts:
            value = self._grid_opts[(level, optname)]
            if buflen is None:
                return value if isinstance(value, int) else int.from_bytes(bytes(value)[:4], "little")
            return bytes(value) if not isinstance(value, int) else value.to_bytes(4, "little")[:buflen]
        if self._grid_unix and level in (_socket.IPPROTO_TCP, _socket.IPPROTO_IP, _socket.IPPROTO_IPV6):
            return 0 if buflen is None else bytes(buflen)
        return super().getsockopt(level, optname) if buflen is None else super().getsockopt(level, optname, buflen)

    def dup(self):
        sock = super().dup()
        for name in ("_grid_peer", "_grid_local", "_grid_unix"):
            setattr(sock, name, getattr(self, name))
        sock._grid_opts = dict(self._grid_opts)
        return sock

    def close(self):
        # One lock for all: two threads closing one socket must not dup a descriptor number the
        # other has closed and the kernel has given to someone else meanwhile.
        with _CLOSE_LOCK:
            for channel in (self._grid_channel, self._grid_pending and self._grid_pending[0]):
                if channel is not None:
                    channel.release()
            self._grid_channel = self._grid_pending = None
            # (_io_refs: socket.socket's count of open makefile() objects; typeshed omits the private name)
            if ("listening",) in self._grid_opts and self.fileno() != -1 \
                    and not self._io_refs:  # type: ignore[attr-defined]
                # The grid port is free again when close() returns, as a kernel port would be.
                self._grid_opts.pop(("listening",))
                listener, self._grid_listener = self._grid_listener, None
                if listener is not None:  # (a dup() has none: the port is served until the last close)
                    listener.release()
            super().close()

    def detach(self):
        self._grid_listener = None  # (the descriptor lives on: its listener serves the port while it does)
        channel, self._grid_channel = self._grid_channel, None
        if channel is not None:
            channel.close()
        return super().detach()


_ssl_class: Optional[type] = None


def ssl_socket_class() -> Optional[type]:
    """``GridSSLSocket``: ``ssl.SSLSocket`` on grid sockets, the class ``SSLContext.wrap_socket``
    makes once the personality is patched in (``ssl.SSLContext.sslsocket_class``). Made on
    first use (the personality imports ``ssl`` only when the program does).

    ``SSLSocket._create`` builds the new object on the wrapped socket's descriptor and detaches
    the old one; the grid state (the grid port a bound socket holds, a listener, grid
    addresses) moves with the descriptor (:func:`_hand_over`), so ``listen()``, ``accept()``,
    ``connect()``, ``getsockname()`` and ``getpeername()`` of the wrapped socket are the grid
    socket's. The wrap asks ``getpeername()`` (ENOTCONN on a listener) and then ``recv(1)``
    (refused here on a listener: its descriptor carries agent announcements, not data).

    None if ``ssl.SSLSocket`` cannot be combined with :class:`GridSocket` (it was built on
    another socket class: gevent's, imported while gevent patches).
    """
    global _ssl_class
    import ssl

    if _ssl_class is not None and issubclass(_ssl_class, ssl.SSLSocket) and issubclass(_ssl_class, GridSocket):
        return _ssl_class

    if _RealSocket not in ssl.SSLSocket.__mro__:
        return None

    class GridSSLSocket(ssl.SSLSocket, GridSocket):
        __doc__ = ssl_socket_class.__doc__

        @classmethod
        def _create(cls, sock, *args, **kwargs):  # (ssl's private constructor, the same in 3.9-3.13)
            if not isinstance(sock, GridSocket):
                return super()._create(sock, *args, **kwargs)  # type: ignore[misc]
            _hand_over(sock)
            try:
                return super()._create(sock, *args, **kwargs)  # type: ignore[misc]
            finally:
                _give_back(sock)  # (only if the wrap failed before it took the descriptor)

        def recv(self, buflen=1024, flags=0):
            if ("listening",) in self._grid_opts:
                raise OSError(errno.ENOTCONN, "Transport endpoint is not connected")
            return super().recv(buflen, flags)

        def _grid_accepted_class(self) -> type:
            return GridSocket  # (SSLSocket.accept() wraps it: an SSLSocket has no public constructor)

    _ssl_class = GridSSLSocket
    return GridSSLSocket


# --- names ---------------------------------------------------------------------------------------


def _lookup(host) -> Optional[dict]:
    if _agent is None:
        return None
    if isinstance(host, bytes):
        host = host.decode("idna")
    if not isinstance(host, str) or not host or host == "localhost" or (_is_ip_literal(host) and not is_grid_ip(host)):
        return None
    found = _agent.lookup(host)
    if found is None and grid_name(host):
        raise _socket.gaierror(_socket.EAI_NONAME, f"no node {grid_name(host)!r} in the grid")
    return found


def getaddrinfo(host, port, family=0, type=0, proto=0, flags=0):
    found = _lookup(host)
    if found is None:
        return _real_getaddrinfo(host, port, family, type, proto, flags)
    if family not in (0, _socket.AF_UNSPEC, _socket.AF_INET):
        raise _socket.gaierror(_socket.EAI_ADDRFAMILY, f"grid node {found['name']} has only an IPv4 grid address")
    if type not in (0, _socket.SOCK_STREAM) or proto not in (0, _socket.IPPROTO_TCP):
        raise _socket.gaierror(_socket.EAI_SOCKTYPE, "the grid carries TCP streams only")
    port = _port_number(port)
    canon = found["name"] if flags & _socket.AI_CANONNAME else ""
    return [(_socket.AF_INET, _socket.SOCK_STREAM, _socket.IPPROTO_TCP, canon, (found["ip"], int(port or 0)))]


def gethostbyname(hostname):
    found = _lookup(hostname)
    return found["ip"] if found else _real_gethostbyname(hostname)


def gethostbyname_ex(hostname):
    found = _lookup(hostname)
    if found is None:
        return _real_gethostbyname_ex(hostname)
    return found["name"], [found["name"] + GRID_SUFFIX], [found["ip"]]


def gethostbyaddr(ip_address):
    found = _lookup(ip_address)
    if found is None:
        return _real_gethostbyaddr(ip_address)
    return found["name"], [found["name"] + GRID_SUFFIX], [found["ip"]]


def getnameinfo(sockaddr, flags):
    if not isinstance(sockaddr, tuple):
        sockaddr = None  # (the traceback must not keep the caller's object alive)
        raise TypeError("getnameinfo() argument 1 must be a tuple")
    host = sockaddr[0] if sockaddr else None
    found = _lookup(host) if is_grid_ip(host) else None
    if found is None:
        return _real_getnameinfo(sockaddr, flags)
    name = found["ip"] if flags & _socket.NI_NUMERICHOST else found["name"]
    port = str(sockaddr[1])
    if not flags & _socket.NI_NUMERICSERV:
        try:
            port = _socket.getservbyport(int(sockaddr[1]), "tcp")
        except OSError:
            pass
    return name, port


def getfqdn(name=""):
    found = _lookup(name) if name and name not in _WILDCARDS else None
    return found["name"] if found else _real_getfqdn(name)
