"""Dynamic assembly of data connections: choose a stack, agree on it, build both halves.

Theory of operation
-------------------
``connect(peer, port)`` on the client:

1. the rules choose a stack for the pair (or the caller names one), e.g. ``tls/tcp``;
2. a one-time token (``TOKEN_BYTES`` random bytes) is made, and an *assembly request*
   ``{port, stack, token, conn}`` goes to the server node over the meta channel;
3. at the same time, not after, the client starts its half of the method: for ``tcp`` it dials
   the server's node port and sends ``DATA_PREAMBLE`` + token in-band, so a direct connection
   costs about one TCP handshake; for ``relay`` it opens its end of the relayed connection;
4. when the server answers ``ok``, the filters are built bottom-up (``tls`` checks that the
   server proves the expected node id), and the application gets a real socket.

On the server, the request is checked before anything is built: someone must listen on the
port, the stack must parse, and the server's policy must accept it (e.g. ``tls`` from outside
its cluster — the client's rules cannot weaken that). The token is then *pending*. A data
connection on the node port presents a token: an unknown one waits at most
``MATCH_TIMEOUT_S`` for its request (request and connection race), a used or expired one is
refused at once, and a stranger who connects gets nothing. The server builds its half of the
filters (``tls`` requires the client's certificate to carry the requesting node's id) and
queues the connection on the listener. Different clients of one server may use different
stacks at the same time.

What applications get is always a real OS socket: for a plain ``tcp`` stack the kernel TCP
socket itself (nothing on the data path); otherwise one end of a socketpair bridged to the
stream (:mod:`gridsock.bridge`).
"""
from __future__ import annotations

import binascii
import dataclasses
import json
import logging
import secrets
import socket
import time
import weakref
from typing import Dict, Optional, Tuple

import gevent
import gevent.event
import gevent.queue

from . import wire
from .bootstrap.transport import parse_address
from .registry import default_registry
from .errors import ConfigError, ConnectError, GridsockError, RemoteProtocolError, RoutingError
from .rules import Rules, same_cluster
from .stack import Stack, StackContext
from .components.splice import bind_splice_socket, public_host, routable, splice_connect
from .streams import SocketStream, Stream

__all__ = [
    "Assembler",
    "DataListener",
    "ConnectionInfo",
    "DATA_PREAMBLE",
    "TOKEN_BYTES",
    "ASSEMBLY_TIMEOUT_S",
    "MATCH_TIMEOUT_S",
    "NOMINATE",
    "STAGGER_S",
    "ASSEMBLE_TOPIC",
]

log = logging.getLogger(__name__)

ASSEMBLE_TOPIC = "assemble"
# First bytes of a data connection on a node port: magic and version. TLS starts with 0x16 and
# wire frames with a 0x00 length byte, so the node port tells the three apart by one byte.
DATA_PREAMBLE = b"GSDC\x01"
TOKEN_BYTES = 32
# A connect (request, reply, method, filters) gives up after this long.
ASSEMBLY_TIMEOUT_S = 15.0
# A data connection waits this long for its assembly request (they race), and a pending token
# for its data connection, before it is dropped.
MATCH_TIMEOUT_S = 5.0
# The client's first byte on a method's connection once it has chosen it among the candidates
# it raced (``_race``): the server builds nothing and delivers nothing before it.
NOMINATE = b"\x01"
# One dial of one address by a direct method (tcp, socks, ssh): a firewall that drops SYNs
# silently costs this long, not the whole connect's budget.
DIAL_TIMEOUT_S = 5.0
# Happy eyeballs: the next candidate starts this long after the previous one, if no candidate
# has connected by then (RFC 8305's connection attempt delay), or at once when all have failed.
STAGGER_S = 0.25
# The winner for a peer is tried first for this long; then the rules' order is raced again, so
# a better method that lost a race (or was down) gets another chance.
WINNER_TTL_S = 300.0
# Tokens remembered after use, so a replay is refused at once rather than after a wait.
USED_TOKENS_KEPT = 4096
# The connection table forgets closed connections when it reaches this many entries (and on
# every status()), so a long-running node does not keep what its applications closed.
CONNECTIONS_PRUNE_AT = 256
# Connections accepted but not yet taken by accept().
LISTEN_BACKLOG = 128


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
        return {"conn": self.conn, "peer": self.peer_name, "peer_id": self.peer_id, "port": self.port,
                "stack": self.stack, "side": "client" if self.initiator else "server",
                "opened_at": self.opened_at,
                **{k: v for k, v in self.detail.items() if k not in ("stream", "socket")}}


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

    def _deliver(self, item) -> bool:
        if self.closed:
            return False
        try:
            self._queue.put_nowait(item)
        except gevent.queue.Full:
            return False
        return True

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self._assembler.listeners.get(self.port) is self:  # (not a newer listener of the port)
            del self._assembler.listeners[self.port]
        while not self._queue.empty():
            item = self._queue.get_nowait()
            if item is not None:
                item[0].close()
        self._queue.put_nowait(None)


