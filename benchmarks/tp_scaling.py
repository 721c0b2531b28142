"""Tensor-parallel decode scaling on this machine: N=1 against N=2 (gloo), one thread per rank.

A randomly initialised Llama of Llama-3.2-1B's shape (1.24B parameters, float32) is written
once to --model-dir. For each N and batch size B: B prompts of --prompt-len tokens are
prefilled, then --steps decode steps are timed one by one through the real engine (rank 0
schedules, broadcasts, runs its shard, gathers logits, samples). Step latency is the median
step; throughput is B / latency. Efficiency = throughput(N) / (N x throughput(N=1, 1 thread)).
N=1 and N=2 alternate --runs times; medians are reported.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/tp_scaling.py
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

from offline_throughput import machine  # isort: skip  (the script's own folder is on sys.path)
from random_model import write_random_model  # isort: skip

from tandem import LLM, SamplingParams
from tandem.loader.model_path import resolve_model


def decode_latency(llm: LLM, batch: int, prompt_len: int, steps: int) -> float:
    """Median seconds of one decode step of `batch` sequences."""
    engine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=steps + 2, ignore_eos=True)
    for i in range(batch):
        engine.add_request(f"b{batch}-{i}-{time.monotonic_ns()}",
                           [(7 * i + 3 * j) % 30000 + 100 for j in range(prompt_len)], params)
    while any(r.num_computed_tokens < r.num_prompt_tokens
              for r in engine.scheduler.requests.values()):
        engine.step()  # prefill (and the first sampled token)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t)
    while engine.has_unfinished_requests():
        engine.step()
    return statistics.median(times)


_PROBE = """
import sys, time, torch
torch.set_num_threads(1)
rows, out = int(sys.argv[1]), int(sys.argv[2])
a, w = torch.randn(rows, 2048), torch.randn(out, 2048)
for _ in range(3):
    a @ w.T
t, n = time.perf_counter(), 0
while time.perf_counter() - t < 6:
    a @ w.T
    n += 1
print(n / (time.perf_counter() - t))
"""


def parallel_ceiling(rows: int, out: int) -> float:
    """How fast two single-thread processes run side by side, as a fraction of one alone: the
    best N=2 efficiency this machine allows, whatever the engine does. rows=32 is a
    compute-bound GEMM (batch 32); rows=1 with a big weight is bound by memory bandwidth."""
    def run(k: int) -> list[float]:
        procs = [subprocess.Popen([sys.executable, "-c", _PROBE, str(rows), str(out)],
                                  stdout=subprocess.PIPE, text=True) for _ in range(k)]
        return [float(p.communicate()[0]) for p in procs]

    solo = run(1)[0]
    return sum(run(2)) / (2 * solo)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", default="/tmp/tandem-llama-3.2-1b-random")
    p.add_argument("--sizes", type=int, nargs="+", default=[1, 2])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--runs", type=int, default=2)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    torch.set_num_threads(1)  # one thread per rank, rank 0 included
    os.environ["OMP_NUM_THREADS"] = "1"
    if not os.path.isfile(os.path.join(args.model_dir, "config.json")):
        print(f"writing a random Llama-3.2-1B-shaped model to {args.model_dir}", flush=True)
        write_random_model("llama-3.2-1b", args.model_dir, resolve_model("smollm2"))
    lat: dict[int, dict[int, list[float]]] = {n: {b: [] for b in args.batches} for n in args.sizes}
    for run in range(args.runs):
        for n in (args.sizes if run % 2 == 0 else args.sizes[::-1]):
            llm = LLM(model=args.model_dir, dtype="float32", kv_cache_memory="1GiB",
                      tensor_parallel_size=n, enable_prefix_caching=False)
            try:
                decode_latency(llm, 2, args.prompt_len, 2)  # warm-up
                for b in args.batches:
                    lat[n][b].append(decode_latency(llm, b, args.prompt_len, args.steps))
                    print(f"run {run + 1}: N={n} batch {b}: {1000 * lat[n][b][-1]:.0f} ms/step",
                          flush=True)
            finally:
                llm.shutdown()
    ceilings = {"batch 32 GEMM": parallel_ceiling(32, 4096),
                "batch 1 weight read": parallel_ceiling(1, 16384)}
    base = args.sizes[0]
    info = ", ".join(f"{k} {v}" for k, v in machine().items())
    print(f"\n{info}\nLlama-3.2-1B shape, random weights, float32, gloo, 1 thread per "
          f"rank; prompt {args.prompt_len} tokens; median of {args.steps} decode steps, "
          f"median of {args.runs} runs\n")
    print("| batch | N | step latency, ms | decode tok/s | efficiency vs N=1 |")
    print("|---|---|---|---|---|")
    rows = []
    for b in args.batches:
        t1 = b / statistics.median(lat[base][b])
        for n in args.sizes:
            ms = statistics.median(lat[n][b])
            tput = b / ms
            eff = tput / (n / base * t1)
            rows.append({"batch": b, "n": n, "latency_s": ms, "tok_s": tput, "efficiency": eff,
                         "runs": lat[n][b]})
            print(f"| {b} | {n} | {1000 * ms:.0f} | {tput:.1f} | {100 * eff:.0f}% |")
    print("\nThis machine's ceiling for N=2 (two 1-thread processes side by side vs one alone): "
          + ", ".join(f"{k} {100 * v:.0f}%" for k, v in ceilings.items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "ceilings": ceilings, "machine": machine(),
                       "command": sys.argv}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
