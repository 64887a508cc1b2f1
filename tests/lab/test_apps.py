"""Unmodified stdlib servers and clients across the lab's NAT, firewall and private cluster.

Every program is a plain stdlib script started with ``gridsock run --node NAME -- python ...``
in the namespace of node NAME: it reaches the other nodes by name through its node's agent,
and the node picks the method (reverse, splice, SOCKS through cluster C's front-end, relay...).
Readiness is a line a server prints; every wait is bounded.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap

import pytest

from gridsock.testing.procs import gridsock_argv, wait_for_line

from .gridsession import make_grid

pytestmark = pytest.mark.timeout(300)

# A script (interpreter start, connects across the lab, the work) finishes within this.
APP_TIMEOUT_S = 120.0
# The rules of test_data: SOCKS through fec into and out of cluster C where it can work.
VIA_RULES = """
[[via]]
from = "!cluster:C"
to = "cluster:C"
stack = "tls/socks(proxy=203.0.113.4:1080)"
[[via]]
from = "cluster:C"
to = "!cluster:C"
stack = "tls/socks(proxy=10.3.0.1:1080)"
"""


@pytest.fixture(scope="module")
def grid(lab, tmp_path_factory):
    yield from make_grid(lab, tmp_path_factory, rules={n: VIA_RULES for n in ("rv", "a1", "a2", "b1", "b2", "c1", "c2")})


class Apps:
    def __init__(self, grid) -> None:
        self.grid = grid
        self.count = 0

    def _script(self, text: str) -> str:
        self.count += 1
        path = self.grid.tmp / f"app{self.count}.py"
        path.write_text(textwrap.dedent(text))
        return str(path)

    def argv(self, node: str, text: str, *args: str) -> list:
        return gridsock_argv("run", "--node", node, "--", sys.executable, self._script(text), *args)

    def start(self, node: str, text: str, *args: str) -> subprocess.Popen:
        log = open(self.grid.tmp / f"app{self.count + 1}.log", "wb")
        try:
            return self.grid.lab.spawn(node, self.argv(node, text, *args), stdout=subprocess.PIPE, stderr=log,
                                       env=self.grid.env)
        finally:
            log.close()

    def run(self, node: str, text: str, *args: str) -> str:
        done = self.grid.lab.run(node, self.argv(node, text, *args), capture_output=True, text=True,
                                 env=self.grid.env, timeout=APP_TIMEOUT_S)
        assert done.returncode == 0, f"{node}: {done.stderr}"
        return done.stdout


@pytest.fixture(scope="module")
def apps(grid):
    return Apps(grid)


XMLRPC_SERVER = """
    import hashlib
    from xmlrpc.server import SimpleXMLRPCServer

    server = SimpleXMLRPCServer(("", 0), logRequests=False, allow_none=True)
    server.register_function(lambda a, b: a + b, "add")
    server.register_function(lambda data: hashlib.sha256(data.data).hexdigest(), "digest")
    print("serving", server.server_address[1], flush=True)
    server.serve_forever()
"""


@pytest.mark.parametrize("client", ["a2", "c2"])
def test_an_unmodified_xmlrpc_server_in_the_firewalled_cluster(apps, client):
    server = apps.start("b2", XMLRPC_SERVER)
    port = wait_for_line(server, "serving ", timeout=APP_TIMEOUT_S).split()[1]
    out = apps.run(client, f"""
        import os, hashlib, xmlrpc.client
        proxy = xmlrpc.client.ServerProxy("http://b2:{port}/")
        data = os.urandom(1 << 20)
        print(proxy.add(2, 40), proxy.digest(xmlrpc.client.Binary(data)) == hashlib.sha256(data).hexdigest())
    """)
    assert out.split() == ["42", "True"]
    server.terminate()


def start_http_server(apps, node: str, directory) -> tuple:
    """``python -m http.server`` on any port, under ``gridsock run`` on ``node``: (process, port)."""
    server = apps.start(node, """
        import runpy, sys
        sys.argv = ["http.server", "0", "--directory", sys.argv[1]]
        runpy.run_module("http.server", run_name="__main__")
    """, str(directory))
    return server, wait_for_line(server, "Serving HTTP on ", timeout=APP_TIMEOUT_S).split(" port ")[1].split()[0]


def test_python_http_server_in_the_private_cluster_urllib_and_requests(apps, grid):
    directory = grid.tmp / "www"
    directory.mkdir(exist_ok=True)
    payload = os.urandom(8 << 20)
    (directory / "data.bin").write_bytes(payload)
    server, port = start_http_server(apps, "c2", directory)
    for client in ("a1", "b1"):
        out = apps.run(client, f"""
            import hashlib, urllib.request, requests
            with urllib.request.urlopen("http://c2:{port}/data.bin", timeout=60) as response:
                print(hashlib.sha256(response.read()).hexdigest())
            print(hashlib.sha256(requests.get("http://c2.grid:{port}/data.bin", timeout=60).content).hexdigest())
        """)
        assert out.split() == [hashlib.sha256(payload).hexdigest()] * 2, client
    server.terminate()


MANAGER_SERVER = """
    import queue
    from multiprocessing.managers import BaseManager

    shared = queue.Queue()

    class QueueManager(BaseManager):
        pass

    QueueManager.register("get_queue", callable=lambda: shared)
    server = QueueManager(address=("", 0), authkey=b"grid lab").get_server()
    print("serving", server.address[0], server.address[1], flush=True)
    server.serve_forever()
