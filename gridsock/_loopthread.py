"""A gevent hub in a thread of its own, and calls into it from any thread (the node's thread).

Theory of operation
-------------------
A :class:`LoopThread` is a daemon thread whose main greenlet waits until it is told to end,
while its hub runs whatever is spawned there (a node's links, bridges, handlers). Objects that
belong to a hub (gevent sockets, events, queues) are made and used in that thread only.

``call(timeout, fn, *args)`` from any *other* thread schedules ``fn`` in the hub with
``loop.run_callback_threadsafe`` (the one gevent call that may be made from a foreign thread:
it queues the callback and wakes the loop), runs it in a greenlet of its own and hands back its
result, or raises its exception, through a :class:`_Outcome` the caller waits on with a
``threading.Event``: a real thread primitive, so the caller blocks only itself (a caller whose
thread runs a gevent hub of its own waits in a worker thread of that hub's pool, so that the
hub goes on running its other greenlets). After
``timeout`` seconds the greenlet is killed (threadsafe again) and the caller gets TimeoutError;
an interrupt (Ctrl-C in the main thread) kills it too. A call made from the loop thread itself
runs inline, at the speed of a plain method call.

``end()`` sets the main greenlet's exit event (threadsafe), so the thread runs its exit hooks
(given to the constructor: the node closes what only its hub could pump), lets its hub run
once more what they scheduled (gevent finishes closing a socket a greenlet waits on in a hub
callback: without it, descriptors would stay open), then fails every
call still pending with :class:`LoopEndedError` and returns; ``end()`` joins it, bounded. A
process that exits with the thread still running does not wait for it (daemon thread); the
node stops itself first from an ``atexit`` hook (:mod:`gridsock.node`).

Invariant: a call is either run by the loop or failed with LoopEndedError, never left waiting:
``call`` registers its outcome under a lock that the exiting thread takes to mark itself ended
and to fail what is pending.
"""
from __future__ import annotations

import logging
import threading
from typing import Any, Callable, List, Optional, Set

import gevent
import gevent.event
import gevent.monkey
from gevent._hub_local import get_hub_if_exists

from .errors import LoopEndedError

__all__ = ["LoopThread", "LoopEndedError", "caller_runs_gevent", "THREAD_START_TIMEOUT_S"]

log = logging.getLogger(__name__)

# Starting a thread and making its hub takes milliseconds; this is for a machine under load.
THREAD_START_TIMEOUT_S = 30.0
# At its end, the thread lets its hub run what is due (closes finished by callbacks) this long at most.
EXIT_DRAIN_S = 1.0


def caller_runs_gevent() -> bool:
    """True if the calling thread is a gevent program's: gevent patched ``threading`` (threads
    are greenlets), the thread already has a hub, or this is a greenlet other than the main one.

    Such a caller runs a node inline (its hub is the node's); any other gets a node thread.
    """
    if gevent.monkey.is_module_patched("threading"):
        return True
    if get_hub_if_exists() is not None:
        return True
    return gevent.getcurrent().parent is not None


