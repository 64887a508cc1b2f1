"""Local users kept out: the run directory, the control and agent sockets, and private keys.

Another local user must not be able to catch gridsock's sockets (by making the run directory
first, or a symbolic link, or writing into a directory writable by others), nor talk to a node's
control or agent socket, nor find a node's private key on disk after the node was killed.

The tests run as root and act as other users with ``setpriv``: ``nobody`` (uid 65534) and
:data:`STRANGER_UID`, a uid with no account. Processes print a line when they are ready;
nothing sleeps.
"""
from __future__ import annotations

import json
import os
import pwd
import re
import shutil
import signal
import socket
import ssl
import stat
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
from gevent import ssl as gssl

from gridsock import wire
from gridsock.agentclient import AgentClient
from gridsock.bootstrap.control import ControlServer, call
from gridsock.names import (LocalTrustError, check_private_dir, connect_private, make_private_dir, peer_credentials,
                            run_dir)
from gridsock.session import Identity, Session, create_session, new_node_key
from gridsock.testing.procs import gridsock_argv, stop_process, wait_for_line



def _let_others_traverse_to(path: str) -> None:
    """Give others search (x, not read) permission on the directories above ``path`` that this
    user owns and that lack it, for this process's lifetime: tox makes its work directory
    (``.tox``) 0700, and a process of another user must reach the test interpreter's packages.
    The modes are put back at exit."""
    import atexit

    here = os.path.dirname(os.path.abspath(path))
    while here and here != "/":
        st = os.stat(here)
        if st.st_uid == os.geteuid() and not st.st_mode & 0o001:
            os.chmod(here, stat.S_IMODE(st.st_mode) | 0o011)
            atexit.register(os.chmod, here, stat.S_IMODE(st.st_mode))
        here = os.path.dirname(here)


