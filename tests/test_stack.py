"""Stack strings, the component registry, entry points and build_filters."""
from __future__ import annotations

import dataclasses
import json
import logging
import pickle
import subprocess
import sys
import textwrap

import gevent
import pytest

from gridsock.errors import AuthError, ConfigError, ConnectError, RemoteProtocolError
from gridsock.registry import (
    BUILTIN_COMPONENTS,
    Registry,
    UnknownComponentError,
    build_filters,
    default_registry,
)
from gridsock.stack import (
    MAX_LAYERS,
    MAX_NAME_CHARS,
    MAX_PARAMS_PER_LAYER,
    MAX_STACK_CHARS,
    MAX_VALUE_CHARS,
    Layer,
    Stack,
    StackContext,
    parse_filters,
)
from gridsock.streams import Stream, memory_pair
from gridsock.testing.streams import stream_over

pytestmark = pytest.mark.timeout(120)


# --- parsing -------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "text, canonical",
    [
        ("tcp", "tcp"),
        ("relay", "relay"),
        ("tls/tcp", "tls/tcp"),
        ("tls/lz4/tcp", "tls/lz4/tcp"),
        (" tls / lz4 /\ttcp ", "tls/lz4/tcp"),
        ("lz4()/tcp", "lz4/tcp"),
        ("lz4( )/tcp", "lz4/tcp"),
        ("lz4(level=+007)/tcp", "lz4(level=7)/tcp"),
        ("adoc(min_level=1,max_level=6)/relay", "adoc(max_level=6,min_level=1)/relay"),
        ("adoc( max_level = 6 , min_level=1 )/relay", "adoc(max_level=6,min_level=1)/relay"),
        ("tls/zlib(level=9)/bz2(level=1)/tcp", "tls/zlib(level=9)/bz2(level=1)/tcp"),
    ],
)
def test_parse_and_canonical_form(text, canonical):
    stack = Stack.parse(text)
    assert str(stack) == canonical
    assert Stack.parse(canonical) == stack
    assert str(Stack.parse(canonical)) == canonical  # canonical strings are fixed points


def test_stack_parts():
    stack = Stack.parse("tls/lz4(level=3)/tcp")
    assert stack.method == Layer("tcp")
    assert stack.filters == (Layer("tls"), Layer("lz4", (("level", 3),)))
    assert stack.filters[1].kwargs == {"level": 3}
    assert stack.filters[1].get("level") == 3 and stack.filters[0].get("level", 0) == 0
    assert stack.has("tls") and stack.has("tcp") and not stack.has("zlib")
    assert Stack.parse("tcp").filters == ()
    with pytest.raises(dataclasses.FrozenInstanceError):
        stack.layers = ()  # type: ignore[misc]
    assert hash(stack) == hash(Stack.parse("tls / lz4(level=3) / tcp"))


def test_layer_params_are_sorted():
    assert Layer("x", (("b", 1), ("a", 2))).params == (("a", 2), ("b", 1))


def test_over_and_with_filters():
    stack = Stack.parse("tls/lz4/tcp")
    assert str(stack.over("relay")) == "tls/lz4/relay"
    assert str(Stack.parse("tcp").with_filters("tls", Layer("lz4", (("level", 1),)))) == "tls/lz4(level=1)/tcp"
    with pytest.raises(ConfigError):
        stack.over("lz4")  # not a method
    with pytest.raises(ConfigError):
        stack.with_filters("tls")  # twice


def test_parse_filters():
    assert parse_filters("tls/lz4") == (Layer("tls"), Layer("lz4"))
    assert parse_filters("") == ()
    with pytest.raises(ConfigError, match="method"):
        parse_filters("lz4/tcp")


