"""A grid node: the runtime an application talks to.

Theory of operation
-------------------
A node is a *leader* (it links to the rendez-vous node itself; a node with no cluster is its
own leader) or a *member* (it links to its cluster's leader, over the cluster network or a
Unix socket, and needs no route to the internet).

Every node listens on its *node port*. On a leader, that port accepts the cluster's members:
their enrollment (forwarded to the rendez-vous node as a routed request) and their links. On
every node it answers the rendez-vous node's dial-back probe, which decides ``inbound`` in the
directory.

The *uplink* (to the rendez-vous node, or to the leader) is dialed, secured, greeted with
``Hello`` and then kept: when it breaks, the node forgets what it learnt through it and dials
again with exponential backoff (``RECONNECT_INITIAL_S`` doubling up to ``RECONNECT_MAX_S``,
with jitter). A leader that relinks registers all its members again, so a restarted rendez-vous
node gets the whole grid back.

Directory: the leader keeps a replica fed by the rendez-vous node, plus its own members, and
passes every change on to its members, so a member's replica is its leader's.

Messages: ``send()`` (one way) and ``request()`` (with a reply) to any node by id or name; the
routing rules are in :mod:`gridsock.bootstrap.routing`. Handlers are registered per topic with
``handle()``; ``ping`` is built in and answers with the route the request took.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import ssl
import time
import uuid
from typing import Callable, Dict, List, Optional

import gevent
import gevent.event
from gevent import socket as gsocket

from . import __version__, wire
from .bootstrap.control import ControlServer, control_path
from .bootstrap.directory import RENDEZVOUS_NAME, Directory
from .bootstrap.link import HANDSHAKE_TIMEOUT_S, Link, read_message, send_message, tune_socket
from .bootstrap.routing import RELAY_TOPIC, REQUEST_TIMEOUT_S, Requests, error_reply, first_send, forwarded, is_bulk, tree_route
from .bootstrap.transport import Address, dial, listen, parse_address, tls_client, tls_server
from .errors import (
    AuthError,
    BrokenStreamError,
    ConfigError,
    ConnectError,
    GridsockError,
    RemoteProtocolError,
    RoutingError,
)
from .session import Identity, Session, client_context, new_node_key, peer_identity, server_context
from .agent import AgentServer
from .assembly import ASSEMBLE_TOPIC, DATA_PREAMBLE, Assembler, DataListener
from .components.relay import RelayManager
from .meta import MetaChannel
from .rules import Rules

__all__ = ["Node", "PingResult", "RECONNECT_INITIAL_S", "RECONNECT_MAX_S", "DEFAULT_NODE_PORT"]

log = logging.getLogger(__name__)

# First wait before dialing a lost uplink again; it doubles up to RECONNECT_MAX_S.
RECONNECT_INITIAL_S = 0.2
RECONNECT_MAX_S = 5.0
# The node port: 0 lets the kernel choose, which suits nodes that no one dials directly.
DEFAULT_NODE_PORT = 0
# Refusals after which dialing again cannot help.
FATAL_REFUSALS = ("bad-token", "no-certificate", "name-reserved", "not-a-leader", "wrong-cluster")

Handler = Callable[["Delivery"], Optional[bytes]]


@dataclasses.dataclass(frozen=True)
class Delivery:
    """A routed message delivered to this node: what a topic handler receives."""

    src: str
    src_name: Optional[str]
    topic: str
    payload: bytes
    route: tuple
    kind: str


@dataclasses.dataclass(frozen=True)
class PingResult:
    """The answer of :meth:`Node.ping`: round-trip time and the routes both ways."""

    dst: str
    rtt_s: float
    route_there: tuple
    route_back: tuple

    @property
    def hops(self) -> int:
        return len(self.route_there) - 1

    def to_json(self) -> dict:
        return {"dst": self.dst, "rtt_ms": round(self.rtt_s * 1000, 3), "route_there": list(self.route_there),
                "route_back": list(self.route_back), "hops": self.hops}


class Node:
    """One node of a session. ``start()``, then ``wait_joined()``; ``stop()`` when done."""

    def __init__(
        self,
        session: Session,
        name: str,
        *,
        cluster: str | None = None,
        leader: str | None = None,
        listen_address: str | None = None,
        advertise: str | None = None,
        ssh_gateway=None,
        control: str | None = None,
        agent: str | None = None,
        identity: Identity | None = None,
        rules: Rules | None = None,
        ssh_key: str | None = None,
        ssh_known_hosts: str | None = None,
    ) -> None:
        try:
            wire.check_name(name, "node name")
            if cluster is not None:
                wire.check_name(cluster, "cluster name")
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if name == RENDEZVOUS_NAME:
            raise ConfigError(f"the node name {RENDEZVOUS_NAME!r} is reserved for the rendez-vous node")
        if leader is not None and ssh_gateway is not None:
            raise ConfigError("a member reaches its leader directly; an SSH gateway is for leaders")
        self.session = session
        self.name = name
        self.cluster = cluster
        self.role = "member" if leader else "leader"
        self.leader_address = parse_address(leader) if leader else None
        self.listen_address = parse_address(listen_address or f"0.0.0.0:{DEFAULT_NODE_PORT}")
        self.advertise = parse_address(advertise) if advertise else None
        self.ssh_gateway = ssh_gateway
        # Credentials for the ``ssh`` data method (the bootstrap gateway's, unless given).
        self.ssh_key = ssh_key or (ssh_gateway.key_filename if ssh_gateway else None)
        self.ssh_known_hosts = ssh_known_hosts or (ssh_gateway.known_hosts if ssh_gateway else None)
        self.identity = identity
        self.node_id: Optional[str] = identity.node_id if identity else None
        if not session.tls and self.node_id is None:
            self.node_id = str(uuid.uuid4())  # plain TCP: nodes name themselves
        self.entry: Optional[wire.NodeEntry] = None
        self.directory = Directory()
        self.directory.add_listener(self._on_directory_change)
        self.uplink: Optional[Link] = None
        self.members: Dict[str, Link] = {}
        self.fatal_error: Optional[GridsockError] = None
        self.uplink_history: List[dict] = []
        self._handlers: Dict[str, Handler] = {"ping": self._handle_ping}
        self.rules = rules if rules is not None else Rules(tls=session.tls)
        self.relay = RelayManager(self._relay_send)
        self.assembler = Assembler(self, self.rules)
        self.meta = MetaChannel(self)
        self._handlers[ASSEMBLE_TOPIC] = self.assembler.handle_request
        self._requests = Requests()
        self._joined = gevent.event.Event()
        self._stopped = gevent.event.Event()
        self._control_path = control if control is not None else control_path(name)
        self._control: Optional[ControlServer] = None
        # The agent socket (patched applications): by default next to the control socket.
        self._agent_path = agent if agent is not None else \
            (os.path.splitext(self._control_path)[0] + ".agent" if self._control_path else "")
        self._agent: Optional[AgentServer] = None
        self._sock = None
        self._server_ctx = None
        self._client_ctx = None
        self._greenlets: list = []

    def __repr__(self) -> str:
        return f"<Node {self.name} {self.role} {self.node_id}>"

    # --- life cycle --------------------------------------------------------------------------

    @property
    def address(self) -> Address:
        """The node port's bound address."""
        if self.listen_address.is_unix:
            return self.listen_address
        host, port = self._sock.getsockname()[:2]
        return Address(host=host, port=port)

    def start(self) -> "Node":
        self._sock = listen(self.listen_address)
        if self._control_path:
            self._control = ControlServer(self._control_path, self._control_op).start()
        if self._agent_path:
            self._agent = AgentServer(self, self._agent_path).start()
        self._greenlets = [gevent.spawn(self._accept_loop), gevent.spawn(self._uplink_loop)]
        log.info("node %s (%s) started; node port %s", self.name, self.role, self.address)
        return self

    def stop(self) -> None:
        self._stopped.set()
        for g in self._greenlets:
            g.kill(block=False)
        self.meta.close_all()
        self.relay.reset_peers(None, "node stopping")
        if self.uplink is not None:
            self.uplink.close("node stopping")
        for link in list(self.members.values()):
            link.close("leader stopping")
        if self._sock is not None:
            self._sock.close()
        if self._control is not None:
            self._control.stop()
        if self._agent is not None:
            self._agent.stop()

    def wait_joined(self, timeout: float | None = None) -> bool:
        """Wait until the uplink is up for the first time; False on timeout.

        Raises the fatal error if the node was refused for good (bad token, ...).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._joined.is_set():
            if self.fatal_error is not None:
                raise self.fatal_error
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return False
            self._joined.wait(min(0.5, remaining) if remaining is not None else 0.5)
        return True

    def serve_forever(self) -> None:
        """Run until ``stop()``; raise the fatal error if the node is refused for good."""
        while not self._stopped.wait(0.5):
            if self.fatal_error is not None:
                raise self.fatal_error

    @property
    def joined(self) -> bool:
        return self.uplink is not None and not self.uplink.closed and self.entry is not None

    # --- messages ----------------------------------------------------------------------------

    def handle(self, topic: str, handler: Handler) -> None:
        """Call ``handler(delivery)`` for messages and requests on ``topic``.

        For a request, the bytes it returns are the reply (None: empty); an exception becomes
        an error reply carrying ``str(exc)``.
        """
        wire.check_name(topic, "topic")
        self._handlers[topic] = handler

    def send(self, dst: str, topic: str, payload: bytes = b"") -> None:
        """Send a one-way message to node ``dst`` (id or name). Raises RoutingError if no route."""
        self._originate(wire.Routed(src=self._require_id(), dst=dst, kind="msg", topic=topic,
                                    route=(self.name,), payload=bytes(payload)))

    def request(self, dst: str, topic: str, payload: bytes = b"", *, timeout: float = REQUEST_TIMEOUT_S) -> Delivery:
        """Send a request to ``dst`` and return its reply.

        Raises RoutingError if it cannot be delivered or the handler failed, TimeoutError if no
        reply comes within ``timeout`` seconds.
        """
        request_id, result = self._requests.new()
        message = wire.Routed(src=self._require_id(), dst=dst, kind="req", topic=topic, request_id=request_id,
                              route=(self.name,), payload=bytes(payload))
        if message.dst in (self.node_id, self.name):
            self._requests.resolve(self._answer(message))
        else:
            self._originate(message)
        reply = self._requests.wait(request_id, result, dst=dst, timeout=timeout)
        src = self.directory.get(reply.src)
        return Delivery(reply.src, src.name if src else None, reply.topic, reply.payload, reply.route, reply.kind)

    def ping(self, dst: str, *, timeout: float = REQUEST_TIMEOUT_S) -> PingResult:
        """Round trip to ``dst`` over the bootstrap channel; the routes taken both ways."""
        start = time.perf_counter()
        reply = self.request(dst, "ping", b"", timeout=timeout)
        rtt = time.perf_counter() - start
        there = tuple(json.loads(reply.payload)["route"])
        return PingResult(dst=dst, rtt_s=rtt, route_there=there, route_back=tuple(reply.route) + (self.name,))

    def listen(self, port: int) -> DataListener:
        """Serve grid port ``port``: ``accept()`` on the result gives ``(socket, info)``."""
        return self.assembler.listen(port)

    def connect(self, peer: str, port: int, *, stack=None, timeout: float | None = None, tcp_bridge: bool = False):
        """Connect to grid port ``port`` of node ``peer`` (name or id); return ``(socket, info)``.

        The socket is a real OS socket. ``stack`` (a stack string) overrides the rules;
        ``tcp_bridge`` makes a bridged socket a loopback TCP one rather than a Unix one.
        Raises ConnectError with the reason when the connection cannot be made.
        """
        kwargs = {} if timeout is None else {"timeout": timeout}
        return self.assembler.connect(peer, port, stack=stack, tcp_bridge=tcp_bridge, **kwargs)

    def open_stream(self, peer: str, port: int, *, stack=None, timeout: float | None = None):
        """Like connect(), but return the framework's Stream instead of a socket."""
        kwargs = {} if timeout is None else {"timeout": timeout}
        return self.assembler.open_stream(peer, port, stack=stack, **kwargs)

    def meta_request(self, dst: str, topic: str, payload: bytes = b"", *, timeout: float = REQUEST_TIMEOUT_S):
        """A request over the meta channel: a direct meta link if one can be had, else bootstrap."""
        entry = self.directory.resolve(dst)
        link = self.meta.link_for(entry.node_id) if entry is not None else None
        if link is None:
            return self.request(dst, topic, payload, timeout=timeout)
        request_id, result = self._requests.new()
        message = wire.Routed(src=self._require_id(), dst=entry.node_id, kind="req", topic=topic,
                              request_id=request_id, hops=1, route=(self.name,), payload=bytes(payload))
        if not link.send(message):
            self._requests.cancel(request_id)
            return self.request(dst, topic, payload, timeout=timeout)
        reply = self._requests.wait(request_id, result, dst=dst, timeout=timeout)
        return Delivery(reply.src, entry.name, reply.topic, reply.payload, reply.route, reply.kind)

    def _relay_send(self, dst_id: str, payload: bytes) -> None:
        self._originate(wire.Routed(src=self._require_id(), dst=dst_id, kind="msg", topic=RELAY_TOPIC,
                                    route=(self.name,), payload=payload))

    def _require_id(self) -> str:
        if self.node_id is None:
            raise RoutingError("this node has not joined the session yet")
        return self.node_id

    def _originate(self, message: wire.Routed) -> None:
        if len(message.payload) > wire.MAX_PAYLOAD_BYTES:
            raise RoutingError(f"payload of {len(message.payload)} bytes exceeds MAX_PAYLOAD_BYTES "
                               f"({wire.MAX_PAYLOAD_BYTES}); use a data connection", dst=message.dst)
        if not self._forward(first_send(message), originated=True):
            raise RoutingError(f"no route to {message.dst}: not linked to the grid", dst=message.dst)

    def _forward(self, message: wire.Routed, *, originated: bool = False, checked: bool = True) -> bool:
        """Put ``message`` (hops already counted) on the right link; False if there is none.

        A message this node ``originated`` waits for room on the link (back-pressure on the
        sender); a forwarded one never waits.
        """
        link = None
        if self.role == "leader":
            entry = self.directory.resolve(message.dst)
            link = self.members.get(entry.node_id) if entry else None
        if link is None:
            link = self.uplink
        if link is None:
            return False
        bulk = is_bulk(message)
        if originated:
            link.wait_room(bulk=bulk)
        return link.send(message, bulk=bulk, checked=checked)

    def _route(self, message: wire.Routed, via: Optional[Link] = None) -> None:
        """A routed message arrived on a link: deliver it here or send it on.

        ``via`` is the meta link it came on, if any: requests from a meta link are answered on it.
        """
        if message.dst in (self.node_id, self.name):
            if is_bulk(message):
                self.relay.on_message(message.src, message.payload)
            elif message.kind in ("rep", "err"):
                self._requests.resolve(message)
            else:
                gevent.spawn(self._deliver, message, via)
            return
        if self.role == "member":
            log.info("member %s dropping %s for %s: not addressed to it", self.name, message.topic, message.dst)
            return
        out = forwarded(message, self.name)
        reason = f"hop limit ({wire.MAX_HOPS}) reached" if out is None else None
        if out is not None and not self._forward(out, checked=False):
            reason = f"no route to {message.dst} from {self.name}"
        if reason:
            back = error_reply(message, self.node_id, self.name, reason)
            if back is not None:
                self._forward(first_send(back))

    def _deliver(self, message: wire.Routed, via: Optional[Link] = None) -> None:
        if message.kind == "msg":
            handler = self._handlers.get(message.topic)
            if handler is None:
                log.info("no handler for message topic %r from %s", message.topic, message.src)
                return
            try:
                handler(self._delivery(message))
            except Exception:
                log.exception("handler for %r failed", message.topic)
            return
        answer = first_send(self._answer(message))
        if via is None or not via.send(answer):
            self._forward(answer)

    def _answer(self, message: wire.Routed) -> wire.Routed:
        handler = self._handlers.get(message.topic)
        try:
            if handler is None:
                raise LookupError(f"node {self.name} has no handler for {message.topic!r}")
            payload = handler(self._delivery(message)) or b""
            if len(payload) > wire.MAX_PAYLOAD_BYTES:
                raise RoutingError(f"reply of {len(payload)} bytes exceeds MAX_PAYLOAD_BYTES ({wire.MAX_PAYLOAD_BYTES})")
            return wire.Routed(src=self.node_id, dst=message.src, kind="rep", topic=message.topic,
                               request_id=message.request_id, route=(self.name,), payload=bytes(payload))
        except Exception as exc:
            if not isinstance(exc, (LookupError, GridsockError)):
                log.exception("handler for %r failed", message.topic)
            return wire.Routed(src=self.node_id, dst=message.src, kind="err", topic=message.topic,
                               request_id=message.request_id, route=(self.name,),
                               payload=str(exc).encode()[: wire.MAX_REASON_BYTES])

    def _delivery(self, message: wire.Routed) -> Delivery:
        src = self.directory.get(message.src)
        return Delivery(message.src, src.name if src else None, message.topic, message.payload, message.route,
                        message.kind)

    def _handle_ping(self, delivery: Delivery) -> bytes:
        return json.dumps({"route": list(delivery.route) + [self.name]}).encode()

    # --- uplink ------------------------------------------------------------------------------

    def _uplink_target(self) -> Address:
        if self.role == "member":
            return self.leader_address
        return Address(host=self.session.rendezvous_host, port=self.session.rendezvous_port)

    def _uplink_loop(self) -> None:
        backoff = RECONNECT_INITIAL_S
        while not self._stopped.is_set():
            target = self._uplink_target()
            try:
                self._run_uplink(target)
                backoff = RECONNECT_INITIAL_S
            except AuthError as exc:
                log.error("node %s refused by %s: %s", self.name, target, exc)
                if exc.method in FATAL_REFUSALS:
                    self.fatal_error = exc
                    return
            except (ConnectError, ssl.SSLError, OSError, TimeoutError, RemoteProtocolError, BrokenStreamError) as exc:
                log.warning("node %s: uplink to %s failed: %s", self.name, target, exc)
            self._record_uplink("down")
            delay = backoff * random.uniform(0.5, 1.0)
            backoff = min(backoff * 2, RECONNECT_MAX_S)
            if self._stopped.wait(delay):
                return

    def _record_uplink(self, state: str, **info) -> None:
        self.uplink_history.append({"state": state, "at": time.time(), **info})
        del self.uplink_history[:-20]

    def _dial_uplink(self, target: Address):
        """Return ``(sock, local_ip)``: a connected socket to the uplink target."""
        if self.ssh_gateway is not None:
            from .bootstrap.sshtunnel import open_ssh_tunnel

            sock = open_ssh_tunnel(self.ssh_gateway, target.host, target.port)
            return sock, None
        sock = dial(target)
        local_ip = None if target.is_unix else sock.getsockname()[0]
        return sock, local_ip

    def client_context(self):
        """The TLS client context with this node's certificate (made once per identity)."""
        if self._client_ctx is None or self._client_ctx[0] is not self.identity:
            self._client_ctx = (self.identity, client_context(self.session, self.identity))
        return self._client_ctx[1]

    def _secure(self, sock, *, expect: str):
        if not self.session.tls:
            return sock
        context = self.client_context()
        tls = tls_client(sock, context, timeout=HANDSHAKE_TIMEOUT_S)
        peer = peer_identity(tls)
        ok = peer is not None and (
            peer.kind == "rendezvous" and peer.id == self.session.session_id if expect == "rendezvous" else peer.kind == "node"
        )
        if not ok:
            tls.close()
            raise AuthError(f"the peer presented {peer}, not the expected {expect}", peer=str(self._uplink_target()))
        return tls

    def _enroll(self, target: Address) -> None:
        """Get a certificate: prove the join token to the rendez-vous node (or via the leader)."""
        key_pem, csr_pem = new_node_key()
        sock, _ = self._dial_uplink(target)
        try:
            sock = self._secure(sock, expect="rendezvous" if self.role == "leader" else "leader")
            send_message(sock, wire.Enroll(token=self.session.join_token, csr_pem=csr_pem.decode(), name=self.name))
            reply = read_message(sock, wire.Decoder(peer=str(target)))
        finally:
            sock.close()
        if isinstance(reply, wire.Refuse):
            raise AuthError(f"enrollment refused: {reply.reason}", peer=str(target), method=reply.code)
        if not isinstance(reply, wire.Enrolled):
            raise RemoteProtocolError(f"expected Enrolled, got {type(reply).__name__}", peer=str(target))
        try:
            self.identity = Identity(reply.cert_pem.encode(), key_pem)
        except ConfigError as exc:
            raise RemoteProtocolError(f"the certificate we were sent is unusable: {exc}", peer=str(target)) from None
        if self.identity.node_id != reply.node_id:
            raise RemoteProtocolError("the certificate does not carry the node id we were given", peer=str(target))
        self.node_id = reply.node_id
        log.info("node %s enrolled as %s", self.name, self.node_id)

    def _advertised(self, local_ip: Optional[str]) -> tuple:
        if self.advertise is not None:
            return (str(self.advertise),)
        bound = self.address
        if bound.is_unix:
            return ()
        if bound.host not in ("0.0.0.0", "::"):
            return (str(bound),)
        if local_ip:
            return (str(Address(host=local_ip, port=bound.port)),)
        return ()

    def _run_uplink(self, target: Address) -> None:
        if self.session.tls and self.identity is None:
            self._enroll(target)
        sock, local_ip = self._dial_uplink(target)
        try:
            sock = self._secure(sock, expect="rendezvous" if self.role == "leader" else "leader")
            hello = wire.Hello(
                name=self.name, cluster=self.cluster, role=self.role, addrs=self._advertised(local_ip),
                software=f"gridsock {__version__}",
                node_id=None if self.session.tls else self.node_id,
                token=None if self.session.tls else self.session.join_token,
            )
            send_message(sock, hello)
            decoder = wire.Decoder(peer=str(target))
            reply = read_message(sock, decoder)
        except BaseException:
            sock.close()
            raise
        if isinstance(reply, wire.Refuse):
            sock.close()
            raise AuthError(f"refused: {reply.reason}", peer=str(target), method=reply.code)
        if not isinstance(reply, wire.Welcome):
            sock.close()
            raise RemoteProtocolError(f"expected Welcome, got {type(reply).__name__}", peer=str(target))
        self.entry = reply.entry
        self.cluster = reply.entry.cluster
        link = Link(sock, decoder, label=f"uplink to {'rendez-vous' if self.role == 'leader' else 'leader'} {target}",
                    on_message=self._on_uplink_message)
        self.uplink = link
        self.directory.put([self.entry])
        if self.role == "leader":
            entries = [l.entry for l in self.members.values() if not l.closed]
            for i in range(0, len(entries), wire.MAX_ENTRIES_PER_UPDATE):
                link.send(wire.Register(tuple(entries[i : i + wire.MAX_ENTRIES_PER_UPDATE])))
        link.start()
        self._record_uplink("up", target=str(target))
        self._joined.set()
        log.info("node %s (%s) joined session %s as %s via %s", self.name, self.node_id, self.session.session_id,
                 self.role, target)
        link.join()
        self.uplink = None
        # What we learnt through the uplink is stale now; keep ourselves and our members.
        self.directory.apply(self._local_entries(), (), replace=True)

    def _local_entries(self) -> List[wire.NodeEntry]:
        local = [self.entry] if self.entry else []
        return local + [l.entry for l in self.members.values() if not l.closed]

    def _on_uplink_message(self, link: Link, message) -> None:
        if isinstance(message, wire.Routed):
            self._route(message)
        elif isinstance(message, wire.DirectoryUpdate):
            self.directory.apply_update(message, keep=self._local_entries())
            mine = self.directory.get(self.node_id)
            if mine is not None:
                self.entry = mine
        else:
            raise RemoteProtocolError(f"unexpected {type(message).__name__} on the uplink")

    def _on_directory_change(self, joined, left) -> None:
        if left:
            # A relayed connection cannot outlive its peer's place in the grid.
            self.relay.reset_peers({e.node_id for e in left}, "the peer left the grid")
        if self.role != "leader" or not self.members:
            return
        updates = wire.directory_updates(joined, [e.node_id for e in left])
        for link in list(self.members.values()):
            for update in updates:
                link.send(update)

    # --- node port ---------------------------------------------------------------------------

    def _accept_loop(self) -> None:
        while True:
            sock, addr = self._sock.accept()
            tune_socket(sock)
            gevent.spawn(self._handle, sock, addr)

    def _handle(self, sock, addr) -> None:
        label = f"{addr[0]}:{addr[1]}" if isinstance(addr, tuple) else f"unix:{self.listen_address.path}"
        handed_over = False
        try:
            with gevent.Timeout(HANDSHAKE_TIMEOUT_S, TimeoutError("silent peer")):
                first = sock.recv(1, gsocket.MSG_PEEK)
            if first == DATA_PREAMBLE[:1]:
                handed_over = True
                self.assembler.handle_data_connection(sock, label)
                return
            peer = None
            if self.session.tls:
                if self.identity is None:
                    return  # not enrolled yet: nothing to offer
                if self._server_ctx is None:
                    self._server_ctx = server_context(self.session, self.identity, require_client_cert=False)
                sock = tls_server(sock, self._server_ctx, timeout=HANDSHAKE_TIMEOUT_S)
                peer = peer_identity(sock)
            decoder = wire.Decoder(peer=label)
            message = read_message(sock, decoder)
            if isinstance(message, wire.Hello) and message.role == "probe":
                if self.session.tls and (peer is None or peer.kind != "rendezvous"):
                    raise AuthError("a dial-back probe must come from the rendez-vous node", peer=label)
                return
            if isinstance(message, wire.Hello) and message.role == "peer":
                peer_id = self._authenticate(sock, message, peer, label)
                self.meta.accept(sock, decoder, message, peer_id, label)
                handed_over = True
                return
            if self.role != "leader":
                self._refuse(sock, "not-a-leader", "this node is a member, not a leader", label)
            if isinstance(message, wire.Enroll):
                self._enroll_member(sock, message, label)
            elif isinstance(message, wire.Hello):
                handed_over = self._accept_member(sock, decoder, message, peer, label)
            else:
                raise RemoteProtocolError(f"expected Enroll or Hello, got {type(message).__name__}")
        except ssl.SSLError as exc:
            log.warning("node %s refused %s: TLS handshake failed: %s", self.name, label, exc.reason or exc)
        except AuthError as exc:
            log.warning("node %s refused %s: %s", self.name, label, exc)
        except RemoteProtocolError as exc:
            log.warning("node %s dropped %s: protocol error: %s", self.name, label, exc)
        except (OSError, TimeoutError, BrokenStreamError, RoutingError) as exc:
            log.info("node %s: connection from %s ended during handshake: %s", self.name, label, exc)
        finally:
            if not handed_over:
                sock.close()

    def _refuse(self, sock, code: str, reason: str, label: str) -> None:
        try:
            send_message(sock, wire.Refuse(code, reason))
        except OSError:
            pass
        raise AuthError(f"{reason} ({code})", peer=label, method=code)

    def _enroll_member(self, sock, message: wire.Enroll, label: str) -> None:
        if not self.session.tls:
            raise RemoteProtocolError("Enroll in a plain-TCP session")
        request = json.dumps({"token": message.token, "csr_pem": message.csr_pem, "name": message.name}).encode()
        try:
            reply = self.request(RENDEZVOUS_NAME, "enroll", request)
        except RoutingError as exc:
            self._refuse(sock, "enroll-failed", f"cannot reach the rendez-vous node to enroll: {exc}", label)
        try:
            answer = json.loads(reply.payload)
        except ValueError as exc:
            raise RemoteProtocolError(f"bad enroll answer from the rendez-vous node: {exc}") from None
        if isinstance(answer, dict) and "refused" in answer:
            self._refuse(sock, str(answer["refused"]), str(answer.get("reason", "enrollment refused")), label)
        try:
            enrolled = wire.Enrolled.from_header(answer, b"")
        except (ValueError, TypeError) as exc:
            raise RemoteProtocolError(f"bad enroll answer from the rendez-vous node: {exc}") from None
        send_message(sock, enrolled)

    def _authenticate(self, sock, hello: wire.Hello, peer, label: str) -> str:
        """The node id of the sender of ``hello``: from its certificate (TLS) or, in a plain-TCP
        session, as it says after proving the join token. Refuses and raises AuthError if none."""
        if self.session.tls:
            if peer is None or peer.kind != "node":
                self._refuse(sock, "no-certificate", "a node certificate of this session is required", label)
            return peer.id
        if hello.node_id is None or not self.session.check_token(hello.token or ""):
            self._refuse(sock, "bad-token", "join token refused", label)
        return hello.node_id

    def _accept_member(self, sock, decoder, hello: wire.Hello, peer, label: str) -> bool:
        node_id = self._authenticate(sock, hello, peer, label)
        if hello.role != "member":
            self._refuse(sock, "not-a-member", f"a {hello.role} does not link to a leader", label)
        if hello.cluster not in (None, self.cluster):
            self._refuse(sock, "wrong-cluster", f"{self.name} leads cluster {self.cluster!r}, not {hello.cluster!r}", label)
        if hello.name in (RENDEZVOUS_NAME, self.name):
            self._refuse(sock, "name-taken", f"node name {hello.name!r} is taken", label)
        holder = self.directory.by_name(hello.name)
        holder_link = self.members.get(holder.node_id) if holder else None
        if holder is not None and holder.node_id != node_id and (holder_link is not None or holder.leader != self.node_id):
            self._refuse(sock, "name-taken", f"node name {hello.name!r} is already used by {holder.node_id}", label)
        entry = wire.NodeEntry(node_id=node_id, name=hello.name, cluster=self.cluster, leader=self.node_id,
                               role="member", addrs=hello.addrs)
        old = self.members.pop(node_id, None)
        if old is not None:
            old.close("the same member linked again")
        link = Link(sock, decoder, label=f"member {hello.name} ({label})", on_message=self._on_member_message,
                    on_close=self._on_member_close)
        link.peer_id = node_id
        link.entry = entry
        link.send(wire.Welcome(entry, self.session.session_id))
        self.directory.put([entry])  # tells the other members
        for part in self.directory.snapshot_updates():
            link.send(part)
        self.members[node_id] = link
        link.start()
        if self.uplink is not None:
            self.uplink.send(wire.Register((entry,)))
        log.info("member %s (%s) joined leader %s from %s", hello.name, node_id, self.name, label)
        return True

    def _on_member_message(self, link: Link, message) -> None:
        if isinstance(message, wire.Routed):
            if message.src != link.peer_id:
                raise RemoteProtocolError(f"member sent a message with source {message.src}, not its own id")
            self._route(message)
        else:
            raise RemoteProtocolError(f"unexpected {type(message).__name__} on a member link")

    def _on_member_close(self, link: Link) -> None:
        if self.members.get(link.peer_id) is not link:
            return
        del self.members[link.peer_id]
        log.info("member %s left leader %s: %s", link.entry.name, self.name, link.close_reason)
        self.directory.remove([link.peer_id])
        if self.uplink is not None:
            self.uplink.send(wire.Unregister((link.peer_id,)))

    # --- control -----------------------------------------------------------------------------

    def status(self) -> dict:
        links = []
        if self.uplink is not None:
            links.append({"kind": "uplink", "label": self.uplink.label, "since": self.uplink.opened_at})
        links += [{"kind": "member", "peer": l.entry.name, "peer_id": l.peer_id, "label": l.label, "since": l.opened_at}
                  for l in self.members.values()]
        return {
            "role": self.role,
            "name": self.name,
            "node_id": self.node_id,
            "cluster": self.cluster,
            "session": self.session.session_id,
            "bootstrap": self.session.bootstrap + (f" via ssh {self.ssh_gateway}" if self.ssh_gateway else ""),
            "address": str(self.address),
            "joined": self.joined,
            "entry": self.entry.to_json() if self.entry else None,
            "directory": self.directory.to_json(),
            "routes": self._routes(),
            "links": links,
            "uplink_history": self.uplink_history,
            "connections": self.assembler.status(),
            "meta_links": self.meta.status(),
            "listening": sorted(self.assembler.listeners),
        }

    def _routes(self) -> dict:
        """For each node in the directory, the bootstrap route from here (names)."""
        me = self.directory.get(self.node_id) if self.node_id else None
        if me is None:
            return {}
        return {e.node_id: list(tree_route(self.directory, me, e)) for e in self.directory}

    def _control_op(self, op: str, args: dict):
        if op == "status":
            return self.status()
        if op == "ping":
            dst = args.get("dst")
            if not isinstance(dst, str):
                raise ConfigError("ping needs a destination")
            timeout = float(args.get("timeout", REQUEST_TIMEOUT_S))
            return self.ping(dst, timeout=timeout).to_json()
        if op == "wait":
            return self.wait_directory(present=args.get("present", ()), absent=args.get("absent", ()),
                                       settled=bool(args.get("settled", False)),
                                       timeout=float(args.get("timeout", REQUEST_TIMEOUT_S)))
        if op == "echo":
            from .diag import serve_echo

            serve_echo(self, int(args.get("port", 0)))
            return {"port": int(args.get("port", 0))}
        if op == "transfer":
            from .diag import transfer

            return transfer(self, str(args["dst"]), int(args["port"]), int(args["bytes"]),
                            stack=args.get("stack"), timeout=args.get("timeout"))
        raise ConfigError(f"unknown control operation {op!r} (a node knows: status, ping, wait, echo, transfer)")

    def wait_directory(self, *, present=(), absent=(), settled: bool = False,
                       timeout: float = REQUEST_TIMEOUT_S) -> list:
        """Wait until the directory holds every name in ``present`` and none in ``absent``.

        With ``settled``, also until every entry has a dial-back verdict (``inbound`` not None).
        Returns the directory (as JSON); raises RoutingError after ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        while True:
            names = {e.name for e in self.directory}
            unsettled = settled and any(e.inbound is None for e in self.directory)
            if names >= set(present) and not names & set(absent) and not unsettled:
                return self.directory.to_json()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RoutingError(f"after {timeout:.1f} s the directory of {self.name} holds {sorted(names)}; "
                                   f"wanted {sorted(present)} present and {sorted(absent)} absent")
            self.directory.wait_changed(remaining)
