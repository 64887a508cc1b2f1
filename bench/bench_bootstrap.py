"""Benchmarks of the bootstrap channel, each next to a plain-socket baseline measured in the same run.

What it measures
----------------
1. Routed request round trip by path length, on one in-process grid over loopback in a TLS session:
   leader L1 with members m1 and m2, leader L2 with member m3. From m1: 1 hop (to L1), 2 hops (to m2
   through L1), 3 hops (to L2 through L1 and the rendez-vous node), 4 hops (to m3). 64-byte payload
   echoed by a topic handler. Baselines: a TCP and a TLS echo over one loopback connection with gevent
   sockets in this process (same event loop), the same with blocking stdlib sockets against an echo
   server in a child process, and one gridsock ``Link`` (the codec and link greenlets, no routing).
2. Routed throughput: one-way ``send`` of 64 KiB payloads m1 -> m3 (4 hops) with a bounded number
   of messages in flight; against a plain TLS stream over one link, and over four TLS links chained
   through in-process relays (the same number of encryptions as the routed path).
3. Scale of the rendez-vous node: a leader driven by hand with the wire protocol (enrolled the normal
   way, mutual TLS, ``Hello`` as a leader) registers N synthetic members in ``Register`` batches, while
   a second hand-driven leader watches the directory updates. Times to register and to settle (every
   dial-back verdict applied), memory per directory entry, the snapshot a new leader receives, and the
   leave of all N when the registering leader's link closes.
4. Join latency: ``Node.start()`` until joined, for a leader and for a member, against one TLS
   connect + handshake, and the pieces of a join (key generation, signing, TLS contexts).
5. Where the time goes: cProfile over the 4-hop round trip and stream, grouped by component.

How
---
Everything runs in this one process on one gevent hub, as the test grid does; baselines use the same
hub. The machine is shared, so every measurement is taken in rounds and the cases of a round run
interleaved (their order rotates each round): a load spike hits all cases alike. Reported: medians,
percentiles over all samples, and the spread of per-round medians. Loops are bounded by counts or
deadlines; every wait has a timeout.

    python3 bench/bench_bootstrap.py [--quick] [--out docs/benchmarks.md]

``--quick`` finishes in well under a minute (fewer rounds, N = 1000 only); the full run takes a few
minutes. The results go to ``--out`` as Markdown, and to stdout.
"""
from __future__ import annotations

import argparse
import cProfile
import dataclasses
import datetime
import gc
import itertools
import math
import os
import platform
import pstats
import re
import shlex
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
import uuid
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import gevent
import gevent.event
import gevent.lock

from gridsock import wire
from gridsock.bootstrap.directory import Directory
from gridsock.bootstrap.link import Link, read_message, send_message, tune_socket
from gridsock.bootstrap.rendezvous import RendezvousNode
from gridsock.bootstrap.transport import Address, dial, listen, tls_client, tls_server
from gridsock.node import Node
from gridsock.session import Identity, client_context, create_session, new_node_key, server_context

from _machine import cpu_model  # bench/ is sys.path[0] when run as python3 bench/bench_bootstrap.py

# --- constants ---------------------------------------------------------------------------------

RTT_PAYLOAD_BYTES = 64
STREAM_PAYLOAD_BYTES = 64 * 1024
# Messages of STREAM_PAYLOAD_BYTES in flight on the routed path: Node.send() has no back-pressure
# (it queues and returns), so the bench waits for the receiver; 32 x 64 KiB = 2 MiB in flight.
STREAM_WINDOW_MESSAGES = 32
RECV_BYTES = 256 * 1024
# Bounds that only stop a broken grid from hanging the bench.
JOIN_TIMEOUT_S = 20.0
REQUEST_TIMEOUT_S = 10.0
STALL_TIMEOUT_S = 20.0
SCALE_TIMEOUT_S = 180.0
# A hand-driven leader pings this often: the rendez-vous node drops a link silent for LINK_TIMEOUT_S.
KEEPALIVE_S = 1.0
SCALE_CLUSTER = "A"
# The stall meter asks to be woken this often; how late it wakes is how long the loop was held.
STALL_TICK_S = 0.005

# A hop count checks the route the grid really takes: m1 -> destination.
PATHS = (("L1", 1), ("m2", 2), ("L2", 3), ("m3", 4))


@dataclasses.dataclass(frozen=True)
class Plan:
    """How much of everything to do."""

    rtt_rounds: int
    rtt_batch: int
    rtt_warmup: int
    stream_rounds: int
    stream_round_s: float
    join_rounds: int
    scale_sizes: tuple
    snapshot_repeats: int
    profile_rtts: int
    profile_stream_s: float


FULL = Plan(rtt_rounds=10, rtt_batch=200, rtt_warmup=300, stream_rounds=5, stream_round_s=1.0, join_rounds=20,
            scale_sizes=(1000, 5000), snapshot_repeats=5, profile_rtts=1000, profile_stream_s=1.0)
QUICK = Plan(rtt_rounds=4, rtt_batch=100, rtt_warmup=100, stream_rounds=2, stream_round_s=0.4, join_rounds=6,
             scale_sizes=(1000,), snapshot_repeats=3, profile_rtts=300, profile_stream_s=0.3)


class BenchError(RuntimeError):
    """Something the bench waited for did not happen in time."""


# --- statistics ---------------------------------------------------------------------------------


def percentile(samples: Sequence[float], q: float) -> float:
    """Nearest-rank percentile, ``q`` in [0, 1]."""
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


@dataclasses.dataclass
class Series:
    """Samples of one case, kept per round so the spread across rounds can be reported."""

    rounds: List[List[float]] = dataclasses.field(default_factory=list)

    def add_round(self, samples: List[float]) -> None:
        self.rounds.append(samples)

    @property
    def all(self) -> List[float]:
        return [x for r in self.rounds for x in r]

    @property
    def median(self) -> float:
        return statistics.median(self.all)

    def p(self, q: float) -> float:
        return percentile(self.all, q)

    @property
    def round_medians(self) -> List[float]:
        return [statistics.median(r) for r in self.rounds if r]

    def spread(self) -> tuple:
        meds = self.round_medians
        return min(meds), max(meds)


def rotated(items: list, k: int) -> list:
    k %= len(items)
    return items[k:] + items[:k]


def timed(fn: Callable[[], object], count: int) -> List[float]:
    samples = []
    for _ in range(count):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return samples


