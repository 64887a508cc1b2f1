"""multiprocessing.connection and multiprocessing.managers on grid addresses, without patching ``socket``.

Theory of operation
-------------------
:class:`Listener` and :func:`Client` are ``multiprocessing.connection``'s for ``(host, port)``
addresses whose host may be a grid host: a listener bound to the wildcard (``""``,
``"0.0.0.0"``), to this node's grid address or to its name serves that grid port through the
agent of this host (``$GRIDSOCK_AGENT``), and its ``address`` is ``(grid address, port)``, which
any node of the grid can give to :func:`Client`. Connections are
``multiprocessing.connection.Connection`` objects on the grid connection's descriptor.

Only the socket is ours. The authkey handshake is the stdlib's, as the stdlib's ``Listener`` and
``Client`` run it on each CPython: :class:`Listener` *is* a ``multiprocessing.connection.Listener``
(its ``accept()`` runs ``deliver_challenge`` then ``answer_challenge``, on 3.13 for any authkey
that is not None, before for a non-empty one), and :func:`Client` runs ``answer_challenge`` then
``deliver_challenge`` when an authkey is given, as every version does. Other families (Unix
sockets, Windows pipes), and everything when there is no agent, go to ``multiprocessing.connection``
unchanged.

Managers: ``multiprocessing.managers`` finds its listener and client classes in
``listener_client[serializer]`` everywhere (the server, ``BaseManager.connect``, every proxy,
``AutoProxy``), so this module adds two entries there (it replaces none) for serializers of its
own, ``gridsock-pickle`` and ``gridsock-xmlrpclib``, mapping to :class:`Listener` and
:func:`Client`. :class:`GridManager` (a ``BaseManager``) and :class:`GridSyncManager` (a
``SyncManager``) use them: their servers listen, and their clients and proxies connect, through
the grid. A proxy carries its serializer when it is pickled; the name is an instance of a ``str``
subclass of this module, whose unpickling imports the module, so a process that receives a grid
proxy (a spawned child, say) can use it without importing this module first.
"""
from __future__ import annotations

import multiprocessing.connection as _mpc
import multiprocessing.managers as _managers
import socket
import xmlrpc.client
from typing import TYPE_CHECKING, Any, Callable, Dict, Tuple

from gridsock.personalities.socket import GridSocket, agent

__all__ = ["Listener", "Client", "GridManager", "GridSyncManager", "SERIALIZERS"]

# What this module uses of multiprocessing that every CPython 3 has but typeshed does not declare
# (module helpers, the managers' serializer table and the xmlrpclib serializer's classes), named
# once here with their types.
_address_type: Callable[[Any], str] = _mpc.address_type  # type: ignore[attr-defined]
_arbitrary_address: Callable[[str], Any] = _mpc.arbitrary_address  # type: ignore[attr-defined]
_default_family: str = _mpc.default_family  # type: ignore[attr-defined]
_ConnectionWrapper: Callable[[Any, Callable[[Any], bytes], Callable[[bytes], Any]], Any] = \
    _mpc.ConnectionWrapper  # type: ignore[attr-defined]
_listener_client: Dict[str, Tuple[Any, Any]] = _managers.listener_client  # type: ignore[attr-defined]
if TYPE_CHECKING:  # XmlListener is a Listener whose accept() wraps the connection
    _StdXmlListener = _mpc.Listener
else:
    _StdXmlListener = _mpc.XmlListener


# --- multiprocessing.connection ------------------------------------------------------------------


class _GridSocketListener:
    """``multiprocessing.connection.SocketListener`` for AF_INET, on a GridSocket."""

    def __init__(self, address, backlog: int) -> None:
        self._socket = GridSocket(socket.AF_INET)
        try:
            self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # (as the stdlib, on POSIX)
            self._socket.setblocking(True)
            self._socket.bind(address)
            self._socket.listen(backlog)
            self._address = self._socket.getsockname()
        except OSError:
            self._socket.close()
            raise
        self._family = "AF_INET"
        self._last_accepted = None
        self._unlink = None

    def accept(self):
        sock, self._last_accepted = self._socket.accept()
        sock.setblocking(True)
        return _mpc.Connection(sock.detach())

    def close(self) -> None:
        self._socket.close()


