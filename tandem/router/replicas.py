"""The replicas behind the router: membership, health, load, and what their caches hold.

Health has two inputs: active probes (GET the ready path every `interval`; `unhealthy_after`
consecutive failures mark a replica down, `healthy_after` successes bring it back) and the
circuit breaker that real requests feed. A replica takes new requests when it is up, not
draining, and its breaker allows. For Tandem replicas each probe round also follows
`/kv/events`, so cache-aware routing sees the engine's real blocks.
"""
from __future__ import annotations

import asyncio
import json
import logging
import re
import sys
import uuid
from dataclasses import dataclass, field

from tandem.dashboard.views import parse_metrics
from tandem.engine.stats import Histogram
from tandem.router.breaker import CircuitBreaker
from tandem.router.policies import ReplicaLoad
from tandem.router.prefix_index import PrefixIndex
from tandem.router.upstream import Pool

logger = logging.getLogger("tandem.router")
_QUEUE = re.compile(r"^(?:tandem|vllm):num_requests_(running|waiting)(?:\{[^}]*\})? "
                    r"([0-9.eE+]+)$", re.MULTILINE)
_PREFIX = re.compile(r"^(?:tandem|vllm):prefix_cache_(hits|queries)_total(?:\{[^}]*\})? "
                     r"([0-9.eE+]+)$", re.MULTILINE)


STORE = "shared-store"  # the store's entry in store_index: one for all replicas


@dataclass
class ProbeConfig:
    path: str = "/ready"
    interval: float = 1.0
    timeout: float = 1.0
    unhealthy_after: int = 2
    healthy_after: int = 2


@dataclass
class Replica:
    url: str
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    breaker: CircuitBreaker = field(default_factory=CircuitBreaker)
    healthy: bool = True
    draining: bool = False
    load: ReplicaLoad = None  # type: ignore[assignment]
    fails: int = 0
    oks: int = 0
    block_size: int | None = None  # set once /kv/events answers: a Tandem replica
    kv_instance: str | None = None
    kv_seq: int | None = None
    requests_total: int = 0
    metrics: dict[str, float] = field(default_factory=dict)  # its tandem: samples, last scrape
    retries_total: int = 0
    latency: Histogram = field(default_factory=Histogram)  # until the last byte, per request
    prompt_tokens: int = 0  # routed here, and how many of them the router expected cached
    expected_hit_tokens: int = 0
    cache_counters: dict[str, float] = field(default_factory=dict)  # the replica's own

    @property
    def hit_rate(self) -> float | None:
        """The replica's prefix-cache hit rate in tokens: its own counters when it exports
        them (Tandem, vLLM), else what the router expected when it routed here."""
        c = self.cache_counters
        if c.get("queries"):
            return c["hits"] / c["queries"]
        return self.expected_hit_tokens / self.prompt_tokens if self.prompt_tokens else None

    def __post_init__(self) -> None:
        self.url = self.url.rstrip("/")
        if self.load is None:
            self.load = ReplicaLoad(self.id)

    @property
    def available(self) -> bool:
        return self.healthy and not self.draining and self.breaker.state != "open"


def _held_open() -> CircuitBreaker:
    """The breaker of a replica the probes found down. Requests alone never trip it when
    nothing is sent there (an idle replica, or one the policy skips because it is down), so
    /workers would show a dead replica's breaker closed. Open until the probes find the
    replica up, which gives it a fresh breaker: its own timeout never runs out."""
    breaker = CircuitBreaker(failure_threshold=1, open_seconds=sys.float_info.max)
    breaker.record_failure()
    return breaker


