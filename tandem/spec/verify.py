"""Checking one request's proposed tokens against the target model's logits, exactly.

Row j of the logits scores the token after the request's tokens plus the first j proposals, so
each row is processed (penalties, min_tokens, logit_bias, temperature, top-k/p, min-p) as if
those proposals were already accepted. Greedy: proposals are accepted while they equal the
row's argmax, then the argmax of the first row that disagrees (or of the row after the last
proposal) is emitted, so the tokens are exactly the non-speculative ones. Sampling: rejection
sampling (Leviathan et al.) with a one-hot draft distribution q (n-gram proposals): accept
proposal d with probability p(d); on rejection emit a sample of p with d removed, renormalized;
after k acceptances a bonus token from the last row. The emitted tokens are then distributed
exactly as the target's own samples.
"""
from __future__ import annotations

import copy

import torch

from tandem.engine.request import Request
from tandem.layers.sampler import _MIN_TEMPERATURE, Sampler


def _ahead(req: Request, extra: list[int]) -> Request:
    """`req` as the sampler sees it with `extra` tokens appended: a shallow copy (same params
    and generator), never scheduled."""
    ahead = copy.copy(req)
    ahead.all_token_ids = req.all_token_ids + extra
    if req.grammar is not None and extra:  # its mask is the one after the proposals too
        ahead.grammar = req.grammar.deep_copy()
        ahead.grammar.consume_tokens(extra)
    return ahead


def verify(sampler: Sampler, logits: torch.Tensor, req: Request, drafts: list[int]
           ) -> tuple[list[int], list | None]:
    """logits: [len(drafts) + 1, vocab]. The tokens to emit (accepted proposals, then one the
    target chose) and, if the request asked for them, each one's logprobs entry."""
    k = len(drafts)
    rows = [_ahead(req, drafts[:j]) for j in range(k + 1)]
    raw = logits.float()
    processed = sampler.process(raw, rows)
    p = req.params
    if p.temperature < _MIN_TEMPERATURE:
        target = processed.argmax(-1).tolist()
        a = next((j for j in range(k) if target[j] != drafts[j]), k)
        tokens = drafts[:a] + [target[a]]
    else:
        probs = sampler.probs(processed / p.temperature, [p] * (k + 1)).cpu()
        gen = req.generator
        tokens = []
        for j, d in enumerate(drafts):
            pj = probs[j]
            if float(torch.rand(1, generator=gen)) < float(pj[d] / pj.sum()):
                tokens.append(d)
                continue
            residual = pj.clone()
            residual[d] = 0.0
            tokens.append(int(torch.multinomial(residual, 1, generator=gen)))
            break
        else:
            tokens.append(int(torch.multinomial(probs[k], 1, generator=gen)))
    logprobs = None
    if p.logprobs is not None:
        n = len(tokens)
        logprobs = sampler._logprobs(raw[:n], torch.tensor(tokens, device=raw.device), [p] * n)
    return tokens, logprobs
