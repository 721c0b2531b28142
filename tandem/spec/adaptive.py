"""How many tokens to propose for a request, from how its recent proposals fared.

After a verification that accepted `a` of its proposed tokens, the next proposal is at most
a + 1 long (never more than the configured k): a request whose text stops repeating its input
quickly proposes 1 token, and one whose proposals keep being accepted grows back to k. A
proposal that is rejected outright also pauses proposals for that request, 2, 4, 8, ... up to
MAX_BACKOFF steps as it keeps happening, so a request whose text never repeats costs one
one-token proposal every MAX_BACKOFF steps and otherwise decodes as without speculation.
"""
from __future__ import annotations

from tandem.engine.request import Request

MAX_BACKOFF = 32


def proposal_length(req: Request, k: int) -> int:
    """Tokens `req` may propose this step (0: none); counts down a pause."""
    if req.spec_backoff > 0:
        req.spec_backoff -= 1
        return 0
    return k if req.spec_k is None else req.spec_k


def observe(req: Request, k: int, accepted: int) -> None:
    """A verification of `req`'s proposal accepted `accepted` tokens."""
    if accepted:
        req.spec_misses, req.spec_k = 0, min(k, accepted + 1)
    else:
        req.spec_misses += 1
        req.spec_k = 1
        req.spec_backoff = min(2 ** req.spec_misses, MAX_BACKOFF)
