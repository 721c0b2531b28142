"""Chaos: 3 real replicas behind the router under steady load; one is SIGKILLed mid-run and
restarted on the same port later. Every non-streaming request succeeds, every stream ends
(completed, or with a clean error event), nothing hangs, and the router marks the replica
down within 3 s of the kill and up within 3 s of its recovery."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
from server_utils import MODEL_NAME, free_port, start_server

TOTAL, CONCURRENCY = 150, 16


def serve_on(model: str, port: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "tandem.cli", "serve", "--model", model,
                             "--port", str(port), "--served-model-name", MODEL_NAME,
                             "--kv-cache-memory", "96MiB", "--shutdown-timeout", "5"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise AssertionError("replica did not start")


def one(url: str, i: int) -> str:
    body = {"model": MODEL_NAME, "prompt": f"Request {i}: the weather today is",
            "max_tokens": 4, "temperature": 0}
    if i % 2 == 0:
        r = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
        return "ok" if r.status_code == 200 else f"failed {r.status_code} {r.text[:200]}"
    events = []
    with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True},
                      timeout=60) as r:
        if r.status_code != 200:
            return f"stream refused {r.status_code}"
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
    if events[-1:] != ["[DONE]"]:
        return "stream cut without [DONE]"
    if any(e.startswith('{"error"') for e in events):
        return "stream error event"
    finished = [json.loads(e)["choices"][0]["finish_reason"] for e in events[:-1]]
    return "stream ok" if finished[-1] in ("stop", "length") else "stream unfinished"


def test_router_survives_a_replica_dying_under_load(smollm2_dir, server):
    victim_port, router_port = free_port(), free_port()
    victim = serve_on(smollm2_dir, victim_port)
    victim_url = f"http://127.0.0.1:{victim_port}"
    with start_server(smollm2_dir) as b:
        a = server  # the session's shared server: one model load less for the suite
        router = subprocess.Popen([sys.executable, "-m", "tandem.cli", "route", "--port",
                                   str(router_port), "--worker-urls", victim_url, a.url, b.url],
                                  env={**os.environ, "HF_HUB_OFFLINE": "1"})
        url = f"http://127.0.0.1:{router_port}"
        marks: dict[str, float] = {}
        stop = threading.Event()

        def watch() -> None:  # when the router's view of the victim flips
            last = True
            while not stop.is_set():
                try:
                    ws = httpx.get(f"{url}/workers", timeout=2).json()["workers"]
                    healthy = next(w["healthy"] for w in ws if w["url"] == victim_url)
                    if healthy != last:
                        marks["down" if not healthy else "up"] = time.monotonic()
                        last = healthy
                except (httpx.HTTPError, StopIteration, ValueError):
                    pass
                time.sleep(0.05)

        try:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                try:
                    if httpx.get(f"{url}/ready", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.2)
            watcher = threading.Thread(target=watch)
            watcher.start()
            done = [0]

            def run(i: int) -> str:
                out = one(url, i)
                done[0] += 1
                return out

            with ThreadPoolExecutor(CONCURRENCY) as pool:
                futures = [pool.submit(run, i) for i in range(TOTAL)]
                while done[0] < TOTAL // 5:
                    time.sleep(0.05)
                victim.send_signal(signal.SIGKILL)
                victim.wait()
                marks["killed"] = time.monotonic()
                while done[0] < TOTAL // 2 or "down" not in marks:
                    time.sleep(0.05)
                victim = serve_on(smollm2_dir, victim_port)
                marks["recovered"] = time.monotonic()
                results = [f.result(timeout=120) for f in futures]
            deadline = time.monotonic() + 5
            while "up" not in marks and time.monotonic() < deadline:
                time.sleep(0.05)
        finally:
            stop.set()
            router.terminate()
            router.wait(30)
            victim.terminate()
            victim.wait(30)
    counts = {k: results.count(k) for k in set(results)}
    print(f"\nchaos: {counts}; marked down {marks.get('down', 0) - marks['killed']:.2f}s after "
          f"the kill, up {marks.get('up', 0) - marks['recovered']:.2f}s after recovery")
    assert counts.get("ok", 0) == TOTAL // 2, counts
    assert set(counts) <= {"ok", "stream ok", "stream error event"}, counts
    assert marks["down"] - marks["killed"] < 3
    assert "up" in marks and marks["up"] - marks["recovered"] < 3
