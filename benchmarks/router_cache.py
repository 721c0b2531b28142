"""Cache-aware routing in front of real Tandem replicas: ours vs round robin vs sglang-router's.

SGLang's "generated-shared-prefix" workload as text: G groups x P prompts, each group's prompts
share a system prompt of S tokens, then each adds its own question of Q tokens; every request
generates O greedy tokens (ignore_eos). Words are drawn at random (seeded) from the model's own
one-token words, so the text has the token counts asked for and nothing is downloaded. The
same shuffled requests go, streamed, to /v1/completions of a router in front of N fresh
`tandem serve` replicas (restarted for every configuration, so each starts with cold caches),
as Poisson arrivals at --request-rate with at most --max-concurrency in flight (--request-rate
inf: a closed loop at that concurrency). Configurations:

    tandem-cache_aware       `tandem route --policy cache_aware --tokenizer MODEL` (matches the
                             replicas' real KV blocks, from their /kv/events)
    tandem-cache_aware-text  `tandem route --policy cache_aware`, no tokenizer (text prefixes)
    tandem-round_robin       `tandem route --policy round_robin`
    sglang-cache_aware       sglang-router's cache_aware, with its defaults
    sglang-round_robin       (not run unless named in --configs)

Per run: TTFT and end-to-end latency per request (from the client, so through the router),
output tokens per second of wall time, and the aggregate prefix-cache hit rate: the replicas'
tandem:prefix_cache_hits_total over tandem:prefix_cache_queries_total, summed over replicas, as
differences across the run. "best" is the hit rate of perfect affinity (each group's first
request misses, the others reuse the system prompt's full blocks). --runs N repeats every
configuration, in an order alternating between runs, and reports medians. sglang-router goes
into its own venv under .bench/ the first time (router_peers.py); logs go to .bench/logs/.
On 2 cores the default (4 configurations, 48 requests at 0.4/s) takes about 12 minutes a run,
most of it the ~50 s restart of the replicas and router per configuration; --quick about 3.

    PYTHONPATH=. HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/router_cache.py
    PYTHONPATH=. HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/router_cache.py --quick
    PYTHONPATH=. HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/router_cache.py --runs 3 \\
        --json router_cache.json
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass

import httpx
import numpy as np

from tandem.bench.datasets import BenchRequest, shared_prefix_requests
from tandem.bench.serve import send_one
from tandem.config import EngineConfig
from tandem.loader.model_path import resolve_model
from tandem.loader.tokenizer import load_tokenizer
from tandem.procs import answers_ready, stop_process

# The script's own folder is on sys.path when it runs as a file.
from offline_throughput import machine, median  # isort: skip
from router_peers import (ROOT, exit_on_sigterm, process, sglang_router,  # isort: skip
                          sglang_version, tandem_replica, tandem_router, wait_for)

# name -> (router, policy, tokenizer for exact block matching)
CONFIGS = {
    "tandem-cache_aware": ("tandem", "cache_aware", True),
    "tandem-cache_aware-text": ("tandem", "cache_aware", False),
    "tandem-round_robin": ("tandem", "round_robin", False),
    "sglang-cache_aware": ("sglang", "cache_aware", False),
    "sglang-round_robin": ("sglang", "round_robin", False),
}
DEFAULT_CONFIGS = ["tandem-cache_aware", "tandem-cache_aware-text", "tandem-round_robin",
                   "sglang-cache_aware"]
OURS, PEER = "tandem-cache_aware", "sglang-cache_aware"
COUNTERS = ("prefix_cache_queries_total", "prefix_cache_hits_total", "request_success_total",
            "prompt_tokens_total", "generation_tokens_total", "num_preemptions_total")
METRIC_LINE = re.compile(r"^tandem:(\w+)(?:\{[^}]*\})?\s+(\S+)$")


@dataclass
class Workload:
    groups: int = 6
    prompts_per_group: int = 8
    system_len: int = 600
    question_len: int = 40
    output_len: int = 16
    hot_prompts: int = 0  # extra prompts for group 0: a skewed workload



QUICK = Workload(groups=2, prompts_per_group=3, system_len=150, question_len=20, output_len=4)
# Sized on the 2-core dev machine (2 replicas, 1 torch thread each, other jobs running): at 0.4
# requests/s round robin's queues drained between bursts (TTFT p50 8 s, 12 requests); at 1/s
# they kept growing (TTFT p50 10-20 s). A quiet or bigger machine takes more: raise it there.
DEFAULT_RATE = 0.4
QUICK_RATE = 1.0  # the quick prompts are a quarter as long


@dataclass
class Request:
    group: int
    prompt: str
    prompt_ids: list[int]
    arrival_s: float  # offset from the start of the run


def make_requests(w: Workload, tokenizer: object, seed: int, rate: float) -> list[Request]:
    rng = random.Random(seed)
    arrival, out = 0.0, []
    counts = [w.prompts_per_group + (w.hot_prompts if g == 0 else 0) for g in range(w.groups)]
    for r in shared_prefix_requests(tokenizer, w.groups, counts, w.system_len,
                                    w.question_len, w.output_len, seed):
        out.append(Request(r.group, r.prompt, tokenizer.encode(r.prompt), arrival))
        if math.isfinite(rate):
            arrival += rng.expovariate(rate)
    return out


def common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def best_hit_rate(reqs: list[Request], block_size: int) -> float:
    """Hit tokens over queried tokens with perfect affinity and no eviction: a group's first
    request misses; each later one reuses the full blocks it shares with it, never its last
    token (the engine recomputes it to get logits)."""
    first: dict[int, list[int]] = {}
    hits = queries = 0
    for r in reqs:
        ids = r.prompt_ids
        queries += len(ids)
        if r.group in first:
            shared = min(common_prefix(first[r.group], ids), len(ids) - 1)
            hits += shared // block_size * block_size
        else:
            first[r.group] = ids
    return hits / queries


def scrape(urls: list[str]) -> list[dict[str, float]]:
    """The counters of each replica, summed over their labels."""
    out = []
    for url in urls:
        values = dict.fromkeys(COUNTERS, 0.0)
        for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
            m = METRIC_LINE.match(line)
            if m and m.group(1) in values:
                values[m.group(1)] += float(m.group(2))
        out.append(values)
    return out


@contextmanager
def replicas(n: int, model: str, extra: list[str],
             threads: int) -> Iterator[list[tuple[subprocess.Popen, str]]]:
    """n fresh replicas, started at once and not waited for (the caller starts the router
    meanwhile: on 2 busy cores every start takes tens of seconds); stopped by PID on the way
    out, all signalled before any is waited for."""
    logs = ROOT / ".bench" / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    # One torch thread pool per replica sized to its share of the cores: pools that together
    # oversubscribe the cores make OpenMP threads spin and stall each other.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(threads)}
    started: list[tuple[subprocess.Popen, str]] = []
    with ExitStack() as logs_open:
        try:
            for _ in range(n):
                cmd, url = tandem_replica(model, *extra)
                log = logs_open.enter_context(open(logs / f"replica-{url[-5:]}.log", "wb"))
                started.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                                 env=env), url))
            yield started
        finally:
            for proc, _ in started:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
            for proc, _ in started:
                stop_process(proc)


def wait_routable(url: str, n: int, exact: bool, timeout: float = 60.0) -> None:
    """Until the router takes all n replicas: a replica up only since the router's last health
    probe would miss the first requests (ours marks one up after 2 good probes, 1 s apart).
    Both routers list them at GET /workers, with different field names."""
    deadline = time.monotonic() + timeout
    while True:
        workers = httpx.get(f"{url}/workers", timeout=5).json()["workers"]
        ok = [w for w in workers
              if w.get("is_healthy", w.get("healthy")) and not w.get("draining")
              and w.get("breaker", "closed") != "open"
              # Exact matching starts once our router has the replica's block size.
              and (w.get("tandem", True) or not exact)]
        if len(ok) == n:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url}: routes to {len(ok)} of {n} replicas after "
                               f"{timeout:.0f}s: {workers}")
        time.sleep(0.2)


def warm_replicas(urls: list[str], model: str) -> None:
    """One short request straight to every replica, so none pays first-call setup in the timed
    run (the router's readiness probe reaches only one); its prompt shares no full block with
    the workload's."""
    for url in urls:
        body = {"model": model, "prompt": "warm up", "max_tokens": 2, "temperature": 0}
        httpx.post(f"{url}/v1/completions", json=body, timeout=120).raise_for_status()


def routes(url: str, model: str) -> bool:
    """The router answers a proxied request. router_peers.routes_a_request asks for model "m",
    which a Tandem replica answers with 404: it serves only its own model name."""
    body = {"model": model, "prompt": "warm up", "max_tokens": 1, "temperature": 0}
    return httpx.post(f"{url}/v1/completions", json=body, timeout=30).status_code == 200


@dataclass
class Result:
    ttft_s: float = math.nan
    e2e_s: float = math.nan
    output_tokens: int = 0
    waited: bool = False  # for a --max-concurrency slot
    error: str = ""


async def one_request(client: httpx.AsyncClient, url: str, req: Request, body: dict, t0: float,
                      slots: asyncio.Semaphore | None) -> Result:
    delay = t0 + req.arrival_s - time.perf_counter()
    if delay > 0:
        await asyncio.sleep(delay)
    waited = slots is not None and slots.locked()
    async with slots or _NoSlot():
        # As sglang's bench_serving: latency from the send, after any wait for a slot.
        r = await send_one(client, f"{url}/v1/completions", {**body, "prompt": req.prompt},
                           BenchRequest(req.prompt, len(req.prompt_ids), body["max_tokens"]),
                           t0, tokenizer=None)
    if not r.success:
        return Result(waited=waited, error=r.error[:200] or "no tokens")
    return Result(r.ttft, r.latency, r.output_tokens, waited)


class _NoSlot:
    """`async with` that waits for nothing: no --max-concurrency cap."""

    async def __aenter__(self) -> None:
        return None

    async def __aexit__(self, *exc: object) -> None:
        return None


async def drive(url: str, reqs: list[Request], w: Workload, model: str,
                max_concurrency: int, extra: dict | None = None) -> tuple[float, list[Result]]:
    """`extra`: more request body fields (e.g. a structured-output constraint)."""
    body = {"model": model, "max_tokens": w.output_len, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}, **(extra or {})}
    slots = asyncio.Semaphore(max_concurrency) if max_concurrency > 0 else None
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:
        t0 = time.perf_counter()
        results = await asyncio.gather(*(one_request(client, url, r, body, t0, slots)
                                         for r in reqs))
        return time.perf_counter() - t0, results


