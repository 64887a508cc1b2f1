"""``gridsock top`` and ``gridsock status --watch``: frames, rates, --count, Ctrl-C, a node gone.

The frames and rates are checked in this process against a node of the loopback grid
(:mod:`gridsock.testing.grid`) whose control socket the test serves; Ctrl-C and a node that
goes away need processes: ``gridsock rendezvous``, a node, and the view in a process of its own.
"""
from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess

import gevent
import gevent.event
import gevent.socket
import pytest

from gridsock import cli
from gridsock.bootstrap.control import ControlServer
from gridsock.errors import ConfigError
from gridsock.testing.grid import JOIN_TIMEOUT_S, loopback_grid
from gridsock.testing.procs import gridsock_argv, wait_for_line
from gridsock.top import CLEAR_SCREEN, RateMeter, format_frame, run_view
from test_cli import READY_TIMEOUT_S, STRICT_ENV, Procs, start_rendezvous

pytestmark = pytest.mark.timeout(180)

PORT = 5200
CHUNK = b"x" * 65536
# The sender stops after this many chunks whatever happens (a bounded loop).
MAX_CHUNKS = 4000


def serve_control(node, path: str) -> ControlServer:
    """A control socket for a node of the loopback grid (which starts them without one)."""
    def handle(op: str, args: dict):
        if op == "status":
            return node.status()
        if op == "netcheck":
            from gridsock.netcheck import control_netcheck

            return control_netcheck(node, args)
        raise ConfigError(f"unknown control operation {op!r}")
    return ControlServer(path, handle).start()


@pytest.fixture(scope="module")
def loopback(tmp_path_factory):
    with loopback_grid(tmp_path_factory.mktemp("top")) as running:
        path = str(tmp_path_factory.mktemp("c") / "m1.sock")
        control = serve_control(running["m1"], path)
        try:
            yield running, path
        finally:
            control.stop()


def test_rates_come_from_successive_replies():
    meter = RateMeter()
    first = meter.update([{"conn": 1, "bytes_sent": 100, "bytes_received": 0},
                          {"conn": 2, "bytes_sent": None, "bytes_received": None}], at=10.0)
    assert first == {1: (None, None), 2: (None, None)}  # nothing to compare with yet
    second = meter.update([{"conn": 1, "bytes_sent": 2100, "bytes_received": 500},
                           {"conn": 2, "bytes_sent": None, "bytes_received": None},
                           {"conn": 3, "bytes_sent": 7, "bytes_received": 7}], at=12.0)
    assert second == {1: (1000.0, 250.0), 2: (None, None), 3: (None, None)}
    third = meter.update([{"conn": 3, "bytes_sent": 7, "bytes_received": 1031}], at=13.0)
    assert third == {3: (0.0, 1024.0)}
    assert meter.update([{"conn": 1, "bytes_sent": 5000, "bytes_received": 0}], at=14.0) == {1: (None, None)}  # forgotten


def test_a_frame_shows_header_paths_connections_with_rates_and_meta_links():
    status = {
        "role": "member", "name": "m1", "cluster": "A", "joined": True, "address": "127.0.0.1:1",
        "bootstrap": "tls/tcp", "directory": [{}, {}],
        "links": [{"kind": "uplink", "label": "to L1", "since": 1000.0}],
        "paths": [{"peer": "m2", "peer_id": "x", "stack": "tls/relay", "method": "relay", "direct": False,
                   "at": 1000.0, "chosen": "rules", "connect_ms": 3.5, "tried": [],
                   "reasons": [{"stack": "tls/tcp", "reason": "r" * 300, "at": 1000.0}], "cached": None}],
        "connections": [{"conn": 7, "side": "client", "peer": "m2", "port": 9, "stack": "tls/relay",
                         "bytes_sent": 3 << 20, "bytes_received": 10, "rtt_ms": None, "age_s": 75,
                         "handed": False, "pid": None}],
        "listening": [9],
        "meta_links": [{"peer": "m2", "stack": "tls/tcp", "label": "meta to m2"}],
    }
    text = format_frame(status, {7: (2048.0, None)}, interval=2, now=1195.0)
    lines = text.splitlines()
    assert lines[0].startswith("node m1 (member, cluster A): joined, uplink up 3m15s")
    row = next(line for line in lines if line.split()[:1] == ["#7"])
    assert row.split()[1:4] == ["client", "m2:9", "tls/relay"]
    assert "3.0 MiB" in row and "2.0 KiB/s" in row and "1m15s" in row
    reason = next(line for line in lines if line.strip().startswith("not tls/tcp: "))
    assert reason.endswith("...") and len(reason.strip()) <= 90
    assert any(line.split()[:2] == ["m2", "relayed"] for line in lines)
    assert any(line.split() == ["m2", "tls/tcp", "meta", "to", "m2"] for line in lines)


def pump(sock, stop: gevent.event.Event) -> None:
    """Send chunks until ``stop`` (or MAX_CHUNKS), a few per tick, so rates are never zero."""
    for _ in range(MAX_CHUNKS):
        if stop.is_set():
            return
        sock.sendall(CHUNK)
        gevent.sleep(0.005)


def drain(sock) -> None:
    while sock.recv(1 << 20):
        pass


