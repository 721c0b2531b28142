"""The router's own HTTP surface, in process, in front of real fake replicas: API keys, body
limits, admission control, membership, readiness and metrics."""
import asyncio
import socket
import threading
import time
from contextlib import contextmanager

import httpx
import pytest
import uvicorn
from aiohttp import web
from starlette.testclient import TestClient

from tandem.router.app import build_router_app, make_state

from fake_replicas import FakeReplicas  # isort: skip

BODY = {"model": "m", "prompt": "hi", "max_tokens": 1}


def replica(delay: float = 0.0, ready: int = 200):
    async def handle(request: web.Request) -> web.Response:
        if request.path == "/ready":
            return web.json_response({}, status=ready)
        if request.method == "POST":
            await asyncio.sleep(delay)
            return web.json_response({"choices": [{"text": "ok"}]})
        return web.json_response({}, status=404)
    return handle


@contextmanager
def router(handlers: dict, members: tuple[str, ...] | None = None, **kwargs):
    """The router app over the fake replicas (those named in `members`, else all of them)."""
    with FakeReplicas(handlers) as fake:
        urls = [fake.urls[n] for n in (members or fake.urls)]
        state = make_state(urls, "round_robin", **kwargs)
        with TestClient(build_router_app(state)) as client:
            yield client, state, fake


def test_api_keys_are_required_except_for_health():
    with router({"a": replica()}, api_keys=["k1", "k2"]) as (c, _, _):
        assert c.post("/v1/completions", json=BODY).status_code == 401
        bad = c.post("/v1/completions", json=BODY, headers={"Authorization": "Bearer nope"})
        assert bad.status_code == 401 and bad.json()["error"]["message"]
        for key in ("k1", "k2"):
            ok = c.post("/v1/completions", json=BODY, headers={"Authorization": f"Bearer {key}"})
            assert ok.status_code == 200, ok.text
        assert c.get("/workers").status_code == 401
        assert c.get("/health").status_code == 200


def test_oversized_bodies_are_413_by_length_or_as_they_arrive():
    with router({"a": replica()}, max_request_bytes=100) as (c, _, fake):
        assert c.post("/v1/completions", content=b"x" * 101).status_code == 413

        def chunked():
            yield b"{" + b" " * 60
            yield b" " * 60 + b"}"
        r = c.post("/v1/completions", content=chunked())
        assert r.status_code == 413 and r.json()["error"]["message"]
        assert not any(path == "/v1/completions" for _, path, _ in fake.requests)


def test_a_full_router_answers_429_and_a_long_wait_503_with_retry_after():
    with router({"a": replica(delay=0.6)}, max_concurrent=1, max_queue=1,
                queue_timeout=0.2) as (c, state, _):
        results = {}

        def send(name):
            results[name] = c.post("/v1/completions", json=BODY)
        first = threading.Thread(target=send, args=("first",))
        first.start()
        while state.inflight == 0:
            pass
        queued = threading.Thread(target=send, args=("queued",))
        queued.start()
        while state.waiting == 0:
            pass
        full = c.post("/v1/completions", json=BODY)  # the one queue place is taken
        first.join()
        queued.join()
        assert full.status_code == 429 and full.headers["retry-after"]
        assert results["first"].status_code == 200
        assert results["queued"].status_code == 503 and results["queued"].headers["retry-after"]
        assert state.rejected_total == 2 and state.inflight == 0


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions", "/workers"])
def test_a_body_nested_100000_deep_is_400_and_goes_nowhere(path):
    # json's parser raised RecursionError, which is no ValueError: the router answered 500 in
    # plain text and logged a traceback (issue 13). The table in test_router_fuzz.py has more.
    deep = b'{"model": "m", "prompt": "hi", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    with router({"a": replica()}) as (c, state, fake):
        r = c.post(path, content=deep)
        assert r.status_code == 400, r.text
        assert r.json()["error"]["type"] == "invalid_request_error"
        assert not any(p == path for _, p, _ in fake.requests)
        assert state.slots is None  # made at the first admission: none happened