def router_cmd(name: str, urls: list[str], model: str) -> tuple[list[str], str]:
    kind, policy, exact = CONFIGS[name]
    if kind == "sglang":
        return sglang_router(urls, policy)
    return tandem_router(urls, policy, tokenizer=model if exact else None)


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(xs, q)) if xs else math.nan


def run_once(name: str, args: argparse.Namespace, w: Workload, reqs: list[Request]) -> dict:
    extra = ["--kv-cache-memory", args.kv_cache_memory] if args.kv_cache_memory else []
    with ExitStack() as stack:
        started = stack.enter_context(replicas(args.replicas, args.model, extra,
                                               args.replica_threads))
        urls = [u for _, u in started]
        cmd, url = router_cmd(name, urls, args.model)
        # Both routers take replicas that are not up yet and poll them until they are, so the
        # router starts while the replicas load; its probe passes once one replica answers.
        stack.enter_context(process(cmd, url, probe=lambda u: routes(u, args.model)))
        for proc, u in started:
            wait_for(u, proc, answers_ready)  # all of them, and raises if one exited
        wait_routable(url, len(urls), exact=CONFIGS[name][2])
        warm_replicas(urls, args.model)
        before = scrape(urls)
        wall, results = asyncio.run(drive(url, reqs, w, args.model, args.max_concurrency))
        after = scrape(urls)
    delta = [{k: a[k] - b[k] for k in COUNTERS} for a, b in zip(after, before)]
    queries = sum(d["prefix_cache_queries_total"] for d in delta)
    hits = sum(d["prefix_cache_hits_total"] for d in delta)
    ok = [r for r in results if not r.error]
    ttft, e2e = [r.ttft_s for r in ok], [r.e2e_s for r in ok]
    generated = sum(r.output_tokens or w.output_len for r in ok)
    return {
        "ttft_p50_ms": 1e3 * pct(ttft, 50), "ttft_p99_ms": 1e3 * pct(ttft, 99),
        "e2e_p50_ms": 1e3 * pct(e2e, 50), "e2e_p99_ms": 1e3 * pct(e2e, 99),
        "wall_s": wall, "output_tok_s": generated / wall, "generated_tokens": generated,
        "hit_rate": hits / queries if queries else math.nan,
        "hit_tokens": hits, "queried_tokens": queries,
        # Requests each replica finished: how the router split the load.
        "split": [int(d["request_success_total"]) for d in delta],
        "replica_hit_rates": [d["prefix_cache_hits_total"] / d["prefix_cache_queries_total"]
                              if d["prefix_cache_queries_total"] else math.nan for d in delta],
        "preemptions": int(sum(d["num_preemptions_total"] for d in delta)),
        "errors": len(results) - len(ok), "error_samples": [r.error for r in results
                                                           if r.error][:3],
        "waited_for_slot": sum(r.waited for r in results),
        "short_outputs": sum(1 for r in ok if r.output_tokens and r.output_tokens
                             != w.output_len),
        "ttft_s": ttft, "e2e_s": e2e,
    }


