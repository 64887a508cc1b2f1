"""gridsock.bootstrap.sshtunnel against a real OpenSSH sshd listening on 127.0.0.1."""
from __future__ import annotations

import datetime
import getpass
import hashlib
import os
import pickle
import shutil
import socket
import ssl
import subprocess
import threading
import time

import gevent
import gevent.event
import gevent.server
import gevent.socket
import gevent.ssl
import paramiko
import pytest

from gridsock.bootstrap import sshtunnel
from gridsock.bootstrap.sshtunnel import (
    KEEPER_COUNTERS,
    SSHGateway,
    close_all_transports,
    open_ssh_tunnel,
)
from gridsock.errors import AuthError, ConfigError, ConnectError, GridsockError
from gridsock.testing.tcprelay import CuttableRelay

pytestmark = [pytest.mark.timeout(60), pytest.mark.filterwarnings("error")]

SSHD = "/usr/sbin/sshd"
SSHD_READY_TIMEOUT_S = 10.0
JOIN_TIMEOUT_S = 10.0
BULK_BYTES = 8 * 1024 * 1024
CHUNK = 64 * 1024

if not (os.path.exists(SSHD) and shutil.which("ssh-keygen")):
    pytest.skip("needs OpenSSH's sshd and ssh-keygen", allow_module_level=True)


# --- helpers ----------------------------------------------------------------------------------


def keygen(path, kind="ed25519"):
    subprocess.run(
        ["ssh-keygen", "-q", "-t", kind, "-N", "", "-C", path.name, "-f", str(path)],
        check=True, stdin=subprocess.DEVNULL,
    )
    return path


def public_key(path) -> str:
    """'type base64' of the key at path (without the comment)."""
    return " ".join((path.parent / (path.name + ".pub")).read_text().split()[:2])


def refused_port():
    """A bound, non-listening socket: connecting to its port is refused, and nobody can take it."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    return sock


def pump_threads():
    return {t for t in threading.enumerate() if t.name.startswith("gridsock-ssh-pump")}


def join_all(threads):
    deadline = time.monotonic() + JOIN_TIMEOUT_S
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    alive = [t.name for t in threads if t.is_alive()]
    assert not alive, f"threads still running: {alive}"


def open_fds():
    return len(os.listdir("/proc/self/fd"))


def until(condition, timeout=JOIN_TIMEOUT_S):
    """Wait (the hub running) until condition() is true; return whether it became true in time."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        gevent.sleep(0.01)
    return True


def recv_all(sock):
    chunks = []
    while True:
        data = sock.recv(CHUNK)
        if not data:
            return b"".join(chunks)
        chunks.append(data)


def exchange(sock, payload):
    """Send payload and half-close from one greenlet while another reads to EOF; return what came back."""
    def writer():
        view = memoryview(payload)
        for start in range(0, len(view), CHUNK):
            sock.sendall(view[start:start + CHUNK])
        sock.shutdown(socket.SHUT_WR)

    writing = gevent.spawn(writer)
    reading = gevent.spawn(recv_all, sock)
    gevent.joinall([writing, reading], raise_error=True)
    return reading.value


def trailer(payload):
    return b"EOF-SEEN " + hashlib.sha256(payload).hexdigest().encode()


# --- servers ----------------------------------------------------------------------------------


