"""The socket personality: unmodified stdlib programs, patched, talking through real node processes.

A rendez-vous node and two leaders (``na`` in cluster A, ``nb`` in cluster B) run as processes
on loopback; every program here is a stdlib script run with ``python -m gridsock.monkey --node
NAME``, which makes it use the agent socket of that node. Readiness is a line a script prints.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap

import pytest

from gridsock.bootstrap.control import call
from gridsock.names import grid_ip
from gridsock.testing.procs import gridsock_argv, wait_for_line
from test_cli import READY_TIMEOUT_S, STRICT_ENV, Procs, start_rendezvous

pytestmark = pytest.mark.timeout(120)

# A script under the personality finishes (interpreter start included) within this.
SCRIPT_TIMEOUT_S = 60.0


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pers")
    run_dir = tmp_path_factory.mktemp("r")
    env = dict(os.environ, GRIDSOCK_RUN_DIR=str(run_dir), **STRICT_ENV)
    procs = Procs(tmp, env)
    try:
        _, session = start_rendezvous(procs, tmp, env)
        for name, cluster in (("na", "A"), ("nb", "B")):
            proc = procs.start(name, "node", "--session", str(session), "--name", name, "--cluster", cluster,
                               "--listen", "127.0.0.1:0")
            wait_for_line(proc, f"joined {name} ", timeout=READY_TIMEOUT_S)
        for name in ("na", "nb"):
            call(str(run_dir / f"{name}.sock"), "wait", {"present": ["na", "nb"], "settled": True,
                                                         "timeout": READY_TIMEOUT_S}, timeout=READY_TIMEOUT_S + 5)
        yield Grid(tmp, run_dir, env, procs, session)
    finally:
        procs.stop_all()


class Grid:
    def __init__(self, tmp, run_dir, env, procs, session) -> None:
        self.tmp, self.run_dir, self.env, self.procs, self.session = tmp, run_dir, env, procs, session
        self.scripts = 0

    def node_id(self, name: str) -> str:
        return call(str(self.run_dir / f"{name}.sock"), "status")["node_id"]

    def script(self, text: str):
        self.scripts += 1
        path = self.tmp / f"script{self.scripts}.py"
        path.write_text(textwrap.dedent(text))
        return path

    def argv(self, node: str, path, *args: str) -> list:
        return [sys.executable, "-m", "gridsock.monkey", "--node", node, str(path), *args]

    def run(self, node: str, text: str, *args: str) -> str:
        """Run a script to completion under the personality; return its stdout."""
        done = subprocess.run(self.argv(node, self.script(text), *args), capture_output=True, text=True,
                              env=self.env, timeout=SCRIPT_TIMEOUT_S)
        assert done.returncode == 0, done.stderr
        return done.stdout

    def start(self, node: str, text: str, *args: str) -> subprocess.Popen:
        """Start a server script; it is stopped with the grid's processes."""
        path = self.script(text)
        with open(self.tmp / f"{path.stem}.log", "wb") as log:
            proc = subprocess.Popen(self.argv(node, path, *args), stdout=subprocess.PIPE, stderr=log, env=self.env)
        self.procs.started.append(proc)
        return proc


def test_grid_names_resolve_to_grid_addresses_and_others_pass_through(grid):
    out = grid.run("na", """
        import json, socket
        infos = socket.getaddrinfo("nb", 80, type=socket.SOCK_STREAM)
        ip = socket.gethostbyname("nb.grid")
        try:
            socket.getaddrinfo("nobody.grid", 80)
            missing = None
        except socket.gaierror as exc:
            missing = exc.errno
        print(json.dumps({
            "family": repr(infos[0][0]), "kind": repr(infos[0][1]), "addr": infos[0][4], "ip": ip,
            "byaddr": socket.gethostbyaddr(ip)[0], "nameinfo": socket.getnameinfo((ip, 80), socket.NI_NUMERICSERV),
            "fqdn": socket.getfqdn("nb"), "missing": missing, "eai_noname": socket.EAI_NONAME,
            "localhost": socket.gethostbyname("localhost"),
            "numeric": socket.getaddrinfo("127.0.0.1", 9, type=socket.SOCK_STREAM)[0][4],
        }))
    """)
    got = json.loads(out)
    ip = grid_ip(grid.node_id("nb"))
    assert got["family"] == "<AddressFamily.AF_INET: 2>" and got["kind"] == "<SocketKind.SOCK_STREAM: 1>"
    assert got["addr"] == [ip, 80] and got["ip"] == ip
    assert got["byaddr"] == "nb" and got["nameinfo"] == ["nb", "80"] and got["fqdn"] == "nb"
    assert got["missing"] == got["eai_noname"]
    assert got["localhost"] == "127.0.0.1" and got["numeric"] == ["127.0.0.1", 9]


