"""The ``ssh`` method: TCP to the peer's node port through an SSH gateway (``direct-tcpip``).

``ssh(gateway=USER@HOST:PORT)`` reaches a node through an OpenSSH server that can reach it (a
cluster's front-end). The gateway's host key is checked against the node's known_hosts and the
node's key is used to log in (``gridsock node --ssh-key --ssh-known-hosts``); one SSH transport
per gateway carries every channel (:mod:`gridsock.bootstrap.sshtunnel`).
"""
from __future__ import annotations

from ..bootstrap.sshtunnel import SSHGateway, open_ssh_tunnel
from ..bootstrap.transport import Address
from ..errors import ConfigError, ConnectError
from .tcp import CONNECT_TIMEOUT_S, TcpMethod

__all__ = ["SshMethod"]


class SshMethod(TcpMethod):
    """``ssh(gateway=USER@HOST:PORT)``: dial through an SSH gateway."""

    name = "ssh"
    PARAMS = {"gateway": str}
    tier = "gateway"  # ranked after direct methods, before relay (gridsock.rules.tier)

    def __init__(self, gateway: str | None = None, **params) -> None:
        super().__init__(**params)
        if not gateway:
            raise ConfigError("ssh needs a gateway: ssh(gateway=USER@HOST:PORT)")
        self.gateway_spec = gateway

    def explain(self, ctx, exc: ConnectError) -> ConnectError:
        return exc  # the gateway's own reason says it all: the directory's dial-back facts do not apply

    def dial(self, address: Address, *, node, timeout: float = CONNECT_TIMEOUT_S):
        if address.is_unix or address.host is None:
            raise ConnectError("an SSH gateway cannot reach a Unix socket here", method="ssh")
        gateway = SSHGateway.parse(self.gateway_spec, key_filename=node.ssh_key, known_hosts=node.ssh_known_hosts)
        try:
            return open_ssh_tunnel(gateway, address.host, address.port, timeout=timeout)
        except OSError as exc:  # the one foreign error open_ssh_tunnel lets through (socketpair)
            raise ConnectError(f"through SSH gateway {gateway} to {address}: {exc}", method="ssh") from exc
