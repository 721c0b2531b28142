"""Tool calls through a live server and the official openai client: `required` and a named
function constrain SmolLM2 to valid calls; streams reassemble to the same calls; a second turn
with the tool's result answers; `auto` reads Hermes blocks (here forced by a regex); the legacy
functions API; bad tool definitions are a 400 naming the field."""
from __future__ import annotations

import json

import jsonschema
import openai
import pytest
from server_utils import MODEL_NAME

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 20},
        "unit": {"enum": ["celsius", "fahrenheit"]},
        "days": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 6},
                 "maxItems": 3}},
        "required": ["city", "unit", "days"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "The time in a time zone",
    "parameters": {"type": "object", "properties": {
        "zone": {"type": "string", "pattern": "^[A-Z][a-z]{1,12}/[A-Z][a-z]{1,12}$"}},
        "required": ["zone"], "additionalProperties": False}}}
TOOLS = [WEATHER, TIME]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
ASK = [{"role": "user", "content": "What is the weather in Paris for the next two days?"}]


def _validate(call) -> dict:
    args = json.loads(call.function.arguments)
    jsonschema.validate(args, SCHEMAS[call.function.name])
    assert call.id.startswith("call_") and call.type == "function"
    return args


def test_required_calls_validate_against_their_tools(client):
    r = client.chat.completions.create(model=MODEL_NAME, messages=ASK, tools=TOOLS,
                                       tool_choice="required", temperature=1.0, n=8, seed=5,
                                       max_tokens=120)
    for c in r.choices:
        assert c.finish_reason == "tool_calls", c.message
        assert c.message.tool_calls and c.message.content is None
        for call in c.message.tool_calls:
            _validate(call)
    r = client.chat.completions.create(model=MODEL_NAME, messages=ASK, tools=TOOLS,
                                       tool_choice="required", parallel_tool_calls=False,
                                       temperature=1.0, n=4, seed=6, max_tokens=120)
    assert all(len(c.message.tool_calls) == 1 for c in r.choices)


def test_named_function_and_its_stream(client):
    kwargs = {"model": MODEL_NAME, "messages": ASK, "tools": TOOLS, "max_tokens": 60, "temperature": 0,
                  "tool_choice": {"type": "function", "function": {"name": "get_time"}}}
    r = client.chat.completions.create(**kwargs)
    (call,) = r.choices[0].message.tool_calls
    assert call.function.name == "get_time" and r.choices[0].finish_reason == "tool_calls"
    _validate(call)
    chunks = list(client.chat.completions.create(**kwargs, stream=True))
    pieces = [t for ch in chunks for t in ch.choices[0].delta.tool_calls or []]
    assert pieces[0].id.startswith("call_") and pieces[0].function.name == "get_time"
    assert len(pieces) > 2  # the arguments come as they are generated, not in one piece
    assert "".join(p.function.arguments for p in pieces) == call.function.arguments
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_streamed_required_calls_reassemble_to_the_same_calls(client):
    kwargs = {"model": MODEL_NAME, "messages": ASK, "tools": TOOLS, "tool_choice": "required",
                  "max_tokens": 120, "temperature": 0}
    whole = client.chat.completions.create(**kwargs).choices[0].message.tool_calls
    calls: dict[int, dict] = {}
    for ch in client.chat.completions.create(**kwargs, stream=True):
        for t in ch.choices[0].delta.tool_calls or [] if ch.choices else []:
            c = calls.setdefault(t.index, {"name": t.function.name, "arguments": ""})
            c["arguments"] += t.function.arguments or ""
    assert [(c["name"], c["arguments"]) for c in calls.values()] == \
        [(c.function.name, c.function.arguments) for c in whole]


