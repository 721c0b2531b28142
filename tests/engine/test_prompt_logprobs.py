"""Prompt logprobs (SamplingParams.prompt_logprobs, vLLM's shape) against HF transformers'
float32 log-softmax of the prompt: on SmolLM2, and on the conftest's 2-layer random Llama
(which loads at once) under chunked prefill, a prefix already cached, n > 1, recompute
preemption and tensor parallelism."""
from __future__ import annotations

import pytest
import torch
from helpers import save_tiny_model
from transformers import LlamaForCausalLM

from tandem import LLM, SamplingParams
from tandem.engine.outputs import RequestOutput

TOP = 3
TOL = 1e-3
GREEDY = {"temperature": 0.0, "max_tokens": 4, "ignore_eos": True}


def hf_logprobs(model_dir: str, prompts: list[list[int]]) -> list[torch.Tensor]:
    """Per prompt, HF's float32 log-softmax of every position: row p predicts token p + 1."""
    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.inference_mode():
        return [model(torch.tensor([ids])).logits[0].float().log_softmax(-1) for ids in prompts]


def check_against_hf(out: RequestOutput, ref: torch.Tensor, decode, top: int = TOP) -> None:
    """One entry per prompt token, None first; each holds the prompt token with HF's logprob
    and rank, and the `top` most likely tokens with HF's logprobs (ranks within float noise)."""
    ids, entries = out.prompt_token_ids, out.prompt_logprobs
    assert entries is not None and len(entries) == len(ids) and entries[0] is None
    for p in range(1, len(ids)):
        entry, want, token = entries[p], ref[p - 1], ids[p]
        for t, lp in entry.items():
            assert abs(lp.logprob - want[t].item()) <= TOL, (p, t, lp, want[t].item())
            assert lp.decoded_token == decode([t])
            # a rank is the number of tokens more likely, plus one: near-ties may go either way
            above = want[t].item()
            assert (want > above + TOL).sum() + 1 <= lp.rank <= (want > above - TOL).sum() + 1
        assert token in entry
        ranked = sorted((lp for t, lp in entry.items() if lp.rank <= top), key=lambda x: x.rank)
        assert [lp.rank for lp in ranked] == list(range(1, top + 1))
        assert [lp.logprob for lp in ranked] == pytest.approx(want.topk(top).values.tolist(),
                                                              abs=TOL)
        assert len(entry) in (top, top + 1)


# --- SmolLM2 --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smol(smollm2_dir) -> LLM:
    return LLM(model=smollm2_dir, dtype="float32", kv_cache_memory="64MiB")


def test_prompt_logprobs_match_hf_on_smollm2(smol, smollm2_dir):
    texts = ["Hi", "The capital of France is",
             "Once upon a time, in a small village by the sea, there lived an old fisherman who"]
    prompts = [smol.tokenizer.encode(t) for t in texts]
    assert len(prompts[0]) == 1  # a one-token prompt: nothing predicts its only token
    outs = smol.generate(texts, SamplingParams(prompt_logprobs=TOP, **GREEDY))
    plain = smol.generate(texts, SamplingParams(**GREEDY))
    for out, ref, alone in zip(outs, hf_logprobs(smollm2_dir, prompts), plain):
        check_against_hf(out, ref, smol.tokenizer.decode)
        assert out.outputs[0].token_ids == alone.outputs[0].token_ids
        assert alone.prompt_logprobs is None


# --- the tiny random Llama ------------------------------------------------------------------

PROMPTS = [[(7 * i + 3 * j) % 250 + 3 for j in range(13 + 9 * i)] for i in range(3)]


def tiny(tiny_dir: str, **kwargs) -> LLM:
    return LLM(model=tiny_dir, dtype="float32", **{"kv_cache_memory": 2**20, **kwargs})


@pytest.fixture(scope="module")
def tiny_ref(tiny_dir) -> list[torch.Tensor]:
    return hf_logprobs(tiny_dir, PROMPTS)


def generate(llm: LLM, prompts: list[list[int]], **params) -> list[RequestOutput]:
    params = {**GREEDY, "prompt_logprobs": TOP, **params}
    return llm.generate([{"prompt_token_ids": p} for p in prompts], SamplingParams(**params))


def check_idle(llm: LLM) -> None:
    assert not llm.engine.has_unfinished_requests()
    assert llm.engine.kv.num_free_blocks == llm.engine.kv.num_blocks


