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

    python tests/compat/run_compat.py [--json OUT] [--only SUITE...] [--jobs N]
    python tests/compat/run_compat.py --render docs/compatibility.md RESULT.json...

Counting every test
-------------------
Verbose unittest output interleaves with what the tests' threads print (test_ssl's servers
print between a test's `` ... `` and its ``ok``), so :func:`parse_output` does not trust one
line per test: it reads every test's start line, the verdicts that follow it, the ``FAIL:`` and
``ERROR:`` headers (authoritative for failures) and unittest's own summary (``Ran N tests``,
``FAILED (failures=, errors=, skipped=)``), and cross-checks them. A test whose verdict was
lost in the interleaving is counted as passed only when the summary's counts leave nothing
else for it; any count that does not add up is a *problem*: reported, and the run fails.

Hangs
-----
A test that produces no verdict within :data:`TEST_STALL_S` is taken to hang: the run is
stopped (its whole process group), the test is recorded as ``HANG``, and the suite goes on
with the tests that have no verdict yet (regrtest's ``--ignorefile``), at most
:data:`MAX_HANGS` times per run. A process that does not exit after its summary is stopped
:data:`EXIT_GRACE_S` after it, and noted. Every process is stopped at the end.

Running in parallel
-------------------
With ``--jobs 2`` (the default) the plain runs and the patched runs go in two queues side by
side: one patched run at a time, so the node's counters tell how many grid connections each
patched run made; a patched run that made none did not test the personality, and fails.
"""
from __future__ import annotations

import argparse
import fnmatch
import importlib.util
import json
import os
import queue
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import unittest
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Suite:
    """One entry of the comparison: ``args`` for regrtest (or ``unittest`` first, see MP_MODULE);
    ``module`` must be importable for the suite to run on this Python (``None``: always)."""

    name: str
    args: Tuple[str, ...]
    module: Optional[str] = None
    grid: bool = True  # a patched run must make grid connections (False: say why in ``why``)
    why: str = ""


# VSOCK tests hang in these sandboxes; socketserver needs "network" (its servers are on loopback).
# No other resource is enabled: test_ssl's, test_imaplib's and test_smtplib's "network" tests talk
# to hosts on the Internet, which the compatibility run never addresses.
SUITES: List[Suite] = [
    Suite("test_socket", ("test_socket", "--ignore", "*VSOCK*")),
    Suite("test_socketserver", ("-u", "network", "test_socketserver")),
    Suite("test_httplib", ("test_httplib",)),
    Suite("test_urllib2_localnet", ("test_urllib2_localnet",)),
    Suite("test_xmlrpc", ("test_xmlrpc",)),
    Suite("test_asyncio.test_sock_lowlevel", ("test_asyncio.test_sock_lowlevel",)),
    Suite("test_asyncio.test_events", ("test_asyncio.test_events",)),
    # Not every build ships test_multiprocessing_spawn: its tests are installed from
    # test._test_multiprocessing into a module of ours and run with unittest (-k selects).
    Suite("multiprocessing connection and managers (spawn)",
          ("unittest", "-k", "TestConnection", "-k", "TestListener", "-k", "TestManager", "-k", "TestRemoteManager",
           "-k", "TestMyManager", "-k", "TestPicklingConnections")),
    # Issue 15: TLS servers and clients, the mail and file protocols (STARTTLS), the HTTP servers.
    Suite("test_ssl", ("test_ssl",)),
    Suite("test_ftplib", ("test_ftplib",)),
    Suite("test_smtplib", ("test_smtplib",), module="test.test_smtplib"),
    Suite("test_poplib", ("test_poplib",)),
    Suite("test_imaplib", ("test_imaplib",)),
    Suite("test_httpservers", ("test_httpservers",)),
    Suite("test_docxmlrpc", ("test_docxmlrpc",)),
    Suite("test_wsgiref", ("test_wsgiref",)),
    Suite("test_selectors", ("test_selectors",), grid=False,
          why="its sockets are socketpair()s (AF_UNIX), which the grid does not carry: it checks that the "
              "selectors work on the personality's socket objects, and makes no grid connection"),
    Suite("test_asyncio.test_streams", ("test_asyncio.test_streams",)),
    Suite("test_asyncio.test_server", ("test_asyncio.test_server",)),
    Suite("test_asyncio.test_sendfile", ("test_asyncio.test_sendfile",), module="test.test_asyncio.test_sendfile"),
    Suite("test_asyncio.test_ssl", ("test_asyncio.test_ssl",), module="test.test_asyncio.test_ssl"),
]
MP_MODULE = """import test._test_multiprocessing
test._test_multiprocessing.install_tests_in_module_dict(globals(), "spawn")
"""
SUITE_TIMEOUT_S = 900  # a whole suite, hard bound, hangs and reruns included
TEST_TIMEOUT_S = 300  # regrtest's --timeout (one test file, a backstop behind TEST_STALL_S)
TEST_STALL_S = 120  # no new test or verdict for this long: the running test hangs
MAX_HANGS = 3  # hung tests isolated per run before the run gives up on the rest
EXIT_GRACE_S = 20  # a process still alive this long after its final summary is stopped
READY_TIMEOUT_S = 30.0
STATUS_TIMEOUT_S = 30.0
NODE = "compat"

# --- parsing unittest's verbose output ---------------------------------------------------------

# A test's start: "name (id)" then " ... " (or its docstring's first line, then " ... "); at the
# start of a line, or right after a " ... " whose verdict never came (3.9's failed subtests).
_START = re.compile(r"(?:^|(?<=\.\.\. ))(\w+) \(((?:\w+\.)+\w+)\)(?:\n[^\n]*?)? \.\.\. ", re.M)
# A verdict: right after a start (same line), or a line of its own, or a subtest's line
# ("  name (id) (params) ... FAIL"), always at the end of its line.
_VERDICT = re.compile(r"(?:^|\.\.\. )(ok|FAIL|ERROR|skipped(?: .*)?|expected failure|unexpected success)$", re.M)
_HEADER = re.compile(r"^(FAIL|ERROR|UNEXPECTED SUCCESS): (\w+) \(((?:\w+\.)+\w+)\)(?: \((.*)\))?$", re.M)
_RAN = re.compile(r"^Ran (\d+) tests? in [\d.]+s\n+(OK|FAILED)(?: \(([^)\n]*)\))?$", re.M)
_FIXTURES = ("setUpClass", "tearDownClass", "setUpModule", "tearDownModule")


def _test_id(name: str, where: str) -> str:
    """unittest's description -> test id (3.9/3.10 omit the method from the parentheses)."""
    if name in _FIXTURES:
        return f"{where}.{name}"
    return where if where.endswith("." + name) else f"{where}.{name}"


@dataclass
class Parsed:
    """What :func:`parse_output` read: ``verdicts`` maps each test id to ``ok``, ``FAIL``,
    ``ERROR``, ``skipped``, ``expected failure`` or ``unexpected success``; ``summary`` sums
    unittest's summaries; ``inferred`` lists the tests whose lost verdict the counts gave
    (``ok``); ``problems`` the counts that do not add up; ``running`` the test started last
    that has no verdict (the one that hangs, if the process was stopped)."""

    verdicts: Dict[str, str] = field(default_factory=dict)
    summary: Dict[str, int] = field(default_factory=dict)
    summaries: int = 0
    inferred: List[str] = field(default_factory=list)
    problems: List[str] = field(default_factory=list)
    running: Optional[str] = None


def parse_output(output: str, skips_run: bool = True) -> Parsed:
    """Read unittest's verbose output (possibly several test files, possibly cut short).

    ``skips_run``: the Python counts the tests its skip decorators skip in "Ran N tests" (not
    3.12.1: then N may be short of the tests seen by at most the skipped ones)."""
    result = Parsed()
    starts = list(_START.finditer(output))
    headers = [(kind, _test_id(name, where)) for kind, name, where, _ in _HEADER.findall(output)]
    failed = {}
    for kind, test in headers:
        if kind in ("FAIL", "ERROR"):  # a test with both (its subtests'): ERROR
            failed[test] = "ERROR" if "ERROR" in (kind, failed.get(test)) else kind
    # The verdict events between a start and the next one belong to that test (its subtests'
    # skips, then its own verdict), or to a class fixture run between two tests (3.9 prints a
    # skipped setUpClass as a bare "skipped" line).
    skips = 0
    xfails = 0
    no_verdict: List[str] = []
    for i, start in enumerate(starts):
        name, where = start.group(1), start.group(2)
        test = _test_id(name, where)
        stop = starts[i + 1].start() if i + 1 < len(starts) else len(output)
        segment = output[start.end() - 4:stop]  # from the " ... "
        events = [m.group(1) for m in _VERDICT.finditer(segment)]
        skips += sum(1 for e in events if e.startswith("skipped"))
        xfails += sum(1 for e in events if e == "expected failure")
        if name in _FIXTURES:
            continue
        own = [e for e in events if e not in ("FAIL", "ERROR")]
        verdict = failed.get(test) or next((e for e in own if not e.startswith("skipped")), None) or (
            "skipped" if own else (events[0] if events else None))
        previous = result.verdicts.get(test)
        if previous in ("FAIL", "ERROR"):
            continue  # a test rewritten after its subtests (3.11+): the worst verdict stays
        if verdict is None:
            if previous is None:
                no_verdict.append(test)
            continue
        result.verdicts[test] = verdict
        if test in no_verdict:
            no_verdict.remove(test)
    for test, kind in failed.items():
        if test.rsplit(".", 1)[1] not in _FIXTURES and test not in result.verdicts:
            result.verdicts[test] = kind
            if test in no_verdict:
                no_verdict.remove(test)
    if no_verdict and _test_id(*starts[-1].groups()) == no_verdict[-1]:
        result.running = no_verdict[-1]  # started last, no verdict: running when the output ends

    summary = {"ran": 0, "failures": 0, "errors": 0, "skipped": 0, "expected failures": 0,
               "unexpected successes": 0}
    for ran, _, counts in _RAN.findall(output):
        result.summaries += 1
        summary["ran"] += int(ran)
        for item in filter(None, (c.strip() for c in counts.split(","))):
            key, _, value = item.partition("=")
            summary[key] = summary.get(key, 0) + int(value)
    result.summary = summary
    if not result.summaries:
        if starts:
            result.problems.append("no unittest summary (the run was stopped or crashed)")
        return result

    # Cross-checks: the FAIL:/ERROR: headers against the summary, the verdicts against "Ran N".
    for kind, key in (("FAIL", "failures"), ("ERROR", "errors")):
        seen = sum(1 for k, _ in headers if k == kind)
        if seen != summary[key]:
            result.problems.append(f"{key}: the summary says {summary[key]}, {seen} {kind}: headers found")
    counted = len(result.verdicts)
    uncounted = 0 if skips_run else sum(1 for v in result.verdicts.values() if v == "skipped")
    ran_fits = summary["ran"] <= counted + len(no_verdict) <= summary["ran"] + uncounted
    if ran_fits and skips == summary["skipped"] and xfails == summary["expected failures"]:
        for test in no_verdict:  # every failure, skip and expected failure is accounted for
            result.verdicts[test] = "ok"
            result.inferred.append(test)
        no_verdict = []
        result.running = None
    elif no_verdict or not ran_fits:
        result.problems.append(f"unittest ran {summary['ran']} tests, verdicts found for {counted}"
                               + (f" (no verdict: {', '.join(no_verdict[:5])})" if no_verdict else ""))
    if skips != summary["skipped"]:
        result.problems.append(f"skipped: the summary says {summary['skipped']}, {skips} skips found")
    return result


def _skips_run() -> bool:
    """Whether this Python's unittest counts a test its skip decorator skipped as run."""
    class Probe(unittest.TestCase):
        @unittest.skip("probe")
        def test(self):
            pass

    result = unittest.TestResult()
    Probe("test").run(result)
    return result.testsRun == 1


SKIPS_RUN = _skips_run()  # the tested Python is this one


def verdicts(output: str) -> Dict[str, str]:
    """test id -> "ok" / "FAIL" / "ERROR" / "skipped" ... from unittest's verbose output."""
    return parse_output(output).verdicts


# --- running a suite ---------------------------------------------------------------------------

@dataclass
class Run:
    """One suite run, plain or patched, hung tests isolated: what :func:`run_suite` returns."""

    verdicts: Dict[str, str]
    seconds: float
    output: str
    problems: List[str] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)
    hung: List[str] = field(default_factory=list)
    inferred: int = 0
    grid_connections: Optional[int] = None


