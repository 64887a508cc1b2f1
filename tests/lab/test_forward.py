"""``gridsock forward`` and ``gridsock expose`` in the lab, with programs that are not Python.

- OpenSSH: a private sshd in b2's namespace (127.0.0.1 only, a host key and authorized_keys
  made here) published with ``gridsock expose`` on b2; ``gridsock forward`` on a1 (behind A's
  NAT; B's firewall drops what comes from outside) gives a local port that ``ssh`` uses: a login
  by key in BatchMode runs ``echo ok``, then 8 MiB pass through ``sha256sum`` on b2.
- Redis: redis-server on b1 (127.0.0.1 only) exposed as grid port 6379; redis-cli on a2 through
  a forward stores a 4 MiB value, reads it back, and redis-cli on b1 itself (no gridsock) sees
  the same value.

The rules choose every connection's stack. Readiness: each command's first line, the daemons'
ports (probed inside their namespace); every wait is bounded.
"""
from __future__ import annotations

import base64
import hashlib
import os
import signal
import subprocess

import pytest

from gridsock.testing.lab import SBIN_DIRS
from gridsock.testing.procs import gridsock_argv, stop_process, wait_for_line

from .gridsession import JOIN_TIMEOUT_S, make_grid

pytestmark = pytest.mark.timeout(300)

# A command run in a lab host (ssh, redis-cli) ends within this.
COMMAND_TIMEOUT_S = 120.0
# A held gridsock command stops within this after its signal.
STOP_TIMEOUT_S = 20.0
SSHD_PORT = 2222
REDIS_PORT = 6390


@pytest.fixture(scope="module")
def grid(lab, tmp_path_factory):
    yield from make_grid(lab, tmp_path_factory)


class Held:
    """A ``gridsock forward|expose`` running in a lab host until stopped."""

    def __init__(self, grid, host: str, *args: str) -> None:
        self.grid = grid
        log = open(grid.tmp / f"{args[0]}-{host}.log", "ab")
        self.proc = grid.lab.spawn(host, gridsock_argv(*args), stdout=subprocess.PIPE, stderr=log, env=grid.env)
        log.close()
        self.line = wait_for_line(self.proc, lambda line: line.startswith(("forwarding ", "exposing ")),
                                  timeout=JOIN_TIMEOUT_S)

    @property
    def local_port(self) -> int:
        return int(self.line.split()[1].rsplit(":", 1)[1])

    def stop(self) -> str:
        """SIGINT; the line with the counts (the command must exit 0)."""
        self.proc.send_signal(signal.SIGINT)
        last = wait_for_line(self.proc, "stopped ", timeout=STOP_TIMEOUT_S)
        assert self.proc.wait(timeout=STOP_TIMEOUT_S) == 0
        return last

    def close(self) -> None:
        stop_process(self.proc)


def sshd_path() -> str:
    for directory in SBIN_DIRS:
        if os.access(os.path.join(directory, "sshd"), os.X_OK):
            return os.path.join(directory, "sshd")
    pytest.fail("no sshd (Debian package openssh-server)")