def paired_ratio(num: list[float], den: list[float]) -> float:
    """Median of per-run ratios: both sides of one run ran close together on this noisy
    machine, so a slow spell hits both alike."""
    return median([a / b for a, b in zip(num, den) if b])


KEYS = ("ttft_p50_ms", "ttft_p99_ms", "e2e_p50_ms", "e2e_p99_ms", "output_tok_s", "hit_rate",
        "wall_s", "errors", "preemptions")


def summarize(runs: dict[str, list[dict]]) -> tuple[dict, dict]:
    med = {c: {k: median([m[k] for m in runs[c]]) for k in KEYS} for c in runs}
    vs = {}
    if PEER in runs:
        peer = runs[PEER]
        for c, mine in runs.items():
            if c == PEER:
                continue
            vs[c] = {
                # > 1: this configuration's TTFT p50 is lower than sglang-router's.
                "ttft_p50_speedup": paired_ratio([m["ttft_p50_ms"] for m in peer],
                                                 [m["ttft_p50_ms"] for m in mine]),
                "hit_rate_minus_peer": median([a["hit_rate"] - b["hit_rate"]
                                               for a, b in zip(mine, peer)]),
            }
    return med, vs


def table(med: dict, vs: dict, runs: dict[str, list[dict]], args: argparse.Namespace,
          w: Workload, info: dict[str, str], extra: dict) -> str:
    rate = (f"Poisson {args.request_rate:g} req/s" if math.isfinite(args.request_rate)
            else "all at t=0")
    cap = f"at most {args.max_concurrency} in flight" if args.max_concurrency else "no cap"
    lines = [
        (f"Machine: {info['cores']} cores, {info['cpu']} ({info['flags']}); GPU {info['gpu']}; "
         f"torch {info['torch']}, Python {info['python']}; sglang-router "
         f"{extra['sglang_router']}"),
        (f"{args.replicas} x `tandem serve --model {args.model}` ({args.replica_threads} torch "
         f"thread(s) each, KV cache {args.kv_cache_memory or 'default'}), fresh for every "
         f"configuration; {w.groups} groups x {w.prompts_per_group} prompts"
         f"{f' (+{w.hot_prompts} in group 0)' if w.hot_prompts else ''}, system "
         f"{w.system_len} + question {w.question_len} tokens (measured: prompts "
         f"{extra['prompt_tokens_mean']:.0f} tokens on average) -> {w.output_len} output "
         f"tokens; {rate}, {cap}; medians of {args.runs} run(s)"
         f"{'; QUICK workload' if args.quick else ''}."),
        f"Best hit rate (perfect affinity, no eviction): {extra['best_hit_rate']:.1%}.",
        f"Command: {extra['command']}",
        "",
        ("| config | TTFT p50 ms | TTFT p99 ms | E2E p50 ms | output tok/s | hit rate | split "
         "| TTFT p50 speedup vs sglang | hit rate vs sglang |"),
        "|---|---:|---:|---:|---:|---:|---|---:|---:|",
    ]
    for c, m in med.items():
        split = "/".join(str(s) for s in runs[c][-1]["split"])
        v = vs.get(c)
        sp = f"{v['ttft_p50_speedup']:.2f}x" if v else "-"
        hr = f"{100 * v['hit_rate_minus_peer']:+.1f} pt" if v else "-"
        lines.append(f"| {c} | {m['ttft_p50_ms']:.0f} | {m['ttft_p99_ms']:.0f} | "
                     f"{m['e2e_p50_ms']:.0f} | {m['output_tok_s']:.1f} | {m['hit_rate']:.1%} | "
                     f"{split} | {sp} | {hr} |")
    if OURS in vs:
        v = vs[OURS]
        ttft_ok = v["ttft_p50_speedup"] > 1
        # Within half a point is a tie: both routers may reach the best rate the workload allows.
        diff = v["hit_rate_minus_peer"]
        hit = "better" if diff > 0.005 else "worse" if diff < -0.005 else "tied"
        at_best = min(med[OURS]["hit_rate"], med[PEER]["hit_rate"]) >= extra["best_hit_rate"] - 0.005
        lines.append(
            f"\nTarget (better TTFT p50 and hit rate than sglang-router's cache_aware): "
            f"{'met' if ttft_ok and hit == 'better' else 'NOT met'}: TTFT p50 "
            f"{'better' if ttft_ok else 'worse'} ({v['ttft_p50_speedup']:.2f}x), hit rate {hit} "
            f"({100 * diff:+.1f} points{', both at the best rate' if at_best else ''}).")
    lines.append("split: requests each replica finished (last run). Speedup: median of per-run "
                 "sglang/ours TTFT p50 ratios (> 1: lower TTFT than sglang-router's).")
    if math.isfinite(args.request_rate):
        lines.append("Open loop: output tok/s mostly follows the offered rate; it separates the "
                     "configurations only when the replicas saturate.")
    notes = []
    for c, rs in runs.items():
        if any(m["errors"] for m in rs):
            notes.append(f"{c}: {sum(m['errors'] for m in rs)} failed requests, e.g. "
                         f"{next(m['error_samples'] for m in rs if m['errors'])}")
        if any(m["preemptions"] for m in rs):
            notes.append(f"{c}: {sum(m['preemptions'] for m in rs)} preemptions (re-admissions "
                         "are queried again, which skews the hit rate)")
        if any(m["waited_for_slot"] for m in rs) and math.isfinite(args.request_rate):
            notes.append(f"{c}: {sum(m['waited_for_slot'] for m in rs)} arrivals waited for a "
                         "--max-concurrency slot (latency counts from the send)")
        if any(m["short_outputs"] for m in rs):
            notes.append(f"{c}: some requests did not generate {w.output_len} tokens")
    lines += [f"NOTE {n}" for n in notes]
    return "\n".join(lines)