@dataclasses.dataclass
class _Pending:
    client_id: str
    port: int
    stack: Stack
    expires: float
    socks: Optional[list] = None  # parallel(streams=N): the sub-connections, by index, as they come


class Assembler:
    """The data-connection side of one node (client and server)."""

    def __init__(self, node, rules: Rules, *, streams_only: bool = False) -> None:
        self.node = node
        self.rules = rules
        self.listeners: Dict[int, DataListener] = {}
        self.connections: Dict[int, ConnectionInfo] = {}
        self._pending: Dict[bytes, _Pending] = {}
        self._arrived: Dict[bytes, gevent.event.Event] = {}
        self._used: Dict[bytes, str] = {}  # token -> "used" or "cancelled", oldest first
        self._reverse: Dict[bytes, gevent.event.AsyncResult] = {}  # our reverse connects, by token
        self._winners: Dict[str, Stack] = {}  # peer id -> the stack that worked last
        self._conn_ids = iter(range(1, 2**62))

    # --- server side -------------------------------------------------------------------------

    def listen(self, port: int) -> DataListener:
        """Serve grid port ``port`` of this node; ConfigError if it is taken or invalid."""
        if not isinstance(port, int) or not 0 < port < 65536:
            raise ConfigError(f"bad port {port!r}")
        if port in self.listeners:
            raise ConfigError(f"port {port} of node {self.node.name} is already served")
        listener = DataListener(self, port)
        self.listeners[port] = listener
        return listener

    def handle_request(self, delivery) -> bytes:
        """The ``assemble`` topic handler: check the request, make the token pending."""
        try:
            req = json.loads(delivery.payload)
            port, stack_text, token_hex = req["port"], req["stack"], req["token"]
            conn = req.get("conn")
            if type(port) is not int or not isinstance(stack_text, str) or not isinstance(token_hex, str):
                raise ValueError("ill-typed fields")
            token = binascii.unhexlify(token_hex)
            if len(token) != TOKEN_BYTES or (conn is not None and (type(conn) is not int or not 0 <= conn < 2**32)):
                raise ValueError("bad token or connection id")
        except (ValueError, KeyError, TypeError) as exc:
            raise RemoteProtocolError(f"bad assembly request from {delivery.src}: {exc}") from None
        client = self.node.directory.get(delivery.src)
        me = self.node.entry
        if client is None or me is None:
            return _refuse("unknown-node", f"node {delivery.src} is not in {self.node.name}'s directory")
        listener = self.listeners.get(port)
        if listener is None:
            return _refuse("refused", f"nothing listens on port {port} of {self.node.name}")
        try:
            stack = Stack.parse(stack_text)
        except ConfigError as exc:
            return _refuse("bad-stack", str(exc))
        why = self.rules.refusal(me, client, stack)
        if why:
            log.warning("refused %s from %s to port %d: %s", stack, client.name, port, why)
            return _refuse("policy", why)
        if token in self._pending or token in self._used:
            return _refuse("bad-token", "token already used")
        method = stack.method.name
        if method not in ("relay", "reverse", "splice") and not _is_direct(method):
            return _refuse("bad-stack", f"method {method} is not available on {self.node.name}")
        why = _parallel_misplaced(stack)
        if why:
            return _refuse("bad-stack", why)
        if method == "splice":
            try:
                endpoint = parse_address(str(req.get("endpoint")))
            except ConfigError as exc:
                raise RemoteProtocolError(f"bad splice endpoint: {exc}") from None
            host = public_host(me, self.node.directory)
            if host is None or endpoint.is_unix or not routable(endpoint.host):
                return _refuse("unreachable", f"{self.node.name} has no route to {client.name}'s endpoint {endpoint}"
                               if host else f"{self.node.name} knows no public address of its own")
            ssock = bind_splice_socket()
            gevent.spawn(self._splice_server, ssock, endpoint, token, client, port, stack)
            return json.dumps({"ok": True, "endpoint": f"{host}:{ssock.getsockname()[1]}"}).encode()
        if method == "reverse":
            # The client cannot be dialed... by others; we dial it, token in-band, and answer how it went.
            self._remember_used(token)
            try:
                if not client.addrs:
                    raise ConnectError(f"{client.name} advertises no address to connect back to")
                sock = _dial_with_token(default_registry.create(stack.method), self.node, client.addrs, token,
                                        ASSEMBLY_TIMEOUT_S)
            except ConnectError as exc:
                return _refuse("unreachable", f"{self.node.name} cannot connect back to {client.name}: {exc.args[0]}")
            gevent.spawn(self._finish_server, SocketStream(sock, info={"method": "reverse"}), client, port, stack)
        elif method == "relay":
            if conn is None:
                raise RemoteProtocolError("relay assembly request without a connection id")
            lower = self.node.relay.open(client.node_id, conn)
            self._remember_used(token)
            gevent.spawn(self._finish_server, lower, client, port, stack)
        else:  # tcp, or tcp through an intermediary (socks, ssh): the token arrives on the node port
            streams = _parallel_streams(stack)
            self._pending[token] = _Pending(client.node_id, port, stack, time.monotonic() + MATCH_TIMEOUT_S,
                                            [None] * streams if streams else None)
            event = self._arrived.pop(token, None)
            if event is not None:
                event.set()
            gevent.spawn_later(MATCH_TIMEOUT_S, self._expire, token)
        return json.dumps({"ok": True}).encode()

    def _splice_server(self, ssock, endpoint, token: bytes, client: wire.NodeEntry, port: int, stack: Stack) -> None:
        """Our half of a splice: connect to the client while it connects to us, check its token."""
        try:
            sock = splice_connect(ssock, endpoint)
            try:
                with gevent.Timeout(MATCH_TIMEOUT_S, TimeoutError("no preamble")):
                    head = _recv_exactly(sock, len(DATA_PREAMBLE) + TOKEN_BYTES)
                if head != DATA_PREAMBLE + token:
                    raise RemoteProtocolError("the spliced connection did not present our token (wrong node?)")
            except BaseException:
                sock.close()
                raise
        except (ConnectError, RemoteProtocolError, TimeoutError, OSError) as exc:
            log.info("node %s: splice with %s failed: %s", self.node.name, client.name, exc)
            return
        self._remember_used(token)
        self._finish_server(SocketStream(sock, info={"method": "splice"}), client, port, stack)

    def _expire(self, token: bytes) -> None:
        pending = self._pending.pop(token, None)
        if pending is not None:
            log.info("assembly token for port %d from %s expired unused", pending.port, pending.client_id)
            self._remember_used(token)
            for sock in pending.socks or ():
                if sock is not None:
                    sock.close()

    def _remember_used(self, token: bytes, why: str = "used") -> None:
        self._used[token] = why
        while len(self._used) > USED_TOKENS_KEPT:
            self._used.pop(next(iter(self._used)))

    def handle_data_connection(self, sock, label: str) -> None:
        """A node-port connection that began with DATA_PREAMBLE (not yet read). Owns ``sock``."""
        try:
            with gevent.Timeout(MATCH_TIMEOUT_S, TimeoutError("no preamble")):
                head = _recv_exactly(sock, len(DATA_PREAMBLE) + TOKEN_BYTES)
            if head[: len(DATA_PREAMBLE)] != DATA_PREAMBLE:
                raise RemoteProtocolError("bad data-connection preamble")
            token = head[len(DATA_PREAMBLE) :]
            waiting = self._reverse.pop(token, None)
            if waiting is not None:  # the server of a ``reverse`` connection of ours, calling back
                self._remember_used(token)
                waiting.set(sock)
                return
            if token in self._used:
                raise RemoteProtocolError(f"token already {self._used[token]} (replay or late call back)")
            pending = self._pending.get(token)
            if pending is None:
                event = self._arrived.setdefault(token, gevent.event.Event())
                event.wait(MATCH_TIMEOUT_S)
                self._arrived.pop(token, None)
                pending = self._pending.get(token)
            if pending is None:
                raise RemoteProtocolError("unknown token")
            if pending.socks is not None:  # one of N sub-connections: its index follows the token
                with gevent.Timeout(MATCH_TIMEOUT_S, TimeoutError("no sub-connection index")):
                    index = _recv_exactly(sock, 1)[0]
                if self._pending.get(token) is not pending:
                    raise RemoteProtocolError("token expired while its sub-connections gathered")
                if index >= len(pending.socks) or pending.socks[index] is not None:
                    raise RemoteProtocolError(f"bad or repeated sub-connection index {index}")
                pending.socks[index] = sock
                if any(s is None for s in pending.socks):
                    return  # the last one to arrive carries on
            del self._pending[token]
            self._remember_used(token)
        except (RemoteProtocolError, TimeoutError, OSError) as exc:
            log.warning("node %s refused data connection from %s: %s", self.node.name, label, exc)
            sock.close()
            return
        if pending.socks is not None:
            lower = _Lowers(SocketStream(s, info={"method": pending.stack.method.name, "peer": label})
                            for s in pending.socks)
        else:
            lower = SocketStream(sock, info={"method": pending.stack.method.name, "peer": label})
        client = self.node.directory.get(pending.client_id)
        if client is None:
            log.warning("data connection from %s: client %s left meanwhile", label, pending.client_id)
            lower.close()
            return
        self._finish_server(lower, client, pending.port, pending.stack)

    def _finish_server(self, lower: Stream, client: wire.NodeEntry, port: int, stack: Stack) -> None:
        """Wait for the client's nomination, build our half of the filters, queue the connection."""
        try:
            with gevent.Timeout(MATCH_TIMEOUT_S, TimeoutError(f"not nominated within {MATCH_TIMEOUT_S:g} s")):
                first = _first(lower).receive_some(len(NOMINATE))
            if first != NOMINATE:
                raise RemoteProtocolError("closed before nomination" if not first else "bad nomination byte")
        except (GridsockError, TimeoutError, OSError) as exc:
            # The usual case: the client raced several candidates and another one won.
            log.info("node %s: %s connection from %s not taken: %s", self.node.name, stack, client.name, exc)
            lower.close()
            return
        listener = self.listeners.get(port)
        try:
            if listener is None:
                raise ConnectError(f"nothing listens on port {port} any more")
            stream = self._build(stack, lower, client, initiator=False)
        except (GridsockError, OSError) as exc:
            log.warning("node %s: data connection from %s over %s failed: %s", self.node.name, client.name, stack, exc)
            lower.close()
            return
        info = self._record(client, port, stack, initiator=False, stream=stream)
        if not listener._deliver((stream, info)):
            log.warning("port %d backlog full or closed: dropping connection from %s", port, client.name)
            stream.close()

    # --- client side -------------------------------------------------------------------------

    def open_stream(self, peer: str, port: int, *, stack=None, timeout: float = ASSEMBLY_TIMEOUT_S):
        """Connect to grid port ``port`` of node ``peer``; return ``(stream, info)``.

        With ``stack`` None the rules give the candidates (direct, reverse, splice, gateways,
        relay), raced with staggered starts (see :meth:`_race`); the winner is remembered for
        the peer. ``info.detail["tried"]`` lists the candidates that failed or lost, and why.
        Raises ConnectError (``.tried`` says what failed and why) when the server refuses or
        every candidate fails.
        """
        entry = self.node.directory.resolve(peer)
        me = self.node.entry
        if entry is None or me is None:
            raise ConnectError(f"unknown node {peer!r}" if me else "this node has not joined yet", peer=peer)
        if stack is not None:
            return self._race(entry, port, [Stack.parse(stack) if isinstance(stack, str) else stack],
                              timeout, remember=False)
        candidates = self.rules.candidates(me, entry)
        winner, until = self._winners.get(entry.node_id, (None, 0.0))
        if winner in candidates and until > time.monotonic():  # what worked last time first
            candidates.remove(winner)
            candidates.insert(0, winner)
        return self._race(entry, port, candidates, timeout, remember=True)

    def _race(self, entry: wire.NodeEntry, port: int, candidates, timeout: float, *, remember: bool):
        """Happy eyeballs over ``candidates``: return ``(stream, info)`` of the first that works.

        The first candidate starts at once; each next one ``STAGGER_S`` after the previous
        start, or as soon as every running one has failed. The first to be established is
        nominated (the others are cancelled, their half-made connections closed, and the
        server builds nothing for them); if its filters fail, the race goes on. A refusal by
        the server ends it: no other method would change the server's mind.
        """
        deadline = time.monotonic() + timeout
        results: gevent.queue.Queue = gevent.queue.Queue()
        running: Dict[int, gevent.Greenlet] = {}
        tried: list = []
        started = 0
        next_start = 0.0

        def start() -> None:
            nonlocal started, next_start
            i = started
            greenlet = gevent.spawn(self._attempt, entry, port, candidates[i], deadline)
            greenlet.link(lambda g, i=i: results.put((i, g)))
            running[i] = greenlet
            started += 1
            next_start = time.monotonic() + STAGGER_S

        def fail(last: Optional[Stack], cause: Optional[BaseException] = None):
            return ConnectError(f"cannot connect to {entry.name}:{port}", peer=entry.name,
                                method=last.method.name if last else None, tried=tried)

        try:
            start()
            while running or started < len(candidates):
                now = time.monotonic()
                if now >= deadline:
                    tried.extend((str(candidates[i]), f"no connection within {timeout:g} s") for i in sorted(running))
                    raise fail(candidates[max(running)] if running else None)
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
                        log.info("node %s: %s to %s not there after %.0f ms; also trying %s", self.node.name,
                                 candidates[started - 1], entry.name, STAGGER_S * 1000, candidates[started])
                        start()
                    continue
                del running[i]
                stack = candidates[i]
                lower, exc = greenlet.get()  # (a bug in _attempt raises here, as it should)
                if exc is not None:
                    if isinstance(exc, _Refused):
                        exc.tried = tried + exc.tried
                        raise exc
                    tried.append((str(stack), _reason(exc)))
                    log.info("node %s: %s to %s failed: %s", self.node.name, stack, entry.name, tried[-1][1])
                    if not running and started == len(candidates):
                        raise fail(stack) from exc
                    continue
                try:
                    stream = self._nominate(lower, stack, entry, deadline)
                except ConnectError as exc:  # e.g. tls refused the peer: the others may still do
                    tried.append((str(stack), _reason(exc)))
                    if not running and started == len(candidates):
                        raise fail(stack) from exc
                    continue
                for j in sorted(running):
                    tried.append((str(candidates[j]), f"cancelled: {stack} connected first"))
                info = self._record(entry, port, stack, initiator=True, stream=stream)
                if tried:
                    info.detail["tried"] = tried
                if remember:
                    self._winners[entry.node_id] = (stack, time.monotonic() + WINNER_TTL_S)
                return stream, info
            raise fail(None)  # candidates is never empty
        finally:
            for greenlet in running.values():
                greenlet.kill(block=True)
            while not results.empty():  # established meanwhile, never nominated
                _, greenlet = results.get_nowait()
                _close_made(greenlet)

    def _nominate(self, lower: Stream, stack: Stack, entry: wire.NodeEntry, deadline: float) -> Stream:
        """Tell the server this connection is the one (``NOMINATE``), then build the filters."""
        try:
            _first(lower).send_all(NOMINATE)
            with gevent.Timeout(max(0.1, deadline - time.monotonic()),
                                ConnectError(f"building {stack} to {entry.name} timed out", peer=entry.name,
                                             method=stack.method.name)):
                return self._build(stack, lower, entry, initiator=True)
        except ConnectError:
            lower.close()
            raise
        except (GridsockError, OSError) as exc:
            lower.close()
            raise ConnectError(f"connecting to {entry.name} over {stack} failed: {exc}", peer=entry.name,
                               method=stack.method.name) from exc

    def _attempt(self, entry: wire.NodeEntry, port: int, stack: Stack, deadline: float):
        """:meth:`_establish` in a race: ``(stream, None)`` or ``(None, ConnectError)``."""
        try:
            return self._establish(entry, port, stack, deadline), None
        except ConnectError as exc:  # expected: returned, not left to the hub to print
            return None, exc

    def _establish(self, entry: wire.NodeEntry, port: int, stack: Stack, deadline: float) -> Stream:
        """One candidate, up to the method's connection (not yet nominated): return its stream.

        Runs in its own greenlet; killed, it closes whatever it made.
        """
        me = self.node.entry
        method = stack.method.name
        token = secrets.token_bytes(TOKEN_BYTES)
        request = {"port": port, "stack": str(stack), "token": token.hex()}
        lower: Optional[Stream] = None
        dialer = None
        splice_sock = None
        timeout = max(0.1, deadline - time.monotonic())
        try:
            if method == "relay":
                conn = self.node.relay.new_conn_id()
                request["conn"] = conn
                lower = self.node.relay.open(entry.node_id, conn)
            elif method == "splice":
                host, theirs = public_host(me, self.node.directory), public_host(entry, self.node.directory)
                if host is None or theirs is None or not routable(theirs):
                    raise ConnectError(f"no route for a splice between {me.name} and {entry.name}",
                                       peer=entry.name, method=method)
                splice_sock = bind_splice_socket()
                request["endpoint"] = f"{host}:{splice_sock.getsockname()[1]}"
            elif method == "reverse":
                if not me.addrs:
                    raise ConnectError(f"{me.name} advertises no address for {entry.name} to connect back to",
                                       peer=entry.name, method=method)
                called_back = gevent.event.AsyncResult()
                self._reverse[token] = called_back
            elif _is_direct(method):
                if not entry.addrs:
                    raise ConnectError(f"{entry.name} advertises no address for a {method} connection",
                                       peer=entry.name, method=method)
                why = _parallel_misplaced(stack)
                if why:
                    raise ConfigError(why)
                component = default_registry.create(stack.method)
                streams = _parallel_streams(stack)
                if streams:
                    dialer = gevent.spawn(_captured, _dial_many, component, self.node, entry.addrs, token, timeout,
                                          streams)
                else:
                    dialer = gevent.spawn(_captured, _dial_with_token, component, self.node, entry.addrs, token,
                                          timeout)
            else:
                raise ConnectError(f"method {method} is not available", peer=entry.name, method=method)
            try:
                reply = self.node.meta_request(entry.node_id, ASSEMBLE_TOPIC, json.dumps(request).encode(),
                                               timeout=max(0.1, deadline - time.monotonic()))
                answer = json.loads(reply.payload)
            except (RoutingError, TimeoutError, ValueError) as exc:
                raise ConnectError(f"assembly request to {entry.name} failed: {exc}", peer=entry.name,
                                   method=method) from exc
            if not answer.get("ok"):
                # "unreachable": the method failed on the server's side (reverse could not
                # connect back); another method may work. Anything else is the server's will.
                cls = ConnectError if answer.get("code") == "unreachable" else _Refused
                refusal = cls(f"{entry.name} refused {stack}", peer=entry.name, method=method,
                              tried=[(str(stack), str(answer.get("reason")))])
                refusal.code = answer.get("code")
                raise refusal
            if dialer is not None:
                try:
                    sock = _uncaptured(dialer.get(timeout=max(0.1, deadline - time.monotonic())))
                except ConnectError as exc:
                    if method != "tcp" or entry.inbound or same_cluster(me, entry):
                        raise
                    raise ConnectError(f"{exc.args[0]} ({entry.name} accepts no connection from outside its "
                                       "cluster: the rendez-vous node's dial-back failed too)", peer=entry.name,
                                       method=method) from exc
                lower = sock if isinstance(sock, _Lowers) else SocketStream(sock, info={"method": method})
            elif method == "splice":
                try:
                    remote = parse_address(str(answer.get("endpoint")))
                except ConfigError as exc:
                    raise ConnectError(f"bad splice endpoint from {entry.name}: {exc}", method=method) from None
                sock = splice_connect(splice_sock, remote, timeout=max(0.1, deadline - time.monotonic()))
                splice_sock = None
                lower = SocketStream(sock, info={"method": method})
                sock.sendall(DATA_PREAMBLE + token)
            elif method == "reverse":
                # The server answered once its connection back was made: it is here or arriving.
                sock = called_back.get(timeout=max(0.1, deadline - time.monotonic()))
                lower = SocketStream(sock, info={"method": method})
            return lower
        except BaseException as exc:
            if self._reverse.pop(token, None) is not None:
                self._remember_used(token, "cancelled")  # a late call back is refused at once
            if splice_sock is not None:
                splice_sock.close()
            if lower is not None:
                lower.close()
            if dialer is not None:
                dialer.kill(block=False)
                _close_made(dialer)
            if isinstance(exc, gevent.Timeout):
                raise ConnectError(f"connecting to {entry.name} timed out", peer=entry.name, method=method) from None
            if isinstance(exc, ConnectError) or not isinstance(exc, (GridsockError, OSError)):
                raise
            raise ConnectError(f"connecting to {entry.name} over {stack} failed: {exc}", peer=entry.name,
                               method=method) from exc

    def connect(self, peer: str, port: int, *, stack=None, timeout: float = ASSEMBLY_TIMEOUT_S,
                tcp_bridge: bool = False):
        """Connect and return ``(socket.socket, ConnectionInfo)``: a real OS socket (with
        ``tcp_bridge``, a bridged one is a loopback TCP socket rather than a Unix one)."""
        stream, info = self.open_stream(peer, port, stack=stack, timeout=timeout)
        return self._hand_out(Stack.parse(info.stack), stream, info, tcp_bridge=tcp_bridge), info

    # --- both --------------------------------------------------------------------------------

    def _build(self, stack: Stack, lower, peer: wire.NodeEntry, *, initiator: bool) -> Stream:
        """Wrap the method's stream (or a parallel stack's sub-connections) in the filters."""
        from .registry import build_filters

        node = self.node
        context = StackContext(session=node.session, identity=node.identity, local_id=node.node_id,
                               peer_id=peer.node_id, peer_name=peer.name, initiator=initiator)
        if isinstance(lower, _Lowers):  # parallel(...) sits right on the method: it joins them first
            striping = stack.filters[-1]
            try:
                lower = default_registry.create(striping).wrap_many(list(lower), context=context)
            except BaseException:
                lower.close()
                raise
            stack = Stack(stack.filters[:-1] + (stack.method,))
            stream = build_filters(stack, lower, context)
            stream.info["stack"] = str(Stack(stack.filters + (striping, stack.method)))
            return stream
        return build_filters(stack, lower, context)

    def _record(self, peer: wire.NodeEntry, port: int, stack: Stack, *, initiator: bool, stream: Stream):
        if len(self.connections) >= CONNECTIONS_PRUNE_AT:
            self.status()  # forgets the closed ones
        conn = next(self._conn_ids)
        info = ConnectionInfo(conn=conn, peer_id=peer.node_id, peer_name=peer.name, port=port, stack=str(stack),
                              initiator=initiator, detail={"stream": stream})
        self.connections[conn] = info
        return info

    def _hand_out(self, stack: Stack, stream: Stream, info: ConnectionInfo, *, tcp_bridge: bool = False):
        from .bridge import hand_out

        sock, bridge = hand_out(stream, plain=not stack.filters, name=f"{info.peer_name}:{info.port}", tcp=tcp_bridge)
        info.detail["bridged"] = bridge is not None
        info.detail["socket"] = weakref.ref(sock)
        return sock

    def status(self) -> list:
        """The live data connections (closed ones are forgotten here)."""
        for conn, info in list(self.connections.items()):
            if _finished(info):
                del self.connections[conn]
        return [info.to_json() for info in self.connections.values()]


