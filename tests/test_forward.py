"""``gridsock forward`` and ``gridsock expose``, run as real processes on a loopback grid.

A rendez-vous node and two nodes of cluster A (``lead``, ``mem``) run as processes for the whole
module, each test on grid ports of its own. The programs at the ends are this test's plain
(blocking, thread-based) sockets: a local TCP server behind ``expose``, a client of ``forward``.
Readiness is the line each command prints once its port listens.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import socket
import struct
import threading
import time
from typing import Callable, Dict, List, Tuple

import pytest

from gridsock.bootstrap.control import call
from gridsock.testing.procs import stop_process, wait_for_line
from test_cli import READY_TIMEOUT_S, STRICT_ENV, Procs, assert_no_trouble, gridsock, start_rendezvous

pytestmark = pytest.mark.timeout(300)

MIB = 1 << 20
# What the big transfers move each way (the figure).
BIG_BYTES = 64 * MIB
CHUNK_BYTES = 256 * 1024
# A socket operation of the test's programs gives up after this (nothing here should wait long).
IO_TIMEOUT_S = 60.0
# A command stops (after its signal) or ends (--once) within this.
STOP_TIMEOUT_S = 20.0


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    """``gridsock rendezvous`` and nodes ``lead`` and ``mem`` (cluster A); yields (procs, env, logdir)."""
    base = tmp_path_factory.mktemp("fw")
    run_dir = tmp_path_factory.mktemp("r")
    env = dict(os.environ, GRIDSOCK_RUN_DIR=str(run_dir), **STRICT_ENV)
    procs = Procs(base, env)
    try:
        _, node_session = start_rendezvous(procs, base, env)
        lead = procs.start("lead", "node", "--session", str(node_session), "--name", "lead", "--cluster", "A",
                           "--listen", "127.0.0.1:0", "--front-door", "off")
        lead_address = wait_for_line(lead, "node lead listening ", timeout=READY_TIMEOUT_S).split()[-1]
        wait_for_line(lead, "joined lead ", timeout=READY_TIMEOUT_S)
        mem = procs.start("mem", "node", "--session", str(node_session), "--name", "mem", "--cluster", "A",
                          "--leader", lead_address, "--listen", "127.0.0.1:0", "--front-door", "off")
        wait_for_line(mem, "joined mem ", timeout=READY_TIMEOUT_S)
        for name in ("lead", "mem"):
            call(str(run_dir / f"{name}.sock"), "wait", {"present": ["lead", "mem"], "timeout": READY_TIMEOUT_S},
                 timeout=READY_TIMEOUT_S + 5)
        yield procs, env, base
    finally:
        procs.stop_all()


class Command:
    """A held ``gridsock forward|expose`` process and the port its first line names."""

    def __init__(self, grid, *args: str) -> None:
        procs, _, _ = grid
        self.procs = procs
        self.proc = procs.start(f"{args[0]}-{args[-1].replace(':', '_')}", *args)
        self.line = wait_for_line(self.proc, lambda line: line.startswith(("forwarding ", "exposing ")),
                                  timeout=READY_TIMEOUT_S)
        assert self.line.endswith(" (Ctrl-C to stop)"), self.line

    @property
    def local_port(self) -> int:
        """forward: the local port it listens on (``forwarding 127.0.0.1:P -> ...``)."""
        return int(self.line.split()[1].rsplit(":", 1)[1])

    def stop(self, signum: int = signal.SIGINT) -> Tuple[int, str]:
        """Send ``signum``; return the exit status and the last line printed."""
        self.proc.send_signal(signum)
        last = wait_for_line(self.proc, "stopped ", timeout=STOP_TIMEOUT_S)
        self.proc.wait(timeout=STOP_TIMEOUT_S)
        return self.proc.returncode, last

    def ended(self) -> Tuple[int, str]:
        """--once: wait for it to end by itself; the exit status and the last line."""
        last = wait_for_line(self.proc, "stopped ", timeout=STOP_TIMEOUT_S)
        self.proc.wait(timeout=STOP_TIMEOUT_S)
        return self.proc.returncode, last

    def close(self) -> None:
        stop_process(self.proc)


# --- the test's own programs at both ends --------------------------------------------------------


class LocalServer:
    """A TCP server on 127.0.0.1 (a port the kernel chooses) running ``handler(conn)`` in a
    thread per connection; what each handler returns or raises is in :attr:`results`."""

    def __init__(self, handler: Callable[[socket.socket], object]) -> None:
        self.handler = handler
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.results: List[object] = []
        self.done = threading.Semaphore(0)
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._run, args=(conn,), daemon=True).start()

    def _run(self, conn: socket.socket) -> None:
        conn.settimeout(IO_TIMEOUT_S)
        try:
            self.results.append(self.handler(conn))
        except Exception as exc:
            self.results.append(exc)
        finally:
            conn.close()
            self.done.release()

    def result(self) -> object:
        """The next handler's outcome (waits for it)."""
        assert self.done.acquire(timeout=IO_TIMEOUT_S), "the local server's handler did not finish"
        return self.results.pop(0)

    def close(self) -> None:
        self.sock.shutdown(socket.SHUT_RDWR)  # wakes the accept() (Linux); close() alone would not
        self.sock.close()
        self._thread.join(timeout=IO_TIMEOUT_S)
        assert not self._thread.is_alive()


