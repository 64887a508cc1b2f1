"""Byte streams: the interface every method produces and every filter wraps.

Theory of operation
-------------------
A :class:`Stream` is a reliable, ordered, bidirectional byte stream used in plain blocking
style from gevent greenlets (trio's ``Stream`` names):

- ``send_all(data)`` returns once all of ``data`` is handed to the layer below; it raises
  :class:`BrokenStreamError` if the stream broke or was closed.
- ``receive_some(max_bytes)`` returns at least one byte, or ``b""`` once the peer has sent EOF
  (every later call returns ``b""`` too); it raises BrokenStreamError on a broken stream.
- ``send_eof()`` half-closes: the peer's ``receive_some`` returns ``b""`` after everything sent
  before; this side can still receive. Calling it twice is harmless.
- ``close()`` releases everything, in both directions; idempotent. Data not yet sent may be lost.
  After ``send_eof()`` it ends the stream in order; without, it is an abort: the peer's
  ``receive_some`` raises BrokenStreamError once it has read what arrived.

One greenlet may send while another receives; two concurrent senders (or receivers) on one
stream are a bug. ``info`` describes the stream for ``gridsock status`` and errors (the stack,
the peer); filters add their own keys to the info of the stream they wrap.

Orderly ends and breaks. ``b""`` from ``receive_some`` means exactly one thing: the peer
ended its direction in order (``send_eof``, a FIN after its data, TLS close_notify, an end
marker...) and everything it sent before has been received. Anything else that ends a
stream -- the peer process or its node died, the path was lost, a layer saw a truncation or
corrupt input -- is BrokenStreamError, from ``receive_some`` as from ``send_all``: a layer that
cannot tell must say "broken", never "EOF". The bridge turns BrokenStreamError into a
connection reset of the application's socket (:mod:`gridsock.bridge`, "Breaks").

:class:`SocketStream` is the stream of a connected (gevent) socket; :func:`memory_pair` makes
two connected in-memory streams for tests.

``close()`` of any stream is an abort unless ``send_eof()`` came first: the peer's
``receive_some`` then raises BrokenStreamError (after the data that arrived) rather than
returning ``b""`` -- what a TLS, relay, parallel or compressed stream does by construction, and
a SocketStream too, so that a program written against ``tcp`` behaves the same over
``tls/tcp``. For a clean end: ``send_eof()``, then ``close()``.

A kernel TCP connection tells an orderly close (FIN) from a break (RST, ECONNRESET) only if
the closing side says which: when a process dies, the kernel closes its sockets with a FIN
unless ``SO_LINGER`` is {on, 0}. So a SocketStream over a TCP socket sets ``SO_LINGER`` {on, 0}
while it is open: a killed node resets its peers instead of seeming to end in order, and so
does ``close()`` without ``send_eof()``; after ``send_eof()`` the socket is back to the orderly
default (the FIN is sent; the kernel delivers what is queued even if this process dies).
Over a TLS socket (``ssl``) a TCP EOF without close_notify is a break too (ragged EOFs are not
suppressed).
"""
from __future__ import annotations

import errno
import socket
import struct
from typing import Any, Dict, Optional, Tuple

import gevent
import gevent.event
from gevent import socket as gsocket

from .errors import BrokenStreamError

__all__ = ["Stream", "SocketStream", "MemoryStream", "memory_pair", "take_chunk", "reset_socket",
           "DEFAULT_RECEIVE_BYTES"]

# What receive_some returns at most by default: large enough for bulk transfers to amortise
# per-call costs, small enough to keep a greenlet's buffers modest.
DEFAULT_RECEIVE_BYTES = 256 * 1024
# SO_LINGER {on, 0 s}: the kernel resets the connection when the socket is closed, also when it
# closes it for a process that died; {off}: the default orderly close.
_LINGER_ABORT = struct.pack("ii", 1, 0)
_LINGER_ORDERLY = struct.pack("ii", 0, 0)


