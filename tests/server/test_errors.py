"""Every error the API promises, over raw HTTP: status code and OpenAI's error body."""
from __future__ import annotations

import json
import time

import httpx
import openai
import pytest
from server_utils import (
    API_KEYS,
    MODEL_NAME,
    assert_error,
    metrics,
    start_server,
)

MAX_REQUEST_BYTES = 4096
OK_BODY = {"prompt": "Hello", "max_tokens": 2}
CHAT_OK = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 2}


def _with(body: dict, **fields) -> dict:
    return {**body, **fields}


# (path, body, param): each must be a 400 naming `param`.
BAD_REQUESTS = [
    ("/v1/completions", _with(OK_BODY, temperature=-1), "temperature"),
    ("/v1/completions", _with(OK_BODY, top_p=2), "top_p"),
    ("/v1/completions", _with(OK_BODY, top_p=0), "top_p"),
    ("/v1/completions", _with(OK_BODY, n=0), "n"),
    ("/v1/completions", _with(OK_BODY, max_tokens=-1), "max_tokens"),
    ("/v1/completions", _with(OK_BODY, logprobs=99), "logprobs"),
    ("/v1/completions", _with(OK_BODY, max_tokens="abc"), "max_tokens"),
    ("/v1/completions", _with(OK_BODY, n="two"), "n"),
    ("/v1/completions", _with(OK_BODY, seed="abc"), "seed"),
    ("/v1/completions", _with(OK_BODY, stream="maybe"), "stream"),
    ("/v1/completions", _with(OK_BODY, top_k=-2), "top_k"),
    ("/v1/completions", _with(OK_BODY, min_p=1.5), "min_p"),
    ("/v1/completions", _with(OK_BODY, repetition_penalty=0), "repetition_penalty"),
    ("/v1/completions", _with(OK_BODY, presence_penalty=3), "presence_penalty"),
    ("/v1/completions", _with(OK_BODY, frequency_penalty=-3), "frequency_penalty"),
    ("/v1/completions", _with(OK_BODY, min_tokens=5), "min_tokens"),
    ("/v1/completions", _with(OK_BODY, stop=[""]), "stop"),
    ("/v1/completions", _with(OK_BODY, stop_token_ids=[-1]), "stop_token_ids"),
    ("/v1/completions", _with(OK_BODY, stop_token_ids=[10**8]), "stop_token_ids"),
    ("/v1/completions", _with(OK_BODY, logit_bias={"x": 1}), "logit_bias"),
    ("/v1/completions", _with(OK_BODY, logit_bias={"1": 500}), "logit_bias"),
    ("/v1/completions", _with(OK_BODY, logit_bias={"99999999": 1}), "logit_bias"),
    ("/v1/completions", {"max_tokens": 2}, "prompt"),
    ("/v1/completions", _with(OK_BODY, prompt=""), "prompt"),
    ("/v1/completions", _with(OK_BODY, prompt=[]), "prompt"),
    ("/v1/completions", _with(OK_BODY, prompt=[[]]), "prompt"),
    ("/v1/completions", _with(OK_BODY, prompt=[99999999]), "prompt"),
    ("/v1/completions", _with(OK_BODY, prompt=[-1]), "prompt"),
    ("/v1/completions", _with(OK_BODY, prompt=[[1, 2], [99999999]]), "prompt"),
    ("/v1/chat/completions", {"max_tokens": 2}, "messages"),
    ("/v1/chat/completions", _with(CHAT_OK, messages=[]), "messages"),
    ("/v1/chat/completions", _with(CHAT_OK, messages=[{"role": "wizard", "content": "x"}]),
     "messages.0.role"),
    ("/v1/chat/completions", _with(CHAT_OK, temperature=-1), "temperature"),
    ("/v1/chat/completions", _with(CHAT_OK, top_p=2), "top_p"),
    ("/v1/chat/completions", _with(CHAT_OK, n=0), "n"),
    ("/v1/chat/completions", _with(CHAT_OK, max_tokens=-1), "max_tokens"),
    ("/v1/chat/completions", _with(CHAT_OK, max_tokens="abc"), "max_tokens"),
    ("/v1/chat/completions", _with(CHAT_OK, logprobs=True, top_logprobs=99), "top_logprobs"),
    ("/detokenize", {"tokens": "abc"}, "tokens"),
    ("/detokenize", {}, "tokens"),
    ("/tokenize", {"prompt": "a", "messages": [{"role": "user", "content": "b"}]}, "prompt"),
]