class ReplicaSet:
    def __init__(self, index: PrefixIndex | None = None, probe: ProbeConfig | None = None):
        self.replicas: dict[str, Replica] = {}
        self.index = index or PrefixIndex()  # text keys the router recorded (any replica)
        self.engine_index = PrefixIndex()  # Tandem replicas' own block hashes, from events
        # Blocks any replica wrote to a shared KV store: every replica can load them.
        self.store_index = PrefixIndex()
        self.probe = probe or ProbeConfig()
        self.avg_work = 256.0  # tokens per request, a running mean the proxy keeps

    def add(self, url: str) -> Replica:
        if not re.match(r"^https?://[^/\s]+", url):
            raise ValueError(f"url: not an http(s) URL: {url!r}")
        r = Replica(url)
        self.replicas[r.id] = r
        return r

    def remove(self, replica_id: str) -> Replica:
        """Stop sending it work now; forget it (and its cache entries) once idle."""
        r = self.replicas.get(replica_id)
        if r is None:
            raise KeyError(replica_id)
        r.draining = True
        if r.load.inflight_requests == 0:
            self._forget(r)
        return r

    def finished(self, r: Replica) -> None:
        """A request through `r` ended: a draining replica leaves when its last one does."""
        if r.draining and r.load.inflight_requests == 0:
            self._forget(r)

    def _forget(self, r: Replica) -> None:
        self.replicas.pop(r.id, None)
        self.index.drop(r.id)
        self.engine_index.drop(r.id)

    def available(self) -> list[Replica]:
        return [r for r in self.replicas.values() if r.available]

    async def probe_once(self, client: Pool, r: Replica) -> None:
        p = self.probe
        got = await client.get_text(r.url + p.path, p.timeout)
        if got is not None and got[0] == 200:
            r.fails, r.oks = 0, r.oks + 1
            if not r.healthy and r.oks >= p.healthy_after:
                r.healthy = True
                r.breaker = CircuitBreaker()  # it answers again: no stale open state
                logger.info("replica %s (%s) is up", r.id, r.url)
            await self._follow_kv(client, r)
            await self._scrape_queue(client, r)
        else:
            r.oks, r.fails = 0, r.fails + 1
            if r.healthy and r.fails >= p.unhealthy_after:
                r.healthy = False
                r.breaker = _held_open()
                logger.warning("replica %s (%s) is down", r.id, r.url)

    async def _follow_kv(self, client: Pool, r: Replica) -> None:
        """Apply the replica's block events (a snapshot when new, behind, or restarted)."""
        params = {} if r.kv_seq is None else {"since": str(r.kv_seq)}
        got = await client.get_text(r.url + "/kv/events", self.probe.timeout, params)
        try:
            body = json.loads(got[1]) if got is not None and got[0] == 200 else None
        except ValueError:
            body = None
        if not isinstance(body, dict) or "instance" not in body:
            return  # not a Tandem replica: the router's text index stands in
        if body["instance"] != r.kv_instance and "snapshot" not in body:
            r.kv_seq = None  # restarted: ask again for a snapshot next round
            return
        r.kv_instance, r.kv_seq, r.block_size = body["instance"], body["seq"], body["block_size"]
        if "snapshot" in body:
            self.engine_index.replace(r.id, [bytes.fromhex(h) for h in body["snapshot"]])
            self.store_index.insert(STORE, [bytes.fromhex(h) for h in body.get("shared", ())])
            return
        for e in body["events"]:
            key = [bytes.fromhex(e["hash"])]
            if e["type"] == "shared":
                self.store_index.insert(STORE, key)
            else:
                idx = self.engine_index
                (idx.insert if e["type"] == "stored" else idx.remove)(r.id, key)

    async def _scrape_queue(self, client: Pool, r: Replica) -> None:
        """Work at the replica that did not come through this router (its running + waiting
        requests, Tandem's or vLLM's metric, beyond ours), in tokens, and its hit counters."""
        got = await client.get_text(r.url + "/metrics", self.probe.timeout)
        if got is None or got[0] != 200:
            return
        r.cache_counters = {kind: float(v) for kind, v in _PREFIX.findall(got[1])}
        r.metrics = parse_metrics(got[1])
        queue = {kind: float(v) for kind, v in _QUEUE.findall(got[1])}
        if queue:
            # The router's own in-flight requests are already in inflight_tokens: count only
            # the ones others sent there (other routers, direct clients).
            others = sum(queue.values()) - r.load.inflight_requests
            r.load.waiting_tokens = int(max(0.0, others) * self.avg_work)

    async def probe_forever(self, client: Pool) -> None:
        while True:
            await asyncio.gather(*(self.probe_once(client, r)
                                   for r in list(self.replicas.values())))
            await asyncio.sleep(self.probe.interval)
