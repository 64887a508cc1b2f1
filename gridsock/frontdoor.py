"""The front door: one local port that speaks SOCKS5 and HTTP proxy, for programs that are not Python.

Theory of operation
-------------------
A program that is not Python cannot take the socket personality, but nearly every program can
go through a proxy: ``curl -x``, ``http_proxy``/``https_proxy``/``ALL_PROXY=socks5h://``,
``proxychains4``. So a node may serve one TCP port (``127.0.0.1``, port chosen by the kernel,
unless told otherwise) that is both a SOCKS5 server (RFC 1928, with RFC 1929 username and
password) and an HTTP proxy (``CONNECT`` and absolute-form forwarding), told apart by the
first byte a client sends: ``0x05`` is SOCKS5, anything else HTTP (as "mixed" proxy ports do).

Each accepted client gets a greenlet:

1. **Trust.** A client on loopback that belongs to this user or root (its socket's uid, asked of
   the kernel's sock_diag, or read in ``/proc/net/tcp``: :func:`client_untrusted`) may go
   without credentials. Anyone else must give a username and password of ``users`` (SOCKS5 method 2, or HTTP ``Proxy-Authorization:
   Basic``), or is refused: with no users configured, always (local users are kept out of each
   other's grids, and the port is not an open relay).
2. **Handshake.** The client's request is read and checked by the sans-IO codec below
   (:func:`parse_socks_greeting`, :func:`parse_socks_userpass`, :func:`parse_socks_request`,
   :func:`parse_http_head`): bytes in, a message or ``None`` (more needed) out, and
   :class:`SocksProtocolError` / :class:`HttpProtocolError` (both RemoteProtocolError) for bad
   input, carrying the reply the protocol has for it. All reading is bounded: the whole
   handshake by ``handshake_timeout`` (:data:`HANDSHAKE_TIMEOUT_S`), an HTTP head by
   :data:`MAX_HEAD_BYTES`.
3. **Resolution.** A grid name (``b2``, ``b2.grid``), a node id or a grid address
   (240.0.0.0/4, :mod:`gridsock.names`) goes to the grid: ``node.open_stream`` with the
   node's rules, to the grid port asked for, so the connection is assembled like any other and
   listed by ``gridsock status``. ``NAME.grid`` and grid addresses never leave the grid (an
   unknown one is "host unreachable"). Anything else is *passed through*: a plain OS
   connection from the node's host (default), or refused as "not allowed by ruleset"
   (SOCKS5 ``0x02``, HTTP 403) with ``pass_through=False``.
4. **Reply.** SOCKS5 success gives the peer's grid address (or the pass-through socket's own
   address) as the bound address; failures map to the RFC's codes (:data:`SOCKS_REPLIES`) and
   HTTP statuses (:data:`HTTP_STATUSES`), then the client is closed. An HTTP forward request
   (``GET http://b2:8000/x HTTP/1.1``) is sent on in origin form (``GET /x``), ``Host`` set to
   the URL's authority, Proxy-* and hop-by-hop headers dropped, ``Connection: close`` added;
   the first response head gets ``Connection: close`` too: one request per connection.
5. **Bytes both ways.** A :class:`gridsock.bridge.Bridge` pumps between the client's socket
   and the stream, full duplex: a client's EOF is passed on as EOF (``send_eof``), the peer's
   as ``shutdown(SHUT_WR)``, and a break either way as a reset (docs/architecture.md,
   "Breaks"). A grid connection's record gets the bridge (bytes each way) and says it came
   through the front door.

One client's fault (garbage, silence, a reset) ends that client only, with one log line saying
why; the accept loop never stops for a client.
"""
from __future__ import annotations

import base64
import binascii
import dataclasses
import errno
import functools
import hmac
import ipaddress
import logging
import os
import re
import socket
import struct
import time
import weakref
from typing import Any, Callable, Dict, List, Mapping, Optional, Set, Tuple, TypeVar, Union

import gevent
from gevent import socket as gsocket

from . import procnet
from ._ratelog import RateLimitedLog
from .assembly import ASSEMBLY_TIMEOUT_S, ConnectionInfo, errno_of
from .bootstrap.transport import Address, listen, parse_address
from .bridge import Bridge
from .errors import ConfigError, ConnectError, GridsockError, RemoteProtocolError
from .names import grid_ip, grid_name, is_grid_ip
from .streams import DEFAULT_RECEIVE_BYTES, SocketStream, Stream

__all__ = [
    "FrontDoor",
    "DEFAULT_ADDRESS",
    "HANDSHAKE_TIMEOUT_S",
    "CONNECT_TIMEOUT_S",
    "MAX_HEAD_BYTES",
    "MAX_HEADER_FIELDS",
    "MAX_CLIENTS",
    "SOCKS_REPLIES",
    "HTTP_STATUSES",
    "SocksRequest",
    "HttpRequest",
    "SocksProtocolError",
    "HttpProtocolError",
    "parse_socks_greeting",
    "parse_socks_userpass",
    "parse_socks_request",
    "encode_socks_reply",
    "parse_http_head",
    "split_host_port",
    "ResponseRewriter",
    "client_untrusted",
    "socket_uid",
    "socket_pid",
]

log = logging.getLogger(__name__)

# Loopback, a port the kernel picks: only this host's programs can reach it.
DEFAULT_ADDRESS = "127.0.0.1:0"
# A client that has not finished its request by then is dropped: proxy clients send it at once.
HANDSHAKE_TIMEOUT_S = 10.0
# Connecting to the destination (grid or pass-through) gives up after this long: the grid's own.
CONNECT_TIMEOUT_S = ASSEMBLY_TIMEOUT_S
# An HTTP request head larger than this is refused (431): clients send a few hundred bytes, and
# servers refuse far less than this (Apache: 8 KiB a field, 100 fields).
MAX_HEAD_BYTES = 64 * 1024
# Header fields in one HTTP request head, at most (Apache's default limit).
MAX_HEADER_FIELDS = 100
# A response head longer than this is passed on as it is, without ``Connection: close`` added.
MAX_RESPONSE_HEAD_BYTES = 64 * 1024
# Clients at once (in their handshake or connected), each holding a few descriptors; more are
# closed at once (with a log line) until some go.
MAX_CLIENTS = 1024
# What one read of a client's handshake asks for.
HANDSHAKE_RECV_BYTES = 4096
# After accept() fails (out of descriptors...), the accept loop waits this long before the next.
ACCEPT_ERROR_PAUSE_S = 0.1
# Where the kernel lists this network namespace's TCP sockets, with their owners' uids.

