"""The server's view of its KV cache: the block-hash event stream a router follows, and the
token capacity an fp8 cache buys at the same --kv-cache-memory."""
from __future__ import annotations

import re

import httpx
from server_utils import MODEL_NAME, assert_error, metrics, start_server

from tandem.engine.kv_cache import hash_block

PROMPT_IDS = [(37 * j) % 4000 + 1000 for j in range(40)]  # unlike any other test's prompt


def test_kv_events_name_the_blocks_a_request_cached(http):
    before = http.get("/kv/events").json()
    assert before["block_size"] == 16 and before["hash"] == "sha256:tandem/kv-block/v1"
    assert isinstance(before["snapshot"], list)  # no `since`: the whole cache
    r = http.post("/v1/completions", json={"prompt": PROMPT_IDS, "max_tokens": 2})
    assert r.status_code == 200, r.text
    after = http.get("/kv/events", params={"since": before["seq"]}).json()
    assert after["instance"] == before["instance"] and after["seq"] > before["seq"]
    stored = [e["hash"] for e in after["events"] if e["type"] == "stored"]
    # A router computes the same chain from the prompt's token ids.
    first = hash_block(None, PROMPT_IDS[:16])
    expected = [first.hex(), hash_block(first, PROMPT_IDS[16:32]).hex()]
    assert stored[:2] == expected, after
    assert set(expected) <= set(http.get("/kv/events").json()["snapshot"])


def test_kv_events_rejects_a_bad_since(http):
    assert_error(http.get("/kv/events", params={"since": -1}), 400, param="since")
    assert_error(http.get("/kv/events", params={"since": "x"}), 400, param="since")


def test_fp8_server_holds_3_8x_the_tokens_and_serves(smollm2_dir, server):
    base = metrics(server.url)
    [(key, tokens)] = [(k, v) for k, v in base.items()
                       if k.startswith("tandem:kv_cache_capacity_tokens")]
    assert 'kv_cache_dtype="float32"' in key
    with start_server(smollm2_dir, "--kv-cache-dtype", "fp8_e4m3") as fp8:
        m = metrics(fp8.url)
        fp8_tokens = m['tandem:kv_cache_capacity_tokens{kv_cache_dtype="float8_e4m3fn"}']
        assert fp8_tokens >= 3.8 * tokens
        logged = re.search(r"kv_capacity_tokens=(\d+) kv_cache_dtype=float8_e4m3fn", fp8.log())
        assert logged and int(logged.group(1)) == fp8_tokens
        r = httpx.post(f"{fp8.url}/v1/chat/completions", timeout=120, json={
            "model": MODEL_NAME, "max_tokens": 8, "temperature": 0,
            "messages": [{"role": "user", "content": "What is the capital of France?"}]})
        assert r.status_code == 200 and "Paris" in r.json()["choices"][0]["message"]["content"]
