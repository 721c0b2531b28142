"""`tandem serve -dp 2` with each replica's OpenMP threads as serve -dp now sets them (the
cores split between replicas) against OMP_NUM_THREADS=<all cores> in each (the old default),
ITL p50 of greedy streams at 1, 2 and 4 in flight, 3 rounds each.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/dp_threads.py
"""
from __future__ import annotations

import os
import signal
import statistics
import subprocess
import sys
import threading
import time

from openai import OpenAI

from tandem.procs import free_port, wait_until_ready


def itl_ms(env: dict[str, str], concurrency: tuple[int, ...] = (1, 2, 4)) -> dict[int, float]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "tandem.cli", "serve", "--model", "smollm2",
                             "-dp", "2", "--port", str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        if not wait_until_ready(f"http://127.0.0.1:{port}", proc, timeout=300):
            raise SystemExit(f"serve -dp 2 exited with {proc.returncode}")
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none")
        out = {}
        for c in concurrency:
            gaps: list[float] = []

            def stream(i: int, gaps: list[float] = gaps) -> None:
                last = None
                for _ in client.completions.create(
                        model="smollm2", prompt=f"Story {i}: once upon a time", max_tokens=64,
                        stream=True, temperature=0, extra_body={"ignore_eos": True}):
                    now = time.perf_counter()
                    if last is not None:
                        gaps.append(now - last)
                    last = now

            for r in range(3):
                threads = [threading.Thread(target=stream, args=(10 * r + j,)) for j in range(c)]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
            out[c] = statistics.median(gaps) * 1e3
        return out
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(60)


def main() -> None:
    cores = len(os.sched_getaffinity(0))
    base = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    print(f"{cores} cores; ITL p50 (ms) by streams in flight")
    for name, env in ((f"OMP_NUM_THREADS={cores} each", {**base, "OMP_NUM_THREADS": str(cores)}),
                      ("split (serve -dp's default)", base)):
        print(name, {c: round(ms, 1) for c, ms in itl_ms(env).items()}, flush=True)


if __name__ == "__main__":
    main()
