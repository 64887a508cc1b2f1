"""A node's uplink: its one link towards the rendez-vous node (a leader's) or its leader (a member's).

Theory of operation
-------------------
:meth:`Uplink.serve` runs until :meth:`Uplink.stop`, in a loop of *attempts*:

1. pick the target: the leader's node port for a member, a rendez-vous address of the
   session for a leader (with several, docs/federation.md: ``session.rendezvous_host`` and
   ``rendezvous_port`` at start, the first of the list unless ``gridsock node --rendezvous``
   named another one of it, then, each time an attempt fails or an established uplink is lost, the next one in
   the list's order, round and round: a leader fails over to the next rendez-vous node and
   stays there);
2. in a TLS session with no certificate yet, *enroll*: dial, TLS with no client certificate,
   ``Enroll`` (the join token and a CSR), ``Enrolled`` gives the certificate and the node id.
   A member's leader forwards the ``Enroll`` to the rendez-vous node, so members enroll with no
   route out of their cluster;
3. dial (through the SSH gateway's tunnel if the node has one, else TCP or a Unix socket),
   secure (mutual TLS; the peer must be the session's rendez-vous node, or a node), send
   ``Hello`` (with the node-port addresses to advertise) and wait for ``Welcome`` (the node's
   directory entry) or ``Refuse``;
4. run the :class:`~gridsock.bootstrap.link.Link` until it closes. Routed messages go to
   ``on_routed``; directory updates are applied here, keeping this node and its members.
   A leader registers all its members on every new uplink, so a restarted rendez-vous node
   gets the whole grid back;
5. when it closes, forget what was learnt through it (the directory keeps only this node and
   its members; in a session with several rendez-vous nodes, only after
   ``FAILOVER_GRACE_S`` without a new uplink, whose snapshot replaces it anyway, so that nobody
   leaves a directory while a leader fails over) and wait before the next attempt: exponential backoff from
   ``reconnect_initial_s`` doubling up to ``reconnect_max_s``, times a jitter in [0.5, 1) so
   that the nodes of a restarted grid do not all dial at once. A successful attempt resets it.

Clusters: a node given a cluster's session file (``session.cluster``; its join token is the
cluster's) enrolls with that token and gets a certificate that names the cluster; one whose
saved identity does not name it enrolls again (a new id) before it links. ``Hello`` declares
``host.cluster``, or, when the node was given none, the cluster its certificate names. A
declaration the certificate does not back is refused (``cluster-not-attested``, fatal).

A ``Refuse`` whose code is in :data:`FATAL_REFUSALS` ends the loop (at the handshake, or on an
established link: a leader passes on the rendez-vous node's refusal of a member's name): dialing again cannot help;
the error is kept in ``fatal_error`` for ``Node.wait_joined`` and ``serve_forever`` to raise.

The uplink writes what it learns into its host (the node): ``identity`` and ``node_id`` at
enrollment (and saves the identity in the host's ``state``, a
:class:`~gridsock.session.NodeState`, when it has one, so that the node keeps its id after a
restart), ``entry`` and ``cluster`` at ``Welcome``. It reads ``session``, ``name``, ``role``,
``cluster``, ``advertise``, ``address`` (the node port), ``ssh_gateway`` (and
``socks_gateway`` if it has one: both go to ``Hello.gateways``), ``leader_address`` and
``directory``.
"""
from __future__ import annotations

import logging
import random
import ssl
import time
from typing import Any, Callable, Dict, Iterator, List, Optional

import gevent.event

from .. import __version__, wire
from ..errors import AuthError, BrokenStreamError, ConfigError, ConnectError, GridsockError, RemoteProtocolError
from ..session import Identity, client_context, new_node_key, peer_identity
from .link import HANDSHAKE_TIMEOUT_S, LINK_TIMEOUT_S, PING_INTERVAL_S, Link, read_message, send_message
from .transport import CONNECT_TIMEOUT_S, Address, dial, tls_client

__all__ = ["Uplink", "backoff_delays", "RECONNECT_INITIAL_S", "RECONNECT_MAX_S", "FATAL_REFUSALS", "UPLINK_HISTORY_LENGTH"]

log = logging.getLogger(__name__)

# First wait before dialing a lost uplink again; it doubles up to RECONNECT_MAX_S.
RECONNECT_INITIAL_S = 0.2
RECONNECT_MAX_S = 5.0
# Refusals after which dialing again cannot help. A name or a cluster bound to another node is
# one: the node must be given another name, or the operator must release it (a node restarted
# with its state directory is its holder, and never gets this). So is a cluster that the node's
# certificate does not attest: it needs that cluster's session file.
FATAL_REFUSALS = ("bad-token", "no-certificate", "name-reserved", "not-a-leader", "wrong-cluster", "name-taken",
                  "cluster-taken", "cluster-not-attested")
