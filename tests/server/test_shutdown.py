"""SIGTERM: stop taking work, let in-flight requests finish (up to --shutdown-timeout), exit 0."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time

import httpx
import pytest
from server_utils import assert_error, metrics, start_server, wait_idle

PROMPT = "Tell me a long story about a lighthouse keeper."


def _events(lines):
    """Parsed SSE data events, then None for [DONE]."""
    for line in lines:
        if not line.startswith("data: "):
            continue
        if line == "data: [DONE]":
            yield None
            return
        yield json.loads(line[6:])


def _wait_exit(proc: subprocess.Popen, timeout: float) -> int:
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"server still running {timeout:.0f}s after SIGTERM")


def _poll(fn, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while True:
        result = fn()
        if result:
            return result
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


def test_sigterm_drains_in_flight_requests(smollm2_dir):
    with start_server(smollm2_dir, "--shutdown-timeout", "60") as server, \
            httpx.Client(base_url=server.url, timeout=120) as h:
        # A non-streaming request in flight beside the stream.
        side: dict = {}
        side_thread = threading.Thread(target=lambda: side.update(r=h.post(
            "/v1/completions", json={"prompt": PROMPT, "max_tokens": 20, "ignore_eos": True})))
        body = {"prompt": PROMPT, "max_tokens": 80, "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True}}
        with h.stream("POST", "/v1/completions", json=body) as stream:
            assert stream.status_code == 200
            events = _events(stream.iter_lines())
            first = next(events)
            assert first["choices"][0]["finish_reason"] is None
            side_thread.start()
            _poll(lambda: metrics(server.url)["tandem:num_requests_running"] == 2)

            server.proc.send_signal(signal.SIGTERM)
            _poll(lambda: h.get("/ready").status_code == 503)
            assert_error(h.get("/ready"), 503)
            assert h.get("/health").status_code == 200  # alive, just not taking work
            for path, new in [("/v1/completions", {"prompt": "x", "max_tokens": 2}),
                              ("/v1/chat/completions",
                               {"messages": [{"role": "user", "content": "x"}]}),
                              ("/v1/completions", {"prompt": "x", "stream": True})]:
                r = h.post(path, json=new)
                assert_error(r, 503)
                assert int(r.headers["retry-after"]) >= 1

            rest = list(events)  # the stream goes on to its natural end
        assert rest[-1] is None  # [DONE]
        chunks = [first, *rest[:-1]]
        assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "length"
        assert chunks[-1]["usage"]["completion_tokens"] == 80
        assert "error" not in json.dumps(chunks)
        side_thread.join(60)
        assert side["r"].status_code == 200
        assert side["r"].json()["usage"]["completion_tokens"] == 20

        assert _wait_exit(server.proc, 30) == 0  # well before the 60 s timeout
        assert "aborting" not in server.log()


def test_sigterm_cuts_off_requests_past_the_timeout(smollm2_dir):
    with start_server(smollm2_dir, "--shutdown-timeout", "1") as server, \
            httpx.Client(base_url=server.url, timeout=120) as h:
        body = {"prompt": PROMPT, "max_tokens": 2000, "ignore_eos": True, "stream": True}
        with h.stream("POST", "/v1/completions", json=body) as stream:
            events = _events(stream.iter_lines())
            assert next(events)["choices"][0]["finish_reason"] is None
            server.proc.send_signal(signal.SIGTERM)
            received = []
            try:
                received.extend(events)
            except httpx.HTTPError:
                pass  # the connection closed mid-stream: also a clean cut-off
        finishes = [c["choices"][0]["finish_reason"] for c in received
                    if c and c.get("choices")]
        assert "length" not in finishes  # it did not run to max_tokens
        errors = [c["error"] for c in received if c and "error" in c]
        for e in errors:
            assert e["message"] and e["type"]
        assert _wait_exit(server.proc, 30) == 0


def test_sigterm_after_client_disconnect_does_not_wait_for_it(smollm2_dir):
    """A streaming client that left was aborted in the engine; the drain must not keep
    counting it as in flight (and wait the whole --shutdown-timeout for it)."""
    with start_server(smollm2_dir, "--shutdown-timeout", "60") as server, \
            httpx.Client(base_url=server.url, timeout=120) as h:
        body = {"prompt": PROMPT, "max_tokens": 1000, "ignore_eos": True, "stream": True}
        with h.stream("POST", "/v1/completions", json=body) as stream:
            events = _events(stream.iter_lines())
            next(events)
            next(events)
        wait_idle(server.url, timeout=10)
        os.kill(server.proc.pid, signal.SIGTERM)
        assert _wait_exit(server.proc, 20) == 0
        assert "aborting" not in server.log()

