"""HTTP clients that reach grid hosts without patching ``socket``: http.client, urllib, requests.

Theory of operation
-------------------
A program that does not run under the socket personality (no ``python -m gridsock.monkey``)
still reaches ``http://nb.grid:8000/`` through these classes, whose only difference from the
stdlib's is how the TCP connection is made: by
:func:`gridsock.personalities.socket.create_connection`, which asks the agent of this host
(``$GRIDSOCK_AGENT``) for a connection to a grid host and passes every other host to the stdlib's
``socket.create_connection``. Everything above the connection (HTTP, TLS with the usual
``ssl.SSLContext`` and host name checks, proxies, redirects) is the stdlib's or urllib3's own code.
With no agent, every class here behaves exactly as the one it extends.

- :class:`HTTPConnection`, :class:`HTTPSConnection`: ``http.client``'s, connecting through the
  grid; ``timeout`` and ``source_address`` go to the personality's ``create_connection`` as
  http.client gives them to the stdlib's.
- :class:`GridHTTPHandler`, :class:`GridHTTPSHandler`, :func:`build_opener`, :func:`urlopen`:
  ``urllib.request`` with those connections.
- :class:`GridAdapter` (when ``requests`` is installed): a transport adapter whose urllib3 pools
  make their connections through the grid (urllib3's ``HTTPConnection._new_conn`` is the one
  place a connection's socket is made; ``HTTPConnectionPool.ConnectionCls`` picks the class, and
  ``PoolManager.pool_classes_by_scheme`` the pool: urllib3's own SOCKS support works the same way).

Errors are the stdlib's (``ConnectionRefusedError``, ``TimeoutError``, ``socket.gaierror`` for a
``.grid`` name the grid does not know), wrapped as usual by urllib (``URLError``) and by
urllib3/requests (``NewConnectionError``, ``NameResolutionError``, ``ConnectTimeoutError``).
"""
from __future__ import annotations

import http.client
import socket
import sys
import urllib.request
from typing import Any, Dict, Optional

from gridsock.personalities.socket import create_connection, is_grid_host

__all__ = ["HTTPConnection", "HTTPSConnection", "GridHTTPHandler", "GridHTTPSHandler", "build_opener", "urlopen"]


def _is_grid_host(host: Any) -> bool:
    """True if connections to ``host`` go through the grid (the personality's rule: node names,
    ``NAME.grid``, grid addresses, loopback in force mode). urllib3 must know before it makes its
    socket: its own ``create_connection`` resolves names and sets socket options first."""
    return isinstance(host, str) and is_grid_host(host)


# --- http.client ---------------------------------------------------------------------------------


