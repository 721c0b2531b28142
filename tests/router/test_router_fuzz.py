"""Fuzzing the router: no body, however odd, gets a 5xx or logs a traceback, and every 4xx
carries OpenAI's error body.

`tandem route` runs as a real process in front of a stub replica that answers 200 to every
POST (fake_replicas: no engine, these test the router). So the oracle is exact: a body that
is a JSON object is forwarded and gets the stub's 200; anything else is the client's error,
a 400 that never reaches the replica. Generators, bounded and derandomized as in
tests/server/test_schema_fuzz.py:
- Schemathesis, from the Tandem server's own OpenAPI schema (the router proxies those routes),
  valid and invalid bodies;
- Hypothesis: bodies whose fields the router reads (prompt, messages, user, max_tokens ...) are
  valid or any JSON value, sent whole or cut short or with a byte changed;
- a table of bodies no JSON parser takes whole (nesting bombs, invalid UTF-8 ...) and of odd
  objects that must still be forwarded.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from test_app import replica

from tandem.procs import free_port, stop_process, wait_until_ready
from tandem.server.openai_api import ServerState, build_app

from fake_replicas import FakeReplicas  # isort: skip

SETTINGS = {"deadline": None, "database": None, "derandomize": True,
            "phases": [Phase.explicit, Phase.generate],
            "suppress_health_check": list(HealthCheck)}
PATHS = ["/v1/completions", "/v1/chat/completions"]


@dataclass
class Router:
    url: str
    stub: FakeReplicas
    log: Path
    http: httpx.Client
    log_seen: int = 0

    def post(self, path: str, raw: bytes) -> httpx.Response:
        return self.http.post(path, content=raw, headers={"content-type": "application/json"})

    def problem(self, path: str, raw: bytes, status: int, content: bytes,
                expected: tuple[int, ...] | None = None) -> str | None:
        """What is wrong with the router's answer to `raw`: not an `expected` status (by
        default the oracle's), a 4xx without OpenAI's error body, a rejected body that reached
        the stub, or a traceback in the router's log."""
        forwarded = sum(p == path for _, p, _ in self.stub.requests)
        self.stub.requests.clear()
        log = self.log.read_bytes()
        new_log, self.log_seen = log[self.log_seen:], len(log)
        if expected is None:  # no case is {"url": ...}, which /workers would take
            expected = (200 if path in PATHS and _is_object(raw) else 400,)
        if status not in expected:
            return f"HTTP {status}, expected {expected}: {content[:300]!r}"
        if b"Traceback" in new_log:
            return f"a traceback in the log: {new_log[-2000:].decode(errors='replace')}"
        if forwarded != int(status == 200):
            return f"HTTP {status}, and the stub got {forwarded} requests"
        if status >= 400:
            error = json.loads(content).get("error")
            if not (isinstance(error, dict) and set(error) == {"message", "type", "param", "code"}
                    and error["message"] and error["type"] == "invalid_request_error"):
                return f"HTTP {status} without OpenAI's error body: {content[:300]!r}"
        return None


def _is_object(raw: bytes) -> bool:
    try:
        return isinstance(json.loads(raw), dict)
    except (ValueError, RecursionError):
        return False


@pytest.fixture(scope="module")
def router(tmp_path_factory) -> Router:
    log = tmp_path_factory.mktemp("route") / "route.log"
    with FakeReplicas({"stub": replica()}) as stub, open(log, "wb") as out:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        proc = subprocess.Popen([sys.executable, "-m", "tandem.cli", "route", "--worker-urls",
                                 stub.urls["stub"], "--port", str(port)],
                                stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "HF_HUB_OFFLINE": "1"})
        try:
            assert wait_until_ready(url, proc, timeout=60), log.read_text()
            with httpx.Client(base_url=url, timeout=30) as http:
                yield Router(url, stub, log, http)
        finally:
            stop_process(proc)


def _check(router: Router, path: str, raw: bytes, failures: list[str],
           expected: tuple[int, ...] | None = None) -> None:
    r = router.post(path, raw)
    problem = router.problem(path, raw, r.status_code, r.content, expected)
    if problem:
        failures.append(f"POST {path} {raw[:300]!r}\n  -> {problem}")


# --- the table: what no parser takes whole, and odd objects that are still objects

