"""Components by name: the built-ins, and third parties' through entry points.

Theory of operation
-------------------
A *component* is a class (or any object built the same way) with::

    name = "lz4"                 # the name in stack strings
    kind = "filter"              # or "method"
    PARAMS = {"level": int}      # parameter name -> int, float, bool or str
    LIMITS = {"level": (0, 16)}  # optional: inclusive (low, high) bounds of numeric parameters
    def __init__(self, **params): ...          # the parsed values; omitted ones take defaults
    def wrap(self, lower, *, context): ...      # filters: return a Stream wrapping ``lower``

A :class:`Registry` maps names to components. It answers :meth:`~Registry.info` (kind,
parameters, limits) without importing anything for built-ins and explicitly registered
``"module:attr"`` targets, so :meth:`gridsock.stack.Stack.parse` validates ``"tls/lz4/tcp"``
without importing ``gevent.ssl`` or ``lz4``; :meth:`~Registry.get` imports a component the first
time a stack needs it. The table of built-ins (:data:`BUILTIN_COMPONENTS`) therefore repeats each
built-in's kind, parameters and limits; a test checks the table against the classes.

Third parties add components through the entry-point group ``gridsock.components``::

    [options.entry_points]            # setup.cfg of a package "gridsock-rot13"
    gridsock.components =
        rot13 = gridsock_rot13:Rot13Filter

The group is scanned (metadata only) the first time a name is not found among the built-ins
and registered components; an entry point is loaded (imported) when its name is first looked
up, since only its object tells its kind and parameters. The object must carry ``kind`` and
``PARAMS`` (``params`` is accepted too) and, if it has a ``name``, the entry point's name.
Entry points never shadow a built-in or a registered component: they are ignored with a
warning, so installing a package cannot replace ``tls`` behind the user's back.

:func:`build_filters` wraps a connected stream in a stack's filters, bottom-up; when a layer
fails it closes everything built so far (and the method's stream) and raises ConnectError.
"""
from __future__ import annotations

import difflib
import importlib
import logging
import re
import sys
import types
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Dict, Iterable, Mapping, Optional, Tuple

from .errors import AuthError, ConfigError, ConnectError, UnknownComponentError
from .stack import MAX_NAME_CHARS, PARAM_TYPES, Layer, Stack, StackContext

if TYPE_CHECKING:  # streams.py imports gevent: not needed to parse stacks
    from .streams import Stream

__all__ = [
    "ENTRY_POINT_GROUP",
    "KINDS",
    "BUILTIN_COMPONENTS",
    "UnknownComponentError",
    "ComponentInfo",
    "Registry",
    "default_registry",
    "build_filters",
]

log = logging.getLogger(__name__)

#: The entry-point group third-party components register in.
ENTRY_POINT_GROUP = "gridsock.components"
#: A method opens and accepts connections (the bottom layer); a filter wraps a stream.
KINDS = ("method", "filter")

#: The built-in components: name -> (target "module:attr", kind, params, limits). The parser
#: needs kind and parameters without importing the modules, hence this table; a test checks it
#: against each class's ``kind``, ``PARAMS`` and ``LIMITS``.
BUILTIN_COMPONENTS: Mapping[str, Tuple[str, str, Mapping[str, type], Mapping[str, tuple]]] = (
    types.MappingProxyType(
        {
            "tcp": ("gridsock.components.tcp:TcpMethod", "method", {}, {}),
            "relay": ("gridsock.components.relay:RelayMethod", "method", {}, {}),
            "splice": ("gridsock.components.splice:SpliceMethod", "method", {}, {}),
            "reverse": ("gridsock.components.reverse:ReverseMethod", "method", {}, {}),
            "socks": ("gridsock.components.socks:SocksMethod", "method", {"proxy": str}, {}),
            "ssh": ("gridsock.components.ssh:SshMethod", "method", {"gateway": str, "remote": str, "bind": str}, {}),
            "tls": ("gridsock.components.tls:TlsFilter", "filter", {}, {}),
            "resume": (
                "gridsock.components.resume:ResumeMethod",
                "filter",
                {"timeout": float, "upgrade": bool},
                {"timeout": (0.1, 3600.0)},
            ),
            "parallel": (
                "gridsock.components.parallel:ParallelMethod",
                "filter",
                {"streams": int, "chunk": int},
                {"streams": (1, 64), "chunk": (4096, 4 * 1024 * 1024)},
            ),
            "lz4": ("gridsock.components.lz4:Lz4Filter", "filter", {"level": int}, {"level": (0, 16)}),
            "zlib": ("gridsock.components.zlib:ZlibFilter", "filter", {"level": int}, {"level": (0, 9)}),
            "bz2": ("gridsock.components.bz2:Bz2Filter", "filter", {"level": int}, {"level": (1, 9)}),
            "adoc": (
                "gridsock.components.adoc:AdocFilter",
                "filter",
                {"min_level": int, "max_level": int},
                {"min_level": (0, 10), "max_level": (0, 10)},
            ),
        }
    )
)

