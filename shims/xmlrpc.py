"""XML-RPC clients and servers on grid addresses, without patching ``socket``.

Theory of operation
-------------------
:class:`ServerProxy` is ``xmlrpc.client.ServerProxy`` with a transport whose HTTP connections
are :mod:`gridsock.shims.http`'s: ``ServerProxy("http://nb.grid:8000/")`` reaches node ``nb``
through the agent of this host (``$GRIDSOCK_AGENT``); ``https://`` URLs get TLS over the grid
connection with the given ``ssl.SSLContext``. Any other host is reached as the stdlib reaches it.

:class:`SimpleXMLRPCServer` is ``xmlrpc.server.SimpleXMLRPCServer`` whose listening socket is
a :class:`~gridsock.personalities.socket.GridSocket`: bound to the wildcard (``""``,
``"0.0.0.0"``), to this node's grid address or to its name, it serves that grid port (port 0:
the agent picks one, which ``server_address`` then tells, with this node's grid address); bound
to anything else (``127.0.0.1``, a real interface) it is an ordinary local server. With no agent
both classes are exactly the stdlib's.
"""
from __future__ import annotations

import socket
import urllib.parse
import xmlrpc.client
import xmlrpc.server
from xmlrpc.server import SimpleXMLRPCRequestHandler

from gridsock.personalities.socket import GridSocket, agent

from .http import HTTPConnection, HTTPSConnection

__all__ = ["ServerProxy", "Transport", "SafeTransport", "SimpleXMLRPCServer", "SimpleXMLRPCRequestHandler"]


class Transport(xmlrpc.client.Transport):
    """``xmlrpc.client.Transport`` over :class:`gridsock.shims.http.HTTPConnection`."""

    def make_connection(self, host):
        # The stdlib's make_connection (the same on CPython 3.9 to 3.13), with the grid class.
        if self._connection and host == self._connection[0]:
            return self._connection[1]  # HTTP/1.1 keep-alive
        chost, self._extra_headers, x509 = self.get_host_info(host)
        self._connection = host, HTTPConnection(chost)
        return self._connection[1]


class SafeTransport(xmlrpc.client.SafeTransport):
    """``xmlrpc.client.SafeTransport`` over :class:`gridsock.shims.http.HTTPSConnection`."""

    def make_connection(self, host):
        if self._connection and host == self._connection[0]:
            return self._connection[1]
        chost, self._extra_headers, x509 = self.get_host_info(host)
        # (SafeTransport.__init__ stores ``context``; typeshed's stub does not declare the attribute.)
        context = self.context  # type: ignore[attr-defined]
        self._connection = host, HTTPSConnection(chost, None, context=context, **(x509 or {}))
        return self._connection[1]


class ServerProxy(xmlrpc.client.ServerProxy):
    """``xmlrpc.client.ServerProxy`` (same arguments) reaching grid hosts: without a
    ``transport``, it uses :class:`Transport` or, for ``https`` URLs, :class:`SafeTransport`.

    Raises what the stdlib's raises: ``OSError`` for a scheme other than http and https; calls
    raise ``ConnectionRefusedError`` when nothing listens on the grid port, ``socket.gaierror``
    for a ``.grid`` name the grid does not know, ``xmlrpc.client.Fault`` for the server's errors.
    """

    def __init__(self, uri, transport=None, encoding=None, verbose=False, allow_none=False, use_datetime=False,
                 use_builtin_types=False, *, headers=(), context=None):
        if transport is None:
            scheme = urllib.parse.urlsplit(uri).scheme
            if scheme == "https":
                transport = SafeTransport(use_datetime=use_datetime, use_builtin_types=use_builtin_types,
                                          headers=headers, context=context)
            elif scheme == "http":
                transport = Transport(use_datetime=use_datetime, use_builtin_types=use_builtin_types, headers=headers)
            # (any other scheme: the stdlib raises OSError)
        super().__init__(uri, transport, encoding, verbose, allow_none, use_datetime, use_builtin_types,
                         headers=headers, context=context)


class SimpleXMLRPCServer(xmlrpc.server.SimpleXMLRPCServer):
    """``xmlrpc.server.SimpleXMLRPCServer`` (same arguments) serving a grid port when bound to
    the wildcard or to this node; see the module docstring.

    Raises what binding raises: ``OSError(EADDRINUSE)`` when the grid port is taken,
    ``ConnectionRefusedError`` when no agent answers at ``$GRIDSOCK_AGENT``.
    """

    def __init__(self, addr, requestHandler=SimpleXMLRPCRequestHandler, logRequests=True, allow_none=False,
                 encoding=None, bind_and_activate=True, use_builtin_types=False):
        super().__init__(addr, requestHandler, logRequests, allow_none, encoding, bind_and_activate=False,
                         use_builtin_types=use_builtin_types)
        if agent() is not None and self.address_family == socket.AF_INET:
            # socketserver made its socket with the module's socket class: trade it for a grid one
            # before anything is bound (what TCPServer.__init__ would do, with GridSocket).
            self.socket.close()
            self.socket = GridSocket(self.address_family, self.socket_type)
        if bind_and_activate:
            try:
                self.server_bind()
                self.server_activate()
            except BaseException:
                self.server_close()
                raise
