"""The front door (gridsock.frontdoor): SOCKS5 and HTTP proxy on one loopback port.

The grid is the in-process loopback grid (:mod:`gridsock.testing.grid`); the front door is
m1's, the services are m2's (another cluster) and plain loopback servers. Clients that block
(PySocks, http.server's handler) run in the hub's thread pool, curl and proxychains4 in
gevent subprocesses, so the grid keeps running meanwhile.
"""
from __future__ import annotations

import functools
import http.server
import os
import random
import shutil
import socket
import struct
import sys
from pathlib import Path
from typing import Any, Callable, Iterator, List, Optional, Tuple

import gevent
import gevent.event
import gevent.subprocess
import pytest
import socks
from gevent import socket as gsocket

from gridsock.diag import serve_echo
from gridsock.frontdoor import (
    FrontDoor,
    HttpProtocolError,
    ResponseRewriter,
    SocksProtocolError,
    client_untrusted,
    encode_socks_reply,
    parse_http_head,
    parse_socks_request,
    socket_uid,
)
from gridsock.names import grid_ip
from gridsock.testing.grid import JOIN_TIMEOUT_S, loopback_grid

pytestmark = pytest.mark.timeout(300)

ECHO_PORT = 5300
HTTP_PORT = 5301
# What a client waits for an answer at most (a grid connect on a loaded 2-core machine included).
CLIENT_TIMEOUT_S = 30.0
PAGE = b"hello from a grid port\n"


def in_thread(func: Callable[..., Any], *args: Any) -> Any:
    """Run blocking ``func`` in the hub's thread pool; the grid's greenlets run meanwhile."""
    return gevent.get_hub().threadpool.apply(func, args)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the stdlib's name)
        pass


def serve_http(node: Any, port: int, directory: Path) -> gevent.Greenlet:
    """http.server's SimpleHTTPRequestHandler on grid port ``port`` of ``node``, each
    connection handled in a thread (it blocks), as http.server would."""
    listener = node.listen(port)
    handler = functools.partial(_QuietHandler, directory=str(directory))

    def one(sock: socket.socket, peer: Tuple[str, int]) -> None:
        try:
            handler(sock, peer, None)
        finally:
            sock.close()

    def serve() -> None:
        while True:
            sock, info = listener.accept()
            gevent.get_hub().threadpool.spawn(one, sock, (grid_ip(info.peer_id), 0))

    return gevent.spawn(serve)


@pytest.fixture(scope="module", autouse=True)
def one_candidate_at_a_time() -> Iterator[None]:
    """These tests are about the front door, not races: the next candidate starts only when the
    one before failed. (Under load a race starts ``splice`` and cancels it; a splice candidate
    killed inside ``splice_connect`` leaks its socket, which -W error turns into a failure of
    whichever test the garbage collector runs in.)"""
    from gridsock import assembly

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(assembly, "STAGGER_S", 3600.0)
        yield


@pytest.fixture(scope="module")
def grid(tmp_path_factory) -> Iterator[Any]:
    site = tmp_path_factory.mktemp("site")
    (site / "index.html").write_bytes(PAGE)
    with loopback_grid(tmp_path_factory.mktemp("frontdoor")) as running:
        servers = [serve_echo(running["m2"], ECHO_PORT), serve_http(running["m2"], HTTP_PORT, site)]
        try:
            yield running
        finally:
            gevent.killall(servers)


@pytest.fixture
def door(grid) -> Iterator[FrontDoor]:
    front = FrontDoor(grid["m1"]).start()
    try:
        yield front
    finally:
        front.stop()


def socks_client(door: FrontDoor, **proxy: Any) -> socks.socksocket:
    sock = socks.socksocket()
    sock.set_proxy(socks.SOCKS5, "127.0.0.1", door.address.port, rdns=True, **proxy)
    sock.settimeout(CLIENT_TIMEOUT_S)
    return sock


def echo_through(sock: socket.socket, data: bytes) -> bytes:
    """Send ``data``, half-close, read until EOF: what came back."""
    sock.sendall(data)
    sock.shutdown(socket.SHUT_WR)
    got = bytearray()
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return bytes(got)
        got += chunk


# --- SOCKS5 --------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["m2", "m2.grid", "node id", "grid address"])
def test_pysocks_reaches_a_grid_port_by_name(grid, door, name):
    target = {"node id": grid["m2"].node_id, "grid address": grid_ip(grid["m2"].node_id)}.get(name, name)
    data = os.urandom(200_000)

    def run() -> bytes:
        with socks_client(door) as sock:
            sock.connect((target, ECHO_PORT))
            return echo_through(sock, data)

    assert in_thread(run) == data


def test_the_connection_is_listed_in_status_while_open(grid, door):
    sock = socks_client(door)
    try:
        in_thread(sock.connect, ("m2", ECHO_PORT))
        assert in_thread(lambda: (sock.sendall(b"ping"), sock.recv(4))[1]) == b"ping"
        [listed] = [c for c in grid["m1"].status()["connections"] if "front_door" in c]
        assert listed["peer"] == "m2" and listed["port"] == ECHO_PORT and listed["side"] == "client"
        assert listed["front_door"].startswith("socks5 m2:5300 from 127.0.0.1:")
        assert listed["bytes_sent"] == 4 and listed["bytes_received"] == 4
        assert listed["handed"] and listed["pid"] == os.getpid()  # (the client is in this process)
    finally:
        sock.close()


