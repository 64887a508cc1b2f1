"""Routing along the bootstrap tree: member -> leader -> rendez-vous -> leader -> member.

Theory of operation
-------------------
A routed message carries ``hops``, the number of links it has crossed, and ``route``, the names
of the nodes it went through (the sender first). Every node that puts the message on a link
increments ``hops``; a forwarder also appends its own name to ``route``. The longest path in the
tree is four links, five when the two leaders are linked to two rendez-vous nodes of a
federation (:mod:`.federation`: rendez-vous -> rendez-vous is one more link), so ``hops`` never
exceeds :data:`~gridsock.wire.MAX_HOPS`: a message that would need one more is answered with an
error (a routing loop or a corrupted directory).

Each router decides with what it knows:
- a member sends everything that is not for itself to its leader;
- a leader delivers to itself, sends down to one of its members, or up to the rendez-vous node;
- the rendez-vous node looks the destination up in the directory and sends it to that node's
  leader (or answers itself for the name ``rendezvous``).
A request that cannot be delivered is answered with an ``err`` message carrying the reason;
an undeliverable one-way message or reply is dropped with a log line.

:class:`Router` is that decision for a node (the rendez-vous node routes in
:mod:`gridsock.bootstrap.rendezvous`). It is given its links as two callables: ``up()`` (the
uplink, or None while it is down) and, on a leader, ``down(node_id)`` (the link to that member,
or None). A router with no ``down`` is a member's: it delivers what is addressed to its node
and drops everything else. It

- *originates*: ``send`` (one way), ``request`` (waits for the ``rep``/``err`` in
  :class:`Requests`), ``relay_send`` (relayed data, bulk); a message this node originates
  waits for room on its link (back-pressure);
- *forwards*: ``route(message)`` is called for every routed message that arrives on a link,
  and passes it on through its :class:`FloodGuard`;
- *answers*: messages for this node go to the handler registered for their topic (``ping`` is
  built in and answers with the route the request took), each in a greenlet of its own, at
  most ``MAX_DELIVERIES`` at once holding ``MAX_DELIVERY_BYTES`` (beyond, the link waits,
  then the message is dropped);
  relayed data goes to ``on_bulk(src, payload)`` in arrival order; replies to the waiting
  request. A request that arrived on a meta link (``via``) is answered on it.

Fairness (:class:`FloodGuard`, here and at the rendez-vous node). A link queues routed
messages per source node and lets the sources take turns (:mod:`.link`); the guard keeps each
source within its share of the link ahead. When a source has no room there, the guard holds
the link the message came from (its reader waits, so that peer's sends stop: back-pressure),
for ``HOLD_MAX_S`` at most: a link ahead that drained nothing meanwhile is stalled, and the
message is dropped instead (the link closes itself as too slow after ``SEND_STALL_S``). A
source whose messages held their link for ``FLOOD_HELD_S`` within ``FLOOD_WINDOW_S`` is
*flooding* (it sends faster than its share drains, for long), and it is cut: if the link it
came from is its own (a member at its leader, a leader at the rendez-vous node) that link is
closed; otherwise its routed messages are dropped here for ``CUT_S``, with one log line each
way. A relayed connection, credit-bound to ``RELAY_MAX_WINDOW_BYTES`` in flight, never fills a
share; a node that runs many relayed connections through one link at full speed at once can.
"""
from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import logging
import time
from typing import Callable, Dict, List, Optional, Tuple, cast

import gevent
import gevent.event

from .. import wire
from .._ratelog import RateLimitedLog
from ..errors import GridsockError, RoutingError
from .link import Link, reading_link

__all__ = [
    "RELAY_TOPIC",
    "REQUEST_TIMEOUT_S",
    "HOLD_MAX_S",
    "MAX_DELIVERIES",
    "MAX_DELIVERY_BYTES",
    "FLOOD_HELD_S",
    "FLOOD_WINDOW_S",
    "CUT_S",
    "Delivery",
    "FloodGuard",
    "Handler",
    "PingResult",
    "Requests",
    "Router",
    "error_reply",
    "first_send",
    "forwarded",
    "as_bytes",
    "is_bulk",
    "tree_route",
]

log = logging.getLogger(__name__)

# A routed request with no answer after this long fails with TimeoutError.
REQUEST_TIMEOUT_S = 15.0


