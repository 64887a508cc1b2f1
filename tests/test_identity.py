"""Nodes that keep their identity, and names and clusters bound to identities (issues 12, 16).

In-process grids on loopback under gevent (a rendez-vous node, leader L1 of cluster A with
member m1, leader L2 of cluster B with member m2), raw TLS connections for a peer that crashes
without a word (its socket closed, no leave), and processes for what must hold across a SIGKILL
and for the CLI's exit status. Every wait is an event, a line, a reply or a bounded wait on a
directory, never a sleep.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import signal
import stat
import subprocess
import sys
import time
import uuid

import gevent
import gevent.queue
import pytest

from gridsock import wire
from gridsock.bootstrap.control import call as control_call
from gridsock.bootstrap.directory import MAX_MEMBERS, STATUS_MAX_BYTES, Bindings, Directory
from gridsock.bootstrap.link import Link, read_message, send_message
from gridsock.bootstrap.rendezvous import RendezvousNode
from gridsock.bootstrap.transport import dial, parse_address, tls_client
from gridsock.errors import AuthError, ConfigError, ConnectRefusedError, GridsockError
from gridsock.names import grid_ip
from gridsock.node import Node
from gridsock.session import (STATE_CERT_FILE, STATE_KEY_FILE, Identity, NodeState, client_context, create_session,
                              default_state_dir, new_node_key)
from gridsock.testing.procs import gridsock_argv, stop_process, wait_for_line

pytestmark = pytest.mark.timeout(120)

# Joining and converging take milliseconds on loopback; these only stop a broken grid hanging.
JOIN_TIMEOUT_S = 10.0
CONVERGE_TIMEOUT_S = 10.0
ANSWER_TIMEOUT_S = 5.0
# A gridsock process starts (imports included) and joins well within this.
READY_TIMEOUT_S = 30.0
STRICT_ENV = {"PYTHONWARNINGS": "error", "PYTHONDEVMODE": "1", "PYTHONUNBUFFERED": "1"}


class Grid:
    """A rendez-vous node and the nodes a test starts (stopped with it)."""

    def __init__(self, workdir, bootstrap: str = "tls/tcp", **rv_options) -> None:
        session = create_session(workdir / "session", "127.0.0.1:1", bootstrap=bootstrap)
        self.control = str(workdir / "rv.ctl")
        self.rv = RendezvousNode(session, listen_address="127.0.0.1:0", control=self.control, **rv_options).start()
        self.session = dataclasses.replace(session, rendezvous_port=self.rv.address.port)
        self.workdir = workdir
        self.nodes: dict = {}
        self._started: list = []

    def __getitem__(self, name: str) -> Node:
        return self.nodes[name]

    def node(self, name: str, **kwargs) -> Node:
        """Start node ``name`` (not waiting for it to join)."""
        for key, value in (("listen_address", "127.0.0.1:0"), ("control", ""), ("agent", ""), ("front_door", None)):
            kwargs.setdefault(key, value)
        node = Node(self.session, name, **kwargs)
        self._started.append(node)
        self.nodes.setdefault(name, node)  # (the first of a name: a thief does not replace it)
        return node.start()

    def joined(self, name: str, **kwargs) -> Node:
        node = self.node(name, **kwargs)
        assert node.wait_joined(JOIN_TIMEOUT_S), f"{name} did not join"
        return node

    def wait_rv(self, *, present=(), absent=()) -> None:
        """Wait until the rendez-vous directory names all of ``present`` and none of ``absent``."""
        deadline = time.monotonic() + CONVERGE_TIMEOUT_S
        while True:
            names = {e.name for e in self.rv.directory}
            if names >= set(present) and not names & set(absent):
                return
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"the rendez-vous node holds {sorted(names)}"
            self.rv.directory.wait_changed(remaining)

    def stop(self) -> None:
        for node in reversed(self._started):
            node.stop()
        self.rv.stop()


@pytest.fixture
def grid(sock_dir):
    g = Grid(sock_dir)
    try:
        g.joined("L1", cluster="A")
        g.joined("L2", cluster="B")
        g.joined("m1", cluster="A", leader=str(g["L1"].address))
        g.joined("m2", cluster="B", leader=str(g["L2"].address))
        for name in ("L1", "L2", "m1", "m2"):
            g[name].wait_directory(present=["L1", "L2", "m1", "m2"], timeout=CONVERGE_TIMEOUT_S)
        yield g
    finally:
        g.stop()


def enroll(grid: Grid) -> Identity:
    """A new node identity of the grid's session, enrolled with the join token."""
    key_pem, csr_pem = new_node_key()
    with raw(grid, grid.rv.address) as sock:
        send_message(sock, wire.Enroll(token=grid.session.join_token, csr_pem=csr_pem.decode(), name="by-hand"))
        reply = read_message(sock, wire.Decoder(), timeout=ANSWER_TIMEOUT_S)
    assert isinstance(reply, wire.Enrolled), reply
    return Identity(reply.cert_pem.encode(), key_pem)


