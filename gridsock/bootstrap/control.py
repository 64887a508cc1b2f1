"""The local control socket: how ``gridsock status`` and ``gridsock ping`` talk to a running process.

Every rendez-vous node and node process serves a Unix socket (in a private directory, so only
its user can use it) that speaks the wire codec: the client sends ``Control(op, args)``, the process answers
``ControlReply(ok, result, error)``. Paths default to ``<run dir>/<name>.sock``
(:func:`gridsock.names.run_dir`).

Only this user (and root) may use them, whatever the file modes say: a server makes its
directory private or refuses it (:func:`gridsock.names.make_private_dir`), and closes at once,
with one log line, each client whose uid (``SO_PEERCRED``) is neither its own nor root's; a
client (:func:`call`) talks only to a socket of its user in a private directory, served by a
process of its user or root (:func:`gridsock.names.connect_private`).

Theory of operation
-------------------
One client connection runs its operations one after the other. Each operation runs in a greenlet
of its own while the connection's greenlet watches the client: if the client goes away (end of
stream, or an error) before the reply, the operation is cancelled (killed with ``GreenletExit``,
so its ``finally`` blocks close what it opened): ``gridsock transfer`` interrupted by Ctrl-C
stops moving bytes in the node at once instead of running to its end for nobody.

Progress: a client that puts ``progress_interval_s`` (:data:`PROGRESS_ARG`) in the arguments of
its ``Control`` accepts, before the ``ControlReply``, any number of ``Control("progress", {...})``
messages from the process, at most one per that many seconds. An operation sends them with
:func:`report_progress` (a no-op when its client did not ask, or outside a control operation);
the handler never sees the key.
"""
from __future__ import annotations

import logging
import os
import time
from typing import Any, Callable, Dict, List, Optional

import gevent
from gevent import socket as gsocket

from .. import wire
from ..errors import BrokenStreamError, ConnectError, GridsockError, RemoteProtocolError
from ..names import (LocalTrustError, check_private_dir, connect_private, make_private_dir, peer_credentials,
                     trusted_uid)
from ..names import run_dir  # re-exported: it lives in gridsock.names, which imports no gevent
from .link import read_message, send_message
from .transport import Address, listen

__all__ = ["run_dir", "control_path", "list_control_sockets", "UnixServer", "ControlServer", "call", "report_progress",
           "CONTROL_TIMEOUT_S", "PROGRESS_ARG", "PROGRESS_OP"]

log = logging.getLogger(__name__)

# A control call (a ping across the grid included) answers within this long.
CONTROL_TIMEOUT_S = 30.0

# The argument by which a client asks for progress messages (seconds between two at most), and
# the op those messages carry (see the module docstring).
PROGRESS_ARG = "progress_interval_s"
PROGRESS_OP = "progress"
# No client gets progress more often than this, whatever it asks.
MIN_PROGRESS_INTERVAL_S = 0.05


def control_path(name: str) -> str:
    return os.path.join(run_dir(), f"{name}.sock")


def list_control_sockets() -> List[str]:
    """The control sockets in the run directory (none if it does not exist). Raises
    LocalTrustError if the run directory is not private to this user."""
    directory = run_dir()
    try:
        check_private_dir(directory)
        return sorted(os.path.join(directory, f) for f in os.listdir(directory) if f.endswith(".sock"))
    except FileNotFoundError:
        return []


