"""Routes for SmolLM2's Q8_0 tied LM head (49152 x 576, logits = hidden @ W.T) on this CPU.

The weight is the GGUF's own `token_embd.weight`: int8 codes and an fp16 scale per 32 elements
(tandem/quantization/q8_0.py). Exact routes compute x @ (d * q).T in float32 from the codes:

  q8-fused    q8_0_matmul's kernel for up to 16 rows: Inductor's code for a multiply-and-sum, one
              reduction per row in one loop nest over the weight (compiled here for each row
              count; q8_0_matmul pads to 1, 2, 4, 8 or 16 rows)
  q8-fused-mnk  the same as one [M, N, K] reduction: Inductor loops rows outermost
  q8-chunked  q8_0_matmul's route for more rows: 1024 rows at a time dequantized into a reused
              float32 buffer, then torch.mm (MKL) into the output's columns
  q8-grouped  x [M, 18, 32] against the codes as [18, 32, n] (float32, 4096 rows at a time): bmm
              over the 18 groups, then the scales' weighted sum, y = sum_g d[n, g] (x_g . q_ng)
  q8-avx2     Tandem's AVX2 kernel (tandem/quantization/avx2_kernels.py): the codes times x
              rounded to int16 (one scale a row), vpmaddwd; exact up to that rounding
  q8-deq-linear       dequantize all of W (eager), then F.linear: 113 MB written a call
  q8-inductor-linear  torch.compile of that dequantize-then-F.linear (Inductor materializes W)

and the copies and approximations it is measured against:

  f32 F.linear, float32 copy (113 MB)      f32-wxt  torch.mm(W, x.T).T, float32 copy
  f16 / bf16  F.linear on a 16-bit copy, activations of that dtype
  int8-bf16 / int8-f16 / int8-f32  _weight_int8pack_mm: per-channel int8 (requantized from W,
              not exact), activations of that dtype; only bfloat16 takes a vectorized kernel

ms a call: the median of --repeats calls, routes taken in turn within each repeat so that a noisy
neighbour hits them alike. GB/s: the route's weight bytes over that time. Compile: the first call
of each compiled route and row count (cache as found). --cache-check then times q8_0_matmul's
first calls (rows 1, 2, 4, 8, 16) in two fresh processes sharing one empty TORCHINDUCTOR_CACHE_DIR.

With 2 threads on a machine other processes keep busy, every OpenMP region can wait a scheduler
slice for its second thread: q8-chunked (3 regions a chunk) then takes 100x its 1-thread time,
the single-region routes (q8-fused, one MKL call) far less. Compare at --threads 1 there.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/q8_head.py [--rows 1 2 4 8 16 64] [--threads 2 1]
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

import gguf
import torch
import torch.nn.functional as F
from cpu_matmul import machine

from tandem.loader.model_path import smollm2_gguf
from tandem.quantization import avx2_kernels
from tandem.quantization.q8_0 import (
    BLOCK,
    _chunked,
    _fused_compiled,
    dequantize_q8_0,
    q8_0_codes,
    q8_0_matmul,
)

ROWS = [1, 2, 4, 8, 16, 64]
ROUTES = ("q8-fused", "q8-fused-mnk", "q8-chunked", "q8-grouped", "q8-avx2", "q8-deq-linear",
          "q8-inductor-linear", "f32", "f32-wxt", "f16", "bf16", "int8-bf16", "int8-f16",
          "int8-f32")
Route = Callable[[torch.Tensor], torch.Tensor]


def head_codes() -> tuple[torch.Tensor, torch.Tensor]:
    t = next(t for t in gguf.GGUFReader(smollm2_gguf()).tensors if t.name == "token_embd.weight")
    k, n = (int(d) for d in t.shape)
    return q8_0_codes(t.name, t.data, (n, k))


def fused_mnk(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    n, k = codes.shape
    w = codes.view(n, k // BLOCK, BLOCK).float() * scale[..., None]
    return (x.view(x.shape[0], 1, k // BLOCK, BLOCK) * w).sum((-1, -2))


def grouped(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor,
            chunk: int = 4096) -> torch.Tensor:
    n, k = codes.shape
    g = k // BLOCK
    xg = x.view(-1, g, BLOCK).transpose(0, 1)  # [18, M, 32]
    out = x.new_empty(x.shape[0], n)
    for s in range(0, n, chunk):
        q = codes[s:s + chunk].view(-1, g, BLOCK).permute(1, 2, 0).float()  # [18, 32, n]
        part = torch.bmm(xg, q)  # [18, M, n]: each group's dot products, unscaled
        out[:, s:s + chunk] = (part * scale[s:s + chunk].t()[:, None, :]).sum(0)
    return out


def routes(codes: torch.Tensor, scale: torch.Tensor) -> dict[str, tuple[int, Route, set | None]]:
    """name -> (weight bytes, x -> logits, the row counts it runs at; None: all)."""
    w = dequantize_q8_0(codes, scale)
    w16, wb = w.half(), w.bfloat16()
    s8 = w.abs().amax(1) / 127
    w8 = (w / s8[:, None]).round().clamp(-127, 127).to(torch.int8)
    q8 = codes.nbytes + scale.nbytes
    mnk = torch.compile(fused_mnk, dynamic=False)
    ind = torch.compile(lambda x, c, s: F.linear(x, dequantize_q8_0(c, s)), dynamic=False)
    int8 = torch.ops.aten._weight_int8pack_mm
    return {
        "q8-fused": (q8, lambda x: _fused_compiled(len(x), torch.get_num_threads())(
            x, codes, scale), {1, 2, 3, 4, 8, 16}),
        "q8-fused-mnk": (q8, lambda x: mnk(x, codes, scale), {1, 2, 4}),
        "q8-chunked": (q8, lambda x: _chunked(x, codes, scale), None),
        "q8-grouped": (q8, lambda x: grouped(x, codes, scale), None),
        "q8-avx2": (codes.nbytes + scale.nbytes // 2,
                    lambda x: avx2_kernels.q8_0_mm(x, codes, scale.half()), None),
        "q8-deq-linear": (q8, lambda x: F.linear(x, dequantize_q8_0(codes, scale)), None),
        "q8-inductor-linear": (q8, lambda x: ind(x, codes, scale), {1}),
        "f32": (w.nbytes, lambda x: F.linear(x, w), None),
        "f32-wxt": (w.nbytes, lambda x: torch.mm(w, x.t()).t(), None),
        "f16": (w16.nbytes, lambda x: F.linear(x.half(), w16), None),
        "bf16": (wb.nbytes, lambda x: F.linear(x.bfloat16(), wb), None),
        "int8-bf16": (w8.nbytes + s8.nbytes // 2,
                      lambda x: int8(x.bfloat16(), w8, s8.bfloat16()), None),
        "int8-f16": (w8.nbytes + s8.nbytes // 2, lambda x: int8(x.half(), w8, s8.half()), {1}),
        "int8-f32": (w8.nbytes + s8.nbytes, lambda x: int8(x, w8, s8), {1, 2, 4}),
    }


def table(threads: int, rows: list[int], repeats: int, names: list[str],
          codes: torch.Tensor, scale: torch.Tensor) -> None:
    torch.set_num_threads(threads)
    rs = {n: r for n, r in routes(codes, scale).items() if n in names}
    w = dequantize_q8_0(codes, scale)
    print(f"\n{threads} thread(s); weight MB: " + ", ".join(
        f"{n} {b / 1e6:.1f}" for n, (b, _, _) in rs.items()) + "\n")
    print("| rows | " + " | ".join(rs) + " |\n|---:|" + "---:|" * len(rs))
    compile_s: dict[str, float] = {}
    for r in rows:
        x = torch.randn(r, w.shape[1])
        ref = x.double() @ w.double().T
        run = [n for n, (_, _, at) in rs.items() if at is None or r in at]
        for n in run:  # warm-up, which compiles: timed, and the result checked
            t0 = time.perf_counter()
            y = rs[n][1](x).double()
            if n.startswith(("q8-fused", "q8-inductor")):
                compile_s[f"{n} rows {r}"] = time.perf_counter() - t0
            err = ((y - ref).abs().max() / ref.abs().max()).item()
            if n.startswith("q8") and err > (1e-4 if n == "q8-avx2" else 1e-5):
                raise AssertionError(f"{n} at {r} rows: relative error {err:.1e}")
        times: dict[str, list[float]] = {n: [] for n in run}
        for _ in range(repeats):
            for n in run:
                t0 = time.perf_counter()
                rs[n][1](x)
                times[n].append(time.perf_counter() - t0)
        ms = {n: statistics.median(t) * 1e3 for n, t in times.items()}
        print(f"| {r} | " + " | ".join(
            f"{ms[n]:.2f} ({rs[n][0] / ms[n] / 1e6:.0f})" if n in ms else "-" for n in rs)
            + " |", flush=True)
    print("\nms a call (GB/s of weight read); first calls, s: " + ", ".join(
        f"{k} {v:.1f}" for k, v in compile_s.items()))


def first_calls() -> None:
    """In a fresh process: q8_0_matmul's first call at each fused row count, in seconds."""
    codes = torch.randint(-127, 128, (49152, 576), dtype=torch.int8)
    scale = torch.rand(49152, 576 // BLOCK)
    out = []
    for r in (1, 2, 4, 8, 16):
        t0 = time.perf_counter()
        q8_0_matmul(torch.randn(r, 576), codes, scale)
        out.append(time.perf_counter() - t0)
    print(" ".join(f"{s:.2f}" for s in out))


def cache_check(threads: int) -> None:
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=tempfile.mkdtemp(prefix="q8-inductor-"))
    cmd = [sys.executable, __file__, "--first-calls", "--threads", str(threads)]
    print(f"\nq8_0_matmul first calls (rows 1, 2, 4, 8, 16), s, fresh processes sharing "
          f"{env['TORCHINDUCTOR_CACHE_DIR']}:")
    for label in ("cold cache", "warm cache"):
        t0 = time.perf_counter()
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
        print(f"  {label}: {out.strip().splitlines()[-1]} (process {time.perf_counter() - t0:.1f} s)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, nargs="+", default=ROWS)
    p.add_argument("--threads", type=int, nargs="+", default=[2])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--routes", nargs="+", choices=ROUTES, default=list(ROUTES))
    p.add_argument("--cache-check", action="store_true")
    p.add_argument("--first-calls", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if "q8-avx2" in args.routes and not avx2_kernels.load():
        p.error("q8-avx2: the kernel did not build here (see the warning)")
    if args.first_calls:
        torch.set_num_threads(args.threads[0])
        first_calls()
        return
    torch.manual_seed(0)
    print(machine())
    codes, scale = head_codes()
    for threads in args.threads:
        table(threads, args.rows, args.repeats, args.routes, codes, scale)
    if args.cache_check:
        cache_check(args.threads[0])


if __name__ == "__main__":
    main()
