"""A projection's weight as served quantized: what to multiply with, and what it costs."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tandem.config import cpu_isa
from tandem.quantization.int4 import int4_matmul, pack_int4
from tandem.quantization.int8 import int8_matmul, quantize_int8
from tandem.quantization.q8_0 import (
    dequantize_q8_0,
    embedding_q8_0,
    q8_0_matmul,
    quantize_q8_0,
    warm_up_q8_0,
)

# Rows up to which a float16 copy of the LM head beats the Q8_0 routes with AVX2 only: 12 ms
# at 4 rows against 25-36, 23 at 8 against 22-26 (benchmarks/q8_head.py, 2-core EPYC).
F16_HEAD_MAX_ROWS = 4
# The LM head's fused kernel is compiled at start up to this many rows: a decode batch of up to
# 8, or one request verifying up to 7 proposed tokens.
PRECOMPILED_ROWS = 8


@dataclass
class Int4Weight:
    packed: torch.Tensor
    scales_and_zeros: torch.Tensor
    group_size: int

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                   group_size: int) -> Int4Weight:
        return cls(*pack_int4(codes, scale, zero, group_size), group_size)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return int4_matmul(x, self.packed, self.scales_and_zeros, self.group_size)

    @property
    def tensors(self) -> tuple[torch.Tensor, ...]:
        return self.packed, self.scales_and_zeros


@dataclass
class Int8Weight:
    codes: torch.Tensor  # int8 [N, K]
    scale: torch.Tensor  # float32 [N], to dequantize (the dense copy)
    scale_bf16: torch.Tensor  # the kernel's copy

    @classmethod
    def quantize(cls, w: torch.Tensor) -> Int8Weight:
        codes, scale = quantize_int8(w)
        return cls(codes, scale, scale.to(torch.bfloat16))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return int8_matmul(x, self.codes, self.scale_bf16)

    @property
    def tensors(self) -> tuple[torch.Tensor, ...]:
        return self.codes, self.scale, self.scale_bf16


@dataclass
class Q8Weight:
    """GGUF's Q8_0: int8 codes with one scale per 32 of a row. The embedding / LM head table:
    exact for a Q8_0 file, and requantized with per-32 scales it keeps the LM head's top-1 where
    one scale a row does not (docs/quantization.md)."""
    codes: torch.Tensor  # int8 [N, K]
    scale: torch.Tensor  # float32 [N, K // 32]
    fused: bool = True  # the Inductor kernel for few rows; False under --enforce-eager
    f16: torch.Tensor | None = None  # a float16 copy for few rows, where that kernel is slow

    @classmethod
    def quantize(cls, w: torch.Tensor) -> Q8Weight:
        return cls(*quantize_q8_0(w))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.f16 is not None and x.shape[0] <= F16_HEAD_MAX_ROWS:
            return F.linear(x.to(torch.float16), self.f16).to(x.dtype)
        return q8_0_matmul(x, self.codes, self.scale, self.fused)

    def rows(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return embedding_q8_0(ids, self.codes, self.scale, dtype)

    @property
    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.codes, self.scale) + ((self.f16,) if self.f16 is not None else ())


QuantWeight = Int4Weight | Int8Weight | Q8Weight


@torch.inference_mode()
def prepare_q8(model: torch.nn.Module, enforce_eager: bool) -> None:
    """The LM head's Q8_0 table, by what is fastest on this CPU for a decode step
    (benchmarks/q8_head.py). With AVX-512, Inductor's fused kernel: compiled for one to
    PRECOMPILED_ROWS rows (decode batches and speculative verifications) now rather than on the
    first request (larger steps compile theirs on first use, about a second each), none under
    --enforce-eager. With AVX2 only, that kernel's int8 loads are not vectorized (22 ms at one row against 2.7 with AVX-512), so steps of up to
    F16_HEAD_MAX_ROWS rows read a float16 copy (3.9 ms; top-1 99.8% against the exact head),
    which costs its memory (counted in weight_bytes)."""
    for m in model.modules():
        q = getattr(m, "quant", None)
        if isinstance(q, Q8Weight) and hasattr(m, "lowp"):  # the LM head
            q.fused = not enforce_eager
            if cpu_isa() not in ("AVX512", "AMX") and q.codes.device.type == "cpu":
                q.f16 = dequantize_q8_0(q.codes, q.scale).half()
            elif q.fused:
                warm_up_q8_0(q.codes, q.scale, PRECOMPILED_ROWS)
