"""A projection's weight as served quantized: what to multiply with, and what it costs."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tandem.config import cpu_isa
from tandem.quantization import avx2_kernels
from tandem.quantization.int4 import int4_matmul, pack_int4
from tandem.quantization.int8 import int8_matmul, quantize_int8
from tandem.quantization.q8_0 import (
    FUSED_ROWS,
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
    scales_and_zeros: torch.Tensor  # ATen's [K // group, N, 2] or, with avx2, scale_min
    group_size: int
    avx2: bool = False  # packed for Tandem's AVX2 kernel (avx2_kernels.py) instead of ATen's

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                   group_size: int) -> Int4Weight:
        if codes.device.type == "cpu" and avx2_kernels.fits_int4(*codes.shape, group_size) \
                and avx2_kernels.wanted():
            packed, scale_min = avx2_kernels.pack_int4(codes, scale, zero)
            if torch.isfinite(scale_min).all():  # else beyond float16: ATen's kernel
                return cls(packed, scale_min, group_size, avx2=True)
        return cls(*pack_int4(codes, scale, zero, group_size), group_size)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.avx2:
            return avx2_kernels.int4_mm(x, self.packed, self.scales_and_zeros)
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
    avx2_scale: torch.Tensor | None = None  # float16 scales for the AVX2 kernel
    avx2_min_rows: int = 1  # which serves steps of this many rows or more

    @classmethod
    def quantize(cls, w: torch.Tensor) -> Q8Weight:
        return cls(*quantize_q8_0(w))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.avx2_scale is not None and x.shape[0] >= self.avx2_min_rows:
            return avx2_kernels.q8_0_mm(x, self.codes, self.avx2_scale)
        if self.f16 is not None and x.shape[0] <= F16_HEAD_MAX_ROWS:
            return F.linear(x.to(torch.float16), self.f16).to(x.dtype)
        return q8_0_matmul(x, self.codes, self.scale, self.fused)

    def rows(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return embedding_q8_0(ids, self.codes, self.scale, dtype)

    @property
    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.codes, self.scale) + tuple(
            t for t in (self.f16, self.avx2_scale) if t is not None)


QuantWeight = Int4Weight | Int8Weight | Q8Weight


@torch.inference_mode()
def prepare_q8(model: torch.nn.Module, enforce_eager: bool) -> None:
    """The LM head's Q8_0 table, by what is fastest on this CPU for a decode step
    (benchmarks/q8_head.py; BENCHMARKS.md, issue 14 seventh step).
    - AVX2 only: Tandem's kernel (avx2_kernels.py) at every row count: 0.9 ms at one row, 4.4 at
      16, 16 at 64, against 1.3, 19 and 42 for the routes below.
    - AVX-512: Inductor's fused kernel up to FUSED_ROWS[-1] rows, compiled for one to
      PRECOMPILED_ROWS rows (decode batches and speculative verifications) now rather than on the
      first request (larger steps compile theirs on first use, about a second each); Tandem's
      kernel above that (15.9 ms at 64 rows against 25.2 for the chunked route) and, under
      --enforce-eager, at every row count (0.9 ms at one row against 4.3). AMX machines, where
      it is not measured, keep q8_0_matmul's routes.
    - AVX2 without that kernel (TANDEM_CPU_KERNELS=torch, or no compiler): Inductor's kernel's
      int8 loads are not vectorized (22 ms at one row against 2.7 with AVX-512), so steps of up to
      F16_HEAD_MAX_ROWS rows read a float16 copy (3.9 ms; top-1 99.8% against the exact head),
      which costs its memory (counted in weight_bytes)."""
    for m in model.modules():
        q = getattr(m, "quant", None)
        if isinstance(q, Q8Weight) and hasattr(m, "lowp"):  # the LM head
            cpu = q.codes.device.type == "cpu"
            # Elsewhere (CUDA) the chunked route: dequantize a slice, then one GEMM.
            q.fused = cpu and not enforce_eager
            ours = cpu and q.codes.shape[0] % 16 == 0
            if ours and avx2_kernels.wanted():
                q.avx2_scale = q.scale.half()  # the file's fp16 d: exact
            elif cpu and cpu_isa() not in ("AVX512", "AMX"):
                q.f16 = dequantize_q8_0(q.codes, q.scale).half()
            else:
                if ours and avx2_kernels.wanted(("AVX512",)):
                    q.avx2_scale = q.scale.half()
                    q.avx2_min_rows = FUSED_ROWS[-1] + 1 if q.fused else 1
                if q.fused:
                    warm_up_q8_0(q.codes, q.scale, PRECOMPILED_ROWS)
