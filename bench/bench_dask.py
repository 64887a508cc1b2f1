"""Dask over ``gridsock://`` against ``tcp://`` in the grid lab: task throughput and worker-to-worker transfers.

What it measures
----------------
Three Dask clusters side by side in one lab, each a scheduler on ``a1``, a worker ``w1`` on
``a1`` and a worker ``w2`` elsewhere, all with the plain ``dask`` command lines:

- ``tcp``: distributed's own TCP comm, no gridsock anywhere (``w2`` on ``a2``, inside cluster A:
  a path where plain TCP works);
- ``gridsock``: the same processes started through ``gridsock run --node NAME`` with
  ``--protocol gridsock`` (``w2`` on ``a2``, the same path);
- ``gridsock, a1 <-> b1``: ``w2`` on ``b1``, behind cluster B's firewall, where ``tcp://`` cannot
  go at all (for scale: what crossing clusters costs).

For each cluster, in interleaved rounds (a new order each round, so a load spike of the shared
machine hits all alike), a driver on ``a1`` measures:

1. *task throughput*: ``client.map`` of ``--tasks`` trivial tasks, until the last result is back;
2. *task round trip*: ``submit`` + ``result`` of one trivial task, one after the other;
3. *transfer*: ``w1`` makes a ``--mib`` MiB array of random float64 (incompressible), then a
   task pinned to ``w2`` takes it as an argument, so ``w2`` fetches it from ``w1``; the figure
   is ``w2``'s own account of the transfer (``Worker.transfer_incoming_log``: bytes over the
   fetch's duration), and the wall time of the dependent task next to it.

It also says what each cluster's worker-to-worker connection is: the kernel's TCP socket handed
to the worker, or a socket the node bridges to its stack (``tls/...``).

How
---
On its own lab (prefix ``gsk<pid>-``) and session (``bench/lab_helpers.LabGrid``): the rendez-vous
node on ``rv``, nodes ``a1``, ``a2`` and ``b1`` (plain ``gridsock node``, default rules: TLS is
required from outside a cluster only). Dask processes run in their node's namespace, workers
without a Nanny (``--no-nanny``, one thread each); the driver is this script (``bench_dask.py
driver``) in ``a1``'s namespace with ``$GRIDSOCK_AGENT`` set and nothing patched, so its ``tcp://``
client is distributed's, untouched. Readiness is a line a process prints, every wait is bounded,
and the lab is torn down (``Lab.down()``) whatever happens, SIGTERM included.

    python3 bench/bench_dask.py [--quick] [--out docs/benchmarks.md] [--logs DIR] [--render-only FILE]

Needs root, the lab's tools and ``gridsock[dask]``. The full run: 7 rounds, 2000 tasks,
64 MiB transfers (about three minutes here); ``--quick``: 3 rounds, 500 tasks, 16 MiB.
The results replace the section "Dask over gridsock://" of ``--out`` (the rest of the file is
kept) and go to stdout; the raw figures go to a JSON file in the temporary directory, which
``--render-only FILE`` renders again without measuring.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _machine import cpu_model  # noqa: E402
from lab_helpers import JOIN_TIMEOUT_S, LabGrid, replace_section  # noqa: E402

from gridsock.testing.lab import Lab, missing_tools  # noqa: E402
from gridsock.testing.procs import gridsock_argv  # noqa: E402

SECTION_TITLE = "## Dask over gridsock://"
# A Dask process starts (imports, listener, registration with its scheduler) within this.
DASK_READY_S = 90.0
# The driver's whole run, and any one wait inside it.
DRIVER_TIMEOUT_S = 600.0
DRIVER_WAIT_S = 120.0
# Sequential round trips per round (the median of each round is kept).
ROUND_TRIPS = 50
SCHEDULER_AT = re.compile(r"Scheduler at:\s+(\S+)")


class Plan:
    def __init__(self, rounds: int, tasks: int, mib: int) -> None:
        self.rounds, self.tasks, self.mib = rounds, tasks, mib


FULL = Plan(rounds=7, tasks=2000, mib=64)
QUICK = Plan(rounds=3, tasks=500, mib=16)

# case -> (protocol, node of w2, path description)
CASES = {
    "tcp": ("tcp", "a2", "a1 <-> a2, inside cluster A"),
    "gridsock": ("gridsock", "a2", "a1 <-> a2, inside cluster A"),
    "gridsock, a1 <-> b1": ("gridsock", "b1", "a1 (NAT) <-> b1 (firewall), across clusters"),
}


def progress(message: str) -> None:
    print(f"[bench_dask] {message}", file=sys.stderr, flush=True)


# --- the driver (runs in a1's namespace) -----------------------------------------------------------


def _inc(x):
    return x + 1


def _random_array(nbytes: int, seed: int):
    import numpy as np

    return np.random.default_rng(seed).random(nbytes // 8)


def _nbytes(array) -> int:
    return int(array.nbytes)


def _incoming(key, dask_worker=None) -> Optional[dict]:
    """``dask_worker``'s log entry of the transfer that brought ``key``, if any."""
    for entry in reversed(list(dask_worker.transfer_incoming_log)):
        if key in entry["keys"]:
            return {"total": entry["total"], "duration": entry["duration"]}
    return None


