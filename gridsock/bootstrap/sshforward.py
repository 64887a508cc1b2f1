"""Remote forwards through SSH gateways: a port on a front-end whose connections come to us.

The paper's second bootstrap scheme: the rendez-vous node runs on the machine of the user who
launches the grid, which no cluster can reach. It logs in to each cluster's front-end over SSH
and asks it for a remote forward (``tcpip-forward``, what ``ssh -R`` does); the cluster's leader
dials the forwarded port on its front-end, and each such connection arrives here as a
``forwarded-tcpip`` channel, which :class:`SSHForwarder` hands to the server's normal accept
path as a socket (for the rendez-vous node: :meth:`RendezvousNode.handle_connection
<gridsock.bootstrap.rendezvous.RendezvousNode.handle_connection>`, where mutual TLS runs as
for any connection).

Theory of operation
-------------------
- :class:`RemoteForward` is one forward: a gateway (:class:`~.sshtunnel.SSHGateway`, with the
  credentials and the known_hosts that check its host key, never accepted blindly) and the
  address the gateway's sshd binds, ``BIND_HOST:BIND_PORT`` (sshd's ``GatewayPorts
  clientspecified`` lets a non-loopback BIND_HOST through; with ``GatewayPorts no`` sshd binds
  loopback whatever we ask). ``BIND_PORT`` 0 lets sshd choose; the port it chose is asked for
  again whenever the transport is re-opened, so the address the leaders were given stays good.
- :class:`SSHForwarder` keeps one SSH transport per gateway, each owned by a daemon thread of
  its own (paramiko blocks; gridsock does not monkeypatch). The thread dials the transport
  with :mod:`.sshtunnel`'s dialer (TCP, handshake, host key check, public-key authentication,
  one deadline), asks for every forward of that gateway, and then watches it: every
  ``SSH_FORWARD_PROBE_S`` a keepalive request must be answered within
  ``SSH_FORWARD_DEAD_S`` (a dead path is noticed then, not after TCP's retransmission
  timeout). A transport that dies, or a forward the gateway refuses (its old listener may not
  be released yet), closes the transport and the thread dials again after
  :func:`~.uplink.backoff_delays` (``retry_initial_s`` doubling to ``retry_max_s``, jittered).
  Forwards are not kept separately from their transport: all of a gateway's are up, or none.
- Each forwarded connection is a channel; like a tunnel of :mod:`.sshtunnel` it becomes one
  end of a ``socketpair`` pumped by two threads (``_Pump``), and the other end is handed to
  ``accept(sock, (origin_host, origin_port))`` in the gevent hub thread that called
  :meth:`SSHForwarder.start` (``loop.run_callback_threadsafe``), as a gevent socket. The origin
  is the connecting host as the gateway's sshd saw it.
- :meth:`SSHForwarder.stop` ends the threads; each closes its transport, which closes every
  forwarded connection still open through it.

One-use forwards (:func:`open_remote_listener`, for a data connection's method): a forward on
port 0 (sshd picks) asked on the gateway's *kept* transport of :mod:`.sshtunnel` (the one its
tunnels share, kept alive by its keeper while the listener is open), whose connections wait in
a queue for :meth:`RemoteListener.accept`; :meth:`RemoteListener.close` cancels it
(``cancel-tcpip-forward``). A transport has one handler for every forwarded connection, so one
dispatcher per transport finds the listener by the port the connection came to.
"""
from __future__ import annotations

import functools
import ipaddress
import itertools
import logging
import random
import re
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, cast

import gevent
import gevent.queue
import gevent.socket
import paramiko

from ..errors import ConfigError, ConnectError, GridsockError
from .sshtunnel import (SSH_CONNECT_TIMEOUT_S, SSHGateway, _Dial, _dial_transport, _get_transport, _Pump,
                        _PumpOwnsResources, _released, _used)
from .uplink import backoff_delays

__all__ = [
    "SSH_FORWARD_PROBE_S",
    "SSH_FORWARD_DEAD_S",
    "SSH_FORWARD_RETRY_INITIAL_S",
    "SSH_FORWARD_RETRY_MAX_S",
    "RemoteForward",
    "SSHForwarder",
    "RemoteListener",
    "open_remote_listener",
]

log = logging.getLogger(__name__)

