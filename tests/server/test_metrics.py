"""/metrics: every vLLM-named series is there, and the counters move by the right amounts."""
from __future__ import annotations

import uuid

from server_utils import MODEL_NAME, metrics, wait_idle

EOS_ID = 2

COUNTERS = ["prompt_tokens_total", "generation_tokens_total", "num_preemptions_total",
            "prefix_cache_queries_total", "prefix_cache_hits_total"]
GAUGES = ["kv_cache_capacity_tokens", "num_requests_running", "num_requests_waiting",
          "kv_cache_usage_perc"]
HISTOGRAMS = ["time_to_first_token_seconds", "inter_token_latency_seconds",
              "e2e_request_latency_seconds"]


def _delta(after: dict, before: dict, name: str) -> float:
    return after[f"tandem:{name}"] - before[f"tandem:{name}"]


def test_every_metric_is_exposed(http, url):
    http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 3})
    r = http.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    for name, kind in ([(n, "counter") for n in COUNTERS + ["request_success_total"]]
                       + [(n, "gauge") for n in GAUGES]
                       + [(n, "histogram") for n in HISTOGRAMS]):
        assert f"# TYPE tandem:{name} {kind}\n" in text, name
        assert f"# HELP tandem:{name} " in text, name
    assert f'model_name="{MODEL_NAME}"' in text
    m = metrics(url)
    for reason in ("stop", "length", "abort"):
        assert f'tandem:request_success_total{{finished_reason="{reason}"}}' in m
    for name in HISTOGRAMS:
        buckets = sorted(((float(k.split('le="')[1].rstrip('"}')), v) for k, v in m.items()
                          if k.startswith(f"tandem:{name}_bucket")))
        assert buckets[-1][0] == float("inf") and len(buckets) > 5
        counts = [v for _, v in buckets]
        assert counts == sorted(counts)  # cumulative
        assert counts[-1] == m[f"tandem:{name}_count"] > 0
        assert m[f"tandem:{name}_sum"] >= 0


def test_counters_count_exactly(http, url):
    before = wait_idle(url)
    assert before["tandem:num_requests_running"] == 0
    prompt = f"Metrics probe {uuid.uuid4().hex}: " + "one two three four five six seven " * 6
    n_prompt = http.post("/tokenize", json={"prompt": prompt}).json()["count"]
    assert n_prompt > 40
    body = {"prompt": prompt, "max_tokens": 7, "ignore_eos": True, "temperature": 0}
    r = http.post("/v1/completions", json=body)
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == n_prompt
    after = wait_idle(url)
    assert _delta(after, before, "generation_tokens_total") == 7
    assert _delta(after, before, "prompt_tokens_total") == n_prompt
    assert _delta(after, before, 'request_success_total{finished_reason="length"}') == 1
    assert _delta(after, before, 'request_success_total{finished_reason="stop"}') == 0
    assert _delta(after, before, "prefix_cache_queries_total") == n_prompt
    assert _delta(after, before, "prefix_cache_hits_total") == 0  # a prompt never seen
    assert _delta(after, before, "time_to_first_token_seconds_count") == 1
    assert _delta(after, before, "e2e_request_latency_seconds_count") == 1
    assert _delta(after, before, "inter_token_latency_seconds_count") == 6
    assert _delta(after, before, "num_preemptions_total") == 0

    # The same prompt again: its full blocks come from the prefix cache.
    again = http.post("/v1/completions", json=body)
    assert again.json()["choices"][0]["text"] == r.json()["choices"][0]["text"]
    third = wait_idle(url)
    hits = _delta(third, after, "prefix_cache_hits_total")
    assert 0 < hits < n_prompt and hits % 16 == 0  # whole blocks of the default 16 tokens
    assert _delta(third, after, "prefix_cache_queries_total") == n_prompt

    # Stopped by EOS at once: a "stop" finish, one generated token.
    stop = http.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5,
        "logit_bias": {str(EOS_ID): 100}})
    assert stop.json()["choices"][0]["finish_reason"] == "stop"
    fourth = wait_idle(url)
    assert _delta(fourth, third, 'request_success_total{finished_reason="stop"}') == 1
    assert _delta(fourth, third, "generation_tokens_total") == 1

    # n=2 streamed: every sequence's tokens count.
    with http.stream("POST", "/v1/completions", json={**body, "n": 2, "stream": True}) as s:
        s.read()
    fifth = wait_idle(url)
    assert _delta(fifth, fourth, "generation_tokens_total") == 14


def test_rejected_requests_do_not_count(http, url):
    before = wait_idle(url)
    assert http.post("/v1/completions", json={"prompt": "x", "temperature": -1}).status_code \
        == 400
    assert http.post("/v1/completions", json={"prompt": "x", "model": "nope"}).status_code \
        == 404
    after = wait_idle(url)
    for name in COUNTERS:
        assert _delta(after, before, name) == 0, name
