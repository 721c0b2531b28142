"""The engine against HF transformers on the real SmolLM2-135M (float32): the logits of every
prefill and decode step of a mixed batch, and the greedy tokens of one continuous batch of
prompts, also when blocks run short (preemption), prefills are chunked, or a prefix is cached.

HF references run one sequence at a time without padding, so nothing but our engine batches."""
from __future__ import annotations

import os
import sys

import pytest
import torch
from helpers import run_stepwise
from transformers import LlamaForCausalLM

from tandem import LLM, SamplingParams

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))

MAX_NEW = 32
BLOCK = 16
SHARED = ("Mira had lived all her life in the lighthouse at the edge of the northern cliffs. "
          "Every night she climbed the one hundred and twelve steps to light the great lamp, and "
          "every morning she wrote in a thick leather journal what the sea had brought in the "
          "dark. ")
PROMPTS = [
    "Hi",  # one token: its prefill is a one-row step, laid out like a decode
    "The capital of France is",
    "Water boils at a temperature of",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
    'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n',
    ("The three primary colors are red, blue and yellow. When you mix red and blue you get "
     "purple, and when you mix blue and yellow you get"),
    SHARED + "One stormy night in November,",
    SHARED + "Her younger brother Tomas",
    SHARED + "The journal was almost full, and on its last page she wrote",
]
SHARED_PROMPTS = [i for i, p in enumerate(PROMPTS) if p.startswith(SHARED)]
# Prompts for the logits test, cut from this text at fixed lengths.
PASSAGE = (
    "The old railway station had been closed for thirty years when the town council decided to "
    "turn it into a library. Volunteers scrubbed the tiled floors, repaired the clock above the "
    "platform and carried in boxes of books donated by every family on the hill. On the opening "
    "day the children were given the first library cards, printed to look like train tickets, "
    "and the stationmaster's grandson cut a ribbon strung across the old ticket barrier while a "
    "brass band played on the platform where the trains used to stop."
)


@pytest.fixture(scope="module")
def hf_model(smollm2_dir):
    model = LlamaForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32,
                                             attn_implementation="eager")
    return model.eval()


@pytest.fixture(scope="module")
def llm(smollm2_dir) -> LLM:
    return LLM(model=smollm2_dir, dtype="float32", kv_cache_memory="64MiB")


@pytest.fixture(scope="module")
def prompt_ids(llm) -> list[list[int]]:
    return [llm.tokenizer.encode(p) for p in PROMPTS]


@pytest.fixture(scope="module")
def hf_greedy(hf_model, prompt_ids) -> list[list[int]]:
    """HF's greedy continuation of each prompt, generated alone; it ends early (with the EOS
    token) where HF stops, and our ignore_eos outputs are compared over that span."""
    outs = []
    for ids in prompt_ids:
        x = torch.tensor([ids])
        with torch.inference_mode():
            y = hf_model.generate(x, attention_mask=torch.ones_like(x), do_sample=False,
                                  max_new_tokens=MAX_NEW)
        outs.append(y[0, len(ids):].tolist())
    # Most spans are long, so the comparison covers many decode steps, not just the first few.
    assert sum(len(o) >= 24 for o in outs) >= len(outs) - 1, [len(o) for o in outs]
    return outs


def hf_logits(hf_model, ids: list[int]) -> torch.Tensor:
    """Logits of every position of one unpadded sequence: row t predicts token t + 1."""
    with torch.inference_mode():
        return hf_model(torch.tensor([ids])).logits[0].float()


def bytes_per_block(llm: LLM) -> int:
    c = llm.engine.hf_config
    return 2 * c.num_hidden_layers * BLOCK * c.num_key_value_heads * c.head_dim * 4


def test_logits_match_hf_for_prefill_and_each_decode_step(llm, hf_model):
    ids = llm.tokenizer.encode(PASSAGE)
    assert len(ids) >= 94
    # Mixed lengths (under, at, and across block edges) prefilled together; a fifth request
    # arrives while the others decode, so one step mixes a prefill with decodes.
    first = {"p5": ids[:5], "p17": ids[10:27], "p33": ids[20:53], "p64": ids[30:94]}
    late = {"late40": ids[50:90]}
    num_decodes = 16
    run = run_stepwise(llm.engine, {0: first, 3: late}, max_tokens=num_decodes + 1)

    assert run.steps[0] == {rid: len(p) for rid, p in first.items()}
    assert run.steps[3] == {**{rid: 1 for rid in first}, "late40": 40}
    worst = {}
    for rid, prompt in {**first, **late}.items():
        ours = torch.stack(run.logits[rid])
        assert ours.shape == (num_decodes + 1, llm.engine.vocab_size)
        seq = prompt + run.tokens[rid]
        ref = hf_logits(hf_model, seq[:-1])[len(prompt) - 1:]
        assert ref.shape == ours.shape
        worst[rid] = (ours - ref).abs().max(dim=-1).values  # per step: prefill, then decodes
    bad = {rid: [round(v, 5) for v in d.tolist()] for rid, d in worst.items() if d.max() > 1e-3}
    assert not bad, f"max |ours - HF| per step exceeds 1e-3: {bad}"


