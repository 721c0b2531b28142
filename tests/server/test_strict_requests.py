"""Request bodies are read as OpenAI reads them: exact JSON types, and a 400 naming the field for
whatever Tandem does not implement, instead of accepting it and quietly doing something else."""
from __future__ import annotations

import openai
import pytest
from server_utils import MODEL_NAME, assert_error

COMPLETION = {"prompt": "Hello", "max_tokens": 2}
CHAT = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 2}
TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}


def _case(path: str, base: dict, param: str, **fields) -> tuple[str, dict, str]:
    return path, {**base, **fields}, param


def _cmpl(param: str, **fields) -> tuple[str, dict, str]:
    return _case("/v1/completions", COMPLETION, param, **fields)


def _chat(param: str, **fields) -> tuple[str, dict, str]:
    return _case("/v1/chat/completions", CHAT, param, **fields)


def _message(**fields) -> list[dict]:
    return [{"role": "user", "content": "Hello", **fields}]


# A value of the wrong JSON type is rejected, not converted ("5" -> 5, true -> 1, 5.0 -> 5).
WRONG_TYPES = [
    _cmpl("max_tokens", max_tokens="5"), _cmpl("max_tokens", max_tokens=True),
    _cmpl("max_tokens", max_tokens=5.0), _cmpl("n", n="2"), _cmpl("n", n=2.0),
    _cmpl("seed", seed="1"), _cmpl("top_k", top_k=True), _cmpl("logprobs", logprobs=True),
    _cmpl("stream", stream="yes"), _cmpl("stream", stream=1), _cmpl("echo", echo="true"),
    _cmpl("stream_options.include_usage", stream=True, stream_options={"include_usage": "yes"}),
    _cmpl("temperature", temperature="1"), _cmpl("temperature", temperature=True),
    _cmpl("logit_bias.1", logit_bias={"1": "5"}), _cmpl("user", user=5),
    _cmpl("cache_salt", cache_salt=1), _cmpl("stop_token_ids.0", stop_token_ids=[2.0]),
    _chat("max_tokens", max_tokens="5"), _chat("max_completion_tokens", max_completion_tokens=1.0),
    _chat("n", n="2"), _chat("logprobs", logprobs="true"), _chat("logprobs", logprobs=1),
    _chat("top_logprobs", logprobs=True, top_logprobs="2"),
    _chat("stream_options.include_usage", stream=True, stream_options={"include_usage": 1}),
    _chat("add_generation_prompt", add_generation_prompt=0),
    _chat("messages.0.role", messages=[{"role": 1, "content": "Hello"}]),
    ("/tokenize", {"prompt": "Hello", "add_special_tokens": "false"}, "add_special_tokens"),
    ("/tokenize", {"prompt": 5}, "prompt"),
    # a field of several types is named as sent, not by the union member pydantic tried
    _cmpl("stop", stop=5), _cmpl("prompt", prompt=5), _chat("messages.0.content",
                                                          messages=[{"role": "user", "content": 5}]),
    ("/detokenize", {"tokens": [1.0]}, "tokens.0"),
    ("/detokenize", {"tokens": [True]}, "tokens.0"),
]

# OpenAI fields Tandem does not implement: "not supported", never silently dropped.
NOT_SUPPORTED = [
    _cmpl("suffix", suffix="!"),
]

# Options OpenAI takes only together with another, or with one value Tandem honours.
CONDITIONAL = [
    _cmpl("best_of", best_of=2), _cmpl("best_of", n=2, best_of=3), _cmpl("best_of", n=2, best_of=1),
    _cmpl("stream_options", stream_options={"include_usage": True}),
    _chat("stream_options", stream=False, stream_options={"include_usage": True}),
    _chat("top_logprobs", top_logprobs=2), _chat("top_logprobs", logprobs=False, top_logprobs=0),
    # a message's fields belong to its role (a participant `name` is not implemented)
    _chat("messages.0.name", messages=_message(name="bob")),
    _chat("messages.0.tool_call_id", messages=_message(tool_call_id="1")),
    _chat("messages.0.tool_call_id", messages=_message(role="tool")),
    _chat("messages.0.tool_calls", messages=_message(tool_calls=[
        {"id": "1", "type": "function", "function": {"name": "f", "arguments": "{}"}}])),
    _chat("messages.0.name", messages=_message(role="function")),
    # tool options need tools; the legacy fields do not mix with the current ones
    _chat("tool_choice", tool_choice="auto"), _chat("parallel_tool_calls", parallel_tool_calls=False),
    _chat("tools", tools=[TOOL], functions=[TOOL["function"]]),
    _chat("function_call", function_call="auto"),
]

