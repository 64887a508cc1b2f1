"""``gridsock status --graph FILE``: a picture of the grid drawn by Graphviz from a running grid.

The in-process loopback grid (:mod:`gridsock.testing.grid`) makes a few data connections; a
control socket of m1 serves the ``topology`` operation as a node wires it
(``gridsock.node.CONTROL_OPS_ELSEWHERE``); the real ``gridsock`` command, a process of its own
(run through gevent's subprocess, so that this process keeps serving), draws the grid; the SVG is
parsed with xml.etree.
"""
from __future__ import annotations

import importlib
import json
import os
import re
import shutil
import xml.etree.ElementTree as ET

import gevent
import gevent.event
import gevent.subprocess
import pytest

from gridsock.bootstrap.control import ControlServer, call
from gridsock.errors import GridsockError
from gridsock.node import CONTROL_OPS_ELSEWHERE, PATHS_TOPIC
from gridsock.testing.grid import JOIN_TIMEOUT_S, NAMES, loopback_grid
from gridsock.testing.procs import gridsock_argv
from gridsock.topology import METHOD_COLOURS, FAILED_COLOUR, render, to_dot

pytestmark = pytest.mark.timeout(180)

PORT = 5300
# The command starts (imports), asks the grid and runs dot well within this.
COMMAND_TIMEOUT_S = 60.0
SVG = "{http://www.w3.org/2000/svg}"
needs_dot = pytest.mark.skipif(shutil.which("dot") is None,
                               reason="Graphviz's dot is not installed (Debian package graphviz, in .ci/lab-deps)")


def serve_control(node, path: str) -> ControlServer:
    """A control socket for ``node`` serving the operations of CONTROL_OPS_ELSEWHERE, as the node does."""
    def handler(op: str, args: dict):
        module, _, function = CONTROL_OPS_ELSEWHERE[op].partition(":")
        return getattr(importlib.import_module(module), function)(node, args)

    return ControlServer(path, handler).start()


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    with loopback_grid(tmp_path_factory.mktemp("topo")) as running:
        listeners = {name: node.listen(PORT) for name, node in running.nodes.items()}

        def connect(src: str, dst: str, stack=None) -> str:
            client, info = running[src].open_stream(dst, PORT, stack=stack)
            server, _ = listeners[dst].accept_stream(timeout=JOIN_TIMEOUT_S)
            client.close()
            server.close()
            return str(info.stack)

        connect("m1", "L1", "tcp")
        connect("m1", "m2", "tls/relay")
        connect("L2", "m1", "tls/tcp")
        control = str(tmp_path_factory.mktemp("ctl") / "m1.sock")
        server = serve_control(running["m1"], control)
        try:
            yield running, control
        finally:
            server.stop()


def gridsock(*args: str, env=None):
    return gevent.subprocess.run(gridsock_argv(*args), capture_output=True, text=True, env=env,
                                 timeout=COMMAND_TIMEOUT_S)


def svg_edges(root: ET.Element) -> list:
    """``(title, stroke, dashed)`` of every edge of a Graphviz SVG."""
    out = []
    for g in root.iter(f"{SVG}g"):
        if g.get("class") == "edge":
            title = g.findtext(f"{SVG}title", "")
            path = g.find(f"{SVG}path")
            assert path is not None, title
            out.append((title, (path.get("stroke") or "").lower(), path.get("stroke-dasharray") is not None))
    return out


def svg_node_titles(root: ET.Element) -> set:
    return {g.findtext(f"{SVG}title") for g in root.iter(f"{SVG}g") if g.get("class") == "node"}


# --- the control operation -----------------------------------------------------------------------


def test_the_topology_holds_every_node_and_every_nodes_paths(grid):
    running, control = grid
    topo = call(control, "topology", {"timeout": 10})
    json.dumps(topo)
    nodes = {n["name"]: n for n in topo["nodes"]}
    assert set(nodes) == set(NAMES) and topo["asked"] == "m1"
    assert all(n["answered"] and n["error"] is None for n in nodes.values()), nodes
    assert (nodes["L1"]["role"], nodes["m1"]["role"], nodes["m1"]["leader"]) == ("leader", "member", "L1")
    assert (nodes["m2"]["cluster"], nodes["m2"]["leader"], nodes["L2"]["leader"]) == ("B", "L2", "L2")
    assert topo["rendezvous"]["address"] == running.session.rendezvous
    m1_paths = {p["peer"]: p for p in nodes["m1"]["paths"]}  # (m1 answers for itself)
    assert (m1_paths["L1"]["method"], m1_paths["m2"]["method"]) == ("tcp", "relay")
    [l2_path] = nodes["L2"]["paths"]  # (asked over the grid)
    assert (l2_path["peer"], l2_path["stack"]) == ("m1", "tls/tcp")
    assert nodes["L1"]["paths"] == [] and nodes["m2"]["paths"] == []


def test_a_node_that_does_not_answer_in_time_is_kept_and_marked(grid, monkeypatch):
    running, control = grid
    release = gevent.event.Event()

    def slow(delivery) -> bytes:  # answers after the deadline (released when the test is done)
        release.wait(60)
        return b'{"paths": []}'

    monkeypatch.setitem(running["L2"].router.handlers, PATHS_TOPIC, slow)
    try:
        topo = call(control, "topology", {"timeout": 1.0})
    finally:
        release.set()
    nodes = {n["name"]: n for n in topo["nodes"]}
    assert set(nodes) == set(NAMES)
    assert not nodes["L2"]["answered"] and nodes["L2"]["paths"] == [] and nodes["L2"]["error"]
    assert all(nodes[name]["answered"] for name in ("L1", "m1", "m2"))
    dot = to_dot(topo)
    assert re.search(r'"L2" \[label="L2\\nleader\\nno answer", .*style="rounded,filled,dashed"', dot), dot


