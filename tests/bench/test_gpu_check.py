"""benchmarks/gpu_check.py, run end to end on the CPU with a tiny random model: what a CPU can
show of the script a GPU session runs (the checks pass, the table prints)."""
import os
import re
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))

import gpu_check


def test_gpu_check_runs_on_cpu(smollm2_dir, monkeypatch, capsys):
    """Every section runs and reports; off CUDA the triton variants are skipped, and 'graphs'
    is the default engine (eager here, as the suite's TANDEM_ENFORCE_EAGER=1 makes it)."""
    monkeypatch.setenv("TANDEM_ENFORCE_EAGER", "1")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    rc = gpu_check.main(["--device", "cpu", "--shapes", "tiny", "--tokenizer-from", smollm2_dir,
                         "--batches", "1", "3", "--new", "4", "--greedy-tokens", "4",
                         "--prompt-len", "16"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "default: 8/8 prompts identical" in out
    for line in ("- PASS: float32 greedy vs HF", "- PASS: graphs + torch vs eager + torch",
                 "- shown: graphs + triton vs eager + torch: skipped", "- PASS: bfloat16 logits",
                 "- shown: fp8 KV cache: graphs on vs off", "- PASS: int4 weights vs bfloat16"):
        assert line in out, out
    assert "| batch | floor ms | eager tok/s | graphs tok/s | HF tok/s | graphs/eager |" in out
    table = [line for line in out.splitlines() if line.startswith(("| 1 |", "| 3 |"))]
    assert len(table) == 2, out
    assert out.count("not measured") == 3, out  # the targets name shapes this run left out
    assert out.rstrip().endswith("GPU CHECK PASSED")


def test_cuda_check_fp8_gate_runs_on_cpu(smollm2_dir, tmp_path, capsys):
    """The fp8 gate: teacher-forced KL from the model-dtype cache, on a tiny random model."""
    import cuda_check
    from random_model import write_random_model

    model = write_random_model("tiny", str(tmp_path), smollm2_dir)
    rc = cuda_check.main(["--model", model, "--device", "cpu", "--kv-cache-dtype", "fp8_e4m3",
                          "--new", "8"])
    out = capsys.readouterr().out
    assert rc == 0 and "CUDA CHECK PASSED" in out, out
    assert re.search(r"fp8_e4m3 vs model-dtype KV, .* over 64 positions: mean KL 0\.0", out), out
