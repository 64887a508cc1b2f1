"""``gridsock netcheck``: what a node can do from where it is (as ``tailscale netcheck`` does).

Theory of operation
-------------------
The control operation ``netcheck`` (:func:`control_netcheck`, run in the node) gathers the
facts the assembler chooses stacks from (:meth:`gridsock.rules.Rules.candidates`, the
methods' own checks in :mod:`gridsock.components`), measures what can be measured now, and
says what follows:

- **inbound**: the rendez-vous node's dial-back verdict on this node's own directory entry
  (``inbound``): whether peers can open connections to its node port;
- **address**: the uplink socket's local address against the address the rendez-vous node
  observed it from (a leader's; a member's uplink ends at its leader, so it reports the
  leader's observed address and cannot measure the NAT itself). A different host means a NAT;
  the same port on both sides means the NAT kept the source port, as ``splice`` needs
  (:mod:`gridsock.components.splice`). An uplink through an SSH gateway is observed from the
  gateway: no NAT verdict then;
- **gateways**: the SSH gateway of the uplink (a ``direct-tcpip`` channel to the rendez-vous
  node is opened and closed, on the cached SSH transport), and every SOCKS proxy and SSH
  gateway the rules name (``[[rule]]`` and ``[[via]]`` stacks): a SOCKS5 greeting, or the
  sshd's banner;
- **round trips** over the bootstrap channel (``ping``) to the rendez-vous node and to the
  cluster's leader: min and median of a few;
- **methods**: for each method, whether this node can offer or accept it, and why, from the
  facts above; and the candidates the rules give towards each peer of the directory.

Every probe is bounded (``*_TIMEOUT_S`` below); the probes run at once, so a netcheck takes as
long as its slowest probe, at most :data:`NETCHECK_TIMEOUT_S`. A probe still running then is
cancelled and reported as such.
"""
from __future__ import annotations

import functools
import json
import logging
import statistics
import sys
import time
from typing import Any, Callable, Dict, List, Optional

import gevent
from gevent import socket as gsocket

from .cli import _add_target, _control_target
from .errors import ConfigError, GridsockError

__all__ = ["add_commands", "control_netcheck", "format_netcheck", "NETCHECK_TIMEOUT_S", "PING_COUNT",
           "PING_TIMEOUT_S", "GATEWAY_TIMEOUT_S"]

log = logging.getLogger(__name__)

# The whole netcheck: every probe below runs at once and ends within this.
NETCHECK_TIMEOUT_S = 10.0
# Pings to the rendez-vous node and to the leader: a few give a min and a median.
PING_COUNT = 3
MAX_PING_COUNT = 20
# One ping over the bootstrap channel (a healthy grid answers in milliseconds).
PING_TIMEOUT_S = 2.0
# One gateway probe: TCP connect and the first answer (SOCKS5 greeting, sshd banner, SSH channel).
GATEWAY_TIMEOUT_S = 5.0
# The SOCKS5 greeting: version 5, one method offered, "no authentication".
SOCKS5_GREETING = b"\x05\x01\x00"
# An sshd's banner line is at most 255 bytes (RFC 4253, 4.2).
SSH_BANNER_BYTES = 255


def _host_port(text: Optional[str]) -> tuple:
    """``(host, port)`` of ``HOST:PORT`` (``[v6]:PORT``); ``(None, None)`` if not one."""
    if not text:
        return None, None
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        return None, None
    return host.strip("[]"), int(port)


def _local_address(node) -> Optional[str]:
    """The uplink socket's local ``host:port`` (None: down, a Unix socket, an SSH tunnel)."""
    link = node.uplink
    if link is None or node.ssh_gateway is not None:
        return None
    try:
        name = link.sock.getsockname()
    except (OSError, AttributeError):
        return None
    if not isinstance(name, tuple) or len(name) < 2:
        return None  # (a Unix socket)
    host = name[0]
    return f"[{host}]:{name[1]}" if ":" in host else f"{host}:{name[1]}"