@pytest.mark.parametrize(
    "text, position, fragment",
    [
        ("", 0, "empty"),
        ("   ", 0, "empty"),
        ("tcp/lz4", 0, "must be the bottom"),
        ("lz4", 0, "is a filter"),
        ("tls/lz4", 4, "is a filter"),
        ("relay/tcp", 0, "must be the bottom"),
        ("tcp/tcp", 4, "appears twice"),
        ("lz4/tls/lz4/tcp", 8, "appears twice"),
        ("lz4(lvl=1)/tcp", 4, "no parameter 'lvl'"),
        ("tls(level=1)/tcp", 4, "known: none"),
        ("lz4(level=1,level=2)/tcp", 12, "given twice"),
        ("lz4(level=x)/tcp", 10, "takes an integer"),
        ("lz4(level=1.5)/tcp", 10, "takes an integer"),
        ("lz4(level=0x10)/tcp", 10, "takes an integer"),
        ("lz4(level=99)/tcp", 10, "within [0, 16]"),
        ("bz2(level=0)/tcp", 10, "within [1, 9]"),
        ("lz4(level=1/tcp", 11, "expected ')'"),
        ("lz4(level)/tcp", 9, "expected '='"),
        ("lz4(level=)/tcp", 10, "expected a value"),
        ("lz4(,)/tcp", 4, "parameter name"),
        ("lz4(level=1,)/tcp", 12, "parameter name"),
        ("lz4 tcp", 4, "expected '/'"),
        ("tls/", 4, "component name"),
        ("/tcp", 0, "component name"),
        ("tls//tcp", 4, "component name"),
        ("LZ4/tcp", 0, "component name"),
        ("lz4/tcp)", 7, "expected '/'"),
        ("lz4(level=1))/tcp", 12, "expected '/'"),
        ("lz4(level=1 2)/tcp", 12, "expected ')'"),
        ("lz4(level=\"1\")/tcp", 10, "expected a value"),
        ("tcp;rm -rf", 3, "expected '/'"),
        ("x" * (MAX_NAME_CHARS + 1) + "/tcp", 0, "longer than"),
        ("lz4(level=" + "1" * (MAX_VALUE_CHARS + 1) + ")/tcp", 10, "longer than"),
        ("a" * (MAX_STACK_CHARS + 1), MAX_STACK_CHARS, "longer than"),
    ],
)
def test_parse_errors(text, position, fragment):
    with pytest.raises(ConfigError) as info:
        Stack.parse(text)
    message = str(info.value)
    assert fragment in message
    assert f"at position {position}:" in message
    assert repr(text if len(text) <= 80 else text[:77] + "...") in message
    assert isinstance(info.value, ValueError)  # ConfigError is a ValueError too


def test_too_many_layers():
    text = "/".join(["tls", "lz4", "zlib", "bz2", "adoc"] * 2) + "/tcp"
    with pytest.raises(ConfigError, match="appears twice"):
        Stack.parse(text)
    registry = Registry()
    for i in range(MAX_LAYERS + 1):
        registry.register(f"f{i}", "nowhere:F", kind="filter")
    ok = "/".join(f"f{i}" for i in range(MAX_LAYERS - 1)) + "/tcp"
    assert len(Stack.parse(ok, registry).layers) == MAX_LAYERS
    too_many = "/".join(f"f{i}" for i in range(MAX_LAYERS)) + "/tcp"
    with pytest.raises(ConfigError, match=f"more than {MAX_LAYERS} layers"):
        Stack.parse(too_many, registry)


def test_too_many_params():
    registry = Registry()
    names = [f"p{i}" for i in range(MAX_PARAMS_PER_LAYER + 1)]
    registry.register("many", "nowhere:M", kind="filter", params={n: int for n in names})
    ok = "many(" + ",".join(f"{n}=1" for n in names[:-1]) + ")/tcp"
    assert len(Stack.parse(ok, registry).filters[0].params) == MAX_PARAMS_PER_LAYER
    with pytest.raises(ConfigError, match="more than"):
        Stack.parse("many(" + ",".join(f"{n}=1" for n in names) + ")/tcp", registry)


def test_not_a_string():
    with pytest.raises(ConfigError, match="must be a str"):
        Stack.parse(b"tcp")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "text, suggestion",
    [("lz5/tcp", "lz4"), ("tpc", "tcp"), ("tsl/tcp", "tls"), ("zlib/rely", "relay"), ("adco/tcp", "adoc")],
)
def test_did_you_mean(text, suggestion):
    with pytest.raises(UnknownComponentError) as info:
        Stack.parse(text)
    assert info.value.suggestion == suggestion
    assert f"did you mean {suggestion!r}?" in str(info.value)
    assert isinstance(info.value, ConfigError)


