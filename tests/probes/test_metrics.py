"""Metrics against scikit-learn and scipy, batched over leading dimensions."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import spearmanr
from sklearn import metrics as skm

from probes import metrics


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(-3, 3)), min_size=2, max_size=60))
def test_classification_metrics_match_sklearn(rows):
    y = np.array([r[0] for r in rows], dtype=float)
    score = np.array([r[1] for r in rows], dtype=float)  # integer scores: many ties
    pred = (score > 0).astype(float)
    yt, st_, pt = torch.tensor(y), torch.tensor(score), torch.tensor(pred)
    assert metrics.accuracy(yt, pt).item() == pytest.approx(skm.accuracy_score(y, pred))
    assert metrics.precision(yt, pt).item() == pytest.approx(skm.precision_score(y, pred, zero_division=0))
    assert metrics.recall(yt, pt).item() == pytest.approx(skm.recall_score(y, pred, zero_division=0))
    assert metrics.f1(yt, pt).item() == pytest.approx(skm.f1_score(y, pred, zero_division=0))
    auc = metrics.roc_auc(yt, st_).item()
    if 0 < y.sum() < len(y):
        assert auc == pytest.approx(skm.roc_auc_score(y, score), abs=1e-6)
    else:
        assert np.isnan(auc)


def test_regression_metrics_and_batching():
    g = torch.Generator().manual_seed(0)
    y = torch.randn(3, 50, generator=g)
    pred = y + 0.5 * torch.randn(3, 50, generator=g)
    r2 = metrics.r2(y, pred)
    rho = metrics.spearman(y, pred)
    assert r2.shape == rho.shape == (3,)
    for i in range(3):
        assert r2[i].item() == pytest.approx(skm.r2_score(y[i].numpy(), pred[i].numpy()), abs=1e-5)
        assert rho[i].item() == pytest.approx(spearmanr(y[i].numpy(), pred[i].numpy()).statistic, abs=1e-5)
    assert metrics.r2(y[0], y[0].mean().expand(50)).item() == pytest.approx(0.0, abs=1e-6)  # the mean scores 0


def test_r2_on_a_constant_target_is_what_scikit_learn_gives():
    y = torch.full((2, 20), 3.0)
    pred = torch.stack([y[0], y[1] + torch.linspace(-1, 1, 20)])
    got = metrics.r2(y, pred)
    assert got.tolist() == [skm.r2_score(y[0].numpy(), pred[0].numpy()), skm.r2_score(y[1].numpy(), pred[1].numpy())]
    assert got.tolist() == [1.0, 0.0]