def us(seconds: float) -> str:
    return f"{seconds * 1e6:.0f}"


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f}" if seconds < 0.1 else f"{seconds * 1e3:.0f}"


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def wait_until(condition: Callable[[], bool], wait_changed: Callable[[float], object], timeout_s: float,
               what: str) -> None:
    """Block until ``condition()``; ``wait_changed(t)`` blocks until something may have changed."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise BenchError(f"{what}: not done after {timeout_s:.0f} s")
        wait_changed(min(remaining, 1.0))


# --- sockets for the baselines -------------------------------------------------------------------


def make_identity(session) -> Identity:
    """A node identity signed directly by the session CA (baselines only; the grid enrolls)."""
    key_pem, csr_pem = new_node_key()
    return Identity(session.certificate_authority().sign_node(csr_pem, str(uuid.uuid4())), key_pem)


def open_pair(tls: Optional[tuple]):
    """A connected loopback pair of gevent sockets ``(client, server)``, TLS if ``tls`` = (cctx, sctx)."""
    listener = listen(Address(host="127.0.0.1", port=0))
    try:
        acceptor = gevent.spawn(listener.accept)
        client = dial(Address(host="127.0.0.1", port=listener.getsockname()[1]))
        server, _ = acceptor.get(timeout=JOIN_TIMEOUT_S)
    finally:
        listener.close()
    tune_socket(server)
    if tls is None:
        return client, server
    client_ctx, server_ctx = tls
    handshake = gevent.spawn(tls_server, server, server_ctx, timeout=JOIN_TIMEOUT_S)
    client = tls_client(client, client_ctx, timeout=JOIN_TIMEOUT_S)
    return client, handshake.get(timeout=JOIN_TIMEOUT_S)


def serve_echo(sock) -> None:
    try:
        while True:
            data = sock.recv(RECV_BYTES)
            if not data:
                return
            sock.sendall(data)
    except (OSError, ValueError):
        return
    finally:
        sock.close()


def echo_round_trip(sock, payload: bytes) -> Callable[[], None]:
    def once() -> None:
        sock.sendall(payload)
        got = 0
        while got < len(payload):
            chunk = sock.recv(RECV_BYTES)
            if not chunk:
                raise BenchError("echo server closed the connection")
            got += len(chunk)

    return once


BLOCKING_ECHO_FLAG = "--blocking-echo-server"


def run_blocking_echo_server(cert: str, key: str) -> None:
    """Child process: blocking TCP and TLS echo servers, one thread per connection, until stdin closes."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    listeners = []
    for wrap in (False, True):
        lsock = socket.create_server(("127.0.0.1", 0))
        listeners.append((lsock, wrap))

    def serve(conn) -> None:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with conn:
            while True:
                data = conn.recv(RECV_BYTES)
                if not data:
                    return
                conn.sendall(data)

    def accept(lsock, wrap) -> None:
        while True:
            conn, _ = lsock.accept()
            if wrap:
                conn = context.wrap_socket(conn, server_side=True)
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    for lsock, wrap in listeners:
        threading.Thread(target=accept, args=(lsock, wrap), daemon=True).start()
    print(" ".join(str(l.getsockname()[1]) for l, _ in listeners), flush=True)
    sys.stdin.read()  # the parent closes our stdin when it is done


class BlockingEcho:
    """Blocking stdlib sockets in this process, to the echo servers of a child process."""

    def __init__(self, session, identity: Identity) -> None:
        cert, key = identity.cert_files()
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), BLOCKING_ECHO_FLAG, cert, key],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        tcp_port, tls_port = (int(p) for p in self.proc.stdout.readline().split())
        self.tcp = socket.create_connection(("127.0.0.1", tcp_port), timeout=REQUEST_TIMEOUT_S)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.load_verify_locations(cadata=session.ca_cert_pem.decode("ascii"))
        raw = socket.create_connection(("127.0.0.1", tls_port), timeout=REQUEST_TIMEOUT_S)
        self.tls = context.wrap_socket(raw)
        for sock in (self.tcp, self.tls):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.settimeout(None)  # truly blocking from here on (a timeout makes every call poll first)

    def close(self) -> None:
        self.tcp.close()
        self.tls.close()
        self.proc.stdin.close()
        self.proc.wait(timeout=REQUEST_TIMEOUT_S)


def link_echo(session, payload: bytes) -> tuple:
    """Two gridsock Links over one mutual-TLS connection; returns ``(round_trip, close)``."""
    server_id, client_id = make_identity(session), make_identity(session)
    client, server = open_pair((client_context(session, client_id),
                                server_context(session, server_id, require_client_cert=True)))
    box = {"done": gevent.event.Event()}

    def answer(link, message) -> None:
        link.send(dataclasses.replace(message, kind="rep", hops=1))

    def arrived(link, message) -> None:
        box["done"].set()

    near = Link(client, wire.Decoder(), label="bench near", on_message=arrived).start()
    far = Link(server, wire.Decoder(), label="bench far", on_message=answer).start()
    message = wire.Routed(src=str(uuid.uuid4()), dst=str(uuid.uuid4()), kind="req", topic="echo", request_id=1,
                          hops=1, route=("m1",), payload=payload)

    def once() -> None:
        box["done"] = gevent.event.Event()
        near.send(message)
        if not box["done"].wait(REQUEST_TIMEOUT_S):
            raise BenchError("link echo: no answer")

    def close() -> None:
        near.close()
        far.close()

    return once, close


# --- the grid -------------------------------------------------------------------------------------


class Grid:
    """Rendez-vous node, L1 {m1, m2}, L2 {m3}, all on loopback in this process, TLS session."""

    def __init__(self, workdir: Path) -> None:
        session = create_session(workdir / "grid", "127.0.0.1:1")
        self.rv = RendezvousNode(session, listen_address="127.0.0.1:0", control="").start()
        self.session = dataclasses.replace(session, rendezvous_port=self.rv.address.port)
        self.nodes: Dict[str, Node] = {}
        self.sink_count = 0
        self.sink_changed = gevent.event.Event()
        try:
            for name, cluster in (("L1", "A"), ("L2", "B")):
                self._start(name, cluster=cluster)
            for name, leader in (("m1", "L1"), ("m2", "L1"), ("m3", "L2")):
                self._start(name, leader=str(self.nodes[leader].address))
            names = list(self.nodes)
            for node in self.nodes.values():
                node.wait_directory(present=names, settled=True, timeout=JOIN_TIMEOUT_S)
            for node in self.nodes.values():
                node.handle("echo", lambda delivery: delivery.payload)
            self.nodes["m3"].handle("sink", self._sink)
            for dst, hops in PATHS:
                route = self.nodes["m1"].ping(dst, timeout=REQUEST_TIMEOUT_S).route_there
                if len(route) - 1 != hops:
                    raise BenchError(f"m1 -> {dst} took {route}, expected {hops} hops")
        except BaseException:
            self.stop()
            raise

    def _start(self, name: str, **kwargs) -> None:
        node = Node(self.session, name, listen_address="127.0.0.1:0", control="", **kwargs).start()
        self.nodes[name] = node
        if not node.wait_joined(JOIN_TIMEOUT_S):
            raise BenchError(f"{name} did not join")

    def _sink(self, delivery) -> None:
        self.sink_count += 1
        self.sink_changed.set()

    def __getitem__(self, name: str) -> Node:
        return self.nodes[name]

    def stop(self) -> None:
        for node in reversed(list(self.nodes.values())):
            node.stop()
        self.rv.stop()


# --- 1. round trips -----------------------------------------------------------------------------


def bench_rtt(grid: Grid, plan: Plan, blocking: BlockingEcho) -> dict:
    payload = bytes(range(RTT_PAYLOAD_BYTES))
    session = grid.session
    tls_ctx = (client_context(session, make_identity(session)),
               server_context(session, make_identity(session), require_client_cert=True))
    servers, cases = [], {}
    for label, tls in (("gevent TCP echo, 1 link", None), ("gevent TLS echo, 1 link", tls_ctx)):
        client, server = open_pair(tls)
        servers.append(gevent.spawn(serve_echo, server))
        cases[label] = (client, echo_round_trip(client, payload))
    link_once, link_close = link_echo(session, payload)
    cases["gridsock Link echo, 1 link (codec + link greenlets)"] = (None, link_once)
    cases["blocking TCP echo, 1 link (child process)"] = (None, echo_round_trip(blocking.tcp, payload))
    cases["blocking TLS echo, 1 link (child process)"] = (None, echo_round_trip(blocking.tls, payload))
    m1, routed = grid["m1"], []
    for dst, hops in PATHS:
        def request(dst=dst) -> None:
            if m1.request(dst, "echo", payload, timeout=REQUEST_TIMEOUT_S).payload != payload:
                raise BenchError(f"{dst} echoed something else")

        cases[f"routed m1 -> {dst}"] = (None, request)
        routed.append((f"routed m1 -> {dst}", hops))

    labels = list(cases)
    for label in labels:
        timed(cases[label][1], plan.rtt_warmup)
    series = {label: Series() for label in labels}
    for r in range(plan.rtt_rounds):
        for label in rotated(labels, r):
            series[label].add_round(timed(cases[label][1], plan.rtt_batch))
    link_close()
    for client, _ in cases.values():
        if client is not None:
            client.close()
    gevent.joinall(servers, timeout=REQUEST_TIMEOUT_S)

    # The codec alone: what one message costs to encode and decode at each end of a link.
    message = wire.Routed(src=str(uuid.uuid4()), dst=str(uuid.uuid4()), kind="req", topic="echo",
                          request_id=1, hops=1, route=("m1",), payload=payload)
    frame = wire.encode(message)

    def decode() -> None:
        decoder = wire.Decoder()
        decoder.feed(frame)
        decoder.next_message()

    codec = {"encode": statistics.median(timed(lambda: wire.encode(message), 5000)),
             "decode": statistics.median(timed(decode, 5000))}
    return {"series": series, "routed": routed, "codec": codec, "frame_bytes": len(frame)}


