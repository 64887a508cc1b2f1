"""The bootstrap's TLS socket over memory buffers (gridsock/bootstrap/tlssocket.py): the
handshake and its failures, bulk both ways at once, many records per system call, the ends of
a stream, and the link running on it."""
from __future__ import annotations

import hashlib
import os
import random
import socket
import ssl
import uuid

import gevent
import gevent.event
import pytest
from gevent import socket as gsocket

from gridsock import wire
from gridsock.bootstrap.link import Link
from gridsock.bootstrap.tlssocket import RAW_RECV_BYTES, RAW_SEND_BYTES, BufferedTLSSocket
from gridsock.session import Identity, client_context, create_session, new_node_key, peer_identity, server_context

pytestmark = pytest.mark.timeout(60)

# Handshakes and transfers of a loaded 2-core machine end within this.
DONE_TIMEOUT_S = 30.0


def _identity(session) -> Identity:
    key_pem, csr_pem = new_node_key()
    return Identity(session.certificate_authority().sign_node(csr_pem, str(uuid.uuid4())), key_pem)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    session = create_session(tmp_path_factory.mktemp("tlssocket") / "session", "127.0.0.1:1")
    return session, _identity(session), _identity(session)


def _pair():
    a, b = socket.socketpair()
    return gsocket.socket(fileno=a.detach()), gsocket.socket(fileno=b.detach())


def _connected(world, client_ctx=None, server_ctx=None):
    """A handshaken (client, server) pair over a socketpair."""
    session, one, two = world
    raw_c, raw_s = _pair()
    client = BufferedTLSSocket(raw_c, client_ctx or client_context(session, one), server_side=False)
    server = BufferedTLSSocket(raw_s, server_ctx or server_context(session, two, require_client_cert=True),
                               server_side=True)
    with gevent.Timeout(DONE_TIMEOUT_S):
        jobs = [gevent.spawn(client.do_handshake), gevent.spawn(server.do_handshake)]
        gevent.joinall(jobs, raise_error=True)
    return client, server


