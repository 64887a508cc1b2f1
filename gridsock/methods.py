"""The method interface: a component that makes data connections, both halves of it.

Theory of operation
-------------------
A *method* is the bottom of a stack (``tcp``, ``reverse``, ``splice``, ``socks``, ``ssh``,
``relay``, a third party's): it makes the connection the filters above wrap. Assembly
(:mod:`gridsock.assembly`) drives every method the same way and knows none by name:

Initiator (the connecting node), for one candidate of a race::

    initiation = method.initiate(ctx)         # ctx: InitiatorContext; may start dialing now
    request.offer = initiation.offer          # the method's fields in the assembly request
    ... the request travels; the answer (AssemblyAccept.answer) comes back ...
    lower = initiation.complete(answer)       # the method's connected Stream (not nominated)
    initiation.abort()                        # instead, on any failure or a lost race

Responder (the node that listens), for a request that passed the checks (a listener, the
stack, the policy, a fresh token)::

    answer = method.respond(ctx)              # ctx: ResponderContext; the reply's fields
    ... later, in its own greenlet: ctx.deliver(lower)

``respond`` returns quickly; it raises :class:`MethodRefusal` (with a code of
:data:`gridsock.wire.REFUSAL_CODES`) when the method cannot serve this client (``unreachable``
lets the client try its next candidate), or RemoteProtocolError when the offer is malformed.
Once its connection is there, the responder calls ``ctx.deliver(lower)``, which waits for the
client's nomination, builds the filters and queues the connection on the listener (and closes
``lower`` if it is not nominated): a method never touches filters or listeners.

Connections that arrive on a node port (the ``tcp`` family dials the server's, ``reverse``
the client's) start with the preamble of :func:`gridsock.wire.encode_preamble`: token and
index. Either side says it awaits them with ``ctx.expect(count)``, which returns an
:class:`Arrival`; the node port hands each connection whose token matches to it.

A *method wrapper* (``parallel``) sits right above a method in the stack string
(``parallel(streams=4)/tcp``) and has ``wraps_method = True``: the assembly calls
``wrapper.over(method)``, and the result is driven as a method. Third parties register methods
like filters: the entry-point group ``gridsock.components`` (:mod:`gridsock.registry`).
"""
from __future__ import annotations

import dataclasses
import time
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Dict, List, Optional

import gevent.event

from . import wire
from .errors import ConnectError, GridsockError

if TYPE_CHECKING:
    from .streams import Stream

__all__ = [
    "Method",
    "Initiation",
    "InitiatorContext",
    "ResponderContext",
    "Arrival",
    "MethodRefusal",
    "DIAL_TIMEOUT_S",
]

# One dial of one address by a method (tcp, socks, ssh...): a firewall that drops SYNs silently
# costs this long, not the whole connect's budget.
DIAL_TIMEOUT_S = 5.0


class MethodRefusal(GridsockError):
    """A responder cannot serve this request: ``code`` (of :data:`gridsock.wire.REFUSAL_CODES`)
    and ``reason`` go back to the client in an ``AssemblyRefuse``."""

    def __init__(self, code: str, reason: str) -> None:
        if code not in wire.REFUSAL_CODES:
            raise ValueError(f"unknown refusal code {code!r}")
        super().__init__(reason)
        self.code = code
        self.reason = reason

    def __reduce__(self):
        return (type(self), (self.code, self.reason))


class Arrival:
    """Connections awaited on a node port for one token: ``count`` of them, by index.

    Made by ``ctx.expect()``. :meth:`wait` returns the sockets, in index order, once all have
    arrived; :meth:`cancel` closes what came and makes a late arrival be refused at once.
    """

    def __init__(self, token: bytes, count: int, on_done: Callable[["Arrival", str], None]) -> None:
        self.token = token
        self.socks: List[Any] = [None] * count
        self._all = gevent.event.Event()
        self._done = False
        self._cancelled = False
        self._on_done = on_done

    @property
    def done(self) -> bool:
        return self._done

    def put(self, index: int, sock) -> None:
        """The node port's side: connection ``index`` arrived. RemoteProtocolError if it is
        out of range or a repeat (the caller closes ``sock`` then)."""
        from .errors import RemoteProtocolError

        if self._done:
            raise RemoteProtocolError("the token's connections are no longer awaited")
        if index >= len(self.socks) or self.socks[index] is not None:
            raise RemoteProtocolError(f"bad or repeated sub-connection index {index}")
        self.socks[index] = sock
        if all(s is not None for s in self.socks):
            self._all.set()

    def wait(self, timeout: Optional[float]) -> List[Any]:
        """All the connections, in index order; TimeoutError (after cancelling) if they are not
        all there within ``timeout`` seconds."""
        if not self._all.wait(timeout):
            self.cancel()
            raise TimeoutError(f"{sum(s is not None for s in self.socks)} of {len(self.socks)} connections "
                               f"arrived within {timeout:g} s")
        if self._cancelled:
            raise TimeoutError("cancelled while waiting (the node stops)")
        self._finish("used")
        return list(self.socks)

    def cancel(self) -> None:
        """Stop waiting: close what arrived; a later arrival with this token is refused."""
        if self._done:
            return
        self._cancelled = True
        self._finish("cancelled")
        for sock in self.socks:
            if sock is not None:
                sock.close()
        self._all.set()  # (a waiter ends at once)

    def _finish(self, why: str) -> None:
        if not self._done:
            self._done = True
            self._on_done(self, why)


