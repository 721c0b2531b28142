"""`tandem bench serve` and `tandem bench sweep` against a real `tandem serve`."""
from __future__ import annotations

import json

from server_utils import MODEL_NAME

from tandem.cli import main


def test_bench_serve_measures_a_real_server(url, smollm2_dir, tmp_path, capsys):
    result, png = tmp_path / "r.json", tmp_path / "r.png"
    code = main(["bench", "serve", "--base-url", url, "--model", MODEL_NAME, "--tokenizer",
                 smollm2_dir, "--num-prompts", "6", "--input-len", "24", "--output-len", "5",
                 "--ignore-eos", "--max-concurrency", "3", "--request-rate", "20",
                 "--goodput", "ttft:60000", "--result-file", str(result), "--plot", str(png),
                 "--no-progress"])
    assert code == 0
    r = json.loads(result.read_text())
    assert (r["completed"], r["failed"], r["total_output_tokens"]) == (6, 0, 30)
    assert r["output_lens"] == [5] * 6 and all(n >= 24 for n in r["input_lens"])
    assert 0 < r["median_ttft_ms"] <= r["p99_ttft_ms"] <= r["median_e2el_ms"] * 6
    assert r["median_itl_ms"] > 0 and r["mean_tpot_ms"] > 0 and r["request_goodput"] > 0
    assert all(len(itl) == 4 for itl in r["itls"])  # one gap between each of 5 tokens
    assert png.read_bytes()[:4] == b"\x89PNG"
    out = capsys.readouterr().out
    assert "Serving Benchmark Result" in out and "Successful requests" in out


def test_bench_chat_endpoint_and_a_failing_server(url, smollm2_dir, tmp_path):
    result = tmp_path / "c.json"
    assert main(["bench", "serve", "--base-url", url, "--model", MODEL_NAME, "--tokenizer",
                 smollm2_dir, "--endpoint", "chat", "--num-prompts", "2", "--input-len", "8",
                 "--output-len", "3", "--ignore-eos", "--result-file", str(result),
                 "--no-progress"]) == 0
    assert json.loads(result.read_text())["total_output_tokens"] == 6
    # A wrong model name: every request fails with the server's 404, and the exit code says so.
    assert main(["bench", "serve", "--base-url", url, "--model", "nope", "--tokenizer",
                 smollm2_dir, "--num-prompts", "2", "--input-len", "8", "--output-len", "2",
                 "--result-file", str(result), "--no-progress"]) == 1
    r = json.loads(result.read_text())
    assert r["failed"] == 2 and r["errors"][0].startswith("HTTP 404")


def test_bench_sweep_over_concurrencies(url, smollm2_dir, tmp_path):
    result, png = tmp_path / "s.json", tmp_path / "s.png"
    assert main(["bench", "sweep", "--base-url", url, "--model", MODEL_NAME, "--tokenizer",
                 smollm2_dir, "--concurrencies", "1", "2", "--prompts-per-level", "2",
                 "--input-len", "16", "--output-len", "3", "--ignore-eos",
                 "--result-file", str(result), "--plot", str(png), "--no-progress"]) == 0
    points = json.loads(result.read_text())
    assert [p["label"] for p in points] == ["c=1", "c=2"]
    assert [p["completed"] for p in points] == [2, 4]
    assert png.read_bytes()[:4] == b"\x89PNG"