# --- SOCKS5 (RFC 1928) and its username/password method (RFC 1929) ---------------------------
SOCKS_VERSION = 5
USERPASS_VERSION = 1
METHOD_NO_AUTH = 0x00
METHOD_USERPASS = 0x02
METHOD_NONE_ACCEPTABLE = 0xFF
CMD_CONNECT, CMD_BIND, CMD_UDP_ASSOCIATE = 1, 2, 3
ATYP_IPV4, ATYP_DOMAIN, ATYP_IPV6 = 1, 3, 4
REP_SUCCEEDED = 0x00
REP_GENERAL_FAILURE = 0x01
REP_NOT_ALLOWED = 0x02
REP_NETWORK_UNREACHABLE = 0x03
REP_HOST_UNREACHABLE = 0x04
REP_CONNECTION_REFUSED = 0x05
REP_TTL_EXPIRED = 0x06
REP_COMMAND_NOT_SUPPORTED = 0x07
REP_ADDRESS_TYPE_NOT_SUPPORTED = 0x08

#: Why a destination could not be had -> the SOCKS5 reply code.
SOCKS_REPLIES: Mapping[str, int] = {
    "refused": REP_CONNECTION_REFUSED,
    "host-unreachable": REP_HOST_UNREACHABLE,
    "network-unreachable": REP_NETWORK_UNREACHABLE,
    "not-allowed": REP_NOT_ALLOWED,
    "timeout": REP_TTL_EXPIRED,
    "failure": REP_GENERAL_FAILURE,
}
#: Why a destination could not be had -> the HTTP status.
HTTP_STATUSES: Mapping[str, int] = {
    "refused": 502,
    "host-unreachable": 502,
    "network-unreachable": 502,
    "not-allowed": 403,
    "timeout": 504,
    "failure": 502,
}
_REASONS = {200: "Connection established", 400: "Bad Request", 403: "Forbidden",
            407: "Proxy Authentication Required", 431: "Request Header Fields Too Large",
            502: "Bad Gateway", 504: "Gateway Timeout"}
# Headers that concern one hop (RFC 9110 7.6.1, and the Proxy-* ones), dropped when a request
# is sent on. Transfer-Encoding stays: the body is passed on as it came, framed as it came.
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-connection", "proxy-authorization",
                        "proxy-authenticate", "te", "trailer", "upgrade"})
# Never dropped even if a Connection header names them: they frame the body or name the host.
_KEEP_ALWAYS = frozenset({"host", "content-length", "transfer-encoding"})
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
_HTTP_VERSION = re.compile(r"HTTP/1\.[01]\Z")
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_HOST = re.compile(r"[A-Za-z0-9_.\-]+\Z")


class SocksProtocolError(RemoteProtocolError):
    """A SOCKS5 client broke the protocol; ``reply`` is what the protocol answers it (may be empty)."""

    def __init__(self, msg: str, reply: bytes = b"", peer: Optional[str] = None) -> None:
        super().__init__(msg, peer)
        self.reply = reply

    def __reduce__(self) -> Tuple[Any, ...]:
        return (type(self), (self.args[0], self.reply, self.peer))


class HttpProtocolError(RemoteProtocolError):
    """An HTTP proxy client sent a bad request; ``status`` is the answer (400, 431...)."""

    def __init__(self, msg: str, status: int = 400, peer: Optional[str] = None) -> None:
        super().__init__(msg, peer)
        self.status = status

    def __reduce__(self) -> Tuple[Any, ...]:
        return (type(self), (self.args[0], self.status, self.peer))


# --- the codec: bytes in, messages out, no I/O -------------------------------------------------

@dataclasses.dataclass(frozen=True)
class SocksRequest:
    """A SOCKS5 request: ``command`` (CMD_*), the destination, and its address type (ATYP_*)."""

    command: int
    host: str
    port: int
    address_type: int


def parse_socks_greeting(data: bytes) -> Optional[Tuple[bytes, int]]:
    """The methods a SOCKS5 client offers, and the bytes its greeting took; None: more needed.

    Raises SocksProtocolError (reply: no acceptable method) for another version or no method.
    """
    if not data:
        return None
    if data[0] != SOCKS_VERSION:
        raise SocksProtocolError(f"SOCKS version {data[0]}, expected 5",
                                 bytes([SOCKS_VERSION, METHOD_NONE_ACCEPTABLE]))
    if len(data) < 2:
        return None
    count = data[1]
    if count == 0:
        raise SocksProtocolError("no authentication method offered", bytes([SOCKS_VERSION, METHOD_NONE_ACCEPTABLE]))
    if len(data) < 2 + count:
        return None
    return bytes(data[2:2 + count]), 2 + count


def parse_socks_userpass(data: bytes) -> Optional[Tuple[bytes, bytes, int]]:
    """Username, password and the bytes taken by an RFC 1929 request; None: more needed.

    Raises SocksProtocolError (reply: failure) for another subnegotiation version.
    """
    if not data:
        return None
    if data[0] != USERPASS_VERSION:
        raise SocksProtocolError(f"username/password version {data[0]}, expected 1", bytes([USERPASS_VERSION, 1]))
    if len(data) < 2:
        return None
    ulen = data[1]
    if len(data) < 3 + ulen:
        return None
    plen = data[2 + ulen]
    end = 3 + ulen + plen
    if len(data) < end:
        return None
    return bytes(data[2:2 + ulen]), bytes(data[3 + ulen:end]), end


