"""Dynamic assembly of data connections: choose a stack, agree on it, build both halves.

Theory of operation
-------------------
``connect(peer, port)`` on the client:

1. the rules give the candidate stacks for the pair (or the caller names one, or several to
   race), e.g. ``tls/tcp``, then ``tls/relay``;
2. for each candidate (raced with staggered starts, :meth:`Assembler._race`) a one-time token
   is made and the stack's *method* component starts its initiator half
   (:mod:`gridsock.methods`): ``tcp`` starts dialing the server's node port at once, ``relay``
   opens its end, ``splice`` binds its port. An ``AssemblyRequest`` ``{port, stack, token,
   offer}`` (the method's own fields in ``offer``) goes to the server node over the meta
   channel (:mod:`gridsock.wire`);
3. the server checks the request before anything is built: someone must listen on the port,
   the stack must parse, the server's policy must accept it (e.g. ``tls`` from outside its
   cluster: the client's rules cannot weaken that) and the token must be fresh. It then calls
   the method's responder half, which answers (``AssemblyAccept``, with the method's fields) or
   refuses (``AssemblyRefuse`` with a code of :data:`gridsock.wire.REFUSAL_CODES`);
4. the client's method completes its connection with the answer; the first candidate whose
   connection is up is *nominated* (the client sends ``NOMINATE`` on it, the others are
   cancelled), the filters are built bottom-up (``tls`` checks that the server proves the
   expected node id), and the application gets a real socket.

Best, not first: methods are ranked in tiers (:func:`gridsock.rules.tier`: direct, then
gateway methods, then ``relay``). When a lower tier wins, the application gets it at once, but
the candidates of a better tier still under way go on in the background for at most
``BETTER_LATE_S``; one that connects is closed unnominated (the server delivers nothing: its
``not_taken``) and becomes the peer's cached winner, which the next connection tries first
(with a head start: ``CACHED_HEAD_START_S``).
``gridsock status`` shows the ranking and why (:meth:`Assembler.paths`).

On the server, the method delivers its connection to :meth:`Assembler._deliver`, which waits
for the nomination, builds the server's half of the filters (``tls`` requires the client's
certificate to carry the requesting node's id) and queues the connection on the listener. A
connection that is not nominated is closed: nothing is built for it, nothing is queued.

The assembler knows no method by name: a stack's method component (with the method wrapper
right above it, ``parallel``) does all that is particular to it, on both sides. What the
assembler provides is the token bookkeeping: connections that arrive on a node port with a
preamble (``tcp`` family, ``parallel``, a ``reverse`` call back) are matched by token to what
awaits them (:class:`gridsock.methods.Arrival`); an unknown token waits at most
``MATCH_TIMEOUT_S`` for its request (request and connection race), a used or cancelled one is
refused at once, and a stranger who connects gets nothing.

What applications get is always a real OS socket: for a plain ``tcp`` stack the kernel TCP
socket itself (nothing on the data path); otherwise a socket bridged to the stream
(:mod:`gridsock.bridge`).
"""
from __future__ import annotations

import base64
import dataclasses
import errno
import logging
import os
import secrets
import socket
import struct
import time
import weakref
from collections import OrderedDict
from typing import Any, Callable, Dict, List, Optional, Sequence, Set, Tuple, Union

import gevent
import gevent.event
import gevent.queue

from . import memory, procnet, wire
from ._ratelog import RateLimitedLog
from .errors import (AuthError, ConfigError, ConnectError, ConnectRefusedError, ConnectTimeoutError, GridsockError,
                     RemoteProtocolError, RoutingError)
from .methods import Arrival, InitiatorContext, MethodRefusal, ResponderContext
from .registry import Registry, default_registry
from .rules import TIERS, Rules, gateways_of, tier
from .stack import Stack, StackContext
from .streams import Stream
from .components.tcp import MATCH_TIMEOUT_S, recv_exactly

__all__ = [
    "Assembler",
    "DataListener",
    "ConnectionInfo",
    "PathRecord",
    "PATHS_KEPT",
    "DATA_PREAMBLE",
    "TOKEN_BYTES",
    "ASSEMBLY_TIMEOUT_S",
    "MATCH_TIMEOUT_S",
    "MAX_EARLY_DATA_CONNECTIONS",
    "PORTS_BACK_WITHIN_S",
    "NOMINATION_TIMEOUT_S",
    "BACKLOG_WAIT_S",
    "NOMINATE",
    "STAGGER_S",
    "BETTER_LATE_S",
    "CACHED_HEAD_START_S",
    "ASSEMBLE_TOPIC",
    "method_of",
    "errno_of",
]

log = logging.getLogger(__name__)

ASSEMBLE_TOPIC = "assemble"
# First bytes of a data connection on a node port (the node port tells it by the first byte).
DATA_PREAMBLE = wire.DATA_MAGIC
TOKEN_BYTES = wire.TOKEN_BYTES
NOMINATE = wire.NOMINATE
# A connect (request, reply, method, filters) gives up after this long.
ASSEMBLY_TIMEOUT_S = 15.0
# Happy eyeballs: the next candidate starts this long after the previous one, if no candidate
# has connected by then (RFC 8305's connection attempt delay), or at once when all have failed.
STAGGER_S = 0.25
# The peer's cached winner worked moments ago (and may be better than what connects first): the
# next candidate starts this long after it, unless it fails first. A path gone silent costs this.
CACHED_HEAD_START_S = 1.0
# The winner for a peer is tried first for this long; then the rules' order is raced again, so
# a better method that lost a race (or was down) gets another chance.
WINNER_TTL_S = 300.0
# When a lower tier wins a race (relay, a gateway method), the better candidates still under way
# may finish this long after it, in the background: long enough for a gateway's first contact
# (an SSH transport's handshake across a WAN), short enough that nothing lingers.
BETTER_LATE_S = 5.0
# Tokens remembered after use, so a replay is refused at once rather than after a wait.
USED_TOKENS_KEPT = 4096
# Servers known to send their first TLS flight on the connection they make (``reverse``), so
# that a connect to them may complete on that connection before their answer: a node talks to a
# few hundred peers; the oldest is forgotten first.
FLIGHT_FOLLOWS_KEPT = 1024
# Data connections waiting (MATCH_TIMEOUT_S at most) for the request of a token not known yet:
# a request and its connections race, so a few wait a moment. Beyond this many, a connection
# with an unknown token is refused at once: random tokens at a thousand connections a second
# would otherwise hold thousands of descriptors and greenlets.
MAX_EARLY_DATA_CONNECTIONS = 1024
# The connection table forgets closed connections when it reaches this many entries, or twice
# as many as were live at the last pruning (so that many live connections cost no quadratic
# work), and on every status(), so a long-running node does not keep what its applications closed.
CONNECTIONS_PRUNE_AT = 256
# While the table lists connections, it is swept this often: a closed connection is forgotten
# this long after it closed at most, and what it held (a TLS stream's buffers, a bridge) with it.
CONNECTIONS_SWEEP_S = 2.0
# Connections accepted but not yet taken by accept().
LISTEN_BACKLOG = 128
#: After a restart, a node whose state directory names the grid ports it served lets requests
#: for those ports wait this long for their programs to serve them again (a program's listener
#: comes back within a second or so: :mod:`gridsock.agentclient`), instead of refusing them.
PORTS_BACK_WITHIN_S = 10.0
# A connection that finds the backlog full waits this long for room (as a kernel leaves a SYN
# unanswered, and the client retries, rather than refuse): a burst of hundreds of connects to
# one port is taken as fast as the application accepts, not reset past the 128th.
BACKLOG_WAIT_S = 15.0
# The server waits this long for the client's nomination of a connection the method made. The
# client nominates once the server's answer has come back and the connection won its race:
# under a burst of hundreds of connects at once that takes seconds (5 s dropped about half of
# 500 concurrent tls/relay connects on a loaded 2-core machine). A candidate that lost is
# closed by the client at once, so the wait costs only a vanished client's half for this long.
NOMINATION_TIMEOUT_S = 15.0
# The client ports the client side gives its connections (carried in the assembly request, what
# the server's getpeername() tells): IANA's dynamic range, as a kernel's ephemeral ports.
CLIENT_PORTS = range(49152, 65536)
# Peers whose last race ``gridsock status`` shows (the peer raced least recently is forgotten
# first): a node talks to a few hundred peers at most; beyond, the oldest news matters least.
PATHS_KEPT = 256
# Reasons kept per peer, one per stack that failed or lost (the rules give a handful).
REASONS_KEPT_PER_PEER = 16
# Where the kernel lists the TCP sockets of this process's network namespace (a handed-over
# socket is live while its inode is listed: see :meth:`Assembler.hand_over`).


