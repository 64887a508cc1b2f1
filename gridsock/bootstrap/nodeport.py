"""The node port: one listening socket per node, and what tells its connections apart.

Theory of operation
-------------------
Every node listens on its *node port* (TCP, or a Unix socket for the nodes of one host). An
accepted connection gets a greenlet that reads the first byte without consuming it
(``MSG_PEEK``), within ``handshake_timeout_s``:

- the first byte of the data-connection preamble: a data connection of the assembly layer,
  handed over whole, first byte unread, to ``on_data(sock, label)`` (this module does not know
  the assembly layer; the node passes the callable and the byte in);
- anything else is a bootstrap handshake: TLS first in a TLS session (the node's certificate;
  a client certificate is optional here, each message below says whether it needs one), then
  one message:

  * ``Hello(role="probe")``: the rendez-vous node's dial-back probe, which decides ``inbound``
    in the directory; it must come from the rendez-vous certificate, and is closed at once;
  * ``Hello(role="peer")``: a meta link from another node (:func:`authenticate` names it), handed
    to ``on_peer(sock, decoder, hello, node_id, label)``;
  * ``Enroll`` or ``Hello(role="member")``: for the leader's service to its members
    (:class:`~gridsock.bootstrap.leader.LeaderService`); a member's node port refuses them with
    ``not-a-leader``.

A connection that is refused gets ``Refuse(code, reason)`` first. Whatever goes wrong in a
handshake (TLS, bad token, protocol error, silent peer) closes that connection with a log line
and nothing else: the accept loop never stops for a peer's fault.
"""
from __future__ import annotations

import logging
import ssl
from typing import TYPE_CHECKING, Callable, NoReturn, Optional

import gevent
import gevent.pool
from gevent import socket as gsocket

from .. import wire
from .._ratelog import RateLimitedLog
from ..errors import AuthError, BrokenStreamError, RemoteProtocolError, RoutingError
from ..session import peer_identity, server_context
from .link import HANDSHAKE_TIMEOUT_S, read_message, send_message, tune_socket
from .transport import Address, listen, tls_server

if TYPE_CHECKING:
    from .leader import LeaderService

__all__ = ["NodePort", "authenticate", "refuse", "ACCEPT_ERROR_PAUSE_S", "EARLY_MEMBER_WAIT_S"]

log = logging.getLogger(__name__)

# After a failed accept (out of descriptors, most often), wait this long before the next: the
# handshakes under way end or time out meanwhile, and give their descriptors back.
ACCEPT_ERROR_PAUSE_S = 0.1

# How long closing the port waits for the greenlets of its connections to end once killed.
CLOSE_TIMEOUT_S = 5.0
# Connections whose SYN carried data (TCP Fast Open: a ``reverse`` server's connection back,
# gridsock.components.tcp) that may wait at once for their handshake's end: the kernel's queue
# for them; beyond, a SYN's data waits for the handshake as without Fast Open.
FASTOPEN_QUEUE = 256
# A member that comes before its leader has joined the grid (a cluster started all at once)
# waits this long for it (for its certificate here, for its uplink to enroll through:
# LeaderService.enroll) rather than being turned away at once: each time costs the member a
# backoff and both sides a TLS handshake more (a join storm of 10 clusters of 50 made some
# 360 such retries, bench/bench_join.py). Well within the member's HANDSHAKE_TIMEOUT_S.
EARLY_MEMBER_WAIT_S = 5.0


def refuse(sock, code: str, reason: str, label: str) -> NoReturn:
    """Send ``Refuse(code, reason)`` (best effort) and raise AuthError(method=code)."""
    try:
        send_message(sock, wire.Refuse(code, reason))
    except OSError:
        pass
    raise AuthError(f"{reason} ({code})", peer=label, method=code)


def authenticate(session, sock, hello: wire.Hello, peer, label: str) -> str:
    """The node id of the sender of ``hello``.

    From its certificate (``peer``, in a TLS session) or, in a plain-TCP session, as it says
    after proving the join token. Refuses and raises AuthError if there is none.
    """
    if session.tls:
        if peer is None or peer.kind != "node":
            refuse(sock, "no-certificate", "a node certificate of this session is required", label)
        return peer.id
    if hello.node_id is None or not session.check_token(hello.token or ""):
        refuse(sock, "bad-token", "join token refused", label)
    return hello.node_id


