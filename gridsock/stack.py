"""Stack strings: ``"tls/lz4/tcp"`` names the layers of a connection, top first.

Theory of operation
-------------------
A stack string lists layers from the top (nearest the application) to the bottom; the bottom
layer is the one *method* (it opens and accepts connections: ``tcp``, ``relay``...), every layer
above it a *filter* (it wraps the stream below: ``tls``, ``lz4``...). A layer may carry parameters
in parentheses: ``"parallel(streams=4)/tcp"``, ``"adoc(min_level=1,max_level=6)/relay"``.

Grammar (EBNF; blanks -- spaces and tabs -- may separate any two tokens)::

    stack  = layer , { "/" , layer } ;
    layer  = name , [ "(" , [ param , { "," , param } ] , ")" ] ;
    param  = name , "=" , value ;
    name   = lower , { lower | digit | "_" } ;
    value  = valuechar , { valuechar } ;
    valuechar = letter | digit | "_" | "." | "-" | "+" | ":" | "@" ;

A value is typed by the component's parameter schema: ``int`` (``[+-]digits``), ``float`` (a
decimal or exponent literal, finite), ``bool`` (``true`` or ``false``) or ``str`` (the bare word).

:meth:`Stack.parse` validates everything before any I/O, against a
:class:`~gridsock.registry.Registry` (the default one unless told): known names, one method at
the bottom, filters above it, no layer twice, known parameters of the right type and within the
component's limits, no parameter twice, and the size limits below. Every failure raises
:class:`~gridsock.errors.ConfigError` (:class:`~gridsock.registry.UnknownComponentError` for an
unknown name, with a "did you mean") quoting the text and the 0-based position of the fault.

``str(stack)`` is the canonical form: no blanks, parameters sorted by name, values normalised
(``007`` -> ``7``, ``1`` -> ``1.0`` for a float); ``str(Stack.parse(s))`` parses back to an equal
``Stack``, and canonical strings are fixed points.

Parsing imports nothing but this module and the registry: the registry knows the kind and
parameters of the built-in components without importing them.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Dict, List, NoReturn, Optional, Tuple, Union

from .errors import ConfigError

if TYPE_CHECKING:  # session.py imports gevent.ssl and cryptography: not at parse time
    from .registry import Registry
    from .session import Identity, Session

__all__ = [
    "MAX_STACK_CHARS",
    "MAX_LAYERS",
    "MAX_PARAMS_PER_LAYER",
    "MAX_NAME_CHARS",
    "MAX_VALUE_CHARS",
    "PARAM_TYPES",
    "Layer",
    "Stack",
    "StackContext",
    "parse_filters",
    "format_value",
]

# A stack string comes from config files, rules and the meta channel (a peer's proposal): bound
# it so a hostile or broken one costs nothing to reject.
MAX_STACK_CHARS = 512
# Eight layers is already absurd (tls/adoc/parallel/relay is four); more is a mistake.
MAX_LAYERS = 8
# No component has more than a handful of knobs.
MAX_PARAMS_PER_LAYER = 16
# Component and parameter names are short identifiers.
MAX_NAME_CHARS = 32
# Values are numbers, booleans or short words (a node uuid is 36 characters).
MAX_VALUE_CHARS = 64

#: The types a parameter may have.
PARAM_TYPES = (int, float, bool, str)

_NAME_RE = re.compile(r"[a-z][a-z0-9_]*")
_VALUE_RE = re.compile(r"[A-Za-z0-9_.+\-:@]+")
_INT_RE = re.compile(r"[+-]?[0-9]+\Z")
_FLOAT_RE = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?\Z")
_BLANKS = " \t"

ParamValue = Union[int, float, bool, str]


def format_value(value: ParamValue) -> str:
    """Return the canonical text of a parameter value (``true``, ``7``, ``0.5``, ``word``)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    return str(value)


@dataclass(frozen=True)
class Layer:
    """One layer of a stack: a component name and its parameters, sorted by name."""

    name: str
    params: Tuple[Tuple[str, ParamValue], ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "params", tuple(sorted(tuple(p) for p in self.params)))

    @property
    def kwargs(self) -> Dict[str, ParamValue]:
        """The parameters as a dict, to call the component with."""
        return dict(self.params)

    def get(self, key: str, default: Any = None) -> Any:
        """Return parameter ``key``, or ``default`` when the stack string did not set it."""
        return dict(self.params).get(key, default)

    def __str__(self) -> str:
        if not self.params:
            return self.name
        inner = ",".join(f"{k}={format_value(v)}" for k, v in self.params)
        return f"{self.name}({inner})"