SOCKETSERVER_ECHO = """
    import socketserver

    class Echo(socketserver.StreamRequestHandler):
        def handle(self):
            peer = self.client_address
            for line in self.rfile:
                self.wfile.write(line.strip().upper() + (" from %s:%d" % peer).encode() + b"\\n")

    server = socketserver.ThreadingTCPServer(("", 0), Echo)
    print("serving", server.server_address[0], server.server_address[1], flush=True)
    server.serve_forever()
"""


def test_an_unmodified_socketserver_serves_the_grid(grid):
    server = grid.start("nb", SOCKETSERVER_ECHO)
    _, ip, port = wait_for_line(server, "serving ", timeout=SCRIPT_TIMEOUT_S).split()
    assert ip == grid_ip(grid.node_id("nb"))
    out = grid.run("na", f"""
        import socket
        with socket.create_connection(("nb", {port}), timeout=30) as sock:
            f = sock.makefile("rwb")
            for word in (b"hello", b"grid"):
                f.write(word + b"\\n")
                f.flush()
                print(f.readline().decode().strip())
            print(sock.getpeername()[0], sock.getsockname()[0])
    """)
    lines = out.splitlines()
    me = grid_ip(grid.node_id("na"))
    assert lines[0].startswith("HELLO from " + me) and lines[1].startswith("GRID from " + me)
    assert lines[2] == f"{ip} {me}"


def test_nothing_listening_is_connection_refused(grid):
    out = grid.run("na", """
        import socket
        try:
            socket.create_connection(("nb", 1), timeout=30)
        except ConnectionRefusedError as exc:
            print("refused", exc.errno)
    """)
    assert out.split()[0] == "refused"


def test_an_unmodified_xmlrpc_server_and_client(grid):
    server = grid.start("nb", """
        from xmlrpc.server import SimpleXMLRPCServer
        server = SimpleXMLRPCServer(("0.0.0.0", 0), logRequests=False)
        server.register_function(lambda a, b: a + b, "add")
        print("serving", server.server_address[1], flush=True)
        server.serve_forever()
    """)
    port = wait_for_line(server, "serving ", timeout=SCRIPT_TIMEOUT_S).split()[1]
    out = grid.run("na", f"""
        import xmlrpc.client
        print(xmlrpc.client.ServerProxy("http://nb.grid:{port}/").add(2, 40))
    """)
    assert out.strip() == "42"


def test_local_traffic_is_untouched_and_asks_the_agent_nothing(grid):
    out = grid.run("na", """
        import socket, threading
        from gridsock.personalities import socket as personality
        calls = []
        agent = personality.agent()  # every agent call opens a connection: count those
        real_open = agent.open
        agent.open = lambda **kw: (calls.append(kw), real_open(**kw))[1]
        server = socket.socket()
        server.bind(("127.0.0.1", 0))
        server.listen()
        def serve():
            conn, _ = server.accept()
            conn.sendall(conn.recv(100)[::-1])
            conn.close()
        threading.Thread(target=serve).start()
        with socket.create_connection(("localhost", server.getsockname()[1])) as sock:
            sock.sendall(b"local")
            print(sock.recv(100).decode(), type(sock).__name__, sock.getpeername()[0], len(calls))
        server.close()
        socket.gethostbyname("nb")  # (and the count does count: a grid name asks once)
        print(len(calls))
    """)
    assert out.split() == ["lacol", "GridSocket", "127.0.0.1", "0", "1"]


@pytest.fixture(scope="module")
def echo_port(grid):
    server = grid.start("nb", SOCKETSERVER_ECHO)
    return int(wait_for_line(server, "serving ", timeout=SCRIPT_TIMEOUT_S).split()[2])


SPAWNED_CLIENT = """
    import multiprocessing, socket, sys

    def ask(port, queue):
        with socket.create_connection(("nb", port), timeout=30) as sock:
            sock.sendall(b"child\\n")
            queue.put(sock.makefile("rb").readline().decode().split()[0])

    if __name__ == "__main__":
        port = int(sys.argv[1])
        for method in ("spawn", "forkserver"):
            context = multiprocessing.get_context(method)
            queue = context.Queue()
            child = context.Process(target=ask, args=(port, queue))
            child.start()
            print(method, queue.get(timeout=60))
            child.join()
"""


def test_gridsock_run_patches_the_program_and_its_spawned_children(grid, echo_port):
    script = grid.script(SPAWNED_CLIENT)
    done = subprocess.run(gridsock_argv("run", "--node", "na", "--", sys.executable, str(script), str(echo_port)),
                          capture_output=True, text=True, env=grid.env, timeout=SCRIPT_TIMEOUT_S)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["spawn CHILD", "forkserver CHILD"]


