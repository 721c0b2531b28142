"""4-bit weights: GGUF Q4_0/Q4_1 blocks read as stored match gguf's own dequantizer, and PyTorch's
int4 kernel computes x @ w.T with them."""

import gguf
import numpy as np
import pytest
import torch
from gguf.quants import dequantize, quantize

from tandem.quantization.gguf_q4 import q4_codes
from tandem.quantization.int4 import (
    GROUP_SIZES,
    dequantize_int4,
    int4_matmul,
    pack_int4,
    quantize_int4,
)

Q = gguf.GGMLQuantizationType
N, K = 48, 128


@pytest.fixture(scope="module")
def reader(tmp_path_factory) -> gguf.GGUFReader:
    """A GGUF file holding one random [N, K] tensor of each of Q4_0, Q4_1 and Q8_0, read back."""
    path = str(tmp_path_factory.mktemp("q4") / "q4.gguf")
    rng = np.random.default_rng(0)
    writer = gguf.GGUFWriter(path, "llama")
    for qtype in (Q.Q4_0, Q.Q4_1, Q.Q8_0):
        data = quantize(rng.standard_normal((N, K), dtype=np.float32), qtype)
        writer.add_tensor(f"blk.0.{qtype.name}.weight", data, raw_shape=data.shape, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return gguf.GGUFReader(path)


def matmul_reference(x, codes, scale, zero, group_size):
    """x @ w.T as the kernel sees its inputs: activations, scales and zeros rounded to bfloat16,
    products summed in float32. Only the kernel's bfloat16 output (8 significant bits: rounding
    costs up to 2^-8 relative) and float32 summation order then separate the two: rtol 2^-8, with
    atol 1e-4 for the summation order (far below the ~0.1 that bfloat16 rounding costs here)."""
    def bf16(t):
        return t.bfloat16().float()

    return bf16(x) @ dequantize_int4(codes, bf16(scale), bf16(zero), group_size).T


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1])
def test_gguf_blocks_match_gguf_dequantize_and_kernel(reader, qtype):
    t = next(t for t in reader.tensors if t.tensor_type == qtype)
    assert [int(d) for d in t.shape] == [K, N]  # GGUF lists dims innermost first
    codes, scale, zero = q4_codes(t.name, t.data, t.tensor_type, (N, K))
    assert codes.shape == (N, K) and scale.shape == zero.shape == (N, K // 32)
    w = torch.from_numpy(dequantize(t.data, qtype).reshape(N, K))
    # Q4_1 is d * q + m in gguf, (q - 8) * d + (m + 8 d) here: equal up to float32 rounding.
    torch.testing.assert_close(dequantize_int4(codes, scale, zero, 32), w, rtol=1e-6, atol=1e-6)

    x = torch.randn(5, K, generator=torch.Generator().manual_seed(1))
    y = int4_matmul(x, *pack_int4(codes, scale, zero, 32), 32)
    assert y.dtype == torch.float32 and y.shape == (5, N)
    torch.testing.assert_close(y, matmul_reference(x, codes, scale, zero, 32),
                               rtol=2**-8, atol=1e-4)


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1])
def test_nibble_order(qtype):
    # Distinct neighbours: reading byte j's high nibble as element 2j + 1 (not j + 16) would fail.
    expected = np.array([j % 16 for j in range(16)] + [15 - j % 16 for j in range(16)], np.uint8)
    header = np.array([0.5, -1.25][: 1 if qtype == Q.Q4_0 else 2], np.float16).view(np.uint8)
    raw = np.concatenate((header, expected[:16] | (expected[16:] << 4)))[None]
    codes, scale, zero = q4_codes("blk.0.test.weight", raw, qtype, (1, 32))
    assert codes[0].tolist() == expected.tolist()
    torch.testing.assert_close(dequantize_int4(codes, scale, zero, 32),
                               torch.from_numpy(dequantize(raw, qtype)), rtol=1e-6, atol=1e-6)


def test_unsupported_type_names_tensor_type_and_supported(reader):
    t = next(t for t in reader.tensors if t.tensor_type == Q.Q8_0)
    with pytest.raises(ValueError, match=r"blk\.0\.Q8_0\.weight: GGUF type Q8_0 .*Q4_0, Q4_1"):
        q4_codes(t.name, t.data, t.tensor_type, (N, K))


def test_wrong_shape_is_refused(reader):
    t = next(t for t in reader.tensors if t.tensor_type == Q.Q4_0)
    with pytest.raises(ValueError, match=r"blk\.0\.Q4_0\.weight: .* \(96, 128\)"):
        q4_codes(t.name, t.data, t.tensor_type, (96, 128))


def _args(n=16, k=64, max_code=15, dtype=torch.uint8, scale=(16, 2), zero=(16, 2)):
    codes = torch.full((n, k), max_code, dtype=dtype)
    return codes, torch.ones(scale), torch.zeros(zero)


@pytest.mark.parametrize("case, group_size, match", [
    ({}, 16, "group_size must be one of"),
    ({"k": 96}, 64, r"K \(96\) must be a multiple of group_size \(64\)"),
    ({"max_code": 16}, 32, "codes must lie in 0..15"),
    ({"dtype": torch.int32}, 32, "codes must be a 2-D uint8"),
    ({"scale": (16, 3)}, 32, r"scale must have shape \(16, 2\)"),
    ({"zero": (16, 1)}, 32, r"zero must have shape \(16, 2\)"),
    ({"n": 8, "scale": (8, 2), "zero": (8, 2)}, 32, "N .* divisible by 16"),
])
def test_pack_int4_validates(case, group_size, match):
    with pytest.raises(ValueError, match=match):
        pack_int4(*_args(**case), group_size)


@pytest.mark.parametrize("group_size", GROUP_SIZES)
def test_quantize_round_trip_and_kernel(group_size):
    gen = torch.Generator().manual_seed(group_size)
    w = torch.randn(32, 512, generator=gen)
    w[3, :group_size] = 0.75  # a constant group: scale 0, must come back exactly, not NaN
    codes, scale, zero = quantize_int4(w, group_size)
    assert scale[3, 0] == 0 and codes.max() <= 15
    back = dequantize_int4(codes, scale, zero, group_size)
    assert not back.isnan().any() and torch.equal(back[3, :group_size], w[3, :group_size])
    bound = scale.repeat_interleave(group_size, dim=1) / 2
    assert ((back - w).abs() <= bound * (1 + 1e-5) + 1e-6).all()

    x = torch.randn(3, 512, generator=gen, dtype=torch.bfloat16)
    y = int4_matmul(x, *pack_int4(codes, scale, zero, group_size), group_size)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), matmul_reference(x.float(), codes, scale, zero,
                                                           group_size), rtol=2**-8, atol=1e-4)
