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
data was still coming); or when the application closed its end entirely (not just
``shutdown(SHUT_WR)``), which is noticed when its EOF arrives: then no one would read what the
peer sends, so the stream is closed after ``send_eof()``, as a TCP stack would answer later data
with a reset.

Breaks
------
An application must be able to tell a connection that ended from one that broke, as it can
with a kernel TCP socket: EOF (``recv`` returns ``b""``) means the peer closed in order and
every byte it sent has been read; a connection reset (``ConnectionResetError`` from ``recv``,
``EPIPE`` or ``ECONNRESET`` from ``send``) means data may be missing. The streams report the
difference (``receive_some`` returns ``b""`` only on the peer's orderly EOF and raises
BrokenStreamError otherwise: a dead peer process or node, a lost relay path, TLS cut without
close_notify, a lost parallel sub-stream, corrupt compressed data), and the bridge carries it
over:

- the stream's EOF becomes ``shutdown(SHUT_WR)`` of the framework end (the application reads
  everything, then EOF); when the bridge ends in order, the framework end is closed in order;
- when the bridge ends on an error, or :meth:`Bridge.close` aborts it, the framework end is
  closed *abortively*: the application reads what had been delivered, then gets
  ``ConnectionResetError``; its sends fail with ``EPIPE``/``ECONNRESET``. As with any kernel
  socket, the error is reported once, to the first call that looks: a program that sends from
  one thread while another receives may see the reset in the sender and EOF in the receiver.

How the reset is made depends on the pair. A loopback TCP pair (``tcp=True``, what the socket
personality and the agent use): the framework end is closed with ``SO_LINGER`` {on, 0}, which
sends an RST (bytes the framework end still had queued towards the application are dropped,
as an RST drops them). An ``AF_UNIX`` socketpair has no RST: Linux reports ECONNRESET to the peer of a
closing stream socket only if the closing socket still holds unread data in its receive queue
(``unix_release_sock``). So the framework end always *holds one byte back*: the application
end sends one sentinel byte when the pair is made, and the application -> stream pump reads
with ``MSG_PEEK`` at a peek offset of one (``SO_PEEK_OFF``), forwards what it peeked, then
consumes as many bytes from the head of the queue: the byte left at the head is always one
already forwarded (or the sentinel). An orderly end drains it before closing (the application
reads EOF); an abortive end closes with it (ECONNRESET). As the held byte keeps the socket
readable, the pump waits for new data on an edge-triggered epoll descriptor (``EPOLLET``)
rather than on the socket. Cost, measured with ``bench/bench_bridge.py``: see
docs/architecture.md, "Breaks". A framework end that cannot hold a byte (a kernel without
``SO_PEEK_OFF`` on stream sockets; an end made elsewhere without a sentinel, such as the
agent's, before the application has written to it: it holds the first byte the application
sends) ends with EOF instead: the Bridge's ``stats.app_reset`` says whether the application
was sent a reset.

Plain stacks: when the framework hands over a kernel TCP socket (no bridge,
:func:`hand_out` with ``plain=True``), the socket is a :class:`HandedSocket` with ``SO_LINGER``
{on, 0} set while the connection is open (the framework's own TCP sockets,
:class:`~gridsock.streams.SocketStream`, are set the same way until ``send_eof()``; see
:mod:`gridsock.streams`): if the process that holds it dies (SIGKILL, a crash) the kernel
resets the connection, so the peer cannot mistake a dead process for an orderly close. ``close()`` (also the last close of a ``makefile()``) and
``detach()`` restore an orderly close first: a program that closes its socket sends FIN after
all its data, as always. A socket dropped without ``close()`` closes in order too when the
garbage collector finalizes it; only what is still open when the process dies (killed, or
exiting with sockets the interpreter did not finalize) is reset by the kernel.

A :class:`Bridge` is the framework's handle on one bridge (:func:`start_bridge` returns it with
the socket): its :class:`BridgeStats` count the bytes each way and say whether it is open and
why it ended; :meth:`Bridge.close` aborts it; :func:`active_bridges` lists the open ones (for
``gridsock status``). A Bridge never holds the app end, so an application that drops its socket
without closing it still ends the bridge when the garbage collector closes the descriptor.