def _data(nbytes: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(nbytes)


def test_handshake_identifies_both_ends(world):
    session, one, two = world
    client, server = _connected(world)
    try:
        assert peer_identity(client).id == two.node_id
        assert peer_identity(server).id == one.node_id
        assert client.version() == server.version() == "TLSv1.3"
        assert client.cipher() == server.cipher()
        assert client.family == socket.AF_UNIX and client.fileno() >= 0
    finally:
        client.close()
        server.close()


def test_bulk_both_ways_at_once_in_odd_pieces(world):
    client, server = _connected(world)
    up, down = _data(5 * RAW_RECV_BYTES + 12345, 1), _data(3 * RAW_RECV_BYTES + 7, 2)

    def send(sock, data, seed):
        rng, pos = random.Random(seed), 0
        while pos < len(data):
            n = rng.choice((1, 100, 16384, 16385, 300_000))
            if rng.random() < 0.5:
                sock.sendall(memoryview(data)[pos : pos + n])
            else:
                sock.sendall_parts([data[pos : pos + n // 2], b"", data[pos + n // 2 : pos + n]])
            pos += n

    def receive(sock, nbytes, seed):
        rng, got = random.Random(seed), bytearray()
        while len(got) < nbytes:
            if rng.random() < 0.5:
                buffer = bytearray(rng.choice((1, 6, 20000, 400_000)))
                n = sock.recv_into(buffer, rng.choice((0, 1, 5)) if len(buffer) > 5 else 0)
                assert n > 0
                got += buffer[:n]
            else:
                chunk = sock.recv(rng.choice((3, 65536, 1 << 20)))
                assert chunk
                got += chunk
        return hashlib.sha256(bytes(got)).hexdigest()

    try:
        with gevent.Timeout(DONE_TIMEOUT_S):
            jobs = [gevent.spawn(send, client, up, 3), gevent.spawn(send, server, down, 4),
                    gevent.spawn(receive, server, len(up), 5), gevent.spawn(receive, client, len(down), 6)]
            gevent.joinall(jobs, raise_error=True)
        assert jobs[2].value == hashlib.sha256(up).hexdigest()
        assert jobs[3].value == hashlib.sha256(down).hexdigest()
    finally:
        client.close()
        server.close()


class _CountingSocket:
    """A gevent socket that counts the system calls its TLS socket makes."""

    def __init__(self, sock) -> None:
        self.sock = sock
        self.recvs = 0
        self.sends = 0

    def recv_into(self, buffer, *args):
        self.recvs += 1
        return self.sock.recv_into(buffer, *args)

    def send(self, data, *args):
        self.sends += 1
        return self.sock.send(data, *args)

    def sendmsg(self, buffers, *args):
        self.sends += 1
        return self.sock.sendmsg(buffers, *args)

    def __getattr__(self, name):
        return getattr(self.sock, name)


def test_many_records_per_system_call(world):
    # 64 records of 16 KiB: a socket's TLS sends 64 times and receives 128 times (header, body);
    # this one sends RAW_SEND_BYTES at a time and receives what the kernel holds per recv.
    session, one, two = world
    raw_c, raw_s = _pair()
    raw_c.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    raw_s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    counted_c, counted_s = _CountingSocket(raw_c), _CountingSocket(raw_s)
    client = BufferedTLSSocket(counted_c, client_context(session, one), server_side=False)
    server = BufferedTLSSocket(counted_s, server_context(session, two, require_client_cert=True), server_side=True)
    try:
        with gevent.Timeout(DONE_TIMEOUT_S):
            gevent.joinall([gevent.spawn(client.do_handshake), gevent.spawn(server.do_handshake)], raise_error=True)
            # the server's session tickets, read before counting
            server.sendall(b"x")
            assert client.recv(1) == b"x"
            data = _data(64 * 16384, 7)
            sends, recvs = counted_c.sends, counted_s.recvs
            writer = gevent.spawn(client.sendall, data)
            got = bytearray()
            buffer = bytearray(len(data))
            while len(got) < len(data):
                n = server.recv_into(buffer)
                got += buffer[:n]
            writer.get()
        assert bytes(got) == data
        assert 0 < counted_c.sends - sends <= len(data) // RAW_SEND_BYTES + 4  # about 4, not 64
        assert counted_s.recvs - recvs <= 2 * len(data) // RAW_RECV_BYTES + 4  # not 128
    finally:
        client.close()
        server.close()


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# Links that each carried a large write once (a directory snapshot of 1,000 nodes: some 300 KB).
MEMORY_LINKS = 64
MEMORY_WRITE_BYTES = 1 << 20


def test_a_large_write_leaves_no_large_buffer_behind_on_the_link(world):
    # An OpenSSL memory BIO keeps the largest size it ever held. Were a large write encrypted
    # into the outgoing BIO whole (and the kernel's bytes put into the incoming one whole), each
    # link would keep about a MiB for its life: 64 links, 64 MiB and more. Here a record at a
    # time leaves each side a record's worth (out) and RAW_RECV_BYTES (in).
    data = _data(MEMORY_WRITE_BYTES, 11)
    pairs = [_connected(world) for _ in range(4)]  # (contexts, tickets and the allocator warmed up)
    before = _rss_bytes()
    try:
        for _ in range(MEMORY_LINKS):
            pairs.append(_connected(world))
            client, server = pairs[-1]
            with gevent.Timeout(DONE_TIMEOUT_S):
                writer = gevent.spawn(client.sendall, data)
                buffer = bytearray(RAW_RECV_BYTES)
                got = 0
                while got < len(data):
                    got += server.recv_into(buffer)
                writer.get()
        grown = _rss_bytes() - before
        # Each link's share: its two BIOs (a record, RAW_RECV_BYTES) and OpenSSL's own state.
        assert grown < MEMORY_LINKS * (RAW_RECV_BYTES + 256 * 1024), grown
    finally:
        for client, server in pairs:
            client.close()
            server.close()


def test_end_of_stream_reads_empty_with_or_without_close_notify(world):
    client, server = _connected(world)
    try:
        with gevent.Timeout(DONE_TIMEOUT_S):
            server.sendall(b"hi")  # after the session tickets: the client reads them all
            assert client.recv(2) == b"hi"
        client.sendall(b"last words")
        client.close()  # no close_notify: the kernel's end
        with gevent.Timeout(DONE_TIMEOUT_S):
            assert server.recv(100) == b"last words"
            assert server.recv(100) == b""
            assert server.recv_into(bytearray(10)) == 0
    finally:
        server.close()


def test_a_certificate_of_another_session_fails_the_handshake_on_both_sides(world, tmp_path):
    session, one, two = world
    other = create_session(tmp_path / "other", "127.0.0.1:1")
    raw_c, raw_s = _pair()
    client = BufferedTLSSocket(raw_c, client_context(other, _identity(other)), server_side=False)
    server = BufferedTLSSocket(raw_s, server_context(session, two, require_client_cert=True), server_side=True)
    try:
        with gevent.Timeout(DONE_TIMEOUT_S):
            jobs = [gevent.spawn(client.do_handshake), gevent.spawn(server.do_handshake)]
            gevent.joinall(jobs)
        assert isinstance(jobs[0].exception, ssl.SSLError)  # our CA does not know the server
        assert isinstance(jobs[1].exception, (ssl.SSLError, OSError))  # the client's alert, or its close
    finally:
        client.close()
        server.close()


def test_a_peer_that_closes_during_the_handshake_fails_it(world):
    session, one, two = world
    raw_c, raw_s = _pair()
    client = BufferedTLSSocket(raw_c, client_context(session, one), server_side=False)
    raw_s.close()
    try:
        with gevent.Timeout(DONE_TIMEOUT_S), pytest.raises(OSError):  # ssl.SSLEOFError or a reset
            client.do_handshake()
    finally:
        client.close()


def test_a_peer_that_does_not_speak_tls_fails_the_handshake(world):
    session, one, two = world
    raw_c, raw_s = _pair()
    server = BufferedTLSSocket(raw_s, server_context(session, two, require_client_cert=True), server_side=True)
    raw_c.sendall(b"GET / HTTP/1.0\r\n\r\n" * 10)
    try:
        with gevent.Timeout(DONE_TIMEOUT_S), pytest.raises(ssl.SSLError):
            server.do_handshake()
    finally:
        server.close()
        raw_c.close()


def test_close_wakes_a_blocked_reader_with_an_oserror(world):
    client, server = _connected(world)
    reader = gevent.spawn(server.recv, 100)
    gevent.sleep(0)  # the reader blocks in recv
    server.close()
    try:
        with gevent.Timeout(DONE_TIMEOUT_S):
            reader.join()
        assert isinstance(reader.exception, OSError)
    finally:
        client.close()


def test_pending_counts_what_arrived_unread(world):
    client, server = _connected(world)
    try:
        client.sendall(b"abcdef" * 1000)
        with gevent.Timeout(DONE_TIMEOUT_S):
            assert server.recv(10) == b"abcdefabcd"
        assert server.pending() == 6000 - 10
    finally:
        client.close()
        server.close()


def _messages(topic: str, sizes) -> list:
    """Routed messages of one source (its frames stay in order), with payloads of ``sizes``."""
    src, dst = str(uuid.uuid4()), str(uuid.uuid4())
    return [wire.Routed(src=src, dst=dst, kind="msg", topic=topic, hops=1, route=("a",), payload=_data(n, n))
            for n in sizes]


def _linked(world, expected: int):
    """Links over a handshaken pair: ``(sender, receiver, got, done)``: ``got`` lists what the
    receiver received, ``done`` is set once it holds ``expected`` messages."""
    client, server = _connected(world)
    got: list = []
    done = gevent.event.Event()

    def on_message(link, message):
        got.append(message)
        if len(got) == expected:
            done.set()

    sender = Link(client, wire.Decoder(), label="client", on_message=lambda link, m: None).start()
    receiver = Link(server, wire.Decoder(), label="server", on_message=on_message).start()
    return sender, receiver, got, done


def test_a_link_runs_on_it_with_large_frames(world):
    messages = _messages("relay", (0, 10, 300_000, 70_000, 256 * 1024))
    sender, receiver, got, done = _linked(world, len(messages))
    try:
        for message in messages:
            assert sender.send(message, bulk=True)
        assert done.wait(DONE_TIMEOUT_S)
        assert got == messages
    finally:
        sender.close()
        receiver.close()


def test_a_write_that_cannot_wait_keeps_what_the_kernel_refused_for_the_next(world):
    # try_sendall_parts never waits: with the socket's buffers full, what the kernel did not
    # take is kept, nothing else writes until a sendall_parts sends it first, in order.
    client, server = _connected(world)
    client.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    chunks = [_data(50_000, seed) for seed in range(64)]
    taken = []
    try:
        for chunk in chunks:
            if not client.try_sendall_parts((chunk[:7], chunk[7:])):
                break
            taken.append(chunk)
            if client.unsent:
                assert not client.try_sendall_parts((b"x",))  # (refused while bytes are kept)
                break
        assert client.unsent and taken  # the kernel's buffers filled: the rest of a write is kept
        received = bytearray()
        want = sum(map(len, chunks))

        def read_all() -> None:
            while len(received) < want:
                data = server.recv(65536)
                assert data
                received.extend(data)

        reader = gevent.spawn(read_all)
        with gevent.Timeout(DONE_TIMEOUT_S):
            client.sendall_parts(())  # the kept bytes, first
            assert not client.unsent
            client.sendall_parts(chunks[len(taken):])
            reader.get()
        assert bytes(received) == b"".join(chunks)
    finally:
        client.close()
        server.close()


def test_a_small_frame_leaves_with_its_sender_while_the_writer_is_idle(world):
    # Written in the sender's greenlet (no turn of the writer's), and in order with everything
    # else: small frames, large ones the writer takes, and more small ones behind them.
    first, *messages = _messages("t", (3, 10, 200, 300_000, 5, 70_000, 1, 0, 40_000, 3))
    sender, receiver, got, done = _linked(world, len(messages) + 1)
    try:
        gevent.sleep(0)  # (the writer starts and waits: idle)
        before = sender.bytes_sent
        assert sender.send(first)
        assert sender.bytes_sent > before  # written already: no switch happened since send()
        for message in messages:
            assert sender.send(message)
        assert done.wait(DONE_TIMEOUT_S)
        assert got == [first, *messages]
    finally:
        sender.close()
        receiver.close()