def _address_facts(node, me, leader) -> Dict[str, Any]:
    """Local against observed address: NAT, and whether it kept the port."""
    local = _local_address(node)
    if node.role == "leader":
        observed, observed_of = (me.observed if me else None), "self"
    else:
        observed, observed_of = (leader.observed if leader else None), "leader"
    facts: Dict[str, Any] = {"local": local, "observed": observed, "observed_of": observed_of,
                             "nat": None, "nat_keeps_port": None, "detail": ""}
    if node.ssh_gateway is not None:
        facts["detail"] = f"the uplink goes through the SSH gateway {node.ssh_gateway}: the rendez-vous node sees the gateway"
        return facts
    observed_host, observed_port = _host_port(observed)
    if observed_host is None:
        facts["detail"] = ("no observed address yet" if node.role == "leader"
                           else "the leader has no observed address")
        return facts
    if node.role == "member":
        own = [_host_port(a)[0] for a in (me.addrs if me else ())]
        facts["nat"] = bool(own) and observed_host not in own
        facts["detail"] = (f"the leader is seen from {observed}; a member's uplink ends at its leader, so the "
                           "NAT's port keeping is measured there (gridsock netcheck on the leader)")
        return facts
    local_host, local_port = _host_port(local)
    if local_host is None:
        facts["detail"] = "the uplink is down: no local address to compare"
        return facts
    facts["nat"] = local_host != observed_host
    if facts["nat"]:
        facts["nat_keeps_port"] = local_port == observed_port
        facts["detail"] = (f"behind NAT: {local} is seen as {observed}; the NAT "
                           + ("kept the source port" if facts["nat_keeps_port"] else "changed the source port"))
    else:
        facts["detail"] = f"no NAT: seen from its own address {observed}"
    return facts


def _inbound_fact(me) -> Dict[str, Any]:
    if me is None:
        return {"verdict": None, "detail": "not joined: no directory entry"}
    addrs = ", ".join(me.addrs) or "no address"
    if me.inbound is None:
        return {"verdict": None, "detail": f"the rendez-vous node has not dialed back {addrs} yet"}
    if me.inbound:
        return {"verdict": True, "detail": f"the rendez-vous node dialed back {addrs}"}
    return {"verdict": False, "detail": f"the rendez-vous node could not dial back {addrs}"}


def _pings(node, dst: str, count: int) -> Dict[str, Any]:
    """``count`` pings to ``dst`` over the bootstrap channel: min, median, route, failures."""
    from .errors import RoutingError

    rtts: List[float] = []
    errors: List[str] = []
    route: List[str] = []
    for _ in range(count):
        try:
            result = node.ping(dst, timeout=PING_TIMEOUT_S)
        except (RoutingError, TimeoutError, GridsockError) as exc:
            errors.append(str(exc))
            continue
        rtts.append(result.rtt_s * 1000)
        route = list(result.route_there)
    return {"dst": dst, "sent": count, "received": len(rtts),
            "min_ms": round(min(rtts), 3) if rtts else None,
            "median_ms": round(statistics.median(rtts), 3) if rtts else None,
            "route": route, "error": errors[-1] if errors else None}


def _probe_socks(address: str) -> Dict[str, Any]:
    """Dial a SOCKS5 proxy and greet it; usable if it accepts "no authentication"."""
    from .bootstrap.transport import parse_address

    target = parse_address(address, default_port=1080)
    started = time.perf_counter()
    sock = None
    try:
        with gevent.Timeout(GATEWAY_TIMEOUT_S, TimeoutError(f"no answer within {GATEWAY_TIMEOUT_S:g} s")):
            sock = gsocket.create_connection((target.host, target.port), timeout=GATEWAY_TIMEOUT_S)
            sock.sendall(SOCKS5_GREETING)
            answer = sock.recv(2)
    except (OSError, TimeoutError) as exc:
        return {"usable": False, "ms": None, "detail": f"cannot dial it: {getattr(exc, 'strerror', None) or exc}"}
    finally:
        if sock is not None:
            sock.close()
    ms = round((time.perf_counter() - started) * 1000, 3)
    if answer == b"\x05\x00":
        return {"usable": True, "ms": ms, "detail": "a SOCKS5 proxy that needs no authentication answered"}
    return {"usable": False, "ms": ms, "detail": f"answered {answer!r}, not a SOCKS5 proxy that needs no authentication"}


