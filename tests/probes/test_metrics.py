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


@pytest.mark.parametrize("enc", [lambda v: 2 * v - 1, lambda v: v + 1], ids=["-1/1", "1/2"])
def test_labels_other_than_0_1_are_refused_not_scored(enc):
    """Labels of -1/1 gave a precision of 3.25 and an AUC of 2.0; 1/2 an AUC of NaN. 0/1 labels are scored."""
    from interp.errors import InputError

    y01 = torch.tensor([0, 1, 1, 0, 1, 0, 1, 1.0])
    score = torch.tensor([0.1, 0.9, 0.4, 0.3, 0.8, 0.6, 0.7, 0.2])
    pred = (score > 0.5).float()
    for fn, args in [(metrics.accuracy, (enc(y01), pred)), (metrics.precision, (enc(y01), pred)),
                     (metrics.recall, (y01, enc(pred))), (metrics.f1, (enc(y01), pred)),
                     (metrics.roc_auc, (enc(y01), score)), (metrics.classification_report, (enc(y01), score))]:
        with pytest.raises(InputError, match="must be 0/1.*encode_labels"):
            fn(*args)
    assert float(metrics.roc_auc(y01, score)) == pytest.approx(skm.roc_auc_score(y01.numpy(), score.numpy()))
    assert float(metrics.f1(y01, pred)) == pytest.approx(skm.f1_score(y01.numpy(), pred.numpy()))
