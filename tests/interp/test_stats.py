"""The exact two-sided sign test used by the benchmarks and experiments."""

import math

import pytest

from interp.stats import sign_test


def test_sign_test_matches_the_binomial_tails():
    assert sign_test(5, 10) == 1.0  # the middle is never significant
    assert sign_test(10, 10) == sign_test(0, 10) == 2 / 2 ** 10
    assert sign_test(18, 20) == pytest.approx(2 * sum(math.comb(20, i) for i in range(3)) / 2 ** 20)
    assert sign_test(18, 20) == pytest.approx(4.02e-4, rel=1e-2)  # the figure the MP-SAE write-up quotes
    assert sign_test(29, 40) == pytest.approx(6.4e-3, rel=2e-2)
    with pytest.raises(ValueError, match="wins"):
        sign_test(11, 10)
