"""The packet delayer: its codec and scheduler byte by byte, then WAN profiles on the grid lab."""
from __future__ import annotations

import os
import random
import signal
import struct
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gridsock.errors import ConfigError, RemoteProtocolError
from gridsock.testing import delayer
from gridsock.testing.delayer import NF_ACCEPT, NF_DROP, Ack, DelayScheduler, Packet, flow_key, parse_messages
from gridsock.testing.lab import ADDRESSES, PUBLIC_HOSTS, WAN_QUEUE, WAN_TABLE, Lab
from gridsock.testing.procs import stop_process, wait_for_line

pytestmark = pytest.mark.timeout(60)

DELAY_MS = 50.0
LOWER_BOUND = 0.9  # a delay of D makes a round trip last at least 2 * D; 10 % for clock granularity
TRANSFER_BYTES = 1 << 20
LOSS = 0.2
CLIENT_TIMEOUT_S = 30.0  # a whole client subprocess, a lossy transfer included
# Linux >= 6.15 lets a socket cap its retransmission backoff (TCP_RTO_MAX_MS, 1 s at least): under
# 20 % loss, an unlucky run of lost retransmissions then costs seconds, not minutes. Older kernels
# refuse it; the lossy test then rests on starting the loss only once the connection is up.
RTO_CAP = "socket.IPPROTO_TCP, 44, 1000"  # TCP_RTO_MAX_MS = 44, in ms

# Per connection, the first byte picks the mode: "e" echoes, "h" answers the SHA-256 of all it read.
SERVER_SRC = r"""
import hashlib, socket, threading
def cap_rto(s):
    try:
        s.setsockopt(RTO_CAP)
    except OSError:
        pass
srv = socket.socket()
srv.bind(("0.0.0.0", 0))
srv.listen(16)
print("ready", srv.getsockname()[1], flush=True)
def serve(conn):
    cap_rto(conn)
    with conn:
        mode = conn.recv(1)
        digest = hashlib.sha256()
        while True:
            data = conn.recv(65536)
            if not data:
                break
            if mode == b"e":
                conn.sendall(data)
            else:
                digest.update(data)
        if mode == b"h":
            conn.sendall(digest.hexdigest().encode())
while True:
    threading.Thread(target=serve, args=(srv.accept()[0],), daemon=True).start()
""".replace("RTO_CAP", RTO_CAP)

# "rtt": prints the connect time and one 1-byte echo round trip, in ms.
# "send N": connects, prints "connected", waits for a line on stdin, sends N seeded random bytes,
# prints "intact" when the server's digest matches.
CLIENT_SRC = r"""
import hashlib, random, socket, sys, time
addr, port, what = sys.argv[1], int(sys.argv[2]), sys.argv[3]
started = time.monotonic()
s = socket.create_connection((addr, port), timeout=20)
connected = time.monotonic()
try:
    s.setsockopt(RTO_CAP)
except OSError:
    pass
if what == "rtt":
    s.sendall(b"ex")
    assert s.recv(1) == b"x"
    print("%.3f %.3f" % ((connected - started) * 1000, (time.monotonic() - connected) * 1000))
else:
    data = random.Random(7).randbytes(int(sys.argv[4]))
    print("connected", flush=True)
    sys.stdin.readline()
    s.sendall(b"h" + data)
    s.shutdown(socket.SHUT_WR)
    answer = b""
    while True:
        chunk = s.recv(100)
        if not chunk:
            break
        answer += chunk
    print("intact" if answer.decode() == hashlib.sha256(data).hexdigest() else "corrupt")
""".replace("RTO_CAP", RTO_CAP)


# -- codec and scheduler (no lab) ------------------------------------------------------------------


def _attr(attr_type: int, value: bytes) -> bytes:
    raw = struct.pack("=HH", 4 + len(value), attr_type) + value
    return raw + b"\0" * (-len(raw) % 4)


def _kernel_packet(packet_id: int, payload: bytes, queue: int = WAN_QUEUE) -> bytes:
    """A NFQNL_MSG_PACKET as the kernel sends it."""
    attrs = _attr(delayer.NFQA_PACKET_HDR, struct.pack("!IHB", packet_id, 0x0800, 0)) + _attr(
        delayer.NFQA_PAYLOAD, payload
    )
    body = struct.pack("!BBH", 2, 0, queue) + attrs
    return struct.pack("=IHHII", 16 + len(body), delayer.NFQNL_MSG_PACKET, 0, 0, 0) + body


def _ipv4(src: str, dst: str, proto: int, sport: int, dport: int) -> bytes:
    def raw(addr: str) -> bytes:
        return bytes(int(part) for part in addr.split("."))

    header = struct.pack("!BBHHHBBH", 0x45, 0, 40, 1, 0, 64, proto, 0) + raw(src) + raw(dst)
    return header + struct.pack("!HH", sport, dport) + b"\0" * 16


PAYLOAD = _ipv4("203.0.113.2", "203.0.113.10", 6, 40000, 5001)