class NodePort:
    """The node port of ``host`` (a node: ``name``, ``session``, ``identity``); see the module docstring.

    ``leader`` is the node's service to its members (None on a member); ``wait_joined(timeout)``
    waits until the node has joined the grid once, True if it has.
    """

    def __init__(
        self,
        host,
        listen_address: Address,
        *,
        on_data: Callable[[object, str], None],
        data_first_byte: bytes,
        on_peer: Callable[[object, wire.Decoder, wire.Hello, str, str], None],
        leader: Optional["LeaderService"] = None,
        wait_joined: Callable[[float], bool] = lambda timeout: False,
        handshake_timeout_s: float = HANDSHAKE_TIMEOUT_S,
    ) -> None:
        self.host = host
        self.listen_address = listen_address
        self.leader = leader
        self._on_data = on_data
        self._data_first_byte = data_first_byte[:1]
        self._on_peer = on_peer
        self._handshake_timeout_s = handshake_timeout_s
        self._wait_joined = wait_joined
        self._sock: Optional[gsocket.socket] = None
        self._server_ctx: Optional[ssl.SSLContext] = None
        # What peers make us log about their handshakes, rate-limited per host (gridsock._ratelog).
        self._peer_log = RateLimitedLog(log)
        # The greenlets serving accepted connections until they are handed over or dropped.
        self._handlers = gevent.pool.Group()

    def open(self) -> "NodePort":
        """Bind and listen. Raises ConfigError/ConnectError if the address cannot be had."""
        self._sock = listen(self.listen_address)
        if not self.listen_address.is_unix and hasattr(gsocket, "TCP_FASTOPEN"):
            try:  # (takes effect where the host's net.ipv4.tcp_fastopen has the server bit, 0x2)
                self._sock.setsockopt(gsocket.IPPROTO_TCP, gsocket.TCP_FASTOPEN, FASTOPEN_QUEUE)
            except OSError as exc:
                log.debug("node port %s: no TCP Fast Open: %s", self.listen_address, exc)
        return self

    def _bound(self) -> gsocket.socket:
        if self._sock is None:
            raise RuntimeError("the node port is not open (start the node first)")
        return self._sock

    @property
    def address(self) -> Address:
        """The bound address (the kernel's choice when the port was 0)."""
        if self.listen_address.is_unix:
            return self.listen_address
        host, port = self._bound().getsockname()[:2]
        return Address(host=host, port=port)

    def serve(self) -> None:
        """Accept connections until the socket is closed (or the greenlet killed)."""
        listener = self._bound()
        while True:
            try:
                sock, addr = listener.accept()
            except OSError as exc:
                if listener.fileno() == -1:  # closed by close(): the node is stopping
                    return
                # Out of descriptors (EMFILE, ENFILE), buffers, or a connection gone before we
                # took it: peers can cause all of these; the port must outlive them.
                self._peer_log.warning("accept", "node %s: accept on the node port failed: %s", self.host.name, exc)
                gevent.sleep(ACCEPT_ERROR_PAUSE_S)
                continue
            tune_socket(sock)
            self._handlers.spawn(self._handle, sock, addr)

    def close(self) -> None:
        """Stop listening, and end the connections still in their handshake or waiting to be
        matched (a stopping node leaves no greenlet of its port behind)."""
        if self._sock is not None:
            self._sock.close()
        others = [glet for glet in self._handlers if glet is not gevent.getcurrent()]
        gevent.killall(others, block=True, timeout=CLOSE_TIMEOUT_S)

    def _handle(self, sock, addr) -> None:
        host = self.host
        label = f"{addr[0]}:{addr[1]}" if isinstance(addr, tuple) else f"unix:{self.listen_address.path}"
        handed_over = False
        try:
            with gevent.Timeout(self._handshake_timeout_s, TimeoutError("silent peer")):
                first = sock.recv(1, gsocket.MSG_PEEK)
            if first == self._data_first_byte:
                handed_over = True
                try:
                    self._on_data(sock, label)
                except gevent.GreenletExit:  # the node is stopping: the connection goes with it
                    sock.close()
                    raise
                return
            peer = None
            if host.session.tls:
                if host.identity is None:
                    self._wait_joined(EARLY_MEMBER_WAIT_S)  # (not enrolled yet: see EARLY_MEMBER_WAIT_S)
                    if host.identity is None:
                        return  # nothing to offer
                if self._server_ctx is None:
                    self._server_ctx = server_context(host.session, host.identity, require_client_cert=False)
                sock = tls_server(sock, self._server_ctx, timeout=self._handshake_timeout_s)
                peer = peer_identity(sock)
            decoder = wire.Decoder(peer=label)
            message = read_message(sock, decoder, timeout=self._handshake_timeout_s)
            if isinstance(message, wire.Hello) and message.role == "probe":
                if host.session.tls and (peer is None or peer.kind != "rendezvous"):
                    raise AuthError("a dial-back probe must come from the rendez-vous node", peer=label)
                return
            if isinstance(message, wire.Hello) and message.role == "peer":
                peer_id = authenticate(host.session, sock, message, peer, label)
                self._on_peer(sock, decoder, message, peer_id, label)
                handed_over = True
                return
            if self.leader is None:
                refuse(sock, "not-a-leader", "this node is a member, not a leader", label)
            if isinstance(message, wire.Enroll):
                self.leader.enroll(sock, message, label)
            elif isinstance(message, wire.Hello):
                handed_over = self.leader.accept(sock, decoder, message, peer, label)
            else:
                raise RemoteProtocolError(f"expected Enroll or Hello, got {type(message).__name__}")
        except AuthError as exc:
            self._peer_log.warning(_peer_key(addr), "node %s refused %s: %s", host.name, label, exc)
        except RemoteProtocolError as exc:
            self._peer_log.warning(_peer_key(addr), "node %s dropped %s: protocol error: %s", host.name, label, exc)
        except (OSError, TimeoutError, BrokenStreamError, RoutingError) as exc:
            self._peer_log.info(_peer_key(addr), "node %s: connection from %s ended during handshake: %s",
                                host.name, label, exc)
        finally:
            if not handed_over:
                sock.close()


def _peer_key(addr) -> str:
    """The key under which a peer's log lines are rate-limited: its host (any port), or the Unix
    socket's peers as one."""
    return str(addr[0]) if isinstance(addr, tuple) and addr else "unix"
