"""The router's circuit breaker and retry rules, driven by a fake clock so nothing sleeps."""
from __future__ import annotations

import math
import random

import pytest

from tandem.router.breaker import CircuitBreaker
from tandem.router.retry import RETRYABLE_STATUS, Backoff, is_retryable, retry_after_seconds


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def make(clock: FakeClock, **kwargs) -> CircuitBreaker:
    args = {"failure_threshold": 3, "open_seconds": 10.0, "half_open_max": 1,
            "success_threshold": 2}
    return CircuitBreaker(**(args | kwargs), clock=clock)


def trip(cb: CircuitBreaker) -> None:
    for _ in range(cb.failure_threshold):
        assert cb.allow()
        cb.record_failure()
    assert cb.state == "open"


def to_half_open(cb: CircuitBreaker, clock: FakeClock) -> None:
    trip(cb)
    clock.advance(cb.open_seconds)
    assert cb.state == "half_open"


# --- breaker: closed ---------------------------------------------------------------------------

def test_starts_closed_and_allows(clock):
    cb = make(clock)
    assert cb.state == "closed" and cb.state_code == 0
    assert all(cb.allow() for _ in range(100))  # closed never rations requests


def test_opens_after_n_consecutive_failures(clock):
    cb = make(clock)
    cb.record_failure()
    cb.record_failure()
    assert cb.state == "closed"
    cb.record_failure()
    assert cb.state == "open" and cb.state_code == 2
    assert not cb.allow()


def test_non_consecutive_failures_do_not_open(clock):
    cb = make(clock)
    for _ in range(10):
        cb.record_failure()
        cb.record_failure()
        cb.record_success()  # resets the run of failures
    assert cb.state == "closed"


def test_threshold_of_one(clock):
    cb = make(clock, failure_threshold=1)
    cb.record_failure()
    assert cb.state == "open"


# --- breaker: open -----------------------------------------------------------------------------

def test_open_refuses_until_timeout(clock):
    cb = make(clock)
    trip(cb)
    clock.advance(9.999)
    assert not cb.allow()
    assert cb.state == "open"
    clock.advance(0.001)
    assert cb.state == "half_open" and cb.state_code == 1


def test_open_to_half_open_is_lazy_via_allow(clock):
    cb = make(clock)
    trip(cb)
    clock.advance(10.0)
    assert cb.allow()  # allow() alone moves it on, with no prior look at .state
    assert cb.state == "half_open"


def test_verdicts_while_open_change_nothing(clock):
    cb = make(clock)
    trip(cb)
    clock.advance(5.0)
    cb.record_failure()  # a late failure must not restart the timer
    cb.record_success()  # nor a late success close it
    cb.release()
    assert cb.state == "open"
    clock.advance(5.0)
    assert cb.state == "half_open"


def test_zero_open_seconds_goes_straight_to_half_open(clock):
    cb = make(clock, open_seconds=0.0)
    for _ in range(3):
        cb.record_failure()
    assert cb.state == "half_open"


# --- breaker: half-open ------------------------------------------------------------------------

@pytest.mark.parametrize("half_open_max", [1, 2, 5])
def test_half_open_admits_exactly_max_trials(clock, half_open_max):
    cb = make(clock, half_open_max=half_open_max)
    to_half_open(cb, clock)
    assert [cb.allow() for _ in range(half_open_max + 3)] == \
        [True] * half_open_max + [False] * 3


def test_successes_close_after_threshold(clock):
    cb = make(clock, success_threshold=3)
    to_half_open(cb, clock)
    for _ in range(2):
        assert cb.allow()
        cb.record_success()
        assert cb.state == "half_open"
    assert cb.allow()
    cb.record_success()
    assert cb.state == "closed" and cb.state_code == 0


def test_closing_forgets_old_failures(clock):
    cb = make(clock)
    to_half_open(cb, clock)
    for _ in range(2):
        assert cb.allow()
        cb.record_success()
    assert cb.state == "closed"
    cb.record_failure()
    cb.record_failure()
    assert cb.state == "closed"  # a fresh count: needs all 3 again


