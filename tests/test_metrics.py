"""The Prometheus endpoint of nodes and of the rendez-vous node, scraped over HTTP on loopback.

Grid (TLS session, in this process): a rendez-vous node and two leaders, ``L1`` in cluster A
and ``L2`` in cluster B, each serving its metrics on 127.0.0.1 (a port the kernel picks). ``L2``
keeps the default policy (``tls`` from outside its cluster), so a plain ``tcp`` connect from
``L1`` is refused with the code ``policy``. The scrapes are parsed with prometheus_client's
own text-format parser.
"""
from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import time
import urllib.request
from typing import Dict, Iterator, Set, Tuple

import gevent
import gevent.socket
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gridsock.assembly import DataListener
from gridsock.bootstrap.control import call
from gridsock.bootstrap.rendezvous import RendezvousNode
from gridsock.errors import ConfigError, ConnectError
from gridsock.metrics import parse_metrics_address
from gridsock.node import Node
from gridsock.session import create_session
from gridsock.testing.grid import JOIN_TIMEOUT_S
from gridsock.testing.procs import gridsock_argv, stop_process, wait_for_line

pytestmark = pytest.mark.timeout(120)

PORT = 5000
PAYLOAD_BYTES = 256 * 1024
# A scrape answers at once on loopback; this bounds a broken one.
SCRAPE_TIMEOUT_S = 10.0

Labels = Tuple[Tuple[str, str], ...]


@dataclasses.dataclass
class Grid:
    rv: RendezvousNode
    nodes: Dict[str, Node]
    listener: DataListener

    def __getitem__(self, name: str) -> Node:
        return self.nodes[name]


@pytest.fixture(scope="module")
def grid(tmp_path_factory) -> Iterator[Grid]:
    session = create_session(tmp_path_factory.mktemp("metrics") / "session", "127.0.0.1:7700")
    rv = RendezvousNode(session, listen_address="127.0.0.1:0", control="", metrics="127.0.0.1:0").start()
    session = dataclasses.replace(session, rendezvous_port=rv.address.port)
    nodes: Dict[str, Node] = {}
    try:
        for name, cluster in (("L1", "A"), ("L2", "B")):
            nodes[name] = Node(session, name, cluster=cluster, listen_address="127.0.0.1:0", control="",
                               metrics="127.0.0.1:0").start()
            assert nodes[name].wait_joined(JOIN_TIMEOUT_S), f"{name} did not join"
        for node in nodes.values():
            node.wait_directory(present=("L1", "L2"), settled=True, timeout=JOIN_TIMEOUT_S)
        yield Grid(rv, nodes, nodes["L2"].listen(PORT))
    finally:
        for node in nodes.values():
            node.stop()
        rv.stop()


def fetch(address, path: str = "/metrics") -> Tuple[int, str]:
    """GET ``path`` from ``address`` over a gevent socket (the server runs in this hub)."""
    with gevent.Timeout(SCRAPE_TIMEOUT_S):
        sock = gevent.socket.create_connection((address.host, address.port))
        try:
            sock.sendall(f"GET {path} HTTP/1.0\r\nHost: {address}\r\n\r\n".encode())
            chunks = []
            while True:
                data = sock.recv(65536)
                if not data:
                    break
                chunks.append(data)
        finally:
            sock.close()
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, body.decode()


def scrape(address) -> Dict[Tuple[str, Labels], float]:
    """Every sample of the endpoint at ``address``: (name, sorted labels) -> value."""
    status, text = fetch(address)
    assert status == 200, text
    samples: Dict[Tuple[str, Labels], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples, name: str, **labels: str) -> float:
    """The sample's value, 0 if it is absent (a counter with labels appears once it moves)."""
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def echo_once(grid: Grid, stack: str):
    """L1 connects to L2 over ``stack``, sends PAYLOAD_BYTES and reads them back; returns the
    two (gevent) sockets, still open."""
    client, info = grid["L1"].connect("L2", PORT, stack=stack)
    server, _ = grid.listener.accept(timeout=JOIN_TIMEOUT_S)
    assert info.stack == stack and info.detail["bridged"] is True
    sockets = []
    for sock in (client, server):
        sock.setblocking(False)
        sockets.append(gevent.socket.socket(fileno=sock.detach()))
    gclient, gserver = sockets
    payload = os.urandom(PAYLOAD_BYTES)

    def echo() -> None:
        left = PAYLOAD_BYTES
        while left:
            data = gserver.recv(65536)
            assert data
            gserver.sendall(data)
            left -= len(data)

    with gevent.Timeout(SCRAPE_TIMEOUT_S * 3):
        echoer = gevent.spawn(echo)
        gclient.sendall(payload)
        received = bytearray()
        while len(received) < PAYLOAD_BYTES:
            data = gclient.recv(65536)
            assert data
            received += data
        echoer.get()
    assert bytes(received) == payload
    return gclient, gserver


