"""Attention in plain PyTorch (SDPA), for the CPU and any other device."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from tandem.attention.backend import AttentionBackend
from tandem.attention.metadata import AttentionMetadata


def gather_blocks(cache: torch.Tensor, block_table: torch.Tensor) -> torch.Tensor:
    """[..., nb] block ids -> [..., KVH, nb * block_size, D] keys or values."""
    x = cache[block_table]  # [..., nb, bs, KVH, D]
    x = x.flatten(-4, -3)
    return x.transpose(-3, -2)


class TorchAttention(AttentionBackend):
    def forward(self, q, k, v, k_cache, v_cache, meta: AttentionMetadata) -> torch.Tensor:
        num_kv_heads, head_dim = k.shape[1], k.shape[2]
        k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, meta.slot_mapping, k)
        v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, meta.slot_mapping, v)
        out = torch.empty_like(q)
        nd = meta.num_decode
        if nd:
            keys = gather_blocks(k_cache, meta.decode_block_tables)
            values = gather_blocks(v_cache, meta.decode_block_tables)
            out[:nd] = F.scaled_dot_product_attention(
                q[:nd].unsqueeze(2), keys, values, attn_mask=meta.decode_mask, enable_gqa=True,
            ).squeeze(2)
        for p in meta.prefills:
            rows = slice(p.q_start, p.q_start + p.q_len)
            qs = q[rows].transpose(0, 1)
            if p.mask is None:  # nothing cached: attend to the new tokens only
                o = F.scaled_dot_product_attention(qs, k[rows].transpose(0, 1),
                                                   v[rows].transpose(0, 1), is_causal=True,
                                                   enable_gqa=True)
            else:
                keys = gather_blocks(k_cache, p.block_table)[:, :p.context_len]
                values = gather_blocks(v_cache, p.block_table)[:, :p.context_len]
                o = F.scaled_dot_product_attention(qs, keys, values, attn_mask=p.mask,
                                                   enable_gqa=True)
            out[rows] = o.transpose(0, 1)
        return out
