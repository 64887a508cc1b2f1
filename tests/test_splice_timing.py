"""When the ``splice`` client's SYN leaves: the delay from the request's measured round trip.

(The splice itself needs a NAT or firewall that drops SYNs: tests/lab/test_round_trips.py checks
that the delayed SYN makes the connection on the first attempt, before the answer.)
"""
from __future__ import annotations

import pytest

from gridsock.components import splice
from gridsock.components.splice import (SPLICE_DELAY_MAX_S, SPLICE_DELAY_MIN_S, SPLICE_JITTER_K, SPLICE_SYN_AIM,
                                        _note_round_trip, syn_delay)


def test_no_estimate_no_delay():
    assert syn_delay(None, budget=10.0) == 0.0


def test_short_paths_are_not_delayed():
    # a one way under SPLICE_DELAY_MIN_S is the nodes' processing, not the path
    assert syn_delay(2 * SPLICE_DELAY_MIN_S * 0.99, budget=10.0) == 0.0


def test_the_delay_aims_between_the_servers_syn_and_the_answer():
    # the lab's wan10: the request's one way T = 20 ms (two legs), the direct one way T/2
    one_way = 0.020
    delay = syn_delay(2 * one_way, budget=10.0)
    assert delay == pytest.approx(SPLICE_SYN_AIM * one_way)
    # after the server's SYN left (T - T/2) and at most T (connected before the answer)
    assert one_way / 2 < delay <= one_way


def test_a_varying_request_time_makes_the_syn_earlier():
    one_way, deviation = 0.020, 0.002  # (the round trip's deviation: 1 ms of the one way)
    assert syn_delay(2 * one_way, deviation, budget=10.0) == pytest.approx(SPLICE_SYN_AIM * one_way
                                                                           - SPLICE_JITTER_K * deviation / 2)
    assert syn_delay(2 * one_way, 2 * one_way, budget=10.0) == 0.0  # it varies more than the margin


def test_the_delay_is_bounded():
    assert syn_delay(10.0, budget=100.0) == SPLICE_DELAY_MAX_S
    assert syn_delay(0.4, budget=0.2) == pytest.approx(0.05)  # a quarter of the connect's budget


def test_the_estimate_falls_at_once_and_rises_slowly():
    key = ("test-me", "test-peer")
    try:
        _note_round_trip(key, 0.040)
        assert splice._ROUND_TRIPS[key] == pytest.approx((0.040, 0.020))  # (TCP's first deviation: half)
        _note_round_trip(key, 0.120)  # one slow request moves it a quarter of the way
        assert splice._ROUND_TRIPS[key] == pytest.approx((0.060, 0.020 + (0.080 - 0.020) / 4))
        _note_round_trip(key, 0.030)
        assert splice._ROUND_TRIPS[key][0] == pytest.approx(0.030)
        for _ in range(30):  # a steady path: the deviation fades
            _note_round_trip(key, 0.030)
        assert splice._ROUND_TRIPS[key][1] < 0.0005
    finally:
        splice._ROUND_TRIPS.pop(key, None)


def test_the_estimates_are_bounded(monkeypatch):
    monkeypatch.setattr(splice, "_RTT_PEERS", 3)
    monkeypatch.setattr(splice, "_ROUND_TRIPS", type(splice._ROUND_TRIPS)())
    for i in range(5):
        _note_round_trip(("me", f"peer{i}"), 0.05)
    _note_round_trip(("me", "peer2"), 0.05)  # (used again: kept)
    assert list(splice._ROUND_TRIPS) == [("me", "peer3"), ("me", "peer4"), ("me", "peer2")]
