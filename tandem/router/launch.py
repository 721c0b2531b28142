"""`tandem route`: the router under uvicorn; SIGTERM stops new work and drains what runs."""
from __future__ import annotations

import argparse
import gc
import logging

import uvicorn

from tandem.draining import DrainingServer
from tandem.http_args import add_listen_args
from tandem.router.app import build_router_app, make_state
from tandem.router.discovery import discovery_from_args, dns_target
from tandem.router.policies import POLICIES
from tandem.router.supervisor import Supervisor

logger = logging.getLogger("tandem.router")


def add_router_args(p: argparse.ArgumentParser) -> None:
    """The router's flags, in the groups replicas (how it finds them), routing and server."""
    replicas = p.add_argument_group("replicas", "the replicas to route over")
    replicas.add_argument("--worker-urls", nargs="+", default=[],
                          help="replica base URLs, e.g. http://10.0.0.5:8000 (default: none; "
                               "give this, --worker-dns, or both)")
    replicas.add_argument("--worker-dns", type=dns_target, default=None, metavar="NAME:PORT",
                          help="replicas at every IPv4 address NAME resolves to (a headless "
                               "Service), re-resolved to add and drain them (default: none)")
    replicas.add_argument("--worker-dns-interval", type=float, default=5.0,
                          help="seconds between resolutions of --worker-dns")
    routing = p.add_argument_group("routing")
    routing.add_argument("--policy", default="cache_aware", choices=list(POLICIES),
                         help="how a request picks its replica: cache_aware (least prefill left "
                              "after its cached prefix, plus queued work), least_load, "
                              "power_of_two, round_robin, or session (sticky by X-Session-Id "
                              "or `user`)")
    routing.add_argument("--tokenizer", default=None,
                         help="the replicas' model (folder or alias): match Tandem replicas' real "
                              "KV blocks instead of text prefixes (default: none, text prefixes)")
    server = p.add_argument_group("server")
    add_listen_args(server)
    server.add_argument("--max-concurrent-requests", type=int, default=256,
                        help="requests in flight to the replicas at once; the rest queue")
    server.add_argument("--max-queue", type=int, default=1024,
                        help="requests waiting for a slot beyond which new ones get 429")
    server.add_argument("--queue-timeout", type=float, default=30.0,
                        help="seconds a request may wait for a slot before it gets 429")
    server.add_argument("--request-timeout", type=float, default=600.0,
                        help="seconds a request may take upstream, stream included")
    server.add_argument("--shutdown-timeout", type=float, default=30.0,
                        help="seconds SIGTERM waits for running requests to finish")


def route(args: argparse.Namespace, supervisor: Supervisor | None = None) -> int:
    """Serve until SIGTERM and the drain; `supervisor` (serve -dp) restarts dead replicas
    meanwhile, but not once the router drains."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    discovery = discovery_from_args(args)  # ValueError without --worker-urls or --worker-dns
    state = make_state(args.worker_urls, args.policy, args.tokenizer,
                       api_keys=list(args.api_key), dashboard_public=args.dashboard_public,
                       max_concurrent=args.max_concurrent_requests, max_queue=args.max_queue,
                       queue_timeout=args.queue_timeout, request_timeout=args.request_timeout)
    state.discovery = discovery
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
