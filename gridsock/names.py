"""Grid names and grid addresses: how programs that speak IP name the nodes of a grid.

Theory of operation
-------------------
A program under the socket personality resolves ``b2`` (or ``b2.grid``) and connects to the
address it got, or hands that address to another process (``multiprocessing.managers`` does).
So every node has one *grid address*, the same on every host of the grid: an IPv4 address in
``GRID_NET`` (240.0.0.0/4, reserved and never routed, so a grid address that escapes to the
kernel fails at once instead of reaching someone). It is derived from the node's UUID, which is
the same everywhere, so no table has to travel: ``grid_ip(node_id)``. With 2**28 addresses,
two nodes of a grid of 1,000 collide with odds of about 1 in 500,000; the agent refuses an
address two nodes of its directory share rather than guess (a future rendez-vous node can
assign them).

The run directory
-----------------
The control and agent sockets of this host's gridsock processes live in one directory per user
(:func:`run_dir`): ``$GRIDSOCK_RUN_DIR``, else ``$XDG_RUNTIME_DIR/gridsock`` when
``$XDG_RUNTIME_DIR`` is a private directory of this user (systemd's ``/run/user/<uid>``), else
``/tmp/gridsock-<uid>``. ``/tmp`` is writable by everyone, so another local user can create that
name first and plant sockets in it; a socket there must never be trusted on its name alone.
The rules (ssh's StrictModes, tmux's socket checks):

- a server makes the directory 0700 (:func:`make_private_dir`) and refuses one that is a
  symbolic link, is owned by another user, or is writable by group or others
  (:func:`check_private_dir`); it refuses each client of another uid (:func:`peer_credentials`);
- a client checks the directory and the socket file before it connects (:func:`check_socket_file`),
  and who serves the socket right after (:func:`check_peer`): :func:`connect_private` does all
  three. Trusted means this process's effective uid, or root (who can read our memory anyway).

Every refusal is a :class:`LocalTrustError` that says what is wrong and how to fix it. The check
of the directory before and of the peer after the connect close the race in between: whatever
an attacker swaps in, the process at the other end is the one checked.

This module imports nothing heavy: the personality, which runs inside applications, uses it.
Its I/O is a few ``lstat`` calls and one ``getsockopt``.
"""
from __future__ import annotations

import errno
import hashlib
import ipaddress
import os
import stat
import struct
from typing import Any, Optional, Tuple

from .errors import GridsockError

__all__ = ["GRID_NET", "GRID_SUFFIX", "grid_ip", "is_grid_ip", "grid_name", "run_dir", "RUN_DIR_ENV",
           "RUN_DIR_MODE", "LocalTrustError", "trusted_uid", "make_private_dir", "check_private_dir",
           "check_socket_file", "peer_credentials", "check_peer", "connect_private"]

#: Where grid addresses live: reserved (RFC 1112 "class E"), never routed.
GRID_NET = ipaddress.ip_network("240.0.0.0/4")
#: ``NAME.grid`` names node NAME, and never reaches the system resolver.
GRID_SUFFIX = ".grid"


def grid_ip(node_id: str) -> str:
    """The grid address of the node with UUID ``node_id``."""
    digest = hashlib.sha256(node_id.encode("ascii")).digest()
    host = int.from_bytes(digest[:4], "big") & (GRID_NET.num_addresses - 1)
    host = host or 1  # not the network address itself
    return str(GRID_NET.network_address + host)


def is_grid_ip(host: object) -> bool:
    """True for a textual IPv4 address inside GRID_NET."""
    if not isinstance(host, str):
        return False
    try:
        return ipaddress.IPv4Address(host) in GRID_NET
    except ValueError:
        return False


def grid_name(host: str) -> Optional[str]:
    """``"b2"`` for ``"b2.grid"`` (any case of the suffix), else None."""
    if host.lower().endswith(GRID_SUFFIX) and len(host) > len(GRID_SUFFIX):
        return host[: -len(GRID_SUFFIX)]
    return None


#: The environment variable that names the run directory (it overrides the default).
RUN_DIR_ENV = "GRIDSOCK_RUN_DIR"
#: The mode a server gives the run directory it creates: only its user may list it, create
#: sockets in it or reach them.
RUN_DIR_MODE = 0o700
# Inside $XDG_RUNTIME_DIR, the run directory is this subdirectory of it.
_XDG_SUBDIR = "gridsock"
# struct ucred (pid, uid, gid) as SO_PEERCRED returns it.
_UCRED = struct.Struct("3i")


class LocalTrustError(GridsockError, PermissionError):
    """A local socket is not private to this user: its directory or file is a symbolic link,
    belongs to another user or is writable by others, or the process serving it runs as another
    user. ``path`` names what is at fault. A ``PermissionError`` (``errno`` EACCES), so a
    program under the socket personality gets a stdlib exception."""

    def __init__(self, msg: str, path: Optional[str] = None) -> None:
        super().__init__(errno.EACCES, msg)
        self.path = path

    def __str__(self) -> str:
        return str(self.strerror)

    def __reduce__(self) -> Tuple[Any, ...]:
        return (type(self), (self.strerror, self.path))


