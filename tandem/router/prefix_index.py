"""Which replica holds which prefix blocks, bounded in memory, LRU per replica.

Two kinds of block keys fill it:
  - Tandem replicas: the engine's own block hashes, from its `/kv/events` stream (exact);
  - other replicas: chained hashes of fixed-size chunks of the request text, recorded when the
    router sends a request there (approximate: what the replica probably still caches).
A request is matched by walking its chain of keys: a replica's hit is the number of leading
blocks it holds (a chain breaks at the first miss, as a KV cache prefix does).
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict

TEXT_BLOCK_CHARS = 64  # ~16 tokens of English, one engine block


def text_blocks(text: str, chars: int = TEXT_BLOCK_CHARS) -> list[bytes]:
    """Chained keys of the text's full chunks: key i covers text[:(i + 1) * chars]."""
    keys, parent = [], b""
    data = text.encode("utf-8", "surrogatepass")
    step = chars  # bytes, so multi-byte text never splits differently between calls
    for i in range(len(data) // step):
        parent = hashlib.blake2b(parent + data[i * step:(i + 1) * step], digest_size=16).digest()
        keys.append(parent)
    return keys


class PrefixIndex:
    def __init__(self, max_blocks_per_replica: int = 100_000):
        if max_blocks_per_replica < 1:
            raise ValueError("max_blocks_per_replica: must be positive")
        self.max_blocks = max_blocks_per_replica
        self._held: dict[str, OrderedDict[bytes, None]] = {}

    def insert(self, replica: str, keys: list[bytes]) -> None:
        held = self._held.setdefault(replica, OrderedDict())
        for k in keys:
            held[k] = None
            held.move_to_end(k)
        while len(held) > self.max_blocks:
            held.popitem(last=False)  # least recently used first

    def remove(self, replica: str, keys: list[bytes]) -> None:
        held = self._held.get(replica)
        if held is not None:
            for k in keys:
                held.pop(k, None)

    def replace(self, replica: str, keys: list[bytes]) -> None:
        """A snapshot: exactly these blocks, nothing else."""
        self._held[replica] = OrderedDict()
        self.insert(replica, keys)

    def drop(self, replica: str) -> None:
        """A removed replica's entries go at once."""
        self._held.pop(replica, None)

    def size(self, replica: str) -> int:
        return len(self._held.get(replica, ()))

    def match(self, keys: list[bytes], replicas: list[str]) -> dict[str, int]:
        """Leading blocks of `keys` each replica holds; hits refresh their LRU position."""
        out = {}
        for r in replicas:
            held, n = self._held.get(r), 0
            if held:
                for k in keys:
                    if k not in held:
                        break
                    n += 1
                for k in keys[:n]:
                    held.move_to_end(k)
            out[r] = n
        return out