class HTTPConnection(http.client.HTTPConnection):
    """``http.client.HTTPConnection`` whose ``connect()`` reaches grid hosts too."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # http.client's connect() calls this with ((host, port), timeout, source_address); every
        # CPython since 3.4 has the hook, and it keeps connect() itself (audit event, TCP_NODELAY,
        # CONNECT tunnels) the stdlib's.
        self._create_connection = create_connection


class HTTPSConnection(http.client.HTTPSConnection):
    """``http.client.HTTPSConnection`` whose ``connect()`` reaches grid hosts too; TLS runs over
    the grid connection with the connection's ``ssl.SSLContext``, checking the host name as given
    (``nb.grid``: the server's certificate must name it)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._create_connection = create_connection


# --- urllib.request ------------------------------------------------------------------------------

_GRID_CLASSES = {http.client.HTTPConnection: HTTPConnection, http.client.HTTPSConnection: HTTPSConnection}


class GridHTTPHandler(urllib.request.HTTPHandler):
    """``urllib.request.HTTPHandler`` opening its connections with :class:`HTTPConnection`."""

    def do_open(self, http_class, req, **http_conn_args):
        # Swap the class, not https_open()'s arguments: they differ between CPython versions.
        return super().do_open(_GRID_CLASSES.get(http_class, http_class), req, **http_conn_args)


class GridHTTPSHandler(urllib.request.HTTPSHandler):
    """``urllib.request.HTTPSHandler`` (same arguments: ``context``, ``check_hostname``) opening
    its connections with :class:`HTTPSConnection`."""

    def do_open(self, http_class, req, **http_conn_args):
        return super().do_open(_GRID_CLASSES.get(http_class, http_class), req, **http_conn_args)


def build_opener(*handlers) -> urllib.request.OpenerDirector:
    """``urllib.request.build_opener(*handlers)`` with the grid handlers in place of the stdlib's
    HTTP and HTTPS handlers. Returns the opener.

    Raises TypeError for a stdlib ``HTTPHandler`` or ``HTTPSHandler`` that is not a grid one: it
    would compete with the grid handler for the same URLs (pass ``GridHTTPSHandler(context=...)``).
    """
    extra = []
    for grid_class, stdlib_class in ((GridHTTPHandler, urllib.request.HTTPHandler),
                                     (GridHTTPSHandler, urllib.request.HTTPSHandler)):
        classes = [h if isinstance(h, type) else type(h) for h in handlers]
        if any(issubclass(c, stdlib_class) and not issubclass(c, grid_class) for c in classes):
            raise TypeError(f"build_opener: use {grid_class.__name__} instead of {stdlib_class.__name__}")
        if not any(issubclass(c, grid_class) for c in classes):
            extra.append(grid_class)
    return urllib.request.build_opener(*extra, *handlers)


_opener: Optional[urllib.request.OpenerDirector] = None
# urlopen()'s "no timeout given" sentinel, the socket module's (typeshed does not declare this private name).
_GLOBAL_DEFAULT_TIMEOUT: object = socket._GLOBAL_DEFAULT_TIMEOUT  # type: ignore[attr-defined]


def urlopen(url, data=None, timeout=_GLOBAL_DEFAULT_TIMEOUT, *, context=None):
    """``urllib.request.urlopen`` reaching grid hosts too (``context``: the ``ssl.SSLContext``
    for https URLs). Returns what urllib's ``urlopen`` returns and raises what it raises
    (``URLError`` wrapping the connection's error, ``HTTPError``)."""
    global _opener
    if context is not None:
        opener = build_opener(GridHTTPSHandler(context=context))
    elif _opener is None:
        _opener = opener = build_opener()
    else:
        opener = _opener
    return opener.open(url, data, timeout)


# --- urllib3 and requests ------------------------------------------------------------------------

try:
    import urllib3.connection
    import urllib3.connectionpool
    import urllib3.exceptions
    from urllib3.util.timeout import Timeout
except ImportError:  # urllib3 is optional: its classes exist only with it
    pass
else:
    # urllib3 2 names a failed lookup; urllib3 1.26 calls it a failed connection.
    _NameResolutionError = getattr(urllib3.exceptions, "NameResolutionError", None)

    class _GridNewConn(urllib3.connection.HTTPConnection):
        """Mixin for urllib3 connections (put first among the bases): ``_new_conn`` makes grid
        connections through the agent and leaves every other host to the next class's."""

        def _new_conn(self) -> socket.socket:
            if not _is_grid_host(self.host):
                return super()._new_conn()
            try:
                sock = create_connection((self.host, self.port), Timeout.resolve_default_timeout(self.timeout),
                                         self.source_address)
            except socket.gaierror as exc:
                if _NameResolutionError is not None:
                    raise _NameResolutionError(self.host, self, exc) from exc
                raise urllib3.exceptions.NewConnectionError(self, f"Failed to resolve {self.host}: {exc}") from exc
            except (socket.timeout, TimeoutError) as exc:  # (distinct classes before Python 3.10)
                raise urllib3.exceptions.ConnectTimeoutError(
                    self, f"Connection to {self.host} timed out. (connect timeout={self.timeout})") from exc
            except OSError as exc:
                raise urllib3.exceptions.NewConnectionError(
                    self, f"Failed to establish a new connection: {exc}") from exc
            try:
                # After the connect: a grid connect puts a new descriptor in place of the socket's.
                for option in self.socket_options or ():
                    sock.setsockopt(*option)
            except BaseException:
                sock.close()
                raise
            sys.audit("http.client.connect", self, self.host, self.port)
            return sock

    class GridHTTPConnection(_GridNewConn, urllib3.connection.HTTPConnection):
        """urllib3's ``HTTPConnection``, reaching grid hosts too."""

    class GridHTTPSConnection(_GridNewConn, urllib3.connection.HTTPSConnection):
        """urllib3's ``HTTPSConnection``, reaching grid hosts too (TLS as urllib3 does it)."""

    class GridHTTPConnectionPool(urllib3.connectionpool.HTTPConnectionPool):
        ConnectionCls = GridHTTPConnection

    class GridHTTPSConnectionPool(urllib3.connectionpool.HTTPSConnectionPool):
        ConnectionCls = GridHTTPSConnection

    #: For ``urllib3.PoolManager().pool_classes_by_scheme``: pools of grid-aware connections.
    GRID_POOL_CLASSES: Dict[str, type] = {"http": GridHTTPConnectionPool, "https": GridHTTPSConnectionPool}
    __all__ += ["GridHTTPConnection", "GridHTTPSConnection", "GridHTTPConnectionPool", "GridHTTPSConnectionPool",
                "GRID_POOL_CLASSES"]

try:
    import requests.adapters
except ImportError:  # requests is optional: the adapter exists only with it
    pass
else:
    class GridAdapter(requests.adapters.HTTPAdapter):
        """A ``requests`` transport adapter reaching grid hosts: mount it on a session,
        ``session.mount("http://", GridAdapter())`` and ``"https://"``. Takes HTTPAdapter's
        arguments. Proxies (``proxies=``, ``$HTTP_PROXY``) are reached as urllib3 reaches them."""

        def init_poolmanager(self, *args, **kwargs) -> None:
            super().init_poolmanager(*args, **kwargs)
            self.poolmanager.pool_classes_by_scheme = GRID_POOL_CLASSES

    __all__ += ["GridAdapter"]
