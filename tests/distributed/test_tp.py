"""Tensor parallelism with real gloo process groups: rank 0 is this test process (the engine),
the other ranks are `python -m tandem.distributed.worker` processes it spawns."""
import pytest
import torch
from helpers import run_stepwise, save_tiny_model

from tandem import LLM, SamplingParams

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time",
           "The three primary colours are", "import numpy as np\n", "Water boils at",
           "My favourite book is", "1, 2, 3, 5, 8,"]


def test_tp3_greedy_tokens_match_tp1_on_smollm2(smollm2_dir):
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    one = LLM(model=smollm2_dir, dtype="float32", kv_cache_memory="64MiB")
    want = [o.outputs[0].token_ids for o in one.generate(PROMPTS, params)]
    three = LLM(model=smollm2_dir, dtype="float32", kv_cache_memory="64MiB",
                tensor_parallel_size=3)
    try:
        got = [o.outputs[0].token_ids for o in three.generate(PROMPTS, params)]
        # Each rank holds a third of the heads, so the same memory holds 3x the tokens.
        assert three.engine.kv_capacity_tokens == 3 * one.engine.kv_capacity_tokens
    finally:
        three.shutdown()
    assert got == want


def test_tp3_on_the_4bit_model_agrees_with_tp1(smollm2_dir):
    """Each rank packs its own shard of the 4-bit codes (a group never straddles ranks); the
    int4 kernel rounds its partial sums to bfloat16 before the all-reduce, so TP=3 sums in
    another order than TP=1: tokens agree up to near-ties, most of them exactly."""
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    args = {"model": smollm2_dir, "dtype": "float32", "kv_cache_memory": "64MiB",
            "quantization": "gguf"}
    want = [o.outputs[0].token_ids for o in LLM(**args).generate(PROMPTS, params)]
    three = LLM(**args, tensor_parallel_size=3)
    try:
        got = [o.outputs[0].token_ids for o in three.generate(PROMPTS, params)]
    finally:
        three.shutdown()
    same = [next((i for i, (a, b) in enumerate(zip(g, w)) if a != b), len(w))
            for g, w in zip(got, want)]
    assert sum(same) >= 0.75 * 16 * len(PROMPTS) and sum(s > 0 for s in same) >= 7, same


@pytest.fixture(scope="module")
def tiny_sharded(tmp_path_factory) -> str:
    """4 query and 2 KV heads (N=4 replicates KV heads), untied embeddings, several shards."""
    return save_tiny_model(tmp_path_factory.mktemp("tp") / "m", hidden_size=64,
                           num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
                           max_shard_size="2MB", tie_word_embeddings=False)


def logits_of(llm: LLM) -> dict[str, list[torch.Tensor]]:
    prompts = {f"p{i}": [(13 * i + 7 * j) % 400 + 3 for j in range(5 + 9 * i)] for i in range(4)}
    late = {"late": [(5 * j) % 300 + 11 for j in range(21)]}  # joins mid-decode
    return run_stepwise(llm.engine, {0: prompts, 2: late}, max_tokens=6).logits


@pytest.mark.parametrize("n", [2, 4])
def test_tp_logits_match_tp1(tiny_sharded, n):
    import glob
    import os

    assert len(glob.glob(os.path.join(tiny_sharded, "*.safetensors"))) > 1
    want = logits_of(LLM(model=tiny_sharded, dtype="float32", kv_cache_memory=2**20))
    tp = LLM(model=tiny_sharded, dtype="float32", kv_cache_memory=2**20, tensor_parallel_size=n)
    try:
        got = logits_of(tp)
    finally:
        tp.shutdown()
    assert got.keys() == want.keys()
    for rid in want:
        diff = (torch.stack(got[rid]) - torch.stack(want[rid])).abs().max().item()
        assert diff < 1e-4, (rid, diff)


def test_wrong_size_fails_before_any_process_starts(smollm2_dir):
    with pytest.raises(ValueError, match=r"^tensor_parallel_size: 2 ranks cannot split the "
                                         r"model's 9 query heads; sizes that work .*: 1, 3"):
        LLM(model=smollm2_dir, tensor_parallel_size=2)


def test_each_rank_loads_only_its_share_of_the_weights(tmp_path):
    """Peak anonymous memory while loading, per rank, under 1/N + 20% of the full weights
    (benchmarks/tp_load_memory.py; the untied 49k-token embedding and LM head are the bulk,
    so a rank that read whole tensors would be far over)."""
    import os
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))
    from tp_load_memory import full_bytes, measure

    model = save_tiny_model(tmp_path / "m", hidden_size=256, num_attention_heads=4,
                            num_key_value_heads=2, intermediate_size=1024, num_hidden_layers=4,
                            max_shard_size="40MB", tie_word_embeddings=False)
    full = full_bytes(model, "float32")
    assert full > 100 * 2**20
    for n in (2, 4):  # measured: 0.508 and 0.26 of the full weights per rank
        ranks = measure(model, n)
        assert len(ranks) == n
        for r in ranks:
            assert r["param_bytes"] <= full / n * 1.05
            assert r["peak_bytes"] <= (1 / n + 0.2) * full, (n, r, full)


def test_two_nodes_form_one_group(tiny_sharded):
    """--nnodes 2 on one host: node 1 is a `tandem serve --node-rank 1` process (compute only),
    node 0 is this process; they meet at --master-port like two machines would."""
    import subprocess
    import sys

    from tandem.distributed.group import free_port

    port = free_port("127.0.0.1")
    node1 = subprocess.Popen([sys.executable, "-m", "tandem.cli", "serve", "--model", tiny_sharded,
                              "--dtype", "float32", "--kv-cache-memory", str(2**20), "-tp", "2",
                              "--nnodes", "2", "--node-rank", "1", "--master-addr", "127.0.0.1",
                              "--master-port", str(port)])
    try:
        want = logits_of(LLM(model=tiny_sharded, dtype="float32", kv_cache_memory=2**20))
        tp = LLM(model=tiny_sharded, dtype="float32", kv_cache_memory=2**20,
                 tensor_parallel_size=2, nnodes=2, node_rank=0, master_addr="127.0.0.1",
                 master_port=port)
        try:
            got = logits_of(tp)
        finally:
            tp.shutdown()
        assert node1.wait(timeout=30) == 0  # told to stop, it exits cleanly
    finally:
        if node1.poll() is None:
            node1.kill()
            node1.wait()
    for rid in want:
        assert (torch.stack(got[rid]) - torch.stack(want[rid])).abs().max().item() < 1e-4
