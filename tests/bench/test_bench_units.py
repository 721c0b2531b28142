"""`tandem bench serve`'s parts without a server: prompts of exact token lengths, arrival
times, the summary's numbers and the argument checks."""
import argparse
import itertools
import json
import statistics

import pytest

from tandem.bench.datasets import file_requests, random_requests, shared_prefix_requests
from tandem.bench.metrics import RequestResult, parse_goodput, summarize, throughput_over_time
from tandem.bench.serve import add_serve_args, arrival_offsets, check_args


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    from tandem.loader.tokenizer import load_tokenizer

    return load_tokenizer(smollm2_dir)


def test_random_prompts_have_the_exact_token_lengths(tokenizer):
    reqs = random_requests(tokenizer, 20, 128, 16, range_ratio=0.5, seed=3)
    lens = [len(tokenizer.encode(r.prompt, add_special_tokens=False)) for r in reqs]
    assert lens == [r.prompt_len for r in reqs]
    assert all(64 <= n <= 192 for n in lens) and len(set(lens)) > 5
    assert all(8 <= r.output_len <= 24 for r in reqs)
    again = random_requests(tokenizer, 20, 128, 16, range_ratio=0.5, seed=3)
    assert [r.prompt for r in again] == [r.prompt for r in reqs]  # seeded


def test_shared_prefix_groups_share_their_system_prompt(tokenizer):
    reqs = shared_prefix_requests(tokenizer, groups=3, prompts_per_group=4, system_len=50,
                                  question_len=10, output_len=4, seed=1)
    assert len(reqs) == 12 and [r.group for r in reqs] != sorted(r.group for r in reqs)
    for g in range(3):
        ids = [tokenizer.encode(r.prompt, add_special_tokens=False)
               for r in reqs if r.group == g]
        assert all(len(i) == 60 for i in ids)
        assert all(i[:50] == ids[0][:50] for i in ids) and len({tuple(i) for i in ids}) == 4
    firsts = {tuple(tokenizer.encode(r.prompt, add_special_tokens=False)[:50]) for r in reqs}
    assert len(firsts) == 3


def test_file_prompts_and_their_errors(tokenizer, tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "Hello there", "output_len": 7}) + "\n\n"
                    + json.dumps({"prompt": "Bye"}) + "\n")
    reqs = file_requests(str(path), tokenizer, output_len=3)
    assert [(r.prompt, r.output_len) for r in reqs] == [("Hello there", 7), ("Bye", 3)]
    assert reqs[0].prompt_len == len(tokenizer.encode("Hello there", add_special_tokens=False))
    path.write_text('{"prompt": 5}\n')
    with pytest.raises(ValueError, match="^dataset-path: line 1"):
        file_requests(str(path), tokenizer, 3)


def test_arrivals_follow_the_rate_and_burstiness():
    assert arrival_offsets(5, float("inf"), 1.0, 0) == [0.0] * 5
    t = arrival_offsets(4001, 20.0, 1.0, 0)
    gaps = [b - a for a, b in itertools.pairwise(t)]
    assert t[0] == 0 and all(g > 0 for g in gaps)
    assert statistics.mean(gaps) == pytest.approx(0.05, rel=0.08)
    assert statistics.stdev(gaps) == pytest.approx(0.05, rel=0.1)  # exponential: sd = mean
    bursty = arrival_offsets(4001, 20.0, 0.25, 0)
    bgaps = [b - a for a, b in itertools.pairwise(bursty)]
    assert statistics.mean(bgaps) == pytest.approx(0.05, rel=0.15)
    assert statistics.stdev(bgaps) > 1.5 * statistics.stdev(gaps)  # sd = mean / sqrt(0.25)


def test_summary_numbers_and_vllm_key_names():
    r1 = RequestResult(prompt_len=10, success=True, output_tokens=11, ttft=0.1, latency=1.1,
                       itl=[0.1] * 10, token_times=[0.1 * i for i in range(1, 12)])
    r2 = RequestResult(prompt_len=20, success=True, output_tokens=1, ttft=0.3, latency=0.3,
                       token_times=[0.3])
    bad = RequestResult(prompt_len=5, error="HTTP 500")
    s = summarize([r1, r2, bad], duration=2.0, goodput={"ttft": 150})
    assert (s["completed"], s["failed"]) == (2, 1)
    assert (s["total_input_tokens"], s["total_output_tokens"]) == (30, 12)
    assert s["request_throughput"] == 1.0 and s["output_throughput"] == 6.0
    assert s["total_token_throughput"] == 21.0 and s["request_goodput"] == 0.5
    assert s["mean_ttft_ms"] == pytest.approx(200) and s["median_ttft_ms"] == pytest.approx(200)
    assert s["mean_tpot_ms"] == pytest.approx(100)  # r2 has one token: no TPOT
    assert s["p99_itl_ms"] == pytest.approx(100) and s["median_e2el_ms"] == pytest.approx(700)
    for key in ("mean", "median", "std", "p90", "p99"):
        for m in ("ttft", "tpot", "itl", "e2el"):
            assert f"{key}_{m}_ms" in s
    t, tput = throughput_over_time([r1, r2], bucket=1.0)
    assert t == [0.0, 1.0] and sum(tput) == pytest.approx(12)


@pytest.mark.parametrize("argv, field", [
    (["--num-prompts", "0"], "num-prompts"), (["--range-ratio", "1"], "range-ratio"),
    (["--request-rate", "0"], "request-rate"), (["--burstiness", "0"], "burstiness"),
    (["--max-concurrency", "0"], "max-concurrency"), (["--dataset", "file"], "dataset-path"),
    (["--goodput", "ttft"], "goodput"), (["--goodput", "foo:3"], "goodput")])
def test_bad_arguments_name_the_field(argv, field):
    p = argparse.ArgumentParser()
    add_serve_args(p)
    args = p.parse_args(["--base-url", "http://x", "--model", "m", *argv])
    with pytest.raises(ValueError, match=f"^{field}"):
        check_args(args)


def test_goodput_specs():
    assert parse_goodput(["ttft:200", "tpot:50", "e2el:1000"]) == {
        "ttft": 200.0, "tpot": 50.0, "e2el": 1000.0}
