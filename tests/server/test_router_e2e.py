"""The router in front of two real `tandem serve` replicas, through the official client."""
from __future__ import annotations

import os
import subprocess
import sys

import httpx
import openai
import pytest
from server_utils import MODEL_NAME, free_port, start_server, wait_until_ready


@pytest.fixture(scope="module")
def router(smollm2_dir, server):
    # The session's shared server is one replica: one model load less for the suite.
    with start_server(smollm2_dir) as b:
        a = server
        port = free_port()
        proc = subprocess.Popen([sys.executable, "-m", "tandem.cli", "route", "--worker-urls",
                                 a.url, b.url, "--port", str(port), "--tokenizer", smollm2_dir],
                                env={**os.environ, "HF_HUB_OFFLINE": "1"})
        url = f"http://127.0.0.1:{port}"
        assert wait_until_ready(url, proc, timeout=30)
        try:
            yield url, (a, b)
        finally:
            proc.terminate()
            proc.wait(30)


def test_completions_and_streams_through_the_router(router):
    url, _ = router
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
    r = client.completions.create(model=MODEL_NAME, prompt="The capital of France is",
                                  max_tokens=5, temperature=0)
    assert r.choices[0].text
    chunks = list(client.chat.completions.create(
        model=MODEL_NAME, messages=[{"role": "user", "content": "Hi"}], max_tokens=5,
        temperature=0, stream=True))
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    text = httpx.get(f"{url}/metrics").text
    counts = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
              if line.startswith("tandem_router:replica_latency_seconds_count")]
    assert len(counts) == 2 and sum(counts) >= 2
    assert "tandem_router:replica_breaker_state" in text


def test_shared_prefix_lands_on_the_replica_holding_it(router):
    url, _ = router
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
    system = "You are a careful assistant who answers in one short sentence. " * 8
    for q in ("What is 2+2?", "Name a colour.", "Say hello.", "Pick a number."):
        client.chat.completions.create(model=MODEL_NAME, max_tokens=2, messages=[
            {"role": "system", "content": system}, {"role": "user", "content": q}])
    workers = httpx.get(f"{url}/workers").json()["workers"]
    counts = sorted(w["requests"] for w in workers)
    assert counts[-1] >= 4, workers  # all four on one replica
    assert all(w["tandem"] for w in workers)


def test_deleted_worker_drains_and_leaves(router):
    url, _ = router
    workers = httpx.get(f"{url}/workers").json()["workers"]
    gone = workers[0]["id"]
    assert httpx.delete(f"{url}/workers/{gone}").status_code == 200
    left = httpx.get(f"{url}/workers").json()["workers"]
    assert [w["id"] for w in left] == [w["id"] for w in workers[1:]]
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
    assert client.completions.create(model=MODEL_NAME, prompt="Hi", max_tokens=2).choices