def echo(conn: socket.socket) -> int:
    """Send back what comes, until EOF; then EOF. Returns the byte count."""
    total = 0
    while True:
        data = conn.recv(CHUNK_BYTES)
        if not data:
            conn.shutdown(socket.SHUT_WR)
            return total
        conn.sendall(data)
        total += len(data)


def read_all(conn: socket.socket) -> bytes:
    parts = []
    while True:
        data = conn.recv(CHUNK_BYTES)
        if not data:
            return b"".join(parts)
        parts.append(data)


def reset(conn: socket.socket) -> None:
    """Close ``conn`` with an RST."""
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.close()


def send_and_read_back(port: int, nbytes: int) -> Dict[str, object]:
    """Connect to 127.0.0.1:``port``, send ``nbytes`` random bytes (then EOF) while reading
    what comes back until EOF; the SHA-256 and count of each direction."""
    sent, received = hashlib.sha256(), hashlib.sha256()
    counts = {"received": 0}
    with socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT_S) as conn:
        def reader() -> None:
            while True:
                data = conn.recv(CHUNK_BYTES)
                if not data:
                    return
                received.update(data)
                counts["received"] += len(data)

        thread = threading.Thread(target=reader, daemon=True)
        thread.start()
        left = nbytes
        while left:
            chunk = os.urandom(min(CHUNK_BYTES, left))
            sent.update(chunk)
            conn.sendall(chunk)
            left -= len(chunk)
        conn.shutdown(socket.SHUT_WR)
        thread.join(timeout=IO_TIMEOUT_S * 4)
        assert not thread.is_alive(), "the echo did not end"
    return {"sha_sent": sent.hexdigest(), "sha_received": received.hexdigest(), "received": counts["received"]}


def connections_of(grid, node: str) -> List[dict]:
    _, env, _ = grid
    result = gridsock("status", "--json", "--node", node, env=env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)["connections"]


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT_S).close()
    except ConnectionRefusedError:
        return True
    return False


# --- the tests -----------------------------------------------------------------------------------


def test_forward_moves_64_mib_each_way_to_a_grid_echo_and_ctrl_c_closes_its_port(grid):
    _, env, _ = grid
    assert gridsock("echo", "9001", "--node", "mem", env=env).returncode == 0
    forward = Command(grid, "forward", "--node", "lead", "127.0.0.1:0", "mem:9001")
    try:
        assert forward.line == f"forwarding 127.0.0.1:{forward.local_port} -> mem:9001 (Ctrl-C to stop)"
        moved = send_and_read_back(forward.local_port, BIG_BYTES)
        assert moved["received"] == BIG_BYTES and moved["sha_received"] == moved["sha_sent"]
        status, last = forward.stop(signal.SIGINT)
    finally:
        forward.close()
    assert status == 0
    assert last == (f"stopped forwarding 127.0.0.1:{forward.local_port} -> mem:9001: 1 connection(s), "
                    "64.0 MiB to the grid, 64.0 MiB from it")
    assert refused(forward.local_port)  # the node closed the port before the command ended


