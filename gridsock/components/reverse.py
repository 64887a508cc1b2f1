"""The ``reverse`` method: the server connects back to the client.

For a server that can connect out but not accept (behind NAT or a stateful firewall) and a
client that can accept: the client registers its token and sends the assembly request; the
server dials the client's node port, sends the preamble and the token, and answers the request
once the connection is made (or with the reason it could not be). The client's node port hands
the connection to the waiting connect. TCP roles are swapped; the filters above keep the
logical roles (the client is the TLS client), and ``tls`` proves each side's node id, which
matters here: a connection back through a NAT could land on another node.
"""
from __future__ import annotations

from .tcp import TcpMethod

__all__ = ["ReverseMethod"]


class ReverseMethod(TcpMethod):
    """``reverse``: the server dials the client (see the module docstring)."""

    name = "reverse"
    PARAMS: dict = {}
    LIMITS: dict = {}
