"""A picture of a running grid: clusters, leaders, the rendez-vous node, and the paths between nodes.

``gridsock status --graph FILE`` asks one node (through its control socket) for the grid's
*topology*, turns it into Graphviz's DOT language and has Graphviz's ``dot`` program draw it
(``.svg`` or ``.png`` by FILE's suffix; ``.dot`` writes the DOT source and needs no Graphviz).

Theory of operation
-------------------
:func:`control_topology` runs in the asked node as its control operation ``topology``. It takes
the node's directory (every node, its cluster, its leader and role; the rendez-vous node from
the session) and asks *every* node in it, at once, how it reaches its peers: a routed request on
:data:`~gridsock.node.PATHS_TOPIC`, which each node answers with the JSON
``{"name", "cluster", "role", "paths", "meta_links"}`` (``paths`` as in ``gridsock status
--json``). The asked node answers for itself from its own status. At most
:data:`MAX_CONCURRENT_REQUESTS` requests are in flight, and all of them share one deadline
(``timeout``, :data:`PATHS_TIMEOUT_S` by default): a node that has not answered by then, or whose
answer is not what the topic promises, is still drawn, marked, with the reason. If the control
client goes away, the operation is killed and its requests with it.

The result (:func:`control_topology`'s docstring gives its keys) is plain JSON, so
:func:`to_dot` is a pure function of it, and :func:`render` only writes a file or runs ``dot``.

What the picture shows (docs/topology.md has an example):

- a box per cluster (a DOT subgraph ``cluster_NAME``), its nodes inside, nodes without a
  cluster outside; leaders have a bold double border; the rendez-vous node is an octagon on top;
- the bootstrap tree (member - leader - rendez-vous node) in thin grey lines;
- one arrow per path a node last used to reach a peer (client to server), coloured by method
  (:data:`METHOD_COLOURS`, a legend in the corner), dashed when relayed, dotted red when every
  candidate failed, labelled with the stack and the time the connection took.
"""
from __future__ import annotations

import html
import json
import logging
import os
import shutil
import subprocess
import tempfile
import time
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple

import gevent
import gevent.pool

from .errors import ConfigError, GridsockError

__all__ = [
    "control_topology",
    "draw_command",
    "to_dot",
    "render",
    "PATHS_TIMEOUT_S",
    "MAX_CONCURRENT_REQUESTS",
    "METHOD_COLOURS",
    "FORMATS",
    "DOT_PROGRAM",
    "DOT_PACKAGE",
]

log = logging.getLogger(__name__)

# Every node answers within this (one deadline for all the requests); later answers are not waited for.
PATHS_TIMEOUT_S = 5.0
# Requests in flight at once: a grid of thousands of nodes is asked in waves, not all in one burst.
MAX_CONCURRENT_REQUESTS = 64
# ``dot`` lays out a few hundred nodes in seconds; past this something is wrong.
DOT_TIMEOUT_S = 120.0
# The control call waits for the node's own deadline plus this (routing, JSON, the socket).
CONTROL_MARGIN_S = 10.0

# Graphviz's layout program, and the Debian package that has it.
DOT_PROGRAM = "dot"
DOT_PACKAGE = "graphviz"
# FILE's suffix -> dot's output format (None: the DOT source itself, no Graphviz needed).
FORMATS: Mapping[str, Optional[str]] = {".svg": "svg", ".png": "png", ".dot": None}

# Methods by colour (Okabe and Ito's palette, told apart with colour-blindness too).
METHOD_COLOURS: Mapping[str, str] = {
    "tcp": "#0072B2",      # blue
    "reverse": "#E69F00",  # orange
    "splice": "#009E73",   # green
    "socks": "#CC79A7",    # pink
    "ssh": "#D55E00",      # vermilion
    "relay": "#56B4E9",    # sky blue, and dashed
}
# Methods of third parties (entry points): these colours in turn, by name.
OTHER_COLOURS = ("#882255", "#117733", "#999933", "#332288", "#AA4499")
FAILED_COLOUR = "#CC0000"
TREE_COLOUR = "#A0A0A0"
RENDEZVOUS_NAME = "rendezvous"  # (gridsock.bootstrap.directory.RENDEZVOUS_NAME, without importing gevent code)


# --- in the node: gather -------------------------------------------------------------------------