def parse_socks_request(data: bytes) -> Optional[Tuple[SocksRequest, int]]:
    """A SOCKS5 request and the bytes it took; None: more needed.

    Any command is returned (the caller answers those it does not support). Raises
    SocksProtocolError for another version, an unknown address type or a bad domain name, with
    the reply the RFC has for it (general failure, address type not supported).
    """
    if not data:
        return None
    if data[0] != SOCKS_VERSION:
        raise SocksProtocolError(f"SOCKS version {data[0]} in the request, expected 5",
                                 encode_socks_reply(REP_GENERAL_FAILURE))
    if len(data) < 4:
        return None
    command, atyp = data[1], data[3]
    if atyp not in (ATYP_IPV4, ATYP_DOMAIN, ATYP_IPV6):
        raise SocksProtocolError(f"address type {atyp} unknown", encode_socks_reply(REP_ADDRESS_TYPE_NOT_SUPPORTED))
    if len(data) < 5:
        return None
    if atyp == ATYP_IPV4:
        end = 4 + 4
        if len(data) < end + 2:
            return None
        host = socket.inet_ntop(socket.AF_INET, bytes(data[4:end]))
    elif atyp == ATYP_IPV6:
        end = 4 + 16
        if len(data) < end + 2:
            return None
        host = socket.inet_ntop(socket.AF_INET6, bytes(data[4:end]))
    else:
        end = 5 + data[4]
        if len(data) < end + 2:
            return None
        host = _domain(bytes(data[5:end]))
    port = struct.unpack(">H", bytes(data[end:end + 2]))[0]
    return SocksRequest(command, host, port, atyp), end + 2


def _domain(raw: bytes) -> str:
    try:
        host = raw.decode("ascii")
    except UnicodeDecodeError:
        host = ""
    if ":" in host:  # an IPv6 address sent as a name
        try:
            return str(ipaddress.IPv6Address(host))
        except ValueError:
            pass
    if not _HOST.match(host):
        raise SocksProtocolError(f"bad domain name {raw[:64]!r}", encode_socks_reply(REP_GENERAL_FAILURE))
    return host


def encode_socks_reply(reply: int, host: str = "0.0.0.0", port: int = 0) -> bytes:
    """A SOCKS5 reply: code ``reply``, bound address ``host`` (an IPv4 or IPv6 address), ``port``."""
    address = ipaddress.ip_address(host.partition("%")[0])
    atyp = ATYP_IPV4 if address.version == 4 else ATYP_IPV6
    return bytes([SOCKS_VERSION, reply, 0, atyp]) + address.packed + struct.pack(">H", port)


@dataclasses.dataclass(frozen=True)
class HttpRequest:
    """An HTTP request head: method, target as sent, version (``HTTP/1.x``), header fields in order."""

    method: str
    target: str
    version: str
    headers: Tuple[Tuple[str, str], ...]

    def header(self, name: str) -> Optional[str]:
        """The first field called ``name`` (any case), or None."""
        name = name.lower()
        return next((value for key, value in self.headers if key.lower() == name), None)


def _head_end(data: Union[bytes, bytearray]) -> Tuple[int, int]:
    """Where a head ends (the empty line; bare LFs accepted) and the length of that separator;
    (-1, 0) if it has not come yet."""
    ends = [(i, len(sep)) for sep in (b"\r\n\r\n", b"\n\n", b"\n\r\n") for i in (data.find(sep),) if i >= 0]
    return min(ends) if ends else (-1, 0)


def parse_http_head(data: bytes, max_bytes: int = MAX_HEAD_BYTES) -> Optional[Tuple[HttpRequest, int]]:
    """An HTTP/1.x request head and the bytes it took (the body, if any, follows); None: more needed.

    Raises HttpProtocolError: 431 for a head over ``max_bytes`` or with over MAX_HEADER_FIELDS
    fields, 400 for anything malformed (request line, version, field syntax, control bytes).
    """
    end, sep = _head_end(data)
    if end < 0:
        if len(data) > max_bytes:
            raise HttpProtocolError(f"request head over {max_bytes} bytes", 431)
        return None
    if end + sep > max_bytes:
        raise HttpProtocolError(f"request head over {max_bytes} bytes", 431)
    lines = [line.rstrip("\r") for line in bytes(data[:end]).decode("latin-1").split("\n")]
    parts = lines[0].split(" ")
    if len(parts) != 3:
        raise HttpProtocolError(f"bad request line {lines[0][:80]!r}")
    method, target, version = parts
    if not _TOKEN.match(method) or not target or _CONTROL.search(target) or not _HTTP_VERSION.match(version):
        raise HttpProtocolError(f"bad request line {lines[0][:80]!r}")
    if len(lines) - 1 > MAX_HEADER_FIELDS:
        raise HttpProtocolError(f"over {MAX_HEADER_FIELDS} header fields", 431)
    headers: List[Tuple[str, str]] = []
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if not colon or not _TOKEN.match(name) or _CONTROL.search(value):
            raise HttpProtocolError(f"bad header field {line[:80]!r}")
        headers.append((name, value.strip(" \t")))
    return HttpRequest(method, target, version, tuple(headers)), end + sep


def split_host_port(authority: str, default_port: Optional[int]) -> Tuple[str, int]:
    """``("b2", 8000)`` from ``"b2:8000"`` (``[v6]:port`` too); ``default_port`` when there is
    no port (None: a port is required). Raises HttpProtocolError (400)."""
    host, port_text = authority, ""
    if authority.startswith("["):
        close = authority.find("]")
        if close < 0 or authority[close + 1:close + 2] not in ("", ":"):
            raise HttpProtocolError(f"bad authority {authority[:80]!r}")
        host, port_text = authority[1:close], authority[close + 2:]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise HttpProtocolError(f"bad IPv6 address in {authority[:80]!r}") from None
    elif ":" in authority:
        host, _, port_text = authority.rpartition(":")
    if not host or (not authority.startswith("[") and not _HOST.match(host)):
        raise HttpProtocolError(f"bad host in {authority[:80]!r}")
    if not port_text:
        if default_port is None or authority.endswith(":"):
            raise HttpProtocolError(f"no port in {authority[:80]!r}")
        return host, default_port
    # (ASCII digits only: str.isdigit() takes "²" too, which int() refuses: the fuzz campaign's
    # mutated requests made tracebacks of that)
    if not (port_text.isascii() and port_text.isdigit()) or not 0 < int(port_text) < 65536:
        raise HttpProtocolError(f"bad port in {authority[:80]!r}")
    return host, int(port_text)