def reset_socket(sock) -> None:
    """Close the TCP socket ``sock`` with a reset (its peer reads ECONNRESET, not an end)."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ABORT)
    except OSError:
        pass  # (not TCP, or already closed)
    sock.close()


class Stream:
    """Base class of streams; see the module docstring for the contract."""

    info: Dict[str, Any]

    def send_all(self, data) -> None:
        raise NotImplementedError

    def receive_some(self, max_bytes: int = DEFAULT_RECEIVE_BYTES) -> bytes:
        raise NotImplementedError

    def send_eof(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


class SocketStream(Stream):
    """A stream over a connected gevent socket (TCP, Unix, or a TLS socket).

    ``receive_some`` returns ``b""`` on the socket's EOF (the peer's FIN; for TLS, its
    close_notify) and raises BrokenStreamError on ECONNRESET and other errors. Over TCP the
    socket resets its peer if this process dies or ``close()`` comes without ``send_eof()``
    (module docstring).
    """

    def __init__(self, sock, *, info: Optional[Dict[str, Any]] = None) -> None:
        self.socket = sock
        self.info = dict(info or {})
        self._closed = False
        self._eof_sent = False
        self._tcp = False
        try:
            if getattr(sock, "suppress_ragged_eofs", False):
                sock.suppress_ragged_eofs = False  # a TCP EOF without close_notify is a truncation
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ABORT)
                self._tcp = True
        except OSError:
            pass  # a closed or detached socket: nothing to protect

    def send_all(self, data) -> None:
        if self._closed:
            raise BrokenStreamError("stream is closed")
        if self._eof_sent:
            raise BrokenStreamError("cannot send after send_eof()")
        try:
            # One send first: the kernel takes a small write whole, and gevent's sendall costs a
            # system call more (it asks for SO_SNDBUF) and a loop.
            view = memoryview(data)
            sent = self.socket.send(view)
            if sent < view.nbytes:
                self.socket.sendall(view.cast("B")[sent:])
        except OSError as exc:
            raise BrokenStreamError(f"send failed: {exc}") from exc

    def receive_some(self, max_bytes: int = DEFAULT_RECEIVE_BYTES) -> bytes:
        if self._closed:
            raise BrokenStreamError("stream is closed")
        try:
            return self.socket.recv(max_bytes)
        except OSError as exc:
            if self._closed:
                raise BrokenStreamError("stream is closed") from exc
            raise BrokenStreamError(f"receive failed: {exc}") from exc

    def send_eof(self) -> None:
        if self._closed or self._eof_sent:
            return
        self._eof_sent = True
        try:
            self.socket.shutdown(gsocket.SHUT_WR)
        except OSError as exc:
            if exc.errno != errno.ENOTCONN:
                raise BrokenStreamError(f"send_eof failed: {exc}") from exc
        self._set_orderly()  # our side ended in order: what is queued must still arrive

    def _set_orderly(self) -> None:
        if not self._tcp:
            return
        self._tcp = False
        try:
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ORDERLY)
        except OSError:
            pass

    def close(self) -> None:
        """Close the socket: in order after ``send_eof()``, else abortively (over TCP, an RST:
        the peer's receive breaks); idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            self.socket.close()
        except OSError:
            pass


class MemoryStream(Stream):
    """One end of an in-memory stream pair (unbounded buffers; for tests).

    Ends as a SocketStream does: after ``send_eof()`` the peer reads everything, then ``b""``;
    ``close()`` without it is an abort (the peer reads what was sent, then BrokenStreamError).
    """

    def __init__(self, name: str) -> None:
        self.info = {"stack": "memory", "name": name}
        self.peer: Optional["MemoryStream"] = None
        self._buffer = bytearray()
        self._eof = False  # the peer sent EOF
        self._aborted = False  # the peer closed without EOF
        self._closed = False
        self._eof_sent = False
        self._readable = gevent.event.Event()

    def send_all(self, data) -> None:
        if self._closed:
            raise BrokenStreamError("stream is closed")
        if self._eof_sent:
            raise BrokenStreamError("cannot send after send_eof()")
        peer = self._other()
        if peer._closed:
            raise BrokenStreamError("peer closed the stream")
        peer._buffer += data
        peer._readable.set()
        gevent.sleep(0)  # let the receiver run, as a real transport would

    def receive_some(self, max_bytes: int = DEFAULT_RECEIVE_BYTES) -> bytes:
        while True:
            if self._closed:
                raise BrokenStreamError("stream is closed")
            if self._buffer:
                data = bytes(self._buffer[:max_bytes])
                del self._buffer[:max_bytes]
                return data
            if self._eof:
                return b""
            if self._aborted:
                raise BrokenStreamError("the peer closed the stream without EOF")
            self._readable.clear()
            self._readable.wait()

    def send_eof(self) -> None:
        if self._closed or self._eof_sent:
            return
        self._eof_sent = True
        peer = self._other()
        peer._eof = True
        peer._readable.set()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._readable.set()
        # As a SocketStream's would: after send_eof() the peer reads what was sent, then EOF;
        # without, what was sent, then BrokenStreamError (an abort). Its sends now fail.
        peer = self._other()
        peer._aborted = True
        peer._readable.set()

    def _other(self) -> "MemoryStream":
        if self.peer is None:
            raise BrokenStreamError("not connected (make streams with memory_pair())")
        return self.peer


def memory_pair() -> Tuple[MemoryStream, MemoryStream]:
    """Two connected in-memory streams (client, server)."""
    a, b = MemoryStream("client"), MemoryStream("server")
    a.peer, b.peer = b, a
    return a, b


def take_chunk(chunks: Any, max_bytes: int) -> Any:
    """Take at most ``max_bytes`` from the front of ``chunks`` (a deque of bytes-like objects,
    not empty): the whole first chunk if it fits, else its head (its tail stays first)."""
    chunk = chunks[0]
    if len(chunk) <= max_bytes:
        chunks.popleft()
        return chunk
    chunks[0] = chunk[max_bytes:]
    return chunk[:max_bytes]
