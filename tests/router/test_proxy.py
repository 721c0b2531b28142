"""The proxy's retry and streaming rules against real fake replicas (aiohttp servers)."""
import asyncio
import json
from contextlib import contextmanager

from aiohttp import web

from tandem.router.policies import CacheAware, RoundRobin
from tandem.router.proxy import Proxy, routing_text
from tandem.router.replicas import ReplicaSet
from tandem.router.retry import Backoff
from tandem.router.upstream import Pool

from fake_replicas import FakeReplicas  # isort: skip


async def broken(request: web.Request) -> web.StreamResponse:
    """An SSE stream that sends one event, then the connection drops."""
    resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
    await resp.prepare(request)
    await resp.write(b'data: {"choices": [{"text": "Hel"}]}\n\n')
    request.transport.close()
    return resp


@contextmanager
def make(handlers: dict, policy=None):
    with FakeReplicas(handlers) as fake:
        rs = ReplicaSet()
        reps = {name: rs.add(url) for name, url in fake.urls.items()}
        proxy = Proxy(rs, policy or RoundRobin(), backoff=Backoff(base=0.001, cap=0.002))
        yield proxy, reps, fake.seen


def run(proxy: Proxy, coro_fn):
    async def go():
        proxy.client = Pool()
        try:
            return await coro_fn()
        finally:
            await proxy.client.close()
    return asyncio.run(go())


def call(proxy, body: dict, path="/v1/completions", headers=None):
    async def go():
        reply = await proxy.forward(path, json.dumps(body).encode(), body, headers or {})
        if reply.chunks is not None:
            return reply.status, b"".join([c async for c in reply.chunks])
        return reply.status, reply.body
    return run(proxy, go)


def ok(request: web.Request) -> web.Response:
    return web.json_response({"from": request.url.port})


def status(code: int):
    return lambda request: web.json_response({"error": {}}, status=code)


def test_503_is_retried_on_another_replica():
    with make({"a": status(503), "b": ok}) as (proxy, reps, seen):
        code, body = call(proxy, {"prompt": "hi"})
        assert code == 200 and json.loads(body) == {"from": int(reps["b"].url.rsplit(":")[-1])}
        assert seen == ["a", "b"]
        assert reps["a"].retries_total == 1 and reps["a"].load.inflight_requests == 0
        assert reps["b"].load.inflight_requests == 0


def test_400_is_not_retried():
    with make({"a": status(400), "b": ok}) as (proxy, _, seen):
        code, body = call(proxy, {"prompt": "hi"})
        assert code == 400 and seen == ["a"] and json.loads(body) == {"error": {}}


def test_connection_failures_everywhere_give_503():
    with make({"a": None, "b": None}) as (proxy, reps, _):
        code, body = call(proxy, {"prompt": "hi"})
        assert code == 503 and json.loads(body)["error"]["message"]
        assert all(r.retries_total + r.requests_total >= 1 for r in reps.values())
        assert all(r.load.inflight_requests == 0 for r in reps.values())


def test_a_stream_that_breaks_ends_with_an_error_event_not_a_replay():
    with make({"a": broken, "b": broken}) as (proxy, reps, seen):
        code, body = call(proxy, {"prompt": "hi", "stream": True})
        text = body.decode()
        assert code == 200 and seen == ["a"]  # never replayed on b
        assert text.startswith('data: {"choices"') and '"error"' in text
        assert text.endswith("data: [DONE]\n\n")
        assert reps["a"].load.inflight_requests == 0 and reps["a"].breaker._failures == 1


def test_cache_aware_sends_a_shared_prefix_back_to_its_replica():
    with make({"a": ok, "b": ok, "c": ok}, CacheAware()) as (proxy, _, seen):
        system = "You are a helpful assistant. " * 40
        for q in ("What is 2+2?", "Name a colour.", "Say hi."):
            call(proxy, {"messages": [{"role": "system", "content": system},
                                      {"role": "user", "content": q}]}, "/v1/chat/completions")
        assert len(set(seen)) == 1, seen
        call(proxy, {"prompt": "something else entirely " * 20})
        assert len(set(seen)) == 2  # an unrelated prompt goes to an idle replica
        first = next(r for r in proxy.replicas.replicas.values() if r.requests_total == 3)
        assert 0.5 < first.hit_rate < 1  # the 2nd and 3rd found the system prompt there


