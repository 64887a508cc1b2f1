"""TCP through an SSH gateway: ``direct-tcpip`` channels, handed to gevent code as real sockets.

A cluster node with no route out reaches the rendez-vous node through its front-end's sshd:
:func:`open_ssh_tunnel` asks the gateway to open a ``direct-tcpip`` channel to HOST:PORT and
returns a :class:`gevent.socket.socket` whose bytes travel over that channel. The caller may run
TLS over it with :mod:`gevent.ssl`, as over any TCP socket.

Theory of operation
-------------------
paramiko is written for real threads: every call blocks, and each :class:`paramiko.Transport` runs
its own reader thread. gridsock does not monkeypatch, so ``threading`` gives real OS threads and
nothing here may block the gevent hub:

- Setup (TCP connect to the gateway, SSH handshake, host key check, authentication, channel open)
  runs in gevent's threadpool; the calling greenlet waits on the result while the others run. The
  whole setup is bounded by ``timeout`` (one deadline, shared by every step).
- Transports are cached, one per :class:`SSHGateway` (the key includes the credentials), and shared
  by all channels to that gateway. ``_CACHE_LOCK`` guards the cache and is only held for dictionary
  operations; a per-gateway dial lock makes concurrent openers wait for one handshake instead of
  racing several. A cached transport that died is replaced on the next open; if it dies between the
  check and the channel open, the open is retried once on a fresh transport.
- Each tunnel is a ``socketpair``: the application gets one end (wrapped as a gevent socket), and
  two daemon threads pump bytes between the other end and the channel, one per direction. EOF is
  forwarded as a half-close (app EOF -> ``channel.shutdown_write()``; channel EOF ->
  ``shutdown(SHUT_WR)`` on the pair end). After forwarding the app's EOF, the upstream thread
  blocks in ``poll()`` for ``POLLHUP`` on its pair end, which fires when the application closed its
  end entirely or the downstream direction finished: that is how a tunnel whose application is gone
  ends even if the far side stays silent. When one direction fails (or the application is gone),
  the tunnel is aborted: ``shutdown(SHUT_RDWR)`` of the pair end and ``channel.close()`` wake the
  other thread. The last thread out closes the channel and the pair end; no fd outlives the threads.
- Kept ahead of need: once a node has opened a channel through a gateway, a keeper thread
  (:class:`_Keeper`, one per gateway) keeps its transport up: SSH keepalives every
  ``SSH_KEEPALIVE_S`` (so a NAT or the gateway does not drop it while idle), and a transport
  that died is dialed again in the background, so the next connection through the gateway
  pays one channel open (a round trip), not a new transport's TCP, key exchange and
  authentication. Bounded: a gateway through which no channel was opened for
  ``SSH_IDLE_CLOSE_S`` and that carries none has its transport closed and its keeper ends; at
  most ``SSH_TRANSPORTS_KEPT`` transports are kept (the least recently used idle one goes
  first). :func:`close_all_transports` ends the keepers too.
- A second transport for back-to-back use: sshd sets no ``TCP_NODELAY`` on a session without a
  terminal, so its Nagle algorithm holds a small segment while an earlier small one is
  unacknowledged. A channel opened right after another channel's close on the same transport
  meets the gateway's CLOSE still in flight: the gateway's confirmation waits for our ACK of that
  CLOSE, and the open takes two round trips instead of one. So each transport's pending opens,
  tunnels winding down (one direction ended) and last channel close are noted
  (:class:`_Activity`); a channel opened while a tunnel winds down on the first transport, or
  within ``SSH_BUSY_ROUND_TRIPS`` round trips (the quickest channel open seen through the
  gateway) of a close there, goes to a second transport, a *spare*, if that one is quiet; the
  first such open dials the spare in the background (it rides the first transport meanwhile).
  When both are busy, the one whose last close is older is used. Bounded: one spare per gateway,
  only where a round trip is at least ``SSH_SPARE_MIN_ROUND_TRIP_S`` (on a LAN, a confirmation
  held one round trip costs less than a second login is worth), closed with its first transport
  (idle, trimmed, :func:`close_all_transports`); a spare that died is dropped and dialed again at
  the next back-to-back open; a failed spare dial is not retried for ``SSH_SPARE_RETRY_S``.
- Host keys are checked strictly against ``known_hosts`` (``[host]:port`` for ports other than 22,
  hashed names, ``*``/``?``/``!`` patterns and ``@revoked`` lines understood; ``@cert-authority``
  lines ignored, as paramiko cannot check host certificates). Unknown or mismatched keys raise
  :class:`~gridsock.errors.AuthError` before any authentication is attempted.
"""
from __future__ import annotations

import getpass
import hmac
import ipaddress
import itertools
import logging
import os
import re
import select
import socket
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Optional, cast

import gevent
import gevent.socket
import paramiko

from ..errors import AuthError, ConfigError, ConnectError, GridsockError

__all__ = [
    "SSH_CONNECT_TIMEOUT_S",
    "SSH_KEEPALIVE_S",
    "SSH_IDLE_CLOSE_S",
    "SSH_TRANSPORTS_KEPT",
    "KEEPER_COUNTERS",
    "SSHGateway",
    "open_ssh_tunnel",
    "close_all_transports",
]

logger = logging.getLogger(__name__)