class Sshd:
    """A real sshd, with a client key it accepts, a key it does not, and a restricted one."""

    def __init__(self, root):
        self.root = root
        self.host_key = keygen(root / "ssh_host_ed25519_key")
        self.client_key = keygen(root / "client_ed25519")
        self.rsa_key = keygen(root / "client_rsa", "rsa")
        self.stranger_key = keygen(root / "stranger_ed25519")
        self.restricted_key = keygen(root / "restricted_ed25519")
        (root / "authorized_keys").write_text(
            f"{public_key(self.client_key)}\n"
            f"{public_key(self.rsa_key)}\n"
            f'permitopen="127.0.0.1:1" {public_key(self.restricted_key)}\n'
        )
        self.log = []
        self.proc = None
        self.port = None

    def start(self):
        if os.geteuid() == 0:
            os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # sshd's privilege separation dir
        for _attempt in range(3):  # the free port we picked may be taken before sshd binds it
            probe = socket.socket()
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
            probe.close()
            config = self.root / "sshd_config"
            config.write_text(
                f"ListenAddress 127.0.0.1\n"
                f"Port {self.port}\n"
                f"HostKey {self.host_key}\n"
                f"PidFile {self.root / 'sshd.pid'}\n"
                f"AuthorizedKeysFile {self.root / 'authorized_keys'}\n"
                "AllowTcpForwarding yes\n"
                "PermitRootLogin prohibit-password\n"
                "PasswordAuthentication no\n"
                "KbdInteractiveAuthentication no\n"
                "UsePAM no\n"
                "StrictModes no\n"
                "UseDNS no\n"
                "LogLevel VERBOSE\n"
            )
            self.proc = subprocess.Popen(
                [SSHD, "-D", "-e", "-f", str(config)],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            )
            ready = threading.Event()
            # Drain stderr for sshd's whole life, or it would block once the pipe fills.
            self.drain = threading.Thread(target=self._drain, args=(self.proc, ready), daemon=True,
                                          name="test-sshd-stderr")
            self.drain.start()
            ready.wait(SSHD_READY_TIMEOUT_S)
            if self.proc.poll() is None and any(b"Server listening on" in line for line in self.log):
                return
            self.stop()
            if not any(b"Address already in use" in line for line in self.log):
                break
        raise RuntimeError("sshd did not start:\n" + b"".join(self.log).decode(errors="replace"))

    def _drain(self, proc, ready):
        for line in proc.stderr:
            self.log.append(line)
            if b"Server listening on" in line:
                ready.set()
        proc.stderr.close()
        ready.set()  # sshd exited: stop waiting (start() then sees it is gone)

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.drain.join(10)

    def known_hosts(self, path, port=None, key=None, host="127.0.0.1"):
        port = self.port if port is None else port
        path.write_text(f"[{host}]:{port} {key or public_key(self.host_key)}\n")
        return str(path)


def echo_handler(sock, _addr):
    """Echo everything; after the client's EOF, send a trailer proving it, then close."""
    digest = hashlib.sha256()
    with sock:
        while True:
            data = sock.recv(CHUNK)
            if not data:
                break
            digest.update(data)
            sock.sendall(data)
        sock.sendall(b"EOF-SEEN " + digest.hexdigest().encode())


def self_signed(tmp_path):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "rendezvous.test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("rendezvous.test")]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return str(cert_path), str(key_path)


# --- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    server = Sshd(tmp_path_factory.mktemp("sshd"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def fresh_transports(monkeypatch):
    # No spare transport unless a test asks for one (setting SSH_SPARE_MIN_ROUND_TRIP_S itself):
    # a channel open on loopback can take 40 ms (3.9's paramiko: the first confirmation behind
    # sshd's Nagle and our delayed ACK), and a spare dialed then is one more TCP connection
    # for the tests that count them.
    monkeypatch.setattr(sshtunnel, "SSH_SPARE_MIN_ROUND_TRIP_S", float("inf"))
    yield
    close_all_transports()


@pytest.fixture
def gateway(sshd, tmp_path):
    return SSHGateway(
        "127.0.0.1", sshd.port, user=getpass.getuser(),
        key_filename=str(sshd.client_key), known_hosts=sshd.known_hosts(tmp_path / "known_hosts"),
    )


@pytest.fixture
def echo_port():
    server = gevent.server.StreamServer(("127.0.0.1", 0), echo_handler)
    server.start()
    yield server.server_port
    server.stop(timeout=5)


@pytest.fixture
def relay(sshd):
    relay = CuttableRelay(sshd.port)
    yield relay
    close_all_transports()
    relay.stop()


@pytest.fixture
def relay_gateway(sshd, relay, tmp_path):
    return SSHGateway(
        "127.0.0.1", relay.port, user=getpass.getuser(),
        key_filename=str(sshd.client_key),
        known_hosts=sshd.known_hosts(tmp_path / "known_hosts_relay", port=relay.port),
    )