"""

MANAGER_CLIENT = """
    import sys
    from multiprocessing.managers import BaseManager

    class QueueManager(BaseManager):
        pass

    QueueManager.register("get_queue")
    manager = QueueManager(address=("a1", int(sys.argv[1])), authkey=b"grid lab")
    manager.connect()
    shared = manager.get_queue()
    if sys.argv[2] == "put":
        for i in range(3):
            shared.put(f"item {i} from b1")
    else:
        print(" | ".join(shared.get(timeout=60) for _ in range(3)))
"""


def test_a_multiprocessing_manager_queue_shared_across_clusters(apps, grid):
    server = apps.start("a1", MANAGER_SERVER)
    _, address, port = wait_for_line(server, "serving ", timeout=APP_TIMEOUT_S).split()
    assert address.startswith(("24", "25"))  # a grid address, which the manager hands to its clients
    apps.run("b1", MANAGER_CLIENT, port, "put")
    out = apps.run("c1", MANAGER_CLIENT, port, "get")
    assert out.strip() == "item 0 from b1 | item 1 from b1 | item 2 from b1"
    server.terminate()


ASYNCIO_SERVER = """
    import asyncio

    async def echo(reader, writer):
        while line := await reader.readline():
            writer.write(line.upper())
            await writer.drain()
        writer.close()

    async def main():
        server = await asyncio.start_server(echo, "0.0.0.0", 0)
        print("serving", server.sockets[0].getsockname()[1], flush=True)
        await server.serve_forever()

    asyncio.run(main())
"""


@pytest.mark.parametrize("client", ["a1", "c1"])
def test_an_asyncio_echo_server_and_clients(apps, client):
    server = apps.start("b1", ASYNCIO_SERVER)
    port = wait_for_line(server, "serving ", timeout=APP_TIMEOUT_S).split()[1]
    out = apps.run(client, f"""
        import asyncio, json

        async def main():
            reader, writer = await asyncio.open_connection("b1", {port})
            replies = []
            for word in ("grid", "lab", "{client}"):
                writer.write(word.encode() + b"\\n")
                replies.append((await reader.readline()).decode().strip())
            writer.close()
            await writer.wait_closed()
            print(json.dumps(replies))

        asyncio.run(main())
    """)
    assert json.loads(out) == ["GRID", "LAB", client.upper()]
    server.terminate()


@pytest.fixture
def wan(grid):
    """The lab's internet as a WAN for one test: 10 ms each way between the public hosts (20 ms
    round trip across sites); back to none afterwards, for the other tests of the session."""
    grid.lab.set_wan(delay_ms=10.0)
    try:
        yield
    finally:
        grid.lab.set_wan()


def test_an_http_download_across_clusters_under_wan_delay(apps, grid, wan):
    # As a user meets it: unmodified http.server behind B's firewall, unmodified urllib behind
    # A's NAT, the default policy (tls from outside the cluster), 20 ms round trip. Which
    # stack the node picks is its business (tls/splice through both, here); the bytes must be
    # exact, twice.
    directory = grid.tmp / "www-wan"
    directory.mkdir(exist_ok=True)
    payload = os.urandom(16 << 20)
    (directory / "data.bin").write_bytes(payload)
    server, port = start_http_server(apps, "b2", directory)
    try:
        out = apps.run("a2", f"""
            import hashlib, urllib.request
            for _ in range(2):  # the second finds the winner of the first race
                with urllib.request.urlopen("http://b2:{port}/data.bin", timeout=60) as response:
                    print(hashlib.sha256(response.read()).hexdigest())
        """)
        assert out.split() == [hashlib.sha256(payload).hexdigest()] * 2
    finally:
        server.terminate()
        server.wait(timeout=30)