def _absolute_http(target: str) -> Tuple[str, str]:
    """``("b2:8000", "/x?y")`` from ``http://b2:8000/x?y``. Raises HttpProtocolError (400)."""
    rest = target[len("http://"):]
    cut = min((i for i in (rest.find("/"), rest.find("?"), rest.find("#")) if i >= 0), default=len(rest))
    authority, path = rest[:cut], rest[cut:].partition("#")[0]
    authority = authority.rpartition("@")[2]  # user:password@ is for the server, never sent
    if not path.startswith("/"):
        path = "/" + path
    return authority, path


def origin_request(request: HttpRequest, authority: str, path: str) -> bytes:
    """The head of ``request`` as it goes to the server: origin form, ``Host: authority``,
    hop-by-hop and Proxy-* fields (and those a Connection field names) dropped, ``Connection:
    close`` (one request per connection)."""
    named = {token.strip().lower() for key, value in request.headers if key.lower() == "connection"
             for token in value.split(",")}
    drop = (HOP_BY_HOP | named | {"host"}) - (_KEEP_ALWAYS - {"host"})
    lines = [f"{request.method} {path} {request.version}", f"Host: {authority}"]
    lines += [f"{key}: {value}" for key, value in request.headers if key.lower() not in drop]
    lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def http_response(status: int, text: str, extra: Tuple[str, ...] = ()) -> bytes:
    """A whole short response: ``status``, a one-line text body, ``Connection: close``."""
    body = f"gridsock front door: {text}\n".encode("utf-8", "replace")
    head = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}", "Content-Type: text/plain; charset=utf-8",
            f"Content-Length: {len(body)}", "Connection: close", *extra]
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body


class ResponseRewriter:
    """Adds ``Connection: close`` to the first final response head of a byte stream (dropping its
    Connection, Keep-Alive and Proxy-Connection fields); 1xx heads before it pass as they are,
    and so does anything that is not an HTTP/1 response head or is longer than
    MAX_RESPONSE_HEAD_BYTES. ``feed(bytes)`` returns what may be sent on; ``flush()`` at EOF."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self.done = False

    def feed(self, data: bytes) -> bytes:
        if self.done:
            return data
        self._buffer += data
        out = bytearray()
        while not self.done:
            buf = self._buffer
            if not (buf.startswith(b"HTTP/") or b"HTTP/".startswith(bytes(buf))):
                self._pass_rest(out)
                break
            end, sep = _head_end(buf)
            if end < 0:
                if len(buf) > MAX_RESPONSE_HEAD_BYTES:
                    self._pass_rest(out)
                break
            lines = bytes(buf[:end]).split(b"\n")
            status = lines[0].split(b" ")
            code = int(status[1]) if len(status) > 1 and status[1].isdigit() else 0
            if 100 <= code < 200 and code != 101:
                out += buf[:end + sep]
                del buf[:end + sep]
                continue
            kept = [line.rstrip(b"\r") for line in lines
                    if line.partition(b":")[0].strip().lower() not in (b"connection", b"keep-alive", b"proxy-connection")]
            out += b"\r\n".join(kept + [b"Connection: close"]) + b"\r\n\r\n"
            del buf[:end + sep]
            self._pass_rest(out)
        return bytes(out)

    def _pass_rest(self, out: bytearray) -> None:
        out += self._buffer
        self._buffer.clear()
        self.done = True

    def flush(self) -> bytes:
        """What is left at EOF (a head that never ended), as it came."""
        rest = bytes(self._buffer)
        self._buffer.clear()
        self.done = True
        return rest


class _ClosingResponses(Stream):
    """The server's side of a forwarded request, its response head rewritten (ResponseRewriter)."""

    def __init__(self, lower: Stream) -> None:
        self.lower = lower
        self.info = lower.info
        self._rewriter = ResponseRewriter()

    @property
    def closed(self) -> bool:
        return bool(getattr(self.lower, "closed", getattr(self.lower, "_closed", False)))

    def send_all(self, data) -> None:
        self.lower.send_all(data)

    def receive_some(self, max_bytes: int = DEFAULT_RECEIVE_BYTES) -> bytes:
        while True:
            data = self.lower.receive_some(max_bytes)
            if not data:
                return self._rewriter.flush()
            out = self._rewriter.feed(data)
            if out:
                return out

    def send_eof(self) -> None:
        self.lower.send_eof()

    def close(self) -> None:
        self.lower.close()


# --- who may come in -------------------------------------------------------------------------

def _normal_ip(host: str) -> str:
    address = ipaddress.ip_address(host.partition("%")[0])
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)


def socket_uid(local: Tuple[str, int], remote: Tuple[str, int]) -> Optional[int]:
    """The uid owning the TCP socket of this network namespace bound to ``local`` and connected
    to ``remote`` (asked of the kernel by its addresses, :func:`_tcp_socket_owner`), or None if
    no open socket matches."""
    found = _tcp_socket_owner(local, remote)
    return found[0] if found is not None else None


def socket_pid(local: Tuple[str, int], remote: Tuple[str, int]) -> Optional[int]:
    """The pid of a process holding the TCP socket bound to ``local`` and connected to
    ``remote`` (its inode among the descriptors of the processes of the socket's user), or None.
    Costs a look at every descriptor of that user's processes: a few milliseconds."""
    found = _tcp_socket_owner(local, remote)
    if found is None:
        return None
    uid, inode = found
    link = f"socket:[{inode}]"
    try:
        pids = [name for name in os.listdir("/proc") if name.isdigit()]
    except OSError:
        return None
    for pid in pids:
        try:
            if os.stat(f"/proc/{pid}").st_uid != uid:
                continue
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:  # gone, or not ours to look at
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") == link:
                    return int(pid)
            except OSError:
                continue
    return None


