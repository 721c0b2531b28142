"""Accuracy of 4-bit weights served as stored against the float32 path on the same weights.

SmolLM2's GGUF is Q4_1; `quantization="none"` serves it dequantized to float32, which is the
exact reference for `quantization="gguf"` (same weights; the 4-bit kernel differs only by its
bfloat16 activations, scales and outputs). Over --windows windows of --window-len tokens of
Python's own documentation (no download), one prefill per window: perplexity of each, the
4-bit path's change, mean KL(float32 || 4-bit) and teacher-forced top-1 agreement.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/quant_accuracy.py [--windows 16 --window-len 1024]

--lm-head instead compares routes for the (tied, Q8_0 in the file) LM head alone: the 4-bit
model's final hidden states at every position of 4 windows of 1024 tokens, through each route,
against the float32 head.
"""
from __future__ import annotations

import argparse
import math
import sys
import time

import torch
from cpu_matmul import machine
from kv_accuracy import Scorer, corpus_ids

from tandem import LLM
from tandem.loader.model_path import resolve_model
from tandem.quantization.int4 import int4_matmul, pack_int4, quantize_int4
from tandem.quantization.q8_0 import dequantize_q8_0, q8_0_matmul


def evaluate(model: str, windows: int, window_len: int, quantization: str = "gguf",
             group_size: int = 32) -> dict:
    if quantization != "gguf":  # they quantize an HF folder: the GGUF's float32 conversion
        model = resolve_model(model)
    common = {"model": model, "dtype": "float32", "enable_prefix_caching": False,
              "kv_cache_memory": "256MiB", "max_num_batched_tokens": max(2048, window_len + 1)}
    extra = {"quantization_group_size": group_size} if quantization == "int4" else {}
    dense = LLM(**common, quantization="none")
    q4 = LLM(**common, quantization=quantization, **extra)
    scorers = Scorer(dense), Scorer(q4)
    ids = corpus_ids(dense.tokenizer, windows * window_len)
    nll, kl, agree, count = [0.0, 0.0], 0.0, 0, 0
    for i in range(windows):
        window = ids[i * window_len:(i + 1) * window_len]
        target = torch.tensor(window[1:])[:, None]
        ref, ours = (s.logprobs(window)[:-1] for s in scorers)
        for j, lp in enumerate((ref, ours)):
            nll[j] -= lp.gather(1, target).sum().item()
        kl += (ref.exp() * (ref - ours)).sum().item()
        agree += (ref.argmax(-1) == ours.argmax(-1)).sum().item()
        count += len(target)
    ppl = [math.exp(n / count) for n in nll]
    return {"positions": count, "perplexity_float32": ppl[0], "perplexity_4bit": ppl[1],
            "ppl_increase": ppl[1] / ppl[0] - 1, "mean_kl": kl / count,
            "top1_agreement": agree / count,
            "weight_bytes": {"float32": dense.engine.runner.weight_bytes,
                             "4bit": q4.engine.runner.weight_bytes}}


