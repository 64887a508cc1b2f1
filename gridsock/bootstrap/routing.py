"""Routing along the bootstrap tree: member -> leader -> rendez-vous -> leader -> member.

Theory of operation
-------------------
A routed message carries ``hops``, the number of links it has crossed, and ``route``, the names
of the nodes it went through (the sender first). Every node that puts the message on a link
increments ``hops``; a forwarder also appends its own name to ``route``. The longest path in the
tree is four links, so ``hops`` never exceeds :data:`~gridsock.wire.MAX_HOPS`: a message that
would need a fifth is answered with an error (a routing loop or a corrupted directory).

Each router decides with what it knows:
- a member sends everything that is not for itself to its leader;
- a leader delivers to itself, sends down to one of its members, or up to the rendez-vous node;
- the rendez-vous node looks the destination up in the directory and sends it to that node's
  leader (or answers itself for the name ``rendezvous``).
A request that cannot be delivered is answered with an ``err`` message carrying the reason;
an undeliverable one-way message or reply is dropped with a log line.
"""
from __future__ import annotations

import dataclasses
import itertools
import logging
from typing import Dict, Optional, Tuple

import gevent
import gevent.event

from .. import wire
from ..errors import RoutingError

__all__ = ["RELAY_TOPIC", "is_bulk", "forwarded", "first_send", "error_reply", "tree_route", "Requests", "REQUEST_TIMEOUT_S"]

log = logging.getLogger(__name__)

# A routed request with no answer after this long fails with TimeoutError.
REQUEST_TIMEOUT_S = 15.0


# Routed messages on this topic carry relayed connection data: bulk, flow-controlled end to end.
RELAY_TOPIC = "relay"


def is_bulk(message: wire.Routed) -> bool:
    """True for relayed data, which links send after all control traffic."""
    return message.topic == RELAY_TOPIC and message.kind == "msg"


def first_send(message: wire.Routed) -> wire.Routed:
    """The message as its sender puts it on the first link."""
    return dataclasses.replace(message, hops=message.hops + 1)


def forwarded(message: wire.Routed, by_name: str) -> Optional[wire.Routed]:
    """The message as forwarder ``by_name`` sends it on; None if it would exceed MAX_HOPS."""
    if message.hops + 1 > wire.MAX_HOPS:
        return None
    return dataclasses.replace(message, hops=message.hops + 1, route=message.route + (by_name,))


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
    """The names on the path a routed message takes from ``src`` to ``dst`` (both included)."""
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
        self._pending: Dict[int, gevent.event.AsyncResult] = {}

    def new(self) -> Tuple[int, gevent.event.AsyncResult]:
        request_id = next(self._ids) & 0xFFFFFFFF
        result = gevent.event.AsyncResult()
        self._pending[request_id] = result
        return request_id, result

    def wait(self, request_id: int, result: gevent.event.AsyncResult, *, dst: str, timeout: float) -> wire.Routed:
        """Return the ``rep`` for the request; raise RoutingError for ``err``, TimeoutError."""
        try:
            reply = result.get(timeout=timeout)
        except gevent.Timeout:
            raise TimeoutError(f"no answer from {dst} within {timeout:.1f} s") from None
        finally:
            self._pending.pop(request_id, None)
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
