"""The OpenAI-compatible HTTP API over an AsyncEngine."""
from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from fastapi import Depends, FastAPI, Query, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

import tandem
from tandem.dashboard.app import dashboard_app, slash_redirect
from tandem.dashboard.series import Series
from tandem.dashboard.views import engine_counters, replica_view
from tandem.engine.async_engine import AsyncEngine
from tandem.engine.kv_cache import HASH_SCHEME
from tandem.engine.outputs import RequestOutput
from tandem.engine.sampling_params import SamplingParams
from tandem.http_args import api_key_ok
from tandem.loader.tokenizer import check_text
from tandem.server import responses as R
from tandem.server.errors import APIError, from_value_error, install_error_handlers
from tandem.server.metrics import render_metrics
from tandem.server.middleware import RequestMiddleware
from tandem.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
)
from tandem.server.tools import ChoiceOutput, ToolPlan, plan_tools, render_messages


@dataclass
class ServerState:
    engine: AsyncEngine
    model_name: str
    api_keys: list[str] = field(default_factory=list)
    max_queue_len: int = 1024
    tool_call_parser: str = "hermes"  # reads tool_choice "auto" output (server/tool_parsers.py)
    dashboard_public: bool = False  # /dashboard/data without an API key
    draining: bool = False
    inflight: int = 0
    created: int = field(default_factory=lambda: int(time.time()))


@dataclass
class _Job:
    """One prompt of a request: its ids, text, and the engine request id."""
    ids: list[int]
    text: str | None
    request_id: str
    cache_salt: str | None = None


