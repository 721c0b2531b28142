"""Tandem on an NVIDIA GPU, in one go (under 5 minutes on an H100): correctness, then speed.

1. float32 greedy tokens for 8 prompts of 1-200 tokens in one batch equal HF transformers'
   per-prompt `generate` (also with preemption and with every prefill chunked);
2. bfloat16 prefill logits close to HF's at every position of 4 prompts: Tandem's distance
   from the float32 logits is at most twice HF bfloat16's own (plus 0.05), and it picks
   float32's top-1 token about as often as HF bfloat16 does (within 5 points);
3. decode throughput at batch 1, 32 and 256 (128-token prompts, bfloat16) for Tandem and HF;
4. the bandwidth roofline: weight bytes per decode step over the measured copy bandwidth.

Without --model it writes a randomly initialised model of SmolLM2-135M's shape (the real
weights do not fit the GPU machine's transfer limit; speed does not depend on their values).

    python benchmarks/gpu_check.py --tokenizer-from DIR [--model DIR] [--device cuda]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time

import torch
import transformers
from cuda_check import check_greedy, free
from kv_accuracy import Scorer
from offline_throughput import hf_weight_bytes
from random_model import write_random_model

from tandem import LLM, SamplingParams


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def prompts(n: int, length: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(100, 40000, (n, length), generator=g).tolist()


def check_bf16_logits(model: str, dev: torch.device) -> tuple[bool, str]:
    """Tandem bfloat16 against HF bfloat16, both measured from HF float32 at every position
    of 4 prompts (384 next-token predictions): Tandem may be at most twice as far as HF
    (+0.05), and must pick float32's top-1 token at most 5 points less often than HF does.
    Rates over many positions, because bfloat16 flips near-ties, in HF as in Tandem."""
    ps = prompts(4, 96, seed=1)
    ref, hf16 = [], []
    for dtype, out in ((torch.float32, ref), (torch.bfloat16, hf16)):
        hf = transformers.AutoModelForCausalLM.from_pretrained(model, dtype=dtype).to(dev).eval()
        with torch.inference_mode():
            out += [hf(torch.tensor([p], device=dev)).logits[0].float().cpu() for p in ps]
        del hf
        free(dev)
    llm = LLM(model=model, dtype="bfloat16", device=str(dev), kv_cache_memory="1GiB")
    scorer = Scorer(llm)
    ours = [scorer.logits(p).cpu() for p in ps]
    del llm, scorer
    free(dev)
    ref, hf16, ours = torch.cat(ref), torch.cat(hf16), torch.cat(ours)
    d_hf, d_ours = (hf16 - ref).abs().max().item(), (ours - ref).abs().max().item()
    top1_hf = (hf16.argmax(-1) == ref.argmax(-1)).float().mean().item()
    top1_ours = (ours.argmax(-1) == ref.argmax(-1)).float().mean().item()
    ok = d_ours <= 2 * d_hf + 0.05 and top1_ours >= top1_hf - 0.05
    return ok, (f"max |logit - float32|: Tandem {d_ours:.3f}, HF {d_hf:.3f}; top-1 as "
                f"float32 over {len(ref)} positions: Tandem {100 * top1_ours:.1f}%, "
                f"HF {100 * top1_hf:.1f}%")


def tandem_decode(model: str, dev: torch.device, batch: int, prompt_len: int, new: int) -> float:
    """Decode tokens/s: the median step while all `batch` requests decode together."""
    llm = LLM(model=model, dtype="bfloat16", device=str(dev),
              max_num_seqs=max(batch, 1), enable_prefix_caching=False)
    engine, params = llm.engine, SamplingParams(temperature=0, max_tokens=new, ignore_eos=True)
    for i, ids in enumerate(prompts(batch, prompt_len, seed=2)):
        engine.add_request(str(i), ids, params)
    started, steps = set(), []
    while engine.has_unfinished_requests():
        t0 = time.perf_counter()
        outs = engine.step()
        sync(dev)
        dt = time.perf_counter() - t0
        if len(started) == batch and len(outs) == batch:
            steps.append(dt)
        started |= {o.request_id for o in outs}
    del llm, engine
    free(dev)
    return batch / statistics.median(steps)


def hf_decode(model: str, dev: torch.device, batch: int, prompt_len: int, new: int) -> float:
    """Decode tokens/s: (time for 1 + new tokens) - (time for 1 token), static batch."""
    hf = transformers.AutoModelForCausalLM.from_pretrained(model, dtype=torch.bfloat16)
    hf = hf.to(dev).eval()
    ids = torch.tensor(prompts(batch, prompt_len, seed=2), device=dev)

    def timed(n: int) -> float:
        sync(dev)
        t0 = time.perf_counter()
        with torch.inference_mode():
            hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                        max_new_tokens=n, min_new_tokens=n, pad_token_id=0)
        sync(dev)
        return time.perf_counter() - t0

    timed(2)  # warm-up
    rate = batch * new / (timed(1 + new) - timed(1))
    hf = None  # dropped before free() so the GPU memory goes back
    free(dev)
    return rate


def copy_bandwidth(dev: torch.device) -> float:
    """Bytes read + written per second by a device-to-device copy of 1 GiB (CPU: 256 MiB)."""
    n = (1 << 28) if dev.type == "cuda" else (1 << 26)
    a, b = torch.ones(n, device=dev), torch.empty(n, device=dev)
    times = []
    for _ in range(6):
        sync(dev)
        t0 = time.perf_counter()
        b.copy_(a)
        sync(dev)
        times.append(time.perf_counter() - t0)
    return 2 * a.numel() * a.element_size() / statistics.median(times[1:])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="a checkpoint folder (default: random weights)")
    p.add_argument("--tokenizer-from", default=None, help="tokenizer files for the random model")
    p.add_argument("--shape", default="smollm2", help="random model shape (random_model.SHAPES)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 32, 256])
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new", type=int, default=64, help="decode tokens per throughput run")
    p.add_argument("--greedy-tokens", type=int, default=32)
    args = p.parse_args(argv)
    dev = torch.device(args.device)
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            if not args.tokenizer_from:
                p.error("--tokenizer-from is needed without --model")
            model = write_random_model(args.shape, tmp, args.tokenizer_from)
        name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
        print(f"device: {name}; torch {torch.__version__}; transformers "
              f"{transformers.__version__}; model {args.model or 'random ' + args.shape}",
              flush=True)
        greedy_failures = check_greedy(model, "float32", args.device, new=args.greedy_tokens)
        bf16_ok, bf16_line = check_bf16_logits(model, dev)
        print(bf16_line, flush=True)
        rows = []
        for b in args.batches:
            ours = tandem_decode(model, dev, b, args.prompt_len, args.new)
            theirs = hf_decode(model, dev, b, args.prompt_len, args.new)
            rows.append((b, ours, theirs))
            print(f"batch {b}: Tandem {ours:.1f} tok/s, HF {theirs:.1f} tok/s", flush=True)
        bw, nbytes = copy_bandwidth(dev), hf_weight_bytes(model, torch.bfloat16)
    floor_ms = nbytes / bw * 1e3
    ok = not greedy_failures and bf16_ok
    print(f"\n## gpu_check on {name} ({time.perf_counter() - t_start:.0f} s)\n")
    print(f"- float32 greedy vs HF (default, preempt, chunked): "
          f"{'identical' if not greedy_failures else f'{greedy_failures} variants differ'}")
    print(f"- bfloat16 logits: {bf16_line}: {'ok' if bf16_ok else 'NOT close'}")
    print(f"- copy bandwidth {bw / 1e9:.0f} GB/s (read + write); bfloat16 weights "
          f"{nbytes / 1e6:.0f} MB: floor {floor_ms:.3f} ms per decode step\n")
    print("| batch | Tandem tok/s | HF tok/s | Tandem/HF | Tandem step ms | x floor |")
    print("|---:|---:|---:|---:|---:|---:|")
    for b, ours, theirs in rows:
        step_ms = b / ours * 1e3
        print(f"| {b} | {ours:.1f} | {theirs:.1f} | {ours / theirs:.2f}x | {step_ms:.2f} | "
              f"{step_ms / floor_ms:.1f} |")
    print("\nGPU CHECK", "PASSED" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