# A forwarding transport proves it is alive this often (a keepalive request the gateway must
# answer): the leaders reach us only through it, so a dead one must be replaced soon.
SSH_FORWARD_PROBE_S = 10.0
# ...and is closed (then dialed again) when the answer has not come within this long.
SSH_FORWARD_DEAD_S = 15.0
# Waits between attempts to (re-)open a gateway's transport and forwards: this doubling to the
# maximum, jittered (the same schedule as a node's uplink).
SSH_FORWARD_RETRY_INITIAL_S = 1.0
SSH_FORWARD_RETRY_MAX_S = 30.0
# A keepalive request type OpenSSH answers (with a failure: any answer proves the transport).
_PROBE_REQUEST = "keepalive@openssh.com"

_CONNECTION_IDS = itertools.count(1)
_PORT_RE = re.compile(r"[0-9]{1,5}")


def _port(text: str, spec: str, *, zero_ok: bool) -> int:
    if not _PORT_RE.fullmatch(text) or int(text) > 65535 or (int(text) == 0 and not zero_ok):
        raise ConfigError(f"bad port {text!r} in SSH remote forward {spec!r}")
    return int(text)


@dataclass(frozen=True)
class RemoteForward:
    """A port that ``gateway``'s sshd listens on (``bind_host:bind_port``) for us.

    ``bind_host`` is passed to sshd as given: ``"localhost"`` (sshd's loopback), ``""``, ``"*"``
    or ``"0.0.0.0"`` (every address: needs ``GatewayPorts clientspecified`` or ``yes``), or one
    of the gateway's addresses. ``bind_port`` 0: sshd picks one. Raises ConfigError for a bad
    field.
    """

    gateway: SSHGateway
    bind_host: str = "localhost"
    bind_port: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.gateway, SSHGateway):
            raise ConfigError(f"gateway must be an SSHGateway, not {type(self.gateway).__name__}")
        if not isinstance(self.bind_host, str) or any(c.isspace() for c in self.bind_host):
            raise ConfigError(f"bad bind address {self.bind_host!r} for a remote forward")
        if isinstance(self.bind_port, bool) or not isinstance(self.bind_port, int) or not 0 <= self.bind_port < 65536:
            raise ConfigError(f"bad bind port {self.bind_port!r} for a remote forward")

    @classmethod
    def parse(cls, spec: str, *, key_filename: str | None = None, known_hosts: str | None = None) -> RemoteForward:
        """Parse ``USER@HOST[:PORT]=[BIND_HOST:]BIND_PORT`` (``[v6]:port`` on either side).

        The gateway part is :meth:`SSHGateway.parse`'s; without BIND_HOST sshd binds loopback
        (as ``ssh -R PORT:...``). Returns the RemoteForward; raises ConfigError.
        """
        if not isinstance(spec, str) or "=" not in spec:
            raise ConfigError(f"bad SSH remote forward {spec!r}: expected USER@HOST[:PORT]=[BIND_HOST:]BIND_PORT")
        gateway_spec, _, bind = spec.partition("=")
        gateway = SSHGateway.parse(gateway_spec, key_filename=key_filename, known_hosts=known_hosts)
        if bind.startswith("["):
            host, bracket, rest = bind[1:].partition("]")
            try:
                ipaddress.IPv6Address(host)
            except ValueError:
                raise ConfigError(f"bad SSH remote forward {spec!r}: expected [IPv6 address]:PORT") from None
            if not bracket or not rest.startswith(":"):
                raise ConfigError(f"bad SSH remote forward {spec!r}: expected [IPv6 address]:PORT")
            return cls(gateway, host, _port(rest[1:], spec, zero_ok=True))
        host, colon, port_text = bind.rpartition(":")
        if not colon:
            return cls(gateway, "localhost", _port(bind, spec, zero_ok=True))
        if ":" in host:
            raise ConfigError(f"bad SSH remote forward {spec!r}: put an IPv6 bind address in brackets")
        return cls(gateway, host, _port(port_text, spec, zero_ok=True))

    def __str__(self) -> str:
        host = f"[{self.bind_host}]" if ":" in self.bind_host else self.bind_host
        return f"{self.gateway}={host}:{self.bind_port}"


Accept = Callable[[gevent.socket.socket, Tuple[str, int]], None]


