"""`tandem bench sweep`: `bench serve` at several concurrencies or request rates, one table
and one plot of output throughput against p99 TTFT and p99 ITL."""
from __future__ import annotations

import argparse
import copy
import json
import math

from tandem.bench.serve import add_serve_args, bench_serve


def add_sweep_args(p: argparse.ArgumentParser) -> None:
    add_serve_args(p)
    p.add_argument("--concurrencies", type=int, nargs="+", default=None,
                   help="max concurrency levels (each run sends --prompts-per-level x level)")
    p.add_argument("--request-rates", type=float, nargs="+", default=None)
    p.add_argument("--prompts-per-level", type=int, default=5,
                   help="with --concurrencies: num prompts = this x the concurrency")


def bench_sweep(args: argparse.Namespace) -> list[dict]:
    if (args.concurrencies is None) == (args.request_rates is None):
        raise ValueError("concurrencies / request-rates: give exactly one of them")
    levels = args.concurrencies or args.request_rates
    if any(not (v > 0) for v in levels):
        raise ValueError("concurrencies / request-rates: must be positive")
    points = []
    for v in levels:
        run = copy.copy(args)
        run.result_file = run.plot = None
        if args.concurrencies:
            run.max_concurrency, run.num_prompts = v, max(1, args.prompts_per_level * v)
            label = f"c={v}"
        else:
            run.request_rate = v
            label = f"{v:g}/s"
        res = bench_serve(run)
        points.append({"label": label, **{k: res[k] for k in (
            "completed", "failed", "output_throughput", "request_throughput", "mean_ttft_ms",
            "median_ttft_ms", "p99_ttft_ms", "median_itl_ms", "p99_itl_ms", "median_tpot_ms")},
            "max_concurrency": run.max_concurrency,
            "request_rate": run.request_rate if math.isfinite(run.request_rate) else "inf"})
    print(f"{'level':<10}{'ok':>6}{'failed':>7}{'out tok/s':>11}{'TTFT p50':>10}"
          f"{'TTFT p99':>10}{'ITL p50':>9}{'ITL p99':>9}")
    for p in points:
        print(f"{p['label']:<10}{p['completed']:>6}{p['failed']:>7}{p['output_throughput']:>11.1f}"
              f"{p['median_ttft_ms']:>10.1f}{p['p99_ttft_ms']:>10.1f}{p['median_itl_ms']:>9.1f}"
              f"{p['p99_itl_ms']:>9.1f}")
    if args.result_file:
        with open(args.result_file, "w") as f:
            json.dump(points, f, indent=1)
    if args.plot:
        from tandem.bench.plots import plot_sweep

        plot_sweep(points, args.plot, f"{args.model} @ {args.base_url}")
    return points
