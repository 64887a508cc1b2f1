"""Breaks on the lab grid: a node that dies under a connection is never a clean close.

Each case starts a client program under ``gridsock run`` that reads a long stream, kills a node
on the path (SIGKILL) while the program is in the middle of it, and checks that the program's
``recv`` raises ConnectionResetError -- not ``b""`` after a part of the stream, which is what a
user saw before (silent data loss). The client reads a few MiB, pauses while the node is
killed (so the kill always lands mid-stream, whatever the link's speed), then reads on.

Which server, so that killing "the server's node" really breaks the path:

- plain ``tcp``: the node hands a program under ``gridsock run`` the kernel TCP socket itself;
  the data path does not go through the node, and killing the node rightly breaks nothing. So
  the server is the echo service that runs *inside* the server's node process (``--echo``,
  every lab node has one): killing the node kills the server's end. The client sends in a
  thread so that the echo answers, then stops the sender and reads the echo of everything it
  sent before it pauses. So the node has nothing unread when it dies (the kernel resets a
  socket closed with unread data anyway, which would hide a missing ``SO_LINGER``), and the
  reader alone looks at the socket when the reset comes: the kernel reports a connection's
  error once, to the first call that looks, and a sender blocked in ``send()`` would take it
  and leave the reader an EOF (as with any kernel TCP socket).
- every other stack: a program under ``gridsock run`` on the server's node that pushes data
  and never reads (the client sends nothing): the node bridges its socket to the stack, so
  killing the node breaks the path; and since the client's bridge has nothing unread when the
  reset comes, only the bridge's abortive close can turn the break into a reset (a kernel
  resets a socket closed with unread data whatever the bridge does, which would hide a bug).

The other side: a server program reading an upload gets the reset when the client's node
dies (``tls/splice``, a2 to b2).

The unmodified-application case: ``python -m http.server`` under ``gridsock run`` on b2 and a
``urllib`` download under ``gridsock run`` on a2 (``tls/splice``, named by a2's rules: killing
b2's node breaks the path), read in chunks as ``shutil.copyfileobj`` does (``read(amt)`` is
what returned a short body without an error); it must raise ``http.client.IncompleteRead`` or
ConnectionResetError.

One grid for the module; each test restarts what it killed and waits until the grid is whole
again before it ends.
"""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from gridsock.testing.procs import gridsock_argv, stop_process, wait_for_line

from .gridsession import ECHO_PORT, JOIN_TIMEOUT_S, REJOIN_TIMEOUT_S, make_grid

pytestmark = pytest.mark.timeout(600)

# A program (interpreter start, the connection, the stream) reaches each of its lines within this.
APP_TIMEOUT_S = 120.0
# What the client reads before the kill: enough that the stream is well under way.
READ_BEFORE_KILL_BYTES = 4 << 20
# The urllib download: far more than every buffer on the path holds, so it cannot be complete
# when the client stops reading.
DOWNLOAD_BYTES = 200 << 20
# a2 reaches b2 by simultaneous open through gwa's NAT and fwb's firewall (test_data's splice
# case): the urllib download's stack, named so that the test does not depend on the race.
A2_RULES = """
[[rule]]
from = "name:a2"
to = "name:b2"
stack = "tls/splice"
"""

CLIENT = """
    import os, select, sys, threading
    from gridsock.agentclient import AgentClient

    peer, port, stack, before, echo = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), sys.argv[5]
    sock, info = AgentClient.from_env().connect(peer, port, stack=stack, timeout=60)
    print("connected", info["stack"], flush=True)
    sock.settimeout(90)
    stop = threading.Event()
    sent = [0]

    def send_until_stopped():  # the echo answers only what it gets
        block = os.urandom(65536)
        try:
            while not stop.is_set():
                if select.select([], [sock], [], 0.05)[1]:
                    sent[0] += sock.send(block)
        except OSError:
            pass  # the reader reports what happened to the connection

    sender = threading.Thread(target=send_until_stopped)
    if echo == "echo":
        sender.start()
    got = 0
    try:
        while got < before:
            data = sock.recv(65536)
            if not data:
                break
            got += len(data)
        stop.set()  # only the reader may touch the socket when the reset comes (module doc)
        if sender.is_alive():
            sender.join()
            while got < sent[0]:  # the echo's answer to everything: its node has nothing unread
                data = sock.recv(65536)
                if not data:
                    break
                got += len(data)
        print("streaming", got, flush=True)
        sys.stdin.readline()  # the test killed a node meanwhile
        while True:
            data = sock.recv(65536)
            if not data:
                print("RESULT eof", got, flush=True)
                break
            got += len(data)
    except ConnectionResetError:
        print("RESULT reset", got, flush=True)
    except OSError as exc:
        print("RESULT", type(exc).__name__, got, flush=True)
    finally:
        stop.set()
"""

