"""Three rendez-vous nodes, 10,000 simulated nodes: directory convergence, memory, failover.

What it measures
----------------
A session lists three rendez-vous nodes (docs/federation.md), each in a process of its own on
loopback (TLS session). ``--leaders`` hand-driven leaders (the wire protocol, in this process:
each enrolls with the join token, links with mutual TLS, says ``Hello`` as the leader of a
cluster of its own, registers ``--members`` members with ``Register`` and keeps every
``DirectoryUpdate``, as a leader does) are spread over the three, round robin. Simulated
members have no process: their leader registers them (no address, so no dial-back).

- *converged*: from the moment every leader starts until every leader's directory holds every
  node (leaders plus members): each leader sees the whole grid, two thirds of it through
  another rendez-vous node (a snapshot when its leader links, then coalesced updates);
- per rendez-vous process: peak resident memory (``VmHWM``) and CPU seconds, read after the
  convergence;
- *failover*: the third rendez-vous node is killed (SIGKILL); its leaders dial the next one of
  the list and register again (as ``gridsock.bootstrap.uplink`` does); the time until every one
  of them is linked again, and the number of leaders whose directory lacked a node at any
  moment meanwhile (the survivors keep the lost one's entries for ``FAILOVER_GRACE_S``, and a
  leader keeps its directory while it fails over: it should be 0).

    python3 bench/bench_federation.py [--leaders 30] [--members 333] [--timeout 300] [--json FILE]

The leaders all run in this one process (the *driver*), which decodes every update for all of
them: on a small machine its CPU, reported too, bounds the times more than the rendez-vous
nodes' does. Prints a Markdown table (for docs/benchmarks.md). Every wait is bounded; the rendez-vous
processes are ended by their pids.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Dict, List, Optional

POLL_INTERVAL_S = 0.05
READY_TIMEOUT_S = 30.0


def _free_ports(n: int) -> List[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _proc_status(pid: int) -> Dict[str, float]:
    out: Dict[str, float] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmHWM:", "VmRSS:")):
                key, value = line.split(":", 1)
                out[key] = int(value.split()[0]) * 1024
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    out["cpu_s"] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return out


def rendezvous_main(args) -> None:
    """One rendez-vous process (``--rv INDEX``)."""
    import logging

    import gevent
    import gevent.event

    from gridsock.bootstrap.rendezvous import RendezvousNode
    from gridsock.session import Session, rendezvous_name

    logging.basicConfig(level=logging.WARNING, format=f"rv{args.rv} %(levelname)s %(name)s: %(message)s")
    session = Session.load(args.session)
    host, port = session.rendezvous_addresses[args.rv]
    rv = RendezvousNode(session, name=rendezvous_name(args.rv), listen_address=f"{host}:{port}",
                        control=args.control).start()
    stop = gevent.event.Event()
    gevent.signal_handler(signal.SIGTERM, stop.set)
    print("ready", flush=True)
    stop.wait()
    rv.stop()
    os._exit(0)


def _wait_line(proc: subprocess.Popen, prefix: str, timeout: float) -> str:
    import gevent

    deadline = time.monotonic() + timeout
    with gevent.Timeout(timeout, TimeoutError(f"no {prefix!r} line within {timeout} s")):
        while True:
            line = gevent.get_hub().threadpool.apply(proc.stdout.readline).decode()
            if not line:
                raise RuntimeError(f"process ended before {prefix!r}")
            if line.startswith(prefix):
                return line
            if time.monotonic() > deadline:
                raise TimeoutError(prefix)


class SimLeader:
    """A hand-driven leader with ``members`` simulated members (see the module docstring)."""

    def __init__(self, bench: "Bench", index: int, members: int) -> None:
        from gridsock.session import new_node_key

        self.bench = bench
        self.name = f"L{index}"
        self.cluster = f"c{index}"
        self.rv_index = index % 3
        self.members = members
        self.key_pem, self.csr_pem = new_node_key()
        self.context = None
        self.node_id: Optional[str] = None
        self.member_ids = [str(uuid.uuid4()) for _ in range(members)]
        self.ids: set = set()
        self.linked = False
        self.links = 0
        self.ever_short_after_full = False  # its directory lacked a node after it had held them all
        self.full = False
        self.linked_at: Optional[float] = None

    def run(self) -> None:
        import gevent

        from gridsock import wire
        from gridsock.bootstrap.link import read_message, send_message
        from gridsock.bootstrap.transport import Address, dial, tls_client
        from gridsock.session import Identity, client_context

        session = self.bench.session
        while True:
            host, port = session.rendezvous_addresses[self.rv_index]
            target = Address(host=host, port=port)
            try:
                if self.context is None:
                    sock = tls_client(dial(target, timeout=10.0), client_context(session, None), timeout=10.0)
                    try:
                        send_message(sock, wire.Enroll(token=session.join_token, csr_pem=self.csr_pem.decode(),
                                                       name=self.name))
                        reply = read_message(sock, wire.Decoder(), timeout=10.0)
                    finally:
                        sock.close()
                    identity = Identity(reply.cert_pem.encode(), self.key_pem)
                    self.node_id = identity.node_id
                    self.context = client_context(session, identity)
                sock = tls_client(dial(target, timeout=10.0), self.context, timeout=10.0)
                send_message(sock, wire.Hello(name=self.name, cluster=self.cluster, role="leader"))
                decoder = wire.Decoder()
                welcome = read_message(sock, decoder, timeout=10.0)
                assert isinstance(welcome, wire.Welcome), welcome
                entries = [wire.NodeEntry(node_id=mid, name=f"m{self.name[1:]}x{j}", cluster=self.cluster,
                                          leader=self.node_id, role="member")
                           for j, mid in enumerate(self.member_ids)]
                step = wire.MAX_ENTRIES_PER_UPDATE
                for i in range(0, len(entries), step):
                    send_message(sock, wire.Register(tuple(entries[i: i + step])))
                self.linked = True
                self.links += 1
                self.linked_at = time.monotonic()
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
                                    self.ids, pending = pending, None
                            else:
                                self.ids.difference_update(message.left)
                                self.ids.update(e.node_id for e in message.joined)
                            self._check()
            except Exception:
                self.linked = False
                if self.bench.stopping:
                    return
                # Fail over: the next rendez-vous node of the list (uplink.py's order).
                self.rv_index = (self.rv_index + 1) % 3
                gevent.sleep(0.1)

    def _check(self) -> None:
        full = len(self.ids) >= self.bench.expect
        if self.full and not full:
            self.ever_short_after_full = True
        self.full = self.full or full


class Bench:
    def __init__(self, session, expect: int) -> None:
        self.session = session
        self.expect = expect
        self.stopping = False


def _wait(condition, timeout: float) -> Optional[float]:
    import gevent

    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if condition():
            return time.monotonic() - start
        gevent.sleep(POLL_INTERVAL_S)
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--leaders", type=int, default=30)
    parser.add_argument("--members", type=int, default=333)
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--json", metavar="FILE")
    parser.add_argument("--rv", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--session", help=argparse.SUPPRESS)
    parser.add_argument("--control", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rv is not None:
        rendezvous_main(args)
        return

    import gevent

    from gridsock.bootstrap.control import call
    from gridsock.bootstrap.federation import FAILOVER_GRACE_S
    from gridsock.session import create_session

    workdir = Path(tempfile.mkdtemp(prefix="bench-fed-"))
    ports = _free_ports(3)
    session = create_session(workdir / "session", [f"127.0.0.1:{p}" for p in ports])
    procs: List[subprocess.Popen] = []
    result: Dict[str, object] = {}
    try:
        for i in range(3):
            proc = subprocess.Popen([sys.executable, __file__, "--rv", str(i), "--session", str(session.path),
                                     "--control", str(workdir / f"rv{i}.sock")],
                                    stdout=subprocess.PIPE, stderr=open(workdir / f"rv{i}.log", "wb"))
            procs.append(proc)
        for proc in procs:
            _wait_line(proc, "ready", READY_TIMEOUT_S)

        def linked(i: int) -> bool:
            peers = call(str(workdir / f"rv{i}.sock"), "status", {}, timeout=10)["federation"]["peers"]
            return all(p["linked"] for p in peers.values())

        assert _wait(lambda: all(linked(i) for i in range(3)), READY_TIMEOUT_S) is not None, "rendez-vous links"
        expect = args.leaders * (args.members + 1)
        bench = Bench(session, expect)
        leaders = [SimLeader(bench, i, args.members) for i in range(args.leaders)]
        started = time.monotonic()
        greenlets = [gevent.spawn(leader.run) for leader in leaders]
        joined_s = _wait(lambda: all(l.linked for l in leaders), args.timeout)
        converged_s = _wait(lambda: all(len(l.ids) >= expect for l in leaders), args.timeout - (time.monotonic() - started))
        if converged_s is not None:
            converged_s = time.monotonic() - started
        memory = [_proc_status(p.pid) for p in procs]
        usage = resource.getrusage(resource.RUSAGE_SELF)
        result["driver_cpu_s"] = round(usage.ru_utime + usage.ru_stime, 2)
        result.update(nodes=expect, leaders=args.leaders, members_per_leader=args.members,
                      joined_s=joined_s, converged_s=converged_s,
                      rv_peak_rss_mib=[round(m["VmHWM"] / 2**20, 1) for m in memory],
                      rv_cpu_s=[round(m["cpu_s"], 2) for m in memory])
        # Failover: kill the third rendez-vous node.
        moving = [l for l in leaders if l.rv_index == 2]
        for l in leaders:
            l.ever_short_after_full = False
        procs[2].send_signal(signal.SIGKILL)
        procs[2].wait(timeout=10)
        killed_at = time.monotonic()
        relinked_s = _wait(lambda: all(l.linked and l.linked_at and l.linked_at > killed_at for l in moving),
                           args.timeout)
        result.update(failover_leaders=len(moving), failover_relinked_s=relinked_s,
                      leaders_that_lacked_a_node=sum(l.ever_short_after_full for l in leaders),
                      failover_grace_s=FAILOVER_GRACE_S)
        bench.stopping = True
        gevent.killall(greenlets, block=False)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
    result.update(date=datetime.date.today().isoformat(), python=platform.python_version(),
                  cpus=os.cpu_count(), machine=platform.machine())
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))

    def fmt(v):
        return "n/a (timeout)" if v is None else f"{v:.2f} s"

    print("\n| nodes | leaders (members each) | joined | converged | rv peak RSS (MiB) | rv CPU (s) | driver CPU (s) |")
    print("|---|---|---|---|---|---|---|")
    print(f"| {result['nodes']:,} | {args.leaders} ({args.members}) | {fmt(result['joined_s'])} | "
          f"{fmt(result['converged_s'])} | {' / '.join(map(str, result['rv_peak_rss_mib']))} | "
          f"{' / '.join(map(str, result['rv_cpu_s']))} | {result['driver_cpu_s']} |")
    print("\n| failover: leaders moved | all relinked after the kill | leaders whose directory lacked a node meanwhile |")
    print("|---|---|---|")
    print(f"| {result['failover_leaders']} | {fmt(result['failover_relinked_s'])} | {result['leaders_that_lacked_a_node']} |")


if __name__ == "__main__":
    main()
