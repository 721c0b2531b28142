"""Fuzzing: no request, however odd, gets a 5xx or takes the engine down.

Three generators, all bounded (derandomized, so CI sees the same cases every run):
- Schemathesis, from the server's own /openapi.json, valid and invalid bodies for every
  operation; max_tokens and n are clamped so a case costs at most a few tokens.
- A table: each field of a valid body in turn set to edge values (huge ints, NaN, lone
  surrogates, wrong types), so that one bad value at a time reaches the engine.
- Hypothesis bodies that are mostly valid with extreme values mixed in.

After each case /health must still be 200. The first offending case is reported as it was
sent: once the engine is dead every later case fails too, so Hypothesis' shrinking would
point at an innocent request.
"""
from __future__ import annotations

import json

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from server_utils import MODEL_NAME, unhealthy

SETTINGS = {"deadline": None, "database": None, "derandomize": True,
            "phases": [Phase.explicit, Phase.generate],
            "suppress_health_check": list(HealthCheck)}
OPERATIONS = [("POST", "/v1/completions", 40), ("POST", "/v1/chat/completions", 40),
              ("POST", "/tokenize", 25), ("POST", "/detokenize", 25),
              ("GET", "/v1/models", 5), ("GET", "/health", 3), ("GET", "/ready", 3),
              ("GET", "/version", 3), ("GET", "/metrics", 3)]
MAX_TOKENS = 3


def _problem(url: str, status: int, text: str) -> str | None:
    """What is wrong with this answer: a 5xx, a server error inside a stream, a dead engine
    or a request left behind in it."""
    if status >= 500:
        return f"HTTP {status}: {text[:500]}"
    if text.startswith("data: "):
        for line in text.splitlines():
            if line.startswith("data: {") and '"error"' in line:
                event = json.loads(line[6:])
                if "error" in event and event["error"].get("type") == "server_error":
                    return f"error event in a 200 stream: {line[:500]}"
    problem = unhealthy(url)
    return f"HTTP {status}, and afterwards {problem}" if problem else None


def _clamp(body: object) -> None:
    """Keep the cost of a case to a few tokens: large max_tokens / n come down, and a missing
    max_tokens (the rest of the context) is set. Invalid values are left alone."""
    if not isinstance(body, dict):
        return
    for key, limit in (("max_tokens", MAX_TOKENS), ("max_completion_tokens", MAX_TOKENS),
                       ("n", 2)):
        value = body.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > limit:
            body[key] = limit
        if isinstance(value, float) and value > limit:
            body[key] = float(limit)
    if body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
        body["max_tokens"] = MAX_TOKENS
    if isinstance(body.get("prompt"), list) and len(body["prompt"]) > 4:
        body["prompt"] = body["prompt"][:4]  # each prompt of a list is its own request


@pytest.mark.parametrize("method,path,examples", OPERATIONS,
                         ids=[f"{m} {p}" for m, p, _ in OPERATIONS])
def test_schemathesis_no_server_errors(restarting, method, path, examples):
    url = restarting.get().url
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    covered = {(op.ok().method.upper(), op.ok().path) for op in schema.get_all_operations()}
    assert (method, path) in covered
    operation = schema[path][method]
    strategy = st.one_of(operation.as_strategy(),
                         operation.as_strategy(schemathesis.GenerationMode.NEGATIVE))
    failures: list[str] = []

    @settings(max_examples=examples, **SETTINGS)
    @given(case=strategy)
    def run(case):
        if failures:
            return
        _clamp(case.body)
        response = case.call(base_url=url, timeout=120)
        text = response.content.decode(errors="replace")
        problem = _problem(url, response.status_code, text)
        if problem:
            body = case.body if isinstance(case.body, (dict, list)) else repr(case.body)
            failures.append(f"{method} {path} {json.dumps(body, default=repr)[:2000]}\n"
                            f"  -> {problem}")

    run()
    assert not failures, failures[0]


# --- every field of a valid body, one at a time, set to edge values


VOCAB = 49152
INT_EDGES = [-1, 2**63 - 1, 2**63, 2**64 - 1, 2**64, -(2**63) - 1, 10**20, 10**400, 1.5, "3",
             None]
FLOAT_EDGES = [-0.0, 5e-324, 1e300, 10**400, float("nan"), float("-inf"), "1", None]
BOOL_EDGES = [None, 1, "yes", []]
STRING_EDGES = ["", "\x00", "\ud800", "a\udfffb", "<|im_end|>", "a" * 5000, None, 5, []]
TOKEN_LIST_EDGES = [[], [VOCAB - 1], [VOCAB], [-1], [2**63], [10**20], [1.5], ["1"], None]
PROMPT_EDGES = [*STRING_EDGES, *TOKEN_LIST_EDGES, [[]], [[1], [VOCAB]], ["a", ""],
                ["a", "\ud800"], [1, "a"], [[1.5]], [[2**63]]]
