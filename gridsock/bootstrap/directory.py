"""The directory: every node of the session as one process knows it.

The rendez-vous node holds the authoritative copy; leaders and members hold replicas kept up to
date by ``DirectoryUpdate`` messages. A replica applies updates in order; a snapshot series
(``snapshot=True`` on the first part, ``more=True`` on all parts but the last) replaces the
whole content. Names are unique in a session; ids never change meaning.

Names and clusters belong to identities (:class:`Bindings`): the rendez-vous node binds a node
name to the first node id that holds it, and a cluster name to the first leader that leads it;
another id that asks for either while its holder is linked, or within ``NAME_GRACE_S`` after it
was lost, is refused. A holder that leaves cleanly, or an operator (``release``), ends the
binding at once; the holder coming back (same id, from its state directory) gets it back at once.

Broadcasts (:class:`Broadcaster`): the rendez-vous node passes every directory change on to
every leader, and a leader to every member, coalesced: the node ids that changed are gathered
for ``BROADCAST_INTERVAL_S`` after the last broadcast (``BROADCAST_PER_LINK_S`` per link when
that is longer: 0.5 s for a thousand leaders), or until ``BROADCAST_BATCH_ENTRIES`` of them
wait, then one update carries the current state of each (its entry, or its id as left),
encoded once and queued on every link. A link that just came up gets, at that same moment, the
whole directory (a snapshot series, also encoded once for all the links that came up meanwhile)
instead. So a join storm of N nodes costs the rendez-vous node one update per interval per
leader, not one per join per leader; a first change after a quiet interval goes out at once.

Bounds: a leader has at most ``MAX_MEMBERS`` members, and what a status reply carries of the
directory is at most ``STATUS_MAX_BYTES`` of JSON (:meth:`Directory.to_json` with ``max_bytes``),
so a large grid never makes a control reply outgrow the frame limit.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional, Set, Tuple

import gevent
import gevent.event

from .. import wire
from ..errors import LocalProtocolError

__all__ = ["Directory", "RENDEZVOUS_NAME", "LEAVE_TOPIC", "REFUSED_TOPIC", "MAX_MEMBERS", "NAME_GRACE_S", "STATUS_MAX_BYTES", "Binding", "Bindings",
           "bounded_json", "Broadcaster", "BROADCAST_INTERVAL_S", "BROADCAST_BATCH_ENTRIES", "BROADCAST_PER_LINK_S"]

log = logging.getLogger(__name__)

# The name that addresses the rendez-vous node itself in routed messages; no node may take it.
RENDEZVOUS_NAME = "rendezvous"
# The routed request (to RENDEZVOUS_NAME) by which a node that stops cleanly frees its name,
# and a leader its cluster, as soon as it is gone.
LEAVE_TOPIC = "gridsock.leave"
# The routed message (rendez-vous node -> a leader) that refuses one of its members' registration
# for good (its name is another node's): the leader passes a Refuse on to the member.
REFUSED_TOPIC = "gridsock.refused"
# Members one leader may have: a cluster of a thousand nodes is large; without a bound one rogue
# leader registers phantoms by the ten thousand, and every directory grows with them.
MAX_MEMBERS = 1000
# A name (or a cluster) whose holder was lost without leaving cleanly stays its holder's this
# long: time for a crashed node to be restarted with its state directory, while no other node
# can take its name (and the messages meant for it). An operator may release it sooner.
NAME_GRACE_S = 60.0
# What a status reply carries of a list (directory entries, links) at most, as JSON: well
# under the frame limit (wire.MAX_FRAME_BYTES, 4 MiB), whatever else the reply holds.
STATUS_MAX_BYTES = 1024 * 1024
# Directory changes are gathered this long after a broadcast before the next one goes out: a
# join storm then costs one update per interval on each link, not one per join; a change seen
# after a quiet interval goes out at once. Two hops (rendez-vous -> leader -> member) add at
# most twice this to the time a change takes to reach every directory.
BROADCAST_INTERVAL_S = 0.1
# ... or until this many node ids wait (one update's worth): then the broadcast goes out now.
BROADCAST_BATCH_ENTRIES = wire.MAX_ENTRIES_PER_UPDATE
# A broadcast costs about this much per link, whatever it carries (a write and a TLS record
# here; a read, a decode and an apply at the other end): during a storm the interval grows to
# this times the number of links, so that broadcasts keep to a bounded share of the time
# (1000 leaders: one broadcast every 0.5 s, not ten a second).
BROADCAST_PER_LINK_S = 0.0005


def bounded_json(items: Iterable[dict], max_bytes: int) -> Tuple[List[dict], int]:
    """The first of ``items`` whose JSON adds up to at most ``max_bytes``; and how many there
    were in all. Returns ``(kept, total)``."""
    kept: List[dict] = []
    used = 0
    total = 0
    for item in items:
        total += 1
        if used >= max_bytes:
            continue
        size = len(json.dumps(item)) + 2
        if used + size > max_bytes:
            used = max_bytes  # keep an order: nothing after the first item that did not fit
            continue
        used += size
        kept.append(item)
    return kept, total


@dataclass
class Binding:
    """Who holds a name (or a cluster): ``node_id``; ``lost_at`` (``time.monotonic()``) once its
    holder was lost (None while it is linked); ``released`` once it left cleanly or an operator
    released it."""

    node_id: str
    lost_at: Optional[float] = None
    released: bool = False


class Bindings:
    """Names (node names, or cluster names) bound to node ids; see the module docstring.

    ``what`` names them in messages ("node name", "cluster"); ``release_command`` is the
    operator's command that frees one (``{}``: the name); ``grace_s`` is how long a lost holder
    keeps its name; ``clock`` returns seconds (injected so a test of the grace does not wait).
    """

    # Forgotten bindings are pruned when there are this many, then twice as many as remain.
    PRUNE_FIRST_AT = 1024

    def __init__(self, what: str, *, release_command: str = "gridsock release {}", grace_s: float = NAME_GRACE_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.what = what
        self.release_command = release_command
        self.grace_s = grace_s
        self._clock = clock
        self._by_name: Dict[str, Binding] = {}
        self._prune_at = self.PRUNE_FIRST_AT

    def __len__(self) -> int:
        return len(self._by_name)

    def get(self, name: str) -> Optional[Binding]:
        return self._by_name.get(name)

    def holder(self, name: str, node_id: str) -> Optional[str]:
        """The node id that keeps ``name`` from ``node_id``, or None if ``node_id`` may have it:
        it is unbound, bound to ``node_id``, released, or lost longer than the grace ago."""
        binding = self._by_name.get(name)
        if binding is None or binding.node_id == node_id or binding.released:
            return None
        if binding.lost_at is not None and self._clock() - binding.lost_at >= self.grace_s:
            return None
        return binding.node_id

    def why_not(self, name: str, node_id: str) -> Optional[str]:
        """Why ``node_id`` may not have ``name`` (a message), or None if it may."""
        holder = self.holder(name, node_id)
        if holder is None:
            return None
        binding = self._by_name[name]
        if binding.lost_at is None:
            return f"{self.what} {name!r} belongs to node {holder}"
        left = max(0.0, self.grace_s - (self._clock() - binding.lost_at))
        return (f"{self.what} {name!r} belongs to node {holder}, lost {self._clock() - binding.lost_at:.1f} s ago: "
                f"it is kept for its holder {left:.0f} s more, unless an operator releases it "
                f"({self.release_command.format(name)} on the rendez-vous host)")

    def bind(self, name: str, node_id: str) -> None:
        """``name`` is held by ``node_id`` now (linked)."""
        self._by_name[name] = Binding(node_id)
        if len(self._by_name) >= self._prune_at:  # (amortized: the work is proportional to the binds)
            self.prune()
            self._prune_at = max(self.PRUNE_FIRST_AT, 2 * len(self._by_name))

    def lost(self, name: str, node_id: str) -> None:
        """The holder ``node_id`` of ``name`` is gone without a word: the grace starts."""
        binding = self._by_name.get(name)
        if binding is not None and binding.node_id == node_id and binding.lost_at is None:
            binding.lost_at = self._clock()

    def left(self, name: str, node_id: str) -> None:
        """The holder ``node_id`` of ``name`` leaves cleanly: anyone may take it once it is gone."""
        binding = self._by_name.get(name)
        if binding is not None and binding.node_id == node_id:
            binding.released = True

    def release(self, name: str) -> Optional[Binding]:
        """An operator frees ``name``; returns the binding it had (None: there was none)."""
        return self._by_name.pop(name, None)

    def prune(self) -> None:
        """Forget the bindings nobody is owed any more (released, or lost beyond the grace)."""
        now = self._clock()
        for name in [n for n, b in self._by_name.items()
                     if b.released and b.lost_at is not None or b.lost_at is not None and now - b.lost_at >= self.grace_s]:
            del self._by_name[name]

    def to_json(self) -> Dict[str, dict]:
        now = self._clock()
        return {name: {"node_id": b.node_id, "released": b.released,
                       "lost_s_ago": None if b.lost_at is None else round(now - b.lost_at, 1)}
                for name, b in self._by_name.items()}


class Directory:
    """Node entries by id and by name, with a change event for waiters."""

    def __init__(self) -> None:
        self._by_id: Dict[str, wire.NodeEntry] = {}
        self._by_name: Dict[str, str] = {}
        self._by_leader: Dict[str, Set[str]] = {}  # leader id -> its members' ids
        self._changed = gevent.event.Event()
        self._listeners: List[Callable[[List[wire.NodeEntry], List[wire.NodeEntry]], None]] = []
        self._pending_snapshot: Optional[List[wire.NodeEntry]] = None
        self.version = 0
        self.updated_at = time.time()
        # What this replica was sent and what it changed (for status, tests and benchmarks):
        # updates applied (a snapshot series counts once, when complete), snapshots among them,
        # entries received in them, entries that changed something, listener calls.
        self.counters: Dict[str, int] = {"updates": 0, "snapshots": 0, "entries": 0, "changed": 0, "notified": 0}

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
        return [self._by_id[i] for i in self._by_leader.get(leader_id, ())]

    def count_members(self, leader_id: str) -> int:
        """How many members leader ``leader_id`` has here."""
        return len(self._by_leader.get(leader_id, ()))

    def _index(self, entry: wire.NodeEntry) -> None:
        if entry.leader != entry.node_id:
            self._by_leader.setdefault(entry.leader, set()).add(entry.node_id)

    def _unindex(self, entry: wire.NodeEntry) -> None:
        members = self._by_leader.get(entry.leader)
        if members is not None:
            members.discard(entry.node_id)
            if not members:
                del self._by_leader[entry.leader]

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
            self._by_leader.clear()
        else:
            for node_id in left:
                entry = self._by_id.pop(node_id, None)
                if entry is not None:
                    self._by_name.pop(entry.name, None)
                    self._unindex(entry)
                    removed[node_id] = entry
        added = []
        for entry in joined:
            old = self._by_id.get(entry.node_id)
            if old is not None:
                self._unindex(old)
                if old.name != entry.name:
                    self._by_name.pop(old.name, None)
            other = self._by_name.get(entry.name)
            if other is not None and other != entry.node_id:
                # The name moved to a new node id (a node restarted): the old id is gone.
                removed[other] = self._by_id.pop(other)
                self._unindex(removed[other])
            self._by_id[entry.node_id] = entry
            self._index(entry)
            self._by_name[entry.name] = entry.node_id
            previous = before.get(entry.node_id) if before is not None else (old or removed.get(entry.node_id))
            if previous is not entry and previous != entry:  # (decoded entries are often the same object)
                added.append(entry)
        if before is not None:
            gone = [e for i, e in before.items() if i not in self._by_id]
        else:
            gone = [e for i, e in removed.items() if i not in self._by_id]
        if added or gone:
            self.version += 1
            self.updated_at = time.time()
            self.counters["changed"] += len(added) + len(gone)
            self.counters["notified"] += 1
            for listener in list(self._listeners):
                listener(added, gone)
            fired, self._changed = self._changed, gevent.event.Event()
            fired.set()
        return added, gone

    def wait_changed(self, timeout: float | None = None) -> bool:
        """Block (cooperatively) until the next change; return False on timeout."""
        return self._changed.wait(timeout)

    def to_json(self, max_bytes: Optional[int] = None) -> list:
        """The entries as JSON, by cluster and name; with ``max_bytes``, only the first ones
        that fit in that much JSON (:func:`bounded_json`; ``len(self)`` says how many in all)."""
        entries = (e.to_json() for e in sorted(self._by_id.values(), key=lambda e: ((e.cluster or ""), e.name)))
        if max_bytes is None:
            return list(entries)
        return bounded_json(entries, max_bytes)[0]

    def status(self) -> dict:
        """The status fields for the directory (``directory``, at most STATUS_MAX_BYTES of it;
        ``directory_size``, how many entries in all; ``directory_truncated``)."""
        entries = self.to_json(STATUS_MAX_BYTES)
        return {"directory": entries, "directory_size": len(self), "directory_truncated": len(entries) < len(self)}

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
        counters = self.counters
        counters["entries"] += len(update.joined) + len(update.left)
        if update.snapshot:
            self._pending_snapshot = []
        pending = self._pending_snapshot
        if pending is None:
            counters["updates"] += 1
            return self.apply(update.joined, update.left)
        pending.extend(update.joined)
        if update.more:
            return [], []
        self._pending_snapshot = None
        counters["updates"] += 1
        counters["snapshots"] += 1
        local_ids = {e.node_id for e in keep}
        upstream = {e.node_id: e for e in pending if e.node_id in local_ids}
        # The kept entries are ours, but what only the rendez-vous node knows of them (the
        # address it sees, its dial-back verdict) comes from the snapshot: with coalesced
        # broadcasts a verdict may travel in the snapshot and never again on its own.
        local = [_with_upstream_facts(e, upstream.get(e.node_id)) for e in keep]
        return self.apply([e for e in pending if e.node_id not in local_ids] + local, (), replace=True)


def _with_upstream_facts(mine: wire.NodeEntry, theirs: Optional[wire.NodeEntry]) -> wire.NodeEntry:
    """``mine`` with the rendez-vous node's facts of it from ``theirs`` (``observed``,
    ``inbound``), where it has them and the entry is the same registration (same addresses)."""
    if theirs is None or theirs.addrs != mine.addrs:
        return mine
    observed = theirs.observed if theirs.observed is not None else mine.observed
    inbound = theirs.inbound if theirs.inbound is not None else mine.inbound
    if (observed, inbound) == (mine.observed, mine.inbound):
        return mine
    return dataclasses.replace(mine, observed=observed, inbound=inbound)


def _encoded(updates: Iterable[wire.DirectoryUpdate]) -> List[wire.Encoded]:
    """``updates`` encoded once each; one that cannot be (a bug: an entry breaking a field
    rule) is logged and left out, as a link leaves out a message it cannot encode."""
    out = []
    for update in updates:
        try:
            out.append(wire.encode_once(update))
        except LocalProtocolError as exc:
            log.error("not broadcasting a directory update: %s", exc)
    return out


class Broadcaster:
    """Directory changes passed on to a set of links, coalesced and encoded once (see the
    module docstring).

    ``directory`` is the directory whose changes go out (its current entries are what is
    sent); ``targets()`` returns the links to send to (objects with ``send(message)`` and
    ``closed``). Call :meth:`changed` with every change (a :meth:`Directory.add_listener`
    listener), :meth:`welcome` with each new link (instead of sending it a snapshot), and
    :meth:`close` when the owner stops. ``clock`` is injected for tests.
    """

    def __init__(self, directory: "Directory", targets: Callable[[], Iterable], *,
                 interval_s: float = BROADCAST_INTERVAL_S, batch_entries: int = BROADCAST_BATCH_ENTRIES,
                 per_link_s: float = BROADCAST_PER_LINK_S, clock: Callable[[], float] = time.monotonic) -> None:
        self.directory = directory
        self.interval_s = interval_s
        self.per_link_s = per_link_s
        self._links = 0  # links the last broadcast went to
        self.batch_entries = batch_entries
        self._targets = targets
        self._clock = clock
        self._pending: Dict[str, None] = {}  # node ids changed since the last broadcast, in order
        self._fresh: List = []  # links that get a snapshot at the next broadcast
        self._last = float("-inf")
        self._timer: Optional[gevent.Greenlet] = None
        self._timer_at = 0.0
        # What went out (for status, tests and benchmarks): broadcasts, updates queued, snapshots.
        self.counters: Dict[str, int] = {"broadcasts": 0, "updates": 0, "snapshots": 0}

    def changed(self, joined: Iterable[wire.NodeEntry], left: Iterable[wire.NodeEntry]) -> None:
        """Entries ``joined`` (added or changed) and ``left`` (gone) go out with the next broadcast."""
        for entry in joined:
            self._pending[entry.node_id] = None
        for entry in left:
            self._pending[entry.node_id] = None
        if self._pending:
            self._schedule()

    def welcome(self, link) -> None:
        """``link`` came up: it gets the whole directory with the next broadcast (and no update
        before that)."""
        self._fresh.append(link)
        self._schedule()

    def close(self) -> None:
        """Stop: nothing more goes out."""
        if self._timer is not None:
            self._timer.kill(block=False)
            self._timer = None
        self._pending.clear()
        self._fresh.clear()

    def _schedule(self) -> None:
        now = self._clock()
        at = now if len(self._pending) >= self.batch_entries else max(now, self._last + self.interval())
        if self._timer is not None:
            if self._timer_at <= at:
                return
            self._timer.kill(block=False)  # (a full batch goes sooner than the timer would)
        self._timer_at = at
        self._timer = gevent.spawn_later(at - now, self._fire)

    def interval(self) -> float:
        """The time between two broadcasts now: ``interval_s``, or ``per_link_s`` times the
        number of links the last one went to if that is more."""
        return max(self.interval_s, self._links * self.per_link_s)

    def _fire(self) -> None:
        self._timer = None
        self.flush()

    def flush(self) -> None:
        """Send what waits now: one update (or a few, within the size limits) with the current
        state of every node id that changed, to every link but the new ones; the whole
        directory to the new ones."""
        self._last = self._clock()
        pending, self._pending = self._pending, {}
        fresh, self._fresh = self._fresh, []
        directory = self.directory
        update = []
        if pending:
            joined, left = [], []
            for node_id in pending:
                entry = directory.get(node_id)
                if entry is None:
                    left.append(node_id)
                else:
                    joined.append(entry)
            step = wire.MAX_ENTRIES_PER_UPDATE  # (joined and left in one message, each within the limit)
            update = _encoded(wire.DirectoryUpdate(joined=tuple(joined[i : i + step]), left=tuple(left[i : i + step]))
                              for i in range(0, max(len(joined), len(left)), step))
        snapshot = _encoded(directory.snapshot_updates()) if fresh else []
        fresh_ids = {id(link) for link in fresh}
        sent = 0
        if update:
            for link in list(self._targets()):
                if id(link) in fresh_ids or link.closed:
                    continue
                for frame in update:
                    link.send(frame)
                sent += 1
        for link in fresh:
            if not link.closed:
                for frame in snapshot:
                    link.send(frame)
                self.counters["snapshots"] += 1
        self.counters["broadcasts"] += 1
        self.counters["updates"] += sent
        self._links = sent + len(fresh)