@dataclass(frozen=True)
class Stack:
    """A validated stack, top layer first; build one with :meth:`parse`."""

    layers: Tuple[Layer, ...]

    @classmethod
    def parse(cls, text: str, registry: Optional["Registry"] = None) -> "Stack":
        """Parse and validate a stack string (see the module docstring).

        Returns the :class:`Stack`. Raises ConfigError (UnknownComponentError for an unknown
        component name) naming the text and the position of the first fault.
        """
        layers = _Parser(text, _registry(registry)).parse(expect="stack")
        return cls(layers)

    @property
    def method(self) -> Layer:
        """The bottom layer: the method that carries the connection."""
        return self.layers[-1]

    @property
    def filters(self) -> Tuple[Layer, ...]:
        """The filter layers, top first (``tls``, ``lz4`` for ``"tls/lz4/tcp"``)."""
        return self.layers[:-1]

    def has(self, name: str) -> bool:
        """True if a layer of this stack is the component ``name``."""
        return any(layer.name == name for layer in self.layers)

    def over(self, method: Union[str, Layer], registry: Optional["Registry"] = None) -> "Stack":
        """The same filters over another method (``"tcp"``, ``"relay(...)"`` or a Layer).

        Returns a new validated Stack; raises ConfigError as :meth:`parse` does.
        """
        text = "/".join([*map(str, self.filters), str(method)])
        return Stack.parse(text, registry)

    def with_filters(self, *filters: Union[str, Layer], registry: Optional["Registry"] = None) -> "Stack":
        """This stack with more filters on top: ``Stack.parse("tcp").with_filters("tls", "lz4")``
        is ``tls/lz4/tcp``. Returns a new validated Stack; raises ConfigError as :meth:`parse`.
        """
        text = "/".join([*map(str, filters), str(self)])
        return Stack.parse(text, registry)

    def __str__(self) -> str:
        return "/".join(str(layer) for layer in self.layers)


def parse_filters(text: str, registry: Optional["Registry"] = None) -> Tuple[Layer, ...]:
    """Parse a chain of filters without a method (``"tls/lz4"``), top first.

    Returns the layers (an empty string gives ``()``); raises ConfigError as
    :meth:`Stack.parse` does, and if a layer is a method.
    """
    if text.strip(_BLANKS) == "":
        return ()
    return _Parser(text, _registry(registry)).parse(expect="filters")


@dataclass(frozen=True)
class StackContext:
    """What a filter may need to know about the connection it wraps.

    ``initiator`` is True on the side that opened the connection (the TLS client, say);
    ``session`` and ``identity`` (this node's certificate and key) are None outside a session;
    ``local_id`` is this node's id; ``peer_id`` the node id the other side must prove (None if
    any member of the session will do); ``peer_name`` a name for logs and errors;
    ``tls_early`` a TLS handshake begun with the assembly, which the ``tls`` filter right above
    the method continues (:class:`gridsock.components.tls.EarlyTls`), or None.
    """

    initiator: bool
    session: Optional["Session"] = None
    identity: Optional["Identity"] = None
    local_id: Optional[str] = None
    peer_id: Optional[str] = None
    peer_name: Optional[str] = None
    tls_early: Optional[Any] = None

    def __post_init__(self) -> None:
        if not isinstance(self.initiator, bool):
            raise TypeError("StackContext.initiator must be a bool")


def _registry(registry):
    if registry is None:
        from .registry import default_registry  # registry imports this module: late import

        return default_registry
    return registry


