"""Data connections between nodes of an in-process grid on loopback: stacks, policy, tokens, rules.

Grid (TLS session): cluster A = leader L1 + member m1; cluster B = leader L2 + member m2. Every
node listens on loopback, so every direct method can work; m2 accepts any stack from outside
its cluster (its policy is empty), L2 keeps the default policy (tls from outside its cluster).
"""
from __future__ import annotations

import dataclasses
import os
import socket

import gevent
import gevent.event
import gevent.socket
import pytest

from gridsock import assembly
from gridsock import wire
from gridsock.components.tcp import TcpMethod
from gridsock.errors import ConnectError
from gridsock.node import Delivery, Node
from gridsock.rules import Rule, Rules
from gridsock.stack import Stack
from gridsock.testing.grid import JOIN_TIMEOUT_S, loopback_grid
from gridsock.testing.methods import FixedRules, FlopMethod
from gridsock.testing.streams import check_stream

pytestmark = pytest.mark.timeout(300)

PORT = 5000
STACKS = ["tcp", "tls/tcp", "lz4/tcp", "zlib/tcp", "bz2/tcp", "adoc/tcp", "tls/lz4/tcp", "relay", "tls/relay",
          "lz4/relay", "reverse", "tls/reverse", "parallel(streams=4)/tcp", "tls/parallel(streams=2)/tcp"]
# (splice needs SYNs that a NAT or firewall drops, not a loopback port that answers RST between
# attempts: tests/lab/test_data.py checks it through the lab's NAT and firewall.)


@dataclasses.dataclass
class Grid:
    nodes: dict
    listeners: dict

    def __getitem__(self, name):
        return self.nodes[name]


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    with loopback_grid(tmp_path_factory.mktemp("asm")) as running:
        listeners = {name: node.listen(PORT) for name, node in running.nodes.items()}
        yield Grid(running.nodes, listeners)


def pair_maker(grid, src, dst, stack):
    def make_pair():
        client, info = grid[src].open_stream(dst, PORT, stack=stack)
        server, server_info = grid.listeners[dst].accept_stream(timeout=JOIN_TIMEOUT_S)
        assert info.stack == server_info.stack == stack
        assert server_info.peer_id == grid[src].node_id and info.peer_id == grid[dst].node_id
        return client, server

    return make_pair


@pytest.mark.parametrize("stack", STACKS)
def test_check_stream_across_clusters(grid, stack):
    # m1 -> m2: four hops apart on the bootstrap tree; direct methods use loopback.
    small = stack.endswith("relay") or "bz2" in stack
    check_stream(pair_maker(grid, "m1", "m2", stack),
                 bulk_bytes=(2 if small else 8) << 20, large_write_bytes=(4 if small else 16) << 20,
                 tiny_writes=2000 if small else 10_000)


def test_plain_tcp_hands_out_the_kernel_socket(grid):
    sock, info = grid["m1"].connect("L1", PORT, stack="tcp")
    server_sock, server_info = grid.listeners["L1"].accept(timeout=JOIN_TIMEOUT_S)
    try:
        assert isinstance(sock, socket.socket) and sock.family == socket.AF_INET  # no bridge
        assert isinstance(server_sock, socket.socket) and server_sock.family == socket.AF_INET
        assert info.detail["bridged"] is False
    finally:
        sock.close()
        server_sock.close()


def test_transformed_stacks_hand_out_a_bridged_real_socket(grid):
    sock, info = grid["m1"].connect("m2", PORT, stack="tls/relay")
    server_sock, _ = grid.listeners["m2"].accept(timeout=JOIN_TIMEOUT_S)
    try:
        assert isinstance(sock, socket.socket) and sock.fileno() >= 0 and info.detail["bridged"] is True
        sock.setblocking(False)
        server_sock.setblocking(False)
        gsock = gevent.socket.socket(fileno=sock.detach())
        gserver = gevent.socket.socket(fileno=server_sock.detach())
        gsock.sendall(b"hello over tls/relay")
        assert gserver.recv(100) == b"hello over tls/relay"
        gserver.sendall(b"and back")
        assert gsock.recv(100) == b"and back"
    finally:
        for s in (sock, server_sock):
            s.close()
        for name in ("gsock", "gserver"):
            if name in locals():
                locals()[name].close()


