"""Log lines that remote peers provoke, rate-limited: a flood of bad input is a few lines, not a flood.

Theory of operation
-------------------
A peer that sends garbage gets one log line per connection from the code that drops it; a peer
that opens thousands of connections a second would write hundreds of KB/s into the log. A
:class:`RateLimitedLog` sits between such call sites and their logger:

- each *key* (the peer's host, say) has a token bucket of ``burst`` lines, refilled at
  ``rate_per_s``; one bucket for all keys together (``global_burst``, ``global_rate_per_s``)
  bounds what many peers (or one with many addresses) can write;
- a line whose key, or the whole instance, is out of tokens is not logged but counted;
- when a key that had lines suppressed logs again, a line ``suppressed N similar message(s)
  from KEY`` comes first; at most every ``summary_interval_s``, any call also reports, in one
  line, what was suppressed for keys that have not logged since (a peer that went quiet);
- the keys are bounded (``max_keys``, least recently used out first; what an evicted key had
  suppressed goes into that summary), so a peer cannot grow this either.

Records keep their message and arguments (``logger.log(level, msg, *args)``), so handlers and
tests see what they would see without the limiter. Nothing here does I/O beyond the logger; the
clock is injected. One instance belongs to one hub (gevent thread): it takes no locks.
"""
from __future__ import annotations

import logging
import time
from collections import OrderedDict
from typing import Callable, Hashable, Optional

__all__ = ["RateLimitedLog", "LINE_BURST", "LINE_RATE_PER_S", "GLOBAL_BURST", "GLOBAL_RATE_PER_S", "MAX_KEYS",
           "SUMMARY_INTERVAL_S"]

# Lines one key (a peer's host) may log at once, then one every 1/LINE_RATE_PER_S seconds: enough
# to see what a peer does wrong, not enough for it to fill a disk (a line a minute, sustained).
LINE_BURST = 10
LINE_RATE_PER_S = 1 / 60
# All keys of one instance (one listener) together: a burst, then one line every 2 s at most.
GLOBAL_BURST = 50
GLOBAL_RATE_PER_S = 0.5
# Keys remembered (each a few hundred bytes); beyond, the least recently used is forgotten.
MAX_KEYS = 1024
# How often, at most, one line sums up what was suppressed for keys that went quiet.
SUMMARY_INTERVAL_S = 60.0


class _Bucket:
    __slots__ = ("tokens", "at", "suppressed", "level", "since")

    def __init__(self, tokens: float, at: float) -> None:
        self.tokens = tokens
        self.at = at
        self.suppressed = 0  # lines not logged since this key last logged
        self.level = logging.NOTSET  # the highest level among them
        self.since = at  # when the first of them came

    def take(self, now: float, rate_per_s: float, burst: float) -> bool:
        self.tokens = min(burst, self.tokens + (now - self.at) * rate_per_s)
        self.at = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False


