"""What the speculative-decoding engine tests share: prompts, engines, and the idle check."""
from __future__ import annotations

from tandem import LLM, SamplingParams

SPEC = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4}
PROMPTS = [
    "Repeat this sentence three times: the quick brown fox jumps over the lazy dog. The quick",
    ("def add(a, b):\n    return a + b\n\n\ndef add_three(a, b, c):\n    return a + b + c\n\n\n"
    "def add_four(a, b, c, d):\n"),
    "The capital of France is",
    "Hi",
    ("Copy the list exactly: apple, banana, cherry, date, elderberry, fig, grape.\nCopy: apple, "
    "banana,"),
    "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
]


def config(method: str, model_dir: str) -> dict:
    """`ngram`, or `draft`: SmolLM2 as its own draft (float32: every proposal accepted)."""
    if method == "ngram":
        return SPEC
    return {"method": "draft_model", "model": model_dir, "num_speculative_tokens": 4}


GREEDY = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)


def make(model: str, *, cost_aware: bool = False, **kw) -> LLM:
    """A float32 engine. Proposals are trimmed by measured step times (spec/cost.py) only
    with `cost_aware`: elsewhere the tests count proposals, which timing must not change."""
    llm = LLM(model=model, dtype="float32", quantization="none", **kw)
    if not cost_aware:
        llm.engine.spec_costs = None
    return llm


def tokens(llm: LLM, params: SamplingParams = GREEDY) -> list[list[int]]:
    return [list(c.token_ids) for o in llm.generate(PROMPTS, params) for c in o.outputs]


def assert_idle(llm: LLM) -> None:
    """No request left, and every block free in the target's pool and in a draft's."""
    assert not llm.engine.has_unfinished_requests()
    drafter = llm.engine.drafter
    for kv in (llm.engine.kv, *((drafter.kv,) if drafter else ())):
        assert kv.num_free_blocks == kv.num_blocks and all(r == 0 for r in kv.ref_counts)
    assert drafter is None or not drafter.seqs
