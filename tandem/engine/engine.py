"""LLMEngine: validate and add requests, then step(): schedule, run the model, emit outputs."""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

from transformers import AutoConfig

from tandem.config import EngineConfig
from tandem.distributed.group import TPGroup
from tandem.distributed.parallel_state import check_tp_size
from tandem.engine.detokenizer import IncrementalDetokenizer
from tandem.engine.kv_cache import KVCacheManager
from tandem.engine.model_runner import ModelRunner
from tandem.engine.outputs import CompletionOutput, Logprob, RequestOutput
from tandem.engine.request import Request, RequestStatus
from tandem.engine.sampling_params import SamplingParams
from tandem.engine.scheduler import Scheduler
from tandem.engine.stats import EngineStats
from tandem.kv_store.format import engine_model_id
from tandem.kv_store.tiers import make_tiers
from tandem.loader.model_path import resolve_model
from tandem.loader.tokenizer import check_text, eos_token_ids, load_tokenizer
from tandem.spec.adaptive import acceptance_rate, observe, proposal_length
from tandem.spec.cost import StepCosts
from tandem.spec.draft import DraftProposer
from tandem.spec.ngram import propose_ngram
from tandem.structured.grammar import GrammarCache


@dataclass
class _Child:
    req: Request
    detok: IncrementalDetokenizer
    logprobs: list[dict[int, Logprob]] | None
    cumulative_logprob: float = 0.0


@dataclass
class _Parent:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    children: list[_Child] = field(default_factory=list)
    # Built once the first child has every prompt position's entry (it alone collects them).
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None


