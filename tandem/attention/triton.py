"""Attention through Triton kernels (triton_kernels.py), for CUDA.

What runs where: the cache write (float8 quantization included) and the one-token decodes are
Triton kernels; prefill chunks, with or without a cached prefix, go through SDPA
(torch_ref.attend_prefills) on the values the cache now holds. Decodes stop at each row's
length (metadata.decode_lens), so no decode mask is built. On the CPU this runs only under
Triton's interpreter (TRITON_INTERPRET=1), which the tests use.
"""
from __future__ import annotations

import torch

from tandem.attention.backend import AttentionBackend
from tandem.attention.metadata import AttentionMetadata
from tandem.attention.torch_ref import attend_prefills
from tandem.attention.triton_kernels import paged_decode_attention, reshape_and_cache


class TritonAttention(AttentionBackend):
    decode_mask = False

    def forward(self, q, k, v, k_cache, v_cache, meta: AttentionMetadata,
                k_scale=None, v_scale=None) -> torch.Tensor:
        # New tokens are attended as stored (float8-rounded in an fp8 cache), as in TorchAttention.
        k, v = reshape_and_cache(k, v, k_cache, v_cache, meta.slot_mapping, k_scale, v_scale)
        out = torch.empty_like(q)
        nd = meta.num_decode
        if nd:
            paged_decode_attention(q[:nd], k_cache, v_cache, meta.decode_block_tables,
                                   meta.decode_lens, k_scale, v_scale, out)
        attend_prefills(q, k, v, k_cache, v_cache, meta, k_scale, v_scale, out)
        return out
