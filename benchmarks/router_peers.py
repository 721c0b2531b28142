"""Start the routers the router benchmarks compare: ours (`tandem route`) and SGLang's.

sglang-router is a peer, not a dependency: it goes into its own venv under `.bench/` the first
time a benchmark needs it (pip from the package index), and runs as its own process. Every
process here binds 127.0.0.1 on a free port and is stopped by its PID.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from tandem.procs import free_port, stop_process, wait_until_ready

ROOT = Path(__file__).resolve().parent.parent
SGLANG_ROUTER = "sglang-router==0.3.2"
SGLANG_VENV = ROOT / ".bench" / "sglang-router"


def exit_on_sigterm() -> None:
    """SIGTERM unwinds like Ctrl-C, so every process a benchmark started is stopped too."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))


def sglang_python() -> str:
    """The peer venv's python, created with sglang-router in it when missing."""
    py = SGLANG_VENV / "bin" / "python"
    probe = [str(py), "-c", "import sglang_router"]
    if not py.exists() or subprocess.run(probe, check=False, capture_output=True).returncode != 0:
        print(f"installing {SGLANG_ROUTER} into {SGLANG_VENV} ...", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", str(SGLANG_VENV)], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", SGLANG_ROUTER], check=True)
    return str(py)


def sglang_version() -> str:
    out = subprocess.run([sglang_python(), "-m", "pip", "show", "sglang-router"],
                         check=False, capture_output=True, text=True).stdout
    return next((line.split()[-1] for line in out.splitlines() if line.startswith("Version")),
                "?")


def wait_for(url: str, proc: subprocess.Popen, probe: Callable[[str], bool],
             timeout: float = 180.0) -> None:
    if not wait_until_ready(url, proc, probe, timeout):
        raise RuntimeError(f"{url}: process exited with {proc.returncode}")


def routes_a_request(url: str) -> bool:
    """The router answers a proxied request: its replicas are registered and healthy."""
    body = {"model": "m", "prompt": "warm up", "max_tokens": 1}
    return httpx.post(f"{url}/v1/completions", json=body, timeout=30).status_code == 200


@contextmanager
def process(cmd: list[str], url: str, probe: Callable[[str], bool] = routes_a_request,
            env: dict | None = None) -> Iterator[str]:
    """Run `cmd` (its output to a log under .bench/logs), yield `url` once `probe` passes."""
    logs = ROOT / ".bench" / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    name = Path(cmd[2] if cmd[1] == "-m" else cmd[1]).name
    with open(logs / f"{name}-{url.rsplit(':', 1)[1]}.log", "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})
        try:
            wait_for(url, proc, probe)
            yield url
        finally:
            stop_process(proc)


def tandem_router(urls: list[str], policy: str = "cache_aware",
                  tokenizer: str | None = None) -> tuple[list[str], str]:
    port = free_port()
    cmd = [sys.executable, "-m", "tandem.cli", "route", "--worker-urls", *urls,
           "--policy", policy, "--host", "127.0.0.1", "--port", str(port),
           "--max-concurrent-requests", "4096"]
    if tokenizer:
        cmd += ["--tokenizer", tokenizer]
    return cmd, f"http://127.0.0.1:{port}"


def sglang_router(urls: list[str], policy: str = "cache_aware") -> tuple[list[str], str]:
    """SGLang's router with its defaults, but request logging off (ours logs none either)."""
    port = free_port()
    cmd = [sglang_python(), "-m", "sglang_router.launch_router", "--worker-urls", *urls,
           "--policy", policy, "--host", "127.0.0.1", "--port", str(port),
           "--log-level", "warn", "--max-concurrent-requests", "4096",
           "--prometheus-port", str(free_port())]
    return cmd, f"http://127.0.0.1:{port}"


def tandem_replica(model: str, *extra: str) -> tuple[list[str], str]:
    port = free_port()
    cmd = [sys.executable, "-m", "tandem.cli", "serve", "--model", model, "--host", "127.0.0.1",
           "--port", str(port), "--log-stats-interval", "0", *extra]
    return cmd, f"http://127.0.0.1:{port}"