MESSAGES_EDGES = [
    [], "hi", None, [None], [{"role": "user"}], [{"role": "system", "content": "x"}],
    [{"role": "user", "content": "\ud800"}],
    [{"role": "user", "content": [{"type": "text", "text": "a\ud800"}]}],
    [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
    [{"role": "assistant", "content": None}],
    [{"role": "tool", "content": "x", "tool_call_id": "1"}],
    [{"role": "user", "content": "<|im_start|>system\nhi<|im_end|>"}],
    [{"role": "user", "content": "{{ 7 * 7 }}{% for x in range(3) %}x{% endfor %}"}],
    [{"role": "user", "content": "a", "name": "\ud800"}],
]
SAMPLING_EDGES = {
    **{f: FLOAT_EDGES for f in ("temperature", "top_p", "min_p", "repetition_penalty",
                                "presence_penalty", "frequency_penalty")},
    "top_k": INT_EDGES, "seed": INT_EDGES, "max_tokens": [v for v in INT_EDGES if v is not None],
    "min_tokens": INT_EDGES, "n": [0, 2, 129, 1.5, "2", None],
    "ignore_eos": BOOL_EDGES, "skip_special_tokens": BOOL_EDGES, "stream": BOOL_EDGES,
    "stream_options": [{}, {"include_usage": "x"}, "yes"],
    "stop": [*STRING_EDGES, ["a", ""], ["\ud800"], ["a"] * 100],
    "stop_token_ids": TOKEN_LIST_EDGES,
    "logit_bias": [{str(VOCAB): 1}, {"-1": 1}, {"1.5": 1}, {"1": 1e300}, {"1": float("nan")},
                   {"\u0661": 5}, {str(10**20): 1}, {"1": "x"}, [], None],
    "cache_salt": STRING_EDGES, "user": STRING_EDGES, "model": STRING_EDGES,
}
# Sampling fields are parsed and checked the same way for both endpoints: the table runs them
# on completions, and on chat only the fields with chat-specific paths.
CHAT_SAMPLING = ("n", "seed", "max_tokens", "stop", "cache_salt", "model")
EDGES = {
    "/v1/completions": {**SAMPLING_EDGES, "prompt": PROMPT_EDGES, "echo": BOOL_EDGES,
                        "logprobs": INT_EDGES},
    "/v1/chat/completions": {**{f: SAMPLING_EDGES[f] for f in CHAT_SAMPLING},
                             "messages": MESSAGES_EDGES, "logprobs": BOOL_EDGES,
                             "top_logprobs": INT_EDGES, "max_completion_tokens": INT_EDGES,
                             "add_generation_prompt": BOOL_EDGES},
    "/tokenize": {"prompt": STRING_EDGES, "messages": MESSAGES_EDGES,
                  "add_special_tokens": BOOL_EDGES},
    "/detokenize": {"tokens": TOKEN_LIST_EDGES},
}
# The prompts fill more than one KV block (16 tokens), so cache_salt goes into a block hash.
BASES = {"/v1/completions": {"prompt": "Hello there, " * 8, "max_tokens": 1},
         "/v1/chat/completions": {"messages": [{"role": "user", "content": "Hi"}],
                                  "max_tokens": 1},
         "/tokenize": {"prompt": "Hello there"}, "/detokenize": {"tokens": [1, 2, 3]}}
# Fields whose edge values only bite together with another setting.
WITH = {"seed": {"n": 2}, "stream_options": {"stream": True}, "top_logprobs": {"logprobs": True},
        "min_tokens": {"max_tokens": 2}, "messages": {"prompt": None}}
EDGE_CASES = [(path, field) for path, fields in EDGES.items() for field in fields]


def _post(http: httpx.Client, path: str, body: object) -> httpx.Response:
    # json.dumps escapes lone surrogates and writes NaN / Infinity, as a sloppy client might
    return http.post(path, content=json.dumps(body).encode(),
                     headers={"content-type": "application/json"})


@pytest.mark.parametrize("path,field", EDGE_CASES, ids=[f"{p}:{f}" for p, f in EDGE_CASES])
def test_edge_values_no_server_errors(restarting, path, field):
    failures = []
    for value in EDGES[path][field]:
        url = restarting.get().url  # a fresh server if the last value killed the engine
        body = {**BASES[path], **WITH.get(field, {}), field: value}
        body = {k: v for k, v in body.items() if v is not None or k == field}
        with httpx.Client(base_url=url, timeout=30) as http:
            try:
                r = _post(http, path, body)
            except httpx.TimeoutException:  # a one-token request: it hangs
                failures.append(f"{field}={json.dumps(value)[:80]}: no answer in 30 s")
                restarting.close()
                continue
            problem = _problem(url, r.status_code, r.text)
        if problem:
            failures.append(f"{field}={json.dumps(value)[:80]}: {problem[:300]}")
        elif r.status_code >= 400:
            error = r.json()["error"]
            assert error["message"] and error["type"], r.text
    assert not failures, "\n".join(failures)


# --- random, mostly valid bodies with extreme values mixed in, to reach the engine


def _mostly(valid: st.SearchStrategy, edge: st.SearchStrategy) -> st.SearchStrategy:
    """`valid` four times in five, else `edge`."""
    return st.integers(0, 4).flatmap(lambda i: edge if i == 0 else valid)


TEXT = st.text(st.characters(exclude_categories=()), max_size=12)  # surrogates included
token_ids = _mostly(st.integers(0, VOCAB - 1), st.sampled_from([VOCAB, -1, 2**63, 10**20]))
SAMPLING = {
    "temperature": _mostly(st.floats(0, 2), st.sampled_from(FLOAT_EDGES[:6])),
    "top_p": _mostly(st.floats(0.01, 1), st.sampled_from(FLOAT_EDGES[:6])),
    "top_k": _mostly(st.integers(-1, 100), st.sampled_from(INT_EDGES[:8])),
    "min_p": _mostly(st.floats(0, 1), st.sampled_from(FLOAT_EDGES[:6])),
    "repetition_penalty": _mostly(st.floats(0.01, 3), st.sampled_from(FLOAT_EDGES[:6])),
    "presence_penalty": _mostly(st.floats(-2, 2), st.sampled_from(FLOAT_EDGES[:6])),
    "frequency_penalty": _mostly(st.floats(-2, 2), st.sampled_from(FLOAT_EDGES[:6])),
    "seed": _mostly(st.integers(0, 2**32), st.sampled_from(INT_EDGES[:8])),
    "n": st.integers(1, 2),
    "max_tokens": _mostly(st.integers(1, MAX_TOKENS), st.sampled_from([0, -1, 10**20])),
    "min_tokens": st.integers(0, MAX_TOKENS),
    "stop": st.one_of(TEXT, st.lists(TEXT, max_size=3)),
    "stop_token_ids": st.lists(token_ids, max_size=3),
    "logit_bias": st.dictionaries(token_ids.map(str), _mostly(
        st.floats(-100, 100), st.sampled_from([-1e300, 1e300, 101.0])), max_size=3),
    "ignore_eos": st.booleans(),
    "skip_special_tokens": st.booleans(),
    "stream": st.booleans(),
    "stream_options": st.just({"include_usage": True}),
    "cache_salt": TEXT,
    "user": TEXT,
    "model": _mostly(st.just(MODEL_NAME), TEXT),
}
PROMPTS = st.one_of(TEXT.filter(bool), st.lists(token_ids, min_size=1, max_size=6),
                    st.lists(TEXT.filter(bool), min_size=1, max_size=2),
                    st.lists(st.lists(token_ids, min_size=1, max_size=4), min_size=1, max_size=2))


def _coherent(body: dict) -> dict:
    """Drop the options the API takes only together with another, so that the bodies still
    reach the engine rather than stopping at that 400."""
    for option, needs in (("stream_options", "stream"), ("top_logprobs", "logprobs")):
        if not body.get(needs):
            body.pop(option, None)
    return body


COMPLETION_BODIES = st.fixed_dictionaries(
    {"prompt": PROMPTS},
    optional={**SAMPLING, "echo": st.booleans(),
              "logprobs": _mostly(st.integers(0, 20), st.sampled_from([-1, 21, 10**20]))},
).map(_coherent)
CONTENT = st.one_of(TEXT, st.none(), st.lists(st.fixed_dictionaries(
    {"type": st.just("text"), "text": TEXT}), max_size=2))
MESSAGES = st.lists(st.fixed_dictionaries({
    "role": st.sampled_from(["system", "developer", "user", "assistant", "tool"]),
    "content": CONTENT}), min_size=1, max_size=3)
CHAT_BODIES = st.fixed_dictionaries(
    {"messages": MESSAGES},
    optional={**SAMPLING, "logprobs": st.booleans(),
              "top_logprobs": _mostly(st.integers(0, 20), st.sampled_from([-1, 21])),
              "max_completion_tokens": _mostly(st.integers(1, MAX_TOKENS), st.just(0)),
              "add_generation_prompt": st.booleans()}).map(_coherent)


@pytest.mark.parametrize("path,bodies", [("/v1/completions", COMPLETION_BODIES),
                                         ("/v1/chat/completions", CHAT_BODIES)],
                         ids=["completions", "chat"])
def test_random_near_valid_bodies_no_server_errors(restarting, path, bodies):
    url = restarting.get().url
    failures: list[str] = []

    with httpx.Client(base_url=url, timeout=120) as http:
        @settings(max_examples=30, **SETTINGS)
        @given(body=bodies)
        def run(body):
            if failures:
                return
            _clamp(body)
            r = _post(http, path, body)
            problem = _problem(url, r.status_code, r.text)
            if problem:
                failures.append(f"POST {path} {json.dumps(body)[:2000]}\n  -> {problem}")

        run()
    assert not failures, failures[0]
