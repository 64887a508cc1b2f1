"""500 concurrent connections moving 1 GiB in all, none lost: grid stacks beside plain sockets.

Runs on loopback, no lab: ``python bench/bench_concurrency.py [--connections 500] [--mib 1024]
[--stacks tcp,tls/tcp,tls/relay] [--settle 6]``. Prints a Markdown section for
docs/benchmarks.md.

A rendez-vous node and two leaders run as ``gridsock`` processes (``na`` in cluster A, ``nb``
in cluster B, whose policy accepts any stack from outside its cluster). For each stack, this
process (the application) serves a grid port of ``nb`` through ``nb``'s agent, then starts
``--connections`` threads at once that each connect from ``na`` (through ``na``'s agent, the
stack named) and send their share of ``--mib`` MiB (distinct bytes per connection), then
half-close; the server reads each connection to its end and answers with the SHA-256 of what
it read, which the client compares with its own. "Lost" counts connections that failed or
whose digest differed. The same harness runs over plain loopback TCP sockets first (no grid:
``plain``), so the figures sit side by side.

Memory: the resident size (VmRSS) of the rendez-vous node and of both nodes before the burst,
at its peak (sampled every ``SAMPLE_S``) and ``--settle`` seconds after the last connection
closed (the nodes forget closed connections and trim the allocator within that: see
gridsock/memory.py).
"""
from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional

from gridsock.agentclient import AgentClient
from gridsock.bootstrap.control import call
from gridsock.testing.procs import gridsock_argv, stop_process, wait_for_line

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import cpu_model  # noqa: E402

READY_TIMEOUT_S = 60.0
# A connection of the burst connects within this and moves its share within IO_TIMEOUT_S.
CONNECT_TIMEOUT_S = 120.0
IO_TIMEOUT_S = 600.0
# The memory sampler's period.
SAMPLE_S = 0.2
# The block the connections' bytes are cut from (each connection gets its own slice).
BLOCK_BYTES = 8 * 1024 * 1024
CHUNK_BYTES = 256 * 1024


def _rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


class Sampler:
    """Peak VmRSS of some processes, sampled in a thread until stopped."""

    def __init__(self, pids: Dict[str, int]) -> None:
        self.pids = pids
        self.peak = {name: _rss_mb(pid) for name, pid in pids.items()}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_S):
            for name, pid in self.pids.items():
                self.peak[name] = max(self.peak[name], _rss_mb(pid))

    def stop(self) -> Dict[str, float]:
        self._stop.set()
        self._thread.join()
        return self.peak