@pytest.mark.parametrize("path,body,param", BAD_REQUESTS,
                         ids=[f"{p}:{param}:{i}" for i, (p, _, param) in enumerate(BAD_REQUESTS)])
def test_invalid_values_are_400_naming_param(http, path, body, param):
    err = assert_error(http.post(path, json=body), 400, param=param)
    assert err["type"] == "invalid_request_error"


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_max_tokens_zero_is_rejected_as_such(http, path):
    """max_tokens=0 is an invalid value, not "unset": it must not fall back to the default
    (the whole context), which is only rejected here because it overflows the KV cache."""
    body = OK_BODY if path == "/v1/completions" else CHAT_OK
    err = assert_error(http.post(path, json=_with(body, max_tokens=0)), 400, param="max_tokens")
    assert "KV cache" not in err["message"] and "context length" not in err["message"], err


@pytest.mark.parametrize("payload", [b"{bad", b'{"prompt": "x",}', b"", b"\xff\xfe"])
def test_bad_json_is_400(http, payload):
    r = http.post("/v1/completions", content=payload,
                  headers={"content-type": "application/json"})
    err = assert_error(r, 400)
    assert err["type"] == "invalid_request_error"
    # The position of the syntax error is not a parameter name.
    assert err["param"] in (None, "body"), err


@pytest.mark.parametrize("payload", ["[]", "3", '"prompt"', "null"])
def test_non_object_body_is_400(http, payload):
    r = http.post("/v1/completions", content=payload,
                  headers={"content-type": "application/json"})
    assert_error(r, 400)


def test_context_length_exceeded(http):
    err = assert_error(http.post("/v1/completions", json=_with(OK_BODY, max_tokens=100_000)),
                       400, param="max_tokens", code="context_length_exceeded")
    assert "context length" in err["message"]
    max_len = http.post("/tokenize", json={"prompt": "x"}).json()["max_model_len"]
    long_prompt = [100] * (max_len + 1)
    assert_error(http.post("/v1/completions", json={"prompt": long_prompt, "max_tokens": 1}),
                 400, code="context_length_exceeded")
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 100_000}
    assert_error(http.post("/v1/chat/completions", json=chat), 400, param="max_tokens",
                 code="context_length_exceeded")


def test_over_kv_cache_capacity_is_400(http):
    # 96 MiB of KV cache holds ~2k tokens, under SmolLM2's 8k context.
    err = assert_error(http.post("/v1/completions", json=_with(OK_BODY, max_tokens=5000)), 400,
                       param="max_tokens", code="context_length_exceeded")
    assert "KV cache" in err["message"] and "5" in err["message"]


def test_detokenize_out_of_vocab_names_tokens(http):
    assert_error(http.post("/detokenize", json={"tokens": [1, 99999999]}), 400, param="tokens")
    assert_error(http.post("/detokenize", json={"tokens": [-5]}), 400, param="tokens")


# --- requests that (before their fix) harm the server: each gets a healthy one of its own
# (the `restarting` fixture, see conftest.py)


def test_n_is_bounded(restarting):
    """One request must not fan out into an unbounded number of sequences (OpenAI caps n at
    128): n=1000 with max_tokens 1 is rejected instead of queueing 1000 sequences past
    --max-queue-len and --max-num-seqs."""
    r = httpx.post(f"{restarting.get().url}/v1/completions",
                   json=_with(OK_BODY, n=1000, max_tokens=1), timeout=300)
    assert_error(r, 400, param="n")


@pytest.mark.parametrize("body,param", [
    # torch.Generator takes seeds in [-2**63, 2**64); n=2 gives the second choice seed + 1.
    (_with(OK_BODY, seed=2**64 - 1, n=2, max_tokens=3), "seed"),
    (_with(OK_BODY, seed=2**64), "seed"),
    (_with(OK_BODY, seed=-(2**63) - 1), "seed"),
    (_with(OK_BODY, top_k=10**20), "top_k"),
], ids=["seed-n2-overflow", "seed-2**64", "seed-below-int64", "top_k-1e20"])
def test_out_of_range_ints_are_400_and_engine_survives(restarting, body, param):
    """Huge integers must be rejected up front naming the field (or clamped), never reach the
    engine: top_k=1e20 kills the engine thread (every later request 503), and seed=2**64-1
    with n=2 leaves the first choice orphaned in the scheduler, where the next step crashes
    the engine with a KeyError."""
    url = restarting.get().url
    with httpx.Client(base_url=url, timeout=30) as http:
        r = http.post("/v1/completions", json=body)
        assert r.status_code < 500, r.text
        if r.status_code != 200:
            assert_error(r, 400, param=param)
        good = http.post("/v1/completions", json=_with(OK_BODY, max_tokens=12, ignore_eos=True))
        assert good.status_code == 200, good.text
        assert http.get("/health").status_code == 200
        deadline = time.monotonic() + 10
        while metrics(url)["tandem:num_requests_running"] != 0:
            assert time.monotonic() < deadline, "a request is left running"
            time.sleep(0.05)


