"""The leak test of tests/test_leaks.py with thousands of connections of each kind.

It needs no lab: it runs here, with the lab's long tests, on one Python only (CI's budget);
every Python runs tests/test_leaks.py's shorter counts.
"""
from __future__ import annotations

import pytest
import test_leaks as leaks
from test_leaks import grid  # noqa: F401  (the leak test's own two nodes, for this module)

# Connections of each kind: thousands, as issue 16's leak test asks.
LONG_CONNECTIONS = 3000


@pytest.mark.parametrize("kind", leaks.KINDS)
def test_thousands_of_connections_closed_give_everything_back(grid, kind):  # noqa: F811
    leaks.check_given_back(grid, kind, LONG_CONNECTIONS)
