"""`tandem route --worker-dns NAME:PORT`: the replicas are the A records of a name.

In Kubernetes the name is a headless Service's (`tandem-engine-headless.NS.svc.cluster.local`):
it resolves to the IPs of the ready pods behind it. Every `interval` seconds the name is resolved
again; each new address becomes a replica (`ReplicaSet.add`, as `POST /workers` does) and each
address that left is drained (`ReplicaSet.remove`, as `DELETE /workers/{id}`: no new requests,
forgotten once its in-flight ones finish).

A failed or empty resolution keeps the current replicas (and logs a warning): a DNS blip must
never drop them all. So a scale to zero leaves the last replicas listed; the probes mark them down.
Only replicas this discovery added are drained: those from `--worker-urls` or `POST /workers`
stay. DNS is the source of truth for its own: one removed by `DELETE /workers/{id}` while its
address still resolves comes back at the next round (scale the Deployment instead).
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import socket
from collections.abc import Awaitable, Callable

from tandem.router.replicas import ReplicaSet

logger = logging.getLogger("tandem.router")

Resolver = Callable[[str], Awaitable[set[str]]]  # name -> its IPv4 addresses


async def resolve_a(name: str) -> set[str]:
    """The name's IPv4 addresses, through the system resolver (getaddrinfo in a thread)."""
    infos = await asyncio.get_running_loop().getaddrinfo(
        name, None, family=socket.AF_INET, type=socket.SOCK_STREAM)
    return {info[4][0] for info in infos}


def dns_target(value: str) -> tuple[str, int]:
    """`NAME:PORT` (argparse type of --worker-dns)."""
    name, _, port = value.rpartition(":")
    if not name or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"give NAME:PORT, e.g. "
                                         f"tandem-engine-headless.default.svc.cluster.local:8000, "
                                         f"got {value!r}")
    return name, int(port)


class DnsDiscovery:
    def __init__(self, name: str, port: int, interval: float = 5.0,
                 resolve: Resolver = resolve_a, timeout: float = 5.0):
        self.name, self.port, self.interval = name, port, interval
        self.resolve, self.timeout = resolve, timeout
        self.owned: dict[str, str] = {}  # url -> replica id, for the replicas added here

    def url(self, address: str) -> str:
        return f"http://{address}:{self.port}"

    async def sync(self, replicas: ReplicaSet) -> None:
        """One round: resolve, add the new addresses, drain the ones that left."""
        try:
            addresses = await asyncio.wait_for(self.resolve(self.name), self.timeout)
        except Exception as e:  # noqa: BLE001 - gaierror, a timeout, a broken resolver: keep
            addresses, why = set(), f"{type(e).__name__}: {e}"
        else:
            why = "no addresses"
        if not addresses:
            logger.warning("--worker-dns %s: %s; keeping the %d replicas it gave before",
                           self.name, why, len(self.owned))
            return
        # Ours that left the set otherwise (DELETE /workers, or drained and gone) are forgotten.
        self.owned = {u: i for u, i in self.owned.items()
                      if i in replicas.replicas and not replicas.replicas[i].draining}
        wanted = {self.url(a) for a in addresses}
        others = {r.url for r in replicas.replicas.values()
                  if r.id not in self.owned.values() and not r.draining}
        for url in sorted(wanted - self.owned.keys() - others):
            self.owned[url] = replicas.add(url).id
            logger.info("--worker-dns %s: added replica %s", self.name, url)
        for url in sorted(self.owned.keys() - wanted):
            replicas.remove(self.owned.pop(url))
            logger.info("--worker-dns %s: draining replica %s", self.name, url)

    async def run(self, replicas: ReplicaSet) -> None:
        while True:
            await self.sync(replicas)
            await asyncio.sleep(self.interval)


def discovery_from_args(args: argparse.Namespace) -> DnsDiscovery | None:
    """`tandem route`'s discovery, if any; at least one way to find replicas is required."""
    target = args.worker_dns
    if not args.worker_urls and target is None:
        raise ValueError("worker_urls: give the replicas with --worker-urls URL [URL ...], "
                         "--worker-dns NAME:PORT, or both")
    if target is None:
        return None
    interval = args.worker_dns_interval
    if not interval > 0:
        raise ValueError(f"worker_dns_interval: must be positive, got {interval!r}")
    return DnsDiscovery(*target, interval=interval)
