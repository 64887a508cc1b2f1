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

Round trips: the client's first SYN leaves *with* the request (or a measured delay after it: see
below), not after the answer. The client names the port the server is to bind (``offer["port"]``, a
random one of ``SPLICE_PORTS``) and, when the server is reached at an address of its own (public,
perhaps behind a stateful firewall: not behind a NAT, whose port it could not know), starts
connecting to that endpoint in :meth:`SpliceMethod.initiate`, before the request leaves. Its SYN
opens the client's NAT or firewall for the reply; the server's firewall drops it. When the request
arrives, the server binds the named port and connects to the client (its SYN leaves before its
answer does): its SYN finds the client's mapping open and the client's socket in SYN-SENT, and the
two make one connection on the first attempt of each side, about one round trip after the request
reached the server (no ``SPLICE_RETRY_S`` wait, which the old order cost: the server's SYN reached
the client's NAT before the client's own and was refused). Towards a server behind a NAT the client
does not fire early (that NAT would answer a SYN to a port it has not mapped with a reset, which
would also close the client's own firewall state): the server connects first and the client on the
answer, as before. Either side counts its connect attempts: ``info["detail"]["attempts"]`` of its
stream (1: the first simultaneous open made the connection).

Timing the client's SYN (:func:`syn_delay`). Let T be the request's one-way time to the server
(half its round trip: from :meth:`SpliceMethod.initiate` to the answer, measured on earlier splices
to that peer, smoothed quick to fall and slower to rise, with its mean deviation as TCP keeps its
RTTVAR) and D the direct path's one way. A SYN that leaves at t=0 reaches the server's firewall at
D, before the server's own SYN has left (at T), and is dropped: the server's SYN then meets our
open mapping at T+D, our SYN-ACK gets back at T+2D and its ACK makes us connected at T+3D (2.5
round trips of the direct path where the request crosses two legs of it through the rendez-vous
node, T = 2D). Sent at d, our SYN instead

- reaches the firewall after the server's SYN left it, which then has the server's state and
  lets ours in, and the server (in SYN-SENT) answers with a SYN-ACK: d + D > T;
- still opens our own NAT or firewall before the server's SYN arrives: d < T + D;
- makes us connected at d + 2D, which is worth it only up to the answer, at 2T: d <= 2T - 2D.

D is not measured (nothing of the direct path answers before the splice is made), so the delay
assumes the paths are symmetric and D = T/2 (the lab's geometry: the request takes two WAN legs,
the SYN one): the window is then T/2 < d <= T and the delay aims at its middle, ``d =
SPLICE_SYN_AIM * T`` = 3T/4: T/4 of margin on either side against jitter and the server's
processing, connected at about 1.75 round trips, before the answer at 2 (so a splice costs the
answer's two round trips, not 2.5). From that, ``SPLICE_JITTER_K`` deviations of the one way are
taken off: a path whose request time varies gets an earlier SYN, and one that varies by more than
the margin none. Its failures are benign one way only: too early (a direct path shorter than T/4),
the SYN is dropped as with no delay and the server's SYN meets our mapping as before; too late
would let the server's SYN reach a NAT with no mapping (whose reset makes MASQUERADE move our port:
the splice fails), so the delay stays below T (an estimate that rises slowly, falls at once, less
its deviation), is left out under ``SPLICE_DELAY_MIN_S`` of T (there the request's time is
processing, not path, and varies more than the gain), and never exceeds ``SPLICE_DELAY_MAX_S`` nor
a quarter of the connect's budget. With no estimate (the first splice to a peer) the SYN leaves
with the request. The stream's detail says ``syn_delay_ms`` and ``before_answer`` (the connection
was made when the answer came). The answer is still awaited: it carries a refusal, and the server
checks our token before it uses the connection; nothing the server could send on the new connection
would come sooner (it is connected at 2T itself).

