"""The socket personality behaves as the stdlib's sockets do where programs can tell.

On the grid of tests/test_personality.py (nodes ``na`` and ``nb`` on loopback), stdlib scripts
under ``python -m gridsock.monkey``: only a listening socket accepts; ports as ``getaddrinfo``
takes them; no ``'localhost'`` literal in addresses in force mode; a non-blocking connect keeps
a normal send buffer; a reset is ``ConnectionResetError``, for ``send`` as for ``recv``; the
server's ``getpeername()`` is the client's ``getsockname()``, port included; a connection is in
the server's backlog when the client's connect returns.
``$GRIDSOCK_PERSONALITY_PYTHON`` runs the scripts under another interpreter (see
tests/test_personality_tls.py).
"""
from __future__ import annotations

import json
import subprocess

import pytest

from gridsock import wire
from gridsock.errors import RemoteProtocolError
from gridsock.names import grid_ip
from gridsock.testing.procs import wait_for_line
from test_personality import SCRIPT_TIMEOUT_S, SOCKETSERVER_ECHO, grid  # noqa: F401 (the grid fixture)
from test_personality_tls import script_python  # noqa: F401 (autouse: $GRIDSOCK_PERSONALITY_PYTHON)

pytestmark = pytest.mark.timeout(120)


def test_a_bound_socket_refuses_connections_until_it_listens(grid):  # noqa: F811
    out = grid.run("na", """
        import socket
        server = socket.socket()
        server.bind(("", 0))
        port = server.getsockname()[1]
        try:
            socket.create_connection(("na", port), timeout=30)
            print("connected while only bound")
        except ConnectionRefusedError:
            print("refused while bound")
        other = socket.socket()
        try:
            other.bind(("", port))  # (the port is held all the same)
        except OSError as exc:
            print("bind again:", exc.errno == __import__("errno").EADDRINUSE)
        other.close()
        server.listen()
        with socket.create_connection(("na", port), timeout=30) as client:
            conn, _ = server.accept()
            client.sendall(b"now")
            print(conn.recv(10).decode())
            conn.close()
        server.close()
    """)
    assert out.splitlines() == ["refused while bound", "bind again: True", "now"]


def test_create_connection_takes_ports_as_getaddrinfo_does(grid):  # noqa: F811
    server = grid.start("nb", SOCKETSERVER_ECHO.replace('(("", 0), Echo)', '(("", socket.getservbyname("smtp")), Echo)')
                        .replace("import socketserver", "import socket, socketserver"))
    assert wait_for_line(server, "serving ", timeout=SCRIPT_TIMEOUT_S).split()[2] == "25"
    out = grid.run("na", """
        import socket
        for port in ("25", "smtp", b"25"):
            with socket.create_connection(("nb", port), timeout=30) as sock:
                sock.sendall(b"hi\\n")
                print(port, sock.getpeername()[1], sock.recv(100).split()[0].decode())
        for port in ("no-such-service", 2.5):
            errors = []
            for host in ("nb", "127.0.0.1"):  # the grid's answer, then the stdlib's
                try:
                    socket.create_connection((host, port), timeout=30).close()
                    errors.append(None)
                except Exception as exc:
                    errors.append((type(exc).__name__, getattr(exc, "errno", None)))
            print(repr(port), errors[0] == errors[1], errors[0][0])
    """)
    assert out.splitlines() == ["25 25 HI", "smtp 25 HI", "b'25' 25 HI",
                                "'no-such-service' True gaierror", "2.5 True OSError"]


def test_a_connect_whose_timeout_runs_out_raises_socket_timeout(grid):  # noqa: F811
    # As the kernel's: socket.timeout("timed out") (on 3.9 a class of its own, which imaplib's
    # and programs' code catch by name), whatever the grid's reason; no timeout, no change.
    server = grid.start("nb", SOCKETSERVER_ECHO)
    port = int(wait_for_line(server, "serving ", timeout=SCRIPT_TIMEOUT_S).split()[2])
    out = grid.run("na", f"""
        import socket
        try:
            socket.create_connection(("nb", {port}), timeout=1e-6).close()
            print("connected")
        except socket.timeout as exc:
            print(type(exc).__name__, exc, isinstance(exc, OSError))
    """)
    name, *rest = out.split()
    assert name in ("timeout", "TimeoutError") and rest == ["timed", "out", "True"], out


