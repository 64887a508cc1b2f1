"""Back-to-back channels through the lab's SSH gateway (fec's sshd) across a WAN: each opens in
one round trip.

sshd sets no TCP_NODELAY on a connection without a terminal: a channel opened on a transport
right after another channel's close there meets the gateway's CLOSE still unacknowledged, and
its confirmation waits for our ACK of that CLOSE (a second round trip; docs/ssh.md). The
signature on the wire, as the transport sees it: a message from the gateway arrives while the
open is out. ``sshtunnel`` opens such a channel on a quiet second transport instead.

A probe in rv (the public host) opens back-to-back tunnels through fec's public address to a
server on c1 (behind fec), exchanges a byte on each as the benchmark does and closes it, and reports, for every
open, how many messages reached its transport between the channel open it wrote and the
confirmation it read (paramiko's packet log, in the order the packets went; no clock). Counted
as round trips, not timed.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from gridsock.testing.lab import ADDRESSES
from gridsock.testing.procs import wait_for_line

pytestmark = [pytest.mark.timeout(180)]

WAN_DELAY_MS = 10  # one way: a 20 ms round trip between public hosts, as the benchmark's wan10
CONNECTS = 12
PROBE_TIMEOUT_S = 120.0
ECHO_HOST = "c1"  # behind fec, as the benchmark's server: sshd's connect to it takes a LAN round trip
ECHO_HOST_ADDRESS = ADDRESSES[ECHO_HOST]

ECHO = r"""
import socket, sys, threading
server = socket.socket()
server.bind((sys.argv[1], 0))
server.listen(16)
print("echo", server.getsockname()[1], flush=True)

def serve(conn):  # as the benchmark's server: the answer, at once EOF, then wait for the client's EOF
    with conn:
        conn.sendall(conn.recv(1))
        conn.shutdown(socket.SHUT_WR)
        while conn.recv(4096):
            pass

while True:
    conn, _ = server.accept()
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
"""

PROBE = r"""
import json, logging, socket, sys, threading
from gridsock.bootstrap import sshtunnel
from gridsock.bootstrap.sshtunnel import SSHGateway, close_all_transports, open_ssh_tunnel

spec, key, known_hosts, host, port, connects, spare = sys.argv[1:8]
if spare == "no":
    sshtunnel.SSH_SPARE_MIN_ROUND_TRIP_S = float("inf")
gateway = SSHGateway.parse(spec, key_filename=key, known_hosts=known_hosts)
packets = []  # ("Write" or "Read", thread ident, message name), in the order they were logged
lock = threading.Lock()

class Packets(logging.Handler):
    def emit(self, record):
        text = record.getMessage()
        if text.startswith(("Read packet <", "Write packet <")):
            with lock:
                packets.append((text.split()[0], record.thread, text.split("<", 1)[1].split(">", 1)[0]))

log = logging.getLogger("paramiko.transport")
log.setLevel(logging.DEBUG)
log.addHandler(Packets())
dial = sshtunnel._dial_transport

def dial_logged(*args):  # every transport (the spare too) logs its packets
    transport = dial(*args)
    transport.set_hexdump(True)
    return transport

sshtunnel._dial_transport = dial_logged
for _ in range(int(connects)):
    sock = open_ssh_tunnel(gateway, host, int(port), timeout=30)
    with sock:
        sock.sendall(b"x")
        assert sock.recv(1) == b"x"
        sock.shutdown(socket.SHUT_WR)
        assert sock.recv(1) == b""
close_all_transports()
with lock:
    order = list(packets)
opens = [i for i, p in enumerate(order) if p[0] == "Write" and p[2] == "channel-open"]
answers = [i for i, p in enumerate(order) if p[0] == "Read" and p[2] == "channel-open-success"]
during, readers, seen = [], [], []
for sent, answered in zip(opens, answers):  # (one open at a time: the k-th answer is the k-th open's)
    reader = order[answered][1]
    readers.append(reader)
    during.append(sum(1 for p in order[sent + 1:answered] if p[0] == "Read" and p[1] == reader))
    seen.append([p[2] for p in order[sent + 1:answered] if p[0] == "Read" and p[1] == reader])
ids = {}
print(json.dumps({"opens": len(opens), "answers": len(answers), "during": during, "seen": seen,
                  "on": [ids.setdefault(r, len(ids)) for r in readers],
                  "transports": len(set(readers)), "spares_dialed": sshtunnel.KEEPER_COUNTERS["spares_dialed"]}),
      flush=True)
"""


def run_probe(lab, port: int, spare: bool) -> dict:
    argv = [sys.executable, "-c", PROBE, lab.ssh_gateway_public, lab.ssh_client_key, lab.ssh_known_hosts,
            ECHO_HOST_ADDRESS, str(port), str(CONNECTS), "yes" if spare else "no"]
    done = lab.run("rv", argv, capture_output=True, text=True, timeout=PROBE_TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def echo_port(lab):
    proc = lab.spawn(ECHO_HOST, [sys.executable, "-c", ECHO, ECHO_HOST_ADDRESS], stdout=subprocess.PIPE, text=True)
    try:
        yield int(wait_for_line(proc, "echo", timeout=30).split()[1])
    finally:
        proc.kill()
        proc.wait(10)


@pytest.fixture(scope="module")
def wan(lab):
    lab.set_wan(delay_ms=WAN_DELAY_MS)
    try:
        yield
    finally:
        lab.set_wan()


def test_back_to_back_channels_open_in_one_round_trip(lab, echo_port, wan):
    result = run_probe(lab, echo_port, spare=True)
    assert result["opens"] == result["answers"] == CONNECTS
    assert result["spares_dialed"] == 1
    assert result["transports"] == 2
    # Once the spare served its first channel (a transport's first open may meet what sshd sends
    # after the login: hostkeys-00@openssh.com, a debug message), no open meets a message of its
    # transport's gateway on the way: they alternate between the two transports.
    after = result["during"][result["on"].index(1) + 1:]
    assert len(after) >= CONNECTS // 2, json.dumps(result)
    assert after == [0] * len(after), json.dumps(result)


def test_without_the_spare_back_to_back_opens_wait_behind_the_previous_close(lab, echo_port, wan):
    # The control: one transport, the same connects; the opens after the first meet the gateway's
    # CLOSE of the channel before them (what the spare avoids).
    result = run_probe(lab, echo_port, spare=False)
    assert result["opens"] == result["answers"] == CONNECTS
    assert result["spares_dialed"] == 0 and result["transports"] == 1
    held = sum(1 for n in result["during"][1:] if n)
    assert held >= (CONNECTS - 1) // 2, json.dumps(result)
