"""Counters and latency histograms the engine keeps; the server renders them for Prometheus."""
from __future__ import annotations

import bisect
import time
from collections import Counter

from tandem.engine.request import Request

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