SSH_CONNECT_TIMEOUT_S = 10.0
SSH_DEFAULT_PORT = 22
PUMP_CHUNK_BYTES = 64 * 1024  # two SSH packets' worth (OpenSSH's max packet is 32 KiB)
DEFAULT_KNOWN_HOSTS = "~/.ssh/known_hosts"
# Tried in this order when no key_filename is given (as ssh does; DSA is gone from paramiko).
DEFAULT_KEY_FILES = ("~/.ssh/id_ed25519", "~/.ssh/id_ecdsa", "~/.ssh/id_rsa")
METHOD = "ssh"
# A kept transport sends an SSH keepalive this often when idle: NATs and firewalls forget an
# idle TCP connection after minutes, and the gateway's ClientAlive checks want a sign of life.
SSH_KEEPALIVE_S = 30.0
# A gateway through which no channel was opened for this long (and that carries none) has its
# transport closed: a node that stopped using it holds no session on the gateway for ever.
SSH_IDLE_CLOSE_S = 600.0
# How often a keeper looks at its transport (dead: dial again; idle too long: close).
SSH_KEEPER_CHECK_S = 2.0
# Transports kept at most (one per gateway and credentials: a node uses a handful).
SSH_TRANSPORTS_KEPT = 16
# A transport on which a channel closed less than this many round trips ago is busy: the gateway's
# CLOSE (itself often held one round trip behind its EOF) may still be unacknowledged there.
SSH_BUSY_ROUND_TRIPS = 2.0
# A spare transport only where a round trip takes at least this long: below it, a confirmation
# held one round trip costs less than a second login on the gateway is worth.
SSH_SPARE_MIN_ROUND_TRIP_S = 0.005
# A spare whose dial failed is not dialed again for this long (the gateway may limit sessions).
SSH_SPARE_RETRY_S = 60.0

_CACHE_LOCK = threading.Lock()
_TRANSPORTS: dict[SSHGateway, paramiko.Transport] = {}
_DIAL_LOCKS: dict[SSHGateway, threading.Lock] = {}
_LAST_USED: dict[SSHGateway, float] = {}  # gateway -> time.monotonic() of its last channel open
_CHANNELS: dict[SSHGateway, int] = {}  # gateway -> tunnels open through it
_KEEPERS: dict[SSHGateway, "_Keeper"] = {}
_SPARES: dict[SSHGateway, paramiko.Transport] = {}  # gateway -> its second transport (see above)
_SPARE_DIALING: set[SSHGateway] = set()
_SPARE_FAILED: dict[SSHGateway, float] = {}  # gateway -> time.monotonic() of its last failed spare dial
_OPEN_S: dict[SSHGateway, float] = {}  # gateway -> its quickest channel open (s): the round trip's estimate
_GENERATION = [0]  # bumped by close_all_transports: a spare dialed across it is not kept
#: What the keepers did: transports dialed again in the background, closed for idleness; spare
#: transports dialed, and channels opened on a spare because the first transport was busy.
KEEPER_COUNTERS: dict[str, int] = {"redialed": 0, "closed_idle": 0, "spares_dialed": 0, "opened_on_spare": 0}
_TUNNEL_IDS = itertools.count(1)

_PORT_RE = re.compile(r"[0-9]{1,5}")


def _default_user() -> str:
    try:
        return getpass.getuser()
    except Exception as exc:  # OSError (3.13+) or KeyError when the uid has no name
        raise ConfigError("cannot tell the local user name: give the gateway as user@host") from exc


def _parse_port(text: str, spec: str) -> int:
    if not _PORT_RE.fullmatch(text) or not 0 < int(text) < 65536:
        raise ConfigError(f"bad port {text!r} in SSH gateway {spec!r}")
    return int(text)


def _is_ipv6(text: str) -> bool:
    try:
        return isinstance(ipaddress.ip_address(text), ipaddress.IPv6Address)
    except ValueError:
        return False


@dataclass(frozen=True)
class SSHGateway:
    """An sshd that will open ``direct-tcpip`` channels for us, and how to log in to it.

    Equal gateways share one SSH transport; the credentials are part of the identity.
    ``known_hosts=None`` means ``~/.ssh/known_hosts``; ``key_filename=None`` means the usual
    ``~/.ssh/id_*`` keys. Raises :class:`ConfigError` when a field is invalid.
    """

    host: str
    port: int = SSH_DEFAULT_PORT
    user: str = field(default_factory=_default_user)
    key_filename: str | None = None
    known_hosts: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.host, str) or not self.host or any(c.isspace() for c in self.host):
            raise ConfigError(f"bad SSH gateway host {self.host!r}")
        if ":" in self.host and not _is_ipv6(self.host):
            raise ConfigError(f"bad SSH gateway host {self.host!r}")
        if isinstance(self.port, bool) or not isinstance(self.port, int) or not 0 < self.port < 65536:
            raise ConfigError(f"bad SSH gateway port {self.port!r}")
        if not isinstance(self.user, str) or not self.user or any(c.isspace() for c in self.user):
            raise ConfigError(f"bad SSH user name {self.user!r}")

    @classmethod
    def parse(
        cls,
        spec: str,
        *,
        key_filename: str | None = None,
        known_hosts: str | None = None,
    ) -> SSHGateway:
        """Parse ``"host"``, ``"user@host"``, ``"user@host:port"``, ``"[v6]:port"`` or a bare v6.

        Returns the :class:`SSHGateway`; raises :class:`ConfigError` on malformed input.
        """
        if not isinstance(spec, str) or not spec or any(c.isspace() for c in spec):
            raise ConfigError(f"bad SSH gateway {spec!r}: expected [user@]host[:port]")
        user, at, hostport = spec.rpartition("@")
        if at and not user:
            raise ConfigError(f"bad SSH gateway {spec!r}: empty user name")
        port = SSH_DEFAULT_PORT
        if hostport.startswith("["):
            host, bracket, rest = hostport[1:].partition("]")
            if not bracket or not _is_ipv6(host):
                raise ConfigError(f"bad SSH gateway {spec!r}: expected [IPv6 address]")
            if rest:
                if not rest.startswith(":"):
                    raise ConfigError(f"bad SSH gateway {spec!r}: junk after ']'")
                port = _parse_port(rest[1:], spec)
        elif hostport.count(":") > 1:  # a bare IPv6 address, which cannot carry a port
            host = hostport
            if not _is_ipv6(host):
                raise ConfigError(f"bad SSH gateway {spec!r}: use [host]:port")
        else:
            host, colon, port_text = hostport.partition(":")
            if colon:
                port = _parse_port(port_text, spec)
        if not host:
            raise ConfigError(f"bad SSH gateway {spec!r}: empty host")
        kwargs = {"user": user} if at else {}
        return cls(host, port, key_filename=key_filename, known_hosts=known_hosts, **kwargs)

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.user}@{host}:{self.port}"

    @property
    def _known_hosts_name(self) -> str:
        # How OpenSSH names this server in known_hosts.
        host = self.host.lower()
        return host if self.port == SSH_DEFAULT_PORT else f"[{host}]:{self.port}"


