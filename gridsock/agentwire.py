"""Sans-IO codec of the agent protocol: frames in, ``(message, descriptor)`` out.

Theory of operation
-------------------
The agent protocol (how a program under ``gridsock run`` asks the node of its host for names
and connections; :mod:`gridsock.agent` serves it, :mod:`gridsock.agentclient` speaks it) runs on
a Unix stream socket. Its frames are wire frames (:mod:`gridsock.wire`): a client sends
``Control(op, args)``, the agent answers ``ControlReply(ok, result, error)``. A file descriptor
(a connected socket) may travel with a frame, as ``SCM_RIGHTS`` ancillary data on the frame's
**first byte**: the sender passes frame and descriptor to one ``sendmsg``.

The kernel hands ancillary data to the ``recvmsg`` that reads the byte it came with, and a
read may start in the middle of an earlier frame. So a reader never reads past the end of the
frame it is in (:attr:`AgentReader.bytes_wanted`): every read then starts a frame or continues
one, a descriptor read with the first byte of a frame belongs to that frame, and a descriptor
read with any other byte is a protocol error.

:class:`AgentReader` is fed bytes and the descriptors received with them (``feed(data, fds)``:
the descriptors came with ``data[0]``) and hands out ``(message, fd or None)``. It owns the
descriptors it was given until it hands them out: on an error and on :meth:`~AgentReader.close`
it closes them, so none leaks. Malformed, oversized or truncated input raises
:class:`~gridsock.errors.RemoteProtocolError` and nothing else; after one error the reader
stays broken.

Failures travel as ``ControlReply(ok=False, result={"errno": NAME}, error=reason)``, NAME an
errno name (:data:`ERRNO_NAMES`) or ``EAI_NONAME``; :func:`error_for` turns one into the
exception the stdlib raises for it (``ConnectionRefusedError``, ``TimeoutError``,
``socket.gaierror`` ...), :func:`failure` builds one.

The two blocking drivers at the end (:func:`send_frame`, :func:`recv_message`) are the only
I/O here; they work on any object with the stdlib socket methods (stdlib sockets in
applications, gevent sockets in the node).
"""
from __future__ import annotations

import array
import errno
import os
import select
import socket
from typing import Any, List, Optional, Sequence, Tuple, Type, Union

from . import wire
from .errors import RemoteProtocolError

__all__ = ["OPS", "ERRNO_NAMES", "MAX_FDS_PER_FRAME", "AgentReader", "encode_request", "encode_reply", "failure",
           "error_for", "result_of", "send_frame", "recv_message"]

#: The operations an agent serves.
OPS = ("whoami", "resolve", "connect", "listen")
#: Failure names an agent sends: errno names, and ``EAI_NONAME`` (a name the grid does not know).
ERRNO_NAMES = ("ECONNREFUSED", "ETIMEDOUT", "EHOSTUNREACH", "EADDRINUSE", "EINVAL", "EAI_NONAME")
# One connection per frame: a request carries at most one socket, a reply at most one.
MAX_FDS_PER_FRAME = 1

_PREFIX_BYTES = 4  # a wire frame's length field
_FD_BYTES = array.array("i").itemsize


def encode_request(op: str, args: Optional[dict] = None) -> bytes:
    """The frame of request ``op`` with ``args``. Raises LocalProtocolError for a bad op or args."""
    return wire.encode(wire.Control(op, dict(args or {})))


def encode_reply(reply: wire.ControlReply) -> bytes:
    """The frame of ``reply``. Raises LocalProtocolError if it breaks a limit."""
    return wire.encode(reply)


def failure(errno_name: str, reason: str) -> wire.ControlReply:
    """The reply saying that a request failed with ``errno_name`` (the reason cut to the limit,
    which counts UTF-8 bytes: a reason that echoes a client's non-ASCII host name still fits)."""
    cut = str(reason).encode("utf-8", "replace")[: wire.MAX_REASON_BYTES].decode("utf-8", "ignore")
    return wire.ControlReply(False, {"errno": errno_name}, cut)


def error_for(reply: wire.ControlReply) -> OSError:
    """The stdlib exception a failed ``reply`` names: ``socket.gaierror(EAI_NONAME)`` for
    ``EAI_NONAME``; for an errno name, ``OSError(code)``, which Python makes the matching
    subclass (``ConnectionRefusedError``, ``TimeoutError``...); ``OSError(EIO)`` for anything else."""
    name = reply.result.get("errno") if isinstance(reply.result, dict) else None
    if name == "EAI_NONAME":
        return socket.gaierror(socket.EAI_NONAME, reply.error)
    code = getattr(errno, name, None) if isinstance(name, str) and name.startswith("E") else None
    return OSError(code if isinstance(code, int) else errno.EIO, reply.error)


def result_of(reply: wire.ControlReply) -> Any:
    """The result of a successful ``reply``; raises :func:`error_for` of a failed one."""
    if reply.ok:
        return reply.result
    raise error_for(reply)