@contextlib.contextmanager
def raw(grid: Grid, address, identity: Identity | None = None):
    """A TLS connection of the session to ``address``, presenting ``identity``."""
    sock = dial(parse_address(str(address)), timeout=ANSWER_TIMEOUT_S)
    try:
        sock = tls_client(sock, client_context(grid.session, identity), timeout=ANSWER_TIMEOUT_S)
        yield sock
    finally:
        sock.close()


def greet(sock, name: str, role: str, cluster: str | None):
    """Send Hello; return the answer (Welcome or Refuse) and the link's decoder."""
    send_message(sock, wire.Hello(name=name, cluster=cluster, role=role))
    decoder = wire.Decoder()
    return read_message(sock, decoder, timeout=ANSWER_TIMEOUT_S), decoder


def crash_after_joining(grid: Grid, identity: Identity, name: str, *, cluster: str | None = None,
                        leader: Node | None = None) -> None:
    """Link as ``name`` with ``identity`` (a leader, or a member of ``leader``), then vanish
    without leaving: the socket closes, no leave is sent, as when a process is killed."""
    address = grid.rv.address if leader is None else leader.address
    with raw(grid, address, identity) as sock:
        answer, _ = greet(sock, name, "leader" if leader is None else "member", cluster)
        assert isinstance(answer, wire.Welcome), answer
        grid.wait_rv(present=[name])
    grid.wait_rv(absent=[name])


def refusal(node: Node) -> AuthError:
    """The fatal refusal that ``node`` gets when it tries to join."""
    with pytest.raises(AuthError) as info:
        node.wait_joined(JOIN_TIMEOUT_S)
    assert node.fatal_error is info.value
    return info.value


# --- a node keeps its identity --------------------------------------------------------------


@pytest.mark.parametrize("bootstrap", ["tls/tcp", "tcp"], ids=["tls", "tcp"])
def test_a_restarted_node_keeps_its_id_grid_address_and_name(sock_dir, bootstrap):
    grid = Grid(sock_dir, bootstrap)
    state = sock_dir / "state" / "n1"
    try:
        first = grid.joined("n1", cluster="N", state_dir=str(state))
        node_id = first.node_id
        assert first.status()["state_dir"] == str(state)
        # One identity runs once: a second node on the same state directory is refused.
        with pytest.raises(ConfigError, match="in use by another running node"):
            Node(grid.session, "n1-twin", state_dir=str(state), control="", agent="", front_door=None)
        first.stop()
        again = grid.joined("n1", cluster="N", state_dir=str(state))
        assert again.node_id == node_id and grid_ip(again.node_id) == grid_ip(node_id)
        assert grid.rv.directory.by_name("n1").node_id == node_id
    finally:
        grid.stop()
    assert stat.S_IMODE(os.lstat(state).st_mode) == 0o700
    if bootstrap == "tls/tcp":
        assert stat.S_IMODE(os.lstat(state / STATE_KEY_FILE).st_mode) == 0o600
        assert (state / STATE_CERT_FILE).exists()
        assert b"PRIVATE KEY" in (state / STATE_KEY_FILE).read_bytes()


