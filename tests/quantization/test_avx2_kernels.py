"""Tandem's AVX2 int4 kernel (tandem/quantization/avx2_kernels.py): built here with the system's
compiler, against float64 products of the dequantized weights, and serving the SmolLM2 GGUF."""
from __future__ import annotations

import os
import sys

import gguf
import numpy as np
import pytest
import torch
from gguf.quants import quantize

from tandem import LLM
from tandem.config import cpu_flags
from tandem.quantization import avx2_kernels
from tandem.quantization.gguf_q4 import q4_codes
from tandem.quantization.int4 import dequantize_int4, quantize_int4
from tandem.quantization.q8_0 import dequantize_q8_0, quantize_q8_0

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))

missing = [f for f in avx2_kernels.NEEDS if f not in cpu_flags()]
pytestmark = pytest.mark.skipif(bool(missing), reason=f"this CPU lacks {missing}")


@pytest.fixture(scope="module", autouse=True)
def built():
    # Every x86 machine this project runs on has AVX2 and the compiler Inductor needs: a build
    # failure is a failure here, not a skip.
    assert avx2_kernels.load(), "the int4 AVX2 kernel did not build (see the warning above)"


def reference(x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x @ w.T in float64, the bound on the kernel's error): rounding x to int16 with one scale
    a row moves each element by at most half a step, amax / 32767 / 2, so a row's output by at
    most that times sum |w|; float32 sums add a little more (relative 1e-5 of sum |x * w|)."""
    x64, w64 = x.double(), w.double()
    step = x64.abs().amax(dim=1, keepdim=True) / 32767
    bound = step / 2 * w64.abs().sum(1) + 1e-5 * (x64.abs() @ w64.abs().T) + 1e-6
    return x64 @ w64.T, bound


def stored_weight(codes: torch.Tensor, scale_min: torch.Tensor) -> torch.Tensor:
    """w = code * scale + min with the float16 scales and mins the kernel keeps."""
    n, k = codes.shape
    return (codes.double().view(n, k // 32, 32) * scale_min[0].double()[..., None]
            + scale_min[1].double()[..., None]).view(n, k)


@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8, 9, 17])
@pytest.mark.parametrize(("n", "k"), [(16, 64), (48, 192), (64, 576)])
def test_kernel_matches_the_dequantized_weight(rows, n, k):
    g = torch.Generator().manual_seed(rows * 1000 + k)
    codes, scale, zero = quantize_int4(torch.randn(n, k, generator=g), 32)
    packed, scale_min = avx2_kernels.pack_int4(codes, scale, zero)
    w = stored_weight(codes, scale_min)
    x = torch.randn(rows, k, generator=g) * torch.logspace(-2, 1, rows)[:, None]
    y = avx2_kernels.int4_mm(x, packed, scale_min)
    want, bound = reference(x, w)
    assert y.dtype == torch.float32 and y.shape == (rows, n)
    err = (y.double() - want).abs()
    assert (err <= bound).all(), (err / bound).max()


@pytest.mark.parametrize("rows", [1, 4, 8, 11])
def test_q8_0_kernel_matches_the_dequantized_weight(rows):
    g = torch.Generator().manual_seed(rows)
    codes, scale = quantize_q8_0(torch.randn(48, 96, generator=g))
    x = torch.randn(rows, 96, generator=g) * 3
    want, bound = reference(x, dequantize_q8_0(codes, scale))  # scale: fp16 values, exact
    y = avx2_kernels.q8_0_mm(x, codes, scale.half())
    assert ((y.double() - want).abs() <= bound).all()
    with pytest.raises(RuntimeError, match="scale"):
        torch.ops.tandem_cpu.q8_0_mm(x, codes, scale)  # float32 scales: not the kernel's
    with pytest.raises(RuntimeError, match="codes"):
        torch.ops.tandem_cpu.q8_0_mm(x, codes.view(torch.uint8), scale.half())


def test_gguf_blocks_are_exact(tmp_path):
    """Q4_0 and Q4_1 keep their fp16 scales and mins exactly: the only error is x's rounding."""
    rng = np.random.default_rng(0)
    n, k = 32, 128
    for qtype in (gguf.GGMLQuantizationType.Q4_0, gguf.GGMLQuantizationType.Q4_1):
        raw = quantize(rng.standard_normal((n, k), dtype=np.float32), qtype)
        codes, scale, zero = q4_codes("t", raw, qtype, (n, k))
        packed, scale_min = avx2_kernels.pack_int4(codes, scale, zero)
        w = dequantize_int4(codes, scale, zero, 32)
        torch.testing.assert_close(stored_weight(codes, scale_min).float(), w,
                                   rtol=1e-6, atol=1e-6)
        x = torch.randn(4, k)
        want, bound = reference(x, w)
        assert ((avx2_kernels.int4_mm(x, packed, scale_min).double() - want).abs() <= bound).all()


def test_zero_and_non_finite_rows_stay_in_their_row():
    codes, scale, zero = quantize_int4(torch.randn(16, 64), 32)
    packed, scale_min = avx2_kernels.pack_int4(codes, scale, zero)
    x = torch.randn(3, 64)
    x[0] = 0
    x[1, 5] = float("nan")
    y = avx2_kernels.int4_mm(x, packed, scale_min)
    assert (y[0] == 0).all() and y[1].isnan().all() and y[2].isfinite().all()
    x[1, 5] = float("inf")
    assert avx2_kernels.int4_mm(x, packed, scale_min)[1].isnan().all()


def test_bad_shapes_are_errors():
    codes, scale, zero = quantize_int4(torch.randn(16, 64), 32)
    packed, scale_min = avx2_kernels.pack_int4(codes, scale, zero)
    with pytest.raises(RuntimeError, match="codes"):  # x's K is not the weight's
        torch.ops.tandem_cpu.int4_mm(torch.randn(1, 128), packed, scale_min)
    with pytest.raises(RuntimeError, match="scale_min"):
        torch.ops.tandem_cpu.int4_mm(torch.randn(1, 64), packed, scale_min.float())
    with pytest.raises(RuntimeError, match="x"):
        torch.ops.tandem_cpu.int4_mm(torch.randn(2, 128)[:, ::2], packed, scale_min)
    assert not avx2_kernels.fits_int4(16, 96, 32) and not avx2_kernels.fits_int4(8, 64, 32)
    assert not avx2_kernels.fits_int4(16, 128, 64) and avx2_kernels.fits_int4(16, 128, 32)


def test_kernel_choice_is_validated(monkeypatch):
    monkeypatch.setenv("TANDEM_CPU_KERNELS", "fast")
    with pytest.raises(ValueError, match="TANDEM_CPU_KERNELS"):
        avx2_kernels.wanted()
    monkeypatch.setenv("TANDEM_CPU_KERNELS", "torch")
    assert not avx2_kernels.wanted()


def test_serves_the_gguf_closer_to_float32_than_torchs_kernels(smollm2_dir, monkeypatch):
    """The SmolLM2 Q4_1 file through each set of kernels, teacher-forced against float32 on the
    same weights: int16 activations put these far closer than ATen's bfloat16 ones."""
    from kv_accuracy import Scorer
    from test_gguf_serving import TEXT

    common = {"model": smollm2_dir, "dtype": "float32", "kv_cache_memory": "64MiB",
              "enable_prefix_caching": False}
    ids = LLM(**common).tokenizer.encode(TEXT)
    ref = Scorer(LLM(**common)).logprobs(ids)
    kl = {}
    for kernel in ("avx2", "torch"):
        monkeypatch.setenv("TANDEM_CPU_KERNELS", kernel)
        llm = LLM(**common, quantization="gguf")
        quants = [m.quant for m in llm.engine.runner.model.model.layers.modules()  # qkv, o, gate_up, down
                  if getattr(m, "quant", None) is not None]
        assert len(quants) == 30 * 4 and all(q.avx2 == (kernel == "avx2") for q in quants)
        head = llm.engine.runner.model.lm_head.quant
        assert (head.avx2_scale is not None) == (kernel == "avx2")
        ours = Scorer(llm).logprobs(ids)
        kl[kernel] = (ref.exp() * (ref - ours)).sum(-1).mean().item()
        if kernel == "avx2":
            assert (ref.argmax(-1) == ours.argmax(-1)).float().mean() >= 0.98
    print(f"mean KL against float32: avx2 {kl['avx2']:.2e}, torch {kl['torch']:.2e}")
    assert kl["avx2"] < kl["torch"] / 4, kl


def test_without_a_compiler_torch_kernels_serve(tmp_path, smollm2_dir):
    """A machine without the compiler: the build fails with a warning and ATen's and Inductor's
    kernels serve the 4-bit model instead (a fresh process, as load() is cached per process)."""
    import subprocess

    code = ("import torch\n"
            "from tandem.quantization import avx2_kernels\n"
            "from tandem import LLM, SamplingParams\n"
            "assert not avx2_kernels.load()\n"
            "llm = LLM(model='smollm2', kv_cache_memory='16MiB', enforce_eager=True)\n"
            "q = llm.engine.runner.model.model.layers[0].mlp.down_proj.quant\n"
            "assert not q.avx2 and llm.engine.runner.model.lm_head.quant.avx2_scale is None\n"
            "out = llm.generate(['Hi'], SamplingParams(temperature=0, max_tokens=4))\n"
            "print('served', len(out[0].outputs[0].token_ids))\n")
    # The compiler is part of the build's cache key, so this one is not found built.
    env = {**os.environ, "CXX": str(tmp_path / "no-such-compiler"), "TANDEM_CPU_KERNELS": "auto",
           "ATEN_CPU_CAPABILITY": "avx2", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "served 4" in done.stdout
    assert "AVX2 kernels unavailable" in done.stderr


@pytest.mark.parametrize(("isa", "eager", "first_row"), [
    ("AVX2", False, 1), ("AVX512", False, 17), ("AVX512", True, 1), ("AMX", False, None)])
def test_lm_head_route_by_isa(monkeypatch, isa, eager, first_row):
    """prepare_q8: AVX2 runs the kernel at every row count; AVX-512 above the rows Inductor's
    fused kernel serves (all of them under --enforce-eager); AMX, unmeasured, keeps its routes."""
    from torch import nn

    from tandem.quantization import weight
    from tandem.quantization.weight import Q8Weight, prepare_q8

    monkeypatch.setenv("TANDEM_CPU_KERNELS", "auto")
    monkeypatch.setattr(avx2_kernels, "cpu_isa", lambda: isa)
    monkeypatch.setattr(weight, "cpu_isa", lambda: isa)
    warmed = []
    monkeypatch.setattr(weight, "warm_up_q8_0", lambda *a: warmed.append(a))
    head = nn.Module()
    head.quant, head.lowp = Q8Weight(*quantize_q8_0(torch.randn(64, 96))), None
    prepare_q8(head, enforce_eager=eager)
    q = head.quant
    assert (q.avx2_scale is not None) == (first_row is not None)
    assert q.f16 is None and bool(warmed) == (isa != "AVX2" and not eager)
    if first_row is not None:
        assert q.avx2_min_rows == first_row
        x = torch.randn(first_row, 96)
        torch.testing.assert_close(q(x), avx2_kernels.q8_0_mm(x, q.codes, q.avx2_scale),
                                   rtol=0, atol=0)