class LLMEngine:
    def __init__(self, config: EngineConfig):
        self.config = config
        folder = resolve_model(config.model)
        self.hf_config = AutoConfig.from_pretrained(folder)
        self.max_model_len = _max_model_len(self.hf_config, config.max_model_len)
        self.tokenizer = load_tokenizer(folder)
        self.eos_token_ids = eos_token_ids(folder, self.hf_config, self.tokenizer)
        self.vocab_size = self.hf_config.vocab_size
        check_tp_size(self.hf_config, config.tensor_parallel_size)
        self.group = TPGroup(config)
        device = self.group.start(config) if config.tensor_parallel_size > 1 else None
        try:
            self.runner = ModelRunner(config, self.hf_config, folder, self.group, device)
        except BaseException:
            self.group.shutdown()
            raise
        self.group.start_keepalive()
        # "auto" as resolved, for logs and /metrics
        self.config = dataclasses.replace(config, quantization=self.runner.quantization)
        self.kv = KVCacheManager(self.runner.num_blocks, config.block_size,
                                 config.enable_prefix_caching)
        self.scheduler = Scheduler(self.kv, config.max_num_batched_tokens, config.max_num_seqs,
                                   self.max_model_len)
        self.tiers = make_tiers(config, self.runner,
                                engine_model_id(self.hf_config.to_dict(), self.runner.quantization),
                                self.kv.events.shared)
        if self.tiers is not None:
            self.kv.on_evict = self.tiers.on_evict
            self.kv.newly_cached = []
            self.scheduler.tiers = self.tiers
        spec = config.speculative_config
        self.drafter: DraftProposer | None = None
        # n-gram proposals are free to make, so their rows are the whole cost: verified only as
        # far as they pay (spec/cost.py). A draft model's passes are a cost of their own.
        self.spec_costs = StepCosts() if spec is not None and spec["method"] == "ngram" else None
        if spec is not None and spec["method"] == "draft_model":
            self.drafter = DraftProposer(config, self.vocab_size, self.tokenizer,
                                         self.runner.device, self.runner.num_blocks)
            self.scheduler.on_finish = self.drafter.forget
        self._grammars: GrammarCache | None = None  # built on the first structured request
        self.parents: dict[str, _Parent] = {}
        self.children: dict[str, tuple[_Parent, _Child]] = {}
        self.stats = EngineStats()

    @property
    def grammars(self) -> GrammarCache:
        if self._grammars is None:
            self._grammars = GrammarCache(self.tokenizer, self.vocab_size)
        return self._grammars

    def check_health(self) -> None:
        """Raise if a tensor-parallel rank died (noticed between steps by the keep-alive)."""
        if self.group.error is not None:
            raise self.group.error

    def shutdown(self) -> None:
        """Stop the tensor-parallel workers (nothing to do for one rank) and the KV tiers'
        store threads."""
        if self.tiers is not None:
            self.tiers.close()
        self.group.shutdown()

    @property
    def kv_capacity_tokens(self) -> int:
        return self.kv.num_blocks * self.kv.block_size

    def tokenize(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt: must not be empty")
            check_text(prompt, "prompt")
            return self.tokenizer.encode(prompt)
        ids = list(prompt)
        if not ids:
            raise ValueError("prompt: must not be empty")
        for t in ids:
            if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < self.vocab_size:
                raise ValueError(f"prompt: token id {t!r} is outside the vocabulary "
                                 f"(size {self.vocab_size})")
        return ids

    def add_request(self, request_id: str, prompt: str | list[int],
                    params: SamplingParams | None = None, cache_salt: str | None = None,
                    prompt_text: str | None = None) -> None:
        """Validate and queue a request; raises ValueError naming the bad field."""
        params = params or SamplingParams()
        if request_id in self.parents:
            raise ValueError(f"request_id: {request_id!r} is already in use")
        ids = self.check_request(prompt, params, cache_salt)
        parent = _Parent(request_id, prompt if isinstance(prompt, str) else prompt_text, ids)
        for i in range(params.n):  # build every child before registering any
            seed = None if params.seed is None else params.seed + i
            req = Request(f"{i}:{request_id}", ids, params, self.eos_token_ids, cache_salt, seed)
            if params.structured_outputs is not None:
                req.grammar = self.grammars.matcher(params.structured_outputs)
            if params.prompt_logprobs is not None and i == 0:
                req.prompt_logprobs = []
            detok = IncrementalDetokenizer(self.tokenizer, ids, params.stop_strings,
                                           params.skip_special_tokens)
            parent.children.append(_Child(req, detok, [] if params.logprobs is not None else None))
        for child in parent.children:
            self.children[child.req.request_id] = (parent, child)
            self.scheduler.add(child.req)
        self.parents[request_id] = parent

    def check_request(self, prompt: str | list[int], params: SamplingParams,
                      cache_salt: str | None = None) -> list[int]:
        """Everything about a request's content that add_request rejects; its token ids."""
        params.validate()
        params.check_vocab(self.vocab_size)
        if cache_salt is not None:
            check_text(cache_salt, "cache_salt")  # it is hashed into every block chain
        if params.structured_outputs is not None:
            # Compiled here, on the caller's thread (AsyncEngine validates there), and cached.
            self.grammars.grammar(params.structured_outputs)
        ids = self.tokenize(prompt)
        self.check_length(len(ids), params.max_tokens)
        return ids

    def check_length(self, num_prompt: int, max_tokens: int) -> None:
        limit = self.max_model_len
        if num_prompt + max_tokens > limit:
            raise ValueError(
                f"max_tokens: this model's maximum context length is {limit} tokens, but "
                f"{num_prompt + max_tokens} were requested ({num_prompt} in the prompt, "
                f"{max_tokens} for the completion)")
        if num_prompt + max_tokens > self.kv_capacity_tokens:
            # Worded as a context length too: to a client it is one, and its code is the same.
            raise ValueError(
                f"max_tokens: this server's context length is its KV cache capacity of "
                f"{self.kv_capacity_tokens} tokens, but "
                f"{num_prompt + max_tokens} were requested ({num_prompt} in the prompt, "
                f"{max_tokens} for the completion)")

    def abort_request(self, request_id: str) -> bool:
        parent = self.parents.pop(request_id, None)
        if parent is None:
            return False
        for child in parent.children:
            if self.scheduler.abort(child.req.request_id):
                self.stats.on_finish(child.req)
            del self.children[child.req.request_id]
        return True

    def has_unfinished_requests(self) -> bool:
        return bool(self.parents)

    def _propose(self) -> None:
        """Speculation: proposed next tokens for each running request about to decode, as many
        as its recent acceptance allows (spec/adaptive.py), never past its max_tokens or the
        context length; n-gram proposals only as far as their rows pay (spec/cost.py)."""
        spec = self.config.speculative_config
        wants, decodes = [], 0
        for req in self.scheduler.running:
            if req.num_tokens - req.num_computed_tokens != 1:
                continue
            decodes += 1
            room = min(req.params.max_tokens - req.num_output_tokens,
                       self.max_model_len - req.num_tokens) - 1
            k = min(proposal_length(req, spec["num_speculative_tokens"]), room)
            if k > 0:
                wants.append((req, k))
        if self.drafter is not None:
            proposals = self.drafter.propose(wants)
            for req, _ in wants:
                req.spec_token_ids = _grammatical(req, proposals.get(req.request_id, []))
            return
        extra = 0
        for req, k in wants:
            # Not for seeded requests: their proposals, which the rejection sampler's draws
            # follow, must not depend on how fast a step happened to run.
            if self.spec_costs is not None and req.generator is None:
                # First, so that a batch where no row pays skips the lookups too.
                k = self.spec_costs.worth(decodes, extra, k, acceptance_rate(req))
            drafts = propose_ngram(req.all_token_ids, k, spec["prompt_lookup_min"],
                                   spec["prompt_lookup_max"]) if k else []
            req.spec_token_ids = drafts = _grammatical(req, drafts)
            extra += len(drafts)

    def step(self) -> list[RequestOutput]:
        if self.config.speculative_config is not None:
            self._propose()
        sched = self.scheduler.schedule()
        if sched.empty:
            if self.tiers is not None:  # requests waiting for a load: nothing else to do
                self.tiers.wait(0.01)
            return []
        # Decode rows only (one-token decodes and verifications): a sample of t(rows).
        decode_only = self.spec_costs is not None and all(
            n == 1 + len(req.spec_token_ids) for req, n in zip(sched.requests, sched.num_tokens))
        start = time.monotonic()
        results = self.runner.execute(sched)
        elapsed = time.monotonic() - start
        if decode_only:
            self.spec_costs.observe(sum(sched.num_tokens), elapsed)
        if self.tiers is not None:
            self.tiers.observe_step(sum(sched.num_tokens), elapsed)
            computed, self.kv.newly_cached = self.kv.newly_cached, []
            self.tiers.on_computed(computed)
        before = {req.request_id: req.num_tokens for req, _, _ in results}
        proposed = {req.request_id: len(req.spec_token_ids) for req, _, _ in results}
        self.scheduler.update(sched, {req.request_id: tokens for req, tokens, _ in results})
        if self.config.speculative_config is not None:
            k = self.config.speculative_config["num_speculative_tokens"]
            for req, tokens, _ in results:
                if proposed[req.request_id]:
                    observe(req, k, len(tokens) - 1, proposed[req.request_id])
        touched: dict[str, _Parent] = {}
        for req, _, logprobs in results:
            parent, child = self.children[req.request_id]
            new = req.all_token_ids[before[req.request_id]:]  # a token-level stop ends them
            for j, token in enumerate(new):
                self.stats.on_token(req)
                if child.logprobs is not None:
                    child.logprobs.append(self._logprobs(token, logprobs[j]))
                    child.cumulative_logprob += logprobs[j][0]
                later = len(new) - 1 - j
                check = req.num_output_tokens - later >= req.params.min_tokens
                stop = child.detok.add(token, check_stop=check)
                if stop is not None:
                    req.stop_reason = stop
                    if later:  # speculation emitted tokens past the stop string
                        del req.all_token_ids[-later:]
                    if req.finished:  # also hit a length limit: the stop string explains it
                        req.status = RequestStatus.FINISHED_STOPPED
                    else:
                        self.scheduler.finish(req, RequestStatus.FINISHED_STOPPED)
                    break
            if req.finished:
                self.stats.on_finish(req)
            touched[parent.request_id] = parent
        outputs = [self._output(p) for p in touched.values() if self._prompt_logprobs_ready(p)]
        for out in outputs:
            if out.finished:
                for child in self.parents.pop(out.request_id).children:
                    del self.children[child.req.request_id]
        return outputs

    def _logprobs(self, token: int, lp) -> dict[int, Logprob]:
        chosen, rank, top_ids, top_lps = lp
        decode = self.tokenizer.decode
        d = {token: Logprob(chosen, rank, decode([token]))}
        for r, (t, v) in enumerate(zip(top_ids, top_lps), start=1):
            d.setdefault(t, Logprob(v, r, decode([t])))
        return d

    def _prompt_logprobs_ready(self, parent: _Parent) -> bool:
        """False while `parent` waits for prompt logprobs: its first child collects them, and
        another child could sample first. Outputs are cumulative, so one held back loses
        nothing. Once complete, they are built as entries in vLLM's shape (None first)."""
        raw, ids = parent.children[0].req.prompt_logprobs, parent.prompt_token_ids
        if raw is None or parent.prompt_logprobs is not None:
            return True
        if len(raw) < len(ids) - 1:
            return False
        parent.prompt_logprobs = [None] + [self._logprobs(token, lp)
                                           for token, lp in zip(ids[1:], raw)]
        return True

    @staticmethod
    def _output(parent: _Parent) -> RequestOutput:
        outs = []
        for i, c in enumerate(parent.children):
            r = c.req
            outs.append(CompletionOutput(
                i, c.detok.output_text(r.finished), r.output_token_ids,
                c.cumulative_logprob if c.logprobs is not None else None,
                c.logprobs, r.status.value if r.finished else None, r.stop_reason))
        return RequestOutput(parent.request_id, parent.prompt, parent.prompt_token_ids, outs,
                             all(c.req.finished for c in parent.children),
                             max(0, parent.children[0].req.num_cached_tokens),
                             parent.prompt_logprobs)


def _max_model_len(hf_config, requested: int | None) -> int:
    limit = hf_config.max_position_embeddings
    # Mistral's sliding window is not implemented: cap the context where it would start.
    window = getattr(hf_config, "sliding_window", None)
    if window and getattr(hf_config, "use_sliding_window", True):
        limit = min(limit, window)
    if requested is not None and requested > limit:
        raise ValueError(f"max_model_len: {requested} exceeds the model's limit of {limit}")
    return requested or limit


def _grammatical(req: Request, drafts: list[int]) -> list[int]:
    """The proposals up to the first its structured output forbids: rows past it would be
    verified only to be rejected."""
    if req.grammar is None or not drafts:
        return drafts
    return drafts[:req.grammar.validate_tokens(drafts)]
