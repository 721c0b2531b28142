"""Structured outputs in the engine on the real SmolLM2: sampled outputs always match their JSON
schema, regex or choice list; bad specs are a ValueError naming the field; the pool ends idle."""
from __future__ import annotations

import json
import re

import jsonschema
import pytest

from tandem import LLM, SamplingParams

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "email": {"type": "string", "pattern": "^[a-z]{1,8}@[a-z]{1,8}\\.com$"},
        "pets": {"type": "array", "maxItems": 3,
                 "items": {"type": "object", "properties": {
                     "kind": {"enum": ["cat", "dog", "fish"]},
                     "name": {"type": "string", "maxLength": 12}},
                     "required": ["kind", "name"], "additionalProperties": False}},
    },
    "required": ["name", "age", "email", "pets"],
    "additionalProperties": False,  # as OpenAI's strict mode requires; else extra keys run on
}


@pytest.fixture(scope="module")
def llm(smollm2_dir) -> LLM:
    llm = LLM(model=smollm2_dir, dtype="float32", quantization="none", kv_cache_memory="64MiB")
    yield llm
    llm.shutdown()


def texts(llm: LLM, prompt: str, n: int, max_tokens: int = 200, **spec) -> list:
    params = SamplingParams(temperature=1.0, max_tokens=max_tokens, n=n, seed=7,
                            structured_outputs=spec)
    return llm.chat([{"role": "user", "content": prompt}], params)[0].outputs


def assert_idle(llm: LLM) -> None:
    kv = llm.engine.kv
    assert not llm.engine.has_unfinished_requests()
    assert kv.num_free_blocks == kv.num_blocks


def test_sampled_json_always_validates_against_its_schema(llm):
    outs = texts(llm, "Describe a person with pets as JSON.", 8, json=SCHEMA)
    for c in outs:
        assert c.finish_reason == "stop", c.text
        jsonschema.validate(json.loads(c.text), SCHEMA)
    assert len({c.text for c in outs}) > 1  # sampled, not one forced string
    assert_idle(llm)


def test_json_object_regex_and_choice(llm):
    for c in texts(llm, "Give me some JSON.", 4, max_tokens=300, json_object=True):
        if c.finish_reason == "stop":
            assert isinstance(json.loads(c.text), dict)
    for c in texts(llm, "A phone number?", 4, regex=r"\(\d{3}\) \d{3}-\d{4}"):
        assert re.fullmatch(r"\(\d{3}\) \d{3}-\d{4}", c.text) and c.finish_reason == "stop"
    choices = ["red", "green", "dark blue"]
    got = {c.text for c in texts(llm, "Pick a colour.", 8, choice=choices)}
    assert got <= set(choices)
    assert_idle(llm)


def test_a_grammar_in_gbnf_or_lark(llm):
    gbnf = 'root ::= "The answer is " ("yes" | "no") "."'
    for c in texts(llm, "Answer.", 3, grammar=gbnf):
        assert c.text in ("The answer is yes.", "The answer is no.")
    lark = 'start: "x=" /[0-9]{2}/'
    for c in texts(llm, "Answer.", 3, grammar=lark):
        assert re.fullmatch(r"x=[0-9]{2}", c.text)


def test_max_tokens_mid_structure_finishes_with_length(llm):
    (c,) = texts(llm, "Describe a person with pets as JSON.", 1, max_tokens=5, json=SCHEMA)
    assert c.finish_reason == "length" and len(c.token_ids) == 5
    assert_idle(llm)


@pytest.mark.parametrize("spec, message", [
    ({"json": {"type": "objectx"}}, r"^structured_outputs.json: .*objectx"),
    ({"json": "{not json"}, r"^structured_outputs.json: not valid JSON"),
    ({"json": "[1, 2]"}, r"^structured_outputs.json: Expecting object schema"),
    ({"regex": "[a-"}, r"^structured_outputs.regex: .*invalid regex"),
    ({"grammar": "root ::= ("}, r"^structured_outputs.grammar: Expected '\)'"),
    ({"choice": []}, r"^structured_outputs.choice: must be a non-empty list"),
    ({"regex": "a", "choice": ["a"]}, r"^structured_outputs: give exactly one of"),
    ({"schema": {}}, r"^structured_outputs.schema: unknown field"),
    ({"json_object": "yes"}, r"^structured_outputs.json_object: must be true"),
])
def test_bad_specs_name_the_field(llm, spec, message):
    with pytest.raises(ValueError, match=message):
        llm.generate(["x"], SamplingParams(structured_outputs=spec))
    assert_idle(llm)


def test_with_ngram_speculation_the_structured_request_gets_no_proposals(smollm2_dir):
    spec = {"method": "ngram", "num_speculative_tokens": 3}
    llm = LLM(model=smollm2_dir, dtype="float32", quantization="none", kv_cache_memory="64MiB",
              speculative_config=spec)
    llm.engine.spec_costs = None
    try:
        plain = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
        structured = SamplingParams(temperature=0, max_tokens=200,
                                    structured_outputs={"json": SCHEMA})
        outs = llm.generate(["1, 2, 3, 1, 2, 3, 1, 2,", "A person as JSON:"], [plain, structured])
        jsonschema.validate(json.loads(outs[1].outputs[0].text), SCHEMA)
        assert llm.engine.scheduler.spec_drafts > 0  # the other request still speculated
    finally:
        llm.shutdown()


def test_preempted_structured_requests_keep_their_grammar_state(smollm2_dir):
    """Recompute preemption replays K/V, not tokens: each matcher stays where its output is."""
    llm = LLM(model=smollm2_dir, dtype="float32", quantization="none",
              kv_cache_memory=12 * 737_280)  # 12 blocks for 6 growing requests
    try:
        params = SamplingParams(temperature=1.0, max_tokens=120, seed=3,
                                structured_outputs={"json": SCHEMA})
        outs = llm.generate(["Person as JSON:"] * 6, params)
        assert llm.engine.scheduler.num_preemptions > 0
        for o in outs:
            c = o.outputs[0]
            if c.finish_reason == "stop":
                jsonschema.validate(json.loads(c.text), SCHEMA)
            else:  # cut by max_tokens: still a prefix the grammar allows
                assert c.text.startswith("{") and c.finish_reason == "length"
        assert any(o.outputs[0].finish_reason == "stop" for o in outs)
        assert_idle(llm)
    finally:
        llm.shutdown()


def test_a_grammar_past_the_matchers_limits_aborts_rather_than_stops(llm):
    """llguidance gives up on a{1000000} after a few tokens: the request must not claim a
    completed structure ("stop"), nor go on unconstrained."""
    out = llm.generate(["x"], SamplingParams(max_tokens=16, structured_outputs={
        "regex": "a{1000000}"}))[0].outputs[0]
    assert out.finish_reason == "abort" and set(out.text) <= {"a"}
    assert out.stop_reason.startswith("structured_outputs: ")
    assert_idle(llm)
