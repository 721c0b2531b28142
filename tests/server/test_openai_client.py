"""The OpenAI surface through the official `openai` client, against a real server process."""
from __future__ import annotations

import math
import re
import time

import httpx
import pytest
from server_utils import MODEL_NAME

PROMPT = "The capital of France is"
CHAT = [{"role": "user", "content": "Name three colours."}]
EOS_ID = 2  # SmolLM2-Instruct's <|im_end|>


def greedy(client, prompt=PROMPT, max_tokens=16, **kw):
    return client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=max_tokens,
                                     temperature=0, **kw)


def test_completion(client):
    r = greedy(client, max_tokens=8, extra_body={"ignore_eos": True})
    assert r.object == "text_completion" and r.model == MODEL_NAME and r.id
    [choice] = r.choices
    assert choice.index == 0 and choice.text and choice.finish_reason == "length"
    assert r.usage.completion_tokens == 8
    assert r.usage.prompt_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + 8
    assert greedy(client, max_tokens=8, extra_body={"ignore_eos": True}).choices[0].text == \
        choice.text  # greedy is deterministic


def test_chat(client):
    r = client.chat.completions.create(model=MODEL_NAME, messages=CHAT, max_tokens=12,
                                       temperature=0)
    assert r.object == "chat.completion" and r.model == MODEL_NAME
    [choice] = r.choices
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert 0 < r.usage.completion_tokens <= 12


def test_chat_developer_and_content_parts(client):
    messages = [{"role": "developer", "content": "Answer briefly."},
                {"role": "user", "content": [{"type": "text", "text": "Name three "},
                                             {"type": "text", "text": "colours."}]}]
    r = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=4,
                                       temperature=0)
    assert r.choices[0].message.content


@pytest.mark.parametrize("max_tokens_field", [None, "max_tokens", "max_completion_tokens"])
def test_chat_max_tokens_default_and_aliases(client, max_tokens_field):
    """Without max_tokens the completion may run to the end of the context. Most chat clients
    send no max_tokens, so this must not be rejected because the default (max_model_len -
    prompt) exceeds the KV cache. A logit bias makes the model stop at once."""
    extra = {"logit_bias": {str(EOS_ID): 100}}
    if max_tokens_field:
        extra[max_tokens_field] = 5
    r = client.chat.completions.create(model=MODEL_NAME, messages=CHAT, temperature=0,
                                       extra_body=extra)
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens == 1


def test_max_completion_tokens_limits(client):
    r = client.chat.completions.create(model=MODEL_NAME, messages=CHAT, temperature=0,
                                       max_completion_tokens=3,
                                       extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 3 and r.choices[0].finish_reason == "length"


def test_n_choices(client):
    r = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=4, n=2, seed=7,
                                  temperature=1.0, extra_body={"ignore_eos": True})
    assert sorted(c.index for c in r.choices) == [0, 1]
    assert all(c.text and c.finish_reason == "length" for c in r.choices)
    assert r.usage.completion_tokens == 8
    chat = client.chat.completions.create(model=MODEL_NAME, messages=CHAT, max_tokens=4, n=2,
                                          temperature=1.0, seed=7,
                                          extra_body={"ignore_eos": True})
    assert sorted(c.index for c in chat.choices) == [0, 1]
    assert chat.usage.completion_tokens == 8


def test_stop_string(client):
    full = greedy(client, max_tokens=24, extra_body={"ignore_eos": True}).choices[0].text
    words = [w for w in full.split() if len(w) >= 3]
    assert len(words) >= 2, full
    stop = words[1]  # a string the greedy output reaches after some text
    r = greedy(client, max_tokens=24, stop=[stop])
    choice = r.choices[0]
    assert choice.finish_reason == "stop"
    assert stop not in choice.text
    assert choice.text == full[:full.index(stop)]
    chat_full = client.chat.completions.create(
        model=MODEL_NAME, messages=CHAT, max_tokens=16, temperature=0,
        extra_body={"ignore_eos": True}).choices[0].message.content
    chat_words = [w for w in chat_full.split() if len(w) >= 3]
    chat_stop = chat_words[-1]
    chat = client.chat.completions.create(model=MODEL_NAME, messages=CHAT, max_tokens=16,
                                          temperature=0, stop=chat_stop)
    assert chat.choices[0].finish_reason == "stop"
    assert chat_stop not in chat.choices[0].message.content


def test_seed_reproducible(client):
    def sample(seed):
        return client.completions.create(model=MODEL_NAME, prompt="Once upon a time",
                                         max_tokens=12, temperature=1.0, seed=seed,
                                         extra_body={"ignore_eos": True}).choices[0].text

    assert sample(1234) == sample(1234)
    assert len({sample(s) for s in (1, 2, 3)}) > 1