# sock_diag (netlink, linux/inet_diag.h): one socket asked for by its addresses, in a few
# microseconds whatever the size of the table; /proc/net/tcp lists every socket of the
# namespace, TIME_WAIT ones included, and costs milliseconds per look on a busy host (a client
# flood makes the table, and each look, grow: 43 new front-door clients a second at 5,000).
_NETLINK_SOCK_DIAG = 4
_SOCK_DIAG_BY_FAMILY = 20
_NLM_F_REQUEST = 1
_NLMSG_ERROR = 2
_NLMSG_HEADER = struct.Struct("=IHHII")  # length, type, flags, sequence, port id
_DIAG_REQUEST = struct.Struct("=BBBxI")  # family, protocol, extensions, states (then a socket id)
_DIAG_SOCKID = struct.Struct("!HH16s16s")  # source port, destination port, addresses (big-endian)
_DIAG_TAIL = struct.Struct("=III")  # interface, cookie (two words)
_DIAG_NO_COOKIE = 0xFFFFFFFF
_DIAG_REPLY = struct.Struct("=BBBB")  # family, state, timer, retransmits (then the socket id)
_DIAG_OWNER = struct.Struct("=IIIII")  # expires, receive queue, send queue, uid, inode
_DIAG_TIMEOUT_S = 1.0
# False once sock_diag proved unusable here (no netlink, not Linux): /proc/net/tcp from then on.
_diag_usable = True


def _tcp_socket_owner(local: Tuple[str, int], remote: Tuple[str, int]) -> Optional[Tuple[int, int]]:
    """``(uid, inode)`` of the open TCP socket from ``local`` to ``remote``, or None: asked of
    the kernel's sock_diag where it answers, else read from /proc/net/tcp{,6}."""
    global _diag_usable
    if _diag_usable:
        try:
            return _diag_tcp_socket(local, remote)
        except OSError as exc:
            if exc.errno not in (errno.EAFNOSUPPORT, errno.EPROTONOSUPPORT, errno.EPERM, errno.EACCES,
                                 errno.EOPNOTSUPP, errno.EINVAL, None):
                raise
            _diag_usable = False
    return _proc_tcp_socket(local, remote)


def _diag_tcp_socket(local: Tuple[str, int], remote: Tuple[str, int]) -> Optional[Tuple[int, int]]:
    """``(uid, inode)`` of the open TCP socket from ``local`` to ``remote`` as sock_diag
    knows it (one exact lookup), or None: no such socket, or only a TIME_WAIT one (inode 0).
    Raises OSError where sock_diag cannot be asked."""
    local_ip, remote_ip = _normal_ip(local[0]), _normal_ip(remote[0])
    family = socket.AF_INET6 if ":" in local_ip or ":" in remote_ip else socket.AF_INET
    if family == socket.AF_INET6:  # (one IPv4 end and one IPv6: a v4-mapped pair)
        src, dst = _in6(local_ip), _in6(remote_ip)
    else:
        src, dst = socket.inet_pton(family, local_ip), socket.inet_pton(family, remote_ip)
    sockid = _DIAG_SOCKID.pack(local[1], remote[1], src.ljust(16, b"\0"), dst.ljust(16, b"\0"))
    body = (_DIAG_REQUEST.pack(family, socket.IPPROTO_TCP, 0, 0xFFFFFFFF) + sockid
            + _DIAG_TAIL.pack(0, _DIAG_NO_COOKIE, _DIAG_NO_COOKIE))
    request = _NLMSG_HEADER.pack(_NLMSG_HEADER.size + len(body), _SOCK_DIAG_BY_FAMILY, _NLM_F_REQUEST, 1, 0) + body
    # (a plain socket, not gevent's: the kernel answers within the send, and this also runs in
    # worker threads)
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, _NETLINK_SOCK_DIAG) as diag:
        diag.settimeout(_DIAG_TIMEOUT_S)
        diag.sendto(request, (0, 0))
        reply = diag.recv(8192)
    if len(reply) < _NLMSG_HEADER.size:
        raise OSError(errno.EINVAL, "sock_diag: short reply")
    _, kind, _, _, _ = _NLMSG_HEADER.unpack_from(reply)
    if kind == _NLMSG_ERROR:
        code = -struct.unpack_from("=i", reply, _NLMSG_HEADER.size)[0]
        if code in (errno.ENOENT, errno.ESTALE):
            return None
        raise OSError(code, f"sock_diag: {os.strerror(code)}")
    if kind != _SOCK_DIAG_BY_FAMILY:
        raise OSError(errno.EINVAL, f"sock_diag: unexpected reply type {kind}")
    offset = _NLMSG_HEADER.size + _DIAG_REPLY.size
    sport, dport, got_src, got_dst = _DIAG_SOCKID.unpack_from(reply, offset)
    if (sport, dport) != (local[1], remote[1]) or got_dst not in (dst.ljust(16, b"\0"), _in6(remote_ip)):
        return None  # (the kernel fell back to a listening socket on that port: not the one asked for)
    offset += _DIAG_SOCKID.size + _DIAG_TAIL.size
    _, _, _, uid, inode = _DIAG_OWNER.unpack_from(reply, offset)
    return (uid, inode) if inode else None


def _in6(ip: str) -> bytes:
    """16 bytes of ``ip``: an IPv4 address as v4-mapped."""
    if ":" in ip:
        return socket.inet_pton(socket.AF_INET6, ip)
    return b"\0" * 10 + b"\xff\xff" + socket.inet_pton(socket.AF_INET, ip)


def _proc_tcp_socket(local: Tuple[str, int], remote: Tuple[str, int]) -> Optional[Tuple[int, int]]:
    """``(uid, inode)`` of the open TCP socket from ``local`` to ``remote``, or None."""
    want = ((_normal_ip(local[0]), local[1]), (_normal_ip(remote[0]), remote[1]))
    for found in procnet.tcp_sockets(local_port=local[1]):
        if ((_normal_ip(found.local[0]), found.local[1]), (_normal_ip(found.remote[0]), found.remote[1])) == want:
            return found.uid, found.inode
    return None


