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

Bad input: a handler checks its arguments with :class:`ControlArgs`, whose getters raise
ConfigError naming the operation and the argument; every GridsockError is answered as
``ControlReply(ok=False, error=...)`` and logs nothing. Only a bug (any other exception) logs a
traceback. A reply that cannot be encoded (a result over the frame limit) is answered with an
error too, and a reason is cut to ``MAX_REASON_BYTES`` UTF-8 bytes, not characters.
"""
from __future__ import annotations

import logging
import math
import os
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import gevent
from gevent import socket as gsocket

from .. import wire
from .._ratelog import RateLimitedLog
from ..errors import BrokenStreamError, ConfigError, ConnectError, GridsockError, LocalProtocolError, RemoteProtocolError
from ..names import (LocalTrustError, check_private_dir, connect_private, make_private_dir, peer_credentials,
                     trusted_uid)
from ..names import run_dir  # re-exported: it lives in gridsock.names, which imports no gevent
from .link import read_message, send_message
from .transport import Address, listen

__all__ = ["run_dir", "control_path", "list_control_sockets", "UnixServer", "ControlServer", "ControlArgs", "call",
           "report_progress", "reason_text", "CONTROL_TIMEOUT_S", "PROGRESS_ARG", "PROGRESS_OP", "MAX_ARG_TIMEOUT_S",
           "MAX_ARG_ITEMS"]

log = logging.getLogger(__name__)

# A control call (a ping across the grid included) answers within this long.
CONTROL_TIMEOUT_S = 30.0

# The argument by which a client asks for progress messages (seconds between two at most), and
# the op those messages carry (see the module docstring).
PROGRESS_ARG = "progress_interval_s"
PROGRESS_OP = "progress"
# No client gets progress more often than this, whatever it asks.
MIN_PROGRESS_INTERVAL_S = 0.05
# The longest timeout an operation's arguments may ask for (an hour: a long transfer).
MAX_ARG_TIMEOUT_S = 3600.0
# Items in a list argument (names to wait for): a directory's worth.
MAX_ARG_ITEMS = 10_000


def reason_text(text: object) -> str:
    """``str(text)`` cut to at most ``wire.MAX_REASON_BYTES`` UTF-8 bytes (a reason field's limit
    counts bytes: cutting characters can leave a reason the encoder refuses)."""
    raw = str(text).encode("utf-8", "replace")  # (an unpaired surrogate becomes "?")
    return raw[: wire.MAX_REASON_BYTES].decode("utf-8", "ignore")


_REQUIRED = object()


class ControlArgs:
    """The arguments of one control operation, checked as they are read.

    Each getter returns the argument (or ``default`` when it is absent, or null where
    ``default`` is None) and raises ConfigError naming the operation and the argument when it
    is missing (no default) or of the wrong type or range. Booleans are never numbers here.
    """

    def __init__(self, op: str, args: Dict[str, Any]) -> None:
        self.op = op
        self.args = args if isinstance(args, dict) else {}

    def _given(self, key: str, default: Any) -> bool:
        """True if ``key`` has a value to check; False if it is absent (or null) and has a default.
        Raises ConfigError if it is absent and required."""
        if self.args.get(key) is not None:
            return True
        if default is _REQUIRED:
            raise ConfigError(f"{self.op}: argument {key!r} is required")
        return False

    def _bad(self, key: str, value: Any, wanted: str) -> ConfigError:
        # (never the repr of a container: it may be megabytes, or nested deep enough to overflow)
        if isinstance(value, str):
            shown = repr(value[:40]) + ("..." if len(value) > 40 else "")
        elif isinstance(value, (bool, int, float)) and len(str(value)) <= 40:
            shown = repr(value)
        else:
            shown = f"a {type(value).__name__}"
        return ConfigError(f"{self.op}: argument {key!r} must be {wanted}, not {shown}")

    def text(self, key: str, default: Any = _REQUIRED, *, max_bytes: int = wire.MAX_ADDR_BYTES,
             empty: bool = False) -> Any:
        """A string of at most ``max_bytes`` UTF-8 bytes (empty only if ``empty``)."""
        if not self._given(key, default):
            return default
        value = self.args[key]
        if not isinstance(value, str) or (not value and not empty) \
                or len(value.encode("utf-8", "replace")) > max_bytes:
            raise self._bad(key, value, f"a {'' if empty else 'non-empty '}string of at most {max_bytes} bytes")
        return value

    def integer(self, key: str, default: Any = _REQUIRED, *, lo: int = 0, hi: int = 2 ** 32 - 1) -> Any:
        """An integer in ``lo`` .. ``hi``."""
        if not self._given(key, default):
            return default
        value = self.args[key]
        if type(value) is not int or not lo <= value <= hi:
            raise self._bad(key, value, f"an integer in {lo}..{hi}")
        return value

    def number(self, key: str, default: Any = _REQUIRED, *, hi: float = MAX_ARG_TIMEOUT_S) -> Any:
        """A finite number ``x``, ``0 < x <= hi`` (a timeout, an interval)."""
        if not self._given(key, default):
            return default
        value = self.args[key]
        if type(value) not in (int, float) or not math.isfinite(value) or not 0 < value <= hi:
            raise self._bad(key, value, f"a number of seconds in (0, {hi:g}]")
        return float(value)

    def flag(self, key: str, default: bool = False) -> bool:
        """``true`` or ``false``."""
        if not self._given(key, default):
            return default
        value = self.args[key]
        if not isinstance(value, bool):
            raise self._bad(key, value, "true or false")
        return value

    def texts(self, key: str, default: Sequence[str] = (), *, max_items: int = MAX_ARG_ITEMS,
              max_bytes: int = wire.MAX_ADDR_BYTES) -> List[str]:
        """A list of at most ``max_items`` non-empty strings, each at most ``max_bytes`` bytes."""
        if not self._given(key, default):
            return list(default)
        value = self.args[key]
        if not isinstance(value, (list, tuple)) or len(value) > max_items or not all(
                isinstance(v, str) and v and len(v.encode("utf-8", "replace")) <= max_bytes for v in value):
            raise self._bad(key, value, f"a list of at most {max_items} non-empty strings")
        return list(value)


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
        # What clients make us log, rate-limited (gridsock._ratelog): the refused ones (another
        # user's) by uid; the bad ones our user's programs send as one key (a subclass logs
        # those under its own logger).
        self._refusal_log = RateLimitedLog(log)
        self._client_log = RateLimitedLog(log)

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
            self._refusal_log.warning("no credentials", "%s: refused a client whose credentials the kernel would "
                                     "not give: %s", self.path, exc)
            return False
        if trusted_uid(uid):
            return True
        self._refusal_log.warning(f"uid {uid}", "%s: refused a client of uid %d (pid %d): only uid %d and root may "
                                 "use it", self.path, uid, pid, os.geteuid())
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
                try:
                    interval = ControlArgs(message.op, {PROGRESS_ARG: interval}).number(PROGRESS_ARG, None)
                except ConfigError as exc:
                    send_message(conn, wire.ControlReply(False, None, reason_text(exc)))
                    continue
                reporter = _Reporter(conn, interval) if interval is not None else None
                operation = gevent.spawn(self._run, message.op, args, reporter)
                watcher = gevent.spawn(_cancel_when_gone, conn, operation, message.op)
                try:
                    reply: object = operation.get()  # GreenletExit if it was cancelled
                finally:
                    watcher.kill()
                    operation.kill()  # (already dead, unless this greenlet is being killed)
                if not isinstance(reply, wire.ControlReply):
                    return  # cancelled: the client is gone
                try:
                    frame = wire.encode(reply)
                except LocalProtocolError as exc:  # (a result over the frame limit)
                    log.warning("control op %r: its reply cannot be sent: %s", message.op, exc)
                    frame = wire.encode(wire.ControlReply(False, None, reason_text(f"reply not sent: {exc}")))
                conn.sendall(frame)
        except RemoteProtocolError as exc:
            self._client_log.warning("client", "dropping control client: %s", exc)
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
        except GridsockError as exc:  # bad arguments included: an answer, not a log line
            return wire.ControlReply(False, None, reason_text(exc))
        except Exception as exc:  # a bug
            log.exception("control op %r failed", op)
            return wire.ControlReply(False, None, reason_text(f"internal error: {exc!r}"))
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