# --- SSHGateway -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec, host, port, user",
    [
        ("front", "front", 22, getpass.getuser()),
        ("alice@front", "front", 22, "alice"),
        ("alice@front.example.org:2222", "front.example.org", 2222, "alice"),
        ("[::1]:2222", "::1", 2222, getpass.getuser()),
        ("bob@[fe80::1]", "fe80::1", 22, "bob"),
        ("fe80::1", "fe80::1", 22, getpass.getuser()),
        ("10.0.0.1:22", "10.0.0.1", 22, getpass.getuser()),
    ],
)
def test_parse(spec, host, port, user):
    gateway = SSHGateway.parse(spec, key_filename="/k", known_hosts="/kh")
    assert (gateway.host, gateway.port, gateway.user) == (host, port, user)
    assert (gateway.key_filename, gateway.known_hosts) == ("/k", "/kh")
    assert SSHGateway.parse(str(gateway), key_filename="/k", known_hosts="/kh") == gateway


def test_str():
    assert str(SSHGateway("front", 2222, user="alice")) == "alice@front:2222"
    assert str(SSHGateway("::1", user="alice")) == "alice@[::1]:22"


@pytest.mark.parametrize(
    "spec",
    ["", "@front", "front:", "front:0", "front:65536", "front:22x", "front:-1", "[::1", "[::1]x",
     "[front]:22", "a b", "alice@", "front:22:33x", "[::1]:"],
)
def test_parse_rejects(spec):
    with pytest.raises(ConfigError):
        SSHGateway.parse(spec)


def test_bad_fields_rejected():
    with pytest.raises(ConfigError):
        SSHGateway("front", 0)
    with pytest.raises(ConfigError):
        SSHGateway("", 22)
    with pytest.raises(ConfigError):
        SSHGateway("front", 22, user="")


def test_errors_pickle():
    err = AuthError("host key of gateway x mismatch", peer="h:1", method="ssh")
    back = pickle.loads(pickle.dumps(err))
    assert (type(back), str(back), back.peer, back.method) == (AuthError, str(err), "h:1", "ssh")


# --- tunnels ----------------------------------------------------------------------------------


def test_bulk_both_ways(gateway, echo_port):
    payload = os.urandom(BULK_BYTES)
    with open_ssh_tunnel(gateway, "127.0.0.1", echo_port) as sock:
        assert isinstance(sock, gevent.socket.socket)
        received = exchange(sock, payload)
    assert len(received) == BULK_BYTES + len(trailer(payload))
    assert hashlib.sha256(received[:BULK_BYTES]).digest() == hashlib.sha256(payload).digest()
    assert received[BULK_BYTES:] == trailer(payload)


def test_half_close(gateway, echo_port):
    with open_ssh_tunnel(gateway, "127.0.0.1", echo_port) as sock:
        sock.sendall(b"ping")
        assert sock.recv(4) == b"ping"  # the channel works both ways before the half-close
        sock.shutdown(socket.SHUT_WR)
        # The server only sends its trailer after it saw our EOF; our read side still works.
        assert recv_all(sock) == trailer(b"ping")


def test_rsa_client_key(sshd, gateway, echo_port):
    rsa_gateway = SSHGateway(gateway.host, gateway.port, user=gateway.user,
                             key_filename=str(sshd.rsa_key), known_hosts=gateway.known_hosts)
    with open_ssh_tunnel(rsa_gateway, "127.0.0.1", echo_port) as sock:
        assert exchange(sock, b"rsa") == b"rsa" + trailer(b"rsa")


def test_tls_over_tunnel(gateway, tmp_path):
    cert, key = self_signed(tmp_path)
    server_ctx = gevent.ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert, key)
    client_ctx = gevent.ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_ctx.load_verify_locations(cert)

    def tls_echo(sock, addr):
        with server_ctx.wrap_socket(sock, server_side=True) as tls:
            tls.sendall(tls.recv(100).upper())

    server = gevent.server.StreamServer(("127.0.0.1", 0), tls_echo)
    server.start()
    try:
        raw = open_ssh_tunnel(gateway, "127.0.0.1", server.server_port)
        with client_ctx.wrap_socket(raw, server_hostname="rendezvous.test") as tls:
            tls.sendall(b"hello through ssh")
            assert tls.recv(100) == b"HELLO THROUGH SSH"
    finally:
        server.stop(timeout=5)


