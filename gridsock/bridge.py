"""Bridges: what applications get is a real OS socket, whatever stack carries its bytes.

Theory of operation
-------------------
A stream built by a stack (``tls/lz4/relay``...) lives in the framework: gevent greenlets,
Python objects. An application wants a socket it can use from anything: asyncio, selectors,
blocking code in threads, gevent, a C extension. :func:`bridge` makes an ``AF_UNIX`` socketpair,
keeps one end (the *framework end*, as a gevent socket) and returns the other (the *app end*)
as a plain stdlib ``socket.socket`` in blocking mode: a real file descriptor.

Two greenlets pump bytes, at most :data:`BRIDGE_CHUNK_BYTES` at a time (the buffering is the
socketpair's kernel buffers plus one chunk per direction):

- stream -> framework end: ``receive_some``, ``sendall``; the stream's EOF becomes
  ``shutdown(SHUT_WR)``, so the application reads EOF and can still send.
- framework end -> stream: ``recv``, ``send_all``; the application's ``shutdown(SHUT_WR)`` (or
  ``close()``) becomes ``send_eof()``, so the peer reads EOF and can still send.

The bridge ends (the stream and the framework end are closed) when both directions have ended
cleanly; or as soon as either fails (the stream broke, the application closed its end while
data was still coming), which the application sees as EOF or ECONNRESET on its next receive
and EPIPE on its next send; or when the application closed its end entirely (not just
``shutdown(SHUT_WR)``), which is noticed when its EOF arrives: then no one would read what the
peer sends, so the stream is closed after ``send_eof()``, as a TCP stack would answer later data
with a reset.

A :class:`Bridge` is the framework's handle on one bridge (:func:`start_bridge` returns it with
the socket): its :class:`BridgeStats` count the bytes each way and say whether it is open and
why it ended; :meth:`Bridge.close` aborts it; :func:`active_bridges` lists the open ones (for
``gridsock status``). A Bridge never holds the app end, so an application that drops its socket
without closing it still ends the bridge when the garbage collector closes the descriptor.

Caveat: the pumps run in the gevent hub of the thread that made the bridge. The application
may block on the app end in another thread, or use it non-blocking (asyncio, selectors) in any
thread; but a greenlet of that hub's thread must not make a *blocking* call on it (``recv``
would wait for bytes that only the hub, now blocked, could deliver). There, use
``gevent.socket.socket(fileno=sock.detach())`` or the socket personality.

When the stack is plain kernel TCP there is nothing to pump: the framework hands over the TCP
socket itself, turned into a stdlib socket by :func:`to_std_socket`.
"""
from __future__ import annotations

import errno
import itertools
import logging
import select
import socket
import time
import weakref
from dataclasses import dataclass
from typing import List, Optional, Tuple

import gevent
import gevent.event
import gevent.ssl
from gevent import socket as gsocket

from .errors import BrokenStreamError
from .streams import Stream

__all__ = [
    "BRIDGE_CHUNK_BYTES",
    "BridgeStats",
    "Bridge",
    "bridge",
    "start_bridge",
    "active_bridges",
    "to_std_socket",
    "hand_out",
]

log = logging.getLogger(__name__)

# What each pump moves per call: large enough to amortise the system calls, small enough that
# a bridge buffers little beyond the kernel's socket buffers.
BRIDGE_CHUNK_BYTES = 64 * 1024

_active: "weakref.WeakSet[Bridge]" = weakref.WeakSet()
_serial = itertools.count(1)


@dataclass
class BridgeStats:
    """Counters of one bridge; times are ``time.time()`` seconds."""

    name: str
    app_fileno: int  # the app end's descriptor when the bridge was made (for display only)
    bytes_to_stream: int = 0  # received from the application, sent on the stream
    bytes_from_stream: int = 0  # received from the stream, delivered to the application
    opened_at: float = 0.0
    closed_at: Optional[float] = None
    error: Optional[str] = None  # why it ended, if it did not end cleanly

    @property
    def open(self) -> bool:
        return self.closed_at is None


