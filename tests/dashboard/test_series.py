"""The status page's numbers: per-interval rates and means from cumulative samples, and a
replica's /metrics text read into samples by name."""
from __future__ import annotations

from tandem.dashboard.series import Series
from tandem.dashboard.views import parse_metrics


def test_old_samples_roll_off_and_a_counter_reset_is_no_negative_rate():
    counters = iter([
        {"requests": 0, "tokens": 0, "ttft_sum": 0.0, "ttft_count": 0, "itl_sum": 0, "itl_count": 0},
        {"requests": 10, "tokens": 500, "ttft_sum": 0.5, "ttft_count": 10, "itl_sum": 2.0,
         "itl_count": 400},
        {"requests": 10, "tokens": 500, "ttft_sum": 0.5, "ttft_count": 10, "itl_sum": 2.0,
         "itl_count": 400},
        {"requests": 2, "tokens": 50, "ttft_sum": 0.1, "ttft_count": 2, "itl_sum": 0.2,
         "itl_count": 40},  # a restarted replica's counters start over
    ])
    s = Series(lambda: next(counters), keep=2)
    for t in (100.0, 105.0, 110.0, 115.0):
        s.sample(t)
    p = s.points()  # keep=2: the first sample has rolled off
    assert p["t"] == [110.0, 115.0]
    assert p["request_rate"] == [0.0, 0.0] and p["token_rate"] == [0.0, 0.0]
    assert p["ttft_ms"] == [None, None] and p["itl_ms"] == [None, None]
    s2 = Series(lambda: next(iter([])), keep=4)
    assert s2.points()["t"] == []


def test_rates_of_a_busy_interval():
    values = iter([{"requests": 0, "tokens": 0, "ttft_sum": 0, "ttft_count": 0, "itl_sum": 0,
                    "itl_count": 0},
                   {"requests": 10, "tokens": 500, "ttft_sum": 0.5, "ttft_count": 10,
                    "itl_sum": 2.0, "itl_count": 400}])
    s = Series(lambda: next(values))
    s.sample(0.0)
    s.sample(5.0)
    p = s.points()
    assert (p["request_rate"], p["token_rate"], p["ttft_ms"], p["itl_ms"]) == \
        ([2.0], [100.0], [50.0], [5.0])


def test_parse_metrics_keeps_names_and_labels_but_the_model():
    text = """# TYPE tandem:num_requests_running gauge
tandem:num_requests_running{model_name="m"} 3
tandem:kv_tier_hit_blocks_total{model_name="m",tier="store"} 7
tandem:time_to_first_token_seconds_bucket{model_name="m",le="0.1"} 4
tandem:time_to_first_token_seconds_sum{model_name="m"} 0.25
vllm:num_requests_running{model_name="m"} 9
tandem:bad 1.2.3
"""
    assert parse_metrics(text) == {"num_requests_running": 3.0,
                                   'kv_tier_hit_blocks_total{tier="store"}': 7.0,
                                   "time_to_first_token_seconds_sum": 0.25}
