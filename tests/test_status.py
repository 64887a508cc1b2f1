"""``gridsock status``: the path to each peer and why, and every live data connection.

Two grids: the in-process loopback grid (:mod:`gridsock.testing.grid`) for the per-peer path
records after races, and real node processes with unmodified stdlib programs under the socket
personality (as in tests/test_personality.py) for connections handed to programs.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import gevent.socket
import pytest

from gridsock import assembly, procnet, wire
from gridsock.bootstrap.control import call
from gridsock.cli import format_status
from gridsock.errors import ConnectError
from gridsock.testing.grid import JOIN_TIMEOUT_S, loopback_grid
from gridsock.testing.methods import FixedRules, FlopMethod
from gridsock.testing.procs import wait_for_line
from test_cli import READY_TIMEOUT_S, STRICT_ENV, Procs, start_rendezvous

pytestmark = pytest.mark.timeout(180)

PORT = 5100
# A script under the personality starts (interpreter and imports) and answers within this.
SCRIPT_TIMEOUT_S = 60.0


# --- paths: the loopback grid, in this process ---------------------------------------------------






@pytest.fixture(scope="module")
def loopback(tmp_path_factory):
    from gridsock.registry import default_registry

    default_registry.register("flop", FlopMethod)
    try:
        with loopback_grid(tmp_path_factory.mktemp("status")) as running:
            listeners = {name: node.listen(PORT) for name, node in running.nodes.items()}
            yield running, listeners
    finally:
        default_registry.unregister("flop")


def paths_of(node) -> dict:
    return {p["peer"]: p for p in node.status()["paths"]}


def test_paths_say_which_method_won_and_why_the_others_did_not(loopback, monkeypatch):
    grid, listeners = loopback
    m1 = grid["m1"]
    monkeypatch.setattr(assembly, "STAGGER_S", 3600.0)  # only the failure starts tcp
    monkeypatch.setattr(m1.assembler, "rules", FixedRules(order=("flop", "tcp")))
    assert "L1" not in paths_of(m1)
    client, _ = m1.open_stream("L1", PORT)
    server, _ = listeners["L1"].accept_stream(timeout=JOIN_TIMEOUT_S)
    client.close()
    server.close()
    path = paths_of(m1)["L1"]
    assert (path["stack"], path["method"], path["direct"], path["chosen"]) == ("tcp", "tcp", True, "rules")
    assert path["peer_id"] == grid["L1"].node_id and path["connect_ms"] > 0
    [(stack, why)] = path["tried"]
    assert stack == "flop" and "flop: network unreachable" in why
    assert [r["stack"] for r in path["reasons"]] == ["flop"] and "network unreachable" in path["reasons"][0]["reason"]
    assert path["cached"]["stack"] == "tcp" and path["cached"]["until"] > path["at"]
    json.dumps(m1.status())  # the whole status is JSON

    # The cached winner goes first and wins alone: nothing else tried, the reasons stay.
    client, _ = m1.open_stream("L1", PORT)
    server, _ = listeners["L1"].accept_stream(timeout=JOIN_TIMEOUT_S)
    client.close()
    server.close()
    again = paths_of(m1)["L1"]
    assert again["stack"] == "tcp" and again["tried"] == [] and again["at"] >= path["at"]
    assert [r["stack"] for r in again["reasons"]] == ["flop"]  # (not tried this time: the earlier reason stays)
    assert "network unreachable" in again["reasons"][0]["reason"]

    text = format_status(m1.status())
    part = text.split("paths (how this node last reached each peer):\n", 1)[1]
    row = next(line for line in part.splitlines() if line.split()[:1] == ["L1"])
    assert row.split()[1:4] == ["direct", "tcp", "tcp"]
    assert any(line.strip().startswith("not flop: ") and "flop: network unreachable" in line
               for line in part.splitlines())


def test_a_relayed_path_and_a_failed_race(loopback, monkeypatch):
    grid, listeners = loopback
    m1 = grid["m1"]
    client, _ = m1.open_stream("m2", PORT, stack="tls/relay")
    server, _ = listeners["m2"].accept_stream(timeout=JOIN_TIMEOUT_S)
    client.close()
    server.close()
    path = paths_of(m1)["m2"]
    assert (path["stack"], path["method"], path["direct"], path["chosen"]) == ("tls/relay", "relay", False, "caller")

    monkeypatch.setattr(assembly, "STAGGER_S", 3600.0)
    monkeypatch.setattr(m1.assembler, "rules", FixedRules(order=("tls/flop", "tls/lz4/flop")))
    with pytest.raises(ConnectError):
        m1.open_stream("L2", PORT)
    failed = paths_of(m1)["L2"]
    assert failed["stack"] is None and failed["direct"] is None and failed["cached"] is None
    assert [stack for stack, _ in failed["tried"]] == ["tls/flop", "tls/lz4/flop"]
    text = format_status(m1.status())
    assert any(line.split()[:2] == ["L2", "failed"] for line in text.splitlines())
    assert any(line.split()[:2] == ["m2", "relayed"] for line in text.splitlines())


def test_a_candidate_never_started_says_the_winner_came_first(loopback, monkeypatch):
    grid, listeners = loopback
    m1 = grid["m1"]
    monkeypatch.setattr(assembly, "STAGGER_S", 3600.0)  # tcp connects long before relay would start
    monkeypatch.setattr(m1.assembler, "rules", FixedRules(order=("tcp", "lz4/relay")))
    client, info = m1.open_stream("m2", PORT)
    server, _ = listeners["m2"].accept_stream(timeout=JOIN_TIMEOUT_S)
    client.close()
    server.close()
    assert info.stack == "tcp" and "tried" not in info.detail
    path = paths_of(m1)["m2"]
    assert path["stack"] == "tcp" and path["tried"] == []
    reasons = {r["stack"]: r["reason"] for r in path["reasons"]}
    assert reasons["lz4/relay"] == "not tried: tcp connected first"


def test_paths_are_bounded(loopback, monkeypatch):
    grid, listeners = loopback
    m1 = grid["m1"]
    monkeypatch.setattr(assembly, "PATHS_KEPT", 1)
    client, _ = m1.open_stream("L1", PORT, stack="tcp")
    server, _ = listeners["L1"].accept_stream(timeout=JOIN_TIMEOUT_S)
    client.close()
    server.close()
    assert [p["peer"] for p in m1.status()["paths"]] == ["L1"]  # the most recent only


def test_connections_of_this_process_are_listed_with_bytes_while_open(loopback):
    grid, listeners = loopback
    m1 = grid["m1"]
    sock, info = m1.connect("m2", PORT, stack="tls/relay")
    server_sock, _ = listeners["m2"].accept(timeout=JOIN_TIMEOUT_S)
    try:
        sock.sendall(b"12345")  # (room in its buffer: it does not block the hub)
        gevent.socket.wait_read(server_sock.fileno(), JOIN_TIMEOUT_S)  # the bridges pump meanwhile
        assert server_sock.recv(100) == b"12345"
        [listed] = [c for c in m1.status()["connections"] if c["conn"] == info.conn]
        assert (listed["peer"], listed["port"], listed["stack"], listed["side"]) == ("m2", PORT, "tls/relay", "client")
        assert listed["bytes_sent"] == 5 and listed["handed"] is False and listed["pid"] is None
        assert listed["age_s"] >= 0
        text = format_status(m1.status())
        row = next(line for line in text.splitlines() if line.split()[:1] == [f"#{info.conn}"])
        assert row.split()[1:4] == ["client", f"m2:{PORT}", "tls/relay"] and "5 B" in row
    finally:
        sock.close()
        server_sock.close()
    assert info.conn not in [c["conn"] for c in m1.status()["connections"]]


def test_proc_net_tcp_addresses_parse():
    assert procnet.endpoint("0100007F:1F90") == ("127.0.0.1", 8080)
    assert procnet.endpoint("00000000000000000000000001000000:0050") == ("::1", 80)
    assert procnet.endpoint("0000000000000000FFFF00000100007F:0016") == ("::ffff:127.0.0.1", 22)


# --- connections handed to programs: node processes and the socket personality ---------------


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    """A rendez-vous node and two leaders as processes: ``na`` (cluster A) reaches ``nb``
    (cluster B, which takes anything from outside) over plain ``tcp`` by its rules; ``nb``
    reaches ``na`` by the default rules (``tls/tcp``: bridged)."""
    tmp = tmp_path_factory.mktemp("stat")
    run_dir = tmp_path_factory.mktemp("r")
    env = dict(os.environ, GRIDSOCK_RUN_DIR=str(run_dir), **STRICT_ENV)
    procs = Procs(tmp, env)
    try:
        _, session = start_rendezvous(procs, tmp, env)
        (tmp / "na.toml").write_text('[[rule]]\nfrom = "*"\nto = "name:nb"\nstack = "tcp"\n')
        (tmp / "nb.toml").write_text("[policy]\noutside_cluster = []\n")
        for name, cluster in (("na", "A"), ("nb", "B")):
            proc = procs.start(name, "node", "--session", str(session), "--name", name, "--cluster", cluster,
                               "--listen", "127.0.0.1:0", "--rules", str(tmp / f"{name}.toml"))
            wait_for_line(proc, f"joined {name} ", timeout=READY_TIMEOUT_S)
        for name in ("na", "nb"):
            call(str(run_dir / f"{name}.sock"), "wait", {"present": ["na", "nb"], "settled": True,
                                                         "timeout": READY_TIMEOUT_S}, timeout=READY_TIMEOUT_S + 5)
        yield Grid(tmp, run_dir, env, procs)
    finally:
        procs.stop_all()


class Grid:
    def __init__(self, tmp, run_dir, env, procs) -> None:
        self.tmp, self.run_dir, self.env, self.procs = tmp, run_dir, env, procs
        self.scripts = 0

    def status(self, node: str) -> dict:
        return call(str(self.run_dir / f"{node}.sock"), "status")

    def start(self, node: str, text: str, *args: str) -> subprocess.Popen:
        """Start an unmodified stdlib script under the personality, using ``node``'s agent; its
        stdin and stdout are pipes; it is stopped with the grid's processes."""
        self.scripts += 1
        path = self.tmp / f"script{self.scripts}.py"
        path.write_text(textwrap.dedent(text))
        with open(self.tmp / f"script{self.scripts}.log", "wb") as log:
            proc = subprocess.Popen([sys.executable, "-m", "gridsock.monkey", "--node", node, str(path), *args],
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, env=self.env)
        self.procs.started.append(proc)
        return proc


