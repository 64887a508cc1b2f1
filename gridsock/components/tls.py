"""The ``tls`` filter: mutual TLS between two session nodes, over any stream.

Theory of operation
-------------------
The stdlib ``ssl`` module drives OpenSSL through two memory BIOs (``SSLContext.wrap_bio``), so
TLS runs over whatever stream lies below: TCP, the relay through the bootstrap channel, a
compression filter, another ``tls`` layer, an in-memory pair. The ``SSLObject`` never touches
I/O itself: we feed it the bytes read from the lower stream (the incoming BIO) and send the
records it produces (the outgoing BIO).

Handshake (:meth:`TlsFilter.wrap`): the initiator is the TLS client, the other side the server;
both present their node certificate and require the peer's (mutual TLS, the session CA as the
only trust anchor, see :mod:`gridsock.session`). Then the peer's identity is checked: a node
certificate, and the node ``context.peer_id`` when that is set (a NAT that remaps ports can land
a connection on the wrong node). Any failure closes the lower stream. The whole handshake has
a deadline, :data:`TLS_HANDSHAKE_TIMEOUT_S`.

TLS 1.3 caveat: the client's handshake completes before the server has checked the client's
certificate (and the server's own identity check comes after that), so an initiator the
acceptor refuses still gets a stream from ``wrap``: the refusal arrives as BrokenStreamError at
its first ``receive_some`` (an alert, or the lower stream ending without close_notify). A layer
above that needs a positive acceptance must exchange a first message (docs/tls.md). So
:meth:`TlsFilter.wrap` waits for the server's verdict (its session ticket, or its first data: a
second round trip) only when the client cannot know it: in the common case, a node identity
issued by the session's own CA (:func:`_vouched`), the server accepts it, and the filter costs
one round trip; a client with any other certificate still has a refusal fail ``wrap``.

Resumption (TLS 1.3 session tickets): a full handshake costs both ends their CPU work (key
exchange, a signature each, the other's certificate parsed and checked against the CA: some
2.5 ms here, over a millisecond of it on the connect's path). So an initiator keeps the newest
ticket a server node gave it after a full handshake (:func:`_keep_ticket`, at most
:data:`TLS_TICKETS_KEPT` peers) and offers it on its connections to that node for
:data:`TLS_TICKET_REUSE_S` (:func:`_ticket_for`; then a full handshake gives a new one): the server, whose context is the same object for the process's life
(:func:`_ssl_context`), resumes with a key exchange and no certificate work, its identity
checks unchanged (both ends' certificates are in the resumed session). A ticket is offered only
on connections meant for the node it came from (kept by its node id); another node that answers
there (a NAT's doing) cannot read it, makes a full handshake and is refused by the node id
check, as a server that cannot use it (restarted: new ticket keys) makes a full handshake. A resumed peer whose certificate has
expired since is refused as a full handshake would refuse it (:func:`_still_valid`). The
server issues :data:`TLS_TICKETS_PER_HANDSHAKE` ticket per handshake (OpenSSL's default is 2:
each costs the server work after every handshake, and one is all a client keeps).

Early handshake (:class:`EarlyTls`): the first flights can travel with the assembly. On a
connect whose lowest filter is ``tls``, the client starts its handshake before any connection
exists (:meth:`TlsFilter.begin`) and its ClientHello goes in the assembly request; the server
feeds it to its own ``SSLObject`` when it accepts the request (:meth:`TlsFilter.answer_early`)
and its first flight (ServerHello to Finished) goes back in the answer. When the method's
connection is up and nominated, :meth:`TlsFilter.wrap` continues both handshakes where they
are: the client has everything it needs and sends its last flight (its certificate, its
Finished) without waiting, and the server reads that flight from the connection. So ``tls``
costs a connect no round trip of its own: the request's round trip carries it. Nothing is
trusted to the meta channel: these are the very records a handshake over the connection would
carry, bound into the transcript that both Finished messages check, and the server's
certificate travels encrypted as ever. A server that does not know the field (an older node)
answers without a flight; the client then sends its ClientHello over the connection and the
handshake runs as before.

Data (:class:`TlsStream`):

- ``send_all`` encrypts at most :data:`MAX_RECORD_PLAINTEXT_BYTES` per ``SSLObject.write`` (one
  record) and flushes the outgoing BIO to the lower stream every :data:`SEND_BATCH_BYTES`, so the
  ciphertext buffered is bounded whatever the size of the caller's buffer.
- ``receive_some`` decrypts what the incoming BIO holds; when that yields no plaintext (nothing
  buffered, a partial record, or only TLS 1.3 session tickets, which arrive after the handshake
  and carry no data) it reads the lower stream once more and retries. On an initiator, the
  first ticket after a full handshake is kept for the next connections to that node (above).
- ``send_eof`` sends close_notify (``SSLObject.unwrap``, which is only a half-close in TLS 1.3),
  then ``send_eof`` below; the peer's data is still received. The peer's close_notify makes
  ``receive_some`` return ``b""``. The lower stream ending *without* close_notify is a truncation
  (an attacker, or a peer that crashed): BrokenStreamError. Our own ``send_eof`` always sends
  close_notify, so a well-behaved gridsock peer never looks truncated.
- ``close`` is an abort: it closes the lower stream without close_notify, so the peer's
  ``receive_some`` raises BrokenStreamError. Call ``send_eof`` first for a clean end.

Concurrency: one sender and one receiver greenlet may use a stream at once, and they share the
``SSLObject``. Its methods never yield (the BIOs are in memory), so greenlets cannot interleave
inside one call; ``_ssl_lock`` is nevertheless held around each of them, which costs nothing
uncontended and keeps "one SSLObject call at a time" true should one ever yield (a callback).
What can interleave is the trip from the outgoing BIO to the lower stream, which yields: if the
sender took records out of the BIO and then yielded inside ``lower.send_all``, and the receiver
(whose reads can produce records: a TLS 1.3 KeyUpdate answer, an alert) took later records and
sent them first, the peer would see records out of order. So records leave the BIO only under
``_send_lock``, and whoever holds it sends everything the BIO holds, including what other
greenlets appended meanwhile, before releasing it. The receiver never waits for that lock: if
the sender holds it, the sender will carry the receiver's records too. Were the receiver to
wait, two peers whose senders both block on full lower streams would deadlock, each receiver
waiting for its own sender instead of reading.

OpenSSL quirk handled in ``send_eof``: the second ``SSL_shutdown`` that ``unwrap`` makes
(trying to read the peer's close_notify) fails with APPLICATION_DATA_AFTER_CLOSE_NOTIFY if
application records are still waiting in the incoming BIO. So ``send_eof`` first decrypts those
into a plaintext buffer that ``receive_some`` serves before anything else.
"""
from __future__ import annotations

