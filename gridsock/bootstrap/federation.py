"""Several rendez-vous nodes in one session: the links between them and their one directory.

Theory of operation
-------------------
A session may list several rendez-vous nodes (``rendezvous = ["h1:p", "h2:p"]`` in
session.toml; :attr:`~gridsock.session.Session.rendezvous_addresses`). Node ``i`` (0-based, in
the list's order) is named :func:`~gridsock.session.rendezvous_name` ``(i)``: ``rendezvous``,
``rendezvous-2``, ... Every one of them holds a certificate of the session CA that names the
session (``urn:gridsock:rendezvous:<session id>``), so a leader accepts any of them and they
accept each other.

*Peer links.* Node ``i`` dials every node ``j > i`` of the list and keeps that link up
(redialing with the uplink's backoff, :func:`~.uplink.backoff_delays`); it accepts the links of
the nodes before it. A link is mutual TLS (the dialer presents its rendez-vous certificate; the
acceptor refuses anything but a rendez-vous certificate of this session: ``not-a-rendezvous``),
then ``Hello(role="rendezvous", name=<its name>)`` each way (the dialer's first; the acceptor
answers with its own ``Hello``, or a ``Refuse``); in a plain-TCP session the ``Hello`` carries
the join token instead. A newer link from the same peer replaces the older one.

*One directory.* Each rendez-vous node is the authority for the leaders linked to it and their
members: those entries are its ``local`` directory. Over every peer link it sends a snapshot
of ``local`` when the link comes up, then its changes, coalesced
(:class:`~.directory.Broadcaster`); what a peer sends is kept in that peer's ``remote``
directory. The node's own ``directory`` (the one its leaders see, and routing uses) is the
merge: for each node id, the local entry if there is one, else the entry of the first peer
(live peers first, in list order) that has it. So entries, leaves and dial-back verdicts
converge on every rendez-vous node (and on to every leader and member) within one broadcast
per link crossed.

*Routing.* A routed message for a node whose leader is linked elsewhere goes over the peer link
to the rendez-vous node that has it (:meth:`Federation.link_toward`); a message that came over
a peer link is only delivered, or sent down to a local leader, never on to a third rendez-vous
node. The longest path is five links (member, leader, rendez-vous, rendez-vous, leader,
member): :data:`~gridsock.wire.MAX_HOPS`.

*Failover.* When a peer link breaks (the peer was killed, or the network between them), the
entries it was the authority for stay in the merge for :data:`FAILOVER_GRACE_S`: meanwhile
that peer's leaders fail over to another rendez-vous node (:mod:`.uplink`) and register again
there, which makes them local there and remote here again. When the grace ends with the peer
still gone, its ``remote`` directory is dropped, and with it only the entries nobody else
vouches for (leaders that did not come back). A peer that comes back sends its snapshot, which
replaces what was kept of it. So killing a rendez-vous node removes no node from any directory
unless its leader has not re-attached within ``FAILOVER_GRACE_S``. A restarted rendez-vous
node starts empty and catches up from the snapshots its peers send when they link.

Trust: a rendez-vous node holds the session CA key; its peers trust what it says for the nodes
it is the authority for, as leaders trust it.
"""
from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Callable, Dict, Iterable, List, Optional, Set

import gevent
import gevent.event

from .. import __version__, wire
from .._ratelog import RateLimitedLog
from ..errors import AuthError, BrokenStreamError, ConnectError, RemoteProtocolError
from ..session import peer_identity, rendezvous_name
from .directory import Broadcaster, Directory
from .link import HANDSHAKE_TIMEOUT_S, Link, read_message, send_message
from .transport import Address, dial, tls_client
from .uplink import RECONNECT_INITIAL_S, RECONNECT_MAX_S, backoff_delays

if TYPE_CHECKING:
    from .rendezvous import RendezvousNode

__all__ = ["Federation", "FAILOVER_GRACE_S", "PEER_ROLE", "rendezvous_names"]

log = logging.getLogger(__name__)

