"""`tandem serve --data-parallel-size 2`: two replicas behind the router, one command. One start
(each model load costs 20-40 s here) covers serving, the supervisor bringing a SIGKILLed replica
back on its port while the other one serves, and SIGTERM stopping every replica, the restarted
one included."""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import httpx
import pytest
from dp_utils import children_of, replica_url, serve_dp2, stop_dp
from server_utils import MODEL_NAME, wait_until_ready

pytestmark = pytest.mark.slow  # CI runs it; `make test SKIP_SLOW=1` skips it locally


def complete(url: str) -> None:
    r = httpx.post(f"{url}/v1/completions", timeout=60,
                   json={"model": MODEL_NAME, "prompt": "Hello", "max_tokens": 3})
    assert r.status_code == 200 and r.json()["choices"][0]["text"], r.text


def test_dp2_serves_restarts_a_killed_replica_and_stops_them_all(smollm2_dir, tmp_path):
    log = tmp_path / "serve.log"
    proc, url = serve_dp2(smollm2_dir, log)
    children: set[int] = set()
    try:
        assert wait_until_ready(url, proc, timeout=180)
        ready = httpx.get(f"{url}/ready").json()
        assert ready == {"status": "ready", "replicas_up": 2, "replicas": 2}
        complete(url)
        children = children_of(proc.pid)
        assert len(children) == 2
        victim = min(children)
        victim_url = replica_url(victim)
        os.kill(victim, signal.SIGKILL)

        # Whichever notices first takes the victim out: a failed request opens its breaker, or
        # the probes mark it down (which holds its breaker open). The supervisor reaps it
        # within a poll and restarts it; the router keeps serving through the other meanwhile.
        seen_down = seen_reaped = seen_one_up = False
        deadline = time.monotonic() + 240
        while True:
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            ready = httpx.get(f"{url}/ready", timeout=5)
            assert ready.status_code == 200, ready.text
            workers = {w["url"]: w for w in httpx.get(f"{url}/workers").json()["workers"]}
            victim_state = workers[victim_url]
            seen_one_up |= ready.json() == {"status": "ready", "replicas_up": 1, "replicas": 2}
            if not victim_state["healthy"]:
                assert victim_state["breaker"] == "open", victim_state
                seen_down = True
            seen_reaped |= not Path(f"/proc/{victim}").exists()  # not left a zombie
            complete(url)
            restarted = children_of(proc.pid) - children
            if (seen_down and seen_reaped and seen_one_up and restarted
                    and all(w["healthy"] for w in workers.values())):
                break
            time.sleep(0.5)
        assert workers[victim_url]["breaker"] == "closed"
        assert "died: killed by SIGKILL; restarting in 1s" in log.read_text()
        children |= restarted
        complete(url)
    finally:
        code = stop_dp(proc, children)
    assert code == 0
    for c in children:  # gone (or a zombie until init reaps it)
        stat = Path(f"/proc/{c}/stat")
        assert not stat.exists() or stat.read_text().split()[2] == "Z"
