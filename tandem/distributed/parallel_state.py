"""Tensor-parallel rank, size and the collectives the layers need (no-ops at tp_size 1)."""
from __future__ import annotations

import torch
import torch.distributed as dist


def tp_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def tp_rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    if tp_size() > 1:
        dist.all_reduce(x)
    return x


def gather_to_first(x: torch.Tensor, dim: int = -1) -> torch.Tensor | None:
    """Concatenate every rank's shard along `dim` on rank 0; other ranks get None."""
    if tp_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(tp_size())] if tp_rank() == 0 else None
    dist.gather(x, parts, dst=0)
    return torch.cat(parts, dim) if parts else None


def check_tp_size(hf_config, n: int) -> None:
    """Fail before any process starts when `n` ranks cannot split the model."""
    if n == 1:
        return
    heads, kv = hf_config.num_attention_heads, hf_config.num_key_value_heads

    def fits(k: int) -> str | None:
        if heads % k:
            return f"the model's {heads} query heads"
        if (k % kv if k >= kv else kv % k):
            return (f"the model's {kv} KV heads (each rank needs whole KV heads: fewer ranks "
                    f"must divide them, more ranks must be a multiple of them)")
        for name in ("intermediate_size", "vocab_size"):
            if getattr(hf_config, name) % k:
                return f"its {name} ({getattr(hf_config, name)})"
        return None

    why = fits(n)
    if why:
        ok = [k for k in range(1, 65) if fits(k) is None]
        raise ValueError(f"tensor_parallel_size: {n} ranks cannot split {why}; sizes that work "
                         f"for this model: {', '.join(map(str, ok))}")
