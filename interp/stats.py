"""Small statistics shared by the benchmarks and experiments."""

from __future__ import annotations

import math


def sign_test(wins: int, n: int) -> float:
    """Two-sided exact sign-test p-value for ``wins`` successes in ``n`` paired comparisons (no ties)."""
    if not 0 <= wins <= n:
        raise ValueError(f"sign_test needs 0 <= wins <= n; got wins={wins}, n={n}")
    k = min(wins, n - wins)
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n)