A node's public endpoint is its own address if that is public, otherwise the address its
cluster's leader was observed from by the rendez-vous node (the NAT's), with the bound port:
MASQUERADE keeps the port when it is free. When the NAT remaps a busy port, the connection
can land on another node: the client's first bytes are the preamble and the token, which the
server checks, and ``tls`` above checks the peer's certificate (use ``tls/splice``).
"""
from __future__ import annotations

import collections
import errno
import ipaddress
import logging
import secrets
import time
from typing import Any, Dict, List, Optional, Tuple

import gevent
from gevent import socket as gsocket

from .. import wire
from ..bootstrap.transport import Address, parse_address
from ..errors import ConfigError, ConnectError, RemoteProtocolError
from ..methods import Initiation, InitiatorContext, Method, MethodRefusal, ResponderContext
from ..streams import SocketStream, Stream
from .tcp import TCP_ESTABLISHED, recv_exactly, tcp_state

log = logging.getLogger(__name__)

__all__ = ["SpliceMethod", "bind_splice_socket", "splice_connect", "public_host", "routable", "syn_delay",
           "SPLICE_TIMEOUT_S", "SPLICE_PORTS"]

# Both ends keep trying this long: long enough for the meta channel's round trip and one SYN
# retransmission, short enough to fall back to the relay well within a connect's budget.
SPLICE_TIMEOUT_S = 4.0
# One connect attempt; a SYN dropped by the other side's NAT is retried on a fresh socket.
SPLICE_ATTEMPT_S = 1.0
# Pause between attempts after a refusal (an RST from a NAT that has no mapping yet).
SPLICE_RETRY_S = 0.05
# The client names the server's port from here (IANA's dynamic range, which a server leaves to
# its clients' ephemeral ports: a collision only costs the old order, connecting on the answer).
SPLICE_PORTS = range(49152, 65536)
# Where the client's delayed SYN aims, as a fraction of the request's one-way time T: the middle
# of the window T/2 < d <= T (see the module docstring).
SPLICE_SYN_AIM = 0.75
# Under this one-way request time, no delay: the time is the nodes' processing, not the path's, and
# varies by more than the delay could gain (at most a quarter of it).
SPLICE_DELAY_MIN_S = 0.01
# Never hold the SYN longer than this (a path this slow has other troubles than a round trip).
SPLICE_DELAY_MAX_S = 0.5
# The delay gives up this many mean deviations of the request's one-way time (see the docstring).
SPLICE_JITTER_K = 2.0
# Smoothing of the request round trip per peer: a rise moves the estimate by this fraction of it
# (slowly: a late SYN is the harmful error), a fall at once; the deviation moves by _RTT_VAR_GAIN
# of its error (TCP's RTTVAR; the first sample's is half the sample, as TCP's).
_RTT_GAIN = 0.25
_RTT_VAR_GAIN = 0.25
# Peers whose request round trip a process remembers (least recently used dropped beyond).
_RTT_PEERS = 4096
_PRIVATE_NETS = tuple(ipaddress.ip_network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16",
                                                         "100.64.0.0/10", "fc00::/7"))


class _Splicing(Initiation):
    """The client's half: its bound socket travels in the offer; the answer names the
    server's endpoint, which both connect to at once. With ``early`` (the server's endpoint
    guessed: its own address and the port the offer names), the client's connect starts now,
    before the request leaves, or :func:`syn_delay` after now."""

    def __init__(self, ctx: InitiatorContext, sock, host: str, early: Optional[Address]) -> None:
        self._ctx = ctx
        self._sock = sock
        self._attempts: List[int] = [0]
        self._port = sock.getsockname()[1]
        self._started = time.monotonic()  # (the request's round trip is timed from here)
        self._key = (ctx.me.node_id, ctx.peer.node_id)
        port = secrets.choice(SPLICE_PORTS)
        self.offer: Dict[str, Any] = {"endpoint": f"{host}:{sock.getsockname()[1]}", "port": port}
        self._early: Optional[Address] = None
        self._early_sock = None
        self._dial: Optional[gevent.Greenlet] = None
        self._delay = 0.0
        if early is not None:
            self._early = Address(host=early.host, port=port)
            self._delay = syn_delay(*_ROUND_TRIPS.get(self._key, (None, 0.0)), budget=ctx.remaining())
            sock, self._sock = self._sock, None
            if self._delay > 0:  # (the greenlet owns the socket from now: killed, it closes it)
                self._early_sock = sock
                self._dial = gevent.spawn(_delayed_early, sock, self._early, self._delay, ctx.remaining(),
                                          self._attempts)
                return
            try:  # the SYN leaves now, before the request: nothing may come between them
                _start_connect(sock, self._early, self._attempts)
            except BaseException:
                sock.close()
                raise
            self._early_sock = sock
            self._dial = gevent.spawn(_captured_early, sock, self._early, ctx.remaining(), self._attempts)

    def complete(self, answer: Dict[str, Any]) -> Stream:
        _note_round_trip(self._key, time.monotonic() - self._started)
        try:
            remote = parse_address(str(answer.get("endpoint")))
        except ConfigError as exc:
            raise RemoteProtocolError(f"bad splice endpoint from {self._ctx.peer.name}: {exc}") from None
        dial = self._dial  # (left in place until it is done: abort() kills it if we are killed meanwhile)
        before_answer = False
        if dial is not None and self._early is not None and (remote.host, remote.port) == (self._early.host,
                                                                                            self._early.port):
            before_answer = self._attempts[0] == 1 and (dial.ready() or _established(self._early_sock))
            sock, failure = dial.get()  # (the connect started before the request: see the module docstring)
            self._dial = self._early_sock = None  # (closed by the greenlet, or returned: ours now)
            if failure is not None:
                raise failure
            before_answer = before_answer and self._attempts[0] == 1
        else:
            if dial is not None:  # the server is elsewhere than guessed: connect where it says
                self._kill_early(dial)
                self._dial = None
                self._sock = bind_splice_socket(self._port)
            sock, self._sock = self._sock, None
            sock = splice_connect(sock, remote, timeout=self._ctx.remaining(), attempts=self._attempts)
        try:
            sock.sendall(wire.encode_preamble(self._ctx.token))
        except OSError as exc:
            sock.close()
            raise self._ctx.fail(f"splice to {remote}: {exc}", method="splice") from exc
        except BaseException:  # cancelled while sending: the socket must not leak
            sock.close()
            raise
        if self._delay > 0:
            log.info("node %s: splice to %s: SYN %.1f ms after the request, connected %s the answer (attempts %d)",
                     self._ctx.me.name, self._ctx.peer.name, self._delay * 1e3,
                     "before" if before_answer else "after", self._attempts[0])
        detail = {"attempts": self._attempts[0], "syn_delay_ms": round(self._delay * 1e3, 3),
                  "before_answer": before_answer}
        return SocketStream(sock, info={"method": "splice", "detail": detail})

    def _kill_early(self, dial: gevent.Greenlet) -> None:
        """Stop the early connect and close what it made (killed while running, it closes its
        socket; killed before it ran, the socket it was given is closed here)."""
        dial.kill(block=True)
        value = dial.value if dial.successful() else None
        if isinstance(value, tuple) and value[0] is not None:
            value[0].close()
        if self._early_sock is not None:
            self._early_sock.close()  # (idempotent)
            self._early_sock = None

    def abort(self) -> None:
        dial, self._dial = self._dial, None
        if dial is not None:
            self._kill_early(dial)
        if self._sock is not None:
            self._sock.close()
            self._sock = None


# (me, peer) -> (smoothed round trip of splice requests, its mean deviation), seconds
_ROUND_TRIPS: "collections.OrderedDict[Tuple[str, str], Tuple[float, float]]" = collections.OrderedDict()


def _note_round_trip(key: Tuple[str, str], seconds: float) -> None:
    """One more round trip of a splice's request from ``key[0]`` to ``key[1]``: the estimate
    falls to it at once, or rises by ``_RTT_GAIN`` of the difference; the deviation follows the
    error by ``_RTT_VAR_GAIN``."""
    known = _ROUND_TRIPS.pop(key, None)
    if known is None:
        _ROUND_TRIPS[key] = (seconds, seconds / 2)
    else:
        last, dev = known
        dev += (abs(seconds - last) - dev) * _RTT_VAR_GAIN
        _ROUND_TRIPS[key] = (min(seconds, last + (seconds - last) * _RTT_GAIN), dev)
    while len(_ROUND_TRIPS) > _RTT_PEERS:
        _ROUND_TRIPS.popitem(last=False)


def syn_delay(round_trip: Optional[float], deviation: float = 0.0, *, budget: float) -> float:
    """How long after the request the client's first SYN leaves, in seconds, given the request's
    smoothed ``round_trip`` to this peer (None: not known yet), its mean ``deviation`` and the
    connect's ``budget``: ``SPLICE_SYN_AIM`` of its one way less ``SPLICE_JITTER_K`` deviations of
    it; 0 below ``SPLICE_DELAY_MIN_S`` of one way (see the module docstring)."""
    if round_trip is None or round_trip / 2 < SPLICE_DELAY_MIN_S:
        return 0.0
    delay = SPLICE_SYN_AIM * round_trip / 2 - SPLICE_JITTER_K * deviation / 2
    return max(0.0, min(delay, SPLICE_DELAY_MAX_S, budget / 4))


def _established(sock) -> bool:
    """True if ``sock``'s connect has completed, without waiting (Linux: its TCP state)."""
    try:
        return sock is not None and tcp_state(sock) == TCP_ESTABLISHED
    except OSError:  # (closed meanwhile)
        return False