# The longest a forwarder holds the link a message came from, waiting for room for its source
# on the link ahead: a link ahead that drained nothing for this long is stalled, not busy.
HOLD_MAX_S = 5.0
# A source whose messages held their links this long in all, within one FLOOD_WINDOW_S, sends
# faster than its share drains, for long: it is flooding, and cut.
FLOOD_HELD_S = 5.0
FLOOD_WINDOW_S = 10.0
# A cut source's routed messages are dropped at this node for this long.
CUT_S = 30.0
# Messages delivered to a node whose handlers may run at once (each in a greenlet of its own,
# holding its message): beyond, the link the next one comes on waits for one to end, for
# HOLD_MAX_S at most, then that message is dropped (a request is answered "busy").
MAX_DELIVERIES = 256
# ... and the payload bytes those messages may hold together (one message at least).
MAX_DELIVERY_BYTES = 64 * 1024 * 1024
# Sources whose held time a guard keeps (beyond, those whose window ended are forgotten).
GUARD_MAX_SOURCES = 4096


# Routed messages on this topic carry relayed connection data: bulk, flow-controlled end to end.
RELAY_TOPIC = "relay"


def is_bulk(message: wire.Routed) -> bool:
    """True for relayed data, which links send after all control traffic."""
    return message.topic == RELAY_TOPIC and message.kind == "msg"


def first_send(message: wire.Routed) -> wire.Routed:
    """The message as its sender puts it on the first link."""
    return wire.Routed(message.src, message.dst, message.kind, message.topic, message.request_id, message.hops + 1,
                       message.route, message.payload)


def forwarded(message: wire.Routed, by_name: str) -> Optional[wire.Routed]:
    """The message as forwarder ``by_name`` sends it on; None if it would exceed MAX_HOPS.
    Its payload is the received one as it is (a view of the frame it came in, for relayed
    data: see :class:`~gridsock.wire.Decoder`), not a copy."""
    if message.hops + 1 > wire.MAX_HOPS:
        return None
    # (the constructor, not dataclasses.replace: this runs for every frame a node forwards)
    return wire.Routed(message.src, message.dst, message.kind, message.topic, message.request_id, message.hops + 1,
                       tuple(message.route) + (by_name,), message.payload)


def as_bytes(message: wire.Routed) -> wire.Routed:
    """``message`` with its payload as ``bytes``: a large one is decoded as a read-only view of
    the frame it came in (:class:`~gridsock.wire.Decoder`), which relayed data and forwarders
    take as it is; handlers and replies get bytes."""
    if type(message.payload) is bytes:
        return message
    return dataclasses.replace(message, payload=bytes(message.payload))


def error_reply(message: wire.Routed, src_id: str, src_name: str, reason: str) -> Optional[wire.Routed]:
    """The ``err`` answer to an undeliverable request, or None if ``message`` is not a request."""
    if message.kind != "req":
        log.info("dropping undeliverable %s %s from %s to %s: %s", message.kind, message.topic, message.src, message.dst, reason)
        return None
    return wire.Routed(
        src=src_id,
        dst=message.src,
        kind="err",
        topic=message.topic,
        request_id=message.request_id,
        route=(src_name,),
        payload=reason.encode()[: wire.MAX_REASON_BYTES],
    )


def tree_route(directory, src: wire.NodeEntry, dst: wire.NodeEntry, rendezvous_name: str = "rendezvous") -> tuple:
    """The names on the path a routed message takes from ``src`` to ``dst`` (both included).

    With several rendez-vous nodes (a federation) the directory does not say which one each
    leader is linked to: the path shows one, ``rendezvous_name`` (a ping shows the real one)."""
    if src.node_id == dst.node_id:
        return (src.name,)
    up = [src.name]
    if src.leader != src.node_id:
        leader = directory.get(src.leader)
        up.append(leader.name if leader else src.leader[:8])
    down = [dst.name]
    if dst.leader != dst.node_id:
        leader = directory.get(dst.leader)
        down.insert(0, leader.name if leader else dst.leader[:8])
    if src.leader == dst.leader:  # the same cluster: the leader turns the message around
        if src.leader == src.node_id:
            return (src.name, dst.name)
        if dst.leader == dst.node_id:
            return (src.name, dst.name)
        return tuple(up + [dst.name])
    return tuple(up + [rendezvous_name] + down)


