"""What a router adds to each request: latency over calling the replica directly, per rate.

A stub replica (benchmarks/stub_replica.py) answers at once, so what remains is the router.
Open-loop load at a fixed rate (requests sent on schedule whether or not earlier ones are
back, latency counted from the scheduled time, like wrk2), for each rate: the stub directly,
`tandem route` in front of it, and sglang-router in front of it, in one run, order rotating
across --runs. Reports p50/p99 latency, the added latency (router minus direct, per run, then
the median over runs) and the rate each target sustained.

    .venv/bin/python benchmarks/router_overhead.py
    .venv/bin/python benchmarks/router_overhead.py --rates 500 --duration 5 --runs 1
"""
from __future__ import annotations

import argparse
import asyncio
import gc
import json
import shlex
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

import numpy as np

from tandem.procs import answers_ready

from router_peers import (exit_on_sigterm, free_port, process, sglang_router,  # isort: skip
                          sglang_version, tandem_router)

from offline_throughput import machine, median  # isort: skip

BODY = json.dumps({"model": "stub", "prompt": "Say hello to the router benchmark.",
                   "max_tokens": 1}).encode()
TARGET_P99_ADDED_MS, TARGET_RATE = 2.0, 500


class Conn(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection with at most one request in flight."""

    def __init__(self) -> None:
        self.buf, self.waiter, self.closed = b"", None, False

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.waiter and not self.waiter.done():
            self.waiter.set_exception(ConnectionError("connection closed"))

    def data_received(self, data: bytes) -> None:
        self.buf += data
        end = self.buf.find(b"\r\n\r\n")
        if end < 0 or self.waiter is None:
            return
        head = self.buf[:end].lower()
        at = head.find(b"content-length:")
        if at < 0:  # chunked: the terminating chunk ends the body
            done = self.buf.endswith(b"0\r\n\r\n")
            size = len(self.buf)
        else:
            stop = head.find(b"\r\n", at)
            size = end + 4 + int(head[at + 15:stop if stop > 0 else None])
            done = len(self.buf) >= size
        if done:
            status = int(head[9:12])
            self.buf = self.buf[size:]
            waiter, self.waiter = self.waiter, None
            if not waiter.done():  # cancelled: its request timed out
                waiter.set_result(status)


class Client:
    """A pool of keep-alive connections to one host:port that grows as concurrency needs."""

    def __init__(self, url: str):
        host, port = url.removeprefix("http://").split(":")
        self.host, self.port, self.idle = host, int(port), []
        self.request = (b"POST /v1/completions HTTP/1.1\r\nhost: %s\r\n"
                        b"content-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
                        % (url.encode(), len(BODY), BODY))

    async def post(self) -> int:
        loop = asyncio.get_running_loop()
        while self.idle and self.idle[-1].closed:
            self.idle.pop()
        if self.idle:
            conn = self.idle.pop()
        else:
            _, conn = await loop.create_connection(Conn, self.host, self.port)
        conn.waiter = loop.create_future()
        conn.transport.write(self.request)
        status = await conn.waiter
        if not conn.closed:
            self.idle.append(conn)
        return status


async def open_loop(url: str, rate: float, duration: float) -> dict:
    """Send `rate` requests/s for `duration` s on a fixed schedule; latency from the schedule."""
    client, loop = Client(url), asyncio.get_running_loop()
    n = int(rate * duration)
    latencies: list[float] = []
    errors = 0

    async def one(due: float) -> None:
        nonlocal errors
        try:
            status = await asyncio.wait_for(client.post(), 30)
        except (OSError, TimeoutError):
            errors += 1
            return
        if status == 200:
            latencies.append(time.perf_counter() - due)
        else:
            errors += 1

    await asyncio.gather(*(client.post() for _ in range(4)))  # warm connections
    tasks = []
    # perf_counter, not loop.time(): uvloop's clock ticks in whole milliseconds.
    start = time.perf_counter() + 0.01
    for i in range(n):
        due = start + i / rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(loop.create_task(one(due)))
    await asyncio.gather(*tasks)
    wall = time.perf_counter() - start
    lat = np.array(latencies) * 1e3 if latencies else np.array([float("nan")])
    return {"sent": n, "ok": len(latencies), "errors": errors, "achieved_rps": len(latencies) / wall,
            "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99)),
            "max_ms": float(lat.max())}


def stub_cmd() -> tuple[list[str], str]:
    port = free_port()
    return ([sys.executable, str(Path(__file__).with_name("stub_replica.py")), "--port",
             str(port)], f"http://127.0.0.1:{port}")


def measure(targets: dict[str, str], rates: list[float], duration: float, runs: int,
            say: Callable[[str], None]) -> dict[str, dict[float, list[dict]]]:
    results: dict[str, dict[float, list[dict]]] = {name: {r: [] for r in rates} for name in targets}
    names = list(targets)
    for run in range(runs):
        for rate in rates:
            order = names[run % len(names):] + names[:run % len(names)]
            for name in order:
                # The load generator's own collector pauses (it holds torch's objects via
                # machine()) would land in every target's p99 alike: none while measuring.
                gc.collect()
                gc.disable()
                try:
                    res = asyncio.run(open_loop(targets[name], rate, duration))
                finally:
                    gc.enable()
                results[name][rate].append(res)
                say(f"run {run + 1} rate {rate:g} {name}: p50 {res['p50_ms']:.2f} ms "
                    f"p99 {res['p99_ms']:.2f} ms ok {res['ok']}/{res['sent']} "
                    f"achieved {res['achieved_rps']:.0f}/s")
    return results


def summarize(results: dict[str, dict[float, list[dict]]], rates: list[float]) -> list[dict]:
    rows = []
    for name, per_rate in results.items():
        for rate in rates:
            runs, direct = per_rate[rate], results["direct"][rate]
            row = {"target": name, "rate": rate,
                   "p50_ms": median([r["p50_ms"] for r in runs]),
                   "p99_ms": median([r["p99_ms"] for r in runs]),
                   "achieved_rps": median([r["achieved_rps"] for r in runs]),
                   "errors": sum(r["errors"] for r in runs)}
            if name != "direct":  # paired: each run against the direct run beside it
                row["added_p50_ms"] = median([r["p50_ms"] - d["p50_ms"]
                                              for r, d in zip(runs, direct)])
                row["added_p99_ms"] = median([r["p99_ms"] - d["p99_ms"]
                                              for r, d in zip(runs, direct)])
            rows.append(row)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rates", type=float, nargs="+", default=[100, 500, 1000])
    p.add_argument("--duration", type=float, default=10.0, help="seconds per rate and target")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--no-sglang", action="store_true", help="skip the sglang-router peer")
    p.add_argument("--json", default=None, help="write the raw results here")
    args = p.parse_args()
    exit_on_sigterm()
    say = lambda s: print(s, file=sys.stderr, flush=True)
    try:
        import uvloop  # the loop the routers and the stub run on too
        uvloop.install()
    except ImportError:
        pass

    with ExitStack() as stack:
        cmd, url = stub_cmd()
        stub = stack.enter_context(process(cmd, url, probe=answers_ready))
        targets = {"direct": stub}
        cmd, url = tandem_router([stub], "round_robin")
        targets["tandem"] = stack.enter_context(process(cmd, url))
        if not args.no_sglang:
            cmd, url = sglang_router([stub], "round_robin")
            targets["sglang-router"] = stack.enter_context(process(cmd, url))
        results = measure(targets, args.rates, args.duration, args.runs, say)
    rows = summarize(results, args.rates)

    m = machine()
    print(f"# router overhead: {m['cpu']}, {m['cores']} cores, {m['flags']}; "
          f"sglang-router {sglang_version() if not args.no_sglang else '-'}")
    print("# " + shlex.join([sys.executable, *sys.argv]))
    print(f"{'target':<14} {'rate':>6} {'p50 ms':>8} {'p99 ms':>8} {'+p50 ms':>8} "
          f"{'+p99 ms':>8} {'achieved/s':>10} {'errors':>6}")
    for r in rows:
        print(f"{r['target']:<14} {r['rate']:>6g} {r['p50_ms']:>8.2f} {r['p99_ms']:>8.2f} "
              f"{r.get('added_p50_ms', 0):>8.2f} {r.get('added_p99_ms', 0):>8.2f} "
              f"{r['achieved_rps']:>10.0f} {r['errors']:>6}")
    ours = {r["rate"]: r for r in rows if r["target"] == "tandem"}
    if TARGET_RATE in ours:
        print(f"target: p99 added at {TARGET_RATE} rps < {TARGET_P99_ADDED_MS} ms: "
              f"{ours[TARGET_RATE]['added_p99_ms']:.2f} ms")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": m, "rows": rows, "raw": {k: {str(r): v for r, v in d.items()}
                                                          for k, d in results.items()}}, f,
                      indent=1)


if __name__ == "__main__":
    main()