def render_rtt(res: dict, plan: Plan) -> str:
    series: Dict[str, Series] = res["series"]
    tls = series["gevent TLS echo, 1 link"].median
    rows = []
    for label, s in series.items():
        if label.startswith("routed"):
            continue
        lo, hi = s.spread()
        rows.append([label, "1", us(s.median), us(s.p(0.9)), us(s.p(0.99)), f"{us(lo)}–{us(hi)}",
                     f"{s.median / tls:.2f}"])
    routed = [(label, series[label], hops) for label, hops in res["routed"]]
    for label, s, hops in routed:
        lo, hi = s.spread()
        rows.append([f"**{label}**", str(hops), f"**{us(s.median)}**", us(s.p(0.9)), us(s.p(0.99)),
                     f"{us(lo)}–{us(hi)}", f"**{s.median / (hops * tls):.2f}**"])
    per_hop = (routed[-1][1].median - routed[0][1].median) / 3
    far_label, far, far_hops = routed[-1]
    network = far_hops * tls
    codec_time = 2 * far_hops * (res["codec"]["encode"] + res["codec"]["decode"])
    rest = far.median - network - codec_time
    parts = [
        [f"{far_hops} × gevent TLS echo (sockets, TLS, loopback)", us(network), f"{network / far.median * 100:.0f} %"],
        [f"{2 * far_hops} × (encode + decode) of the frame, as timed alone in a hot loop (a lower bound: in place, "
         "between TLS and greenlet switches, the same code runs slower)",
         us(codec_time), f"{codec_time / far.median * 100:.0f} %"],
        ["the rest: greenlet hand-offs (reader, handler greenlet, send queue, writer), routing, "
         "`dataclasses.replace` at each forwarder, request bookkeeping", us(rest), f"{rest / far.median * 100:.0f} %"],
    ]
    link = series["gridsock Link echo, 1 link (codec + link greenlets)"].median
    codec = res["codec"]
    n = plan.rtt_rounds * plan.rtt_batch
    text = [
        "## 1. Routed request round trip by path length",
        "",
        f"m1 sends a request with a {RTT_PAYLOAD_BYTES}-byte payload; the destination's `echo` handler returns it. "
        f"{n} round trips per case after {plan.rtt_warmup} of warm-up, in {plan.rtt_rounds} interleaved rounds. "
        "Times in µs. *Spread* is the lowest and highest per-round median. The last column is "
        "RTT / (hops × gevent TLS echo RTT): 1.00 would mean a routed hop costs exactly one TLS round trip "
        "on one link.",
        "",
        table(["case", "hops", "median", "p90", "p99", "spread", "÷ (hops × TLS)"], rows),
        "",
        f"Codec alone, for the {res['frame_bytes']}-byte frame of this request: encode {us(codec['encode'])} µs, "
        f"decode {us(codec['decode'])} µs (median of 5000). Each link a request and its reply cross costs two "
        "encodes and two decodes; a forwarder also rebuilds the message (`dataclasses.replace`).",
        "",
        f"Decomposition of the median {far_hops}-hop round trip ({us(far.median)} µs) from the medians above, "
        "without a profiler:",
        "",
        table(["part", "µs", "share"], parts),
        "",
        "**Reading.** The first hop costs "
        f"{series[routed[0][0]].median / tls:.1f}× a TLS echo and each further hop about "
        f"{per_hop * 1e6:.0f} µs ({per_hop / tls:.1f}× a TLS echo). A single gridsock `Link` echo already costs "
        f"{link / tls:.1f}× the bare TLS echo, so most of a hop is not the network or TLS but Python work per "
        "message: the wire codec (JSON header, and every field validated on encode as well as on decode — "
        "node ids through `uuid.UUID`, names through a regular expression), rebuilding the frozen dataclass at "
        "every forwarder, and the greenlet hand-offs (reader -> handler greenlet -> send queue -> writer). The "
        "whole grid shares one process and one core here, so the hops add up serially; on a real grid each "
        "node has its own CPU and the loopback latency is replaced by the network's. The p99 column and the "
        "spread are the shared machine's: other work preempts this process now and then. See the profile "
        "below.",
    ]
    return "\n".join(text)


# --- 2. throughput ------------------------------------------------------------------------------


class Counter:
    """Bytes or messages received by an in-process sink, with an event for waiters."""

    def __init__(self) -> None:
        self.value = 0
        self.changed = gevent.event.Event()

    def add(self, n: int) -> None:
        self.value += n
        self.changed.set()

    def wait_for(self, target: int, what: str) -> None:
        deadline = time.monotonic() + STALL_TIMEOUT_S
        while self.value < target:
            self.changed.clear()
            if not self.changed.wait(max(0.0, deadline - time.monotonic())):
                raise BenchError(f"{what}: stalled at {self.value} of {target}")


def routed_stream(grid: Grid, seconds: float) -> tuple:
    """One-way 64 KiB messages m1 -> m3 for ``seconds``; returns ``(bytes, messages, elapsed_s)``."""
    m1, payload = grid["m1"], b"\x5a" * STREAM_PAYLOAD_BYTES
    base, sent = grid.sink_count, 0
    start = time.perf_counter()
    deadline = start + seconds
    while time.perf_counter() < deadline:
        if sent - (grid.sink_count - base) >= STREAM_WINDOW_MESSAGES:
            grid.sink_changed.clear()
            if not grid.sink_changed.wait(STALL_TIMEOUT_S):
                raise BenchError("routed stream stalled")
            continue
        m1.send("m3", "sink", payload)
        sent += 1
    give_up = time.monotonic() + STALL_TIMEOUT_S
    while grid.sink_count - base < sent:
        grid.sink_changed.clear()
        if not grid.sink_changed.wait(max(0.0, give_up - time.monotonic())):
            raise BenchError(f"routed stream: {grid.sink_count - base} of {sent} arrived")
    return sent * STREAM_PAYLOAD_BYTES, sent, time.perf_counter() - start