class RateLimitedLog:
    """A logger's lines, rate-limited per key and in all (see the module docstring).

    ``log(level, key, msg, *args)`` logs like ``logger.log(level, msg, *args)`` or counts the
    line as suppressed; it returns True if the line was logged. ``warning``/``info``/``debug``
    are shorthands. Never raises for what it is given (a bad format is the logger's to report).
    """

    def __init__(self, logger: logging.Logger, *, burst: int = LINE_BURST, rate_per_s: float = LINE_RATE_PER_S,
                 global_burst: int = GLOBAL_BURST, global_rate_per_s: float = GLOBAL_RATE_PER_S,
                 max_keys: int = MAX_KEYS, summary_interval_s: float = SUMMARY_INTERVAL_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if burst < 1 or global_burst < 1 or max_keys < 1:
            raise ValueError("burst, global_burst and max_keys must be at least 1")
        self.logger = logger
        self.burst = burst
        self.rate_per_s = rate_per_s
        self.global_burst = global_burst
        self.global_rate_per_s = global_rate_per_s
        self.max_keys = max_keys
        self.summary_interval_s = summary_interval_s
        self._clock = clock
        now = clock()
        self._keys: "OrderedDict[Hashable, _Bucket]" = OrderedDict()
        self._global = _Bucket(global_burst, now)
        self._next_summary = now + summary_interval_s
        self._evicted = 0  # suppressed lines of keys forgotten since the last summary
        self._evicted_level = logging.NOTSET
        #: Lines suppressed since the instance was made (for status and tests).
        self.suppressed_total = 0
        #: Lines logged (the summaries included).
        self.logged_total = 0

    def warning(self, key: Hashable, msg: str, *args: object) -> bool:
        return self.log(logging.WARNING, key, msg, *args, _depth=1)

    def info(self, key: Hashable, msg: str, *args: object) -> bool:
        return self.log(logging.INFO, key, msg, *args, _depth=1)

    def debug(self, key: Hashable, msg: str, *args: object) -> bool:
        return self.log(logging.DEBUG, key, msg, *args, _depth=1)

    def log(self, level: int, key: Hashable, msg: str, *args: object, _depth: int = 0) -> bool:
        """Log ``msg % args`` at ``level`` unless ``key`` (or everything) is over its rate;
        return True if it was logged."""
        if not self.logger.isEnabledFor(level):
            return False  # (nobody would see it: no token spent)
        now = self._clock()
        bucket = self._keys.get(key)
        if bucket is None:
            bucket = self._keys[key] = _Bucket(self.burst, now)
            if len(self._keys) > self.max_keys:
                self._forget_oldest()
        else:
            self._keys.move_to_end(key)
        # The key's bucket first: a key over its rate does not spend the global budget.
        allowed = bucket.take(now, self.rate_per_s, self.burst) and \
            self._global.take(now, self.global_rate_per_s, self.global_burst)
        if allowed:
            if bucket.suppressed:
                self._emit(max(bucket.level, level), "suppressed %d similar message(s) from %s in the last %.0f s",
                           bucket.suppressed, key, now - bucket.since, stacklevel=3 + _depth)
                bucket.suppressed = 0
                bucket.level = logging.NOTSET
            self._emit(level, msg, *args, stacklevel=3 + _depth)  # (the record names our caller's line)
        else:
            if not bucket.suppressed:
                bucket.since = now
            bucket.suppressed += 1
            bucket.level = max(bucket.level, level)
            self.suppressed_total += 1
        if now >= self._next_summary:
            self.summarize(now)
        return allowed

    def summarize(self, now: Optional[float] = None) -> int:
        """Log one line for what was suppressed and not reported yet (keys that went quiet, keys
        forgotten), forget quiet keys; return how many lines it reported. Called by :meth:`log`
        every ``summary_interval_s``; call it when stopping to leave nothing unsaid."""
        now = self._clock() if now is None else now
        self._next_summary = now + self.summary_interval_s
        count, level, sources, top = self._evicted, self._evicted_level, 0, None
        for key in list(self._keys):
            bucket = self._keys[key]
            if bucket.suppressed:
                sources += 1
                count += bucket.suppressed
                level = max(level, bucket.level)
                if top is None or bucket.suppressed > top[1]:
                    top = (key, bucket.suppressed)
                bucket.suppressed = 0
                bucket.level = logging.NOTSET
            bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.at) * self.rate_per_s)
            bucket.at = now
            if bucket.tokens >= self.burst:  # as good as new: forget it
                del self._keys[key]
        self._evicted, self._evicted_level = 0, logging.NOTSET
        if not count:
            return 0
        if top is None:
            self._emit(level, "suppressed %d similar message(s) from sources no longer tracked", count)
        else:
            self._emit(level, "suppressed %d similar message(s) from %d source(s) (most from %s: %d)",
                       count, sources, top[0], top[1])
        return count

    # --- helpers ---------------------------------------------------------------------------

    def _forget_oldest(self) -> None:
        _, bucket = self._keys.popitem(last=False)
        if bucket.suppressed:
            self._evicted += bucket.suppressed
            self._evicted_level = max(self._evicted_level, bucket.level)

    def _emit(self, level: int, msg: str, *args: object, stacklevel: int = 1) -> None:
        self.logged_total += 1
        self.logger.log(level, msg, *args, stacklevel=stacklevel)