VARIANTS = {
    "default": {},
    # Sixteen blocks hold one or two of these requests at a time: recompute preemption.
    "preemption": {"kv_blocks": 16},
    # Thirteen tokens a step: every longer prompt is prefilled in chunks that end mid-block.
    "chunked_prefill": {"max_num_batched_tokens": 13},
    "no_prefix_caching": {"enable_prefix_caching": False},
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_greedy_batch_matches_hf_generate(variant, smollm2_dir, llm, prompt_ids, hf_greedy):
    args = dict(VARIANTS[variant])
    if "kv_blocks" in args:
        args["kv_cache_memory"] = args.pop("kv_blocks") * bytes_per_block(llm)
    ours = llm if variant == "default" else LLM(
        model=smollm2_dir, dtype="float32", **{"kv_cache_memory": "64MiB", **args})
    engine = ours.engine
    preemptions_before = engine.scheduler.num_preemptions

    params = SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True)
    outs = ours.generate([{"prompt_token_ids": ids} for ids in prompt_ids], params)

    assert [o.prompt_token_ids for o in outs] == prompt_ids
    for i, (out, ref) in enumerate(zip(outs, hf_greedy)):
        got = out.outputs[0].token_ids
        assert out.finished and out.outputs[0].finish_reason == "length"
        assert len(got) == MAX_NEW
        assert got[:len(ref)] == ref, f"prompt {i} ({PROMPTS[i][:30]!r}): ours {got} HF {ref}"
        assert out.outputs[0].text == ours.tokenizer.decode(got, skip_special_tokens=True)
    # Every block comes back once the batch is done.
    assert engine.kv.num_free_blocks == engine.kv.num_blocks
    assert not engine.scheduler.has_unfinished()
    if variant == "preemption":
        assert engine.kv.num_blocks == 16
        assert engine.scheduler.num_preemptions > preemptions_before
    elif variant == "chunked_prefill":
        assert max(len(ids) for ids in prompt_ids) > 3 * engine.scheduler.max_num_batched_tokens
    else:
        assert engine.scheduler.num_preemptions == preemptions_before


def test_prefix_cache_hits_give_the_same_tokens(smollm2_dir, prompt_ids, hf_greedy):
    ours = LLM(model=smollm2_dir, dtype="float32", kv_cache_memory="64MiB")
    shared = {f"s{i}": prompt_ids[i] for i in SHARED_PROMPTS}
    first = prompt_ids[SHARED_PROMPTS[0]]
    common = min(next((k for k, (a, b) in enumerate(zip(first, p)) if a != b), len(p))
                 for p in shared.values())
    assert common >= 3 * BLOCK

    # Cold cache, one batch: the first request computes the shared blocks, the others are
    # admitted in the same step on top of them.
    cold = run_stepwise(ours.engine, {0: shared}, max_tokens=MAX_NEW)
    assert len(cold.steps[0]) == len(shared)
    hits = list(cold.computed_at_admission.values())
    assert hits[0] == 0
    assert all(h == common // BLOCK * BLOCK for h in hits[1:]), hits
    # The same prompts again, after the first batch finished: every full prompt block hits
    # (the last prompt token is always recomputed, to give logits to sample from).
    warm = run_stepwise(ours.engine, {0: {f"again-{k}": v for k, v in shared.items()}},
                        max_tokens=MAX_NEW)
    assert list(warm.computed_at_admission.values()) == [
        (len(p) - 1) // BLOCK * BLOCK for p in shared.values()]

    for i, rid in zip(SHARED_PROMPTS, shared):
        ref = hf_greedy[i]
        assert cold.tokens[rid][:len(ref)] == ref, f"cold {rid}"
        assert warm.tokens[f"again-{rid}"] == cold.tokens[rid], f"warm {rid}"
    assert ours.engine.kv.num_free_blocks == ours.engine.kv.num_blocks


@pytest.mark.dtype_sensitive
def test_auto_dtype_logits_are_as_close_to_float32_as_hf_in_that_dtype(smollm2_dir, hf_model):
    """`dtype="auto"` is bfloat16 or float32 by the CPU (TANDEM_CPU_BF16 flips it; `make test`
    runs this both ways). Every position of the prompts and the passage is scored (~350
    next-token predictions) against HF float32: in float32 Tandem matches it; in bfloat16 it
    must be about as close as HF's own bfloat16, by the largest logit error and by how often
    the top-1 token is float32's, because bfloat16 flips near-ties in HF as in Tandem."""
    from kv_accuracy import Scorer  # benchmarks/, on sys.path above

    ours = LLM(model=smollm2_dir, kv_cache_memory="64MiB", enable_prefix_caching=False)
    dtype = ours.engine.config.torch_dtype
    seqs = [ours.tokenizer.encode(p) for p in [*PROMPTS, PASSAGE]]
    hf_same = LlamaForCausalLM.from_pretrained(smollm2_dir, dtype=dtype).eval()
    scorer = Scorer(ours)
    ref = torch.cat([hf_logits(hf_model, s) for s in seqs])
    theirs = torch.cat([hf_logits(hf_same, s) for s in seqs])
    mine = torch.cat([scorer.logits(s) for s in seqs])
    assert ref.shape == mine.shape and ref.shape[0] >= 300
    err_ours, err_hf = (mine - ref).abs().max().item(), (theirs - ref).abs().max().item()
    top1_ours = (mine.argmax(-1) == ref.argmax(-1)).float().mean().item()
    top1_hf = (theirs.argmax(-1) == ref.argmax(-1)).float().mean().item()
    if dtype == torch.float32:
        assert err_ours <= 1e-3 and top1_ours == 1.0, (err_ours, top1_ours)
    else:
        assert dtype == torch.bfloat16
        assert err_ours <= 2 * err_hf + 0.05, (err_ours, err_hf)
        assert top1_ours >= top1_hf - 0.03, (top1_ours, top1_hf)
    print(f"{dtype}: max |logit - float32| Tandem {err_ours:.3f} HF {err_hf:.3f}; top-1 as "
          f"float32 Tandem {top1_ours:.3f} HF {top1_hf:.3f} over {ref.shape[0]} positions")
