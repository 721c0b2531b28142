"""Writing K/V into the paged cache and reading it back, in the model dtype or in float8.

float8 entries carry one scale per token and KV head (bfloat16, beside the cache): the
token's largest |value| in that head maps to the dtype's real max (448 for e4m3fn, 57344 for
e5m2). docs/kv_cache.md has the measurements behind this choice. Copies and gathers go
through uint8 views because index_copy_ has no float8 kernel on CPU.
"""
from __future__ import annotations

import torch

SCALE_DTYPE = torch.bfloat16  # the range of float32 in 2 bytes; its precision does not matter
# (values are divided by the stored scale, so quantize and dequantize agree exactly)


def is_fp8(dtype: torch.dtype) -> bool:
    return dtype in (torch.float8_e4m3fn, torch.float8_e5m2)


def scale_for(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x: [T, KVH, D] -> [T, KVH] scales, so that x / scale fits the float8 range."""
    amax = x.abs().amax(-1).float()
    return (amax / torch.finfo(dtype).max).clamp(min=1e-30).to(SCALE_DTYPE)


def quantize(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    scale = scale_for(x, dtype)
    fmax = torch.finfo(dtype).max
    # Clamp: the stored scale may round below amax / fmax, and float8 casts overflow to NaN.
    q = (x.float() / scale.float()[..., None]).clamp(-fmax, fmax).to(dtype)
    return q, scale


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return q.to(dtype) * scale.to(dtype)[..., None]


def write(cache: torch.Tensor, scale_cache: torch.Tensor | None, x: torch.Tensor,
          slots: torch.Tensor) -> torch.Tensor:
    """Store x [T, KVH, D] at flat slots of cache [KVH, blocks, block_size, D]; return x as
    attention must see it (what a later read of the cache gives back)."""
    kvh, d = x.shape[1], x.shape[2]
    if scale_cache is None:
        cache.view(kvh, -1, d).index_copy_(1, slots, x.transpose(0, 1))
        return x
    q, scale = quantize(x, cache.dtype)
    cache.view(torch.uint8).view(kvh, -1, d).index_copy_(
        1, slots, q.view(torch.uint8).transpose(0, 1))
    scale_cache.view(kvh, -1).index_copy_(1, slots, scale.transpose(0, 1))
    return dequantize(q, scale, x.dtype)


def read(cache: torch.Tensor, scale_cache: torch.Tensor | None, block_table: torch.Tensor,
         dtype: torch.dtype) -> torch.Tensor:
    """[KVH, blocks, B, D] cache, [..., nb] block ids -> [KVH, ..., nb * B, D] in `dtype`."""
    kvh, _, bs, d = cache.shape
    ids = block_table.flatten()
    shape = (kvh, *block_table.shape[:-1], block_table.shape[-1] * bs)
    if scale_cache is None:
        return cache.index_select(1, ids).view(*shape, d)
    q = cache.view(torch.uint8).index_select(1, ids).view(cache.dtype).view(*shape, d)
    return dequantize(q, scale_cache.index_select(1, ids).view(shape), dtype)
