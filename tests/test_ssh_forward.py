"""gridsock.bootstrap.sshforward against a real OpenSSH sshd on 127.0.0.1 (no root needed).

Remote forwards (``tcpip-forward``) through the sshd: connections to the forwarded port reach
the accept callback as sockets, in order and with half-closes; a rendez-vous node fed by the
forwarder enrolls and links a leader whose session names the forwarded port (mutual TLS as
always); a transport that breaks is opened again with its forwards on the same port; an unknown
host key and a refused forward are reported and retried, never accepted. One-use forwards
(``open_remote_listener``) accept, time out, are refused and are cancelled.
"""
from __future__ import annotations

import dataclasses
import getpass
import hashlib
import os
import shutil
import socket
import subprocess
import threading
import time

import gevent
import gevent.event
import gevent.server
import gevent.socket
import pytest

from gridsock.bootstrap.rendezvous import RendezvousNode
from gridsock.bootstrap.sshforward import RemoteForward, SSHForwarder, open_remote_listener
from gridsock.bootstrap.sshtunnel import SSHGateway, close_all_transports
from gridsock.errors import ConfigError, ConnectError
from gridsock.node import Node
from gridsock.session import create_session
from gridsock.testing.tcprelay import CuttableRelay

pytestmark = [pytest.mark.timeout(60), pytest.mark.filterwarnings("error")]

SSHD = "/usr/sbin/sshd"
SSHD_READY_TIMEOUT_S = 10.0
# Bounds on waits that take milliseconds on loopback: they only stop a broken test from hanging.
UP_TIMEOUT_S = 20.0
JOIN_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 10.0
CHUNK = 64 * 1024
PAYLOAD_BYTES = 2 * 1024 * 1024
# Fast retries for the tests that break things (the defaults are seconds).
FAST = {"retry_initial_s": 0.05, "retry_max_s": 0.5, "probe_s": 0.5, "dead_s": 5.0}

if not (os.path.exists(SSHD) and shutil.which("ssh-keygen")):
    pytest.skip("needs OpenSSH's sshd and ssh-keygen", allow_module_level=True)


def keygen(path):
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", path.name, "-f", str(path)],
                   check=True, stdin=subprocess.DEVNULL)
    return path


def public_key(path) -> str:
    return " ".join((path.parent / (path.name + ".pub")).read_text().split()[:2])


class Sshd:
    """A real sshd on 127.0.0.1 that allows remote forwarding, for this process's user."""

    def __init__(self, root):
        self.root = root
        self.host_key = keygen(root / "ssh_host_ed25519_key")
        self.client_key = keygen(root / "client_ed25519")
        (root / "authorized_keys").write_text(public_key(self.client_key) + "\n")
        self.known_hosts = root / "known_hosts"
        self.lines = []
        self.proc = None
        self.port = None

    def start(self):
        if os.geteuid() == 0:
            os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # sshd's privilege separation directory
        for _attempt in range(3):  # the free port we picked may be taken before sshd binds it
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", 0))
                self.port = probe.getsockname()[1]
            config = self.root / "sshd_config"
            config.write_text(
                f"ListenAddress 127.0.0.1\nPort {self.port}\nHostKey {self.host_key}\n"
                f"PidFile {self.root / 'sshd.pid'}\nAuthorizedKeysFile {self.root / 'authorized_keys'}\n"
                "AllowTcpForwarding yes\nGatewayPorts clientspecified\nPermitRootLogin prohibit-password\n"
                "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n"
                "UseDNS no\nLogLevel VERBOSE\n"
            )
            self.proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)], stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            ready = threading.Event()
            self.drain = threading.Thread(target=self._drain, args=(ready,), daemon=True, name="test-sshd-stderr")
            self.drain.start()
            ready.wait(SSHD_READY_TIMEOUT_S)
            if self.proc.poll() is None and any(b"Server listening on" in line for line in self.lines):
                self.known_hosts.write_text(f"[127.0.0.1]:{self.port} {public_key(self.host_key)}\n")
                return
            self.stop()
            if not any(b"Address already in use" in line for line in self.lines):
                break
        raise RuntimeError("sshd did not start:\n" + b"".join(self.lines).decode(errors="replace"))

    def _drain(self, ready):
        for line in self.proc.stderr:
            self.lines.append(line)
            if b"Server listening on" in line:
                ready.set()
        self.proc.stderr.close()
        ready.set()

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.drain.join(10)

    def gateway(self, port=None, known_hosts=None) -> SSHGateway:
        """A gateway to this sshd (or to a relay to it at ``port``: its known_hosts names that port)."""
        if port is not None and known_hosts is None:
            known_hosts = self.root / f"known_hosts-{port}"
            known_hosts.write_text(f"[127.0.0.1]:{port} {public_key(self.host_key)}\n")
        return SSHGateway("127.0.0.1", port or self.port, user=getpass.getuser(),
                          key_filename=str(self.client_key), known_hosts=str(known_hosts or self.known_hosts))


