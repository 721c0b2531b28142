"""The router's HTTP app: OpenAI routes proxied to replicas, membership, health, metrics.

Admission control bounds the work in flight (`max_concurrent`) and the queue in front of it
(`max_queue`, each waiting at most `queue_timeout` seconds); beyond that the router answers 429
with Retry-After instead of piling requests onto replicas that cannot take them.
"""
from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Mount, Route

from tandem.dashboard.app import dashboard_app, slash_redirect
from tandem.dashboard.series import Series
from tandem.dashboard.views import router_counters, router_view
from tandem.http_args import api_key_ok
from tandem.router.proxy import Proxy, Reply, error_body, error_reply, parse_body
from tandem.router.replicas import ReplicaSet
from tandem.router.upstream import Pool

PROXIED = ("/v1/completions", "/v1/chat/completions")


@dataclass
class RouterState:
    replicas: ReplicaSet
    proxy: Proxy
    api_keys: list[str] = field(default_factory=list)
    max_concurrent: int = 256
    max_queue: int = 1024
    queue_timeout: float = 30.0
    max_request_bytes: int = 1 << 20
    draining: bool = False
    inflight: int = 0
    waiting: int = 0
    rejected_total: int = 0
    slots: asyncio.Semaphore | None = None
    dashboard_public: bool = False  # /dashboard/data without an API key
    discovery: object | None = None  # a router.discovery.DnsDiscovery: adds and drains replicas


def _error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message), status_code=status, headers=headers)


class ClientGone(Exception):
    pass


async def read_body(receive, declared: str, limit: int) -> bytes | None:
    """The body, or None once it is over `limit` bytes (by Content-Length, or counted as it
    arrives), so an oversized body is never held whole."""
    if declared.isdigit() and int(declared) > limit:
        return None
    parts, size = [], 0
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            raise ClientGone
        chunk = msg.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        parts.append(chunk)
        if not msg.get("more_body"):
            return b"".join(parts)


async def send_reply(send, receive, reply: Reply) -> None:
    headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in reply.headers.items()]
    if reply.chunks is None:
        headers.append((b"content-length", str(len(reply.body)).encode()))
        await send({"type": "http.response.start", "status": reply.status, "headers": headers})
        await send({"type": "http.response.body", "body": reply.body})
        return

    async def relay() -> None:
        async for chunk in reply.chunks:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    async def client_left() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    # A client that leaves mid-stream cancels the relay, which closes the upstream connection:
    # the replica sees the disconnect and stops generating.
    await send({"type": "http.response.start", "status": reply.status, "headers": headers})
    tasks = [asyncio.ensure_future(relay()), asyncio.ensure_future(client_left())]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await reply.chunks.aclose()


