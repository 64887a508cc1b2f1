"""Method test kit: the conformance suite :func:`check_method`, for any method, in any grid.

Theory of operation
-------------------
:func:`check_method` runs one method (a stack string whose bottom is the method, with filters
above it if the pair needs them, such as ``tls/splice``) through the cases of :data:`CASES`,
from an in-process client :class:`gridsock.node.Node` to a server node. The server is
reached through a *server handle*: :class:`LocalServer` (a node in the same process) or
:class:`ControlServer` (a node process reached through its control socket: a node of the lab,
in another network namespace). The server serves an echo service (``gridsock.diag``) on the
ports the kit asks for, and tells how many method connections it delivered and how many it
closed without delivering them (``Assembler.counters``).

The cases:

- ``echo``: connect, send 1 MiB while reading the echo, half-close; every byte comes back, in
  order, and the stack is the one asked for on both sides.
- ``policy``: a stack the server's policy refuses (``refused_stack``) is refused with code
  ``policy`` and nothing is delivered.
- ``nothing_listening``: a port where nothing listens is refused with code ``refused``.
- ``deadline``: the connect's deadline passes while the method is under way (the client's
  assembly request is held back past it): ConnectError, nothing is delivered, and the next
  connect works.
- ``cancelled``: a connection established but never nominated (it lost a race) is closed by
  the server, which delivers nothing.
- ``peer_dies``: the server ends a connection abortively in the middle of a stream; the
  client's receive raises BrokenStreamError, never a clean end.

Each case raises AssertionError naming it and what went wrong. Waits are bounded and wait on
conditions, never on fixed delays.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import time
from typing import Any, Callable, Dict, Optional, Sequence

import gevent

from ..bootstrap.transport import Address
from ..components.tcp import TcpMethod
from ..errors import BrokenStreamError, ConnectError
from ..rules import Rules
from ..stack import Stack

__all__ = ["CASES", "check_method", "LocalServer", "ControlServer", "wait_until", "FlopMethod", "FixedRules"]

#: The cases :func:`check_method` runs, in order.
CASES = ("echo", "policy", "nothing_listening", "deadline", "cancelled", "peer_dies")
#: A case gives up after this long (a method that hangs fails its case, not the test run).
CASE_TIMEOUT_S = 60.0
MiB = 1024 * 1024


class FlopMethod(TcpMethod):
    """A test method that dials like ``tcp`` but fails at once, with a reason (register it as
    ``flop``): a candidate that loses every race."""

    name = "flop"

    def dial(self, address: Address, *, node: Any, timeout: float = 0.0) -> Any:
        raise ConnectError("flop: network unreachable", method="flop")


@dataclasses.dataclass(frozen=True)
class FixedRules(Rules):
    """Rules whose candidates are a fixed list of stack strings (with the default policy)."""

    order: tuple = ()

    def candidates(self, src, dst):
        return [Stack.parse(text) for text in self.order]


def wait_until(predicate: Callable[[], bool], timeout: float, what: str, *, step_s: float = 0.01) -> None:
    """Poll ``predicate`` under gevent until it is true; AssertionError after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:g} s")
        gevent.sleep(step_s)


class LocalServer:
    """A server node in this process."""

    def __init__(self, node) -> None:
        self.node = node
        self.name = node.name
        self._served: Dict[int, Any] = {}

    def serve_echo(self, port: int, *, abort_after: Optional[int] = None) -> None:
        from ..diag import serve_echo

        if port not in self._served:
            self._served[port] = serve_echo(self.node, port, abort_after=abort_after)

    def counters(self) -> Dict[str, int]:
        return dict(self.node.assembler.counters)

    def close(self) -> None:
        for port, greenlet in self._served.items():
            greenlet.kill()
            listener = self.node.assembler.listeners.get(port)
            if listener is not None:
                listener.close()
        self._served.clear()


class ControlServer:
    """A server node in another process (a lab node), through its control socket."""

    def __init__(self, control_path: str, name: str) -> None:
        self.path = control_path
        self.name = name

    def _call(self, op: str, args: Optional[dict] = None):
        from ..bootstrap.control import call

        return call(self.path, op, args or {})

    def serve_echo(self, port: int, *, abort_after: Optional[int] = None) -> None:
        self._call("echo", {"port": port, "abort_after": abort_after})

    def counters(self) -> Dict[str, int]:
        return dict(self._call("status")["assembly"])

    def close(self) -> None:
        pass  # the echo services end with the node


