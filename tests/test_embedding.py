"""Embedding a node in a plain Python program: the node's own thread (``Node(loop="thread")``).

Each test writes a small program and runs it in a subprocess with plain CPython (no gevent
monkey-patching, no gevent in its own code), warnings as errors: two nodes of that program in
two clusters (so their connections are bridged: ``tls`` from outside a cluster) join a
``gridsock rendezvous`` process on loopback, and plain threads use them with blocking calls,
``select`` and asyncio. The program prints ``ok CASE`` for each case that passed; the test
checks those lines, its exit status and that it wrote no traceback or warning. A case that
hangs (the bug this guards against: a bridged socket nobody pumps while its caller blocks) is
ended by the program's own ``faulthandler`` deadline, which prints every thread's stack.

In this process: which loop the default gives (inline where the thread runs gevent), and a
node with a thread of its own in a gevent program, whose hub must keep running meanwhile.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from test_cli import READY_TIMEOUT_S, STRICT_ENV, Procs, assert_no_trouble, start_rendezvous

pytestmark = pytest.mark.timeout(180)

# The whole program (two nodes joining, every case) on a loaded 2-core machine.
PROGRAM_TIMEOUT_S = 120.0

PRELUDE = '''
import faulthandler, hashlib, os, socket, sys, threading
faulthandler.dump_traceback_later({deadline}, exit=True)
from gridsock.node import ConnectRefusedError, LoopEndedError, Node, NodeListener
from gridsock.session import Session

TIMEOUT = {ready}
PORT = 9000
session = Session.load(sys.argv[1])
a = Node(session, "a", cluster="A", listen_address="127.0.0.1:0", control="", agent="").start()
b = Node(session, "b", cluster="B", listen_address="127.0.0.1:0", control="", agent="").start()
assert a.loop == b.loop == "thread", (a.loop, b.loop)
for node in (a, b):
    assert node.wait_joined(TIMEOUT), node.name + " did not join"
    node.wait_directory(present=["a", "b"], settled=True, timeout=TIMEOUT)


def pattern(seed, size):
    """``size`` bytes no compressor shortens, the same for a given seed."""
    out, block = bytearray(), hashlib.sha256(seed).digest()
    while len(out) < size:
        block = hashlib.sha256(block).digest()
        out += block * 32
    return bytes(out[:size])


def recv_all(sock):
    parts = []
    while True:
        data = sock.recv(65536)
        if not data:
            return b"".join(parts)
        parts.append(data)


def in_thread(fn, *args):
    """Run ``fn`` in a plain thread; the returned function joins it and gives its result."""
    box = {{}}

    def run():
        try:
            box["value"] = fn(*args)
        except BaseException as exc:
            box["error"] = exc

    thread = threading.Thread(target=run, daemon=True)  # (a thread that hangs fails the case, not the exit)
    thread.start()

    def join():
        thread.join(TIMEOUT)
        assert not thread.is_alive(), "the thread is still running"
        if "error" in box:
            raise box["error"]
        return box.get("value")
    return join
'''

# Both ways: the client sends UP bytes and shuts down its side, the server reads to EOF and answers
# with DOWN bytes of its own; each checks the other's by SHA-256.
TRANSFER = '''
import select
UP, DOWN = 3 * 1024 * 1024 + 17, 4 * 1024 * 1024 + 5
listener = b.listen(PORT)  # from the main thread: b's thread is another one
assert isinstance(listener, NodeListener), listener

def serve():
    sock, info = listener.accept(TIMEOUT)
    with sock:
        got = recv_all(sock)
        sock.sendall(pattern(b"down", DOWN))
    return hashlib.sha256(got).hexdigest(), info

served = in_thread(serve)
sock, info = a.connect("b", PORT)
assert isinstance(sock, socket.socket) and sock.gettimeout() is None, sock
assert info.detail["bridged"] and info.stack.startswith("tls/"), info
sock.sendall(pattern(b"up", UP))
sock.shutdown(socket.SHUT_WR)
readable, _, _ = select.select([sock], [], [], TIMEOUT)
assert readable == [sock], "select: nothing to read"
down = recv_all(sock)
sock.close()
up_digest, server_info = served()
assert up_digest == hashlib.sha256(pattern(b"up", UP)).hexdigest(), "upload corrupted"
assert hashlib.sha256(down).hexdigest() == hashlib.sha256(pattern(b"down", DOWN)).hexdigest(), len(down)
assert server_info.peer_name == "a" and server_info.stack == info.stack, server_info
print("ok transfer", info.stack, flush=True)

# Two threads connect at once; the server takes both in one thread and echoes each in its own.
def echo_one(sock):
    with sock:
        sock.sendall(recv_all(sock))

def serve_two():
    joins = [in_thread(echo_one, listener.accept(TIMEOUT)[0]) for _ in range(2)]
    for join in joins:
        join()

server = in_thread(serve_two)
def client(seed):
    sock, info = a.connect("b", PORT)
    with sock:
        sock.sendall(pattern(seed, 256 * 1024))
        sock.shutdown(socket.SHUT_WR)
        return recv_all(sock) == pattern(seed, 256 * 1024)
clients = [in_thread(client, seed) for seed in (b"one", b"two")]
assert [join() for join in clients] == [True, True]
server()
print("ok two-threads", flush=True)

# While the main thread blocks in recv() on a's socket, a's node goes on serving: b's requests to
# a are answered (in caller mode, a's hub would be the blocked main thread).
a.handle("echo", lambda delivery: delivery.payload)

def answer_later(sock):
    with sock:
        sock.sendall(b",".join(b.request("a", "echo", b"%d" % i).payload for i in range(3)))

server = in_thread(lambda: answer_later(listener.accept(TIMEOUT)[0]))
sock, info = a.connect("b", PORT)
with sock:
    assert recv_all(sock) == b"0,1,2"
server()
print("ok serving-while-blocked", flush=True)

# asyncio on the socket a.connect() returned.
import asyncio

async def over_asyncio():
    sock, info = a.connect("b", PORT)
    sock.setblocking(False)
    reader, writer = await asyncio.open_connection(sock=sock)
    writer.write(pattern(b"async", 1024 * 1024))
    await writer.drain()
    writer.write_eof()
    data = await reader.read()
    writer.close()
    await writer.wait_closed()
    return data

server = in_thread(lambda: echo_one(listener.accept(TIMEOUT)[0]))
assert asyncio.run(asyncio.wait_for(over_asyncio(), TIMEOUT)) == pattern(b"async", 1024 * 1024)
server()
print("ok asyncio", flush=True)
'''

MESSAGES = '''
b.handle("echo", lambda delivery: delivery.payload[::-1])  # (runs in b's thread)
reply = in_thread(a.request, "b", "echo", b"hello")()
assert reply.payload == b"olleh" and reply.src_name == "b", reply
assert a.ping("b").route_there[0] == "a"
assert a.status()["joined"] and b.status()["name"] == "b"
print("ok request", flush=True)

try:
    a.connect("b", PORT + 1)  # nothing listens there
except ConnectRefusedError as exc:
    assert isinstance(exc, ConnectionRefusedError) and exc.code == "refused", (exc, exc.code)
else:
    raise AssertionError("connect to a port nobody serves succeeded")
print("ok refused", flush=True)

# A node that cannot be made raises in the caller's thread, and leaves no thread behind.
from gridsock.errors import ConfigError
try:
    Node(session, "rendezvous", cluster="A", control="", agent="")  # (a reserved name)
except ConfigError:
    pass
else:
    raise AssertionError("a node named rendezvous was made")
assert [t.name for t in threading.enumerate()].count("gridsock-node-rendezvous") == 0
print("ok bad-node", flush=True)

# stop() from another thread while others wait in accept(), in serve_forever() and in recv() on a
# socket b handed out: the waiter is told, serve_forever returns, the socket is reset (nothing
# would pump it any more), and so is its peer's, a's; b's thread ends.
listener = b.listen(PORT)
accepted = in_thread(listener.accept, TIMEOUT)
client, _ = a.connect("b", PORT)
server_sock, server_info = accepted()
assert server_info.detail["bridged"], server_info
waiting = in_thread(listener.accept, None)
serving = in_thread(b.serve_forever)
receiving = in_thread(recv_all, server_sock)
in_thread(b.stop)()
assert serving() is None
for join in (receiving, in_thread(recv_all, client)):
    try:
        join()
    except ConnectionResetError:
        pass
    else:
        raise AssertionError("a socket of a stopped node read EOF: its data may be missing")
server_sock.close()
client.close()
try:
    waiting()
except LoopEndedError:
    pass
else:
    raise AssertionError("accept() returned after the node stopped")
assert not [t for t in threading.enumerate() if t.name == "gridsock-node-b"], threading.enumerate()
print("ok stop", flush=True)

from gevent._hub_local import get_hub_if_exists
assert get_hub_if_exists() is None, "the main thread ran gevent"
print("ok no-hub-here", flush=True)
# a is still running: the program must exit all the same.
'''


@pytest.fixture
def env(run_dir):
    return dict(os.environ, GRIDSOCK_RUN_DIR=str(run_dir), **STRICT_ENV)


@pytest.fixture
def run_dir(sock_dir):
    return sock_dir / "run"


@pytest.fixture
def session_file(tmp_path, env):
    procs = Procs(tmp_path, env)
    _, node_session = start_rendezvous(procs, tmp_path, env)
    yield node_session
    procs.stop_all()


def run_program(tmp_path, session_file, env, body: str) -> subprocess.CompletedProcess:
    program = tmp_path / "program.py"
    program.write_text(PRELUDE.format(deadline=PROGRAM_TIMEOUT_S - 10, ready=READY_TIMEOUT_S) + textwrap.dedent(body))
    result = subprocess.run([sys.executable, str(program), str(session_file)], capture_output=True, text=True,
                            env=env, timeout=PROGRAM_TIMEOUT_S)
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    assert_no_trouble(result.stderr, "the program")
    return result


def test_sockets_from_plain_threads_blocking_select_asyncio(tmp_path, session_file, env):
    out = run_program(tmp_path, session_file, env, TRANSFER).stdout
    assert out.startswith("ok transfer tls/"), out
    assert out.splitlines()[1:] == ["ok two-threads", "ok serving-while-blocked", "ok asyncio"], out


def test_requests_refusal_and_stop_from_plain_threads(tmp_path, session_file, env):
    out = run_program(tmp_path, session_file, env, MESSAGES).stdout
    assert out.splitlines() == ["ok request", "ok refused", "ok bad-node", "ok stop", "ok no-hub-here"], out


def test_the_default_loop_follows_the_caller(tmp_path):
    """None: inline for a thread that runs gevent (this one has a hub; a monkey-patched program),
    a thread of its own for a plain thread. A node that is never started stops all the same."""
    import threading

    import gevent

    from gridsock.errors import ConfigError
    from gridsock.node import Node
    from gridsock.session import create_session

    session = create_session(tmp_path / "session", "127.0.0.1:7700")
    gevent.get_hub()
    inline = Node(session, "inline", control="", agent="")
    assert inline.loop == "caller"
    inline.stop()
    made = {}

    def plain_thread():
        made["node"] = Node(session, "own", control="", agent="")

    thread = threading.Thread(target=plain_thread)
    thread.start()
    thread.join(READY_TIMEOUT_S)
    node = made["node"]
    assert node.loop == "thread"
    node.stop()
    assert "gridsock-node-own" not in [t.name for t in threading.enumerate()]
    with pytest.raises(ConfigError):
        Node(session, "bad", control="", agent="", loop="greenlet")

    patched = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(f"""
            from gevent import monkey
            monkey.patch_all()
            from gridsock.node import Node
            from gridsock.session import Session
            print(Node(Session.load({str(tmp_path / "session" / "session.toml")!r}), "p", control="", agent="").loop)
            """)], capture_output=True, text=True, timeout=PROGRAM_TIMEOUT_S)
    assert (patched.returncode, patched.stdout) == (0, "caller\n"), patched.stderr


def test_a_node_of_its_own_thread_in_a_gevent_program(tmp_path):
    """A gevent program (this test: the loopback grid's nodes run in this thread's hub) may give a
    node a thread of its own: its calls wait without blocking the program's hub, which must go on
    serving the grid that node joins through (L1, the rendez-vous node, m2)."""
    import gevent
    import gevent.socket

    from gridsock.node import Node, NodeListener
    from gridsock.testing.grid import JOIN_TIMEOUT_S, NAMES, loopback_grid

    with loopback_grid(tmp_path) as grid:
        node = Node(grid.session, "t", cluster="A", leader=str(grid["L1"].address), listen_address="127.0.0.1:0",
                    control="", agent="", loop="thread").start()
        try:
            assert node.wait_joined(JOIN_TIMEOUT_S)
            node.wait_directory(present=NAMES, settled=True, timeout=JOIN_TIMEOUT_S)
            grid["m2"].wait_directory(present=["t"], timeout=JOIN_TIMEOUT_S)  # (m2 hears of t a broadcast later)
            assert node.ping("m2").route_there[0] == "t"
            listener = node.listen(9100)
            assert isinstance(listener, NodeListener)

            def client():  # m2, in this thread's hub, connects to t's grid port
                stream, _ = grid["m2"].open_stream("t", 9100, stack="tls/tcp")
                stream.send_all(b"ping")
                stream.send_eof()
                answer = b""
                while True:
                    data = stream.receive_some(1024)
                    if not data:
                        break
                    answer += data
                stream.close()
                return answer

            greenlet = gevent.spawn(client)
            sock, info = listener.accept(JOIN_TIMEOUT_S)  # (this wait lets the hub run client())
            with sock:
                assert info.detail["bridged"] and info.peer_name == "m2"
                sock.setblocking(False)  # a blocking recv here would stop the hub: read when it is due
                received = b""
                while not received.endswith(b"ping"):
                    gevent.socket.wait_read(sock.fileno(), JOIN_TIMEOUT_S)
                    received += sock.recv(1024)
                sock.sendall(b"pong")
            assert greenlet.get(timeout=JOIN_TIMEOUT_S) == b"pong"
        finally:
            node.stop()