PUSH_SERVER = """
    import os, socket
    server = socket.socket()
    server.bind(("", 0))
    server.listen(1)
    print("serving", server.getsockname()[1], flush=True)
    conn, _ = server.accept()
    block = os.urandom(1 << 20)
    try:
        while True:
            conn.sendall(block)
    except OSError:
        pass  # its node died, or the client went
"""

DOWNLOAD = """
    import http.client, sys, urllib.request

    url, size = sys.argv[1], int(sys.argv[2])
    with urllib.request.urlopen(url, timeout=90) as response:
        assert int(response.headers["Content-Length"]) == size
        got = 0
        while got < 8 << 20:
            got += len(response.read(65536))
        print("streaming", got, flush=True)
        sys.stdin.readline()  # the test killed the server's node meanwhile
        try:
            while True:  # shutil.copyfileobj's loop
                data = response.read(65536)
                if not data:
                    break
                got += len(data)
        except http.client.IncompleteRead as exc:
            print("RESULT IncompleteRead", got + len(exc.partial), flush=True)
        except OSError as exc:
            print("RESULT", type(exc).__name__, got, flush=True)
        else:
            print("RESULT", "complete" if got == size else "short", got, flush=True)
"""


@pytest.fixture(scope="module")
def grid(lab, tmp_path_factory):
    yield from make_grid(lab, tmp_path_factory, rules={"a2": A2_RULES})


class Programs:
    """Programs under ``gridsock run`` in the grid's namespaces, stopped at the end of a test."""

    def __init__(self, grid) -> None:
        self.grid = grid
        self.procs = []

    def start(self, node: str, argv: list) -> subprocess.Popen:
        log = open(self.grid.tmp / f"program{len(self.procs)}-{node}.log", "wb")
        try:
            proc = self.grid.lab.spawn(node, gridsock_argv("run", "--node", node, "--", *argv),
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log,
                                       env=self.grid.env)
        finally:
            log.close()
        self.procs.append(proc)
        return proc

    def script(self, node: str, text: str, *args: str) -> subprocess.Popen:
        path = self.grid.tmp / f"script{len(self.procs)}.py"
        path.write_text(textwrap.dedent(text))
        return self.start(node, [sys.executable, str(path), *args])

    def stop(self) -> None:
        for proc in self.procs:
            stop_process(proc)
            for pipe in (proc.stdin, proc.stdout):
                if pipe is not None:
                    pipe.close()


@pytest.fixture
def programs(grid):
    p = Programs(grid)
    yield p
    p.stop()


def kill(grid, name: str) -> None:
    proc = grid.procs[name]
    proc.kill()
    proc.wait(timeout=10)


def restart(grid, name: str) -> None:
    """Start ``name`` (a node, or "rendezvous") again and wait until the grid is whole."""
    if grid.procs[name].poll() is None:
        return
    if name == "rendezvous":
        grid.start_rendezvous()
    else:
        wait_for_line(grid.start_node(name), "joined", timeout=JOIN_TIMEOUT_S)
    grid.wait_all(timeout=REJOIN_TIMEOUT_S)


def go_on(proc) -> str:
    """Let a paused program read on; return its RESULT line."""
    proc.stdin.write(b"go\n")
    proc.stdin.flush()
    return wait_for_line(proc, "RESULT", timeout=APP_TIMEOUT_S)


# (stack, client node, server node): tcp and the layers over it inside cluster A; splice and
# the relay between the NAT'd a2 and the firewalled b2 (route a2 > a1 > rendezvous > b1 > b2).
SERVER_KILLED_CASES = [
    ("tcp", "a1", "a2"),
    ("lz4/tcp", "a1", "a2"),
    ("parallel(streams=4)/tcp", "a1", "a2"),
    ("tls/splice", "a2", "b2"),
    ("tls/relay", "a2", "b2"),
]


def _stream_then_kill(grid, programs, stack: str, client: str, server: str, victim: str) -> str:
    """Start the server (module docstring) and the client; kill ``victim`` mid-stream; return
    the client's RESULT line."""
    if stack == "tcp":
        port, mode = ECHO_PORT, "echo"
    else:
        pusher = programs.script(server, PUSH_SERVER)
        port, mode = int(wait_for_line(pusher, "serving", timeout=APP_TIMEOUT_S).split()[1]), "push"
    proc = programs.script(client, CLIENT, server, str(port), stack, str(READ_BEFORE_KILL_BYTES), mode)
    assert wait_for_line(proc, "connected", timeout=APP_TIMEOUT_S).split()[1] == stack
    streaming = wait_for_line(proc, "streaming", timeout=APP_TIMEOUT_S)
    assert int(streaming.split()[1]) >= READ_BEFORE_KILL_BYTES, streaming
    kill(grid, victim)
    return go_on(proc)