def test_gridsock_run_with_a_node_of_its_own(grid, echo_port):
    script = grid.script(f"""
        import socket
        with socket.create_connection(("nb.grid", {echo_port}), timeout=30) as sock:
            sock.sendall(b"own node\\n")
            print(sock.makefile("rb").readline().decode().strip())
            print(sock.getsockname()[0], socket.gethostbyname("nc"))
    """)
    done = subprocess.run(gridsock_argv("run", "--session", str(grid.session), "--name", "nc", "--cluster", "C",
                                        "--listen", "127.0.0.1:0", "--", sys.executable, str(script)),
                          capture_output=True, text=True, env=grid.env, timeout=SCRIPT_TIMEOUT_S)
    assert done.returncode == 0, done.stderr
    reply, addresses = done.stdout.splitlines()
    mine, resolved = addresses.split()
    assert mine == resolved and mine.startswith(("24", "25"))  # nc's grid address, as the grid resolves it
    assert reply.startswith(f"OWN NODE from {mine}:")


ASYNCIO_ECHO = """
    import asyncio

    async def echo(reader, writer):
        data = await reader.readline()
        writer.write(data.upper())
        await writer.drain()
        writer.close()

    async def main():
        server = await asyncio.start_server(echo, "0.0.0.0", 0)
        print("serving", server.sockets[0].getsockname()[1], flush=True)
        await server.serve_forever()

    asyncio.run(main())
"""


def test_asyncio_server_and_client_with_non_blocking_connect(grid):
    server = grid.start("nb", ASYNCIO_ECHO)
    port = wait_for_line(server, "serving ", timeout=SCRIPT_TIMEOUT_S).split()[1]
    out = grid.run("na", f"""
        import asyncio, socket

        async def main():
            reader, writer = await asyncio.open_connection("nb", {port})
            writer.write(b"asyncio\\n")
            print((await reader.readline()).decode().strip(), writer.get_extra_info("peername")[0])
            writer.close()
            await writer.wait_closed()
            try:
                await asyncio.open_connection("nb", 1)
            except ConnectionRefusedError:
                print("refused")

        asyncio.run(main())
        sock = socket.socket()
        sock.setblocking(False)
        print(sock.connect_ex(("nb", {port})) == __import__("errno").EINPROGRESS)
        sock.close()
    """)
    ip = grid_ip(grid.node_id("nb"))
    assert out.splitlines() == [f"ASYNCIO {ip}", "refused", "True"]


COUNTING_SERVER = """
    import hashlib, socketserver

    class Count(socketserver.BaseRequestHandler):
        def handle(self):
            digest, size = hashlib.sha256(), 0
            while data := self.request.recv(65536):
                digest.update(data)
                size += len(data)
            self.request.sendall(b"%d %s\\n" % (size, digest.hexdigest().encode()))

    server = socketserver.ThreadingTCPServer(("", 0), Count)
    print("serving", server.server_address[1], flush=True)
    server.serve_forever()
"""


def test_a_non_blocking_connect_carries_bulk_data(grid):
    # A non-blocking connect is bridged through a socketpair whose send buffer was shrunk for
    # the connect; once connected, a megabyte must flow as through any socket.
    server = grid.start("nb", COUNTING_SERVER)
    port = wait_for_line(server, "serving ", timeout=SCRIPT_TIMEOUT_S).split()[1]
    out = grid.run("na", f"""
        import asyncio, hashlib

        async def main():
            reader, writer = await asyncio.open_connection("nb", {port})
            data = bytes(range(256)) * 4096
            writer.write(data)
            await writer.drain()
            writer.write_eof()
            print((await asyncio.wait_for(reader.readline(), 30)).decode().strip())
            print(len(data), hashlib.sha256(data).hexdigest())
            writer.close()

        asyncio.run(main())
    """)
    got, sent = out.splitlines()
    assert got == sent


def test_patching_after_a_module_bound_socket_names_warns_naming_it(grid):
    code = textwrap.dedent("""
        import ssl, warnings
        from socket import getaddrinfo
        from gridsock.personalities.monkey import is_patched, patch_all, unpatch_all
        with warnings.catch_warnings(record=True) as got:
            warnings.simplefilter("always")
            patch_all()
        print(is_patched(), is_patched("socket", "getaddrinfo"))
        print(got[0].message)
        unpatch_all()
        print(is_patched())
    """)
    env = dict(grid.env, GRIDSOCK_AGENT=str(grid.run_dir / "na.agent"))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=SCRIPT_TIMEOUT_S)
    assert done.returncode == 0, done.stderr
    patched, message, unpatched = done.stdout.splitlines()
    assert patched == "True True" and unpatched == "False"
    assert "__main__ (getaddrinfo)" in message and "ssl (create_connection, socket)" in message, message