# --- known_hosts ------------------------------------------------------------------------------


def _pattern_matches(pattern: str, name: str) -> bool:
    if pattern.startswith("|1|"):  # hashed name: HMAC-SHA1 of the name under the stored salt
        try:
            return hmac.compare_digest(paramiko.HostKeys.hash_host(name, pattern), pattern)
        except Exception:  # malformed salt: this entry cannot match anything
            return False
    if "*" not in pattern and "?" not in pattern:
        return pattern.lower() == name
    regex = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.fullmatch(regex, name, re.IGNORECASE) is not None


def _names_match(names: str, name: str) -> bool:
    matched = False
    for pattern in names.split(","):
        if pattern.startswith("!"):
            if _pattern_matches(pattern[1:], name):
                return False  # a negated pattern vetoes the whole line, as in OpenSSH
        elif _pattern_matches(pattern, name):
            matched = True
    return matched


def _known_keys(path: str, name: str) -> tuple[list[paramiko.PKey], list[paramiko.PKey]]:
    """Return (accepted keys, revoked keys) for ``name`` in the known_hosts file ``path``.

    Unreadable lines are skipped (paramiko's own loader gives up on the whole file at the first
    ``@revoked`` or ``@cert-authority`` line). Raises OSError when the file cannot be read.
    """
    accepted: list[paramiko.PKey] = []
    revoked: list[paramiko.PKey] = []
    with open(path, encoding="utf-8", errors="replace") as lines:
        for lineno, line in enumerate(lines, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            marker = None
            if line.startswith("@"):
                marker, _, line = line.partition(" ")
                line = line.lstrip()
                if marker != "@revoked":
                    continue  # @cert-authority: host certificates are not supported here
            fields = line.split(None, 2)
            if len(fields) < 3 or not _names_match(fields[0], name):
                continue
            try:
                entry = paramiko.hostkeys.HostKeyEntry.from_line(" ".join(fields[:3]), lineno)
            except Exception as exc:  # InvalidHostKey, UnknownKeyType...: skip the line
                logger.debug("%s:%d: unusable known_hosts line: %s", path, lineno, exc)
                continue
            if entry is not None:
                (revoked if marker else accepted).append(entry.key)
    return accepted, revoked


def _fingerprint(key: paramiko.PKey) -> str:
    return f"{key.get_name()} {key.fingerprint}"


def _prefer_known_key_types(transport: paramiko.Transport, keys: list[paramiko.PKey]) -> None:
    # Ask for the host key types known_hosts holds first, so that a server with several host keys
    # shows us one we can check (as ssh does with HostKeyAlgorithms).
    options = transport.get_security_options()
    offered = list(options.key_types)
    wanted: list[str] = []
    for key in keys:
        names = [key.get_name()]
        if names == ["ssh-rsa"]:  # one RSA key, three signature algorithms
            names = ["rsa-sha2-512", "rsa-sha2-256", "ssh-rsa"]
        wanted += [n for n in names if n in offered and n not in wanted]
    options.key_types = wanted + [n for n in offered if n not in wanted]


# --- dialing ----------------------------------------------------------------------------------


class _Dial:
    """One attempt to reach ``dest`` through ``gateway``, for error messages and the deadline."""

    def __init__(self, gateway: SSHGateway, dest: str, deadline: float) -> None:
        self.gateway = gateway
        self.dest = dest
        self.deadline = deadline

    def connect_error(self, reason: str, cls: type[ConnectError] = ConnectError) -> ConnectError:
        return cls(f"ssh via {self.gateway} to {self.dest}: {reason}", peer=self.dest, method=METHOD)

    def remaining(self, step: str) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise self.connect_error(f"timed out before {step}")
        return left


def _load_client_keys(gateway: SSHGateway) -> list[tuple[str, paramiko.PKey]]:
    if gateway.key_filename is not None:
        path = os.path.expanduser(gateway.key_filename)
        try:
            return [(path, paramiko.PKey.from_path(path))]
        except (paramiko.PasswordRequiredException, TypeError) as exc:
            # cryptography raises TypeError for an encrypted OpenSSH key and no password
            raise ConfigError(f"SSH key {path} is encrypted; passphrases are not supported") from exc
        except (OSError, ValueError, paramiko.SSHException,
                paramiko.UnknownKeyType) as exc:  # type: ignore[attr-defined]  # (exported since paramiko 3.2; not in the stubs)
            raise ConfigError(f"cannot load SSH key {path}: {exc}") from exc
    keys = []
    for name in DEFAULT_KEY_FILES:
        path = os.path.expanduser(name)
        if not os.path.exists(path):
            continue
        try:
            keys.append((path, paramiko.PKey.from_path(path)))
        except Exception as exc:  # encrypted or unusable: skip it, as ssh -o BatchMode=yes would
            logger.debug("skipping SSH key %s: %s", path, exc)
    return keys


def _authenticate(
    dial: _Dial, transport: paramiko.Transport, keys: list[tuple[str, paramiko.PKey]]
) -> None:
    gateway = dial.gateway
    rejection: Exception | None = None
    for path, key in keys:
        transport.auth_timeout = dial.remaining("authentication")
        try:
            more = transport.auth_publickey(gateway.user, key)
        except paramiko.BadAuthenticationType as exc:
            raise dial.connect_error(
                f"gateway does not accept public keys (it allows {', '.join(exc.allowed_types)})",
                AuthError,
            ) from exc
        except paramiko.AuthenticationException as exc:
            logger.debug("gateway %s rejected key %s: %s", gateway, path, exc)
            rejection = exc
            if time.monotonic() >= dial.deadline:
                raise dial.connect_error("timed out during authentication") from exc
            if not transport.is_active():
                raise dial.connect_error(f"gateway closed the connection during authentication: {exc}") from exc
            continue
        if more:
            raise dial.connect_error(f"gateway wants more authentication ({', '.join(more)})", AuthError)
        return
    raise dial.connect_error(
        f"authentication as {gateway.user!r} failed with key(s) {', '.join(p for p, _ in keys)}", AuthError
    ) from rejection


def _check_host_key(dial: _Dial, transport: paramiko.Transport, known_hosts: str,
                    accepted: list[paramiko.PKey], revoked: list[paramiko.PKey]) -> None:
    key = transport.get_remote_server_key()
    blob = key.asbytes()
    name = dial.gateway._known_hosts_name
    if any(k.asbytes() == blob for k in revoked):
        raise dial.connect_error(
            f"host key of gateway is REVOKED in {known_hosts}: {_fingerprint(key)}", AuthError
        )
    if any(k.asbytes() == blob for k in accepted):
        return
    if accepted:
        raise dial.connect_error(
            f"host key of gateway does not match known_hosts entry {name!r} in {known_hosts} (mismatch: got "
            f"{_fingerprint(key)}, expected {' or '.join(_fingerprint(k) for k in accepted)})",
            AuthError,
        )
    raise dial.connect_error(
        f"host key of gateway not in known_hosts {known_hosts} (no entry {name!r}; got {_fingerprint(key)})",
        AuthError,
    )


class _QuickAckSocket:
    """The gateway's TCP socket as paramiko's transport uses it, acknowledging what it receives
    at once (``TCP_QUICKACK``, which Linux clears again by itself, so it is set after every
    ``recv``). sshd sets no TCP_NODELAY on a session without a terminal: a channel's
    confirmation waits behind its last unacknowledged bytes (the previous channel's close), so
    a delayed ACK of ours (up to 40 ms) would delay the next channel open by as much."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._quickack = getattr(socket, "TCP_QUICKACK", None)

    def recv(self, size: int) -> bytes:
        data = self._sock.recv(size)
        if self._quickack is not None:
            try:
                self._sock.setsockopt(socket.IPPROTO_TCP, self._quickack, 1)
            except OSError:  # closed meanwhile: the next recv says so
                pass
        return data

    def __getattr__(self, name: str):
        return getattr(self._sock, name)


def _dial_transport(dial: _Dial) -> paramiko.Transport:
    """Connect, handshake, check the host key, authenticate. Blocks: run in a worker thread.

    Returns an authenticated transport; raises ConnectError, AuthError or ConfigError.
    """
    gateway = dial.gateway
    known_hosts = os.path.expanduser(gateway.known_hosts or DEFAULT_KNOWN_HOSTS)
    try:
        accepted, revoked = _known_keys(known_hosts, gateway._known_hosts_name)
    except OSError as exc:
        raise dial.connect_error(f"host key of gateway not in known_hosts: cannot read {known_hosts}: {exc}",
                                 AuthError) from exc
    keys = _load_client_keys(gateway)  # a bad key file is a ConfigError: report it before any I/O
    if not keys:
        raise dial.connect_error("no key_filename given and no usable key in ~/.ssh", AuthError)

    timeout = dial.remaining("TCP connect")  # outside the try: ConnectError is an OSError
    try:
        sock = socket.create_connection((gateway.host, gateway.port), timeout=timeout)
    except OSError as exc:  # includes socket.timeout and socket.gaierror
        raise dial.connect_error(f"cannot reach the gateway: {exc or type(exc).__name__}") from exc
    try:
        # SSH messages are small and latency-bound (a channel open is one round trip): without
        # this, Nagle holds each behind the last unacknowledged one (bench: 43 -> 22 ms at 20 ms RTT).
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        transport = paramiko.Transport(cast(socket.socket, _QuickAckSocket(sock)))
    except Exception:
        sock.close()
        raise
    transport.name = f"gridsock-ssh-transport {gateway}"
    try:
        _prefer_known_key_types(transport, accepted)
        transport.banner_timeout = transport.handshake_timeout = dial.remaining("SSH handshake")
        done = threading.Event()
        transport.start_client(event=done)
        if not done.wait(dial.remaining("SSH handshake")):
            raise dial.connect_error("timed out during the SSH handshake")
        if not transport.is_active():
            cause = transport.get_exception() or paramiko.SSHException("negotiation failed")
            raise dial.connect_error(f"SSH handshake failed: {cause or type(cause).__name__}") from cause
        _check_host_key(dial, transport, known_hosts, accepted, revoked)
        _authenticate(dial, transport, keys)
    except BaseException as exc:
        transport.close()
        sock.close()  # Transport.close() skips it when the transport never became active
        # (ConnectError is an OSError too: ours pass through untouched)
        if isinstance(exc, (paramiko.SSHException, OSError, EOFError)) and not isinstance(exc, GridsockError):
            raise dial.connect_error(f"SSH session setup failed: {exc or type(exc).__name__}") from exc
        raise
    logger.info("SSH transport to gateway %s established", gateway)
    return transport


def _get_transport(dial: _Dial) -> tuple[paramiko.Transport, bool]:
    """Return (the cached or a new transport to ``dial.gateway``, whether it is new)."""
    gateway = dial.gateway
    with _CACHE_LOCK:
        dial_lock = _DIAL_LOCKS.setdefault(gateway, threading.Lock())
    if not dial_lock.acquire(timeout=dial.remaining("waiting for another handshake to the gateway")):
        raise dial.connect_error("timed out waiting for another handshake to the gateway")
    try:
        with _CACHE_LOCK:
            transport = _TRANSPORTS.get(gateway)
        if transport is not None and transport.is_active():
            return transport, False
        if transport is not None:
            logger.info("SSH transport to gateway %s is dead; replacing it", gateway)
            _discard_transport(gateway, transport)
        transport = _dial_transport(dial)
        transport.set_keepalive(int(SSH_KEEPALIVE_S))
        with _CACHE_LOCK:
            _TRANSPORTS[gateway] = transport
        _trim()
        return transport, True
    finally:
        dial_lock.release()


def _trim() -> None:
    """At most SSH_TRANSPORTS_KEPT transports: close the least recently used idle ones."""
    with _CACHE_LOCK:
        idle = sorted((g for g in _TRANSPORTS if not _CHANNELS.get(g)), key=lambda g: _LAST_USED.get(g, 0.0))
        excess = idle[:max(0, len(_TRANSPORTS) - SSH_TRANSPORTS_KEPT)]
        closing = [(g, _TRANSPORTS.pop(g), _KEEPERS.pop(g, None), _SPARES.pop(g, None)) for g in excess]
    for gateway, transport, keeper, spare in closing:
        logger.info("SSH transport to gateway %s closed: more than %d kept", gateway, SSH_TRANSPORTS_KEPT)
        if keeper is not None:
            keeper.stop.set()
        transport.close()
        if spare is not None:
            spare.close()


class _Keeper:
    """Keeps one gateway's transport up once used (see the module docstring): a daemon thread."""

    def __init__(self, gateway: SSHGateway) -> None:
        self.gateway = gateway
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name=f"gridsock-ssh-keeper {gateway}", daemon=True)

    def _run(self) -> None:
        gateway = self.gateway
        while not self.stop.wait(SSH_KEEPER_CHECK_S):
            with _CACHE_LOCK:
                transport = _TRANSPORTS.get(gateway)
                spare = _SPARES.get(gateway)
                idle_s = time.monotonic() - _LAST_USED.get(gateway, 0.0)
                busy = bool(_CHANNELS.get(gateway))
                if idle_s > SSH_IDLE_CLOSE_S and not busy:
                    _TRANSPORTS.pop(gateway, None)
                    _SPARES.pop(gateway, None)
                    if _KEEPERS.get(gateway) is self:
                        del _KEEPERS[gateway]
                    KEEPER_COUNTERS["closed_idle"] += 1
                    self.stop.set()
                elif spare is not None and not spare.is_active():
                    del _SPARES[gateway]  # (dialed again at the next back-to-back open)
            if self.stop.is_set():
                for kept in (transport, spare):
                    if kept is not None:
                        logger.info("SSH transport to gateway %s closed: idle for %.0f s", gateway, idle_s)
                        kept.close()
                return
            if transport is not None and transport.is_active():
                continue
            try:  # dead (or dropped): dial again now, not when the next connection needs it
                fresh, _ = _get_transport(_Dial(gateway, "(kept ahead of need)",
                                                time.monotonic() + SSH_CONNECT_TIMEOUT_S))
                if self.stop.is_set():  # close_all_transports() came meanwhile: keep nothing
                    _discard_transport(gateway, fresh)
                    return
                KEEPER_COUNTERS["redialed"] += 1
                logger.info("SSH transport to gateway %s dialed again ahead of need", gateway)
            except Exception as exc:  # ConnectError, AuthError, ConfigError: try again at the next check
                logger.info("SSH transport to gateway %s: dialing again failed: %s", gateway, exc)


