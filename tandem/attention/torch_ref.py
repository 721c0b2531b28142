"""Attention in plain PyTorch (SDPA), for the CPU and any other device."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from tandem.attention.backend import AttentionBackend
from tandem.attention.kv_quant import read, write
from tandem.attention.metadata import AttentionMetadata

# From this many one-token decodes in a step, two batched matmuls beat the CPU's flash SDPA
# kernel, which is built for long queries (benchmarks/decode_attention.py, 2 threads, 256-token
# contexts: bfloat16 79 against 110 us a layer at 8 decodes, 328 against 876 at 64; float32
# 1.2-1.4x). Below it SDPA wins (23 against 45 us at one decode).
BMM_MIN_DECODES = 8


def _attend_bmm(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                attn_mask: torch.Tensor) -> torch.Tensor:
    """SDPA's result as HF's eager attention computes it: scores in the model dtype, softmax
    in float32."""
    s = torch.matmul(q, k.transpose(-1, -2)).mul_(q.shape[-1] ** -0.5).add_(attn_mask)
    return torch.matmul(torch.softmax(s, -1, dtype=torch.float32).to(q.dtype), v)


class TorchAttention(AttentionBackend):
    def forward(self, q, k, v, k_cache, v_cache, meta: AttentionMetadata,
                k_scale=None, v_scale=None) -> torch.Tensor:
        num_kv_heads, head_dim = k.shape[1], k.shape[2]
        # New tokens are attended as stored (float8-rounded in an fp8 cache), so a result does
        # not depend on whether a prefix came from the cache or was computed in this step.
        k = write(k_cache, k_scale, k, meta.slot_mapping)
        v = write(v_cache, v_scale, v, meta.slot_mapping)
        out = torch.empty_like(q)
        nd = meta.num_decode
        if nd:
            # KV heads lead the batch dims, so the gathered keys are SDPA-ready without a copy,
            # and each KV head's group of query heads rides in the query-length dim.
            group = q.shape[1] // num_kv_heads
            qd = q[:nd].view(nd, num_kv_heads, group, head_dim).transpose(0, 1)
            tables = meta.decode_block_tables
            keys = read(k_cache, k_scale, tables, q.dtype)
            values = read(v_cache, v_scale, tables, q.dtype)
            attend = (_attend_bmm if q.is_cpu and nd >= BMM_MIN_DECODES
                      else F.scaled_dot_product_attention)
            o = attend(qd, keys, values, attn_mask=meta.decode_mask)
            out[:nd] = o.transpose(0, 1).reshape(nd, -1, head_dim)
        attend_prefills(q, k, v, k_cache, v_cache, meta, k_scale, v_scale, out)
        return out


def attend_prefills(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                    v_cache: torch.Tensor, meta: AttentionMetadata, k_scale: torch.Tensor | None,
                    v_scale: torch.Tensor | None, out: torch.Tensor) -> None:
    """Each prefill chunk through SDPA, into its rows of `out`; k, v as the cache holds them
    (already written)."""
    for p in meta.prefills:
        rows = slice(p.q_start, p.q_start + p.q_len)
        qs = q[rows].transpose(0, 1)
        if p.mask is None:  # nothing cached: attend to the new tokens only
            keys, values = k[rows].transpose(0, 1), v[rows].transpose(0, 1)
        else:
            keys = read(k_cache, k_scale, p.block_table, q.dtype)[:, :p.context_len]
            values = read(v_cache, v_scale, p.block_table, q.dtype)[:, :p.context_len]
        o = F.scaled_dot_product_attention(qs, keys, values, attn_mask=p.mask,
                                           is_causal=p.mask is None, enable_gqa=True)
        out[rows] = o.transpose(0, 1)