def method_of(stack: Stack, registry: Optional[Registry] = None) -> Tuple[Any, Stack]:
    """The component that makes ``stack``'s connections, and the stack of the filters above it.

    The method, wrapped by the method wrappers right above it (``parallel``); the filters'
    stack keeps the method as its bottom layer (for messages). Raises ConfigError if a layer
    cannot be created or a wrapper stands anywhere but right above the method.
    """
    registry = registry if registry is not None else default_registry
    component = registry.create(stack.method)
    filters = list(stack.filters)
    while filters and getattr(registry.get(filters[-1].name), "wraps_method", False):
        component = registry.create(filters.pop()).over(component)
    for layer in filters:
        if getattr(registry.get(layer.name), "wraps_method", False):
            raise ConfigError(f"in {stack}: {layer.name} must be the lowest filter, right above the method "
                              "(it makes the connections)")
    return component, Stack(tuple(filters) + (stack.method,))


@dataclasses.dataclass
class ConnectionInfo:
    """What one data connection is: for ``gridsock status`` and for the application."""

    conn: int
    peer_id: str
    peer_name: str
    port: int
    stack: str
    initiator: bool
    opened_at: float = dataclasses.field(default_factory=time.time)
    detail: Dict[str, object] = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict:
        """The documented form (docs/status.md): bytes each way where a bridge counts them, else
        None (:meth:`Assembler.status` asks the kernel for a TCP socket handed to a program)."""
        bridge = self.detail.get("bridge")
        stats = getattr(bridge, "stats", None)
        handed = self.detail.get("handed")
        return {"conn": self.conn, "peer": self.peer_name, "peer_id": self.peer_id, "port": self.port,
                "stack": self.stack, "side": "client" if self.initiator else "server",
                "opened_at": self.opened_at, "age_s": round(max(0.0, time.time() - self.opened_at), 3),
                "bytes_sent": stats.bytes_to_stream if stats is not None else None,
                "bytes_received": stats.bytes_from_stream if stats is not None else None,
                "rtt_ms": None,
                "handed": isinstance(handed, _HandOver),
                "pid": handed.pid if isinstance(handed, _HandOver) else None,
                **{k: v for k, v in self.detail.items() if k not in _INTERNAL_DETAIL}}


# What ConnectionInfo.detail holds for the node's own use, never shown.
_INTERNAL_DETAIL = ("stream", "socket", "bridge", "handed")


@dataclasses.dataclass
class _HandOver:
    """A connection whose descriptor went to a program (through the agent): the program's pid
    (SO_PEERCRED), and the kernel socket it got (inode, local and remote address) if TCP."""

    pid: Optional[int]
    inode: Optional[int] = None
    local: Optional[Tuple[str, int]] = None
    remote: Optional[Tuple[str, int]] = None


@dataclasses.dataclass
class PathRecord:
    """How this node last reached one peer: the outcome of the last race to it.

    ``stack`` is the winner (None: every candidate failed); ``tried`` the last race's losers
    and failures, with why; ``reasons`` the latest reason for every stack that failed or lost
    to this peer in any race (a winner's is dropped), so that a race the cached winner won
    alone still shows why the others are not used.
    """

    peer_id: str
    peer_name: str
    stack: Optional[str]
    method: Optional[str]
    at: float  # time.time() when the race ended
    chosen: str  # "rules" (the node's candidates) or "caller" (a stack named by the caller)
    connect_ms: Optional[float]
    tried: List[Tuple[str, str]]
    reasons: "OrderedDict[str, Tuple[str, float]]"
    #: The candidates in the rules' order, best first, with their tier (of gridsock.rules.TIERS).
    ranking: List[Tuple[str, str]] = dataclasses.field(default_factory=list)
    #: A better candidate that connected after the race, in the background (now cached), if any.
    better_later: Optional[str] = None
    #: The gateway the winner's connection went through, if its method says (``reverse``).
    via: Optional[str] = None

    def to_json(self) -> dict:
        return {"peer": self.peer_name, "peer_id": self.peer_id, "stack": self.stack, "method": self.method,
                "direct": None if self.method is None else self.method != "relay",
                "at": self.at, "chosen": self.chosen, "connect_ms": self.connect_ms,
                "tried": [[stack, why] for stack, why in self.tried],
                "reasons": [{"stack": stack, "reason": why, "at": at} for stack, (why, at) in self.reasons.items()],
                "ranking": [{"stack": stack, "tier": rank} for stack, rank in self.ranking],
                "better_later": self.better_later, "via": self.via}


class DataListener:
    """Connections to one grid port of this node; ``accept()`` hands them out."""

    def __init__(self, assembler: "Assembler", port: int) -> None:
        self.port = port
        self._assembler = assembler
        self._queue: gevent.queue.Queue = gevent.queue.Queue(maxsize=LISTEN_BACKLOG)
        self.closed = False

    def accept(self, timeout: float | None = None, *, tcp_bridge: bool = False) -> Tuple[socket.socket, ConnectionInfo]:
        """Return ``(socket, info)`` for the next connection; raise TimeoutError after ``timeout``.

        The socket is a real OS socket (see the module docstring); ``tcp_bridge``: a bridged one
        is a loopback TCP socket rather than a Unix one.
        """
        stream, info = self.accept_stream(timeout)
        return self._assembler._hand_out(Stack.parse(info.stack), stream, info, tcp_bridge=tcp_bridge), info

    def accept_stream(self, timeout: float | None = None) -> Tuple[Stream, ConnectionInfo]:
        """Like accept(), but the framework's Stream itself (for framework code and tests)."""
        if self.closed:
            raise ConnectError(f"listener on port {self.port} is closed")
        try:
            item = self._queue.get(timeout=timeout)
        except gevent.queue.Empty:
            raise TimeoutError(f"no connection on port {self.port} within {timeout} s") from None
        if item is None:
            raise ConnectError(f"listener on port {self.port} is closed")
        return item

    def _deliver(self, item, timeout: float = 0.0) -> bool:
        """Queue ``item`` for accept(), waiting at most ``timeout`` for room; False if the
        listener is closed (or closes meanwhile) or the backlog stayed full."""
        if self.closed:
            return False
        try:
            self._queue.put(item, block=timeout > 0, timeout=timeout or None)
        except gevent.queue.Full:
            return False
        # Closed while we waited? close() has drained the queue already. (mypy narrows
        # ``self.closed`` to False above and cannot see that the wait let close() run.)
        return not self._is_closed()

    def _is_closed(self) -> bool:
        return self.closed

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self._assembler.listeners.get(self.port) is self:  # (not a newer listener of the port)
            del self._assembler.listeners[self.port]
            self._assembler._ports_changed()
        while not self._queue.empty():
            item = self._queue.get_nowait()
            if item is not None:
                item[0].close()
        self._queue.put_nowait(None)


def _until_closed(sock) -> bool:
    """Wait until ``sock`` is readable: True if its peer closed it (EOF or an error), False if
    data came (the client's first bytes, early: they stay queued for the stack)."""
    from gevent.socket import wait_read

    try:
        wait_read(sock.fileno())
        return sock.recv(1, socket.MSG_PEEK) == b""
    except OSError:
        return True