def _bounded(transport: paramiko.Transport, call: Callable[[], Any], timeout: float) -> Any:
    """Run ``call`` (a request that waits for the gateway's answer, without a timeout of its
    own) in a helper thread; close the transport if no answer comes within ``timeout``,
    which ends the call. Returns its result; raises its exception, or SSHException."""
    outcome: List[Any] = []

    def run() -> None:
        try:
            outcome.append((True, call()))
        except BaseException as exc:  # passed to the waiting thread
            outcome.append((False, exc))

    helper = threading.Thread(target=run, name="gridsock-ssh-forward request", daemon=True)
    helper.start()
    helper.join(timeout)
    if helper.is_alive():
        transport.close()
        helper.join(SSH_CONNECT_TIMEOUT_S)
        raise paramiko.SSHException(f"no answer from the gateway within {timeout:.1f} s")
    ok, value = outcome[0]
    if not ok:
        raise value
    return value


class _GatewayForwards:
    """One gateway's transport and forwards, kept by one daemon thread (module docstring)."""

    def __init__(self, owner: SSHForwarder, gateway: SSHGateway, forwards: List[RemoteForward]) -> None:
        self.owner = owner
        self.gateway = gateway
        self.forwards = forwards
        self.ports: Dict[RemoteForward, int] = {}  # forward -> the port sshd bound (last granted)
        self.accepted: Dict[RemoteForward, int] = {f: 0 for f in forwards}
        self.state = "new"
        self.since = time.time()
        self.last_error: Optional[str] = None
        self.opened = 0  # transports opened with every forward granted
        self.transport: Optional[paramiko.Transport] = None
        self.up = threading.Event()
        self.thread = threading.Thread(target=self._run, name=f"gridsock-ssh-forward {gateway}", daemon=True)

    def _set(self, state: str, error: Optional[str] = None) -> None:
        self.state = state
        self.since = time.time()
        if error is not None:
            self.last_error = error
        if state == "up":
            self.up.set()
        else:
            self.up.clear()
        self.owner._changed()

    def _run(self) -> None:
        owner = self.owner
        delays = backoff_delays(owner.retry_initial_s, owner.retry_max_s, rng=owner.rng)
        while not owner._stopping.is_set():
            self._set("connecting")
            try:
                transport = self._open()
            except (GridsockError, paramiko.SSHException, OSError, EOFError) as exc:
                if owner._stopping.is_set():
                    break
                log.warning("SSH remote forwards through %s: %s", self.gateway, exc)
                self._set("down", str(exc))
            else:
                delays = backoff_delays(owner.retry_initial_s, owner.retry_max_s, rng=owner.rng)
                reason = self._watch(transport)
                transport.close()
                self.transport = None
                if owner._stopping.is_set():
                    break
                log.warning("SSH remote forwards through %s lost: %s; opening them again", self.gateway, reason)
                self._set("down", reason)
            if owner._stopping.wait(next(delays)):
                break
        self._set("stopped")

    def _open(self) -> paramiko.Transport:
        """Dial, authenticate, ask for every forward; returns the transport with all granted."""
        owner = self.owner
        dial = _Dial(self.gateway, "remote forwards", time.monotonic() + owner.connect_timeout_s)
        transport = _dial_transport(dial)
        self.transport = transport
        try:
            for forward in self.forwards:
                wanted = self.ports.get(forward, forward.bind_port)  # the port sshd chose before, if it chose
                port = _bounded(transport, lambda: transport.request_port_forward(
                    forward.bind_host, wanted, handler=self._on_channel), dial.remaining("asking for a remote forward"))
                self.ports[forward] = port
                log.info("SSH remote forward %s: %s listens on %s:%d for us", forward, self.gateway,
                         forward.bind_host or "*", port)
            if owner._stopping.is_set():
                raise ConfigError("the forwarder is stopping")
        except BaseException:
            transport.close()
            self.transport = None
            raise
        self.opened += 1
        self._set("up")
        return transport

    def _watch(self, transport: paramiko.Transport) -> str:
        """Return why the transport is no longer usable (or "stopping")."""
        owner = self.owner
        while not owner._stopping.wait(owner.probe_s):
            if not transport.is_active():
                return "the SSH transport closed"
            try:
                _bounded(transport, lambda: transport.global_request(_PROBE_REQUEST, wait=True), owner.dead_s)
            except paramiko.SSHException as exc:
                return f"keepalive unanswered: {exc}"
            if not transport.is_active():
                return "the SSH transport closed"
        return "stopping"

    def _on_channel(self, channel: paramiko.Channel, origin: Tuple[str, int], server: Tuple[str, int]) -> None:
        """A forwarded connection (in paramiko's transport thread): pump it, hand it over."""
        forward = next((f for f in self.forwards if self.ports.get(f) == server[1]), None)
        label = f"#{next(_CONNECTION_IDS)} {self.gateway} {server[0]}:{server[1]} <- {origin[0]}:{origin[1]}"
        if forward is None or self.owner._stopping.is_set():
            log.warning("SSH remote forward: unexpected connection %s: closed", label)
            channel.close()
            return
        app_end = _pumped(channel, f"SSH remote forward {label}")
        if app_end is None:
            return
        self.accepted[forward] += 1
        log.debug("SSH remote forward: connection %s", label)
        self.owner._hand_over(app_end, (str(origin[0]), int(origin[1])))

    def status(self) -> List[dict]:
        return [{"forward": str(f), "gateway": str(self.gateway), "bind_host": f.bind_host,
                 "bind_port": self.ports.get(f, f.bind_port), "state": self.state, "since": self.since,
                 "last_error": self.last_error, "opened": self.opened, "accepted": self.accepted[f]}
                for f in self.forwards]


