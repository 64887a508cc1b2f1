"""The ``socks`` method: TCP to the peer's node port through a SOCKS5 proxy.

``socks(proxy=HOST:PORT)`` reaches a node that is not directly reachable, through a SOCKS5 server
that can reach it (a cluster's front-end, say). PySocks drives the SOCKS handshake on an
original, blocking stdlib socket in gevent's thread pool, so the hub never blocks; the connected
socket is then handed to gevent. The application still gets a real kernel socket (to the proxy).
"""
from __future__ import annotations

import socket

import gevent
from gevent import socket as gsocket

from ..bootstrap.transport import Address, parse_address
from ..errors import ConfigError, ConnectError
from .tcp import CONNECT_TIMEOUT_S, TcpMethod

__all__ = ["SocksMethod"]


class SocksMethod(TcpMethod):
    """``socks(proxy=HOST:PORT)``: dial through a SOCKS5 proxy."""

    name = "socks"
    PARAMS = {"proxy": str}
    tier = "gateway"  # ranked after direct methods, before relay (gridsock.rules.tier)

    def __init__(self, proxy: str | None = None, **params) -> None:
        super().__init__(**params)
        if not proxy:
            raise ConfigError("socks needs a proxy: socks(proxy=HOST:PORT)")
        self.proxy = parse_address(proxy, default_port=1080)

    def explain(self, ctx, exc: ConnectError) -> ConnectError:
        return exc  # the proxy's own reason says it all: the directory's dial-back facts do not apply

    def dial(self, address: Address, *, node, timeout: float = CONNECT_TIMEOUT_S):
        if address.is_unix:
            raise ConnectError("a SOCKS proxy cannot reach a Unix socket", method="socks")
        sock = gevent.get_hub().threadpool.apply(_socks_connect, (self.proxy, address, timeout))
        if isinstance(sock, BaseException):
            raise sock
        gsock = gsocket.socket(fileno=sock.detach())
        gsock.settimeout(None)
        gsock.setsockopt(gsocket.IPPROTO_TCP, gsocket.TCP_NODELAY, 1)
        return gsock


def _socks_connect(proxy: Address, address: Address, timeout: float):
    """In a worker thread: the connected stdlib socket, or the ConnectError to raise."""
    import socks  # PySocks

    sock = socks.socksocket(socket.AF_INET, socket.SOCK_STREAM)
    sock.set_proxy(socks.SOCKS5, proxy.host, proxy.port, rdns=True)
    sock.settimeout(timeout)
    assert address.host is not None  # (a TCP address: checked by the caller)
    try:
        sock.connect((address.host, address.port))
    except (socks.ProxyError, OSError) as exc:
        sock.close()
        why = getattr(exc, "msg", None) or str(exc)
        return ConnectError(f"through SOCKS5 proxy {proxy} to {address}: {why}", peer=str(address), method="socks")
    sock.settimeout(None)
    return sock
