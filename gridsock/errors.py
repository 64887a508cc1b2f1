"""The one error hierarchy of gridsock.

Every exception the framework raises on purpose derives from :class:`GridsockError`.
Foreign exceptions (``OSError``, ``ssl.SSLError``, ``paramiko.SSHException``...) are
translated once, at the boundary where they happen, with ``raise ... from exc``.
Errors carry structured attributes; callers never match on message text.
All errors pickle, so they can cross process boundaries.
"""
from __future__ import annotations

from typing import Any

__all__ = [
    "GridsockError",
    "ConfigError",
    "UnknownComponentError",
    "ProtocolError",
    "LocalProtocolError",
    "RemoteProtocolError",
    "ConnectError",
    "ConnectRefusedError",
    "AuthError",
    "ConnectTimeoutError",
    "BrokenStreamError",
    "RoutingError",
    "LoopEndedError",
]


class GridsockError(Exception):
    """Base class of every gridsock error."""


class ConfigError(GridsockError, ValueError):
    """A bad stack string, rule, command-line option or session file."""


class UnknownComponentError(ConfigError):
    """A stack names a component no registry entry has; ``suggestion`` is a close known name."""

    def __init__(self, msg: str, name: str | None = None, suggestion: str | None = None) -> None:
        super().__init__(msg)
        self.name = name
        self.suggestion = suggestion

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.args[0], self.name, self.suggestion))


class ProtocolError(GridsockError):
    """The bootstrap/meta protocol was broken; ``peer`` says by whom, when known."""

    def __init__(self, msg: str, peer: str | None = None) -> None:
        super().__init__(msg)
        self.peer = peer

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.args[0], self.peer))


class LocalProtocolError(ProtocolError):
    """We broke the protocol: a bug in gridsock."""


class RemoteProtocolError(ProtocolError):
    """The peer broke the protocol (bad input): drop that peer and log why."""


class ConnectError(GridsockError, ConnectionError):
    """A connection could not be made.

    ``peer`` is who we tried to reach, ``method`` the method that failed last, and
    ``tried`` a list of ``(method, reason)`` pairs: everything attempted and why it failed.
    ``code`` is the server's refusal code when the server refused (one of
    :data:`gridsock.wire.REFUSAL_CODES`; ``unreachable`` means its side of the method failed,
    any other that no method would do), None when no server refused.
    """

    def __init__(
        self,
        msg: str,
        peer: str | None = None,
        method: str | None = None,
        tried: list[tuple[str, str]] | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(msg)
        self.peer = peer
        self.method = method
        self.tried = list(tried or [])
        self.code = code

    def __str__(self) -> str:
        text = self.args[0] if self.args else ""
        if self.tried:
            text += " (tried: " + "; ".join(f"{m}: {why}" for m, why in self.tried) + ")"
        return text

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.args[0], self.peer, self.method, self.tried, self.code))


class ConnectRefusedError(ConnectError, ConnectionRefusedError):
    """The server refused the connection: ``code`` says why (``refused``: nothing listens on the
    port; ``policy``: its policy does not accept the stack; see :data:`gridsock.wire.REFUSAL_CODES`).
    No other method would change its answer, so none was tried after it.

    A ``ConnectError`` (and so a ``ConnectionError``), and a ``ConnectionRefusedError`` as a
    refused TCP connect would raise.
    """


class ConnectTimeoutError(ConnectError, TimeoutError):
    """A connection could not be made in time: every attempt timed out (a dial whose SYN went
    unanswered, a connect's deadline). A program gets ``ETIMEDOUT`` for it."""


class AuthError(ConnectError):
    """The peer is not in this session: bad or missing certificate or join token."""


class BrokenStreamError(GridsockError, ConnectionError):
    """A stream or link broke while in use."""


class RoutingError(GridsockError):
    """A routed message could not be delivered (unknown destination, too many hops...)."""

    def __init__(self, msg: str, dst: str | None = None) -> None:
        super().__init__(msg)
        self.dst = dst

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.args[0], self.dst))


class LoopEndedError(GridsockError):
    """The node's thread has ended (the node was stopped): the call was not run."""
