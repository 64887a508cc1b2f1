"""Sans-IO codec of the bootstrap and meta protocol: bytes in, messages out.

Theory of operation
-------------------
Every message travels in one frame::

    +----------------+---------+--------+--------------------+---------------+----------+
    | length: u32 BE | version | type   | header_len: u32 BE | header (JSON) | payload  |
    |                | u8 (=1) | u8     |                    | UTF-8 object  | raw bytes|
    +----------------+---------+--------+--------------------+---------------+----------+
                     '------------------- length bytes --------------------------------'

``length`` counts everything after itself and never exceeds :data:`MAX_FRAME_BYTES`. The header
is a JSON object whose fields depend on the type; the payload is opaque bytes (only ``Routed``
carries one; the other types require it empty). Header JSON is strict: no NaN or Infinity, no
lone surrogates in strings. The decoder checks the version,
the type, every field's presence, type and limit, and raises :class:`RemoteProtocolError` for
anything else: that is the only exception it raises for bad input (h11's invariant), and after
one error it stays broken. Unknown header fields are ignored, so a peer may add optional fields
without a new version.

A :class:`Decoder` is fed bytes as they arrive and hands out complete messages; :func:`encode`
turns a message into bytes, raising :class:`LocalProtocolError` if the message breaks a limit
(a bug on our side: we never send what we would refuse to receive). The driver that reads
sockets lives in :mod:`gridsock.bootstrap.link`.
"""
from __future__ import annotations

import base64
import itertools
import json
import re
import struct
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Dict, List, Optional, Tuple, Type, Union, cast

from .errors import LocalProtocolError, RemoteProtocolError

__all__ = [
    "PROTOCOL_VERSION",
    "MAX_FRAME_BYTES",
    "MAX_HOPS",
    "MAX_NAME_BYTES",
    "MAX_TOPIC_BYTES",
    "MAX_ADDRS",
    "MAX_ENTRIES_PER_UPDATE",
    "MAX_REASON_BYTES",
    "MAX_PAYLOAD_BYTES",
    "MAX_TOKEN_BYTES",
    "MAX_PEM_BYTES",
    "NodeEntry",
    "Enroll",
    "Enrolled",
    "Hello",
    "Welcome",
    "Refuse",
    "Register",
    "Unregister",
    "DirectoryUpdate",
    "Routed",
    "Ping",
    "Pong",
    "Control",
    "ControlReply",
    "AssemblyRequest",
    "AssemblyAccept",
    "AssemblyRefuse",
    "REFUSAL_CODES",
    "MAX_OFFER_BYTES",
    "TOKEN_BYTES",
    "DATA_MAGIC",
    "DATA_VERSION",
    "PREAMBLE_BYTES",
    "NOMINATE",
    "DataPreamble",
    "encode_preamble",
    "decode_preamble",
    "encode_assembly",
    "decode_assembly",
    "Message",
    "Decoder",
    "encode",
    "encode_parts",
    "encode_once",
    "Encoded",
    "directory_updates",
    "is_node_id",
    "check_name",
]

PROTOCOL_VERSION = 1
# 4 MiB: a directory update of MAX_ENTRIES_PER_UPDATE entries fits with room to spare, and a
# routed payload of a few MiB still crosses the bootstrap channel in one frame.
MAX_FRAME_BYTES = 4 * 1024 * 1024
# member -> leader -> rendez-vous -> rendez-vous -> leader -> member: the longest path, when
# the two leaders are attached to two rendez-vous nodes of a federation (docs/federation.md).
MAX_HOPS = 5
# Node, cluster and topic names are labels a person types; 64 bytes is plenty.
MAX_NAME_BYTES = 64
MAX_TOPIC_BYTES = 64
# Listen addresses a node may advertise; the rendez-vous node dials back each one.
MAX_ADDRS = 8
# Entries in one directory update; a larger directory is sent as several updates.
MAX_ENTRIES_PER_UPDATE = 1000
# Human-readable reasons in Refuse and error replies.
MAX_REASON_BYTES = 1024
# The largest routed payload a node may originate: a frame minus room for the header and for
# the route, which grows by one name at every forward (so no forwarder ever holds a frame it
# cannot send on).
MAX_PAYLOAD_BYTES = MAX_FRAME_BYTES - 16 * 1024
# Join tokens are 43 characters today; leave room for longer ones.
MAX_TOKEN_BYTES = 256
# A certificate or CSR in PEM form.
MAX_PEM_BYTES = 16 * 1024
# "host:port" with the longest DNS name.
MAX_ADDR_BYTES = 270
# A method's own fields in an assembly request or answer (an endpoint, a connection id): small,
# so a request always fits one routed message with room to spare.
MAX_OFFER_BYTES = 4096
# The TLS records an assembly request and its answer may carry (the ``tls`` filter's early
# handshake, docs/wire.md section 6): a ClientHello with a session ticket is some 500 bytes, a
# server's first flight with its certificate some 2 KiB.
MAX_TLS_HELLO_BYTES = 4096
MAX_TLS_FLIGHT_BYTES = 16 * 1024
# A stack string in an assembly request (gridsock.stack.MAX_STACK_CHARS, ASCII).
MAX_STACK_BYTES = 512

_FRAME = struct.Struct("!IBB")
_HEADER_LEN = struct.Struct("!I")
_FRAME_PREFIX_BYTES = 4  # the length field itself
# Free space a decoder offers a driver's recv_into at least: one TLS record's plaintext (16 KiB,
# what a TLS socket returns per call) and a little more; a larger frame under way gets room for
# all of it. Small, since every link's decoder keeps its buffer, idle or not.
_RECV_ROOM_BYTES = 16 * 1024 + 512
# A frame at least this large is received into a buffer of its own (the rest of it straight
# from the socket), and its payload handed out as a read-only view of that buffer: no copy.
OWN_BUFFER_FRAME_BYTES = 64 * 1024

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*\Z")
_ADDR_RE = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+):[0-9]{1,5}\Z")


_HEX_RE = re.compile(r"[0-9a-f]*\Z")
_NODE_ID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\Z")


def is_node_id(value: object) -> bool:
    """Return True if ``value`` is a node id: a canonical lower-case UUID string."""
    return isinstance(value, str) and _NODE_ID_RE.match(value) is not None


