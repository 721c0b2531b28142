"""What int8 activations would cost SmolLM2's accuracy: the measurement behind not serving W8A8.

Integer dot products of int8 weights and int8 activations (oneDNN's s8 GEMM through
torch._int_mm, llama.cpp's Q8_1 blocks) are the fastest CPU route for steps of many rows on
AVX2 (benchmarks/cpu_matmul.py, route w8a8). Their cost is accuracy: every projection of the
GGUF's weights is run here as the integer kernels would compute it (symmetric round-to-nearest
int8 over blocks of the given width, one scale a block, for the weights' rows and/or the
activations' rows; products then exact, as integer sums are), teacher-forced against the float32
path on the same weights, like benchmarks/quant_accuracy.py. `-` is no rounding; 576 (or the
whole row, for the 1,536-wide down projection) is one scale a row; 32 is llama.cpp's block.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/int8_activations.py [--windows 4]
"""
from __future__ import annotations

import argparse
import math
import time

import torch
from cpu_matmul import machine
from kv_accuracy import Scorer, corpus_ids

from tandem import LLM
from tandem.layers.linear import LinearBase

# (weight block, activation block); 0: not rounded, ROW: one scale a row
ROW = -1
SCHEMES = [(ROW, 0), (32, 0), (0, ROW), (0, 64), (0, 32), (ROW, ROW), (32, 32)]


def rounded(t: torch.Tensor, block: int) -> torch.Tensor:
    """t [M, K] with each block of `block` columns of a row rounded to int8 and back."""
    if block == 0:
        return t
    m, k = t.shape
    g = t.reshape(m, -1, k if block == ROW else block)
    step = g.abs().amax(-1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny) / 127
    return ((g / step).round().clamp(-127, 127) * step).reshape(m, k)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--windows", type=int, default=4)
    p.add_argument("--window-len", type=int, default=1024)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    start = time.time()
    common = {"model": "smollm2", "dtype": "float32", "enable_prefix_caching": False,
              "kv_cache_memory": "256MiB", "enforce_eager": True,
              "max_num_batched_tokens": max(2048, args.window_len + 1)}
    llm = LLM(**common, quantization="none")  # the GGUF's weights dequantized to float32
    scorer = Scorer(llm)
    ids = corpus_ids(llm.tokenizer, args.windows * args.window_len)
    windows = [ids[i * args.window_len:(i + 1) * args.window_len] for i in range(args.windows)]
    refs = [scorer.logprobs(w)[:-1] for w in windows]  # before project() is replaced below
    weights: dict[tuple[int, int], torch.Tensor] = {}

    def score(wb: int, ab: int) -> tuple[float, float]:
        def project(self: LinearBase, x: torch.Tensor) -> torch.Tensor:
            key = (id(self), wb)
            if key not in weights:
                weights[key] = rounded(self.weight.float(), wb)
            return rounded(x.float(), ab) @ weights[key].T

        LinearBase.project = project
        nll_ref = nll = agree = count = 0.0
        for w, r in zip(windows, refs):
            lp, target = scorer.logprobs(w)[:-1], torch.tensor(w[1:])[:, None]
            nll_ref -= r.gather(1, target).sum().item()
            nll -= lp.gather(1, target).sum().item()
            agree += (r.argmax(-1) == lp.argmax(-1)).sum().item()
            count += len(target)
        return math.exp((nll - nll_ref) / count) - 1, agree / count

    rows = [(wb, ab, *score(wb, ab)) for wb, ab in SCHEMES]
    print(f"{machine()}; {args.windows} x {args.window_len} tokens; {time.time() - start:.0f} s\n")
    name = {0: "-", ROW: "row", 32: "32", 64: "64"}
    print("| weight int8 block | activation int8 block | perplexity vs float32 | top-1 agreement |")
    print("|---|---|---:|---:|")
    for wb, ab, ppl, top1 in rows:
        print(f"| {name[wb]} | {name[ab]} | {100 * ppl:+.2f}% | {100 * top1:.2f}% |")
    print("\nissue 14's bound: perplexity within +0.5%, top-1 agreement >= 98%")


if __name__ == "__main__":
    main()
