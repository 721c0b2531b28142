"""Real HTTP replicas for the router's unit tests: aiohttp servers on 127.0.0.1, one per
name, each answering with a handler the test gives (no engine: these test the router)."""
from __future__ import annotations

import asyncio
import inspect
import socket
import threading
from collections.abc import Callable
from typing import Self

from aiohttp import web

Handler = Callable[[web.Request], web.StreamResponse] | None  # None: nothing listens


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FakeReplicas:
    """`with FakeReplicas({"a": handler}) as f:` f.urls["a"] serves handler; f.seen lists
    the names that got a request, in order, and f.requests the (name, path, query)."""

    def __init__(self, handlers: dict[str, Handler],
                 listen: dict[str, tuple[str, int]] | None = None):
        self.handlers = handlers
        self.listen = listen or {}  # name -> (host, port); default 127.0.0.1 on a free port
        self.urls: dict[str, str] = {}
        self.seen: list[str] = []
        self.requests: list[tuple[str, str, dict]] = []
        self._loop = asyncio.new_event_loop()
        self._runners: list[web.AppRunner] = []

    def __enter__(self) -> Self:
        threading.Thread(target=self._loop.run_forever, daemon=True).start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    def __exit__(self, *exc) -> None:
        async def stop():
            for r in self._runners:
                await r.cleanup()
        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)

    def name_of(self, url: str) -> str:
        return next(n for n, u in self.urls.items() if url.startswith(u))

    async def _start(self) -> None:
        for name, handler in self.handlers.items():
            if handler is None:
                self.urls[name] = f"http://127.0.0.1:{_closed_port()}"
                continue
            app = web.Application()
            app.router.add_route("*", "/{tail:.*}", self._wrap(name, handler))
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            host, port = self.listen.get(name, ("127.0.0.1", 0))
            site = web.TCPSite(runner, host, port)
            await site.start()
            self._runners.append(runner)
            self.urls[name] = f"http://{host}:{runner.addresses[0][1]}"

    def _wrap(self, name: str, handler: Callable) -> Callable:
        async def handle(request: web.Request) -> web.StreamResponse:
            self.seen.append(name)
            self.requests.append((name, request.path, dict(request.query)))
            out = handler(request)
            return await out if inspect.isawaitable(out) else out
        return handle
