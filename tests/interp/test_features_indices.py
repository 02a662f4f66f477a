"""Separability and epsilon-mixture indices, and circle scores, on planted 2-D clouds."""

from __future__ import annotations

import math

import pytest
import torch

from interp.errors import InputError
from interp.features.circles import circle_scores, fit_circle, same_cyclic_order
from interp.features.indices import mixture_index, reducibility, separability_index, whiten

N = 2000


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def circle(n=N, noise=0.1, seed=0):
    g = gen(seed)
    a = torch.rand(n, generator=g) * 2 * math.pi
    return torch.stack([a.cos(), a.sin()], 1) * 3 + noise * torch.randn(n, 2, generator=g)


def dense_independent(n=N, seed=1):
    g = gen(seed)
    src = torch.stack([torch.rand(n, generator=g), torch.randn(n, generator=g).exp()], 1)
    return src @ torch.tensor([[1.0, 0.4], [0.3, 1.0]])  # mixed by a linear map


def sparse_independent(n=N, seed=2):
    g = gen(seed)
    src = (torch.rand(n, 2, generator=g) < 0.3) * torch.rand(n, 2, generator=g) * 2
    return src @ torch.tensor([[1.0, 0.3], [0.2, 1.0]])


def test_circle_is_irreducible_on_both_indices():
    c, d, s = circle(), dense_independent(), sparse_independent()
    s_c, s_d, s_s = separability_index(c), separability_index(d), separability_index(s)
    m_c, m_d, m_s = mixture_index(c), mixture_index(d), mixture_index(s)
    # not separable: the mutual information stays high at every rotation
    assert s_c > 0.8 and s_d < 0.1 and s_s < 0.1
    # not a mixture: no line holds many points (sparse independent features sit on the axes)
    assert m_s > 0.5 and m_c < 0.3
    assert s_c * (1 - m_c) > 5 * max(s_d * (1 - m_d), s_s * (1 - m_s))


def test_mixture_index_finds_a_line_holding_half_the_points():
    g = gen(3)
    blob = torch.randn(N // 2, 2, generator=g)
    line = torch.stack([torch.randn(N // 2, generator=g), torch.full((N // 2,), 1.7)], 1)  # y = 1.7, off-centre
    m = mixture_index(torch.cat([blob, line]))
    assert m >= 0.5
    assert mixture_index(blob) < 0.2


def test_indices_are_invariant_to_affine_maps():
    c = circle()
    a = torch.tensor([[3.0, 1.0], [0.5, 0.2]])
    moved = c @ a + torch.tensor([10.0, -4.0])
    assert mixture_index(moved) == pytest.approx(mixture_index(c), abs=0.02)
    assert separability_index(moved) == pytest.approx(separability_index(c), abs=0.05)
    w = whiten(moved)
    assert torch.allclose(w.T @ w / len(w), torch.eye(2, dtype=w.dtype), atol=1e-8)


def test_reducibility_scores_each_pair_of_principal_components():
    g = gen(4)
    plane, _ = torch.linalg.qr(torch.randn(64, 3, generator=g))
    pts = circle() @ plane[:, :2].T + 0.5 * torch.randn(N, 1, generator=g) * plane[:, 2]
    out = reducibility(pts, n_pcs=3)
    assert [p["pcs"] for p in out] == [[0, 1], [1, 2]]
    assert out[0]["separability"] > 0.8 and out[0]["irreducibility"] > out[1]["irreducibility"]


def test_circle_scores():
    ring = circle(noise=0.05)
    blob = torch.randn(N, 2, generator=gen(5))
    r, b = circle_scores(ring), circle_scores(blob)
    assert r["radius_cv"] < 0.05 and r["angle_r2"] > 0.99
    assert 0.45 < b["radius_cv"] < 0.6  # Rayleigh: sqrt(4/pi - 1) = 0.523
    assert b["angle_r2"] < 0.85  # pi / 4 for a Gaussian
    fit = fit_circle(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]]) + 5)
    assert torch.allclose(fit.center, torch.tensor([5.0, 5.0])) and fit.radius == pytest.approx(1.0)
    line = torch.stack([torch.linspace(0, 1, 20), torch.zeros(20)], 1)
    assert fit_circle(line).method == "centroid"
    with pytest.raises(InputError, match="at least 3 points"):
        fit_circle(torch.zeros(2, 2))


def test_same_cyclic_order():
    days = list("MTWRFSU")
    assert same_cyclic_order(list("WRFSUMT"), days)
    assert same_cyclic_order(list("MUSFRWT"), days)  # reflected
    assert not same_cyclic_order(list("MWTRFSU"), days)


def test_bad_inputs(unchecked):
    with unchecked(), pytest.raises(InputError, match=r"\[n, 2\]"):
        separability_index(torch.randn(100, 3))
    with pytest.raises(InputError, match="at least 10"):
        mixture_index(torch.randn(5, 2))
    with pytest.raises(InputError, match="eps"):
        mixture_index(circle(), eps=0)
