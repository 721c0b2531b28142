"""`tandem route --worker-dns NAME:PORT`: replicas follow a name's A records. A resolver stub
reads the addresses from a file the tests rewrite between rounds; one test goes through the
real resolver (getaddrinfo on "localhost") and a real `tandem route` process."""
import asyncio
import os
import subprocess
import sys
import threading
import time

import httpx
import pytest
from aiohttp import web
from starlette.testclient import TestClient
from test_app import BODY, replica

from tandem.cli import build_parser, main
from tandem.procs import free_port, stop_process, wait_until_ready
from tandem.router.app import build_router_app, make_state
from tandem.router.discovery import DnsDiscovery, resolve_a
from tandem.router.replicas import ReplicaSet

from fake_replicas import FakeReplicas  # isort: skip


def file_resolver(path):
    """The stub: the file's lines are the name's addresses; no file is a failed lookup."""
    async def resolve(name: str) -> set[str]:
        # In a thread, as getaddrinfo; FileNotFoundError is an OSError, as gaierror is.
        text = await asyncio.to_thread(path.read_text)
        return {line.strip() for line in text.splitlines() if line.strip()}
    return resolve


def write(path, *addresses: str) -> None:
    path.write_text("".join(f"{a}\n" for a in addresses))


def urls(rs: ReplicaSet, available: bool = False) -> set[str]:
    return {r.url for r in (rs.available() if available else rs.replicas.values())}


def test_replicas_follow_the_records_and_leave_by_draining(tmp_path):
    path = tmp_path / "records"
    rs = ReplicaSet()
    static = rs.add("http://10.0.0.9:8000")  # from --worker-urls: DNS never drains it
    d = DnsDiscovery("engine", 8000, resolve=file_resolver(path))
    write(path, "10.0.0.1", "10.0.0.2", "10.0.0.9")
    asyncio.run(d.sync(rs))
    assert urls(rs) == {"http://10.0.0.1:8000", "http://10.0.0.2:8000", "http://10.0.0.9:8000"}
    assert len(rs.replicas) == 3  # the address --worker-urls already had is not doubled

    busy = next(r for r in rs.replicas.values() if r.url == "http://10.0.0.2:8000")
    busy.load.inflight_requests = 1
    write(path, "10.0.0.1", "10.0.0.3")
    asyncio.run(d.sync(rs))
    assert urls(rs, available=True) == {"http://10.0.0.1:8000", "http://10.0.0.3:8000",
                                        static.url}
    assert busy.draining and busy.id in rs.replicas  # until its request finishes
    busy.load.inflight_requests = 0
    rs.finished(busy)
    assert urls(rs) == {"http://10.0.0.1:8000", "http://10.0.0.3:8000", static.url}


@pytest.mark.parametrize("blip", ["no file", "empty", "hangs", "raises"])
def test_a_failed_resolution_keeps_every_replica(tmp_path, blip, caplog):
    path = tmp_path / "records"
    rs = ReplicaSet()
    write(path, "10.0.0.1", "10.0.0.2")
    d = DnsDiscovery("engine", 8000, resolve=file_resolver(path), timeout=0.2)
    asyncio.run(d.sync(rs))
    before = dict(rs.replicas)
    if blip == "no file":
        path.unlink()
    elif blip == "empty":
        write(path)
    else:
        async def broken(name):
            if blip == "hangs":
                await asyncio.sleep(10)
            raise RuntimeError("resolver bug")
        d.resolve = broken
    asyncio.run(d.sync(rs))
    assert rs.replicas == before and not any(r.draining for r in rs.replicas.values())
    assert "--worker-dns engine" in caplog.text and "keeping the 2 replicas" in caplog.text
    d.resolve = file_resolver(path)
    write(path, "10.0.0.2")  # resolving again: changes apply again
    asyncio.run(d.sync(rs))
    assert urls(rs, available=True) == {"http://10.0.0.2:8000"}


