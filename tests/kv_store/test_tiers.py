"""The KV tiers below the pool with the real model (float32 SmolLM2, unquantized weights), in
one process: an engine that writes its blocks through to a shared store (a file:// directory,
a real redis-server) lets another engine skip recomputing them, and it then answers exactly
as one that computed everything; fp8 blocks travel with their scales; blocks the pool evicts
come back from host memory. A corrupt value, another layout's value, a store that is slow or
dead: each costs hit rate and is counted, never a wrong token or a failed request.

Engines are module-scoped and shared by several tests, each on prompts of its own, so the
counters are compared before and after. The Redis tests run in file order: the last one kills
the module's redis-server."""
from __future__ import annotations

import shutil
from collections import Counter
from collections.abc import Callable, Iterator

import pytest
from kv_store_helpers import (
    BLOCK,
    BLOCK_BYTES,
    LONG_BLOCKS,
    POOL,
    Snapshot,
    assert_no_leak,
    chain,
    drain,
    evict_to_host,
    generate,
    metric,
    prompt,
    sleep_redis,
    wait_until,
)
from redis_service import RedisServer, need

from tandem import LLM
from tandem.config import EngineConfig
from tandem.engine.stats import StatsLogger
from tandem.server.metrics import render_metrics


@pytest.fixture(scope="module")
def engines(smollm2_dir) -> Iterator[Callable[..., LLM]]:
    """Builds engines for this module and shuts them all down at its end."""
    built: list[LLM] = []

    def make(**kw) -> LLM:
        args = {"dtype": "float32", "quantization": "none", "kv_cache_memory": POOL}
        llm = LLM(model=smollm2_dir, **(args | kw))
        built.append(llm)
        return llm

    yield make
    for llm in built:
        llm.shutdown()


class Reference:
    """An engine with no tiers; what it generates for a prompt is the answer."""

    def __init__(self, llm: LLM):
        self.llm, self.answers = llm, {}

    def tokens(self, ids: list[int]) -> list[int]:
        if tuple(ids) not in self.answers:
            tokens, cached = generate(self.llm, ids)
            assert cached == 0
            self.answers[tuple(ids)] = tokens
        return self.answers[tuple(ids)]


@pytest.fixture(scope="module")
def ref(engines) -> Reference:
    llm = engines()
    assert llm.engine.tiers is None
    return Reference(llm)


@pytest.fixture(scope="module")
def file_url(tmp_path_factory) -> str:
    return f"file://{tmp_path_factory.mktemp('kv-store')}"


@pytest.fixture(scope="module")
def file_writer(engines, file_url) -> LLM:
    return engines(kv_store=file_url, kv_store_write_through=True)


@pytest.fixture(scope="module")
def file_reader(engines, file_url) -> LLM:
    # A generous timeout: these tests are about what is loaded, not how fast.
    return engines(kv_store=file_url, kv_store_timeout=10)


@pytest.fixture(scope="module")
def fp8_writer(engines, file_url) -> LLM:
    return engines(kv_store=file_url, kv_store_write_through=True, kv_cache_dtype="fp8")


@pytest.fixture(scope="module")
def fp8_reader(engines, file_url) -> LLM:
    return engines(kv_store=file_url, kv_store_timeout=10, kv_cache_dtype="fp8")


@pytest.fixture(scope="module")
def redis_mod(tmp_path_factory) -> Iterator[RedisServer]:
    server = RedisServer(need("redis-server", "redis-server"),
                         str(tmp_path_factory.mktemp("redis")))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def redis_writer(engines, redis_mod) -> LLM:
    return engines(kv_store=redis_mod.url, kv_store_write_through=True)


@pytest.fixture(scope="module")
def redis_reader(engines, redis_mod) -> LLM:
    return engines(kv_store=redis_mod.url, kv_store_timeout=0.5)


def stored_values(llm: LLM, hashes: list[bytes]) -> list[bytes | None]:
    tiers = llm.engine.tiers
    return tiers.store.get_many([tiers.layout.key(h) for h in hashes])