def _delayed_early(sock, remote: Address, delay: float, timeout: float, attempts: List[int]):
    """In a greenlet: the client's first SYN ``delay`` seconds from now, then as
    :func:`_captured_early`. Killed, it closes its socket."""
    try:
        gevent.sleep(delay)
        _start_connect(sock, remote, attempts)
    except ConnectError as exc:
        sock.close()
        return None, exc
    except BaseException:
        sock.close()
        raise
    return _captured_early(sock, remote, max(0.1, timeout - delay), attempts)


def _start_connect(sock, remote: Address, attempts: List[int]) -> None:
    """Send ``sock``'s SYN to ``remote`` now (a non-blocking connect); :func:`_captured_early`
    waits for the answer. Raises ConnectError if the kernel refuses at once (no route)."""
    sock.settimeout(0.0)
    attempts[0] += 1
    err = sock.connect_ex((remote.host, remote.port))
    if err not in (0, errno.EINPROGRESS, errno.EAGAIN, errno.EALREADY):
        raise ConnectError(f"splice to {remote}: {errno.errorcode.get(err, err)}", peer=str(remote), method="splice")


def _captured_early(sock, remote: Address, timeout: float, attempts: List[int]):
    """In a greenlet: the answer to the SYN :func:`_start_connect` sent, and if it does not make
    the connection within ``SPLICE_ATTEMPT_S``, :func:`splice_connect`'s retries on the same
    port. ``(socket, None)`` or ``(None, ConnectError)``; killed, it closes its socket."""
    deadline = time.monotonic() + timeout
    try:
        try:
            gsocket.wait_write(sock.fileno(), timeout=min(SPLICE_ATTEMPT_S, timeout))
            err = sock.getsockopt(gsocket.SOL_SOCKET, gsocket.SO_ERROR)
        except gsocket.timeout:
            err = errno.ETIMEDOUT
        if err == 0:
            sock.settimeout(None)
            sock.setsockopt(gsocket.IPPROTO_TCP, gsocket.TCP_NODELAY, 1)
            return sock, None
        port = sock.getsockname()[1]
        sock.close()
        if err in (errno.ENETUNREACH, errno.EHOSTUNREACH):
            raise ConnectError(f"splice to {remote}: {errno.errorcode.get(err, err)}", peer=str(remote),
                               method="splice")
        if err != errno.ETIMEDOUT:
            gevent.sleep(SPLICE_RETRY_S)
        sock = bind_splice_socket(port)
        return splice_connect(sock, remote, timeout=max(0.0, deadline - time.monotonic()), attempts=attempts), None
    except ConnectError as exc:
        return None, exc
    except BaseException:
        sock.close()
        raise


