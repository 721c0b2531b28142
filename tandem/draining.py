"""A uvicorn server that drains on SIGTERM instead of dropping connections: `tandem serve`
and `tandem route` share it."""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Protocol

import uvicorn

logger = logging.getLogger("tandem")


class DrainState(Protocol):
    draining: bool
    inflight: int


class DrainingServer(uvicorn.Server):
    """On the first SIGTERM keep listening while `state.draining` makes /ready and new work
    answer 503; in-flight requests get up to `shutdown_timeout` seconds, then `on_timeout()`
    runs and the process exits. A second signal exits at once."""

    def __init__(self, config: uvicorn.Config, state: DrainState, shutdown_timeout: float):
        super().__init__(config)
        self.state, self.shutdown_timeout = state, shutdown_timeout
        self.loop: asyncio.AbstractEventLoop | None = None

    async def startup(self, sockets=None) -> None:
        self.loop = asyncio.get_running_loop()
        await super().startup(sockets)

    def handle_exit(self, sig: int, frame) -> None:
        # Not recorded in _captured_signals: uvicorn would re-raise it and the exit code would
        # say "killed by SIGTERM" after a clean drain.
        if self.state.draining or self.loop is None:
            self.should_exit = True  # a second signal, or one before start-up: stop now
            return
        self.state.draining = True
        logger.info("signal %s: draining for up to %.0fs", sig, self.shutdown_timeout)
        self.loop.call_soon_threadsafe(lambda: asyncio.ensure_future(self._drain()))

    async def _drain(self) -> None:
        deadline = time.monotonic() + self.shutdown_timeout
        await self.wait_idle(deadline)
        if self.state.inflight:
            await self.on_timeout(deadline)
        self.should_exit = True

    async def wait_idle(self, deadline: float) -> None:
        while self.state.inflight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

    async def on_timeout(self, deadline: float) -> None:
        """What to do with requests still running at the deadline (default: leave them)."""
