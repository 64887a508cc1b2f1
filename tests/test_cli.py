"""The ``gridsock`` command line, run as real processes on loopback.

Readiness is a line a process prints (``rendezvous listening``, ``joined``) or a control call
that waits for the directory; processes are stopped in teardown.
"""
from __future__ import annotations

import json
import os
import re
import selectors
import signal
import stat
import subprocess
import time

import pytest

from gridsock.bootstrap.control import call
from gridsock.components.relay import RELAY_MAX_WINDOW_BYTES
from gridsock.session import Session
from gridsock.testing.procs import gridsock_argv, stop_process, wait_for_line

pytestmark = pytest.mark.timeout(60)

# A gridsock process starts (imports included) and joins well within this on loopback.
READY_TIMEOUT_S = 20.0
# A one-shot command (session new, status, ping) finishes within this.
COMMAND_TIMEOUT_S = 30.0
DEMO_TIMEOUT_S = 120.0

SESSION_FILES = {"session.toml", "ca.pem", "ca-key.pem", "rendezvous-cert.pem", "rendezvous-key.pem"}


def gridsock(*args: str, env=None) -> subprocess.CompletedProcess:
    """Run one ``gridsock`` command to completion."""
    return subprocess.run(gridsock_argv(*args), capture_output=True, text=True, env=env, timeout=COMMAND_TIMEOUT_S)


# Processes run with warnings as errors and in development mode (ResourceWarning shown).
STRICT_ENV = {"PYTHONWARNINGS": "error", "PYTHONDEVMODE": "1", "PYTHONUNBUFFERED": "1"}


def assert_no_trouble(stderr: str, what: str) -> None:
    """No traceback and no Python warning in what a process wrote to stderr."""
    assert "Traceback" not in stderr and not re.search(r"[A-Za-z]*Warning: ", stderr), f"{what}:\n{stderr}"


# --- gridsock session new -----------------------------------------------------------------------


def test_session_new_writes_the_private_files_0600_and_refuses_to_overwrite(tmp_path):
    directory = tmp_path / "session"
    first = gridsock("session", "new", str(directory), "--rendezvous", "127.0.0.1:7799")
    assert first.returncode == 0, first.stderr
    session = Session.load(directory / "session.toml")
    assert first.stdout.startswith(f"session {session.session_id} written to {directory / 'session.toml'}")
    assert (session.rendezvous, session.bootstrap, session.tls) == ("127.0.0.1:7799", "tls/tcp", True)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in directory.iterdir()}
    assert set(modes) == SESSION_FILES
    assert modes["ca-key.pem"] == modes["rendezvous-key.pem"] == 0o600
    assert all(not mode & 0o022 for mode in modes.values()), modes  # nobody else may write them
    contents = {p.name: p.read_bytes() for p in directory.iterdir()}

    second = gridsock("session", "new", str(directory), "--rendezvous", "127.0.0.1:7799")
    assert second.returncode == 2
    assert second.stdout == ""
    assert re.fullmatch(r"gridsock session: .*session\.toml already exists: refusing to overwrite a session\n",
                        second.stderr), second.stderr  # one clear line, no traceback
    assert {p.name: p.read_bytes() for p in directory.iterdir()} == contents


def test_session_new_plain_tcp_and_bad_addresses(tmp_path):
    plain = gridsock("session", "new", str(tmp_path / "plain"), "--rendezvous", "grid.example.org:7700", "--plain-tcp")
    assert plain.returncode == 0, plain.stderr
    assert Session.load(tmp_path / "plain").bootstrap == "tcp"
    for bad in ("0.0.0.0:7700", "127.0.0.1:99999", "::1:7700"):
        result = gridsock("session", "new", str(tmp_path / "bad"), "--rendezvous", bad)
        assert result.returncode == 2, (bad, result.stderr)
        assert result.stderr.startswith("gridsock session: ") and result.stderr.count("\n") == 1, result.stderr
        assert not (tmp_path / "bad" / "session.toml").exists()


