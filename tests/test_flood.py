"""Fairness and bounds under a flood (issue 16): link frames first, sources taking turns, bounded
queues, back-pressure, flooders cut, and a member flooding a victim through the rendez-vous node
while the victim and bystanders keep pinging.

The first tests drive links over socket pairs in this process; the last runs the scenario of
:mod:`gridsock.testing.flood` (the rendez-vous node and three clusters, each in a process of its
own, on loopback). Every wait is bounded and waits on a condition, never on a sleep.
"""
from __future__ import annotations

import time
import types
import uuid

import gevent
import gevent.event
import gevent.queue
import pytest
from gevent import socket as gsocket

from gridsock import wire
from gridsock.bootstrap.link import (FAIR_QUANTUM_BYTES, RECV_CHUNK_BYTES, ROUTED_QUEUE_BYTES, Link, QueueBudget,
                                     queue_ceiling_bytes)
from gridsock.bootstrap.directory import Directory
from gridsock.bootstrap.routing import FloodGuard, Router
from gridsock.testing.flood import FLOOD_TOPICS, FLOODER, PINGS, PING_TIMEOUT_S, run_flood

pytestmark = pytest.mark.timeout(120)

# Bounds on waits for things that take milliseconds on loopback; they only stop a broken test.
WAIT_S = 20.0
# How long the flood of the end-to-end test lasts.
FLOOD_S = 5.0

S1, S2, S3 = (str(uuid.uuid4()) for _ in range(3))
DST = str(uuid.uuid4())


def routed(src: str, size: int, topic: str = "relay", dst: str = DST) -> wire.Routed:
    return wire.Routed(src=src, dst=dst, kind="msg", topic=topic, hops=1, route=("x",), payload=bytes(size))


