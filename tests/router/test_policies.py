"""Routing policies and the prefix index, as units."""
import random
from collections import Counter

import pytest

from tandem.router.policies import (
    CacheAware,
    LeastLoad,
    PowerOfTwo,
    ReplicaLoad,
    RoundRobin,
    RouteRequest,
    Session,
    make_policy,
)
from tandem.router.prefix_index import PrefixIndex, text_blocks


def replicas(*loads: tuple[int, int]) -> list[ReplicaLoad]:
    return [ReplicaLoad(f"r{i}", n, t) for i, (n, t) in enumerate(loads)]


def req(prompt: int = 100, cached: dict | None = None, session: str | None = None):
    return RouteRequest(prompt, cached or {}, session)


def test_round_robin_cycles():
    rs = replicas((0, 0), (5, 500), (0, 0))
    assert [RoundRobin().pick(rs, req()).name for _ in range(1)] == ["r0"]
    rr = RoundRobin()
    assert [rr.pick(rs, req()).name for _ in range(6)] == ["r0", "r1", "r2"] * 2


def test_least_load_and_power_of_two_prefer_idle():
    rs = replicas((3, 300), (0, 0), (2, 10))
    assert LeastLoad().pick(rs, req()).name == "r1"
    p2 = PowerOfTwo(random.Random(0))
    picks = Counter(p2.pick(rs, req()).name for _ in range(300))
    assert picks["r0"] == 0  # the busiest never wins a pair
    assert PowerOfTwo().pick(rs[:1], req()).name == "r0"


def test_cache_aware_takes_the_hit_unless_the_load_outweighs_it():
    rs = replicas((1, 50), (0, 0))
    # r0 holds 800 of 1000 prompt tokens: 200 to compute + 50 queued beats 1000 on idle r1.
    assert CacheAware().pick(rs, req(1000, {"r0": 800})).name == "r0"
    # 1000 queued tokens weigh 500: still cheaper than recomputing 800 on r1.
    rs[0].inflight_tokens = 1000
    assert CacheAware().pick(rs, req(1000, {"r0": 800})).name == "r0"
    # The same hit, but r0 has 2000 tokens of work queued: go to the idle replica.
    rs[0].inflight_tokens = 2000
    assert CacheAware().pick(rs, req(1000, {"r0": 800})).name == "r1"
    # The replica's own queue counts as well as what the router sent it.
    rs[0].inflight_tokens, rs[0].waiting_tokens = 50, 5000
    assert CacheAware().pick(rs, req(1000, {"r0": 800})).name == "r1"


def test_cache_aware_breaks_ties_by_load():
    rs = replicas((4, 0), (1, 0))
    assert CacheAware().pick(rs, req(100)).name == "r1"


def test_session_is_sticky_and_moves_little_when_a_replica_goes():
    rs = replicas((0, 0), (0, 0), (0, 0), (0, 0))
    s = Session()
    before = {f"user{i}": s.pick(rs, req(session=f"user{i}")).name for i in range(400)}
    assert before == {k: s.pick(rs, req(session=k)).name for k in before}
    assert len(set(before.values())) == 4
    after = {k: s.pick(rs[:3], req(session=k)).name for k in before}
    moved = [k for k in before if before[k] != after[k]]
    assert all(before[k] == "r3" for k in moved)  # only the removed replica's sessions move
    assert Session().pick(replicas((3, 0), (0, 0)), req()).name == "r1"  # no key: least load


def test_session_key_with_a_lone_surrogate_routes():
    rs = replicas((0, 0), (0, 0))
    name = Session().pick(rs, req(session="\ud800")).name
    assert name == Session().pick(rs, req(session="\ud800")).name


def test_make_policy():
    assert isinstance(make_policy("cache_aware"), CacheAware)
    with pytest.raises(ValueError, match="^policy: "):
        make_policy("random")


def test_text_blocks_chain_and_prefix_property():
    a = text_blocks("x" * 64 * 3 + "tail")
    b = text_blocks("x" * 64 * 2 + "y" * 64)
    assert len(a) == 3 and a[:2] == b[:2] and a[2] != b[2]
    assert text_blocks("short") == []
    assert text_blocks("é" * 100) == text_blocks("é" * 100)


def test_prefix_index_matches_leading_blocks_only():
    idx = PrefixIndex()
    keys = text_blocks("abcd" * 16 * 5)
    idx.insert("r0", keys[:3])
    idx.insert("r1", keys[1:])  # the chain breaks at block 0: no prefix hit at all
    assert idx.match(keys, ["r0", "r1", "r2"]) == {"r0": 3, "r1": 0, "r2": 0}
    idx.remove("r0", keys[1:2])
    assert idx.match(keys, ["r0"]) == {"r0": 1}
    idx.replace("r1", keys[:2])
    assert idx.match(keys, ["r1"]) == {"r1": 2} and idx.size("r1") == 2
    idx.drop("r1")
    assert idx.size("r1") == 0 and idx.match(keys, ["r1"]) == {"r1": 0}


def test_prefix_index_is_bounded_lru_per_replica():
    idx = PrefixIndex(max_blocks_per_replica=4)
    old, new = text_blocks("a" * 64 * 2), text_blocks("b" * 64 * 3)
    idx.insert("r0", old)
    idx.match(old, ["r0"])  # a hit refreshes old's blocks...
    idx.insert("r0", new[:1])
    idx.insert("r0", new[1:])  # ...but 5 blocks exceed 4: the least recently used goes
    assert idx.size("r0") == 4
    assert idx.match(new, ["r0"]) == {"r0": 3}
    assert idx.match(old, ["r0"]) == {"r0": 0}  # old[0] was the LRU: its chain is broken
    with pytest.raises(ValueError):
        PrefixIndex(0)


def test_cache_aware_prices_a_shared_store_prefix_as_a_load():
    # r0 computed a 1000-token prefix and is busy; the shared store holds it too, so idle r1
    # loads it for a tenth of a recompute instead of every request piling onto r0.
    rs = replicas((2, 600), (0, 0))
    shared = RouteRequest(1000, {"r0": 1000}, shared_tokens=1000)
    assert CacheAware().pick(rs, shared).name == "r1"
    assert CacheAware().cost(rs[1], shared) == pytest.approx(100)
    # Without the store, the same load keeps it on r0: 300 queued beats a 1000-token recompute.
    assert CacheAware().pick(rs, req(1000, {"r0": 1000})).name == "r0"
    # What the store holds past a replica's own prefix is loaded; the rest computed.
    part = RouteRequest(1000, {"r0": 200}, shared_tokens=600)
    assert CacheAware().cost(rs[0], part) == pytest.approx(400 + 40 + 300)
