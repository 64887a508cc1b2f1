"""The ``gridsock://`` Dask comm backend, with real processes on loopback nodes.

The rendez-vous node and the nodes ``na`` (cluster A) and ``nb`` (cluster B) of
``test_personality``'s ``grid`` fixture; ``dask scheduler`` and ``dask worker`` are the
unmodified command lines, started through ``gridsock run --node NAME``; clients are scripts
run under the personality, or with only ``$GRIDSOCK_AGENT`` set. Readiness is a line a process
prints (a thread copies each process's output to its log, so a chatty process never blocks on a
full pipe); every wait is bounded.
"""
from __future__ import annotations

import errno
import json
import re
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Callable, List, Optional, Union

import pytest

pytest.importorskip("distributed")

from gridsock.testing.procs import gridsock_argv, stop_process  # noqa: E402
from test_personality import grid  # noqa: E402,F401 (the fixture: the rendez-vous node, na and nb)

pytestmark = pytest.mark.timeout(180)

# A Dask process (interpreter start, imports of dask and numpy, joining the cluster) is ready
# within this, and so is a client script's work.
DASK_TIMEOUT_S = 90.0
SCHEDULER_AT = re.compile(r"Scheduler at:\s+(\S+)")
WORKER_AT = re.compile(r"Start worker at:\s+(\S+)")


class Watched:
    """A process whose output (stdout and stderr together) a thread copies to a log file,
    keeping the lines, so that a test can wait for one while the process never blocks."""

    def __init__(self, proc: subprocess.Popen, log: Path) -> None:
        self.proc, self.log = proc, Path(log)
        self.lines: List[str] = []
        self._changed = threading.Condition()
        self._eof = False
        self._thread = threading.Thread(target=self._copy, name=f"watch {proc.pid}", daemon=True)
        self._thread.start()

    def _copy(self) -> None:
        with open(self.log, "ab") as log:
            for raw in iter(self.proc.stdout.readline, b""):
                log.write(raw)
                log.flush()
                with self._changed:
                    self.lines.append(raw.decode("utf-8", "replace").rstrip("\n"))
                    self._changed.notify_all()
        with self._changed:
            self._eof = True
            self._changed.notify_all()

    def wait_for(self, match: Union[str, re.Pattern, Callable[[str], bool]], *, timeout: float = DASK_TIMEOUT_S) -> str:
        """The first line the process printed that contains ``match`` (a substring, a regular
        expression searched for, or a predicate). Raises RuntimeError if the process ends first,
        TimeoutError after ``timeout`` seconds; both quote the last lines."""
        if isinstance(match, str):
            check = lambda line: match in line  # noqa: E731
        elif isinstance(match, re.Pattern):
            check = lambda line: match.search(line) is not None  # noqa: E731
        else:
            check = match
        deadline = time.monotonic() + timeout
        with self._changed:
            index = 0
            while True:
                for line in self.lines[index:]:
                    index += 1
                    if check(line):
                        return line
                if self._eof:
                    raise RuntimeError(f"{self.proc.args} ended before printing {match!r}:\n" + self.tail())
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"no line {match!r} from {self.proc.args} within {timeout} s:\n" + self.tail())
                self._changed.wait(remaining)

    def tail(self, n: int = 30) -> str:
        return "\n".join(self.lines[-n:])

    def stop(self) -> None:
        stop_process(self.proc)
        self._thread.join(timeout=10)


# The Dask processes here serve HTTP on IPv4 only. On distributed < 2025 the default address
# ("", any port) gives tornado an IPv4 and an IPv6 socket on one port number: the IPv4 one a grid
# port of the node, the IPv6 twin a real port of the host; with several nodes on one host (this
# loopback grid), each handing out the same grid port numbers, the twins collide and distributed
# retries with new sockets, leaking the ones that failed.
HTTP_IPV4 = ("--dashboard-address", "0.0.0.0:0")


def dask_argv(node: str, *args: str) -> list:
    """``gridsock run --node NODE -- python -m dask ARGS``: the ``dask`` command, unmodified."""
    return gridsock_argv("run", "--node", node, "--", sys.executable, "-m", "dask", *args)


def start_watched(argv: list, log: Path, env: dict, spawn: Optional[Callable] = None) -> Watched:
    popen = spawn or (lambda argv, **kw: subprocess.Popen(argv, **kw))
    proc = popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    return Watched(proc, log)


def script_file(directory: Path, name: str, text: str) -> str:
    path = Path(directory) / name
    path.write_text(textwrap.dedent(text))
    return str(path)


