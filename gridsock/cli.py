"""The ``gridsock`` command line.

``gridsock session new DIR --rendezvous HOST:PORT``  make a session (CA, token, session.toml)
``gridsock rendezvous --session FILE``               run the rendez-vous node
``gridsock node --session FILE --name N ...``        run a node (leader, or member with --leader)
``gridsock status``                                  what a running node knows: nodes, links
``gridsock top``                                     a live view of a running node (also ``status --watch``)
``gridsock netcheck``                                what a node can do from where it is: NAT, gateways, methods
``gridsock ping NODE``                               round trip over the bootstrap channel
``gridsock release NAME``                            free a name kept for a lost node (rendez-vous host)
``gridsock lab up|down|exec NODE CMD|status``        the network-namespace grid lab
``gridsock demo``                                    a rendez-vous node and a few nodes, here

Each option maps one to one onto a keyword argument of :class:`gridsock.node.Node` or
:class:`gridsock.bootstrap.rendezvous.RendezvousNode`.
"""
from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import re
import signal
import sys
from typing import List, Optional

from . import __version__

__all__ = ["main"]

log = logging.getLogger("gridsock.cli")


def _setup_logging(verbose: int, quiet: bool) -> None:
    level = logging.WARNING if quiet else (logging.DEBUG if verbose > 1 else logging.INFO if verbose else logging.WARNING)
    logging.basicConfig(level=level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gridsock", description="Sockets across NAT, firewalls and private clusters.")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv: debug)")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    parser.add_argument("--version", action="version", version=f"gridsock {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    session = sub.add_parser("session", help="make sessions")
    session_sub = session.add_subparsers(dest="session_command", metavar="ACTION")
    session_sub.required = True
    new = session_sub.add_parser("new", help="make a session: CA, rendez-vous certificate, join token, session.toml")
    new.add_argument("directory")
    new.add_argument("--rendezvous", required=True, action="append", metavar="HOST:PORT",
                     help="where nodes reach the rendez-vous node (repeat for several: a federation, docs/federation.md)")
    new.add_argument("--plain-tcp", action="store_true",
                     help="no TLS on the bootstrap channel (only for a private grid you trust)")
    new.add_argument("--cluster", action="append", default=[], metavar="NAME",
                     help="define cluster NAME (repeat for each): its nodes join with DIR/cluster-NAME.toml, and the "
                          "session attests its clusters (docs/security.md)")
    add = session_sub.add_parser("cluster", help="on the rendez-vous host: define a cluster of a session "
                                                 "(its join token, in DIR/cluster-NAME.toml for its nodes)")
    add.add_argument("directory", help="the session's directory (or its session.toml)")
    add.add_argument("name", help="the cluster's name")
    add.set_defaults(handler=_cmd_session_cluster)
    more = session_sub.add_parser("rendezvous", help="on the host with the CA key: add a rendez-vous node to a "
                                                      "session (its certificate; session.toml lists it)")
    more.add_argument("directory", help="the session's directory (or its session.toml)")
    more.add_argument("address", metavar="HOST:PORT", help="where nodes reach the new rendez-vous node")
    more.set_defaults(handler=_cmd_session_rendezvous)

    rv = sub.add_parser("rendezvous", help="run the rendez-vous node")
    rv.add_argument("--session", required=True, metavar="FILE")
    rv.add_argument("--listen", metavar="HOST:PORT", help="default: 0.0.0.0 and the session's port")
    rv.add_argument("--name", metavar="NAME",
                    help="which of the session's rendez-vous nodes this is: rendezvous, rendezvous-2, ... (default: the "
                         "one whose address --listen gives, else the first; docs/federation.md)")
    rv.add_argument("--control", metavar="PATH", help="control socket (default: $GRIDSOCK_RUN_DIR/rendezvous.sock)")
    rv.add_argument("--metrics", metavar="ADDR",
                    help="serve Prometheus metrics on http://ADDR/metrics (HOST:PORT, or PORT on 127.0.0.1; default: off)")
    rv.add_argument("--ssh-forward", action="append", default=[], metavar="USER@HOST[:PORT]=[BIND_HOST:]BIND_PORT",
                    help="log in to this SSH gateway (a cluster's front-end) and have it listen on BIND_HOST:BIND_PORT "
                         "for this rendez-vous node: the cluster's leader dials that address (the rendez-vous node "
                         "needs no inbound connection; repeat for each front-end; docs/ssh.md)")
    rv.add_argument("--ssh-key", metavar="FILE", help="private key for the --ssh-forward gateways (default: ~/.ssh/id_*)")
    rv.add_argument("--ssh-known-hosts", metavar="FILE",
                    help="known_hosts holding the gateways' host keys (default: ~/.ssh/known_hosts); never accepted blindly")

    node = sub.add_parser("node", help="run a node")
    _add_node_options(node, required=True)
    node.add_argument("--echo", type=int, metavar="PORT", help="serve an echo service on this grid port")
    node.add_argument("--metrics", metavar="ADDR",
                      help="serve Prometheus metrics on http://ADDR/metrics (HOST:PORT, or PORT on 127.0.0.1; default: off)")

    run = sub.add_parser("run", help="run a command on the grid: Python through the socket personality, any other "
                                     "program through proxychains-ng and the node's front door (a running node's, "
                                     "or a node of its own)",
                         description=RUN_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    run.add_argument("--node", metavar="NAME", help="use the node NAME running on this host")
    run.add_argument("--no-intercept", action="store_true",
                     help="neither proxychains-ng nor the proxy variables: only the socket personality (Python programs)")
    _add_node_options(run, required=False)
    run.add_argument("program", nargs=argparse.REMAINDER, help="-- command [args...]")
    _more_commands(sub)
    return parser


RUN_DESCRIPTION = """\
Run a command under the socket personality: its Python processes reach the nodes of the grid
by name (b2, b2.grid) with ordinary socket calls, and serve a grid port when they bind the
wildcard address. Use the node running on this host (--node NAME), or a node of its own
(--session FILE --name NAME ...).

Grid addresses: under the personality a node name resolves to an IPv4 address in 240.0.0.0/4,
the node's grid address (derived from its id, the same on every host). That range is reserved
and never routed: the addresses are on no interface, they name nodes, and connections to them
go through the grid. Servers log their clients by them (e.g. "242.132.145.52 - - ... GET /").
socket.gethostbyaddr(ADDRESS) in a program under gridsock run gives the node's name
(docs/personality.md, "Grid addresses").

Programs that are not Python (curl, ssh, ...) and the C extensions of Python programs go
through the node's front door: the command runs under proxychains-ng (Debian package
proxychains4), and http_proxy, https_proxy and ALL_PROXY name the front door. --no-intercept:
the personality only (docs/personality.md, "Which programs, by which mechanism").
"""


def _add_node_options(node, *, required: bool) -> None:
    node.add_argument("--session", required=required, metavar="FILE")
    node.add_argument("--name", required=required)
    node.add_argument("--cluster", help="cluster name (a node without one is its own leader)")
    node.add_argument("--leader", metavar="ADDR", help="member of the cluster whose leader's node port is ADDR (HOST:PORT or unix:PATH)")
    node.add_argument("--rendezvous", metavar="HOST:PORT",
                      help="a leader reaches the rendez-vous node here rather than at the session file's address "
                           "(the port an SSH remote forward opened on this cluster's front-end: docs/ssh.md); when the "
                           "session lists several rendez-vous nodes and this is one of them, the leader starts there and "
                           "fails over to the next ones of the list (docs/federation.md)")
    node.add_argument("--listen", metavar="ADDR", help="node port (HOST:PORT or unix:PATH; default 0.0.0.0 and any port)")
    node.add_argument("--advertise", metavar="HOST:PORT", help="address to publish for the node port")
    node.add_argument("--ssh-gateway", metavar="USER@HOST[:PORT]", help="reach the rendez-vous node through this SSH gateway")
    node.add_argument("--socks-gateway", metavar="HOST[:PORT]",
                      help="a SOCKS5 proxy out of this node's network: used without rules to reach outside "
                           "nodes, and to connect back to them")
    node.add_argument("--ssh-key", metavar="FILE", help="private key for SSH gateways (bootstrap and the ssh method)")
    node.add_argument("--ssh-known-hosts", metavar="FILE", help="known_hosts holding the gateways' host keys")
    node.add_argument("--control", metavar="PATH", help="control socket (default: $GRIDSOCK_RUN_DIR/NAME.sock)")
    node.add_argument("--rules", metavar="FILE", help="rules file (TOML): scheme, exceptions, server policy")
    node.add_argument("--front-door", metavar="HOST:PORT",
                      help="the SOCKS5 and HTTP proxy for programs that are not Python (default: "
                           "127.0.0.1, a port the kernel chooses; 'off': none)")
    node.add_argument("--state-dir", metavar="DIR",
                      help="where the node keeps its identity (id, key, grid address) across restarts; "
                           "gridsock node's default: $XDG_STATE_HOME/gridsock/SESSION/NAME ('off': a new "
                           "identity each time); gridsock run's: none")


# Commands that live in modules of their own: each module's ``add_commands(sub)`` adds its
# parsers, each with ``set_defaults(handler=FUNCTION)`` (FUNCTION(args) -> exit status).
COMMAND_MODULES = ("top", "netcheck", "forward")


def _more_commands(sub) -> None:
    status = sub.add_parser("status", help="what a running node (or the rendez-vous node) knows")
    _add_target(status)
    status.add_argument("--json", action="store_true")
    status.add_argument("--watch", nargs="?", type=float, const=2.0, metavar="SECONDS",
                        help="a live view, refreshed every SECONDS (default 2), until Ctrl-C (as gridsock top)")
    status.add_argument("--graph", metavar="FILE",
                        help="draw the grid as this node sees it (clusters, leaders, paths by method) "
                             "to FILE (.svg, .png or .dot)")

    release = sub.add_parser("release", help="on the rendez-vous host: free a node name (or a cluster) that "
                                             "the rendez-vous node keeps for a node that was lost")
    release.add_argument("name", metavar="NAME")
    release.add_argument("--cluster", action="store_true", help="NAME is a cluster, not a node name")
    release.add_argument("--control", metavar="PATH", help="the rendez-vous node's control socket "
                                                          "(default: $GRIDSOCK_RUN_DIR/rendezvous.sock)")

    ping = sub.add_parser("ping", help="round trip to NODE over the bootstrap channel")
    ping.add_argument("dst", metavar="NODE", help="node name or id")
    _add_target(ping)
    ping.add_argument("-c", "--count", type=int, default=1)
    ping.add_argument("--timeout", type=float, default=10.0)
    ping.add_argument("--json", action="store_true")

    echo = sub.add_parser("echo", help="serve an echo service on a grid port of a running node")
    echo.add_argument("port", type=int)
    _add_target(echo)

    tr = sub.add_parser("transfer", help="send random bytes to an echo service and check them (a data connection)")
    tr.add_argument("dst", metavar="NODE:PORT", help="where an echo service runs (gridsock echo)")
    _add_target(tr)
    tr.add_argument("--stack", help="stack string (default: what the rules choose)")
    tr.add_argument("--bytes", default="1M", help="how much to send each way (suffixes K, M, G)")
    tr.add_argument("--timeout", type=float, default=600.0)
    tr.add_argument("--json", action="store_true")
    tr.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                    help="show progress on stderr (default: when stderr is a terminal)")

    # main() hands everything after ``lab`` to gridsock.testing.lab.main untouched (its own
    # options, --help included, in any order); this entry only lists the command.
    for name in COMMAND_MODULES:
        importlib.import_module(f"gridsock.{name}").add_commands(sub)

    lab = sub.add_parser("lab", help="the network-namespace grid lab (root): gridsock lab --help", add_help=False)
    lab.add_argument("lab_args", nargs=argparse.REMAINDER)

    demo = sub.add_parser("demo", help="run a rendez-vous node and a few nodes on this machine")
    demo.add_argument("--keep", action="store_true", help="leave the processes running until Ctrl-C")


def _add_target(parser) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--node", "--from", dest="node", metavar="NAME", help="ask the node NAME running on this host")
    group.add_argument("--control", metavar="PATH", help="control socket of the process to ask")


def _control_target(args) -> str:
    from .bootstrap.control import control_path, list_control_sockets, run_dir
    from .errors import ConfigError

    if args.control:
        return args.control
    if args.node:
        return control_path(args.node)
    sockets = list_control_sockets()
    nodes = [s for s in sockets if not re.search(r"/rendezvous(-[0-9]+)?\.sock\Z", s)]
    if len(nodes) == 1:
        return nodes[0]
    if not nodes and sockets:
        return sockets[0]
    if not sockets:
        raise ConfigError(f"no gridsock process runs here (no control socket in {run_dir()})")
    names = ", ".join(os.path.basename(s)[:-5] for s in sockets)
    raise ConfigError(f"several gridsock processes run here ({names}): choose one with --node NAME")


def _run_until_signalled(server, *also) -> int:
    """Serve until SIGTERM or SIGINT, which stop ``also`` (helpers of the server), then it."""
    import gevent

    def stop(*_):
        for helper in also:
            helper.stop()
        server.stop()

    gevent.signal_handler(signal.SIGTERM, stop)
    gevent.signal_handler(signal.SIGINT, stop)
    server.serve_forever()
    return 0


def _cmd_session_new(args) -> int:
    from .session import create_session

    rendezvous = args.rendezvous[0] if len(args.rendezvous) == 1 else args.rendezvous
    session = create_session(args.directory, rendezvous, bootstrap="tcp" if args.plain_tcp else "tls/tcp",
                             clusters=args.cluster)
    print(f"session {session.session_id} written to {session.path}")
    if args.cluster:
        print(f"  hand {session.path} to nodes without a cluster; keep the *-key.pem files and clusters.toml on the"
              " rendez-vous host only")
        for name in args.cluster:
            _print_cluster(session.for_cluster(name))
    else:
        print(f"  hand {session.path} to every node; keep the *-key.pem files on the rendez-vous host only")
    return 0


def _cmd_session_cluster(args) -> int:
    from .session import add_cluster

    _print_cluster(add_cluster(args.directory, args.name))
    return 0


def _cmd_session_rendezvous(args) -> int:
    from .session import add_rendezvous, rendezvous_name

    session, index = add_rendezvous(args.directory, args.address)
    print(f"rendez-vous node {rendezvous_name(index)} at {args.address} added to session {session.session_id}:"
          f" hand {session.path} (and the cluster-*.toml files) to every node again; run it with"
          f" gridsock rendezvous --session {session.path} --name {rendezvous_name(index)} on a host that holds"
          " the session's *-key.pem files and clusters.toml")
    return 0


def _print_cluster(cluster) -> None:
    print(f"cluster {cluster.cluster}: its join token is in {cluster.path}; hand that file to the nodes of cluster"
          f" {cluster.cluster} only (gridsock node --session {cluster.path} --cluster {cluster.cluster} ...)")


def _cmd_rendezvous(args) -> int:
    import gevent

    from .bootstrap.rendezvous import RendezvousNode
    from .bootstrap.sshforward import RemoteForward, SSHForwarder
    from .session import Session

    forwards = [RemoteForward.parse(spec, key_filename=args.ssh_key, known_hosts=args.ssh_known_hosts)
                for spec in args.ssh_forward]  # (a bad one fails here, before anything runs)
    node = RendezvousNode(Session.load(args.session), listen_address=args.listen, control=args.control,
                          metrics=args.metrics, name=args.name).start()
    if len(node.session.rendezvous_addresses) > 1:
        print(f"{node.name}: one of the session's {len(node.session.rendezvous_addresses)} rendez-vous nodes", flush=True)
    print(f"rendezvous listening {node.address}", flush=True)
    if node.metrics_address is not None:
        print(f"metrics on http://{node.metrics_address}/metrics", flush=True)
    if not forwards:
        return _run_until_signalled(node)
    forwarder = SSHForwarder(forwards, node.handle_connection).start()
    gevent.spawn(_announce_forwards, forwarder)
    return _run_until_signalled(node, forwarder)


def _announce_forwards(forwarder) -> None:
    """Print ``ssh forwards up GATEWAY=BIND_HOST:PORT ...`` once every forward is granted (the
    forwarder keeps trying meanwhile, and logs why each attempt failed)."""
    import gevent

    while not gevent.get_hub().threadpool.apply(forwarder.wait_up, (60.0,)):
        pass
    print("ssh forwards up " + " ".join(f"{f.gateway}={f.bind_host}:{port}" for f, port in forwarder.ports().items()),
          flush=True)


def _make_node(args):
    from .node import Node
    from .rules import Rules
    from .session import Session

    gateway = None
    if args.ssh_gateway:
        from .bootstrap.sshtunnel import SSHGateway

        gateway = SSHGateway.parse(args.ssh_gateway, key_filename=args.ssh_key, known_hosts=args.ssh_known_hosts)
    session = Session.load(args.session)
    if getattr(args, "rendezvous", None):
        import dataclasses

        from .session import parse_hostport

        host, port = parse_hostport(args.rendezvous)  # (ConfigError: a clear message, exit 2)
        session = dataclasses.replace(session, rendezvous_host=host, rendezvous_port=port)
    rules = Rules.load(args.rules, tls=session.tls) if args.rules else None
    state_dir = args.state_dir
    if state_dir is None and args.command == "node":
        from .session import default_state_dir

        state_dir = default_state_dir(session.session_id, args.name)
    return Node(session, args.name, cluster=args.cluster, leader=args.leader,
                state_dir=None if state_dir == "off" else state_dir, listen_address=args.listen, advertise=args.advertise, ssh_gateway=gateway,
                control=args.control, rules=rules, ssh_key=args.ssh_key,
                ssh_known_hosts=args.ssh_known_hosts, metrics=getattr(args, "metrics", None),
                socks_gateway=args.socks_gateway, loop="caller", **_front_door_option(args)).start()


def _front_door_option(args) -> dict:
    """``--front-door``: an address, ``off``, or (not given) the node's default."""
    if args.front_door is None:
        return {}
    return {"front_door": None if args.front_door == "off" else args.front_door}


def _cmd_node(args) -> int:
    import gevent

    node = _make_node(args)
    if args.echo:
        from .diag import serve_echo

        serve_echo(node, args.echo)
    print(f"node {node.name} listening {node.address}", flush=True)
    if node.metrics_address is not None:
        print(f"metrics on http://{node.metrics_address}/metrics", flush=True)

    def announce():
        if node.wait_joined():
            print(f"joined {node.name} {node.node_id} {node.role}", flush=True)

    gevent.spawn(announce)
    return _run_until_signalled(node)


def _cmd_release(args) -> int:
    from .bootstrap.control import call, control_path

    kind = "cluster" if args.cluster else "name"
    result = call(args.control or control_path("rendezvous"), "release", {kind: args.name})
    print(f"released {'cluster' if args.cluster else 'node name'} {result['released']} (kept for node {result['node_id']})")
    return 0


def _cmd_run(args) -> int:
    from .launch import run_command

    return run_command(args)


def _cmd_status(args) -> int:
    from .bootstrap.control import call

    if args.watch is not None:
        from .top import watch

        return watch(args)
    if args.graph is not None:
        from .topology import draw_command

        return draw_command(args)
    status = call(_control_target(args), "status")
    if args.json:
        print(json.dumps(status, indent=2, sort_keys=True))
        return 0
    print(format_status(status))
    return 0


def format_status(status: dict) -> str:
    """The human form of a status reply."""
    lines = []
    if status["role"] == "rendezvous":
        lines.append(f"rendez-vous node of session {status['session']} on {status['address']} ({status['bootstrap']})")
    else:
        state = "joined" if status.get("joined") else "NOT JOINED"
        where = f"cluster {status['cluster']}" if status.get("cluster") else "no cluster"
        lines.append(f"node {status['name']} ({status['role']}, {where}) id {status['node_id']}: {state}, "
                     f"node port {status['address']}, bootstrap {status['bootstrap']}")
    directory = status["directory"]
    names = {e["node_id"]: e["name"] for e in directory}
    lines.append(f"{len(directory)} node(s) in the directory, {len({e['leader'] for e in directory})} leader(s):")
    routes = status.get("routes", {})
    rows = [("NAME", "CLUSTER", "ROLE", "LEADER", "OBSERVED", "INBOUND", "ADDRS", "ID", "HOPS", "ROUTE")]
    for e in directory:
        inbound = {True: "yes", False: "no", None: "?"}[e["inbound"]]
        route = routes.get(e["node_id"])
        rows.append((e["name"], e["cluster"] or "-", e["role"], names.get(e["leader"], e["leader"][:8]),
                     e["observed"] or "-", inbound, ",".join(e["addrs"]) or "-", e["node_id"][:8],
                     str(len(route) - 1) if route else "-", " > ".join(route) if route else "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines += ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.append("bootstrap links:")
    for link in status["links"]:
        lines.append(f"  {link['kind']:7} {link.get('peer', '')} {link['label']}")
    if status.get("meta_links"):
        lines.append("meta links:")
        for link in status["meta_links"]:
            lines.append(f"  {link['peer']:12} {link['stack']:10} {link['label']}")
    if "connections" in status:
        ports = ", ".join(map(str, status.get("listening", [])))
        lines.append(f"data connections: {len(status['connections']) or 'none'}; "
                     + (f"listening on grid port(s) {ports}" if ports else "not listening on any grid port")
                     + (":" if status["connections"] else ""))
        lines += _format_connections(status["connections"])
    if "paths" in status:
        lines += _format_paths(status["paths"])
    return "\n".join(lines)


def _table(rows: List[tuple]) -> List[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]


def _format_bytes(count: Optional[int]) -> str:
    if count is None:
        return "-"  # not known here (a kernel socket handed to a program, and no sock_diag)
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if count >= size:
            return f"{count / size:.1f} {unit}"
    return f"{count} B"


def _format_age(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _format_connections(connections: List[dict]) -> List[str]:
    """The live data connections: one row each, then what was tried before the winner."""
    if not connections:
        return []
    rows = [("CONN", "SIDE", "PEER:PORT", "STACK", "SENT", "RECEIVED", "RTT", "AGE", "PROGRAM")]
    tried: dict = {}
    for c in connections:
        rows.append((f"#{c['conn']}", c["side"], f"{c['peer']}:{c['port']}", c["stack"],
                     _format_bytes(c.get("bytes_sent")), _format_bytes(c.get("bytes_received")),
                     f"{c['rtt_ms']:.1f} ms" if c.get("rtt_ms") is not None else "-", _format_age(c.get("age_s", 0.0)),
                     _program_of(c)))
        tried[c["conn"]] = c.get("tried", [])
    table = _table(rows)
    lines = table[:1]
    for row, c in zip(table[1:], connections):
        lines.append(row)
        for stack, why in tried[c["conn"]]:  # what was tried before the winner, and why it failed
            lines.append(f"      {stack} failed: {why}")
    return lines


def _program_of(connection: dict) -> str:
    """Who holds a connection: a program under gridsock run, a front-door client, a forward
    or expose of the node, or the node itself."""
    if connection.get("handed"):
        return f"pid {connection['pid']}" if connection.get("pid") else "a program"
    if connection.get("front_door"):
        return f"pid {connection['pid']} (front door)" if connection.get("pid") else "front door"
    if connection.get("via"):
        return f"{connection['via']} {connection.get('local', '')}".rstrip()
    return "this node"


def _format_paths(paths: List[dict]) -> List[str]:
    """How this node reaches each peer it connected to: the path in use or cached, and why
    each other candidate is not used."""
    import time

    if not paths:
        return ["paths: none yet (no connection made from this node)"]
    lines = ["paths (how this node last reached each peer):"]
    rows = [("PEER", "PATH", "METHOD", "STACK", "CONNECT", "CACHED UNTIL")]
    now = time.time()
    for p in sorted(paths, key=lambda p: p["peer"]):
        path = "failed" if p["stack"] is None else ("direct" if p["direct"] else "relayed")
        cached = p.get("cached")
        until = "-"
        if cached:
            until = (time.strftime("%H:%M:%S", time.localtime(cached["until"]))
                     + f" (in {_format_age(max(0.0, cached['until'] - now))})")
            if cached["stack"] != p["stack"]:
                until += f": {cached['stack']}"
        rows.append((p["peer"], path + (" (stack named)" if p.get("chosen") == "caller" else ""),
                     p["method"] or "-", p["stack"] or "-",
                     f"{p['connect_ms']:.1f} ms" if p.get("connect_ms") is not None else "-", until))
    table = _table(rows)
    lines.append(table[0])
    for row, p in zip(table[1:], sorted(paths, key=lambda p: p["peer"])):
        lines.append(row)
        if p.get("via"):
            lines.append(f"      via {p['via']}")
        if p.get("ranking"):
            lines.append("      ranking: " + ", ".join(f"{r['stack']} ({r['tier']})" for r in p["ranking"]))
        for reason in p["reasons"]:  # why each other candidate is not the path
            lines.append(f"      not {reason['stack']}: {reason['reason']}")
    return lines


def _cmd_ping(args) -> int:
    from .bootstrap.control import call
    from .errors import GridsockError

    target = _control_target(args)
    failures = 0
    for i in range(max(1, args.count)):
        try:
            result = call(target, "ping", {"dst": args.dst, "timeout": args.timeout}, timeout=args.timeout + 5)
        except (GridsockError, TimeoutError) as exc:
            print(f"ping {args.dst}: {exc}", file=sys.stderr)
            failures += 1
            continue
        if args.json:
            print(json.dumps(result, sort_keys=True))
        else:
            print(f"{args.dst}: {result['rtt_ms']:.3f} ms, {result['hops']} hop(s): "
                  f"{' > '.join(result['route_there'])}; back: {' > '.join(result['route_back'])}")
    return 1 if failures else 0


def _parse_size(text: str) -> int:
    from .errors import ConfigError

    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    number, unit = text[:-1], text[-1:].upper()
    if unit not in units or unit == "":
        number, unit = text, ""
    try:
        return int(float(number) * units[unit])
    except ValueError:
        raise ConfigError(f"bad size {text!r}: a number with an optional K, M or G") from None


def _cmd_echo(args) -> int:
    from .bootstrap.control import call

    call(_control_target(args), "echo", {"port": args.port})
    print(f"echo service on grid port {args.port}")
    return 0


class Interrupted(Exception):
    """Ctrl-C (SIGINT) during a command that stops cleanly on it."""


def _cmd_transfer(args) -> int:
    """Run a transfer in the node; Ctrl-C closes the control connection, which cancels it there."""
    import gevent

    from .bootstrap.control import call
    from .errors import ConfigError

    node, _, port = args.dst.rpartition(":")
    if not node or not port.isdigit():
        raise ConfigError(f"bad destination {args.dst!r}: NODE:PORT")
    nbytes = _parse_size(args.bytes)
    show = sys.stderr.isatty() if args.progress is None else args.progress
    bar = None
    if show:
        from tqdm import tqdm

        bar = tqdm(total=nbytes, file=sys.stderr, unit="B", unit_scale=True, unit_divisor=1024,
                   desc=f"{args.dst} echoed", dynamic_ncols=True)

    def progress(fields: dict) -> None:
        if bar is not None:
            bar.update(max(0, int(fields.get("received", 0)) - bar.n))

    main_greenlet = gevent.getcurrent()
    # The signal arrives in the hub; raise it where the call waits, so its socket is closed.
    handler = gevent.signal_handler(signal.SIGINT, lambda: main_greenlet.throw(Interrupted()))
    try:
        result = call(_control_target(args), "transfer",
                      {"dst": node, "port": int(port), "bytes": nbytes, "stack": args.stack,
                       "timeout": min(args.timeout, 60.0)}, timeout=args.timeout,
                      progress=progress if show else None)
    except Interrupted:
        if bar is not None:
            bar.close()
        print(f"gridsock transfer: interrupted; the transfer to {args.dst} is cancelled", file=sys.stderr)
        return 128 + signal.SIGINT
    finally:
        handler.cancel()
    if bar is not None:
        # The last progress message may be one the node's rate limit held back: the result
        # says how much came back (all of it, or the call raised).
        bar.update(max(0, int(result["bytes"]) - bar.n))
        bar.close()
    if args.json:
        print(json.dumps(result, sort_keys=True))
    else:
        ok = "ok" if result["sha256_sent"] == result["sha256_received"] else "MISMATCH"
        print(f"{result['bytes']} bytes each way to {args.dst} over {result['stack']}: {ok}, "
              f"connect {result['connect_ms']:.1f} ms, {result['mb_per_s']} MB/s each way")
    return 0 if result["sha256_sent"] == result["sha256_received"] else 1


# The exit status after stdout was closed under us (``gridsock status | head``): what a shell
# reports for a command killed by SIGPIPE (128 + 13).
EXIT_BROKEN_PIPE = 128 + signal.SIGPIPE


def main(argv: Optional[List[str]] = None) -> int:
    """Run the ``gridsock`` command line; return the exit status.

    A reader that goes away (stdout a closed pipe) ends any command quietly with
    :data:`EXIT_BROKEN_PIPE`, as CPython's documentation of SIGPIPE recommends: stdout is pointed
    at /dev/null so that the interpreter's last flush does not complain again.
    """
    try:
        try:
            return _main(argv)
        finally:  # (--help and --version exit here too)
            sys.stdout.flush()  # a broken pipe shows here, while we can still handle it
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return EXIT_BROKEN_PIPE


# Options of ``gridsock`` itself that may stand before the command (see _parser).
_GLOBAL_FLAGS = re.compile(r"-v+|--verbose|-q|--quiet")


def _main(argv: Optional[List[str]]) -> int:
    from .errors import GridsockError

    argv = list(sys.argv[1:] if argv is None else argv)
    # ``gridsock [-v] [-q] lab ...``: the lab's own parser reads the rest as is, options first
    # included (``lab --prefix X up``, ``lab --help``): argparse's REMAINDER would not take them.
    command_at = next((i for i, arg in enumerate(argv) if not _GLOBAL_FLAGS.fullmatch(arg)), len(argv))
    if argv[command_at:command_at + 1] == ["lab"]:
        args = _parser().parse_args(argv[:command_at + 1])
        from .testing import lab

        return lab.main((["-v"] if args.verbose else []) + argv[command_at + 1:])
    args = _parser().parse_args(argv)
    _setup_logging(args.verbose, args.quiet)
    if args.command in ("node", "rendezvous"):  # (long-lived processes that move relayed bulk data)
        from .memory import tune_allocator

        tune_allocator()
    if args.command == "demo":
        from .demo import run_demo

        return run_demo(keep=args.keep)
    handlers = {
        "rendezvous": _cmd_rendezvous,
        "node": _cmd_node,
        "run": _cmd_run,
        "status": _cmd_status,
        "ping": _cmd_ping,
        "session": _cmd_session_new,
        "echo": _cmd_echo,
        "transfer": _cmd_transfer,
        "release": _cmd_release,
    }
    try:
        handler = getattr(args, "handler", None) or handlers[args.command]
        return handler(args)
    except GridsockError as exc:
        print(f"gridsock {args.command}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