class UnixServer:
    """A Unix socket (mode 0600, in a private directory) served until stopped: one greenlet per
    client runs :meth:`_handle`, which owns the connection. A client of another uid than the
    server's (root excepted) is closed at once. The control and the agent socket are two."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._sock: Optional[gsocket.socket] = None
        self._greenlet: Optional[gevent.Greenlet] = None

    def start(self):
        """Make the socket's directory private (or refuse it), listen; return self.
        Raises LocalTrustError for a directory that is not this user's alone, ConfigError if
        another process serves the path."""
        make_private_dir(os.path.dirname(os.path.abspath(self.path)))
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
            if self._allowed(conn):
                gevent.spawn(self._handle, conn)
            else:
                conn.close()

    def _allowed(self, conn) -> bool:
        """True if the client at ``conn`` runs as our user or root; else logs why not."""
        try:
            pid, uid, _ = peer_credentials(conn)
        except OSError as exc:
            log.warning("%s: refused a client whose credentials the kernel would not give: %s", self.path, exc)
            return False
        if trusted_uid(uid):
            return True
        log.warning("%s: refused a client of uid %d (pid %d): only uid %d and root may use it",
                    self.path, uid, pid, os.geteuid())
        return False

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
                args = dict(message.args)
                interval = args.pop(PROGRESS_ARG, None)
                reporter = _Reporter(conn, interval) if isinstance(interval, (int, float)) else None
                operation = gevent.spawn(self._run, message.op, args, reporter)
                watcher = gevent.spawn(_cancel_when_gone, conn, operation, message.op)
                try:
                    reply: object = operation.get()  # GreenletExit if it was cancelled
                finally:
                    watcher.kill()
                    operation.kill()  # (already dead, unless this greenlet is being killed)
                if not isinstance(reply, wire.ControlReply):
                    return  # cancelled: the client is gone
                send_message(conn, reply)
        except RemoteProtocolError as exc:
            log.warning("dropping control client: %s", exc)
        except (OSError, TimeoutError) as exc:
            log.debug("control client gone: %s", exc)
        finally:
            conn.close()

    def _run(self, op: str, args: Dict[str, Any], reporter: Optional["_Reporter"]) -> wire.ControlReply:
        """Run one operation (in a greenlet of its own); return the reply to send."""
        if reporter is not None:
            _reporters[gevent.getcurrent()] = reporter
        try:
            return wire.ControlReply(True, self._handler(op, args))
        except GridsockError as exc:
            return wire.ControlReply(False, None, str(exc)[: wire.MAX_REASON_BYTES])
        except Exception as exc:
            log.exception("control op %r failed", op)
            return wire.ControlReply(False, None, f"internal error: {exc!r}"[: wire.MAX_REASON_BYTES])
        finally:
            _reporters.pop(gevent.getcurrent(), None)


def _cancel_when_gone(conn, operation: gevent.Greenlet, op: str) -> None:
    """Kill ``operation`` if the client closes ``conn`` (or it breaks) before the reply.

    Peeks, so a request the client sends early stays for the connection's own reader; once one
    came, the client is there and this watch ends.
    """
    try:
        data = conn.recv(1, gsocket.MSG_PEEK)
    except OSError:
        data = b""
    if not data and not operation.dead:
        log.info("control client gone: cancelling %r", op)
        operation.kill(block=False)


class _Reporter:
    """Sends one operation's progress to its client, at most once per ``interval_s``."""

    def __init__(self, conn, interval_s: float) -> None:
        self.conn = conn
        self.interval_s = max(float(interval_s), MIN_PROGRESS_INTERVAL_S)
        self.next_at = 0.0

    def report(self, fields: Dict[str, Any], *, force: bool) -> None:
        now = time.monotonic()
        if not force and now < self.next_at:
            return
        self.next_at = now + self.interval_s
        try:
            send_message(self.conn, wire.Control(PROGRESS_OP, fields))
        except OSError as exc:  # the client is gone: the watcher cancels the operation
            log.debug("progress not sent: %s", exc)


# The reporter of each running operation's greenlet (operations whose client asked for progress).
_reporters: Dict[Any, _Reporter] = {}


def report_progress(fields: Dict[str, Any], *, force: bool = False) -> None:
    """Tell the client of the control operation running in this greenlet how far it got.

    ``fields`` is a JSON object. Sent only if the client asked for progress, and not more often
    than it asked unless ``force``; a no-op outside a control operation. Never raises for a
    client that went away (the operation is cancelled instead).
    """
    reporter = _reporters.get(gevent.getcurrent())
    if reporter is not None:
        reporter.report(fields, force=force)


def call(path: str, op: str, args: Dict[str, Any] | None = None, *, timeout: float = CONTROL_TIMEOUT_S,
         progress: Optional[Callable[[Dict[str, Any]], None]] = None,
         progress_interval_s: float = 0.2) -> Any:
    """Run one control operation on the process serving ``path``; return its result.

    With ``progress``, the operation's progress reports (if it sends any) are passed to it as
    they come, at most one per ``progress_interval_s``. Closing the connection early (an
    exception in ``progress``, or this greenlet killed) cancels the operation in the process.

    Raises LocalTrustError when ``path`` or its directory is not private to this user or the
    process serving it runs as another user (nothing is sent then), ConnectError when nothing
    serves ``path``, GridsockError with the process's reason when the operation failed,
    TimeoutError after ``timeout`` seconds.
    """
    args = dict(args or {})
    if progress is not None:
        args[PROGRESS_ARG] = progress_interval_s
    deadline = time.monotonic() + timeout
    sock = gsocket.socket(gsocket.AF_UNIX, gsocket.SOCK_STREAM)
    try:
        try:
            connect_private(sock, path)
        except LocalTrustError:
            raise
        except OSError as exc:
            raise ConnectError(f"no gridsock process serves {path}: {exc.strerror or exc}", peer=path) from exc
        send_message(sock, wire.Control(op, args))
        decoder = wire.Decoder(peer=path)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no reply from {path} within {timeout:.1f} s")
            reply = read_message(sock, decoder, timeout=remaining)
            if progress is not None and isinstance(reply, wire.Control) and reply.op == PROGRESS_OP:
                progress(reply.args)
                continue
            break
    finally:
        sock.close()
    if not isinstance(reply, wire.ControlReply):
        raise RemoteProtocolError(f"expected ControlReply, got {type(reply).__name__}", peer=path)
    if not reply.ok:
        raise GridsockError(reply.error)
    return reply.result