def _peer_sockets(dask_worker=None) -> Dict[str, List[str]]:
    """For each peer ``dask_worker`` holds pooled comms to: what each comm's socket is, judged
    by the descriptor itself (a socket made on it has the kernel's addresses, not the grid's)."""
    import socket

    kinds = {}
    for address, comms in dask_worker.rpc.available.items():
        found = []
        for comm in comms:
            sock = getattr(getattr(comm, "stream", None), "socket", None)
            if sock is None:
                continue
            probe = socket.socket(fileno=os.dup(sock.fileno()))
            try:
                if probe.family == socket.AF_UNIX:
                    found.append("Unix socket bridged by the node")
                elif probe.getpeername()[0].startswith("127."):
                    found.append("loopback TCP socket bridged by the node")
                else:
                    found.append("kernel TCP socket to the peer")
            finally:
                probe.close()
        kinds[address] = found
    return kinds


def run_driver(config: dict) -> int:
    """Measure every cluster of ``config["clusters"]`` in interleaved rounds; print JSON."""
    from distributed import Client, wait

    wait_s = DRIVER_WAIT_S
    clients, workers = {}, {}
    for case, address in config["clusters"].items():
        client = Client(address, timeout=wait_s)
        client.wait_for_workers(2, timeout=wait_s)
        clients[case] = client
        workers[case] = {info["name"]: a for a, info in client.scheduler_info()["workers"].items()}
    nbytes = config["mib"] << 20
    results = {case: {"tasks_per_s": [], "round_trip_ms": [], "transfer_mb_s": [], "transfer_wall_ms": []}
               for case in clients}
    seed = 0

    def transfer(case: str, record: bool) -> None:
        nonlocal seed
        client, w = clients[case], workers[case]
        seed += 1
        x = client.submit(_random_array, nbytes, seed, workers=[w["w1"]], allow_other_workers=False, pure=False)
        wait([x], timeout=wait_s)
        started = time.perf_counter()
        y = client.submit(_nbytes, x, workers=[w["w2"]], allow_other_workers=False, pure=False)
        assert y.result(timeout=wait_s) == nbytes
        wall = time.perf_counter() - started
        entry = client.run(_incoming, x.key, workers=[w["w2"]])[w["w2"]]
        assert entry is not None and entry["total"] >= nbytes, entry
        if record:
            results[case]["transfer_mb_s"].append(entry["total"] / entry["duration"] / 1e6)
            results[case]["transfer_wall_ms"].append(wall * 1e3)
        del x, y

    for case, client in clients.items():  # warm-up: connections up, code shipped
        client.gather(client.map(_inc, range(100), pure=False))
        transfer(case, record=False)
    order = list(clients)
    shuffle = random.Random(config["seed"])
    for _ in range(config["rounds"]):
        shuffle.shuffle(order)
        for case in order:
            client = clients[case]
            started = time.perf_counter()
            futures = client.map(_inc, range(config["tasks"]), pure=False)
            assert client.gather(futures) == list(range(1, config["tasks"] + 1))
            results[case]["tasks_per_s"].append(config["tasks"] / (time.perf_counter() - started))
            del futures
            trips = []
            for i in range(ROUND_TRIPS):
                started = time.perf_counter()
                assert client.submit(_inc, i, pure=False).result(timeout=wait_s) == i + 1
                trips.append(time.perf_counter() - started)
            results[case]["round_trip_ms"].append(statistics.median(trips) * 1e3)
            transfer(case, record=True)
    for case, client in clients.items():
        w2 = workers[case]["w2"]
        results[case]["w2_sockets"] = client.run(_peer_sockets, workers=[w2])[w2].get(workers[case]["w1"], [])
        results[case]["workers"] = workers[case]
        client.close()
    print(json.dumps(results))
    return 0


