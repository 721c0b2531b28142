"""Whether proposed tokens pay for their verification, from measured step times.

A step of r rows takes t(r). Without speculation a batch of N decodes makes N tokens in t(N).
The j-th proposed token of a request adds a row, t(r + 1) - t(r) seconds, and yields a token
only if it and every proposal before it are accepted: alpha ** j tokens expected, alpha being
that request's acceptance rate. A row is worth adding while alpha ** j exceeds the tokens the
batch would make in that time, (t(r + 1) - t(r)) * N / t(N). On one stream verification rows
are cheap (a 4-bit CPU step of 2 rows costs ~1.15 of 1), so a modest rate pays; in a batch
that is already compute-bound each row costs about what a decode does, and only proposals
that are nearly sure to be accepted go ahead.

t(r) is an average of decode-only steps of r rows as they happen, trusted from MIN_SAMPLES
steps on; other counts are interpolated between the nearest trusted ones, or extrapolated past
the largest with the per-row slope of the two largest (a decode row in a batch costs about what
a verification row does), and never taken below the fastest step already seen with that count.
One refused row in EXPLORE_EVERY is verified anyway, so an average that a noisy moment inflated
gets measured again rather than turning speculation off for good.
"""
from __future__ import annotations

DECAY = 0.1  # weight of a new sample in a row count's running average
UNSEEN_ROW = 0.05  # per-row slope past the only trusted count: this fraction of its time
MIN_SAMPLES = 4
EXPLORE_EVERY = 64


class StepCosts:
    def __init__(self) -> None:
        self.seconds: dict[int, float] = {}  # trusted averages by row count
        self._pending: dict[int, list[float]] = {}  # first samples of a row count
        self.refusals = 0

    @property
    def rows_seen(self) -> set[int]:
        """Row counts with at least one measured step."""
        return set(self.seconds) | set(self._pending)

    def observe(self, rows: int, seconds: float) -> None:
        """A decode-only step of `rows` rows took `seconds`."""
        old = self.seconds.get(rows)
        if old is not None:
            # Capped: one step stalled by a neighbour on a shared machine moves it a little.
            self.seconds[rows] = old + DECAY * (min(seconds, 2 * old) - old)
            return
        first = self._pending.setdefault(rows, [])
        first.append(seconds)
        if len(first) >= MIN_SAMPLES:
            self.seconds[rows] = sorted(first)[len(first) // 2]
            del self._pending[rows]

    def time(self, rows: int) -> float | None:
        """Estimated seconds of a step of `rows` rows; None before any step was seen."""
        if rows in self.seconds:
            return self.seconds[rows]
        est = self._estimate(rows)
        first = self._pending.get(rows)
        if first:  # the least a few steps took: a stall among them does not count
            est = min(first) if est is None else max(est, min(first))
        return est

    def _estimate(self, rows: int) -> float | None:
        known = self.seconds
        below = max((r for r in known if r < rows), default=None)
        above = min((r for r in known if r > rows), default=None)
        if below is None and above is None:
            return None
        if above is None:
            prev = max((r for r in known if r < below), default=None)
            slope = (UNSEEN_ROW * known[below] if prev is None
                     else max(0.0, (known[below] - known[prev]) / (below - prev)))
            return known[below] + slope * (rows - below)
        if below is None:
            return known[above] * rows / above
        return known[below] + (known[above] - known[below]) * (rows - below) / (above - below)

    def worth(self, decodes: int, extra: int, k: int, alpha: float) -> int:
        """How many of k proposed tokens to verify for a request with acceptance rate `alpha`,
        in a step of `decodes` one-token rows to which `extra` proposal rows were already
        added."""
        base = self.time(decodes)
        if base is None:
            return k
        rate = decodes / base  # tokens a second without speculation
        for j in range(1, k + 1):
            rows = decodes + extra + j
            t, before = self.time(rows), self.time(rows - 1)
            if t is None or before is None:  # only first samples of other counts so far
                return k
            if alpha ** j < (t - before) * rate:
                self.refusals += 1
                return j if self.refusals % EXPLORE_EVERY == 0 else j - 1
        return k
