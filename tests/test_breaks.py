"""Breaks: a connection that breaks is never reported as a clean close.

For every stream type, an abortive end (the peer closed without EOF, died, the path was lost,
the input was corrupt) raises BrokenStreamError and an orderly end returns ``b""``: both are
checked, so each test fails whichever way the distinction is lost. Then the bridge: a broken
stream becomes ConnectionResetError on the application's socket (AF_UNIX and loopback TCP
pairs), an orderly end stays EOF with every byte delivered. Then plain TCP: a process killed
with a connection open resets it, a close() ends it in order.
"""
from __future__ import annotations

import gc
import random
import socket
import struct
import subprocess
import sys
import textwrap
import uuid
import warnings

import gevent
import pytest
from gevent import socket as gsocket

from gridsock.bridge import Bridge, HandedSocket, hand_out, start_bridge
from gridsock.components.adoc import AdocStream
from gridsock.components.bz2 import Bz2Stream
from gridsock.components.lz4 import Lz4Stream
from gridsock.components.parallel import ParallelStream
from gridsock.components.relay import RelayManager
from gridsock.components.tls import TlsFilter
from gridsock.components.zlib import ZlibStream
from gridsock.errors import BrokenStreamError, RemoteProtocolError, RoutingError
from gridsock.session import Identity, create_session, new_node_key
from gridsock.stack import StackContext
from gridsock.streams import SocketStream, memory_pair
from gridsock.testing.streams import run_concurrently, tcp_pair

pytestmark = pytest.mark.timeout(60)

# Every wait in these tests is bounded by this (a hang fails the test, never passes it).
PROMPT_S = 10.0
PAYLOAD = random.Random(7).randbytes(300_000)


def receive_until_end(stream, max_bytes=65536):
    """Read ``stream`` to its end: ``(bytes, None)`` at EOF, ``(bytes, exception)`` if broken."""
    out = bytearray()
    with gevent.Timeout(PROMPT_S, AssertionError("the stream neither ended nor broke")):
        try:
            while True:
                chunk = stream.receive_some(max_bytes)
                if not chunk:
                    return bytes(out), None
                out += chunk
        except BrokenStreamError as exc:
            return bytes(out), exc


def reset_socket_stream(stream: SocketStream) -> None:
    """Close a SocketStream's TCP socket with an RST (what a killed process's socket does)."""
    stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    stream.socket.close()


def assert_orderly(received, exc, sent=PAYLOAD):
    assert exc is None, f"an orderly end read as broken: {exc!r}"
    assert received == sent


def assert_broken(received, exc, sent=PAYLOAD):
    assert exc is not None, f"a break read as a clean EOF after {len(received)} of {len(sent)} bytes"
    assert sent.startswith(received)


# --- SocketStream ------------------------------------------------------------------------------


def test_socket_stream_orderly_end_is_eof():
    a, b = tcp_pair()
    try:
        run_concurrently(lambda: (a.send_all(PAYLOAD), a.send_eof()), lambda: assert_orderly(*receive_until_end(b)))
    finally:
        a.close()
        b.close()


def test_socket_stream_send_eof_then_close_is_orderly():
    """After send_eof() the socket closes in order: what was queued still arrives, then EOF."""
    a, b = tcp_pair()
    try:
        run_concurrently(lambda: (a.send_all(PAYLOAD), a.send_eof(), a.close()),
                         lambda: assert_orderly(*receive_until_end(b)))
    finally:
        b.close()


def test_socket_stream_close_without_eof_is_an_abort():
    """As for every other stream (TLS, relay, parallel...): the peer's receive breaks."""
    a, b = tcp_pair()
    try:
        a.send_all(b"unfinished")
        a.close()
        received, exc = receive_until_end(b)
        assert_broken(received, exc, b"unfinished")
        assert isinstance(exc.__cause__, ConnectionResetError)
    finally:
        b.close()


def test_socket_stream_reset_is_broken():
    a, b = tcp_pair()
    try:
        a.send_all(b"before the reset")
        reset_socket_stream(a)
        received, exc = receive_until_end(b)
        assert_broken(received, exc, b"before the reset")
        assert isinstance(exc.__cause__, ConnectionResetError)
    finally:
        b.close()