def no_proxy_env() -> dict:
    """This process's environment without proxy settings (curl must use only what it is told)."""
    return {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}


def run_tool(*argv: str) -> "gevent.subprocess.CompletedProcess[bytes]":
    return gevent.subprocess.run(list(argv), capture_output=True, env=no_proxy_env(), timeout=CLIENT_TIMEOUT_S * 2)


def curl(*args: str) -> "gevent.subprocess.CompletedProcess[bytes]":
    return run_tool("curl", "-sS", "--max-time", str(CLIENT_TIMEOUT_S), *args)


def read_exactly(sock: Any, count: int) -> bytes:
    got = bytearray()
    while len(got) < count:
        chunk = sock.recv(count - len(got))
        if not chunk:
            raise EOFError(f"EOF after {len(got)} of {count} bytes")
        got += chunk
    return bytes(got)


def read_socks_reply(sock: Any) -> Tuple[int, str, int]:
    """(code, bound host, bound port) of a SOCKS5 reply."""
    version, code, _, atyp = read_exactly(sock, 4)
    assert version == 5
    raw = read_exactly(sock, 4 if atyp == 1 else 16)
    host = socket.inet_ntop(socket.AF_INET if atyp == 1 else socket.AF_INET6, raw)
    return code, host, struct.unpack(">H", read_exactly(sock, 2))[0]


def socks_request(host: str, port: int, command: int = 1) -> bytes:
    """A SOCKS5 request for ``host`` (an IPv4 or IPv6 address, else a name)."""
    for family, atyp in ((socket.AF_INET, 1), (socket.AF_INET6, 4)):
        try:
            address = socket.inet_pton(family, host)
        except OSError:
            continue
        return bytes([5, command, 0, atyp]) + address + struct.pack(">H", port)
    return bytes([5, command, 0, 3, len(host)]) + host.encode() + struct.pack(">H", port)


def raw_socks(door: FrontDoor, host: str, port: int, command: int = 1) -> Tuple[Any, Tuple[int, str, int]]:
    """A raw SOCKS5 client (a gevent socket, no authentication): the socket and the reply."""
    sock = gsocket.create_connection(("127.0.0.1", door.address.port), timeout=CLIENT_TIMEOUT_S)
    sock.sendall(b"\x05\x01\x00")
    assert read_exactly(sock, 2) == b"\x05\x00"
    sock.sendall(socks_request(host, port, command))
    return sock, read_socks_reply(sock)


def socks_code(door: FrontDoor, host: str, port: int, command: int = 1) -> int:
    sock, (code, _, _) = raw_socks(door, host, port, command)
    try:
        if code != 0:
            assert sock.recv(1) == b""  # then closed
        return code
    finally:
        sock.close()


@pytest.fixture(scope="module")
def local_echo() -> Iterator[dict]:
    """Plain echo servers on 127.0.0.1 and ::1 (pass-through destinations): family -> port."""
    from gevent.server import StreamServer

    def echo(sock: Any, _addr: Any) -> None:
        while True:
            data = sock.recv(65536)
            if not data:
                sock.shutdown(socket.SHUT_WR)
                return
            sock.sendall(data)

    servers = [StreamServer(("127.0.0.1", 0), echo), StreamServer(("::1", 0), echo)]
    for server in servers:
        server.start()
    try:
        yield {"127.0.0.1": servers[0].server_port, "::1": servers[1].server_port}
    finally:
        for server in servers:
            server.stop()


@pytest.fixture(scope="module")
def local_http(tmp_path_factory) -> Iterator[int]:
    """http.server on 127.0.0.1 (in a thread of its own): its port."""
    import threading

    site = tmp_path_factory.mktemp("localsite")
    (site / "index.html").write_bytes(b"a local page\n")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(site)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        in_thread(server.shutdown)
        server.server_close()


def free_local_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_socks_reply_binds_the_peers_grid_address(grid, door):
    sock, (code, host, port) = raw_socks(door, "m2", ECHO_PORT)
    try:
        assert (code, host, port) == (0, grid_ip(grid["m2"].node_id), ECHO_PORT)
        assert echo_through(sock, b"x" * 1000) == b"x" * 1000
    finally:
        sock.close()


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "localhost"])
def test_socks_passes_other_destinations_through(door, local_echo, host):
    port = local_echo["::1" if host == "::1" else "127.0.0.1"]
    sock, (code, bound, _) = raw_socks(door, host, port)
    try:
        assert code == 0 and bound in ("127.0.0.1", "::1")
        assert echo_through(sock, b"through" * 1000) == b"through" * 1000
    finally:
        sock.close()


