"""The regression sweep against a scikit-learn loop (scaler, f_regression selection, Ridge)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import probes
from interp.errors import InputError
from probes.split import train_test_split


def planted(n=400, d=48, n_sites=3, seed=0):
    """Sites whose target depends on 3 planted neurons, more strongly at deeper sites."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randn(n, generator=g, dtype=torch.float64) * 5 + 100
    acts = {}
    for s in range(n_sites):
        x = torch.randn(n, d, generator=g, dtype=torch.float64) * torch.linspace(0.5, 3, d, dtype=torch.float64)
        for j, neuron in enumerate((3, 17, 40)):
            x[:, neuron] += (s + 1) * (0.3 + 0.2 * j) * (y - 100) / 5
        acts[f"blocks.{s}.hook_resid_post"] = x
    groups = [f"entity{i % 50}" for i in range(n)]
    return acts, y, groups


def test_regression_sweep_matches_a_scikit_learn_loop():
    feature_selection = pytest.importorskip("sklearn.feature_selection")
    linear_model = pytest.importorskip("sklearn.linear_model")
    preprocessing = pytest.importorskip("sklearn.preprocessing")
    metrics = pytest.importorskip("sklearn.metrics")
    acts, y, groups = planted()
    sizes = (1, 2, 4, 8, 48)
    res = probes.sweep_regression(acts, y, n_neurons=sizes, groups=groups, alpha=2.0, progress=False)
    assert res.metrics == ("r2", "spearman", "train_r2") and len(res.records) == 3 * len(sizes)
    train, test = train_test_split(len(y), 0.2, 0, groups=groups)
    tr, te = train.numpy(), test.numpy()
    for site, x in acts.items():
        xn, yn = x.numpy(), y.numpy()
        scaler = preprocessing.StandardScaler().fit(xn[tr])
        xs = scaler.transform(xn)
        f, _ = feature_selection.f_regression(xs[tr], yn[tr])
        order = np.argsort(-f, kind="stable")
        for size in sizes:
            ref = linear_model.Ridge(alpha=2.0).fit(xs[tr][:, order[:size]], yn[tr])
            r2 = metrics.r2_score(yn[te], ref.predict(xs[te][:, order[:size]]))
            rec = next(r for r in res.records if r["site"] == site and r["n_neurons"] == size)
            assert rec["r2"] == pytest.approx(r2, abs=1e-5)
            assert sorted(rec["neurons"]) == sorted(order[:size].tolist())
            coef = dict(zip(rec["neurons"], rec["coef"]))
            assert np.allclose([coef[i] for i in order[:size]], ref.coef_, atol=1e-5)
    # the planted structure: deeper sites predict better, and 3 neurons carry it
    best = res.best()
    assert best["site"] == "blocks.2.hook_resid_post" and best["r2"] > 0.7
    assert all(res.metric(s, 48, "r2") < best["r2"] for s in list(acts)[:2])
    assert set(res.best(n_neurons=4)["neurons"][:3]) == {3, 17, 40}
    assert "r2" not in res.table().splitlines()[0] and len(res.table().splitlines()) == 4


def test_regression_sweep_errors_and_config():
    acts, y, groups = planted(n=60)
    with pytest.raises(InputError, match="targets must be"):
        probes.sweep_regression(acts, y[:10], progress=False)
    with pytest.raises(InputError, match="alpha"):
        probes.RegressionSweepConfig(alpha=-1.0)
    with pytest.raises(InputError, match="constant target"):
        probes.sweep_regression(acts, torch.ones(60), progress=False)
    res = probes.sweep_regression(acts, y, n_neurons=(64, 2), progress=False)  # 64 > width 48: skipped
    assert {r["n_neurons"] for r in res.records} == {2}
    with pytest.raises(InputError, match="metric"):
        res.best(metric="f1")
