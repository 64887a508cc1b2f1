"""A TCP relay in this process's gevent hub that a test can cut, as a network failure would.

It moves bytes only while the hub is free, so a test can also stall a path by blocking the hub.
"""
from __future__ import annotations

import socket
from typing import Set, Tuple

import gevent
import gevent.event
import gevent.server
import gevent.socket

__all__ = ["CuttableRelay"]

CHUNK_BYTES = 64 * 1024
# How long stop() waits for the relay's connections to end.
STOP_TIMEOUT_S = 5.0


class CuttableRelay:
    """Relay every connection to ``127.0.0.1:target_port``; ``port`` is where it listens.

    ``accepted`` counts the connections and ``connected`` is set at the first; :meth:`cut`
    breaks every relayed connection (both ways shut down), :meth:`stop` also stops listening.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.accepted = 0
        self.connected = gevent.event.Event()
        self.links: Set[Tuple[socket.socket, socket.socket]] = set()
        self.server = gevent.server.StreamServer(("127.0.0.1", 0), self._handle)
        self.server.start()
        self.port = int(self.server.server_port or 0)

    def _handle(self, client, _addr) -> None:
        self.accepted += 1
        self.connected.set()
        upstream = gevent.socket.create_connection(("127.0.0.1", self.target_port))
        self.links.add((client, upstream))
        try:
            gevent.joinall([gevent.spawn(_copy, client, upstream), gevent.spawn(_copy, upstream, client)])
        finally:
            self.links.discard((client, upstream))
            upstream.close()

    def cut(self) -> None:
        """Break every relayed connection, as a network failure would."""
        for pair in list(self.links):
            for sock in pair:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def stop(self) -> None:
        self.cut()
        self.server.stop(timeout=STOP_TIMEOUT_S)


def _copy(src, dst) -> None:
    try:
        while True:
            data = src.recv(CHUNK_BYTES)
            if not data:
                break
            dst.sendall(data)
        dst.shutdown(socket.SHUT_WR)
    except OSError:
        pass
