"""Throughput of a bridge, per pair kind: what holding a byte back (AF_UNIX resets) costs.

Runs on loopback, no lab: ``python bench/bench_bridge.py [--mib 256] [--rounds 3] [--out
docs/benchmarks.md]`` (with ``--out``, the section "Bridges" of that file is replaced).

The stream is one end of an in-memory pair, so the figure is the bridge's own cost: the
application (a thread with a blocking socket, as most programs are) sends ``--mib`` MiB
("upload": app -> stream, the direction the held byte changes) or receives them ("download").
Kinds: ``unix`` (AF_UNIX socketpair holding a byte: the default), ``unix-noreset`` (the same
pair without the held byte: what it cost before breaks were reported), ``tcp`` (loopback TCP
pair, what the socket personality gets), and the baseline ``plain``: the same application
thread on a bare AF_UNIX socketpair whose other end a greenlet reads and writes directly (no
bridge, no stream): the kernel's and the interpreter's own ceiling for this arrangement, in
the same run. Prints MB/s: median of ``--rounds`` (lowest-highest).
"""
from __future__ import annotations

import argparse
import socket
import statistics
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import gevent
from gevent import socket as gsocket

from gridsock import bridge as bridge_module
from gridsock.bridge import start_bridge
from gridsock.streams import memory_pair

CHUNK = 256 * 1024


@contextmanager
def _without_holding():
    original = bridge_module._HoldingReader.open
    bridge_module._HoldingReader.open = classmethod(lambda cls, fw, sentinel: None)
    try:
        yield
    finally:
        bridge_module._HoldingReader.open = original


class _PlainPeer:
    """The far end of a bare socketpair, with the stream's names (the baseline)."""

    def __init__(self, sock) -> None:
        self.sock = sock

    def receive_some(self, n: int) -> bytes:
        return self.sock.recv(n)

    def send_all(self, data) -> None:
        self.sock.sendall(data)

    def send_eof(self) -> None:
        self.sock.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.sock.close()


def _run(kind: str, direction: str, nbytes: int) -> float:
    handle = None
    if kind == "plain":
        sock, far = socket.socketpair()
        peer = _PlainPeer(gsocket.socket(far.family, far.type, far.proto, fileno=far.detach()))
    else:
        ours, peer = memory_pair()
        sock, handle = start_bridge(ours, tcp=(kind == "tcp"))
    payload = bytes(CHUNK)
    result = {}

    def app() -> None:
        if direction == "upload":
            left = nbytes
            while left:
                n = min(left, CHUNK)
                sock.sendall(payload[:n])
                left -= n
            sock.shutdown(socket.SHUT_WR)
            sock.recv(1)  # the peer's EOF
        else:
            got = 0
            while True:
                data = sock.recv(CHUNK)
                if not data:
                    break
                got += len(data)
            result["got"] = got
        sock.close()

    def peer_side() -> None:
        if direction == "upload":
            got = 0
            while True:
                data = peer.receive_some(CHUNK)
                if not data:
                    break
                got += len(data)
            result["got"] = got
            peer.send_eof()
        else:
            left = nbytes
            while left:
                n = min(left, CHUNK)
                peer.send_all(payload[:n])
                left -= n
            peer.send_eof()
            while peer.receive_some(CHUNK):
                pass

    start = time.perf_counter()
    thread = threading.Thread(target=app)
    thread.start()
    g = gevent.spawn(peer_side)
    while thread.is_alive() or not g.ready():
        gevent.sleep(0.001)
    g.get()
    elapsed = time.perf_counter() - start
    assert handle is None or handle.join(10)
    peer.close()
    assert result["got"] == nbytes, result
    return nbytes / elapsed / 1e6


KINDS = ("plain", "unix", "unix-noreset", "tcp")
LABELS = {
    "plain": "bare AF_UNIX socketpair, no bridge (baseline)",
    "unix": "bridge, AF_UNIX pair holding a byte back (the default: breaks reset the application)",
    "unix-noreset": "bridge, AF_UNIX pair without the held byte (before breaks were reported)",
    "tcp": "bridge, loopback TCP pair (the socket personality's; resets by SO_LINGER 0)",
}


def measure(nbytes: int, rounds: int) -> dict:
    """``{(kind, direction): [MB/s per round]}``, rounds interleaved across kinds."""
    results: dict = {(k, d): [] for k in KINDS for d in ("upload", "download")}
    for _ in range(rounds):
        for kind in KINDS:
            for direction in ("upload", "download"):
                if kind == "unix-noreset":
                    with _without_holding():
                        results[kind, direction].append(_run(kind, direction, nbytes))
                else:
                    results[kind, direction].append(_run(kind, direction, nbytes))
    return results


def _cell(values) -> str:
    return f"{statistics.median(values):.0f} ({min(values):.0f}–{max(values):.0f})"


def render(results: dict, nbytes: int, rounds: int) -> str:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _machine import cpu_model

    base = {d: statistics.median(results["plain", d]) for d in ("upload", "download")}
    lines = [
        "## Bridges",
        "",
        "`python bench/bench_bridge.py` (no lab): what an application's socket costs when its stack transforms bytes "
        "(`gridsock.bridge`), next to a bare socketpair in the same run. The stream is one end of an in-memory pair, "
        "so the figures are the bridge's own cost, not a network's. The application is a thread with a blocking "
        f"socket, 256 KiB per call; {nbytes >> 20} MiB per run, {rounds} interleaved rounds; MB/s = 10^6 bytes/s, "
        f"median (lowest–highest); ratio: of medians, to the baseline. Python {sys.version.split()[0]}, "
        f"{cpu_model()}, shared 2-core machine.",
        "",
        "| socket the application gets | upload (app → stream) MB/s | ratio | download (stream → app) MB/s | ratio |",
        "|---|---|---|---|---|",
    ]
    for kind in KINDS:
        up, down = results[kind, "upload"], results[kind, "download"]
        lines.append(f"| {LABELS[kind]} | {_cell(up)} | {statistics.median(up) / base['upload']:.2f} | "
                     f"{_cell(down)} | {statistics.median(down) / base['download']:.2f} |")
    held = {d: statistics.median(results["unix", d]) / statistics.median(results["unix-noreset", d])
            for d in ("upload", "download")}
    lines += [
        "",
        "The held byte is how an AF_UNIX bridge makes the application's `recv` raise `ECONNRESET` when the stream "
        "breaks (Linux resets a Unix stream peer only if the closing end has unread data; docs/architecture.md, "
        f"\"Breaks\"). In this run the bridge holding it moves {held['upload']:.2f}x the upload and "
        f"{held['download']:.2f}x the download of the same bridge without it. The AF_UNIX framework end's send "
        "buffer is `UNIX_BRIDGE_SNDBUF_BYTES` (1 MiB): with Linux's default, downloads ran at about 250 MB/s.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", help="Markdown file whose section 'Bridges' to replace")
    args = parser.parse_args()
    nbytes = args.mib << 20
    results = measure(nbytes, args.rounds)
    for (kind, direction), values in results.items():
        print(f"{kind:13s} {direction:8s} {_cell(values)} MB/s")
    if args.out:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from lab_helpers import replace_section

        replace_section(Path(args.out), "## Bridges", render(results, nbytes, args.rounds))


if __name__ == "__main__":
    main()