def test_force_mode_reports_loopback_addresses_never_the_name_localhost(grid):  # noqa: F811
    script = grid.script("""
        import json, socket
        server = socket.socket()
        server.bind(("localhost", 0))
        server.listen()
        port = server.getsockname()[1]
        client = socket.create_connection(("localhost", port), timeout=30)
        conn, addr = server.accept()
        print(json.dumps({"server": server.getsockname(), "accepted": addr, "conn": [conn.getsockname(),
                          conn.getpeername()], "client": [client.getsockname(), client.getpeername()]}))
        for sock in (conn, client, server):
            sock.close()
    """)
    done = subprocess.run(grid.argv("na", script), capture_output=True, text=True, timeout=SCRIPT_TIMEOUT_S,
                          env=dict(grid.env, GRIDSOCK_FORCE="1"))
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout)
    hosts = [got["server"][0], got["accepted"][0]] + [a[0] for a in got["conn"] + got["client"]]
    assert hosts == ["127.0.0.1"] * 6, got
    assert got["server"][1] == got["conn"][0][1] == got["client"][1][1]


def test_a_non_blocking_connect_keeps_a_normal_send_buffer(grid, echo_port):  # noqa: F811
    out = grid.run("na", f"""
        import asyncio, socket

        async def main():
            reader, writer = await asyncio.open_connection("nb", {echo_port})
            sock = writer.get_extra_info("socket")
            writer.write(b"x\\n")
            await writer.drain()
            await reader.readline()
            fresh, other = socket.socketpair()  # (the socket is a Unix socketpair end: compare with one)
            print(sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) >= fresh.getsockopt(socket.SOL_SOCKET,
                                                                                            socket.SO_SNDBUF))
            fresh.close()
            other.close()
            writer.close()
            await writer.wait_closed()

        asyncio.run(main())
    """)
    assert out.strip() == "True"


@pytest.fixture(scope="module")
def echo_port(grid):  # noqa: F811
    server = grid.start("nb", SOCKETSERVER_ECHO)
    return int(wait_for_line(server, "serving ", timeout=SCRIPT_TIMEOUT_S).split()[2])


# A script line: non-blocking connects take the bridged path (the agent answers "pending" at once).
BRIDGED = "import gridsock.personalities.socket; gridsock.personalities.socket.NONBLOCKING_HANDOVER_S = 0"
# The longest hand-over time the agent grants (MAX_HANDOVER_S): a loaded machine makes it in time.
HANDED = "import gridsock.personalities.socket; gridsock.personalities.socket.NONBLOCKING_HANDOVER_S = 1.0"


# Reads one byte from each client, then resets the connection (SO_LINGER {on, 0}: an RST).
RESETTING_SERVER = """
    import socket, struct
    server = socket.create_server(("", 0))
    print("serving", server.getsockname()[1], flush=True)
    while True:
        conn, _ = server.accept()
        conn.recv(1)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.close()
"""


@pytest.mark.parametrize("connect", ["blocking", "non-blocking", "non-blocking, bridged"])
def test_a_peer_reset_is_connection_reset_error_for_send_and_recv(grid, connect):  # noqa: F811
    server = grid.start("nb", RESETTING_SERVER)
    port = int(wait_for_line(server, "serving ", timeout=SCRIPT_TIMEOUT_S).split()[1])
    out = grid.run("na", f"""
        import select, socket
        {BRIDGED if connect.endswith("bridged") else ""}

        def reset_connection():
            sock = socket.socket()
            if {connect.startswith("non-blocking")}:
                sock.setblocking(False)
                sock.connect_ex(("nb", {port}))
                select.select([], [sock], [], 30)
                assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
                sock.setblocking(True)
            else:
                sock.connect(("nb", {port}))
            sock.settimeout(30)
            sock.sendall(b"x")
            select.select([sock], [], [], 30)  # readable: the reset has come
            return sock

        for call in ("recv", "send"):
            sock = reset_connection()
            try:
                sock.recv(100) if call == "recv" else sock.send(bytes(4096))
                print(call, "no error")
            except OSError as exc:
                print(call, type(exc).__name__)
            sock.close()
    """)
    assert out.splitlines() == ["recv ConnectionResetError", "send ConnectionResetError"]


def test_tls_refuses_data_that_came_before_the_handshake_from_a_peer_that_reset(grid):  # noqa: F811
    # (CPython's test_ssl.TestPreHandshakeClose: a reset connection is not connected any more,
    # so wrap_socket() looks for data left behind, and refuses it rather than the handshake.)
    server = grid.start("nb", """
        import socket, struct
        server = socket.create_server(("", 0))
        print("serving", server.getsockname()[1], flush=True)
        while True:
            conn, _ = server.accept()
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            conn.sendall(b"HTTP/1.0 307 Temporary Redirect\\r\\nLocation: https://elsewhere\\r\\n\\r\\n")
            conn.close()
            # The client's second connection learns that the first one has been reset.
            barrier, _ = server.accept()
            barrier.sendall(b"reset done")
            barrier.close()
    """)
    port = int(wait_for_line(server, "serving ", timeout=SCRIPT_TIMEOUT_S).split()[1])
    out = grid.run("na", f"""
        import errno, socket, ssl
        sock = socket.create_connection(("nb", {port}), timeout=30)
        with socket.create_connection(("nb", {port}), timeout=30) as barrier:
            assert barrier.recv(100) == b"reset done"
        try:
            sock.getpeername()
        except OSError as exc:
            print("getpeername", errno.errorcode[exc.errno])
        try:
            ssl.create_default_context().wrap_socket(sock, server_hostname="nb")
        except ssl.SSLError as exc:
            print("wrap", "before TLS handshake with data" in exc.args[1])
        sock.close()
    """)
    assert out.splitlines() == ["getpeername ENOTCONN", "wrap True"]


