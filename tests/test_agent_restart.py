"""Programs keep their grid ports through a restart of their node (issue 12).

A rendez-vous node and two nodes as processes on loopback (``na``, ``nb``, each with a state
directory of its own), a ``python -m http.server`` under ``gridsock run --node nb``. ``nb`` is
killed with SIGKILL and started again with the same state directory: the server program, never
restarted, serves the same grid port of the same grid address again (its listener reconnected
to the new node's agent and registered the port again), and a client under ``gridsock run
--node na`` fetches from it byte-exact. A connection that was open through the old node breaks
as a break does: a reset, never a clean end. The listener's own client
(:class:`gridsock.agentclient.AgentListener`) is watched too: the same object accepts again,
and counts one reconnection.

The listener's keeper alone, against a fake agent (a Unix socket served by a thread, speaking
the agent protocol with :mod:`gridsock.agentwire`) that dies and comes back at will: the same
port is asked of the next agent with the same socketpair end; a port taken meanwhile, or no
agent within the listener's bound, ends it (its socket reads EOF); a release while no agent is
there ends the keeper at once.
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from gridsock import agentwire, wire
from gridsock.agentclient import AgentClient
from gridsock.bootstrap.control import call
from gridsock.testing.procs import gridsock_argv, wait_for_line
from test_cli import READY_TIMEOUT_S, STRICT_ENV, Procs, start_rendezvous

pytestmark = pytest.mark.timeout(240)

# A program under gridsock run (interpreter start, a grid connection, a small file) ends within this.
RUN_TIMEOUT_S = 90.0
# The restarted node serves the program's grid port again within this (its listener's keeper
# retries at most RECONNECT_MAX_S apart; the node starts and joins in a second or two).
BACK_TIMEOUT_S = 60.0
# How often the test looks whether the port is served again (a condition, polled).
POLL_S = 0.1
PAYLOAD_BYTES = 256 << 10

FETCH = """
import hashlib, sys, urllib.request
with urllib.request.urlopen(sys.argv[1], timeout=60) as response:
    print(response.status, hashlib.sha256(response.read()).hexdigest())
"""

# A server of our own under the personality on nb: an AgentListener (the public client, no
# patching) beside the personality's listening socket, and a connection kept open through nb.
HOLDER = """
import socket, sys
from gridsock.agentclient import AgentClient
from gridsock.personalities.socket import agent

listener = agent().listen(0)
print("listening", listener.port, flush=True)
conn, info = listener.accept()          # the client's first connection, made before the restart
print("accepted", info["peer"], flush=True)
conn.settimeout(120)
try:
    data = conn.recv(100)               # nb is killed meanwhile: the bridge breaks
    print("recv", repr(data), flush=True)
except ConnectionResetError:
    print("reset", flush=True)
except OSError as exc:
    print("error", exc, flush=True)
finally:
    conn.close()
again, info = listener.accept()         # through the new nb: the same listener object
again.sendall(b"hello again")
again.close()
listener.release()                      # (the keeper has ended: its count is final)
print("accepted again", info["peer"], listener.reconnects, flush=True)
"""

CONNECTOR = """
import socket, sys
from gridsock.personalities.socket import agent
port = int(sys.argv[1])
sock, info = agent().connect("nb", port, stack="tls/tcp", timeout=30)
print("connected", info["stack"], flush=True)
sock.settimeout(120)
try:
    data = sock.recv(100)
    print("recv", repr(data), flush=True)
except ConnectionResetError:
    print("reset", flush=True)
finally:
    sock.close()