def _interpreter_runs_as_nobody() -> bool:
    """Whether this interpreter, with gridsock, starts as uid 65534: a pyenv build whose
    libpython lies under root's private home does not (its loader cannot read it); the tests then
    cannot act as another user with it, whatever gridsock does."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        return False
    import gridsock

    _let_others_traverse_to(sys.prefix + "/")
    _let_others_traverse_to(os.path.dirname(gridsock.__file__))
    probe = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c",
                            "import gevent, gridsock.cli"], capture_output=True, timeout=60, cwd="/")
    return probe.returncode == 0


pytestmark = [pytest.mark.timeout(180),
              pytest.mark.skipif(not _interpreter_runs_as_nobody(),
                                 reason="acts as other users: needs root, setpriv, and an interpreter that uid "
                                        "65534 can start (here: the grid-lab Python, 3.11, runs these)")]

# A gridsock process starts (imports included) and joins well within this on loopback.
READY_TIMEOUT_S = 20.0
# A one-shot command or script finishes within this.
COMMAND_TIMEOUT_S = 30.0
# Processes run with warnings as errors and in development mode (as in test_cli).
STRICT_ENV = {"PYTHONWARNINGS": "error", "PYTHONDEVMODE": "1", "PYTHONUNBUFFERED": "1", "PYTHONDONTWRITEBYTECODE": "1"}

NOBODY = pwd.getpwnam("nobody")
# Another local user, with no account (the squatter of nobody's default run directory).
STRANGER_UID = 12345

# A server of a planted socket (run as the squatter): prints "ready", then one JSON line per
# client with the bytes it sent before closing. Ends by itself after 60 s without a client.
FAKE_SERVER = textwrap.dedent("""\
    import json, os, socket, sys
    s = socket.socket(socket.AF_UNIX)
    s.bind(sys.argv[1])
    os.chmod(sys.argv[1], 0o777)
    s.listen(8)
    s.settimeout(60)
    print("ready", flush=True)
    while True:
        try:
            c, _ = s.accept()
        except OSError:
            break
        c.settimeout(10)
        n = 0
        try:
            while True:
                data = c.recv(65536)
                if not data:
                    break
                n += len(data)
        except OSError:
            pass
        c.close()
        print(json.dumps({"received": n}), flush=True)
    """)

# A client of another uid: connects to argv[1], sends the frame argv[2] (hex), prints what came back.
STRANGER_CLIENT = textwrap.dedent("""\
    import json, socket, sys
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(20)
    s.connect(sys.argv[1])
    result = {"connected": True}
    try:
        s.sendall(bytes.fromhex(sys.argv[2]))
        result["reply_bytes"] = len(s.recv(65536))
    except OSError as exc:
        result["error"] = type(exc).__name__
    print(json.dumps(result))
    """)


def as_user(uid: int, gid: int, argv) -> list:
    return ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", *argv]


def as_nobody(argv) -> list:
    return as_user(NOBODY.pw_uid, NOBODY.pw_gid, argv)


def gridsock(*args: str, env, user=None) -> subprocess.CompletedProcess:
    argv = gridsock_argv(*args)
    return subprocess.run(user(argv) if user else argv, capture_output=True, text=True, env=env,
                          timeout=COMMAND_TIMEOUT_S)


def base_env(**extra: str) -> dict:
    env = dict(os.environ, **STRICT_ENV)
    # (XDG_STATE_HOME too: the test session's is root's, and another user's node could not keep
    # its identity there; without it, a node's state lives under the HOME each test gives)
    for name in ("GRIDSOCK_RUN_DIR", "XDG_RUNTIME_DIR", "XDG_STATE_HOME", "GRIDSOCK_AGENT", "TMPDIR"):
        env.pop(name, None)
    env.update(extra)
    return env


class Procs:
    """Processes started by the tests of this module; each writes its stderr to a log file."""

    def __init__(self, logdir: Path) -> None:
        self.logdir = logdir
        self.started: list = []

    def start(self, name: str, argv, env) -> subprocess.Popen:
        with open(self.logdir / f"{name}.log", "wb") as log:
            proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=log, env=env)
        self.started.append(proc)
        return proc

    def log(self, name: str) -> str:
        return (self.logdir / f"{name}.log").read_text()

    def stop_all(self) -> None:
        for proc in reversed(self.started):
            stop_process(proc)


@pytest.fixture(scope="module")
def shared():
    """A directory every user may enter (root's, 0755) for what other users must reach."""
    base = Path(tempfile.mkdtemp(prefix="gs-lu-", dir="/tmp"))
    base.chmod(0o755)
    try:
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def grid(shared):
    """A rendez-vous node, node ``n1`` run by root and node ``n2`` run by nobody, each in a run
    directory of its own user."""
    procs = Procs(shared)
    rv_session = shared / "rv" / "session.toml"
    session = create_session(rv_session.parent, "127.0.0.1:1")
    root_env = base_env(GRIDSOCK_RUN_DIR=str(shared / "root-run"), TMPDIR=str(shared),
                        XDG_STATE_HOME=str(shared / "root-state"))
    # root's run directory lets others in (0711, no listing), so that a stranger can reach a
    # socket whose file mode a test opens: the server's own check is what stops it then.
    (shared / "root-run").mkdir(mode=0o711)
    (shared / "root-run").chmod(0o711)
    try:
        rv = procs.start("rendezvous", gridsock_argv("rendezvous", "--session", str(rv_session), "--listen",
                                                     "127.0.0.1:0"), root_env)
        port = int(wait_for_line(rv, "rendezvous listening ", timeout=READY_TIMEOUT_S).rsplit(":", 1)[1])
        node_session = shared / "node" / "session.toml"
        node_session.parent.mkdir(mode=0o755)
        node_session.write_text(rv_session.read_text().replace('"127.0.0.1:1"', f'"127.0.0.1:{port}"'))
        node_session.chmod(0o644)  # nobody's node reads it too (a test session)
        assert Session.load(node_session).rendezvous_port == port != session.rendezvous_port
        nobody_home = shared / "nobody"
        nobody_home.mkdir()
        os.chown(nobody_home, NOBODY.pw_uid, NOBODY.pw_gid)
        nobody_env = base_env(GRIDSOCK_RUN_DIR=str(nobody_home / "run"), HOME=str(nobody_home),
                              TMPDIR=str(nobody_home))
        nodes = {}
        # (each the leader of a cluster of its own: a cluster belongs to its first leader)
        for name, cluster, env, user in (("n1", "A", root_env, None), ("n2", "B", nobody_env, as_nobody)):
            argv = gridsock_argv("node", "--session", str(node_session), "--name", name, "--cluster", cluster,
                                 "--listen", "127.0.0.1:0")
            nodes[name] = procs.start(name, user(argv) if user else argv, env)
        for name, proc in nodes.items():
            wait_for_line(proc, f"joined {name} ", timeout=READY_TIMEOUT_S)
        yield {"procs": procs, "nodes": nodes, "session": node_session, "root_env": root_env,
               "nobody_env": nobody_env, "root_run": shared / "root-run", "nobody_run": nobody_home / "run"}
    finally:
        procs.stop_all()


@pytest.fixture
def fake_server(shared):
    """``start(path, uid)``: a planted socket served by ``uid``; returns the process."""
    started = []

    def start(path: Path, uid: int = NOBODY.pw_uid) -> subprocess.Popen:
        proc = subprocess.Popen(as_user(uid, uid, [sys.executable, "-c", FAKE_SERVER, str(path)]),
                                stdout=subprocess.PIPE)
        started.append(proc)
        wait_for_line(proc, "ready", timeout=READY_TIMEOUT_S)
        return proc

    yield start
    for proc in started:
        stop_process(proc)


# What the test itself sends to a fake server last: every client before it has been counted.
SENTINEL = b"sentinel-of-the-test"


def clients_seen(proc: subprocess.Popen, path: Path) -> list:
    """What the fake server at ``path`` got from its clients so far: one byte count per client.
    (The server accepts in order: once it has counted the test's sentinel, it has counted every
    client that connected before.) Stops the server."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(COMMAND_TIMEOUT_S)
        sock.connect(str(path))
        sock.sendall(SENTINEL)
    counts: list = []
    while True:
        count = json.loads(wait_for_line(proc, "{", timeout=READY_TIMEOUT_S))["received"]
        if count == len(SENTINEL):
            break
        counts.append(count)
    stop_process(proc)
    return counts


def squatted_dir(shared: Path, name: str, uid: int = NOBODY.pw_uid, mode: int = 0o755) -> Path:
    directory = shared / name
    directory.mkdir()
    os.chown(directory, uid, uid)
    directory.chmod(mode)
    return directory


# --- where the run directory is -----------------------------------------------------------------


def test_run_dir_prefers_a_private_xdg_runtime_dir(monkeypatch, tmp_path):
    monkeypatch.delenv("GRIDSOCK_RUN_DIR", raising=False)
    private = tmp_path / "xdg"
    private.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(private))
    assert run_dir() == str(private / "gridsock")
    private.chmod(0o755)  # others may enter: not private
    assert run_dir() == f"/tmp/gridsock-{os.getuid()}"
    private.chmod(0o700)
    os.chown(private, NOBODY.pw_uid, NOBODY.pw_gid)  # someone else's
    assert run_dir() == f"/tmp/gridsock-{os.getuid()}"
    monkeypatch.setenv("XDG_RUNTIME_DIR", "relative/dir")
    assert run_dir() == f"/tmp/gridsock-{os.getuid()}"
    monkeypatch.setenv("GRIDSOCK_RUN_DIR", str(tmp_path / "mine"))  # overrides, and is checked too
    assert run_dir() == str(tmp_path / "mine")


def test_a_server_makes_its_run_directory_0700_and_its_socket_0600(tmp_path):
    path = tmp_path / "a" / "run" / "x.sock"
    server = ControlServer(str(path), lambda op, args: {"op": op})
    server.start()
    try:
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
        assert not path.stat().st_mode & 0o077  # the umask of the bind: nobody else may connect
        assert call(str(path), "hello") == {"op": "hello"}  # the same user (root) is served
    finally:
        server.stop()


def test_local_trust_error_is_a_permission_error_and_pickles():
    import pickle

    error = pickle.loads(pickle.dumps(LocalTrustError("the run directory /x is a symbolic link", "/x")))
    assert isinstance(error, PermissionError) and error.errno == 13
    assert (str(error), error.path) == ("the run directory /x is a symbolic link", "/x")


# --- run directories that are not private ---------------------------------------------------------


def test_a_node_and_status_refuse_a_run_directory_squatted_by_another_user(grid, shared, fake_server):
    """The attack of issue 16: nobody makes the run directory first and plants sockets in it."""
    squat = squatted_dir(shared, "squat")
    planted = [fake_server(squat / name, NOBODY.pw_uid) for name in ("n1.sock", "n1.agent")]
    env = dict(grid["root_env"], GRIDSOCK_RUN_DIR=str(squat))
    expected = f"the run directory {squat} belongs to uid 65534 (nobody), not to you (uid 0 (root))"

    node = gridsock("node", "--session", str(grid["session"]), "--name", "n9", "--listen", "127.0.0.1:0", env=env)
    assert node.returncode == 2, node.stderr
    assert node.stderr.startswith(f"gridsock node: {expected}"), node.stderr
    assert "Traceback" not in node.stderr and f"remove {squat}" in node.stderr
    assert not (squat / "n9.sock").exists()
    for args, status, prefix in ((("status",), 2, "gridsock status: "),
                                 (("status", "--node", "n1"), 2, "gridsock status: "),
                                 (("ping", "--from", "n1", "n2"), 1, "ping n2: ")):  # (ping's own way)
        result = gridsock(*args, env=env)
        assert result.returncode == status, (args, result.stdout, result.stderr)
        assert result.stderr.startswith(prefix + expected), result.stderr
    with pytest.raises(LocalTrustError, match="belongs to uid 65534") as refused:
        call(str(squat / "n1.sock"), "status")
    assert refused.value.errno == 13 and refused.value.path == str(squat)
    assert [clients_seen(proc, squat / name) for proc, name in zip(planted, ("n1.sock", "n1.agent"))] == [[], []]


def test_the_agent_client_and_gridsock_run_refuse_a_squatted_run_directory(grid, shared, fake_server):
    squat = squatted_dir(shared, "squat-agent")
    planted = fake_server(squat / "n1.agent", NOBODY.pw_uid)
    try:
        with pytest.raises(LocalTrustError, match="belongs to uid 65534"):
            AgentClient(str(squat / "n1.agent")).whoami()
        env = dict(grid["root_env"], GRIDSOCK_RUN_DIR=str(squat))
        run = gridsock("run", "--node", "n1", "--", sys.executable, "-c", "pass", env=env)
        assert run.returncode == 2 and "belongs to uid 65534 (nobody)" in run.stderr, run.stderr
    finally:
        assert clients_seen(planted, squat / "n1.agent") == []


def test_the_default_run_directory_squatted_by_another_user_is_refused(grid):
    """nobody's default run directory (/tmp/gridsock-65534), made first by another user."""
    default = Path(f"/tmp/gridsock-{NOBODY.pw_uid}")
    if os.path.lexists(default):
        pytest.skip(f"{default} exists already: not ours to replace")
    default.mkdir(mode=0o777)
    try:
        os.chown(default, STRANGER_UID, STRANGER_UID)
        default.chmod(0o777)
        env = dict(grid["nobody_env"])
        del env["GRIDSOCK_RUN_DIR"]
        node = gridsock("node", "--session", str(grid["session"]), "--name", "n9", "--listen", "127.0.0.1:0",
                        env=env, user=as_nobody)
        status = gridsock("status", env=env, user=as_nobody)
        for result, command in ((node, "node"), (status, "status")):
            assert result.returncode == 2, result.stderr
            assert result.stderr.startswith(f"gridsock {command}: the run directory {default} belongs to "
                                            f"uid {STRANGER_UID}, not to you (uid 65534 (nobody))"), result.stderr
        assert os.listdir(default) == []
    finally:
        shutil.rmtree(default, ignore_errors=True)


def test_a_symlinked_run_directory_is_refused(grid, shared):
    link = shared / "link-run"
    link.symlink_to(grid["root_run"])  # to root's real run directory, where n1 serves
    env = dict(grid["root_env"], GRIDSOCK_RUN_DIR=str(link))
    status = gridsock("status", "--node", "n1", env=env)
    assert status.returncode == 2
    assert status.stderr.startswith(f"gridsock status: the run directory {link} is a symbolic link "
                                    f"(to {grid['root_run']})"), status.stderr
    with pytest.raises(LocalTrustError, match="is a symbolic link"):
        ControlServer(str(link / "x.sock"), lambda op, args: None).start()
    with pytest.raises(LocalTrustError, match="is a symbolic link"):
        call(str(link / "n1.sock"), "status")
    assert not (grid["root_run"] / "x.sock").exists()


@pytest.mark.parametrize("mode, who", [(0o770, "group"), (0o707, "others"), (0o777, "group and others"),
                                       (0o1777, "group and others")])
def test_a_run_directory_writable_by_others_is_refused(tmp_path, mode, who):
    directory = tmp_path / "run"
    directory.mkdir()
    directory.chmod(mode)
    for attempt in (lambda: ControlServer(str(directory / "x.sock"), lambda op, args: None).start(),
                    lambda: call(str(directory / "x.sock"), "status")):
        with pytest.raises(LocalTrustError) as refused:
            attempt()
        assert str(refused.value) == (f"the run directory {directory} is writable by {who} (mode {mode:04o}); "
                                      f"it must be private to its user: chmod 700 {directory}")
    assert os.listdir(directory) == []
    directory.chmod(0o700)
    check_private_dir(str(directory))  # fixed as the message says


def test_a_socket_or_server_of_another_user_in_a_private_directory_is_refused(tmp_path, shared, fake_server):
    """The file check and the peer check: a socket file of nobody's, and a socket file of
    root's whose server runs as nobody (a socket moved from elsewhere): nothing is sent."""
    private = tmp_path / "run"
    make_private_dir(str(private))
    outside = squatted_dir(shared, "outside")
    server = fake_server(outside / "s.sock", NOBODY.pw_uid)
    os.rename(outside / "s.sock", private / "n.sock")  # a bound socket keeps working when moved
    with pytest.raises(LocalTrustError, match=rf"the socket {private}/n.sock belongs to uid 65534 \(nobody\)"):
        call(str(private / "n.sock"), "status")
    os.chown(private / "n.sock", 0, 0)
    expected = rf"the process serving {private}/n.sock \(pid [0-9]+\) runs as uid 65534 \(nobody\), not as you"
    with pytest.raises(LocalTrustError, match=expected):
        call(str(private / "n.sock"), "status")
    with socket.socket(socket.AF_UNIX) as sock, pytest.raises(LocalTrustError, match=expected):
        connect_private(sock, str(private / "n.sock"))  # what the agent client and gridsock run call
    assert clients_seen(server, private / "n.sock") == [0, 0]  # two connected (the peer check), neither sent a byte


# --- servers and clients of other users -------------------------------------------------------------


def test_control_and_agent_servers_refuse_a_client_of_another_uid(grid):
    procs, root_run = grid["procs"], grid["root_run"]
    frame = wire.encode(wire.Control("status", {})).hex()
    for suffix in ("sock", "agent"):
        path = root_run / f"n1.{suffix}"
        path.chmod(0o666)  # take the file mode's wall down: the server's own check must hold
        try:
            seen = subprocess.run(as_nobody([sys.executable, "-c", STRANGER_CLIENT, str(path), frame]),
                                  capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)
        finally:
            path.chmod(0o600)
        assert seen.returncode == 0, seen.stderr
        result = json.loads(seen.stdout)
        assert result["connected"] and (result.get("reply_bytes") == 0 or result.get("error") in
                                        ("ConnectionResetError", "BrokenPipeError")), result
        refusals = [line for line in procs.log("n1").splitlines() if f"{path}: refused a client" in line]
        assert len(refusals) == 1, procs.log("n1")
        assert re.search(rf" WARNING gridsock\.bootstrap\.control: {re.escape(str(path))}: refused a client of "
                         rf"uid 65534 \(pid [0-9]+\): only uid 0 and root may use it$", refusals[0]), refusals[0]
    # and the node keeps serving its owner
    assert call(str(root_run / "n1.sock"), "status")["name"] == "n1"
    assert AgentClient(str(root_run / "n1.agent")).whoami()["name"] == "n1"
    assert grid["nodes"]["n1"].poll() is None


def test_a_node_of_an_ordinary_user_serves_that_user_and_root(grid):
    nobody_run = grid["nobody_run"]
    assert nobody_run.stat().st_uid == NOBODY.pw_uid and stat.S_IMODE(nobody_run.stat().st_mode) == 0o700
    status = gridsock("status", "--node", "n2", "--json", env=grid["nobody_env"], user=as_nobody)
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["name"] == "n2"
    # root reaches nobody's server (root is trusted everywhere) ...
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(COMMAND_TIMEOUT_S)
        sock.connect(str(nobody_run / "n2.sock"))
        assert peer_credentials(sock)[1] == NOBODY.pw_uid
        sock.sendall(wire.encode(wire.Control("status", {})))
        decoder = wire.Decoder(peer="n2")
        reply = None
        while reply is None:
            data = sock.recv(65536)
            assert data, "n2 closed root's connection"
            decoder.feed(data)
            reply = decoder.next_message()
    assert isinstance(reply, wire.ControlReply) and reply.ok and reply.result["name"] == "n2"
    # ... but root's client does not trust another user's run directory
    with pytest.raises(LocalTrustError, match=f"the run directory {nobody_run} belongs to uid 65534"):
        call(str(nobody_run / "n2.sock"), "status")
    assert "refused" not in grid["procs"].log("n2")


# --- private keys ------------------------------------------------------------------------------------


def enrolled(tmp_path) -> Identity:
    session = create_session(tmp_path / "s", "127.0.0.1:7700")
    key_pem, csr_pem = new_node_key()
    return Identity(session.certificate_authority().sign_node(csr_pem, "00000000-0000-4000-8000-000000000007"),
                    key_pem)


def spied_context(seen: list) -> ssl.SSLContext:
    """A server context that records, for each load_cert_chain, its paths and what they were."""
    context = gssl.SSLContext(gssl.PROTOCOL_TLS_SERVER)
    original = context.load_cert_chain

    def load_cert_chain(certfile, keyfile=None, password=None):
        seen.append([(path, os.path.realpath(path) if not path.startswith("/proc/") else os.readlink(path),
                      stat.S_IMODE(os.stat(path).st_mode), Path(path).read_bytes()) for path in (certfile, keyfile)])
        original(certfile, keyfile, password)

    context.load_cert_chain = load_cert_chain  # type: ignore[method-assign]
    return context


def test_a_tls_context_gets_the_identity_from_memory_files_closed_at_once(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "t"))
    (tmp_path / "t").mkdir()
    identity = enrolled(tmp_path)
    seen: list = []
    identity.load_into(spied_context(seen))
    [[(cert_path, cert_link, cert_mode, cert), (key_path, key_link, key_mode, key)]] = seen
    assert (cert, key) == (identity.cert_pem, identity.key_pem)
    assert cert_path.startswith("/proc/self/fd/") and key_path.startswith("/proc/self/fd/")
    assert cert_link.startswith("/memfd:gridsock-identity-cert") and key_link.startswith("/memfd:gridsock-identity-key")
    assert cert_mode == key_mode == 0o600
    for path in (cert_path, key_path):  # closed once loaded (the number may be reused, not by a key of ours)
        assert not os.path.exists(path) or not os.readlink(path).startswith("/memfd:gridsock-identity-")
    assert os.listdir(tmp_path / "t") == []  # no temporary file either


