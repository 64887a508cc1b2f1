"""The ``splice`` method: TCP simultaneous open, for two nodes that can both connect out only.

Theory of operation
-------------------
Behind a port-preserving NAT or a stateful firewall, a node accepts no new inbound connection,
but a SYN that arrives *in reply* to one it sent is let through. So both ends bind a port,
tell each other their public endpoints over the meta channel (the client in its assembly
request, the server in its answer), and connect to each other at the same time: each side's
SYN opens its own NAT or firewall for the other's, and the kernel turns two crossing SYNs into
one connection (TCP simultaneous open). A connect that is refused or times out is retried on a
fresh socket bound to the same port, until ``SPLICE_TIMEOUT_S``.

A node's public endpoint is its own address if that is public, otherwise the address its
cluster's leader was observed from by the rendez-vous node (the NAT's), with the bound port:
MASQUERADE keeps the port when it is free. When the NAT remaps a busy port, the connection
can land on another node: the client's first bytes are the preamble and the token, which the
server checks, and ``tls`` above checks the peer's certificate (use ``tls/splice``).
"""
from __future__ import annotations

import errno
import ipaddress
import time
from typing import Optional

import gevent
from gevent import socket as gsocket

from ..bootstrap.transport import Address, parse_address
from ..errors import ConnectError

__all__ = ["SpliceMethod", "bind_splice_socket", "splice_connect", "public_host", "routable", "SPLICE_TIMEOUT_S"]

# Both ends keep trying this long: long enough for the meta channel's round trip and one SYN
# retransmission, short enough to fall back to the relay well within a connect's budget.
SPLICE_TIMEOUT_S = 4.0
# One connect attempt; a SYN dropped by the other side's NAT is retried on a fresh socket.
SPLICE_ATTEMPT_S = 1.0
# Pause between attempts after a refusal (an RST from a NAT that has no mapping yet).
SPLICE_RETRY_S = 0.05
_PRIVATE_NETS = tuple(ipaddress.ip_network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16",
                                                         "100.64.0.0/10", "fc00::/7"))


class SpliceMethod:
    """Registry entry for ``splice``; :class:`gridsock.assembly.Assembler` drives it."""

    name = "splice"
    kind = "method"
    PARAMS: dict = {}
    LIMITS: dict = {}

    def __init__(self, **params) -> None:
        self.params = params


def is_private(host: str) -> bool:
    """True for RFC 1918, carrier-grade NAT and unique-local addresses (not routed publicly)."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    return any(ip in net for net in _PRIVATE_NETS if net.version == ip.version)


def public_host(entry, directory) -> Optional[str]:
    """Where the internet sees ``entry``: its own address if public, else its NAT's (observed)."""
    for text in entry.addrs:
        host = parse_address(text).host
        if host and not is_private(host):
            return host
    leader = directory.get(entry.leader) if entry.leader != entry.node_id else entry
    observed = (entry.observed or (leader.observed if leader else None))
    return parse_address(observed).host if observed else None


def routable(host: str) -> bool:
    """True if this host has a route towards ``host`` (a UDP connect sends nothing)."""
    probe = gsocket.socket(gsocket.AF_INET6 if ":" in host else gsocket.AF_INET, gsocket.SOCK_DGRAM)
    try:
        probe.connect((host, 9))
        return True
    except OSError:
        return False
    finally:
        probe.close()


def bind_splice_socket(port: int = 0):
    """A fresh TCP socket bound to ``port`` (0: any) on all addresses, reusable for retries."""
    sock = gsocket.socket(gsocket.AF_INET, gsocket.SOCK_STREAM)
    sock.setsockopt(gsocket.SOL_SOCKET, gsocket.SO_REUSEADDR, 1)
    if hasattr(gsocket, "SO_REUSEPORT"):
        sock.setsockopt(gsocket.SOL_SOCKET, gsocket.SO_REUSEPORT, 1)
    sock.bind(("0.0.0.0", port))
    return sock


def splice_connect(sock, remote: Address, *, timeout: float = SPLICE_TIMEOUT_S):
    """Connect ``sock`` (bound) to ``remote`` at the same time as the other side connects to us.

    Returns the connected socket (``sock`` or a fresh one bound to the same port). Raises
    ConnectError with the last reason when ``timeout`` passes.
    """
    port = sock.getsockname()[1]
    deadline = time.monotonic() + timeout
    last = "no attempt"
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            sock.close()
            raise ConnectError(f"splice to {remote} from port {port}: {last}", peer=str(remote), method="splice")
        sock.settimeout(min(SPLICE_ATTEMPT_S, remaining))
        try:
            sock.connect((remote.host, remote.port))
            sock.settimeout(None)
            sock.setsockopt(gsocket.IPPROTO_TCP, gsocket.TCP_NODELAY, 1)
            return sock
        except gsocket.timeout:
            last = "no answer"
        except OSError as exc:
            last = exc.strerror or str(exc)
            if exc.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH):
                sock.close()
                raise ConnectError(f"splice to {remote}: {last}", peer=str(remote), method="splice") from exc
            gevent.sleep(SPLICE_RETRY_S)
        sock.close()
        sock = bind_splice_socket(port)
