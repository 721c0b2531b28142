"""Offline throughput of Tandem against HF transformers on the same weights, in one run.

(a) batched: 64 prompts of 128 tokens -> 128 greedy tokens each; output tokens/s over the
    whole call (prefill included). Tandem gets all 64 at once; HF runs two batches of 32.
(b) single stream: one 128-token prompt -> 256 tokens; decode tokens/s after the first token,
    and the time to the first token (TTFT), measured apart.

Each measurement runs --runs times, Tandem and HF alternating, after one short warm-up each;
medians and Tandem's speedups over HF are printed as a markdown table for BENCHMARKS.md. Every
measurement uses fresh 128-token windows of a fixed English text, the same for both engines,
so Tandem's prefix cache never hits on a repeated prompt.

    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 .venv/bin/python benchmarks/offline_throughput.py
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field

import torch
import transformers

from tandem import LLM, SamplingParams
from tandem.config import DTYPES
from tandem.loader.model_path import resolve_model
from tandem.loader.tokenizer import load_tokenizer

TARGETS = {"batched": 3.0, "decode": 2.0}  # Tandem/HF ratios we aim for
CHECK_TOKENS = 32  # greedy tokens that must agree between Tandem and HF


@dataclass
class Config:
    num_prompts: int = 64
    prompt_len: int = 128
    batched_new: int = 128
    hf_batch: int = 32
    single_new: int = 256
    warmup_new: int = 8  # warm-up calls run the same shapes with only this many new tokens


QUICK = Config(num_prompts=4, prompt_len=32, batched_new=16, hf_batch=2, single_new=32,
               warmup_new=4)


@dataclass
class Results:
    batched_tok_s: dict[str, list[float]] = field(default_factory=lambda: {"tandem": [], "hf": []})
    decode_tok_s: dict[str, list[float]] = field(default_factory=lambda: {"tandem": [], "hf": []})
    ttft_s: dict[str, list[float]] = field(default_factory=lambda: {"tandem": [], "hf": []})
    greedy_match: bool | None = None


def prompt_windows(tokenizer, length: int, count: int) -> list[list[int]]:
    """`count` disjoint `length`-token windows of pydoc's topic texts, always the same ones."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in sorted(topics))
    ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) < length * count:
        raise SystemExit(f"the text holds {len(ids)} tokens, need {length * count}")
    return [ids[i * length:(i + 1) * length] for i in range(count)]


class Prompts:
    """Hands out fresh windows, so no measurement reuses a prompt another one cached."""

    def __init__(self, windows: list[list[int]]):
        self.windows, self.next = windows, 0

    def take(self, n: int) -> list[list[int]]:
        out = self.windows[self.next:self.next + n]
        self.next += n
        return out


# ---- Tandem ----------------------------------------------------------------------------------

def tandem_batched(llm: LLM, prompts: list[list[int]], new: int) -> tuple[float, list[int]]:
    """Output tokens/s of one generate() call over all prompts; also the first output's ids."""
    params = SamplingParams(temperature=0, max_tokens=new, ignore_eos=True)
    t0 = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    elapsed = time.perf_counter() - t0
    total = sum(len(o.outputs[0].token_ids) for o in outs)
    assert total == new * len(prompts), f"tandem generated {total} tokens"
    return total / elapsed, list(outs[0].outputs[0].token_ids)


def tandem_single(llm: LLM, prompt: list[int], new: int) -> tuple[float, float]:
    """(TTFT seconds, decode tokens/s) from timing each engine step of one request."""
    engine = llm.engine
    engine.add_request(f"single-{time.monotonic_ns()}", prompt,
                       SamplingParams(temperature=0, max_tokens=new, ignore_eos=True))
    stamps, num_tokens = [], 0
    t0 = time.perf_counter()
    while engine.has_unfinished_requests():
        outs = engine.step()
        stamps.append(time.perf_counter())
        if outs:
            num_tokens = len(outs[0].outputs[0].token_ids)
    # The prompt fits one step's token budget, so step 1 is prefill + first token and every
    # later step decodes exactly one token.
    assert num_tokens == new and len(stamps) == new, (num_tokens, len(stamps))
    return stamps[0] - t0, (new - 1) / (stamps[-1] - stamps[0])


# ---- HF transformers -------------------------------------------------------------------------

