"""The shared KV store: what a replica gains from a prefix another replica computed, and what
the store costs a workload that shares nothing.

Three measurements, each with the store off and on (a real `redis-server` on a loopback port,
the distribution's package; replicas with `--kv-store redis://... --kv-store-write-through`):

  cross    G groups, each a PREFIX-token shared prompt: a request of group g goes to replica A,
           then one with another question to replica B. B's TTFT is a recompute with the store
           off and a store load with it on (what the tiers exist for).
  routed   the same kind of workload (G groups x P questions, shuffled, closed loop at
           --concurrency) through `tandem route --policy cache_aware --tokenizer` in front of
           both replicas: TTFT p50/p99, prefix-cache hit rate, store hit blocks and bytes.
  unique   one replica, prompts that share nothing (every block is written to the store and
           never read back): output tokens/s, store on against off.

Every replica is started fresh, so no cache survives from one configuration to the next.

    PYTHONPATH=. HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/kv_store.py
    PYTHONPATH=. HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/kv_store.py --quick
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import httpx

from tandem.loader.model_path import resolve_model
from tandem.loader.tokenizer import load_tokenizer
from tandem.procs import answers_ready, free_port, stop_process, wait_until_ready

# The script's own folder is on sys.path when it runs as a file.
from offline_throughput import machine, median  # isort: skip
from router_cache import Request, Workload, drive, pct, replicas, routes  # isort: skip
from router_cache import wait_routable, warm_replicas  # isort: skip
from router_peers import exit_on_sigterm, process, tandem_router, wait_for  # isort: skip

PARTS = ("cross", "routed", "unique")
SAMPLE = re.compile(r'^tandem:(\w+)(?:\{([^}]*)\})?\s+(\S+)$')


def counters(url: str) -> dict[str, float]:
    """Every sample of /metrics, keyed `name` or `name[label=value]` for a tier, op or reason
    label (the model_name label dropped)."""
    out: dict[str, float] = {}
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        m = SAMPLE.match(line)
        if not m:
            continue
        labels = [kv for kv in (m.group(2) or "").split(",") if kv and
                  kv.split("=")[0] in ("tier", "op", "reason")]
        key = m.group(1) + (f"[{labels[0]}]" if labels else "")
        out[key] = out.get(key, 0.0) + float(m.group(3))
    return out


def delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: v - before.get(k, 0.0) for k, v in after.items()}


@contextmanager
def redis(enabled: bool) -> Iterator[tuple[str | None, int | None]]:
    """An empty redis-server on a free loopback port, nothing persisted: its URL and PID;
    (None, None) when off."""
    if not enabled:
        yield None, None
        return
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server not found: install the distribution's redis-server")
    port = free_port()
    with tempfile.TemporaryDirectory() as workdir:
        proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save",
                                 "", "--appendonly", "no", "--dir", workdir],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_until_ready(f"127.0.0.1:{port}", proc, _pong, timeout=30)
            yield f"redis://127.0.0.1:{port}/0", proc.pid
        finally:
            stop_process(proc)


def cpu_seconds(pid: int | None) -> float:
    """User + system CPU a process has used so far (Linux /proc); 0 for no process."""
    if pid is None:
        return 0.0
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _pong(addr: str) -> bool:
    host, port = addr.split(":")
    try:
        with socket.create_connection((host, int(port)), 0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def store_args(url: str | None, args: argparse.Namespace) -> list[str]:
    extra = ["--kv-cache-dtype", args.kv_cache_dtype]
    if args.replica_args:
        extra += args.replica_args.split()
    return extra + (["--kv-store", url, "--kv-store-write-through"] if url else [])


def group_prompts(tokenizer, groups: int, per_group: int, prefix_len: int, question_len: int,
                  seed: int) -> list[list[str]]:
    """G groups of text prompts: one shared prefix of `prefix_len` one-token words each, then
    a question of `question_len`."""
    from tandem.bench.datasets import one_token_words

    rng = random.Random(seed)
    words = one_token_words(tokenizer)
    out = []
    for _ in range(groups):
        prefix = "".join(rng.choices(words, k=prefix_len))
        out.append([prefix + "".join(rng.choices(words, k=question_len))
                    for _ in range(per_group)])
    return out


def settle(url: str, timeout: float = 60.0) -> None:
    """Until the replica's store writes stop growing: B must find every block A wrote."""
    deadline, last = time.monotonic() + timeout, -1.0
    while time.monotonic() < deadline:
        now = counters(url).get("kv_tier_saved_bytes_total[tier=\"store\"]", 0.0)
        if now == last:
            return
        last = now
        time.sleep(0.5)


