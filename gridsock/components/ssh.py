"""The ``ssh`` method: a data connection through an SSH gateway, either way.

``ssh(gateway=USER@HOST:PORT)`` is the client's way in: the client logs in to an OpenSSH server
that can reach the server node (a cluster's front-end) and dials the server's node port through
it (``direct-tcpip``). The gateway's host key is checked against the node's known_hosts and the
node's key is used to log in (``gridsock node --ssh-key --ssh-known-hosts``); one SSH transport
per gateway carries every channel (:mod:`gridsock.bootstrap.sshtunnel`).

``ssh(remote=USER@HOST:PORT, bind=ADDRESS)`` is the server's way out, for a server inside a
cluster that must accept from outside and a client that has no login on the server's gateway:
the *server* asks its own gateway for a one-use remote forward (``tcpip-forward``, port chosen
by sshd, on ``bind``, an address of the gateway that the client can reach), answers the request
with that port, and the client dials ``bind:port`` directly, preamble first; the gateway sends
the connection back to the server over the server's kept SSH transport
(:func:`gridsock.bootstrap.sshforward.open_remote_listener`), which checks the preamble's token
and delivers it, then cancels the forward. The server uses only a gateway it was given itself
(its ``--ssh-gateway``, or a gateway of its directory entry or its leader's: the node's
``gateways_of``), never one a client names otherwise: a client cannot make a server log in
anywhere. The gateway's sshd needs ``AllowTcpForwarding yes`` (or ``remote``) and, for an
address other than loopback, ``GatewayPorts clientspecified``.
"""
from __future__ import annotations

import ipaddress
import logging
import time
from typing import Any, Dict, Optional

import gevent

from .. import wire
from ..bootstrap.sshforward import RemoteListener, open_remote_listener
from ..bootstrap.sshtunnel import SSHGateway, open_ssh_tunnel
from ..bootstrap.transport import Address, dial
from ..errors import ConfigError, ConnectError, RemoteProtocolError
from ..methods import Initiation, InitiatorContext, MethodRefusal, ResponderContext
from ..session import format_hostport
from ..streams import SocketStream, Stream
from .tcp import CONNECT_TIMEOUT_S, MATCH_TIMEOUT_S, TcpMethod, dial_with_preamble, recv_exactly

__all__ = ["SshMethod"]

log = logging.getLogger(__name__)

# Bind addresses that name no one address the client could dial.
_WILDCARDS = ("", "*", "0.0.0.0", "::", "localhost")


