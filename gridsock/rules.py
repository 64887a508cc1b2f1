"""Configuration rules: which stack a connection uses, and the least a server accepts.

Theory of operation
-------------------
As in the paper's configuration section, a *scheme* gives the default and *rules* give the
exceptions. A rule matches the connecting node (``from``) and the node it connects to
(``to``) by pattern, and names the stack; the first rule that matches wins, else the scheme
decides from the directory's facts:

- ``cluster`` (the default): plain ``tcp`` inside a cluster; outside it ``tls/tcp`` to a node that
  accepts inbound connections, ``tls/reverse`` (it connects back) when this node accepts them,
  ``tls/splice`` (simultaneous open) when the peer does not, then the *via* stacks that match
  (through a gateway: ``tls/socks(proxy=...)``, ``tls/ssh(gateway=...)``), the connecting
  node's own gateways towards a node that accepts inbound connections (see *Gateways* below),
  and ``tls/relay`` (through the bootstrap routes), which works everywhere. The assembler races
  the candidates in that order with staggered starts and keeps the best that worked for the peer
  (:meth:`Rules.candidates`, :meth:`gridsock.assembly.Assembler._race`).
- ``direct``: direct TCP between all nodes (``tcp`` inside a cluster, ``tls/tcp`` outside).
- ``relay``: the bootstrap channel carries everything (``tls/relay``); works everywhere.

A ``[[via]]`` entry names a gateway path for the pairs it matches (``from``, ``to``): for
example the SOCKS proxy or sshd of a private cluster's front-end, for connections into (or out
of) that cluster. Unlike a rule it adds a candidate rather than replacing them.

Gateways need no rules: a node knows its own ways out of a private network (the SSH gateway
its uplink uses, a SOCKS proxy it was given; a member without any uses its leader's, which the
directory carries: :attr:`gridsock.wire.NodeEntry.gateways`, :func:`gateways_of`). It reaches
outside nodes that accept inbound connections through them (``tls/socks(proxy=...)``,
``tls/ssh(gateway=...)``), and a ``reverse`` asked of it dials back through them
(:mod:`gridsock.components.reverse`).

Methods are ranked in *tiers* (:func:`tier`): direct methods (``tcp``, ``reverse``, ``splice``
and any third party's) first, then the gateway methods (``socks``, ``ssh``), then ``relay``. A
race won by a lower tier lets the better candidates still under way finish in the background,
and the best that worked is what the peer's next connection tries first.

Patterns: ``*`` (anything), ``cluster:NAME``, ``name:GLOB`` and ``addr:GLOB`` (matched against the
hosts of the node's advertised and observed addresses), ``!PATTERN`` negates.

The *policy* is the server's side: filters it requires from clients inside its cluster and
from clients outside it (default: nothing inside, ``tls`` outside). A request whose stack lacks
a required filter is refused with the reason, whatever the client's rules said: the meta channel
is no back door to a weaker stack. In a plain-TCP session there are no certificates, so ``tls``
is neither chosen nor required.

"Inside the cluster" (:func:`same_cluster`) is decided on directory entries only, never on what
a request or a ``Hello`` says: the client's entry is the one its authenticated id has in the
server's directory, and the ``cluster`` there is what the rendez-vous node accepted. In a
session that defines its clusters that is the cluster the node's certificate names
(:mod:`gridsock.session`, docs/security.md), so "inside" cannot be had by claiming a cluster.

A rules file is TOML::

    scheme = "cluster"
    [policy]
    inside_cluster = []
    outside_cluster = ["tls"]
    [[rule]]
    from = "cluster:A"
    to = "name:b*"
    stack = "tls/lz4/relay"
    [[via]]
    from = "!cluster:C"
    to = "cluster:C"
    stack = "tls/socks(proxy=203.0.113.4:1080)"
"""
from __future__ import annotations

import fnmatch
import sys
from dataclasses import dataclass
from typing import List, Optional, Tuple

