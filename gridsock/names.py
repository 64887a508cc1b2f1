"""Grid names and grid addresses: how programs that speak IP name the nodes of a grid.

Theory of operation
-------------------
A program under the socket personality resolves ``b2`` (or ``b2.grid``) and connects to the
address it got, or hands that address to another process (``multiprocessing.managers`` does).
So every node has one *grid address*, the same on every host of the grid: an IPv4 address in
``GRID_NET`` (240.0.0.0/4, reserved and never routed, so a grid address that escapes to the
kernel fails at once instead of reaching someone). It is derived from the node's UUID, which is
the same everywhere, so no table has to travel: ``grid_ip(node_id)``. With 2**28 addresses,
two nodes of a grid of 1,000 collide with odds of about 1 in 500,000; the agent refuses an
address two nodes of its directory share rather than guess (a future rendez-vous node can
assign them).

This module does no I/O and imports nothing heavy: the personality, which runs inside
applications, uses it.
"""
from __future__ import annotations

import hashlib
import ipaddress
import os
from typing import Optional

__all__ = ["GRID_NET", "GRID_SUFFIX", "grid_ip", "is_grid_ip", "grid_name", "run_dir"]

#: Where grid addresses live: reserved (RFC 1112 "class E"), never routed.
GRID_NET = ipaddress.ip_network("240.0.0.0/4")
#: ``NAME.grid`` names node NAME, and never reaches the system resolver.
GRID_SUFFIX = ".grid"


def grid_ip(node_id: str) -> str:
    """The grid address of the node with UUID ``node_id``."""
    digest = hashlib.sha256(node_id.encode("ascii")).digest()
    host = int.from_bytes(digest[:4], "big") & (GRID_NET.num_addresses - 1)
    host = host or 1  # not the network address itself
    return str(GRID_NET.network_address + host)


def is_grid_ip(host: object) -> bool:
    """True for a textual IPv4 address inside GRID_NET."""
    if not isinstance(host, str):
        return False
    try:
        return ipaddress.IPv4Address(host) in GRID_NET
    except ValueError:
        return False


def grid_name(host: str) -> Optional[str]:
    """``"b2"`` for ``"b2.grid"`` (any case of the suffix), else None."""
    if host.lower().endswith(GRID_SUFFIX) and len(host) > len(GRID_SUFFIX):
        return host[: -len(GRID_SUFFIX)]
    return None


def run_dir() -> str:
    """The directory holding the control and agent sockets of this host's gridsock processes:
    $GRIDSOCK_RUN_DIR or /tmp/gridsock-<uid>. (Here, not in the bootstrap package, because the
    personality's launcher needs it before it patches, and must import no gevent or ssl first.)"""
    return os.environ.get("GRIDSOCK_RUN_DIR") or f"/tmp/gridsock-{os.getuid()}"
