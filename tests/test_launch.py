"""``gridsock run`` for any program: proxychains-ng and the proxy variables through the node's front door.

A rendez-vous node and two nodes as processes on loopback (``na``, ``nb``, each with a front
door), a ``python -m http.server`` under ``gridsock run`` on ``nb`` (the personality serves its
grid port, proxychains is loaded in it), and clients under ``gridsock run --node na``: curl (a
program that is not Python: proxychains with remote names, or ``http_proxy``), pycurl (a C
extension in a Python program), urllib (with and without ``http_proxy``). Pure functions
(the configuration, the variables, telling Python programs apart) are tested without a grid.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time

import pytest

from gridsock import launch
from gridsock.bootstrap.control import call
from gridsock.errors import ConfigError
from gridsock.testing.procs import gridsock_argv, wait_for_line
from test_cli import READY_TIMEOUT_S, STRICT_ENV, Procs, start_rendezvous

pytestmark = pytest.mark.timeout(300)

# A program under gridsock run (interpreter or curl start, a grid connection, a few MiB) ends within this.
RUN_TIMEOUT_S = 90.0
# The watcher removes a --node run's configuration once the program is gone: within this.
CLEANUP_TIMEOUT_S = 20.0
PAYLOAD_BYTES = 3 << 20
CURL = shutil.which("curl")
PROXYCHAINS = shutil.which(launch.PROXYCHAINS)
needs_curl = pytest.mark.skipif(CURL is None, reason="curl is not installed (Debian package curl, .ci/lab-deps)")
needs_proxychains = pytest.mark.skipif(PROXYCHAINS is None,
                                       reason="proxychains4 is not installed (Debian package proxychains4, .ci/lab-deps)")


# --- without a grid ----------------------------------------------------------------------------


def test_the_configuration_sends_everything_but_loopback_to_the_front_door():
    text = launch.proxychains_config("127.0.0.1", 4321, proxy_dns=True, node="na")
    lines = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert lines[:4] == ["strict_chain", "quiet_mode", "proxy_dns", "remote_dns_subnet 224"]
    assert "localnet 127.0.0.0/255.0.0.0" in lines and "localnet ::1/128" in lines
    assert lines[-2:] == ["[ProxyList]", "socks5 127.0.0.1 4321"]
    assert [line for line in lines if line.startswith("tcp_read_time_out")] == ["tcp_read_time_out 20000"]
    python = launch.proxychains_config("127.0.0.1", 4321, proxy_dns=False)
    assert "proxy_dns" not in python and "remote_dns_subnet" not in python


def test_the_proxy_variables_name_the_front_door_and_keep_no_proxy_entries():
    env = launch.proxy_environment("127.0.0.1", 4321, {"http_proxy": "http://corp:3128", "no_proxy": "intra, ::1"})
    for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        assert env[name] == "http://127.0.0.1:4321"
    assert env["ALL_PROXY"] == env["all_proxy"] == "socks5h://127.0.0.1:4321"
    assert env["no_proxy"] == "intra,::1,localhost,127.0.0.1"
    assert env["NO_PROXY"] == "localhost,127.0.0.1,::1"
    assert launch.proxy_environment("::1", 80, {})["http_proxy"] == "http://[::1]:80"


def test_python_programs_are_told_apart(tmp_path):
    script = tmp_path / "tool"
    script.write_text("#!/usr/bin/env python3\nprint(1)\n")
    script.chmod(0o755)
    other = tmp_path / "other"
    other.write_text("#!/bin/sh\necho 1\n")
    other.chmod(0o755)
    env = {"PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}"}
    assert launch.is_python_program([sys.executable, "-c", "pass"], env)
    assert launch.is_python_program(["python3.11"], {"PATH": ""})
    assert launch.is_python_program(["tool"], env)
    assert not launch.is_python_program(["other"], env)
    assert not launch.is_python_program(["sh", "-c", "python3"], env)


def test_a_plan_without_a_front_door(capsys):
    with pytest.raises(ConfigError, match="serves no front door"):
        launch.plan_launch(["sh", "-c", "true"], dict(os.environ), None, node="n1")
    plan = launch.plan_launch([sys.executable, "-c", "pass"], dict(os.environ), None, node="n1")
    assert plan.argv() == [sys.executable, "-c", "pass"] and plan.env == dict(os.environ)
    assert capsys.readouterr().err.count("\n") == 1


# --- a grid of node processes ------------------------------------------------------------------


class Grid:
    def __init__(self, tmp, run_dir, env, procs, session) -> None:
        self.tmp, self.run_dir, self.env, self.procs, self.session = tmp, run_dir, env, procs, session

    def front_door(self, node: str) -> str:
        return call(str(self.run_dir / f"{node}.sock"), "status")["front_door"]

    def run(self, *argv: str, env=None, **options) -> subprocess.CompletedProcess:
        return subprocess.run(gridsock_argv("run", *argv), capture_output=True, env=env or self.env,
                              timeout=RUN_TIMEOUT_S, **options)


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("launch")
    run_dir = tmp_path_factory.mktemp("r")
    env = dict(os.environ, GRIDSOCK_RUN_DIR=str(run_dir), **STRICT_ENV)
    for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "all_proxy",
                 "no_proxy", "NO_PROXY"):
        env.pop(name, None)
    procs = Procs(tmp, env)
    try:
        _, session = start_rendezvous(procs, tmp, env)
        (tmp / "open.toml").write_text("[policy]\noutside_cluster = []\n")
        for name, cluster in (("na", "A"), ("nb", "B")):
            proc = procs.start(name, "node", "--session", str(session), "--name", name, "--cluster", cluster,
                               "--listen", "127.0.0.1:0", "--front-door", "127.0.0.1:0",
                               "--rules", str(tmp / "open.toml"))
            wait_for_line(proc, f"joined {name} ", timeout=READY_TIMEOUT_S)
        for name in ("na", "nb"):
            call(str(run_dir / f"{name}.sock"), "wait", {"present": ["na", "nb"], "settled": True,
                                                         "timeout": READY_TIMEOUT_S}, timeout=READY_TIMEOUT_S + 5)
        yield Grid(tmp, run_dir, env, procs, session)
    finally:
        procs.stop_all()


@pytest.fixture(scope="module")
def served(grid):
    """``python -m http.server`` under ``gridsock run --node nb`` (the personality and proxychains
    loaded): ``(port, payload)`` of the file ``data.bin`` it serves."""
    directory = grid.tmp / "www"
    directory.mkdir()
    payload = os.urandom(PAYLOAD_BYTES)
    (directory / "data.bin").write_bytes(payload)
    with open(grid.tmp / "http-server.log", "wb") as log:
        server = subprocess.Popen(gridsock_argv("run", "--node", "nb", "--", sys.executable, "-m", "http.server", "0",
                                                "--directory", str(directory)),
                                  stdout=subprocess.PIPE, stderr=log, env=grid.env)
    grid.procs.started.append(server)
    line = wait_for_line(server, "Serving HTTP on ", timeout=RUN_TIMEOUT_S)
    host, port = line.split()[3], int(line.split()[5])
    assert host.startswith(("24", "25"))  # nb's grid address: the personality serves the grid port
    with open(f"/proc/{server.pid}/maps") as maps:  # (gridsock run became the server: same pid)
        assert "libproxychains" in maps.read()     # and proxychains is loaded in it
    return port, payload


@needs_curl
@needs_proxychains
def test_curl_through_proxychains_fetches_byte_exact_by_grid_name(grid, served):
    port, payload = served
    for host in ("nb", "nb.grid"):
        # --noproxy '*': curl ignores the proxy variables, so only proxychains carries the connection
        done = grid.run("--node", "na", "--", CURL, "-sS", "--fail", "--noproxy", "*", f"http://{host}:{port}/data.bin")
        assert done.returncode == 0, done.stderr
        assert hashlib.sha256(done.stdout).digest() == hashlib.sha256(payload).digest() and done.stderr == b""


@needs_curl
@needs_proxychains
def test_curl_through_http_proxy_and_socks5h_variables(grid, served):
    port, payload = served
    done = grid.run("--node", "na", "--", CURL, "-sS", "--fail", f"http://nb:{port}/data.bin")  # http_proxy
    assert done.returncode == 0, done.stderr
    assert done.stdout == payload
    done = grid.run("--node", "na", "--", "sh", "-c", f'exec {CURL} -sS --fail -x "$ALL_PROXY" http://nb:{port}/data.bin')
    assert done.returncode == 0, done.stderr
    assert done.stdout == payload


PYCURL_CLIENT = """
    import hashlib, io, socket, sys
    import pycurl

    def fetch(url, noproxy):
        body = io.BytesIO()
        curl = pycurl.Curl()
        curl.setopt(pycurl.URL, url)
        curl.setopt(pycurl.WRITEDATA, body)
        if noproxy:
            curl.setopt(pycurl.NOPROXY, "*")
        curl.perform()
        assert curl.getinfo(pycurl.RESPONSE_CODE) == 200
        curl.close()
        return hashlib.sha256(body.getvalue()).hexdigest()

    port = int(sys.argv[1])
    print(fetch(f"http://nb:{port}/data.bin", noproxy=False))   # libcurl honours http_proxy
    # by grid address (the personality's answer), no proxy: libcurl's own connect(), which
    # proxychains sends to the front door
    print(fetch(f"http://{socket.gethostbyname('nb')}:{port}/data.bin", noproxy=True))