def _probe_sshd(spec: str) -> Dict[str, Any]:
    """Dial an SSH gateway named in the rules and read its banner (no login)."""
    from .bootstrap.sshtunnel import SSHGateway

    gateway = SSHGateway.parse(spec)
    started = time.perf_counter()
    sock = None
    try:
        with gevent.Timeout(GATEWAY_TIMEOUT_S, TimeoutError(f"no banner within {GATEWAY_TIMEOUT_S:g} s")):
            sock = gsocket.create_connection((gateway.host, gateway.port), timeout=GATEWAY_TIMEOUT_S)
            banner = sock.recv(SSH_BANNER_BYTES)
    except (OSError, TimeoutError) as exc:
        return {"usable": False, "ms": None, "detail": f"cannot dial it: {getattr(exc, 'strerror', None) or exc}"}
    finally:
        if sock is not None:
            sock.close()
    ms = round((time.perf_counter() - started) * 1000, 3)
    line = banner.split(b"\r\n", 1)[0].split(b"\n", 1)[0].decode("ascii", "replace")
    if line.startswith("SSH-"):
        return {"usable": True, "ms": ms, "detail": f"sshd answered ({line}); login not tried"}
    return {"usable": False, "ms": ms, "detail": f"answered {line[:60]!r}, not an sshd"}


def _probe_uplink_gateway(node) -> Dict[str, Any]:
    """Open (and close) a channel through the uplink's SSH gateway to the rendez-vous node."""
    from .bootstrap.sshtunnel import open_ssh_tunnel

    gateway = node.ssh_gateway
    host, port = node.session.rendezvous_host, node.session.rendezvous_port
    started = time.perf_counter()
    try:
        sock = open_ssh_tunnel(gateway, host, port, timeout=GATEWAY_TIMEOUT_S)
    except (GridsockError, OSError) as exc:
        return {"usable": False, "ms": None, "detail": f"no channel to {host}:{port}: {exc}"}
    sock.close()
    ms = round((time.perf_counter() - started) * 1000, 3)
    return {"usable": True, "ms": ms, "detail": f"a channel to the rendez-vous node {host}:{port} opened"}


def _gateways_of_rules(rules) -> List[Dict[str, Any]]:
    """The SOCKS proxies and SSH gateways the rules name, once each, with where they come from."""
    from .stack import Stack

    found: Dict[tuple, Dict[str, Any]] = {}
    for kind, entries in (("rule", rules.rules), ("via", rules.vias)):
        for rule in entries:
            try:
                method = Stack.parse(rule.stack).method
            except ConfigError:
                continue
            if method.name == "socks" and method.get("proxy"):
                key = ("socks", str(method.get("proxy")))
            elif method.name == "ssh" and method.get("gateway"):
                key = ("ssh", str(method.get("gateway")))
            else:
                continue
            entry = found.setdefault(key, {"kind": key[0], "address": key[1], "source": "rules",
                                           "stacks": [], "rules": []})
            if rule.stack not in entry["stacks"]:
                entry["stacks"].append(rule.stack)
            entry["rules"].append(f"{kind} from {rule.src} to {rule.dst}")
    return list(found.values())