import logging
import ssl
import sys
import time
import weakref
from collections import OrderedDict
from typing import Any, Dict, List, Optional, Tuple

import gevent
import gevent.lock

from ..errors import AuthError, BrokenStreamError, ConfigError
from ..session import client_context, peer_identity, server_context
from ..streams import DEFAULT_RECEIVE_BYTES, Stream

__all__ = [
    "EarlyTls",
    "TlsFilter",
    "TlsStream",
    "TLS_HANDSHAKE_TIMEOUT_S",
    "MAX_RECORD_PLAINTEXT_BYTES",
    "SEND_BATCH_BYTES",
    "RAW_RECEIVE_BYTES",
    "TLS_TICKETS_KEPT",
    "TLS_TICKET_REUSE_S",
    "TLS_TICKETS_PER_HANDSHAKE",
]

log = logging.getLogger(__name__)

# A handshake is two round trips at most: this allows for slow relays and loaded hosts, frees
# what an unauthenticated peer holds soon, and stays below the assembly's deadline
# (assembly.ASSEMBLY_TIMEOUT_S) so that a stuck handshake is reported as such. The bootstrap
# links use the same value (bootstrap.link.HANDSHAKE_TIMEOUT_S).
TLS_HANDSHAKE_TIMEOUT_S = 10.0
# The TLS maximum (RFC 8446 section 5.1): one SSLObject.write makes one record.
MAX_RECORD_PLAINTEXT_BYTES = 16 * 1024
# Ciphertext gathered before each lower.send_all: several records per call amortise its cost
# (128 KiB measured ~15 % faster than 64 KiB over loopback TCP), and bound what a sender buffers.
SEND_BATCH_BYTES = 128 * 1024
# What one read of the lower stream asks for. The incoming BIO holds at most this plus a
# partial record: we read below only once the SSLObject has decrypted everything it could.
RAW_RECEIVE_BYTES = 128 * 1024