def test_tunnels_share_one_transport(relay, relay_gateway, echo_port):
    socks = [open_ssh_tunnel(relay_gateway, "127.0.0.1", echo_port) for _ in range(4)]
    try:
        jobs = [gevent.spawn(exchange, sock, b"tunnel %d" % i) for i, sock in enumerate(socks)]
        gevent.joinall(jobs, raise_error=True)
        for i, done in enumerate(jobs):
            assert done.value == b"tunnel %d" % i + trailer(b"tunnel %d" % i)
    finally:
        for sock in socks:
            sock.close()
    assert relay.accepted == 1  # one TCP connection, one SSH transport, four channels


def test_concurrent_first_opens_share_one_transport(relay, relay_gateway, echo_port):
    opens = [gevent.spawn(open_ssh_tunnel, relay_gateway, "127.0.0.1", echo_port) for _ in range(4)]
    gevent.joinall(opens, raise_error=True)
    for job in opens:
        job.value.close()
    assert relay.accepted == 1


def test_back_to_back_channels_alternate_over_two_transports(monkeypatch, relay, relay_gateway, echo_port):
    # sshd's Nagle holds a channel's confirmation behind the previous channel's CLOSE on the same
    # transport (one round trip more): a channel opened right after a close goes to a second
    # transport. A loopback round trip is too short for that to pay (SSH_SPARE_MIN_ROUND_TRIP_S),
    # so the test lowers that bound and makes every close recent.
    monkeypatch.setattr(sshtunnel, "SSH_SPARE_MIN_ROUND_TRIP_S", 0.0)
    monkeypatch.setattr(sshtunnel, "SSH_BUSY_ROUND_TRIPS", 1e9)
    counters = dict(KEEPER_COUNTERS)

    def delta(name):
        return KEEPER_COUNTERS[name] - counters[name]

    def one(payload):
        before = pump_threads()
        sock = open_ssh_tunnel(relay_gateway, "127.0.0.1", echo_port)
        mine = pump_threads() - before
        with sock:
            assert exchange(sock, payload) == payload + trailer(payload)
        join_all(mine)  # the channel is closed: its transport is busy with that close

    one(b"first")  # the first transport
    assert relay.accepted == 1
    one(b"second")  # right after a close: the spare is dialed, this one rides the first transport
    assert until(lambda: delta("spares_dialed") == 1)
    assert relay.accepted == 2
    assert delta("opened_on_spare") == 0
    for i in range(4):  # the spare (quiet), the first (its close is older), the spare, the first
        one(b"next %d" % i)
    assert delta("opened_on_spare") == 2
    assert relay.accepted == 2  # never a third


def test_concurrent_opens_dial_no_spare(monkeypatch, relay, relay_gateway, echo_port):
    # Only a close makes a spare worth its login: concurrent opens without one share a transport
    # (the bounds lowered as above: this holds on any path).
    monkeypatch.setattr(sshtunnel, "SSH_SPARE_MIN_ROUND_TRIP_S", 0.0)
    monkeypatch.setattr(sshtunnel, "SSH_BUSY_ROUND_TRIPS", 1e9)
    counters = dict(KEEPER_COUNTERS)
    with open_ssh_tunnel(relay_gateway, "127.0.0.1", echo_port):  # (a round trip measured; no close yet)
        opens = [gevent.spawn(open_ssh_tunnel, relay_gateway, "127.0.0.1", echo_port) for _ in range(4)]
        gevent.joinall(opens, raise_error=True)
        for job in opens:
            assert exchange(job.value, b"x") == b"x" + trailer(b"x")
            job.value.close()
    assert relay.accepted == 1
    assert not sshtunnel._SPARE_DIALING
    assert KEEPER_COUNTERS["spares_dialed"] == counters["spares_dialed"]