def test_a_state_directory_that_is_not_private_or_of_another_session_is_refused(sock_dir, tmp_path):
    grid = Grid(sock_dir)
    try:
        state = sock_dir / "state"
        grid.joined("n1", state_dir=str(state)).stop()
        os.chmod(state / STATE_KEY_FILE, 0o644)
        with pytest.raises(ConfigError, match="chmod 600"):
            Node(grid.session, "n1", state_dir=str(state), control="", agent="", front_door=None)
        os.chmod(state / STATE_KEY_FILE, 0o600)
        os.chmod(state, 0o777)
        with pytest.raises(PermissionError, match="writable by group and others"):
            Node(grid.session, "n1", state_dir=str(state), control="", agent="", front_door=None)
        os.chmod(state, 0o700)
        other = create_session(tmp_path / "other", "127.0.0.1:1")
        with pytest.raises(ConfigError, match="belongs to another session"):
            Node(other, "n1", state_dir=str(state), control="", agent="", front_door=None)
    finally:
        grid.stop()


def test_the_default_state_directory_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    assert default_state_dir("s-id", "b1") == str(tmp_path / "gridsock" / "s-id" / "b1")
    monkeypatch.setenv("XDG_STATE_HOME", "relative/path")  # ignored, as the XDG specification says
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_state_dir("s-id", "b1") == str(tmp_path / "home" / ".local" / "state" / "gridsock" / "s-id" / "b1")


NODE_SCRIPT = """
import sys
from gridsock.names import grid_ip
from gridsock.node import Node
from gridsock.session import Session
node = Node(Session.load(sys.argv[1]), sys.argv[2], state_dir=sys.argv[3], listen_address="127.0.0.1:0",
            control="", agent="", front_door=None, loop="caller").start()
node.wait_joined(30)
print("joined", node.node_id, grid_ip(node.node_id), flush=True)
node.serve_forever()
"""


@pytest.fixture
def cli_env(sock_dir):
    return dict(os.environ, GRIDSOCK_RUN_DIR=str(sock_dir / "run"), XDG_STATE_HOME=str(sock_dir / "xdg"),
                **STRICT_ENV)


@pytest.fixture
def procs(tmp_path):
    started: list = []
    yield started
    for proc in reversed(started):
        stop_process(proc)


def start_rendezvous(procs, tmp_path, env):
    """``gridsock rendezvous`` on a free loopback port; the session file for nodes (its port)."""
    rv_dir = tmp_path / "rv"
    made = subprocess.run(gridsock_argv("session", "new", str(rv_dir), "--rendezvous", "127.0.0.1:1"),
                          capture_output=True, text=True, env=env, timeout=READY_TIMEOUT_S)
    assert made.returncode == 0, made.stderr
    with open(tmp_path / "rendezvous.log", "wb") as log:
        rv = subprocess.Popen(gridsock_argv("rendezvous", "--session", str(rv_dir / "session.toml"), "--listen",
                                            "127.0.0.1:0"), stdout=subprocess.PIPE, stderr=log, env=env)
    procs.append(rv)
    port = int(wait_for_line(rv, "rendezvous listening ", timeout=READY_TIMEOUT_S).rsplit(":", 1)[1])
    session = tmp_path / "node" / "session.toml"
    session.parent.mkdir()
    text = re.sub(r'^rendezvous = "127\.0\.0\.1:[0-9]+"$', f'rendezvous = "127.0.0.1:{port}"',
                  (rv_dir / "session.toml").read_text(), flags=re.M)
    session.write_text(text)
    return session