def client_untrusted(client: Tuple[str, int], server: Tuple[str, int], *, allow_other_users: bool = False,
                     uid_of: Callable[[Tuple[str, int], Tuple[str, int]], Optional[int]] = socket_uid) -> Optional[str]:
    """Why the client at ``client``, connected to our ``server`` address, must give credentials;
    None if it may go without: it is on loopback, and (unless ``allow_other_users``) its socket
    belongs to this process's (effective) user, or to root."""
    try:
        address = ipaddress.ip_address(_normal_ip(client[0]))
    except ValueError:
        return f"client address {client[0]!r} is not an IP address"
    if not address.is_loopback:
        return f"{client[0]} is not on loopback"
    if allow_other_users:
        return None
    uid = uid_of(client, server)
    if uid is None:
        return "its socket is not in the kernel's TCP table: its user is unknown"
    if uid not in (os.geteuid(), 0):  # root may do all a front door could let it do anyway
        return f"it belongs to uid {uid}, not to this node's ({os.geteuid()})"
    return None


# --- the server --------------------------------------------------------------------------------

class _Dropped(Exception):
    """The client is closed; the message says why (one log line)."""


class _Unreachable(Exception):
    """The destination could not be had; ``kind`` is a key of SOCKS_REPLIES and HTTP_STATUSES."""

    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(reason)
        self.kind = kind


_T = TypeVar("_T", bound=Tuple[Any, ...])


class _Client:
    """A client's socket and what was read from it and not used yet."""

    def __init__(self, sock: Any, peer: Tuple[str, int], label: str) -> None:
        self.sock = sock
        self.peer = peer
        self.label = label
        self.buffer = bytearray()
        self.local = False  # on loopback, so that its socket is in this host's tables

    def read(self, parse: Callable[[bytes], Optional[_T]]) -> _T:
        """Read until ``parse`` (a codec function returning ``(..., consumed)``) has a message;
        the bytes it took are dropped from the buffer. Raises _Dropped at EOF, and what
        ``parse`` raises."""
        while True:
            got = parse(bytes(self.buffer))
            if got is not None:
                del self.buffer[:got[-1]]  # every parser returns (..., consumed)
                return got
            data = self.sock.recv(HANDSHAKE_RECV_BYTES)
            if not data:
                raise _Dropped("closed by the client before its request was complete")
            self.buffer += data

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def take(self) -> bytes:
        data = bytes(self.buffer)
        self.buffer.clear()
        return data