# --- a rendez-vous node and two nodes as processes ----------------------------------------------


class Procs:
    """Processes started by one test; stopped (and their pipes closed) in teardown."""

    def __init__(self, logdir, env) -> None:
        self.logdir = logdir
        self.env = env
        self.started = []

    def start(self, name: str, *args: str) -> subprocess.Popen:
        with open(self.logdir / f"{name}.log", "wb") as log:
            proc = subprocess.Popen(gridsock_argv(*args), stdout=subprocess.PIPE, stderr=log, env=self.env)
        self.started.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen) -> int:
        stop_process(proc)
        proc.stdout.close()
        return proc.returncode

    def stop_all(self) -> None:
        for proc in reversed(self.started):
            self.stop(proc)
        for log in sorted(self.logdir.glob("*.log")):
            assert_no_trouble(log.read_text(), log.name)


@pytest.fixture
def run_dir(sock_dir):
    return sock_dir / "run"


@pytest.fixture
def env(run_dir):
    return dict(os.environ, GRIDSOCK_RUN_DIR=str(run_dir), **STRICT_ENV)


@pytest.fixture
def procs(tmp_path, env):
    p = Procs(tmp_path, env)
    yield p
    p.stop_all()


def with_port(session_file, port: int, target) -> None:
    """Write a copy of ``session_file`` naming rendez-vous port ``port`` (the one the kernel chose)."""
    text, count = re.subn(r'^rendezvous = "127\.0\.0\.1:[0-9]+"$', f'rendezvous = "127.0.0.1:{port}"',
                          session_file.read_text(), flags=re.M)
    assert count == 1
    target.parent.mkdir()
    target.write_text(text)


def rendezvous_barrier(run_dir) -> None:
    """Return once the rendez-vous node has handled all that ``lead`` sent it so far.

    A ping travels on lead's uplink behind the Register and Unregister messages it queued before,
    and the rendez-vous node handles a link's messages in order.
    """
    call(str(run_dir / "lead.sock"), "ping", {"dst": "rendezvous", "timeout": READY_TIMEOUT_S},
         timeout=READY_TIMEOUT_S + 5)


def start_rendezvous(procs, tmp, env):
    """A new session under ``tmp`` and ``gridsock rendezvous`` on a free loopback port; returns
    ``(process, the session file for nodes)``, which names that port."""
    rv_session = tmp / "rv" / "session.toml"
    made = gridsock("session", "new", str(rv_session.parent), "--rendezvous", "127.0.0.1:1", env=env)
    assert made.returncode == 0, made.stderr
    rv = procs.start("rendezvous", "rendezvous", "--session", str(rv_session), "--listen", "127.0.0.1:0")
    port = int(wait_for_line(rv, "rendezvous listening ", timeout=READY_TIMEOUT_S).rsplit(":", 1)[1])
    node_session = tmp / "node" / "session.toml"
    with_port(rv_session, port, node_session)
    return rv, node_session


@pytest.fixture
def cli_grid(tmp_path, sock_dir, procs, env, run_dir):
    """``gridsock rendezvous``, leader ``lead`` (cluster A) and member ``mem`` (Unix node port)."""
    rv, node_session = start_rendezvous(procs, tmp_path, env)
    lead = procs.start("lead", "node", "--session", str(node_session), "--name", "lead", "--cluster", "A",
                       "--listen", "127.0.0.1:0")
    lead_address = wait_for_line(lead, "node lead listening ", timeout=READY_TIMEOUT_S).split()[-1]
    assert wait_for_line(lead, "joined lead ", timeout=READY_TIMEOUT_S).endswith(" leader")
    mem = procs.start("mem", "node", "--session", str(node_session), "--name", "mem", "--cluster", "A",
                      "--leader", lead_address, "--listen", f"unix:{sock_dir}/mem.node")
    assert wait_for_line(mem, "joined mem ", timeout=READY_TIMEOUT_S).endswith(" member")
    for name in ("lead", "mem"):
        call(str(run_dir / f"{name}.sock"), "wait", {"present": ["lead", "mem"], "timeout": READY_TIMEOUT_S},
             timeout=READY_TIMEOUT_S + 5)
    rendezvous_barrier(run_dir)
    return {"rendezvous": rv, "lead": lead, "mem": mem, "session": node_session, "lead_address": lead_address}