class _Activity:
    """What one transport is doing, as far as a channel open on it is concerned (see the module
    docstring): opens awaiting the gateway's answer, tunnels winding down (one direction ended:
    the CLOSE exchange follows), and when a channel on it last closed."""

    __slots__ = ("__weakref__", "opening", "closing", "last_close")

    def __init__(self) -> None:
        self.opening = 0
        self.closing = 0
        self.last_close = float("-inf")  # time.monotonic()


# transport -> its activity; guarded by _CACHE_LOCK (weak: a closed transport's entry goes with it)
_ACTIVITY: "weakref.WeakKeyDictionary[paramiko.Transport, _Activity]" = weakref.WeakKeyDictionary()


def _activity(transport: paramiko.Transport) -> _Activity:
    # (hold _CACHE_LOCK)
    activity = _ACTIVITY.get(transport)
    if activity is None:
        activity = _ACTIVITY[transport] = _Activity()
    return activity


def _choose_transport(gateway: SSHGateway, first: paramiko.Transport) -> paramiko.Transport:
    """The transport a channel through ``gateway`` opens on: ``first`` (the cached one) unless
    it is busy and the spare is not (see the module docstring); starts the spare's dial when
    ``first`` is busy with a close and there is no spare. Marks one open pending on the result
    (:func:`_open_done` ends it)."""
    now = time.monotonic()
    dial_spare = False
    with _CACHE_LOCK:
        chosen = first
        round_trip = _OPEN_S.get(gateway)
        if round_trip is not None and round_trip >= SSH_SPARE_MIN_ROUND_TRIP_S:
            window = SSH_BUSY_ROUND_TRIPS * round_trip
            mine = _activity(first)
            closing = bool(mine.closing) or now - mine.last_close < window
            if mine.opening or closing:
                spare = _SPARES.get(gateway)
                if spare is not None and not spare.is_active():
                    del _SPARES[gateway]  # (the keeper closes nothing: a dead transport has nothing open)
                    spare = None
                if spare is not None:
                    other = _activity(spare)
                    quiet = not other.opening and not other.closing and now - other.last_close >= window
                    if quiet or (other.opening + other.closing, other.last_close) \
                            < (mine.opening + mine.closing, mine.last_close):
                        chosen = spare
                        KEEPER_COUNTERS["opened_on_spare"] += 1
                elif closing and gateway not in _SPARE_DIALING \
                        and now - _SPARE_FAILED.get(gateway, float("-inf")) >= SSH_SPARE_RETRY_S:
                    _SPARE_DIALING.add(gateway)
                    dial_spare = True
        _activity(chosen).opening += 1
    if dial_spare:
        threading.Thread(target=_dial_spare, args=(gateway, _GENERATION[0]),
                         name=f"gridsock-ssh-spare {gateway}", daemon=True).start()
    return chosen


