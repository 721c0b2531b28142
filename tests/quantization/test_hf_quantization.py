"""`quantization="int4"|"int8"`: an HF folder's weights quantized while loading, and `auto`."""
from __future__ import annotations

import math
import os
import sys

import pytest
import torch

from tandem import LLM
from tandem.config import EngineConfig
from tandem.layers.linear import LinearBase
from tandem.loader.weights import resolve_quantization
from tandem.quantization.int8 import dequantize_int8, int8_matmul, quantize_int8
from tandem.quantization.q8_0 import dequantize_q8_0

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))
from test_gguf_serving import TEXT

CPU = torch.device("cpu")


def test_int8_rounds_to_nearest_and_the_kernel_multiplies_by_it():
    w = torch.randn(64, 96) * torch.linspace(0.01, 3, 64)[:, None]
    w[5] = 0  # an all-zero row must not divide by zero
    codes, scale = quantize_int8(w)
    back = dequantize_int8(codes, scale)
    assert (back - w).abs().le(scale[:, None] / 2 + 1e-7).all()
    assert not back[5].any()
    x = torch.randn(3, 96)
    want = x.bfloat16().float() @ back.T  # the kernel runs on bfloat16 activations
    got = int8_matmul(x, codes, scale.bfloat16())
    assert got.dtype == x.dtype
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)


@pytest.fixture(scope="module")
def models(smollm2_dir) -> dict[str, LLM]:
    common = {"model": smollm2_dir, "dtype": "float32", "kv_cache_memory": "64MiB",
              "enable_prefix_caching": False}
    return {q: LLM(**common, quantization=q) for q in ("none", "int4", "int8")}


@pytest.mark.parametrize("method", ["int4", "int8"])
def test_quantized_folder_agrees_with_the_unquantized_model(models, method):
    """Bounds a little under what this text measures (int4 98.8%, int8 96.4% top-1; the int8
    LM head costs most of it: docs/quantization.md), so a broken kernel or layout fails."""
    from kv_accuracy import Scorer

    ids = models["none"].tokenizer.encode(TEXT)
    ref, ours = Scorer(models["none"]).logprobs(ids)[:-1], Scorer(models[method]).logprobs(ids)[:-1]
    target = torch.tensor(ids[1:])[:, None]
    agree = (ref.argmax(-1) == ours.argmax(-1)).float().mean().item()
    ppl = math.exp((ref.gather(1, target) - ours.gather(1, target)).mean().item()) - 1
    print(f"{method} vs float32: top-1 {agree:.4f}, perplexity {100 * ppl:+.2f}%")
    assert agree >= 0.94 and ppl <= 0.02, (agree, ppl)


def test_every_weight_is_held_quantized(models):
    runner = models["int4"].engine.runner
    model = runner.model
    linears = [m for m in model.modules() if isinstance(m, LinearBase)]
    assert len(linears) == 30 * 4
    assert all(m.quant is not None and "weight" not in m._parameters for m in linears)
    embed = model.model.embed_tokens
    assert embed.quant is not None and model.lm_head.quant is embed.quant  # tied: one table
    assert not hasattr(embed, "weight") and not hasattr(model.lm_head, "weight")
    dense = models["none"].engine.runner.weight_bytes
    # With AVX2 only, few-row steps read a float16 copy of the LM head (prepare_q8)
    copy = 49152 * 576 * 2 * (model.lm_head.quant.f16 is not None)
    assert runner.weight_bytes - copy < dense / 5
    assert models["int8"].engine.runner.weight_bytes - copy < dense / 3.5
    # the embedding looks its rows up from the Q8_0 table, as the LM head multiplies by it
    ids = torch.tensor([0, 17, 49151])
    want = dequantize_q8_0(embed.quant.codes, embed.quant.scale)[ids]
    torch.testing.assert_close(embed(ids), want, rtol=0, atol=0)


