"""Throughput of a bridge, per pair kind: what holding a byte back (AF_UNIX resets) costs.

Runs on loopback, no lab: ``python bench/bench_bridge.py [--mib 256] [--rounds 3]``.

The stream is one end of an in-memory pair, so the figure is the bridge's own cost: the
application (a thread with a blocking socket, as most programs are) sends ``--mib`` MiB
("upload": app -> stream, the direction the held byte changes) or receives them ("download").
Kinds: ``unix`` (AF_UNIX socketpair holding a byte: the default), ``unix-noreset`` (the same
pair without the held byte: what it cost before breaks were reported), ``tcp`` (loopback TCP
pair, what the socket personality gets). Prints MB/s, best of ``--rounds``.
"""
from __future__ import annotations

import argparse
import socket
import threading
import time
from contextlib import contextmanager

import gevent

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


def _run(kind: str, direction: str, nbytes: int) -> float:
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
    assert handle.join(10)
    peer.close()
    assert result["got"] == nbytes, result
    return nbytes / elapsed / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    nbytes = args.mib << 20
    for kind in ("unix", "unix-noreset", "tcp"):
        for direction in ("upload", "download"):
            best = 0.0
            for _ in range(args.rounds):
                if kind == "unix-noreset":
                    with _without_holding():
                        best = max(best, _run(kind, direction, nbytes))
                else:
                    best = max(best, _run(kind, direction, nbytes))
            print(f"{kind:13s} {direction:8s} {best:8.0f} MB/s")


if __name__ == "__main__":
    main()
