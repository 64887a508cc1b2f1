"""An in-process grid on loopback: a rendez-vous node and two clusters, for tests.

:func:`loopback_grid` starts, in this process, a TLS session's rendez-vous node and four nodes:
cluster A = leader ``L1`` + member ``m1``; cluster B = leader ``L2`` + member ``m2``. Every
node listens on loopback, so every direct method can work. ``m2`` accepts any stack from
outside its cluster (its policy is empty); ``L2`` keeps the default policy (``tls`` from
outside its cluster). The context manager waits until every directory holds every node with
its dial-back verdict, and stops everything on exit.
"""
from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path
from typing import Any, Dict, Iterator

__all__ = ["LoopbackGrid", "loopback_grid", "NAMES", "JOIN_TIMEOUT_S"]

NAMES = ("L1", "m1", "L2", "m2")
# Joining and settling on a loaded 2-core machine.
JOIN_TIMEOUT_S = 20.0


@dataclasses.dataclass
class LoopbackGrid:
    """The running grid: ``rv`` and ``nodes`` by name (``grid["m1"]``)."""

    session: Any
    rv: Any
    nodes: Dict[str, Any]

    def __getitem__(self, name: str) -> Any:
        return self.nodes[name]


@contextlib.contextmanager
def loopback_grid(workdir: Path) -> Iterator[LoopbackGrid]:
    """Start the grid (session files under ``workdir``); stop it on exit."""
    from ..bootstrap.rendezvous import RendezvousNode
    from ..node import Node
    from ..rules import Rules
    from ..session import create_session

    session = create_session(Path(workdir) / "session", "127.0.0.1:7700")
    rv = RendezvousNode(session, listen_address="127.0.0.1:0", control="").start()
    session = dataclasses.replace(session, rendezvous_port=rv.address.port)
    nodes: Dict[str, Any] = {}
    try:
        def start(name, cluster, leader=None, rules=None):
            node = Node(session, name, cluster=cluster, leader=str(nodes[leader].address) if leader else None,
                        listen_address="127.0.0.1:0", control="", rules=rules).start()
            nodes[name] = node
            assert node.wait_joined(JOIN_TIMEOUT_S), f"{name} did not join"

        start("L1", "A")
        start("m1", "A", "L1")
        start("L2", "B")
        start("m2", "B", "L2", rules=Rules(outside_cluster=()))
        for node in nodes.values():
            node.wait_directory(present=NAMES, settled=True, timeout=JOIN_TIMEOUT_S)
        yield LoopbackGrid(session, rv, nodes)
    finally:
        for node in nodes.values():
            node.stop()
        rv.stop()