class Pipe:
    """Bytes from ``source`` arrive at an in-process sink, through ``links`` TLS (or TCP) links."""

    def __init__(self, links: int, tls: Optional[tuple]) -> None:
        pairs = [open_pair(tls) for _ in range(links)]
        self.source = pairs[0][0]
        self.received = Counter()
        self.greenlets = [gevent.spawn(self._relay, pairs[i][1], pairs[i + 1][0]) for i in range(links - 1)]
        self.greenlets.append(gevent.spawn(self._sink, pairs[-1][1]))
        self.socks = [s for pair in pairs for s in pair]

    @staticmethod
    def _relay(src, dst) -> None:
        try:
            while True:
                data = src.recv(RECV_BYTES)
                if not data:
                    return
                dst.sendall(data)
        except (OSError, ValueError):
            return

    def _sink(self, sock) -> None:
        try:
            while True:
                data = sock.recv(RECV_BYTES)
                if not data:
                    return
                self.received.add(len(data))
        except (OSError, ValueError):
            return

    def stream(self, seconds: float) -> tuple:
        chunk = b"\x5a" * STREAM_PAYLOAD_BYTES
        base, sent = self.received.value, 0
        start = time.perf_counter()
        deadline = start + seconds
        while time.perf_counter() < deadline:
            self.source.sendall(chunk)
            sent += 1
        self.received.wait_for(base + sent * len(chunk), "stream")
        return sent * len(chunk), sent, time.perf_counter() - start

    def close(self) -> None:
        for sock in self.socks:
            sock.close()
        gevent.killall(self.greenlets, block=False)


def bench_stream(grid: Grid, plan: Plan) -> dict:
    session = grid.session
    ids = [make_identity(session) for _ in range(2)]
    tls = (client_context(session, ids[0]), server_context(session, ids[1], require_client_cert=True))
    pipes = {
        "gevent TCP stream, 1 link": Pipe(1, None),
        "gevent TLS stream, 1 link": Pipe(1, tls),
        "gevent TLS stream, 4 links chained by relays": Pipe(4, tls),
    }
    cases: Dict[str, Callable[[float], tuple]] = {label: pipe.stream for label, pipe in pipes.items()}
    cases["routed send m1 -> m3 (4 hops)"] = lambda s: routed_stream(grid, s)
    labels = list(cases)
    for label in labels:  # warm-up
        cases[label](min(0.2, plan.stream_round_s))
    results: Dict[str, List[tuple]] = {label: [] for label in labels}
    for r in range(plan.stream_rounds):
        for label in rotated(labels, r):
            results[label].append(cases[label](plan.stream_round_s))
    for pipe in pipes.values():
        pipe.close()
    return results


def render_stream(results: Dict[str, List[tuple]], plan: Plan) -> str:
    def rate(samples, index):
        return [s[index] / s[2] for s in samples]

    one_tls = statistics.median(rate(results["gevent TLS stream, 1 link"], 0))
    rows = []
    for label, samples in results.items():
        mb = [x / 1e6 for x in rate(samples, 0)]
        msgs = rate(samples, 1)
        name = f"**{label}**" if label.startswith("routed") else label
        rows.append([name, f"{statistics.median(mb):.0f}", f"{min(mb):.0f}–{max(mb):.0f}",
                     f"{statistics.median(msgs):.0f}", f"{statistics.median(mb) * 1e6 / one_tls:.2f}"])
    routed = statistics.median(rate(results["routed send m1 -> m3 (4 hops)"], 0))
    chained = statistics.median(rate(results["gevent TLS stream, 4 links chained by relays"], 0))
    text = [
        "## 2. Routed throughput",
        "",
        f"One-way `send` of {STREAM_PAYLOAD_BYTES // 1024} KiB payloads from m1 to m3 (4 hops: m1 -> L1 -> "
        f"rendez-vous -> L2 -> m3), at most {STREAM_WINDOW_MESSAGES} messages in flight; against "
        f"{STREAM_PAYLOAD_BYTES // 1024} KiB `sendall` calls on plain streams. {plan.stream_rounds} interleaved rounds "
        f"of {plan.stream_round_s:g} s per case, each ending when the sink has everything. MB = 10^6 bytes; "
        "*spread* is the lowest and highest round.",
        "",
        table(["case", "MB/s (median)", "spread", "messages/s", "÷ TLS 1 link"], rows),
        "",
        "**Reading.** The routed path reaches "
        f"{routed / chained:.2f}× the throughput of four TLS links chained by plain relays, which do the same "
        "encryption work (and read the same one TLS record, at most 16 KiB, per `recv`). What the relays do "
        "not do is the per-message work at each of the five nodes: decode the header (JSON, every field "
        "validated), rebuild the message, encode it again (validated again) and copy the payload a few times "
        "(decoder buffer, frame slice, re-encoded frame, coalesced write), plus a greenlet per delivered "
        "message. The profile below splits it: the codec weighs about as much as TLS. Everything shares one "
        "core in this process, so the figure is the relay's CPU cost, not a network limit. This is the "
        "control channel, the relay of last resort: tens of MB/s is ample for control traffic and tolerable "
        "for an occasional transfer. The topic is `sink`, so these are control frames; data of the relay "
        "component (topic `relay`) queues behind control traffic instead, bounded in bytes. `Node.send()` "
        "has no back-pressure (it queues and returns): a sender that does not pace itself fills its "
        "uplink's control queue (4096 frames) and its own uplink is closed as *too slow*; the bench keeps "
        f"{STREAM_WINDOW_MESSAGES} messages in flight for that reason.",
    ]
    return "\n".join(text)


# --- 3. scale of the rendez-vous node ---------------------------------------------------------------


def enroll(session, address: Address, name: str) -> Identity:
    """Get a node identity the way a node does: join token and CSR over server-authenticated TLS."""
    key_pem, csr_pem = new_node_key()
    sock = tls_client(dial(address), client_context(session, None), timeout=JOIN_TIMEOUT_S)
    try:
        send_message(sock, wire.Enroll(token=session.join_token, csr_pem=csr_pem.decode(), name=name))
        reply = read_message(sock, wire.Decoder(), timeout=JOIN_TIMEOUT_S)
    finally:
        sock.close()
    if not isinstance(reply, wire.Enrolled):
        raise BenchError(f"enrollment of {name} failed: {reply}")
    return Identity(reply.cert_pem.encode(), key_pem)


class Progress:
    """Which of a set of node ids were seen joining, getting a dial-back verdict, leaving; and when last."""

    KINDS = ("joined", "verdict", "left")

    def __init__(self, ids=()) -> None:
        self.ids = frozenset(ids)
        self.seen = {k: set() for k in self.KINDS}
        self.last = {k: 0.0 for k in self.KINDS}

    def note(self, kind: str, node_id: str, now: float) -> None:
        if node_id in self.ids and node_id not in self.seen[kind]:
            self.seen[kind].add(node_id)
            self.last[kind] = now

    def note_entries(self, joined, left, now: float) -> None:
        for entry in joined:
            self.note("joined", entry.node_id, now)
            if entry.inbound is not None:
                self.note("verdict", entry.node_id, now)
        for node_id in left:
            self.note("left", node_id, now)

    def count(self, kind: str) -> int:
        return len(self.seen[kind])