def test_hub_not_blocked_while_opening(relay, relay_gateway, echo_port):
    # The gateway is reached through a relay served by this very hub: if opening the tunnel
    # blocked the hub, the handshake could not progress and the open would time out.
    ticks = 0
    opened = gevent.event.Event()

    def ticker():
        nonlocal ticks
        while not opened.is_set():
            ticks += 1
            gevent.sleep(0.001)

    ticking = gevent.spawn(ticker)
    try:
        sock = open_ssh_tunnel(relay_gateway, "127.0.0.1", echo_port, timeout=20)
    finally:
        opened.set()
        ticking.join()
    with sock:
        assert exchange(sock, b"x") == b"x" + trailer(b"x")
    assert ticks > 1
    assert relay.accepted == 1


def test_dead_transport_is_replaced(relay, relay_gateway, echo_port):
    with open_ssh_tunnel(relay_gateway, "127.0.0.1", echo_port) as sock:
        assert exchange(sock, b"one") == b"one" + trailer(b"one")
    relay.cut()  # the cached transport's TCP connection dies
    with open_ssh_tunnel(relay_gateway, "127.0.0.1", echo_port) as sock:
        assert exchange(sock, b"two") == b"two" + trailer(b"two")
    assert relay.accepted == 2


def test_transport_loss_ends_tunnel(relay, relay_gateway, echo_port):
    before = pump_threads()
    sock = open_ssh_tunnel(relay_gateway, "127.0.0.1", echo_port)
    mine = pump_threads() - before
    with sock:
        sock.sendall(b"abc")
        assert sock.recv(3) == b"abc"
        relay.cut()
        assert recv_all(sock) == b""  # EOF, not a hang
    join_all(mine)


# --- resources --------------------------------------------------------------------------------


def test_pump_threads_and_fds_released(gateway, echo_port):
    with open_ssh_tunnel(gateway, "127.0.0.1", echo_port) as sock:  # warm up: transport, threadpool
        exchange(sock, b"warm")
    join_all(pump_threads())
    fds = open_fds()

    sock = open_ssh_tunnel(gateway, "127.0.0.1", echo_port)
    mine = pump_threads()
    assert len(mine) == 2
    assert all(t.daemon for t in mine)
    assert exchange(sock, b"data") == b"data" + trailer(b"data")
    sock.close()
    join_all(mine)
    assert open_fds() == fds


def test_close_without_shutdown_ends_pumps(gateway):
    # A peer that never answers and never closes: the tunnel must still go when the app closes it.
    release = gevent.event.Event()
    peer_saw_eof = gevent.event.Event()

    def silent(sock, _addr):
        with sock:
            while sock.recv(CHUNK):
                pass
            peer_saw_eof.set()
            release.wait(30)

    server = gevent.server.StreamServer(("127.0.0.1", 0), silent)
    server.start()
    try:
        before = pump_threads()
        sock = open_ssh_tunnel(gateway, "127.0.0.1", server.server_port)
        mine = pump_threads() - before
        sock.sendall(b"hello")
        sock.close()
        assert peer_saw_eof.wait(10)
        join_all(mine)
    finally:
        release.set()
        server.stop(timeout=5)


def test_close_all_transports_ends_tunnels(gateway, echo_port):
    before = pump_threads()
    sock = open_ssh_tunnel(gateway, "127.0.0.1", echo_port)
    mine = pump_threads() - before
    transports = {t for t in threading.enumerate() if t.name.startswith("gridsock-ssh-transport")}
    assert transports
    with sock:
        close_all_transports()
        assert recv_all(sock) == b""
    join_all(mine)
    join_all(transports)


