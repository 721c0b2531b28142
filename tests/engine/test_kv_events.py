"""The prefix cache's event stream: a follower that applies the events it is given always ends
up with exactly the set of hashes the cache holds, also after it falls behind the log."""
import random
import threading
from unittest.mock import ANY

from hypothesis import given, settings
from hypothesis import strategies as st

from tandem.engine.kv_cache import KVCacheManager
from tandem.engine.kv_events import KVEventLog
from tandem.engine.request import Request
from tandem.engine.sampling_params import SamplingParams


def follow(log: KVEventLog, state: dict) -> None:
    """Apply what `since` returns, as a router would."""
    reply = log.since(state.get("seq"))
    if reply["instance"] != state.get("instance"):
        reply = log.since(None)
        state["instance"] = reply["instance"]
    if "snapshot" in reply:
        state["blocks"] = set(reply["snapshot"])
    else:
        assert [e["seq"] for e in reply["events"]] == list(range(state["seq"] + 1,
                                                                 reply["seq"] + 1))
        for e in reply["events"]:
            (state["blocks"].add if e["type"] == "stored" else state["blocks"].discard)(e["hash"])
    state["seq"] = reply["seq"]


def cached_hashes(kv: KVCacheManager) -> set[str]:
    return {h.hex() for h in kv.cached}


def request(rid: str, ids: list[int]) -> Request:
    return Request(rid, ids, SamplingParams(max_tokens=4))


def test_stored_then_evicted_blocks_show_up_as_events():
    kv = KVCacheManager(num_blocks=4, block_size=4)
    a = request("a", list(range(1, 10)))  # two full blocks, one partial
    assert kv.allocate_slots(a, 9)
    reply = kv.events.since(None)
    assert reply["seq"] == 2 and sorted(reply["snapshot"]) == sorted(cached_hashes(kv))
    assert kv.events.since(1)["events"] == [
        {"seq": 2, "type": "stored", "hash": a.block_hashes[1].hex()}]
    kv.free_request(a)
    b = request("b", list(range(50, 66)))  # 4 new blocks: both cached ones get evicted
    assert kv.allocate_slots(b, 16)
    events = kv.events.since(2)["events"]
    assert {e["hash"] for e in events if e["type"] == "removed"} == {h.hex() for h in
                                                                     a.block_hashes}
    assert {e["hash"] for e in events if e["type"] == "stored"} == {h.hex() for h in
                                                                    b.block_hashes}


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), max_events=st.sampled_from([3, 16, 1000]),
       poll_every=st.integers(1, 6))
def test_a_follower_tracks_the_cache_exactly(seed, max_events, poll_every):
    rng = random.Random(seed)
    kv = KVCacheManager(num_blocks=12, block_size=2)
    kv.events = KVEventLog(max_events)
    state: dict = {}
    live: list[Request] = []
    for step in range(60):
        if live and rng.random() < 0.4:
            kv.free_request(live.pop(rng.randrange(len(live))))
        else:
            base = rng.choice([[1, 2, 3, 4], [5, 6, 7, 8], [1, 2, 9, 9]])
            req = request(f"r{step}", base + [rng.randrange(20) for _ in range(rng.randrange(6))])
            hit = kv.get_computed_blocks(req)
            if kv.allocate_slots(req, req.num_tokens - len(hit) * 2, hit):
                live.append(req)
        if step % poll_every == 0:
            follow(kv.events, state)
            assert state["blocks"] == cached_hashes(kv)
    follow(kv.events, state)
    assert state["blocks"] == cached_hashes(kv)


def test_a_new_instance_or_a_future_seq_gets_a_snapshot():
    log = KVEventLog()
    log.stored(b"\1" * 32)
    log.stored(b"\2" * 32)
    log.removed(b"\1" * 32)
    assert log.since(99)["snapshot"] == [(b"\2" * 32).hex()]  # a seq from another instance
    assert log.since(3) == {"instance": log.instance, "seq": 3, "events": []}
    assert log.since(None)["snapshot"] == log.since(99)["snapshot"]
    assert KVEventLog().since(0) == {"instance": ANY, "seq": 0, "events": []}
    assert KVEventLog().instance != log.instance


def test_readers_on_other_threads_see_consistent_replies():
    log = KVEventLog(max_events=50)
    stop = threading.Event()
    errors = []

    def reader():
        state: dict = {}
        while not stop.is_set():
            try:
                follow(log, state)
            except Exception as e:  # noqa: BLE001 - reported below
                errors.append(e)
                return

    t = threading.Thread(target=reader)
    t.start()
    for i in range(20000):
        h = (i % 300).to_bytes(32, "little")
        (log.stored if i % 3 else log.removed)(h)
    stop.set()
    t.join()
    assert not errors
