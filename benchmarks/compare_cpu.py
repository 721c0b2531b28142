"""Tandem against llama.cpp's C++ server and HF transformers on this CPU, same weights, one run.

Engines, all on the SmolLM2-135M-Instruct weights of `--model smollm2` (the shipped Q4_1 GGUF
and Tandem's HF folder converted from it):

    tandem      `tandem serve --quantization none` with --tandem-args: every weight dense, in
                --dtype (say which settings in BENCHMARKS.md)
    tandem-q4   `tandem serve --quantization gguf` with --tandem-q4-args: the Q4_1 file's
                projections served as stored, at 4 bits (PyTorch's int4 kernel); the LM head
                (Q8_0 in the file) as Tandem serves it: the roofline's weights column says how
    llama-f16   llama-server on a 16-bit GGUF that llama.cpp's own script converts from that folder
    llama-q4_1  llama-server on the shipped Q4_1 GGUF
    hf          HF transformers `generate`, in-process, static batches, --hf-dtype (float32:
                bf16/fp16 matmuls are far slower than float32 on an AVX2 CPU)

llama-server is built from the llama.cpp that the llama-cpp-python sdist vendors and gets one
server per concurrency, with that many slots (`-np C -cb`, context C x (input + output + 64));
each Tandem engine gets one server for all concurrencies. See llama_peer.py: the first run
downloads and builds (about 10 minutes) and fills a venv under .bench/ for the GGUF conversion.

Workload, like vLLM's `bench serve`: random prompts of --input-len tokens, --output-len tokens
each with ignore_eos, greedy, all sent at once with at most C in flight, C in --concurrency,
--prompts-per-concurrency x C prompts. Servers are loaded by `tandem bench serve` (streamed
/v1/completions, timed at the client, which shares the CPU with the server); HF runs batches
of C, so its TTFT counts from its batch's start and each of its ITLs is one batched step. One
engine runs at a time; --runs N repeats the whole round, engines in order, and reports medians.
Every run and concurrency has its own prompt seed, the same for all engines, so no prefix or
prompt cache ever hits.

The roofline: a single-stream decode step reads every weight once, so weight bytes / memory
bandwidth is a floor on its inter-token latency. Bandwidth is one proxy number: the median of
`t.sum()` over a 256 MiB float32 tensor with --threads threads. Weight bytes a step reads:
for each Tandem engine, counted from the model as loaded with its own serve args (in this
process, freed before any server starts; step_bytes.py): every projection's and the LM head's
quantized codes and scales where quantized (a one-row step takes the quantized kernel even with
--dense-weight-copy), else its 16-bit decode copy where --decode-weight-dtype made one, else
its weight, plus the norms; for HF every parameter at --hf-dtype (the tied embedding / LM head
once); for llama-server the GGUF's tensor data. The one embedding row a step looks up is left
out throughout.

The defaults (5 engines x concurrency 1, 4, 16, 64) should take somewhat over half an hour on
2 cores (an estimate from small runs), after the one-time setup:

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/compare_cpu.py --tandem-args="" \\
        --tandem-q4-args="--dense-weight-copy" \\
        --result-file compare_cpu.json

(write --tandem-args=... with the `=`: a value that starts with `--` is otherwise taken for an
option of this script.)
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import shlex
import sys
import time
from contextlib import redirect_stdout
from pathlib import Path

import httpx
import torch
import transformers

from tandem.bench.datasets import random_requests
from tandem.bench.metrics import RequestResult, summarize
from tandem.bench.serve import add_serve_args, bench_serve
from tandem.config import DTYPES
from tandem.loader.model_path import resolve_model, smollm2_gguf
from tandem.loader.tokenizer import load_tokenizer
from tandem.procs import answers_ready

# The script's own folder is on sys.path when it runs as a file.
from llama_peer import cpu_flags, f16_gguf, llama_cmd, llama_server, llama_version  # isort: skip
from offline_throughput import hf_generate, hf_weight_bytes, machine, median  # isort: skip
from router_peers import ROOT, exit_on_sigterm, process, tandem_replica  # isort: skip
from step_bytes import tandem_step_bytes  # isort: skip

ENGINES = ("tandem", "tandem-q4", "llama-f16", "llama-q4_1", "hf")
TANDEM = ("tandem", "tandem-q4")
# How each Tandem engine holds its weights; --tandem-args / --tandem-q4-args come after.
TANDEM_QUANTIZATION = {"tandem": ["--quantization", "none"],
                       "tandem-q4": ["--quantization", "gguf"]}
# --tandem-q4-args' default: the dense copy speeds prefill and large batches (about 40% more
# tokens/s at C = 16 in a short run); the Q8_0 LM head needs no 16-bit decode copy.
TANDEM_Q4_DEFAULT = "--dense-weight-copy"
GGML_FLAGS = ("avx", "avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512bw", "avx512_vnni",
              "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16")
METRICS = ("output_throughput", "median_ttft_ms", "p99_ttft_ms", "median_itl_ms", "p99_itl_ms")
WARMUP_SEED = 10**6  # warm-up prompts share no prefix with measured ones


# What --isa avx2 gives Tandem's servers: ATen's AVX2 kernels, and so Tandem's own AVX2 kernels
# for 4-bit and Q8_0 weights (quantization/avx2_kernels.py), which it picks by that ISA;
# oneDNN's and MKL's GEMMs capped at AVX2; float32 where an AVX2 machine has no native bfloat16.
# Inductor's kernels go to a cache of their own: ones compiled under this capping, loaded later
# by an uncapped process from the shared cache, aborted it (seen 2026-12-03).
AVX2_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2",
            "MKL_ENABLE_INSTRUCTIONS": "AVX2", "TANDEM_CPU_BF16": "0",
            "TORCHINDUCTOR_CACHE_DIR": str(ROOT / ".bench" / "inductor-avx2")}


# ---- servers, loaded by `tandem bench serve` -------------------------------------------------

def load(url: str, model: str, folder: str, c: int, n: int, input_len: int, output_len: int,
         seed: int) -> dict:
    p = argparse.ArgumentParser()
    add_serve_args(p)
    ns = p.parse_args(["--base-url", url, "--model", model, "--tokenizer", folder,
                       "--dataset", "random", "--input-len", str(input_len),
                       "--output-len", str(output_len), "--ignore-eos", "--request-rate", "inf",
                       "--max-concurrency", str(c), "--num-prompts", str(n),
                       "--seed", str(seed), "--no-progress"])
    with redirect_stdout(sys.stderr):  # its summary is progress here; stdout gets the tables
        return bench_serve(ns)


def served_model(url: str) -> str:
    return httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]["id"]


def llama_ready(url: str) -> bool:
    return httpx.get(f"{url}/health", timeout=2).status_code == 200


def measure_server(url: str, folder: str, cs: list[int], args: argparse.Namespace, run: int
                   ) -> dict[int, dict]:
    model = served_model(url)
    load(url, model, folder, min(cs[0], 4), min(cs[0], 4), args.input_len, 8, WARMUP_SEED + run)
    return {c: load(url, model, folder, c, args.prompts_per_concurrency * c, args.input_len,
                    args.output_len, prompt_seed(run, c)) for c in cs}


def prompt_seed(run: int, c: int) -> int:
    return 1000 * run + c


def measure_tandem(tandem_args: list[str], folder: str, cs: list[int],
                   args: argparse.Namespace, run: int) -> dict[int, dict]:
    cmd, url = tandem_replica("smollm2", *tandem_args)
    env = {"OMP_NUM_THREADS": str(args.threads), **(AVX2_ENV if args.isa == "avx2" else {})}
    with process(cmd, url, answers_ready, env=env):
        return measure_server(url, folder, cs, args, run)


def measure_llama(binary: Path, gguf: str, folder: str, cs: list[int], args: argparse.Namespace,
                  run: int) -> dict[int, dict]:
    """One server per concurrency, with as many slots as requests in flight."""
    per = {}
    for c in cs:
        ctx = c * (args.input_len + args.output_len + 64)  # split evenly among the slots
        cmd, url, env = llama_cmd(binary, gguf, c, ctx, args.threads)
        with process(cmd, url, llama_ready, env=env):
            per |= measure_server(url, folder, [c], args, run)
    return per


# ---- HF transformers, in-process -------------------------------------------------------------

def measure_hf(model, tokenizer, c: int, n: int, args: argparse.Namespace, seed: int) -> dict:
    """Static batches of c over the same prompts the servers get. A forward hook stamps each
    step: generate runs one forward per new token, and greedy picking after it is negligible."""
    reqs = random_requests(tokenizer, n, args.input_len, args.output_len, 0.0, seed)
    prompts = [tokenizer.encode(r.prompt, add_special_tokens=False) for r in reqs]
    stamps: list[float] = []
    hook = model.register_forward_hook(lambda *_: stamps.append(time.perf_counter()))
    results = []
    try:
        t0 = time.perf_counter()
        for i in range(0, n, c):
            batch, stamps[:] = prompts[i:i + c], []
            start = time.perf_counter()
            hf_generate(model, batch, args.output_len)
            itl = [b - a for a, b in itertools.pairwise(stamps)]
            results += [RequestResult(len(p), success=True, output_tokens=args.output_len,
                                      ttft=stamps[0] - start, latency=stamps[-1] - start,
                                      itl=itl, start=start - t0) for p in batch]
        duration = time.perf_counter() - t0
    finally:
        hook.remove()
    return {**summarize(results, duration), "output_lens": [r.output_tokens for r in results],
            "ttfts": [r.ttft for r in results], "itls": [r.itl for r in results]}


# ---- roofline --------------------------------------------------------------------------------

def bandwidth_gbs(samples: int = 7) -> list[float]:
    t = torch.ones(64 * 2**20)  # 256 MiB of float32, far past any cache
    t.sum()
    out = []
    for _ in range(samples):
        start = time.perf_counter()
        t.sum()
        out.append(t.numel() * t.element_size() / (time.perf_counter() - start) / 1e9)
    return out


def gguf_weight_bytes(path: str) -> int:
    """The GGUF's tensor data (a few MB less than the file: the rest is tokenizer metadata)."""
    from gguf import GGUFReader

    return sum(int(t.n_bytes) for t in GGUFReader(path).tensors)


