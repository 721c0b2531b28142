"""AsyncEngine in one process: outputs match the offline engine, leaving early frees the KV
blocks, and a step loop that dies ends every request (running or still queued) with an error
instead of leaving its caller waiting forever."""
import asyncio
import contextlib
import threading
import time

import pytest

from tandem import LLM, SamplingParams
from tandem.config import EngineConfig
from tandem.engine.async_engine import AsyncEngine, EngineDeadError

PROMPTS = [[(5 * i + 3 * j) % 250 + 3 for j in range(12 + 4 * i)] for i in range(4)]
GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)


@pytest.fixture
def engine(tiny_dir):
    eng = AsyncEngine(EngineConfig(model=tiny_dir, dtype="float32", kv_cache_memory=2**20))
    yield eng
    eng.shutdown()


def wait_until(cond, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def idle(engine: AsyncEngine) -> bool:
    e = engine.engine
    return not e.has_unfinished_requests() and e.kv.num_free_blocks == e.kv.num_blocks


async def collect(engine: AsyncEngine, prompt, request_id: str) -> list[int]:
    outs = [out async for out in engine.generate(prompt, GREEDY, request_id)]
    assert outs[-1].finished and not any(o.finished for o in outs[:-1])
    return outs[-1].outputs[0].token_ids


def test_concurrent_generate_matches_offline(engine, tiny_dir):
    async def main():
        return await asyncio.gather(*(collect(engine, p, f"r{i}") for i, p in enumerate(PROMPTS)))

    got = asyncio.run(main())
    offline = LLM(model=tiny_dir, dtype="float32", kv_cache_memory=2**20)
    want = [o.outputs[0].token_ids for o in
            offline.generate([{"prompt_token_ids": p} for p in PROMPTS], GREEDY)]
    assert got == want
    wait_until(lambda: idle(engine))


def test_leaving_the_iterator_early_frees_the_blocks(engine):
    params = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True)

    async def main():
        async with contextlib.aclosing(engine.generate(PROMPTS[3], params, "early")) as outs:
            async for out in outs:
                if len(out.outputs[0].token_ids) >= 2:
                    break
        wait_until(lambda: idle(engine))

    asyncio.run(main())


def test_a_caller_whose_event_loop_closed_does_not_stop_the_engine(engine):
    """The iterator is dropped unclosed and its loop ends while the request still runs: the
    engine thread finds the loop closed when it sends the next output, aborts the request and
    keeps serving the other callers."""
    params = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True)

    async def abandon():
        async for _ in engine.generate(PROMPTS[0], params, "orphan"):
            return  # the generator's finally never runs: no abort is sent

    loop = asyncio.new_event_loop()
    loop.run_until_complete(abandon())
    loop.close()
    wait_until(lambda: idle(engine))
    assert engine.running
    assert asyncio.run(collect(engine, PROMPTS[0], "after")) != []


def test_abort_all_ends_every_request_with_its_reason(engine):
    params = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True)

    async def one(rid: str):
        with pytest.raises(EngineDeadError, match="shutting down"):
            async for out in engine.generate(PROMPTS[0], params, rid):
                if rid == "a0" and len(out.outputs[0].token_ids) >= 2:
                    engine.abort_all("shutting down")

    async def main():
        await asyncio.gather(*(one(f"a{i}") for i in range(3)))

    asyncio.run(main())
    wait_until(lambda: idle(engine))
    assert engine.running  # abort_all ends requests, not the loop


def test_bad_request_is_rejected_before_it_is_queued(engine):
    async def main():
        with pytest.raises(ValueError, match="^max_tokens: "):
            async for _ in engine.generate(PROMPTS[0], SamplingParams(max_tokens=10**6), "big"):
                pass

    asyncio.run(main())
    assert engine.num_waiting() == 0 and engine.running


def test_a_dying_step_loop_fails_running_and_queued_requests(engine, caplog):
    """Request A is inside step() when it raises; request B's add is still in the inbox then.
    Both callers get EngineDeadError, later ones are refused, and the failure is logged."""
    entered, release = threading.Event(), threading.Event()

    def broken_step():
        entered.set()
        release.wait(10)
        raise RuntimeError("device fell over")

    engine.engine.step = broken_step

    async def consume(rid: str) -> BaseException | None:
        try:
            async for _ in engine.generate(PROMPTS[0], GREEDY, rid):
                pass
        except EngineDeadError as e:
            return e
        return None

    async def main():
        a = asyncio.ensure_future(consume("A"))
        await asyncio.to_thread(entered.wait, 10)
        b = asyncio.ensure_future(consume("B"))
        await asyncio.sleep(0.1)  # B's add is queued behind the blocked step
        assert engine.num_waiting() == 2  # A never got scheduled; B is still in the inbox
        release.set()
        return await asyncio.wait_for(asyncio.gather(a, b), 10)

    with caplog.at_level("ERROR", logger="tandem.engine"):
        errors = asyncio.run(main())
    assert all(isinstance(e, EngineDeadError) and "device fell over" in str(e) for e in errors)
    assert not engine.running
    assert "engine step loop failed" in caplog.text

    async def after():
        async for _ in engine.generate(PROMPTS[0], GREEDY, "C"):
            pass

    with pytest.raises(EngineDeadError):
        asyncio.run(after())


def test_engine_is_built_on_the_thread_that_steps_it(tiny_dir, monkeypatch):
    """One OpenMP team: loading on the caller's thread and stepping on another halved the CPU
    step's speed (AsyncEngine's comment has the numbers)."""
    import tandem.engine.async_engine as mod

    built_on, stepped_on = [], []
    real_init, real_step = mod.LLMEngine.__init__, mod.LLMEngine.step

    def init(self, *a, **kw):
        built_on.append(threading.current_thread().name)
        real_init(self, *a, **kw)

    def step(self):
        stepped_on.append(threading.current_thread().name)
        return real_step(self)

    monkeypatch.setattr(mod.LLMEngine, "__init__", init)
    monkeypatch.setattr(mod.LLMEngine, "step", step)
    eng = AsyncEngine(EngineConfig(model=tiny_dir, dtype="float32", kv_cache_memory=2**20))
    try:
        asyncio.run(collect(eng, PROMPTS[0], "r"))
    finally:
        eng.shutdown()
    assert built_on == ["tandem-engine"] and set(stepped_on) == {"tandem-engine"}


def test_a_failed_build_raises_on_the_callers_thread(tiny_dir):
    before = set(threading.enumerate())
    with pytest.raises(ValueError, match="kv_cache_memory"):
        AsyncEngine(EngineConfig(model=tiny_dir, dtype="float32", kv_cache_memory=1))
    assert not [t for t in set(threading.enumerate()) - before if t.name == "tandem-engine"]