@pytest.mark.parametrize("stack,client,server", SERVER_KILLED_CASES)
def test_server_node_killed_mid_stream_resets_the_client(grid, programs, stack, client, server):
    try:
        result = _stream_then_kill(grid, programs, stack, client, server, server)
        assert result.split()[1] == "reset", f"{stack}: {result} (a dead server read as a clean close?)"
    finally:
        programs.stop()
        restart(grid, server)


def test_rendezvous_killed_under_a_relayed_connection_resets_the_client(grid, programs):
    try:
        result = _stream_then_kill(grid, programs, "tls/relay", "a2", "b2", "rendezvous")
        assert result.split()[1] == "reset", f"{result} (a lost relay path read as a clean close?)"
    finally:
        programs.stop()
        restart(grid, "rendezvous")


SINK_SERVER = """
    import socket, sys
    before = int(sys.argv[1])
    server = socket.socket()
    server.bind(("", 0))
    server.listen(1)
    print("serving", server.getsockname()[1], flush=True)
    conn, _ = server.accept()
    conn.settimeout(90)
    got = 0
    try:
        while got < before:
            data = conn.recv(65536)
            if not data:
                break
            got += len(data)
        print("streaming", got, flush=True)
        sys.stdin.readline()  # the test killed the client's node meanwhile
        while True:
            data = conn.recv(65536)
            if not data:
                print("RESULT eof", got, flush=True)
                break
            got += len(data)
    except ConnectionResetError:
        print("RESULT reset", got, flush=True)
    except OSError as exc:
        print("RESULT", type(exc).__name__, got, flush=True)
"""

PUSH_CLIENT = """
    import os, sys
    from gridsock.agentclient import AgentClient
    peer, port, stack = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    sock, info = AgentClient.from_env().connect(peer, port, stack=stack, timeout=60)
    print("connected", info["stack"], flush=True)
    block = os.urandom(1 << 20)
    try:
        while True:
            sock.sendall(block)
    except OSError:
        pass  # its node died
"""


def test_client_node_killed_mid_upload_resets_the_server(grid, programs):
    """The other side: a server program (under ``gridsock run`` on b2) reading an upload gets
    the reset when the client's node (a2) dies. The server only reads, so its bridge has
    nothing unread: only the bridge's abortive close can make the reset."""
    try:
        sink = programs.script("b2", SINK_SERVER, str(READ_BEFORE_KILL_BYTES))
        port = wait_for_line(sink, "serving", timeout=APP_TIMEOUT_S).split()[1]
        client = programs.script("a2", PUSH_CLIENT, "b2", port, "tls/splice")
        assert wait_for_line(client, "connected", timeout=APP_TIMEOUT_S).split()[1] == "tls/splice"
        wait_for_line(sink, "streaming", timeout=APP_TIMEOUT_S)
        kill(grid, "a2")
        result = go_on(sink)
        assert result.split()[1] == "reset", f"{result} (a dead client read as a clean close?)"
    finally:
        programs.stop()
        restart(grid, "a2")


def test_urllib_download_raises_when_the_server_node_dies(grid, programs):
    directory = grid.tmp / "www"
    directory.mkdir(exist_ok=True)
    block = bytes(range(256)) * 4096  # 1 MiB
    with open(directory / "big.bin", "wb") as f:
        for _ in range(DOWNLOAD_BYTES >> 20):
            f.write(block)
    try:
        server = programs.start("b2", [sys.executable, "-m", "http.server", "0", "--directory", str(directory)])
        port = wait_for_line(server, "Serving HTTP on ", timeout=APP_TIMEOUT_S).split(" port ")[1].split()[0]
        client = programs.script("a2", DOWNLOAD, f"http://b2:{port}/big.bin", str(DOWNLOAD_BYTES))
        wait_for_line(client, "streaming", timeout=APP_TIMEOUT_S)
        kill(grid, "b2")
        result = go_on(client).split()
        assert result[1] in ("IncompleteRead", "ConnectionResetError"), f"the download ended with {result}"
        assert int(result[2]) < DOWNLOAD_BYTES
    finally:
        programs.stop()
        restart(grid, "b2")