def test_ping_prints_the_route(cli_grid, env):
    there = gridsock("ping", "--from", "mem", "lead", env=env)
    assert there.returncode == 0, there.stderr
    assert re.fullmatch(r"lead: [0-9]+\.[0-9]{3} ms, 1 hop\(s\): mem > lead; back: lead > mem\n",
                        there.stdout), there.stdout
    back = gridsock("ping", "--node", "lead", "mem", env=env)
    assert back.returncode == 0, back.stderr
    assert "1 hop(s): lead > mem; back: mem > lead" in back.stdout
    root = gridsock("ping", "--from", "mem", "rendezvous", "--json", "-c", "2", env=env)
    assert root.returncode == 0, root.stderr
    results = [json.loads(line) for line in root.stdout.splitlines()]
    assert len(results) == 2
    for result in results:
        assert result["route_there"] == ["mem", "lead", "rendezvous"]
        assert result["route_back"] == ["rendezvous", "lead", "mem"]
        assert result["hops"] == 2 and result["rtt_ms"] > 0


def test_ping_an_unknown_node_fails_with_the_reason(cli_grid, env):
    result = gridsock("ping", "--from", "mem", "nobody", "--timeout", "5", env=env)
    assert result.returncode == 1
    assert result.stdout == ""
    assert "ping nobody: " in result.stderr and "unknown destination nobody" in result.stderr


def test_status_json_lists_both_nodes(cli_grid, env, run_dir):
    for name, role in (("lead", "leader"), ("mem", "member")):
        result = gridsock("status", "--node", name, "--json", env=env)
        assert result.returncode == 0, result.stderr
        status = json.loads(result.stdout)
        assert (status["name"], status["role"], status["cluster"], status["joined"]) == (name, role, "A", True)
        entries = {e["name"]: e for e in status["directory"]}
        assert set(entries) == {"lead", "mem"}
        assert entries["mem"]["leader"] == entries["lead"]["node_id"] == entries["lead"]["leader"]
        assert status["bootstrap"] == "tls/tcp"
    lead = json.loads(gridsock("status", "--node", "lead", "--json", env=env).stdout)
    assert [link.get("peer") for link in lead["links"] if link["kind"] == "member"] == ["mem"]
    rv = gridsock("status", "--control", str(run_dir / "rendezvous.sock"), "--json", env=env)
    assert rv.returncode == 0, rv.stderr
    rv_status = json.loads(rv.stdout)
    assert rv_status["role"] == "rendezvous"
    assert {e["name"] for e in rv_status["directory"]} == {"lead", "mem"}


def test_status_text_names_both_nodes(cli_grid, env):
    result = gridsock("status", "--node", "mem", env=env)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert re.match(r"node mem \(member, cluster A\) id [0-9a-f-]{36}: joined, node port unix:", lines[0]), lines[0]
    assert lines[1] == "2 node(s) in the directory, 1 leader(s):"
    rows = {line.split()[0]: line.split() for line in lines[3:5]}
    assert rows["lead"][1:4] == ["A", "leader", "lead"]
    assert rows["mem"][1:4] == ["A", "member", "lead"]


def test_status_asks_which_node_when_several_run(cli_grid, env):
    result = gridsock("status", env=env)
    assert result.returncode == 2
    assert "several gridsock processes run here" in result.stderr
    assert all(name in result.stderr for name in ("lead", "mem", "rendezvous"))
    assert "--node NAME" in result.stderr


