"""GGUF Q8_0 weights kept as stored: int8 codes and one scale per 32 elements of a row.

A Q8_0 block is an fp16 d then 32 int8 q, and x = d * q. No ATen op takes per-32 scales, so
`q8_0_matmul` computes x @ (d * q).T from the codes itself, exactly (float32 arithmetic; only the
summation order differs from a float32 matmul). Two routes, by rows (benchmarks/q8_head.py; the
49152 x 576 LM head, one thread: float32 copy 10-17 ms at 1 row, float16 copy 4-8 ms):

  up to 16 rows: a kernel Inductor generates from the multiply-and-sum in `_fused`. One pass over
    the weight (int8 and a scale a block, 32 MB instead of a float32 copy's 113 MB), each vector
    dequantized in registers once for all rows: 2.7 ms at 1 row, 12 ms at 8. Written as
    dequantize-then-F.linear, Inductor instead materializes the float32 weight on every call
    (110+ ms), or with freezing keeps it (the float32 copy again).
  more rows: CHUNK rows at a time dequantized into one reused float32 buffer that stays in cache,
    each chunk then a BLAS GEMM: compute, not reading the weight, is the cost here, and this
    is as fast as a float32 copy (80 ms at 64 rows against 126-133, 265 at 256 against 275-282).
"""
from __future__ import annotations

import functools
import logging
import types
from collections.abc import Callable

import gguf
import numpy as np
import torch

log = logging.getLogger(__name__)

BLOCK = 32  # elements per block, so per scale
BLOCK_BYTES = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][1]  # 2 (fp16 d) + 32
# Row counts the fused kernel is compiled for; others pad up. Every count to 8, as a step
# verifying k proposed tokens has k + 1 rows: padded from 5 to 8 rows the LM head took 3.7 ms
# where its own 5-row kernel takes 1.4 (1.2 at 4, 2.1 at 6; 2 threads, AVX-512).
FUSED_ROWS = (1, 2, 3, 4, 5, 6, 7, 8, 12, 16)
CHUNK = 1024  # rows dequantized at a time: 2.4 MB of float32 at K = 576, stays in L2/L3