class _Refused(ConnectError):
    """The server refused the request (policy, no listener): no other method will help.

    ``code`` is the server's: "refused" (nothing listens), "policy", "bad-stack", "unknown-node".
    """

    code = None


def _finished(info: ConnectionInfo) -> bool:
    """True once the application closed (or dropped) what it was given."""
    ref = info.detail.get("socket")
    if ref is not None:
        sock = ref()
        return sock is None or sock.fileno() == -1
    stream = info.detail.get("stream")
    return stream is None or bool(getattr(stream, "closed", getattr(stream, "_closed", False)))


class _Lowers(list):
    """The sub-connections of a ``parallel`` stack, in index order: closed together."""

    def close(self) -> None:
        for stream in self:
            stream.close()


def _first(lower):
    """The stream that carries the nomination: the method's, or sub-connection 0."""
    return lower[0] if isinstance(lower, _Lowers) else lower


def _parallel_streams(stack: Stack) -> int:
    """N for a ``parallel(streams=N)/...`` stack, else 0."""
    if not stack.has("parallel"):
        return 0
    return default_registry.create(stack.filters[-1]).streams


def _parallel_misplaced(stack: Stack) -> Optional[str]:
    if not stack.has("parallel"):
        return None
    if stack.filters[-1].name != "parallel" or sum(layer.name == "parallel" for layer in stack.filters) > 1:
        return f"in {stack}: parallel must be the lowest filter, once, right above the method"
    if not _is_direct(stack.method.name):
        return f"in {stack}: parallel needs a method that dials (tcp, socks, ssh), not {stack.method.name}"
    return None