def _open_done(gateway: SSHGateway, transport: paramiko.Transport, open_s: float | None) -> None:
    """An open on ``transport`` ended; ``open_s``: how long it took, if it got an answer."""
    with _CACHE_LOCK:
        activity = _activity(transport)
        activity.opening = max(0, activity.opening - 1)
        if open_s is not None and open_s < _OPEN_S.get(gateway, float("inf")):
            _OPEN_S[gateway] = open_s


def _dial_spare(gateway: SSHGateway, generation: int) -> None:
    """Dial ``gateway``'s spare transport (a daemon thread of its own) and keep it, unless
    close_all_transports() came meanwhile or the first transport is gone."""
    try:
        spare = _dial_transport(_Dial(gateway, "(a second transport)", time.monotonic() + SSH_CONNECT_TIMEOUT_S))
        spare.set_keepalive(int(SSH_KEEPALIVE_S))
    except Exception as exc:  # ConnectError, AuthError, ConfigError: the first transport serves alone
        with _CACHE_LOCK:
            _SPARE_DIALING.discard(gateway)
            _SPARE_FAILED[gateway] = time.monotonic()
        logger.info("SSH gateway %s: a second transport failed: %s", gateway, exc)
        return
    with _CACHE_LOCK:
        _SPARE_DIALING.discard(gateway)
        keep = generation == _GENERATION[0] and gateway in _TRANSPORTS and gateway not in _SPARES
        if keep:
            _SPARES[gateway] = spare
            KEEPER_COUNTERS["spares_dialed"] += 1
    if keep:
        logger.info("SSH transport to gateway %s: a second one, for back-to-back channels", gateway)
    else:
        spare.close()


