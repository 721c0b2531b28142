"""Rotary position embedding (neox layout, as HF Llama), with llama3 and linear scaling."""
from __future__ import annotations

import math

import torch
from torch import nn


def rope_inv_freq(head_dim: int, rope: dict) -> torch.Tensor:
    base = float(rope.get("rope_theta", 10000.0))
    # float32 throughout, as HF computes it, so logits match the reference bit for bit.
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim)
    kind = rope.get("rope_type") or rope.get("type") or "default"
    if kind == "default":
        return inv_freq
    if kind == "linear":
        return inv_freq / rope["factor"]
    if kind == "llama3":
        factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
        old_len = rope["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        smooth = (old_len / wavelen - low) / (high - low)
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        mid = (wavelen <= old_len / low) & (wavelen >= old_len / high)
        return torch.where(mid, (1 - smooth) * inv_freq / factor + smooth * inv_freq, scaled)
    raise ValueError(f"model: rope_type {kind!r} is not supported")


class RotaryEmbedding(nn.Module):
    """One per model: a step looks up its positions' cos/sin once and every layer's
    `apply_rotary` reuses them."""

    def __init__(self, head_dim: int, max_position: int, rope: dict):
        super().__init__()
        freqs = torch.outer(torch.arange(max_position).float(), rope_inv_freq(head_dim, rope))
        self.register_buffer("cos", freqs.cos(), persistent=False)
        self.register_buffer("sin", freqs.sin(), persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[T] positions -> (cos, sin), each [T, 1, D / 2]."""
        return self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)


def apply_rotary(x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """x: [T, heads, D] (queries and keys side by side) -> x rotated to its positions."""
    cos, sin = rope
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)