class FrontDoor:
    """A SOCKS5 and HTTP proxy port in front of ``node``; see the module docstring.

    ``address``: where to listen (``HOST:PORT`` or an Address; port 0: the kernel picks).
    ``users``: username -> password, for clients that must authenticate (not on loopback, or of
    another local user); ``require_auth``: loopback clients too. ``pass_through``: destinations
    outside the grid are reached by a plain connection (else refused). ``allow_other_users``:
    loopback clients of other local users go without credentials too. ``handshake_timeout`` and
    ``connect_timeout`` are in seconds; ``max_clients`` bounds the clients served at once.
    """

    def __init__(self, node: Any, address: Union[str, Address] = DEFAULT_ADDRESS, *,
                 users: Optional[Mapping[str, str]] = None, require_auth: bool = False,
                 pass_through: bool = True, allow_other_users: bool = False,
                 handshake_timeout: float = HANDSHAKE_TIMEOUT_S, connect_timeout: float = CONNECT_TIMEOUT_S,
                 max_clients: int = MAX_CLIENTS) -> None:
        self.node = node
        self.listen_address = parse_address(address) if isinstance(address, str) else address
        if self.listen_address.is_unix:
            raise ConfigError(f"the front door listens on TCP, not {self.listen_address}")
        self.users: Dict[bytes, bytes] = {user.encode(): password.encode() for user, password in (users or {}).items()}
        if any(not 0 < len(u) < 256 or len(p) > 255 for u, p in self.users.items()):
            raise ConfigError("front door usernames take 1 to 255 bytes, passwords at most 255 (RFC 1929)")
        self.require_auth = require_auth
        self.pass_through = pass_through
        self.allow_other_users = allow_other_users
        self.handshake_timeout = handshake_timeout
        self.connect_timeout = connect_timeout
        self.max_clients = max_clients
        self._sock: Any = None
        self._bound: Optional[Address] = None
        self._server: Optional[gevent.Greenlet] = None
        self._clients: Set[gevent.Greenlet] = set()
        self._bridges: "weakref.WeakSet[Bridge]" = weakref.WeakSet()
        # What clients make us log (drops), rate-limited per client host (gridsock._ratelog).
        self._client_log = RateLimitedLog(log)

    def __repr__(self) -> str:
        return f"<FrontDoor {self._bound or self.listen_address}>"

    @property
    def address(self) -> Address:
        """The bound address (the kernel's choice when the port was 0). RuntimeError before start()."""
        if self._bound is None:
            raise RuntimeError("the front door is not started")
        return self._bound

    def start(self) -> "FrontDoor":
        """Listen and serve in a greenlet; return self. Raises ConfigError if the address cannot be had."""
        self._sock = listen(self.listen_address)
        host, port = self._sock.getsockname()[:2]
        self._bound = Address(host=host, port=port)
        self._server = gevent.spawn(self._serve)
        self._server.name = f"front door {self.address}"
        if not ipaddress.ip_address(_normal_ip(host)).is_loopback and not self.users:
            log.warning("front door %s: no users configured, so only loopback clients of this user will be "
                        "served", self.address)
        log.info("front door of %s on %s (SOCKS5 and HTTP proxy)", getattr(self.node, "name", "?"), self.address)
        return self

    def stop(self) -> None:
        """Stop listening, drop the clients in their handshake and abort the connections made."""
        if self._server is not None:
            self._server.kill(block=False)
        if self._sock is not None:
            self._sock.close()
        for client in list(self._clients):
            client.kill(block=False)
        for bridge in list(self._bridges):
            bridge.close()

    def status(self) -> dict:
        """What the front door is doing: address, clients in their handshake, connections open."""
        return {"address": str(self.address), "handshaking": len(self._clients), "connections": self._open_bridges()}

    # --- accepting ---------------------------------------------------------------------------

    def _serve(self) -> None:
        listener = self._sock
        while True:
            try:
                sock, addr = listener.accept()
            except OSError as exc:
                if listener.fileno() == -1:  # closed by stop()
                    return
                log.warning("front door %s: accept failed: %s", self.address, exc)
                gevent.sleep(ACCEPT_ERROR_PAUSE_S)
                continue
            label = _label(addr)
            if len(self._clients) + self._open_bridges() >= self.max_clients:
                self._client_log.warning(str(addr[0]), "front door: dropped %s: %d clients already", label,
                                         self.max_clients)
                sock.close()
                continue
            greenlet = gevent.spawn(self._serve_client, sock, addr, label)
            self._clients.add(greenlet)
            greenlet.link(self._clients.discard)

    def _open_bridges(self) -> int:
        return sum(1 for bridge in list(self._bridges) if not bridge.closed)

    def _serve_client(self, sock: Any, addr: Tuple[str, int], label: str) -> None:
        client = _Client(sock, (addr[0], addr[1]), label)
        joined = False
        try:
            sock.setsockopt(gsocket.IPPROTO_TCP, gsocket.TCP_NODELAY, 1)
            client.local = ipaddress.ip_address(_normal_ip(addr[0])).is_loopback
            # (sock_diag answers in microseconds, within its system call; the fallback reads
            # the kernel's whole TCP table, milliseconds on a busy host, which the node's event
            # loop must not spend per client: in a worker thread.)
            trust = functools.partial(client_untrusted, addr, sock.getsockname(),
                                      allow_other_users=self.allow_other_users)
            why_untrusted = trust() if _diag_usable else gevent.get_hub().threadpool.apply(trust)
            if why_untrusted is None and self.require_auth:
                why_untrusted = "credentials are required from every client"
            deadline = time.monotonic() + self.handshake_timeout
            with self._handshake(deadline):
                first = client.read(lambda data: (data[0], 0) if data else None)[0]
            if first == SOCKS_VERSION:
                joined = self._socks(client, why_untrusted, deadline)
            else:
                joined = self._http(client, why_untrusted, deadline)
        except _Dropped as exc:
            self._client_log.info(str(addr[0]), "front door: dropped %s: %s", label, exc)
        except RemoteProtocolError as exc:
            self._client_log.info(str(addr[0]), "front door: dropped %s: protocol error: %s", label, exc)
        except OSError as exc:
            self._client_log.info(str(addr[0]), "front door: dropped %s: %s", label, exc)
        except Exception:  # a bug: this client only
            log.exception("front door: dropped %s", label)
        finally:
            if not joined:
                sock.close()

    # --- SOCKS5 ------------------------------------------------------------------------------

    def _handshake(self, deadline: float) -> gevent.Timeout:
        """The bound on reading a client's request: ``handshake_timeout`` from its arrival."""
        return gevent.Timeout(max(0.0, deadline - time.monotonic()),
                              _Dropped(f"no complete request within {self.handshake_timeout} s"))

    def _socks(self, client: _Client, why_untrusted: Optional[str], deadline: float) -> bool:
        with self._handshake(deadline):
            offered = self._read_socks(client, parse_socks_greeting)[0]
            if why_untrusted is None and METHOD_NO_AUTH in offered:
                method = METHOD_NO_AUTH
            elif METHOD_USERPASS in offered and (self.users or why_untrusted is None):
                method = METHOD_USERPASS
            else:
                client.send(bytes([SOCKS_VERSION, METHOD_NONE_ACCEPTABLE]))
                raise _Dropped(f"no acceptable authentication method (offered {offered.hex()}): "
                               f"{why_untrusted or 'no username/password method offered'}"
                               + ("" if self.users else "; no users configured"))
            client.send(bytes([SOCKS_VERSION, method]))
            if method == METHOD_USERPASS:
                user, password, _ = self._read_socks(client, parse_socks_userpass)
                ok = self._check(user, password) or (why_untrusted is None and not self.users)
                client.send(bytes([USERPASS_VERSION, 0 if ok else 1]))
                if not ok:
                    raise _Dropped(f"bad username or password (user {user[:64]!r})")
            request = self._read_socks(client, parse_socks_request)[0]
        if request.command != CMD_CONNECT:
            client.send(encode_socks_reply(REP_COMMAND_NOT_SUPPORTED))
            raise _Dropped(f"SOCKS5 command {request.command} not supported (CONNECT only)")
        try:
            stream, bound, info = self._open(request.host, request.port)
        except _Unreachable as exc:
            client.send(encode_socks_reply(SOCKS_REPLIES[exc.kind]))
            raise _Dropped(f"{request.host}:{request.port}: {exc}") from None
        return self._join(client, stream, info, encode_socks_reply(REP_SUCCEEDED, *bound), b"",
                          f"socks5 {request.host}:{request.port}")

    def _read_socks(self, client: _Client, parse: Callable[[bytes], Optional[_T]]) -> _T:
        try:
            return client.read(parse)
        except SocksProtocolError as exc:
            if exc.reply:
                client.send(exc.reply)
            raise

    def _check(self, user: bytes, password: bytes) -> bool:
        expected = self.users.get(user)
        # compare_digest: no timing tells how much of a password was right
        return expected is not None and hmac.compare_digest(expected, password)

    # --- HTTP --------------------------------------------------------------------------------

    def _http(self, client: _Client, why_untrusted: Optional[str], deadline: float) -> bool:
        with self._handshake(deadline):
            try:
                request = client.read(parse_http_head)[0]
            except HttpProtocolError as exc:
                client.send(http_response(exc.status, str(exc)))
                raise
        try:
            if why_untrusted is not None:
                self._http_auth(client, request, why_untrusted)
            if request.method == "CONNECT":
                host, port = split_host_port(request.target, None)
                path = ""
            elif request.target[:7].lower() == "http://":
                authority, path = _absolute_http(request.target)
                host, port = split_host_port(authority, 80)
            elif request.target.startswith(("/", "*")):
                raise HttpProtocolError(f"{request.method} {request.target[:80]}: a proxy needs an absolute "
                                        "http:// URL or CONNECT")
            else:
                raise HttpProtocolError(f"{request.target[:80]}: only http:// URLs are forwarded (CONNECT for the rest)")
        except HttpProtocolError as exc:
            client.send(http_response(exc.status, str(exc)))
            raise
        what = f"{request.method} {host}:{port}"
        try:
            stream, _, info = self._open(host, port)
        except _Unreachable as exc:
            client.send(http_response(HTTP_STATUSES[exc.kind], f"{host}:{port}: {exc}"))
            raise _Dropped(f"{what}: {exc}") from None
        if request.method == "CONNECT":
            return self._join(client, stream, info, b"HTTP/1.1 200 Connection established\r\n\r\n", b"", f"http {what}")
        authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        head = origin_request(request, authority if port != 80 else authority.rpartition(":")[0], path)
        return self._join(client, _ClosingResponses(stream), info, b"", head, f"http {what}")

    def _http_auth(self, client: _Client, request: HttpRequest, why_untrusted: str) -> None:
        if not self.users:
            client.send(http_response(403, f"this client must authenticate ({why_untrusted}), "
                                           "and no users are configured"))
            raise _Dropped(f"{why_untrusted}; no users configured")
        scheme, _, encoded = (request.header("Proxy-Authorization") or "").strip().partition(" ")
        try:
            user, _, password = base64.b64decode(encoded.strip(), validate=True).partition(b":")
        except (binascii.Error, ValueError):
            user = password = b""
        if scheme.lower() != "basic" or not self._check(user, password):
            client.send(http_response(407, "proxy authentication required",
                                      ('Proxy-Authenticate: Basic realm="gridsock"',)))
            raise _Dropped(f"{why_untrusted}; " + ("bad username or password" if scheme else "no credentials"))

    # --- destinations ------------------------------------------------------------------------

    def _resolve(self, host: str) -> Any:
        """The directory entry of the node ``host`` names (a node name, ``NAME.grid``, a node id or
        a grid address), or None if it names no node and may go elsewhere. Raises _Unreachable for
        a ``.grid`` name or grid address the grid does not know."""
        forced = grid_name(host)
        target = forced if forced is not None else host
        directory = self.node.directory
        if is_grid_ip(target):
            matches = [e for e in directory if grid_ip(e.node_id) == target]
            if len(matches) != 1:
                raise _Unreachable("host-unreachable", f"grid address {target} is "
                                   + ("no node's" if not matches else "shared by " + ", ".join(e.name for e in matches)))
            return matches[0]
        entry = directory.resolve(target)
        if entry is None and forced is not None:
            raise _Unreachable("host-unreachable", f"no node {forced!r} in the grid of {self.node.name}")
        return entry

    def _open(self, host: str, port: int) -> Tuple[Stream, Tuple[str, int], Optional[ConnectionInfo]]:
        """A stream to ``host:port``: the grid's, or a plain connection; the address to give as
        bound; the grid connection's record (None for a plain one). Raises _Unreachable."""
        if not 0 < port < 65536:
            raise _Unreachable("failure", f"bad port {port}")
        entry = self._resolve(host)
        if entry is not None:
            try:
                stream, info = self.node.open_stream(entry.node_id, port, timeout=self.connect_timeout)
            except ConnectError as exc:
                code = errno_of(exc)
                kind = {errno.ECONNREFUSED: "refused", errno.ETIMEDOUT: "timeout"}.get(code, "host-unreachable")
                raise _Unreachable(kind, str(exc)) from exc
            except GridsockError as exc:
                raise _Unreachable("failure", str(exc)) from exc
            return stream, (grid_ip(entry.node_id), port), info
        if not self.pass_through:
            raise _Unreachable("not-allowed", f"{host} is no node of the grid, and passing through is off")
        try:
            host.encode("idna")  # (what the resolver does first: a label over 63 bytes, or empty, fails here)
        except UnicodeError as exc:
            raise _Unreachable("host-unreachable", f"cannot resolve {host[:80]!r}: {exc}") from None
        try:
            sock = gsocket.create_connection((host, port), timeout=self.connect_timeout)
        except socket.gaierror as exc:
            raise _Unreachable("host-unreachable", f"cannot resolve {host}: {exc.strerror or exc}") from exc
        except socket.timeout as exc:
            raise _Unreachable("timeout", f"no answer within {self.connect_timeout} s") from exc
        except OSError as exc:
            kind = {errno.ECONNREFUSED: "refused", errno.ENETUNREACH: "network-unreachable",
                    errno.EHOSTUNREACH: "host-unreachable", errno.ETIMEDOUT: "timeout"}.get(exc.errno or 0, "failure")
            raise _Unreachable(kind, exc.strerror or str(exc)) from exc
        sock.settimeout(None)
        sock.setsockopt(gsocket.IPPROTO_TCP, gsocket.TCP_NODELAY, 1)
        bound = sock.getsockname()[:2]
        return SocketStream(sock, info={"stack": "pass-through", "peer": f"{host}:{port}"}), (bound[0], bound[1]), None

    def _join(self, client: _Client, stream: Stream, info: Optional[ConnectionInfo], reply: bytes, first: bytes,
              what: str) -> bool:
        """Answer the client, send ``first`` and what the client sent early on the stream, and
        bridge the two. Returns True once the bridge owns the client's socket; closes the
        stream and raises _Dropped if either side went away first."""
        # Which program it is (for gridsock status), looked up in a worker thread before the
        # client hears back, so that the connection is listed whole once it is in use.
        pid = (gevent.get_hub().threadpool.apply(socket_pid, (client.peer, client.sock.getsockname()))
               if info is not None and client.local else None)
        try:
            if reply:
                client.send(reply)
            early = first + client.take()
            if early:
                stream.send_all(early)
        except (OSError, GridsockError) as exc:
            stream.close()
            raise _Dropped(f"{what}: gone before the connection was joined: {exc}") from None
        bridge = Bridge(stream, client.sock, client.sock.fileno(), f"front door {client.label} {what}")
        self._bridges.add(bridge)
        if info is not None:
            info.detail["front_door"] = f"{what} from {client.label}"
            self.node.assembler.hand_over(info, None, pid, bridge=bridge)  # listed until the bridge ends
        log.debug("front door: %s from %s joined", what, client.label)
        return True


def _label(addr: Any) -> str:
    if isinstance(addr, tuple) and len(addr) >= 2:
        return f"[{addr[0]}]:{addr[1]}" if ":" in str(addr[0]) else f"{addr[0]}:{addr[1]}"
    return str(addr)