def test_parses_packets_and_acks() -> None:
    ack = struct.pack("=IHHII", 36, 2, 0, 1, 0) + struct.pack("=i", 0) + b"\0" * 16
    refused = struct.pack("=IHHII", 36, 2, 0, 2, 0) + struct.pack("=i", -16) + b"\0" * 16
    data = _kernel_packet(5, PAYLOAD) + ack + _kernel_packet(6, PAYLOAD) + refused
    assert parse_messages(data) == [
        Packet(5, WAN_QUEUE, PAYLOAD),
        Ack(1, 0),
        Packet(6, WAN_QUEUE, PAYLOAD),
        Ack(2, 16),
    ]


def test_truncated_messages_raise_remote_protocol_error() -> None:
    whole = _kernel_packet(5, PAYLOAD)
    for cut in range(1, len(whole)):
        with pytest.raises(RemoteProtocolError):
            parse_messages(whole[:cut])


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_give_messages_or_remote_protocol_error(data: bytes) -> None:
    try:
        messages = parse_messages(data)
    except RemoteProtocolError:
        return
    assert all(isinstance(msg, (Packet, Ack)) for msg in messages)


def test_verdicts_are_one_message_each() -> None:
    data = delayer.encode_verdicts(WAN_QUEUE, [(5, NF_ACCEPT), (9, NF_DROP)])
    assert len(data) == 64
    for offset, (packet_id, verdict) in zip((0, 32), ((5, NF_ACCEPT), (9, NF_DROP))):
        length, msg_type, _flags, _seq, _pid = struct.unpack_from("=IHHII", data, offset)
        assert (length, msg_type) == (32, delayer.NFQNL_MSG_VERDICT)
        assert struct.unpack_from("!H", data, offset + 18) == (WAN_QUEUE,)
        assert struct.unpack_from("!II", data, offset + 24) == (verdict, packet_id)


def test_config_rejects_a_bad_queue_number() -> None:
    with pytest.raises(ConfigError):
        delayer.encode_config(1 << 16)


def test_flow_key_holds_addresses_protocol_and_ports() -> None:
    assert flow_key(PAYLOAD) == PAYLOAD[12:20] + b"\x06" + PAYLOAD[20:24]
    assert flow_key(PAYLOAD) != flow_key(_ipv4("203.0.113.2", "203.0.113.10", 6, 40001, 5001))
    assert flow_key(b"") == flow_key(b"\x45") == b""


def test_constant_delay_releases_in_arrival_order() -> None:
    sched = DelayScheduler(0.05)
    for packet_id, now in enumerate((0.0, 0.0, 0.01, 0.02)):
        assert sched.admit(now, packet_id)
    assert sched.next_release() == pytest.approx(0.05)
    assert sched.pop_due(0.049) == []
    assert sched.pop_due(0.065) == [0, 1, 2]
    assert sched.pop_due(1.0) == [3]
    assert (sched.held, sched.admitted, sched.released) == (0, 4, 4)


def test_jitter_never_reorders_a_flow() -> None:
    sched = DelayScheduler(0.05, jitter_s=0.04, rng=random.Random(1))
    flows = [b"a", b"b", b"c"]
    for packet_id in range(300):
        sched.admit(packet_id * 0.001, packet_id, flows[packet_id % 3])
    released = sched.drain()
    assert sorted(released) == list(range(300))
    for flow in range(3):
        mine = [packet_id for packet_id in released if packet_id % 3 == flow]
        assert mine == sorted(mine)
    assert released != sorted(released)  # flows do overtake each other


def test_loss_and_overflow_drop() -> None:
    sched = DelayScheduler(1.0, loss=0.5, max_held=10, rng=random.Random(3))
    kept = [sched.admit(0.0, packet_id) for packet_id in range(100)]
    assert sum(kept) == sched.held == 10
    assert sched.lost + sched.overflowed == 90
    assert 0 < sched.lost < 90 and sched.overflowed > 0


def test_scheduler_rejects_bad_values() -> None:
    for kw in ({"loss": 1.5}, {"jitter_s": -1.0}, {"max_held": 0}):
        with pytest.raises(ConfigError):
            DelayScheduler(0.01, **kw)


# -- WAN profiles on the lab -----------------------------------------------------------------------


@pytest.fixture
def wan_lab(lab: Lab) -> Iterator[Lab]:
    """The lab; its WAN profile is removed after the test, so other tests see the plain lab."""
    yield lab
    lab.set_wan()


@pytest.fixture
def server_port(wan_lab: Lab) -> Iterator[int]:
    """The port of a test server (SERVER_SRC) on rv."""
    proc = wan_lab.spawn("rv", [sys.executable, "-u", "-c", SERVER_SRC], stdout=subprocess.PIPE)
    try:
        yield int(wait_for_line(proc, "ready", timeout=10).split()[1])
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()


def client_argv(port: int, *args: str) -> list[str]:
    """The argv of CLIENT_SRC against the server on rv."""
    return [sys.executable, "-c", CLIENT_SRC, ADDRESSES["rv"], str(port), *args]