# --- the client's port across the grid ---------------------------------------------------------


def test_the_assembly_request_carries_the_client_port_and_omits_it_when_unknown():
    token = "ab" * wire.TOKEN_BYTES
    request = wire.AssemblyRequest(port=80, stack="tcp", token=token, client_port=50123)
    assert wire.decode_assembly(wire.encode_assembly(request)) == request
    unknown = wire.AssemblyRequest(port=80, stack="tcp", token=token)
    assert "client_port" not in unknown.header()  # (a node that predates the field decodes it)
    assert wire.decode_assembly(wire.encode_assembly(unknown)).client_port is None
    with pytest.raises(RemoteProtocolError):  # (the same length: JSON takes the spaces)
        wire.decode_assembly(wire.encode_assembly(request).replace(b"50123", b"0    "))


@pytest.mark.parametrize("connect", ["blocking", "non-blocking", "non-blocking, bridged"])
def test_the_server_sees_the_port_the_client_has(grid, echo_port, connect):  # noqa: F811
    # (the echo server answers "LINE from HOST:PORT", HOST:PORT its accepted peer address)
    out = grid.run("na", f"""
        import select, socket
        {BRIDGED if connect.endswith("bridged") else ""}
        for _ in range(3):
            sock = socket.socket()
            if {connect.startswith("non-blocking")}:
                sock.setblocking(False)
                sock.connect_ex(("nb", {echo_port}))
                select.select([], [sock], [], 30)
                assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
                sock.setblocking(True)
            else:
                sock.connect(("nb", {echo_port}))
            sock.sendall(b"hi\\n")
            seen = sock.makefile().readline().split()[-1]
            host, port = sock.getsockname()
            print(seen == "%s:%d" % (host, port), port > 0, host)
            sock.close()
    """)
    me = grid_ip(grid.node_id("na"))
    assert out.splitlines() == [f"True True {me}"] * 3


def test_asyncio_sock_accept_sees_the_clients_address_in_force_mode(grid):  # noqa: F811
    # (CPython's test_asyncio.test_sock_lowlevel test_sock_accept)
    script = grid.script("""
        import asyncio, socket

        async def main():
            loop = asyncio.get_running_loop()
            listener = socket.socket()
            listener.setblocking(False)
            listener.bind(("127.0.0.1", 0))
            listener.listen(1)
            client = socket.socket()
            client.connect(listener.getsockname())
            conn, addr = await loop.sock_accept(listener)
            print(addr == client.getsockname() == conn.getpeername(), addr[1] > 0,
                  client.getpeername() == listener.getsockname() == conn.getsockname())
            for sock in (client, conn, listener):
                sock.close()

        asyncio.run(main())
    """)
    done = subprocess.run(grid.argv("na", script), capture_output=True, text=True, timeout=SCRIPT_TIMEOUT_S,
                          env=dict(grid.env, GRIDSOCK_FORCE="1"))
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True", "True", "True"]


# --- the backlog before the connect returns -----------------------------------------------------


@pytest.mark.parametrize("connect", ["blocking", "non-blocking", "non-blocking, bridged"])
def test_a_connection_is_in_the_backlog_when_the_connect_returns(grid, connect):  # noqa: F811
    # In force mode, loopback: the client's connect done, the listener is readable at once (TCP's
    # loopback connection is in the accept queue before the client's connect returns).
    script = grid.script(f"""
        import select, socket
        {BRIDGED if connect.endswith("bridged") else ""}
        server = socket.socket()
        server.bind(("127.0.0.1", 0))
        server.listen(64)
        ready = 0
        for _ in range(20):
            client = socket.socket()
            if {connect.startswith("non-blocking")}:
                client.setblocking(False)
                client.connect_ex(server.getsockname())
                select.select([], [client], [], 30)
                assert client.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
            else:
                client.connect(server.getsockname())
            ready += bool(select.select([server], [], [], 0)[0])
            conn, addr = server.accept()
            assert addr == client.getsockname(), (addr, client.getsockname())
            conn.close()
            client.close()
        server.close()
        print("readable at once", ready, "of 20")
    """)
    done = subprocess.run(grid.argv("na", script), capture_output=True, text=True, timeout=SCRIPT_TIMEOUT_S,
                          env=dict(grid.env, GRIDSOCK_FORCE="1"))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "readable at once 20 of 20"


