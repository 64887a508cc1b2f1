"""Join storms: many nodes joining at once converge, and directory broadcasts are coalesced.

The storm: a rendez-vous node and a hundred nodes on loopback, in this process, all started at
the same moment (leaders of no cluster, and one cluster with its members), until every node's
directory holds every node. The broadcaster (gridsock/bootstrap/directory.py) is checked on
its own with fake links: changes gathered in an interval go out as one update per link, encoded
once, with the current state of each node; a new link gets the whole directory instead.
What a node does with what it is sent: an entry decoded again is the one decoded before (not
checked again), a bad one stays refused; a snapshot that changes nothing changes nothing and
tells no listener. bench/bench_join.py measures the same at scale, with real processes.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import struct
import time
import uuid

import gevent
import gevent.event
import pytest

from gridsock import wire
from gridsock.errors import RemoteProtocolError
from gridsock.bootstrap.directory import Broadcaster, Directory
from gridsock.bootstrap.rendezvous import RendezvousNode
from gridsock.node import Node
from gridsock.session import create_session

pytestmark = pytest.mark.timeout(300)

# Generous: on this machine the storm converges in seconds; a loaded CI machine is slower.
CONVERGE_TIMEOUT_S = 180.0
JOIN_TIMEOUT_S = 180.0
LEADERS = 80
MEMBERS = 19  # of one more leader's cluster: 100 nodes in all
# Fake links see a broadcast within this long (it goes out at the next turn of the loop).
SEND_TIMEOUT_S = 10.0


def test_a_hundred_nodes_joining_at_once_converge(tmp_path):
    session = create_session(tmp_path / "session", "127.0.0.1:1")
    rv = RendezvousNode(session, listen_address="127.0.0.1:0", control="").start()
    session = dataclasses.replace(session, rendezvous_port=rv.address.port)
    options = dict(listen_address="127.0.0.1:0", control="", front_door=None, loop="caller")
    nodes = []
    try:
        for i in range(LEADERS):
            nodes.append(Node(session, f"l{i}", **options).start())
        chief = Node(session, "chief", cluster="C", **options).start()
        nodes.append(chief)
        for i in range(MEMBERS):
            nodes.append(Node(session, f"c{i}", cluster="C", leader=str(chief.address), **options).start())
        names = {n.name for n in nodes}
        deadline = time.monotonic() + CONVERGE_TIMEOUT_S
        for node in nodes:
            held = {e["name"] for e in node.wait_directory(present=names, timeout=max(1.0, deadline - time.monotonic()))}
            assert held == names, f"{node.name} holds {len(held)} names"
        assert {e.name for e in rv.directory} == names
        # Everyone learnt everyone through a handful of broadcasts, not one per join per leader.
        counters = rv._broadcaster.counters
        assert counters["snapshots"] >= LEADERS + 1
        assert chief._leader is not None and chief._leader._broadcaster.counters["snapshots"] >= MEMBERS
    finally:
        for node in nodes:
            node.stop()
        rv.stop()


# --- the broadcaster on its own ------------------------------------------------------------------

class FakeLink:
    """What a Broadcaster needs of a link: ``send`` (recorded) and ``closed``."""

    def __init__(self) -> None:
        self.sent = []
        self.closed = False
        self.got = gevent.event.Event()

    def send(self, message) -> bool:
        self.sent.append(message)
        self.got.set()
        return True

    def updates(self):
        """What was sent, decoded as a peer would."""
        decoder = wire.Decoder()
        for frame in self.sent:
            decoder.feed(wire.encode(frame))
        out = []
        while (message := decoder.next_message()) is not None:
            out.append(message)
        return out


def entry(name: str) -> wire.NodeEntry:
    node_id = str(uuid.uuid4())
    return wire.NodeEntry(node_id=node_id, name=name, cluster=None, leader=node_id, addrs=("127.0.0.1:7000",))


def broadcaster(links, **kwargs):
    directory = Directory()
    b = Broadcaster(directory, lambda: links, **kwargs)
    directory.add_listener(b.changed)
    return directory, b


def test_changes_in_one_interval_go_out_as_one_update_encoded_once():
    links = [FakeLink() for _ in range(5)]
    directory, b = broadcaster(links, interval_s=3600.0)
    try:
        first = entry("first")
        directory.put([first])  # after a quiet interval: at once
        for link in links:
            assert link.got.wait(SEND_TIMEOUT_S)
        assert [u.joined for u in links[0].updates()] == [(first,)]
        # Now a storm, within the interval: nothing goes out until the broadcast.
        joined = [entry(f"n{i}") for i in range(50)]
        for e in joined:
            directory.put([e])
        directory.put([dataclasses.replace(joined[0], inbound=True)])  # changed again
        directory.remove([joined[1].node_id])  # joined and left within the interval
        directory.remove([first.node_id])
        assert all(len(link.sent) == 1 for link in links)
        b.flush()
        assert all(len(link.sent) == 2 for link in links)
        assert len({id(link.sent[1]) for link in links}) == 1  # one frame, encoded once, for every link
        (update,) = links[0].updates()[1:]
        assert [e.name for e in update.joined] == [e.name for e in joined if e is not joined[1]]
        assert update.joined[0].inbound is True  # the current state, not each step
        assert set(update.left) == {joined[1].node_id, first.node_id}
        assert b.counters["broadcasts"] == 2 and b.counters["updates"] == 10
    finally:
        b.close()


def test_a_new_link_gets_the_whole_directory_and_not_the_update():
    old, new = FakeLink(), FakeLink()
    links = [old]
    directory, b = broadcaster(links, interval_s=3600.0)
    try:
        directory.put([entry("a")])
        assert old.got.wait(SEND_TIMEOUT_S)
        directory.put([entry("b")])
        links.append(new)
        b.welcome(new)
        b.flush()
        (snapshot,) = new.updates()
        assert snapshot.snapshot and not snapshot.more
        assert {e.name for e in snapshot.joined} == {"a", "b"}
        assert [[e.name for e in u.joined] for u in old.updates()] == [["a"], ["b"]]
        assert b.counters["snapshots"] == 1
    finally:
        b.close()


def test_a_full_batch_goes_out_at_once():
    link = FakeLink()
    directory, b = broadcaster([link], interval_s=3600.0, batch_entries=10)
    try:
        directory.put([entry("a")])
        assert link.got.wait(SEND_TIMEOUT_S)
        link.got.clear()
        directory.put([entry(f"n{i}") for i in range(9)])
        assert len(link.sent) == 1
        directory.put([entry("n9")])  # the tenth waiting id: no need to wait for the interval
        assert link.got.wait(SEND_TIMEOUT_S)
        assert len(link.updates()[1].joined) == 10
    finally:
        b.close()


def test_closed_links_and_closed_broadcasters_send_nothing():
    link, gone = FakeLink(), FakeLink()
    gone.closed = True
    directory, b = broadcaster([link, gone], interval_s=3600.0)
    directory.put([entry("a")])
    assert link.got.wait(SEND_TIMEOUT_S)
    assert gone.sent == []
    directory.put([entry("b")])
    b.close()
    b.flush()  # (what was pending went with close)
    assert len(link.sent) == 1


def test_an_entry_that_cannot_be_encoded_is_logged_and_the_rest_goes_on(caplog):
    link = FakeLink()
    directory, b = broadcaster([link], interval_s=3600.0)
    try:
        with caplog.at_level(logging.ERROR, logger="gridsock.bootstrap.directory"):
            directory.put([dataclasses.replace(entry("x"), name="not a name!")])  # (a bug would do this)
            gevent.wait([gevent.spawn(b.flush)], timeout=SEND_TIMEOUT_S)
        assert link.sent == []
        assert any("not broadcasting" in r.getMessage() for r in caplog.records)
        directory.remove([e.node_id for e in directory])
        directory.put([entry("good")])
        b.flush()
        assert [[e.name for e in u.joined] for u in link.updates()] == [["good"]]
    finally:
        b.close()


def test_the_interval_grows_with_the_links():
    links = [FakeLink() for _ in range(1000)]
    directory, b = broadcaster(links, interval_s=0.1, per_link_s=0.0005)
    try:
        assert b.interval() == 0.1  # (no broadcast yet)
        directory.put([entry("a")])
        assert links[0].got.wait(SEND_TIMEOUT_S)
        assert b.interval() == pytest.approx(0.5)
        del links[100:]
        b.flush()
        assert b.interval() == 0.1
    finally:
        b.close()


# --- what a node does with what it is sent ----------------------------------------------------

def decoded(*messages):
    """``messages`` encoded and decoded, as a node receives them."""
    decoder = wire.Decoder()
    for message in messages:
        decoder.feed(wire.encode(message))
    out = []
    while (message := decoder.next_message()) is not None:
        out.append(message)
    return out


def test_an_entry_decoded_again_is_the_one_decoded_before():
    e = dataclasses.replace(entry("again"), observed="127.0.0.1:7001", inbound=True)
    (first,), (second,) = (u.joined for u in decoded(wire.DirectoryUpdate(joined=(e,)), wire.DirectoryUpdate(joined=(e,))))
    assert first == e and second is first
    # Fields left out count as their defaults; an entry that differs in anything is another.
    bare = {k: v for k, v in e.to_json().items() if k not in ("role", "gateways")}
    assert wire.NodeEntry.from_json(bare) is first
    other = wire.NodeEntry.from_json(dict(e.to_json(), inbound=False))
    assert other is not first and other.inbound is False


@pytest.mark.parametrize("change", [
    {"inbound": 1},  # (1 == True, but it is not a boolean)
    {"inbound": 0},
    {"cluster": "MISSING"},  # a field with no default, left out
    {"role": None},
    {"addrs": "127.0.0.1:7000"},  # not a list
    {"addrs": [["127.0.0.1:7000"]]},  # (an unhashable item)
    {"addrs": [{"host": "127.0.0.1"}]},
    {"gateways": "socks(proxy=10.0.0.1:1080)"},
    {"observed": 7000},
])
def test_an_entry_like_one_decoded_before_but_bad_is_refused(change):
    e = dataclasses.replace(entry("good"), inbound=True)
    for known in (e, dataclasses.replace(e, inbound=False)):
        assert wire.NodeEntry.from_json(known.to_json()) == known  # (decoded once: known)
    bad = dict(e.to_json(), **change)
    if change.get("cluster") == "MISSING":
        del bad["cluster"]
    with pytest.raises(ValueError):
        wire.NodeEntry.from_json(bad)
    decoder = wire.Decoder()
    decoder.feed(raw_update([e.to_json(), bad]))
    with pytest.raises(RemoteProtocolError):
        decoder.next_message()
    assert wire.NodeEntry.from_json(e.to_json()) == e


def raw_update(joined: list) -> bytes:
    """A DirectoryUpdate frame made by hand, its ``joined`` as given (as a peer may send it)."""
    header = json.dumps({"joined": joined}).encode()
    body = struct.pack("!BBI", wire.PROTOCOL_VERSION, wire.DirectoryUpdate.TYPE, len(header)) + header
    return struct.pack("!I", len(body)) + body


def test_the_decoded_entries_kept_are_bounded(monkeypatch):
    monkeypatch.setattr(wire, "ENTRY_CACHE_ENTRIES", 8)
    entries = [entry(f"b{i}") for i in range(20)]
    first = wire.NodeEntry.from_json(entries[0].to_json())
    assert wire.NodeEntry.from_json(entries[0].to_json()) is first
    for e in entries[1:]:
        wire.NodeEntry.from_json(e.to_json())
    again = wire.NodeEntry.from_json(entries[0].to_json())
    assert again == first and again is not first  # (forgotten: decoded and checked again)
    monkeypatch.setattr(wire, "ENTRY_CACHE_ENTRIES", 0)  # no cache at all
    assert wire.NodeEntry.from_json(entries[0].to_json()) is not wire.NodeEntry.from_json(entries[0].to_json())


def test_a_snapshot_received_twice_tells_the_listeners_once():
    entries = [entry(f"s{i}") for i in range(5)]
    series = [wire.DirectoryUpdate(joined=tuple(entries[:3]), snapshot=True, more=True),
              wire.DirectoryUpdate(joined=tuple(entries[3:]))]
    directory = Directory()
    calls = []
    directory.add_listener(lambda joined, left: calls.append((len(joined), len(left))))
    for update in decoded(*series, *series):  # (the same snapshot again: a relink, say)
        directory.apply_update(update)
    assert calls == [(5, 0)]
    assert {e.name for e in directory} == {e.name for e in entries}
    assert directory.counters == {"updates": 2, "snapshots": 2, "entries": 10, "changed": 5, "notified": 1}
    # An update that repeats what the directory holds changes nothing either.
    directory.apply_update(wire.DirectoryUpdate(joined=tuple(entries[:2])))
    assert calls == [(5, 0)] and directory.counters["changed"] == 5
    # One that changes one entry and removes another tells the listeners once, of both.
    changed = dataclasses.replace(entries[0], inbound=True)
    directory.apply_update(wire.DirectoryUpdate(joined=(changed,), left=(entries[1].node_id,)))
    assert calls == [(5, 0), (1, 1)]
    assert directory.get(entries[0].node_id) == changed and entries[1].node_id not in directory


def test_a_leader_passes_fifty_joins_on_to_fifty_members_in_one_update_each():
    # What a leader does for its members (LeaderService): one Broadcaster over the member links.
    members = [FakeLink() for _ in range(50)]
    directory, b = broadcaster(members, interval_s=3600.0)
    try:
        directory.put([entry("first")])  # (after a quiet interval: at once)
        for link in members:
            assert link.got.wait(SEND_TIMEOUT_S)
        joins = [entry(f"j{i}") for i in range(50)]
        for e in joins:  # fifty updates from upstream, one join each, within the interval
            directory.apply_update(wire.DirectoryUpdate(joined=(e,)))
        assert all(len(link.sent) == 1 for link in members)
        b.flush()
        assert all(len(link.sent) == 2 for link in members)
        assert len({id(link.sent[1]) for link in members}) == 1  # encoded once
        (update,) = members[0].updates()[1:]
        assert [e.name for e in update.joined] == [e.name for e in joins]
        assert b.counters["updates"] == 2 * len(members)
    finally:
        b.close()


def test_members_started_with_their_leader_wait_for_it_instead_of_retrying(tmp_path, monkeypatch):
    # A cluster started all at once: the members reach their leader before it has its
    # certificate, and enroll through it before it has joined. They wait for it (bounded:
    # EARLY_MEMBER_WAIT_S, made generous here so that a slow machine cannot fail the test)
    # instead of being turned away and retrying after a backoff, a TLS handshake more each.
    from gridsock.bootstrap import leader as leader_module, nodeport

    monkeypatch.setattr(nodeport, "EARLY_MEMBER_WAIT_S", JOIN_TIMEOUT_S / 2)
    monkeypatch.setattr(leader_module, "EARLY_MEMBER_WAIT_S", JOIN_TIMEOUT_S / 2)
    session = create_session(tmp_path / "session", "127.0.0.1:1")
    rv = RendezvousNode(session, listen_address="127.0.0.1:0", control="").start()
    session = dataclasses.replace(session, rendezvous_port=rv.address.port)
    options = dict(listen_address="127.0.0.1:0", control="", front_door=None, loop="caller")
    nodes = []
    try:
        chief = Node(session, "chief", cluster="E", **options).start()
        nodes.append(chief)
        members = [Node(session, f"e{i}", cluster="E", leader=str(chief.address), **options) for i in range(5)]
        for member in members:
            nodes.append(member.start())
        names = {n.name for n in nodes}
        for node in nodes:
            node.wait_directory(present=names, timeout=JOIN_TIMEOUT_S)
        for member in members:
            assert [h["state"] for h in member.uplink_history] == ["up"], member.uplink_history
    finally:
        for node in nodes:
            node.stop()
        rv.stop()
