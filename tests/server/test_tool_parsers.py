"""Tool calls read out of model text (Hermes blocks, Llama 3 JSON, Tandem's constrained array,
a named function's arguments), the deltas that stream them, the plan a request's tools make,
and the prompts they render: no server needed."""
from __future__ import annotations

import json

import pytest

from tandem.loader.tokenizer import load_tokenizer
from tandem.server.protocol import ChatCompletionRequest
from tandem.server.tool_parsers import (
    parse_arguments_of,
    parse_array,
    parse_hermes,
    parse_llama3_json,
)
from tandem.server.tools import ChoiceOutput, ToolPlan, plan_tools, render_messages

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "parameters": {"type": "object", "properties": {
        "city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time"}}
HERMES = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", '
          '"when": ["now", {"x": "}"}]}}\n</tool_call>\n<tool_call>\n{"name": "get_time", '
          '"arguments": {}}\n</tool_call>')


def _calls(parsed) -> list[tuple[str, dict]]:
    return [(c.name, json.loads(c.arguments)) for c in parsed.calls]


def test_hermes_blocks_and_the_content_before_them():
    p = parse_hermes(HERMES, True)
    assert p.content == "Let me check."
    assert _calls(p) == [("get_weather", {"city": "Paris", "when": ["now", {"x": "}"}]}),
                         ("get_time", {})]
    assert parse_hermes("No tools needed.", True).content == "No tools needed."
    # a block that is not a call object is dropped; arguments given as a JSON string are read
    p = parse_hermes('<tool_call>oops</tool_call><tool_call>{"name": "f", "arguments": '
                     '"{\\"a\\": 1}"}</tool_call>', True)
    assert _calls(p) == [("f", {"a": 1})]


def test_llama3_json_calls_and_plain_answers():
    text = '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Rome"}}; ' \
           '{"name": "get_time", "parameters": {}}'
    assert _calls(parse_llama3_json(text, True)) == [("get_weather", {"city": "Rome"}),
                                                     ("get_time", {})]
    assert parse_llama3_json("Hello there", True).content == "Hello there"
    assert parse_llama3_json('{"answer": 42}', True).content == '{"answer": 42}'


def test_constrained_array_and_named_arguments():
    text = '[{"name":"get_weather","arguments":{"city":"Oslo"}},{"name":"get_time","arguments":{}}]'
    assert _calls(parse_array(text, True)) == [("get_weather", {"city": "Oslo"}),
                                               ("get_time", {})]
    p = parse_arguments_of("get_weather")('{"city":"Oslo"}', True)
    assert _calls(p) == [("get_weather", {"city": "Oslo"})]


@pytest.mark.parametrize("parser,text", [
    (parse_hermes, HERMES),
    (parse_hermes, "Just text, with a < b and <tool_calls> mentioned. "),
    (parse_llama3_json, '{"name": "get_weather", "parameters": {"city": "Rome"}}'),
    (parse_llama3_json, '  {"answer": "not a call"}'),
    (parse_array, '[{"name":"get_weather","arguments":{"city":"a\\"}b"}}]'),
])
def test_streamed_deltas_add_up_to_the_message(parser, text):
    plan = ToolPlan(choice="auto", parser=parser)
    message, reason = ChoiceOutput(plan).message(text, "stop")
    stream, content, calls = ChoiceOutput(plan), "", {}
    for end in range(1, len(text) + 1):  # one character a token: the hardest split
        delta = stream.delta(text[:end], end == len(text))
        content += delta.get("content", "")
        for piece in delta.get("tool_calls", []):
            call = calls.setdefault(piece["index"], {"id": piece.get("id"), "name": None,
                                                     "arguments": ""})
            call["name"] = piece["function"].get("name", call["name"])
            call["arguments"] += piece["function"]["arguments"]
    assert (content or None) == message["content"]
    expected = [{"name": c["function"]["name"], "arguments": c["function"]["arguments"]}
                for c in message.get("tool_calls", [])]
    assert [{"name": c["name"], "arguments": c["arguments"]} for c in calls.values()] == expected
    assert all(c["id"].startswith("call_") for c in calls.values())
    assert reason == ("tool_calls" if expected else "stop")


def test_a_stream_holds_back_what_may_open_a_call():
    stream = ChoiceOutput(ToolPlan(choice="auto", parser=parse_hermes))
    assert stream.delta("Sure <tool", False) == {"content": "Sure"}
    assert stream.delta("Sure <tool_call>\n{\"name\": \"f\"", False)["tool_calls"][0][
        "function"] == {"name": "f", "arguments": ""}


def test_legacy_functions_answer_in_function_call():
    plan = ToolPlan(choice="named", parallel=False, legacy=True,
                    parser=parse_arguments_of("get_time"))
    message, reason = ChoiceOutput(plan).message("{}", "stop")
    assert message == {"role": "assistant", "content": None,
                       "function_call": {"name": "get_time", "arguments": "{}"}}
    assert reason == "function_call"
    stream = ChoiceOutput(plan)
    assert stream.delta("{", False) == {"function_call": {"name": "get_time", "arguments": "{"}}
    assert stream.delta("{}", True) == {"function_call": {"arguments": "}"}}
    # a call cut by max_tokens keeps finish_reason "length"
    assert ChoiceOutput(plan).message("{", "length")[1] == "length"