def test_unknown_without_suggestion():
    with pytest.raises(UnknownComponentError) as info:
        Stack.parse("quantum_entanglement/tcp")
    assert info.value.suggestion is None and "did you mean" not in str(info.value)
    assert info.value.name == "quantum_entanglement"


def test_unknown_component_error_pickles():
    try:
        Stack.parse("lz5/tcp")
    except UnknownComponentError as exc:
        copy = pickle.loads(pickle.dumps(exc))
        assert (copy.args, copy.name, copy.suggestion) == (exc.args, "lz5", "lz4")


def _typed_registry() -> Registry:
    registry = Registry()
    registry.register(
        "x",
        "nowhere:X",
        kind="filter",
        params={"i": int, "f": float, "b": bool, "s": str},
        limits={"i": (-5, 5), "f": (0.0, 2.5)},
    )
    return registry


def test_param_types():
    registry = _typed_registry()
    stack = Stack.parse("x(s=node-1.cluster:8@a,b=true,f=1,i=-3)/tcp", registry)
    assert stack.filters[0].kwargs == {"i": -3, "f": 1.0, "b": True, "s": "node-1.cluster:8@a"}
    assert type(stack.filters[0].get("f")) is float and type(stack.filters[0].get("b")) is bool
    assert str(stack) == "x(b=true,f=1.0,i=-3,s=node-1.cluster:8@a)/tcp"
    assert Stack.parse(str(stack), registry) == stack
    assert Stack.parse("x(b=false,f=.5e0,s=true)/tcp", registry).filters[0].kwargs == {
        "b": False, "f": 0.5, "s": "true"}
    assert str(Stack.parse("x(f=2.5e-1)/tcp", registry)) == "x(f=0.25)/tcp"


@pytest.mark.parametrize(
    "param, fragment",
    [
        ("b=1", "true or false"),
        ("b=True", "true or false"),
        ("f=nan", "takes a number"),
        ("f=inf", "takes a number"),
        ("f=1e999", "takes a number"),
        ("f=1.2.3", "takes a number"),
        ("f=3", "within [0.0, 2.5]"),
        ("i=6", "within [-5, 5]"),
        ("i=--1", "takes an integer"),
    ],
)
def test_param_type_errors(param, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("[", r"\[").replace(".", r"\.")):
        Stack.parse(f"x({param})/tcp", _typed_registry())


# --- StackContext ----------------------------------------------------------------------------------

def test_stack_context():
    ctx = StackContext(initiator=True, peer_id="abc", peer_name="a2")
    assert ctx.session is None and ctx.identity is None and ctx.local_id is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        ctx.initiator = False  # type: ignore[misc]
    assert dataclasses.replace(ctx, initiator=False).peer_id == "abc"
    with pytest.raises(TypeError):
        StackContext(initiator="yes")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        StackContext()  # type: ignore[call-arg]  # which side: always say


# --- registry ------------------------------------------------------------------------------------

def test_builtin_names_and_kinds():
    registry = Registry(entry_point_group=None)
    assert set(registry.names()) >= {"tcp", "relay", "tls", "lz4", "zlib", "bz2", "adoc"}
    assert registry.kind("tcp") == "method" and registry.kind("relay") == "method"
    assert {registry.kind(n) for n in ("tls", "lz4", "zlib", "bz2", "adoc")} == {"filter"}
    assert registry.params("adoc") == {"min_level": int, "max_level": int}
    assert registry.info("lz4").origin == "builtin"


@pytest.mark.parametrize("name", sorted(BUILTIN_COMPONENTS))
def test_builtin_table_matches_the_classes(name):
    """The static table the parser uses says what the component classes say."""
    target, kind, params, limits = BUILTIN_COMPONENTS[name]
    module_name = target.partition(":")[0]
    try:
        __import__(module_name)
    except ModuleNotFoundError as exc:
        if exc.name == module_name:
            pytest.skip(f"{module_name} is not written yet")
        raise
    cls = Registry().get(name)
    assert cls.kind == kind
    assert getattr(cls, "name", name) == name
    assert dict(cls.PARAMS) == dict(params)
    assert dict(getattr(cls, "LIMITS", {})) == dict(limits)