def _run_all(probes: Dict[str, Callable[[], Any]], timeout: float) -> Dict[str, Any]:
    """Run the probes at once; what each returned, or an ``{"error": ...}`` when it failed or
    was still running after ``timeout`` seconds (then it is cancelled)."""
    greenlets = {name: gevent.spawn(fn) for name, fn in probes.items()}
    gevent.joinall(list(greenlets.values()), timeout=timeout)
    results: Dict[str, Any] = {}
    for name, greenlet in greenlets.items():
        if not greenlet.ready():
            greenlet.kill(block=False)
            results[name] = {"error": f"cancelled: no result within {timeout:g} s"}
        elif greenlet.successful():
            results[name] = greenlet.value
        else:
            results[name] = {"error": f"failed: {greenlet.exception!r}"}
    return results


def _route_out(node) -> Optional[bool]:
    """True if this host has a route to the rendez-vous host (None: not an IP address)."""
    from .components.splice import routable

    host = node.session.rendezvous_host
    try:
        return routable(host)
    except (OSError, ValueError):
        return None


def _methods(node, me, inbound: Dict[str, Any], address: Dict[str, Any], route_out: Optional[bool],
             gateways: List[Dict[str, Any]], peers: list) -> List[Dict[str, Any]]:
    """What this node can offer and accept, method by method, and why (the facts above)."""
    from .components.splice import public_host

    methods = []

    def add(method: str, verdict: str, why: str) -> None:
        methods.append({"method": method, "verdict": verdict, "why": why})

    reachable = inbound["verdict"]
    add("tcp from outside", {True: "yes", False: "no", None: "unknown"}[reachable],
        {True: "reachable: peers dial its node port", False: "not reachable (dial-back failed)",
         None: "no dial-back verdict yet"}[reachable])
    if route_out is None:
        add("tcp to others", "unknown", "the rendez-vous host is not an IP address")
    elif route_out:
        add("tcp to others", "yes", "a route out (to the rendez-vous host): dials peers that are reachable")
    else:
        add("tcp to others", "no", "no route out of this network"
            + (" (the uplink uses an SSH gateway)" if node.ssh_gateway is not None else ""))
    add("reverse", {True: "yes", False: "no", None: "unknown"}[reachable],
        {True: "peers that cannot be reached can call it back", False: "peers cannot call it back (not reachable)",
         None: "no dial-back verdict yet"}[reachable])
    public = public_host(me, node.directory) if me is not None else None
    if public is None:
        add("splice", "no", "no public address known (nothing observed)")
    elif route_out is False:
        add("splice", "no", "no route out of this network")
    elif address["nat"] is False:
        add("splice", "possible", f"no NAT ({public}); a stateful firewall lets the crossing SYN in")
    elif address["nat_keeps_port"] is True:
        add("splice", "possible", f"NAT keeps ports (seen as {public})")
    elif address["nat_keeps_port"] is False:
        add("splice", "unlikely", f"the NAT changes source ports (seen as {public}): the peer dials the wrong port")
    else:
        add("splice", "possible", f"seen as {public}; whether the NAT keeps ports is not measured here")
    for gateway in gateways:
        if gateway["source"] != "rules":
            continue
        towards = sorted({p.name for p in peers for stack in gateway["stacks"]
                          if any(str(c) == stack for c in node.assembler.rules.candidates(me, p))}) if me else []
        usable = gateway.get("usable")
        verdict = "no" if not towards else ("yes" if usable else "no")
        why = (f"{gateway['kind']} {gateway['address']} "
               + ("answers" if usable else f"is not usable: {gateway.get('detail') or gateway.get('error')}")
               + (f"; the rules use it towards {', '.join(towards)}" if towards else "; the rules use it towards no peer now"))
        for stack in gateway["stacks"]:
            add(stack, verdict, why)
    add("relay", "yes" if node.joined else "no",
        "the bootstrap channel carries it, from anywhere" if node.joined else "not joined")
    return methods