def wait_until(condition, what: str, timeout: float = WAIT_S) -> None:
    """Wait (cooperatively) until ``condition()``; fail naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        gevent.sleep(0.005)


class RecordingSocket:
    """A socket that keeps what is written and never has anything to read."""

    def __init__(self) -> None:
        self.writes: list = []
        self.closed = gevent.event.Event()

    def sendall(self, data) -> None:
        self.writes.append(bytes(data))

    def recv_into(self, buffer, nbytes=None) -> int:
        self.closed.wait()
        return 0

    def close(self) -> None:
        self.closed.set()


def decode_all(data: bytes) -> list:
    decoder = wire.Decoder()
    decoder.feed(data)
    out = []
    while True:
        message = decoder.next_message()
        if message is None:
            return out
        out.append(message)


# --- the writer's order ----------------------------------------------------------------------


def test_link_frames_go_first_then_routed_requests_then_bulk_with_sources_taking_turns():
    sock = RecordingSocket()
    link = Link(sock, wire.Decoder(), label="test", on_message=lambda link, message: None, budget=QueueBudget())
    size = FAIR_QUANTUM_BYTES + FAIR_QUANTUM_BYTES // 2
    for _ in range(6):
        assert link.send(routed(S1, size), bulk=True)
    for _ in range(3):
        assert link.send(routed(S2, size), bulk=True)
    assert link.send(routed(S3, 10, topic="ping"))  # a routed request: not bulk
    assert link.send(wire.Ping(7))  # a link frame, queued last
    total = link.routed_bytes
    link.start()
    try:
        wait_until(lambda: link.routed_bytes == 0, "the queues to drain")
        messages = decode_all(b"".join(sock.writes))
    finally:
        link.close()
        link.join(WAIT_S)
    assert isinstance(messages[0], wire.Ping) and messages[1].src == S3 and messages[1].topic == "ping"
    sources = [m.src for m in messages[2:]]
    assert sorted(sources) == sorted([S1] * 6 + [S2] * 3)
    # Turns: while both have frames, neither is more than one frame ahead of the other.
    for i in range(len(sources)):
        if S2 in sources[i:]:
            assert abs(sources[: i + 1].count(S1) - sources[: i + 1].count(S2)) <= 1, sources
    assert total > 0 and link.budget.queued_bytes == 0


def test_a_ping_is_answered_ahead_of_a_bulk_backlog():
    ours, theirs = gsocket.socketpair()
    budget = QueueBudget()
    link = Link(ours, wire.Decoder(), label="busy", on_message=lambda link, message: None, budget=budget)
    frame_bytes = 1024 * 1024
    frames = 16
    try:
        for _ in range(frames):
            assert link.send(routed(S1, frame_bytes), bulk=True)
        link.start()
        # The peer reads nothing yet: the writer is stuck in the socket with most frames queued.
        wait_until(lambda: link.routed_bytes < frames * frame_bytes, "the writer to start")
        theirs.sendall(wire.encode(wire.Ping(42)))
        wait_until(lambda: link.bytes_received > 0, "the ping to be read")
        received = bytearray()
        decoder = wire.Decoder()
        order = []
        with gevent.Timeout(WAIT_S):
            while len(order) < frames + 1:
                data = theirs.recv(RECV_CHUNK_BYTES)
                assert data, "the link closed"
                decoder.feed(data)
                received += data
                while (message := decoder.next_message()) is not None:
                    order.append(message)
        pong = next(i for i, m in enumerate(order) if isinstance(m, wire.Pong))
        assert order[pong].nonce == 42
        # Behind the pong: only what was in the socket and the write under way (a few frames).
        assert pong <= 4, f"the pong came after {pong} of {frames} bulk frames"
    finally:
        link.close()
        link.join(WAIT_S)
        theirs.close()
    assert budget.queued_bytes == 0


# --- bounds --------------------------------------------------------------------------------------


def test_routed_frames_past_a_hard_bound_are_dropped_and_the_link_stays():
    budget = QueueBudget(limit_bytes=1024 * 1024)
    link = Link(RecordingSocket(), wire.Decoder(), label="bounded", on_message=lambda link, message: None,
                source_share_bytes=256 * 1024, link_queue_bytes=4 * 1024 * 1024, budget=budget)
    frame = 100 * 1024
    accepted = sum(link.send(routed(S1, frame), bulk=True) for _ in range(20))
    # A source's hard bound is twice its share.
    assert accepted * frame <= 2 * 256 * 1024 + frame and link.frames_dropped == 20 - accepted
    assert not link.has_room(S1) and link.has_room(S2)
    # The process's budget bounds all sources together.
    for i in range(40):
        link.send(routed(str(uuid.uuid4()), frame), bulk=True)
    assert budget.queued_bytes <= budget.limit_bytes and link.routed_bytes == budget.queued_bytes
    assert not link.closed
    link.close()
    assert budget.queued_bytes == 0


def test_the_stated_ceiling_covers_the_routed_budget_and_each_link():
    assert queue_ceiling_bytes(0) == ROUTED_QUEUE_BYTES
    assert queue_ceiling_bytes(3) - queue_ceiling_bytes(2) >= 2 * wire.MAX_FRAME_BYTES


# --- the guard: back-pressure, then the cut ---------------------------------------------------


class Forwarder:
    """A node that forwards what arrives on ``incoming`` (a link from ``peer_id``) to ``out`` (a
    link to a peer that reads ``read_bytes`` every ``read_pause_s``: a slow one), through ``guard``."""

    def __init__(self, guard: FloodGuard, *, peer_id: str, share: int, read_bytes: int, read_pause_s: float,
                 ping_interval_s: float = 2.0, timeout_s: float = 6.0) -> None:
        self.budget = QueueBudget()
        self.guard = guard
        self.sender, incoming_sock = gsocket.socketpair()
        out_sock, self.sink = gsocket.socketpair()
        self.out = Link(out_sock, wire.Decoder(), label="out", on_message=lambda link, message: None,
                        source_share_bytes=share, link_queue_bytes=8 * share, budget=self.budget).start()
        self.incoming = Link(incoming_sock, wire.Decoder(), label="in", budget=self.budget,
                             on_message=lambda link, message: guard.forward(self.out, message),
                             ping_interval_s=ping_interval_s, timeout_s=timeout_s)
        self.incoming.peer_id = peer_id
        self.incoming.start()
        self.arrived: dict = {}
        self.extra: gevent.queue.Queue = gevent.queue.Queue()  # frames the flooder puts between its own
        self._read_bytes = read_bytes
        self._read_pause_s = read_pause_s
        self._greenlets = [gevent.spawn(self._read_sink)]

    def _read_sink(self) -> None:
        decoder = wire.Decoder()
        while True:
            data = self.sink.recv(self._read_bytes)
            if not data:
                return
            decoder.feed(data)
            while (message := decoder.next_message()) is not None:
                if isinstance(message, wire.Routed):
                    self.arrived[message.src] = self.arrived.get(message.src, 0) + 1
            gevent.sleep(self._read_pause_s)  # a slow reader (not a wait for readiness)

    def flood(self, src: str, frame_bytes: int, *, count: int, topic: str = "relay") -> gevent.Greenlet:
        """Write ``count`` routed frames from ``src`` on the incoming link as fast as it takes them,
        and the frames put in ``extra`` between them (one writer on the socket)."""
        data = wire.encode(routed(src, frame_bytes, topic))

        def run():
            sent = 0
            try:
                for _ in range(count):
                    while not self.extra.empty():
                        self.sender.sendall(self.extra.get())
                    self.sender.sendall(data)
                    sent += 1
            except OSError:
                pass
            return sent

        greenlet = gevent.spawn(run)
        self._greenlets.append(greenlet)
        return greenlet

    def close(self) -> None:
        for greenlet in self._greenlets:
            greenlet.kill()
        self.incoming.close()
        self.out.close()
        self.incoming.join(WAIT_S)
        self.out.join(WAIT_S)
        self.sender.close()
        self.sink.close()


def test_a_flooder_on_its_own_link_is_held_then_its_link_is_closed():
    guard = FloodGuard("L", hold_max_s=5.0, flood_held_s=0.5, flood_window_s=30.0)
    share = 256 * 1024
    node = Forwarder(guard, peer_id=S1, share=share, read_bytes=64 * 1024, read_pause_s=0.01)
    try:
        flood = node.flood(S1, 64 * 1024, count=100000, topic="flood")  # (not bulk: see the next test)
        wait_until(lambda: node.incoming.closed, "the flooder's link to close")
        assert node.incoming.close_reason.startswith("flooding"), node.incoming.close_reason
        assert guard.counters["closed"] == 1 and guard.counters["held"] > 0
        # It was held all along: its queue ahead never went past its share by more than a frame.
        assert node.out.peak_routed_bytes <= share + 64 * 1024 + 200
        assert flood.get(timeout=WAIT_S) < 100000
    finally:
        node.close()
    assert node.budget.queued_bytes == 0


def test_bulk_data_on_its_sources_own_link_is_only_held():
    # Relayed data is flow-controlled end to end: a node moving many relayed connections through
    # a slow link ahead is held (back-pressure on its own link), never cut as a flooder.
    guard = FloodGuard("rendezvous", hold_max_s=5.0, flood_held_s=0.5, flood_window_s=30.0)
    share = 256 * 1024
    node = Forwarder(guard, peer_id=S1, share=share, read_bytes=64 * 1024, read_pause_s=0.01)
    try:
        node.flood(S1, 64 * 1024, count=100000)
        wait_until(lambda: guard.counters["held_s"] > 4 * guard.flood_held_s, "the source to be held a while")
        assert not node.incoming.closed and guard.counters["cut"] == 0 and guard.counters["closed"] == 0
        assert node.out.peak_routed_bytes <= share + 64 * 1024 + 200  # held within its share all along
    finally:
        node.close()
    assert node.budget.queued_bytes == 0


def test_a_flooding_source_behind_a_shared_link_is_cut_and_the_others_still_pass():
    guard = FloodGuard("rendezvous", hold_max_s=5.0, flood_held_s=0.5, flood_window_s=30.0, cut_s=600.0)
    share = 256 * 1024
    leader = str(uuid.uuid4())  # the link is a leader's: S1 and S2 are its members
    node = Forwarder(guard, peer_id=leader, share=share, read_bytes=64 * 1024, read_pause_s=0.01)
    try:
        node.flood(S1, 64 * 1024, count=100000)
        wait_until(lambda: guard.counters["cut"] == 1, "the flooding source to be cut")
        assert guard.status()["cut_now"] == [S1] and guard.cut_sources == [S1]
        assert not node.incoming.closed, "the shared link was closed"
        dropped = guard.counters["dropped"]
        # The flood goes on and is dropped here, unheld; another source on the same link passes.
        wait_until(lambda: guard.counters["dropped"] > dropped + 10, "the cut source's messages to be dropped")
        for _ in range(5):
            node.extra.put(wire.encode(routed(S2, 100)))
        wait_until(lambda: node.arrived.get(S2) == 5, "the other source's messages to arrive")
        assert guard.is_cut(S1) and not guard.is_cut(S2)
    finally:
        node.close()


def test_a_held_link_is_not_taken_for_a_silent_one_and_a_stalled_link_ahead_is_not_waited_for():
    # The peer ahead reads nothing at all; the incoming link times out after 1.5 s of silence,
    # and a hold lasts longer than that.
    guard = FloodGuard("L", hold_max_s=4.0, flood_held_s=60.0)
    share = 64 * 1024
    node = Forwarder(guard, peer_id=str(uuid.uuid4()), share=share, read_bytes=1, read_pause_s=3600.0,
                     ping_interval_s=0.1, timeout_s=1.5)
    keepalive = None
    try:
        # Fill the socket ahead and S1's share on the link ahead.
        while node.out.has_room(S1):
            assert node.out.send(routed(S1, 32 * 1024), bulk=True)
            gevent.sleep(0)
        wait_until(lambda: node.out.stalled_s > 0, "the link ahead to stall")

        def ping_forever():  # the incoming peer is alive: it pings; what it sends waits unread while held
            while True:
                node.sender.sendall(wire.encode(wire.Ping(1)))
                gevent.sleep(0.05)

        keepalive = gevent.spawn(ping_forever)
        node.sender.sendall(wire.encode(routed(S1, 100)))
        wait_until(lambda: guard.counters["dropped"] == 1, "the message to be dropped after the hold")
        assert guard.counters["held"] == 1 and guard.counters["held_s"] >= 0.9 * guard.hold_max_s
        assert not node.incoming.closed, node.incoming.close_reason
        # Held once for nothing: the next message for the stalled link is dropped at once.
        node.sender.sendall(wire.encode(routed(S1, 100)))
        wait_until(lambda: guard.counters["dropped"] == 2, "the second message to be dropped")
        assert guard.counters["held"] == 1 and guard.counters["cut"] == 0
    finally:
        if keepalive is not None:
            keepalive.kill()
        node.close()


class KeepingLink:
    """A link that keeps what it is given (all a router needs)."""

    closed = False

    def __init__(self) -> None:
        self.sent: list = []

    def send(self, message, *, bulk: bool = False, checked: bool = True) -> bool:
        self.sent.append(message)
        return True

    def wait_room(self, *, bulk: bool = False) -> None:
        pass


def test_handlers_run_at_most_max_deliveries_at_once_and_the_rest_is_answered_busy():
    directory = Directory()
    directory.put([wire.NodeEntry(node_id="id-m", name="m", cluster="A", leader="id-L", role="member")])
    host = types.SimpleNamespace(name="m", node_id="id-m", directory=directory)
    up = KeepingLink()
    router = Router(host, up=lambda: up, max_deliveries=4, delivery_wait_s=0.2)
    release = gevent.event.Event()
    running = []

    def slow(delivery):
        running.append(delivery)
        release.wait()
        return b"done"

    router.handle("slow", slow)
    for i in range(6):
        router.route(wire.Routed(src="id-x", dst="m", kind="req", topic="slow", request_id=i, hops=2, route=("x",)))
    wait_until(lambda: len(running) == 4, "four handlers to run")
    # The fifth and sixth waited for room, in vain: answered busy, not queued.
    busy = [m for m in up.sent if m.kind == "err"]
    assert [m.request_id for m in busy] == [4, 5] and b"busy" in busy[0].payload
    assert router.counters["dropped"] == 2
    release.set()
    wait_until(lambda: len([m for m in up.sent if m.kind == "rep"]) == 4, "the four answers")
    # Room again: the next request is handled at once.
    router.route(wire.Routed(src="id-x", dst="m", kind="req", topic="slow", request_id=9, hops=2, route=("x",)))
    wait_until(lambda: any(m.kind == "rep" and m.request_id == 9 for m in up.sent), "the next answer")


# --- end to end: a member floods a victim through the rendez-vous node ---------------------------


def flooders_link(process: str, label: str) -> bool:
    """Is this link the flooder's own: its member link at a1, or its uplink?"""
    return (process == "A" and label.startswith(f"member {FLOODER} ")) or process == "F"