class _ForwardedInitiation(Initiation):
    """The client of ``ssh(remote=...)``: dial the port the server's answer names."""

    def __init__(self, method: "SshMethod", ctx: InitiatorContext) -> None:
        self.offer: Dict[str, Any] = {}
        self._method = method
        self._ctx = ctx
        self._sock: Any = None

    def complete(self, answer: Dict[str, Any]) -> Stream:
        ctx, method = self._ctx, self._method
        port = answer.get("port")
        if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
            raise RemoteProtocolError(f"ssh(remote=...): bad port {port!r} in {ctx.peer.name}'s answer", peer=ctx.peer.name)
        address = format_hostport(method.bind or "", port)
        try:
            self._sock = dial_with_preamble(lambda a, node, timeout: dial(a, timeout=timeout), [address], ctx.token,
                                            timeout=ctx.remaining(), method=method.name, node=ctx.node)
        except ConnectError as exc:
            raise ctx.fail(f"{ctx.peer.name}'s forward on {method.remote} ({address}): {exc.args[0]}",
                           method=method.name) from exc
        sock, self._sock = self._sock, None
        return SocketStream(sock, info={"method": method.name, "via": method.layer})

    def abort(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


class SshMethod(TcpMethod):
    """``ssh(gateway=USER@HOST:PORT)`` (the client's gateway) or ``ssh(remote=USER@HOST:PORT,
    bind=ADDRESS)`` (a forward on the server's gateway); see the module docstring."""

    name = "ssh"
    PARAMS = {"gateway": str, "remote": str, "bind": str}
    tier = "gateway"  # ranked after direct methods, before relay (gridsock.rules.tier)

    def __init__(self, gateway: str | None = None, remote: str | None = None, bind: str | None = None,
                 **params) -> None:
        super().__init__(**params)
        if (gateway is None) == (remote is None):
            raise ConfigError("ssh needs a gateway: ssh(gateway=USER@HOST:PORT), the client's, or "
                              "ssh(remote=USER@HOST:PORT, bind=ADDRESS), a forward on the server's")
        if remote is not None:
            SSHGateway.parse(remote)  # (ConfigError now, not at the first connection)
            if bind is None or bind in _WILDCARDS:
                raise ConfigError(f"ssh(remote=...) needs bind=ADDRESS, one address of the gateway that the "
                                  f"client dials, not {bind!r}")
            try:
                ipaddress.ip_address(bind)
            except ValueError:
                raise ConfigError(f"ssh(remote=...): bind={bind!r} is not an IP address") from None
        elif bind is not None:
            raise ConfigError("ssh(bind=...) goes with remote=..., not gateway=...")
        self.gateway_spec = gateway
        self.remote = remote
        self.bind = bind

    @property
    def layer(self) -> str:
        """This method as a stack layer (its parameters in canonical order)."""
        if self.remote is not None:
            return f"ssh(bind={self.bind},remote={self.remote})"
        return f"ssh(gateway={self.gateway_spec})"

    def explain(self, ctx, exc: ConnectError) -> ConnectError:
        return exc  # the gateway's own reason says it all: the directory's dial-back facts do not apply

    def dial(self, address: Address, *, node, timeout: float = CONNECT_TIMEOUT_S):
        if self.gateway_spec is None:
            raise ConnectError("ssh(remote=...) connections are dialed by the server's answer", method="ssh")
        if address.is_unix or address.host is None:
            raise ConnectError("an SSH gateway cannot reach a Unix socket here", method="ssh")
        gateway = SSHGateway.parse(self.gateway_spec, key_filename=node.ssh_key, known_hosts=node.ssh_known_hosts)
        try:
            return open_ssh_tunnel(gateway, address.host, address.port, timeout=timeout)
        except OSError as exc:  # the one foreign error open_ssh_tunnel lets through (socketpair)
            raise ConnectError(f"through SSH gateway {gateway} to {address}: {exc}", method="ssh") from exc

    # --- ssh(remote=...) --------------------------------------------------------------------

    def initiate(self, ctx: InitiatorContext) -> Initiation:
        if self.remote is None:
            return super().initiate(ctx)
        return _ForwardedInitiation(self, ctx)

    def respond(self, ctx: ResponderContext) -> Dict[str, Any]:
        if self.remote is None:
            return super().respond(ctx)
        gateway = self._own_gateway(ctx)
        try:
            listener = open_remote_listener(gateway, self.bind or "", timeout=ctx.request_timeout)
        except (ConnectError, ConfigError) as exc:  # (AuthError is a ConnectError)
            raise MethodRefusal("unreachable", f"{ctx.me.name} cannot open a forward on {gateway}: {exc}") from None
        gevent.spawn(self._serve, ctx, listener)
        return {"port": listener.port}

    def _own_gateway(self, ctx: ResponderContext) -> SSHGateway:
        """The server's own gateway that ``remote`` names, with the server's credentials;
        MethodRefusal if it has none such."""
        from ..rules import gateways_of
        from ..stack import Stack

        node = ctx.node
        wanted = SSHGateway.parse(self.remote or "")
        for text in gateways_of(node):
            try:
                layer = Stack.parse(text).method
            except ConfigError:
                continue
            spec = dict(layer.params).get("gateway") if layer.name == "ssh" else None
            if isinstance(spec, str):
                try:
                    own = SSHGateway.parse(spec)
                except ConfigError:
                    continue
                if (own.host, own.port, own.user) == (wanted.host, wanted.port, wanted.user):
                    return SSHGateway(own.host, own.port, user=own.user, key_filename=node.ssh_key,
                                      known_hosts=node.ssh_known_hosts)
        raise MethodRefusal("unavailable", f"{wanted} is not an SSH gateway of {ctx.me.name}: a server opens "
                                           "forwards only on its own gateways")

    def _serve(self, ctx: ResponderContext, listener: RemoteListener) -> None:
        """The responder's greenlet: the client's connection through the forward (one with the
        request's token: anyone who reaches the port may connect), delivered; the forward
        cancelled whatever happens."""
        deadline = time.monotonic() + MATCH_TIMEOUT_S
        try:
            while True:
                sock = None
                try:
                    sock, origin = listener.accept(max(0.0, deadline - time.monotonic()))
                    with gevent.Timeout(max(0.1, deadline - time.monotonic()), TimeoutError("no preamble")):
                        preamble = wire.decode_preamble(recv_exactly(sock, wire.PREAMBLE_BYTES), peer=ctx.client.name)
                except (TimeoutError, ConnectError, RemoteProtocolError, OSError) as exc:
                    if sock is not None:
                        sock.close()
                    if time.monotonic() < deadline and isinstance(exc, (RemoteProtocolError, OSError)) \
                            and not isinstance(exc, (TimeoutError, ConnectError)):
                        continue  # someone else's connection: wait on for the client's
                    log.info("node %s: ssh(remote) connection from %s for port %d: %s", ctx.me.name,
                             ctx.client.name, ctx.request.port, exc)
                    return
                if preamble is not None and preamble.token == ctx.token and preamble.index == 0:
                    break
                log.warning("node %s: a connection through %s from %s:%d has another token: closed",
                            ctx.me.name, listener.gateway, *origin)
                sock.close()
        finally:
            listener.close()
        ctx.deliver(SocketStream(sock, info={"method": self.name, "via": self.layer}))
