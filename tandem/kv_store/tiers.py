"""The tiers below the device pool, as the engine thread sees them.

Down: a cached block the pool evicts is copied to host memory; a block host memory evicts (or,
with no host tier, the pool itself) is written to the shared store, and with write-through every
block is written there as soon as the step that computes it has run. Up: before a waiting
request is admitted, the blocks of its prompt past the pool's own prefix hit are looked up in
host memory (copied in at once), then in the store: that load runs on a reader thread while the
request waits in the queue and other requests keep stepping. A missing or unusable block ends
the chain; the rest is computed as usual.

With tensor parallelism every rank keeps its own heads of each block in its own host pool and
under its own store keys; rank 0 decides and the workers repeat (KVTiers).

Store I/O never runs on the engine thread. Every store call is bounded by --kv-store-timeout;
failures trip a circuit breaker that skips the store for a while; and a request waits for a
load no longer than the timeout nor than recomputing those tokens would take, so a sick store
costs hit rate, not requests.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from tandem.config import dtype_name
from tandem.distributed.group import TPGroup
from tandem.distributed.parallel_state import tp_rank, tp_size
from tandem.engine.kv_cache import KVCacheManager, cdiv
from tandem.engine.request import Request
from tandem.engine.stats import Histogram
from tandem.kv_store.format import BadBlock, BlockLayout, decode, encode
from tandem.kv_store.host import HostPool
from tandem.kv_store.stores import KVStore, StoreError, open_store
from tandem.router.breaker import CLOSED, OPEN, CircuitBreaker

if TYPE_CHECKING:
    from tandem.config import EngineConfig
    from tandem.engine.model_runner import ModelRunner

logger = logging.getLogger("tandem.kv_store")

LOAD_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
# Blocks queued for the store are copies; past this many bytes a write is dropped, not queued,
# so a slow store cannot grow the process without bound.
MAX_PENDING_WRITE_BYTES = 256 * 1024**2
# Hashes known to be in the store, so a block is not written twice (bounded, oldest forgotten).
MAX_KNOWN_STORED = 1 << 20


class TierStats:
    """Counters by tier ("host", "store"), shared by the engine and the store threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.hits: Counter[str] = Counter()  # blocks found and loaded
        self.misses: Counter[str] = Counter()  # lookups that ended at a block the tier lacked
        self.loaded_bytes: Counter[str] = Counter()
        self.saved_bytes: Counter[str] = Counter()
        self.store_errors: Counter[str] = Counter()  # by operation: get, put
        self.dropped: Counter[str] = Counter()  # stored values refused, by reason
        self.writes_dropped = 0  # blocks not written: queue full or breaker open
        self.load_timeouts = 0  # loads a request stopped waiting for
        self.load_seconds = Histogram(LOAD_BUCKETS)

    def add(self, name: str, key: str, n: int = 1) -> None:
        with self._lock:
            getattr(self, name)[key] += n

    def bump(self, name: str) -> None:
        with self._lock:
            setattr(self, name, getattr(self, name) + 1)

    def observe_load(self, seconds: float) -> None:
        with self._lock:
            self.load_seconds.observe(seconds)


@dataclass
class _Load:
    load_id: int
    hashes: list[bytes]
    deadline: float


# Where copied-out blocks wait to be installed: host-memory hits, or store load number N >= 0.
HOST = -1
BlockData = tuple[torch.Tensor, torch.Tensor | None]


def _wire(x):
    """Tier operation arguments as JSON for the workers: block hashes become hex strings."""
    if isinstance(x, bytes):
        return x.hex()
    if isinstance(x, (list, tuple)):
        return [_wire(v) for v in x]
    return x


def _unwire(x):
    if isinstance(x, str):
        return bytes.fromhex(x)
    if isinstance(x, list):
        return [_unwire(v) for v in x]
    return x