class SSHForwarder:
    """Keeps ``forwards`` open and hands every connection through them to ``accept``.

    ``accept(sock, (origin_host, origin_port))`` runs in the gevent hub thread that called
    :meth:`start`, with a connected gevent stream socket (one end of a ``socketpair``); it must
    not block (spawn a greenlet). Forwards through one gateway share one transport. Timing is
    injected: ``connect_timeout_s`` bounds a transport's setup and each forward request,
    ``probe_s``/``dead_s`` the liveness checks, ``retry_initial_s``/``retry_max_s`` the waits
    between attempts; ``rng`` draws the jitter. Raises ConfigError for no forwards or a bad one.
    """

    def __init__(
        self,
        forwards: Sequence[RemoteForward],
        accept: Accept,
        *,
        connect_timeout_s: float = SSH_CONNECT_TIMEOUT_S,
        probe_s: float = SSH_FORWARD_PROBE_S,
        dead_s: float = SSH_FORWARD_DEAD_S,
        retry_initial_s: float = SSH_FORWARD_RETRY_INITIAL_S,
        retry_max_s: float = SSH_FORWARD_RETRY_MAX_S,
        rng: random.Random | None = None,
    ) -> None:
        forwards = list(forwards)
        if not forwards:
            raise ConfigError("an SSH forwarder needs at least one remote forward")
        for forward in forwards:
            if not isinstance(forward, RemoteForward):
                raise ConfigError(f"expected a RemoteForward, not {type(forward).__name__}")
        if len(set(forwards)) != len(forwards):
            raise ConfigError("the same SSH remote forward is given twice")
        self.accept = accept
        self.connect_timeout_s = connect_timeout_s
        self.probe_s = probe_s
        self.dead_s = dead_s
        self.retry_initial_s = retry_initial_s
        self.retry_max_s = retry_max_s
        self.rng = rng if rng is not None else random.Random()
        by_gateway: Dict[SSHGateway, List[RemoteForward]] = {}
        for forward in forwards:
            by_gateway.setdefault(forward.gateway, []).append(forward)
        self._gateways = [_GatewayForwards(self, g, fs) for g, fs in by_gateway.items()]
        self._stopping = threading.Event()
        self._changes = threading.Condition()
        self._hub: Any = None

    def start(self) -> SSHForwarder:
        """Start keeping the forwards (in the background); returns self at once."""
        if self._hub is not None:
            raise RuntimeError("the SSH forwarder is already started")
        self._hub = gevent.get_hub()
        for keeper in self._gateways:
            keeper.thread.start()
        return self

    def stop(self) -> None:
        """Stop: every transport is closed (and the connections through it), the threads end.

        Returns at once: each thread closes its transport as it ends (:meth:`join` waits for
        that). Safe to call twice."""
        self._stopping.set()

    def join(self, timeout: float) -> bool:
        """Wait until every thread ended after :meth:`stop` (at most ``timeout`` seconds in all);
        return True if they did. Blocks the calling thread (see :meth:`wait_up`)."""
        deadline = time.monotonic() + timeout
        for keeper in self._gateways:
            if keeper.thread.ident is not None:
                keeper.thread.join(max(0.0, deadline - time.monotonic()))
        return not any(k.thread.is_alive() for k in self._gateways)

    @property
    def up(self) -> bool:
        """True while every gateway's transport is open with all its forwards granted."""
        return all(k.up.is_set() for k in self._gateways)

    def ports(self) -> Dict[RemoteForward, int]:
        """The port each forward got on its gateway (its ``bind_port`` until first granted)."""
        return {f: k.ports.get(f, f.bind_port) for k in self._gateways for f in k.forwards}

    def status(self) -> List[dict]:
        """One dict per forward: forward, gateway, bind_host, bind_port, state (connecting, up,
        down, stopped), since, last_error, opened (transports opened), accepted (connections)."""
        return [row for keeper in self._gateways for row in keeper.status()]

    def wait_up(self, timeout: float) -> bool:
        """Wait until :attr:`up` (or ``timeout`` seconds); return :attr:`up`. Blocks the calling
        thread: from gevent code, use ``gevent.get_hub().threadpool.apply(forwarder.wait_up, (t,))``."""
        deadline = time.monotonic() + timeout
        with self._changes:
            while not self.up:
                left = deadline - time.monotonic()
                if left <= 0 or not self._changes.wait(left):
                    break
        return self.up

    def _changed(self) -> None:
        with self._changes:
            self._changes.notify_all()

    def _hand_over(self, sock: socket.socket, origin: Tuple[str, int]) -> None:
        # From a paramiko thread to the hub: the one gevent call allowed from a foreign thread.
        self._hub.loop.run_callback_threadsafe(self._deliver, sock, origin)

    def _deliver(self, sock: socket.socket, origin: Tuple[str, int]) -> None:
        if self._stopping.is_set():
            sock.close()
            return
        gsock = gevent.socket.socket(sock.family, sock.type, sock.proto, fileno=sock.detach())
        try:
            self.accept(gsock, origin)
        except Exception:
            log.exception("SSH remote forward: the accept callback failed for a connection from %s:%d", *origin)
            gsock.close()