def test_layers_quantize_while_the_checkpoint_is_read(smollm2_dir, monkeypatch):
    """Each layer quantizes when its last shard arrives, not after the whole model is read."""
    from tandem.layers import linear

    events = []
    copy_into, finish = linear.copy_into, LinearBase.finish_loading
    monkeypatch.setattr(linear, "copy_into", lambda *a, **k: (events.append("read"),
                                                              copy_into(*a, **k)))
    monkeypatch.setattr(LinearBase, "finish_loading",
                        lambda self, *a: (events.append("quantize"), finish(self, *a)))
    LLM(model=smollm2_dir, dtype="float32", kv_cache_memory="16MiB", quantization="int8")
    assert events.count("quantize") == 30 * 4
    first, last_read = events.index("quantize"), len(events) - events[::-1].index("read")
    assert first < last_read / 10, (first, last_read)


def test_a_group_that_would_straddle_is_refused_before_loading(smollm2_dir, monkeypatch):
    from tandem.layers import linear

    monkeypatch.setattr(linear, "copy_into", lambda *a, **k: pytest.fail("weights were read"))
    with pytest.raises(ValueError, match=r"^quantization_group_size: 576 input features per "
                                         r"rank would split a group of 128"):
        LLM(model=smollm2_dir, quantization="int4", quantization_group_size=128)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"quantization": "int4", "quantization_group_size": 48}, "quantization_group_size: must be"),
    ({"quantization": "int8", "quantization_group_size": 64}, "only with quantization 'int4'"),
    ({"quantization": "gguf", "quantization_group_size": 64}, "only with quantization 'int4'"),
    ({"quantization": "int2"}, "quantization: must be one of"),
])
def test_bad_settings_name_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EngineConfig(**kwargs)


@pytest.mark.parametrize("method", ["int4", "int8"])
def test_quantizing_a_gguf_model_is_refused(method):
    with pytest.raises(ValueError, match=rf"^quantization: '{method}' quantizes an HF "
                                         r"checkpoint folder; 'smollm2' is a GGUF model"):
        LLM(model="smollm2", quantization=method)


def test_auto_serves_a_gguf_model_at_4_bits_and_a_folder_dense(smollm2_dir, tiny_gguf):
    assert EngineConfig().quantization == "auto"
    assert resolve_quantization("smollm2", smollm2_dir, "auto", CPU) == "gguf"
    assert resolve_quantization(smollm2_dir, smollm2_dir, "auto", CPU) == "none"
    assert resolve_quantization("smollm2", smollm2_dir, "auto", torch.device("cuda")) == "none"
    assert resolve_quantization(smollm2_dir, smollm2_dir, "int8", CPU) == "int8"
    # On CUDA: int4 packs for tinygemm; int8 has no CUDA route yet
    assert resolve_quantization(smollm2_dir, smollm2_dir, "int4", torch.device("cuda")) == "int4"
    with pytest.raises(ValueError, match=r"^quantization: 'int8' runs on the CPU only"):
        resolve_quantization(smollm2_dir, smollm2_dir, "int8", torch.device("cuda"))
    llm = LLM(model="smollm2", kv_cache_memory="16MiB")
    assert llm.engine.config.quantization == "gguf"
    assert llm.engine.runner.model.model.layers[0].mlp.down_proj.quant is not None
    # a GGUF of types not served at 4 bits (Q8_0 projections): dense, as before
    assert LLM(model=tiny_gguf, kv_cache_memory="16MiB").engine.config.quantization == "none"


@pytest.mark.parametrize(("capability", "isa"), [("avx2", "AVX2"), ("default", "DEFAULT")])
def test_dense_crossover_follows_the_isa_aten_runs(capability, isa):
    """ATEN_CPU_CAPABILITY moves ATen's int4 kernel to another path; the crossover follows."""
    import subprocess

    code = ("import torch; from tandem.config import cpu_isa; from tandem.layers.linear import dense_min_rows; "
            "print(cpu_isa(), dense_min_rows(torch.bfloat16), dense_min_rows(torch.float32))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "ATEN_CPU_CAPABILITY": capability}).stdout.split()
    from tandem.layers.linear import DENSE_CROSSOVERS

    want = DENSE_CROSSOVERS.get(isa, {})
    assert out == [isa, str(want.get(torch.bfloat16, 1)), str(want.get(torch.float32, 1))]