# Server nodes whose newest ticket an initiator keeps (per identity and session): a node talks
# to a few hundred peers at most; the one used least recently is forgotten first.
TLS_TICKETS_KEPT = 1024
# A ticket is offered for this long after it was issued at most (OpenSSL's servers accept them
# for 2 hours): resumption skips the certificate checks, so a peer's certificate is looked at in
# full at least this often (an expired one is refused on resumption too: _still_valid).
TLS_TICKET_REUSE_S = 3600.0
# Tickets a server sends after each handshake (OpenSSL's default is 2).
TLS_TICKETS_PER_HANDSHAKE = 1
# The largest first flights carried by the assembly (a ClientHello with a ticket is some 500
# bytes; a server's full first flight, its certificate included, some 2 KiB): what is larger is
# refused by the wire checks (wire.MAX_TLS_HELLO_BYTES, wire.MAX_TLS_FLIGHT_BYTES).
# Reads of a new initiator's stream that look for the server's ticket: it comes right after the
# handshake, with or before the first data; a server that sends none is not asked forever.
_TICKET_LOOKS = 8

_UNLIMITED = sys.maxsize

# Contexts cost milliseconds to build (they load the key and certificate from files): one per
# (identity, session, role), kept while the identity lives.
_contexts: "weakref.WeakKeyDictionary[Any, Dict[Tuple[Any, bool], ssl.SSLContext]]"
_contexts = weakref.WeakKeyDictionary()


def _ssl_context(session, identity, initiator: bool) -> ssl.SSLContext:
    """The (cached) client or server context presenting ``identity`` in ``session``."""
    per_identity = _contexts.setdefault(identity, {})
    ctx = per_identity.get((session, initiator))
    if ctx is None:
        if initiator:
            ctx = client_context(session, identity)
        else:
            ctx = server_context(session, identity, require_client_cert=True)
        # Renegotiation (TLS 1.2) would make writes wait for reads; gridsock never needs it.
        ctx.options |= ssl.OP_NO_RENEGOTIATION
        if not initiator:
            ctx.num_tickets = TLS_TICKETS_PER_HANDSHAKE
        per_identity[(session, initiator)] = ctx
    return ctx


# The newest ticket of each server node, per initiator identity, with the client context it
# belongs to (OpenSSL resumes a session only through its own context): keyed by (session, node
# id), oldest use first.
_tickets: "weakref.WeakKeyDictionary[Any, OrderedDict[Tuple[Any, str], Tuple[ssl.SSLContext, ssl.SSLSession]]]"
_tickets = weakref.WeakKeyDictionary()


def _ticket_for(session, identity, peer_id: Optional[str], context: ssl.SSLContext) -> Optional[ssl.SSLSession]:
    """The ticket to offer node ``peer_id`` through ``context`` (see "Resumption"), or None."""
    kept = _tickets.get(identity)
    if kept is None or peer_id is None:
        return None
    key = (session, peer_id)
    found = kept.get(key)
    if found is None:
        return None
    issued_through, ticket = found
    if issued_through is not context or time.time() - ticket.time >= min(TLS_TICKET_REUSE_S, ticket.timeout):
        del kept[key]
        return None
    kept.move_to_end(key)
    return ticket


def _keep_ticket(session, identity, peer_id: str, context: ssl.SSLContext, ticket: ssl.SSLSession) -> None:
    """Keep ``ticket`` (it has one: ``has_ticket``), issued through ``context``, for the next
    connection to ``peer_id``."""
    kept = _tickets.setdefault(identity, OrderedDict())
    kept[(session, peer_id)] = (context, ticket)
    kept.move_to_end((session, peer_id))
    while len(kept) > TLS_TICKETS_KEPT:
        kept.popitem(last=False)


def _forget_ticket(session, identity, peer_id: Optional[str]) -> None:
    """Offer ``peer_id`` no ticket any more (its connection failed after resuming)."""
    kept = _tickets.get(identity)
    if kept is not None and peer_id is not None:
        kept.pop((session, peer_id), None)


# The clock certificates are checked against on resumption (tests move it).
_now = time.time


# Certificates' notAfter texts, parsed (strptime costs 0.2 ms, on a resumed connect's path):
# a node meets a few hundred peers' certificates; beyond this many the cache starts again.
_EXPIRIES_KEPT = 4096
_expiries: Dict[str, float] = {}


