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
