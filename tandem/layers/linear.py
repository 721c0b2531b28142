"""Linear layers split across tensor-parallel ranks; each parameter loads its own shard.

`loaded` may be a torch tensor or a lazy safetensors slice: only this rank's rows or
columns are read from disk.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tandem.config import cpu_isa
from tandem.distributed.parallel_state import all_reduce, tp_rank, tp_size
from tandem.quantization.int4 import dequantize_int4, quantize_int4
from tandem.quantization.int8 import dequantize_int8
from tandem.quantization.weight import Int4Weight, Int8Weight, QuantWeight


def divide(n: int, d: int, what: str) -> int:
    if n % d:
        raise ValueError(f"tensor_parallel_size: {what} ({n}) is not divisible by {d}")
    return n // d


def shape_of(loaded) -> tuple[int, ...]:
    return tuple(loaded.get_shape() if hasattr(loaded, "get_shape") else loaded.shape)


# Read big tensors in pieces: a whole extra copy of the largest tensor (the embedding is 20% of
# a 1B model) would break the 1/N-per-rank memory bound while loading.
CHUNK_BYTES = 16 << 20


def copy_into(param: torch.Tensor, loaded, row: int = 0, col: int | None = None) -> None:
    """param <- loaded[row:row + rows, col:col + cols] (the shape of `param`), piecewise.
    `loaded` is a tensor or a lazy safetensors slice; only the rows read touch memory."""
    full, shape = shape_of(loaded), tuple(param.shape)
    fits = len(full) == len(shape) and row + shape[0] <= full[0] and (
        full[1:] == shape[1:] if col is None
        else col + shape[1] <= full[1] and full[2:] == shape[2:])
    if not fits:
        raise ValueError(f"weight shape {full} does not fit {shape}")
    step = max(1, CHUNK_BYTES // max(1, param[0].numel() * 4))
    for i in range(0, shape[0], step):
        rows = slice(row + i, row + min(i + step, shape[0]))
        part = loaded[rows] if col is None else loaded[rows, col:col + shape[1]]
        param.data[i:i + part.shape[0]].copy_(part)


def copy_whole(param: torch.Tensor, loaded) -> None:
    """A parameter every rank holds whole: the checkpoint's shape must be the parameter's."""
    if shape_of(loaded) != tuple(param.shape):
        raise ValueError(f"weight shape {shape_of(loaded)} does not match {tuple(param.shape)}")
    copy_into(param, loaded)


# Rows up to which a step may use the 16-bit decode copy of a weight (see DECODE_WEIGHT_DTYPES);
# from 3 rows on, the float32 kernel below reads the weight as fast per row.
LOWP_MAX_ROWS = 2
# On CPU, x @ W.T with a few rows makes BLAS repack W.T on every call; W @ x.T streams W in its
# stored layout: 1.1-2.2x faster from 2 to 128 rows, 0.9x at 256 (benchmarks/cpu_matmul.py).
SKINNY_MAX_ROWS = 128


# Rows from which a dense copy beats the quantized kernel, by the ISA that runs them
# (benchmarks/cpu_matmul.py; BENCHMARKS.md, issue 14): ATen's int4 kernel with AVX-512, and
# oneDNN's bfloat16 GEMM takes AMX where the CPU has it; with AVX2 only, Tandem's kernel
# (quantization/avx2_kernels.py), which float32 first beats at 1,024 rows (bfloat16 there is
# from ATen's AVX2 path, as only TANDEM_CPU_BF16=1 makes such a copy). Without AVX2 the int4
# kernel is a scalar loop: the dense copy always wins.
DENSE_CROSSOVERS = {
    "AMX": {torch.bfloat16: 16, torch.float32: 64},
    "AVX512": {torch.bfloat16: 32, torch.float32: 256},
    "AVX2": {torch.bfloat16: 16, torch.float32: 1024},
}


def dense_min_rows(dtype: torch.dtype) -> int:
    return DENSE_CROSSOVERS.get(cpu_isa(), {}).get(dtype, 1)


def matmul(x: torch.Tensor, weight: torch.Tensor, lowp: torch.Tensor | None = None
           ) -> torch.Tensor:
    """x @ weight.T, by the fastest route for the number of rows."""
    rows = x.shape[0]
    if lowp is not None and rows <= LOWP_MAX_ROWS:
        return F.linear(x.to(lowp.dtype), lowp).to(x.dtype)
    if x.device.type == "cpu" and 1 < rows <= SKINNY_MAX_ROWS and x.dim() == 2:
        return torch.mm(weight, x.t()).t().contiguous()
    return F.linear(x, weight)


def add_decode_copies(model: nn.Module, dtype: torch.dtype) -> None:
    """Give every projection and the LM head a `lowp` copy of its weight in `dtype`."""
    for m in model.modules():
        if (isinstance(m, LinearBase) or hasattr(m, "lowp")) and hasattr(m, "weight"):
            m.lowp = m.weight.detach().to(dtype)


class LinearBase(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        self.bias = None
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False)
            self.bias.weight_loader = self.weight_loader
        self.lowp: torch.Tensor | None = None
        self.quant: QuantWeight | None = None
        self.quantize_to: tuple[str, int] | None = None  # (method, group size) once loaded
        self.group_size = 0  # of 4-bit weights
        self.dense: torch.Tensor | None = None  # a quantized layer's opt-in copy for many rows
        self.dense_min_rows = 0

    def check_int4(self, group_size: int) -> None:
        """Before anything loads: this rank's shard must fit the int4 kernel."""
        out_features, in_features = self.weight.shape
        if in_features % group_size:
            raise ValueError(f"quantization_group_size: {in_features} input features per rank "
                             f"would split a group of {group_size} 4-bit weights (a group "
                             f"never straddles two tensor-parallel ranks)")
        if out_features % 16:
            raise ValueError(f"quantization: the int4 kernel needs output features per rank "
                             f"divisible by 16, got {out_features}")

    def expect_int4(self, group_size: int) -> None:
        """Load this rank's 4-bit codes and group scales and zeros instead of the weight (see
        loader/gguf_quant.py); they are sharded by this layer's own weight_loader, whose row and
        column offsets count codes bytes and groups as they count weights."""
        self.check_int4(group_size)
        self.group_size = group_size
        out_features, in_features = self.weight.shape
        del self.weight
        for name, cols, dtype in (("qcodes", in_features // 2, torch.uint8),
                                  ("qscale", in_features // group_size, torch.float32),
                                  ("qzero", in_features // group_size, torch.float32)):
            param = nn.Parameter(torch.empty(out_features, cols, dtype=dtype),
                                 requires_grad=False)
            param.weight_loader = self.weight_loader
            self.register_parameter(name, param)

    def expect_quantized(self, method: str, group_size: int) -> None:
        """Quantize the weight (int4 or int8) as soon as this rank's shard of it has loaded."""
        if method == "int4":
            self.check_int4(group_size)
        self.quantize_to, self.group_size = (method, group_size), group_size

    def finish_loading(self, dense_dtype: torch.dtype | None = None) -> None:
        """Turn the loaded codes (GGUF) or weight (int4/int8) into the kernel's layout; with
        `dense_dtype`, also keep the weight they stand for, for steps of `dense_min_rows` rows
        or more (dequantized, so a request's tokens do not depend on its batch)."""
        from tandem.loader.gguf_quant import unpack_nibbles

        if hasattr(self, "qcodes"):
            q4 = unpack_nibbles(self.qcodes.data), self.qscale.data, self.qzero.data
            del self.qcodes, self.qscale, self.qzero
        else:
            w = self.weight.data
            del self.weight
            q4 = quantize_int4(w, self.group_size) if self.quantize_to[0] == "int4" else None
        if q4 is None:
            self.quant = Int8Weight.quantize(w)
        else:
            self.quant = Int4Weight.from_codes(*q4, self.group_size)
        if dense_dtype is not None:
            full = (dequantize_int8(self.quant.codes, self.quant.scale) if q4 is None
                    else dequantize_int4(*q4, self.group_size))
            self.dense, self.dense_min_rows = full.to(dense_dtype), dense_min_rows(dense_dtype)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        if self.quant is not None and (self.dense is None
                                       or x.shape[0] < self.dense_min_rows):
            return self.quant(x)
        if self.dense is not None:  # W @ x.T is a float32 route; 16-bit GEMMs want F.linear
            y = (matmul(x, self.dense) if self.dense.dtype == torch.float32
                 else F.linear(x.to(self.dense.dtype), self.dense))
            return y.to(x.dtype)
        return matmul(x, self.weight, self.lowp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.project(x)
        return y if self.bias is None else y + self.bias


class ReplicatedLinear(LinearBase):
    def weight_loader(self, param: nn.Parameter, loaded) -> None:
        copy_whole(param, loaded)


class ColumnParallelLinear(LinearBase):
    """Output features split across ranks; the result stays sharded."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__(in_features, divide(out_features, tp_size(), "output size"), bias)

    def weight_loader(self, param: nn.Parameter, loaded) -> None:
        n = param.shape[0]
        copy_into(param, loaded, tp_rank() * n)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel outputs stored as one matrix (gate and up projections)."""

    def __init__(self, in_features: int, output_sizes: list[int], bias: bool = False):
        self.output_sizes = output_sizes
        super().__init__(in_features, sum(output_sizes), bias)

    def weight_loader(self, param: nn.Parameter, loaded, shard_id: int) -> None:
        n = self.output_sizes[shard_id] // tp_size()
        offset = sum(self.output_sizes[:shard_id]) // tp_size()
        copy_into(param.data[offset:offset + n], loaded, tp_rank() * n)


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
        copy_into(param.data[offset:offset + n], loaded, start)


class RowParallelLinear(LinearBase):
    """Input features split across ranks; partial sums are all-reduced."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__(divide(in_features, tp_size(), "input size"), out_features, bias)

    def weight_loader(self, param: nn.Parameter, loaded) -> None:
        if param.dim() == 1:  # the bias is added once, after the reduction
            copy_whole(param, loaded)
            return
        n = param.shape[1]
        copy_into(param, loaded, 0, tp_rank() * n)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = all_reduce(self.project(x))
        return y if self.bias is None else y + self.bias