class Assembler:
    """The data-connection side of one node (client and server); see the module docstring.

    ``registry`` gives the components (the default registry unless told otherwise).
    ``counters`` counts what the server side did with method connections: ``delivered``
    (nominated, built, queued) and ``not_taken`` (closed unnominated, failed, or not queued);
    and, on both sides, the connections whose method counts its connect attempts (``splice``)
    made on the first (``first_attempt``) or a later one (``retried``).
    """

    def __init__(self, node, rules: Rules, *, registry: Optional[Registry] = None) -> None:
        self.node = node
        self.rules = rules
        # What peers make us log (bad requests, refused data connections), rate-limited per peer.
        self._peer_log = RateLimitedLog(log)
        self.registry = registry if registry is not None else default_registry
        self.listeners: Dict[int, DataListener] = {}
        # Called with the sorted served ports whenever they change (the node saves them in its
        # state directory), except while the node stops.
        self.on_ports: Optional[Callable[[List[int]], None]] = None
        self._coming_back: Dict[int, float] = {}  # port -> monotonic deadline (expect_back)
        self._back: Dict[int, gevent.event.Event] = {}  # port -> set when it is served again
        self._closing = False
        self.connections: Dict[int, ConnectionInfo] = {}
        # Called with each new connection's info as it is recorded (both sides): the metrics
        # count server-side connections here, exactly, however short they live.
        self.on_record: List[Callable[[ConnectionInfo], None]] = []
        self.counters: Dict[str, int] = {"delivered": 0, "not_taken": 0, "first_attempt": 0, "retried": 0}
        self._arrivals: Dict[bytes, Arrival] = {}  # token -> connections awaited on the node port
        self._registered: Dict[bytes, gevent.event.Event] = {}  # tokens that arrived before their request
        self._early = 0  # data connections waiting for such a token's request
        self._early_per_token: Dict[bytes, int] = {}  # ... of each token (its entry goes with the last)
        self._used: Dict[bytes, str] = {}  # token -> "used" or "cancelled", oldest first
        self._flight_follows: Dict[str, bool] = {}  # server node ids (FLIGHT_FOLLOWS_KEPT), oldest first
        self._winners: Dict[str, Tuple[Stack, float]] = {}  # peer id -> the stack that worked last, until
        self._paths: "OrderedDict[str, PathRecord]" = OrderedDict()  # peer id -> last race, oldest first
        self._conn_ids = iter(range(1, 2**62))
        self._prune_at = CONNECTIONS_PRUNE_AT
        self._sweep_timer: Any = None  # the hub's timer of the next sweep, while one is due
        self.sweep_s = CONNECTIONS_SWEEP_S  # (tests shorten it)
        self._next_client_port = CLIENT_PORTS.start + secrets.randbelow(len(CLIENT_PORTS))

    # --- server side -------------------------------------------------------------------------

    def listen(self, port: int) -> DataListener:
        """Serve grid port ``port`` of this node; ConfigError if it is taken or invalid."""
        if not isinstance(port, int) or not 0 < port < 65536:
            raise ConfigError(f"bad port {port!r}")
        if port in self.listeners:
            raise ConfigError(f"port {port} of node {self.node.name} is already served")
        listener = DataListener(self, port)
        self.listeners[port] = listener
        self._coming_back.pop(port, None)
        back = self._back.pop(port, None)
        if back is not None:
            back.set()
        self._ports_changed()
        return listener

    def expect_back(self, ports: Sequence[int], within_s: float = PORTS_BACK_WITHIN_S) -> None:
        """The node served ``ports`` before it restarted: for ``within_s``, a request for one of
        them that nobody serves yet waits for it to be served again instead of being refused."""
        deadline = time.monotonic() + within_s
        for port in ports:
            if isinstance(port, int) and 0 < port < 65536 and port not in self.listeners:
                self._coming_back[port] = deadline

    def expected_back(self, port: int) -> bool:
        """True while ``port`` is expected back (expect_back) and not served yet: the agent
        does not give it to another program meanwhile."""
        deadline = self._coming_back.get(port)
        return deadline is not None and time.monotonic() < deadline and port not in self.listeners

    def _wait_back(self, port: int) -> None:
        """If ``port`` is expected back (expect_back) and not served yet, wait for it, at most
        until its deadline."""
        deadline = self._coming_back.get(port)
        if deadline is None or port in self.listeners:
            return
        left = deadline - time.monotonic()
        if left <= 0:
            self._coming_back.pop(port, None)
            return
        log.info("node %s: a request for grid port %d waits up to %.1f s for it to be served again", self.node.name,
                 port, left)
        self._back.setdefault(port, gevent.event.Event()).wait(left)

    def _ports_changed(self) -> None:
        if self.on_ports is not None and not self._closing:
            try:
                self.on_ports(sorted(self.listeners))
            except OSError as exc:  # (a full disk: the ports are not kept for a restart, no more)
                log.warning("node %s: the served ports could not be saved: %s", self.node.name, exc)

    def handle_request(self, delivery) -> bytes:
        """The ``assemble`` topic handler: check the request, hand it to its method, answer.

        Returns the encoded AssemblyAccept or AssemblyRefuse. Malformed input is refused with
        ``bad-request`` (and logged): the requester gets a structured answer, nothing else.
        """
        try:
            request = wire.decode_assembly(delivery.payload, peer=delivery.src)
            if not isinstance(request, wire.AssemblyRequest):
                raise RemoteProtocolError(f"expected an AssemblyRequest, got {type(request).__name__}")
        except RemoteProtocolError as exc:
            self._peer_log.warning(delivery.src, "node %s: bad assembly request from %s: %s", self.node.name,
                                   delivery.src, exc)
            return _refuse("bad-request", f"bad assembly request: {exc}")
        token = request.token_bytes
        try:
            return wire.encode_assembly(self._answer(request, delivery.src))
        except MethodRefusal as exc:
            if exc.code != "bad-token":  # its connection, if one races the request, is refused at once
                self._remember_used(token, "refused")
            return _refuse(exc.code, exc.reason)
        except RemoteProtocolError as exc:
            self._peer_log.warning(delivery.src, "node %s: bad assembly request from %s: %s", self.node.name,
                                   delivery.src, exc)
            return _refuse("bad-request", str(exc))

    def _answer(self, request: wire.AssemblyRequest, src: str) -> wire.AssemblyAccept:
        """Check ``request`` and start its method's responder; MethodRefusal if refused."""
        client = self.node.directory.get(src)
        me = self.node.entry
        if client is None or me is None:
            raise MethodRefusal("unknown-node", f"node {src} is not in {self.node.name}'s directory")
        port = request.port
        self._wait_back(port)
        listening = port in self.listeners
        try:
            stack = self.registry.parse(request.stack)  # (kept: the same few stacks on every request)
            method, filters = method_of(stack, self.registry)
        except ConfigError as exc:
            if not listening:
                raise MethodRefusal("refused", f"nothing listens on port {port} of {self.node.name}") from None
            raise MethodRefusal("bad-stack", str(exc)) from None
        # A request that continues a live connection (a new path under it: ``resume``) needs
        # no listener: the connection was accepted long ago.
        if not listening and not getattr(method, "continues", lambda offer: False)(request.offer):
            raise MethodRefusal("refused", f"nothing listens on port {port} of {self.node.name}")
        why = self.rules.refusal(me, client, stack)
        if why:
            log.warning("refused %s from %s to port %d: %s", stack, client.name, port, why)
            raise MethodRefusal("policy", why)
        token = request.token_bytes
        if token in self._used or token in self._arrivals:
            raise MethodRefusal("bad-token", "token already used")
        self._remember_used(token)  # a request, once: whatever the method does with it
        early = self._answer_tls(filters, client, request) if request.tls_hello is not None else None
        # A responder that makes the connection itself sends the flight on it (reverse).
        follows = early is not None and bool(getattr(method, "sends_first_bytes", False))
        ctx = ResponderContext(
            node=self.node, me=me, client=client, request=request,
            expect=lambda count: self._expect(token, count),
            deliver=lambda lower: self._deliver(lower, client, port, stack, filters, request.client_port, early),
            request_timeout=ASSEMBLY_TIMEOUT_S,
            first_bytes=early.flight if early is not None and follows else b"",
        )
        answer = method.respond(ctx)
        if early is None:
            return wire.AssemblyAccept(answer)
        if follows:
            return wire.AssemblyAccept(answer, tls_flight_follows=True)
        return wire.AssemblyAccept(answer, tls_flight=base64.b64encode(early.flight).decode("ascii"))

    def _answer_tls(self, filters: Stack, client: wire.NodeEntry, request: wire.AssemblyRequest):
        """The server's half of the early TLS handshake of ``request`` (its ``tls_hello``): an
        EarlyTls whose flight goes in the answer. MethodRefusal ``bad-request`` if the stack
        has no ``tls`` right above its method, or the hello is refused."""
        component = self._early_tls(filters)
        if component is None:
            raise MethodRefusal("bad-request", f"a TLS hello with {filters}, whose lowest filter is not tls")
        hello = request.tls_hello_bytes
        assert hello is not None
        try:
            return component.answer_early(self._context(client, initiator=False), hello)
        except (AuthError, ConfigError) as exc:
            self._peer_log.warning(client.node_id, "node %s: TLS hello from %s refused: %s", self.node.name,
                                   client.name, exc)
            raise MethodRefusal("bad-request", str(exc)) from None

    def _early_tls(self, filters: Stack) -> Any:
        """The ``tls`` component if it is the filter right above the method (it can begin its
        handshake with the assembly: "Early handshake" in gridsock.components.tls), or None."""
        if not filters.filters or filters.filters[-1].name != "tls":
            return None
        component = self.registry.get("tls")
        return component if hasattr(component, "begin") and hasattr(component, "answer_early") else None

    def _expect(self, token: bytes, count: int) -> Arrival:
        """Await ``count`` node-port connections presenting ``token``."""
        arrival = Arrival(token, count, self._arrival_done)
        self._arrivals[token] = arrival
        event = self._registered.pop(token, None)
        if event is not None:  # its first connection came before the request: let it in
            event.set()
        return arrival

    def _arrival_done(self, arrival: Arrival, why: str) -> None:
        if self._arrivals.get(arrival.token) is arrival:
            del self._arrivals[arrival.token]
        self._remember_used(arrival.token, why)

    def _remember_used(self, token: bytes, why: str = "used") -> None:
        self._used[token] = why
        while len(self._used) > USED_TOKENS_KEPT:
            self._used.pop(next(iter(self._used)))

    def handle_data_connection(self, sock, label: str) -> None:
        """A node-port connection that began with DATA_PREAMBLE (not yet read). Owns ``sock``."""
        try:
            with gevent.Timeout(MATCH_TIMEOUT_S, TimeoutError("no preamble")):
                preamble = wire.decode_preamble(recv_exactly(sock, wire.PREAMBLE_BYTES), peer=label)
            assert preamble is not None  # (all its bytes were read)
            token = preamble.token
            arrival = self._arrivals.get(token)
            if arrival is None:
                if token in self._used:
                    raise RemoteProtocolError(f"token already {self._used[token]} (replay or late call back)")
                if self._early >= MAX_EARLY_DATA_CONNECTIONS:
                    raise RemoteProtocolError(f"unknown token, and {self._early} connections wait for theirs already")
                event = self._registered.setdefault(token, gevent.event.Event())
                self._early += 1
                self._early_per_token[token] = self._early_per_token.get(token, 0) + 1
                watcher = gevent.spawn(_until_closed, sock)
                try:
                    deadline = time.monotonic() + MATCH_TIMEOUT_S
                    either: List[Any] = [event, watcher]
                    gevent.wait(either, timeout=MATCH_TIMEOUT_S, count=1)
                    if not event.is_set() and watcher.ready():
                        if watcher.value:
                            raise RemoteProtocolError("closed while waiting for the request of its token")
                        event.wait(max(0.0, deadline - time.monotonic()))  # (early bytes came: wait on)
                finally:
                    watcher.kill(block=False)
                    self._early -= 1
                    # The token's entry goes with its last waiting connection, however that
                    # ends (a client that closed while waiting used to leave it behind: an
                    # Event a connection, for good; the fuzz campaign's data path grew by
                    # 40 MB in a million inputs).
                    waiting = self._early_per_token.pop(token) - 1
                    if waiting:
                        self._early_per_token[token] = waiting
                    elif self._registered.get(token) is event:
                        del self._registered[token]
                arrival = self._arrivals.get(token)
            if arrival is None:
                raise RemoteProtocolError("unknown token")
            arrival.put(preamble.index, sock)
        except (RemoteProtocolError, TimeoutError, OSError) as exc:
            self._peer_log.warning(label.rpartition(":")[0] or label, "node %s refused data connection from %s: %s",
                                   self.node.name, label, exc)
            sock.close()

    def _deliver(self, lower: Stream, client: wire.NodeEntry, port: int, stack: Stack, filters: Stack,
                 client_port: Optional[int] = None, tls_early: Any = None) -> None:
        """A method's connection is up: wait for the client's nomination, build our half of the
        filters, queue the connection on the listener; close it if any of that fails."""
        try:
            with gevent.Timeout(NOMINATION_TIMEOUT_S, TimeoutError(f"not nominated within {NOMINATION_TIMEOUT_S:g} s")):
                first = lower.receive_some(len(NOMINATE))
            if first != NOMINATE:
                raise RemoteProtocolError("closed before nomination" if not first else "bad nomination byte")
        except (GridsockError, TimeoutError, OSError) as exc:
            # The usual case: the client raced several candidates and another one won.
            log.info("node %s: %s connection from %s not taken: %s", self.node.name, stack, client.name, exc)
            self.counters["not_taken"] += 1
            lower.close()
            return
        listener = self.listeners.get(port)
        try:
            if listener is None:
                raise ConnectError(f"nothing listens on port {port} any more")
            stream = self._build(stack, filters, lower, client, initiator=False, tls_early=tls_early)
        except (GridsockError, OSError) as exc:
            log.warning("node %s: data connection from %s over %s failed: %s", self.node.name, client.name, stack, exc)
            self.counters["not_taken"] += 1
            lower.close()
            return
        info = self._record(client, port, stack, initiator=False, stream=stream)
        if client_port is not None:
            info.detail["client_port"] = client_port
        via = _via(lower)
        if via:
            info.detail["via"] = via
        self._note_detail(info, lower)
        if not listener._deliver((stream, info), timeout=BACKLOG_WAIT_S):
            log.warning("port %d backlog full or closed: dropping connection from %s", port, client.name)
            self.counters["not_taken"] += 1
            stream.close()
            return
        self.counters["delivered"] += 1

    # --- client side -------------------------------------------------------------------------

    def open_stream(self, peer: str, port: int, *, stack: Union[None, str, Stack, Sequence[Union[str, Stack]]] = None,
                    timeout: float = ASSEMBLY_TIMEOUT_S):
        """Connect to grid port ``port`` of node ``peer``; return ``(stream, info)``.

        With ``stack`` None the rules give the candidates (direct, reverse, splice, gateways,
        relay), raced with staggered starts (see :meth:`_race`); the winner is remembered for
        the peer. A stack (string or Stack) is used alone; a list of them is raced in order.
        ``info.detail["tried"]`` lists the candidates that failed or lost, and why. Raises
        ConnectError (``.tried`` says what failed and why, ``.code`` the server's refusal code
        if it refused) when the server refuses or every candidate fails; ConfigError for a bad
        stack string. The server is told a client port (the next of :data:`CLIENT_PORTS`, as
        a kernel's ephemeral port): ``info.detail["client_port"]``.
        """
        client_port = self._client_port()
        entry = self.node.directory.resolve(peer)
        me = self._me()
        if entry is None or me is None:
            raise ConnectError(f"unknown node {peer!r}" if me else "this node has not joined yet", peer=peer)
        if stack is not None:
            given = [stack] if isinstance(stack, (str, Stack)) else list(stack)
            if not given:
                raise ConfigError("no stack to connect with")
            candidates = [self.registry.parse(s) if isinstance(s, str) else s for s in given]
            return self._race(entry, port, candidates, timeout, remember=False, client_port=client_port)
        candidates = self.rules.candidates(me, entry)
        ranking = list(candidates)
        winner, until = self._winners.get(entry.node_id, (None, 0.0))
        head_start = None
        if winner in candidates and until > time.monotonic():  # what worked last time first
            candidates.remove(winner)
            candidates.insert(0, winner)
            head_start = CACHED_HEAD_START_S
        return self._race(entry, port, candidates, timeout, remember=True, ranking=ranking, head_start=head_start,
                          client_port=client_port)

    def _client_port(self) -> int:
        port = self._next_client_port
        self._next_client_port = port + 1 if port + 1 < CLIENT_PORTS.stop else CLIENT_PORTS.start
        return port

    def _me(self) -> Optional[wire.NodeEntry]:
        """This node's directory entry, with the gateways it knows of itself
        (:func:`gridsock.rules.gateways_of`) even before the directory carries them."""
        me = self.node.entry
        if me is None:
            return None
        gateways = gateways_of(self.node)
        return me if gateways == me.gateways else dataclasses.replace(me, gateways=gateways)

    def _tier(self, stack: Stack) -> int:
        """``stack``'s rank in :data:`gridsock.rules.TIERS` (0 is best)."""
        try:
            component = self.registry.get(stack.method.name)
        except ConfigError:
            component = None
        return tier(stack, component)

    def _race(self, entry: wire.NodeEntry, port: int, candidates, timeout: float, *, remember: bool,
              ranking: Optional[Sequence[Stack]] = None, head_start: Optional[float] = None,
              client_port: Optional[int] = None):
        """Happy eyeballs over ``candidates``: return ``(stream, info)`` of the first that works.

        The first candidate starts at once; each next one ``STAGGER_S`` after the previous
        start, or as soon as every running one has failed. The first to be established is
        nominated (the others are cancelled, their half-made connections closed, and the
        server builds nothing for them); if its filters fail, the race goes on. A refusal by
        the server ends it: no other method would change the server's mind.

        With ``remember`` (the rules' candidates, ``ranking`` their order), a winner of a lower
        tier than candidates still under way leaves those to finish in the background
        (:meth:`_await_better`), rather than cancelling them. ``head_start``: the first
        candidate's lead over the second (the cached winner's), instead of ``STAGGER_S``.
        """
        if len(candidates) == 1 and not remember:
            return self._alone(entry, port, candidates[0], timeout, client_port)
        ranked = list(ranking) if ranking is not None else list(candidates)
        order = {str(s): (self._tier(s), i) for i, s in enumerate(ranked)}
        background: Dict[int, gevent.Greenlet] = {}  # better candidates left to finish after the race
        began = time.monotonic()
        deadline = began + timeout
        results: gevent.queue.Queue = gevent.queue.Queue()
        running: Dict[int, gevent.Greenlet] = {}
        tried: list = []
        started = 0
        next_start = 0.0

        def start() -> None:
            nonlocal started, next_start
            i = started
            greenlet = gevent.spawn(self._attempt, entry, port, candidates[i], deadline, client_port)
            greenlet.link(lambda g, i=i: results.put((i, g)))  # type: ignore[misc]  # a lambda with a default argument
            running[i] = greenlet
            started += 1
            next_start = time.monotonic() + (head_start if i == 0 and head_start is not None else STAGGER_S)

        timed_out: List[bool] = []  # one flag per failed candidate: it failed by a timeout

        def fail(last: Optional[Stack], *, deadline_passed: bool = False):
            # Every candidate ran out of time (a SYN into a black hole): ETIMEDOUT for a program.
            cls = ConnectTimeoutError if deadline_passed or (timed_out and all(timed_out)) else ConnectError
            self._note_path(entry, None, tried, remember=remember)
            return cls(f"cannot connect to {entry.name}:{port}", peer=entry.name,
                       method=last.method.name if last else None, tried=tried)

        try:
            start()
            while running or started < len(candidates):
                now = time.monotonic()
                if now >= deadline:
                    tried.extend((str(candidates[i]), f"no connection within {timeout:g} s") for i in sorted(running))
                    raise fail(candidates[max(running)] if running else None, deadline_passed=True)
                if not running:
                    start()
                    continue
                wait = deadline - now
                if started < len(candidates):
                    wait = min(wait, max(0.0, next_start - now))
                try:
                    i, greenlet = results.get(timeout=wait)
                except gevent.queue.Empty:
                    if started < len(candidates) and time.monotonic() >= next_start:
                        log.info("node %s: %s to %s not there yet; also trying %s", self.node.name,
                                 candidates[started - 1], entry.name, candidates[started])
                        start()
                    continue
                del running[i]
                stack = candidates[i]
                made, exc = greenlet.get()  # (a bug in _attempt raises here, as it should)
                if made is None:
                    assert exc is not None
                    if exc.code is not None and exc.code != "unreachable":  # the server's will
                        exc.tried = tried + exc.tried
                        self._note_path(entry, None, exc.tried, remember=remember)
                        raise exc
                    tried.append((str(stack), _reason(exc)))
                    timed_out.append(isinstance(exc, TimeoutError))
                    log.info("node %s: %s to %s failed: %s", self.node.name, stack, entry.name, tried[-1][1])
                    if not running and started == len(candidates):
                        raise fail(stack) from exc
                    continue
                lower, filters, early, nominated = made
                try:
                    stream = self._nominate(lower, stack, filters, entry, deadline, early, nominated=nominated)
                except ConnectError as exc:  # e.g. tls refused the peer: the others may still do
                    tried.append((str(stack), _reason(exc)))
                    timed_out.append(isinstance(exc, TimeoutError))
                    if not running and started == len(candidates):
                        raise fail(stack) from exc
                    continue
                if remember:
                    won = order.get(str(stack), (0, 0))[0]
                    background = {j: g for j, g in running.items()
                                  if order.get(str(candidates[j]), (won, 0))[0] < won}
                for j in sorted(running):
                    tried.append((str(candidates[j]), f"still trying in the background: {stack} connected first"
                                  if j in background else f"cancelled: {stack} connected first"))
                for j in background:
                    del running[j]
                info = self._won(entry, port, stack, stream, lower, tried, began, client_port, remember=remember,
                                 untried=candidates[started:],
                                 ranking=[(str(s), TIERS[order[str(s)][0]]) for s in ranked] if remember else ())
                if background:
                    gevent.spawn(self._await_better, entry, stack, {j: (candidates[j], g) for j, g in background.items()},
                                 order, deadline)
                return stream, info
            raise fail(None)  # candidates is never empty
        finally:
            for greenlet in running.values():
                greenlet.kill(block=True)
            while not results.empty():  # established meanwhile, never nominated
                i, greenlet = results.get_nowait()
                if i not in background:  # (those are _await_better's)
                    _discard(greenlet)

    def _alone(self, entry: wire.NodeEntry, port: int, stack: Stack, timeout: float, client_port: Optional[int]):
        """:meth:`_race` of one stack the caller named: its attempt runs in the caller's
        greenlet (no greenlet to start, no result handed back through the hub: two turns of
        the hub fewer on the connect's path), with the same outcomes. A timeout of the
        caller's own around the connect stays the caller's (see :meth:`_establish`)."""
        began = time.monotonic()
        deadline = began + timeout
        tried: List[Tuple[str, str]] = []
        try:
            timer = gevent.Timeout(timeout)
            timer.start()
            try:
                lower, filters, early, nominated = self._establish(entry, port, stack, deadline, client_port,
                                                                   timer=timer, alone=True)
            finally:
                timer.close()
            stream = self._nominate(lower, stack, filters, entry, deadline, early, nominated=nominated)
        except ConnectError as exc:
            if exc.code is not None and exc.code != "unreachable":  # the server's will
                self._note_path(entry, None, exc.tried, remember=False)
                raise
            tried.append((str(stack), _reason(exc)))
            log.info("node %s: %s to %s failed: %s", self.node.name, stack, entry.name, tried[-1][1])
            self._note_path(entry, None, tried, remember=False)
            cls = ConnectTimeoutError if isinstance(exc, TimeoutError) else ConnectError
            raise cls(f"cannot connect to {entry.name}:{port}", peer=entry.name, method=stack.method.name,
                      tried=tried) from exc
        return stream, self._won(entry, port, stack, stream, lower, tried, began, client_port, remember=False)

    def _won(self, entry: wire.NodeEntry, port: int, stack: Stack, stream: Stream, lower: Stream,
             tried: List[Tuple[str, str]], began: float, client_port: Optional[int], *, remember: bool,
             untried: Sequence[Stack] = (), ranking: Sequence[Tuple[str, str]] = ()) -> ConnectionInfo:
        """Record the connection ``stack`` made (nominated: ``stream`` over the method's
        ``lower``) and the race's outcome; return its info."""
        via = _via(lower)
        info = self._record(entry, port, stack, initiator=True, stream=stream)
        info.detail["client_port"] = client_port
        if tried:
            info.detail["tried"] = tried
        if via:
            info.detail["via"] = via
        self._note_detail(info, lower)
        if remember:
            self._winners[entry.node_id] = (stack, time.monotonic() + WINNER_TTL_S)
        self._note_path(entry, stack, tried, remember=remember, untried=untried,
                        connect_ms=round((time.monotonic() - began) * 1000, 3), ranking=ranking, via=via)
        return info

    def _await_better(self, entry: wire.NodeEntry, winner: Stack, pending: Dict[int, Tuple[Stack, gevent.Greenlet]],
                      order: Dict[str, Tuple[int, int]], deadline: float) -> None:
        """After a race won by ``winner``, let ``pending`` (better candidates still under way)
        finish for at most ``BETTER_LATE_S``: one that connects is closed unnominated (the
        server delivers nothing) and, if better than the peer's cached winner, replaces it.
        What became of each goes into the peer's path record."""
        until = min(deadline, time.monotonic() + BETTER_LATE_S)
        best = winner

        def better(a: Stack, b: Stack) -> bool:
            return order.get(str(a), (len(TIERS), 0)) < order.get(str(b), (len(TIERS), 0))

        try:
            while pending:
                left = until - time.monotonic()
                if left <= 0 or not gevent.wait([g for _, g in pending.values()], timeout=left, count=1):
                    break
                for j, (stack, greenlet) in list(pending.items()):
                    if j not in pending or not greenlet.ready():  # (dropped below, or still under way)
                        continue
                    del pending[j]
                    value = greenlet.value if greenlet.successful() else None
                    made, exc = value if isinstance(value, tuple) else (None, greenlet.exception)
                    if made is None:
                        why = _reason(exc) if isinstance(exc, ConnectError) else str(exc)
                        self._note_later(entry, stack, f"failed after {winner} connected: {why}")
                        continue
                    made[0].close()  # never nominated: the server closes its half, delivers nothing
                    if not better(stack, best):
                        self._note_later(entry, stack, f"connected later, after {best}")
                        continue
                    best = stack
                    cached, _ = self._winners.get(entry.node_id, (None, 0.0))
                    if cached is None or cached == winner or better(stack, cached):
                        self._winners[entry.node_id] = (stack, time.monotonic() + WINNER_TTL_S)
                    self._note_later(entry, stack, f"finished later: better than {winner}; the next connection "
                                     "tries it first", better=True)
                    log.info("node %s: %s to %s connected after %s won the race: the next connection tries it "
                             "first", self.node.name, stack, entry.name, winner)
                    for k, (other, rival) in list(pending.items()):  # no better than what we have now
                        if not better(other, best):
                            del pending[k]
                            rival.kill(block=True)
                            _discard(rival)
                            self._note_later(entry, other, f"cancelled: {stack} connected first, later")
        finally:
            for stack, greenlet in pending.values():
                greenlet.kill(block=True)
                _discard(greenlet)
                self._note_later(entry, stack, f"cancelled: not connected within {BETTER_LATE_S:g} s after "
                                 f"{winner} connected")

    def _note_later(self, entry: wire.NodeEntry, stack: Stack, why: str, *, better: bool = False) -> None:
        """What became of ``stack``, left to finish after the last race to ``entry``: in the
        path record's ``tried`` and ``reasons`` (and ``better_later`` if it is now cached)."""
        record = self._paths.get(entry.node_id)
        if record is None:
            return
        record.tried = [(s, why if s == str(stack) else w) for s, w in record.tried]
        record.reasons.pop(str(stack), None)
        record.reasons[str(stack)] = (why, time.time())
        while len(record.reasons) > REASONS_KEPT_PER_PEER:
            record.reasons.popitem(last=False)
        if better:
            record.better_later = str(stack)

    def _note_path(self, entry: wire.NodeEntry, winner: Optional[Stack], tried: List[Tuple[str, str]], *,
                   remember: bool, untried: Sequence[Stack] = (), connect_ms: Optional[float] = None,
                   ranking: Sequence[Tuple[str, str]] = (), via: Optional[str] = None) -> None:
        """Keep the outcome of a race to ``entry`` for :meth:`paths` (bounded: PATHS_KEPT).

        ``untried``: candidates never started, the winner having connected first; they get
        that as their reason unless an earlier race gave them one.
        """
        now = time.time()
        old = self._paths.pop(entry.node_id, None)
        reasons: "OrderedDict[str, Tuple[str, float]]" = old.reasons if old is not None else OrderedDict()
        for stack, why in tried:
            reasons.pop(stack, None)
            reasons[stack] = (why, now)
        for candidate in untried:
            if str(candidate) not in reasons:
                reasons[str(candidate)] = (f"not tried: {winner} connected first", now)
        if winner is not None:
            reasons.pop(str(winner), None)
        while len(reasons) > REASONS_KEPT_PER_PEER:
            reasons.popitem(last=False)
        self._paths[entry.node_id] = PathRecord(
            peer_id=entry.node_id, peer_name=entry.name, stack=None if winner is None else str(winner),
            method=None if winner is None else winner.method.name, at=now, chosen="rules" if remember else "caller",
            connect_ms=connect_ms, tried=list(tried), reasons=reasons, ranking=list(ranking), via=via)
        while len(self._paths) > PATHS_KEPT:
            self._paths.popitem(last=False)

    def paths(self) -> list:
        """How this node last reached each peer it raced to (most recent last), as JSON: the
        :class:`PathRecord` fields, ``direct`` (the method is not ``relay``) and ``cached``
        (``{stack, until}``: the winner tried first until ``until``, a ``time.time()``; or None)."""
        now, wall = time.monotonic(), time.time()
        out = []
        for peer_id, record in self._paths.items():
            item = record.to_json()
            winner, until = self._winners.get(peer_id, (None, 0.0))
            item["cached"] = ({"stack": str(winner), "until": round(wall + (until - now), 3)}
                              if winner is not None and until > now else None)
            out.append(item)
        return out

    def _attempt(self, entry: wire.NodeEntry, port: int, stack: Stack, deadline: float,
                 client_port: Optional[int] = None,
                 ) -> Tuple[Optional[Tuple[Stream, Stack, Any, bool]], Optional[ConnectError]]:
        """:meth:`_establish` in a race: ``((stream, filters, tls_early, nominated), None)`` or
        ``(None, ConnectError)``."""
        try:
            return self._establish(entry, port, stack, deadline, client_port), None
        except ConnectError as exc:  # expected: returned, not left to the hub to print
            return None, exc

    def _establish(self, entry: wire.NodeEntry, port: int, stack: Stack, deadline: float,
                   client_port: Optional[int] = None, method: Any = None,
                   timer: Optional[gevent.Timeout] = None, alone: bool = False) -> Tuple[Stream, Stack, Any, bool]:
        """One candidate, up to the method's connection: return its stream, the stack of its
        filters, the TLS handshake begun with the request (an EarlyTls, or None), and whether
        the connection is nominated already (``alone``, the connect's only candidate: a method
        may send the nomination with its first bytes, see ``InitiatorContext.nominate_early``;
        otherwise :meth:`_nominate` sends it). Raises ConnectError (``code`` set if the server
        refused). ``method``: the object to drive instead of the stack's own (see
        :meth:`open_method_stream`; no filters then).

        With ``tls`` right above the method, its ClientHello travels in the request and the
        server's first flight in the answer ("Early handshake" in gridsock.components.tls), or
        on the method's connection when the server makes it (``reverse``: the answer says
        ``tls_flight_follows``). Where the method's connection can prove the acceptance before
        the answer comes (``reverse``), the connect completes on it only once that server's
        answers said the flight follows on the connection: an older server's does not.

        Runs in its own greenlet (killed, it closes whatever it made), where every
        ``gevent.Timeout`` is the connect's own (ConnectTimeoutError); or in the caller's, with
        ``timer`` the connect's: another timeout is the caller's, and passes through as it is.
        """
        name = stack.method.name
        token = secrets.token_bytes(TOKEN_BYTES)
        initiation = None
        try:
            component, filters = method_of(stack, self.registry)
            own_method = method is None
            if method is None:
                method = component
            ctx = InitiatorContext(node=self.node, me=self.node.entry, peer=entry, token=token, deadline=deadline,
                                   expect=lambda count: self._expect(token, count), port=port, stack=stack,
                                   # (a method wrapper, resume or parallel, drives the method: it keeps it)
                                   nominate_early=alone and not getattr(method, "wraps_method", False))
            early_tls = self._early_tls(filters) if own_method else None
            early = early_tls.begin(self._context(entry, initiator=True)) if early_tls is not None else None
            initiation = method.initiate(ctx)
            hello = None if early is None else base64.b64encode(early.hello).decode("ascii")
            request = wire.AssemblyRequest(port=port, stack=str(stack), token=token.hex(), offer=dict(initiation.offer),
                                           client_port=client_port, tls_hello=hello)
            arrived = getattr(initiation, "arrived", None)
            if early is not None and entry.node_id not in self._flight_follows:
                arrived = None  # (where that server puts its flight is not known yet: its answer says)
            try:
                reply = self._request_unless(arrived, entry, wire.encode_assembly(request),
                                             max(0.1, deadline - time.monotonic()))
                if reply is None:  # the method's connection came first: it proves the acceptance
                    return initiation.complete({}), filters, early, initiation.nominated  # (the flight follows on it)
                answer = wire.decode_assembly(reply.payload, peer=entry.name)
            except (RoutingError, TimeoutError, RemoteProtocolError) as exc:
                # (no answer in time: a timeout, as the connect's own deadline passing is)
                cls = ConnectTimeoutError if isinstance(exc, TimeoutError) else ConnectError
                raise cls(f"assembly request to {entry.name} failed: {exc}", peer=entry.name, method=name) from exc
            if isinstance(answer, wire.AssemblyRefuse):
                # ("unreachable": only the server's side of this method failed; others may not)
                kind = ConnectError if answer.code == "unreachable" else ConnectRefusedError
                refusal = kind(f"{entry.name} refused {stack}", peer=entry.name, method=name,
                               tried=[(str(stack), answer.reason)])
                refusal.code = answer.code
                raise refusal
            if not isinstance(answer, wire.AssemblyAccept):
                raise ConnectError(f"{entry.name} answered an assembly request with {type(answer).__name__}",
                                   peer=entry.name, method=name)
            if early is not None:
                if answer.tls_flight_follows:
                    self._flight_follows[entry.node_id] = True
                    while len(self._flight_follows) > FLIGHT_FOLLOWS_KEPT:
                        self._flight_follows.pop(next(iter(self._flight_follows)))
                else:
                    self._flight_follows.pop(entry.node_id, None)
                    early.answered(answer.tls_flight_bytes)  # (None: a server that predates it)
            return initiation.complete(answer.answer), filters, early, initiation.nominated
        except BaseException as exc:
            if timer is not None:
                timer.close()  # (failing already: the abort's own waits are not the connect's to cut short)
            if initiation is not None:
                initiation.abort()
            if isinstance(exc, gevent.Timeout):
                if timer is not None and exc is not timer:
                    raise
                raise ConnectTimeoutError(f"connecting to {entry.name} timed out", peer=entry.name,
                                          method=name) from None
            if isinstance(exc, ConnectError) or not isinstance(exc, (GridsockError, OSError)):
                raise
            raise ConnectError(f"connecting to {entry.name} over {stack} failed: {exc}", peer=entry.name,
                               method=name) from exc

    def _request_unless(self, arrived: Optional[gevent.Greenlet], entry: wire.NodeEntry, payload: bytes,
                        timeout: float):
        """The assembly request's reply; or None if ``arrived`` (an initiation's, e.g. ``reverse``:
        the server's connection, which carries the token, came) is ready first. Raises as
        ``meta_request`` (RoutingError, TimeoutError...)."""
        if arrived is None:
            return self.node.meta_request(entry.node_id, ASSEMBLE_TOPIC, payload, timeout=timeout)
        asking = gevent.spawn(_captured_request, self.node, entry.node_id, payload, timeout)
        try:
            gevent.wait([asking, arrived], timeout=timeout, count=1)
            outcome: Optional[Tuple[Any, Optional[BaseException]]] = asking.value if asking.ready() else None
            reply, failure = outcome if outcome is not None else (None, None)
            if reply is not None:
                return reply
            if arrived.ready():
                return None
            if failure is not None:
                raise failure
            raise TimeoutError(f"no answer from {entry.name} within {timeout:.1f} s")
        finally:
            asking.kill(block=False)  # (a late answer is dropped by the router)

    def _nominate(self, lower: Stream, stack: Stack, filters: Stack, entry: wire.NodeEntry, deadline: float,
                  tls_early: Any = None, *, nominated: bool = False) -> Stream:
        """Tell the server this connection is the one (``NOMINATE``) unless it went already
        (``nominated``), then build the filters (``tls_early``: the TLS handshake begun with
        the request, which ``tls`` continues)."""
        try:
            if not nominated:
                lower.send_all(NOMINATE)
            if not filters.filters:  # (nothing to build, nothing to wait for)
                return self._build(stack, filters, lower, entry, initiator=True)
            with gevent.Timeout(max(0.1, deadline - time.monotonic()),
                                ConnectTimeoutError(f"building {stack} to {entry.name} timed out", peer=entry.name,
                                                    method=stack.method.name)):
                return self._build(stack, filters, lower, entry, initiator=True, tls_early=tls_early)
        except ConnectError:
            lower.close()
            raise
        except (GridsockError, OSError) as exc:
            lower.close()
            raise ConnectError(f"connecting to {entry.name} over {stack} failed: {exc}", peer=entry.name,
                               method=stack.method.name) from exc
        except BaseException:  # (a timeout of the caller's, a kill: the connection goes too)
            lower.close()
            raise

    def open_method_stream(self, peer_id: str, port: int, stack: Stack, method: Any, *, timeout: float) -> Stream:
        """A new connection of ``stack``'s method alone, for a layer that makes the path under a
        live connection again (``gridsock.components.resume``): ``method`` is driven in place of
        the stack's own (its offer says which connection this continues), the stream is
        nominated, and nothing else is done (no filters, no record, no race). Raises
        ConnectError (``code`` set if the server refused), ConnectTimeoutError after ``timeout``.
        """
        entry = self.node.directory.get(peer_id)
        if entry is None or self.node.entry is None:
            raise ConnectError(f"node {peer_id} is not in the directory", peer=peer_id, method=stack.method.name)
        deadline = time.monotonic() + timeout
        with gevent.Timeout(timeout):
            lower, _, _, _ = self._establish(entry, port, stack, deadline, method=method)
        try:
            lower.send_all(NOMINATE)
        except (GridsockError, OSError) as exc:
            lower.close()
            raise ConnectError(f"nominating a new {stack.method.name} path to {entry.name} failed: {exc}",
                               peer=entry.name, method=stack.method.name) from exc
        return lower

    def connect(self, peer: str, port: int, *, stack=None, timeout: float = ASSEMBLY_TIMEOUT_S,
                tcp_bridge: bool = False):
        """Connect and return ``(socket.socket, ConnectionInfo)``: a real OS socket (with
        ``tcp_bridge``, a bridged one is a loopback TCP socket rather than a Unix one)."""
        stream, info = self.open_stream(peer, port, stack=stack, timeout=timeout)
        return self._hand_out(self.registry.parse(info.stack), stream, info, tcp_bridge=tcp_bridge), info

    # --- both --------------------------------------------------------------------------------

    def _build(self, stack: Stack, filters: Stack, lower: Stream, peer: wire.NodeEntry, *, initiator: bool,
               tls_early: Any = None) -> Stream:
        """Wrap the method's stream in the filters; the top stream's info names the whole stack."""
        from .registry import build_filters

        if not filters.filters:  # (the method's stream is the connection)
            lower.info["stack"] = str(stack)
            return lower
        context = self._context(peer, initiator=initiator, tls_early=tls_early)
        stream = build_filters(filters, lower, context, registry=self.registry)
        stream.info["stack"] = str(stack)
        return stream

    def _context(self, peer: wire.NodeEntry, *, initiator: bool, tls_early: Any = None) -> StackContext:
        node = self.node
        return StackContext(session=node.session, identity=node.identity, local_id=node.node_id,
                            peer_id=peer.node_id, peer_name=peer.name, initiator=initiator, tls_early=tls_early)

    def _note_detail(self, info: ConnectionInfo, lower: Stream) -> None:
        """Put what the method says of its connection in ``info.detail``; count its attempts."""
        detail = _method_detail(lower)
        info.detail.update(detail)
        attempts = detail.get("attempts")
        if isinstance(attempts, int):
            self.counters["first_attempt" if attempts <= 1 else "retried"] += 1

    def _record(self, peer: wire.NodeEntry, port: int, stack: Stack, *, initiator: bool, stream: Stream):
        if len(self.connections) >= self._prune_at:
            self._prune()
        conn = next(self._conn_ids)
        info = ConnectionInfo(conn=conn, peer_id=peer.node_id, peer_name=peer.name, port=port, stack=str(stack),
                              initiator=initiator, detail={"stream": stream})
        self.connections[conn] = info
        self._sweep_soon()
        for listener in self.on_record:
            listener(info)
        return info

    def _hand_out(self, stack: Stack, stream: Stream, info: ConnectionInfo, *, tcp_bridge: bool = False):
        from .bridge import hand_out

        sock, bridge = hand_out(stream, plain=not stack.filters, name=f"{info.peer_name}:{info.port}", tcp=tcp_bridge)
        info.detail["bridged"] = bridge is not None
        info.detail["socket"] = weakref.ref(sock)
        if bridge is not None:
            info.detail["bridge"] = bridge
        return sock

    def hand_over(self, info: ConnectionInfo, sock: Optional[socket.socket], pid: Optional[int], *,
                  bridge: Any = None) -> None:
        """Note that connection ``info``'s descriptor goes to program ``pid`` (the agent's
        client), so that it stays listed until the program closes it, although the node keeps
        no descriptor of it. Call before the node closes its copy of ``sock``.

        A TCP ``sock`` (the kernel socket of a plain ``tcp`` stack, or the program's end of a
        loopback bridge) is remembered by inode and addresses: it is live while the kernel
        lists it in /proc/net/tcp{,6} with that inode (a socket no descriptor refers to any
        more is listed with inode 0, or not at all). Otherwise (an ``AF_UNIX`` end, made by the
        program) the bridge says: ``bridge``, or the one :meth:`connect` made.
        """
        handed = _HandOver(pid=pid)
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            try:
                handed.inode = os.fstat(sock.fileno()).st_ino
                handed.local = (sock.getsockname()[0], sock.getsockname()[1])
                handed.remote = (sock.getpeername()[0], sock.getpeername()[1])
            except OSError as exc:  # reset already: nothing will list it
                log.debug("hand over #%d: %s", info.conn, exc)
                handed.inode = 0
        if bridge is not None:
            info.detail["bridge"] = bridge
            info.detail["bridged"] = True
        info.detail["handed"] = handed

    def _prune(self) -> int:
        """Forget the connections that ended; return how many. Raises nothing."""
        listed: Optional[Set[Tuple[int, Tuple[str, int], Tuple[str, int]]]] = None

        def tcp_sockets() -> Set[Tuple[int, Tuple[str, int], Tuple[str, int]]]:
            nonlocal listed
            if listed is None:
                listed = _tcp_sockets()
            return listed

        forgotten = 0
        for conn, info in list(self.connections.items()):
            try:
                finished = _finished(info, tcp_sockets)
            except OSError as exc:  # (no TCP table to read: a handed socket stays listed)
                log.debug("node %s: connection #%d: %s", self.node.name, conn, exc)
                finished = False
            if finished:
                del self.connections[conn]
                forgotten += 1
        self._prune_at = max(CONNECTIONS_PRUNE_AT, 2 * len(self.connections))
        if forgotten:
            memory.trim_soon()  # what they held was large (TLS buffers, bridges): give it back
        return forgotten

    def _sweep_soon(self) -> None:
        """Arm the sweep (once): in CONNECTIONS_SWEEP_S, forget what ended; again while any
        connection is listed."""
        if self._sweep_timer is None:
            self._sweep_timer = gevent.get_hub().loop.timer(self.sweep_s, ref=False)  # (keeps no loop alive)
            self._sweep_timer.start(self._sweep)

    def _sweep(self) -> None:
        timer, self._sweep_timer = self._sweep_timer, None
        if timer is not None:
            timer.close()
        self._prune()
        if self.connections:
            self._sweep_soon()

    def close(self) -> None:
        """Stop sweeping the connection table, and stop waiting for the connections of accepted
        requests (the node stops)."""
        self._closing = True  # (the ports its listeners close now are kept for its restart)
        for back in self._back.values():
            back.set()
        timer, self._sweep_timer = self._sweep_timer, None
        if timer is not None:
            timer.close()
        for arrival in list(self._arrivals.values()):
            arrival.cancel()

    def status(self) -> list:
        """The live data connections (closed ones are forgotten here)."""
        self._prune()
        out = [info.to_json() for info in self.connections.values()]
        # A kernel socket handed to a program: its bytes and round trip as the kernel counts them.
        plain = [(item, info.detail["handed"]) for item, info in zip(out, self.connections.values())
                 if isinstance(info.detail.get("handed"), _HandOver) and "bridge" not in info.detail]
        if plain:
            try:
                counters = _tcp_counters()
            except OSError as exc:  # no sock_diag here: bytes stay unknown
                log.debug("sock_diag: %s", exc)
                counters = {}
            for item, handed in plain:
                assert isinstance(handed, _HandOver)
                if handed.inode in counters:
                    item["bytes_sent"], item["bytes_received"], rtt_us = counters[handed.inode]
                    item["rtt_ms"] = rtt_us / 1000
        return out


