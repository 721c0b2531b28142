"""Prefix caching and the fp8 KV cache together with chunked prefill and preemption: for each
KV cache dtype, greedy tokens do not depend on whether a shared prefix came from the cache,
how prefills were chunked, or whether requests were preempted and recomputed."""
import pytest

from tandem import LLM, SamplingParams

SHARED = [(11 * j) % 240 + 5 for j in range(40)]  # two and a half blocks of 16
PROMPTS = [{"prompt_token_ids": SHARED + [(7 * i + j) % 240 + 5 for j in range(6 + 3 * i)]}
           for i in range(4)]
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
KV_DTYPES = ["auto", "fp8_e4m3", "fp8_e5m2"]


def run(tiny_dir: str, kv: str, blocks: int | None = None, **kwargs) -> tuple[list, LLM]:
    llm = LLM(model=tiny_dir, dtype="float32", kv_cache_dtype=kv, kv_cache_memory=2**20,
              **kwargs)
    if blocks is not None:  # a pool of exactly this many blocks
        llm = LLM(model=tiny_dir, dtype="float32", kv_cache_dtype=kv,
                  kv_cache_memory=blocks * llm.engine.runner.bytes_per_block, **kwargs)
    # Twice: the second round finds every full prompt block cached (when caching is on).
    tokens = [[o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY)] for _ in range(2)]
    engine = llm.engine
    assert engine.kv.num_free_blocks == engine.kv.num_blocks, "blocks leaked"
    return tokens, llm


@pytest.fixture(scope="module", params=KV_DTYPES)
def kv(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def uncached(tiny_dir, kv) -> list[list[int]]:
    tokens, llm = run(tiny_dir, kv, enable_prefix_caching=False)
    assert llm.engine.scheduler.prefix_cache_hits == 0
    assert tokens[0] == tokens[1]
    return tokens[0]


def test_prefix_hits_give_the_same_tokens(tiny_dir, kv, uncached):
    tokens, llm = run(tiny_dir, kv)
    sched = llm.engine.scheduler
    # Round 1: three requests reuse the shared prefix's 2 full blocks; round 2: all four
    # reuse every full block of their prompt.
    assert sched.prefix_cache_hits >= 3 * 32 + 4 * 32
    assert tokens == [uncached, uncached]


def test_chunked_prefill_with_prefix_hits_gives_the_same_tokens(tiny_dir, kv, uncached):
    tokens, llm = run(tiny_dir, kv, max_num_batched_tokens=7)
    assert llm.engine.scheduler.prefix_cache_hits > 0
    assert tokens == [uncached, uncached]


def test_preemption_with_prefix_hits_gives_the_same_tokens(tiny_dir, kv, uncached):
    # 6 blocks of 16 tokens: each request ends at 4-5 blocks, two of them in the shared prefix.
    tokens, llm = run(tiny_dir, kv, blocks=6)
    assert llm.engine.scheduler.num_preemptions >= 1, "the pool never ran dry"
    assert llm.engine.scheduler.prefix_cache_hits > 0
    assert tokens == [uncached, uncached]


def test_fp8_changes_the_numbers_but_not_the_plumbing(tiny_dir):
    """Not a tautology: the fp8 cache really rounds (the random model's logits move)."""
    auto = LLM(model=tiny_dir, dtype="float32", kv_cache_memory=2**20)
    fp8 = LLM(model=tiny_dir, dtype="float32", kv_cache_memory=2**20, kv_cache_dtype="fp8_e5m2")
    params = SamplingParams(temperature=0.0, max_tokens=4, logprobs=0, ignore_eos=True)
    a = auto.generate(PROMPTS[:1], params)[0].outputs[0]
    b = fp8.generate(PROMPTS[:1], params)[0].outputs[0]
    lp_a = [e[t].logprob for t, e in zip(a.token_ids, a.logprobs)]
    lp_b = [e[t].logprob for t, e in zip(b.token_ids, b.logprobs)]
    assert lp_a != lp_b