def lm_head_routes(model: str, windows: int,
                   window_len: int) -> dict[str, tuple[float, float, float]]:
    """Route -> (top-1 agreement, mean KL, perplexity change) against the float32 LM head."""
    llm = LLM(model=model, dtype="float32", quantization="gguf", enable_prefix_caching=False,
              kv_cache_memory="256MiB", max_num_batched_tokens=max(2048, window_len + 1))
    scorer = Scorer(llm)
    ids = corpus_ids(llm.tokenizer, windows * window_len)
    hidden = []
    for i in range(windows):
        scorer.logits(ids[i * window_len:(i + 1) * window_len])
        hidden.append(torch.cat(scorer.hidden)[:window_len])
    from q8_head import head_codes  # the GGUF's own Q8_0 blocks: SmolLM2 only

    # The float32 head is these blocks dequantized (tests/quantization/test_q8_0.py).
    codes, q8_scale = head_codes()
    h, w = torch.cat(hidden), dequantize_q8_0(codes, q8_scale)
    scale = w.abs().amax(1) / 127
    w8 = (w / scale[:, None]).round().clamp(-127, 127).to(torch.int8)
    routes = {
        "Q8_0 as stored, 8 rows a call (fused kernel)": lambda: torch.cat(
            [q8_0_matmul(r, codes, q8_scale) for r in h.split(8)]),
        "Q8_0 as stored, all rows at once (chunked)": lambda: q8_0_matmul(h, codes, q8_scale),
        "float16 copy": lambda: h.half() @ w.half().T,
        "bfloat16 copy": lambda: h.bfloat16() @ w.bfloat16().T,
        "int8 per channel (bfloat16 activations)": lambda: torch.ops.aten._weight_int8pack_mm(
            h.bfloat16(), w8, scale.bfloat16()),
        **{f"int4 group {g}, round-to-nearest": (lambda g=g: int4_matmul(
            h, *pack_int4(*quantize_int4(w, g), g), g)) for g in (32, 64)},
    }
    ref = torch.log_softmax(h @ w.T, dim=-1)
    # Each position's next token, but for the last of a window.
    nxt = torch.tensor([ids[i + 1] if (i + 1) % window_len else -1 for i in range(len(h))])
    scored = nxt >= 0
    nll = -ref[scored].gather(1, nxt[scored, None]).mean().item()
    out = {}
    for name, route in routes.items():
        lp = torch.log_softmax(route().float(), dim=-1)
        out[name] = ((lp.argmax(-1) == ref.argmax(-1)).float().mean().item(),
                     (ref.exp() * (ref - lp)).sum(-1).mean().item(),
                     math.exp(-lp[scored].gather(1, nxt[scored, None]).mean().item() - nll) - 1)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--windows", type=int, default=16)
    p.add_argument("--window-len", type=int, default=1024)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--lm-head", action="store_true", help="compare LM head routes instead")
    p.add_argument("--quantization", default="gguf", choices=("gguf", "int4", "int8"),
                   help="int4/int8: quantize the float32 folder while loading (--model must be "
                        "an HF folder, e.g. the converted SmolLM2 one)")
    p.add_argument("--group-size", type=int, default=32, help="of int4")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    start = time.time()
    if args.lm_head:
        rows = lm_head_routes(args.model, 4, 1024)
        print(f"{machine()}; 4096 positions; {time.time() - start:.0f} s\n")
        print("| LM head route | top-1 agreement | mean KL | perplexity vs float32 |\n"
              "|---|---:|---:|---:|")
        for name, (top1, kl, ppl) in rows.items():
            print(f"| {name} | {100 * top1:.2f}% | {kl:.5f} | {100 * ppl:+.3f}% |")
        return 0
    r = evaluate(args.model, args.windows, args.window_len, args.quantization, args.group_size)
    print(f"{machine()}; {r['positions']} positions; {time.time() - start:.0f} s\n")
    print("| path | weight MB | perplexity | vs float32 | mean KL | top-1 agreement |")
    print("|---|---:|---:|---:|---:|---:|")
    print(f"| float32 (dequantized) | {r['weight_bytes']['float32'] / 1e6:.0f} | "
          f"{r['perplexity_float32']:.4f} | | | |")
    name = {"gguf": "4-bit as stored", "int4": f"int4 group {args.group_size}",
            "int8": "int8 per channel"}[args.quantization]
    print(f"| {name} | {r['weight_bytes']['4bit'] / 1e6:.0f} | "
          f"{r['perplexity_4bit']:.4f} | {100 * r['ppl_increase']:+.2f}% | {r['mean_kl']:.5f} | "
          f"{100 * r['top1_agreement']:.2f}% |")
    ok = r["ppl_increase"] <= 0.005 and r["top1_agreement"] >= 0.98
    print(f"\ntargets (perplexity within +0.5%, top-1 >= 98%): {'met' if ok else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
