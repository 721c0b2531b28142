"""The periodic stats line: throughput over the interval, queue, KV usage, prefix hit rate."""
import re
import time

from tandem import LLM, SamplingParams
from tandem.engine.stats import StatsLogger

PROMPT = {"prompt_token_ids": [(3 * j) % 200 + 7 for j in range(40)]}


def test_line_reports_the_interval_and_is_quiet_when_idle(tiny_dir, caplog):
    llm = LLM(model=tiny_dir, dtype="float32", kv_cache_memory=2**20)
    stats = StatsLogger(llm.engine, interval=10.0)
    t0 = stats.last_time
    assert stats.maybe_log(t0 + 5) is None  # too soon
    assert stats.maybe_log(t0 + 10) is None  # nothing happened
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    llm.generate([PROMPT], params)
    llm.generate([PROMPT], params)  # 32 of its 40 prompt tokens hit the cache
    with caplog.at_level("INFO", logger="tandem.stats"):
        line = stats.maybe_log(t0 + 20)
    assert line is not None and line in caplog.text
    assert "prompt throughput 8.0 tokens/s" in line  # 80 prompt tokens over 10 s
    assert "generation throughput 1.0 tokens/s" in line
    assert re.search(r"running 0, waiting 0, KV cache usage 0\.0%", line)
    assert "prefix cache hit rate 40.0% (40.0% since start)" in line  # 32 of 80 looked up
    assert stats.maybe_log(t0 + 30) is None


def test_async_engine_logs_while_busy(tiny_dir, caplog):
    import asyncio

    from tandem.config import EngineConfig
    from tandem.engine.async_engine import AsyncEngine

    engine = AsyncEngine(EngineConfig(model=tiny_dir, dtype="float32", kv_cache_memory=2**20),
                         log_stats_interval=1e-6)
    try:
        async def main():
            params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
            async for _ in engine.generate(PROMPT["prompt_token_ids"], params, "x"):
                pass

        with caplog.at_level("INFO", logger="tandem.stats"):
            asyncio.run(main())
            time.sleep(0.1)
        assert "generation throughput" in caplog.text
    finally:
        engine.shutdown()
