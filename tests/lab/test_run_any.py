"""``gridsock run`` for a program that is not Python: curl on a1 fetches from c2, by grid name.

The server is ``python3 -m http.server`` under ``gridsock run --node c2`` in the private cluster
C (the personality serves its grid port); the client is curl, unmodified, on a1 behind cluster
A's NAT, under ``gridsock run``: proxychains-ng sends its connection to the front door of the
node it uses, which resolves ``c2`` through the directory and connects through the grid (the
node's rules and methods pick the path). Readiness is a line the server prints; every wait is
bounded.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys

import pytest

from gridsock.bootstrap.control import call
from gridsock.testing.procs import gridsock_argv, wait_for_line

from .gridsession import NODE_PORT, make_grid

pytestmark = pytest.mark.timeout(300)

# A program under gridsock run (start, joining for a node of its own, the transfer) ends within this.
RUN_TIMEOUT_S = 120.0
PAYLOAD_BYTES = 4 << 20
CURL = shutil.which("curl")


@pytest.fixture(scope="module")
def grid(lab, tmp_path_factory):
    if CURL is None or shutil.which("proxychains4") is None:
        pytest.fail("the lab needs curl and proxychains4 (Debian packages curl, proxychains4: .ci/lab-deps)",
                    pytrace=False)
    yield from make_grid(lab, tmp_path_factory)


@pytest.fixture(scope="module")
def served(grid):
    """``python3 -m http.server`` under ``gridsock run --node c2``: ``(port, payload)`` of data.bin."""
    directory = grid.tmp / "www-run-any"
    directory.mkdir()
    payload = os.urandom(PAYLOAD_BYTES)
    (directory / "data.bin").write_bytes(payload)
    with open(grid.tmp / "run-any-server.log", "wb") as log:
        server = grid.lab.spawn("c2", gridsock_argv("run", "--node", "c2", "--", sys.executable, "-m", "http.server",
                                                    "0", "--directory", str(directory)),
                                stdout=subprocess.PIPE, stderr=log, env=grid.env)
    try:
        line = wait_for_line(server, "Serving HTTP on ", timeout=RUN_TIMEOUT_S)
        yield int(line.split(" port ")[1].split()[0]), payload
    finally:
        server.terminate()
        server.wait(timeout=30)
        server.stdout.close()


def fetch(grid, host: str, options: list, url: str) -> subprocess.CompletedProcess:
    return grid.lab.run(host, gridsock_argv("run", *options, "--", CURL, "-sS", "--fail", "--noproxy", "*", url),
                        capture_output=True, env=grid.env, timeout=RUN_TIMEOUT_S)


def test_curl_on_a1_fetches_from_c2_by_grid_name_with_a_node_of_its_own(grid, served):
    port, payload = served
    own = ["--session", grid.session_for("A"), "--name", "a1-curl", "--cluster", "A",
           "--leader", f"{grid.lab.addr('a1')}:{NODE_PORT}", "--front-door", "127.0.0.1:0"]
    done = fetch(grid, "a1", own, f"http://c2:{port}/data.bin")
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    assert hashlib.sha256(done.stdout).digest() == hashlib.sha256(payload).digest()


def test_curl_on_a1_fetches_from_c2_through_a_running_node_of_its_host(grid, served):
    """``gridsock run --node NAME``: a member of cluster A on a1 started with a front door."""
    port, payload = served
    node = grid.spawn("a1", "a1-door", "node", "--session", grid.session_for("A"), "--name", "a1-door", "--cluster", "A",
                      "--leader", f"{grid.lab.addr('a1')}:{NODE_PORT}", "--front-door", "127.0.0.1:0")
    wait_for_line(node, "joined a1-door ", timeout=RUN_TIMEOUT_S)
    assert call(grid.control("a1-door"), "status")["front_door"].startswith("127.0.0.1:")
    done = fetch(grid, "a1", ["--node", "a1-door"], f"http://c2.grid:{port}/data.bin")
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    assert hashlib.sha256(done.stdout).digest() == hashlib.sha256(payload).digest()


PYCURL_CLIENT = """\
import hashlib, sys
import pycurl  # a C extension: libcurl's own sockets, not Python's
body = bytearray()
curl = pycurl.Curl()
curl.setopt(pycurl.URL, sys.argv[1])
curl.setopt(pycurl.WRITEFUNCTION, body.extend)
curl.perform()
print(curl.getinfo(pycurl.RESPONSE_CODE), hashlib.sha256(body).hexdigest())
"""


def test_pycurl_on_a1_fetches_from_c2_under_gridsock_run(grid, served):
    """A Python program whose HTTP client is a C extension (pycurl): its sockets are libcurl's, so
    it reaches c2 in the private cluster through the front door (the proxy variables gridsock
    run sets, which libcurl honours), from a1 behind A's NAT."""
    pytest.importorskip("pycurl")
    port, payload = served
    script = grid.tmp / "pycurl_client.py"
    script.write_text(PYCURL_CLIENT)
    node = grid.spawn("a1", "a1-pycurl", "node", "--session", grid.session_for("A"), "--name", "a1-pycurl", "--cluster", "A",
                      "--leader", f"{grid.lab.addr('a1')}:{NODE_PORT}")
    wait_for_line(node, "joined a1-pycurl ", timeout=RUN_TIMEOUT_S)
    done = grid.lab.run("a1", gridsock_argv("run", "--node", "a1-pycurl", "--", sys.executable, str(script),
                                            f"http://c2:{port}/data.bin"),
                        capture_output=True, env=grid.env, timeout=RUN_TIMEOUT_S)
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    assert done.stdout.decode().split() == ["200", hashlib.sha256(payload).hexdigest()], done.stdout