def finite(x: object) -> object:
    """x with NaN and infinities as None, so the JSON file is standard JSON."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: finite(v) for k, v in x.items()}
    if isinstance(x, list):
        return [finite(v) for v in x]
    return x


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    d = Workload()
    p.add_argument("--model", default="smollm2",
                   help="the replicas' model: HF checkpoint folder, .gguf file or 'smollm2'")
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--replica-threads", type=int, default=None,
                   help="torch threads per replica (default: cores // replicas, at least 1)")
    p.add_argument("--kv-cache-memory", default="512MiB",
                   help="per replica, e.g. 256MiB to make eviction matter ('' for the "
                   "replica's default, from free memory)")
    p.add_argument("--configs", default=",".join(DEFAULT_CONFIGS),
                   help=f"comma-separated, from {', '.join(CONFIGS)}")
    p.add_argument("--groups", type=int, default=d.groups)
    p.add_argument("--prompts-per-group", type=int, default=d.prompts_per_group)
    p.add_argument("--hot-prompts", type=int, default=0,
                   help="extra prompts for group 0, a hot prefix (skew)")
    p.add_argument("--system-len", type=int, default=d.system_len)
    p.add_argument("--question-len", type=int, default=d.question_len)
    p.add_argument("--output-len", type=int, default=d.output_len)
    p.add_argument("--request-rate", type=float, default=None,
                   help=f"Poisson arrivals per second (default {DEFAULT_RATE:g}, {QUICK_RATE:g} "
                   "with --quick; inf: all at t=0, a closed loop at --max-concurrency)")
    p.add_argument("--max-concurrency", type=int, default=8,
                   help="requests in flight at most (0: no cap)")
    p.add_argument("--seed", type=int, default=0, help="for the text, order and arrivals")
    p.add_argument("--runs", type=int, default=1, help="runs of each configuration (medians)")
    p.add_argument("--quick", action="store_true",
                   help="a tiny workload to smoke-test the script (overrides the sizes)")
    p.add_argument("--json", metavar="PATH", help="also write every number here")
    args = p.parse_args()
    exit_on_sigterm()
    w = QUICK if args.quick else Workload(args.groups, args.prompts_per_group, args.system_len,
                                          args.question_len, args.output_len, args.hot_prompts)
    vars(args).update(asdict(w))  # so the report and JSON show the sizes that ran
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    if unknown := [c for c in configs if c not in CONFIGS]:
        p.error(f"unknown --configs {unknown}; choose from {list(CONFIGS)}")
    if not configs or args.runs < 1 or args.replicas < 1 or w.groups < 1 \
            or w.prompts_per_group < 1:
        p.error("--configs, --runs, --replicas, --groups and --prompts-per-group must be "
                "non-empty or positive")
    if w.system_len < 0 or w.question_len < 0 or w.system_len + w.question_len < 1 \
            or w.output_len < 1:
        p.error("prompts and outputs must hold at least one token")
    if args.request_rate is None:
        args.request_rate = QUICK_RATE if args.quick else DEFAULT_RATE
    if args.request_rate <= 0 or args.max_concurrency < 0:
        p.error("--request-rate must be positive and --max-concurrency not negative")
    if args.replica_threads is None:
        args.replica_threads = max(1, (os.cpu_count() or 1) // args.replicas)
    info = machine()
    command = shlex.join([sys.executable] + sys.argv)

    tokenizer = load_tokenizer(resolve_model(args.model))
    reqs = make_requests(w, tokenizer, args.seed, args.request_rate)
    extra = {"command": command,
             "sglang_router": sglang_version() if any(CONFIGS[c][0] == "sglang"
                                                      for c in configs) else "not run",
             "best_hit_rate": best_hit_rate(reqs, EngineConfig.block_size),
             "prompt_tokens_mean": sum(len(r.prompt_ids) for r in reqs) / len(reqs)}

    runs: dict[str, list[dict]] = {c: [] for c in configs}
    for run in range(args.runs):
        # Alternate the order, so a drift in machine load does not always hit the same one.
        for c in configs if run % 2 == 0 else configs[::-1]:
            m = run_once(c, args, w, reqs)
            runs[c].append(m)
            print(f"run {run + 1}/{args.runs}, {c}: TTFT p50 {m['ttft_p50_ms']:.0f} ms, "
                  f"p99 {m['ttft_p99_ms']:.0f} ms, {m['output_tok_s']:.1f} output tok/s, hit "
                  f"rate {m['hit_rate']:.1%}, split {m['split']}, {m['errors']} errors",
                  file=sys.stderr, flush=True)

    med, vs = summarize(runs)
    print(table(med, vs, runs, args, w, info, extra))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(finite({"command": command, "machine": info, "args": vars(args),
                              "workload": asdict(w), **extra, "median": med, "vs_sglang": vs,
                              "runs": runs}), f, indent=2)


if __name__ == "__main__":
    main()