def run_dir() -> str:
    """The directory holding the control and agent sockets of this host's gridsock processes:
    ``$GRIDSOCK_RUN_DIR``; else ``$XDG_RUNTIME_DIR/gridsock`` if ``$XDG_RUNTIME_DIR`` is a
    directory of this user that nobody else may enter; else ``/tmp/gridsock-<uid>``. Returns a
    path; it does not create it nor check it (servers and clients do: see the module docstring).
    (Here, not in the bootstrap package, because the personality's launcher needs it before it
    patches, and must import no gevent or ssl first.)"""
    explicit = os.environ.get(RUN_DIR_ENV)
    if explicit:
        return explicit
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isabs(runtime) and _is_own_private_dir(runtime):
        return os.path.join(runtime, _XDG_SUBDIR)
    return f"/tmp/gridsock-{os.getuid()}"


def _is_own_private_dir(path: str) -> bool:
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid() and not st.st_mode & 0o077


def trusted_uid(uid: int) -> bool:
    """True for the uids whose sockets and directories this process trusts: its own
    (effective) uid, and root's."""
    return uid == os.geteuid() or uid == 0


def _user(uid: int) -> str:
    """``uid 65534 (nobody)``: for messages."""
    try:
        import pwd

        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except (ImportError, KeyError):
        return f"uid {uid}"


def _fix_hint(path: str) -> str:
    return (f"gridsock keeps its sockets only in a directory of its user's that nobody else can write: "
            f"remove {path} (as root if need be) and start the node again, or set ${RUN_DIR_ENV} to "
            f"such a directory")


def check_private_dir(path: str) -> None:
    """Check that directory ``path`` may hold this user's sockets: not a symbolic link, a
    directory, owned by this user (or root), not writable by group or others.

    Returns None if so. Raises LocalTrustError saying what is wrong and how to fix it;
    FileNotFoundError if ``path`` does not exist.
    """
    path = os.path.abspath(path)
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        raise LocalTrustError(f"the run directory {path} is a symbolic link (to {os.readlink(path)}); "
                              + _fix_hint(path), path)
    if not stat.S_ISDIR(st.st_mode):
        raise LocalTrustError(f"the run directory {path} is not a directory; " + _fix_hint(path), path)
    if not trusted_uid(st.st_uid):
        raise LocalTrustError(f"the run directory {path} belongs to {_user(st.st_uid)}, not to you "
                              f"({_user(os.geteuid())}): another user may have made it to catch "
                              f"gridsock's sockets; " + _fix_hint(path), path)
    if st.st_mode & 0o022:
        who = " and ".join(w for w, bit in (("group", 0o020), ("others", 0o002)) if st.st_mode & bit)
        raise LocalTrustError(f"the run directory {path} is writable by {who} (mode "
                              f"{stat.S_IMODE(st.st_mode):04o}); it must be private to its user: "
                              f"chmod 700 {path}", path)


def make_private_dir(path: str) -> None:
    """Create directory ``path`` with mode 0700 (its parents as the umask says) unless it
    exists, then :func:`check_private_dir` it. A server calls it before it makes a socket there.
    Raises LocalTrustError for a directory that is not private to this user, OSError if it
    cannot be created."""
    try:
        os.makedirs(path, mode=RUN_DIR_MODE)
    except FileExistsError:
        pass
    check_private_dir(path)


def check_socket_file(path: str) -> None:
    """Check, before connecting to the Unix socket ``path``, that its directory passes
    :func:`check_private_dir` and that ``path`` is a socket (not a symbolic link) of this user
    (or root). Returns None if so, or if the directory or the socket does not exist (the
    connect will say nothing serves it). Raises LocalTrustError otherwise."""
    directory = os.path.dirname(os.path.abspath(path))
    try:
        check_private_dir(directory)
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(st.st_mode):
        raise LocalTrustError(f"{path} is a symbolic link (to {os.readlink(path)}), not a gridsock socket", path)
    if not stat.S_ISSOCK(st.st_mode):
        raise LocalTrustError(f"{path} is not a socket", path)
    if not trusted_uid(st.st_uid):
        raise LocalTrustError(f"the socket {path} belongs to {_user(st.st_uid)}, not to you "
                              f"({_user(os.geteuid())}): remove it and start the node again", path)


def peer_credentials(sock: Any) -> Tuple[int, int, int]:
    """``(pid, uid, gid)`` of the process at the other end of the connected Unix socket
    ``sock``, as the kernel recorded them when it connected (``SO_PEERCRED``). Raises OSError."""
    import socket

    pid, uid, gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    return pid, uid, gid


def check_peer(sock: Any, path: str) -> None:
    """Check that the process serving the connected Unix socket ``sock`` (at ``path``) runs as
    this user or root. Returns None if so; raises LocalTrustError otherwise, OSError if the
    kernel cannot say."""
    pid, uid, _ = peer_credentials(sock)
    if not trusted_uid(uid):
        raise LocalTrustError(f"the process serving {path} (pid {pid}) runs as {_user(uid)}, not as you "
                              f"({_user(os.geteuid())}) or root: it is not your gridsock node; "
                              f"remove {path} and start the node again", path)


def connect_private(sock: Any, path: str) -> None:
    """Connect the Unix stream socket ``sock`` to ``path`` if, and only if, the socket is this
    user's: :func:`check_socket_file` before, :func:`check_peer` after (nothing is sent to
    a stranger). Returns None. Raises LocalTrustError (the caller closes ``sock``), or the
    OSError of the connect itself (FileNotFoundError, ConnectionRefusedError...)."""
    check_socket_file(path)
    sock.connect(path)
    check_peer(sock, path)
