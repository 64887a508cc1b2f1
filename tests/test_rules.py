"""Rules: schemes, exceptions, candidates and the server's policy (no network)."""
from __future__ import annotations

import pytest

from gridsock import wire
from gridsock.errors import ConfigError
from gridsock.rules import Rule, Rules
from gridsock.stack import Stack

IDS = iter(f"00000000-0000-4000-8000-{i:012d}" for i in range(1, 100))


def entry(name, cluster=None, *, inbound=False, addrs=("10.0.0.1:7701",), leader=None):
    node_id = next(IDS)
    return wire.NodeEntry(node_id=node_id, name=name, cluster=cluster, leader=leader or node_id,
                          addrs=tuple(addrs), inbound=inbound)


A1, A2 = entry("a1", "A"), entry("a2", "A")
B1 = entry("b1", "B")
PUB = entry("pub", inbound=True, addrs=("203.0.113.10:7701",))


def names(stacks):
    return [str(s) for s in stacks]


@pytest.mark.parametrize("src,dst,expected", [
    (A1, A2, ["tcp", "tls/relay"]),                      # same cluster network
    (A1, B1, ["tls/splice", "tls/relay"]),               # neither accepts inbound: both dial
    (A1, PUB, ["tls/tcp", "tls/relay"]),                 # the peer accepts inbound
    (PUB, A1, ["tls/reverse", "tls/splice", "tls/relay"]),  # we accept: the peer can connect back
])
def test_cluster_scheme_orders_what_can_work(src, dst, expected):
    assert names(Rules().candidates(src, dst)) == expected
    assert str(Rules().choose(src, dst)) == expected[0]


def test_other_schemes():
    assert names(Rules(scheme="relay").candidates(A1, A2)) == ["tls/relay"]
    assert names(Rules(scheme="direct").candidates(A1, B1)) == ["tls/tcp", "tls/splice", "tls/relay"]
    assert names(Rules(tls=False).candidates(A1, PUB)) == ["tcp", "relay"]  # a plain-TCP session


def test_a_matching_rule_names_exactly_one_stack():
    rules = Rules(rules=(Rule("cluster:A", "name:p*", "lz4/relay"), Rule("*", "*", "tls/tcp")))
    assert names(rules.candidates(A1, PUB)) == ["lz4/relay"]
    assert names(rules.candidates(B1, A1)) == ["tls/tcp"]
    negated = Rules(rules=(Rule("!cluster:A", "*", "relay"),))
    assert names(negated.candidates(B1, A1)) == ["relay"]
    assert names(negated.candidates(A1, A2)) == ["tcp", "tls/relay"]


def test_address_patterns_match_advertised_and_observed_hosts():
    natted = wire.NodeEntry(node_id=next(IDS), name="n", cluster=None, leader="00000000-0000-4000-8000-000000000001",
                            addrs=("10.1.0.11:7701",), observed="203.0.113.2:40000")
    assert Rule("addr:10.1.*", "*", "tcp").matches(natted, A1)
    assert Rule("addr:203.0.113.2", "*", "tcp").matches(natted, A1)
    assert not Rule("addr:192.0.2.*", "*", "tcp").matches(natted, A1)


def test_policy_requires_tls_from_outside_the_cluster_only():
    rules = Rules()
    assert rules.refusal(A1, A2, Stack.parse("tcp")) is None
    assert "requires tls" in rules.refusal(A1, B1, Stack.parse("lz4/relay"))
    assert rules.refusal(A1, B1, Stack.parse("tls/lz4/relay")) is None
    strict = Rules(inside_cluster=("tls",))
    assert "inside its cluster" in strict.refusal(A1, A2, Stack.parse("tcp"))
    plain = Rules(tls=False)
    assert plain.refusal(A1, B1, Stack.parse("relay")) is None
    assert "no certificates" in plain.refusal(A1, B1, Stack.parse("tls/relay"))


def test_via_entries_add_gateway_candidates_before_the_relay():
    c1 = entry("c1", "C", addrs=("10.3.0.11:7701",))
    socks = "tls/socks(proxy=203.0.113.4:1080)"
    rules = Rules.from_dict({"via": [{"from": "!cluster:C", "to": "cluster:C", "stack": socks},
                                     {"from": "cluster:C", "to": "!cluster:C", "stack": "tls/ssh(gateway=10.3.0.1:22)"}]})
    assert names(rules.candidates(A1, c1)) == ["tls/splice", socks, "tls/relay"]
    assert names(rules.candidates(PUB, c1)) == ["tls/reverse", "tls/splice", socks, "tls/relay"]
    assert names(rules.candidates(c1, PUB)) == ["tls/tcp", "tls/ssh(gateway=10.3.0.1:22)", "tls/relay"]
    c2 = entry("c2", "C")
    assert names(rules.candidates(c1, c2)) == ["tcp", "tls/relay"]  # inside the cluster: no gateway
    assert names(Rules(scheme="relay", vias=rules.vias).candidates(A1, c1)) == ["tls/relay"]


@pytest.mark.parametrize("data,why", [
    ({"via": [{"to": "cluster:C"}]}, "via 1: needs 'stack'"),
    ({"via": [{"stack": "tls/socks(port=1)"}]}, "via 1"),
    ({"scheme": "fastest"}, "unknown scheme"),
    ({"rule": [{"from": "*"}]}, "needs 'stack'"),
    ({"rule": [{"stack": "tls/nope"}]}, "unknown component"),
    ({"rule": [{"stack": "tcp", "from": "host:x"}]}, "bad pattern"),
    ({"policy": {"outside_cluster": "tls"}}, "list of filter names"),
    ({"colour": "blue"}, "unknown rules keys"),
])
def test_bad_rules_are_config_errors(data, why):
    with pytest.raises(ConfigError) as excinfo:
        Rules.from_dict(data)
    assert why in str(excinfo.value)


def test_load_reads_toml(tmp_path):
    path = tmp_path / "rules.toml"
    path.write_text('scheme = "direct"\n[policy]\noutside_cluster = []\n[[rule]]\nto = "cluster:B"\nstack = "relay"\n')
    rules = Rules.load(path)
    assert rules.scheme == "direct" and rules.outside_cluster == () and rules.rules == (Rule("*", "cluster:B", "relay"),)
    with pytest.raises(ConfigError):
        Rules.load(tmp_path / "missing.toml")
    (tmp_path / "bad.toml").write_text("scheme = ")
    with pytest.raises(ConfigError):
        Rules.load(tmp_path / "bad.toml")