def q8_0_codes(name: str, raw: np.ndarray,
               shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """`raw`: the tensor's bytes as `GGUFReader(...).tensors[i].data` gives them, uint8
    [N, K // 32 * 34]; `shape`: (N rows, K columns), the reader's `tensor.shape` reversed.
    Returns (codes int8 [N, K], scale float32 [N, K // 32]), exactly as stored."""
    n, k = shape
    if k % BLOCK or raw.size != n * (k // BLOCK) * BLOCK_BYTES:
        raise ValueError(f"{name}: {raw.size} bytes of Q8_0 do not hold a {tuple(shape)} tensor")
    blocks = np.ascontiguousarray(raw).view(np.uint8).reshape(n, k // BLOCK, BLOCK_BYTES)
    scale = blocks[..., :2].copy().view(np.float16)[..., 0].astype(np.float32)
    codes = blocks[..., 2:].copy().view(np.int8).reshape(n, k)
    return torch.from_numpy(codes), torch.from_numpy(scale)


def dequantize_q8_0(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The float32 [N, K] weight d * q; exact, as an fp16 d times an int8 q fits a float32."""
    n, k = codes.shape
    return (codes.view(n, k // BLOCK, BLOCK).float() * scale.float()[..., None]).view(n, k)


def quantize_q8_0(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A float [N, K] weight as Q8_0, as llama.cpp (and gguf.quants) quantizes it: d = max|x| /
    127 per block, q = x / d rounded half away from zero, d then stored as fp16. Returns (codes
    int8 [N, K], scale float32 [N, K // 32]), the scale the fp16 d as q8_0_codes gives it."""
    if w.dim() != 2 or w.shape[1] % BLOCK:
        raise ValueError(f"w must be 2-D [N, K] with K a multiple of {BLOCK}, got {tuple(w.shape)}")
    n, k = w.shape
    blocks = w.float().reshape(n, k // BLOCK, BLOCK)
    d = blocks.abs().amax(-1, keepdim=True) / 127
    scaled = blocks * torch.where(d == 0, 0.0, 1 / d)  # an all-zero block: codes 0
    # Rounded half away from zero, in gguf's own steps (np_roundf) so that codes match its bits.
    a = scaled.abs()
    codes = scaled.sign() * (a.floor() + (2 * (a - a.floor())).floor())
    return codes.to(torch.int8).view(n, k), d[..., 0].half().float()


def embedding_q8_0(ids: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Rows `ids` of the table, shape [*ids.shape, K] in `dtype`; only those rows are
    dequantized, so the table stays 8-bit."""
    flat = ids.reshape(-1)
    rows = dequantize_q8_0(codes.index_select(0, flat), scale.index_select(0, flat))
    return rows.to(dtype).view(*ids.shape, codes.shape[1])


def _fused(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    n, k = codes.shape
    w = codes.view(n, k // BLOCK, BLOCK).float() * scale[..., None]
    # One reduction per row, over the same weight: Inductor puts them in one loop nest over the
    # weight, loading and dequantizing each vector once for all rows. (As one [M, N, K]
    # reduction it loops rows outermost and reads the whole weight once per row.)
    return torch.stack([(w * row.view(-1, BLOCK)).sum((-1, -2)) for row in x.unbind(0)])


@functools.cache
def _fused_compiled(rows: int, *state: object) -> Callable[..., torch.Tensor]:
    # Made on first use, as importing Dynamo takes seconds. Static shapes: Inductor unrolls the
    # rows into the loop. Dynamo keeps its graphs per code object (8 at most) and needs a new one
    # for every shape, thread count and grad / inference mode, and under the engine's
    # "eager_on_recompile" stance a second graph would never be made. So each row count and
    # `state` gets its own copy of the code, compiled once.
    code = _fused.__code__.replace(co_name=f"_fused_{rows}_rows")
    return torch.compile(types.FunctionType(code, globals()), dynamic=False, fullgraph=True)


_compile_failed = False


def _chunked(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor,
             chunk: int = CHUNK) -> torch.Tensor:
    n, k = codes.shape
    out = x.new_empty(x.shape[0], n)
    buf = x.new_empty(min(chunk, n), k // BLOCK, BLOCK)
    for start in range(0, n, chunk):
        w = buf[: min(chunk, n - start)]
        w.view(-1, k).copy_(codes[start:start + chunk])  # int8 -> float32, exact
        w.mul_(scale[start:start + chunk, :, None])
        # out's columns [start, start + chunk) are a BLAS-compatible view (ld = n): no copy.
        torch.mm(x, w.view(-1, k).t(), out=out[:, start:start + chunk])
    return out


def q8_0_matmul(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor,
                fused: bool = True) -> torch.Tensor:
    """x [M, K] @ (d * q).T -> [M, N] in x.dtype, computed in float32: exact up to float32
    rounding for float32 x (and then rounded to x.dtype for 16-bit x). `fused=False` (the
    engine's --enforce-eager) never compiles: the chunked route serves every row count."""
    global _compile_failed
    n, k = codes.shape
    if codes.dtype != torch.int8 or tuple(scale.shape) != (n, k // BLOCK) or k % BLOCK:
        raise ValueError(f"codes int8 [N, K] and scale [N, K // {BLOCK}], got {codes.dtype} "
                         f"{tuple(codes.shape)} and {tuple(scale.shape)}")
    if x.dim() != 2 or x.shape[1] != k:
        raise ValueError(f"x must be [M, {k}], got {tuple(x.shape)}")
    m = x.shape[0]
    if fused and m <= FUSED_ROWS[-1] and not _compile_failed:
        rows = next(r for r in FUSED_ROWS if r >= m)
        padded = x.new_zeros(rows, k, dtype=torch.float32)  # made here: a tensor of the mode's kind
        padded[:m] = x
        state = (n, k, torch.get_num_threads(), torch.is_grad_enabled(),
                 torch.is_inference_mode_enabled(), codes.is_inference(), scale.is_inference())
        try:
            # Compile now even under the engine's "eager_on_recompile" stance (which, for a
            # graph not compiled yet, would run `_fused` eagerly: ~100x slower than either route).
            with torch.compiler.set_stance("default"):
                return _fused_compiled(rows, *state)(padded, codes, scale)[:m].to(x.dtype)
        except Exception as e:  # noqa: BLE001 - no C++ compiler, say: _chunked is exact too
            _compile_failed = True
            log.warning("q8_0_matmul: compiling the fused kernel failed (%s); using the "
                        "chunked route for every row count", e)
    return _chunked(x.float().contiguous(), codes, scale).to(x.dtype)


def warm_up_q8_0(codes: torch.Tensor, scale: torch.Tensor, max_rows: int = FUSED_ROWS[-1]) -> None:
    """Compile the fused kernel for every row count up to `max_rows` now (seconds each on a cold
    Inductor cache, ~0.1 s on a warm one) rather than on the first step of each size. Call it in
    the grad / inference mode and with the thread count that serving uses: each is a graph of
    its own."""
    for rows in FUSED_ROWS:
        if rows <= max_rows:
            q8_0_matmul(torch.zeros(rows, codes.shape[1], device=codes.device), codes, scale)
