"""`tandem bench serve`: load any OpenAI-compatible server the way users do, and measure it
like vLLM's `bench serve` (TTFT, TPOT, ITL, end-to-end latency, throughput, goodput).

Every request streams. Arrivals are Poisson at --request-rate (gamma intervals with shape
--burstiness: 1 is Poisson, lower is burstier), or all at once with `inf`; --max-concurrency
caps what is in flight. Latency counts from the send, after any wait for a concurrency slot.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import sys
import time
from datetime import datetime

import httpx

from tandem.bench.datasets import (
    BenchRequest,
    file_requests,
    random_requests,
    shared_prefix_requests,
)
from tandem.bench.metrics import PERCENTILES, RequestResult, parse_goodput, summarize


def add_serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base-url", required=True, help="e.g. http://127.0.0.1:8000")
    p.add_argument("--model", required=True, help="the model name the server serves")
    p.add_argument("--tokenizer", default=None,
                   help="its tokenizer (HF folder, .gguf or smollm2); default: --model")
    p.add_argument("--endpoint", choices=["completions", "chat"], default="completions")
    p.add_argument("--dataset", choices=["random", "shared-prefix", "file"], default="random")
    p.add_argument("--dataset-path", default=None, help="JSONL for --dataset file")
    p.add_argument("--num-prompts", type=int, default=100)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--range-ratio", type=float, default=0.0,
                   help="lengths uniform in [len * (1 - r), len * (1 + r)]")
    p.add_argument("--groups", type=int, default=4, help="shared-prefix: groups")
    p.add_argument("--system-len", type=int, default=512, help="shared-prefix: shared tokens")
    p.add_argument("--request-rate", type=float, default=math.inf, help="requests/s or inf")
    p.add_argument("--burstiness", type=float, default=1.0)
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--api-key", default=None)
    p.add_argument("--goodput", nargs="+", default=[], metavar="NAME:MS",
                   help="SLOs for goodput, e.g. ttft:500 tpot:50 e2el:5000")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    p.add_argument("--result-file", default=None, help="write the JSON result here")
    p.add_argument("--plot", default=None, metavar="PNG",
                   help="latency CDFs (TTFT, ITL, E2E) and throughput over time")
    p.add_argument("--no-progress", action="store_true")


def check_args(args: argparse.Namespace) -> None:
    for name in ("num_prompts", "input_len", "output_len"):
        if getattr(args, name) < 1:
            raise ValueError(f"{name.replace('_', '-')}: must be >= 1")
    if not 0 <= args.range_ratio < 1:
        raise ValueError("range-ratio: must be in [0, 1)")
    if not args.request_rate > 0:
        raise ValueError("request-rate: must be > 0 (or inf)")
    if not args.burstiness > 0:
        raise ValueError("burstiness: must be > 0")
    if args.max_concurrency is not None and args.max_concurrency < 1:
        raise ValueError("max-concurrency: must be >= 1")
    if args.dataset == "file" and not args.dataset_path:
        raise ValueError("dataset-path: required with --dataset file")
    if args.dataset == "shared-prefix" and (args.groups < 1 or args.system_len < 0):
        raise ValueError("groups / system-len: must be >= 1 / >= 0")
    parse_goodput(args.goodput)


def build_requests(args: argparse.Namespace, tokenizer) -> list[BenchRequest]:
    if args.dataset == "file":
        return file_requests(args.dataset_path, tokenizer, args.output_len, args.num_prompts)
    if args.dataset == "shared-prefix":
        per = max(1, args.num_prompts // args.groups)
        return shared_prefix_requests(tokenizer, args.groups, per, args.system_len,
                                      args.input_len, args.output_len, args.seed)
    return random_requests(tokenizer, args.num_prompts, args.input_len, args.output_len,
                           args.range_ratio, args.seed)


def arrival_offsets(n: int, rate: float, burstiness: float, seed: int) -> list[float]:
    """Seconds after the start at which each request is sent: gamma-distributed gaps with mean
    1 / rate (shape `burstiness`; 1 is a Poisson process), or all at 0 for an infinite rate."""
    if math.isinf(rate):
        return [0.0] * n
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(n):
        out.append(t)
        t += rng.gammavariate(burstiness, 1.0 / (rate * burstiness))
    return out


def request_body(args: argparse.Namespace, req: BenchRequest) -> dict:
    body = {"model": args.model, "max_tokens": req.output_len, "stream": True,
            "stream_options": {"include_usage": True}, "temperature": args.temperature}
    if args.ignore_eos:
        body["ignore_eos"] = True
    if args.endpoint == "chat":
        body["messages"] = [{"role": "user", "content": req.prompt}]
    else:
        body["prompt"] = req.prompt
    return body


async def send_one(client: httpx.AsyncClient, url: str, body: dict, req: BenchRequest,
                   t0: float, tokenizer) -> RequestResult:
    res = RequestResult(prompt_len=req.prompt_len)
    start = time.perf_counter()
    res.start = start - t0
    last = start
    usage = None
    texts = []
    try:
        async with client.stream("POST", url, json=body) as r:
            if r.status_code != 200:
                res.error = f"HTTP {r.status_code}: {(await r.aread())[:300]!r}"
                return res
            async for line in r.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    res.error = str(chunk["error"])[:300]
                    return res
                usage = chunk.get("usage") or usage
                text = "".join((c.get("text") or (c.get("delta") or {}).get("content") or "")
                               for c in chunk.get("choices") or [])
                if not text:
                    continue
                now = time.perf_counter()
                if not texts:
                    res.ttft = now - start
                else:
                    res.itl.append(now - last)
                res.token_times.append(now - t0)
                last = now
                texts.append(text)
    except (httpx.HTTPError, ValueError) as e:
        res.error = f"{type(e).__name__}: {e}"
        return res
    res.latency = time.perf_counter() - start
    res.text = "".join(texts)
    if usage and usage.get("completion_tokens") is not None:
        res.output_tokens = int(usage["completion_tokens"])
        res.prompt_len = int(usage.get("prompt_tokens") or res.prompt_len)
    elif tokenizer is not None:  # a server without usage in streams: count what came back
        res.output_tokens = len(tokenizer.encode(res.text, add_special_tokens=False))
    res.success = bool(texts) or res.output_tokens == 0
    if not texts:
        res.ttft = res.latency
    return res


async def run_requests(args: argparse.Namespace, reqs: list[BenchRequest], tokenizer
                       ) -> tuple[list[RequestResult], float]:
    from tqdm import tqdm

    url = args.base_url.rstrip("/") + ("/v1/chat/completions" if args.endpoint == "chat"
                                       else "/v1/completions")
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    offsets = arrival_offsets(len(reqs), args.request_rate, args.burstiness, args.seed)
    slots = asyncio.Semaphore(args.max_concurrency) if args.max_concurrency else None
    bar = tqdm(total=len(reqs), disable=args.no_progress, file=sys.stderr, unit="req")
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=args.timeout, limits=limits, headers=headers) as client:
        t0 = time.perf_counter()

        async def one(req: BenchRequest, offset: float) -> RequestResult:
            delay = t0 + offset - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            if slots is None:
                res = await send_one(client, url, request_body(args, req), req, t0, tokenizer)
            else:
                async with slots:
                    res = await send_one(client, url, request_body(args, req), req, t0,
                                         tokenizer)
            bar.update(1)
            return res

        results = await asyncio.gather(*(one(r, o) for r, o in zip(reqs, offsets)))
        duration = time.perf_counter() - t0
    bar.close()
    return list(results), duration


def format_summary(s: dict, args: argparse.Namespace) -> str:
    rows = [("Successful requests", s["completed"], "d"), ("Failed requests", s["failed"], "d"),
            ("Maximum request concurrency", args.max_concurrency or "-", ""),
            ("Request rate (req/s)", args.request_rate, ""),
            ("Benchmark duration (s)", s["duration"], ".2f"),
            ("Total input tokens", s["total_input_tokens"], "d"),
            ("Total generated tokens", s["total_output_tokens"], "d"),
            ("Request throughput (req/s)", s["request_throughput"], ".2f"),
            ("Output token throughput (tok/s)", s["output_throughput"], ".2f"),
            ("Total token throughput (tok/s)", s["total_token_throughput"], ".2f")]
    if "request_goodput" in s:
        rows.append(("Request goodput (req/s)", s["request_goodput"], ".2f"))
    lines = [f"{' Serving Benchmark Result ':=^60}"]
    lines += [f"{name:<44}{value:>16{fmt}}" if fmt else f"{name:<44}{value!s:>16}"
              for name, value, fmt in rows]
    titles = {"ttft": "Time to First Token", "tpot": "Time per Output Token (excl. 1st)",
              "itl": "Inter-token Latency", "e2el": "End-to-end Latency"}
    for key, title in titles.items():
        lines.append(f"{title:-^60}")
        lines.append(f"{'Mean ' + key.upper() + ' (ms)':<44}{s[f'mean_{key}_ms']:>16.2f}")
        lines.append(f"{'Median ' + key.upper() + ' (ms)':<44}{s[f'median_{key}_ms']:>16.2f}")
        for p in PERCENTILES[1:]:
            lines.append(f"{f'P{p} ' + key.upper() + ' (ms)':<44}{s[f'p{p}_{key}_ms']:>16.2f}")
    lines.append("=" * 60)
    return "\n".join(lines)


def bench_serve(args: argparse.Namespace) -> dict:
    """Run one benchmark; print the summary; write the JSON result and plot when asked."""
    from tandem.loader.model_path import resolve_model
    from tandem.loader.tokenizer import load_tokenizer

    check_args(args)
    tokenizer = load_tokenizer(resolve_model(args.tokenizer or args.model))
    reqs = build_requests(args, tokenizer)
    results, duration = asyncio.run(run_requests(args, reqs, tokenizer))
    summary = summarize(results, duration, parse_goodput(args.goodput))
    print(format_summary(summary, args))
    failures = [r.error for r in results if not r.success]
    if failures:
        print(f"first failure: {failures[0]}", file=sys.stderr)
    result = {"date": datetime.now().strftime("%Y%m%d-%H%M%S"), "backend": "openai",
              "base_url": args.base_url, "endpoint": args.endpoint, "model_id": args.model,
              "dataset": args.dataset, "num_prompts": len(reqs),
              "request_rate": args.request_rate if math.isfinite(args.request_rate) else "inf",
              "burstiness": args.burstiness, "max_concurrency": args.max_concurrency,
              **summary,
              "input_lens": [r.prompt_len for r in results],
              "output_lens": [r.output_tokens for r in results],
              "ttfts": [r.ttft for r in results], "itls": [r.itl for r in results],
              "errors": [r.error for r in results]}
    if args.result_file:
        with open(args.result_file, "w") as f:
            json.dump(result, f, indent=1)
    if args.plot:
        from tandem.bench.plots import plot_run

        plot_run(results, args.plot, f"{args.model} @ {args.base_url}")
    return result