def test_a_node_killed_with_sigkill_comes_back_with_its_id_and_grid_address(procs, tmp_path, cli_env):
    session = start_rendezvous(procs, tmp_path, cli_env)
    script = tmp_path / "node.py"
    script.write_text(NODE_SCRIPT)
    state = tmp_path / "state-b1"

    def start():
        proc = subprocess.Popen([sys.executable, str(script), str(session), "b1", str(state)],
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=cli_env)
        procs.append(proc)
        return proc, wait_for_line(proc, "joined ", timeout=READY_TIMEOUT_S).split()[1:]

    first, (node_id, address) = start()
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=READY_TIMEOUT_S)
    # At once, while its name is still held for it: the same identity takes it back.
    second, (again_id, again_address) = start()
    assert (again_id, again_address) == (node_id, address)
    assert stat.S_IMODE(os.lstat(state / STATE_KEY_FILE).st_mode) == 0o600
    # Killed again: another node (another identity) may not have the name that b1 just lost.
    second.send_signal(signal.SIGKILL)
    second.wait(timeout=READY_TIMEOUT_S)
    thief = subprocess.run(gridsock_argv("node", "--session", str(session), "--name", "b1", "--listen", "127.0.0.1:0",
                                         "--control", "", "--front-door", "off"),
                           capture_output=True, text=True, env=cli_env, timeout=READY_TIMEOUT_S)
    assert thief.returncode == 2, thief.stderr
    assert "gridsock node: refused" in thief.stderr and "node name 'b1' belongs to node " + node_id in thief.stderr
    assert "Traceback" not in thief.stderr


def test_a_duplicate_live_name_makes_gridsock_node_exit_with_the_conflict(procs, tmp_path, cli_env):
    session = start_rendezvous(procs, tmp_path, cli_env)
    args = ("node", "--session", str(session), "--name", "dup", "--listen", "127.0.0.1:0", "--control", "",
            "--front-door", "off")
    with open(tmp_path / "first.log", "wb") as log:
        first = subprocess.Popen(gridsock_argv(*args), stdout=subprocess.PIPE, stderr=log, env=cli_env)
    procs.append(first)
    first_id = wait_for_line(first, "joined dup ", timeout=READY_TIMEOUT_S).split()[2]
    # (Another host, as it were: a state directory of its own, which a second process of the same
    # name on the same host would not get: the first one holds it.)
    second = subprocess.run(gridsock_argv(*args), capture_output=True, text=True, timeout=READY_TIMEOUT_S,
                            env=dict(cli_env, XDG_STATE_HOME=str(tmp_path / "elsewhere")))
    assert second.returncode == 2, second.stderr
    assert re.search(r"gridsock node: refused: node name 'dup' .*" + first_id, second.stderr), second.stderr
    assert first.poll() is None  # the holder runs on


# --- a name belongs to one identity ----------------------------------------------------------


def test_a_live_name_is_refused_to_another_node_for_good(grid):
    thief = grid.node("m2", cluster="C")
    exc = refusal(thief)
    assert exc.method == "name-taken" and "m2" in str(exc)
    assert grid.rv.directory.by_name("m2").node_id == grid["m2"].node_id


def test_a_lost_name_is_kept_for_its_holder_then_released_by_the_operator(grid):
    holder = enroll(grid)
    crash_after_joining(grid, holder, "b1")
    # 0.02 s after b1 died another enrolled node took its name: now it is refused, for good.
    thief = grid.node("b1")
    exc = refusal(thief)
    assert exc.method == "name-taken" and holder.node_id in str(exc) and "release" in str(exc)
    assert grid.rv.directory.by_name("b1") is None
    # Its holder (the same identity) gets it back at once.
    crash_after_joining(grid, holder, "b1")
    # A name whose holder is linked cannot be released; a lost one can.
    with raw(grid, grid.rv.address, holder) as sock:
        assert isinstance(greet(sock, "b1", "leader", None)[0], wire.Welcome)
        with pytest.raises(GridsockError, match="which is linked: stop that node first"):
            control_call(grid.control, "release", {"name": "b1"})
    grid.wait_rv(absent=["b1"])
    assert control_call(grid.control, "release", {"name": "b1"}) == {"released": "b1", "kind": "name",
                                                                     "node_id": holder.node_id}
    newcomer = grid.joined("b1")
    assert newcomer.node_id != holder.node_id
    with pytest.raises(GridsockError, match="no node holds"):
        control_call(grid.control, "release", {"name": "nobody"})


