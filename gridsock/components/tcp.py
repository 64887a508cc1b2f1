"""The ``tcp`` method: a direct TCP connection to the peer's node port.

Theory of operation
-------------------
Initiator: the client dials the server node's advertised addresses (the first that answers
wins, each dial bounded by ``DIAL_TIMEOUT_S``) and sends the data-connection preamble with the
assembly token, in the same moment as the assembly request leaves over the meta channel: the
dial starts in :meth:`TcpMethod.initiate`, before the request, and :meth:`complete` only
collects it. So a direct connection costs about one TCP handshake.

Responder: the server awaits one connection with the token on its node port
(``ctx.expect(1)``) and delivers it; a token whose connection does not come within
``MATCH_TIMEOUT_S`` expires. With no filter above it, the application gets the kernel TCP
socket itself: nothing of gridsock sits on the data path.

``socks`` and ``ssh`` are the same method through an intermediary: they subclass
:class:`TcpMethod` and override only :meth:`TcpMethod.dial`. :class:`DialInitiation` serves
any method that dials node ports, ``parallel`` included (several connections, one per index).
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Dict, List, Optional, Tuple, cast

import gevent

from .. import wire
from ..bootstrap.transport import Address, dial, parse_address
from ..errors import ConfigError, ConnectError, ConnectTimeoutError, RemoteProtocolError
from ..methods import DIAL_TIMEOUT_S, Arrival, Initiation, InitiatorContext, Method, ResponderContext
from ..streams import SocketStream, Stream

__all__ = ["TcpMethod", "DialInitiation", "dial_with_preamble", "serve_arrival", "recv_exactly",
           "CONNECT_TIMEOUT_S", "MATCH_TIMEOUT_S"]

log = logging.getLogger(__name__)

# One dial attempt to one address gives up after this long.
CONNECT_TIMEOUT_S = DIAL_TIMEOUT_S
# A responder waits this long for the connections of an accepted request (the request and the
# dial race, so they usually come within a round trip).
MATCH_TIMEOUT_S = 5.0
# A responder waits this long for the connection of a request it accepted: the client dials
# at once, but under a burst of hundreds of connects its dial and preamble can come seconds
# later (5 s lost 84 of 500 concurrent tls/tcp connects, bench/bench_concurrency.py). The
# token is one-time and bound to an authenticated request: waiting costs a table entry.
ARRIVAL_TIMEOUT_S = 15.0


def dial_with_preamble(dial_one: Callable[..., Any], addrs, token: bytes, *, index: int = 0, timeout: float,
                       method: str, node=None):
    """Dial the first of ``addrs`` that answers with ``dial_one(address, node=, timeout=)`` and
    send the preamble (``token``, ``index``); return the connected socket.

    Raises ConnectError listing why each address failed.
    """
    reasons = []
    timeouts = 0
    preamble = wire.encode_preamble(token, index)
    for text in addrs:
        try:
            sock = dial_one(parse_address(text), node=node, timeout=min(timeout, DIAL_TIMEOUT_S))
        except (ConnectError, ConfigError) as exc:
            reasons.append(f"{text}: {exc}")
            timeouts += isinstance(exc, TimeoutError)
            continue
        try:
            sock.sendall(preamble)
        except OSError as exc:
            sock.close()
            reasons.append(f"{text}: {exc}")
            continue
        return sock
    cls = ConnectTimeoutError if reasons and timeouts == len(reasons) else ConnectError
    raise cls("no address answered: " + "; ".join(reasons), method=method, tried=[(method, r) for r in reasons])


def serve_arrival(ctx: ResponderContext, arrival: Arrival, make_stream: Callable[[List[Any]], Stream],
                  what: str) -> None:
    """A responder's greenlet: wait for ``arrival``'s connections, make the method's stream of
    them, deliver it. A token whose connections do not come is dropped with a log line."""
    try:
        socks = arrival.wait(ARRIVAL_TIMEOUT_S)
    except TimeoutError as exc:
        log.info("node %s: %s from %s for port %d expired: %s", ctx.me.name, what, ctx.client.name,
                 ctx.request.port, exc)
        return
    try:
        lower = make_stream(socks)
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    ctx.deliver(lower)


def _captured(fn, *args, **kwargs):
    """``(fn(...), None)``, or ``(None, error)`` for an expected failure: a greenlet that
    returns its failure is not reported by the hub as a crash."""
    try:
        return fn(*args, **kwargs), None
    except (ConnectError, ConfigError) as exc:
        return None, exc


class DialInitiation(Initiation):
    """``count`` dials of the server's node port by ``method``, started at once (before the
    request leaves); :meth:`sockets` collects them. ``make_stream(socks)`` turns them into the
    method's stream in :meth:`complete`."""

    def __init__(self, method: "TcpMethod", ctx: InitiatorContext, count: int,
                 make_stream: Callable[[List[Any]], Stream]) -> None:
        self.offer: Dict[str, Any] = {}
        self._method = method
        self._ctx = ctx
        self._make_stream = make_stream
        self._dials = [gevent.spawn(_captured, method.dial_node_port, ctx, i) for i in range(count)]

    def sockets(self) -> List[Any]:
        """The connected sockets, by index; ConnectError (the first failure) otherwise."""
        done = gevent.joinall(self._dials, timeout=self._ctx.remaining())
        if len(done) < len(self._dials):
            raise ConnectTimeoutError(f"dialing {self._ctx.peer.name} timed out", peer=self._ctx.peer.name,
                                      method=self._method.name)
        # Each dial returned (socket, None) or (None, error): _captured.
        outcomes = [cast(Tuple[Any, Optional[ConnectError]], greenlet.value) for greenlet in self._dials]
        for value, exc in outcomes:
            if exc is not None:
                raise self._method.explain(self._ctx, exc)
        return [value for value, _ in outcomes]

    def complete(self, answer: Dict[str, Any]) -> Stream:
        socks = self.sockets()
        self._dials = []  # the stream owns them now
        try:
            return self._make_stream(socks)
        except BaseException:
            for sock in socks:
                sock.close()
            raise

    def abort(self) -> None:
        dials, self._dials = self._dials, []
        gevent.killall(dials)
        for greenlet in dials:
            value = greenlet.value if greenlet.successful() else None  # a killed dial's value is GreenletExit
            if isinstance(value, tuple) and value[0] is not None:
                value[0].close()