# --- the orchestrator ------------------------------------------------------------------------------


class Watched:
    """A process whose output a thread copies to its log, keeping the lines to wait for."""

    def __init__(self, proc: subprocess.Popen, log: Path) -> None:
        self.proc, self.lines = proc, []
        self._changed = threading.Condition()
        self._eof = False
        threading.Thread(target=self._copy, args=(log,), daemon=True).start()

    def _copy(self, log: Path) -> None:
        with open(log, "ab") as out:
            for raw in iter(self.proc.stdout.readline, b""):
                out.write(raw)
                out.flush()
                with self._changed:
                    self.lines.append(raw.decode("utf-8", "replace"))
                    self._changed.notify_all()
        with self._changed:
            self._eof = True
            self._changed.notify_all()

    def wait_for(self, pattern: re.Pattern, timeout: float = DASK_READY_S) -> re.Match:
        deadline = time.monotonic() + timeout
        with self._changed:
            seen = 0
            while True:
                for line in self.lines[seen:]:
                    seen += 1
                    match = pattern.search(line)
                    if match:
                        return match
                if self._eof:
                    raise RuntimeError(f"{self.proc.args} ended before printing {pattern.pattern!r}")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"no {pattern.pattern!r} from {self.proc.args} within {timeout} s")
                self._changed.wait(remaining)