@pytest.mark.parametrize("path,body", [
    ("/v1/completions", _with(OK_BODY, model="gpt-4")),
    ("/v1/chat/completions", _with(CHAT_OK, model="gpt-4")),
    ("/tokenize", {"model": "gpt-4", "prompt": "x"}),
    ("/detokenize", {"model": "gpt-4", "tokens": [1]}),
])
def test_unknown_model_is_404(http, path, body):
    err = assert_error(http.post(path, json=body), 404, param="model", code="model_not_found")
    assert "gpt-4" in err["message"]


def test_served_model_name_is_accepted(http):
    assert http.post("/v1/completions", json=_with(OK_BODY, model=MODEL_NAME)).status_code == 200


def test_unknown_route_and_method(http):
    assert_error(http.get("/v1/nothing-here"), 404)
    assert assert_error(http.get("/v1/completions"), 405)["type"] == "invalid_request_error"


def test_openai_client_raises_typed_errors(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL_NAME, prompt="x", max_tokens=2, temperature=-1)
    assert e.value.status_code == 400 and e.value.param == "temperature"
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="nope", prompt="x", max_tokens=2)
    assert e.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL_NAME, prompt="x", max_tokens=100_000)
    assert e.value.code == "context_length_exceeded"


def test_default_request_size_limit(http):
    big = {"prompt": "a " * (600 * 1024)}  # > the default 1 MiB
    err = assert_error(http.post("/v1/completions", json=big), 413)
    assert err["code"] == "request_too_large"


def test_server_still_serves_after_bad_requests(http, client):
    assert http.get("/health").status_code == 200
    r = client.completions.create(model=MODEL_NAME, prompt="Hello", max_tokens=3)
    assert r.choices[0].text is not None and r.usage.completion_tokens >= 1


# --- a server with API keys, a one-request batch and a one-request queue, a 4 KiB body limit


@pytest.fixture(scope="module")
def limited(smollm2_dir):
    args = ["--max-queue-len", "1", "--max-num-seqs", "1",
            "--max-request-bytes", str(MAX_REQUEST_BYTES)]
    for key in API_KEYS:
        args += ["--api-key", key]
    with start_server(smollm2_dir, *args) as s:
        yield s


AUTH = {"Authorization": f"Bearer {API_KEYS[0]}"}


@pytest.mark.parametrize("headers", [
    {}, {"Authorization": "Bearer wrong-key"}, {"Authorization": API_KEYS[0]},
    {"Authorization": f"Basic {API_KEYS[0]}"}, {"Authorization": f"Bearer {API_KEYS[0]}x"},
    {"Authorization": "Bearer"},
])
def test_missing_or_wrong_api_key_is_401(limited, headers):
    with httpx.Client(base_url=limited.url, timeout=60) as h:
        for method, path, body in [("POST", "/v1/completions", OK_BODY),
                                   ("POST", "/v1/chat/completions", CHAT_OK),
                                   ("GET", "/v1/models", None),
                                   ("POST", "/tokenize", {"prompt": "x"}),
                                   ("POST", "/detokenize", {"tokens": [1]})]:
            r = h.request(method, path, json=body, headers=headers)
            err = assert_error(r, 401, code="invalid_api_key")
            assert err["type"] == "authentication_error"


def test_every_api_key_is_accepted(limited):
    with httpx.Client(base_url=limited.url, timeout=60) as h:
        for key in API_KEYS:
            for scheme in ("Bearer", "bearer"):
                r = h.post("/v1/completions", json=OK_BODY,
                           headers={"Authorization": f"{scheme} {key}"})
                assert r.status_code == 200, r.text
        assert h.get("/v1/models", headers=AUTH).json()["data"][0]["id"] == MODEL_NAME