def _dial_many(component, node, addrs, token: bytes, timeout: float, streams: int) -> _Lowers:
    """The ``streams`` sub-connections of a parallel stack, dialed at once: token, then index."""
    dials = [gevent.spawn(_captured, _dial_with_token, component, node, addrs, token, timeout, bytes([i]))
             for i in range(streams)]
    try:
        gevent.joinall(dials)
        failed = [d.value[1] for d in dials if d.value[1] is not None]
        if failed:
            raise failed[0]
        return _Lowers(SocketStream(d.value[0], info={"method": component.name, "sub": i})
                       for i, d in enumerate(dials))
    except BaseException:
        gevent.killall(dials)
        for dial in dials:
            _close_made(dial)
        raise


def _captured(fn, *args):
    """``(fn(*args), None)``, or ``(None, error)`` for an expected failure: a greenlet that
    returns its failure is not reported by the hub as a crash."""
    try:
        return fn(*args), None
    except (ConnectError, ConfigError) as exc:
        return None, exc


def _close_made(greenlet) -> None:
    """Close what a finished ``_captured``-style greenlet made, if it made something. (A killed
    greenlet counts as successful, its value a GreenletExit: nothing to close then.)"""
    value = greenlet.value if greenlet.successful() else None
    if isinstance(value, tuple) and value and value[0] is not None:
        value[0].close()


