"""Round trips in the lab, counted rather than timed: what each connect waits for.

- ``splice`` between cluster A (gwa's NAT) and cluster B (fwb's firewall), both ways: the
  connection is made by the first simultaneous open of each side (the client's SYN leaves with
  the request when the server is reached at an address of its own; towards a NAT the server
  fires first), no ``SPLICE_RETRY_S`` wait. Each side's assembler counts the connections its
  method made on the first connect attempt (``first_attempt``) or a later one (``retried``).
- ``splice`` from a1 to b1 across a WAN (20 ms one way per public host): once a1 has timed its
  requests to b1, its single SYN leaves a measured delay after the request, reaches fwb after
  b1's own SYN left and is let in: the connection is made on the first attempt of each side and
  before b1's answer arrives (a1's log says so; with the SYN sent with the request it came after).
- ``reverse`` from rv to a1 (behind gwa's NAT): a1's connection back carries its preamble in the
  SYN (TCP Fast Open; the lab's hosts set ``net.ipv4.tcp_fastopen``), once a first connection
  got a1 the cookie of rv's host: rv's kernel counts it (``TCPFastOpenPassive``).
"""
from __future__ import annotations

import re

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


SPLICE_WAN_MS = 20.0
# Enough splices for a1's estimate of the request's round trip to b1 to climb from the unshaped
# lab's (a few ms, from the tests above) to the WAN's (it rises by a quarter of the gap per splice)
# and for its deviation to settle (about 12: the rest connect before the answer).
SPLICE_WAN_CONNECTS = 24
SPLICE_LOG = re.compile(r"node a1: splice to b1: SYN ([0-9.]+) ms after the request, connected (before|after) the "
                        r"answer \(attempts (\d+)\)")


def test_splice_syn_timed_to_cross_the_servers(grid):
    log_path = grid.logs["a1"]
    start = log_path.stat().st_size
    before = {name: attempts(grid, name) for name in ("a1", "b1")}
    grid.lab.set_wan(delay_ms=SPLICE_WAN_MS)
    try:
        for _ in range(SPLICE_WAN_CONNECTS):
            transfer(grid, "a1", "b1", "tls/splice")
    finally:
        grid.lab.set_wan()
    with open(log_path, "rb") as f:
        f.seek(start)
        seen = [m.groups() for m in SPLICE_LOG.finditer(f.read().decode(errors="replace"))]
    for name in ("a1", "b1"):  # every connection on each side's first attempt
        first, retried = attempts(grid, name)
        assert (first - before[name][0], retried - before[name][1]) == (SPLICE_WAN_CONNECTS, 0), (name, before, first)
    assert seen, "a1 never delayed its SYN"
    assert all(tries == "1" and float(delay) > 0 for delay, _, tries in seen), seen
    # (the margin is a quarter of the request's one way on either side: at least one made it)
    assert any(when == "before" for _, when, _ in seen), seen


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