class Bridge:
    """The framework's side of one bridge; made by :func:`start_bridge`.

    Owns ``stream`` and the framework end of the socketpair, and closes both when it ends.
    """

    def __init__(self, stream: Stream, framework_end, app_fileno: int, name: str) -> None:
        self.stream = stream
        self.name = name
        self.stats = BridgeStats(name=name, app_fileno=app_fileno, opened_at=time.time())
        self._fw = framework_end
        self._done = gevent.event.Event()
        self._directions_done = 0
        self._closed = False
        self._greenlets = [
            gevent.spawn(self._pump_from_stream),
            gevent.spawn(self._pump_to_stream),
        ]
        for greenlet, direction in zip(self._greenlets, ("stream->app", "app->stream")):
            greenlet.name = f"bridge {name} {direction}"
        _active.add(self)

    def __repr__(self) -> str:
        state = "open" if self.stats.open else "closed"
        up, down = self.stats.bytes_to_stream, self.stats.bytes_from_stream
        return f"<Bridge {self.name} {state} up={up} down={down}>"

    @property
    def closed(self) -> bool:
        return self._closed

    def join(self, timeout: Optional[float] = None) -> bool:
        """Wait until the bridge has ended; return False if ``timeout`` expired first."""
        return self._done.wait(timeout)

    def close(self) -> None:
        """Abort the bridge: close the stream and the framework end (idempotent)."""
        self._end("closed by the framework")

    # --- the pumps -------------------------------------------------------------------------

    def _pump_from_stream(self) -> None:
        try:
            while True:
                data = self.stream.receive_some(BRIDGE_CHUNK_BYTES)
                if not data:
                    break
                self._fw.sendall(data)
                self.stats.bytes_from_stream += len(data)
            try:
                self._fw.shutdown(socket.SHUT_WR)
            except OSError as exc:
                if exc.errno != errno.ENOTCONN:
                    raise
        except (BrokenStreamError, OSError) as exc:
            self._end(f"stream -> application: {exc}")
            return
        except Exception as exc:  # a bug: end the bridge rather than leave it half-dead
            log.exception("bridge %s: stream -> application", self.name)
            self._end(f"stream -> application: {type(exc).__name__}: {exc}")
            return
        self._direction_done()

    def _pump_to_stream(self) -> None:
        try:
            while True:
                data = self._fw.recv(BRIDGE_CHUNK_BYTES)
                if not data:
                    break
                self.stream.send_all(data)
                self.stats.bytes_to_stream += len(data)
            self.stream.send_eof()
        except (BrokenStreamError, OSError) as exc:
            self._end(f"application -> stream: {exc}")
            return
        except Exception as exc:
            log.exception("bridge %s: application -> stream", self.name)
            self._end(f"application -> stream: {type(exc).__name__}: {exc}")
            return
        if self._app_closed():
            self._end(None)  # nobody left to read what the peer sends
        else:
            self._direction_done()

    def _app_closed(self) -> bool:
        """True if the application closed its end (not just shut down its sending side)."""
        if self._closed:
            return True
        poller = select.poll()
        poller.register(self._fw.fileno(), select.POLLIN)
        # Both directions of the framework end shut: the app end is gone (Linux AF_UNIX).
        return any(events & select.POLLHUP for _, events in poller.poll(0))

    def _direction_done(self) -> None:
        self._directions_done += 1
        if self._directions_done == 2:
            self._end(None)

    def _end(self, error: Optional[str]) -> None:
        if self._closed:
            return
        self._closed = True
        self.stats.error = error
        self.stats.closed_at = time.time()
        if error is None:
            log.debug("bridge %s ended: %r", self.name, self.stats)
        else:
            log.debug("bridge %s ended: %s", self.name, error)
        try:
            self.stream.close()
        except Exception as exc:  # closing is best effort
            log.debug("bridge %s: closing the stream: %s", self.name, exc)
        self._fw.close()  # a pump blocked on it gets OSError(EBADF) and finds us closed
        _active.discard(self)
        self._done.set()