def control_netcheck(node, args: Dict[str, Any]) -> Dict[str, Any]:
    """The control operation ``netcheck``: the report as a JSON object (docs/status.md).

    ``args``: ``pings`` (how many to each of the rendez-vous node and the leader, default
    :data:`PING_COUNT`). Returns within :data:`NETCHECK_TIMEOUT_S` (and a little).
    """
    from .bootstrap.directory import RENDEZVOUS_NAME

    try:
        count = int(args.get("pings", PING_COUNT))
    except (TypeError, ValueError):
        raise ConfigError(f"pings must be a number, not {args.get('pings')!r}") from None
    count = max(1, min(MAX_PING_COUNT, count))
    me = node.entry if node.entry is None else node.directory.get(node.entry.node_id) or node.entry
    leader = node.directory.get(me.leader) if me is not None and node.role == "member" else None
    peers = [e for e in node.directory if me is None or e.node_id != me.node_id]

    gateways: List[Dict[str, Any]] = []
    probes: Dict[str, Callable[[], Any]] = {"rendezvous": lambda: _pings(node, RENDEZVOUS_NAME, count),
                                            "route_out": lambda: _route_out(node)}
    if leader is not None:
        probes["leader"] = lambda: _pings(node, leader.name, count)
    if node.ssh_gateway is not None:
        gateways.append({"kind": "ssh", "address": str(node.ssh_gateway), "source": "uplink", "stacks": [], "rules": []})
        probes["gateway0"] = lambda: _probe_uplink_gateway(node)
    for gateway in _gateways_of_rules(node.assembler.rules):
        index = len(gateways)
        gateways.append(gateway)
        probe: Callable[[str], Dict[str, Any]] = _probe_socks if gateway["kind"] == "socks" else _probe_sshd
        probes[f"gateway{index}"] = functools.partial(probe, gateway["address"])
    started = time.monotonic()
    results = _run_all(probes, NETCHECK_TIMEOUT_S)
    for index, gateway in enumerate(gateways):
        outcome = results[f"gateway{index}"]
        gateway.update({"usable": False, "ms": None, "detail": outcome["error"]} if "error" in outcome and
                       "usable" not in outcome else outcome)
    route_out = results["route_out"] if not isinstance(results["route_out"], dict) else None
    inbound = _inbound_fact(me)
    address = _address_facts(node, me, leader)
    uplink_target = (node.leader_address if node.role == "member"
                     else f"{node.session.rendezvous_host}:{node.session.rendezvous_port}")
    return {
        "name": node.name,
        "node_id": node.node_id,
        "role": node.role,
        "cluster": node.cluster,
        "joined": node.joined,
        "at": time.time(),
        "took_ms": round((time.monotonic() - started) * 1000, 3),
        "inbound": inbound["verdict"],
        "inbound_detail": inbound["detail"],
        "addrs": list(me.addrs) if me is not None else [],
        "uplink": {"to": "rendezvous" if node.role == "leader" else "leader",
                   "target": str(uplink_target) if uplink_target is not None else None,
                   "via": str(node.ssh_gateway) if node.ssh_gateway is not None else None,
                   "up": node.uplink is not None and not node.uplink.closed},
        "address": address,
        "route_out": route_out,
        "gateways": gateways,
        "rtt": {"rendezvous": results["rendezvous"], "leader": results.get("leader")},
        "methods": _methods(node, me, inbound, address, route_out, gateways, peers),
        "candidates": {p.name: [str(s) for s in node.assembler.rules.candidates(me, p)] for p in peers} if me else {},
    }


# --- the command ------------------------------------------------------------------------------


def _ping_line(label: str, rtt: Optional[Dict[str, Any]]) -> str:
    if rtt is None:
        return f"    {label}: -"
    if "error" in rtt and "sent" not in rtt:
        return f"    {label}: {rtt['error']}"
    if not rtt["received"]:
        return f"    {label}: 0/{rtt['sent']} answered ({rtt['error']})"
    return (f"    {label}: {rtt['received']}/{rtt['sent']} answered, min {rtt['min_ms']:.1f} ms, "
            f"median {rtt['median_ms']:.1f} ms" + (f" via {' > '.join(rtt['route'])}" if rtt.get("route") else ""))