class _Parser:
    """A hand-written scanner: each error knows its position."""

    def __init__(self, text: str, registry) -> None:
        self.text = text
        self.registry = registry
        self.pos = 0

    # -- errors -----------------------------------------------------------------------------
    def fail(self, why: str, pos: Optional[int] = None, cls=ConfigError, **attrs) -> NoReturn:
        pos = self.pos if pos is None else pos
        shown = self.text if len(self.text) <= 80 else self.text[:77] + "..."
        msg = f"bad stack string {shown!r} at position {pos}: {why}"
        raise cls(msg, **attrs) if attrs else cls(msg)

    # -- tokens -----------------------------------------------------------------------------
    def skip_blanks(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos] in _BLANKS:
            self.pos += 1

    def peek(self) -> str:
        self.skip_blanks()
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def expect(self, char: str) -> None:
        if self.peek() != char:
            got = repr(self.text[self.pos]) if self.pos < len(self.text) else "end of text"
            self.fail(f"expected {char!r}, found {got}")
        self.pos += 1

    def name(self, what: str) -> Tuple[str, int]:
        self.skip_blanks()
        start = self.pos
        match = _NAME_RE.match(self.text, self.pos)
        if match is None:
            got = repr(self.text[self.pos]) if self.pos < len(self.text) else "end of text"
            self.fail(f"expected a {what} (lower-case letters, digits, '_'), found {got}")
        word = match.group()
        if len(word) > MAX_NAME_CHARS:
            self.fail(f"{what} longer than {MAX_NAME_CHARS} characters", start)
        self.pos = match.end()
        return word, start

    def value(self) -> Tuple[str, int]:
        self.skip_blanks()
        start = self.pos
        match = _VALUE_RE.match(self.text, self.pos)
        if match is None:
            got = repr(self.text[self.pos]) if self.pos < len(self.text) else "end of text"
            self.fail(f"expected a value, found {got}")
        word = match.group()
        if len(word) > MAX_VALUE_CHARS:
            self.fail(f"value longer than {MAX_VALUE_CHARS} characters", start)
        self.pos = match.end()
        return word, start

    # -- grammar ----------------------------------------------------------------------------
    def parse(self, expect: str) -> Tuple[Layer, ...]:
        if not isinstance(self.text, str):
            raise ConfigError(f"a stack string must be a str, not {type(self.text).__name__}")
        if len(self.text) > MAX_STACK_CHARS:
            self.fail(f"longer than {MAX_STACK_CHARS} characters", MAX_STACK_CHARS)
        if self.text.strip(_BLANKS) == "":
            self.fail("empty stack string; expected e.g. 'tcp' or 'tls/tcp'", 0)
        layers: List[Layer] = []
        starts: List[int] = []
        while True:
            if len(layers) == MAX_LAYERS:
                self.fail(f"more than {MAX_LAYERS} layers")
            layer, start = self.layer()
            for previous, prev_start in zip(layers, starts):
                if previous.name == layer.name:
                    self.fail(f"{layer.name!r} appears twice (first at position {prev_start})", start)
            layers.append(layer)
            starts.append(start)
            nxt = self.peek()
            if nxt == "":
                break
            if nxt != "/":
                self.fail(f"expected '/' or end of text, found {nxt!r}")
            self.pos += 1
        self.check_kinds(layers, starts, expect)
        return tuple(layers)

    def layer(self) -> Tuple[Layer, int]:
        name, start = self.name("component name")
        info = self.lookup(name, start)
        params: Dict[str, ParamValue] = {}
        if self.peek() == "(":
            self.pos += 1
            if self.peek() != ")":
                while True:
                    if len(params) == MAX_PARAMS_PER_LAYER:
                        self.fail(f"more than {MAX_PARAMS_PER_LAYER} parameters")
                    key, key_start = self.name("parameter name")
                    if key in params:
                        self.fail(f"parameter {key!r} of {name!r} given twice", key_start)
                    if key not in info.params:
                        known = ", ".join(sorted(info.params)) or "none"
                        self.fail(f"{name!r} has no parameter {key!r} (known: {known})", key_start)
                    self.expect("=")
                    word, value_start = self.value()
                    params[key] = self.convert(name, key, word, info, value_start)
                    if self.peek() == ",":
                        self.pos += 1
                        continue
                    break
            self.expect(")")
        return Layer(name, tuple(params.items())), start

    def lookup(self, name: str, start: int):
        from .registry import UnknownComponentError

        try:
            return self.registry.info(name)
        except UnknownComponentError as exc:
            hint = f"; did you mean {exc.suggestion!r}?" if exc.suggestion else ""
            self.fail(
                f"unknown component {name!r}{hint}",
                start,
                cls=UnknownComponentError,
                name=name,
                suggestion=exc.suggestion,
            )

    def convert(self, name: str, key: str, word: str, info, start: int) -> ParamValue:
        kind = info.params[key]
        value: ParamValue
        if kind is bool:
            if word not in ("true", "false"):
                self.fail(f"{name}({key}=...) takes true or false, not {word!r}", start)
            value = word == "true"
        elif kind is int:
            if not _INT_RE.match(word):
                self.fail(f"{name}({key}=...) takes an integer, not {word!r}", start)
            value = int(word)
        elif kind is float:
            if not _FLOAT_RE.match(word) or not math.isfinite(float(word)):
                self.fail(f"{name}({key}=...) takes a number, not {word!r}", start)
            value = float(word)
        else:
            value = word
        limits = info.limits.get(key)
        if limits is not None:
            low, high = limits
            if (low is not None and value < low) or (high is not None and value > high):
                self.fail(f"{name}({key}=...) must be within [{low}, {high}], not {word}", start)
        return value

    def check_kinds(self, layers, starts, expect: str) -> None:
        kinds = [self.registry.kind(layer.name) for layer in layers]
        for i, (layer, kind, start) in enumerate(zip(layers, kinds, starts)):
            if kind == "method":
                if expect == "filters":
                    self.fail(f"{layer.name!r} is a method; expected only filters here", start)
                if i != len(layers) - 1:
                    self.fail(f"{layer.name!r} is a method: it must be the bottom (last) layer", start)
        if expect == "stack" and kinds[-1] != "method":
            self.fail(
                f"the bottom layer {layers[-1].name!r} is a filter; a stack ends with a method "
                f"such as 'tcp'",
                starts[-1],
            )