"""


class Grid:
    def __init__(self, tmp, run_dir, env, procs, session) -> None:
        self.tmp, self.run_dir, self.env, self.procs, self.session = tmp, run_dir, env, procs, session

    def start_node(self, name: str, cluster: str, *, log: str = "") -> subprocess.Popen:
        proc = self.procs.start(log or name, "-v", "node", "--session", str(self.session), "--name", name,
                                "--cluster", cluster, "--listen", "127.0.0.1:0", "--front-door", "off",
                                "--state-dir", str(self.tmp / f"state-{name}"),
                                "--rules", str(self.tmp / "open.toml"))
        return proc

    def control(self, name: str, op: str, args=None):
        return call(str(self.run_dir / f"{name}.sock"), op, args or {}, timeout=READY_TIMEOUT_S + 5)

    def wait_present(self, name: str, present) -> None:
        self.control(name, "wait", {"present": list(present), "settled": True, "timeout": READY_TIMEOUT_S})

    def run(self, *argv: str) -> subprocess.CompletedProcess:
        return subprocess.run(gridsock_argv("run", *argv), capture_output=True, env=self.env, timeout=RUN_TIMEOUT_S)

    def start_program(self, node: str, name: str, *argv: str) -> subprocess.Popen:
        with open(self.tmp / f"{name}.log", "wb") as log:
            proc = subprocess.Popen(gridsock_argv("run", "--node", node, "--", *argv), stdout=subprocess.PIPE,
                                    stderr=log, env=self.env)
        self.procs.started.append(proc)
        return proc

    def fetch(self, url: str) -> str:
        done = self.run("--node", "na", "--", sys.executable, "-c", FETCH, url)
        assert done.returncode == 0, done.stderr.decode()
        return done.stdout.decode().strip()

    def wait_listening(self, node: str, port: int) -> None:
        """Return once ``node`` serves grid port ``port`` (its status says), within BACK_TIMEOUT_S."""
        deadline = time.monotonic() + BACK_TIMEOUT_S
        while port not in self.control(node, "status")["listening"]:
            assert time.monotonic() < deadline, f"{node} does not serve grid port {port} again"
            time.sleep(POLL_S)


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("restart")
    run_dir = tmp_path_factory.mktemp("s") / "run"  # (a short path: a Unix socket path must fit in 107 bytes)
    env = dict(os.environ, GRIDSOCK_RUN_DIR=str(run_dir), **STRICT_ENV)
    for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "all_proxy",
                 "no_proxy", "NO_PROXY"):
        env.pop(name, None)
    procs = Procs(tmp_path, env)
    try:
        _, session = start_rendezvous(procs, tmp_path, env)
        (tmp_path / "open.toml").write_text("[policy]\noutside_cluster = []\n")
        grid = Grid(tmp_path, run_dir, env, procs, session)
        grid.nodes = {}
        for name, cluster in (("na", "A"), ("nb", "B")):
            proc = grid.start_node(name, cluster)
            grid.nodes[name] = (proc, wait_for_line(proc, f"joined {name} ", timeout=READY_TIMEOUT_S).split()[2])
        for name in ("na", "nb"):
            grid.wait_present(name, ["na", "nb"])
        yield grid
    finally:
        procs.stop_all()


def restart_nb(grid: Grid) -> None:
    """Kill nb with SIGKILL and start it again with the same state directory."""
    proc, node_id = grid.nodes["nb"]
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=READY_TIMEOUT_S)
    grid.restarts = getattr(grid, "restarts", 0) + 1
    again = grid.start_node("nb", "B", log=f"nb-again-{grid.restarts}")
    again_id = wait_for_line(again, "joined nb ", timeout=READY_TIMEOUT_S).split()[2]
    assert again_id == node_id  # (the state directory: the same identity, the same grid address)
    grid.nodes["nb"] = (again, again_id)
    grid.wait_present("na", ["na", "nb"])


def test_an_http_server_serves_again_after_its_node_is_killed_and_restarted(grid):
    www = grid.tmp / "www"
    www.mkdir()
    payload = os.urandom(PAYLOAD_BYTES)
    (www / "data.bin").write_bytes(payload)
    server = grid.start_program("nb", "http-server", sys.executable, "-m", "http.server", "0",
                                "--directory", str(www))
    line = wait_for_line(server, "Serving HTTP on ", timeout=RUN_TIMEOUT_S)
    ip, port = line.split()[3], int(line.split()[5])
    url = f"http://{ip}:{port}/data.bin"
    digest = hashlib.sha256(payload).hexdigest()
    assert grid.fetch(url) == f"200 {digest}"

    restart_nb(grid)
    grid.wait_listening("nb", port)  # the server's listener came back by itself
    assert grid.fetch(url) == f"200 {digest}"  # the same grid address and port, the same program
    assert grid.fetch(f"http://nb:{port}/data.bin") == f"200 {digest}"
    assert server.poll() is None


def test_a_request_made_before_the_program_serves_again_waits_for_it(grid):
    """Right after the restart, before the program's listener is back (the program is stopped
    with SIGSTOP across the restart), a request for its port waits (the restarted node knows
    from its state directory that the port was served) and is served once the program
    continues: the first request after a restart is not refused."""
    www = grid.tmp / "www-early"
    www.mkdir()
    payload = os.urandom(PAYLOAD_BYTES)
    (www / "data.bin").write_bytes(payload)
    server = grid.start_program("nb", "http-early", sys.executable, "-m", "http.server", "0", "--directory", str(www))
    line = wait_for_line(server, "Serving HTTP on ", timeout=RUN_TIMEOUT_S)
    port = int(line.split()[5])
    url = f"http://nb:{port}/data.bin"
    digest = hashlib.sha256(payload).hexdigest()
    assert grid.fetch(url) == f"200 {digest}"
    server.send_signal(signal.SIGSTOP)
    try:
        restart_nb(grid)
        assert port not in grid.control("nb", "status")["listening"]  # (its program is stopped)
        fetch = grid.start_program("na", "fetch-early", sys.executable, "-c", FETCH, url)
        log = grid.tmp / f"nb-again-{grid.restarts}.log"
        deadline = time.monotonic() + BACK_TIMEOUT_S
        waiting = f"a request for grid port {port} waits"
        while waiting not in log.read_text():
            assert time.monotonic() < deadline and fetch.poll() is None, (fetch.poll(), log.read_text())
            time.sleep(POLL_S)
    finally:
        server.send_signal(signal.SIGCONT)
    assert fetch.wait(timeout=RUN_TIMEOUT_S) == 0
    assert fetch.stdout.read().decode().strip() == f"200 {digest}"
    assert server.poll() is None


def break_a_connection_by_a_restart(grid: Grid, name: str):
    """A connection from a program on na to a listener of a program on nb (a TLS stack: bridged
    in both nodes), then nb restarted: ``(holder, what the holder's recv saw, what the
    connector's recv saw, port)``."""
    holder = grid.start_program("nb", f"holder-{name}", sys.executable, "-c", HOLDER)
    port = int(wait_for_line(holder, "listening ", timeout=RUN_TIMEOUT_S).split()[1])
    connector = grid.start_program("na", f"connector-{name}", sys.executable, "-c", CONNECTOR, str(port))
    assert wait_for_line(connector, "connected ", timeout=RUN_TIMEOUT_S) == "connected tls/tcp"
    assert wait_for_line(holder, "accepted ", timeout=RUN_TIMEOUT_S) == "accepted na"
    restart_nb(grid)
    held = wait_for_line(holder, lambda line: line.startswith(("reset", "recv", "error")), timeout=RUN_TIMEOUT_S)
    connected = wait_for_line(connector, lambda line: line.startswith(("reset", "recv")), timeout=RUN_TIMEOUT_S)
    assert connector.wait(timeout=RUN_TIMEOUT_S) == 0
    return holder, held, connected, port


def test_a_listener_accepts_again_through_the_restarted_node(grid):
    holder, held, connected, port = break_a_connection_by_a_restart(grid, "accepts")
    # na's end: its stream to the dead node broke, and its bridge resets the program.
    assert connected == "reset"
    grid.wait_listening("nb", port)
    again = grid.run("--node", "na", "--", sys.executable, "-c",
                     "import socket, sys\n"
                     f"with socket.create_connection(('nb', {port}), timeout=60) as s:\n"
                     "    print(s.recv(100).decode())\n")
    assert again.returncode == 0, again.stderr.decode()
    assert again.stdout.decode().strip() == "hello again"
    assert wait_for_line(holder, "accepted again ", timeout=RUN_TIMEOUT_S) == "accepted again na 1"
    assert holder.wait(timeout=RUN_TIMEOUT_S) == 0


def test_the_connection_a_server_held_through_its_killed_node_is_reset(grid):
    holder, held, _, port = break_a_connection_by_a_restart(grid, "reset")
    grid.wait_listening("nb", port)
    again = grid.run("--node", "na", "--", sys.executable, "-c",
                     f"import socket\nsocket.create_connection(('nb', {port}), timeout=60).close()\n")
    assert again.returncode == 0, again.stderr.decode()
    assert holder.wait(timeout=RUN_TIMEOUT_S) == 0
    assert held == "reset"


# --- the keeper alone, against a fake agent ------------------------------------------------------

# A fake agent answers, and a keeper thread ends, well within this (loopback Unix sockets).
FAKE_TIMEOUT_S = 10.0


class FakeAgent:
    """An agent at ``path`` that answers ``listen`` requests (``refuse``: with that errno name
    instead) and keeps the socketpair end each came with; :meth:`die` closes everything, as a
    killed node's kernel does."""

    def __init__(self, path: str, *, refuse=None) -> None:
        self.path = path
        self.refuse = refuse
        self.requests: list = []  # (args, whether a descriptor came with it)
        self.asked = threading.Event()
        self.released = threading.Event()  # a listener's control connection closed by its client
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(path)
        os.chmod(path, 0o600)
        self.server.listen(8)
        self.conns: list = []
        self.ends: list = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            self.conns.append(conn)
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn) -> None:
        try:
            got = agentwire.recv_message(conn, agentwire.AgentReader(wire.Control, peer="client"))
            if got is None:
                return
            message, fd = got
            self.requests.append((message.args, fd is not None))
            if self.refuse:
                agentwire.send_frame(conn, agentwire.encode_reply(agentwire.failure(self.refuse, "refused")))
                if fd is not None:
                    os.close(fd)
                self.asked.set()
                return
            if fd is not None:
                self.ends.append(socket.socket(fileno=fd))
            agentwire.send_frame(conn, agentwire.encode_reply(wire.ControlReply(True, {"port": message.args["port"],
                                                                                        "ip": "240.0.0.9"})))
            self.asked.set()
            while conn.recv(4096):
                pass
            self.released.set()
            conn.shutdown(socket.SHUT_RDWR)  # (the port is free: its client may go on)
        except OSError:
            pass

    def announce(self) -> socket.socket:
        """Announce a connection on the latest listener's end; return our side of it."""
        ours, theirs = socket.socketpair()
        with theirs:
            agentwire.send_frame(self.ends[-1], agentwire.encode_reply(
                wire.ControlReply(True, {"peer": "na", "ip": "240.0.0.8", "port": 7000, "peer_port": 50000,
                                         "stack": "tcp", "cluster": None})), theirs.fileno())
        return ours

    def die(self) -> None:
        self.server.shutdown(socket.SHUT_RDWR)  # (wakes the accepting thread; a close alone would not)
        self.server.close()
        os.unlink(self.path)
        for sock in self.conns:
            try:
                sock.shutdown(socket.SHUT_RDWR)  # (wakes this agent's own threads too)
            except OSError:
                pass
            sock.close()
        for sock in self.ends:  # (closed only: the listener's copy is the same socket)
            sock.close()
        self.thread.join(FAKE_TIMEOUT_S)