def streamed(url: str, prompts: list[str], model: str, output_len: int,
             concurrency: int) -> tuple[float, list]:
    """The prompts to `url`, streamed, at most `concurrency` in flight: (wall s, results)."""
    reqs = [Request(0, p, [], 0.0) for p in prompts]
    return asyncio.run(drive(url, reqs, Workload(output_len=output_len), model, concurrency))


def cross(args: argparse.Namespace, tokenizer, store: bool) -> dict:
    prompts = group_prompts(tokenizer, args.groups, 2, args.prefix_len, args.question_len,
                            args.seed)
    with redis(store) as (url, _), replicas(2, args.model, store_args(url, args),
                                       args.replica_threads) as started:
        urls = [u for _, u in started]
        for proc, u in started:
            wait_for(u, proc, answers_ready)
        warm_replicas(urls, args.model)
        a, b = urls
        before = counters(b)
        ttft_a, ttft_b = [], []
        for first, second in prompts:
            ttft_a += [r.ttft_s for r in streamed(a, [first], args.model, 4, 1)[1]]
            if store:
                settle(a)
            ttft_b += [r.ttft_s for r in streamed(b, [second], args.model, 4, 1)[1]]
        d = delta(counters(b), before)
    return {"ttft_a_p50_ms": 1e3 * pct(ttft_a, 50), "ttft_b_p50_ms": 1e3 * pct(ttft_b, 50),
            "ttft_b_p99_ms": 1e3 * pct(ttft_b, 99), "ttft_b_ms": [1e3 * t for t in ttft_b],
            "b_store_hit_blocks": d.get('kv_tier_hit_blocks_total[tier="store"]', 0.0),
            "b_store_loaded_mb": d.get('kv_tier_loaded_bytes_total[tier="store"]', 0.0) / 1e6,
            "b_prefix_hit_rate": d["prefix_cache_hits_total"]
            / max(d["prefix_cache_queries_total"], 1)}


def routed(args: argparse.Namespace, tokenizer, store: bool) -> dict:
    groups = group_prompts(tokenizer, args.groups, args.per_group, args.prefix_len,
                           args.question_len, args.seed + 1)
    prompts = [p for g in groups for p in g]
    random.Random(args.seed).shuffle(prompts)
    with ExitStack() as stack:
        url, _ = stack.enter_context(redis(store))
        started = stack.enter_context(replicas(2, args.model, store_args(url, args),
                                               args.replica_threads))
        urls = [u for _, u in started]
        cmd, router = tandem_router(urls, "cache_aware", tokenizer=args.model)
        stack.enter_context(process(cmd, router, probe=lambda u: routes(u, args.model)))
        for proc, u in started:
            wait_for(u, proc, answers_ready)
        wait_routable(router, 2, exact=True)
        warm_replicas(urls, args.model)
        before = [counters(u) for u in urls]
        wall, results = streamed(router, prompts, args.model, args.output_len,
                                 args.concurrency)
        ds = [delta(counters(u), b) for u, b in zip(urls, before)]
    total = {k: sum(d.get(k, 0.0) for d in ds) for k in ds[0]}
    ok = [r for r in results if not r.error]
    ttft = [r.ttft_s for r in ok]
    return {"ttft_p50_ms": 1e3 * pct(ttft, 50), "ttft_p99_ms": 1e3 * pct(ttft, 99),
            "wall_s": wall, "errors": len(results) - len(ok),
            "prefix_hit_rate": total["prefix_cache_hits_total"]
            / max(total["prefix_cache_queries_total"], 1),
            "store_hit_blocks": total.get('kv_tier_hit_blocks_total[tier="store"]', 0.0),
            "store_loaded_mb": total.get('kv_tier_loaded_bytes_total[tier="store"]', 0.0) / 1e6,
            "store_saved_mb": total.get('kv_tier_saved_bytes_total[tier="store"]', 0.0) / 1e6,
            "split": [int(d["request_success_total"]) for d in ds]}


