"""Linear layers split across tensor-parallel ranks; each parameter loads its own shard.

`loaded` may be a torch tensor or a lazy safetensors slice: only this rank's rows or
columns are read from disk.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tandem.distributed.parallel_state import all_reduce, tp_rank, tp_size


def divide(n: int, d: int, what: str) -> int:
    if n % d:
        raise ValueError(f"tensor_parallel_size: {what} ({n}) is not divisible by {d}")
    return n // d


def load_rows(loaded, start: int, size: int) -> torch.Tensor:
    return loaded[start:start + size]


def load_cols(loaded, start: int, size: int) -> torch.Tensor:
    return loaded[:, start:start + size]


def shape_of(loaded) -> tuple[int, ...]:
    return tuple(loaded.get_shape() if hasattr(loaded, "get_shape") else loaded.shape)


def copy_into(param: torch.Tensor, value: torch.Tensor) -> None:
    if tuple(param.shape) != tuple(value.shape):
        raise ValueError(f"weight shape {tuple(value.shape)} does not match {tuple(param.shape)}")
    param.data.copy_(value)


class LinearBase(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        self.bias = None
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False)
            self.bias.weight_loader = self.weight_loader

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class ReplicatedLinear(LinearBase):
    def weight_loader(self, param: nn.Parameter, loaded) -> None:
        copy_into(param, loaded[:])


class ColumnParallelLinear(LinearBase):
    """Output features split across ranks; the result stays sharded."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__(in_features, divide(out_features, tp_size(), "output size"), bias)

    def weight_loader(self, param: nn.Parameter, loaded) -> None:
        n = param.shape[0]
        copy_into(param, load_rows(loaded, tp_rank() * n, n))


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel outputs stored as one matrix (gate and up projections)."""

    def __init__(self, in_features: int, output_sizes: list[int], bias: bool = False):
        self.output_sizes = output_sizes
        super().__init__(in_features, sum(output_sizes), bias)

    def weight_loader(self, param: nn.Parameter, loaded, shard_id: int) -> None:
        n = self.output_sizes[shard_id] // tp_size()
        offset = sum(self.output_sizes[:shard_id]) // tp_size()
        copy_into(param.data[offset:offset + n], load_rows(loaded, tp_rank() * n, n))


class QKVParallelLinear(ColumnParallelLinear):
    """Query, key and value projections in one matrix; KV heads are replicated when there
    are more ranks than KV heads."""

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int,
                 bias: bool = False):
        tp = tp_size()
        self.head_dim = head_dim
        self.num_heads = divide(num_heads, tp, "number of attention heads")
        if tp >= num_kv_heads:
            divide(tp, num_kv_heads, "tensor parallel size over KV heads")
            self.num_kv_heads = 1
        else:
            self.num_kv_heads = divide(num_kv_heads, tp, "number of KV heads")
        out = (self.num_heads + 2 * self.num_kv_heads) * head_dim * tp
        super().__init__(hidden_size, out, bias)

    def weight_loader(self, param: nn.Parameter, loaded, shard_id: str) -> None:
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        if shard_id == "q":
            offset, n, start = 0, q, tp_rank() * q
        else:
            offset = q if shard_id == "k" else q + kv
            # With more ranks than KV heads, neighbouring ranks read the same head.
            total_heads = shape_of(loaded)[0] // self.head_dim
            n, start = kv, tp_rank() * total_heads // tp_size() * self.head_dim
        copy_into(param.data[offset:offset + n], load_rows(loaded, start, n))


class RowParallelLinear(LinearBase):
    """Input features split across ranks; partial sums are all-reduced."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__(divide(in_features, tp_size(), "input size"), out_features, bias)

    def weight_loader(self, param: nn.Parameter, loaded) -> None:
        if param.dim() == 1:  # the bias is added once, after the reduction
            copy_into(param, loaded[:])
            return
        n = param.shape[1]
        copy_into(param, load_cols(loaded, tp_rank() * n, n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight)
        y = all_reduce(y)
        return y if self.bias is None else y + self.bias
