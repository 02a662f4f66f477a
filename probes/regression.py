"""Sweep sparse regression probes over every site and probe size: R^2 of a numeric target.

>>> result = sweep_regression({"blocks.3.hook_resid_post": x3, "blocks.9.hook_resid_post": x9}, years,
...                           n_neurons=(1, 4, 16, 64), groups=entity_ids)
>>> print(result.table())             # held-out R^2, one row per site, one column per n_neurons
>>> result.best()                     # the record with the best held-out R^2

The regression counterpart of :func:`probes.sweep`: one train/test split (by group when ``groups``
are given: an entity never sits on both sides) shared by every site and probe size; per site, the
neurons are standardised on the training rows and ranked by the absolute correlation of each with
the target (the order of scikit-learn's ``f_regression``); the probe with ``n`` neurons is a ridge
regression (penalty ``alpha``, intercept unpenalised) on the ``n`` best-ranked. Records carry
``site``, ``n_neurons``, ``method`` (``"correlation"``), test ``r2`` and ``spearman``, ``train_r2``,
``neurons`` (the support, best first) and ``coef`` (on standardised neurons), in a
:class:`probes.SweepResult` whose ``metrics`` are ``("r2", "spearman", "train_r2")``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from interp.errors import InputError
from probes.metrics import regression_report
from probes.results import REGRESSION_METRICS, SweepRecord, SweepResult
from probes.split import as_target, standardize_stats, train_test_split
from probes.sweep import DEFAULT_N_NEURONS, _as_sites, probe_sizes


@dataclass(frozen=True, kw_only=True)
class RegressionSweepConfig:
    """How :func:`sweep_regression` splits, selects and fits."""

    n_neurons: tuple[int, ...] = DEFAULT_N_NEURONS
    """Probe sizes to fit (neurons per probe), stored sorted and without repeats; sizes above a site's
    width are skipped for that site."""
    alpha: float = 1.0
    """Ridge penalty on the standardised neurons (scikit-learn's ``Ridge(alpha=)``)."""
    test_size: float = 0.2
    """Fraction of examples (or of groups, when groups are given) held out for testing."""
    seed: int = 0
    """Seed of the train/test split."""
    standardize: bool = True
    """Scale every neuron to zero mean and unit variance on the training rows."""
    device: str | None = None
    """Where to compute (e.g. "cuda"); None: where the activations are."""

    def __post_init__(self):
        object.__setattr__(self, "n_neurons", probe_sizes(self.n_neurons))
        try:
            alpha = float(self.alpha)
        except (TypeError, ValueError):
            alpha = math.nan
        if not (math.isfinite(alpha) and alpha >= 0):
            raise InputError(f"alpha={self.alpha!r} must be a finite number >= 0 (0: least squares), e.g. 1.0")
        if not 0 < self.test_size < 1:
            raise InputError(f"test_size={self.test_size} must be in (0, 1)")


def _fit_site(x: Tensor, y: Tensor, train: Tensor, test: Tensor, cfg: RegressionSweepConfig, name: str,
              result: SweepResult) -> None:
    x = x.to(torch.float64)
    x_tr, y_tr = x[train], y[train]
    if cfg.standardize:
        mean, std = standardize_stats(x_tr)
        x, x_tr = (x - mean) / std, (x_tr - mean) / std
    xc = x_tr - x_tr.mean(0)
    yc = y_tr - y_tr.mean()
    denom = xc.norm(dim=0) * yc.norm()
    corr = torch.where(denom > 0, (xc.T @ yc) / denom.clamp_min(1e-300), torch.zeros_like(denom))
    ranking = torch.argsort(corr.abs(), descending=True, stable=True)
    result.rankings[name] = ranking.cpu()
    for size in cfg.n_neurons:
        if size > x.shape[1]:
            continue
        idx = ranking[:size]
        a = xc[:, idx]
        gram = a.T @ a + cfg.alpha * torch.eye(size, dtype=a.dtype, device=a.device)
        coef = torch.linalg.lstsq(gram, a.T @ yc).solution  # lstsq: alpha = 0 with collinear neurons
        intercept = y_tr.mean() - x_tr[:, idx].mean(0) @ coef
        pred_te = x[test][:, idx] @ coef + intercept
        pred_tr = x_tr[:, idx] @ coef + intercept
        rep = regression_report(y[test], pred_te)
        rec = SweepRecord(site=name, n_neurons=size, method="correlation")
        rec.update({k: float(v) for k, v in rep.items()})
        rec["train_r2"] = float(regression_report(y_tr, pred_tr)["r2"])
        rec["neurons"] = idx.tolist()
        rec["coef"] = [round(float(c), 6) for c in coef]
        result.records.append(rec)


def sweep_regression(
    activations_by_site: Mapping[str, Float[Tensor, "n d"]] | Float[Tensor, "site n d"],
    values,
    n_neurons: Sequence[int] | None = None,
    *,
    groups=None,
    config: RegressionSweepConfig | None = None,
    progress: bool = True,
    **options,
) -> SweepResult:
    """Fit sparse ridge probes of a numeric target for every site and probe size.

    Args:
        activations_by_site: ``{site name: [n, d]}``, a list of ``[n, d]``, or a ``[site, n, d]`` tensor.
        values: one real-valued target per example (a year, a latitude, a count).
        n_neurons: probe sizes; None: ``config.n_neurons`` (:data:`probes.DEFAULT_N_NEURONS`).
        groups: one id per example (document, entity); whole groups go to train or test.
        config: a :class:`RegressionSweepConfig`; keyword options (``alpha``, ``seed`` ...) build one
            or replace its fields.

    Returns a :class:`probes.SweepResult` with ``metrics = ("r2", "spearman", "train_r2")``.
    """
    if n_neurons is not None:
        options["n_neurons"] = tuple(n_neurons)
    config = RegressionSweepConfig(**options) if config is None else dataclasses.replace(config, **options)
    sites = _as_sites(activations_by_site)
    n = next(iter(sites.values())).shape[0]
    y = as_target(values, n)
    train, test = train_test_split(n, config.test_size, config.seed, groups=groups)
    if len(test) < 2 or float(y[test].std()) == 0 or float(y[train].std()) == 0:
        raise InputError(f"the split gives {len(train)} training and {len(test)} test rows with a constant target "
                         "on one side; R^2 needs a varying target on both: add examples or change test_size")
    result = SweepResult(config=config, classes=[], sites=list(sites), n_train=len(train), n_test=len(test),
                         metrics=REGRESSION_METRICS)
    for name, x in tqdm(sites.items(), desc="regression sweep", unit="site", disable=not progress):
        device = torch.device(config.device) if config.device else x.device
        _fit_site(x.to(device), y.to(device), train.to(device), test.to(device), config, name, result)
    result.records.sort(key=lambda r: (result.sites.index(r["site"]), r["n_neurons"]))
    return result
