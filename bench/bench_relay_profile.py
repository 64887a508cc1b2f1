"""Where a relayed transfer's CPU goes, per process, on loopback (issue 11).

What it measures
----------------
Three processes on loopback, as in the lab's ``a1 -> rv`` relay path: a rendez-vous node and
two leaders (``src`` in cluster A, ``dst`` in cluster B), each linked to the rendez-vous node
only, so a ``relay`` stream ``src -> dst`` crosses two bootstrap links (mutual TLS each) and
the rendez-vous process forwards every frame. ``src`` sends ``--mib`` MiB of random data,
``--rounds`` times; each round reports the rate (bytes over the time from the stream's first
byte sent to the sink's count coming back), each process's CPU time per MB (user + system,
from ``/proc``; then the system part alone) and its minor page faults per MB, so the
rendez-vous node's cost per relayed MB is read directly. The processes tune the allocator as
``gridsock node`` and ``gridsock rendezvous`` do (``memory.tune_allocator()``).

``--profile rv`` (or ``src``, ``dst``) runs that process under cProfile over the transfers and
prints its top functions by own time at the end (``--top N``). cProfile slows Python code a lot
more than C code, so use it for *where*, and the runs without it for *how much*. ``--pyspy rv``
samples that process with py-spy (native frames too: OpenSSL, libc, the kernel's system calls)
over the rounds and prints the leaf functions by share of samples, then the innermost Python
line of each sample (what a copy or a system call below it was done for). On a shared machine the
figures move by 15 % from run to run: compare versions in alternating runs (``PYTHONPATH``
selects the gridsock a run imports).

    python3 bench/bench_relay_profile.py [--mib 128] [--rounds 5] [--profile rv | --pyspy rv]
                                         [--top 25] [--stack relay]

Loopback only; every wait is bounded (``STEP_TIMEOUT_S``); the processes are stopped at the end
whatever happens.
"""
from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

PORT = 5300
# Any single step (start, join, one transfer) of a loaded 2-core machine ends within this.
STEP_TIMEOUT_S = 120.0
SEND_BYTES = 256 * 1024


def _cpu_s(pid: int) -> float:
    return sum(_cpu_split_s(pid)[:2])


