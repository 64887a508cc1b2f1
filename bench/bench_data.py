"""Data connections in the grid lab: establishment delay and throughput, next to plain sockets.

What it measures
----------------
On its own grid lab (prefix ``gsb<pid>-``) and session: the rendez-vous node on ``rv``, leaders
``a1``, ``b1``, ``c1`` (through fec's sshd), member ``a2`` and a node on ``rv`` whose rules accept
plain ``tcp`` from outside its cluster. Two lab paths, both from ``a1``:

- ``a1 -> a2``: inside cluster A (one LAN bridge);
- ``a1 -> rv``: out of cluster A through gwa's NAT to the public rendez-vous host.

1. Establishment delay of ``tcp``, ``tls/tcp``, ``lz4/tcp`` and ``relay``: the time
   ``Node.open_stream`` takes (*open*), and until a 1-byte request has come back over the new
   connection (*ready*). Three states of the pair: *steady* (the meta link is up: one warm-up
   connect first), *cold meta link* (``a1`` drops its meta link to the peer, and waits until the
   peer has dropped its end, before every connect), and *fresh node* (a new node joins cluster A
   from ``a1``'s namespace for every sample, and connects once: a pair that has never met). Next
   to them, in the same namespaces: a plain TCP ``connect()`` and a plain mutual-TLS handshake
   (stdlib, blocking, the same kind of certificates), each also with the 1-byte round trip. To
   split the time: round trips of the meta channel and of the bootstrap channel (``ping``), and
   the steps of ``open_stream`` timed one by one (TCP dial, assembly request, filters), opening
   a meta link alone, and making a TLS client context.
2. Throughput one way, each way (``a1`` sends; the peer sends), of ``tcp``, ``tls/tcp`` (also
   through the bridged socket ``Node.connect`` gives applications), ``lz4/tcp`` (random and
   JSON-like data), ``relay`` and ``tls/relay``; against a plain TCP and a plain TLS socket
   (stdlib, blocking) and iperf3, on the same path. The CPU time of every process on the path
   says what limits each figure.

How
---
``a1``, ``a2`` and ``rv``'s node run this script as ``bench_data.py node ARGS``: exactly what
``gridsock node ARGS`` runs (``Node``, rules, echo service), plus a bench service on grid port
``BENCH_PORT`` and a second control socket ``<name>-bench.sock`` whose operations do the timing
inside the node process. ``b1`` and ``c1`` are plain ``gridsock node`` processes. Baselines are
this script too (``plain-server`` / ``plain-client``), run with ``ip netns exec`` in the same
namespaces. Cases are measured in interleaved rounds (in a new order each round) so that a
load spike of the shared machine hits all alike. Every loop is bounded by a count, every wait by
a timeout; the lab is torn down (``Lab.down()``) whatever happens, SIGTERM included.

    python3 bench/bench_data.py [--quick] [--out docs/benchmarks.md] [--logs DIR]
                                [--wan-delay-ms D] [--only establish] [--connects N]

Needs root and the lab's tools, plus iperf3. ``--quick``: 10 connects per case and 8 MiB
transfers (under half a minute here); the full run: 50 connects per case, 64 MiB transfers in 9
rounds (about two minutes here).
The results replace the section "Data connections in the lab" of ``--out`` (the rest of the file
is kept) and go to stdout; the raw samples go to a JSON file in the temporary directory, which
``--render-only FILE`` renders again without measuring.

``--only relay`` measures the relay's throughput alone, ``a1 -> rv`` (through the rendez-vous
node), against a plain TCP and a plain mutual-TLS socket on the same path, each way; with
``--before DIR`` (a checkout of another commit, e.g. ``git worktree add DIR HEAD``) it does it
twice in one run, on one lab: first with the grid's processes importing gridsock from ``DIR``
(``PYTHONPATH``), then from this tree, the plain baselines again each time. Its results replace
the section "Relay throughput in the lab: <WAN profile>" of ``--out``.

``--wan-delay-ms D`` (default 0: none) makes the lab's internet a WAN once the lab is up
(``Lab.set_wan(delay_ms=D)``: D ms one way on each public host's ingress, so ``a1 -> rv`` gains
``2 * D`` of round trip; ``a1 -> a2`` stays inside cluster A and crosses no delay); it is removed
again before the lab is torn down, and the report says which delay was used. ``--only establish``
skips the throughput part (and the reading, which needs it); ``--connects N`` sets the number of
connects per case (fresh-node cases included).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import logging
import math
import os
import platform
import random
import shlex
import shutil
import signal
import socket
import ssl
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import gevent
import lz4.frame

from gridsock.bootstrap.control import ControlServer, call, control_path, run_dir
from gridsock.errors import GridsockError
from gridsock.testing.streams import sample_data

from _machine import cpu_model
from lab_helpers import JOIN_TIMEOUT_S, LabGrid, proc_cpu_s, replace_section

log = logging.getLogger("bench_data")

SCRIPT = str(Path(__file__).resolve())
SECTION_TITLE = "## Data connections in the lab"
RELAY_SECTION_TITLE = "## Relay throughput in the lab"

# --- what is measured ------------------------------------------------------------------------

BENCH_PORT = 9001  # grid port of the bench service on the driver nodes (ECHO_PORT is 9000)
CONNECT_STACKS = ("tcp", "tls/tcp", "lz4/tcp", "relay")
MODES = ("steady", "cold", "fresh")
MODE_LABELS = {"steady": "steady", "cold": "cold meta link", "fresh": "fresh node"}
ANATOMY_CASES = (("tcp", "steady"), ("tls/tcp", "steady"), ("relay", "steady"), ("tcp", "cold"), ("tls/tcp", "cold"))
# (stack, data kind, through the bridged socket of Node.connect rather than the stream)
RELAY_STACKS = ("relay", "tls/relay")  # --only relay
STREAM_CASES = (("tcp", "random", False), ("tls/tcp", "random", False), ("tls/tcp", "random", True),
                ("lz4/tcp", "random", False), ("lz4/tcp", "json", False), ("relay", "random", False),
                ("tls/relay", "random", False))
BRIDGED_TAG = "+bridge"  # case-name suffix: through Node.connect's socket
DIRECTIONS = ("up", "down")  # up: a1 sends; down: the peer sends
PATHS = (("a1", "a2", "inside cluster A (LAN bridge)"), ("a1", "rv", "cluster A -> rv through gwa's NAT"))
RV_RULES = """\
# the public node accepts plain stacks from outside its cluster, so direct stacks can be compared
[policy]
outside_cluster = []
"""

# --- the bench protocol (grid port BENCH_PORT and the plain baseline server) -------------------
# Request: op, byte count, data kind. "P": answer one byte. "U": the server reads the bytes, then
# answers with its CPU seconds. "D": the server sends the bytes, then its CPU seconds. Then both
# sides send EOF and read to EOF (a clean end, also for TLS).
HEADER = struct.Struct("!cQB")
REPLY = struct.Struct("!d")
OP_PING, OP_UP, OP_DOWN = b"P", b"U", b"D"
KINDS = ("random", "json")
CHUNK_BYTES = 256 * 1024  # per send and per receive
PATTERN_BYTES = 16 * 1024 * 1024  # data is this pattern repeated (a multiple of CHUNK_BYTES)

# --- bounds ------------------------------------------------------------------------------------

CONNECT_TIMEOUT_S = 15.0  # one data connection is built within this
TRANSFER_TIMEOUT_S = 300.0  # one transfer (64 MiB over the slowest stack) ends within this
COLD_WAIT_S = 5.0  # a peer notices that a meta link was dropped within this
POLL_S = 0.005  # how often a bounded wait polls
SERVER_READY_S = 20.0  # a baseline server or iperf3 prints its readiness line within this
CONTROL_SLACK_S = 60.0  # on top of an operation's own bound, for the control call
IPERF_PORT = 5201


@dataclasses.dataclass(frozen=True)
class Plan:
    """How much of everything to do."""

    connects: int  # samples per connect case
    fresh: int  # samples per fresh-node case (each is a node joining)
    connect_rounds: int
    pings: int
    transfer_bytes: int
    transfer_rounds: int


FULL = Plan(connects=50, fresh=50, connect_rounds=10, pings=200, transfer_bytes=64 << 20, transfer_rounds=9)
QUICK = Plan(connects=10, fresh=10, connect_rounds=2, pings=50, transfer_bytes=8 << 20, transfer_rounds=1)
TINY = Plan(connects=4, fresh=2, connect_rounds=2, pings=5, transfer_bytes=1 << 20, transfer_rounds=1)  # smoke test


class BenchError(RuntimeError):
    """Something the bench waited for did not happen, or a measurement went wrong."""


# --- data and byte-level helpers (plain sockets and gridsock streams alike) --------------------

_patterns: Dict[str, memoryview] = {}


def pattern(kind: str) -> memoryview:
    """PATTERN_BYTES of ``kind`` data (``gridsock.testing.streams.sample_data``), made once."""
    if kind not in _patterns:
        _patterns[kind] = memoryview(sample_data(PATTERN_BYTES, kind, seed=1))
    return _patterns[kind]


def pour(send: Callable[[memoryview], object], nbytes: int, kind: str) -> None:
    """Send ``nbytes`` of ``kind`` data with ``send`` (a send-all), CHUNK_BYTES at a time."""
    data = pattern(kind)
    for offset in range(0, nbytes, CHUNK_BYTES):
        start = offset % PATTERN_BYTES
        send(data[start : start + min(CHUNK_BYTES, nbytes - offset)])


class Reader:
    """Reads through ``recv(max_bytes)`` (b"" at EOF), keeping what a read brought beyond a need."""

    def __init__(self, recv: Callable[[int], bytes]) -> None:
        self._recv = recv
        self._buf = b""

    def _more(self) -> None:
        data = self._recv(CHUNK_BYTES)
        if not data:
            raise EOFError("the peer ended the connection early")
        self._buf += data

    def exactly(self, n: int) -> bytes:
        while len(self._buf) < n:  # each pass adds at least one byte or raises
            self._more()
        out, self._buf = self._buf[:n], self._buf[n:]
        return out

    def skip(self, n: int) -> None:
        """Read and drop ``n`` bytes."""
        left = n - len(self._buf[:n])
        self._buf = self._buf[n:]
        while left > 0:  # each pass consumes at least one byte or raises
            data = self._recv(CHUNK_BYTES)
            if not data:
                raise EOFError(f"the peer ended the connection {left} bytes early")
            if len(data) > left:
                self._buf = data[left:]
            left -= len(data)

    def until_eof(self, limit: int = 1 << 20) -> None:
        """Read until EOF; at most ``limit`` stray bytes (a broken peer cannot keep us here)."""
        seen = len(self._buf)
        self._buf = b""
        while seen <= limit:
            data = self._recv(CHUNK_BYTES)
            if not data:
                return
            seen += len(data)
        raise BenchError(f"more than {limit} unexpected bytes before EOF")


def serve_request(reader: Reader, send: Callable[[bytes], object]) -> None:
    """The server half of the bench protocol, over any byte stream (see HEADER)."""
    op, nbytes, kind = HEADER.unpack(reader.exactly(HEADER.size))
    if kind >= len(KINDS):
        raise BenchError(f"unknown data kind {kind}")
    cpu = time.process_time()
    if op == OP_PING:
        send(b"p")
    elif op == OP_UP:
        reader.skip(nbytes)
        send(REPLY.pack(time.process_time() - cpu))
    elif op == OP_DOWN:
        pour(send, nbytes, KINDS[kind])
        send(REPLY.pack(time.process_time() - cpu))
    else:
        raise BenchError(f"unknown bench op {op!r}")


def client_transfer(reader: Reader, send: Callable[[bytes], object], direction: str, nbytes: int,
                    kind: str) -> Dict[str, float]:
    """The client half of one transfer; return ``seconds``, ``cpu_s`` (this process) and ``server_cpu_s``.

    ``up``: from the first byte sent until the server says it has them all; ``down``: from the
    request until the last byte has arrived. CPU time is the whole process's (all threads), over
    the same span on both sides.
    """
    pattern(kind)  # made before the clocks start
    cpu, started = time.process_time(), time.perf_counter()
    if direction == "up":
        send(HEADER.pack(OP_UP, nbytes, KINDS.index(kind)))
        pour(send, nbytes, kind)
        (server_cpu,) = REPLY.unpack(reader.exactly(REPLY.size))
        seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    else:
        send(HEADER.pack(OP_DOWN, nbytes, KINDS.index(kind)))
        reader.skip(nbytes)
        seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
        (server_cpu,) = REPLY.unpack(reader.exactly(REPLY.size))
    return {"seconds": seconds, "cpu_s": cpu, "server_cpu_s": server_cpu}


# --- inside a node process: the bench service and the timing operations ---------------------------


def serve_bench(node, port: int):
    """Serve the bench protocol on grid port ``port`` of ``node``; return the serving greenlet."""
    listener = node.listen(port)

    def one(stream) -> None:
        try:
            with gevent.Timeout(TRANSFER_TIMEOUT_S, TimeoutError("bench connection took too long")):
                reader = Reader(stream.receive_some)
                serve_request(reader, stream.send_all)
                stream.send_eof()
                reader.until_eof()
        except (GridsockError, OSError, EOFError, BenchError, struct.error) as exc:
            log.info("bench service: connection ended: %s", exc)
        finally:
            stream.close()

    def serve() -> None:
        while True:
            stream, _ = listener.accept_stream()
            gevent.spawn(one, stream)

    return gevent.spawn(serve)


def _finish(stream, reader: Reader) -> None:
    stream.send_eof()
    reader.until_eof()


def _connect_once(src, dst: str, stack: str) -> Tuple[float, float, str]:
    """Open a data connection and exchange one byte; return ``(open_s, ready_s, stack)``."""
    started = time.perf_counter()
    stream, info = src.open_stream(dst, BENCH_PORT, stack=stack, timeout=CONNECT_TIMEOUT_S)
    opened = time.perf_counter()
    try:
        with gevent.Timeout(CONNECT_TIMEOUT_S, TimeoutError(f"no answer over {stack} to {dst}")):
            reader = Reader(stream.receive_some)
            stream.send_all(HEADER.pack(OP_PING, 0, 0))
            if reader.exactly(1) != b"p":
                raise BenchError("bad ping answer")
            ready = time.perf_counter()
            _finish(stream, reader)
    finally:
        stream.close()
    return opened - started, ready - started, info.stack


def _peer_has_link(node, dst: str) -> bool:
    links = call(control_path(dst), "status", timeout=10)["meta_links"]
    return any(link["peer"] == node.name and link["stack"] != "bootstrap" for link in links)


def _drop_meta_link(node, dst: str) -> None:
    """Close our meta link to ``dst`` and wait until ``dst`` has closed its end too."""
    entry = node.directory.resolve(dst)
    if entry is None:
        raise BenchError(f"{dst} is not in {node.name}'s directory")
    opening = node.meta._opening.get(entry.node_id)  # (a first contact opens its link in the background)
    if opening is not None:
        opening.wait(COLD_WAIT_S)
    link = node.meta.links.get(entry.node_id)
    if link is not None:
        link.close("bench: measuring a first contact")
    deadline = time.monotonic() + COLD_WAIT_S
    while _peer_has_link(node, dst):  # bounded by the deadline
        if time.monotonic() > deadline:
            raise BenchError(f"{dst} still has a meta link to {node.name} after {COLD_WAIT_S} s")
        gevent.sleep(POLL_S)
    if node.meta.links.get(entry.node_id) is not None:
        raise BenchError(f"{node.name} still has a meta link to {dst}")


_fresh_serial = iter(range(1, 1 << 30))


def _fresh_node(node, dst: str):
    """A node that has never met ``dst``: joins ``node``'s cluster from its namespace; started."""
    from gridsock.node import Node

    name = f"fresh{next(_fresh_serial)}-{os.getpid()}"
    fresh = Node(node.session, name, cluster=node.cluster, leader=str(node.address),
                 listen_address=f"{node.address.host}:0", control="").start()
    try:
        if not fresh.wait_joined(JOIN_TIMEOUT_S):
            raise BenchError(f"{name} did not join within {JOIN_TIMEOUT_S} s")
        fresh.wait_directory(present=[dst], timeout=JOIN_TIMEOUT_S)
        call(control_path(dst), "wait", {"present": [name], "timeout": JOIN_TIMEOUT_S}, timeout=JOIN_TIMEOUT_S + 5)
    except BaseException:
        fresh.stop()
        raise
    return fresh