Caveat: the pumps run in the gevent hub of the thread that made the bridge. The application
may block on the app end in another thread, or use it non-blocking (asyncio, selectors) in any
thread; but a greenlet of that hub's thread must not make a *blocking* call on it (``recv``
would wait for bytes that only the hub, now blocked, could deliver). There, use
``gevent.socket.socket(fileno=sock.detach())`` or the socket personality. With
``Node(loop="thread")``, the default in a plain program, the hub is the node's own thread, so
this caveat applies only to ``loop="caller"``.

When the stack is plain kernel TCP there is nothing to pump: the framework hands over the TCP
socket itself, as a :class:`HandedSocket` (see "Breaks").
"""
from __future__ import annotations

import _socket
import errno
import itertools
import logging
import os
import select
import socket
import ssl
import struct
import sys
import time
import weakref
from dataclasses import dataclass
from typing import List, Optional, Tuple

import gevent
import gevent.event
import gevent.ssl
from gevent import socket as gsocket

from . import memory
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
    "HandedSocket",
    "set_abortive_close",
    "set_orderly_close",
]

log = logging.getLogger(__name__)

# What each pump moves per call: large enough to amortise the system calls, small enough that
# a bridge buffers little beyond the kernel's socket buffers.
BRIDGE_CHUNK_BYTES = 64 * 1024
# The send buffer of an AF_UNIX pair's framework end (stream -> application). Linux's default
# (about 200 KiB) wakes a blocked sender only once three quarters have drained, so every few
# chunks the pump and the application wait on each other: downloads ran at a tenth of a TCP
# pair's speed (bench/bench_bridge.py). A loopback TCP pair autotunes its own.
UNIX_BRIDGE_SNDBUF_BYTES = 1024 * 1024

# SO_LINGER values: {on, 0 s} makes close() (and the kernel's close of a dead process's sockets)
# send an RST and drop unsent data; {off} is the default orderly close (FIN after the data).
_LINGER_ABORT = struct.pack("ii", 1, 0)
_LINGER_ORDERLY = struct.pack("ii", 0, 0)
# Linux's SO_PEEK_OFF (the stdlib names it only from Python 3.14 on); the same value on every
# architecture the lab and CI run (x86-64, arm64). Checked by reading it back before use.
SO_PEEK_OFF = getattr(socket, "SO_PEEK_OFF", 42)
# The byte the application end sends first when a socketpair bridge is made (see "Breaks").
_SENTINEL = b"\0"

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
    app_reset: bool = False  # the application was sent a reset (it ended on an error, and could)

    @property
    def open(self) -> bool:
        return self.closed_at is None


class Bridge:
    """The framework's side of one bridge; made by :func:`start_bridge`.

    Owns ``stream`` and the framework end of the socketpair (a gevent socket), and closes both
    when it ends. An ``AF_UNIX`` framework end holds a byte back to be able to reset the
    application (see "Breaks" in the module docstring): with ``sentinel``, the first byte
    waiting on ``framework_end`` is one the application end sent for that purpose, not data
    (:func:`start_bridge` sends one; the agent may leave the last byte of its filler); without,
    the framework end holds the first byte the application sends.
    """

    def __init__(self, stream: Stream, framework_end, app_fileno: int, name: str, *,
                 sentinel: bool = False, _holder: "Optional[_HoldingReader]" = None) -> None:
        self.stream = stream
        self.name = name
        self.stats = BridgeStats(name=name, app_fileno=app_fileno, opened_at=time.time())
        self._fw = framework_end
        self._tcp = framework_end.family in (socket.AF_INET, socket.AF_INET6)
        if self._tcp:  # (a node that dies, SIGKILL included, resets the application: see "Breaks")
            set_abortive_close(framework_end)
        self._holder = _holder
        if _holder is None and framework_end.family == socket.AF_UNIX:
            self._holder = _HoldingReader.open(framework_end, sentinel=sentinel)
            if self._holder is None and sentinel:
                framework_end.recv(1)  # no peeking past it here: it must not pass for data
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
        """Abort the bridge: close the stream (an abort, for its peer too) and the framework end
        abortively (the application gets ConnectionResetError); idempotent."""
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
        receive = self._holder.recv if self._holder is not None else self._fw.recv
        try:
            while True:
                data = receive(BRIDGE_CHUNK_BYTES)
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
        self.stats.app_reset = self._close_framework_end(abortive=error is not None)
        _active.discard(self)
        self._done.set()
        memory.trim_soon()  # the stream's buffers (TLS, relay frames) were freed: give them back

    def _close_framework_end(self, *, abortive: bool) -> bool:
        """Close the framework end: in order (the application reads EOF) or abortively (it
        gets ECONNRESET once it read what was delivered). Returns whether it was a reset."""
        reset = False
        holder, self._holder = self._holder, None
        try:
            if self._tcp:
                if abortive:
                    set_abortive_close(self._fw)
                    reset = True
                else:
                    set_orderly_close(self._fw)
            if holder is not None:
                reset = holder.close(abortive=abortive)
        except OSError as exc:  # the application end is gone already: nobody to tell
            log.debug("bridge %s: closing the framework end: %s", self.name, exc)
        self._fw.close()  # a pump blocked on it gets OSError(EBADF) and finds us closed
        return reset


class _HoldingReader:
    """Reads an ``AF_UNIX`` stream socket (the framework end) keeping one forwarded byte unread,
    so that closing it can reset the application end (see "Breaks" in the module docstring).

    Invariant once ``holding``: the receive queue starts with one byte already returned (or the
    sentinel), and the socket's peek offset is 1. :meth:`recv` peeks at offset 1, then consumes
    as many bytes from the head as it returns. Waiting uses an edge-triggered epoll descriptor:
    the socket itself stays readable because of the held byte.
    """

    def __init__(self, sock: socket.socket, epoll, holding: bool) -> None:
        self._sock = sock  # a dup of the framework end's descriptor, non-blocking
        self._epoll = epoll
        self.holding = holding
        self._hub = gevent.get_hub()
        self._watcher = self._hub.loop.io(epoll.fileno(), 1)
        self._scratch = bytearray(BRIDGE_CHUNK_BYTES)

    @classmethod
    def open(cls, framework_end, *, sentinel: bool) -> "Optional[_HoldingReader]":
        """A reader for ``framework_end``, or None where the kernel cannot peek at an offset."""
        if not sys.platform.startswith("linux"):
            return None
        sock = socket.socket(framework_end.family, framework_end.type, framework_end.proto,
                             fileno=os.dup(framework_end.fileno()))
        epoll = None
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.SOL_SOCKET, SO_PEEK_OFF, 1 if sentinel else 0)
            if sock.getsockopt(socket.SOL_SOCKET, SO_PEEK_OFF) != (1 if sentinel else 0):
                raise OSError(errno.ENOPROTOOPT, "SO_PEEK_OFF did not stick")
            epoll = select.epoll(1)
            epoll.register(sock.fileno(), select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLET)
        except OSError as exc:
            log.debug("bridge: cannot hold a byte on %r (%s): breaks will read as EOF", sock, exc)
            sock.close()
            if epoll is not None:
                epoll.close()
            return None
        return cls(sock, epoll, holding=sentinel)

    def recv(self, max_bytes: int) -> bytes:
        """Like ``recv``: 1 to ``max_bytes`` bytes the application sent, ``b""`` at its EOF.
        Raises OSError (ECONNRESET if the application reset; EBADF once closed)."""
        sock = self._sock
        while True:
            try:
                data = sock.recv(max_bytes, socket.MSG_PEEK)
            except BlockingIOError:
                # The next edge: data, EOF, a close; close() throws EBADF in here.
                self._hub.wait(self._watcher)
                self._epoll.poll(0)  # consume the edge
                continue
            if data:
                left = len(data) if self.holding else len(data) - 1
                view = memoryview(self._scratch)
                while left:  # the bytes are there (we peeked them): this never waits
                    left -= sock.recv_into(view[:left])
                self.holding = True
            return data

    def close(self, *, abortive: bool) -> bool:
        """Release the reader; unless ``abortive``, drain the held byte first, so that closing
        the framework end reads as EOF. Returns True if a byte is left held (a reset)."""
        held = self.holding
        try:
            if not abortive:
                while True:  # everything here was forwarded already (or is the sentinel)
                    try:
                        if not self._sock.recv_into(self._scratch):
                            break
                    except (BlockingIOError, ConnectionError):
                        break
                held = False
        finally:
            # A pump waiting on the watcher gets EBADF; the descriptors go once it has left.
            self._hub.cancel_waits_close_and_then([self._watcher], OSError(errno.EBADF, "bridge closed"),
                                                  self._release)
        return held

    def _release(self) -> None:
        self._epoll.close()
        self._sock.close()


def set_abortive_close(sock) -> None:
    """Make closing ``sock`` (a TCP socket) reset the connection (``SO_LINGER`` {on, 0}), also
    when the kernel closes it because the process died. Raises OSError."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ABORT)


