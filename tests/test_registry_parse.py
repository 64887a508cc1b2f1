"""``Registry.parse``: parsed stacks kept while the components stay the same.

The connect path parses the same few stack strings at both ends of every connection (the
client's stack, the server's copy from the request, the rules' candidates); the registry keeps
them. What must hold: a kept stack is what ``Stack.parse`` gives; any change of the components
(register, unregister, rescan) is seen at once, in both directions; a text that fails keeps
failing; the policy refuses a kept stack as it refuses a fresh one.
"""
from __future__ import annotations

import uuid

import pytest

from gridsock.errors import ConfigError, UnknownComponentError
from gridsock.registry import PARSED_STACKS_KEPT, Registry, default_registry
from gridsock.rules import Rules
from gridsock.stack import Stack
from gridsock.wire import NodeEntry


class Probe:
    """A filter that does nothing, under a name of the test's choosing."""

    kind = "filter"
    PARAMS = {"level": int}

    def __init__(self, **params) -> None:
        self.params = params

    def wrap(self, lower, *, context):
        return lower


def _entry(name: str, cluster: str) -> NodeEntry:
    return NodeEntry(node_id=str(uuid.uuid4()), name=name, cluster=cluster, leader=str(uuid.uuid4()),
                     addrs=("192.0.2.1:7700",), inbound=True)


def test_a_kept_stack_is_what_stack_parse_gives_and_is_shared():
    registry = Registry(entry_point_group=None)
    for text in ("tcp", "tls/tcp", "lz4(level=3)/tcp", "parallel(streams=4)/tcp"):
        first = registry.parse(text)
        assert first == Stack.parse(text, registry)
        assert registry.parse(text) is first  # kept: the second parse is the same object
        assert str(first) == str(Stack.parse(text, registry))


def test_registering_and_unregistering_are_seen_at_once():
    registry = Registry(entry_point_group=None)
    with pytest.raises(UnknownComponentError):
        registry.parse("probe/tcp")
    registry.register("probe", Probe)
    assert registry.parse("probe/tcp").has("probe")
    registry.unregister("probe")
    with pytest.raises(UnknownComponentError):  # the kept stack is gone with its component
        registry.parse("probe/tcp")


def test_replacing_a_component_changes_what_parses():
    registry = Registry(entry_point_group=None)
    registry.register("probe", Probe)
    assert registry.parse("probe(level=2)/tcp").method.name == "tcp"
    registry.register("probe", "tests.test_registry_parse:Probe", kind="filter", params={}, replace=True)
    with pytest.raises(ConfigError):  # no parameter any more: the kept stack is not given back
        registry.parse("probe(level=2)/tcp")
    registry.rescan()
    with pytest.raises(ConfigError):
        registry.parse("probe(level=2)/tcp")


def test_a_text_that_fails_keeps_failing_and_the_bound_holds():
    registry = Registry(entry_point_group=None)
    for _ in range(3):
        with pytest.raises(ConfigError):
            registry.parse("tcp/tls")  # a method must be the bottom layer
    with pytest.raises(ConfigError):
        registry.parse(b"tcp")  # type: ignore[arg-type]  # not a str: refused, not kept
    texts = [f"lz4(level={i % 17})/zlib(level={i % 10})/tcp" for i in range(PARSED_STACKS_KEPT + 20)]
    for text in texts:
        assert str(registry.parse(text)) == str(Stack.parse(text, registry))
    assert len(registry._parsed) <= PARSED_STACKS_KEPT


def test_the_policy_refuses_a_kept_stack_as_a_fresh_one():
    rules = Rules()  # tls required from outside the cluster
    server, outsider, neighbour = _entry("s", "A"), _entry("o", "B"), _entry("n", "A")
    for _ in range(2):  # the second time from what the registry kept
        kept = default_registry.parse("tcp")
        assert rules.refusal(server, outsider, kept) is not None
        assert rules.refusal(server, neighbour, kept) is None
        assert rules.refusal(server, outsider, default_registry.parse("tls/tcp")) is None


def test_candidates_follow_the_registry():
    name = "probe" + uuid.uuid4().hex[:8]
    default_registry.register(name, Probe)
    try:
        rules = Rules.from_dict({"rule": [{"stack": f"{name}/tcp"}]})
        src, dst = _entry("a", "A"), _entry("b", "B")
        assert [str(s) for s in rules.candidates(src, dst)] == [f"{name}/tcp"]
        assert rules.candidates(src, dst)[0] is rules.candidates(src, dst)[0]
    finally:
        default_registry.unregister(name)
    with pytest.raises(UnknownComponentError):  # gone with its component, not kept
        rules.candidates(src, dst)
