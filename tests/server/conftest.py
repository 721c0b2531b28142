"""Real `tandem serve` processes on 127.0.0.1, each on a free port, for the end-to-end tests.

Each start loads SmolLM2 (~5-10 s), so the plain server is shared by the whole session and
the others are few: one with API keys and a one-slot queue, and one per SIGTERM case.
"""
from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from server_utils import RestartingServer, Server, start_server


@pytest.fixture(scope="session")
def server(smollm2_dir) -> Iterator[Server]:
    """The plain server most tests share: default limits, no API key. float32, because tests
    compare exact texts across batches, and bfloat16's GEMM kernels change with the row count."""
    with start_server(smollm2_dir, "--dtype", "float32") as s:
        yield s


@pytest.fixture(scope="session")
def auto_server(smollm2_dir) -> Iterator[Server]:
    """A server on the default dtype: bfloat16 or float32 by the CPU (and TANDEM_CPU_BF16), for
    the dtype_sensitive tests, which `make test` runs with both."""
    with start_server(smollm2_dir) as s:
        yield s


@pytest.fixture(scope="session")
def url(server) -> str:
    return server.url


@pytest.fixture(scope="session")
def client(url):
    import openai

    return openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=120)


@pytest.fixture(scope="session")
def http(url) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=url, timeout=120) as c:
        yield c


@pytest.fixture(scope="session")
def restarting(smollm2_dir) -> Iterator[RestartingServer]:
    """For requests that may kill the engine (the bugs they show): `.get()` returns a healthy
    server, restarting it when needed. A short context keeps fuzzed requests cheap."""
    holder = RestartingServer(smollm2_dir, "--max-model-len", "256")
    yield holder
    holder.close()
