"""The matmul routes of tandem/layers/linear.py on this CPU, over SmolLM2-135M's projections.

Thirty layers of qkv, o, gate_up and down weights (425 MB in float32, far over any cache, as in
a real decode step) are multiplied by R rows, three ways: `F.linear(x, W)` (x @ W.T), the
skinny route `torch.mm(W, x.T).T` (made contiguous, as the engine does), and `F.linear` on a
float16 copy. Medians of --repeats passes; ms for all 120 matmuls, and the weight bytes read
per second.

    .venv/bin/python benchmarks/cpu_matmul.py [--rows 1 2 4 16 64 256 512] [--threads 2]
"""
from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]  # qkv, o, gate_up, down
LAYERS = 30


def skinny(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return torch.mm(w, x.t()).t().contiguous()


def time_pass(weights: list[torch.Tensor], x: dict[int, torch.Tensor],
              fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], repeats: int) -> float:
    def one() -> None:
        for w in weights:
            fn(x[w.shape[1]], w)

    one()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        one()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 16, 64, 256, 512])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    w32 = [torch.randn(*s, generator=g) for _ in range(LAYERS) for s in SHAPES]
    w16 = [w.half() for w in w32]
    nbytes = sum(w.numel() for w in w32) * 4
    print(f"{LAYERS} layers x {len(SHAPES)} projections, {nbytes / 1e6:.0f} MB float32, "
          f"{args.threads} threads\n")
    print("| rows | F.linear float32 ms | W @ x.T float32 ms | speedup | F.linear float16 copy ms |")
    print("|---:|---:|---:|---:|---:|")
    for r in args.rows:
        x32 = {k: torch.randn(r, k, generator=g) for k in (576, 1536)}
        x16 = {k: v.half() for k, v in x32.items()}
        plain = time_pass(w32, x32, lambda x, w: F.linear(x, w), args.repeats)
        mm = time_pass(w32, x32, skinny, args.repeats)
        half = time_pass(w16, x16, lambda x, w: F.linear(x, w), args.repeats)
        print(f"| {r} | {plain * 1e3:.1f} | {mm * 1e3:.1f} | {plain / mm:.2f}x | "
              f"{half * 1e3:.1f} |", flush=True)


if __name__ == "__main__":
    main()
