"""Speculative decoding under structured outputs: proposals are cut at the first token the
grammar forbids, and each verified row is masked by the grammar state after the proposals
before it, so outputs equal the non-speculative ones and always match."""
from __future__ import annotations

import json
import re

import jsonschema
import pytest
from spec_helpers import SPEC, assert_idle, make

from tandem import SamplingParams
from tandem.engine.engine import _grammatical

FRUITS = ["apple", "banana", "cherry", "date"]
SCHEMA = {"type": "object", "properties": {
    "fruits": {"type": "array", "items": {"enum": FRUITS}, "maxItems": 12},
    "count": {"type": "integer", "minimum": 0, "maximum": 99}},
    "required": ["fruits", "count"], "additionalProperties": False}
PROMPT = ('Continue the JSON: {"fruits": ["apple", "banana", "cherry", "date", "apple", '
          '"banana", "cherry", "date"], "count": 8}\nAgain: ')
REGEX = r"( [a-z]{1,10},){4,8} [a-z]{1,10}\."
LIST = "Copy the list exactly: apple, banana, cherry, date, elderberry, fig, grape.\nCopy:"


@pytest.fixture(scope="module")
def engines(smollm2_dir):
    spec, plain = make(smollm2_dir, speculative_config=SPEC), make(smollm2_dir)
    yield spec, plain
    spec.shutdown()
    plain.shutdown()


def _run(llm, prompt: str, **kw):
    return llm.generate([prompt], SamplingParams(max_tokens=120, **kw))[0].outputs


@pytest.mark.parametrize("prompt,constraint", [(PROMPT, {"json": SCHEMA}),
                                               (LIST, {"regex": REGEX})])
def test_greedy_equals_the_non_speculative_output(engines, prompt, constraint):
    spec, plain = engines
    before = spec.engine.scheduler.spec_accepted_tokens
    got = _run(spec, prompt, temperature=0, structured_outputs=constraint)[0]
    want = _run(plain, prompt, temperature=0, structured_outputs=constraint)[0]
    assert got.token_ids == want.token_ids and got.finish_reason == "stop"
    assert spec.engine.scheduler.spec_accepted_tokens > before  # proposals were verified
    assert_idle(spec)


def test_sampled_outputs_still_match(engines):
    spec, _ = engines
    for o in _run(spec, PROMPT, temperature=1.0, n=6, seed=11,
                  structured_outputs={"json": SCHEMA}):
        jsonschema.validate(json.loads(o.text), SCHEMA)
    for o in _run(spec, LIST, temperature=1.0, n=6, seed=12, structured_outputs={"regex": REGEX}):
        assert re.fullmatch(REGEX, o.text) and o.finish_reason == "stop", o.text
    assert_idle(spec)


def test_proposals_stop_at_the_first_forbidden_token(engines):
    spec, _ = engines
    tok = spec.engine.tokenizer
    req_params = SamplingParams(max_tokens=8, structured_outputs={"regex": r" apple, [A-Z]+"})
    spec.engine.add_request("r", LIST, req_params)
    (req,) = [c.req for c in spec.engine.parents["r"].children]
    drafts = tok.encode(" apple, banana, cherry", add_special_tokens=False)
    kept = _grammatical(req, drafts)  # the matcher is at the output's start
    assert tok.decode(kept).startswith(" apple,") and "banana" not in tok.decode(kept)
    assert req.grammar.validate_tokens(drafts) == len(kept)  # and validating consumed nothing
    spec.engine.abort_request("r")
    assert_idle(spec)