def hf_generate(model, prompts: list[list[int]], new: int) -> torch.Tensor:
    ids = torch.tensor(prompts, device=model.device)
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                         max_new_tokens=new, min_new_tokens=new,
                         pad_token_id=model.config.pad_token_id or 0)
    assert out.shape == (len(prompts), ids.shape[1] + new), tuple(out.shape)
    if out.is_cuda:
        torch.cuda.synchronize()  # timings must include the queued kernels
    return out[:, ids.shape[1]:]


def hf_batched(model, prompts: list[list[int]], new: int, batch: int) -> tuple[float, list[int]]:
    t0 = time.perf_counter()
    outs = [hf_generate(model, prompts[i:i + batch], new) for i in range(0, len(prompts), batch)]
    elapsed = time.perf_counter() - t0
    return new * len(prompts) / elapsed, outs[0][0].tolist()


def hf_single(model, prompt: list[int], new: int) -> tuple[float, float]:
    """(TTFT seconds, decode tokens/s): time for 1 new token, then for `new`."""
    t0 = time.perf_counter()
    hf_generate(model, [prompt], 1)
    t1 = time.perf_counter() - t0
    t0 = time.perf_counter()
    hf_generate(model, [prompt], new)
    tn = time.perf_counter() - t0
    return t1, (new - 1) / (tn - t1)


# ---- report ----------------------------------------------------------------------------------

def machine() -> dict[str, str]:
    model_name, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    model_name = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
    except OSError:
        pass
    wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile")
    return {"cpu": model_name, "cores": str(os.cpu_count()),
            "flags": " ".join(f for f in wanted if f in flags) or "none of avx2/avx512/amx",
            "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "threads": str(torch.get_num_threads()),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "none"}


def hf_weight_bytes(folder: str, dtype: torch.dtype) -> int:
    """All parameters at `dtype`; parameters() counts the tied embedding / LM head once."""
    config = transformers.AutoConfig.from_pretrained(folder)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters()) * dtype.itemsize


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def paired_ratio(values: dict[str, list[float]], invert: bool = False) -> float:
    """Median of the per-run Tandem/HF ratios: each run pairs two back-to-back measurements,
    so a slow spell on this shared machine hits both sides of a ratio alike."""
    pairs = zip(values["tandem"], values["hf"])
    return median([h / t if invert else t / h for t, h in pairs])


