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

Threads: with ``loop="thread"`` (the default for a caller that runs no gevent) the node is made
and runs in a thread of its own (:mod:`gridsock._loopthread`); every public method may be called
from any thread, and runs in the node's thread while its caller waits on a ``threading.Event``
with the call's timeout. Sockets it hands out work with blocking calls, ``select`` and asyncio in
any thread; topic handlers run in the node's thread. With ``loop="caller"`` (gevent programs,
the CLI, the tests) the caller's thread runs the node inline, as before. See "Embedding: the
node's thread" in docs/architecture.md.
"""
from __future__ import annotations

import atexit
import logging
import os
import sys
import time
import types
import uuid
import weakref
from typing import TYPE_CHECKING, Any, Callable, List, Mapping, Optional, Tuple

import gevent
import gevent.event
import gevent.monkey

from . import wire
from .bootstrap.control import ControlArgs, ControlServer, control_path
from .bootstrap.directory import LEAVE_TOPIC, REFUSED_TOPIC, RENDEZVOUS_NAME, STATUS_MAX_BYTES, Directory
from .bootstrap.leader import LeaderService
from .bootstrap.link import PROCESS_BUDGET, Link
from .bootstrap.nodeport import NodePort
from .bootstrap.routing import REQUEST_TIMEOUT_S, Delivery, Handler, PingResult, Requests, Router
from .bootstrap.transport import Address, parse_address
from .bootstrap.uplink import FATAL_REFUSALS, RECONNECT_INITIAL_S, RECONNECT_MAX_S, Uplink
from .errors import ConfigError, ConnectError, ConnectRefusedError, GridsockError, LoopEndedError, RoutingError
from .session import Identity, NodeState, Session
from ._loopthread import LoopThread, caller_runs_gevent
from .agent import AgentServer
from .assembly import ASSEMBLE_TOPIC, ASSEMBLY_TIMEOUT_S, PORTS_BACK_WITHIN_S, DATA_PREAMBLE, Assembler, ConnectionInfo, DataListener
from .components.relay import RelayManager
from .meta import MetaChannel
from .rules import Rules

if TYPE_CHECKING:  # (prometheus_client is imported only when metrics are asked for)
    from .metrics import NodeMetrics

__all__ = [
    "Node",
    "NodeListener",
    "ConnectRefusedError",
    "LoopEndedError",
    "LOOP_MODES",
    "DEFAULT_LOOP",
    "CALL_GRACE_S",
    "STOP_TIMEOUT_S",
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
DEFAULT_FRONT_DOOR: Optional[str] = "127.0.0.1:0"
# The routed request a node answers with what it knows of its own paths (gridsock.topology).
PATHS_TOPIC = "gridsock.paths"
# No metrics endpoint unless asked for (``HOST:PORT`` or ``PORT``, on loopback: gridsock.metrics).
DEFAULT_METRICS: Optional[str] = None
_NO_MEMBERS: Mapping[str, Link] = types.MappingProxyType({})
# Where a node's gevent loop runs (see "Embedding" in docs/architecture.md): "thread", a thread
# of its own, so that its sockets work with blocking calls from any thread; "caller", the thread
# that makes the node (a gevent program: gridsock's CLI, the tests). None: "caller" if that
# thread already runs gevent (monkey-patched, or it has a hub), else "thread".
LOOP_MODES = ("thread", "caller")
DEFAULT_LOOP: Optional[str] = None
# A call from another thread waits this much longer than its own timeout for the node's thread
# to answer (a loaded machine), then gives up with TimeoutError.
CALL_GRACE_S = 10.0
# stop() from another thread waits at most this long for the node to stop, and as long again
# for its thread to end.
STOP_TIMEOUT_S = 10.0
# stop() waits at most this long for the rendez-vous node to take note that the node leaves
# cleanly (which frees its name at once): a round trip, milliseconds unless something is wrong.
LEAVE_TIMEOUT_S = 1.0

# Control operations served by modules of their own (``module:function``, called with the node
# and the operation's arguments), imported when first asked for.
CONTROL_OPS_ELSEWHERE: Mapping[str, str] = types.MappingProxyType({
    "netcheck": "gridsock.netcheck:control_netcheck",
    "topology": "gridsock.topology:control_topology",
    "forward": "gridsock.forward:control_forward",
    "expose": "gridsock.forward:control_expose",
})


def _refused(exc: ConnectError) -> ConnectError:
    """``exc`` as a ConnectRefusedError if the server refused (a code other than
    ``unreachable``, which says only that its side of a method failed), else ``exc``."""
    if isinstance(exc, ConnectRefusedError) or exc.code is None or exc.code == "unreachable":
        return exc
    refused = ConnectRefusedError(exc.args[0] if exc.args else "", exc.peer, exc.method, exc.tried, exc.code)
    return refused.with_traceback(exc.__traceback__)


def _check_args_elsewhere(checked: ControlArgs) -> None:
    """Check the arguments of an operation of :data:`CONTROL_OPS_ELSEWHERE` before its module
    sees them (ConfigError for a bad one), as that module's function documents them. (Null
    arguments are then left out: the module's defaults apply.)"""
    op = checked.op
    if op == "netcheck":
        checked.integer("pings", None, hi=2 ** 31)
    elif op == "topology":
        checked.number("timeout", None)
    elif op == "forward":
        checked.text("peer")
        checked.integer("port", lo=1, hi=65535)
        checked.text("bind", None)
        checked.integer("local_port", None, hi=65535)
        checked.text("stack", None, max_bytes=wire.MAX_STACK_BYTES)
        checked.number("timeout", None)
        checked.flag("once")
    elif op == "expose":
        checked.integer("port", lo=1, hi=65535)
        checked.integer("local_port", lo=1, hi=65535)
        checked.text("host", None)
        checked.flag("once")


