"""Structured outputs through `tandem serve`: output tok/s and time per output token with a JSON
schema against unconstrained, at each --concurrency (completions, greedy, ignore_eos: a
constrained request runs until its JSON is complete, an unconstrained one to the same length,
so both weigh prefill alike), and what a schema adds to the time to first token, cold (first
use: compiled) and cached.

    PYTHONPATH=. HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/structured.py
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import httpx

from tandem.procs import answers_ready

from offline_throughput import machine  # isort: skip  (the script's folder is on sys.path)
from router_cache import Request, Workload, drive  # isort: skip
from router_peers import exit_on_sigterm, process, tandem_replica  # isort: skip


def schema(i: int = 0) -> dict:
    """A record schema; `i` varies a property name, so each i is a schema never compiled yet."""
    return {"type": "object", "additionalProperties": False,
            "required": ["id", "title", "tags", "score"],
            "properties": {"id": {"type": "integer"}, "title": {"type": "string", "maxLength": 40},
                           "tags": {"type": "array", "items": {"type": "string", "maxLength": 12},
                                    "maxItems": 4},
                           "score": {"type": "number"}, f"note_{i}": {"type": "string"}}}


PROMPT = "Here is a JSON record describing a book from the library catalogue:\n"


def ttft_ms(client: httpx.Client, url: str, model: str, extra: dict) -> float:
    body = {"model": model, "prompt": PROMPT, "max_tokens": 1, "temperature": 0, **extra}
    start = time.perf_counter()
    r = client.post(f"{url}/v1/completions", json=body)
    r.raise_for_status()
    return 1000 * (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    p.add_argument("--per-c", type=int, default=2, help="requests per unit of concurrency")
    p.add_argument("--output-len", type=int, default=96)
    p.add_argument("--runs", type=int, default=3)
    args = p.parse_args()
    exit_on_sigterm()
    cmd, url = tandem_replica(args.model, "--max-model-len", "2048")
    constrained = {"structured_outputs": {"json": schema()}}
    rows, ttfts = [], {"none": [], "cold": [], "cached": []}
    with process(cmd, url, answers_ready), httpx.Client(timeout=120) as client:
        w = Workload(output_len=args.output_len)
        _, probe = asyncio.run(drive(url, [Request(0, PROMPT, [], 0.0)], w, args.model, 1,
                                     constrained))
        same_len = Workload(output_len=probe[0].output_tokens)  # greedy: every reply alike
        for c in args.concurrency:  # warm every batch shape, both ways
            warm = [Request(0, PROMPT, [], 0.0)] * c
            for extra in (None, constrained):
                asyncio.run(drive(url, warm, Workload(output_len=16), args.model, c, extra))
        for c in args.concurrency:
            reqs = [Request(0, PROMPT, [], 0.0)] * (c * args.per_c)
            got = {"none": [], "json": []}
            for i in range(args.runs):
                for name in (("none", "json") if i % 2 == 0 else ("json", "none")):
                    wall, results = asyncio.run(drive(
                        url, reqs, w if name == "json" else same_len, args.model, c,
                        constrained if name == "json" else None))
                    ok = [r for r in results if not r.error]
                    assert len(ok) == len(results), [r.error for r in results if r.error][:1]
                    tpot = [(r.e2e_s - r.ttft_s) / (r.output_tokens - 1) for r in ok
                            if r.output_tokens > 1]
                    got[name].append((sum(r.output_tokens for r in ok) / wall,
                                      1000 * statistics.median(tpot),
                                      statistics.mean(r.output_tokens for r in ok)))
            ratio = statistics.median(j[0] / n[0] for n, j in zip(got["none"], got["json"]))
            med = {k: [statistics.median(x[f] for x in v) for f in range(3)]
                   for k, v in got.items()}
            rows.append(f"| {c} | {med['none'][0]:.1f} | {med['json'][0]:.1f} | {ratio:.2f}x | "
                        f"{med['none'][1]:.1f} | {med['json'][1]:.1f} | {med['json'][2]:.0f} |")
        for i in range(1, 1 + 2 * args.runs):
            ttfts["none"].append(ttft_ms(client, url, args.model, {}))
            ttfts["cold"].append(ttft_ms(client, url, args.model,
                                         {"structured_outputs": {"json": schema(i)}}))
            ttfts["cached"].append(ttft_ms(client, url, args.model, constrained))
    info = machine()
    print(f"Machine: {info['cpu']}; flags: {info['flags']}; {info['cores']} cores. Model "
          f"{args.model}; {args.per_c} x C completions a run, greedy, up to {args.output_len} "
          f"tokens; medians of {args.runs} runs.\n")
    print("| C | none tok/s | json_schema tok/s | ratio | none TPOT (ms) | json_schema TPOT (ms) "
          "| tokens per reply |\n|---:|---:|---:|---:|---:|---:|---:|")
    print("\n".join(rows))
    med = {k: statistics.median(v) for k, v in ttfts.items()}
    print(f"\nOne-token request, median of {len(ttfts['none'])}: unconstrained {med['none']:.1f} "
          f"ms; new schema (compiled) {med['cold']:.1f} ms (+{med['cold'] - med['none']:.1f}); "
          f"cached schema {med['cached']:.1f} ms (+{med['cached'] - med['none']:.1f}).")


if __name__ == "__main__":
    main()
