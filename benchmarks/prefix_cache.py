"""Prefix caching on vs off, on SGLang's "generated-shared-prefix" workload, in one run.

G groups x P prompts: each group's P prompts share a system prompt of S tokens, then each adds
its own question of Q tokens; every request generates O greedy tokens (ignore_eos). Token ids
are drawn at random (seeded) from [100, vocab_size), with no tokenizer, so the shared prefix is
exactly S tokens. The same shuffled requests go to a fresh AsyncEngine with prefix caching on
and one with it off, all at once (or as Poisson arrivals with --request-rate). Per run: TTFT and
end-to-end latency per request, wall time, output and total token throughput, the engine's
prefix-cache hit rate against the workload's theoretical one, and whether both engines
generated the same tokens. --runs N repeats both (order alternating) and reports medians.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/prefix_cache.py
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/prefix_cache.py --quick --threads 1
"""
from __future__ import annotations

import argparse
import asyncio
import gc
import json
import math
import random
import shlex
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
from transformers import AutoConfig

from tandem.config import DTYPES, EngineConfig
from tandem.engine.async_engine import AsyncEngine
from tandem.engine.kv_cache import cdiv
from tandem.engine.sampling_params import SamplingParams
from tandem.loader.model_path import resolve_model

# The script's own folder is on sys.path when it runs as a file.
from offline_throughput import machine, median  # isort: skip

HIT_RATE_TARGET = 0.95  # measured / theoretical
MIN_TOKEN_ID = 100  # below this sit special and byte tokens


@dataclass
class Workload:
    groups: int = 8
    prompts_per_group: int = 16
    system_len: int = 512
    question_len: int = 64
    output_len: int = 32


QUICK = Workload(groups=2, prompts_per_group=4, system_len=64, question_len=16, output_len=4)


@dataclass
class Request:
    request_id: str
    group: int
    prompt: list[int]
    arrival_s: float  # offset from the start of the run


def make_requests(w: Workload, vocab_size: int, seed: int, rate: float) -> list[Request]:
    rng = random.Random(seed)

    def ids(n: int) -> list[int]:
        return [rng.randrange(MIN_TOKEN_ID, vocab_size) for _ in range(n)]

    prompts = []
    for g in range(w.groups):
        system = ids(w.system_len)
        prompts += [(g, system + ids(w.question_len)) for _ in range(w.prompts_per_group)]
    # Shuffled, so a group's requests do not reach the scheduler back to back.
    rng.shuffle(prompts)
    arrival, out = 0.0, []
    for i, (g, prompt) in enumerate(prompts):
        out.append(Request(f"g{g}-r{i}", g, prompt, arrival))
        if math.isfinite(rate):
            arrival += rng.expovariate(rate)
    return out


