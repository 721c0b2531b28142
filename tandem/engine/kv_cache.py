"""Paged KV block pool: ref counts, hash-chained full blocks, LRU of free cached blocks.

Only block ids live here; the KV tensors belong to the model runner.
"""
from __future__ import annotations

import hashlib
import sys
from array import array
from collections import OrderedDict
from collections.abc import Callable, Collection

from tandem.engine.kv_events import KVEventLog
from tandem.engine.request import Request

_DOMAIN = b"tandem/kv-block/v1\0"
# Named in /kv/events so a follower can tell whether it computes the same hashes.
HASH_SCHEME = "sha256:tandem/kv-block/v1"
_ROOT = bytes(32)


def hash_block(parent: bytes | None, token_ids: list[int], salt: str | None = None) -> bytes:
    """Chained, domain-separated SHA-256 of one full block, reproducible across processes."""
    h = hashlib.sha256(_DOMAIN)
    h.update(parent or _ROOT)
    salt_bytes = (salt or "").encode()
    h.update(len(salt_bytes).to_bytes(4, "little") + salt_bytes)
    ids = array("q", token_ids)
    if sys.byteorder == "big":  # little-endian everywhere, so a router on any host agrees
        ids.byteswap()
    h.update(ids.tobytes())
    return h.digest()


def cdiv(a: int, b: int) -> int:
    return -(a // -b)


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[bytes | None] = [None] * num_blocks
        # Free blocks in eviction order: uncached ones first, then cached ones least recently used.
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.cached: dict[bytes, int] = {}
        self.num_cached_blocks: dict[str, int] = {}
        self.events = KVEventLog()
        # The tiers below (kv_store/tiers.py): told of each cached block the pool is about to
        # reuse, and of each block a step fills (write-through), when they are on.
        self.on_evict: Callable[[int, bytes], None] | None = None
        self.newly_cached: list[tuple[int, bytes]] | None = None

    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    @property
    def usage(self) -> float:
        return 1.0 - len(self.free) / self.num_blocks

    def update_hashes(self, req: Request) -> None:
        """Extend the request's hash chain over every full block of its known tokens."""
        bs, hashes = self.block_size, req.block_hashes
        for i in range(len(hashes), req.num_tokens // bs):
            parent = hashes[-1] if hashes else None
            hashes.append(hash_block(parent, req.all_token_ids[i * bs:(i + 1) * bs],
                                     req.cache_salt if i == 0 else None))

    def get_computed_blocks(self, req: Request) -> list[int]:
        """Cached blocks of the longest prefix hit; the last prompt token is always recomputed."""
        if not self.enable_caching:
            return []
        self.update_hashes(req)
        blocks = []
        for h in req.block_hashes[:(req.num_tokens - 1) // self.block_size]:
            block_id = self.cached.get(h)
            if block_id is None:
                break
            blocks.append(block_id)
        return blocks

    def allocate_slots(self, req: Request, num_new_tokens: int,
                       computed_blocks: list[int] = ()) -> bool:
        """Give `req` blocks for `num_new_tokens` more tokens after its computed ones."""
        num_hit = len(computed_blocks) * self.block_size
        total = req.num_computed_tokens + num_hit + num_new_tokens
        num_new_blocks = cdiv(total, self.block_size) - len(req.block_table) - len(computed_blocks)
        revived = sum(1 for b in computed_blocks if self.ref_counts[b] == 0)
        if max(num_new_blocks, 0) + revived > len(self.free):
            return False
        for b in computed_blocks:
            if self.ref_counts[b] == 0:
                del self.free[b]
            self.ref_counts[b] += 1
        req.block_table.extend(computed_blocks)
        for _ in range(num_new_blocks):
            req.block_table.append(self._pop_free())
        if computed_blocks:  # only a fresh request gets hits, so its table was empty
            self.num_cached_blocks[req.request_id] = len(computed_blocks)
        self._cache_full_blocks(req, total)
        return True

    def _pop_free(self, keep: Collection[int] = ()) -> int:
        if keep:
            block_id = next(b for b in self.free if b not in keep)
            del self.free[block_id]
        else:
            block_id, _ = self.free.popitem(last=False)
        h = self.block_hash[block_id]
        if h is not None:
            if self.cached.get(h) == block_id:
                if self.on_evict is not None:
                    self.on_evict(block_id, h)
                del self.cached[h]
                self.events.removed(h)
            self.block_hash[block_id] = None
        self.ref_counts[block_id] = 1
        return block_id

    def _cache_full_blocks(self, req: Request, num_tokens: int) -> None:
        # Registered at schedule time: the step that computes the block runs before any reader.
        if not self.enable_caching:
            return
        # Proposed tokens a step verifies are not the request's yet: only its own are named.
        num_full = min(num_tokens, req.num_tokens) // self.block_size
        start = self.num_cached_blocks.get(req.request_id, 0)
        if num_full <= start:
            return
        self.update_hashes(req)
        for i in range(start, num_full):
            block_id, h = req.block_table[i], req.block_hashes[i]
            # A twin computed by another request stays unnamed: it is freed as plain space.
            if h not in self.cached:
                self.cached[h] = block_id
                self.block_hash[block_id] = h
                self.events.stored(h)
                if self.newly_cached is not None:
                    self.newly_cached.append((block_id, h))
        self.num_cached_blocks[req.request_id] = num_full

    def install(self, block_hash: bytes, keep: Collection[int] = ()) -> tuple[int, bool]:
        """A pool block named `block_hash`, for K/V loaded from a tier below: (block id, True)
        for a free block now cached under that name, whose K/V the caller must write, or the
        block already cached under it and False. Blocks in `keep` are not taken; the caller
        checked that another free block exists."""
        block_id = self.cached.get(block_hash)
        if block_id is not None:
            return block_id, False
        block_id = self._pop_free(keep)
        self.ref_counts[block_id] = 0
        self.free[block_id] = None  # most recently used: the request that wants it comes next
        self.cached[block_hash] = block_id
        self.block_hash[block_id] = block_hash
        self.events.stored(block_hash)
        return block_id, True

    def trim(self, req: Request, num_tokens: int) -> None:
        """Give back the blocks past the first `num_tokens` tokens (slots of rejected proposed
        tokens; never named, so they go first in line for reuse)."""
        keep = cdiv(num_tokens, self.block_size)
        while len(req.block_table) > keep:
            self._release(req.block_table.pop())

    def free_request(self, req: Request) -> None:
        # Reverse order: a prompt's tail blocks are the least likely to be shared, so evict them first.
        for block_id in reversed(req.block_table):
            self._release(block_id)
        req.block_table = []
        self.num_cached_blocks.pop(req.request_id, None)

    def _release(self, block_id: int) -> None:
        """One reference fewer; a block nobody holds is free, an unnamed one first in line."""
        self.ref_counts[block_id] -= 1
        if self.ref_counts[block_id] == 0:
            self.free[block_id] = None
            if self.block_hash[block_id] is None:
                self.free.move_to_end(block_id, last=False)