def test_success_frees_trial_slot(clock):
    cb = make(clock, success_threshold=5)
    to_half_open(cb, clock)
    assert cb.allow()
    assert not cb.allow()
    cb.record_success()
    assert cb.allow()


def test_failure_in_half_open_reopens_and_restarts_timer(clock):
    cb = make(clock, success_threshold=3)
    to_half_open(cb, clock)
    assert cb.allow()
    cb.record_success()
    clock.advance(3.0)
    assert cb.allow()
    cb.record_failure()
    assert cb.state == "open"
    clock.advance(9.0)  # measured from the reopening, not from the first trip
    assert cb.state == "open" and not cb.allow()
    clock.advance(1.0)
    assert cb.state == "half_open"


def test_reopened_half_open_starts_fresh(clock):
    cb = make(clock, half_open_max=2, success_threshold=2)
    to_half_open(cb, clock)
    assert cb.allow() and cb.allow()
    cb.record_success()  # one success, one trial still in flight
    cb.record_failure()
    clock.advance(10.0)
    # Neither the earlier success nor the lost in-flight trial carries over.
    assert cb.allow() and cb.allow() and not cb.allow()
    cb.record_success()
    assert cb.state == "half_open"
    cb.record_success()
    assert cb.state == "closed"


def test_release_frees_trial_slot_without_verdict(clock):
    cb = make(clock, success_threshold=1)
    to_half_open(cb, clock)
    assert cb.allow()
    assert not cb.allow()
    cb.release()
    assert cb.state == "half_open"  # neither success nor failure
    assert cb.allow()
    cb.record_success()
    assert cb.state == "closed"


def test_release_never_goes_below_zero(clock):
    cb = make(clock, half_open_max=2)
    to_half_open(cb, clock)
    for _ in range(5):
        cb.release()
    assert [cb.allow() for _ in range(3)] == [True, True, False]


def test_release_while_closed_is_harmless(clock):
    cb = make(clock)
    cb.release()
    cb.record_failure()
    cb.record_failure()
    cb.release()
    cb.record_failure()
    assert cb.state == "open"


# --- breaker: validation -----------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, name", [
    ({"failure_threshold": 0}, "failure_threshold"),
    ({"failure_threshold": -1}, "failure_threshold"),
    ({"open_seconds": -0.1}, "open_seconds"),
    ({"open_seconds": math.nan}, "open_seconds"),
    ({"open_seconds": math.inf}, "open_seconds"),
    ({"half_open_max": 0}, "half_open_max"),
    ({"success_threshold": 0}, "success_threshold"),
])
def test_breaker_rejects_bad_args(kwargs, name):
    with pytest.raises(ValueError, match=name):
        CircuitBreaker(**kwargs)


def test_breaker_defaults():
    cb = CircuitBreaker()
    assert (cb.failure_threshold, cb.open_seconds, cb.half_open_max, cb.success_threshold) == \
        (5, 5.0, 1, 2)
    assert cb.state == "closed"


# --- retry rules -------------------------------------------------------------------------------

def test_retryable_status_set():
    assert RETRYABLE_STATUS == {429, 502, 503, 504}


@pytest.mark.parametrize("status", sorted(RETRYABLE_STATUS))
def test_retryable_statuses_before_any_byte(status):
    assert is_retryable(status, 0)


@pytest.mark.parametrize("status", [200, 400, 401, 404, 408, 413, 422, 500, 501, 505])
def test_other_statuses_are_not_retried(status):
    assert not is_retryable(status, 0)


def test_connection_failure_is_retried():
    assert is_retryable(None, 0)


@pytest.mark.parametrize("status", [None, *sorted(RETRYABLE_STATUS), 200])
@pytest.mark.parametrize("sent", [1, 4096])
def test_never_retry_after_bytes_reached_client(status, sent):
    assert not is_retryable(status, sent)