# --- one-use forwards on the kept transports ------------------------------------------------------

_LISTENERS_LOCK = threading.Lock()
_LISTENERS: Dict[Tuple[int, int], "RemoteListener"] = {}  # (id(transport), port) -> listener


class RemoteListener:
    """A port on an SSH gateway whose connections come here (see the module docstring).

    ``port`` is the port sshd bound on ``bind_host``. Use it from the gevent hub thread that
    opened it. Close it once done (it is not reused)."""

    def __init__(self, gateway: SSHGateway, bind_host: str, port: int, transport: paramiko.Transport) -> None:
        self.gateway = gateway
        self.bind_host = bind_host
        self.port = port
        self._transport = transport
        self._hub = gevent.get_hub()  # (made in the hub thread: open_remote_listener)
        self._queue: gevent.queue.Queue = gevent.queue.Queue()
        self.closed = False

    def accept(self, timeout: float) -> Tuple[gevent.socket.socket, Tuple[str, int]]:
        """The next connection through the forward and its origin (as the gateway saw it).

        Raises TimeoutError after ``timeout`` seconds, ConnectError once closed."""
        if self.closed:
            raise ConnectError(f"the remote forward on {self.gateway} is closed", method="ssh")
        try:
            sock, origin = self._queue.get(timeout=timeout)
        except gevent.queue.Empty:
            raise TimeoutError(f"no connection through {self.gateway} port {self.port} within {timeout:.1f} s") from None
        return gevent.socket.socket(sock.family, sock.type, sock.proto, fileno=sock.detach()), origin

    def close(self) -> None:
        """Cancel the forward and close what came and was not accepted. Idempotent."""
        if self.closed:
            return
        self.closed = True
        with _LISTENERS_LOCK:
            _LISTENERS.pop((id(self._transport), self.port), None)
        while not self._queue.empty():
            self._queue.get_nowait()[0].close()
        transport, bind = self._transport, (self.bind_host, self.port)

        def cancel() -> None:
            try:  # (not Transport.cancel_port_forward: it drops the handler every forward shares)
                transport.global_request("cancel-tcpip-forward", bind, wait=False)
            except (paramiko.SSHException, OSError, EOFError) as exc:  # the transport is gone: so is the forward
                log.debug("cancelling the remote forward %s:%d on %s: %s", *bind, self.gateway, exc)

        self._hub.threadpool.spawn(cancel)
        _released(self.gateway)

    def _arrived(self, sock: socket.socket, origin: Tuple[str, int]) -> None:  # (in the hub)
        if self.closed:
            sock.close()
        else:
            self._queue.put((sock, origin))