def test_different_clients_of_one_server_use_different_stacks_at_once(grid):
    streams = []
    for src, stack in (("m1", "tls/tcp"), ("L1", "lz4/relay"), ("L2", "tcp")):
        client, info = grid[src].open_stream("m2", PORT, stack=stack)
        server, server_info = grid.listeners["m2"].accept_stream(timeout=JOIN_TIMEOUT_S)
        streams.append((client, server, stack))
    for client, server, stack in streams:
        client.send_all(stack.encode())
        assert server.receive_some(100) == stack.encode()
    for client, server, _ in streams:
        client.close()
        server.close()


@pytest.mark.parametrize("stack", ["tcp", "relay", "lz4/relay", "lz4/tcp"])
def test_policy_refuses_a_stack_without_tls_from_outside_the_cluster(grid, stack):
    with pytest.raises(ConnectError) as excinfo:
        grid["m1"].open_stream("L2", PORT, stack=stack)
    assert "requires tls" in str(excinfo.value)
    assert excinfo.value.tried


def test_a_forged_downgrade_request_is_refused(grid):
    # Craft the assembly request by hand, as a client that ignores its own rules would.
    request = wire.AssemblyRequest(port=PORT, stack="tcp", token="00" * assembly.TOKEN_BYTES)
    reply = grid["m1"].meta_request("L2", assembly.ASSEMBLE_TOPIC, wire.encode_assembly(request))
    answer = wire.decode_assembly(reply.payload)
    assert isinstance(answer, wire.AssemblyRefuse) and answer.code == "policy"
    assert grid.listeners["L2"]._queue.empty()


def test_nothing_listens_is_a_clear_refusal(grid):
    with pytest.raises(ConnectError) as excinfo:
        grid["m1"].open_stream("L1", PORT + 1, stack="tcp")
    assert "nothing listens on port" in str(excinfo.value)


def raw_data_connection(node, payload: bytes) -> bytes:
    """Connect to ``node``'s node port as a stranger, send ``payload``, read until closed."""
    address = node.address
    with socket.create_connection((address.host, address.port), timeout=15) as sock:
        sock.sendall(payload)
        received = b""
        sock.settimeout(15)
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                return received
            if not chunk:
                return received
            received += chunk


def run_blocking(func, *args):
    """Run a blocking stdlib call in a thread so the in-process grid keeps running."""
    return gevent.get_hub().threadpool.apply(func, args)


def test_a_replayed_token_is_refused(grid, monkeypatch):
    tokens = []
    real = assembly.secrets.token_bytes

    def recording(n):
        token = real(n)
        tokens.append(token)
        return token

    monkeypatch.setattr(assembly.secrets, "token_bytes", recording)
    client, _ = grid["m1"].open_stream("L1", PORT, stack="tcp")
    server, _ = grid.listeners["L1"].accept_stream(timeout=JOIN_TIMEOUT_S)
    client.close()
    server.close()
    monkeypatch.setattr(assembly.secrets, "token_bytes", real)
    received = run_blocking(raw_data_connection, grid["L1"], wire.encode_preamble(tokens[-1]) + b"replayed data")
    assert received == b""
    assert grid.listeners["L1"]._queue.empty()


def test_a_stolen_token_does_not_pass_tls(grid):
    # The request is genuine (from m1) and pending; a stranger uses its token first.
    token = assembly.secrets.token_bytes(assembly.TOKEN_BYTES)
    request = wire.AssemblyRequest(port=PORT, stack="tls/tcp", token=token.hex())
    delivery = Delivery(grid["m1"].node_id, "m1", assembly.ASSEMBLE_TOPIC, wire.encode_assembly(request), ("m1",), "req")
    assert isinstance(wire.decode_assembly(grid["L1"].assembler.handle_request(delivery)), wire.AssemblyAccept)
    received = run_blocking(raw_data_connection, grid["L1"], wire.encode_preamble(token) + b"\x16\x03\x01\x00\x05hello")
    assert b"gridsock" not in received
    assert grid.listeners["L1"]._queue.empty()


def test_a_random_token_gets_nothing(grid):
    token = b"\x00" * assembly.TOKEN_BYTES
    received = run_blocking(raw_data_connection, grid["m1"], wire.encode_preamble(token) + b"hello?")
    assert received == b""
    assert grid.listeners["m1"]._queue.empty()