class Bench:
    def __init__(self, lab: Lab, grid: LabGrid, workdir: Path) -> None:
        self.lab, self.grid, self.workdir = lab, grid, workdir
        self.count = 0

    def start_grid(self) -> None:
        self.grid.new_session()
        self.grid.start_rendezvous()
        for name in ("a1", "b1"):
            self.grid.start_node(name)
        self.grid.wait_joined(["a1", "b1"])
        self.grid.start_node("a2")
        self.grid.wait_joined(["a2"])
        self.grid.wait_directory(["a1", "a2", "b1"], ["a1", "a2", "b1"], timeout=JOIN_TIMEOUT_S)

    def dask(self, node: str, protocol: str, *args: str) -> Watched:
        """``dask ARGS`` in ``node``'s namespace: through ``gridsock run`` for ``gridsock``."""
        self.count += 1
        argv = [sys.executable, "-m", "dask", *args]
        if protocol == "gridsock":
            argv = gridsock_argv("run", "--node", node, "--", *argv)
        name = f"dask{self.count}-{node}"
        log = self.workdir / f"{name}.log"
        proc = self.lab.spawn(node, argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=self.grid.env)
        self.grid.procs[name] = proc
        self.grid.logs[name] = log
        return Watched(proc, log)

    def start_cluster(self, protocol: str, w2_node: str) -> str:
        """A scheduler and worker ``w1`` on a1, worker ``w2`` on ``w2_node``; the scheduler's address."""
        worker_args = ["--nthreads", "1", "--no-nanny", "--no-dashboard", "--memory-limit", "0"]
        if protocol == "tcp":
            scheduler = self.dask("a1", protocol, "scheduler", "--host", self.lab.addr("a1"), "--port", "0",
                                  "--no-dashboard")
        else:
            scheduler = self.dask("a1", protocol, "scheduler", "--protocol", "gridsock", "--port", "0",
                                  "--no-dashboard")
        address = scheduler.wait_for(SCHEDULER_AT).group(1)
        started = []
        for name, node in (("w1", "a1"), ("w2", w2_node)):
            host = ["--host", self.lab.addr(node)] if protocol == "tcp" else []
            started.append(self.dask(node, protocol, "worker", address, "--name", name, *host, *worker_args))
        for worker in started:
            worker.wait_for(re.compile("Registered to:"))
        return address

    def drive(self, clusters: Dict[str, str], plan: Plan) -> dict:
        config = {"clusters": clusters, "rounds": plan.rounds, "tasks": plan.tasks, "mib": plan.mib, "seed": 1}
        env = dict(self.grid.env, GRIDSOCK_AGENT=os.path.join(self.grid.run_dir, "a1.agent"))
        done = self.lab.run("a1", [sys.executable, str(Path(__file__).resolve()), "driver", json.dumps(config)],
                            capture_output=True, text=True, env=env, timeout=DRIVER_TIMEOUT_S)
        (self.workdir / "driver.log").write_text(done.stderr)
        if done.returncode != 0:
            raise RuntimeError(f"driver failed ({done.returncode}):\n{done.stderr[-4000:]}")
        return json.loads(done.stdout.strip().splitlines()[-1])


# --- report ----------------------------------------------------------------------------------------


