"""Malformed inputs for every listener, and a driver that sends them: the CI fuzz test's and the
long campaign's (bench/bench_fuzz.py) one source.

Theory of operation
-------------------
A *case* is what one bad client does on one connection: the bytes it sends (built with
:mod:`gridsock.wire`, so that they reach past the framing into the decoders and the handlers),
the descriptor it passes with them on a Unix socket (agent), and how it ends:

- ``"close"``: send, then close at once (the server sees the end inside or after a frame);
- ``"half-close"``: send, shut down its write side, read until the server closes (bounded);
- ``"hold"``: send, keep the connection open (a half-open client) until the caller lets go.

Kinds of bytes, for each protocol: random bytes; valid frames cut short; a length field over
``MAX_FRAME_BYTES``; a valid frame header with a bad body (not JSON, JSON of the wrong shape,
deep nesting, huge or non-finite numbers, bad UTF-8, wrong type for the place); valid frames
with bytes flipped; and protocol-valid messages with bad arguments (control and agent
operations). Every generator takes a :class:`random.Random`: a seed gives the same cases.
"""
from __future__ import annotations

import array
import dataclasses
import os
import random
import socket
import struct
import time
import uuid
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from .. import wire

__all__ = ["Case", "frame", "bootstrap_cases", "data_cases", "control_cases", "control_op_cases", "agent_cases",
           "routed_cases", "routed_payloads", "ROUTED_TOPICS", "send_case", "BAD_VALUES", "NODE_CONTROL_OPS", "RENDEZVOUS_CONTROL_OPS", "AGENT_OPS",
           "rss_bytes", "MODES"]

MODES = ("close", "half-close", "hold")
# What one case sends at most: enough for every kind above, little enough for thousands of cases.
MAX_CASE_BYTES = 64 * 1024
_HEAD = struct.Struct("!IBBI")  # length, version, type, header_len


@dataclasses.dataclass(frozen=True)
class Case:
    """One bad client: ``data`` to send, how it ends (:data:`MODES`), whether a descriptor goes
    with the first byte (Unix sockets only), and what it is (for a report)."""

    data: bytes
    mode: str = "close"
    with_fd: bool = False
    kind: str = ""


def frame(type_code: int, header: bytes, payload: bytes = b"", *, version: int = wire.PROTOCOL_VERSION,
          length: Optional[int] = None) -> bytes:
    """A wire frame with any ``type_code``, ``header`` bytes and ``payload`` (``length``
    overrides the length field: a lie)."""
    body_len = 6 + len(header) + len(payload)
    return _HEAD.pack(body_len if length is None else length, version, type_code, len(header)) + header + payload


def _samples() -> List[wire._Message]:
    node_id = str(uuid.UUID(int=0x1234))
    return [
        wire.Hello(name="fuzz", cluster="A", role="member"),
        wire.Hello(name="fuzz", cluster=None, role="leader", addrs=("127.0.0.1:1",), node_id=node_id, token="t"),
        wire.Hello(name="rendezvous", cluster=None, role="probe"),
        wire.Hello(name="fuzz", cluster=None, role="peer"),
        wire.Enroll(token="x" * 43, csr_pem="-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
                    name="fuzz"),
        wire.Ping(7),
        wire.Pong(7),
        wire.Register(()),
        wire.DirectoryUpdate(),
        wire.Routed(src=node_id, dst="rendezvous", kind="req", topic="ping", payload=b"x"),
        wire.Control("status", {}),
        wire.ControlReply(True, {"a": 1}),
    ]


# Headers that break a body in every way the decoder must survive.
BAD_HEADERS: Tuple[bytes, ...] = (
    b"", b"{", b"[]", b'"x"', b"null", b"1", b"{}", b'{"name": 5}', b'{"op": "status", "args": []}',
    b'{"nonce": -1}', b'{"nonce": 1.0}', b'{"nonce": true}', b'{"nonce": 1e400}', b'{"nonce": NaN}',
    b'{"nonce": Infinity}', b'{"nonce": ' + b"9" * 5000 + b"}", b"[" * 5000 + b"]" * 5000,
    b'{"a": ' + b"[" * 2000 + b"]" * 2000 + b"}", b"\xff\xfe{}", b'{"name": "\\ud800"}', b'{"a": 1, "a": 2}',
    b'\xef\xbb\xbf{"nonce": 1}', b'{"op": "' + b"x" * 70 + b'", "args": {}}',
    b'{"op": "status", "args": {"progress_interval_s": -1}}',
    b'{"src": "x", "dst": "y", "kind": "msg", "topic": "t"}',
    b'{"entries": [{"node_id": 1}]}',
    b'{"name": "a", "cluster": null, "role": "member", "addrs": ["' + b"h" * 300 + b':1"]}',
)

