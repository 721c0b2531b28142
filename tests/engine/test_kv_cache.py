"""The block pool on its own: pure Python, no model. Property tests drive random
allocate / grow / free sequences and check the pool's bookkeeping after every operation;
unit tests pin the hash chain, prefix hits and the eviction order."""
from hypothesis import event, given, settings
from hypothesis import strategies as st
from kv_checks import ShadowKV, check_pool

from tandem.engine.kv_cache import KVCacheManager, cdiv, hash_block
from tandem.engine.request import Request
from tandem.engine.sampling_params import SamplingParams


def make_request(rid: str, prompt: list[int], salt: str | None = None,
                 max_tokens: int = 16) -> Request:
    return Request(rid, prompt, SamplingParams(max_tokens=max_tokens), cache_salt=salt)


# Tokens from a tiny alphabet on top of a shared base make prefix hits (and hash reuse) common.
tokens = st.integers(0, 3)


@settings(max_examples=200, deadline=None)
@given(data=st.data(), block_size=st.sampled_from([1, 2, 4]), num_blocks=st.integers(1, 12),
       enable_caching=st.booleans(), base=st.lists(tokens, max_size=16))
def test_pool_invariants_under_random_operations(data, block_size, num_blocks, enable_caching,
                                                 base):
    kv = KVCacheManager(num_blocks, block_size, enable_caching)
    shadow = ShadowKV(block_size)
    live: list[Request] = []
    for step in range(data.draw(st.integers(1, 40), label="ops")):
        op = data.draw(st.sampled_from(["new", "grow", "free"]), label="op")
        if op == "new":
            k = data.draw(st.integers(0, len(base)))
            prompt = base[:k] + data.draw(st.lists(tokens, min_size=int(k == 0), max_size=8))
            req = make_request(str(step), prompt, data.draw(st.sampled_from([None, "a"])))
            before = (list(kv.ref_counts), list(kv.free), dict(kv.cached))
            hits = kv.get_computed_blocks(req)
            if not enable_caching:
                assert hits == []
            num_hit = len(hits) * block_size
            if hits:
                event("prefix hit")
            assert num_hit <= req.num_tokens - 1, "a hit must leave a token to compute"
            for i, b in enumerate(hits):
                assert kv.block_hash[b] == req.block_hashes[i]
            n = data.draw(st.integers(1, req.num_tokens - num_hit))
            if kv.allocate_slots(req, n, hits):
                req.num_computed_tokens = num_hit + n
                shadow.write(req, num_hit, n)
                shadow.check(req, req.num_computed_tokens)
                live.append(req)
            else:  # a failed allocation leaves the pool untouched
                event("pool full")
                assert (kv.ref_counts, list(kv.free), kv.cached) == before
                assert req.block_table == []
        elif op == "grow" and live:
            req = data.draw(st.sampled_from(live))
            for t in data.draw(st.lists(tokens, max_size=6)):
                req.append_token(t)
            remaining = req.num_tokens - req.num_computed_tokens
            if remaining == 0:
                continue
            n = data.draw(st.integers(1, remaining))
            table = list(req.block_table)
            if kv.allocate_slots(req, n):
                shadow.write(req, req.num_computed_tokens, n)
                req.num_computed_tokens += n
                shadow.check(req, req.num_computed_tokens)
                assert req.block_table[:len(table)] == table, "allocation moved existing blocks"
            else:
                assert req.block_table == table
        elif op == "free" and live:
            req = live.pop(data.draw(st.integers(0, len(live) - 1)))
            kv.free_request(req)
            assert req.block_table == []
        check_pool(kv, live)
        for req in live:
            shadow.check(req, req.num_computed_tokens)
    for req in live:
        kv.free_request(req)
    check_pool(kv, [])
    assert kv.num_free_blocks == num_blocks, "blocks leaked"


# --- hash_block -------------------------------------------------------------------------------

def test_hash_block_is_deterministic_and_sized():
    h = hash_block(None, [1, 2, 3, 4])
    assert h == hash_block(None, [1, 2, 3, 4])
    assert isinstance(h, bytes) and len(h) == 32


def test_hash_block_depends_on_every_input():
    parent = hash_block(None, [9, 9])
    h = hash_block(parent, [1, 2])
    assert h != hash_block(None, [1, 2]), "the parent must change the hash (chaining)"
    assert h != hash_block(hash_block(None, [9, 8]), [1, 2])
    assert h != hash_block(parent, [2, 1]), "token order matters"
    assert h != hash_block(parent, [1, 2], "tenant-a"), "the salt must change the hash"
    assert hash_block(None, [1], "a") != hash_block(None, [1], "b")
    assert hash_block(None, [1], "") == hash_block(None, [1], None)
    # Large ids are not truncated into collisions.
    assert hash_block(None, [2**40]) != hash_block(None, [0])


