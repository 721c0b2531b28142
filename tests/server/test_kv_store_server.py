"""The shared KV store end to end: real `tandem serve` replicas and a real redis-server (or a
file:// directory). A prompt one replica computed and wrote through to the store is loaded by
another replica, which then answers exactly as the writer did; a corrupt value is dropped; and
a store that dies or cannot be written costs hit rate, never a request, while the circuit
breaker opens and, once the store is back, closes again."""
from __future__ import annotations

import json
import os
import random
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

import httpx
import pytest
from redis_service import RedisServer, need
from server_utils import MODEL_NAME, Server, metrics, start_server

from tandem.engine.kv_cache import hash_block

BLOCK = 16
LONG = 1500  # prompt tokens of the sharing tests
LONG_BLOCKS = (LONG - 1) // BLOCK  # the last prompt token is always recomputed: 93 blocks
F32 = ("--dtype", "float32", "--quantization", "none")
# A reader waits for a load no longer than --kv-store-timeout (1 s by default): ~70 MB of
# float32 blocks on a busy CI machine may take longer, and these tests are about what is
# loaded, not how fast. The writer keeps the default.
READER = ("--kv-store-timeout", "10")

HITS = 'tandem:kv_tier_hit_blocks_total{tier="store"}'
LOADED = 'tandem:kv_tier_loaded_bytes_total{tier="store"}'
SAVED = 'tandem:kv_tier_saved_bytes_total{tier="store"}'
PREFIX_HITS = "tandem:prefix_cache_hits_total"
GET_ERRORS = 'tandem:kv_store_errors_total{op="get"}'
PUT_ERRORS = 'tandem:kv_store_errors_total{op="put"}'
CHECKSUM_DROPS = 'tandem:kv_store_dropped_blocks_total{reason="checksum"}'
BREAKER = "tandem:kv_store_breaker_state"
TIMEOUTS = "tandem:kv_store_load_timeouts_total"


def prompt_ids(seed: int, n: int) -> list[int]:
    """n ordinary (non-special) token ids, a different sequence for every seed."""
    rng = random.Random(seed)
    return [rng.randrange(1000, 40000) for _ in range(n)]


