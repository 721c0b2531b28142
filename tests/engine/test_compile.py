"""torch.compile of the decoder layers (engine/compile.py) against --enforce-eager on the real
SmolLM2 in float32: the same greedy tokens, and logits as close as ours are to HF's (Inductor
sums in its own order), for a batch of different lengths, chunked prefills, prefix-cache hits
and decodes; and Inductor's on-disk cache reused by a second start."""
from __future__ import annotations

from collections import Counter

import pytest
import torch
from helpers import run_stepwise
from torch._dynamo.utils import counters

from tandem import LLM

SHARED = ("The old railway station had been closed for thirty years when the town council "
          "decided to turn it into a library, and volunteers scrubbed the tiled floors. ")
PROMPTS = ["Hi", "The capital of France is", SHARED + "On the opening day",
           SHARED + "The stationmaster's grandson"]


def make(smollm2_dir: str, **kw) -> LLM:
    # 32-token steps: the long prompts' prefills are chunked, and the warm-up is short.
    args = {"dtype": "float32", "quantization": "none", "kv_cache_memory": "64MiB",
            "max_num_batched_tokens": 32, "max_num_seqs": 4, "enforce_eager": False}
    return LLM(model=smollm2_dir, **(args | kw))


@pytest.fixture(scope="module")
def compiled(smollm2_dir) -> LLM:
    # Dynamo compiles a function at most 8 times; earlier tests' engines may have used them up.
    torch._dynamo.reset()
    return make(smollm2_dir)


@pytest.fixture(scope="module")
def eager(smollm2_dir) -> LLM:
    return make(smollm2_dir, enforce_eager=True)


def test_enforce_eager_compiles_nothing(compiled, eager):
    assert compiled.engine.runner.compiled
    assert not eager.engine.runner.compiled
    layers = eager.engine.runner.model.model.layers
    assert all(layer._compiled_call_impl is None for layer in layers)


def test_compiled_steps_match_eager(compiled, eager):
    def run(llm: LLM):
        ids = [llm.tokenizer.encode(p) for p in PROMPTS]
        # The second shared-prefix prompt arrives later: its first block comes from the cache.
        arrivals = {0: {str(i): ids[i] for i in range(3)}, 6: {"3": ids[3]}}
        return run_stepwise(llm.engine, arrivals, max_tokens=12)

    ours, ref = run(compiled), run(eager)
    assert ours.steps == ref.steps
    assert ours.computed_at_admission["3"] > 0  # a prefix-cache hit
    prefill_steps = Counter(rid for step in ref.steps for rid, n in step.items() if n > 1)
    assert max(prefill_steps.values()) > 1  # a chunked prefill
    for rid, logits in ref.logits.items():
        assert [t.argmax() for t in ours.logits[rid]] == [t.argmax() for t in logits]
        torch.testing.assert_close(torch.stack(ours.logits[rid]), torch.stack(logits),
                                   rtol=0, atol=1e-3)


def test_second_start_reuses_inductor_cache(smollm2_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("TANDEM_CACHE", str(tmp_path))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "")  # so that teardown restores it
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")
    first = {}
    for start in range(2):
        torch._dynamo.reset()  # as a new process: Dynamo traces again, Inductor may not
        counters.clear()
        make(smollm2_dir)
        if not start:
            first = dict(counters["inductor"])
    assert (tmp_path / "inductor").is_dir()
    assert first.get("fxgraph_cache_miss", 0) >= 2  # one graph for 1 row, one for more
    assert counters["inductor"].get("fxgraph_cache_hit", 0) == first["fxgraph_cache_miss"]
    assert not counters["inductor"].get("fxgraph_cache_miss")