def run_process(argv: List[str], env: dict, deadline: float) -> Tuple[str, str]:
    """Run ``argv`` in its own process group, reading its output (stdout and stderr together).

    Returns (output, how it ended): ``"exit"``; ``"stall"`` (no new test or verdict for
    TEST_STALL_S); ``"after-summary"`` (still alive EXIT_GRACE_S after its final summary, or
    something it started still holds its output EXIT_GRACE_S after it exited); ``"deadline"``.
    Whatever is left of its process group is stopped in every case."""
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True)
    chunks: List[bytes] = []
    arrived = queue.Queue()

    def pump():
        for chunk in iter(lambda: proc.stdout.read1(65536), b""):
            chunks.append(chunk)
            arrived.put(None)
        arrived.put(None)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    events = 0
    last_event = last_look = time.monotonic()
    final_at = exited_at = None
    how = "exit"
    while reader.is_alive():
        try:
            arrived.get(timeout=1.0)
        except queue.Empty:
            pass
        now = time.monotonic()
        if now - last_look < 1.0:
            continue  # look at the output once a second, not at every chunk
        last_look = now
        if proc.poll() is not None:
            # Exited, but something it started still holds the output open: bounded too.
            exited_at = exited_at or now
            if now - exited_at <= EXIT_GRACE_S:
                continue
            how = "after-summary"
            _stop_group(proc)
            break
        text = b"".join(chunks).decode(errors="replace")
        seen = len(_START.findall(text)) + len(_VERDICT.findall(text))
        if seen != events:
            events, last_event = seen, now
        if final_at is None and _is_final(text, argv):
            final_at = now
        if final_at is not None and now - final_at > EXIT_GRACE_S:
            how = "after-summary"
        elif final_at is None and now - last_event > TEST_STALL_S:
            how = "stall"
        elif now > deadline:
            how = "deadline"
        else:
            continue
        _stop_group(proc)
        break
    reader.join(timeout=10)
    proc.stdout.close()
    try:
        proc.wait(timeout=EXIT_GRACE_S)  # it closed its output: it is about to exit
    except subprocess.TimeoutExpired:
        how = "after-summary" if how == "exit" else how
    _stop_group(proc)  # what it left behind, if anything
    return b"".join(chunks).decode(errors="replace"), how