def keepers() -> list:
    """The listeners' keeper threads still running, once those that are ending have ended."""
    running = [t for t in threading.enumerate() if t.name.startswith("gridsock-listener-")]
    for thread in running:
        thread.join(FAKE_TIMEOUT_S)
    return [t for t in running if t.is_alive()]


@pytest.fixture
def agent_path(tmp_path):
    directory = tmp_path / "run"
    directory.mkdir(mode=0o700)
    return str(directory / "n.agent")


def accept_one(listener, agent: FakeAgent) -> dict:
    ours = agent.announce()
    conn, info = listener.accept()
    with ours, conn:
        ours.sendall(b"ping")
        assert conn.recv(4) == b"ping"
    return info


def test_the_keeper_asks_the_next_agent_for_the_same_port_with_the_same_end(agent_path):
    first = FakeAgent(agent_path)
    listener = AgentClient(agent_path).listen(7000)
    try:
        assert first.requests == [({"port": 7000}, True)] and listener.reconnects == 0
        assert accept_one(listener, first)["peer"] == "na"
        first.die()
        second = FakeAgent(agent_path)
        try:
            assert second.asked.wait(FAKE_TIMEOUT_S)
            assert second.requests == [({"port": 7000}, True)]
            assert accept_one(listener, second)["peer"] == "na"  # the listener's own socket, as it was
            listener.release()
            assert second.released.wait(FAKE_TIMEOUT_S)  # (the port is free once release() returns)
            assert listener.reconnects == 1  # (counted once the keeper read the answer: final now)
        finally:
            second.die()
    finally:
        listener.close()
    assert not keepers()


