"""Prometheus metrics of a node and of the rendez-vous node, served over HTTP.

Theory of operation
-------------------
Metrics are off unless asked for (``gridsock node --metrics ADDR``, ``Node(metrics=ADDR)``,
the same for the rendez-vous node); ``ADDR`` is ``HOST:PORT`` or a bare ``PORT`` (on
``127.0.0.1``: loopback unless told otherwise). Each node has its own ``CollectorRegistry``
(several nodes share a process in tests and in ``gridsock demo``), served by a gevent WSGI
server in the node's hub: a scrape runs in a greenlet, so it reads the node's state with no
lock and never blocks the hub. (prometheus_client's ``start_http_server`` would read that
state from a thread of its own, while the hub changes it.)

Most figures are read from what the code keeps anyway, when Prometheus scrapes (a custom
collector, which runs first): the assembler's server counters, the router's message counters,
links, the directory. What the code does not keep is counted here:

- on the client, every ``Node.connect``/``Node.open_stream`` outcome (:meth:`NodeMetrics.observe_connect`):
  the connection by method and stack, or the failure by reason, and each raced candidate's fate;
  the new connection's byte counters (its bridge's :class:`~gridsock.bridge.BridgeStats`, or a
  relayed stream's own) are followed from then on, so its bytes are exact (a stream bridged
  later, as the agent does for ``gridsock run``, from the next sample on);
- on the server, refusals as the assembly requests are answered, and each connection as the
  assembler records it (its ``on_record`` hook): exact, however short it lives. Its bytes are
  followed from its bridge or its relayed stream once it has one (the bridge is made when the
  application accepts it), read at each scrape; a connection ended before any scrape still
  counts, since what it moved stays on its bridge.

Not seen: the bytes of a plain ``tcp`` connection handed to the application as the kernel
socket itself (the framework is not on its data path), and those of a stream from
``open_stream``/``accept_stream`` with filters (no layer counts them; a relayed one's are in
``gridsock_relay_bytes_total``).

Metrics of a node (names and units after Prometheus' conventions):

=============================================  =======  ======================================
name                                           type     labels: meaning
=============================================  =======  ======================================
gridsock_data_connections_opened_total         counter  method, stack, side (client/server):
                                                        data connections made
gridsock_connect_failures_total                counter  reason: connects that failed here, by
                                                        the server's refusal code
                                                        (:data:`gridsock.wire.REFUSAL_CODES`),
                                                        ``timeout`` or ``unreachable``
gridsock_race_candidates_total                 counter  method, outcome (won/failed/cancelled):
                                                        candidates of the client's races
gridsock_assembly_refusals_total               counter  reason: assembly requests this node
                                                        refused as the server
gridsock_assembly_server_connections_total     counter  outcome (delivered/not_taken): method
                                                        connections on the server
                                                        (``Assembler.counters``)
gridsock_data_bytes_total                      counter  direction (sent/received): bytes of
                                                        bridged and relayed data connections
gridsock_relay_bytes_total                     counter  direction: data bytes of relayed
                                                        connections (over the bootstrap channel)
gridsock_relay_connections                     gauge    relayed connections open
gridsock_routed_messages_total                 counter  action (originated/forwarded/delivered/
                                                        dropped): routed messages
gridsock_uplink_up                             gauge    1 while the uplink is up
gridsock_member_links                          gauge    a leader's member links
gridsock_meta_links                            gauge    open meta links
gridsock_directory_nodes                       gauge    nodes in the directory
=============================================  =======  ======================================

The rendez-vous node serves ``gridsock_leader_links`` (gauge), ``gridsock_directory_nodes``
and ``gridsock_routed_messages_total`` (action forwarded/delivered/dropped).
"""
from __future__ import annotations

import logging
import socket
from typing import Any, Dict, Iterator, List, Optional, Tuple

import gevent
import gevent.pywsgi
from gevent import socket as gsocket
from prometheus_client import CollectorRegistry, Counter, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .bootstrap.transport import Address, parse_address
from .errors import ConfigError, ConnectError

__all__ = [
    "METRICS_SETTLE_AT",
    "DEFAULT_METRICS_HOST",
    "parse_metrics_address",
    "MetricsServer",
    "NodeMetrics",
    "RendezvousMetrics",
    "failure_reason",
]

log = logging.getLogger(__name__)

# Connections and byte sources held between two scrapes before they are settled without one
# (bounds the memory of a node whose endpoint nobody scrapes).
METRICS_SETTLE_AT = 1024
# A metrics address without a host listens here: loopback, unless the operator says otherwise.
DEFAULT_METRICS_HOST = "127.0.0.1"
# Scrapes waiting to be accepted: Prometheus scrapes one at a time, people with curl a few more.
METRICS_BACKLOG = 16