def test_expose_moves_64_mib_each_way_from_a_local_echo_and_sigterm_closes_the_grid_port(grid):
    _, env, _ = grid
    server = LocalServer(echo)
    expose = Command(grid, "expose", "--node", "mem", "9002", f"127.0.0.1:{server.port}")
    try:
        assert expose.line == f"exposing mem:9002 -> 127.0.0.1:{server.port} (Ctrl-C to stop)"
        moved = gridsock("transfer", "--node", "lead", "mem:9002", "--bytes", "64M", "--json", env=env)
        assert moved.returncode == 0, moved.stderr
        result = json.loads(moved.stdout)
        assert result["bytes"] == BIG_BYTES and result["sha256_sent"] == result["sha256_received"]
        assert server.result() == BIG_BYTES  # the local server saw every byte, then EOF
        status, last = expose.stop(signal.SIGTERM)
    finally:
        expose.close()
        server.close()
    assert status == 0
    assert last == f"stopped exposing mem:9002 -> 127.0.0.1:{server.port}: 1 connection(s), 64.0 MiB to the grid, " \
                   "64.0 MiB from it"
    after = gridsock("transfer", "--node", "lead", "mem:9002", "--bytes", "1K", env=env)
    assert after.returncode == 2 and "nothing listens on port 9002 of mem" in after.stderr, after.stderr


@pytest.fixture
def chain(grid):
    """``expose`` of a local server on mem's grid port, and ``forward`` of a local port of lead to
    it: ``make(handler, grid_port)`` returns (the local port to connect to, the server)."""
    made: List[Tuple[Command, Command, LocalServer]] = []

    def make(handler: Callable[[socket.socket], object], grid_port: int) -> Tuple[int, LocalServer]:
        server = LocalServer(handler)
        expose = Command(grid, "expose", "--node", "mem", str(grid_port), str(server.port))
        forward = Command(grid, "forward", "--node", "lead", "0", f"mem:{grid_port}")
        made.append((forward, expose, server))
        return forward.local_port, server

    yield make
    for forward, expose, server in made:
        for command in (forward, expose):
            assert command.stop()[0] == 0
            command.close()
        server.close()


def test_half_close_passes_as_eof_both_ways(chain):
    def answer_after_eof(conn: socket.socket) -> bytes:
        data = read_all(conn)  # the client's EOF arrives as EOF...
        conn.sendall(b"got " + hashlib.sha256(data).hexdigest().encode())  # ...and we can still send
        conn.shutdown(socket.SHUT_WR)
        return data

    port, server = chain(answer_after_eof, 9003)
    payload = os.urandom(3 * MIB)
    with socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT_S) as conn:
        conn.sendall(payload)
        conn.shutdown(socket.SHUT_WR)
        assert read_all(conn) == b"got " + hashlib.sha256(payload).hexdigest().encode()
    assert server.result() == payload

    def greet_then_listen(conn: socket.socket) -> bytes:
        conn.sendall(b"hello")
        conn.shutdown(socket.SHUT_WR)  # our EOF first; the client's data still comes
        return read_all(conn)

    port, server = chain(greet_then_listen, 9004)
    with socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT_S) as conn:
        assert read_all(conn) == b"hello"
        conn.sendall(payload)
        conn.shutdown(socket.SHUT_WR)
        assert conn.recv(1) == b""
    assert server.result() == payload


