"""Prompt logprobs through the official `openai` client against a live float32 server: `echo`
with `logprobs` on /v1/completions, and vLLM's `prompt_logprobs` extra, checked against HF
transformers' float32 log-softmax of the prompt."""
from __future__ import annotations

import pytest
import torch
from server_utils import MODEL_NAME, assert_error
from transformers import LlamaForCausalLM

PROMPT = "The capital of France is a city of"
TOL = 1e-3
GREEDY = {"model": MODEL_NAME, "temperature": 0, "max_tokens": 3,
          "extra_body": {"ignore_eos": True}}


@pytest.fixture(scope="module")
def ids(http) -> list[int]:
    return http.post("/tokenize", json={"prompt": PROMPT}).json()["tokens"]


@pytest.fixture(scope="module")
def ref(smollm2_dir, ids) -> torch.Tensor:
    """HF's float32 log-softmax of every prompt position: row p predicts token p + 1."""
    model = LlamaForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    with torch.inference_mode():
        return model(torch.tensor([ids])).logits[0].float().log_softmax(-1)


def check_echoed(lp, ids: list[int], ref: torch.Tensor, top: int) -> None:
    """The legacy logprobs of an echo: the prompt's tokens first, the first with nulls."""
    n = len(ids)
    assert "".join(lp.tokens[:n]) == PROMPT
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.text_offset[0] == 0 and lp.text_offset[n] == len(PROMPT)
    assert all(a < b for a, b in zip(lp.text_offset[:n + 1], lp.text_offset[1:n + 1]))
    for p in range(1, n):
        want = ref[p - 1]
        assert abs(lp.token_logprobs[p] - want[ids[p]].item()) <= TOL, p
        tops = lp.top_logprobs[p]
        assert lp.tokens[p] in tops and len(tops) in (top, top + 1)
        assert sorted(tops.values(), reverse=True)[:top] == pytest.approx(
            want.topk(top).values.tolist(), abs=TOL)


def test_echo_with_logprobs_matches_hf(client, ids, ref):
    r = client.completions.create(prompt=PROMPT, logprobs=2, echo=True, n=2, **GREEDY)
    plain = client.completions.create(prompt=PROMPT, logprobs=2, **GREEDY).choices[0]
    for choice in r.choices:
        lp = choice.logprobs
        assert choice.text == PROMPT + plain.text
        assert len(lp.tokens) == len(ids) + 3
        check_echoed(lp, ids, ref, top=2)
        # the completion's entries follow, as without echo, their offsets after the prompt
        assert lp.tokens[len(ids):] == plain.logprobs.tokens
        assert lp.token_logprobs[len(ids):] == pytest.approx(plain.logprobs.token_logprobs,
                                                             abs=TOL)
        assert lp.text_offset[len(ids):] == [len(PROMPT) + o for o in plain.logprobs.text_offset]
    assert not hasattr(r.choices[0], "prompt_logprobs")  # only the extra asks for that list
    # A prompt of token ids is echoed the same way.
    as_ids = client.completions.create(prompt=ids, logprobs=2, echo=True, **GREEDY).choices[0]
    assert as_ids.text == r.choices[0].text
    check_echoed(as_ids.logprobs, ids, ref, top=2)


def test_streamed_echo_sends_the_prompt_entries_first(client, ids, ref):
    chunks = list(client.completions.create(prompt=PROMPT, logprobs=1, echo=True, stream=True,
                                            **GREEDY))
    first = chunks[0].choices[0]
    assert first.text.startswith(PROMPT)
    assert first.logprobs.tokens[:len(ids)] and first.logprobs.token_logprobs[0] is None
    full = client.completions.create(prompt=PROMPT, logprobs=1, echo=True, **GREEDY).choices[0]
    joined = {k: [x for c in chunks if c.choices[0].logprobs
                  for x in getattr(c.choices[0].logprobs, k)]
              for k in ("tokens", "token_logprobs", "top_logprobs", "text_offset")}
    assert "".join(c.choices[0].text for c in chunks) == full.text
    assert joined["tokens"] == full.logprobs.tokens
    assert joined["text_offset"] == full.logprobs.text_offset
    assert joined["token_logprobs"][1:] == pytest.approx(full.logprobs.token_logprobs[1:],
                                                         abs=TOL)
    check_echoed(full.logprobs, ids, ref, top=1)


def test_prompt_logprobs_extra_in_vllms_shape(client, ids, ref):
    r = client.completions.create(prompt=PROMPT, **{**GREEDY, "extra_body": {
        "prompt_logprobs": 2, "ignore_eos": True}})
    entries = r.choices[0].prompt_logprobs
    assert len(entries) == len(ids) and entries[0] is None
    for p in range(1, len(ids)):
        entry = {int(t): e for t, e in entries[p].items()}
        assert ids[p] in entry and len(entry) in (2, 3)
        for t, e in entry.items():
            assert set(e) == {"logprob", "rank", "decoded_token"}
            assert abs(e["logprob"] - ref[p - 1, t].item()) <= TOL
        best = sorted(entry.values(), key=lambda e: e["rank"])[:2]
        assert [e["rank"] for e in best] == [1, 2]
        assert [e["logprob"] for e in best] == pytest.approx(ref[p - 1].topk(2).values.tolist(),
                                                             abs=TOL)
    assert r.choices[0].logprobs is None


def test_chat_prompt_logprobs_at_the_top_level(client, http):
    messages = [{"role": "user", "content": "Hi"}]
    ids = http.post("/tokenize", json={"messages": messages}).json()["tokens"]
    r = client.chat.completions.create(messages=messages, **{**GREEDY, "extra_body": {
        "prompt_logprobs": 0}})
    entries = r.model_extra["prompt_logprobs"]
    assert len(entries) == len(ids) and entries[0] is None
    for p in range(1, len(ids)):
        assert str(ids[p]) in entries[p] and entries[p][str(ids[p])]["logprob"] <= 0


@pytest.mark.parametrize("path,body", [
    ("/v1/completions", {"prompt_logprobs": -1}), ("/v1/completions", {"prompt_logprobs": 21}),
    ("/v1/completions", {"prompt_logprobs": "1"}), ("/v1/completions", {"prompt_logprobs": 1.5}),
    ("/v1/completions", {"prompt_logprobs": 1, "stream": True}),
    ("/v1/chat/completions", {"prompt_logprobs": 0, "stream": True}),
])
def test_bad_prompt_logprobs_are_400_naming_the_field(http, path, body):
    base = ({"prompt": PROMPT} if path == "/v1/completions"
            else {"messages": [{"role": "user", "content": "Hi"}]})
    err = assert_error(http.post(path, json={**base, "max_tokens": 1, **body}), 400,
                       param="prompt_logprobs")
    assert err["message"].startswith("prompt_logprobs: ")
    if body.get("stream"):
        assert "not supported with stream" in err["message"]