"""


@needs_proxychains
def test_a_c_extension_in_a_python_program_reaches_the_grid(grid, served):
    pytest.importorskip("pycurl")
    port, payload = served
    script = grid.tmp / "pycurl_client.py"
    script.write_text(textwrap.dedent(PYCURL_CLIENT))
    done = grid.run("--node", "na", "--", sys.executable, str(script), str(port), text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [hashlib.sha256(payload).hexdigest()] * 2
    assert done.stderr == ""


URLLIB_CLIENT = """
    import hashlib, os, sys, urllib.request

    port = int(sys.argv[1])
    url = f"http://nb:{port}/data.bin"
    print(os.environ["http_proxy"] == os.environ["https_proxy"] != "")
    print(hashlib.sha256(urllib.request.urlopen(url, timeout=60).read()).hexdigest())  # the front door
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))              # the personality
    print(hashlib.sha256(direct.open(url, timeout=60).read()).hexdigest())
"""


@needs_proxychains
def test_urllib_reaches_the_grid_with_http_proxy_and_without(grid, served):
    port, payload = served
    script = grid.tmp / "urllib_client.py"
    script.write_text(textwrap.dedent(URLLIB_CLIENT))
    done = grid.run("--node", "na", "--", sys.executable, str(script), str(port), text=True)
    assert done.returncode == 0, done.stderr
    digest = hashlib.sha256(payload).hexdigest()
    assert done.stdout.split() == ["True", digest, digest]


# Python children of a program under interception: forked workers (which share nothing of
# proxychains' but its hooks) and spawned/forkserver interpreters (which load it afresh), each
# fetching by name through the front door (http_proxy) and through the personality.
CHILDREN_CLIENT = """
    import hashlib, multiprocessing, sys, urllib.request

    def fetch(args):
        port, proxied = args
        opener = urllib.request.build_opener() if proxied else \\
            urllib.request.build_opener(urllib.request.ProxyHandler({}))
        return hashlib.sha256(opener.open(f"http://nb:{port}/data.bin", timeout=60).read()).hexdigest()

    if __name__ == "__main__":
        port = int(sys.argv[1])
        for method in ("fork", "spawn", "forkserver"):
            with multiprocessing.get_context(method).Pool(2) as pool:
                print(method, *sorted(set(pool.map(fetch, [(port, i % 2 == 0) for i in range(4)]))))