def build_app(state: ServerState, max_request_bytes: int = 1 << 20) -> FastAPI:
    series = Series(lambda: engine_counters(state.engine.engine))

    @contextlib.asynccontextmanager
    async def lifespan(app):
        task = asyncio.ensure_future(series.run())
        try:
            yield
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    app = FastAPI(title="Tandem", version=tandem.__version__, lifespan=lifespan)
    app.state.tandem = state
    app.add_middleware(RequestMiddleware, max_request_bytes=max_request_bytes)
    install_error_handlers(app)
    engine = state.engine

    def authorized(header: str) -> bool:
        return api_key_ok(header, state.api_keys)

    async def authorize(request: Request) -> None:
        if not authorized(request.headers.get("authorization", "")):
            raise APIError(401, "invalid or missing API key", code="invalid_api_key")

    async def dashboard_data() -> dict:
        return replica_view(engine.engine, state.model_name, series)

    app.add_route("/dashboard", slash_redirect, include_in_schema=False)
    app.mount("/dashboard", dashboard_app(dashboard_data,
                                          None if state.dashboard_public else authorized))

    def default_max_tokens(num_prompt: int) -> int:
        """vLLM's default when max_tokens is unset: the rest of the context the server has."""
        e = engine.engine
        return max(1, min(e.max_model_len, e.kv_capacity_tokens) - num_prompt)

    def admit(model: str | None) -> None:
        if model is not None and model != state.model_name:
            raise APIError(404, f"model {model!r} does not exist; this server serves "
                                f"{state.model_name!r}", "model", "model_not_found")
        if state.draining or not engine.running:
            raise APIError(503, "server is shutting down" if state.draining else
                           "engine is not running", headers={"Retry-After": "5"})
        if engine.num_waiting() >= state.max_queue_len:
            raise APIError(503, "too many requests waiting; retry later",
                           headers={"Retry-After": "1"})

    @app.get("/health")
    async def health():
        if not engine.running:
            raise APIError(503, "engine is not running")
        return {"status": "ok"}

    @app.get("/ready")
    async def ready():
        if state.draining or not engine.running:
            raise APIError(503, "not ready")
        return {"status": "ready"}

    @app.get("/version")
    async def version():
        return {"version": tandem.__version__}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics():
        return render_metrics(engine.engine, state.model_name)

    @app.get("/kv/events", dependencies=[Depends(authorize)])
    async def kv_events(since: int | None = Query(None, ge=0, le=2**62)):
        """Prefix-cache block hashes stored / evicted after `since`, or all of them when it is
        left out (docs/kv_cache.md)."""
        kv = engine.engine.kv
        return {"block_size": kv.block_size, "hash": HASH_SCHEME, **kv.events.since(since)}

    @app.get("/v1/models", dependencies=[Depends(authorize)])
    async def models():
        return {"object": "list", "data": [{
            "id": state.model_name, "object": "model", "created": state.created,
            "owned_by": "tandem", "max_model_len": engine.engine.max_model_len}]}

    @app.post("/tokenize", dependencies=[Depends(authorize)])
    async def tokenize(body: TokenizeRequest):
        admit(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "give exactly one of prompt and messages", "prompt")
        if body.messages is not None:
            _, ids = render_messages(engine.tokenizer, body.messages, [])
        else:
            check_text(body.prompt, "prompt")
            ids = engine.tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens)
        return {"tokens": ids, "count": len(ids), "max_model_len": engine.engine.max_model_len}

    @app.post("/detokenize", dependencies=[Depends(authorize)])
    async def detokenize(body: DetokenizeRequest):
        admit(body.model)
        try:
            engine.engine.tokenize(body.tokens or [0])  # range-checks every id
        except ValueError as e:
            raise APIError(400, str(e).replace('prompt:', 'tokens:', 1), 'tokens') from None
        return {"prompt": engine.tokenizer.decode(body.tokens)}

    @app.post("/v1/completions", dependencies=[Depends(authorize)])
    async def completions(body: CompletionRequest, request: Request):
        admit(body.model)
        prompts = body.prompt
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if not prompts:
            raise APIError(400, "prompt: must not be empty", "prompt")
        logprobs = body.logprobs
        jobs, params = [], None
        for p in prompts:
            ids = engine.engine.tokenize(p)
            max_tokens = (body.max_tokens if body.max_tokens is not None
                          else default_max_tokens(len(ids)))
            params = body.sampling_params(max_tokens, logprobs)
            if body.echo and params.prompt_logprobs is None:
                params.prompt_logprobs = logprobs  # echoed tokens get entries too (as vLLM)
            await _validate(engine, ids, params, body.cache_salt)
            text = p if isinstance(p, str) else engine.tokenizer.decode(ids)
            jobs.append((_Job(ids, text, uuid.uuid4().hex, body.cache_salt), params))
        rid = f"cmpl-{uuid.uuid4().hex}"
        stream = _completion_stream if body.stream else _completion_full
        return await _respond(request, body.stream, stream(state, rid, body, jobs, request))

    @app.post("/v1/chat/completions", dependencies=[Depends(authorize)])
    async def chat(body: ChatCompletionRequest, request: Request):
        admit(body.model)
        plan = plan_tools(body, state.tool_call_parser)
        text, ids = render_messages(engine.tokenizer, body.messages, plan.tools,
                                    body.add_generation_prompt)
        max_tokens = (body.max_completion_tokens if body.max_completion_tokens is not None
                      else body.max_tokens)
        if max_tokens is None:
            max_tokens = default_max_tokens(len(ids))
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        params = body.sampling_params(max_tokens, logprobs, plan.constraint)
        for part in plan.parts:  # a tool's bad parameters schema is named by its own field
            await asyncio.to_thread(engine.engine.grammars.grammar, part)
        await _validate(engine, ids, params, body.cache_salt)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        jobs = [(_Job(ids, text, uuid.uuid4().hex, body.cache_salt), params)]
        stream = _chat_stream if body.stream else _chat_full
        return await _respond(request, body.stream,
                              stream(state, rid, body, jobs, request, plan))

    return app


async def _validate(engine: AsyncEngine, ids: list[int], params: SamplingParams,
                    cache_salt: str | None) -> None:
    """engine.validate; one that compiles a grammar (milliseconds, cold) runs on a worker
    thread, so the event loop keeps streaming other requests' tokens meanwhile."""
    if params.structured_outputs is None:
        engine.validate(ids, params, cache_salt)
    else:
        await asyncio.to_thread(engine.validate, ids, params, cache_salt)