def check_sharing(ref: Reference, writer: LLM, reader: LLM) -> None:
    ids = prompt(1000)
    want = ref.tokens(ids)
    got, cached = generate(writer, ids)
    assert got == want and cached == 0
    drain(writer)
    hashes = chain(ids)[:LONG_BLOCKS]
    values = stored_values(writer, hashes)
    assert all(v is not None for v in values)
    w = writer.engine.tiers.stats
    assert w.saved_bytes["store"] >= sum(map(len, values)) > LONG_BLOCKS * BLOCK_BYTES
    assert not w.store_errors and not w.writes_dropped
    # The writer tells the router's event stream which blocks any replica can now load.
    assert {h.hex() for h in hashes} <= set(writer.engine.kv.events.since(None)["shared"])

    before = Snapshot(reader)
    logger = StatsLogger(reader.engine, interval=0)
    got, cached = generate(reader, ids)
    assert got == want
    assert cached == LONG_BLOCKS * BLOCK
    assert before.delta("hits")["store"] == LONG_BLOCKS
    assert before.delta("misses")["store"] == 0
    assert before.delta("loaded_bytes")["store"] == sum(map(len, values))
    assert not +before.delta("dropped") and not +before.delta("store_errors")
    assert before.new_load_timeouts == 0
    assert reader.engine.tiers.stats.saved_bytes["store"] == 0  # no write-through, no eviction
    assert reader.engine.tiers.breaker_state == "closed"

    stats = reader.engine.tiers.stats
    text = render_metrics(reader.engine, "smollm2")
    label = 'model_name="smollm2"'
    assert metric(text, f'tandem:kv_tier_hit_blocks_total{{{label},tier="store"}}') \
        == stats.hits["store"] >= LONG_BLOCKS
    assert metric(text, f'tandem:kv_tier_loaded_bytes_total{{{label},tier="store"}}') \
        == stats.loaded_bytes["store"]
    assert metric(text, f"tandem:kv_store_breaker_state{{{label}}}") == 0
    assert metric(text, f'tandem:kv_store_errors_total{{{label},op="get"}}') == 0
    assert metric(text, f"tandem:kv_store_load_seconds_count{{{label}}}") >= 1
    line = logger.maybe_log()
    assert f"store {stats.hits['store']}/{stats.misses['store']} blocks" in line
    assert "breaker closed" in line
    assert_no_leak(writer, reader)


def test_file_store_write_through_lets_another_engine_skip_the_prompt(ref, file_writer,
                                                                      file_reader):
    check_sharing(ref, file_writer, file_reader)


def test_file_store_corrupt_value_is_dropped_and_recomputed(file_writer, file_reader):
    ids = prompt(2000)
    want, _ = generate(file_writer, ids)
    drain(file_writer)
    tiers = file_writer.engine.tiers
    path = tiers.store._path(tiers.layout.key(chain(ids)[5]))
    data = bytearray(path.read_bytes())
    data[-100] ^= 0x10  # one bit of the payload
    path.write_bytes(bytes(data))

    before = Snapshot(file_reader)
    got, cached = generate(file_reader, ids)
    assert got == want
    # The chain ends at the bad block: the 5 before it are loaded, the rest computed.
    assert before.delta("dropped") == Counter(checksum=1)
    assert before.delta("hits")["store"] == 5
    assert cached == 5 * BLOCK
    assert_no_leak(file_writer, file_reader)


def test_fp8_blocks_and_scales_are_shared(fp8_writer, fp8_reader, file_url):
    ids = prompt(3000)
    want, cached = generate(fp8_writer, ids)
    assert cached == 0
    drain(fp8_writer)
    before = Snapshot(fp8_reader)
    got, cached = generate(fp8_reader, ids)
    assert got == want
    assert cached == LONG_BLOCKS * BLOCK
    assert before.delta("hits")["store"] == LONG_BLOCKS
    # A float8 block is a quarter of a float32 one, plus a bfloat16 scale per token and head:
    # every byte the writer counts is in the store, under the fp8 layout's keys.
    layout = fp8_writer.engine.tiers.layout
    assert layout.dtype == "float8_e4m3fn" and layout.scale_dtype == "bfloat16"
    root = fp8_writer.engine.tiers.store.root
    files = [p for p in root.rglob("*") if p.is_file() and layout.fingerprint in p.name]
    saved = fp8_writer.engine.tiers.stats.saved_bytes["store"]
    assert len(files) >= LONG_BLOCKS and saved == sum(p.stat().st_size for p in files)
    assert 0.25 < saved / len(files) / BLOCK_BYTES < 0.27
    assert_no_leak(fp8_writer, fp8_reader)


