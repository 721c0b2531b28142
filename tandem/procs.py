"""Processes this host starts and talks to over loopback: a free port, waiting until one is
ready, stopping one by its PID. `serve -dp`, the tensor-parallel launcher, the benchmarks and
the tests all start children this way."""
from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Callable

import httpx


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def answers_ready(url: str) -> bool:
    return httpx.get(f"{url}/ready", timeout=2).status_code == 200


def wait_until_ready(url: str, proc: subprocess.Popen | None,
                     probe: Callable[[str], bool] = answers_ready, timeout: float = 180.0,
                     interval: float = 0.2) -> bool:
    """Poll `probe(url)` until it passes (True) or `proc` exits first (False). A probe that
    cannot connect yet counts as not ready; past `timeout`, TimeoutError."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            return False
        try:
            if probe(url):
                return True
        except httpx.HTTPError:
            pass
        time.sleep(interval)
    raise TimeoutError(f"{url}: not ready after {timeout:.0f}s")


def stop_process(proc: subprocess.Popen, timeout: float = 20.0) -> None:
    """SIGTERM (one: a second one means 'exit now' to our servers), then SIGKILL if it is
    still running after `timeout` seconds."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
