"""The ``ssh`` method's remote mode in the lab: a node inside the private cluster C accepts
from outside through a one-use forward on its own gateway (fec's sshd), for clients that have
no login there: cluster A behind NAT, cluster B behind its firewall, the public rv.

The grid is gridsession's (c1 leads C with ``--ssh-gateway root@10.3.0.1:22``; c2's gateway is
its leader's). The forward binds fec's public address, 203.0.113.4, which every outside node
reaches; the server dials nothing and the client logs in nowhere.
"""
from __future__ import annotations

import pytest

from gridsock.bootstrap.control import call

from .gridsession import ECHO_PORT, make_grid

grid = pytest.fixture(scope="module")(make_grid)

REMOTE = "tls/ssh(bind=203.0.113.4,remote=root@10.3.0.1:22)"
TRANSFER_BYTES = 4 << 20


def transfer(grid, src: str, dst: str, stack: str, nbytes: int = TRANSFER_BYTES) -> dict:
    args = {"dst": dst, "port": ECHO_PORT, "bytes": nbytes, "stack": stack, "timeout": 30}
    return call(grid.control(src), "transfer", args, timeout=90)


@pytest.mark.parametrize("src,dst", [("a1", "c1"), ("a2", "c2"), ("b1", "c1"), ("b2", "c2"), ("rv", "c1")])
def test_outside_nodes_reach_c_through_a_forward_on_its_gateway(grid, src, dst):
    result = transfer(grid, src, dst, REMOTE)
    assert result["stack"] == REMOTE
    assert result["bytes"] == TRANSFER_BYTES
    assert result["sha256_received"] == result["sha256_sent"]


def test_a_gateway_that_is_not_the_servers_own_is_refused(grid):
    with pytest.raises(Exception, match="not an SSH gateway of c1"):
        transfer(grid, "a1", "c1", "tls/ssh(bind=203.0.113.4,remote=root@203.0.113.4:22)", 1 << 10)