class HandLeader:
    """A leader link to the rendez-vous node driven by hand with the wire protocol."""

    def __init__(self, session, address: Address, identity: Identity, name: str, cluster: str, *,
                 record: bool = False) -> None:
        self.session, self.address, self.identity = session, address, identity
        self.name, self.cluster, self.record = name, cluster, record
        self.node_id = identity.node_id
        self.progress = Progress()
        self.recorded: List[wire.DirectoryUpdate] = []
        self.closed = False
        self.changed = gevent.event.Event()
        self._pongs: Dict[int, gevent.event.Event] = {}
        self._lock = gevent.lock.Semaphore()
        self._greenlets: list = []
        self.sock = None
        self.decoder = wire.Decoder(peer="rendez-vous")
        self.snapshot_entries = 0

    def open(self) -> float:
        """Link up; return the seconds from sending Hello to the last part of the snapshot."""
        self.sock = tls_client(dial(self.address), client_context(self.session, self.identity), timeout=JOIN_TIMEOUT_S)
        self.decoder = wire.Decoder(peer="rendez-vous")
        self.snapshot_entries = 0
        start = time.perf_counter()
        send_message(self.sock, wire.Hello(name=self.name, cluster=self.cluster, role="leader"))
        welcome = read_message(self.sock, self.decoder, timeout=JOIN_TIMEOUT_S)
        if not isinstance(welcome, wire.Welcome):
            raise BenchError(f"{self.name}: expected Welcome, got {welcome}")
        while True:
            message = read_message(self.sock, self.decoder, timeout=JOIN_TIMEOUT_S)
            if isinstance(message, wire.DirectoryUpdate):
                self.snapshot_entries += len(message.joined)
                if not message.more:
                    break
        elapsed = time.perf_counter() - start
        self._greenlets = [gevent.spawn(self._read_loop), gevent.spawn(self._keepalive)]
        return elapsed

    def send(self, message) -> None:
        with self._lock:
            self.sock.sendall(wire.encode(message))

    def flush(self) -> None:
        """Return once everything the rendez-vous node queued for us before now has arrived."""
        nonce = len(self._pongs) + 1
        self._pongs[nonce] = event = gevent.event.Event()
        self.send(wire.Ping(nonce))
        if not event.wait(SCALE_TIMEOUT_S):
            raise BenchError(f"{self.name}: no Pong")

    def _read_loop(self) -> None:
        try:
            while True:
                data = self.sock.recv(RECV_BYTES)
                if not data:
                    break
                self.decoder.feed(data)
                while (message := self.decoder.next_message()) is not None:
                    self._on_message(message)
        except (OSError, ValueError):
            pass
        self.closed = True
        self.changed.set()

    def _on_message(self, message) -> None:
        if isinstance(message, wire.DirectoryUpdate):
            self.progress.note_entries(message.joined, message.left, time.perf_counter())
            if self.record:
                self.recorded.append(message)
            self.changed.set()
        elif isinstance(message, wire.Pong) and message.nonce in self._pongs:
            self._pongs[message.nonce].set()

    def _keepalive(self) -> None:
        try:
            while True:
                gevent.sleep(KEEPALIVE_S)
                self.send(wire.Ping(0))
        except (OSError, ValueError):
            return

    def wait_changed(self, timeout: float) -> None:
        self.changed.clear()
        self.changed.wait(timeout)

    def close(self) -> None:
        gevent.killall(self._greenlets, block=True, timeout=REQUEST_TIMEOUT_S)
        if self.sock is not None:
            self.sock.close()


class StallMeter:
    """The longest time the event loop went without getting back to timers and sockets while it ran."""

    def __init__(self) -> None:
        self.longest = 0.0
        self._greenlet = gevent.spawn(self._run)

    def _run(self) -> None:
        while True:
            start = time.perf_counter()
            gevent.sleep(STALL_TICK_S)
            self.longest = max(self.longest, time.perf_counter() - start - STALL_TICK_S)

    def stop(self) -> float:
        self._greenlet.kill()
        return self.longest


class ScaleRig:
    """A fresh rendez-vous node with hand-driven leaders: R registers members, W watches."""

    def __init__(self, workdir: Path, tag: str, n: int, *, watcher: bool) -> None:
        session = create_session(workdir / tag, "127.0.0.1:1")
        self.rv = RendezvousNode(session, listen_address="127.0.0.1:0", control="").start()
        self.session = dataclasses.replace(session, rendezvous_port=self.rv.address.port)
        address = self.rv.address
        self.leaders: Dict[str, HandLeader] = {}
        names = ("R", "W", "S") if watcher else ("R",)
        for name in names:
            identity = enroll(self.session, address, f"bench-{name}")
            cluster = SCALE_CLUSTER if name == "R" else f"C{name}"
            self.leaders[name] = HandLeader(self.session, address, identity, f"bench-{name}", cluster,
                                            record=(name == "W"))
        self.R = self.leaders["R"]
        self.W = self.leaders.get("W")
        self.members = [
            wire.NodeEntry(node_id=str(uuid.uuid4()), name=f"{tag}-{i:05d}", cluster=SCALE_CLUSTER,
                           leader=self.R.node_id, role="member")
            for i in range(n)
        ]
        ids = [e.node_id for e in self.members]
        # What the rendez-vous directory shows, and what the watching leader hears.
        self.at_rv = Progress(ids)
        self.rv.directory.add_listener(
            lambda joined, left: self.at_rv.note_entries(joined, [e.node_id for e in left], time.perf_counter()))
        if self.W is not None:
            self.W.progress = Progress(ids)
            self.W.open()
        self.R.open()

    def register(self, *, paced: bool) -> float:
        """Send every member in Register batches; return the perf_counter() time the first was sent.

        ``paced``: wait until every verdict of a batch is in the directory before sending the next
        (members arriving over time); otherwise back to back, as a leader that relinks does.
        """
        step = wire.MAX_ENTRIES_PER_UPDATE
        start = time.perf_counter()
        for i in range(0, len(self.members), step):
            self.R.send(wire.Register(tuple(self.members[i:i + step])))
            if paced:
                target = min(i + step, len(self.members))
                self.wait_rv(lambda: self.at_rv.count("verdict") >= target, "paced batch")
        return start

    def broken(self) -> bool:
        """The registering leader lost its link (the rendez-vous node dropped it)."""
        return self.R.node_id not in self.rv.leaders

    def wait_rv(self, condition, what: str) -> None:
        def check() -> bool:
            if self.broken():
                raise BenchError(f"{what}: the rendez-vous node dropped the registering leader")
            return condition()

        wait_until(check, self.rv.directory.wait_changed, SCALE_TIMEOUT_S, what)

    def wait_w(self, condition, what: str) -> None:
        wait_until(lambda: condition() or self.W.closed, self.W.wait_changed, SCALE_TIMEOUT_S, what)
        if self.W.closed:
            raise BenchError(f"{what}: the rendez-vous node dropped the watching leader")

    def stop(self) -> None:
        for leader in self.leaders.values():
            leader.close()
        self.rv.stop()


def bench_scale_burst(workdir: Path, n: int) -> dict:
    """All Register batches back to back (a relinking leader); succeed or record how it failed."""
    rig = ScaleRig(workdir, f"burst{n}", n, watcher=True)
    out = {"n": n}
    try:
        meter = StallMeter()
        start = rig.register(paced=False)
        try:
            rig.wait_rv(lambda: rig.at_rv.count("joined") >= n, "registration at the rendez-vous node")
            out["registered_rv"] = rig.at_rv.last["joined"] - start
            rig.wait_w(lambda: rig.W.progress.count("joined") >= n, "registration heard by another leader")
            out["registered_w"] = rig.W.progress.last["joined"] - start
            rig.wait_rv(lambda: rig.at_rv.count("verdict") >= n, "dial-back verdicts at the rendez-vous node")
            out["settled_rv"] = rig.at_rv.last["verdict"] - start
            rig.wait_w(lambda: rig.W.progress.count("verdict") >= n, "dial-back verdicts heard by another leader")
            out["settled_w"] = rig.W.progress.last["verdict"] - start
            out["ok"] = True
        except BenchError as exc:
            out.update(ok=False, error=str(exc), after=time.perf_counter() - start,
                       verdicts=rig.at_rv.count("verdict"), w_closed=rig.W.closed)
        out["stall"] = meter.stop()
        return out
    finally:
        rig.stop()