from . import wire
from .errors import ConfigError
from .registry import default_registry
from .stack import Stack

if sys.version_info >= (3, 11):
    import tomllib
else:  # the same parser, before it joined the standard library
    import tomli as tomllib

__all__ = ["Rule", "Rules", "SCHEMES", "TIERS", "tier", "own_gateways", "gateways_of"]

SCHEMES = ("cluster", "direct", "relay")
# The ranks of methods, best first: a race won by a later tier is not the end of it.
TIERS = ("direct", "gateway", "relay")
# Methods by tier, for components that do not say (a ``tier`` class attribute naming one of
# TIERS, as ``socks`` and ``ssh`` do); any other method, a third party's included, is direct.
_METHOD_TIERS = {"socks": "gateway", "ssh": "gateway", "relay": "relay"}
# A rules file larger than this is surely a mistake.
MAX_RULES = 1000


def tier(stack: Stack, component: object = None) -> int:
    """The rank of ``stack``'s method in :data:`TIERS` (0 is best): ``component``'s ``tier``
    attribute if it has one (the method's class), else by name."""
    name = getattr(component, "tier", None)
    if name not in TIERS:
        name = _METHOD_TIERS.get(stack.method.name, "direct")
    return TIERS.index(name)


def own_gateways(node) -> Tuple[str, ...]:
    """The gateways ``node`` was given, as method layers: ``ssh(gateway=USER@HOST:PORT)`` for
    the SSH gateway its uplink uses (``node.ssh_gateway``), ``socks(proxy=HOST:PORT)`` for its
    SOCKS proxy (``node.socks_gateway``). What it advertises (:attr:`wire.NodeEntry.gateways`)."""
    found: List[str] = []
    ssh = getattr(node, "ssh_gateway", None)
    if ssh is not None:
        found.append(f"ssh(gateway={ssh})")
    socks = getattr(node, "socks_gateway", None)
    if socks:
        found.append(f"socks(proxy={socks})")
    return tuple(found)


def _parse(text: str) -> Stack:
    """The default registry's parse of ``text``, kept while its components stay the same
    (:meth:`gridsock.registry.Registry.parse`): candidates are asked for on every connect."""
    return default_registry.parse(text)


def gateways_of(node) -> Tuple[str, ...]:
    """``node``'s ways out of its network, as method layers (``ssh(gateway=...)``,
    ``socks(proxy=...)``): its own (:func:`own_gateways`), those its directory entry carries,
    and for a member that has none, its leader's (one network)."""
    found = list(own_gateways(node))
    entry: Optional[wire.NodeEntry] = getattr(node, "entry", None)
    if entry is not None:
        found += entry.gateways
        if not found and entry.role == "member":
            leader = node.directory.get(entry.leader)
            if leader is not None and same_cluster(leader, entry):
                found += leader.gateways
    return tuple(dict.fromkeys(found))


def _hosts(entry: wire.NodeEntry) -> List[str]:
    hosts = []
    for addr in list(entry.addrs) + ([entry.observed] if entry.observed else []):
        host = addr.rsplit(":", 1)[0].strip("[]")
        hosts.append(host)
    return hosts


def _match(pattern: str, entry: wire.NodeEntry) -> bool:
    if pattern.startswith("!"):
        return not _match(pattern[1:], entry)
    if pattern == "*":
        return True
    kind, _, value = pattern.partition(":")
    if kind == "cluster":
        return entry.cluster == value
    if kind == "name":
        return fnmatch.fnmatchcase(entry.name, value)
    if kind == "addr":
        return any(fnmatch.fnmatchcase(h, value) for h in _hosts(entry))
    raise ConfigError(f"bad pattern {pattern!r}: use *, cluster:NAME, name:GLOB or addr:GLOB (! negates)")