def _still_valid(sslobj) -> bool:
    """False if the peer's certificate in a resumed session has expired since it was checked
    (a full handshake checks it; resumption does not)."""
    cert = sslobj.getpeercert()
    not_after = cert.get("notAfter") if cert else None
    if not_after is None:
        return True
    expiry = _expiries.get(not_after)
    if expiry is None:
        if len(_expiries) >= _EXPIRIES_KEPT:
            _expiries.clear()
        expiry = _expiries[not_after] = ssl.cert_time_to_seconds(not_after)
    return expiry > _now()


# Whether a server of the session will accept an identity's certificate, known locally: one
# answer per (identity, session), kept while the identity lives.
_vouched_for: "weakref.WeakKeyDictionary[Any, Dict[Any, bool]]" = weakref.WeakKeyDictionary()


def _vouched(session, identity) -> bool:
    """True if ``identity`` is a node's, issued by ``session``'s CA and not expired: what a
    server of the session checks of a client's certificate. The one check left to the server
    is the node id it expects, which differs only if the connection reached another node than
    the one the client asked for, and the client's own check of the server's id refuses that
    first. So such a client need not wait for the server's verdict (a round trip) before its
    handshake counts as done; any other client does (:meth:`TlsFilter._await_acceptance`)."""
    per_identity = _vouched_for.setdefault(identity, {})
    known = per_identity.get(session)
    if known is None:
        known = False
        try:
            from cryptography import x509

            ca = x509.load_pem_x509_certificate(session.ca_cert_pem)
            x509.load_pem_x509_certificate(identity.cert_pem).verify_directly_issued_by(ca)
            known = identity.subject.kind == "node"
        except Exception as exc:  # (cryptography's InvalidSignature, ValueError, TypeError...): not vouched
            log.debug("tls: %r is not vouched for by session %s: %s", identity,
                      getattr(session, "session_id", "?"), exc)
        per_identity[session] = known
    if known:
        from datetime import datetime, timezone

        return bool(identity.not_valid_after > datetime.now(timezone.utc))
    return False


def _describe(exc: ssl.SSLError) -> str:
    """A short reason for an ssl error: the verify message, or OpenSSL's reason code."""
    message = getattr(exc, "verify_message", None)
    if message:
        return f"certificate verify failed: {message}"
    return getattr(exc, "reason", None) or str(exc)