DEEP = 100_000
NOT_OBJECTS = {
    "arrays 100,000 deep": b'{"model": "smollm2", "prompt": "Hi", "x": '
                           + b"[" * DEEP + b"]" * DEEP + b"}",
    "objects 100,000 deep": b'{"a": ' * DEEP + b"1" + b"}" * DEEP,
    "invalid UTF-8": b'{"prompt": "\xff\xfe"}',
    "empty": b"",
    "array": b"[]",
    "string": b'"str"',
    "null": b"null",
    "number": b"1",
    "truncated": b'{"prompt": "Hi", "max_tokens": 1',
    "an integer over 4,300 digits": b'{"prompt": "Hi", "max_tokens": 1' + b"0" * 5000 + b"}",
    "form-encoded": b"prompt=Hi",
}
OBJECTS = {
    "huge integer": b'{"prompt": "Hi", "max_tokens": 1' + b"0" * 400 + b"}",
    "huge float": b'{"prompt": "Hi", "max_tokens": 1e999}',
    "NaN literal": b'{"prompt": "Hi", "temperature": NaN}',
    "duplicate keys": b'{"prompt": "Hi", "prompt": [1, 2]}',
    "non-string user": b'{"prompt": "Hi", "user": {"id": [1]}}',
    "lone surrogates": b'{"prompt": "\\ud800", "user": "\\udfff"}',
    "messages not a list": b'{"messages": "Hi"}',
    "odd messages": b'{"messages": [null, 1, {"role": [], "content": {"a": NaN}}]}',
    "200 deep": b'{"prompt": ' + b"[" * 200 + b"]" * 200 + b"}",
}
TABLE = {**NOT_OBJECTS, **OBJECTS}


@pytest.mark.parametrize("path", [*PATHS, "/workers"])
@pytest.mark.parametrize("name", TABLE)
def test_table_of_bodies(router, path, name):
    failures: list[str] = []
    _check(router, path, TABLE[name], failures)
    assert not failures, failures[0]
    metrics = router.http.get("/metrics").text
    assert "tandem_router:inflight_requests 0" in metrics  # no slot left taken


def test_every_depth_around_the_parsers_limit(router):
    """Near json's recursion limit a body may parse at the router's entry and still be too
    deep for what the router does with it later: each depth is forwarded or refused (where
    the limit falls depends on the stack, so either answer will do)."""
    failures: list[str] = []
    for template in ('{"prompt": %s}', '{"user": %s}', '{"messages": [{"role": %s}]}',
                     '{"messages": [{"role": "user", "content": %s}]}'):
        for depth in range(900, 1001):
            raw = (template % ("[" * depth + "]" * depth)).encode()
            _check(router, "/v1/completions", raw, failures, expected=(200, 400))
    assert not failures, "\n".join(failures[:3])


# --- Schemathesis, from the server's schema

SCHEMA = schemathesis.openapi.from_dict(
    build_app(ServerState(engine=None, model_name="smollm2")).openapi())


@pytest.mark.parametrize("path", PATHS)
def test_schemathesis_bodies(router, path):
    operation = SCHEMA[path]["POST"]
    strategy = st.one_of(operation.as_strategy(),
                         operation.as_strategy(schemathesis.GenerationMode.NEGATIVE))
    failures: list[str] = []

    @settings(max_examples=40, **SETTINGS)
    @given(case=strategy)
    def run(case):
        response = case.call(base_url=router.url, timeout=30)
        raw = response.request.body or b""
        raw = raw.encode() if isinstance(raw, str) else raw
        problem = router.problem(path, raw, response.status_code, response.content)
        if problem:
            failures.append(f"POST {path} {raw[:500]!r}\n  -> {problem}")

    run()
    assert not failures, failures[0]


# --- Hypothesis: the fields the router reads, valid or anything, whole or damaged

TEXT = st.text(st.characters(exclude_categories=()), max_size=12)  # surrogates included
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.sampled_from([10**400, -(2**63)])
    | st.floats() | TEXT,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
    max_leaves=8)
MESSAGES = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant"]),
                                           "content": TEXT | JSON}), max_size=3)
BODIES = st.fixed_dictionaries({}, optional={
    "model": TEXT, "prompt": TEXT | st.lists(st.integers(0, 50_000), max_size=5) | JSON,
    "messages": MESSAGES | JSON, "user": TEXT | JSON, "cache_salt": TEXT | JSON,
    "max_tokens": JSON, "max_completion_tokens": JSON, "stream": st.booleans(), "x": JSON})


@st.composite
def damaged(draw) -> bytes:
    """A body as sent (json.dumps writes NaN and escapes surrogates), whole, cut short, or
    with one byte changed."""
    raw = json.dumps(draw(BODIES)).encode()
    how = draw(st.sampled_from(["whole", "cut", "byte"]))
    if how == "whole" or len(raw) < 2:
        return raw
    at = draw(st.integers(0, len(raw) - 1))
    return raw[:at] if how == "cut" else raw[:at] + bytes([draw(st.integers(0, 255))]) \
        + raw[at + 1:]


@pytest.mark.parametrize("path", PATHS)
def test_random_bodies(router, path):
    failures: list[str] = []

    @settings(max_examples=60, **SETTINGS)
    @given(raw=damaged())
    def run(raw):
        _check(router, path, raw, failures)

    run()
    assert not failures, failures[0]
