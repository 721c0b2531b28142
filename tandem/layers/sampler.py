"""Batched sampling: penalties, temperature, top-k/p, min-p, seeded draws, logprobs."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from tandem.engine.request import Request
from tandem.structured.grammar import apply_masks

# Below this, logits / temperature overflows; such a temperature means greedy anyway (as vLLM).
_MIN_TEMPERATURE = 1e-5


@dataclass
class SampleResult:
    token_ids: list[int]
    # Per row, when the request asked for logprobs: (sampled logprob, its rank, top ids, top logprobs)
    logprobs: list[tuple[float, int, list[int], list[float]] | None]


class Sampler:
    def __call__(self, logits: torch.Tensor, reqs: list[Request]) -> SampleResult:
        raw = logits.float()
        params = [r.params for r in reqs]
        logits = self.process(raw, reqs)
        temps = torch.tensor([p.temperature for p in params], device=logits.device)
        greedy = temps < _MIN_TEMPERATURE
        tokens = logits.argmax(-1)
        if not bool(greedy.all()):
            sampled = self._sample(logits / torch.where(greedy, 1.0, temps).unsqueeze(1), reqs)
            tokens = torch.where(greedy, tokens, sampled)
        token_list = tokens.tolist()
        return SampleResult(token_list, self._logprobs(raw, tokens, params))

    def _apply_penalties_and_bias(self, logits: torch.Tensor, reqs: list[Request]) -> torch.Tensor:
        vocab = logits.shape[1]
        for i, r in enumerate(reqs):
            p = r.params
            if p.logit_bias:
                ids = torch.tensor(list(p.logit_bias), device=logits.device)
                logits[i, ids] += torch.tensor(list(p.logit_bias.values()), device=logits.device)
            if r.num_output_tokens < p.min_tokens:
                banned = list(p.stop_token_ids) + ([] if p.ignore_eos else list(r.eos_token_ids))
                banned = [t for t in banned if t < vocab]
                if banned:
                    logits[i, banned] = -float("inf")
            if p.repetition_penalty != 1.0:
                seen = torch.tensor(r.all_token_ids, device=logits.device).unique()
                x = logits[i, seen]
                logits[i, seen] = torch.where(x > 0, x / p.repetition_penalty,
                                              x * p.repetition_penalty)
            if p.presence_penalty or p.frequency_penalty:
                out = torch.tensor(r.output_token_ids, dtype=torch.long, device=logits.device)
                counts = torch.zeros(vocab, device=logits.device).index_add_(
                    0, out, torch.ones(len(out), device=logits.device))
                logits[i] -= counts * p.frequency_penalty + (counts > 0) * p.presence_penalty
        return logits

    def process(self, logits: torch.Tensor, reqs: list[Request]) -> torch.Tensor:
        """float32 logits with each row's penalties, min_tokens bans and logit_bias applied, and
        a structured-output request's disallowed tokens at -inf."""
        logits = logits.float()
        penalize = any(_needs_processing(r) for r in reqs)
        constrained = any(r.grammar is not None for r in reqs)
        if penalize or constrained:  # one copy: the raw logits still give logprobs
            logits = logits.clone()
        if penalize:
            logits = self._apply_penalties_and_bias(logits, reqs)
        if constrained:
            apply_masks(logits, [r.grammar for r in reqs])
        return logits

    @staticmethod
    def probs(logits: torch.Tensor, params: list) -> torch.Tensor:
        """The distribution each row samples from: processed logits already divided by the
        temperature, then top-k, top-p and min-p (min-p's survivors are not renormalized:
        sampling is by ratio)."""
        if any(p.top_k > 0 or p.top_p < 1 for p in params):
            logits = _top_k_top_p(logits, params)
        probs = logits.softmax(-1)
        min_p = torch.tensor([p.min_p for p in params], device=logits.device)
        if bool((min_p > 0).any()):
            keep = probs >= min_p.unsqueeze(1) * probs.max(-1, keepdim=True).values
            probs = torch.where(keep, probs, 0.0)
        return probs

    def _sample(self, logits: torch.Tensor, reqs: list[Request]) -> torch.Tensor:
        probs = self.probs(logits, [r.params for r in reqs])
        # Gumbel-style race: argmax(p / q), q ~ Exp(1). A seeded request draws q from its own
        # generator, so its tokens do not depend on what else is in the batch.
        q = torch.empty_like(probs).exponential_()
        for i, r in enumerate(reqs):
            if r.generator is not None:
                q[i] = torch.empty(probs.shape[1]).exponential_(generator=r.generator).to(q.device)
        return (probs / q).argmax(-1)

    @staticmethod
    def _logprobs(raw: torch.Tensor, tokens: torch.Tensor, params) -> list:
        rows = [i for i, p in enumerate(params) if p.logprobs is not None]
        result: list = [None] * len(params)
        if rows:
            entries = logprob_entries(raw[rows], tokens[rows], [params[i].logprobs for i in rows])
            for i, entry in zip(rows, entries):
                result[i] = entry
        return result


def logprob_entries(logits: torch.Tensor, tokens: torch.Tensor,
                    num_top: list[int]) -> list[tuple[float, int, list[int], list[float]]]:
    """Per row of raw logits: the log-softmax (float32) of its token in `tokens`, that token's
    rank (1 = most likely), and the row's top `num_top[row]` token ids and logprobs."""
    lp = logits.float().log_softmax(-1)
    chosen = lp.gather(1, tokens.unsqueeze(1))
    ranks = (lp > chosen).sum(-1) + 1
    k = max(num_top)
    top_lp, top_ids = lp.topk(k, dim=-1) if k else (lp[:, :0], lp[:, :0].long())
    # One host copy per tensor: prompt logprobs can be a whole prefill chunk of rows.
    return [(c, r, ids[:n], lps[:n]) for c, r, ids, lps, n in zip(
        chosen[:, 0].tolist(), ranks.tolist(), top_ids.tolist(), top_lp.tolist(), num_top)]


def _needs_processing(r: Request) -> bool:
    p = r.params
    return bool(p.logit_bias or r.num_output_tokens < p.min_tokens or p.repetition_penalty != 1.0
                or p.presence_penalty or p.frequency_penalty)


def _top_k_top_p(logits: torch.Tensor, params) -> torch.Tensor:
    vocab = logits.shape[1]
    k = torch.tensor([p.top_k if 0 < p.top_k < vocab else vocab for p in params],
                     device=logits.device)
    top_p = torch.tensor([p.top_p for p in params], device=logits.device)
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    ranks = torch.arange(vocab, device=logits.device).unsqueeze(0)
    sorted_logits = sorted_logits.masked_fill(ranks >= k.unsqueeze(1), -float("inf"))
    probs = sorted_logits.softmax(-1)
    # Keep the smallest prefix whose mass reaches top_p (the token that crosses it stays).
    drop = (probs.cumsum(-1) - probs) >= top_p.unsqueeze(1)
    sorted_logits = sorted_logits.masked_fill(drop, -float("inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)