@pytest.mark.parametrize("connect", ["blocking", "non-blocking"])
def test_the_server_accepts_only_once_the_clients_socket_is_connected(grid, connect):  # noqa: F811
    # (CPython's test_socket TCPCloserTest.testClose: a server thread accepts, closes, and selects on
    # the client's socket, whose connect() another thread may not have returned from yet.)
    script = grid.script(f"""
        import select, socket, threading
        server = socket.socket()
        server.bind(("127.0.0.1", 0))
        server.listen()
        seen = []

        def serve(client):
            conn, _ = server.accept()
            conn.close()
            readable = select.select([client], [], [], 30)[0] == [client]
            try:
                seen.append((readable, client.recv(1)))
            except OSError as exc:
                seen.append((readable, exc.errno))

        for _ in range(10):
            client = socket.socket()
            thread = threading.Thread(target=serve, args=(client,))
            thread.start()
            if {connect == "non-blocking"}:
                client.setblocking(False)
                client.connect_ex(server.getsockname())
            else:
                client.connect(server.getsockname())
            thread.join(60)
            client.close()
        server.close()
        print(seen == [(True, b"")] * 10, seen[:3])
    """)
    done = subprocess.run(grid.argv("na", script), capture_output=True, text=True, timeout=SCRIPT_TIMEOUT_S,
                          env=dict(grid.env, GRIDSOCK_FORCE="1"))
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[0] == "True", done.stdout


# --- non-blocking connects at full speed ---------------------------------------------------------


@pytest.mark.parametrize("path", ["handed", "bridged"])
def test_asyncio_gets_the_connections_own_socket(grid, path):  # noqa: F811
    # A connection made within the hand-over time comes as a blocking connect's does: for a plain
    # tcp stack (force mode: na to na, one cluster) the kernel's TCP socket to the peer, which the
    # node lists as handed over, not bridged (the time is set long here: a loaded machine may
    # take over the default 50 ms). A slower one (hand-over time 0 here) is bridged to a Unix
    # socketpair end, and works the same.
    script = grid.script(f"""
        import asyncio, os, socket
        from gridsock.bootstrap.control import call
        {BRIDGED if path == "bridged" else HANDED}

        async def echo(reader, writer):
            writer.write((await reader.readline()).upper())
            await writer.drain()
            writer.close()

        async def main():
            server = await asyncio.start_server(echo, "127.0.0.1", 0)
            reader, writer = await asyncio.open_connection(*server.sockets[0].getsockname()[:2])
            sock = writer.get_extra_info("socket")
            writer.write(b"x\\n")
            await writer.drain()
            print((await reader.readline()).decode().strip())
            status = call(os.path.join(os.environ["GRIDSOCK_RUN_DIR"], "na.sock"), "status")
            mine = [c for c in status["connections"] if c["side"] == "client"
                    and c.get("client_port") == sock.getsockname()[1]]
            print(len(mine), mine[0]["stack"], "bridged" if mine[0]["bridged"] else "handed",
                  socket.AddressFamily(sock.getsockopt(socket.SOL_SOCKET, socket.SO_DOMAIN)).name,
                  sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0)
            writer.close()
            await writer.wait_closed()
            server.close()
            await server.wait_closed()

        asyncio.run(main())
    """)
    done = subprocess.run(grid.argv("na", script), capture_output=True, text=True, timeout=SCRIPT_TIMEOUT_S,
                          env=dict(grid.env, GRIDSOCK_FORCE="1"))
    assert done.returncode == 0, done.stderr
    family = "AF_INET" if path == "handed" else "AF_UNIX"
    assert done.stdout.splitlines() == ["X", f"1 tcp {path} {family} True"]


def test_a_non_blocking_connect_does_not_use_the_programs_socketpair(grid, echo_port):  # noqa: F811
    # (3.13's test_socket puts the pure-Python socketpair, which refuses AF_UNIX, in the module)
    out = grid.run("na", f"""
        import select, socket

        def refuse(*args, **kwargs):
            raise ValueError("Only AF_INET and AF_INET6 socket address families are supported")

        socket.socketpair = refuse
        for handover in (0.05, 0):
            import gridsock.personalities.socket
            gridsock.personalities.socket.NONBLOCKING_HANDOVER_S = handover
            sock = socket.socket()
            sock.setblocking(False)
            sock.connect_ex(("nb", {echo_port}))
            select.select([], [sock], [], 30)
            sock.setblocking(True)
            sock.sendall(b"hi\\n")
            print(sock.makefile().readline().split()[0])
            sock.close()
    """)
    assert out.split() == ["HI", "HI"]
