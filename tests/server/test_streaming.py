"""Server-sent event streams: same text as without streaming, usage chunks, aborts on
disconnect, many clients at once."""
from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest
from server_utils import MODEL_NAME, metrics, model_dtype, wait_idle

PROMPT = "The three primary colours are"
CHAT = [{"role": "user", "content": "Write one sentence about the sea."}]
GREEDY = {"temperature": 0, "extra_body": {"ignore_eos": True}}


def _join_completion(stream) -> tuple[dict[int, str], dict[int, str], list]:
    text, finish, chunks = {}, {}, []
    for chunk in stream:
        chunks.append(chunk)
        for c in chunk.choices:
            text[c.index] = text.get(c.index, "") + c.text
            if c.finish_reason is not None:
                assert c.index not in finish, "finish_reason sent twice"
                finish[c.index] = c.finish_reason
    return text, finish, chunks


def _join_chat(stream) -> tuple[dict[int, str], dict[int, str], list]:
    text, finish, chunks = {}, {}, []
    for chunk in stream:
        chunks.append(chunk)
        for c in chunk.choices:
            text[c.index] = text.get(c.index, "") + (c.delta.content or "")
            if c.finish_reason is not None:
                assert c.index not in finish, "finish_reason sent twice"
                finish[c.index] = c.finish_reason
    return text, finish, chunks


def test_completion_stream_equals_non_streamed(client):
    full = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=16, **GREEDY)
    stream = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=16,
                                       stream=True, **GREEDY)
    text, finish, chunks = _join_completion(stream)
    assert text == {0: full.choices[0].text}
    assert finish == {0: "length"}
    assert len(chunks) > 2  # it really streamed
    assert all(c.id == chunks[0].id and c.object == "text_completion" for c in chunks)
    assert all(c.usage is None for c in chunks)  # no include_usage, no usage chunk


def test_chat_stream_equals_non_streamed(client):
    full = client.chat.completions.create(model=MODEL_NAME, messages=CHAT, max_tokens=16,
                                          **GREEDY)
    stream = client.chat.completions.create(model=MODEL_NAME, messages=CHAT, max_tokens=16,
                                            stream=True, **GREEDY)
    text, finish, chunks = _join_chat(stream)
    assert text == {0: full.choices[0].message.content}
    assert finish == {0: "length"}
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" for c in chunks)


def test_include_usage(client, http):
    stream = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=7,
                                       stream=True, stream_options={"include_usage": True},
                                       **GREEDY)
    *body, last = list(stream)
    assert last.choices == [] and last.usage.completion_tokens == 7
    assert last.usage.total_tokens == last.usage.prompt_tokens + 7 and last.usage.prompt_tokens
    assert all(c.usage is None for c in body)
    chat = list(client.chat.completions.create(model=MODEL_NAME, messages=CHAT, max_tokens=5,
                                               n=2, stream=True,
                                               stream_options={"include_usage": True},
                                               **GREEDY))
    assert chat[-1].choices == [] and chat[-1].usage.completion_tokens == 10
    tokens = http.post("/tokenize", json={"messages": CHAT}).json()["count"]
    assert chat[-1].usage.prompt_tokens == tokens


def test_stream_n_choices(client):
    stream = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=6, n=2,
                                       stream=True, **GREEDY)
    text, finish, _ = _join_completion(stream)
    assert finish == {0: "length", 1: "length"}
    assert text[0] == text[1]  # greedy: both choices agree
    chat = client.chat.completions.create(model=MODEL_NAME, messages=CHAT, max_tokens=6, n=2,
                                          stream=True, **GREEDY)
    text, finish, chunks = _join_chat(chat)
    assert finish == {0: "length", 1: "length"} and text[0] == text[1]
    assert sorted(c.index for c in chunks[0].choices) == [0, 1]


def test_stream_with_stop_string_equals_non_streamed(client):
    full = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=24,
                                     **GREEDY).choices[0].text
    words = [w for w in full.split() if len(w) >= 4]
    assert len(words) >= 2, full
    stop = " " + words[1]  # several characters, likely spanning tokens
    non_streamed = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=24,
                                             stop=stop, temperature=0).choices[0]
    assert non_streamed.finish_reason == "stop"
    text, finish, _ = _join_completion(client.completions.create(
        model=MODEL_NAME, prompt=PROMPT, max_tokens=24, stop=stop, temperature=0, stream=True))
    assert text == {0: non_streamed.text} and finish == {0: "stop"}
    assert stop not in text[0]


