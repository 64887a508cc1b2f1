"""The local control socket: how ``gridsock status`` and ``gridsock ping`` talk to a running process.

Every rendez-vous node and node process serves a Unix socket (mode 0600, so only its user can
use it) that speaks the wire codec: the client sends ``Control(op, args)``, the process answers
``ControlReply(ok, result, error)``. Paths default to ``$GRIDSOCK_RUN_DIR`` (or
``/tmp/gridsock-<uid>``) ``/<name>.sock``.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Callable, Dict, List, Optional

import gevent
from gevent import socket as gsocket

from .. import wire
from ..errors import BrokenStreamError, ConnectError, GridsockError, RemoteProtocolError
from ..names import run_dir  # re-exported: it lives in gridsock.names, which imports no gevent
from .link import read_message, send_message
from .transport import Address, listen

__all__ = ["run_dir", "control_path", "list_control_sockets", "UnixServer", "ControlServer", "call", "CONTROL_TIMEOUT_S"]

log = logging.getLogger(__name__)

# A control call (a ping across the grid included) answers within this long.
CONTROL_TIMEOUT_S = 30.0


def control_path(name: str) -> str:
    return os.path.join(run_dir(), f"{name}.sock")


def list_control_sockets() -> List[str]:
    directory = run_dir()
    try:
        return sorted(os.path.join(directory, f) for f in os.listdir(directory) if f.endswith(".sock"))
    except FileNotFoundError:
        return []


class UnixServer:
    """A Unix socket (mode 0600 directory) served until stopped: one greenlet per client runs
    :meth:`_handle`, which owns the connection. The control and the agent socket are two."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._sock: Optional[gsocket.socket] = None
        self._greenlet: Optional[gevent.Greenlet] = None

    def start(self):
        os.makedirs(os.path.dirname(self.path) or ".", mode=0o700, exist_ok=True)
        self._sock = listen(Address(path=self.path))
        self._greenlet = gevent.spawn(self._serve)
        return self

    def stop(self) -> None:
        if self._greenlet is not None:
            self._greenlet.kill(block=False)
        if self._sock is not None:
            self._sock.close()
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
            self._sock = None

    def _serve(self) -> None:
        listener = self._sock
        while listener is not None:
            conn, _ = listener.accept()
            gevent.spawn(self._handle, conn)

    def _handle(self, conn) -> None:
        raise NotImplementedError


class ControlServer(UnixServer):
    """Serves ``handler(op, args) -> result`` on a Unix socket until stopped."""

    def __init__(self, path: str, handler: Callable[[str, Dict[str, Any]], Any]) -> None:
        super().__init__(path)
        self._handler = handler

    def _handle(self, conn) -> None:
        decoder = wire.Decoder(peer="control client")
        try:
            while True:
                try:
                    message = read_message(conn, decoder, timeout=3600)
                except BrokenStreamError:
                    return
                if not isinstance(message, wire.Control):
                    raise RemoteProtocolError(f"expected Control, got {type(message).__name__}")
                try:
                    result = self._handler(message.op, message.args)
                    reply = wire.ControlReply(True, result)
                except GridsockError as exc:
                    reply = wire.ControlReply(False, None, str(exc)[: wire.MAX_REASON_BYTES])
                except Exception as exc:
                    log.exception("control op %r failed", message.op)
                    reply = wire.ControlReply(False, None, f"internal error: {exc!r}"[: wire.MAX_REASON_BYTES])
                send_message(conn, reply)
        except RemoteProtocolError as exc:
            log.warning("dropping control client: %s", exc)
        except (OSError, TimeoutError) as exc:
            log.debug("control client gone: %s", exc)
        finally:
            conn.close()


def call(path: str, op: str, args: Dict[str, Any] | None = None, *, timeout: float = CONTROL_TIMEOUT_S) -> Any:
    """Run one control operation on the process serving ``path``; return its result.

    Raises ConnectError when nothing serves ``path``, GridsockError with the process's reason
    when the operation failed, TimeoutError after ``timeout`` seconds.
    """
    sock = gsocket.socket(gsocket.AF_UNIX, gsocket.SOCK_STREAM)
    try:
        try:
            sock.connect(path)
        except OSError as exc:
            raise ConnectError(f"no gridsock process serves {path}: {exc.strerror or exc}", peer=path) from exc
        send_message(sock, wire.Control(op, dict(args or {})))
        reply = read_message(sock, wire.Decoder(peer=path), timeout=timeout)
    finally:
        sock.close()
    if not isinstance(reply, wire.ControlReply):
        raise RemoteProtocolError(f"expected ControlReply, got {type(reply).__name__}", peer=path)
    if not reply.ok:
        raise GridsockError(reply.error)
    return reply.result