def check_name(value: object, what: str = "name") -> str:
    """Return ``value`` if it is a valid node, cluster or topic name; else raise ValueError."""
    if not isinstance(value, str) or not _NAME_RE.match(value):
        raise ValueError(f"bad {what} {value!r}: letters, digits, '.', '_', '-', not starting with a sign")
    if len(value.encode()) > MAX_NAME_BYTES:
        raise ValueError(f"{what} {value[:20]!r}... is longer than {MAX_NAME_BYTES} bytes")
    return value


# --- field checkers: return None if fine, or the reason why not -----------------------------


def _str(limit: int):
    def check(v):
        if not isinstance(v, str):
            return "must be a string"
        try:
            size = len(v.encode("utf-8"))
        except UnicodeEncodeError:
            return "is not valid Unicode text (lone surrogate)"
        if size > limit:
            return f"longer than {limit} bytes"
        return None

    return check


def _name(v):
    try:
        check_name(v)
    except ValueError as exc:
        return str(exc)
    return None


def _opt(check):
    def opt(v):
        return None if v is None else check(v)

    return opt


def _topic(v):
    why = _name(v)
    if why is None and len(v.encode()) > MAX_TOPIC_BYTES:
        return f"longer than {MAX_TOPIC_BYTES} bytes"
    return why


def _node_id(v):
    return None if is_node_id(v) else "must be a node id (a canonical UUID)"


def _dest(v):
    # A destination is a node id, or a node name resolved by the routers.
    return None if is_node_id(v) else _name(v)


def _int(lo: int, hi: int):
    def check(v):
        if type(v) is not int or not lo <= v <= hi:
            return f"must be an integer in [{lo}, {hi}]"
        return None

    return check


def _bool(v):
    return None if isinstance(v, bool) else "must be true or false"


def _choice(*options):
    def check(v):
        return None if v in options and isinstance(v, str) else f"must be one of {', '.join(options)}"

    return check


def _addr(v):
    if not isinstance(v, str) or len(v) > MAX_ADDR_BYTES or not _ADDR_RE.match(v):
        return "must be 'host:port'"
    if not 0 < int(v.rsplit(":", 1)[1]) < 65536:
        return "port out of range"
    return None


def _list(check, limit: int):
    def check_list(v):
        if not isinstance(v, list):
            return "must be a list"
        if len(v) > limit:
            return f"more than {limit} items"
        for i, item in enumerate(v):
            why = check(item)
            if why:
                return f"item {i} {why}"
        return None

    return check_list


def _json_object(v):
    return None if isinstance(v, dict) else "must be an object"


def _any(v):
    return None


def _offer(v):
    if not isinstance(v, dict):
        return "must be an object"
    try:
        size = len(json.dumps(v, separators=(",", ":"), allow_nan=False).encode())
    except (ValueError, TypeError, RecursionError) as exc:
        return f"is not encodable: {exc}"
    return f"longer than {MAX_OFFER_BYTES} bytes" if size > MAX_OFFER_BYTES else None


_B64_RE = re.compile(r"[A-Za-z0-9+/]*={0,2}\Z")


def _b64(limit: int):
    """Standard base64 (with padding) of 1 to ``limit`` bytes."""
    def check(v):
        if not isinstance(v, str) or not v or len(v) > 4 * ((limit + 2) // 3) or len(v) % 4 \
                or not _B64_RE.match(v):
            return f"must be 1 to {limit} bytes in base64"
        return None

    return check


def _hex(nbytes: int):
    def check(v):
        if not isinstance(v, str) or len(v) != 2 * nbytes or not _HEX_RE.match(v):
            return f"must be {nbytes} bytes in lower-case hex"
        return None

    return check


# --- messages --------------------------------------------------------------------------------


@dataclass(frozen=True)
class NodeEntry:
    """One node of the directory.

    ``leader`` is the node id of the cluster's leader (the node's own id for a leader).
    ``addrs`` are the ``host:port`` listen addresses the node advertises; ``observed`` is the
    address the rendez-vous node saw the node's link come from (None for members, whose
    links end at their leader); ``inbound`` says whether the rendez-vous node could dial back
    one of ``addrs`` (None: not checked yet). ``gateways`` are the node's own ways out of a
    private network, as method layers: ``ssh(gateway=USER@HOST:PORT)`` (the SSH gateway its
    uplink uses) and ``socks(proxy=HOST:PORT)`` (its SOCKS proxy), addresses as the node (and
    its cluster) sees them; empty for a node that needs none (and from peers that predate it).
    """

    node_id: str
    name: str
    cluster: Optional[str]
    leader: str
    role: str = "leader"
    addrs: Tuple[str, ...] = ()
    observed: Optional[str] = None
    inbound: Optional[bool] = None
    gateways: Tuple[str, ...] = ()

    # An SSH gateway and a SOCKS proxy or two: a node has a handful of ways out at most.
    MAX_GATEWAYS: ClassVar[int] = 4
    # "socks(proxy=" or "ssh(gateway=", a user name and a host:port, ")".
    MAX_GATEWAY_BYTES: ClassVar[int] = 32 + MAX_NAME_BYTES + MAX_ADDR_BYTES
    _GATEWAY_RE: ClassVar[Any] = re.compile(r"(ssh\(gateway=[A-Za-z0-9._-]+@|socks\(proxy=)"
                                            r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+):[0-9]{1,5}\)\Z")

    @staticmethod
    def _gateway(v):
        if not isinstance(v, str) or len(v) > NodeEntry.MAX_GATEWAY_BYTES or not NodeEntry._GATEWAY_RE.match(v):
            return "must be 'ssh(gateway=USER@HOST:PORT)' or 'socks(proxy=HOST:PORT)'"
        return None

    _CHECKS: ClassVar[Dict[str, Any]] = {
        "node_id": _node_id,
        "name": _name,
        "cluster": _opt(_name),
        "leader": _node_id,
        "role": _choice("leader", "member"),
        "addrs": _list(_addr, MAX_ADDRS),
        "observed": _opt(_addr),
        "inbound": _opt(_bool),
        "gateways": _list(lambda v: NodeEntry._gateway(v), MAX_GATEWAYS),
    }
    _DEFAULTS: ClassVar[Dict[str, Any]] = {"role": "leader", "addrs": [], "observed": None, "inbound": None,
                                           "gateways": []}

    def to_json(self) -> dict:
        out = {
            "node_id": self.node_id,
            "name": self.name,
            "cluster": self.cluster,
            "leader": self.leader,
            "role": self.role,
            "addrs": list(self.addrs),
            "observed": self.observed,
            "inbound": self.inbound,
        }
        if self.gateways:  # (absent when empty: an entry reads as it did before the field)
            out["gateways"] = list(self.gateways)
        return out

    @classmethod
    def from_json(cls, obj: object) -> "NodeEntry":
        """Build an entry from decoded JSON; raise ValueError with the reason if it is bad.

        An entry decoded before (the same fields: see :func:`_entry_key`) is returned as it
        was, unchecked again: a node is sent most entries more than once (in updates, in
        snapshots, after a relink), and checking them was most of what a join storm cost it.
        """
        key = _entry_key(obj) if cls is NodeEntry else None
        if key is not None:
            try:
                known = _entry_cache.get(key)
            except TypeError:  # (an unhashable item in a list: not an entry we could have)
                key = known = None
            if known is not None:
                return known
        values = _check_object(obj, cls._CHECKS, cls._DEFAULTS)
        values["addrs"] = tuple(values["addrs"])
        values["gateways"] = tuple(values["gateways"])
        entry = cls(**values)
        if key is not None:
            _remember_entry(key, entry)
        return entry