def test_workers_can_be_listed_added_and_removed():
    with router({"a": replica(), "b": replica()}, members=("a",)) as (c, _, fake):
        ws = c.get("/workers").json()["workers"]
        assert [w["url"] for w in ws] == [fake.urls["a"]]
        assert set(ws[0]) >= {"id", "url", "healthy", "breaker", "inflight", "hit_rate"}
        added = c.post("/workers", json={"url": fake.urls["b"]})
        assert added.status_code == 201 and added.json()["url"] == fake.urls["b"]
        assert c.post("/workers", json={"url": "ftp://x"}).status_code == 400
        assert c.post("/workers", content=b"{").status_code == 400
        assert c.delete("/workers/nope").status_code == 404
        assert c.delete(f"/workers/{ws[0]['id']}").status_code == 200
        assert [w["url"] for w in c.get("/workers").json()["workers"]] == [fake.urls["b"]]
        assert c.post("/v1/completions", json=BODY).status_code == 200


def test_ready_follows_the_replicas_and_metrics_name_them():
    with router({"a": replica()}) as (c, state, fake):
        assert c.get("/ready").status_code == 200
        assert c.post("/v1/completions", json=BODY).status_code == 200
        text = c.get("/metrics").text
        url = fake.urls["a"]
        assert f'tandem_router:replica_requests_total{{replica="{url}"}} 1' in text
        assert f'tandem_router:replica_latency_seconds_count{{replica="{url}"}} 1' in text
        for r in state.replicas.replicas.values():
            r.healthy = False
        assert c.get("/ready").status_code == 503
        r = c.post("/v1/completions", json=BODY)
        assert r.status_code == 503 and r.headers["retry-after"]


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_unreachable_replicas_give_503_not_a_crash(path):
    with router({"a": None}) as (c, _, _):
        r = c.post(path, json=BODY)
        assert r.status_code == 503 and r.json()["error"]["type"]
        assert c.get("/health").status_code == 200


def test_request_ids_come_back():
    with router({"a": replica()}) as (c, _, _):
        r = c.post("/v1/completions", json=BODY, headers={"X-Request-Id": "req-1"})
        assert r.headers["x-request-id"] == "req-1"
        assert c.post("/v1/completions", json=BODY).headers["x-request-id"]



def test_a_client_leaving_mid_stream_closes_the_replicas_stream():
    left = threading.Event()

    async def endless(request: web.Request) -> web.StreamResponse:
        if request.path == "/ready":
            return web.json_response({})
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)
        try:
            for _ in range(100):
                await resp.write(b'data: {"choices": [{"text": "x"}]}\n\n')
                await asyncio.sleep(0.05)
        except (ConnectionError, asyncio.CancelledError):
            left.set()  # the router closed the connection: a replica would abort here
            raise
        return resp

    with FakeReplicas({"a": endless}) as fake:
        state = make_state([fake.urls["a"]], "round_robin")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        server = uvicorn.Server(uvicorn.Config(build_router_app(state), host="127.0.0.1",
                                               port=port, log_level="warning"))
        thread = threading.Thread(target=server.run)
        thread.start()
        try:
            while not server.started:
                time.sleep(0.02)
            with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/completions",
                              json={**BODY, "stream": True}) as r:
                lines = r.iter_lines()
                assert next(lines).startswith("data: ")
            assert left.wait(5)
            deadline = time.monotonic() + 5
            while state.inflight and time.monotonic() < deadline:
                time.sleep(0.02)
            replica = next(iter(state.replicas.replicas.values()))
            assert state.inflight == 0 and replica.load.inflight_requests == 0
        finally:
            server.should_exit = True
            thread.join(10)


def test_dashboard_data_needs_a_key_unless_public():
    with router({"a": replica()}, api_keys=["k1"]) as (c, _, fake):
        assert c.get("/dashboard/").status_code == 200  # the files hold no data
        assert c.get("/dashboard/data").status_code == 401
        r = c.get("/dashboard/data", headers={"Authorization": "Bearer k1"})
        assert r.status_code == 200
        (row,) = r.json()["replicas"]
        assert row["url"] == fake.urls["a"] and row["state"] == "up"
    with router({"a": replica()}, api_keys=["k1"], dashboard_public=True) as (c, _, _):
        assert c.get("/dashboard/data").json()["kind"] == "router"