def _used(gateway: SSHGateway) -> None:
    """A channel was opened through ``gateway``: note it, and keep its transport from now on."""
    with _CACHE_LOCK:
        _LAST_USED[gateway] = time.monotonic()
        _CHANNELS[gateway] = _CHANNELS.get(gateway, 0) + 1
        keeper = _KEEPERS.get(gateway)
        if keeper is not None:
            return
        keeper = _KEEPERS[gateway] = _Keeper(gateway)
    keeper.thread.start()


def _winding_down(transport: paramiko.Transport) -> None:
    """One direction of a tunnel on ``transport`` ended: its channel closes soon (see _released)."""
    with _CACHE_LOCK:
        _activity(transport).closing += 1


def _released(gateway: SSHGateway, transport: paramiko.Transport | None = None, wound: bool = False) -> None:
    """A channel through ``gateway`` closed (on ``transport``, when known: its close time is noted;
    ``wound``: it was counted by _winding_down)."""
    with _CACHE_LOCK:
        _CHANNELS[gateway] = max(0, _CHANNELS.get(gateway, 0) - 1)
        if transport is not None:
            activity = _activity(transport)
            activity.last_close = time.monotonic()
            if wound:
                activity.closing = max(0, activity.closing - 1)


def _discard_transport(gateway: SSHGateway, transport: paramiko.Transport) -> None:
    with _CACHE_LOCK:
        if _TRANSPORTS.get(gateway) is transport:
            del _TRANSPORTS[gateway]
        if _SPARES.get(gateway) is transport:
            del _SPARES[gateway]
    transport.close()


