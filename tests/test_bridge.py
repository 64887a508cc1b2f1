"""Bridges: a gridsock stream handed to applications as a real OS socket."""
from __future__ import annotations

import asyncio
import gc
import hashlib
import os
import random
import select
import selectors
import socket
import threading
import time
import uuid
import warnings

import gevent
import pytest
from gevent import socket as gsocket

from gridsock.bridge import (
    Bridge,
    active_bridges,
    bridge,
    start_bridge,
    to_std_socket,
)
from gridsock.errors import BrokenStreamError
from gridsock.streams import SocketStream, Stream, memory_pair
from gridsock.testing.streams import tcp_pair

pytestmark = pytest.mark.timeout(120)

MiB = 1024 * 1024
PAIRS = {"memory": memory_pair, "tcp": tcp_pair}
DEADLINE_S = 60.0


# --- helpers -----------------------------------------------------------------------------------


class AppThread(threading.Thread):
    """An application thread: runs ``target`` and keeps its result or exception."""

    def __init__(self, target) -> None:
        super().__init__(daemon=True)
        self._func = target
        self.result = None
        self.error = None

    def run(self) -> None:
        try:
            self.result = self._func()
        except BaseException as exc:  # checked by the test in the main thread
            self.error = exc


def run_hub_until_done(threads, greenlets=(), deadline_s=DEADLINE_S):
    """Let the hub of this thread run (the pumps live there) until the threads and greenlets
    finish; fail past the deadline. Returns the greenlets' values."""
    deadline = time.monotonic() + deadline_s
    while any(t.is_alive() for t in threads) or not all(g.ready() for g in greenlets):
        for t in threads:
            if not t.is_alive() and t.error is not None:
                raise t.error  # at once: a peer greenlet may be waiting for this thread
        assert time.monotonic() < deadline, "the application or the peer did not finish in time"
        gevent.sleep(0.002)
    for t in threads:
        t.join()
        if t.error is not None:
            raise t.error
    return [g.get() for g in greenlets]


def app_recv(sock, max_bytes=65536, timeout=10.0) -> bytes:
    """Receive on the app end from this (hub) thread without blocking the hub."""
    gsocket.wait_read(sock.fileno(), timeout=timeout, timeout_exc=AssertionError("nothing to read"))
    return sock.recv(max_bytes)


def app_recv_all(sock) -> bytes:
    out = bytearray()
    while True:
        chunk = app_recv(sock)
        if not chunk:
            return bytes(out)
        out += chunk


def stream_recv_all(stream) -> bytes:
    out = bytearray()
    while True:
        chunk = stream.receive_some()
        if not chunk:
            return bytes(out)
        out += chunk