def test_a_deleted_replica_comes_back_while_its_address_resolves(tmp_path):
    path = tmp_path / "records"
    rs = ReplicaSet()
    write(path, "10.0.0.1")
    d = DnsDiscovery("engine", 8000, resolve=file_resolver(path))
    asyncio.run(d.sync(rs))
    rs.remove(next(iter(rs.replicas)))  # DELETE /workers/{id}
    assert not rs.replicas
    asyncio.run(d.sync(rs))
    assert urls(rs, available=True) == {"http://10.0.0.1:8000"}


def slow_or_fast():
    """A replica that answers at once, or after 1.5 s when the prompt is "slow"."""
    fast = replica()

    async def handle(request: web.Request) -> web.Response:
        if request.method == "POST" and (await request.json())["prompt"] == "slow":
            await asyncio.sleep(1.5)
        return await fast(request)
    return handle


def wait_for(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_the_router_adds_and_drains_replicas_as_the_records_change(tmp_path):
    """Real fake replicas on three loopback addresses, one port; the router in process."""
    path = tmp_path / "records"
    port = free_port()
    listen = {n: (f"127.0.0.{i}", port) for i, n in enumerate("abc", start=2)}
    with FakeReplicas({n: slow_or_fast() for n in "abc"}, listen) as fake:
        state = make_state([], "round_robin")
        state.discovery = DnsDiscovery("engine", port, interval=0.05, resolve=file_resolver(path))
        write(path, "127.0.0.2", "127.0.0.3")
        with TestClient(build_router_app(state)) as c:
            def members() -> dict[str, bool]:
                return {w["url"]: w["draining"] for w in c.get("/workers").json()["workers"]}

            wait_for(lambda: len(members()) == 2)
            for _ in range(4):
                assert c.post("/v1/completions", json=BODY).status_code == 200
            assert set(fake.seen) == {"a", "b"}

            got = {}
            slow = threading.Thread(target=lambda: got.update(
                r=c.post("/v1/completions", json={**BODY, "prompt": "slow"})))
            slow.start()
            wait_for(lambda: len(fake.seen) == 5)
            busy = fake.seen[-1]
            stays = "b" if busy == "a" else "a"
            write(path, listen[stays][0], "127.0.0.4")  # the busy one leaves, c arrives
            wait_for(lambda: members().get(fake.urls["c"]) is False)
            assert members()[fake.urls[busy]] is True  # draining while its request runs
            fake.seen.clear()
            for _ in range(4):
                assert c.post("/v1/completions", json=BODY).status_code == 200
            assert set(fake.seen) == {stays, "c"}
            slow.join(10)
            assert got["r"].status_code == 200, got["r"].text
            wait_for(lambda: set(members()) == {fake.urls[stays], fake.urls["c"]})


def test_resolve_a_uses_the_system_resolver():
    assert asyncio.run(resolve_a("localhost")) == {"127.0.0.1"}
    with pytest.raises(OSError):
        asyncio.run(resolve_a("no-such-name.invalid"))


def test_route_needs_worker_urls_or_worker_dns(capsys):
    assert main(["route"]) == 2
    assert "--worker-urls" in capsys.readouterr().err
    for bad in ("engine", "engine:", "engine:http", ":8000", "engine:70000"):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["route", "--worker-dns", bad])
    args = build_parser().parse_args(["route", "--worker-dns", "engine.ns.svc:8000"])
    assert args.worker_dns == ("engine.ns.svc", 8000) and args.worker_urls == []


def test_a_route_process_finds_its_replica_through_localhost():
    """The real resolver, end to end: `--worker-dns localhost:PORT` reaches 127.0.0.1:PORT."""
    with FakeReplicas({"a": replica()}) as fake:
        replica_port = int(fake.urls["a"].rsplit(":", 1)[1])
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        proc = subprocess.Popen([sys.executable, "-m", "tandem.cli", "route", "--worker-dns",
                                 f"localhost:{replica_port}", "--port", str(port)],
                                env={**os.environ, "HF_HUB_OFFLINE": "1"})
        try:
            assert wait_until_ready(url, proc, timeout=60)
            workers = httpx.get(f"{url}/workers", timeout=5).json()["workers"]
            assert [w["url"] for w in workers] == [fake.urls["a"]]
            r = httpx.post(f"{url}/v1/completions", json=BODY, timeout=10)
            assert r.status_code == 200 and fake.seen == ["a"]
        finally:
            stop_process(proc)
