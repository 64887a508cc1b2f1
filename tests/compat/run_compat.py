"""CPython's own test suites under the socket personality in force mode, next to the plain run.

What it does
------------
Starts a rendez-vous node and one node on loopback (their own run directory), then runs each
suite of :data:`SUITES` twice with this interpreter's ``python -m test -v``: plainly, and under
``python -m gridsock.monkey --node NODE`` with ``GRIDSOCK_FORCE=1`` (loopback TCP through the
grid, to that node). It parses unittest's verdict of every test case and compares: a test case
that passes plainly and not patched is a *difference*. Differences listed in
``known_failures.txt`` (``test id  # why``, as gevent keeps its known failures) are expected;
any other makes the run fail, and so does a known failure that now passes (the list must
shrink when we fix one) — unless its reason starts with ``race:`` (an ordering the test assumes
and the grid only usually gives).

    python tests/compat/run_compat.py [--json OUT] [--only SUITE...]
    python tests/compat/run_compat.py --render docs/compatibility.md RESULT.json...

Every suite runs with regrtest's ``--timeout``; every process is stopped at the end.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Tuple

HERE = Path(__file__).resolve().parent
# (name, regrtest arguments). VSOCK tests hang in these sandboxes; socketserver needs "network".
SUITES: List[Tuple[str, List[str]]] = [
    ("test_socket", ["test_socket", "--ignore", "*VSOCK*"]),
    ("test_socketserver", ["-u", "network", "test_socketserver"]),
    ("test_httplib", ["test_httplib"]),
    ("test_urllib2_localnet", ["test_urllib2_localnet"]),
    ("test_xmlrpc", ["test_xmlrpc"]),
    ("test_asyncio.test_sock_lowlevel", ["test_asyncio.test_sock_lowlevel"]),
    ("test_asyncio.test_events", ["test_asyncio.test_events"]),
    # Not every build ships test_multiprocessing_spawn: its tests are installed from
    # test._test_multiprocessing into a module of ours and run with unittest (-k selects).
    ("multiprocessing connection and managers (spawn)",
     ["unittest", "-k", "TestConnection", "-k", "TestListener", "-k", "TestManager", "-k", "TestRemoteManager",
      "-k", "TestMyManager", "-k", "TestPicklingConnections"]),
]
MP_MODULE = """import test._test_multiprocessing
test._test_multiprocessing.install_tests_in_module_dict(globals(), "spawn")
"""
SUITE_TIMEOUT_S = 900  # a whole suite, hard bound (regrtest's --timeout bounds each test file)
TEST_TIMEOUT_S = 300
READY_TIMEOUT_S = 30.0
_VERDICT = re.compile(r"^(\w+) \(([\w.]+)\)(?:\n[^\n]*?)? \.\.\. (ok|FAIL|ERROR|skipped.*|expected failure|"
                      r"unexpected success)$", re.M)


def verdicts(output: str) -> Dict[str, str]:
    """test id -> "ok" / "FAIL" / "ERROR" / "skipped" ... from unittest's verbose output."""
    found = {}
    for match in _VERDICT.finditer(output):
        name, where, verdict = match.groups()
        where = where if where.endswith("." + name) else f"{where}.{name}"  # 3.9/3.10 omit the method
        found[where] = "skipped" if verdict.startswith("skipped") else verdict
    return found


def start_grid(workdir: Path, env: dict):
    def gridsock(*args, **kw):
        return [sys.executable, "-m", "gridsock", *args]

    subprocess.run(gridsock("session", "new", str(workdir / "s"), "--rendezvous", "127.0.0.1:1"), env=env,
                   check=True, stdout=subprocess.DEVNULL)
    rv = subprocess.Popen(gridsock("rendezvous", "--session", str(workdir / "s" / "session.toml"),
                                   "--listen", "127.0.0.1:0"), env=env, stdout=subprocess.PIPE,
                          stderr=open(workdir / "rv.log", "wb"), text=True)
    port = _wait_for(rv, "rendezvous listening ").rsplit(":", 1)[1]
    session = (workdir / "s" / "session.toml").read_text().replace('"127.0.0.1:1"', f'"127.0.0.1:{port}"')
    (workdir / "node.toml").write_text(session)
    for pem in (workdir / "s").glob("*.pem"):
        (workdir / pem.name).write_bytes(pem.read_bytes())
    node = subprocess.Popen(gridsock("node", "--session", str(workdir / "node.toml"), "--name", "compat",
                                     "--listen", "127.0.0.1:0"), env=env, stdout=subprocess.PIPE,
                            stderr=open(workdir / "node.log", "wb"), text=True)
    _wait_for(node, "joined compat ")
    return [node, rv]


def _wait_for(proc, prefix: str) -> str:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        if line.startswith(prefix):
            return line.strip()
    raise RuntimeError(f"{proc.args[3]} did not print {prefix!r} within {READY_TIMEOUT_S} s")