@pytest.mark.parametrize("topic", FLOOD_TOPICS)
def test_a_member_flooding_a_victim_is_slowed_and_nobody_else_is_dropped(tmp_path, topic):
    result = run_flood(tmp_path, duration_s=FLOOD_S, topic=topic)
    assert not result["aborted"]
    # Every ping of the victim and the bystanders was answered within PING_TIMEOUT_S.
    assert set(result["pings"]) == {f"{src}->{dst}" for src, dst in PINGS}
    for pair, pings in result["pings"].items():
        assert pings["count"] > 0 and pings["failures"] == [], (pair, pings)
        assert pings["max_s"] < PING_TIMEOUT_S
    # No link but the flooder's own was dropped.
    others = [c for c in result["closures"] if not flooders_link(c[0], c[1])]
    assert others == [], others
    # The flood was slowed (held somewhere) or cut.
    guards = list(result["guards"].values()) + [result["rv_guard"]]
    assert sum(g["held"] + g["cut"] for g in guards) > 0, guards
    assert result["flood"]["sent_bytes"] > 0
    # The rendez-vous node's memory stayed under its stated ceiling (three leader links).
    assert result["routed_queue_peak"] <= ROUTED_QUEUE_BYTES
    growth = result["rv_rss"]["max"] - result["rv_rss"]["start"]
    assert growth < queue_ceiling_bytes(3), result["rv_rss"]
