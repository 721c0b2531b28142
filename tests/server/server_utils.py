"""Helpers for the server tests: start a real `tandem serve`, read /metrics, check errors."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import httpx
import pytest

from tandem.procs import free_port, stop_process, wait_until_ready

MODEL_NAME = "smollm2"
API_KEYS = ("test-key-1", "test-key-2")
READY_TIMEOUT_S = 120.0


@dataclass
class Server:
    url: str
    proc: subprocess.Popen
    log_path: str

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()


@contextmanager
def start_server(model_dir: str, *extra: str) -> Iterator[Server]:
    """Start `tandem serve` and yield it once /ready answers 200; stop it by its PID after.
    A short --shutdown-timeout (unless `extra` sets one) keeps teardown quick."""
    if "--shutdown-timeout" not in extra:
        extra = ("--shutdown-timeout", "5", *extra)
    for attempt in range(3):
        port = free_port()
        fd, log_path = tempfile.mkstemp(prefix="tandem-serve-", suffix=".log")
        cmd = [sys.executable, "-m", "tandem.cli", "serve", "--model", model_dir,
               "--host", "127.0.0.1", "--port", str(port), "--served-model-name", MODEL_NAME,
               "--kv-cache-memory", "96MiB", *extra]
        with os.fdopen(fd, "wb") as log:  # the child keeps its own copy of the descriptor
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                    env={**os.environ, "HF_HUB_OFFLINE": "1",
                                         "TRANSFORMERS_OFFLINE": "1"})
        server = Server(f"http://127.0.0.1:{port}", proc, log_path)
        try:
            if _wait_ready(server):
                break
            if attempt < 2 and re.search(r"address already in use", server.log(), re.IGNORECASE):
                continue  # another process took the port between our probe and the bind
            pytest.fail(f"server exited with {proc.returncode} before it was ready:\n"
                        f"{server.log()[-5000:]}")
        except BaseException:
            stop_process(proc, 30)
            os.unlink(log_path)
            raise
    try:
        yield server
    finally:
        stop_process(proc, 30)
        os.unlink(server.log_path)


def _wait_ready(server: Server) -> bool:
    """True once /ready is 200; False if the process died first; fails on the timeout."""
    try:
        return wait_until_ready(server.url, server.proc, timeout=READY_TIMEOUT_S)
    except TimeoutError:
        pytest.fail(f"server not ready after {READY_TIMEOUT_S:.0f}s:\n{server.log()[-5000:]}")


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> {'name{labels}': value}, with the model_name label dropped."""
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        key, value = line.rsplit(" ", 1)
        key = re.sub(r'model_name="[^"]*",?', "", key).replace("{}", "")
        out[key] = float(value)
    return out


def model_dtype(server: Server) -> str:
    """The dtype the server runs the model in, from its start-up line (`dtype=bfloat16`)."""
    m = re.search(r"tandem listening on .* dtype=(\w+) ", server.log())
    assert m, server.log()[-2000:]
    return m.group(1)


def metrics(url: str) -> dict[str, float]:
    r = httpx.get(f"{url}/metrics", timeout=30)
    assert r.status_code == 200, r.text
    return parse_metrics(r.text)


def wait_idle(url: str, idle_kv: float = 0.0, timeout: float = 30.0) -> dict[str, float]:
    """Poll /metrics until nothing runs or waits and the KV cache usage is back to `idle_kv`."""
    deadline = time.monotonic() + timeout
    while True:
        m = metrics(url)
        if (m["tandem:num_requests_running"] == 0 and m["tandem:num_requests_waiting"] == 0
                and m["tandem:kv_cache_usage_perc"] == idle_kv):
            return m
        if time.monotonic() > deadline:
            pytest.fail(f"server not idle after {timeout}s: {m}")
        time.sleep(0.05)


def assert_error(r: httpx.Response, status: int, param: str | None = None,
                 code: str | None = None) -> dict:
    """The response is OpenAI's error body with this status (and param / code when given)."""
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"], err
    assert isinstance(err["type"], str) and err["type"], err
    if param is not None:
        assert err["param"] == param, err
    if code is not None:
        assert err["code"] == code, err
    return err


def unhealthy(url: str, timeout: float = 3.0) -> str | None:
    """Why the server is not healthy and idle (None when it is): /health not 200, or a request
    still running or waiting `timeout` seconds after the client got its answer."""
    deadline = time.monotonic() + timeout
    try:
        while True:
            health = httpx.get(f"{url}/health", timeout=10)
            if health.status_code != 200:
                return f"/health says {health.status_code}: {health.text}"
            m = metrics(url)
            running = m["tandem:num_requests_running"], m["tandem:num_requests_waiting"]
            if running == (0, 0):
                return None
            if time.monotonic() > deadline:
                return f"requests left (running, waiting): {running}"
            time.sleep(0.1)
    except httpx.HTTPError as e:
        return f"unreachable: {e!r}"


class RestartingServer:
    """A server for tests that may kill its engine (a bug they show): `get()` hands out a
    healthy, idle one, starting a fresh process when the last one's /health is no longer 200
    or a request is still left running in it."""

    def __init__(self, model_dir: str, *extra: str):
        self.model_dir, self.extra = model_dir, extra
        self._cm = None
        self._server: Server | None = None

    def get(self) -> Server:
        if self._server is not None and not unhealthy(self._server.url):
            return self._server
        self.close()
        self._cm = start_server(self.model_dir, *self.extra)
        self._server = self._cm.__enter__()
        return self._server

    def close(self) -> None:
        if self._cm is not None:
            cm, self._cm, self._server = self._cm, None, None
            cm.__exit__(None, None, None)