def _body(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate(
        {"messages": [{"role": "user", "content": "hi"}], **fields})


def test_plans_of_each_tool_choice():
    assert plan_tools(_body(), "hermes") == ToolPlan()
    assert plan_tools(_body(tools=[WEATHER], tool_choice="none"), "hermes") == ToolPlan()
    auto = plan_tools(_body(tools=[WEATHER]), "llama3_json")
    assert (auto.choice, auto.parser, auto.constraint) == ("auto", parse_llama3_json, None)
    named = plan_tools(_body(tools=[WEATHER, TIME], tool_choice={
        "type": "function", "function": {"name": "get_time"}}), "hermes")
    assert named.choice == "named" and named.parts == (named.constraint,)
    assert json.loads(named.constraint.json) == {"type": "object", "properties": {}}
    assert named.constraint.label == "tools.1.function.parameters"
    required = plan_tools(_body(tools=[WEATHER, TIME], tool_choice="required",
                                parallel_tool_calls=False), "hermes")
    schema = json.loads(required.constraint.json)
    assert schema["maxItems"] == 1 and len(schema["items"]["anyOf"]) == 2
    assert list(schema["items"]["anyOf"][0]["properties"]) == ["name", "arguments"]
    legacy = plan_tools(_body(functions=[WEATHER["function"]],
                              function_call={"name": "get_weather"}), "hermes")
    assert legacy.legacy and not legacy.parallel and legacy.choice == "named"


@pytest.mark.parametrize("fields,field", [
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice"),
    ({"tools": [WEATHER, WEATHER]}, "tools.1.function.name"),
    ({"tools": [WEATHER], "functions": [WEATHER["function"]]}, "tools"),
    ({"function_call": "auto"}, "function_call"),
    ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}},
     "response_format"),
    ({"tools": [WEATHER], "tool_choice": "required", "guided_regex": "a"}, "guided_regex"),
])
def test_bad_tool_requests_name_the_field(fields, field):
    with pytest.raises(ValueError, match=rf"^{field}: "):
        plan_tools(_body(**fields), "hermes")


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    return load_tokenizer(smollm2_dir)


HISTORY = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function",
     "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "18 C"},
]


def test_fallback_prompt_for_a_template_without_tools(tokenizer):
    body = _body(messages=HISTORY, tools=[WEATHER])
    text, ids = render_messages(tokenizer, body.messages, plan_tools(body, "hermes").tools)
    assert '"name": "get_weather"' in text and "<tools>" in text
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' \
        in text
    assert "<|im_start|>user\n<tool_response>\n18 C\n</tool_response>" in text
    assert tokenizer.decode(ids) == text
    legacy = _body(messages=[*HISTORY[:1], {"role": "function", "name": "get_time",
                                            "content": "noon"}], functions=[TIME["function"]])
    text, _ = render_messages(tokenizer, legacy.messages, plan_tools(legacy, "hermes").tools)
    assert "<tool_response>\nget_time: noon\n</tool_response>" in text


def test_a_template_that_takes_tools_renders_them(tokenizer, monkeypatch):
    monkeypatch.setattr(tokenizer, "chat_template", (
        "{% for t in tools or [] %}[tool {{ t.function.name }}]{% endfor %}"
        "{% for m in messages %}<{{ m.role }}>{{ m.content or '' }}"
        "{% for c in m.tool_calls or [] %}[call {{ c.function.name }} "
        "{{ c.function.arguments | tojson }}]{% endfor %}"
        "{% if m.tool_call_id %}[re {{ m.tool_call_id }}]{% endif %}{% endfor %}"))
    body = _body(messages=HISTORY, tools=[WEATHER])
    text, _ = render_messages(tokenizer, body.messages, plan_tools(body, "hermes").tools, False)
    assert text == ('[tool get_weather]<user>Weather in Paris?<assistant>[call get_weather '
                    '{"city": "Paris"}]<tool>18 C[re call_1]')


STRICT = {"type": "function", "function": {
    "name": "get_weather", "strict": True, "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "maxLength": 10}},
        "required": ["city"], "additionalProperties": False}}}


@pytest.mark.parametrize("parser,good,bad", [
    ("hermes", ('Sure.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n'
               '</tool_call>'),
     '<tool_call>\n{"name": "get_weather", "arguments": {"town": "Oslo"}}\n</tool_call>'),
    ("llama3_json", '{"name": "get_weather", "parameters": {"city": "Oslo"}}',
     '{"name": "get_weather", "parameters": {"city": 5}}'),
])
def test_strict_tools_constrain_auto_calls_and_leave_text_free(tokenizer, parser, good, bad):
    from tandem.structured.grammar import GrammarCache

    plan = plan_tools(_body(tools=[STRICT, TIME]), parser)
    assert plan.choice == "auto" and plan.parts == (plan.parts[0],)
    assert plan.parts[0].label == "tools.0.function.parameters"
    grammars = GrammarCache(tokenizer, len(tokenizer))

    def accepts(text: str) -> bool:
        ids = tokenizer.encode(text, add_special_tokens=False)
        m = grammars.matcher(plan.constraint)
        if m.validate_tokens(ids) < len(ids):
            return False
        m.consume_tokens(ids)
        return m.is_accepting()

    assert accepts(good) and accepts("It is sunny, no call needed.")
    assert not accepts(bad)
    # a non-strict tool's arguments are only an object
    other = good.replace('"get_weather"', '"get_time"').replace('"city": "Oslo"', '"x": 1')
    assert accepts(other)
    with pytest.raises(ValueError, match="^response_format: cannot be combined with strict"):
        plan_tools(_body(tools=[STRICT], response_format={"type": "json_object"}), parser)
