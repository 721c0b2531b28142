"""How many tokens to propose for a request, from how its recent proposals fared.

After a verification that accepted `a` of its proposed tokens, the next proposal is at most
a + 1 long (never more than the configured k): a request whose text stops repeating its input
quickly proposes 1 token, and one whose proposals keep being accepted grows back to k. A
proposal that is rejected outright also pauses proposals for that request, 2, 4, 8, ... up to
MAX_BACKOFF steps as it keeps happening, so a request whose text never repeats costs one
one-token proposal every MAX_BACKOFF steps and otherwise decodes as without speculation.

Each request also keeps a running acceptance rate per proposed token (`acceptance_rate`), by
which spec/cost.py decides how many proposed tokens are worth a verification's rows.
"""
from __future__ import annotations

from tandem.engine.request import Request

MAX_BACKOFF = 32
RATE_DECAY = 0.8  # weight of the past in a request's acceptance rate, per verification


def proposal_length(req: Request, k: int) -> int:
    """Tokens `req` may propose this step (0: none); counts down a pause."""
    if req.spec_backoff > 0:
        req.spec_backoff -= 1
        return 0
    return k if req.spec_k is None else req.spec_k


def observe(req: Request, k: int, accepted: int, proposed: int) -> None:
    """A verification of `req`'s `proposed` tokens accepted `accepted` of them."""
    # Accepted tokens, and the proposal that ended a run (none when all were accepted): the
    # rate a token is accepted given the ones before it were.
    req.spec_accepted_w = RATE_DECAY * req.spec_accepted_w + accepted
    req.spec_rejected_w = RATE_DECAY * req.spec_rejected_w + (accepted < proposed)
    if accepted:
        req.spec_misses, req.spec_k = 0, min(k, accepted + 1)
    else:
        req.spec_misses += 1
        req.spec_k = 1
        req.spec_backoff = min(2 ** req.spec_misses, MAX_BACKOFF)


def acceptance_rate(req: Request) -> float:
    """Chance that `req`'s next proposed token is accepted; 1/2 before any verification."""
    return (req.spec_accepted_w + 1) / (req.spec_accepted_w + req.spec_rejected_w + 2)
