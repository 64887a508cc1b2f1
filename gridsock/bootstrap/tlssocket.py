"""A TLS socket that runs OpenSSL over memory buffers: many records per system call.

Theory of operation
-------------------
gevent's ``SSLSocket`` lets OpenSSL read and write the socket itself: a read returns one TLS
record (at most 16 KiB) and costs two ``recv`` system calls (the record's header, then its
body), plus a Python-level retry and an ``SSLWantReadError`` whenever the kernel has nothing
yet; a write sends each record with a system call of its own. For a bootstrap link that
carries relayed bulk data, that per-record cost was most of a forwarding node's time.

:class:`BufferedTLSSocket` keeps OpenSSL off the socket: an ``ssl.SSLObject`` over two
``ssl.MemoryBIO`` objects (as ``gridsock.components.tls`` does over a stream).

- *Reading*: when OpenSSL has nothing decrypted, one ``recv_into`` takes up to
  ``RAW_RECV_BYTES`` from the kernel (into a scratch buffer of the thread's hub, copied into
  the incoming BIO before anything can switch greenlets), and ``recv_into`` then decrypts
  record after record from memory into the caller's buffer until it is full or the BIO runs
  dry: one system call and one Python call for up to 16 records.
- *Writing*: ``sendall`` encrypts into the outgoing BIO and sends what it holds with
  ``sendall`` of the plain socket, ``RAW_SEND_BYTES`` (16 records) a call;
  :meth:`BufferedTLSSocket.sendall_parts` does that for several buffers (a frame's head and
  its payload, not joined).

Invariants: only the holder of the write lock takes bytes out of the outgoing BIO and sends
them, so records never interleave; the reader flushes what OpenSSL wrote while reading (an
alert, a key update's answer) only when no writer holds the lock (a writer sends whatever is in
the BIO before it lets go), so a reader never waits for a writer. A peer that closes without
``close_notify`` reads as the end of the stream (``b""``), as gevent's ``SSLSocket`` with
``suppress_ragged_eofs`` does. Errors are the ones a TLS socket raises: ``ssl.SSLError`` (an
``OSError``) for TLS, ``OSError`` from the socket.

It offers what the bootstrap uses of a TLS socket: ``do_handshake``, ``recv``, ``recv_into``,
``send``, ``sendall``, ``pending``, ``getpeercert``, ``version``, ``cipher``, ``fileno``,
``family``, ``setsockopt``, ``getsockopt``, ``getsockname``, ``getpeername``, ``settimeout``,
``shutdown`` and ``close``.
"""
from __future__ import annotations

import socket
import ssl
import weakref
from typing import Callable, Iterable, List, Optional

import gevent
import gevent.lock

__all__ = ["BufferedTLSSocket", "RAW_RECV_BYTES", "RAW_SEND_BYTES"]

# What one recv from the kernel takes at most, into the incoming BIO: 4 full TLS records. An
# OpenSSL memory BIO keeps the largest size it held, so this bounds what each link keeps (a
# rendez-vous node has a link per leader); against 256 KiB it made no difference to the relay's
# rate (the lab, no shaping, 413 / 422 against 414 / 427 MB/s).
RAW_RECV_BYTES = 64 * 1024
# What one send to the kernel takes at most: 16 records (a relay frame's worth). The kernel
# still holds no more unsent than the link lets it (TCP_NOTSENT_LOWAT: a larger send returns
# partly sent); against 64 KiB it saved 10-17 % of a relayed MB's CPU on loopback (fewer
# system calls and Python passes). The records are fresh from the allocator each time: the
# processes keep it off mmap (memory.tune_allocator).
RAW_SEND_BYTES = 256 * 1024
# Plaintext encrypted per SSLObject.write: one TLS record (RFC 8446 section 5.1), taken out of
# the outgoing BIO at once (see sendall_parts: the BIO never holds more than a record).
RECORD_PLAINTEXT_BYTES = 16 * 1024

# One scratch buffer per hub (a thread runs one hub; greenlets of a hub never use it at once:
# it is filled by a recv and emptied into a BIO before anything can switch).
_scratch: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _scratch_buffer() -> memoryview:
    hub = gevent.get_hub()
    view = _scratch.get(hub)
    if view is None:
        view = _scratch[hub] = memoryview(bytearray(RAW_RECV_BYTES))
    return view