# --- TLS -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_world(tmp_path_factory):
    session = create_session(tmp_path_factory.mktemp("session"), "127.0.0.1:7700")

    def node() -> Identity:
        key_pem, csr_pem = new_node_key()
        return Identity(session.certificate_authority().sign_node(csr_pem, str(uuid.uuid4())), key_pem)

    return session, node(), node()


def tls_pair(tls_world, lower_pair):
    session, a, b = tls_world
    lower_a, lower_b = lower_pair()

    def ctx(identity, initiator, peer_id=None):
        return StackContext(initiator=initiator, session=session, identity=identity, local_id=identity.node_id,
                            peer_id=peer_id, peer_name="peer")

    flt = TlsFilter()
    return run_concurrently(lambda: flt.wrap(lower_a, context=ctx(a, True, b.node_id)),
                            lambda: flt.wrap(lower_b, context=ctx(b, False)))


@pytest.mark.parametrize("lower", ["memory", "tcp"])
def test_tls_orderly_end_is_eof(tls_world, lower):
    a, b = tls_pair(tls_world, {"memory": memory_pair, "tcp": tcp_pair}[lower])
    try:
        run_concurrently(lambda: (a.send_all(PAYLOAD), a.send_eof()), lambda: assert_orderly(*receive_until_end(b)))
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("lower", ["memory", "tcp"])
def test_tls_without_close_notify_is_broken(tls_world, lower):
    """The lower stream ends in order (FIN) but TLS did not: a truncation."""
    a, b = tls_pair(tls_world, {"memory": memory_pair, "tcp": tcp_pair}[lower])
    try:
        a.send_all(PAYLOAD)
        a.lower.send_eof()  # an orderly EOF below, no close_notify
        assert_broken(*receive_until_end(b))
    finally:
        a.close()
        b.close()


def test_tls_over_a_reset_connection_is_broken(tls_world):
    a, b = tls_pair(tls_world, tcp_pair)
    try:
        a.send_all(b"some")
        reset_socket_stream(a.lower)
        assert_broken(*receive_until_end(b), b"some")
    finally:
        a.close()
        b.close()


# --- relay -------------------------------------------------------------------------------------


class RelayWorld:
    """Two RelayManagers ("A", "B") wired to each other in order, as the bootstrap links are;
    ``unroutable`` makes one side's sends fail as a lost route does."""

    def __init__(self) -> None:
        self.unroutable = set()
        self.managers = {"A": RelayManager(self._sender("A")), "B": RelayManager(self._sender("B"))}
        self.a = self.managers["A"].open("B", 1)
        self.b = self.managers["B"].open("A", 1)

    def _sender(self, src):
        def send(dst, payload):
            if src in self.unroutable:
                raise RoutingError(f"no route from {src} to {dst}", dst=dst)
            self.managers[dst].on_message(src, payload)
        return send


def test_relay_orderly_end_is_eof_even_if_a_reset_follows():
    w = RelayWorld()
    run_concurrently(lambda: (w.a.send_all(PAYLOAD), w.a.send_eof(), w.a.close()),
                     lambda: assert_orderly(*receive_until_end(w.b)))
    with pytest.raises(BrokenStreamError):
        w.b.send_all(b"to a closed peer")


def test_relay_close_without_eof_is_broken():
    w = RelayWorld()
    run_concurrently(lambda: (w.a.send_all(PAYLOAD), w.a.close()), lambda: assert_broken(*receive_until_end(w.b)))


def test_relay_peer_left_is_broken():
    w = RelayWorld()
    w.a.send_all(b"partial")
    w.managers["B"].reset_peers({"A"}, "the peer left the grid")
    received, exc = receive_until_end(w.b)
    assert_broken(received, exc, b"partial")
    assert "left the grid" in str(exc)
    with pytest.raises(BrokenStreamError):
        w.b.send_all(b"x")