def machine() -> dict:
    import dask
    import distributed
    import numpy
    import tornado

    here = Path(__file__).resolve().parent

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=here, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    return {"nproc": os.cpu_count(), "cpu": cpu_model(), "kernel": platform.release(),
            "python": platform.python_version(), "impl": platform.python_implementation(),
            "dask": dask.__version__, "distributed": distributed.__version__, "tornado": tornado.version,
            "numpy": numpy.__version__, "commit": git("rev-parse", "--short", "HEAD") or "unknown",
            "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}


def loadavg() -> str:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "?"


def _fmt(x: float) -> str:
    return f"{x:.0f}" if x >= 100 else f"{x:.1f}" if x >= 10 else f"{x:.2f}"


def render(results: dict, info: dict, argv: List[str], plan: Plan, quick: bool) -> str:
    m = results["measured"]

    def med(case: str, key: str) -> float:
        return statistics.median(m[case][key])

    def spread(case: str, key: str) -> str:
        return f"{_fmt(min(m[case][key]))}–{_fmt(max(m[case][key]))}"

    def ratio(case: str, key: str) -> str:
        return f"{med(case, key) / med('tcp', key):.2f}"

    rows = []
    for case, (protocol, node, path) in CASES.items():
        sockets = sorted(set(m[case]["w2_sockets"])) or ["?"]
        rows.append(f"| {'**' + case + '**' if case == 'gridsock' else case} | {path} | {', '.join(sockets)} "
                    f"| {_fmt(med(case, 'tasks_per_s'))} | {spread(case, 'tasks_per_s')} "
                    f"| {ratio(case, 'tasks_per_s')} "
                    f"| {_fmt(med(case, 'round_trip_ms'))} | {ratio(case, 'round_trip_ms')} "
                    f"| {_fmt(med(case, 'transfer_mb_s'))} | {spread(case, 'transfer_mb_s')} "
                    f"| {ratio(case, 'transfer_mb_s')} | {_fmt(med(case, 'transfer_wall_ms'))} |")
    g, t, x = "gridsock", "tcp", "gridsock, a1 <-> b1"

    def within(key: str) -> str:
        inside = min(m[t][key]) <= med(g, key) <= max(m[t][key])
        return "inside `tcp`'s spread" if inside else "outside `tcp`'s spread"

    direct = "kernel TCP socket to the peer" in m[g]["w2_sockets"]
    reading = (
        "**Reading.** "
        + ("Inside cluster A the grid hands each worker the kernel's TCP socket to its peer (a plain `tcp` stack: "
           "the rules ask for no TLS inside a cluster), so once a comm is up nothing of gridsock is on its data "
           "path. " if direct else
           "Inside cluster A the workers' comms went through a socket bridged by the node (see the table), so the "
           "node copies every byte. ")
        + f"Worker-to-worker transfers ran at {med(g, 'transfer_mb_s') / med(t, 'transfer_mb_s'):.2f}× `tcp://`'s "
        f"bandwidth ({within('transfer_mb_s')}) and tasks at {med(g, 'tasks_per_s') / med(t, 'tasks_per_s'):.2f}× "
        f"its throughput ({within('tasks_per_s')}). What gridsock adds is paid when a comm opens: a grid connect "
        "(a request to the agent, an assembly request to the peer's node) instead of a `connect()`; Dask pools its "
        "comms, so that is once per pair of processes, not per task. Across clusters (a1 behind NAT, b1 behind a "
        "firewall) `tcp://` cannot connect at all; gridsock's comm is TLS (the default policy outside a cluster) "
        f"over whatever method gets through, through the two nodes, and carried {_fmt(med(x, 'transfer_mb_s'))} "
        f"MB/s ({med(x, 'transfer_mb_s') / med(t, 'transfer_mb_s'):.2f}× the LAN's `tcp://`): the nodes' TLS and "
        "copying, in Python, on the same two CPUs as the workers.")
    lines = [
        SECTION_TITLE,
        "",
        "Figures of `bench/bench_dask.py` (its docstring says what and how); a run replaces this section only.",
        "",
        f"- command: `{' '.join(shlex.quote(a) for a in argv)}`" + (" (quick: fewer rounds, fewer tasks, "
                                                                    "smaller transfers)" if quick else ""),
        f"- date: {results['started']}, wall time {results['wall_s']:.0f} s",
        f"- machine: {info['nproc']} CPUs ({info['cpu']}), Linux {info['kernel']}; shared with other work: "
        f"load average {results['load_before']} before, {results['load_after']} after",
        f"- software: gridsock at `{info['commit']}`{' with uncommitted changes' if info['dirty'] else ''}, "
        f"{info['impl']} {info['python']}, dask {info['dask']}, distributed {info['distributed']}, "
        f"tornado {info['tornado']}, numpy {info['numpy']}",
        "- lab: network namespaces, veth pairs and Linux bridges on one machine, no WAN delay; nodes `a1`, `a2`, "
        "`b1` and the rendez-vous node, TLS session, default rules (TLS required from outside a cluster only)",
        "- clusters: three side by side, each a scheduler and worker `w1` on a1 and worker `w2` as the table "
        "says; `dask scheduler` / `dask worker` command lines, workers without a Nanny, one thread each; the "
        "`gridsock` ones through `gridsock run --node NAME` with `--protocol gridsock`; the driver on a1 with "
        "`$GRIDSOCK_AGENT` and nothing patched",
        "",
        f"{plan.rounds} interleaved rounds. *tasks/s*: `client.map` of {plan.tasks} trivial tasks until the last "
        f"result is back. *round trip*: median of {ROUND_TRIPS} sequential `submit` + `result` of one trivial "
        f"task (client -> scheduler -> worker and back). *transfer*: w2 fetches a {plan.mib} MiB array of "
        "random float64 from w1 (a task pinned to w2 takes it); MB/s from w2's `transfer_incoming_log` (bytes "
        "over the fetch's duration; MB = 10^6 bytes); *wall* is the dependent task's submit-to-result time. "
        "*Spread*: lowest and highest round. Ratios are of medians, against `tcp`.",
        "",
        "| case | path | w2's connection to w1 | tasks/s | spread | ÷ tcp | round trip ms | ÷ tcp "
        "| transfer MB/s | spread | ÷ tcp | transfer wall ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        reading,
    ]
    return "\n".join(lines) + "\n"


def write_section(path: Path, text: str) -> None:
    """Replace this bench's section of ``path`` (or append it), keeping everything else."""
    replace_section(path, SECTION_TITLE, text)


def _terminated(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def run_bench(argv: List[str]) -> int:
    parser = argparse.ArgumentParser(prog="bench_dask.py", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 rounds, 500 tasks, 16 MiB transfers")
    parser.add_argument("--out", default="docs/benchmarks.md", help="Markdown file whose section to replace")
    parser.add_argument("--logs", metavar="DIR", help="keep the processes' logs there")
    parser.add_argument("--prefix", default=f"gsk{os.getpid() % 10000}-", help="lab prefix (default: %(default)s)")
    parser.add_argument("--render-only", metavar="FILE", help="render the raw results a run saved, measure nothing")
    args = parser.parse_args(argv)
    if args.render_only:
        saved = json.loads(Path(args.render_only).read_text())
        text = render(saved["results"], saved["info"], saved["argv"], Plan(**saved["plan"]), saved["quick"])
        write_section(Path(args.out), text)
        print(text)
        return 0
    if os.geteuid() != 0:
        parser.error("the grid lab needs root")
    missing = missing_tools()
    if missing:
        parser.error("missing tools: " + ", ".join(f"{tool} (Debian {pkg})" for tool, pkg in missing))
    plan = QUICK if args.quick else FULL
    info = machine()
    results: dict = {"started": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                     "load_before": loadavg()}
    wall = time.perf_counter()
    workdir = Path(tempfile.mkdtemp(prefix="gridsock-bench-dask-"))
    lab = Lab(args.prefix)
    grid = LabGrid(lab, workdir)
    bench = Bench(lab, grid, workdir)
    signal.signal(signal.SIGTERM, _terminated)
    try:
        progress(f"lab {args.prefix} up")
        lab.up()
        progress("grid: rendez-vous node, a1, b1, a2")
        bench.start_grid()
        clusters = {}
        for case, (protocol, node, _) in CASES.items():
            progress(f"cluster {case}")
            clusters[case] = bench.start_cluster(protocol, node)
        progress(f"driver: {plan.rounds} rounds")
        results["measured"] = bench.drive(clusters, plan)
    except BaseException:
        print(grid.logs_tail(), file=sys.stderr)
        raise
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the teardown short
        progress("tearing down")
        try:
            grid.stop()
            lab.down()
        finally:
            if args.logs:
                Path(args.logs).mkdir(parents=True, exist_ok=True)
                for log_file in workdir.glob("*.log"):
                    shutil.copy(log_file, args.logs)
            shutil.rmtree(workdir, ignore_errors=True)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
    results["load_after"] = loadavg()
    results["wall_s"] = time.perf_counter() - wall
    command = ["python3", "bench/bench_dask.py", *argv]
    raw = Path(tempfile.gettempdir()) / f"bench_dask-{os.getpid()}.json"
    raw.write_text(json.dumps({"results": results, "info": info, "argv": command, "plan": vars(plan),
                               "quick": args.quick}))
    progress(f"raw results in {raw} (--render-only {raw} renders them again)")
    text = render(results, info, command, plan, args.quick)
    write_section(Path(args.out), text)
    print(text)
    progress(f"wrote the section {SECTION_TITLE[3:]!r} of {args.out}")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["driver"]:
        return run_driver(json.loads(argv[1]))
    return run_bench(argv)


if __name__ == "__main__":
    sys.exit(main())