class SpliceMethod(Method):
    """``splice``: TCP simultaneous open (see the module docstring)."""

    name = "splice"

    def initiate(self, ctx: InitiatorContext) -> Initiation:
        host, theirs = public_host(ctx.me, ctx.node.directory), public_host(ctx.peer, ctx.node.directory)
        if host is None or theirs is None or not routable(theirs):
            raise ctx.fail(f"no route for a splice between {ctx.me.name} and {ctx.peer.name}", method=self.name)
        # Fire early only at an address of the server's own: a NAT's would reset our SYN.
        early = parse_address(f"{theirs}:1") if _own_address(ctx.peer, theirs) else None
        return _Splicing(ctx, bind_splice_socket(), host, early)

    def respond(self, ctx: ResponderContext) -> Dict[str, Any]:
        try:
            endpoint = parse_address(str(ctx.offer.get("endpoint")))
        except ConfigError as exc:
            raise RemoteProtocolError(f"bad splice endpoint: {exc}") from None
        host = public_host(ctx.me, ctx.node.directory)
        if host is None:
            raise MethodRefusal("unreachable", f"{ctx.me.name} knows no public address of its own")
        if endpoint.host is None or not routable(endpoint.host):
            raise MethodRefusal("unreachable", f"{ctx.me.name} has no route to {ctx.client.name}'s endpoint {endpoint}")
        sock = None
        port = ctx.offer.get("port")
        if isinstance(port, int) and port in SPLICE_PORTS:  # the port the client's SYN went to
            try:
                sock = bind_splice_socket(port)
            except OSError as exc:  # taken: any port will do, the client connects on our answer
                log.info("node %s: splice port %d asked by %s: %s", ctx.me.name, port, ctx.client.name, exc)
        if sock is None:
            sock = bind_splice_socket()
        answer = {"endpoint": f"{host}:{sock.getsockname()[1]}"}
        attempts = [0]
        try:  # our SYN leaves now, before the answer: the client's is on its way or waiting
            _start_connect(sock, endpoint, attempts)
        except ConnectError as exc:
            sock.close()
            raise MethodRefusal("unreachable", f"{ctx.me.name} cannot splice to {endpoint}: {exc}") from None
        except BaseException:
            sock.close()
            raise
        gevent.spawn(self._serve, ctx, sock, endpoint, attempts)
        return answer

    def _serve(self, ctx: ResponderContext, sock, endpoint: Address, attempts: List[int]) -> None:
        """Finish the connect to the client that :meth:`respond` started while it connects to
        us (retrying as :func:`splice_connect`); check its preamble; deliver."""
        try:
            sock, failure = _captured_early(sock, endpoint, SPLICE_TIMEOUT_S, attempts)
            if failure is not None:
                raise failure
            try:
                with gevent.Timeout(SPLICE_TIMEOUT_S, TimeoutError("no preamble")):
                    head = recv_exactly(sock, wire.PREAMBLE_BYTES)
                preamble = wire.decode_preamble(head)
                if preamble is None or preamble.token != ctx.token:
                    raise RemoteProtocolError("the spliced connection did not present our token (wrong node?)")
            except BaseException:
                sock.close()
                raise
        except (ConnectError, RemoteProtocolError, TimeoutError, OSError) as exc:
            log.info("node %s: splice with %s failed: %s", ctx.me.name, ctx.client.name, exc)
            return
        ctx.deliver(SocketStream(sock, info={"method": "splice", "detail": {"attempts": attempts[0]}}))


def _own_address(entry, host: str) -> bool:
    """True if ``host`` is one of ``entry``'s own advertised addresses (not its NAT's)."""
    return any(parse_address(text).host == host for text in entry.addrs)


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


def splice_connect(sock, remote: Address, *, timeout: float = SPLICE_TIMEOUT_S, attempts: Optional[List[int]] = None):
    """Connect ``sock`` (bound) to ``remote`` at the same time as the other side connects to us.

    Returns the connected socket (``sock`` or a fresh one bound to the same port). Raises
    ConnectError with the last reason when ``timeout`` passes. ``attempts[0]``, if given, is
    increased by one for each ``connect()`` started.
    """
    port = sock.getsockname()[1]
    deadline = time.monotonic() + timeout
    last = "no attempt"
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                sock.close()
                raise ConnectError(f"splice to {remote} from port {port}: {last}", peer=str(remote), method="splice")
            sock.settimeout(min(SPLICE_ATTEMPT_S, remaining))
            if attempts is not None:
                attempts[0] += 1
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
    except BaseException:  # cancelled (a race lost, a deadline): the socket must not leak
        sock.close()
        raise