def test_relay_peer_left_after_its_eof_is_still_eof():
    w = RelayWorld()
    w.a.send_all(b"all of it")
    w.a.send_eof()
    w.managers["B"].reset_peers(None, "node stopping")
    assert_orderly(*receive_until_end(w.b), b"all of it")


def test_relay_lost_route_breaks_both_directions():
    w = RelayWorld()
    w.unroutable.add("A")
    with pytest.raises(BrokenStreamError):
        w.a.send_all(b"x")
    with pytest.raises(BrokenStreamError):
        w.a.receive_some()


def test_relay_lost_frame_is_a_break_not_a_hole():
    # A frame lost on the path (a link replaced under the connection) shows as a gap in the
    # offsets: the receiver resets instead of delivering the stream with a hole in it.
    w = RelayWorld()
    real = w.managers["A"]._send
    sent = []

    def lose_the_second(dst, payload):
        sent.append(payload)
        if len(sent) != 2:
            real(dst, payload)

    w.managers["A"]._send = lose_the_second
    w.a.send_all(b"first")
    w.a.send_all(b"second")
    w.a.send_all(b"third")
    received, exc = receive_until_end(w.b)
    assert_broken(received, exc, b"first")
    assert "frame was lost" in str(exc)


def test_relay_malformed_frame_is_broken():
    w = RelayWorld()
    w.managers["B"].on_message("A", struct.pack("!IBI", 1, 9, 0))  # unknown frame type
    assert_broken(*receive_until_end(w.b), b"")


# --- parallel ----------------------------------------------------------------------------------


def parallel_pair(n=4, lower_pair=memory_pair):
    pairs = [lower_pair() for _ in range(n)]
    return ParallelStream([p[0] for p in pairs]), ParallelStream([p[1] for p in pairs]), pairs


@pytest.mark.parametrize("lower", ["memory", "tcp"])
def test_parallel_orderly_end_is_eof(lower):
    a, b, _ = parallel_pair(4, {"memory": memory_pair, "tcp": tcp_pair}[lower])
    try:
        run_concurrently(lambda: (a.send_all(PAYLOAD), a.send_eof()), lambda: assert_orderly(*receive_until_end(b)))
    finally:
        a.close()
        b.close()


def test_parallel_sub_stream_ended_early_is_broken():
    """One sub-stream ends in order (its lower's EOF) before its END frame: broken."""
    a, b, pairs = parallel_pair(4)
    try:
        a.send_all(PAYLOAD)
        pairs[2][0].close()  # a memory stream's close reads as EOF on its peer
        assert_broken(*receive_until_end(b))
    finally:
        a.close()
        b.close()


def test_parallel_sub_stream_reset_is_broken():
    a, b, pairs = parallel_pair(4, tcp_pair)
    try:
        a.send_all(b"x" * 1000)
        reset_socket_stream(pairs[1][0])
        assert_broken(*receive_until_end(b), b"x" * 1000)
    finally:
        a.close()
        b.close()


# --- compression -------------------------------------------------------------------------------

CODECS = {"lz4": Lz4Stream, "zlib": ZlibStream, "bz2": Bz2Stream, "adoc": AdocStream}


@pytest.mark.parametrize("kind", sorted(CODECS))
def test_codec_orderly_end_is_eof(kind):
    lower_a, lower_b = memory_pair()
    a, b = CODECS[kind](lower_a), CODECS[kind](lower_b)
    run_concurrently(lambda: (a.send_all(PAYLOAD), a.send_eof()), lambda: assert_orderly(*receive_until_end(b)))
    a.close()
    b.close()


@pytest.mark.parametrize("kind", sorted(CODECS))
def test_codec_lower_ended_mid_stream_is_broken(kind):
    """The lower stream ends in order, but the compressed stream did not (a dead peer's FIN)."""
    lower_a, lower_b = memory_pair()
    a, b = CODECS[kind](lower_a), CODECS[kind](lower_b)
    a.send_all(PAYLOAD)
    lower_a.send_eof()
    assert_broken(*receive_until_end(b))
    a.close()
    b.close()


