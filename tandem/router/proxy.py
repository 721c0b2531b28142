"""Forward one OpenAI request to a replica: pick, send, retry before the first byte, stream.

A request is retried on another replica (jittered backoff) when the connection fails or the
replica answers 429/502/503/504, as long as nothing has gone to the client yet. Once a stream
has started it is never replayed: an upstream failure becomes an SSE error event and
`data: [DONE]`, so the client sees a clean end instead of a hang.
"""
from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from tandem.router.engine_keys import EngineKeys, block_keys
from tandem.router.policies import RouteRequest
from tandem.router.prefix_index import TEXT_BLOCK_CHARS, text_blocks
from tandem.router.replicas import STORE, Replica, ReplicaSet
from tandem.router.retry import Backoff, is_retryable
from tandem.router.upstream import ConnectFailed, Pool, UpstreamError, UpstreamTimeout
from tandem.router.upstream import Response as UpstreamResponse

_HOP_HEADERS = {"host", "content-length", "connection", "transfer-encoding", "keep-alive"}
# A request is charged at most this much output: no replica's context holds more, and a
# client's max_tokens of 10**400 would overflow the float running mean of work.
_MAX_CHARGED_OUTPUT = 1 << 20


def routing_text(body: dict) -> str:
    """The text whose prefix the replica's cache would reuse: the prompt, or the messages."""
    try:
        if "messages" in body and isinstance(body["messages"], list):
            parts = []
            for m in body["messages"]:
                if isinstance(m, dict):
                    c = m.get("content")
                    parts.append(f"{m.get('role', '')}\n"
                                 f"{c if isinstance(c, str) else json.dumps(c)}")
            return "\n".join(parts)
        p = body.get("prompt")
        return p if isinstance(p, str) else json.dumps(p) if p is not None else ""
    except RecursionError:
        # A value parsed just under json's depth limit is too deep to write out again a few
        # calls further down. No replica takes such a body: it may go anywhere.
        return ""


def parse_body(raw: bytes) -> dict:
    """The request body as a JSON object; ValueError, with the reason, when it is not one."""
    try:
        body = json.loads(raw)
    except RecursionError:  # json recurses once per level: ~1,000 levels exhaust the stack
        raise ValueError("body: JSON nested too deeply") from None
    except ValueError as e:  # invalid JSON or UTF-8, or an integer over 4,300 digits
        raise ValueError(f"body: invalid JSON ({e})") from None
    if isinstance(body, dict):
        return body
    raise ValueError("body: must be a JSON object")


def error_body(status: int, message: str) -> dict:
    kind = "invalid_request_error" if status < 500 else "service_unavailable"
    return {"error": {"message": message, "type": kind, "param": None, "code": None}}


@dataclass
class Upstream:
    """The replica's answer (status and headers read, body not yet) and what it is charged."""
    replica: Replica
    response: UpstreamResponse
    keys: list[bytes]
    work: int  # still charged to the replica: falls as the stream shows progress
    prefill: int
    started: float


@dataclass
class Reply:
    """What goes back to the client: a whole body, or `chunks` relayed as they arrive."""
    status: int
    headers: dict[str, str]
    body: bytes = b""
    chunks: AsyncIterator[bytes] | None = None


def error_reply(status: int, message: str, headers: dict[str, str] | None = None) -> Reply:
    return Reply(status, {"content-type": "application/json", **(headers or {})},
                 json.dumps(error_body(status, message)).encode())