def test_socks_errors_have_their_reply_codes(grid, local_echo):
    closed = free_local_port()
    front = FrontDoor(grid["m1"]).start()
    shut = FrontDoor(grid["m1"], pass_through=False).start()
    try:
        assert socks_code(front, "m2", ECHO_PORT, command=2) == 0x07  # BIND
        assert socks_code(front, "m2", ECHO_PORT, command=3) == 0x07  # UDP ASSOCIATE
        assert socks_code(front, "nobody.grid", ECHO_PORT) == 0x04
        assert socks_code(front, "240.0.0.7", ECHO_PORT) == 0x04  # a grid address no node has
        assert socks_code(front, "m2", 5399) == 0x05  # nothing listens on that grid port
        assert socks_code(front, "127.0.0.1", closed) == 0x05
        assert socks_code(shut, "127.0.0.1", local_echo["127.0.0.1"]) == 0x02
        assert socks_code(shut, "m2", ECHO_PORT) == 0x00  # the grid is still there
    finally:
        front.stop()
        shut.stop()


def test_socks_grid_connect_timeout_is_ttl_expired(grid):
    front = FrontDoor(grid["m1"], connect_timeout=1e-6).start()
    try:
        assert socks_code(front, "m2", ECHO_PORT) == 0x06
    finally:
        front.stop()


@pytest.mark.parametrize("request_bytes, reply", [
    (b"\x05\x01\x00\x09\x00\x00", 0x08),  # address type 9
    (b"\x04\x01\x00\x01\x7f\x00\x00\x01\x00\x50", 0x01),  # version 4 in the request
    (b"\x05\x01\x00\x03\x03a b\x00\x50", 0x01),  # a name with a space
])
def test_socks_bad_requests_get_the_failure_reply_then_close(door, request_bytes, reply):
    sock = gsocket.create_connection(("127.0.0.1", door.address.port), timeout=CLIENT_TIMEOUT_S)
    try:
        sock.sendall(b"\x05\x01\x00")
        assert read_exactly(sock, 2) == b"\x05\x00"
        sock.sendall(request_bytes)
        assert read_socks_reply(sock)[0] == reply
        assert sock.recv(1) == b""
    finally:
        sock.close()


def test_socks_no_method_offered_is_refused(door):
    sock = gsocket.create_connection(("127.0.0.1", door.address.port), timeout=CLIENT_TIMEOUT_S)
    try:
        sock.sendall(b"\x05\x01\x80")  # a private method only
        assert read_exactly(sock, 2) == b"\x05\xff"
        assert sock.recv(1) == b""
    finally:
        sock.close()


# --- half-close and breaks ------------------------------------------------------------------------

def test_a_break_of_the_peer_resets_the_client(grid, door):
    listener = grid["m2"].listen(5310)
    sock, (code, _, _) = raw_socks(door, "m2", 5310)
    try:
        assert code == 0
        server, _ = listener.accept_stream(timeout=CLIENT_TIMEOUT_S)
        server.send_all(b"partial")
        server.close()  # without send_eof(): a break
        assert read_exactly(sock, 7) == b"partial"
        with pytest.raises(ConnectionResetError):
            while sock.recv(65536):
                pass
    finally:
        sock.close()
        listener.close()


def test_a_break_of_the_client_breaks_the_peers_stream(grid, door):
    from gridsock.errors import BrokenStreamError

    listener = grid["m2"].listen(5311)
    sock, (code, _, _) = raw_socks(door, "m2", 5311)
    server = None
    try:
        assert code == 0
        server, _ = listener.accept_stream(timeout=CLIENT_TIMEOUT_S)
        sock.sendall(b"abc")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()  # an RST
        got = bytearray()
        with pytest.raises(BrokenStreamError):
            with gevent.Timeout(CLIENT_TIMEOUT_S):
                while True:
                    data = server.receive_some()
                    assert data, "the client's reset came through as an orderly EOF"
                    got += data
        assert got == b"abc"
    finally:
        sock.close()
        if server is not None:
            server.close()
        listener.close()


def test_half_close_both_ways(grid, door):
    listener = grid["m2"].listen(5312)
    sock, (code, _, _) = raw_socks(door, "m2", 5312)
    server = None
    try:
        assert code == 0
        server, _ = listener.accept_stream(timeout=CLIENT_TIMEOUT_S)
        sock.sendall(b"question")
        sock.shutdown(socket.SHUT_WR)
        got = bytearray()
        while True:
            data = server.receive_some()
            if not data:
                break
            got += data
        assert got == b"question"
        server.send_all(b"answer after the client's EOF")  # the other direction still works
        server.send_eof()
        assert echo_through_read(sock) == b"answer after the client's EOF"
    finally:
        sock.close()
        if server is not None:
            server.close()
        listener.close()


def echo_through_read(sock: Any) -> bytes:
    got = bytearray()
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return bytes(got)
        got += chunk


# --- HTTP -------------------------------------------------------------------------------------------

def test_curl_socks5_hostname_fetches_from_a_grid_http_server(door):
    result = curl("--socks5-hostname", f"127.0.0.1:{door.address.port}", f"http://m2:{HTTP_PORT}/index.html")
    assert result.returncode == 0, result.stderr
    assert result.stdout == PAGE