def test_a_node_that_stops_cleanly_frees_its_name_at_once(grid):
    leaver = grid.joined("c1", cluster="C")
    leaver.stop()
    grid.wait_rv(absent=["c1"])
    successor = grid.joined("c1", cluster="C")  # a new identity: its name and its cluster
    assert successor.node_id != leaver.node_id


def test_a_lost_member_name_is_kept_for_its_holder_at_its_leader(grid):
    holder = enroll(grid)
    crash_after_joining(grid, holder, "m9", cluster="A", leader=grid["L1"])
    thief = grid.node("m9", leader=str(grid["L1"].address))
    exc = refusal(thief)
    assert exc.method == "name-taken" and holder.node_id in str(exc)
    crash_after_joining(grid, holder, "m9", cluster="A", leader=grid["L1"])  # the holder itself may


def test_a_lost_name_is_refused_to_a_member_of_another_cluster(grid):
    # L1 knows nothing of b7, lost in another cluster, and welcomes the thief; the rendez-vous
    # node refuses its registration, and L1 passes the refusal on: final, as at a Hello.
    holder = enroll(grid)
    crash_after_joining(grid, holder, "b7")
    thief = grid.node("b7", leader=str(grid["L1"].address))
    with gevent.Timeout(JOIN_TIMEOUT_S), pytest.raises(AuthError) as info:
        thief.serve_forever()
    assert info.value.method == "name-taken" and holder.node_id in str(info.value)
    assert thief.fatal_error is info.value
    for name in ("L1", "m1"):
        grid[name].wait_directory(absent=["b7"], timeout=CONVERGE_TIMEOUT_S)
    assert grid.rv.directory.by_name("b7") is None
    crash_after_joining(grid, holder, "b7")  # still its holder's


# --- clusters are attested -------------------------------------------------------------------


def test_a_node_that_declares_another_leaders_cluster_is_refused(grid):
    rogue = grid.node("rogue", cluster="B")
    exc = refusal(rogue)
    assert exc.method == "cluster-taken" and grid["L2"].node_id in str(exc)
    for name in ("L2", "m2"):
        assert grid[name].directory.by_name("rogue") is None
    # The policy decides on the cluster the directory attests: a node of another cluster gets
    # no plain tcp to B's nodes, whatever it calls itself.
    grid["m2"].listen(7)
    outsider = grid.joined("outsider", cluster="R")
    grid["m2"].wait_directory(present=["outsider"], timeout=CONVERGE_TIMEOUT_S)
    assert grid["m2"].directory.by_name("outsider").cluster == "R"
    with pytest.raises(ConnectRefusedError) as info:
        outsider.connect("m2", 7, stack="tcp", timeout=ANSWER_TIMEOUT_S)
    assert info.value.code == "policy"
    sock, conn = outsider.connect("m2", 7, stack="tls/relay", timeout=ANSWER_TIMEOUT_S)
    sock.close()


def test_a_leader_cannot_register_another_clusters_node_under_its_own_cluster(grid):
    # Its own cluster H, m2 (L2's member in B) moved into H under it: refused, m2 stays L2's.
    identity = enroll(grid)
    m2 = grid.rv.directory.by_name("m2")
    with raw(grid, grid.rv.address, identity) as sock:
        welcome, decoder = greet(sock, "hijacker", "leader", "H")
        assert isinstance(welcome, wire.Welcome)
        stolen = dataclasses.replace(m2, leader=identity.node_id, cluster="H", addrs=(), observed=None, inbound=None)
        send_message(sock, wire.Register((stolen,)))
        barrier(sock, decoder, identity, "hijacker")
        assert grid.rv.directory.get(m2.node_id).leader == grid["L2"].node_id
        assert grid.rv.directory.get(m2.node_id).cluster == "B"


def test_a_lost_cluster_is_kept_for_its_leader_then_released(grid):
    leader = enroll(grid)
    crash_after_joining(grid, leader, "k-lead", cluster="K")
    exc = refusal(grid.node("k-other", cluster="K"))
    assert exc.method == "cluster-taken" and leader.node_id in str(exc) and "release --cluster K" in str(exc)
    crash_after_joining(grid, leader, "k-lead", cluster="K")  # its leader gets it back at once
    assert control_call(grid.control, "release", {"cluster": "K"})["released"] == "K"
    assert grid.joined("k-next", cluster="K").cluster == "K"


