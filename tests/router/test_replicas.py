"""Replica membership, probe thresholds and the /kv/events follower, against httpx mock
transports (no processes: the end-to-end tests use real servers)."""
import asyncio

import httpx
import pytest

from tandem.router.replicas import ProbeConfig, ReplicaSet


def run(coro):
    return asyncio.run(coro)


class Backend:
    """A fake replica: /ready status and a /kv/events reply, both settable."""

    def __init__(self):
        self.ready, self.kv = 200, None
        self.calls: list[httpx.Request] = []

    def handler(self, request: httpx.Request) -> httpx.Response:
        self.calls.append(request)
        if request.url.path == "/ready":
            return httpx.Response(self.ready, json={})
        if request.url.path == "/kv/events" and self.kv is not None:
            return httpx.Response(200, json=self.kv(request))
        return httpx.Response(404, json={})


def probe(rs, backend, r, times=1):
    async def go():
        async with httpx.AsyncClient(transport=httpx.MockTransport(backend.handler)) as c:
            for _ in range(times):
                await rs.probe_once(c, r)
    run(go())


def test_probe_thresholds_mark_down_and_up():
    rs = ReplicaSet(probe=ProbeConfig(unhealthy_after=2, healthy_after=3))
    r, b = rs.add("http://a:1"), Backend()
    b.ready = 503
    probe(rs, b, r)
    assert r.healthy  # one failure is not enough
    probe(rs, b, r)
    assert not r.healthy and rs.available() == []
    b.ready = 200
    probe(rs, b, r, times=2)
    assert not r.healthy
    probe(rs, b, r)
    assert r.healthy and rs.available() == [r]


def test_connection_errors_count_as_failures():
    rs = ReplicaSet(probe=ProbeConfig(unhealthy_after=1))
    r = rs.add("http://a:1")

    def refuse(request):
        raise httpx.ConnectError("refused")

    async def go():
        async with httpx.AsyncClient(transport=httpx.MockTransport(refuse)) as c:
            await rs.probe_once(c, r)
    run(go())
    assert not r.healthy


def test_kv_events_feed_the_index_and_a_restart_resnapshots():
    rs = ReplicaSet()
    r, b = rs.add("http://a:1/"), Backend()
    assert r.url == "http://a:1"
    h1, h2, h3 = "11" * 32, "22" * 32, "33" * 32
    b.kv = lambda req: {"instance": "i1", "seq": 2, "block_size": 16, "snapshot": [h1, h2]}
    probe(rs, b, r)
    assert r.block_size == 16 and r.kv_seq == 2
    keys = [bytes.fromhex(h) for h in (h1, h2, h3)]
    assert rs.engine_index.match(keys, [r.id]) == {r.id: 2}
    b.kv = lambda req: {"instance": "i1", "seq": 4, "block_size": 16, "events": [
        {"seq": 3, "type": "stored", "hash": h3}, {"seq": 4, "type": "removed", "hash": h1}]}
    probe(rs, b, r)
    kv_calls = [c for c in b.calls if c.url.path == "/kv/events"]
    assert kv_calls[-1].url.params["since"] == "2"
    assert rs.engine_index.match(keys, [r.id]) == {r.id: 0} and rs.engine_index.size(r.id) == 2
    # The replica restarted: a new instance, events relative to a seq we never saw.
    b.kv = lambda req: ({"instance": "i2", "seq": 1, "block_size": 16, "events": []}
                        if "since" in req.url.params else
                        {"instance": "i2", "seq": 1, "block_size": 16, "snapshot": [h1]})
    probe(rs, b, r)
    assert r.kv_seq is None
    probe(rs, b, r)
    assert r.kv_instance == "i2" and rs.engine_index.match(keys, [r.id]) == {r.id: 1}


def test_non_tandem_replicas_keep_no_kv_state():
    rs = ReplicaSet()
    r, b = rs.add("http://a:1"), Backend()
    probe(rs, b, r)
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


def test_the_replicas_own_queue_counts_as_load():
    rs = ReplicaSet()
    r = rs.add("http://a:1")
    rs.avg_work = 100

    def handler(request):
        if request.url.path == "/metrics":
            return httpx.Response(200, text='# TYPE x gauge\ntandem:num_requests_waiting'
                                             '{model_name="m"} 3.0\n')
        return httpx.Response(200, json={})

    async def go():
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as c:
            await rs.probe_once(c, r)
    run(go())
    assert r.load.waiting_tokens == 300