def test_hash_block_is_not_python_hash_and_is_pinned():
    tokens = [5, 6, 7, 8]
    h = hash_block(None, tokens, "salt")
    assert int.from_bytes(h[:8], "little", signed=True) != hash(tuple(tokens))
    # Golden digests: the router and every process must compute the same block ids, so a
    # change of the hash format has to be deliberate (and bump the domain tag).
    assert h.hex() == "102475afcdb105d824c33fa12f4a19a190452ef8cfa9b99ec8cf3daf6508fee4"
    assert hash_block(hash_block(None, [1, 2]), [3, 4]).hex() == (
        "2c6e988b643cb3804daf0cf8a22fa2645bf7eeb09da6d83ad1455117071db659")


def test_cdiv():
    assert [cdiv(n, 4) for n in (0, 1, 4, 5, 8, 9)] == [0, 1, 1, 2, 2, 3]


# --- prefix hits ------------------------------------------------------------------------------

def compute(kv: KVCacheManager, req: Request) -> list[int]:
    """Admit `req` as the scheduler would: take the hit, allocate the rest, mark it computed."""
    hits = kv.get_computed_blocks(req)
    n = req.num_tokens - len(hits) * kv.block_size
    assert kv.allocate_slots(req, n, hits)
    req.num_computed_tokens = req.num_tokens
    return hits


def test_prefix_hit_returns_the_shared_full_blocks():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    a = make_request("a", list(range(10)))  # two full blocks and a partial one
    assert compute(kv, a) == []
    b = make_request("b", list(range(8)) + [50, 51, 52])
    assert compute(kv, b) == a.block_table[:2]
    assert b.block_table[:2] == a.block_table[:2]
    assert b.block_table[2] != a.block_table[2]
    assert [kv.ref_counts[x] for x in a.block_table] == [2, 2, 1]
    check_pool(kv, [a, b])


def test_prefix_hit_always_leaves_one_token_to_compute():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    a = make_request("a", list(range(8)))  # exactly two full blocks
    compute(kv, a)
    b = make_request("b", list(range(8)))
    hits = kv.get_computed_blocks(b)
    assert hits == a.block_table[:1], "the block holding the last prompt token is recomputed"
    assert kv.get_computed_blocks(make_request("c", [0])) == []


def test_prefix_hit_survives_free_and_revives_the_block():
    kv = KVCacheManager(num_blocks=4, block_size=4)
    a = make_request("a", list(range(6)))
    compute(kv, a)
    first = a.block_table[0]
    kv.free_request(a)
    assert kv.num_free_blocks == 4 and kv.ref_counts[first] == 0
    b = make_request("b", list(range(4)) + [9, 9])
    assert compute(kv, b) == [first]
    assert kv.ref_counts[first] == 1 and first not in kv.free
    check_pool(kv, [b])


def test_no_hits_with_caching_disabled_or_another_salt():
    kv = KVCacheManager(num_blocks=8, block_size=4, enable_caching=False)
    compute(kv, make_request("a", list(range(9))))
    assert kv.get_computed_blocks(make_request("b", list(range(9)))) == []
    assert kv.cached == {}

    kv = KVCacheManager(num_blocks=8, block_size=4)
    compute(kv, make_request("a", list(range(9)), salt="alice"))
    assert kv.get_computed_blocks(make_request("b", list(range(9)), salt="bob")) == []
    assert kv.get_computed_blocks(make_request("c", list(range(9)))) == []
    assert len(kv.get_computed_blocks(make_request("d", list(range(9)), salt="alice"))) == 2


def test_decoded_tokens_fill_and_cache_blocks():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    a = make_request("a", [1, 2, 3])
    compute(kv, a)
    assert kv.cached == {}
    a.append_token(4)  # the sampled token completes the first block once it is computed
    assert kv.allocate_slots(a, 1)
    assert len(kv.cached) == 1 and kv.cached[a.block_hashes[0]] == a.block_table[0]
    a.num_computed_tokens += 1
    a.append_token(5)
    assert kv.allocate_slots(a, 1)
    assert len(a.block_table) == 2
    b = make_request("b", [1, 2, 3, 4, 7])
    assert kv.get_computed_blocks(b) == a.block_table[:1]


