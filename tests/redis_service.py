"""A real `redis-server` (the distribution's package) on a free loopback port, for the KV store
tests. Without the binary those tests skip with the reason printed, unless
TANDEM_REQUIRE_SERVICES=1 (CI sets it), which turns the skip into a failure."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time

import pytest

from tandem.procs import free_port


def need(binary: str, package: str) -> str:
    """The binary's path, or a skip (a failure under TANDEM_REQUIRE_SERVICES=1)."""
    path = shutil.which(binary)
    if path is None:
        reason = f"{binary} not found: install the distribution's {package} package"
        if os.environ.get("TANDEM_REQUIRE_SERVICES") == "1":
            pytest.fail(f"TANDEM_REQUIRE_SERVICES=1: {reason}")
        print(f"SKIP: {reason}")
        pytest.skip(reason)
    return path


class RedisServer:
    """One redis-server process; `kill()` SIGKILLs it, `start()` brings it back on the same
    port (empty: nothing is saved to disk)."""

    def __init__(self, binary: str, workdir: str):
        self.binary, self.workdir = binary, workdir
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 10.0) -> None:
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", self.workdir, "--protected-mode", "yes",
             "--enable-debug-command", "local"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), 0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"redis-server did not answer on port {self.port}")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()

    def client(self):
        import redis

        return redis.Redis.from_url(self.url)


@pytest.fixture
def redis_server(tmp_path):
    """A fresh, empty Redis for one test, stopped at its end."""
    server = RedisServer(need("redis-server", "redis-server"), str(tmp_path))
    server.start()
    try:
        yield server
    finally:
        server.stop()
