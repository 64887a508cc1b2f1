"""A grid node: the runtime an application talks to.

Theory of operation
-------------------
A node is a *leader* (it links to the rendez-vous node itself; a node with no cluster is its
own leader) or a *member* (it links to its cluster's leader, over the cluster network or a
Unix socket, and needs no route to the internet). :class:`Node` is the façade an application
uses; each of its roles is a class of its own in the bootstrap layer, given what it needs:

- :class:`~gridsock.bootstrap.uplink.Uplink`: dials the rendez-vous node (a leader) or the
  leader (a member), enrolls, greets with ``Hello``, keeps the link and dials again with
  exponential backoff and jitter when it breaks (``RECONNECT_INITIAL_S`` doubling up to
  ``RECONNECT_MAX_S``). A leader that relinks registers all its members again, so a restarted
  rendez-vous node gets the whole grid back.
- :class:`~gridsock.bootstrap.leader.LeaderService` (a leader's only): its members'
  enrollment and links, and every directory change passed on to them, so a member's replica
  of the directory is its leader's.
- :class:`~gridsock.bootstrap.routing.Router`: ``send()`` (one way) and ``request()`` (with a
  reply) to any node by id or name, forwarding for a leader's members, and the handlers
  registered per topic with ``handle()`` (``ping`` is built in and answers with the route the
  request took).
- :class:`~gridsock.bootstrap.nodeport.NodePort`: the node port. It tells data connections
  (handed to the assembler), the rendez-vous node's dial-back probe (which decides
  ``inbound`` in the directory), meta links (handed to the meta channel) and a leader's
  members apart.

The node itself wires them together, holds what they share (name, id, directory entry,
directory, session, identity) and adds the data layer: the assembler (``connect``,
``listen``), the meta channel and relayed connections, plus the control and agent sockets.
"""
from __future__ import annotations

import logging
import os
import time
import types
import uuid
from typing import TYPE_CHECKING, List, Mapping, Optional

import gevent
import gevent.event

from . import wire
from .bootstrap.control import ControlServer, control_path
from .bootstrap.directory import RENDEZVOUS_NAME, Directory
from .bootstrap.leader import LeaderService
from .bootstrap.link import Link
from .bootstrap.nodeport import NodePort
from .bootstrap.routing import REQUEST_TIMEOUT_S, Delivery, Handler, PingResult, Requests, Router
from .bootstrap.transport import Address, parse_address
from .bootstrap.uplink import FATAL_REFUSALS, RECONNECT_INITIAL_S, RECONNECT_MAX_S, Uplink
from .errors import ConfigError, GridsockError, RoutingError
from .session import Identity, Session
from .agent import AgentServer
from .assembly import ASSEMBLE_TOPIC, DATA_PREAMBLE, Assembler, DataListener
from .components.relay import RelayManager
from .meta import MetaChannel
from .rules import Rules

if TYPE_CHECKING:  # (prometheus_client is imported only when metrics are asked for)
    from .metrics import NodeMetrics

__all__ = [
    "Node",
    "Delivery",
    "PingResult",
    "RECONNECT_INITIAL_S",
    "RECONNECT_MAX_S",
    "DEFAULT_NODE_PORT",
    "FATAL_REFUSALS",
]

log = logging.getLogger(__name__)

# The node port: 0 lets the kernel choose, which suits nodes that no one dials directly.
DEFAULT_NODE_PORT = 0
# The front door (gridsock.frontdoor: SOCKS5 and HTTP proxy for programs that are not Python):
# ``HOST:PORT`` (port 0: the kernel chooses; ``gridsock status`` and the agent tell which), or None.
DEFAULT_FRONT_DOOR: Optional[str] = None
# The routed request a node answers with what it knows of its own paths (gridsock.topology).
PATHS_TOPIC = "gridsock.paths"
# No metrics endpoint unless asked for (``HOST:PORT`` or ``PORT``, on loopback: gridsock.metrics).
DEFAULT_METRICS: Optional[str] = None
_NO_MEMBERS: Mapping[str, Link] = types.MappingProxyType({})

