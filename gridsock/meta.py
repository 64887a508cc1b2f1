"""The meta-communication channel: lazy direct links between nodes, the bootstrap channel behind.

Theory of operation
-------------------
Meta traffic (assembly requests and their answers) between two nodes goes over a direct *meta
link* when one can be made, and over the bootstrap channel otherwise (the paper's last resort:
it works everywhere). A meta link is opened lazily, by the first meta message between the
pair, and only where the directory says it can work: the peer is in the same cluster (same
network), or the rendez-vous node could dial it back (``inbound``). Its stack is ``tls/tcp``
(mutual TLS with node certificates; plain ``tcp`` in a plain-TCP session), dialed to the peer's
node port and greeted with ``Hello(role="peer")``; the listener answers ``Welcome`` with its
own directory entry. A failed attempt is not retried for ``META_RETRY_S``, and while a link is
being opened, messages for that peer do not wait for it: they take the bootstrap channel at
once (:meth:`MetaChannel.link_for` with ``wait=False``, what ``Node.meta_request`` asks), and
the link carries the requests that come after it is up. So first contact costs the bootstrap
channel's round trip, not the link's three (TCP, mutual TLS, Hello/Welcome) plus the request's.
``counters`` counts which path each request took (``on_link``, ``on_bootstrap``) and the links
opened (``opened``), so tests can count round trips rather than time them.

On a meta link only routed messages from the link's own peer to this node are accepted
(anything else is a protocol error that drops the link), so a meta link is never a way around
the bootstrap channel's source checks. Requests that arrive on a meta link are answered on it.

Without a rendez-vous
---------------------
A live meta link vouches for its peer: it is authenticated (the peer's certificate names it)
and its pings prove the peer is there. So when the uplink is lost (the rendez-vous node, or a
member's leader, is down), the directory keeps, beside the node itself and its members, the
peers it has a meta link with (:meth:`MetaChannel.vouched`; the uplink asks), and data
connections to them keep being assembled over the link (a request never needs the bootstrap
channel when the link is up). Only what truly needs the bootstrap channel waits or fails:
routed messages and pings to other nodes, the ``relay`` method, meta links to nodes not yet
linked. Upstream may say the same peers left while its own uplink is down (a member's leader
lost the rendez-vous node), or send a snapshot without them (a rendez-vous node that restarted
before their leaders came back): :meth:`MetaChannel.guard` keeps them in such updates too, and
remembers them as ``kept``. A peer that only the link keeps (the uplink is down, or it is
``kept``) leaves the directory when its link closes: nothing vouches for it any more. An
update that lists it again (upstream knows it again) ends its being kept.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from typing import Dict, List, Optional, Set

import gevent
import gevent.event

from . import wire
from .bootstrap.link import Link, read_message, send_message
from .bootstrap.transport import dial, parse_address, tls_client
from .errors import AuthError, BrokenStreamError, ConfigError, ConnectError, RemoteProtocolError
from .rules import same_cluster
from .session import peer_identity

__all__ = ["MetaChannel", "META_LINK_TIMEOUT_S", "META_RETRY_S"]

log = logging.getLogger(__name__)

# Opening a meta link (connect, TLS, Hello/Welcome) gives up after this long; meanwhile the
# message that asked for it waits, so keep it short: the bootstrap channel is always there.
META_LINK_TIMEOUT_S = 3.0
# After a failed attempt, meta traffic to that peer takes the bootstrap channel this long.
META_RETRY_S = 60.0


class MetaChannel:
    """The meta links of one node; see the module docstring."""

    def __init__(self, node) -> None:
        self.node = node
        self.links: Dict[str, Link] = {}
        self._failed: Dict[str, tuple] = {}  # peer id -> (until, reason)
        self._opening: Dict[str, gevent.event.AsyncResult] = {}
        #: Requests sent on a meta link / on the bootstrap channel, and meta links opened by us.
        self.counters: Dict[str, int] = {"on_link": 0, "on_bootstrap": 0, "opened": 0}
        #: Peers in the directory only because their meta link vouches for them (upstream said
        #: they left, or its snapshot lacked them); see "Without a rendez-vous".
        self.kept: Set[str] = set()
        self._series: Optional[Set[str]] = None  # node ids of the snapshot series being received

    # --- choosing the path -------------------------------------------------------------------

    def link_for(self, peer_id: str, *, wait: bool = True) -> Optional[Link]:
        """The live meta link to ``peer_id``, opened now if worth trying; None: use bootstrap.

        With ``wait`` False, a link not yet up is opened in the background and None is
        returned at once: the caller's message takes the bootstrap channel meanwhile.
        """
        link = self.links.get(peer_id)
        if link is not None and not link.closed:
            return link
        entry = self.node.directory.get(peer_id)
        if entry is None or not self._worth_trying(entry):
            return None
        pending = self._opening.get(peer_id)
        if pending is None:
            pending = gevent.event.AsyncResult()
            self._opening[peer_id] = pending
            gevent.spawn(self._open, entry, pending)
        if not wait:
            return None
        try:
            return pending.get(timeout=META_LINK_TIMEOUT_S + 1)
        except gevent.Timeout:
            return None

    def _worth_trying(self, entry: wire.NodeEntry) -> bool:
        me = self.node.entry
        if me is None or entry.node_id == me.node_id or not entry.addrs:
            return False
        failed = self._failed.get(entry.node_id)
        if failed and failed[0] > time.monotonic():
            return False
        return same_cluster(me, entry) or bool(entry.inbound)

    def _open(self, entry: wire.NodeEntry, result: gevent.event.AsyncResult) -> None:
        reasons = []
        link = None
        try:
            for text in entry.addrs:
                try:
                    with gevent.Timeout(META_LINK_TIMEOUT_S, TimeoutError(f"no answer in {META_LINK_TIMEOUT_S} s")):
                        link = self._dial(parse_address(text), entry)
                    self.counters["opened"] += 1
                    break
                except (ConnectError, ConfigError, OSError, TimeoutError, RemoteProtocolError, BrokenStreamError) as exc:
                    reasons.append(f"{text}: {exc}")
            if link is None:
                why = "; ".join(reasons) or "no address"
                self._failed[entry.node_id] = (time.monotonic() + META_RETRY_S, why)
                log.info("node %s: no meta link to %s (%s); meta traffic takes the bootstrap channel",
                         self.node.name, entry.name, why)
        finally:
            self._opening.pop(entry.node_id, None)
            result.set(link)

    def _dial(self, address, entry: wire.NodeEntry) -> Link:
        node = self.node
        sock = dial(address, timeout=META_LINK_TIMEOUT_S)
        try:
            if node.session.tls:
                sock = tls_client(sock, node.client_context(), timeout=META_LINK_TIMEOUT_S)
                peer = peer_identity(sock)
                if peer is None or peer.kind != "node" or peer.id != entry.node_id:
                    raise AuthError(f"{address} answered as {peer}, not as {entry.name}")
            send_message(sock, wire.Hello(name=node.name, cluster=node.cluster, role="peer",
                                          node_id=None if node.session.tls else node.node_id,
                                          token=None if node.session.tls else node.session.join_token))
            decoder = wire.Decoder(peer=str(address))
            reply = read_message(sock, decoder, timeout=META_LINK_TIMEOUT_S)
            if isinstance(reply, wire.Refuse):
                raise AuthError(f"{entry.name} refused a meta link: {reply.reason}")
            if not isinstance(reply, wire.Welcome) or reply.entry.node_id != entry.node_id:
                raise RemoteProtocolError(f"expected Welcome from {entry.name}")
        except BaseException:
            sock.close()
            raise
        return self._add(sock, decoder, entry, f"meta link to {entry.name} ({address})")

    def accept(self, sock, decoder, hello: wire.Hello, node_id: str, label: str) -> None:
        """A peer asked for a meta link on our node port (its identity already checked)."""
        entry = self.node.directory.get(node_id)
        if entry is None:
            send_message(sock, wire.Refuse("unknown-node", "not in this node's directory"))
            raise AuthError(f"meta link from {node_id}, which is not in the directory", peer=label)
        send_message(sock, wire.Welcome(self.node.entry, self.node.session.session_id))
        self._add(sock, decoder, entry, f"meta link from {entry.name} ({label})")

    def _add(self, sock, decoder, entry: wire.NodeEntry, label: str) -> Link:
        link = Link(sock, decoder, label=label, on_message=self._on_message,
                    on_close=lambda closed: self._on_close(closed, entry))
        link.peer_id = entry.node_id
        link.entry = entry
        old = self.links.get(entry.node_id)
        self.links[entry.node_id] = link
        link.start()
        if old is not None and not old.closed:
            old.close("replaced by a newer meta link")
        log.info("node %s: %s up", self.node.name, label)
        return link

    def _on_close(self, link: Link, entry: wire.NodeEntry) -> None:
        if self.links.get(entry.node_id) is link:
            del self.links[entry.node_id]
            node = self.node
            kept = entry.node_id in self.kept
            self.kept.discard(entry.node_id)
            if (kept or node.uplink is None) and entry.node_id != node.node_id and entry.node_id not in node.members:
                # (kept only because this link vouched for it: see "Without a rendez-vous")
                log.info("node %s: meta link to %s closed, and nothing else vouches for it: it leaves the directory",
                         node.name, entry.name)
                node.directory.remove([entry.node_id])

    def guard(self, update: wire.DirectoryUpdate) -> wire.DirectoryUpdate:
        """``update`` (from upstream, about to be applied) with the peers a live meta link vouches
        for kept: left out of its ``left``, added to the last part of a snapshot series that
        lacks them; those are remembered in ``kept``, and the entries it lists are not any more
        (see "Without a rendez-vous")."""
        if update.snapshot:
            self._series = set()
        if self.kept:  # (usually empty: no need to go through a storm's thousands of entries)
            self.kept.difference_update(e.node_id for e in update.joined)
        series = self._series
        if series is not None:
            series.update(e.node_id for e in update.joined)
            if update.more:
                return update
            self._series = None
            missing = [e for e in self.vouched() if e.node_id not in series and e.node_id != self.node.node_id]
            if not missing:
                return update
            self.kept.update(e.node_id for e in missing)
            return dataclasses.replace(update, joined=tuple(update.joined) + tuple(missing))
        spared = [node_id for node_id in update.left if self._linked(node_id)]
        if not spared:
            return update
        self.kept.update(spared)
        return dataclasses.replace(update, left=tuple(i for i in update.left if i not in spared))

    def _linked(self, peer_id: str) -> bool:
        link = self.links.get(peer_id)
        return link is not None and not link.closed

    def vouched(self) -> List[wire.NodeEntry]:
        """The directory entries of the peers this node has a live meta link with (the entry the
        link was opened with if the directory has none): what the directory keeps when the
        uplink is lost (see "Without a rendez-vous")."""
        out = []
        for peer_id, link in self.links.items():
            if not link.closed:
                entry = self.node.directory.get(peer_id) or link.entry
                if entry is not None:
                    out.append(entry)
        return out

    def _on_message(self, link: Link, message) -> None:
        if not isinstance(message, wire.Routed):
            raise RemoteProtocolError(f"unexpected {type(message).__name__} on a meta link")
        if message.src != link.peer_id or message.dst not in (self.node.node_id, self.node.name):
            raise RemoteProtocolError("a meta link carries messages between its two ends only")
        self.node.router.route(message, via=link)

    def close_all(self) -> None:
        for link in list(self.links.values()):
            link.close("node stopping")

    def status(self) -> list:
        stack = "tls/tcp" if self.node.session.tls else "tcp"
        out = [{"peer": l.entry.name if l.entry else None, "peer_id": l.peer_id, "stack": stack, "label": l.label, "since": l.opened_at}
               for l in self.links.values() if not l.closed]
        for peer_id in self._opening:  # (a link being opened beside the requests that asked for it)
            entry = self.node.directory.get(peer_id)
            out.append({"peer": entry.name if entry else peer_id, "peer_id": peer_id, "stack": stack,
                        "label": "opening", "since": None})
        now = time.monotonic()
        for peer_id, (until, why) in self._failed.items():
            if until > now:
                entry = self.node.directory.get(peer_id)
                out.append({"peer": entry.name if entry else peer_id, "peer_id": peer_id, "stack": "bootstrap",
                            "label": f"direct link failed: {why}", "since": None})
        return out