def theoretical_hits(w: Workload, block_size: int) -> tuple[int, int]:
    """(hit tokens, queried tokens) if each request is looked up once, at admission, with its
    prompt alone (the scheduler's counting when nothing is preempted): a group's first request
    misses, every other one reuses the system prompt's full blocks but never the last token."""
    prompt_len = w.system_len + w.question_len
    reusable = min(w.system_len // block_size, (prompt_len - 1) // block_size) * block_size
    return (w.groups * (w.prompts_per_group - 1) * reusable,
            w.groups * w.prompts_per_group * prompt_len)


def kv_bytes_per_token(folder: str, dtype: torch.dtype) -> int:
    cfg = AutoConfig.from_pretrained(folder)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    return 2 * cfg.num_hidden_layers * kv_heads * head_dim * dtype.itemsize


def kv_needs(w: Workload, block_size: int) -> dict[str, int]:
    """Tokens of KV the whole workload holds at once, in whole blocks, with and without sharing."""
    seq_blocks = cdiv(w.system_len + w.question_len + w.output_len, block_size)
    shared = w.system_len // block_size
    n = w.groups * w.prompts_per_group
    return {"on": (w.groups * shared + n * (seq_blocks - shared)) * block_size,
            "off": n * seq_blocks * block_size}


async def one_request(engine: AsyncEngine, req: Request, params: SamplingParams,
                      t0: float) -> tuple[float, float, list[int]]:
    """(TTFT s, e2e s, output ids), both times from this request's submission."""
    delay = t0 + req.arrival_s - time.perf_counter()
    if delay > 0:
        await asyncio.sleep(delay)
    start = time.perf_counter()
    ttft, ids = math.nan, []
    async for out in engine.generate(req.prompt, params, req.request_id):
        ids = out.outputs[0].token_ids
        if math.isnan(ttft) and ids:
            ttft = time.perf_counter() - start
    return ttft, time.perf_counter() - start, list(ids)


async def warm_up(engine: AsyncEngine, prompt: list[int]) -> None:
    await one_request(engine, Request("warmup", -1, prompt, 0.0),
                      SamplingParams(temperature=0, max_tokens=2, ignore_eos=True),
                      time.perf_counter())


async def drive(engine: AsyncEngine, reqs: list[Request],
                w: Workload) -> tuple[float, list[tuple[float, float, list[int]]]]:
    params = SamplingParams(temperature=0, max_tokens=w.output_len, ignore_eos=True)
    t0 = time.perf_counter()
    results = await asyncio.gather(*(one_request(engine, r, params, t0) for r in reqs))
    return time.perf_counter() - t0, results


def run_once(args: argparse.Namespace, w: Workload, reqs: list[Request], warmup: list[int],
             caching: bool) -> tuple[dict, dict[str, list[int]]]:
    engine = AsyncEngine(EngineConfig(
        model=args.model, dtype=args.dtype, device=args.device,
        kv_cache_memory=args.kv_cache_memory, enable_prefix_caching=caching,
        max_num_batched_tokens=args.max_num_batched_tokens))
    try:
        sched, kv = engine.engine.scheduler, engine.engine.kv
        capacity = kv.num_blocks * kv.block_size
        need = kv_needs(w, kv.block_size)["on" if caching else "off"]
        if capacity < need:
            print(f"WARNING: the KV cache holds {capacity} tokens, this run needs {need}: "
                  f"expect queueing, preemption{' and a lower hit rate' if caching else ''}; "
                  f"raise --kv-cache-memory", file=sys.stderr)
        # So the timed run does not pay for first-call setup; its prompt shares no block with
        # the workload's, and the counters are read as differences.
        asyncio.run(warm_up(engine, warmup))
        queries0, hits0, preempt0 = (sched.prefix_cache_queries, sched.prefix_cache_hits,
                                     sched.num_preemptions)
        wall, results = asyncio.run(drive(engine, reqs, w))
        queries = sched.prefix_cache_queries - queries0
        hits = sched.prefix_cache_hits - hits0
        th_hits, th_queries = theoretical_hits(w, kv.block_size)
        prompt_tokens = sum(len(r.prompt) for r in reqs)
        ttft = [r[0] for r in results]
        e2e = [r[1] for r in results]
        generated = sum(len(r[2]) for r in results)
        metrics = {
            "hit_rate": hits / queries,
            "theoretical_hit_rate": th_hits / th_queries if caching else 0.0,
            "hit_tokens": hits, "queried_tokens": queries, "prompt_tokens": prompt_tokens,
            "preemptions": sched.num_preemptions - preempt0, "block_size": kv.block_size,
            "kv_capacity_tokens": capacity, "kv_needed_tokens": need,
            "ttft_p50_ms": 1e3 * pct(ttft, 50), "ttft_p99_ms": 1e3 * pct(ttft, 99),
            "e2e_p50_ms": 1e3 * pct(e2e, 50), "e2e_p99_ms": 1e3 * pct(e2e, 99),
            "wall_s": wall, "output_tok_s": generated / wall,
            "total_tok_s": (prompt_tokens + generated) / wall,
            "generated_tokens": generated, "ttft_s": ttft, "e2e_s": e2e,
        }
        th = metrics["theoretical_hit_rate"]
        metrics["hit_ratio"] = metrics["hit_rate"] / th if th else math.nan
        outputs = {r.request_id: res[2] for r, res in zip(reqs, results)}
        return metrics, outputs
    finally:
        engine.shutdown()
        del engine
        gc.collect()  # the next engine allocates its own KV cache
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(xs, q)) if xs else math.nan


