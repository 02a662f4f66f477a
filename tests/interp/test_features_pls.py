"""PLS: torch NIPALS against scikit-learn, planted value subspaces, held-out component choice."""

from __future__ import annotations

import tempfile
from pathlib import Path

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


def test_subspace_predict_equals_sklearn_and_direction_moves_the_prediction_by_one():
    cross = pytest.importorskip("sklearn.cross_decomposition")
    g = torch.Generator().manual_seed(11)
    x = torch.randn(300, 40, generator=g) @ torch.randn(40, 40, generator=g) + 3.0
    y = x[:, :4] @ torch.randn(4, generator=g) + 0.3 * torch.randn(300, generator=g)
    sub = pls_subspace(x, y, n_components=4)
    ref = cross.PLSRegression(4, scale=False, tol=1e-20, max_iter=100_000).fit(x.double().numpy(), y.double().numpy())
    expected = ref.predict(x.double().numpy()).ravel()
    scale = np.abs(expected).max()
    assert np.allclose(sub.predict(x).numpy(), expected, atol=1e-4 * scale)
    assert np.allclose(PLSRegression(4).fit(x, y).predict(x).numpy(), expected, atol=1e-8 * scale)
    # direction(): the smallest step that raises the prediction by exactly 1 (parallel to the coefficients)
    v = sub.direction()
    assert torch.allclose(sub.predict(x[:5] + v) - sub.predict(x[:5]), torch.ones(5), atol=1e-3)
    coef = torch.as_tensor(ref.coef_).reshape(-1).float()
    assert torch.allclose(v, coef / (coef @ coef), rtol=1e-3, atol=1e-6)
    # the value map and the prediction agree: a point set to value v is read as v
    for value in (-5.0, 0.0, 12.0):
        assert abs(sub.from_coords(sub.to_coords(value)).item() - value) < 1e-3
    saved = Subspace.load(sub.save(Path(tempfile.mkdtemp()) / "pls"))
    assert torch.allclose(saved.predict(x[:7]), sub.predict(x[:7]))
    with pytest.raises(InputError, match="direction\\(\\) needs a linear coordinate map"):
        Subspace(torch.eye(2, 40)).direction()


def test_components_are_chosen_beyond_eight_when_held_out_r2_keeps_rising():
    g = torch.Generator().manual_seed(12)
    n, d, k = 800, 96, 14
    factors = torch.randn(n, k, generator=g) * torch.linspace(8.0, 1.0, k)
    loadings, _ = torch.linalg.qr(torch.randn(d, k, generator=g))
    x = factors @ loadings.T + 0.05 * torch.randn(n, d, generator=g)
    y = factors @ torch.linspace(0.2, 3.0, k) + 0.1 * torch.randn(n, generator=g)  # small factors matter most
    sub = pls_subspace(x, y)
    r2 = sub.meta["held_out_r2"]
    assert sub.meta["max_components"] == 32 and len(r2) == 32
    assert sub.meta["n_components"] == k  # the planted number of factors, past the old cap of 8
    assert 1 - r2[k - 1] < 0.5 * (1 - r2[7])  # the held-out error still halves after 8 components


def test_components_past_the_rank_of_x_are_refused_or_never_chosen():
    """x of rank 3: a fourth component would be built from deflation's round-off (coefficients of 1e5 and a
    subspace that no longer predicts what PLS predicts), so it is refused; automatic choice stops at the rank."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(100, 3, generator=g) @ torch.randn(3, 20, generator=g)
    v = x[:, 0] + 0.1 * torch.randn(100, generator=g)
    with pytest.raises(InputError, match=r"rank 3 after centring; use n_components <= 3 \(got 6\)"):
        PLSRegression(6).fit(x, v)
    with pytest.raises(InputError, match="rank 3"):
        pls_subspace(x, v, n_components=6)
    assert PLSRegression(6).fit(x, v, up_to_rank=True).n_components_ == 3
    sub = pls_subspace(x, v)
    assert sub.meta["n_components"] <= 3
    r2 = sub.meta["held_out_r2"]
    assert r2[3:] == pytest.approx([r2[2]] * (len(r2) - 3))  # past the rank, nothing new is predicted
    assert float(sub.predict(sub.reconstruct(sub.to_coords(1.0))[None])) == pytest.approx(1.0, abs=1e-4)
    with pytest.raises(InputError, match="constant over its rows"):
        PLSRegression(1).fit(torch.ones(10, 4), torch.randn(10))


@pytest.mark.parametrize("n, d, groups", [(12, 20, None), (40, 30, [0] * 20 + list(range(1, 21)))])
def test_uneven_folds_cap_the_components_at_the_smallest_training_fold(n, d, groups):
    """12 rows in 5 folds leave 9 training rows in some folds and 10 in others; one group of 20 rows leaves a
    fold of 20. Neither may fail with an n_components error the caller never passed."""
    g = torch.Generator().manual_seed(0)
    x, v = torch.randn(n, d, generator=g), torch.randn(n, generator=g)
    sub = pls_subspace(x, v, groups=groups)
    smallest = n - max(len(f) for f in _folds(n, 5, groups, seed=0))
    assert len(sub.meta["held_out_r2"]) == min(d, smallest - 1)