def control_topology(node: Any, args: Mapping[str, Any]) -> dict:
    """The control operation ``topology``: what :func:`to_dot` draws, gathered from the grid.

    ``args``: ``timeout`` (seconds for every node to answer, :data:`PATHS_TIMEOUT_S` by default).
    Returns ``{"asked", "session", "at", "timeout_s", "rendezvous": {"name", "address"}, "nodes":
    [...]}``; each node: ``name``, ``node_id``, ``cluster`` (or None), ``role`` (``leader`` or
    ``member``), ``leader`` (its leader's name; its own for a leader), ``addrs``, ``inbound``,
    ``answered`` (bool), ``error`` (why not, or None), ``paths`` (as ``gridsock status --json``
    gives them; empty without an answer) and ``meta_links``. Raises ConfigError for a bad timeout.
    """
    try:
        timeout = float(args.get("timeout", PATHS_TIMEOUT_S))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"topology: bad timeout {args.get('timeout')!r}") from exc
    if not 0 < timeout <= 3600:
        raise ConfigError(f"topology: the timeout must be in (0, 3600] seconds, not {timeout}")
    from .node import PATHS_TOPIC

    status = node.status()
    directory = [e for e in status["directory"] if isinstance(e, dict)]
    names = {e["node_id"]: e["name"] for e in directory}
    answers: Dict[str, Tuple[Optional[dict], Optional[str]]] = {
        status["node_id"]: ({"paths": status.get("paths", []), "meta_links": status.get("meta_links", [])}, None)}
    deadline = time.monotonic() + timeout

    def ask(entry: dict) -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            answers[entry["node_id"]] = (None, f"not asked: no time left of {timeout:g} s")
            return
        try:
            reply = node.request(entry["node_id"], PATHS_TOPIC, timeout=remaining)
            answers[entry["node_id"]] = (_check_answer(reply.payload), None)
        except (GridsockError, TimeoutError, OSError, ValueError) as exc:
            answers[entry["node_id"]] = (None, str(exc) or type(exc).__name__)

    pool = gevent.pool.Pool(MAX_CONCURRENT_REQUESTS)
    try:
        for entry in directory:
            if entry["node_id"] not in answers:
                pool.spawn(ask, entry)
        pool.join(timeout=timeout + 1.0)
    finally:
        pool.kill()  # (stragglers, or all of them if the control client went away)

    nodes = []
    for entry in directory:
        answer, error = answers.get(entry["node_id"], (None, f"no answer within {timeout:g} s"))
        nodes.append({
            "name": entry["name"],
            "node_id": entry["node_id"],
            "cluster": entry.get("cluster"),
            "role": entry.get("role", "leader"),
            "leader": names.get(entry.get("leader", ""), entry.get("leader")),
            "addrs": list(entry.get("addrs") or []),
            "inbound": entry.get("inbound"),
            "answered": answer is not None,
            "error": error,
            "paths": answer["paths"] if answer is not None else [],
            "meta_links": answer["meta_links"] if answer is not None else [],
        })
    session = node.session
    return {
        "asked": status["name"],
        "session": status.get("session"),
        "at": time.time(),
        "timeout_s": timeout,
        "rendezvous": {"name": RENDEZVOUS_NAME, "address": session.rendezvous},
        "nodes": nodes,
    }


def _check_answer(payload: bytes) -> dict:
    """A node's answer on PATHS_TOPIC: ``{"paths", "meta_links"}`` keeping only well-formed items.

    Raises ValueError when it is not a JSON object with a ``paths`` list.
    """
    obj = json.loads(payload)
    if not isinstance(obj, dict) or not isinstance(obj.get("paths"), list):
        raise ValueError("the answer is not an object with a list of paths")
    paths = [p for p in obj["paths"] if isinstance(p, dict) and isinstance(p.get("peer"), str)]
    links = obj.get("meta_links")
    return {"paths": paths, "meta_links": [m for m in links if isinstance(m, dict)] if isinstance(links, list) else []}


# --- in the command: draw ------------------------------------------------------------------------


def draw_command(args: Any) -> int:
    """``gridsock status --graph FILE``: ask the node for the topology and draw it to FILE.

    Returns 0. Raises ConfigError for a suffix other than :data:`FORMATS`' (before asking
    anything), GridsockError when the node cannot be asked or ``dot`` is missing or fails.
    """
    from .bootstrap.control import call
    from .cli import _control_target

    path = str(args.graph)
    _format_of(path)
    target = _control_target(args)
    if os.path.basename(target) == f"{RENDEZVOUS_NAME}.sock":
        raise ConfigError("the rendez-vous process does not serve the topology: ask a node (--node NAME)")
    timeout = PATHS_TIMEOUT_S
    try:
        topology = call(target, "topology", {"timeout": timeout}, timeout=timeout + CONTROL_MARGIN_S)
    except TimeoutError as exc:
        raise GridsockError(f"the node did not answer: {exc}") from exc
    render(to_dot(topology), path)
    nodes = topology["nodes"]
    silent = [n["name"] for n in nodes if not n["answered"]]
    paths = sum(len(n["paths"]) for n in nodes)
    print(f"{path}: {len(nodes)} node(s), {paths} path(s)"
          + (f"; no answer from {', '.join(silent)}" if silent else ""))
    return 0