def unique(args: argparse.Namespace, tokenizer, store: bool) -> dict:
    rng = random.Random(args.seed + 2)
    from tandem.bench.datasets import one_token_words

    words = one_token_words(tokenizer)
    prompts = ["".join(rng.choices(words, k=args.unique_len)) for _ in range(args.unique_n)]
    with redis(store) as (url, redis_pid), replicas(1, args.model, store_args(url, args),
                                                    2 * args.replica_threads) as started:
        (proc, u), = started
        wait_for(u, proc, answers_ready)
        warm_replicas([u], args.model)
        # CPU time as well as throughput: on a shared machine wall-clock noise is larger than
        # the 3% bound, while what the store costs shows up as CPU the replica (copies, the
        # writer thread) and redis-server (on the same cores here) spend.
        cpu0 = cpu_seconds(proc.pid), cpu_seconds(redis_pid)
        wall, results = streamed(u, prompts, args.model, args.output_len, args.concurrency)
        replica_cpu, redis_cpu = cpu_seconds(proc.pid) - cpu0[0], cpu_seconds(redis_pid) - cpu0[1]
        d = counters(u)
    ok = [r for r in results if not r.error]
    return {"output_tok_s": sum(r.output_tokens for r in ok) / wall, "wall_s": wall,
            "replica_cpu_s": replica_cpu, "redis_cpu_s": redis_cpu,
            "errors": len(results) - len(ok),
            "store_saved_mb": d.get('kv_tier_saved_bytes_total[tier="store"]', 0.0) / 1e6,
            "writes_dropped": d.get("kv_store_writes_dropped_total", 0.0)}


