"""The README's Quick start, run in the lab as written.

Every command of the Quick start's block runs in the lab host it belongs to: the host its comment
names, else the host of the node it names (``--name``, ``--node``, ``--from``), the rendez-vous
host for ``session new`` and ``rendezvous``. Daemons (``rendezvous``, ``node``, the
``http.server`` servers, ``expose`` and ``forward``) run in the background, each waited for on
the line it prints when ready. Then the end-to-end
check of the same section: ``gridsock echo`` and ``gridsock transfer`` as its text gives them.
Last, the section's Python block, as a program of its own on the host its first comment names,
with the Quick start's nodes and ``http.server`` still running; what it prints is what its
comments say.

Three adaptations, to this test's lab and nothing else: the default lab's state directory
(``/run/gridsock-lab/gs-/``, in the SSH options of c1) is this lab's (its prefix is per pytest
process), ``gridsock`` is this interpreter's ``python -m gridsock``, and ``python3`` on PATH is
this interpreter (the one gridsock is installed in, as the README's install step makes it).
"""
from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path
from xml.etree import ElementTree

import pytest

from gridsock.testing.lab import DEFAULT_PREFIX, STATE_ROOT
from gridsock.testing.procs import gridsock_argv, stop_process, wait_for_line

pytestmark = pytest.mark.timeout(300)

README = Path(__file__).resolve().parents[2] / "README.md"
# Joining (c1 through the SSH front-end included) and one command's run take well within these.
READY_TIMEOUT_S = 60.0
COMMAND_TIMEOUT_S = 120.0