def test_killed_opener_leaves_no_channel(relay, relay_gateway):
    # The opener is killed mid-handshake; the worker thread still opens the channel: it must be closed.
    accepted = gevent.event.Event()
    finished = gevent.event.Event()

    def watch(sock, _addr):
        accepted.set()
        with sock:
            while sock.recv(CHUNK):
                pass
        finished.set()

    server = gevent.server.StreamServer(("127.0.0.1", 0), watch)
    server.start()
    try:
        before = pump_threads()
        opener = gevent.spawn(open_ssh_tunnel, relay_gateway, "127.0.0.1", server.server_port)
        assert relay.connected.wait(10)
        opener.kill()
        assert accepted.wait(10)
        assert finished.wait(10)  # the orphan channel was closed: the destination saw EOF
        join_all(pump_threads() - before)  # (the pump started beside the open ends, cancelled)
        assert pump_threads() == before
    finally:
        server.stop(timeout=5)


# --- failures ---------------------------------------------------------------------------------


def test_a_failed_open_leaves_no_pump_and_no_descriptor(gateway, echo_port):
    # The pump's threads start beside the channel open; when the gateway refuses the channel
    # they end, and both ends of the socketpair are closed.
    with open_ssh_tunnel(gateway, "127.0.0.1", echo_port) as sock:  # warm up: transport, threadpool
        exchange(sock, b"warm")
    join_all(pump_threads())
    with refused_port() as closed:
        fds = open_fds()
        for _ in range(3):
            with pytest.raises(ConnectError, match="Connect failed"):
                open_ssh_tunnel(gateway, "127.0.0.1", closed.getsockname()[1])
        join_all(pump_threads())
        assert open_fds() == fds
    with open_ssh_tunnel(gateway, "127.0.0.1", echo_port) as sock:  # and the next one works
        assert exchange(sock, b"after") == b"after" + trailer(b"after")


def test_host_key_mismatch(sshd, gateway, tmp_path):
    other = keygen(tmp_path / "other_host_key")
    bad = SSHGateway(gateway.host, gateway.port, user=gateway.user, key_filename=gateway.key_filename,
                     known_hosts=sshd.known_hosts(tmp_path / "kh", key=public_key(other)))
    with pytest.raises(AuthError, match="mismatch") as info:
        open_ssh_tunnel(bad, "127.0.0.1", 9)
    assert type(info.value) is AuthError
    assert info.value.method == "ssh"
    assert not isinstance(info.value.__cause__, GridsockError)


def test_host_key_unknown(sshd, gateway, tmp_path):
    # An entry for the right key but on port 22 does not cover [127.0.0.1]:PORT.
    known = tmp_path / "kh"
    known.write_text(f"127.0.0.1 {public_key(sshd.host_key)}\n")
    bad = SSHGateway(gateway.host, gateway.port, user=gateway.user, key_filename=gateway.key_filename,
                     known_hosts=str(known))
    with pytest.raises(AuthError, match="not in known_hosts"):
        open_ssh_tunnel(bad, "127.0.0.1", 9)


def test_known_hosts_missing(gateway, tmp_path):
    bad = SSHGateway(gateway.host, gateway.port, user=gateway.user, key_filename=gateway.key_filename,
                     known_hosts=str(tmp_path / "nonexistent"))
    with pytest.raises(AuthError, match="not in known_hosts"):
        open_ssh_tunnel(bad, "127.0.0.1", 9)