def op_connects(node, args: dict) -> dict:
    """``n`` connects to ``dst`` over ``stack`` in ``mode`` (steady, cold, fresh); times in seconds."""
    dst, stack, n, mode = str(args["dst"]), str(args["stack"]), int(args["n"]), str(args["mode"])
    if mode not in MODES:
        raise BenchError(f"unknown mode {mode!r}")
    opens, readies, stacks = [], [], set()
    if mode == "steady":
        _connect_once(node, dst, stack)  # brings the meta link up
    for _ in range(n):
        src = node
        if mode == "cold":
            _drop_meta_link(node, dst)
        elif mode == "fresh":
            src = _fresh_node(node, dst)
        try:
            open_s, ready_s, built = _connect_once(src, dst, stack)
        finally:
            if src is not node:
                src.stop()
        opens.append(open_s)
        readies.append(ready_s)
        stacks.add(built)
    return {"open": opens, "ready": readies, "stacks": sorted(stacks)}


def op_pings(node, args: dict) -> dict:
    """Round trips to ``dst``: meta channel (warm link) and bootstrap channel; seconds."""
    dst, n = str(args["dst"]), int(args["n"])
    node.meta_request(dst, "ping", b"", timeout=CONNECT_TIMEOUT_S)  # brings the meta link up
    entry = node.directory.resolve(dst)
    if entry is None or node.meta.links.get(entry.node_id) is None:
        raise BenchError(f"no meta link from {node.name} to {dst}")
    meta, boot = [], []
    for _ in range(n):
        started = time.perf_counter()
        node.meta_request(dst, "ping", b"", timeout=CONNECT_TIMEOUT_S)
        meta.append(time.perf_counter() - started)
        boot.append(node.ping(dst, timeout=CONNECT_TIMEOUT_S).rtt_s)
    route = list(node.ping(dst, timeout=CONNECT_TIMEOUT_S).route_there)
    return {"meta": meta, "bootstrap": boot, "route": route}


def op_stream(node, args: dict) -> dict:
    """One transfer of ``bytes`` of ``kind`` data over ``stack``, ``direction`` up or down.

    With ``bridged``, through the socket ``Node.connect`` hands to applications (for any stack
    but plain tcp, one end of a socketpair that gridsock's bridge pumps), used from this hub as
    the bridge module says: a gevent socket on the same descriptor.
    """
    from gevent import socket as gsocket

    dst, stack = str(args["dst"]), str(args["stack"])
    nbytes, kind, direction = int(args["bytes"]), str(args["kind"]), str(args["direction"])
    with gevent.Timeout(TRANSFER_TIMEOUT_S, TimeoutError(f"transfer over {stack} took too long")):
        if args.get("bridged"):
            std_sock, info = node.connect(dst, BENCH_PORT, stack=stack, timeout=CONNECT_TIMEOUT_S)
            sock = gsocket.socket(fileno=std_sock.detach())
            try:
                reader = Reader(sock.recv)
                result = client_transfer(reader, sock.sendall, direction, nbytes, kind)
                sock.shutdown(socket.SHUT_WR)
                reader.until_eof()
            finally:
                sock.close()
        else:
            stream, info = node.open_stream(dst, BENCH_PORT, stack=stack, timeout=CONNECT_TIMEOUT_S)
            try:
                reader = Reader(stream.receive_some)
                result = client_transfer(reader, stream.send_all, direction, nbytes, kind)
                _finish(stream, reader)
            finally:
                stream.close()
    return {**result, "stack": info.stack}