def test_a_rules_file_changes_the_stack(grid, tmp_path):
    rules_file = tmp_path / "rules.toml"
    rules_file.write_text('scheme = "cluster"\n[[rule]]\nfrom = "name:m*"\nto = "cluster:B"\nstack = "lz4/relay"\n')
    rules = Rules.load(rules_file)
    assert rules.rules == (Rule("name:m*", "cluster:B", "lz4/relay"),)
    m1 = grid["m1"]
    default = Rules()
    assert str(default.choose(m1.entry, grid["m2"].entry)) == "tls/tcp"  # m2 accepts inbound (loopback)
    assert str(rules.choose(m1.entry, grid["m2"].entry)) == "lz4/relay"
    assert str(rules.choose(m1.entry, grid["L1"].entry)) == "tcp"  # no rule: the scheme
    m1.assembler.rules = rules
    try:
        client, info = m1.open_stream("m2", PORT)
        server, _ = grid.listeners["m2"].accept_stream(timeout=JOIN_TIMEOUT_S)
    finally:
        m1.assembler.rules = m1.rules
    assert info.stack == "lz4/relay"
    status = m1.status()
    assert any(c["stack"] == "lz4/relay" and c["peer"] == "m2" for c in status["connections"])
    client.close()
    server.close()
    assert not any(c["conn"] == info.conn for c in m1.status()["connections"])


def test_meta_links_open_lazily_and_show_in_status(grid):
    m1 = grid["m1"]
    client, _ = m1.open_stream("L2", PORT, stack="tls/tcp")
    server, _ = grid.listeners["L2"].accept_stream(timeout=JOIN_TIMEOUT_S)
    client.close()
    server.close()
    links = {l["peer"]: l for l in m1.status()["meta_links"]}
    assert links["L2"]["stack"] == "tls/tcp"


def test_a_stalled_relay_holds_one_window_and_starves_nothing(grid):
    from gridsock.components.relay import RELAY_WINDOW_BYTES

    client, _ = grid["m1"].open_stream("m2", PORT, stack="relay")
    server, _ = grid.listeners["m2"].accept_stream(timeout=JOIN_TIMEOUT_S)
    sender = gevent.spawn(client.send_all, bytes(8 * RELAY_WINDOW_BYTES))  # m2 reads nothing yet
    try:
        # The bootstrap channel between the same nodes still answers, through the same links.
        for _ in range(5):
            assert grid["m1"].ping("m2").hops == 4
        assert not sender.ready()  # blocked on credit...
        assert client.bytes_sent <= RELAY_WINDOW_BYTES  # ...with at most one window in flight
        received = 0
        while received < 8 * RELAY_WINDOW_BYTES:
            received += len(server.receive_some())
        sender.get(timeout=JOIN_TIMEOUT_S)
        assert client.bytes_sent == len(assembly.NOMINATE) + 8 * RELAY_WINDOW_BYTES  # the nomination, then ours
    finally:
        sender.kill()
        client.close()
        server.close()


def test_a_failed_direct_method_falls_back_to_the_relay(grid):
    # A node of cluster A whose advertised address is dead: the rules choose tcp (same
    # cluster), the dial fails, and the connection falls back to the relay, saying why.
    ghost = Node(grid["m1"].session, "ghost", cluster="A", leader=str(grid["L1"].address),
                 listen_address="127.0.0.1:0", advertise="127.0.0.1:1", control="").start()
    try:
        assert ghost.wait_joined(JOIN_TIMEOUT_S)
        grid["m1"].wait_directory(present=["ghost"], timeout=JOIN_TIMEOUT_S)
        listener = ghost.listen(PORT)
        client, info = grid["m1"].open_stream("ghost", PORT)
        server, _ = listener.accept_stream(timeout=JOIN_TIMEOUT_S)
        assert info.stack == "tls/relay"
        assert [stack for stack, _ in info.detail["tried"]] == ["tcp"]
        client.send_all(b"via the relay")
        assert server.receive_some(100) == b"via the relay"
        client.close()
        server.close()
        with pytest.raises(ConnectError):  # named explicitly, tcp does not fall back
            grid["m1"].open_stream("ghost", PORT, stack="tcp")
    finally:
        ghost.stop()


