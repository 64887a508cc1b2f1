"""``python -m gridsock.monkey --node NAME``: the launcher patches before the program, importing nothing heavy.

The launcher finds the agent socket of node NAME in the run directory (:func:`gridsock.names.run_dir`).
Nothing here talks to an agent: making the personality's client does not connect, and the script
run under it only looks at its own interpreter.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from gridsock.bootstrap import control
from gridsock.names import run_dir

pytestmark = pytest.mark.timeout(120)

# The launched interpreter (start and a three-line script) finishes within this.
SCRIPT_TIMEOUT_S = 60.0
# What the application must not find imported when its first line runs: ssl binds socket names
# of its own at import (they would keep the originals), and gevent is the node's, not the program's.
HEAVY = ("gevent", "greenlet", "ssl", "_ssl")

SCRIPT = textwrap.dedent("""\
    import json, os, socket, sys
    heavy = sorted(m for m in sys.modules if m.split(".")[0] in {heavy!r})
    print(json.dumps({{"heavy": heavy, "socket": socket.socket.__name__, "agent": os.environ.get("GRIDSOCK_AGENT")}}))
    """)


def test_run_dir_lives_in_names_and_control_reexports_it(monkeypatch, tmp_path):
    monkeypatch.setenv("GRIDSOCK_RUN_DIR", str(tmp_path))
    assert run_dir() == str(tmp_path)
    assert control.run_dir is run_dir
    monkeypatch.delenv("GRIDSOCK_RUN_DIR")
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)  # (a private one would be preferred)
    assert run_dir() == f"/tmp/gridsock-{os.getuid()}"


def test_launcher_with_node_imports_no_gevent_or_ssl_before_the_program(tmp_path):
    script = tmp_path / "probe.py"
    script.write_text(SCRIPT.format(heavy=HEAVY))
    env = dict(os.environ, GRIDSOCK_RUN_DIR=str(tmp_path / "run"), PYTHONWARNINGS="error", PYTHONDEVMODE="1")
    env.pop("GRIDSOCK_AGENT", None)
    done = subprocess.run([sys.executable, "-m", "gridsock.monkey", "--node", "probe", str(script)], env=env,
                          capture_output=True, text=True, timeout=SCRIPT_TIMEOUT_S)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""  # no warning (one names modules that bound socket names before the patch)
    seen = json.loads(done.stdout)
    assert seen == {"heavy": [], "socket": "GridSocket", "agent": str(tmp_path / "run" / "probe.agent")}