# --- backoff -----------------------------------------------------------------------------------

def test_backoff_within_bounds_and_capped():
    b = Backoff(base=0.05, factor=2.0, cap=1.0, rng=random.Random(1234))
    for attempt in range(40):
        ceiling = min(1.0, 0.05 * 2.0 ** attempt)
        for _ in range(50):
            assert 0.0 <= b.delay(attempt) <= ceiling


def test_backoff_grows_then_caps():
    b = Backoff(base=0.05, factor=2.0, cap=1.0, rng=random.Random(7))
    means = [sum(b.delay(a) for _ in range(400)) / 400 for a in range(8)]
    # Uniform on [0, ceiling] averages ceiling/2: 0.025, 0.05, 0.1, 0.2, 0.4, then 0.5 (capped).
    for attempt, mean in enumerate(means):
        assert mean == pytest.approx(min(1.0, 0.05 * 2 ** attempt) / 2, rel=0.15)
    assert means[0] < means[1] < means[2] < means[3] < means[4]
    assert max(b.delay(a) for a in range(5, 60) for _ in range(20)) <= 1.0


def test_backoff_jitter_varies():
    b = Backoff(rng=random.Random(42))
    delays = [b.delay(3) for _ in range(100)]
    assert len(set(delays)) > 90
    assert min(delays) < 0.1 < max(delays)  # spread across [0, 0.4], not bunched


def test_backoff_is_reproducible_with_seeded_rng():
    a, b = Backoff(rng=random.Random(5)), Backoff(rng=random.Random(5))
    assert [a.delay(i) for i in range(10)] == [b.delay(i) for i in range(10)]


def test_backoff_huge_attempt_does_not_overflow():
    b = Backoff(factor=10.0, cap=2.0, rng=random.Random(0))
    assert 0.0 <= b.delay(10_000) <= 2.0


def test_backoff_default_rng_works():
    assert 0.0 <= Backoff().delay(0) <= 0.05


def test_backoff_rejects_negative_attempt():
    with pytest.raises(ValueError, match="attempt"):
        Backoff().delay(-1)


@pytest.mark.parametrize("kwargs, name", [
    ({"base": 0.0}, "base"),
    ({"base": -1.0}, "base"),
    ({"base": math.nan}, "base"),
    ({"factor": 0.5}, "factor"),
    ({"factor": math.inf}, "factor"),
    ({"cap": 0.0}, "cap"),
    ({"cap": -1.0}, "cap"),
    ({"cap": math.inf}, "cap"),
])
def test_backoff_rejects_bad_args(kwargs, name):
    with pytest.raises(ValueError, match=name):
        Backoff(**kwargs)


# --- Retry-After -------------------------------------------------------------------------------

@pytest.mark.parametrize("header, expected", [
    ("0", 0.0),
    ("3", 3.0),
    ("  7 ", 7.0),
    ("1.5", 1.5),
    ("30", 10.0),  # clamped to the cap
    ("9" * 400, 10.0),  # absurdly large, still clamped
])
def test_retry_after_seconds(header, expected):
    assert retry_after_seconds(header, cap=10.0) == expected


@pytest.mark.parametrize("header", [
    None, "", "   ", "-1", "+3", "abc", "1e3", "nan", "inf", "1.", ".5", "3 s", "1,5",
    "Wed, 21 Oct 2015 07:28:00 GMT",  # HTTP-date form: ignored by design
    "\u0663",  # a non-ASCII digit float() would accept
])
def test_retry_after_ignores_dates_and_junk(header):
    assert retry_after_seconds(header, cap=10.0) is None


def test_retry_after_zero_cap():
    assert retry_after_seconds("5", cap=0.0) == 0.0


def test_retry_after_rejects_negative_cap():
    with pytest.raises(ValueError, match="cap"):
        retry_after_seconds("5", cap=-1.0)
