"""The ``tcp`` method: a direct TCP connection to the peer's node port.

The client dials the server node's advertised addresses and sends the data-connection preamble
with the assembly token, in the same moment as the assembly request leaves over the meta
channel (:mod:`gridsock.assembly` does both). With no filter above it, the application gets the
kernel TCP socket itself: nothing of gridsock sits on the data path.
"""
from __future__ import annotations

__all__ = ["TcpMethod"]


class TcpMethod:
    """Registry entry for ``tcp``; :class:`gridsock.assembly.Assembler` does the work."""

    name = "tcp"
    kind = "method"
    PARAMS: dict = {}
    LIMITS: dict = {}

    def __init__(self, **params) -> None:
        self.params = params
