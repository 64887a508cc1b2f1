"""Diagnostics over data connections: an echo service and a measured transfer through it.

``serve_echo(node, port)`` answers every connection to grid port ``port`` by sending back what
it receives. ``transfer(node, peer, port, nbytes, stack=...)`` connects (with the stack the rules
or the caller choose), sends ``nbytes`` of random data while reading the echo, and reports the
SHA-256 of both directions, the time taken and the stack: bytes that cross the grid each way and
arrive unchanged. ``gridsock transfer`` runs it in a running node through its control socket.

While it runs, ``transfer`` reports ``{"bytes", "sent", "received"}`` every
:data:`PROGRESS_INTERVAL_S` to ``progress`` (by default to the control client that asked for
progress: :func:`gridsock.bootstrap.control.report_progress`). Killed (its control client went
away, Ctrl-C on ``gridsock transfer``), it stops its sender and receiver and closes the
connection before it dies, so neither end moves the transfer's bytes any more.
"""
from __future__ import annotations

import hashlib
import logging
import os
import time
from typing import Any, Callable, Dict, Optional

import gevent

from .errors import BrokenStreamError

__all__ = ["serve_echo", "transfer", "ECHO_CHUNK_BYTES", "PROGRESS_INTERVAL_S"]

log = logging.getLogger(__name__)

ECHO_CHUNK_BYTES = 256 * 1024
# How often a running transfer reports its progress (a terminal's progress bar stays lively).
PROGRESS_INTERVAL_S = 0.2


def serve_echo(node, port: int, *, abort_after: int | None = None):
    """Serve an echo service on grid port ``port`` of ``node``; return the serving greenlet.

    With ``abort_after``, each connection is closed abortively (no end of stream sent) once
    that many bytes have come in: a peer that dies in the middle of a stream, for tests.
    """
    listener = node.listen(port)

    def echo(stream) -> None:
        received = 0
        try:
            while True:
                data = stream.receive_some(ECHO_CHUNK_BYTES)
                if not data:
                    stream.send_eof()
                    return
                received += len(data)
                if abort_after is not None and received >= abort_after:
                    log.info("echo on port %d: aborting after %d bytes, as asked", port, received)
                    return  # (closed below, with no end of stream)
                stream.send_all(data)
        except (BrokenStreamError, OSError) as exc:
            log.info("echo on port %d: connection ended: %s", port, exc)
        finally:
            stream.close()

    def serve() -> None:
        while True:
            stream, info = listener.accept_stream()
            gevent.spawn(echo, stream)

    return gevent.spawn(serve)


def transfer(node, peer: str, port: int, nbytes: int, *, stack=None, timeout: float | None = None,
             progress: Optional[Callable[[Dict[str, Any]], None]] = None) -> dict:
    """Send ``nbytes`` random bytes to the echo service at ``peer:port`` and read them back.

    ``progress`` (default: the control client's, see the module docstring) is called with
    ``{"bytes", "sent", "received"}`` every :data:`PROGRESS_INTERVAL_S` and once at the end.
    Returns a dict: ``stack``, ``bytes``, ``sha256_sent``, ``sha256_received``, ``connect_ms``,
    ``seconds``, ``mb_per_s`` (each way). Raises ConnectError if no connection can be made and
    BrokenStreamError if it breaks.
    """
    from .bootstrap.control import report_progress

    report = progress if progress is not None else report_progress
    started = time.perf_counter()
    stream, info = node.open_stream(peer, port, stack=stack, timeout=timeout)
    connected = time.perf_counter()
    sent = hashlib.sha256()
    received = hashlib.sha256()
    count = {"sent": 0, "received": 0}
    # A break ends a half here, and is raised by transfer() itself (a greenlet that dies of it
    # would print a traceback in the node's log).
    broken: list = []

    def sender() -> None:
        left = nbytes
        try:
            while left:
                chunk = os.urandom(min(ECHO_CHUNK_BYTES, left))
                sent.update(chunk)
                stream.send_all(chunk)
                left -= len(chunk)
                count["sent"] += len(chunk)
            stream.send_eof()
        except (BrokenStreamError, OSError) as exc:
            broken.append(exc)

    def receiver() -> None:
        try:
            while True:
                data = stream.receive_some(ECHO_CHUNK_BYTES)
                if not data:
                    return
                received.update(data)
                count["received"] += len(data)
        except (BrokenStreamError, OSError) as exc:
            broken.append(exc)

    greenlets = [gevent.spawn(sender), gevent.spawn(receiver)]
    try:
        while len(gevent.joinall(greenlets, timeout=PROGRESS_INTERVAL_S, raise_error=True)) < len(greenlets):
            if broken:
                raise broken[0]
            report({"bytes": nbytes, **count})
        if broken:
            raise broken[0]
        report({"bytes": nbytes, **count})
    except BaseException:  # failed, or killed (cancelled): nothing may go on moving bytes
        gevent.killall(greenlets)
        raise
    finally:
        stream.close()
    seconds = time.perf_counter() - connected
    if count["received"] != nbytes:
        raise BrokenStreamError(f"echo returned {count['received']} of {nbytes} bytes")
    return {
        "peer": peer,
        "port": port,
        "stack": info.stack,
        "bytes": nbytes,
        "sha256_sent": sent.hexdigest(),
        "sha256_received": received.hexdigest(),
        "connect_ms": round((connected - started) * 1000, 3),
        "seconds": round(seconds, 3),
        "mb_per_s": round(nbytes / seconds / 1e6, 2) if seconds > 0 else None,
        "tried": [list(pair) for pair in info.detail.get("tried", [])],
    }