def echo(sock, origin, origins):
    """Echo until EOF, then a trailer with the SHA-256 of what came, then close."""
    origins.append(origin)
    digest = hashlib.sha256()
    with sock:
        while True:
            data = sock.recv(CHUNK)
            if not data:
                break
            digest.update(data)
            sock.sendall(data)
        sock.sendall(b"EOF " + digest.hexdigest().encode())


def echo_accept(origins):
    return lambda sock, origin: gevent.spawn(echo, sock, origin, origins)


def wait_up(forwarder, timeout=UP_TIMEOUT_S) -> bool:
    return gevent.get_hub().threadpool.apply(forwarder.wait_up, (timeout,))


def wait_until(predicate, what, timeout=UP_TIMEOUT_S):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not {what} after {timeout} s")
        gevent.sleep(0.02)  # polling a condition, bounded by the deadline (not a readiness sleep)


def round_trip(port, payload=b"x" * PAYLOAD_BYTES):
    """Send payload to 127.0.0.1:port, half-close, read to EOF; check the echo and its trailer."""
    sock = gevent.socket.create_connection(("127.0.0.1", port), timeout=UP_TIMEOUT_S)
    with sock:
        def writer():
            for start in range(0, len(payload), CHUNK):
                sock.sendall(payload[start:start + CHUNK])
            sock.shutdown(socket.SHUT_WR)

        def reader():
            chunks = []
            while True:
                data = sock.recv(CHUNK)
                if not data:
                    return b"".join(chunks)
                chunks.append(data)

        w, r = gevent.spawn(writer), gevent.spawn(reader)
        gevent.joinall([w, r], raise_error=True)
    assert r.value == payload + b"EOF " + hashlib.sha256(payload).hexdigest().encode()


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    server = Sshd(tmp_path_factory.mktemp("sshd"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def forwarders():
    started = []
    yield started
    for forwarder in started:
        forwarder.stop()
    for forwarder in started:
        assert gevent.get_hub().threadpool.apply(forwarder.join, (STOP_TIMEOUT_S,)), "forwarder threads still run"


# --- parsing ----------------------------------------------------------------------------------


@pytest.mark.parametrize("spec, gateway, bind_host, bind_port", [
    ("root@fe:2222=0.0.0.0:7700", "root@fe:2222", "0.0.0.0", 7700),
    ("root@fe=10.1.0.1:7700", "root@fe:22", "10.1.0.1", 7700),
    ("u@fe=7700", "u@fe:22", "localhost", 7700),
    ("u@fe=:0", "u@fe:22", "", 0),
    ("u@[::1]:22=[::]:7700", "u@[::1]:22", "::", 7700),
])
def test_parse(spec, gateway, bind_host, bind_port):
    forward = RemoteForward.parse(spec, key_filename="/k", known_hosts="/kh")
    assert (str(forward.gateway), forward.bind_host, forward.bind_port) == (gateway, bind_host, bind_port)
    assert forward.gateway.key_filename == "/k" and forward.gateway.known_hosts == "/kh"
    assert RemoteForward.parse(str(forward), key_filename="/k", known_hosts="/kh") == forward


@pytest.mark.parametrize("spec", ["root@fe", "root@fe=", "root@fe=host:", "root@fe=70000", "root@fe=::1:7700",
                                  "root@fe=[nope]:1", "=1", "root@fe:x=1", "root@fe=a b:1"])
def test_parse_rejects(spec):
    with pytest.raises(ConfigError):
        RemoteForward.parse(spec)


def test_forwarder_rejects_bad_arguments(sshd):
    with pytest.raises(ConfigError):
        SSHForwarder([], lambda s, a: None)
    forward = RemoteForward(sshd.gateway(), "127.0.0.1", 0)
    with pytest.raises(ConfigError):
        SSHForwarder([forward, forward], lambda s, a: None)


# --- forwarding -------------------------------------------------------------------------------


def test_forwarded_connections_reach_accept(sshd, forwarders):
    origins = []
    forwarder = SSHForwarder([RemoteForward(sshd.gateway(), "127.0.0.1", 0)], echo_accept(origins)).start()
    forwarders.append(forwarder)
    assert wait_up(forwarder), forwarder.status()
    (port,) = forwarder.ports().values()
    assert port != 0
    gevent.joinall([gevent.spawn(round_trip, port) for _ in range(3)], raise_error=True)
    assert len(origins) == 3 and all(host == "127.0.0.1" for host, _ in origins)
    (row,) = forwarder.status()
    assert (row["state"], row["accepted"], row["opened"], row["bind_port"]) == ("up", 3, 1, port)


def test_rendezvous_through_forward(sshd, forwarders, tmp_path):
    """A leader whose session names the forwarded port enrolls and joins through it (mutual
    TLS over the forwarded channel); the rendez-vous node sees it come from the gateway's view."""
    session = create_session(tmp_path / "session", "127.0.0.1:1")
    rv = RendezvousNode(session, listen_address="127.0.0.1:0", control="").start()
    nodes = []
    try:
        forwarder = SSHForwarder([RemoteForward(sshd.gateway(), "127.0.0.1", 0)], rv.handle_connection).start()
        forwarders.append(forwarder)
        assert wait_up(forwarder), forwarder.status()
        (port,) = forwarder.ports().values()
        via_forward = dataclasses.replace(session, rendezvous_host="127.0.0.1", rendezvous_port=port)
        for name in ("L1", "L2"):
            nodes.append(Node(via_forward, name, cluster=name, listen_address="127.0.0.1:0", control="").start())
        for node in nodes:
            assert node.wait_joined(JOIN_TIMEOUT_S), f"{node.name} did not join"
        entries = {e["name"]: e for e in nodes[0].wait_directory(present=["L1", "L2"], timeout=JOIN_TIMEOUT_S)}
        assert set(entries) == {"L1", "L2"}
        assert nodes[0].ping("L2").route_there == ("L1", "rendezvous", "L2")
        assert {e.name: e.observed.split(":")[0] for e in rv.directory} == {"L1": "127.0.0.1", "L2": "127.0.0.1"}
        assert forwarder.status()[0]["accepted"] >= 2  # one enrollment and one link each, at least
    finally:
        for node in nodes:
            node.stop()
        rv.stop()


def test_broken_transport_is_opened_again(sshd, forwarders):
    relay = CuttableRelay(sshd.port)
    try:
        origins = []
        forwarder = SSHForwarder([RemoteForward(sshd.gateway(port=relay.port), "127.0.0.1", 0)],
                                 echo_accept(origins), **FAST).start()
        forwarders.append(forwarder)
        assert wait_up(forwarder), forwarder.status()
        (port,) = forwarder.ports().values()
        round_trip(port)
        relay.cut()
        # Down, then up again: the same port on the gateway, a second transport.
        wait_until(lambda: forwarder.status()[0]["opened"] == 2 and forwarder.up, "opened again")
        assert list(forwarder.ports().values()) == [port]
        round_trip(port)
        assert forwarder.status()[0]["last_error"]
    finally:
        relay.stop()


def test_unknown_host_key_is_never_accepted(sshd, forwarders, tmp_path):
    stranger = keygen(tmp_path / "stranger")
    known = tmp_path / "known_hosts"
    known.write_text(f"[127.0.0.1]:{sshd.port} {public_key(stranger)}\n")
    forwarder = SSHForwarder([RemoteForward(sshd.gateway(known_hosts=known), "127.0.0.1", 0)],
                             lambda s, a: s.close(), **FAST).start()
    forwarders.append(forwarder)
    wait_until(lambda: forwarder.status()[0]["last_error"], "reported")
    row = forwarder.status()[0]
    assert row["state"] in ("down", "connecting") and row["opened"] == 0
    assert "does not match known_hosts" in row["last_error"]
    assert not forwarder.up


def test_refused_forward_is_reported_and_retried(sshd, forwarders):
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    taken = holder.getsockname()[1]
    origins = []
    forwarder = SSHForwarder([RemoteForward(sshd.gateway(), "127.0.0.1", taken)], echo_accept(origins), **FAST).start()
    forwarders.append(forwarder)
    try:
        wait_until(lambda: forwarder.status()[0]["last_error"], "reported")
        assert "denied" in forwarder.status()[0]["last_error"]
        assert not forwarder.up
    finally:
        holder.close()  # the port is free now: the next attempt gets it
    assert wait_up(forwarder), forwarder.status()
    round_trip(taken)


# --- one-use forwards ---------------------------------------------------------------------------


@pytest.fixture
def kept_transports():
    yield
    close_all_transports()


def serve_one(listener, origins):
    sock, origin = listener.accept(UP_TIMEOUT_S)
    echo(sock, origin, origins)


def test_remote_listener_accepts_then_is_cancelled(sshd, kept_transports):
    listener = open_remote_listener(sshd.gateway(), "127.0.0.1")
    origins = []
    try:
        assert listener.port != 0
        server = gevent.spawn(serve_one, listener, origins)
        round_trip(listener.port)
        server.get(timeout=UP_TIMEOUT_S)
        assert [host for host, _ in origins] == ["127.0.0.1"]
        with pytest.raises(TimeoutError):
            listener.accept(0.1)
    finally:
        listener.close()
    with pytest.raises(ConnectError):
        listener.accept(0.1)

    def refused():
        try:
            gevent.socket.create_connection(("127.0.0.1", listener.port), timeout=UP_TIMEOUT_S).close()
        except ConnectionRefusedError:
            return True
        return False

    wait_until(refused, "cancelled on the gateway")  # (the cancel is sent without waiting for sshd)


def test_two_listeners_share_the_kept_transport(sshd, kept_transports):
    first = open_remote_listener(sshd.gateway(), "127.0.0.1")
    second = open_remote_listener(sshd.gateway(), "127.0.0.1")
    origins = []
    try:
        assert first._transport is second._transport and first.port != second.port
        servers = [gevent.spawn(serve_one, listener, origins) for listener in (second, first)]
        gevent.joinall([gevent.spawn(round_trip, port) for port in (first.port, second.port)], raise_error=True)
        gevent.joinall(servers, raise_error=True)
        assert len(origins) == 2
    finally:
        first.close()
        second.close()


def test_remote_listener_refused(sshd, kept_transports):
    with pytest.raises(ConnectError, match="refused the remote forward"):
        open_remote_listener(sshd.gateway(), "192.0.2.1")  # not an address of the gateway


# --- the ssh method's remote mode -----------------------------------------------------------------


def test_ssh_method_remote_forward_passes_check_method(sshd, kept_transports, tmp_path):
    """Server S (cluster A, its uplink through the sshd) answers ``ssh(remote=...)`` with a
    one-use forward on its own gateway; client C (cluster B) dials it: the conformance suite."""
    from gridsock.testing.methods import CASES, LocalServer, check_method

    session = create_session(tmp_path / "session", "127.0.0.1:1")
    rv = RendezvousNode(session, listen_address="127.0.0.1:0", control="").start()
    session = dataclasses.replace(session, rendezvous_port=rv.address.port)
    gateway = sshd.gateway()
    nodes = []
    try:
        server = Node(session, "S", cluster="A", listen_address="127.0.0.1:0", control="", ssh_gateway=gateway,
                      ssh_key=gateway.key_filename, ssh_known_hosts=gateway.known_hosts).start()
        nodes.append(server)
        client = Node(session, "C", cluster="B", listen_address="127.0.0.1:0", control="").start()
        nodes.append(client)
        for node in nodes:
            assert node.wait_joined(JOIN_TIMEOUT_S), f"{node.name} did not join"
        client.wait_directory(present=["S", "C"], timeout=JOIN_TIMEOUT_S)
        remote = f"ssh(bind=127.0.0.1,remote={gateway.user}@127.0.0.1:{sshd.port})"
        handle = LocalServer(server)
        try:
            assert check_method(client, handle, "tls/" + remote, port=6200, refused_stack=remote) == \
                {case: "ok" for case in CASES}
        finally:
            handle.close()
        # A gateway that is not the server's own: refused, the server logs in nowhere.
        other = f"tls/ssh(bind=127.0.0.1,remote=someone@127.0.0.1:{sshd.port})"
        handle = LocalServer(server)
        try:
            handle.serve_echo(6210)
            with pytest.raises(ConnectError, match="not an SSH gateway of S"):
                client.open_stream("S", 6210, stack=other)
        finally:
            handle.close()
    finally:
        for node in reversed(nodes):
            node.stop()
        rv.stop()
