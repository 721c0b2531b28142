"""The server's view of its KV cache: the block-hash event stream a router follows, and the
token capacity an fp8 cache buys at the same --kv-cache-memory."""
from __future__ import annotations

import re

import httpx
import pytest
import torch
from server_utils import MODEL_NAME, assert_error, metrics, model_dtype, start_server

from tandem.config import fast_bf16
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


@pytest.mark.dtype_sensitive
def test_auto_dtype_is_bfloat16_exactly_where_the_cpu_computes_it(auto_server):
    """The rule, not this machine's outcome: TANDEM_CPU_BF16 (inherited by the server) or the
    cpuinfo probe decides, and the KV cache follows the model dtype."""
    want = "bfloat16" if fast_bf16(torch.device("cpu")) else "float32"
    assert model_dtype(auto_server) == want
    assert f'tandem:kv_cache_capacity_tokens{{kv_cache_dtype="{want}"}}' in metrics(
        auto_server.url)


@pytest.mark.dtype_sensitive
def test_fp8_server_holds_more_tokens_by_its_bytes_per_token_and_serves(smollm2_dir,
                                                                        auto_server):
    base = metrics(auto_server.url)
    [(key, tokens)] = [(k, v) for k, v in base.items()
                       if k.startswith("tandem:kv_cache_capacity_tokens")]
    # `auto` is the model dtype, which depends on the CPU (config.fast_bf16): the expected gain
    # follows from the dtype the server reports. SmolLM2's head_dim is 64; a float8 token
    # stores 64 bytes per head plus its 2-byte bfloat16 scale (3.88x float32, 1.94x bfloat16).
    base_dtype = re.fullmatch(r'.*kv_cache_dtype="(\w+)"}', key).group(1)
    head_dim, element = 64, {"float32": 4, "bfloat16": 2, "float16": 2}[base_dtype]
    expected = element * head_dim / (head_dim + 2)
    with start_server(smollm2_dir, "--kv-cache-dtype", "fp8_e4m3") as fp8:
        m = metrics(fp8.url)
        fp8_tokens = m['tandem:kv_cache_capacity_tokens{kv_cache_dtype="float8_e4m3fn"}']
        # within one block per layer pool of the exact ratio (capacities round down to blocks)
        assert 0.99 * expected * tokens <= fp8_tokens <= 1.01 * expected * tokens, (
            base_dtype, tokens, fp8_tokens)
        logged = re.search(r"kv_capacity_tokens=(\d+) kv_cache_dtype=float8_e4m3fn", fp8.log())
        assert logged and int(logged.group(1)) == fp8_tokens
        r = httpx.post(f"{fp8.url}/v1/chat/completions", timeout=120, json={
            "model": MODEL_NAME, "max_tokens": 8, "temperature": 0,
            "messages": [{"role": "user", "content": "What is the capital of France?"}]})
        assert r.status_code == 200 and "Paris" in r.json()["choices"][0]["message"]["content"]