class Grid:
    """The rendez-vous node and nodes ``na`` and ``nb`` as processes, under ``workdir``."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.run_dir = workdir / "run"
        self.run_dir.mkdir(mode=0o700)
        self.env = dict(os.environ, GRIDSOCK_RUN_DIR=str(self.run_dir), XDG_STATE_HOME=str(workdir / "state"),
                        PYTHONUNBUFFERED="1")
        self.procs: Dict[str, subprocess.Popen] = {}

    def start(self) -> "Grid":
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
        probe.close()
        session_dir = self.workdir / "session"
        subprocess.run(gridsock_argv("session", "new", str(session_dir), "--rendezvous", f"127.0.0.1:{port}"),
                       env=self.env, check=True, capture_output=True, timeout=READY_TIMEOUT_S)
        session = session_dir / "session.toml"
        self._start("rendezvous", "rendezvous", "--session", str(session), "--listen", f"127.0.0.1:{port}")
        wait_for_line(self.procs["rendezvous"], "rendezvous listening ", timeout=READY_TIMEOUT_S)
        rules = self.workdir / "open.toml"
        rules.write_text("[policy]\noutside_cluster = []\n")
        self._start("na", "node", "--session", str(session), "--name", "na", "--cluster", "A",
                    "--listen", "127.0.0.1:0")
        self._start("nb", "node", "--session", str(session), "--name", "nb", "--cluster", "B",
                    "--listen", "127.0.0.1:0", "--rules", str(rules))
        for name in ("na", "nb"):
            wait_for_line(self.procs[name], f"joined {name} ", timeout=READY_TIMEOUT_S)
        for name in ("na", "nb"):
            call(str(self.run_dir / f"{name}.sock"), "wait", {"present": ["na", "nb"], "timeout": READY_TIMEOUT_S},
                 timeout=READY_TIMEOUT_S + 5)
        return self

    def _start(self, name: str, *args: str) -> None:
        with open(self.workdir / f"{name}.log", "wb") as log:
            self.procs[name] = subprocess.Popen(gridsock_argv(*args), stdout=subprocess.PIPE, stderr=log,
                                                env=self.env)

    def agent(self, name: str) -> AgentClient:
        return AgentClient(str(self.run_dir / f"{name}.agent"), timeout=CONNECT_TIMEOUT_S)

    def pids(self) -> Dict[str, int]:
        return {name: proc.pid for name, proc in self.procs.items()}

    def stop(self) -> None:
        for proc in reversed(list(self.procs.values())):
            stop_process(proc)
            if proc.stdout is not None:
                proc.stdout.close()


def _serve_one(sock: socket.socket) -> None:
    try:
        with sock:
            sock.settimeout(IO_TIMEOUT_S)
            digest = hashlib.sha256()
            while True:
                data = sock.recv(CHUNK_BYTES)
                if not data:
                    break
                digest.update(data)
            sock.sendall(digest.digest())
    except OSError:  # (the client counts it lost: it gets no digest)
        pass


class Server:
    """Accepts on ``accept()`` in a thread; each connection is read to its end in a thread of
    its own and answered with the SHA-256 of its bytes."""

    def __init__(self, accept, close) -> None:
        self._accept, self._close = accept, close
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                sock = self._accept()
            except OSError:
                if self._stop.is_set():
                    return
                raise
            threading.Thread(target=_serve_one, args=(sock,), daemon=True).start()

    def stop(self) -> None:
        self._stop.set()
        self._close()


def burst(connect, connections: int, total_bytes: int) -> dict:
    """``connections`` threads at once, each ``connect()``-ing and sending its share of
    ``total_bytes``; returns the figures (seconds, connect times, lost)."""
    block = os.urandom(BLOCK_BYTES)
    shares = [total_bytes // connections + (1 if i < total_bytes % connections else 0) for i in range(connections)]
    if max(shares) > BLOCK_BYTES:
        raise SystemExit(f"each connection's share must fit in {BLOCK_BYTES} bytes: more connections or fewer MiB")
    offsets = [(i * 104729) % (BLOCK_BYTES - shares[i] + 1) for i in range(connections)]
    expected = [hashlib.sha256(memoryview(block)[o:o + n]).digest() for o, n in zip(offsets, shares)]
    start = threading.Barrier(connections + 1)
    connect_s: List[Optional[float]] = [None] * connections
    errors: List[Optional[str]] = [None] * connections

    def client(i: int) -> None:
        try:
            start.wait()
            began = time.monotonic()
            sock = connect()
            connect_s[i] = time.monotonic() - began
            with sock:
                sock.settimeout(IO_TIMEOUT_S)
                view = memoryview(block)[offsets[i]:offsets[i] + shares[i]]
                for at in range(0, len(view), CHUNK_BYTES):
                    sock.sendall(view[at:at + CHUNK_BYTES])
                sock.shutdown(socket.SHUT_WR)
                answer = b""
                while len(answer) < 32:
                    data = sock.recv(32 - len(answer))
                    if not data:
                        break
                    answer += data
            if answer != expected[i]:
                errors[i] = f"digest differs ({len(answer)} bytes of answer)"
        except Exception as exc:  # counted as lost, named in the report
            errors[i] = f"{type(exc).__name__}: {exc}"

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(connections)]
    for thread in threads:
        thread.start()
    start.wait()
    began = time.monotonic()
    for thread in threads:
        thread.join()
    seconds = time.monotonic() - began
    times = sorted(t for t in connect_s if t is not None)
    lost = [e for e in errors if e is not None]
    return {"seconds": seconds, "bytes": total_bytes, "lost": len(lost), "first_error": lost[0] if lost else None,
            "connect_p50_ms": statistics.median(times) * 1000 if times else float("nan"),
            "connect_max_ms": times[-1] * 1000 if times else float("nan")}


def run_plain(connections: int, total_bytes: int) -> dict:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(connections)
    address = listener.getsockname()
    server = Server(lambda: listener.accept()[0], listener.close)
    try:
        return burst(lambda: socket.create_connection(address, timeout=CONNECT_TIMEOUT_S), connections, total_bytes)
    finally:
        server.stop()


def run_grid(grid: Grid, stack: str, connections: int, total_bytes: int, settle_s: float) -> dict:
    listener = grid.agent("nb").listen(0)
    client = grid.agent("na")
    server = Server(lambda: listener.accept()[0], listener.release)
    pids = grid.pids()
    before = {name: _rss_mb(pid) for name, pid in pids.items()}
    sampler = Sampler(pids)
    try:
        result = burst(lambda: client.connect("nb", listener.port, stack=stack, timeout=CONNECT_TIMEOUT_S)[0],
                       connections, total_bytes)
    finally:
        peak = sampler.stop()
        server.stop()
    time.sleep(settle_s)  # (a measurement window, not a wait for readiness)
    after = {name: _rss_mb(pid) for name, pid in pids.items()}
    result["rss"] = {name: (before[name], peak[name], after[name]) for name in pids}
    return result


def render(results: Dict[str, dict], args, seconds: float) -> str:
    lines = [f"## Concurrency: {args.connections} connections at once, {args.mib} MiB in all",
             "",
             f"`python bench/bench_concurrency.py --connections {args.connections} --mib {args.mib}` "
             f"({cpu_model()}, {os.cpu_count()} cores, Python {sys.version.split()[0]}; {seconds:.0f} s in all). "
             "Each connection sends its share of distinct bytes and gets the SHA-256 of what the server read; "
             "lost: failed or wrong digest. Grid stacks go through the agents of two node processes (`na` in "
             "cluster A to `nb` in cluster B); `plain` is the same harness on loopback TCP sockets.",
             "",
             "| stack | lost | seconds | MB/s | connect p50 / max (ms) | rv MB: before / peak / after | "
             "na MB | nb MB |",
             "| --- | ---: | ---: | ---: | ---: | --- | --- | --- |"]
    for stack, res in results.items():
        rss = res.get("rss", {})

        def mem(name: str) -> str:
            if name not in rss:
                return "-"
            return " / ".join(f"{v:.0f}" for v in rss[name])

        lines.append(f"| `{stack}` | {res['lost']} | {res['seconds']:.1f} | {res['bytes'] / res['seconds'] / 1e6:.0f} | "
                     f"{res['connect_p50_ms']:.0f} / {res['connect_max_ms']:.0f} | {mem('rendezvous')} | "
                     f"{mem('na')} | {mem('nb')} |")
    errors = [(stack, res["first_error"]) for stack, res in results.items() if res["first_error"]]
    if errors:
        lines += ["", "First failure of each stack that lost connections:", ""]
        lines += [f"- `{stack}`: {error}" for stack, error in errors]
    lines += ["", f"Memory \"after\" is {args.settle:g} s after the last connection closed (VmRSS)."]
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=500)
    parser.add_argument("--mib", type=int, default=1024, help="MiB moved in all (default: 1 GiB)")
    parser.add_argument("--stacks", default="tcp,tls/tcp,tls/relay")
    parser.add_argument("--settle", type=float, default=6.0, help="seconds after the burst before memory is read")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (the nodes' logs) and say where")
    args = parser.parse_args(argv)
    began = time.monotonic()
    total = args.mib * 1024 * 1024
    results: Dict[str, dict] = {}
    print(f"plain: {args.connections} connections ...", file=sys.stderr)
    results["plain"] = run_plain(args.connections, total)
    workdir = Path(tempfile.mkdtemp(prefix="bench-conc-"))
    grid = Grid(workdir)
    try:
        grid.start()
        for stack in args.stacks.split(","):
            print(f"{stack}: {args.connections} connections ...", file=sys.stderr)
            results[stack] = run_grid(grid, stack, args.connections, total, args.settle)
    finally:
        grid.stop()
        if args.keep:
            print(f"logs: {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    print(render(results, args, time.monotonic() - began))
    return 1 if any(res["lost"] for res in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