def errno_of(exc: ConnectError) -> int:
    """The errno a program gets for a failed connect: from the server's refusal code if it
    refused (:data:`gridsock.wire.REFUSAL_CODES`), ``ETIMEDOUT`` if every attempt timed out,
    else ``EHOSTUNREACH`` (no method could reach the peer)."""
    if exc.code is not None:
        return int(getattr(errno, wire.REFUSAL_CODES.get(exc.code, "ECONNREFUSED")))
    return errno.ETIMEDOUT if isinstance(exc, TimeoutError) else errno.EHOSTUNREACH


def _finished(info: ConnectionInfo,
              tcp_sockets: Callable[[], Set[Tuple[int, Tuple[str, int], Tuple[str, int]]]]) -> bool:
    """True once the application closed (or dropped) what it was given; for a program that got
    the descriptor through the agent, once the program closed it (see Assembler.hand_over)."""
    handed = info.detail.get("handed")
    if isinstance(handed, _HandOver):
        if handed.inode is not None:
            assert handed.local is not None and handed.remote is not None
            return not handed.inode or (handed.inode, handed.local, handed.remote) not in tcp_sockets()
        bridge = info.detail.get("bridge")
        return bridge is None or bool(getattr(bridge, "closed", True))
    ref = info.detail.get("socket")
    if isinstance(ref, weakref.ref):
        sock = ref()
        return sock is None or sock.fileno() == -1
    stream = info.detail.get("stream")
    return stream is None or bool(getattr(stream, "closed", getattr(stream, "_closed", False)))


