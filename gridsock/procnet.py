"""The kernel's table of the TCP sockets of this network namespace (``/proc/net/tcp`` and
``tcp6``, as ``netstat`` reads it): who owns a socket, and whether a descriptor still refers to
it. The assembler follows a kernel socket handed to a program by it; the front door finds the
user of a loopback client's socket in it.
"""
from __future__ import annotations

import socket
import struct
from typing import Iterator, NamedTuple, Optional, Tuple

__all__ = ["PROC_NET_TCP", "TcpSocket", "endpoint", "tcp_sockets"]

PROC_NET_TCP = ("/proc/self/net/tcp", "/proc/self/net/tcp6")


class TcpSocket(NamedTuple):
    local: Tuple[str, int]
    remote: Tuple[str, int]
    uid: int
    inode: int


def endpoint(text: str) -> Tuple[str, int]:
    """``("1.2.3.4", port)`` from the table's ``0100007F:1F90``: each 32-bit word of the address
    in host byte order, the port in hex. Raises ValueError."""
    hexaddr, _, hexport = text.partition(":")
    raw = b"".join(struct.pack("=I", int(hexaddr[i:i + 8], 16)) for i in range(0, len(hexaddr), 8))
    family = socket.AF_INET if len(raw) == 4 else socket.AF_INET6
    return socket.inet_ntop(family, raw), int(hexport, 16)


def tcp_sockets(*, local_port: Optional[int] = None) -> Iterator[TcpSocket]:
    """The TCP sockets that a descriptor refers to (an orphan, closed by every process, is listed
    with inode 0 and left out), those bound to ``local_port`` only if it is given (the other
    lines are not parsed). A table that cannot be read (no IPv6 here) is passed over."""
    port_suffix = None if local_port is None else f":{local_port:04X}"
    for path in PROC_NET_TCP:
        try:
            with open(path) as table:
                lines = table.readlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) < 10 or fields[9] == "0":
                continue
            if port_suffix is not None and not fields[1].endswith(port_suffix):
                continue
            try:
                yield TcpSocket(endpoint(fields[1]), endpoint(fields[2]), int(fields[7]), int(fields[9]))
            except ValueError:
                continue