def stranger_meta_request(node, session) -> bytes:
    """A client outside the session (no certificate) asks for a meta link and sends an
    assembly request on it; return everything the node sends back."""
    import ssl

    from gridsock import wire

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.load_verify_locations(cadata=session.ca_cert_pem.decode())
    address = node.address
    with socket.create_connection((address.host, address.port), timeout=15) as raw:
        with context.wrap_socket(raw) as sock:
            request = wire.AssemblyRequest(port=PORT, stack="tcp", token="11" * assembly.TOKEN_BYTES)
            sock.sendall(wire.encode(wire.Hello(name="stranger", cluster=None, role="peer"))
                         + wire.encode(wire.Routed(src="00000000-0000-4000-8000-000000000bad", dst=node.node_id,
                                                   kind="req", topic="assemble", request_id=1, hops=1,
                                                   route=("stranger",), payload=wire.encode_assembly(request))))
            received = b""
            try:
                while chunk := sock.recv(65536):
                    received += chunk
            except (ssl.SSLError, OSError):
                pass
            return received


def test_an_assembly_request_from_outside_the_session_gets_nothing(grid):
    received = run_blocking(stranger_meta_request, grid["m2"], grid["m2"].session)
    from gridsock import wire

    decoder = wire.Decoder()
    decoder.feed(received)
    messages = []
    while (message := decoder.next_message()) is not None:
        messages.append(type(message).__name__)
    assert messages == ["Refuse"]  # no Welcome, no answer to the request
    assert grid.listeners["m2"]._queue.empty()
    assert not grid["m2"].assembler._arrivals


def test_a_relayed_connection_ends_when_its_peer_leaves_the_grid(grid):
    from gridsock.errors import BrokenStreamError

    peer = Node(grid["m1"].session, "leaver", cluster="B", leader=str(grid["L2"].address),
                listen_address="127.0.0.1:0", control="", rules=Rules(outside_cluster=())).start()
    assert peer.wait_joined(JOIN_TIMEOUT_S)
    grid["m1"].wait_directory(present=["leaver"], timeout=JOIN_TIMEOUT_S)
    listener = peer.listen(PORT)
    client, _ = grid["m1"].open_stream("leaver", PORT, stack="relay")
    server, _ = listener.accept_stream(timeout=JOIN_TIMEOUT_S)
    client.send_all(b"before")
    assert server.receive_some(100) == b"before"
    peer.stop()
    grid["m1"].wait_directory(absent=["leaver"], timeout=JOIN_TIMEOUT_S)
    with pytest.raises(BrokenStreamError):  # a break, not an end: the reader sees it...
        client.receive_some(100)
    with pytest.raises(BrokenStreamError):  # ...and so does the writer
        client.send_all(b"after")
    client.close()


# --- racing candidates (happy eyeballs) -------------------------------------------------------


class StallMethod(TcpMethod):
    """A direct method whose dial never finishes (a SYN into a black hole); counts cancellations."""

    name = "stall"
    cancelled = 0

    def dial(self, address, *, node, timeout):
        try:
            gevent.sleep(timeout + 60)
        except gevent.GreenletExit:
            StallMethod.cancelled += 1
            raise
        raise AssertionError("a stalled dial outlived its connect")






@pytest.fixture
def racing(grid, monkeypatch):
    """m1's assembler with test methods registered and rules set by ``racing(order)``."""
    from gridsock.registry import default_registry

    default_registry.register("stall", StallMethod)
    default_registry.register("flop", FlopMethod)
    m1 = grid["m1"]

    def use(*order, stagger_s):
        monkeypatch.setattr(assembly, "STAGGER_S", stagger_s)
        m1.assembler.rules = FixedRules(order=order)
        m1.assembler._winners.clear()
        return m1

    yield use
    m1.assembler.rules = m1.rules
    m1.assembler._winners.clear()
    default_registry.unregister("stall")
    default_registry.unregister("flop")


def test_a_stalled_candidate_is_raced_after_the_stagger_and_cancelled(grid, racing):
    m1 = racing("stall", "tcp", stagger_s=0.05)
    before = StallMethod.cancelled
    client, info = m1.open_stream("L1", PORT)
    server, server_info = grid.listeners["L1"].accept_stream(timeout=JOIN_TIMEOUT_S)
    assert info.stack == server_info.stack == "tcp"
    assert info.detail["tried"] == [("stall", "cancelled: tcp connected first")]
    assert StallMethod.cancelled == before + 1  # its dial did not linger
    client.send_all(b"raced")
    assert server.receive_some(100) == b"raced"
    client.close()
    server.close()


