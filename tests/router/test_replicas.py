"""Replica membership, probe thresholds and the /kv/events follower, against real fake
replicas (aiohttp servers on 127.0.0.1; no engine: the end-to-end tests use real servers)."""
import asyncio
from contextlib import contextmanager

import pytest
from aiohttp import web

from tandem.router.replicas import STORE, ProbeConfig, ReplicaSet
from tandem.router.upstream import Pool

from fake_replicas import FakeReplicas  # isort: skip


class Backend:
    """A fake replica: /ready status, a /kv/events reply and /metrics text, all settable."""

    def __init__(self):
        self.ready, self.kv, self.metrics = 200, None, None

    def handler(self, request: web.Request) -> web.Response:
        if request.path == "/ready":
            return web.json_response({}, status=self.ready)
        if request.path == "/kv/events" and self.kv is not None:
            return web.json_response(self.kv(request))
        if request.path == "/metrics" and self.metrics is not None:
            return web.Response(text=self.metrics)
        return web.json_response({}, status=404)


@contextmanager
def replica(rs: ReplicaSet, handler=None):
    """A replica in `rs` served by a Backend (or nothing listening, handler=False)."""
    b = Backend()
    with FakeReplicas({"a": None if handler is False else (handler or b.handler)}) as fake:
        yield rs.add(fake.urls["a"] + "/"), b, fake


def probe(rs, r, times=1):
    async def go():
        client = Pool()
        try:
            for _ in range(times):
                await rs.probe_once(client, r)
        finally:
            await client.close()
    asyncio.run(go())


def test_probe_thresholds_mark_down_and_up():
    rs = ReplicaSet(probe=ProbeConfig(unhealthy_after=2, healthy_after=3))
    with replica(rs) as (r, b, _):
        b.ready = 503
        probe(rs, r)
        assert r.healthy  # one failure is not enough
        probe(rs, r)
        assert not r.healthy and rs.available() == []
        b.ready = 200
        probe(rs, r, times=2)
        assert not r.healthy
        probe(rs, r)
        assert r.healthy and rs.available() == [r]


def test_connection_errors_count_as_failures():
    rs = ReplicaSet(probe=ProbeConfig(unhealthy_after=1))
    with replica(rs, handler=False) as (r, _, _):
        probe(rs, r)
        assert not r.healthy


def test_kv_events_feed_the_index_and_a_restart_resnapshots():
    rs = ReplicaSet()
    with replica(rs) as (r, b, fake):
        assert not r.url.endswith("/")
        kv_events_follow(rs, r, b, fake)


def kv_events_follow(rs, r, b, fake):
    h1, h2, h3 = "11" * 32, "22" * 32, "33" * 32
    b.kv = lambda req: {"instance": "i1", "seq": 2, "block_size": 16, "snapshot": [h1, h2]}
    probe(rs, r)
    assert r.block_size == 16 and r.kv_seq == 2
    keys = [bytes.fromhex(h) for h in (h1, h2, h3)]
    assert rs.engine_index.match(keys, [r.id]) == {r.id: 2}
    b.kv = lambda req: {"instance": "i1", "seq": 4, "block_size": 16, "events": [
        {"seq": 3, "type": "stored", "hash": h3}, {"seq": 4, "type": "removed", "hash": h1}]}
    probe(rs, r)
    kv_calls = [q for _, path, q in fake.requests if path == "/kv/events"]
    assert kv_calls[-1]["since"] == "2"
    assert rs.engine_index.match(keys, [r.id]) == {r.id: 0} and rs.engine_index.size(r.id) == 2
    # The replica restarted: a new instance, events relative to a seq we never saw.
    b.kv = lambda req: ({"instance": "i2", "seq": 1, "block_size": 16, "events": []}
                        if "since" in req.query else
                        {"instance": "i2", "seq": 1, "block_size": 16, "snapshot": [h1]})
    probe(rs, r)
    assert r.kv_seq is None
    probe(rs, r)
    assert r.kv_instance == "i2" and rs.engine_index.match(keys, [r.id]) == {r.id: 1}


def test_non_tandem_replicas_keep_no_kv_state():
    rs = ReplicaSet()
    with replica(rs) as (r, _, _):
        probe(rs, r)
        assert r.healthy and r.block_size is None and r.kv_seq is None


def test_remove_drains_then_forgets_and_purges_the_index():
    rs = ReplicaSet()
    a, b = rs.add("http://a:1"), rs.add("http://b:1")
    rs.index.insert(a.id, [b"k" * 16])
    a.load.inflight_requests = 1
    rs.remove(a.id)
    assert a.draining and a.id in rs.replicas and rs.available() == [b]
    a.load.inflight_requests = 0
    rs.finished(a)
    assert a.id not in rs.replicas and rs.index.size(a.id) == 0
    rs.remove(b.id)  # idle: gone at once
    assert rs.replicas == {}
    with pytest.raises(KeyError):
        rs.remove("nope")
    with pytest.raises(ValueError, match="^url: "):
        rs.add("ftp://x")


def test_requests_others_sent_to_the_replica_count_as_load():
    rs = ReplicaSet()
    rs.avg_work = 100
    with replica(rs) as (r, b, _):
        r.prompt_tokens, r.expected_hit_tokens = 100, 10
        assert r.hit_rate == 0.1  # the router's own expectation, until the replica says
        r.load.inflight_requests = 2  # ours: running or waiting there already
        b.metrics = ('# TYPE x gauge\ntandem:num_requests_waiting{model_name="m"} 3.0\n'
                     'tandem:num_requests_running{model_name="m"} 2.0\n'
                     'tandem:prefix_cache_queries_total{model_name="m"} 200.0\n'
                     'tandem:prefix_cache_hits_total{model_name="m"} 150.0\n')
        probe(rs, r)
        assert r.load.waiting_tokens == 300 and r.hit_rate == 0.75


def test_shared_store_events_feed_one_index_for_every_replica():
    rs = ReplicaSet()
    h1, h2 = "44" * 32, "55" * 32
    keys = [bytes.fromhex(h) for h in (h1, h2)]
    with replica(rs) as (r, b, _):
        b.kv = lambda req: {"instance": "i1", "seq": 1, "block_size": 16, "snapshot": [],
                            "shared": [h1]}
        probe(rs, r)
        assert rs.store_index.match(keys, [STORE]) == {STORE: 1}
        b.kv = lambda req: {"instance": "i1", "seq": 2, "block_size": 16, "events": [
            {"seq": 2, "type": "shared", "hash": h2}]}
        probe(rs, r)
        assert rs.store_index.match(keys, [STORE]) == {STORE: 2}
        # a block written to the store is not in the replica's own cache
        assert rs.engine_index.match(keys, [r.id]) == {r.id: 0}
