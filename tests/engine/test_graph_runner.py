"""The CUDA-graph runner's bucketing, padding and static buffers, on the real engine.

The capture itself needs a GPU (benchmarks/gpu_check.py checks it: greedy tokens with graphs on
and off). Here `capture=False` runs the same static buffers and padded batches through the
eager forward pass, so everything but `torch.cuda.graph` is exercised on the CPU.
"""
from __future__ import annotations

import pytest
import torch

from tandem import LLM, SamplingParams
from tandem.distributed.step import StepInputs
from tandem.engine.graph_runner import GraphRunner, capture_sizes
from tandem.engine.kv_cache import cdiv


def test_capture_sizes() -> None:
    assert capture_sizes(256) == [1, 2, 4, 8, *range(16, 257, 16)]
    assert capture_sizes(20) == [1, 2, 4, 8, 16, 20]
    assert capture_sizes(8) == [1, 2, 4, 8]
    assert capture_sizes(5) == [1, 2, 4, 5]
    assert capture_sizes(1) == [1]


def _with_graphs(llm: LLM, max_batch: int) -> GraphRunner:
    runner = llm.engine.runner
    width = cdiv(llm.engine.max_model_len, runner.block_size)
    runner.graphs = GraphRunner(runner, max_batch, width, capture=False)
    return runner.graphs


def _prompts() -> list[dict]:
    g = torch.Generator().manual_seed(0)
    lengths = (1, 5, 17, 33, 3, 40, 9, 2, 21, 12)  # 10 requests: more than the largest graph
    return [{"prompt_token_ids": torch.randint(3, 250, (n,), generator=g).tolist()}
            for n in lengths]


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "fp8"])
def test_padded_decode_steps_match_eager(tiny_dir, kv_cache_dtype) -> None:
    """Greedy tokens and the KV pool are the same with the graph runner's padded steps as
    without; steps of more rows than the largest graph, and steps with prefills, run eagerly."""
    kw = {"model": tiny_dir, "dtype": "float32", "enforce_eager": True, "block_size": 8,
          "kv_cache_dtype": kv_cache_dtype, "kv_cache_memory": "4MiB"}
    # Requests finish one after another, so decode steps shrink from 10 rows to 1.
    params = [SamplingParams(temperature=0, max_tokens=3 + 2 * i, ignore_eos=True)
              for i in range(10)]
    ref_llm, llm = LLM(**kw), LLM(**kw)
    graphs = _with_graphs(llm, max_batch=6)
    used: list[int] = []
    run = graphs.run
    graphs.run = lambda inp: used.append(inp.input_ids.numel()) or run(inp)
    ref = [o.outputs[0].token_ids for o in ref_llm.generate(_prompts(), params)]
    got = [o.outputs[0].token_ids for o in llm.generate(_prompts(), params)]
    assert got == ref
    # Decode steps of 10 rows ran eagerly; as requests finished, smaller ones were padded.
    assert used and max(used) <= 6 and any(n not in graphs.sizes for n in used)
    pool = llm.engine.runner.num_blocks
    ours, theirs = llm.engine.runner, ref_llm.engine.runner
    torch.testing.assert_close(ours.kv_cache[:, :, :, :pool].float(),
                               theirs.kv_cache[:, :, :, :pool].float(), rtol=0, atol=1e-5)
    if ours.kv_scale is not None:
        torch.testing.assert_close(ours.kv_scale[:, :, :, :pool], theirs.kv_scale[:, :, :, :pool])
    # Padded rows wrote the sink block, and nothing the reference engine did not.
    assert ours.kv_cache[:, :, :, pool].float().abs().sum() > 0
    assert theirs.kv_cache[:, :, :, pool].float().abs().sum() == 0


def test_fits_and_padding(tiny_dir) -> None:
    llm = LLM(model=tiny_dir, dtype="float32", enforce_eager=True, kv_cache_memory="4MiB")
    graphs = _with_graphs(llm, max_batch=4)
    width = graphs.tables.shape[1]

    def step(n: int, w: int = 2, prefill: bool = False) -> StepInputs:
        ids = torch.arange(n) + 5
        none = torch.zeros(0, dtype=torch.int64)
        return StepInputs(ids, ids, ids + 100, torch.ones(n, w, dtype=torch.int64),
                          ids + 1, torch.tensor([[0, n, 0]]) if prefill else none.view(0, 3),
                          none, none, none)

    assert graphs.fits(step(1)) and graphs.fits(step(4)) and graphs.fits(step(3, width))
    assert not graphs.fits(step(5))  # more rows than the largest graph
    assert not graphs.fits(step(2, width + 1))  # a wider block table than the buffers
    assert not graphs.fits(step(2, prefill=True))
    graphs.run(step(4, w=3))
    out = graphs.run(step(3))
    assert out.shape == (3, llm.engine.hf_config.hidden_size)
    # Row 3, left over from the 4-row step, is padding again: token 0 at position 0, writing
    # the sink and attending to it alone; the real rows' tables are cleared past their width.
    assert graphs.input_ids[:4].tolist() == [5, 6, 7, 0]
    assert graphs.slots[3] == graphs.sink_slot == llm.engine.runner.num_blocks * 16
    assert graphs.lens[:4].tolist() == [6, 7, 8, 1]
    assert graphs.tables[:4, :3].tolist() == [[1, 1, 0], [1, 1, 0], [1, 1, 0], [0, 0, 0]]
