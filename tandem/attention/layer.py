from __future__ import annotations

import torch
from torch import nn

from tandem.attention.backend import AttentionBackend
from tandem.attention.metadata import get_metadata


class Attention(nn.Module):
    """Holds one layer's KV cache (assigned by the model runner) and calls the backend."""

    backend: AttentionBackend | None = None

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.k_cache = self.v_cache = torch.empty(0)
        self.k_scale: torch.Tensor | None = None  # per-token scales of a float8 cache
        self.v_scale: torch.Tensor | None = None

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self.backend.forward(q, k, v, self.k_cache, self.v_cache, get_metadata(),
                                    self.k_scale, self.v_scale)
