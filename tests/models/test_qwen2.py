"""Qwen2 (the Llama layout plus q/k/v biases) against HF transformers, on a tiny random
checkpoint saved by HF itself."""
from __future__ import annotations

import pytest
import torch
from helpers import run_stepwise, save_tiny_model
from transformers import Qwen2ForCausalLM

from tandem import LLM, SamplingParams

PROMPTS = [
    "Hello there",
    "The quick brown fox jumps over the lazy dog because it was",
    ("In 1969 the first humans walked on the surface of the Moon, and millions of people around "
     "the world watched the grainy pictures on television as Neil Armstrong said"),
]


@pytest.fixture(scope="module")
def qwen2_dir(tmp_path_factory, smollm2_dir) -> str:
    return save_tiny_model(tmp_path_factory.mktemp("qwen2"), "qwen2", tokenizer_dir=smollm2_dir)


@pytest.fixture(scope="module")
def hf_model(qwen2_dir):
    return Qwen2ForCausalLM.from_pretrained(qwen2_dir, dtype=torch.float32,
                                            attn_implementation="eager").eval()


@pytest.fixture(scope="module")
def llm(qwen2_dir) -> LLM:
    return LLM(model=qwen2_dir, dtype="float32", kv_cache_memory="4MiB")


def test_checkpoint_has_nonzero_qkv_biases(hf_model):
    attn = hf_model.model.layers[0].self_attn
    for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
        assert proj.bias is not None and proj.bias.abs().min() > 0
    assert attn.o_proj.bias is None


def test_logits_match_hf_for_prefill_and_decode(llm, hf_model):
    prompts = {f"q{i}": llm.tokenizer.encode(p) for i, p in enumerate(PROMPTS)}
    assert len({len(p) for p in prompts.values()}) == len(prompts)  # mixed lengths
    run = run_stepwise(llm.engine, {0: prompts}, max_tokens=9)
    for rid, prompt in prompts.items():
        ours = torch.stack(run.logits[rid])
        with torch.inference_mode():
            seq = prompt + run.tokens[rid]
            ref = hf_model(torch.tensor([seq[:-1]])).logits[0, len(prompt) - 1:].float()
        assert ours.shape == ref.shape == (9, 49152)
        diff = (ours - ref).abs().max().item()
        assert diff <= 1e-4, f"{rid}: max |ours - HF| = {diff}"
        assert ref.std() > 1  # logits spread wide enough that greedy has clear winners


def test_greedy_matches_hf_generate(llm, hf_model):
    ids = [llm.tokenizer.encode(p) for p in PROMPTS]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in ids], params)
    for p, out in zip(ids, outs):
        x = torch.tensor([p])
        with torch.inference_mode():
            y = hf_model.generate(x, attention_mask=torch.ones_like(x), do_sample=False,
                                  max_new_tokens=24)
        ref = y[0, len(p):].tolist()
        assert len(ref) >= 8 and len(set(ref)) > 3  # a real continuation, not one token repeated
        assert out.outputs[0].token_ids[:len(ref)] == ref