def test_top_prints_count_frames_with_rates_of_a_live_connection(loopback, capsys):
    grid, path = loopback
    m1 = grid["m1"]
    listener = grid["m2"].listen(PORT)
    raw, info = m1.connect("m2", PORT, stack="tls/relay")
    raw_server, _ = listener.accept(timeout=JOIN_TIMEOUT_S)
    # gevent sockets on duplicates: the node lists a connection while the socket it handed out is open
    client = gevent.socket.socket(fileno=os.dup(raw.fileno()))
    server = gevent.socket.socket(fileno=os.dup(raw_server.fileno()))
    stop = gevent.event.Event()
    workers = [gevent.spawn(pump, client, stop), gevent.spawn(drain, server)]
    try:
        status = cli.main(["top", "--control", path, "--count", "3", "--interval", "0.3"])
    finally:
        stop.set()
        workers[0].join(timeout=JOIN_TIMEOUT_S)
        client.close()
        raw.close()
        workers[1].join(timeout=JOIN_TIMEOUT_S)
        server.close()
        raw_server.close()
        gevent.killall(workers)
        listener.close()
    assert status == 0
    out = capsys.readouterr().out
    frames = out.split("\n\nnode m1 ")
    assert len(frames) == 3 and frames[0].startswith("node m1 (member, cluster A): joined")
    rows = [next((line for line in f.splitlines() if line.split()[:1] == [f"#{info.conn}"]), f) for f in frames]
    cells = [re.split(r" {2,}", row.strip()) for row in rows]  # (columns are two spaces apart at least)
    assert cells[0][1:4] == ["client", f"m2:{PORT}", "tls/relay"], out
    assert cells[0][6:8] == ["-", "-"], out  # first frame: no rate yet
    for later in cells[1:]:
        assert later[6].endswith("/s") and later[6] != "0 B/s", out  # sent/s: the pump never stops
        assert later[7] == "0 B/s", out  # nothing comes back


def test_top_json_is_one_object_per_frame(loopback, capsys):
    _, path = loopback
    assert cli.main(["top", "--control", path, "--count", "2", "--interval", "0.1", "--json"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2
    frames = [json.loads(line) for line in lines]
    assert all(f["status"]["name"] == "m1" and isinstance(f["rates"], dict) for f in frames)


def test_on_a_terminal_each_frame_replaces_the_previous_one(loopback):
    _, path = loopback
    out = io.StringIO()
    assert run_view(path, interval=0.1, count=2, out=out, tty=True) == 0
    frames = out.getvalue().split(CLEAR_SCREEN)
    assert frames[0] == "" and len(frames) == 3
    assert all(f.startswith("node m1 (member, cluster A): joined") for f in frames[1:])


def test_top_without_a_node_says_so(tmp_path, capsys):
    assert cli.main(["top", "--control", str(tmp_path / "none.sock"), "--count", "1"]) == 2
    assert "gridsock top: no gridsock process serves" in capsys.readouterr().err


# --- Ctrl-C and a node that goes away: processes --------------------------------------------


@pytest.fixture
def node_proc(tmp_path, sock_dir):
    run_dir = sock_dir / "run"
    env = dict(os.environ, GRIDSOCK_RUN_DIR=str(run_dir), **STRICT_ENV)
    procs = Procs(tmp_path, env)
    try:
        _, session = start_rendezvous(procs, tmp_path, env)
        lead = procs.start("lead", "node", "--session", str(session), "--name", "lead", "--cluster", "A",
                           "--listen", "127.0.0.1:0")
        wait_for_line(lead, "joined lead ", timeout=READY_TIMEOUT_S)
        yield procs, lead, env, run_dir
    finally:
        procs.stop_all()


def start_view(env, *args: str) -> subprocess.Popen:
    return subprocess.Popen(gridsock_argv(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)


@pytest.mark.parametrize("argv", [("top", "--node", "lead", "--interval", "0.2"),
                                  ("status", "--node", "lead", "--watch", "0.2")])
def test_ctrl_c_ends_the_view_at_once_with_status_0(node_proc, argv):
    _, _, env, _ = node_proc
    view = start_view(env, *argv)
    try:
        wait_for_line(view, "node lead (leader, cluster A): joined", timeout=READY_TIMEOUT_S)
        wait_for_line(view, "node lead (leader, cluster A): joined", timeout=READY_TIMEOUT_S)  # a second frame
        view.send_signal(signal.SIGINT)
        assert view.wait(timeout=READY_TIMEOUT_S) == 0
        err = view.stderr.read().decode()
        assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    finally:
        if view.poll() is None:
            view.kill()
            view.wait()
        view.stdout.close()
        view.stderr.close()


def test_a_node_that_goes_away_ends_the_view_with_status_1(node_proc):
    procs, lead, env, _ = node_proc
    view = start_view(env, "top", "--node", "lead", "--interval", "0.2")
    try:
        wait_for_line(view, "node lead (leader, cluster A): joined", timeout=READY_TIMEOUT_S)
        procs.stop(lead)
        assert view.wait(timeout=READY_TIMEOUT_S) == 1
        err = view.stderr.read().decode()
        assert "gridsock top: lead went away" in err and "Traceback" not in err, err
    finally:
        if view.poll() is None:
            view.kill()
            view.wait()
        view.stdout.close()
        view.stderr.close()


def test_the_view_of_the_rendezvous_node(node_proc):
    _, _, env, run_dir = node_proc
    done = subprocess.run(gridsock_argv("top", "--control", str(run_dir / "rendezvous.sock"), "--count", "2",
                                        "--interval", "0.1"), env=env, capture_output=True, timeout=READY_TIMEOUT_S)
    assert done.returncode == 0, done.stderr
    frames = done.stdout.decode().split("\n\n")
    assert len(frames) == 2 and all(f.startswith("rendez-vous node of session ") for f in frames)
    assert "leaders linked:" in frames[0] and "  lead  " in frames[0]
