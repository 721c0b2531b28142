"""The attention backend interface: write new K/V into paged blocks, attend through block tables."""
from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from tandem.attention.metadata import AttentionMetadata


class AttentionBackend(ABC):
    @abstractmethod
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                k_scale: torch.Tensor | None = None,
                v_scale: torch.Tensor | None = None) -> torch.Tensor:
        """q: [T, H, D]; k, v: [T, KVH, D]; caches: [KVH, num_blocks, block_size, D];
        scales: [KVH, num_blocks, block_size] for a float8 cache, else None. Returns [T, H, D]."""


def get_backend(device: torch.device) -> AttentionBackend:
    from tandem.attention.torch_ref import TorchAttention
    return TorchAttention()
