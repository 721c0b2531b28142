"""What the status page shows: one replica's engine, or the router's replicas."""
from __future__ import annotations

import re
import time

from tandem.config import dtype_name
from tandem.dashboard.series import COUNTERS, Series

_SAMPLE = re.compile(r"^tandem:(\w+)(?:\{([^}]*)\})? (\S+)$", re.MULTILINE)
_MODEL_LABEL = re.compile(r'model_name="(?:[^"\\]|\\.)*",?')


def parse_metrics(text: str) -> dict[str, float]:
    """A replica's tandem: samples by name (labels but model_name kept, as `name{labels}`),
    histogram buckets left out."""
    out: dict[str, float] = {}
    for name, labels, value in _SAMPLE.findall(text):
        if name.endswith("_bucket"):
            continue
        labels = _MODEL_LABEL.sub("", labels or "").strip(",")
        key = f"{name}{{{labels}}}" if labels else name
        try:
            out[key] = out.get(key, 0.0) + float(value)
        except ValueError:
            continue
    return out


def engine_counters(engine) -> dict[str, float]:
    s = engine.stats
    return {"requests": sum(s.request_success_total.values()),
            "tokens": s.generation_tokens_total,
            "ttft_sum": s.time_to_first_token.sum, "ttft_count": s.time_to_first_token.count,
            "itl_sum": s.inter_token_latency.sum, "itl_count": s.inter_token_latency.count}


def _ratio(a: float, b: float) -> float | None:
    return round(a / b, 4) if b else None


def replica_view(engine, model_name: str, series: Series) -> dict:
    sched, cfg = engine.scheduler, engine.config
    return {"kind": "replica", "now": time.time(), "model": model_name,
            "dtype": dtype_name(cfg.torch_dtype), "device": str(cfg.torch_device),
            "quantization": cfg.quantization,
            "kv_cache_dtype": dtype_name(engine.runner.kv_dtype),
            "tensor_parallel_size": cfg.tensor_parallel_size,
            "kv_capacity_tokens": engine.kv_capacity_tokens,
            "kv_usage": round(engine.kv.usage, 4), "running": len(sched.running),
            "waiting": len(sched.waiting),
            "prefix_hit_rate": _ratio(sched.prefix_cache_hits, sched.prefix_cache_queries),
            "series": series.points()}


def router_counters(replicas) -> dict[str, float]:
    """The router's requests, and its replicas' tokens and latency sums as last scraped."""
    out = dict.fromkeys(COUNTERS, 0.0)
    for r in replicas:
        m = r.metrics
        out["requests"] += r.requests_total
        out["tokens"] += m.get("generation_tokens_total", 0.0)
        for name, metric in (("ttft", "time_to_first_token_seconds"),
                             ("itl", "inter_token_latency_seconds")):
            out[f"{name}_sum"] += m.get(f"{metric}_sum", 0.0)
            out[f"{name}_count"] += m.get(f"{metric}_count", 0.0)
    return out


def _state(r) -> str:
    if not r.healthy:
        return "down"
    if r.draining:
        return "draining"
    return "breaker open" if r.breaker.state == "open" else "up"


def router_view(replicas, series: Series, inflight: int, waiting: int) -> dict:
    rows = []
    for r in replicas:
        m = r.metrics
        rows.append({"id": r.id, "url": r.url, "state": _state(r), "breaker": r.breaker.state,
                     "inflight": r.load.inflight_requests,
                     "running": m.get("num_requests_running"),
                     "waiting": m.get("num_requests_waiting"),
                     "kv_usage": m.get("kv_cache_usage_perc"), "hit_rate": r.hit_rate,
                     "store_hits": m.get('kv_tier_hit_blocks_total{tier="store"}'),
                     "requests": r.requests_total, "tandem": r.block_size is not None})
    return {"kind": "router", "now": time.time(), "inflight": inflight, "waiting": waiting,
            "replicas": rows, "series": series.points()}