def _tcp_sockets() -> Set[Tuple[int, Tuple[str, int], Tuple[str, int]]]:
    """``(inode, local, remote)`` of the TCP sockets of this network namespace that a
    descriptor refers to (an orphan, closed by every process, is listed with inode 0)."""
    return {(found.inode, found.local, found.remote) for found in procnet.tcp_sockets()}


# sock_diag (linux/sock_diag.h, linux/inet_diag.h, linux/tcp.h): a dump of the TCP sockets of
# this network namespace with their tcp_info, as ``ss -ti`` reads it; no privilege needed.
NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
_NLM_F_REQUEST_DUMP = 0x1 | 0x300
_NLMSG_ERROR, _NLMSG_DONE = 2, 3
_INET_DIAG_INFO = 2  # the rtattr carrying struct tcp_info
_NLMSG = struct.Struct("=IHHII")  # nlmsghdr
_INET_DIAG_REQ = struct.Struct("=BBBBI48s")  # inet_diag_req_v2 (the socket id zeroed: all)
_INET_DIAG_MSG = struct.Struct("=BBBB48sIIIII")  # inet_diag_msg; the inode is its last field
_TCPI_RTT_OFFSET = 68  # tcpi_rtt (us), a u32 after 8 bytes and 15 u32s
_TCPI_BYTES_OFFSET = 120  # tcpi_bytes_acked, tcpi_bytes_received: u64s (Linux 4.1 on)
# What one recv() of the dump may carry at most (the kernel fills up to a page or so).
_NETLINK_RECV_BYTES = 1 << 16


