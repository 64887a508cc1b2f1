"""Round trips in the lab, counted rather than timed: what each connect waits for.

- ``splice`` between cluster A (gwa's NAT) and cluster B (fwb's firewall), both ways: the
  connection is made by the first simultaneous open of each side (the client's SYN leaves with
  the request when the server is reached at an address of its own; towards a NAT the server
  fires first), no ``SPLICE_RETRY_S`` wait. Each side's assembler counts the connections its
  method made on the first connect attempt (``first_attempt``) or a later one (``retried``).
- ``reverse`` from rv to a1 (behind gwa's NAT): a1's connection back carries its preamble in the
  SYN (TCP Fast Open; the lab's hosts set ``net.ipv4.tcp_fastopen``), once a first connection
  got a1 the cookie of rv's host: rv's kernel counts it (``TCPFastOpenPassive``).
"""
from __future__ import annotations

import pytest

from gridsock.bootstrap.control import call

from .gridsession import ECHO_PORT, make_grid

TRANSFER_BYTES = 1 << 16
TRANSFER_TIMEOUT_S = 60.0


@pytest.fixture(scope="module")
def grid(lab, tmp_path_factory):
    yield from make_grid(lab, tmp_path_factory)


def transfer(grid, src: str, dst: str, stack: str) -> dict:
    args = {"dst": dst, "port": ECHO_PORT, "bytes": TRANSFER_BYTES, "stack": stack, "timeout": 30}
    result = call(grid.control(src), "transfer", args, timeout=TRANSFER_TIMEOUT_S)
    assert result["sha256_received"] == result["sha256_sent"] and result["stack"] == stack
    return result


def attempts(grid, name: str) -> tuple:
    counters = call(grid.control(name), "status")["assembly"]
    return counters["first_attempt"], counters["retried"]


# A -> B: the client fires early (b1 and b2 are reached at their own addresses behind fwb);
# B -> A: the server fires first (a1 and a2 are behind gwa's NAT), the client on the answer.
SPLICE_PAIRS = [("a1", "b1"), ("b1", "a1"), ("a2", "b2"), ("b2", "a2")]


@pytest.mark.parametrize("src,dst", SPLICE_PAIRS)
def test_splice_connects_on_the_first_simultaneous_open(grid, src, dst):
    before = {name: attempts(grid, name) for name in (src, dst)}
    transfer(grid, src, dst, "tls/splice")
    for name in (src, dst):
        first, retried = attempts(grid, name)
        assert (first - before[name][0], retried - before[name][1]) == (1, 0), (name, before[name], first, retried)


def tcp_ext(grid, host: str) -> dict:
    """The kernel's TcpExt counters of ``host``'s network namespace."""
    lines = [line.split() for line in grid.lab.run(host, ["cat", "/proc/net/netstat"], capture_output=True,
                                                    text=True, check=True).stdout.splitlines()]
    names, values = [fields for fields in lines if fields and fields[0] == "TcpExt:"]
    return dict(zip(names[1:], map(int, values[1:])))


def test_reverse_sends_its_preamble_in_the_syn(grid):
    transfer(grid, "rv", "a1", "tls/reverse")  # (a1's host may have no cookie of rv's yet: it asks)
    before = tcp_ext(grid, "rv")["TCPFastOpenPassive"]
    transfer(grid, "rv", "a1", "tls/reverse")
    assert tcp_ext(grid, "rv")["TCPFastOpenPassive"] > before