class _Outcome:
    """What one call returned or raised, and the event its caller waits on."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.value: Any = None
        self.error: Optional[BaseException] = None
        self.greenlet: Optional[gevent.Greenlet] = None
        self.abandoned = False  # the caller gave up (timeout, interrupt): do not start it

    def fail(self, error: BaseException) -> None:
        if not self.done.is_set():
            self.error = error
            self.done.set()


class LoopThread:
    """A daemon thread running a gevent hub until :meth:`end`; see the module docstring."""

    def __init__(self, name: str, *, on_exit: Optional[List[Callable[[], None]]] = None) -> None:
        self.name = name
        self._on_exit = on_exit if on_exit is not None else []
        self._lock = threading.Lock()
        self._pending: Set[_Outcome] = set()
        self._ended = False  # under _lock: no call may be registered any more
        self._started = threading.Event()
        self._finished = threading.Event()
        self._hub: Any = None
        self._exit: Optional[gevent.event.Event] = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()
        if not self._started.wait(THREAD_START_TIMEOUT_S):
            raise LoopEndedError(f"{name}: the thread did not start within {THREAD_START_TIMEOUT_S:g} s")

    def __repr__(self) -> str:
        return f"<LoopThread {self.name} {'running' if self.alive else 'ended'}>"

    @property
    def alive(self) -> bool:
        """True until the thread has ended."""
        return not self._finished.is_set()

    def is_current(self) -> bool:
        """True when called from the loop thread itself."""
        return threading.current_thread() is self._thread

    def wait_finished(self, timeout: Optional[float] = None) -> bool:
        """Wait until the thread has ended; False on timeout."""
        return _wait(self._finished, timeout)

    # --- the thread --------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._hub = gevent.get_hub()
            self._exit = gevent.event.Event()
            # An idle hub has no watcher that would ever wake it: waiting would raise LoopExit.
            # This one (referenced, never sent) keeps it waiting for callbacks from other threads.
            keepalive = self._hub.loop.async_(ref=True)
            keepalive.start(lambda: None)
            self._started.set()
            try:
                self._exit.wait()
            finally:
                keepalive.close()
            for hook in self._on_exit:
                try:
                    hook()
                except Exception:
                    log.exception("%s: exit hook %r failed", self.name, hook)
            # Closing a gevent socket a greenlet waits on is finished by a hub callback (the
            # waiter is woken, then the descriptor closed): let the hub run what is due, once.
            try:
                with gevent.Timeout(EXIT_DRAIN_S):
                    gevent.idle()
            except gevent.Timeout:
                log.debug("%s: the hub was still busy after %g s; ending", self.name, EXIT_DRAIN_S)
        finally:
            with self._lock:
                self._ended = True
                pending, self._pending = self._pending, set()
            for outcome in pending:
                if outcome.greenlet is not None:
                    outcome.greenlet.kill(block=False)
                outcome.fail(LoopEndedError(f"{self.name} ended before the call returned"))
            self._finished.set()

    # --- calls -------------------------------------------------------------------------------

    def call(self, timeout: Optional[float], fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        """Run ``fn(*args, **kwargs)`` in the loop thread and return what it returns.

        Raises what ``fn`` raised; TimeoutError if it has not returned after ``timeout`` seconds
        (None: no limit; the call is then killed); LoopEndedError if the thread ended first.
        From the loop thread itself, ``fn`` runs inline (``timeout`` is then not applied).
        """
        if self.is_current():
            return fn(*args, **kwargs)
        outcome = _Outcome()
        with self._lock:
            if self._ended:
                raise LoopEndedError(f"{self.name} has ended (the node was stopped)")
            self._pending.add(outcome)
        hub = self._hub

        def run() -> None:
            try:
                value = fn(*args, **kwargs)
            except BaseException as exc:  # (GreenletExit included: the caller gave up on it)
                outcome.fail(exc)
            else:
                outcome.value = value
                outcome.done.set()
            finally:
                with self._lock:
                    self._pending.discard(outcome)

        def start() -> None:
            if not outcome.abandoned:
                outcome.greenlet = gevent.spawn(run)

        hub.loop.run_callback_threadsafe(start)
        try:
            finished = _wait(outcome.done, timeout)
        except BaseException:  # an interrupt: the call must not go on behind the caller's back
            self._abandon(outcome)
            raise
        if not finished:
            self._abandon(outcome)
            raise TimeoutError(f"{getattr(fn, '__name__', fn)} did not return within {timeout:g} s "
                               f"in {self.name}")
        if outcome.error is not None:
            error, outcome.error = outcome.error, None  # (no cycle through the traceback)
            raise error
        return outcome.value

    def _abandon(self, outcome: _Outcome) -> None:
        outcome.abandoned = True

        def kill() -> None:
            if outcome.greenlet is not None:
                outcome.greenlet.kill(block=False)

        with self._lock:
            self._pending.discard(outcome)
            if not self._ended:
                self._hub.loop.run_callback_threadsafe(kill)

    def end(self, *, timeout: Optional[float] = None) -> bool:
        """Make the thread end (after its exit hooks) and wait for it, at most ``timeout``
        seconds; True once it has ended. From the loop thread itself, ask only (False)."""
        with self._lock:
            if not self._ended and self._exit is not None:
                if self.is_current():
                    self._exit.set()
                else:
                    self._hub.loop.run_callback_threadsafe(self._exit.set)
        if self.is_current():
            return False
        return _wait(self._finished, timeout)


def _wait(event: threading.Event, timeout: Optional[float]) -> bool:
    """``event.wait(timeout)``; in a thread that runs a gevent hub of its own, in a worker thread
    of that hub's pool, so that its other greenlets (and its signal handlers) run meanwhile."""
    caller_hub = get_hub_if_exists()
    if caller_hub is None:
        return event.wait(timeout)
    return bool(caller_hub.threadpool.apply(event.wait, (timeout,)))