def test_completion_logprobs(client):
    r = greedy(client, max_tokens=5, logprobs=3, extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    assert "".join(lp.tokens) == r.choices[0].text
    assert len(lp.text_offset) == 5 and lp.text_offset[0] == 0
    for token, token_lp, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert token_lp <= 0 and math.isfinite(token_lp)
        assert 1 <= len(top) <= 4 and all(v <= 0 for v in top.values())
        # greedy: the chosen token is the most likely one
        assert top[token] == pytest.approx(token_lp) == pytest.approx(max(top.values()))


def test_completion_logprobs_always_list_the_sampled_token(client):
    """OpenAI's legacy shape: top_logprobs has the `logprobs` most likely tokens and the sampled
    one wherever it ranked (up to logprobs + 1 entries). Hot sampling picks unlikely tokens."""
    r = client.completions.create(model=MODEL_NAME, prompt="Once upon a time", max_tokens=16,
                                  temperature=2.0, seed=7, logprobs=1,
                                  extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    assert all(tok in top and 1 <= len(top) <= 2 for tok, top in zip(lp.tokens, lp.top_logprobs))
    assert any(len(top) == 2 for top in lp.top_logprobs), "no token sampled outside the top 1"


def test_chat_logprobs(client):
    r = client.chat.completions.create(model=MODEL_NAME, messages=CHAT, max_tokens=4,
                                       temperature=0, logprobs=True, top_logprobs=3,
                                       extra_body={"ignore_eos": True})
    content = r.choices[0].logprobs.content
    assert len(content) == 4
    assert "".join(c.token for c in content) == r.choices[0].message.content
    for c in content:
        assert c.logprob <= 0 and bytes(c.bytes).decode() == c.token
        assert len(c.top_logprobs) == 3
        assert c.top_logprobs[0].logprob == pytest.approx(c.logprob)
        assert [t.logprob for t in c.top_logprobs] == sorted(
            (t.logprob for t in c.top_logprobs), reverse=True)
    # logprobs=False: none returned even if top_logprobs is sent
    plain = client.chat.completions.create(model=MODEL_NAME, messages=CHAT, max_tokens=2,
                                           temperature=0)
    assert plain.choices[0].logprobs is None


def test_echo(client):
    plain = greedy(client, max_tokens=6).choices[0].text
    r = greedy(client, max_tokens=6, echo=True)
    assert r.choices[0].text == PROMPT + plain


def test_prompt_list_and_token_ids(client, http):
    prompts = [PROMPT, "Water boils at"]
    singles = [greedy(client, p, max_tokens=6).choices[0].text for p in prompts]
    batch = greedy(client, prompts, max_tokens=6)
    assert [c.index for c in batch.choices] == [0, 1]
    assert [c.text for c in batch.choices] == singles
    ids = [http.post("/tokenize", json={"prompt": p}).json()["tokens"] for p in prompts]
    assert greedy(client, ids[0], max_tokens=6).choices[0].text == singles[0]
    as_ids = greedy(client, ids, max_tokens=6)
    assert [c.text for c in as_ids.choices] == singles
    assert as_ids.usage.prompt_tokens == sum(map(len, ids))


def test_models_list(client):
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL_NAME]
    assert models[0].object == "model" and models[0].owned_by


def test_tokenize_detokenize(http):
    r = http.post("/tokenize", json={"prompt": PROMPT})
    assert r.status_code == 200
    body = r.json()
    assert body["count"] == len(body["tokens"]) > 0 and body["max_model_len"] > 0
    back = http.post("/detokenize", json={"tokens": body["tokens"]})
    assert back.status_code == 200 and back.json()["prompt"] == PROMPT
    chat = http.post("/tokenize", json={"messages": CHAT}).json()
    assert chat["count"] > body["count"]


def test_request_id_echoed(url):
    with httpx.Client(base_url=url, timeout=60) as h:
        r = h.post("/v1/completions", headers={"X-Request-Id": "my-id-123"},
                   json={"prompt": PROMPT, "max_tokens": 1})
        assert r.status_code == 200 and r.headers["x-request-id"] == "my-id-123"
        bad = h.post("/v1/completions", headers={"X-Request-Id": "bad-one"},
                     json={"prompt": PROMPT, "temperature": -1})
        assert bad.status_code == 400 and bad.headers["x-request-id"] == "bad-one"
        with h.stream("POST", "/v1/completions", headers={"X-Request-Id": "streamed"},
                      json={"prompt": PROMPT, "max_tokens": 2, "stream": True}) as s:
            assert s.headers["x-request-id"] == "streamed"
            s.read()
        generated = h.get("/health").headers.get("x-request-id")
        assert generated and generated != h.get("/health").headers["x-request-id"]


def test_health_ready_version(http):
    assert http.get("/health").json() == {"status": "ok"}
    assert http.get("/ready").status_code == 200
    version = http.get("/version").json()["version"]
    assert isinstance(version, str) and version


def test_start_and_access_log_lines(server):
    """One start line (where, model, dtype, device, KV capacity), then a line per request."""
    kv_tokens = int(re.search(r"kv_capacity_tokens=(\d+)", server.log()).group(1))
    assert kv_tokens > 0
    port = server.url.rsplit(":", 1)[1]
    assert re.search(rf"listening on http://127\.0\.0\.1:{port} model={MODEL_NAME} "
                     r"dtype=\w+ device=\w+ kv_capacity_tokens=\d+", server.log())
    with httpx.Client(base_url=server.url, timeout=60) as h:
        h.post("/v1/completions", headers={"X-Request-Id": "log-ok"},
               json={"prompt": PROMPT, "max_tokens": 3, "ignore_eos": True})
        h.post("/v1/completions", headers={"X-Request-Id": "log-bad"},
               json={"prompt": PROMPT, "top_p": 7})
    deadline = time.monotonic() + 10  # written after the response went out
    while "id=log-bad" not in server.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    log = server.log()
    assert re.search(r"request id=log-ok method=POST path=/v1/completions status=200 tokens=3 "
                     r"latency_ms=\d+\.\d", log), log[-3000:]
    assert re.search(r"request id=log-bad .*status=400 tokens=0 ", log), log[-3000:]
