"""`tandem route`: the router under uvicorn; SIGTERM stops new work and drains what runs."""
from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import time

import uvicorn

from tandem.router.app import RouterState, build_router_app, make_state
from tandem.router.policies import POLICIES

logger = logging.getLogger("tandem.router")


class DrainingRouter(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, state: RouterState, shutdown_timeout: float):
        super().__init__(config)
        self.state, self.shutdown_timeout = state, shutdown_timeout
        self.loop: asyncio.AbstractEventLoop | None = None

    async def startup(self, sockets=None) -> None:
        self.loop = asyncio.get_running_loop()
        await super().startup(sockets)

    def handle_exit(self, sig: int, frame) -> None:
        if self.state.draining or self.loop is None:
            self.should_exit = True
            return
        self.state.draining = True
        logger.info("signal %s: draining for up to %.0fs", sig, self.shutdown_timeout)
        self.loop.call_soon_threadsafe(lambda: asyncio.ensure_future(self._drain()))

    async def _drain(self) -> None:
        deadline = time.monotonic() + self.shutdown_timeout
        while self.state.inflight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        self.should_exit = True


def add_router_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--worker-urls", nargs="+", required=True, help="replica base URLs")
    p.add_argument("--policy", default="cache_aware", choices=list(POLICIES))
    p.add_argument("--tokenizer", default=None,
                   help="the replicas' model (folder or alias): match Tandem replicas' real "
                        "KV blocks instead of text prefixes")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", action="append", default=[])
    p.add_argument("--max-concurrent-requests", type=int, default=256)
    p.add_argument("--max-queue", type=int, default=1024)
    p.add_argument("--queue-timeout", type=float, default=30.0)
    p.add_argument("--request-timeout", type=float, default=600.0,
                   help="seconds a request may take upstream, stream included")
    p.add_argument("--shutdown-timeout", type=float, default=30.0)


def route(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    state = make_state(args.worker_urls, args.policy, args.tokenizer,
                       api_keys=list(args.api_key),
                       max_concurrent=args.max_concurrent_requests, max_queue=args.max_queue,
                       queue_timeout=args.queue_timeout, request_timeout=args.request_timeout)
    logger.info("tandem router on http://%s:%d policy=%s replicas=%s", args.host, args.port,
                args.policy, " ".join(args.worker_urls))
    server = DrainingRouter(uvicorn.Config(build_router_app(state), host=args.host,
                                           port=args.port, log_level="warning"),
                            state, args.shutdown_timeout)
    # What was imported so far (the CLI pulls in torch) lives as long as the process: keep it
    # out of the collector's full passes, which otherwise stall every request in flight.
    gc.collect()
    gc.freeze()
    server.run()
    return 0
