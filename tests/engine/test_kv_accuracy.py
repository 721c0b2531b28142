"""CI's gate on fp8 KV accuracy: a smaller run of benchmarks/kv_accuracy.py on SmolLM2
(2 windows of 256 tokens of Python's docs; 4 prompts x 32 greedy tokens). The full report,
16 x 1024 tokens and 32 x 256, is in docs/kv_cache.md."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))

from kv_accuracy import QUICK, evaluate


def test_fp8_e4m3_keeps_perplexity_and_greedy_choices(smollm2_dir):
    res = evaluate(smollm2_dir, QUICK, dtype="float32", kv_dtypes=("auto", "fp8_e4m3"))
    auto, fp8 = res["per_dtype"]["auto"], res["per_dtype"]["fp8_e4m3"]
    assert 5 < auto["perplexity"] < 50, auto  # the model reads English documentation
    assert auto["top1_agreement"] >= 0.99  # the teacher-forced check reproduces greedy
    assert fp8["ppl_increase"] <= 0.01, fp8
    assert 0 < fp8["mean_kl"] < 0.02, fp8
    assert fp8["top1_agreement"] >= 0.95, fp8
    assert res["kv_capacity_tokens"]["fp8_e4m3"] >= 3.8 * res["kv_capacity_tokens"]["auto"]
