"""The test suite runs with the annotations of interp, saes and probes checked (see tests/conftest.py).

Unchecked, each wrong call below would broadcast or compute in integers without a word, or fail with
a plain TypeError deep inside, so these tests fail if the checking is switched off.
"""

from __future__ import annotations

import pytest
import torch
from jaxtyping import TypeCheckError

from interp import Subspace
from interp.features.indices import mixture_index
from probes import accuracy
from saes import explained_variance


def test_a_dimension_bound_by_one_argument_is_enforced_on_the_next():
    x = torch.randn(4, 8)
    assert isinstance(explained_variance(x, x + 0.1), float)
    with pytest.raises(TypeCheckError, match="x_hat"):
        explained_variance(x, torch.randn(1, 8))  # [1, 8] would broadcast against [4, 8]


def test_variadic_batch_dimensions_must_agree():
    y = torch.ones(2, 5)
    assert accuracy(y, y).shape == (2,)
    with pytest.raises(TypeCheckError, match="pred"):
        accuracy(y, torch.ones(5))  # [5] would broadcast against [2, 5]


def test_dtype_is_checked_on_methods():
    s = Subspace(torch.randn(2, 8))
    assert s.project(torch.randn(3, 8)).shape == (3, 2)
    with pytest.raises(TypeCheckError):
        s.project(torch.ones(3, 8, dtype=torch.long))  # Float[...] rejects an integer tensor


def test_an_int_passes_for_a_float_as_in_pep_484_but_a_string_does_not():
    points = torch.randn(50, 2, generator=torch.Generator().manual_seed(0))
    assert mixture_index(points, eps=1) == mixture_index(points, eps=1.0)
    with pytest.raises(TypeCheckError, match="eps"):
        mixture_index(points, eps="1")
