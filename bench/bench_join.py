"""Join storm: many nodes joining one session at once, on loopback, with real processes.

What it measures
----------------
For each scenario, every node of the grid is started at the same moment, and the bench measures:

- *joined*: until every node's uplink is up (``wait_joined``);
- *converged*: until every node's directory holds every node of the grid (``len(directory)``
  equals the grid's size: everyone sees everyone);
- the rendez-vous process's peak resident memory (``VmHWM`` of /proc/PID/status) and the CPU it
  used (user + system, from /proc/PID/stat), both read just before it is stopped;
- the workers' CPU (summed), and how long the rendez-vous process and the workers were
  runnable but waiting for a CPU (/proc/PID/task/*/schedstat): on a machine shared with other
  work, a run whose processes waited much longer than they ran measured the machine's load.

Scenarios (``--scenarios``): ``leaders:N`` (N leaders of no cluster, each its own leader),
``clusters:CxM`` (C clusters, each a leader and M members; C*(M+1) nodes; members reach their
leader over loopback TCP and enroll through it), and ``raw:N``: N leaders driven by hand with
the wire protocol (each makes its key and CSR before the start, then enrolls with the join
token, links with mutual TLS, says ``Hello`` as a leader advertising no address, and decodes
every ``DirectoryUpdate`` as a leader does), which leaves out what a real node costs its own
process (TLS contexts, its node port, answering the dial-back): on a 2-core machine where the
nodes share the cores with the rendez-vous node, that isolates the rendez-vous node's part.

How
---
Realistic, as far as one 2-core machine allows: the rendez-vous node runs in a process of its
own (``RendezvousNode``, TLS session, loopback); the nodes are real ``Node`` objects (enrollment
with the join token, key and CSR, mutual TLS, node port answering the rendez-vous node's
dial-back), spread over ``--workers`` worker processes, one gevent hub each (``loop="caller"``;
no control, agent, metrics or front-door sockets). The workers make their nodes first, say
``ready``, and start them all when the parent writes ``go`` to every worker at once; then they
report when all their nodes have joined and when all their nodes see everyone. Times are from
the moment ``go`` was written; a scenario that has not converged after ``--timeout`` seconds is
reported with how far it got. Every wait is bounded; the processes the bench starts are ended by
their pids when a scenario ends.

    python3 bench/bench_join.py [--scenarios leaders:200,leaders:1000,clusters:20x50]
                                [--workers 4] [--timeout 120] [--before DIR] [--progress S]
                                [--profile-rv FILE.pstats] [--profile-workers DIR] [--json FILE]

The results are printed as a Markdown table (for docs/benchmarks.md) and, with ``--json``,
written as JSON. ``--before DIR`` runs each scenario twice, side by side in one run: first
with the gridsock of DIR (a checkout of another version, e.g. ``git worktree add DIR HEAD``;
its processes get it through PYTHONPATH), then with this one. ``--profile-rv`` runs the
rendez-vous process under cProfile (the last scenario's profile is kept) and prints its top
functions; ``--profile-workers DIR`` runs each worker under cProfile (DIR/workerN.pstats).
A worker logs its progress every ``--progress`` seconds and, at the end, its nodes'
directory counters (updates, snapshots and entries received, entries changed) in its log
(``--keep`` keeps the logs).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _machine import cpu_model  # noqa: E402

# A worker polls its nodes this often while it waits for them to join and converge.
POLL_INTERVAL_S = 0.1
# Time for a worker to make its nodes (keys are made at start, so this is quick) and for the
# rendez-vous process to listen.
READY_TIMEOUT_S = 120.0
# After a scenario, time for the processes to end on SIGTERM before they are killed.
EXIT_TIMEOUT_S = 10.0
DEFAULT_SCENARIOS = "leaders:200,leaders:1000,clusters:20x50"


def _runqueue_wait_s(pid: int) -> float:
    """Seconds the threads of process ``pid`` have spent runnable but waiting for a CPU
    (/proc/PID/task/*/schedstat, second field): on a shared machine, how much others' work
    held this process back; NaN where the kernel does not say."""
    total = 0
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                total += int(f.read().split()[1])
    except (OSError, IndexError, ValueError):
        return float("nan")
    return total / 1e9


# --- the rendez-vous process --------------------------------------------------------------------

def _proc_status(pid: int) -> Dict[str, int]:
    """Peak and current RSS (bytes) and CPU seconds of process ``pid``."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmHWM:", "VmRSS:")):
                key, value = line.split(":", 1)
                out[key] = int(value.split()[0]) * 1024
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    out["cpu_s"] = (int(fields[11]) + int(fields[12])) / ticks  # utime, stime
    return out


def rendezvous_main(args) -> None:
    import gevent
    import gevent.event
    import logging

    from gridsock.bootstrap.rendezvous import RendezvousNode
    from gridsock.session import Session

    logging.basicConfig(level=logging.INFO if args.rv_info else logging.WARNING,
                        format="rv %(relativeCreated)d %(levelname)s %(name)s: %(message)s")
    profiler = None
    if args.profile_rv:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    if args.rv_link_timeout:
        # Diagnostic: the rendez-vous node's leader links wait this long for a silent peer
        # (LINK_TIMEOUT_S otherwise), to tell link drops under load from the rest.
        from gridsock.bootstrap import link as link_module

        defaults = list(link_module.Link.__init__.__kwdefaults__.items())
        link_module.Link.__init__.__kwdefaults__.update(timeout_s=args.rv_link_timeout)
        assert ("timeout_s", link_module.LINK_TIMEOUT_S) in defaults
    session = Session.load(args.session)
    rv = RendezvousNode(session, listen_address="127.0.0.1:0", control="").start()
    stop = gevent.event.Event()
    gevent.signal_handler(signal.SIGTERM, stop.set)
    print(f"port {rv.address.port}", flush=True)
    stop.wait()
    if profiler is not None:
        profiler.disable()
        profiler.dump_stats(args.profile_rv)
    print(f"directory {len(rv.directory)} leaders {len(rv.leaders)}", flush=True)
    os._exit(0)


# --- a worker process ---------------------------------------------------------------------------

def raw_worker_main(args) -> None:
    """Hand-driven leaders (``raw:N``): see the module docstring."""
    import gevent
    import logging

    from gridsock import wire
    from gridsock.bootstrap.link import read_message, send_message
    from gridsock.bootstrap.transport import Address, dial, tls_client
    from gridsock.session import Identity, Session, client_context, new_node_key

    logging.basicConfig(level=logging.WARNING, format=f"w{args.index} %(levelname)s %(name)s: %(message)s")
    session = dataclasses.replace(Session.load(args.session), rendezvous_port=args.rv_port)
    plan = json.loads(args.plan)
    keys = [(name, new_node_key()) for name, _ in plan]
    anonymous = client_context(session, None)
    target = Address(host=session.rendezvous_host, port=args.rv_port)
    held: Dict[str, set] = {}
    joined: Dict[str, bool] = {}
    failures = [0]

    def leader(name: str, key_pem: bytes, csr_pem: bytes) -> None:
        context = None
        while True:  # (retries like a node's uplink, keeping its identity, until the worker ends)
            try:
                if context is None:
                    sock = tls_client(dial(target, timeout=10.0), anonymous, timeout=10.0)
                    try:
                        send_message(sock, wire.Enroll(token=session.join_token, csr_pem=csr_pem.decode(), name=name))
                        reply = read_message(sock, wire.Decoder(), timeout=10.0)
                    finally:
                        sock.close()
                    context = client_context(session, Identity(reply.cert_pem.encode(), key_pem))
                sock = tls_client(dial(target, timeout=10.0), context, timeout=10.0)
                send_message(sock, wire.Hello(name=name, cluster=None, role="leader"))
                decoder = wire.Decoder()
                welcome = read_message(sock, decoder, timeout=10.0)
                assert isinstance(welcome, wire.Welcome), welcome
                joined[name] = True
                ids: set = set()
                pending: Optional[set] = None
                while True:
                    data = sock.recv(256 * 1024)
                    if not data:
                        raise ConnectionError("closed")
                    decoder.feed(data)
                    while (message := decoder.next_message()) is not None:
                        if isinstance(message, wire.Ping):
                            send_message(sock, wire.Pong(message.nonce))
                        elif isinstance(message, wire.DirectoryUpdate):
                            if message.snapshot:
                                pending = set()
                            if pending is not None:
                                pending.update(e.node_id for e in message.joined)
                                if not message.more:
                                    ids, pending = pending, None
                            else:
                                ids.difference_update(message.left)
                                ids.update(e.node_id for e in message.joined)
                            held[name] = ids
            except Exception as exc:
                failures[0] += 1
                joined[name] = False
                if failures[0] <= 5:
                    print(f"{name}: {exc!r}", file=sys.stderr, flush=True)
                gevent.sleep(0.5)

    print("ready", flush=True)
    if sys.stdin.readline().strip() != "go":
        os._exit(1)
    started = time.monotonic()
    greenlets = [gevent.spawn(leader, name, key_pem, csr_pem) for name, (key_pem, csr_pem) in keys]
    expect = args.expect
    names = [name for name, _ in keys]
    joined_at = converged_at = None
    deadline = started + args.timeout
    while time.monotonic() < deadline:
        now = time.monotonic()
        if joined_at is None and all(joined.get(n) for n in names):
            joined_at = now
            print(f"joined {joined_at - started:.3f}", flush=True)
        if all(len(held.get(n, ())) >= expect for n in names):
            converged_at = now
            print(f"converged {converged_at - started:.3f}", flush=True)
            break
        gevent.sleep(POLL_INTERVAL_S)
    if converged_at is None:
        sizes = sorted(len(held.get(n, ())) for n in names)
        print(f"timeout joined={sum(bool(joined.get(n)) for n in names)}/{len(names)} seeing-all="
              f"{sum(s >= expect for s in sizes)}/{len(names)} smallest={sizes[0]} median={sizes[len(sizes) // 2]} "
              f"failed attempts={failures[0]}", flush=True)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(f"cpu {usage.ru_utime + usage.ru_stime:.2f}", flush=True)
    sys.stdin.readline()
    gevent.killall(greenlets, block=False)
    os._exit(0)


def worker_main(args) -> None:
    import gevent
    import logging

    from gridsock.node import Node
    from gridsock.session import Session

    logging.basicConfig(level=logging.INFO if args.worker_info else logging.WARNING,
                        format=f"w{args.index} %(relativeCreated)d %(levelname)s %(name)s: %(message)s")
    session = dataclasses.replace(Session.load(args.session), rendezvous_port=args.rv_port)
    plan = json.loads(args.plan)  # [[leader name, [member names]], ...]
    options = dict(listen_address="127.0.0.1:0", control="", agent="", front_door=None, metrics=None, loop="caller")
    nodes: List = []
    groups = []
    for leader_name, member_names in plan:
        leader = Node(session, leader_name, cluster=leader_name.upper() if member_names else None, **options)
        nodes.append(leader)
        groups.append((leader, member_names))
    print("ready", flush=True)
    if sys.stdin.readline().strip() != "go":
        os._exit(1)
    profiler = _start_profile(args)
    started = time.monotonic()
    for leader, member_names in groups:
        leader.start()
        for name in member_names:
            member = Node(session, name, cluster=leader.cluster, leader=str(leader.address), **options)
            nodes.append(member.start())
    expect = args.expect
    joined_at = converged_at = None
    deadline = started + args.timeout
    next_progress = started + args.progress if args.progress else float("inf")
    while time.monotonic() < deadline:
        now = time.monotonic()
        if joined_at is None and all(n.joined for n in nodes):
            joined_at = now
            print(f"joined {joined_at - started:.3f}", flush=True)
        if now >= next_progress:
            next_progress += args.progress
            _progress(args.index, now - started, [n.joined for n in nodes], [len(n.directory) for n in nodes], expect)
        if all(len(n.directory) >= expect for n in nodes):
            converged_at = now
            print(f"converged {converged_at - started:.3f}", flush=True)
            break
        gevent.sleep(POLL_INTERVAL_S)
    if converged_at is None:
        sizes = sorted(len(n.directory) for n in nodes)
        print(f"timeout joined={sum(n.joined for n in nodes)}/{len(nodes)} seeing-all="
              f"{sum(s >= expect for s in sizes)}/{len(nodes)} smallest={sizes[0]} median={sizes[len(sizes) // 2]}",
              flush=True)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    _stop_profile(profiler, args)
    _print_counters(args.index, nodes)
    print(f"cpu {usage.ru_utime + usage.ru_stime:.2f}", flush=True)
    # Stay up (linked) until the parent has what it needs from the rendez-vous node.
    sys.stdin.readline()
    os._exit(0)


def _start_profile(args):
    """A running cProfile profiler if ``--profile-workers`` asks for one, else None."""
    if not args.profile_workers:
        return None
    import cProfile

    profiler = cProfile.Profile()
    profiler.enable()
    return profiler


def _stop_profile(profiler, args) -> None:
    if profiler is not None:
        profiler.disable()
        profiler.dump_stats(os.path.join(args.profile_workers, f"worker{args.index}.pstats"))


def _progress(index: int, at: float, joined: List[bool], sizes: List[int], expect: int) -> None:
    """A progress line on stderr (the worker's log): how many nodes are joined and see all."""
    sizes = sorted(sizes)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(f"w{index} progress {at:.1f} s: joined {sum(joined)}/{len(joined)}, seeing all "
          f"{sum(s >= expect for s in sizes)}, smallest {sizes[0]}, median {sizes[len(sizes) // 2]}, "
          f"cpu {usage.ru_utime + usage.ru_stime:.1f} s", file=sys.stderr, flush=True)


def _print_counters(index: int, nodes: List) -> None:
    """The directories' counters (updates and entries applied), summed over the worker's nodes,
    on stderr (the worker's log), if this version has them."""
    total: Dict[str, int] = {}
    for node in nodes:
        for key, value in getattr(node.directory, "counters", {}).items():
            total[key] = total.get(key, 0) + value
    if total:
        print(f"w{index} counters {json.dumps(total, sort_keys=True)}", file=sys.stderr, flush=True)


# --- the parent ---------------------------------------------------------------------------------

@dataclasses.dataclass
class Result:
    scenario: str
    code: str  # --labels: "before" (the --before checkout), "after" (this one); "" without --before
    nodes: int
    joined_s: Optional[float]
    converged_s: Optional[float]
    rv_peak_rss_mb: float
    rv_cpu_s: float
    workers_cpu_s: float
    # Time runnable but waiting for a CPU (others' work on a shared machine), rendez-vous
    # process and workers (summed): large next to the CPU times, the run was starved.
    rv_wait_s: float
    workers_wait_s: float
    note: str = ""


def parse_scenario(text: str) -> List[List]:
    """The plan of a scenario: ``[[leader name, [member names]], ...]``."""
    kind, _, size = text.partition(":")
    if kind in ("leaders", "raw"):
        return [[f"l{i}", []] for i in range(int(size))]
    if kind == "clusters":
        clusters, _, members = size.partition("x")
        return [[f"c{i}", [f"c{i}-m{j}" for j in range(int(members))]] for i in range(int(clusters))]
    raise SystemExit(f"unknown scenario {text!r} (leaders:N or clusters:CxM)")


class Proc:
    """A child process whose stdout lines are collected by a thread."""

    def __init__(self, argv: List[str], log_path: Path, env: Optional[Dict[str, str]] = None) -> None:
        self.log = open(log_path, "wb")
        self.popen = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log,
                                      text=True, bufsize=1, env=env)
        self.lines: List[tuple] = []
        self.cond = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            with self.cond:
                self.lines.append((time.monotonic(), line.strip()))
                self.cond.notify_all()
        with self.cond:
            self.lines.append((time.monotonic(), None))
            self.cond.notify_all()

    def wait_line(self, prefix: str, timeout: float):
        """The first line starting with ``prefix`` (any of a tuple) and when it came; None on
        timeout or exit."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                for at, line in self.lines:
                    if line is None:
                        return None
                    if line.startswith(prefix):
                        return at, line
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self.cond.wait(remaining)

    def write(self, text: str) -> None:
        try:
            assert self.popen.stdin is not None
            self.popen.stdin.write(text)
            self.popen.stdin.flush()
        except (BrokenPipeError, OSError):
            pass

    def end(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(EXIT_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        self.log.close()


def _code_env(code: Optional[str]) -> Optional[Dict[str, str]]:
    """The environment of the child processes that run the gridsock found in directory
    ``code`` (a checkout of another version, ``--before``); None: this one's."""
    if code is None:
        return None
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([code] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return env


def run_scenario(text: str, args, workdir: Path, *, code: Optional[str] = None, label: str = "") -> Result:
    from gridsock.session import create_session

    plan = parse_scenario(text)
    total = sum(1 + len(members) for _, members in plan)
    sdir = workdir / (text.replace(":", "-") + (f"-{label}" if label else ""))
    env = _code_env(code)
    session_dir = sdir / "session"
    create_session(session_dir, "127.0.0.1:1")
    me = [sys.executable, str(Path(__file__).resolve())]
    rv_argv = me + ["--role", "rendezvous", "--session", str(session_dir / "session.toml")]
    if args.profile_rv:
        rv_argv += ["--profile-rv", args.profile_rv]
    if args.rv_info:
        rv_argv += ["--rv-info"]
    if args.rv_link_timeout:
        rv_argv += ["--rv-link-timeout", str(args.rv_link_timeout)]
    procs: List[Proc] = []
    rv = Proc(rv_argv, sdir / "rv.log", env)
    procs.append(rv)
    try:
        got = rv.wait_line("port ", READY_TIMEOUT_S)
        if got is None:
            raise SystemExit(f"the rendez-vous process did not start (see {sdir / 'rv.log'})")
        port = int(got[1].split()[1])
        # Whole clusters to a worker, round robin (a cluster's members dial its leader in-process).
        shares: List[List] = [[] for _ in range(min(args.workers, len(plan)))]
        for i, group in enumerate(plan):
            shares[i % len(shares)].append(group)
        workers = []
        for i, share in enumerate(shares):
            role = "raw-worker" if text.startswith("raw:") else "worker"
            argv = me + ["--role", role, "--index", str(i), "--session", str(session_dir / "session.toml"),
                         "--rv-port", str(port), "--plan", json.dumps(share), "--expect", str(total),
                         "--timeout", str(args.timeout), "--progress", str(args.progress)]
            if args.worker_info:
                argv += ["--worker-info"]
            if args.profile_workers:
                os.makedirs(args.profile_workers, exist_ok=True)
                argv += ["--profile-workers", args.profile_workers]
            workers.append(Proc(argv, sdir / f"worker{i}.log", env))
        procs.extend(workers)
        for w in workers:
            if w.wait_line("ready", READY_TIMEOUT_S) is None:
                raise SystemExit(f"a worker did not get ready (see {sdir})")
        waited_before = _runqueue_wait_s(rv.popen.pid), sum(_runqueue_wait_s(w.popen.pid) for w in workers)
        started = time.monotonic()
        for w in workers:
            w.write("go\n")
        joined: List[Optional[float]] = []
        converged: List[Optional[float]] = []
        notes = []
        for w in workers:
            got = w.wait_line(("converged", "timeout"), args.timeout + READY_TIMEOUT_S)
            j = w.wait_line("joined", 0)
            joined.append(j[0] - started if j else None)
            if got is not None and got[1].startswith("converged"):
                converged.append(got[0] - started)
            else:
                converged.append(None)
                notes.append(got[1] if got else "worker ended without a word")
        status = _proc_status(rv.popen.pid)
        rv_wait = _runqueue_wait_s(rv.popen.pid) - waited_before[0]
        workers_wait = sum(_runqueue_wait_s(w.popen.pid) for w in workers) - waited_before[1]
        workers_cpu = 0.0
        for w in workers:
            got = w.wait_line("cpu ", READY_TIMEOUT_S)
            workers_cpu += float(got[1].split()[1]) if got else float("nan")
        for w in workers:
            w.write("end\n")
        return Result(
            scenario=text, code=label, nodes=total,
            joined_s=max(joined) if all(j is not None for j in joined) else None,
            converged_s=max(converged) if all(c is not None for c in converged) else None,
            rv_peak_rss_mb=status["VmHWM"] / 2**20, rv_cpu_s=status["cpu_s"],
            workers_cpu_s=workers_cpu, rv_wait_s=rv_wait, workers_wait_s=workers_wait, note="; ".join(notes),
        )
    finally:
        for p in reversed(procs):
            p.end()


def render(results: List[Result], args) -> str:
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"Join storm ({when}; {platform.python_implementation()} {platform.python_version()}, "
        f"{os.cpu_count()} cores, {cpu_model()}; {args.workers} worker processes; timeout {args.timeout:g} s)",
        "",
        "| Scenario | Code | Nodes | All joined (s) | Everyone sees everyone (s) | Rendez-vous peak RSS (MB) | Rendez-vous CPU / waiting for a CPU (s) | Workers' CPU / waiting for a CPU (s) |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        fmt = lambda v: f"{v:.1f}" if v is not None else f"not within {args.timeout:g}"
        lines.append(f"| {r.scenario} | {r.code or 'this'} | {r.nodes} | {fmt(r.joined_s)} | {fmt(r.converged_s)} | "
                     f"{r.rv_peak_rss_mb:.0f} | {r.rv_cpu_s:.1f} / {r.rv_wait_s:.1f} | {r.workers_cpu_s:.1f} / {r.workers_wait_s:.1f} |")
    notes = [f"- {r.scenario}{' (' + r.code + ')' if r.code else ''}: {r.note}" for r in results if r.note]
    return "\n".join(lines + ([""] + notes if notes else []))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--scenarios", default=DEFAULT_SCENARIOS)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds a scenario may take to converge")
    parser.add_argument("--profile-rv", default=None, help="run the rendez-vous process under cProfile, stats here")
    parser.add_argument("--json", default=None)
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    parser.add_argument("--rv-link-timeout", type=float, default=None,
                        help="diagnostic: the rendez-vous node's links wait this long for a silent peer")
    parser.add_argument("--before", default=None,
                        help="a checkout of another version (a git worktree): each scenario runs with its gridsock"
                             " first, then with this one, side by side")
    parser.add_argument("--labels", default="before,after",
                        help="what the table calls the --before checkout and this one (default: before,after)")
    parser.add_argument("--profile-workers", default=None,
                        help="run each worker under cProfile, its stats in DIR/workerN.pstats")
    parser.add_argument("--progress", type=float, default=0.0,
                        help="a worker logs its progress every this many seconds (0: never)")
    parser.add_argument("--worker-info", action="store_true", help="the worker processes log at INFO (joins, links)")
    parser.add_argument("--rv-info", action="store_true", help="the rendez-vous process logs at INFO (link closes, dial-backs)")
    # Internal: the child processes.
    parser.add_argument("--role", default=None, choices=("rendezvous", "worker", "raw-worker"))
    parser.add_argument("--session")
    parser.add_argument("--rv-port", type=int)
    parser.add_argument("--index", type=int, default=0)
    parser.add_argument("--plan")
    parser.add_argument("--expect", type=int)
    args = parser.parse_args()
    if args.role == "rendezvous":
        return rendezvous_main(args)
    if args.role == "worker":
        return worker_main(args)
    if args.role == "raw-worker":
        return raw_worker_main(args)
    workdir = Path(tempfile.mkdtemp(prefix="bench-join-"))
    results = []
    try:
        for text in args.scenarios.split(","):
            before, after = args.labels.split(",", 1)
            runs = [(str(Path(args.before).resolve()), before), (None, after)] if args.before else [(None, "")]
            for code, label in runs:
                result = run_scenario(text.strip(), args, workdir, code=code, label=label)
                print(f"{result}", flush=True)
                results.append(result)
    finally:
        if args.keep:
            print(f"logs kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    print(render(results, args))
    if args.json:
        Path(args.json).write_text(json.dumps([dataclasses.asdict(r) for r in results], indent=1))
    if args.profile_rv:
        import pstats

        pstats.Stats(args.profile_rv).sort_stats("cumulative").print_stats(30)


if __name__ == "__main__":
    main()