#: Parsed stacks a registry keeps (:meth:`Registry.parse`); beyond this many it starts afresh.
PARSED_STACKS_KEPT = 256

_NAME_RE = re.compile(r"[a-z][a-z0-9_]*\Z")
_TARGET_RE = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*\Z")


@dataclass(frozen=True)
class ComponentInfo:
    """What the parser knows of a component: kind, parameter types and limits, and origin."""

    name: str
    kind: str
    params: Mapping[str, type]
    limits: Mapping[str, Tuple[Any, Any]]
    origin: str  # "builtin", "registered" or "entry point <value> (<distribution>)"


class _Entry:
    __slots__ = ("info", "target", "obj")

    def __init__(self, info: ComponentInfo, target: str, obj: Any) -> None:
        self.info = info
        self.target = target  # "module:attr", or "" when registered as an object
        self.obj = obj  # the component, once imported


class Registry:
    """Component name -> component; see the module docstring.

    ``builtins`` registers :data:`BUILTIN_COMPONENTS`; ``entry_point_group`` (None to disable)
    is the group scanned for third-party components.
    """

    def __init__(self, *, builtins: bool = True, entry_point_group: Optional[str] = ENTRY_POINT_GROUP) -> None:
        self._entries: Dict[str, _Entry] = {}
        self._group = entry_point_group
        self._entry_points: Optional[Dict[str, Any]] = None  # name -> EntryPoint, once scanned
        self._parsed: Dict[str, Stack] = {}  # stack text -> Stack (parse); emptied by any change
        if builtins:
            for name, (target, kind, params, limits) in BUILTIN_COMPONENTS.items():
                info = _make_info(name, kind, params, limits, "builtin")
                self._entries[name] = _Entry(info, target, None)

    # --- registration ----------------------------------------------------------------------

    def register(
        self,
        name: str,
        target: Any,
        kind: Optional[str] = None,
        params: Optional[Mapping[str, type]] = None,
        limits: Optional[Mapping[str, Tuple[Any, Any]]] = None,
        *,
        replace: bool = False,
    ) -> ComponentInfo:
        """Register component ``name``; returns its ComponentInfo.

        ``target`` is a ``"module:attr"`` string, imported on first use (then ``kind`` is
        required and ``params`` defaults to none), or the component object itself (then
        ``kind``, ``params`` and ``limits`` default to its ``kind``, ``PARAMS``, ``LIMITS``).
        Raises ConfigError for a bad name, kind, parameter schema or target, or if ``name`` is
        taken and ``replace`` is false.
        """
        _check_name(name, "component name")
        if name in self._entries and not replace:
            raise ConfigError(f"component {name!r} is already registered")
        if isinstance(target, str):
            if not _TARGET_RE.match(target):
                raise ConfigError(f"component {name!r}: target {target!r} is not 'module:attr'")
            if kind is None:
                raise ConfigError(f"component {name!r}: a 'module:attr' target needs its kind")
            info = _make_info(name, kind, params or {}, limits or {}, "registered")
            self._entries[name] = _Entry(info, target, None)
        else:
            info = _info_of(
                name,
                target,
                "registered",
                kind=kind,
                params=params,
                limits=limits,
            )
            self._entries[name] = _Entry(info, "", target)
        self._parsed.clear()
        return info

    def unregister(self, name: str) -> None:
        """Forget component ``name`` (a no-op if unknown)."""
        self._entries.pop(name, None)
        self._parsed.clear()

    def rescan(self) -> None:
        """Forget the entry points seen so far; the next unknown name scans the group again."""
        self._entry_points = None
        self._parsed.clear()

    # --- stacks ----------------------------------------------------------------------------

    def parse(self, text: str) -> Stack:
        """``Stack.parse(text, self)``, kept: the same text parses once while the components
        stay as they are (the connect path parses the same few stacks on every connection,
        at both ends). Stacks are immutable, so every caller may share one. Registering,
        unregistering or rescanning forgets them all; a text that fails is not kept (it
        raises ConfigError each time, as :meth:`Stack.parse` does).
        """
        stack = self._parsed.get(text) if isinstance(text, str) else None
        if stack is None:
            stack = Stack.parse(text, self)
            if len(self._parsed) >= PARSED_STACKS_KEPT:
                self._parsed.clear()
            self._parsed[text] = stack
        return stack

    # --- lookup ----------------------------------------------------------------------------

    def info(self, name: str) -> ComponentInfo:
        """Return the kind, parameters and limits of ``name``.

        Imports nothing for built-ins and ``"module:attr"`` registrations; loads the entry
        point of a third-party component. Raises UnknownComponentError (with a suggestion) or
        ConfigError if an entry point does not load or is malformed.
        """
        return self._entry(name).info

    def kind(self, name: str) -> str:
        """``"method"`` or ``"filter"``; raises as :meth:`info` does."""
        return self.info(name).kind

    def params(self, name: str) -> Dict[str, type]:
        """The parameter schema of ``name`` (name -> type); raises as :meth:`info` does."""
        return dict(self.info(name).params)

    def names(self) -> Tuple[str, ...]:
        """Every known component name, entry points included, sorted."""
        return tuple(sorted(set(self._entries) | set(self._scan())))

    def get(self, name: str) -> Any:
        """Return the component (class) ``name``, importing it on first use.

        Raises UnknownComponentError, or ConfigError if it cannot be imported or its ``kind``
        disagrees with the registered one.
        """
        entry = self._entry(name)
        if entry.obj is None:
            module_name, _, attr = entry.target.partition(":")
            try:
                obj: Any = importlib.import_module(module_name)
                for part in attr.split("."):
                    obj = getattr(obj, part)
            except (ImportError, AttributeError) as exc:
                raise ConfigError(f"component {name!r} ({entry.target}) cannot be imported: {exc}") from exc
            actual = getattr(obj, "kind", entry.info.kind)
            if actual != entry.info.kind:
                raise ConfigError(
                    f"component {name!r} ({entry.target}) is a {actual}, registered as a {entry.info.kind}"
                )
            entry.obj = obj
        return entry.obj

    def create(self, layer: Layer) -> Any:
        """Instantiate the component of ``layer`` with its parameters.

        Raises ConfigError if the component rejects them (e.g. ``min_level > max_level``), or as
        :meth:`get` does.
        """
        cls = self.get(layer.name)
        try:
            return cls(**layer.kwargs)
        except ConfigError:
            raise
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"component {layer}: {exc}") from exc

    # --- internals ---------------------------------------------------------------------------

    def _entry(self, name: str) -> _Entry:
        entry = self._entries.get(name)
        if entry is not None:
            return entry
        ep = self._scan().get(name)
        if ep is None:
            matches = difflib.get_close_matches(name, self.names(), n=1)
            suggestion = matches[0] if matches else None
            hint = f"; did you mean {suggestion!r}?" if suggestion else ""
            raise UnknownComponentError(f"unknown component {name!r}{hint}", name, suggestion)
        origin = f"entry point {ep.value} ({_dist_name(ep)})"
        try:
            obj = ep.load()
        except Exception as exc:  # a third party's import error: report it as configuration
            raise ConfigError(f"component {name!r} from {origin} cannot be loaded: {exc}") from exc
        declared = getattr(obj, "name", name)
        if declared != name:
            raise ConfigError(f"component {name!r} from {origin} calls itself {declared!r}")
        info = _info_of(name, obj, origin)
        entry = _Entry(info, ep.value, obj)
        self._entries[name] = entry
        return entry

    def _scan(self) -> Dict[str, Any]:
        if self._entry_points is None:
            found: Dict[str, Any] = {}
            for ep in _entry_points(self._group) if self._group else ():
                if ep.name in self._entries:
                    if self._entries[ep.name].info.origin in ("builtin", "registered"):
                        log.warning(
                            "ignoring entry point %s = %s (%s): %r is already a component",
                            ep.name, ep.value, _dist_name(ep), ep.name,
                        )
                    continue
                if not _NAME_RE.match(ep.name) or len(ep.name) > MAX_NAME_CHARS:
                    log.warning("ignoring entry point %r = %s: not a valid component name", ep.name, ep.value)
                    continue
                if ep.name in found:
                    if found[ep.name].value != ep.value:
                        log.warning(
                            "entry point %s = %s (%s) ignored: %s came first",
                            ep.name, ep.value, _dist_name(ep), found[ep.name].value,
                        )
                    continue
                found[ep.name] = ep
            self._entry_points = found
        return self._entry_points