# Serves one connection: says when it has it and what came, closes at the client's EOF.
SERVER = """
    import socket
    server = socket.socket()
    server.bind(("", 0))
    server.listen()
    print("serving", server.getsockname()[1], flush=True)
    conn, _ = server.accept()
    server.close()
    print("accepted", flush=True)
    got = b""
    while True:
        data = conn.recv(65536)
        if not data:
            break
        got += data
    conn.close()
    print("closed", len(got), flush=True)
"""

# Connects, sends five bytes, holds the connection until told to close it on stdin.
CLIENT = """
    import socket, sys
    sock = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=30)
    sock.sendall(b"hello")
    print("connected", flush=True)
    assert sys.stdin.readline() == "close\\n"
    sock.close()
    print("closed", flush=True)
    sys.stdin.read()
"""


def listed(status: dict, peer: str, port: int, side: str) -> list:
    return [c for c in status["connections"] if (c["peer"], c["port"], c["side"]) == (peer, port, side)]


@pytest.mark.parametrize("client,server,stack", [("na", "nb", "tcp"), ("nb", "na", "tls/tcp")])
def test_a_programs_connection_is_listed_while_open_and_not_after(grid, client, server, stack):
    serving = grid.start(server, SERVER)
    port = int(wait_for_line(serving, "serving ", timeout=SCRIPT_TIMEOUT_S).split()[1])
    holding = grid.start(client, CLIENT, server, str(port))
    wait_for_line(holding, "connected", timeout=SCRIPT_TIMEOUT_S)
    wait_for_line(serving, "accepted", timeout=SCRIPT_TIMEOUT_S)

    [mine] = listed(grid.status(client), server, port, "client")
    [theirs] = listed(grid.status(server), client, port, "server")
    for record, proc in ((mine, holding), (theirs, serving)):
        assert record["stack"] == stack and record["handed"] is True and record["pid"] == proc.pid
        assert record["age_s"] >= 0 and record["conn"] >= 1
    if stack == "tcp":  # the kernel socket itself is the program's: the kernel counts its bytes
        assert mine["bridged"] is False and mine["rtt_ms"] > 0
        # (sequence space: the node's preamble and nomination, then the program's five bytes; the
        # SYN may count one)
        assert mine["bytes_sent"] - (wire.PREAMBLE_BYTES + len(assembly.NOMINATE)) in (5, 6), mine
        assert mine["bytes_received"] in (0, 1), mine
    else:
        assert mine["bridged"] is True and mine["bytes_sent"] == 5 and mine["bytes_received"] == 0
    text = subprocess.run([sys.executable, "-m", "gridsock", "status", "--node", client], env=grid.env,
                          capture_output=True, text=True, timeout=SCRIPT_TIMEOUT_S, check=True).stdout
    row = next(line for line in text.splitlines() if line.split()[:1] == [f"#{mine['conn']}"])
    assert row.split()[1:4] == ["client", f"{server}:{port}", stack] and f"pid {holding.pid}" in row

    holding.stdin.write(b"close\n")
    holding.stdin.flush()
    wait_for_line(holding, "closed", timeout=SCRIPT_TIMEOUT_S)
    assert not listed(grid.status(client), server, port, "client")
    assert wait_for_line(serving, "closed ", timeout=SCRIPT_TIMEOUT_S) == "closed 5"
    assert not listed(grid.status(server), client, port, "server")
    holding.stdin.close()
    assert holding.wait(SCRIPT_TIMEOUT_S) == 0 and serving.wait(SCRIPT_TIMEOUT_S) == 0

    paths = {p["peer"]: p for p in grid.status(client)["paths"]}
    assert paths[server]["stack"] == stack and paths[server]["direct"] is True


