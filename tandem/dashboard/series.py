"""The last minutes of a few counters, as the status page charts them: cumulative samples taken
every `interval` seconds, turned into per-interval rates and means."""
from __future__ import annotations

import asyncio
import itertools
import time
from collections import deque
from collections.abc import Callable

# What every source counts (cumulative): requests finished or routed, tokens generated, and the
# sums and counts of the time-to-first-token and inter-token-latency histograms.
COUNTERS = ("requests", "tokens", "ttft_sum", "ttft_count", "itl_sum", "itl_count")


class Series:
    def __init__(self, read: Callable[[], dict[str, float]], interval: float = 5.0,
                 keep: int = 72):
        self.read, self.interval = read, interval
        self.samples: deque[tuple[float, dict[str, float]]] = deque(maxlen=keep + 1)

    def sample(self, now: float | None = None) -> None:
        self.samples.append((time.time() if now is None else now, self.read()))

    async def run(self) -> None:
        """Sample every `interval` until cancelled (a task of the app's lifespan)."""
        while True:
            self.sample()
            await asyncio.sleep(self.interval)

    def points(self) -> dict[str, list]:
        """Per interval: its end (unix s), requests/s, tokens/s, mean TTFT and ITL (ms; None
        where the interval had none)."""
        out: dict[str, list] = {"t": [], "request_rate": [], "token_rate": [], "ttft_ms": [],
                                "itl_ms": []}
        samples = list(self.samples)
        for (t0, a), (t1, b) in itertools.pairwise(samples):
            d = {k: max(0.0, b.get(k, 0.0) - a.get(k, 0.0)) for k in COUNTERS}
            span = max(t1 - t0, 1e-9)
            out["t"].append(round(t1, 3))
            out["request_rate"].append(round(d["requests"] / span, 3))
            out["token_rate"].append(round(d["tokens"] / span, 2))
            for name in ("ttft", "itl"):
                n = d[f"{name}_count"]
                out[f"{name}_ms"].append(round(1000 * d[f"{name}_sum"] / n, 2) if n else None)
        return out