def chain(ids: list[int]) -> list[str]:
    """The hex block hashes of the prompt's blocks a replica looks up (no cache_salt)."""
    hashes: list[bytes] = []
    for i in range((len(ids) - 1) // BLOCK):
        hashes.append(hash_block(hashes[-1] if hashes else None, ids[i * BLOCK:(i + 1) * BLOCK]))
    return [h.hex() for h in hashes]


def complete(url: str, ids: list[int], max_tokens: int = 8) -> dict:
    r = httpx.post(f"{url}/v1/completions", timeout=120, json={
        "model": MODEL_NAME, "prompt": ids, "max_tokens": max_tokens, "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["usage"]["prompt_tokens"] == len(ids), body
    assert body["usage"]["completion_tokens"] >= 1, body
    return body


def answer(body: dict) -> tuple[str, str, int]:
    choice = body["choices"][0]
    return choice["text"], choice["finish_reason"], body["usage"]["completion_tokens"]


def poll(check: Callable[[], bool], timeout: float, what: Callable[[], str],
         interval: float = 0.05) -> None:
    """Until check() is true; fails naming `what()` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"not within {timeout:.0f} s: {what()}")
        time.sleep(interval)


def shared(url: str) -> set[str]:
    """Hashes the replica says it wrote to the store (its /kv/events snapshot)."""
    r = httpx.get(f"{url}/kv/events", timeout=30)
    assert r.status_code == 200, r.text
    return set(r.json()["shared"])


def tier_metrics(url: str) -> dict[str, float]:
    return {k: v for k, v in metrics(url).items() if "kv_store" in k or "kv_tier" in k}


def wait_shared(writer: Server, hashes: list[str], timeout: float = 60.0) -> None:
    poll(lambda: set(hashes) <= shared(writer.url), timeout,
         lambda: f"{len(set(hashes) - shared(writer.url))} of {len(hashes)} blocks not shared; "
                 f"writer: {tier_metrics(writer.url)}", interval=0.1)


def block_payload(model_dir: str, kv_itemsize: int, scale_itemsize: int = 0) -> int:
    """Bytes of one block's K/V (and float8 scales) across the model."""
    with open(os.path.join(model_dir, "config.json")) as f:
        c = json.load(f)
    head_dim = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
    tokens = 2 * c["num_hidden_layers"] * c["num_key_value_heads"] * BLOCK  # K and V
    return tokens * (head_dim * kv_itemsize + scale_itemsize)


def delta(before: dict[str, float], after: dict[str, float], key: str) -> float:
    return after[key] - before[key]


@pytest.fixture(scope="module")
def redis_store(tmp_path_factory) -> Iterator[RedisServer]:
    """One Redis for the module's replicas (the chaos test kills and restarts it, empty)."""
    server = RedisServer(need("redis-server", "redis-server"),
                         str(tmp_path_factory.mktemp("redis")))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def writer(smollm2_dir, redis_store) -> Iterator[Server]:
    """Replica A: writes every block it computes to the store."""
    with start_server(smollm2_dir, *F32, "--kv-store", redis_store.url,
                      "--kv-store-write-through") as s:
        yield s


@pytest.fixture(scope="module")
def reader(smollm2_dir, redis_store) -> Iterator[Server]:
    """Replica B: loads from the store; writes only what its pool evicts."""
    with start_server(smollm2_dir, *F32, "--kv-store", redis_store.url, *READER) as s:
        yield s


def check_shared_prompt(writer: Server, reader: Server, ids: list[int], payload: int) -> None:
    """The writer computes `ids`; once it has shared the prompt's blocks the reader loads all
    of them from the store and answers exactly as the writer did."""
    computed = complete(writer.url, ids)
    wait_shared(writer, chain(ids))
    saved = metrics(writer.url)[SAVED]
    assert saved >= LONG_BLOCKS * payload, (saved, LONG_BLOCKS, payload)

    before = metrics(reader.url)
    loaded = complete(reader.url, ids)
    after = metrics(reader.url)
    stats = {k: (before[k], after[k]) for k in after if "kv_store" in k or "kv_tier" in k}
    assert delta(before, after, HITS) == LONG_BLOCKS, stats
    assert delta(before, after, PREFIX_HITS) == LONG_BLOCKS * BLOCK, (
        before[PREFIX_HITS], after[PREFIX_HITS], stats)
    # each value is the block's raw tensors plus a header under 4 KiB
    assert LONG_BLOCKS * payload < delta(before, after, LOADED) \
        < LONG_BLOCKS * (payload + 4096), stats
    assert delta(before, after, TIMEOUTS) == 0, stats
    assert after[GET_ERRORS] == after[PUT_ERRORS] == 0, stats
    assert after[BREAKER] == 0, stats
    assert answer(loaded) == answer(computed), (loaded, computed)


def test_a_replica_answers_from_blocks_another_wrote_to_redis(smollm2_dir, writer, reader):
    ids = prompt_ids(1, LONG)
    check_shared_prompt(writer, reader, ids, block_payload(smollm2_dir, 4))


def test_a_corrupt_value_in_redis_is_dropped_and_the_answer_recomputed(writer, reader,
                                                                      redis_store):
    ids = prompt_ids(2, 400)
    hashes = chain(ids)
    computed = complete(writer.url, ids)
    wait_shared(writer, hashes)
    client = redis_store.client()
    try:
        [key] = client.keys(f"tandem:kv:*:{hashes[0]}")
        value = client.get(key)
        # the last byte belongs to the payload, after the header: only the CRC can tell
        client.set(key, value[:-1] + bytes([value[-1] ^ 0x5A]))
        assert client.get(key) != value
    finally:
        client.close()

    before = metrics(reader.url)
    loaded = complete(reader.url, ids)
    # The request may stop waiting for a slow load; the check still happens, and is counted.
    poll(lambda: metrics(reader.url)[CHECKSUM_DROPS] > before[CHECKSUM_DROPS], 30,
         lambda: f"no checksum drop counted: {metrics(reader.url)}")
    after = metrics(reader.url)
    assert delta(before, after, CHECKSUM_DROPS) == 1, after  # the chain ends at the bad block
    assert delta(before, after, HITS) == 0, after
    assert delta(before, after, PREFIX_HITS) == 0, after  # every token recomputed
    assert after[GET_ERRORS] == 0 and after[BREAKER] == 0, after  # a bad value is no outage
    assert answer(loaded) == answer(computed), (loaded, computed)


def test_fp8_blocks_are_shared_through_a_file_store(smollm2_dir, tmp_path):
    """float8 K/V with its per-token scales, through file:///dir: the reader answers exactly as
    the float8 replica that computed the prompt."""
    store = f"file://{tmp_path / 'kv'}"
    fp8 = (*F32, "--kv-cache-dtype", "fp8", "--kv-store", store)
    with start_server(smollm2_dir, *fp8, "--kv-store-write-through") as a, \
            start_server(smollm2_dir, *fp8, *READER) as b:
        ids = prompt_ids(3, LONG)
        # 1-byte float8 values, a 2-byte bfloat16 scale per token and KV head
        check_shared_prompt(a, b, ids, block_payload(smollm2_dir, 1, 2))
    assert any((tmp_path / "kv").rglob(f"*{chain(ids)[0]}")), "no file for the first block"


def test_a_file_store_that_cannot_be_written_costs_no_request(smollm2_dir, tmp_path):
    """Every fan-out subdirectory name of the store is taken by a regular file, so every write
    (and read) fails with ENOTDIR, whoever runs the test: requests still succeed, put errors are
    counted and the breaker opens."""
    root = tmp_path / "kv"
    root.mkdir()
    names = sorted(f"{i:02x}" for i in range(256))
    for name in names:
        (root / name).write_bytes(b"")
    with start_server(smollm2_dir, *F32, "--kv-store", f"file://{root}",
                      "--kv-store-write-through") as s:
        # Each request is one failed read of its prompt's blocks and one failed write of the
        # step's 12 blocks (one store call): three failures in a row open the breaker, which
        # stays open 5 s, so the second request's write is the third failure.
        for seed in (4, 6):
            complete(s.url, prompt_ids(seed, 200), max_tokens=4)
        poll(lambda: metrics(s.url)[BREAKER] == 2, 30,
             lambda: f"breaker never open: {metrics(s.url)}")
        m = metrics(s.url)
        assert m[PUT_ERRORS] >= 1, m
        assert m[PUT_ERRORS] + m[GET_ERRORS] >= 3, m
        complete(s.url, prompt_ids(5, 200), max_tokens=4)  # the store is skipped now
        log = s.log()
    assert "circuit breaker open" in log, log[-3000:]
    assert sorted(os.listdir(root)) == names  # nothing written, no temporary file left


@pytest.mark.slow
def test_redis_dying_under_load_costs_no_request_and_the_breaker_recovers(reader,
                                                                          redis_store):
    """Redis is SIGKILLed while the reader serves concurrent requests whose prompts it looks up
    in the store: every request still succeeds, the failures open the breaker, and after Redis
    comes back (empty) the breaker closes again."""
    seeds = iter(range(1000, 2000))

    def one() -> int:  # a distinct 96-token prompt: 5 full blocks to look up
        r = httpx.post(f"{reader.url}/v1/completions", timeout=120, json={
            "model": MODEL_NAME, "prompt": prompt_ids(next(seeds), 96), "max_tokens": 4,
            "temperature": 0})
        return r.status_code if r.status_code == 200 else f"{r.status_code} {r.text[:300]}"

    before = metrics(reader.url)
    assert before[BREAKER] == 0, before
    statuses = []
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(one) for _ in range(8)]
        wait(futures, timeout=120, return_when=FIRST_COMPLETED)
        redis_store.kill()
        statuses += [f.result(timeout=120) for f in futures]

    def breaker_is(code: int) -> Callable[[], bool]:
        def check() -> bool:
            statuses.append(one())  # keep the reader looking things up, every ~0.5 s
            return metrics(reader.url)[BREAKER] == code
        return check

    poll(breaker_is(2), 60, lambda: f"breaker never open: {metrics(reader.url)}", 0.5)
    opened = metrics(reader.url)
    assert opened[GET_ERRORS] + opened[PUT_ERRORS] > before[GET_ERRORS] + before[PUT_ERRORS]

    redis_store.start()
    poll(breaker_is(0), 30, lambda: f"breaker never closed again: {metrics(reader.url)}", 0.5)
    assert statuses == [200] * len(statuses), statuses
    log = reader.log()
    assert "circuit breaker open" in log, log[-3000:]
    assert "circuit breaker closed" in log, log[-3000:]
