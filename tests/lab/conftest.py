"""Fixtures of the tests that need the grid lab: root, network namespaces, iptables, sshd, danted."""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Iterator

import pytest

from gridsock.testing import lab as lab_module

LAB_TESTS_DIR = Path(__file__).resolve().parent
NOT_ROOT_REASON = "the grid lab needs root (network namespaces, iptables)"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "lab: needs root and Linux network namespaces (the grid lab)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if LAB_TESTS_DIR in Path(item.path).resolve().parents:
            item.add_marker(pytest.mark.lab)


def lab_prefix(tag: str = "") -> str:
    """Return a lab prefix unique to this pytest process (``gst<pid%10000><tag>-``)."""
    return f"gst{os.getpid() % 10000}{tag}-"


def require_lab() -> None:
    """Skip when the lab cannot run here (not Linux, not root); fail when a tool is missing."""
    if not sys.platform.startswith("linux"):
        pytest.skip("the grid lab needs Linux network namespaces")
    if os.geteuid() != 0:
        pytest.skip(NOT_ROOT_REASON)
    missing = lab_module.missing_tools()
    if missing:
        names = ", ".join(f"{tool} (Debian package {pkg})" for tool, pkg in missing)
        pytest.fail(f"the grid lab needs {names}: apt-get install them", pytrace=False)


@pytest.fixture(scope="session")
def lab() -> Iterator[lab_module.Lab]:
    """The grid lab, built once per pytest process and torn down at the end of the session."""
    require_lab()
    the_lab = lab_module.Lab(lab_prefix())
    the_lab.up()
    try:
        yield the_lab
    finally:
        the_lab.down()


@pytest.fixture
def spare_lab_prefix() -> Iterator[str]:
    """A second prefix for tests that build and tear down a lab of their own."""
    require_lab()
    prefix = lab_prefix("x")
    yield prefix
    lab_module.Lab(prefix).down()  # whatever the test left behind
