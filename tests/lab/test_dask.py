"""An unmodified Dask cluster across the lab's firewall, NAT and private cluster over ``gridsock://``.

The scheduler runs on b1 (firewalled cluster B), workers on a1 and a2 (cluster A, behind NAT)
and on c1 and c2 (cluster C, no route out), each ``dask scheduler`` / ``dask worker`` started
with the plain command line through ``gridsock run --node NAME`` in that node's namespace (the
workers with their default Nanny); the client is a script on the rendez-vous host's node.
Readiness is a line a process prints or the client's ``wait_for_workers``; the one wait on the
cluster's state (a killed worker's removal) is a bounded poll of ``scheduler_info``.
"""
from __future__ import annotations

import json
import os
import re
import signal

import pytest

pytest.importorskip("distributed")
pytest.importorskip("dask.array")

from test_dask import SCHEDULER_AT, Watched, dask_argv, start_watched  # noqa: E402

from gridsock.testing.procs import wait_for_line  # noqa: E402

from .gridsession import make_grid  # noqa: E402
from .test_apps import APP_TIMEOUT_S, VIA_RULES, Apps  # noqa: E402

pytestmark = pytest.mark.timeout(300)

WORKER_NODES = ("a1", "a2", "c1", "c2")
CLUSTER_OF = {"a1": "A", "a2": "A", "c1": "C", "c2": "C", "b1": "B", "rv": None}
# Every wait of the client scripts (workers joining, results, the victim's removal).
CLIENT_WAIT_S = 90


@pytest.fixture(scope="module")
def grid(lab, tmp_path_factory):
    rules = {name: VIA_RULES for name in ("rv", "a1", "a2", "b1", "b2", "c1", "c2")}
    yield from make_grid(lab, tmp_path_factory, rules=rules)


@pytest.fixture(scope="module")
def dask_cluster(grid):
    """``dask scheduler --protocol gridsock`` on b1 and ``dask worker gridsock://b1:PORT`` on
    a1, a2, c1, c2: ``(scheduler address, {node: Watched worker process})``."""
    started = {}

    def start(node: str, *args: str) -> Watched:
        proc = start_watched(dask_argv(node, *args), grid.tmp / f"dask-{node}.log", grid.env,
                             spawn=lambda argv, **kw: grid.lab.spawn(node, argv, **kw))
        started[node] = proc
        return proc

    try:
        scheduler = start("b1", "scheduler", "--protocol", "gridsock")
        address = SCHEDULER_AT.search(scheduler.wait_for(SCHEDULER_AT, timeout=APP_TIMEOUT_S)).group(1)
        for node in WORKER_NODES:
            start(node, "worker", address, "--name", node, "--nthreads", "2")
        for node in WORKER_NODES:
            started[node].wait_for("Registered to:", timeout=APP_TIMEOUT_S)
        yield address, {node: started[node] for node in WORKER_NODES}
    except Exception:
        for node, proc in started.items():
            print(f"--- dask on {node}\n{proc.tail()}")
        raise
    finally:
        for proc in reversed(list(started.values())):
            proc.stop()


@pytest.fixture(scope="module")
def apps(grid):
    return Apps(grid)


COMPUTE = """
    import json, sys
    import numpy as np
    import dask.array as da
    from distributed import Client, get_task_stream, wait

    WAIT = float(sys.argv[2])
    client = Client(sys.argv[1], timeout=WAIT)
    client.wait_for_workers(4, timeout=WAIT)
    workers = {info["name"]: address for address, info in client.scheduler_info()["workers"].items()}
    names = sorted(workers)

    with get_task_stream(client) as stream:
        # 16 blocks of 250,000 float64 (2 MB), four pinned on each worker; the reduction's
        # partial results then travel between the workers, across the clusters.
        blocks = [client.submit(np.arange, i * 250_000, (i + 1) * 250_000, dtype="f8", pure=False,
                                workers=[workers[names[i % 4]]], allow_other_workers=False) for i in range(16)]
        wait(blocks, timeout=WAIT)
        array = da.concatenate([da.from_delayed(block, shape=(250_000,), dtype="f8") for block in blocks])
        reduced = client.compute([array.sum(), (array * array).mean(), array.max()])
        reduced = [float(x) for x in client.gather(reduced)]
        squares = client.map(lambda i: i * i, range(1000), pure=False)
        mapped = client.gather(squares)
    records = [{"worker": r["worker"], "actions": [s["action"] for s in r["startstops"]],
                "sources": [s["source"] for s in r["startstops"] if s["action"] == "transfer"]}
               for r in stream.data]
    print(json.dumps({"workers": workers, "reduced": reduced, "mapped": mapped, "records": records}))
"""