def scrape_until(address, done) -> Dict[Tuple[str, Labels], float]:
    """Scrape until ``done(samples)`` (a bridge's pump may count its last chunk a moment after the
    peer has it); the last scrape after SCRAPE_TIMEOUT_S either way."""
    deadline = time.monotonic() + SCRAPE_TIMEOUT_S
    while True:
        samples = scrape(address)
        if done(samples) or time.monotonic() > deadline:
            return samples
        gevent.sleep(0.05)


def test_the_endpoint_serves_the_text_format_on_loopback(grid):
    for node in (grid["L1"], grid["L2"]):
        address = node.metrics_address
        assert address is not None and address.host == "127.0.0.1"
        samples = scrape(address)
        assert value(samples, "gridsock_uplink_up") == 1
        assert value(samples, "gridsock_directory_nodes") == 2
    samples = scrape(grid.rv.metrics_address)
    assert value(samples, "gridsock_leader_links") == 2
    assert value(samples, "gridsock_directory_nodes") == 2


@pytest.mark.parametrize("stack", ["tls/lz4/tcp", "tls/relay"])
def test_counters_move_with_a_transfer(grid, stack):
    names = ("L1", "L2")
    before = {name: scrape(grid[name].metrics_address) for name in names}
    sockets = echo_once(grid, stack)
    try:
        after = {}
        for name in names:
            def done(samples, name=name):
                return all(value(samples, "gridsock_data_bytes_total", direction=d)
                           - value(before[name], "gridsock_data_bytes_total", direction=d) >= PAYLOAD_BYTES
                           for d in ("sent", "received"))
            after[name] = scrape_until(grid[name].metrics_address, done)
    finally:
        for sock in sockets:
            sock.close()

    def moved(name: str, metric: str, **labels: str) -> float:
        return value(after[name], metric, **labels) - value(before[name], metric, **labels)

    method = stack.rsplit("/", 1)[1]
    opened = "gridsock_data_connections_opened_total"
    assert moved("L1", opened, method=method, stack=stack, side="client") == 1
    assert moved("L2", opened, method=method, stack=stack, side="server") == 1
    assert moved("L1", "gridsock_race_candidates_total", method=method, outcome="won") == 1
    assert moved("L2", "gridsock_assembly_server_connections_total", outcome="delivered") == 1
    # What the applications wrote and read, through each side's bridge, exactly.
    for name in names:
        for direction in ("sent", "received"):
            assert moved(name, "gridsock_data_bytes_total", direction=direction) == PAYLOAD_BYTES
    if method == "relay":  # TLS records over the relay: the payload and a little more
        for name in names:
            for direction in ("sent", "received"):
                assert PAYLOAD_BYTES <= moved(name, "gridsock_relay_bytes_total", direction=direction) \
                    < 2 * PAYLOAD_BYTES
    # The connection closed: counters stay where they were.
    closed = scrape(grid["L1"].metrics_address)
    for direction in ("sent", "received"):
        assert value(closed, "gridsock_data_bytes_total", direction=direction) == \
            value(after["L1"], "gridsock_data_bytes_total", direction=direction)


def test_a_connection_closed_and_forgotten_before_any_scrape_is_counted_exactly(grid):
    """The server counts a connection as the assembler records it, and its bytes stay on its
    bridge: a scrape after the connection ended and `gridsock status` forgot it sees it all."""
    stack = "tls/tcp"
    before = scrape(grid["L2"].metrics_address)
    for sock in echo_once(grid, stack):
        sock.close()
    deadline = time.monotonic() + SCRAPE_TIMEOUT_S
    while grid["L2"].status()["connections"]:  # (status forgets the closed ones)
        assert time.monotonic() < deadline, grid["L2"].status()["connections"]
        gevent.sleep(0.05)
    after = scrape(grid["L2"].metrics_address)

    def moved(metric: str, **labels: str) -> float:
        return value(after, metric, **labels) - value(before, metric, **labels)

    assert moved("gridsock_data_connections_opened_total", method="tcp", stack=stack, side="server") == 1
    for direction in ("sent", "received"):
        assert moved("gridsock_data_bytes_total", direction=direction) == PAYLOAD_BYTES


