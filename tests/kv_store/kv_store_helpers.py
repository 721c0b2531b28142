"""Shared by this folder's tests."""
from __future__ import annotations

import threading
import time

import redis
from redis_service import RedisServer


def sleep_redis(server: RedisServer, seconds: int) -> threading.Thread:
    """Block the whole redis-server for `seconds` (DEBUG SLEEP) from a thread; returns the
    thread once the server is asleep (a probe's PING times out), so a call made next is
    certain to find it unresponsive."""
    thread = threading.Thread(target=lambda: server.client().execute_command(
        "DEBUG", "SLEEP", str(seconds)), daemon=True)
    thread.start()
    probe = redis.Redis(port=server.port, socket_timeout=0.1, retry=None)
    try:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                probe.ping()
            except redis.TimeoutError:
                return thread
            time.sleep(0.02)
    finally:
        probe.close()
    raise AssertionError("redis-server never went to sleep")
