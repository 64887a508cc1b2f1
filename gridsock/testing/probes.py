"""Hostile and broken clients for tests: ``python -m gridsock.testing.probes MODE HOST PORT ...``.

Each mode connects to a gridsock listening port, misbehaves in one way and prints one JSON line
saying what the server did: ``closed`` (it dropped us), ``open`` (it still waited after the
deadline), the message types it sent, or the TLS error it gave. Tests run these inside lab
namespaces, as a stranger on the network would.

Modes:
  garbage HOST PORT                        random bytes on a raw TCP connection
  oversized HOST PORT SESSION              TLS (no client cert), then a frame longer than the limit
  hello-nocert HOST PORT SESSION           TLS without a certificate, then a Hello as if a leader
  foreign HOST PORT SESSION OTHER_SESSION  TLS with a certificate from another session's CA
"""
from __future__ import annotations

import json
import os
import socket
import ssl
import sys

__all__ = ["main"]

# How long a probe waits for the server to react before calling the connection "open".
PROBE_DEADLINE_S = 15.0


def _read_until_closed(sock) -> dict:
    """Read until the server closes (or the deadline): what it sent, and whether it closed.

    ``received`` lists the gridsock messages among what came back; bytes that are no gridsock
    frame (a TLS alert answering garbage, say) are only counted, in ``other_bytes``.
    """
    from gridsock import wire
    from gridsock.errors import RemoteProtocolError

    decoder: wire.Decoder | None = wire.Decoder(peer="server")  # None once a non-frame came
    received: list = []
    other_bytes = 0
    sock.settimeout(PROBE_DEADLINE_S)
    result: dict = {}
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                result["outcome"] = "closed"
                break
            if decoder is None:
                other_bytes += len(data)
                continue
            decoder.feed(data)
            try:
                while (message := decoder.next_message()) is not None:
                    received.append(type(message).__name__)
            except RemoteProtocolError:
                other_bytes += decoder.buffered
                decoder = None
    except socket.timeout:
        result["outcome"] = "open"
    except ssl.SSLError as exc:
        result.update(outcome="closed", tls_error=exc.reason or str(exc))
    except OSError as exc:
        result.update(outcome="closed", error=str(exc))
    result.update(received=received, other_bytes=other_bytes)
    return result


def _plain_tls_context(session):
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.load_verify_locations(cadata=session.ca_cert_pem.decode())
    return context


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    mode, host, port = argv[0], argv[1], int(argv[2])
    sock = socket.create_connection((host, port), timeout=PROBE_DEADLINE_S)
    result: dict = {"mode": mode}
    try:
        if mode == "garbage":
            sock.sendall(os.urandom(4096))
            result.update(_read_until_closed(sock))
            return _print(result)

        from gridsock import wire
        from gridsock.session import Identity, Session, new_node_key

        session = Session.load(argv[3])
        if mode == "foreign":
            other = Session.load(argv[4]).certificate_authority()
            key_pem, csr_pem = new_node_key()
            identity = Identity(other.sign_node(csr_pem, "00000000-0000-4000-8000-000000000001"), key_pem)
            context = _plain_tls_context(session)
            identity.load_into(context)
        else:
            context = _plain_tls_context(session)
        try:
            tls = context.wrap_socket(sock)
        except (ssl.SSLError, OSError) as exc:
            result.update(outcome="closed", received=[], tls_error=getattr(exc, "reason", None) or str(exc))
            return _print(result)
        sock = tls
        if mode == "oversized":
            data = b"\xff\xff\xff\xff" + os.urandom(1024)
        elif mode in ("hello-nocert", "foreign"):
            data = wire.encode(wire.Hello(name="intruder", cluster=None, role="leader"))
        else:
            raise SystemExit(f"unknown mode {mode!r}")
        try:
            sock.sendall(data)
        except (ssl.SSLError, OSError) as exc:
            # TLS 1.3: a refused client certificate surfaces at the first write or read.
            result.update(outcome="closed", received=[], tls_error=getattr(exc, "reason", None) or str(exc))
            return _print(result)
        result.update(_read_until_closed(sock))
        return _print(result)
    finally:
        sock.close()


def _print(result: dict) -> int:
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