def test_known_hosts_hashed_and_markers(sshd, gateway, echo_port, tmp_path):
    # OpenSSH files carry hashed names and @-marker lines; paramiko's HostKeys.load chokes on these.
    known = tmp_path / "kh"
    sshd.known_hosts(known)
    subprocess.run(["ssh-keygen", "-q", "-H", "-f", str(known)], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert known.read_text().startswith("|1|")
    other = keygen(tmp_path / "other_host_key")
    known.write_text(
        f"@cert-authority *.example.org {public_key(other)}\n"
        f"@revoked other.example.org {public_key(other)}\n"
        "garbage\n"
        + known.read_text()
    )
    hashed = SSHGateway(gateway.host, gateway.port, user=gateway.user, key_filename=gateway.key_filename,
                        known_hosts=str(known))
    with open_ssh_tunnel(hashed, "127.0.0.1", echo_port) as sock:
        assert exchange(sock, b"h") == b"h" + trailer(b"h")

    close_all_transports()
    with known.open("a") as lines:
        lines.write(f"@revoked [127.0.0.1]:{sshd.port} {public_key(sshd.host_key)}\n")
    with pytest.raises(AuthError, match="REVOKED"):
        open_ssh_tunnel(hashed, "127.0.0.1", echo_port)


def test_unauthorized_client_key(sshd, gateway):
    stranger = SSHGateway(gateway.host, gateway.port, user=gateway.user,
                          key_filename=str(sshd.stranger_key), known_hosts=gateway.known_hosts)
    with pytest.raises(AuthError, match="authentication") as info:
        open_ssh_tunnel(stranger, "127.0.0.1", 9)
    assert type(info.value) is AuthError
    assert isinstance(info.value.__cause__, paramiko.AuthenticationException)


def test_missing_key_file_is_config_error(gateway, tmp_path):
    bad = SSHGateway(gateway.host, gateway.port, user=gateway.user,
                     key_filename=str(tmp_path / "nope"), known_hosts=gateway.known_hosts)
    with pytest.raises(ConfigError):
        open_ssh_tunnel(bad, "127.0.0.1", 9)


def test_encrypted_key_file_is_config_error(gateway, tmp_path):
    locked = tmp_path / "locked_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "secret", "-f", str(locked)],
                   check=True, stdin=subprocess.DEVNULL)
    bad = SSHGateway(gateway.host, gateway.port, user=gateway.user,
                     key_filename=str(locked), known_hosts=gateway.known_hosts)
    with pytest.raises(ConfigError, match="encrypted"):
        open_ssh_tunnel(bad, "127.0.0.1", 9)


def test_destination_closed(gateway):
    with refused_port() as closed:
        port = closed.getsockname()[1]
        with pytest.raises(ConnectError, match="Connect failed") as info:
            open_ssh_tunnel(gateway, "127.0.0.1", port)
    assert type(info.value) is ConnectError
    assert info.value.method == "ssh"
    assert info.value.peer == f"127.0.0.1:{port}"


def test_destination_prohibited(sshd, gateway, echo_port):
    restricted = SSHGateway(gateway.host, gateway.port, user=gateway.user,
                            key_filename=str(sshd.restricted_key), known_hosts=gateway.known_hosts)
    with pytest.raises(ConnectError, match="[Aa]dministratively prohibited") as info:
        open_ssh_tunnel(restricted, "127.0.0.1", echo_port)
    assert type(info.value) is ConnectError


def test_gateway_unreachable(gateway):
    with refused_port() as closed:
        down = SSHGateway("127.0.0.1", closed.getsockname()[1], user=gateway.user,
                          key_filename=gateway.key_filename, known_hosts=gateway.known_hosts)
        with pytest.raises(ConnectError, match="cannot reach") as info:
            open_ssh_tunnel(down, "127.0.0.1", 9)
    assert type(info.value) is ConnectError
    assert isinstance(info.value.__cause__, OSError)


def test_gateway_silent_times_out(sshd, gateway, tmp_path):
    # A listener that never accepts: TCP connects (the kernel's backlog), no SSH banner ever comes.
    with socket.socket() as mute:
        mute.bind(("127.0.0.1", 0))
        mute.listen(1)
        port = mute.getsockname()[1]
        silent = SSHGateway("127.0.0.1", port, user=gateway.user, key_filename=gateway.key_filename,
                            known_hosts=sshd.known_hosts(tmp_path / "kh", port=port))
        # (A hang would be stopped by pytest-timeout; the message says which bound ran out.)
        with pytest.raises(ConnectError, match="timed out") as info:
            open_ssh_tunnel(silent, "127.0.0.1", 9, timeout=0.5)
    assert type(info.value) is ConnectError


def test_bad_arguments(gateway):
    for args in [("127.0.0.1", 0), ("127.0.0.1", 65536), ("", 22), ("127.0.0.1", "22")]:
        with pytest.raises(ConfigError):
            open_ssh_tunnel(gateway, *args)
    with pytest.raises(ConfigError):
        open_ssh_tunnel(gateway, "127.0.0.1", 22, timeout=0)
    with pytest.raises(ConfigError):
        open_ssh_tunnel("root@127.0.0.1", "127.0.0.1", 22)
