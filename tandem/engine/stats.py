"""Counters and latency histograms the engine keeps; the server renders them for Prometheus."""
from __future__ import annotations

import bisect
import logging
import time
from collections import Counter
from typing import TYPE_CHECKING

from tandem.engine.request import Request

if TYPE_CHECKING:
    from tandem.engine.engine import LLMEngine

logger = logging.getLogger("tandem.stats")

LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                   5.0, 7.5, 10.0, 20.0, 40.0, 80.0)


class Histogram:
    def __init__(self, buckets: tuple[float, ...] = LATENCY_BUCKETS):
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)  # the last one is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1


class EngineStats:
    def __init__(self) -> None:
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.request_success_total: Counter[str] = Counter()
        self.time_to_first_token = Histogram()
        self.inter_token_latency = Histogram()
        self.e2e_request_latency = Histogram()

    def on_token(self, req: Request, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        if req.last_token_time is None:
            self.prompt_tokens_total += req.num_prompt_tokens
            self.time_to_first_token.observe(now - req.arrival_time)
        else:
            self.inter_token_latency.observe(now - req.last_token_time)
        req.last_token_time = now
        self.generation_tokens_total += 1

    def on_finish(self, req: Request, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self.request_success_total[req.status.value] += 1
        self.e2e_request_latency.observe(now - req.arrival_time)


class StatsLogger:
    """vLLM's periodic line: throughput since the last line, queue, KV usage, prefix hit rate.
    Quiet while the engine is idle and nothing changed."""

    def __init__(self, engine: LLMEngine, interval: float = 10.0):
        self.engine, self.interval = engine, interval
        self.last_time = time.monotonic()
        self.last = self._totals()

    def _totals(self) -> tuple[int, int, int, int]:
        s, sched = self.engine.stats, self.engine.scheduler
        return (s.prompt_tokens_total, s.generation_tokens_total, sched.prefix_cache_queries,
                sched.prefix_cache_hits)

    def maybe_log(self, now: float | None = None) -> str | None:
        now = time.monotonic() if now is None else now
        elapsed = now - self.last_time
        if elapsed < self.interval:
            return None
        totals = self._totals()
        (prompt, gen, queries, hits) = (a - b for a, b in zip(totals, self.last))
        self.last, self.last_time = totals, now
        sched = self.engine.scheduler
        if not (prompt or gen or queries or sched.running or sched.waiting):
            return None
        line = (f"prompt throughput {prompt / elapsed:.1f} tokens/s, generation throughput "
                f"{gen / elapsed:.1f} tokens/s, running {len(sched.running)}, waiting "
                f"{len(sched.waiting)}, KV cache usage {100 * self.engine.kv.usage:.1f}%, "
                f"prefix cache hit rate {100 * hits / max(queries, 1):.1f}% "
                f"({100 * totals[3] / max(totals[2], 1):.1f}% since start)")
        if self.engine.config.speculative_config is not None:
            drafts, accepted = sched.spec_draft_tokens, sched.spec_accepted_tokens
            line += (f", speculation since start: {accepted}/{drafts} proposed tokens accepted "
                     f"({100 * accepted / max(drafts, 1):.1f}%), "
                     f"{drafts / max(sched.spec_drafts, 1):.2f} tokens a proposal")
        tiers = self.engine.tiers
        if tiers is not None:
            t = tiers.stats
            line += (f", KV tiers since start: host {t.hits['host']} hits/{t.misses['host']} "
                     f"misses, store {t.hits['store']}/{t.misses['store']} blocks, "
                     f"{t.loaded_bytes.total() / 1e6:.1f} MB loaded, "
                     f"{sum(t.store_errors.values())} store errors, "
                     f"{sum(t.dropped.values())} values dropped, breaker {tiers.breaker_state}")
        logger.info(line)
        return line