# ---- report ----------------------------------------------------------------------------------

def medians(runs: list[dict]) -> dict[str, float]:
    return {k: median([r[k] for r in runs]) for k in METRICS}


def problems(name: str, c: int, res: dict, output_len: int) -> list[str]:
    out = []
    if res["failed"]:
        out.append(f"{name} c={c}: {res['failed']} requests failed")
    wrong = [n for n in res["output_lens"] if n != output_len]
    if wrong:
        out.append(f"{name} c={c}: {len(wrong)} requests returned other than {output_len} "
                   f"tokens, e.g. {wrong[0]}")
    return out


MAIN_TABLE = ("| engine | concurrency | output tok/s | TTFT p50 (ms) | TTFT p99 (ms) | "
              "ITL p50 (ms) | ITL p99 (ms) |\n|---|---:|---:|---:|---:|---:|---:|")
RATIO_TABLE = ("Tandem / peer: output tok/s (above 1: Tandem faster) and ITL p50 (below 1: "
               "Tandem faster).\n\n| Tandem | peer | concurrency | output tok/s ratio | "
               "ITL p50 ratio |\n|---|---|---:|---:|---:|")
ROOF_TABLE = ("| engine | weights | bytes/step (MB) | floor (ms) | ITL p50 at c=1 (ms) | "
              "ITL / floor |\n|---|---|---:|---:|---:|---:|")


