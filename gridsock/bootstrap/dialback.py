"""Dial-back reachability checks of the rendez-vous node, bounded so that they amplify nothing.

Theory of operation
-------------------
When a node joins (a leader's ``Hello``, a member in its leader's ``Register``), the rendez-vous
node dials back the addresses the node advertises, runs TLS and checks that the node's own
certificate answers (as libp2p's AutoNAT does); ``inbound`` in the directory records the
verdict. Unbounded, that lets one enrolled node make the rendez-vous node connect anywhere at
will: a thousand phantom members with eight addresses each were eight thousand connections to
a third party within seconds. :class:`DialBack` checks an entry's addresses under these rules,
in this order:

1. **Few addresses.** At most ``MAX_REGISTERED_ADDRS`` of an entry's addresses are kept in the
   directory and checked (:func:`bounded_addrs`; the rest are dropped with a log line).
2. **Only addresses the node plausibly owns** (:func:`plausible`), judged against the source
   address the rendez-vous node saw the registering leader's link come from (``observed``;
   for a member, its leader's): the same IP; when that source is loopback, loopback addresses;
   when it is private (RFC 1918, IPv6 ULA, link-local), private addresses of the same family
   (a private grid, or a cluster network the rendez-vous node is on); when it is public, the
   same /24 (IPv4) or /64 (IPv6). Host names are resolved once, and the checked address (not
   the name) is what is dialed. An address that fails the rule is not dialed: it counts as not
   reachable, with the reason in the log.
3. **One probe per address at a time, results cached** for ``DIALBACK_CACHE_S``: the cache
   keeps which node id answered at (IP, port) (or that none did); a check of the same address
   for any node within that time uses it, and concurrent checks of one address share one probe.
4. **Rate limits**: token buckets per registering node (its leader's id: a leader answers for
   its members' registrations), ``DIALBACK_BURST_PER_NODE`` probes at once then
   ``DIALBACK_RATE_PER_NODE`` a second, and for the whole rendez-vous node,
   ``DIALBACK_BURST_GLOBAL`` then ``DIALBACK_RATE_GLOBAL`` a second; at most
   ``DIALBACK_CONCURRENCY`` probes run at once. A probe that would wait more than
   ``DIALBACK_MAX_WAIT_S`` for its turn is not made (not reachable, logged once per node and
   interval).

So whatever one node registers, the rendez-vous node opens at most ``DIALBACK_BURST_PER_NODE``
connections at once on its behalf, then ``DIALBACK_RATE_PER_NODE`` a second, only to its own
address neighbourhood, and never twice to one address within the cache time.
"""
from __future__ import annotations

import ipaddress
import logging
import time
from typing import Callable, Dict, Iterable, List, Optional, Tuple, cast

import gevent
import gevent.event
import gevent.lock
from gevent import socket as gsocket

from ..errors import AuthError, ConfigError, ConnectError
from .transport import Address, parse_address

__all__ = [
    "DialBack",
    "TokenBucket",
    "plausible",
    "bounded_addrs",
    "MAX_REGISTERED_ADDRS",
    "DIALBACK_BURST_PER_NODE",
    "DIALBACK_RATE_PER_NODE",
    "DIALBACK_BURST_GLOBAL",
    "DIALBACK_RATE_GLOBAL",
    "DIALBACK_CONCURRENCY",
    "DIALBACK_CACHE_S",
    "DIALBACK_MAX_WAIT_S",
]

log = logging.getLogger(__name__)