def parse_metrics_address(text: str) -> Address:
    """``HOST:PORT`` or ``PORT`` (on ``DEFAULT_METRICS_HOST``) as an Address; ConfigError else."""
    text = str(text)
    if text.isdigit():
        text = f"{DEFAULT_METRICS_HOST}:{text}"
    elif text.startswith(":"):
        text = DEFAULT_METRICS_HOST + text
    address = parse_address(text)
    if address.path is not None or address.host is None or address.port is None:
        raise ConfigError(f"bad metrics address {text!r}: expected HOST:PORT or PORT")
    return address


class MetricsServer:
    """Serves ``registry`` in Prometheus' text format over HTTP, in the gevent hub."""

    def __init__(self, registry: CollectorRegistry, address: Address) -> None:
        self._wanted = address
        self._app = make_wsgi_app(registry)
        self._server: Optional[gevent.pywsgi.WSGIServer] = None

    def start(self) -> "MetricsServer":
        """Bind and serve; ConfigError if the address cannot be bound (in use, not ours...)."""
        host, port = self._wanted.host or DEFAULT_METRICS_HOST, self._wanted.port or 0
        sock = None
        try:
            family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
            sock = gsocket.socket(family, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.listen(METRICS_BACKLOG)
        except OSError as exc:
            if sock is not None:
                sock.close()
            raise ConfigError(f"cannot serve metrics on {self._wanted}: {exc.strerror or exc}") from exc
        self._server = gevent.pywsgi.WSGIServer(sock, self._app, log=None, error_log=log)
        self._server.start()
        return self

    @property
    def address(self) -> Address:
        """The bound address (the real port when 0 was asked for)."""
        assert self._server is not None, "not started"
        bound = self._server.address  # (host, port) once started
        assert isinstance(bound, tuple)
        return Address(host=str(bound[0]), port=int(bound[1]))

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop(timeout=1)


def failure_reason(exc: ConnectError) -> str:
    """The label of a failed connect: the server's refusal code, ``timeout`` or ``unreachable``."""
    if exc.code is not None:
        return str(exc.code)
    return "timeout" if isinstance(exc, TimeoutError) else "unreachable"


def _method_of(stack: str) -> str:
    """The method (bottom layer) of a stack string, without its parameters."""
    return stack.rsplit("/", 1)[-1].split("(", 1)[0]


def _byte_counts(source: Any) -> Tuple[int, int]:
    """(sent, received) of a bridge or a stream that counts its bytes."""
    stats = getattr(source, "stats", None)
    if stats is not None:  # a Bridge: to the stream is what the node sends
        return int(stats.bytes_to_stream), int(stats.bytes_from_stream)
    return int(source.bytes_sent), int(source.bytes_received)


def _ended(source: Any) -> bool:
    stats = getattr(source, "stats", None)
    if stats is not None:
        return not stats.open
    return bool(getattr(source, "closed", False) or getattr(source, "_closed", False))


class _ByteTracker:
    """Totals of byte counters that live on objects which come and go (bridges, streams).

    Each object is held from the first ``update`` that sees it until it has ended and its last
    counts are taken, so what it moved is counted exactly once.
    """

    def __init__(self) -> None:
        self.sent = 0
        self.received = 0
        self._followed: Dict[Any, Tuple[Any, int, int]] = {}  # key -> (object, sent, received so far)

    def __len__(self) -> int:
        return len(self._followed)

    def follow(self, key: Any, source: Any) -> None:
        """Count what ``source`` moves (from 0) until it ends; a key is followed once."""
        if key not in self._followed:
            self._followed[key] = (source, 0, 0)

    def update(self) -> None:
        """Add what each followed object moved since the last update; let go of the ended."""
        for key, (source, sent, received) in list(self._followed.items()):
            now_sent, now_received = _byte_counts(source)
            self.sent += now_sent - sent
            self.received += now_received - received
            if _ended(source):
                del self._followed[key]
            else:
                self._followed[key] = (source, now_sent, now_received)


class NodeMetrics:
    """The metrics of one :class:`~gridsock.node.Node` (see the module docstring)."""

    def __init__(self, node: Any) -> None:
        self.node = node
        self.registry = CollectorRegistry(auto_describe=False)
        # First: a scrape runs the collectors in this order, and this one samples for the others.
        self.registry.register(_NodeCollector(self))
        self.connections_opened = Counter("gridsock_data_connections_opened", "Data connections made",
                                          ["method", "stack", "side"], registry=self.registry)
        self.connect_failures = Counter("gridsock_connect_failures", "Connects that failed, by reason",
                                        ["reason"], registry=self.registry)
        self.race_candidates = Counter("gridsock_race_candidates", "Candidates of the client's races, by outcome",
                                       ["method", "outcome"], registry=self.registry)
        self.refusals = Counter("gridsock_assembly_refusals", "Assembly requests refused as the server, by reason",
                                ["reason"], registry=self.registry)
        self._unbridged: Dict[int, Any] = {}  # connections nothing counts yet (no bridge), by id
        self._data_bytes = _ByteTracker()
        self._relay_bytes = _ByteTracker()
        self._server: Optional[MetricsServer] = None
        node.assembler.on_record.append(self._on_record)

    # --- counted as it happens ------------------------------------------------------------

    def observe_connect(self, connect: Any, *args: Any, **kwargs: Any) -> Any:
        """Call ``connect(*args, **kwargs)`` (a connect of the assembler) and count its outcome.

        Returns what it returns, raises what it raises.
        """
        try:
            result = connect(*args, **kwargs)
        except ConnectError as exc:
            self.connect_failures.labels(reason=failure_reason(exc)).inc()
            self._count_tried(exc.tried or [])
            raise
        info = result[1]
        if not self._follow_bytes(info.conn, info.detail.get("stream")):
            self._unbridged[info.conn] = info  # a stream the caller may bridge (the agent does)
        self._follow_relays()  # (the relayed stream under its filters, if it is one)
        self.connections_opened.labels(method=_method_of(info.stack), stack=info.stack, side="client").inc()
        self.race_candidates.labels(method=_method_of(info.stack), outcome="won").inc()
        self._count_tried(info.detail.get("tried", []))
        return result

    def _count_tried(self, tried: List[Tuple[str, str]]) -> None:
        for stack, why in tried:
            outcome = "cancelled" if str(why).startswith("cancelled") else "failed"
            self.race_candidates.labels(method=_method_of(str(stack)), outcome=outcome).inc()

    def observe_refusal(self, reply: bytes) -> bytes:
        """Count the refusal in ``reply`` (an encoded assembly answer), if it is one; return it."""
        from . import wire

        try:
            answer = wire.decode_assembly(reply)
        except Exception:  # (our own encoding: only a bug lands here, and it must not hide the reply)
            return reply
        if isinstance(answer, wire.AssemblyRefuse):
            self.refusals.labels(reason=answer.code).inc()
        return reply

    def _on_record(self, info: Any) -> None:
        """The assembler recorded a connection (either side; the client's is counted by
        :meth:`observe_connect`, with its race)."""
        if not info.initiator:
            self.connections_opened.labels(method=_method_of(info.stack), stack=info.stack, side="server").inc()
            self._unbridged[info.conn] = info
        self._follow_relays()
        if len(self._unbridged) + len(self._data_bytes) + len(self._relay_bytes) > METRICS_SETTLE_AT:
            self.sample()  # nobody scrapes: settle what has ended, so memory stays bounded

    # --- read at each scrape ----------------------------------------------------------------

    def _follow_bytes(self, conn: int, stream: Any, bridges: Optional[Dict[int, Any]] = None,
                      bridge: Any = None) -> bool:
        """Follow the bytes of connection ``conn`` if something counts them: its bridge, or
        its stream (relayed, no filter). Returns False if nothing does (yet)."""
        source = bridge
        if source is None:
            if bridges is None:
                from .bridge import active_bridges

                bridges = {id(b.stream): b for b in active_bridges()}
            source = bridges.get(id(stream))
        if source is None and hasattr(stream, "bytes_sent"):
            source = stream
        if source is None:
            return False
        self._data_bytes.follow(conn, source)
        return True

    def sample(self) -> None:
        """Take the bytes moved since the last sample (at each scrape)."""
        from .bridge import active_bridges

        if self._unbridged:
            bridges = {id(b.stream): b for b in active_bridges()}
            for conn, info in list(self._unbridged.items()):
                # Its bridge is made when the application accepts it (and stays on the record
                # after it ends); a stream that ended with none moved nothing we can count.
                stream = info.detail.get("stream")
                if self._follow_bytes(conn, stream, bridges, info.detail.get("bridge")) or _ended(stream):
                    del self._unbridged[conn]
        self._data_bytes.update()
        self._follow_relays()
        self._relay_bytes.update()

    def _follow_relays(self) -> None:
        for stream in list(getattr(self.node.relay, "_streams", {}).values()):
            self._relay_bytes.follow(stream, stream)

    # --- serving ----------------------------------------------------------------------------

    def serve(self, address: Address) -> MetricsServer:
        """Start the HTTP endpoint; ConfigError if ``address`` cannot be bound."""
        self._server = MetricsServer(self.registry, address).start()
        log.info("metrics of %s on http://%s/metrics", self.node.name, self._server.address)
        return self._server

    @property
    def address(self) -> Optional[Address]:
        return self._server.address if self._server is not None else None

    def stop(self) -> None:
        self.node.assembler.on_record[:] = [f for f in self.node.assembler.on_record if f != self._on_record]
        if self._server is not None:
            self._server.stop()


class _NodeCollector(Collector):
    """What a node keeps anyway, read at each scrape."""

    def __init__(self, metrics: NodeMetrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        metrics = self._metrics
        node = metrics.node
        metrics.sample()
        server = CounterMetricFamily("gridsock_assembly_server_connections",
                                     "Method connections on the server side, by outcome", labels=["outcome"])
        for outcome, count in sorted(node.assembler.counters.items()):
            server.add_metric([outcome], count)
        yield server
        data = CounterMetricFamily("gridsock_data_bytes", "Bytes of bridged and relayed data connections",
                                   labels=["direction"], unit="bytes")
        data.add_metric(["sent"], metrics._data_bytes.sent)
        data.add_metric(["received"], metrics._data_bytes.received)
        yield data
        relay = CounterMetricFamily("gridsock_relay_bytes", "Data bytes of relayed connections",
                                    labels=["direction"], unit="bytes")
        relay.add_metric(["sent"], metrics._relay_bytes.sent)
        relay.add_metric(["received"], metrics._relay_bytes.received)
        yield relay
        yield GaugeMetricFamily("gridsock_relay_connections", "Relayed connections open", value=len(node.relay))
        yield _routed(node.router.counters)
        uplink = node.uplink
        yield GaugeMetricFamily("gridsock_uplink_up", "1 while the uplink is up",
                                value=1 if uplink is not None and not uplink.closed else 0)
        yield GaugeMetricFamily("gridsock_member_links", "A leader's member links", value=len(node.members))
        yield GaugeMetricFamily("gridsock_meta_links", "Open meta links",
                                value=sum(1 for link in list(node.meta.links.values()) if not link.closed))
        yield GaugeMetricFamily("gridsock_directory_nodes", "Nodes in the directory", value=len(node.directory))
        yield from _guard(node.router.guard)


def _guard(guard: Any) -> Iterator[Metric]:
    """The flood guard's counters (gridsock.bootstrap.routing.FloodGuard): a leader's and the
    rendez-vous node's say whom they slowed and cut (docs/security.md)."""
    counters = guard.counters
    events = CounterMetricFamily("gridsock_flood_guard_events",
                                 "Routed messages the flood guard held, dropped; sources it cut, links it closed",
                                 labels=["event"])
    for event in ("held", "dropped", "cut", "closed"):
        events.add_metric([event], counters.get(event, 0))
    yield events
    yield CounterMetricFamily("gridsock_flood_guard_held_seconds",
                              "Time routed messages waited for room in their source's share", unit="seconds",
                              value=counters.get("held_s", 0.0))
    yield GaugeMetricFamily("gridsock_flood_guard_cut_sources", "Sources whose routed messages are dropped now",
                            value=sum(1 for src in list(guard.cut_sources) if guard.is_cut(src)))


def _routed(counters: Dict[str, int]) -> CounterMetricFamily:
    family = CounterMetricFamily("gridsock_routed_messages", "Routed messages, by what this node did with them",
                                 labels=["action"])
    for action, count in sorted(counters.items()):
        family.add_metric([action], count)
    return family


class RendezvousMetrics:
    """The metrics of one :class:`~gridsock.bootstrap.rendezvous.RendezvousNode`."""

    def __init__(self, rendezvous: Any) -> None:
        self.rendezvous = rendezvous
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_RendezvousCollector(rendezvous))
        self._server: Optional[MetricsServer] = None

    def serve(self, address: Address) -> MetricsServer:
        """Start the HTTP endpoint; ConfigError if ``address`` cannot be bound."""
        self._server = MetricsServer(self.registry, address).start()
        log.info("metrics of the rendez-vous node on http://%s/metrics", self._server.address)
        return self._server

    @property
    def address(self) -> Optional[Address]:
        return self._server.address if self._server is not None else None

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()


class _RendezvousCollector(Collector):
    def __init__(self, rendezvous: Any) -> None:
        self._rendezvous = rendezvous

    def collect(self) -> Iterator[Metric]:
        rv = self._rendezvous
        yield GaugeMetricFamily("gridsock_leader_links", "Leaders linked to the rendez-vous node",
                                value=sum(1 for link in list(rv.leaders.values()) if not link.closed))
        yield GaugeMetricFamily("gridsock_directory_nodes", "Nodes in the directory", value=len(rv.directory))
        yield _routed(rv.routed)
        yield from _guard(rv.flood_guard)
        checks = CounterMetricFamily("gridsock_dialback_checks",
                                     "Dial-back reachability checks of registered addresses, by outcome",
                                     labels=["outcome"])
        for outcome, count in sorted(rv.dialback.counters.items()):
            checks.add_metric([outcome], count)
        yield checks
