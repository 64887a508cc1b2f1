"""The shims: grid hosts in http.client, urllib, requests, xmlrpc and multiprocessing, unpatched.

Servers and clients are real processes on the loopback grid of ``test_personality`` (a
rendez-vous node, ``na`` in cluster A, ``nb`` in cluster B). The programs under test run WITHOUT
the socket personality patched in, with ``$GRIDSOCK_AGENT`` naming the agent of their node; the
only stdlib servers under ``python -m gridsock.monkey`` are the HTTP(S) servers the HTTP shims
fetch from. Readiness is a line a process prints; every wait is bounded.
"""
from __future__ import annotations

import datetime
import hashlib
import ipaddress
import json
import os
import re
import socket
import subprocess
import sys
import textwrap

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gridsock.names import grid_ip
from gridsock.testing.procs import wait_for_line
from test_cli import assert_no_trouble
from test_personality import SCRIPT_TIMEOUT_S, grid  # noqa: F401 (grid: the module-scoped fixture)

pytestmark = pytest.mark.timeout(180)

# What the HTTP tests fetch: more than one TCP window, and every byte value.
BLOB_BYTES = 3 * 1024 * 1024 + 17

# Every unpatched script starts by proving it is unpatched.
UNPATCHED = """\
import socket
from gridsock.personalities import monkey
assert not monkey.is_patched() and socket.socket is monkey.get_original("socket", "socket")
"""


def script_env(grid, node):
    """The grid's environment with ``$GRIDSOCK_AGENT`` naming ``node``'s agent (None: unset),
    no patching ``sitecustomize`` and no proxies (they would take the grid URLs elsewhere)."""
    env = {k: v for k, v in grid.env.items() if not k.lower().endswith("_proxy")}
    env.pop("GRIDSOCK_AGENT", None)
    env.pop("PYTHONPATH", None)
    if node is not None:
        env["GRIDSOCK_AGENT"] = str(grid.run_dir / f"{node}.agent")
    return env


def run_unpatched(grid, node, text: str, *args: str) -> str:
    """Run a script to completion, unpatched, with ``node``'s agent; return its stdout."""
    path = grid.script(UNPATCHED + textwrap.dedent(text))
    done = subprocess.run([sys.executable, str(path), *args], capture_output=True, text=True,
                          env=script_env(grid, node), timeout=SCRIPT_TIMEOUT_S)
    assert done.returncode == 0, done.stderr
    assert_no_trouble(done.stderr, path.name)
    return done.stdout


def spawn(grid, name: str, argv, env, *, stdin=None) -> subprocess.Popen:
    """Start a server process; its stderr goes to ``<name>.log`` (checked for tracebacks and
    warnings when the grid stops), and it is stopped with the grid's processes."""
    with open(grid.tmp / f"{name}.log", "wb") as log:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=log, stdin=stdin, env=env)
    grid.procs.started.append(proc)
    return proc


def start_unpatched(grid, node, text: str, *args: str, stdin=None) -> subprocess.Popen:
    path = grid.script(UNPATCHED + textwrap.dedent(text))
    return spawn(grid, path.stem, [sys.executable, str(path), *args], script_env(grid, node), stdin=stdin)


@pytest.fixture(scope="module")
def www(grid):
    """A directory served over HTTP, holding ``blob.bin``."""
    directory = grid.tmp / "www"
    directory.mkdir()
    (directory / "blob.bin").write_bytes(os.urandom(BLOB_BYTES - 256) + bytes(range(256)))
    return directory