@pytest.mark.parametrize("kind", sorted(CODECS))
def test_codec_corrupt_input_is_broken(kind):
    lower_a, lower_b = memory_pair()
    b = CODECS[kind](lower_b)
    lower_a.send_all(b"\x04\x22\x4d\x18" + bytes(range(256)) * 4 if kind != "adoc" else b"AdC\x01\x07\x00\x00\x01\x00\x00\x01!")
    lower_a.send_eof()
    received, exc = receive_until_end(b)
    assert_broken(received, exc, b"")
    assert isinstance(exc.__cause__, RemoteProtocolError)
    b.close()
    lower_a.close()


# --- the bridge ------------------------------------------------------------------------------

BRIDGE_MODES = ["unix", "tcp"]


def app_recv(sock, max_bytes=65536) -> bytes:
    """recv on the app end from the hub's thread, without blocking the hub (the pumps run there)."""
    gsocket.wait_read(sock.fileno(), timeout=PROMPT_S, timeout_exc=AssertionError("nothing to read"))
    return sock.recv(max_bytes)


def app_read_until_end(sock):
    """Read the app end to its end: ``(bytes, None)`` at EOF, ``(bytes, exception)`` on an error."""
    out = bytearray()
    try:
        while True:
            chunk = app_recv(sock)
            if not chunk:
                return bytes(out), None
            out += chunk
    except OSError as exc:
        return bytes(out), exc


@pytest.mark.parametrize("mode", BRIDGE_MODES)
def test_bridge_broken_stream_is_a_reset(mode):
    w = RelayWorld()
    sock, handle = start_bridge(w.a, tcp=(mode == "tcp"))
    try:
        assert sock.family == (socket.AF_INET if mode == "tcp" else socket.AF_UNIX)
        w.b.send_all(PAYLOAD)
        w.b.close()  # no EOF: the relayed connection is reset
        received, exc = app_read_until_end(sock)
        assert isinstance(exc, ConnectionResetError), f"{len(received)} bytes, then {exc!r}"
        if mode == "unix":
            assert received == PAYLOAD  # what had arrived is in the app end's queue: all delivered
        else:
            assert PAYLOAD.startswith(received)  # an RST drops what the framework end still held
        assert handle.join(PROMPT_S) and handle.stats.error and handle.stats.app_reset
        with pytest.raises((BrokenPipeError, ConnectionResetError)):
            sock.send(b"x")
    finally:
        sock.close()


@pytest.mark.parametrize("mode", BRIDGE_MODES)
def test_bridge_orderly_end_is_eof_with_all_data(mode):
    w = RelayWorld()
    sock, handle = start_bridge(w.a, tcp=(mode == "tcp"))
    try:
        sock.sendall(b"request")
        assert receive_exactly(w.b, 7) == b"request"
        w.b.send_all(PAYLOAD)
        w.b.send_eof()
        assert app_read_until_end(sock) == (PAYLOAD, None)
        assert app_recv(sock) == b""  # and stays at EOF
        sock.sendall(b"after the peer's EOF")
        sock.shutdown(socket.SHUT_WR)
        assert receive_until_end(w.b) == (b"after the peer's EOF", None)
        assert handle.join(PROMPT_S) and handle.stats.error is None and not handle.stats.app_reset
    finally:
        sock.close()


@pytest.mark.parametrize("mode", BRIDGE_MODES)
def test_bridge_orderly_close_by_the_application(mode):
    w = RelayWorld()
    sock, handle = start_bridge(w.a, tcp=(mode == "tcp"))

    def app():  # in a thread: a blocking send must not block the hub, where the pumps run
        sock.sendall(PAYLOAD)
        sock.close()

    sending = gevent.get_hub().threadpool.spawn(app)
    assert receive_until_end(w.b) == (PAYLOAD, None)
    sending.get(timeout=PROMPT_S)
    # A loopback TCP framework end cannot tell a closed app end from a half-closed one until
    # it sends: the bridge ends once the peer ends too (AF_UNIX: at once, and this is harmless).
    w.b.send_eof()
    assert handle.join(PROMPT_S) and handle.stats.error is None