def _open_channel(gateway: SSHGateway, dest_host: str, dest_port: int, deadline: float) -> paramiko.Channel:
    """Open a direct-tcpip channel to dest through gateway. Blocks: run in a worker thread."""
    dial = _Dial(gateway, f"{dest_host}:{dest_port}", deadline)
    while True:
        transport, fresh = _get_transport(dial)
        transport = _choose_transport(gateway, transport)
        open_s = None
        try:
            origin = cast(socket.socket, transport.sock).getsockname()[:2]  # (ours: never a Channel)
        except OSError:
            origin = ("127.0.0.1", 0)
        try:
            timeout = dial.remaining("opening the channel")
            started = time.monotonic()
            channel = transport.open_channel("direct-tcpip", dest_addr=(dest_host, dest_port),
                                             src_addr=origin, timeout=timeout)
            open_s = time.monotonic() - started
            return channel
        except paramiko.ChannelException as exc:
            # The gateway's refusal: 1 administratively prohibited, 2 connect failed, ...
            raise dial.connect_error(f"gateway refused the channel: {exc.text} (code {exc.code})") from exc
        except ConnectError:  # (remaining(): an OSError, but ours, not the transport's)
            raise
        except (paramiko.SSHException, OSError, EOFError) as exc:
            # EOFError/OSError: writing to the gateway failed, before paramiko's reader thread
            # noticed (is_active() may still say True). Such a transport is useless: drop it.
            broken = isinstance(exc, (EOFError, OSError)) or not transport.is_active()
            if broken:
                _discard_transport(gateway, transport)
            if broken and not fresh:
                # The cached transport died under us: dial once more (the next one is fresh).
                logger.info("SSH transport to gateway %s died; redialing", gateway)
                continue
            raise dial.connect_error(f"cannot open a channel: {exc or type(exc).__name__}") from exc
        finally:
            _open_done(gateway, transport, open_s)


def _open_channel_outcome(
    gateway: SSHGateway, dest_host: str, dest_port: int, deadline: float
) -> tuple[paramiko.Channel | None, Exception | None]:
    # Errors are returned, not raised: gevent's threadpool prints a traceback to stderr for every
    # exception that leaves a worker, and ours are ordinary outcomes. The caller raises them.
    try:
        return _open_channel(gateway, dest_host, dest_port, deadline), None
    except Exception as exc:
        return None, exc


# --- the pump ---------------------------------------------------------------------------------


class _PumpOwnsResources(Exception):
    """Internal: a pump thread started, so the pump, not the caller, closes the channel and socket."""


class _Pump:
    """Two threads copying between a socketpair end and a channel; see the module docstring."""

    def __init__(self, channel: paramiko.Channel | None, sock: socket.socket, label: str,
                 gateway: SSHGateway | None = None) -> None:
        self._channel = channel
        self._sock = sock
        self._label = label
        self._gateway = gateway
        self._lock = threading.Lock()
        self._running = 2
        self._aborted = False
        self._wound = False  # counted by _winding_down (the first thread out, once attached)
        # Set once the channel is known: a pump started before its channel is open (its
        # threads start during the channel open's round trip, not after it: starting two
        # threads costs some 0.2 ms on the connect's path) waits for :meth:`attach` or
        # :meth:`cancel` before anything else.
        self._attached = threading.Event()
        if channel is not None:
            self._attached.set()
        self.threads = (
            threading.Thread(target=self._upstream, name=f"gridsock-ssh-pump {label} up", daemon=True),
            threading.Thread(target=self._downstream, name=f"gridsock-ssh-pump {label} down", daemon=True),
        )

    def start(self) -> None:
        """Start both threads. If this raises, the caller still owns the channel and the socket."""
        self.threads[0].start()
        try:
            self.threads[1].start()
        except BaseException as exc:  # e.g. RuntimeError: can't start new thread
            # The upstream thread runs and owns everything now: abort it, it closes all on its way out.
            self._finish(exc)
            raise _PumpOwnsResources from exc

    def attach(self, channel: paramiko.Channel, gateway: SSHGateway | None = None) -> None:
        """The channel of a pump started without one: the threads begin pumping."""
        self._channel = channel
        self._gateway = gateway
        self._attached.set()

    def cancel(self) -> None:
        """No channel after all (the open failed): the threads end and close the socket."""
        self._attached.set()

    def _waited(self) -> paramiko.Channel | None:
        """Wait for the channel (see ``_attached``) and return it; None, the thread done, if
        there is none."""
        self._attached.wait()
        if self._channel is None:
            self._finish(None)
        return self._channel

    def _upstream(self) -> None:
        """Application -> channel; then wait until the application or the other direction is done."""
        channel = self._waited()
        if channel is None:
            return
        try:
            while True:
                data = self._sock.recv(PUMP_CHUNK_BYTES)
                if not data:
                    break
                channel.sendall(data)
            if not self._aborted:
                channel.shutdown_write()
            # POLLHUP: our end is shut both ways (downstream done, or abort) or the app closed its end.
            poller = select.poll()
            poller.register(self._sock, select.POLLHUP)
            poller.poll()  # no timeout: returns only on POLLHUP (or POLLERR/POLLNVAL)
        except (OSError, EOFError, paramiko.SSHException) as exc:
            self._finish(exc)
        else:
            self._finish(None, app_gone=True)

    def _downstream(self) -> None:
        """Channel -> application."""
        channel = self._waited()
        if channel is None:
            return
        try:
            while True:
                data = channel.recv(PUMP_CHUNK_BYTES)
                if not data:
                    break
                self._sock.sendall(data)
            if not channel.eof_received and not self._aborted:
                raise ConnectionResetError("channel closed without EOF (gateway connection lost?)")
            # Counted before the application sees the end: its next open may come at once.
            self._wind_down()
            self._sock.shutdown(socket.SHUT_WR)
        except (OSError, EOFError, paramiko.SSHException) as exc:
            self._finish(exc)
        else:
            self._finish(None)

    def _wind_down(self) -> None:
        """Count the tunnel winding down on its transport, once (see _winding_down): the CLOSE
        exchange follows soon, and a channel opened meanwhile would wait behind it. Noted when
        the first direction ends, not when the channel closes: the application's next open may
        come first."""
        with self._lock:
            wind = not self._wound and self._gateway is not None and self._channel is not None
            self._wound = self._wound or wind
        if wind:
            _winding_down(cast(paramiko.Channel, self._channel).get_transport())

    def _finish(self, exc: BaseException | None, app_gone: bool = False) -> None:
        with self._lock:
            self._running -= 1
            last = self._running == 0
            abort = not last and not self._aborted and (exc is not None or app_gone)
            if abort:
                self._aborted = True
        if not last:
            self._wind_down()
        if exc is not None:
            logger.debug("tunnel %s: %s: %s", self._label, threading.current_thread().name, exc)
        if abort:
            logger.debug("tunnel %s: aborting", self._label)
            try:
                self._sock.shutdown(socket.SHUT_RDWR)  # wakes a recv/send/poll in the other thread
            except OSError:
                pass
            self._close_channel()  # wakes a channel recv/sendall in the other thread
        if last:
            self._close_channel()
            self._sock.close()
            if self._gateway is not None:
                _released(self._gateway, self._channel.get_transport() if self._channel is not None else None,
                          self._wound)
            logger.debug("tunnel %s closed", self._label)

    def _close_channel(self) -> None:
        if self._channel is None:  # (a pump cancelled before it had one)
            return
        try:
            self._channel.close()
        except (OSError, EOFError, paramiko.SSHException) as exc:
            logger.debug("tunnel %s: closing the channel: %s", self._label, exc)