def node_of(address: str) -> str:
    match = re.fullmatch(r"gridsock://([a-z0-9]+):\d+", address)
    assert match, address
    return match.group(1)


def test_an_array_reduction_and_a_thousand_tasks_across_three_clusters(grid, apps, dask_cluster):
    address, _ = dask_cluster
    assert node_of(address) == "b1"
    got = json.loads(apps.run("rv", COMPUTE, address, str(CLIENT_WAIT_S)).splitlines()[-1])
    assert sorted(got["workers"]) == list(WORKER_NODES)
    assert all(node_of(a) == name for name, a in got["workers"].items()), got["workers"]

    n = 16 * 250_000
    total, mean_square, top = got["reduced"]
    assert (total, top) == (n * (n - 1) / 2, n - 1)  # exact: every partial sum is an integer below 2**53
    assert mean_square == pytest.approx(sum(i * i for i in range(n)) / n, rel=1e-12)
    assert got["mapped"] == [i * i for i in range(1000)]

    # The scheduler's task log: tasks ran on every worker, so in both clusters...
    computed = {node_of(r["worker"]) for r in got["records"] if "compute" in r["actions"]}
    assert computed == set(WORKER_NODES)
    # ...and data went between workers, from one cluster to the other.
    transfers = {(node_of(source), node_of(r["worker"])) for r in got["records"] for source in r["sources"]}
    assert any(CLUSTER_OF[src] != CLUSTER_OF[dst] for src, dst in transfers), transfers


SURVIVE = """
    import json, sys, time, uuid
    from distributed import Client, Event, wait

    WAIT = float(sys.argv[3])
    client = Client(sys.argv[1], timeout=WAIT)
    client.wait_for_workers(4, timeout=WAIT)
    workers = {info["name"]: address for address, info in client.scheduler_info()["workers"].items()}
    names = sorted(workers)
    victim = workers[sys.argv[2]]
    go = Event("go-" + uuid.uuid4().hex, client=client)

    def gated_inc(x, event_name):
        from distributed import Event
        if not Event(event_name).wait(timeout=WAIT):
            raise TimeoutError("the gate was never opened")
        return x + 1

    # First layer: 400 results, spread evenly (the victim's too); then a second layer that
    # waits at a gate, so the computation is surely under way when the victim dies.
    xs = [client.submit(lambda i: i * i, i, pure=False, workers=[workers[names[i % 4]]], allow_other_workers=True)
          for i in range(400)]
    wait(xs, timeout=WAIT)
    held = sum(victim in holders for holders in client.who_has(xs).values())
    ys = [client.submit(gated_inc, x, go.name, pure=False) for x in xs]
    total = client.submit(sum, ys, pure=False)
    print("holding", held, flush=True)

    deadline = time.monotonic() + WAIT
    while victim in client.scheduler_info()["workers"]:  # the test kills the victim now
        if time.monotonic() > deadline:
            raise TimeoutError(f"{victim} still in the cluster after {WAIT} s")
        time.sleep(0.1)
    go.set()
    result = total.result(timeout=WAIT)
    remaining = sorted(info["name"] for info in client.scheduler_info()["workers"].values())
    print(json.dumps({"total": result, "remaining": remaining}), flush=True)
"""


def test_a_worker_killed_mid_run_is_replaced_by_the_others(grid, apps, dask_cluster):
    address, workers = dask_cluster
    client = apps.start("rv", SURVIVE, address, "a2", str(CLIENT_WAIT_S))
    try:
        held = int(wait_for_line(client, "holding ", timeout=APP_TIMEOUT_S).split()[1])
        assert held > 0  # the victim holds results the rest of the computation needs
        os.killpg(workers["a2"].proc.pid, signal.SIGKILL)  # its Nanny and worker, at once
        workers["a2"].proc.wait(timeout=30)
        got = json.loads(wait_for_line(client, "{", timeout=APP_TIMEOUT_S))
        assert client.wait(timeout=30) == 0
    finally:
        if client.poll() is None:
            client.kill()
            client.wait(timeout=10)
        client.stdout.close()
    assert got == {"total": sum(i * i + 1 for i in range(400)), "remaining": ["a1", "c1", "c2"]}
