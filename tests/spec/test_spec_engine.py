"""Speculative decoding on the real SmolLM2 (float32), with n-gram proposals and with SmolLM2 as
its own draft model: greedy tokens equal the non-speculative engine's, in one batch of prompts some of which repeat themselves (many
proposals accepted) and some not, also with chunked prefill, with preemption, with stop
strings, logprobs and n > 1; seeded sampling repeats; the pools are idle afterwards."""
from __future__ import annotations

import pytest
from spec_helpers import GREEDY, PROMPTS, SPEC, assert_idle, config, make, tokens

from tandem import LLM, SamplingParams

METHODS = ["ngram", "draft"]


@pytest.fixture(scope="module")
def plain(smollm2_dir) -> LLM:
    return make(smollm2_dir, kv_cache_memory="64MiB")


@pytest.fixture(scope="module", params=METHODS)
def spec(request, smollm2_dir) -> LLM:
    llm = make(smollm2_dir, kv_cache_memory="64MiB",
               speculative_config=config(request.param, smollm2_dir))
    yield llm
    llm.shutdown()


@pytest.fixture(scope="module")
def want(plain) -> list[list[int]]:
    return tokens(plain)


def test_greedy_tokens_equal_the_plain_engines_and_proposals_are_accepted(spec, want):
    s = spec.engine.scheduler
    got = tokens(spec)
    assert got == want
    # The repetitive prompts make proposals the model agrees with: tokens for free.
    assert s.spec_draft_tokens > 40 and s.spec_accepted_tokens > 20, \
        (s.spec_draft_tokens, s.spec_accepted_tokens)
    if spec.engine.drafter is not None:  # the target drafting for itself: all accepted
        assert s.spec_accepted_tokens == s.spec_draft_tokens
    by_pos = s.spec_accepted_by_position
    assert len(by_pos) == 4 and by_pos[0] > 0 and by_pos == sorted(by_pos, reverse=True)
    assert sum(s.spec_accepted_by_position) == s.spec_accepted_tokens
    assert_idle(spec)


@pytest.mark.parametrize("kw", [
    {"max_num_batched_tokens": 24},  # prefill chunks and proposals share a small budget
    {"kv_cache_memory": 16 * 737_280},  # 16 blocks for 6 requests: preemption
], ids=["chunked_prefill", "preemption"])
@pytest.mark.parametrize("method", METHODS)
def test_greedy_tokens_hold_under_pressure(smollm2_dir, want, kw, method):
    llm = make(smollm2_dir, **({"kv_cache_memory": "64MiB"} | kw),
               speculative_config=config(method, smollm2_dir))
    try:
        got = tokens(llm)
        assert got == want
        if "max_num_batched_tokens" not in kw:
            assert llm.engine.scheduler.num_preemptions > 0
        assert llm.engine.scheduler.spec_accepted_tokens > 0
        assert_idle(llm)
    finally:
        llm.shutdown()


def test_stop_strings_max_tokens_logprobs_and_n(plain, spec):
    params = SamplingParams(temperature=0, max_tokens=23, logprobs=2, stop=["party-party", " 16,", "date, elder"],
                            n=2)
    for a, b in zip(plain.generate(PROMPTS, params), spec.generate(PROMPTS, params)):
        for ca, cb in zip(a.outputs, b.outputs):
            assert (cb.token_ids, cb.text, cb.finish_reason) == \
                (ca.token_ids, ca.text, ca.finish_reason)
            assert len(cb.logprobs) == len(cb.token_ids) <= 23
            for la, lb in zip(ca.logprobs, cb.logprobs):
                assert la.keys() == lb.keys()
                for t in la:
                    assert abs(la[t].logprob - lb[t].logprob) < 1e-3
    assert any(o.outputs[0].finish_reason == "stop" for o in spec.generate(PROMPTS, params))
    assert_idle(spec)


def test_seeded_sampling_repeats_and_stays_in_range(spec):
    params = SamplingParams(temperature=0.8, top_p=0.9, max_tokens=30, seed=11,
                            repetition_penalty=1.1, ignore_eos=True)
    first, second = tokens(spec, params), tokens(spec, params)
    assert first == second
    assert all(len(t) == 30 for t in first)
    assert_idle(spec)


def test_counters_reach_metrics_and_the_stats_line(spec, plain):
    from tandem.engine.stats import StatsLogger
    from tandem.server.metrics import render_metrics

    logger = StatsLogger(spec.engine, interval=0)
    spec.generate(PROMPTS[:2], GREEDY)
    s = spec.engine.scheduler
    text = render_metrics(spec.engine, "m")
    label = 'model_name="m"'
    assert f"tandem:spec_decode_num_draft_tokens_total{{{label}}} {s.spec_draft_tokens}" in text
    assert f"tandem:spec_decode_num_drafts_total{{{label}}} {s.spec_drafts}" in text
    assert 1 <= s.spec_draft_tokens / s.spec_drafts <= SPEC["num_speculative_tokens"]
    assert (f"tandem:spec_decode_num_accepted_tokens_total{{{label}}} "
            f"{s.spec_accepted_tokens}") in text
    for i in range(SPEC["num_speculative_tokens"]):
        assert (f'tandem:spec_decode_num_accepted_tokens_per_pos{{{label},position="{i}"}} '
                f"{s.spec_accepted_by_position[i]}") in text
    assert f"{s.spec_accepted_tokens}/{s.spec_draft_tokens} proposed tokens accepted" \
        in logger.maybe_log()
    assert "spec_decode" not in render_metrics(plain.engine, "m")  # speculation off: none


def test_cost_aware_proposals_keep_the_tokens_and_learn_step_times(smollm2_dir, want):
    llm = make(smollm2_dir, cost_aware=True, kv_cache_memory="64MiB", speculative_config=SPEC)
    try:
        assert tokens(llm) == want
        costs = llm.engine.spec_costs
        # Decode-only steps of all 7 requests, and steps with proposal rows beside them.
        assert 7 in costs.rows_seen and max(costs.rows_seen) > 7, costs.rows_seen
        assert all(t > 0 for t in costs.seconds.values())
        assert_idle(llm)
    finally:
        llm.shutdown()


def test_ngram_speculation_under_tensor_parallelism(smollm2_dir, want):
    """Rank 0 proposes, schedules and verifies; the workers only run the verification rows."""
    llm = make(smollm2_dir, kv_cache_memory="64MiB", speculative_config=SPEC,
               tensor_parallel_size=3)
    try:
        assert tokens(llm) == want
        assert llm.engine.scheduler.spec_accepted_tokens > 20
        assert_idle(llm)
    finally:
        llm.shutdown()