def _tcp_counters() -> Dict[int, Tuple[int, int, int]]:
    """``inode -> (bytes acked by the peer, bytes received, rtt in us)`` for the TCP sockets of
    this network namespace (sequence space: a SYN or FIN counts one). Raises OSError where
    sock_diag is not available."""
    found: Dict[int, Tuple[int, int, int]] = {}
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_SOCK_DIAG) as netlink:
        for seq, family in enumerate((socket.AF_INET, socket.AF_INET6), 1):
            request = _INET_DIAG_REQ.pack(family, socket.IPPROTO_TCP, 1 << (_INET_DIAG_INFO - 1), 0, 0xFFFFFFFF,
                                          bytes(48))
            netlink.send(_NLMSG.pack(_NLMSG.size + len(request), SOCK_DIAG_BY_FAMILY, _NLM_F_REQUEST_DUMP, seq, 0)
                         + request)
            done = False
            while not done:
                data = netlink.recv(_NETLINK_RECV_BYTES)
                if not data:
                    raise OSError("sock_diag: the dump ended early")
                offset = 0
                while offset + _NLMSG.size <= len(data):
                    length, kind, _, _, _ = _NLMSG.unpack_from(data, offset)
                    if length < _NLMSG.size or kind in (_NLMSG_DONE, _NLMSG_ERROR):
                        done = True
                        break
                    body = offset + _NLMSG.size
                    end = min(len(data), offset + length)
                    if body + _INET_DIAG_MSG.size <= end:
                        inode = _INET_DIAG_MSG.unpack_from(data, body)[9]
                        attr = body + _INET_DIAG_MSG.size
                        while attr + 4 <= end:
                            attr_length, attr_type = struct.unpack_from("=HH", data, attr)
                            if attr_length < 4:
                                break
                            if (attr_type == _INET_DIAG_INFO and inode and attr + attr_length <= end
                                    and attr_length - 4 >= _TCPI_BYTES_OFFSET + 16):
                                info = attr + 4
                                acked, received = struct.unpack_from("=QQ", data, info + _TCPI_BYTES_OFFSET)
                                found[inode] = (acked, received, struct.unpack_from("=I", data, info + _TCPI_RTT_OFFSET)[0])
                            attr += (attr_length + 3) & ~3
                    offset += (length + 3) & ~3
    return found


