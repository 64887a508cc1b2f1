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
    finally:
        sock.close()