def op_anatomy(node, args: dict) -> dict:
    """Where a connect's time goes: ``n`` connects over ``stack`` in ``mode``, its steps timed.

    The steps of ``Assembler.open_stream`` are wrapped (in this process only, and only while this
    runs): ``dial`` (the direct TCP connect and the preamble, in a greenlet of its own, in parallel
    with the request), ``request`` (the assembly request and its answer over the meta channel,
    the meta link's opening included), ``build`` (the filters: the TLS handshake). Also timed
    alone: opening a meta link to ``dst`` (``link_open``) and making a TLS client context
    (``client_context``, which every meta link dial does).
    """
    import gridsock.components.tcp as tcp
    from gridsock.session import client_context

    dst, stack, n, mode = str(args["dst"]), str(args["stack"]), int(args["n"]), str(args["mode"])
    if mode not in ("steady", "cold"):
        raise BenchError(f"anatomy takes steady or cold, not {mode!r}")
    samples: List[Dict[str, float]] = []
    current: Dict[str, float] = {}

    def timed(step: str, fn: Callable) -> Callable:
        def wrapper(*a, **kw):
            started = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                current[step] = time.perf_counter() - started
        return wrapper

    real_dial = tcp.TcpMethod.dial_node_port
    tcp.TcpMethod.dial_node_port = timed("dial", real_dial)
    node.meta_request = timed("request", node.meta_request)  # instance attributes hide the methods
    node.assembler._build = timed("build", node.assembler._build)
    try:
        _connect_once(node, dst, stack)  # warm-up
        for _ in range(n):
            if mode == "cold":
                _drop_meta_link(node, dst)
            current.clear()
            open_s, _, _ = _connect_once(node, dst, stack)
            samples.append(dict(current, open=open_s))
    finally:
        tcp.TcpMethod.dial_node_port = real_dial
        del node.meta_request
        del node.assembler._build
    entry = node.directory.resolve(dst)
    link_open, contexts = [], []
    for _ in range(n if args.get("alone") else 0):
        _drop_meta_link(node, dst)
        started = time.perf_counter()
        if node.meta.link_for(entry.node_id) is None:
            raise BenchError(f"no meta link to {dst}")
        link_open.append(time.perf_counter() - started)
        started = time.perf_counter()
        client_context(node.session, node.identity)
        contexts.append(time.perf_counter() - started)
    return {"samples": samples, "link_open": link_open, "client_context": contexts}


BENCH_OPS = {"connects": op_connects, "pings": op_pings, "stream": op_stream, "anatomy": op_anatomy}


def run_node(argv: List[str], ops: Optional[Dict[str, Callable]] = None, prog: str = "bench_data.py node") -> int:
    """``bench_data.py node ARGS``: ``gridsock node ARGS`` plus the bench service and operations
    (``ops``, default BENCH_OPS; bench_methods.py passes its own)."""
    from gridsock.diag import serve_echo
    from gridsock.node import Node
    from gridsock.rules import Rules
    from gridsock.session import Session

    ops = BENCH_OPS if ops is None else ops
    parser = argparse.ArgumentParser(prog=prog)
    for option in ("--session", "--name", "--listen", "--rules", "--cluster", "--leader", "--ssh-gateway",
                   "--ssh-key", "--ssh-known-hosts"):
        parser.add_argument(option)
    parser.add_argument("--echo", type=int)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format=f"{args.name} %(name)s: %(message)s")
    session = Session.load(args.session)
    rules = Rules.load(args.rules, tls=session.tls) if args.rules else None
    gateway = None
    if args.ssh_gateway:
        from gridsock.bootstrap.sshtunnel import SSHGateway

        gateway = SSHGateway.parse(args.ssh_gateway, key_filename=args.ssh_key, known_hosts=args.ssh_known_hosts)
    node = Node(session, args.name, cluster=args.cluster, leader=args.leader, listen_address=args.listen,
                rules=rules, ssh_gateway=gateway, ssh_key=args.ssh_key, ssh_known_hosts=args.ssh_known_hosts,
                loop="caller").start()
    if args.echo:
        serve_echo(node, args.echo)
    for kind in KINDS:  # before any timing
        pattern(kind)
    serve_bench(node, BENCH_PORT)

    def handle(op: str, op_args: dict):
        if op not in ops:
            raise GridsockError(f"unknown bench operation {op!r}")
        try:
            return ops[op](node, op_args)
        except GridsockError:
            raise
        except Exception as exc:  # the orchestrator gets the reason, not "internal error"
            log.exception("bench operation %s failed", op)
            raise GridsockError(f"{op}: {type(exc).__name__}: {exc}") from exc

    bench_control = ControlServer(os.path.join(run_dir(), f"{args.name}-bench.sock"), handle).start()
    print(f"node {node.name} listening {node.address}", flush=True)

    def announce() -> None:
        if node.wait_joined():
            print(f"joined {node.name} {node.node_id} {node.role}", flush=True)

    def stop(*_) -> None:
        bench_control.stop()
        node.stop()

    gevent.spawn(announce)
    gevent.signal_handler(signal.SIGTERM, stop)
    gevent.signal_handler(signal.SIGINT, stop)
    node.serve_forever()
    return 0


# --- plain baselines: stdlib blocking sockets, run with ip netns exec -----------------------------


def _tls_contexts(spec: dict) -> Tuple[ssl.SSLContext, ssl.SSLContext]:
    """Mutual TLS as gridsock does it: the session CA only, node certificates, no host names."""
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    for ctx in (server, client):
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_verify_locations(spec["ca"])
        ctx.load_cert_chain(spec["cert"], spec["key"])
        ctx.verify_mode = ssl.CERT_REQUIRED
    client.check_hostname = False
    return server, client


def _sock_reader(sock) -> Reader:
    return Reader(sock.recv)


def _kernel_timeouts(sock, seconds: float) -> None:
    """Bound a blocking socket's calls (connect included) in the kernel: SO_SNDTIMEO, SO_RCVTIMEO.

    A Python-level timeout (``settimeout``) would make every call a poll() and a non-blocking
    call, a handicap gridsock's gevent sockets do not have; a kernel timeout costs nothing. A call
    that times out raises BlockingIOError.
    """
    whole = int(seconds)
    value = struct.pack("ll", whole, int((seconds - whole) * 1e6))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, value)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, value)


def run_plain_server(spec: dict) -> int:
    """Serve the bench protocol on a TCP and a TLS port (printed); one thread per connection."""
    server_ctx, _ = _tls_contexts(spec)
    for kind in KINDS:  # before any timing
        pattern(kind)
    listeners = []
    for _ in range(2):
        listeners.append(socket.create_server(("0.0.0.0", 0), backlog=128))
    stop_signals = {signal.SIGTERM, signal.SIGINT}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)  # threads inherit it: sigwait gets them

    def one(conn, tls: bool) -> None:
        try:
            _kernel_timeouts(conn, TRANSFER_TIMEOUT_S)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if tls:
                conn = server_ctx.wrap_socket(conn, server_side=True)
            reader = _sock_reader(conn)
            serve_request(reader, conn.sendall)
            reader.until_eof()
        except (OSError, EOFError, BenchError, struct.error):
            pass
        finally:
            conn.close()

    def accept(lsock, tls: bool) -> None:
        while True:
            conn, _ = lsock.accept()
            threading.Thread(target=one, args=(conn, tls), daemon=True).start()

    for lsock, tls in zip(listeners, (False, True)):
        threading.Thread(target=accept, args=(lsock, tls), daemon=True).start()
    print(f"plain listening {listeners[0].getsockname()[1]} {listeners[1].getsockname()[1]}", flush=True)
    signal.sigwait(stop_signals)
    return 0


def run_plain_client(spec: dict) -> int:
    """One batch of baseline measurements (spec["op"]: connect or stream); JSON on stdout."""
    _, client_ctx = _tls_contexts(spec)
    addr, tls = (spec["addr"], spec["tls_port"] if spec["tls"] else spec["port"]), bool(spec["tls"])

    def dial():
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            _kernel_timeouts(sock, CONNECT_TIMEOUT_S)
            sock.connect(addr)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except BaseException:
            sock.close()
            raise
        return sock

    if spec["op"] == "connect":
        opens, readies = [], []
        for i in range(int(spec["n"]) + 1):  # the first is a warm-up (a new process: lazy imports, caches)
            started = time.perf_counter()
            sock = dial()
            try:
                if tls:
                    sock = client_ctx.wrap_socket(sock)  # handshake on connect
                opened = time.perf_counter()
                reader = _sock_reader(sock)
                sock.sendall(HEADER.pack(OP_PING, 0, 0))
                if reader.exactly(1) != b"p":
                    raise BenchError("bad ping answer")
                ready = time.perf_counter()
            finally:
                sock.close()
            if i > 0:
                opens.append(opened - started)
                readies.append(ready - started)
        result = {"open": opens, "ready": readies}
    elif spec["op"] == "stream":
        sock = dial()
        try:
            _kernel_timeouts(sock, TRANSFER_TIMEOUT_S)
            if tls:
                sock = client_ctx.wrap_socket(sock)
            result = client_transfer(_sock_reader(sock), sock.sendall, spec["direction"], int(spec["bytes"]),
                                     spec["kind"])
        finally:
            sock.close()
    else:
        raise BenchError(f"unknown op {spec['op']!r}")
    print(json.dumps(result), flush=True)
    return 0