# The entries of a rendez-vous node that was lost stay in the others' directories this long:
# time for its leaders to notice (at once when it was killed: their links are reset), wait
# one backoff step (RECONNECT_INITIAL_S) and register with the next rendez-vous node of the
# list. A node whose leader has not re-attached by then leaves every directory.
FAILOVER_GRACE_S = 5.0
# The Hello role of a rendez-vous node linking to another one.
PEER_ROLE = "rendezvous"


def rendezvous_names(session) -> List[str]:
    """The names of the session's rendez-vous nodes, in the session's order."""
    return [rendezvous_name(i) for i in range(len(session.rendezvous_addresses))]


class Federation:
    """The peer links of rendez-vous node ``node`` and the directory merge; see the module
    docstring. ``node`` has ``session``, ``name``, ``index``, ``directory`` (the merge),
    ``_client_ctx`` and ``_route(message, from_peer=...)``. ``on_change(ids)`` is not needed:
    the merge is applied to ``node.directory`` directly. Time limits are keywords (tests)."""

    def __init__(self, node: "RendezvousNode", *, grace_s: float = FAILOVER_GRACE_S,
                 reconnect_initial_s: float = RECONNECT_INITIAL_S, reconnect_max_s: float = RECONNECT_MAX_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.node = node
        self.session = node.session
        self.names = rendezvous_names(node.session)
        self.grace_s = grace_s
        self._reconnect_initial_s = reconnect_initial_s
        self._reconnect_max_s = reconnect_max_s
        self._clock = clock
        # The entries this node is the authority for (its leaders and their members).
        self.local = Directory()
        # Per peer (by name): the entries it is the authority for, as it last said.
        self.remote: Dict[str, Directory] = {name: Directory() for name in self.names if name != node.name}
        # Per peer: its link while up.
        self.peers: Dict[str, Link] = {}
        # Per peer that was lost: when (self._clock()), while its entries are kept.
        self.lost_at: Dict[str, float] = {}
        self._broadcaster = Broadcaster(self.local, self.peers.values)
        self.local.add_listener(self._broadcaster.changed)
        self._greenlets: List[gevent.Greenlet] = []
        self._grace_timers: Dict[str, gevent.Greenlet] = {}
        self._stopped = gevent.event.Event()
        self._log = RateLimitedLog(log)
        # What happened, for status and tests: links made, lost, peers expired after the grace.
        self.counters: Dict[str, int] = {"linked": 0, "lost": 0, "expired": 0, "refused": 0}

    # --- life --------------------------------------------------------------------------------

    def start(self) -> "Federation":
        for index, name in enumerate(self.names):
            if index > self.node.index:
                host, port = self.session.rendezvous_addresses[index]
                self._greenlets.append(gevent.spawn(self._keep_linked, name, Address(host=host, port=port)))
        return self

    def stop(self) -> None:
        self._stopped.set()
        for g in self._greenlets + list(self._grace_timers.values()):
            g.kill(block=False)
        self._grace_timers.clear()
        self._broadcaster.close()
        for link in list(self.peers.values()):
            link.close("rendez-vous node stopping")

    def status(self) -> dict:
        now = self._clock()
        return {
            "name": self.node.name,
            "peers": {name: {"linked": name in self.peers and not self.peers[name].closed,
                             "entries": len(self.remote[name]),
                             "lost_s_ago": None if name not in self.lost_at else round(now - self.lost_at[name], 1)}
                      for name in self.remote},
            "local_entries": len(self.local),
            "counters": dict(self.counters),
        }

    # --- the directory merge -----------------------------------------------------------------

    def update_local(self, joined: Iterable[wire.NodeEntry], left: Iterable[str]) -> None:
        """This node's own entries changed (its leaders, their members, verdicts)."""
        joined = list(joined)
        left = list(left)
        self.local.apply(joined, left)
        self._merge([e.node_id for e in joined] + left)

    def _peer_order(self) -> List[str]:
        """Peers whose entries count, live ones first, each group in the session's order."""
        live = [n for n in self.remote if n in self.peers and not self.peers[n].closed]
        return live + [n for n in self.remote if n not in live]

    def authority(self, node_id: str) -> Optional[str]:
        """The name of the rendez-vous node whose entry of ``node_id`` counts (this node's own
        name for a local one), or None."""
        if node_id in self.local:
            return self.node.name
        for name in self._peer_order():
            if node_id in self.remote[name]:
                return name
        return None

    def _merge(self, node_ids: Iterable[str]) -> None:
        joined: List[wire.NodeEntry] = []
        left: List[str] = []
        order = None
        for node_id in dict.fromkeys(node_ids):
            entry = self.local.get(node_id)
            if entry is None:
                order = order if order is not None else self._peer_order()
                for name in order:
                    entry = self.remote[name].get(node_id)
                    if entry is not None:
                        break
            if entry is None:
                left.append(node_id)
            else:
                joined.append(entry)
        directory = self.node.directory
        left = [i for i in left if i in directory]
        joined = [e for e in joined if directory.get(e.node_id) != e]
        if joined or left:
            directory.apply(joined, left)

    def holds_elsewhere(self, entry: wire.NodeEntry) -> bool:
        """True if a linked peer is the authority for ``entry`` (its name is in use there)."""
        return any(entry.node_id in self.remote[name] for name in self.remote
                   if name in self.peers and not self.peers[name].closed)

    def cluster_led_elsewhere(self, cluster: str, node_id: str) -> Optional[str]:
        """Why ``node_id`` may not lead ``cluster``: another leader leads it at a linked peer
        (a message), or None."""
        for name in self.remote:
            if name not in self.peers or self.peers[name].closed:
                continue
            for entry in self.remote[name]:
                if entry.role == "leader" and entry.cluster == cluster and entry.node_id != node_id:
                    return f"cluster {cluster!r} belongs to node {entry.node_id} (at {name})"
        return None

    # --- routing -----------------------------------------------------------------------------

    def link_toward(self, entry: wire.NodeEntry) -> Optional[Link]:
        """The live peer link toward the rendez-vous node that has ``entry``'s leader, or None."""
        for name in self.remote:
            link = self.peers.get(name)
            if link is not None and not link.closed and entry.node_id in self.remote[name]:
                return link
        return None

    def link_to_peer(self, name: str) -> Optional[Link]:
        """The live link to rendez-vous node ``name``, or None."""
        link = self.peers.get(name)
        return link if link is not None and not link.closed else None

    # --- linking -----------------------------------------------------------------------------

    def _keep_linked(self, name: str, address: Address) -> None:
        delays = backoff_delays(self._reconnect_initial_s, self._reconnect_max_s)
        while not self._stopped.is_set():
            try:
                link = self._dial(name, address)
                delays = backoff_delays(self._reconnect_initial_s, self._reconnect_max_s)
                link.join()
            except AuthError as exc:
                self._log.warning(name, "rendez-vous %s: link to %s (%s) refused: %s", self.node.name, name, address, exc)
            except (ConnectError, OSError, TimeoutError, RemoteProtocolError, BrokenStreamError) as exc:
                self._log.info(name, "rendez-vous %s: no link to %s (%s): %s", self.node.name, name, address, exc)
            if self._stopped.wait(next(delays)):
                return

    def _hello(self) -> wire.Hello:
        session = self.session
        return wire.Hello(name=self.node.name, cluster=None, role=PEER_ROLE, software=f"gridsock {__version__}",
                          token=None if session.tls else session.join_token)

    def _dial(self, name: str, address: Address) -> Link:
        sock = dial(address, timeout=HANDSHAKE_TIMEOUT_S)
        try:
            if self.session.tls:
                sock = tls_client(sock, self.node._client_ctx, timeout=HANDSHAKE_TIMEOUT_S)
                peer = peer_identity(sock)
                if peer is None or peer.kind != "rendezvous" or peer.id != self.session.session_id:
                    raise AuthError(f"{address} presented {peer}, not a rendez-vous node of this session",
                                    peer=str(address))
            send_message(sock, self._hello())
            decoder = wire.Decoder(peer=str(address))
            reply = read_message(sock, decoder, timeout=HANDSHAKE_TIMEOUT_S)
            if isinstance(reply, wire.Refuse):
                raise AuthError(f"refused: {reply.reason}", peer=str(address), method=reply.code)
            if not isinstance(reply, wire.Hello) or reply.role != PEER_ROLE:
                raise RemoteProtocolError(f"expected a rendez-vous Hello, got {type(reply).__name__}", peer=str(address))
            if reply.name != name:
                raise AuthError(f"{address} is {reply.name}, not {name} (is the session file the same?)",
                                peer=str(address))
        except BaseException:
            sock.close()
            raise
        return self._linked(name, sock, decoder, f"rendez-vous {name} ({address})")

    def accept(self, sock, decoder: wire.Decoder, hello: wire.Hello, peer, label: str) -> bool:
        """Serve another rendez-vous node's ``Hello``: check it, answer, keep the link. Raises
        AuthError (after a Refuse) for a peer that is not one of this session's rendez-vous nodes."""
        session = self.session
        if session.tls:
            if peer is None or peer.kind != "rendezvous" or peer.id != session.session_id:
                self.counters["refused"] += 1
                self._refuse(sock, "not-a-rendezvous", "a rendez-vous certificate of this session is required", label)
        elif not session.check_token(hello.token or ""):
            self.counters["refused"] += 1
            self._refuse(sock, "bad-token", "join token refused", label)
        if hello.name not in self.remote:
            self.counters["refused"] += 1
            self._refuse(sock, "unknown-rendezvous", f"{hello.name!r} is not another rendez-vous node of this session"
                         f" (they are {', '.join(self.names)})", label)
        send_message(sock, self._hello())
        self._linked(hello.name, sock, decoder, f"rendez-vous {hello.name} ({label})")
        return True

    def _refuse(self, sock, code: str, reason: str, label: str):
        try:
            send_message(sock, wire.Refuse(code, reason))
        except OSError:
            pass
        raise AuthError(f"{reason} ({code})", peer=label)

    def _linked(self, name: str, sock, decoder: wire.Decoder, label: str) -> Link:
        old = self.peers.get(name)
        if old is not None:
            old.close("the same rendez-vous node linked again")
        link = Link(sock, decoder, label=label, on_message=lambda link, message: self._on_message(name, link, message),
                    on_close=lambda link: self._on_close(name, link))
        link.peer_id = name
        self.peers[name] = link
        timer = self._grace_timers.pop(name, None)
        if timer is not None:
            timer.kill(block=False)
        self.lost_at.pop(name, None)
        self._broadcaster.welcome(link)  # (our entries, as a snapshot, with the next broadcast)
        link.start()
        self.counters["linked"] += 1
        log.info("rendez-vous %s: linked to rendez-vous %s (%s)", self.node.name, name, label)
        return link

    def _on_message(self, name: str, link: Link, message) -> None:
        if isinstance(message, wire.DirectoryUpdate):
            joined, left = self.remote[name].apply_update(message)
            self._merge([e.node_id for e in joined] + [e.node_id for e in left])
        elif isinstance(message, wire.Routed):
            self.node._route(message, from_peer=name)
        else:
            raise RemoteProtocolError(f"unexpected {type(message).__name__} on a rendez-vous link")

    def _on_close(self, name: str, link: Link) -> None:
        if self.peers.get(name) is not link:
            return
        del self.peers[name]
        self.counters["lost"] += 1
        if self._stopped.is_set():
            return
        self.lost_at[name] = self._clock()
        log.warning("rendez-vous %s: lost rendez-vous %s (%s): keeping its %d entries for %.1f s (FAILOVER_GRACE_S)",
                    self.node.name, name, link.close_reason, len(self.remote[name]), self.grace_s)
        # Its entries now come after every live peer's: re-merge them.
        self._merge([e.node_id for e in self.remote[name]])
        self._grace_timers[name] = gevent.spawn_later(self.grace_s, self._expire, name)

    def _expire(self, name: str) -> None:
        self._grace_timers.pop(name, None)
        if name in self.peers:
            return
        gone: Set[str] = {e.node_id for e in self.remote[name]}
        self.remote[name] = Directory()
        self.counters["expired"] += 1
        log.warning("rendez-vous %s: rendez-vous %s still gone after %.1f s: dropping the entries only it had",
                    self.node.name, name, self.grace_s)
        self._merge(gone)