def test_a_failed_candidate_starts_the_next_at_once_and_the_winner_is_kept(grid, racing):
    # With a stagger longer than the connect's whole budget, only the failure can start tcp.
    m1 = racing("flop", "tcp", stagger_s=3600.0)
    client, info = m1.open_stream("L1", PORT)
    server, _ = grid.listeners["L1"].accept_stream(timeout=JOIN_TIMEOUT_S)
    assert info.stack == "tcp"
    [(stack, why)] = info.detail["tried"]
    assert stack == "flop" and "flop: network unreachable" in why
    client.close()
    server.close()
    client, info = m1.open_stream("L1", PORT)  # the winner goes first now: flop is not tried
    server, _ = grid.listeners["L1"].accept_stream(timeout=JOIN_TIMEOUT_S)
    assert info.stack == "tcp" and "tried" not in info.detail
    client.close()
    server.close()


def test_every_candidate_failing_says_why_each_failed(grid, racing):
    m1 = racing("flop", "flop", stagger_s=3600.0)
    with pytest.raises(ConnectError) as failure:
        m1.open_stream("L1", PORT)
    assert [stack for stack, _ in failure.value.tried] == ["flop", "flop"]
    assert all("network unreachable" in why for _, why in failure.value.tried)


def test_a_refusal_ends_the_race(grid, racing):
    m1 = racing("relay", "tcp", stagger_s=3600.0)
    with pytest.raises(ConnectError) as failure:
        m1.open_stream("L1", PORT + 1)  # nothing listens there: no other method would help
    assert [stack for stack, _ in failure.value.tried] == ["relay"]
    assert "nothing listens" in failure.value.tried[0][1]