def same_cluster(a: wire.NodeEntry, b: wire.NodeEntry) -> bool:
    """True if ``a`` and ``b`` share a cluster network (a node without a cluster is alone).

    Both are directory entries: their clusters are the attested ones (see the module docstring)."""
    return a.node_id == b.node_id or (a.cluster is not None and a.cluster == b.cluster)


@dataclass(frozen=True)
class Rule:
    src: str
    dst: str
    stack: str

    def __post_init__(self) -> None:
        dummy = wire.NodeEntry(node_id="00000000-0000-4000-8000-000000000000", name="x", cluster=None,
                               leader="00000000-0000-4000-8000-000000000000")
        _match(self.src, dummy)
        _match(self.dst, dummy)
        Stack.parse(self.stack)

    def matches(self, src: wire.NodeEntry, dst: wire.NodeEntry) -> bool:
        return _match(self.src, src) and _match(self.dst, dst)


def _rule_list(data: dict, key: str) -> List[Rule]:
    raw = data.get(key, [])
    if not isinstance(raw, list) or len(raw) > MAX_RULES:
        raise ConfigError(f"[[{key}]] must be a list of at most {MAX_RULES} tables")
    out = []
    for i, r in enumerate(raw):
        if not isinstance(r, dict) or set(r) - {"from", "to", "stack"} or "stack" not in r:
            raise ConfigError(f"{key} {i + 1}: needs 'stack', optional 'from' and 'to', nothing else")
        try:
            out.append(Rule(str(r.get("from", "*")), str(r.get("to", "*")), str(r["stack"])))
        except ConfigError as exc:
            raise ConfigError(f"{key} {i + 1}: {exc}") from None
    return out