def test_a_node_that_stops_leaves_the_directory(cli_grid, procs, env, run_dir):
    assert procs.stop(cli_grid["mem"]) == 0  # SIGTERM is a clean stop
    assert not (run_dir / "mem.sock").exists()
    call(str(run_dir / "lead.sock"), "wait", {"absent": ["mem"], "timeout": READY_TIMEOUT_S},
         timeout=READY_TIMEOUT_S + 5)
    rendezvous_barrier(run_dir)
    status = json.loads(gridsock("status", "--control", str(run_dir / "rendezvous.sock"), "--json", env=env).stdout)
    assert {e["name"] for e in status["directory"]} == {"lead"}
    assert gridsock("ping", "--from", "lead", "mem", "--timeout", "5", env=env).returncode == 1


def test_a_node_with_a_wrong_join_token_exits_with_the_reason(cli_grid, procs, tmp_path):
    session_file = tmp_path / "intruder" / "session.toml"
    session_file.parent.mkdir()
    text, count = re.subn(r'^join_token = "[^"]+"$', 'join_token = "' + "x" * 43 + '"',
                          cli_grid["session"].read_text(), flags=re.M)
    assert count == 1
    session_file.write_text(text)
    intruder = procs.start("intruder", "node", "--session", str(session_file), "--name", "intruder",
                           "--listen", "127.0.0.1:0")
    wait_for_line(intruder, "node intruder listening ", timeout=READY_TIMEOUT_S)
    assert intruder.wait(timeout=READY_TIMEOUT_S) == 2
    log = (tmp_path / "intruder.log").read_text()
    assert "gridsock node: enrollment refused" in log and "bad join token" in log, log


# --- gridsock demo ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo():
    """One run of ``gridsock demo`` (it makes its own session and processes on loopback)."""
    return subprocess.run(gridsock_argv("demo"), capture_output=True, text=True, timeout=DEMO_TIMEOUT_S,
                          env=dict(os.environ, **STRICT_ENV))


@pytest.mark.timeout(DEMO_TIMEOUT_S + 30)
def test_demo_answers_every_ping(demo):
    assert demo.returncode == 0, demo.stdout + demo.stderr
    assert "30 of 30 pings answered" in demo.stdout
    assert "FAILED" not in demo.stdout
    assert "6 nodes joined: a1, a2, alpha, b1, beta, solo" in demo.stdout


@pytest.mark.timeout(DEMO_TIMEOUT_S + 30)
def test_demo_leaves_no_warning_behind(demo):
    # Run with warnings as errors and ResourceWarning shown: e.g. the stdout pipes of the node
    # processes it started must be closed, not left to the garbage collector.
    assert_no_trouble(demo.stderr, "gridsock demo")


# --- gridsock transfer: progress, and Ctrl-C --------------------------------------------------


def io_bytes(pid: int) -> int:
    """What process ``pid`` moved so far: what it read and wrote through read/write-like system
    calls (/proc/PID/io), plus what its open TCP sockets sent and received (the kernel's
    counters, through sock_diag): send and recv, which the bootstrap's TLS links use, are not in
    /proc/PID/io's counts. A socket that closed takes its bytes out of the sum."""
    from gridsock.assembly import _tcp_counters

    with open(f"/proc/{pid}/io") as io:
        fields = dict(line.split(": ") for line in io.read().splitlines())
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue  # (closed meanwhile)
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    tcp = sum(acked + received for inode, (acked, received, _) in _tcp_counters().items() if inode in inodes)
    return int(fields["rchar"]) + int(fields["wchar"]) + tcp


def read_stderr_until(proc: subprocess.Popen, pattern: bytes, *, timeout: float) -> bytes:
    """Read ``proc.stderr`` until what came so far matches ``pattern``; return it all.

    Progress bars rewrite one line with carriage returns, so this does not wait for newlines.
    Raises TimeoutError (naming what came) after ``timeout`` seconds, RuntimeError at its end.
    """
    seen = b""
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as selector:
        selector.register(proc.stderr.fileno(), selectors.EVENT_READ)
        while not re.search(pattern, seen):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no {pattern!r} on stderr within {timeout} s: {seen[-500:]!r}")
            if selector.select(remaining):
                data = os.read(proc.stderr.fileno(), 65536)
                if not data:
                    raise RuntimeError(f"stderr ended before {pattern!r}: {seen[-500:]!r}")
                seen += data
    return seen


