"""The rendez-vous node: the directory, enrollment, dial-back checks and the root of routing.

Theory of operation
-------------------
The rendez-vous node listens on one fixed port (the session's). A connection is first a TLS
handshake in which the client certificate is optional, then one message decides what it is:

- ``Enroll`` (no certificate needed): the join token is checked in constant time; if good, a
  new node id is made and the node's CSR is signed for it (``Enrolled``); if not, ``Refuse``.
  Either way the connection ends there, and a refused client has learnt nothing.
- ``Hello`` from a leader, which must present a certificate of the session CA (its id is in
  the certificate): the leader gets an entry in the directory, a ``Welcome``, a snapshot of the
  directory, and becomes a long-lived link. Everyone else hears of the join.

Over a leader's link arrive ``Register``/``Unregister`` for the members of its cluster (a
leader can only speak for its own cluster) and ``Routed`` messages, which the rendez-vous node
sends on to the destination's leader (see :mod:`.routing`), each source within its share of
that leader's link (``flood_guard``, a :class:`~.routing.FloodGuard`: a flooding member is
held, then cut, its leader's link kept). When a leader's link breaks, the
leader and all its members leave the directory and every other leader is told.

Reachability: after a node registers, the rendez-vous node dials back the addresses the node
advertises (as libp2p's AutoNAT does), runs TLS and checks that the node's own certificate
answers; ``inbound`` in the directory entry records the outcome. The checks are bounded
(:mod:`.dialback`): at most ``MAX_REGISTERED_ADDRS`` addresses per node, only addresses the
node plausibly owns (judged from its leader link's source address), results cached per
address, and rate limits per registering leader and for the whole node; so no node can make
the rendez-vous node connect anywhere at will.

Members enroll through their leader: the leader sends their ``Enroll`` here as a routed
request with topic ``enroll`` addressed to the name ``rendezvous``.

Names and clusters are bound to identities here (:class:`~.directory.Bindings`): a node name
to the first node id that holds it, a cluster to the first leader that leads it. A leader whose
``Hello`` asks for a name or a cluster bound to another id, linked or lost less than
``NAME_GRACE_S`` ago, is refused (``name-taken``, ``cluster-taken``), and so is a member's
registration (logged). A node that stops cleanly says so first (routed request ``LEAVE_TOPIC``),
which frees its name (and a leader's cluster) as soon as it is gone; the control operation
``release`` frees one that was lost. (In a plain-TCP session node ids are not authenticated:
bindings there only guard against mistakes.)

Clusters are attested, not declared, in a session that defines its clusters
(:func:`~gridsock.session.add_cluster`): an ``Enroll`` with a cluster's join token gets a
certificate that names the cluster (:class:`~gridsock.session.ClusterTokens` says which token
admits what), and a leader is accepted only for the cluster its certificate names; any other
``Hello`` naming a cluster is refused (``cluster-not-attested``), so the binding of a cluster
to its nodes survives a restart of this node. The first-come binding above then only keeps one
leader per cluster among the cluster's own nodes. A member's cluster is its leader's (a leader
registers only members of its own cluster, at most ``MAX_MEMBERS``, each checked against its
certificate by the leader), and "inside the cluster" in a server's policy is what this
directory says. A session that defines no cluster works as before: clusters are declared and
bound first come.

Several rendez-vous nodes (:mod:`.federation`, docs/federation.md): in a session that lists
them, this node is one of them (``index``, ``name``: ``rendezvous``, ``rendezvous-2``, ...). It
is the authority for the leaders linked to it (``federation.local``); ``directory`` is the merge
with what the others say of theirs, and what its leaders get. ``Hello(role="rendezvous")``
from another one of them becomes a rendez-vous link (``Federation.accept``); a routed message
for a node whose leader is on another rendez-vous node goes over that link.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import ssl
import uuid
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, NoReturn, Optional

import gevent
from gevent import socket as gsocket

from .. import __version__, wire
from .._ratelog import RateLimitedLog
from ..errors import AuthError, BrokenStreamError, ConfigError, RemoteProtocolError
from ..session import (CertificateAuthority, ClusterTokens, Identity, Session, client_context, cluster_file_name,
                       peer_identity, rendezvous_name, server_context)
from .control import ControlServer, control_path
from .dialback import DialBack, bounded_addrs
from .federation import FAILOVER_GRACE_S, PEER_ROLE, Federation
from .directory import LEAVE_TOPIC, MAX_MEMBERS, REFUSED_TOPIC, NAME_GRACE_S, RENDEZVOUS_NAME, STATUS_MAX_BYTES, Bindings, Broadcaster, Directory, bounded_json
from .nodeport import ACCEPT_ERROR_PAUSE_S
from .link import DEAD_PEER_S, HANDSHAKE_TIMEOUT_S, PROCESS_BUDGET, Link, read_message, send_message, tune_socket
from .routing import FloodGuard, as_bytes, error_reply, forwarded
from .transport import Address, dial, listen, parse_address, tls_client, tls_server

if TYPE_CHECKING:  # (prometheus_client is imported only when metrics are asked for)
    from ..metrics import RendezvousMetrics

__all__ = ["RendezvousNode", "DIALBACK_TIMEOUT_S", "LEAVE_BOUND_S", "LEAVE_TOPIC", "rendezvous_index"]

log = logging.getLogger(__name__)

# A leader that dies (even silently: frozen, cut off) is out of every directory within this
# long: the rendez-vous link notices it (DEAD_PEER_S at worst), then one update crosses two
# links (rendez-vous -> leaders -> members), which takes well under a second.
LEAVE_BOUND_S = DEAD_PEER_S + 2.0

# Connections the kernel holds for the rendez-vous port until it accepts them: every leader of a
# large grid may dial at once (a restart of this node, a join storm); beyond the backlog their
# SYNs are dropped, and each retry costs them a second or more.
RENDEZVOUS_BACKLOG = 1024

# A dial-back to an advertised address that has not completed TLS after this long fails:
# firewalls that drop packets make the connect hang, not fail.
DIALBACK_TIMEOUT_S = 3.0


def rendezvous_index(session: Session, *, name: Optional[str] = None, listen_address: Optional[str] = None) -> int:
    """Which of the session's rendez-vous nodes this one is (0-based; docs/federation.md): the
    one named ``name`` (``rendezvous``, ``rendezvous-2``, ...), else the one whose address is
    ``listen_address`` (host and port, or the port alone when only one entry has it), else the
    first. Raises ConfigError for a name that is not in the session."""
    addrs = list(session.rendezvous_addresses)
    if name is not None:
        for index in range(len(addrs)):
            if rendezvous_name(index) == name:
                return index
        raise ConfigError(f"no rendez-vous node named {name!r} in session {session.session_id}: it lists "
                          + ", ".join(f"{rendezvous_name(i)} ({h}:{p})" for i, (h, p) in enumerate(addrs)))
    if listen_address and len(addrs) > 1:
        address = parse_address(listen_address)
        for index, (host, port) in enumerate(addrs):
            if (host, port) == (address.host, address.port):
                return index
        same_port = [i for i, (_, port) in enumerate(addrs) if port == address.port]
        if len(same_port) == 1:
            return same_port[0]
    return 0


class RendezvousNode:
    """The rendez-vous node of one session; ``start()`` it, then ``stop()`` it.

    In a session that lists several rendez-vous nodes, ``name`` (or the listen address) says
    which one this is (:func:`rendezvous_index`); it links to the others (:mod:`.federation`;
    ``failover_grace_s`` is its FAILOVER_GRACE_S)."""

    def __init__(self, session: Session, *, listen_address: str | None = None, control: str | None = None,
                 metrics: str | None = None, name_grace_s: float = NAME_GRACE_S, max_members: int = MAX_MEMBERS,
                 dialback_options: Optional[Mapping[str, Any]] = None, name: Optional[str] = None,
                 failover_grace_s: float = FAILOVER_GRACE_S) -> None:
        self.session = session
        self.id = session.session_id
        self.index = rendezvous_index(session, name=name, listen_address=listen_address)
        self.name = rendezvous_name(self.index)
        own_port = session.rendezvous_addresses[self.index][1]
        self.listen_address = parse_address(listen_address) if listen_address else Address(
            host="0.0.0.0", port=own_port
        )
        self.directory = Directory()
        self.leaders: Dict[str, Link] = {}
        # Directory changes go out to every leader coalesced, encoded once (directory.Broadcaster).
        self._broadcaster = Broadcaster(self.directory, self.leaders.values)
        self.directory.add_listener(self._broadcaster.changed)
        # Node names and cluster names, bound to the node ids that hold them (see the docstring).
        self.names = Bindings("node name", grace_s=name_grace_s)
        self.clusters = Bindings("cluster", release_command="gridsock release --cluster {}", grace_s=name_grace_s)
        self.max_members = max_members
        # The join tokens of the session's clusters (clusters.toml beside the session file).
        self.cluster_tokens = ClusterTokens(session)
        self._control_path = control if control is not None else control_path(self.name)
        self._control: Optional[ControlServer] = None
        self._sock: Optional[gsocket.socket] = None
        self._greenlets: List[gevent.Greenlet] = []
        self._verdicts: list = []
        # Dial-back reachability checks, bounded (keywords of DialBack: limits, clock).
        self.dialback = DialBack(self._probe, **dict(dialback_options or {}))
        # What unauthenticated peers make the accept path log, rate-limited per host (gridsock._ratelog).
        self._accept_log = RateLimitedLog(log)
        # What nodes make the routed path log (messages it does not serve, enrollments a leader
        # forwards for whoever reached its node port), rate-limited per source.
        self._routed_log = RateLimitedLog(log)
        # Routed messages by what this node did with them (for metrics; see Router.counters).
        self.routed: Dict[str, int] = {"forwarded": 0, "delivered": 0, "dropped": 0}
        # Keeps each source within its share of each leader link (see routing.FloodGuard).
        self.flood_guard = FloodGuard(self.name, names=self._name_of)
        # Prometheus metrics (gridsock.metrics), served from start() when an address is given.
        self._metrics_address: Optional[Address] = None
        self._metrics: Optional["RendezvousMetrics"] = None
        if metrics is not None:
            from ..metrics import RendezvousMetrics, parse_metrics_address

            self._metrics_address = parse_metrics_address(metrics)
            self._metrics = RendezvousMetrics(self)
        # TLS sessions only (None in a plain-TCP one):
        self._ca: Optional[CertificateAuthority] = None
        self._identity: Optional[Identity] = None
        self._server_ctx: Optional[ssl.SSLContext] = None
        self._client_ctx: Optional[ssl.SSLContext] = None
        if session.tls:
            self._ca = session.certificate_authority()
            self._identity = session.rendezvous_identity(self.index)
            self._server_ctx = server_context(session, self._identity, require_client_cert=False)
            self._client_ctx = client_context(session, self._identity)
        # The other rendez-vous nodes of the session, and the directory shared with them (its
        # ``local`` part is what this node is the authority for).
        self.federation = Federation(self, grace_s=failover_grace_s)

    @property
    def address(self) -> Address:
        """The bound address (the real port when the configured one was 0)."""
        host, port = self._bound().getsockname()[:2]
        return Address(host=host, port=port)

    def start(self) -> "RendezvousNode":
        if self._metrics is not None and self._metrics_address is not None:
            self._metrics.serve(self._metrics_address)  # first: a port in use fails before anything runs
        self._sock = listen(self.listen_address)
        self._sock.listen(RENDEZVOUS_BACKLOG)  # (a join storm: connections wait for accept, not SYN retries)
        if self._control_path:
            self._control = ControlServer(self._control_path, self._control_op).start()
        self._greenlets.append(gevent.spawn(self._accept_loop))
        self.federation.start()
        log.info("rendez-vous node of session %s listening on %s (%s)", self.id, self.address, self.session.bootstrap)
        return self

    def stop(self) -> None:
        for g in self._greenlets:
            g.kill(block=False)
        self._broadcaster.close()
        self.federation.stop()
        if self._metrics is not None:
            self._metrics.stop()
        if self._sock is not None:
            self._sock.close()
        for link in list(self.leaders.values()):
            link.close("rendez-vous node stopping")
        if self._control is not None:
            self._control.stop()

    @property
    def metrics_address(self) -> Optional[Address]:
        """Where the metrics endpoint listens (None: off, or not started)."""
        return self._metrics.address if self._metrics is not None else None

    def _bound(self) -> gsocket.socket:
        if self._sock is None:
            raise RuntimeError("the rendez-vous node is not started")
        return self._sock

    def serve_forever(self) -> None:
        gevent.joinall(self._greenlets)

    # --- connections -------------------------------------------------------------------------

    def _accept_loop(self) -> None:
        listener = self._bound()
        while True:
            try:
                sock, addr = listener.accept()
            except OSError as exc:
                if listener.fileno() == -1:  # closed by stop()
                    return
                # Out of descriptors (EMFILE, ENFILE), most often: peers can cause it; the
                # rendez-vous port must outlive it (see nodeport.ACCEPT_ERROR_PAUSE_S).
                self._accept_log.warning("accept", "accept on the rendez-vous port failed: %s", exc)
                gevent.sleep(ACCEPT_ERROR_PAUSE_S)
                continue
            self.handle_connection(sock, addr)

    def handle_connection(self, sock, addr) -> None:
        """Serve ``sock``, a connection from ``addr`` (host, port), as if accepted on the
        rendez-vous port: TLS, then ``Enroll`` or a leader's ``Hello``. The hook for connections
        accepted elsewhere: an SSH remote forward (:class:`~.sshforward.SSHForwarder`, whose
        ``addr`` is the client as the gateway saw it). Call it in this node's hub thread; it
        returns at once (a greenlet serves the connection, and closes it)."""
        tune_socket(sock)
        gevent.spawn(self._handle, sock, addr)

    def _handle(self, sock, addr) -> None:
        label = f"{addr[0]}:{addr[1]}"
        handed_over = False
        try:
            peer = None
            if self.session.tls:
                sock = tls_server(sock, self._server_ctx, timeout=HANDSHAKE_TIMEOUT_S)
                peer = peer_identity(sock)
            decoder = wire.Decoder(peer=label)
            message = read_message(sock, decoder)
            if isinstance(message, wire.Enroll):
                self._enroll_direct(sock, message, label)
            elif isinstance(message, wire.Hello) and message.role == PEER_ROLE:
                handed_over = self.federation.accept(sock, decoder, message, peer, label)
            elif isinstance(message, wire.Hello):
                handed_over = self._accept_leader(sock, decoder, message, peer, label, addr)
            else:
                raise RemoteProtocolError(f"expected Enroll or Hello, got {type(message).__name__}")
        except AuthError as exc:
            self._accept_log.warning(str(addr[0]), "refused %s: %s", label, exc)
        except RemoteProtocolError as exc:
            self._accept_log.warning(str(addr[0]), "dropped %s: protocol error: %s", label, exc)
        except (OSError, TimeoutError, BrokenStreamError) as exc:
            self._accept_log.info(str(addr[0]), "connection from %s ended during handshake: %s", label, exc)
        finally:
            if not handed_over:
                sock.close()

    def _refuse(self, sock, code: str, reason: str, label: str) -> NoReturn:
        try:
            send_message(sock, wire.Refuse(code, reason))
        except OSError:
            pass
        raise AuthError(f"{reason} ({code})", peer=label)

    def _enroll_direct(self, sock, message: wire.Enroll, label: str) -> None:
        if not self.session.tls:
            raise RemoteProtocolError("Enroll in a plain-TCP session (nodes name themselves in Hello)")
        try:
            node_id, cert_pem = self._enroll(message.token, message.csr_pem, message.name, label)
        except AuthError as exc:
            self._refuse(sock, "bad-token", str(exc), label)
        send_message(sock, wire.Enrolled(node_id, cert_pem))

    def _enroll(self, token: str, csr_pem: str, name: str, label: str):
        """Check the token and sign the CSR; return ``(node_id, cert_pem)``. Raises AuthError.

        A cluster's join token gets a certificate that names the cluster."""
        admitted, cluster = self.cluster_tokens.admit(token)
        if not admitted:
            raise AuthError(f"enrollment of {name!r} refused: bad join token", peer=label)
        node_id = str(uuid.uuid4())
        assert self._ca is not None  # (callers enroll in TLS sessions only)
        cert_pem = self._ca.sign_node(csr_pem.encode(), node_id, cluster=cluster).decode()
        log.info("enrolled %s as node %s%s (from %s)", name, node_id, f" of cluster {cluster}" if cluster else "", label)
        return node_id, cert_pem

    def _authenticate(self, sock, hello: wire.Hello, peer, label: str) -> str:
        """Return the node id of the sender of ``hello``; refuse and raise AuthError if none."""
        if self.session.tls:
            if peer is None or peer.kind != "node":
                self._refuse(sock, "no-certificate", "a node certificate of this session is required", label)
            return peer.id
        if hello.node_id is None or not self.session.check_token(hello.token or ""):
            self._refuse(sock, "bad-token", "join token refused", label)
        return hello.node_id

    def _accept_leader(self, sock, decoder, hello: wire.Hello, peer, label: str, addr) -> bool:
        node_id = self._authenticate(sock, hello, peer, label)
        if hello.role != "leader":
            self._refuse(sock, "not-a-leader", f"only leaders link to the rendez-vous node, not {hello.role}s", label)
        if hello.name == RENDEZVOUS_NAME or hello.name in self.federation.names:
            self._refuse(sock, "name-reserved", f"the name {hello.name!r} is reserved", label)
        holder = self.directory.by_name(hello.name)
        if holder is not None and holder.node_id != node_id and (holder.leader in self.leaders
                                                                 or self.federation.holds_elsewhere(holder)):
            self._refuse(sock, "name-taken", f"node name {hello.name!r} is already used by {holder.node_id}", label)
        why = self.names.why_not(hello.name, node_id)
        if why:
            self._refuse(sock, "name-taken", why, label)
        why = self._cluster_not_attested(hello, peer)
        if why:
            self._refuse(sock, "cluster-not-attested", why, label)
        if hello.cluster is not None:
            why = self.clusters.why_not(hello.cluster, node_id) or self.federation.cluster_led_elsewhere(hello.cluster, node_id)
            if why:
                self._refuse(sock, "cluster-taken", f"{why} (its leader); a leader leads a cluster of its own", label)
        entry = wire.NodeEntry(
            node_id=node_id,
            name=hello.name,
            cluster=hello.cluster,
            leader=node_id,
            role="leader",
            addrs=bounded_addrs(hello.addrs, f"leader {hello.name} ({label})"),
            observed=f"{addr[0]}:{addr[1]}" if ":" not in addr[0] else f"[{addr[0]}]:{addr[1]}",
            inbound=None,
            gateways=hello.gateways,
        )
        old = self.leaders.get(node_id)
        if old is not None:
            old.close("the same leader linked again")
        link = Link(sock, decoder, label=f"leader {hello.name} ({label})",
                    on_message=lambda link, message: self._on_leader_message(link, entry, message),
                    on_close=lambda link: self._on_leader_close(link, entry))
        link.peer_id = node_id
        link.entry = entry
        self.names.bind(entry.name, node_id)
        if entry.cluster is not None:
            self.clusters.bind(entry.cluster, node_id)
        self._update([entry], [])
        self.leaders[node_id] = link
        link.send(wire.Welcome(entry, self.id))
        self._broadcaster.welcome(link)  # (the whole directory, with the next broadcast)
        link.start()
        log.info("leader %s (%s, cluster %s) joined from %s", hello.name, node_id, hello.cluster, label)
        if entry.addrs:
            self._spawn_dialback(entry)
        else:
            self._update([dataclasses.replace(entry, inbound=False)], [])
        return True

    def _cluster_not_attested(self, hello: wire.Hello, peer) -> Optional[str]:
        """Why a leader may not lead the cluster its ``hello`` names, on the evidence of its
        certificate (``peer``), or None. In a session that defines clusters, and for any
        certificate that names one, the cluster must be the certificate's."""
        if not self.session.tls or peer is None:
            return None
        defined = self.cluster_tokens.current()
        attested = peer.cluster
        if attested is None and not defined:
            return None  # a session that defines no cluster: declared, bound first come
        if hello.cluster == attested:
            if attested is not None and defined and attested not in defined:
                return f"cluster {attested!r} is no longer defined in this session"
            return None
        if attested is None:
            assert hello.cluster is not None  # (else it equals attested)
            return (f"{hello.name} declares cluster {hello.cluster!r}, but its certificate names no cluster: this"
                    f" session attests its clusters, so a node joins cluster {hello.cluster!r} with that cluster's"
                    f" session file ({cluster_file_name(hello.cluster)}), which holds its join token"
                    + ("" if hello.cluster in defined else
                       f"; the session does not define cluster {hello.cluster!r} (gridsock session cluster defines it)"))
        return (f"{hello.name}'s certificate names cluster {attested!r}, but it declares "
                + (f"cluster {hello.cluster!r}" if hello.cluster is not None else "no cluster"))

    # --- directory ---------------------------------------------------------------------------

    def _update(self, joined, left) -> None:
        # This node's own entries; the merge with the other rendez-vous nodes' goes to
        # self.directory, and every leader hears of it with the next broadcast (self._broadcaster
        # listens), every other rendez-vous node too (federation).
        self.federation.update_local(joined, left)

    def _on_leader_close(self, link: Link, leader: wire.NodeEntry) -> None:
        if self.leaders.get(leader.node_id) is not link:
            return  # replaced by a newer link of the same leader
        del self.leaders[leader.node_id]
        members = self.federation.local.members_of(leader.node_id)
        gone = [leader.node_id] + [e.node_id for e in members]
        self.names.lost(leader.name, leader.node_id)
        if leader.cluster is not None:
            self.clusters.lost(leader.cluster, leader.node_id)
        for member in members:
            self.names.lost(member.name, member.node_id)
        log.info("leader %s gone (%s): unregistering it and %d member(s)", leader.name, link.close_reason, len(gone) - 1)
        self._update([], gone)

    def _on_leader_message(self, link: Link, leader: wire.NodeEntry, message) -> None:
        if isinstance(message, wire.Routed):
            # A leader speaks for itself and its members only: no spoofed sources.
            src = self.directory.get(message.src)
            if message.src != link.peer_id and (src is None or src.leader != link.peer_id):
                log.warning("%s: dropping %s %s with source %s, not of its cluster", link.label, message.kind,
                            message.topic, message.src)
                return
            self._route(message)
        elif isinstance(message, wire.Register):
            accepted = []
            room = self.max_members - self.federation.local.count_members(leader.node_id)
            over = 0
            for entry in message.entries:
                why = self._check_member(leader, entry)
                if why:
                    log.warning("%s: ignoring registration of %s: %s", link.label, entry.name, why)
                    continue
                why = self._name_taken(entry)
                if why:
                    log.warning("%s: refusing member %s (%s): %s", link.label, entry.name, entry.node_id, why)
                    self._refuse_member(link, entry, "name-taken", why)
                    continue
                if self.federation.local.get(entry.node_id) is None:  # (a member already here takes no more room)
                    if room <= 0:
                        over += 1
                        continue
                    room -= 1
                # No address advertised: nothing to dial back, the verdict is known.
                addrs = bounded_addrs(entry.addrs, f"{link.label}: member {entry.name}")
                accepted.append(dataclasses.replace(entry, addrs=addrs, observed=None, inbound=None if addrs else False))
            if over:
                log.warning("%s: ignoring %d registration(s): a leader has at most %d members (MAX_MEMBERS)",
                            link.label, over, self.max_members)
            for entry in accepted:
                self.names.bind(entry.name, entry.node_id)
            self._update(accepted, [])
            for entry in accepted:
                if entry.addrs:
                    self._spawn_dialback(entry)
        elif isinstance(message, wire.Unregister):
            mine = [e for i in message.node_ids if (e := self.federation.local.get(i)) and e.leader == link.peer_id and i != link.peer_id]
            for entry in mine:
                self.names.lost(entry.name, entry.node_id)
            self._update([], [e.node_id for e in mine])
        else:
            raise RemoteProtocolError(f"unexpected {type(message).__name__} on a leader link")

    def _check_member(self, leader: wire.NodeEntry, entry: wire.NodeEntry) -> Optional[str]:
        if entry.role != "member" or entry.leader != leader.node_id or entry.node_id == leader.node_id:
            return "a leader registers only members that it leads"
        if entry.cluster != leader.cluster:
            return f"cluster {entry.cluster!r} is not the leader's ({leader.cluster!r})"
        if entry.name == RENDEZVOUS_NAME or entry.name in self.federation.names:
            return "reserved name"
        current = self.directory.get(entry.node_id)
        if current is not None and current.leader != leader.node_id and current.leader in self.leaders:
            return f"node {entry.node_id} belongs to another linked leader"
        return None

    def _name_taken(self, entry: wire.NodeEntry) -> Optional[str]:
        """Why the member ``entry`` may not have its name (another node holds it), or None."""
        holder = self.directory.by_name(entry.name)
        if holder is not None and holder.node_id != entry.node_id and (holder.leader in self.leaders
                                                                       or self.federation.holds_elsewhere(holder)):
            return f"node name {entry.name!r} is already used by {holder.node_id}"
        return self.names.why_not(entry.name, entry.node_id)

    def _refuse_member(self, link: Link, entry: wire.NodeEntry, code: str, reason: str) -> None:
        """Tell the leader at ``link`` that its member ``entry`` is refused for good: it passes
        a ``Refuse`` on to the member and drops it (a leader that predates this ignores it)."""
        payload = json.dumps({"node_id": entry.node_id, "code": code, "reason": reason[: wire.MAX_REASON_BYTES]})
        link.send(wire.Routed(src=self.id, dst=entry.leader, kind="msg", topic=REFUSED_TOPIC, hops=1,
                              route=(self.name,), payload=payload.encode()))

    # --- routing -----------------------------------------------------------------------------

    def _route(self, message: wire.Routed, from_peer: Optional[str] = None) -> None:
        """Deliver ``message`` here, or send it on: down to a leader linked here, or (if it did
        not come from one, ``from_peer``) over the link to the rendez-vous node that has it."""
        if message.dst in (self.id, self.name) or message.dst == RENDEZVOUS_NAME and from_peer is None:
            self.routed["delivered"] += 1
            gevent.spawn(self._deliver, as_bytes(message))
            return
        entry = self.directory.resolve(message.dst)
        link = self._link_toward(entry, message.dst, from_peer=from_peer)
        if link is None:
            self.routed["dropped"] += 1
            reason = f"unknown destination {message.dst}" if entry is None else f"no link to the leader of {message.dst}"
            self._send_back(error_reply(message, self.id, self.name, reason))
            return
        out = forwarded(message, self.name)
        if out is None:
            self.routed["dropped"] += 1
            self._send_back(error_reply(message, self.id, self.name, f"hop limit ({wire.MAX_HOPS}) reached"))
            return
        self.routed["forwarded"] += 1
        self.flood_guard.forward(link, out, checked=False)

    def _name_of(self, node_id: str) -> Optional[str]:
        entry = self.directory.get(node_id)
        return entry.name if entry else None

    def _link_toward(self, entry: Optional[wire.NodeEntry], dst: str, *, from_peer: Optional[str] = None) -> Optional[Link]:
        """The link a message for ``entry`` (the destination ``dst`` resolved) goes on: its
        leader's, if linked here; else, unless it came from another rendez-vous node, the
        link to the one that has it (or to the rendez-vous node ``dst`` names)."""
        if entry is None:
            if from_peer is None and dst in self.federation.names:
                return self.federation.link_to_peer(dst)
            return None
        link = self.leaders.get(entry.leader)
        if link is None and from_peer is None:
            link = self.federation.link_toward(entry)
        return link

    def _send_back(self, message: Optional[wire.Routed]) -> None:
        if message is None:
            return
        entry = self.directory.resolve(message.dst)
        link = self._link_toward(entry, message.dst)
        if link is not None:
            link.send(dataclasses.replace(message, hops=1))

    def _deliver(self, message: wire.Routed) -> None:
        if message.kind != "req":
            self._routed_log.info(message.src, "ignoring %s %s from %s: the rendez-vous node answers requests only",
                                  message.kind, message.topic, message.src)
            return
        reply: Optional[wire.Routed]
        try:
            if message.topic == "enroll":
                payload = self._enroll_routed(message)
            elif message.topic == "ping":
                payload = json.dumps({"route": list(message.route) + [self.name]}).encode()
            elif message.topic == LEAVE_TOPIC:
                payload = self._leave(message.src)
            else:
                raise LookupError(f"the rendez-vous node has no service {message.topic!r}")
            reply = wire.Routed(src=self.id, dst=message.src, kind="rep", topic=message.topic,
                                request_id=message.request_id, route=(self.name,), payload=payload)
        except (AuthError, LookupError, ValueError, RemoteProtocolError) as exc:
            reply = error_reply(message, self.id, self.name, str(exc))
        self._send_back(reply)

    def _leave(self, node_id: str) -> bytes:
        """Node ``node_id`` (the routers checked that it sent this) stops cleanly: its name, and
        a leader's cluster, are free as soon as it is gone."""
        entry = self.directory.get(node_id)
        if entry is None:
            return json.dumps({"left": False}).encode()
        self.names.left(entry.name, node_id)
        if entry.role == "leader" and entry.cluster is not None:
            self.clusters.left(entry.cluster, node_id)
        # (rate-limited: a member may send this as often as it likes; the fuzz campaign's routed
        # run wrote 15,000 such lines, 2.5 MB)
        self._routed_log.info(node_id, "node %s (%s) is leaving cleanly: its name is free once it is gone",
                              entry.name, node_id)
        return json.dumps({"left": True}).encode()

    def _enroll_routed(self, message: wire.Routed) -> bytes:
        if not self.session.tls:
            raise LookupError("no enrollment in a plain-TCP session")
        try:
            request = json.loads(message.payload)
            enroll = wire.Enroll.from_header(request, b"")
        except (ValueError, TypeError, RecursionError) as exc:  # (RecursionError: JSON nested too deep)
            raise RemoteProtocolError(f"bad enroll request: {exc}") from None
        via = message.route[0] if message.route else "?"
        try:
            node_id, cert_pem = self._enroll(enroll.token, enroll.csr_pem, enroll.name, f"leader {via}")
        except AuthError as exc:
            self._routed_log.warning(via, "refused %s: %s", f"leader {via}", exc)
            return json.dumps({"refused": "bad-token", "reason": str(exc)}).encode()
        return json.dumps({"node_id": node_id, "cert_pem": cert_pem}).encode()

    # --- reachability ------------------------------------------------------------------------

    def _spawn_dialback(self, entry: wire.NodeEntry) -> None:
        gevent.spawn(self._dialback, entry)

    def _dialback(self, entry: wire.NodeEntry) -> None:
        # A leader registers itself and its members: the limits are its, and the addresses it
        # plausibly owns are judged from where its link comes from.
        leader = entry if entry.leader == entry.node_id else self.directory.get(entry.leader)
        inbound, reasons = self.dialback.check(entry.node_id, entry.addrs, registrar=entry.leader,
                                               observed=leader.observed if leader is not None else None)
        log.info("dial-back to %s: %s%s", entry.name, "reachable" if inbound else "not reachable",
                 "" if inbound or not reasons else f" ({'; '.join(reasons)})")
        # Verdicts are applied in batches: a burst of registrations makes one update per batch,
        # not one per node (which would flood every leader's link).
        self._verdicts.append((entry, inbound))
        if len(self._verdicts) == 1:
            gevent.spawn(self._apply_verdicts)

    def _apply_verdicts(self) -> None:
        verdicts, self._verdicts = self._verdicts, []
        changed = []
        for entry, inbound in verdicts:
            current = self.federation.local.get(entry.node_id)
            if current is None or current.addrs != entry.addrs:
                continue  # gone or re-registered meanwhile; its own dial-back will tell
            changed.append(dataclasses.replace(current, inbound=inbound))
        self._update(changed, [])

    def _probe(self, address: Address, node_id: str) -> str:
        """Dial ``address`` (for node ``node_id``); return the id of the node that answered
        there ("" in a plain-TCP session). Raises ConnectError, AuthError, OSError or TimeoutError."""
        with gevent.Timeout(DIALBACK_TIMEOUT_S, TimeoutError(f"no answer within {DIALBACK_TIMEOUT_S:.1f} s")):
            sock = dial(address, timeout=DIALBACK_TIMEOUT_S)
            try:
                answered = ""
                if self.session.tls:
                    sock = tls_client(sock, self._client_ctx, timeout=DIALBACK_TIMEOUT_S)
                    peer = peer_identity(sock)
                    if peer is None or peer.kind != "node":
                        raise AuthError(f"{address} answered as {peer}, not as node {node_id}")
                    answered = peer.id
                send_message(sock, wire.Hello(name=RENDEZVOUS_NAME, cluster=None, role="probe",
                                              software=f"gridsock {__version__}"))
            finally:
                sock.close()
        return answered

    # --- control -----------------------------------------------------------------------------

    def _control_op(self, op: str, args: dict):
        if op == "status":
            links, total = bounded_json(
                ({"peer": link.entry.name if link.entry else None, "peer_id": node_id, "kind": "leader",
                  "label": link.label} for node_id, link in self.leaders.items()), STATUS_MAX_BYTES)
            return {
                "role": "rendezvous",
                "name": self.name,
                "node_id": self.id,
                "session": self.id,
                "address": str(self.address),
                "bootstrap": self.session.bootstrap,
                **self.directory.status(),
                "links": links,
                "links_total": total,
                "bound_names": len(self.names),
                "bound_clusters": len(self.clusters),
                "flood_guard": self.flood_guard.status(),
                "federation": self.federation.status(),
                "routed_queue": {"queued_bytes": PROCESS_BUDGET.queued_bytes, "peak_bytes": PROCESS_BUDGET.peak_bytes,
                                 "limit_bytes": PROCESS_BUDGET.limit_bytes},
            }
        if op == "release":
            return self.release(name=args.get("name"), cluster=args.get("cluster"))
        raise ConfigError(f"unknown control operation {op!r} (the rendez-vous node knows: status, release)")

    def release(self, *, name: object = None, cluster: object = None) -> dict:
        """An operator frees node name ``name`` or cluster ``cluster``, kept for a node that was
        lost (see the module docstring), so that another node may take it now. Returns what was
        released. Raises ConfigError for a bad argument, or a name or cluster whose holder is
        linked (stop that node first)."""
        if (name is None) == (cluster is None):
            raise ConfigError("release takes a node name or a cluster (name=... or cluster=...)")
        what, value, bindings = ("node name", name, self.names) if name is not None else ("cluster", cluster, self.clusters)
        if not isinstance(value, str):
            raise ConfigError(f"release: the {what} must be a string")
        binding = bindings.get(value)
        if binding is None:
            raise ConfigError(f"release: no node holds the {what} {value!r}")
        if binding.lost_at is None:
            raise ConfigError(f"release: the {what} {value!r} belongs to node {binding.node_id}, which is linked: "
                              "stop that node first")
        bindings.release(value)
        log.warning("operator released the %s %r (held by node %s)", what, value, binding.node_id)
        return {"released": value, "kind": "cluster" if cluster is not None else "name", "node_id": binding.node_id}
