"""Fixtures shared by the test modules."""
from __future__ import annotations

import pytest


@pytest.fixture
def sock_dir(tmp_path_factory):
    """A fresh directory with a short path: a Unix socket path must fit in 107 bytes."""
    return tmp_path_factory.mktemp("s")