def _dispatch(transport_key: int, channel: paramiko.Channel, origin: Tuple[str, int], server: Tuple[str, int]) -> None:
    """A kept transport's handler of forwarded connections (in paramiko's thread)."""
    with _LISTENERS_LOCK:
        listener = _LISTENERS.get((transport_key, server[1]))
    label = f"#{next(_CONNECTION_IDS)} {server[0]}:{server[1]} <- {origin[0]}:{origin[1]}"
    if listener is None or listener.closed:
        log.info("remote forward: connection %s for no open listener: closed", label)
        channel.close()
        return
    app_end = _pumped(channel, f"remote forward {label}")
    if app_end is None:
        return
    listener._hub.loop.run_callback_threadsafe(listener._arrived, app_end, (str(origin[0]), int(origin[1])))


def _open_forward(gateway: SSHGateway, bind_host: str, deadline: float) -> Tuple[paramiko.Transport, int]:
    """Ask the kept transport of ``gateway`` for a forward on ``bind_host``, port 0; return the
    transport and the port. Blocks: run in a worker thread. Raises ConnectError, AuthError or
    ConfigError; on success the caller owns one use of the gateway (``_released`` it)."""
    dial = _Dial(gateway, f"a remote forward on {bind_host or '*'}", deadline)
    transport, _ = _get_transport(dial)
    _used(gateway)  # the keeper keeps the transport while the listener is open
    try:
        timeout = dial.remaining("asking for the remote forward")
        try:
            port = _bounded(transport, lambda: transport.request_port_forward(
                bind_host, 0, handler=functools.partial(_dispatch, id(transport))), timeout)
        except (paramiko.SSHException, OSError, EOFError) as exc:
            raise dial.connect_error(f"gateway refused the remote forward: {exc}") from exc
    except BaseException:
        _released(gateway)
        raise
    return transport, port


def _open_forward_outcome(*args: Any) -> Tuple[Optional[Tuple[paramiko.Transport, int]], Optional[Exception]]:
    # Errors are returned, not raised (gevent's threadpool would print a traceback for each).
    try:
        return _open_forward(*args), None
    except Exception as exc:
        return None, exc


def open_remote_listener(gateway: SSHGateway, bind_host: str, *,
                         timeout: float = SSH_CONNECT_TIMEOUT_S) -> RemoteListener:
    """A one-use remote forward: ``gateway``'s sshd listens on ``bind_host`` (port 0: it picks)
    and sends what comes there to the returned :class:`RemoteListener`.

    Blocks the calling greenlet only; ``timeout`` bounds the transport's setup (when none is
    kept yet) and the request. Raises :class:`ConnectError` (gateway unreachable, forward
    refused: sshd's ``AllowTcpForwarding``/``GatewayPorts``, an address that is not the
    gateway's), :class:`AuthError` (host key, authentication) or :class:`ConfigError`.
    """
    if not isinstance(gateway, SSHGateway):
        raise ConfigError(f"gateway must be an SSHGateway, not {type(gateway).__name__}")
    if not isinstance(bind_host, str) or any(c.isspace() for c in bind_host):
        raise ConfigError(f"bad bind address {bind_host!r} for a remote forward")
    pool = gevent.get_hub().threadpool
    result = pool.spawn(_open_forward_outcome, gateway, bind_host, time.monotonic() + timeout)
    try:
        opened, error = cast("Tuple[Optional[Tuple[paramiko.Transport, int]], Optional[Exception]]", result.get())
    except BaseException:
        if not result.ready():  # killed while the worker runs: cancel what it gets
            def cancel_late(res: Any) -> None:
                if res.successful() and res.value[0] is not None:
                    RemoteListener(gateway, bind_host, res.value[0][1], res.value[0][0]).close()
            result.rawlink(cancel_late)
        raise
    if error is not None:
        try:
            raise error
        finally:
            del error
    assert opened is not None
    transport, port = opened
    listener = RemoteListener(gateway, bind_host, port, transport)
    with _LISTENERS_LOCK:
        _LISTENERS[(id(transport), port)] = listener
    return listener


def _pumped(channel, label: str) -> Optional[socket.socket]:
    """The application's end of a socketpair whose other end a pump joins to ``channel`` (an
    SSH channel, in paramiko's thread); None (``channel`` closed, a line logged) if it cannot be had."""
    try:
        app_end, pump_end = socket.socketpair()
    except OSError as exc:
        log.warning("%s: %s", label, exc)
        channel.close()
        return None
    try:
        _Pump(channel, pump_end, label).start()
    except _PumpOwnsResources:
        app_end.close()
        return None
    except BaseException:
        app_end.close()
        pump_end.close()
        channel.close()
        raise
    return app_end