class TlsStream(Stream):
    """A mutual-TLS stream over ``lower``, made by :meth:`TlsFilter.wrap` once the handshake
    is done and the peer identified; see the module docstring.

    ``peer`` is the :class:`~gridsock.session.PeerIdentity` of the other end; ``info`` is the
    lower stream's info plus ``tls_version``, ``cipher``, ``peer_id`` and ``tls_resumed`` (True:
    the handshake resumed a session with a ticket, see "Resumption" in the module docstring).
    """

    def __init__(
        self,
        lower: Stream,
        sslobj: ssl.SSLObject,
        incoming: ssl.MemoryBIO,
        outgoing: ssl.MemoryBIO,
        peer,
    ) -> None:
        self.lower = lower
        self.peer = peer
        self._sslobj = sslobj
        self._incoming = incoming
        self._outgoing = outgoing
        self._ssl_lock = gevent.lock.Semaphore()  # around SSLObject calls
        self._send_lock = gevent.lock.Semaphore()  # from the outgoing BIO to lower.send_all
        self._plaintext = bytearray()  # decrypted by send_eof, served first by receive_some
        self._peer_eof = False  # the peer's close_notify was read
        self._receive_failure: Optional[Tuple[str, Optional[BaseException]]] = None
        self._eof_sent = False
        self._closed = False
        # (session, identity, peer id) while an initiator looks for the server's ticket; and
        # how many more reads may look (_TICKET_LOOKS)
        self._ticket_key: Optional[Tuple[Any, Any, str]] = None
        self._ticket_looks = 0
        cipher = sslobj.cipher()
        self.info: Dict[str, Any] = dict(getattr(lower, "info", {}))
        self.info.update(
            tls_version=sslobj.version(),
            cipher=cipher[0] if cipher else None,
            peer_id=peer.id,
            tls_resumed=sslobj.session_reused,
        )

    def __repr__(self) -> str:
        return f"<TlsStream {self.info.get('tls_version')} peer={self.peer.id}>"

    # --- sending ---------------------------------------------------------------------------

    def send_all(self, data) -> None:
        """Encrypt ``data`` and hand it to the lower stream; BrokenStreamError if that fails,
        or after ``close()`` or ``send_eof()``."""
        if self._closed:
            raise BrokenStreamError("stream is closed")
        if self._eof_sent:
            raise BrokenStreamError("cannot send after send_eof()")
        view = memoryview(data)
        if view.ndim != 1 or view.format != "B":
            view = view.cast("B")  # lengths and slices in bytes
        total = len(view)
        offset = 0
        while offset < total:
            with self._ssl_lock:
                while offset < total and self._outgoing.pending < SEND_BATCH_BYTES:
                    piece = view[offset : offset + MAX_RECORD_PLAINTEXT_BYTES]
                    try:
                        offset += self._sslobj.write(piece)
                    except ssl.SSLError as exc:
                        raise BrokenStreamError(f"TLS send failed: {_describe(exc)}") from exc
            self._flush(wait=True)
            if self._closed:  # closed by another greenlet while we were sending
                raise BrokenStreamError("stream is closed")

    def _flush(self, *, wait: bool) -> None:
        """Send what the outgoing BIO holds, in order (see "Concurrency" in the module doc).

        With ``wait=False``, return at once if another greenlet is sending: it will send our
        records too. Raises the lower stream's BrokenStreamError.
        """
        if not self._outgoing.pending:
            return
        if not self._send_lock.acquire(blocking=wait):
            return
        try:
            while True:
                records = self._outgoing.read()
                if not records:
                    return
                self.lower.send_all(records)
        finally:
            self._send_lock.release()

    def send_eof(self) -> None:
        """Send close_notify, then half-close the lower stream; receiving goes on.

        Harmless twice or after ``close()``. Raises BrokenStreamError if the lower stream broke.
        """
        if self._closed or self._eof_sent:
            return
        self._eof_sent = True
        with self._ssl_lock:
            # unwrap() fails if application records wait in the incoming BIO (module doc):
            # decrypt them first, for receive_some to return later.
            try:
                self._plaintext += b"".join(self._decrypt_locked(_UNLIMITED))
            except BrokenStreamError:
                pass  # recorded in _receive_failure for receive_some
            try:
                self._sslobj.unwrap()
            except ssl.SSLWantReadError:
                pass  # close_notify sent; the peer's comes later, through receive_some
            except ssl.SSLError as exc:
                raise BrokenStreamError(f"TLS close_notify failed: {_describe(exc)}") from exc
        self._flush(wait=True)
        self.lower.send_eof()

    # --- receiving -------------------------------------------------------------------------

    def receive_some(self, max_bytes: int = DEFAULT_RECEIVE_BYTES) -> bytes:
        """Return 1 to ``max_bytes`` bytes of plaintext, or ``b""`` once the peer sent
        close_notify. Raises BrokenStreamError if the lower stream broke or ended without
        close_notify (truncation), on a TLS error (a bad record, an alert), or after close().
        """
        if max_bytes < 1:
            raise ValueError("max_bytes must be at least 1")
        while True:
            if self._closed:
                raise BrokenStreamError("stream is closed")
            if self._plaintext:
                data = bytes(self._plaintext[:max_bytes])
                del self._plaintext[:max_bytes]
                return data
            if self._peer_eof:
                return b""
            self._raise_receive_failure()
            try:
                with self._ssl_lock:
                    chunks = self._decrypt_locked(max_bytes)
            except BrokenStreamError:
                try:
                    self._flush(wait=False)  # the alert that tells the peer why
                except BrokenStreamError:
                    pass
                raise
            if self._outgoing.pending and not self._eof_sent:
                self._flush(wait=False)  # what reading produced (a KeyUpdate answer...)
            if self._ticket_key is not None:
                self._look_for_ticket()
            if chunks:
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)
            if self._close_notify_read():  # set by _decrypt_locked
                return b""
            raw = self.lower.receive_some(RAW_RECEIVE_BYTES)
            if self._closed:
                raise BrokenStreamError("stream is closed")
            if not raw:
                self._receive_failure = (
                    "the lower stream ended without TLS close_notify (truncated)",
                    None,
                )
                self._raise_receive_failure()
            self._incoming.write(raw)

    def _decrypt_locked(self, limit: int) -> List[bytes]:
        """Decrypt up to ``limit`` bytes from the incoming BIO, without I/O; hold _ssl_lock.

        Sets ``_peer_eof`` on close_notify. On a TLS error, records it for every later
        receive_some and raises BrokenStreamError.
        """
        chunks: List[bytes] = []
        total = 0
        while total < limit and not self._peer_eof:
            try:
                data = self._sslobj.read(min(limit - total, MAX_RECORD_PLAINTEXT_BYTES))
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:
                self._peer_eof = True
                break
            except ssl.SSLError as exc:
                message = f"TLS receive failed: {_describe(exc)}"
                self._receive_failure = (message, exc)
                raise BrokenStreamError(message) from exc
            if not data:  # close_notify, as read() reports it while ours is not sent yet
                self._peer_eof = True
                break
            chunks.append(data)
            total += len(data)
        return chunks

    def _look_for_ticket(self) -> None:
        """Keep the server's ticket once it came (see "Resumption" in the module docstring)."""
        key = self._ticket_key
        self._ticket_looks -= 1
        ticket = self._sslobj.session
        if ticket is not None and ticket.has_ticket and key is not None:
            _keep_ticket(key[0], key[1], key[2], self._sslobj.context, ticket)
            self._ticket_key = None
        elif self._ticket_looks <= 0:
            self._ticket_key = None

    def _close_notify_read(self) -> bool:
        return self._peer_eof

    def _raise_receive_failure(self) -> None:
        if self._receive_failure is not None:
            message, cause = self._receive_failure
            raise BrokenStreamError(message) from cause

    # --- closing ---------------------------------------------------------------------------

    def close(self) -> None:
        """Abort: close the lower stream without close_notify (the peer sees a truncation).
        Idempotent."""
        if self._closed:
            return
        self._closed = True
        self.lower.close()