def _entry_points(group: str) -> Iterable[Any]:
    import importlib.metadata as md  # only when a name is not found: it is slow to import

    if sys.version_info >= (3, 10):
        return md.entry_points(group=group)
    return md.entry_points().get(group, ())  # type: ignore[unreachable]  # Python 3.9: a dict of group -> entry points


def _dist_name(ep) -> str:
    dist = getattr(ep, "dist", None)  # Python >= 3.10
    return getattr(dist, "name", None) or "unknown distribution"


def _check_name(name: Any, what: str) -> None:
    if not isinstance(name, str) or not _NAME_RE.match(name) or len(name) > MAX_NAME_CHARS:
        raise ConfigError(
            f"bad {what} {name!r}: lower-case letters, digits and '_', starting with a letter, "
            f"at most {MAX_NAME_CHARS} characters"
        )


def _make_info(name: str, kind: Any, params: Any, limits: Any, origin: str) -> ComponentInfo:
    where = f"component {name!r} ({origin})"
    if kind not in KINDS:
        raise ConfigError(f"{where}: kind must be 'method' or 'filter', not {kind!r}")
    if not isinstance(params, Mapping):
        raise ConfigError(f"{where}: parameters must be a mapping of name -> type")
    for key, typ in params.items():
        _check_name(key, f"parameter name of {where}")
        if typ not in PARAM_TYPES:
            raise ConfigError(f"{where}: parameter {key!r} has type {typ!r}; use int, float, bool or str")
    if not isinstance(limits, Mapping):
        raise ConfigError(f"{where}: limits must be a mapping of name -> (low, high)")
    for key, bounds in limits.items():
        if key not in params or params[key] not in (int, float):
            raise ConfigError(f"{where}: limits given for {key!r}, which is not a numeric parameter")
        if not (isinstance(bounds, tuple) and len(bounds) == 2):
            raise ConfigError(f"{where}: limits of {key!r} must be a (low, high) tuple")
    return ComponentInfo(
        name=name,
        kind=kind,
        params=types.MappingProxyType(dict(params)),
        limits=types.MappingProxyType(dict(limits)),
        origin=origin,
    )