def test_a_port_taken_meanwhile_ends_the_listener_with_eof(agent_path):
    first = FakeAgent(agent_path)
    listener = AgentClient(agent_path).listen(7000)
    try:
        first.die()
        second = FakeAgent(agent_path, refuse="EADDRINUSE")
        try:
            with pytest.raises(ConnectionResetError):
                listener.accept()  # (EOF: the keeper gave up and closed the agent's end)
            assert second.requests == [({"port": 7000}, True)] and listener.reconnects == 0
        finally:
            second.die()
    finally:
        listener.close()
    assert not keepers()


def test_without_an_agent_within_its_bound_the_listener_ends_with_eof(agent_path):
    first = FakeAgent(agent_path)
    listener = AgentClient(agent_path, reconnect_give_up_s=0.5).listen(7000)
    try:
        first.die()
        with pytest.raises(ConnectionResetError):
            listener.accept()
    finally:
        listener.close()
    assert not keepers()


def test_a_release_while_no_agent_is_there_ends_the_keeper(agent_path):
    first = FakeAgent(agent_path)
    listener = AgentClient(agent_path).listen(7000)
    assert [t.name for t in threading.enumerate()].count("gridsock-listener-7000") == 1
    first.die()
    listener.release(timeout=FAKE_TIMEOUT_S)
    assert not keepers()