def test_get_imports_the_component():
    from gridsock.components.lz4 import Lz4Filter

    assert default_registry.get("lz4") is Lz4Filter
    with pytest.raises(UnknownComponentError):
        default_registry.get("nope")


def test_register():
    class Rot:
        name = "rot"
        kind = "filter"
        PARAMS = {"shift": int}
        LIMITS = {"shift": (0, 255)}

        def __init__(self, shift=13):
            self.shift = shift

    registry = Registry(entry_point_group=None)
    info = registry.register("rot", Rot)
    assert (info.kind, dict(info.params), info.origin) == ("filter", {"shift": int}, "registered")
    assert registry.get("rot") is Rot
    assert registry.create(Stack.parse("rot(shift=3)/tcp", registry).filters[0]).shift == 3
    with pytest.raises(ConfigError, match="already registered"):
        registry.register("rot", Rot)
    registry.register("rot", "somewhere.else:Rot", kind="filter", replace=True)
    with pytest.raises(ConfigError, match="cannot be imported"):
        registry.get("rot")
    registry.unregister("rot")
    with pytest.raises(UnknownComponentError):
        registry.kind("rot")


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        (dict(name="Bad", target="m:a", kind="filter"), "bad component name"),
        (dict(name="x" * (MAX_NAME_CHARS + 1), target="m:a", kind="filter"), "bad component name"),
        (dict(name="ok", target="m.a", kind="filter"), "not 'module:attr'"),
        (dict(name="ok", target="m:a"), "needs its kind"),
        (dict(name="ok", target="m:a", kind="transport"), "kind must be"),
        (dict(name="ok", target="m:a", kind="filter", params={"n": list}), "use int, float, bool or str"),
        (dict(name="ok", target="m:a", kind="filter", params={"N": int}), "bad parameter name"),
        (dict(name="ok", target="m:a", kind="filter", params={"n": str}, limits={"n": (0, 1)}), "not a numeric"),
        (dict(name="ok", target="m:a", kind="filter", params={"n": int}, limits={"n": 5}), "(low, high)"),
        (dict(name="ok", target=object(), kind=None), "kind must be"),
    ],
)
def test_register_errors(kwargs, fragment):
    with pytest.raises(ConfigError) as info:
        Registry(entry_point_group=None).register(**kwargs)
    assert fragment in str(info.value)


def test_create_rejects_bad_combinations():
    layer = Stack.parse("adoc(min_level=6,max_level=2)/tcp").filters[0]  # each value is fine
    with pytest.raises(ConfigError, match="above max_level"):
        default_registry.create(layer)


def test_kind_mismatch_on_import():
    registry = Registry(entry_point_group=None)
    registry.register("liar", "gridsock.components.lz4:Lz4Filter", kind="method")
    with pytest.raises(ConfigError, match="is a filter, registered as a method"):
        registry.get("liar")