# Argument values of every wrong type and range.
BAD_VALUES: Tuple[Any, ...] = (
    True, False, -1, 0, 1.5, 2 ** 64, -(2 ** 63), 1e308, "", "x" * 1000, "\u00e9" * 600, "\ud800", "0",
    [], [1, "a"], {}, {"a": {"b": [None]}}, [[[[[[[[[[]]]]]]]]]], None,
)


def bootstrap_cases(rng: random.Random, count: int) -> List[Case]:
    """Cases for a port that speaks the bootstrap protocol first (rendez-vous port, node port)."""
    samples = [wire.encode(m) for m in _samples()]
    makers = [
        lambda: Case(rng.randbytes(rng.randrange(0, 300)), kind="random"),
        lambda: _cut(rng, rng.choice(samples)),
        lambda: Case(struct.pack("!I", rng.randrange(wire.MAX_FRAME_BYTES + 1, 2 ** 32)) + rng.randbytes(rng.randrange(0, 64)),
                     kind="oversized"),
        lambda: Case(struct.pack("!I", rng.randrange(0, 6)) + rng.randbytes(rng.randrange(0, 16)), kind="undersized"),
        lambda: Case(frame(rng.randrange(0, 20), rng.choice(BAD_HEADERS)), kind="bad-body"),
        lambda: Case(frame(rng.randrange(1, 17), b"{}", rng.randbytes(rng.randrange(0, 32))), kind="payload-where-none"),
        lambda: Case(frame(3, b"{}", version=rng.choice([0, 2, 255])), kind="bad-version"),
        lambda: Case(frame(rng.randrange(1, 17), b"{}", length=rng.randrange(6, 60_000)), kind="length-lie"),
        lambda: Case(frame(3, rng.randbytes(rng.randrange(0, 100)), length=None), kind="garbage-header"),
        lambda: _mutate(rng, rng.choice(samples)),
        lambda: Case(b"".join(rng.choice(samples) for _ in range(rng.randrange(2, 5))), kind="many-frames"),
    ]
    return [_with_mode(rng, rng.choice(makers)()) for _ in range(count)]


def data_cases(rng: random.Random, count: int) -> List[Case]:
    """Cases for the data path of a node port: what follows the preamble's first byte is wrong."""
    good = wire.encode_preamble(rng.randbytes(wire.TOKEN_BYTES), 0)
    makers = [
        lambda: Case(good[:rng.randrange(1, len(good))], kind="preamble-cut"),
        lambda: Case(good[:1] + rng.randbytes(rng.randrange(0, 80)), kind="preamble-random"),
        lambda: Case(good[:4] + bytes([rng.randrange(256)]) + rng.randbytes(40), kind="preamble-version"),
        lambda: Case(wire.encode_preamble(rng.randbytes(wire.TOKEN_BYTES), rng.randrange(256)) + rng.randbytes(
            rng.randrange(0, 200)), kind="unknown-token"),
        lambda: _mutate(rng, good),
    ]
    return [_with_mode(rng, rng.choice(makers)(), hold_share=0.05) for _ in range(count)]


def control_cases(rng: random.Random, count: int) -> List[Case]:
    """Framing-level cases for a Unix socket that speaks Control frames (control, agent)."""
    samples = [wire.encode(wire.Control(op, {})) for op in ("status", "whoami", "resolve", "wait")]
    makers = [
        lambda: Case(rng.randbytes(rng.randrange(0, 300)), kind="random"),
        lambda: _cut(rng, rng.choice(samples)),
        lambda: Case(struct.pack("!I", rng.randrange(wire.MAX_FRAME_BYTES + 1, 2 ** 32)), kind="oversized"),
        lambda: Case(frame(rng.randrange(0, 20), rng.choice(BAD_HEADERS)), kind="bad-body"),
        lambda: Case(frame(12, rng.choice(BAD_HEADERS)), kind="bad-control"),
        lambda: Case(wire.encode(rng.choice(_samples())), kind="wrong-type"),
        lambda: _mutate(rng, rng.choice(samples)),
    ]
    return [_with_mode(rng, rng.choice(makers)()) for _ in range(count)]


