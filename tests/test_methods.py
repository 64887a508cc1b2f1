"""Methods as components: check_method over every method that works on loopback, and a third
party's method installed through the entry-point group, raced, nominated and used.

(splice, socks and ssh need the lab's NAT, firewall, SOCKS server and sshd:
tests/lab/test_methods.py runs check_method for them.)
"""
from __future__ import annotations

import sys

import pytest

from gridsock.registry import default_registry
from gridsock.testing.grid import loopback_grid
from gridsock.testing.methods import CASES, LocalServer, check_method

pytestmark = pytest.mark.timeout(300)

PORT = 6100


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    with loopback_grid(tmp_path_factory.mktemp("methods")) as running:
        yield running


@pytest.fixture
def servers(grid):
    made = {}

    def server(name):
        made.setdefault(name, LocalServer(grid[name]))
        return made[name]

    yield server
    for handle in made.values():
        handle.close()


# m1 (cluster A) -> L2 (cluster B, default policy: tls from outside its cluster).
@pytest.mark.parametrize("stack,refused", [
    ("tls/tcp", "tcp"),
    ("tls/reverse", "reverse"),
    ("tls/relay", "relay"),
    ("tls/parallel(streams=4)/tcp", "parallel(streams=4)/tcp"),
    ("tls/lz4/tcp", "lz4/tcp"),
])
def test_check_method_across_clusters(grid, servers, stack, refused):
    assert check_method(grid["m1"], servers("L2"), stack, port=PORT, refused_stack=refused) == \
        {case: "ok" for case in CASES}


# Inside cluster A, plain methods; L1 -> m1 (the default policy asks nothing inside a cluster,
# so the policy case uses a stricter server: see test_policy_inside_a_cluster).
@pytest.mark.parametrize("stack", ["tcp", "relay", "reverse", "parallel(streams=2)/tcp"])
def test_check_method_inside_a_cluster(grid, servers, stack):
    cases = [case for case in CASES if case != "policy"]
    assert check_method(grid["L1"], servers("m1"), stack, port=PORT + 10, cases=cases) == {c: "ok" for c in cases}


def test_policy_inside_a_cluster(grid, servers):
    from gridsock.rules import Rules

    server = grid["m1"]
    strict = Rules(inside_cluster=("tls",))
    server.assembler.rules = strict
    try:
        assert check_method(grid["L1"], servers("m1"), "tls/tcp", port=PORT + 20, refused_stack="tcp",
                            cases=["policy", "echo"]) == {"policy": "ok", "echo": "ok"}
    finally:
        server.assembler.rules = server.rules


# --- a third party's method ---------------------------------------------------------------------

_PLUGIN = '''
"""A third party's method: the server listens on a fresh Unix socket for the one connection of
the request and answers its path; the client connects there and sends the preamble."""
import os
import tempfile

import gevent
from gevent import socket

from gridsock import wire
from gridsock.errors import RemoteProtocolError
from gridsock.methods import Initiation, Method, MethodRefusal
from gridsock.streams import SocketStream


class _Connecting(Initiation):
    def __init__(self, ctx):
        self.offer = {"hello": "unixpipe"}
        self.ctx = ctx
        self.sock = None

    def complete(self, answer):
        path = answer.get("path")
        if not isinstance(path, str):
            raise RemoteProtocolError("unixpipe: no path in the answer")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.sock.sendall(wire.encode_preamble(self.ctx.token))
        sock, self.sock = self.sock, None
        return SocketStream(sock, info={"method": "unixpipe"})

    def abort(self):
        if self.sock is not None:
            self.sock.close()


class UnixPipeMethod(Method):
    name = "unixpipe"
    PARAMS = {"fail": bool}
    served = 0

    def __init__(self, fail=False):
        self.fail = fail

    def initiate(self, ctx):
        if self.fail:
            raise ctx.fail("unixpipe: told to fail", method=self.name)
        return _Connecting(ctx)

    def respond(self, ctx):
        if ctx.offer != {"hello": "unixpipe"}:
            raise MethodRefusal("bad-request", "unixpipe: unexpected offer")
        path = os.path.join(tempfile.mkdtemp(prefix="unixpipe-"), "s")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(path)
        listener.listen(1)
        gevent.spawn(self._serve, ctx, listener, path)
        return {"path": path}

    def _serve(self, ctx, listener, path):
        try:
            with gevent.Timeout(10):
                sock, _ = listener.accept()
                head = b""
                while len(head) < wire.PREAMBLE_BYTES:
                    chunk = sock.recv(wire.PREAMBLE_BYTES - len(head))
                    if not chunk:
                        return
                    head += chunk
        finally:
            listener.close()
            os.unlink(path)
            os.rmdir(os.path.dirname(path))
        if wire.decode_preamble(head).token != ctx.token:
            sock.close()
            return
        UnixPipeMethod.served += 1
        ctx.deliver(SocketStream(sock, info={"method": "unixpipe"}))
'''