# Addresses of one node that the directory keeps and the rendez-vous node dials back: a node
# port has one address per interface worth advertising, rarely more than two (the wire allows
# wire.MAX_ADDRS = 8; beyond this many, they are dropped with a log line).
MAX_REGISTERED_ADDRS = 4
# Probes one registering node (a leader, for itself and its members) may cause at once...
DIALBACK_BURST_PER_NODE = 16
# ... and then per second: a cluster of a thousand members settles in about four minutes, and
# a node that registers phantoms gets the rendez-vous node to connect this often, no more.
DIALBACK_RATE_PER_NODE = 4.0
# Probes of the whole rendez-vous node at once, then per second: a join storm of a thousand
# leaders settles in about ten seconds; many colluding nodes get no more than this.
DIALBACK_BURST_GLOBAL = 256
DIALBACK_RATE_GLOBAL = 100.0
# Probes in flight at once (each is a TCP connect and a TLS handshake, up to DIALBACK_TIMEOUT_S).
DIALBACK_CONCURRENCY = 32
# How long the outcome of a probe of one (IP, port) holds, for any node that names that address.
DIALBACK_CACHE_S = 30.0
# A probe that would wait longer than this for its turn under the rate limits is not made.
DIALBACK_MAX_WAIT_S = 30.0
# Buckets of registering nodes are forgotten (when full again) once there are this many.
_PRUNE_BUCKETS_AT = 4096
# Cached outcomes are pruned (expired ones dropped) once there are this many.
_PRUNE_CACHE_AT = 16384
# "This node's dial-back budget is spent" is logged at most once per node per this long.
_LIMIT_LOG_INTERVAL_S = 60.0


# A probe's outcome: the id of the node that answered (None: nobody did), and why not.
_Outcome = Tuple[Optional[str], str]


class TokenBucket:
    """A token bucket with reservations: :meth:`reserve` takes a token now or in the future
    and says how long to wait for it. ``burst`` tokens at most, ``rate`` more a second."""

    def __init__(self, burst: float, rate: float, clock: Callable[[], float]) -> None:
        self.burst = float(burst)
        self.rate = float(rate)
        self._clock = clock
        self._tokens = float(burst)
        self._at = clock()

    def _refill(self) -> None:
        now = self._clock()
        if self.rate > 0:
            self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now

    def wait_for_one(self) -> float:
        """Seconds until a token would be ours (0: now; ``inf``: never, with no refill)."""
        self._refill()
        if self._tokens >= 1:
            return 0.0
        return (1 - self._tokens) / self.rate if self.rate > 0 else float("inf")

    def take(self) -> None:
        """Take a token (possibly one not there yet: the bucket goes below zero)."""
        self._refill()
        self._tokens -= 1

    @property
    def full(self) -> bool:
        self._refill()
        return self._tokens >= self.burst