class Listener(_mpc.Listener):
    """``multiprocessing.connection.Listener`` (same arguments) serving grid ports.

    An AF_INET listener (``address`` a ``(host, port)`` tuple) is bound with a GridSocket:
    ``("", 0)`` serves a grid port the agent picks, and ``address`` is then ``(grid address,
    port)``. ``accept()`` returns a ``Connection`` and raises ``multiprocessing.AuthenticationError``
    when the client fails the authkey challenge. Binding raises ``OSError(EADDRINUSE)`` for a
    taken grid port and ``ConnectionRefusedError`` when no agent answers.
    """

    def __init__(self, address=None, family=None, backlog=1, authkey=None):
        family = family or (address and _address_type(address)) or _default_family
        if family != "AF_INET" or agent() is None:
            super().__init__(address, family, backlog, authkey)
            return
        if authkey is not None and not isinstance(authkey, bytes):
            raise TypeError("authkey should be a byte string")
        # The stdlib Listener's state: accept(), close(), address and last_accepted are its own.
        self._listener = _GridSocketListener(address or _arbitrary_address(family), backlog)
        self._authkey = authkey


def Client(address, family=None, authkey=None):
    """``multiprocessing.connection.Client`` (same arguments) reaching grid hosts.

    Returns a ``Connection``. Raises ``multiprocessing.AuthenticationError`` when the authkeys
    differ, ``ConnectionRefusedError`` when nothing listens on the grid port, ``socket.gaierror``
    for a ``.grid`` name the grid does not know.
    """
    family = family or _address_type(address)
    if family != "AF_INET" or agent() is None:
        return _mpc.Client(address, family, authkey)
    with GridSocket(socket.AF_INET) as sock:
        sock.setblocking(True)
        sock.connect(address)
        connection = _mpc.Connection(sock.detach())
    try:
        if authkey is not None and not isinstance(authkey, bytes):
            raise TypeError("authkey should be a byte string")
        if authkey is not None:
            _mpc.answer_challenge(connection, authkey)
            _mpc.deliver_challenge(connection, authkey)
    except BaseException:
        connection.close()
        raise
    return connection


class _XmlListener(Listener, _StdXmlListener):
    """``multiprocessing.connection.XmlListener`` on grid ports (its ``accept()`` is the stdlib's)."""


def _xml_client(*args, **kwargs):
    """``multiprocessing.connection.XmlClient`` reaching grid hosts."""
    return _ConnectionWrapper(Client(*args, **kwargs), _xml_dumps, _xml_loads)


def _xml_dumps(obj) -> bytes:
    return xmlrpc.client.dumps((obj,), None, None, None, allow_none=True).encode("utf-8")


def _xml_loads(data: bytes):
    (obj,), _ = xmlrpc.client.loads(data.decode("utf-8"))
    return obj


# --- multiprocessing.managers --------------------------------------------------------------------


class _Serializer(str):
    """A serializer name of this module. A pickled proxy carries its serializer; unpickling an
    instance of this class imports the module that defines it, which registers the name."""


#: The stdlib's serializer names -> this module's, which multiprocessing.managers maps to
#: :class:`Listener` and :func:`Client`.
SERIALIZERS: Dict[str, _Serializer] = {"pickle": _Serializer("gridsock-pickle"),
                                       "xmlrpclib": _Serializer("gridsock-xmlrpclib")}
_BY_NAME = {str(name): name for name in SERIALIZERS.values()}
_listener_client[SERIALIZERS["pickle"]] = (Listener, Client)
_listener_client[SERIALIZERS["xmlrpclib"]] = (_XmlListener, _xml_client)


def _grid_serializer(serializer: str) -> _Serializer:
    if serializer in _BY_NAME:
        return _BY_NAME[serializer]
    if serializer not in SERIALIZERS:
        raise KeyError(serializer)  # (what BaseManager raises for a serializer it does not know)
    return SERIALIZERS[serializer]


class GridManager(_managers.BaseManager):
    """``multiprocessing.managers.BaseManager`` (same arguments) whose server listens, and whose
    clients and proxies connect, with :class:`Listener` and :func:`Client`.

    ``address=("", 0)`` serves a grid port; ``address`` (after ``start()``, or
    ``get_server().address``) is then ``(grid address, port)``, for ``connect()`` from any node.
    ``address=None`` keeps the stdlib's default: a Unix socket, reachable on this host only.
    Subclass it and ``register()`` typeids on the subclass, as with ``BaseManager``; put it first
    among the bases to make another manager class grid-aware: ``class M(GridManager, Other)``.
    ``serializer``: ``"pickle"`` or ``"xmlrpclib"``.
    """

    def __init__(self, address=None, authkey=None, serializer="pickle", ctx=None, **kwargs):
        super().__init__(address, authkey, _grid_serializer(serializer), ctx, **kwargs)


class GridSyncManager(GridManager, _managers.SyncManager):
    """``multiprocessing.managers.SyncManager`` on the grid: ``Queue()``, ``dict()``, ``Lock()``
    ... served on a grid port; see :class:`GridManager`."""

    # Its own copy: a typeid registered on GridManager must not hide SyncManager's.
    _registry = dict(_managers.SyncManager._registry)  # type: ignore[attr-defined]  # (BaseManager's, undeclared)