def unblock(sock) -> None:
    """Wake a thread blocked on ``sock`` (close alone does not), then close it."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _data(nbytes: int, seed: int) -> bytes:
    return random.Random(seed).getrandbits(8 * nbytes).to_bytes(nbytes, "little")


@pytest.fixture(params=sorted(PAIRS))
def pair(request):
    """(stream to bridge, its peer), closed after the test."""
    ours, peer = PAIRS[request.param]()
    yield ours, peer
    ours.close()
    peer.close()


# --- the app end is a real socket ----------------------------------------------------------


def test_app_end_is_a_plain_blocking_socket(pair):
    ours, peer = pair
    sock, handle = start_bridge(ours, name="plain")
    try:
        assert type(sock) is socket.socket
        assert sock.family == socket.AF_UNIX and sock.type == socket.SOCK_STREAM
        assert sock.gettimeout() is None and os.get_blocking(sock.fileno())
        assert isinstance(handle, Bridge) and handle in active_bridges()
        assert handle.stats.open and handle.stats.app_fileno == sock.fileno()
    finally:
        sock.close()
    assert handle.join(10)
    assert handle not in active_bridges() and not handle.stats.open


def test_select_and_selectors_from_another_thread(pair):
    ours, peer = pair
    sock = bridge(ours)
    got_first = threading.Event()

    def app():
        readable, _, _ = select.select([sock], [], [], 10)
        assert readable == [sock]
        first = sock.recv(100)
        got_first.set()
        with selectors.DefaultSelector() as sel:
            sel.register(sock, selectors.EVENT_READ | selectors.EVENT_WRITE)
            events = dict((key.fileobj, mask) for key, mask in sel.select(10))
            assert events[sock] & selectors.EVENT_WRITE
            sel.modify(sock, selectors.EVENT_READ)
            assert sel.select(10), "the second message never became readable"
        second = sock.recv(100)
        sock.sendall(b"world")
        return first, second

    def peer_side():
        peer.send_all(b"hello")
        while not got_first.is_set():  # set by the other thread: poll, the hub must keep running
            gevent.sleep(0.002)
        peer.send_all(b"again")
        return peer.receive_some(100)

    thread = AppThread(app)
    try:
        thread.start()
        (reply,) = run_hub_until_done([thread], [gevent.spawn(peer_side)])
    finally:
        unblock(sock)
    assert thread.result == (b"hello", b"again")
    assert reply == b"world"


def test_asyncio_in_another_thread(pair):
    ours, peer = pair
    first_stream, first_peer = ours, peer
    second_stream, second_peer = memory_pair()
    sock1 = bridge(first_stream, name="asyncio sock_recv")
    sock2 = bridge(second_stream, name="asyncio streams")

    async def app():
        loop = asyncio.get_running_loop()
        sock1.setblocking(False)  # asyncio wants non-blocking sockets
        await loop.sock_sendall(sock1, b"ping")
        pong = await loop.sock_recv(sock1, 100)
        sock1.shutdown(socket.SHUT_WR)
        eof = await loop.sock_recv(sock1, 100)
        reader, writer = await asyncio.open_connection(sock=sock2)
        writer.write(b"line\n")
        await writer.drain()
        echo = await reader.readline()
        writer.write_eof()
        rest = await reader.read()
        writer.close()
        await writer.wait_closed()
        return pong, eof, echo, rest

    def peer1():
        assert first_peer.receive_some(100) == b"ping"
        first_peer.send_all(b"pong")
        assert first_peer.receive_some(100) == b""
        first_peer.send_eof()

    def peer2():
        assert second_peer.receive_some(100) == b"line\n"
        second_peer.send_all(b"echo\n")
        assert second_peer.receive_some(100) == b""
        second_peer.send_all(b"bye")
        second_peer.send_eof()

    thread = AppThread(lambda: asyncio.run(app()))
    try:
        thread.start()
        run_hub_until_done([thread], [gevent.spawn(peer1), gevent.spawn(peer2)])
    finally:
        unblock(sock1)
        second_peer.close()
    assert thread.result == (b"pong", b"", b"echo\n", b"bye")


def test_bulk_both_ways_with_blocking_threads(pair):
    """16 MiB each way: blocking sendall/recv in application threads, the pumps in this
    thread's hub."""
    ours, peer = pair
    up, down = _data(16 * MiB, 1), _data(16 * MiB, 2)
    sock, handle = start_bridge(ours, name="bulk")

    def app_send():
        sock.sendall(up)
        sock.shutdown(socket.SHUT_WR)

    def app_receive():
        h = hashlib.sha256()
        while True:
            chunk = sock.recv(random.choice((1000, 65536, 1 << 20)))
            if not chunk:
                return h.hexdigest()
            h.update(chunk)

    def peer_send():
        view = memoryview(down)
        for pos in range(0, len(down), 300_000):
            peer.send_all(view[pos : pos + 300_000])
        peer.send_eof()

    def peer_receive():
        h = hashlib.sha256()
        while True:
            chunk = peer.receive_some()
            if not chunk:
                return h.hexdigest()
            h.update(chunk)

    threads = [AppThread(app_send), AppThread(app_receive)]
    try:
        for t in threads:
            t.start()
        _, at_peer = run_hub_until_done(threads, [gevent.spawn(peer_send), gevent.spawn(peer_receive)])
    finally:
        unblock(sock)
    assert at_peer == hashlib.sha256(up).hexdigest()
    assert threads[1].result == hashlib.sha256(down).hexdigest()
    assert handle.join(10)
    assert (handle.stats.bytes_to_stream, handle.stats.bytes_from_stream) == (len(up), len(down))
    assert handle.stats.error is None