def test_breaks_pass_as_resets_both_ways(chain):
    def reset_after_some(conn: socket.socket) -> None:
        conn.recv(5)
        reset(conn)

    port, server = chain(reset_after_some, 9005)
    with socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT_S) as conn:
        conn.sendall(b"hello")
        with pytest.raises(ConnectionResetError):
            read_all(conn)
    assert server.result() is None

    port, server = chain(read_all, 9006)  # raises what recv raises
    conn = socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT_S)
    conn.sendall(b"partial")
    reset(conn)
    assert isinstance(server.result(), ConnectionResetError)


def test_a_dead_local_server_gives_the_grid_client_a_reset_and_a_log_line(grid):
    _, _, logdir = grid
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))  # bound, never listening: connects to it are refused
    try:
        dead_port = dead.getsockname()[1]
        expose = Command(grid, "expose", "--node", "mem", "9007", str(dead_port))
        try:
            forward = Command(grid, "forward", "--node", "lead", "0", "mem:9007")
            try:
                with socket.create_connection(("127.0.0.1", forward.local_port), timeout=IO_TIMEOUT_S) as conn:
                    with pytest.raises(ConnectionResetError):
                        read_all(conn)
            finally:
                assert forward.stop()[0] == 0
                forward.close()
            status, last = expose.stop()
        finally:
            expose.close()
    finally:
        dead.close()
    assert status == 0 and last.endswith(": 1 connection(s), 1 failed, 0 B to the grid, 0 B from it"), last
    log = (logdir / "mem.log").read_text()
    lines = [line for line in log.splitlines() if f"the local server 127.0.0.1:{dead_port} is unreachable" in line]
    assert len(lines) == 1 and all("WARNING gridsock.forward: expose mem:9007" in line for line in lines), log


def test_a_grid_port_nobody_serves_gives_the_local_client_a_reset_and_a_log_line(grid):
    _, _, logdir = grid
    forward = Command(grid, "forward", "--node", "lead", "0", "mem:9010")
    try:
        with socket.create_connection(("127.0.0.1", forward.local_port), timeout=IO_TIMEOUT_S) as conn:
            client = f"127.0.0.1:{conn.getsockname()[1]}"
            with pytest.raises(ConnectionResetError):
                read_all(conn)
        status, last = forward.stop()
    finally:
        forward.close()
    assert status == 0 and last.endswith(": 0 connection(s), 1 failed, 0 B to the grid, 0 B from it"), last
    lead_log = (logdir / "lead.log").read_text()
    assert f"connection from {client}: cannot reach mem:9010: " in lead_log, lead_log


def test_in_use_ports_and_bad_arguments_are_clear_errors(grid):
    _, env, _ = grid
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        result = gridsock("forward", "--node", "lead", f"127.0.0.1:{port}", "mem:9000", env=env)
        assert (result.returncode, result.stdout) == (2, "")
        assert result.stderr == f"gridsock forward: 127.0.0.1:{port} is in use\n"
    assert gridsock("echo", "9008", "--node", "mem", env=env).returncode == 0
    served = gridsock("expose", "--node", "mem", "9008", "22", env=env)
    assert (served.returncode, served.stdout) == (2, "")
    assert served.stderr == "gridsock expose: port 9008 of node mem is already served\n"
    for args, message in ((("forward", "--node", "lead", "0", "nobody:22"), "no node 'nobody' in lead's directory"),
                          (("forward", "--node", "lead", "0", "mem"), "bad grid address 'mem': NODE:PORT"),
                          (("forward", "--node", "lead", "x:y", "mem:22"), "bad local address 'x:y'"),
                          (("forward", "--node", "lead", "--stack", "tls/nope", "0", "mem:22"), "nope")):
        bad = gridsock(*args, env=env)
        assert bad.returncode == 2 and bad.stderr.startswith(f"gridsock {args[0]}: "), (args, bad.stderr)
        assert message in bad.stderr and bad.stderr.count("\n") == 1, (args, bad.stderr)


