"""``gridsock status --graph`` on the lab grid: connections across clusters, then the picture.

Data connections made with ``transfer`` (as in test_data.py) leave every method the lab can
carry in some node's paths: tcp inside cluster A, splice between A's NAT and B's firewall,
reverse from rv into B, socks and ssh into C through its front-end, relay out of C. Then
``gridsock status --node a1 --graph FILE`` runs inside a1's host, and the SVG must name every
node and hold an edge of each method's colour.

``GRIDSOCK_LAB_TOPOLOGY_COPY=DIR`` copies the drawings (svg, png, dot) there: docs/topology.svg
is one.
"""
from __future__ import annotations

import os
import shutil
import xml.etree.ElementTree as ET

import pytest

from gridsock.stack import Stack
from gridsock.testing.procs import gridsock_argv
from gridsock.topology import METHOD_COLOURS

from .gridsession import NODES, make_grid
from .test_data import RV_RULES, VIA_RULES, check, run_transfer

SVG = "{http://www.w3.org/2000/svg}"
COMMAND_TIMEOUT_S = 120.0
NBYTES = 1 << 20
# (src, dst, stack: None lets the rules choose, method the path must show)
CONNECTIONS = [
    ("a2", "a1", None, "tcp"),  # one cluster network
    ("a2", "b2", None, "splice"),  # NAT on one side, firewall on the other
    ("rv", "b2", None, "reverse"),  # b2 cannot accept from outside: it connects back
    ("a1", "c2", None, "socks"),  # into C through its front-end's SOCKS proxy
    ("b2", "c1", "tls/ssh(gateway=root@203.0.113.4:22)", "ssh"),  # ... or its sshd
    ("c1", "a1", None, "relay"),  # C cannot reach into A: only the relay
]


@pytest.fixture(scope="module")
def grid(lab, tmp_path_factory):
    rules = {name: VIA_RULES for name in NODES}
    rules["rv"] = RV_RULES
    yield from make_grid(lab, tmp_path_factory, rules=rules)


def svg_edges(root: ET.Element) -> dict:
    """Edge title (``a->b``) -> stroke colour, of a Graphviz SVG."""
    out = {}
    for g in root.iter(f"{SVG}g"):
        path = g.find(f"{SVG}path")
        if g.get("class") == "edge" and path is not None:
            out[g.findtext(f"{SVG}title", "")] = (path.get("stroke") or "").lower()
    return out


def test_the_lab_grid_drawn_with_every_method(grid, tmp_path):
    for src, dst, stack, method in CONNECTIONS:
        result = run_transfer(grid, src, dst, stack, NBYTES)
        check(result, stack, NBYTES)
        assert Stack.parse(result["stack"]).method.name == method, (src, dst, result["stack"])
    drawn = {}
    for suffix in ("svg", "png", "dot"):
        out = tmp_path / f"topology.{suffix}"
        done = grid.lab.run("a1", gridsock_argv("status", "--node", "a1", "--graph", str(out)), env=grid.env,
                            capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith(f"{out}: {len(NODES)} node(s)") and "no answer" not in done.stdout, done.stdout
        assert out.stat().st_size > 0
        drawn[suffix] = out
    assert drawn["png"].read_bytes().startswith(b"\x89PNG\r\n\x1a\n")

    root = ET.parse(drawn["svg"]).getroot()
    texts = {t.text for t in root.iter(f"{SVG}text")}
    assert set(NODES) <= texts and {"cluster A", "cluster B", "cluster C", "rendez-vous node"} <= texts
    edges = svg_edges(root)
    for src, dst, _, method in CONNECTIONS:
        assert edges.get(f"{src}->{dst}") == METHOD_COLOURS[method].lower(), (src, dst, method, edges)
    assert {"rendezvous->a1", "a1->a2", "rendezvous->b1", "b1->b2", "rendezvous->c1", "c1->c2",
            "rendezvous->rv"} <= set(edges)

    copy_to = os.environ.get("GRIDSOCK_LAB_TOPOLOGY_COPY")
    if copy_to:
        for out in drawn.values():
            shutil.copyfile(out, os.path.join(copy_to, out.name))