@dataclasses.dataclass
class InitiatorContext:
    """What a method's initiator knows: this node, the peer, the token and the deadline.

    ``node`` is the :class:`gridsock.node.Node` (its ``directory``, ``relay``, ``session``,
    ``ssh_key``...); ``expect(count)`` awaits connections with this token on *our* node port.
    ``port`` and ``stack`` are the request's grid port and whole stack (a
    :class:`gridsock.stack.Stack`), for a wrapper that makes connections again later
    (``resume``); 0 and None where no assembler made the context.
    """

    node: Any
    me: wire.NodeEntry
    peer: wire.NodeEntry
    token: bytes
    deadline: float
    expect: Callable[[int], Arrival]
    port: int = 0
    stack: Any = None
    #: The connection is the connect's only candidate: an initiation whose stream is the one
    #: connection it dials may send the nomination right behind the preamble, in the same
    #: packet, rather than once the answer came (it says so: :attr:`Initiation.nominated`).
    nominate_early: bool = False

    def remaining(self, floor: float = 0.1) -> float:
        """Seconds left before the deadline (at least ``floor``)."""
        return max(floor, self.deadline - time.monotonic())

    def fail(self, reason: str, *, method: str) -> ConnectError:
        """A ConnectError for this peer and method."""
        return ConnectError(reason, peer=self.peer.name, method=method)


@dataclasses.dataclass
class ResponderContext:
    """What a method's responder knows: this node, the client, the request; and what it may do:
    ``expect(count)`` connections with the token on our node port, ``deliver(lower)`` the
    method's connection (blocking: nomination, filters, the listener's queue)."""

    node: Any
    me: wire.NodeEntry
    client: wire.NodeEntry
    request: wire.AssemblyRequest
    expect: Callable[[int], Arrival]
    deliver: Callable[["Stream"], None]
    #: What a responder may spend making its connection before it answers (``reverse`` dials).
    request_timeout: float = 15.0
    #: Bytes a responder that makes the connection itself (``sends_first_bytes``) sends right
    #: after the preamble, in its first packet where it can: the server's first TLS flight.
    first_bytes: bytes = b""

    @property
    def token(self) -> bytes:
        return self.request.token_bytes

    @property
    def offer(self) -> Dict[str, Any]:
        return self.request.offer


class Initiation:
    """One initiator attempt of a method: see the module docstring.

    Subclasses set :attr:`offer` and implement :meth:`complete` and :meth:`abort`.
    """

    offer: Dict[str, Any] = {}
    #: The stream's nomination went already (see :attr:`InitiatorContext.nominate_early`).
    nominated: bool = False

    def complete(self, answer: Dict[str, Any]) -> "Stream":
        """The method's connected stream, once the server accepted with ``answer``.

        Raises ConnectError (RemoteProtocolError for a malformed answer).
        """
        raise NotImplementedError

    def abort(self) -> None:
        """Close whatever this attempt made (idempotent; also after complete())."""


class Method:
    """Base class of methods (a third party may also write the same attributes from scratch)."""

    name: ClassVar[str]
    kind: ClassVar[str] = "method"
    PARAMS: ClassVar[Dict[str, type]] = {}
    LIMITS: ClassVar[Dict[str, tuple]] = {}
    #: True for methods whose connections go to the server's node port with the preamble (so a
    #: method wrapper such as ``parallel`` can ask for several: :meth:`dial_node_port`).
    dials_node_port: ClassVar[bool] = False

    def __init__(self, **params: Any) -> None:
        self.params = params

    def initiate(self, ctx: InitiatorContext) -> Initiation:
        """Start an attempt; raise ConnectError if this method cannot work for ``ctx.peer``."""
        raise NotImplementedError

    def respond(self, ctx: ResponderContext) -> Dict[str, Any]:
        """Serve an accepted request; return the answer's fields. Raises MethodRefusal."""
        raise NotImplementedError

    def __str__(self) -> str:
        return self.name