def _run_python(code: str, **kwargs) -> str:
    result = subprocess.run(
        [sys.executable, "-W", "error", "-c", textwrap.dedent(code)],
        capture_output=True, text=True, timeout=60, **kwargs,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_registry_imports_lazily():
    """Parsing needs neither gevent.ssl nor lz4, nor any component module; get() imports one."""
    out = _run_python(
        """
        import json, sys
        from gridsock.stack import Stack
        import gridsock.registry as registry
        for text in ("tls/lz4/tcp", "adoc(min_level=1,max_level=6)/relay", "zlib/bz2(level=9)/tcp"):
            Stack.parse(text)
        registry.default_registry.kind("tls")
        heavy = ("gevent", "gevent.ssl", "ssl", "lz4", "cryptography", "gridsock.session",
                 "gridsock.streams", "gridsock.components", "importlib.metadata")
        before = sorted(m for m in sys.modules if m.startswith(heavy))
        registry.default_registry.get("lz4")
        after = sorted(m for m in sys.modules if m.startswith(heavy))
        print(json.dumps([before, after]))
        """
    )
    before, after = json.loads(out)
    assert before == []
    assert "gridsock.components.lz4" in after and "lz4.frame" in after
    for module in ("gevent.ssl", "ssl", "gridsock.components.tcp", "gridsock.components.relay",
                   "gridsock.components.tls", "gridsock.components.zlib", "importlib.metadata"):
        assert module not in after


# --- entry points -------------------------------------------------------------------------------

_PLUGIN = '''
"""A third-party component for the entry-point tests."""
from gridsock.streams import Stream


class Rot(Stream):
    def __init__(self, lower, shift):
        self.lower = lower
        self.info = dict(lower.info)
        self.enc = bytes((i + shift) % 256 for i in range(256))
        self.dec = bytes((i - shift) % 256 for i in range(256))

    def send_all(self, data):
        self.lower.send_all(bytes(data).translate(self.enc))

    def receive_some(self, max_bytes=65536):
        return self.lower.receive_some(max_bytes).translate(self.dec)

    def send_eof(self):
        self.lower.send_eof()

    def close(self):
        self.lower.close()


class RotFilter:
    name = "rot"
    kind = "filter"
    params = {"shift": int}  # lower-case ``params`` is accepted too

    def __init__(self, shift=13):
        self.shift = shift

    def wrap(self, lower, *, context):
        return Rot(lower, self.shift)


class BadKind:
    kind = "transport"
    PARAMS = {}


class Impostor:
    name = "lz4"
    kind = "filter"
    PARAMS = {}
'''

_ENTRY_POINTS = """
[gridsock.components]
rot = gridsock_test_plugin:RotFilter
badkind = gridsock_test_plugin:BadKind
missing = gridsock_test_plugin_gone:Thing
misnamed = gridsock_test_plugin:RotFilter
lz4 = gridsock_test_plugin:Impostor
Bad-Name = gridsock_test_plugin:RotFilter
"""


@pytest.fixture
def plugin_path(tmp_path, monkeypatch):
    """A directory on sys.path holding a module and its dist-info, as pip would install them."""
    (tmp_path / "gridsock_test_plugin.py").write_text(_PLUGIN)
    dist = tmp_path / "gridsock_test_plugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: gridsock-test-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(_ENTRY_POINTS)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    sys.modules.pop("gridsock_test_plugin", None)


def test_entry_point_component(plugin_path, caplog):
    registry = Registry()
    with caplog.at_level(logging.WARNING, logger="gridsock.registry"):
        names = registry.names()
    assert {"rot", "badkind", "missing", "misnamed"} <= set(names) and "Bad-Name" not in names
    assert any("'lz4' is already a component" in r.getMessage() for r in caplog.records)
    assert "gridsock_test_plugin" not in sys.modules  # scanning reads metadata only

    stack = Stack.parse("rot(shift=3)/lz4/tcp", registry)
    assert registry.kind("rot") == "filter" and registry.params("rot") == {"shift": int}
    assert registry.info("rot").origin.startswith("entry point gridsock_test_plugin:RotFilter")
    from gridsock.components.lz4 import Lz4Filter

    assert registry.get("lz4") is Lz4Filter  # an entry point cannot replace a built-in

    lowers = {}

    def lower_pair():
        lowers["pair"] = memory_pair()
        return lowers["pair"]

    client, server = stream_over(lower_pair, stack, registry=registry)
    with client, server:
        client.send_all(b"hello")
        assert server.receive_some(100) == b"hello"
        assert client.info["stack"] == "rot(shift=3)/lz4/memory"

    with pytest.raises(UnknownComponentError, match="did you mean 'rot'"):
        Stack.parse("rit/tcp", registry)


@pytest.mark.parametrize(
    "name, fragment",
    [("badkind", "kind must be"), ("missing", "cannot be loaded"), ("misnamed", "calls itself 'rot'")],
)
def test_broken_entry_points(plugin_path, name, fragment):
    with pytest.raises(ConfigError, match=fragment):
        Stack.parse(f"{name}/tcp", Registry())


def test_entry_points_in_a_fresh_process(plugin_path):
    """The default registry finds entry points on its own, on every Python's metadata API."""
    out = _run_python(
        """
        from gridsock.stack import Stack
        print(Stack.parse("rot( shift = 1 )/relay"))
        """,
        env={"PYTHONPATH": str(plugin_path), "PATH": ""},
    )
    assert out.strip() == "rot(shift=1)/relay"


# --- build_filters -------------------------------------------------------------------------------

class _Failing:
    name = "failing"
    kind = "filter"
    PARAMS: dict = {}
    error: BaseException = RemoteProtocolError("handshake garbage")

    def wrap(self, lower, *, context):
        raise self.error


class _Closed(Stream):
    def __init__(self, lower):
        self.lower = lower
        self.info = dict(lower.info)
        self.closed = False

    def close(self):
        self.closed = True
        self.lower.close()


class _Marker:
    name = "marker"
    kind = "filter"
    PARAMS: dict = {}
    built: list = []

    def wrap(self, lower, *, context):
        stream = _Closed(lower)
        self.built.append(stream)
        return stream


def _test_registry(error: BaseException) -> Registry:
    registry = Registry(entry_point_group=None)
    failing = type("Failing", (_Failing,), {"error": error})
    registry.register("failing", failing)
    registry.register("marker", _Marker)
    return registry


@pytest.mark.parametrize(
    "error, expected",
    [
        (RemoteProtocolError("handshake garbage"), ConnectError),
        (AuthError("not in this session", tried=[("tls", "bad cert")]), AuthError),
        (OSError("boom"), ConnectError),
    ],
)
def test_build_filters_failure_closes_everything_below(error, expected):
    registry = _test_registry(error)
    stack = Stack.parse("failing/marker/tcp", registry)
    lower, peer = memory_pair()
    _Marker.built.clear()
    context = StackContext(initiator=True, peer_id="node-b", peer_name="b1")
    with pytest.raises(ConnectError) as info:
        build_filters(stack, lower, context, registry=registry)
    exc = info.value
    assert type(exc) is expected
    assert exc.method == "failing" and exc.peer == "b1"
    assert exc.__cause__ is error
    assert "failing over marker/tcp with b1 failed" in str(exc)
    if isinstance(error, AuthError):
        assert exc.tried == [("tls", "bad cert")]
    assert _Marker.built[0].closed  # the layer below the failing one
    assert lower._closed  # and the method's stream
    peer.close()


def test_build_filters_timeout_closes_and_propagates():
    registry = _test_registry(gevent.Timeout(1))
    stack = Stack.parse("failing/tcp", registry)
    lower, peer = memory_pair()
    with pytest.raises(gevent.Timeout):
        build_filters(stack, lower, StackContext(initiator=False), registry=registry)
    assert lower._closed
    peer.close()


def test_build_filters_bad_parameters_close_lower():
    lower, peer = memory_pair()
    with pytest.raises(ConfigError, match="above max_level"):
        build_filters(Stack.parse("adoc(min_level=9,max_level=1)/tcp"), lower, StackContext(initiator=True))
    assert lower._closed
    peer.close()


def test_build_filters_wraps_bottom_up():
    order = []

    def tagging(tag):
        class Tag:
            name = tag
            kind = "filter"
            PARAMS: dict = {}

            def wrap(self, lower, *, context):
                order.append((tag, context.initiator))
                stream = _Closed(lower)
                stream.info[tag] = True
                return stream

        return Tag

    registry = Registry(entry_point_group=None)
    for tag in ("top", "middle", "bottom"):
        registry.register(tag, tagging(tag))
    lower, peer = memory_pair()
    stream = build_filters(Stack.parse("top/middle/bottom/relay", registry), lower,
                           StackContext(initiator=True), registry=registry)
    assert order == [("bottom", True), ("middle", True), ("top", True)]
    assert stream.info["stack"] == "top/middle/bottom/relay"
    assert stream.info["top"] and stream.info["bottom"] and stream.info["name"] == "client"
    assert build_filters(Stack.parse("tcp"), lower, StackContext(initiator=True)) is lower
    lower.close()
    peer.close()
