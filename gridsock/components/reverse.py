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

Round trips: the client's node port has the connection, and in it the token that only the
server could have sent, before the server's answer comes: that arrival is the server's
acceptance. So the client completes on whichever comes first, the arrival or the answer
(:attr:`_CalledBack.arrived`, which the assembly races with the request); a refusal still
comes as the answer, with no arrival. It does so once that server's own answer said it dialed
back directly (remembered for :data:`DIRECT_KNOWN_S`): only the answer tells a connection that
came through one of the server's gateways (``via``), so the first connection to a server, one
whose directory entry (or its leader's) names gateways, and one after the memory expired wait
for it. The server dials with TCP Fast Open
(:func:`~gridsock.components.tcp.dial_fast_open`): once its host holds a cookie from the
client's (a first connection back asks for one), the preamble rides in the SYN and the client's
node port has it half a round trip after the request reached the server, so a connect costs
about one round trip, as a plain ``connect()`` the other way. Without Fast Open (the client's
host does not take it: ``net.ipv4.tcp_fastopen`` without the server bit 0x2) the token comes
with the handshake's last ACK, one round trip later (the floor is then two round trips). The
server answers once its connection is made (the handshake done, as before), or refuses.

With ``tls`` right above it, the server's first TLS flight rides behind the preamble, in the
same SYN where it fits (``sends_first_bytes``: see "Early handshake" in
gridsock.components.tls), not in the answer, which leaves only once the connection is made: so
the client, completing on the arrival, has the flight with it and ``tls/reverse`` costs what
``reverse`` costs, one round trip.

A server in a private network with gateways (:func:`gridsock.rules.gateways_of`: the SSH
gateway its uplink uses, its SOCKS proxy, its leader's) dials a client outside its cluster
through them, in order, before it tries directly: that is how the outside reaches a private
cluster without any rules. The answer's ``via`` names the gateway used (absent: direct), and
the client's stream info carries it.
"""
from __future__ import annotations

import logging
import time
import weakref
from typing import Any, Callable, Dict, List, Optional, Tuple

import gevent

from ..errors import ConfigError, ConnectError
from ..methods import Arrival, Initiation, InitiatorContext, Method, MethodRefusal, ResponderContext
from ..streams import SocketStream, Stream
from .tcp import dial_fast_open, dial_with_preamble

__all__ = ["ReverseMethod", "DIRECT_KNOWN_S"]

log = logging.getLogger(__name__)

# A server's answer that it dialed back directly (no ``via``) is remembered this long by its
# client, which meanwhile completes on the connection back without waiting for answers (module
# docstring): a server that took a gateway since, which its directory entry does not say, costs
# that long of connections without their ``via``; then an answer is waited for again.
DIRECT_KNOWN_S = 300.0

# Servers remembered per node before the expired ones are swept.
_DIRECT_KEPT = 1024
# node -> server node id -> time.monotonic() until which that server is known to dial directly
_dials_directly: "weakref.WeakKeyDictionary[Any, Dict[str, float]]" = weakref.WeakKeyDictionary()


def _captured_wait(arrival: Arrival, timeout: float):
    """``(sockets, None)`` once ``arrival``'s connections came, ``(None, TimeoutError)`` after
    ``timeout``: a greenlet that returns its failure is not reported by the hub as a crash."""
    try:
        return arrival.wait(timeout), None
    except TimeoutError as exc:
        return None, exc


class _CalledBack(Initiation):
    """The client's half: awaits the server's connection back on our node port.

    ``arrived``: when set (not None), a greenlet that is ready once the connection came (or the
    wait gave up); the assembly then completes this attempt without waiting for the answer
    (module docstring). None when the answer must be waited for (a gateway may be used)."""

    def __init__(self, ctx: InitiatorContext, arrival: Arrival, *, early: bool) -> None:
        self.offer: Dict[str, Any] = {}
        self._ctx = ctx
        self._arrival = arrival
        self._waiter: gevent.Greenlet = gevent.spawn(_captured_wait, arrival, ctx.remaining())
        self._taken = False
        self.arrived: Optional[gevent.Greenlet] = self._waiter if early else None

    def complete(self, answer: Dict[str, Any]) -> Stream:
        # The server answered once its connection back was made, or the connection is here
        # (the token in it is the acceptance): it is here or arriving.
        socks, failure = self._waiter.get()
        if failure is not None:
            raise self._ctx.fail(f"{self._ctx.peer.name}'s connection back did not arrive: {failure}",
                                 method="reverse") from None
        (sock,) = socks
        self._taken = True
        info: Dict[str, Any] = {"method": "reverse"}
        via = answer.get("via")
        if isinstance(via, str):
            info["via"] = via
        _learn(self._ctx, direct=not isinstance(via, str), answered=self.arrived is None)
        return SocketStream(sock, info=info)

    def abort(self) -> None:
        self._waiter.kill(block=True)
        self._arrival.cancel()  # a late call back is refused at once
        value = self._waiter.value if self._waiter.successful() else None
        if not self._taken and isinstance(value, tuple) and value[0] is not None:
            for sock in value[0]:  # (came, and was not made a stream: closed here)
                sock.close()


class ReverseMethod(Method):
    """``reverse``: the server dials the client (see the module docstring)."""

    name = "reverse"
    # The responder sends the server's first TLS flight on its connection (module docstring).
    sends_first_bytes = True

    def initiate(self, ctx: InitiatorContext) -> Initiation:
        if not ctx.me.addrs:
            raise ctx.fail(f"{ctx.me.name} advertises no address for {ctx.peer.name} to connect back to",
                           method=self.name)
        early = _known_direct(ctx) and not _may_come_through_a_gateway(ctx)
        return _CalledBack(ctx, ctx.expect(1), early=early)

    def respond(self, ctx: ResponderContext) -> Dict[str, Any]:
        client = ctx.client
        if not client.addrs:
            raise MethodRefusal("unreachable", f"{client.name} advertises no address to connect back to")
        reasons = []
        for via, dial_one in _dialers(ctx):
            try:
                sock = dial_with_preamble(dial_one, client.addrs, ctx.token, timeout=ctx.request_timeout,
                                          method=self.name, node=ctx.node, fast_open=via is None,
                                          first_bytes=ctx.first_bytes)
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
    return out + [(None, dial_fast_open)]


def _known_direct(ctx: InitiatorContext) -> bool:
    """True if ``ctx.peer`` answered lately that it dialed us back directly (DIRECT_KNOWN_S)."""
    try:
        until = _dials_directly.get(ctx.node, {}).get(ctx.peer.node_id)
    except TypeError:  # (a node that cannot be weakly referenced: a test's stand-in)
        return False
    return until is not None and until > time.monotonic()


def _learn(ctx: InitiatorContext, *, direct: bool, answered: bool) -> None:
    """Remember what the server's answer said of its dial back (``answered``: the client waited
    for it; otherwise it may have been the connection that came first: nothing new is known)."""
    try:
        known = _dials_directly.setdefault(ctx.node, {})
    except TypeError:  # (as in _known_direct)
        return
    if not direct:
        known.pop(ctx.peer.node_id, None)
    elif answered:
        now = time.monotonic()
        if len(known) >= _DIRECT_KEPT:  # (a node talks to a few hundred peers: forget the expired)
            for peer_id in [p for p, until in known.items() if until <= now]:
                del known[peer_id]
        known[ctx.peer.node_id] = now + DIRECT_KNOWN_S


def _may_come_through_a_gateway(ctx: InitiatorContext) -> bool:
    """True if the server might dial us through one of its gateways (:func:`_dialers`, from
    what the directory says of it): then only its answer tells which way the connection came."""
    from ..rules import same_cluster

    server = ctx.peer
    if same_cluster(ctx.me, server):
        return False
    if server.gateways:
        return True
    leader = ctx.node.directory.get(server.leader) if server.role == "member" else None
    return bool(leader is not None and same_cluster(leader, server) and leader.gateways)
