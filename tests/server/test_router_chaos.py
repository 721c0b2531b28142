"""Chaos: `serve -dp 2` and the session's shared server (added by POST /workers) are 3 real
replicas behind the router, under steady load. One of serve -dp's replicas is SIGKILLed mid-run
and its supervisor starts it again on the same port. Every non-streaming request succeeds,
every stream ends (completed, or with a clean error event), nothing hangs, and the router marks
the replica down within 3 s of the kill and up within 3 s of its recovery."""
from __future__ import annotations

import json
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from dp_utils import children_of, replica_url, serve_dp2, stop_dp
from server_utils import MODEL_NAME, wait_until_ready

pytestmark = pytest.mark.slow  # CI runs it; `make test SKIP_SLOW=1` skips it locally

TOTAL, CONCURRENCY = 150, 16


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


def test_router_survives_a_replica_dying_under_load(smollm2_dir, server, tmp_path):
    log = tmp_path / "serve.log"
    proc, url = serve_dp2(smollm2_dir, log)
    marks: dict[str, float] = {}
    stop = threading.Event()
    victim_url = ""

    def watch() -> None:  # when the router's view of the victim flips, and when it is back
        last = True
        while not stop.is_set():
            try:
                ws = httpx.get(f"{url}/workers", timeout=2).json()["workers"]
                healthy = next(w["healthy"] for w in ws if w["url"] == victim_url)
                if healthy != last:
                    marks["down" if not healthy else "up"] = time.monotonic()
                    last = healthy
                if ("killed" in marks and "recovered" not in marks and
                        httpx.get(f"{victim_url}/ready", timeout=1).status_code == 200):
                    marks["recovered"] = time.monotonic()
            except (httpx.HTTPError, StopIteration, ValueError):
                pass
            time.sleep(0.05)

    watcher = threading.Thread(target=watch)
    try:
        assert wait_until_ready(url, proc, timeout=180)
        # The shared server makes a third replica: one model load less for the suite.
        assert httpx.post(f"{url}/workers", json={"url": server.url}).status_code == 201
        victim = min(children_of(proc.pid))
        victim_url = replica_url(victim)
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
            os.kill(victim, signal.SIGKILL)
            marks["killed"] = time.monotonic()
            results = [f.result(timeout=120) for f in futures]
        deadline = time.monotonic() + 180  # the supervisor restarts it: a model load
        while "up" not in marks and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        stop.set()
        if watcher.is_alive():
            watcher.join()
        code = stop_dp(proc, set())
    counts = {k: results.count(k) for k in set(results)}
    print(f"\nchaos: {counts}; marked down {marks.get('down', 0) - marks['killed']:.2f}s after "
          f"the kill, up {marks.get('up', 0) - marks.get('recovered', 0):.2f}s after recovery")
    assert code == 0
    assert "died: killed by SIGKILL" in log.read_text()
    assert counts.get("ok", 0) == TOTAL // 2, counts
    assert set(counts) <= {"ok", "stream ok", "stream error event"}, counts
    assert marks["down"] - marks["killed"] < 3
    assert "recovered" in marks and "up" in marks and marks["up"] - marks["recovered"] < 3
