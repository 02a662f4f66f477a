"""NaN and inf activations: every probe, every selection method and the sweep refuse them with one
line naming the rows (before, mutual_info and l1 ranked them silently and the fits failed in cholesky)."""

from __future__ import annotations

import pytest
import torch

from interp.errors import InputError
from probes import METHODS, LinearProbe, SparseProbe
from probes.ridge import RidgeProbe
from probes.selection import rank_neurons
from probes.sweep import sweep


def data(bad: float | None = None, n: int = 120, d: int = 10):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=g)
    y = (x[:, 2] > 0).long()
    if bad is not None:
        x[7, 3] = bad
        x[40, 0] = bad
    return x, y


BAD = [float("nan"), float("inf"), float("-inf")]
ROWS = r"holds 2 NaN or infinite values, in 2 rows \(first: \[7, 40\]"


@pytest.mark.parametrize("value", BAD)
@pytest.mark.parametrize("method", METHODS)
def test_sparse_probe_refuses_nonfinite_inputs_for_every_method(method, value):
    x, y = data()
    SparseProbe(n_neurons=2, method=method).fit(x, y)  # the clean data fits
    xb, _ = data(value)
    with pytest.raises(InputError, match=ROWS):
        SparseProbe(n_neurons=2, method=method).fit(xb, y)
    with pytest.raises(InputError, match=ROWS):
        rank_neurons(xb, y.float(), method)


@pytest.mark.parametrize("value", BAD)
def test_dense_probes_and_prediction_refuse_nonfinite_inputs(value):
    x, y = data()
    xb, _ = data(value)
    for probe in (LinearProbe(C=1.0), LinearProbe(), RidgeProbe()):
        target = y if not isinstance(probe, RidgeProbe) else x[:, 1]
        with pytest.raises(InputError, match=ROWS):
            probe.fit(xb, target)
        probe.fit(x, target)
        with pytest.raises(InputError, match=ROWS):
            probe.predict(xb)
    with pytest.raises(InputError, match="targets contain NaN"):
        RidgeProbe().fit(x, torch.where(torch.arange(len(x)) == 3, float("nan"), x[:, 1]))


@pytest.mark.parametrize("method", ["f_stat", "mutual_info"])
def test_sweep_refuses_nonfinite_inputs_and_names_dropped_sizes(method):
    x, y = data()
    xb, _ = data(float("nan"))
    with pytest.raises(InputError, match=r"site 'b' " + ROWS):
        sweep({"a": x, "b": xb}, y, n_neurons=(1, 2), method=method, progress=False)
    with pytest.warns(UserWarning, match=r"n_neurons \[16, 64\] exceed the 10 neurons of site\(s\) \['a'\]"):
        res = sweep({"a": x, "wide": torch.cat([x, x * 2, x + 1, x - 1, -x, x * 3, x / 2], 1)}, y,
                    n_neurons=(1, 16, 64), method=method, progress=False)
    assert {(r["site"], r["n_neurons"]) for r in res.records} == {("a", 1), ("wide", 1), ("wide", 16), ("wide", 64)}
    with pytest.raises(InputError, match=r"every size exceeds the width of every site \(10 neurons at most\)"):
        sweep({"a": x}, y, n_neurons=(16, 64), method=method, progress=False)