def quick_start() -> tuple[list[str], str]:
    """The Quick start's shell lines (continuations joined, comments kept) and its whole text."""
    text = README.read_text(encoding="utf-8")
    section = text[text.index("## Quick start on a real grid"):text.index("\n## The grid lab")]
    block = section[:section.index("From Python")]
    lines = [line[4:] for line in block.splitlines() if line.startswith("    ")]
    joined = "\n".join(lines).replace("\\\n", " ")
    commands = [line for line in joined.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return commands, section


def python_block() -> str:
    """The Quick start's ``python`` block (after "From Python:")."""
    text = README.read_text(encoding="utf-8")
    section = text[text.index("## Quick start on a real grid"):text.index("\n## The grid lab")]
    after = section[section.index("From Python"):]
    return after[after.index("```python\n") + len("```python\n"):after.index("\n```", after.index("```python"))] + "\n"


# A line's host, when its comment names it ("# b2", "# a2: any program").
HOST_COMMENT = re.compile(r"#\s*(rv|[abc][12])\b[^#]*$")


def host_of(argv: list[str], line: str = "") -> str:
    """The lab host a Quick start command runs on: its comment's, else the node it names."""
    named = HOST_COMMENT.search(line)
    if named is not None:
        return named.group(1)
    if argv[1] in ("session", "rendezvous"):
        return "rv"
    for option in ("--name", "--node", "--from"):
        if option in argv:
            return argv[argv.index(option) + 1]
    raise AssertionError(f"no host for {argv}")


def ready_line(argv: list[str]) -> str | None:
    """What a daemon prints once ready; None for a command that runs to its end."""
    if argv[1] == "rendezvous":
        return "rendezvous listening"
    if argv[1] == "node":
        return f"joined {argv[argv.index('--name') + 1]} "
    if "http.server" in argv:  # under gridsock run, or a plain local one
        return "Serving HTTP"
    if argv[:2] == ["gridsock", "expose"]:
        return "exposing "
    if argv[:2] == ["gridsock", "forward"]:
        return "forwarding "
    return None


def argv_of_readme(line: str) -> list[str]:
    """A README command's words (its comment dropped)."""
    return shlex.split(line, comments=True)


@pytest.fixture
def env(tmp_path):
    """The environment README commands run in (``python3`` and ``gridsock``: this interpreter's)."""
    bindir = os.path.dirname(sys.executable)
    return dict(os.environ, GRIDSOCK_RUN_DIR=str(tmp_path / "run"), PYTHONUNBUFFERED="1",
                PATH=bindir + os.pathsep + os.environ.get("PATH", ""))


@pytest.fixture
def shell(lab, tmp_path, env):
    """Runs README commands in the lab, from ``tmp_path``; stops the daemons at the end."""
    daemons: list[subprocess.Popen] = []

    def argv_of(line: str) -> list[str]:
        line = line.replace(f"{STATE_ROOT}/{DEFAULT_PREFIX}/", f"{lab.state_dir}/")
        argv = shlex.split(line, comments=True)
        assert argv[0] in ("gridsock", "python3", "curl"), line
        return argv

    def run(line: str) -> subprocess.CompletedProcess:
        argv = argv_of(line)
        ready = ready_line(argv)
        command = gridsock_argv(*argv[1:]) if argv[0] == "gridsock" else argv
        host = host_of(argv, line)
        if ready is None:
            return lab.run(host, command, cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=COMMAND_TIMEOUT_S)
        with open(tmp_path / f"daemon{len(daemons)}.log", "wb") as log:
            proc = lab.spawn(host, command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=log)
        daemons.append(proc)
        wait_for_line(proc, ready, timeout=READY_TIMEOUT_S)
        return subprocess.CompletedProcess(command, 0)

    yield run
    for proc in reversed(daemons):
        stop_process(proc)


def test_the_quick_start_runs_as_written(shell, lab, tmp_path, env):
    commands, section = quick_start()
    assert len(commands) >= 10, commands
    outputs = {}
    for line in commands:
        result = shell(line)
        assert result.returncode == 0, f"{line}\n{result.stdout}\n{result.stderr}"
        outputs[line] = result.stdout or ""
    status = next(out for line, out in outputs.items() if line.startswith("gridsock status"))
    assert re.match(r"node a2 \(member, cluster A\) id \S+: joined", status), status
    ping = next(out for line, out in outputs.items() if line.startswith("gridsock ping"))
    assert " hop(s): a2 > " in ping and ping.split(";")[0].endswith("> c1"), ping
    urlopen = next(out for line, out in outputs.items() if "urlopen" in line)
    assert urlopen == "200\n"
    # curl under gridsock run (the front door), and through expose and forward: b2's listings.
    for fetched in ("index.html", "forwarded.html"):
        assert "Directory listing for /" in (tmp_path / fetched).read_text(), fetched
    netcheck = next(out for line, out in outputs.items() if line.startswith("gridsock netcheck"))
    assert "c1" in netcheck and "gateway" in netcheck.lower(), netcheck
    picture = ElementTree.parse(tmp_path / "grid.svg").getroot()
    drawn = " ".join(picture.itertext())
    assert all(name in drawn for name in ("a1", "a2", "b1", "b2", "c1", "rendez-vous node")), drawn

    # "Check a path end to end": the two commands of its text, then the stack it names.
    echo, transfer = re.findall(r"`(gridsock (?:echo|transfer) [^`]+)`", section)
    assert echo.startswith("gridsock echo ") and transfer.startswith("gridsock transfer "), (echo, transfer)
    assert shell(echo).returncode == 0
    for line in (transfer, transfer + " --stack tls/relay"):
        assert "`--stack tls/relay`" in section
        result = shell(line)
        assert result.returncode == 0, f"{line}\n{result.stdout}\n{result.stderr}"
        assert re.fullmatch(r"67108864 bytes each way to b2:9000 over \S+: ok, .*\n", result.stdout), result.stdout
    assert " over tls/relay: ok" in result.stdout

    # "Paths and connections": the commands its text gives, as written.
    prose = " ".join(section.split())  # (a command may be cut over two lines)
    top, netcheck_line, graph = (re.search(rf"`(gridsock {what} [^`]+)`", prose).group(1)
                                 for what in ("top", "netcheck", "status --node a2 --graph"))
    for line in (netcheck_line, graph):
        result = shell(line)
        assert result.returncode == 0, f"{line}\n{result.stdout}\n{result.stderr}"
    assert "inbound" in shell(netcheck_line).stdout.lower()
    argv = argv_of_readme(top)
    viewer = lab.spawn(host_of(argv, top), gridsock_argv(*argv[1:]), cwd=tmp_path, env=env,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_for_line(viewer, "node a2", timeout=READY_TIMEOUT_S)  # its first frame's header
        viewer.send_signal(signal.SIGINT)  # "Ctrl-C ends it"
        _, stderr = viewer.communicate(timeout=COMMAND_TIMEOUT_S)
        assert viewer.returncode == 0 and b"Traceback" not in stderr, stderr
    finally:
        stop_process(viewer)

    # "From Python": the block as a program, plain CPython, on the host its first line names.
    block = python_block()
    host = re.match(r"# On (\w+)'s host", block)
    assert host is not None, block
    (tmp_path / "from_python.py").write_text(block)
    result = lab.run(host.group(1), ["python3", "from_python.py"], cwd=tmp_path, env=env, capture_output=True,
                     text=True, timeout=COMMAND_TIMEOUT_S)
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    printed = result.stdout.splitlines()
    assert printed[:2] == ["('a3', 'a1', 'rendezvous', 'c1')", "b'hello'"], result.stdout
    assert re.fullmatch(r"tls/\S+ b'HTTP/1.0 200 OK\\r\\n'", printed[2]), result.stdout
    assert printed[3:] == ["refused"], result.stdout


def lab_section() -> list[str]:
    """The shell lines of the README's "The grid lab" section."""
    text = README.read_text(encoding="utf-8")
    section = text[text.index("\n## The grid lab"):text.index("\n## Layout")]
    return [line[4:] for line in section.splitlines() if line.startswith("    gridsock ")]


def _namespaces(prefix: str) -> list[str]:
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return [line.split()[0] for line in listed.splitlines() if line.startswith(prefix)]


def test_the_grid_lab_section_runs_as_written(lab, tmp_path):
    """``gridsock lab up``, ``exec a1 ip addr`` and ``down``, as the README gives them: the lab of
    the default prefix comes up, a1 has its address, and nothing of it is left after down. (The
    ``lab`` fixture only says the lab can run here; this test makes its own.)"""
    if _namespaces(DEFAULT_PREFIX):
        pytest.skip(f"a lab of the default prefix {DEFAULT_PREFIX!r} is up here already: someone's, left alone")
    lines = lab_section()
    assert [shlex.split(line, comments=True)[1:3] for line in lines] == [["lab", "up"], ["lab", "exec"], ["lab", "down"]]
    results = []
    try:
        for line in lines:
            argv = shlex.split(line, comments=True)
            results.append(subprocess.run(gridsock_argv(*argv[1:]), capture_output=True, text=True,
                                          timeout=COMMAND_TIMEOUT_S, cwd=tmp_path))
            assert results[-1].returncode == 0, f"{line}\n{results[-1].stdout}\n{results[-1].stderr}"
            if argv[2] == "up":
                assert f"{DEFAULT_PREFIX}a1" in _namespaces(DEFAULT_PREFIX)
        assert "inet 10.1.0.11/" in results[1].stdout, results[1].stdout
        assert not _namespaces(DEFAULT_PREFIX)
    finally:
        if _namespaces(DEFAULT_PREFIX):
            subprocess.run(gridsock_argv("lab", "down"), capture_output=True, timeout=COMMAND_TIMEOUT_S)