def _new_handshake(context, initiator: bool) -> Tuple[ssl.SSLObject, ssl.MemoryBIO, ssl.MemoryBIO]:
    """A new ``SSLObject`` over two memory BIOs for ``context``'s node (an initiator offers the
    ticket it keeps for ``context.peer_id``): ``(sslobj, incoming, outgoing)``. ConfigError
    without a session or identity."""
    session = getattr(context, "session", None)
    identity = getattr(context, "identity", None)
    if session is None or identity is None:
        raise ConfigError("tls needs a session and this node's identity")
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    ssl_context = _ssl_context(session, identity, initiator)
    ticket = _ticket_for(session, identity, getattr(context, "peer_id", None), ssl_context) if initiator else None
    return ssl_context.wrap_bio(incoming, outgoing, server_side=not initiator, session=ticket), incoming, outgoing


class EarlyTls:
    """A TLS handshake begun before its connection exists (see "Early handshake" in the
    module docstring): made by :meth:`TlsFilter.begin` (client) or
    :meth:`TlsFilter.answer_early` (server), then handed to :meth:`TlsFilter.wrap` through
    the StackContext's ``tls_early``, which takes it once.

    ``hello`` (client) is the ClientHello to put in the assembly request; ``flight`` (server)
    is the server's first flight to put in the answer.
    """

    def __init__(self, sslobj: ssl.SSLObject, incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO,
                 *, initiator: bool, hello: bytes = b"", flight: bytes = b"") -> None:
        self.sslobj = sslobj
        self.incoming = incoming
        self.outgoing = outgoing
        self.initiator = initiator
        self.hello = hello
        self.flight = flight
        self._taken = False

    def __repr__(self) -> str:
        side = "client" if self.initiator else "server"
        return f"<EarlyTls {side} hello={len(self.hello)} flight={len(self.flight)}>"

    def answered(self, flight: Optional[bytes]) -> None:
        """Client: the server's answer came, with its first ``flight``, or None (it did not take
        the hello: the hello goes over the connection, first thing :meth:`TlsFilter.wrap` sends)."""
        if flight:
            self.incoming.write(flight)
        else:
            self.outgoing.write(self.hello)

    def take(self, initiator: bool) -> bool:
        """True the first time a ``wrap`` of the right side asks: that wrap continues it."""
        if self._taken or initiator != self.initiator:
            return False
        self._taken = True
        return True


