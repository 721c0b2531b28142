"""`tandem serve --data-parallel-size N`: N engine replicas on free loopback ports, and the
router in front of them on --host/--port. For a model that fits one device but traffic that
does not. The replicas are this process's children: restarted when they die (supervisor.py),
and stopped with it."""
from __future__ import annotations

import argparse
import os
import sys

from tandem.procs import free_port, wait_until_ready
from tandem.router.supervisor import Supervisor


def replica_argv(argv: list[str], port: int) -> list[str]:
    """The serve command line for one replica: same engine flags, its own loopback port."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in ("--data-parallel-size", "-dp", "--host", "--port"):
            skip = True
            continue
        if a.startswith(("--data-parallel-size=", "--host=", "--port=")):
            continue
        out.append(a)
    return [*out, "--host", "127.0.0.1", "--port", str(port)]


def replica_env(replicas: int) -> dict[str, str]:
    """The replicas' environment: this machine's cores split between them, unless
    OMP_NUM_THREADS is set. OpenMP's default is a thread per core in every process: with 2
    replicas on 2 cores and a stream on each, ITL p50 was 51.6 ms against 10.2 ms with a thread
    each (benchmarks/dp_threads.py, BENCHMARKS.md)."""
    env = dict(os.environ)
    if not env.get("OMP_NUM_THREADS"):
        env["OMP_NUM_THREADS"] = str(max(1, len(os.sched_getaffinity(0)) // replicas))
    return env


def serve_data_parallel(args: argparse.Namespace, argv: list[str]) -> int:
    from tandem.router.launch import add_router_args, route

    ports = [free_port() for _ in range(args.data_parallel_size)]
    urls = [f"http://127.0.0.1:{p}" for p in ports]
    replicas = Supervisor([[sys.executable, "-m", "tandem.cli", *replica_argv(argv, p)]
                           for p in ports], urls, replica_env(len(ports)))
    try:
        for url, proc in zip(urls, replicas.procs):  # they load in parallel: 600 s each is plenty
            try:
                if not wait_until_ready(url, proc, timeout=600):
                    print(f"error: replica {url} exited with {proc.returncode}", file=sys.stderr)
                    return 1
            except TimeoutError as e:
                print(f"error: {e}", file=sys.stderr)
                return 1
        # `tandem route`'s own parser gives every router flag its default; serve's flags
        # then set the ones they share.
        parser = argparse.ArgumentParser()
        add_router_args(parser)
        router_args = parser.parse_args(["--worker-urls", *urls])
        vars(router_args).update(
            tokenizer=args.model, host=args.host, port=args.port, api_key=list(args.api_key),
            dashboard_public=args.dashboard_public, max_concurrent_requests=1024,
            max_queue=args.max_queue_len, shutdown_timeout=args.shutdown_timeout)
        return route(router_args, supervisor=replicas)
    finally:
        replicas.stop(args.shutdown_timeout + 10)
