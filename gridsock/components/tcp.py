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

TCP Fast Open (:func:`dial_fast_open`, used by ``reverse`` for its connection back): the
preamble rides in the SYN, so the listening node has the connection and its token half a round
trip after the dial starts instead of one and a half. Linux only, and only once the dialer
holds a cookie from that server (its first connection asks for one: a plain handshake), the
server's host has ``net.ipv4.tcp_fastopen`` with the server bit (0x2) and its listener takes
Fast Open (the ``TCP_FASTOPEN`` option, or the host-wide 0x400 bit). Anywhere else the same
calls make a plain connection: nothing to configure for it to work, only for it to be fast.
The dial still returns only once the handshake is done (:func:`dial_with_preamble` waits for
it after the send), so a refused or unreachable address fails it as before.
"""
from __future__ import annotations

import errno
import functools
import ipaddress
import logging
import socket
import sys
from typing import Any, Callable, Dict, List, Optional, Tuple, cast

import gevent
from gevent import socket as gsocket

from .. import wire
from ..bootstrap.transport import Address, dial, parse_address
from ..errors import ConfigError, ConnectError, ConnectTimeoutError, RemoteProtocolError
from ..methods import DIAL_TIMEOUT_S, Arrival, Initiation, InitiatorContext, Method, ResponderContext
from ..streams import SocketStream, Stream, reset_socket

__all__ = ["TcpMethod", "DialInitiation", "dial_with_preamble", "dial_fast_open", "serve_arrival", "recv_exactly",
           "CONNECT_TIMEOUT_S", "MATCH_TIMEOUT_S", "TCP_FASTOPEN_CONNECT"]

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
# Linux's option (since 4.11) that defers a connect() to the first send, whose data then rides
# in the SYN when a Fast Open cookie for the server is known (the stdlib names it from 3.12 on
# some builds only: its value is fixed in the kernel's ABI). None where there is no such thing.
TCP_FASTOPEN_CONNECT: Optional[int] = getattr(socket, "TCP_FASTOPEN_CONNECT",
                                              30 if sys.platform.startswith("linux") else None)


def _addresses(address: Address) -> List[Tuple[Any, ...]]:
    """``getaddrinfo``'s answers for ``address``; a numeric host without asking the resolver
    (gevent's asks a thread of its pool for every name, numeric or not: a hand-off between
    threads on every data connection's path). Raises OSError."""
    try:
        ip = ipaddress.ip_address(address.host or "")
    except ValueError:
        return gsocket.getaddrinfo(address.host, address.port, 0, gsocket.SOCK_STREAM)
    family = gsocket.AF_INET6 if ip.version == 6 else gsocket.AF_INET
    return [(family, gsocket.SOCK_STREAM, gsocket.IPPROTO_TCP, "", (address.host, address.port))]


def _dial(address: Address, *, timeout: float, fast_open: bool):
    """A gevent TCP socket connected to ``address`` (a Unix path: the bootstrap's ``dial``),
    with TCP_NODELAY and keepalives; with ``fast_open``, asking for TCP Fast Open
    (:func:`dial_fast_open`). Raises ConnectError, ConnectTimeoutError."""
    if address.path is not None:
        return dial(address, timeout=timeout)
    try:
        infos = _addresses(address)
    except OSError as exc:
        raise ConnectError(f"cannot connect to {address}: {exc.strerror or exc}", peer=str(address),
                           method="tcp") from exc
    reasons = []
    for family, kind, proto, _, sockaddr in infos:
        sock = gsocket.socket(family, kind, proto)
        try:
            if fast_open and TCP_FASTOPEN_CONNECT is not None:
                try:
                    sock.setsockopt(gsocket.IPPROTO_TCP, TCP_FASTOPEN_CONNECT, 1)
                except OSError:
                    pass  # (a kernel without it: a plain connect)
            sock.setsockopt(gsocket.IPPROTO_TCP, gsocket.TCP_NODELAY, 1)
            sock.setsockopt(gsocket.SOL_SOCKET, gsocket.SO_KEEPALIVE, 1)
            sock.settimeout(timeout)
            sock.connect(sockaddr)
            sock.settimeout(None)
            return sock
        except gsocket.timeout:
            sock.close()
            raise ConnectTimeoutError(f"connecting to {address} timed out after {timeout:.1f} s",
                                      peer=str(address), method="tcp") from None
        except OSError as exc:
            sock.close()
            reasons.append(exc.strerror or str(exc))
        except BaseException:
            sock.close()
            raise
    raise ConnectError(f"cannot connect to {address}: {'; '.join(reasons) or 'no address'}", peer=str(address),
                       method="tcp")


def dial_fast_open(address: Address, *, node=None, timeout: float = CONNECT_TIMEOUT_S):
    """A gevent TCP socket to ``address`` asking for TCP Fast Open (see the module docstring).

    When the kernel holds a cookie for the server this returns at once, before any SYN: the
    first send carries its data in the SYN, and the handshake is done only later; pass
    ``fast_open=True`` to :func:`dial_with_preamble`, which waits for it. Otherwise (no cookie,
    no Fast Open here) it returns a connected socket, as :meth:`TcpMethod.dial`.
    ``node`` is unused (the signature of :meth:`TcpMethod.dial`). Raises ConnectError.
    """
    return _dial(address, timeout=timeout, fast_open=True)


# Linux's tcpi_state of a connected socket, and of one whose SYN is out and unanswered
# (include/net/tcp_states.h).
TCP_ESTABLISHED = 1
TCP_SYN_SENT = 2


def tcp_state(sock) -> Optional[int]:
    """``sock``'s TCP state (Linux's tcpi_state, the first byte of its ``struct tcp_info``),
    without waiting; None where TCP_INFO is not available."""
    tcp_info = getattr(gsocket, "TCP_INFO", None)
    return None if tcp_info is None else sock.getsockopt(gsocket.IPPROTO_TCP, tcp_info, 1)[0]
# What a connection that was made and then closed by the peer reports (the peer took it).
_MADE_THEN_CLOSED = (errno.ECONNRESET, errno.EPIPE)


def _await_handshake(sock, timeout: float) -> None:
    """Wait until ``sock``'s TCP handshake is done, if it is still under way (a Fast Open socket
    sent its SYN with its first data and returned at once). Raises OSError with the reason it
    failed, or ``socket.timeout`` after ``timeout`` seconds.

    A connection the peer closed or reset once it was made counts as made: the peer had it (a
    client that took the preamble and closed at once: it lost a race), as a plain connect."""
    if tcp_state(sock) != TCP_SYN_SENT:
        return
    # A socket in SYN-SENT is not writable; one whose handshake is done (or failed) is.
    gsocket.wait_write(sock.fileno(), timeout=timeout, timeout_exc=gsocket.timeout("timed out"))
    err = sock.getsockopt(gsocket.SOL_SOCKET, gsocket.SO_ERROR)
    if err and err not in _MADE_THEN_CLOSED:
        raise OSError(err, errno.errorcode.get(err, str(err)))


def dial_with_preamble(dial_one: Callable[..., Any], addrs, token: bytes, *, index: int = 0, timeout: float,
                       method: str, node=None, fast_open: bool = False, first_bytes: bytes = b""):
    """Dial the first of ``addrs`` that answers with ``dial_one(address, node=, timeout=)`` and
    send the preamble (``token``, ``index``) and ``first_bytes`` with it; return the connected
    socket.

    ``fast_open``: ``dial_one`` is :func:`dial_fast_open`, whose socket may still be in its
    handshake, the preamble in its SYN: wait until the handshake is done (so this returns a
    connected socket in every case, and an address that refuses is skipped as without).

    Raises ConnectError listing why each address failed.
    """
    reasons = []
    timeouts = 0
    preamble = wire.encode_preamble(token, index) + first_bytes
    for text in addrs:
        try:
            sock = dial_one(parse_address(text), node=node, timeout=min(timeout, DIAL_TIMEOUT_S))
        except (ConnectError, ConfigError) as exc:
            reasons.append(f"{text}: {exc}")
            timeouts += isinstance(exc, TimeoutError)
            continue
        try:
            sock.sendall(preamble)
            if fast_open:
                _await_handshake(sock, min(timeout, DIAL_TIMEOUT_S))
        except gsocket.timeout:
            sock.close()
            reasons.append(f"{text}: the handshake timed out")
            timeouts += 1
            continue
        except OSError as exc:
            sock.close()
            reasons.append(f"{text}: {exc}")
            continue
        except BaseException:
            sock.close()
            raise
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
        # A method whose dial is no longer than the request's round trip (``tcp``) starts it
        # behind the request: a timer of 0 fires once the loop has run its callbacks, among
        # them the meta link's writer that sends the request (so the request, which the
        # server must also work on, leaves first). Others (``ssh``, ``socks``: several round
        # trips) start it at once.
        start = functools.partial(gevent.spawn_later, 0) if getattr(method, "dial_behind_request", False) \
            else gevent.spawn
        # One connection, the connect's only candidate: its nomination goes with the preamble.
        self.nominated = count == 1 and ctx.nominate_early
        first: Dict[str, Any] = {"first_bytes": wire.NOMINATE} if self.nominated else {}
        self._dials = [start(_captured, method.dial_node_port, ctx, i, **first) for i in range(count)]

    def sockets(self) -> List[Any]:
        """The connected sockets, by index; ConnectError (the first failure) otherwise."""
        # (Usually done by now, the dial being shorter than the request's round trip: then
        # not even joinall, which goes through the hub, ~20 us on the connect's path.)
        if not all(greenlet.ready() for greenlet in self._dials):
            gevent.joinall(self._dials, timeout=self._ctx.remaining())
        if not all(greenlet.ready() for greenlet in self._dials):
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
                # Reset, not closed in order: a connection nominated with its preamble may
                # have been delivered already, and to the server's program it is a connection
                # that broke, not one that ended.
                reset_socket(value[0])


class TcpMethod(Method):
    """``tcp``: dial the peer's node port directly (see the module docstring)."""

    name = "tcp"
    dials_node_port = True

    @property
    def dial_behind_request(self) -> bool:
        """The dial starts behind the assembly request (see :class:`DialInitiation`): true for
        this class's own dial, one TCP handshake, no longer than the request's round trip; a
        subclass that dials otherwise (through a proxy, a gateway: more round trips) starts at once."""
        return type(self).dial is TcpMethod.dial

    def dial(self, address: Address, *, node, timeout: float = CONNECT_TIMEOUT_S):
        """Return a connected gevent socket to ``address``; ConnectError if it cannot."""
        return _dial(address, timeout=timeout, fast_open=False)

    def dial_node_port(self, ctx: InitiatorContext, index: int = 0, *, first_bytes: bytes = b""):
        """Connection ``index`` to ``ctx.peer``'s node port, preamble (and ``first_bytes``)
        sent; ConnectError."""
        if not ctx.peer.addrs:
            raise ctx.fail(f"{ctx.peer.name} advertises no address for a {self.name} connection", method=self.name)
        return dial_with_preamble(self.dial, ctx.peer.addrs, ctx.token, index=index, timeout=ctx.remaining(),
                                  method=self.name, node=ctx.node, first_bytes=first_bytes)

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
