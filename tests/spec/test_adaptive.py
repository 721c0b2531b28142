"""Proposal lengths follow each request's recent acceptance, down to none for a while."""
from tandem import SamplingParams
from tandem.engine.request import Request
from tandem.spec.adaptive import MAX_BACKOFF, acceptance_rate, observe, proposal_length


def req() -> Request:
    return Request("r", [1, 2, 3], SamplingParams())


def test_length_follows_acceptance_and_grows_back_to_k():
    r = req()
    assert proposal_length(r, 4) == 4
    observe(r, 4, 1, 4)
    assert proposal_length(r, 4) == 2
    observe(r, 4, 2, 2)
    assert proposal_length(r, 4) == 3
    observe(r, 4, 3, 3)
    observe(r, 4, 4, 4)
    assert proposal_length(r, 4) == 4  # never past k


def test_outright_rejections_pause_proposals_longer_each_time():
    r = req()
    pauses = []
    for _ in range(7):
        observe(r, 4, 0, 1)
        n = 0
        while proposal_length(r, 4) == 0:
            n += 1
        pauses.append(n)
    assert pauses == [2, 4, 8, 16, 32, MAX_BACKOFF, MAX_BACKOFF]
    assert proposal_length(r, 4) == 1  # a one-token probe after each pause
    observe(r, 4, 1, 1)  # accepted: no pause, and longer proposals again
    assert proposal_length(r, 4) == 2 and r.spec_misses == 0


def test_acceptance_rate_follows_recent_verifications():
    r = req()
    assert acceptance_rate(r) == 0.5
    for _ in range(10):
        observe(r, 4, 4, 4)  # all accepted: no rejection counted
    high = acceptance_rate(r)
    assert high > 0.9
    for _ in range(20):
        observe(r, 4, 0, 1)
    assert acceptance_rate(r) < 0.2 < high