@pytest.fixture(scope="module")
def tls(grid):
    """A CA (``ca.pem``) and a server certificate for ``nb`` and ``nb.grid`` (``nb.pem``, ``nb.key``)."""
    directory = grid.tmp / "tls"
    directory.mkdir()
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "shim test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                       crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "nb.grid")])).issuer_name(ca_name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("nb.grid"), x509.DNSName("nb"),
                                                        x509.IPAddress(ipaddress.ip_address(
                                                            grid_ip(grid.node_id("nb"))))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    (directory / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (directory / "nb.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (directory / "nb.key").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                         serialization.NoEncryption()))
    return directory


def sha256_of(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- gridsock.shims.http -------------------------------------------------------------------------


def test_urlopen_http_client_and_requests_fetch_byte_exact_from_a_grid_http_server(grid, www):
    server = spawn(grid, "http-server", [sys.executable, "-m", "gridsock.monkey", "--node", "nb", "-m", "http.server",
                                         "0", "--bind", "0.0.0.0", "--directory", str(www)], grid.env)
    line = wait_for_line(server, "Serving HTTP on ", timeout=SCRIPT_TIMEOUT_S)
    ip, port = re.match(r"Serving HTTP on (\S+) port (\d+) ", line).groups()
    assert ip == grid_ip(grid.node_id("nb"))  # python -m http.server serves the grid

    out = run_unpatched(grid, "na", """
        import hashlib, json, sys, urllib.error
        import requests
        from gridsock.shims.http import GridAdapter, HTTPConnection, urlopen

        port = int(sys.argv[1])
        got = {}
        with urlopen(f"http://nb.grid:{port}/blob.bin", timeout=30) as response:
            got["urlopen"] = [response.status, hashlib.sha256(response.read()).hexdigest()]
        conn = HTTPConnection("nb", port, timeout=30)
        conn.connect()
        got["http.client socket"] = [type(conn.sock).__name__, conn.sock.getpeername()[0], conn.sock.gettimeout()]
        conn.request("GET", "/blob.bin")
        response = conn.getresponse()
        got["http.client"] = [response.status, hashlib.sha256(response.read()).hexdigest()]
        conn.close()
        with requests.Session() as session:
            session.mount("http://", GridAdapter())
            response = session.get(f"http://nb.grid:{port}/blob.bin", timeout=30)
            got["requests"] = [response.status_code, hashlib.sha256(response.content).hexdigest()]
            got["requests 404"] = session.get(f"http://nb:{port}/missing", timeout=30).status_code
            try:
                session.get("http://nobody.grid:80/", timeout=30)
            except requests.exceptions.ConnectionError as exc:
                got["requests unknown"] = type(exc.args[0].reason).__name__
            try:
                session.get(f"http://nb.grid:1/", timeout=30)
            except requests.exceptions.ConnectionError as exc:
                got["requests refused"] = type(exc.args[0].reason).__name__
        for url in ("http://nobody.grid/", "http://nb.grid:1/"):
            try:
                urlopen(url, timeout=30)
            except urllib.error.URLError as exc:
                got[url] = [type(exc.reason).__name__, exc.reason.errno]
        print(json.dumps(got))
    """, port)
    got = json.loads(out)
    blob = sha256_of(www / "blob.bin")
    assert got["urlopen"] == got["http.client"] == got["requests"] == [200, blob]
    assert got["http.client socket"] == ["GridSocket", ip, 30.0]
    assert got["requests 404"] == 404
    assert got["requests unknown"] == "NameResolutionError" and got["requests refused"] == "NewConnectionError"
    assert got["http://nobody.grid/"] == ["gaierror", socket.EAI_NONAME]
    assert got["http://nb.grid:1/"][0] == "ConnectionRefusedError"


TLS_HTTP_SERVER = """
    import functools, http.server, ssl, sys

    directory, cert, key = sys.argv[1:4]
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)

    class TLSServer(http.server.ThreadingHTTPServer):
        def get_request(self):
            conn, addr = self.socket.accept()
            return context.wrap_socket(conn, server_side=True), addr  # (a failed handshake is dropped)

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=directory)
    server = TLSServer(("0.0.0.0", 0), handler)
    print("serving", *server.server_address, flush=True)
    server.serve_forever()
"""


def test_https_runs_tls_over_the_grid_connection_and_checks_the_certificate(grid, www, tls):
    script = grid.script(TLS_HTTP_SERVER)
    server = spawn(grid, script.stem, grid.argv("nb", script, str(www), str(tls / "nb.pem"), str(tls / "nb.key")),
                   grid.env)
    port = wait_for_line(server, "serving ", timeout=SCRIPT_TIMEOUT_S).split()[2]

    out = run_unpatched(grid, "na", """
        import hashlib, json, ssl, sys, urllib.error
        import requests
        from gridsock.shims.http import GridAdapter, HTTPSConnection, build_opener, GridHTTPSHandler, urlopen

        port, ca = int(sys.argv[1]), sys.argv[2]
        context = ssl.create_default_context(cafile=ca)
        url = f"https://nb.grid:{port}/blob.bin"
        got = {}
        with urlopen(url, timeout=30, context=context) as response:
            got["urlopen"] = [response.status, hashlib.sha256(response.read()).hexdigest()]
        with build_opener(GridHTTPSHandler(context=context)).open(f"https://nb:{port}/blob.bin", timeout=30) as response:
            got["opener"] = [response.status, hashlib.sha256(response.read()).hexdigest()]
        conn = HTTPSConnection("nb.grid", port, timeout=30, context=context)
        conn.connect()
        tls_version = conn.sock.version()
        conn.request("GET", "/blob.bin")
        response = conn.getresponse()
        got["http.client"] = [response.status, hashlib.sha256(response.read()).hexdigest(), tls_version[:3]]
        conn.close()
        with requests.Session() as session:
            session.mount("https://", GridAdapter())
            response = session.get(url, timeout=30, verify=ca)
            got["requests"] = [response.status_code, hashlib.sha256(response.content).hexdigest()]
            try:
                session.get(url, timeout=30)  # the system's CAs do not know the test CA
            except requests.exceptions.SSLError:
                got["requests unverified"] = "SSLError"
        try:
            urlopen(url, timeout=30)
        except urllib.error.URLError as exc:
            got["urlopen unverified"] = type(exc.reason).__name__
        print(json.dumps(got))
    """, port, str(tls / "ca.pem"))
    got = json.loads(out)
    blob = sha256_of(www / "blob.bin")
    assert got["urlopen"] == got["opener"] == got["requests"] == [200, blob]
    assert got["http.client"] == [200, blob, "TLS"]
    assert got["requests unverified"] == "SSLError" and got["urlopen unverified"] == "SSLCertVerificationError"


def test_build_opener_refuses_a_stdlib_handler_that_would_shadow_the_grid_one():
    import urllib.request

    from gridsock.shims.http import GridHTTPHandler, GridHTTPSHandler, build_opener

    with pytest.raises(TypeError, match="GridHTTPSHandler"):
        build_opener(urllib.request.HTTPSHandler())
    opener = build_opener(GridHTTPSHandler(), urllib.request.HTTPCookieProcessor)
    assert {type(h) for h in opener.handlers if isinstance(h, urllib.request.AbstractHTTPHandler)} \
        == {GridHTTPHandler, GridHTTPSHandler}


def test_the_http_shim_imports_without_requests(grid):
    done = subprocess.run([sys.executable, "-c", textwrap.dedent("""
        import sys
        sys.modules["requests"] = None  # as if it were not installed
        import gridsock.shims.http as shim
        print(hasattr(shim, "GridAdapter"), "GridAdapter" in shim.__all__, callable(shim.urlopen))
    """)], capture_output=True, text=True, env=script_env(grid, None), timeout=SCRIPT_TIMEOUT_S)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", "False", "True"]


# --- gridsock.shims.xmlrpc -----------------------------------------------------------------------

XMLRPC_SERVERS = """
    import ssl, sys, threading
    from gridsock.shims.xmlrpc import SimpleXMLRPCRequestHandler, SimpleXMLRPCServer

    cert, key = sys.argv[1:3]
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)

    class TLSHandler(SimpleXMLRPCRequestHandler):
        disable_nagle_algorithm = True  # TCP_NODELAY on the TLS socket: a TCP socket, bridged or not

    class TLSXMLRPCServer(SimpleXMLRPCServer):
        def get_request(self):
            conn, addr = self.socket.accept()
            return context.wrap_socket(conn, server_side=True), addr

    def divide(a, b):
        return a / b

    servers = [SimpleXMLRPCServer(("", 0), logRequests=False, use_builtin_types=True),
               TLSXMLRPCServer(("0.0.0.0", 0), TLSHandler, logRequests=False, use_builtin_types=True)]
    for server in servers:
        server.register_function(lambda a, b: a + b, "add")
        server.register_function(lambda data: data[::-1], "reverse")
        server.register_function(divide)
        server.register_introspection_functions()
        threading.Thread(target=server.serve_forever, daemon=True).start()
    plain, tls = servers
    print("serving", plain.server_address[0], plain.server_address[1], tls.server_address[1],
          type(plain.socket).__name__, flush=True)
    threading.Event().wait()
"""


def test_xmlrpc_server_on_one_node_and_server_proxy_on_another_unpatched(grid, tls):
    server = start_unpatched(grid, "nb", XMLRPC_SERVERS, str(tls / "nb.pem"), str(tls / "nb.key"))
    _, ip, port, tls_port, kind = wait_for_line(server, "serving ", timeout=SCRIPT_TIMEOUT_S).split()
    assert ip == grid_ip(grid.node_id("nb")) and kind == "GridSocket"

    out = run_unpatched(grid, "na", """
        import json, ssl, sys, xmlrpc.client
        from gridsock.shims.xmlrpc import ServerProxy

        ip, port, tls_port, ca = sys.argv[1:5]
        got = {}
        with ServerProxy(f"http://nb.grid:{port}/", use_builtin_types=True) as proxy:
            got["add"] = proxy.add(2, 40)
            blob = bytes(range(256)) * 2048
            got["reverse"] = proxy.reverse(blob) == blob[::-1]
            got["methods"] = "divide" in proxy.system.listMethods()
            try:
                proxy.divide(1, 0)
            except xmlrpc.client.Fault as fault:
                got["fault"] = "ZeroDivisionError" in fault.faultString
        got["by address"] = ServerProxy(f"http://{ip}:{port}").add("grid", "ip")
        context = ssl.create_default_context(cafile=ca)
        with ServerProxy(f"https://nb.grid:{tls_port}/RPC2", context=context) as proxy:
            got["tls add"] = proxy.add(1, 1)
        for name, uri in (("refused", "http://nb.grid:1/"), ("unknown", "http://nobody.grid/")):
            try:
                ServerProxy(uri).add(1, 2)
            except OSError as exc:
                got[name] = type(exc).__name__
        print(json.dumps(got))
    """, ip, port, tls_port, str(tls / "ca.pem"))
    assert json.loads(out) == {"add": 42, "reverse": True, "methods": True, "fault": True, "by address": "gridip",
                               "tls add": 2, "refused": "ConnectionRefusedError", "unknown": "gaierror"}


# --- gridsock.shims.mpconnection -----------------------------------------------------------------


def test_listener_and_client_across_the_grid_with_the_authkey_handshake(grid):
    server = start_unpatched(grid, "nb", """
        import multiprocessing.connection
        from multiprocessing import AuthenticationError
        from gridsock.shims.mpconnection import Listener

        with Listener(("", 0), authkey=b"secret") as listener:
            print("listening", *listener.address, isinstance(listener, multiprocessing.connection.Listener),
                  flush=True)
            with listener.accept() as conn:
                print("accepted", listener.last_accepted[0], flush=True)
                request = conn.recv()
                conn.send({"echo": request, "big": bytes(range(256)) * 4096})
                conn.send_bytes(conn.recv_bytes()[::-1])
            try:
                listener.accept()
            except AuthenticationError:
                print("rejected a wrong authkey", flush=True)
    """)
    _, ip, port, is_listener = wait_for_line(server, "listening ", timeout=SCRIPT_TIMEOUT_S).split()
    assert ip == grid_ip(grid.node_id("nb")) and is_listener == "True"

    out = run_unpatched(grid, "na", """
        import json, sys
        from multiprocessing import AuthenticationError
        from gridsock.shims.mpconnection import Client

        ip, port = sys.argv[1], int(sys.argv[2])
        got = {}
        with Client(("nb", port), authkey=b"secret") as conn:
            conn.send(("hello", 42))
            reply = conn.recv()
            got["echo"] = list(reply["echo"])
            got["big"] = reply["big"] == bytes(range(256)) * 4096
            conn.send_bytes(b"grid")
            got["bytes"] = conn.recv_bytes().decode()
        try:
            Client((ip, port), authkey=b"wrong")
        except AuthenticationError:
            got["wrong authkey"] = "AuthenticationError"
        print(json.dumps(got))
    """, ip, port)
    assert json.loads(out) == {"echo": ["hello", 42], "big": True, "bytes": "dirg",
                               "wrong authkey": "AuthenticationError"}
    assert wait_for_line(server, "accepted ", timeout=SCRIPT_TIMEOUT_S).split()[1] == grid_ip(grid.node_id("na"))
    wait_for_line(server, "rejected a wrong authkey", timeout=SCRIPT_TIMEOUT_S)
    assert server.wait(timeout=SCRIPT_TIMEOUT_S) == 0


QUEUE_MANAGERS = """
    from gridsock.shims.mpconnection import GridManager

    class QueueManager(GridManager):
        pass
"""


def test_a_grid_manager_serves_shared_queues_to_another_node(grid):
    server = start_unpatched(grid, "nb", QUEUE_MANAGERS + """
    import queue, threading

    inbox, outbox = queue.Queue(), queue.Queue()
    QueueManager.register("get_inbox", callable=lambda: inbox)
    QueueManager.register("get_outbox", callable=lambda: outbox)

    def work():
        while True:
            outbox.put(inbox.get().upper())

    threading.Thread(target=work, daemon=True).start()
    server = QueueManager(address=("", 0), authkey=b"queues").get_server()
    print("serving", *server.address, flush=True)
    server.serve_forever()
    """)
    _, ip, port = wait_for_line(server, "serving ", timeout=SCRIPT_TIMEOUT_S).split()
    assert ip == grid_ip(grid.node_id("nb"))

    out = run_unpatched(grid, "na", QUEUE_MANAGERS + """
    import sys
    from multiprocessing import AuthenticationError

    QueueManager.register("get_inbox")
    QueueManager.register("get_outbox")
    manager = QueueManager(address=("nb.grid", int(sys.argv[1])), authkey=b"queues")
    manager.connect()
    inbox, outbox = manager.get_inbox(), manager.get_outbox()
    for word in ("shared", "queue"):
        inbox.put(word)
    print(outbox.get(timeout=30), outbox.get(timeout=30))
    try:
        QueueManager(address=(sys.argv[2], int(sys.argv[1])), authkey=b"wrong").connect()
    except AuthenticationError:
        print("wrong authkey refused")
    """, port, ip)
    assert out.splitlines() == ["SHARED QUEUE", "wrong authkey refused"]


def test_a_grid_sync_manager_started_in_a_child_and_its_proxies_in_spawned_children(grid):
    # On nb: a GridSyncManager whose server is a child process (start()), used by nb itself
    # through the grid, and by na. Closing stdin shuts it down.
    server = start_unpatched(grid, "nb", """
        import signal, sys
        from gridsock.shims.mpconnection import GridSyncManager

        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # (teardown: shut the server child down too)
        if __name__ == "__main__":
            with GridSyncManager(address=("", 0), authkey=b"sync") as manager:
                ip, port = manager.address
                counts = manager.dict(nb=1)
                print("serving", ip, port, counts["nb"], flush=True)
                sys.stdin.read()
            print("stopped", flush=True)
    """, stdin=subprocess.PIPE)
    _, ip, port, count = wait_for_line(server, "serving ", timeout=SCRIPT_TIMEOUT_S).split()
    assert ip == grid_ip(grid.node_id("nb")) and count == "1"

    # On na: the shim is imported in __main__ only, so the spawned child, which unpickles a proxy
    # to nb's queue and calls a stdlib function on it, never imports it by itself.
    out = run_unpatched(grid, "na", """
        import multiprocessing, operator, sys

        if __name__ == "__main__":
            from gridsock.shims.mpconnection import GridManager, GridSyncManager

            manager = GridSyncManager(address=(sys.argv[1], int(sys.argv[2])), authkey=b"sync")
            manager.connect()
            queue, shared = manager.Queue(), manager.list()
            shared.extend(["from na"])
            child = multiprocessing.get_context("spawn").Process(target=operator.methodcaller("put", "from child"),
                                                                 args=(queue,))
            child.start()
            print(queue.get(timeout=30), "|", shared[0], "|", type(queue).__name__)
            child.join(timeout=30)
            print("child exit", child.exitcode)

            class Numbers(GridManager):
                pass

            Numbers.register("Numbers", list)
            with Numbers(address=("", 0), authkey=b"xml", serializer="xmlrpclib") as local:  # served on na
                numbers = local.Numbers()
                numbers.extend([7, 7, 8])
                print("xmlrpclib", local.address[0], numbers.count(7))
    """, ip, port)
    assert out.splitlines() == ["from child | from na | AutoProxy[Queue]", "child exit 0",
                                f"xmlrpclib {grid_ip(grid.node_id('na'))} 2"]
    server.stdin.close()
    wait_for_line(server, "stopped", timeout=SCRIPT_TIMEOUT_S)
    assert server.wait(timeout=SCRIPT_TIMEOUT_S) == 0


# --- without an agent: the stdlib --------------------------------------------------------------


def test_without_an_agent_every_shim_is_the_stdlib(grid, www):
    out = run_unpatched(grid, None, """
        import functools, hashlib, http.server, json, multiprocessing.connection, socket, sys, threading
        import urllib.request, xmlrpc.client
        from multiprocessing import AuthenticationError
        import requests
        from gridsock.personalities.socket import agent
        from gridsock.shims import http as shim_http, mpconnection, xmlrpc as shim_xmlrpc

        got = {"agent": agent()}
        class QuietHandler(http.server.SimpleHTTPRequestHandler):
            def log_message(self, *args):
                pass

        handler = functools.partial(QuietHandler, directory=sys.argv[1])
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        url = "http://127.0.0.1:%d/blob.bin" % server.server_address[1]
        with urllib.request.urlopen(url, timeout=30) as response:
            stdlib = hashlib.sha256(response.read()).hexdigest()
        with shim_http.urlopen(url, timeout=30) as response:
            got["urlopen"] = hashlib.sha256(response.read()).hexdigest() == stdlib
        conn = shim_http.HTTPConnection("localhost", server.server_address[1], timeout=30)
        conn.connect()
        got["http.client socket"] = type(conn.sock) is socket.socket
        conn.close()
        with requests.Session() as session:
            session.mount("http://", shim_http.GridAdapter())
            got["requests"] = hashlib.sha256(session.get(url, timeout=30).content).hexdigest() == stdlib
        server.shutdown()
        server.server_close()

        rpc = shim_xmlrpc.SimpleXMLRPCServer(("127.0.0.1", 0), logRequests=False)
        rpc.register_function(pow)
        threading.Thread(target=rpc.serve_forever, daemon=True).start()
        got["xmlrpc socket"] = type(rpc.socket) is socket.socket
        with shim_xmlrpc.ServerProxy("http://127.0.0.1:%d" % rpc.server_address[1]) as proxy:
            got["xmlrpc"] = proxy.pow(2, 10)
        rpc.shutdown()
        rpc.server_close()

        for address in (("127.0.0.1", 0), None):
            with mpconnection.Listener(address, authkey=b"k") as listener:
                def serve():
                    with listener.accept() as conn:
                        conn.send(conn.recv() * 2)
                    try:
                        listener.accept()
                    except AuthenticationError:
                        pass
                thread = threading.Thread(target=serve)
                thread.start()
                with mpconnection.Client(listener.address, authkey=b"k") as conn:
                    conn.send(21)
                    got.setdefault("mp", []).append([type(listener.address).__name__, conn.recv(),
                                                     type(listener._listener).__name__])
                try:
                    mpconnection.Client(listener.address, authkey=b"bad")
                except AuthenticationError:
                    got.setdefault("mp wrong", []).append(True)
                thread.join(timeout=30)

        if __name__ == "__main__":
            with mpconnection.GridSyncManager(address=("127.0.0.1", 0), authkey=b"m") as manager:
                queue = manager.Queue()
                queue.put("local")
                got["manager"] = [manager.address[0], queue.get(timeout=30)]
            with mpconnection.GridManager(serializer="xmlrpclib") as manager:
                got["xml manager address"] = type(manager.address).__name__
        print(json.dumps(got))
    """, str(www))
    assert json.loads(out) == {
        "agent": None, "urlopen": True, "http.client socket": True, "requests": True,
        "xmlrpc socket": True, "xmlrpc": 1024,
        "mp": [["tuple", 42, "SocketListener"], ["str", 42, "SocketListener"]], "mp wrong": [True, True],
        "manager": ["127.0.0.1", "local"], "xml manager address": "str",
    }
