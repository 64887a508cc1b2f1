"""The directory: every node of the session as one process knows it.

The rendez-vous node holds the authoritative copy; leaders and members hold replicas kept up to
date by ``DirectoryUpdate`` messages. A replica applies updates in order; a snapshot series
(``snapshot=True`` on the first part, ``more=True`` on all parts but the last) replaces the
whole content. Names are unique in a session; ids never change meaning.
"""
from __future__ import annotations

import time
from typing import Callable, Dict, Iterable, List, Optional

import gevent.event

from .. import wire

__all__ = ["Directory", "RENDEZVOUS_NAME"]

# The name that addresses the rendez-vous node itself in routed messages; no node may take it.
RENDEZVOUS_NAME = "rendezvous"


class Directory:
    """Node entries by id and by name, with a change event for waiters."""

    def __init__(self) -> None:
        self._by_id: Dict[str, wire.NodeEntry] = {}
        self._by_name: Dict[str, str] = {}
        self._changed = gevent.event.Event()
        self._listeners: List[Callable[[List[wire.NodeEntry], List[wire.NodeEntry]], None]] = []
        self._pending_snapshot: Optional[List[wire.NodeEntry]] = None
        self.version = 0
        self.updated_at = time.time()

    def __len__(self) -> int:
        return len(self._by_id)

    def __iter__(self):
        return iter(list(self._by_id.values()))

    def __contains__(self, node_id: str) -> bool:
        return node_id in self._by_id

    def get(self, node_id: str) -> Optional[wire.NodeEntry]:
        return self._by_id.get(node_id)

    def by_name(self, name: str) -> Optional[wire.NodeEntry]:
        node_id = self._by_name.get(name)
        return self._by_id.get(node_id) if node_id else None

    def resolve(self, dst: str) -> Optional[wire.NodeEntry]:
        """Return the entry for a node id or a node name, or None."""
        return self._by_id.get(dst) or self.by_name(dst)

    def members_of(self, leader_id: str) -> List[wire.NodeEntry]:
        return [e for e in self._by_id.values() if e.leader == leader_id and e.node_id != leader_id]

    def add_listener(self, listener: Callable[[List[wire.NodeEntry], List[wire.NodeEntry]], None]) -> None:
        """Call ``listener(joined, left)`` after every change."""
        self._listeners.append(listener)

    def put(self, entries: Iterable[wire.NodeEntry]) -> None:
        self.apply(joined=entries, left=())

    def remove(self, node_ids: Iterable[str]) -> List[wire.NodeEntry]:
        return self.apply(joined=(), left=node_ids)[1]

    def clear(self, keep: Iterable[str] = ()) -> None:
        keep = set(keep)
        self.remove([i for i in self._by_id if i not in keep])

    def apply(self, joined: Iterable[wire.NodeEntry], left: Iterable[str], *, replace: bool = False):
        """Apply a change; return ``(joined, left)``: the entries that really changed.

        With ``replace``, ``joined`` becomes the whole content and ``left`` is ignored.
        """
        # Work proportional to the change, except for ``replace`` (a snapshot), which compares all.
        before = dict(self._by_id) if replace else None
        removed: Dict[str, wire.NodeEntry] = {}
        if replace:
            self._by_id.clear()
            self._by_name.clear()
        else:
            for node_id in left:
                entry = self._by_id.pop(node_id, None)
                if entry is not None:
                    self._by_name.pop(entry.name, None)
                    removed[node_id] = entry
        added = []
        for entry in joined:
            old = self._by_id.get(entry.node_id)
            if old is not None and old.name != entry.name:
                self._by_name.pop(old.name, None)
            other = self._by_name.get(entry.name)
            if other is not None and other != entry.node_id:
                # The name moved to a new node id (a node restarted): the old id is gone.
                removed[other] = self._by_id.pop(other)
            self._by_id[entry.node_id] = entry
            self._by_name[entry.name] = entry.node_id
            previous = before.get(entry.node_id) if before is not None else (old or removed.get(entry.node_id))
            if previous != entry:
                added.append(entry)
        if before is not None:
            gone = [e for i, e in before.items() if i not in self._by_id]
        else:
            gone = [e for i, e in removed.items() if i not in self._by_id]
        if added or gone:
            self.version += 1
            self.updated_at = time.time()
            for listener in list(self._listeners):
                listener(added, gone)
            fired, self._changed = self._changed, gevent.event.Event()
            fired.set()
        return added, gone

    def wait_changed(self, timeout: float | None = None) -> bool:
        """Block (cooperatively) until the next change; return False on timeout."""
        return self._changed.wait(timeout)

    def to_json(self) -> list:
        return [e.to_json() for e in sorted(self._by_id.values(), key=lambda e: ((e.cluster or ""), e.name))]

    def snapshot_updates(self) -> Iterable[wire.DirectoryUpdate]:
        """The whole directory as one snapshot series of DirectoryUpdate messages."""
        entries = list(self._by_id.values())
        step = wire.MAX_ENTRIES_PER_UPDATE
        chunks = [entries[i : i + step] for i in range(0, len(entries), step)] or [[]]
        for i, chunk in enumerate(chunks):
            yield wire.DirectoryUpdate(joined=tuple(chunk), snapshot=(i == 0), more=(i < len(chunks) - 1))

    def apply_update(self, update: wire.DirectoryUpdate, *, keep: Iterable[wire.NodeEntry] = ()):
        """Apply an update from upstream; a snapshot series replaces everything once complete.

        ``keep`` are entries this process is the authority for (itself, a leader's members):
        a snapshot never removes them. Returns ``(joined, left)`` as :meth:`apply` does.
        """
        if update.snapshot:
            self._pending_snapshot = []
        pending = self._pending_snapshot
        if pending is None:
            return self.apply(update.joined, update.left)
        pending.extend(update.joined)
        if update.more:
            return [], []
        self._pending_snapshot = None
        local = list(keep)
        local_ids = {e.node_id for e in local}
        return self.apply([e for e in pending if e.node_id not in local_ids] + local, (), replace=True)