def test_forwarded_connections_are_in_status_and_once_ends_by_itself(grid):
    _, env, _ = grid

    def hold(conn: socket.socket) -> int:
        conn.sendall(b"hi")  # the client reads it once the whole chain is up
        return len(read_all(conn))

    server = LocalServer(hold)
    expose = Command(grid, "expose", "--node", "mem", "9009", str(server.port))
    forward = Command(grid, "forward", "--once", "--node", "lead", "0", "mem:9009")
    try:
        with socket.create_connection(("127.0.0.1", forward.local_port), timeout=IO_TIMEOUT_S) as conn:
            assert conn.recv(2) == b"hi"
            conn.sendall(b"x" * 1000)
            [theirs] = [c for c in connections_of(grid, "mem") if c.get("via") == "expose" and c["port"] == 9009]
            [ours] = [c for c in connections_of(grid, "lead") if c.get("via") == "forward" and c["port"] == 9009]
            assert (ours["peer"], ours["side"], theirs["peer"], theirs["side"]) == ("mem", "client", "lead", "server")
            assert ours["local"] == f"127.0.0.1:{conn.getsockname()[1]}"
            assert theirs["local"] == f"127.0.0.1:{server.port}"
            assert refused(forward.local_port)  # --once: no second connection
            conn.shutdown(socket.SHUT_WR)
            assert conn.recv(1) == b""
        assert server.result() == 1000
        status, last = forward.ended()  # --once: it ends with its connection
        assert status == 0 and last.endswith(": 1 connection(s), 1000 B to the grid, 2 B from it"), last
        assert not [c for c in connections_of(grid, "lead") if c.get("via") == "forward"]
        assert expose.stop()[0] == 0
    finally:
        forward.close()
        expose.close()
        server.close()


def test_the_command_ends_with_an_error_when_its_node_dies(grid):
    procs, env, base = grid
    lead_address = next(e for e in json.loads(gridsock("status", "--json", "--node", "lead", env=env).stdout)
                         ["directory"] if e["name"] == "lead")["addrs"][0]
    node = procs.start("short", "node", "--session", str(base / "node" / "session.toml"), "--name", "short",
                       "--cluster", "A", "--leader", lead_address, "--listen", "127.0.0.1:0", "--front-door", "off")
    wait_for_line(node, "joined short ", timeout=READY_TIMEOUT_S)
    forward = Command(grid, "forward", "--node", "short", "--give-up", "0", "0", "mem:9011")
    waiting = Command(grid, "forward", "--node", "short", "--give-up", "0.5", "0", "mem:9012")
    try:
        node.kill()
        node.wait(timeout=STOP_TIMEOUT_S)
        forward.proc.wait(timeout=STOP_TIMEOUT_S)
        waiting.proc.wait(timeout=STOP_TIMEOUT_S)
    finally:
        forward.close()
        waiting.close()
    assert forward.proc.returncode == 2 and waiting.proc.returncode == 2
    errors = (base / "forward-mem_9011.log").read_text()
    assert errors.startswith("gridsock forward: the node went away"), errors
    assert_no_trouble(errors, "gridsock forward after its node died")
    errors = (base / "forward-mem_9012.log").read_text()
    assert "waiting up to 0.5 s for it to come back" in errors, errors
    assert errors.rstrip().endswith("and did not come back within 0.5 s"), errors
    assert_no_trouble(errors, "gridsock forward after its node died for good")


# A restarted node serves its commands' ports again within this (it starts and joins in a second
# or two; the commands try its control socket at most REATTACH_MAX_S apart).
BACK_TIMEOUT_S = 60.0
# How often the test looks at a command's log for the line that says its node is back.
POLL_S = 0.1


def wait_in_log(path, text: str) -> None:
    """Return once ``text`` is in the file at ``path`` (a command's stderr), within BACK_TIMEOUT_S."""
    deadline = time.monotonic() + BACK_TIMEOUT_S
    while text not in (path.read_text() if path.exists() else ""):
        assert time.monotonic() < deadline, f"{text!r} not in {path.name}:\n{path.read_text()}"
        time.sleep(POLL_S)


