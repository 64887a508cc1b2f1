"""A leader's service to the members of its cluster.

Theory of operation
-------------------
A leader (a node with no ``--leader``) accepts its cluster's members on its node port; the
:class:`~gridsock.bootstrap.nodeport.NodePort` hands it two kinds of connection:

- ``Enroll`` (a new member proving the join token): forwarded to the rendez-vous node as a
  routed ``enroll`` request; its answer goes back as ``Enrolled``, or as ``Refuse`` with the
  rendez-vous node's code. So a member needs no route out of its cluster to get a certificate.
- ``Hello(role="member")``: after these checks, in order (each failure is a ``Refuse``): the
  sender is a node of the session (certificate, or the join token in a plain-TCP session); it
  says it is a member; of this leader's cluster (``wrong-cluster``); whose certificate attests
  this cluster (``cluster-not-attested``: see :func:`member_cluster_not_attested`); with a name
  that is not ``rendezvous``, not the leader's, and not held by another node (a name held by a
  node of this cluster that has no link any more may be taken over: that is a member that
  restarted with a new identity), nor bound to another member that was lost less than
  ``NAME_GRACE_S`` ago (as at the rendez-vous node:
  :class:`~gridsock.bootstrap.directory.Bindings`; a member that stops cleanly sends
  ``LEAVE_TOPIC`` to the rendez-vous node through us, which frees its name here too); and the
  cluster has room (at most ``MAX_MEMBERS``: ``cluster-full``).
  The member gets ``Welcome`` with its directory entry, then the whole directory, and its link
  is kept in ``members`` (one per node id: a member that links again replaces its old link).
  The leader registers it up the uplink (``Register``) and puts it in its own directory.

On a member link only routed messages whose source is the member itself are accepted (they go
to ``on_routed``); anything else is a protocol error that drops the member. When a member
link closes, the member leaves the directory and the leader sends ``Unregister`` up.

The rendez-vous node has the last word on names: a member whose name it finds bound to
another node (in another cluster, say) is refused there (``REFUSED_TOPIC``, :meth:`on_refused`);
the leader passes a ``Refuse`` on to the member over its link, which the member takes as final,
and drops it.

Every directory change the leader sees (from the rendez-vous node, or its own members coming
and going) is passed on to every member (``on_directory_change``), so a member's directory is
its leader's. The uplink's ``Register`` of all members after a relink is the uplink's job
(:mod:`gridsock.bootstrap.uplink`), with the entries ``entries()`` returns.
"""
from __future__ import annotations

import json
import logging

import gevent
from typing import Callable, Dict, List, Optional

from .. import wire
from .._ratelog import RateLimitedLog
from ..errors import RemoteProtocolError, RoutingError
from .directory import LEAVE_TOPIC, MAX_MEMBERS, NAME_GRACE_S, RENDEZVOUS_NAME, Bindings, Broadcaster
from .link import LINK_TIMEOUT_S, PING_INTERVAL_S, Link, send_message
from .nodeport import EARLY_MEMBER_WAIT_S, authenticate, refuse
from .routing import Delivery

__all__ = ["LeaderService", "ENROLL_TOPIC", "REFUSE_LINGER_S", "member_cluster_not_attested"]

log = logging.getLogger(__name__)

# The rendez-vous node's topic for enrollments a leader forwards for its members.
ENROLL_TOPIC = "enroll"
# A member refused by the rendez-vous node gets a Refuse, then its link closes after this long
# (it closes it itself when the Refuse arrives; the wait lets the Refuse be written first).
REFUSE_LINGER_S = 1.0


def member_cluster_not_attested(leader_cluster: Optional[str], leader_attested: Optional[str], member) -> Optional[str]:
    """Why a member whose certificate says ``member`` (a PeerIdentity; None in a plain-TCP
    session) may not join the cluster ``leader_cluster`` of a leader whose own certificate
    attests ``leader_attested``, or None.

    A leader whose certificate names its cluster is in a session that attests its clusters:
    its members' certificates must name the same cluster. Any member certificate that names a
    cluster must name the leader's. A leader whose certificate names none (a session that
    defines no cluster) takes members whose certificates name none, as before.
    """
    if member is None:
        return None
    if member.cluster == leader_cluster or (leader_attested is None and member.cluster is None):
        return None
    if member.cluster is None:
        return (f"cluster {leader_cluster!r} is attested in this session and this node's certificate names no"
                " cluster: join with the cluster's session file, which holds its join token")
    return f"this node's certificate names cluster {member.cluster!r}, not {leader_cluster!r}"