@pytest.mark.parametrize("mode", BRIDGE_MODES)
def test_bridge_break_after_the_application_half_closed(mode):
    """The application sent everything and shut down its side; the download then breaks."""
    w = RelayWorld()
    sock, handle = start_bridge(w.a, tcp=(mode == "tcp"))
    try:
        sock.sendall(b"GET /")
        sock.shutdown(socket.SHUT_WR)
        assert receive_until_end(w.b) == (b"GET /", None)
        w.b.send_all(b"half a resp")
        w.b.close()
        received, exc = app_read_until_end(sock)
        assert (received, type(exc)) == (b"half a resp", ConnectionResetError)
    finally:
        sock.close()


@pytest.mark.parametrize("mode", BRIDGE_MODES)
def test_bridge_framework_abort_is_a_reset(mode):
    w = RelayWorld()
    sock, handle = start_bridge(w.a, tcp=(mode == "tcp"))
    try:
        handle.close()
        received, exc = app_read_until_end(sock)
        assert isinstance(exc, ConnectionResetError)
        assert_broken(*receive_until_end(w.b), b"")  # the stream was aborted too
    finally:
        sock.close()


def receive_exactly(stream, n):
    out = bytearray()
    with gevent.Timeout(PROMPT_S, AssertionError(f"{n} bytes did not arrive")):
        while len(out) < n:
            out += stream.receive_some(n - len(out))
    return bytes(out)


def test_unix_bridge_forwards_single_bytes_at_once():
    """The byte the framework end holds back is never data still to forward: a one-byte
    request goes through without waiting for the next."""
    ours, peer = memory_pair()
    sock, handle = start_bridge(ours)
    try:
        for i in range(50):
            sock.sendall(bytes([i]))
            assert receive_exactly(peer, 1) == bytes([i])
            peer.send_all(bytes([255 - i]))
            assert app_recv(sock, 1) == bytes([255 - i])
        sizes = random.Random(3).choices([1, 2, 3, 100, 4096, 65535, 65536, 65537, 200_000], k=60)
        data = random.Random(4).randbytes(sum(sizes))

        def app_sends():  # in a thread, as blocking sends must not block the hub
            offset = 0
            for size in sizes:
                sock.sendall(data[offset : offset + size])
                offset += size
            sock.shutdown(socket.SHUT_WR)

        sending = gevent.get_hub().threadpool.spawn(app_sends)
        assert receive_until_end(peer) == (data, None)
        sending.get(timeout=PROMPT_S)
        peer.send_eof()
        assert app_recv(sock) == b""
        assert handle.join(PROMPT_S) and handle.stats.error is None
    finally:
        sock.close()
        peer.close()


def test_unix_bridge_made_elsewhere_with_a_sentinel_resets_at_once():
    """The agent's way: the application end's first byte is a sentinel (the filler's last)."""
    w = RelayWorld()
    app, framework = socket.socketpair()
    app.sendall(b"\0")
    fw = gsocket.socket(framework.family, framework.type, framework.proto, fileno=framework.detach())
    handle = Bridge(w.a, fw, app.fileno(), "agent-style", sentinel=True)
    try:
        w.b.send_all(b"partial")
        w.b.close()
        received, exc = app_read_until_end(app)
        assert received == b"partial" and isinstance(exc, ConnectionResetError)
        assert handle.join(PROMPT_S) and handle.stats.app_reset
        assert w.a.bytes_sent == 0  # the sentinel was not forwarded
    finally:
        app.close()


@pytest.mark.parametrize("app_wrote_first", [True, False])
def test_unix_bridge_made_elsewhere_holds_the_first_byte_the_application_sends(app_wrote_first):
    """A Bridge over an AF_UNIX end it did not make (the agent's: no sentinel) can reset the
    application once the application has sent a byte; before that, a break reads as EOF."""
    w = RelayWorld()
    app, framework = socket.socketpair()
    fw = gsocket.socket(framework.family, framework.type, framework.proto, fileno=framework.detach())
    handle = Bridge(w.a, fw, app.fileno(), "agent-style")
    try:
        if app_wrote_first:
            app.sendall(b"GET")
            assert receive_exactly(w.b, 3) == b"GET"
        w.b.send_all(b"partial")
        w.b.close()
        received, exc = app_read_until_end(app)
        assert received == b"partial"
        assert handle.join(PROMPT_S)
        if app_wrote_first:
            assert isinstance(exc, ConnectionResetError) and handle.stats.app_reset
        else:
            assert exc is None and not handle.stats.app_reset  # the documented limit
    finally:
        app.close()