# Control operations served by modules of their own (``module:function``, called with the node
# and the operation's arguments), imported when first asked for.
CONTROL_OPS_ELSEWHERE: Mapping[str, str] = types.MappingProxyType({
    "netcheck": "gridsock.netcheck:control_netcheck",
    "topology": "gridsock.topology:control_topology",
    "forward": "gridsock.forward:control_forward",
    "expose": "gridsock.forward:control_expose",
})


def _control_op_elsewhere(op: str):
    import importlib

    target = CONTROL_OPS_ELSEWHERE.get(op)
    if target is None:
        return None
    module, _, function = target.partition(":")
    return getattr(importlib.import_module(module), function)


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
        metrics: str | None = DEFAULT_METRICS,
        front_door: str | None = DEFAULT_FRONT_DOOR,
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
        # The roles (bootstrap layer); each reads and writes the shared state above.
        self._leader: Optional[LeaderService] = None
        if self.role == "leader":
            self._leader = LeaderService(self, on_routed=lambda message: self.router.route(message),
                                         request=lambda dst, topic, payload: self.router.request(dst, topic, payload),
                                         send_up=lambda message: self._uplink.send(message))
        self.router = Router(self, up=lambda: self.uplink, down=self._leader.link_for if self._leader else None,
                             on_bulk=lambda src, payload: self.relay.on_message(src, payload))
        self._uplink = Uplink(self, on_routed=self.router.route,
                              members=self._leader.entries if self._leader else list)
        self._node_port = NodePort(
            self, self.listen_address, leader=self._leader, data_first_byte=DATA_PREAMBLE[:1],
            on_data=lambda sock, label: self.assembler.handle_data_connection(sock, label),
            on_peer=lambda sock, decoder, hello, peer_id, label: self.meta.accept(sock, decoder, hello, peer_id, label),
        )
        # The data layer.
        self.rules = rules if rules is not None else Rules(tls=session.tls)
        self.relay = RelayManager(self._relay_send)
        self.assembler = Assembler(self, self.rules)
        self.meta = MetaChannel(self)
        self.router.handlers[ASSEMBLE_TOPIC] = self.assembler.handle_request
        self.router.handlers[PATHS_TOPIC] = self._answer_paths
        self._front_door_address = parse_address(front_door) if front_door else None
        self._front_door = None
        # Prometheus metrics (gridsock.metrics), served from start() when an address is given.
        self._metrics_address = None
        self._metrics: Optional["NodeMetrics"] = None
        if metrics is not None:
            from .metrics import NodeMetrics, parse_metrics_address

            self._metrics_address = parse_metrics_address(metrics)
            self._metrics = NodeMetrics(self)
            self.router.handlers[ASSEMBLE_TOPIC] = self._handle_assembly_counted
        self._stopped = gevent.event.Event()
        self._control_path = control if control is not None else control_path(name)
        self._control: Optional[ControlServer] = None
        # The agent socket (patched applications): by default next to the control socket.
        self._agent_path = agent if agent is not None else \
            (os.path.splitext(self._control_path)[0] + ".agent" if self._control_path else "")
        self._agent: Optional[AgentServer] = None
        self._greenlets: list = []

    def __repr__(self) -> str:
        return f"<Node {self.name} {self.role} {self.node_id}>"

    # --- what the roles hold -----------------------------------------------------------------

    @property
    def address(self) -> Address:
        """The node port's bound address."""
        return self._node_port.address

    @property
    def uplink(self) -> Optional[Link]:
        """The link to the rendez-vous node (leader) or the leader (member); None while down."""
        return self._uplink.link

    @property
    def members(self) -> Mapping[str, Link]:
        """A leader's member links, by node id (empty on a member)."""
        return self._leader.members if self._leader is not None else _NO_MEMBERS

    @property
    def fatal_error(self) -> Optional[GridsockError]:
        """The refusal that made the node stop dialing (bad token, ...), if any."""
        return self._uplink.fatal_error

    @property
    def uplink_history(self) -> List[dict]:
        """The latest uplink ups and downs (``state``, ``at``, ``target``)."""
        return self._uplink.history

    @property
    def joined(self) -> bool:
        return self.uplink is not None and not self.uplink.closed and self.entry is not None

    @property
    def _requests(self) -> Requests:
        """The outstanding routed requests (the router's), for the data layer."""
        return self.router.requests

    # --- life cycle --------------------------------------------------------------------------

    def start(self) -> "Node":
        if self._metrics is not None and self._metrics_address is not None:
            self._metrics.serve(self._metrics_address)  # first: a port in use fails before anything runs
        self._node_port.open()
        if self._control_path:
            self._control = ControlServer(self._control_path, self._control_op).start()
        if self._agent_path:
            self._agent = AgentServer(self, self._agent_path).start()
        if self._front_door_address is not None:
            from .frontdoor import FrontDoor

            self._front_door = FrontDoor(self, self._front_door_address).start()
        self._greenlets = [gevent.spawn(self._node_port.serve), gevent.spawn(self._uplink.serve)]
        log.info("node %s (%s) started; node port %s", self.name, self.role, self.address)
        return self

    def stop(self) -> None:
        self._stopped.set()
        for g in self._greenlets:
            g.kill(block=False)
        if self._metrics is not None:
            self._metrics.stop()
        self.meta.close_all()
        self.relay.reset_peers(None, "node stopping")
        self._uplink.stop("node stopping")
        if self._leader is not None:
            self._leader.close_all("leader stopping")
        self._node_port.close()
        if self._control is not None:
            self._control.stop()
        if self._agent is not None:
            self._agent.stop()
        if self._front_door is not None:
            self._front_door.stop()

    def wait_joined(self, timeout: float | None = None) -> bool:
        """Wait until the uplink is up for the first time; False on timeout.

        Raises the fatal error if the node was refused for good (bad token, ...).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._uplink.joined.is_set():
            if self.fatal_error is not None:
                raise self.fatal_error
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return False
            self._uplink.joined.wait(min(0.5, remaining) if remaining is not None else 0.5)
        return True

    def serve_forever(self) -> None:
        """Run until ``stop()``; raise the fatal error if the node is refused for good."""
        while not self._stopped.wait(0.5):
            if self.fatal_error is not None:
                raise self.fatal_error

    # --- messages ----------------------------------------------------------------------------

    def handle(self, topic: str, handler: Handler) -> None:
        """Call ``handler(delivery)`` for messages and requests on ``topic``.

        For a request, the bytes it returns are the reply (None: empty); an exception becomes
        an error reply carrying ``str(exc)``.
        """
        self.router.handle(topic, handler)

    def send(self, dst: str, topic: str, payload: bytes = b"") -> None:
        """Send a one-way message to node ``dst`` (id or name). Raises RoutingError if no route."""
        self.router.send(dst, topic, payload)

    def request(self, dst: str, topic: str, payload: bytes = b"", *, timeout: float = REQUEST_TIMEOUT_S) -> Delivery:
        """Send a request to ``dst`` and return its reply.

        Raises RoutingError if it cannot be delivered or the handler failed, TimeoutError if no
        reply comes within ``timeout`` seconds.
        """
        return self.router.request(dst, topic, payload, timeout=timeout)

    def ping(self, dst: str, *, timeout: float = REQUEST_TIMEOUT_S) -> PingResult:
        """Round trip to ``dst`` over the bootstrap channel; the routes taken both ways."""
        return self.router.ping(dst, timeout=timeout)

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
        if self._metrics is not None:
            return self._metrics.observe_connect(self.assembler.connect, peer, port, stack=stack,
                                                 tcp_bridge=tcp_bridge, **kwargs)
        return self.assembler.connect(peer, port, stack=stack, tcp_bridge=tcp_bridge, **kwargs)

    def open_stream(self, peer: str, port: int, *, stack=None, timeout: float | None = None):
        """Like connect(), but return the framework's Stream instead of a socket."""
        kwargs = {} if timeout is None else {"timeout": timeout}
        if self._metrics is not None:
            return self._metrics.observe_connect(self.assembler.open_stream, peer, port, stack=stack, **kwargs)
        return self.assembler.open_stream(peer, port, stack=stack, **kwargs)

    def meta_request(self, dst: str, topic: str, payload: bytes = b"", *, timeout: float = REQUEST_TIMEOUT_S):
        """A request over the meta channel: a direct meta link if one can be had, else bootstrap."""
        entry = self.directory.resolve(dst)
        link = self.meta.link_for(entry.node_id) if entry is not None else None
        reply = None
        if entry is not None and link is not None:
            reply = self.router.request_on(link, entry, topic, payload, timeout=timeout, dst_label=dst)
        if reply is None:  # no meta link, or it closed under us
            return self.request(dst, topic, payload, timeout=timeout)
        return reply

    def _handle_assembly_counted(self, delivery: Delivery) -> bytes:
        """The assembler's request handler, its refusals counted for the metrics."""
        reply = self.assembler.handle_request(delivery)
        return self._metrics.observe_refusal(reply) if self._metrics is not None else reply

    def _relay_send(self, dst_id: str, payload: bytes) -> None:
        """Relayed connection data for ``dst_id``, routed as bulk (the relay component's sender)."""
        self.router.relay_send(dst_id, payload)

    def client_context(self):
        """The TLS client context with this node's certificate (made once per identity)."""
        return self._uplink.client_context()

    def _on_directory_change(self, joined, left) -> None:
        if left:
            # A relayed connection cannot outlive its peer's place in the grid.
            self.relay.reset_peers({e.node_id for e in left}, "the peer left the grid")
        if self._leader is not None:
            self._leader.on_directory_change(joined, left)

    # --- control -----------------------------------------------------------------------------

    def status(self) -> dict:
        links = []
        if self.uplink is not None:
            links.append({"kind": "uplink", "label": self.uplink.label, "since": self.uplink.opened_at})
        if self._leader is not None:
            links += self._leader.status()
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
            "routes": self.router.routes(),
            "links": links,
            "uplink_history": self.uplink_history,
            "connections": self.assembler.status(),
            "paths": self.assembler.paths(),
            "assembly": dict(self.assembler.counters),
            "meta_links": self.meta.status(),
            "listening": sorted(self.assembler.listeners),
            "front_door": str(self._front_door.address) if self._front_door is not None else None,
        }

    def _answer_paths(self, delivery: Delivery) -> bytes:
        """Another node asks how this one reaches its peers (``gridsock status --graph``)."""
        import json

        return json.dumps({"name": self.name, "cluster": self.cluster, "role": self.role,
                           "paths": self.assembler.paths(), "meta_links": self.meta.status()}).encode()

    @property
    def metrics_address(self) -> Optional[Address]:
        """Where the metrics endpoint listens (None: off, or not started)."""
        return self._metrics.address if self._metrics is not None else None

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

            abort_after = args.get("abort_after")
            serve_echo(self, int(args.get("port", 0)), abort_after=None if abort_after is None else int(abort_after))
            return {"port": int(args.get("port", 0))}
        if op == "transfer":
            from .diag import transfer

            return transfer(self, str(args["dst"]), int(args["port"]), int(args["bytes"]),
                            stack=args.get("stack"), timeout=args.get("timeout"))
        handler = _control_op_elsewhere(op)
        if handler is not None:
            return handler(self, args)
        known = ", ".join(["status", "ping", "wait", "echo", "transfer", *CONTROL_OPS_ELSEWHERE])
        raise ConfigError(f"unknown control operation {op!r} (a node knows: {known})")

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
