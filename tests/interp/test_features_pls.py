"""PLS: torch NIPALS against scikit-learn, planted value subspaces, held-out component choice."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from interp.errors import InputError
from interp.features.pls import PLSRegression, _folds, held_out_r2, pls_subspace
from interp.subspace import LinearMap, Subspace


@pytest.mark.parametrize("m", [1, 2])
def test_matches_sklearn(m):
    cross = pytest.importorskip("sklearn.cross_decomposition")
    g = torch.Generator().manual_seed(m)
    x = torch.randn(200, 24, generator=g) @ torch.randn(24, 24, generator=g)
    y = x[:, :3] @ torch.randn(3, m, generator=g) + 0.5 * torch.randn(200, m, generator=g)
    y = y[:, 0] if m == 1 else y
    ours = PLSRegression(3).fit(x, y)
    ref = cross.PLSRegression(3, scale=False, tol=1e-20, max_iter=100_000).fit(x.double().numpy(), y.double().numpy())
    assert np.allclose(ours.predict(x).numpy(),
                       ref.predict(x.numpy().astype(np.float64)).reshape(ours.predict(x).shape), atol=1e-6)
    # rotations agree up to the sign of each component
    r, rr = ours.x_rotations_.numpy(), ref.x_rotations_
    signs = np.sign((r * rr).sum(0))
    assert np.allclose(r * signs, rr, atol=1e-6)


@pytest.mark.parametrize("d_model", [64, 576])
def test_planted_value_direction_recovered(d_model):
    g = torch.Generator().manual_seed(d_model)
    u = torch.randn(d_model, generator=g)
    u = u / u.norm()
    values = torch.rand(400, generator=g) * 10
    acts = torch.randn(400, d_model, generator=g) + 2.0 * values[:, None] * u + 7.0  # R^2 ceiling ~ 33/34
    sub = pls_subspace(acts, values)
    assert isinstance(sub, Subspace) and isinstance(sub.coord_map, LinearMap)
    # the leading direction is the planted one; held-out R^2 is high
    assert abs(sub.basis[0] @ u) > 0.95
    assert max(sub.meta["held_out_r2"]) > 0.9
    # the map sends a value to where such activations sit, and back
    for v in (2.0, 8.0):
        near = acts[(values - v).abs() < 0.5].mean(0)
        assert (sub.to_coords(v) - sub.project(near)).norm() < 0.5 * (sub.to_coords(8.0) - sub.to_coords(2.0)).norm()
        assert abs(sub.from_coords(sub.to_coords(v)).item() - v) < 1e-3


def test_held_out_r2_chooses_more_components_when_needed():
    g = torch.Generator().manual_seed(7)
    n, d = 600, 64
    factors = torch.randn(n, 3, generator=g) * torch.tensor([6.0, 3.0, 1.0])
    loadings, _ = torch.linalg.qr(torch.randn(d, 3, generator=g))
    x = (factors @ loadings.T + 0.3 * torch.randn(n, d, generator=g)
         + torch.randn(n, 1, generator=g) @ torch.randn(1, d, generator=g) * 4)
    y = factors[:, 2] * 3 + factors[:, 0] * 0.2  # the small-variance factor drives y
    sub = pls_subspace(x, y, max_components=6)
    r2 = sub.meta["held_out_r2"]
    assert sub.meta["n_components"] >= 2
    assert r2[sub.meta["n_components"] - 1] > r2[0] + 0.1
    assert r2[sub.meta["n_components"] - 1] > 0.9
    assert sub.rank == sub.meta["n_components"]


def test_unrelated_target_has_no_held_out_skill():
    g = torch.Generator().manual_seed(8)
    x, y = torch.randn(300, 64, generator=g), torch.randn(300, generator=g)
    r2 = held_out_r2(x, y, 4)
    assert max(r2) < 0.05


def test_group_folds_keep_groups_apart():
    groups = [f"city{i % 37}" for i in range(300)]
    folds = _folds(300, 5, groups, seed=0)
    seen = [{groups[i] for i in f.tolist()} for f in folds]
    assert sum(len(f) for f in folds) == 300
    for a in range(5):
        for b in range(a + 1, 5):
            assert not seen[a] & seen[b]
    with pytest.raises(InputError, match="groups"):
        _folds(10, 5, ["a", "b"] * 5, seed=0)


def test_bad_inputs(unchecked):
    with pytest.raises(InputError, match="constant"):
        pls_subspace(torch.randn(50, 8), torch.ones(50))
    with unchecked(), pytest.raises(InputError, match=r"\[n, d_model\]"):
        pls_subspace(torch.randn(50, 8), torch.randn(49))
    with pytest.raises(InputError, match="n_components"):
        PLSRegression(20).fit(torch.randn(50, 8), torch.randn(50))