def set_orderly_close(sock) -> None:
    """Undo :func:`set_abortive_close`: closing ``sock`` sends FIN after the data. Raises
    nothing (a closed socket is left as it is)."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ORDERLY)
    except OSError:
        pass


class HandedSocket(socket.socket):
    """A kernel TCP socket handed to the application (plain stacks): a ``socket.socket`` whose
    connection is reset if the process dies with it open, and closed in order by ``close()``.

    See "Breaks" in the module docstring. ``close()`` (or the last close of its ``makefile()``
    objects), ``detach()`` and finalization by the garbage collector set ``SO_LINGER`` back to
    the orderly default first. ``dup()`` returns a HandedSocket too (the option is per
    connection: closing either restores the orderly close for both).
    """

    __slots__ = ()

    def _real_close(self, _ss=_socket.socket) -> None:  # close(), and makefile()'s last close
        set_orderly_close(self)
        super()._real_close(_ss)  # type: ignore[misc]  # socket.socket's, not in typeshed

    def detach(self) -> int:
        set_orderly_close(self)
        return super().detach()

    def __del__(self) -> None:
        if self.fileno() != -1:
            set_orderly_close(self)
        # _socket.socket's finalizer (the ResourceWarning, then the close), not in typeshed.
        super().__del__()  # type: ignore[misc]


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
        if not tcp:
            framework.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, UNIX_BRIDGE_SNDBUF_BYTES)
        framework_end = gsocket.socket(
            framework.family, framework.type, framework.proto, fileno=framework.detach()
        )
        holder = None
        if not tcp:
            # The byte the framework end holds until the application sends its own (see
            # "Breaks"), where the kernel can peek past it.
            holder = _HoldingReader.open(framework_end, sentinel=True)
            if holder is not None:
                app.sendall(_SENTINEL)
        handle = Bridge(stream, framework_end, app.fileno(), name, _holder=holder)
    except BaseException:
        app.close()
        framework.close()
        stream.close()
        raise
    return app, handle


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
    socket itself (no bridge): a TCP socket as a :class:`HandedSocket`, reset if the process
    dies with it open (see "Breaks" in the module docstring); otherwise the stream is bridged
    (see :func:`start_bridge`).
    """
    from .streams import SocketStream

    if plain and isinstance(stream, SocketStream):
        sock = stream.socket
        if isinstance(sock, (gevent.ssl.SSLSocket, ssl.SSLSocket)) or sock.family not in (socket.AF_INET, socket.AF_INET6):
            return to_std_socket(sock), None
        handed = HandedSocket(sock.family, sock.type, sock.proto, fileno=sock.detach())
        handed.setblocking(True)  # gevent left O_NONBLOCK on the descriptor
        try:
            set_abortive_close(handed)  # SocketStream has, but a stream may come from elsewhere
        except OSError as exc:
            log.debug("hand_out %s: SO_LINGER: %s", name, exc)
        return handed, None
    return start_bridge(stream, name=name, tcp=tcp)
