"""Verification rows go ahead only where the expected accepted tokens pay for their time."""
import pytest

from tandem.spec.cost import EXPLORE_EVERY, MIN_SAMPLES, UNSEEN_ROW, StepCosts


def costs(ms: dict[int, float]) -> StepCosts:
    c = StepCosts()
    for rows, t in ms.items():
        for _ in range(MIN_SAMPLES):
            c.observe(rows, t / 1000)
    return c


def test_unmeasured_row_counts_are_interpolated_or_extrapolated():
    c = costs({1: 10, 5: 18})
    assert c.time(1) == pytest.approx(0.010)
    assert c.time(3) == pytest.approx(0.014)
    assert c.time(7) == pytest.approx(0.022)  # the slope from 1 to 5 rows: 2 ms a row
    assert costs({5: 18}).time(7) == pytest.approx(0.018 * (1 + 2 * UNSEEN_ROW))
    assert costs({4: 20}).time(2) == pytest.approx(0.010)
    assert StepCosts().time(3) is None


def test_a_stalled_step_moves_the_average_only_a_little():
    c = costs({2: 10})
    c.observe(2, 1.0)  # a neighbour's burst: capped at twice the average before it counts
    assert c.time(2) == pytest.approx(0.011)


def test_one_stream_verifies_what_a_modest_rate_pays_for():
    # One row 10 ms, each further row 1.5 ms: a row pays while alpha ** j > 0.15.
    c = costs({1: 10, 2: 11.5, 3: 13, 4: 14.5, 5: 16})
    assert c.worth(1, 0, 4, 0.9) == 4
    assert c.worth(1, 0, 4, 0.5) == 2  # 0.5, 0.25 pay; 0.125 does not
    assert c.worth(1, 0, 4, 0.1) == 0
    # A jump in cost (a kernel route switch) stops a proposal before it.
    jump = costs({1: 10, 2: 11, 3: 12, 4: 13, 5: 20})
    assert jump.worth(1, 0, 4, 0.8) == 3


def test_a_compute_bound_batch_verifies_only_near_sure_proposals():
    # 8 decodes in 24 ms (3 ms a token); each further row costs 2.5 ms: needs alpha ** j > 0.83.
    c = costs({8: 24, 16: 44})
    assert c.worth(8, 0, 4, 0.5) == 0
    assert c.worth(8, 0, 4, 0.95) == 3
    # Rows other requests already added count: the same request gets fewer past a jump.
    for _ in range(MIN_SAMPLES):
        c.observe(11, 0.040)
    assert c.worth(8, 2, 4, 0.95) == 0


def test_nothing_measured_yet_proposes_everything():
    assert StepCosts().worth(1, 0, 3, 0.01) == 3
    c = StepCosts()
    c.observe(1, 0.010)  # one first sample: no count trusted, nothing to extrapolate from
    assert c.worth(1, 0, 3, 0.01) == 3


def test_a_row_count_is_trusted_from_the_median_of_its_first_samples():
    c = costs({1: 10})
    for t, before in ((12, 12), (60, 12), (11, 11)):  # a stalled step among the first
        c.observe(2, t / 1000)
        assert c.time(2) == pytest.approx(before / 1000)  # until trusted: the fastest yet
    c.observe(2, 0.0115)
    assert c.time(2) == pytest.approx(0.012)
    c.observe(3, 0.001)  # never below what the trusted counts predict
    assert c.time(3) == pytest.approx(0.014)


def test_refused_rows_are_probed_now_and_then():
    c = costs({1: 10, 2: 20})  # a second row costs a whole step: never pays
    got = [c.worth(1, 0, 2, 0.9) for _ in range(2 * EXPLORE_EVERY)]
    assert got.count(1) == 2 and got.count(0) == 2 * EXPLORE_EVERY - 2