def test_a_dual_stack_http_server_serves_the_grid_and_urllib_fetches_byte_exact(grid, tmp_path):
    (tmp_path / "data.bin").write_bytes(os.urandom(3 << 20))
    server = grid.start("nb", """
        import runpy, sys
        sys.argv = ["http.server", "0", "--directory", sys.argv[1]]
        runpy.run_module("http.server", run_name="__main__")
    """, str(tmp_path))
    line = wait_for_line(server, "Serving HTTP on ", timeout=SCRIPT_TIMEOUT_S)
    port = line.split(" port ")[1].split()[0]
    out = grid.run("na", f"""
        import hashlib, urllib.request
        with urllib.request.urlopen("http://nb:{port}/data.bin", timeout=30) as response:
            print(hashlib.sha256(response.read()).hexdigest())
    """)
    assert out.strip() == hashlib.sha256((tmp_path / "data.bin").read_bytes()).hexdigest()


GEVENT_ECHO = """
    from gevent import monkey; monkey.patch_all()
    import gevent, socket

    def handle(conn):
        with conn:
            while data := conn.recv(100):
                conn.sendall(data.upper())

    server = socket.socket()
    server.bind(("", 0))
    server.listen()
    print("serving", server.getsockname()[1], flush=True)
    while True:
        gevent.spawn(handle, server.accept()[0])
"""


def test_a_gevent_patched_program_under_the_personality(grid):
    server = grid.start("nb", GEVENT_ECHO)
    port = wait_for_line(server, "serving ", timeout=SCRIPT_TIMEOUT_S).split()[1]
    out = grid.run("na", f"""
        from gevent import monkey; monkey.patch_all()
        import gevent, socket

        def ask(i):
            with socket.create_connection(("nb", {port}), timeout=30) as sock:
                sock.sendall(b"greenlet %d" % i)
                return sock.recv(100).decode()

        print(sorted(g.get() for g in gevent.joinall([gevent.spawn(ask, i) for i in range(8)], raise_error=True)))
    """)
    assert out.strip() == str(sorted(f"GREENLET {i}" for i in range(8)))


def test_a_listener_whose_node_goes_away_for_good_waits_instead_of_spinning(grid):
    node = grid.procs.start("nx", "node", "--session", str(grid.session), "--name", "nx", "--cluster", "X",
                            "--listen", "127.0.0.1:0")
    wait_for_line(node, "joined nx ", timeout=SCRIPT_TIMEOUT_S)
    server = grid.start("nx", """
        import select, socket, sys
        from gridsock.personalities.socket import agent
        agent().reconnect_give_up_s = 1.0  # (it waits that long for the node to come back, then gives up)
        server = socket.socket()
        server.bind(("", 0))
        server.listen()
        print("serving", flush=True)
        select.select([server], [], [], 60)  # the listener gives up on its node: readable (EOF)
        try:
            server.accept()
        except ConnectionResetError:
            print("reset", flush=True)
        server.settimeout(0.2)
        try:
            server.accept()
        except socket.timeout:
            print("waits", select.select([server], [], [], 0)[0] == [], flush=True)
        server.close()
    """)
    wait_for_line(server, "serving", timeout=SCRIPT_TIMEOUT_S)
    grid.procs.stop(node)
    assert wait_for_line(server, "reset", timeout=SCRIPT_TIMEOUT_S) == "reset"
    assert wait_for_line(server, "waits ", timeout=SCRIPT_TIMEOUT_S) == "waits True"


def test_a_datagram_socket_never_sends_a_grid_name_to_the_system_resolver(grid):
    out = grid.run("na", """
        import socket
        for host in ("nb", "nb.grid", "nobody.grid"):
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            try:
                sock.connect((host, 9))
                print("connected")
            except socket.gaierror as exc:
                print("gaierror", exc.errno == socket.EAI_NONAME)
            finally:
                sock.close()
    """)
    assert out.splitlines() == ["gaierror True"] * 3


def test_grid_sockets_are_not_inherited_by_child_processes(grid, echo_port):
    out = grid.run("na", f"""
        import os, socket
        server = socket.socket()
        server.bind(("", 0))
        server.listen()
        client = socket.create_connection(("nb", {echo_port}), timeout=30)
        print(server.get_inheritable(), client.get_inheritable(), os.get_inheritable(client.fileno()))
        client.close()
        server.close()
    """)
    assert out.split() == ["False", "False", "False"]