def test_ssh_to_b2_through_expose_and_forward(grid, tmp_path):
    lab = grid.lab
    keys = tmp_path / "ssh"
    keys.mkdir(mode=0o700)
    for name in ("host", "client"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"test_forward {name}",
                        "-f", str(keys / name)], check=True, timeout=COMMAND_TIMEOUT_S)
    (keys / "authorized_keys").write_text((keys / "client.pub").read_text())
    key_type, key_b64 = (keys / "host.pub").read_text().split()[:2]
    (keys / "known_hosts").write_text(f"b2 {key_type} {key_b64}\n")  # (HostKeyAlias=b2 below)
    (keys / "sshd_config").write_text("\n".join([
        f"Port {SSHD_PORT}", "ListenAddress 127.0.0.1", "AddressFamily inet",
        f"HostKey {keys / 'host'}", f"PidFile {keys / 'sshd.pid'}",
        f"AuthorizedKeysFile {keys / 'authorized_keys'}",
        "PermitRootLogin prohibit-password", "PubkeyAuthentication yes", "PasswordAuthentication no",
        "KbdInteractiveAuthentication no", "UsePAM no", "StrictModes no", "PrintMotd no", "UseDNS no",
        "LogLevel INFO", ""]))
    sshd_log = tmp_path / "sshd.log"
    with open(sshd_log, "ab") as out:
        sshd = lab.spawn("b2", [sshd_path(), "-D", "-e", "-f", str(keys / "sshd_config")], stdout=out, stderr=out)
    expose = forward = None
    try:
        lab.wait_listening("b2", "127.0.0.1", SSHD_PORT, proc=sshd, log_path=sshd_log)
        expose = Held(grid, "b2", "expose", "--node", "b2", "22", str(SSHD_PORT))
        assert expose.line == f"exposing b2:22 -> 127.0.0.1:{SSHD_PORT} (Ctrl-C to stop)"
        forward = Held(grid, "a1", "forward", "--node", "a1", "0", "b2:22")
        ssh = ["ssh", "-F", "/dev/null", "-i", str(keys / "client"), "-p", str(forward.local_port),
               "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes", "-o", f"UserKnownHostsFile={keys / 'known_hosts'}",
               "-o", "HostKeyAlias=b2", "-o", "ConnectTimeout=60", "root@127.0.0.1"]
        login = lab.run("a1", [*ssh, "echo", "ok"], capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)
        assert (login.returncode, login.stdout) == (0, "ok\n"), login.stderr
        data = os.urandom(8 << 20)
        digest = lab.run("a1", [*ssh, "sha256sum"], input=data, capture_output=True, timeout=COMMAND_TIMEOUT_S)
        assert digest.returncode == 0, digest.stderr
        assert digest.stdout.split()[0].decode() == hashlib.sha256(data).hexdigest()
        last = forward.stop()
        assert last.startswith("stopped forwarding 127.0.0.1:") and ": 2 connection(s), " in last, last
        assert expose.stop().startswith(f"stopped exposing b2:22 -> 127.0.0.1:{SSHD_PORT}: 2 connection(s), ")
    finally:
        for held in (forward, expose):
            if held is not None:
                held.close()
        stop_process(sshd)


def test_redis_on_b1_through_expose_and_forward(grid, tmp_path):
    lab = grid.lab
    redis_log = tmp_path / "redis.log"
    with open(redis_log, "ab") as out:
        redis = lab.spawn("b1", ["redis-server", "--port", str(REDIS_PORT), "--bind", "127.0.0.1", "--save", "",
                                 "--appendonly", "no", "--dir", str(tmp_path), "--protected-mode", "no"],
                          stdout=out, stderr=out)
    expose = forward = None
    try:
        lab.wait_listening("b1", "127.0.0.1", REDIS_PORT, proc=redis, log_path=redis_log)
        expose = Held(grid, "b1", "expose", "--node", "b1", "6379", str(REDIS_PORT))
        forward = Held(grid, "a2", "forward", "--node", "a2", "0", "b1:6379")
        value = base64.b64encode(os.urandom(3 << 20))  # 4 MiB of text
        cli = ["redis-cli", "-h", "127.0.0.1", "-p", str(forward.local_port)]
        stored = lab.run("a2", [*cli, "-x", "SET", "big"], input=value, capture_output=True,
                         timeout=COMMAND_TIMEOUT_S)
        assert (stored.returncode, stored.stdout.strip()) == (0, b"OK"), stored.stderr
        got = lab.run("a2", [*cli, "--raw", "GET", "big"], capture_output=True, timeout=COMMAND_TIMEOUT_S)
        assert got.returncode == 0 and got.stdout == value + b"\n", got.stderr
        there = lab.run("b1", ["redis-cli", "-p", str(REDIS_PORT), "--raw", "GET", "big"], capture_output=True,
                        timeout=COMMAND_TIMEOUT_S)  # on b1 itself, no gridsock: the value arrived whole
        assert there.stdout == value + b"\n"
        # redis-cli under gridsock run, by grid name: proxychains-ng and a2's front door reach the
        # grid port b1 exposes, without any forward.
        run = lab.run("a2", gridsock_argv("run", "--node", "a2", "--", "redis-cli", "-h", "b1", "-p", "6379", "--raw",
                                          "STRLEN", "big"), capture_output=True, env=grid.env, timeout=COMMAND_TIMEOUT_S)
        assert (run.returncode, run.stdout.strip()) == (0, str(len(value)).encode()), run.stderr
        assert ": 2 connection(s), " in forward.stop()
        assert ": 3 connection(s), " in expose.stop()
    finally:
        for held in (forward, expose):
            if held is not None:
                held.close()
        stop_process(redis)