def test_grace_ends_and_prune_forgets():
    now = [100.0]
    names = Bindings("node name", grace_s=60.0, clock=lambda: now[0])
    names.bind("b1", "id-1")
    assert names.holder("b1", "id-2") == "id-1" and names.holder("b1", "id-1") is None
    names.lost("b1", "id-1")
    now[0] += 59.9
    assert names.holder("b1", "id-2") == "id-1" and "kept for its holder" in names.why_not("b1", "id-2")
    now[0] += 0.1
    assert names.holder("b1", "id-2") is None
    names.prune()
    assert names.get("b1") is None
    names.bind("c1", "id-3")
    names.left("c1", "id-3")
    assert names.holder("c1", "id-4") is None
    # Lost and released bindings are forgotten as binds go on: memory follows the live ones.
    for i in range(10 * Bindings.PRUNE_FIRST_AT):
        names.bind(f"n{i}", f"id-n{i}")
        names.lost(f"n{i}", f"id-n{i}")
        now[0] += 61.0
    assert len(names) <= 2 * Bindings.PRUNE_FIRST_AT


# --- bounds ----------------------------------------------------------------------------------


def barrier(sock, decoder, identity: Identity, name: str) -> None:
    """Return once the rendez-vous node has handled what was sent on ``sock`` before: it
    handles a link's messages in order and answers this ping after them."""
    send_message(sock, wire.Routed(src=identity.node_id, dst="rendezvous", kind="req", topic="ping", request_id=7,
                                   hops=1, route=(name,)))
    with gevent.Timeout(ANSWER_TIMEOUT_S * 4):
        while not (isinstance(message := read_message(sock, decoder), wire.Routed) and message.request_id == 7):
            pass


FAT_GATEWAY = "ssh(gateway=" + "u" * 60 + "@" + "h" * 240 + ".example:22)"


def phantoms(leader_id: str, cluster: str, count: int, prefix: str) -> list:
    """``count`` member entries of ``leader_id``, as large as an entry may reasonably be."""
    return [wire.NodeEntry(node_id=str(uuid.uuid4()), name=f"{prefix}{i:05d}".ljust(60, "x"), cluster=cluster,
                           leader=leader_id, role="member", gateways=(FAT_GATEWAY,) * 4) for i in range(count)]


def test_a_leader_registers_at_most_max_members(grid, caplog):
    identity = enroll(grid)
    with raw(grid, grid.rv.address, identity) as sock:
        welcome, decoder = greet(sock, "phantom-lead", "leader", "P")
        assert isinstance(welcome, wire.Welcome)
        entries = phantoms(identity.node_id, "P", MAX_MEMBERS + 500, "ph")
        with caplog.at_level(logging.WARNING, logger="gridsock.bootstrap.rendezvous"):
            for i in range(0, len(entries), wire.MAX_ENTRIES_PER_UPDATE):
                send_message(sock, wire.Register(tuple(entries[i:i + wire.MAX_ENTRIES_PER_UPDATE])))
            barrier(sock, decoder, identity, "phantom-lead")
        assert grid.rv.directory.count_members(identity.node_id) == MAX_MEMBERS
        assert any("at most %d members" % MAX_MEMBERS in r.getMessage() and "500" in r.getMessage()
                   for r in caplog.records)


def test_a_leader_refuses_members_beyond_its_bound(grid):
    grid["L1"]._leader.max_members = 1  # (it has m1)
    identity = enroll(grid)
    with raw(grid, grid["L1"].address, identity) as sock:
        answer, _ = greet(sock, "one-too-many", "member", "A")
    assert isinstance(answer, wire.Refuse) and answer.code == "cluster-full", answer


