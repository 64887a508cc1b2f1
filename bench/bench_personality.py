"""Throughput of programs under the socket personality: an asyncio client next to a blocking one.

Runs on loopback, no lab: ``python bench/bench_personality.py [--mib 256] [--rounds 5] [--out
docs/benchmarks.md]`` (with ``--out``, the section "Personality: asyncio and blocking clients"
of that file is replaced).

A rendez-vous node and two nodes, ``pa`` (cluster A) and ``pb`` (cluster B), run as processes.
A sink server (a stdlib script: one thread per connection, ``recv_into`` until EOF, then it
answers the byte count) serves each path; a client process connects, sends ``--mib`` MiB in
256 KiB writes, half-closes and waits for the count. The client times from the end of its
connect to the count (interpreter start and connect excluded), and reports its connect time
apart. Clients: ``blocking`` (``socket.create_connection``, ``sendall``) and ``asyncio``
(``open_connection``, ``write`` + ``drain``, ``write_eof``).

Paths:

- ``plain``: no personality, kernel loopback TCP (the baseline).
- ``grid, tcp`` (force mode, ``GRIDSOCK_FORCE=1``, on ``pa``): client and server under
  the personality on loopback addresses, so the connection goes through the grid to the node
  itself, over a plain ``tcp`` stack: both programs hold the kernel's TCP socket.
- ``grid, tls/tcp``: server on ``pb``, client on ``pa`` (two clusters: the rules' ``tls/tcp``):
  both programs hold a loopback TCP end the node bridges to the TLS stream.

Each grid path runs the asyncio client twice: as it connects now (the connection's own socket
when the node makes it within ``NONBLOCKING_HANDOVER_S``) and with the hand-over off
(``NONBLOCKING_HANDOVER_S = 0``: bridged through a Unix socketpair end, how every non-blocking
connect went before). Cases run in interleaved rounds; MB/s = 10^6 bytes/s, median
(lowest-highest) of ``--rounds``.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import cpu_model  # noqa: E402
from gridsock.bootstrap.control import call  # noqa: E402
from lab_helpers import replace_section  # noqa: E402

TITLE = "## Personality: asyncio and blocking clients"
READY_TIMEOUT_S = 30.0
RUN_TIMEOUT_S = 300.0

SINK = """
import socket, sys, threading
server = socket.socket()
server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind((sys.argv[1], 0))
server.listen(16)
print("serving", server.getsockname()[1], flush=True)

def serve(conn):
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    total = 0
    while True:
        n = conn.recv_into(view)
        if not n:
            break
        total += n
    conn.sendall(str(total).encode())
    conn.close()

while True:
    conn, _ = server.accept()
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
"""

CLIENT = """
import asyncio, socket, sys, time
kind, host, port, nbytes, handover = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
if handover == "off":
    import gridsock.personalities.socket
    gridsock.personalities.socket.NONBLOCKING_HANDOVER_S = 0
CHUNK = bytes(256 * 1024)

def blocking():
    began = time.perf_counter()
    sock = socket.create_connection((host, port), timeout=60)
    connected = time.perf_counter()
    family = socket.AddressFamily(sock.getsockopt(socket.SOL_SOCKET, socket.SO_DOMAIN)).name
    left = nbytes
    while left:
        sock.sendall(CHUNK[:min(left, len(CHUNK))])
        left -= min(left, len(CHUNK))
    sock.shutdown(socket.SHUT_WR)
    got = int(sock.recv(100))
    done = time.perf_counter()
    sock.close()
    return got, connected - began, done - connected, family

async def asyncio_client():
    began = time.perf_counter()
    reader, writer = await asyncio.open_connection(host, port)
    connected = time.perf_counter()
    sock = writer.get_extra_info("socket")
    family = socket.AddressFamily(sock.getsockopt(socket.SOL_SOCKET, socket.SO_DOMAIN)).name
    left = nbytes
    while left:
        writer.write(CHUNK[:min(left, len(CHUNK))])
        left -= min(left, len(CHUNK))
        await writer.drain()
    writer.write_eof()
    got = int(await reader.read(100))
    done = time.perf_counter()
    writer.close()
    await writer.wait_closed()
    return got, connected - began, done - connected, family