def table(res: Results, cfg: Config, args: argparse.Namespace, info: dict[str, str]) -> str:
    def row(name: str, values: dict[str, list[float]], fmt: str, target: float | None,
            scale: float = 1.0) -> str:
        t, h = median(values["tandem"]), median(values["hf"])
        ratio = paired_ratio(values, invert=target is None)
        goal = "" if target is None else f">= {target:g}x " + ("(met)" if ratio >= target
                                                               else "(not met)")
        return (f"| {name} | {t * scale:{fmt}} | {h * scale:{fmt}} | {ratio:.2f}x | {goal} |")

    match = {None: "not checked", True: "yes", False: "NO"}[res.greedy_match]
    lines = [
        (f"Machine: {info['cores']} cores, {info['cpu']} ({info['flags']}); "
         f"torch {info['torch']} ({info['threads']} threads), transformers "
         f"{info['transformers']}, Python {info['python']}"),
        (f"Model `{args.model}`, dtype {args.dtype}; medians of {args.runs} runs, Tandem and HF "
         f"alternating; speedup = Tandem/HF for rates, HF/Tandem for TTFT, the median of the "
         f"per-run ratios"
         f"{'; QUICK config' if args.quick else ''}. "
         f"Greedy output of prompt 0 agrees on the first {min(CHECK_TOKENS, cfg.batched_new)} "
         f"tokens: {match}."),
        "",
        "| measurement | Tandem | HF transformers | Tandem speedup | target |",
        "|---|---:|---:|---:|---|",
        row(f"(a) batched: {cfg.num_prompts} prompts x {cfg.prompt_len} -> {cfg.batched_new} "
            f"tokens, output tok/s (HF batch {cfg.hf_batch})", res.batched_tok_s, ".1f",
            TARGETS["batched"]),
        row(f"(b) single stream: {cfg.prompt_len} -> {cfg.single_new} tokens, decode tok/s",
            res.decode_tok_s, ".1f", TARGETS["decode"]),
        row(f"(b) time to first token, {cfg.prompt_len}-token prompt, ms", res.ttft_s,
            ".0f", None, 1000.0),
    ]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2",
                   help="HF checkpoint folder, a .gguf file, or the alias 'smollm2'")
    p.add_argument("--dtype", default="float32", choices=[d for d in DTYPES if d != "auto"])
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto, for both engines")
    p.add_argument("--runs", type=int, default=None,
                   help="timed runs of each measurement (default 3, or 1 with --quick)")
    p.add_argument("--quick", action="store_true", help="a tiny config to smoke-test the script")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads for both engines (default: torch's own default); on a "
                   "machine other jobs share, 1 avoids OpenMP threads stalling each other")
    p.add_argument("--json", metavar="PATH", help="also write the raw results here")
    args = p.parse_args()
    if args.runs is None:
        args.runs = 1 if args.quick else 3
    if args.runs < 1:
        p.error("--runs must be at least 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = QUICK if args.quick else Config()
    transformers.logging.set_verbosity_error()
    info = machine()
    print(f"torch threads: {torch.get_num_threads()}", file=sys.stderr)

    t0 = time.perf_counter()
    folder = resolve_model(args.model)
    # Fresh windows for each warm-up and timed run; (a) takes num_prompts, (b) one.
    per_round = cfg.num_prompts + 1
    prompts = Prompts(prompt_windows(load_tokenizer(folder), cfg.prompt_len,
                                     per_round * (args.runs + 1)))
    llm = LLM(model=args.model, dtype=args.dtype, device=args.device, kv_cache_memory="2GiB",
              max_num_seqs=cfg.num_prompts)
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=DTYPES[args.dtype])
    hf.to(llm.engine.runner.device)
    hf.eval()
    print(f"loaded both engines in {time.perf_counter() - t0:.1f}s", file=sys.stderr)

    res = Results()
    with torch.inference_mode():
        for run in range(-1, args.runs):  # run -1 is the warm-up
            warm = run < 0
            batch, single = prompts.take(cfg.num_prompts), prompts.take(1)[0]
            new_a = cfg.warmup_new if warm else cfg.batched_new
            new_b = cfg.warmup_new if warm else cfg.single_new
            label = "warm-up" if warm else f"run {run + 1}/{args.runs}"

            t_rate, t_first = tandem_batched(llm, batch, new_a)
            h_rate, h_first = hf_batched(hf, batch, new_a, cfg.hf_batch)
            t_ttft, t_dec = tandem_single(llm, single, new_b)
            h_ttft, h_dec = hf_single(hf, single, new_b)
            print(f"{label}: (a) tandem {t_rate:.1f} / hf {h_rate:.1f} tok/s; (b) decode "
                  f"tandem {t_dec:.1f} / hf {h_dec:.1f} tok/s, TTFT tandem "
                  f"{t_ttft * 1e3:.0f} / hf {h_ttft * 1e3:.0f} ms", file=sys.stderr, flush=True)
            if warm:
                continue
            res.batched_tok_s["tandem"].append(t_rate)
            res.batched_tok_s["hf"].append(h_rate)
            res.decode_tok_s["tandem"].append(t_dec)
            res.decode_tok_s["hf"].append(h_dec)
            res.ttft_s["tandem"].append(t_ttft)
            res.ttft_s["hf"].append(h_ttft)
            if res.greedy_match is None:
                n = min(CHECK_TOKENS, new_a)
                res.greedy_match = t_first[:n] == h_first[:n]
                if not res.greedy_match:
                    print(f"WARNING: greedy outputs differ on the first {n} tokens of prompt 0:"
                          f"\n  tandem {t_first[:n]}\n  hf     {h_first[:n]}", file=sys.stderr)

    print(table(res, cfg, args, info))
    if args.json:
        summary = {k: {"tandem": median(v["tandem"]), "hf": median(v["hf"]),
                       "tandem_over_hf": paired_ratio(v)}
                   for k, v in (("batched_tok_s", res.batched_tok_s),
                                ("decode_tok_s", res.decode_tok_s), ("ttft_s", res.ttft_s))}
        with open(args.json, "w") as f:
            json.dump({"machine": info, "model": args.model, "dtype": args.dtype,
                       "runs": args.runs, "quick": args.quick, "config": asdict(cfg),
                       "targets": TARGETS, "median": summary, "raw": asdict(res)}, f, indent=2)


if __name__ == "__main__":
    main()
