"""Clusters are attested, not declared (issue 16): a cluster's nodes hold its credential.

A session that defines its clusters gives each a join token of its own (in the cluster's
session file); the certificate a node gets with it names the cluster, and the rendez-vous node
and leaders accept a node into a cluster only on that evidence. The grid here: in-process nodes
on loopback under gevent (a rendez-vous node, leader L1 of cluster A with member m1, leader L2
of cluster B with member m2; cluster C is defined and has no node), and processes for the
CLI's exit status. Every wait is an event, a line, a reply or a bounded wait on a directory,
never a sleep.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os
import re
import stat
import subprocess
import time
import uuid

import gevent
import pytest
from cryptography import x509

from gridsock import wire
from gridsock.bootstrap.link import read_message, send_message
from gridsock.bootstrap.rendezvous import RendezvousNode
from gridsock.bootstrap.transport import dial, parse_address, tls_client
from gridsock.errors import AuthError, ConfigError, ConnectRefusedError
from gridsock.node import Node
from gridsock.rules import Rules
from gridsock.session import (CLUSTER_URI_PREFIX, CLUSTERS_FILE, NODE_URI_PREFIX, ClusterTokens, Identity, Session,
                              add_cluster, client_context, cluster_file_name, create_session, new_node_key)
from gridsock.testing.procs import gridsock_argv, stop_process, wait_for_line

pytestmark = pytest.mark.timeout(120)

# Joining and converging take milliseconds on loopback; these only stop a broken grid hanging.
JOIN_TIMEOUT_S = 10.0
CONVERGE_TIMEOUT_S = 10.0
ANSWER_TIMEOUT_S = 5.0
# A gridsock process starts (imports included) and joins well within this.
READY_TIMEOUT_S = 30.0
STRICT_ENV = {"PYTHONWARNINGS": "error", "PYTHONDEVMODE": "1", "PYTHONUNBUFFERED": "1"}
CLUSTERS = ("A", "B", "C")


# --- the session: cluster tokens and cluster session files ------------------------------------


def test_each_defined_cluster_gets_a_token_and_a_session_file_of_its_own(tmp_path):
    session = create_session(tmp_path / "s", "127.0.0.1:7700", clusters=("A", "b.2"))
    files = {name: tmp_path / "s" / name for name in (CLUSTERS_FILE, cluster_file_name("A"), cluster_file_name("b.2"))}
    for path in files.values():
        assert stat.S_IMODE(os.lstat(path).st_mode) == 0o600, path  # each holds a secret
    a, b = session.for_cluster("A"), session.for_cluster("b.2")
    assert (a.cluster, b.cluster, session.cluster) == ("A", "b.2", None)
    assert a.session_id == b.session_id == session.session_id and a.ca_cert_pem == session.ca_cert_pem
    assert len({a.join_token, b.join_token, session.join_token}) == 3
    tokens = ClusterTokens(session)
    assert tokens.admit(a.join_token) == (True, "A")
    assert tokens.admit(b.join_token) == (True, "b.2")
    assert tokens.admit(session.join_token) == (True, None)
    for wrong in ("x" * len(a.join_token), None, 7, a.join_token[:-1], "\udc80"):
        assert tokens.admit(wrong) == (False, None)
    # A cluster defined later is admitted at once (the file is read again when it changes).
    d = add_cluster(tmp_path / "s", "D")
    assert tokens.admit(d.join_token) == (True, "D") and set(tokens.current()) == {"A", "b.2", "D"}
    assert Session.load(files[cluster_file_name("A")]).cluster == "A"  # (what a node is handed)


@pytest.mark.parametrize("case", ["twice", "bad-name", "plain-tcp", "cluster-file", "not-rv-host", "duplicate"])
def test_a_cluster_that_cannot_be_defined_is_a_config_error(tmp_path, case):
    if case == "plain-tcp":
        with pytest.raises(ConfigError, match="plain-TCP"):
            create_session(tmp_path / "p", "127.0.0.1:7700", bootstrap="tcp", clusters=("A",))
        assert not (tmp_path / "p" / "session.toml").exists()  # nothing left behind
        return
    if case == "duplicate":
        with pytest.raises(ConfigError, match="each cluster once"):
            create_session(tmp_path / "d", "127.0.0.1:7700", clusters=("A", "A"))
        return
    session = create_session(tmp_path / "s", "127.0.0.1:7700", clusters=("A",))
    with pytest.raises(ConfigError) as info:
        if case == "twice":
            add_cluster(session, "A")
        elif case == "bad-name":
            add_cluster(session, "-A")
        elif case == "cluster-file":
            add_cluster(session.for_cluster("A"), "E")
        else:  # a copy of session.toml on a node's host: no CA key beside it
            node_dir = tmp_path / "node"
            node_dir.mkdir()
            (node_dir / "session.toml").write_bytes((tmp_path / "s" / "session.toml").read_bytes())
            add_cluster(node_dir / "session.toml", "E")
    assert {"twice": "already defined", "bad-name": "not a valid cluster name", "cluster-file": "session's own",
            "not-rv-host": "not the rendez-vous host"}[case] in str(info.value)
    assert set(ClusterTokens(session).current()) == {"A"}
    with pytest.raises(ConfigError, match="not defined"):
        session.for_cluster("E")
    # A cluster's session file cannot run the rendez-vous node: its token would admit
    # nodes without a cluster.
    with pytest.raises(ConfigError, match="session's own"):
        RendezvousNode(session.for_cluster("A"), listen_address="127.0.0.1:0", control="")


def _leaf(ca, uris) -> bytes:
    """A certificate of ``ca`` (the session CA) with these SAN URIs: what gridsock never issues."""
    key_pem, csr_pem = new_node_key()
    csr = x509.load_pem_x509_csr(csr_pem)
    return ca._issue(csr.public_key(), "odd", [x509.UniformResourceIdentifier(u) for u in uris], 3600), key_pem


def test_a_certificate_names_the_cluster_beside_the_node_id(tmp_path):
    session = create_session(tmp_path / "s", "127.0.0.1:7700")
    ca = session.certificate_authority()
    key_pem, csr_pem = new_node_key()
    node_id = str(uuid.uuid4())
    identity = Identity(ca.sign_node(csr_pem, node_id, cluster="B"), key_pem)
    assert (identity.node_id, identity.cluster, identity.subject.cluster) == (node_id, "B", "B")
    cert = x509.load_pem_x509_certificate(identity.cert_pem)
    uris = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.UniformResourceIdentifier)
    assert uris == [NODE_URI_PREFIX + node_id, CLUSTER_URI_PREFIX + "B"]
    assert cert.not_valid_after_utc > datetime.datetime.now(datetime.timezone.utc)
    assert Identity(ca.sign_node(csr_pem, node_id), key_pem).cluster is None
    # Two clusters, a bad cluster name, a cluster on the rendez-vous identity: no identity at all.
    for uris in ([NODE_URI_PREFIX + node_id, CLUSTER_URI_PREFIX + "A", CLUSTER_URI_PREFIX + "B"],
                 [NODE_URI_PREFIX + node_id, CLUSTER_URI_PREFIX + "A/B"],
                 ["urn:gridsock:rendezvous:" + session.session_id, CLUSTER_URI_PREFIX + "A"]):
        cert_pem, key = _leaf(ca, uris)
        with pytest.raises(ConfigError, match="no gridsock node or rendez-vous URI"):
            Identity(cert_pem, key)


# --- a grid whose session attests its clusters ------------------------------------------------


class Grid:
    """A rendez-vous node of a session that defines ``CLUSTERS``, and the nodes a test starts."""

    def __init__(self, workdir) -> None:
        self.main = create_session(workdir / "session", "127.0.0.1:1", clusters=CLUSTERS)
        self.workdir = workdir
        self.rv = RendezvousNode(self.main, listen_address="127.0.0.1:0", control="").start()
        self.port = self.rv.address.port
        self.nodes: dict = {}
        self._started: list = []

    def session(self, cluster: str | None = None) -> Session:
        """The session file a node of ``cluster`` is handed (the main one for None), with the port."""
        session = self.main if cluster is None else self.main.for_cluster(cluster)
        return dataclasses.replace(session, rendezvous_port=self.port)

    def restart_rendezvous(self) -> None:
        self.rv.stop()
        gevent.idle()  # the loop closes the listening socket (its watcher's callback) before it is idle
        self.rv = RendezvousNode(self.main, listen_address=f"127.0.0.1:{self.port}", control="").start()

    def node(self, name: str, *, credential: str | None = None, **kwargs) -> Node:
        """Start node ``name`` with the session file of cluster ``credential`` (not waiting)."""
        for key, value in (("listen_address", "127.0.0.1:0"), ("control", ""), ("agent", ""), ("front_door", None)):
            kwargs.setdefault(key, value)
        node = Node(self.session(credential), name, **kwargs)
        self._started.append(node)
        self.nodes.setdefault(name, node)
        return node.start()

    def joined(self, name: str, **kwargs) -> Node:
        node = self.node(name, **kwargs)
        assert node.wait_joined(JOIN_TIMEOUT_S), f"{name} did not join"
        return node

    def __getitem__(self, name: str) -> Node:
        return self.nodes[name]

    def wait_rv(self, *, present=(), absent=()) -> None:
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
        g.joined("L1", cluster="A", credential="A", state_dir=str(sock_dir / "state-L1"))
        g.joined("L2", cluster="B", credential="B", state_dir=str(sock_dir / "state-L2"))
        g.joined("m1", cluster="A", credential="A", leader=str(g["L1"].address))
        g.joined("m2", cluster="B", credential="B", leader=str(g["L2"].address))
        for name in ("L1", "L2", "m1", "m2"):
            g[name].wait_directory(present=["L1", "L2", "m1", "m2"], timeout=CONVERGE_TIMEOUT_S)
        yield g
    finally:
        g.stop()


def refusal(node: Node) -> AuthError:
    """The fatal refusal that ``node`` gets when it tries to join."""
    with pytest.raises(AuthError) as info:
        node.wait_joined(JOIN_TIMEOUT_S)
    assert node.fatal_error is info.value
    return info.value


def assert_absent(grid: Grid, name: str) -> None:
    """No directory of the grid names ``name`` (the refused never enters one)."""
    assert grid.rv.directory.by_name(name) is None
    for node in ("L1", "L2", "m1", "m2"):
        assert grid[node].directory.by_name(name) is None, node


def test_each_node_is_in_the_cluster_its_certificate_names(grid):
    for name, cluster in (("L1", "A"), ("L2", "B"), ("m1", "A"), ("m2", "B")):
        assert grid[name].identity.cluster == cluster
        assert grid.rv.directory.by_name(name).cluster == cluster
        assert grid["m1"].directory.by_name(name).cluster == cluster
    # The main token admits a node without a cluster, as before.
    loner = grid.joined("loner", credential=None)
    assert loner.identity.cluster is None and grid.rv.directory.by_name("loner").cluster is None


@pytest.mark.parametrize("cluster", ["B", "C", "Z"], ids=["held", "defined-unheld", "undefined"])
def test_a_leader_that_declares_a_cluster_without_its_credential_is_refused(grid, cluster):
    # With the session's main token: a certificate that names no cluster. Before, cluster C
    # (defined, nobody leading it) and Z went to the first node that claimed them.
    rogue = grid.node("rogue", cluster=cluster, credential=None)
    exc = refusal(rogue)
    assert exc.method == "cluster-not-attested"
    assert f"declares cluster {cluster!r}, but its certificate names no cluster" in str(exc)
    assert cluster_file_name(cluster) in str(exc)  # what to do about it
    assert rogue.identity.cluster is None
    assert_absent(grid, "rogue")
    # Cluster C is still free for its own nodes.
    if cluster == "C":
        assert grid.joined("c1", cluster="C", credential="C").entry.cluster == "C"


@pytest.mark.parametrize("credential", [None, "A"], ids=["no-cluster", "cluster-A"])
def test_a_member_without_its_leaders_cluster_in_its_certificate_is_refused_by_the_leader(grid, credential):
    if credential is None:
        rogue = grid.node("rogue", cluster="B", leader=str(grid["L2"].address))
        exc = refusal(rogue)
        assert exc.method == "cluster-not-attested" and "L2 leads cluster 'B'" in str(exc)
        assert "certificate names no cluster" in str(exc)
        assert_absent(grid, "rogue")
    # Saying nothing of its cluster does not help: a member's cluster is its leader's, on
    # evidence (a node with A's file is a node of A, which its certificate names: not L2's).
    quiet = grid.node("quiet", credential=credential, leader=str(grid["L2"].address))
    assert refusal(quiet).method == ("cluster-not-attested" if credential is None else "wrong-cluster")
    assert_absent(grid, "quiet")


def test_a_node_refused_its_cluster_gets_no_raw_stack_to_that_clusters_nodes(grid):
    rogue = grid.node("rogue", cluster="B", credential=None)
    assert refusal(rogue).method == "cluster-not-attested"
    # What it can be is a node without a cluster: outside B, so B's policy wants tls from it.
    listener = grid["m2"].listen(7)
    try:
        outsider = grid.joined("outsider", credential=None)
        grid["m2"].wait_directory(present=["outsider"], timeout=CONVERGE_TIMEOUT_S)
        assert grid["m2"].directory.by_name("outsider").cluster is None
        rules = Rules()
        assert rules.required(grid["m2"].entry, grid["m2"].directory.by_name("outsider")) == ("tls",)
        with pytest.raises(ConnectRefusedError) as info:
            outsider.connect("m2", 7, stack="tcp", timeout=ANSWER_TIMEOUT_S)
        assert info.value.code == "policy"
        # A node of B itself gets plain tcp: the policy is not closed to everyone.
        b3 = grid.joined("b3", cluster="B", credential="B", leader=str(grid["L2"].address))
        grid["m2"].wait_directory(present=["b3"], timeout=CONVERGE_TIMEOUT_S)
        for client, stack in ((outsider, "tls/relay"), (b3, "tcp")):
            sock, conn = client.connect("m2", 7, stack=stack, timeout=ANSWER_TIMEOUT_S)
            served, served_info = listener.accept(ANSWER_TIMEOUT_S)
            assert str(conn.stack) == str(served_info.stack) == stack
            sock.close()
            served.close()
    finally:
        listener.close()


def test_a_rendezvous_restart_keeps_the_cluster_with_the_nodes_its_certificates_name(grid, sock_dir):
    l2_id, l2_address = grid["L2"].node_id, str(grid["L2"].address)
    grid["L2"].stop()  # (m2 waits for it to come back at its address)
    grid.restart_rendezvous()
    grid.wait_rv(present=["L1", "m1"])
    # The new rendez-vous node remembers nothing, and nobody leads B: first come, first served
    # would give B to the rogue now. The certificate says otherwise.
    rogue = grid.node("rogue", cluster="B", credential=None)
    assert refusal(rogue).method == "cluster-not-attested"
    # B's own leader comes back (its state directory: the same id) and leads B again.
    back = grid.node("L2", cluster="B", credential="B", state_dir=str(sock_dir / "state-L2"),
                     listen_address=l2_address)
    assert back.wait_joined(JOIN_TIMEOUT_S)
    assert back.node_id == l2_id and grid.rv.directory.by_name("L2").cluster == "B"
    grid.wait_rv(present=["L2", "m2"], absent=["rogue"])
    assert grid.rv.directory.by_name("m2").leader == l2_id


def test_a_node_whose_saved_identity_predates_its_cluster_enrolls_again(grid, sock_dir):
    state = str(sock_dir / "state-c")
    first = grid.joined("c9", credential=None, state_dir=state)
    old_id = first.node_id
    assert first.identity.cluster is None
    first.stop()
    grid.wait_rv(absent=["c9"])
    again = grid.joined("c9", cluster="C", credential="C", state_dir=state)
    assert again.identity.cluster == "C" and again.node_id != old_id
    assert grid.rv.directory.by_name("c9").cluster == "C"
    again.stop()
    grid.wait_rv(absent=["c9"])
    # Kept: the next start is the same C node.
    third = grid.joined("c9", cluster="C", credential="C", state_dir=state)
    assert third.node_id == again.node_id


def test_a_cluster_defined_while_the_rendezvous_node_runs_is_admitted(grid):
    add_cluster(grid.main, "D")
    assert grid.joined("d1", cluster="D", credential="D").entry.cluster == "D"
    assert refusal(grid.node("d-rogue", cluster="D", credential=None)).method == "cluster-not-attested"


def test_a_cluster_taken_out_of_the_session_admits_none_of_its_nodes_any_more(grid, sock_dir, caplog):
    state = str(sock_dir / "state-c1")
    c1 = grid.joined("c1", cluster="C", credential="C", state_dir=state)
    c1.stop()
    grid.wait_rv(absent=["c1"])
    tokens_file = grid.main.path.with_name(CLUSTERS_FILE)
    text = tokens_file.read_text()
    tokens_file.write_text("\n".join(line for line in text.splitlines() if not line.startswith("C ")) + "\n")
    assert set(grid.rv.cluster_tokens.current()) == {"A", "B"}
    exc = refusal(grid.node("c1", cluster="C", credential="C", state_dir=state))  # its certificate names C
    assert exc.method == "cluster-not-attested" and "no longer defined" in str(exc)
    assert refusal(grid.node("c2", cluster="C", credential="C")).method == "bad-token"  # C's token is void
    # A file that turns bad is logged, and the clusters read before stay.
    tokens_file.write_text("[clusters]\nA = 1\n")
    with caplog.at_level("WARNING", logger="gridsock.session"):
        assert set(grid.rv.cluster_tokens.current()) == {"A", "B"}
    assert "not a join token" in caplog.text


def test_a_session_without_clusters_still_lets_nodes_declare_them(sock_dir):
    # The compatibility rule: no cluster defined, the one token admits a node to any cluster.
    session = create_session(sock_dir / "legacy", "127.0.0.1:1")
    rv = RendezvousNode(session, listen_address="127.0.0.1:0", control="").start()
    session = dataclasses.replace(session, rendezvous_port=rv.address.port)
    nodes: list = []
    try:
        for name in ("L", "m"):
            leader = str(nodes[0].address) if nodes else None
            node = Node(session, name, cluster="A", leader=leader, listen_address="127.0.0.1:0", control="", agent="",
                        front_door=None)
            nodes.append(node.start())
            assert node.wait_joined(JOIN_TIMEOUT_S)
            assert node.identity.cluster is None and node.entry.cluster == "A"
    finally:
        for node in reversed(nodes):
            node.stop()
        rv.stop()


def test_hello_naming_another_cluster_than_the_certificate_is_refused_on_the_wire(grid):
    # The checks alone, with a certificate of cluster A and a raw Hello: as a leader at the
    # rendez-vous node, as a member at B's leader.
    key_pem, csr_pem = new_node_key()
    session = grid.session("A")
    with _tls(session, grid.rv.address, None) as sock:
        send_message(sock, wire.Enroll(token=session.join_token, csr_pem=csr_pem.decode(), name="raw"))
        enrolled = read_message(sock, wire.Decoder(), timeout=ANSWER_TIMEOUT_S)
    identity = Identity(enrolled.cert_pem.encode(), key_pem)
    assert identity.cluster == "A"
    for declared, expected in (("B", "declares cluster 'B'"), (None, "declares no cluster")):
        with _tls(session, grid.rv.address, identity) as sock:
            send_message(sock, wire.Hello(name="raw", cluster=declared, role="leader"))
            answer = read_message(sock, wire.Decoder(), timeout=ANSWER_TIMEOUT_S)
        assert isinstance(answer, wire.Refuse) and answer.code == "cluster-not-attested", answer
        assert expected in answer.reason
    with _tls(session, grid["L2"].address, identity) as sock:
        send_message(sock, wire.Hello(name="raw", cluster="B", role="member"))
        answer = read_message(sock, wire.Decoder(), timeout=ANSWER_TIMEOUT_S)
    assert isinstance(answer, wire.Refuse) and answer.code == "cluster-not-attested", answer
    assert "L2 leads cluster 'B': this node's certificate names cluster 'A', not 'B'" in answer.reason
    assert grid.rv.directory.by_name("raw") is None and grid["L2"].directory.by_name("raw") is None


@contextlib.contextmanager
def _tls(session: Session, address, identity: Identity | None):
    sock = dial(parse_address(str(address)), timeout=ANSWER_TIMEOUT_S)
    try:
        sock = tls_client(sock, client_context(session, identity), timeout=ANSWER_TIMEOUT_S)
        yield sock
    finally:
        sock.close()


# --- the CLI ----------------------------------------------------------------------------------


@pytest.fixture
def procs():
    started: list = []
    yield started
    for proc in reversed(started):
        stop_process(proc)


def test_gridsock_node_without_the_clusters_credential_exits_2_with_the_reason(procs, sock_dir, tmp_path):
    env = dict(os.environ, GRIDSOCK_RUN_DIR=str(sock_dir / "run"), XDG_STATE_HOME=str(sock_dir / "xdg"),
               **STRICT_ENV)
    main = create_session(tmp_path / "rv", "127.0.0.1:1", clusters=("B",))
    with open(tmp_path / "rendezvous.log", "wb") as log:
        rv = subprocess.Popen(gridsock_argv("rendezvous", "--session", str(main.path), "--listen", "127.0.0.1:0"),
                              stdout=subprocess.PIPE, stderr=log, env=env)
    procs.append(rv)
    port = int(wait_for_line(rv, "rendezvous listening ", timeout=READY_TIMEOUT_S).rsplit(":", 1)[1])
    handed = {}
    for what in ("session.toml", cluster_file_name("B")):  # what a node's host is handed, with the port
        text = (tmp_path / "rv" / what).read_text()
        handed[what] = tmp_path / f"node-{what}"
        handed[what].write_text(re.sub(r'^rendezvous = "127\.0\.0\.1:[0-9]+"$', f'rendezvous = "127.0.0.1:{port}"',
                                       text, flags=re.M))
    common = ("--listen", "127.0.0.1:0", "--control", "", "--front-door", "off")
    with open(tmp_path / "b1.log", "wb") as log:
        b1 = subprocess.Popen(gridsock_argv("node", "--session", str(handed[cluster_file_name("B")]), "--name", "b1",
                                            "--cluster", "B", *common), stdout=subprocess.PIPE, stderr=log, env=env)
    procs.append(b1)
    wait_for_line(b1, "joined b1 ", timeout=READY_TIMEOUT_S)
    rogue = subprocess.run(gridsock_argv("node", "--session", str(handed["session.toml"]), "--name", "rogue",
                                         "--cluster", "B", *common),
                           capture_output=True, text=True, env=env, timeout=READY_TIMEOUT_S)
    assert rogue.returncode == 2, rogue.stderr
    assert re.search(r"gridsock node: refused: rogue declares cluster 'B', but its certificate names no cluster",
                     rogue.stderr), rogue.stderr
    assert "Traceback" not in rogue.stderr
    assert b1.poll() is None  # B's leader runs on
