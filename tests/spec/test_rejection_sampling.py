"""The rejection sampler keeps the target's distribution: many seeded draws on a small
vocabulary, for several target distributions and proposals, against the exact distribution by
total variation. The bound is wide enough for sampling noise and far below the error of the
usual mistakes (resampling from p instead of the residual, accepting always)."""
import math

import torch

from tandem import SamplingParams
from tandem.engine.request import Request
from tandem.layers.sampler import Sampler
from tandem.spec.verify import verify

DRAWS = 6000
TV_BOUND = 0.03  # noise here is about 0.01; a residual that ignores the proposal: >= 0.08


def draws(probs: list[list[float]], drafts: list[int], params: SamplingParams, seed: int = 0
          ) -> list[list[int]]:
    logits = torch.tensor(probs).log()
    req = Request("r", [0], params, seed=seed)
    return [verify(Sampler(), logits, req, drafts)[0] for _ in range(DRAWS)]


def tv(counts: list[int], p: list[float]) -> float:
    n = sum(counts)
    return 0.5 * sum(abs(c / n - q) for c, q in zip(counts, p))


def first_token_counts(out: list[list[int]], vocab: int) -> list[int]:
    counts = [0] * vocab
    for tokens in out:
        counts[tokens[0]] += 1
    return counts


P = [[0.5, 0.3, 0.15, 0.05], [0.05, 0.05, 0.1, 0.8], [0.25, 0.25, 0.25, 0.25]]


def test_first_token_follows_the_target_whatever_is_proposed():
    params = SamplingParams(temperature=1.0, max_tokens=4)
    for p in P:
        for draft in (0, 3):
            out = draws([p, P[2]], [draft], params)
            assert tv(first_token_counts(out, 4), p) < TV_BOUND, (p, draft)


def test_bonus_token_after_an_accepted_proposal_follows_the_next_row():
    params = SamplingParams(temperature=1.0, max_tokens=4)
    out = draws([P[0], P[1]], [0], params)
    bonus = [t[1] for t in out if len(t) == 2]
    assert abs(len(bonus) / DRAWS - P[0][0]) < 0.03  # accepted with probability p(draft)
    counts = [bonus.count(v) for v in range(4)]
    assert tv(counts, P[1]) < TV_BOUND


def test_temperature_and_top_k_are_applied_before_acceptance():
    params = SamplingParams(temperature=0.5, top_k=2, max_tokens=4)
    p = P[0]
    sharp = [x ** 2 for x in p[:2]] + [0.0, 0.0]  # temperature 0.5 squares, top-2 keeps two
    want = [x / sum(sharp) for x in sharp]
    out = draws([p, P[2]], [1], params)
    assert tv(first_token_counts(out, 4), want) < TV_BOUND


def test_seeded_draws_repeat():
    params = SamplingParams(temperature=1.0, max_tokens=4, seed=3)
    assert draws([P[2], P[2], P[2]], [1, 2], params, seed=3)[:50] == \
        draws([P[2], P[2], P[2]], [1, 2], params, seed=3)[:50]


def test_greedy_accepts_exactly_the_argmax_run():
    params = SamplingParams(temperature=0, max_tokens=8)
    rows = [P[0], P[1], P[0], P[1]]  # argmax 0, 3, 0, 3
    req = Request("r", [0], params)
    logits = torch.tensor(rows).log()
    assert verify(Sampler(), logits, req, [0, 3, 1])[0] == [0, 3, 0]  # third rejected: argmax
    assert verify(Sampler(), logits, req, [0, 3, 0])[0] == [0, 3, 0, 3]  # all, then the bonus
    assert verify(Sampler(), logits, req, [2, 3, 0])[0] == [0]


def test_logprobs_are_the_targets_for_each_emitted_token():
    params = SamplingParams(temperature=0, max_tokens=8, logprobs=2)
    req = Request("r", [0], params)
    logits = torch.tensor([P[0], P[1], P[0]]).log()
    tokens, lps = verify(Sampler(), logits, req, [0, 3])
    assert tokens == [0, 3, 0] and len(lps) == 3
    assert math.isclose(lps[1][0], math.log(0.8), rel_tol=1e-5) and lps[1][1] == 1