class AgentReader:
    """Incremental reader of agent frames: ``feed(data, fds)``, then ``next_message()`` until None.

    ``expect`` is the message class this side receives (``wire.Control`` in the agent,
    ``wire.ControlReply`` in a client); any other raises RemoteProtocolError.
    """

    def __init__(self, expect: Union[Type[wire.Control], Type[wire.ControlReply]], *,
                 peer: Optional[str] = None) -> None:
        self.expect = expect
        self.peer = peer
        self._buf = bytearray()
        self._fds: List[Tuple[int, int]] = []  # (offset in _buf of the byte it came with, fd)
        self._error: Optional[RemoteProtocolError] = None

    @property
    def buffered(self) -> int:
        """Bytes received and not yet handed out as a message."""
        return len(self._buf)

    @property
    def bytes_wanted(self) -> int:
        """How many bytes to read next, at most, so as not to read past the current frame (0: a
        whole frame is buffered; call :meth:`next_message`)."""
        if len(self._buf) < _PREFIX_BYTES:
            return _PREFIX_BYTES - len(self._buf)
        length = int.from_bytes(self._buf[:_PREFIX_BYTES], "big")
        if length > wire.MAX_FRAME_BYTES:
            return 0  # next_message() raises
        return max(_PREFIX_BYTES + length - len(self._buf), 0)

    def feed(self, data: bytes, fds: Sequence[int] = ()) -> None:
        """Add ``data`` and the descriptors received with it (with ``data[0]``); the reader owns
        them from now on. Never raises for bad input: :meth:`next_message` does."""
        if self._error is not None:
            _close_all(fds)
            return
        if fds and not data:
            _close_all(fds)
            self._error = self._fail("a descriptor came without a byte")
            return
        self._fds.extend((len(self._buf), fd) for fd in fds)
        self._buf += data

    def next_message(self) -> Optional[Tuple[Union[wire.Control, wire.ControlReply], Optional[int]]]:
        """The next ``(message, fd or None)``; None if more bytes are needed. The caller owns the
        descriptor handed out. Raises RemoteProtocolError for bad input (and closes every
        descriptor it holds); after that, every call raises it again."""
        if self._error is not None:
            raise self._error
        try:
            return self._next()
        except RemoteProtocolError as exc:
            self._error = exc
            self.close()
            raise

    def eof(self) -> None:
        """The peer closed its end. Raises RemoteProtocolError if it did so inside a frame or
        after sending a descriptor (which is closed); else returns None."""
        if self._error is not None:
            raise self._error
        if self._buf or self._fds:
            self._error = self._fail(f"closed inside a frame ({len(self._buf)} bytes buffered)")
            self.close()
            raise self._error

    def close(self) -> None:
        """Close the descriptors the reader still holds."""
        fds, self._fds = self._fds, []
        _close_all(fd for _, fd in fds)

    def _fail(self, why: str) -> RemoteProtocolError:
        return RemoteProtocolError(why, peer=self.peer)

    def _next(self):
        size = None
        if len(self._buf) >= _PREFIX_BYTES:
            length = int.from_bytes(self._buf[:_PREFIX_BYTES], "big")
            if length > wire.MAX_FRAME_BYTES:
                raise self._fail(f"frame of {length} bytes exceeds the limit of {wire.MAX_FRAME_BYTES}")
            size = _PREFIX_BYTES + length
        if any(0 < offset < (size or _PREFIX_BYTES) for offset, _ in self._fds):
            raise self._fail("a descriptor came inside a frame, not with its first byte")
        if sum(1 for offset, _ in self._fds if offset == 0) > MAX_FDS_PER_FRAME:
            raise self._fail(f"more than {MAX_FDS_PER_FRAME} descriptor with one frame")
        if size is None or len(self._buf) < size:
            return None
        decoder = wire.Decoder(peer=self.peer)
        decoder.feed(bytes(self._buf[:size]))
        message = decoder.next_message()  # a whole frame: a message, or RemoteProtocolError
        if not isinstance(message, self.expect):
            raise self._fail(f"expected {self.expect.__name__}, got {type(message).__name__}")
        del self._buf[:size]
        fd = None
        rest = []
        for offset, held in self._fds:
            if offset == 0:
                fd = held
            else:
                rest.append((offset - size, held))
        self._fds = rest
        return message, fd


def _close_all(fds) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


# --- drivers (the only I/O of this module) -------------------------------------------------------


def send_frame(sock, frame: bytes, fd: Optional[int] = None) -> None:
    """Send ``frame`` on ``sock``, with descriptor ``fd`` on its first byte (one ``sendmsg``).
    The caller keeps its own copy of ``fd``. Raises what the socket raises."""
    if fd is None:
        sock.sendall(frame)
        return
    sent = sock.sendmsg([frame], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))])
    if sent < len(frame):
        sock.sendall(frame[sent:])


# Received descriptors are close-on-exec, as accept()'s are: they must not leak into children.
_RECV_FLAGS = getattr(socket, "MSG_CMSG_CLOEXEC", 0)


def recv_message(sock, reader: AgentReader, *, wait_s: Optional[float] = None):
    """Read from ``sock`` until ``reader`` has a message; return ``(message, fd or None)``, or
    None when the peer closes between two frames.

    Raises RemoteProtocolError for bad input (and a close inside a frame), and what the socket
    raises. On a non-blocking socket, ``BlockingIOError`` comes out only before the first byte
    of a frame; once a frame has begun, the rest is waited for (``select``, ``wait_s`` at a time).
    """
    while True:
        got = reader.next_message()
        if got is not None:
            return got
        try:
            data, ancdata, _, _ = sock.recvmsg(reader.bytes_wanted, socket.CMSG_SPACE(MAX_FDS_PER_FRAME * _FD_BYTES),
                                               _RECV_FLAGS)
        except BlockingIOError:
            if not reader.buffered:
                raise
            select.select([sock], [], [], wait_s)
            continue
        fds = array.array("i")
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(payload[: len(payload) - len(payload) % _FD_BYTES])
        if not data:
            reader.feed(data, list(fds))
            reader.eof()
            return None
        reader.feed(data, list(fds))