@pytest.mark.parametrize("stack", ["tcp", "relay", "tls/tcp"])
def test_a_candidate_established_but_not_nominated_is_never_delivered(grid, stack):
    import logging

    m1, l1 = grid["m1"], grid["L1"]
    taken_not = gevent.event.Event()

    class Watch(logging.Handler):
        def emit(self, record):
            if record.name == "gridsock.assembly" and "not taken" in record.getMessage():
                taken_not.set()

    logger = logging.getLogger("gridsock.assembly")
    handler, level = Watch(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        parsed = Stack.parse(stack)
        lower, _, _, _ = m1.assembler._establish(l1.entry, PORT, parsed, deadline=assembly.time.monotonic() + 15)
        lower.close()  # it lost the race
        assert taken_not.wait(timeout=JOIN_TIMEOUT_S)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert grid.listeners["L1"]._queue.empty()
    # The server is unharmed: the next connection is delivered.
    client, _ = m1.open_stream("L1", PORT, stack=stack)
    server, _ = grid.listeners["L1"].accept_stream(timeout=JOIN_TIMEOUT_S)
    client.close()
    server.close()


@pytest.mark.parametrize("stack,why", [
    ("parallel(streams=2)/relay", "parallel needs a method that dials"),
    ("parallel(streams=2)/lz4/tcp", "parallel must be the lowest filter"),
])
def test_a_misplaced_parallel_is_refused_with_the_reason(grid, stack, why):
    with pytest.raises(ConnectError) as failure:
        grid["m1"].open_stream("m2", PORT, stack=stack)
    assert why in str(failure.value)


def test_parallel_sub_connections_are_gathered_under_one_token(grid):
    client, info = grid["m1"].open_stream("m2", PORT, stack="parallel(streams=8)/tcp")
    server, server_info = grid.listeners["m2"].accept_stream(timeout=JOIN_TIMEOUT_S)
    assert info.stack == server_info.stack == "parallel(streams=8)/tcp"
    assert client.info["streams"] == server.info["streams"] == 8
    data = bytes(range(256)) * 4096  # 1 MiB: striped over the eight
    sender = gevent.spawn(client.send_all, data)
    received = bytearray()
    while len(received) < len(data):
        received += server.receive_some()
    sender.get(timeout=JOIN_TIMEOUT_S)
    assert received == data
    client.close()
    server.close()


def test_a_refusal_while_the_dial_is_under_way_leaves_no_crash(grid):
    # The request is refused (nothing listens) while the dials run: they are killed, and nothing
    # they made (or their GreenletExit) is mistaken for a socket to close.
    hub = gevent.get_hub()
    hub_errors = []
    real = hub.handle_error
    hub.handle_error = lambda *args: hub_errors.append(args)
    try:
        for stack in ["tcp", "parallel(streams=4)/tcp", None] * 10:
            with pytest.raises(ConnectError) as failure:
                grid["m1"].open_stream("L1", PORT + 2, stack=stack)
            assert "nothing listens" in str(failure.value)
    finally:
        hub.handle_error = real
    assert hub_errors == []


def test_connections_with_unknown_tokens_wait_within_a_bound(grid, monkeypatch):
    # A data connection may come before its request (they race) and waits for it; connections
    # with tokens nobody asked for can hold only MAX_EARLY_DATA_CONNECTIONS at once: the next is
    # refused at once, while those that wait still wait.
    monkeypatch.setattr(assembly, "MAX_EARLY_DATA_CONNECTIONS", 3)
    monkeypatch.setattr(assembly, "MATCH_TIMEOUT_S", 60.0)
    address = grid["m2"].address
    early = []
    try:
        for _ in range(3):
            sock = gevent.socket.create_connection((address.host, address.port), timeout=JOIN_TIMEOUT_S)
            sock.sendall(wire.encode_preamble(os.urandom(wire.TOKEN_BYTES)))
            early.append(sock)
        assembler = grid["m2"].assembler
        with gevent.Timeout(JOIN_TIMEOUT_S):
            while assembler._early < 3:
                gevent.sleep(0.01)
        with gevent.socket.create_connection((address.host, address.port), timeout=JOIN_TIMEOUT_S) as late:
            late.sendall(wire.encode_preamble(os.urandom(wire.TOKEN_BYTES)))
            assert late.recv(1) == b""  # refused: closed by the node
        assert assembler._early == 3  # the three still wait for their requests
        for sock in early:
            sock.setblocking(False)
            with pytest.raises(BlockingIOError):  # open, nothing said: still waiting
                sock.recv(1)
    finally:
        for sock in early:
            sock.close()


def wait_early(assembler, count: int, what: str) -> None:
    """Return once ``count`` data connections wait for their tokens' requests (JOIN_TIMEOUT_S)."""
    with gevent.Timeout(JOIN_TIMEOUT_S, AssertionError(what)):
        while assembler._early != count:
            gevent.sleep(0.01)


def test_a_connection_waiting_for_its_token_is_let_go_when_its_client_closes(grid, monkeypatch):
    # A client that gives up (closes) while its connection waits for a request that will never
    # come frees its place at once, not after MATCH_TIMEOUT_S.
    monkeypatch.setattr(assembly, "MATCH_TIMEOUT_S", 600.0)
    address = grid["m2"].address
    assembler = grid["m2"].assembler
    wait_early(assembler, 0, "earlier tests' closed connections still wait")
    sock = gevent.socket.create_connection((address.host, address.port), timeout=JOIN_TIMEOUT_S)
    try:
        sock.sendall(wire.encode_preamble(os.urandom(wire.TOKEN_BYTES)))
        wait_early(assembler, 1, "the connection does not wait for its token")
    finally:
        sock.close()
    wait_early(assembler, 0, "the connection still waits after its client closed")


def test_a_connection_whose_client_writes_early_still_waits_for_its_request(grid, monkeypatch):
    # Bytes after the preamble (a client that does not wait: its TLS hello) are not a close: the
    # connection keeps waiting for its request, and the bytes stay for the stack.
    monkeypatch.setattr(assembly, "MATCH_TIMEOUT_S", 600.0)
    address = grid["m2"].address
    assembler = grid["m2"].assembler
    wait_early(assembler, 0, "earlier tests' closed connections still wait")
    sock = gevent.socket.create_connection((address.host, address.port), timeout=JOIN_TIMEOUT_S)
    try:
        sock.sendall(wire.encode_preamble(os.urandom(wire.TOKEN_BYTES)) + b"early bytes")
        wait_early(assembler, 1, "the connection does not wait for its token")
        sock.sendall(b" and more")
        sock.setblocking(False)
        with pytest.raises(BlockingIOError):  # open, nothing said: still waiting
            sock.recv(1)
        assert assembler._early == 1
    finally:
        sock.close()
