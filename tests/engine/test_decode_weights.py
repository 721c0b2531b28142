"""The matmul routes in tandem/layers/linear.py, and --decode-weight-dtype: steps of one or two
rows read a 16-bit copy of the weights, every other step the model's own."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tandem import LLM, SamplingParams
from tandem.config import EngineConfig
from tandem.layers.linear import LOWP_MAX_ROWS, SKINNY_MAX_ROWS, matmul


@pytest.mark.parametrize("rows", [1, 2, 3, 17, SKINNY_MAX_ROWS, SKINNY_MAX_ROWS + 1])
def test_matmul_routes_agree_with_linear(rows):
    g = torch.Generator().manual_seed(rows)
    x, w = torch.randn(rows, 96, generator=g), torch.randn(160, 96, generator=g)
    y = matmul(x, w)
    assert y.shape == (rows, 160) and y.is_contiguous()
    torch.testing.assert_close(y, F.linear(x, w), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("rows", [1, LOWP_MAX_ROWS, LOWP_MAX_ROWS + 1])
def test_lowp_copy_serves_only_small_steps(rows):
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(rows, 64, generator=g), torch.randn(48, 64, generator=g)
    # A copy that is visibly not the weight shows which one a step read.
    y = matmul(x, w, lowp=(2 * w).to(torch.float16))
    assert y.dtype == torch.float32
    expect = 2 * F.linear(x, w) if rows <= LOWP_MAX_ROWS else F.linear(x, w)
    torch.testing.assert_close(y, expect, rtol=1e-2, atol=5e-2)


def test_bad_decode_weight_dtype_names_the_field():
    with pytest.raises(ValueError, match="decode_weight_dtype"):
        EngineConfig(decode_weight_dtype="int3")


def test_float16_decode_copy_keeps_greedy_tokens(smollm2_dir):
    """On the real model, a single stream decoded through float16 weight copies gives the
    float32 engine's greedy tokens; batched steps (3 rows) read float32 and match exactly."""
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    prompts = ["The capital of France is", "Water boils at a temperature of",
               "def fibonacci(n):"]
    ref = LLM(smollm2_dir, dtype="float32", kv_cache_memory="64MiB")
    llm = LLM(smollm2_dir, dtype="float32", kv_cache_memory="64MiB",
              decode_weight_dtype="float16")
    runner = llm.engine.runner
    assert runner.model.lm_head.lowp.dtype == torch.float16
    assert runner.model.model.layers[0].mlp.down_proj.lowp.dtype == torch.float16
    single = [llm.generate(p, params)[0].outputs[0].token_ids for p in prompts]
    expect = [o.outputs[0].token_ids for o in ref.generate(prompts, params)]
    assert single == expect
    batched = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    assert batched == expect