# A non-blocking connect (asyncio): the program sends its own socketpair end, the node bridges
# the connection to it; the record lasts until that bridge ends.
ASYNC_CLIENT = """
    import asyncio, sys

    async def main():
        reader, writer = await asyncio.open_connection(sys.argv[1], int(sys.argv[2]))
        writer.write(b"hello")
        await writer.drain()
        print("connected", flush=True)
        loop = asyncio.get_running_loop()
        assert await loop.run_in_executor(None, sys.stdin.readline) == "close\\n"
        writer.close()
        await writer.wait_closed()
        print("closed", flush=True)
        await loop.run_in_executor(None, sys.stdin.read)

    asyncio.run(main())
"""
# The bridge ends once the program's end is gone: it notices within this (a loaded machine).
BRIDGE_END_TIMEOUT_S = 20.0


def test_an_asyncio_programs_connection_is_listed_until_the_program_closes_it(grid):
    """A non-blocking connect made in time gets the kernel's TCP socket itself (handed over, as a
    blocking one does), listed by its inode until the program closes it."""
    serving = grid.start("nb", SERVER)
    port = int(wait_for_line(serving, "serving ", timeout=SCRIPT_TIMEOUT_S).split()[1])
    holding = grid.start("na", ASYNC_CLIENT, "nb", str(port))
    wait_for_line(holding, "connected", timeout=SCRIPT_TIMEOUT_S)
    wait_for_line(serving, "accepted", timeout=SCRIPT_TIMEOUT_S)
    [mine] = listed(grid.status("na"), "nb", port, "client")
    assert mine["stack"] == "tcp" and mine["handed"] is True and mine["pid"] == holding.pid
    assert mine["bridged"] is False

    holding.stdin.write(b"close\n")
    holding.stdin.flush()
    wait_for_line(holding, "closed", timeout=SCRIPT_TIMEOUT_S)
    assert wait_for_line(serving, "closed ", timeout=SCRIPT_TIMEOUT_S) == "closed 5"
    deadline = time.monotonic() + BRIDGE_END_TIMEOUT_S  # (the bridge ends in the node, on its own)
    while listed(grid.status("na"), "nb", port, "client"):
        assert time.monotonic() < deadline, "still listed after the program closed its connection"
    holding.stdin.close()
    assert holding.wait(SCRIPT_TIMEOUT_S) == 0 and serving.wait(SCRIPT_TIMEOUT_S) == 0