def data_connections(run_dir, name: str) -> list:
    return call(str(run_dir / f"{name}.sock"), "status")["connections"]


# A transfer the test interrupts long before it could end (at loopback speed, minutes).
ENDLESS_TRANSFER = "1000G"
# Both nodes stop moving the transfer's bytes within this after Ctrl-C (the bound).
CANCEL_BOUND_S = 1.0
# What a node may still read or write while idle over IDLE_WINDOW_S: status calls and logs, far
# from the hundreds of MB a running transfer moves per second on loopback.
IDLE_BYTES = 1 << 20
IDLE_WINDOW_S = 0.5
# After Ctrl-C the nodes may still read what was in flight (a relay window each way at most, and
# the sockets' buffers); they are quiet within this many windows, having moved less than this.
QUIET_WINDOWS = 10
DRAIN_BOUND_BYTES = 4 * RELAY_MAX_WINDOW_BYTES + (16 << 20)


def test_transfer_shows_progress_and_reports(cli_grid, env):
    assert gridsock("echo", "7", "--node", "mem", env=env).returncode == 0
    result = gridsock("transfer", "--node", "lead", "mem:7", "--bytes", "4M", "--progress", env=env)
    assert result.returncode == 0, result.stderr
    assert re.fullmatch(r"4194304 bytes each way to mem:7 over \S+: ok, connect [0-9.]+ ms, [0-9.]+ MB/s each way\n",
                        result.stdout), result.stdout
    assert "mem:7 echoed: 100%" in result.stderr and "4.00M/4.00M" in result.stderr, result.stderr
    assert_no_trouble(result.stderr, "gridsock transfer --progress")
    quiet = gridsock("transfer", "--node", "lead", "mem:7", "--bytes", "1M", "--json", env=env)
    assert quiet.returncode == 0 and quiet.stderr == "", quiet.stderr  # stderr is no terminal here
    assert json.loads(quiet.stdout)["bytes"] == 1 << 20


