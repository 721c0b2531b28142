"""`tandem serve --data-parallel-size 2`: two replicas behind the router, one command."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
from server_utils import MODEL_NAME, free_port, wait_until_ready


def test_dp2_serves_through_its_router_and_stops_its_replicas(smollm2_dir):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "tandem.cli", "serve", "--model", smollm2_dir,
                             "--served-model-name", MODEL_NAME, "--kv-cache-memory", "96MiB",
                             "-dp", "2", "--port", str(port), "--shutdown-timeout", "5"],
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        assert wait_until_ready(url, proc, timeout=180)
        workers = httpx.get(f"{url}/workers").json()["workers"]
        assert len(workers) == 2 and all(w["healthy"] for w in workers)
        r = httpx.post(f"{url}/v1/completions", timeout=60,
                       json={"model": MODEL_NAME, "prompt": "Hello", "max_tokens": 3})
        assert r.status_code == 200 and r.json()["choices"][0]["text"]
        children = [int(c) for t in os.listdir(f"/proc/{proc.pid}/task")
                    for c in Path(f"/proc/{proc.pid}/task/{t}/children").read_text().split()]
        assert len(children) == 2
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    for c in children:  # gone (or a zombie until init reaps it)
        stat = Path(f"/proc/{c}/stat")
        assert not stat.exists() or stat.read_text().split()[2] == "Z"
