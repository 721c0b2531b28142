"""GGUF Q8_0 kept as stored: codes and scales read from the blocks match gguf's own dequantizer,
and the matmul and embedding lookup on them equal the same on the dequantized weight."""
import os
import shutil

import gguf
import numpy as np
import pytest
import torch
from gguf.quants import dequantize, quantize

from tandem.quantization import q8_0
from tandem.quantization.q8_0 import (
    dequantize_q8_0,
    embedding_q8_0,
    q8_0_codes,
    q8_0_matmul,
    quantize_q8_0,
)

N, K = 80, 96  # 3 blocks a row


@pytest.fixture(scope="module")
def tensor(tmp_path_factory) -> gguf.ReaderTensor:
    """One random [N, K] Q8_0 tensor, written to a GGUF file and read back."""
    path = str(tmp_path_factory.mktemp("q8") / "q8.gguf")
    data = quantize(np.random.default_rng(0).standard_normal((N, K), dtype=np.float32),
                    gguf.GGMLQuantizationType.Q8_0)
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_tensor("blk.0.q8.weight", data, raw_shape=data.shape,
                      raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return gguf.GGUFReader(path).tensors[0]


@pytest.fixture(scope="module")
def weight(tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    codes, scale = q8_0_codes(tensor.name, tensor.data, (N, K))
    return codes, scale, dequantize_q8_0(codes, scale)


def test_codes_dequantize_as_gguf_does(tensor, weight):
    codes, scale, w = weight
    assert codes.dtype == torch.int8 and codes.shape == (N, K)
    assert scale.dtype == torch.float32 and scale.shape == (N, K // 32)
    ref = dequantize(tensor.data, tensor.tensor_type).reshape(N, K)
    assert torch.equal(w, torch.from_numpy(ref))


def test_quantize_is_ggufs_bit_for_bit():
    w = np.random.default_rng(1).standard_normal((N, K), dtype=np.float32)
    w[0, :32] = 0  # an all-zero block
    w[1, :32] = np.append(np.arange(31) - 14.5, 127)  # d = 1: codes at exact halves
    codes, scale = quantize_q8_0(torch.from_numpy(w))
    ref = quantize(w, gguf.GGMLQuantizationType.Q8_0)
    ref_codes, ref_scale = q8_0_codes("ref", ref, (N, K))
    assert torch.equal(codes, ref_codes) and torch.equal(scale, ref_scale)


@pytest.mark.parametrize("rows", [1, 3, 17])
def test_matmul_is_exact_in_float32(weight, rows):
    codes, scale, w = weight
    x = torch.randn(rows, K, generator=torch.Generator().manual_seed(rows))
    y = q8_0_matmul(x, codes, scale)
    assert y.dtype == torch.float32 and y.shape == (rows, N)
    ref = x @ w.T  # only the summation order differs
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    # Up to 8 rows this was Inductor's fused kernel, unless there is no compiler to build it.
    assert not q8_0._compile_failed or shutil.which("g++") is None


def test_matmul_chunks_cover_every_row(weight):
    """The many-row route over chunks that do not divide N."""
    codes, scale, w = weight
    x = torch.randn(5, K)
    ref = x @ w.T
    torch.testing.assert_close(q8_0._chunked(x, codes, scale, chunk=32), ref,
                               rtol=1e-5, atol=1e-5 * ref.abs().max().item())


def test_matmul_in_bfloat16(weight):
    codes, scale, w = weight
    x = torch.randn(3, K).bfloat16()
    y = q8_0_matmul(x, codes, scale)
    assert y.dtype == torch.bfloat16
    ref = x.float() @ w.T  # computed in float32, rounded once to bfloat16
    torch.testing.assert_close(y.float(), ref, rtol=2 ** -8, atol=1e-3 * ref.abs().max().item())


def test_embedding_rows_are_the_table_rows(weight):
    codes, scale, w = weight
    ids = torch.tensor([[0, 5, 5], [N - 1, 2, 40]])
    rows = embedding_q8_0(ids, codes, scale)
    assert rows.shape == (2, 3, K) and torch.equal(rows, w[ids])
    assert torch.equal(embedding_q8_0(ids, codes, scale, torch.bfloat16), w[ids].bfloat16())


def test_sizes_that_do_not_fit_name_the_tensor(tensor):
    with pytest.raises(ValueError, match="blk.0.q8.weight"):
        q8_0_codes("blk.0.q8.weight", tensor.data, (N + 1, K))
    with pytest.raises(ValueError, match="blk.0.q8.weight"):
        q8_0_codes("blk.0.q8.weight", tensor.data[:, :-1], (N, K))
    with pytest.raises(ValueError, match="token_embd"):
        q8_0_codes("token_embd.weight", np.zeros(34 * 4, np.uint8), (2, 48))  # K % 32 != 0


def test_fused_kernel_compiles_under_the_engines_stance(weight):
    """The engine sets Dynamo's "eager_on_recompile" stance after its warm-up, which would run
    a graph not compiled yet eagerly (the fused form is ~100x slower so): ours still compiles."""
    from torch._dynamo.utils import counters

    codes, scale, w = weight
    codes, scale, w = codes[:48], scale[:48], w[:48]  # a shape no other test compiled
    before = counters["stats"]["unique_graphs"]
    with torch.compiler.set_stance("eager_on_recompile"):
        y = q8_0_matmul(torch.ones(2, K), codes, scale)
    torch.testing.assert_close(y, torch.ones(2, K) @ w.T, rtol=1e-5, atol=1e-4)
    assert counters["stats"]["unique_graphs"] == before + 1 or shutil.which("g++") is None


def test_matmul_rejects_mismatched_shapes(weight):
    codes, scale, _ = weight
    with pytest.raises(ValueError, match="x must be"):
        q8_0_matmul(torch.randn(2, K + 32), codes, scale)
    with pytest.raises(ValueError, match="scale"):
        q8_0_matmul(torch.randn(2, K), codes, scale[:, :-1])
    assert not q8_0._compile_failed  # a caller's mistake does not turn the fused kernel off


def test_smollm2_embedding_is_the_float32_one(smollm2_dir):
    """The file's Q8_0 token_embd.weight read as codes is the float32 table of the converted
    folder (which transformers dequantized from the same blocks)."""
    from safetensors import safe_open

    from tandem.loader.model_path import smollm2_gguf

    t = next(t for t in gguf.GGUFReader(smollm2_gguf()).tensors if t.name == "token_embd.weight")
    assert t.tensor_type == gguf.GGMLQuantizationType.Q8_0
    k, n = (int(d) for d in t.shape)
    codes, scale = q8_0_codes(t.name, t.data, (n, k))
    with safe_open(os.path.join(smollm2_dir, "model.safetensors"), "pt") as f:
        ref = f.get_tensor("model.embed_tokens.weight")
    torch.testing.assert_close(dequantize_q8_0(codes, scale), ref, rtol=1e-6, atol=1e-6)