def test_curl_http_proxy_forwards_a_request(door):
    result = curl("-D", "-", "-x", f"http://127.0.0.1:{door.address.port}", f"http://m2.grid:{HTTP_PORT}/index.html")
    assert result.returncode == 0, result.stderr
    head, _, body = result.stdout.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200") and b"\r\nConnection: close" in head
    assert body == PAGE


def test_curl_http_proxy_tunnels_with_connect(door):
    result = curl("-p", "-x", f"http://127.0.0.1:{door.address.port}", f"http://m2:{HTTP_PORT}/index.html")
    assert result.returncode == 0, result.stderr
    assert result.stdout == PAGE


def test_http_proxy_passes_other_destinations_through(door, local_http):
    for tunnel in ((), ("-p",)):
        result = curl(*tunnel, "-x", f"http://127.0.0.1:{door.address.port}", f"http://127.0.0.1:{local_http}/")
        assert result.returncode == 0, result.stderr
        assert result.stdout == b"a local page\n"


def http_status(door: FrontDoor, request: bytes) -> Tuple[int, bytes]:
    """Send a raw request; the status and the body of the answer (read until close)."""
    sock = gsocket.create_connection(("127.0.0.1", door.address.port), timeout=CLIENT_TIMEOUT_S)
    try:
        sock.sendall(request)
        answer = echo_through_read(sock)
    finally:
        sock.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), body


def test_http_errors_have_their_statuses(grid, door, local_http):
    closed = free_local_port()
    shut = FrontDoor(grid["m1"], pass_through=False).start()
    try:
        assert http_status(door, b"GET / HTTP/1.1\r\nHost: m2\r\n\r\n")[0] == 400
        assert http_status(door, b"BREW /pot HTTP/1.1\r\n\r\n")[0] == 400
        assert http_status(door, b"GET https://m2/ HTTP/1.1\r\n\r\n")[0] == 400
        assert http_status(door, b"garbage\r\n\r\n")[0] == 400
        assert http_status(door, b"GET http://m2:5301/ HTTP/3\r\n\r\n")[0] == 400
        assert http_status(door, b"GET http://m2:5301/ HTTP/1.1\r\n" + b"X: y\r\n" * 200 + b"\r\n")[0] == 431
        assert http_status(door, b"CONNECT m2 HTTP/1.1\r\n\r\n")[0] == 400  # no port
        status, body = http_status(door, b"CONNECT nobody.grid:80 HTTP/1.1\r\n\r\n")
        assert status == 502 and b"nobody" in body
        assert http_status(door, b"CONNECT m2:5399 HTTP/1.1\r\n\r\n")[0] == 502
        assert http_status(door, f"GET http://127.0.0.1:{closed}/ HTTP/1.1\r\n\r\n".encode())[0] == 502
        assert http_status(shut, f"GET http://127.0.0.1:{local_http}/ HTTP/1.1\r\n\r\n".encode())[0] == 403
    finally:
        shut.stop()


def test_forwarded_request_is_in_origin_form_without_proxy_headers(grid, door):
    listener = grid["m2"].listen(5313)
    sock = gsocket.create_connection(("127.0.0.1", door.address.port), timeout=CLIENT_TIMEOUT_S)
    server = None
    try:
        sock.sendall(b"POST http://m2:5313/form?x=1 HTTP/1.1\r\nHost: wrong\r\nProxy-Connection: keep-alive\r\n"
                     b"Proxy-Authorization: Basic Zm9vOmJhcg==\r\nConnection: keep-alive, X-Private\r\n"
                     b"X-Private: 1\r\nContent-Length: 4\r\nUser-Agent: t\r\n\r\nbody")
        server, _ = listener.accept_stream(timeout=CLIENT_TIMEOUT_S)
        got = bytearray()
        while b"body" not in got:
            got += server.receive_some()
        assert bytes(got) == (b"POST /form?x=1 HTTP/1.1\r\nHost: m2:5313\r\nContent-Length: 4\r\nUser-Agent: t\r\n"
                              b"Connection: close\r\n\r\nbody")
        server.send_all(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nConnection: keep-alive\r\n"
                        b"Keep-Alive: timeout=5\r\nContent-Length: 2\r\n\r\nok")
        server.send_eof()
        assert echo_through_read(sock) == (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n"
                                           b"Connection: close\r\n\r\nok")
    finally:
        sock.close()
        if server is not None:
            server.close()
        listener.close()


# --- who may come in ------------------------------------------------------------------------------

