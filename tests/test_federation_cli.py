"""Several rendez-vous nodes through the command line, as a user sets them up (docs/federation.md).

``gridsock session new`` with two ``--rendezvous``, ``gridsock session rendezvous`` adding a
third, ``gridsock rendezvous --name`` running each, a leader on each of two (``gridsock node
--rendezvous``), and ``gridsock ping`` across them. Then the rendez-vous node of one leader is
killed: the leader moves to another one and the ping works again. The model itself is tested in
tests/test_federation.py (in process); this is the commands' part.
"""
from __future__ import annotations

import json
import socket
import stat
import time

import pytest

from gridsock.bootstrap.control import call
from gridsock.session import Session
from gridsock.testing.procs import wait_for_line
from test_cli import READY_TIMEOUT_S, env, gridsock, procs, run_dir  # noqa: F401 (fixtures)

pytestmark = pytest.mark.timeout(180)

# How often the test pings again while the leader moves to another rendez-vous node.
POLL_S = 0.2


def free_ports(count: int) -> list:
    """Loopback ports free right now (the session must name its rendez-vous ports up front)."""
    socks = [socket.socket() for _ in range(count)]
    try:
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def test_a_federation_set_up_and_failed_over_with_the_commands(tmp_path, procs, env, run_dir):  # noqa: F811
    p1, p2, p3 = free_ports(3)
    directory = tmp_path / "session"
    made = gridsock("session", "new", str(directory), "--rendezvous", f"127.0.0.1:{p1}", "--rendezvous",
                    f"127.0.0.1:{p2}", env=env)
    assert made.returncode == 0, made.stderr
    added = gridsock("session", "rendezvous", str(directory), f"127.0.0.1:{p3}", env=env)
    assert added.returncode == 0, added.stderr
    assert "rendez-vous node rendezvous-3 at 127.0.0.1:" in added.stdout
    session = Session.load(directory / "session.toml")
    assert list(session.rendezvous_addresses) == [("127.0.0.1", p) for p in (p1, p2, p3)]
    for name in ("rendezvous-2-key.pem", "rendezvous-3-key.pem"):
        assert stat.S_IMODE((directory / name).stat().st_mode) == 0o600
    again = gridsock("session", "rendezvous", str(directory), f"127.0.0.1:{p3}", env=env)
    assert again.returncode != 0 and "127.0.0.1:" in again.stderr  # (listed already: a clear error)

    rvs = {}
    for name, port in (("rendezvous", p1), ("rendezvous-2", p2), ("rendezvous-3", p3)):
        rvs[name] = procs.start(name, "rendezvous", "--session", str(directory / "session.toml"), "--name", name,
                                "--listen", f"127.0.0.1:{port}")
        assert wait_for_line(rvs[name], "rendezvous listening ", timeout=READY_TIMEOUT_S).endswith(f":{port}")
    leaders = {}
    for name, cluster, port in (("la", "A", p2), ("lb", "B", p3)):
        leaders[name] = procs.start(name, "node", "--session", str(directory / "session.toml"), "--name", name,
                                    "--cluster", cluster, "--rendezvous", f"127.0.0.1:{port}", "--listen",
                                    "127.0.0.1:0", "--front-door", "off")
        assert wait_for_line(leaders[name], f"joined {name} ", timeout=READY_TIMEOUT_S).endswith(" leader")
    for name in leaders:
        call(str(run_dir / f"{name}.sock"), "wait", {"present": list(leaders), "timeout": READY_TIMEOUT_S},
             timeout=READY_TIMEOUT_S + 5)
    ping = gridsock("ping", "--node", "la", "lb", env=env)
    assert ping.returncode == 0, ping.stderr
    assert "rendezvous-2" in ping.stdout and "rendezvous-3" in ping.stdout, ping.stdout  # (the route crosses both)
    status = json.loads(gridsock("status", "--json", "--node", "rendezvous-2", env=env).stdout)
    assert "federation" in status

    rvs["rendezvous-3"].kill()  # lb's: it moves on to the next of the list (rendezvous, the first)
    rvs["rendezvous-3"].wait(timeout=READY_TIMEOUT_S)
    call(str(run_dir / "la.sock"), "wait", {"present": ["lb"], "timeout": READY_TIMEOUT_S},
         timeout=READY_TIMEOUT_S + 5)
    deadline = time.monotonic() + READY_TIMEOUT_S
    while True:  # (polled: until lb's route no longer names rendezvous-3, within READY_TIMEOUT_S)
        moved = gridsock("ping", "--node", "la", "lb", env=env)
        if moved.returncode == 0 and "rendezvous-3" not in moved.stdout:
            break
        assert time.monotonic() < deadline, (moved.stdout, moved.stderr)
        time.sleep(POLL_S)