def test_health_and_ready_need_no_key(limited):
    assert httpx.get(f"{limited.url}/health").status_code == 200
    assert httpx.get(f"{limited.url}/ready").status_code == 200


def test_openai_client_with_key(limited):
    good = openai.OpenAI(base_url=f"{limited.url}/v1", api_key=API_KEYS[1], max_retries=0)
    assert good.completions.create(model=MODEL_NAME, prompt="Hi", max_tokens=2).choices
    bad = openai.OpenAI(base_url=f"{limited.url}/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.completions.create(model=MODEL_NAME, prompt="Hi", max_tokens=2)


def test_body_over_limit_by_content_length_is_413(limited):
    body = json.dumps({"prompt": "a" * MAX_REQUEST_BYTES}).encode()
    r = httpx.post(f"{limited.url}/v1/completions", content=body,
                   headers={**AUTH, "content-type": "application/json",
                            "x-request-id": "too-big"})
    err = assert_error(r, 413, code="request_too_large")
    assert r.headers["x-request-id"] == "too-big"
    assert err["type"] == "invalid_request_error"


def _chunked(data: bytes, size: int = 1000):
    for i in range(0, len(data), size):
        yield data[i:i + size]


def test_chunked_body_over_limit_is_413(limited):
    body = json.dumps({"prompt": "a" * (2 * MAX_REQUEST_BYTES)}).encode()
    r = httpx.post(f"{limited.url}/v1/completions", content=_chunked(body),
                   headers={**AUTH, "content-type": "application/json"})
    assert "content-length" not in r.request.headers
    assert r.request.headers["transfer-encoding"] == "chunked"
    assert_error(r, 413, code="request_too_large")


def test_chunked_body_under_limit_is_served(limited):
    body = json.dumps({"prompt": "Hello " * 100, "max_tokens": 2}).encode()
    assert len(body) < MAX_REQUEST_BYTES
    r = httpx.post(f"{limited.url}/v1/completions", content=_chunked(body, 100),
                   headers={**AUTH, "content-type": "application/json"}, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 2


def _first_event(lines) -> dict:
    for line in lines:
        if line.startswith("data: ") and line != "data: [DONE]":
            return json.loads(line[6:])
    raise AssertionError("stream ended without an event")


def test_queue_full_is_503_with_retry_after(limited):
    """--max-num-seqs 1 --max-queue-len 1: one request runs, one waits, the next gets 503."""
    long = {"prompt": "Count to one thousand:", "max_tokens": 1500, "ignore_eos": True,
            "stream": True}
    url = limited.url
    with httpx.Client(base_url=url, headers=AUTH, timeout=60) as h, \
            h.stream("POST", "/v1/completions", json=long) as running:
        assert running.status_code == 200
        events = running.iter_lines()  # kept: a dropped iterator closes the connection
        _first_event(events)  # A holds the only running slot
        with h.stream("POST", "/v1/completions", json=long) as waiting:
            assert waiting.status_code == 200
            deadline = time.monotonic() + 30
            while metrics(url)["tandem:num_requests_waiting"] < 1:
                assert time.monotonic() < deadline, "second request never queued"
                time.sleep(0.05)
            for path, body in [("/v1/completions", OK_BODY),
                               ("/v1/completions", {**OK_BODY, "stream": True}),
                               ("/v1/chat/completions", CHAT_OK)]:
                r = h.post(path, json=body)
                err = assert_error(r, 503)
                assert err["type"] == "service_unavailable"
                assert int(r.headers["retry-after"]) >= 1
            # the openai client sees the same (retries off, so it does not wait)
            oc = openai.OpenAI(base_url=f"{url}/v1", api_key=API_KEYS[0], max_retries=0)
            with pytest.raises(openai.APIStatusError) as e:
                oc.completions.create(model=MODEL_NAME, prompt="x", max_tokens=2)
            assert e.value.status_code == 503
    # both long requests were abandoned: their work is aborted and the queue drains
    deadline = time.monotonic() + 30
    while True:
        m = metrics(url)
        if m["tandem:num_requests_running"] == 0 and m["tandem:num_requests_waiting"] == 0:
            break
        assert time.monotonic() < deadline, m
        time.sleep(0.05)
    r = httpx.post(f"{url}/v1/completions", json=OK_BODY, headers=AUTH, timeout=60)
    assert r.status_code == 200, r.text
