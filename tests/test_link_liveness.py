"""Liveness under load: a link whose peer spoke while this process was stalled is not silent."""
from __future__ import annotations

import uuid

import gevent
import gevent.event
import gevent.monkey
from gevent import socket as gsocket

from gridsock import wire
from gridsock.bootstrap.link import Link, _bytes_waiting, send_message

WAIT_S = 10.0
SRC, DST = str(uuid.uuid4()), str(uuid.uuid4())


def note(number: int) -> wire.Routed:
    return wire.Routed(src=SRC, dst=DST, kind="msg", topic="note", request_id=number, hops=1, route=("a",))


def test_bytes_waiting_sees_the_kernel_receive_queue():
    a, b = gsocket.socketpair()
    with a, b:
        assert not _bytes_waiting(a)
        b.sendall(b"x")
        gevent.socket.wait_read(a.fileno(), WAIT_S)
        assert _bytes_waiting(a)
        assert a.recv(1) == b"x"
        assert not _bytes_waiting(a)
    assert not _bytes_waiting(a)  # a closed socket: nothing waits, nothing raises


def test_a_link_is_not_closed_for_silence_while_this_process_stalls():
    ours, theirs = gsocket.socketpair()
    closed = []
    pings = {1: gevent.event.Event(), 2: gevent.event.Event()}

    def on_message(_link, message) -> None:
        if isinstance(message, wire.Routed) and message.request_id in pings:
            pings[message.request_id].set()

    link = Link(ours, wire.Decoder(), label="stalled", on_message=on_message,
                on_close=lambda l: closed.append(l.close_reason), ping_interval_s=0.05, timeout_s=0.3)
    link.start()
    try:
        send_message(theirs, note(1))
        assert pings[1].wait(WAIT_S)
        # The peer keeps speaking, but this process stalls (a blocking call, as heavy work would)
        # for several link timeouts: what it sent waits in the kernel, unread.
        send_message(theirs, note(2))
        gevent.monkey.get_original("time", "sleep")(1.0)
        assert pings[2].wait(WAIT_S)  # the link's greenlets run again: its reader takes what waited
        assert not link.closed, link.close_reason
    finally:
        link.close()
        theirs.close()
    assert closed and "no traffic" not in str(closed[0])


def test_a_silent_peer_is_still_dropped():
    ours, theirs = gsocket.socketpair()
    link = Link(ours, wire.Decoder(), label="silent", on_message=lambda _link, _message: None,
                ping_interval_s=0.05, timeout_s=0.3)
    link.start()
    try:
        link.join(WAIT_S)
        assert link.closed and link.close_reason.startswith("no traffic"), link.close_reason
    finally:
        link.close()
        theirs.close()


def test_a_stall_of_the_whole_process_is_not_the_peers_silence():
    # Both ends in this process (as a test grid's nodes, or a leader and its rendez-vous node on
    # one loaded host): while it stalls, neither can speak. Its stall is not counted as silence.
    ours, theirs = gsocket.socketpair()
    closed = []
    links = [Link(sock, wire.Decoder(), label=f"end {i}", on_message=lambda _link, _message: None,
                  on_close=lambda l: closed.append(l.close_reason), ping_interval_s=0.05, timeout_s=0.3)
             for i, sock in enumerate((ours, theirs))]
    for link in links:
        link.start()
    try:
        gevent.sleep(0.2)  # (both ping loops under way)
        gevent.monkey.get_original("time", "sleep")(1.0)  # three link timeouts, nothing sent
        gevent.sleep(0.5)  # several ping rounds after the stall: the pings flow again
        assert not closed, closed
    finally:
        for link in links:
            link.close()
