"""Structured outputs through a live server and the official openai client: response_format
(json_schema, json_object) and vLLM's guided_* extras; bad constraints are a 400 naming the
field."""
from __future__ import annotations

import json
import re

import jsonschema
import openai
import pytest
from server_utils import MODEL_NAME

SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 24},
        "population": {"type": "integer", "minimum": 0},
        "tags": {"type": "array", "items": {"enum": ["coast", "river", "capital"]},
                 "maxItems": 3},
        "mayor": {"type": "object", "properties": {
            "name": {"type": "string", "maxLength": 24},
            "since": {"type": "string", "pattern": "^(19|20)[0-9]{2}$"}},
            "required": ["name", "since"], "additionalProperties": False},
    },
    "required": ["city", "population", "tags", "mayor"],
    "additionalProperties": False,
}
MESSAGES = [{"role": "user", "content": "Describe a city as JSON."}]


def test_sixteen_sampled_json_schema_replies_all_validate(client):
    r = client.chat.completions.create(
        model=MODEL_NAME, messages=MESSAGES, temperature=1.0, max_tokens=200, n=16, seed=3,
        response_format={"type": "json_schema",
                         "json_schema": {"name": "city", "schema": SCHEMA, "strict": True}})
    assert len(r.choices) == 16
    for c in r.choices:
        assert c.finish_reason == "stop", c.message.content
        jsonschema.validate(json.loads(c.message.content), SCHEMA)


def test_json_object_and_the_guided_extras(client):
    r = client.chat.completions.create(
        model=MODEL_NAME, temperature=0, max_tokens=100, response_format={"type": "json_object"},
        messages=[{"role": "user", "content": 'Reply with exactly {"ok": true}'}])
    assert r.choices[0].finish_reason == "stop", r.choices[0].message.content
    assert isinstance(json.loads(r.choices[0].message.content), dict)
    r = client.completions.create(model=MODEL_NAME, prompt="Call me at", max_tokens=20, n=4,
                                  temperature=1.0, extra_body={"guided_regex": r"\d{3}-\d{4}"})
    assert all(re.fullmatch(r"\d{3}-\d{4}", c.text) for c in r.choices)
    r = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=10, n=4,
                                       temperature=1.0,
                                       extra_body={"guided_choice": ["Paris", "Rome"]})
    assert {c.message.content for c in r.choices} <= {"Paris", "Rome"}
    r = client.chat.completions.create(
        model=MODEL_NAME, messages=MESSAGES, max_tokens=10, temperature=0,
        extra_body={"structured_outputs": {"grammar": 'root ::= "yes" | "no"'}})
    assert r.choices[0].message.content in ("yes", "no")


def test_a_streamed_structured_reply_reassembles(client):
    chunks = client.chat.completions.create(
        model=MODEL_NAME, messages=MESSAGES, temperature=1.0, max_tokens=200, seed=5,
        stream=True, response_format={"type": "json_schema",
                                      "json_schema": {"name": "city", "schema": SCHEMA}})
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    jsonschema.validate(json.loads(text), SCHEMA)


@pytest.mark.parametrize("kw, param, message", [
    ({"response_format": {"type": "json_schema",
                          "json_schema": {"name": "x", "schema": {"type": "objectx"}}}},
     "response_format.json_schema.schema", "Invalid type"),
    ({"response_format": {"type": "json_schema"}}, "response_format",
     "json_schema is required"),
    ({"response_format": {"type": "bogus"}}, "response_format.type", ""),
    ({"extra_body": {"guided_regex": "[a-"}}, "guided_regex", "at 1"),
    ({"extra_body": {"guided_grammar": "root ::= ("}}, "guided_grammar", "Expected"),
    ({"extra_body": {"guided_choice": []}}, "guided_choice", "must be a non-empty list"),
    ({"response_format": {"type": "json_object"}, "extra_body": {"guided_regex": "a"}},
     "guided_regex", "only one of response_format, guided_regex"),
])
def test_bad_constraints_are_a_400_naming_the_field(client, kw, param, message):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=5, **kw)
    assert e.value.param == param
    assert message in e.value.message
