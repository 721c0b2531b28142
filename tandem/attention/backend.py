"""The attention backend interface: write new K/V into paged blocks, attend through block tables."""
from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from tandem.attention.metadata import AttentionMetadata


class AttentionBackend(ABC):
    # Whether decodes read metadata.decode_mask (a [1, decodes, 1, width] additive mask); a
    # backend that stops at each row's length reads decode_lens instead, and the mask is not built.
    decode_mask: bool = True

    @abstractmethod
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                k_scale: torch.Tensor | None = None,
                v_scale: torch.Tensor | None = None) -> torch.Tensor:
        """q: [T, H, D]; k, v: [T, KVH, D]; caches: [KVH, num_blocks, block_size, D];
        scales: [KVH, num_blocks, block_size] for a float8 cache, else None. Returns [T, H, D]."""


BACKENDS = ("auto", "torch", "triton")


def resolve_backend(name: str, device: torch.device) -> str:
    """auto: Triton's kernels on CUDA, the torch reference elsewhere."""
    if name == "auto":
        return "triton" if device.type == "cuda" else "torch"
    return name


def get_backend(name: str) -> AttentionBackend:
    """The backend called `name` (torch or triton, as resolve_backend gives)."""
    if name == "triton":
        from tandem.attention.triton import TritonAttention
        return TritonAttention()
    from tandem.attention.torch_ref import TorchAttention
    return TorchAttention()