def test_ctrl_c_stops_a_transfer_on_both_nodes(cli_grid, env, run_dir):
    assert gridsock("echo", "7", "--node", "mem", env=env).returncode == 0
    nodes = {"lead": cli_grid["lead"].pid, "mem": cli_grid["mem"].pid}
    transfer = subprocess.Popen(gridsock_argv("transfer", "--node", "lead", "mem:7", "--bytes", ENDLESS_TRANSFER,
                                              "--progress"),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        # Under way: the bar counts echoed megabytes, both nodes hold the data connection.
        read_stderr_until(transfer, rb"echoed: +0%\|[^\r]*\| *[1-9][0-9.]*M/", timeout=READY_TIMEOUT_S)
        assert [len(data_connections(run_dir, name)) for name in nodes] == [1, 1]
        before = {name: io_bytes(pid) for name, pid in nodes.items()}
        # Both nodes move the transfer's bytes: far more than they do idle, within the bound. (The
        # bar's text is no clock here: a fast path can be a hundred megabytes on before it is read.)
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not all(io_bytes(pid) - before[name] > IDLE_BYTES for name, pid in nodes.items()):
            moved = {name: io_bytes(pid) - before[name] for name, pid in nodes.items()}
            assert time.monotonic() < deadline, f"after {READY_TIMEOUT_S} s the nodes moved only {moved} bytes"
            time.sleep(0.02)

        transfer.send_signal(signal.SIGINT)
        interrupted = time.monotonic()
        gone = {}
        while len(gone) < len(nodes) and time.monotonic() < interrupted + CANCEL_BOUND_S:
            for name in nodes:
                if name not in gone and not data_connections(run_dir, name):
                    gone[name] = time.monotonic() - interrupted
        assert set(gone) == set(nodes), f"after {CANCEL_BOUND_S} s, only {gone} closed the transfer's connection"
        stdout, stderr = transfer.communicate(timeout=COMMAND_TIMEOUT_S)
    finally:
        if transfer.poll() is None:
            transfer.kill()
            transfer.communicate()
    assert transfer.returncode == 130
    assert stdout == b""
    text = stderr.decode()
    assert text.rstrip().endswith("gridsock transfer: interrupted; the transfer to mem:7 is cancelled"), text
    assert_no_trouble(text, "gridsock transfer after Ctrl-C")
    # And the nodes go quiet: nothing moves the transfer's bytes any more. What was in flight
    # when it was cancelled (up to a relay window, read off the link under the leader) may still
    # drain on a loaded machine; a transfer that went on would never give a quiet window.
    windows = []
    for _ in range(QUIET_WINDOWS):
        idle = {name: io_bytes(pid) for name, pid in nodes.items()}
        time.sleep(IDLE_WINDOW_S)  # a measuring window, not a wait for readiness
        windows.append({name: io_bytes(pid) - idle[name] for name, pid in nodes.items()})
        if all(count < IDLE_BYTES for count in windows[-1].values()):
            break
    assert all(count < IDLE_BYTES for count in windows[-1].values()), windows
    assert sum(sum(window.values()) for window in windows) < DRAIN_BOUND_BYTES, windows


# --- the rough edges: --version, lab options, a closed pipe -----------------------------------


def test_version():
    from gridsock import __version__

    result = gridsock("--version")
    assert (result.returncode, result.stdout, result.stderr) == (0, f"gridsock {__version__}\n", "")


@pytest.mark.parametrize("args", [("lab", "--help"), ("lab", "status", "--help"), ("lab", "--prefix", "gs-x", "up", "--help"),
                                  ("-v", "lab", "--prefix", "gs-x", "--help")])
def test_lab_takes_its_options_where_its_usage_shows_them(args):
    result = gridsock(*args)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: gridsock lab "), result.stdout


def test_lab_status_with_the_prefix_first_or_last(tmp_path):
    # An absent lab (a prefix nobody uses): status says so and exits 1, whatever the order.
    for args in (("lab", "--prefix", "gs-nolab", "status"), ("lab", "status", "--prefix", "gs-nolab")):
        result = gridsock(*args)
        assert result.returncode == 1, result.stderr
        assert result.stdout.startswith("lab gs-nolab: absent "), result.stdout
        assert result.stderr == ""


def closed_pipe_run(*args: str, env=None) -> subprocess.CompletedProcess:
    """Run ``gridsock ARGS`` with stdout a pipe whose reader is gone (``gridsock ... | head``)."""
    reader, writer = os.pipe()
    os.close(reader)
    try:
        return subprocess.run(gridsock_argv(*args), stdout=writer, stderr=subprocess.PIPE, text=True,
                              env=dict(env or os.environ, PYTHONUNBUFFERED=""), timeout=COMMAND_TIMEOUT_S)
    finally:
        os.close(writer)


@pytest.mark.parametrize("args", [("--help",), ("--version",), ("lab", "--help")])
def test_a_closed_pipe_ends_a_command_quietly(args):
    result = closed_pipe_run(*args)
    assert (result.returncode, result.stderr) == (141, "")


def test_a_closed_pipe_ends_status_quietly(cli_grid, env):
    result = closed_pipe_run("status", "--node", "lead", env=env)
    assert (result.returncode, result.stderr) == (141, "")


def test_run_help_explains_grid_addresses():
    result = gridsock("run", "--help")
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())
    assert "240.0.0.0/4" in text and "never routed" in text and "socket.gethostbyaddr" in text, text
    assert 'docs/personality.md, "Grid addresses"' in text
    with open(os.path.join(os.path.dirname(__file__), "..", "docs", "personality.md"), encoding="utf-8") as doc:
        assert "\n## Grid addresses\n" in doc.read()