def test_username_and_password(grid):
    front = FrontDoor(grid["m1"], users={"alice": "secret"}, require_auth=True).start()
    data = b"authenticated" * 100

    def with_password(password: Optional[str]) -> bytes:
        proxy = {} if password is None else {"username": "alice", "password": password}
        with socks_client(front, **proxy) as sock:
            sock.connect(("m2", ECHO_PORT))
            return echo_through(sock, data)

    try:
        assert in_thread(with_password, "secret") == data
        with pytest.raises(socks.ProxyError, match="authentication failed"):
            in_thread(with_password, "wrong")
        with pytest.raises(socks.ProxyError, match="rejected"):
            in_thread(with_password, None)
        base = f"127.0.0.1:{front.address.port}"
        url = f"http://m2:{HTTP_PORT}/index.html"
        assert curl("-x", f"http://alice:secret@{base}", url).stdout == PAGE
        assert curl("-p", "-x", f"http://alice:secret@{base}", url).stdout == PAGE
        assert curl("--socks5-hostname", f"alice:secret@{base}", url).stdout == PAGE
        assert curl("-w", "%{http_code}", "-o", "/dev/null", "-x", f"http://alice:wrong@{base}", url).stdout == b"407"
        assert curl("-w", "%{http_code}", "-o", "/dev/null", "-x", f"http://{base}", url).stdout == b"407"
        assert curl("--socks5-hostname", f"alice:wrong@{base}", url).returncode != 0
    finally:
        front.stop()


def test_clients_that_must_authenticate_are_refused_when_no_users_are_configured(grid):
    front = FrontDoor(grid["m1"], require_auth=True).start()
    try:
        sock = gsocket.create_connection(("127.0.0.1", front.address.port), timeout=CLIENT_TIMEOUT_S)
        try:
            sock.sendall(b"\x05\x02\x00\x02")
            assert read_exactly(sock, 2) == b"\x05\xff"
            assert sock.recv(1) == b""
        finally:
            sock.close()
        assert http_status(front, b"GET http://m2:5301/ HTTP/1.1\r\n\r\n")[0] == 403
    finally:
        front.stop()


def test_the_trust_check():
    me = os.geteuid()
    server = ("127.0.0.1", 1080)
    assert client_untrusted(("127.0.0.1", 40000), server, uid_of=lambda c, s: me) is None
    assert client_untrusted(("::1", 40000), server, uid_of=lambda c, s: me) is None
    assert client_untrusted(("::ffff:127.0.0.2", 40000), server, uid_of=lambda c, s: me) is None
    assert "not on loopback" in (client_untrusted(("10.1.0.11", 40000), server, uid_of=lambda c, s: me) or "")
    assert "not on loopback" in (client_untrusted(("192.0.2.1", 40000), server, allow_other_users=True) or "")
    assert "uid 4242" in (client_untrusted(("127.0.0.1", 40000), server, uid_of=lambda c, s: 4242) or "")
    assert client_untrusted(("127.0.0.1", 40000), server, allow_other_users=True, uid_of=lambda c, s: 4242) is None
    assert "unknown" in (client_untrusted(("127.0.0.1", 40000), server, uid_of=lambda c, s: None) or "")
    assert client_untrusted(("127.0.0.1", 40000), server, uid_of=lambda c, s: 0) is None  # root


def test_socket_uid_finds_a_real_socket():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        with socket.create_connection(listener.getsockname()) as client:
            assert socket_uid(client.getsockname(), listener.getsockname()) == os.geteuid()
            assert socket_uid(client.getsockname(), ("127.0.0.1", 1)) is None


# An interpreter another user can run (the test's own may live under root's home).
SYSTEM_PYTHON = "/usr/bin/python3"


@pytest.mark.skipif(os.getuid() != 0 or not os.path.exists(SYSTEM_PYTHON),
                    reason="needs root (to run a client as another user) and /usr/bin/python3")
def test_a_loopback_client_of_another_user_is_refused(door):
    probe = ("import socket, sys; s = socket.create_connection(('127.0.0.1', int(sys.argv[1])), timeout=30); "
             "s.sendall(b'\\x05\\x01\\x00'); print(s.recv(2).hex())")

    def reply(front: FrontDoor, **user: Any) -> str:
        result = gevent.subprocess.run([SYSTEM_PYTHON, "-I", "-S", "-c", probe, str(front.address.port)],
                                       capture_output=True, timeout=CLIENT_TIMEOUT_S * 2, cwd="/", **user)
        assert result.returncode == 0, result.stderr
        return result.stdout.decode().strip()

    assert reply(door) == "0500"  # this user: in
    assert reply(door, user=65534) == "05ff"  # nobody: refused
    front = FrontDoor(door.node, allow_other_users=True).start()
    try:
        assert reply(front, user=65534) == "0500"
    finally:
        front.stop()


# --- programs that are not Python -------------------------------------------------------------------

def test_proxy_environment_variables(door):
    """What ``gridsock run`` sets for programs that are not Python: one address for all three."""
    proxy = f"127.0.0.1:{door.address.port}"
    url = f"http://m2:{HTTP_PORT}/index.html"
    for variables in ({"ALL_PROXY": f"socks5h://{proxy}"}, {"http_proxy": f"http://{proxy}"}):
        result = gevent.subprocess.run(["curl", "-sS", "--max-time", str(CLIENT_TIMEOUT_S), url], capture_output=True,
                                       env={**no_proxy_env(), **variables}, timeout=CLIENT_TIMEOUT_S * 2)
        assert result.stdout == PAGE, (variables, result.stderr)
    fetch = f"import urllib.request; print(urllib.request.urlopen({url!r}, timeout=30).read().decode(), end='')"
    result = gevent.subprocess.run([sys.executable, "-I", "-c", fetch], capture_output=True,
                                   env={**no_proxy_env(), "http_proxy": f"http://{proxy}"}, timeout=CLIENT_TIMEOUT_S * 2)
    assert result.stdout == PAGE, result.stderr


