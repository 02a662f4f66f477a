"""The batched torch logistic regression reaches scikit-learn's optimum."""

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from interp.errors import InputError
from probes.logistic import balanced_weights, fit_logistic, predict_logits


def _data(n=600, k=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, k, generator=g) * torch.linspace(0.2, 3, k) + 1.0
    y = ((x[:, :3] @ torch.tensor([1.0, -2.0, 0.5]) + torch.randn(n, generator=g) * 2) > 1).float()
    return x, y


@pytest.mark.parametrize("solver", ["newton", "lbfgs"])
@pytest.mark.parametrize("balanced", [False, True])
def test_matches_sklearn_coefficients(solver, balanced):
    x, y = _data()
    cs = [0.01, 1.0]
    w = balanced_weights(y) if balanced else None
    coef, b = fit_logistic(x.expand(2, -1, -1).double(), y, C=torch.tensor(cs), sample_weight=w, solver=solver,
                           tol=1e-10 if solver == "newton" else 1e-7, max_iter=100)
    for i, c in enumerate(cs):
        ref = LogisticRegression(C=c, class_weight="balanced" if balanced else None, solver="newton-cholesky",
                                 tol=1e-10, max_iter=1000).fit(x.numpy(), y.numpy())
        tol = 1e-5 if solver == "newton" else 2e-3
        np.testing.assert_allclose(coef[i].numpy(), ref.coef_[0], atol=tol * (1 + np.abs(ref.coef_).max()))
        assert abs(float(b[i]) - ref.intercept_[0]) < tol * (1 + abs(ref.intercept_[0]))


def test_batch_problems_are_independent():
    x1, y1 = _data(seed=1)
    x2, y2 = _data(seed=2)
    both, bb = fit_logistic(torch.stack([x1, x2]), torch.stack([y1, y2]))
    alone, ba = fit_logistic(x2[None], y2)
    torch.testing.assert_close(both[1], alone[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(bb[1], ba[0], atol=1e-4, rtol=1e-4)


def test_warm_start_reaches_same_optimum():
    x, y = _data()
    cold, b0 = fit_logistic(x[None], y)
    warm, b1 = fit_logistic(x[None], y, init=(torch.ones(1, x.shape[1]), torch.zeros(1)))
    torch.testing.assert_close(cold, warm, atol=1e-4, rtol=1e-4)


def test_separable_data_stays_finite():
    x = torch.cat([torch.randn(50, 2) + 10, torch.randn(50, 2) - 10])
    y = torch.cat([torch.ones(50), torch.zeros(50)])
    coef, b = fit_logistic(x[None], y, C=1e4)
    assert torch.isfinite(coef).all() and torch.isfinite(b).all()
    assert ((predict_logits(x, coef[0], b[0]) > 0).float() == y).all()


def test_bad_inputs_raise(unchecked):
    x, y = _data()
    with unchecked(), pytest.raises(InputError, match=r"\[batch, n, k\]"):
        fit_logistic(x, y)
    with pytest.raises(InputError, match="0/1"):
        fit_logistic(x[None], y * 2)
    with pytest.raises(InputError, match="C must be > 0"):
        fit_logistic(x[None], y, C=0.0)
    with pytest.raises(InputError, match="solver"):
        fit_logistic(x[None], y, solver="sgd")


def test_logits_warm_start_and_zero_weight_rows():
    """fit_logistic_logits returns the fitted logits; init_logits and rows of weight 0 leave the optimum alone."""
    from probes.logistic import fit_logistic_logits

    x, y = _data(n=800, k=10)
    ref, rb = fit_logistic(x[None, :600], y[:600], tol=1e-9)
    w = torch.cat([torch.ones(600), torch.zeros(200)])  # the last rows carry no weight (a held-out split)
    coef, b, z = fit_logistic_logits(x[None], y, sample_weight=w, tol=1e-9)
    torch.testing.assert_close(coef, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(z, predict_logits(x[None], coef, b), atol=1e-5, rtol=1e-5)
    # warm start from the fit on the first 5 features, with its logits: same optimum as cold
    c5, b5, z5 = fit_logistic_logits(x[None, :600, :5], y[:600], tol=1e-9)
    init = (torch.cat([c5, torch.zeros(1, 5)], 1), b5)
    warm, wb, wz = fit_logistic_logits(x[None, :600], y[:600], init=init, init_logits=z5, tol=1e-9)
    torch.testing.assert_close(warm, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(wz, predict_logits(x[None, :600], warm, wb), atol=1e-5, rtol=1e-5)
    with pytest.raises(InputError, match="init_logits"):
        fit_logistic_logits(x[None], y, init_logits=z)


@pytest.mark.parametrize("hessian_rows", [None, 50, 300])
def test_subsampled_hessian_reaches_same_optimum(hessian_rows):
    x, y = _data(n=1200, k=20, seed=3)
    w = balanced_weights(y)
    ref, rb = fit_logistic(x[None].double(), y, sample_weight=w, tol=1e-10)
    coef, b = fit_logistic(x[None].double(), y, sample_weight=w, tol=1e-10, hessian_rows=hessian_rows)
    torch.testing.assert_close(coef, ref, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(b, rb, atol=1e-6, rtol=1e-6)
