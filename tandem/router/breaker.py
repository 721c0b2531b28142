"""A circuit breaker per replica, so the router stops sending work to a replica that keeps
failing and probes it with a few requests before trusting it again.

Not thread-safe, on purpose: the router runs on one asyncio loop, and nothing here awaits, so
every method runs to completion without interleaving.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable

CLOSED, HALF_OPEN, OPEN = "closed", "half_open", "open"
# Ordered by severity so a Prometheus gauge can be alerted on with `> 0`.
_CODES = {CLOSED: 0, HALF_OPEN: 1, OPEN: 2}


class CircuitBreaker:
    """closed -> open after `failure_threshold` consecutive failures; open -> half-open once
    `open_seconds` have passed; half-open admits at most `half_open_max` trials at a time and
    closes after `success_threshold` consecutive successes, or reopens on any failure."""

    def __init__(self, failure_threshold: int = 5, open_seconds: float = 5.0,
                 half_open_max: int = 1, success_threshold: int = 2,
                 clock: Callable[[], float] = time.monotonic):
        if failure_threshold < 1:
            raise ValueError(f"failure_threshold must be >= 1, got {failure_threshold}")
        if not (math.isfinite(open_seconds) and open_seconds >= 0):
            raise ValueError(f"open_seconds must be finite and >= 0, got {open_seconds}")
        if half_open_max < 1:
            raise ValueError(f"half_open_max must be >= 1, got {half_open_max}")
        if success_threshold < 1:
            raise ValueError(f"success_threshold must be >= 1, got {success_threshold}")
        self.failure_threshold = failure_threshold
        self.open_seconds = open_seconds
        self.half_open_max = half_open_max
        self.success_threshold = success_threshold
        self._clock = clock
        self._state = CLOSED
        self._failures = 0  # consecutive, while closed
        self._successes = 0  # consecutive, while half-open
        self._trials = 0  # half-open requests admitted and not yet finished
        self._opened_at = 0.0

    @property
    def state(self) -> str:
        # Lazy: nobody has to run a timer to move open -> half-open; looking is enough.
        if self._state == OPEN and self._clock() - self._opened_at >= self.open_seconds:
            self._state, self._successes, self._trials = HALF_OPEN, 0, 0
        return self._state

    @property
    def state_code(self) -> int:
        """0 closed, 1 half-open, 2 open: a number, because Prometheus gauges hold numbers."""
        return _CODES[self.state]

    def allow(self) -> bool:
        """Whether to send a request now. In half-open a True reserves a trial slot, which the
        caller must give back via record_success, record_failure or release."""
        state = self.state
        if state == CLOSED:
            return True
        if state == OPEN:
            return False
        if self._trials >= self.half_open_max:
            return False
        self._trials += 1
        return True

    def record_success(self) -> None:
        state = self.state
        if state == CLOSED:
            self._failures = 0  # the threshold counts *consecutive* failures
        elif state == HALF_OPEN:
            self._trials = max(0, self._trials - 1)
            self._successes += 1
            if self._successes >= self.success_threshold:
                self._state, self._failures = CLOSED, 0
        # Open: a late answer to a request sent before the breaker tripped proves nothing new.

    def record_failure(self) -> None:
        state = self.state
        if state == CLOSED:
            self._failures += 1
            if self._failures >= self.failure_threshold:
                self._trip()
        elif state == HALF_OPEN:
            self._trip()  # the replica is still broken: wait a full period again
        # Open: a late failure must not extend the wait, or a busy router could never recover.

    def release(self) -> None:
        """A trial ended with no verdict (e.g. the client went away): free its slot without
        counting it either way."""
        if self.state == HALF_OPEN:
            self._trials = max(0, self._trials - 1)

    def _trip(self) -> None:
        self._state, self._opened_at = OPEN, self._clock()
        self._failures = self._successes = self._trials = 0
