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

A server in a private network with gateways (:func:`gridsock.rules.gateways_of`: the SSH
gateway its uplink uses, its SOCKS proxy, its leader's) dials a client outside its cluster
through them, in order, before it tries directly: that is how the outside reaches a private
cluster without any rules. The answer's ``via`` names the gateway used (absent: direct), and
the client's stream info carries it.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Dict, List, Optional, Tuple

import gevent

from ..bootstrap.transport import dial
from ..errors import ConfigError, ConnectError
from ..methods import Arrival, Initiation, InitiatorContext, Method, MethodRefusal, ResponderContext
from ..streams import SocketStream, Stream
from .tcp import dial_with_preamble

__all__ = ["ReverseMethod"]

log = logging.getLogger(__name__)


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
        info: Dict[str, Any] = {"method": "reverse"}
        via = answer.get("via")
        if isinstance(via, str):
            info["via"] = via
        return SocketStream(sock, info=info)

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
        reasons = []
        for via, dial_one in _dialers(ctx):
            try:
                sock = dial_with_preamble(dial_one, client.addrs, ctx.token, timeout=ctx.request_timeout,
                                          method=self.name, node=ctx.node)
            except ConnectError as exc:
                reasons.append(f"through {via}: {exc.args[0]}" if via else exc.args[0])
                continue
            gevent.spawn(ctx.deliver, SocketStream(sock, info={"method": self.name, **({"via": via} if via else {})}))
            return {"via": via} if via else {}
        raise MethodRefusal("unreachable", f"{ctx.me.name} cannot connect back to {client.name}: {'; '.join(reasons)}")


def _dialers(ctx: ResponderContext) -> List[Tuple[Optional[str], Callable[..., Any]]]:
    """How the responder dials the client: ``(via, dial_one)`` in order; ``via`` names the
    gateway (a method layer such as ``ssh(gateway=...)``) or is None for a direct dial.

    Through the node's gateways first to a client outside its cluster, then directly.
    """
    from ..registry import default_registry
    from ..rules import gateways_of, same_cluster
    from ..stack import Stack

    out: List[Tuple[Optional[str], Callable[..., Any]]] = []
    if not same_cluster(ctx.me, ctx.client):
        for text in gateways_of(ctx.node):
            try:
                method = default_registry.create(Stack.parse(text).method)
            except ConfigError as exc:  # (checked when the directory took it: a bug if it happens)
                log.warning("node %s: unusable gateway %s: %s", ctx.me.name, text, exc)
                continue
            out.append((text, method.dial))
    return out + [(None, lambda address, node, timeout: dial(address, timeout=timeout))]