def _via(lower: Stream) -> Optional[str]:
    """The gateway a method's connection went through, if the method says (its stream's
    ``info["via"]``: a method layer such as ``ssh(gateway=...)``)."""
    info = getattr(lower, "info", None)
    via = info.get("via") if isinstance(info, dict) else None
    return via if isinstance(via, str) else None


def _method_detail(lower: Stream) -> Dict[str, object]:
    """What a method says of its connection for ``gridsock status`` (its stream's
    ``info["detail"]``, e.g. ``splice``'s connect attempts); internal names are left out."""
    info = getattr(lower, "info", None)
    detail = info.get("detail") if isinstance(info, dict) else None
    if not isinstance(detail, dict):
        return {}
    return {str(k): v for k, v in detail.items() if str(k) not in _INTERNAL_DETAIL and k not in ("tried", "via")}


def _captured_request(node, node_id: str, payload: bytes, timeout: float):
    """``(reply, None)`` or ``(None, error)`` of an assembly request (in a greenlet: a failure
    returned is not reported by the hub as a crash)."""
    try:
        return node.meta_request(node_id, ASSEMBLE_TOPIC, payload, timeout=timeout), None
    except (GridsockError, TimeoutError, OSError) as exc:
        return None, exc


def _discard(greenlet: gevent.Greenlet) -> None:
    """Close the connection a finished race attempt made, if it made one (never nominated)."""
    value = greenlet.value if greenlet.successful() else None
    if isinstance(value, tuple) and value[0] is not None:
        value[0][0].close()


def _reason(exc: ConnectError) -> str:
    """Why a candidate failed, in one line: the server's reason if it gave one."""
    if exc.tried and len(exc.tried) == 1:
        return exc.tried[0][1]
    return str(exc)


def _refuse(code: str, reason: str) -> bytes:
    return wire.encode_assembly(wire.AssemblyRefuse(code, reason.encode()[: wire.MAX_REASON_BYTES].decode("utf-8", "ignore")))