def bench_scale_paced(workdir: Path, n: int, plan: Plan) -> dict:
    """Register in paced batches, then a new leader's snapshot, then the leave of all N."""
    rig = ScaleRig(workdir, f"paced{n}", n, watcher=True)
    out = {"n": n}
    try:
        meter = StallMeter()
        start = rig.register(paced=True)
        out["settled_rv"] = rig.at_rv.last["verdict"] - start
        rig.wait_w(lambda: rig.W.progress.count("verdict") >= n, "verdicts heard by another leader")
        out["settled_w"] = rig.W.progress.last["verdict"] - start
        out["stall"] = meter.stop()
        recorded, rig.W.record = list(rig.W.recorded), False

        snapshots, S = [], rig.leaders["S"]
        for _ in range(plan.snapshot_repeats):
            snapshots.append(S.open())
            if S.snapshot_entries < n:
                raise BenchError(f"snapshot had {S.snapshot_entries} entries, expected at least {n}")
            S.close()
            rig.wait_rv(lambda: S.node_id not in rig.rv.directory, "the snapshot leader's leave")
        out["snapshot"] = snapshots
        out["snapshot_entries"] = S.snapshot_entries

        start = time.perf_counter()
        rig.R.close()
        wait_until(lambda: rig.at_rv.count("left") >= n, rig.rv.directory.wait_changed, SCALE_TIMEOUT_S,
                   "leave at the rendez-vous node")
        out["leave_rv"] = rig.at_rv.last["left"] - start
        rig.wait_w(lambda: rig.W.progress.count("left") >= n, "leave heard by another leader")
        out["leave_w"] = rig.W.progress.last["left"] - start
    finally:
        rig.stop()
    # What a leader (and each of its members) spends applying those updates to its replica; run
    # once nothing else is live, since it holds the hub for as long as it takes.
    replica = Directory()
    start = time.perf_counter()
    for update in recorded:
        replica.apply_update(update)
    out["replica_apply"] = time.perf_counter() - start
    out["replica_updates"] = len(recorded)
    return out


def bench_scale_memory(workdir: Path, n: int) -> dict:
    """Memory the rendez-vous node keeps per registered member (tracemalloc, paced registration)."""
    gc.collect()
    tracemalloc.start(1)
    rig = None
    try:
        rig = ScaleRig(workdir, f"mem{n}", n, watcher=False)
        rig.R.flush()
        gc.collect()
        before = tracemalloc.take_snapshot()
        rig.register(paced=True)
        rig.R.flush()  # the rendez-vous node's send queue to R is empty again
        gc.collect()
        # The bench's own bookkeeping (the Progress sets) is not the rendez-vous node's.
        mine = [tracemalloc.Filter(False, __file__), tracemalloc.Filter(False, tracemalloc.__file__)]
        diff = tracemalloc.take_snapshot().filter_traces(mine).compare_to(before.filter_traces(mine), "filename")
        top = [(d.traceback[0].filename, d.size_diff) for d in diff[:4] if d.size_diff > 0]
        return {"n": n, "per_entry": sum(d.size_diff for d in diff) / n, "top": top}
    finally:
        tracemalloc.stop()
        if rig is not None:
            rig.stop()


def bench_scale(workdir: Path, plan: Plan) -> dict:
    out = {"burst": [], "paced": [], "memory": []}
    for n in plan.scale_sizes:
        progress(f"scale: N={n}, burst registration")
        out["burst"].append(bench_scale_burst(workdir, n))
        progress(f"scale: N={n}, paced registration, snapshot, leave")
        out["paced"].append(bench_scale_paced(workdir, n, plan))
        progress(f"scale: N={n}, memory (tracemalloc)")
        out["memory"].append(bench_scale_memory(workdir, n))
    return out


def render_scale(res: dict, plan: Plan) -> str:
    def sec(x: float) -> str:
        return f"{x:.2f}"

    burst_rows = []
    for b in res["burst"]:
        if b["ok"]:
            burst_rows.append([str(b["n"]), "registered and settled", sec(b["registered_rv"]), sec(b["registered_w"]),
                               sec(b["settled_rv"]), sec(b["settled_w"]), sec(b["stall"])])
        else:
            burst_rows.append([str(b["n"]), f"**failed after {b['after']:.1f} s**: {b['error']} "
                               f"({b['verdicts']} of {b['n']} verdicts had been applied)", "–", "–", "–", "–",
                               sec(b["stall"])])
    paced_rows, snap_rows, leave_rows = [], [], []
    for p, mem in zip(res["paced"], res["memory"]):
        top = ", ".join(f"{Path(f).name} {size / mem['n']:.0f}" for f, size in mem["top"])
        paced_rows.append([str(p["n"]), sec(p["settled_rv"]), sec(p["settled_w"]), sec(p["stall"]),
                           f"{p['replica_apply']:.2f} ({p['replica_updates']} updates)",
                           f"**{mem['per_entry']:.0f}** ({top})"])
        snaps = p["snapshot"]
        snap_rows.append([str(p["n"]), str(p["snapshot_entries"]), ms(statistics.median(snaps)),
                          f"{ms(min(snaps))}–{ms(max(snaps))}", str(len(snaps))])
        leave_rows.append([str(p["n"]), ms(p["leave_rv"]), ms(p["leave_w"])])
    growth = ""
    if len(res["paced"]) > 1:
        a, b = res["paced"][0], res["paced"][-1]
        growth = (f" From N={a['n']} to N={b['n']} ({b['n'] / a['n']:.0f}× the members) the settle time grows "
                  f"{b['settled_rv'] / a['settled_rv']:.0f}× and the replica's apply time "
                  f"{b['replica_apply'] / max(a['replica_apply'], 1e-9):.0f}×.")
    text = [
        "## 3. Scale of the rendez-vous node",
        "",
        "A leader driven by hand with the wire protocol (enrolled with the join token, mutual TLS, `Hello` as a "
        f"leader) registers N synthetic members of its cluster in `Register` batches of "
        f"{wire.MAX_ENTRIES_PER_UPDATE}; a second hand-driven leader watches the `DirectoryUpdate`s, decoding "
        "them as a leader does. The members advertise no address (as members on a Unix-socket node port "
        "do), so the rendez-vous node's dial-back has nothing to dial and records `inbound=false` at once. "
        "*Registered*: all N in the rendez-vous directory / heard by the other leader. *Settled*: every "
        "dial-back verdict applied / heard. Times in seconds from the first `Register`; one run per N. "
        "*Longest loop stall*: the longest the process's event loop went without getting back to its "
        "timers and sockets (a ticker asks to wake every 5 ms): meanwhile nothing is routed, no link is "
        "read, and a stall past the link timeout (6 s) would get links dropped as dead.",
        "",
        "**Burst**: all batches back to back, as a leader sends them when it (re)links with its members.",
        "",
        table(["N", "outcome", "registered (rv)", "registered (other leader)", "settled (rv)",
               "settled (other leader)", "longest loop stall"], burst_rows),
        "",
        "**Paced**: the next batch goes once the previous one has settled (members arriving over time). "
        "*Replica apply*: CPU time for a fresh `Directory` to apply, in order, the updates the other leader "
        "received — what every leader and every member spends keeping its replica up to date. *Bytes per "
        "entry*: tracemalloc difference at the rendez-vous node before/after registering (a separate run "
        "with tracing on; settled, send queue flushed, after `gc.collect()`), and the largest contributors "
        "by file.",
        "",
        table(["N", "settled (rv), s", "settled (other leader), s", "longest loop stall, s", "replica apply, s",
               "bytes per entry"], paced_rows),
        "",
        "**A new leader's snapshot**: from sending `Hello` to decoding the last part of the snapshot "
        f"({plan.snapshot_repeats} links per N, ms).",
        "",
        table(["N", "entries", "median", "spread", "runs"], snap_rows),
        "",
        "**Leave of all N**: the registering leader's link closes; time until all N members are out of the "
        "rendez-vous directory, and until another leader has heard it (ms).",
        "",
        table(["N", "rendez-vous directory", "other leader"], leave_rows),
        "",
        "**Reading.** Registration itself is cheap: a few batches, validated and broadcast once. What does "
        "not scale is what follows: every dial-back verdict is applied as its own directory change and "
        "broadcast as its own one-entry `DirectoryUpdate`, and `Directory.apply` copies and compares the "
        "whole directory on every change, so N verdicts cost O(N²) at the rendez-vous node and again at "
        "every leader and member replica." + growth + " In a burst, the verdict updates are queued to "
        "every leader link within one pass of the event loop, before any link writer runs; past "
        "`SEND_QUEUE_FRAMES` (4096) the rendez-vous node closes leader links as *too slow*, and their "
        "members leave the directory. Snapshots and leaves are bulk operations (1000 entries per update) "
        "and stay fast; their cost is the JSON codec and the per-field validation of each entry. Memory "
        "is dominated by the entries' strings, each decoded anew from JSON: every member holds its own "
        "copy of its leader's id and of the string `member`.",
    ]
    return "\n".join(text)


