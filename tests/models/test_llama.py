"""Llama checkpoints laid out unlike SmolLM2's: untied LM head, explicit head_dim, weights in
several safetensors shards with an index, all checked against HF transformers."""
from __future__ import annotations

import json
import os

import pytest
import torch
from helpers import run_stepwise, save_tiny_model
from transformers import LlamaForCausalLM

from tandem import LLM


@pytest.fixture(scope="module")
def sharded_dir(tmp_path_factory, smollm2_dir) -> str:
    return save_tiny_model(tmp_path_factory.mktemp("llama"), "llama", tokenizer_dir=smollm2_dir,
                           tie_word_embeddings=False, head_dim=32, max_shard_size="200KB")


def test_untied_sharded_llama_matches_hf(sharded_dir):
    shards = [f for f in os.listdir(sharded_dir) if f.endswith(".safetensors")]
    assert len(shards) >= 2
    with open(os.path.join(sharded_dir, "model.safetensors.index.json")) as f:
        index = json.load(f)["weight_map"]
    assert set(index.values()) == set(shards)
    assert "lm_head.weight" in index

    hf = LlamaForCausalLM.from_pretrained(sharded_dir, dtype=torch.float32,
                                          attn_implementation="eager").eval()
    llm = LLM(model=sharded_dir, dtype="float32", kv_cache_memory="4MiB")
    model = llm.engine.runner.model
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    torch.testing.assert_close(model.lm_head.weight, hf.lm_head.weight, rtol=0, atol=0)

    ids = llm.tokenizer.encode("A tiny model with its own output head, spread over shards, says")
    prompts = {"a": ids, "b": ids[3:], "c": ids[:2]}
    run = run_stepwise(llm.engine, {0: prompts}, max_tokens=6)
    for rid, prompt in prompts.items():
        seq = prompt + run.tokens[rid]
        with torch.inference_mode():
            ref = hf(torch.tensor([seq[:-1]])).logits[0, len(prompt) - 1:].float()
        diff = (torch.stack(run.logits[rid]) - ref).abs().max().item()
        assert diff <= 1e-4, f"{rid}: max |ours - HF| = {diff}"