def _format_of(path: str) -> Optional[str]:
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in FORMATS:
        raise ConfigError(f"cannot draw to {path!r}: the file name must end in {', '.join(FORMATS)}")
    return FORMATS[suffix]


def render(dot_text: str, path: str) -> None:
    """Write ``dot_text`` to ``path``: as is for ``.dot``, else drawn by Graphviz's ``dot``.

    The file appears whole or not at all (written beside it, then renamed). Raises ConfigError
    for an unknown suffix, GridsockError when ``dot`` is missing (naming the Debian package) or
    fails, OSError when the file cannot be written.
    """
    fmt = _format_of(path)
    directory = os.path.dirname(os.path.abspath(path))
    if fmt is None:
        data = dot_text.encode()
    else:
        program = shutil.which(DOT_PROGRAM)
        if program is None:
            raise GridsockError(f"drawing {path} needs Graphviz's {DOT_PROGRAM!r} program, which is not on "
                                f"PATH: install the Debian package {DOT_PACKAGE!r} (apt-get install {DOT_PACKAGE}), "
                                f"or write the DOT source with a .dot file name")
        try:
            done = subprocess.run([program, f"-T{fmt}"], input=dot_text.encode(), capture_output=True,
                                  timeout=DOT_TIMEOUT_S)
        except subprocess.TimeoutExpired as exc:
            raise GridsockError(f"{DOT_PROGRAM} did not finish within {DOT_TIMEOUT_S:g} s") from exc
        if done.returncode != 0:
            why = done.stderr.decode(errors="replace").strip() or f"exit status {done.returncode}"
            raise GridsockError(f"{DOT_PROGRAM} -T{fmt} failed: {why}")
        data = done.stdout
    fd, tmp = tempfile.mkstemp(prefix=".gridsock-graph-", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


# --- DOT -----------------------------------------------------------------------------------------


def _q(text: object) -> str:
    """A DOT quoted string (IDs and labels): backslashes and double quotes escaped, newlines as ``\\n``."""
    s = str(text).replace("\\", "\\\\").replace('"', '\\"')
    return '"' + s.replace("\r", "").replace("\n", "\\n") + '"'


def _attrs(**attrs: object) -> str:
    return "[" + ", ".join(f"{key}={_q(value)}" for key, value in attrs.items() if value is not None) + "]"


def method_colour(method: Optional[str]) -> str:
    """The colour of ``method``'s paths (None: a race that failed)."""
    if method is None:
        return FAILED_COLOUR
    if method in METHOD_COLOURS:
        return METHOD_COLOURS[method]
    return OTHER_COLOURS[sum(method.encode()) % len(OTHER_COLOURS)]


def _ms(value: object) -> Optional[str]:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return None
    return f"{value:.1f} ms" if value < 10 else f"{value:.0f} ms"


def _legend(methods: Iterable[str], failed: bool) -> str:
    """An HTML-like label: a colour bar and a name per method, then the line styles."""
    rows = ['<tr><td colspan="2"><b>paths by method</b></td></tr>']
    for method in methods:
        style = " (dashed: relayed)" if method == "relay" else ""
        rows.append(f'<tr><td bgcolor="{method_colour(method)}" width="28" height="6" fixedsize="true"></td>'
                    f'<td align="left">{html.escape(method)}{style}</td></tr>')
    if failed:
        rows.append(f'<tr><td bgcolor="{FAILED_COLOUR}" width="28" height="6" fixedsize="true"></td>'
                    f'<td align="left">every candidate failed (dotted)</td></tr>')
    rows.append(f'<tr><td bgcolor="{TREE_COLOUR}" width="28" height="2" fixedsize="true"></td>'
                f'<td align="left">bootstrap tree</td></tr>')
    rows.append('<tr><td colspan="2" align="left">bold double border: leader</td></tr>')
    return '<<table border="1" color="#C0C0C0" cellborder="0" cellspacing="3" cellpadding="1">' + "".join(rows) + "</table>>"


def to_dot(topology: Mapping[str, Any]) -> str:
    """The DOT source of a picture of ``topology`` (what :func:`control_topology` returns)."""
    nodes: List[Mapping[str, Any]] = list(topology.get("nodes", []))
    rv = topology.get("rendezvous") or {"name": RENDEZVOUS_NAME, "address": None}
    rv_name = str(rv.get("name") or RENDEZVOUS_NAME)
    asked = topology.get("asked")
    at = topology.get("at")
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(at)) if isinstance(at, (int, float)) else ""
    known = {str(n["name"]) for n in nodes} | {rv_name}

    out = [
        "digraph gridsock {",
        "  graph " + _attrs(label=f"the grid as {asked} sees it, {when}".strip(", "), labelloc="t", fontsize="16",
                             fontname="Helvetica", rankdir="TB", nodesep="0.5", ranksep="0.9") + ";",
        "  node " + _attrs(shape="box", style="rounded,filled", fillcolor="white", fontname="Helvetica",
                           fontsize="12") + ";",
        "  edge " + _attrs(fontname="Helvetica", fontsize="9") + ";",
        f"  {_q(rv_name)} " + _attrs(label=f"rendez-vous node\n{rv.get('address') or ''}".strip(),
                                     shape="doubleoctagon", style="filled", fillcolor="#FFF2CC") + ";",
    ]

    def node_line(n: Mapping[str, Any]) -> str:
        name = str(n["name"])
        label = f"{name}\n{n.get('role', '')}" + (" (asked)" if name == asked else "")
        attrs: Dict[str, Any] = {"label": label}
        if n.get("role") == "leader":
            attrs.update(penwidth="2.2", peripheries="2")
        if not n.get("answered", True):
            why = str(n.get("error") or "no answer")
            attrs.update(label=label + "\nno answer", style="rounded,filled,dashed", fillcolor="#EEEEEE",
                         fontcolor="#555555", tooltip=why[:200])
        elif name == asked:
            attrs.update(fillcolor="#E8F0FE")
        return f"{_q(name)} {_attrs(**attrs)};"

    clusters: Dict[str, List[Mapping[str, Any]]] = {}
    for n in nodes:
        if n.get("cluster"):
            clusters.setdefault(str(n["cluster"]), []).append(n)
        else:
            out.append("  " + node_line(n))
    for cluster in sorted(clusters):
        out.append(f"  subgraph {_q('cluster_' + cluster)} {{")
        out.append("    graph " + _attrs(label=f"cluster {cluster}", style="rounded,filled", fillcolor="#F5F5F5",
                                         color="#B0B0B0", fontname="Helvetica", fontsize="13") + ";")
        out.extend("    " + node_line(n) for n in clusters[cluster])
        out.append("  }")

    # The bootstrap tree, drawn from the top (rendez-vous node) down so that it sets the ranks.
    out.append("  edge " + _attrs(color=TREE_COLOUR, penwidth="0.7", dir="none", arrowhead="none") + ";")
    for n in nodes:
        name, leader = str(n["name"]), n.get("leader")
        if n.get("role") == "member" and leader in known and leader != name:
            out.append(f"  {_q(leader)} -> {_q(name)};")
        else:
            out.append(f"  {_q(rv_name)} -> {_q(name)};")

    # Data paths: client -> server, as each node last reached each peer. They leave the ranks to
    # the tree (weight 0, minlen 0: a path may join two nodes of one rank); constraint=false would
    # do the same, but Graphviz 2.43 fails on it between clusters ("trouble in init_rank").
    methods_used = set()
    failed = False
    strangers = set()
    out.append("  edge " + _attrs(color="black", penwidth="1.6", dir="forward", arrowhead="normal",
                                  arrowsize="0.7") + ";")
    for n in nodes:
        for p in n.get("paths", []):
            peer = str(p.get("peer"))
            if peer not in known and peer not in strangers:
                strangers.add(peer)
                out.append(f"  {_q(peer)} " + _attrs(label=f"{peer}\n(not in the directory)", style="rounded,dashed",
                                                     color="#888888", fontcolor="#555555") + ";")
            method = p.get("method") if isinstance(p.get("method"), str) else None
            colour = method_colour(method)
            if method is None:
                failed = True
                label = "failed"
                style = "dotted"
            else:
                methods_used.add(method)
                label = "\n".join(filter(None, [str(p.get("stack")), _ms(p.get("connect_ms")),
                                                "(stack named)" if p.get("chosen") == "caller" else None]))
                style = "dashed" if method == "relay" else "solid"
            out.append(f"  {_q(n['name'])} -> {_q(peer)} " + _attrs(color=colour, fontcolor=colour, style=style,
                                                                      label=label, minlen="0", weight="0") + ";")

    legend_methods = list(METHOD_COLOURS) + sorted(methods_used - set(METHOD_COLOURS))
    # (an ID no node can have: node names have no spaces)
    out.append(f'  "gridsock legend" [shape=plaintext, style=solid, fontsize=10, label={_legend(legend_methods, failed)}];')
    out.append("}")
    return "\n".join(out) + "\n"
