"""`tandem route` as a real process: SIGTERM drains (in-flight requests finish, new ones get
503) and the process exits 0."""
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
from test_app import BODY, replica

from tandem.procs import free_port, wait_until_ready

from fake_replicas import FakeReplicas  # isort: skip


def test_sigterm_drains_in_flight_requests_then_exits_0():
    with FakeReplicas({"a": replica(delay=1.5)}) as fake:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        proc = subprocess.Popen([sys.executable, "-m", "tandem.cli", "route", "--worker-urls",
                                 fake.urls["a"], "--port", str(port), "--shutdown-timeout", "10"],
                                env={**os.environ, "HF_HUB_OFFLINE": "1"})
        try:
            assert wait_until_ready(url, proc, timeout=60)
            got = {}
            t = threading.Thread(target=lambda: got.update(
                r=httpx.post(f"{url}/v1/completions", json=BODY, timeout=30)))
            t.start()
            while "/v1/completions" not in [p for _, p, _ in fake.requests]:
                time.sleep(0.02)
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.3)
            late = httpx.post(f"{url}/v1/completions", json=BODY, timeout=10)
            assert late.status_code == 503 and late.headers["retry-after"]
            assert httpx.get(f"{url}/ready", timeout=5).status_code == 503
            t.join(30)
            assert got["r"].status_code == 200, got["r"].text
            assert proc.wait(30) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