@dataclass(frozen=True)
class Rules:
    """A scheme, exception rules and the server policy; see the module docstring."""

    scheme: str = "cluster"
    rules: Tuple[Rule, ...] = ()
    vias: Tuple[Rule, ...] = ()
    inside_cluster: Tuple[str, ...] = ()
    outside_cluster: Tuple[str, ...] = ("tls",)
    tls: bool = True  # False in a plain-TCP session: no certificates, no tls filter
    #: The tiers (of TIERS) whose candidates carry the ``resume`` layer right above their method
    #: (``tls/relay`` becomes ``tls/resume/relay``): connections that survive losing their path.
    resume: Tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise ConfigError(f"unknown scheme {self.scheme!r}: choose one of {', '.join(SCHEMES)}")
        unknown = [t for t in self.resume if t not in TIERS]
        if unknown:
            raise ConfigError(f"resume: unknown tiers {', '.join(map(repr, unknown))}: choose among {', '.join(TIERS)}")

    @classmethod
    def from_dict(cls, data: dict, *, tls: bool = True) -> "Rules":
        """Build rules from parsed TOML (see the module docstring); ConfigError if bad."""
        if not isinstance(data, dict):
            raise ConfigError("rules must be a table")
        unknown = set(data) - {"scheme", "policy", "rule", "via", "resume"}
        if unknown:
            raise ConfigError(f"unknown rules keys: {', '.join(sorted(unknown))}")
        rules, vias = _rule_list(data, "rule"), _rule_list(data, "via")
        policy = data.get("policy", {})
        if not isinstance(policy, dict) or set(policy) - {"inside_cluster", "outside_cluster"}:
            raise ConfigError("[policy] takes inside_cluster and outside_cluster (lists of filter names)")

        def names(key, default):
            value = policy.get(key, default)
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ConfigError(f"policy.{key} must be a list of filter names")
            return tuple(value)

        resume = data.get("resume", [])
        if not isinstance(resume, list) or not all(isinstance(t, str) for t in resume):
            raise ConfigError(f"resume must be a list of tiers ({', '.join(TIERS)})")
        return cls(scheme=str(data.get("scheme", "cluster")), rules=tuple(rules), vias=tuple(vias),
                   inside_cluster=names("inside_cluster", []), outside_cluster=names("outside_cluster", ["tls"]),
                   tls=tls, resume=tuple(resume))

    @classmethod
    def load(cls, path, *, tls: bool = True) -> "Rules":
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except OSError as exc:
            raise ConfigError(f"cannot read rules file {path}: {exc.strerror or exc}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"rules file {path}: {exc}") from None
        try:
            return cls.from_dict(data, tls=tls)
        except ConfigError as exc:
            raise ConfigError(f"rules file {path}: {exc}") from None

    def choose(self, src: wire.NodeEntry, dst: wire.NodeEntry) -> Stack:
        """The stack ``src`` tries first to connect to ``dst``."""
        return self.candidates(src, dst)[0]

    def candidates(self, src: wire.NodeEntry, dst: wire.NodeEntry) -> List[Stack]:
        """The stacks ``src`` tries, in order, to connect to ``dst``.

        A matching rule names exactly one stack (no fallback: the user said so). Otherwise the
        scheme orders what the directory says can work: a direct connection where ``dst`` is on
        the same network or accepts inbound connections, ``reverse`` where ``src`` accepts them,
        ``splice`` where ``dst`` does not, the matching *via* stacks (gateways), ``src``'s own
        gateways (``src.gateways``) where ``dst`` accepts inbound connections, and the relay,
        which works everywhere, last.
        """
        for rule in self.rules:
            if rule.matches(src, dst):
                return [_parse(rule.stack)]
        return [self._resumable(stack) for stack in self._candidates(src, dst)]

    def _resumable(self, stack: Stack) -> Stack:
        """``stack`` with the ``resume`` layer right above its method (and its wrappers), if
        its method's tier is one of :attr:`resume` and it has none yet."""
        if not self.resume or stack.has("resume") or TIERS[tier(stack)] not in self.resume:
            return stack
        layers = [str(layer) for layer in stack.layers]
        at = len(layers) - 1
        while at > 0 and stack.layers[at - 1].name == "parallel":  # (wrappers stay right above the method)
            at -= 1
        return _parse("/".join(layers[:at] + ["resume"] + layers[at:]))

    def _candidates(self, src: wire.NodeEntry, dst: wire.NodeEntry) -> List[Stack]:
        secure = "tls/" if self.tls else ""
        relay = _parse(secure + "relay")
        if self.scheme == "relay":
            return [relay]
        if same_cluster(src, dst):
            return [_parse("tcp"), relay]
        texts = []
        if self.scheme == "direct" or dst.inbound:
            texts.append(secure + "tcp")
        if src.inbound:
            texts.append(secure + "reverse")
        if not dst.inbound:
            texts.append(secure + "splice")
        texts += [via.stack for via in self.vias if via.matches(src, dst)]
        if dst.inbound:  # out through our own gateway, to a node that the outside can reach
            texts += [secure + gateway for gateway in src.gateways]
        return [_parse(t) for t in dict.fromkeys(texts)] + [relay]

    def required(self, server: wire.NodeEntry, client: wire.NodeEntry) -> Tuple[str, ...]:
        """The filters ``server`` requires on a connection from ``client``."""
        names = self.inside_cluster if same_cluster(server, client) else self.outside_cluster
        return tuple(n for n in names if self.tls or n != "tls")

    def refusal(self, server: wire.NodeEntry, client: wire.NodeEntry, stack: Stack) -> Optional[str]:
        """Why ``server`` refuses ``stack`` from ``client``, or None if it accepts it."""
        missing = [n for n in self.required(server, client) if not stack.has(n)]
        if missing:
            where = "inside" if same_cluster(server, client) else "outside"
            return (f"{server.name} requires {' and '.join(missing)} from nodes {where} its cluster; "
                    f"{client.name} asked for {stack}")
        if stack.has("tls") and not self.tls:
            return "this session has no certificates (plain TCP): the tls filter is not available"
        return None
