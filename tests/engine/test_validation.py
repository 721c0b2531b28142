"""Every bad input raises ValueError naming its field, and a bad request leaves the engine
(and the requests already in it) working."""
import json

import pytest

from tandem import LLM, SamplingParams
from tandem.engine.llm import _prompt_of

MAX_MODEL_LEN = 64
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def llm(smollm2_dir) -> LLM:
    return LLM(model=smollm2_dir, dtype="float32", kv_cache_memory="16MiB",
               max_model_len=MAX_MODEL_LEN)


def raises_on(field: str):
    return pytest.raises(ValueError, match=rf"^{field}: ")


# --- sampling parameters (no model needed) -----------------------------------------------------

@pytest.mark.parametrize("field, value", [
    ("temperature", -0.5), ("temperature", float("nan")), ("temperature", float("inf")),
    ("temperature", "hot"), ("top_p", 0), ("top_p", 1.5), ("top_k", -2), ("top_k", 1.5),
    ("min_p", -0.1), ("min_p", 1.5), ("repetition_penalty", 0), ("presence_penalty", 2.5),
    ("frequency_penalty", -3), ("seed", "42"), ("seed", 1.0), ("max_tokens", 0),
    ("max_tokens", True), ("n", 0), ("n", 1.0), ("logprobs", 21), ("logprobs", -1),
    ("stop", ""), ("stop", ["ok", ""]), ("stop_token_ids", [-1]), ("stop_token_ids", ["2"]),
    ("logit_bias", {5: 101.0}), ("logit_bias", {-5: 1.0}), ("logit_bias", {"5": 1.0}),
])
def test_bad_sampling_params_name_the_field(field, value):
    with raises_on(field):
        SamplingParams(**{field: value})


def test_min_tokens_above_max_tokens():
    with raises_on("min_tokens"):
        SamplingParams(max_tokens=4, min_tokens=5)
    with raises_on("min_tokens"):
        SamplingParams(min_tokens=-1)
    assert SamplingParams(max_tokens=4, min_tokens=4).min_tokens == 4


def test_good_sampling_params():
    p = SamplingParams(stop="x", stop_token_ids=None, logprobs=20, logit_bias={3: -100})
    assert p.stop_strings == ["x"] and p.stop_token_ids == []
    assert SamplingParams(stop=["a", "b"]).stop_strings == ["a", "b"]


# --- engine settings and model folders ---------------------------------------------------------

@pytest.mark.parametrize("kwargs, field", [
    ({"kv_cache_memory": "lots"}, "kv_cache_memory"),
    ({"dtype": "float8"}, "dtype"),
    ({"device": "tpu"}, "device"),
    ({"block_size": 0}, "block_size"),
    ({"max_num_seqs": 0}, "max_num_seqs"),
])
def test_bad_engine_settings(smollm2_dir, kwargs, field):
    with raises_on(field):
        LLM(model=smollm2_dir, **kwargs)


def test_max_model_len_above_the_models_limit(smollm2_dir):
    with pytest.raises(ValueError, match=r"^max_model_len: 100000 exceeds .* 8192"):
        LLM(model=smollm2_dir, max_model_len=100_000)


def test_unknown_model_path(tmp_path):
    with raises_on("model"):
        LLM(model=str(tmp_path / "nowhere"))


def test_folder_without_config(tmp_path):
    with pytest.raises(ValueError, match="^model: folder has no config.json"):
        LLM(model=str(tmp_path))