def test_status_names_the_pid_of_a_program_using_the_front_door(grid, door):
    script = ("import socket, sys; s = socket.create_connection(('127.0.0.1', int(sys.argv[1])), timeout=30); "
              "s.sendall(b'\\x05\\x01\\x00'); assert s.recv(2) == b'\\x05\\x00'; "
              "s.sendall(b'\\x05\\x01\\x00\\x03\\x02m2' + (%d).to_bytes(2, 'big')); assert s.recv(10)[1] == 0; "
              "print('connected', flush=True); sys.stdin.read(); s.close()" % ECHO_PORT)
    proc = gevent.subprocess.Popen([sys.executable, "-I", "-S", "-c", script, str(door.address.port)],
                                   stdin=gevent.subprocess.PIPE, stdout=gevent.subprocess.PIPE)
    try:
        assert proc.stdout.readline() == b"connected\n"
        [listed] = [c for c in grid["m1"].status()["connections"] if "front_door" in c]
        assert listed["pid"] == proc.pid and listed["peer"] == "m2"
    finally:
        proc.stdin.close()
        assert proc.wait(timeout=CLIENT_TIMEOUT_S) == 0
        proc.stdout.close()
    wait_until(lambda: not [c for c in grid["m1"].status()["connections"] if "front_door" in c],
               "the connection gone from status once the program closed it")


@pytest.mark.skipif(shutil.which("proxychains4") is None, reason="proxychains4 is not installed")
def test_proxychains4_takes_curl_to_a_grid_name(door, tmp_path):
    conf = tmp_path / "proxychains.conf"
    conf.write_text(f"strict_chain\nproxy_dns\nremote_dns_subnet 224\ntcp_read_time_out 15000\n"
                    f"tcp_connect_time_out 8000\n[ProxyList]\nsocks5 127.0.0.1 {door.address.port}\n")
    result = run_tool("proxychains4", "-q", "-f", str(conf), "curl", "-sS", "--max-time", str(CLIENT_TIMEOUT_S),
                      f"http://m2:{HTTP_PORT}/index.html")
    assert result.returncode == 0, result.stderr
    assert result.stdout == PAGE


def test_a_node_started_with_a_front_door_serves_it(grid):
    from gridsock.node import Node

    node = Node(grid.session, "f1", cluster="A", leader=str(grid["L1"].address), listen_address="127.0.0.1:0",
                control="", front_door="127.0.0.1:0").start()
    try:
        assert node.wait_joined(JOIN_TIMEOUT_S)
        node.wait_directory(present=["m2"], timeout=JOIN_TIMEOUT_S)
        address = node.status()["front_door"]
        host, _, port = address.rpartition(":")
        assert host == "127.0.0.1"
        result = curl("--socks5-hostname", address, f"http://m2:{HTTP_PORT}/index.html")
        assert result.stdout == PAGE, result.stderr
        result = curl("-x", f"http://{address}", f"http://m2:{HTTP_PORT}/index.html")
        assert result.stdout == PAGE, result.stderr
    finally:
        node.stop()
    with pytest.raises(ConnectionRefusedError):
        gsocket.create_connection((host, int(port)), timeout=CLIENT_TIMEOUT_S).close()


# --- the codec, without I/O ---------------------------------------------------------------------------

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from gridsock.errors import RemoteProtocolError  # noqa: E402
from gridsock.frontdoor import parse_socks_greeting, parse_socks_userpass  # noqa: E402

PARSERS = [parse_socks_greeting, parse_socks_userpass, parse_socks_request, parse_http_head]


@pytest.mark.parametrize("parse, whole, expected", [
    (parse_socks_greeting, b"\x05\x02\x00\x02", (b"\x00\x02", 4)),
    (parse_socks_userpass, b"\x01\x05alice\x06secret", (b"alice", b"secret", 14)),
    (parse_socks_request, socks_request("b2", 8000), None),
    (parse_socks_request, socks_request("::1", 22), None),
    (parse_http_head, b"GET http://b2:8000/ HTTP/1.1\r\nHost: b2:8000\r\n\r\n", None),
])
def test_codec_whole_byte_by_byte_and_with_trailing_bytes(parse, whole, expected):
    got = parse(whole)
    assert got is not None and got[-1] == len(whole)
    if expected is not None:
        assert got == expected
    for cut in range(len(whole)):
        assert parse(whole[:cut]) is None, f"a message from {cut} of {len(whole)} bytes"
    assert parse(whole + b"trailing bytes") == got


