"""Decode attention over the paged cache as plain tensor math, for Inductor to fuse into the
compiled decoder layer of a step that only decodes (engine/compile.py).

Through the opaque `tandem::attention` op, a decode's attention is ~10 ATen calls (cache
writes, gathers, SDPA, copies), each with its own dispatch and allocation, for a few
multiply-adds per cached token. Written as broadcasts and sums, Inductor turns the writes, the
gathers through the block table, the scores, the softmax and the weighted sum into a few C++
loops (BENCHMARKS.md, issue 14 sixth step: a step 0.94x at one row, 0.77x at 64 rows, of the
same code with attention in the opaque op). Eagerly this would be slow (it materializes [KV heads, decodes, group, tokens, head dim]
products); it runs only inside a compiled graph.
"""
from __future__ import annotations

import torch


def paged_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                 slots: torch.Tensor, tables: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
    """q: [N, H, D] one query per decode row; k, v: [N, KVH, D], stored at `slots` [N] of the
    layer's cache kv_cache [2 (K, V), KVH, blocks, block_size, D] first (one tensor: a graph
    that mutates two views of one storage copies all of it); tables: [N, W] block ids,
    zero-padded; lens: [N] tokens each row attends to. Scores, softmax and sums in float32.
    Returns [N, H, D]."""
    n, heads, d = q.shape
    kvh, block_size = kv_cache.shape[1], kv_cache.shape[3]
    kv_cache.view(2, kvh, -1, d).index_copy_(2, slots, torch.stack((k, v)).transpose(1, 2))
    width = tables.shape[1] * block_size
    kv = kv_cache[:, :, tables].view(2, kvh, n, 1, width, d).float()
    # Each KV head's group of query heads: [KVH, N, group, 1, D].
    qg = q.view(n, kvh, heads // kvh, 1, d).permute(1, 0, 2, 3, 4).float()
    scores = (qg * kv[0]).sum(-1) * d ** -0.5  # [KVH, N, group, W * block_size]
    past = torch.arange(width, device=q.device) >= lens.view(1, n, 1, 1)
    probs = torch.softmax(scores.masked_fill(past, float("-inf")), -1)
    out = (probs.unsqueeze(-1) * kv[1]).sum(-2)  # [KVH, N, group, D]
    return out.to(q.dtype).permute(1, 0, 2, 3).reshape(n, heads, d)
