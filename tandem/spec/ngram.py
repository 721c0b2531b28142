"""Prompt-lookup proposals: the longest suffix n-gram of a request's tokens that occurred
earlier in them proposes the tokens that followed its latest earlier occurrence."""
from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


def propose_ngram(tokens: list[int], k: int, n_min: int, n_max: int) -> list[int]:
    """Up to `k` proposed next tokens; [] when no suffix of n_min..n_max tokens recurs."""
    size = len(tokens)
    if k < 1 or size <= n_min:
        return []
    arr = np.asarray(tokens, dtype=np.int64)
    for n in range(min(n_max, size - 1), n_min - 1, -1):
        # Windows starting at 0 .. size-n-1: each has a token after it, and none is the
        # suffix itself.
        windows = sliding_window_view(arr[:-1], n)
        hits = np.flatnonzero((windows == arr[-n:]).all(axis=1))
        if hits.size:
            start = int(hits[-1]) + n
            return arr[start:start + k].tolist()
    return []
