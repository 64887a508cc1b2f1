"""A bounded fuzz run of every listener of a running grid: bad input is a logged line, not a traceback.

One grid on loopback, in this process, under gevent (TLS session): the rendez-vous node (with
its control socket), leader L1 of cluster A (control and agent sockets, front door) and its
member m1. For each listener, a few hundred bad clients (gridsock.testing.fuzz: random bytes,
frames cut short, oversized and lying length fields, valid headers with bad bodies, mutated
frames, operations with arguments of every wrong type, descriptors where none belongs,
half-open connections), a few dozen at a time, then:

- the listener still serves a good client (a node joins, a data connection carries bytes, a
  control or agent call is answered, a SOCKS5 client reaches a grid port);
- nothing logged a traceback and no greenlet died of an exception;
- what the bad clients made the listener log stayed within its rate limit (gridsock._ratelog);
- the process's memory grew by less than ``MEMORY_MARGIN_BYTES``.

The long campaign (a million frames per listener) is bench/bench_fuzz.py; the front door's own
protocol fuzz (SOCKS5 and HTTP answers) is in tests/test_frontdoor.py, whose cases run here too.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import random
import struct
from typing import Any, Callable, Dict, Iterator, List

import gevent
import gevent.event
import pytest
from gevent import socket as gsocket
from gevent.pool import Pool

from gridsock import agentwire, wire
from gridsock._ratelog import LINE_BURST
from gridsock.bootstrap.control import call as control_call
from gridsock.bootstrap.link import read_message, send_message
from gridsock.bootstrap.rendezvous import RendezvousNode
from gridsock.bootstrap.transport import dial, tls_client
from gridsock.diag import serve_echo
from gridsock.node import Node
from gridsock.session import Identity, client_context, create_session, new_node_key
from gridsock.testing import fuzz

pytestmark = pytest.mark.timeout(180)

# Joining, settling and answering on a loaded 2-core machine: bounds that only stop a broken
# grid from hanging the test.
READY_TIMEOUT_S = 30.0
# How long a bad client that half-closed waits for the server to close (a server that neither
# answers nor closes a connection whose client has gone is a hang, counted by the bench).
CASE_READ_TIMEOUT_S = 12.0
# Bad clients at once, and cases per listener (a few seconds each).
CONCURRENCY = 64
CASES_PER_LISTENER = 300
# The process's memory may grow by this much over one listener's run (buffers, greenlets,
# allocator slack); a listener that kept what bad clients sent would grow by far more.
MEMORY_MARGIN_BYTES = 64 * 1024 * 1024
ECHO_PORT = 7
# The fuzzed front door drops a client whose request is not complete after this long.
DOOR_HANDSHAKE_TIMEOUT_S = 2.0
FRONT_DOOR_CASES = 120
SEED = 16


@pytest.fixture(scope="module")
def grid(tmp_path_factory) -> Iterator[Dict[str, Any]]:
    work = tmp_path_factory.mktemp("fz")
    session = create_session(work / "session", "127.0.0.1:7700")
    rv = RendezvousNode(session, listen_address="127.0.0.1:0", control=str(work / "rv.sock")).start()
    session = dataclasses.replace(session, rendezvous_port=rv.address.port)
    nodes: List[Node] = []
    try:
        lead = Node(session, "L1", cluster="A", listen_address="127.0.0.1:0", control=str(work / "L1.sock"),
                    agent=str(work / "L1.agent"), front_door="127.0.0.1:0", loop="caller").start()
        nodes.append(lead)
        assert lead.wait_joined(READY_TIMEOUT_S)
        member = Node(session, "m1", cluster="A", leader=str(lead.address), listen_address="127.0.0.1:0",
                      control="", agent="", front_door=None, loop="caller").start()
        nodes.append(member)
        assert member.wait_joined(READY_TIMEOUT_S)
        for node in nodes:
            node.wait_directory(present=["L1", "m1"], settled=True, timeout=READY_TIMEOUT_S)
        echo = serve_echo(lead, ECHO_PORT)
        try:
            yield {"session": session, "rv": rv, "L1": lead, "m1": member, "work": work}
        finally:
            echo.kill()
    finally:
        for node in reversed(nodes):
            node.stop()
        rv.stop()


# --- what every run checks ---------------------------------------------------------------------


class Watch(logging.Handler):
    """Tracebacks (logged, or of greenlets that died) and log records, per logger."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.tracebacks: List[str] = []
        self.records: List[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        if record.exc_info:
            self.tracebacks.append(f"{record.name} logged a traceback: {record.getMessage()}")

    def count(self, logger: str) -> int:
        return sum(1 for r in self.records if r.name == logger)


@contextlib.contextmanager
def watched(monkeypatch) -> Iterator[Watch]:
    watch = Watch()
    hub = gevent.get_hub()
    print_exception = hub.print_exception

    def record(context, type_, value, tb):
        watch.tracebacks.append(f"greenlet {context!r} died: {type_.__name__}: {value}")
        print_exception(context, type_, value, tb)

    monkeypatch.setattr(hub, "print_exception", record)
    root = logging.getLogger("gridsock")
    level = root.level
    root.setLevel(logging.INFO)  # (so that the rate limits of INFO lines are exercised too)
    root.addHandler(watch)
    try:
        yield watch
    finally:
        root.removeHandler(watch)
        root.setLevel(level)


def run_cases(connect: Callable[[], Any], cases: List[fuzz.Case]) -> Dict[str, int]:
    """Play ``cases`` against the listener ``connect()`` reaches, CONCURRENCY at a time; the
    half-open ones stay open until all are played. Fails if the server left a client that
    half-closed neither answered nor closed within CASE_READ_TIMEOUT_S (a hang)."""
    held: List[Any] = []
    unanswered = []

    def one(case: fuzz.Case) -> None:
        _, closed = fuzz.send_case(connect(), case, read_timeout=CASE_READ_TIMEOUT_S, held=held)
        if closed is False:
            unanswered.append(case)

    try:
        Pool(CONCURRENCY).map(one, cases)
    finally:
        for sock in held:
            sock.close()
    assert not unanswered, [(c.kind, c.data[:40]) for c in unanswered[:10]]
    return {"cases": len(cases), "unanswered": len(unanswered)}


def check_log_volume(watch: Watch, logger: str) -> None:
    """What the bad clients made ``logger`` write so far: a burst (all clients are 127.0.0.1, one
    key), a line that tells how many were suppressed, a summary: a handful of lines."""
    lines = [r.getMessage() for r in watch.records if r.name == logger]
    assert len(lines) <= LINE_BURST + 3, (logger, len(lines), lines[:40])


def check_after(watch: Watch, rss_before: int) -> None:
    assert not watch.tracebacks, "\n".join(watch.tracebacks[:20])
    grown = fuzz.rss_bytes() - rss_before
    assert grown < MEMORY_MARGIN_BYTES, f"memory grew by {grown / 1e6:.0f} MB"


def tcp_connect(address) -> Callable[[], Any]:
    return lambda: gsocket.create_connection((address.host, address.port), timeout=READY_TIMEOUT_S)


def tls_connect(grid, address) -> Callable[[], Any]:
    """Connections that complete TLS (no client certificate) first: the cases reach the decoder."""
    context = client_context(grid["session"], None)
    return lambda: tls_client(dial(address, timeout=READY_TIMEOUT_S), context, timeout=READY_TIMEOUT_S)


def unix_connect(path: str) -> Callable[[], Any]:
    def connect():
        sock = gsocket.socket(gsocket.AF_UNIX, gsocket.SOCK_STREAM)
        sock.connect(path)
        return sock

    return connect


def rng() -> random.Random:
    return random.Random(SEED)


# --- the good clients --------------------------------------------------------------------------


def a_node_joins(grid, **kwargs) -> None:
    """A node joins (its handshake crosses the rendez-vous port, and the leader's node port for a
    member), is seen by L1, and leaves."""
    name = kwargs.pop("name")
    node = Node(grid["session"], name, listen_address="127.0.0.1:0", control="", agent="", front_door=None,
                loop="caller", **kwargs).start()
    try:
        assert node.wait_joined(READY_TIMEOUT_S), f"{name} did not join"
        grid["L1"].wait_directory(present=[name], timeout=READY_TIMEOUT_S)
        assert node.ping("L1", timeout=READY_TIMEOUT_S).route_there[-1] == "L1"
    finally:
        node.stop()


def data_flows(grid) -> None:
    """m1 opens a new data connection to L1's node port (plain tcp) and echoes bytes through it."""
    stream, info = grid["m1"].open_stream("L1", ECHO_PORT, stack="tcp", timeout=READY_TIMEOUT_S)
    try:
        data = os.urandom(100_000)
        stream.send_all(data)
        got = bytearray()
        with gevent.Timeout(READY_TIMEOUT_S):
            while len(got) < len(data):
                chunk = stream.receive_some(65536)
                assert chunk, "the echo ended early"
                got += chunk
        assert bytes(got) == data
    finally:
        stream.close()


# --- the listeners -----------------------------------------------------------------------------


def test_rendezvous_port(grid, monkeypatch):
    address = grid["rv"].address
    cases = fuzz.bootstrap_cases(rng(), CASES_PER_LISTENER)
    rss = fuzz.rss_bytes()
    with watched(monkeypatch) as watch:
        run_cases(tcp_connect(address), cases[: CASES_PER_LISTENER // 3])  # the TLS layer
        run_cases(tls_connect(grid, address), cases[CASES_PER_LISTENER // 3:])  # the decoder, past TLS
        check_log_volume(watch, "gridsock.bootstrap.rendezvous")
        a_node_joins(grid, name="late-leader", cluster="Z")
    check_after(watch, rss)


def test_node_port_handshakes(grid, monkeypatch):
    address = grid["L1"].address
    cases = fuzz.bootstrap_cases(rng(), CASES_PER_LISTENER)
    rss = fuzz.rss_bytes()
    with watched(monkeypatch) as watch:
        run_cases(tcp_connect(address), cases[: CASES_PER_LISTENER // 3])
        run_cases(tls_connect(grid, address), cases[CASES_PER_LISTENER // 3:])
        check_log_volume(watch, "gridsock.bootstrap.nodeport")
        a_node_joins(grid, name="late-member", cluster="A", leader=str(address))
        data_flows(grid)
    check_after(watch, rss)


def test_node_port_data_path(grid, monkeypatch):
    address = grid["L1"].address
    cases = fuzz.data_cases(rng(), CASES_PER_LISTENER)
    rss = fuzz.rss_bytes()
    with watched(monkeypatch) as watch:
        run_cases(tcp_connect(address), cases)
        check_log_volume(watch, "gridsock.bootstrap.nodeport")
        data_flows(grid)
    check_after(watch, rss)
    refused = [r.getMessage() for r in watch.records if r.name == "gridsock.assembly" and "refused data" in r.getMessage()]
    # The assembler's "refused data connection" lines are rate-limited per peer host.
    assert len(refused) <= LINE_BURST + 3, f"{len(refused)} refused-connection lines logged"


# Data connections with tokens nobody asked for, each closed while the node waits for its
# request (the fuzz campaign's data path grew by 40 MB over a million such inputs).
EARLY_CLOSED_CONNECTIONS = 200


def test_a_data_connection_that_closes_while_its_token_is_awaited_leaves_nothing_behind(grid, monkeypatch):
    assembler = grid["L1"].assembler
    address = grid["L1"].address
    before = len(assembler._registered)
    with watched(monkeypatch) as watch:
        for _ in range(EARLY_CLOSED_CONNECTIONS):
            sock = gsocket.create_connection((address.host, address.port), timeout=READY_TIMEOUT_S)
            sock.sendall(wire.encode_preamble(os.urandom(wire.TOKEN_BYTES), 0))
            sock.close()
        # Each waits until the node sees its close; then none waits any more.
        with gevent.Timeout(READY_TIMEOUT_S, AssertionError(f"{assembler._early} still wait")):
            while assembler._early or len(watch.records) < 1:
                gevent.sleep(0.05)
    assert len(assembler._registered) <= before, f"{len(assembler._registered) - before} tokens left behind"
    assert not watch.tracebacks, "\n".join(watch.tracebacks[:20])
    data_flows(grid)  # (and a real data connection still goes through)


@pytest.mark.parametrize("which", ["node", "rendezvous"])
def test_control_socket(grid, monkeypatch, which):
    path = str(grid["work"] / ("L1.sock" if which == "node" else "rv.sock"))
    ops = fuzz.NODE_CONTROL_OPS if which == "node" else fuzz.RENDEZVOUS_CONTROL_OPS
    r = rng()
    cases = fuzz.control_cases(r, CASES_PER_LISTENER // 2)
    requests = fuzz.control_op_cases(r, ops, CASES_PER_LISTENER // 2)
    rss = fuzz.rss_bytes()
    refused: List[str] = []

    def bad_request(message: wire.Control) -> None:
        sock = unix_connect(path)()
        try:
            send_message(sock, message)
            reply = read_message(sock, wire.Decoder(), timeout=READY_TIMEOUT_S)
        finally:
            sock.close()
        assert isinstance(reply, wire.ControlReply), reply
        if reply.ok:
            refused.append(f"{message.op} {message.args!r} was accepted")
        assert reply.error or reply.ok

    with watched(monkeypatch) as watch:
        run_cases(unix_connect(path), cases)
        Pool(CONCURRENCY).map(bad_request, requests)
        assert control_call(path, "status", timeout=READY_TIMEOUT_S)["name"] == ("L1" if which == "node" else "rendezvous")
        check_log_volume(watch, "gridsock.bootstrap.control")  # (the drops are rate-limited)
    assert not refused, refused[:10]  # every request had a bad argument: each got an error, not a run
    check_after(watch, rss)


def test_agent_socket(grid, monkeypatch):
    path = str(grid["work"] / "L1.agent")
    cases = fuzz.agent_cases(rng(), CASES_PER_LISTENER)
    rss = fuzz.rss_bytes()
    with watched(monkeypatch) as watch:
        run_cases(unix_connect(path), cases)
        sock = unix_connect(path)()
        try:
            agentwire.send_frame(sock, agentwire.encode_request("resolve", {"host": "m1"}))
            reply, fd = agentwire.recv_message(sock, agentwire.AgentReader(wire.ControlReply))
        finally:
            sock.close()
        assert fd is None and reply.ok and reply.result["name"] == "m1"
        check_log_volume(watch, "gridsock.agent")  # (the drops are rate-limited)
    check_after(watch, rss)


@pytest.fixture
def door(grid):
    """A front door of L1's that does not pass names it does not know through to the system's
    resolver (the cases hold random names: none may leave this machine as a DNS query)."""
    from gridsock.frontdoor import FrontDoor

    front = FrontDoor(grid["L1"], "127.0.0.1:0", pass_through=False, handshake_timeout=DOOR_HANDSHAKE_TIMEOUT_S).start()
    try:
        yield front
    finally:
        front.stop()


def test_front_door(grid, door, monkeypatch):
    from test_frontdoor import fuzz_cases  # the front door's own cases: SOCKS5 and HTTP

    address = door.address
    # A sample (test_frontdoor.py plays them all).
    own = random.Random(SEED).sample(fuzz_cases(random.Random(SEED)), FRONT_DOOR_CASES)
    cases = [fuzz.Case(data, "half-close" if half else "close") for data, half in own]
    cases += fuzz.bootstrap_cases(rng(), FRONT_DOOR_CASES // 3)  # (and what the other ports get)
    rss = fuzz.rss_bytes()
    with watched(monkeypatch) as watch:
        run_cases(tcp_connect(address), cases)
        check_log_volume(watch, "gridsock.frontdoor")
        assert socks_echo(address, "L1") == b"\x05\x00"
    check_after(watch, rss)


def test_front_door_asks_the_kernel_for_its_client_socket_not_for_the_whole_table(grid, door, monkeypatch):
    """Whose is a loopback client? One sock_diag lookup by its addresses, not a read of all of
    /proc/net/tcp: with thousands of sockets in the table (a flood's TIME_WAIT ones) each read
    took 36 ms, and the front door served 43 new clients a second (the fuzz campaign's
    finding). Here every read of the table fails the test, and the door still trusts its own
    user's clients and drops the bad ones."""
    from gridsock import frontdoor, procnet

    if not frontdoor._diag_usable:
        pytest.skip("sock_diag is not available here: the front door reads /proc/net/tcp")
    reads: List[str] = []

    def no_table(**kwargs):
        reads.append(repr(kwargs))
        raise AssertionError("the front door read the kernel's whole TCP table")

    monkeypatch.setattr(procnet, "tcp_sockets", no_table)
    with watched(monkeypatch) as watch:
        run_cases(tcp_connect(door.address), fuzz.bootstrap_cases(rng(), FRONT_DOOR_CASES // 3))
        assert socks_echo(door.address, "L1") == b"\x05\x00"  # (trusted: its user was known)
    assert not reads, reads[:3]
    assert not watch.tracebacks, "\n".join(watch.tracebacks[:20])
    assert frontdoor._diag_usable


def test_sock_diag_and_the_tcp_table_agree_on_a_socket_of_another_user():
    """The uid that sock_diag gives for a client socket is its owner's, as /proc/net/tcp says:
    nobody's socket (a shell's /dev/tcp, run with setpriv) is not taken for root's."""
    import shutil
    import subprocess

    from gridsock import frontdoor

    if os.geteuid() != 0 or not shutil.which("setpriv") or not shutil.which("bash"):
        pytest.skip("needs root and setpriv to act as another user")
    if not frontdoor._diag_usable:
        pytest.skip("sock_diag is not available here")
    nobody = 65534
    listener = gsocket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    port = listener.getsockname()[1]
    client = subprocess.Popen(
        ["setpriv", f"--reuid={nobody}", f"--regid={nobody}", "--clear-groups", "bash", "-c",
         f"exec 3<>/dev/tcp/127.0.0.1/{port} && read -r line"],
        stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        with gevent.Timeout(READY_TIMEOUT_S):
            sock, peer = listener.accept()
        try:
            here = listener.getsockname()
            assert frontdoor._diag_tcp_socket(peer, here) == frontdoor._proc_tcp_socket(peer, here)
            assert frontdoor.socket_uid(peer, here) == nobody
            assert "uid 65534" in (frontdoor.client_untrusted(peer, here) or "")
            assert frontdoor.socket_uid(sock.getsockname(), peer) == os.geteuid()  # (our end)
            assert frontdoor.socket_uid(peer, ("127.0.0.1", 1)) is None  # (no such connection)
        finally:
            sock.close()
    finally:
        listener.close()
        client.stdin.close()  # type: ignore[union-attr]
        client.wait(READY_TIMEOUT_S)
        client.stderr.close()  # type: ignore[union-attr]


# Ports of digits that are not ASCII ("9²": str.isdigit() says yes, int() says no): the fuzz
# campaign's mutated HTTP requests made the front door log a traceback for each.
NON_ASCII_DIGIT_REQUESTS = (
    b"GET http://L1:9\xb2/ HTTP/1.1\r\nHost: L1:9\r\n\r\n",
    b"GET http://L1:\xb9/ HTTP/1.1\r\nHost: L1\r\n\r\n",
    b"CONNECT L1:\xb3 HTTP/1.1\r\nHost: L1\r\n\r\n",
)


def test_front_door_answers_a_port_of_non_ascii_digits_with_400(grid, door, monkeypatch):
    with watched(monkeypatch) as watch:
        for request in NON_ASCII_DIGIT_REQUESTS:
            reply, closed = fuzz.send_case(tcp_connect(door.address)(), fuzz.Case(request, "half-close"),
                                           read_timeout=CASE_READ_TIMEOUT_S)
            assert closed and reply.startswith(b"HTTP/1.1 400 "), (request, reply[:80])
    assert not watch.tracebacks, "\n".join(watch.tracebacks[:20])


# Names that fail in the resolver's IDNA encoding, on this machine, before any query is sent.
UNRESOLVABLE_NAMES = ("a" * 64, "b" * 255, "a..b", "x." + "y" * 70)


def test_front_door_passing_through_an_unresolvable_name_logs_no_traceback(grid, monkeypatch):
    from gridsock.frontdoor import FrontDoor

    front = FrontDoor(grid["L1"], "127.0.0.1:0", pass_through=True).start()
    try:
        with watched(monkeypatch) as watch:
            for name in UNRESOLVABLE_NAMES:
                reply = socks_echo(front.address, name)
                assert reply[:1] == b"\x05" and reply[1:2] != b"\x00", (name, reply)
        assert not watch.tracebacks, "\n".join(watch.tracebacks)
    finally:
        front.stop()


def socks_echo(address, host: str) -> bytes:
    """A SOCKS5 client asks for ``host``:ECHO_PORT; on success, bytes go through and come back.
    Returns the first two bytes of the server's reply (b"\\x05\\x00": connected)."""
    sock = gsocket.create_connection((address.host, address.port), timeout=READY_TIMEOUT_S)
    try:
        sock.sendall(b"\x05\x01\x00")
        assert recv_exactly(sock, 2) == b"\x05\x00"
        name = host.encode()
        sock.sendall(b"\x05\x01\x00\x03" + bytes([len(name)]) + name + struct.pack(">H", ECHO_PORT))
        head = recv_exactly(sock, 2)
        if head != b"\x05\x00":
            return head
        recv_exactly(sock, 8)  # (the rest of the reply: an IPv4 address and a port)
        sock.sendall(b"through the front door")
        assert recv_exactly(sock, 22) == b"through the front door"
        return head
    finally:
        sock.close()


def recv_exactly(sock, n: int) -> bytes:
    data = bytearray()
    with gevent.Timeout(READY_TIMEOUT_S):
        while len(data) < n:
            chunk = sock.recv(n - len(data))
            assert chunk, f"closed after {len(data)} of {n} bytes"
            data += chunk
    return bytes(data)


# --- routed operations, from an enrolled member ------------------------------------------------


def enroll(grid, name: str) -> Identity:
    key_pem, csr_pem = new_node_key()
    sock = tls_connect(grid, grid["rv"].address)()
    try:
        send_message(sock, wire.Enroll(token=grid["session"].join_token, csr_pem=csr_pem.decode(), name=name))
        reply = read_message(sock, wire.Decoder(), timeout=READY_TIMEOUT_S)
    finally:
        sock.close()
    assert isinstance(reply, wire.Enrolled), reply
    return Identity(reply.cert_pem.encode(), key_pem)


# Every topic x destination x payload as a request once, then at random.
ROUTED_CASES = 800


def rendezvous_enroll_too_deep(message: wire.Routed) -> bool:
    """Enroll requests nested too deep: they have a test of their own below."""
    deep = message.payload.count(b"[") > 500 or message.payload.count(b"{") > 500
    return message.dst == "rendezvous" and message.topic == "enroll" and deep


def member_link(grid, name: str):
    """An enrolled member's link to L1, driven by hand: ``(identity, socket, decoder)``."""
    identity = enroll(grid, name)
    context = client_context(grid["session"], identity)
    sock = tls_client(dial(grid["L1"].address, timeout=READY_TIMEOUT_S), context, timeout=READY_TIMEOUT_S)
    decoder = wire.Decoder()
    send_message(sock, wire.Hello(name=name, cluster="A", role="member"))
    welcome = read_message(sock, decoder, timeout=READY_TIMEOUT_S)
    assert isinstance(welcome, wire.Welcome), welcome
    return identity, sock, decoder


def test_a_routed_enroll_request_nested_too_deep_is_answered_with_an_error(grid, monkeypatch):
    identity, sock, decoder = member_link(grid, "deep")
    try:
        answers: List[wire.Routed] = []

        def read() -> None:
            while True:
                message = read_message(sock, decoder, timeout=3600)
                if isinstance(message, wire.Ping):
                    send_message(sock, wire.Pong(message.nonce))
                elif isinstance(message, wire.Routed) and message.request_id == 99:
                    answers.append(message)

        reader = gevent.spawn(read)
        with watched(monkeypatch) as watch:
            send_message(sock, wire.Routed(src=identity.node_id, dst="rendezvous", kind="req", topic="enroll",
                                           request_id=99, route=("deep",), payload=b"[" * 3000))
            with gevent.Timeout(READY_TIMEOUT_S, AssertionError("no answer")):
                while not answers and not watch.tracebacks:  # (a traceback: no answer will come)
                    gevent.sleep(0.05)
        reader.kill()
        assert not watch.tracebacks, "\n".join(watch.tracebacks)
        assert answers[0].kind == "err"
    finally:
        sock.close()


# A member that says it leaves, again and again (the fuzz campaign's routed run: 15,000 lines).
LEAVE_REQUESTS = 60


def test_a_member_saying_it_leaves_again_and_again_is_logged_within_the_rate_limit(grid, monkeypatch):
    identity, sock, decoder = member_link(grid, "leaver")
    try:
        with gevent.Timeout(READY_TIMEOUT_S, AssertionError("the member never reached the rendez-vous directory")):
            while grid["rv"].directory.get(identity.node_id) is None:
                gevent.sleep(0.05)
        answers: List[wire.Routed] = []

        def read() -> None:
            while True:
                message = read_message(sock, decoder, timeout=3600)
                if isinstance(message, wire.Ping):
                    send_message(sock, wire.Pong(message.nonce))
                elif isinstance(message, wire.Routed) and message.topic == "gridsock.leave":
                    answers.append(message)

        reader = gevent.spawn(read)
        try:
            with watched(monkeypatch) as watch:
                for i in range(LEAVE_REQUESTS):
                    send_message(sock, wire.Routed(src=identity.node_id, dst="rendezvous", kind="req",
                                                   topic="gridsock.leave", request_id=1000 + i, route=("leaver",),
                                                   payload=b""))
                with gevent.Timeout(READY_TIMEOUT_S, AssertionError(f"{len(answers)} answers")):
                    while len(answers) < LEAVE_REQUESTS:
                        gevent.sleep(0.05)
                check_log_volume(watch, "gridsock.bootstrap.rendezvous")
        finally:
            reader.kill()
        assert not watch.tracebacks, "\n".join(watch.tracebacks)
    finally:
        sock.close()


def test_routed_operations(grid, monkeypatch):
    identity = enroll(grid, "fuzzer")
    context = client_context(grid["session"], identity)
    sock = tls_client(dial(grid["L1"].address, timeout=READY_TIMEOUT_S), context, timeout=READY_TIMEOUT_S)
    decoder = wire.Decoder()
    ended = gevent.event.Event()
    replies: List[wire.Routed] = []
    try:
        send_message(sock, wire.Hello(name="fuzzer", cluster="A", role="member"))
        welcome = read_message(sock, decoder, timeout=READY_TIMEOUT_S)
        assert isinstance(welcome, wire.Welcome), welcome

        def read() -> None:  # answer the leader's pings, keep what comes back
            try:
                while True:
                    message = read_message(sock, decoder, timeout=3600)
                    if isinstance(message, wire.Ping):
                        send_message(sock, wire.Pong(message.nonce))
                    elif isinstance(message, wire.Routed):
                        replies.append(message)
            except Exception:
                ended.set()

        reader = gevent.spawn(read)
        grid["m1"].wait_directory(present=["fuzzer"], timeout=READY_TIMEOUT_S)
        dsts = [grid["L1"].node_id, grid["m1"].node_id, "rendezvous", "L1", "m1"]
        messages = fuzz.routed_cases(rng(), identity.node_id, dsts, ROUTED_CASES, skip=rendezvous_enroll_too_deep)
        rss = fuzz.rss_bytes()
        with watched(monkeypatch) as watch:
            for i, message in enumerate(messages):
                send_message(sock, message)
                if i % 50 == 49:
                    gevent.sleep(0)  # (let the nodes work: a member may send this fast)
            # The link is still up (bad payloads are answered, not punished by a drop), the
            # requests got answers, and the grid still works.
            for src, dst in (("m1", "L1"), ("L1", "m1"), ("m1", "rendezvous")):
                assert grid[src].ping(dst, timeout=READY_TIMEOUT_S).route_there[-1] == dst
            send_message(sock, wire.Routed(src=identity.node_id, dst="L1", kind="req", topic="ping", request_id=424242,
                                           route=("fuzzer",)))
            with gevent.Timeout(READY_TIMEOUT_S, AssertionError("no answer to a good request after the fuzz")):
                while not any(r.request_id == 424242 and r.kind == "rep" for r in replies):
                    assert not ended.is_set(), "the leader dropped the fuzzing member's link"
                    gevent.sleep(0.05)
        assert any(r.kind == "err" for r in replies)  # the bad requests were answered with errors
        check_after(watch, rss)
        reader.kill()
    finally:
        sock.close()


# --- the argument checks themselves ------------------------------------------------------------


def test_control_args_accept_good_values_and_name_the_bad_argument():
    from gridsock.bootstrap.control import ControlArgs
    from gridsock.errors import ConfigError

    args = ControlArgs("op", {"dst": "m1", "port": 80, "timeout": 2, "once": True, "present": ["a", "b"],
                              "none": None})
    assert (args.text("dst"), args.integer("port", lo=1, hi=65535), args.number("timeout"), args.flag("once"),
            args.texts("present")) == ("m1", 80, 2.0, True, ["a", "b"])
    assert (args.text("none", "x"), args.integer("absent", 7), args.flag("absent"), args.texts("absent")) == \
        ("x", 7, False, [])
    bad = [("text", "port", {}), ("integer", "dst", {}), ("integer", "port", {"hi": 79}), ("number", "once", {}),
           ("flag", "port", {}), ("texts", "dst", {}), ("text", "missing", {})]
    for getter, key, kwargs in bad:
        with pytest.raises(ConfigError, match=f"op: argument '{key}'"):
            getattr(args, getter)(key, **kwargs)
    for value in (True, 0, -1.0, float("nan"), float("inf"), 3601, "1"):
        with pytest.raises(ConfigError):
            ControlArgs("op", {"timeout": value}).number("timeout")
    deep: list = []
    for _ in range(5000):  # (the message never holds the repr of a container: it may be this deep)
        deep = [deep]
    with pytest.raises(ConfigError, match="not a list"):
        ControlArgs("op", {"dst": deep}).text("dst")


def test_a_reason_is_cut_to_the_limit_in_bytes():
    from gridsock.bootstrap.control import reason_text

    for text in ("\u00e9" * 2000, "\ud800" * 2000, "x" * 5000, "short"):
        cut = reason_text(text)
        assert len(cut.encode("utf-8")) <= wire.MAX_REASON_BYTES
        wire.encode(wire.ControlReply(False, None, cut))  # (the encoder takes it)
        wire.encode(agentwire.failure("EINVAL", text))