def test_forward_and_expose_serve_the_same_ports_through_a_restart_of_their_node(grid):
    """Their node is killed (SIGKILL) and started again with its state directory: both
    commands, never restarted, ask the new node for the same ports (forward: the local port
    the kernel chose; expose: the grid port) and move data again; their last lines count the
    connections through both nodes."""
    procs, env, base = grid
    lead_address = next(e for e in json.loads(gridsock("status", "--json", "--node", "lead", env=env).stdout)
                         ["directory"] if e["name"] == "lead")["addrs"][0]
    argv = ("node", "--session", str(base / "node" / "session.toml"), "--name", "again", "--cluster", "A",
            "--leader", lead_address, "--listen", "127.0.0.1:0", "--front-door", "off",
            "--state-dir", str(base / "state-again"))
    node = procs.start("again", *argv)
    wait_for_line(node, "joined again ", timeout=READY_TIMEOUT_S)
    assert gridsock("echo", "9032", "--node", "mem", env=env).returncode == 0
    server = LocalServer(echo)
    expose = Command(grid, "expose", "--node", "again", "9031", str(server.port))
    forward = Command(grid, "forward", "--node", "again", "127.0.0.1:0", "mem:9032")
    try:
        def both_move_data() -> None:
            moved = send_and_read_back(forward.local_port, MIB)
            assert moved["received"] == MIB and moved["sha_received"] == moved["sha_sent"]
            done = gridsock("transfer", "--node", "lead", "again:9031", "--bytes", "1M", "--json", env=env)
            assert done.returncode == 0, done.stderr
            result = json.loads(done.stdout)
            assert result["bytes"] == MIB and result["sha256_sent"] == result["sha256_received"]
            assert server.result() == MIB

        both_move_data()
        node.kill()
        node.wait(timeout=STOP_TIMEOUT_S)
        again = procs.start("again-restarted", *argv)
        wait_for_line(again, "joined again ", timeout=READY_TIMEOUT_S)
        for command in ("forward-mem_9032", f"expose-{server.port}"):
            wait_in_log(base / f"{command}.log", "the node is back")
        call(os.path.join(env["GRIDSOCK_RUN_DIR"], "lead.sock"), "wait",
             {"present": ["again"], "timeout": READY_TIMEOUT_S}, timeout=READY_TIMEOUT_S + 5)
        both_move_data()
        # The counts are what the nodes reported: a node killed without warning may not have
        # reported its last REPORT_INTERVAL_S, so the first connection may be missing from them.
        counted = re.compile(r": (2 connection\(s\), 2\.0 MiB to the grid, 2\.0|1 connection\(s\), 1\.0 MiB to the grid, 1\.0)"
                             r" MiB from it$")
        for command in (forward, expose):
            status, last = command.stop()
            assert status == 0 and counted.search(last), last
    finally:
        forward.close()
        expose.close()
        server.close()
    errors = (base / "forward-mem_9032.log").read_text()
    assert "gridsock forward: the node went away" in errors and "waiting up to 600 s" in errors, errors


# --- in this process: the Forward and Expose classes over the loopback grid's stacks ---------------


@pytest.fixture(scope="module")
def loopback(tmp_path_factory):
    from gridsock.testing.grid import loopback_grid

    with loopback_grid(tmp_path_factory.mktemp("fwloop")) as running:
        yield running


def gevent_server(handler: Callable[..., object]):
    """A gevent TCP server on 127.0.0.1 (a port the kernel chooses) running ``handler(conn)``
    for each connection; returns (port, the queue of outcomes, the StreamServer)."""
    import gevent.queue
    import gevent.server

    outcomes: "gevent.queue.Queue[object]" = gevent.queue.Queue()

    def run(conn, _address) -> None:
        try:
            outcomes.put(handler(conn))
        except Exception as exc:
            outcomes.put(exc)
        finally:
            conn.close()

    server = gevent.server.StreamServer(("127.0.0.1", 0), run)
    server.start()
    return server.server_port, outcomes, server


