"""gridsock: sockets that reach every node of a computing grid, whatever sits between them."""
from __future__ import annotations

__version__ = "0.1.0"

from .errors import (
    AuthError,
    BrokenStreamError,
    ConfigError,
    ConnectError,
    ConnectRefusedError,
    ConnectTimeoutError,
    GridsockError,
    LocalProtocolError,
    LoopEndedError,
    ProtocolError,
    RemoteProtocolError,
    RoutingError,
    UnknownComponentError,
)

__all__ = [
    "__version__",
    "AuthError",
    "BrokenStreamError",
    "ConfigError",
    "ConnectError",
    "ConnectRefusedError",
    "ConnectTimeoutError",
    "GridsockError",
    "LocalProtocolError",
    "LoopEndedError",
    "ProtocolError",
    "RemoteProtocolError",
    "RoutingError",
    "UnknownComponentError",
]