UNKNOWN = [
    _cmpl("foo", foo=1), _cmpl("foo", foo=None), _chat("best_of", best_of=1),
    _cmpl("stream_options.x", stream=True, stream_options={"include_usage": True, "x": 1}),
    _chat("messages.0.foo", messages=_message(foo="x")),
    ("/tokenize", {"prompt": "Hello", "add_generation_prompt": True}, "add_generation_prompt"),
    ("/detokenize", {"tokens": [1], "skip_special_tokens": True}, "skip_special_tokens"),
]


# (path, body, param, what the message says after "param: ")
CASES = [(*case, message) for cases, message in [
    (WRONG_TYPES, "Input should be"), (NOT_SUPPORTED, "not supported by Tandem"),
    (CONDITIONAL, ""), (UNKNOWN, "unknown field")] for case in cases]


@pytest.mark.parametrize("path,body,param,message", CASES,
                         ids=[f"{c[0]}:{c[2]}:{i}" for i, c in enumerate(CASES)])
def test_rejected_with_400_naming_the_field(http, path, body, param, message):
    err = assert_error(http.post(path, json=body), 400, param=param)
    assert err["type"] == "invalid_request_error", err
    assert err["message"].startswith(f"{param}: {message}"), err


@pytest.mark.parametrize("path,body", [
    ("/v1/completions", {**COMPLETION, "suffix": None, "best_of": None, "stop": None,
                         "seed": None, "stream_options": None, "temperature": 1, "top_p": 1,
                         "n": None, "stream": None, "echo": None, "presence_penalty": None,
                         "min_tokens": None, "ignore_eos": None}),
    ("/v1/completions", {**COMPLETION, "n": 2, "best_of": 2}),
    ("/v1/chat/completions", {**CHAT, "response_format": None, "tools": None,
                              "tool_choice": None, "functions": None, "function_call": None,
                              "parallel_tool_calls": None, "logprobs": False,
                              "top_logprobs": None, "temperature": 1, "presence_penalty": 0,
                              "n": None, "stream": None, "add_generation_prompt": None,
                              "messages": _message(name=None, tool_calls=None,
                                                   tool_call_id=None)}),
], ids=["completions-nulls", "completions-best_of", "chat-nulls"])
def test_null_means_not_set_and_ints_are_floats(http, path, body):
    r = http.post(path, json=body)
    assert r.status_code == 200, r.text
    assert len(r.json()["choices"]) == (body.get("n") or 1)


def test_openai_client_requests_still_work(client):
    r = client.completions.create(model=MODEL_NAME, prompt="Hello", max_tokens=2, temperature=1,
                                  n=2, best_of=2)
    assert len(r.choices) == 2
    chunks = list(client.chat.completions.create(
        model=MODEL_NAME, messages=CHAT["messages"], max_tokens=2, temperature=1, n=2,
        stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    assert {c.choices[0].index for c in chunks if c.choices} == {0, 1}
    assert chunks[-1].usage.completion_tokens == 4
    chunks = list(client.completions.create(
        model=MODEL_NAME, prompt="Hello", max_tokens=2, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    assert chunks[-1].usage.completion_tokens == 2


def test_openai_client_sees_which_field(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL_NAME, messages=CHAT["messages"], max_tokens=2,
                                       tools=[{"type": "function", "function": {}}])
    assert e.value.param == "tools.0.function.name"