class TcpMethod(Method):
    """``tcp``: dial the peer's node port directly (see the module docstring)."""

    name = "tcp"
    dials_node_port = True

    def dial(self, address: Address, *, node, timeout: float = CONNECT_TIMEOUT_S):
        """Return a connected gevent socket to ``address``; ConnectError if it cannot."""
        return dial(address, timeout=timeout)

    def dial_node_port(self, ctx: InitiatorContext, index: int = 0):
        """Connection ``index`` to ``ctx.peer``'s node port, preamble sent; ConnectError."""
        if not ctx.peer.addrs:
            raise ctx.fail(f"{ctx.peer.name} advertises no address for a {self.name} connection", method=self.name)
        return dial_with_preamble(self.dial, ctx.peer.addrs, ctx.token, index=index, timeout=ctx.remaining(),
                                  method=self.name, node=ctx.node)

    def explain(self, ctx: InitiatorContext, exc: ConnectError) -> ConnectError:
        """``exc`` with what the directory knows of why the dial failed: a node that the
        rendez-vous node could not dial back either accepts nothing from outside its cluster."""
        if ctx.peer.inbound or ctx.me.cluster is not None and ctx.me.cluster == ctx.peer.cluster:
            return exc
        error = type(exc)(f"{exc.args[0]} ({ctx.peer.name} accepts no connection from outside its cluster: "
                             "the rendez-vous node's dial-back failed too)", peer=ctx.peer.name, method=self.name)
        error.__cause__ = exc
        return error

    def initiate(self, ctx: InitiatorContext) -> Initiation:
        if not ctx.peer.addrs:
            raise ctx.fail(f"{ctx.peer.name} advertises no address for a {self.name} connection", method=self.name)
        return DialInitiation(self, ctx, 1, self._stream)

    def respond(self, ctx: ResponderContext) -> Dict[str, Any]:
        arrival = ctx.expect(1)
        gevent.spawn(serve_arrival, ctx, arrival, self._stream, f"{self.name} connection")
        return {}

    def _stream(self, socks: List[Any]) -> Stream:
        return SocketStream(socks[0], info={"method": self.name})


def recv_exactly(sock, n: int) -> bytes:
    """Exactly ``n`` bytes from socket ``sock`` (a preamble); RemoteProtocolError if it closes first."""
    data = bytearray()
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise RemoteProtocolError(f"connection closed after {len(data)} of {n} preamble bytes")
        data += chunk
    return bytes(data)
