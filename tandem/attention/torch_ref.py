"""Attention in plain PyTorch (SDPA), for the CPU and any other device."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from tandem.attention.backend import AttentionBackend
from tandem.attention.metadata import AttentionMetadata


def gather(cache: torch.Tensor, block_table: torch.Tensor) -> torch.Tensor:
    """[KVH, num_blocks, B, D] cache, [..., nb] block ids -> [KVH, ..., nb * B, D], contiguous."""
    kvh, _, bs, d = cache.shape
    x = cache.index_select(1, block_table.flatten())
    return x.view(kvh, *block_table.shape[:-1], block_table.shape[-1] * bs, d)


class TorchAttention(AttentionBackend):
    def forward(self, q, k, v, k_cache, v_cache, meta: AttentionMetadata) -> torch.Tensor:
        num_kv_heads, head_dim = k.shape[1], k.shape[2]
        k_cache.view(num_kv_heads, -1, head_dim).index_copy_(1, meta.slot_mapping, k.transpose(0, 1))
        v_cache.view(num_kv_heads, -1, head_dim).index_copy_(1, meta.slot_mapping, v.transpose(0, 1))
        out = torch.empty_like(q)
        nd = meta.num_decode
        if nd:
            # KV heads lead the batch dims, so the gathered keys are SDPA-ready without a copy,
            # and each KV head's group of query heads rides in the query-length dim.
            group = q.shape[1] // num_kv_heads
            qd = q[:nd].view(nd, num_kv_heads, group, head_dim).transpose(0, 1)
            o = F.scaled_dot_product_attention(
                qd, gather(k_cache, meta.decode_block_tables),
                gather(v_cache, meta.decode_block_tables), attn_mask=meta.decode_mask)
            out[:nd] = o.transpose(0, 1).reshape(nd, -1, head_dim)
        for p in meta.prefills:
            rows = slice(p.q_start, p.q_start + p.q_len)
            qs = q[rows].transpose(0, 1)
            if p.mask is None:  # nothing cached: attend to the new tokens only
                keys, values = k[rows].transpose(0, 1), v[rows].transpose(0, 1)
            else:
                keys = gather(k_cache, p.block_table)[:, :p.context_len]
                values = gather(v_cache, p.block_table)[:, :p.context_len]
            o = F.scaled_dot_product_attention(qs, keys, values, attn_mask=p.mask,
                                               is_causal=p.mask is None, enable_gqa=True)
            out[rows] = o.transpose(0, 1)
        return out