def _uncaptured(result):
    value, exc = result
    if exc is not None:
        raise exc
    return value


def _reason(exc: ConnectError) -> str:
    """Why a candidate failed, in one line: the server's reason if it gave one."""
    if exc.tried and len(exc.tried) == 1:
        return exc.tried[0][1]
    return str(exc)


def _refuse(code: str, reason: str) -> bytes:
    return json.dumps({"ok": False, "code": code, "reason": reason}).encode()


def _recv_exactly(sock, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise RemoteProtocolError(f"connection closed after {len(data)} of {n} preamble bytes")
        data += chunk
    return bytes(data)


def _is_direct(method: str) -> bool:
    """True for methods that dial the server's node port (tcp, socks, ssh, third parties')."""
    try:
        return default_registry.kind(method) == "method" and hasattr(default_registry.get(method), "dial")
    except ConfigError:
        return False


def _dial_with_token(component, node, addrs, token: bytes, timeout: float, suffix: bytes = b""):
    """Dial the first of ``addrs`` that answers (with the method ``component``) and send the
    preamble (and ``suffix``: a parallel stack's sub-connection index); return the socket."""
    reasons = []
    method = component.name
    for text in addrs:
        try:
            sock = component.dial(parse_address(text), node=node, timeout=min(timeout, DIAL_TIMEOUT_S))
        except (ConnectError, ConfigError) as exc:
            reasons.append(f"{text}: {exc}")
            continue
        try:
            sock.sendall(DATA_PREAMBLE + token + suffix)
        except OSError as exc:
            sock.close()
            reasons.append(f"{text}: {exc}")
            continue
        return sock
    raise ConnectError("no address answered: " + "; ".join(reasons), method=method,
                       tried=[(method, r) for r in reasons])