class Requests:
    """Outstanding routed requests of one node, by request id."""

    def __init__(self) -> None:
        self._ids = itertools.count(1)
        self._pending: Dict[int, gevent.event.AsyncResult[wire.Routed]] = {}

    def new(self) -> Tuple[int, gevent.event.AsyncResult[wire.Routed]]:
        request_id = next(self._ids) & 0xFFFFFFFF
        result: gevent.event.AsyncResult[wire.Routed] = gevent.event.AsyncResult()
        self._pending[request_id] = result
        return request_id, result

    def wait(self, request_id: int, result: gevent.event.AsyncResult[wire.Routed], *, dst: str,
             timeout: float) -> wire.Routed:
        """Return the ``rep`` for the request; raise RoutingError for ``err``, TimeoutError."""
        # (wait(), not get(): a gevent.Timeout of the caller's around the request stays the
        # caller's, not a TimeoutError of this request)
        try:
            result.wait(timeout)
        finally:
            self._pending.pop(request_id, None)
        if not result.ready():
            raise TimeoutError(f"no answer from {dst} within {timeout:.1f} s")
        reply = cast(wire.Routed, result.value)  # (resolve() sets only messages)
        if reply.kind == "err":
            raise RoutingError(reply.payload.decode("utf-8", "replace"), dst=dst)
        return reply

    def cancel(self, request_id: int) -> None:
        """Forget a request that was never sent."""
        self._pending.pop(request_id, None)

    def resolve(self, reply: wire.Routed) -> bool:
        """Hand a ``rep`` or ``err`` to its waiter; False if nobody waits (late or unknown)."""
        result = self._pending.get(reply.request_id)
        if result is None or result.ready():
            return False
        result.set(reply)
        return True


@dataclasses.dataclass(frozen=True)
class Delivery:
    """A routed message delivered to this node: what a topic handler receives."""

    src: str
    src_name: Optional[str]
    topic: str
    payload: bytes
    route: tuple
    kind: str


Handler = Callable[[Delivery], Optional[bytes]]


@dataclasses.dataclass(frozen=True)
class PingResult:
    """The answer of :meth:`Router.ping`: round-trip time and the routes both ways."""

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