def test_a_bad_timeout_is_refused(grid):
    _, control = grid
    for bad in ("soon", 0, -1, 1e9):
        with pytest.raises(GridsockError, match="timeout"):
            call(control, "topology", {"timeout": bad})


# --- the command ---------------------------------------------------------------------------------


@needs_dot
def test_status_graph_draws_an_svg_with_every_node_and_the_methods_colours(grid, tmp_path):
    _, control = grid
    out = tmp_path / "grid.svg"
    done = gridsock("status", "--graph", str(out), "--control", control)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"{out}: 4 node(s), 3 path(s)"), done.stdout
    root = ET.parse(out).getroot()
    assert root.tag == f"{SVG}svg"
    texts = {t.text for t in root.iter(f"{SVG}text")}
    assert set(NAMES) <= texts and {"cluster A", "cluster B", "rendez-vous node"} <= texts
    assert set(NAMES) | {"rendezvous"} <= svg_node_titles(root)
    edges = svg_edges(root)
    by_title = {title: (stroke, dashed) for title, stroke, dashed in edges}
    assert by_title["m1->L1"] == (METHOD_COLOURS["tcp"].lower(), False)
    assert by_title["m1->m2"] == (METHOD_COLOURS["relay"].lower(), True)  # relayed: dashed
    assert by_title["L2->m1"] == (METHOD_COLOURS["tcp"].lower(), False)
    assert any(t == "tls/relay" for t in texts) and "tls/tcp" in texts
    tree = {title for title, stroke, _ in edges if stroke == "#a0a0a0"}
    assert tree == {"rendezvous->L1", "L1->m1", "rendezvous->L2", "L2->m2"}


def test_status_graph_writes_dot_source(grid, tmp_path):
    _, control = grid
    out = tmp_path / "grid.dot"
    done = gridsock("status", "--graph", str(out), "--control", control)
    assert done.returncode == 0, done.stderr
    text = out.read_text()
    assert text.startswith("digraph gridsock {")
    for name in NAMES:
        assert f'"{name}" [label="{name}\\n' in text
    assert 'subgraph "cluster_A"' in text and 'subgraph "cluster_B"' in text
    assert f'"m1" -> "m2" [color="{METHOD_COLOURS["relay"]}"' in text


def test_status_graph_refuses_an_unknown_suffix_before_asking(grid, tmp_path):
    out = tmp_path / "grid.jpeg"
    done = gridsock("status", "--graph", str(out), "--control", str(tmp_path / "nobody.sock"))
    assert done.returncode == 2
    assert done.stderr.startswith("gridsock status: cannot draw to ") and ".svg, .png, .dot" in done.stderr
    assert done.stderr.count("\n") == 1 and not out.exists()


def test_without_dot_a_clear_error_names_the_package_and_dot_source_still_works(grid, tmp_path):
    _, control = grid
    env = dict(os.environ, PATH=str(tmp_path / "empty"))  # (the interpreter is named by its full path)
    done = gridsock("status", "--graph", str(tmp_path / "grid.svg"), "--control", control, env=env)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "'dot'" in done.stderr and "Debian package 'graphviz'" in done.stderr, done.stderr
    assert not (tmp_path / "grid.svg").exists()
    done = gridsock("status", "--graph", str(tmp_path / "grid.dot"), "--control", control, env=env)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "grid.dot").read_text().startswith("digraph")


# --- to_dot alone --------------------------------------------------------------------------------


def test_to_dot_quotes_what_it_is_given_and_marks_failures_and_strangers(tmp_path):
    topo = {
        "asked": 'x"1', "at": 0.0, "rendezvous": {"name": "rendezvous", "address": "192.0.2.1:7700"},
        "nodes": [
            {"name": 'x"1', "cluster": "A\\B", "role": "leader", "leader": 'x"1', "answered": True,
             "paths": [{"peer": "y", "method": None, "stack": None},
                       {"peer": "gone", "method": "rot13", "stack": "rot13", "connect_ms": 3.25}]},
            {"name": "y", "cluster": None, "role": "leader", "leader": "y", "answered": True, "paths": []},
        ],
    }
    dot = to_dot(topo)
    assert '"x\\"1" -> "y" [color="' + FAILED_COLOUR + '", fontcolor="' + FAILED_COLOUR + '", style="dotted"' in dot
    assert 'subgraph "cluster_A\\\\B"' in dot
    assert '"gone" [label="gone\\n(not in the directory)"' in dot
    assert 'label="rot13\\n3.2 ms"' in dot  # an unknown method gets a colour and a legend row
    assert '<td align="left">rot13</td>' in dot
    if shutil.which("dot") is not None:  # and Graphviz reads it
        render(dot, str(tmp_path / "x.svg"))
        root = ET.parse(tmp_path / "x.svg").getroot()
        assert {'x"1', "y", "gone", "rendezvous"} <= svg_node_titles(root)


def test_status_graph_aimed_at_the_rendezvous_process_says_to_ask_a_node(tmp_path):
    done = gridsock("status", "--graph", str(tmp_path / "grid.svg"), "--control", str(tmp_path / "rendezvous.sock"))
    assert done.returncode == 2 and done.stderr.count("\n") == 1
    assert "ask a node (--node NAME)" in done.stderr, done.stderr
