"""``RidgeProbe``: a linear probe for continuous targets (a year, a coordinate) with the ridge
penalty chosen by cross-validation.

>>> probe = RidgeProbe().fit(x_train, years_train, groups=entity_ids)   # folds by entity
>>> probe.alpha_, probe.evaluate(x_test, years_test)                    # {'r2', 'spearman'}

Without ``cv`` the penalty is chosen by exact leave-one-out error, computed for every alpha from
one SVD (as scikit-learn's ``RidgeCV``). With repeated entities, leave-one-out leaks: pass ``cv``
and ``groups`` so that whole entities are held out.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from interp.errors import InputError
from probes.metrics import regression_report
from probes.split import as_features, as_target, fold_ids, log_grid, positive_values, standardize_stats

DEFAULT_ALPHAS = tuple(log_grid(1e-2, 1e5, 15))
"""Ridge penalties ``RidgeProbe`` chooses from."""


def _svd_errors(x: Tensor, y: Tensor, alphas: Tensor, x_eval: Tensor | None = None, y_eval: Tensor | None = None):
    """Fit ridge for every alpha from one SVD of centred x.

    Returns ``(coef [n_alpha, d], intercept [n_alpha], err [n_alpha])`` where err is the mean squared
    leave-one-out error on (x, y), or the mean squared error on (x_eval, y_eval) when given.
    """
    xm, ym = x.mean(0), y.mean()
    xc, yc = x - xm, y - ym
    u, s, vh = torch.linalg.svd(xc, full_matrices=False)
    uty = u.T @ yc  # [r]
    shrink = s[None, :] / (s[None, :] ** 2 + alphas[:, None])  # [n_alpha, r]
    coef = (shrink * uty) @ vh  # [n_alpha, d]
    intercept = ym - coef @ xm
    if x_eval is None:
        fitted = (u * (s ** 2 * uty)) @ (1 / (s[:, None] ** 2 + alphas[None, :]))  # [n, n_alpha]
        h = (u ** 2 * s ** 2) @ (1 / (s[:, None] ** 2 + alphas[None, :])) + 1 / x.shape[0]
        err = (((yc[:, None] - fitted) / (1 - h).clamp(min=1e-12)) ** 2).mean(0)
    else:
        pred = x_eval @ coef.T + intercept
        err = ((y_eval[:, None] - pred) ** 2).mean(0)
    return coef, intercept, err


class RidgeProbe:
    """Ridge regression probe on ``[n, d]`` features.

    Args:
        alphas: candidate ridge penalties (on standardised features when ``standardize``).
        cv: None for efficient leave-one-out, or a number of folds (by group when ``fit`` gets groups).
        standardize: scale every feature to zero mean and unit variance on the training set.
        seed: seed of the folds.

    Fitted attributes: ``coef_`` ``[d]``, ``intercept_``, ``alpha_``, ``cv_errors_`` (mean squared
    held-out error per alpha), ``mean_``, ``scale_``.
    """

    def __init__(self, alphas: Sequence[float] = DEFAULT_ALPHAS, *, cv: int | None = None,
                 standardize: bool = True, seed: int = 0):
        self.alphas = alphas
        self.cv = cv
        self.standardize = standardize
        self.seed = seed

    def fit(self, X: Float[Tensor, "n d"], y: Float[Tensor, " n"], groups=None) -> RidgeProbe:
        """Choose alpha and fit on (X, y); `groups` keeps each group within one fold (needs ``cv``)."""
        x = as_features(X).double()
        t = as_target(y, x.shape[0])
        alphas = torch.tensor(positive_values(self.alphas, "alphas", [0.1, 1.0, 10.0]), dtype=torch.float64)
        if groups is not None and self.cv is None:
            raise InputError("groups are only used by k-fold CV: pass cv=5 (or another fold count) with groups")
        if x.shape[0] < 3:
            raise InputError(f"a ridge probe needs at least 3 examples; got {x.shape[0]}")
        if self.standardize:
            mean, scale = standardize_stats(x)
            self.mean_, self.scale_ = mean[0], scale[0]
        else:
            self.mean_, self.scale_ = torch.zeros(x.shape[1], dtype=x.dtype), torch.ones(x.shape[1], dtype=x.dtype)
        xs = (x - self.mean_) / self.scale_
        if self.cv is None:
            _, _, err = _svd_errors(xs, t, alphas)
        else:
            folds = fold_ids(x.shape[0], self.cv, self.seed, groups)
            err = torch.zeros_like(alphas)
            for f in range(self.cv):
                tr, te = folds != f, folds == f
                err += _svd_errors(xs[tr], t[tr], alphas, xs[te], t[te])[2] * te.sum() / x.shape[0]
        best = int(err.argmin())
        self.alpha_ = float(alphas[best])
        self.cv_errors_ = {float(a): float(e) for a, e in zip(alphas, err)}
        coef, intercept, _ = _svd_errors(xs, t, alphas[best:best + 1])
        self.coef_, self.intercept_ = coef[0], float(intercept[0])
        return self

    def predict(self, X: Float[Tensor, "n d"]) -> Float[Tensor, " n"]:
        """Predicted target for each row."""
        if not hasattr(self, "coef_"):
            raise InputError("this RidgeProbe is not fitted yet: call .fit(X, y) first")
        x = as_features(X).double()
        if x.shape[1] != self.coef_.shape[0]:
            raise InputError(f"X has {x.shape[1]} features; the probe was fitted on {self.coef_.shape[0]}")
        return ((x - self.mean_) / self.scale_) @ self.coef_ + self.intercept_

    def evaluate(self, X: Float[Tensor, "n d"], y: Float[Tensor, " n"]) -> dict[str, float]:
        """R^2 and Spearman correlation on (X, y)."""
        pred = self.predict(X)
        return {k: float(v) for k, v in regression_report(as_target(y, pred.shape[0]), pred).items()}

    def score(self, X: Float[Tensor, "n d"], y: Float[Tensor, " n"]) -> float:
        """R^2 on (X, y), as scikit-learn's ``score``."""
        return self.evaluate(X, y)["r2"]
