"""The KV tiers under tensor parallelism, with real gloo process groups (rank 0 is this test
process, ranks 1 and 2 are worker processes; one TP engine at a time): each rank keeps its own heads of a block in its
own host pool and under its own store keys. What the workers do is only visible through the
output: a rank that failed to evict, store, load or copy its share of a block would attend over
another prompt's K/V, and the tokens would differ from an engine that computed everything."""
from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager

import kv_store_helpers as kh
import pytest

from tandem import LLM

TP = 3  # SmolLM2's 3 KV heads: one per rank
RANK_BLOCK = kh.BLOCK_BYTES // TP


@pytest.fixture(scope="module")
def file_url(tmp_path_factory) -> str:
    return f"file://{tmp_path_factory.mktemp('kv-store-tp')}"


PROMPTS = {"shared": kh.prompt(1000), "partial": kh.prompt(2000), "host": kh.prompt(3000),
           "other": kh.prompt(4000)}


@pytest.fixture(scope="module")
def answers(smollm2_dir) -> dict[str, list[int]]:
    """What a TP=1 engine with no tiers generates. Built first and shut down: one process holds
    one process group, and while a TP engine lives every engine in it would join its collectives."""
    llm = tp_engine(smollm2_dir, 1, 100)
    try:
        return {name: kh.generate(llm, ids)[0] for name, ids in PROMPTS.items()}
    finally:
        llm.shutdown()


def tp_engine(model: str, tp: int, blocks: int, **kw) -> LLM:
    return LLM(model=model, dtype="float32", quantization="none", tensor_parallel_size=tp,
               kv_cache_memory=blocks * kh.BLOCK_BYTES // tp, **kw)


@contextmanager
def running(llm: LLM) -> Iterator[LLM]:
    try:
        yield llm
    finally:
        llm.shutdown()


def rank_files(llm: LLM, block_hash: bytes) -> list:
    """The store file of each rank's share of one block."""
    tiers = llm.engine.tiers
    return [tiers.store._path(dataclasses.replace(tiers.layout, tp_rank=r).key(block_hash))
            for r in range(TP)]


def write_through(writer: LLM, ids: list[int]) -> list[bytes]:
    """The prompt's block hashes, once every rank has written its share of them."""
    kh.drain(writer)  # rank 0's own writes
    hashes = kh.chain(ids)[:kh.LONG_BLOCKS]
    kh.wait_until(lambda: all(p.exists() for h in hashes for p in rank_files(writer, h)),
               "every rank's store writes")
    return hashes


def test_every_rank_shares_its_heads_through_the_store(answers, smollm2_dir, file_url):
    with running(tp_engine(smollm2_dir, TP, 100, kv_store=file_url,
                           kv_store_write_through=True)) as writer:
        assert writer.engine.tiers.layout.tp_size == TP
        for name in ("shared", "partial"):
            got, cached = kh.generate(writer, PROMPTS[name])
            assert got == answers[name] and cached == 0
            hashes = write_through(writer, PROMPTS[name])
        # One value per rank and block, each a third of a block, under keys that differ by rank.
        files = [p for h in hashes for p in rank_files(writer, h)]
        assert len(set(files)) == TP * kh.LONG_BLOCKS
        assert all(RANK_BLOCK < p.stat().st_size < RANK_BLOCK + 1024 for p in files)
        rank_files(writer, hashes[5])[2].unlink()  # rank 2's share of one "partial" block

    with running(tp_engine(smollm2_dir, TP, 100, kv_store=file_url,
                           kv_store_timeout=10)) as reader:
        before = kh.Snapshot(reader)
        got, cached = kh.generate(reader, PROMPTS["shared"])
        assert got == answers["shared"]
        assert cached == kh.LONG_BLOCKS * kh.BLOCK
        assert before.delta("hits")["store"] == kh.LONG_BLOCKS

        # Rank 0 finds the whole chain, rank 2 the 5 blocks before the one it lacks: every rank
        # installs those 5 and computes the rest.
        before = kh.Snapshot(reader)
        got, cached = kh.generate(reader, PROMPTS["partial"])
        assert got == answers["partial"]
        assert before.delta("hits")["store"] == kh.LONG_BLOCKS
        assert cached == 5 * kh.BLOCK
        kh.assert_no_leak(reader)


def test_every_rank_brings_back_evicted_blocks_from_host_memory(answers, smollm2_dir):
    with running(tp_engine(smollm2_dir, TP, 25, kv_host_memory=200 * RANK_BLOCK)) as llm:
        kv, tiers = llm.engine.kv, llm.engine.tiers
        assert kv.num_blocks == 25 and tiers.host.num_blocks == 200
        p = PROMPTS["host"]
        got, cached = kh.generate(llm, p)
        assert got == answers["host"] and cached == 0
        in_pool = kh.evict_to_host(llm, p, PROMPTS["other"])

        before = kh.Snapshot(llm)
        got, cached = kh.generate(llm, p)
        assert got == answers["host"]
        assert before.delta("hits")["host"] == kh.LONG_BLOCKS - in_pool
        assert cached == kh.LONG_BLOCKS * kh.BLOCK
        kh.assert_no_leak(llm)


def test_a_tp1_engine_does_not_read_tp3_shares(answers, smollm2_dir, file_url):
    # Runs after the store test, whose writer stored "shared" as three shares per block.
    with running(tp_engine(smollm2_dir, 1, 100, kv_store=file_url,
                           kv_store_timeout=10)) as one:
        before = kh.Snapshot(one)
        got, cached = kh.generate(one, PROMPTS["shared"])
        assert got == answers["shared"] and cached == 0
        assert before.delta("hits")["store"] == 0 and before.delta("misses")["store"] == 1
        assert not +before.delta("dropped")  # another layout's keys: a miss, not a bad value