# --- 4. join latency ---------------------------------------------------------------------------------


def bench_join(grid: Grid, plan: Plan) -> dict:
    session, rv = grid.session, grid.rv
    ca = session.certificate_authority()
    server_id, client_id = make_identity(session), make_identity(session)
    listener = listen(Address(host="127.0.0.1", port=0))
    server_ctx = server_context(session, server_id, require_client_cert=False)
    port = listener.getsockname()[1]

    def serve() -> None:
        while True:
            sock, _ = listener.accept()
            gevent.spawn(handshake_then_close, sock)

    def handshake_then_close(sock) -> None:
        try:
            tls = tls_server(sock, server_ctx, timeout=JOIN_TIMEOUT_S)
            tls.recv(1)
            tls.close()
        except (OSError, ValueError, TimeoutError):
            sock.close()

    acceptor = gevent.spawn(serve)
    plain_ctx = client_context(session, None)
    mutual_ctx = client_context(session, client_id)
    _, csr_pem = new_node_key()

    def tls_connect(context) -> Callable[[], None]:
        def once() -> None:
            sock = tls_client(dial(Address(host="127.0.0.1", port=port)), context, timeout=JOIN_TIMEOUT_S)
            sock.close()

        return once

    counter = itertools.count()

    def join(role: str) -> float:
        i = next(counter)
        kwargs = {"cluster": f"J{i}"} if role == "leader" else {"leader": str(grid["L1"].address)}
        node = Node(session, f"join-{role}-{i}", listen_address="127.0.0.1:0", control="", **kwargs)
        start = time.perf_counter()
        node.start()
        try:
            if not node.wait_joined(JOIN_TIMEOUT_S):
                raise BenchError(f"{role} did not join")
            elapsed = time.perf_counter() - start
            # Let the dial-back finish so it does not overlap the next measurement.
            wait_until(lambda: (e := rv.directory.get(node.node_id)) is not None and e.inbound is not None,
                       rv.directory.wait_changed, JOIN_TIMEOUT_S, "dial-back of the joined node")
        finally:
            node.stop()
        wait_until(lambda: node.node_id is None or node.node_id not in rv.directory, rv.directory.wait_changed,
                   JOIN_TIMEOUT_S, "leave of the joined node")
        return elapsed

    cases: Dict[str, Callable[[], object]] = {
        "leader joins (enroll + mutual TLS + Hello/Welcome + snapshot)": lambda: join("leader"),
        "member joins (enroll through its leader + mutual TLS link)": lambda: join("member"),
        "TLS connect + handshake (server certificate only)": tls_connect(plain_ctx),
        "mutual TLS connect + handshake": tls_connect(mutual_ctx),
        "EC P-256 key + CSR (`new_node_key`)": new_node_key,
        "CA signs a node certificate (`sign_node`)": lambda: ca.sign_node(csr_pem, str(uuid.uuid4())),
        "TLS client context with a certificate (`client_context`)": lambda: client_context(session, client_id),
    }
    labels = list(cases)
    for label in labels[2:]:
        timed(cases[label], 3)
    series = {label: Series() for label in labels}
    for r in range(plan.join_rounds):
        for label in rotated(labels, r):
            series[label].add_round(timed(cases[label], 1))
    acceptor.kill()
    listener.close()
    return series


def render_join(series: Dict[str, Series], plan: Plan) -> str:
    rows = []
    tls = series["TLS connect + handshake (server certificate only)"].median
    for label, s in series.items():
        name = f"**{label}**" if "joins" in label else label
        rows.append([name, ms(s.median), ms(s.p(0.1)), ms(s.p(0.9)), ms(max(s.all)), f"{s.median / tls:.1f}"])
    leader = series["leader joins (enroll + mutual TLS + Hello/Welcome + snapshot)"].median
    member = series["member joins (enroll through its leader + mutual TLS link)"].median
    text = [
        "## 4. Join latency",
        "",
        "From `Node.start()` until `wait_joined()` returns, for a leader (enrolls at the rendez-vous node, "
        "then links to it) and for a member (enrolls through leader L1, whose routed request reaches the "
        "rendez-vous node, then links to L1). After each join the bench waits for the rendez-vous node's "
        "dial-back to finish and for the node to leave again, so joins do not overlap. "
        f"{plan.join_rounds} interleaved rounds; times in ms.",
        "",
        table(["case", "median", "p10", "p90", "max", "÷ TLS handshake"], rows),
        "",
        f"**Reading.** A leader joins in about {leader / tls:.0f} TLS handshakes' time and a member in "
        f"{member / tls:.0f}. A join is two TLS connections (enrollment, then the link), a key pair, a "
        "signature at the rendez-vous node, and two fresh TLS client contexts (each parses the CA and, with "
        "an identity, loads the key from a file); a member's enrollment also crosses the leader as a routed "
        "request. All of it is CPU in this one process, the rendez-vous node's and the leader's share "
        "included, and the rendez-vous node's dial-back of the new node (one more TLS handshake, and the "
        "node's first server context) starts as soon as it is welcomed and may overlap the end of the "
        "join. The spread is the shared machine's.",
    ]
    return "\n".join(text)


# --- profile ---------------------------------------------------------------------------------------


BUCKETS = (
    ("wire codec: JSON, encode, decode, field validation", ("gridsock/wire.py", "/json/", "uuid.py", "_json")),
    ("message objects: dataclasses.replace / fields", ("dataclasses.py",)),
    ("TLS: gevent ssl wrapper + OpenSSL", ("gevent/ssl.py", "_ssl.")),
    ("links: reader, writer, send queue", ("bootstrap/link.py", "gevent/queue", "gevent/_queue")),
    ("routing, requests, handlers (node.py, routing.py, rendezvous.py, directory.py)",
     ("gridsock/node.py", "bootstrap/routing.py", "bootstrap/rendezvous.py", "bootstrap/directory.py")),
    ("gevent: sockets, event loop, greenlet switches", ("gevent/", "greenlet")),
    ("bench driver", ("bench_bootstrap.py",)),
)
OTHER_BUCKET = "other"


def _bucket(key: tuple) -> Optional[str]:
    filename, _, funcname = key
    where = f"{filename} {funcname}"
    return next((label for label, keys in BUCKETS if any(k in where for k in keys)), None)


def _short(where: str) -> str:
    """A function's location without the interpreter's or this checkout's directories."""
    where = re.sub(r"^.*/(site-packages|lib/python3\.\d+)/", "", where)
    return where.replace(str(Path(__file__).resolve().parent.parent) + "/", "")