class Proxy:
    def __init__(self, replicas: ReplicaSet, policy, client: Pool | None = None,
                 max_attempts: int = 3, backoff: Backoff | None = None, timeout: float = 600.0,
                 engine_keys: EngineKeys | None = None):
        self.replicas, self.policy, self.client = replicas, policy, client
        self.engine_keys = engine_keys
        self.max_attempts, self.backoff, self.timeout = max_attempts, backoff or Backoff(), timeout

    def choose(self, body: dict, session: str | None,
               exclude: set[str]) -> tuple[Replica, list, int, int]:
        """The replica, the request's text keys, its work in tokens (uncached prompt +
        output), and the prefill part of that work."""
        candidates = [r for r in self.replicas.available() if r.id not in exclude]
        if not candidates:
            raise LookupError("no replica is available")
        text = routing_text(body)
        keys, ids, cached, shared = [], None, {}, 0
        if getattr(self.policy, "uses_cache", False):
            keys = text_blocks(text)
            ids = self.engine_keys.token_ids(body) if self.engine_keys else None
            cached, shared = self._cached_tokens(body, candidates, keys, ids)
        req = RouteRequest(prompt_tokens=len(ids) if ids else max(1, len(text) // 4),
                           cached_tokens=cached, session=session, shared_tokens=shared)
        pick = self.policy.pick([r.load for r in candidates], req)
        chosen = next(r for r in candidates if r.id == pick.name)
        hit = min(max(cached.get(chosen.id, 0), shared), req.prompt_tokens)
        chosen.prompt_tokens += req.prompt_tokens
        chosen.expected_hit_tokens += hit
        out = body.get("max_completion_tokens") or body.get("max_tokens")
        # What it costs the replica: the prefill it still has to compute, and the output.
        prefill = req.prompt_tokens - hit
        work = prefill + (min(out, _MAX_CHARGED_OUTPUT) if isinstance(out, int) and out > 0
                          else 256)
        self.replicas.avg_work += (work - self.replicas.avg_work) / 64  # running mean
        return chosen, keys, work, prefill

    def _cached_tokens(self, body: dict, candidates: list[Replica], keys: list[bytes],
                       ids: list[int] | None) -> tuple[dict[str, int], int]:
        """Tokens of the request's prefix each replica holds: by the text the router sent it
        (64 bytes ~ 16 tokens), and for Tandem replicas (with --tokenizer) by the engine's own
        blocks. The engine's events arrive a probe interval late, so a prefix routed there a
        moment ago counts by its text until they do; the larger of the two stands. Also the
        tokens of the prefix a shared KV store holds, which any Tandem replica can load."""
        cached, index = {}, self.replicas.index
        salt = body.get("cache_salt") if isinstance(body.get("cache_salt"), str) else None
        shared = 0
        for r in candidates:
            cached[r.id] = index.match(keys, [r.id])[r.id] * TEXT_BLOCK_CHARS // 4
            r.load.cached_blocks = index.size(r.id)
            if ids is not None and r.block_size:
                chain = block_keys(ids, r.block_size, salt)
                n = self.replicas.engine_index.match(chain, [r.id])[r.id]
                cached[r.id] = max(cached[r.id], n * r.block_size)
                r.load.cached_blocks = self.replicas.engine_index.size(r.id)
                stored = self.replicas.store_index.match(chain, [STORE])[STORE]
                shared = max(shared, stored * r.block_size)
        return cached, shared

    async def send(self, path: str, raw: bytes, body: dict, headers: dict[str, str],
                   session: str | None) -> Upstream:
        """The first acceptable upstream response."""
        tried: set[str] = set()
        last = "no replica is available"
        for attempt in range(self.max_attempts):
            try:
                r, keys, work, prefill = self.choose(body, session, tried)
            except LookupError:
                break
            tried.add(r.id)
            if not r.breaker.allow():
                continue
            r.load.inflight_requests += 1
            r.load.inflight_tokens += work
            r.requests_total += 1
            started = time.monotonic()
            timed_out = False
            try:
                resp = await self.client.request("POST", r.url + path, raw, headers,
                                                 self.timeout)
            except ConnectFailed as e:  # never reached it (or it died first): retry elsewhere
                last = f"replica {r.id}: {e}"
            except UpstreamTimeout:  # it may still be working on it: a retry would run it twice
                timed_out = True
            except BaseException:
                self._unload(r, work)
                raise
            else:
                if not is_retryable(resp.status, 0):
                    return Upstream(r, resp, keys, work, prefill, started)
                resp.release()
                last = f"replica {r.id} answered {resp.status}"
            self._unload(r, work)
            r.breaker.record_failure()
            if timed_out:
                raise UpstreamTimeout(f"replica {r.id} did not answer within {self.timeout:g}s")
            if attempt + 1 < self.max_attempts:
                r.retries_total += 1
                await asyncio.sleep(self.backoff.delay(attempt))
        raise LookupError(last)

    async def forward(self, path: str, raw: bytes, body: dict,
                      headers: dict[str, str]) -> Reply:
        """Send `raw` (its bytes unchanged; `body` is it parsed, to route by) to a replica."""
        session = headers.get("x-session-id") or (body.get("user") if isinstance(
            body.get("user"), str) else None)
        upstream_headers = {k: v for k, v in headers.items() if k not in _HOP_HEADERS}
        request_id = upstream_headers.setdefault("x-request-id", os.urandom(16).hex())
        try:
            up = await self.send(path, raw, body, upstream_headers, session)
        except UpstreamTimeout as e:
            return error_reply(504, str(e), {"x-request-id": request_id})
        except LookupError as e:
            return error_reply(503, str(e), {"retry-after": "1", "x-request-id": request_id})
        r, resp = up.replica, up.response
        if resp.status < 400:
            self.replicas.index.insert(r.id, up.keys)
        streaming = resp.header("content-type").startswith("text/event-stream")
        out_headers = {k: v for k, v in resp.headers if k not in _HOP_HEADERS}
        out_headers.setdefault("x-request-id", request_id)
        if not streaming:
            try:
                content = await resp.read()
                r.breaker.record_success()
            except UpstreamError as e:
                r.breaker.record_failure()
                return error_reply(502, f"replica {r.id}: {e!r}", {"x-request-id": request_id})
            finally:
                self._done(up)
            return Reply(resp.status, out_headers, content)
        return Reply(resp.status, out_headers, chunks=self._relay(up))

    async def _relay(self, up: Upstream) -> AsyncIterator[bytes]:
        try:
            async for chunk in up.response.chunks():
                # The stream shows the replica's progress: the prefill is done at the first
                # chunk, and each later one is about a token. What is left stays charged.
                step = up.prefill if up.prefill else chunk.count(b"data:")
                up.prefill = 0
                step = min(step, up.work)
                up.work -= step
                up.replica.load.inflight_tokens -= step
                yield chunk
            up.replica.breaker.record_success()
        except UpstreamError as e:
            up.replica.breaker.record_failure()
            err = error_body(502, f"replica {up.replica.id} failed mid-stream: "
                                  f"{type(e).__name__}")
            yield f"data: {json.dumps(err)}\n\ndata: [DONE]\n\n".encode()
        finally:
            self._done(up)

    def _done(self, up: Upstream) -> None:
        up.response.release()
        up.replica.latency.observe(time.monotonic() - up.started)
        self._unload(up.replica, up.work)

    def _unload(self, r: Replica, work: int) -> None:
        r.load.inflight_requests -= 1
        r.load.inflight_tokens -= work
        self.replicas.finished(r)