def test_without_memory_files_a_private_directory_removed_at_once(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "t"))
    (tmp_path / "t").mkdir()
    monkeypatch.delattr(os, "memfd_create")
    identity = enrolled(tmp_path)
    seen: list = []
    identity.load_into(spied_context(seen))
    [[(cert_path, _, cert_mode, cert), (key_path, _, key_mode, key)]] = seen
    assert (cert, key) == (identity.cert_pem, identity.key_pem) and cert_mode == key_mode == 0o600
    assert os.path.dirname(key_path).startswith(str(tmp_path / "t" / "gridsock-identity-"))
    assert os.listdir(tmp_path / "t") == []  # removed as soon as the context had it


def test_a_node_killed_with_sigkill_leaves_no_private_key_behind(grid, shared):
    tmp = shared / "kill-tmp"
    tmp.mkdir(mode=0o700)
    env = dict(grid["root_env"], TMPDIR=str(tmp))  # where a temporary identity directory would go
    node = grid["procs"].start("n3", gridsock_argv("node", "--session", str(grid["session"]), "--name", "n3",
                                                   "--listen", "127.0.0.1:0"), env)
    wait_for_line(node, "joined n3 ", timeout=READY_TIMEOUT_S)
    # joined: it enrolled, and holds its key and certificate in TLS contexts
    assert call(str(grid["root_run"] / "n3.sock"), "status")["name"] == "n3"
    assert os.listdir(tmp) == []
    open_files = [os.readlink(f"/proc/{node.pid}/fd/{fd}") for fd in os.listdir(f"/proc/{node.pid}/fd")]
    # No identity file on a file system; a memfd ("/memfd:gridsock-identity-... (deleted)") may be
    # open for a moment while a TLS context loads the key: it is memory, gone with the process.
    on_disk = [f for f in open_files if not f.startswith("/memfd:")]
    assert not [f for f in on_disk if "gridsock-identity" in f or f.endswith(".pem")], open_files
    node.send_signal(signal.SIGKILL)
    assert node.wait(timeout=COMMAND_TIMEOUT_S) == -signal.SIGKILL
    assert os.listdir(tmp) == []  # where Identity.cert_files() would have left its directory
    leftovers = [p for p in (grid["root_run"], tmp) for p in p.rglob("*") if not p.is_socket()]
    assert leftovers == []