def answer_with_digest(conn) -> bytes:
    data = read_all(conn)
    conn.sendall(hashlib.sha256(data).hexdigest().encode())
    conn.shutdown(socket.SHUT_WR)
    return data


@pytest.mark.parametrize("stack", ["tls/relay", "tls/lz4/tcp", "parallel(streams=4)/tcp"])
def test_forward_and_expose_over_stacks_in_process(loopback, stack):
    import gevent.socket

    from gridsock.forward import Expose, Forward

    port, outcomes, server = gevent_server(answer_with_digest)
    grid_port = 9100 + ["tls/relay", "tls/lz4/tcp", "parallel(streams=4)/tcp"].index(stack)
    expose = Expose(loopback["m2"], grid_port, port).start()
    forward = Forward(loopback["m1"], "m2", grid_port, stack=stack).start()
    try:
        assert forward.address is not None
        payload = os.urandom(4 * MIB)
        conn = gevent.socket.create_connection(forward.address, timeout=IO_TIMEOUT_S)
        try:
            conn.sendall(payload)
            conn.shutdown(socket.SHUT_WR)
            assert read_all(conn) == hashlib.sha256(payload).hexdigest().encode()
        finally:
            conn.close()
        assert outcomes.get(timeout=IO_TIMEOUT_S) == payload
        summary = forward.summary()
        assert (summary["connections"], summary["bytes_to_grid"], summary["bytes_from_grid"]) == (1, 4 * MIB, 64)
        assert loopback["m1"].assembler.paths()  # (a path was recorded)
        assert grid_port in loopback["m2"].assembler.listeners
    finally:
        forward.stop()
        expose.stop()
        server.stop()
    assert grid_port not in loopback["m2"].assembler.listeners
    with pytest.raises(ConnectionRefusedError):
        gevent.socket.create_connection(forward.address, timeout=IO_TIMEOUT_S)


def test_stopping_resets_open_connections_at_both_ends_in_process(loopback):
    import gevent.socket

    from gridsock.forward import Expose, Forward

    def greet_and_read(conn) -> bytes:
        conn.sendall(b"hi")
        return read_all(conn)

    port, outcomes, server = gevent_server(greet_and_read)
    expose = Expose(loopback["m2"], 9110, port).start()
    forward = Forward(loopback["m1"], "m2", 9110).start()
    assert forward.address is not None
    conn = gevent.socket.create_connection(forward.address, timeout=IO_TIMEOUT_S)
    try:
        assert conn.recv(2) == b"hi"  # the whole chain is up
        [listed] = [c for c in loopback["m1"].status()["connections"] if c.get("via") == "forward"]
        assert listed["local"] == f"127.0.0.1:{conn.getsockname()[1]}" and listed["peer"] == "m2"
        forward.stop()  # while the connection is open
        with pytest.raises(ConnectionResetError):
            read_all(conn)
        assert isinstance(outcomes.get(timeout=IO_TIMEOUT_S), ConnectionResetError)  # the server: reset too
        assert not [c for c in loopback["m1"].status()["connections"] if c.get("via") == "forward"]
    finally:
        conn.close()
        forward.stop()
        expose.stop()
        server.stop()


def test_local_addresses_parse():
    from gridsock.errors import ConfigError
    from gridsock.forward import parse_local

    assert parse_local("2222", "127.0.0.1") == ("127.0.0.1", 2222)
    assert parse_local("0.0.0.0:2222", "127.0.0.1") == ("0.0.0.0", 2222)
    assert parse_local("[::1]:0", "127.0.0.1") == ("::1", 0)
    assert parse_local("localhost:22", "127.0.0.1") == ("localhost", 22)
    for bad in ("", ":22", "x", "host:", "host:65536", "host:-1", "[::1]"):
        with pytest.raises(ConfigError):
            parse_local(bad, "127.0.0.1")