async def _respond(request: Request, streaming: bool, gen: AsyncIterator):
    if streaming:
        return StreamingResponse(gen, media_type="text/event-stream")
    # A non-streaming client that goes away must still abort its work: watch the connection.
    task = asyncio.ensure_future(gen.__anext__())
    while True:
        done, _ = await asyncio.wait({task}, timeout=0.2)
        if done:
            return JSONResponse(task.result())
        if await request.is_disconnected():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            return JSONResponse({}, status_code=499)


async def _merged(state: ServerState, jobs: list[tuple[_Job, SamplingParams]],
                  request: Request) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Outputs of every prompt's request as they come, tagged with the prompt's index."""
    engine, queue = state.engine, asyncio.Queue()
    request.scope.setdefault("state", {})["tokens"] = 0

    async def pump(i: int, job: _Job, params: SamplingParams) -> None:
        try:
            async for out in engine.generate(job.ids, params, job.request_id, job.text,
                                             job.cache_salt):
                await queue.put((i, out))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            await queue.put((i, e))
            return
        await queue.put((i, None))

    state.inflight += 1
    tasks = [asyncio.ensure_future(pump(i, j, p)) for i, (j, p) in enumerate(jobs)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        state.inflight -= 1  # first: the await below re-raises a cancelled client's CancelledError
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _with_errors(gen: AsyncIterator[str]) -> AsyncIterator[str]:
    """A failure after the stream started can only be reported in the stream itself."""
    try:
        async for chunk in gen:
            yield chunk
    except ValueError as e:
        a = from_value_error(e)
        yield _sse({"error": {"message": a.message, "type": "invalid_request_error",
                              "param": a.param, "code": a.code}})
    except Exception as e:  # noqa: BLE001 - reported in the stream
        yield _sse({"error": {"message": str(e), "type": "server_error", "param": None,
                              "code": None}})
    yield "data: [DONE]\n\n"


async def _completion_full(state, rid, body: CompletionRequest, jobs, request):
    final: dict[int, RequestOutput] = {}
    async for i, out in _merged(state, jobs, request):
        final[i] = out
    choices, completion_tokens = [], 0
    for i, (job, params) in enumerate(jobs):
        # vLLM's extra rides on each choice: a request can hold several prompts
        extra = ({} if body.prompt_logprobs is None
                 else {"prompt_logprobs": R.prompt_logprobs(final[i])})
        for o in final[i].outputs:
            prefix = job.text if body.echo else ""
            completion_tokens += len(o.token_ids)
            choices.append({"index": i * params.n + o.index, "text": prefix + o.text,
                            "logprobs": R.completion_logprobs(o, 0, len(prefix), body.logprobs or 0,
                                                              _echo(state, body, job, final[i])),
                            "finish_reason": o.finish_reason, **extra})
    request.scope["state"]["tokens"] = completion_tokens
    prompt_tokens = sum(len(j.ids) for j, _ in jobs)
    yield {"id": rid, "object": "text_completion", "created": int(time.time()),
           "model": state.model_name, "choices": choices,
           "usage": R.usage(prompt_tokens, completion_tokens)}


def _echo(state: ServerState, body: CompletionRequest, job: _Job,
          out: RequestOutput) -> tuple[RequestOutput, str] | None:
    """completion_logprobs' `echo`: with echo, the prompt's entries and its first token."""
    return (out, state.engine.tokenizer.decode(job.ids[:1])) if body.echo else None


async def _completion_stream(state, rid, body: CompletionRequest, jobs, request):
    async def chunks():
        created, sent = int(time.time()), {}
        completion_tokens = 0
        async for i, out in _merged(state, jobs, request):
            n = jobs[i][1].n
            for o in out.outputs:
                key = (i, o.index)
                text_len, tok_len, done = sent.get(key, (0, 0, False))
                if done:
                    continue
                first = key not in sent
                prefix = jobs[i][0].text if body.echo else ""
                delta = (prefix if first else "") + o.text[text_len:]
                if not delta and o.finish_reason is None and len(o.token_ids) == tok_len:
                    continue
                sent[key] = (len(o.text), len(o.token_ids), o.finish_reason is not None)
                completion_tokens += len(o.token_ids) - tok_len
                yield _sse({"id": rid, "object": "text_completion", "created": created,
                            "model": state.model_name, "choices": [{
                                "index": i * n + o.index, "text": delta,
                                "logprobs": R.completion_logprobs(
                                    o, tok_len, len(prefix) + text_len, body.logprobs or 0,
                                    _echo(state, body, jobs[i][0], out) if first else None),
                                "finish_reason": o.finish_reason}]})
        request.scope["state"]["tokens"] = completion_tokens
        if body.stream_options and body.stream_options.include_usage:
            yield _sse({"id": rid, "object": "text_completion", "created": created,
                        "model": state.model_name, "choices": [],
                        "usage": R.usage(sum(len(j.ids) for j, _ in jobs), completion_tokens)})
    async for chunk in _with_errors(chunks()):
        yield chunk


async def _chat_full(state, rid, body: ChatCompletionRequest, jobs, request, plan: ToolPlan):
    final = None
    async for _, out in _merged(state, jobs, request):
        final = out
    top_n = body.top_logprobs or 0
    choices = []
    for o in final.outputs:
        message, reason = ChoiceOutput(plan).message(o.text, o.finish_reason)
        choices.append({"index": o.index, "message": message,
                        "logprobs": R.chat_logprobs(o, 0, top_n), "finish_reason": reason})
    completion_tokens = sum(len(o.token_ids) for o in final.outputs)
    request.scope["state"]["tokens"] = completion_tokens
    extra = ({} if body.prompt_logprobs is None
             else {"prompt_logprobs": R.prompt_logprobs(final)})  # vLLM: top level in chat
    yield {"id": rid, "object": "chat.completion", "created": int(time.time()),
           "model": state.model_name, "choices": choices,
           "usage": R.usage(len(jobs[0][0].ids), completion_tokens), **extra}


async def _chat_stream(state, rid, body: ChatCompletionRequest, jobs, request, plan: ToolPlan):
    created, top_n = int(time.time()), body.top_logprobs or 0

    def chunk(choices: list, **extra) -> str:
        return _sse({"id": rid, "object": "chat.completion.chunk", "created": created,
                     "model": state.model_name, "choices": choices, **extra})

    async def chunks():
        yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""},
                      "logprobs": None, "finish_reason": None} for i in range(jobs[0][1].n)])
        outputs = [ChoiceOutput(plan) for _ in range(jobs[0][1].n)]
        sent: dict[int, int] = {}  # tokens sent per choice; -1 once finished
        completion_tokens = 0
        async for _, out in _merged(state, jobs, request):
            for o in out.outputs:
                tok_len = sent.get(o.index, 0)
                if tok_len < 0:
                    continue
                choice = outputs[o.index]
                delta = choice.delta(o.text, o.finish_reason is not None)
                if not delta and o.finish_reason is None and (
                        not body.logprobs or len(o.token_ids) == tok_len):
                    continue  # tokens held back (a tool call's frame): the next chunk has them
                completion_tokens += len(o.token_ids) - tok_len
                sent[o.index] = -1 if o.finish_reason else len(o.token_ids)
                yield chunk([{"index": o.index, "delta": delta,
                              "logprobs": R.chat_logprobs(o, tok_len, top_n),
                              "finish_reason": choice.finish_reason(o.finish_reason,
                                                                    choice.called)}])
        request.scope["state"]["tokens"] = completion_tokens
        if body.stream_options and body.stream_options.include_usage:
            yield chunk([], usage=R.usage(len(jobs[0][0].ids), completion_tokens))
    async for c in _with_errors(chunks()):
        yield c