class BufferedTLSSocket:
    """TLS over the gevent socket ``sock`` with ``context``; see the module docstring.

    Made before the handshake (as ``context.wrap_socket(..., do_handshake_on_connect=False)``);
    call :meth:`do_handshake` next."""

    def __init__(self, sock, context: ssl.SSLContext, *, server_side: bool,
                 server_hostname: Optional[str] = None) -> None:
        self._sock = sock
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._sslobj = context.wrap_bio(self._incoming, self._outgoing, server_side=server_side,
                                        server_hostname=server_hostname)
        self._write_lock = gevent.lock.Semaphore()
        # Records try_sendall_parts encrypted that the kernel did not take: they go first (the
        # next sendall_parts, which the caller must see to: ``unsent``).
        self._unsent: List[bytes] = []
        self._eof = False  # the kernel said end of stream
        self.server_side = server_side
        self.context = context

    def __repr__(self) -> str:
        return f"<BufferedTLSSocket fd={self.fileno()}>"

    # --- the handshake -----------------------------------------------------------------------

    def do_handshake(self) -> None:
        """Run the TLS handshake over the socket (cooperatively; no timeout of its own).

        Raises ``ssl.SSLError`` when it fails (after sending the alert OpenSSL queued, as a
        socket's handshake does), ``OSError`` when the connection fails."""
        while True:
            try:
                self._sslobj.do_handshake()
                break
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLError:
                try:
                    self._flush()  # tell the peer why
                except OSError:
                    pass
                raise
            self._flush()
            if self._eof:
                raise ssl.SSLEOFError(ssl.SSL_ERROR_EOF, "EOF occurred in violation of protocol")
            self._fill()
        self._flush()  # our last flight: the client's Finished, the server's session tickets

    # --- reading -----------------------------------------------------------------------------

    def recv_into(self, buffer, nbytes: int = 0, flags: int = 0) -> int:
        """Receive up to ``nbytes`` (default: the buffer's size) into ``buffer``; wait
        (cooperatively) for at least one byte; 0 at the end of the stream."""
        if flags:
            raise ValueError("non-zero flags not allowed in calls to recv_into() on a TLS socket")
        view = memoryview(buffer).cast("B")
        if nbytes:
            view = view[:nbytes]
        want = len(view)
        if not want:
            return 0
        # Given a buffer, read() returns the count (typeshed says bytes).
        read: Callable[[int, memoryview], int] = self._sslobj.read  # type: ignore[assignment]
        while True:
            got = 0
            try:
                while got < want:
                    n = read(want - got, view[got:] if got else view)
                    if not n:  # (3.9: the kernel's end without close_notify reads 0, not SSLEOFError)
                        self._eof = True
                        return got
                    got += n
            except ssl.SSLWantReadError:
                pass
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                self._eof = True  # close_notify, or the kernel's end: the stream ends here
                return got
            if self._outgoing.pending and not self._write_lock.locked():
                with self._write_lock:
                    self._flush()
            if got:
                return got
            if self._eof:
                return 0
            self._fill()

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        """Receive up to ``bufsize`` bytes; ``b""`` at the end of the stream."""
        buffer = bytearray(min(bufsize, RAW_RECV_BYTES))
        n = self.recv_into(buffer, 0, flags)
        return bytes(buffer[:n]) if n < len(buffer) else bytes(buffer)

    def pending(self) -> int:
        """Bytes received and not read yet, decrypted or not (the kernel's queue aside)."""
        return self._sslobj.pending() + self._incoming.pending

    def _fill(self) -> None:
        """Wait for bytes from the kernel and move them into the incoming BIO (EOF: mark it)."""
        scratch = _scratch_buffer()
        n = self._sock.recv_into(scratch)
        # No switch between the recv and this copy: the scratch buffer is free again after it.
        if n:
            self._incoming.write(scratch[:n])
        else:
            self._eof = True
            self._incoming.write_eof()

    # --- writing -----------------------------------------------------------------------------

    def sendall(self, data, flags: int = 0) -> None:
        """Send all of ``data``, encrypted."""
        self.sendall_parts((data,), flags)

    def send(self, data, flags: int = 0) -> int:
        """Send all of ``data`` (a TLS socket's send may send less; this one never does)."""
        self.sendall_parts((data,), flags)
        return len(data)

    def sendall_parts(self, parts: Iterable, flags: int = 0) -> None:
        """Send the buffers ``parts`` in order, encrypted, together (``RAW_SEND_BYTES`` a
        system call).

        Encrypted a record at a time, each record taken out of the outgoing BIO at once: an
        OpenSSL memory BIO keeps the largest size it ever held for its life, so a BIO that took
        a whole large write (a directory snapshot: 300 KB for 1,000 nodes) would hold that much
        for as long as the link lives, on every link (a rendez-vous node with 1,000 leaders:
        300 MB). The records go to the kernel ``RAW_SEND_BYTES`` at a time, gathered
        (``sendmsg``), not joined."""
        if flags:
            raise ValueError("non-zero flags not allowed in calls to sendall() on a TLS socket")
        with self._write_lock:
            if self._unsent:
                unsent, self._unsent = self._unsent, []
                self._send_records(unsent)
            self._flush()  # (what reading produced: a KeyUpdate answer, an alert)
            records: List[bytes] = []
            size = 0
            for record in self._records(parts):
                records.append(record)
                size += len(record)
                if size >= RAW_SEND_BYTES:
                    self._send_records(records)
                    records, size = [], 0
            if records:
                self._send_records(records)

    def try_sendall_parts(self, parts: Iterable) -> bool:
        """Send the buffers ``parts`` as :meth:`sendall_parts` does, but only if that cannot
        wait: return False (nothing done) while another write is under way or unsent bytes
        are kept. Otherwise encrypt them all and give the kernel what it takes now, without
        waiting; what it does not take is kept (``unsent``), to go first with the next
        :meth:`sendall_parts`, which the caller must make (an empty one will do). Returns True
        then: the bytes are this socket's, in order."""
        if self._unsent or self._outgoing.pending or self._write_lock.locked():
            return False
        # (No switch from here on: nothing else can write meanwhile.)
        records = list(self._records(parts))
        sendmsg = self._sock.sendmsg
        while records:
            try:
                sent = sendmsg(records, (), socket.MSG_DONTWAIT)
            except BlockingIOError:
                break
            _consume(records, sent)
        self._unsent = records
        return True

    @property
    def unsent(self) -> bool:
        """Whether encrypted bytes wait for a :meth:`sendall_parts` (see :meth:`try_sendall_parts`)."""
        return bool(self._unsent)

    def _records(self, parts: Iterable):
        """Encrypt ``parts``: one record (a TLS record's plaintext) at a time, each taken out of
        the outgoing BIO at once. Under the write lock, or without a switch."""
        write, take = self._sslobj.write, self._outgoing.read
        for part in parts:
            view = memoryview(part)
            if view.ndim != 1 or view.format != "B":
                view = view.cast("B")
            for offset in range(0, len(view), RECORD_PLAINTEXT_BYTES):
                write(view[offset:offset + RECORD_PLAINTEXT_BYTES])
                yield take()

    def _send_records(self, records: List[bytes]) -> None:
        """Send ``records`` in order, gathered, as far as the kernel takes them each time."""
        sendmsg = self._sock.sendmsg
        while records:
            _consume(records, sendmsg(records))

    def _flush(self) -> None:
        """Send what the outgoing BIO holds (under the write lock, or during the handshake)."""
        outgoing, send = self._outgoing, self._sock.send
        while outgoing.pending:
            # send() in a loop, not gevent's sendall(), which asks the kernel for SO_SNDBUF
            # (a system call) each time.
            data = memoryview(outgoing.read(RAW_SEND_BYTES))
            while data:
                data = data[send(data):]

    # --- the TLS session ---------------------------------------------------------------------

    def getpeercert(self, binary_form: bool = False):
        return self._sslobj.getpeercert(binary_form)

    def version(self) -> Optional[str]:
        return self._sslobj.version()

    def cipher(self):
        return self._sslobj.cipher()

    def selected_alpn_protocol(self) -> Optional[str]:
        return self._sslobj.selected_alpn_protocol()

    # --- the socket --------------------------------------------------------------------------

    @property
    def family(self):
        return self._sock.family

    @property
    def type(self):
        return self._sock.type

    @property
    def closed(self) -> bool:
        return bool(getattr(self._sock, "closed", False))

    def fileno(self) -> int:
        return self._sock.fileno()

    def setsockopt(self, *args) -> None:
        self._sock.setsockopt(*args)

    def getsockopt(self, *args):
        return self._sock.getsockopt(*args)

    def getsockname(self):
        return self._sock.getsockname()

    def getpeername(self):
        return self._sock.getpeername()

    def settimeout(self, timeout: Optional[float]) -> None:
        self._sock.settimeout(timeout)

    def gettimeout(self) -> Optional[float]:
        return self._sock.gettimeout()

    def shutdown(self, how: int) -> None:
        self._sock.shutdown(how)

    def close(self) -> None:
        """Close the socket (no ``close_notify``, as gevent's ``SSLSocket.close``); a greenlet
        blocked on it gets an ``OSError``."""
        self._sock.close()


def _consume(records: List[bytes], sent: int) -> None:
    """Remove the first ``sent`` bytes from ``records`` (a send took them)."""
    while sent:
        first = len(records[0])
        if sent >= first:
            sent -= first
            del records[0]
        else:
            records[0] = records[0][sent:]
            sent = 0