def test_failed_allocation_changes_nothing():
    kv = KVCacheManager(num_blocks=2, block_size=4)
    a = make_request("a", list(range(6)))
    compute(kv, a)
    b = make_request("b", list(range(20, 29)))
    before = (list(kv.ref_counts), list(kv.free), dict(kv.cached))
    assert not kv.allocate_slots(b, 9)
    assert (kv.ref_counts, list(kv.free), kv.cached) == before
    assert b.block_table == []


# --- eviction order ---------------------------------------------------------------------------

def test_lru_evicts_the_least_recently_freed_cached_block_first():
    kv = KVCacheManager(num_blocks=6, block_size=2)
    reqs = [make_request(name, [2 * i + 1, 2 * i + 2, 0]) for i, name in enumerate("abc")]
    for r in reqs:
        compute(kv, r)  # one full (cached) block and one partial (uncached) block each
    assert kv.num_free_blocks == 0
    full = {r.request_id: r.block_table[0] for r in reqs}
    for r in reqs:  # freed in the order a, b, c
        kv.free_request(r)
    assert kv.num_free_blocks == 6 and len(kv.cached) == 3
    # The three partial blocks hold nothing reusable: they are handed out first.
    n = make_request("n", [7, 8, 7, 8, 7])
    assert kv.allocate_slots(n, 5)
    assert not set(n.block_table) & set(full.values()), "cached blocks reused too early"
    # The next allocation must evict a cached block: a's, freed least recently.
    m = make_request("m", [9])
    assert kv.allocate_slots(m, 1)
    assert m.block_table == [full["a"]]
    assert kv.get_computed_blocks(make_request("x", [1, 2, 0])) == []
    assert kv.get_computed_blocks(make_request("y", [3, 4, 0])) == [full["b"]]
    assert kv.get_computed_blocks(make_request("z", [5, 6, 0])) == [full["c"]]
    check_pool(kv, [n, m])


def test_a_revived_block_becomes_most_recently_used():
    kv = KVCacheManager(num_blocks=4, block_size=2)
    a, b = make_request("a", [1, 2, 0]), make_request("b", [3, 4, 0])
    compute(kv, a)
    compute(kv, b)
    a_full, b_full = a.block_table[0], b.block_table[0]
    kv.free_request(a)
    kv.free_request(b)  # b's block is now more recently freed than a's
    c = make_request("c", [1, 2, 5])
    assert compute(kv, c) == [a_full]  # the hit revives a's block ...
    kv.free_request(c)  # ... and freeing it again makes it the most recently used
    d = make_request("d", [9, 9, 9, 9, 9])
    assert kv.allocate_slots(d, 5)
    assert b_full in d.block_table and a_full not in d.block_table
    assert kv.get_computed_blocks(make_request("x", [1, 2, 0])) == [a_full]
    assert kv.get_computed_blocks(make_request("y", [3, 4, 0])) == []
    check_pool(kv, [d])


def test_uncached_free_blocks_are_reused_before_cached_ones():
    kv = KVCacheManager(num_blocks=3, block_size=2)
    cached = make_request("c", [1, 2, 3])  # block 0 full (cached), block 1 partial
    compute(kv, cached)
    full, partial = cached.block_table
    kv.free_request(cached)
    # The partial block was freed after the full one in list order, but it holds nothing
    # reusable, so it goes to the front of the eviction order.
    r = make_request("r", [8])
    assert kv.allocate_slots(r, 1)
    assert r.block_table == [partial]
    r2 = make_request("r2", [9])
    assert kv.allocate_slots(r2, 1)
    assert r2.block_table != [full], "the cached block must be evicted last"
    assert kv.get_computed_blocks(make_request("h", [1, 2, 5])) == [full]


def test_shared_block_is_freed_only_by_its_last_holder():
    kv = KVCacheManager(num_blocks=4, block_size=2)
    a, b = make_request("a", [1, 2, 3]), make_request("b", [1, 2, 4])
    compute(kv, a)
    compute(kv, b)
    shared = a.block_table[0]
    assert b.block_table[0] == shared and kv.ref_counts[shared] == 2
    kv.free_request(a)
    assert kv.ref_counts[shared] == 1 and shared not in kv.free
    kv.free_request(b)
    assert kv.ref_counts[shared] == 0 and shared in kv.free
    check_pool(kv, [])
    assert kv.num_free_blocks == 4