class TlsFilter:
    """The ``tls`` component: mutual TLS with the session's node certificates."""

    name = "tls"
    kind = "filter"
    PARAMS: Dict[str, type] = {}
    LIMITS: Dict[str, tuple] = {}

    #: The handshake deadline of this filter's wraps (tests shorten it).
    handshake_timeout_s = TLS_HANDSHAKE_TIMEOUT_S

    def __init__(self, **params) -> None:
        if params:
            raise ConfigError(f"tls takes no parameters, got {', '.join(sorted(params))}")

    @staticmethod
    def begin(context) -> EarlyTls:
        """Client: start a handshake for ``context`` (a StackContext, ``initiator`` True) before
        its connection exists; the EarlyTls's ``hello`` goes in the assembly request.
        ConfigError without a session or identity."""
        sslobj, incoming, outgoing = _new_handshake(context, True)
        try:
            sslobj.do_handshake()
        except ssl.SSLWantReadError:
            pass  # (as it must: the ClientHello is out, the server's flight awaited)
        return EarlyTls(sslobj, incoming, outgoing, initiator=True, hello=outgoing.read())

    @staticmethod
    def answer_early(context, hello: bytes) -> EarlyTls:
        """Server: feed a client's ClientHello (from its assembly request) to a new handshake
        for ``context`` (``initiator`` False); the EarlyTls's ``flight`` goes in the answer.
        AuthError if the hello is refused (not TLS, no common version or cipher...), with the
        reason; ConfigError without a session or identity."""
        sslobj, incoming, outgoing = _new_handshake(context, False)
        incoming.write(hello)
        try:
            sslobj.do_handshake()
        except ssl.SSLWantReadError:
            pass  # (the client's certificate and Finished come over the connection)
        except ssl.SSLError as exc:
            raise AuthError(f"TLS ClientHello refused: {_describe(exc)}",
                            peer=getattr(context, "peer_name", None)) from exc
        flight = outgoing.read()
        if not flight:  # (a ClientHello cut short: OpenSSL waits for the rest)
            raise AuthError("TLS ClientHello refused: incomplete", peer=getattr(context, "peer_name", None))
        return EarlyTls(sslobj, incoming, outgoing, initiator=False, flight=flight)

    def wrap(self, lower: Stream, *, context) -> TlsStream:
        """Run the TLS handshake over ``lower`` and check the peer; return a TlsStream.

        ``context`` is a StackContext (``session``, ``identity``, ``peer_id``, ``peer_name``,
        ``initiator`` are used). On failure ``lower`` is closed and this raises:
        ConfigError if the context has no session or identity; AuthError if the handshake
        fails on TLS grounds (certificate not from the session CA, no certificate, an alert
        from the peer, a peer that does not speak TLS) or the peer is not a node, or not node
        ``context.peer_id``; BrokenStreamError if the lower stream broke or ended, or the
        handshake took longer than ``handshake_timeout_s``.
        """
        peer_name = getattr(context, "peer_name", None) or getattr(context, "peer_id", None)
        try:
            return self._wrap(lower, context, peer_name)
        except BaseException:
            lower.close()
            raise

    def _wrap(self, lower: Stream, context, peer_name: Optional[str]) -> TlsStream:
        initiator = bool(context.initiator)
        begun = getattr(context, "tls_early", None)
        if begun is not None and begun.take(initiator):  # begun with the assembly (module doc)
            sslobj, incoming, outgoing = begun.sslobj, begun.incoming, begun.outgoing
        else:
            sslobj, incoming, outgoing = _new_handshake(context, initiator)
        session, identity = getattr(context, "session", None), getattr(context, "identity", None)
        expected_id = getattr(context, "peer_id", None)
        whom = f" with {peer_name}" if peer_name else ""
        timer = gevent.Timeout(self.handshake_timeout_s)
        timer.start()
        early = b""
        try:
            self._handshake(lower, sslobj, incoming, outgoing, whom, peer_name)
            if initiator and sslobj.version() == "TLSv1.3" and not _vouched(session, identity):
                early = self._await_acceptance(lower, sslobj, incoming, whom, peer_name)
        except AuthError:
            _forget_ticket(session, identity, expected_id)  # (a full handshake next time)
            raise
        except gevent.Timeout as exc:
            if exc is not timer:
                raise
            raise BrokenStreamError(
                f"TLS handshake{whom} timed out after {self.handshake_timeout_s} s"
            ) from None
        finally:
            timer.close()

        try:
            peer = peer_identity(sslobj)
        except AuthError as exc:
            raise AuthError(f"TLS peer{whom}: {exc}", peer=peer_name) from exc
        if peer is None or peer.kind != "node":
            what = "no certificate" if peer is None else f"a {peer.kind} certificate"
            raise AuthError(f"TLS peer{whom} presented {what}, not a node's", peer=peer_name)
        if expected_id is not None and peer.id != expected_id:
            # On the initiator, a NAT or a stale address led the connection to another node.
            raise AuthError(
                f"TLS peer is node {peer.id}, not the expected node {expected_id}",
                peer=peer_name,
            )
        if sslobj.session_reused and not _still_valid(sslobj):
            _forget_ticket(session, identity, expected_id)
            raise AuthError(f"TLS peer{whom} resumed a session, but its certificate has expired since",
                            peer=peer_name)
        stream = TlsStream(lower, sslobj, incoming, outgoing, peer)
        stream._plaintext += early
        if initiator and expected_id is not None and sslobj.version() == "TLSv1.3" and not sslobj.session_reused:
            stream._ticket_key = (session, identity, expected_id)
            stream._ticket_looks = _TICKET_LOOKS
            stream._look_for_ticket()  # (it may have come already, during _await_acceptance)
        log.debug("tls%s up: %s %s, peer %s%s", whom, stream.info["tls_version"],
                  stream.info["cipher"], peer.id, " (resumed)" if sslobj.session_reused else "")
        return stream

    @staticmethod
    def _await_acceptance(lower: Stream, sslobj, incoming, whom: str, peer_name) -> bytes:
        """TLS 1.3: wait until the server has accepted our certificate; return early data.

        A TLS 1.3 client finishes its handshake before the server has checked the client's
        certificate; a refusal comes later, as an alert. The server's session ticket (or its
        first data) comes only after the check, so the client waits for one of them: a refused
        connection then fails here, at connect time, with the server's reason (AuthError),
        not at the application's first read. Returns application data that arrived meanwhile.
        """
        while True:
            try:
                data = sslobj.read(RAW_RECEIVE_BYTES)
                if data:
                    return data  # the server talks to us: it accepted
                raise BrokenStreamError(f"TLS{whom}: the server closed the connection at once")
            except ssl.SSLWantReadError:
                session = sslobj.session
                if session is not None and session.has_ticket:
                    return b""
            except ssl.SSLError as exc:
                raise AuthError(f"TLS server{whom} refused us: {_describe(exc)}", peer=peer_name) from exc
            _pull(lower, incoming, f"TLS{whom}", "the server closed the connection after the handshake")

    @staticmethod
    def _handshake(lower: Stream, sslobj, incoming, outgoing, whom: str, peer_name) -> None:
        """Drive ``sslobj``'s handshake over ``lower`` (see :meth:`wrap` for the errors)."""

        def flush() -> None:
            if outgoing.pending:
                try:
                    lower.send_all(outgoing.read())
                except BrokenStreamError as exc:
                    raise BrokenStreamError(f"TLS handshake{whom}: {exc}") from exc

        while True:
            try:
                sslobj.do_handshake()
                break
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLError as exc:
                try:
                    flush()  # tell the peer why: the alert OpenSSL queued
                except BrokenStreamError:
                    pass
                raise AuthError(
                    f"TLS handshake{whom} failed: {_describe(exc)}", peer=peer_name
                ) from exc
            flush()
            _pull(lower, incoming, f"TLS handshake{whom}", "the lower stream ended")
        flush()  # our last flight: the client's Finished, the server's session tickets


def _pull(lower: Stream, incoming, what: str, ended: str) -> None:
    """Move the next bytes from ``lower`` into the incoming BIO (handshake phase).

    Raises BrokenStreamError, prefixed with ``what``, if ``lower`` broke or ended (``ended``).
    """
    try:
        raw = lower.receive_some(RAW_RECEIVE_BYTES)
    except BrokenStreamError as exc:
        raise BrokenStreamError(f"{what}: {exc}") from exc
    if not raw:
        raise BrokenStreamError(f"{what}: {ended}")
    incoming.write(raw)