got, connect_s, transfer_s, family = blocking() if kind == "blocking" else asyncio.run(asyncio_client())
assert got == nbytes, (got, nbytes)
print("result", connect_s, transfer_s, family, flush=True)
"""

# (label, path, client kind, handover)
CASES: List[Tuple[str, str, str, str]] = [
    ("plain socket, blocking client (baseline)", "plain", "blocking", "on"),
    ("plain socket, asyncio client", "plain", "asyncio", "on"),
    ("grid, tcp (force mode): blocking client", "tcp", "blocking", "on"),
    ("grid, tcp (force mode): asyncio client", "tcp", "asyncio", "on"),
    ("grid, tcp (force mode): asyncio client, hand-over off (bridged, as before)", "tcp", "asyncio", "off"),
    ("grid, tls/tcp (pa -> pb): blocking client", "tls", "blocking", "on"),
    ("grid, tls/tcp (pa -> pb): asyncio client", "tls", "asyncio", "on"),
    ("grid, tls/tcp (pa -> pb): asyncio client, hand-over off (bridged, as before)", "tls", "asyncio", "off"),
]


def _gridsock(*args: str) -> List[str]:
    return [sys.executable, "-m", "gridsock", *args]


def _wait_for(proc: subprocess.Popen, prefix: str) -> str:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        line = proc.stdout.readline() if proc.stdout else ""
        if not line:
            break
        if line.startswith(prefix):
            return line.strip()
    raise RuntimeError(f"{proc.args!r} did not print {prefix!r} within {READY_TIMEOUT_S} s")


class Grid:
    """A rendez-vous node and nodes pa (cluster A) and pb (cluster B), on loopback."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.env = dict(os.environ, GRIDSOCK_RUN_DIR=str(workdir / "run"), PYTHONUNBUFFERED="1")
        self.env.pop("GRIDSOCK_FORCE", None)
        self.procs: List[subprocess.Popen] = []

    def start(self) -> None:
        session = self.workdir / "s"
        subprocess.run(_gridsock("session", "new", str(session), "--rendezvous", "127.0.0.1:1"), env=self.env,
                       check=True, stdout=subprocess.DEVNULL)
        rv = self._popen(_gridsock("rendezvous", "--session", str(session / "session.toml"), "--listen",
                                   "127.0.0.1:0"), "rv")
        port = _wait_for(rv, "rendezvous listening ").rsplit(":", 1)[1]
        text = (session / "session.toml").read_text().replace('"127.0.0.1:1"', f'"127.0.0.1:{port}"')
        (session / "session.toml").write_text(text)
        for name, cluster in (("pa", "A"), ("pb", "B")):
            node = self._popen(_gridsock("node", "--session", str(session / "session.toml"), "--name", name,
                                         "--cluster", cluster, "--listen", "127.0.0.1:0"), name)
            _wait_for(node, f"joined {name} ")
        for name in ("pa", "pb"):  # both see both, their routes settled
            call(str(self.workdir / "run" / f"{name}.sock"), "wait", {"present": ["pa", "pb"], "settled": True,
                                                                     "timeout": READY_TIMEOUT_S},
                 timeout=READY_TIMEOUT_S + 5)

    def _popen(self, argv: List[str], name: str, env: Optional[dict] = None) -> subprocess.Popen:
        proc = subprocess.Popen(argv, env=env or self.env, stdout=subprocess.PIPE,
                                stderr=open(self.workdir / f"{name}.log", "wb"), text=True)
        self.procs.append(proc)
        return proc

    def program(self, node: Optional[str], force: bool = False) -> Tuple[List[str], dict]:
        """argv prefix and environment of a program on ``node`` (None: no personality)."""
        env = dict(self.env, GRIDSOCK_FORCE="1") if force else self.env
        return ([sys.executable] if node is None else [sys.executable, "-m", "gridsock.monkey", "--node", node]), env

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if proc.stdout:
                proc.stdout.close()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", help="replace this bench's section of this Markdown file")
    parser.add_argument("--paths", nargs="*", default=["plain", "tcp", "tls"], help="paths to measure (plain, tcp, tls)")
    args = parser.parse_args(argv)
    cases = [case for case in CASES if case[1] in args.paths]
    nbytes = args.mib << 20
    began = time.monotonic()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="gsbench") as tmp:
        workdir = Path(tmp)
        (workdir / "sink.py").write_text(textwrap.dedent(SINK))
        (workdir / "client.py").write_text(textwrap.dedent(CLIENT))
        grid = Grid(workdir)
        try:
            grid.start()
            # path -> (client node, server node, host the server binds, host the client connects to, force)
            layout = {"plain": (None, None, "127.0.0.1", "127.0.0.1", False),
                      "tcp": ("pa", "pa", "127.0.0.1", "127.0.0.1", True),
                      "tls": ("pa", "pb", "", "pb", False)}
            ports: Dict[str, int] = {}
            for path, (_, server_node, bind, _, force) in layout.items():
                prefix, env = grid.program(server_node, force)
                sink = grid._popen(prefix + [str(workdir / "sink.py"), bind], f"sink-{path}", env)
                ports[path] = int(_wait_for(sink, "serving ").split()[1])
            results: Dict[str, List[Tuple[float, float, str]]] = {label: [] for label, *_ in cases}
            for _ in range(args.rounds):
                for label, path, kind, handover in cases:
                    client_node, _, _, host, force = layout[path]
                    prefix, env = grid.program(client_node, force)
                    done = subprocess.run(prefix + [str(workdir / "client.py"), kind, host, str(ports[path]),
                                                    str(nbytes), handover],
                                          env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
                    line = next((x for x in done.stdout.splitlines() if x.startswith("result ")), None)
                    if done.returncode != 0 or line is None:
                        raise RuntimeError(f"{label}: {done.stderr[-2000:]}")
                    connect_s, transfer_s = map(float, line.split()[1:3])
                    family = line.split()[3]
                    results[label].append((nbytes / transfer_s / 1e6, connect_s * 1000, family))
                    print(f"{label}: {results[label][-1][0]:.0f} MB/s, connect {connect_s * 1000:.1f} ms, {family}",
                          flush=True)
        finally:
            grid.stop()
    text = render(cases, results, args, time.monotonic() - began, load_before, os.getloadavg())
    print(text)
    if args.out:
        replace_section(Path(args.out), TITLE, text)
    return 0


def render(cases: List[Tuple[str, str, str, str]], results: Dict[str, List[Tuple[float, float, str]]], args, wall_s: float,
           load_before, load_after) -> str:
    def median_of(label: str) -> float:
        return statistics.median(r[0] for r in results[label])

    rows = []
    for label, path, kind, _ in cases:
        rates = [r[0] for r in results[label]]
        connects = [r[1] for r in results[label]]
        baseline = median_of(next(lab for lab, p, k, _ in cases if p == path and k == "blocking"))
        unix = sum(r[2] == "AF_UNIX" for r in results[label])
        rows.append(f"| {label} | {statistics.median(rates):.0f} ({min(rates):.0f}–{max(rates):.0f}) | "
                    f"{statistics.median(rates) / baseline:.2f} | {statistics.median(connects):.1f} | "
                    f"{unix} of {len(rates)} |")
    head = textwrap.dedent(f"""\
        {TITLE}

        `python bench/bench_personality.py --mib {args.mib} --rounds {args.rounds}` (no lab; the module docstring
        says what and how): one client process per run sends {args.mib} MiB to a sink server over each path, a
        blocking client and an asyncio client side by side, {args.rounds} interleaved rounds. MB/s = 10^6 bytes/s
        of the transfer (connect excluded), median (lowest–highest); *÷ blocking*: the median over that of the
        blocking client on the same path. Connect: median ms from `connect` called to connected. *Bridged*: runs
        whose socket was a Unix socketpair end the node bridges (the non-blocking path when the connection took
        longer than the hand-over time, or with it off); otherwise the program held a TCP socket.
        Python {platform.python_version()}, {cpu_model()}, a shared 2-core machine (load average
        {' '.join(f'{x:.2f}' for x in load_before)} before, {' '.join(f'{x:.2f}' for x in load_after)} after);
        wall time {wall_s:.0f} s.

        | client, path | MB/s | ÷ blocking | connect ms | bridged |
        |---|---|---|---|---|
        """)
    return head + "\n".join(rows) + "\n"


if __name__ == "__main__":
    sys.exit(main())