def test_stream_logprobs_and_echo(client):
    stream = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=5,
                                       logprobs=2, echo=True, stream=True, **GREEDY)
    chunks = list(stream)
    text = "".join(c.choices[0].text for c in chunks)
    tokens = [t for c in chunks if c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
    assert text.startswith(PROMPT)
    # the echoed prompt's tokens come first (tests/server/test_prompt_logprobs_server.py)
    assert "".join(tokens) == text
    assert len(tokens) > 5 and "".join(tokens[-5:]) == text[len(PROMPT):]
    chat = list(client.chat.completions.create(model=MODEL_NAME, messages=CHAT, max_tokens=4,
                                               logprobs=True, top_logprobs=2, stream=True,
                                               **GREEDY))
    entries = [e for c in chat for ch in c.choices if ch.logprobs for e in ch.logprobs.content]
    assert len(entries) == 4 and all(len(e.top_logprobs) == 2 for e in entries)


def test_raw_sse_format(http):
    with http.stream("POST", "/v1/chat/completions",
                     json={"messages": CHAT, "max_tokens": 3, "stream": True}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    assert all(line.startswith("data: ") for line in lines)
    for line in lines[:-1]:
        json.loads(line[6:])


# --- a client that goes away: its request is aborted and its KV blocks are freed


def _abort_count(url: str) -> float:
    return metrics(url)['tandem:request_success_total{finished_reason="abort"}']


def test_stream_disconnect_aborts(url):
    idle_kv = wait_idle(url)["tandem:kv_cache_usage_perc"]
    aborts = _abort_count(url)
    body = {"prompt": PROMPT, "max_tokens": 1500, "ignore_eos": True, "stream": True}
    with httpx.Client(base_url=url, timeout=60) as h, \
            h.stream("POST", "/v1/completions", json=body) as r:
        events = (line for line in r.iter_lines() if line.startswith("data: "))
        assert [next(events), next(events)]  # two chunks arrived
        assert metrics(url)["tandem:num_requests_running"] == 1
        r.close()  # the client leaves mid-stream
    wait_idle(url, idle_kv, timeout=10)
    assert _abort_count(url) == aborts + 1


def test_non_streaming_disconnect_aborts(url):
    idle_kv = wait_idle(url)["tandem:kv_cache_usage_perc"]
    aborts = _abort_count(url)
    body = {"prompt": PROMPT, "max_tokens": 1500, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{url}/v1/completions", json=body, timeout=httpx.Timeout(60, read=1.0))
    wait_idle(url, idle_kv, timeout=10)
    assert _abort_count(url) == aborts + 1


def test_openai_stream_closed_early_aborts(client, url):
    idle_kv = wait_idle(url)["tandem:kv_cache_usage_perc"]
    aborts = _abort_count(url)
    stream = client.chat.completions.create(model=MODEL_NAME, messages=CHAT, max_tokens=1500,
                                            stream=True, **GREEDY)
    for i, _ in enumerate(stream):
        if i == 2:
            break
    stream.close()
    wait_idle(url, idle_kv, timeout=10)
    assert _abort_count(url) == aborts + 1


# --- many clients at once


@pytest.mark.dtype_sensitive
def test_32_concurrent_streams(auto_server):
    url = auto_server.url
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=120)
    prompts = ["The capital of France is", "Water is made of", "My favourite food is",
               "In the morning I"]
    expected = [client.completions.create(model=MODEL_NAME, prompt=p, max_tokens=16,
                                          **GREEDY).choices[0].text for p in prompts]
    chat_expected = client.chat.completions.create(
        model=MODEL_NAME, messages=CHAT, max_tokens=16, **GREEDY).choices[0].message.content

    async def run() -> list:
        aclient = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0,
                                     timeout=300)

        async def one(i: int) -> str:
            if i % 8 == 7:
                stream = await aclient.chat.completions.create(
                    model=MODEL_NAME, messages=CHAT, max_tokens=16, stream=True, **GREEDY)
                return "".join([c.choices[0].delta.content or "" async for c in stream
                                if c.choices])
            stream = await aclient.completions.create(
                model=MODEL_NAME, prompt=prompts[i % 4], max_tokens=16, stream=True, **GREEDY)
            return "".join([c.choices[0].text async for c in stream if c.choices])

        try:
            return await asyncio.gather(*(one(i) for i in range(32)))
        finally:
            await aclient.close()

    results = asyncio.run(run())
    wants = [chat_expected if i % 8 == 7 else expected[i % 4] for i in range(32)]
    if model_dtype(auto_server) == "float32":  # float32 tokens do not depend on the batch
        assert results == wants
    else:
        _assert_close_in_bfloat16(results, wants)
    wait_idle(url, timeout=10)


def _assert_close_in_bfloat16(results: list[str], wants: list[str]) -> None:
    """In bfloat16 a batch of 32 rounds through other GEMM kernels than a lone request, and
    greedy decoding follows a flipped near-tie into other text. What still holds: no stream
    carries another prompt's text, and most of the text agrees (over 32 streams)."""
    def shared(a: str, b: str) -> int:
        return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))

    for i, (text, want) in enumerate(zip(results, wants)):
        others = max(shared(text, w) for w in set(wants) - {want})
        assert shared(text, want) >= others and shared(text, want) > 0, (i, text, want)
    agreement = sum(map(shared, results, wants)) / sum(map(len, wants))
    assert agreement >= 0.5, (agreement, results, wants)