class FloodGuard:
    """Keeps the sources of forwarded messages within their share of each link; see the module
    docstring. One per forwarding node; ``name`` is the node's (for log lines), ``names(src)``
    a source's name (or None). The time limits are keyword arguments; ``clock`` is injected.
    """

    def __init__(self, name: str, *, names: Callable[[str], Optional[str]] = lambda src: None,
                 hold_max_s: float = HOLD_MAX_S, flood_held_s: float = FLOOD_HELD_S,
                 flood_window_s: float = FLOOD_WINDOW_S, cut_s: float = CUT_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.name = name
        self._names = names
        self.hold_max_s = hold_max_s
        self.flood_held_s = flood_held_s
        self.flood_window_s = flood_window_s
        self.cut_s = cut_s
        self._clock = clock
        # Source -> [start of its window, seconds held within it].
        self._windows: Dict[str, List[float]] = {}
        # Source -> until when its messages are dropped here.
        self._cut_until: Dict[str, float] = {}
        # What the guard did, for status and metrics: ``held`` (messages that waited for room),
        # ``held_s`` (their seconds of waiting), ``dropped`` (messages dropped: a cut source's,
        # no room after HOLD_MAX_S, a hard bound), ``cut`` (sources cut), ``closed`` (links of
        # flooders closed).
        self.counters: Dict[str, float] = {"held": 0, "held_s": 0.0, "dropped": 0, "cut": 0, "closed": 0}
        # The sources cut so far (node ids), oldest first, at most GUARD_MAX_SOURCES.
        self.cut_sources: List[str] = []

    def _label(self, src: str) -> str:
        name = self._names(src)
        return f"{name} ({src})" if name else src

    def is_cut(self, src: str) -> bool:
        """True while the routed messages of ``src`` are dropped here."""
        until = self._cut_until.get(src)
        if until is None:
            return False
        if self._clock() < until:
            return True
        del self._cut_until[src]
        log.warning("%s: forwarding the messages of %s again (cut for %.0f s)", self.name, self._label(src), self.cut_s)
        return False

    def forward(self, link, message: wire.Routed, *, checked: bool = False) -> bool:
        """Queue ``message`` on ``link`` within its source's share; False only if ``link`` is closed.

        May block the calling greenlet (the reader of the link the message came from) while the
        source has no room, up to ``hold_max_s``. A message of a cut source, or one that found
        no room, is dropped (counted; True: there is nothing to answer)."""
        src = message.src
        if self.is_cut(src):
            self.counters["dropped"] += 1
            return True
        has_room = getattr(link, "has_room", None)
        if has_room is not None and not has_room(src):
            if not self._hold(link, src, bulk=is_bulk(message)):
                self.counters["dropped"] += 1
                return not link.closed
        if link.send(message, bulk=is_bulk(message), checked=checked):
            return True
        if link.closed:
            return False
        self.counters["dropped"] += 1  # past a hard bound
        return True

    def _hold(self, link, src: str, *, bulk: bool = False) -> bool:
        """Wait for room for ``src`` on ``link``, holding the link being read; False: drop the
        message (no room in time, or the source is cut now).

        Bulk data (relayed connections, flow-controlled end to end) that comes on the source's
        own link is only held: holding that link slows the source alone, as TCP's window would,
        and a node moving many relayed connections through a slow link ahead is no flooder.
        Holds of anything else (a shared leader link, non-bulk messages) count towards a cut."""
        if link.stalled_s > self.hold_max_s:
            return False  # it drains nothing: holding more input for it would only stop others
        incoming = reading_link()
        start = self._clock()
        if incoming is not None:
            with incoming.hold():
                ok = link.wait_source(src, self.hold_max_s)
        else:
            ok = link.wait_source(src, self.hold_max_s)
        if incoming is not None and incoming.closed:
            return False
        held = self._clock() - start
        self.counters["held"] += 1
        self.counters["held_s"] += held
        if not ok:
            return False  # the link ahead did not drain this source: not its fault, no count
        if bulk and incoming is not None and incoming.peer_id == src:
            return True  # back-pressure on the source's own link, nobody else's
        window = self._windows.get(src)
        if window is None or start - window[0] > self.flood_window_s:
            if len(self._windows) >= GUARD_MAX_SOURCES:
                self._forget_windows(start)
            window = self._windows[src] = [start, 0.0]
        window[1] += held
        if window[1] < self.flood_held_s:
            return True
        self._cut(src, incoming, window[1])
        return False

    def _forget_windows(self, now: float) -> None:
        for src, window in list(self._windows.items()):
            if now - window[0] > self.flood_window_s:
                del self._windows[src]
        while len(self._windows) >= GUARD_MAX_SOURCES:
            del self._windows[next(iter(self._windows))]

    def _cut(self, src: str, incoming: Optional[Link], held_s: float) -> None:
        self._windows.pop(src, None)
        self.counters["cut"] += 1
        if len(self.cut_sources) >= GUARD_MAX_SOURCES:
            del self.cut_sources[0]
        self.cut_sources.append(src)
        why = (f"its messages waited {held_s:.1f} s for room within {self.flood_window_s:.0f} s "
               f"(FLOOD_HELD_S {self.flood_held_s:.1f})")
        if incoming is not None and incoming.peer_id == src:
            self.counters["closed"] += 1
            log.warning("%s: closing the link of %s: it floods: %s", self.name, self._label(src), why)
            incoming.close(f"flooding: {why}")
            return
        self._cut_until[src] = self._clock() + self.cut_s
        log.warning("%s: dropping the routed messages of %s for %.0f s: it floods: %s", self.name, self._label(src),
                    self.cut_s, why)

    def status(self) -> dict:
        """The counters, and the sources cut now."""
        now = self._clock()
        return {**{k: (round(v, 3) if isinstance(v, float) else v) for k, v in self.counters.items()},
                "cut_now": sorted(src for src, until in self._cut_until.items() if until > now)}


class Router:
    """Originates, forwards and answers the routed messages of one node; see the module docstring.

    ``host`` is the node: the router reads its ``name``, ``node_id`` (None until it joins: the
    id can come later, with enrollment) and ``directory``.
    """

    def __init__(
        self,
        host,
        *,
        up: Callable[[], Optional[Link]],
        down: Optional[Callable[[str], Optional[Link]]] = None,
        on_bulk: Callable[[str, bytes], None] = lambda src, payload: None,
        max_deliveries: int = MAX_DELIVERIES,
        delivery_wait_s: float = HOLD_MAX_S,
    ) -> None:
        self.host = host
        # What peers make this router log (messages nobody here handles), rate-limited per source.
        self._peer_log = RateLimitedLog(log)
        self.requests = Requests()
        self.handlers: Dict[str, Handler] = {"ping": self._handle_ping}
        self._up = up
        self._down = down
        self._on_bulk = on_bulk
        # Routed messages by what this router did with them (for metrics): ``originated`` (sent
        # by this node: messages and requests, not replies), ``forwarded`` (passed on),
        # ``delivered`` (addressed here), ``dropped`` (no route, hop limit, not ours).
        self.counters: Dict[str, int] = {"originated": 0, "forwarded": 0, "delivered": 0, "dropped": 0}
        # Keeps the sources of what this router forwards within their shares (a leader's).
        self.guard = FloodGuard(str(getattr(host, "name", "?")), names=self._name_of)
        # Handlers running now (see MAX_DELIVERIES), and whether this router is shedding.
        self.max_deliveries = max_deliveries
        self.delivery_wait_s = delivery_wait_s
        self._deliveries = 0
        self._delivery_bytes = 0
        self._delivery_done = gevent.event.Event()
        self._shedding = False

    @property
    def forwards(self) -> bool:
        """True for a leader's router, which passes on messages for other nodes."""
        return self._down is not None

    # --- originating -------------------------------------------------------------------------

    def handle(self, topic: str, handler: Handler) -> None:
        """Call ``handler(delivery)`` for messages and requests on ``topic`` (see Node.handle)."""
        wire.check_name(topic, "topic")
        self.handlers[topic] = handler

    def send(self, dst: str, topic: str, payload: bytes = b"") -> None:
        """Send a one-way message to node ``dst`` (id or name). Raises RoutingError if no route."""
        self.originate(wire.Routed(src=self.require_id(), dst=dst, kind="msg", topic=topic,
                                   route=(self.host.name,), payload=bytes(payload)))

    def relay_send(self, dst_id: str, payload: bytes) -> None:
        """Send relayed connection data (bulk) to ``dst_id``. Raises RoutingError if no route."""
        # (the field rules skipped when the destination is a node id: the other fields are this
        # node's own, checked already, and a relay frame is encoded at every send)
        self.originate(wire.Routed(src=self.require_id(), dst=dst_id, kind="msg", topic=RELAY_TOPIC,
                                   route=(self.host.name,), payload=payload), checked=not wire.is_node_id(dst_id))

    def request(self, dst: str, topic: str, payload: bytes = b"", *, timeout: float = REQUEST_TIMEOUT_S) -> Delivery:
        """Send a request to ``dst`` and return its reply.

        Raises RoutingError if it cannot be delivered or the handler failed, TimeoutError if no
        reply comes within ``timeout`` seconds.
        """
        request_id, result = self.requests.new()
        message = wire.Routed(src=self.require_id(), dst=dst, kind="req", topic=topic, request_id=request_id,
                              route=(self.host.name,), payload=bytes(payload))
        if message.dst in (self.host.node_id, self.host.name):
            self.requests.resolve(self.answer(message))
        else:
            self.originate(message)
        reply = self.requests.wait(request_id, result, dst=dst, timeout=timeout)
        src = self.host.directory.get(reply.src)
        return Delivery(reply.src, src.name if src else None, reply.topic, reply.payload, reply.route, reply.kind)

    def request_on(self, link: Link, dst: wire.NodeEntry, topic: str, payload: bytes = b"", *,
                   timeout: float = REQUEST_TIMEOUT_S, dst_label: Optional[str] = None) -> Optional[Delivery]:
        """Send a request straight to ``dst`` on ``link`` (a meta link to it) and return its reply.

        Returns None if the link would not take the message (closed); raises like ``request``
        (naming the destination ``dst_label``, by default its name).
        """
        request_id, result = self.requests.new()
        message = wire.Routed(src=self.require_id(), dst=dst.node_id, kind="req", topic=topic,
                              request_id=request_id, hops=1, route=(self.host.name,), payload=bytes(payload))
        if not link.send(message):
            self.requests.cancel(request_id)
            return None
        self.counters["originated"] += 1
        reply = self.requests.wait(request_id, result, dst=dst_label or dst.name, timeout=timeout)
        return Delivery(reply.src, dst.name, reply.topic, reply.payload, reply.route, reply.kind)

    def ping(self, dst: str, *, timeout: float = REQUEST_TIMEOUT_S) -> PingResult:
        """Round trip to ``dst`` over the bootstrap channel; the routes taken both ways."""
        start = time.perf_counter()
        reply = self.request(dst, "ping", b"", timeout=timeout)
        rtt = time.perf_counter() - start
        there = tuple(json.loads(reply.payload)["route"])
        return PingResult(dst=dst, rtt_s=rtt, route_there=there, route_back=tuple(reply.route) + (self.host.name,))

    def require_id(self) -> str:
        """This node's id; RoutingError before it has one (not enrolled yet)."""
        if self.host.node_id is None:
            raise RoutingError("this node has not joined the session yet")
        return self.host.node_id

    def originate(self, message: wire.Routed, *, checked: bool = True) -> None:
        """Put a message this node sends on its first link. Raises RoutingError if it cannot.
        ``checked=False`` skips the field rules (``wire.encode``) for a message whose fields
        are known good."""
        if len(message.payload) > wire.MAX_PAYLOAD_BYTES:
            raise RoutingError(f"payload of {len(message.payload)} bytes exceeds MAX_PAYLOAD_BYTES "
                               f"({wire.MAX_PAYLOAD_BYTES}); use a data connection", dst=message.dst)
        if not self._forward(first_send(message), originated=True, checked=checked):
            raise RoutingError(f"no route to {message.dst}: not linked to the grid", dst=message.dst)
        self.counters["originated"] += 1

    # --- forwarding --------------------------------------------------------------------------

    def _forward(self, message: wire.Routed, *, originated: bool = False, checked: bool = True) -> bool:
        """Put ``message`` (hops already counted) on the right link; False if there is none.

        A message this node ``originated`` waits for room on the link (back-pressure on the
        sender); a forwarded one goes through the guard, which may hold the link it came from.
        Raises RoutingError for an originated message that finds the process's routed queues
        full (ROUTED_QUEUE_BYTES).
        """
        link = None
        if self._down is not None:
            entry = self.host.directory.resolve(message.dst)
            link = self._down(entry.node_id) if entry else None
        if link is None:
            link = self._up()
        if link is None:
            return False
        bulk = is_bulk(message)
        if not originated:
            return self.guard.forward(link, message, checked=checked)
        wait_source = getattr(link, "wait_source", None)
        incoming = reading_link()  # (an answer sent by a link's reader: relay's resets)
        with incoming.hold() if incoming is not None else contextlib.nullcontext():
            if wait_source is not None:
                wait_source(message.src)
            link.wait_room(bulk=bulk)
        if link.send(message, bulk=bulk, checked=checked):
            return True
        if getattr(link, "closed", True):
            return False
        # (the process's routed queues are full: ROUTED_QUEUE_BYTES)
        raise RoutingError(f"no room for a message to {message.dst}: this node's routed queues are full", dst=message.dst)

    def _name_of(self, node_id: str) -> Optional[str]:
        entry = self.host.directory.get(node_id)
        return entry.name if entry else None

    def route(self, message: wire.Routed, via: Optional[Link] = None) -> None:
        """A routed message arrived on a link: deliver it here or send it on.

        ``via`` is the meta link it came on, if any: requests from a meta link are answered on it.
        """
        host = self.host
        if message.dst in (host.node_id, host.name):
            self.counters["delivered"] += 1
            if is_bulk(message):
                self._on_bulk(message.src, message.payload)
                return
            message = as_bytes(message)
            if message.kind in ("rep", "err"):
                self.requests.resolve(message)
            elif self._delivery_room(len(message.payload)) or self._wait_delivery_room(len(message.payload)):
                self._shedding = False
                self._deliveries += 1
                self._delivery_bytes += len(message.payload)
                gevent.spawn(self._deliver_counted, message, via)
            else:
                self._shed(message, via)
            return
        if not self.forwards:
            log.info("member %s dropping %s for %s: not addressed to it", host.name, message.topic, message.dst)
            self.counters["dropped"] += 1
            return
        out = forwarded(message, host.name)
        reason = f"hop limit ({wire.MAX_HOPS}) reached" if out is None else None
        if out is not None and not self._forward(out, checked=False):
            reason = f"no route to {message.dst} from {host.name}"
        self.counters["dropped" if reason else "forwarded"] += 1
        if reason:
            back = error_reply(message, host.node_id, host.name, reason)
            if back is not None:
                self._forward(first_send(back))

    # --- answering ---------------------------------------------------------------------------

    def _delivery_room(self, size: int) -> bool:
        """Room for one more handler with a message of ``size`` bytes (see MAX_DELIVERIES)."""
        return self._deliveries == 0 or (self._deliveries < self.max_deliveries
                                         and self._delivery_bytes + size <= MAX_DELIVERY_BYTES)

    def _wait_delivery_room(self, size: int) -> bool:
        """Wait (holding the link being read, if any) until there is room for a handler of a
        message of ``size`` bytes; False after ``delivery_wait_s``."""
        deadline = time.monotonic() + self.delivery_wait_s
        incoming = reading_link()
        with incoming.hold() if incoming is not None else contextlib.nullcontext():
            while not self._delivery_room(size):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._delivery_done.clear()
                self._delivery_done.wait(remaining)
        return True

    def _deliver_counted(self, message: wire.Routed, via: Optional[Link]) -> None:
        try:
            self._deliver(message, via)
        finally:
            self._deliveries -= 1
            self._delivery_bytes -= len(message.payload)
            self._delivery_done.set()

    def _shed(self, message: wire.Routed, via: Optional[Link]) -> None:
        """Too many handlers run, for too long: drop ``message`` (a request gets an ``err``)."""
        self.counters["dropped"] += 1
        if not self._shedding:
            self._shedding = True
            log.warning("%s: %d handlers have been running for %.1f s: dropping the messages that come meanwhile "
                        "(MAX_DELIVERIES)", self.host.name, self._deliveries, self.delivery_wait_s)
        back = error_reply(message, self.host.node_id, self.host.name,
                           f"{self.host.name} is busy: {self._deliveries} messages being handled")
        if back is not None:
            back = first_send(back)
            if via is None or not via.send(back):
                self._forward(back)

    def _deliver(self, message: wire.Routed, via: Optional[Link] = None) -> None:
        if message.kind == "msg":
            handler = self.handlers.get(message.topic)
            if handler is None:
                self._peer_log.info(message.src, "no handler for message topic %r from %s", message.topic, message.src)
                return
            try:
                handler(self._delivery(message))
            except Exception:
                log.exception("handler for %r failed", message.topic)
            return
        answer = first_send(self.answer(message))
        if via is None or not via.send(answer):
            self._forward(answer)

    def answer(self, message: wire.Routed) -> wire.Routed:
        """The ``rep`` (or ``err``) of this node's handler to the request ``message``."""
        host = self.host
        handler = self.handlers.get(message.topic)
        try:
            if handler is None:
                raise LookupError(f"node {host.name} has no handler for {message.topic!r}")
            payload = handler(self._delivery(message)) or b""
            if len(payload) > wire.MAX_PAYLOAD_BYTES:
                raise RoutingError(f"reply of {len(payload)} bytes exceeds MAX_PAYLOAD_BYTES ({wire.MAX_PAYLOAD_BYTES})")
            return wire.Routed(src=host.node_id, dst=message.src, kind="rep", topic=message.topic,
                               request_id=message.request_id, route=(host.name,), payload=bytes(payload))
        except Exception as exc:
            if not isinstance(exc, (LookupError, GridsockError)):
                log.exception("handler for %r failed", message.topic)
            return wire.Routed(src=host.node_id, dst=message.src, kind="err", topic=message.topic,
                               request_id=message.request_id, route=(host.name,),
                               payload=str(exc).encode()[: wire.MAX_REASON_BYTES])

    def _delivery(self, message: wire.Routed) -> Delivery:
        src = self.host.directory.get(message.src)
        return Delivery(message.src, src.name if src else None, message.topic, message.payload, message.route,
                        message.kind)

    def _handle_ping(self, delivery: Delivery) -> bytes:
        return json.dumps({"route": list(delivery.route) + [self.host.name]}).encode()

    # --- status ------------------------------------------------------------------------------

    def routes(self) -> dict:
        """For each node in the directory, the bootstrap route from here (names)."""
        me = self.host.directory.get(self.host.node_id) if self.host.node_id else None
        if me is None:
            return {}
        return {e.node_id: list(tree_route(self.host.directory, me, e)) for e in self.host.directory}