def finite(x: object) -> object:
    """x with NaN and infinities as None, so the JSON file is standard JSON."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: finite(v) for k, v in x.items()}
    if isinstance(x, list):
        return [finite(v) for v in x]
    return x


def paired_ratio(num: list[float], den: list[float]) -> float:
    """Median of per-run ratios: on and off of one run ran back to back on this noisy machine."""
    return median([a / b for a, b in zip(num, den)])


# (key, label, format, speedup as off/on for times or on/off for rates)
ROWS = [("ttft_p50_ms", "TTFT p50, ms", ".0f", "off/on"),
        ("ttft_p99_ms", "TTFT p99, ms", ".0f", "off/on"),
        ("e2e_p50_ms", "end-to-end p50, ms", ".0f", "off/on"),
        ("wall_s", "wall, s", ".2f", "off/on"),
        ("output_tok_s", "output tok/s", ".1f", "on/off"),
        ("total_tok_s", "total (prompt + output) tok/s", ".1f", "on/off"),
        ("preemptions", "preemptions", ".0f", None)]


def summarize(runs: dict[str, list[dict]]) -> tuple[dict, dict]:
    keys = ["hit_rate", "theoretical_hit_rate", "hit_ratio"] + [k for k, *_ in ROWS]
    med = {c: {k: median([m[k] for m in runs[c]]) for k in keys} for c in runs}
    speedup = {}
    for key, _, _, kind in ROWS:
        if kind:
            on, off = [m[key] for m in runs["on"]], [m[key] for m in runs["off"]]
            speedup[key] = paired_ratio(off, on) if kind == "off/on" else paired_ratio(on, off)
    return med, speedup


def table(med: dict, speedup: dict, runs: dict[str, list[dict]], mismatches: int,
          args: argparse.Namespace, w: Workload, info: dict[str, str]) -> str:
    on, off = med["on"], med["off"]
    m0 = runs["on"][0]
    ratio = on["hit_ratio"]
    goal = "met" if ratio >= HIT_RATE_TARGET else "NOT met"
    verdict = f"{ratio:.3f} (>= {HIT_RATE_TARGET} {goal})" if math.isfinite(ratio) else "-"
    lines = [
        (f"Machine: {info['cores']} cores, {info['cpu']} ({info['flags']}); GPU {info['gpu']}; "
         f"torch {info['torch']} ({info['threads']} threads), Python {info['python']}"),
        (f"Model `{args.model}`, dtype {args.dtype}, device {args.device}; {w.groups} groups x "
         f"{w.prompts_per_group} prompts, system {w.system_len} + question {w.question_len} "
         f"tokens -> {w.output_len} output tokens; request rate {args.request_rate:g}/s; "
         f"block size {m0['block_size']}, KV cache {m0['kv_capacity_tokens']} tokens (needs "
         f"{runs['on'][0]['kv_needed_tokens']} with caching, {runs['off'][0]['kv_needed_tokens']}"
         f" without); medians of {args.runs} run(s){'; QUICK workload' if args.quick else ''}."),
        (f"Greedy outputs, caching on vs off: {mismatches} of "
         f"{len(runs['on']) * w.groups * w.prompts_per_group} requests differ."),
        "",
        "| metric | caching on | caching off | speedup |",
        "|---|---:|---:|---:|",
        f"| prefix-cache hit rate, measured | {on['hit_rate']:.1%} | {off['hit_rate']:.1%} | |",
        (f"| hit rate, theoretical | {on['theoretical_hit_rate']:.1%} | "
         f"{off['theoretical_hit_rate']:.1%} | |"),
        f"| measured / theoretical | {verdict} | - | |",
    ]
    for key, label, fmt, kind in ROWS:
        s = f"{speedup[key]:.2f}x ({kind})" if kind else ""
        lines.append(f"| {label} | {on[key]:{fmt}} | {off[key]:{fmt}} | {s} |")
    if on["preemptions"]:
        lines.append("\nThe caching-on run preempted requests: each re-admission is queried again "
                     "(prompt + generated tokens) and can hit its own freed blocks, so its "
                     "measured hit rate is not comparable with the theoretical one.")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    d = Workload()
    p.add_argument("--model", default="smollm2",
                   help="HF checkpoint folder, a .gguf file, or the alias 'smollm2'")
    p.add_argument("--dtype", default="auto", choices=list(DTYPES))
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--groups", type=int, default=d.groups)
    p.add_argument("--prompts-per-group", type=int, default=d.prompts_per_group)
    p.add_argument("--system-len", type=int, default=d.system_len)
    p.add_argument("--question-len", type=int, default=d.question_len)
    p.add_argument("--output-len", type=int, default=d.output_len)
    p.add_argument("--request-rate", type=float, default=math.inf,
                   help="Poisson arrivals per second (default inf: every request at t=0)")
    p.add_argument("--seed", type=int, default=0, help="for token ids, order and arrivals")
    p.add_argument("--kv-cache-memory", default=None,
                   help="e.g. 2GiB (default: room for every sequence with no sharing, so the "
                   "caching-off run is not short of KV blocks either)")
    p.add_argument("--max-num-batched-tokens", type=int,
                   default=EngineConfig.max_num_batched_tokens)
    p.add_argument("--runs", type=int, default=1, help="runs of each configuration (medians)")
    p.add_argument("--quick", action="store_true",
                   help="a tiny workload to smoke-test the script (overrides the sizes)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: torch's own default); on a machine other jobs "
                   "share, 1 avoids OpenMP threads stalling each other")
    p.add_argument("--json", metavar="PATH", help="also write every number here")
    args = p.parse_args()
    w = QUICK if args.quick else Workload(args.groups, args.prompts_per_group, args.system_len,
                                          args.question_len, args.output_len)
    vars(args).update(asdict(w))  # so the report and JSON show the sizes that ran
    if args.runs < 1 or w.groups < 1 or w.prompts_per_group < 1 or w.system_len < 0:
        p.error("--runs, --groups and --prompts-per-group must be positive")
    if w.system_len + w.question_len < 1 or w.output_len < 1 or w.question_len < 0:
        p.error("prompts and outputs must hold at least one token")
    if args.request_rate <= 0:
        p.error("--request-rate must be positive")
    if args.threads:
        torch.set_num_threads(args.threads)
    info = machine()

    folder = resolve_model(args.model)
    vocab_size = AutoConfig.from_pretrained(folder).vocab_size
    if args.kv_cache_memory is None:
        dtype = EngineConfig(model=args.model, dtype=args.dtype, device=args.device).torch_dtype
        # 5% over the need covers the warm-up request and rounding to whole blocks.
        need = kv_needs(w, EngineConfig.block_size)["off"]
        args.kv_cache_memory = int(1.05 * need * kv_bytes_per_token(folder, dtype)) + 2**20
    reqs = make_requests(w, vocab_size, args.seed, args.request_rate)
    warmup = [random.Random(args.seed + 1).randrange(MIN_TOKEN_ID, vocab_size)
              for _ in range(32)]

    runs: dict[str, list[dict]] = {"on": [], "off": []}
    outputs: dict[str, list[dict[str, list[int]]]] = {"on": [], "off": []}
    for run in range(args.runs):
        # Alternate which configuration goes first, so a drift in machine load hits both alike.
        for caching in (True, False) if run % 2 == 0 else (False, True):
            name = "on" if caching else "off"
            metrics, outs = run_once(args, w, reqs, warmup, caching)
            runs[name].append(metrics)
            outputs[name].append(outs)
            print(f"run {run + 1}/{args.runs}, caching {name}: hit rate "
                  f"{metrics['hit_rate']:.1%} (theoretical "
                  f"{metrics['theoretical_hit_rate']:.1%}), wall {metrics['wall_s']:.2f}s, "
                  f"TTFT p50 {metrics['ttft_p50_ms']:.0f} ms, {metrics['output_tok_s']:.1f} "
                  f"output tok/s, {metrics['preemptions']} preemptions",
                  file=sys.stderr, flush=True)

    mismatches = 0
    for on, off in zip(outputs["on"], outputs["off"]):
        for r in reqs:
            a, b = on[r.request_id], off[r.request_id]
            if a != b:
                mismatches += 1
                n = min(len(a), len(b))
                first = next((i for i in range(n) if a[i] != b[i]), n)
                print(f"MISMATCH {r.request_id}: caching on and off differ from output token "
                      f"{first} (on {a[first:first + 4]}, off {b[first:first + 4]})",
                      file=sys.stderr)
        short = [r.request_id for r in reqs if len(on[r.request_id]) != w.output_len]
        if short:
            print(f"WARNING: {len(short)} requests did not generate {w.output_len} tokens",
                  file=sys.stderr)

    med, speedup = summarize(runs)
    print(table(med, speedup, runs, mismatches, args, w, info))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(finite({"command": shlex.join([sys.executable] + sys.argv), "machine": info,
                       "args": vars(args), "workload": asdict(w), "median": med,
                       "speedup": speedup, "greedy_mismatches": mismatches, "runs": runs,
                       "hit_rate_target": HIT_RATE_TARGET}), f, indent=2)


if __name__ == "__main__":
    main()
