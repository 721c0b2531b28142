"""A tensor-parallel server whose worker is SIGKILLed mid-generation: the request ends with a
clear error, /health and /ready turn unhealthy, and the process exits non-zero quickly so a
supervisor restarts it."""
from __future__ import annotations

import json
import os
import signal
import threading
import time

import httpx
import pytest
from helpers import save_tiny_model
from server_utils import start_server

pytestmark = pytest.mark.slow  # CI runs it; `make test SKIP_SLOW=1` skips it locally


def children(pid: int) -> list[int]:
    out = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/children") as f:
            out += [int(c) for c in f.read().split()]
    return out


def test_killing_a_worker_fails_requests_and_exits_nonzero(tmp_path):
    model = save_tiny_model(tmp_path / "m", hidden_size=64, num_attention_heads=4,
                            num_key_value_heads=2, intermediate_size=128,
                            max_position_embeddings=4096)
    with start_server(model, "--tensor-parallel-size", "2", "--max-model-len", "4096") as s:
        [worker] = children(s.proc.pid)
        chunks: list[str] = []
        started = threading.Event()

        def stream() -> None:
            body = {"prompt": "Hello", "max_tokens": 4000, "ignore_eos": True, "stream": True}
            try:
                with httpx.stream("POST", f"{s.url}/v1/completions", json=body,
                                  timeout=30) as r:
                    for line in r.iter_lines():
                        if line.startswith("data: "):
                            chunks.append(line[6:])
                            started.set()
            except httpx.HTTPError as e:
                chunks.append(f"transport error: {e!r}")
            started.set()

        t = threading.Thread(target=stream)
        t.start()
        assert started.wait(60), "no tokens streamed"
        os.kill(worker, signal.SIGKILL)
        killed = time.monotonic()
        t.join(10)
        assert not t.is_alive(), "the stream did not end after the worker died"
        ended = time.monotonic() - killed
        errors = [json.loads(c)["error"] for c in chunks if c.startswith('{"error"')]
        assert errors and "tensor-parallel" in errors[0]["message"], chunks[-3:]
        assert ended < 5, ended
        try:
            health = httpx.get(f"{s.url}/health", timeout=5).status_code
        except httpx.HTTPError:
            health = None  # already gone: as unhealthy as it gets
        assert health != 200
        code = s.proc.wait(timeout=10)
        assert code != 0 and time.monotonic() - killed < 8, (code, s.log()[-2000:])
        assert "engine failed" in s.log()
        with pytest.raises(ProcessLookupError):
            os.kill(worker, 0)


def test_a_worker_dying_while_idle_is_noticed(tmp_path):
    """No request in flight: the keep-alive notices within a second or two."""
    model = save_tiny_model(tmp_path / "m", hidden_size=64, num_attention_heads=4,
                            num_key_value_heads=2, intermediate_size=128)
    with start_server(model, "--tensor-parallel-size", "2") as s:
        assert httpx.post(f"{s.url}/v1/completions", timeout=30,
                          json={"prompt": "Hi", "max_tokens": 2}).status_code == 200
        [worker] = children(s.proc.pid)
        os.kill(worker, signal.SIGKILL)
        killed = time.monotonic()
        code = s.proc.wait(timeout=10)
        assert code != 0 and time.monotonic() - killed < 5, code
        assert "tensor-parallel rank 1" in s.log() or "tensor-parallel group failed" in s.log()