def test_a_refused_connect_is_counted_by_reason_on_both_sides(grid):
    before = {name: scrape(grid[name].metrics_address) for name in ("L1", "L2")}
    with pytest.raises(ConnectError) as refused:
        grid["L1"].connect("L2", PORT, stack="tcp")  # L2's policy: tls from outside its cluster
    assert refused.value.code == "policy"
    with pytest.raises(ConnectError) as nothing:
        grid["L1"].connect("L2", PORT + 1, stack="tls/tcp")  # nothing listens there
    assert nothing.value.code == "refused"
    after = {name: scrape(grid[name].metrics_address) for name in ("L1", "L2")}

    def moved(name: str, metric: str, **labels: str) -> float:
        return value(after[name], metric, **labels) - value(before[name], metric, **labels)

    for reason in ("policy", "refused"):
        assert moved("L1", "gridsock_connect_failures_total", reason=reason) == 1
        assert moved("L2", "gridsock_assembly_refusals_total", reason=reason) == 1
    assert moved("L1", "gridsock_race_candidates_total", method="tcp", outcome="failed") == 2
    assert moved("L1", "gridsock_data_connections_opened_total", method="tcp", stack="tcp", side="client") == 0


def test_unreachable_and_timed_out_connects_are_counted(grid):
    before = scrape(grid["L1"].metrics_address)
    with pytest.raises(ConnectError) as failed:
        grid["L1"].connect("nobody", PORT)
    assert failed.value.code is None and not isinstance(failed.value, TimeoutError)
    with pytest.raises(ConnectError) as late:
        grid["L1"].connect("L2", PORT, stack="tls/tcp", timeout=0)  # the deadline has passed at once
    assert isinstance(late.value, TimeoutError)
    after = scrape(grid["L1"].metrics_address)
    for reason in ("unreachable", "timeout"):
        assert value(after, "gridsock_connect_failures_total", reason=reason) - \
            value(before, "gridsock_connect_failures_total", reason=reason) == 1


def test_routed_messages_are_counted_where_they_pass(grid):
    before = {"L1": scrape(grid["L1"].metrics_address), "L2": scrape(grid["L2"].metrics_address),
              "rv": scrape(grid.rv.metrics_address)}
    grid["L1"].ping("L2")  # L1 -> rendezvous -> L2, and back
    after = {"L1": scrape(grid["L1"].metrics_address), "L2": scrape(grid["L2"].metrics_address),
             "rv": scrape(grid.rv.metrics_address)}

    def moved(name: str, action: str) -> float:
        return value(after[name], "gridsock_routed_messages_total", action=action) - \
            value(before[name], "gridsock_routed_messages_total", action=action)

    assert moved("L1", "originated") == 1
    assert moved("L1", "delivered") == 1  # the reply
    assert moved("L2", "delivered") == 1
    assert moved("rv", "forwarded") == 2  # there and back


def test_dialback_checks_and_the_flood_guard_are_exported(grid):
    rv_samples = scrape(grid.rv.metrics_address)
    # Both leaders registered their addresses: the rendez-vous node checked them by dialing back.
    assert value(rv_samples, "gridsock_dialback_checks_total", outcome="probes") >= 2
    for outcome, count in grid.rv.dialback.counters.items():
        assert value(rv_samples, "gridsock_dialback_checks_total", outcome=outcome) == count
    for samples, guard in ((rv_samples, grid.rv.flood_guard), (scrape(grid["L1"].metrics_address), grid["L1"].router.guard)):
        for event in ("held", "dropped", "cut", "closed"):
            assert ("gridsock_flood_guard_events_total", (("event", event),)) in samples
            assert value(samples, "gridsock_flood_guard_events_total", event=event) == guard.counters[event]
        assert value(samples, "gridsock_flood_guard_held_seconds_total") == guard.counters["held_s"]
        assert value(samples, "gridsock_flood_guard_cut_sources") == 0  # nobody floods here