def format_netcheck(report: Dict[str, Any]) -> str:
    """The human form of a netcheck report."""
    yes_no = {True: "yes", False: "no", None: "unknown"}
    where = f"cluster {report['cluster']}" if report.get("cluster") else "no cluster"
    lines = [f"netcheck of {report['name']} ({report['role']}, {where}): "
             + ("joined" if report["joined"] else "NOT JOINED") + f", took {report['took_ms'] / 1000:.1f} s"]
    lines.append(f"  inbound:  {yes_no[report['inbound']]}: {report['inbound_detail']}")
    address = report["address"]
    nat = {True: "behind NAT", False: "no NAT", None: "NAT unknown"}[address["nat"]]
    lines.append(f"  address:  local {address['local'] or '-'}, observed {address['observed'] or '-'}"
                 + (" (the leader's)" if address["observed_of"] == "leader" else "") + f": {nat}"
                 + ({True: ", the NAT keeps the source port", False: ", the NAT changes the source port",
                     None: ""}[address["nat_keeps_port"]]))
    if address.get("detail"):
        lines.append(f"            {address['detail']}")
    uplink = report["uplink"]
    lines.append(f"  uplink:   to the {'rendez-vous node' if uplink['to'] == 'rendezvous' else 'leader'} "
                 f"{uplink['target'] or '-'}" + (f" via ssh {uplink['via']}" if uplink["via"] else "")
                 + (": up" if uplink["up"] else ": DOWN"))
    lines.append(f"  route out: {yes_no[report['route_out']]}")
    if report["gateways"]:
        lines.append("  gateways:")
        for g in report["gateways"]:
            state = "usable" if g.get("usable") else "NOT usable"
            took = f" in {g['ms']:.1f} ms" if g.get("ms") is not None else ""
            lines.append(f"    {g['kind']} {g['address']} ({'the uplink' if g['source'] == 'uplink' else 'rules'}): "
                         f"{state}{took}: {g.get('detail')}")
    else:
        lines.append("  gateways: none (no SSH gateway for the uplink, no SOCKS proxy or SSH gateway in the rules)")
    lines.append("  round trips over the bootstrap channel:")
    lines.append(_ping_line("rendez-vous node", report["rtt"]["rendezvous"]))
    if report["rtt"].get("leader") is not None:
        lines.append(_ping_line(f"leader {report['rtt']['leader'].get('dst', '')}".rstrip(), report["rtt"]["leader"]))
    elif report["role"] == "leader":
        lines.append("    leader: this node")
    lines.append("  methods:")
    width = max(len(m["method"]) for m in report["methods"]) + 1
    for m in report["methods"]:
        lines.append(f"    {(m['method'] + ':').ljust(width)} {m['verdict']} ({m['why']})")
    if report["candidates"]:
        lines.append("  candidates the rules give towards each peer, in race order:")
        for peer, stacks in sorted(report["candidates"].items()):
            lines.append(f"    {peer}: {', '.join(stacks)}")
    return "\n".join(lines)


def _cmd_netcheck(args) -> int:
    from .bootstrap.control import call

    report = call(_control_target(args), "netcheck", {"pings": args.pings}, timeout=NETCHECK_TIMEOUT_S + 10)
    if args.json:
        print(json.dumps(report, indent=2, sort_keys=True))
    else:
        print(format_netcheck(report))
    sys.stdout.flush()
    return 0


def add_commands(sub: Any) -> None:
    """Add ``gridsock netcheck`` to the ``gridsock`` parser."""
    p = sub.add_parser("netcheck", help="what a running node can do from where it is: reachable or not, NAT, "
                                        "gateways, round trips, which methods it can offer and accept")
    _add_target(p)
    p.add_argument("--pings", type=int, default=PING_COUNT, metavar="N",
                   help=f"pings to the rendez-vous node and to the leader (default {PING_COUNT})")
    p.add_argument("--json", action="store_true", help="the report as JSON (docs/status.md)")
    p.set_defaults(handler=_cmd_netcheck)