def build_router_app(state: RouterState):
    """An ASGI app: the proxied OpenAI routes are served by plain ASGI code (the hot path, no
    framework in it), everything else by Starlette."""

    def authorized(header: str) -> bool:
        return api_key_ok(header, state.api_keys)

    async def admit() -> Reply | None:
        """Take a concurrency slot, waiting in the bounded queue if need be; or the refusal."""
        if state.slots is None:
            state.slots = asyncio.Semaphore(state.max_concurrent)
        if not state.slots.locked():
            await state.slots.acquire()  # a free slot: no queue, no timer
            return None
        if state.waiting >= state.max_queue:
            state.rejected_total += 1
            return error_reply(429, "too many requests queued at the router",
                               {"retry-after": "1"})
        state.waiting += 1
        try:
            await asyncio.wait_for(state.slots.acquire(), state.queue_timeout)
        except TimeoutError:
            state.rejected_total += 1
            return error_reply(503, "timed out waiting for capacity", {"retry-after": "1"})
        finally:
            state.waiting -= 1
        return None

    async def proxied(scope, receive, send) -> None:
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        if scope["method"] != "POST":
            return await send_reply(send, receive, error_reply(405, "method not allowed"))
        if not authorized(headers.get("authorization", "")):
            return await send_reply(send, receive, error_reply(401, "invalid or missing API key"))
        if state.draining:
            return await send_reply(send, receive, error_reply(
                503, "router is shutting down", {"retry-after": "5"}))
        try:
            raw = await read_body(receive, headers.get("content-length", ""),
                                  state.max_request_bytes)
        except ClientGone:
            return None
        if raw is None:
            return await send_reply(send, receive, error_reply(
                413, f"request body is over {state.max_request_bytes} bytes"))
        try:  # before admission: a body no replica could read takes no slot and goes nowhere
            body = parse_body(raw)
        except ValueError as e:
            return await send_reply(send, receive, error_reply(400, str(e)))
        refused = await admit()
        if refused is not None:
            return await send_reply(send, receive, refused)
        state.inflight += 1
        try:  # a stream holds its slot until it ends
            await send_reply(send, receive,
                             await state.proxy.forward(scope["path"], raw, body, headers))
        finally:
            state.inflight -= 1
            state.slots.release()

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def ready(request: Request) -> Response:
        # The counts say how much capacity is left, e.g. after serve -dp gave up on a replica.
        counts = {"replicas_up": len(state.replicas.available()),
                  "replicas": len(state.replicas.replicas)}
        if state.draining or not counts["replicas_up"]:
            return JSONResponse({**error_body(503, "no replica is ready"), **counts},
                                status_code=503)
        return JSONResponse({"status": "ready", **counts})

    def describe(r) -> dict:
        return {"id": r.id, "url": r.url, "healthy": r.healthy, "draining": r.draining,
                "breaker": r.breaker.state, "inflight": r.load.inflight_requests,
                "requests": r.requests_total, "retries": r.retries_total,
                "inflight_tokens": r.load.inflight_tokens,
                "waiting_tokens": r.load.waiting_tokens,
                "hit_rate": r.hit_rate, "cached_blocks": r.load.cached_blocks,
                "tandem": r.block_size is not None}

    async def workers(request: Request) -> Response:
        if not authorized(request.headers.get("authorization", "")):
            return _error(401, "invalid or missing API key")
        if request.method == "GET":
            return JSONResponse({"workers": [describe(r)
                                             for r in state.replicas.replicas.values()]})
        try:
            url = parse_body(await request.body())["url"]
            return JSONResponse(describe(state.replicas.add(url)), status_code=201)
        except (ValueError, KeyError, TypeError) as e:
            return _error(400, f"url: give {{\"url\": \"http://host:port\"}} ({e})")

    async def remove_worker(request: Request) -> Response:
        if not authorized(request.headers.get("authorization", "")):
            return _error(401, "invalid or missing API key")
        try:
            r = state.replicas.remove(request.path_params["id"])
        except KeyError:
            return _error(404, "no such worker")
        return JSONResponse(describe(r))

    async def metrics(request: Request) -> Response:
        lines = ["# TYPE tandem_router:inflight_requests gauge",
                 f"tandem_router:inflight_requests {state.inflight}",
                 "# TYPE tandem_router:rejected_total counter",
                 f"tandem_router:rejected_total {state.rejected_total}"]
        for name, kind, get in (
                ("replica_requests_total", "counter", lambda r: r.requests_total),
                ("replica_retries_total", "counter", lambda r: r.retries_total),
                ("replica_healthy", "gauge", lambda r: int(r.healthy)),
                ("replica_breaker_state", "gauge", lambda r: r.breaker.state_code),
                ("replica_prefix_hit_rate", "gauge", lambda r: r.hit_rate)):
            lines.append(f"# TYPE tandem_router:{name} {kind}")
            lines += [f'tandem_router:{name}{{replica="{r.url}"}} {get(r)}'
                      for r in state.replicas.replicas.values() if get(r) is not None]
        lines.append("# TYPE tandem_router:replica_latency_seconds histogram")
        for r in state.replicas.replicas.values():
            total, h = 0, r.latency
            for bound, count in zip((*h.buckets, "+Inf"), h.counts):
                total += count
                lines.append(f'tandem_router:replica_latency_seconds_bucket{{replica="{r.url}",'
                             f'le="{bound}"}} {total}')
            lines.append(f'tandem_router:replica_latency_seconds_sum{{replica="{r.url}"}} {h.sum}')
            lines.append(f'tandem_router:replica_latency_seconds_count{{replica="{r.url}"}} '
                         f'{h.count}')
        return PlainTextResponse("\n".join(lines) + "\n")

    series = Series(lambda: router_counters(state.replicas.replicas.values()))

    async def dashboard_data() -> dict:
        return router_view(list(state.replicas.replicas.values()), series, state.inflight,
                           state.waiting)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        state.proxy.client = Pool()
        tasks = [asyncio.ensure_future(state.replicas.probe_forever(state.proxy.client)),
                 asyncio.ensure_future(series.run())]
        if state.discovery is not None:
            tasks.append(asyncio.ensure_future(state.discovery.run(state.replicas)))
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await state.proxy.client.close()

    routes = [Route("/health", health), Route("/ready", ready), Route("/metrics", metrics),
              Route("/workers", workers, methods=["GET", "POST"]),
              Route("/workers/{id}", remove_worker, methods=["DELETE"]),
              Route("/dashboard", slash_redirect),
              Mount("/dashboard", dashboard_app(
                  dashboard_data, None if state.dashboard_public else authorized))]
    rest = Starlette(routes=routes, lifespan=lifespan)

    async def app(scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"] in PROXIED:
            await proxied(scope, receive, send)
        else:
            await rest(scope, receive, send)
    return app


def make_state(urls: list[str], policy_name: str = "cache_aware", tokenizer: str | None = None,
               request_timeout: float = 600.0, **kwargs) -> RouterState:
    from tandem.router.engine_keys import EngineKeys
    from tandem.router.policies import make_policy

    replicas = ReplicaSet()
    for u in urls:
        replicas.add(u)
    keys = EngineKeys(tokenizer) if tokenizer else None
    proxy = Proxy(replicas, make_policy(policy_name), timeout=request_timeout, engine_keys=keys)
    return RouterState(replicas, proxy, **kwargs)