class LeaderService:
    """The member links of leader ``host`` (``name``, ``node_id``, ``cluster``, ``session``,
    ``directory``); see the module docstring.

    ``on_routed(message)`` gets the routed messages members send; ``request(dst, topic,
    payload)`` sends a routed request and returns its reply (a Delivery; the router's);
    ``send_up(message)`` queues a message on the uplink (False if it is down);
    ``wait_joined(timeout)`` waits until the leader has joined the grid once, True if it has.
    """

    def __init__(
        self,
        host,
        *,
        on_routed: Callable[[wire.Routed], None],
        request: Callable[[str, str, bytes], Delivery],
        send_up: Callable[[object], bool],
        wait_joined: Callable[[float], bool] = lambda timeout: True,
        ping_interval_s: float = PING_INTERVAL_S,
        link_timeout_s: float = LINK_TIMEOUT_S,
        name_grace_s: float = NAME_GRACE_S,
        max_members: int = MAX_MEMBERS,
    ) -> None:
        self.host = host
        # What members make us log (refusals that are not the rendez-vous node's), rate-limited.
        self._peer_log = RateLimitedLog(log)
        self.members: Dict[str, Link] = {}
        # The names of this cluster's members, bound to their ids (see the module docstring).
        self.names = Bindings("node name", grace_s=name_grace_s)
        self.max_members = max_members
        self._on_routed = on_routed
        self._request = request
        self._send_up = send_up
        self._wait_joined = wait_joined
        self._ping_interval_s = ping_interval_s
        self._link_timeout_s = link_timeout_s
        # Directory changes go out to every member coalesced, encoded once.
        self._broadcaster = Broadcaster(host.directory, self.members.values)

    def link_for(self, node_id: str) -> Optional[Link]:
        """The link to member ``node_id``, or None if it is not one of ours."""
        return self.members.get(node_id)

    def entries(self) -> List[wire.NodeEntry]:
        """The directory entries of the members whose link is up."""
        return [link.entry for link in self.members.values() if not link.closed and link.entry is not None]

    def close_all(self, reason: str = "leader stopping") -> None:
        self._broadcaster.close()
        for link in list(self.members.values()):
            link.close(reason)

    def status(self) -> list:
        """One line per member link, for ``Node.status``."""
        return [{"kind": "member", "peer": l.entry.name if l.entry else None, "peer_id": node_id, "label": l.label,
                 "since": l.opened_at} for node_id, l in self.members.items()]

    # --- the node port hands these over ------------------------------------------------------

    def enroll(self, sock, message: wire.Enroll, label: str) -> None:
        """Forward a member's ``Enroll`` to the rendez-vous node; answer ``Enrolled`` or refuse.

        Raises AuthError (refused; the member was told), RemoteProtocolError (a bad answer, or
        Enroll in a plain-TCP session) or OSError.
        """
        if not self.host.session.tls:
            raise RemoteProtocolError("Enroll in a plain-TCP session")
        request = json.dumps({"token": message.token, "csr_pem": message.csr_pem, "name": message.name}).encode()
        self._wait_joined(EARLY_MEMBER_WAIT_S)  # (a cluster started at once; then, if still out, refused)
        try:
            reply = self._request(RENDEZVOUS_NAME, ENROLL_TOPIC, request)
        except RoutingError as exc:
            refuse(sock, "enroll-failed", f"cannot reach the rendez-vous node to enroll: {exc}", label)
        try:
            answer = json.loads(reply.payload)
        except ValueError as exc:
            raise RemoteProtocolError(f"bad enroll answer from the rendez-vous node: {exc}") from None
        if isinstance(answer, dict) and "refused" in answer:
            refuse(sock, str(answer["refused"]), str(answer.get("reason", "enrollment refused")), label)
        try:
            enrolled = wire.Enrolled.from_header(answer, b"")
        except (ValueError, TypeError) as exc:
            raise RemoteProtocolError(f"bad enroll answer from the rendez-vous node: {exc}") from None
        send_message(sock, enrolled)

    def accept(self, sock, decoder: wire.Decoder, hello: wire.Hello, peer, label: str) -> bool:
        """Check a member's ``Hello`` and keep its link; True (the socket is the link's now).

        Raises AuthError after refusing it (see the module docstring for the checks).
        """
        host = self.host
        node_id = authenticate(host.session, sock, hello, peer, label)
        if hello.role != "member":
            refuse(sock, "not-a-member", f"a {hello.role} does not link to a leader", label)
        if hello.cluster not in (None, host.cluster):
            refuse(sock, "wrong-cluster", f"{host.name} leads cluster {host.cluster!r}, not {hello.cluster!r}", label)
        if host.session.tls:
            why = member_cluster_not_attested(host.cluster, host.identity.cluster if host.identity else None, peer)
            if why:
                log.warning("leader %s: refusing member %s (%s): %s", host.name, hello.name, node_id, why)
                refuse(sock, "cluster-not-attested", f"{host.name} leads cluster {host.cluster!r}: {why}", label)
        if hello.name in (RENDEZVOUS_NAME, host.name):
            refuse(sock, "name-taken", f"node name {hello.name!r} is taken", label)
        holder = host.directory.by_name(hello.name)
        holder_link = self.members.get(holder.node_id) if holder else None
        if holder is not None and holder.node_id != node_id and (holder_link is not None or holder.leader != host.node_id):
            refuse(sock, "name-taken", f"node name {hello.name!r} is already used by {holder.node_id}", label)
        why = self.names.why_not(hello.name, node_id)
        if why:
            refuse(sock, "name-taken", why, label)
        if node_id not in self.members and len(self.members) >= self.max_members:
            log.warning("leader %s: refusing member %s: the cluster has %d members already (MAX_MEMBERS)",
                        host.name, hello.name, len(self.members))
            refuse(sock, "cluster-full", f"{host.name} leads {len(self.members)} members, its most", label)
        entry = wire.NodeEntry(node_id=node_id, name=hello.name, cluster=host.cluster, leader=host.node_id,
                               role="member", addrs=hello.addrs, gateways=hello.gateways)
        old = self.members.pop(node_id, None)
        if old is not None:
            old.close("the same member linked again")
        link = Link(sock, decoder, label=f"member {hello.name} ({label})", on_message=self._on_message,
                    on_close=lambda link: self._on_close(link, entry), ping_interval_s=self._ping_interval_s, timeout_s=self._link_timeout_s)
        link.peer_id = node_id
        link.entry = entry
        link.send(wire.Welcome(entry, host.session.session_id))
        host.directory.put([entry])  # tells the other members
        self.members[node_id] = link
        self._broadcaster.welcome(link)  # (the whole directory, with the next broadcast)
        self.names.bind(hello.name, node_id)
        link.start()
        self._send_up(wire.Register((entry,)))
        log.info("member %s (%s) joined leader %s from %s", hello.name, node_id, host.name, label)
        return True

    def on_refused(self, delivery: Delivery) -> None:
        """The rendez-vous node refuses one of our members (a ``REFUSED_TOPIC`` message: JSON
        ``{"node_id", "code", "reason"}``): pass a ``Refuse`` on to it and drop it. Anything
        else (another sender, a bad payload, a member we no longer have) is logged and ignored."""
        if delivery.src != self.host.session.session_id:
            self._peer_log.warning(delivery.src, "leader %s: ignoring a refusal from %s, not the rendez-vous node",
                                   self.host.name, delivery.src)
            return
        try:
            notice = json.loads(delivery.payload)
            node_id, code, reason = str(notice["node_id"]), wire.check_name(notice["code"], "code"), str(notice["reason"])
        except (ValueError, TypeError, KeyError) as exc:
            log.warning("leader %s: ignoring a malformed refusal: %s", self.host.name, exc)
            return
        link = self.members.get(node_id)
        if link is None or link.closed:
            return
        log.warning("leader %s: the rendez-vous node refuses member %s (%s): %s", self.host.name,
                    link.entry.name if link.entry else "?", node_id, reason)
        if link.entry is not None:
            self.names.left(link.entry.name, node_id)  # (not ours to keep for it)
        link.send(wire.Refuse(code, reason[: wire.MAX_REASON_BYTES]))
        gevent.spawn_later(REFUSE_LINGER_S, link.close, f"refused by the rendez-vous node: {reason}")

    # --- member links ------------------------------------------------------------------------

    def on_directory_change(self, joined, left) -> None:
        """Pass a directory change on to every member (with the next broadcast: coalesced,
        encoded once; :class:`~gridsock.bootstrap.directory.Broadcaster`)."""
        if self.members:
            self._broadcaster.changed(joined, left)

    def _on_message(self, link: Link, message) -> None:
        if isinstance(message, wire.Routed):
            if message.src != link.peer_id:
                raise RemoteProtocolError(f"member sent a message with source {message.src}, not its own id")
            if message.topic == LEAVE_TOPIC and message.dst == RENDEZVOUS_NAME and link.entry is not None:
                self.names.left(link.entry.name, message.src)
            self._on_routed(message)
        else:
            raise RemoteProtocolError(f"unexpected {type(message).__name__} on a member link")

    def _on_close(self, link: Link, entry: wire.NodeEntry) -> None:
        if self.members.get(entry.node_id) is not link:
            return
        del self.members[entry.node_id]
        self.names.lost(entry.name, entry.node_id)
        log.info("member %s left leader %s: %s", entry.name, self.host.name, link.close_reason)
        self.host.directory.remove([entry.node_id])
        self._send_up(wire.Unregister((entry.node_id,)))
