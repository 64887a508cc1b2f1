"""Unmodified stdlib TLS servers and clients across the lab, under ``gridsock run``.

The programs are those of tests/test_personality_tls.py (an https ``http.server``, an asyncio
TLS echo server, an SMTP server with STARTTLS), each started with ``gridsock run --node NAME``
in the namespace of node NAME; clients check the server's certificate against a test CA, host
name included. The node picks the method (reverse into NAT'd cluster B, SOCKS into private
cluster C, ...): TLS runs end to end over whatever it picked.
"""
from __future__ import annotations

import pytest

from gridsock.testing.procs import wait_for_line
from test_personality_tls import HTTPS_SERVER, SMTP_SERVER, make_test_ca

from .gridsession import make_grid
from .test_apps import APP_TIMEOUT_S, VIA_RULES, Apps

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def grid(lab, tmp_path_factory):
    nodes = ("rv", "a1", "a2", "b1", "b2", "c1", "c2")
    yield from make_grid(lab, tmp_path_factory, rules={n: VIA_RULES for n in nodes})


@pytest.fixture(scope="module")
def apps(grid):
    return Apps(grid)


@pytest.fixture(scope="module")
def pki(grid):
    directory = grid.tmp / "pki"
    directory.mkdir()
    return make_test_ca(directory, ["b1", "b1.grid", "b2", "b2.grid"])


def test_an_https_http_server_on_b2_fetched_by_urllib_from_a1_and_c1(apps, grid, pki):
    directory = grid.tmp / "www-tls"
    directory.mkdir()
    (directory / "hello.txt").write_text("hello from b2 over TLS\n")
    server = apps.start("b2", HTTPS_SERVER, "after-listen", pki["cert"], pki["key"], str(directory))
    port = wait_for_line(server, "serving ", timeout=APP_TIMEOUT_S).split()[3]
    for client in ("a1", "c1"):
        out = apps.run(client, f"""
            import ssl, sys, urllib.request
            ctx = ssl.create_default_context(cafile=sys.argv[1])
            for host in ("b2", "b2.grid"):
                with urllib.request.urlopen(f"https://{{host}}:{port}/hello.txt", context=ctx, timeout=60) as response:
                    print(response.read().decode().strip())
        """, pki["ca"])
        assert out.splitlines() == ["hello from b2 over TLS"] * 2, client
    server.terminate()


ASYNCIO_TLS_ECHO = """
    import asyncio, socket, ssl, sys
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(sys.argv[1], sys.argv[2])

    async def echo(reader, writer):
        while line := await reader.readline():
            writer.write(line.strip().upper() + b"\\n")
            await writer.drain()
        writer.close()

    async def main():
        server = await asyncio.start_server(echo, "", 0, ssl=ctx)
        print("serving", [s for s in server.sockets if s.family == socket.AF_INET][0].getsockname()[1], flush=True)
        await server.serve_forever()

    asyncio.run(main())
"""


def test_an_asyncio_tls_echo_server_on_b1_with_clients_on_a1_and_c2(apps, pki):
    server = apps.start("b1", ASYNCIO_TLS_ECHO, pki["cert"], pki["key"])
    port = int(wait_for_line(server, "serving ", timeout=APP_TIMEOUT_S).split()[1])
    for client in ("a1", "c2"):
        out = apps.run(client, f"""
            import asyncio, ssl, sys

            async def main():
                ctx = ssl.create_default_context(cafile=sys.argv[1])
                reader, writer = await asyncio.wait_for(asyncio.open_connection("b1", {port}, ssl=ctx), 60)
                writer.write(b"hello from {client}\\n")
                await writer.drain()
                print((await asyncio.wait_for(reader.readline(), 60)).decode().strip())
                writer.close()
                await writer.wait_closed()

            asyncio.run(main())
        """, pki["ca"])
        assert out.strip() == f"HELLO FROM {client.upper()}"
    server.terminate()


def test_smtplib_starttls_from_a2_to_b2_across_the_firewall(apps, pki):
    server = apps.start("b2", SMTP_SERVER, pki["cert"], pki["key"])
    port = int(wait_for_line(server, "serving ", timeout=APP_TIMEOUT_S).split()[1])
    out = apps.run("a2", f"""
        import smtplib, ssl, sys
        from email.message import EmailMessage
        message = EmailMessage()
        message["From"], message["To"], message["Subject"] = "x@a2", "y@b2", "lab"
        message.set_content("sent over STARTTLS")
        with smtplib.SMTP("b2", {port}, timeout=60) as smtp:
            smtp.starttls(context=ssl.create_default_context(cafile=sys.argv[1]))
            smtp.ehlo()
            smtp.send_message(message)
        print("sent")
    """, pki["ca"])
    assert out.strip() == "sent"
    assert wait_for_line(server, "message ", timeout=APP_TIMEOUT_S).split()[2:] == [
        "GridSSLSocket", "sent", "over", "STARTTLS"]
    server.terminate()
