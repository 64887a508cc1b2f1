"""A long fuzz campaign against every listener of a running grid: crashes, hangs, memory, log volume.

What it measures
----------------
A grid runs in a child process (TLS session, on loopback): the rendez-vous node with its control
socket, leader L1 of cluster A (control and agent sockets, a front door that passes nothing
through to the system's resolver) and its member m1. This process plays malformed inputs from
:mod:`gridsock.testing.fuzz` against each listener in turn, ``--frames`` of them per listener
(a million by default), a few dozen clients at a time:

- ``rendezvous``, ``nodeport``: one bad input per connection (a handshake reads one frame):
  random bytes, cut, oversized, lying and bad-body frames, mutated frames, half-open clients;
  one in ``TLS_SHARE`` past a TLS handshake, so that it reaches the decoder;
- ``data``: the node port's data path (a preamble that is wrong in every way);
- ``frontdoor``: SOCKS5 and HTTP garbage and the bootstrap cases;
- ``control``, ``agent``: ``Control`` frames whose arguments are wrong, pipelined, many per
  connection (each is answered and the connection goes on), and framing garbage;
- ``routed``: routed messages with wrong payloads on every topic, from an enrolled member over
  one member link to L1 (relinked if the leader cuts it).

Every ``PROBE_EVERY`` inputs a good client must be served within ``PROBE_TIMEOUT_S`` (else: a
hang). Counted per listener: inputs, connections, crashes (the child died), tracebacks (in its
log: a greenlet that died of an exception, or a logged one), hangs (failed probes, and half-closed clients the server had not closed after
``HANG_TIMEOUT_S``), slow closes (after ``READ_TIMEOUT_S``), the child's memory (start, peak, end), the bytes it logged,
and the rate. Loops are bounded by counts and every wait by a timeout.

    nice -n 10 python3 bench/bench_fuzz.py [--frames N] [--listeners a,b] [--seed S] [--out FILE.md]

``--frames 2000`` makes a quick run (seconds per listener).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import os
import platform
import random
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

LISTENERS = ("rendezvous", "nodeport", "data", "frontdoor", "control", "agent", "routed")
CONCURRENCY = 48
BATCH = 1000  # inputs generated (and seeded) at a time
# ... for the listeners that take one connection per input: an engine's batch waits for its
# slowest connection (a SYN that a full accept queue dropped is sent again after 1 s), so more.
ENGINE_BATCH = 10_000
PROBE_EVERY = 20_000
PROBE_TIMEOUT_S = 30.0
READ_TIMEOUT_S = 15.0  # a server slower than this to close after a client's half-close is "slow"
HANG_TIMEOUT_S = 60.0  # one that has not closed after this long hangs
READY_TIMEOUT_S = 60.0
TLS_SHARE = 10  # one input in this many goes past TLS first
FULL_HANDSHAKE_EVERY = 10  # of those, one in this many makes a full handshake; the others resume a session
ENGINE_CONCURRENCY = 64  # connections of the engine at once (one client process, no greenlets)
PIPELINE = 50  # control and agent requests written before their replies are read
ECHO_PORT = 7
SOCKS_HANDSHAKE_TIMEOUT_S = 2.0
NOTES_SHOWN = 8  # distinct notes per listener in the report
MAX_NOTES = 200  # distinct notes kept per listener


# --- the child: the grid under fire ----------------------------------------------------------------


def serve(directory: Path) -> None:
    """Run the grid in this process until SIGTERM; write ``ready.json`` when it is up."""
    import logging

    import gevent

    logging.basicConfig(level=logging.INFO, filename=str(directory / "grid.log"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from gridsock.bootstrap.rendezvous import RendezvousNode
    from gridsock.diag import serve_echo
    from gridsock.frontdoor import FrontDoor
    from gridsock.node import Node
    from gridsock.session import create_session

    session = create_session(directory / "session", "127.0.0.1:7700")
    rv = RendezvousNode(session, listen_address="127.0.0.1:0", control=str(directory / "rv.sock")).start()
    session = dataclasses.replace(session, rendezvous_port=rv.address.port)
    lead = Node(session, "L1", cluster="A", listen_address="127.0.0.1:0", control=str(directory / "L1.sock"),
                agent=str(directory / "L1.agent"), front_door=None, loop="caller").start()
    assert lead.wait_joined(READY_TIMEOUT_S)
    member = Node(session, "m1", cluster="A", leader=str(lead.address), listen_address="127.0.0.1:0",
                  control="", agent="", front_door=None, loop="caller").start()
    assert member.wait_joined(READY_TIMEOUT_S)
    door = FrontDoor(lead, "127.0.0.1:0", pass_through=False, handshake_timeout=SOCKS_HANDSHAKE_TIMEOUT_S).start()
    serve_echo(lead, ECHO_PORT)
    for node in (lead, member):
        node.wait_directory(present=["L1", "m1"], settled=True, timeout=READY_TIMEOUT_S)
    ready = {"rendezvous": [rv.address.host, rv.address.port], "nodeport": [lead.address.host, lead.address.port],
             "frontdoor": [door.address.host, door.address.port], "L1": lead.node_id, "m1": member.node_id,
             "rendezvous_port": rv.address.port}
    (directory / "ready.json.tmp").write_text(json.dumps(ready))
    os.replace(directory / "ready.json.tmp", directory / "ready.json")
    stop = gevent.event.Event()
    gevent.signal_handler(signal.SIGTERM, stop.set)
    stop.wait()
    door.stop()
    member.stop()
    lead.stop()
    rv.stop()


# --- the driver ------------------------------------------------------------------------------------


@dataclasses.dataclass
class Tally:
    listener: str
    inputs: int = 0
    connections: int = 0
    crashes: int = 0
    hangs: int = 0
    unanswered: int = 0
    probes: int = 0
    rss_start: int = 0
    rss_peak: int = 0
    rss_end: int = 0
    log_bytes: int = 0
    tracebacks: int = 0
    seconds: float = 0.0
    tls_handshakes: int = 0  # inputs that went past TLS first
    tls_resumed: int = 0  # of those, handshakes that resumed a session
    connect_failures: int = 0
    server_cpu_s: float = 0.0  # CPU time of the grid's process during the run
    client_cpu_s: float = 0.0  # and of this one (the fuzzing client)
    notes: List[str] = dataclasses.field(default_factory=list)


def _budget(spec: Optional[str], listener: str) -> Optional[float]:
    """Seconds for ``listener`` from ``--seconds`` ("600" for each, or "nodeport=900,control=300,600")."""
    if not spec:
        return None
    default = None
    for part in spec.split(","):
        name, _, value = part.rpartition("=")
        if name == listener:
            return float(value)
        if not name:
            default = float(value)
    return default


class Campaign:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.done: List[Tally] = []
        self.partial: Optional[Tally] = None
        self.dir = Path(tempfile.mkdtemp(prefix="gridsock-fuzz-"))
        self.child: Optional[subprocess.Popen] = None
        self.ready: Dict[str, Any] = {}
        self._engines: Dict[str, Engine] = {}

    # the child

    def start_child(self) -> None:
        self.child = subprocess.Popen([sys.executable, __file__, "--serve", str(self.dir)],
                                      stdout=subprocess.DEVNULL, stderr=open(self.dir / "stderr.log", "wb"))
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not (self.dir / "ready.json").exists():
            if self.child.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the grid did not start: see {self.dir}/stderr.log")
            time.sleep(0.1)
        self.ready = json.loads((self.dir / "ready.json").read_text())
        from gridsock.session import Session

        self.session = Session.load(self.dir / "session" / "session.toml")
        self.session = dataclasses.replace(self.session, rendezvous_port=self.ready["rendezvous_port"])

    def stop_child(self) -> None:
        if self.child is not None and self.child.poll() is None:
            self.child.send_signal(signal.SIGTERM)
            try:
                self.child.wait(30)
            except subprocess.TimeoutExpired:
                self.child.kill()
                self.child.wait(10)
        # The logs stay for a look; the session (its CA key, the nodes' keys) does not.
        shutil.rmtree(self.dir / "session", ignore_errors=True)
        for name in ("rv.sock", "L1.sock", "L1.agent"):
            with contextlib.suppress(OSError):
                os.unlink(self.dir / name)

    def write_json(self) -> None:
        tallies = self.done + ([self.partial] if self.partial is not None else [])
        Path(self.args.json).write_text(json.dumps([dataclasses.asdict(t) for t in tallies], indent=1))

    def rss(self) -> int:
        from gridsock.testing.fuzz import rss_bytes

        try:
            return rss_bytes(self.child.pid)  # type: ignore[union-attr]
        except OSError:
            return 0

    def cpu(self) -> float:
        """CPU seconds (user and system) the grid's process has used so far."""
        try:
            with open(f"/proc/{self.child.pid}/stat") as f:  # type: ignore[union-attr]
                fields = f.read().rpartition(")")[2].split()
        except OSError:
            return 0.0
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def log_size(self) -> int:
        return sum((self.dir / f).stat().st_size for f in ("grid.log", "stderr.log") if (self.dir / f).exists())

    def tracebacks(self) -> int:
        count = 0
        for name in ("grid.log", "stderr.log"):
            path = self.dir / name
            if path.exists():
                with open(path, "rb") as f:
                    count += sum(1 for line in f if line.startswith(b"Traceback"))
        return count

    # connecting

    def address(self, which: str):
        from gridsock.bootstrap.transport import Address

        host, port = self.ready[which]
        return Address(host=host, port=port)

    def tcp(self, which: str) -> Callable[[], Any]:
        from gevent import socket as gsocket

        host, port = self.ready[which]
        return lambda: gsocket.create_connection((host, port), timeout=READY_TIMEOUT_S)

    def tls(self, which: str) -> Callable[[], Any]:
        from gridsock.bootstrap.transport import dial, tls_client
        from gridsock.session import client_context

        context = client_context(self.session, None)
        address = self.address(which)
        return lambda: tls_client(dial(address, timeout=READY_TIMEOUT_S), context, timeout=READY_TIMEOUT_S)

    def unix(self, name: str) -> Callable[[], Any]:
        from gevent import socket as gsocket

        path = str(self.dir / name)

        def connect():
            sock = gsocket.socket(gsocket.AF_UNIX, gsocket.SOCK_STREAM)
            sock.settimeout(READY_TIMEOUT_S)
            sock.connect(path)
            return sock

        return connect

    # probes: a good client of each listener

    def probe(self, listener: str) -> bool:
        import gevent

        try:
            with gevent.Timeout(PROBE_TIMEOUT_S):
                getattr(self, f"_probe_{'control' if listener == 'routed' else listener}")()
            return True
        except BaseException as exc:  # (gevent.Timeout included)
            print(f"  probe of {listener} failed: {exc!r}", file=sys.stderr)
            return False

    def _probe_rendezvous(self) -> None:
        from gridsock import wire
        from gridsock.bootstrap.link import read_message, send_message

        sock = self.tls("rendezvous")()
        try:  # a Hello without credentials is refused, with a Refuse: the port answers
            send_message(sock, wire.Hello(name="probe", cluster=None, role="leader"))
            assert isinstance(read_message(sock, wire.Decoder(), timeout=PROBE_TIMEOUT_S), wire.Refuse)
        finally:
            sock.close()

    def _probe_nodeport(self) -> None:
        from gridsock import wire
        from gridsock.bootstrap.link import read_message, send_message

        sock = self.tls("nodeport")()
        try:
            send_message(sock, wire.Hello(name="probe", cluster="A", role="member"))
            assert isinstance(read_message(sock, wire.Decoder(), timeout=PROBE_TIMEOUT_S), wire.Refuse)
        finally:
            sock.close()

    def _probe_data(self) -> None:
        from gridsock.bootstrap.control import call

        result = call(str(self.dir / "L1.sock"), "ping", {"dst": "m1", "timeout": 10}, timeout=PROBE_TIMEOUT_S)
        assert result["route_there"][-1] == "m1"
        self._probe_nodeport()

    def _probe_frontdoor(self) -> None:
        host, port = self.ready["frontdoor"]
        from gevent import socket as gsocket

        sock = gsocket.create_connection((host, port), timeout=PROBE_TIMEOUT_S)
        try:
            sock.sendall(b"\x05\x01\x00")
            assert _recv_exactly(sock, 2) == b"\x05\x00"
            sock.sendall(b"\x05\x01\x00\x03\x02L1" + struct.pack(">H", ECHO_PORT))
            assert _recv_exactly(sock, 10)[:2] == b"\x05\x00"
            sock.sendall(b"probe")
            assert _recv_exactly(sock, 5) == b"probe"
        finally:
            sock.close()

    def _probe_control(self) -> None:
        from gridsock.bootstrap.control import call

        assert call(str(self.dir / "L1.sock"), "status", timeout=PROBE_TIMEOUT_S)["joined"]
        assert call(str(self.dir / "rv.sock"), "status", timeout=PROBE_TIMEOUT_S)["role"] == "rendezvous"

    def _probe_agent(self) -> None:
        from gridsock import agentwire, wire

        sock = self.unix("L1.agent")()
        try:
            agentwire.send_frame(sock, agentwire.encode_request("resolve", {"host": "m1"}))
            reply, fd = agentwire.recv_message(sock, agentwire.AgentReader(wire.ControlReply))
            assert fd is None and reply.ok and reply.result["name"] == "m1"
        finally:
            sock.close()

    # the runs

    def run(self, listener: str) -> Tally:
        tally = Tally(listener, rss_start=self.rss())
        tally.rss_peak = tally.rss_start
        logged, tracebacks = self.log_size(), self.tracebacks()
        server_cpu, client_cpu = self.cpu(), _own_cpu()
        started = time.monotonic()
        rng = random.Random(f"{self.args.seed}-{listener}")
        runner = getattr(self, f"_run_{listener}" if listener in ("control", "agent", "routed") else "_run_connections")
        next_probe = PROBE_EVERY
        budget = _budget(self.args.seconds, listener)
        while tally.inputs < self.args.frames:
            if budget is not None and time.monotonic() - started > budget:
                tally.notes.append(f"stopped after its time budget of {budget:g} s")
                break
            batch = BATCH if listener in ("control", "agent", "routed") else ENGINE_BATCH
            runner(listener, rng, min(batch, self.args.frames - tally.inputs), tally)
            if len(tally.notes) > MAX_NOTES:  # (distinct ones are kept: the report shows a few)
                tally.notes = sorted(set(tally.notes))[:MAX_NOTES]
            tally.rss_peak = max(tally.rss_peak, self.rss())
            if self.child.poll() is not None:  # type: ignore[union-attr]
                tally.crashes += 1
                tally.notes.append(f"the grid died (exit {self.child.returncode}) after {tally.inputs} inputs")
                break
            if tally.inputs >= next_probe or tally.inputs >= self.args.frames:
                next_probe += PROBE_EVERY
                tally.probes += 1
                if not self.probe(listener):
                    tally.hangs += 1
            if self.args.json:  # (the figures so far, should the run be cut short)
                self.partial = dataclasses.replace(tally, seconds=time.monotonic() - started, rss_end=self.rss())
                self.write_json()
            if self.args.progress:
                rate = tally.inputs / max(time.monotonic() - started, 1e-9)
                print(f"  {listener}: {tally.inputs} inputs, {rate:.0f}/s, rss {self.rss() / 1e6:.0f} MB", end="\r",
                      file=sys.stderr)
        tally.seconds = time.monotonic() - started
        tally.rss_end = self.rss()
        tally.server_cpu_s, tally.client_cpu_s = self.cpu() - server_cpu, _own_cpu() - client_cpu
        tally.log_bytes = self.log_size() - logged
        tally.tracebacks = self.tracebacks() - tracebacks
        return tally

    def _run_connections(self, listener: str, rng: random.Random, count: int, tally: Tally) -> None:
        from gridsock import wire
        from gridsock.testing import fuzz

        tls_every = 0
        if listener == "data":
            # (a well-formed preamble with an unknown token is held by the node for its match
            # timeout whatever the client does: the client closes at once rather than wait)
            cases = [dataclasses.replace(c, mode="close") if len(c.data) >= wire.PREAMBLE_BYTES and c.mode == "half-close"
                     else c for c in fuzz.data_cases(rng, count)]
            target = "nodeport"
        elif listener == "frontdoor":
            cases = _frontdoor_cases(rng, count)
            target = "frontdoor"
        else:
            cases = fuzz.bootstrap_cases(rng, count)
            target, tls_every = listener, TLS_SHARE
        engine = self._engines.get(listener)
        if engine is None:
            def outcome(case, reply: bytes, closed: Optional[bool], waited: float) -> None:
                if closed is False:
                    tally.hangs += 1
                    tally.notes.append(f"not closed within {HANG_TIMEOUT_S:g} s of a half-close: {case.kind} "
                                       f"{case.data[:48]!r} ({len(case.data)} bytes), answered {reply[:48]!r}")
                elif closed and waited > READ_TIMEOUT_S:
                    tally.unanswered += 1
                    tally.notes.append(f"closed {waited:.0f} s after a half-close: {case.kind} {case.data[:48]!r}, "
                                       f"answered {reply[:48]!r}")

            context = session = None
            if tls_every:
                context = _stdlib_tls_context(self.session)
                session = _tls_session(context, tuple(self.ready[target]), timeout=READY_TIMEOUT_S)
            engine = self._engines[listener] = Engine(tuple(self.ready[target]), concurrency=ENGINE_CONCURRENCY,
                                                      outcome=outcome, tls_context=context, session=session)
        before = engine.connections
        engine.run(cases, tls_every)
        tally.connections += engine.connections - before
        tally.tls_handshakes, tally.tls_resumed = engine.tls_cases, engine.resumed
        tally.notes.extend(sorted(set(engine.failed_connects))[:NOTES_SHOWN])
        tally.connect_failures += len(engine.failed_connects)
        engine.failed_connects.clear()
        tally.inputs += len(cases)

    def _run_control(self, listener: str, rng: random.Random, count: int, tally: Tally) -> None:
        from gridsock.testing import fuzz

        half = count // 2
        node = fuzz.control_op_cases(rng, fuzz.NODE_CONTROL_OPS, half)
        rv = fuzz.control_op_cases(rng, fuzz.RENDEZVOUS_CONTROL_OPS, count - half - count // 20)
        garbage = fuzz.control_cases(rng, count // 20)
        self._pipelined(self.unix("L1.sock"), node, tally, agent=False)
        self._pipelined(self.unix("rv.sock"), rv, tally, agent=False)
        self._run_garbage(self.unix("L1.sock"), garbage, tally)

    def _run_agent(self, listener: str, rng: random.Random, count: int, tally: Tally) -> None:
        from gridsock.testing import fuzz

        garbage = fuzz.agent_cases(rng, count // 10)
        requests = fuzz.control_op_cases(rng, {k: v for k, v in fuzz.AGENT_OPS.items() if k != "listen"},
                                         count - len(garbage))
        self._pipelined(self.unix("L1.agent"), requests, tally, agent=True)
        self._run_garbage(self.unix("L1.agent"), garbage, tally)

    def _run_garbage(self, connect: Callable[[], Any], cases: list, tally: Tally) -> None:
        from gevent.pool import Pool

        from gridsock.testing import fuzz

        def one(case) -> None:
            sock = connect()
            tally.connections += 1
            try:
                _, closed = fuzz.send_case(sock, case, read_timeout=READ_TIMEOUT_S)
            except OSError:
                closed = True
            if closed is False:
                tally.unanswered += 1
                tally.hangs += 1

        Pool(CONCURRENCY // 4).map(one, [c for c in cases if c.mode != "hold"])
        tally.inputs += len(cases)

    def _pipelined(self, connect: Callable[[], Any], requests: list, tally: Tally, *, agent: bool) -> None:
        """Write PIPELINE requests, read as many replies, on a few connections at once."""
        from gevent.pool import Pool

        from gridsock import agentwire, wire
        from gridsock.bootstrap.link import read_message

        chunks = [requests[i:i + PIPELINE] for i in range(0, len(requests), PIPELINE)]

        def one(chunk) -> None:
            sock = connect()
            tally.connections += 1
            try:
                sock.sendall(b"".join(wire.encode(m) for m in chunk))
                reader = agentwire.AgentReader(wire.ControlReply) if agent else None
                decoder = wire.Decoder()
                for _ in chunk:
                    if agent:
                        got = agentwire.recv_message(sock, reader)
                        if got is None:
                            raise EOFError("closed")
                        reply, fd = got
                        if fd is not None:
                            os.close(fd)
                    else:
                        reply = read_message(sock, decoder, timeout=READ_TIMEOUT_S)
                    if not isinstance(reply, wire.ControlReply):
                        tally.notes.append(f"unexpected {type(reply).__name__}")
                    elif reply.ok and not agent:
                        tally.notes.append("a bad request was accepted")
            except Exception as exc:
                tally.unanswered += 1
                tally.hangs += 1
                tally.notes.append(f"pipelined requests: {exc!r}"[:200])
            finally:
                sock.close()

        Pool(8).map(one, chunks)
        tally.inputs += len(requests)

    def _run_routed(self, listener: str, rng: random.Random, count: int, tally: Tally) -> None:
        import gevent

        from gridsock import wire
        from gridsock.bootstrap.link import send_message
        from gridsock.testing import fuzz

        link = self._member_link(tally)
        dsts = [self.ready["L1"], self.ready["m1"], "rendezvous", "L1", "m1"]
        messages = fuzz.routed_cases(rng, self._identity.node_id, dsts, count)
        for i, message in enumerate(messages):
            if link["ended"].is_set():
                tally.notes.append(f"the leader closed the member link after {tally.inputs + i} routed inputs")
                link = self._member_link(tally, again=True)
            try:
                link["sock"].sendall(wire.encode(message))
            except OSError:
                link["ended"].set()
            if i % 100 == 99:
                gevent.sleep(0.001)  # (a member that sends at wire speed is the fairness work's test)
        tally.inputs += count
        send_message(link["sock"], wire.Ping(1))

    def _member_link(self, tally: Tally, again: bool = False) -> Dict[str, Any]:
        import gevent
        import gevent.event

        from gridsock import wire
        from gridsock.bootstrap.link import read_message, send_message
        from gridsock.bootstrap.transport import dial, tls_client
        from gridsock.session import client_context

        if getattr(self, "_link", None) is not None and not again:
            return self._link
        if getattr(self, "_link", None) is not None:
            self._link["sock"].close()
        if getattr(self, "_identity", None) is None:
            self._identity = _enroll(self, "fuzzer")
        context = client_context(self.session, self._identity)
        sock = tls_client(dial(self.address("nodeport"), timeout=READY_TIMEOUT_S), context, timeout=READY_TIMEOUT_S)
        send_message(sock, wire.Hello(name="fuzzer", cluster="A", role="member"))
        decoder = wire.Decoder()
        welcome = read_message(sock, decoder, timeout=READY_TIMEOUT_S)
        assert isinstance(welcome, wire.Welcome), welcome
        ended = gevent.event.Event()
        replies = {"count": 0}

        def read() -> None:
            try:
                while True:
                    message = read_message(sock, decoder, timeout=3600)
                    if isinstance(message, wire.Ping):
                        send_message(sock, wire.Pong(message.nonce))
                    replies["count"] += 1
            except Exception:
                ended.set()

        tally.connections += 1
        self._link = {"sock": sock, "ended": ended, "reader": gevent.spawn(read), "replies": replies}
        return self._link


# --- the connection engine: one bad client per connection, without greenlets ------------------------


class _Conn:
    """One case on one connection, as the engine moves it along: ``connecting`` (a non-blocking
    connect), ``tls`` (its handshake, for a case that goes past TLS), ``sending``, then ``reading``
    (a half-close: until the server closes) or done."""

    __slots__ = ("fd", "sock", "case", "state", "out", "got", "began", "deadline", "tls")

    def __init__(self, sock, case, tls: bool, began: float) -> None:
        self.fd = sock.fileno()
        self.sock = sock
        self.case = case
        self.state = "connecting"
        self.out = memoryview(case.data)
        self.got = bytearray()
        self.began = began
        self.deadline = began + HANG_TIMEOUT_S
        self.tls = tls


class Engine:
    """Plays cases that each take one connection (a listener that drops a client after its first
    error: the node and rendez-vous ports, the data path, the front door), ``concurrency`` at a
    time, on non-blocking sockets under one ``selectors`` loop: a few system calls and no greenlet
    per input, so that the client costs less than the listener it feeds.

    A case played with ``tls=True`` goes past a TLS handshake first (``tls_context``, a stdlib
    client context); all but one in ``FULL_HANDSHAKE_EVERY`` of those resume a session that the
    listener gave earlier (TLS session tickets: the bytes after the handshake reach the
    listener's decoder all the same, at a fraction of its cost; ``session`` is fetched by the
    caller, e.g. :func:`_tls_session`). ``outcome(case, reply, closed, waited)`` is called once
    for each case: ``closed`` as :func:`gridsock.testing.fuzz.send_case` gives it (None for the
    "close" and "hold" modes, True once the server closed after a half-close, False if it had not
    within ``HANG_TIMEOUT_S``).
    """

    def __init__(self, address, *, concurrency: int, outcome: Callable[[Any, bytes, Optional[bool], float], None],
                 tls_context=None, session=None) -> None:
        import selectors

        self.address = address
        self.concurrency = concurrency
        self.tls_context = tls_context
        self.session = session
        self.outcome = outcome
        self.selector = selectors.DefaultSelector()
        self.tls_cases = 0
        self.resumed = 0
        self.connections = 0
        self.failed_connects: List[str] = []

    def close(self) -> None:
        self.selector.close()

    def run(self, cases: list, tls_every: int = 0) -> None:
        """Play ``cases`` (one whose index is a multiple of ``tls_every`` goes past TLS); return
        when each has ended (held connections are closed then)."""
        pending = list(enumerate(cases))
        pending.reverse()
        live: Dict[int, _Conn] = {}
        held: List[Any] = []
        next_check = time.monotonic() + 1.0
        try:
            while pending or live:
                while pending and len(live) < self.concurrency:
                    index, case = pending.pop()
                    conn = self._open(case, bool(tls_every) and index % tls_every == 0)
                    if conn is not None:
                        live[conn.fd] = conn
                for key, _ in self.selector.select(0.0 if pending and len(live) < self.concurrency else 1.0):
                    conn = live.get(key.fd)
                    if conn is not None and not self._step(conn, held):
                        self._drop(conn, live)
                now = time.monotonic()
                if now >= next_check:
                    next_check = now + 1.0
                    for conn in [c for c in live.values() if c.deadline < now]:
                        self._report(conn, False)
                        self._drop(conn, live)
        finally:
            for conn in list(live.values()):
                self._drop(conn, live)
            for sock in held:
                sock.close()

    def _open(self, case, tls: bool) -> Optional[_Conn]:
        import errno as errno_
        import selectors

        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        code = sock.connect_ex(self.address)
        if code not in (0, errno_.EINPROGRESS):
            sock.close()
            self.failed_connects.append(f"connect failed: {os.strerror(code)}")
            return None
        self.connections += 1
        conn = _Conn(sock, case, tls, time.monotonic())
        self.selector.register(sock, selectors.EVENT_WRITE)
        return conn

    def _step(self, conn: _Conn, held: list) -> bool:
        """Move ``conn`` on as far as it goes without waiting; False once it has ended (and was
        reported)."""
        import selectors
        import ssl

        try:
            if conn.state == "connecting":
                error = conn.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if error:
                    self.failed_connects.append(f"connect failed: {os.strerror(error)}")
                    self._report(conn, True)
                    return False
                if conn.tls:
                    self.selector.unregister(conn.sock)
                    self.tls_cases += 1
                    session = self.session if self.tls_cases % FULL_HANDSHAKE_EVERY else None
                    conn.sock = self.tls_context.wrap_socket(conn.sock, do_handshake_on_connect=False,
                                                             session=session)
                    self.selector.register(conn.sock, selectors.EVENT_WRITE)
                    conn.state = "tls"
                else:
                    conn.state = "sending"
            if conn.state == "tls":
                try:
                    conn.sock.do_handshake()
                except ssl.SSLWantReadError:
                    self.selector.modify(conn.sock, selectors.EVENT_READ)
                    return True
                except ssl.SSLWantWriteError:
                    self.selector.modify(conn.sock, selectors.EVENT_WRITE)
                    return True
                self.resumed += conn.sock.session_reused
                conn.state = "sending"
                self.selector.modify(conn.sock, selectors.EVENT_WRITE)
            if conn.state == "sending":
                while conn.out:
                    try:
                        conn.out = conn.out[conn.sock.send(conn.out):]
                    except (BlockingIOError, ssl.SSLWantWriteError):
                        return True
                    except ssl.SSLWantReadError:
                        self.selector.modify(conn.sock, selectors.EVENT_READ)
                        return True
                if conn.case.mode == "hold":
                    self.selector.unregister(conn.sock)
                    held.append(conn.sock)
                    conn.sock = None
                    self._report(conn, None)
                    return False
                if conn.case.mode != "half-close":
                    self._report(conn, None)
                    return False
                conn.sock.shutdown(socket.SHUT_WR)  # (on a TLS socket: the TCP half-close, as send_case does)
                conn.state = "reading"
                self.selector.modify(conn.sock, selectors.EVENT_READ)
                return True
            if conn.state == "reading":
                while True:
                    try:
                        chunk = conn.sock.recv(65536)
                    except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
                        return True
                    if not chunk:
                        self._report(conn, True)
                        return False
                    conn.got += chunk
        except (OSError, ValueError):  # (ssl.SSLError included) a reset, a TLS alert: it had heard enough
            self._report(conn, True)
            return False
        return True

    def _report(self, conn: _Conn, closed: Optional[bool]) -> None:
        self.outcome(conn.case, bytes(conn.got), closed, time.monotonic() - conn.began)

    def _drop(self, conn: _Conn, live: Dict[int, _Conn]) -> None:
        live.pop(conn.fd, None)
        if conn.sock is not None:
            with contextlib.suppress(KeyError, ValueError, OSError):
                self.selector.unregister(conn.sock)
            conn.sock.close()
            conn.sock = None


def _stdlib_tls_context(session):
    """A stdlib (not gevent) TLS client context as :func:`gridsock.session.client_context` makes
    one without an identity: the session CA, TLS 1.2 at least, strict X.509 checks."""
    import ssl

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = False
    context.load_verify_locations(cadata=session.ca_cert_pem.decode("ascii"))
    context.verify_flags |= ssl.VERIFY_X509_STRICT
    context.verify_mode = ssl.CERT_REQUIRED
    return context


def _tls_session(context, address, *, timeout: float):
    """A TLS session (with its ticket) from the listener at ``address``: a handshake, a Hello that
    it refuses, its answer read (which takes in the tickets it sent after the handshake)."""
    from gridsock import wire

    with socket.create_connection(address, timeout=timeout) as raw:
        with context.wrap_socket(raw) as sock:
            sock.sendall(wire.encode(wire.Hello(name="fuzz-session", cluster=None, role="leader")))
            with contextlib.suppress(OSError):
                while sock.recv(65536):
                    pass
            return sock.session


def _own_cpu() -> float:
    times = os.times()
    return times.user + times.system


def _enroll(campaign: Campaign, name: str):
    from gridsock import wire
    from gridsock.bootstrap.link import read_message, send_message
    from gridsock.session import Identity, new_node_key

    key_pem, csr_pem = new_node_key()
    sock = campaign.tls("rendezvous")()
    try:
        send_message(sock, wire.Enroll(token=campaign.session.join_token, csr_pem=csr_pem.decode(), name=name))
        reply = read_message(sock, wire.Decoder(), timeout=READY_TIMEOUT_S)
    finally:
        sock.close()
    assert isinstance(reply, wire.Enrolled), reply
    return Identity(reply.cert_pem.encode(), key_pem)


def _frontdoor_cases(rng: random.Random, count: int):
    """SOCKS5 and HTTP garbage (names unknown to the grid: the door passes nothing through)."""
    from gridsock.testing import fuzz

    good_socks = b"\x05\x01\x00\x05\x01\x00\x03\x02L1" + struct.pack(">H", ECHO_PORT)
    good_http = b"GET http://L1:9/ HTTP/1.1\r\nHost: L1:9\r\n\r\n"  # (nothing listens on L1:9: a request a mutation left valid is refused, 502)
    makers = [
        lambda: fuzz.Case(b"\x05" + rng.randbytes(rng.randrange(0, 300)), kind="socks-random"),
        lambda: fuzz.Case(good_socks[:rng.randrange(1, len(good_socks))], kind="socks-cut"),
        lambda: fuzz.Case(good_http[:rng.randrange(1, len(good_http) - 1)], kind="http-cut"),
        lambda: fuzz.Case(bytes(rng.randrange(256) if rng.random() < 0.05 else b for b in good_http), kind="http-mutated"),
        lambda: fuzz.Case(b"GET http://x/ HTTP/1.1\r\nX: " + b"y" * rng.randrange(100, 70_000), kind="http-long"),
    ]
    cases = [rng.choice(makers)() for _ in range(count - count // 4)] + fuzz.bootstrap_cases(rng, count // 4)
    return [dataclasses.replace(c, mode="half-close" if rng.random() < 0.3 else c.mode if c.mode != "half-close"
                                else "close") for c in cases]


def _recv_exactly(sock, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise EOFError(f"closed after {len(data)} of {n} bytes")
        data += chunk
    return bytes(data)


def report(tallies: List[Tally], args: argparse.Namespace) -> str:
    from _machine import cpu_model

    lines = [
        f"### Fuzz campaign ({datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC)",
        "",
        f"`python3 bench/bench_fuzz.py --frames {args.frames} --seed {args.seed}` on {cpu_model()}, "
        f"{os.cpu_count()} cores, Python {platform.python_version()} (under nice, the machine shared). "
        f"One grid in a child process (TLS session: rendez-vous node, leader L1 with control and agent "
        f"sockets and a front door, member m1); inputs from gridsock/testing/fuzz.py, {CONCURRENCY} clients "
        f"at a time; a good client probed every {PROBE_EVERY} inputs.",
        "",
        "| listener | inputs | connections | crashes | tracebacks | hangs | slow closes | memory start / peak / end (MB) | logged (KB) | inputs/s |",
        "|---|---:|---:|---:|---:|---:|---:|---|---:|---:|",
    ]
    for t in tallies:
        lines.append(f"| {t.listener} | {t.inputs:,} | {t.connections:,} | {t.crashes} | {t.tracebacks} | {t.hangs} | {t.unanswered} | "
                     f"{t.rss_start / 1e6:.0f} / {t.rss_peak / 1e6:.0f} / {t.rss_end / 1e6:.0f} | "
                     f"{t.log_bytes / 1e3:.0f} | {t.inputs / max(t.seconds, 1e-9):,.0f} |")
    notes = [f"- {t.listener}: {n}" for t in tallies for n in sorted(set(t.notes))[:NOTES_SHOWN]]
    if notes:
        lines += ["", "Notes:", *notes]
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--frames", type=int, default=1_000_000, help="inputs per listener")
    parser.add_argument("--seconds", help="time budget per listener: SECONDS, or LISTENER=SECONDS,... (a default last)")
    parser.add_argument("--listeners", default=",".join(LISTENERS))
    parser.add_argument("--seed", default="16")
    parser.add_argument("--out", help="write the Markdown report here too")
    parser.add_argument("--json", help="write the figures as JSON here")
    parser.add_argument("--progress", action="store_true")
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        serve(Path(args.serve))
        return 0
    listeners = [name for name in args.listeners.split(",") if name]
    unknown = set(listeners) - set(LISTENERS)
    if unknown:
        parser.error(f"unknown listeners {sorted(unknown)} (known: {', '.join(LISTENERS)})")
    campaign = Campaign(args)
    campaign.start_child()
    tallies = []
    try:
        for listener in listeners:
            tally = campaign.run(listener)
            tallies.append(tally)
            campaign.done.append(tally)
            campaign.partial = None
            print(f"{listener}: {tally.inputs} inputs in {tally.seconds:.0f} s, crashes {tally.crashes}, tracebacks "
                  f"{tally.tracebacks}, hangs "
                  f"{tally.hangs}, rss {tally.rss_start / 1e6:.0f}/{tally.rss_peak / 1e6:.0f}/{tally.rss_end / 1e6:.0f} MB, "
                  f"logged {tally.log_bytes / 1e3:.0f} KB", file=sys.stderr, flush=True)
            if args.json:
                campaign.write_json()
    finally:
        campaign.stop_child()
    text = report(tallies, args)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    print(f"(the grid's logs: {campaign.dir})", file=sys.stderr)
    return 1 if any(t.crashes or t.tracebacks or t.hangs for t in tallies) else 0


if __name__ == "__main__":
    sys.exit(main())
