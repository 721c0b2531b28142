"""What the prefix cache holds, as a stream of block-hash events a router can follow.

The engine thread records a block hash when it becomes reusable (`stored`) and when it is
evicted (`removed`); readers on other threads ask for everything after the last sequence
number they saw. A reader that fell behind the bounded log, or that is new, gets a snapshot
of every cached hash instead. With a shared KV store, `shared` events name blocks this engine
wrote there, which any replica can load (a snapshot lists the most recent of them). `instance` changes when the process restarts, so a follower
knows to drop what it learnt from the previous one. docs/kv_cache.md describes the protocol.
"""
from __future__ import annotations

import threading
import uuid
from collections import OrderedDict, deque

MAX_SHARED = 65536  # shared hashes a snapshot lists; older ones the router has already seen


class KVEventLog:
    def __init__(self, max_events: int = 65536):
        self.instance = uuid.uuid4().hex
        self._lock = threading.Lock()
        self._events: deque[tuple[int, str, bytes]] = deque(maxlen=max_events)
        self._blocks: set[bytes] = set()
        self._shared: OrderedDict[bytes, None] = OrderedDict()
        self._seq = 0

    def stored(self, block_hash: bytes) -> None:
        self._record("stored", block_hash)

    def removed(self, block_hash: bytes) -> None:
        self._record("removed", block_hash)

    def shared(self, block_hash: bytes) -> None:
        """Written to the shared store (called from the store's writer thread)."""
        self._record("shared", block_hash)

    def _record(self, kind: str, block_hash: bytes) -> None:
        with self._lock:
            self._seq += 1
            self._events.append((self._seq, kind, block_hash))
            if kind == "stored":
                self._blocks.add(block_hash)
            elif kind == "removed":
                self._blocks.discard(block_hash)
            else:
                self._shared[block_hash] = None
                if len(self._shared) > MAX_SHARED:
                    self._shared.popitem(last=False)

    def since(self, seq: int | None) -> dict:
        """Events after `seq`; a snapshot instead for None, or a seq the log no longer (or
        never) reached."""
        with self._lock:
            oldest = self._events[0][0] if self._events else self._seq + 1
            head = {"instance": self.instance, "seq": self._seq}
            if seq is None or seq + 1 < oldest or seq > self._seq:
                return {**head, "snapshot": sorted(h.hex() for h in self._blocks),
                        "shared": [h.hex() for h in self._shared]}
            start = len(self._events) - (self._seq - seq)
            return {**head, "events": [{"seq": n, "type": kind, "hash": h.hex()}
                                       for n, kind, h in list(self._events)[start:]]}