def test_chunked_prefill_collects_every_chunk(tiny_dir, tiny_ref):
    # Seven tokens a step: the first prompt (13 tokens) takes 7 then 6, and the second is
    # admitted beside the 6 with a one-token chunk, laid out as a decode row.
    llm = tiny(tiny_dir, max_num_batched_tokens=7)
    steps = []
    schedule = llm.engine.scheduler.schedule

    def spy():
        out = schedule()
        steps.append([(r.request_id, n) for r, n in zip(out.requests, out.num_tokens)])
        return out

    llm.engine.scheduler.schedule = spy
    outs = generate(llm, PROMPTS)
    assert [[n for _, n in step] for step in steps[:2]] == [[7], [6, 1]], steps
    for out, ref in zip(outs, tiny_ref):
        check_against_hf(out, ref, llm.tokenizer.decode)
    check_idle(llm)


def test_a_cached_prefix_is_recomputed_for_prompt_logprobs(tiny_dir, tiny_ref):
    llm = tiny(tiny_dir)
    first = generate(llm, PROMPTS[2:], prompt_logprobs=None)[0]
    assert first.prompt_logprobs is None
    again = generate(llm, PROMPTS[2:])[0]
    assert again.num_cached_tokens == 0  # it took no hit: every position was computed
    check_against_hf(again, tiny_ref[2], llm.tokenizer.decode)
    assert again.outputs[0].token_ids == first.outputs[0].token_ids
    # Its blocks still serve requests that do not ask for prompt logprobs.
    plain = generate(llm, PROMPTS[2:], prompt_logprobs=None)[0]
    assert plain.num_cached_tokens == (len(PROMPTS[2]) - 1) // 16 * 16 > 0
    check_idle(llm)


def test_n_children_share_one_list(tiny_dir, tiny_ref):
    llm = tiny(tiny_dir)
    out = generate(llm, PROMPTS[1:2], n=3, temperature=1.0, seed=5)[0]
    assert len(out.outputs) == 3
    check_against_hf(out, tiny_ref[1], llm.tokenizer.decode)
    check_idle(llm)


def test_preemption_neither_loses_nor_repeats_entries(tiny_dir, tiny_ref):
    # 16 blocks of 4 tokens hold 64; the prompts (13, 22, 31) and 20 new tokens each need
    # 126. Chunks of 8 stretch the prefills out, so preemption strikes mid-prompt too.
    llm = tiny(tiny_dir, kv_cache_memory=16 * 2048, block_size=4, max_num_batched_tokens=8)
    assert llm.engine.kv.num_blocks == 16
    seen = []
    preempt = llm.engine.scheduler._preempt

    def spy(req):
        seen.append((len(req.prompt_logprobs), req.num_prompt_tokens - 1))
        preempt(req)

    llm.engine.scheduler._preempt = spy
    outs = generate(llm, PROMPTS, max_tokens=20)
    # (entries collected, entries in all) of each request preempted: some mid-prompt, some after
    assert any(got < total for got, total in seen), seen
    assert any(got == total for got, total in seen), seen
    for out, ref in zip(outs, tiny_ref):
        check_against_hf(out, ref, llm.tokenizer.decode)
    want = [o.outputs[0].token_ids for o in generate(tiny(tiny_dir), PROMPTS, max_tokens=20)]
    assert [o.outputs[0].token_ids for o in outs] == want
    check_idle(llm)


def test_tensor_parallel_ranks_compute_the_prompt_rows(tmp_path):
    folder = save_tiny_model(tmp_path / "m")
    prompts = PROMPTS[:2]
    want = generate(tiny(folder), prompts)
    two = tiny(folder, tensor_parallel_size=2)
    try:
        got = generate(two, prompts)
    finally:
        two.shutdown()
    for g, w in zip(got, want):
        assert g.outputs[0].token_ids == w.outputs[0].token_ids
        for a, b in zip(g.prompt_logprobs[1:], w.prompt_logprobs[1:]):
            assert a.keys() == b.keys()
            assert all(abs(a[t].logprob - b[t].logprob) <= TOL for t in a)


@pytest.mark.parametrize("value", [-1, 21, 1.5, True, "2"])
def test_bad_values_name_the_field(value):
    with pytest.raises(ValueError, match="^prompt_logprobs: "):
        SamplingParams(prompt_logprobs=value)