def test_codec_messages():
    request, _ = parse_socks_request(socks_request("m2.grid", 5300))
    assert (request.command, request.host, request.port, request.address_type) == (1, "m2.grid", 5300, 3)
    assert parse_socks_request(socks_request("::1", 22))[0].host == "::1"
    assert encode_socks_reply(0, "240.1.2.3", 80) == b"\x05\x00\x00\x01\xf0\x01\x02\x03\x00\x50"
    assert encode_socks_reply(4, "::1", 1)[3] == 4
    bare_lf = b"GET http://b2/ HTTP/1.0\nAccept: */*\n\nbody"
    head, used = parse_http_head(bare_lf)
    assert (head.method, head.target, head.version, head.headers, used) == (
        "GET", "http://b2/", "HTTP/1.0", (("Accept", "*/*"),), len(bare_lf) - len(b"body"))
    with pytest.raises(SocksProtocolError) as refused:
        parse_socks_request(b"\x05\x01\x00\x07")
    assert refused.value.reply[1] == 0x08
    with pytest.raises(HttpProtocolError) as oversized:
        parse_http_head(b"GET http://b2/ HTTP/1.1\r\nX: " + b"y" * 70_000)
    assert oversized.value.status == 431
    import pickle

    again = pickle.loads(pickle.dumps(refused.value))
    assert isinstance(again, SocksProtocolError) and again.reply == refused.value.reply


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.sampled_from(PARSERS))
def test_codec_random_bytes_give_messages_or_remote_protocol_errors(data, parse):
    try:
        got = parse(data)
    except RemoteProtocolError:
        return
    assert got is None or 0 < got[-1] <= len(data)


def test_response_rewriter_byte_by_byte_is_the_same_as_whole():
    stream = (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\nConnection: Keep-Alive\r\n"
              b"Keep-Alive: timeout=5\r\nServer: x\r\n\r\nafter")
    whole = ResponseRewriter()
    expected = whole.feed(stream) + whole.flush()
    assert expected == (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\nServer: x\r\n"
                        b"Connection: close\r\n\r\nafter")
    single = ResponseRewriter()
    assert b"".join(single.feed(stream[i:i + 1]) for i in range(len(stream))) + single.flush() == expected


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200).filter(lambda b: not b.startswith(b"H")), st.integers(1, 50))
def test_response_rewriter_passes_what_is_not_a_response_head_unchanged(data, chunk):
    rewriter = ResponseRewriter()
    out = b"".join(rewriter.feed(data[i:i + chunk]) for i in range(0, len(data), chunk)) + rewriter.flush()
    assert out == data


# --- one bad client never affects the others ------------------------------------------------------

# The fuzzed front door drops a client whose request is not complete after this long.
FUZZ_HANDSHAKE_TIMEOUT_S = 2.0
# Clients of the fuzz test at once (a few hundred cases in all).
FUZZ_CONCURRENCY = 64


def fuzz_cases(rng: random.Random) -> List[Tuple[bytes, bool]]:
    """(what a bad client sends, whether it then half-closes): random, truncated, oversized,
    wrong versions, for both protocols. A truncation always stops short of a whole request."""
    good_socks = b"\x05\x01\x00" + socks_request("m2", ECHO_PORT)
    good_http = b"GET http://m2:5301/index.html HTTP/1.1\r\nHost: m2:5301\r\nUser-Agent: fuzz\r\n\r\n"
    cases: List[bytes] = []
    for _ in range(60):
        cases.append(b"\x05" + rng.randbytes(rng.randrange(0, 300)))
        cases.append(bytes([rng.choice([b for b in range(256) if b != 5])]) + rng.randbytes(rng.randrange(0, 300)))
        cases.append(good_socks[:rng.randrange(1, len(good_socks))])
        cases.append(good_http[:rng.randrange(1, len(good_http) - 1)])
        mutated = bytearray(good_http)
        for _ in range(rng.randrange(1, 4)):
            mutated[rng.randrange(len(mutated) - 4)] = rng.randrange(256)
        cases.append(bytes(mutated))
    cases += [
        b"",  # says nothing
        b"\x05\x00",  # no method
        b"\x05\x01\x02\x02\x05alice",  # userpass, truncated (no users here)
        b"\x05\x01\x00\x04\x01\x00\x01\x7f\x00\x00\x01\x00\x50",  # SOCKS4 request after a SOCKS5 greeting
        b"\x04\x01\x00\x50\x7f\x00\x00\x01\x00",  # SOCKS4
        b"\x05\x01\x00\x05\x01\x00\x03\xff" + b"a" * 255 + b"\x00\x50",  # longest name, unknown
        b"GET http://m2:5301/ HTTP/1.1\r\nX: " + b"y" * 70_000,  # head never ends
        b"GET http://m2:5301/ HTTP/1.1\r\n" + b"X: y\r\n" * 500 + b"\r\n",
        b"CONNECT m2:99999 HTTP/1.1\r\n\r\n",
        b"GET http://[::1 HTTP/1.1\r\n\r\n",
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + rng.randbytes(200),  # a TLS ClientHello
    ]
    return [(case, rng.random() < 0.5) for case in cases]


