"""Prometheus text exposition of the engine's state, under vLLM's metric names (tandem: prefix)."""
from __future__ import annotations

from tandem.config import dtype_name
from tandem.engine.engine import LLMEngine
from tandem.engine.stats import Histogram
from tandem.kv_store.format import DROP_REASONS


def render_metrics(engine: LLMEngine, model_name: str) -> str:
    label = f'model_name="{_escape(model_name)}"'
    sched, stats = engine.scheduler, engine.stats
    lines: list[str] = []

    def metric(name: str, kind: str, help_: str, samples: list[tuple[str, float]]) -> None:
        lines.append(f"# HELP tandem:{name} {help_}")
        lines.append(f"# TYPE tandem:{name} {kind}")
        lines.extend(f"tandem:{name}{suffix} {value}" for suffix, value in samples)

    def hist(name: str, help_: str, h: Histogram) -> None:
        samples, total = [], 0
        for bound, count in zip((*h.buckets, "+Inf"), h.counts):
            total += count
            samples.append((f'_bucket{{{label},le="{bound}"}}', total))
        samples += [(f"_sum{{{label}}}", h.sum), (f"_count{{{label}}}", h.count)]
        metric(name, "histogram", help_, samples)

    metric("num_requests_running", "gauge", "Requests in the running batch.",
           [(f"{{{label}}}", len(sched.running))])
    metric("num_requests_waiting", "gauge", "Requests waiting to be scheduled.",
           [(f"{{{label}}}", len(sched.waiting))])
    metric("kv_cache_usage_perc", "gauge", "Fraction of KV cache blocks in use (1 = full).",
           [(f"{{{label}}}", engine.kv.usage)])
    metric("kv_cache_capacity_tokens", "gauge", "Tokens the KV cache holds.",
           [(f'{{{label},kv_cache_dtype="{dtype_name(engine.runner.kv_dtype)}"}}',
             engine.kv_capacity_tokens)])
    metric("model_weight_bytes", "gauge", "Bytes of the weights as served (rank 0).",
           [(f'{{{label},quantization="{engine.config.quantization}"}}',
             engine.runner.weight_bytes)])
    metric("prompt_tokens_total", "counter", "Prompt tokens processed.",
           [(f"{{{label}}}", stats.prompt_tokens_total)])
    metric("generation_tokens_total", "counter", "Tokens generated.",
           [(f"{{{label}}}", stats.generation_tokens_total)])
    metric("request_success_total", "counter", "Finished requests by finish reason.",
           [(f'{{{label},finished_reason="{r}"}}', stats.request_success_total[r])
            for r in ("stop", "length", "abort")])
    metric("num_preemptions_total", "counter", "Requests preempted (recomputed later).",
           [(f"{{{label}}}", sched.num_preemptions)])
    metric("prefix_cache_queries_total", "counter", "Prompt tokens looked up in the prefix cache.",
           [(f"{{{label}}}", sched.prefix_cache_queries)])
    metric("prefix_cache_hits_total", "counter", "Prompt tokens found in the prefix cache.",
           [(f"{{{label}}}", sched.prefix_cache_hits)])
    if engine.config.speculative_config is not None:
        for name, help_, value in (
                ("drafts", ("Proposals verified (speculative decoding; their length adapts per "
                 "request)."), sched.spec_drafts),
                ("draft_tokens", "Proposed tokens verified.", sched.spec_draft_tokens),
                ("accepted_tokens", "Proposed tokens accepted.", sched.spec_accepted_tokens)):
            metric(f"spec_decode_num_{name}_total", "counter", help_, [(f"{{{label}}}", value)])
        k = engine.config.speculative_config["num_speculative_tokens"]
        by_pos = sched.spec_accepted_by_position + [0] * k
        metric("spec_decode_num_accepted_tokens_per_pos", "counter",
               "Proposed tokens accepted, by position in the proposal.",
               [(f'{{{label},position="{i}"}}', by_pos[i]) for i in range(k)])
    hist("time_to_first_token_seconds", "Time to first token.", stats.time_to_first_token)
    hist("inter_token_latency_seconds", "Time between tokens.", stats.inter_token_latency)
    hist("e2e_request_latency_seconds", "Request latency.", stats.e2e_request_latency)
    tiers = engine.tiers
    if tiers is not None:
        t = tiers.stats
        names = ["host"] * (tiers.host is not None) + ["store"] * (tiers.store is not None)

        def per(name: str, kind: str, help_: str, key: str, counts, keys) -> None:
            metric(name, kind, help_, [(f'{{{label},{key}="{k}"}}', counts[k]) for k in keys])

        per("kv_tier_hit_blocks_total", "counter", "KV blocks loaded from a tier below the pool.",
            "tier", t.hits, names)
        per("kv_tier_misses_total", "counter", "Lookups that ended at a block the tier lacked.",
            "tier", t.misses, names)
        per("kv_tier_loaded_bytes_total", "counter", "Bytes loaded from a tier into the pool.",
            "tier", t.loaded_bytes, names)
        per("kv_tier_saved_bytes_total", "counter", "Bytes written down to a tier.",
            "tier", t.saved_bytes, names)
        if tiers.host is not None:
            metric("kv_host_blocks", "gauge", "KV blocks held in host memory, and its capacity.",
                   [(f'{{{label},state="used"}}', len(tiers.host)),
                    (f'{{{label},state="capacity"}}', tiers.host.num_blocks)])
        if tiers.store is not None:
            per("kv_store_errors_total", "counter", "Store calls that failed or timed out.",
                "op", t.store_errors, ("get", "put"))
            per("kv_store_dropped_blocks_total", "counter",
                "Stored values refused (corrupt, or another model's or shape's).", "reason",
                t.dropped, DROP_REASONS)
            metric("kv_store_writes_dropped_total", "counter",
                   "Blocks not written: write queue full or breaker open.",
                   [(f"{{{label}}}", t.writes_dropped)])
            metric("kv_store_load_timeouts_total", "counter",
                   "Loads a request stopped waiting for (it recomputed instead).",
                   [(f"{{{label}}}", t.load_timeouts)])
            metric("kv_store_breaker_state", "gauge",
                   "The store's circuit breaker: 0 closed, 1 half-open, 2 open.",
                   [(f"{{{label}}}", tiers.breaker_code)])
            hist("kv_store_load_seconds", "Time to fetch and check a chain of blocks.",
                 t.load_seconds)
    return "\n".join(lines) + "\n"


def _escape(s: str) -> str:
    return s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