# The operations of a node's control socket and the type of each argument (what ControlArgs
# checks); "list" is a list of names.
NODE_CONTROL_OPS: Dict[str, Dict[str, str]] = {
    "ping": {"dst": "text", "timeout": "number"},
    "wait": {"present": "list", "absent": "list", "settled": "flag", "timeout": "number"},
    "echo": {"port": "port", "abort_after": "int"},
    "transfer": {"dst": "text", "port": "port", "bytes": "int", "stack": "text", "timeout": "number"},
    "netcheck": {"pings": "int"},
    "topology": {"timeout": "number"},
    "forward": {"peer": "text", "port": "port", "bind": "text", "local_port": "port", "stack": "text",
                "timeout": "number", "once": "flag"},
    "expose": {"port": "port", "local_port": "port", "host": "text", "once": "flag"},
}
RENDEZVOUS_CONTROL_OPS: Dict[str, Dict[str, str]] = {"release": {"name": "text", "cluster": "text"}}
# The agent's operations and their arguments (gridsock.agent).
AGENT_OPS: Dict[str, Dict[str, str]] = {
    "resolve": {"host": "text"},
    "connect": {"host": "text", "port": "port", "timeout": "number", "stack": "text"},
    "listen": {"port": "port", "deferred": "flag"},
}

_WRONG: Dict[str, Tuple[Any, ...]] = {
    "text": (5, True, "", "x" * 1000, "\u00e9" * 600, ["a"], {"a": 1}, 1.5),
    "number": ("1", True, 0, -1, 1e9, [], {}, -0.0),
    "int": ("7", 1.5, True, -1, 2 ** 64, [], {"a": 1}),
    "port": ("80", 1.5, True, -1, 65536, 2 ** 64, [80]),
    "flag": (1, "true", [], {}, 0.0),
    "list": ("a", [1], [""], {"a": 1}, ["x" * 1000], 5),
}


def control_op_cases(rng: random.Random, ops: Dict[str, Dict[str, str]], count: int) -> List[wire.Control]:
    """``Control`` messages whose arguments are wrong: each has at least one argument of a wrong
    type or out of range (and the others absent or random), or an unknown operation."""
    out: List[wire.Control] = []
    names = sorted(ops)
    for i in range(count):
        if i % 17 == 16:
            out.append(wire.Control(f"no-such-op-{rng.randrange(1000)}", {"x": rng.choice(BAD_VALUES)}))
            continue
        op = names[i % len(names)]
        schema = ops[op]
        args: Dict[str, Any] = {}
        for key, kind in schema.items():
            if rng.random() < 0.3:
                args[key] = rng.choice(BAD_VALUES)
        bad = rng.choice(sorted(schema))
        args[bad] = rng.choice(_WRONG[schema[bad]])
        out.append(wire.Control(op, args))
    return out