# Private networks (not the ipaddress module's is_private, which also counts the documentation
# ranges, whose meaning changed between Python versions): RFC 1918, shared address space
# (RFC 6598, carrier-grade NAT), link-local, IPv6 unique local and link-local.
_PRIVATE_NETS = tuple(ipaddress.ip_network(n) for n in (
    "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "169.254.0.0/16", "fc00::/7", "fe80::/10"))


def _is_private(a) -> bool:
    return any(a.version == n.version and a in n for n in _PRIVATE_NETS)


def _ip(text: str):
    try:
        return ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None


def plausible(ip: str, observed: Optional[str]) -> Optional[str]:
    """Why the rendez-vous node should not dial ``ip`` for a node whose (leader's) link came
    from ``observed`` (an IP), or None if the node plausibly owns it (see the module docstring)."""
    a, o = _ip(ip), _ip(observed or "")
    if a is None:
        return "not an IP address"
    if o is None:
        return "the registering link's source address is unknown"
    if isinstance(a, ipaddress.IPv6Address) and a.ipv4_mapped is not None:
        a = a.ipv4_mapped
    if isinstance(o, ipaddress.IPv6Address) and o.ipv4_mapped is not None:
        o = o.ipv4_mapped
    if a.version != o.version:
        return f"IPv{a.version}, while the node's link came over IPv{o.version}"
    if a == o:
        return None
    if a.is_unspecified or a.is_multicast or a.is_reserved:
        return "not a unicast address"
    if o.is_loopback:
        return None if a.is_loopback else "not loopback, while the node's link came from loopback"
    if _is_private(o):
        return None if _is_private(a) else "not private, while the node's link came from a private address"
    prefix = 24 if a.version == 4 else 64
    if a in ipaddress.ip_network(f"{o}/{prefix}", strict=False):
        return None
    return f"outside the /{prefix} of {o}, where the node's link came from"


def bounded_addrs(addrs: Tuple[str, ...], what: str) -> Tuple[str, ...]:
    """``addrs`` cut to ``MAX_REGISTERED_ADDRS``, with a log line naming ``what`` if cut."""
    if len(addrs) <= MAX_REGISTERED_ADDRS:
        return addrs
    log.warning("%s advertises %d addresses: keeping the first %d (MAX_REGISTERED_ADDRS)", what, len(addrs),
                MAX_REGISTERED_ADDRS)
    return tuple(addrs[:MAX_REGISTERED_ADDRS])


class DialBack:
    """The rendez-vous node's bounded dial-back (see the module docstring).

    ``probe(address, node_id)`` dials ``address`` (an Address with an IP) and returns the id of
    the node that answered there ("" in a plain-TCP session, where nodes are not
    authenticated: anyone answering counts), raising ConnectError, AuthError, OSError or
    TimeoutError when nobody did. The limits are keyword arguments with the module constants
    as defaults; ``clock`` is injected for tests.
    """

    def __init__(self, probe: Callable[[Address, str], str], *, burst_per_node: float = DIALBACK_BURST_PER_NODE,
                 rate_per_node: float = DIALBACK_RATE_PER_NODE, burst_global: float = DIALBACK_BURST_GLOBAL,
                 rate_global: float = DIALBACK_RATE_GLOBAL, concurrency: int = DIALBACK_CONCURRENCY,
                 cache_s: float = DIALBACK_CACHE_S, max_wait_s: float = DIALBACK_MAX_WAIT_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._probe = probe
        self.burst_per_node = burst_per_node
        self.rate_per_node = rate_per_node
        self.cache_s = cache_s
        self.max_wait_s = max_wait_s
        self._clock = clock
        self._global = TokenBucket(burst_global, rate_global, clock)
        self._buckets: Dict[str, TokenBucket] = {}
        self._slots = gevent.lock.BoundedSemaphore(concurrency)
        self._cache: Dict[Tuple[str, int], Tuple[float, _Outcome]] = {}  # (IP, port) -> (when, outcome)
        self._inflight: Dict[Tuple[str, int], gevent.event.AsyncResult] = {}
        self._limit_logged: Dict[str, float] = {}
        # What the checks did, for status and tests: probes made, answers from the cache,
        # addresses not dialed as implausible or over the limits.
        self.counters: Dict[str, int] = {"probes": 0, "cached": 0, "implausible": 0, "limited": 0}

    def check(self, node_id: str, addrs: Iterable[str], *, registrar: str, observed: Optional[str]) -> Tuple[bool, List[str]]:
        """Check the addresses ``addrs`` of node ``node_id``, registered by ``registrar`` (its
        leader's id) over a link from ``observed`` (``host:port`` or None), in order, until one
        answers as the node. Returns ``(inbound, reasons)``: the reasons each address before
        did not count. Blocks cooperatively (probes, waits for the rate limits)."""
        observed_host = None
        if observed:
            try:
                observed_host = parse_address(observed).host
            except ConfigError:
                observed_host = None
        reasons: List[str] = []
        for text in list(addrs)[:MAX_REGISTERED_ADDRS]:
            why = self._check_one(text, node_id, registrar, observed_host)
            if why is None:
                return True, reasons
            reasons.append(f"{text}: {why}")
        return False, reasons

    def _check_one(self, text: str, node_id: str, registrar: str, observed_host: Optional[str]) -> Optional[str]:
        """Why ``text`` does not count as node ``node_id``'s (a reason), or None if it answered."""
        try:
            address = parse_address(text)
        except ConfigError as exc:
            return str(exc)
        if address.is_unix or address.host is None:
            return "not a TCP address"
        ip = self._resolve(address.host)
        if ip is None:
            return f"cannot resolve {address.host!r}"
        why = plausible(ip, observed_host)
        if why:
            self.counters["implausible"] += 1
            return f"not dialed: {why}"
        key = (ip, address.port)
        answered = self._cached(key)
        if answered is not None:
            self.counters["cached"] += 1
            return self._verdict(answered, node_id)
        pending = self._inflight.get(key)
        if pending is not None:  # someone is probing it now: share the outcome
            self.counters["cached"] += 1
            return self._verdict(cast(_Outcome, pending.get()), node_id)
        why = self._wait_turn(registrar)
        if why:
            return why
        answered = self._cached(key)  # (a probe may have finished while we waited)
        if answered is not None:
            self.counters["cached"] += 1
            return self._verdict(answered, node_id)
        pending = self._inflight.get(key)
        if pending is not None:
            self.counters["cached"] += 1
            return self._verdict(cast(_Outcome, pending.get()), node_id)
        result = self._inflight[key] = gevent.event.AsyncResult()
        outcome: _Outcome = (None, "")
        try:
            with self._slots:
                self.counters["probes"] += 1
                try:
                    outcome = (self._probe(Address(host=ip, port=address.port), node_id), "")
                except (ConnectError, AuthError, OSError, TimeoutError) as exc:
                    outcome = (None, str(exc) or type(exc).__name__)
        finally:
            self._remember(key, outcome)
            del self._inflight[key]
            result.set(outcome)
        return self._verdict(outcome, node_id)

    @staticmethod
    def _verdict(outcome: _Outcome, node_id: str) -> Optional[str]:
        answered, why = outcome
        if answered is None:
            return why or "no answer"
        if answered in ("", node_id):
            return None
        return f"node {answered} answers there, not node {node_id}"

    def _cached(self, key: Tuple[str, int]) -> Optional[_Outcome]:
        """The outcome of a probe of ``key`` within the cache time, or None."""
        hit = self._cache.get(key)
        if hit is None:
            return None
        at, outcome = hit
        if self._clock() - at >= self.cache_s:
            del self._cache[key]
            return None
        return outcome

    def _remember(self, key: Tuple[str, int], outcome: _Outcome) -> None:
        self._cache[key] = (self._clock(), outcome)
        if len(self._cache) >= _PRUNE_CACHE_AT:
            now = self._clock()
            for k in [k for k, (at, _) in self._cache.items() if now - at >= self.cache_s]:
                del self._cache[k]

    def _wait_turn(self, registrar: str) -> Optional[str]:
        """Take a probe's turn under both rate limits (waiting for it), or say why not."""
        bucket = self._buckets.get(registrar)
        if bucket is None:
            if len(self._buckets) >= _PRUNE_BUCKETS_AT:
                for k in [k for k, b in self._buckets.items() if b.full]:
                    del self._buckets[k]
            bucket = self._buckets[registrar] = TokenBucket(self.burst_per_node, self.rate_per_node, self._clock)
        wait = max(bucket.wait_for_one(), self._global.wait_for_one())
        if wait > self.max_wait_s:
            self.counters["limited"] += 1
            now = self._clock()
            if now - self._limit_logged.get(registrar, float("-inf")) >= _LIMIT_LOG_INTERVAL_S:
                self._limit_logged[registrar] = now
                if len(self._limit_logged) > _PRUNE_BUCKETS_AT:
                    self._limit_logged.clear()
                log.warning("dial-back: node %s's budget is spent (%g probes at once, then %g a second; the "
                            "rendez-vous node's: %g, then %g a second): addresses it registers are not dialed for now",
                            registrar, self.burst_per_node, self.rate_per_node, self._global.burst, self._global.rate)
            return "not dialed: the dial-back rate limit is reached"
        bucket.take()
        self._global.take()
        if wait > 0:
            gevent.sleep(wait)
        return None

    @staticmethod
    def _resolve(host: str) -> Optional[str]:
        """``host`` as an IP (itself if it is one; else its first address), or None."""
        if _ip(host) is not None:
            return host
        try:
            infos = gsocket.getaddrinfo(host, None, 0, gsocket.SOCK_STREAM)
        except OSError:
            return None
        return str(infos[0][4][0]) if infos else None