# Entries decoded lately, by their JSON fields (NodeEntry.from_json): about 1 KB each with
# their keys, so a few MB at most; when full, the older half is forgotten. A grid of a
# thousand nodes, each entry sent in two or three versions (joined, then its dial-back
# verdict), fits. 0: no cache.
ENTRY_CACHE_ENTRIES = 4096
# The routed headers' string fields checked already (source, destination, kind, topic, route):
# see Routed.from_header. Emptied when full.
ROUTED_CACHE_ENTRIES = 4096
_routed_checked: Dict[tuple, bool] = {}
_entry_cache: Dict[tuple, NodeEntry] = {}
_MISSING = object()


def _entry_key(obj: object) -> Optional[tuple]:
    """The fields of JSON entry ``obj`` as a key equal to another entry's only if both decode
    to equal entries, or None if ``obj`` is not cached (not a JSON object, or a value where
    ``==`` would not tell a valid entry from an invalid one: ``inbound`` as a number, a list
    that is not a list). A missing field with a default counts as its default; a missing
    field without one never equals anything."""
    if type(obj) is not dict or ENTRY_CACHE_ENTRIES <= 0:
        return None
    get = obj.get
    inbound = get("inbound")
    if inbound is not None and type(inbound) is not bool:  # (1 == True)
        return None
    lists = []
    for name in ("addrs", "gateways"):
        value = get(name, _MISSING)
        if value is _MISSING:
            lists.append(())
        elif type(value) is list:
            lists.append(tuple(value))
        else:
            return None
    return (get("node_id", _MISSING), get("name", _MISSING), get("cluster", _MISSING), get("leader", _MISSING),
            get("role", "leader"), get("observed"), inbound, lists[0], lists[1])