def _listening_ports() -> Set[int]:
    """The TCP ports this process listens on (Linux: its socket inodes in /proc/net/tcp*)."""
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            next(f)
            for line in f:
                fields = line.split()
                if fields[3] == "0A" and fields[9] in inodes:  # LISTEN
                    ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def test_metrics_are_off_by_default(grid):
    before = _listening_ports()
    node = Node(grid["L1"].session, "quiet", cluster="Q", listen_address="127.0.0.1:0", control="")
    try:
        node.start()
        assert node.metrics_address is None
        front_door = int(node.status()["front_door"].rsplit(":", 1)[1])  # (on by default, on loopback)
        assert _listening_ports() - before == {node.address.port, front_door}  # nothing else
    finally:
        node.stop()


def test_a_metrics_port_in_use_is_a_config_error(grid):
    taken = grid["L1"].metrics_address
    node = Node(grid["L1"].session, "clash", cluster="Q", listen_address="127.0.0.1:0", control="",
                metrics=str(taken))
    with pytest.raises(ConfigError, match="cannot serve metrics"):
        node.start()
    node.stop()


def test_metrics_addresses():
    assert str(parse_metrics_address("9464")) == "127.0.0.1:9464"
    assert str(parse_metrics_address(":9464")) == "127.0.0.1:9464"
    assert str(parse_metrics_address("0.0.0.0:9464")) == "0.0.0.0:9464"
    for bad in ("unix:/tmp/x", "host:port", ""):
        with pytest.raises(ConfigError):
            parse_metrics_address(bad)


# --- the command line ---------------------------------------------------------------------------


def scrape_url(url: str) -> Dict[Tuple[str, Labels], float]:
    """Samples of another process's endpoint (a plain blocking GET)."""
    with urllib.request.urlopen(url, timeout=SCRAPE_TIMEOUT_S) as response:
        assert response.status == 200
        text = response.read().decode()
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def test_the_metrics_option_of_node_and_rendezvous(tmp_path, sock_dir):
    session = create_session(tmp_path / "rv", "127.0.0.1:1")
    env = dict(os.environ, GRIDSOCK_RUN_DIR=str(sock_dir), PYTHONWARNINGS="error", PYTHONUNBUFFERED="1")
    started = []

    def start(*args: str) -> subprocess.Popen:
        with open(tmp_path / f"{args[0]}.log", "wb") as log:
            proc = subprocess.Popen(gridsock_argv(*args), stdout=subprocess.PIPE, stderr=log, env=env)
        started.append(proc)
        return proc

    try:
        rv = start("rendezvous", "--session", str(session.path), "--listen", "127.0.0.1:0", "--metrics", "127.0.0.1:0")
        port = int(wait_for_line(rv, "rendezvous listening ", timeout=JOIN_TIMEOUT_S).rsplit(":", 1)[1])
        rv_url = wait_for_line(rv, "metrics on ", timeout=JOIN_TIMEOUT_S).split()[-1]
        node_session = tmp_path / "node-session.toml"
        text, count = re.subn(r'^rendezvous = "127\.0\.0\.1:1"$', f'rendezvous = "127.0.0.1:{port}"',
                              session.path.read_text(), flags=re.M)
        assert count == 1
        node_session.write_text(text)
        node = start("node", "--session", str(node_session), "--name", "n1", "--cluster", "A",
                     "--listen", "127.0.0.1:0", "--metrics", "0")  # a bare port: on loopback
        node_url = wait_for_line(node, "metrics on ", timeout=JOIN_TIMEOUT_S).split()[-1]
        assert wait_for_line(node, "joined n1 ", timeout=JOIN_TIMEOUT_S)
        # Settled: the rendez-vous node's dial-back to n1's node port is over before n1 stops.
        call(str(sock_dir / "n1.sock"), "wait", {"present": ["n1"], "settled": True, "timeout": JOIN_TIMEOUT_S},
             timeout=JOIN_TIMEOUT_S + 5)
        assert rv_url.startswith("http://127.0.0.1:") and node_url.startswith("http://127.0.0.1:")
        node_samples = scrape_url(node_url)
        assert value(node_samples, "gridsock_uplink_up") == 1
        deadline = time.monotonic() + SCRAPE_TIMEOUT_S
        while value(scrape_url(rv_url), "gridsock_leader_links") != 1:  # (it joined: the link is up)
            assert time.monotonic() < deadline, "the rendez-vous node never counted n1's link"
            time.sleep(0.05)
    finally:
        for proc in reversed(started):
            stop_process(proc)
            assert proc.stdout is not None
            proc.stdout.close()
    for log in ("rendezvous.log", "node.log"):
        text = (tmp_path / log).read_text() if (tmp_path / log).exists() else ""
        assert "Traceback" not in text and "Warning: " not in text, f"{log}:\n{text}"