# Uplink ups and downs kept for `gridsock status` (the latest ones).
UPLINK_HISTORY_LENGTH = 20


def backoff_delays(initial_s: float = RECONNECT_INITIAL_S, max_s: float = RECONNECT_MAX_S, *,
                   rng: random.Random | None = None) -> Iterator[float]:
    """The waits between failed attempts: ``initial_s`` doubling up to ``max_s``, each times a
    jitter drawn from [0.5, 1) (``rng``'s ``uniform``), forever."""
    rng = rng if rng is not None else random.Random()
    backoff = initial_s
    while True:
        yield backoff * rng.uniform(0.5, 1.0)
        backoff = min(backoff * 2, max_s)


class Uplink:
    """Dials, keeps and redials the uplink of ``host`` (a node); see the module docstring.

    ``on_routed(message)`` receives the routed messages that arrive on it; ``members()`` returns
    the directory entries of the node's live members (a leader's; none for a member).
    """

    def __init__(
        self,
        host,
        *,
        on_routed: Callable[[wire.Routed], None],
        members: Callable[[], List[wire.NodeEntry]] = list,
        reconnect_initial_s: float = RECONNECT_INITIAL_S,
        reconnect_max_s: float = RECONNECT_MAX_S,
        connect_timeout_s: float = CONNECT_TIMEOUT_S,
        handshake_timeout_s: float = HANDSHAKE_TIMEOUT_S,
        ping_interval_s: float = PING_INTERVAL_S,
        link_timeout_s: float = LINK_TIMEOUT_S,
        rng: random.Random | None = None,
    ) -> None:
        self.host = host
        self.link: Optional[Link] = None
        self.history: List[dict] = []
        self.fatal_error: Optional[GridsockError] = None
        self.joined = gevent.event.Event()  # set at the first Welcome, never cleared
        self._on_routed = on_routed
        self._members = members
        self._reconnect_initial_s = reconnect_initial_s
        self._reconnect_max_s = reconnect_max_s
        self._connect_timeout_s = connect_timeout_s
        self._handshake_timeout_s = handshake_timeout_s
        self._ping_interval_s = ping_interval_s
        self._link_timeout_s = link_timeout_s
        self._rng = rng if rng is not None else random.Random()
        self._stopped = gevent.event.Event()
        self._client_ctx: Optional[tuple] = None
        self._refused: Optional[AuthError] = None  # a Refuse that came on an established link
        self._target_index: Optional[int] = None  # (a leader's: which of the session's rendez-vous nodes it dials)
        self._forget_timer: Optional[gevent.Greenlet] = None  # (several rendez-vous nodes: see _forget)

    @property
    def up(self) -> bool:
        """True while the uplink is established."""
        return self.link is not None and not self.link.closed

    def target(self) -> Address:
        """Where the uplink goes: the leader's node port (member) or the rendez-vous node (leader)."""
        host = self.host
        if host.role == "member":
            return host.leader_address
        addrs = host.session.rendezvous_addresses
        if self._target_index is None:  # (the session's own rendez-vous address first: gridsock node --rendezvous)
            first = (host.session.rendezvous_host, host.session.rendezvous_port)
            self._target_index = addrs.index(first) if first in addrs else 0
        rv_host, rv_port = addrs[self._target_index % len(addrs)]
        return Address(host=rv_host, port=rv_port)

    def _next_target(self) -> None:
        """Fail over: the next attempt dials the next rendez-vous node of the session's list."""
        if self.host.role != "member" and self._target_index is not None:
            self._target_index = (self._target_index + 1) % len(self.host.session.rendezvous_addresses)

    def serve(self) -> None:
        """Keep the uplink up until ``stop()``, or until a fatal refusal (kept in ``fatal_error``)."""
        delays = self._backoff()
        while not self._stopped.is_set():
            target = self.target()
            try:
                self._run(target)
                delays = self._backoff()  # it was up: the next failure starts from the first wait
            except AuthError as exc:
                if exc.method in FATAL_REFUSALS:
                    log.error("node %s refused by %s: %s", self.host.name, target, exc)
                    self.fatal_error = exc
                    return
                log.warning("node %s: uplink to %s failed: %s", self.host.name, target, exc)
            except (ConnectError, OSError, TimeoutError, RemoteProtocolError, BrokenStreamError) as exc:
                log.warning("node %s: uplink to %s failed: %s", self.host.name, target, exc)
            self._record("down")
            self._next_target()
            if self._stopped.wait(next(delays)):
                return

    def _backoff(self) -> Iterator[float]:
        return backoff_delays(self._reconnect_initial_s, self._reconnect_max_s, rng=self._rng)

    def stop(self, reason: str = "node stopping") -> None:
        """End ``serve()`` and close the link (the caller kills the greenlet running ``serve``)."""
        self._stopped.set()
        if self._forget_timer is not None:
            self._forget_timer.kill(block=False)
            self._forget_timer = None
        if self.link is not None:
            self.link.close(reason)

    def send(self, message) -> bool:
        """Queue ``message`` on the uplink; False if it is down."""
        link = self.link
        return link is not None and link.send(message)

    def client_context(self) -> ssl.SSLContext:
        """The TLS client context with the node's certificate (made once per identity)."""
        identity = self.host.identity
        if self._client_ctx is None or self._client_ctx[0] is not identity:
            self._client_ctx = (identity, client_context(self.host.session, identity))
        return self._client_ctx[1]

    # --- one attempt -------------------------------------------------------------------------

    def _record(self, state: str, **info) -> None:
        self.history.append({"state": state, "at": time.time(), **info})
        del self.history[:-UPLINK_HISTORY_LENGTH]

    def _dial(self, target: Address):
        """Return ``(sock, local_ip)``: a connected socket to the uplink target."""
        gateway = self.host.ssh_gateway
        if gateway is not None:
            from .sshtunnel import open_ssh_tunnel

            assert target.host is not None  # a gateway is for leaders, whose target is TCP
            return open_ssh_tunnel(gateway, target.host, target.port), None
        sock = dial(target, timeout=self._connect_timeout_s)
        local_ip = None if target.is_unix else sock.getsockname()[0]
        return sock, local_ip

    def _secure(self, sock, *, expect: str):
        host = self.host
        if not host.session.tls:
            return sock
        tls = tls_client(sock, self.client_context(), timeout=self._handshake_timeout_s)
        peer = peer_identity(tls)
        ok = peer is not None and (
            peer.kind == "rendezvous" and peer.id == host.session.session_id if expect == "rendezvous" else peer.kind == "node"
        )
        if not ok:
            tls.close()
            raise AuthError(f"the peer presented {peer}, not the expected {expect}", peer=str(self.target()))
        return tls

    def _expect(self) -> str:
        return "rendezvous" if self.host.role == "leader" else "leader"

    def _enroll(self, target: Address) -> None:
        """Get a certificate: prove the join token to the rendez-vous node (or via the leader)."""
        host = self.host
        key_pem, csr_pem = new_node_key()
        sock, _ = self._dial(target)
        try:
            sock = self._secure(sock, expect=self._expect())
            send_message(sock, wire.Enroll(token=host.session.join_token, csr_pem=csr_pem.decode(), name=host.name))
            reply = read_message(sock, wire.Decoder(peer=str(target)), timeout=self._handshake_timeout_s)
        finally:
            sock.close()
        if isinstance(reply, wire.Refuse):
            raise AuthError(f"enrollment refused: {reply.reason}", peer=str(target), method=reply.code)
        if not isinstance(reply, wire.Enrolled):
            raise RemoteProtocolError(f"expected Enrolled, got {type(reply).__name__}", peer=str(target))
        try:
            identity = Identity(reply.cert_pem.encode(), key_pem)
        except ConfigError as exc:
            raise RemoteProtocolError(f"the certificate we were sent is unusable: {exc}", peer=str(target)) from None
        host.identity = identity
        if identity.node_id != reply.node_id:
            raise RemoteProtocolError("the certificate does not carry the node id we were given", peer=str(target))
        host.node_id = reply.node_id
        log.info("node %s enrolled as %s", host.name, host.node_id)
        state = getattr(host, "state", None)
        if state is not None:
            try:
                state.save_identity(identity)
            except OSError as exc:
                log.warning("node %s: cannot save its identity in %s (it will get a new id when restarted): %s",
                            host.name, state.path, exc)

    def _advertised(self, local_ip: Optional[str]) -> tuple:
        host = self.host
        if host.advertise is not None:
            return (str(host.advertise),)
        bound = host.address
        if bound.is_unix:
            return ()
        if bound.host not in ("0.0.0.0", "::"):
            return (str(bound),)
        if local_ip:
            return (str(Address(host=local_ip, port=bound.port)),)
        return ()

    def _gateways(self) -> Dict[str, Any]:
        """``Hello``'s ``gateways``: the node's own (:func:`gridsock.rules.own_gateways`), which
        the rendez-vous node or the leader puts in its directory entry for every node to see.
        (Empty if this version's ``Hello`` has no such field.)"""
        from ..rules import own_gateways

        gateways = own_gateways(self.host)
        return {"gateways": gateways} if gateways and "gateways" in wire.Hello.CHECKS else {}

    def _identity_lacks_cluster(self) -> bool:
        """True if the node holds a cluster's join token (a cluster session file), means to join
        that cluster, and its identity's certificate does not name it (made before, or with
        another session file): it must enroll again to be attested."""
        host = self.host
        wanted = getattr(host.session, "cluster", None)
        return (wanted is not None and host.cluster in (None, wanted)
                and getattr(host.identity, "cluster", None) != wanted)

    def _declared_cluster(self) -> Optional[str]:
        """The cluster ``Hello`` names: the node's own, or else the one its certificate names."""
        host = self.host
        if host.cluster is not None or not host.session.tls or host.identity is None:
            return host.cluster
        return host.identity.cluster

    def _local_entries(self) -> List[wire.NodeEntry]:
        """This node and its members: what the directory keeps when the uplink is lost."""
        local = [self.host.entry] if self.host.entry else []
        return local + list(self._members())

    def _run(self, target: Address) -> None:
        """One attempt: enroll if needed, link, serve the link until it closes."""
        host = self.host
        if host.session.tls and host.identity is not None and self._identity_lacks_cluster():
            log.warning("node %s: its identity (node %s) does not name cluster %s, whose join token it holds:"
                        " enrolling again (a new id)", host.name, host.identity.node_id, host.session.cluster)
            host.identity = None
        if host.session.tls and host.identity is None:
            self._enroll(target)
        sock, local_ip = self._dial(target)
        try:
            sock = self._secure(sock, expect=self._expect())
            hello = wire.Hello(
                name=host.name, cluster=self._declared_cluster(), role=host.role, addrs=self._advertised(local_ip),
                software=f"gridsock {__version__}",
                node_id=None if host.session.tls else host.node_id,
                token=None if host.session.tls else host.session.join_token,
                **self._gateways(),
            )
            send_message(sock, hello)
            decoder = wire.Decoder(peer=str(target))
            reply = read_message(sock, decoder, timeout=self._handshake_timeout_s)
        except BaseException:
            sock.close()
            raise
        if isinstance(reply, wire.Refuse):
            sock.close()
            raise AuthError(f"refused: {reply.reason}", peer=str(target), method=reply.code)
        if not isinstance(reply, wire.Welcome):
            sock.close()
            raise RemoteProtocolError(f"expected Welcome, got {type(reply).__name__}", peer=str(target))
        host.entry = reply.entry
        host.cluster = reply.entry.cluster
        link = Link(sock, decoder, label=f"uplink to {'rendez-vous' if host.role == 'leader' else 'leader'} {target}",
                    on_message=self._on_message, ping_interval_s=self._ping_interval_s,
                    timeout_s=self._link_timeout_s)
        self.link = link
        if self._forget_timer is not None:  # (the new uplink's snapshot replaces what we kept)
            self._forget_timer.kill(block=False)
            self._forget_timer = None
        host.directory.put([host.entry])
        if host.role == "leader":
            entries = list(self._members())
            for i in range(0, len(entries), wire.MAX_ENTRIES_PER_UPDATE):
                link.send(wire.Register(tuple(entries[i : i + wire.MAX_ENTRIES_PER_UPDATE])))
        link.start()
        self._record("up", target=str(target))
        self.joined.set()
        log.info("node %s (%s) joined session %s as %s via %s", host.name, host.node_id, host.session.session_id,
                 host.role, target)
        link.join()
        self.link = None
        if host.role == "leader" and len(host.session.rendezvous_addresses) > 1 and not self._stopped.is_set():
            from .federation import FAILOVER_GRACE_S

            # Another rendez-vous node has the same directory: keep ours while we fail over.
            self._forget_timer = gevent.spawn_later(FAILOVER_GRACE_S, self._forget_if_down)
        else:
            self._forget()
        refused, self._refused = self._refused, None
        if refused is not None:
            raise refused

    def _forget(self) -> None:
        """What we learnt through the uplink is stale now; keep ourselves, our members and the
        peers a live meta link vouches for (gridsock.meta, "Without a rendez-vous")."""
        host = self.host
        meta = getattr(host, "meta", None)
        vouched = meta.vouched() if meta is not None else []
        host.directory.apply(self._local_entries() + vouched, (), replace=True)

    def _forget_if_down(self) -> None:
        self._forget_timer = None
        if not self.up:
            self._forget()

    def _on_message(self, link: Link, message) -> None:
        if isinstance(message, wire.Routed):
            self._on_routed(message)
        elif isinstance(message, wire.DirectoryUpdate):
            host = self.host
            meta = getattr(host, "meta", None)
            if meta is not None:  # (peers a live meta link vouches for stay: gridsock.meta)
                message = meta.guard(message)
            host.directory.apply_update(message, keep=self._local_entries())
            mine = host.directory.get(host.node_id)
            if mine is not None:
                host.entry = mine
        elif isinstance(message, wire.Refuse):
            self._refused = AuthError(f"refused: {message.reason}", peer=link.label, method=message.code)
            link.close(f"refused: {message.reason} ({message.code})")
        else:
            raise RemoteProtocolError(f"unexpected {type(message).__name__} on the uplink")