def test_second_turn_with_the_tool_result(client):
    first = client.chat.completions.create(model=MODEL_NAME, messages=ASK, tools=TOOLS,
                                           tool_choice="required", max_tokens=120, temperature=0)
    msg = first.choices[0].message
    history = ASK + [msg.model_dump(exclude_none=True)] + [
        {"role": "tool", "tool_call_id": c.id, "content": json.dumps({"temperature": 18})}
        for c in msg.tool_calls]
    r = client.chat.completions.create(model=MODEL_NAME, messages=history, tools=TOOLS,
                                       max_tokens=20, temperature=0)
    assert r.choices[0].message.content or r.choices[0].message.tool_calls
    # the call and its result follow the first turn's prompt
    assert r.usage.prompt_tokens > first.usage.prompt_tokens + 20
    # tool_choice "none": a plain answer, and no tool list in the prompt
    r = client.chat.completions.create(model=MODEL_NAME, messages=history, tools=TOOLS,
                                       tool_choice="none", max_tokens=20, temperature=0)
    assert r.choices[0].message.content and not r.choices[0].message.tool_calls


HERMES_REGEX = (r'I will check\.\n<tool_call>\n\{"name": "get_weather", "arguments": '
                r'\{"city": "(Paris|Rome)", "unit": "celsius", "days": \[[0-6]\]\}\}\n</tool_call>')


def test_auto_reads_hermes_blocks(client):
    kwargs = {"model": MODEL_NAME, "messages": ASK, "tools": TOOLS, "max_tokens": 80, "temperature": 0,
                  "extra_body": {"guided_regex": HERMES_REGEX}}
    r = client.chat.completions.create(**kwargs)
    c = r.choices[0]
    assert c.finish_reason == "tool_calls" and c.message.content == "I will check."
    (call,) = c.message.tool_calls
    assert call.function.name == "get_weather" and _validate(call)["unit"] == "celsius"
    content, args = "", ""
    for ch in client.chat.completions.create(**kwargs, stream=True):
        delta = ch.choices[0].delta
        content += delta.content or ""
        args += "".join(t.function.arguments or "" for t in delta.tool_calls or [])
    assert (content, args) == ("I will check.", call.function.arguments)
    # without a call in the output, auto is a plain answer
    r = client.chat.completions.create(model=MODEL_NAME, messages=ASK, tools=TOOLS,
                                       max_tokens=5, temperature=0)
    assert r.choices[0].message.content and not r.choices[0].message.tool_calls


def test_auto_with_strict_tools_is_constrained(client):
    strict = [{**t, "function": {**t["function"], "strict": True}} for t in TOOLS]
    r = client.chat.completions.create(model=MODEL_NAME, messages=ASK, tools=strict, n=6,
                                       temperature=1.0, seed=9, max_tokens=80)
    for c in r.choices:
        assert "<" not in (c.message.content or ""), c.message  # free text holds no tag
        for call in c.message.tool_calls or []:
            _validate(call)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL_NAME, messages=ASK, tools=strict,
                                       max_tokens=5, extra_body={"guided_regex": "a"})
    assert e.value.param == "guided_regex"


def test_legacy_functions(client):
    r = client.chat.completions.create(model=MODEL_NAME, messages=ASK, max_tokens=60,
                                       temperature=0, functions=[TIME["function"]],
                                       function_call={"name": "get_time"})
    c = r.choices[0]
    assert c.finish_reason == "function_call" and c.message.tool_calls is None
    assert c.message.function_call.name == "get_time"
    jsonschema.validate(json.loads(c.message.function_call.arguments), SCHEMAS["get_time"])


@pytest.mark.parametrize("fields,param", [
    ({"tools": [{"type": "function", "function": {"description": "no name"}}]},
     "tools.0.function.name"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]},
     "tools.0.function.name"),
    ({"tools": [WEATHER, {"type": "function", "function": {
        "name": "f", "parameters": {"type": "object", "properties": {
            "a": {"type": "string", "pattern": "(("}}}}}], "tool_choice": "required"},
     "tools.1.function.parameters"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}},
     "response_format"),
    ({"messages": [{"role": "tool", "content": "18 C"}]}, "messages.0.tool_call_id"),
])
def test_bad_tool_requests_are_400_naming_the_field(client, fields, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(**{"model": MODEL_NAME, "messages": ASK, "max_tokens": 5,
                                          **fields})
    assert e.value.param == param, e.value.body