# --- half-close and close ------------------------------------------------------------------


def test_half_close_by_the_application(pair):
    ours, peer = pair
    sock, handle = start_bridge(ours)
    try:
        sock.sendall(b"request")
        sock.shutdown(socket.SHUT_WR)
        assert stream_recv_all(peer) == b"request"  # then EOF
        peer.send_all(b"reply after EOF")
        peer.send_eof()
        assert app_recv_all(sock) == b"reply after EOF"
    finally:
        sock.close()
    assert handle.join(10) and handle.stats.error is None


def test_half_close_by_the_peer(pair):
    ours, peer = pair
    sock, handle = start_bridge(ours)
    try:
        peer.send_all(b"all I have")
        peer.send_eof()
        assert app_recv_all(sock) == b"all I have"
        assert not handle.closed  # the other direction is open
        sock.sendall(b"still sending")
        sock.shutdown(socket.SHUT_WR)
        assert stream_recv_all(peer) == b"still sending"
        assert handle.join(10) and handle.stats.error is None
    finally:
        sock.close()


def test_peer_close_gives_the_application_eof(pair):
    ours, peer = pair
    sock, handle = start_bridge(ours)
    try:
        peer.send_all(b"last words")
        peer.send_eof()  # an orderly end (close() alone is an abort: tests/test_breaks.py)
        peer.close()
        assert app_recv_all(sock) == b"last words"
        # Sending on: the bridge ends when the stream refuses, then the app gets EPIPE.
        deadline = time.monotonic() + 10
        with pytest.raises((BrokenPipeError, ConnectionResetError)):
            while True:
                assert time.monotonic() < deadline, "sends never failed"
                sock.send(b"x" * 1000)
                gevent.sleep(0.01)
        assert handle.join(10)
    finally:
        sock.close()


def test_app_close_closes_the_stream(pair):
    ours, peer = pair
    sock, handle = start_bridge(ours)
    sock.sendall(b"goodbye")
    sock.close()
    assert stream_recv_all(peer) == b"goodbye"  # then EOF
    assert handle.join(10) and handle.stats.error is None
    with pytest.raises(BrokenStreamError):
        ours.receive_some(1)  # closed by the bridge


def test_app_close_while_the_peer_sends(pair):
    ours, peer = pair
    sock, handle = start_bridge(ours)
    sock.close()
    deadline = time.monotonic() + 10
    with pytest.raises(BrokenStreamError):
        while True:
            assert time.monotonic() < deadline, "the peer's sends never failed"
            peer.send_all(b"y" * 65536)
            gevent.sleep(0.001)
    assert handle.join(10)


