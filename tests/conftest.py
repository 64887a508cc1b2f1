"""Fixtures shared by the test modules."""
from __future__ import annotations

import os
import shutil
import tempfile

import pytest


def pytest_configure(config: pytest.Config) -> None:
    """``gridsock node`` keeps its identity under ``$XDG_STATE_HOME`` by default: the test
    session's nodes (and every process they start) keep theirs in a directory of the session's
    own, removed at its end, never in the home directory of whoever runs the tests."""
    state = tempfile.mkdtemp(prefix="gridsock-test-state-")
    config._gridsock_state_home = (state, os.environ.get("XDG_STATE_HOME"))  # type: ignore[attr-defined]
    os.environ["XDG_STATE_HOME"] = state


def pytest_unconfigure(config: pytest.Config) -> None:
    state, before = getattr(config, "_gridsock_state_home", (None, None))
    if state is None:
        return
    if before is None:
        os.environ.pop("XDG_STATE_HOME", None)
    else:
        os.environ["XDG_STATE_HOME"] = before
    shutil.rmtree(state, ignore_errors=True)


@pytest.fixture
def sock_dir(tmp_path_factory):
    """A fresh directory with a short path: a Unix socket path must fit in 107 bytes."""
    return tmp_path_factory.mktemp("s")


# --- greenlets a module leaves running ---------------------------------------------------------
# A node or server a test forgets to stop keeps its greenlets on the main hub for the rest of the
# run: their watchers outlive the descriptors they watched, and later modules then share a hub
# with them (a handshake in test_session once hung that way in CI runs only). Each module's
# leftovers are listed in the run's summary and, outside the lab (whose fixtures are shared
# across modules), killed when the module ends, so that no module inherits another's.
LEFTOVER_KILL_TIMEOUT_S = 5.0
# How long a module's greenlets may take to end after its fixtures stopped what they started.
LEFTOVER_GRACE_S = 1.0
_LEFTOVERS: list = []


def _live_greenlets() -> set:
    import gc

    import gevent

    hub = gevent.get_hub()
    return {obj for obj in gc.get_objects()
            if isinstance(obj, gevent.Greenlet) and not obj.dead and obj.parent is hub}


def _describe(glet) -> str:
    frames = []
    frame = glet.gr_frame
    while frame is not None and len(frames) < 4:
        frames.append(f"{os.path.basename(frame.f_code.co_filename)}:{frame.f_code.co_name}")
        frame = frame.f_back
    return " < ".join(frames) or repr(glet)


@pytest.fixture(autouse=True, scope="module")
def _no_greenlets_left_behind(request):
    before = _live_greenlets()
    yield
    left = _live_greenlets() - before
    if left:  # a server stopped last may still be waking up to its closed socket: let it end
        import gevent

        gevent.joinall(list(left), timeout=LEFTOVER_GRACE_S)
        left = {glet for glet in left if not glet.dead}
    if not left:
        return
    in_lab = os.sep + "lab" + os.sep in str(request.path)
    _LEFTOVERS.append((request.module.__name__, sorted(_describe(glet) for glet in left), not in_lab))
    if not in_lab:
        import gevent

        gevent.killall(list(left), timeout=LEFTOVER_KILL_TIMEOUT_S)


def pytest_terminal_summary(terminalreporter) -> None:
    if not _LEFTOVERS:
        return
    terminalreporter.section("greenlets left running by test modules")
    for module, described, killed in _LEFTOVERS:
        terminalreporter.line(f"{module}: {len(described)}{' (killed at its end)' if killed else ''}")
        for text in sorted(set(described)):
            terminalreporter.line(f"    {described.count(text)} x {text}")
