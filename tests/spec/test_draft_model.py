"""Draft-model speculation beyond the shared engine tests: a tiny random draft that the target
rarely agrees with, aborts in the middle of speculation, and drafts that must be refused."""
from __future__ import annotations

import pytest
from helpers import save_tiny_model
from spec_helpers import GREEDY, PROMPTS, assert_idle, config, make, tokens

from tandem import LLM, SamplingParams
from tandem.spec.draft import check_same_vocab


@pytest.fixture(scope="module")
def tiny_draft(tmp_path_factory, smollm2_dir) -> str:
    """A 2-layer random Llama with SmolLM2's tokenizer: a draft whose proposals are noise."""
    return save_tiny_model(tmp_path_factory.mktemp("draft"), tokenizer_dir=smollm2_dir)


def test_a_draft_the_target_rejects_still_gives_the_plain_tokens(smollm2_dir, tiny_draft):
    plain = make(smollm2_dir, kv_cache_memory="64MiB")
    want = tokens(plain)
    plain.shutdown()
    llm = make(smollm2_dir, kv_cache_memory="64MiB", speculative_config={
        "method": "draft_model", "model": tiny_draft, "num_speculative_tokens": 3})
    try:
        # A request too short to propose (max_tokens=1) shares the batch with the others.
        outs = llm.generate([*PROMPTS, PROMPTS[0]], [GREEDY] * len(PROMPTS)
                            + [SamplingParams(temperature=0, max_tokens=1)])
        assert [list(o.outputs[0].token_ids) for o in outs[:-1]] == want
        assert list(outs[-1].outputs[0].token_ids) == want[0][:1]
        s = llm.engine.scheduler
        assert s.spec_drafts > 0
        # Noise is rejected, and the adaptive length soon proposes one token, then pauses.
        assert s.spec_accepted_tokens < 0.2 * s.spec_draft_tokens
        assert s.spec_draft_tokens < 2 * s.spec_drafts
        assert_idle(llm)
    finally:
        llm.shutdown()


@pytest.mark.parametrize("method", ["ngram", "draft"])
def test_aborts_in_the_middle_of_speculation_free_every_block(smollm2_dir, method):
    llm = make(smollm2_dir, kv_cache_memory="64MiB",
               speculative_config=config(method, smollm2_dir))
    try:
        engine = llm.engine
        for i, prompt in enumerate(PROMPTS):
            engine.add_request(str(i), prompt, GREEDY)
        while engine.scheduler.spec_drafts < 3:
            engine.step()
        for i in range(0, len(PROMPTS), 2):  # half now, the rest after more steps
            engine.abort_request(str(i))
        for _ in range(3):
            engine.step()
        if engine.drafter is not None:
            assert len(engine.drafter.seqs) == len(PROMPTS) // 2
        for i in range(1, len(PROMPTS), 2):
            engine.abort_request(str(i))
        assert_idle(llm)
    finally:
        llm.shutdown()


def test_a_draft_with_another_vocabulary_is_refused(smollm2_dir, tmp_path):
    small = save_tiny_model(tmp_path / "small", tokenizer_dir=smollm2_dir, vocab_size=1000)
    with pytest.raises(ValueError, match=r"^speculative_config.model: the draft's vocabulary "
                                         r"has 1000 tokens, the target's 49152"):
        LLM(model=smollm2_dir, kv_cache_memory="16MiB", speculative_config={
            "method": "draft_model", "model": small, "num_speculative_tokens": 2})
    with pytest.raises(ValueError, match=r"^speculative_config.model: model: no such file"):
        LLM(model=smollm2_dir, kv_cache_memory="16MiB", speculative_config={
            "method": "draft_model", "model": str(tmp_path / "none"), "num_speculative_tokens": 2})


class _Vocab:
    def __init__(self, vocab: dict[str, int]):
        self.vocab = vocab

    def get_vocab(self) -> dict[str, int]:
        return self.vocab


def test_same_size_but_other_ids_is_refused():
    a, b = _Vocab({"x": 0, "y": 1}), _Vocab({"x": 1, "y": 0})
    check_same_vocab(2, a, 2, _Vocab({"x": 0, "y": 1}))
    with pytest.raises(ValueError, match=r"^speculative_config.model: the draft's tokenizer maps"):
        check_same_vocab(2, a, 2, b)


@pytest.mark.parametrize("value, message", [
    ({"method": "draft_model", "num_speculative_tokens": 2},
     r"^speculative_config.model: draft_model needs the draft's path"),
    ({"method": "draft_model", "model": "m", "num_speculative_tokens": 2, "prompt_lookup_max": 3},
     r"^speculative_config.prompt_lookup_max: only for method ngram"),
    ({"method": "draft_model", "model": "m", "num_speculative_tokens": 0},
     r"^speculative_config.num_speculative_tokens: must be an integer in \[1, 16\]"),
])
def test_bad_draft_configs_name_the_field(value, message):
    from tandem.config import EngineConfig

    with pytest.raises(ValueError, match=message):
        EngineConfig(speculative_config=value)


def test_a_draft_under_tensor_parallelism_is_refused_clearly():
    from tandem.config import EngineConfig

    with pytest.raises(ValueError, match=r"^speculative_config.method: draft_model does not run "
                                         r"with tensor_parallel_size > 1"):
        EngineConfig(tensor_parallel_size=2, speculative_config={
            "method": "draft_model", "model": "m", "num_speculative_tokens": 2})