@pytest.fixture
def unixpipe(tmp_path, monkeypatch):
    """The plugin installed as pip would (module + dist-info with an entry point), found by the
    default registry through the entry-point group."""
    (tmp_path / "gridsock_unixpipe.py").write_text(_PLUGIN)
    dist = tmp_path / "gridsock_unixpipe-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: gridsock-unixpipe\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[gridsock.components]\nunixpipe = gridsock_unixpipe:UnixPipeMethod\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    default_registry.rescan()
    yield
    default_registry.unregister("unixpipe")
    default_registry.rescan()
    sys.modules.pop("gridsock_unixpipe", None)


def test_a_third_party_method_passes_check_method(grid, servers, unixpipe):
    assert default_registry.info("unixpipe").origin.startswith("entry point gridsock_unixpipe:UnixPipeMethod")
    assert check_method(grid["m1"], servers("L2"), "tls/unixpipe", port=PORT + 30, refused_stack="unixpipe") == \
        {case: "ok" for case in CASES}


def test_a_third_party_method_is_raced_nominated_and_used(grid, unixpipe):
    m1, L2 = grid["m1"], grid["L2"]
    listener = L2.listen(PORT + 40)
    plugin = sys.modules.get("gridsock_unixpipe")
    try:
        # It fails: the relay started after it (at once, since every running one failed) wins.
        stream, info = m1.open_stream("L2", PORT + 40, stack=["tls/unixpipe(fail=true)", "tls/relay"])
        server, server_info = listener.accept_stream(timeout=20)
        assert info.stack == server_info.stack == "tls/relay"
        assert info.detail["tried"] == [("tls/unixpipe(fail=true)", "unixpipe: told to fail")]
        stream.close()
        server.close()
        # It works: it starts first and is nominated; the relay never starts or is cancelled.
        plugin = sys.modules["gridsock_unixpipe"]
        served = plugin.UnixPipeMethod.served
        stream, info = m1.open_stream("L2", PORT + 40, stack=["tls/unixpipe", "tls/relay"])
        server, server_info = listener.accept_stream(timeout=20)
        assert info.stack == server_info.stack == "tls/unixpipe"
        assert plugin.UnixPipeMethod.served == served + 1
        assert all(why.startswith("cancelled") for _, why in info.detail.get("tried", []))
        stream.send_all(b"through a third party's method")
        assert server.receive_some(100) == b"through a third party's method"
        stream.close()
        server.close()
    finally:
        listener.close()


def raw_request(grid, port: int, stack: str, token_byte: int, offer=None):
    """A hand-made assembly request from m1 to a listening port of L2; return the answer."""
    from gridsock import assembly, wire

    listener = grid["L2"].listen(port)
    try:
        request = wire.AssemblyRequest(port=port, stack=stack, token=bytes([token_byte]).hex() * 32, offer=offer or {})
        reply = grid["m1"].meta_request("L2", assembly.ASSEMBLE_TOPIC, wire.encode_assembly(request))
        return wire.decode_assembly(reply.payload)
    finally:
        listener.close()


def test_a_bad_offer_is_refused_by_the_method_with_its_code(grid, unixpipe):
    from gridsock import wire

    answer = raw_request(grid, PORT + 50, "tls/unixpipe", 0x22, {"hello": 1})
    assert isinstance(answer, wire.AssemblyRefuse) and answer.code == "bad-request"
    assert "unexpected offer" in answer.reason


def test_an_unknown_method_is_the_callers_error_or_the_servers_refusal(grid):
    from gridsock import wire
    from gridsock.errors import UnknownComponentError

    with pytest.raises(UnknownComponentError):  # the client's own stack string: before any I/O
        grid["m1"].open_stream("L2", PORT, stack="nosuchmethod")
    answer = raw_request(grid, PORT + 60, "tls/nosuchmethod", 0x33)  # a method the server does not have
    assert isinstance(answer, wire.AssemblyRefuse) and answer.code == "bad-stack"
    assert "nosuchmethod" in answer.reason
