"""TLS on grid sockets under the socket personality: unmodified stdlib programs, patched.

The grid of tests/test_personality.py (a rendez-vous, nodes ``na`` and ``nb`` on loopback);
every program is a stdlib script under ``python -m gridsock.monkey --node NAME``. Certificates
come from a test CA made here (:func:`make_test_ca`); clients check them against it, host name
included.

``$GRIDSOCK_PERSONALITY_PYTHON`` names another interpreter (3.9-3.13) for the scripts: the
nodes stay this one's, the scripts import gridsock from a tree laid out as installed
(:func:`script_python`), so the personality is tried on a Python without the test dependencies.
"""
from __future__ import annotations

import datetime
import ipaddress
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Dict, Sequence

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from gridsock.names import grid_ip
from gridsock.testing.procs import wait_for_line
from test_personality import SCRIPT_TIMEOUT_S, grid  # noqa: F401 (the grid fixture)

pytestmark = pytest.mark.timeout(120)

CERT_LIFETIME = datetime.timedelta(days=2)  # a test run is shorter; clocks may skew a little


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def make_test_ca(directory: Path, hosts: Sequence[str], ips: Sequence[str] = ()) -> Dict[str, str]:
    """A CA and a server certificate for ``hosts`` (DNS names) and ``ips``, as PEM files in
    ``directory``: returns their paths, ``{"ca", "cert", "key"}``."""
    now = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(minutes=5)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(_name("gridsock test CA")).issuer_name(_name("gridsock test CA"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now).not_valid_after(now + CERT_LIFETIME)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    names = [x509.DNSName(h) for h in hosts] + [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
    cert = (x509.CertificateBuilder().subject_name(_name(hosts[0])).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(now + CERT_LIFETIME)
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = {"ca": directory / "ca.pem", "cert": directory / "cert.pem", "key": directory / "key.pem"}
    paths["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths["cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths["key"].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
    return {k: str(v) for k, v in paths.items()}


@pytest.fixture(scope="module", autouse=True)
def script_python(grid, tmp_path_factory):  # noqa: F811
    """Run this module's scripts under ``$GRIDSOCK_PERSONALITY_PYTHON`` if it is set."""
    python = os.environ.get("GRIDSOCK_PERSONALITY_PYTHON")
    if not python:
        return
    root = Path(__file__).resolve().parent.parent
    layout = tmp_path_factory.mktemp("layout") / "gridsock"  # gridsock as setup.py installs it
    layout.mkdir()
    for entry in (root / "gridsock").iterdir():
        if entry.name != "__pycache__":
            (layout / entry.name).symlink_to(entry)
    for package in ("personalities", "shims"):
        (layout / package).symlink_to(root / package)
    grid.env = dict(grid.env, PYTHONPATH=str(layout.parent))
    # (python -m would find the source tree's gridsock first, from the current directory)
    launcher = ("import runpy, sys; del sys.path[0]; "
                "runpy.run_module('gridsock.monkey', run_name='__main__', alter_sys=True)")
    grid.argv = lambda node, path, *args: [python, "-c", launcher, "--node", node, str(path), *args]


@pytest.fixture(scope="module")
def pki(grid, tmp_path_factory):  # noqa: F811
    directory = tmp_path_factory.mktemp("pki")
    return make_test_ca(directory, ["nb", "nb.grid"], [grid_ip(grid.node_id("nb"))])


# An https http.server, the wrap done in one of three orders: after listen() (the usual recipe),
# on the bound socket before listen(), on the fresh socket before bind().
HTTPS_SERVER = """
    import http.server, os, ssl, sys
    order, certfile, keyfile, directory = sys.argv[1:5]
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(certfile, keyfile)
    handler = lambda *a, **kw: http.server.SimpleHTTPRequestHandler(*a, directory=directory, **kw)
    httpd = http.server.ThreadingHTTPServer(("", 0), handler, bind_and_activate=False)
    if order == "before-bind":
        httpd.socket = ctx.wrap_socket(httpd.socket, server_side=True)
    httpd.server_bind()
    if order == "before-listen":
        httpd.socket = ctx.wrap_socket(httpd.socket, server_side=True)
    httpd.server_activate()
    if order == "after-listen":
        httpd.socket = ctx.wrap_socket(httpd.socket, server_side=True)
    print("serving", type(httpd.socket).__name__, *httpd.socket.getsockname()[:2], flush=True)
    httpd.serve_forever()
"""


@pytest.mark.parametrize("order", ["after-listen", "before-listen", "before-bind"])
def test_an_https_http_server_on_the_grid_fetched_by_urllib_with_the_test_ca(grid, pki, tmp_path, order):  # noqa: F811
    (tmp_path / "hello.txt").write_text("hello over TLS on the grid\n")
    server = grid.start("nb", HTTPS_SERVER, order, pki["cert"], pki["key"], str(tmp_path))
    _, kind, ip, port = wait_for_line(server, "serving ", timeout=SCRIPT_TIMEOUT_S).split()
    assert kind == "GridSSLSocket" and ip == grid_ip(grid.node_id("nb"))
    out = grid.run("na", f"""
        import ssl, sys, urllib.error, urllib.request
        ctx = ssl.create_default_context(cafile=sys.argv[1])
        for host in ("nb", "nb.grid", "{ip}"):
            with urllib.request.urlopen(f"https://{{host}}:{port}/hello.txt", context=ctx, timeout=30) as response:
                print(response.read().decode().strip())
        try:  # the certificate is checked: another CA's (the system's) does not accept it
            urllib.request.urlopen("https://nb:{port}/hello.txt", context=ssl.create_default_context(), timeout=30)
        except urllib.error.URLError as exc:
            print(type(exc.reason).__name__)
    """, pki["ca"])
    assert out.splitlines() == ["hello over TLS on the grid"] * 3 + ["SSLCertVerificationError"]


def test_ssl_sockets_report_grid_addresses_on_both_ends(grid, pki):  # noqa: F811
    server = grid.start("nb", """
        import json, socket, ssl, sys
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(sys.argv[1], sys.argv[2])
        listener = ctx.wrap_socket(socket.create_server(("", 0)), server_side=True)
        print("serving", listener.getsockname()[1], flush=True)
        with listener:
            for _ in range(2):
                conn, addr = listener.accept()
                with conn:
                    line = conn.recv(100).decode()
                    conn.sendall(json.dumps({"type": type(conn).__name__, "addr": addr, "peer": conn.getpeername(),
                                             "name": conn.getsockname(), "got": line,
                                             "version": conn.version()}).encode())
    """, pki["cert"], pki["key"])
    port = int(wait_for_line(server, "serving ", timeout=SCRIPT_TIMEOUT_S).split()[1])
    out = grid.run("na", f"""
        import json, socket, ssl, sys
        ctx = ssl.create_default_context(cafile=sys.argv[1])
        # wrapped once connected
        with ctx.wrap_socket(socket.create_connection(("nb", {port}), timeout=30), server_hostname="nb") as tls:
            tls.sendall(b"after")
            print(json.dumps({{"type": type(tls).__name__, "peer": tls.getpeername(), "name": tls.getsockname(),
                              "server": json.loads(tls.recv(4096))}}))
        # wrapped before connect
        with ctx.wrap_socket(socket.socket(), server_hostname="nb.grid") as tls:
            tls.settimeout(30)
            tls.connect(("nb.grid", {port}))
            tls.sendall(b"before")
            print(json.dumps({{"type": type(tls).__name__, "peer": tls.getpeername(), "name": tls.getsockname(),
                              "server": json.loads(tls.recv(4096))}}))
    """, pki["ca"])
    me, them = grid_ip(grid.node_id("na")), grid_ip(grid.node_id("nb"))
    for line, sent in zip(out.splitlines(), ("after", "before")):
        got = json.loads(line)
        assert got["type"] == "GridSSLSocket" and got["peer"] == [them, port] and got["name"][0] == me
        server_side = got["server"]
        assert server_side["type"] == "GridSSLSocket" and server_side["got"] == sent
        assert server_side["addr"][0] == me and server_side["peer"] == server_side["addr"]
        assert server_side["name"] == [them, port] and server_side["version"].startswith("TLS")


def test_asyncio_tls_echo_server_and_client(grid, pki):  # noqa: F811
    server = grid.start("nb", """
        import asyncio, socket, ssl, sys
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(sys.argv[1], sys.argv[2])

        async def echo(reader, writer):
            peer = writer.get_extra_info("peername")
            while line := await reader.readline():
                writer.write(line.strip().upper() + b" from " + peer[0].encode() + b"\\n")
                await writer.drain()
            writer.close()

        async def main():
            server = await asyncio.start_server(echo, "", 0, ssl=ctx)
            # (with port 0, its IPv6 twin, a local socket, has a port of its own)
            ipv4 = [s for s in server.sockets if s.family == socket.AF_INET]
            print("serving", ipv4[0].getsockname()[1], flush=True)
            await server.serve_forever()

        asyncio.run(main())
    """, pki["cert"], pki["key"])
    port = int(wait_for_line(server, "serving ", timeout=SCRIPT_TIMEOUT_S).split()[1])
    out = grid.run("na", f"""
        import asyncio, ssl, sys

        async def main():
            ctx = ssl.create_default_context(cafile=sys.argv[1])
            reader, writer = await asyncio.wait_for(asyncio.open_connection("nb", {port}, ssl=ctx), 30)
            print(writer.get_extra_info("peername")[0], writer.get_extra_info("ssl_object").version()[:3])
            for word in (b"hello", b"tls"):
                writer.write(word + b"\\n")
                await writer.drain()
                print((await asyncio.wait_for(reader.readline(), 30)).decode().strip())
            writer.close()
            await writer.wait_closed()

        asyncio.run(main())
    """, pki["ca"])
    me, them = grid_ip(grid.node_id("na")), grid_ip(grid.node_id("nb"))
    assert out.splitlines() == [f"{them} TLS", f"HELLO from {me}", f"TLS from {me}"]


# A small SMTP server with STARTTLS (stdlib only: socketserver and ssl): enough of RFC 5321 and
# RFC 3207 for smtplib's send_message after starttls().
SMTP_SERVER = """
    import socketserver, ssl, sys
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(sys.argv[1], sys.argv[2])

    class SMTP(socketserver.StreamRequestHandler):
        def reply(self, line):
            self.wfile.write(line.encode() + b"\\r\\n")
            self.wfile.flush()

        def handle(self):
            try:
                self.converse()
            finally:
                self.connection.close()  # (the TLS one: socketserver closes the socket it accepted)

        def converse(self):
            tls = False
            self.reply("220 nb ESMTP test")
            while True:
                line = self.rfile.readline().decode().rstrip("\\r\\n")
                verb = line.split(" ")[0].upper()
                if verb in ("EHLO", "HELO"):
                    self.reply("250-nb" if not tls else "250-nb secured")
                    self.reply("250 STARTTLS" if not tls else "250 SIZE 100000")
                elif verb == "STARTTLS":
                    self.reply("220 go ahead")
                    self.wfile.flush()
                    self.connection = ctx.wrap_socket(self.connection, server_side=True)
                    self.rfile = self.connection.makefile("rb")
                    self.wfile = self.connection.makefile("wb")
                    tls = True
                elif verb in ("MAIL", "RCPT"):
                    self.reply("250 ok" if tls else "530 must issue STARTTLS first")
                elif verb == "DATA":
                    self.reply("354 end with .")
                    body = []
                    while (data := self.rfile.readline().decode().rstrip("\\r\\n")) != ".":
                        body.append(data)
                    print("message", self.connection.getpeername()[0], type(self.connection).__name__,
                          body[-1], flush=True)
                    self.reply("250 queued")
                elif verb == "QUIT" or not line:
                    self.reply("221 bye")
                    return
                else:
                    self.reply("502 not implemented")

    server = socketserver.ThreadingTCPServer(("", 0), SMTP)
    print("serving", server.server_address[1], flush=True)
    server.serve_forever()
"""


def test_smtplib_starttls_across_the_grid(grid, pki):  # noqa: F811
    server = grid.start("nb", SMTP_SERVER, pki["cert"], pki["key"])
    port = int(wait_for_line(server, "serving ", timeout=SCRIPT_TIMEOUT_S).split()[1])
    out = grid.run("na", f"""
        import smtplib, ssl, sys
        from email.message import EmailMessage
        message = EmailMessage()
        message["From"], message["To"], message["Subject"] = "a@na", "b@nb", "grid"
        message.set_content("sent over STARTTLS")
        with smtplib.SMTP("nb", {port}, timeout=30) as smtp:
            smtp.starttls(context=ssl.create_default_context(cafile=sys.argv[1]))
            smtp.ehlo()
            print(smtp.sock.version()[:3], smtp.sock.getpeername()[0])
            smtp.send_message(message)
        print("sent")
    """, pki["ca"])
    me, them = grid_ip(grid.node_id("na")), grid_ip(grid.node_id("nb"))
    assert out.splitlines() == [f"TLS {them}", "sent"]
    assert wait_for_line(server, "message ", timeout=SCRIPT_TIMEOUT_S).split() == [
        "message", me, "GridSSLSocket", "sent", "over", "STARTTLS"]


def test_ssl_imported_before_the_patch_wraps_grid_sockets_and_unpatch_puts_ssl_back(grid):  # noqa: F811
    code = textwrap.dedent("""
        import json, ssl, sys, threading
        import socket
        from gridsock.personalities.monkey import patch_all, unpatch_all
        patch_all(warn=False)
        server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        server_ctx.load_cert_chain(sys.argv[1], sys.argv[2])
        listener = server_ctx.wrap_socket(socket.create_server(("", 0)), server_side=True)
        port = listener.getsockname()[1]

        def serve():
            conn, addr = listener.accept()
            with conn:
                conn.sendall(json.dumps([type(conn).__name__, addr[0]]).encode())

        threading.Thread(target=serve).start()
        ctx = ssl.create_default_context(cafile=sys.argv[3])
        with ctx.wrap_socket(socket.create_connection(("na", port), timeout=30), server_hostname="na") as tls:
            print(json.dumps([type(tls).__name__, tls.getpeername(), json.loads(tls.recv(4096))]))
        listener.close()
        unpatch_all()
        print(ssl.SSLContext.sslsocket_class is ssl.SSLSocket, socket.socket.__name__)
    """)
    na_pki = make_test_ca(grid.tmp, ["na"])
    env = dict(grid.env, GRIDSOCK_AGENT=str(grid.run_dir / "na.agent"))
    done = subprocess.run([sys.executable, "-c", code, na_pki["cert"], na_pki["key"], na_pki["ca"]],
                          capture_output=True, text=True, env=env, timeout=SCRIPT_TIMEOUT_S)
    assert done.returncode == 0, done.stderr
    me = grid_ip(grid.node_id("na"))
    wrapped, unpatched = done.stdout.splitlines()
    port = json.loads(wrapped)[1][1]
    assert json.loads(wrapped) == ["GridSSLSocket", [me, port], ["GridSSLSocket", me]]
    assert unpatched == "True socket"