def test_status_of_a_large_directory_fits_in_a_frame(grid):
    leaders = []
    with contextlib.ExitStack() as stack:
        for k in range(3):
            identity = enroll(grid)
            sock = stack.enter_context(raw(grid, grid.rv.address, identity))
            welcome, decoder = greet(sock, f"big-{k}", "leader", f"P{k}")
            assert isinstance(welcome, wire.Welcome)
            # A link of its own keeps the phantom leader alive (pings) while the others are made:
            # parsing thousands of fat entries in this one process can take longer than a link's
            # timeout on a loaded machine.
            answers: gevent.queue.Queue = gevent.queue.Queue()
            link = Link(sock, decoder, label=f"big-{k}", on_message=lambda _link, message, q=answers: q.put(message))
            stack.callback(link.close)
            link.start()
            entries = phantoms(identity.node_id, f"P{k}", MAX_MEMBERS, f"b{k}-")
            link.send(wire.Register(tuple(entries)))
            link.send(wire.Routed(src=identity.node_id, dst="rendezvous", kind="req", topic="ping", request_id=7,
                                  hops=1, route=(f"big-{k}",)))
            with gevent.Timeout(ANSWER_TIMEOUT_S * 4):  # the ping's answer comes after the Register's handling
                while not (isinstance(message := answers.get(), wire.Routed) and message.request_id == 7):
                    pass
            leaders.append(entries[-1].name)
        total = len(grid.rv.directory)
        assert total >= 3 * MAX_MEMBERS
        assert len(json.dumps(grid.rv.directory.to_json())) > wire.MAX_FRAME_BYTES  # unbounded, it would not fit
        status = control_call(grid.control, "status")
        assert status["directory_size"] == total and status["directory_truncated"]
        assert len(json.dumps(status)) < wire.MAX_FRAME_BYTES
        assert 0 < len(json.dumps(status["directory"])) <= STATUS_MAX_BYTES
        # A node's status too (its directory is the grid's).
        L1 = grid["L1"]
        L1.wait_directory(present=leaders, timeout=CONVERGE_TIMEOUT_S)
        node_status = L1.status()
        assert node_status["directory_size"] >= total and node_status["directory_truncated"]
        assert set(node_status["routes"]) == {e["node_id"] for e in node_status["directory"]}
        assert len(wire.encode(wire.ControlReply(True, node_status, ""))) < wire.MAX_FRAME_BYTES


def test_the_directory_indexes_members_by_leader():
    directory = Directory()
    lead = wire.NodeEntry(node_id=str(uuid.uuid4()), name="L", cluster="A", leader="")
    lead = dataclasses.replace(lead, leader=lead.node_id)
    members = [wire.NodeEntry(node_id=str(uuid.uuid4()), name=f"m{i}", cluster="A", leader=lead.node_id,
                              role="member") for i in range(3)]
    directory.put([lead, *members])
    assert directory.count_members(lead.node_id) == 3 and {e.name for e in directory.members_of(lead.node_id)} == \
        {"m0", "m1", "m2"}
    directory.remove([members[0].node_id])
    moved = dataclasses.replace(members[1], node_id=str(uuid.uuid4()))  # the name moves to a new id
    directory.put([moved])
    assert directory.count_members(lead.node_id) == 2
    directory.apply([lead], (), replace=True)
    assert directory.count_members(lead.node_id) == 0


def test_node_state_saves_atomically_and_reads_back(tmp_path):
    session = create_session(tmp_path / "s", "127.0.0.1:1")
    ca = session.certificate_authority()
    key_pem, csr_pem = new_node_key()
    node_id = str(uuid.uuid4())
    identity = Identity(ca.sign_node(csr_pem, node_id), key_pem)
    state = NodeState(tmp_path / "a" / "b", session).open()
    try:
        assert state.load_identity() is None
        (state.path / (STATE_KEY_FILE + ".new")).write_bytes(b"left by a killed node")
        state.save_identity(identity)
        assert state.load_identity().node_id == node_id
        assert sorted(p.name for p in state.path.iterdir()) == sorted([STATE_KEY_FILE, STATE_CERT_FILE, "lock"])
    finally:
        state.close()