def client(lab: Lab, port: int, *args: str) -> str:
    """Run CLIENT_SRC in a1 (behind gwa's NAT) against rv; return what it prints last."""
    argv = client_argv(port, *args)
    done = lab.run("a1", argv, input="go\n", capture_output=True, text=True, timeout=CLIENT_TIMEOUT_S)
    assert done.returncode == 0, done.stderr
    return done.stdout.split("\n")[-2]


def delayer_pids(lab: Lab) -> dict[int, str]:
    """Return pid -> host of the delayers running in the lab's public hosts."""
    found = {}
    for host in PUBLIC_HOSTS:
        pids = subprocess.run(["ip", "netns", "pids", lab.netns(host)], capture_output=True, text=True, check=True)
        for pid in map(int, pids.stdout.split()):
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:  # gone meanwhile
                continue
            if b"gridsock.testing.delayer" in cmdline:
                found[pid] = host
    return found


def wan_leftovers(lab: Lab) -> list[str]:
    """Return what of a WAN profile remains in the public hosts: rules, qdiscs, live delayers."""
    found = []
    for host in PUBLIC_HOSTS:
        rules = lab.run(host, ["iptables", "-t", WAN_TABLE, "-S"], capture_output=True, text=True, check=True)
        found += [f"{host}: {line}" for line in rules.stdout.splitlines() if "NFQUEUE" in line]
        qdiscs = lab.run(host, ["tc", "qdisc", "show", "dev", "eth0"], capture_output=True, text=True, check=True)
        found += [f"{host}: {line}" for line in qdiscs.stdout.splitlines() if "tbf" in line]
    found += [f"{host}: delayer pid {pid}" for pid, host in delayer_pids(lab).items()]
    return found


def test_delay_slows_round_trips_and_goes_away(wan_lab: Lab, server_port: int) -> None:
    wan_lab.set_wan(delay_ms=DELAY_MS)
    connect_ms, echo_ms = map(float, client(wan_lab, server_port, "rtt").split())
    # Lower bounds only: a delay can make nothing faster, a loaded machine can make anything slower.
    assert connect_ms >= 2 * DELAY_MS * LOWER_BOUND
    assert echo_ms >= 2 * DELAY_MS * LOWER_BOUND
    wan_lab.set_wan()
    assert wan_leftovers(wan_lab) == []
    client(wan_lab, server_port, "rtt")  # still flows


def test_lossy_wan_keeps_tcp_intact(wan_lab: Lab, server_port: int) -> None:
    # Connected first: a lost SYN is retried after 1, 2, 4... s, the slow tail of this test.
    argv = client_argv(server_port, "send", str(TRANSFER_BYTES))
    proc = wan_lab.spawn("a1", argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        wait_for_line(proc, "connected", timeout=CLIENT_TIMEOUT_S)
        wan_lab.set_wan(loss=LOSS)
        proc.stdin.write(b"go\n")
        proc.stdin.flush()
        assert wait_for_line(proc, lambda line: True, timeout=CLIENT_TIMEOUT_S) == "intact"
    finally:
        stop_process(proc)


def test_rate_limit_installs_and_goes_away(wan_lab: Lab, server_port: int) -> None:
    wan_lab.set_wan(rate_mbit=50, hosts=("gwa",))
    shown = wan_lab.run("gwa", ["tc", "qdisc", "show", "dev", "eth0"], capture_output=True, text=True).stdout
    assert "tbf" in shown and "50Mbit" in shown
    assert client(wan_lab, server_port, "send", str(TRANSFER_BYTES)) == "intact"
    wan_lab.set_wan()
    assert wan_leftovers(wan_lab) == []


def test_bypass_keeps_traffic_flowing_when_a_delayer_dies(wan_lab: Lab, server_port: int) -> None:
    wan_lab.set_wan(delay_ms=1.0, hosts=("rv",))
    (pid,) = delayer_pids(wan_lab)
    os.kill(pid, signal.SIGKILL)  # the rule stays; --queue-bypass lets packets through
    client(wan_lab, server_port, "rtt")


def test_set_wan_rejects_bad_values(lab: Lab) -> None:
    for kw in ({"loss": 1.0}, {"delay_ms": -1}, {"rate_mbit": 0}, {"hosts": ("a1",)}, {"hosts": ("rvv",)}):
        with pytest.raises(ConfigError):
            lab.set_wan(**kw)


def test_down_ends_the_delayers(spare_lab_prefix: str) -> None:
    spare = Lab(spare_lab_prefix)
    spare.up()
    try:
        spare.set_wan(delay_ms=5.0, loss=0.01, rate_mbit=100)
        pids = delayer_pids(spare)
        assert sorted(pids.values()) == sorted(PUBLIC_HOSTS)
    finally:
        spare.down()
    assert [pid for pid in pids if Path(f"/proc/{pid}").exists()] == []
    assert spare.existing_namespaces() == []
