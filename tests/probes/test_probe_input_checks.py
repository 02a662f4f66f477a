"""Bad labels, weights and hyperparameters: every probe entry point refuses them with one line.

Before: rank_neurons ranked neurons in index order (0, 1, 2, ...) for a NaN label or weight, ranked
wrongly for labels other than 0/1 and failed on numpy labels; fit_logistic returned NaN or zero
coefficients for inf inputs or weights and accepted negative weights; a NaN ``C`` or ``alpha`` ended
in a cholesky error or a NaN probe; ``SweepResult.best`` returned a record with a NaN metric.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import probes
from interp.errors import InputError
from probes import METHODS, LinearProbe, RidgeProbe, SparseProbe, fit_logistic, rank_neurons
from probes.results import SweepRecord, SweepResult


def data(n: int = 120, d: int = 8):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = (x[:, 3] + 0.5 * torch.randn(n, generator=g, dtype=torch.float64) > 0).long()
    x[:, 3] += 0.5 * y  # neuron 3 separates the classes best
    x[:, 5] -= 0.3 * y  # neuron 5 second
    return x, y


def one_line(excinfo, *fragments: str) -> None:
    msg = str(excinfo.value)
    assert "\n" not in msg, msg
    for f in fragments:
        assert f in msg, msg


# --- 1. non-finite labels and weights ------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_rank_neurons_refuses_nan_label(method):
    x, y = data()
    yb = y.double().clone()
    yb[7] = float("nan")
    with pytest.raises(InputError) as e:
        rank_neurons(x, yb, method)
    one_line(e, "labels hold NaN", "[7]")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1.0])
@pytest.mark.parametrize("method", METHODS)
def test_rank_neurons_refuses_bad_sample_weight(method, bad, unchecked):
    x, y = data()
    y = y.double()
    w = torch.ones(len(y), dtype=torch.float64)
    w[4] = bad
    with pytest.raises(InputError) as e:
        rank_neurons(x, y, method, sample_weight=w)
    one_line(e, "sample_weight holds 1 NaN, infinite or negative values")
    with unchecked(), pytest.raises(InputError, match="one weight per example"):
        rank_neurons(x, y, method, sample_weight=torch.ones(5))
    with pytest.raises(InputError, match="0 for every example"):
        rank_neurons(x, y, method, sample_weight=torch.zeros(len(y)))


@pytest.mark.parametrize("solver", ["newton", "lbfgs"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_fit_logistic_refuses_nonfinite_x(solver, bad):
    x, y = data()
    x[9, 2] = bad
    with pytest.raises(InputError) as e:
        fit_logistic(x[None], y.double(), solver=solver)
    one_line(e, "x holds 1 NaN or infinite values", "[9]")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1.0])
def test_fit_logistic_refuses_bad_weights(bad):
    x, y = data()
    w = torch.ones(len(y), dtype=torch.float64)
    w[:3] = bad
    with pytest.raises(InputError) as e:
        fit_logistic(x[None], y.double(), sample_weight=w)
    one_line(e, "sample_weight holds 3 NaN, infinite or negative values")
    w[:3] = 0.0  # zero weights stay allowed (held-out rows of a CV fold)
    coef, b = fit_logistic(x[None], y.double(), sample_weight=w)
    assert torch.isfinite(coef).all() and torch.isfinite(b).all()


# --- 2. label values ------------------------------------------------------------------------------


def _encodings(y):
    yn = y.numpy()
    return {
        "1/2": torch.tensor(yn + 1.0), "-1/+1": torch.tensor(2.0 * yn - 1), "0/0.5": torch.tensor(yn * 0.5),
        "-1/+1 int": torch.tensor(2 * yn - 1), "bool": torch.tensor(yn.astype(bool)), "numpy": yn,
        "numpy float": yn.astype(np.float32), "list": yn.tolist(), "strings": np.where(yn == 1, "yes", "no"),
    }


@pytest.mark.parametrize("method", METHODS)
def test_rank_neurons_maps_any_two_labels_like_sparse_probe(method):
    """Any two values rank as 0/1 (the larger is the positive class, as SparseProbe and sweep map them)."""
    x, y = data()
    ref = rank_neurons(x, y.float(), method)
    assert ref[0] == 3
    for name, yy in _encodings(y).items():
        got = rank_neurons(x, yy, method)
        assert torch.equal(got, ref), (name, got.tolist(), ref.tolist())
    assert torch.equal(rank_neurons(x.numpy(), y.numpy(), method), ref)  # numpy activations too
    assert SparseProbe(1, method=method).fit(x, 2 * y - 1).support_.tolist() == [3]


def test_rank_neurons_refuses_a_single_class_or_three():
    x, y = data()
    with pytest.raises(InputError) as e:
        rank_neurons(x, torch.zeros(len(y)), "f_stat")
    one_line(e, "exactly 2 classes; got 1")
    with pytest.raises(InputError) as e:
        rank_neurons(x, torch.arange(len(y)) % 3, "mutual_info")
    one_line(e, "exactly 2 classes; got 3")


# --- 3. hyperparameters ---------------------------------------------------------------------------

NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("alphas", [[NAN], [1.0, NAN], [INF], [1.0, -2.0], []])
def test_ridge_refuses_nonfinite_or_nonpositive_alphas(alphas):
    x, _ = data()
    with pytest.raises(InputError) as e:
        RidgeProbe(alphas=alphas).fit(x, x[:, 0] + x[:, 1])
    one_line(e, "must be a non-empty list of finite positive values")


@pytest.mark.parametrize("alpha", [NAN, INF, -1.0])
def test_sweep_regression_refuses_nonfinite_alpha(alpha):
    x, _ = data()
    with pytest.raises(InputError) as e:
        probes.sweep_regression({"a": x}, x[:, 0], n_neurons=(1,), alpha=alpha, progress=False)
    one_line(e, "alpha=", "must be a finite number >= 0")
    probes.RegressionSweepConfig(alpha=0)  # 0: least squares


@pytest.mark.parametrize("c", [NAN, INF, 0.0, -1.0])
def test_every_C_refuses_nonfinite_or_nonpositive(c):
    x, y = data()
    fits = {
        "LinearProbe": lambda: LinearProbe(C=c).fit(x, y),
        "LinearProbe Cs": lambda: LinearProbe(Cs=[1.0, c]).fit(x, y),
        "SparseProbe": lambda: SparseProbe(2, C=c).fit(x, y),
        "SweepConfig": lambda: probes.SweepConfig(C=c),
        "sweep": lambda: probes.sweep({"a": x}, y, n_neurons=(1,), C=c, progress=False),
        "fit_logistic": lambda: fit_logistic(x[None], y.double(), C=c),
        "fit_logistic batch": lambda: fit_logistic(x.expand(2, -1, -1), y.double(), C=torch.tensor([1.0, c])),
        "rank_neurons": lambda: rank_neurons(x, y.double(), "adaptive", C=c),
    }
    for name, fit in fits.items():
        with pytest.raises(InputError) as e:
            fit()
        one_line(e, "C")
        msg = str(e.value)
        assert "finite" in msg and ("> 0" in msg or "positive" in msg), (name, msg)


# --- 4. SweepResult.best with NaN metrics ---------------------------------------------------------


def _result(values):
    res = SweepResult(config=None, classes=[], sites=["a", "b", "c"], n_train=1, n_test=1,
                      metrics=probes.results.REGRESSION_METRICS)
    for (site, n), v in values.items():
        res.records.append(SweepRecord(site=site, n_neurons=n, method="correlation", r2=0.0, spearman=v, train_r2=0.0))
    return res


def test_best_skips_nan_records():
    res = _result({("a", 1): NAN, ("a", 2): NAN, ("b", 1): 0.3, ("b", 2): 0.6, ("c", 1): 0.5})
    best = res.best(metric="spearman")
    assert (best["site"], best["n_neurons"]) == ("b", 2)
    assert res.best(n_neurons=1, metric="spearman")["site"] == "c"
    with pytest.raises(InputError) as e:
        _result({("a", 1): NAN, ("b", 1): NAN}).best(metric="spearman")
    one_line(e, "spearman=NaN")
    with pytest.raises(InputError) as e:
        _result({("a", 2): NAN, ("b", 1): 0.3}).best(n_neurons=2, metric="spearman")
    one_line(e, "at n_neurons=2", "spearman=NaN")


def test_best_of_a_real_sweep_with_a_dead_site():
    g = torch.Generator().manual_seed(0)
    y = torch.randn(200, generator=g, dtype=torch.float64)
    good = torch.randn(200, 4, generator=g, dtype=torch.float64)
    good[:, 2] += 2 * y
    res = probes.sweep_regression({"dead": torch.zeros(200, 4), "good": good}, y, n_neurons=(1, 2), progress=False)
    assert math.isnan(res.metric("dead", 1, "spearman"))
    assert res.best(metric="spearman")["site"] == "good"


# --- 5. one line instead of a traceback -----------------------------------------------------------


def test_probes_refuse_zero_columns():
    x, y = data()
    for fit in (lambda: LinearProbe(C=1.0).fit(x[:, :0], y), lambda: LinearProbe().fit(x[:, :0], y),
                lambda: SparseProbe(1).fit(x[:, :0], y), lambda: RidgeProbe().fit(x[:, :0], x[:, 0])):
        with pytest.raises(InputError) as e:
            fit()
        one_line(e, "X has no columns (shape (120, 0))")
    assert rank_neurons(x[:, :0], y).shape == (0,)  # nothing to rank: the empty ranking


@pytest.mark.parametrize("targets", [["a"] * 120, [object()] * 120])
def test_regression_refuses_non_numeric_targets(targets, unchecked):
    x, _ = data()
    for fit in (lambda: RidgeProbe().fit(x, targets),
                lambda: probes.sweep_regression({"a": x}, targets, n_neurons=(1,), progress=False)):
        with unchecked(), pytest.raises(InputError) as e:
            fit()
        one_line(e, "targets must be numbers")


@pytest.mark.parametrize("ranking, fragment", [
    ([9, 3], "outside the 8 columns"), ([3, -1], "outside the 8 columns"), ([3, 3], "repeats"),
    ([3], "holds 1 neurons; n_neurons=2"), ([3.0, 5.0], "integer column indices"),
    ([[3, 5]], "integer column indices"),
])
def test_sparse_probe_validates_a_given_ranking(ranking, fragment, unchecked):
    x, y = data()
    with unchecked(), pytest.raises(InputError) as e:
        SparseProbe(2).fit(x, y, ranking=ranking)
    one_line(e, fragment)
    assert SparseProbe(2).fit(x, y, ranking=[5, 3]).support_.tolist() == [5, 3]


@pytest.mark.parametrize("labels, fragment", [
    ([0, None] * 60, "labels hold None or NaN in 60 rows (first: [1, 3, 5, 7, 9])"),
    ([0, {"a": 1}] * 60, "labels mix values of types ['dict', 'int']"),
    ([0.0, NAN] * 60, "labels hold NaN or infinite values in 60 rows"),
])
def test_labels_with_missing_or_mixed_values(labels, fragment):
    x, _ = data()
    for fit in (lambda: SparseProbe(1).fit(x, labels), lambda: LinearProbe(C=1.0).fit(x, labels),
                lambda: probes.sweep({"a": x}, labels, n_neurons=(1,), progress=False),
                lambda: rank_neurons(x, labels)):
        with pytest.raises(InputError) as e:
            fit()
        one_line(e, fragment)