def report(runs: dict[str, list[dict]], args: argparse.Namespace, took: float) -> str:
    m = {k: {f: median([r[f] for r in v]) for f in v[0] if not isinstance(v[0][f], list)}
         for k, v in runs.items()}

    def pairs(kind: str) -> list[tuple[dict, dict]]:
        return list(zip(runs[f"{kind}-off"], runs[f"{kind}-on"]))

    info = machine()
    lines = [(f"Machine: {info['cpu']}; flags: {info['flags']}; {info['cores']} cores. "
              f"Model {args.model}, --kv-cache-dtype {args.kv_cache_dtype} "
              f"{args.replica_args}; replicas with {args.replica_threads} torch thread(s) each; "
              f"{args.runs} run(s) of {', '.join(args.parts)}, medians; "
              f"took {took / 60:.1f} min.")]
    def table(kind: str, title: str, cols: list[tuple[str, str, str]]) -> None:
        """`cols`: (header, field, format); a format ending in % shows a fraction as one."""
        lines.extend(["", title, "", "| store | " + " | ".join(c[0] for c in cols) + " |",
                      "|---|" + "---:|" * len(cols)])
        for mode in ("off", "on"):
            r = m[f"{kind}-{mode}"]
            cells = [f"{100 * r[f]:{fmt[:-1]}}%" if fmt.endswith("%") else f"{r[f]:{fmt}}"
                     for _, f, fmt in cols]
            lines.append(f"| {mode} | " + " | ".join(cells) + " |")

    if "cross" in args.parts:
        speedup = median([off["ttft_b_p50_ms"] / on["ttft_b_p50_ms"]
                          for off, on in pairs("cross")])
        table("cross", (f"Cross-replica ({args.groups} groups, {args.prefix_len}-token prefix + "
                        f"{args.question_len}-token question; A computes, then B gets another "
                        f"question):"),
              [("A TTFT p50 (ms)", "ttft_a_p50_ms", ".0f"),
               ("B TTFT p50 (ms)", "ttft_b_p50_ms", ".0f"),
               ("B TTFT p99 (ms)", "ttft_b_p99_ms", ".0f"),
               ("B store hit blocks", "b_store_hit_blocks", ".0f"),
               ("B MB loaded", "b_store_loaded_mb", ".1f"),
               ("B prefix hit rate", "b_prefix_hit_rate", ".1f%")])
        lines += ["", (f"B's TTFT p50, recompute / store load: **{speedup:.1f}x** "
                  "(target >= 10x).")]
    if "routed" in args.parts:
        table("routed", (f"Routed (`tandem route --policy cache_aware --tokenizer`, 2 replicas, "
                         f"{args.groups} x {args.per_group} requests, concurrency "
                         f"{args.concurrency}, {args.output_len} tokens out):"),
              [("TTFT p50 (ms)", "ttft_p50_ms", ".0f"), ("TTFT p99 (ms)", "ttft_p99_ms", ".0f"),
               ("wall (s)", "wall_s", ".1f"), ("prefix hit rate", "prefix_hit_rate", ".1f%"),
               ("store hit blocks", "store_hit_blocks", ".0f"),
               ("MB loaded", "store_loaded_mb", ".1f"), ("MB written", "store_saved_mb", ".1f"),
               ("errors", "errors", ".0f")])
    if "unique" in args.parts:
        loss = median([1 - on["output_tok_s"] / off["output_tok_s"]
                       for off, on in pairs("unique")])
        table("unique", (f"No shared prefixes (1 replica, {args.unique_n} prompts of "
                         f"{args.unique_len} tokens, {args.output_len} out, concurrency "
                         f"{args.concurrency}; medians of {len(runs['unique-on'])} off/on "
                         f"pairs):"),
              [("output tok/s", "output_tok_s", ".1f"), ("wall (s)", "wall_s", ".1f"),
               ("replica CPU (s)", "replica_cpu_s", ".1f"),
               ("redis-server CPU (s)", "redis_cpu_s", ".1f"),
               ("MB written", "store_saved_mb", ".1f"), ("writes dropped", "writes_dropped", ".0f")])
        losses = ", ".join(f"{100 * (1 - on['output_tok_s'] / off['output_tok_s']):.1f}%"
                           for off, on in pairs("unique"))
        extra_cpu = median([(on["replica_cpu_s"] + on["redis_cpu_s"]) / off["replica_cpu_s"] - 1
                            for off, on in pairs("unique")])
        lines += ["", (f"Throughput lost to the store: **{100 * loss:.1f}%** (target <= 3%); "
                  f"by pair: {losses}. CPU the store adds (replica and redis-server, on "
                  f"against off): {100 * extra_cpu:+.1f}%.")]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--groups", type=int, default=8)
    p.add_argument("--per-group", type=int, default=3)
    p.add_argument("--prefix-len", type=int, default=2000)
    p.add_argument("--question-len", type=int, default=24)
    p.add_argument("--output-len", type=int, default=16)
    p.add_argument("--unique-n", type=int, default=24)
    p.add_argument("--unique-len", type=int, default=512)
    p.add_argument("--unique-repeats", type=int, default=3,
                   help="off/on pairs of the no-shared-prefix run in each run: it is short, and "
                        "a 3%% bound needs more than one pair on a noisy machine")
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--kv-cache-dtype", default="auto")
    p.add_argument("--replica-args", default="", help="more `tandem serve` flags, quoted")
    p.add_argument("--replica-threads", type=int, default=1)
    p.add_argument("--runs", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS),
                   help="which measurements to run")
    p.add_argument("--quick", action="store_true", help="2 groups, 500-token prefixes")
    p.add_argument("--json", help="write every raw number here")
    args = p.parse_args()
    if args.quick:
        args.groups, args.prefix_len, args.per_group, args.unique_n = 2, 500, 2, 4
        args.unique_repeats = 1
    exit_on_sigterm()
    tokenizer = load_tokenizer(resolve_model(args.model))
    start = time.monotonic()
    runs: dict[str, list[dict]] = {}
    for i in range(args.runs):
        for kind, fn, reps in (("cross", cross, 1), ("routed", routed, 1),
                               ("unique", unique, args.unique_repeats)):
            if kind not in args.parts:
                continue
            for r in range(reps):
                # Alternate which goes first, against drift on a shared machine.
                modes = (False, True) if (i + r) % 2 == 0 else (True, False)
                for store in modes:
                    name = f"{kind}-{'on' if store else 'off'}"
                    print(f"run {i + 1}/{args.runs}: {name} ...", flush=True)
                    runs.setdefault(name, []).append(fn(args, tokenizer, store))
    text = report(runs, args, time.monotonic() - start)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "runs": runs, "report": text}, f, indent=1)


if __name__ == "__main__":
    main()