def agent_cases(rng: random.Random, count: int) -> List[Case]:
    """Cases for the agent socket: framing (as :func:`control_cases`), operations with bad
    arguments, and descriptors where none belongs (or of the wrong kind)."""
    cases = control_cases(rng, count // 2)
    for message in control_op_cases(rng, AGENT_OPS, count - len(cases)):
        data = wire.encode(message)
        with_fd = rng.random() < 0.2
        if rng.random() < 0.2:  # a second request after a first that is bad
            data += wire.encode(rng.choice([wire.Control("whoami", {}), wire.Control("adopted", {})]))
        cases.append(Case(data, mode=rng.choice(("close", "half-close", "half-close")), with_fd=with_fd,
                          kind="agent-op"))
    return cases


ROUTED_TOPICS = ("assemble", "gridsock.paths", "ping", "gridsock.refused", "relay", "enroll", "gridsock.leave",
                 "no-such-topic")


def routed_payloads(rng: random.Random) -> List[bytes]:
    """Payloads that are wrong for every routed topic: empty, short, random, JSON of the wrong
    shape or nested too deep, assembly messages cut short or asking for the impossible."""
    token = rng.randbytes(wire.TOKEN_BYTES).hex()
    return [
        b"", b"\x00", rng.randbytes(37), b"{}", b'{"node_id": 5}', b"[" * 3000, b'{"a": ' * 2000,
        wire.encode(wire.AssemblyRequest(port=1, stack="tcp", token=token))[:-3],
        wire.encode(wire.AssemblyRequest(port=65535, stack="nosuch/tcp", token=token)),
        wire.encode(wire.AssemblyRequest(port=1, stack="tls/" * 100 + "tcp", token=token)),
        wire.encode(wire.Ping(1)),
        frame(14, b'{"port": 0, "stack": 5, "token": "zz"}'),
    ]


def routed_cases(rng: random.Random, src: str, dsts: Sequence[str], count: int, *,
                 skip: Callable[[wire.Routed], bool] = lambda message: False) -> List[wire.Routed]:
    """Routed messages from ``src`` (an enrolled node id) to ``dsts`` on every topic a node or the
    rendez-vous node serves, with payloads that are wrong for the topic: every topic, destination
    and payload once as a request first (``kind`` "req"), then at random, of every kind, up to
    ``count``. Messages for which ``skip`` is true are left out."""
    payloads = routed_payloads(rng)

    def message(dst: str, kind: str, topic: str, payload: bytes) -> wire.Routed:
        return wire.Routed(src=src, dst=dst, kind=kind, topic=topic, request_id=rng.randrange(2 ** 32), hops=0,
                           route=(), payload=payload)

    out = [message(dst, "req", topic, payload) for topic in ROUTED_TOPICS for dst in dsts for payload in payloads]
    while len(out) < count:
        out.append(message(rng.choice(list(dsts)), rng.choice(wire.ROUTED_KINDS), rng.choice(ROUTED_TOPICS),
                           rng.choice(payloads)))
    return [m for m in out[:max(count, 0)] if not skip(m)]


def _cut(rng: random.Random, good: bytes) -> Case:
    return Case(good[:rng.randrange(0, len(good))], kind="truncated")


def _mutate(rng: random.Random, good: bytes) -> Case:
    data = bytearray(good)
    for _ in range(rng.randrange(1, 5)):
        data[rng.randrange(len(data))] = rng.randrange(256)
    return Case(bytes(data), kind="mutated")


def _with_mode(rng: random.Random, case: Case, hold_share: float = 0.02) -> Case:
    roll = rng.random()
    mode = "hold" if roll < hold_share else "half-close" if roll < 0.5 else "close"
    return dataclasses.replace(case, data=case.data[:MAX_CASE_BYTES], mode=mode)


def send_case(sock: socket.socket, case: Case, *, read_timeout: float, held: Optional[list] = None
              ) -> Tuple[bytes, Optional[bool]]:
    """Play ``case`` on the connected ``sock`` (which it closes, unless held: then it is appended
    to ``held``). Returns what the server sent back, and for a half-close case whether the
    server closed (a reset counts) within ``read_timeout`` (False: it neither closed nor went
    on answering: the caller decides whether that is a hang); None for the other modes."""
    got = bytearray()
    try:
        try:
            if case.with_fd and case.data:
                r, w = os.pipe()
                try:
                    sock.sendmsg([case.data[:1]], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [r]))])
                finally:
                    os.close(r)
                    os.close(w)
                sock.sendall(case.data[1:])
            elif case.data:
                sock.sendall(case.data)
            if case.mode == "hold" and held is not None:
                held.append(sock)
                sock = None  # type: ignore[assignment]
                return b"", None
            if case.mode != "half-close":
                return b"", None
            sock.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            return bytes(got), True  # it had heard enough
        sock.settimeout(read_timeout)
        deadline = time.monotonic() + read_timeout
        while time.monotonic() < deadline:
            try:
                chunk = sock.recv(65536)
            except socket.timeout:
                break
            except OSError:  # a reset, or a TLS alert
                return bytes(got), True
            if not chunk:
                return bytes(got), True
            got += chunk
        return bytes(got), False
    finally:
        if sock is not None:
            sock.close()


def rss_bytes(pid: Optional[int] = None) -> int:
    """The resident set size of process ``pid`` (this one by default), from /proc."""
    with open(f"/proc/{pid or 'self'}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
