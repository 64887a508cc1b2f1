"""The ``reverse`` method: the server connects back to the client.

Theory of operation
-------------------
For a server that can connect out but not accept (behind NAT or a stateful firewall) and a
client that can accept. Initiator: the client awaits one connection with its token on its own
node port (``ctx.expect(1)``) and sends the request. Responder: the server dials the client's
advertised addresses, sends the preamble with the token, and answers the request once the
connection is made, or refuses with code ``unreachable`` and the reason it could not (so the
client goes on with its next candidate). The client's node port hands the connection to the
waiting attempt. TCP roles are swapped; the filters above keep the logical roles (the client
is the TLS client), and ``tls`` proves each side's node id, which matters here: a connection
back through a NAT could land on another node.
"""
from __future__ import annotations

from typing import Any, Dict

import gevent

from ..bootstrap.transport import dial
from ..errors import ConnectError
from ..methods import Arrival, Initiation, InitiatorContext, Method, MethodRefusal, ResponderContext
from ..streams import SocketStream, Stream
from .tcp import dial_with_preamble

__all__ = ["ReverseMethod"]


class _CalledBack(Initiation):
    def __init__(self, ctx: InitiatorContext, arrival: Arrival) -> None:
        self.offer: Dict[str, Any] = {}
        self._ctx = ctx
        self._arrival = arrival

    def complete(self, answer: Dict[str, Any]) -> Stream:
        # The server answered once its connection back was made: it is here or arriving.
        try:
            (sock,) = self._arrival.wait(self._ctx.remaining())
        except TimeoutError as exc:
            raise self._ctx.fail(f"{self._ctx.peer.name}'s connection back did not arrive: {exc}",
                                 method="reverse") from None
        return SocketStream(sock, info={"method": "reverse"})

    def abort(self) -> None:
        self._arrival.cancel()  # a late call back is refused at once


class ReverseMethod(Method):
    """``reverse``: the server dials the client (see the module docstring)."""

    name = "reverse"

    def initiate(self, ctx: InitiatorContext) -> Initiation:
        if not ctx.me.addrs:
            raise ctx.fail(f"{ctx.me.name} advertises no address for {ctx.peer.name} to connect back to",
                           method=self.name)
        return _CalledBack(ctx, ctx.expect(1))

    def respond(self, ctx: ResponderContext) -> Dict[str, Any]:
        client = ctx.client
        if not client.addrs:
            raise MethodRefusal("unreachable", f"{client.name} advertises no address to connect back to")
        try:
            sock = dial_with_preamble(lambda address, node, timeout: dial(address, timeout=timeout), client.addrs,
                                      ctx.token, timeout=ctx.request_timeout, method=self.name)
        except ConnectError as exc:
            raise MethodRefusal("unreachable", f"{ctx.me.name} cannot connect back to {client.name}: {exc.args[0]}")
        gevent.spawn(ctx.deliver, SocketStream(sock, info={"method": self.name}))
        return {}