def _is_final(text: str, argv: List[str]) -> bool:
    if any(a == "-m" and b == "unittest" for a, b in zip(argv, argv[1:])):
        return bool(_RAN.search(text))
    return "\nTotal duration: " in text


def _stop_group(proc: subprocess.Popen) -> None:
    """Stop the process we started and everything it started (its own session): SIGTERM,
    then SIGKILL to whatever is left of the group."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass


def run_suite(suite: Suite, env: dict, patched: bool, workdir: Path) -> Run:
    """Run one suite; a hung test is recorded as ``HANG`` and the rest of the suite run again."""
    regrtest = suite.args[0] != "unittest"
    if regrtest:
        command = ["-m", "test", "-v", "--timeout", str(TEST_TIMEOUT_S)] + list(suite.args)
    else:  # the multiprocessing tests, from a module of ours
        (workdir / "gs_mp_spawn.py").write_text(MP_MODULE)
        env = dict(env, PYTHONPATH=os.pathsep.join(filter(None, [str(workdir), env.get("PYTHONPATH")])))
        command = ["-m", "unittest", "-v", "gs_mp_spawn"] + list(suite.args[1:])
    prefix = [sys.executable] + (["-m", "gridsock.monkey", "--node", NODE] if patched else [])
    if patched:
        env = dict(env, GRIDSOCK_FORCE="1")
    started = time.monotonic()
    deadline = started + SUITE_TIMEOUT_S
    run = Run({}, 0.0, "")
    ignore: List[str] = []
    slug = re.sub(r"\W", "_", suite.name)
    ignorefile = workdir / f"ignore-{slug}-{'patched' if patched else 'plain'}.txt"
    while True:
        argv = prefix + command + (["--ignorefile", str(ignorefile)] if ignore else [])
        output, how = run_process(argv, env, deadline)
        run.output += output
        parsed = parse_output(output, SKIPS_RUN)
        run.verdicts.update(parsed.verdicts)
        run.inferred += len(parsed.inferred)
        if how == "after-summary":
            run.notes.append(f"the process did not exit within {EXIT_GRACE_S} s of its summary: stopped")
        timed_out = "\nTimeout (" in output and not parsed.summaries  # regrtest's own --timeout
        if how == "exit" and not timed_out or how == "after-summary":
            run.problems += parsed.problems
            break
        if how == "deadline":
            run.problems.append(f"the suite did not end within {SUITE_TIMEOUT_S} s: stopped")
            break
        hung = parsed.running
        if hung is None or not regrtest or len(run.hung) >= MAX_HANGS:
            run.problems.append(f"a test hangs ({how}) and could not be isolated"
                                + (f": {hung}" if hung else "") + "; the rest of the suite was not run")
            if hung:
                run.hung.append(hung)
                run.verdicts[hung] = "HANG"
            break
        run.hung.append(hung)
        run.verdicts[hung] = "HANG"
        ignore = sorted(run.verdicts)
        ignorefile.write_text("\n".join(ignore) + "\n")
        run.notes.append(f"{hung} hangs: stopped after {TEST_STALL_S} s without a verdict; the suite goes on")
    run.seconds = time.monotonic() - started
    return run


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
    node = subprocess.Popen(gridsock("node", "--session", str(workdir / "node.toml"), "--name", NODE,
                                     "--listen", "127.0.0.1:0"), env=env, stdout=subprocess.PIPE,
                            stderr=open(workdir / "node.log", "wb"), text=True)
    _wait_for(node, f"joined {NODE} ")
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


def grid_connections(env: dict) -> int:
    """Connections the node has delivered to grid listeners so far (its status's counters)."""
    done = subprocess.run([sys.executable, "-m", "gridsock", "status", "--node", NODE, "--json"], env=env,
                          capture_output=True, text=True, timeout=STATUS_TIMEOUT_S, check=True)
    return int(json.loads(done.stdout)["assembly"]["delivered"])


def load_known() -> Dict[str, str]:
    known = {}
    for line in (HERE / "known_failures.txt").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            test, _, why = line.partition("#")
            known[test.strip()] = why.strip()
    return known


def _matches(test: str, entry: str) -> bool:
    """``entry`` is a test id, or an fnmatch pattern, or ``prefix.{a,b}`` (the ids prefix.a, prefix.b)."""
    braces = re.fullmatch(r"(.*)\{([^{}]*)\}", entry)
    if braces:
        return any(_matches(test, braces.group(1) + alt.strip()) for alt in braces.group(2).split(","))
    return test == entry or "*" in entry and fnmatch.fnmatchcase(test, entry)


def known_entry(known: Dict[str, str], test: str) -> Optional[str]:
    """The entry of known_failures.txt that lists ``test`` (see :func:`_matches`), or None."""
    return next((entry for entry in known if _matches(test, entry)), None)


def now_passing(known: Dict[str, str], plain: Dict[str, str], differences: List[str], suite: str) -> List[str]:
    """Entries of this suite whose tests ran plainly and all pass patched (then the entry goes),
    except those whose reason starts with ``race:``."""
    fixed = []
    for entry, why in known.items():
        matched = [t for t in plain if _matches(t, entry)]
        if matched and _suite_of(entry, suite) and not why.startswith("race:") \
                and not any(t in differences for t in matched):
            fixed.append(entry)
    return fixed


def compare(plain: Dict[str, str], patched: Dict[str, str]) -> List[str]:
    """Test ids that pass plainly but not patched (missing from the patched run counts)."""
    return sorted(t for t, v in plain.items() if v in ("ok", "expected failure") and patched.get(t) not in
                  ("ok", "expected failure"))


def count(results: Dict[str, str]) -> Dict[str, int]:
    out = {"run": len(results)}
    for verdict in results.values():
        key = {"ok": "passed", "FAIL": "failed", "ERROR": "errors", "skipped": "skipped",
               "HANG": "hung"}.get(verdict, "other")
        out[key] = out.get(key, 0) + 1
    return out


def available(suite: Suite) -> bool:
    return suite.module is None or importlib.util.find_spec(suite.module) is not None


def run_all(suites: List[Suite], env: dict, workdir: Path, jobs: int) -> Dict[str, Tuple[Run, Run]]:
    """Each suite plain and patched; with jobs >= 2 the plain ones run beside the patched ones
    (one patched run at a time, so that the node's counter tells each one's grid connections)."""
    plain: Dict[str, Run] = {}
    patched: Dict[str, Run] = {}

    def patched_runs():
        for suite in suites:
            before = grid_connections(env)
            run = run_suite(suite, env, True, workdir)
            run.grid_connections = grid_connections(env) - before
            patched[suite.name] = run
            _progress(suite, "patched", run)

    def plain_runs():
        for suite in suites:
            plain[suite.name] = run_suite(suite, env, False, workdir)
            _progress(suite, "plain", plain[suite.name])

    if jobs >= 2:
        other = threading.Thread(target=plain_runs)
        other.start()
        patched_runs()
        other.join()
    else:
        plain_runs()
        patched_runs()
    return {s.name: (plain[s.name], patched[s.name]) for s in suites}


def _progress(suite: Suite, how: str, run: Run) -> None:
    print(f"  {suite.name} {how}: {count(run.verdicts)} in {run.seconds:.0f} s"
          + (f", {run.grid_connections} grid connections" if run.grid_connections is not None else ""), flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--only", nargs="*", help="suite names to run")
    parser.add_argument("--jobs", type=int, default=2, help="1: one run at a time; 2: plain beside patched")
    parser.add_argument("--render", help="write the Markdown report from RESULT.json files")
    parser.add_argument("results", nargs="*")
    args = parser.parse_args(argv)
    if args.render:
        Path(args.render).write_text(render([json.loads(Path(p).read_text()) for p in args.results]))
        return 0
    known = load_known()
    suites = [s for s in SUITES if not args.only or s.name in args.only]
    unknown = set(args.only or ()) - {s.name for s in SUITES}
    if unknown:
        parser.error(f"unknown suites: {', '.join(sorted(unknown))}")
    missing = [s.name for s in suites if not available(s)]
    suites = [s for s in suites if available(s)]
    report = {"python": sys.version.split()[0], "suites": [], "not_in_this_python": missing}
    failed = False
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="gscompat") as tmp:
        workdir = Path(tmp)
        env = dict(os.environ, GRIDSOCK_RUN_DIR=str(workdir / "run"), PYTHONUNBUFFERED="1")
        env.pop("GRIDSOCK_FORCE", None)
        procs = start_grid(workdir, env)
        try:
            results = run_all(suites, env, workdir, args.jobs)
        finally:
            for proc in procs:
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                proc.stdout.close()
    for suite in suites:
        plain, patched = results[suite.name]
        differences = compare(plain.verdicts, patched.verdicts)
        listed = {t: known_entry(known, t) for t in differences}
        unexpected = [t for t in differences if listed[t] is None]
        fixed = now_passing(known, plain.verdicts, differences, suite.name)
        problems = [f"plain: {p}" for p in plain.problems] + [f"patched: {p}" for p in patched.problems]
        if suite.grid and not patched.grid_connections:
            problems.append("patched: the node delivered no grid connection: the personality was not in use")
        report["suites"].append({
            "suite": suite.name, "plain": count(plain.verdicts), "patched": count(patched.verdicts),
            "plain_s": round(plain.seconds, 1), "patched_s": round(patched.seconds, 1),
            "grid_connections": patched.grid_connections, "why": suite.why,
            "inferred": {"plain": plain.inferred, "patched": patched.inferred},
            "differences": {t: known[listed[t]] if listed[t] else "UNEXPECTED" for t in differences},
            "now_passing": fixed, "problems": problems,
            "hung": {"plain": plain.hung, "patched": patched.hung},
            "notes": [f"plain: {n}" for n in plain.notes] + [f"patched: {n}" for n in patched.notes]})
        status = "ok" if not unexpected and not fixed and not problems else "FAILED"
        print(f"{suite.name}: plain {count(plain.verdicts)} {plain.seconds:.0f} s, patched {count(patched.verdicts)} "
              f"{patched.seconds:.0f} s, {patched.grid_connections} grid connections; differences "
              f"{len(differences)} unexpected {unexpected} now passing {fixed} problems {problems} "
              f"notes {report['suites'][-1]['notes']} [{status}]", flush=True)
        if unexpected or problems:
            print(patched.output[-3000:], file=sys.stderr)
        failed = failed or status != "ok"
    report["seconds"] = round(time.monotonic() - started, 1)
    print(f"{len(suites)} suites in {report['seconds']:.0f} s; not in this Python: {missing}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 1 if failed else 0


def _suite_of(test_id: str, suite: str) -> bool:
    return test_id.startswith("test." + suite.split()[0] + ".") or suite.startswith("multiprocessing")


def render(reports: List[dict]) -> str:
    lines = ["# Compatibility: CPython's own suites under the socket personality", "",
             "Generated by `tests/compat/run_compat.py` (tox environments `compat-py39` ... `compat-py313`): each suite run with",
             "`python -m test -v` plainly, then under `python -m gridsock.monkey` with `GRIDSOCK_FORCE=1`",
             "(loopback TCP through a real node on loopback), on the same machine, in the same run.",
             "A *difference* is a test that passes plainly and not patched; each one is listed with the",
             "reason in `tests/compat/known_failures.txt`, and the run fails on any other.",
             "Every test is counted: the runner cross-checks each test's verdict against unittest's summary",
             "and `FAIL:`/`ERROR:` headers (a count that does not add up fails the run); *grid connections*",
             "are the connections the node delivered during the patched run (a patched run without any",
             "did not test the personality, and fails); a hung test is stopped, counted, and the suite goes on.",
             "Times are wall-clock seconds on a shared 2-core machine, plain runs beside patched ones (`--jobs 2`).", ""]
    for report in reports:
        lines += [f"## Python {report['python']}", "",
                  "| suite | plain: passed / skipped / run | patched: passed / skipped / run | differences "
                  "| grid connections | time plain / patched (s) |",
                  "|---|---|---|---|---|---|"]
        for suite in report["suites"]:
            p, q = suite["plain"], suite["patched"]
            lines.append(f"| {suite['suite']} | {p.get('passed', 0)} / {p.get('skipped', 0)} / {p['run']} | "
                         f"{q.get('passed', 0)} / {q.get('skipped', 0)} / {q['run']} | {len(suite['differences'])} "
                         f"| {suite.get('grid_connections', '')} | {suite['plain_s']:.0f} / {suite['patched_s']:.0f} |")
        lines.append("")
        if report.get("not_in_this_python"):
            lines += [f"Not in this Python: {', '.join(report['not_in_this_python'])}.", ""]
        if report.get("seconds"):
            lines += [f"The whole run: {report['seconds']:.0f} s.", ""]
        for suite in report["suites"]:
            if suite.get("why"):
                lines.append(f"- {suite['suite']}: {suite['why']}")
            for test, why in suite["differences"].items():
                lines.append(f"- `{test}`: {why}")
            for item in suite.get("problems", []) + suite.get("notes", []):
                lines.append(f"- {suite['suite']}: {item}")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