def _control_op_elsewhere(op: str):
    import importlib

    target = CONTROL_OPS_ELSEWHERE.get(op)
    if target is None:
        return None
    module, _, function = target.partition(":")
    return getattr(importlib.import_module(module), function)


class Node:
    """One node of a session. ``start()``, then ``wait_joined()``; ``stop()`` when done.

    ``loop`` says which thread runs the node (:data:`LOOP_MODES`): ``"thread"``, one of its own,
    every public method then safe to call from any thread; ``"caller"``, the thread that makes
    it, inline (a gevent program). None (the default): ``"caller"`` if that thread already runs
    gevent, else ``"thread"``. ``state_dir`` is a directory private to this user where the node
    keeps its identity (:class:`~gridsock.session.NodeState`), so that it comes back with the
    same id, grid address and name after a restart (``gridsock node`` gives one by default:
    :func:`~gridsock.session.default_state_dir`); None: a new identity each time. Raises
    ConfigError for a bad name, address or ``loop``, or a state directory in use or of another
    session, LocalTrustError for a state directory that is not private.
    """

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
        front_door_options: Mapping[str, Any] | None = None,
        socks_gateway: str | None = None,
        loop: str | None = DEFAULT_LOOP,
        state_dir: str | None = None,
    ) -> None:
        if loop is None:
            loop = "caller" if caller_runs_gevent() else "thread"
        if loop not in LOOP_MODES:
            raise ConfigError(f"loop must be one of {', '.join(LOOP_MODES)}, not {loop!r}")
        if loop == "thread" and gevent.monkey.is_module_patched("threading"):
            raise ConfigError("gevent patched threading (its threads are greenlets): run the node with loop='caller'")
        self.loop = loop
        # The node's own thread ("thread" mode), where everything below is made and runs.
        self._thread: Optional[LoopThread] = None
        self._handed_bridges: "weakref.WeakSet[Any]" = weakref.WeakSet()
        if loop == "caller":
            self._setup(session, name, cluster, leader, listen_address, advertise, ssh_gateway, control, agent,
                        identity, rules, ssh_key, ssh_known_hosts, metrics, front_door, front_door_options, socks_gateway,
                        state_dir)
            return
        self._thread = LoopThread(f"gridsock-node-{name}", on_exit=[self._close_bridges])
        try:
            self._thread.call(None, self._setup, session, name, cluster, leader, listen_address, advertise, ssh_gateway,
                              control, agent, identity, rules, ssh_key, ssh_known_hosts, metrics, front_door, front_door_options, socks_gateway,
                              state_dir)
        except BaseException:
            self._thread.end(timeout=STOP_TIMEOUT_S)
            raise

    def _setup(self, session: Session, name: str, cluster: str | None, leader: str | None,
               listen_address: str | None, advertise: str | None, ssh_gateway, control: str | None,
               agent: str | None, identity: Identity | None, rules: Rules | None, ssh_key: str | None,
               ssh_known_hosts: str | None, metrics: str | None, front_door: str | None,
               front_door_options: Mapping[str, Any] | None = None, socks_gateway: str | None = None,
               state_dir: str | None = None) -> None:
        """What ``__init__`` makes, in the thread the node runs in (its gevent objects are that
        thread's hub's)."""
        if state_dir is not None and identity is not None:
            raise ConfigError("give a node an identity or a state directory, not both")
        try:
            wire.check_name(name, "node name")
            if cluster is not None:
                wire.check_name(cluster, "cluster name")
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if name == RENDEZVOUS_NAME:
            raise ConfigError(f"the node name {RENDEZVOUS_NAME!r} is reserved for the rendez-vous node")
        if session.cluster is not None:  # a cluster's session file: its node is a node of that cluster
            if cluster not in (None, session.cluster):
                raise ConfigError(f"{session.path} is the session file of cluster {session.cluster}: a node of cluster"
                                  f" {cluster} joins with cluster {cluster}'s (docs/security.md)")
            cluster = session.cluster
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
        # A SOCKS5 proxy out of this node's network (gridsock.rules.own_gateways), HOST:PORT.
        socks = parse_address(socks_gateway, default_port=1080) if socks_gateway else None
        if socks is not None and socks.is_unix:
            raise ConfigError("a SOCKS gateway is HOST:PORT, not a Unix socket")
        self.socks_gateway = str(socks) if socks is not None else None
        self.started_at: Optional[float] = None
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
                                         send_up=lambda message: self._uplink.send(message),
                                         wait_joined=lambda timeout: self._uplink.joined.wait(timeout))
        self.router = Router(self, up=lambda: self.uplink, down=self._leader.link_for if self._leader else None,
                             on_bulk=lambda src, payload: self.relay.on_message(src, payload))
        self._uplink = Uplink(self, on_routed=self.router.route,
                              members=self._leader.entries if self._leader else list)
        self._node_port = NodePort(
            self, self.listen_address, leader=self._leader, data_first_byte=DATA_PREAMBLE[:1],
            wait_joined=lambda timeout: self._uplink.joined.wait(timeout),
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
        if self._leader is not None:
            self.router.handlers[REFUSED_TOPIC] = self._leader.on_refused
        self._front_door_address = parse_address(front_door) if front_door else None
        self._front_door: Any = None  # a gridsock.frontdoor.FrontDoor once started
        self._front_door_options = dict(front_door_options or {})  # its keywords (users, pass_through, ...)
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
        # The state directory (last: nothing after it can fail and leave its lock taken).
        self.state: Optional[NodeState] = None
        self._ports_back: list = []  # grid ports served before a restart (from the state directory)
        if state_dir is not None:
            self._open_state(state_dir)

    def _open_state(self, state_dir: str) -> None:
        """Take the state directory: the identity (TLS) or the node id (plain TCP) saved there
        becomes this node's; the uplink saves the identity there once enrolled. Raises
        ConfigError (in use, of another session, a bad file), LocalTrustError or OSError."""
        state = NodeState(state_dir, self.session).open()
        try:
            if self.session.tls:
                self.identity = state.load_identity()
                if self.identity is not None and self.session.cluster not in (None, self.identity.cluster):
                    log.warning("node %s: the identity in %s (node %s) does not name cluster %s, whose session file it"
                                " was given: it enrolls again (a new id)", self.name, state.path,
                                self.identity.node_id, self.session.cluster)
                    self.identity = None
                self.node_id = self.identity.node_id if self.identity is not None else None
            else:
                saved = state.load_node_id()
                if saved is not None:
                    self.node_id = saved
                else:
                    assert self.node_id is not None  # (chosen above, plain TCP)
                    state.save_node_id(self.node_id)
        except BaseException:
            state.close()
            raise
        self.state = state
        self._ports_back = state.load_ports()
        self.assembler.on_ports = state.save_ports
        log.info("node %s keeps its identity in %s%s", self.name, state.path,
                 f" (node {self.node_id})" if self.node_id else " (not enrolled yet)")

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

    # --- the node's thread --------------------------------------------------------------------

    def _elsewhere(self) -> bool:
        """True when called from a thread other than the node's own (``loop="thread"`` only)."""
        return self._thread is not None and not self._thread.is_current()

    def _in_node_thread(self, wait: Optional[float], fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)`` run in the node's thread, for a caller in another thread;
        the caller waits at most ``wait`` seconds (None: until it returns or the node stops)."""
        assert self._thread is not None
        return self._thread.call(wait, fn, *args, **kwargs)

    def call(self, fn: Callable[..., Any], *args: Any, timeout: Optional[float] = None, **kwargs: Any) -> Any:
        """Run ``fn(*args, **kwargs)`` in the node's thread (inline if already there) and return
        what it returns; for code that uses the framework's streams and greenlets.

        Raises what ``fn`` raised; TimeoutError after ``timeout`` seconds (the call is then
        killed); LoopEndedError if the node's thread ended first.
        """
        if self._elsewhere():
            return self._in_node_thread(timeout, fn, *args, **kwargs)
        return fn(*args, **kwargs)

    def _close_bridges(self) -> None:
        """The node's thread ends: nothing will pump the bridged sockets it handed out, so each
        is reset (their programs read what was delivered, then ECONNRESET) rather than left hanging."""
        for bridge in list(self._handed_bridges):
            bridge.close()

    def _handed(self, sock, info: ConnectionInfo):
        """Keep the bridge of a socket handed out from the node's thread, to end it with the thread."""
        bridge = info.detail.get("bridge")
        if bridge is not None and self._thread is not None:
            self._handed_bridges.add(bridge)
        return sock, info

    # --- life cycle --------------------------------------------------------------------------

    def start(self) -> "Node":
        """Open the node port (and the control, agent, metrics and front-door sockets asked
        for), start linking; return the node. Raises OSError if a port is taken."""
        if self._elsewhere():
            self._in_node_thread(None, self.start)
            _running_nodes.add(self)
            return self
        if self._ports_back:  # (served before a restart: their programs' listeners come back)
            self.assembler.expect_back(self._ports_back)
            log.info("node %s: requests for grid ports %s wait up to %g s for them to be served again", self.name,
                     ", ".join(map(str, self._ports_back)), PORTS_BACK_WITHIN_S)
        try:
            if self._metrics is not None and self._metrics_address is not None:
                self._metrics.serve(self._metrics_address)  # first: a port in use fails before anything runs
            # The local sockets before the node port: a run directory refused (another user's)
            # fails here with nothing of the node's open to the network.
            if self._control_path:
                self._control = ControlServer(self._control_path, self._control_op).start()
            if self._agent_path:
                self._agent = AgentServer(self, self._agent_path).start()
            self._node_port.open()
            if self._front_door_address is not None:
                from .frontdoor import FrontDoor

                self._front_door = FrontDoor(self, self._front_door_address, **self._front_door_options).start()
        except BaseException:
            self._stop()  # what did open closes again
            raise
        self.started_at = time.time()
        self._greenlets = [gevent.spawn(self._node_port.serve), gevent.spawn(self._uplink.serve)]
        log.info("node %s (%s) started; node port %s", self.name, self.role, self.address)
        return self

    def stop(self) -> None:
        """Stop the node: close its links, ports and sockets; end its thread (``loop="thread"``)
        and join it, at most ``STOP_TIMEOUT_S`` twice over. Idempotent, from any thread.

        Bridged sockets the node handed out are reset when its thread ends (nothing would pump
        them any more); a plain ``tcp`` connection is the program's own and stays open.
        """
        thread = self._thread
        if thread is None:
            self._stop()
            return
        _running_nodes.discard(self)
        if thread.is_current():  # (a handler of this node stops it)
            self._stop()
            thread.end()
            return
        if thread.alive:
            try:
                thread.call(STOP_TIMEOUT_S, self._stop)
            except LoopEndedError:
                pass
            except TimeoutError:
                log.warning("node %s did not stop within %g s; ending its thread", self.name, STOP_TIMEOUT_S)
        if not thread.end(timeout=STOP_TIMEOUT_S):
            log.warning("the thread of node %s did not end within %g s", self.name, STOP_TIMEOUT_S)

    def _leave(self) -> None:
        """Tell the rendez-vous node this node stops cleanly (its name is free once it is gone);
        bounded by LEAVE_TIMEOUT_S, and skipped when the uplink is down."""
        if not self.joined or self._stopped.is_set():
            return
        try:
            self.router.request(RENDEZVOUS_NAME, LEAVE_TOPIC, b"", timeout=LEAVE_TIMEOUT_S)
        except (RoutingError, TimeoutError) as exc:  # (an older rendez-vous node has no such service)
            log.info("node %s: the rendez-vous node did not take note of its leaving: %s", self.name, exc)

    def _stop(self) -> None:
        self._leave()
        self._stopped.set()
        for g in self._greenlets:
            g.kill(block=False)
        if self._metrics is not None:
            self._metrics.stop()
        self.meta.close_all()
        self.relay.reset_peers(None, "node stopping")
        self.assembler.close()  # (no more sweeps of its connection table, no more waiting arrivals)
        if "gridsock.components.resume" in sys.modules:  # (loaded by the first resumable connection)
            sys.modules["gridsock.components.resume"].reset_all(self, "node stopping")
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
        if self.state is not None:
            self.state.close()

    def wait_joined(self, timeout: float | None = None) -> bool:
        """Wait until the uplink is up for the first time; False on timeout.

        Raises the fatal error if the node was refused for good (bad token, ...).
        """
        if self._elsewhere():
            return bool(self._in_node_thread(_grace(timeout), self.wait_joined, timeout))
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
        """Run until ``stop()`` (from any thread); raise the fatal error if the node is refused
        for good."""
        if self._elsewhere():
            assert self._thread is not None
            while not self._thread.wait_finished(0.5):
                if self.fatal_error is not None:
                    raise self.fatal_error
            return
        while not self._stopped.wait(0.5):
            if self.fatal_error is not None:
                raise self.fatal_error

    # --- messages ----------------------------------------------------------------------------

    def handle(self, topic: str, handler: Handler) -> None:
        """Call ``handler(delivery)`` for messages and requests on ``topic``.

        For a request, the bytes it returns are the reply (None: empty); an exception becomes
        an error reply carrying ``str(exc)``. The handler runs in the node's thread (a greenlet
        of its hub): it must not block that thread (no blocking call on a socket this node
        handed out, no ``time.sleep``); a handler that must wait on something else can hand
        the work to a thread of its own and return later with ``send()``.
        """
        if self._elsewhere():
            self._in_node_thread(None, self.handle, topic, handler)
            return
        self.router.handle(topic, handler)

    def send(self, dst: str, topic: str, payload: bytes = b"") -> None:
        """Send a one-way message to node ``dst`` (id or name). Raises RoutingError if no route."""
        if self._elsewhere():
            self._in_node_thread(None, self.send, dst, topic, payload)
            return
        self.router.send(dst, topic, payload)

    def request(self, dst: str, topic: str, payload: bytes = b"", *, timeout: float = REQUEST_TIMEOUT_S) -> Delivery:
        """Send a request to ``dst`` and return its reply.

        Raises RoutingError if it cannot be delivered or the handler failed, TimeoutError if no
        reply comes within ``timeout`` seconds.
        """
        if self._elsewhere():
            return self._in_node_thread(_grace(timeout), self.request, dst, topic, payload, timeout=timeout)
        return self.router.request(dst, topic, payload, timeout=timeout)

    def ping(self, dst: str, *, timeout: float = REQUEST_TIMEOUT_S) -> PingResult:
        """Round trip to ``dst`` over the bootstrap channel; the routes taken both ways."""
        if self._elsewhere():
            return self._in_node_thread(_grace(timeout), self.ping, dst, timeout=timeout)
        return self.router.ping(dst, timeout=timeout)

    def listen(self, port: int) -> "DataListener | NodeListener":
        """Serve grid port ``port``: ``accept()`` on the result gives ``(socket, info)``.

        Raises ConfigError if the port is taken or invalid. From a thread other than the
        node's, the result is a :class:`NodeListener`, whose ``accept()`` works from any thread.
        """
        if self._elsewhere():
            return NodeListener(self, self._in_node_thread(None, self.assembler.listen, port))
        return self.assembler.listen(port)

    def connect(self, peer: str, port: int, *, stack=None, timeout: float | None = None,
                tcp_bridge: bool = False) -> Tuple[Any, ConnectionInfo]:
        """Connect to grid port ``port`` of node ``peer`` (name or id); return ``(socket, info)``.

        The socket is a real OS socket: with ``loop="thread"`` it works with blocking calls,
        ``select``, asyncio or gevent, from any thread. ``stack`` (a stack string) overrides the
        rules; ``tcp_bridge`` makes a bridged socket a loopback TCP one rather than a Unix one.
        Raises ConnectRefusedError (a ConnectError) when the server refused (``.code``:
        ``refused`` when nothing listens on the port), ConnectError with the reasons when no
        method could make the connection.
        """
        if self._elsewhere():
            wait = _grace(ASSEMBLY_TIMEOUT_S if timeout is None else timeout)
            return self._in_node_thread(wait, self.connect, peer, port, stack=stack,
                                        timeout=timeout, tcp_bridge=tcp_bridge)
        kwargs = {} if timeout is None else {"timeout": timeout}
        try:
            if self._metrics is not None:
                sock, info = self._metrics.observe_connect(self.assembler.connect, peer, port, stack=stack,
                                                           tcp_bridge=tcp_bridge, **kwargs)
            else:
                sock, info = self.assembler.connect(peer, port, stack=stack, tcp_bridge=tcp_bridge, **kwargs)
        except ConnectError as exc:
            refused = _refused(exc)
            if refused is exc:
                raise
            raise refused from exc.__cause__
        return self._handed(sock, info)

    def open_stream(self, peer: str, port: int, *, stack=None, timeout: float | None = None):
        """Like connect(), but return the framework's Stream instead of a socket.

        A Stream lives in the node's thread: call this there (a handler, :meth:`call`); from
        another thread it raises GridsockError (use :meth:`connect`).
        """
        if self._elsewhere():
            raise GridsockError(f"open_stream() from outside the thread of node {self.name}: a Stream is used "
                                "in the node's thread only (Node.call), a socket anywhere (Node.connect)")
        kwargs = {} if timeout is None else {"timeout": timeout}
        try:
            if self._metrics is not None:
                return self._metrics.observe_connect(self.assembler.open_stream, peer, port, stack=stack, **kwargs)
            return self.assembler.open_stream(peer, port, stack=stack, **kwargs)
        except ConnectError as exc:
            refused = _refused(exc)
            if refused is exc:
                raise
            raise refused from exc.__cause__

    def meta_request(self, dst: str, topic: str, payload: bytes = b"", *, timeout: float = REQUEST_TIMEOUT_S):
        """A request over the meta channel: the direct meta link if it is up, else bootstrap.

        A link not yet up is opened beside the request (which does not wait for it: first
        contact costs the bootstrap channel's round trip); later requests take the link."""
        if self._elsewhere():
            return self._in_node_thread(_grace(timeout), self.meta_request, dst, topic, payload, timeout=timeout)
        entry = self.directory.resolve(dst)
        link = self.meta.link_for(entry.node_id, wait=False) if entry is not None else None
        reply = None
        if entry is not None and link is not None:
            reply = self.router.request_on(link, entry, topic, payload, timeout=timeout, dst_label=dst)
        if reply is None:  # no meta link (yet), or it closed under us
            self.meta.counters["on_bootstrap"] += 1
            return self.request(dst, topic, payload, timeout=timeout)
        self.meta.counters["on_link"] += 1
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
        """What the node knows and does, as JSON (``gridsock status``; docs/status.md)."""
        if self._elsewhere():
            return self._in_node_thread(None, self.status)
        directory = self.directory.status()  # (at most STATUS_MAX_BYTES of it: a reply fits in a frame)
        shown = {e["node_id"] for e in directory["directory"]}
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
            **directory,
            "state_dir": str(self.state.path) if self.state is not None else None,
            "routes": {node_id: route for node_id, route in self.router.routes().items() if node_id in shown},
            "links": links,
            "uplink_history": self.uplink_history,
            "connections": self.assembler.status(),
            "paths": self.assembler.paths(),
            "assembly": dict(self.assembler.counters),
            "flood_guard": self.router.guard.status(),
            "routed_queue": {"queued_bytes": PROCESS_BUDGET.queued_bytes, "peak_bytes": PROCESS_BUDGET.peak_bytes,
                             "limit_bytes": PROCESS_BUDGET.limit_bytes},
            "meta_links": self.meta.status(),
            "listening": sorted(self.assembler.listeners),
            "front_door": str(self._front_door.address) if self._front_door is not None else None,
            "started_at": self.started_at,
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
        """Serve control operation ``op``; its arguments are checked first (ControlArgs: a bad
        one is a ConfigError, answered to the client and not logged)."""
        checked = ControlArgs(op, args)
        if op == "status":
            return self.status()
        if op == "ping":
            dst = checked.text("dst")
            return self.ping(dst, timeout=checked.number("timeout", REQUEST_TIMEOUT_S)).to_json()
        if op == "wait":
            return self.wait_directory(present=checked.texts("present"), absent=checked.texts("absent"),
                                       settled=checked.flag("settled"),
                                       timeout=checked.number("timeout", REQUEST_TIMEOUT_S))
        if op == "echo":
            from .diag import serve_echo

            port = checked.integer("port", 0, hi=65535)
            serve_echo(self, port, abort_after=checked.integer("abort_after", None, hi=2 ** 62))
            return {"port": port}
        if op == "transfer":
            from .diag import transfer

            return transfer(self, checked.text("dst"), checked.integer("port", lo=1, hi=65535),
                            checked.integer("bytes", hi=2 ** 62), stack=checked.text("stack", None, max_bytes=wire.MAX_STACK_BYTES),
                            timeout=checked.number("timeout", None))
        handler = _control_op_elsewhere(op)
        if handler is not None:
            _check_args_elsewhere(checked)
            return handler(self, {key: value for key, value in args.items() if value is not None})
        known = ", ".join(["status", "ping", "wait", "echo", "transfer", *CONTROL_OPS_ELSEWHERE])
        raise ConfigError(f"unknown control operation {op!r} (a node knows: {known})")

    def wait_directory(self, *, present=(), absent=(), settled: bool = False,
                       timeout: float = REQUEST_TIMEOUT_S) -> list:
        """Wait until the directory holds every name in ``present`` and none in ``absent``.

        With ``settled``, also until every entry has a dial-back verdict (``inbound`` not None).
        Returns the directory (as JSON); raises RoutingError after ``timeout`` seconds.
        """
        if self._elsewhere():
            return self._in_node_thread(_grace(timeout), self.wait_directory,
                                        present=present, absent=absent, settled=settled, timeout=timeout)
        deadline = time.monotonic() + timeout
        while True:
            names = {e.name for e in self.directory}
            unsettled = settled and any(e.inbound is None for e in self.directory)
            if names >= set(present) and not names & set(absent) and not unsettled:
                return self.directory.to_json(STATUS_MAX_BYTES)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RoutingError(f"after {timeout:.1f} s the directory of {self.name} holds {sorted(names)}; "
                                   f"wanted {sorted(present)} present and {sorted(absent)} absent")
            self.directory.wait_changed(remaining)


class NodeListener:
    """A grid port of a node with its own thread, for callers in other threads: ``accept()``
    runs in the node's thread and returns a socket that works anywhere (from the node's own
    thread it is the DataListener's accept, inline)."""

    def __init__(self, node: Node, listener: DataListener) -> None:
        self.node = node
        self.listener = listener
        self.port = listener.port

    def __repr__(self) -> str:
        return f"<NodeListener {self.node.name}:{self.port}>"

    @property
    def closed(self) -> bool:
        return self.listener.closed

    def accept(self, timeout: float | None = None, *, tcp_bridge: bool = False) -> Tuple[Any, ConnectionInfo]:
        """Return ``(socket, info)`` for the next connection; raise TimeoutError after
        ``timeout`` seconds, ConnectError if the listener is closed, LoopEndedError if the node
        stopped."""
        def accept() -> Tuple[Any, ConnectionInfo]:
            sock, info = self.listener.accept(timeout, tcp_bridge=tcp_bridge)
            return self.node._handed(sock, info)

        return self.node.call(accept, timeout=_grace(timeout))

    def close(self) -> None:
        """Stop serving the port (connections not yet accepted are closed)."""
        try:
            self.node.call(self.listener.close)
        except LoopEndedError:
            pass  # (the node stopped: nothing is served any more)

    def __enter__(self) -> "NodeListener":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _grace(timeout: Optional[float]) -> Optional[float]:
    """How long a caller in another thread waits for a call that has ``timeout`` of its own."""
    return None if timeout is None else timeout + CALL_GRACE_S


# Nodes with a thread of their own that are running: stopped when the interpreter exits, so that
# their sockets, control and agent files are closed in order (bounded: STOP_TIMEOUT_S each).
_running_nodes: "weakref.WeakSet[Node]" = weakref.WeakSet()


@atexit.register
def _stop_running_nodes() -> None:
    for node in list(_running_nodes):
        try:
            node.stop()
        except Exception:
            log.exception("stopping node %s at exit", node.name)