def _info_of(name, obj, origin, *, kind=None, params=None, limits=None) -> ComponentInfo:
    kind = kind if kind is not None else getattr(obj, "kind", None)
    if params is None:
        params = getattr(obj, "PARAMS", None)
        if params is None:
            params = getattr(obj, "params", None)
        if params is None:
            params = {}
    if limits is None:
        limits = getattr(obj, "LIMITS", None) or {}
    return _make_info(name, kind, params, limits, origin)


#: The registry that :meth:`Stack.parse` and :func:`build_filters` use unless told otherwise.
default_registry = Registry()


def build_filters(
    stack: Stack,
    lower: "Stream",
    context: StackContext,
    *,
    registry: Optional[Registry] = None,
) -> "Stream":
    """Wrap ``lower`` (the method's connected stream) in ``stack``'s filters, bottom-up.

    Returns the top stream; its ``info["stack"]`` is ``str(stack)``. If a component cannot be
    created, closes ``lower`` and raises ConfigError. If a layer's ``wrap`` fails, closes every
    stream built so far, ``lower`` included, and raises ConnectError (AuthError if the layer
    raised one) with ``method`` = the layer's name, ``from`` the layer's exception. Anything that
    is not an Exception (gevent.Timeout, GreenletExit) closes the streams and propagates as is.
    """
    registry = registry if registry is not None else default_registry
    built = [lower]
    try:
        components = [(layer, registry.create(layer)) for layer in reversed(stack.filters)]
    except BaseException:
        _close_all(built)
        raise
    stream = lower
    for layer, component in components:
        try:
            stream = component.wrap(stream, context=context)
        except BaseException as exc:
            _close_all(built)
            if not isinstance(exc, Exception):
                raise
            peer = context.peer_name or context.peer_id
            below = "/".join(str(x) for x in stack.layers[stack.layers.index(layer) + 1 :])
            cls = AuthError if isinstance(exc, AuthError) else ConnectError
            tried = list(exc.tried) if isinstance(exc, ConnectError) else []
            raise cls(
                f"{layer.name} over {below}" + (f" with {peer}" if peer else "") + f" failed: {exc}",
                peer=peer,
                method=layer.name,
                tried=tried,
            ) from exc
        built.append(stream)
    if stack.filters:
        stream.info["stack"] = str(stack)
    return stream


def _close_all(streams) -> None:
    for stream in reversed(streams):  # top first: a filter may want to say goodbye below
        try:
            stream.close()
        except Exception as exc:  # closing is best effort; the original error matters
            log.debug("closing %r after a failed build: %s", stream, exc)