def check_method(client, server, stack: str, *, port: int, refused_stack: Optional[str] = None,
                 cases: Sequence[str] = CASES, log: Callable[[str], None] = lambda line: None) -> Dict[str, str]:
    """Run ``cases`` of :data:`CASES` for ``stack`` from node ``client`` to ``server`` (a server
    handle); return ``{case: "ok"}``. Uses grid ports ``port`` to ``port + 3`` of the server.

    ``refused_stack``: a stack the server's policy refuses from this client (needed for the
    ``policy`` case). Raises AssertionError (naming the case) on the first failure.
    """
    unknown = set(cases) - set(CASES)
    if unknown:
        raise ValueError(f"unknown cases {sorted(unknown)}; known: {', '.join(CASES)}")
    server.serve_echo(port)
    server.serve_echo(port + 2, abort_after=64 * 1024)
    env = _Env(client, server, stack, port, refused_stack)
    results = {}
    for case in cases:
        try:
            with gevent.Timeout(CASE_TIMEOUT_S, AssertionError(f"no result within {CASE_TIMEOUT_S:g} s")):
                _CASES[case](env)
        except AssertionError as exc:
            raise AssertionError(f"check_method({stack!r}, {client.name} -> {server.name}) case {case}: {exc}") from exc
        log(f"{stack} {client.name} -> {server.name}: {case} ok")
        results[case] = "ok"
    return results


class _Env:
    def __init__(self, client, server, stack: str, port: int, refused_stack: Optional[str]) -> None:
        self.client = client
        self.server = server
        self.stack = stack
        self.port = port
        self.refused_stack = refused_stack


def _echo(env: _Env) -> None:
    stream, info = env.client.open_stream(env.server.name, env.port, stack=env.stack)
    assert info.stack == env.stack, f"connected over {info.stack}"
    assert stream.info.get("stack", env.stack) == env.stack, f"the stream says {stream.info.get('stack')}"
    data = os.urandom(MiB)
    received = bytearray()

    def receive() -> None:
        while True:
            chunk = stream.receive_some()
            if not chunk:
                return
            received.extend(chunk)

    reader = gevent.spawn(receive)
    try:
        for i in range(0, len(data), 100_000):
            stream.send_all(data[i : i + 100_000])
        stream.send_eof()
        reader.get()
    finally:
        reader.kill()
        stream.close()
    assert hashlib.sha256(received).digest() == hashlib.sha256(data).digest(), \
        f"echo returned {len(received)} bytes, not the {len(data)} sent"


def _refused(env: _Env, stack: str, port: int, code: str) -> None:
    before = env.server.counters()
    try:
        stream, info = env.client.open_stream(env.server.name, port, stack=stack)
    except ConnectError as exc:
        assert exc.code == code, f"refused with code {exc.code!r}, not {code!r}: {exc}"
    else:
        stream.close()
        raise AssertionError(f"{stack} to port {port} was not refused")
    assert env.server.counters()["delivered"] == before["delivered"], "the server delivered a connection"


def _policy(env: _Env) -> None:
    if env.refused_stack is None:
        raise AssertionError("no refused_stack given for this pair")
    _refused(env, env.refused_stack, env.port, "policy")


def _nothing_listening(env: _Env) -> None:
    _refused(env, env.stack, env.port + 3, "refused")


def _deadline(env: _Env) -> None:
    client = env.client
    before = env.server.counters()
    real = client.meta_request
    deadline_s = 0.3

    def held_back(*args, **kwargs):
        gevent.sleep(deadline_s * 3)  # the race's deadline passes first: this attempt is killed
        return real(*args, **kwargs)

    client.meta_request = held_back  # an instance attribute hides the method
    try:
        started = time.monotonic()
        try:
            stream, _ = client.open_stream(env.server.name, env.port, stack=env.stack, timeout=deadline_s)
        except ConnectError as exc:
            assert exc.code is None, f"a refusal ({exc.code}), not a deadline"
            assert isinstance(exc, TimeoutError), f"not a timeout ({type(exc).__name__}): {exc}"
        else:
            stream.close()
            raise AssertionError("connected although the request was held back past the deadline")
        assert time.monotonic() - started < deadline_s + 5.0, "the connect outlived its deadline by far"
    finally:
        del client.meta_request
    assert env.server.counters()["delivered"] == before["delivered"], "the server delivered a connection"
    _echo(env)  # nothing is left half-made that stops the next connect