# --- public API -------------------------------------------------------------------------------


def open_ssh_tunnel(
    gateway: SSHGateway,
    dest_host: str,
    dest_port: int,
    *,
    timeout: float = SSH_CONNECT_TIMEOUT_S,
) -> gevent.socket.socket:
    """Open a TCP connection to ``dest_host:dest_port`` as seen from ``gateway``.

    Blocks the calling greenlet only (the SSH work runs in gevent's threadpool). ``timeout`` bounds
    the whole setup: TCP connect, handshake, authentication and channel open.

    Returns a connected stream :class:`gevent.socket.socket` (an ``AF_UNIX`` socketpair end, so
    TCP socket options do not apply); ``shutdown(SHUT_WR)`` is forwarded as EOF, and closing it
    closes the channel.

    Raises :class:`AuthError` (host key unknown or mismatched, authentication refused),
    :class:`ConnectError` (gateway unreachable, timeout, channel refused by the gateway) or
    :class:`ConfigError` (bad arguments, unusable key file).
    """
    if not isinstance(gateway, SSHGateway):
        raise ConfigError(f"gateway must be an SSHGateway, not {type(gateway).__name__}")
    if not isinstance(dest_host, str) or not dest_host:
        raise ConfigError(f"bad destination host {dest_host!r}")
    if isinstance(dest_port, bool) or not isinstance(dest_port, int) or not 0 < dest_port < 65536:
        raise ConfigError(f"bad destination port {dest_port!r}")
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise ConfigError(f"bad timeout {timeout!r}")

    deadline = time.monotonic() + timeout
    pool = gevent.get_hub().threadpool
    result = pool.spawn(_open_channel_outcome, gateway, dest_host, dest_port, deadline)
    # The pump's threads start while the channel opens (a round trip to the gateway), not after
    # it; they wait for the channel (_Pump.attach) or for its failure (_Pump.cancel).
    pump: _Pump | None = None
    app_end: socket.socket | None = None
    try:
        app_end, pump_end = socket.socketpair()
        label = f"#{next(_TUNNEL_IDS)} {gateway}->{dest_host}:{dest_port}"
        pump = _Pump(None, pump_end, label)
        try:
            pump.start()
        except _PumpOwnsResources as exc:  # one thread runs: cancelled (below), it closes pump_end
            assert exc.__cause__ is not None  # (always raised "from" the pump's own error)
            raise exc.__cause__ from None
        except BaseException:
            pump_end.close()
            pump = None
            raise
        channel, error = cast("tuple[Optional[paramiko.Channel], Optional[Exception]]", result.get())
    except BaseException:
        if pump is not None:
            pump.cancel()
        if app_end is not None:
            app_end.close()
        if not result.ready():  # we were killed or timed out while the worker still runs
            def close_late(res, pool=pool):
                if res.successful() and res.value[0] is not None:
                    pool.spawn(res.value[0].close)
            result.rawlink(close_late)
        elif result.successful():  # (the channel opened, but the pump failed to start)
            late = result.value
            if late is not None and late[0] is not None:
                pool.spawn(late[0].close)
        raise
    if error is not None:
        pump.cancel()
        app_end.close()
        try:
            raise error
        finally:
            del error  # no reference cycle through the traceback
    assert channel is not None  # (an outcome holds a channel or an error)
    _used(gateway)
    pump.attach(channel, gateway)
    logger.debug("tunnel %s open", label)
    return gevent.socket.socket(app_end.family, app_end.type, app_end.proto, fileno=app_end.detach())


def close_all_transports() -> None:
    """Close every cached SSH transport (spares included), and with them every tunnel that runs
    over them; the keepers end (nothing is dialed again until a channel is opened anew).

    Meant for tests and shutdown. A handshake running concurrently may still add a transport.
    Blocks the calling greenlet only.
    """
    with _CACHE_LOCK:
        transports = list(_TRANSPORTS.values()) + list(_SPARES.values())
        _TRANSPORTS.clear()
        _SPARES.clear()
        keepers = list(_KEEPERS.values())
        _KEEPERS.clear()
        _LAST_USED.clear()
        _SPARE_FAILED.clear()
        _OPEN_S.clear()
        _GENERATION[0] += 1
    for keeper in keepers:
        keeper.stop.set()
    if not transports:
        return

    def close_them() -> None:
        for transport in transports:
            transport.close()

    gevent.get_hub().threadpool.apply(close_them)