def profile_shares(fn: Callable[[], object], top: int = 8) -> dict:
    """Run ``fn`` under cProfile; return ``{"buckets": [(bucket, share)], "top": [(function, share)]}``.

    Shares are of the total own time, largest first; ``top`` lists the functions with the most own
    time. In the buckets, a builtin (``isinstance``, ``re.match``, ``bytes.join`` ...) counts for
    whoever called it, unless its own name places it (OpenSSL, greenlet switches).
    """
    profiler = cProfile.Profile()
    profiler.enable()
    try:
        fn()
    finally:
        profiler.disable()
    stats = pstats.Stats(profiler).stats  # type: ignore[attr-defined]
    totals: Dict[str, float] = {}

    def add(bucket: Optional[str], seconds: float) -> None:
        totals[bucket or OTHER_BUCKET] = totals.get(bucket or OTHER_BUCKET, 0.0) + seconds

    for key, (_, _, own, _, callers) in stats.items():
        if key[0] == "~" and _bucket(key) is None and callers:
            for caller, caller_stats in callers.items():
                add(_bucket(caller), caller_stats[2])
        else:
            add(_bucket(key), own)
    whole = sum(totals.values()) or 1.0
    functions = sorted(stats.items(), key=lambda item: -item[1][2])[:top]
    return {
        "buckets": sorted(((b, t / whole) for b, t in totals.items()), key=lambda x: -x[1]),
        "top": [(_short(pstats.func_std_string(key)), own / whole) for key, (_, _, own, _, _) in functions],
    }


def bench_profile(grid: Grid, plan: Plan) -> dict:
    payload = bytes(RTT_PAYLOAD_BYTES)
    m1 = grid["m1"]
    rtt = profile_shares(lambda: [m1.request("m3", "echo", payload, timeout=REQUEST_TIMEOUT_S)
                                  for _ in range(plan.profile_rtts)])
    stream = profile_shares(lambda: routed_stream(grid, plan.profile_stream_s))
    return {"rtt": rtt, "stream": stream}


def render_profile(res: dict, plan: Plan) -> str:
    def rows(shares, code: bool = False):
        return [[f"`{name}`" if code else name, f"{share * 100:.0f} %"] for name, share in shares
                if share >= 0.005]

    return "\n".join([
        "## Where the time goes",
        "",
        f"cProfile over {plan.profile_rtts} round trips m1 -> m3 (4 hops, {RTT_PAYLOAD_BYTES} B) and over "
        f"{plan.profile_stream_s:g} s of the 4-hop stream. Own time of every function, grouped by where it "
        "lives; a builtin (`isinstance`, `re.match`, ...) counts for its caller. The profiler slows the run "
        "down about twofold, so shares, not absolute times, are what matter. Everything on the path — five "
        "nodes and both ends of every link — is in this process.",
        "",
        table(["round trips (64 B): where", "share"], rows(res["rtt"]["buckets"])),
        "",
        table(["round trips: functions with the most own time", "share"], rows(res["rtt"]["top"], code=True)),
        "",
        table(["stream (64 KiB): where", "share"], rows(res["stream"]["buckets"])),
        "",
        "**Reading.** cProfile over-weights code made of many small Python calls, and the codec is such code; "
        "the hot-loop codec timing of section 1 under-weights it. Both point the same way: after TLS, the "
        "largest single cost is the codec, and most of it is validation. (A one-off A/B run with a codec "
        "that skipped validation — monkeypatched, not part of this bench — cut the 4-hop round trip by "
        "about a quarter.) `_check_object` runs on encode as well as on decode, so a message forwarded over "
        "four links is validated eight times; node ids are checked by parsing them with `uuid.UUID` and printing them "
        "back, names with a regular expression, and each forwarder rebuilds the frozen dataclass "
        "(`dataclasses.replace`, which runs `__init__` again). TLS — the only part a plain relay also "
        "pays — is about a quarter (the profiler also charges some greenlet-switch time to gevent's `read`). "
        "The node spawns a greenlet for every delivered message or request, which costs tens of µs per "
        "request on its own. Cheaper per message: skip validation in `encode` for messages that came "
        "out of the decoder or are built by the node itself (keep it in the decoder, where input is "
        "untrusted, and in tests), check node ids with one compiled regular expression, and forward by "
        "patching `hops`/`route` in the header instead of re-encoding the payload.",
    ]) + "\n"


# --- main ------------------------------------------------------------------------------------------


def progress(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def machine() -> dict:
    cpu = cpu_model()

    def load() -> str:
        try:
            with open("/proc/loadavg") as f:
                return " ".join(f.read().split()[:3])
        except OSError:
            return "?"

    try:
        code = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=Path(__file__).resolve().parent,
                              capture_output=True, text=True, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        code = "unknown"
    return {"nproc": os.cpu_count(), "cpu": cpu, "code": code, "python": platform.python_version(),
            "impl": platform.python_implementation(), "gevent": gevent.__version__, "openssl": ssl.OPENSSL_VERSION,
            "kernel": platform.release(), "load": load}


def render(sections: List[str], info: dict, argv: List[str], started: datetime.datetime, load_before: str,
           load_after: str, wall_s: float, quick: bool) -> str:
    head = [
        "# Benchmarks",
        "",
        "Figures of `bench/bench_bootstrap.py` (the module docstring says what and how). Regenerate with the "
        "command below; the file is overwritten.",
        "",
        f"- command: `{' '.join(shlex.quote(a) for a in argv)}`" + (" (quick: fewer rounds)" if quick else ""),
        f"- date: {started.strftime('%Y-%m-%d %H:%M UTC')}, wall time {wall_s:.0f} s",
        f"- machine: {info['nproc']} CPUs ({info['cpu']}), Linux {info['kernel']}; shared with other work "
        f"while measuring: load average {load_before} before, {load_after} after",
        f"- software: gridsock at `{info['code']}` (`-dirty`: with uncommitted changes in the tree), "
        f"{info['impl']} {info['python']}, gevent {info['gevent']}, {info['openssl']}",
        "- setup: one process, one gevent hub, no monkey-patching; loopback only; TLS session (mutual TLS "
        "on every link); every case measured in interleaved rounds next to its baseline.",
        "",
    ]
    return "\n".join(head) + "\n" + "\n\n".join(sections) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == [BLOCKING_ECHO_FLAG]:
        run_blocking_echo_server(argv[1], argv[2])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds, N=1000 only (under ~30 s)")
    parser.add_argument("--out", default="docs/benchmarks.md", help="Markdown file to write (default: %(default)s)")
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else FULL
    info = machine()
    started = datetime.datetime.now(datetime.timezone.utc)
    load_before = info["load"]()
    wall = time.perf_counter()
    sections = []
    with tempfile.TemporaryDirectory(prefix="gridsock-bench-") as tmp:
        workdir = Path(tmp)
        progress("starting the grid")
        grid = Grid(workdir)
        blocking = BlockingEcho(grid.session, make_identity(grid.session))
        try:
            progress("1. round trips")
            rtt = bench_rtt(grid, plan, blocking)
            progress("2. throughput")
            stream = bench_stream(grid, plan)
            progress("4. join latency")
            join = bench_join(grid, plan)
            progress("profile")
            prof = bench_profile(grid, plan)
        finally:
            blocking.close()
            grid.stop()
        progress("3. scale")
        scale = bench_scale(workdir, plan)
    sections = [render_rtt(rtt, plan), render_stream(stream, plan), render_scale(scale, plan),
                render_join(join, plan), render_profile(prof, plan)]
    text = render(sections, info, ["python3", "bench/bench_bootstrap.py", *argv], started, load_before,
                  info["load"](), time.perf_counter() - wall, args.quick)
    out = Path(args.out)
    # Other benches append their own "## " sections after ours (bench_data.py): keep them.
    old = out.read_text() if out.exists() else ""
    kept = old.find("\n## Data connections in the lab")
    out.write_text(text.rstrip("\n") + "\n" + (old[kept:] if kept >= 0 else ""))
    print(text)
    progress(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
