"""Per-request timings -> the summary `tandem bench serve` prints and saves, under vLLM's
`bench serve` key names, so existing dashboards and scripts read it."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

PERCENTILES = (50, 90, 99)
GOODPUT_KEYS = {"ttft": "ttft_ms", "tpot": "tpot_ms", "e2el": "e2el_ms"}


@dataclass
class RequestResult:
    prompt_len: int
    success: bool = False
    output_tokens: int = 0
    ttft: float = 0.0  # seconds from the send to the first token
    latency: float = 0.0  # seconds from the send to the last byte
    itl: list[float] = field(default_factory=list)  # gaps between token-bearing chunks
    start: float = 0.0  # seconds since the benchmark began
    token_times: list[float] = field(default_factory=list)  # arrival of each chunk's tokens
    error: str = ""
    text: str = ""

    @property
    def tpot(self) -> float | None:
        return ((self.latency - self.ttft) / (self.output_tokens - 1)
                if self.output_tokens > 1 else None)


def parse_goodput(specs: list[str]) -> dict[str, float]:
    """["ttft:200", "tpot:50"] -> {"ttft": 200.0, "tpot": 50.0} (milliseconds)."""
    out = {}
    for s in specs:
        name, _, value = s.partition(":")
        if name not in GOODPUT_KEYS:
            raise ValueError(f"goodput: {name!r} is not one of {', '.join(GOODPUT_KEYS)}")
        try:
            out[name] = float(value)
        except ValueError:
            raise ValueError(f"goodput: {s!r} is not NAME:MILLISECONDS") from None
        if out[name] <= 0:
            raise ValueError(f"goodput: {s!r} must be positive")
    return out


def _stats(name: str, values_s: list[float]) -> dict[str, float]:
    ms = np.array(values_s, dtype=float) * 1e3 if values_s else np.zeros(1)
    out = {f"mean_{name}_ms": float(ms.mean()), f"median_{name}_ms": float(np.median(ms)),
           f"std_{name}_ms": float(ms.std())}
    for p in PERCENTILES:
        out[f"p{p}_{name}_ms"] = float(np.percentile(ms, p))
    return out


def summarize(results: list[RequestResult], duration: float,
              goodput: dict[str, float] | None = None) -> dict:
    ok = [r for r in results if r.success]
    total_in = sum(r.prompt_len for r in ok)
    total_out = sum(r.output_tokens for r in ok)
    out = {
        "duration": duration, "completed": len(ok), "failed": len(results) - len(ok),
        "total_input_tokens": total_in, "total_output_tokens": total_out,
        "request_throughput": len(ok) / duration,
        "output_throughput": total_out / duration,
        "total_token_throughput": (total_in + total_out) / duration,
    }
    if goodput:
        good = [r for r in ok
                if r.ttft * 1e3 <= goodput.get("ttft", float("inf"))
                and (r.tpot or 0.0) * 1e3 <= goodput.get("tpot", float("inf"))
                and r.latency * 1e3 <= goodput.get("e2el", float("inf"))]
        out["request_goodput"] = len(good) / duration
    out |= _stats("ttft", [r.ttft for r in ok])
    out |= _stats("tpot", [r.tpot for r in ok if r.tpot is not None])
    out |= _stats("itl", [g for r in ok for g in r.itl])
    out |= _stats("e2el", [r.latency for r in ok])
    return out


def throughput_over_time(results: list[RequestResult], bucket: float = 1.0
                         ) -> tuple[list[float], list[float]]:
    """Output tokens per second in buckets of `bucket` seconds since the start."""
    times = [t for r in results if r.success for t in r.token_times]
    if not times:
        return [], []
    n = int(max(times) // bucket) + 1
    counts = np.zeros(n)
    for r in results:
        if not r.success or not r.token_times:
            continue
        # Each chunk's arrival carries an equal share of the request's tokens.
        share = r.output_tokens / len(r.token_times)
        for t in r.token_times:
            counts[int(t // bucket)] += share
    return [i * bucket for i in range(n)], list(counts / bucket)
