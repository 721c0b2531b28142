"""Draft-model proposals: a smaller model with the target's tokenizer runs in the same process,
with its own paged KV cache, and proposes each request's next k tokens greedily.

The draft keeps, per request, the K/V of the longest prefix it shares with the request's
tokens. A proposal step first computes what the draft has not seen (the prompt the first time,
then the tokens the last verification accepted and the one the target chose), whose last row
gives the first proposed token, then one decode step per further token, all requests batched.
After the verification, K/V of the draft's own rejected tokens is dropped from the shared
prefix on the next proposal. Greedy proposals make q one-hot, which the verifier's rejection
sampling (verify.py) already treats exactly.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from transformers import AutoConfig, PreTrainedTokenizerBase

from tandem.config import EngineConfig
from tandem.engine.kv_cache import KVCacheManager
from tandem.engine.model_runner import ModelRunner
from tandem.engine.request import Request
from tandem.engine.scheduler import SchedulerOutput
from tandem.loader.model_path import resolve_model
from tandem.loader.tokenizer import load_tokenizer


@dataclass
class _Seq:
    """A request as the draft's KV pool and runner see it (the fields they read)."""
    request_id: str
    all_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    spec_token_ids: list[int] = field(default_factory=list)  # always empty: the draft verifies nothing
    prompt_logprobs: None = None  # the draft never collects prompt logprobs
    synced: int = 0  # its first `synced` tokens are the request's own

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)


class DraftProposer:
    def __init__(self, config: EngineConfig, vocab_size: int, tokenizer: PreTrainedTokenizerBase,
                 device: torch.device, num_blocks: int):
        """Load the draft named by config.speculative_config["model"] with a pool of
        `num_blocks` blocks (the target's count: the draft then runs out no sooner than the
        target does); ValueError when its vocabulary is not the target's."""
        name = config.speculative_config["model"]
        try:
            folder = resolve_model(name)
        except ValueError as e:
            raise ValueError(f"speculative_config.model: {e}") from None
        hf_config = AutoConfig.from_pretrained(folder)
        check_same_vocab(hf_config.vocab_size, load_tokenizer(folder), vocab_size, tokenizer)
        draft = dataclasses.replace(
            config, model=name, quantization="auto", quantization_group_size=32,
            dense_weight_copy=False, speculative_config=None, kv_store=None, kv_host_memory=0,
            kv_store_write_through=False, enable_prefix_caching=False, max_model_len=None)
        self.runner = ModelRunner(draft, hf_config, folder, device=device, num_blocks=num_blocks)
        self.kv = KVCacheManager(num_blocks, config.block_size, enable_caching=False)
        self.max_len = hf_config.max_position_embeddings
        self.budget = config.max_num_batched_tokens  # tokens a step may catch up on
        self.seqs: dict[str, _Seq] = {}

    def forget(self, req: Request) -> None:
        """`req` finished or was aborted: free its blocks in the draft's pool."""
        seq = self.seqs.pop(req.request_id, None)
        if seq is not None:
            self.kv.free_request(seq)

    @torch.inference_mode()
    def propose(self, wants: list[tuple[Request, int]]) -> dict[str, list[int]]:
        """Up to k greedy proposed tokens for each (request, k); a request whose catch-up does
        not fit this step's budget, or the draft's pool or context, gets none this time."""
        budget, batch, want = self.budget, SchedulerOutput(), {}
        for req, k in wants:
            seq = self._sync(req)
            n = seq.num_tokens - seq.num_computed_tokens
            k = min(k, self.max_len - seq.num_tokens + 1)
            if budget <= 0 or k < 1:
                continue
            if n > budget:  # a long prompt: a chunk now, proposals once it is caught up
                n, k = budget, 0
            if not self.kv.allocate_slots(seq, n + max(k - 1, 0)):
                self.forget(req)  # start over when there is room
                continue
            batch.requests.append(seq)
            batch.num_tokens.append(n)
            want[seq.request_id] = k
            budget -= n
        proposals: dict[str, list[int]] = {}
        while not batch.empty:
            rows, logits = self.runner.forward_logits(batch)
            for seq, n in zip(batch.requests, batch.num_tokens):
                seq.num_computed_tokens += n
            batch = SchedulerOutput()
            for seq, token in zip(rows, logits.argmax(-1).tolist() if rows else []):
                mine = proposals.setdefault(seq.request_id, [])
                mine.append(token)
                if len(mine) < want[seq.request_id]:  # feed it back for the next one
                    seq.all_token_ids.append(token)
                    batch.requests.append(seq)
                    batch.num_tokens.append(1)
        return proposals

    def _sync(self, req: Request) -> _Seq:
        """The draft's sequence for `req`, holding K/V only for the prefix both share."""
        seq = self.seqs.get(req.request_id)
        if seq is None:
            seq = self.seqs[req.request_id] = _Seq(req.request_id)
        tokens = req.all_token_ids
        valid = seq.synced
        # Past `synced` the draft computed its own proposals: those the target accepted count.
        while (valid < seq.num_computed_tokens and valid < len(tokens)
               and seq.all_token_ids[valid] == tokens[valid]):
            valid += 1
        seq.num_computed_tokens = min(seq.num_computed_tokens, valid)
        self.kv.trim(seq, seq.num_computed_tokens)
        seq.all_token_ids = list(tokens)
        seq.synced = len(tokens)
        return seq


def check_same_vocab(draft_size: int, draft_tok: PreTrainedTokenizerBase, target_size: int,
                     target_tok: PreTrainedTokenizerBase) -> None:
    """A draft's token ids must mean what the target's mean."""
    if draft_size != target_size:
        raise ValueError(f"speculative_config.model: the draft's vocabulary has {draft_size} "
                         f"tokens, the target's {target_size}; they must share one tokenizer")
    if draft_tok.get_vocab() != target_tok.get_vocab():
        raise ValueError("speculative_config.model: the draft's tokenizer maps tokens to "
                         "other ids than the target's; they must share one tokenizer")