def report(results: dict, labels: dict[str, str], roof: dict[str, dict], gbs: float,
           header: list[str], notes: list[str]) -> str:
    med = {e: {c: medians(runs) for c, runs in per.items()} for e, per in results.items()}
    lines = [*header, "", MAIN_TABLE]
    for e, per in med.items():
        lines += [f"| {labels[e]} | {c} | {m['output_throughput']:.1f} | "
                  f"{m['median_ttft_ms']:.0f} | {m['p99_ttft_ms']:.0f} | "
                  f"{m['median_itl_ms']:.1f} | {m['p99_itl_ms']:.1f} |" for c, m in per.items()]
    ours = [t for t in TANDEM if t in med]
    peers = [e for e in med if e not in TANDEM]
    if ours and peers:
        lines += ["", RATIO_TABLE]
        for t, e in itertools.product(ours, peers):
            lines += [f"| {labels[t]} | {labels[e]} | {c} | "
                      f"{med[t][c]['output_throughput'] / m['output_throughput']:.2f}x | "
                      f"{med[t][c]['median_itl_ms'] / m['median_itl_ms']:.2f}x |"
                      for c, m in med[e].items()]
    roofline = (f"Roofline of single-stream decode: memory read bandwidth {gbs:.1f} GB/s (the "
                "median `t.sum()` over 256 MiB of float32: a one-number proxy); floor = weight "
                "bytes a step reads / bandwidth.")
    lines += ["", roofline, "", ROOF_TABLE]
    for e, r in roof.items():
        itl = med[e][1]["median_itl_ms"] if 1 in med[e] else float("nan")
        floor = r["bytes"] / (gbs * 1e9) * 1e3
        lines.append(f"| {labels[e]} | {r['weights']} | {r['bytes'] / 1e6:.1f} | {floor:.2f} | "
                     f"{itl:.1f} | {itl / floor:.1f}x |")
    if notes:
        lines += ["", "Problems (these rows do not measure what they claim):",
                  *[f"- {n}" for n in notes]]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--engines", nargs="+", choices=ENGINES, default=list(ENGINES))
    p.add_argument("--concurrency", nargs="+", type=int, default=[1, 4, 16, 64])
    p.add_argument("--prompts-per-concurrency", type=int, default=5)
    p.add_argument("--runs", type=int, default=1, help="medians over this many rounds")
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--tandem-args", default="",
                   help="extra `tandem serve` args of the dense engine, one string")
    p.add_argument("--tandem-q4-args", default=TANDEM_Q4_DEFAULT,
                   help="extra `tandem serve` args of the 4-bit engine, one string")
    p.add_argument("--hf-dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--threads", type=int, default=2,
                   help="compute threads of every engine (llama-server -t, torch threads)")
    p.add_argument("--isa", choices=["native", "avx2"], default="native",
                   help="avx2: every engine runs its AVX2 code on a machine that has more "
                        "(ATen, oneDNN and MKL capped at AVX2, bfloat16 off; llama-server "
                        "built for AVX2 only): an AVX2-only machine's paths, not its memory")
    p.add_argument("--result-file", help="write every raw number here (JSON)")
    args = p.parse_args()
    if min(args.concurrency) < 1 or args.runs < 1 or args.prompts_per_concurrency < 1:
        p.error("--concurrency, --runs and --prompts-per-concurrency must be at least 1")
    exit_on_sigterm()
    if args.isa == "avx2":
        os.environ.update(AVX2_ENV)  # this process too: its step-bytes count picks dtypes
    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    started, load_avg = time.perf_counter(), os.getloadavg()[0]  # other jobs skew every number
    cs = sorted(set(args.concurrency))
    folder, q4_1 = resolve_model("smollm2"), smollm2_gguf()
    tandem_args = {"tandem": [*TANDEM_QUANTIZATION["tandem"], *shlex.split(args.tandem_args)],
                   "tandem-q4": [*TANDEM_QUANTIZATION["tandem-q4"],
                                 *shlex.split(args.tandem_q4_args)]}
    # What a single-stream step reads, from each Tandem model as loaded (and freed again);
    # this also rejects bad serve args before anything is measured.
    weights = {e: tandem_step_bytes(tandem_args[e]) for e in TANDEM if e in args.engines}
    hf_dtype = DTYPES[args.hf_dtype]

    llama_bin, build_note, ggufs = None, "", {}
    if any(e.startswith("llama") for e in args.engines):
        llama_bin, build_note = llama_server(q4_1, args.isa)
        ggufs = {"llama-f16": str(f16_gguf(folder)), "llama-q4_1": q4_1}
    labels = {"tandem": f"Tandem dense ({args.tandem_args or 'defaults'})",
              "tandem-q4": f"Tandem Q4_1 ({args.tandem_q4_args or 'defaults'})",
              "llama-f16": "llama-server f16", "llama-q4_1": "llama-server Q4_1",
              "hf": f"HF transformers {args.hf_dtype}"}
    weights["hf"] = (args.hf_dtype, hf_weight_bytes(folder, hf_dtype))
    weights |= {e: (e.removeprefix("llama-"), gguf_weight_bytes(g)) for e, g in ggufs.items()}
    roof = {e: {"weights": weights[e][0], "bytes": weights[e][1]} for e in args.engines}

    results: dict[str, dict[int, list[dict]]] = {e: {c: [] for c in cs} for e in args.engines}
    notes: list[str] = []
    hf_model, tokenizer = None, load_tokenizer(folder)
    for run in range(args.runs):
        for e in args.engines:
            print(f"run {run + 1}/{args.runs}: {e} ...", file=sys.stderr, flush=True)
            if e in TANDEM:
                per = measure_tandem(tandem_args[e], folder, cs, args, run)
            elif e == "hf":
                if hf_model is None:
                    hf_model = transformers.AutoModelForCausalLM.from_pretrained(
                        folder, dtype=hf_dtype).eval()
                with torch.inference_mode():
                    hf_generate(hf_model, [[1] * args.input_len], 8)  # warm-up
                    per = {c: measure_hf(hf_model, tokenizer, c, args.prompts_per_concurrency
                                         * c, args, prompt_seed(run, c)) for c in cs}
            else:
                per = measure_llama(llama_bin, ggufs[e], folder, cs, args, run)
            for c, res in per.items():
                results[e][c].append(res)
                notes += problems(e, c, res, args.output_len)

    info = machine()
    gbs = bandwidth_gbs()
    flags = cpu_flags()
    header = [
        (f"Machine: {info['cores']} cores, {info['cpu']}; CPU flags ggml cares about: "
         f"{' '.join(f for f in GGML_FLAGS if f in flags) or 'none'}; torch {info['torch']}, "
         f"transformers {info['transformers']}, Python {info['python']}; {args.threads} "
         f"threads per engine; load average {load_avg:.1f} at the start."
         + (f" --isa avx2: Tandem with {' '.join(f'{k}={v}' for k, v in AVX2_ENV.items())}."
            if args.isa == "avx2" else "")),
        (f"llama.cpp {llama_version(llama_bin)} (vendored by the llama-cpp-python 0.3.36 "
         f"sdist), {build_note}; one server per concurrency C with `-np C -cb`."
         if llama_bin else "llama.cpp: not run."),
        (f"Workload: {args.input_len}-token random prompts, {args.output_len} tokens out "
         f"(ignore_eos, greedy), {args.prompts_per_concurrency} x C prompts at most C in flight, "
         f"medians of {args.runs} run(s). "
         + "".join(f"{labels[e]}: `{shlex.join(['tandem', 'serve', '--model', 'smollm2', *a])}`"
                   f" ({weights[e][0]} in a one-row step). " for e, a in tandem_args.items()
                   if e in args.engines)
         + f"HF: static batches of C, TTFT from the batch's start. Took "
         f"{(time.perf_counter() - started) / 60:.1f} min."),
    ]
    print(report(results, labels, roof, median(gbs), header, notes))
    if args.result_file:
        with open(args.result_file, "w") as f:
            json.dump({"machine": info, "cpu_flags": sorted(flags & set(GGML_FLAGS)),
                       "args": vars(args), "llama_build": build_note,
                       "llama_version": llama_version(llama_bin) if llama_bin else None,
                       "bandwidth_gbs": gbs, "bandwidth_gbs_median": median(gbs), "roofline": roof,
                       "notes": notes, "results": results}, f, indent=1)
        print(f"raw numbers in {args.result_file}", file=sys.stderr)


if __name__ == "__main__":
    main()
