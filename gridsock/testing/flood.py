"""A member flooding a victim through the rendez-vous node, each cluster in a process of its own.

For ``tests/test_flood.py`` and ``bench/bench_flood.py``. :func:`run_flood` makes a session and
starts, on loopback, four processes (``python -m gridsock.testing.flood ROLE ...``):

- ``rv``: the rendez-vous node. It prints one JSON object per line: ``{"ready": PORT}``, then
  every ``SAMPLE_S`` ``{"rss": BYTES, "routed_queue": ..., "guard": ...}`` (the last two when
  the code has them), and ``{"closed": LABEL, "reason": ...}`` for each link it closes;
- ``nodes``, four times: cluster A (leader ``a1`` and ``a3``, a bystander beside the flooder),
  the flooder ``a2`` (a member of A, in a process of its own so that its writing is not paced
  by its leader's work), cluster B (leader ``b1``; ``b2``, the victim) and cluster C (``c1``, a
  bystander leader). Each prints ``{"ready": ...}`` once every node sees the whole grid, waits for
  ``go`` on its stdin, runs its part for ``duration_s`` (pingers ping in a loop, one ping at a
  time; the flooder writes routed messages of 1 MiB at the victim, ``topic="relay"`` (bulk:
  relayed data for a connection that does not exist) or another topic (non-bulk), as fast as its
  socket takes it, on its own uplink, bypassing its node's queues and waits: what a hostile
  member can do), prints its link closures as they come and ``{"done": ...}`` at the end.

The roles use only public names that the code before issue 16's fairness had too, so that the
benchmark can run the same scenario against the old code (``PYTHONPATH``). A run is bounded:
``duration_s``, and the rendez-vous node's RSS (``abort_rss_bytes``: the flood stops there).
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

__all__ = ["run_flood", "FLOODER", "VICTIM", "BYSTANDERS", "PINGS", "CLUSTERS", "FLOOD_TOPICS", "PING_TIMEOUT_S",
           "SAMPLE_S"]

FLOODER, VICTIM, BYSTANDERS = "a2", "b2", ("a3", "c1")
# Which node runs in which process (the leader first), and who pings whom during the flood:
# the victim, and bystanders beside the flooder, beside nobody, and towards the victim.
CLUSTERS: Dict[str, List[Dict[str, Any]]] = {
    "A": [{"name": "a1", "cluster": "A"}, {"name": "a3", "cluster": "A", "leader": "a1"}],
    "F": [{"name": "a2", "cluster": "A", "leader": "a1"}],
    "B": [{"name": "b1", "cluster": "B"}, {"name": "b2", "cluster": "B", "leader": "b1"}],
    "C": [{"name": "c1", "cluster": "C"}],
}
PINGS = (("b2", "c1"), ("b2", "a3"), ("a3", "b2"), ("c1", "b2"), ("a3", "c1"), ("c1", "a1"))
# A ping that takes longer than this counts as unanswered: a generous bound (the round trip is
# a millisecond when idle, and a second or two under the flood on a loaded 2-core machine).
PING_TIMEOUT_S = 20.0
# Between two pings of one pinger (each waits for its answer first).
PING_PAUSE_S = 0.05
# The rendez-vous process samples its RSS this often.
SAMPLE_S = 0.1
# Joining and settling on a loaded 2-core machine.
READY_TIMEOUT_S = 60.0
# The flooder's frames: relayed data (bulk) of 1 MiB each, for a connection the victim does not have.
FLOOD_FRAME_BYTES = 1024 * 1024
FLOOD_CONN_ID = 0xF100D
# The topics a flood may use: relayed data (bulk), or a topic nobody handles (not bulk).
FLOOD_TOPICS = ("relay", "flood")


def _rss_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def _emit(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


class _Closures(logging.Handler):
    """Prints each 'link ... closed' record of gridsock.bootstrap.link as a JSON line."""

    def emit(self, record: logging.LogRecord) -> None:
        if record.msg == "link %s closed: %s" and len(record.args or ()) == 2:
            label, reason = record.args  # type: ignore[misc]
            _emit({"closed": str(label), "reason": str(reason), "t": time.monotonic()})


def _watch_closures() -> None:
    logger = logging.getLogger("gridsock.bootstrap.link")
    logger.setLevel(logging.INFO)
    logger.addHandler(_Closures())
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")


def _load_session(workdir: str, port: Optional[int] = None):
    import dataclasses

    from ..session import Session

    session = Session.load(Path(workdir) / "session" / "session.toml")
    return dataclasses.replace(session, rendezvous_port=port) if port is not None else session


def _wait_go() -> None:
    from gevent import socket as gsocket

    gsocket.wait_read(sys.stdin.fileno())
    os.read(sys.stdin.fileno(), 64)


def _main_rv(workdir: str) -> None:
    import gevent

    from ..bootstrap import link as link_module
    from ..bootstrap.rendezvous import RendezvousNode

    _watch_closures()
    rv = RendezvousNode(_load_session(workdir), listen_address="127.0.0.1:0", control="").start()
    _emit({"ready": rv.address.port, "rss": _rss_bytes()})
    budget = getattr(link_module, "PROCESS_BUDGET", None)
    while True:
        sample: Dict[str, Any] = {"rss": _rss_bytes(), "t": time.monotonic()}
        if budget is not None:
            sample["routed_queue"] = {"queued": budget.queued_bytes, "peak": budget.peak_bytes}
        guard = getattr(rv, "flood_guard", None)
        if guard is not None:
            sample["guard"] = guard.status()
        _emit(sample)
        gevent.sleep(SAMPLE_S)


def _flood(node, victim_id: str, deadline: float, topic: str) -> Dict[str, Any]:
    """Take over ``node``'s uplink socket (stop its writer and pinger) and write relayed data
    at ``victim_id`` on it until ``deadline``, or until the socket fails. Returns what was sent."""
    import gevent

    from .. import wire

    link = node.uplink
    sent, error = 0, None
    if link is None:
        return {"sent_bytes": 0, "error": "no uplink"}
    for greenlet in link._greenlets[1:]:  # the writer and the pinger: this greenlet writes now
        greenlet.kill()
    header = (FLOOD_CONN_ID).to_bytes(4, "big") + bytes([1]) + (0).to_bytes(4, "big")  # DATA at offset 0
    frame = wire.encode(wire.Routed(src=node.node_id, dst=victim_id, kind="msg", topic=topic, hops=1,
                                    route=(node.name,), payload=header + bytes(FLOOD_FRAME_BYTES)))
    started = time.monotonic()
    try:
        while time.monotonic() < deadline:
            link.sock.sendall(frame)
            sent += len(frame)
    except (OSError, ValueError, AttributeError) as exc:  # (gevent's SSL socket closed under a write)
        error = f"{type(exc).__name__}: {exc}"
    return {"sent_bytes": sent, "seconds": round(time.monotonic() - started, 3), "error": error}


def _pinger(node, dst: str, deadline: float) -> Dict[str, Any]:
    import gevent

    rtts: List[float] = []
    failures: List[str] = []
    while time.monotonic() < deadline:
        start = time.perf_counter()
        try:
            node.ping(dst, timeout=PING_TIMEOUT_S)
            rtts.append(time.perf_counter() - start)
        except Exception as exc:  # every failure counts, whatever its kind
            failures.append(f"{type(exc).__name__}: {exc}")
        gevent.sleep(PING_PAUSE_S)
    return {"rtts": rtts, "failures": failures}


def _main_nodes(workdir: str, port: int, cluster: str, duration_s: float, topic: str, leaders: Dict[str, str]) -> None:
    import gevent

    from ..node import Node

    _watch_closures()
    session = _load_session(workdir, port)
    nodes: Dict[str, Any] = {}
    every = [spec["name"] for specs in CLUSTERS.values() for spec in specs]
    for spec in CLUSTERS[cluster]:
        leader = (str(nodes[spec["leader"]].address) if spec["leader"] in nodes else leaders[spec["leader"]]) \
            if "leader" in spec else None
        node = Node(session, spec["name"], cluster=spec["cluster"], leader=leader,
                    listen_address="127.0.0.1:0", control="", loop="caller").start()
        nodes[spec["name"]] = node
        if not node.wait_joined(READY_TIMEOUT_S):
            raise SystemExit(f"{spec['name']} did not join")
    _emit({"joined": sorted(nodes), "addresses": {name: str(node.address) for name, node in nodes.items()}})
    for node in nodes.values():
        node.wait_directory(present=every, timeout=READY_TIMEOUT_S)
    _emit({"ready": sorted(nodes), "rss": _rss_bytes()})
    _wait_go()
    deadline = time.monotonic() + duration_s
    jobs: Dict[str, Any] = {}
    for src, dst in PINGS:
        if src in nodes:
            jobs[f"{src}->{dst}"] = gevent.spawn(_pinger, nodes[src], dst, deadline)
    if FLOODER in nodes and topic != "none":  # ("none": the same pings without a flood, a baseline)
        victim = nodes[FLOODER].directory.by_name(VICTIM)
        jobs["flood"] = gevent.spawn(_flood, nodes[FLOODER], victim.node_id, deadline, topic)
    gevent.joinall(list(jobs.values()), timeout=duration_s + PING_TIMEOUT_S + 5)
    done: Dict[str, Any] = {name: job.value for name, job in jobs.items()}
    guards = {}
    for name, node in nodes.items():
        guard = getattr(getattr(node, "router", None), "guard", None)
        if guard is not None:
            guards[name] = guard.status()
    done["guards"] = guards
    done["rss"] = _rss_bytes()
    done["t"] = time.monotonic()
    _emit({"done": done})
    # The nodes stay until every process is done (the runner stops this one): a node that left
    # early would leave a ping still under way elsewhere unanswered.
    _wait_go()
    for node in nodes.values():
        node.stop()


def run_flood(workdir, *, duration_s: float, topic: str = "relay", abort_rss_bytes: int = 2 << 30, python: str = sys.executable,
              env: Optional[dict] = None) -> Dict[str, Any]:
    """Run the scenario of the module docstring under ``workdir``, the flood on ``topic`` (one
    of ``FLOOD_TOPICS``, or ``"none"``: no flood, for a baseline); return what was seen:

    ``rv_rss`` (``start``, ``max``: bytes), ``routed_queue_peak`` (bytes, None before the
    fairness code), ``rv_guard`` (its last status, or None), ``pings`` (per ``src->dst``: ``count``,
    ``failures`` (the reasons), ``max_s``, ``p50_s``, ``p99_s``), ``flood`` (``sent_bytes``,
    ``seconds``, ``error``), ``guards`` (each node's), ``closures`` (``[process, label,
    reason]``), ``aborted`` (the RSS bound stopped the run). Raises RuntimeError or
    TimeoutError if a process does not get ready.
    """
    from ..session import create_session
    from .procs import stop_process, wait_for_line

    workdir = Path(workdir)
    create_session(workdir / "session", "127.0.0.1:7700")
    argv = [python, "-m", "gridsock.testing.flood"]
    procs: Dict[str, subprocess.Popen] = {}
    lines: Dict[str, List[dict]] = {}
    logs: List[Any] = []

    def spawn(name: str, *args: str) -> subprocess.Popen:
        logs.append(open(workdir / f"{name}.log", "wb"))  # (each process's stderr)
        proc = subprocess.Popen(argv + list(args), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=logs[-1], env=env, cwd=str(workdir))  # (python -m looks in cwd first)
        procs[name] = proc
        lines[name] = []
        return proc

    def ready(name: str, what: str = "ready") -> dict:
        while True:
            obj = json.loads(wait_for_line(procs[name], lambda text: text.startswith("{"), timeout=READY_TIMEOUT_S))
            if what in obj:
                return obj
            lines[name].append(obj)

    try:
        spawn("rv", "rv", str(workdir))
        port = ready("rv")["ready"]
        for cluster in ("A", "B", "C"):
            spawn(cluster, "nodes", str(workdir), str(port), cluster, str(duration_s), topic, "{}")
        leaders = ready("A", "joined")["addresses"]  # (the flooder needs a1's address)
        spawn("F", "nodes", str(workdir), str(port), "F", str(duration_s), topic, json.dumps(leaders))
        for cluster in ("A", "B", "C", "F"):
            ready(cluster)
        rv_start = None
        for cluster in CLUSTERS:
            procs[cluster].stdin.write(b"go\n")  # type: ignore[union-attr]
            procs[cluster].stdin.flush()  # type: ignore[union-attr]
        aborted = False
        finished: Dict[str, dict] = {}
        deadline = time.monotonic() + duration_s + PING_TIMEOUT_S + 30
        while len(finished) < len(CLUSTERS):
            for name, proc in procs.items():
                while name not in finished:  # (every line there is: the pipes must not fill)
                    try:
                        line = wait_for_line(proc, lambda text: text.startswith("{"), timeout=0.02)
                    except TimeoutError:
                        break
                    obj = json.loads(line)
                    lines[name].append(obj)
                    if name == "rv" and "rss" in obj:
                        rv_start = obj["rss"] if rv_start is None else rv_start
                        if obj["rss"] > abort_rss_bytes and not aborted:
                            aborted = True
                            stop_process(procs["F"], timeout=5)  # the flooder's process: the flood ends
                            finished["F"] = {}
                    if "done" in obj:
                        finished[name] = obj["done"]
            if time.monotonic() > deadline:
                raise TimeoutError(f"the flood run did not end; finished: {sorted(finished)}")
        for name in CLUSTERS:
            if procs[name].poll() is None:
                procs[name].stdin.write(b"stop\n")  # type: ignore[union-attr]
                procs[name].stdin.flush()  # type: ignore[union-attr]
        # The rendez-vous node's samples up to the end of the flood (and its guard then).
        end_t = max((done["t"] for done in finished.values() if "t" in done), default=0.0)
        while True:
            try:
                obj = json.loads(wait_for_line(procs["rv"], lambda t: t.startswith("{"), timeout=5))
            except TimeoutError:
                break
            lines["rv"].append(obj)
            if obj.get("t", 0.0) > end_t:
                break
    finally:
        for proc in procs.values():
            stop_process(proc, timeout=5)
            if proc.stdin is not None:
                proc.stdin.close()
            if proc.stdout is not None:
                proc.stdout.close()
        for file in logs:
            file.close()
    samples = [obj for obj in lines["rv"] if "rss" in obj]
    pings: Dict[str, Any] = {}
    flood: Dict[str, Any] = {}
    guards: Dict[str, Any] = {}
    for name, done in finished.items():
        for key, value in done.items():
            if key == "flood":
                flood = value or {}
            elif key == "guards":
                guards.update(value)
            elif key in ("rss", "t"):
                continue
            elif "->" in key and value:
                rtts = sorted(value["rtts"])
                pings[key] = {"count": len(rtts) + len(value["failures"]), "failures": value["failures"],
                              "max_s": rtts[-1] if rtts else None,
                              "p50_s": rtts[len(rtts) // 2] if rtts else None,
                              "p99_s": rtts[min(len(rtts) - 1, int(len(rtts) * 0.99))] if rtts else None}
    # (the links that close when the processes stop at the end are not the flood's doing; no
    # node stops before every process is done)
    end = max((done["t"] for done in finished.values() if "t" in done), default=float("inf"))
    closures = [[name, obj["closed"], obj["reason"]] for name in lines for obj in lines[name]
                if "closed" in obj and obj["t"] < end]
    queues = [obj["routed_queue"]["peak"] for obj in samples if "routed_queue" in obj]
    rv_guard = next((obj["guard"] for obj in reversed(samples) if "guard" in obj), None)
    return {"rv_rss": {"start": rv_start or (samples[0]["rss"] if samples else 0),
                       "max": max((obj["rss"] for obj in samples), default=0)},
            "routed_queue_peak": max(queues) if queues else None, "rv_guard": rv_guard, "pings": pings,
            "flood": flood, "guards": guards, "closures": closures, "aborted": aborted}


def main(argv: List[str]) -> None:
    role = argv[0]
    if role == "rv":
        _main_rv(argv[1])
    elif role == "nodes":
        _main_nodes(argv[1], int(argv[2]), argv[3], float(argv[4]), argv[5], json.loads(argv[6]))
    else:
        raise SystemExit(f"unknown role {role!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
