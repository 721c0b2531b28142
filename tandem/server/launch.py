"""`tandem serve`: the engine, the API, and a SIGTERM drain, under uvicorn."""
from __future__ import annotations

import argparse
import asyncio
import logging

import uvicorn

from tandem.config import EngineConfig, argument_group, dtype_name
from tandem.draining import DrainingServer
from tandem.engine.async_engine import AsyncEngine
from tandem.http_args import add_listen_args
from tandem.server.openai_api import ServerState, build_app
from tandem.server.tool_parsers import PARSERS

logger = logging.getLogger("tandem.server")


class EngineServer(DrainingServer):
    """The drain of `tandem.draining`, plus: requests still running at the deadline are
    aborted, and a dead engine makes the process exit non-zero."""

    def __init__(self, config: uvicorn.Config, state: ServerState, shutdown_timeout: float):
        super().__init__(config, state, shutdown_timeout)
        self.exit_code = 0

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        self._watch = asyncio.ensure_future(self._watch_engine())

    async def _watch_engine(self) -> None:
        """A dead engine (a tensor-parallel rank lost, a failed step) cannot recover: answer
        what is in flight with the error, then exit non-zero so a supervisor restarts us."""
        engine = self.state.engine
        while engine.error is None:
            await asyncio.sleep(0.2)
        logger.error("engine failed: %s; exiting", engine.error)
        self.state.draining = True
        self.exit_code = 1
        await asyncio.sleep(1.0)  # let the failed requests' error responses go out
        self.should_exit = True

    async def on_timeout(self, deadline: float) -> None:
        logger.warning("aborting %d requests still running", self.state.inflight)
        self.state.engine.abort_all("server is shutting down")
        await self.wait_idle(deadline + 5)


def add_server_args(p: argparse.ArgumentParser) -> None:
    """The HTTP server's flags, in the group server; -dp joins the engine's parallelism group."""
    par = argument_group(p, "parallelism")
    par.add_argument("--data-parallel-size", "-dp", type=int, default=1,
                     help="replicas of the engine behind a cache-aware router")
    server = argument_group(p, "server")
    add_listen_args(server)
    server.add_argument("--served-model-name", default=None,
                        help="model id in the API (default: --model)")
    server.add_argument("--max-queue-len", type=int, default=1024,
                        help="waiting requests beyond which new ones get 503")
    server.add_argument("--max-request-bytes", type=int, default=1 << 20,
                        help="largest request body accepted; larger ones get 413")
    server.add_argument("--shutdown-timeout", type=float, default=30.0,
                        help="seconds SIGTERM waits for running requests before aborting them")
    server.add_argument("--tool-call-parser", default="hermes", choices=sorted(PARSERS),
                        help="how tool calls are read from output under tool_choice auto: hermes "
                             "(<tool_call> blocks; Qwen2.5, and the prompt Tandem writes for chat "
                             "templates without tools) or llama3_json")
    server.add_argument("--log-stats-interval", type=float, default=10.0,
                        help="seconds between stats log lines while busy (0: none)")


def serve(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.data_parallel_size > 1:
        import sys

        from tandem.router.data_parallel import serve_data_parallel

        return serve_data_parallel(args, sys.argv[1:])
    if args.data_parallel_size < 1:
        raise ValueError("data_parallel_size: must be a positive integer")
    config = EngineConfig.from_args(args)
    if config.node_rank > 0:  # a compute-only node of a multi-node group: no HTTP here
        from tandem.distributed.worker import run_node

        return run_node(config)
    engine = AsyncEngine(config, log_stats_interval=args.log_stats_interval)
    state = ServerState(engine, args.served_model_name or args.model, list(args.api_key),
                        args.max_queue_len, args.tool_call_parser, args.dashboard_public)
    app = build_app(state, args.max_request_bytes)
    e = engine.engine
    logger.info("tandem listening on http://%s:%d model=%s dtype=%s device=%s "
                "kv_capacity_tokens=%d kv_cache_dtype=%s quantization=%s weight_bytes=%d",
                args.host, args.port, state.model_name, dtype_name(config.torch_dtype),
                config.torch_device, e.kv_capacity_tokens, dtype_name(e.runner.kv_dtype),
                e.config.quantization, e.runner.weight_bytes)
    server = EngineServer(uvicorn.Config(app, host=args.host, port=args.port,
                                         log_level="warning", access_log=False,
                                         timeout_graceful_shutdown=5),
                          state, args.shutdown_timeout)
    server.run()
    engine.shutdown()
    return server.exit_code

