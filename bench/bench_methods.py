"""Each data-connection method in the grid lab: establishment and throughput, next to its baseline.

What it measures
----------------
On a grid lab of its own (prefix ``gsm<pid>-``) and session: the rendez-vous node on ``rv`` and
nodes on ``rv``, ``a1`` (cluster A, behind gwa's NAT), ``b1`` (cluster B, behind fwb's stateful
firewall) and ``c1`` (cluster C, no route out: its uplink goes through fec's sshd). Every node
accepts raw stacks from outside its cluster (policy ``outside_cluster = []``), so each method is
measured alone, without ``tls`` above it. Each method runs on a path where the lab makes it the
one that works:

- ``tcp``, ``relay``, ``parallel(streams=N)/tcp``: ``a1 -> rv`` (rv accepts inbound connections);
- ``reverse``: ``rv -> a1`` (a1 accepts nothing, so it dials rv back);
- ``splice``: ``a1 -> b1`` (NAT to firewall, neither accepts: TCP simultaneous open);
- ``socks(proxy=203.0.113.4:1080)`` and ``ssh(gateway=root@203.0.113.4:22)``: ``rv -> c1``
  through fec's dante and OpenSSH sshd.

Baselines, in the same run and the same namespaces: a plain TCP socket (stdlib, blocking:
``bench_data.py plain-server`` / ``plain-client``) on the same path, or, for a connect, on the
nearest path a plain ``connect()`` can take (``a1 -> rv`` for ``reverse``, whose TCP connection
a1 opens; ``a1 -> fwb``, b1's firewall, for ``splice``; ``rv -> fec``, c1's front-end, for
``socks`` and ``ssh``); for ``splice``'s throughput a plain socket made by simultaneous open
between a1 and b1 (``bench_methods.py splice-peer``); iperf3 where it applies; PySocks used
directly (``socket.socket = socks.socksocket``, as its documentation says) through the same
dante; OpenSSH's ``ssh -L`` through the same sshd; and the ``sshtunnel`` package's
``SSHTunnelForwarder``, also through it (the SSH cipher each negotiated is reported).

Four WAN profiles (``Lab.set_wan``), one after the other in one run, each named in its table:

1. ``none``: no shaping. Throughput of every method, one way (the client sends), against its
   baselines: veth links, so CPU-bound, which is what shows a method's own cost.
2. ``wan10``: 10 ms one way (``delay_ms=10``; a path across the lab's internet gains 20 ms of
   round trip). Establishment delay of every method, ``--connects`` (50) per case: *steady* (a
   warm-up connect first: the meta link is up where the pair can have one, an SSH transport is
   up) and *first contact* (before every sample the meta link between the pair is dropped and
   the client's SSH transports are closed); next to plain ``connect()`` calls, PySocks connects,
   and connections through the running ``ssh -L`` and ``sshtunnel`` forwarders. *open*: until
   ``open_stream`` (or ``connect()``) returns; *ready*: until a 1-byte request has come back.
   Bootstrap-channel round trips of the pairs without a meta link are measured alongside.
3. ``rate100``: 100 Mbit/s uplinks (``rate_mbit=100``: tbf on every public host, no delay).
   ``lz4/tcp`` and ``adoc/tcp`` against raw ``tcp`` on JSON-like and on random data, ``relay``
   against direct ``tcp``, a plain socket and iperf3, ``a1 -> rv`` (capped at gwa's uplink).
4. ``lossy``: a long lossy link, 25 ms one way and 1 % loss each way (``delay_ms=25,
   loss=0.01``), with TCP congestion control ``reno`` in a1 and rv. 50 ms of round trip is a
   continental path; at 1 % loss one loss-based TCP stream is limited by loss, not by the link
   (Mathis et al.: about MSS / RTT * 1.22 / sqrt(p), some 3 Mbit/s here), which is the case
   parallel streams are for. No rate limit, so nothing but loss caps the streams. Why reno: the
   host's default here is bbr, which random loss barely slows, and a namespace may only choose
   among the host's allowed algorithms (reno and bbr here, not cubic); reno is loss-based as
   Linux's usual cubic is. ``parallel(streams=4)/tcp`` and ``parallel(streams=8)/tcp`` (and 8
   streams with 64 KiB chunks) against one ``tcp`` stream, one plain socket, 4 and 8 plain sockets
   each sending its share from a thread of its own (``bench_methods.py multi-client``, timed until
   the last share is in), iperf3 with 1, 4 and 8 streams, and iperf3 with bbr (``-C bbr``) for
   comparison, ``a1 -> rv``. (iperf3's ``-n`` ends its test once its client has written the bytes,
   before every stream's last bytes are in: on this link its multi-stream figures run high.)

``--round-trips`` measures issue 11's round-trip budget instead, into a section of its own
("Round trips per method"): only the establishment cases its targets name (``RT_CASES``: plain
connects, ``tcp`` steady and first contact, ``tls/`` over ``tcp``, ``reverse`` and ``splice``,
``ssh`` steady, first contact with the transport the node keeps and with none, ``ssh -L``), at
10 and at 20 ms one way (``RT_PROFILES``), with the steps of each method's steady connects, and
the uncached automatic selection between every ordered pair of the lab nodes (``op_auto``: the
peer's cached winner forgotten before each connect, then steady connects over the stack picked).
``--before RAW.json`` puts a run of the same mode on older code beside it (run it with
``PYTHONPATH`` pointing at a checkout of that code, and ``--no-write``).

Then a "Targets" table (issue 4's targets, each marked met or not met with the ratio measured,
and a note on what limits a missed one) and a PNG plot of the four tables.

``parallel`` came into gridsock while this bench was written: whether
``gridsock.registry.default_registry`` knows the name is checked at start, and where it does not,
its rows say "not available".

How
---
``bench_methods.py node ARGS`` is ``bench_data.py node`` (``gridsock node`` plus the bench service
on grid port ``BENCH_PORT`` and its timing operations) that also takes the SSH options (c1's uplink
goes through fec's sshd; rv's ``ssh`` method logs in with the lab's key) and has one more
operation, ``first``: first-contact connects. Plain baselines are ``bench_data.py plain-server``
and ``plain-client``; ``bench_methods.py socks-client`` is that client with PySocks patched in;
``bench_methods.py multi-client`` is that client over N sockets at once; ``bench_methods.py
sshtunnel-forward`` runs an ``SSHTunnelForwarder``; ``bench_methods.py splice-peer`` is one end of
a plain simultaneous open (gridsock's retry loop to connect, then a stdlib socket); ``ssh -L`` is
OpenSSH's client, ready when its ``LocalCommand`` prints (it runs once the forwarding listens).
Each end of a path runs on a core of its own (``taskset``, as two hosts would; ``--no-pin`` turns
it off): unpinned, the scheduler often put both ends on one core, which halved a run of either side
at random. Within a table, cases run in interleaved rounds, in a new order each round, so that a
load spike of the shared machine hits all alike. Every loop is bounded by a count, every wait by a
timeout, readiness is a line a process prints, never a sleep; the WAN profile is removed and the
lab torn down (``Lab.down()``) whatever happens, SIGTERM included.

    python3 bench/bench_methods.py [--quick] [--out docs/benchmarks.md] [--plot PNG]
                                   [--logs DIR] [--connects N] [--only PROFILES] [--no-pin]
    python3 bench/bench_methods.py --render-only RAW.json [--out ...] [--plot PNG]
    python3 bench/bench_methods.py --replot [--out docs/benchmarks.md] [--plot PNG]
    python3 bench/bench_methods.py --round-trips [--rt-profiles wan10,wan20] [--rt-cases KEYS]
                                   [--connects N] [--no-auto] [--before RAW.json] [--no-write]

Needs root, the lab's tools (iproute2, iptables, OpenSSH client and server, dante), iperf3, and
besides gridsock's own dependencies (paramiko, PySocks) two bench-only Python packages:
``python3 -m pip install sshtunnel matplotlib``. Without sshtunnel its rows say so; without
matplotlib there is no plot. ``--quick``: 5 connects per case, 8 / 4 / 1 MiB transfers, one
round (about a minute here); the full run: 50 connects per case in 5 rounds, 64 MiB transfers
in 5 rounds without shaping, 32 MiB at 100 Mbit/s and 8 MiB on the lossy link in 3 rounds
(about eight minutes here). ``--only none,wan10`` measures only those profiles' tables.

The results replace the section "Methods in the lab" of ``--out`` (the rest of the file is
kept) and go to stdout; the plot goes to ``--plot`` (default: ``bench_methods.png`` beside
``--out``), and the section links it by its name. The raw samples go to a JSON file in the
temporary directory, which ``--render-only FILE`` renders again without measuring. ``--replot``
draws the plot again from the medians the section of ``--out`` records (the raw samples gone),
and changes nothing else.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.util
import itertools
import json
import logging
import os
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import bench_data
from bench_data import (BENCH_OPS, CHUNK_BYTES, COLD_WAIT_S, CONNECT_TIMEOUT_S, CONTROL_SLACK_S,
                        IPERF_PORT, SERVER_READY_S, TRANSFER_TIMEOUT_S, Bench, BenchError, Reader, _connect_once,
                        _drop_meta_link, _kernel_timeouts, _terminated, client_transfer, loadavg, machine, ms,
                        percentile, progress, shuffled, table)
from gridsock.bootstrap.control import call
from gridsock.errors import GridsockError
from gridsock.testing.lab import ADDRESSES, SOCKS_PORT, SSH_PORT
from gridsock.testing.procs import stop_process, wait_for_line

from lab_helpers import JOIN_TIMEOUT_S, LabGrid, proc_cpu_s, replace_section

log = logging.getLogger("bench_methods")

SCRIPT = str(Path(__file__).resolve())
SECTION_TITLE = "## Methods in the lab"
PLOT_NAME = "bench_methods.png"

# --- the grid and the intermediaries ------------------------------------------------------------

NODES = ("rv", "a1", "b1", "c1")  # a leader per cluster, and the public node
OPEN_RULES = """\
# every stack from anywhere: each method is measured alone, without tls above it
[policy]
outside_cluster = []
"""
FRONTEND = ADDRESSES["fec"]  # cluster C's front-end, public side: dante and sshd
SSH_USER = "root"
SOCKS_STACK = f"socks(proxy={FRONTEND}:{SOCKS_PORT})"
SSH_STACK = f"ssh(gateway={SSH_USER}@{FRONTEND}:{SSH_PORT})"
SSH_L_PORT = 17022  # ssh -L listens here on rv's loopback (the lab's own namespace: nothing else there)
SSH_READY = "ssh-L forwarding"  # printed by ssh's LocalCommand, which runs once the forwarding listens
FORWARDERS = ("ssh-L", "sshtunnel")
# Each end of a measured path gets a core of its own, as two hosts would (taskset); the
# rendez-vous node, dante, sshd and the delayers float. Every path here joins a CPU-0 host to a
# CPU-1 host: a1 -> rv, rv -> a1, a1 -> b1, rv -> c1, rv -> fec.
CPU_OF = {"a1": 0, "c1": 0, "fec": 0, "rv": 1, "b1": 1, "fwb": 1}

# --- bounds ---------------------------------------------------------------------------------------

FIRST_CONNECT_S = CONNECT_TIMEOUT_S + COLD_WAIT_S  # one first-contact sample, its preparation included
SPLICE_PEER_TIMEOUT_S = 20.0  # the plain simultaneous open: the other end's process starts within this
SPLICE_PORTS = 17100  # the plain simultaneous opens bind from here on, two ports a transfer (fresh 4-tuples)
PINGS = 10  # bootstrap round trips per pair, to read the establishment figures by
ANATOMY_CONNECTS = 10  # connects whose steps are timed, per method
CASE_ERRORS = (BenchError, GridsockError, TimeoutError, subprocess.SubprocessError, OSError, RuntimeError)


@dataclasses.dataclass(frozen=True)
class Profile:
    """A WAN profile: the keyword arguments of ``Lab.set_wan`` (none: no shaping) and what they mean."""

    name: str
    wan: Dict[str, float]
    what: str
    congestion: str = ""  # TCP congestion control set in CONGESTION_HOSTS for this profile ("": the default)

    def call(self) -> str:
        args = ", ".join(f"{k}={v:g}" for k, v in self.wan.items())
        return f"`Lab.set_wan({args})`" if args else "no `Lab.set_wan`"


PROFILES = {
    "none": Profile("none", {}, "no WAN shaping: every link is a veth, round trips of tens of µs, no rate limit"),
    "wan10": Profile("wan10", {"delay_ms": 10.0},
                     "10 ms one way on every public host's ingress: a path across the lab's internet gains 20 ms "
                     "of round trip; no loss, no rate limit"),
    "rate100": Profile("rate100", {"rate_mbit": 100.0},
                       "every public host's uplink limited to 100 Mbit/s (tbf), no delay: a1 -> rv is capped "
                       "by gwa's uplink"),
    "lossy": Profile("lossy", {"delay_ms": 25.0, "loss": 0.01},
                     "a long lossy link: 25 ms one way and 1 % random loss each way on every public host's "
                     "ingress (50 ms more round trip); no rate limit; TCP congestion control `reno` in a1 and rv",
                     congestion="reno"),
}
CONGESTION_HOSTS = ("a1", "rv")  # the ends of the lossy table's path
CONGESTION_SYSCTL = "net.ipv4.tcp_congestion_control"
PROFILE_ORDER = ("none", "wan10", "rate100", "lossy")


@dataclasses.dataclass(frozen=True)
class Plan:
    """How much of everything to do."""

    connects: int  # samples per establishment case
    connect_rounds: int
    unshaped_bytes: int  # per transfer, profile none
    rate_bytes: int  # profile rate100
    lossy_bytes: int  # profile lossy
    rounds: int  # transfer rounds, profile none
    shaped_rounds: int  # transfer rounds, profiles rate100 and lossy


FULL = Plan(connects=50, connect_rounds=5, unshaped_bytes=64 << 20, rate_bytes=32 << 20, lossy_bytes=8 << 20,
            rounds=5, shaped_rounds=3)
QUICK = Plan(connects=5, connect_rounds=1, unshaped_bytes=8 << 20, rate_bytes=4 << 20, lossy_bytes=1 << 20,
             rounds=1, shaped_rounds=1)


# --- the cases --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Case:
    """One line of a table: a gridsock stack or a baseline, on one path.

    ``how``: ``grid`` (``open_stream`` in node ``src`` to node ``dst``), ``plain`` (a plain socket
    from host ``src`` to the plain server on host ``dst``), ``iperf`` (iperf3 client in ``src``,
    server in ``dst``), ``socks`` (PySocks through dante to ``dst``'s plain server), ``ssh-L`` and
    ``sshtunnel`` (through those forwarders in ``src`` to ``dst``'s plain server).
    """

    key: str
    label: str  # Markdown, the table's first column
    short: str  # how other rows name it
    how: str
    src: str
    dst: str
    path: str
    stack: str = ""
    mode: str = ""  # establishment of grid cases: steady or first
    kind: str = "random"  # data kind of a transfer
    direction: str = "up"  # up: the client sends; down: the server sends
    streams: int = 1  # iperf3 -P
    congestion: str = ""  # iperf3 -C
    against: Tuple[str, ...] = ()  # the keys of the cases this one is compared with, first is the main one

    @property
    def parallel(self) -> bool:
        return self.stack.startswith("parallel")


def _grid(key: str, stack: str, src: str, dst: str, path: str, against: Tuple[str, ...], **kw) -> Case:
    return Case(key, f"gridsock `{stack}`", f"`{stack}`", "grid", src, dst, path, stack=stack, against=against, **kw)


def _connects(name: str, stack: str, src: str, dst: str, path: str, against: Tuple[str, ...]) -> List[Case]:
    return [dataclasses.replace(_grid(f"{name} {mode}", stack, src, dst, path, against, mode=mode),
                                label=f"gridsock `{stack}`, {'steady' if mode == 'steady' else 'first contact'}")
            for mode in ("steady", "first")]


P_A1_RV = "a1 -> rv"
P_RV_A1 = "rv -> a1 (a1 dials rv)"
P_A1_B1 = "a1 -> b1"
P_RV_C1 = "rv -> c1 through fec"

ESTABLISH = [
    Case("plain a1>rv", "plain TCP `connect()`", "plain `connect()` a1 -> rv", "plain", "a1", "rv", P_A1_RV),
    *_connects("tcp", "tcp", "a1", "rv", P_A1_RV, ("plain a1>rv",)),
    *_connects("relay", "relay", "a1", "rv", P_A1_RV, ("plain a1>rv",)),
    *_connects("parallel4", "parallel(streams=4)/tcp", "a1", "rv", P_A1_RV, ("plain a1>rv",)),
    *_connects("parallel8", "parallel(streams=8)/tcp", "a1", "rv", P_A1_RV, ("plain a1>rv",)),
    *_connects("reverse", "reverse", "rv", "a1", P_RV_A1, ("plain a1>rv",)),
    Case("plain a1>fwb", "plain TCP `connect()` to b1's firewall", "plain `connect()` a1 -> fwb", "plain", "a1",
         "fwb", "a1 -> fwb"),
    *_connects("splice", "splice", "a1", "b1", P_A1_B1, ("plain a1>fwb",)),
    Case("plain rv>fec", "plain TCP `connect()` to c1's front-end", "plain `connect()` rv -> fec", "plain", "rv",
         "fec", "rv -> fec"),
    Case("pysocks", "PySocks through dante", "PySocks", "socks", "rv", "c1", P_RV_C1),
    *_connects("socks", SOCKS_STACK, "rv", "c1", P_RV_C1, ("plain rv>fec", "pysocks")),
    Case("ssh-L", "OpenSSH `ssh -L` (its transport up)", "`ssh -L`", "ssh-L", "rv", "c1", P_RV_C1),
    Case("sshtunnel", "`sshtunnel` (its transport up)", "sshtunnel", "sshtunnel", "rv", "c1", P_RV_C1),
    *_connects("ssh", SSH_STACK, "rv", "c1", P_RV_C1, ("plain rv>fec", "ssh-L", "sshtunnel")),
]

UNSHAPED = [
    Case("plain a1>rv", "plain TCP socket", "plain", "plain", "a1", "rv", P_A1_RV),
    Case("iperf3 a1>rv", "iperf3", "iperf3", "iperf", "a1", "rv", P_A1_RV),
    _grid("tcp", "tcp", "a1", "rv", P_A1_RV, ("plain a1>rv", "iperf3 a1>rv")),
    _grid("relay", "relay", "a1", "rv", P_A1_RV, ("tcp", "plain a1>rv")),
    Case("plain rv>a1", "plain TCP socket (a1 connects, rv sends)", "plain", "plain", "a1", "rv", "rv -> a1",
         direction="down"),
    Case("iperf3 rv>a1", "iperf3 `-R` (a1 connects, rv sends)", "iperf3", "iperf", "a1", "rv", "rv -> a1",
         direction="down"),
    _grid("reverse", "reverse", "rv", "a1", P_RV_A1, ("plain rv>a1", "iperf3 rv>a1")),
    Case("plain a1>b1", "plain TCP socket, simultaneous open", "plain", "splice-plain", "a1", "b1", P_A1_B1),
    _grid("splice", "splice", "a1", "b1", P_A1_B1, ("plain a1>b1",)),
    Case("pysocks", "PySocks through dante", "PySocks", "socks", "rv", "c1", P_RV_C1),
    _grid("socks", SOCKS_STACK, "rv", "c1", P_RV_C1, ("pysocks",)),
    Case("ssh-L", "OpenSSH `ssh -L`", "`ssh -L`", "ssh-L", "rv", "c1", P_RV_C1),
    Case("sshtunnel", "`sshtunnel`", "sshtunnel", "sshtunnel", "rv", "c1", P_RV_C1),
    _grid("ssh", SSH_STACK, "rv", "c1", P_RV_C1, ("sshtunnel", "ssh-L")),
]

RATE100 = [
    Case("plain", "plain TCP socket", "plain", "plain", "a1", "rv", P_A1_RV),
    Case("iperf3", "iperf3", "iperf3", "iperf", "a1", "rv", P_A1_RV),
    _grid("tcp random", "tcp", "a1", "rv", P_A1_RV, ("plain", "iperf3")),
    _grid("tcp json", "tcp", "a1", "rv", P_A1_RV, ("plain",), kind="json"),
    _grid("lz4 json", "lz4/tcp", "a1", "rv", P_A1_RV, ("tcp json",), kind="json"),
    _grid("lz4 random", "lz4/tcp", "a1", "rv", P_A1_RV, ("tcp random",)),
    _grid("adoc json", "adoc/tcp", "a1", "rv", P_A1_RV, ("tcp json",), kind="json"),
    _grid("adoc random", "adoc/tcp", "a1", "rv", P_A1_RV, ("tcp random",)),
    _grid("relay random", "relay", "a1", "rv", P_A1_RV, ("tcp random",)),
]

LOSSY = [
    Case("plain", "plain TCP socket", "plain", "plain", "a1", "rv", P_A1_RV),
    Case("plain P4", "plain TCP sockets, 4 streams (threads)", "4 plain sockets", "plain", "a1", "rv", P_A1_RV,
         streams=4),
    Case("plain P8", "plain TCP sockets, 8 streams (threads)", "8 plain sockets", "plain", "a1", "rv", P_A1_RV,
         streams=8),
    Case("iperf3 P1", "iperf3, 1 stream", "iperf3", "iperf", "a1", "rv", P_A1_RV),
    Case("iperf3 P4", "iperf3, 4 streams (`-P 4`)", "iperf3 -P 4", "iperf", "a1", "rv", P_A1_RV, streams=4),
    Case("iperf3 P8", "iperf3, 8 streams (`-P 8`)", "iperf3 -P 8", "iperf", "a1", "rv", P_A1_RV, streams=8),
    Case("iperf3 bbr P1", "iperf3, 1 stream, `bbr` (`-C bbr`)", "iperf3 bbr", "iperf", "a1", "rv", P_A1_RV,
         congestion="bbr"),
    Case("iperf3 bbr P8", "iperf3, 8 streams, `bbr` (`-P 8 -C bbr`)", "iperf3 -P 8 bbr", "iperf", "a1", "rv", P_A1_RV,
         streams=8, congestion="bbr"),
    _grid("tcp", "tcp", "a1", "rv", P_A1_RV, ("plain", "iperf3 P1")),
    _grid("parallel4", "parallel(streams=4)/tcp", "a1", "rv", P_A1_RV, ("tcp", "plain P4", "iperf3 P4")),
    _grid("parallel8", "parallel(streams=8)/tcp", "a1", "rv", P_A1_RV, ("tcp", "plain P8", "iperf3 P8")),
    # smaller chunks than the default: how much of the gap to independent streams is the striping's grain
    _grid("parallel8 64k", "parallel(streams=8,chunk=65536)/tcp", "a1", "rv", P_A1_RV,
          ("tcp", "plain P8", "iperf3 P8")),
]

# profile -> (title, cases, what kind of table)
TABLES = {
    "none": ("Throughput per method", UNSHAPED, "stream"),
    "wan10": ("Establishment delay per method", ESTABLISH, "connect"),
    "rate100": ("Compression and relay at 100 Mbit/s", RATE100, "stream"),
    "lossy": ("Parallel streams on a long lossy link", LOSSY, "stream"),
}


def parallel_status() -> Optional[str]:
    """None if the default registry knows ``parallel``, else why its rows are not available."""
    from gridsock.registry import default_registry
    from gridsock.stack import Stack

    try:
        default_registry.info("parallel")
        Stack.parse("parallel(streams=8)/tcp")
    except GridsockError as exc:
        return f"not available: {exc}"
    return None


def norm_stack(text: str) -> str:
    from gridsock.stack import Stack

    return str(Stack.parse(text))


# --- inside a node process ----------------------------------------------------------------------------


def op_first(node, args: dict) -> dict:
    """``n`` first-contact connects to ``dst`` over ``stack``: before each, the meta link to ``dst``
    is dropped (where there is one; the peer's end too; one still opening, as the last connect
    opens one beside its request, first comes up) and, unless ``keep_transports``, this process's
    SSH transports are closed (with ``keep_transports`` they stay as the node keeps them)."""
    from gridsock.bootstrap.sshtunnel import close_all_transports

    dst, stack, n = str(args["dst"]), str(args["stack"]), int(args["n"])
    keep = bool(args.get("keep_transports"))
    opens, readies, stacks = [], [], set()
    for _ in range(n):
        entry = node.directory.resolve(dst)
        opening = getattr(node.meta, "_opening", {}).get(entry.node_id) if entry is not None else None
        if opening is not None:
            opening.wait(COLD_WAIT_S)
        _drop_meta_link(node, dst)
        if not keep:
            close_all_transports()
        open_s, ready_s, built = _connect_once(node, dst, stack)
        opens.append(open_s)
        readies.append(ready_s)
        stacks.add(built)
    return {"open": opens, "ready": readies, "stacks": sorted(stacks)}


def op_ssh_ciphers(node, args: dict) -> list:
    """The cipher and MAC of each live SSH transport of this process (paramiko's names)."""
    from gridsock.bootstrap import sshtunnel

    return sorted({f"{t.local_cipher}, MAC {t.local_mac}" for t in list(sshtunnel._TRANSPORTS.values())
                   if t.is_active()})


def op_auto(node, args: dict) -> dict:
    """``n`` uncached automatic connects to ``dst`` (the rules' candidates raced, stack None):
    before each, the winner cached for ``dst`` is forgotten. Times in seconds, and the stacks."""
    dst, n = str(args["dst"]), int(args["n"])
    entry = node.directory.resolve(dst)
    if entry is None:
        raise BenchError(f"{dst} is not in {node.name}'s directory")
    opens, readies, stacks = [], [], []
    for _ in range(n):
        node.assembler._winners.pop(entry.node_id, None)
        open_s, ready_s, built = _connect_once(node, dst, None)
        opens.append(open_s)
        readies.append(ready_s)
        stacks.append(built)
    return {"open": opens, "ready": readies, "stacks": stacks}


NODE_OPS = {**BENCH_OPS, "first": op_first, "ssh_ciphers": op_ssh_ciphers, "auto": op_auto}


def run_node(argv: List[str]) -> int:
    """``bench_methods.py node ARGS``: ``bench_data.py node`` with this bench's operations."""
    return bench_data.run_node(argv, ops=NODE_OPS, prog="bench_methods.py node")


# --- baselines that are not bench_data's ----------------------------------------------------------------


def run_socks_client(spec: dict) -> int:
    """``bench_data.py plain-client`` through a SOCKS5 proxy: PySocks used as its documentation says,
    every ``socket.socket`` of the program replaced by ``socks.socksocket`` with a default proxy."""
    import socks

    socks.set_default_proxy(socks.SOCKS5, spec["proxy_host"], int(spec["proxy_port"]), rdns=True)
    socket.socket = socks.socksocket
    return bench_data.run_plain_client(spec)


def run_multi_client(spec: dict) -> int:
    """``streams`` plain TCP sockets to ``addr:port`` (``bench_data.py plain-server``), one thread
    each, every one sending its share of ``bytes`` (*up*); JSON on stdout like ``plain-client``'s.

    All connections are made first; the clock runs from the first byte sent until every server
    thread has said it has all of its share (what ``parallel``'s figure counts, over N connections).
    """
    import threading

    streams, nbytes, kind = int(spec["streams"]), int(spec["bytes"]), spec["kind"]
    shares = [nbytes // streams + (1 if i < nbytes % streams else 0) for i in range(streams)]
    bench_data.pattern(kind)  # before the clocks start
    socks = []
    try:
        for _ in range(streams):
            sock = socket.create_connection((spec["addr"], int(spec["port"])), timeout=CONNECT_TIMEOUT_S)
            socks.append(sock)
            sock.settimeout(None)
            _kernel_timeouts(sock, TRANSFER_TIMEOUT_S)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        outcome: List[Optional[dict]] = [None] * streams
        errors: List[BaseException] = []

        def one(i: int) -> None:
            try:
                outcome[i] = client_transfer(Reader(socks[i].recv), socks[i].sendall, "up", shares[i], kind)
            except BaseException as exc:  # reported below, after every thread is done
                errors.append(exc)

        threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(streams)]
        cpu, started = time.process_time(), time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(TRANSFER_TIMEOUT_S)  # the kernel timeouts end a stuck thread before this
        seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
        if errors or any(o is None for o in outcome):
            raise BenchError(f"{len(errors)} of {streams} streams failed: {errors[:1]}")
    finally:
        for sock in socks:
            sock.close()
    # the server's CPU time is its process's, over each stream's span: the longest one spans them all
    result = {"seconds": seconds, "cpu_s": cpu, "server_cpu_s": max(o["server_cpu_s"] for o in outcome)}
    print(json.dumps(result), flush=True)
    return 0


def run_sshtunnel_forward(spec: dict) -> int:
    """An ``sshtunnel.SSHTunnelForwarder`` from 127.0.0.1 (port printed) to ``addr:port`` through
    the gateway; runs until SIGTERM or SIGINT."""
    import sshtunnel

    logging.basicConfig(level=logging.WARNING)
    stop_signals = {signal.SIGTERM, signal.SIGINT}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)  # the forwarder's threads inherit it: sigwait gets them
    forwarder = sshtunnel.SSHTunnelForwarder(
        (spec["gateway_host"], int(spec["gateway_port"])), ssh_username=spec["user"], ssh_pkey=spec["key"],
        allow_agent=False, host_pkey_directories=[], ssh_config_file=None,
        remote_bind_address=(spec["addr"], int(spec["port"])), local_bind_address=("127.0.0.1", 0))
    forwarder.daemon_forward_servers = True
    forwarder.daemon_transport = True
    forwarder.start()
    transport = getattr(forwarder, "_transport", None)
    cipher = f"{getattr(transport, 'local_cipher', '?')}, MAC {getattr(transport, 'local_mac', '?')}"
    print(f"sshtunnel listening {forwarder.local_bind_port} cipher {cipher}", flush=True)
    signal.sigwait(stop_signals)
    forwarder.stop(force=True)
    return 0


def run_splice_peer(spec: dict) -> int:
    """One end of a plain TCP connection made by simultaneous open, as gridsock's ``splice`` makes it.

    Binds ``local_port`` (printing ``splice bound``) and connects to ``remote_host:remote_port``
    while the other end connects to it (gridsock's own retry loop, ``splice_connect``: the
    connect logic only); the connected socket is then a stdlib blocking socket, as the plain
    baseline's. ``role`` ``server`` serves one request of the bench protocol; ``client`` makes
    the transfer ``spec`` asks for and prints its result (``bench_data.py plain-client``'s JSON).
    """
    from gridsock.bootstrap.transport import Address
    from gridsock.components.splice import bind_splice_socket, splice_connect

    gsock = bind_splice_socket(int(spec["local_port"]))
    print(f"splice bound {spec['local_port']}", flush=True)
    gsock = splice_connect(gsock, Address(host=spec["remote_host"], port=int(spec["remote_port"])),
                           timeout=SPLICE_PEER_TIMEOUT_S)
    sock = socket.socket(fileno=gsock.detach())
    try:
        sock.setblocking(True)
        _kernel_timeouts(sock, TRANSFER_TIMEOUT_S)
        reader = Reader(sock.recv)
        if spec["role"] == "server":
            bench_data.serve_request(reader, sock.sendall)
            reader.until_eof()
        else:
            result = client_transfer(reader, sock.sendall, spec["direction"], int(spec["bytes"]), spec["kind"])
            print(json.dumps(result), flush=True)
    finally:
        sock.close()
    return 0


# --- the orchestrator -----------------------------------------------------------------------------------


class MethodsBench(Bench):
    """The lab grid, the baselines and the measurements, from the host's namespace."""

    def __init__(self, lab, grid: LabGrid, plan: Plan, workdir: Path, parallel_why: Optional[str], *,
                 pin: bool = True) -> None:
        super().__init__(lab, grid, plan, workdir)
        self.pin = pin
        self.parallel_why = parallel_why
        self.plain_ports: Dict[str, int] = {}  # host -> the TCP port of its plain server
        self.forward_ports: Dict[str, int] = {}  # ssh-L / sshtunnel -> its port on rv's loopback
        self.forward_errors: Dict[str, str] = {}  # ssh-L / sshtunnel -> why it is not there
        self.splice_ports = itertools.count(SPLICE_PORTS, 2)
        self.ciphers: Dict[str, str] = {}  # ssh-L / sshtunnel / ssh (gridsock) -> what its SSH transport uses

    # -- setup

    def pinned(self, host: str, argv: List[str]) -> List[str]:
        """``argv`` on ``host``'s core (CPU_OF), unless pinning is off."""
        return ["taskset", "-c", str(CPU_OF[host]), *argv] if self.pin else list(argv)

    def start_grid(self) -> None:
        grid, lab = self.grid, self.lab
        driver = [sys.executable, SCRIPT, "node", "--ssh-key", lab.ssh_client_key,
                  "--ssh-known-hosts", lab.ssh_known_hosts]
        grid.new_session()
        grid.start_rendezvous()
        for name in NODES:
            grid.start_node(name, program=self.pinned(name, driver), rules=OPEN_RULES)
        grid.wait_joined(NODES)
        grid.wait_directory(NODES, NODES)
        for name in ("rv", "a1"):  # the clients: dial-back verdicts decide meta links and candidates
            call(grid.control(name), "wait", {"present": list(NODES), "settled": True, "timeout": JOIN_TIMEOUT_S},
                 timeout=JOIN_TIMEOUT_S + 5)

    def start_plain_server(self, host: str) -> Tuple[subprocess.Popen, int, int]:
        """``bench_data.py plain-server`` in ``host``, on its core; returns (process, TCP port, TLS port)."""
        argv = [sys.executable, bench_data.SCRIPT, "plain-server", json.dumps(self.tls_files["server"])]
        proc = self.grid.spawn(host, f"plain-{host}", self.pinned(host, argv))
        line = wait_for_line(proc, "plain listening", timeout=SERVER_READY_S)
        tcp_port, tls_port = (int(word) for word in line.split()[2:4])
        return proc, tcp_port, tls_port

    def plain_client(self, host: str, spec: dict, bound_s: float, mode: str = "plain-client") -> dict:
        """One ``bench_data.py plain-client`` run in ``host`` on its core (or this script's ``mode``)."""
        script = bench_data.SCRIPT if mode == "plain-client" else SCRIPT
        argv = [sys.executable, script, mode, json.dumps({**self.tls_files["client"], **spec})]
        done = self.lab.run(host, self.pinned(host, argv), capture_output=True, text=True,
                            timeout=bound_s + CONTROL_SLACK_S)
        if done.returncode != 0:
            raise BenchError(f"{mode} in {host} failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
        return json.loads(done.stdout.strip().splitlines()[-1])

    def start_baselines(self) -> None:
        """Plain servers on rv, fwb, fec and c1; the ssh -L and sshtunnel forwarders in rv, to c1's."""
        for host in ("rv", "fwb", "fec", "c1"):
            _, tcp_port, _ = self.start_plain_server(host)
            self.plain_ports[host] = tcp_port
        target_host, target_port = self.lab.addr("c1"), self.plain_ports["c1"]
        argv = ["ssh", "-v", "-F", "/dev/null", "-N", "-i", self.lab.ssh_client_key, "-o", "IdentitiesOnly=yes",
                "-o", "BatchMode=yes", "-o", f"UserKnownHostsFile={self.lab.ssh_known_hosts}",
                "-o", "StrictHostKeyChecking=yes", "-o", "ExitOnForwardFailure=yes",
                "-o", "PermitLocalCommand=yes", "-o", f"LocalCommand=echo {SSH_READY}",
                "-L", f"127.0.0.1:{SSH_L_PORT}:{target_host}:{target_port}", "-p", str(SSH_PORT),
                f"{SSH_USER}@{FRONTEND}"]
        proc = self.grid.spawn("rv", "ssh-L", self.pinned("rv", argv))
        wait_for_line(proc, SSH_READY, timeout=SERVER_READY_S)
        self.forward_ports["ssh-L"] = SSH_L_PORT
        self.ciphers["ssh-L"] = self.openssh_cipher()
        if importlib.util.find_spec("sshtunnel") is None:
            self.forward_errors["sshtunnel"] = "not available: the sshtunnel package is missing " \
                                               "(python3 -m pip install sshtunnel)"
            return
        spec = {"gateway_host": FRONTEND, "gateway_port": SSH_PORT, "user": SSH_USER,
                "key": self.lab.ssh_client_key, "addr": target_host, "port": target_port}
        proc = self.grid.spawn("rv", "sshtunnel",
                               self.pinned("rv", [sys.executable, SCRIPT, "sshtunnel-forward", json.dumps(spec)]))
        line = wait_for_line(proc, "sshtunnel listening", timeout=SERVER_READY_S)
        self.forward_ports["sshtunnel"] = int(line.split()[2])
        self.ciphers["sshtunnel"] = line.split(" cipher ", 1)[1] if " cipher " in line else "?"

    def openssh_cipher(self) -> str:
        """The cipher ssh -L negotiated, from its -v output (its log): "kex: client->server cipher: ..."."""
        try:
            text = self.grid.logs["ssh-L"].read_text(errors="replace")
        except OSError:
            return "?"
        found = re.search(r"kex: client->server cipher: (\S+) MAC: (\S+)", text)
        return f"{found.group(1)}, MAC {found.group(2)}" if found else "?"

    def gridsock_cipher(self) -> None:
        """What the ssh method's transport in rv uses (after the throughput table made one)."""
        try:
            found = self.bench_op("rv", "ssh_ciphers", {}, CONNECT_TIMEOUT_S)
        except CASE_ERRORS as exc:
            found = [f"? ({exc})"]
        self.ciphers["ssh"] = "; ".join(found) or "?"

    def unavailable(self, case: Case) -> Optional[str]:
        if case.parallel and self.parallel_why:
            return self.parallel_why
        if case.parallel:
            try:
                norm_stack(case.stack)
            except GridsockError as exc:
                return f"not available: {exc}"
        if case.how in FORWARDERS:
            return self.forward_errors.get(case.how)
        return None

    # -- one measurement

    def baseline_client(self, case: Case, spec: dict, bound_s: float) -> dict:
        """A plain-client run for a baseline case (plain, socks, ssh-L, sshtunnel)."""
        if case.how in FORWARDERS:
            spec = {**spec, "addr": "127.0.0.1", "port": self.forward_ports[case.how]}
        else:
            spec = {**spec, "addr": self.lab.addr(case.dst), "port": self.plain_ports[case.dst]}
        spec.update(tls_port=0, tls=False)
        if case.how == "socks":
            spec.update(proxy_host=FRONTEND, proxy_port=SOCKS_PORT)
            return self.plain_client(case.src, spec, bound_s, mode="socks-client")
        if case.streams > 1:
            spec.update(streams=case.streams)
            return self.plain_client(case.src, spec, bound_s, mode="multi-client")
        return self.plain_client(case.src, spec, bound_s)

    def connect_batch(self, case: Case, n: int) -> dict:
        """``n`` establishment samples of ``case``: ``open``, ``ready`` (seconds) and ``stacks`` built."""
        if case.how == "grid":
            op = "connects" if case.mode == "steady" else "first"
            res = self.bench_op(case.src, op, {"dst": case.dst, "stack": case.stack, "n": n, "mode": "steady"},
                                FIRST_CONNECT_S * (n + 1))
            if res["stacks"] != [norm_stack(case.stack)]:
                raise BenchError(f"asked for {case.stack}, got {res['stacks']}")
            return res
        return self.baseline_client(case, {"op": "connect", "n": n}, CONNECT_TIMEOUT_S * (n + 1))

    def transfer(self, case: Case, nbytes: int) -> dict:
        """One transfer of ``case``: ``mb_per_s`` and ``cpu`` (a list of [who, % of a core])."""
        if case.how == "iperf":
            return self.iperf_run(case, nbytes)
        if case.how == "splice-plain":
            res = self.splice_plain(case, nbytes)
            seconds = res["seconds"]
            cpu = [[case.src, res["cpu_s"]], [case.dst, res["server_cpu_s"]]]
        elif case.how == "grid":
            rendezvous = self.grid.pid("rendezvous")
            before = proc_cpu_s(rendezvous)
            res = self.bench_op(case.src, "stream", {"dst": case.dst, "stack": case.stack, "bytes": nbytes,
                                                     "kind": case.kind, "direction": case.direction,
                                                     "bridged": False}, TRANSFER_TIMEOUT_S)
            after = proc_cpu_s(rendezvous)
            if before is None or after is None:
                raise BenchError(f"the rendez-vous node is gone; logs:\n{self.grid.logs_tail()}")
            if norm_stack(res["stack"]) != norm_stack(case.stack):
                raise BenchError(f"asked for {case.stack}, got {res['stack']}")
            seconds = res["seconds"]
            cpu = [[case.src, res["cpu_s"]], [case.dst, res["server_cpu_s"]], ["rendezvous", after - before]]
        else:
            tunnel = self.grid.pid(case.how) if case.how in FORWARDERS else None
            before = proc_cpu_s(tunnel) if tunnel else None
            spec = {"op": "stream", "bytes": nbytes, "kind": case.kind, "direction": case.direction}
            res = self.baseline_client(case, spec, TRANSFER_TIMEOUT_S)
            seconds = res["seconds"]
            cpu = [[case.src, res["cpu_s"]], [case.dst, res["server_cpu_s"]]]
            if tunnel:
                after = proc_cpu_s(tunnel)
                if before is None or after is None:
                    raise BenchError(f"the {case.how} forwarder is gone")
                cpu.append([case.how, after - before])
        return {"mb_per_s": nbytes / seconds / 1e6, "seconds": seconds,
                "cpu": [[who, round(100 * s / seconds, 1)] for who, s in cpu]}

    def splice_plain(self, case: Case, nbytes: int) -> dict:
        """One transfer over a plain TCP connection made by simultaneous open between ``case.src``
        (client, behind gwa's NAT) and ``case.dst`` (server, behind fwb's firewall).

        The client starts first: its first SYN, dropped by fwb, opens gwa's NAT mapping, which the
        server's SYNs then find. (Server first, its SYNs to gwa are refused, and each refusal
        leaves a conntrack entry on gwa that can make MASQUERADE give the client another port:
        that failed about one time in six.)
        """
        client_port = next(self.splice_ports)
        server_port = client_port + 1
        nat = self.lab.addr("gwa")  # a1 as the internet sees it: MASQUERADE keeps a free port
        client_spec = {"local_port": client_port, "remote_host": self.lab.addr(case.dst), "remote_port": server_port,
                       "role": "client", "bytes": nbytes, "kind": case.kind, "direction": case.direction}
        server_spec = {"local_port": server_port, "remote_host": nat, "remote_port": client_port, "role": "server"}
        client = server = None
        try:
            argv = [sys.executable, SCRIPT, "splice-peer", json.dumps(client_spec)]
            client = self.grid.spawn(case.src, f"splice-peer-{case.src}", self.pinned(case.src, argv))
            wait_for_line(client, "splice bound", timeout=SERVER_READY_S)
            argv = [sys.executable, SCRIPT, "splice-peer", json.dumps(server_spec)]
            server = self.grid.spawn(case.dst, f"splice-peer-{case.dst}", self.pinned(case.dst, argv))
            line = wait_for_line(client, "{", timeout=SPLICE_PEER_TIMEOUT_S + TRANSFER_TIMEOUT_S)
            for proc in (client, server):
                try:
                    proc.wait(timeout=SERVER_READY_S)
                except subprocess.TimeoutExpired:
                    pass
        except (RuntimeError, TimeoutError) as exc:
            raise BenchError(f"plain simultaneous open {case.src} -> {case.dst}: {exc}; logs:\n"
                             f"{self.grid.logs_tail()}") from exc
        finally:
            for proc in (client, server):
                stop_process(proc)
        return json.loads(line)

    def iperf_run(self, case: Case, nbytes: int) -> dict:
        server = self.grid.spawn(case.dst, f"iperf3-{case.dst}",
                                 self.pinned(case.dst, ["iperf3", "-s", "-1", "-p", str(IPERF_PORT), "--forceflush"]))
        try:
            wait_for_line(server, lambda line: "Server listening" in line, timeout=SERVER_READY_S)
            argv = ["iperf3", "-c", self.lab.addr(case.dst), "-p", str(IPERF_PORT), "-n", str(nbytes),
                    "-l", str(CHUNK_BYTES), "-J"]  # writes as large as everyone else's
            if case.direction == "down":
                argv.append("-R")
            if case.streams > 1:
                argv += ["-P", str(case.streams)]
            if case.congestion:
                argv += ["-C", case.congestion]
            done = self.lab.run(case.src, self.pinned(case.src, argv), capture_output=True, text=True,
                                timeout=TRANSFER_TIMEOUT_S)
            if done.returncode != 0:
                raise BenchError(f"iperf3 client failed: {done.stdout[-1000:]} {done.stderr[-1000:]}")
            report = json.loads(done.stdout)
            try:
                server.wait(timeout=SERVER_READY_S)
            except subprocess.TimeoutExpired:
                pass
        finally:
            stop_process(server)
        end = report["end"]
        cpu = end.get("cpu_utilization_percent", {})
        return {"mb_per_s": end["sum_received"]["bits_per_second"] / 8 / 1e6,
                "seconds": end["sum_received"].get("seconds"),
                "cpu": [[case.src, cpu.get("host_total")], [case.dst, cpu.get("remote_total")]]}

    # -- tables

    def _fresh(self, cases: Sequence[Case]) -> Dict[str, dict]:
        out = {}
        for case in cases:
            why = self.unavailable(case)
            out[case.key] = {"error": why, "na": why is not None}
        return out

    def _failed(self, what: str, case: Case, entry: dict, exc: BaseException) -> None:
        entry["error"] = f"failed: {type(exc).__name__}: {exc}"[:600]
        progress(f"{what}: {case.key} {entry['error']}")

    def bootstrap_pings(self) -> Dict[str, List[float]]:
        """Round trips of the bootstrap channel (ms) on the paths whose meta traffic takes it."""
        out = {}
        for src, dst in (("rv", "a1"), ("a1", "b1"), ("rv", "c1")):
            out[f"{src}>{dst}"] = [call(self.grid.control(src), "ping", {"dst": dst, "timeout": CONNECT_TIMEOUT_S},
                                        timeout=CONNECT_TIMEOUT_S + 5)["rtt_ms"] for _ in range(PINGS)]
        return out

    def anatomy(self) -> Dict[str, dict]:
        """The steps of steady connects (bench_data's ``anatomy``: dial and request, which overlap,
        and the filters) for the methods whose request takes the bootstrap channel; ms, medians."""
        out = {}
        n = min(ANATOMY_CONNECTS, self.plan.connects)
        for name, stack, src, dst in (("ssh", SSH_STACK, "rv", "c1"), ("socks", SOCKS_STACK, "rv", "c1"),
                                      ("reverse", "reverse", "rv", "a1"), ("splice", "splice", "a1", "b1")):
            try:
                res = self.bench_op(src, "anatomy", {"dst": dst, "stack": stack, "mode": "steady", "n": n},
                                    FIRST_CONNECT_S * (n + 1))
            except CASE_ERRORS as exc:
                progress(f"anatomy of {stack}: {exc}")
                continue
            out[name] = {step: statistics.median(x[step] for x in res["samples"]) * 1e3
                         for step in ("open", "dial", "request", "build") if all(step in x for x in res["samples"])}
        return out

    def congestion(self, host: str, *, allowed: bool = False) -> str:
        """The TCP congestion control in ``host``'s namespace (or the ones it may choose from)."""
        key = CONGESTION_SYSCTL.replace("congestion_control", "allowed_congestion_control") if allowed \
            else CONGESTION_SYSCTL
        done = self.lab.run(host, ["sysctl", "-n", key], capture_output=True, text=True, check=True)
        return done.stdout.strip()

    def set_congestion(self, name: str) -> None:
        for host in CONGESTION_HOSTS:
            self.lab.run(host, ["sysctl", "-q", "-w", f"{CONGESTION_SYSCTL}={name}"], capture_output=True, check=True)

    def measure_connects(self, cases: Sequence[Case]) -> Dict[str, dict]:
        plan = self.plan
        out = self._fresh(cases)
        for entry in out.values():
            entry.update(open=[], ready=[])
        for round_no in range(plan.connect_rounds):
            n = plan.connects // plan.connect_rounds + (1 if round_no < plan.connects % plan.connect_rounds else 0)
            for case in shuffled(list(cases), round_no):
                entry = out[case.key]
                if entry["error"] or n == 0:
                    continue
                try:
                    res = self.connect_batch(case, n)
                except CASE_ERRORS as exc:
                    self._failed("establishment", case, entry, exc)
                    continue
                entry["open"] += res["open"]
                entry["ready"] += res["ready"]
        return out

    def measure_transfers(self, cases: Sequence[Case], nbytes: int, rounds: int, what: str) -> Dict[str, dict]:
        out = self._fresh(cases)
        for entry in out.values():
            entry["runs"] = []
        for round_no in range(rounds):
            for case in shuffled(list(cases), round_no):
                entry = out[case.key]
                if entry["error"]:
                    continue
                try:
                    entry["runs"].append(self.transfer(case, nbytes))
                except CASE_ERRORS as exc:
                    self._failed(what, case, entry, exc)
        return out


# --- statistics and formatting ---------------------------------------------------------------------------


def ratio_text(x: float) -> str:
    return f"{x:.2f}×" if x < 10 else f"{x:.1f}×"


def mbs(x: float) -> str:
    return f"{x:.2f}" if x < 10 else f"{x:.1f}" if x < 100 else f"{x:.0f}"


def _med(entry: Optional[dict], field: str) -> Optional[float]:
    """Median of an establishment field (seconds) or of the runs' MB/s; None when not measured."""
    if not entry or entry.get("error"):
        return None
    values = [r["mb_per_s"] for r in entry["runs"]] if field == "mb_per_s" else entry.get(field, [])
    return statistics.median(values) if values else None


def _cases(profile: str) -> Dict[str, Case]:
    return {c.key: c for c in TABLES[profile][1]}


def _why_not(entry: Optional[dict]) -> str:
    if entry is None:
        return "not measured in this run"
    return entry.get("error") or "no samples"


def render_connects(results: dict) -> str:
    table_res = results["tables"]["wan10"]
    cases = ESTABLISH
    by_key = _cases("wan10")
    rows = []
    for case in cases:
        entry = table_res.get(case.key)
        open_med, ready_med = _med(entry, "open"), _med(entry, "ready")
        if open_med is None:
            rows.append([case.label, case.path, "0", "–", "–", "–", _why_not(entry)])
            continue
        against = []
        for key in case.against:
            base = table_res.get(key)
            b_open, b_ready = _med(base, "open"), _med(base, "ready")
            if b_open is None:
                against.append(f"{by_key[key].short}: {_why_not(base)}")
                continue
            open_part = ratio_text(open_med / b_open) if by_key[key].how not in FORWARDERS else "–"
            text = f"{by_key[key].short}: {open_part} open, {ratio_text(ready_med / b_ready)} ready"
            against.append(f"**{text}**" if key == case.against[0] and case.mode == "steady" else text)
        open_p90 = percentile(entry["open"], 0.9)
        rows.append([case.label, case.path, str(len(entry["open"])), ms(open_med), ms(open_p90), ms(ready_med),
                     "; ".join(against)])
    return table(["case", "path", "n", "open median", "open p90", "ready median", "against (ratio of medians)"],
                 rows)


def _cpu_text(run: dict) -> str:
    parts = [f"{who} {pct:.0f}" for who, pct in run["cpu"] if pct is not None and not (who == "rendezvous" and pct < 3)]
    return ", ".join(parts) or "–"


def render_transfers(results: dict, profile: str) -> str:
    table_res = results["tables"][profile]
    by_key = _cases(profile)
    rows = []
    for case in TABLES[profile][1]:
        entry = table_res.get(case.key)
        med = _med(entry, "mb_per_s")
        label = case.label + (f" ({case.kind})" if case.how == "grid" and profile == "rate100" else "")
        if med is None:
            rows.append([label, case.path, case.kind, "–", "–", "–", _why_not(entry)])
            continue
        speeds = [r["mb_per_s"] for r in entry["runs"]]
        median_run = sorted(entry["runs"], key=lambda r: r["mb_per_s"])[len(speeds) // 2]
        against = []
        for key in case.against:
            base_med = _med(table_res.get(key), "mb_per_s")
            if base_med is None:
                against.append(f"{by_key[key].short}: {_why_not(table_res.get(key))}")
            else:
                text = f"{by_key[key].short}: {ratio_text(med / base_med)}"
                against.append(f"**{text}**" if key == case.against[0] else text)
        spread = f"{mbs(min(speeds))}–{mbs(max(speeds))}" if len(speeds) > 1 else "–"
        rows.append([case.label, case.path, case.kind, f"**{mbs(med)}**" if case.how == "grid" else mbs(med), spread,
                     _cpu_text(median_run), "; ".join(against)])
    return table(["case", "path", "data", "MB/s (median)", "lowest–highest", "CPU % (median run)",
                  "against (ratio of medians)"], rows)


# --- targets --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Target:
    what: str
    threshold: str
    profile: str
    measured: str = "–"
    ratio: Optional[float] = None
    met: Optional[bool] = None
    note: str = ""


def _speed(results: dict, profile: str, key: str) -> Optional[float]:
    return _med(results["tables"].get(profile, {}).get(key), "mb_per_s")


def _runs(results: dict, profile: str, key: str) -> List[float]:
    entry = results["tables"].get(profile, {}).get(key) or {}
    return [r["mb_per_s"] for r in entry.get("runs", [])]


def _cpu(results: dict, profile: str, key: str, who: str) -> Optional[float]:
    entry = results["tables"].get(profile, {}).get(key) or {}
    runs = entry.get("runs") or []
    if not runs:
        return None
    median_run = sorted(runs, key=lambda r: r["mb_per_s"])[len(runs) // 2]
    return next((pct for w, pct in median_run["cpu"] if w == who), None)


def _fmt_pct(x: Optional[float]) -> str:
    return "?" if x is None else f"{x:.0f}"


def _sender_cpu(results: dict, profile: str, key: str) -> Optional[float]:
    """CPU % of the sending process in the median run of ``key`` (the client's for *up*)."""
    case = _cases(profile).get(key)
    if case is None:
        return None
    return _cpu(results, profile, key, case.src if case.direction == "up" else case.dst)


def _throughput_target(results: dict, what: str, threshold: float, profile: str, key: str, base: str,
                       note_met: str, note_missed: Callable[[float], str], *, at_least: bool = True) -> Target:
    cases = _cases(profile)
    target = Target(what, f"≥ {threshold:g}×", profile)
    mine, theirs = _speed(results, profile, key), _speed(results, profile, base)
    if mine is None or theirs is None:
        missing = key if mine is None else base
        why = _why_not(results["tables"].get(profile, {}).get(missing))
        target.note = f"not measured: {cases[missing].short} {why}"
        return target
    target.ratio = mine / theirs
    target.measured = f"{mbs(mine)} against {mbs(theirs)} MB/s"
    target.met = target.ratio >= threshold if at_least else target.ratio <= threshold
    target.note = note_met if target.met else note_missed(target.ratio)
    return target


def targets(results: dict) -> List[Target]:
    """Issue 4's targets, from this run's medians."""
    out: List[Target] = []
    tables = results["tables"]

    # 1. direct establishment
    t = Target("direct establishment (`tcp`, steady) within 1.25× a plain `connect()`, a1 -> rv", "≤ 1.25×",
               "wan10")
    est = tables.get("wan10", {})
    mine, base, first = _med(est.get("tcp steady"), "open"), _med(est.get("plain a1>rv"), "open"), \
        _med(est.get("tcp first"), "open")
    if mine is None or base is None:
        t.note = "not measured: " + _why_not(est.get("tcp steady") if mine is None else est.get("plain a1>rv"))
    else:
        t.ratio, t.measured = mine / base, f"{ms(mine)} against {ms(base)} ms"
        t.met = t.ratio <= 1.25
        extra = (f" First contact (no meta link yet): {ms(first)} ms, {ratio_text(first / base)}: the meta link "
                 "is opened first (TCP, mutual TLS, Hello/Welcome: three round trips), then the request's."
                 if first is not None else "")
        t.note = (("the assembly request crosses the meta link while the TCP dial runs; what remains is "
                   f"{ms(mine - base)} ms of CPU work in the two node processes." if t.met else
                   f"{ms(mine - base)} ms over a plain connect: the assembly request's round trip and the CPU "
                   "work of the two node processes (codec, routing, handler) are not hidden by the dial.") + extra)
    out.append(t)

    # 2. raw methods against a plain socket
    for key, base, path in (("tcp", "plain a1>rv", "a1 -> rv"), ("reverse", "plain rv>a1", "rv -> a1"),
                            ("splice", "plain a1>b1", "a1 -> b1, both by simultaneous open")):
        def missed(r, key=key, base=base) -> str:
            runs = _runs(results, "none", key)
            base_med = _speed(results, "none", base)
            mine, theirs = _sender_cpu(results, "none", key), _sender_cpu(results, "none", base)
            text = ("the connection is the kernel's TCP socket, as the plain one is: nothing of gridsock is on the "
                    "data path, and the limit is the sending core copying through the veths")
            if runs and max(runs) >= base_med:
                return text + (f"; its best run ({mbs(max(runs))} MB/s) reached the plain median: the gap is the "
                               "shared machine's run-to-run spread.")
            if mine is not None and theirs is not None:
                text += (f"; the gap is larger than this run's spread, the senders at {mine:.0f} % (gridsock) and "
                         f"{theirs:.0f} % (plain) of their core: a sender below 100 % waited, for its receiver "
                         "or for its core")
            return text + "."
        out.append(_throughput_target(
            results, f"raw `{key}` at least 95 % of a plain socket's throughput ({path})", 0.95, "none", key, base,
            "the connection is the kernel's TCP socket: nothing of gridsock is on the data path.", missed))

    # 3. compression at 100 Mbit/s
    def lz4_missed(r: float) -> str:
        ratio = results.get("lz4_ratio_json")
        sender = _cpu(results, "rate100", "lz4 json", "a1")
        return (f"LZ4 compresses this data {ratio:.1f}:1 (one frame of 16 MiB; less in the filter's per-send "
                "frames), so the link times that ratio is the ceiling"
                + (f"; the sender ran at {sender:.0f} % of a core" if sender is not None else "") + ".")
    out.append(_throughput_target(
        results, "`lz4/tcp` goodput at least 3× raw `tcp` on JSON-like data, 100 Mbit/s", 3.0, "rate100", "lz4 json",
        "tcp json", "the link carries compressed bytes: goodput is the link's rate times the compression ratio.",
        lz4_missed))
    out.append(_throughput_target(
        results, "`adoc/tcp` at least 95 % of raw `tcp` on random data, 100 Mbit/s", 0.95, "rate100", "adoc random",
        "tcp random", "on incompressible data adoc sends raw chunks and backs off from trying to compress.",
        lambda r: "each chunk carries a 7-byte header and adoc tries to compress one chunk in 64 at most "
                  "(random data never compresses), so the link carries a little more than raw tcp."))

    # 4. parallel streams
    def parallel_missed(r: float) -> str:
        single, ip1, ip8 = (_speed(results, "lossy", k) for k in ("tcp", "iperf3 P1", "iperf3 P8"))
        small = _speed(results, "lossy", "parallel8 64k")
        chunk, nbytes = results.get("parallel_chunk"), results.get("lossy_bytes")
        text = "each sub-stream is limited by loss as one `tcp` stream is"
        if single:
            text += f" (about {mbs(single)} MB/s)"
        if chunk and nbytes:
            text += (f"; `parallel` stripes {chunk >> 10} KiB chunks over the sub-streams and puts them back in "
                     f"order, and a {nbytes >> 20} MiB transfer is {nbytes // chunk} chunks: it ends with its last "
                     "chunks, held back by whichever sub-stream just lost packets")
        if small:
            text += f"; with 64 KiB chunks: {mbs(small)} MB/s ({ratio_text(small / single) if single else '?'})"
        p1, p8 = _speed(results, "lossy", "plain"), _speed(results, "lossy", "plain P8")
        if p1 and p8:
            text += f"; 8 independent plain sockets reached {ratio_text(p8 / p1)} one"
        elif ip1 and ip8:
            text += f"; iperf3's 8 independent streams reached {ratio_text(ip8 / ip1)} its one stream"
        return text + "."
    out.append(_throughput_target(
        results, "`parallel(streams=8)/tcp` at least 3× one `tcp` stream on the long lossy link", 3.0, "lossy",
        "parallel8", "tcp", "each sub-stream's congestion window recovers from its own losses: 8 loss-limited "
                            "streams carry several times one.", parallel_missed))

    # 5. relay
    for profile, key in (("none", "relay"), ("rate100", "relay random")):
        def relay_missed(r, profile=profile, key=key) -> str:
            rdv = _cpu(results, profile, key, "rendezvous")
            return ("every 64 KiB is a routed message over the bootstrap links a1 -> rendez-vous node -> rv: "
                    "encoded, TLS-encrypted and decoded again at each hop, in Python"
                    + (f"; the rendez-vous process ran at {rdv:.0f} % of a core" if rdv is not None else "") + ".")
        where = "no shaping" if profile == "none" else "100 Mbit/s"
        out.append(_throughput_target(
            results, f"`relay` at least 50 % of direct `tcp` throughput, a1 -> rv, {where}", 0.5, profile, key,
            "tcp" if profile == "none" else "tcp random",
            "the link, not the relay's per-message work, is the limit at this rate.", relay_missed))

    # 6. intermediaries
    def ssh_missed(r: float) -> str:
        cpu = _cpu(results, "none", "ssh", "rv")
        runs, base = _runs(results, "none", "ssh"), _speed(results, "none", "sshtunnel")
        text = ("both are paramiko: the SSH transport's reader thread and, for gridsock, two pump threads per "
                "tunnel copying between the channel and a socketpair, all under one GIL"
                + (f" (rv's node process at {cpu:.0f} % of a core)" if cpu is not None else ""))
        if runs and base and max(runs) >= base:
            return text + "; its best run reached sshtunnel's median: the gap is the spread of this run."
        return text + "."
    out.append(_throughput_target(
        results, "`ssh` method at least as fast as `sshtunnel`, rv -> c1 through fec's sshd", 1.0, "none", "ssh",
        "sshtunnel", "both ride paramiko's transport; gridsock's pump threads keep up with sshtunnel's.", ssh_missed))

    def socks_missed(r: float) -> str:
        runs, base = _runs(results, "none", "socks"), _speed(results, "none", "pysocks")
        within = runs and max(runs) >= base
        return ("after the SOCKS handshake both are the kernel's TCP socket to dante; "
                + ("its best run reached PySocks' median: the gap is the spread of this run." if within else
                   "the gap is larger than the spread: the node process's stream costs more than a blocking "
                   "stdlib socket."))
    out.append(_throughput_target(
        results, "`socks` method at least as fast as PySocks used directly, rv -> c1 through fec's dante", 1.0,
        "none", "socks", "pysocks", "after the SOCKS handshake the connection is the kernel's TCP socket to dante, "
                                    "as PySocks'.", socks_missed))
    return out


def render_targets(results: dict) -> str:
    rows = []
    for t in targets(results):
        verdict = "–" if t.met is None else "**met**" if t.met else "**not met**"
        rows.append([t.what, f"`{t.profile}`", t.threshold, t.measured,
                     "–" if t.ratio is None else ratio_text(t.ratio), verdict, t.note])
    return table(["target", "WAN profile", "wanted", "measured (medians)", "ratio", "verdict", "note"], rows)


# --- the plot ----------------------------------------------------------------------------------------------


def plot(results: dict, path: Path) -> Optional[str]:
    """Draw the four tables into ``path`` (PNG); return None, or why there is no plot."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "no plot: matplotlib is missing (python3 -m pip install matplotlib)"
    colors = {"grid": "#1f77b4", "first": "#ff7f0e", "base": "#9e9e9e"}
    # Long case labels ("gridsock `parallel(streams=8)/tcp`, first contact [a1 -> rv]") sit left
    # of each panel: a wide figure and constrained layout give them room instead of clipping them
    # at the figure's edge or under the panel beside (tight_layout did, in a 15-inch figure).
    fig, axes = plt.subplots(2, 2, figsize=(19, 12.5), layout="constrained")
    fig.get_layout_engine().set(w_pad=0.15, h_pad=0.15, wspace=0.04, hspace=0.06)
    panels = [("wan10", axes[0][0]), ("none", axes[0][1]), ("rate100", axes[1][0]), ("lossy", axes[1][1])]
    for profile, ax in panels:
        title, cases, kind = TABLES[profile]
        table_res = results["tables"].get(profile)
        labels, values, bar_colors, notes = [], [], [], []
        for case in cases:
            entry = (table_res or {}).get(case.key)
            value = _med(entry, "ready") * 1e3 if kind == "connect" and _med(entry, "ready") is not None else \
                _med(entry, "mb_per_s") if kind == "stream" else None
            name = re.sub(r"(socks|ssh)\([^)]*\)", r"\1", case.label.replace("`", "").replace("gridsock ", ""))
            name = name.replace(" (its transport up)", "")
            if case.how == "grid" and profile == "rate100":
                name += f" ({case.kind})"
            labels.append(f"{name} [{case.path.split(' (')[0]}]")
            values.append(value or 0.0)
            notes.append("" if value is not None else "not available" if entry and entry.get("na") else
                         "not measured" if entry is None else "failed")
            bar_colors.append(colors["base"] if case.how != "grid" else
                              colors["first"] if case.mode == "first" else colors["grid"])
        y = list(range(len(labels)))[::-1]
        ax.barh(y, values, color=bar_colors)
        ax.set_yticks(y)
        ax.set_yticklabels(labels, fontsize=8)
        ax.set_ylim(-0.6, len(labels) - 0.4)
        top = max(values) if any(values) else 1.0
        log_scale = profile == "none" and any(values)
        for yy, value, note in zip(y, values, notes):
            text = note or (f"{value:.2f}" if value < 10 else f"{value:.1f}" if value < 100 else f"{value:.0f}")
            x = value * 1.05 if log_scale and not note else value + top * 0.01 if not note else top * 0.01
            ax.text(x, yy, text, va="center", fontsize=7)
        prof = PROFILES[profile]
        ax.set_title(f"{title}\nWAN profile {profile}: {prof.call().replace('`', '')}", fontsize=10)
        ax.set_xlabel("ms until a 1-byte request has come back (median); grey: baselines, orange: first contact"
                      if kind == "connect" else "MB/s (median); grey: baselines", fontsize=9)
        ax.tick_params(axis="x", labelsize=8)
        ax.grid(axis="x", alpha=0.3)
        if log_scale:
            ax.set_xscale("log")
            ax.set_xlim(right=top * 2.5)
        else:
            ax.set_xlim(0, top * 1.15)
    fig.suptitle(f"gridsock methods in the lab ({results['started']})", fontsize=12)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return None


def medians_from_section(text: str) -> dict:
    """The medians the section "Methods in the lab" of a Markdown file records, as plot() reads them.

    A run's raw samples live in a temporary file; the section keeps each case's median (ready
    time of the establishment table, MB/s of the others), enough to draw the plot again. Returns
    ``{"started", "tables": {profile: {key: entry}}}`` with one-sample entries; raises ValueError
    when the section or a table is missing, or a table's rows are not the cases of TABLES.
    """
    start = text.find(SECTION_TITLE + "\n")
    if start < 0:
        raise ValueError(f"no section {SECTION_TITLE!r}")
    section = text[start:]
    following = re.search(r"^## ", section[len(SECTION_TITLE):], re.M)
    if following:
        section = section[:len(SECTION_TITLE) + following.start()]
    date = re.search(r"^- date: (.+?), wall time", section, re.M)
    results: dict = {"started": date.group(1) if date else "?", "tables": {}}
    for profile, (title, cases, kind) in TABLES.items():
        found = re.search(rf"^### {re.escape(title)}\n(.*?)(?=^### |\Z)", section, re.M | re.S)
        if not found:
            raise ValueError(f"no table {title!r} in the section")
        rows = [[cell.strip() for cell in line.strip().strip("|").split("|")]
                for line in found.group(1).splitlines() if line.startswith("| ")]
        header, body = rows[0], rows[1:]
        column = header.index("ready median" if kind == "connect" else "MB/s (median)")
        if len(body) != len(cases):
            raise ValueError(f"{title!r}: {len(body)} rows for {len(cases)} cases")
        entries: Dict[str, dict] = {}
        for case, row in zip(cases, body):
            if row[0] != case.label:
                raise ValueError(f"{title!r}: row {row[0]!r} where the case {case.label!r} was expected")
            cell = row[column].strip("*")
            if cell in ("–", ""):
                entries[case.key] = {"error": "not recorded"}
            elif kind == "connect":
                entries[case.key] = {"ready": [float(cell) / 1e3]}
            else:
                entries[case.key] = {"runs": [{"mb_per_s": float(cell)}]}
        results["tables"][profile] = entries
    return results


# --- the report ------------------------------------------------------------------------------------------------


def versions() -> dict:
    """Versions of the baselines' software (on top of bench_data's machine())."""
    def first_line(argv: List[str]) -> str:
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return "missing"
        return (done.stdout + done.stderr).strip().split("\n")[0].strip()

    out = {"ssh": first_line(["ssh", "-V"])}
    for module, attr in (("paramiko", "__version__"), ("socks", "__version__"), ("sshtunnel", "__version__"),
                         ("matplotlib", "__version__")):
        try:
            out[module] = getattr(__import__(module), attr)
        except ImportError:
            out[module] = "missing"
    danted = shutil.which("danted") or shutil.which("danted", path="/usr/sbin:/sbin")
    out["dante"] = first_line([danted, "-v"]) if danted else "missing"
    return out


def render(results: dict, info: dict, argv: List[str], plan: Plan, quick: bool, plot_ref: Optional[str],
           plot_note: Optional[str]) -> str:
    v = results["versions"]
    measured = [p for p in PROFILE_ORDER if p in results["tables"]]
    head = [
        SECTION_TITLE,
        "",
        "Figures of `bench/bench_methods.py` (its docstring says what and how): each data-connection method next to "
        "its baseline, in one run; a run replaces this section only.",
        "",
        f"- command: `{' '.join(shlex.quote(a) for a in argv)}`" + (" (quick: few samples, small transfers)" if quick
                                                                    else ""),
        f"- date: {results['started']}, wall time {results['wall_s']:.0f} s",
        f"- machine: {info['nproc']} CPUs ({info['cpu']}), Linux {info['kernel']}; shared with other work: "
        f"load average {results['load_before']} before, {results['load_after']} after",
        f"- software: gridsock at `{info['commit']}`{' with uncommitted changes' if info['dirty'] else ''}, "
        f"{info['impl']} {info['python']}, gevent {info['gevent']}, {info['openssl']}; baselines: {info['iperf']}, "
        f"{v['ssh']}, paramiko {v['paramiko']} (gridsock's `ssh` method and sshtunnel), PySocks {v['socks']} "
        f"(gridsock's `socks` method and the baseline), sshtunnel {v['sshtunnel']}, "
        f"{v['dante'].split('  ')[0].rstrip('.')}",
        "- grid: rendez-vous node on rv; nodes `rv`, `a1` (behind gwa's NAT), `b1` (behind fwb's firewall) and "
        "`c1` (no route out; uplink through fec's sshd) run `bench_methods.py node`; TLS session (mutual TLS on "
        "the bootstrap and meta links), every node accepting raw stacks from outside its cluster, so every method "
        "is measured without `tls` above it.",
        ("- processes: each end of a measured path on a core of its own (`taskset`: a1, c1 and fec's plain server "
         "on CPU 0; rv, b1 and fwb's on CPU 1; every client and server beside its node, the forwarders with rv), "
         "as two hosts would be; the rendez-vous node, dante, sshd and the delayers float. (Unpinned, the "
         "scheduler often put both ends of a transfer on one core, which halved a run of either side at random.)"
         if results.get("pinned") else "- processes: not pinned to cores"),
        f"- `parallel`: {'available' if not results['parallel_why'] else results['parallel_why']}",
        f"- TCP congestion control: `{results.get('congestion', '?')}` (the host's default, which the lab's "
        f"namespaces inherit; a namespace may choose only among `{results.get('congestion_allowed', '?')}`), "
        "`reno` in a1 and rv for the `lossy` table",
        "- WAN profiles (`Lab.set_wan` on the lab's public hosts; each table names its own):",
    ]
    for name in PROFILE_ORDER:
        prof = PROFILES[name]
        head.append(f"  - `{name}`: {prof.call()}: {prof.what}" + ("" if name in measured else " (not run)"))
    parts = ["\n".join(head)]
    parts.append("### Targets\n\nIssue 4's targets, from this run's medians.\n\n" + render_targets(results))
    if plot_ref:
        parts.append(f"![Establishment and throughput per method, against their baselines]({plot_ref})")
    elif plot_note:
        parts.append(f"({plot_note})")
    if "wan10" in results["tables"]:
        parts.append(
            "### Establishment delay per method\n\n"
            f"WAN profile `wan10` ({PROFILES['wan10'].call()}: 10 ms one way, 20 ms more round trip across the "
            f"lab's internet). {plan.connects} samples per case, in {plan.connect_rounds} interleaved rounds; times "
            "in ms. *open*: until `open_stream` returns (plain: until `connect()` returns; PySocks: until its "
            "`connect()`, the SOCKS handshake included, returns; `ssh -L` and `sshtunnel`: a `connect()` to their "
            "local port, which says nothing, so they are compared by *ready*); *ready*: until a 1-byte request has "
            "come back over the new connection. *steady*: one warm-up connect first: the meta link is up where the "
            "pair can have one (a1 -> rv: rv accepts inbound; every other pair here has its meta traffic on the "
            "bootstrap channel, as the peer accepts nothing), the `ssh` method's SSH transport is up, as the "
            "forwarders' are. *first contact*: before every sample the meta link is dropped (both ends) and the "
            "client's SSH transports are closed. The plain path of each group is the one a plain socket can take "
            "nearest to the method's: `reverse`'s connection is made by a1 to rv; b1 and c1 accept nothing from "
            "outside, so their gateways (fwb, fec) stand in.\n\n" + render_connects(results))
    found = results.get("ciphers") or {}
    ciphers = ("" if not found else " SSH cipher and MAC each client negotiated with fec's sshd (its defaults, "
               "none forced): " + "; ".join(f"{name} `{found[key]}`" for key, name in
                                            (("ssh", "gridsock `ssh`"), ("sshtunnel", "sshtunnel"),
                                             ("ssh-L", "`ssh -L`")) if key in found) + ".")
    if "none" in results["tables"]:
        parts.append(
            "### Throughput per method\n\n"
            f"WAN profile `none` ({PROFILES['none'].what}). {plan.unshaped_bytes >> 20} MiB one way per run, "
            f"{plan.rounds} interleaved rounds; the client sends (*up*), and each baseline moves its bytes in the "
            "same direction over the same path (or its nearest, as above). gridsock through `open_stream` (the "
            "framework's stream), 256 KiB per send and per receive; plain sockets are the stdlib's, blocking, one "
            "process each side, same sizes; PySocks is that client with `socket.socket = socks.socksocket`; `ssh "
            "-L` and `sshtunnel` forward from rv's loopback to the plain server on c1. MB/s = 10^6 bytes/s of "
            "payload. CPU: each process's CPU time over the transfer, in % of its duration (100 = one core busy): "
            "client, server, and the rendez-vous node when it did work, or the forwarder process; iperf3: its own "
            "figures." + ciphers + "\n\n" + render_transfers(results, "none"))
    if "rate100" in results["tables"]:
        ratio = results.get("lz4_ratio_json")
        parts.append(
            "### Compression and relay at 100 Mbit/s\n\n"
            f"WAN profile `rate100` ({PROFILES['rate100'].call()}: {PROFILES['rate100'].what}). "
            f"{plan.rate_bytes >> 20} MiB one way per run, a1 sends, {plan.shaped_rounds} interleaved round(s). "
            "*random*: incompressible; *json*: JSON-like records (`sample_data(n, \"json\")`"
            + (f", which LZ4 compresses {ratio:.1f}:1 as one frame" if ratio else "")
            + "). MB/s of payload (goodput).\n\n" + render_transfers(results, "rate100"))
    if "lossy" in results["tables"]:
        parts.append(
            "### Parallel streams on a long lossy link\n\n"
            f"WAN profile `lossy` ({PROFILES['lossy'].call()}: {PROFILES['lossy'].what}). Why these values: 50 ms "
            "of round trip is a continental path, and at 1 % loss one TCP stream is limited by loss, not by the "
            "link (Mathis et al.: about MSS / RTT × 1.22 / √p, some 3 Mbit/s here): the case parallel streams are "
            "for; there is no rate limit, so nothing but loss caps the streams. Why `reno`: the host's default, "
            f"`{results.get('congestion', '?')}`, "
            "barely slows for random loss (the rows with `-C bbr`), and cubic, Linux's usual default, is not among "
            "the algorithms a namespace may choose here; reno is loss-based as cubic is, the regime the Mathis "
            "formula describes. "
            f"{plan.lossy_bytes >> 20} MiB one way per run, a1 sends, {plan.shaped_rounds} interleaved round(s). "
            "4 and 8 plain sockets (a thread each, every one sending its share, timed until the last share is in) "
            "show what independent streams reach; iperf3 with 1, 4 and 8 streams beside them (its `-n` ends the "
            "test once its client has written the bytes, before every stream's last bytes are in: on this link "
            "its multi-stream figures run high).\n\n"
            + render_transfers(results, "lossy"))
    parts.append(results.get("reading", ""))
    return "\n\n".join(p for p in parts if p) + "\n"


def reading(results: dict) -> str:
    """What limits the figures, with this run's numbers (medians); a paragraph whose figures are
    missing (a table not run, a case that failed) is left out."""
    tables = results["tables"]

    def est(key: str, field: str = "open") -> Optional[float]:
        value = _med(tables.get("wan10", {}).get(key), field)
        return None if value is None else value * 1e3

    def speed(profile: str, key: str) -> Optional[float]:
        return _speed(results, profile, key)

    def cpu(profile: str, key: str, who: str) -> str:
        value = _cpu(results, profile, key, who)
        return "?" if value is None else f"{value:.0f}"

    def ping(pair: str) -> Optional[float]:
        values = results.get("pings", {}).get(pair)
        return statistics.median(values) if values else None

    def f(x: float) -> str:  # ms already
        return ms(x / 1e3)

    def r(x: float, y: float) -> str:
        return ratio_text(x / y)

    def have(*values) -> bool:
        return all(v is not None for v in values)

    paras = ["### Reading"]
    rtt = 2 * PROFILES["wan10"].wan["delay_ms"]
    tcp, plain, relay, relay_ready, first = (est("tcp steady"), est("plain a1>rv"), est("relay steady"),
                                             est("relay steady", "ready"), est("tcp first"))
    if have(tcp, plain, relay, relay_ready, first):
        paras.append(
            f"**Establishment** (`wan10`: {rtt:g} ms of round trip across the lab's internet). A steady `tcp` "
            f"connect a1 -> rv opens in {f(tcp)} ms, {r(tcp, plain)} a plain `connect()` ({f(plain)} ms): the "
            "assembly request crosses the warm meta link while the TCP dial runs, and what is left is "
            f"{f(tcp - plain)} ms of CPU work in the two node processes. `relay` opens as fast ({f(relay)} ms: the "
            f"request alone), its first byte back after {f(relay_ready)} ms through the bootstrap links. First "
            f"contact costs {f(first)} ms ({r(first, plain)}): the meta link is opened before the request (TCP "
            "connect, mutual TLS, Hello/Welcome: three round trips, and two TLS handshakes' CPU work).")
    rev, split, plain_fwb, p_ra, p_ab = (est("reverse steady"), est("splice steady"), est("plain a1>fwb"),
                                         ping("rv>a1"), ping("a1>b1"))
    sp_steps = results.get("anatomy", {}).get("splice", {})
    if have(rev, split, plain, plain_fwb, p_ra, p_ab, ping("rv>c1")):
        paras.append(
            "Methods towards a peer that accepts nothing need round trips a plain connect does not: their meta "
            "traffic takes the bootstrap channel through the rendez-vous node (round trips rv -> a1 "
            f"{p_ra:.1f} ms, a1 -> b1 {p_ab:.1f} ms, rv -> c1 {ping('rv>c1'):.1f} ms, medians of {PINGS} `ping`s). "
            f"`reverse` opens in {f(rev)} ms, {r(rev, plain)} a1's plain connect to rv: the request reaches a1 "
            "through the rendez-vous node, a1 dials rv, and answers once connected: about two round trips. "
            f"`splice` opens in {f(split)} ms ({r(split, plain_fwb)} a plain connect to fwb): the request and its "
            f"answer cross the internet twice each way ({p_ab:.0f} ms"
            + (f"; the request step took {f(sp_steps['request'])} ms, the simultaneous open after it "
               f"{f(sp_steps['open'] - sp_steps['request'])} ms" if have(sp_steps.get("open"), sp_steps.get("request"))
               else "")
            + "), then both ends connect at once; the "
            "server's first SYN reaches gwa before a1's own SYN has opened the NAT mapping and is refused (RST), "
            "a1's SYN is dropped by fwb, and the connection is made by the server's next attempt "
            "`SPLICE_RETRY_S` (50 ms) later: "
            f"{p_ab:.0f} + 50 + about 1.5 × {rtt:g} ≈ {p_ab + 50 + 1.5 * rtt:.0f} ms. A client that sent a first "
            "SYN before (or with) its request would have its mapping open in time and save the 50 ms and a round "
            "trip. With no meta link between these pairs, first contact and steady are alike.")
    socks, pysocks, ssh, ssh_ready, ssh_l, ssh_t, ssh_first, fec, fec_ready = (
        est("socks steady"), est("pysocks"), est("ssh steady"), est("ssh steady", "ready"), est("ssh-L", "ready"),
        est("sshtunnel", "ready"), est("ssh first"), est("plain rv>fec"), est("plain rv>fec", "ready"))
    steps = results.get("anatomy", {}).get("ssh", {})
    if have(socks, pysocks, ssh, ssh_ready, ssh_l, ssh_t, ssh_first, fec, fec_ready, steps.get("dial"),
            steps.get("request")):
        paras.append(
            f"`socks` ({f(socks)} ms) costs what PySocks costs through the same dante ({f(pysocks)} ms, "
            f"{r(socks, pysocks)}): TCP to the proxy, method negotiation, CONNECT: three round trips, with the "
            f"request in parallel. `ssh` on a warm SSH transport opens in {f(ssh)} ms and has its first byte back "
            f"after {f(ssh_ready)} ms, against {f(ssh_l)} ms through `ssh -L` and {f(ssh_t)} ms through "
            "`sshtunnel` (both with their transports up). Its steps (medians of "
            f"{min(ANATOMY_CONNECTS, results.get('connects', ANATOMY_CONNECTS))}): opening the channel and sending "
            f"the preamble (*dial*) took {f(steps['dial'])} ms, where a channel open, one request and its "
            f"confirmation, needs one round trip ({rtt:g} ms); the request over the bootstrap channel, in "
            f"parallel, {f(steps['request'])} ms. Then the "
            f"1-byte request and its answer took {f(ssh_ready - ssh)} ms more, against {f(fec_ready - fec)} ms for "
            "a plain socket's round trip. "
            + ("The extra time points at Nagle's algorithm: paramiko leaves it on for the SSH transport's socket, "
               "and gridsock does not set `TCP_NODELAY` either, so a small message (a channel open, a short "
               "request) waits for the ACK of what went before it, which the far end may delay. (By hand, not "
               "part of this bench: with `TCP_NODELAY` set on the transport's socket, a channel opened after an "
               "idle moment took one round trip, 22 ms, instead of 42 to 57 ms.) "
               if steps["dial"] > 1.5 * rtt or ssh_ready - ssh > 1.5 * (fec_ready - fec) else "")
            + "First contact "
            f"({f(ssh_first)} ms) makes a new SSH transport each time: TCP, key exchange, host key check, "
            f"public-key authentication, then the channel: {ssh_first / rtt:.0f} round trips' worth, paramiko's "
            "CPU work included.")
    t = {k: speed("none", k) for k in ("tcp", "plain a1>rv", "reverse", "plain rv>a1", "splice", "plain a1>b1",
                                       "relay", "socks", "pysocks", "ssh", "sshtunnel", "ssh-L", "iperf3 a1>rv")}
    tcp_runs = (tables.get("none", {}).get("tcp") or {}).get("runs") or [{"seconds": 0.0}]
    tcp_run_ms = statistics.median(run["seconds"] for run in tcp_runs) * 1e3
    if all(v is not None for v in t.values()):
        paras.append(
            f"**Throughput** (`none`, veths only). `tcp`, `reverse` and `splice` give the application the kernel's "
            f"TCP socket: {t['tcp']:.0f}, {t['reverse']:.0f} and {t['splice']:.0f} MB/s against "
            f"{t['plain a1>rv']:.0f}, "
            f"{t['plain rv>a1']:.0f} and {t['plain a1>b1']:.0f} MB/s for plain sockets on the same paths "
            f"({r(t['tcp'], t['plain a1>rv'])}, {r(t['reverse'], t['plain rv>a1'])}, "
            f"{r(t['splice'], t['plain a1>b1'])}; iperf3 {t['iperf3 a1>rv']:.0f}). Nothing of gridsock is on their "
            "data path; what limits them is the kernel's copying through the veths (system time), on cores "
            "the machine's other work shares (the senders got "
            f"{_fmt_pct(_sender_cpu(results, 'none', 'tcp'))} % of theirs for `tcp`, "
            f"{_fmt_pct(_sender_cpu(results, 'none', 'plain a1>rv'))} % for the plain socket); a `tcp` run lasts "
            f"about {tcp_run_ms:.0f} ms, so single runs scatter (lowest–highest). "
            f"`relay` carries {t['relay']:.0f} MB/s, {r(t['relay'], t['tcp'])} direct: every 64 KiB is a routed "
            "message over two bootstrap links (a1 -> rendez-vous node -> rv), encoded, TLS-encrypted and decoded "
            f"at each hop, in Python (the rendez-vous process at {cpu('none', 'relay', 'rendezvous')} % of a core). "
            f"`socks` ({t['socks']:.0f} MB/s) runs at {r(t['socks'], t['pysocks'])} PySocks "
            f"({t['pysocks']:.0f}): after the handshake both are a kernel socket to dante, which copies between "
            f"its two sockets. `ssh` ({t['ssh']:.0f} MB/s) runs at {r(t['ssh'], t['sshtunnel'])} `sshtunnel` "
            f"({t['sshtunnel']:.0f}) and {r(t['ssh'], t['ssh-L'])} `ssh -L` ({t['ssh-L']:.0f}): gridsock and "
            "sshtunnel both move the bytes through paramiko in Python threads (cipher, MAC and packets of at "
            "most 32 KiB, under one GIL), OpenSSH in C; CPU in the median run: rv's node process "
            f"{cpu('none', 'ssh', 'rv')} %, the sshtunnel process {cpu('none', 'sshtunnel', 'sshtunnel')} %, the ssh "
            f"process {cpu('none', 'ssh-L', 'ssh-L')} % (sshd's share, on fec, is not counted).")
    c = {k: speed("rate100", k) for k in ("tcp random", "tcp json", "plain", "iperf3", "lz4 json", "lz4 random",
                                          "adoc json", "adoc random", "relay random")}
    if all(v is not None for v in c.values()):
        paras.append(
            f"**At 100 Mbit/s** (`rate100`) raw `tcp` carries {c['tcp random']:.1f} MB/s (the link's 12.5 MB/s "
            f"less the headers), as a plain socket ({c['plain']:.1f}) and iperf3 ({c['iperf3']:.1f}) do. `lz4/tcp` "
            f"delivers {c['lz4 json']:.1f} MB/s of JSON-like payload, {r(c['lz4 json'], c['tcp json'])} raw: the "
            "link carries compressed bytes, so the goodput is the link's rate times the ratio LZ4 reaches on the "
            f"filter's per-send frames (at most {results.get('lz4_ratio_json', 0):.1f}:1, the ratio of one 16 MiB "
            f"frame); the sender's CPU ({cpu('rate100', 'lz4 json', 'a1')} % of a core) is not the limit. On random "
            f"data it costs nothing visible: {c['lz4 random']:.1f} MB/s ({r(c['lz4 random'], c['tcp random'])}). "
            f"`adoc/tcp` delivers {c['adoc json']:.1f} MB/s on JSON-like data ({r(c['adoc json'], c['tcp json'])}: "
            "it chooses a level from the pace the link drains at) and "
            f"{c['adoc random']:.1f} on random data ({r(c['adoc random'], c['tcp random'])}: incompressible chunks go "
            f"raw and the compression attempts back off). `relay` reaches {c['relay random']:.1f} MB/s, "
            f"{r(c['relay random'], c['tcp random'])} direct: at this rate the link is the limit, not the relay's "
            "per-message work.")
    lo = {k: speed("lossy", k) for k in ("tcp", "plain", "plain P4", "plain P8", "iperf3 P1", "iperf3 P4",
                                         "iperf3 P8", "iperf3 bbr P1", "iperf3 bbr P8")}
    if all(v is not None for v in lo.values()):
        p4, p8 = speed("lossy", "parallel4"), speed("lossy", "parallel8")
        head = (f"**On the long lossy link** (`lossy`, reno) one `tcp` stream carries {lo['tcp']:.2f} MB/s (a plain "
                f"socket {lo['plain']:.2f}, iperf3 {lo['iperf3 P1']:.2f}; the Mathis formula gives about 0.35 MB/s "
                f"for 1 % loss and 50 ms, and a run of {results.get('lossy_bytes', 0) >> 20} MiB also counts its "
                "slow start and its last losses, so single runs scatter). ")
        if have(p4, p8):
            head += (f"`parallel(streams=4)/tcp` carries {p4:.2f} MB/s ({r(p4, lo['tcp'])}) and "
                     f"`parallel(streams=8)/tcp` {p8:.2f} ({r(p8, lo['tcp'])})")
            small = speed("lossy", "parallel8 64k")
            head += (f", {small:.2f} ({r(small, lo['tcp'])}) with 64 KiB chunks instead of the default "
                     f"{(results.get('parallel_chunk') or 0) >> 10} KiB; " if small is not None else "; ")
        else:
            head += "`parallel` was not available in this run; "
        head += (f"4 and 8 plain sockets, each carrying its share in a thread of its own and timed until the "
                 f"last share is in, reach {lo['plain P4']:.2f} ({r(lo['plain P4'], lo['plain'])}) and "
                 f"{lo['plain P8']:.2f} MB/s ({r(lo['plain P8'], lo['plain'])} one plain socket): what independent "
                 "streams gain here, without striping and reassembly"
                 + (f" (`parallel` reaches {r(p4, lo['plain P4'])} and {r(p8, lo['plain P8'])} of them)"
                    if have(p4, p8) else "")
                 + "; iperf3's 4 and 8 streams report "
                 f"{lo['iperf3 P4']:.2f} and {lo['iperf3 P8']:.2f} MB/s (`-n` counts the bytes its client has "
                 "written, and the end of its test does not wait for every stream's last byte). "
                 f"With `bbr` (`-C bbr`), one stream carries "
                 f"{lo['iperf3 bbr P1']:.2f} MB/s ({r(lo['iperf3 bbr P1'], lo['iperf3 P1'])} reno's) and 8 streams "
                 f"{lo['iperf3 bbr P8']:.2f}")
        if lo["iperf3 bbr P1"] > 2 * lo["iperf3 P1"]:
            head += (": bbr models the path's rate and round trip and slows little for random loss, so parallel "
                     "streams pay off under loss-based congestion control (reno, and cubic, Linux's usual "
                     "default) much more than under bbr, this host's default.")
        else:
            head += "."
        paras.append(head)
    return "\n\n".join(paras) if len(paras) > 1 else ""


# --- main ------------------------------------------------------------------------------------------------------


# --- round trips per method (``--round-trips``) ---------------------------------------------------------
#
# Issue 11's round-trip budget: only the establishment cases its targets name, in two WAN profiles
# (10 and 20 ms one way), each next to its plain baseline in the same run; the steps of each
# method's steady connects (anatomy); the uncached automatic selection between every ordered pair
# of the lab nodes; and, with ``--before RAW.json`` (a run of the same mode on the code before),
# the figures before and after side by side. Its own section of ``--out``: RT_SECTION_TITLE.

RT_SECTION_TITLE = "## Round trips per method"
RT_PROFILES = {
    "wan10": PROFILES["wan10"],
    "wan20": Profile("wan20", {"delay_ms": 20.0},
                     "20 ms one way on every public host's ingress: a path across the lab's internet gains 40 ms "
                     "of round trip; no loss, no rate limit"),
}
RT_AUTO_CONNECTS = 10  # uncached automatic connects per ordered pair (and as many steady ones)


def _rt_case(key: str, stack: str, src: str, dst: str, path: str, against: Tuple[str, ...], mode: str,
             what: str) -> Case:
    return dataclasses.replace(_grid(key, stack, src, dst, path, against, mode=mode),
                               label=f"gridsock `{stack}`, {what}")


RT_CASES = [
    ESTABLISH[0],  # plain a1>rv
    _rt_case("tcp steady", "tcp", "a1", "rv", P_A1_RV, ("plain a1>rv",), "steady", "steady"),
    _rt_case("tcp first", "tcp", "a1", "rv", P_A1_RV, ("plain a1>rv",), "first", "first contact"),
    _rt_case("tls/tcp steady", "tls/tcp", "a1", "rv", P_A1_RV, ("tcp steady", "plain a1>rv"), "steady", "steady"),
    _rt_case("reverse steady", "reverse", "rv", "a1", P_RV_A1, ("plain a1>rv",), "steady", "steady"),
    _rt_case("tls/reverse steady", "tls/reverse", "rv", "a1", P_RV_A1, ("reverse steady", "plain a1>rv"), "steady",
             "steady"),
    next(c for c in ESTABLISH if c.key == "plain a1>fwb"),
    _rt_case("splice steady", "splice", "a1", "b1", P_A1_B1, ("plain a1>fwb",), "steady", "steady"),
    _rt_case("tls/splice steady", "tls/splice", "a1", "b1", P_A1_B1, ("splice steady", "plain a1>fwb"), "steady",
             "steady"),
    next(c for c in ESTABLISH if c.key == "plain rv>fec"),
    next(c for c in ESTABLISH if c.key == "ssh-L"),
    _rt_case("ssh steady", SSH_STACK, "rv", "c1", P_RV_C1, ("plain rv>fec", "ssh-L"), "steady", "steady"),
    _rt_case("ssh kept", SSH_STACK, "rv", "c1", P_RV_C1, ("ssh steady", "ssh-L"), "kept",
             "first contact, SSH transport as the node keeps it"),
    _rt_case("ssh cold", SSH_STACK, "rv", "c1", P_RV_C1, ("ssh steady", "ssh-L"), "first",
             "first contact, no SSH transport (closed before each)"),
]
# (the steady case a tls case adds to, and the plain connect that is one round trip on that path)
RT_TLS = {"tls/tcp steady": ("tcp steady", "plain a1>rv"), "tls/reverse steady": ("reverse steady", "plain a1>rv"),
          "tls/splice steady": ("splice steady", "plain a1>fwb")}


class RoundTripBench(MethodsBench):
    """The establishment cases of issue 11's targets, and the automatic selection between pairs."""

    def connect_batch(self, case: Case, n: int) -> dict:
        if case.how == "grid" and case.mode in ("first", "kept"):
            if case.mode == "kept":  # one connect first: the node has used the gateway, its transport is kept
                self.bench_op(case.src, "connects", {"dst": case.dst, "stack": case.stack, "n": 1, "mode": "steady"},
                              FIRST_CONNECT_S * 2)
            res = self.bench_op(case.src, "first", {"dst": case.dst, "stack": case.stack, "n": n,
                                                    "keep_transports": case.mode == "kept"},
                                FIRST_CONNECT_S * (n + 1))
            if res["stacks"] != [norm_stack(case.stack)]:
                raise BenchError(f"asked for {case.stack}, got {res['stacks']}")
            return res
        return super().connect_batch(case, n)

    def rt_anatomy(self) -> Dict[str, dict]:
        """The steps of steady connects of each method (dial, request, build), ms, medians."""
        out = {}
        n = min(ANATOMY_CONNECTS, self.plan.connects)
        for key, stack, src, dst in (("tcp", "tcp", "a1", "rv"), ("tls/tcp", "tls/tcp", "a1", "rv"),
                                     ("reverse", "reverse", "rv", "a1"), ("splice", "splice", "a1", "b1"),
                                     ("ssh", SSH_STACK, "rv", "c1")):
            try:
                res = self.bench_op(src, "anatomy", {"dst": dst, "stack": stack, "mode": "steady", "n": n},
                                    FIRST_CONNECT_S * (n + 1))
            except CASE_ERRORS as exc:
                progress(f"anatomy of {stack}: {exc}")
                continue
            out[key] = {step: statistics.median(x[step] for x in res["samples"]) * 1e3
                        for step in ("open", "dial", "request", "build") if all(step in x for x in res["samples"])}
        return out

    def auto_pairs(self, n: int) -> Dict[str, dict]:
        """Every ordered pair of NODES: ``n`` uncached automatic connects, then ``n`` steady ones over
        the stack picked most often (its winner cached, the meta link up)."""
        out: Dict[str, dict] = {}
        for src, dst in itertools.permutations(NODES, 2):
            entry: dict = {"error": None}
            out[f"{src}>{dst}"] = entry
            try:
                res = self.bench_op(src, "auto", {"dst": dst, "n": n}, FIRST_CONNECT_S * (n + 1))
                entry.update(open=res["open"], ready=res["ready"], stacks=res["stacks"])
                picked = max(set(res["stacks"]), key=res["stacks"].count)
                steady = self.bench_op(src, "connects", {"dst": dst, "stack": picked, "n": n, "mode": "steady"},
                                       FIRST_CONNECT_S * (n + 1))
                entry.update(picked=picked, steady_open=steady["open"], steady_ready=steady["ready"])
            except CASE_ERRORS as exc:
                entry["error"] = f"failed: {type(exc).__name__}: {exc}"[:400]
                progress(f"auto {src} -> {dst}: {entry['error']}")
        return out


def _rt_med(entry: Optional[dict], field: str = "open") -> Optional[float]:
    if not entry or entry.get("error") or not entry.get(field):
        return None
    return statistics.median(entry[field]) * 1e3


def rt_targets(table: Dict[str, dict], anatomy: Dict[str, dict]) -> List[Tuple[str, str, str, str, Optional[bool], str]]:
    """(target, wanted, measured, ratio or excess, met, note) for one profile's table."""
    rows: List[Tuple[str, str, str, str, Optional[bool], str]] = []

    def ratio(what: str, key: str, base: str, limit: float, field: str = "open", note: str = "") -> None:
        a, b = _rt_med(table.get(key), field), _rt_med(table.get(base), field)
        if a is None or b is None:
            rows.append((what, f"≤ {limit:g}×", "–", "–", None, note or "not measured"))
            return
        rows.append((what, f"≤ {limit:g}×", f"{a:.1f} against {b:.1f} ms", f"{a / b:.2f}×", a / b <= limit, note))

    ratio("steady `tcp` against a plain `connect()`, a1 -> rv", "tcp steady", "plain a1>rv", 1.10,
          note="one round trip on the wire (the request on the meta link beside the dial; a named stack's "
               "connection nominated in its first packet); the rest is CPU work in the two node processes: the "
               "request, the answer, each a system call through the lab's namespaces")
    ratio("`tcp` first contact against a plain `connect()`, a1 -> rv", "tcp first", "plain a1>rv", 2.0,
          note="the request over the bootstrap channel at once, the meta link opened beside it")
    ratio("`reverse` against a plain `connect()` on the nearest path (a1 -> rv)", "reverse steady", "plain a1>rv", 1.6,
          note="the request's way to a1 (R/2) + a1's SYN carrying its preamble (TCP Fast Open, R/2) = R; the client "
               "completes on that connection, not on the answer (without Fast Open on rv's host: 2 R)")
    ratio("`splice` against a plain `connect()` on the nearest path (a1 -> fwb)", "splice steady", "plain a1>fwb", 2.5,
          note="floor: b1's answer, back through the rendez-vous node (two WAN hops each way: 2 R); a1's SYN, "
               "sent 3/4 of the request's measured way after it, reaches fwb after b1's SYN left: connected at "
               "about 1.75 R, before the answer (with no estimate yet: 2.5 R); first attempt on both sides")
    for key, (under, plain) in RT_TLS.items():
        a, b, rtt = _rt_med(table.get(key)), _rt_med(table.get(under)), _rt_med(table.get(plain))
        what = f"`tls/` on top of `{key.split()[0][4:]}`: at most one round trip more"
        if a is None or b is None or rtt is None:
            rows.append((what, "≤ 1 round trip", "–", "–", None, "not measured"))
            continue
        rows.append((what, "≤ 1 round trip", f"{a:.1f} against {b:.1f} ms (+{a - b:.1f}; a round trip: {rtt:.1f})",
                     f"{(a - b) / rtt:.2f} round trips", a - b <= rtt,
                     "one round trip on the wire (counted: tests/test_round_trips.py); the excess is the handshake's "
                     "CPU work at both ends (resumed between nodes that have met: a key exchange, no certificate "
                     "work) and the waits of two busy processes for a core"))
    ratio("`ssh` (transport up) no slower than `ssh -L` to first byte, rv -> c1", "ssh steady", "ssh-L", 1.0,
          field="ready", note="channel open and assembly request together (one round trip: back-to-back "
                              "channels alternate over two kept transports, none waits behind sshd's Nagle), then "
                              "the request; `ssh -L` waits 2 round trips for its channel in back-to-back use "
                              "(docs/ssh.md), 1 in its fast mode")
    ratio("`ssh` first contact at most 2× its steady time (the node keeps its gateway's transport)", "ssh kept",
          "ssh steady", 2.0, note="a used gateway's transport is kept (keepalives, dialed again if it dies)")
    ratio("`ssh` first contact at most 2× its steady time (no transport yet: a new SSH session)", "ssh cold",
          "ssh steady", 2.0, note="a new SSH session: TCP, version and key exchange, service request, public-key "
                                  "authentication, then the channel: some 6 round trips, and paramiko's CPU work")
    return rows


def render_round_trips(results: dict, info: dict, argv: List[str], before: Optional[dict]) -> str:
    v = results["versions"]
    lines = [
        RT_SECTION_TITLE,
        "",
        "Figures of `bench/bench_methods.py --round-trips` (issue 11's round-trip budget per method; the module "
        "docstring and `RoundTripBench` say what and how); a run replaces this section only.",
        "",
        f"- command: `{' '.join(shlex.quote(a) for a in argv)}`"
        + (f", rendered here by `{' '.join(shlex.quote(a) for a in results['rendered'])}`"
           if results.get("rendered") else ""),
        f"- date: {results['started']}, wall time {results['wall_s']:.0f} s",
        f"- machine: {info['nproc']} CPUs ({info['cpu']}), Linux {info['kernel']}; shared with other work: "
        f"load average {results['load_before']} before, {results['load_after']} after",
        f"- software: gridsock at `{info['commit']}`{' with uncommitted changes' if info['dirty'] else ''}, "
        f"{info['impl']} {info['python']}, gevent {info['gevent']}, {info['openssl']}; {v['ssh']}, paramiko "
        f"{v['paramiko']}",
        "- grid: as in \"Methods in the lab\" (rendez-vous node on rv; nodes rv, a1, b1, c1; TLS session; every "
        "node accepting raw stacks from outside its cluster); each end of a path on a core of its own"
        + ("" if results.get("pinned") else " (not pinned in this run)") + ".",
        f"- {results['connects']} samples per case, in interleaved rounds; *open*: until `open_stream` returns "
        "(plain: `connect()`); *ready*: until a 1-byte request has come back. *first contact*: before each sample "
        "the meta link between the pair is dropped (both ends); `ssh` first contact twice: with the SSH transport "
        "as the node keeps it (a keeper holds a used gateway's transport up), and with no transport at all (closed "
        "before each sample: a new SSH session).",
    ]
    if before:
        lines.append(f"- *before*: the same run (`{' '.join(before['argv'][2:])}`) with `PYTHONPATH` at a checkout of "
                     f"gridsock `{before['info']['commit']}`{before['info'].get('note', '')} (the code compared "
                     f"with), {before['results']['started']}, load average "
                     f"{before['results']['load_before']}.")
    for name, profile in RT_PROFILES.items():
        table_ = results["tables"].get(name)
        if not table_:
            continue
        old = (before or {}).get("results", {}).get("tables", {}).get(name, {})
        lines += ["", f"### {profile.name}: {profile.what}", ""]
        header = ["case", "path", "n", "open median", "open p90", "ready median", "against (ratio of open medians)"]
        if before:
            header[3:3] = ["before: open median"]
        rows = []
        for case in RT_CASES:
            if case.key not in table_:
                continue
            entry = table_[case.key]
            if entry.get("error"):
                row = [case.label, case.path, "0", entry["error"], "", "", ""]
            else:
                o = [x * 1e3 for x in entry["open"]]
                r = [x * 1e3 for x in entry["ready"]]
                against = []
                for key in case.against:
                    base = _rt_med(table_.get(key))
                    if base:
                        short = next(c.short for c in RT_CASES if c.key == key)
                        against.append(f"{short}: {statistics.median(o) / base:.2f}×")
                row = [case.label, case.path, str(len(o)), f"{statistics.median(o):.1f}", f"{percentile(o, 0.9):.1f}",
                       f"{statistics.median(r):.1f}", "; ".join(against)]
            if before:
                was = _rt_med(old.get(case.key))
                row[3:3] = [f"{was:.1f}" if was is not None else "–"]
            rows.append(row)
        lines.append(table(header, rows))
        anatomy = results.get("anatomy", {}).get(name, {})
        if anatomy:
            lines += ["", "Where a steady connect's time goes (ms, medians of "
                      f"{min(ANATOMY_CONNECTS, results['connects'])}): *dial* the method's own connection (for "
                      "`tcp` and `ssh` in parallel with *request*, the assembly request and its answer), *build* "
                      "the filters.", ""]
            lines.append(table(["method", "open", "dial", "request", "build"],
                               [[k, *(f"{a[s]:.1f}" if s in a else "–" for s in ("open", "dial", "request", "build"))]
                                for k, a in anatomy.items()]))
        lines += ["", f"Targets ({profile.name}):", ""]
        trows = rt_targets(table_, anatomy)
        old_rows = {t[0]: t for t in rt_targets(old, {})} if before else {}
        header = ["target", "wanted", "measured (medians)", "ratio", "verdict", "note"]
        if before:
            header[4:4] = ["before"]
        out_rows = []
        for what, wanted, measured, ratio_, met, note in trows:
            row = [what, wanted, measured, ratio_, "–" if met is None else ("**met**" if met else "**not met**"), note]
            if before:
                b = old_rows.get(what)
                row[4:4] = [b[3] if b else "–"]
            out_rows.append(row)
        lines.append(table(header, out_rows))
    auto = results.get("auto")
    if auto:
        lines += ["", f"### Automatic selection, uncached ({results.get('auto_profile', 'wan10')})", "",
                  f"Every ordered pair of the lab nodes: {RT_AUTO_CONNECTS} connects with no stack named (the rules' "
                  "candidates raced) after forgetting the winner cached for the peer, then as many steady ones over "
                  "the stack picked (cached, meta link up). *ready*: time to the first byte back (ms, medians). "
                  "Target: the slowest pair under one round trip plus 100 ms over its steady time.", ""]
        rows = []
        rtt = _rt_med(results["tables"].get(results.get("auto_profile", "wan10"), {}).get("plain a1>rv")) or 0.0
        worst = None
        for pair, e in auto.items():
            if e.get("error"):
                rows.append([pair.replace(">", " -> "), "–", "–", "–", "–", e["error"]])
                continue
            picked = sorted(set(e["stacks"]), key=e["stacks"].count, reverse=True)
            u, st = _rt_med(e, "ready"), _rt_med(e, "steady_ready")
            assert u is not None and st is not None
            extra = u - st
            if worst is None or extra > worst[1]:
                worst = (pair, extra)
            rows.append([pair.replace(">", " -> "), ", ".join(f"`{s}` ({e['stacks'].count(s)})" for s in picked),
                         f"{u:.1f}", f"{st:.1f}", f"{extra:+.1f}", ""])
        lines.append(table(["pair", "picked (times)", "uncached ready", "steady ready", "uncached − steady", "note"],
                           rows))
        if worst is not None:
            met = worst[1] <= rtt + 100
            lines += ["", f"Slowest pair: {worst[0].replace('>', ' -> ')}, {worst[1]:+.1f} ms over its steady time, "
                      f"against one round trip ({rtt:.1f} ms) + 100 ms: **{'met' if met else 'not met'}**."]
    if results.get("reading"):
        lines += ["", results["reading"]]
    return "\n".join(lines) + "\n"


def rt_reading(results: dict, before: Optional[dict]) -> str:
    """What the round-trip figures say (medians of ``open`` unless said), for both profiles."""
    old_tables = (before or {}).get("results", {}).get("tables", {})
    parts = ["### Reading", ""]
    for name in RT_PROFILES:
        t = results["tables"].get(name)
        if not t:
            continue
        o = old_tables.get(name, {})

        def m(key: str, field: str = "open", table_: Optional[dict] = None) -> str:
            value = _rt_med((table_ if table_ is not None else t).get(key), field)
            return "–" if value is None else f"{value:.1f}"

        rtt = m("plain a1>rv")
        was = (lambda key, field="open": f" (before: {m(key, field, o)})") if o else (lambda key, field="open": "")
        parts.append(
            f"**{name}** (a plain connect a1 -> rv: {rtt} ms). `tcp` first contact opens in {m('tcp first')} ms"
            f"{was('tcp first')}: the request takes the bootstrap channel at once (a1 -> rendez-vous node -> rv, "
            f"one round trip) while the TCP dial runs and the meta link opens beside them; steady, over the link, "
            f"{m('tcp steady')} ms{was('tcp steady')}. `splice` a1 -> b1 opens in {m('splice steady')} ms"
            f"{was('splice steady')}: the answer's two round trips through the rendez-vous node; a1's single SYN "
            f"leaves 3/4 of the request's measured way to b1 after the request, reaches fwb just after b1's own SYN "
            f"left it and is let in (simultaneous open both ways), so the connection is there at about 1.75 round "
            f"trips, before the answer (a SYN sent with the request was dropped by fwb, and the connection waited "
            f"for b1's SYN, a1's SYN-ACK and b1's ACK: 2.5). `reverse` opens in {m('reverse steady')} ms{was('reverse steady')}: the "
            f"request's way to a1 (half a round trip), then a1's SYN, which carries its preamble (TCP Fast Open: the "
            f"lab's hosts set `net.ipv4.tcp_fastopen`), half a round trip: one round trip, as the client completes "
            f"on that connection (the token in it is a1's acceptance) and not on a1's answer, which comes a round "
            f"trip later (without Fast Open the preamble waits for the handshake: 2 round trips). "
            f"`tls/` adds {m('tls/tcp steady')} − {m('tcp steady')} ms over `tcp`, {m('tls/reverse steady')} − "
            f"{m('reverse steady')} over `reverse`, {m('tls/splice steady')} − {m('splice steady')} over `splice`: "
            f"one round trip on the wire (the client no longer waits for the session ticket; "
            f"`tests/test_round_trips.py` counts the turns) plus the handshake's CPU work at both ends (resumed with "
            f"the server's ticket between nodes that have met: no certificate work). `ssh` "
            f"steady: open {m('ssh steady')} ms{was('ssh steady')}, first byte back {m('ssh steady', 'ready')} "
            f"against {m('ssh-L', 'ready')} through `ssh -L`{was('ssh steady', 'ready')}; its first contact with "
            f"the transport the node keeps opens in {m('ssh kept')} ms, and with no transport at all (a new SSH "
            f"session: TCP, key exchange, host key, public-key authentication, then the channel) in "
            f"{m('ssh cold')} ms{was('ssh cold')}.")
        parts.append("")
    return "\n".join(parts).rstrip() + "\n"


def run_round_trips(args, argv: List[str]) -> int:
    """``--round-trips``: see RT_SECTION_TITLE's comment."""
    from gridsock.testing.lab import Lab

    plan = dataclasses.replace(FULL, connects=args.connects or FULL.connects,
                               connect_rounds=min(FULL.connect_rounds, args.connects or FULL.connects))
    if args.quick:
        plan = QUICK
    only = [p.strip() for p in (args.rt_profiles or ",".join(RT_PROFILES)).split(",") if p.strip()]
    info = machine()
    results: dict = {"started": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                     "load_before": loadavg(), "tables": {}, "anatomy": {}, "versions": versions(),
                     "connects": plan.connects, "parallel_why": None}
    wall = time.perf_counter()
    workdir = Path(tempfile.mkdtemp(prefix="gridsock-bench-rt-"))
    lab = Lab(args.prefix)
    grid = LabGrid(lab, workdir)
    pin = not args.no_pin and len(os.sched_getaffinity(0)) >= 2 and shutil.which("taskset") is not None
    results["pinned"] = pin
    bench = RoundTripBench(lab, grid, plan, workdir, None, pin=pin)
    signal.signal(signal.SIGTERM, _terminated)
    wan_set = False
    try:
        progress(f"lab {args.prefix} up")
        lab.up()
        bench.start_grid()
        bench.make_tls_files()
        bench.start_baselines()
        for name in only:
            profile = RT_PROFILES[name]
            progress(f"WAN profile {name}: {profile.call()}")
            wan_set = True
            lab.set_wan(**profile.wan)
            cases = [c for c in RT_CASES if not args.rt_cases or c.key in args.rt_cases.split(",")]
            results["tables"][name] = bench.measure_connects(cases)
            if not args.rt_cases:
                results["anatomy"][name] = bench.rt_anatomy()
            if name == only[0] and not args.no_auto:
                progress("automatic selection between every ordered pair")
                results["auto_profile"] = name
                results["auto"] = bench.auto_pairs(RT_AUTO_CONNECTS if not args.quick else 2)
    except Exception:
        print(grid.logs_tail(), file=sys.stderr)
        raise
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        progress("tearing down")
        try:
            grid.stop()
            if wan_set:
                try:
                    lab.set_wan()
                except Exception as exc:
                    progress(f"removing the WAN profile failed: {exc}")
            lab.down()
        finally:
            if args.logs:
                Path(args.logs).mkdir(parents=True, exist_ok=True)
                for log_file in workdir.glob("*.log"):
                    shutil.copy(log_file, args.logs)
            shutil.rmtree(workdir, ignore_errors=True)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
    results["load_after"] = loadavg()
    results["wall_s"] = time.perf_counter() - wall
    command = ["python3", "bench/bench_methods.py", *argv]
    raw = Path(tempfile.gettempdir()) / f"bench_round_trips-{os.getpid()}.json"
    raw.write_text(json.dumps({"results": results, "info": info, "argv": command}))
    progress(f"raw results in {raw}")
    if args.no_write:
        return 0
    before = json.loads(Path(args.before).read_text()) if args.before else None
    results["reading"] = rt_reading(results, before)
    text = render_round_trips(results, info, command, before)
    replace_section(Path(args.out), RT_SECTION_TITLE, text)
    print(text)
    return 0


def run_bench(argv: List[str]) -> int:
    from gridsock.testing.lab import Lab, missing_tools

    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="5 connects per case, small transfers, one round")
    parser.add_argument("--out", default="docs/benchmarks.md", help="Markdown file whose section to replace")
    parser.add_argument("--plot", metavar="PNG", help=f"where the plot goes (default: {PLOT_NAME} beside --out)")
    parser.add_argument("--prefix", default=f"gsm{os.getpid() % 10000}-", help="lab prefix (default: %(default)s)")
    parser.add_argument("--logs", metavar="DIR", help="copy the processes' logs into DIR before cleaning up")
    parser.add_argument("--render-only", metavar="JSON", help="render the raw results a run saved; measure nothing")
    parser.add_argument("--replot", action="store_true",
                        help="draw the plot again from the medians in --out's section; measure and write nothing else")
    parser.add_argument("--connects", type=int, metavar="N", help="connects per establishment case")
    parser.add_argument("--no-pin", action="store_true", help="do not pin each end of a path to a core of its own")
    parser.add_argument("--only", metavar="PROFILES", default=",".join(PROFILE_ORDER),
                        help="comma-separated WAN profiles whose tables to measure (default: %(default)s)")
    parser.add_argument("--round-trips", action="store_true",
                        help="issue 11's round-trip budget: the establishment cases its targets name, at 10 and 20 ms "
                             f"one way, and the automatic selection between pairs; section {RT_SECTION_TITLE[3:]!r}")
    parser.add_argument("--rt-profiles", metavar="PROFILES", help="with --round-trips: wan10,wan20 (default: both)")
    parser.add_argument("--rt-cases", metavar="KEYS", help="with --round-trips: only these cases (comma-separated "
                                                           "keys, e.g. 'ssh steady,ssh-L'); no anatomy")
    parser.add_argument("--before", metavar="JSON", help="with --round-trips: a raw file of a run on the code before")
    parser.add_argument("--no-auto", action="store_true", help="with --round-trips: skip the automatic selection")
    parser.add_argument("--no-write", action="store_true", help="with --round-trips: keep the raw file only")
    args = parser.parse_args(argv)
    if args.round_trips and args.render_only:  # a run's raw file, with --before's beside it
        saved = json.loads(Path(args.render_only).read_text())
        before = json.loads(Path(args.before).read_text()) if args.before else None
        saved["results"]["reading"] = rt_reading(saved["results"], before)
        saved["results"]["rendered"] = ["python3", "bench/bench_methods.py", *argv]
        text = render_round_trips(saved["results"], saved["info"], saved["argv"], before)
        replace_section(Path(args.out), RT_SECTION_TITLE, text)
        print(text)
        return 0
    if args.round_trips:
        if os.geteuid() != 0:
            parser.error("the grid lab needs root")
        logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
        return run_round_trips(args, argv)
    out_path = Path(args.out)
    plot_path = Path(args.plot) if args.plot else out_path.parent / PLOT_NAME
    plot_ref = os.path.relpath(plot_path, out_path.parent)
    only = [p.strip() for p in args.only.split(",") if p.strip()]
    unknown = [p for p in only if p not in PROFILES]
    if unknown:
        parser.error(f"unknown WAN profile(s) {', '.join(unknown)}: choose from {', '.join(PROFILE_ORDER)}")
    plan = QUICK if args.quick else FULL
    if args.connects is not None:
        if args.connects < 1:
            parser.error("--connects must be >= 1")
        plan = dataclasses.replace(plan, connects=args.connects, connect_rounds=min(plan.connect_rounds, args.connects))

    def finish(results: dict, info: dict, command: List[str], plan: Plan, quick: bool) -> None:
        results["reading"] = reading(results)
        why = plot(results, plot_path)
        if why:
            progress(why)
        text = render(results, info, command, plan, quick, None if why else plot_ref, why)
        replace_section(out_path, SECTION_TITLE, text)
        print(text)
        progress(f"wrote the section {SECTION_TITLE[3:]!r} of {out_path}" + ("" if why else f" and {plot_path}"))

    if args.replot:
        why = plot(medians_from_section(out_path.read_text()), plot_path)
        progress(why or f"wrote {plot_path} from the medians in {out_path}")
        return 1 if why else 0
    if args.render_only:
        saved = json.loads(Path(args.render_only).read_text())
        finish(saved["results"], saved["info"], saved["argv"], Plan(**saved["plan"]), saved["quick"])
        return 0
    if os.geteuid() != 0:
        parser.error("the grid lab needs root")
    missing = missing_tools() + [(tool, pkg) for tool, pkg in (("iperf3", "iperf3"), ("ssh", "openssh-client"))
                                 if shutil.which(tool) is None]
    if missing:
        parser.error("missing tools: " + ", ".join(f"{tool} (Debian {pkg})" for tool, pkg in missing))
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    import lz4.frame

    info = machine()
    json_data = bytes(bench_data.pattern("json"))
    results: dict = {"started": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                     "load_before": loadavg(), "tables": {}, "versions": versions(),
                     "parallel_why": parallel_status(), "profiles": {p: PROFILES[p].wan for p in PROFILE_ORDER},
                     "lz4_ratio_json": len(json_data) / len(lz4.frame.compress(json_data))}
    progress("parallel: " + (results["parallel_why"] or "available"))
    results["lossy_bytes"] = plan.lossy_bytes
    results["connects"] = plan.connects
    if not results["parallel_why"]:
        try:
            from gridsock.components.parallel import DEFAULT_CHUNK_BYTES
            results["parallel_chunk"] = DEFAULT_CHUNK_BYTES
        except ImportError:
            pass
    wall = time.perf_counter()
    workdir = Path(tempfile.mkdtemp(prefix="gridsock-bench-methods-"))
    lab = Lab(args.prefix)
    grid = LabGrid(lab, workdir)
    pin = not args.no_pin and len(os.sched_getaffinity(0)) >= 2 and shutil.which("taskset") is not None
    results["pinned"] = pin
    bench = MethodsBench(lab, grid, plan, workdir, results["parallel_why"], pin=pin)
    signal.signal(signal.SIGTERM, _terminated)
    wan_set = False
    try:
        progress(f"lab {args.prefix} up")
        lab.up()
        results["congestion"] = bench.congestion("a1")
        results["congestion_allowed"] = bench.congestion("a1", allowed=True)
        progress("grid: rendez-vous node, rv, a1, b1, c1 (through fec's sshd)")
        bench.start_grid()
        bench.make_tls_files()
        progress("baselines: plain servers on rv, fwb, fec, c1; ssh -L and sshtunnel in rv")
        bench.start_baselines()
        for name in PROFILE_ORDER:
            if name not in only:
                continue
            profile = PROFILES[name]
            title, cases, kind = TABLES[name]
            progress(f"WAN profile {name}: {profile.call()}; {title.lower()}")
            if profile.wan:
                wan_set = True  # set before the call: a half-made profile is removed too
            lab.set_wan(**profile.wan)  # no arguments: the previous profile is removed
            if profile.congestion:
                bench.set_congestion(profile.congestion)
            try:
                if kind == "connect":
                    results["pings"] = bench.bootstrap_pings()
                    results["tables"][name] = bench.measure_connects(cases)
                    results["anatomy"] = bench.anatomy()
                else:
                    nbytes, rounds = {"none": (plan.unshaped_bytes, plan.rounds),
                                      "rate100": (plan.rate_bytes, plan.shaped_rounds),
                                      "lossy": (plan.lossy_bytes, plan.shaped_rounds)}[name]
                    results["tables"][name] = bench.measure_transfers(cases, nbytes, rounds, name)
                    if name == "none":
                        bench.gridsock_cipher()
            finally:
                if profile.congestion:
                    bench.set_congestion(results["congestion"])
    except Exception:
        print(grid.logs_tail(), file=sys.stderr)
        raise
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the teardown short
        progress("tearing down")
        try:
            grid.stop()
            if wan_set:
                try:
                    lab.set_wan()  # no arguments: the WAN profile (delayers, rules, qdiscs) is removed
                except Exception as exc:  # down() removes what is left; the teardown goes on
                    progress(f"removing the WAN profile failed: {exc}")
            lab.down()
        finally:
            if args.logs:
                Path(args.logs).mkdir(parents=True, exist_ok=True)
                for log_file in workdir.glob("*.log"):
                    shutil.copy(log_file, args.logs)
            shutil.rmtree(workdir, ignore_errors=True)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
    results["load_after"] = loadavg()
    results["wall_s"] = time.perf_counter() - wall
    results["ciphers"] = bench.ciphers
    command = ["python3", "bench/bench_methods.py", *argv]
    raw = Path(tempfile.gettempdir()) / f"bench_methods-{os.getpid()}.json"
    raw.write_text(json.dumps({"results": results, "info": info, "argv": command, "plan": dataclasses.asdict(plan),
                               "quick": args.quick}))
    progress(f"raw results in {raw} (--render-only {raw} renders them again)")
    finish(results, info, command, plan, args.quick)
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    mode = argv[0] if argv else ""
    if mode == "node":
        return run_node(argv[1:])
    if mode == "socks-client":
        return run_socks_client(json.loads(argv[1]))
    if mode == "multi-client":
        return run_multi_client(json.loads(argv[1]))
    if mode == "sshtunnel-forward":
        return run_sshtunnel_forward(json.loads(argv[1]))
    if mode == "splice-peer":
        return run_splice_peer(json.loads(argv[1]))
    return run_bench(argv)


if __name__ == "__main__":
    sys.exit(main())