def test_value_of_another_layout_is_dropped(file_writer, fp8_writer, fp8_reader):
    # A float32 engine's block sits under the key the fp8 engine reads (a copied or renamed
    # key): its header names the other layout, so it is refused, not reinterpreted.
    ids = prompt(4000)
    generate(file_writer, ids)
    drain(file_writer)
    h0 = chain(ids)[0]
    f32, fp8 = file_writer.engine.tiers, fp8_reader.engine.tiers
    assert f32.layout.fingerprint != fp8.layout.fingerprint
    dst = fp8.store._path(fp8.layout.key(h0))
    dst.parent.mkdir(exist_ok=True)
    shutil.copyfile(f32.store._path(f32.layout.key(h0)), dst)

    before = Snapshot(fp8_reader)
    got, cached = generate(fp8_reader, ids)
    assert before.delta("dropped") == Counter(layout=1)
    assert before.delta("hits")["store"] == 0 and cached == 0
    want, _ = generate(fp8_writer, ids)  # computes every block itself
    assert got == want
    assert_no_leak(file_writer, fp8_writer, fp8_reader)


def test_host_memory_brings_back_evicted_blocks(engines):
    llm = engines(kv_cache_memory=25 * BLOCK_BYTES, kv_host_memory="200MB")
    kv, tiers = llm.engine.kv, llm.engine.tiers
    assert kv.num_blocks == 25 and tiers.store is None
    assert tiers.host.num_blocks == 200_000_000 // BLOCK_BYTES
    p, q = prompt(5000), prompt(6000)
    first, cached = generate(llm, p)
    assert cached == 0
    in_pool = evict_to_host(llm, p, q)  # q has 20 blocks of its own
    assert tiers.stats.saved_bytes["host"] >= (LONG_BLOCKS - in_pool) * BLOCK_BYTES

    before = Snapshot(llm)
    again, cached = generate(llm, p)
    assert again == first
    assert before.delta("hits")["host"] == LONG_BLOCKS - in_pool
    assert before.delta("loaded_bytes")["host"] == (LONG_BLOCKS - in_pool) * BLOCK_BYTES
    assert cached == LONG_BLOCKS * BLOCK  # the whole prefix: pool and host together
    text = render_metrics(llm.engine, "smollm2")
    assert metric(text, 'tandem:kv_tier_hit_blocks_total{model_name="smollm2",tier="host"}') \
        == tiers.stats.hits["host"]
    assert metric(text, 'tandem:kv_host_blocks{model_name="smollm2",state="capacity"}') \
        == tiers.host.num_blocks
    assert "kv_store_breaker_state" not in text  # no store, no store metrics
    assert_no_leak(llm)


def test_redis_store_write_through_lets_another_engine_skip_the_prompt(ref, redis_writer,
                                                                       redis_reader):
    check_sharing(ref, redis_writer, redis_reader)