def _cancelled(env: _Env) -> None:
    from ..stack import Stack

    assembler = env.client.assembler
    entry = env.client.directory.resolve(env.server.name)
    before = env.server.counters()
    lower, _, _, _ = assembler._establish(entry, env.port, Stack.parse(env.stack), time.monotonic() + 15.0)
    # It lost the race: never nominated. Closed in order (an end, then the close): a reset may
    # overtake the preamble still in flight, and a server whose side never read it fails that
    # attempt instead (it delivers nothing either, but counts nothing as not taken).
    lower.send_eof()
    lower.close()
    wait_until(lambda: env.server.counters()["not_taken"] > before["not_taken"], 15.0,
               "the server closing the connection that was not nominated")
    assert env.server.counters()["delivered"] == before["delivered"], "the server delivered it anyway"


def _peer_dies(env: _Env) -> None:
    stream, _ = env.client.open_stream(env.server.name, env.port + 2, stack=env.stack)
    received = 0
    payload = os.urandom(64 * 1024)

    def send() -> None:
        try:
            for _ in range(64):  # 4 MiB at most: the server aborts after 64 KiB
                stream.send_all(payload)
        except BrokenStreamError:
            pass  # the break, seen by the sender first

    sender = gevent.spawn(send)
    try:
        while True:
            try:
                chunk = stream.receive_some()
            except BrokenStreamError:
                return  # a break is a break
            if not chunk:
                raise AssertionError(f"the connection ended cleanly after {received} bytes although the "
                                     "server aborted it")
            received += len(chunk)
    finally:
        sender.kill()
        stream.close()


_CASES: Dict[str, Callable[[_Env], None]] = {
    "echo": _echo,
    "policy": _policy,
    "nothing_listening": _nothing_listening,
    "deadline": _deadline,
    "cancelled": _cancelled,
    "peer_dies": _peer_dies,
}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m gridsock.testing.methods``: run check_method from a node of this process (a
    new node joining the session, placed where the test runs this, such as a lab namespace) to
    a running node reached through its control socket. Prints one line ``check_method ok
    {...}`` or ``check_method failed: ...``; exit status 0 or 1."""
    import argparse
    import json
    import logging

    from ..node import Node
    from ..session import Session

    parser = argparse.ArgumentParser(prog="python -m gridsock.testing.methods", description=main.__doc__)
    parser.add_argument("--session", required=True)
    parser.add_argument("--name", required=True, help="the name of the client node this process starts")
    parser.add_argument("--cluster")
    parser.add_argument("--leader", help="the leader's node port (a member); none: a leader itself")
    parser.add_argument("--listen", required=True)
    parser.add_argument("--ssh-key")
    parser.add_argument("--ssh-known-hosts")
    parser.add_argument("--server", required=True, help="the server node's name")
    parser.add_argument("--server-control", required=True, help="the server node's control socket")
    parser.add_argument("--stack", required=True)
    parser.add_argument("--refused", help="a stack the server's policy refuses from this client")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--timeout", type=float, default=30.0, help="for joining")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    node = Node(Session.load(args.session), args.name, cluster=args.cluster, leader=args.leader,
                listen_address=args.listen, control="", agent="", ssh_key=args.ssh_key,
                ssh_known_hosts=args.ssh_known_hosts, loop="caller").start()
    try:
        if not node.wait_joined(args.timeout):
            print(f"check_method failed: {args.name} did not join within {args.timeout:g} s", flush=True)
            return 1
        node.wait_directory(present=[args.server], settled=True, timeout=args.timeout)
        results = check_method(node, ControlServer(args.server_control, args.server), args.stack, port=args.port,
                               refused_stack=args.refused, cases=args.cases.split(","))
    except AssertionError as exc:
        print(f"check_method failed: {exc}", flush=True)
        return 1
    finally:
        node.stop()
    print("check_method ok " + json.dumps(results), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
