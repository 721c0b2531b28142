"""One token budget per step: running requests first, then prefill chunks of waiting ones."""
from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from tandem.engine.kv_cache import KVCacheManager
from tandem.engine.request import Request, RequestStatus

if TYPE_CHECKING:
    from tandem.kv_store.tiers import KVTiers


@dataclass
class SchedulerOutput:
    requests: list[Request] = field(default_factory=list)
    num_tokens: list[int] = field(default_factory=list)  # tokens each request computes this step
    num_preempted: int = 0

    @property
    def empty(self) -> bool:
        return not self.requests


class Scheduler:
    def __init__(self, kv: KVCacheManager, max_num_batched_tokens: int, max_num_seqs: int,
                 max_model_len: int):
        self.kv = kv
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_num_seqs = max_num_seqs
        self.max_model_len = max_model_len
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0
        self.prefix_cache_queries = 0  # prompt tokens looked up at admission
        self.prefix_cache_hits = 0  # of those, tokens found cached
        self.tiers: KVTiers | None = None  # host memory and shared store, when configured
        # Speculation: proposals verified, their tokens, those accepted, and accepted by position.
        self.spec_drafts = 0
        self.spec_draft_tokens = 0
        self.spec_accepted_tokens = 0
        self.spec_accepted_by_position: list[int] = []
        self.on_finish: Callable[[Request], None] | None = None  # a draft model's pool frees it

    def add(self, req: Request) -> None:
        self.requests[req.request_id] = req
        self.waiting.append(req)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out, budget = SchedulerOutput(), self.max_num_batched_tokens
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            todo = req.num_tokens - req.num_computed_tokens
            # Proposed tokens ride along only with a decode, and only as far as the budget goes.
            req.spec_token_ids = req.spec_token_ids[:budget - 1] if todo == 1 else []
            n = min(todo + len(req.spec_token_ids), budget)
            while not self.kv.allocate_slots(req, n):
                if req.spec_token_ids:  # no room to verify: decode without them
                    req.spec_token_ids, n = [], todo
                    continue
                # Recompute preemption of the newest running request frees its blocks.
                victim = self.running.pop()
                self._preempt(victim)
                out.num_preempted += 1
                if victim is req:
                    break
            else:
                out.requests.append(req)
                out.num_tokens.append(n)
                budget -= n
                i += 1
                continue
            break
        # Admitting new work while evicting running work would only thrash. In order, except
        # that a request whose blocks are still loading from the KV store lets later ones pass.
        for req in list(self.waiting):
            if out.num_preempted or budget <= 0 or len(self.running) >= self.max_num_seqs:
                break
            # Prompt logprobs come from the logits of every prompt position: a prefix hit would
            # skip them (vLLM takes no hit either). Its blocks are still cached for others.
            reuse = self.kv.enable_caching and req.prompt_logprobs is None
            if reuse and self.tiers is not None and not self.tiers.prepare(req, self.kv):
                continue
            computed = self.kv.get_computed_blocks(req) if reuse else []
            num_hit = len(computed) * self.kv.block_size
            n = min(req.num_tokens - num_hit, budget)
            if not self.kv.allocate_slots(req, n, computed):
                break
            self.waiting.remove(req)
            req.num_computed_tokens = num_hit
            self.prefix_cache_queries += req.num_tokens
            self.prefix_cache_hits += num_hit
            if req.num_cached_tokens < 0:
                req.num_cached_tokens = num_hit
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            out.requests.append(req)
            out.num_tokens.append(n)
            budget -= n
        return out

    def _preempt(self, req: Request) -> None:
        self.kv.free_request(req)
        req.spec_token_ids = []
        req.status = RequestStatus.WAITING
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    def update(self, out: SchedulerOutput, sampled: dict[str, list[int]]) -> list[Request]:
        """Advance computed tokens, append sampled ones (with speculation, the accepted proposed
        tokens and one more); returns the requests that got tokens."""
        updated = []
        for req, n in zip(out.requests, out.num_tokens):
            req.num_computed_tokens += n
            tokens = sampled.get(req.request_id)
            spec, req.spec_token_ids = req.spec_token_ids, []
            if tokens is None:
                continue
            if spec:  # K/V of rejected proposals is stale: recomputed when reached again
                accepted = len(tokens) - 1
                req.num_computed_tokens -= len(spec) - accepted
                self._count_spec(len(spec), accepted)
            updated.append(req)
            for token in tokens:
                req.append_token(token)
                if req.check_stop(self.max_model_len):
                    self.finish(req, req.status)
                    break
            else:
                if spec:
                    self.kv.trim(req, req.num_tokens)
        return updated

    def _count_spec(self, proposed: int, accepted: int) -> None:
        self.spec_drafts += 1
        self.spec_draft_tokens += proposed
        self.spec_accepted_tokens += accepted
        by_pos = self.spec_accepted_by_position
        by_pos.extend([0] * (proposed - len(by_pos)))
        for i in range(accepted):
            by_pos[i] += 1

    def finish(self, req: Request, status: RequestStatus) -> None:
        if req.request_id not in self.requests:
            return
        req.status = status
        del self.requests[req.request_id]
        if req in self.running:
            self.running.remove(req)
        else:
            self.waiting.remove(req)
            if self.tiers is not None:
                self.tiers.forget(req)
        self.kv.free_request(req)
        if self.on_finish is not None:
            self.on_finish(req)

    def abort(self, request_id: str) -> bool:
        req = self.requests.get(request_id)
        if req is None:
            return False
        self.finish(req, RequestStatus.FINISHED_ABORTED)
        return True