def _remember_entry(key: tuple, entry: NodeEntry) -> None:
    cache = _entry_cache
    if len(cache) >= ENTRY_CACHE_ENTRIES:
        try:
            for old in list(itertools.islice(cache, len(cache) // 2 + 1)):  # (the oldest half)
                cache.pop(old, None)
        except RuntimeError:  # (changed by another thread meanwhile)
            cache.clear()
    if ENTRY_CACHE_ENTRIES > 0:
        cache[key] = entry


def _entry(v):
    try:
        NodeEntry.from_json(v)
    except ValueError as exc:
        return str(exc)
    return None


def _check_object(obj: object, checks: Dict[str, Any], defaults: Dict[str, Any]) -> dict:
    if not isinstance(obj, dict):
        raise ValueError("must be a JSON object")
    values = {}
    for key, check in checks.items():
        if key in obj:
            value = obj[key]
        elif key in defaults:
            value = defaults[key]
        else:
            raise ValueError(f"field {key!r} is missing")
        why = check(value)
        if why:
            raise ValueError(f"field {key!r} {why}")
        values[key] = value
    return values


class _Message:
    """Base of the message classes: a type code, field checks and JSON (de)serialisation."""

    TYPE: ClassVar[int]
    CHECKS: ClassVar[Dict[str, Any]] = {}
    DEFAULTS: ClassVar[Dict[str, Any]] = {}
    HAS_PAYLOAD: ClassVar[bool] = False
    # Optional fields left out of the header while None, so that a peer that predates them
    # decodes the message as before (unknown fields are ignored, absent ones take their default).
    ABSENT_WHEN_NONE: ClassVar[Tuple[str, ...]] = ()

    def header(self) -> dict:
        out = {}
        for f in fields(self):  # type: ignore[arg-type]
            if f.name == "payload":
                continue
            value = getattr(self, f.name)
            if value is None and f.name in self.ABSENT_WHEN_NONE:
                continue
            if isinstance(value, tuple):
                value = [v.to_json() if isinstance(v, NodeEntry) else v for v in value]
            elif isinstance(value, NodeEntry):
                value = value.to_json()
            out[f.name] = value
        return out

    @classmethod
    def from_header(cls, header: dict, payload: bytes):
        values = _check_object(header, cls.CHECKS, cls.DEFAULTS)
        values = cls._convert(values)
        if cls.HAS_PAYLOAD:
            values["payload"] = payload
        return cls(**values)

    @classmethod
    def _convert(cls, values: dict) -> dict:
        return {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}


@dataclass(frozen=True)
class Enroll(_Message):
    """Join request: prove the session's join token, ask for a certificate for a new node id.

    Sent by a node without a certificate over server-authenticated TLS, to the rendez-vous
    node or to its cluster's leader (which forwards it, as ``Routed`` with topic ``enroll``).
    """

    TYPE: ClassVar[int] = 1
    token: str
    csr_pem: str
    name: str
    CHECKS: ClassVar[Dict[str, Any]] = {
        "token": _str(MAX_TOKEN_BYTES),
        "csr_pem": _str(MAX_PEM_BYTES),
        "name": _name,
    }


@dataclass(frozen=True)
class Enrolled(_Message):
    """Join granted: the new node id and its certificate (PEM), signed by the session CA."""

    TYPE: ClassVar[int] = 2
    node_id: str
    cert_pem: str
    CHECKS: ClassVar[Dict[str, Any]] = {"node_id": _node_id, "cert_pem": _str(MAX_PEM_BYTES)}


@dataclass(frozen=True)
class Hello(_Message):
    """First message on a link: who I am.

    Over TLS the sender's node id is the one in its certificate and ``node_id`` and ``token``
    stay None. In a plain-TCP session (an explicit opt-in) there are no certificates: the
    sender names its own ``node_id`` and proves the join ``token`` here.
    """

    TYPE: ClassVar[int] = 3
    name: str
    cluster: Optional[str]
    role: str
    addrs: Tuple[str, ...] = ()
    software: str = ""
    node_id: Optional[str] = None
    token: Optional[str] = None
    gateways: Tuple[str, ...] = ()  # the sender's own gateways: NodeEntry.gateways
    CHECKS: ClassVar[Dict[str, Any]] = {
        "name": _name,
        "cluster": _opt(_name),
        "role": _choice("leader", "member", "probe", "peer", "rendezvous"),
        "addrs": _list(_addr, MAX_ADDRS),
        "software": _str(MAX_NAME_BYTES),
        "node_id": _opt(_node_id),
        "token": _opt(_str(MAX_TOKEN_BYTES)),
        "gateways": _list(NodeEntry._gateway, NodeEntry.MAX_GATEWAYS),
    }
    DEFAULTS: ClassVar[Dict[str, Any]] = {"addrs": [], "software": "", "node_id": None, "token": None,
                                          "gateways": []}

    def header(self) -> dict:
        out = super().header()
        if not self.gateways:  # (absent when empty: a Hello reads as it did before the field)
            del out["gateways"]
        return out


@dataclass(frozen=True)
class Welcome(_Message):
    """Answer to Hello: the link is up; ``entry`` is the directory entry made for the sender."""

    TYPE: ClassVar[int] = 4
    entry: NodeEntry
    session_id: str
    CHECKS: ClassVar[Dict[str, Any]] = {"entry": _entry, "session_id": _node_id}

    @classmethod
    def _convert(cls, values):
        return dict(values, entry=NodeEntry.from_json(values["entry"]))


@dataclass(frozen=True)
class Refuse(_Message):
    """The sender refuses the link and closes it; ``code`` is machine-readable."""

    TYPE: ClassVar[int] = 5
    code: str
    reason: str
    CHECKS: ClassVar[Dict[str, Any]] = {"code": _name, "reason": _str(MAX_REASON_BYTES)}


@dataclass(frozen=True)
class Register(_Message):
    """Leader -> rendez-vous: these members of my cluster are up (or changed)."""

    TYPE: ClassVar[int] = 6
    entries: Tuple[NodeEntry, ...]
    CHECKS: ClassVar[Dict[str, Any]] = {"entries": _list(_entry, MAX_ENTRIES_PER_UPDATE)}

    @classmethod
    def from_header(cls, header: dict, payload: bytes):
        return cls(**_entries_parsed_once(header, cls, ("entries",)))


@dataclass(frozen=True)
class Unregister(_Message):
    """Leader -> rendez-vous: these members of my cluster are gone."""

    TYPE: ClassVar[int] = 7
    node_ids: Tuple[str, ...]
    CHECKS: ClassVar[Dict[str, Any]] = {"node_ids": _list(_node_id, MAX_ENTRIES_PER_UPDATE)}


@dataclass(frozen=True)
class DirectoryUpdate(_Message):
    """Rendez-vous -> leaders -> members: entries joined or changed, node ids that left.

    ``snapshot`` marks the first update of a series that replaces the whole directory; ``more``
    says another part of the same snapshot follows.
    """

    TYPE: ClassVar[int] = 8
    joined: Tuple[NodeEntry, ...] = ()
    left: Tuple[str, ...] = ()
    snapshot: bool = False
    more: bool = False
    CHECKS: ClassVar[Dict[str, Any]] = {
        "joined": _list(_entry, MAX_ENTRIES_PER_UPDATE),
        "left": _list(_node_id, MAX_ENTRIES_PER_UPDATE),
        "snapshot": _bool,
        "more": _bool,
    }
    DEFAULTS: ClassVar[Dict[str, Any]] = {"joined": [], "left": [], "snapshot": False, "more": False}

    @classmethod
    def from_header(cls, header: dict, payload: bytes):
        values = _entries_parsed_once(header, cls, ("joined",))
        return cls(**dict(values, left=tuple(values["left"])))


def _entries_parsed_once(header: dict, cls, keys: Tuple[str, ...]) -> dict:
    """``header``'s fields checked as ``cls.CHECKS`` says, with the entry lists under ``keys``
    parsed into NodeEntry objects, each entry once (checking an entry is parsing it: a
    directory update of a thousand entries is decoded by every leader and member, so this is
    most of what a join storm costs them). Raises ValueError as ``_check_object`` does."""
    shallow = {k: (_list(lambda v: None, MAX_ENTRIES_PER_UPDATE) if k in keys else c) for k, c in cls.CHECKS.items()}
    values = _check_object(header, shallow, cls.DEFAULTS)
    for key in keys:
        entries = []
        for i, item in enumerate(values[key]):
            try:
                entries.append(NodeEntry.from_json(item))
            except ValueError as exc:
                raise ValueError(f"field {key!r} item {i} {exc}") from None
        values[key] = tuple(entries)
    return values


ROUTED_KINDS = ("msg", "req", "rep", "err")


@dataclass(frozen=True)
class Routed(_Message):
    """A message for another node, routed along the tree.

    ``kind``: ``msg`` (one way), ``req`` (wants a ``rep`` or ``err`` with the same
    ``request_id`` back), ``rep``, ``err`` (payload: a UTF-8 reason). ``route`` lists the names
    of the nodes the message went through, the sender first; ``hops`` counts forwards.
    """

    TYPE: ClassVar[int] = 9
    src: str
    dst: str
    kind: str
    topic: str
    request_id: int = 0
    hops: int = 0
    route: Tuple[str, ...] = ()
    payload: bytes = b""
    HAS_PAYLOAD: ClassVar[bool] = True
    CHECKS: ClassVar[Dict[str, Any]] = {
        "src": _node_id,
        "dst": _dest,
        "kind": _choice(*ROUTED_KINDS),
        "topic": _topic,
        "request_id": _int(0, 2**32 - 1),
        "hops": _int(0, MAX_HOPS),
        "route": _list(_name, MAX_HOPS + 1),
    }
    DEFAULTS: ClassVar[Dict[str, Any]] = {"request_id": 0, "hops": 0, "route": []}

    def header(self) -> dict:
        # (what _Message.header gives, without walking the fields: a routed frame's header is
        # encoded at every hop)
        return {"src": self.src, "dst": self.dst, "kind": self.kind, "topic": self.topic,
                "request_id": self.request_id, "hops": self.hops, "route": list(self.route)}

    @classmethod
    def from_header(cls, header: dict, payload: bytes):
        # A routed frame's string fields (source, destination, kind, topic, route) repeat from
        # frame to frame (a relayed connection's are all alike): once checked, they are
        # remembered (ROUTED_CACHE_ENTRIES), and a header whose strings were checked before has
        # only its integers checked. Anything else takes the full check.
        try:
            route = header["route"]
            key = (header["src"], header["dst"], header["kind"], header["topic"], tuple(route))
            request_id, hops = header["request_id"], header["hops"]
            known = type(route) is list and key in _routed_checked
        except (KeyError, TypeError):
            known, key, request_id, hops = False, None, None, None
        if known and type(request_id) is int and type(hops) is int and 0 <= request_id <= 0xFFFFFFFF \
                and 0 <= hops <= MAX_HOPS:
            return cls(key[0], key[1], key[2], key[3], request_id, hops, key[4], payload)  # type: ignore[index]
        message = super().from_header(header, payload)
        if key is not None and type(header["route"]) is list:  # (all fields present, all checked)
            if len(_routed_checked) >= ROUTED_CACHE_ENTRIES:
                _routed_checked.clear()
            _routed_checked[key] = True
        return message


@dataclass(frozen=True)
class Ping(_Message):
    """Liveness probe; the peer answers Pong with the same nonce."""

    TYPE: ClassVar[int] = 10
    nonce: int
    CHECKS: ClassVar[Dict[str, Any]] = {"nonce": _int(0, 2**32 - 1)}


@dataclass(frozen=True)
class Pong(_Message):
    TYPE: ClassVar[int] = 11
    nonce: int
    CHECKS: ClassVar[Dict[str, Any]] = {"nonce": _int(0, 2**32 - 1)}


@dataclass(frozen=True)
class Control(_Message):
    """Local control socket: a command from the ``gridsock`` CLI to a running process."""

    TYPE: ClassVar[int] = 12
    op: str
    args: Dict[str, Any] = field(default_factory=dict)
    CHECKS: ClassVar[Dict[str, Any]] = {"op": _name, "args": _json_object}
    DEFAULTS: ClassVar[Dict[str, Any]] = {"args": {}}


@dataclass(frozen=True)
class ControlReply(_Message):
    TYPE: ClassVar[int] = 13
    ok: bool
    result: Any = None
    error: str = ""
    CHECKS: ClassVar[Dict[str, Any]] = {"ok": _bool, "result": _any, "error": _str(MAX_REASON_BYTES)}
    DEFAULTS: ClassVar[Dict[str, Any]] = {"result": None, "error": ""}

    @classmethod
    def _convert(cls, values):
        return values


# --- assembly: data connections (gridsock.assembly) -----------------------------------------
#
# An assembly request and its answer travel as the payload of a ``Routed`` request and reply
# with topic ``assemble``, over the meta channel; each payload is exactly one frame of this
# codec (:func:`encode_assembly`, :func:`decode_assembly`). The data connection that a method
# makes to a node port starts with a fixed-size preamble (:func:`encode_preamble`), and the
# client's first byte on the connection it keeps is :data:`NOMINATE`.

#: One-time assembly tokens: 256 random bits, shown in requests as 64 hex digits.
TOKEN_BYTES = 32

#: Refusal codes of :class:`AssemblyRefuse` and the errno a program gets for each. Only
#: ``unreachable`` lets the client try another method: the method failed on the server's side
#: (a connection back could not be made); every other code is the server's will.
REFUSAL_CODES: Dict[str, str] = {
    "refused": "ECONNREFUSED",  # nothing listens on the port
    "policy": "ECONNREFUSED",  # the server's policy refuses this stack from this client
    "bad-stack": "ECONNREFUSED",  # the stack does not parse, or a layer is unknown here
    "unavailable": "ECONNREFUSED",  # the method cannot work on this server (no address...)
    "bad-token": "ECONNREFUSED",  # the token was seen before (a replay)
    "bad-request": "ECONNREFUSED",  # the request or the method's offer is malformed
    "unknown-node": "EHOSTUNREACH",  # the server does not know the client (yet)
    "unreachable": "EHOSTUNREACH",  # the method failed on the server's side: try another
}


@dataclass(frozen=True)
class AssemblyRequest(_Message):
    """Client -> server: connect to my grid ``port`` with ``stack``; ``token`` ties the data
    connection to this request; ``offer`` holds the method's own fields; ``client_port`` is
    the client's own port for the connection (what the server's ``getpeername()`` gives), or
    None: then absent from the header, so that a peer that predates it decodes the request.
    ``tls_hello``: the ClientHello of the ``tls`` filter right above the method, in base64
    (the early handshake: ``gridsock.components.tls``), or None (absent)."""

    TYPE: ClassVar[int] = 14
    port: int
    stack: str
    token: str
    offer: Dict[str, Any] = field(default_factory=dict)
    client_port: Optional[int] = None
    tls_hello: Optional[str] = None
    CHECKS: ClassVar[Dict[str, Any]] = {
        "port": _int(1, 65535),
        "stack": _str(MAX_STACK_BYTES),
        "token": _hex(TOKEN_BYTES),
        "offer": _offer,
        "client_port": _opt(_int(1, 65535)),
        "tls_hello": _opt(_b64(MAX_TLS_HELLO_BYTES)),
    }
    DEFAULTS: ClassVar[Dict[str, Any]] = {"offer": {}, "client_port": None, "tls_hello": None}
    ABSENT_WHEN_NONE: ClassVar[Tuple[str, ...]] = ("client_port", "tls_hello")

    @classmethod
    def _convert(cls, values):
        return values

    @property
    def token_bytes(self) -> bytes:
        return bytes.fromhex(self.token)

    @property
    def tls_hello_bytes(self) -> Optional[bytes]:
        return None if self.tls_hello is None else base64.b64decode(self.tls_hello)


@dataclass(frozen=True)
class AssemblyAccept(_Message):
    """Server -> client: the request is accepted; ``answer`` holds the method's own fields.
    When the request had a ``tls_hello``: ``tls_flight``, the server's first TLS flight in
    base64, or ``tls_flight_follows`` True, that flight is on the method's connection, right
    after its preamble (``reverse``, whose connection the server makes). Absent otherwise."""

    TYPE: ClassVar[int] = 15
    answer: Dict[str, Any] = field(default_factory=dict)
    tls_flight: Optional[str] = None
    tls_flight_follows: Optional[bool] = None
    CHECKS: ClassVar[Dict[str, Any]] = {"answer": _offer, "tls_flight": _opt(_b64(MAX_TLS_FLIGHT_BYTES)),
                                        "tls_flight_follows": _opt(_bool)}
    DEFAULTS: ClassVar[Dict[str, Any]] = {"answer": {}, "tls_flight": None, "tls_flight_follows": None}
    ABSENT_WHEN_NONE: ClassVar[Tuple[str, ...]] = ("tls_flight", "tls_flight_follows")

    @classmethod
    def _convert(cls, values):
        return values

    @property
    def tls_flight_bytes(self) -> Optional[bytes]:
        return None if self.tls_flight is None else base64.b64decode(self.tls_flight)


@dataclass(frozen=True)
class AssemblyRefuse(_Message):
    """Server -> client: the request is refused; ``code`` is one of :data:`REFUSAL_CODES`."""

    TYPE: ClassVar[int] = 16
    code: str
    reason: str
    CHECKS: ClassVar[Dict[str, Any]] = {"code": _choice(*REFUSAL_CODES), "reason": _str(MAX_REASON_BYTES)}


_ASSEMBLY_TYPES = (AssemblyRequest, AssemblyAccept, AssemblyRefuse)


def encode_assembly(message: Union[AssemblyRequest, AssemblyAccept, AssemblyRefuse]) -> bytes:
    """The payload for an assembly message: one frame. LocalProtocolError as :func:`encode`."""
    if not isinstance(message, _ASSEMBLY_TYPES):
        raise LocalProtocolError(f"not an assembly message: {message!r}")
    return encode(message)


def decode_assembly(payload: bytes, *, peer: str | None = None):
    """The one assembly message in ``payload``.

    Raises RemoteProtocolError if ``payload`` is not exactly one well-formed frame of an
    assembly message type (truncated, trailing bytes, another type, bad fields).
    """
    decoder = Decoder(peer=peer)
    decoder.feed(payload)
    message = decoder.next_message()
    if message is None:
        raise RemoteProtocolError(f"truncated assembly message ({len(payload)} bytes)", peer=peer)
    if decoder.buffered:
        raise RemoteProtocolError(f"{decoder.buffered} bytes after the assembly message", peer=peer)
    if not isinstance(message, _ASSEMBLY_TYPES):
        raise RemoteProtocolError(f"{type(message).__name__} is not an assembly message", peer=peer)
    return message


#: First bytes of a data connection on a node port. TLS starts with 0x16 and wire frames with a
#: 0x00 length byte, so the node port tells the three apart by one byte.
DATA_MAGIC = b"GSDC"
#: Version of the preamble (1 had no sub-connection index).
DATA_VERSION = 2
_PREAMBLE = struct.Struct(f"!4sB{TOKEN_BYTES}sB")
#: The preamble's fixed size: magic, version, token, sub-connection index.
PREAMBLE_BYTES = _PREAMBLE.size
#: The client's first byte on the connection it chose among the candidates it raced: the server
#: builds no filter and delivers nothing before it.
NOMINATE = b"\x01"


@dataclass(frozen=True)
class DataPreamble:
    """The preamble of a data connection: the assembly ``token`` it belongs to and, for a
    method that makes several connections (``parallel``), this one's ``index``."""

    token: bytes
    index: int = 0


def encode_preamble(token: bytes, index: int = 0) -> bytes:
    """The :data:`PREAMBLE_BYTES` bytes that open a data connection; LocalProtocolError if bad."""
    if len(token) != TOKEN_BYTES or not 0 <= index <= 255:
        raise LocalProtocolError(f"bad preamble: {len(token)}-byte token, index {index}")
    return _PREAMBLE.pack(DATA_MAGIC, DATA_VERSION, bytes(token), index)


def decode_preamble(data: bytes, *, peer: str | None = None) -> Optional[DataPreamble]:
    """The preamble at the start of ``data``, or None if fewer than :data:`PREAMBLE_BYTES` bytes
    are there yet (bytes after the preamble belong to the connection and are not looked at).

    Raises RemoteProtocolError for a wrong magic or an unsupported version, as soon as the
    bytes seen show it.
    """
    head = bytes(data[: len(DATA_MAGIC)])
    if head != DATA_MAGIC[: len(head)]:
        raise RemoteProtocolError("not a data connection (bad preamble magic)", peer=peer)
    if len(data) > len(DATA_MAGIC) and data[len(DATA_MAGIC)] != DATA_VERSION:
        raise RemoteProtocolError(f"unsupported data preamble version {data[len(DATA_MAGIC)]} "
                                  f"(we speak {DATA_VERSION})", peer=peer)
    if len(data) < PREAMBLE_BYTES:
        return None
    _, _, token, index = _PREAMBLE.unpack_from(data)
    return DataPreamble(token, index)


Message = Union[
    Enroll, Enrolled, Hello, Welcome, Refuse, Register, Unregister, DirectoryUpdate, Routed,
    Ping, Pong, Control, ControlReply, AssemblyRequest, AssemblyAccept, AssemblyRefuse,
]

_BY_TYPE: Dict[int, Type[_Message]] = {
    cls.TYPE: cls
    for cls in (
        Enroll, Enrolled, Hello, Welcome, Refuse, Register, Unregister, DirectoryUpdate, Routed,
        Ping, Pong, Control, ControlReply, AssemblyRequest, AssemblyAccept, AssemblyRefuse,
    )
}


def encode(message: Union[_Message, "Encoded"], *, checked: bool = True) -> bytes:
    """Return the frame for ``message``.

    Raises LocalProtocolError if the message breaks a field rule or a limit: we never send what
    we would refuse to receive. ``checked=False`` skips the field rules (not the size limit) for
    a message whose fields were already checked, such as a decoded message being forwarded.
    """
    head, payload = encode_parts(message, checked=checked)
    return head + payload if payload else head


def encode_parts(message: Union[_Message, "Encoded"], *, checked: bool = True) -> Tuple[bytes, Any]:
    """The frame for ``message`` in two parts, ``(head, payload)``: written one after the
    other they are :func:`encode`'s bytes. The payload is the message's own object, not a
    copy, so a large one can be written without joining it to its head. Raises as ``encode``."""
    if isinstance(message, Encoded):
        return message.head, message.payload
    cls = type(message)
    if _BY_TYPE.get(getattr(cls, "TYPE", -1)) is not cls:
        raise LocalProtocolError(f"not a wire message: {message!r}")
    header = message.header()
    try:
        if checked:
            _check_object(header, cls.CHECKS, cls.DEFAULTS)
        header_bytes = _json_encode(header).encode()
    except (ValueError, TypeError, RecursionError) as exc:
        raise LocalProtocolError(f"cannot encode {cls.__name__}: {exc!r}"[:MAX_REASON_BYTES]) from None
    payload = getattr(message, "payload") if cls.HAS_PAYLOAD else b""
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise LocalProtocolError(f"{cls.__name__} payload must be bytes")
    length = 2 + _HEADER_LEN.size + len(header_bytes) + len(payload)
    if length > MAX_FRAME_BYTES:
        raise LocalProtocolError(f"{cls.__name__} of {length} bytes exceeds MAX_FRAME_BYTES ({MAX_FRAME_BYTES})")
    head = _FRAME.pack(length, PROTOCOL_VERSION, cls.TYPE) + _HEADER_LEN.pack(len(header_bytes)) + header_bytes
    return head, payload


@dataclass(frozen=True)
class Encoded:
    """A message encoded once (:func:`encode_once`), to be queued on many links: ``encode`` and
    ``encode_parts`` give its frame back as it is, without encoding (nor checking) it again.
    ``kind`` is the message's type name."""

    head: bytes
    payload: Any
    kind: str


def encode_once(message: _Message, *, checked: bool = True) -> Encoded:
    """``message`` encoded now, for sending the same frame on many links (a directory update
    to every leader). Raises as ``encode``."""
    head, payload = encode_parts(message, checked=checked)
    return Encoded(head, payload, type(message).__name__)


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise ValueError(f"number {text[:20]} overflows")
    return value


# The header codec, made once: json.loads and json.dumps with options build a new decoder or
# encoder at every call (a few microseconds a frame).
_json_header = json.JSONDecoder(parse_constant=_refuse_constant, parse_float=_finite_float).decode
_json_encode = json.JSONEncoder(separators=(",", ":"), allow_nan=False).encode


def directory_updates(joined, left) -> List["DirectoryUpdate"]:
    """``joined`` entries and ``left`` ids as DirectoryUpdate messages within the size limits."""
    joined, left = list(joined), list(left)
    step = MAX_ENTRIES_PER_UPDATE
    out = [DirectoryUpdate(joined=tuple(joined[i : i + step])) for i in range(0, len(joined), step)]
    out += [DirectoryUpdate(left=tuple(left[i : i + step])) for i in range(0, len(left), step)]
    return out


class Decoder:
    """Incremental frame decoder: ``feed()`` bytes, then call ``next_message()`` until None.

    ``next_message()`` returns a message, returns None when it needs more bytes, or raises
    RemoteProtocolError; after an error every later call raises it again.

    A driver that reads a socket can skip ``feed``'s copy: ``recv_buffer()`` is a writable view
    of free space where the next bytes go (``sock.recv_into`` it), ``received(n)`` says how many
    bytes were written there. Small frames share the decoder's buffer, and each one's payload is
    copied out of it once; bytes left over after the last whole frame move to its start only
    when they are fewer than those consumed. A frame of ``OWN_BUFFER_FRAME_BYTES`` or more
    (relayed data), once its first 6 bytes are checked, gets a buffer of its own: what is
    buffered of it moves there, ``recv_buffer()`` is then the rest of that frame, and its
    payload is a read-only view of that buffer, never copied (a forwarder writes it on as it
    is).
    """

    def __init__(self, *, peer: str | None = None, max_frame_bytes: int = MAX_FRAME_BYTES) -> None:
        self.peer = peer
        self.max_frame_bytes = max_frame_bytes
        self._buf = bytearray()
        self._pos = 0  # first byte not yet decoded
        self._end = 0  # end of the bytes received (the buffer beyond is free space)
        self._error: RemoteProtocolError | None = None
        # A large frame being received into its own buffer: the buffer (the whole frame), the
        # bytes of it received, and its message class (its first 6 bytes are checked).
        self._frame: Optional[bytearray] = None
        self._frame_have = 0
        self._frame_cls: Optional[Type[_Message]] = None

    @property
    def buffered(self) -> int:
        """Bytes received but not yet turned into a message."""
        return self._end - self._pos + self._frame_have

    def feed(self, data) -> None:
        """Take ``data`` (any bytes-like object) as the next bytes received."""
        view = memoryview(data).cast("B")
        if self._filling():
            frame = cast(bytearray, self._frame)
            n = min(len(view), len(frame) - self._frame_have)
            frame[self._frame_have : self._frame_have + n] = view[:n]
            self._frame_have += n
            view = view[n:]
            # (the rest follows the frame, in the shared buffer: next_message hands the frame
            # out first)
        n = len(view)
        if n:
            self.recv_buffer_shared(n)[:n] = view
            self._end += n

    def _filling(self) -> bool:
        """True while a large frame is being received into its own buffer (not whole yet)."""
        return self._frame is not None and self._frame_have < len(self._frame)

    def recv_buffer(self, min_bytes: int = _RECV_ROOM_BYTES) -> memoryview:
        """A writable view of free space for the next bytes: at least ``min_bytes`` (more when a
        frame being received needs them), or, while a large frame is received into a buffer of
        its own, exactly the rest of that frame; call ``received(n)`` after writing n bytes."""
        if self._filling():
            return memoryview(cast(bytearray, self._frame))[self._frame_have :]
        return self.recv_buffer_shared(min_bytes)

    def recv_buffer_shared(self, min_bytes: int) -> memoryview:
        """Free space in the shared buffer: at least ``min_bytes`` (see ``recv_buffer``)."""
        need = max(min_bytes, self._pending_frame_bytes() - (self._end - self._pos))
        if self._pos and self._pos >= self._end - self._pos:  # move the leftover to the start
            kept = self._end - self._pos
            if kept:
                self._buf[:kept] = self._buf[self._pos : self._end]
            self._pos, self._end = 0, kept
        if len(self._buf) - self._end < need:
            grown = bytearray(max(self._end + need, 2 * len(self._buf)))
            grown[: self._end - self._pos] = memoryview(self._buf)[self._pos : self._end]
            self._buf, self._end, self._pos = grown, self._end - self._pos, 0
        return memoryview(self._buf)[self._end :]

    def received(self, nbytes: int) -> None:
        """``nbytes`` bytes were written at the start of the last ``recv_buffer()``."""
        if self._filling():
            if not 0 <= nbytes <= len(cast(bytearray, self._frame)) - self._frame_have:
                raise ValueError(f"received({nbytes}) beyond the frame being received")
            self._frame_have += nbytes
            return
        if not 0 <= nbytes <= len(self._buf) - self._end:
            raise ValueError(f"received({nbytes}) beyond the receive buffer")
        self._end += nbytes

    def missing(self) -> int:
        """How many more bytes a driver may receive before calling ``next_message()`` again:
        up to the frame's first 6 bytes (length, version and type are checked as soon as they
        are in), then the rest of the frame (no message can come out before it is whole)."""
        if self._frame is not None:  # (whole: next_message gives it; nothing is missing)
            return max(1, len(self._frame) - self._frame_have)
        buffered = self._end - self._pos
        if buffered < _FRAME.size:
            return _FRAME.size - buffered
        return max(1, self._pending_frame_bytes() - buffered)

    def _pending_frame_bytes(self) -> int:
        """The size of the frame at the decoding position in the shared buffer, once its length
        is known (its length field checked), else 0."""
        if self._end - self._pos < _FRAME_PREFIX_BYTES or self._error is not None:
            return 0
        length = int.from_bytes(self._buf[self._pos : self._pos + _FRAME_PREFIX_BYTES], "big")
        return _FRAME_PREFIX_BYTES + length if length <= self.max_frame_bytes else 0

    def next_message(self) -> Optional[Message]:
        if self._error is not None:
            raise self._error
        try:
            return self._next()
        except RemoteProtocolError as exc:
            self._error = exc
            raise

    def _fail(self, why: str) -> RemoteProtocolError:
        return RemoteProtocolError(why, peer=self.peer)

    def _next(self) -> Optional[Message]:
        frame = self._frame
        if frame is not None:
            if self._frame_have < len(frame):
                return None
            frame_cls = cast(Type[_Message], self._frame_cls)
            self._frame, self._frame_have, self._frame_cls = None, 0, None
            return self._parse(frame_cls, frame, _FRAME.size, len(frame), own=True)
        buffered = self._end - self._pos
        if buffered < _FRAME.size:
            if buffered >= _FRAME_PREFIX_BYTES:
                self._check_length(int.from_bytes(self._buf[self._pos : self._pos + 4], "big"))
            return None
        length, version, type_code = _FRAME.unpack_from(self._buf, self._pos)
        self._check_length(length)
        if version != PROTOCOL_VERSION:
            raise self._fail(f"unsupported protocol version {version} (we speak {PROTOCOL_VERSION})")
        cls = _BY_TYPE.get(type_code)
        if cls is None:
            raise self._fail(f"unknown message type {type_code}")
        size = _FRAME_PREFIX_BYTES + length
        if buffered < size:
            if size >= OWN_BUFFER_FRAME_BYTES:
                # Its own buffer from now on (what is buffered is part of it: it is not whole).
                own = bytearray(size)
                own[:buffered] = memoryview(self._buf)[self._pos : self._end]
                self._frame, self._frame_have, self._frame_cls = own, buffered, cls
                self._pos = self._end = 0
            return None
        start = self._pos + _FRAME.size
        end = self._pos + size
        self._pos = end
        if self._pos == self._end:
            self._pos = self._end = 0
        return self._parse(cls, self._buf, start, end, own=False)

    def _check_length(self, length: int) -> None:
        if length > self.max_frame_bytes:
            raise self._fail(f"frame of {length} bytes exceeds the limit of {self.max_frame_bytes}")
        if length < 2 + _HEADER_LEN.size:
            raise self._fail(f"frame of {length} bytes is too short")

    def _parse(self, cls: Type[_Message], buf: bytearray, start: int, end: int, *, own: bool) -> Message:
        # The body is buf[start:end]. A frame in the shared buffer has its payload copied out
        # (once); one in a buffer of its own (``own``) gives a read-only view of it.
        (header_len,) = _HEADER_LEN.unpack_from(buf, start)
        header_start = start + _HEADER_LEN.size
        if header_len > end - header_start:
            raise self._fail(f"{cls.__name__}: header length {header_len} runs past the frame")
        payload_start = header_start + header_len
        if payload_start < end and not cls.HAS_PAYLOAD:
            raise self._fail(f"{cls.__name__} carries no payload, got {end - payload_start} bytes")
        try:
            header = _json_header(buf[header_start:payload_start].decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise self._fail(f"{cls.__name__}: header is not JSON: {exc}") from None
        payload: Any = b""
        if payload_start < end:
            view = memoryview(buf)[payload_start:end]
            payload = view.toreadonly() if own else bytes(view)
        try:
            return cls.from_header(header, payload)
        except (ValueError, TypeError) as exc:
            raise self._fail(f"{cls.__name__}: {exc}") from None
