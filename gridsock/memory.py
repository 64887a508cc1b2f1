"""Memory that connections freed goes back to the system: glibc's ``malloc_trim`` after bursts.

Theory of operation
-------------------
A busy node allocates large buffers and frees them: relayed frames of 256 KiB, TLS records,
the links' receive buffers, bridge chunks. glibc's allocator keeps what a process frees for
its next allocations: a freed buffer served by ``mmap`` raises its threshold so that later ones
of that size come from the heap (the "dynamic mmap threshold"), and free pages in the middle
of the heap go back to the system only when the top of the heap is free. So after a burst of
connections the process keeps its peak: measured on loopback in one process (docs/memory.md),
300 ``tls/relay`` connections of 1 MiB each way, 50 at a time, left about 145 MB free inside
the allocator of a process whose live data was 9 MB, all of it returned by one
``malloc_trim(0)`` (22 ms for 130 MB on this machine; a trim with little to return takes well
under a millisecond).

:func:`trim_soon` is called where large frees end (a bridge or a relayed connection closes,
the connection table forgets closed connections): it arms one timer in the calling thread's
gevent hub, ``TRIM_DELAY_S`` later, so that a burst of closes costs one trim; and trims are
at least ``TRIM_INTERVAL_S`` apart in the whole process (a later request re-arms the timer
for the end of that interval). :func:`trim` trims now. Where there is no glibc (musl, macOS)
both do nothing: the allocator there returns memory by its own rules.

Between trims, glibc's own thresholds would give memory back (and take it again) at every
large free: a relayed frame of 256 KiB is allocated above the default mmap threshold (mapped,
faulted in page by page, unmapped), and the heap's end moves down and up again as a
transfer's frames are freed and allocated (fresh pages, each a page fault: on loopback a
relay sender and the rendez-vous node took 60-150 page faults per MB relayed, 0-40 with this).
:func:`tune_allocator` fixes them (the ``gridsock node`` and ``gridsock rendezvous`` processes
call it at their start; a program embedding gridsock decides for its own process): buffers under
``MMAP_THRESHOLD_BYTES`` come from the heap, and up to ``TRIM_THRESHOLD_BYTES`` free at its
top stay there until a trim.
"""
from __future__ import annotations

import ctypes
import logging
import threading
import time
import weakref
from typing import Any

import gevent

__all__ = ["trim", "trim_soon", "tune_allocator", "TRIM_DELAY_S", "TRIM_INTERVAL_S", "MMAP_THRESHOLD_BYTES",
           "TRIM_THRESHOLD_BYTES", "trims"]

log = logging.getLogger(__name__)

# A burst of closes (hundreds of connections ending at once) is over within this: one trim
# after it rather than one per connection.
TRIM_DELAY_S = 0.5
# Trims are at least this far apart in the process: a trim walks the whole heap (tens of
# milliseconds for hundreds of MB), which a node doing it at every close would feel.
TRIM_INTERVAL_S = 2.0

# Allocations below this come from the heap (glibc's default starts at 128 KiB and moves).
MMAP_THRESHOLD_BYTES = 4 * 1024 * 1024
# Free memory at the top of the heap beyond this goes back at once; below, it waits for a trim.
TRIM_THRESHOLD_BYTES = 32 * 1024 * 1024
# mallopt() parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

_lock = threading.Lock()
_last_trim = -TRIM_INTERVAL_S  # time.monotonic() of the last trim
_armed: "weakref.WeakSet[Any]" = weakref.WeakSet()  # the hubs with a trim timer pending
_malloc_trim: Any = None
_probed = False
#: How many trims ran in this process (for tests and ``gridsock status``-style counters).
trims = 0


def _function() -> Any:
    """glibc's ``malloc_trim``, or None where the C library has none."""
    global _malloc_trim, _probed
    if not _probed:
        _probed = True
        try:
            function = ctypes.CDLL(None).malloc_trim
            function.argtypes = [ctypes.c_size_t]
            function.restype = ctypes.c_int
            _malloc_trim = function
        except (OSError, AttributeError):
            _malloc_trim = None
    return _malloc_trim


def trim() -> bool:
    """Return the free memory at the heaps' ends and the free pages inside them to the
    system now (``malloc_trim(0)``). Returns False where the C library cannot (not glibc)."""
    global _last_trim, trims
    function = _function()
    if function is None:
        return False
    with _lock:
        _last_trim = time.monotonic()
        trims += 1
    function(0)
    return True


def trim_soon() -> None:
    """Trim once the current burst of frees is over: at most one timer per hub, at most one
    trim per ``TRIM_INTERVAL_S`` in the process. Call from a thread that runs a gevent hub
    (a node's); does nothing where :func:`trim` cannot trim."""
    if _function() is None:
        return
    hub = gevent.get_hub()
    with _lock:
        if hub in _armed:
            return
        _armed.add(hub)
        delay = max(TRIM_DELAY_S, _last_trim + TRIM_INTERVAL_S - time.monotonic())
    timer = hub.loop.timer(delay, ref=False)  # (keeps no loop alive: gevent.wait() returns)
    timer.start(_fire, hub, timer)


def _fire(hub: Any, timer: Any) -> None:
    timer.close()
    with _lock:
        _armed.discard(hub)
        wait = _last_trim + TRIM_INTERVAL_S - time.monotonic()
    if wait > 0:  # another hub trimmed meanwhile: after its interval
        trim_soon()
        return
    began = time.monotonic()
    trim()
    log.debug("malloc_trim took %.1f ms", (time.monotonic() - began) * 1000)


def tune_allocator() -> bool:
    """Set glibc's mmap and trim thresholds (see the module docstring); False where the C
    library has no ``mallopt`` or refuses them."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and \
        bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))