def test_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(
        {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    with pytest.raises(ValueError, match=r"^model: architecture .*GPT2LMHeadModel.* not supported"):
        LLM(model=str(tmp_path))


# --- bad requests -------------------------------------------------------------------------------

@pytest.mark.parametrize("prompt", ["", []])
def test_empty_prompt(llm, prompt):
    with raises_on("prompt"):
        llm.generate({"prompt_token_ids": prompt} if isinstance(prompt, list) else prompt)


@pytest.mark.parametrize("token", [49152, 10**9, -1, True, 1.0, "1"])
def test_prompt_token_outside_the_vocabulary(llm, token):
    with pytest.raises(ValueError, match=r"^prompt: token id .* outside the vocabulary"):
        llm.generate({"prompt_token_ids": [1, 2, token]})


def test_prompt_plus_max_tokens_beyond_the_context(llm):
    ids = [198] * 60
    with pytest.raises(ValueError, match=r"^max_tokens: .*maximum context length is 64"):
        llm.generate({"prompt_token_ids": ids}, SamplingParams(max_tokens=5))
    with raises_on("max_tokens"):
        llm.generate("word " * 80)


@pytest.mark.parametrize("params, field", [
    ({"stop_token_ids": [49152]}, "stop_token_ids"),
    ({"logit_bias": {49152: 1.0}}, "logit_bias"),
])
def test_token_ids_in_params_outside_the_vocabulary(llm, params, field):
    with raises_on(field):
        llm.generate(PROMPT, SamplingParams(**params))


def test_params_changed_after_construction_are_checked_again(llm):
    params = SamplingParams()
    params.temperature = -1.0
    with raises_on("temperature"):
        llm.engine.add_request("mutated", PROMPT, params)
    assert not llm.engine.has_unfinished_requests()


def test_bad_prompt_shapes_and_param_lists(llm):
    with raises_on("prompt"):
        llm.generate({"text": PROMPT})
    with raises_on("prompt"):
        _prompt_of(42)
    assert _prompt_of({"prompt": "x"}) == "x"
    with raises_on("sampling_params"):
        llm.generate([PROMPT, PROMPT], [SamplingParams()])
    with raises_on("messages"):
        llm.chat([])


def test_a_bad_prompt_in_a_list_cancels_the_whole_call(llm):
    engine = llm.engine
    with raises_on("prompt"):
        llm.generate([PROMPT, PROMPT, ""], SamplingParams(max_tokens=2))
    assert not engine.has_unfinished_requests()
    assert engine.kv.num_free_blocks == engine.kv.num_blocks


def test_other_requests_keep_running_after_a_bad_one(llm):
    engine = llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=8)
    (expected,) = llm.generate(PROMPT, params)
    engine.add_request("good", PROMPT, params)
    with raises_on("request_id"):
        engine.add_request("good", "another prompt", params)
    with raises_on("prompt"):
        engine.add_request("bad", [], params)
    bad_params = SamplingParams()
    bad_params.top_p = 0.0
    with raises_on("top_p"):
        engine.add_request("bad", PROMPT, bad_params)
    finals = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finals[out.request_id] = out
    assert list(finals) == ["good"]
    assert finals["good"].outputs[0].token_ids == expected.outputs[0].token_ids
    assert finals["good"].outputs[0].text == expected.outputs[0].text
    assert engine.kv.num_free_blocks == engine.kv.num_blocks
    assert engine.step() == []


def test_abort_of_waiting_and_running_requests(llm):
    engine = llm.engine
    params = SamplingParams(max_tokens=8)
    engine.add_request("waiting", PROMPT, params)
    assert engine.abort_request("waiting") and not engine.has_unfinished_requests()
    engine.add_request("running", PROMPT, SamplingParams(max_tokens=8, n=2))
    engine.step()
    assert engine.kv.num_free_blocks < engine.kv.num_blocks
    assert engine.abort_request("running")
    assert not engine.abort_request("running") and not engine.abort_request("unknown")
    assert not engine.has_unfinished_requests() and engine.step() == []
    assert engine.kv.num_free_blocks == engine.kv.num_blocks


def test_seed_out_of_range_leaves_no_orphan_child(llm):
    # A seed whose second child would overflow 64 bits is rejected before any child is queued.
    with raises_on("seed"):
        llm.generate("Hello", SamplingParams(seed=2**64 - 1, n=2, max_tokens=2))
    assert not llm.engine.scheduler.has_unfinished()
    assert llm.generate("Hello", SamplingParams(max_tokens=2))[0].finished


def test_text_that_is_not_unicode(llm):
    with raises_on("prompt"):
        llm.generate("bad \ud800 text", SamplingParams(max_tokens=2))
    with raises_on("messages"):
        llm.chat([{"role": "user", "content": "bad \ud800"}], SamplingParams(max_tokens=2))


def test_top_k_beyond_the_vocabulary_means_all_tokens(llm):
    out = llm.generate("Hello", SamplingParams(top_k=10**20, temperature=1.0, seed=1,
                                               max_tokens=4))[0]
    same = llm.generate("Hello", SamplingParams(top_k=-1, temperature=1.0, seed=1,
                                                max_tokens=4))[0]
    assert out.outputs[0].token_ids == same.outputs[0].token_ids


def test_cache_salt_that_is_not_unicode(llm):
    with raises_on("cache_salt"):
        llm.engine.add_request("salted", "Hello", SamplingParams(max_tokens=2), cache_salt="\ud800")
    assert not llm.engine.has_unfinished_requests()
