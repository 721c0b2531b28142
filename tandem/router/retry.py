"""When and how long to wait before retrying a request on another replica.

A retry is only safe before the client has seen anything: once a byte of a response (a stream
in particular) went out, replaying it would duplicate or garble what the client received.
"""
from __future__ import annotations

import math
import random
import re

# Overloaded (429) or a gateway/replica that is down or restarting: another replica may be fine.
RETRYABLE_STATUS = frozenset({429, 502, 503, 504})

# RFC 9110 delay-seconds is 1*DIGIT; fractions are accepted since some servers send them.
# ASCII only, so float() never sees "nan", "inf", signs or non-Latin digits.
_SECONDS = re.compile(r"[0-9]+(?:\.[0-9]+)?")


def is_retryable(status: int | None, bytes_sent_to_client: int) -> bool:
    """`status` None means no response at all (connection refused, reset, timeout)."""
    if bytes_sent_to_client > 0:
        return False
    return status is None or status in RETRYABLE_STATUS


class Backoff:
    """Exponential backoff with "full jitter" (uniform in [0, min(cap, base * factor**attempt)]),
    so many clients retrying after the same outage spread out instead of arriving together."""

    def __init__(self, base: float = 0.05, factor: float = 2.0, cap: float = 1.0,
                 rng: random.Random | None = None):
        if not (math.isfinite(base) and base > 0):
            raise ValueError(f"base must be finite and > 0, got {base}")
        if not (math.isfinite(factor) and factor >= 1):
            raise ValueError(f"factor must be finite and >= 1, got {factor}")
        if not (math.isfinite(cap) and cap > 0):
            raise ValueError(f"cap must be finite and > 0, got {cap}")
        self.base, self.factor, self.cap = base, factor, cap
        self._rng = rng if rng is not None else random.Random()

    def delay(self, attempt: int) -> float:
        """Seconds to wait before retry number `attempt` (0 for the first retry)."""
        if attempt < 0:
            raise ValueError(f"attempt must be >= 0, got {attempt}")
        try:
            ceiling = min(self.cap, self.base * self.factor ** attempt)
        except OverflowError:  # factor**attempt beyond float range: long past the cap anyway
            ceiling = self.cap
        return self._rng.uniform(0.0, ceiling)


def retry_after_seconds(header: str | None, cap: float) -> float | None:
    """A Retry-After header in seconds, clamped to [0, cap] so a replica cannot stall the router.
    HTTP-date forms and junk give None: the caller falls back to its own backoff."""
    if not cap >= 0:
        raise ValueError(f"cap must be >= 0, got {cap}")
    if header is None:
        return None
    text = header.strip()
    if not _SECONDS.fullmatch(text):
        return None
    return min(max(float(text), 0.0), cap)
