"""gridsock._ratelog: log lines that peers provoke, per-key and global token buckets, on an injected clock."""
from __future__ import annotations

import logging
from typing import List

import pytest

from gridsock._ratelog import RateLimitedLog


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: List[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    @property
    def messages(self) -> List[str]:
        return [r.getMessage() for r in self.records]


@pytest.fixture
def lines():
    logger = logging.getLogger("gridsock.test_ratelog")
    handler = Lines()
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield logger, handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(logging.NOTSET)


def limiter(logger, clock, **kwargs) -> RateLimitedLog:
    kwargs = {"burst": 3, "rate_per_s": 1.0, "global_burst": 100, "global_rate_per_s": 100.0,
              "summary_interval_s": 1e9, **kwargs}
    return RateLimitedLog(logger, clock=clock, **kwargs)


def test_a_burst_then_suppressed_then_one_line_saying_how_many(lines):
    logger, handler = lines
    clock = Clock()
    rl = limiter(logger, clock)
    results = [rl.warning("10.0.0.1", "dropped %s: %s", f"10.0.0.1:{i}", "garbage") for i in range(10)]
    assert results == [True] * 3 + [False] * 7
    assert handler.messages == [f"dropped 10.0.0.1:{i}: garbage" for i in range(3)]
    assert handler.records[0].msg == "dropped %s: %s"  # the record is the caller's, args and all
    assert rl.suppressed_total == 7
    clock.now += 1.0  # one token back
    assert rl.warning("10.0.0.1", "dropped %s", "again")
    assert handler.messages[3:] == ["suppressed 7 similar message(s) from 10.0.0.1 in the last 1 s", "dropped again"]
    assert handler.records[3].levelno == logging.WARNING
    assert {r.filename for r in handler.records} == {"test_ratelog.py"}  # records name the caller's line


def test_keys_are_limited_apart_and_the_global_bucket_bounds_them_all(lines):
    logger, handler = lines
    clock = Clock()
    rl = limiter(logger, clock, burst=2, global_burst=5, global_rate_per_s=0.0)
    logged = sum(rl.info(f"host{i}", "line %d", i) for i in range(4) for _ in range(3))
    assert logged == 5  # 2 + 2 from the first two keys, then 1 of the third before the global budget ran out
    assert len(handler.records) == 5 and rl.suppressed_total == 7


def test_a_summary_reports_keys_that_went_quiet_and_forgotten_keys(lines):
    logger, handler = lines
    clock = Clock()
    rl = limiter(logger, clock, burst=1, rate_per_s=0.0, max_keys=2)
    for key in ("a", "a", "a", "b", "b", "c", "c"):  # "a" is forgotten when "c" comes
        rl.warning(key, "from %s", key)
    assert handler.messages == ["from a", "from b", "from c"]
    assert rl.summarize() == 4
    assert handler.messages[-1] == "suppressed 4 similar message(s) from 2 source(s) (most from b: 1)"
    assert rl.summarize() == 0  # said once


def test_the_summary_comes_by_itself_every_interval(lines):
    logger, handler = lines
    clock = Clock()
    rl = limiter(logger, clock, burst=1, rate_per_s=0.0, summary_interval_s=30.0)
    for _ in range(5):
        rl.warning("x", "noise")
    assert len(handler.records) == 1
    clock.now += 31.0
    rl.warning("y", "other")
    assert handler.messages[-1].startswith("suppressed 4 similar message(s) from 1 source(s) (most from x: 4)")


def test_a_level_nobody_listens_to_spends_nothing(lines):
    logger, handler = lines
    logger.setLevel(logging.WARNING)
    clock = Clock()
    rl = limiter(logger, clock, burst=1)
    assert not rl.info("k", "quiet")
    assert rl.warning("k", "loud")
    assert handler.messages == ["loud"] and rl.suppressed_total == 0


def test_memory_stays_bounded_whatever_the_keys(lines):
    logger, _ = lines
    rl = limiter(logger, Clock(), max_keys=16)
    for i in range(5000):
        rl.info(("peer", i), "line")
    assert len(rl._keys) <= 16


def test_bad_settings_are_refused(lines):
    logger, _ = lines
    with pytest.raises(ValueError):
        RateLimitedLog(logger, burst=0)