def start_bridge(stream: Stream, *, name: str = "", tcp: bool = False) -> Tuple[socket.socket, Bridge]:
    """Bridge ``stream`` to a new socket; return ``(app_socket, bridge)``.

    ``app_socket`` is a stdlib ``socket.socket`` (AF_UNIX, SOCK_STREAM, blocking) that the
    caller owns and must close; ``bridge`` is the framework's handle (see :class:`Bridge`),
    which owns ``stream`` from now on. With ``tcp``, the pair is a loopback TCP connection
    instead, for programs that treat the socket as TCP (TCP options, ``ssl`` wrapping with
    ``TCP_NODELAY``): the socket personality's. Raises OSError if no pair can be made (too many
    open files...), after closing ``stream``.
    """
    name = name or f"bridge-{next(_serial)}"
    try:
        app, framework = tcp_pair() if tcp else socket.socketpair()
    except OSError:
        stream.close()
        raise
    try:
        framework_end = gsocket.socket(
            framework.family, framework.type, framework.proto, fileno=framework.detach()
        )
    except BaseException:
        app.close()
        framework.close()
        stream.close()
        raise
    return app, Bridge(stream, framework_end, app.fileno(), name)


def tcp_pair() -> Tuple[socket.socket, socket.socket]:
    """Two connected stdlib TCP sockets on loopback (blocking, TCP_NODELAY), as a socketpair.

    The listening socket lives only for the one connect, and the accepted connection must come
    from our own socket (anyone else's is closed and waited past).
    """
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    client = None
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        client.connect(listener.getsockname())  # loopback: done once the kernel queued it
        for _ in range(8):
            server, peer = listener.accept()
            if peer == client.getsockname():
                for sock in (client, server):
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                return client, server
            server.close()  # a stranger raced us to the port
        raise OSError(errno.EADDRINUSE, "could not make a loopback TCP pair")
    except BaseException:
        if client is not None:
            client.close()
        raise
    finally:
        listener.close()


def bridge(stream: Stream, *, name: str = "") -> socket.socket:
    """Bridge ``stream`` to a new stdlib socket and return it (see :func:`start_bridge`)."""
    return start_bridge(stream, name=name)[0]


def active_bridges() -> List[Bridge]:
    """The bridges that have not ended yet."""
    return [b for b in list(_active) if not b.closed]


def to_std_socket(sock) -> socket.socket:
    """Return a stdlib socket, in blocking mode, for the descriptor of gevent socket ``sock``.

    ``sock`` is detached, not closed: it is unusable afterwards and the descriptor belongs to the
    returned socket. A stdlib socket is returned as it is. Raises TypeError for a TLS socket
    (its TLS state cannot travel with the descriptor: bridge its stream instead).
    """
    if type(sock) is socket.socket:
        return sock
    if isinstance(sock, (gevent.ssl.SSLSocket, socket.socket)):
        raise TypeError(f"cannot hand over a {type(sock).__name__} as a plain socket")
    family, type_, proto = sock.family, sock.type, sock.proto
    std = socket.socket(family, type_, proto, fileno=sock.detach())
    std.setblocking(True)  # gevent left O_NONBLOCK on the descriptor
    return std


def hand_out(stream: Stream, *, plain: bool, name: str = "", tcp: bool = False) -> Tuple[socket.socket, Optional[Bridge]]:
    """The real OS socket an application gets for ``stream``: ``(socket, bridge or None)``.

    ``plain``: the stack has no filter, so a stream over a kernel socket is handed over as that
    socket itself (no bridge); otherwise the stream is bridged (see :func:`start_bridge`).
    """
    from .streams import SocketStream

    if plain and isinstance(stream, SocketStream):
        return to_std_socket(stream.socket), None
    return start_bridge(stream, name=name, tcp=tcp)
