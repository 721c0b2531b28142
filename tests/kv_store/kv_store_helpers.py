"""Shared by this folder's tests."""
from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable

import redis
from redis_service import RedisServer

from tandem import LLM, SamplingParams
from tandem.engine.kv_cache import hash_block


def sleep_redis(server: RedisServer, seconds: int) -> threading.Thread:
    """Block the whole redis-server for `seconds` (DEBUG SLEEP) from a thread; returns the
    thread once the server is asleep (a probe's PING times out), so a call made next is
    certain to find it unresponsive."""
    thread = threading.Thread(target=lambda: server.client().execute_command(
        "DEBUG", "SLEEP", str(seconds)), daemon=True)
    thread.start()
    probe = redis.Redis(port=server.port, socket_timeout=0.1, retry=None)
    try:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                probe.ping()
            except redis.TimeoutError:
                return thread
            time.sleep(0.02)
    finally:
        probe.close()
    raise AssertionError("redis-server never went to sleep")


BLOCK = 16
BLOCK_BYTES = 737_280  # one float32 SmolLM2 block: 2 x 30 layers x 3 KV heads x 16 x 64 x 4
POOL = 100 * BLOCK_BYTES  # room for every prompt a module engine sees: nothing is evicted
LONG = 300
LONG_BLOCKS = (LONG - 1) // BLOCK  # the last prompt token is always recomputed: 18 blocks
PARAMS = SamplingParams(max_tokens=8, temperature=0)
COUNTERS = ("hits", "misses", "loaded_bytes", "saved_bytes", "store_errors", "dropped")


def prompt(start: int, n: int = LONG) -> list[int]:
    return list(range(start, start + n))


def chain(ids: list[int]) -> list[bytes]:
    """The hashes of the prompt's full blocks, as every engine computes them."""
    hashes: list[bytes] = []
    for i in range(len(ids) // BLOCK):
        hashes.append(hash_block(hashes[-1] if hashes else None, ids[i * BLOCK:(i + 1) * BLOCK]))
    return hashes


def generate(llm: LLM, ids: list[int]) -> tuple[list[int], int]:
    out = llm.generate([{"prompt_token_ids": ids}], PARAMS)[0]
    assert out.finished
    return list(out.outputs[0].token_ids), out.num_cached_tokens


def wait_until(cond: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def drain(llm: LLM) -> None:
    """Writes to the store are asynchronous: wait until every queued block is written (a
    second engine must find them, and the writer's counters must be final)."""
    tiers = llm.engine.tiers
    wait_until(lambda: tiers._pending_bytes == 0, "the store writes")


class Snapshot:
    """An engine's tier counters now, to compare with later."""

    def __init__(self, llm: LLM):
        self.llm = llm
        t = llm.engine.tiers.stats
        self.counts = {name: Counter(getattr(t, name)) for name in COUNTERS}
        self.load_timeouts, self.writes_dropped = t.load_timeouts, t.writes_dropped

    def delta(self, name: str) -> Counter:
        now = Counter(getattr(self.llm.engine.tiers.stats, name))
        now.subtract(self.counts[name])
        return now

    @property
    def new_load_timeouts(self) -> int:
        return self.llm.engine.tiers.stats.load_timeouts - self.load_timeouts


def assert_no_leak(*llms: LLM) -> None:
    for llm in llms:
        kv = llm.engine.kv
        assert not llm.engine.has_unfinished_requests()
        assert kv.num_free_blocks == kv.num_blocks, "a KV block is still referenced"
        assert all(r == 0 for r in kv.ref_counts)
        assert not llm.engine.tiers.loads if llm.engine.tiers else True


def metric(text: str, sample: str) -> float:
    for line in text.splitlines():
        if line.startswith(sample + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{sample} not in the metrics")


def evict_to_host(llm: LLM, p: list[int], q: list[int]) -> int:
    """After `p`, run `q` through a pool too small for both: most of p's blocks go to host
    memory. How many of p's leading blocks are still in the pool."""
    kv, tiers = llm.engine.kv, llm.engine.tiers
    generate(llm, q)
    hashes = chain(p)[:LONG_BLOCKS]
    in_pool = 0
    while in_pool < len(hashes) and hashes[in_pool] in kv.cached:
        in_pool += 1
    assert in_pool < LONG_BLOCKS - 5
    assert all(h in tiers.host for h in hashes[in_pool:])
    return in_pool