def test_routing_text():
    assert routing_text({"prompt": "abc"}) == "abc"
    assert routing_text({"prompt": [1, 2]}) == "[1, 2]"
    assert routing_text({"messages": [{"role": "user", "content": "x"}]}) == "user\nx"
    assert routing_text({}) == ""


def test_load_in_tokens_is_tracked_and_released():
    with make({"a": ok}) as (proxy, reps, _):
        code, _ = call(proxy, {"prompt": "x" * 400, "max_tokens": 10})
        assert code == 200
        assert reps["a"].load.inflight_tokens == 0 and reps["a"].load.inflight_requests == 0
        keys, work, prefill = proxy.choose({"prompt": "x" * 400, "max_tokens": 10}, None,
                                           set())[1:]
        assert work == 100 + 10 and prefill == 100
        assert keys == []  # round robin reads no cache state, so none is computed
        assert reps["a"].prompt_tokens == 200 and reps["a"].hit_rate == 0.0


def test_request_id_is_forwarded_or_made():
    got = []

    def echo(request):
        got.append(request.headers.get("x-request-id"))
        return web.json_response({})

    with make({"a": echo}) as (proxy, _, _):
        def go(headers):
            async def one():
                reply = await proxy.forward("/v1/completions", b'{"prompt": "hi"}',
                                            {"prompt": "hi"}, headers)
                return reply.headers["x-request-id"]
            return run(proxy, one)
        assert go({"x-request-id": "abc"}) == "abc" and got[-1] == "abc"
        made = go({})
        assert made and got[-1] == made


def test_latency_is_observed_per_replica():
    def sse(request):
        return web.Response(body=b"data: {}\n\ndata: [DONE]\n\n",
                            headers={"content-type": "text/event-stream"})

    with make({"a": sse}) as (proxy, reps, _):
        assert call(proxy, {"prompt": "hi"})[0] == 200
        code, body = call(proxy, {"prompt": "hi", "stream": True})
        assert code == 200 and body.endswith(b"data: [DONE]\n\n")
        assert reps["a"].latency.count == 2 and reps["a"].latency.sum >= 0


def test_a_replica_past_the_request_timeout_gives_504_without_a_retry():
    async def slow(request):
        await asyncio.sleep(1)
        return web.json_response({})

    with make({"a": slow, "b": slow}) as (proxy, reps, seen):
        proxy.timeout = 0.3
        code, body = call(proxy, {"prompt": "hi"})
        assert code == 504 and "0.3s" in json.loads(body)["error"]["message"]
        assert len(seen) == 1  # the slow replica may still be running it: not sent twice
        assert all(r.load.inflight_requests == 0 for r in reps.values())


def test_a_stream_past_the_request_timeout_ends_with_an_error_event():
    async def stalls(request):
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b'data: {"choices": [{"text": "Hel"}]}\n\n')
        await asyncio.sleep(1)
        return resp

    with make({"a": stalls}) as (proxy, reps, _):
        proxy.timeout = 0.3
        code, body = call(proxy, {"prompt": "hi", "stream": True})
        assert code == 200 and b'"error"' in body and body.endswith(b"data: [DONE]\n\n")
        assert reps["a"].load.inflight_requests == 0


def test_a_stream_releases_its_charge_as_it_progresses():
    charged = []

    async def tokens(request):
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)
        for _ in range(3):
            await resp.write(b'data: {"choices": [{"text": "x"}]}\n\n')
            await asyncio.sleep(0.05)
        await resp.write(b"data: [DONE]\n\n")
        return resp

    with make({"a": tokens}) as (proxy, reps, _):
        async def go():
            body = {"prompt": "x" * 400, "max_tokens": 10, "stream": True}
            reply = await proxy.forward("/v1/completions", json.dumps(body).encode(), body, {})
            charged.append(reps["a"].load.inflight_tokens)
            async for _ in reply.chunks:
                charged.append(reps["a"].load.inflight_tokens)
            charged.append(reps["a"].load.inflight_tokens)  # the stream has ended
        run(proxy, go)
        # 100 prompt + 10 output tokens; the first chunk ends the prefill, then 1 an event
        # ([DONE] included); the end releases what is left.
        assert charged[:2] == [110, 10] and charged[-2:] == [7, 0]
        assert charged == sorted(charged, reverse=True)