def run_suite(args: List[str], env: dict, patched: bool, workdir: Path) -> Tuple[Dict[str, str], float, str]:
    if args[0] == "unittest":  # the multiprocessing tests, from a module of ours
        (workdir / "gs_mp_spawn.py").write_text(MP_MODULE)
        env = dict(env, PYTHONPATH=os.pathsep.join(filter(None, [str(workdir), env.get("PYTHONPATH")])))
        command = ["-m", "unittest", "-v", "gs_mp_spawn"] + args[1:]
    else:
        command = ["-m", "test", "-v", "--timeout", str(TEST_TIMEOUT_S)] + args
    argv = [sys.executable] + (["-m", "gridsock.monkey", "--node", "compat"] if patched else []) + command
    started = time.monotonic()
    try:
        done = subprocess.run(argv, env=dict(env, GRIDSOCK_FORCE="1") if patched else env, capture_output=True,
                              text=True, timeout=SUITE_TIMEOUT_S)
        output = done.stdout + done.stderr
    except subprocess.TimeoutExpired as exc:
        output = (exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        output += f"\n[suite killed after {SUITE_TIMEOUT_S} s]"
    return verdicts(output), time.monotonic() - started, output


def load_known() -> Dict[str, str]:
    known = {}
    for line in (HERE / "known_failures.txt").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            test, _, why = line.partition("#")
            known[test.strip()] = why.strip()
    return known


def compare(plain: Dict[str, str], patched: Dict[str, str]) -> List[str]:
    """Test ids that pass plainly but not patched (missing from the patched run counts)."""
    return sorted(t for t, v in plain.items() if v in ("ok", "expected failure") and patched.get(t) not in
                  ("ok", "expected failure"))


def count(results: Dict[str, str]) -> Dict[str, int]:
    out = {"run": len(results)}
    for verdict in results.values():
        key = {"ok": "passed", "FAIL": "failed", "ERROR": "errors", "skipped": "skipped"}.get(verdict, "other")
        out[key] = out.get(key, 0) + 1
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--only", nargs="*", help="suite names to run")
    parser.add_argument("--render", help="write the Markdown report from RESULT.json files")
    parser.add_argument("results", nargs="*")
    args = parser.parse_args(argv)
    if args.render:
        Path(args.render).write_text(render([json.loads(Path(p).read_text()) for p in args.results]))
        return 0
    known = load_known()
    report = {"python": sys.version.split()[0], "suites": []}
    failed = False
    with tempfile.TemporaryDirectory(prefix="gscompat") as tmp:
        workdir = Path(tmp)
        env = dict(os.environ, GRIDSOCK_RUN_DIR=str(workdir / "run"), PYTHONUNBUFFERED="1")
        env.pop("GRIDSOCK_FORCE", None)
        procs = start_grid(workdir, env)
        try:
            for name, suite_args in SUITES:
                if args.only and name not in args.only:
                    continue
                plain, plain_s, _ = run_suite(suite_args, env, patched=False, workdir=workdir)
                patched, patched_s, output = run_suite(suite_args, env, patched=True, workdir=workdir)
                differences = compare(plain, patched)
                unexpected = [t for t in differences if t not in known]
                fixed = [t for t in known if t in plain and t not in differences and _suite_of(t, name)
                         and not known[t].startswith("race:")]
                report["suites"].append({"suite": name, "plain": count(plain), "patched": count(patched),
                                         "plain_s": round(plain_s, 1), "patched_s": round(patched_s, 1),
                                         "differences": {t: known.get(t, "UNEXPECTED") for t in differences},
                                         "now_passing": fixed})
                status = "ok" if not unexpected and not fixed else "FAILED"
                print(f"{name}: plain {count(plain)} patched {count(patched)} differences {len(differences)} "
                      f"unexpected {unexpected} now passing {fixed} [{status}]", flush=True)
                if unexpected and not patched:
                    print(output[-3000:], file=sys.stderr)
                failed = failed or status != "ok"
        finally:
            for proc in procs:
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                proc.stdout.close()
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 1 if failed else 0


def _suite_of(test_id: str, suite: str) -> bool:
    return test_id.startswith("test." + suite.split()[0]) or suite.startswith("multiprocessing")


def render(reports: List[dict]) -> str:
    lines = ["# Compatibility: CPython's own suites under the socket personality", "",
             "Generated by `tests/compat/run_compat.py` (tox environments `compat-py39` ... `compat-py313`): each suite run with",
             "`python -m test -v` plainly, then under `python -m gridsock.monkey` with `GRIDSOCK_FORCE=1`",
             "(loopback TCP through a real node on loopback), on the same machine, in the same run.",
             "A *difference* is a test that passes plainly and not patched; each one is listed with the",
             "reason in `tests/compat/known_failures.txt`, and the run fails on any other.", ""]
    for report in reports:
        lines += [f"## Python {report['python']}", "",
                  "| suite | plain: passed / skipped / run | patched: passed / skipped / run | differences |",
                  "|---|---|---|---|"]
        for suite in report["suites"]:
            p, q = suite["plain"], suite["patched"]
            lines.append(f"| {suite['suite']} | {p.get('passed', 0)} / {p.get('skipped', 0)} / {p['run']} | "
                         f"{q.get('passed', 0)} / {q.get('skipped', 0)} / {q['run']} | {len(suite['differences'])} |")
        lines.append("")
        for suite in report["suites"]:
            for test, why in suite["differences"].items():
                lines.append(f"- `{test}`: {why}")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