# --- statistics and formatting ---------------------------------------------------------------------


def percentile(samples: Sequence[float], q: float) -> float:
    """Nearest-rank percentile, ``q`` in [0, 1]."""
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def shuffled(items: list, round_no: int) -> list:
    """``items`` in an order of their own for round ``round_no`` (reproducible): a case does not
    always follow the same case, whose aftermath (a process exiting...) would then always hit it."""
    out = list(items)
    random.Random(round_no).shuffle(out)
    return out


def ms(seconds: float) -> str:
    value = seconds * 1e3
    return f"{value:.2f}" if value < 1 else f"{value:.1f}" if value < 100 else f"{value:.0f}"


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def progress(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


# --- the orchestrator ---------------------------------------------------------------------------------


class Bench:
    """The lab grid, the baseline servers and the measurements, from the host's namespace."""

    def __init__(self, lab, grid: LabGrid, plan: Plan, workdir: Path) -> None:
        self.lab = lab
        self.grid = grid
        self.plan = plan
        self.workdir = workdir
        self.tls_files: Dict[str, Dict[str, str]] = {}

    # -- setup

    def start_grid(self) -> None:
        grid = self.grid
        driver = [sys.executable, SCRIPT, "node"]
        grid.new_session()
        grid.start_rendezvous()
        grid.start_node("rv", program=driver, rules=RV_RULES)
        grid.start_node("a1", program=driver)
        grid.start_node("b1")
        grid.start_node("c1")
        grid.wait_joined(["rv", "a1", "b1", "c1"])
        grid.start_node("a2", program=driver)
        grid.wait_joined(["a2"])
        names = ["rv", "a1", "a2", "b1", "c1"]
        grid.wait_directory(names, names)
        # the public node's dial-back verdict (inbound) decides whether a meta link to it is tried
        call(grid.control("a1"), "wait", {"present": names, "settled": True, "timeout": JOIN_TIMEOUT_S},
             timeout=JOIN_TIMEOUT_S + 5)

    def make_tls_files(self) -> None:
        """Certificates for the plain TLS baseline: signed by the session CA, like node certificates."""
        import uuid

        from gridsock.session import Session, new_node_key

        session = Session.load(self.grid.session)
        authority = session.certificate_authority()
        directory = self.workdir / "baseline-tls"
        directory.mkdir(mode=0o700)
        ca = directory / "ca.pem"
        ca.write_bytes(session.ca_cert_pem)
        for role in ("server", "client"):
            key_pem, csr_pem = new_node_key()
            cert_pem = authority.sign_node(csr_pem, str(uuid.uuid4()))
            files = {"ca": str(ca), "cert": str(directory / f"{role}-cert.pem"), "key": str(directory / f"{role}-key.pem")}
            Path(files["cert"]).write_bytes(cert_pem)
            Path(files["key"]).write_bytes(key_pem)
            os.chmod(files["key"], 0o600)
            self.tls_files[role] = files

    def start_plain_server(self, host: str) -> Tuple[subprocess.Popen, int, int]:
        from gridsock.testing.procs import wait_for_line

        name = f"plain-{host}"
        proc = self.grid.spawn(host, name, [sys.executable, SCRIPT, "plain-server", json.dumps(self.tls_files["server"])])
        line = wait_for_line(proc, "plain listening", timeout=SERVER_READY_S)
        tcp_port, tls_port = (int(word) for word in line.split()[2:4])
        return proc, tcp_port, tls_port

    # -- running things

    def bench_op(self, name: str, op: str, args: dict, bound_s: float) -> dict:
        path = os.path.join(self.grid.run_dir, f"{name}-bench.sock")
        return call(path, op, args, timeout=bound_s + CONTROL_SLACK_S)

    def plain_client(self, host: str, spec: dict, bound_s: float) -> dict:
        argv = [sys.executable, SCRIPT, "plain-client", json.dumps({**self.tls_files["client"], **spec})]
        done = self.lab.run(host, argv, capture_output=True, text=True, timeout=bound_s + CONTROL_SLACK_S)
        if done.returncode != 0:
            raise BenchError(f"plain client in {host} failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
        return json.loads(done.stdout.strip().splitlines()[-1])

    # -- 1. establishment

    def bench_connect(self, src: str, dst: str, plain: Tuple[int, int]) -> dict:
        plan = self.plan
        addr = self.lab.addr(dst)
        samples: Dict[str, Dict[str, list]] = {}
        stacks: Dict[str, set] = {}

        def plain_case(tls: bool, n: int) -> dict:
            spec = {"op": "connect", "addr": addr, "port": plain[0], "tls_port": plain[1], "tls": tls, "n": n}
            return self.plain_client(src, spec, CONNECT_TIMEOUT_S * n)

        def grid_case(stack: str, mode: str, n: int) -> dict:
            args = {"dst": dst, "stack": stack, "n": n, "mode": mode}
            per_sample = CONNECT_TIMEOUT_S + (2 * JOIN_TIMEOUT_S if mode == "fresh" else COLD_WAIT_S)
            return self.bench_op(src, "connects", args, per_sample * (n + 1))

        cases: List[Tuple[str, Callable[[int], dict], int]] = [
            ("plain TCP", lambda n: plain_case(False, n), plan.connects),
            ("plain TLS", lambda n: plain_case(True, n), plan.connects),
        ]
        for mode in MODES:
            for stack in CONNECT_STACKS:
                total = plan.fresh if mode == "fresh" else plan.connects
                cases.append((f"{stack} {mode}", lambda n, s=stack, m=mode: grid_case(s, m, n), total))
        for key, _, _ in cases:
            samples[key] = {"open": [], "ready": []}
            stacks[key] = set()
        for round_no in range(plan.connect_rounds):
            for key, run, total in shuffled(cases, round_no):
                n = total // plan.connect_rounds + (1 if round_no < total % plan.connect_rounds else 0)
                if n == 0:
                    continue
                res = run(n)
                samples[key]["open"] += res["open"]
                samples[key]["ready"] += res["ready"]
                stacks[key].update(res.get("stacks", ()))
        for key, built in stacks.items():
            stack = key.split()[0]
            if built and built != {stack}:
                raise BenchError(f"{key}: asked for {stack}, got {sorted(built)}")
        pings = self.bench_op(src, "pings", {"dst": dst, "n": plan.pings}, CONNECT_TIMEOUT_S * 2 * plan.pings)
        anatomy = {}
        for i, (stack, mode) in enumerate(ANATOMY_CASES):
            args = {"dst": dst, "stack": stack, "mode": mode, "n": plan.connects, "alone": i == 0}
            anatomy[f"{stack} {mode}"] = self.bench_op(src, "anatomy", args,
                                                       (CONNECT_TIMEOUT_S + COLD_WAIT_S) * 2 * (plan.connects + 1))
        return {"samples": samples, "pings": pings, "anatomy": anatomy}

    # -- 2. throughput

    def iperf(self, src: str, dst: str, direction: str) -> dict:
        from gridsock.testing.procs import stop_process, wait_for_line

        nbytes = self.plan.transfer_bytes
        server = self.grid.spawn(dst, f"iperf3-{dst}", ["iperf3", "-s", "-1", "-p", str(IPERF_PORT), "--forceflush"])
        try:
            wait_for_line(server, lambda line: "Server listening" in line, timeout=SERVER_READY_S)
            argv = ["iperf3", "-c", self.lab.addr(dst), "-p", str(IPERF_PORT), "-n", str(nbytes),
                    "-l", str(CHUNK_BYTES), "-J"]  # writes as large as everyone else's
            if direction == "down":
                argv.append("-R")
            done = self.lab.run(src, argv, capture_output=True, text=True, timeout=TRANSFER_TIMEOUT_S)
            if done.returncode != 0:
                raise BenchError(f"iperf3 client failed: {done.stdout[-1000:]} {done.stderr[-1000:]}")
            report = json.loads(done.stdout)
            try:
                server.wait(timeout=SERVER_READY_S)
            except subprocess.TimeoutExpired:
                pass
        finally:
            stop_process(server)
        end = report["end"]
        bps = end["sum_received"]["bits_per_second"]
        cpu = end.get("cpu_utilization_percent", {})
        local, remote = cpu.get("host_total"), cpu.get("remote_total")
        return {"mb_per_s": bps / 8 / 1e6, "cpu": {src: local, dst: remote}}

    def bench_throughput(self, src: str, dst: str, plain: Tuple[int, int]) -> dict:
        plan = self.plan
        nbytes = plan.transfer_bytes
        addr = self.lab.addr(dst)
        results: Dict[Tuple[str, str], List[dict]] = {}

        def plain_case(tls: bool, direction: str) -> dict:
            spec = {"op": "stream", "addr": addr, "port": plain[0], "tls_port": plain[1], "tls": tls,
                    "bytes": nbytes, "kind": "random", "direction": direction}
            res = self.plain_client(src, spec, TRANSFER_TIMEOUT_S)
            return {"mb_per_s": nbytes / res["seconds"] / 1e6,
                    "cpu": {src: 100 * res["cpu_s"] / res["seconds"], dst: 100 * res["server_cpu_s"] / res["seconds"]}}

        def grid_case(stack: str, kind: str, bridged: bool, direction: str) -> dict:
            before = proc_cpu_s(self.grid.pid("rendezvous"))
            res = self.bench_op(src, "stream", {"dst": dst, "stack": stack, "bytes": nbytes, "kind": kind,
                                                "direction": direction, "bridged": bridged}, TRANSFER_TIMEOUT_S)
            after = proc_cpu_s(self.grid.pid("rendezvous"))
            if before is None or after is None:
                raise BenchError(f"the rendez-vous node is gone; logs:\n{self.grid.logs_tail()}")
            if res["stack"] != stack:
                raise BenchError(f"asked for {stack}, got {res['stack']}")
            # the rendez-vous node's share is over the whole control call, but it idles outside the transfer
            return {"mb_per_s": nbytes / res["seconds"] / 1e6,
                    "cpu": {src: 100 * res["cpu_s"] / res["seconds"], dst: 100 * res["server_cpu_s"] / res["seconds"],
                            "rendezvous": 100 * (after - before) / res["seconds"]}}

        cases: List[Tuple[str, str, Callable[[str], dict]]] = [
            ("plain TCP", "random", lambda d: plain_case(False, d)),
            ("plain TLS", "random", lambda d: plain_case(True, d)),
            ("iperf3", "random", lambda d: self.iperf(src, dst, d)),
        ]
        cases += [(f"{stack}{BRIDGED_TAG if bridged else ''}", kind, lambda d, s=stack, k=kind, b=bridged: grid_case(s, k, b, d))
                  for stack, kind, bridged in STREAM_CASES]
        for round_no in range(plan.transfer_rounds):
            for key, kind, run in shuffled(cases, round_no):
                for direction in DIRECTIONS:
                    results.setdefault((f"{key} {kind}", direction), []).append(run(direction))
        order = [f"{key} {kind}" for key, kind, _ in cases]
        return {"runs": {f"{k[0]}|{k[1]}": v for k, v in results.items()}, "order": order}

    def bench_relay(self, src: str, dst: str, plain: Tuple[int, int]) -> dict:
        """``--only relay``: the relay stacks and the plain baselines, each way, in rounds."""
        plan = self.plan
        nbytes = plan.transfer_bytes
        addr = self.lab.addr(dst)
        results: Dict[str, List[dict]] = {}

        def plain_case(tls: bool, direction: str) -> dict:
            spec = {"op": "stream", "addr": addr, "port": plain[0], "tls_port": plain[1], "tls": tls,
                    "bytes": nbytes, "kind": "random", "direction": direction}
            res = self.plain_client(src, spec, TRANSFER_TIMEOUT_S)
            return {"mb_per_s": nbytes / res["seconds"] / 1e6,
                    "cpu": {src: 100 * res["cpu_s"] / res["seconds"], dst: 100 * res["server_cpu_s"] / res["seconds"]}}

        def grid_case(stack: str, direction: str) -> dict:
            before = proc_cpu_s(self.grid.pid("rendezvous"))
            res = self.bench_op(src, "stream", {"dst": dst, "stack": stack, "bytes": nbytes, "kind": "random",
                                                "direction": direction, "bridged": False}, TRANSFER_TIMEOUT_S)
            after = proc_cpu_s(self.grid.pid("rendezvous"))
            if before is None or after is None:
                raise BenchError(f"the rendez-vous node is gone; logs:\n{self.grid.logs_tail()}")
            if res["stack"] != stack:
                raise BenchError(f"asked for {stack}, got {res['stack']}")
            return {"mb_per_s": nbytes / res["seconds"] / 1e6,
                    "cpu": {src: 100 * res["cpu_s"] / res["seconds"], dst: 100 * res["server_cpu_s"] / res["seconds"],
                            "rendezvous": 100 * (after - before) / res["seconds"]}}

        cases: List[Tuple[str, Callable[[str], dict]]] = [
            ("plain TCP", lambda d: plain_case(False, d)),
            ("plain TLS", lambda d: plain_case(True, d)),
        ]
        cases += [(stack, lambda d, s=stack: grid_case(s, d)) for stack in RELAY_STACKS]
        for round_no in range(plan.transfer_rounds):
            for key, run in shuffled(cases, round_no):
                for direction in DIRECTIONS:
                    results.setdefault(f"{key}|{direction}", []).append(run(direction))
        return {"runs": results, "order": [key for key, _ in cases]}

    def netem(self) -> str:
        """Whether the kernel can delay packets (tc netem), tried in this lab's own namespace."""
        done = self.lab.run("rv", ["tc", "qdisc", "add", "dev", "eth0", "root", "netem", "delay", "1ms"],
                            capture_output=True, text=True)
        if done.returncode == 0:
            self.lab.run("rv", ["tc", "qdisc", "del", "dev", "eth0", "root"], capture_output=True)
            return "available"
        return "not available (" + (done.stderr.strip().splitlines() or ["?"])[0] + ")"


# --- rendering -------------------------------------------------------------------------------------


def render_connect(path: Tuple[str, str, str], res: dict, plan: Plan) -> str:
    src, dst, where = path
    s = res["samples"]
    base_open = statistics.median(s["plain TCP"]["open"])
    base_ready = statistics.median(s["plain TCP"]["ready"])
    tls_open = statistics.median(s["plain TLS"]["open"])
    rows = []

    def row(label: str, key: str, bold: bool = False) -> None:
        opens, readies = s[key]["open"], s[key]["ready"]
        med = statistics.median(opens)
        mark = "**" if bold else ""
        rows.append([label, str(len(opens)), f"{mark}{ms(med)}{mark}", ms(percentile(opens, 0.9)),
                     f"{mark}{med / base_open:.1f}{mark}", f"{med / tls_open:.2f}",
                     ms(statistics.median(readies)), f"{statistics.median(readies) / base_ready:.1f}"])

    row("plain TCP `connect()`", "plain TCP")
    row("plain mutual TLS: `connect()` + handshake", "plain TLS")
    route_hops = len(res["pings"]["route"]) - 1
    for mode in MODES:
        for stack in CONNECT_STACKS:
            hops = ""
            if stack == "relay":  # a fresh node is a member of a1: one hop more
                n_hops = route_hops + (1 if mode == "fresh" else 0)
                hops = f" ({n_hops} hop{'s' if n_hops > 1 else ''})"
            row(f"gridsock `{stack}`{hops}, {MODE_LABELS[mode]}", f"{stack} {mode}", bold=mode == "steady")
    pings = res["pings"]
    meta, boot = pings["meta"], pings["bootstrap"]
    lines = [
        f"**{src} -> {dst}**: {where}. Times in ms. *open*: until `open_stream` returns (plain: until "
        "`connect()` returns, or the TLS handshake is done); *ready*: until a 1-byte request has come back "
        "over the new connection. Ratios are of medians.",
        "",
        table(["case", "n", "open median", "open p90", "÷ plain TCP", "÷ plain TLS", "ready median",
               "ready ÷ plain TCP ready"], rows),
        "",
        f"Round trips on the same path ({len(meta)} each): meta channel (the warm meta link, a `tls/tcp` "
        f"link between the two nodes) median {ms(statistics.median(meta))} ms, p90 {ms(percentile(meta, 0.9))}; "
        f"bootstrap channel (`ping`, route {' -> '.join(pings['route'])}) median "
        f"{ms(statistics.median(boot))} ms, p90 {ms(percentile(boot, 0.9))}.",
        "",
        render_anatomy(res["anatomy"]),
    ]
    return "\n".join(lines)


def render_anatomy(anatomy: dict) -> str:
    rows = []
    alone = {}
    for key, res in anatomy.items():
        samples = res["samples"]
        stack, mode = key.split()

        def step(name: str) -> str:
            values = [x[name] for x in samples if name in x]
            return ms(statistics.median(values)) if values else "–"

        rest = [x["open"] - max(x.get("dial", 0.0), x["request"]) - x["build"] for x in samples]
        rows.append([f"`{stack}`, {MODE_LABELS[mode]}", str(len(samples)), ms(statistics.median(x["open"] for x in samples)),
                     step("dial"), step("request"), step("build"), ms(statistics.median(rest))])
        if res["link_open"]:
            alone = res
    lines = [
        "Where a connect's time goes (ms, medians; the steps of `Assembler.open_stream` timed in a1's "
        "process): *dial* is the direct TCP connect and the preamble, in a greenlet of its own, *in "
        "parallel* with *request*, the assembly request and its answer over the meta channel (a cold "
        "meta link is opened inside it); *build* is the filters (the TLS handshake); *rest*: open − "
        "max(dial, request) − build, per sample.",
        "",
        table(["case", "n", "open", "dial", "request", "build", "rest"], rows),
    ]
    if alone:
        lines += ["", f"Opening a meta link alone (TCP connect, mutual TLS handshake, Hello/Welcome): median "
                      f"{ms(statistics.median(alone['link_open']))} ms, p90 {ms(percentile(alone['link_open'], 0.9))}; "
                      f"of which making the TLS client context, which every meta-link dial does anew: median "
                      f"{ms(statistics.median(alone['client_context']))} ms."]
    return "\n".join(lines)


def _median_run(runs: List[dict]) -> dict:
    ordered = sorted(runs, key=lambda r: r["mb_per_s"])
    return ordered[len(ordered) // 2]


def render_throughput(path: Tuple[str, str, str], res: dict, plan: Plan) -> str:
    src, dst, where = path
    runs = res["runs"]
    base = {d: statistics.median(r["mb_per_s"] for r in runs[f"plain TCP random|{d}"]) for d in DIRECTIONS}
    rows = []
    labels = {"plain TCP": "plain TCP socket (stdlib)", "plain TLS": "plain mutual-TLS socket (stdlib)", "iperf3": "iperf3"}
    for key in res["order"]:
        name, kind = key.rsplit(" ", 1)
        label = labels.get(name, f"gridsock `{name.replace(BRIDGED_TAG, '')}`")
        if name.endswith(BRIDGED_TAG):
            label += " via `connect()` (bridged socket)"
        cells = [label, kind]
        cpu_cells = []
        for d in DIRECTIONS:
            rs = runs[f"{key}|{d}"]
            speeds = [r["mb_per_s"] for r in rs]
            med = statistics.median(speeds)
            spread = f" ({min(speeds):.0f}–{max(speeds):.0f})" if len(speeds) > 1 else ""
            cells += [f"{med:.0f}{spread}", f"{med / base[d]:.2f}"]
            cpu = _median_run(rs)["cpu"]
            cpu_cells.append(" / ".join("–" if cpu.get(n) is None else f"{cpu[n]:.0f}" for n in (src, dst, "rendezvous")
                                        if n in cpu))
        rows.append(cells + cpu_cells)
    lines = [
        f"**{src} -> {dst}**: {where}. MB/s = 10^6 bytes/s of payload, median of {plan.transfer_rounds} "
        f"(lowest–highest); *up*: {src} sends, *down*: {dst} sends. CPU: CPU time of each process "
        f"over the transfer, in % of its duration (100 = one core busy), {src} / {dst} (/ the rendez-vous node "
        "for gridsock), in the median run (iperf3: its own figures).",
        "",
        table(["case", "data", "up MB/s", "÷ plain", "down MB/s", "÷ plain", "CPU % up", "CPU % down"], rows),
    ]
    return "\n".join(lines)


def machine() -> dict:
    cpu = cpu_model()
    here = Path(__file__).resolve().parent

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=here, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    try:
        iperf = subprocess.run(["iperf3", "--version"], capture_output=True, text=True, timeout=10).stdout.split("\n")[0]
    except (OSError, subprocess.SubprocessError):
        iperf = "iperf3 missing"
    return {"nproc": os.cpu_count(), "cpu": cpu, "kernel": platform.release(), "python": platform.python_version(),
            "impl": platform.python_implementation(), "gevent": gevent.__version__, "openssl": ssl.OPENSSL_VERSION,
            "commit": git("rev-parse", "--short", "HEAD") or "unknown",
            "dirty": bool(git("status", "--porcelain", "--untracked-files=no")), "iperf": iperf.strip()}


def loadavg() -> str:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "?"


def lab_line(results: dict) -> str:
    """The report's "lab" line: which WAN delay, if any, the run used."""
    delay = results.get("wan_delay_ms", 0.0)  # older raw files: none
    if not delay:
        return ("- lab: network namespaces, veth pairs and Linux bridges on one machine; **no WAN delay**: every "
                f"link is a veth, round trips are tens of µs (kernel netem: {results['netem']}; `--wan-delay-ms` "
                "was 0). So these figures show gridsock's own costs, which a real WAN's milliseconds would "
                "mostly hide.")
    return ("- lab: network namespaces, veth pairs and Linux bridges on one machine; **WAN delay "
            f"{delay:g} ms one way** (`--wan-delay-ms {delay:g}`: `Lab.set_wan(delay_ms={delay:g})`, a delayer "
            "on each public host's ingress): every crossing of the internet takes it, so a1 -> rv (through "
            f"gwa's NAT) gains {2 * delay:g} ms per round trip; a1 -> a2 stays inside cluster A and crosses no "
            "delay (its figures are the no-delay case, apart from what reaches the rendez-vous node).")


def render(results: dict, info: dict, argv: List[str], plan: Plan, quick: bool) -> str:
    head = [
        SECTION_TITLE,
        "",
        "Figures of `bench/bench_data.py` (its docstring says what and how); a run replaces this section only.",
        "",
        f"- command: `{' '.join(shlex.quote(a) for a in argv)}`" + (" (quick: fewer samples, smaller transfers)" if quick else ""),
        f"- date: {results['started']}, wall time {results['wall_s']:.0f} s",
        f"- machine: {info['nproc']} CPUs ({info['cpu']}), Linux {info['kernel']}; shared with other work: "
        f"load average {results['load_before']} before, {results['load_after']} after",
        f"- software: gridsock at `{info['commit']}`{' with uncommitted changes' if info['dirty'] else ''}, "
        f"{info['impl']} {info['python']}, gevent {info['gevent']}, {info['openssl']}, {info['iperf']}",
        lab_line(results),
        "- processes: rendez-vous node on rv; nodes `a1`, `a2` and `rv` run `bench_data.py node` "
        "(`gridsock node` plus a bench service and timing operations in the node process); `b1` and "
        "`c1` (through fec's sshd) run `gridsock node`. TLS session (mutual TLS on every link).",
        "",
        "### Establishment delay",
        "",
        "*steady*: the meta link between the pair is up (one warm-up connect first). *cold meta link*: "
        "a1 closes its meta link to the peer, and waits until the peer has closed its end, before each "
        "connect. *fresh node*: for each sample a new node joins cluster A in a1's namespace (leader "
        "a1) and connects once: a pair that has never met (its `relay` goes through a1, one hop more). "
        "Plain baselines: stdlib, blocking, a fresh process per batch, in the same namespaces; plain "
        "TLS is mutual, with certificates from the session CA, as gridsock's `tls` filter.",
        "",
    ]
    parts = []
    for path in PATHS:
        parts.append(render_connect(path, results["connect"][path[1]], plan))
    if not results["throughput"]:  # --only establish
        parts.append(results.get("reading", ""))
        return "\n".join(head) + "\n" + "\n\n".join(p for p in parts if p) + "\n"
    parts.append("### Throughput")
    parts.append(
        f"{plan.transfer_bytes >> 20} MiB one way per run, through `open_stream` (the framework's stream, "
        "no bridge socket) on the gridsock side, 256 KiB per send and per receive; plain sockets are the "
        "stdlib's, blocking (kernel timeouts only), one process each side, same sizes; iperf3 writes "
        "256 KiB too (`-l`). *random*: incompressible; *json*: JSON-like records (`sample_data(n, \"json\")`, "
        f"which LZ4 compresses {results['lz4_ratio_json']:.1f}:1).")
    for path in PATHS:
        parts.append(render_throughput(path, results["throughput"][path[1]], plan))
    parts.append(results.get("reading", ""))
    return "\n".join(head) + "\n" + "\n\n".join(p for p in parts if p) + "\n"


def reading(results: dict) -> str:
    """The reading: what limits each figure, with this run's numbers (medians)."""
    c, t = results["connect"], results["throughput"]

    def med(dst: str, key: str, field: str = "open") -> float:
        return statistics.median(c[dst]["samples"][key][field])

    def step(dst: str, key: str, name: str) -> float:
        samples = c[dst]["anatomy"][key]["samples"]
        if name == "rest":
            return statistics.median(x["open"] - max(x.get("dial", 0.0), x["request"]) - x["build"] for x in samples)
        return statistics.median(x[name] for x in samples if name in x)

    def alone(dst: str, name: str) -> float:
        return statistics.median(next(a[name] for a in c[dst]["anatomy"].values() if a["link_open"]))

    def speed(dst: str, key: str, d: str = "up") -> float:
        return statistics.median(r["mb_per_s"] for r in t[dst]["runs"][f"{key}|{d}"])

    def cpu(dst: str, key: str, who: str, d: str = "up") -> float:
        return _median_run(t[dst]["runs"][f"{key}|{d}"])["cpu"][who]

    def both(fn: Callable[[str], float], fmt: Callable[[float], str] = ms) -> str:
        return f"{fmt(fn('a2'))} / {fmt(fn('rv'))}"

    def ratio(x: float) -> str:
        return f"{x:.1f}×" if x >= 1.95 else f"{x:.2f}×"

    def mbs(x: float) -> str:
        return f"{x:.0f}"

    overhead = {d: med(d, "tcp steady") - med(d, "plain TCP") for d in ("a2", "rv")}
    tls_overhead = {d: med(d, "tls/tcp steady") - med(d, "plain TLS") for d in ("a2", "rv")}
    worst, worst_tls = max(overhead.values()), max(tls_overhead.values())
    plain_tls = max(med(d, "plain TLS") for d in ("a2", "rv"))

    def wan(rtt_s: float) -> str:  # the model: see the text
        return (f"{ratio((rtt_s + worst) / rtt_s)} at {ms(rtt_s)} ms (`tls/tcp` "
                f"{ratio((2 * rtt_s + plain_tls + worst_tls) / (2 * rtt_s + plain_tls))})")

    lines = [
        "### Reading",
        "",
        "Pairs of figures are *a1 -> a2 / a1 -> rv*, medians.",
        "",
        "**Establishment.** "
        f"A steady `tcp` connect takes {both(lambda d: med(d, 'tcp steady'))} ms: "
        f"{both(lambda d: med(d, 'tcp steady') / med(d, 'plain TCP'), ratio)} a plain `connect()` "
        f"({both(lambda d: med(d, 'plain TCP'))} ms), far from the paper's 1.6×. The ratio says little here: a "
        "`connect()` between two namespaces of one machine is a kernel round trip of tens of µs, while "
        "`open_stream` waits for the assembly request to be answered by the peer's node process: the "
        f"*request* step takes {both(lambda d: step(d, 'tcp steady', 'request'))} ms, about one meta-channel "
        f"round trip ({both(lambda d: statistics.median(c[d]['pings']['meta']))} ms), which is Python work at "
        "both ends (codec, routing, greenlet hand-offs, the handler: token, rules, stack parsing), not "
        f"network. The TCP dial ({both(lambda d: step(d, 'tcp steady', 'dial'))} ms, a thread-pool "
        "`getaddrinfo` included) runs in parallel and is hidden; the rest of `open_stream` costs "
        f"{both(lambda d: step(d, 'tcp steady', 'rest'))} ms. So the overhead over a plain connect is a "
        f"fixed {both(lambda d: overhead[d])} ms of processing in the two node processes, not extra round trips. Over a network with round-trip "
        "time R both the dial and the request take R plus their CPU time, so the ratio becomes about "
        f"(R + {ms(worst)} ms) / R: {wan(0.001)}, {wan(0.010)} — a model from these figures; "
        "`--wan-delay-ms` measures it. That is the issue's target (a direct connection "
        "costs little more than one TCP handshake) on any real WAN; on a LAN the fixed CPU cost shows.",
        "",
        f"`relay` opens as fast ({both(lambda d: med(d, 'relay steady'))} ms): the request alone, no dial; "
        "its first byte comes back later (*ready*), through the bootstrap links. `lz4/tcp` costs what `tcp` "
        f"costs ({both(lambda d: med(d, 'lz4/tcp steady'))} ms; the filter does no I/O to start). "
        f"`tls/tcp` takes {both(lambda d: med(d, 'tls/tcp steady'))} ms, "
        f"{both(lambda d: med(d, 'tls/tcp steady') / med(d, 'plain TLS'), ratio)} a plain mutual-TLS "
        f"connect and handshake ({both(lambda d: med(d, 'plain TLS'))} ms): on top of the request comes the "
        f"*build* step, the filter's TLS handshake over memory BIOs ({both(lambda d: step(d, 'tls/tcp steady', 'build'))} ms, "
        f"against {both(lambda d: med(d, 'plain TLS') - med(d, 'plain TCP'))} ms for the stdlib's handshake "
        "after its connect).",
        "",
        "**First contact is the slow case.** With the meta link down, `tcp` takes "
        f"{both(lambda d: med(d, 'tcp cold'))} ms (cold meta link) and {both(lambda d: med(d, 'tcp fresh'))} ms "
        f"(fresh node), {both(lambda d: med(d, 'tcp cold') / med(d, 'tcp steady'), ratio)} a steady connect "
        "when cold: the request waits for a meta link to be opened — TCP connect, "
        "a full mutual TLS handshake (both ends sign and verify: the largest part), Hello/Welcome — "
        f"{both(lambda d: alone(d, 'link_open'))} ms on its own. Of that, "
        f"{both(lambda d: alone(d, 'client_context'))} ms is building a TLS client context (CA, certificate and "
        "key loaded from files), which `MetaChannel._dial` does for every link instead of caching it as the "
        "`tls` filter does; the link's dial also goes through the thread-pool resolver for a numeric "
        "address. A `tls/tcp` first contact makes two full mutual-TLS handshakes between the same two nodes "
        f"({both(lambda d: med(d, 'tls/tcp cold'))} ms cold). On a WAN the meta link adds three round trips "
        "(TCP, TLS 1.3, Hello/Welcome) before the request's; TLS session resumption between nodes that "
        "have met, and a cached client context, would cut the CPU part.",
        "",
        "**Throughput.** "
        f"`tcp` moves {both(lambda d: speed(d, 'tcp random'), mbs)} MB/s (a1 sends), "
        f"{both(lambda d: speed(d, 'tcp random') / speed(d, 'plain TCP random'), ratio)} plain sockets "
        f"({both(lambda d: speed(d, 'plain TCP random'), mbs)}): the connection is the kernel socket itself, "
        "and what limits both is the kernel copying through the veth pairs (system time, charged mostly to "
        f"the sender). iperf3 (C, one stream) reports {both(lambda d: speed(d, 'iperf3 random'), mbs)}: the "
        "user-space loop is not the limit (its figure for a 64 MiB run also counts its own start; "
        "a 2 s run by hand gave about the same). At 25–50 ms per transfer the spread is the shared "
        "machine's. "
        f"`tls/tcp` ({both(lambda d: speed(d, 'tls/tcp random'), mbs)}) runs at "
        f"{both(lambda d: speed(d, 'tls/tcp random') / speed(d, 'plain TLS random'), ratio)} the stdlib's TLS "
        f"socket ({both(lambda d: speed(d, 'plain TLS random'), mbs)}): both are CPU-bound on Python work per "
        "16 KiB record (AES-GCM itself runs at GB/s), the stdlib's `SSLSocket.recv` returning one record per "
        "call, the filter decrypting whatever its memory BIO holds. Through the socket `Node.connect` hands "
        f"to applications it drops to {both(lambda d: speed(d, 'tls/tcp+bridge random'), mbs)}: one more copy "
        "through a socketpair and two pump greenlets in the node's process. "
        f"`lz4/tcp` reaches {both(lambda d: speed(d, 'lz4/tcp random'), mbs)} on random data, both ends busy "
        f"(trying to compress, checksumming, decoding), and {both(lambda d: speed(d, 'lz4/tcp json'), mbs)} of "
        "payload on JSON-like data, where the compressing sender does the most work "
        f"({both(lambda d: cpu(d, 'lz4/tcp json', 'a1'), mbs)} % of a core, against "
        f"{both(lambda d: cpu(d, 'lz4/tcp json', d), mbs)} % for the receiver; LZ4 alone compresses this data at "
        f"{results['lz4_json_mb_s']:.0f} MB/s in a hot loop, the filter also checksums and flushes every send): "
        f"{results['lz4_ratio_json']:.1f}× less on the wire, which pays off on links slower than "
        f"about {speed('a2', 'lz4/tcp json') / results['lz4_ratio_json']:.0f} MB/s. "
        f"`relay` carries {both(lambda d: speed(d, 'relay random'), mbs)} MB/s: every 64 KiB is a routed "
        "message, encoded, TLS-encrypted on each bootstrap link and decoded again at each hop; one member "
        "link to a2, two links through the rendez-vous node to rv, where the rendez-vous process is the "
        f"busiest ({cpu('rv', 'relay random', 'rendezvous'):.0f} % of a core). On the one-hop path neither end "
        "saturates a core and a 4 MiB window (tried by hand) was no faster, so the 1 MiB flow-control "
        "window is not the limit; the per-message work, split between processes that wait on each other, is "
        "the likelier one. "
        f"`tls/relay` adds end-to-end TLS: {both(lambda d: speed(d, 'tls/relay random'), mbs)} MB/s.",
    ]
    return "\n".join(lines)


def lz4_speed(data: bytes) -> float:
    """MB/s of LZ4 (fast mode, one frame) over ``data`` in a hot loop: the best of three."""
    best = math.inf
    for _ in range(3):
        started = time.perf_counter()
        lz4.frame.compress(data)
        best = min(best, time.perf_counter() - started)
    return len(data) / best / 1e6


def tree_commit(tree: str) -> str:
    """The short commit of the checkout at ``tree`` (``--before``), or the path if git cannot say."""
    done = subprocess.run(["git", "-C", tree, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 and done.stdout.strip() else tree


def relay_profile(results: dict) -> str:
    delay = results.get("wan_delay_ms", 0.0)
    return f"WAN delay {delay:g} ms one way" if delay else "no shaping"


def render_relay(results: dict, info: dict, argv: List[str], plan: Plan, quick: bool) -> str:
    """The section of ``--only relay``: each code version's relay next to the plain sockets."""
    src, dst = "a1", "rv"
    versions = results["relay"]
    lines = [
        f"{RELAY_SECTION_TITLE}: {relay_profile(results)}",
        "",
        "Figures of `bench/bench_data.py --only relay` (its docstring says what and how); a run replaces "
        "this section only.",
        "",
        f"- command: `{' '.join(shlex.quote(a) for a in argv)}`" + (" (quick: fewer samples, smaller transfers)" if quick else ""),
        f"- date: {results['started']}, wall time {results['wall_s']:.0f} s",
        f"- machine: {info['nproc']} CPUs ({info['cpu']}), Linux {info['kernel']}; shared with other work: "
        f"load average {results['load_before']} before, {results['load_after']} after",
        f"- software: gridsock at `{info['commit']}`{' with uncommitted changes' if info['dirty'] else ''}, "
        f"{info['impl']} {info['python']}, gevent {info['gevent']}, {info['openssl']}",
        lab_line(results),
        f"- path: {src} -> {dst}, out of cluster A through gwa's NAT; the relay goes a1 -> rendez-vous node -> "
        "rv over two bootstrap links (mutual TLS each). Each code version ran on its own grid (rendez-vous "
        "node, rv, a1, b1, c1, a2), one after the other in this lab, the plain baselines again with each.",
        f"- {plan.transfer_bytes >> 20} MiB of random data one way per run, 256 KiB per send and per receive, "
        "through `open_stream` on the gridsock side; plain sockets are the stdlib's, blocking, one process "
        "each side (TLS: mutual, certificates of the session CA). MB/s = 10^6 bytes/s of payload, median "
        f"of {plan.transfer_rounds} (lowest–highest); *up*: {src} sends, *down*: {dst} sends. CPU: each "
        f"process's CPU time over the transfer in % of its duration, {src} / {dst} (/ the rendez-vous "
        "node), median run. Target (issue 11): `relay` at least 0.5× the plain TLS socket.",
        "",
    ]
    rows = []
    for version, res in versions.items():
        runs = res["runs"]
        med = {key: {d: statistics.median(r["mb_per_s"] for r in runs[f"{key}|{d}"]) for d in DIRECTIONS}
               for key in res["order"]}
        labels = {"plain TCP": "plain TCP socket (stdlib)", "plain TLS": "plain mutual-TLS socket (stdlib)"}
        for key in res["order"]:
            cells = [labels.get(key, f"gridsock `{key}`"), version]
            for d in DIRECTIONS:
                speeds = [r["mb_per_s"] for r in runs[f"{key}|{d}"]]
                spread = f" ({min(speeds):.0f}–{max(speeds):.0f})" if len(speeds) > 1 else ""
                cells += [f"{med[key][d]:.0f}{spread}", f"{med[key][d] / med['plain TLS'][d]:.2f}",
                          f"{med[key][d] / med['plain TCP'][d]:.2f}"]
            for d in DIRECTIONS:
                cpu = _median_run(runs[f"{key}|{d}"])["cpu"]
                cells.append(" / ".join(f"{cpu[n]:.0f}" for n in (src, dst, "rendezvous") if cpu.get(n) is not None))
            if key == "relay":
                ratio = min(med[key][d] / med["plain TLS"][d] for d in DIRECTIONS)
                cells.append(f"**{'met' if ratio >= 0.5 else 'not met'}** ({ratio:.2f}×)")
            else:
                cells.append("")
            rows.append(cells)
    lines.append(table(["case", "code", "up MB/s", "÷ TLS", "÷ TCP", "down MB/s", "÷ TLS", "÷ TCP", "CPU % up",
                        "CPU % down", "≥ 0.5× TLS (both ways)"], rows))
    return "\n".join(lines) + "\n"


def write_section(path: Path, text: str) -> None:
    """Replace this bench's section of ``path`` (or append it), keeping everything else."""
    replace_section(path, SECTION_TITLE, text)


# --- main ------------------------------------------------------------------------------------------


class Terminated(SystemExit):
    """SIGTERM: unwind through the ``finally`` that tears the lab down.

    A SystemExit, so that gevent's hub, should the signal arrive while it runs, passes it on to
    the main greenlet instead of printing it.
    """


def _terminated(*_) -> None:
    raise Terminated(128 + signal.SIGTERM)  # the exit status of a process killed by SIGTERM


def run_bench(argv: List[str]) -> int:
    from gridsock.testing.lab import Lab, missing_tools

    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="10 connects per case, 8 MiB transfers")
    parser.add_argument("--out", default="docs/benchmarks.md", help="Markdown file whose section to replace")
    parser.add_argument("--prefix", default=f"gsb{os.getpid() % 10000}-", help="lab prefix (default: %(default)s)")
    parser.add_argument("--logs", metavar="DIR", help="copy the processes' logs into DIR before cleaning up")
    parser.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # a smoke test of the bench itself
    parser.add_argument("--render-only", metavar="JSON", help="render the raw results a run saved; measure nothing")
    parser.add_argument("--wan-delay-ms", type=float, default=0.0, metavar="D",
                        help="one-way WAN delay of the lab's internet, Lab.set_wan(delay_ms=D) (default: 0, none)")
    parser.add_argument("--only", choices=("all", "establish", "relay"), default="all",
                        help="'establish': the establishment part only, no throughput; 'relay': the relay's "
                             "throughput a1 -> rv and its baselines only (default: %(default)s)")
    parser.add_argument("--before", metavar="DIR", help="with --only relay: measure the gridsock of DIR (another "
                        "checkout) too, first, on a grid of its own")
    parser.add_argument("--connects", type=int, metavar="N", help="connects per case (default: the plan's)")
    args = parser.parse_args(argv)
    if args.wan_delay_ms < 0:
        parser.error("--wan-delay-ms must be >= 0")
    plan = TINY if args.tiny else QUICK if args.quick else FULL
    if args.connects is not None:
        if args.connects < 1:
            parser.error("--connects must be >= 1")
        plan = dataclasses.replace(plan, connects=args.connects, fresh=args.connects)
    if args.before and args.only != "relay":
        parser.error("--before goes with --only relay")
    if args.render_only:
        saved = json.loads(Path(args.render_only).read_text())
        results, info = saved["results"], saved["info"]
        if "relay" in results:
            text = render_relay(results, info, saved["argv"], Plan(**saved["plan"]), saved["quick"])
            replace_section(Path(args.out), f"{RELAY_SECTION_TITLE}: {relay_profile(results)}", text)
            print(text)
            return 0
        results.setdefault("lz4_json_mb_s", lz4_speed(bytes(pattern("json"))))  # files of older versions
        results["reading"] = reading(results) if results["throughput"] else ""
        text = render(results, info, saved["argv"], Plan(**saved["plan"]), saved["quick"])
        write_section(Path(args.out), text)
        print(text)
        return 0
    if os.geteuid() != 0:
        parser.error("the grid lab needs root")
    missing = missing_tools() + ([("iperf3", "iperf3")] if shutil.which("iperf3") is None else [])
    if missing:
        parser.error("missing tools: " + ", ".join(f"{tool} (Debian {pkg})" for tool, pkg in missing))
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    info = machine()
    results: dict = {"started": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                     "load_before": loadavg(), "connect": {}, "throughput": {},
                     "lz4_ratio_json": PATTERN_BYTES / len(lz4.frame.compress(bytes(pattern("json")))),
                     "lz4_json_mb_s": lz4_speed(bytes(pattern("json"))),
                     "wan_delay_ms": args.wan_delay_ms, "only": args.only}
    wall = time.perf_counter()
    workdir = Path(tempfile.mkdtemp(prefix="gridsock-bench-data-"))
    lab = Lab(args.prefix)
    grid = LabGrid(lab, workdir)
    bench = Bench(lab, grid, plan, workdir)
    signal.signal(signal.SIGTERM, _terminated)
    wan_set = False
    try:
        progress(f"lab {args.prefix} up")
        lab.up()
        results["netem"] = bench.netem()
        if args.wan_delay_ms:
            progress(f"WAN: {args.wan_delay_ms:g} ms one way on each public host's ingress")
            wan_set = True  # set before the call: a half-made profile is removed too
            lab.set_wan(delay_ms=args.wan_delay_ms)
        if args.only == "relay":
            results["relay"] = {}
            versions = ([(f"before: `{tree_commit(args.before)}`", args.before)] if args.before else []) + \
                [(f"this tree: `{info['commit']}`{'+' if info['dirty'] else ''}", None)]
            for i, (version, tree) in enumerate(versions):
                if i:
                    grid.stop()
                    (workdir / f"grid{i}").mkdir()
                    grid = LabGrid(lab, workdir / f"grid{i}")
                    bench = Bench(lab, grid, plan, workdir)
                if tree:
                    grid.env["PYTHONPATH"] = os.path.abspath(tree)
                progress(f"{version}: grid: rendez-vous node, rv, a1, b1, c1 (ssh), a2")
                bench.start_grid()
                bench.tls_files = {}
                bench.workdir = grid.workdir
                bench.make_tls_files()
                server, tcp_port, tls_port = bench.start_plain_server("rv")
                progress(f"{version}: a1 -> rv: relay throughput")
                results["relay"][version] = bench.bench_relay("a1", "rv", (tcp_port, tls_port))
                server.terminate()
        if args.only != "relay":
            progress("grid: rendez-vous node, rv, a1, b1, c1 (ssh), a2")
            bench.start_grid()
            bench.make_tls_files()
        for src, dst, _ in (PATHS if args.only != "relay" else ()):
            server, tcp_port, tls_port = bench.start_plain_server(dst)
            progress(f"{src} -> {dst}: establishment")
            results["connect"][dst] = bench.bench_connect(src, dst, (tcp_port, tls_port))
            if args.only == "all":
                progress(f"{src} -> {dst}: throughput")
                results["throughput"][dst] = bench.bench_throughput(src, dst, (tcp_port, tls_port))
            server.terminate()
    except Exception:
        print(grid.logs_tail(), file=sys.stderr)
        raise
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the teardown short
        progress("tearing down")
        try:
            grid.stop()
            if wan_set:
                try:
                    lab.set_wan()  # no arguments: the WAN profile (delayers, rules, qdiscs) is removed
                except Exception as exc:  # down() removes what is left; the teardown goes on
                    progress(f"removing the WAN profile failed: {exc}")
            lab.down()
        finally:
            if args.logs:
                Path(args.logs).mkdir(parents=True, exist_ok=True)
                for log_file in workdir.glob("*.log"):
                    shutil.copy(log_file, args.logs)
            shutil.rmtree(workdir, ignore_errors=True)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
    results["load_after"] = loadavg()
    results["wall_s"] = time.perf_counter() - wall
    command = ["python3", "bench/bench_data.py", *argv]
    raw = Path(tempfile.gettempdir()) / f"bench_data-{os.getpid()}.json"
    raw.write_text(json.dumps({"results": results, "info": info, "argv": command, "plan": dataclasses.asdict(plan),
                               "quick": args.quick or args.tiny}, default=sorted))
    progress(f"raw results in {raw} (--render-only {raw} renders them again)")
    if args.only == "relay":
        title = f"{RELAY_SECTION_TITLE}: {relay_profile(results)}"
        text = render_relay(results, info, command, plan, args.quick or args.tiny)
        replace_section(Path(args.out), title, text)
        print(text)
        progress(f"wrote the section {title[3:]!r} of {args.out}")
        return 0
    results["reading"] = reading(results) if results["throughput"] else ""
    text = render(results, info, command, plan, args.quick or args.tiny)
    write_section(Path(args.out), text)
    print(text)
    progress(f"wrote the section {SECTION_TITLE[3:]!r} of {args.out}")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    mode = argv[0] if argv else ""
    if mode == "node":
        return run_node(argv[1:])
    if mode == "plain-server":
        return run_plain_server(json.loads(argv[1]))
    if mode == "plain-client":
        return run_plain_client(json.loads(argv[1]))
    return run_bench(argv)


if __name__ == "__main__":
    sys.exit(main())