def bad_client(port: int, payload: bytes, half_close: bool) -> bytes:
    """Send ``payload``; what came back before the front door closed (a reset counts as a close).
    Raises socket.timeout if it did not close in time."""
    sock = gsocket.create_connection(("127.0.0.1", port), timeout=FUZZ_HANDSHAKE_TIMEOUT_S + CLIENT_TIMEOUT_S)
    got = bytearray()
    try:
        try:
            sock.sendall(payload)
            if half_close:
                sock.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass  # it had heard enough
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                return bytes(got)
            if not chunk:
                return bytes(got)
            got += chunk
    finally:
        sock.close()


def test_fuzz_bad_clients_get_an_error_reply_or_a_close_and_a_good_client_is_served(grid):
    from gevent.pool import Pool

    front = FrontDoor(grid["m1"], pass_through=False, handshake_timeout=FUZZ_HANDSHAKE_TIMEOUT_S).start()
    port = front.address.port
    cases = fuzz_cases(random.Random(1928))
    assert len(cases) > 300
    fuzzing = gevent.event.Event()
    served: List[int] = []

    def good_client() -> None:
        while True:
            sock, (code, _, _) = raw_socks(front, "m2", ECHO_PORT)
            try:
                assert code == 0
                data = os.urandom(10_000)
                assert echo_through(sock, data) == data
            finally:
                sock.close()
            served.append(1)
            if not fuzzing.is_set():
                return

    def check(case: Tuple[bytes, bool]) -> None:
        payload, half_close = case
        reply = bad_client(port, payload, half_close)
        if reply and payload[:1] == b"\x05":
            assert reply[0] == 5, (payload[:40], reply[:40])
        elif reply:
            try:
                valid = parse_http_head(payload) is not None  # a mutation that left it valid is served
            except RemoteProtocolError:
                valid = False
            assert reply.startswith(b"HTTP/1.") if valid else reply[:10] in (b"HTTP/1.1 4", b"HTTP/1.1 5"), \
                (payload[:40], reply[:40])

    try:
        fuzzing.set()
        good = gevent.spawn(good_client)
        Pool(FUZZ_CONCURRENCY).map(check, cases)
        fuzzing.clear()
        good.get(timeout=CLIENT_TIMEOUT_S)
        assert len(served) >= 2
        good_client()  # and after
        wait_until(lambda: front.status()["handshaking"] == 0, "no client left in its handshake")
    finally:
        front.stop()


def test_a_silent_client_is_dropped_with_one_log_line(grid, caplog):
    front = FrontDoor(grid["m1"], handshake_timeout=FUZZ_HANDSHAKE_TIMEOUT_S).start()
    try:
        with caplog.at_level("INFO", logger="gridsock.frontdoor"):
            assert bad_client(front.address.port, b"\x05\x01", half_close=False) == b""
        dropped = [r.getMessage() for r in caplog.records if "dropped" in r.getMessage()]
        assert len(dropped) == 1 and f"no complete request within {FUZZ_HANDSHAKE_TIMEOUT_S} s" in dropped[0]
    finally:
        front.stop()


def wait_until(condition: Callable[[], bool], what: str) -> None:
    """Wait (bounded) until ``condition()`` holds, letting the grid's greenlets run."""
    with gevent.Timeout(CLIENT_TIMEOUT_S, AssertionError(f"not within {CLIENT_TIMEOUT_S} s: {what}")):
        while not condition():
            gevent.sleep(0.01)


def test_clients_beyond_max_clients_are_closed_at_once(grid):
    front = FrontDoor(grid["m1"], max_clients=2, handshake_timeout=CLIENT_TIMEOUT_S * 4).start()
    address = ("127.0.0.1", front.address.port)
    held = [gsocket.create_connection(address, timeout=CLIENT_TIMEOUT_S) for _ in range(2)]
    try:
        wait_until(lambda: front.status()["handshaking"] == 2, "two clients in their handshake")
        with gsocket.create_connection(address, timeout=CLIENT_TIMEOUT_S) as third:
            assert third.recv(1) == b""  # closed at once, long before the handshake bound
        for sock in held:
            sock.close()
        wait_until(lambda: front.status()["handshaking"] == 0, "the held clients gone")
        assert socks_code(front, "m2", ECHO_PORT) == 0
    finally:
        for sock in held:
            sock.close()
        front.stop()


def test_a_front_door_on_ipv6_loopback_knows_its_clients_user(grid):
    front = FrontDoor(grid["m1"], "[::1]:0").start()
    try:
        assert front.address.host == "::1"
        sock = gsocket.create_connection(("::1", front.address.port), timeout=CLIENT_TIMEOUT_S)
        try:
            sock.sendall(b"\x05\x01\x00" + socks_request("m2", ECHO_PORT))
            assert read_exactly(sock, 2) == b"\x05\x00"  # its uid was found in /proc/net/tcp6
            assert read_socks_reply(sock)[0] == 0
            assert echo_through(sock, b"six" * 1000) == b"six" * 1000
        finally:
            sock.close()
    finally:
        front.stop()
