"""The ``tcp`` method: a direct TCP connection to the peer's node port.

The client dials the server node's advertised addresses and sends the data-connection preamble
with the assembly token, in the same moment as the assembly request leaves over the meta
channel (:mod:`gridsock.assembly` does both). With no filter above it, the application gets the
kernel TCP socket itself: nothing of gridsock sits on the data path.

``socks`` and ``ssh`` are the same method through an intermediary: they differ only in how
:meth:`TcpMethod.dial` reaches the address; the server side (node port, token) is the same.
"""
from __future__ import annotations

from ..bootstrap.transport import Address, dial

__all__ = ["TcpMethod", "CONNECT_TIMEOUT_S"]

# One dial attempt to one address gives up after this long.
CONNECT_TIMEOUT_S = 5.0


class TcpMethod:
    """``tcp``: dial the peer's node port directly."""

    name = "tcp"
    kind = "method"
    PARAMS: dict = {}
    LIMITS: dict = {}

    def __init__(self, **params) -> None:
        self.params = params

    def dial(self, address: Address, *, node, timeout: float = CONNECT_TIMEOUT_S):
        """Return a connected gevent socket to ``address``; ConnectError if it cannot."""
        return dial(address, timeout=timeout)