def test_the_saved_ports_file_is_read_strictly(tmp_path, caplog):
    from gridsock.session import STATE_PORTS_FILE as PORTS_FILE
    from gridsock.session import load_ports as _load_ports

    path = tmp_path / PORTS_FILE
    assert _load_ports(path) == []  # none saved: nothing expected back
    path.write_text("[8080, 49152]")
    assert _load_ports(path) == [8080, 49152]
    for bad in ("{not json", '{"port": 80}', "[0]", "[70000]", '["80"]', "[true]"):
        path.write_text(bad)
        with caplog.at_level("WARNING", logger="gridsock.node"):
            caplog.clear()
            assert _load_ports(path) == [], bad
        assert "ignored" in caplog.text, bad


def test_a_port_expected_back_is_not_given_to_another_program(grid):
    """While a restarted node waits for a program's port to come back, a new program asking
    for any port (0) is given another one."""
    from gridsock.session import STATE_PORTS_FILE as PORTS_FILE

    holder = grid.start_program("nb", "holder-port", sys.executable, "-c",
                                "from gridsock.personalities.socket import agent\n"
                                "l = agent().listen(0)\nprint('listening', l.port, flush=True)\n"
                                "import signal; signal.pause()\n")
    port = int(wait_for_line(holder, "listening ", timeout=RUN_TIMEOUT_S).split()[1])
    saved = json.loads((grid.tmp / "state-nb" / PORTS_FILE).read_text())
    assert saved == sorted(grid.control("nb", "status")["listening"]) and port in saved
    holder.send_signal(signal.SIGSTOP)
    try:
        restart_nb(grid)
        taken = grid.run("--node", "nb", "--", sys.executable, "-c",
                         "from gridsock.personalities.socket import agent\n"
                         "l = agent().listen(0)\nprint(l.port)\nl.release()\n")
        assert taken.returncode == 0, taken.stderr.decode()
        assert int(taken.stdout) != port
    finally:
        holder.send_signal(signal.SIGCONT)
    grid.wait_listening("nb", port)  # and the stopped program got its own back
    holder.kill()
    holder.wait(timeout=RUN_TIMEOUT_S)