# --- plain TCP: the kernel socket itself -------------------------------------------------------


def test_hand_out_plain_gives_a_handed_socket_closing_in_order():
    a, b = tcp_pair()
    sock, handle = hand_out(a, plain=True)
    try:
        assert handle is None and isinstance(sock, HandedSocket) and sock.gettimeout() is None
        linger = struct.unpack("ii", sock.getsockopt(socket.SOL_SOCKET, socket.SO_LINGER, 8))
        assert linger == (1, 0)  # reset if the process dies with it open
        writer = sock.makefile("wb")
        sock.close()  # the file still holds it: the last close (the file's) is the real one
        run_concurrently(lambda: (writer.write(PAYLOAD), writer.close()),
                         lambda: assert_orderly(*receive_until_end(b)))
    finally:
        sock.close()
        b.close()


def _linger(sock):
    return struct.unpack("ii", sock.getsockopt(socket.SOL_SOCKET, socket.SO_LINGER, 8))


def test_handed_socket_detach_and_finalizer_restore_the_orderly_close():
    a, b = tcp_pair()
    sock, _ = hand_out(a, plain=True)
    fd = sock.detach()  # the new owner gets an ordinary socket
    plain = socket.socket(fileno=fd)
    try:
        assert _linger(plain) == (0, 0)
    finally:
        plain.close()
        b.close()
    a, b = tcp_pair()
    sock, _ = hand_out(a, plain=True)
    sock.sendall(b"dropped, not closed")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)  # "unclosed socket": that is the point
        del sock
        gc.collect()
    try:
        assert_orderly(*receive_until_end(b), b"dropped, not closed")
    finally:
        b.close()


CHILD = textwrap.dedent("""
    import os, signal, sys
    from gevent import socket as gsocket
    from gridsock.bridge import hand_out
    from gridsock.streams import SocketStream

    port, what, end = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    stream = SocketStream(gsocket.create_connection(("127.0.0.1", port)))
    if what == "handed":
        sock, _ = hand_out(stream, plain=True)
        send, close = sock.sendall, sock.close
    else:
        send, close = stream.send_all, lambda: (stream.send_eof(), stream.close())
    send(b"x" * 100000)
    sys.stdout.write("sent\\n")
    sys.stdout.flush()
    sys.stdin.readline()  # the parent read what it wanted
    if end == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    close()
""")


@pytest.mark.parametrize("what", ["handed", "stream"])
@pytest.mark.parametrize("end", ["kill", "close"])
def test_a_killed_process_resets_its_tcp_connections(what, end):
    """A process SIGKILLed with a connection open (a HandedSocket, or a SocketStream of its
    node) resets it; one that closes it (a stream: send_eof, then close) ends it in order."""
    listener = socket.create_server(("127.0.0.1", 0))
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(listener.getsockname()[1]), what, end],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        listener.settimeout(PROMPT_S)
        conn, _ = listener.accept()
        conn.settimeout(PROMPT_S)
        assert child.stdout.readline() == b"sent\n"
        got = 0
        while got < 1000:
            got += len(conn.recv(1000 - got))
        child.stdin.write(b"go\n")
        child.stdin.flush()
        child.wait(PROMPT_S)
        out = bytearray()
        if end == "kill":
            with pytest.raises(ConnectionResetError):
                while conn.recv(65536):
                    pass
        else:
            while True:
                chunk = conn.recv(65536)
                if not chunk:
                    break
                out += chunk
            assert got + len(out) == 100000
        conn.close()
    finally:
        listener.close()
        if child.poll() is None:
            child.kill()
        child.wait()
        child.stdin.close()
        child.stdout.close()
