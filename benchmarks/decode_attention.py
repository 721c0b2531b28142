"""Decode attention on the CPU, one layer: SDPA against the two batched matmuls TorchAttention
uses from BMM_MIN_DECODES decodes, on SmolLM2's shapes (3 KV heads, groups of 3, head dim 64)
with already gathered K/V. Median microseconds a call; the routes' largest difference too.

    .venv/bin/python benchmarks/decode_attention.py
    .venv/bin/python benchmarks/decode_attention.py --decodes 1 4 8 16 64 --context 256
"""
from __future__ import annotations

import argparse
import functools
import statistics
import time

import torch
import torch.nn.functional as F

from tandem.attention.torch_ref import BMM_MIN_DECODES, _attend_bmm
from tandem.engine.model_runner import additive

from offline_throughput import machine  # isort: skip


def us(fn, repeats: int) -> float:
    for _ in range(10):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--decodes", type=int, nargs="+", default=[1, 4, 8, 16, 64])
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=200)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    m = machine()
    print(f"{m['cpu']} ({m['cores']} cores; {m['flags']}), torch {m['torch']}; {args.threads} threads; context {args.context} (ragged, padded); "
          f"TorchAttention switches at {BMM_MIN_DECODES} decodes\n")
    print("| dtype | decodes | SDPA (us) | batched matmuls (us) | max abs difference |")
    print("|---|---:|---:|---:|---:|")
    for dtype in (torch.bfloat16, torch.float32):
        for n in args.decodes:
            q = torch.randn(3, n, 3, 64, generator=g).to(dtype)
            k = torch.randn(3, n, args.context, 64, generator=g).to(dtype)
            v = torch.randn(3, n, args.context, 64, generator=g).to(dtype)
            lens = torch.randint(args.context // 2, args.context + 1, (n,), generator=g)
            mask = additive(torch.arange(args.context)[None, :] < lens[:, None], dtype)
            mask = mask[None, :, None, :]
            sdpa = functools.partial(F.scaled_dot_product_attention, q, k, v, attn_mask=mask)
            bmm = functools.partial(_attend_bmm, q, k, v, attn_mask=mask)
            diff = (sdpa().float() - bmm().float()).abs().max().item()
            print(f"| {str(dtype).removeprefix('torch.')} | {n} | {us(sdpa, args.repeats):.0f} | "
                  f"{us(bmm, args.repeats):.0f} | {diff:.2g} |", flush=True)


if __name__ == "__main__":
    main()
