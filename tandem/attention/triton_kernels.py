"""Paged-attention kernels in Triton: the cache write and one-query decode attention.

Written for an H100/H200; on the CPU they run only under Triton's interpreter
(TRITON_INTERPRET=1 in the environment before this module is imported, as the tests do),
which executes the same kernel code with NumPy. Prefill chunks do not come here: they go
through SDPA (torch_ref.attend_prefills), whose flash kernels handle long queries well; a
Triton prefill kernel would have to be measured against them on a GPU first.

Launchers take any strides: a layer's K and V caches are views of one layer-major tensor.
Neither launcher copies anything to the host, so both can be captured in a CUDA graph.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from tandem.attention.kv_quant import SCALE_DTYPE, is_fp8

# Keys per step of the decode loop (tl.dot wants every dim >= 16), with 4 warps. Not timed on
# a GPU yet; chosen by ptxas's register counts for sm_90 (head_dim 128, groups of 4): 110
# registers (bfloat16), 227 (float8 cache), no spills, where 32 keys spill with a float8 cache.
DECODE_BLOCK_N = 16
# float8 dtypes: (mantissa bits, exponent of the smallest normal)
_FP8_GRID = {torch.float8_e4m3fn: (3, -6), torch.float8_e5m2: (2, -14)}
LOG2E = 1.4426950408889634  # scores are scaled by it for exp2, cheaper than exp


# Exact roundings for the cache write, whose bits must equal kv_quant's. A plain `.to()` rounds
# to nearest even on the GPU, but Triton's interpreter truncates float32 to bfloat16 and float8;
# rounding explicitly gives the same bits on both (and the final `.to()` is then exact).
@triton.jit
def _to_bfloat16(x):
    """float32 -> bfloat16, to nearest even (through the bits: bfloat16 is float32's top half)."""
    u = x.to(tl.uint32, bitcast=True)
    u = u + 0x7FFF + ((u >> 16) & 1)
    return (u >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _round_to_fp8(y, MANTISSA: tl.constexpr, MIN_EXP: tl.constexpr):
    """float32 y (|y| within the float8 range) rounded to nearest even on the float8 grid of
    MANTISSA bits, subnormals below 2**MIN_EXP; still float32."""
    bits = y.to(tl.uint32, bitcast=True)
    exp = tl.maximum(((bits >> 23) & 0xFF).to(tl.int32) - 127, MIN_EXP)
    # Adding 2**(exp - MANTISSA + 23) leaves float32 exactly the float8 grid's step at y's
    # binade, so the float32 add rounds |y| to that grid (to nearest even); subtracting undoes it.
    magic = ((exp - MANTISSA + 23 + 127) << 23).to(tl.float32, bitcast=True)
    r = (tl.abs(y) + magic) - magic
    # y's sign bit back on (not -r, which is 0 - r: -0.0 would become +0.0, unlike torch)
    return (r.to(tl.uint32, bitcast=True) | (bits & 0x80000000)).to(tl.float32, bitcast=True)


@triton.jit
def _store_token_head(x_ptr, x_stride_t, x_stride_h, x_stride_d, cache_ptr, c_stride_h,
                      c_stride_b, c_stride_s, c_stride_d, scale_ptr, s_stride_h, s_stride_b,
                      s_stride_s, out_ptr, o_stride_t, o_stride_h, t, h, block, offset,
                      D: tl.constexpr, D_PAD: tl.constexpr, FP8: tl.constexpr,
                      FP8_MAX: tl.constexpr, FP8_MANTISSA: tl.constexpr,
                      FP8_MIN_EXP: tl.constexpr):
    d = tl.arange(0, D_PAD)
    dmask = d < D
    x = tl.load(x_ptr + t * x_stride_t + h * x_stride_h + d * x_stride_d, mask=dmask,
                other=0.0)
    dst = cache_ptr + h * c_stride_h + block * c_stride_b + offset * c_stride_s + d * c_stride_d
    if FP8:
        # kv_quant.quantize, step by step: every rounding as torch does it, so the cache holds
        # the same bits. div_rn: Triton's `/` on float32 is an approximate division on NVIDIA.
        xf = x.to(tl.float32)
        amax = tl.max(tl.abs(xf), axis=0)
        scale = _to_bfloat16(tl.maximum(tl.math.div_rn(amax, FP8_MAX), 1e-30))
        y = tl.math.div_rn(xf, scale.to(tl.float32))
        y = _round_to_fp8(tl.minimum(tl.maximum(y, -FP8_MAX), FP8_MAX), FP8_MANTISSA,
                          FP8_MIN_EXP)
        tl.store(dst, y.to(cache_ptr.dtype.element_ty), mask=dmask)
        tl.store(scale_ptr + h * s_stride_h + block * s_stride_b + offset * s_stride_s, scale)
        # What attention sees (kv_quant.dequantize): both factors in the model dtype, then
        # their product (exact in float32) rounded to it.
        out_ty = out_ptr.dtype.element_ty
        deq = y * scale.to(out_ty).to(tl.float32)
        if out_ty == tl.bfloat16:
            deq = _to_bfloat16(deq)
        tl.store(out_ptr + t * o_stride_t + h * o_stride_h + d, deq.to(out_ty), mask=dmask)
    else:
        tl.store(dst, x, mask=dmask)


@triton.jit
def _reshape_and_cache_kernel(
        k_ptr, k_stride_t, k_stride_h, k_stride_d, v_ptr, v_stride_t, v_stride_h, v_stride_d,
        k_cache_ptr, v_cache_ptr, c_stride_h, c_stride_b, c_stride_s, c_stride_d,
        k_scale_ptr, v_scale_ptr, s_stride_h, s_stride_b, s_stride_s,
        k_out_ptr, v_out_ptr, o_stride_t, o_stride_h, slot_ptr,
        BLOCK_SIZE: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr, FP8: tl.constexpr,
        FP8_MAX: tl.constexpr, FP8_MANTISSA: tl.constexpr, FP8_MIN_EXP: tl.constexpr):
    # One program per (token, KV head): its K and V rows of head_dim values. int64 offsets:
    # one layer's cache can pass 2**31 elements on a large GPU.
    t = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    slot = tl.load(slot_ptr + t)
    block = slot // BLOCK_SIZE
    offset = slot % BLOCK_SIZE
    _store_token_head(k_ptr, k_stride_t, k_stride_h, k_stride_d, k_cache_ptr, c_stride_h,
                      c_stride_b, c_stride_s, c_stride_d, k_scale_ptr, s_stride_h, s_stride_b,
                      s_stride_s, k_out_ptr, o_stride_t, o_stride_h, t, h, block, offset, D, D_PAD, FP8,
                      FP8_MAX, FP8_MANTISSA, FP8_MIN_EXP)
    _store_token_head(v_ptr, v_stride_t, v_stride_h, v_stride_d, v_cache_ptr, c_stride_h,
                      c_stride_b, c_stride_s, c_stride_d, v_scale_ptr, s_stride_h, s_stride_b,
                      s_stride_s, v_out_ptr, o_stride_t, o_stride_h, t, h, block, offset, D, D_PAD, FP8,
                      FP8_MAX, FP8_MANTISSA, FP8_MIN_EXP)


def _check_cache(k: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 k_scale: torch.Tensor | None, v_scale: torch.Tensor | None) -> bool:
    """Whether the cache is float8; ValueError for a layout the kernels do not handle."""
    if ((k_cache.shape, k_cache.stride(), k_cache.dtype)
            != (v_cache.shape, v_cache.stride(), v_cache.dtype)):
        raise ValueError("k_cache and v_cache: the kernels expect one shape, layout and dtype")
    if not is_fp8(k_cache.dtype):
        if k_cache.dtype != k.dtype:
            raise ValueError(f"cache dtype: expected the model's {k.dtype} or a float8 dtype, "
                             f"got {k_cache.dtype}")
        return False
    if k_scale is None or v_scale is None:
        raise ValueError("a float8 cache needs k_scale and v_scale")
    if (k_scale.stride() != v_scale.stride()
            or any(s.dtype != SCALE_DTYPE or s.shape != k_cache.shape[:3]
                   for s in (k_scale, v_scale))):
        raise ValueError(f"k_scale and v_scale: expected {SCALE_DTYPE} "
                         f"{tuple(k_cache.shape[:3])} in one layout")
    return True


def _scale_strides(scale: torch.Tensor | None) -> tuple[int, ...]:
    return scale.stride() if scale is not None else (0, 0, 0)


def reshape_and_cache(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                      v_cache: torch.Tensor, slot_mapping: torch.Tensor,
                      k_scale: torch.Tensor | None = None,
                      v_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Store k, v [T, KVH, D] at flat slots [T] of caches [KVH, blocks, block_size, D], as
    kv_quant.write does (float8 values and their [KVH, blocks, block_size] scales for a float8
    cache). Returns k, v as attention must see them: dequantized for a float8 cache."""
    fp8 = _check_cache(k, k_cache, v_cache, k_scale, v_scale)
    num_tokens, num_kv_heads, head_dim = k.shape
    k_out, v_out = (k.new_empty(k.shape), v.new_empty(v.shape)) if fp8 else (k, v)
    if num_tokens:
        _reshape_and_cache_kernel[(num_tokens, num_kv_heads)](
            k, *k.stride(), v, *v.stride(),
            k_cache, v_cache, *k_cache.stride(),
            k_scale, v_scale, *_scale_strides(k_scale),
            k_out, v_out, k_out.stride(0), k_out.stride(1), slot_mapping,
            BLOCK_SIZE=k_cache.shape[2], D=head_dim, D_PAD=triton.next_power_of_2(head_dim),
            FP8=fp8, FP8_MAX=torch.finfo(k_cache.dtype).max if fp8 else 0.0,
            FP8_MANTISSA=_FP8_GRID.get(k_cache.dtype, (0, 0))[0],
            FP8_MIN_EXP=_FP8_GRID.get(k_cache.dtype, (0, 0))[1], num_warps=1)
    return k_out, v_out


@triton.jit
def _load_kv(cache_ptr, scale_ptr, h, blocks, offsets, d, tmask, dmask, c_stride_h,
             c_stride_b, c_stride_s, c_stride_d, s_stride_h, s_stride_b, s_stride_s,
             DTYPE: tl.constexpr, FP8: tl.constexpr):
    """[BLOCK_N, D_PAD] keys or values in the model dtype (zeros where masked)."""
    ptrs = (cache_ptr + h * c_stride_h + blocks[:, None] * c_stride_b
            + offsets[:, None] * c_stride_s + d[None, :] * c_stride_d)
    x = tl.load(ptrs, mask=tmask[:, None] & dmask[None, :], other=0.0)
    if FP8:
        # Dequantized as kv_quant.read does, so this kernel sees the values the reference sees.
        s = tl.load(scale_ptr + h * s_stride_h + blocks * s_stride_b + offsets * s_stride_s,
                    mask=tmask, other=0.0)
        x = (x.to(tl.float32) * s.to(DTYPE).to(tl.float32)[:, None]).to(DTYPE)
    return x


@triton.jit
def _paged_decode_kernel(
        q_ptr, q_stride_t, q_stride_h, q_stride_d, out_ptr, o_stride_t, o_stride_h, o_stride_d,
        k_cache_ptr, v_cache_ptr, c_stride_h, c_stride_b, c_stride_s, c_stride_d,
        k_scale_ptr, v_scale_ptr, s_stride_h, s_stride_b, s_stride_s,
        tables_ptr, tables_stride, lens_ptr, qk_scale,
        BLOCK_SIZE: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
        D: tl.constexpr, D_PAD: tl.constexpr, BLOCK_N: tl.constexpr, FP8: tl.constexpr,
        PRECISION: tl.constexpr):
    # One program per (decode row, KV head), for that KV head's whole group of query heads:
    # each key and value is read once per group. The group is padded to GROUP_PAD rows (>= 16,
    # for tl.dot); padded rows compute on zeros and are not stored.
    row = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)  # int64 offsets, as in _reshape_and_cache_kernel
    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, D_PAD)
    n = tl.arange(0, BLOCK_N)
    gmask = g < GROUP
    dmask = d < D
    heads = (h * GROUP + g)[:, None]
    q_rows = q_ptr + row * q_stride_t + heads * q_stride_h + d[None, :] * q_stride_d
    q = tl.load(q_rows, mask=gmask[:, None] & dmask[None, :], other=0.0)
    seq_len = tl.load(lens_ptr + row)
    table = tables_ptr + row * tables_stride

    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, D_PAD], tl.float32)
    for start in range(0, seq_len, BLOCK_N):
        tokens = start + n
        tmask = tokens < seq_len
        # Each token's block through the table: BLOCK_N need not divide the block size.
        blocks = tl.load(table + tokens // BLOCK_SIZE, mask=tmask, other=0)
        offsets = tokens % BLOCK_SIZE
        k = _load_kv(k_cache_ptr, k_scale_ptr, h, blocks, offsets, d, tmask, dmask,
                     c_stride_h, c_stride_b, c_stride_s, c_stride_d, s_stride_h, s_stride_b,
                     s_stride_s, q.dtype, FP8)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        s = tl.where(tmask[None, :], s, float("-inf"))
        # Online softmax: the first step always has a real token (seq_len >= 1), so m_new is
        # finite from then on and exp2(-inf) gives 0 for masked keys.
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = _load_kv(v_cache_ptr, v_scale_ptr, h, blocks, offsets, d, tmask, dmask,
                     c_stride_h, c_stride_b, c_stride_s, c_stride_d, s_stride_h, s_stride_b,
                     s_stride_s, q.dtype, FP8)
        acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v, input_precision=PRECISION)
        m_i = m_new
    out = acc / l_i[:, None]
    o_rows = out_ptr + row * o_stride_t + heads * o_stride_h + d[None, :] * o_stride_d
    tl.store(o_rows, out.to(q.dtype), mask=gmask[:, None] & dmask[None, :])


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, lens: torch.Tensor,
                           k_scale: torch.Tensor | None, v_scale: torch.Tensor | None,
                           out: torch.Tensor) -> None:
    """q: [N, H, D], one query per decode row; caches [KVH, blocks, block_size, D] (float8
    with [KVH, blocks, block_size] scales, or the model dtype); block_tables [N, W] block ids;
    lens [N] >= 1 tokens each row attends to (its own, already written, included). Writes
    rows 0..N-1 of `out` [>= N, H, D]."""
    fp8 = _check_cache(q, k_cache, v_cache, k_scale, v_scale)
    num_rows, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[0]
    if num_heads % num_kv_heads or k_cache.shape[3] != head_dim:
        raise ValueError(f"q: {num_heads} heads of {head_dim} do not fit a cache of "
                         f"{num_kv_heads} KV heads of {k_cache.shape[3]}")
    group = num_heads // num_kv_heads
    if num_rows:
        _paged_decode_kernel[(num_rows, num_kv_heads)](
            q, *q.stride(), out, *out.stride(),
            k_cache, v_cache, *k_cache.stride(),
            k_scale, v_scale, *_scale_strides(k_scale),
            block_tables, block_tables.stride(0), lens, head_dim ** -0.5 * LOG2E,
            BLOCK_SIZE=k_cache.shape[2], GROUP=group,
            GROUP_PAD=max(16, triton.next_power_of_2(group)),
            D=head_dim, D_PAD=max(16, triton.next_power_of_2(head_dim)), BLOCK_N=DECODE_BLOCK_N,
            FP8=fp8,
            # float32 models: full float32 products, not TF32 (which keeps 10 mantissa bits).
            PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
            num_warps=4)
