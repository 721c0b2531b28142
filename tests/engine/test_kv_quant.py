"""The float8 KV cache: per-token, per-head scales from the dtype's real max, K and V kept
apart, what attention reads equals what was written (to float8 precision), and the token
capacity at a fixed memory budget."""
import pytest
import torch
from helpers import save_tiny_model

from tandem import LLM
from tandem.attention.kv_quant import SCALE_DTYPE, dequantize, quantize, read, write
from tandem.attention.metadata import AttentionMetadata, PrefillSeq
from tandem.attention.torch_ref import TorchAttention
from tandem.config import EngineConfig

FP8 = [torch.float8_e4m3fn, torch.float8_e5m2]
# Relative error of one float8 rounding: 2^-4 (3 mantissa bits) and 2^-3 (2 bits).
REL = {torch.float8_e4m3fn: 2**-4, torch.float8_e5m2: 2**-3}


@pytest.mark.parametrize("dtype", FP8)
def test_scale_maps_each_token_heads_max_to_the_dtype_max(dtype):
    x = torch.randn(5, 3, 64) * torch.tensor([1e-3, 1.0, 1e3])[None, :, None]
    q, scale = quantize(x, dtype)
    assert q.dtype == dtype and scale.dtype == SCALE_DTYPE and scale.shape == (5, 3)
    fmax = torch.finfo(dtype).max  # 448 for e4m3fn, 57344 for e5m2
    top = q.float().abs().amax(-1)
    assert torch.all(top <= fmax) and torch.all(top >= fmax * (1 - REL[dtype]))
    back = dequantize(q, scale, torch.float32)
    err = (back - x).abs() / x.abs().amax(-1, keepdim=True)
    assert err.max() <= REL[dtype], "error beyond one float8 rounding of the head's max"


@pytest.mark.parametrize("dtype", FP8)
def test_zeros_huge_and_tiny_values_stay_finite(dtype):
    x = torch.zeros(4, 2, 8)
    x[1] = 3e38  # far past any float8 max: must be scaled, not cast to NaN
    x[2] = 1e-30
    q, scale = quantize(x, dtype)
    back = dequantize(q, scale, torch.float32)
    assert torch.isfinite(back).all()
    assert torch.equal(back[0], x[0])
    assert torch.allclose(back[1], x[1], rtol=REL[dtype]) and back[2].abs().max() < 1e-29


def _caches(dtype, kvh=2, blocks=4, bs=4, d=8):
    cache = torch.zeros(kvh, blocks, bs, d, dtype=dtype)
    scales = torch.zeros(kvh, blocks, bs, dtype=SCALE_DTYPE)
    return cache, scales


@pytest.mark.parametrize("dtype", FP8)
def test_write_then_read_through_block_tables(dtype):
    cache, scales = _caches(dtype)
    x = torch.randn(6, 2, 8) * 50
    slots = torch.tensor([4, 5, 6, 12, 13, 14])  # blocks 1 and 3, three tokens each
    seen = write(cache, scales, x, slots)
    got = read(cache, scales, torch.tensor([1, 3]), torch.float32)  # [KVH, 8, D]
    assert torch.equal(got[:, [0, 1, 2, 4, 5, 6]], seen.transpose(0, 1))
    assert torch.allclose(seen, x, rtol=0, atol=REL[dtype] * 50 * 4)
    assert got[:, [3, 7]].abs().max() == 0  # untouched slots read as zero


def test_full_precision_cache_is_exact():
    cache = torch.zeros(2, 4, 4, 8)
    x = torch.randn(3, 2, 8)
    assert write(cache, None, x, torch.tensor([0, 1, 9])) is x
    assert torch.equal(read(cache, None, torch.tensor([0, 2]), torch.float32)[:, [0, 1, 5]],
                       x.transpose(0, 1))


def _attend(q, k, v, dtype):
    """Three tokens written, then read back from the cache as a cached prefix."""
    (k_cache, k_scale), (v_cache, v_scale) = _caches(dtype), _caches(dtype)
    if dtype == torch.float32:
        k_scale = v_scale = None
    meta = AttentionMetadata(slot_mapping=torch.tensor([0, 1, 2]))
    meta.prefills = [PrefillSeq(0, 3, 3, torch.tensor([0]),
                                torch.ones(3, 3, dtype=torch.bool).tril())]
    out = TorchAttention().forward(q, k, v, k_cache, v_cache, meta, k_scale, v_scale)
    return out, (k_cache, k_scale), (v_cache, v_scale)


@pytest.mark.parametrize("dtype", FP8)
def test_k_and_v_keep_their_own_scales(dtype):
    """K 300 times larger than V: reading either with the other's scales is off by about that
    factor, far beyond float8 rounding, so the backend's output would show a mix-up."""
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 4, 8), torch.randn(3, 2, 8) * 3, torch.randn(3, 2, 8) * 0.01
    ref, _, _ = _attend(q, k, v, torch.float32)
    out, (_, k_scale), (v_cache, v_scale) = _attend(q, k, v, dtype)
    vmax = v.abs().max()
    assert (out - ref).abs().max() < 0.5 * vmax
    table = torch.tensor([0])
    v_read = read(v_cache, v_scale, table, torch.float32)[:, :3].transpose(0, 1)
    assert (v_read - v).abs().max() < REL[dtype] * vmax
    mixed = read(v_cache, k_scale, table, torch.float32)[:, :3].transpose(0, 1)
    assert (mixed - v).abs().max() > 10 * vmax


def test_fp8_holds_at_least_1_9x_bf16_and_3_8x_fp32_tokens(tmp_path):
    """At SmolLM2's head size (64): 64 bytes + a 2-byte scale per token and head, against 128
    (bfloat16) and 256 (float32)."""
    folder = save_tiny_model(tmp_path / "m", hidden_size=128, num_attention_heads=2,
                             num_key_value_heads=1)

    def capacity(dtype: str, kv: str) -> int:
        return LLM(model=folder, dtype=dtype, kv_cache_dtype=kv,
                   kv_cache_memory=2**22).engine.kv_capacity_tokens

    fp32, bf16 = capacity("float32", "auto"), capacity("bfloat16", "auto")
    assert fp32 * 2 == bf16
    for kv in ("fp8_e4m3", "fp8_e5m2", "fp8"):
        assert capacity("float32", kv) >= 3.8 * fp32
        assert capacity("bfloat16", kv) >= 1.9 * bf16


def test_kv_cache_dtype_is_validated():
    with pytest.raises(ValueError, match="^kv_cache_dtype: "):
        EngineConfig(kv_cache_dtype="int4")
