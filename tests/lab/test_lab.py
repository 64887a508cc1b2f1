"""The grid lab's topology, proven with real traffic: NAT, firewall, private cluster, sshd, SOCKS."""
from __future__ import annotations

import selectors
import subprocess
import sys
from pathlib import Path
from typing import Callable, Iterator

import pytest

from gridsock.testing import lab as lab_module
from gridsock.testing.lab import ADDRESSES, LAN_ADDRESSES, Lab, LabError, main

pytestmark = pytest.mark.timeout(60)

READY_TIMEOUT_S = 10.0  # a test server must print "ready" within this
CONNECT_TIMEOUT_S = 1.5  # long enough on a loaded machine, short enough to prove a DROP
CLIENT_TIMEOUT_S = 20.0  # a whole client subprocess (ssh, paramiko import...)
UNREACHABLE = ("ENETUNREACH", "EHOSTUNREACH")

# Accepts forever; tells each client the address it sees it from, then echoes.
SERVER_SRC = r"""
import socket, sys, threading
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((sys.argv[1], 0))
srv.listen(16)
print("ready", srv.getsockname()[1], flush=True)
def serve(conn, peer):
    with conn:
        conn.sendall(("peer %s\n" % peer[0]).encode())
        while True:
            data = conn.recv(65536)
            if not data:
                break
            conn.sendall(data)
while True:
    conn, peer = srv.accept()
    threading.Thread(target=serve, args=(conn, peer), daemon=True).start()
"""

# Connects (through a SOCKS5 proxy when given one), checks the echo, prints what the server saw
# ("peer ADDR"), or the failure: "timeout" or an errno name.
CLIENT_SRC = r"""
import errno, socket, sys
addr, port, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
try:
    if len(sys.argv) > 4:
        import socks
        s = socks.socksocket()
        s.set_proxy(socks.SOCKS5, sys.argv[4], int(sys.argv[5]))
        s.settimeout(timeout)
        s.connect((addr, port))
    else:
        s = socket.create_connection((addr, port), timeout=timeout)
except socket.timeout:
    print("timeout"); sys.exit()
except OSError as exc:
    print(errno.errorcode.get(exc.errno, repr(exc))); sys.exit()
with s:
    f = s.makefile("rb")
    greeting = f.readline().decode().strip()
    s.sendall(b"ping\n")
    print(greeting if f.readline() == b"ping\n" else "no echo")
"""

# Opens a direct-tcpip channel through sshd with paramiko, host key checked strictly.
PARAMIKO_SRC = r"""
import sys, paramiko
gateway, key, known_hosts, addr, port = sys.argv[1:6]
client = paramiko.SSHClient()
client.load_host_keys(known_hosts)
client.set_missing_host_key_policy(paramiko.RejectPolicy())
client.connect(gateway, 22, username="root", key_filename=key, look_for_keys=False, allow_agent=False, timeout=10)
chan = client.get_transport().open_channel("direct-tcpip", (addr, int(port)), ("127.0.0.1", 0))
f = chan.makefile("rb")
print(f.readline().decode().strip())
client.close()
"""


@pytest.fixture
def serve(lab: Lab) -> Iterator[Callable[[str], int]]:
    """Start a test server on a host's primary address; return its port."""
    procs: list[subprocess.Popen[str]] = []

    def start(host: str) -> int:
        argv = [sys.executable, "-u", "-c", SERVER_SRC, lab.addr(host)]
        proc = lab.spawn(host, argv, stdout=subprocess.PIPE, text=True)
        procs.append(proc)
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ)
            assert sel.select(READY_TIMEOUT_S), f"server on {host} not ready after {READY_TIMEOUT_S} s"
        line = proc.stdout.readline().split()
        assert line[:1] == ["ready"], f"server on {host} died: {line}"
        return int(line[1])

    yield start
    for proc in procs:
        proc.kill()
        proc.wait()
        proc.stdout.close()


def connect(lab: Lab, src: str, dst: str, port: int, proxy: tuple[str, int] | None = None) -> str:
    """Connect from ``src`` to ``dst`` (a host or an address); return what CLIENT_SRC prints."""
    addr = ADDRESSES.get(dst, dst)
    argv = [sys.executable, "-c", CLIENT_SRC, addr, str(port), str(CONNECT_TIMEOUT_S)]
    if proxy is not None:
        argv += [proxy[0], str(proxy[1])]
    done = lab.run(src, argv, capture_output=True, text=True, timeout=CLIENT_TIMEOUT_S)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


