"""The proxy's retry and streaming rules against mock replicas (httpx MockTransport)."""
import asyncio
import json

import httpx

from tandem.router.policies import CacheAware, RoundRobin
from tandem.router.proxy import Proxy, routing_text
from tandem.router.replicas import ReplicaSet
from tandem.router.retry import Backoff


class Broken(httpx.AsyncByteStream):
    """An SSE stream that sends one event, then the connection drops."""

    async def __aiter__(self):
        yield b'data: {"choices": [{"text": "Hel"}]}\n\n'
        raise httpx.ReadError("connection reset")


def make(handlers: dict, policy=None):
    rs = ReplicaSet()
    reps = {host: rs.add(f"http://{host}:1") for host in handlers}
    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.host)
        return handlers[request.url.host](request)

    client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    proxy = Proxy(rs, policy or RoundRobin(), client, backoff=Backoff(base=0.001, cap=0.002))
    return proxy, reps, seen


def call(proxy, body: dict, path="/v1/completions", headers=None):
    async def go():
        resp = await proxy.forward(path, json.dumps(body).encode(), headers or {})
        if hasattr(resp, "body_iterator"):
            chunks = [c async for c in resp.body_iterator]
            return resp.status_code, b"".join(c if isinstance(c, bytes) else c.encode()
                                              for c in chunks)
        return resp.status_code, resp.body
    return asyncio.run(go())


def ok(request):
    return httpx.Response(200, json={"from": request.url.host})


def test_503_is_retried_on_another_replica():
    proxy, reps, seen = make({"a": lambda r: httpx.Response(503, json={}), "b": ok})
    status, body = call(proxy, {"prompt": "hi"})
    assert status == 200 and json.loads(body) == {"from": "b"} and seen == ["a", "b"]
    assert reps["a"].retries_total == 1 and reps["a"].load.inflight_requests == 0
    assert reps["b"].load.inflight_requests == 0


def test_400_is_not_retried():
    proxy, _, seen = make({"a": lambda r: httpx.Response(400, json={"error": {}}), "b": ok})
    status, _ = call(proxy, {"prompt": "hi"})
    assert status == 400 and seen == ["a"]


def test_connection_failures_everywhere_give_503():
    def refuse(request):
        raise httpx.ConnectError("refused")

    proxy, reps, seen = make({"a": refuse, "b": refuse})
    status, body = call(proxy, {"prompt": "hi"})
    assert status == 503 and json.loads(body)["error"]["message"]
    assert sorted(seen) == ["a", "b"]
    assert all(r.load.inflight_requests == 0 for r in reps.values())


def test_a_stream_that_breaks_ends_with_an_error_event_not_a_replay():
    def stream(request):
        return httpx.Response(200, headers={"content-type": "text/event-stream"},
                              stream=Broken())

    proxy, reps, seen = make({"a": stream, "b": stream})
    status, body = call(proxy, {"prompt": "hi", "stream": True})
    text = body.decode()
    assert status == 200 and seen == ["a"]  # never replayed on b
    assert text.startswith('data: {"choices"') and '"error"' in text
    assert text.endswith("data: [DONE]\n\n")
    assert reps["a"].load.inflight_requests == 0


def test_cache_aware_sends_a_shared_prefix_back_to_its_replica():
    proxy, _, seen = make({"a": ok, "b": ok, "c": ok}, CacheAware())
    system = "You are a helpful assistant. " * 40
    for q in ("What is 2+2?", "Name a colour.", "Say hi."):
        call(proxy, {"messages": [{"role": "system", "content": system},
                                  {"role": "user", "content": q}]}, "/v1/chat/completions")
    assert len(set(seen)) == 1, seen
    call(proxy, {"prompt": "something else entirely " * 20})
    assert len(set(seen)) == 2  # an unrelated prompt goes to an idle replica


def test_routing_text():
    assert routing_text({"prompt": "abc"}) == "abc"
    assert routing_text({"prompt": [1, 2]}) == "[1, 2]"
    assert routing_text({"messages": [{"role": "user", "content": "x"}]}) == "user\nx"
    assert routing_text({}) == ""


def test_load_in_tokens_is_tracked_and_released():
    proxy, reps, _ = make({"a": ok})
    status, _ = call(proxy, {"prompt": "x" * 400, "max_tokens": 10})
    assert status == 200
    assert reps["a"].load.inflight_tokens == 0 and reps["a"].load.inflight_requests == 0
    _, work = proxy.choose({"prompt": "x" * 400, "max_tokens": 10}, None, set())[1:]
    assert work == 100 + 10


def test_request_id_is_forwarded_or_made():
    got = []

    def echo(request):
        got.append(request.headers.get("x-request-id"))
        return httpx.Response(200, json={})

    proxy, _, _ = make({"a": echo})

    async def go(headers):
        resp = await proxy.forward("/v1/completions", b'{"prompt": "hi"}', headers)
        return resp.headers["x-request-id"]
    assert asyncio.run(go({"x-request-id": "abc"})) == "abc" and got[-1] == "abc"
    made = asyncio.run(go({}))
    assert made and got[-1] == made


def test_latency_is_observed_per_replica():
    proxy, reps, _ = make({"a": ok})
    call(proxy, {"prompt": "hi"})
    call(proxy, {"prompt": "hi", "stream": True})
    assert reps["a"].latency.count == 2 and reps["a"].latency.sum >= 0
