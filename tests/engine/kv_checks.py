"""Invariant checks shared by the block pool and scheduler tests."""
from tandem.engine.kv_cache import KVCacheManager
from tandem.engine.request import Request


def check_pool(kv: KVCacheManager, live: list[Request]) -> None:
    """The pool's invariants, given every request that may hold blocks."""
    for req in live:
        assert len(req.block_table) == len(set(req.block_table)), "a block twice in one table"
    for b in range(kv.num_blocks):
        holders = sum(b in req.block_table for req in live)
        assert kv.ref_counts[b] == holders, f"block {b}: ref {kv.ref_counts[b]} != {holders}"
    assert set(kv.free) == {b for b in range(kv.num_blocks) if kv.ref_counts[b] == 0}
    assert kv.num_free_blocks == len(set(kv.free))
    for h, b in kv.cached.items():
        assert kv.block_hash[b] == h, "a cached hash points at a block holding another hash"
    assert 0.0 <= kv.usage <= 1.0


class ShadowKV:
    """What the KV tensors would hold: the token id written at each slot."""

    def __init__(self, block_size: int):
        self.bs = block_size
        self.slots: dict[int, int] = {}

    def slot(self, req: Request, pos: int) -> int:
        return req.block_table[pos // self.bs] * self.bs + pos % self.bs

    def write(self, req: Request, start: int, n: int) -> None:
        for p in range(start, start + n):
            self.slots[self.slot(req, p)] = req.all_token_ids[p]

    def check(self, req: Request, upto: int) -> None:
        """Every token a request attends to sits in its block table at the right slot."""
        assert len(req.block_table) * self.bs >= upto, "too few blocks for the computed tokens"
        seen = [self.slots.get(self.slot(req, p)) for p in range(upto)]
        assert seen == req.all_token_ids[:upto], "a block holds another request's tokens"