class _BreakingStream(Stream):
    """Delivers one chunk, then breaks."""

    def __init__(self) -> None:
        self.info = {"stack": "breaking"}
        self.closed = False
        self._chunks = [b"first"]

    def send_all(self, data) -> None:
        pass

    def receive_some(self, max_bytes=65536) -> bytes:
        if self._chunks:
            return self._chunks.pop()
        gevent.sleep(0.01)
        raise BrokenStreamError("link lost")

    def send_eof(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True


def test_broken_stream_ends_the_bridge():
    stream = _BreakingStream()
    sock, handle = start_bridge(stream)
    try:
        assert app_recv(sock) == b"first"
        assert handle.join(10)
        assert "link lost" in handle.stats.error and stream.closed
        assert handle.stats.app_reset
        with pytest.raises(ConnectionResetError):  # a break is never a clean EOF
            app_recv(sock)
    finally:
        sock.close()


def test_framework_abort():
    ours, peer = memory_pair()
    sock, handle = start_bridge(ours)
    try:
        handle.close()
        assert handle.join(1) and handle.stats.error == "closed by the framework"
        with pytest.raises(ConnectionResetError):  # an abort, not an orderly end
            app_recv(sock)
        with pytest.raises(BrokenStreamError):  # an abort for the peer too
            peer.receive_some(10)
    finally:
        sock.close()
        peer.close()


# --- resources -----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(PAIRS))
def test_no_descriptor_leak(kind):
    gc.collect()
    before = open_fds()
    for i in range(5):
        ours, peer = PAIRS[kind]()
        sock, handle = start_bridge(ours)
        sock.sendall(b"ping %d" % i)
        assert peer.receive_some(100) == b"ping %d" % i
        peer.send_all(b"pong")
        assert app_recv(sock) == b"pong"
        if i % 2:
            sock.close()  # the application leaves first
            assert peer.receive_some(100) == b""
            peer.close()
        else:
            peer.send_eof()  # the peer leaves first, in order
            peer.close()
            assert app_recv(sock) == b""
            sock.close()
        assert handle.join(10)
    gc.collect()
    assert open_fds() == before


def test_dropped_app_socket_ends_the_bridge():
    """The Bridge does not keep the app end alive: the garbage collector closes it."""
    ours, peer = memory_pair()
    sock, handle = start_bridge(ours)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)  # "unclosed socket": that is the point
        del sock
        gc.collect()
    assert peer.receive_some(10) == b""
    assert handle.join(10)
    peer.close()


def test_bridge_of_a_tls_stream(tmp_path):
    """The bridge sees only a Stream: here mutual TLS over loopback TCP."""
    from gridsock.components.tls import TlsFilter
    from gridsock.session import Identity, create_session, new_node_key
    from gridsock.stack import StackContext
    from gridsock.testing.streams import stream_over

    session = create_session(tmp_path, "127.0.0.1:7700")

    def node():
        key_pem, csr_pem = new_node_key()
        return Identity(session.certificate_authority().sign_node(csr_pem, str(uuid.uuid4())), key_pem)

    a, b = node(), node()
    client, server = stream_over(
        tcp_pair,
        "tls",
        (StackContext(initiator=True, session=session, identity=a, peer_id=b.node_id),
         StackContext(initiator=False, session=session, identity=b)),
    )
    assert TlsFilter.name == "tls"
    data = _data(2 * MiB, 3)
    sock, handle = start_bridge(client, name="tls")

    def app():
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        out = bytearray()
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return bytes(out)
            out += chunk

    def echo():
        received = stream_recv_all(server)
        server.send_all(received[::-1])
        server.send_eof()

    thread = AppThread(app)
    try:
        thread.start()
        run_hub_until_done([thread], [gevent.spawn(echo)])
    finally:
        unblock(sock)
        server.close()
    assert thread.result == data[::-1]
    assert handle.join(10) and handle.stats.error is None


# --- to_std_socket -------------------------------------------------------------------------


def test_to_std_socket():
    a, b = gsocket.socketpair()
    fd = a.fileno()
    std = to_std_socket(a)
    try:
        assert type(std) is socket.socket and std.fileno() == fd
        assert std.gettimeout() is None and os.get_blocking(fd)
        assert a.fileno() == -1  # detached: closing it cannot close the descriptor
        a.close()
        SocketStream(a).close()  # nor can closing a stream that still holds it
        b.sendall(b"over")
        assert std.recv(4) == b"over"  # the data is there: a blocking recv returns at once
        std.sendall(b"back")
        assert b.recv(4) == b"back"
        assert to_std_socket(std) is std
    finally:
        std.close()
        b.close()


def test_to_std_socket_refuses_tls_sockets():
    import gevent.ssl

    context = gevent.ssl.SSLContext(gevent.ssl.PROTOCOL_TLS_CLIENT)
    tls_sock = context.wrap_socket(gsocket.socket(), server_hostname="x", do_handshake_on_connect=False)
    try:
        with pytest.raises(TypeError):
            to_std_socket(tls_sock)
    finally:
        tls_sock.close()