"""


@needs_proxychains
def test_python_children_forked_spawned_and_forkserver_under_interception(grid, served):
    port, payload = served
    script = grid.tmp / "children_client.py"
    script.write_text(textwrap.dedent(CHILDREN_CLIENT))
    done = grid.run("--node", "na", "--", sys.executable, str(script), str(port), text=True)
    assert done.returncode == 0, done.stderr
    digest = hashlib.sha256(payload).hexdigest()
    assert done.stdout.splitlines() == [f"{method} {digest}" for method in ("fork", "spawn", "forkserver")]


@needs_proxychains
def test_the_environment_and_the_private_configuration(grid):
    door = grid.front_door("na")
    env = dict(grid.env, no_proxy="intra.example")
    done = grid.run("--node", "na", "--", sys.executable, "-c", textwrap.dedent("""
        import json, os, stat
        conf = os.environ["PROXYCHAINS_CONF_FILE"]
        print(json.dumps({"env": {k: v for k, v in os.environ.items() if "proxy" in k.lower()},
                          "conf": conf, "mode": stat.S_IMODE(os.stat(conf).st_mode),
                          "dir_mode": stat.S_IMODE(os.stat(os.path.dirname(conf)).st_mode),
                          "text": open(conf).read(), "preload": os.environ.get("LD_PRELOAD", "")}))
    """), env=env, text=True)
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        assert seen["env"][name] == f"http://{door}"
    assert seen["env"]["ALL_PROXY"] == seen["env"]["all_proxy"] == f"socks5h://{door}"
    assert seen["env"]["no_proxy"] == "intra.example,localhost,127.0.0.1,::1"
    assert (seen["mode"], seen["dir_mode"]) == (0o600, 0o700) and "libproxychains" in seen["preload"]
    host, port = door.rsplit(":", 1)
    assert f"socks5 {host} {port}" in seen["text"] and "proxy_dns" not in seen["text"]  # a Python program
    deadline = time.monotonic() + CLEANUP_TIMEOUT_S  # (the watcher removes it once the program is gone)
    while os.path.exists(os.path.dirname(seen["conf"])):
        assert time.monotonic() < deadline, f"{seen['conf']} left behind"
        time.sleep(0.05)


@needs_proxychains
def test_the_configuration_goes_when_the_program_is_killed(grid):
    """--node: gridsock run became the program; its configuration goes when that process does."""
    proc = subprocess.Popen(gridsock_argv("run", "--node", "na", "--", "sh", "-c",
                                          'echo "$PROXYCHAINS_CONF_FILE"; exec sleep 600'),
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=grid.env)
    try:
        directory = os.path.dirname(wait_for_line(proc, "/", timeout=RUN_TIMEOUT_S))
        assert os.path.isfile(os.path.join(directory, "proxychains.conf"))
    finally:
        proc.kill()
        proc.wait(timeout=RUN_TIMEOUT_S)
        proc.stdout.close()
    deadline = time.monotonic() + CLEANUP_TIMEOUT_S
    while os.path.exists(directory):
        assert time.monotonic() < deadline, f"{directory} left behind"
        time.sleep(0.05)


def test_the_exit_status_is_passed_on(grid):
    done = grid.run("--node", "na", "--", "sh", "-c", "exit 7")
    assert done.returncode == 7, done.stderr
    done = grid.run("--node", "na", "--", "no-such-program-here", text=True)
    assert done.returncode == 2 and "no program 'no-such-program-here'" in done.stderr, done.stderr


def test_without_proxychains_a_python_program_runs_and_any_other_is_refused(grid, tmp_path):
    empty = tmp_path / "bin"
    empty.mkdir()
    (empty / "sh").symlink_to(shutil.which("sh"))
    env = dict(grid.env, PATH=str(empty))
    done = grid.run("--node", "na", "--", "sh", "-c", "exit 0", env=env, text=True)
    assert done.returncode == 2
    assert "proxychains4" in done.stderr and "Debian package proxychains4" in done.stderr, done.stderr
    done = grid.run("--node", "na", "--", sys.executable, "-c", "import os; print(os.environ['http_proxy'])",
                    env=env, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"http://{grid.front_door('na')}"
    [note] = done.stderr.splitlines()
    assert note.startswith("gridsock run: proxychains4") and "Debian package proxychains4" in note


def test_no_intercept_runs_the_program_as_is(grid):
    """``--no-intercept`` (args.no_intercept): neither proxychains nor the proxy variables."""
    done = subprocess.run([sys.executable, "-c", textwrap.dedent("""
        import argparse, sys
        from gridsock.launch import run_command
        sys.exit(run_command(argparse.Namespace(program=["--", "sh", "-c", sys.argv[1]], node="na", session=None,
                                                name=None, no_intercept=True)))
    """), 'test -z "$http_proxy$LD_PRELOAD$PROXYCHAINS_CONF_FILE" && test -n "$GRIDSOCK_AGENT"'],
        capture_output=True, text=True, env=grid.env, timeout=RUN_TIMEOUT_S)
    assert done.returncode == 0, done.stderr


@needs_curl
@needs_proxychains
def test_a_node_of_its_own(grid, served):
    port, payload = served
    # (the leader of a cluster of its own: A belongs to its leader)
    own = ("--session", str(grid.session), "--name", "nown", "--cluster", "N", "--listen", "127.0.0.1:0")
    done = grid.run(*own, "--front-door", "127.0.0.1:0", "--", "sh", "-c",
                    f'echo "$PROXYCHAINS_CONF_FILE" >&2; exec {CURL} -sS --fail --noproxy "*" http://nb:{port}/data.bin')
    assert done.returncode == 0, done.stderr
    assert done.stdout == payload
    conf = done.stderr.decode().splitlines()[0]
    assert conf.endswith("proxychains.conf") and not os.path.exists(os.path.dirname(conf))

    done = grid.run(*own, "--front-door", "off", "--", "sh", "-c", "true", text=True)
    assert done.returncode == 2 and "serves no front door" in done.stderr, done.stderr