def _cpu_split_s(pid: int):
    """(user, system) CPU seconds of process ``pid``, and its minor page faults."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick, int(fields[7])


# --- the processes ---------------------------------------------------------------------------


def _stdin_lines():
    """Lines of stdin, read cooperatively (gevent)."""
    import gevent.os

    gevent.os.make_nonblocking(0)
    pending = b""
    while True:
        data = gevent.os.nb_read(0, 4096)
        if not data:
            return
        pending += data
        while b"\n" in pending:
            line, pending = pending.split(b"\n", 1)
            yield line.decode()


def _profiled(path: Optional[str]):
    import cProfile

    if not path:
        return None
    profile = cProfile.Profile()
    profile.enable()
    return profile


def _dump(profile, path: Optional[str]) -> None:
    if profile is not None and path:
        profile.disable()
        profile.dump_stats(path)


def run_rv(args) -> None:
    from gridsock.bootstrap.rendezvous import RendezvousNode
    from gridsock.session import Session

    rv = RendezvousNode(Session.load(args.session), listen_address=f"127.0.0.1:{args.port}", control="").start()
    print("ready", flush=True)
    profile = _profiled(args.profile)
    for _ in _stdin_lines():
        pass
    _dump(profile, args.profile)
    rv.stop()


def run_node(args) -> None:
    import gevent

    from gridsock.node import Node
    from gridsock.rules import Rules
    from gridsock.session import Session

    node = Node(Session.load(args.session), args.name, cluster=args.cluster, listen_address="127.0.0.1:0",
                control="", rules=Rules(outside_cluster=()), loop="caller").start()
    if not node.wait_joined(STEP_TIMEOUT_S):
        raise SystemExit(f"{args.name} did not join")
    node.wait_directory(present=["src", "dst"], settled=True, timeout=STEP_TIMEOUT_S)
    listener = node.listen(PORT)

    def sink(stream) -> None:
        total = 0
        while True:
            data = stream.receive_some(SEND_BYTES)
            if not data:
                break
            total += len(data)
        stream.send_all(total.to_bytes(8, "big"))
        stream.send_eof()
        stream.close()

    def serve() -> None:
        while True:
            stream, _ = listener.accept_stream()
            gevent.spawn(sink, stream)

    gevent.spawn(serve)
    print("ready", flush=True)
    profile = None
    data = os.urandom(SEND_BYTES)
    for line in _stdin_lines():
        words = line.split()
        if words[:1] == ["profile"]:
            profile = _profiled(args.profile)
        elif words[:1] == ["send"]:
            nbytes = int(words[1])
            stream, info = node.open_stream("dst", PORT, stack=args.stack, timeout=STEP_TIMEOUT_S)
            started = time.perf_counter()
            sent = 0
            while sent < nbytes:
                stream.send_all(data)
                sent += len(data)
            stream.send_eof()
            got = b""
            while len(got) < 8:
                more = stream.receive_some(8 - len(got))
                if not more:
                    break
                got += more
            seconds = time.perf_counter() - started
            stream.close()
            print(f"done {seconds:.6f} {int.from_bytes(got, 'big')} {info.stack}", flush=True)
    _dump(profile, args.profile)
    node.stop()


# --- the driver ------------------------------------------------------------------------------


class Proc:
    def __init__(self, name: str, argv: List[str], env: Dict[str, str]) -> None:
        self.name = name
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), *argv], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env)

    def line(self) -> str:
        import selectors

        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            if not sel.select(STEP_TIMEOUT_S):
                raise TimeoutError(f"{self.name}: no answer within {STEP_TIMEOUT_S} s")
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.name} exited ({self.proc.wait()})")
        return line.strip()

    def tell(self, text: str) -> None:
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()

    def stop(self) -> None:
        try:
            self.proc.stdin.close()
            self.proc.wait(timeout=30)
        except (subprocess.TimeoutExpired, BrokenPipeError, OSError):
            self.proc.kill()
            self.proc.wait()


def _summarize_pyspy(path: Path, top: int) -> None:
    """Print the leaf functions of py-spy's raw (collapsed stacks) output by share of samples,
    and the share of samples in which each of a few frames of interest is on the stack."""
    leaves: Dict[str, int] = {}
    callers: Dict[str, int] = {}
    inside: Dict[str, int] = {}
    total = 0
    marks = ("_read_loop", "_write_loop", "_parse", "recv_into", "sendall", "on_message", "forward",
             "ssl3_read_bytes", "ssl3_write_bytes", "tls13_cipher", "EVP_", "__memmove", "gevent", "hub")
    with open(path) as f:
        for line in f:
            stack, _, count_text = line.rstrip().rpartition(" ")
            if not stack:
                continue
            count = int(count_text)
            total += count
            frames = stack.split(";")
            leaf = frames[-1]
            leaves[leaf] = leaves.get(leaf, 0) + count
            # The innermost Python line on the stack: what a native leaf (a copy, a system call)
            # was done for.
            caller = next((fr for fr in reversed(frames) if ".py:" in fr), leaf)
            callers[caller] = callers.get(caller, 0) + count
            for mark in marks:
                if mark in stack:
                    inside[mark] = inside.get(mark, 0) + count
    print(f"\npy-spy: {total} samples; leaves by share")
    for leaf, count in sorted(leaves.items(), key=lambda kv: -kv[1])[:top]:
        print(f"{100 * count / total:5.1f} %  {leaf}")
    print("innermost Python line (native frames below it counted in)")
    for caller, count in sorted(callers.items(), key=lambda kv: -kv[1])[:top]:
        print(f"{100 * count / total:5.1f} %  {caller}")
    print("on the stack:")
    for mark, count in sorted(inside.items(), key=lambda kv: -kv[1]):
        print(f"{100 * count / total:5.1f} %  {mark}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] in ("rv", "node"):
        parser = argparse.ArgumentParser()
        parser.add_argument("role")
        parser.add_argument("--session")
        parser.add_argument("--port", type=int)
        parser.add_argument("--name")
        parser.add_argument("--cluster")
        parser.add_argument("--stack", default="relay")
        parser.add_argument("--profile")
        args = parser.parse_args()
        import logging

        logging.basicConfig(level=logging.WARNING, format=f"{args.name or 'rv'} %(name)s: %(message)s")
        from gridsock import memory

        memory.tune_allocator()  # as the `gridsock node` and `gridsock rendezvous` processes do
        (run_rv if args.role == "rv" else run_node)(args)
        return 0

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--stack", default="relay")
    parser.add_argument("--profile", choices=("rv", "src", "dst"))
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--pyspy", choices=("rv", "src", "dst"),
                        help="sample that process with py-spy (native frames too) over the rounds")
    args = parser.parse_args()

    from gridsock.session import create_session

    workdir = Path(tempfile.mkdtemp(prefix="gridsock-relay-profile-"))
    port = _free_port()
    create_session(workdir / "session", f"127.0.0.1:{port}")
    env = dict(os.environ, GRIDSOCK_RUN_DIR=str(workdir), PYTHONUNBUFFERED="1")
    prof = {name: str(workdir / f"{name}.prof") for name in ("rv", "src", "dst") if args.profile == name}
    common = ["--session", str(workdir / "session")]
    procs: Dict[str, Proc] = {}
    try:
        procs["rv"] = Proc("rv", ["rv", *common, "--port", str(port)] +
                           (["--profile", prof["rv"]] if "rv" in prof else []), env)
        assert procs["rv"].line() == "ready"
        for name, cluster in (("dst", "B"), ("src", "A")):
            procs[name] = Proc(name, ["node", *common, "--name", name, "--cluster", cluster, "--stack", args.stack] +
                               (["--profile", prof[name]] if name in prof else []), env)
        for name in ("dst", "src"):
            line = procs[name].line()
            if line != "ready":
                raise RuntimeError(f"{name}: {line}")
        nbytes = args.mib * 1024 * 1024
        procs["src"].tell(f"send {SEND_BYTES}")  # warm-up: the meta link, the imports
        procs["src"].line()
        if "src" in prof or "dst" in prof:
            procs["src" if "src" in prof else "dst"].tell("profile")
        print(f"{args.stack} src -> rendez-vous node -> dst on loopback, {args.mib} MiB a round"
              f"{', ' + args.profile + ' under cProfile' if args.profile else ''}")
        spy = None
        if args.pyspy:
            spy_out = workdir / f"{args.pyspy}.pyspy.txt"
            spy = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "py-spy"), "record", "--native",
                                    "--format", "raw", "--rate", "250", "-o", str(spy_out),
                                    "-p", str(procs[args.pyspy].proc.pid)], stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
            time.sleep(1.0)  # py-spy attaches (a bench, not a test: nothing to wait on)
        print("round | MB/s | CPU ms/MB src / rv / dst (sum) | of which system: src / rv / dst | page faults a MB")
        for round_no in range(args.rounds):
            before = {name: _cpu_split_s(p.proc.pid) for name, p in procs.items()}
            procs["src"].tell(f"send {nbytes}")
            words = procs["src"].line().split()
            if words[0] != "done" or int(words[2]) != nbytes:
                raise RuntimeError(f"transfer failed: {words}")
            seconds = float(words[1])
            after = {name: _cpu_split_s(p.proc.pid) for name, p in procs.items()}
            mb = nbytes / 1e6
            per = [1000 * (sum(after[n][:2]) - sum(before[n][:2])) / mb for n in ("src", "rv", "dst")]
            faults = [(after[n][2] - before[n][2]) / mb for n in ("src", "rv", "dst")]
            sys_per = [1000 * (after[n][1] - before[n][1]) / mb for n in ("src", "rv", "dst")]
            print(f"{round_no + 1} | {mb / seconds:.0f} | {per[0]:.2f} / {per[1]:.2f} / {per[2]:.2f} ({sum(per):.2f})"
                  f" | {sys_per[0]:.2f} / {sys_per[1]:.2f} / {sys_per[2]:.2f}"
                  f" | {faults[0]:.0f} / {faults[1]:.0f} / {faults[2]:.0f}  [{words[3]}]", flush=True)
        if spy is not None:
            spy.send_signal(2)
            spy.wait(timeout=60)
            _summarize_pyspy(spy_out, args.top)
    finally:
        for p in procs.values():
            p.stop()
    for name, path in prof.items():
        import pstats

        print(f"\n{name}: top {args.top} by own time")
        pstats.Stats(path).sort_stats("tottime").print_stats(args.top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