# -- cluster A: behind NAT ------------------------------------------------------------------------


def test_nat_cluster_reaches_public_side_as_its_gateway(lab: Lab, serve: Callable[[str], int]) -> None:
    port = serve("rv")
    assert connect(lab, "a1", "rv", port) == "peer 203.0.113.2"
    assert connect(lab, "a2", "rv", port) == "peer 203.0.113.2"


def test_public_side_cannot_reach_nat_cluster(lab: Lab, serve: Callable[[str], int]) -> None:
    port = serve("a1")
    assert connect(lab, "rv", "a1", port) in UNREACHABLE
    assert connect(lab, "gwa", "a1", port) == "peer 10.1.0.1"  # the gateway itself is on the LAN


# -- cluster B: public addresses behind a stateful firewall -------------------------------------


def test_firewalled_cluster_reaches_public_side_with_own_address(lab: Lab, serve: Callable[[str], int]) -> None:
    port = serve("rv")
    assert connect(lab, "b1", "rv", port) == "peer 198.51.100.11"


def test_firewall_drops_new_inbound_connections(lab: Lab, serve: Callable[[str], int]) -> None:
    port = serve("b1")
    assert connect(lab, "rv", "b1", port) == "timeout"
    assert connect(lab, "a1", "b1", port) == "timeout"  # NATed A is outside B's firewall too


@pytest.mark.parametrize("cluster", [("a1", "a2"), ("b1", "b2"), ("c1", "c2")], ids=["A", "B", "C"])
def test_nodes_reach_each_other_inside_a_cluster(
    lab: Lab, serve: Callable[[str], int], cluster: tuple[str, str]
) -> None:
    first, second = cluster
    assert connect(lab, first, second, serve(second)) == f"peer {ADDRESSES[first]}"
    assert connect(lab, second, first, serve(first)) == f"peer {ADDRESSES[second]}"


# -- cluster C: private, out only through the front-end -----------------------------------------


def test_private_cluster_has_no_route_out(lab: Lab, serve: Callable[[str], int]) -> None:
    port = serve("rv")
    assert connect(lab, "c1", "rv", port) in UNREACHABLE
    assert connect(lab, "rv", "10.3.0.11", port) in UNREACHABLE


def test_frontend_services_listen_on_both_sides(lab: Lab) -> None:
    assert lab.probe("c1", LAN_ADDRESSES["fec"], 22) == "connected"
    assert lab.probe("c1", *lab.socks_proxy) == "connected"
    assert lab.probe("rv", *lab.socks_proxy_public) == "connected"
    assert lab.probe("rv", ADDRESSES["fec"], 22) == "connected"


def test_ssh_stdio_forwarding_from_private_cluster_to_public_side(lab: Lab, serve: Callable[[str], int]) -> None:
    port = serve("rv")
    user_host = lab.ssh_gateway.rsplit(":", 1)[0]
    argv = [
        "ssh", "-F", "/dev/null", "-i", lab.ssh_client_key,
        "-o", f"UserKnownHostsFile={lab.ssh_known_hosts}", "-o", "StrictHostKeyChecking=yes",
        "-o", "BatchMode=yes", "-o", "ConnectTimeout=5",
        "-W", f"{ADDRESSES['rv']}:{port}", user_host,
    ]  # fmt: skip
    done = lab.run("c1", argv, input="", capture_output=True, text=True, timeout=CLIENT_TIMEOUT_S)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0] == "peer 203.0.113.4"


@pytest.mark.parametrize(
    "client, gateway, server, seen_as",
    [("c1", "10.3.0.1", "rv", "203.0.113.4"), ("rv", "203.0.113.4", "c1", "10.3.0.1")],
    ids=["out-of-C", "into-C"],
)
def test_paramiko_checks_the_frontend_host_key_strictly(
    lab: Lab, serve: Callable[[str], int], client: str, gateway: str, server: str, seen_as: str
) -> None:
    port = serve(server)
    key, known_hosts = lab.ssh_client_key, lab.ssh_known_hosts
    argv = [sys.executable, "-c", PARAMIKO_SRC, gateway, key, known_hosts, lab.addr(server), str(port)]
    done = lab.run(client, argv, capture_output=True, text=True, timeout=CLIENT_TIMEOUT_S)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"peer {seen_as}"