class KVTiers:
    """Rank 0 decides (prepare, on_evict, on_computed); what touches K/V, host memory or the
    store is an operation (the op_ methods) that every tensor-parallel rank runs on its own
    heads, in the order rank 0 ran it: rank 0 records each for the workers, which repeat them
    before the next step. Each rank writes and reads its own store keys (the layout names the
    rank); a store load is used up to the shortest chain any rank found."""

    OPS = ("evict", "computed", "host_get", "copy", "fetch", "drop")

    def __init__(self, kv_cache: torch.Tensor, kv_scale: torch.Tensor | None,
                 layout: BlockLayout, host_blocks: int, store: KVStore | None,
                 timeout: float, write_through: bool,
                 on_shared: Callable[[bytes], None] | None = None, group: TPGroup | None = None):
        self.kv_cache, self.kv_scale, self.layout = kv_cache, kv_scale, layout
        self.on_shared = on_shared  # a block is in the store now (for the router's events)
        self.group = group or TPGroup()
        self.host = (HostPool(host_blocks, layout.kv_shape, kv_cache.dtype,
                              kv_scale.dtype if kv_scale is not None else None,
                              pin=kv_cache.is_cuda) if host_blocks else None)
        self.store, self.timeout, self.write_through = store, timeout, write_through
        self.stats = TierStats()
        self.block_bytes = (kv_cache[:, :, :, 0].numel() * kv_cache.element_size()
                            + (kv_scale[:, :, :, 0].numel() * kv_scale.element_size()
                               if kv_scale is not None else 0))
        self.loads: dict[str, _Load] = {}  # by request id (rank 0)
        self.fetches: dict[int, Future] = {}  # by load id (every rank)
        self.staged: dict[int, list[BlockData]] = {}  # HOST or load id -> blocks to install
        self._next_load = 0
        self.prefill_seconds_per_token: float | None = None
        self._lock = threading.Lock()  # breaker, known-stored set, pending bytes
        self.breaker = CircuitBreaker(failure_threshold=3, open_seconds=5.0, success_threshold=1)
        self._known_stored: OrderedDict[bytes, None] = OrderedDict()
        self._pending_bytes = 0
        self._reader = ThreadPoolExecutor(1, "tandem-kv-load") if store else None
        self._writer = ThreadPoolExecutor(1, "tandem-kv-save") if store else None

    def _op(self, name: str, *args):
        """Run a tier operation here, and have the other ranks run it too."""
        if self.group.size > 1:
            self.group.record_tier_op([name, *_wire(args)])
        return getattr(self, "op_" + name)(*args)

    def apply(self, ops: list[list]) -> None:
        """A worker: repeat the operations rank 0 ran, in order."""
        for name, *args in ops:
            if name not in self.OPS:
                raise ValueError(f"unknown KV tier operation {name!r}")
            getattr(self, "op_" + name)(*_unwire(args))

    # -- down the tiers --

    def _block(self, block_id: int) -> BlockData:
        scale = self.kv_scale[:, :, :, block_id] if self.kv_scale is not None else None
        return self.kv_cache[:, :, :, block_id], scale

    def on_evict(self, block_id: int, block_hash: bytes) -> None:
        """The pool is about to reuse a cached block: keep its K/V in the tier below."""
        self._op("evict", block_id, block_hash)

    def op_evict(self, block_id: int, block_hash: bytes) -> None:
        kv, scale = self._block(block_id)
        if self.host is not None:
            evicted = self.host.put(block_hash, kv, scale)
            self.stats.add("saved_bytes", "host", self.block_bytes)
            if evicted is not None and self.store is not None:
                self._save(*evicted)
        elif self.store is not None:
            self._save(block_hash, kv.clone(), scale.clone() if scale is not None else None)

    def on_computed(self, blocks: list[tuple[int, bytes]]) -> None:
        """Write-through: blocks a step just filled go to the store now (copied here, written
        by the store thread)."""
        if self.store is None or not self.write_through or not blocks:
            return
        self._op("computed", blocks)
        self.group.flush_tier_ops()  # other replicas should see every rank's share early

    def op_computed(self, blocks: list[tuple[int, bytes]]) -> None:
        with self._lock:
            todo = [(b, h) for b, h in blocks if h not in self._known_stored]
        if not todo:
            return
        ids = torch.tensor([b for b, _ in todo], device=self.kv_cache.device)
        # Block-major copies, each block contiguous: the store thread then copies nothing with
        # ATen (a parallel copy there would start a second OpenMP team; see AsyncEngine).
        kv = self.kv_cache.movedim(3, 0)[ids]
        scale = self.kv_scale.movedim(3, 0)[ids] if self.kv_scale is not None else None
        self._save_many([(h, kv[i], scale[i] if scale is not None else None)
                         for i, (_, h) in enumerate(todo)])

    def _save(self, block_hash: bytes, kv: torch.Tensor, scale: torch.Tensor | None) -> None:
        self._save_many([(block_hash, kv, scale)])

    def _save_many(self, blocks: list[tuple[bytes, torch.Tensor, torch.Tensor | None]]) -> None:
        """Queue blocks for the store thread, which writes them in one call."""
        todo = []
        with self._lock:
            for h, kv, scale in blocks:
                if h in self._known_stored:
                    continue
                if self._pending_bytes + self.block_bytes > MAX_PENDING_WRITE_BYTES:
                    self.stats.bump("writes_dropped")
                    continue
                self._pending_bytes += self.block_bytes
                self._remember(h)  # so the same block is not queued twice
                todo.append((h, kv.cpu(), scale.cpu() if scale is not None else None))
        if todo:
            self._writer.submit(self._write, todo)

    def _remember(self, block_hash: bytes) -> None:
        self._known_stored[block_hash] = None
        self._known_stored.move_to_end(block_hash)
        if len(self._known_stored) > MAX_KNOWN_STORED:
            self._known_stored.popitem(last=False)

    def _write(self, blocks: list[tuple[bytes, torch.Tensor, torch.Tensor | None]]) -> None:
        ok = False
        try:
            if not self._allow():
                for _ in blocks:
                    self.stats.bump("writes_dropped")
                return
            values = [encode(self.layout, h, kv, scale) for h, kv, scale in blocks]
            self.store.put_many([(self.layout.key(h), v) for (h, _, _), v in zip(blocks, values)])
            self._record(True)
            self.stats.add("saved_bytes", "store", sum(map(len, values)))
            ok = True
            if self.on_shared is not None:
                for h, _, _ in blocks:
                    self.on_shared(h)
        except StoreError as e:
            self._record(False, e)
            self.stats.add("store_errors", "put")
        except Exception:  # a bug here must cost these blocks, never the writer thread
            logger.exception("kv store: writing blocks failed")
        finally:
            with self._lock:
                self._pending_bytes -= len(blocks) * self.block_bytes
                if not ok:
                    for h, _, _ in blocks:
                        self._known_stored.pop(h, None)

    # -- up the tiers --

    def prepare(self, req: Request, kv: KVCacheManager) -> bool:
        """Before admitting `req`, bring what the tiers hold of its prompt, past the pool's
        prefix hit, into the pool as cached blocks. False while a store load is in flight: the
        request waits, and is asked about again on later steps."""
        load = self.loads.get(req.request_id)
        if load is not None:
            now = time.monotonic()
            done = self.fetches[load.load_id].done()
            if not done and now < load.deadline:
                return False
            if not done:
                self.stats.bump("load_timeouts")  # recompute; the late answer is dropped
            del self.loads[req.request_id]
            n = self.group.loaded_min(load.load_id, max(0.0, load.deadline - now),
                                      self.op_loaded(load.load_id, 0))
            self._install(req, kv, load.hashes[:n], load.load_id)
            self._op("drop", load.load_id)
            return True
        computed = kv.get_computed_blocks(req)
        hashes = req.block_hashes[len(computed):(req.num_tokens - 1) // kv.block_size]
        if not hashes:
            return True
        if self.host is not None:
            n = self._op("host_get", hashes)
            installed = self._install(req, kv, hashes[:n], HOST)
            self._op("drop", HOST)
            if installed < n:
                return True  # no room for more
            hashes = hashes[n:]
        if not hashes or self.store is None or req.kv_store_checked or not self._allow():
            return True
        req.kv_store_checked = True
        wait_for = self.timeout
        if self.prefill_seconds_per_token is not None:
            recompute = len(hashes) * kv.block_size * self.prefill_seconds_per_token
            wait_for = min(wait_for, recompute)
        load_id, self._next_load = self._next_load, self._next_load + 1
        self._op("fetch", load_id, hashes)
        self.group.flush_tier_ops()  # the other ranks start reading now
        self.loads[req.request_id] = _Load(load_id, hashes, time.monotonic() + wait_for)
        return False

    def op_host_get(self, hashes: list[bytes]) -> int:
        """Stage copies of the chain's longest prefix in host memory (copied out: installing
        evicts pool blocks into this same host pool); how many."""
        found = []
        for h in hashes:
            data = self.host.get(h)
            if data is None:
                self.stats.add("misses", "host")
                break
            found.append((data[0].clone(), data[1].clone() if data[1] is not None else None))
        self.stats.add("hits", "host", len(found))
        self.stats.add("loaded_bytes", "host", len(found) * self.block_bytes)
        self.staged[HOST] = found
        return len(found)

    def op_fetch(self, load_id: int, hashes: list[bytes]) -> None:
        self.fetches[load_id] = self._reader.submit(self._fetch, hashes)

    def op_loaded(self, load_id: int, wait_s: float) -> int:
        """Stage what store load `load_id` found, waiting up to `wait_s` for it; how many."""
        try:
            self.staged[load_id] = self.fetches[load_id].result(timeout=wait_s)
        except TimeoutError:
            self.staged[load_id] = []
        return len(self.staged[load_id])

    def op_copy(self, src: int, index: int, block_id: int) -> None:
        data, scale = self.staged[src][index]
        self.kv_cache[:, :, :, block_id] = data.to(self.kv_cache.device)
        if scale is not None:
            self.kv_scale[:, :, :, block_id] = scale.to(self.kv_scale.device)

    def op_drop(self, src: int) -> None:
        self.staged.pop(src, None)
        self.fetches.pop(src, None)  # a load still running: its answer is ignored

    def _install(self, req: Request, kv: KVCacheManager, hashes: list[bytes], src: int) -> int:
        """Name free pool blocks by the staged blocks' hashes and copy them in, leaving room
        for the request's own tail; how many were installed."""
        computed = kv.get_computed_blocks(req)
        keep = set(computed)
        tail = cdiv(req.num_tokens, kv.block_size) - len(computed) - len(hashes)
        room = kv.num_free_blocks - sum(kv.ref_counts[b] == 0 for b in computed) - max(tail, 0)
        n = 0
        for i, h in enumerate(hashes[:max(room, 0)]):
            block_id, fresh = kv.install(h, keep)  # may evict: an op that runs first
            if fresh:
                self._op("copy", src, i, block_id)
            keep.add(block_id)
            n += 1
        return n

    def _fetch(self, hashes: list[bytes]) -> list[BlockData]:
        """Reader thread: the chain's longest prefix the store holds, decoded and checked."""
        start = time.monotonic()
        try:
            values = self.store.get_many([self.layout.key(h) for h in hashes])
        except StoreError as e:
            self._record(False, e)
            self.stats.add("store_errors", "get")
            return []
        except Exception:
            logger.exception("kv store: reading blocks failed")
            return []
        self._record(True)
        out = []
        for h, value in zip(hashes, values):
            if value is None:
                self.stats.add("misses", "store")
                break
            try:
                out.append(decode(self.layout, h, value))
            except BadBlock as e:
                self.stats.add("dropped", e.reason)
                logger.warning("kv store: dropped block %s: %s", h.hex()[:16], e)
                break
            self.stats.add("loaded_bytes", "store", len(value))
        self.stats.add("hits", "store", len(out))
        with self._lock:
            for h in hashes[:len(out)]:
                self._remember(h)
        self.stats.observe_load(time.monotonic() - start)
        return out

    def forget(self, req: Request) -> None:
        """The request left the queue (aborted, finished): stop waiting for its load."""
        load = self.loads.pop(req.request_id, None)
        if load is not None:
            self._op("drop", load.load_id)

    def wait(self, timeout: float) -> None:
        """Block the engine thread up to `timeout` for a load to finish, when it has nothing
        else to step."""
        if self.loads:
            wait([self.fetches[load.load_id] for load in self.loads.values()], timeout,
                 FIRST_COMPLETED)

    def observe_step(self, num_tokens: int, seconds: float) -> None:
        """Prefill speed, from steps of many tokens: what a load must beat to be worth waiting
        for."""
        if num_tokens >= 64:
            rate = seconds / num_tokens
            prev = self.prefill_seconds_per_token
            self.prefill_seconds_per_token = rate if prev is None else 0.8 * prev + 0.2 * rate

    # -- the store's circuit breaker --

    @property
    def breaker_state(self) -> str:
        with self._lock:
            return self.breaker.state

    @property
    def breaker_code(self) -> int:
        with self._lock:
            return self.breaker.state_code

    def _allow(self) -> bool:
        with self._lock:
            return self.breaker.allow()

    def _record(self, ok: bool, error: Exception | None = None) -> None:
        with self._lock:
            before = self.breaker.state
            (self.breaker.record_success if ok else self.breaker.record_failure)()
            after = self.breaker.state
        if before != OPEN and after == OPEN:
            logger.warning("kv store %s: circuit breaker open after failures (last: %s); "
                           "skipping the store for %.0f s", self.store.url, error,
                           self.breaker.open_seconds)
        elif before != CLOSED and after == CLOSED:
            logger.warning("kv store %s: circuit breaker closed; using the store again",
                           self.store.url)

    def close(self) -> None:
        for pool in (self._reader, self._writer):
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)
        if self.store is not None:
            self.store.close()


def make_tiers(config: EngineConfig, runner: ModelRunner, model_id: str,
               on_shared: Callable[[bytes], None] | None = None) -> KVTiers | None:
    """The tiers `config` asks for, below `runner`'s pool (this rank's heads of it); None when
    it asks for none."""
    if not (config.kv_host_memory or config.kv_store):
        return None
    attn = runner.attn_layers[0]
    scale = runner.kv_scale
    layout = BlockLayout(model_id, len(runner.attn_layers), attn.num_kv_heads, attn.head_dim,
                         config.block_size, dtype_name(runner.kv_dtype),
                         dtype_name(scale.dtype) if scale is not None else None,
                         tp_size(), tp_rank())
    host_blocks = config.kv_host_memory // runner.bytes_per_block
    if config.kv_host_memory and not host_blocks:
        raise ValueError(f"kv_host_memory: {config.kv_host_memory} bytes hold no block of "
                         f"{runner.bytes_per_block} bytes")
    store = open_store(config.kv_store, config.kv_store_timeout) if config.kv_store else None
    return KVTiers(runner.kv_cache, scale, layout, host_blocks, store, config.kv_store_timeout,
                   config.kv_store_write_through, on_shared, runner.group)
