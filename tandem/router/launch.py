"""`tandem route`: the router under uvicorn; SIGTERM stops new work and drains what runs."""
from __future__ import annotations

import argparse
import gc
import logging

import uvicorn

from tandem.draining import DrainingServer
from tandem.router.app import build_router_app, make_state
from tandem.router.policies import POLICIES
from tandem.router.supervisor import Supervisor

logger = logging.getLogger("tandem.router")


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


def route(args: argparse.Namespace, supervisor: Supervisor | None = None) -> int:
    """Serve until SIGTERM and the drain; `supervisor` (serve -dp) restarts dead replicas
    meanwhile, but not once the router drains."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    state = make_state(args.worker_urls, args.policy, args.tokenizer,
                       api_keys=list(args.api_key),
                       max_concurrent=args.max_concurrent_requests, max_queue=args.max_queue,
                       queue_timeout=args.queue_timeout, request_timeout=args.request_timeout)
    logger.info("tandem router on http://%s:%d policy=%s replicas=%s", args.host, args.port,
                args.policy, " ".join(args.worker_urls))
    server = DrainingServer(uvicorn.Config(build_router_app(state), host=args.host,
                                           port=args.port, log_level="warning"),
                            state, args.shutdown_timeout)
    if supervisor is not None:
        supervisor.watch(lambda: state.draining)
    # What was imported so far (the CLI pulls in torch) lives as long as the process: keep it
    # out of the collector's full passes, which otherwise stall every request in flight.
    gc.collect()
    gc.freeze()
    server.run()
    return 0