def test_socks_from_private_cluster_to_public_side(lab: Lab, serve: Callable[[str], int]) -> None:
    port = serve("rv")
    assert connect(lab, "c1", "rv", port, proxy=lab.socks_proxy) == "peer 203.0.113.4"


def test_socks_from_public_side_into_private_cluster(lab: Lab, serve: Callable[[str], int]) -> None:
    port = serve("c1")
    assert connect(lab, "rv", "c1", port, proxy=lab.socks_proxy_public) == "peer 10.3.0.1"
    assert connect(lab, "b1", "c1", port, proxy=lab.socks_proxy_public) == "peer 10.3.0.1"


# -- the lab itself -------------------------------------------------------------------------------


def test_cli_exec_and_status_from_state(lab: Lab, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--prefix", lab.prefix, "exec", "c1", "sh", "-c", "exit 3"]) == 3
    assert main(["status", "--prefix", lab.prefix]) == 0
    assert f"lab {lab.prefix}: up" in capsys.readouterr().out
    again = Lab(lab.prefix).load()
    assert again.status()["status"] == "up"
    assert main(["--prefix", "gs-no-such-lab-", "exec", "c1", "true"]) == 1


def test_down_ends_everything_and_up_replaces_a_stale_lab(spare_lab_prefix: str) -> None:
    first = Lab(spare_lab_prefix)
    first.up()
    tracked = first.spawn("a1", ["sleep", "60"])
    # a process the lab did not start itself, left running inside a namespace
    first.run("c2", ["sh", "-c", "sleep 60 >/dev/null 2>&1 &"], check=True)
    old_pids = set().union(*(ns_pids(ns) for ns in first.namespaces()))
    assert tracked.pid in old_pids and len(old_pids) >= 4  # sleep x2, sshd, danted (and its children)

    second = Lab(spare_lab_prefix)  # as from another process: stale namespaces and state
    second.up()
    tracked.wait(timeout=1)  # already ended by the second up(); reap it here
    tracked_gone = tracked.returncode is not None
    assert tracked_gone and not any(alive(pid) for pid in old_pids)
    new_pids = set().union(*(ns_pids(ns) for ns in second.namespaces()))
    assert new_pids and not new_pids & old_pids

    second.down()
    assert not set(listed_namespaces()) & set(second.namespaces())
    assert not any(alive(pid) for pid in new_pids)
    assert not second.state_dir.exists()
    second.down()  # idempotent
    first.down()  # and harmless from a stale object


def ns_pids(ns: str) -> set[int]:
    done = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True, check=True, timeout=10)
    return {int(pid) for pid in done.stdout.split()}


def listed_namespaces() -> list[str]:
    done = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True, timeout=10)
    return [line.split()[0] for line in done.stdout.splitlines() if line.strip()]


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")  # a zombie has ended; only its parent has yet to reap it


class BrokenSocksLab(Lab):
    """A lab whose danted cannot parse its configuration."""

    def _write_ssh_files(self) -> None:
        super()._write_ssh_files()
        with open(self.state_dir / "danted.conf", "a") as conf:
            conf.write("no-such-keyword: 1\n")


def test_up_fails_loudly_with_the_daemon_log_and_tears_down(spare_lab_prefix: str) -> None:
    broken = BrokenSocksLab(spare_lab_prefix)
    with pytest.raises(LabError, match=r"danted exited with \d+; end of .*danted\.log") as failure:
        broken.up()
    assert "syntax error" in str(failure.value)  # danted's own complaint, from its log
    assert not set(listed_namespaces()) & set(broken.namespaces())
    assert not broken.state_dir.exists()


def test_up_names_the_debian_package_of_a_missing_tool(
    spare_lab_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(lab_module.REQUIRED_TOOLS, "gs-no-such-tool", "gs-no-such-package")
    with pytest.raises(LabError, match="gs-no-such-tool \\(Debian package gs-no-such-package\\)"):
        Lab(spare_lab_prefix).up()
    assert not Lab(spare_lab_prefix).exists()
