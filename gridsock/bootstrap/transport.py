"""Bootstrap transports: addresses, dialing and listening, TLS on top, under gevent.

An address is ``HOST:PORT`` (TCP) or ``unix:PATH`` (a Unix socket, for the nodes of one host).
Dialing returns a cooperative gevent socket; :func:`tls_client` and :func:`tls_server` run
the TLS handshake with a deadline so a silent peer can never hold a greenlet forever, and
return a :class:`~gridsock.bootstrap.tlssocket.BufferedTLSSocket` (OpenSSL over memory
buffers: many TLS records per system call, for links that carry relayed data).
"""
from __future__ import annotations

import errno
import os
import ssl
import stat
from dataclasses import dataclass
from typing import Optional

import gevent
from gevent import socket as gsocket

from ..errors import AuthError, ConfigError, ConnectError, ConnectTimeoutError
from .tlssocket import BufferedTLSSocket

__all__ = ["Address", "parse_address", "dial", "listen", "tls_client", "tls_server", "CONNECT_TIMEOUT_S"]

# Dialing a bootstrap peer (TCP connect, or the SSH tunnel) gives up after this long.
CONNECT_TIMEOUT_S = 5.0
LISTEN_BACKLOG = 128


@dataclass(frozen=True)
class Address:
    """A TCP ``host:port`` or a Unix socket path."""

    host: Optional[str] = None
    port: int = 0
    path: Optional[str] = None

    @property
    def is_unix(self) -> bool:
        return self.path is not None

    def __str__(self) -> str:
        if self.path is not None:
            return f"unix:{self.path}"
        host = f"[{self.host}]" if self.host and ":" in self.host else self.host
        return f"{host}:{self.port}"


def parse_address(text: str, *, default_port: int | None = None) -> Address:
    """Parse ``HOST:PORT``, ``[V6]:PORT``, ``HOST`` (with ``default_port``) or ``unix:PATH``.

    Raises ConfigError on anything else.
    """
    if not isinstance(text, str) or not text:
        raise ConfigError(f"bad address {text!r}: expected HOST:PORT or unix:PATH")
    if text.startswith("unix:"):
        path = text[5:]
        if not path:
            raise ConfigError(f"bad address {text!r}: empty Unix socket path")
        return Address(path=path)
    host, sep, port_text = text.rpartition(":")
    if not sep or (host.count(":") and not host.startswith("[")):
        if default_port is None:
            raise ConfigError(f"bad address {text!r}: expected HOST:PORT or unix:PATH")
        host, port_text = text, str(default_port)
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host:
        raise ConfigError(f"bad address {text!r}: empty host")
    try:
        port = int(port_text)
    except ValueError:
        raise ConfigError(f"bad address {text!r}: port {port_text!r} is not a number") from None
    if not 0 <= port < 65536:
        raise ConfigError(f"bad address {text!r}: port out of range")
    return Address(host=host, port=port)


def dial(address: Address, *, timeout: float = CONNECT_TIMEOUT_S):
    """Connect to ``address``; return a gevent socket. Raises ConnectError with the reason."""
    try:
        if address.path is not None:  # (address.is_unix, spelt so that the type checker sees it)
            sock = gsocket.socket(gsocket.AF_UNIX, gsocket.SOCK_STREAM)
            sock.settimeout(timeout)
            try:
                sock.connect(address.path)
            except BaseException:
                sock.close()
                raise
        else:
            sock = gsocket.create_connection((address.host, address.port), timeout=timeout)
            sock.setsockopt(gsocket.IPPROTO_TCP, gsocket.TCP_NODELAY, 1)  # control messages are small
            sock.setsockopt(gsocket.SOL_SOCKET, gsocket.SO_KEEPALIVE, 1)
        sock.settimeout(None)
        return sock
    except gsocket.timeout as exc:
        raise ConnectTimeoutError(f"connecting to {address} timed out after {timeout:.1f} s", peer=str(address),
                                  method="tcp") from exc
    except OSError as exc:
        raise ConnectError(
            f"cannot connect to {address}: {exc.strerror or exc}", peer=str(address), method="tcp"
        ) from exc


def listen(address: Address):
    """Return a listening gevent socket on ``address`` (port 0: the kernel picks).

    A stale Unix socket file left by a dead process is replaced; a live one is an error.
    """
    if address.path is not None:  # (address.is_unix)
        path = address.path
        if os.path.exists(path):
            if not stat.S_ISSOCK(os.stat(path).st_mode):
                raise ConfigError(f"{path} exists and is not a socket")
            probe = gsocket.socket(gsocket.AF_UNIX, gsocket.SOCK_STREAM)
            try:
                probe.connect(path)
            except OSError:
                os.unlink(path)  # nobody listens: stale
            else:
                raise ConfigError(f"{path}: another process is already listening there")
            finally:
                probe.close()
        sock = gsocket.socket(gsocket.AF_UNIX, gsocket.SOCK_STREAM)
        old_umask = os.umask(0o077)  # only our user may talk to it
        try:
            sock.bind(path)
        finally:
            os.umask(old_umask)
    else:
        family = gsocket.AF_INET6 if ":" in (address.host or "") else gsocket.AF_INET
        sock = gsocket.socket(family, gsocket.SOCK_STREAM)
        sock.setsockopt(gsocket.SOL_SOCKET, gsocket.SO_REUSEADDR, 1)
        try:
            sock.bind((address.host or "0.0.0.0", address.port))
        except OSError as exc:
            sock.close()
            if exc.errno == errno.EADDRINUSE:
                raise ConfigError(f"cannot listen on {address}: address already in use") from exc
            raise ConfigError(f"cannot listen on {address}: {exc.strerror or exc}") from exc
    sock.listen(LISTEN_BACKLOG)
    return sock


def tls_client(sock, context, *, timeout: float):
    """Run the client TLS handshake on ``sock``; return the TLS socket.

    Raises AuthError when the handshake fails (a certificate refused, not TLS at all: the
    ``ssl.SSLError`` is its ``__cause__``), ConnectError when the connection fails during it,
    ConnectTimeoutError after ``timeout`` seconds; closes ``sock`` on failure.
    """
    return _handshake(sock, context, server_side=False, timeout=timeout)


def tls_server(sock, context, *, timeout: float):
    """Run the server TLS handshake on ``sock``; see :func:`tls_client`."""
    return _handshake(sock, context, server_side=True, timeout=timeout)


def _handshake(sock, context, *, server_side: bool, timeout: float):
    tls = BufferedTLSSocket(sock, context, server_side=server_side)
    try:
        with gevent.Timeout(timeout, ConnectTimeoutError(f"TLS handshake took more than {timeout:.1f} s",
                                                         method="tls")):
            tls.do_handshake()
    except ssl.SSLError as exc:  # the one place the bootstrap meets ssl's errors: translated here
        tls.close()
        why = getattr(exc, "verify_message", None) or exc.reason or str(exc)
        raise AuthError(f"TLS handshake failed: {why}", method="tls") from exc
    except OSError as exc:
        tls.close()
        raise ConnectError(f"connection lost during the TLS handshake: {exc.strerror or exc}", method="tls") from exc
    except BaseException:
        tls.close()
        raise
    return tls