def test_slow_redis_store_costs_the_load_not_the_request(redis_mod, redis_writer,
                                                         redis_reader):
    ids = prompt(8000)
    want, _ = generate(redis_writer, ids)
    drain(redis_writer)
    before = Snapshot(redis_reader)
    sleeper = sleep_redis(redis_mod, 2)  # longer than the reader's 0.5 s timeout
    got, cached = generate(redis_reader, ids)
    assert got == want and cached == 0  # computed, not loaded
    sleeper.join(10)
    tiers = redis_reader.engine.tiers
    wait_until(lambda: before.new_load_timeouts + before.delta("store_errors")["get"] >= 1,
               "the abandoned load to be counted")
    assert before.delta("hits")["store"] == 0
    assert not tiers.loads

    # Once the store answers again, loads work again (and are not confused by the late reply).
    ids = prompt(9000)
    want, _ = generate(redis_writer, ids)
    drain(redis_writer)
    before = Snapshot(redis_reader)
    got, cached = generate(redis_reader, ids)
    assert got == want and cached == LONG_BLOCKS * BLOCK
    assert before.delta("hits")["store"] == LONG_BLOCKS
    assert tiers.breaker_state == "closed"
    assert_no_leak(redis_writer, redis_reader)


def test_dead_redis_store_costs_hit_rate_not_requests(ref, redis_mod, redis_reader):
    tiers = redis_reader.engine.tiers
    assert tiers.breaker_state == "closed"
    redis_mod.kill()
    before = Snapshot(redis_reader)
    prompts = [prompt(10_000 + 100 * i, 40) for i in range(4)]  # 2 full blocks each
    for i, ids in enumerate(prompts[:3]):
        got, cached = generate(redis_reader, ids)
        assert got == ref.tokens(ids) and cached == 0
        wait_until(lambda n=i + 1: before.delta("store_errors")["get"] == n,
                   f"get failure {i + 1} to be counted")
        assert tiers.breaker_state == ("open" if i == 2 else "closed")
    # Open: the store is not asked at all (no new errors), and the request is served.
    got, cached = generate(redis_reader, prompts[3])
    assert got == ref.tokens(prompts[3]) and cached == 0
    assert before.delta("store_errors") == Counter(get=3)
    assert before.delta("hits")["store"] == 0
    text = render_metrics(redis_reader.engine, "smollm2")
    assert metric(text, 'tandem:kv_store_breaker_state{model_name="smollm2"}') == 2
    assert metric(text, 'tandem:kv_store_errors_total{model_name="smollm2",op="get"}') \
        == tiers.stats.store_errors["get"]
    assert_no_leak(redis_reader)


@pytest.mark.parametrize("kwargs, field", [
    ({"kv_store_write_through": True}, "kv_store_write_through"),
    ({"kv_store": "file:///tmp/kv", "enable_prefix_caching": False}, "kv_store"),
    ({"kv_store": "file:///tmp/kv", "kv_store_timeout": 0}, "kv_store_timeout"),
    ({"kv_store": "file:///tmp/kv", "kv_store_timeout": 61}, "kv_store_timeout"),
    ({"kv_store": "file:///tmp/kv", "kv_store_timeout": "1"}, "kv_store_timeout"),
    ({"kv_host_memory": "lots"}, "kv_host_memory"),
    ({"kv_host_memory": -1}, "kv_host_memory"),
])
def test_config_rejects_tier_settings_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"^{field}: "):
        EngineConfig(**kwargs)


def test_tier_settings_that_are_off_build_no_tiers():
    for off in (0, "0"):
        assert EngineConfig(kv_host_memory=off).kv_host_memory == 0
    assert EngineConfig(kv_host_memory="1MiB").kv_host_memory == 1024**2


@pytest.fixture(scope="module")
def tiny_dir(tiny_gguf, tmp_path_factory) -> str:
    from tandem.loader.gguf import convert_gguf

    dest = str(tmp_path_factory.mktemp("tiny") / "hf")
    convert_gguf(tiny_gguf, dest)
    return dest


@pytest.mark.parametrize("kwargs, message", [
    ({"kv_store": "ftp://host/dir"}, r"^kv_store: unsupported scheme"),
    ({"kv_store": "file://host/dir"}, r"^kv_store: a file store is file:///"),
    ({"kv_host_memory": 1000}, r"^kv_host_memory: 1000 bytes hold no block"),
])
def test_engine_rejects_stores_and_host_memory_it_cannot_use(tiny_dir, kwargs, message):
    with pytest.raises(ValueError, match=message):
        LLM(model=tiny_dir, kv_cache_memory="16MiB", **kwargs)