@pytest.fixture(scope="module")
def cluster(grid):
    """A scheduler on nb, a worker on na and one on nb: ``(scheduler address, {node: worker address})``."""
    env = grid.env  # warnings are errors in Dask's processes too (STRICT_ENV)
    started: List[Watched] = []
    try:
        scheduler = start_watched(dask_argv("nb", "scheduler", "--protocol", "gridsock", "--port", "0",
                                            "--no-dashboard", *HTTP_IPV4), grid.tmp / "dask-scheduler.log", env)
        started.append(scheduler)
        address = SCHEDULER_AT.search(scheduler.wait_for(SCHEDULER_AT)).group(1)
        workers = {}
        for node in ("na", "nb"):
            worker = start_watched(dask_argv(node, "worker", address, "--name", node, "--nthreads", "2",
                                             "--no-nanny", "--no-dashboard", *HTTP_IPV4, "--memory-limit", "0"),
                                   grid.tmp / f"dask-worker-{node}.log", env)
            started.append(worker)
            workers[node] = WORKER_AT.search(worker.wait_for(WORKER_AT)).group(1)
        for worker in started[1:]:
            worker.wait_for("Registered to:")
        yield address, workers
    finally:
        for proc in reversed(started):
            proc.stop()


def run_client(grid, text: str, *args: str, node: str = "na", patched: bool = True) -> dict:
    """Run a client script on ``node`` (under ``gridsock run``, or only with ``$GRIDSOCK_AGENT``);
    it prints one JSON line, which is returned."""
    grid.scripts += 1
    path = script_file(grid.tmp, f"dask_client{grid.scripts}.py", text)
    env = dict(grid.env)
    if patched:
        argv = gridsock_argv("run", "--node", node, "--", sys.executable, path, *args)
    else:
        argv = [sys.executable, path, *args]
        env["GRIDSOCK_AGENT"] = str(grid.run_dir / f"{node}.agent")
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=DASK_TIMEOUT_S + 30)
    assert done.returncode == 0, done.stderr[-6000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_entry_point_names_the_backend_and_addresses_stay_on_the_grid():
    from distributed.comm import registry

    from gridsock.shims.dask import GridsockBackend

    backend = registry.get_backend("gridsock")
    assert isinstance(backend, GridsockBackend)
    assert backend.resolve_address("b1.grid:8786") == "b1:8786"
    assert backend.resolve_address("b1:8786") == "b1:8786"
    assert backend.get_address_host("c2.GRID:1") == "c2"
    assert backend.get_address_host_port("a1:40000") == ("a1", 40000)
    with pytest.raises(ValueError):
        backend.resolve_address("b1")  # no port


CLUSTER_CLIENT = """
    import json, sys
    import numpy as np
    import dask.array as da
    from distributed import Client, get_task_stream, wait

    TIMEOUT = 60
    client = Client(sys.argv[1], timeout=TIMEOUT)
    workers = {info["name"]: address for address, info in client.scheduler_info()["workers"].items()}

    squares = client.map(lambda i: i * i, range(200))
    total = sum(client.gather(squares))

    with get_task_stream(client) as stream:
        # A block on each worker, pinned; the reduction then needs data from both.
        blocks = [client.submit(np.arange, i * 1000, (i + 1) * 1000, dtype="f8", workers=[workers[n]],
                                allow_other_workers=False, pure=False)
                  for i, n in enumerate(["na", "nb"] * 2)]
        wait(blocks, timeout=TIMEOUT)
        array = da.concatenate([da.from_delayed(b, shape=(1000,), dtype="f8") for b in blocks])
        reduced = float(client.compute(array.sum()).result(timeout=TIMEOUT))
    transfers = [(record["worker"], ss["source"]) for record in stream.data for ss in record["startstops"]
                 if ss["action"] == "transfer"]
    print(json.dumps({"workers": workers, "total": total, "reduced": reduced, "transfers": transfers,
                      "address": client.scheduler.address}))
"""


def test_a_cluster_on_two_nodes_computes_and_transfers_between_workers(grid, cluster):
    address, workers = cluster
    assert re.fullmatch(r"gridsock://nb:\d+", address)
    assert re.fullmatch(r"gridsock://na:\d+", workers["na"]) and re.fullmatch(r"gridsock://nb:\d+", workers["nb"])
    got = run_client(grid, CLUSTER_CLIENT, address)
    assert got["workers"] == workers and got["address"] == address
    assert got["total"] == sum(i * i for i in range(200))
    assert got["reduced"] == float(sum(range(4000)))
    assert got["transfers"], "the reduction fetched nothing from the other worker"
    assert all({worker, source} == set(workers.values()) for worker, source in got["transfers"])


def test_a_client_with_only_the_agent_in_its_environment(grid, cluster):
    address, _ = cluster
    got = run_client(grid, """
        import json, socket, sys
        from distributed import Client
        with Client(sys.argv[1], timeout=60) as client:
            print(json.dumps({"sum": client.submit(sum, range(10)).result(timeout=60),
                              "patched": socket.socket.__name__}))
    """, address.replace("gridsock://nb:", "gridsock://nb.grid:"), node="na", patched=False)
    assert got == {"sum": 45, "patched": "socket"}


def test_a_worker_on_a_node_of_its_own(grid, cluster):
    """``gridsock run --session FILE --name NAME -- dask worker ...``: the worker's node joins the
    grid for it, and the worker serves and fetches under that node's name."""
    address, workers = cluster
    # (the leader of a cluster of its own: A belongs to its leader)
    worker = start_watched(gridsock_argv("run", "--session", str(grid.session), "--name", "nw", "--cluster", "W",
                                         "--listen", "127.0.0.1:0", "--", sys.executable, "-m", "dask", "worker",
                                         address, "--name", "nw", "--nthreads", "1", "--no-nanny", "--no-dashboard",
                                         *HTTP_IPV4, "--memory-limit", "0"),
                           grid.tmp / "dask-worker-nw.log", grid.env)
    try:
        own = WORKER_AT.search(worker.wait_for(WORKER_AT)).group(1)
        worker.wait_for("Registered to:")
        got = run_client(grid, """
            import json, sys
            from distributed import Client
            with Client(sys.argv[1], timeout=60) as client:
                x = client.submit(list, range(1000), workers=[sys.argv[2]], pure=False)
                y = client.submit(sum, x, workers=[sys.argv[3]], allow_other_workers=False, pure=False)
                print(json.dumps({"sum": y.result(timeout=60),
                                  "names": sorted(i["name"] for i in client.scheduler_info()["workers"].values())}))
        """, address, workers["nb"], own)
    finally:
        worker.stop()
    assert re.fullmatch(r"gridsock://nw:\d+", own)
    assert got == {"sum": sum(range(1000)), "names": ["na", "nb", "nw"]}


def test_unknown_nodes_other_nodes_hosts_and_a_missing_agent(grid):
    got = run_client(grid, """
        import asyncio, json, os
        from distributed.comm import connect, listen
        from distributed.comm.registry import get_backend

        async def attempt(address, timeout):
            started = asyncio.get_running_loop().time()
            try:
                await connect(address, timeout=timeout)
            except OSError as exc:
                return f"{type(exc).__name__}: {exc}", asyncio.get_running_loop().time() - started

        async def main():
            try:
                await get_backend("gridsock").get_connector().connect("nobody.grid:8786")
            except OSError as exc:
                unknown = [type(exc).__name__, type(exc.__cause__).__name__, exc.__cause__.errno, str(exc)]
            retried = await attempt("gridsock://nobody:8786", 2)
            listener = listen("gridsock://nb:0", lambda comm: None)
            try:
                await listener.start()
                other = None
            except OSError as exc:
                other = exc.errno
            local = listen("gridsock://127.0.0.1:0", lambda comm: None)  # what a Nanny gives its worker
            await local.start()
            served = local.contact_address
            local.stop()
            os.environ.pop("GRIDSOCK_AGENT")
            from gridsock.personalities import socket as personality
            personality.configure(None)
            return unknown, retried, other, served, await attempt("gridsock://nb:8786", 30)

        unknown, retried, other, served, no_agent = asyncio.run(main())
        print(json.dumps({"unknown": unknown, "retried": retried, "other": other, "served": served,
                          "no_agent": no_agent}))
    """)
    kind, cause, code, message = got["unknown"]
    assert (kind, cause, code) == ("CommClosedError", "gaierror", socket.EAI_NONAME)
    assert "no node 'nobody' in the grid" in message  # asked of the grid only: never DNS
    message, took = got["retried"]
    assert message.startswith("OSError: Timed out trying to connect to gridsock://nobody:8786") and took < 10
    assert got["other"] == errno.EADDRNOTAVAIL  # a listener serves its own node only...
    assert re.fullmatch(r"gridsock://na:\d+", got["served"])  # ...whatever local address it is given
    message, took = got["no_agent"]
    assert "no gridsock agent" in message and took < 5  # fatal: not retried for 30 s
