"""Binary probes in the scikit-learn style: ``SparseProbe`` (``n_neurons`` neurons) and ``LinearProbe`` (dense).

>>> probe = SparseProbe(n_neurons=4, method="f_stat").fit(x_train, y_train)   # x: [n, d] activations
>>> probe.support_            # the 4 neurons used, most useful first
>>> probe.evaluate(x_test, y_test)  # {'accuracy', 'precision', 'recall', 'f1', 'auc'}

Both standardise each neuron on the training set (``standardize=True``), weigh the classes equally
(``class_weight="balanced"``) and fit an L2-regularised logistic regression in torch
(:mod:`probes.logistic`), so scikit-learn is not needed. Any ``[n, d]`` activations work: MLP neurons,
residual-stream dimensions, or an SAE's latents (``sae.encode(x)``); each column is called a neuron.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from interp.deprecation import renamed_fields
from interp.errors import InputError
from probes.logistic import balanced_weights, fit_logistic, predict_logits
from probes.metrics import classification_report
from probes.selection import canonical_method, rank_neurons
from probes.split import (
    as_features,
    check_both_classes,
    check_positive,
    encode_labels,
    fold_ids,
    log_grid,
    positive_values,
    standardize_stats,
)

DEFAULT_CS = tuple(log_grid(1e-3, 1e2, 6))
"""Values of C that ``LinearProbe(C=None)`` chooses from by cross-validation."""


class _BinaryProbe(abc.ABC):
    """Shared prediction and scoring for fitted binary probes (needs ``_inputs`` and coef state)."""

    classes_: list
    coef_: Float[Tensor, " n_inputs"]
    intercept_: float

    def _check_fitted(self) -> None:
        if not hasattr(self, "coef_"):
            raise InputError(f"this {type(self).__name__} is not fitted yet: call .fit(X, y) first")

    @abc.abstractmethod
    def _inputs(self, X) -> Tensor:
        """The columns of X this probe reads (all, or the selected neurons), scaled as in training."""

    def decision_function(self, X: Float[Tensor, "n d"]) -> Float[Tensor, " n"]:
        """Logit of the positive class for each row of X."""
        self._check_fitted()
        return predict_logits(self._inputs(X), self.coef_, torch.as_tensor(self.intercept_, dtype=self.coef_.dtype))

    def predict_proba(self, X: Float[Tensor, "n d"]) -> Float[Tensor, "n 2"]:
        """Probabilities of [negative class, positive class] for each row."""
        p = torch.sigmoid(self.decision_function(X))
        return torch.stack([1 - p, p], -1)

    def predict(self, X: Float[Tensor, "n d"]) -> list:
        """Predicted class (one of ``classes_``) for each row."""
        pos = (self.decision_function(X) > 0).tolist()
        return [self.classes_[int(p)] for p in pos]

    def _labels(self, y, n: int) -> Tensor:
        y01, classes = encode_labels(y, n)
        if classes != self.classes_:
            raise InputError(f"labels hold classes {classes}; this probe was fitted on {self.classes_}")
        return y01

    def evaluate(self, X: Float[Tensor, "n d"], y) -> dict[str, float]:
        """Accuracy, precision, recall, F1 (positive class = ``classes_[1]``) and ROC AUC on (X, y)."""
        score = self.decision_function(X)
        rep = classification_report(self._labels(y, score.shape[0]), score)
        return {k: float(v) for k, v in rep.items()}

    def score(self, X: Float[Tensor, "n d"], y) -> float:
        """Accuracy on (X, y), as scikit-learn's ``score``."""
        return self.evaluate(X, y)["accuracy"]


def _prepare(X, y, standardize: bool, class_weight: str | None):
    x = as_features(X)
    y01, classes = encode_labels(y, x.shape[0])
    check_both_classes(y01, "the training labels")
    if class_weight not in ("balanced", None):
        raise InputError(f"class_weight={class_weight!r}: expected 'balanced' or None")
    if standardize:
        mean, scale = standardize_stats(x)
        mean, scale = mean[0], scale[0]
    else:
        mean, scale = torch.zeros(x.shape[1], dtype=x.dtype), torch.ones(x.shape[1], dtype=x.dtype)
    y01 = y01.to(x.dtype)
    w = balanced_weights(y01) if class_weight == "balanced" else None
    return x, y01, classes, mean, scale, w


def _check_ranking(ranking, d: int, n_neurons: int) -> Tensor:
    """A given ranking as a long tensor of distinct column indices (at least `n_neurons`), or InputError."""
    r = torch.as_tensor(ranking)
    if r.dim() != 1 or r.is_floating_point() or r.is_complex() or r.dtype == torch.bool:
        raise InputError(f"ranking must be a 1-D sequence of integer column indices; got dtype {r.dtype} and shape "
                         f"{tuple(r.shape)}. Pass a fitted probe's ranking_ or probes.rank_neurons(X, y)")
    r = r.long()
    if r.numel() < n_neurons:
        raise InputError(f"ranking holds {r.numel()} neurons; n_neurons={n_neurons} needs at least that many")
    out = (r < 0) | (r >= d)
    if bool(out.any()):
        raise InputError(f"ranking holds indices {r[out][:5].tolist()} outside the {d} columns of X "
                         f"(valid: 0..{d - 1}); was it computed on other activations?")
    if r.unique().numel() != r.numel():
        raise InputError("ranking repeats some neurons; it must list distinct column indices, most useful first")
    return r


@renamed_fields({"k": "n_neurons"})
class SparseProbe(_BinaryProbe):
    """A sparse logistic probe: pick `n_neurons` neurons by `method`, then fit an L2 logistic regression
    on them (the paper's k-sparse probe, with k = `n_neurons`).

    Args:
        n_neurons: number of neurons the probe may use (1 localises a single neuron); ``k=`` is its
            deprecated name.
        method: selection method, one of ``probes.METHODS``: ``"mean_diff"``, ``"f_stat"``,
            ``"mutual_info"``, ``"l1"`` or ``"adaptive"``.
        C: inverse L2 strength of the final logistic regression (scikit-learn's ``C``).
        standardize: scale every neuron to zero mean and unit variance on the training set.
        class_weight: ``"balanced"`` weighs both classes equally; None weighs every example 1.
        max_iter: most Newton steps of the final fit.

    Fitted attributes: ``classes_``, ``ranking_`` (all neurons, most useful first), ``support_``
    (``ranking_[:n_neurons]``), ``coef_`` ``[n_neurons]`` (on standardised inputs), ``intercept_``,
    ``mean_``, ``scale_``.
    """

    def __init__(self, n_neurons: int = 1, method: str = "f_stat", *, C: float = 1.0, standardize: bool = True,
                 class_weight: str | None = "balanced", max_iter: int = 100):
        self.n_neurons = n_neurons
        self.method = method
        self.C = C
        self.standardize = standardize
        self.class_weight = class_weight
        self.max_iter = max_iter

    def fit(self, X: Float[Tensor, "n d"], y, ranking: Int[Tensor, " d"] | Sequence[int] | None = None) -> SparseProbe:
        """Select neurons and fit. Pass `ranking` to reuse a ranking computed earlier (skips selection)."""
        canonical_method(self.method)
        if not isinstance(self.n_neurons, int) or isinstance(self.n_neurons, bool) or self.n_neurons < 1:
            raise InputError(f"n_neurons={self.n_neurons!r} must be a positive integer (neurons the probe may use)")
        check_positive(self.C, "C")
        x, y01, self.classes_, self.mean_, self.scale_, w = _prepare(X, y, self.standardize, self.class_weight)
        if self.n_neurons > x.shape[1]:
            raise InputError(f"n_neurons={self.n_neurons} exceeds the {x.shape[1]} neurons (columns) of X; "
                             f"valid n_neurons is 1..{x.shape[1]}")
        xs = (x - self.mean_) / self.scale_
        if ranking is None:
            ranking = rank_neurons(xs, y01, self.method, sample_weight=w, C=self.C)
        self.ranking_ = _check_ranking(ranking, x.shape[1], self.n_neurons)
        self.support_ = self.ranking_[: self.n_neurons]
        coef, b = fit_logistic(xs[None, :, self.support_], y01, C=self.C, sample_weight=w, max_iter=self.max_iter)
        self.coef_, self.intercept_ = coef[0], float(b[0])
        return self

    def _inputs(self, X) -> Tensor:
        x = as_features(X)
        if x.shape[1] != self.mean_.shape[0]:
            raise InputError(f"X has {x.shape[1]} columns; the probe was fitted on {self.mean_.shape[0]}")
        return ((x - self.mean_) / self.scale_)[:, self.support_]


class LinearProbe(_BinaryProbe):
    """A dense L2-regularised logistic probe on every column of X, with C chosen by cross-validation.

    Args:
        C: inverse L2 strength; None chooses it from `Cs` by `cv`-fold cross-validated log-loss.
        Cs: candidate values of C when ``C`` is None.
        cv: number of folds, stratified by class (by group when ``fit(..., groups=...)`` is given); a fold
            whose training part holds one class only is refused.
        standardize: scale every column to zero mean and unit variance on the training set.
        class_weight: ``"balanced"`` or None.
        solver: ``"auto"``, ``"newton"`` or ``"lbfgs"`` (see :func:`probes.logistic.fit_logistic`).
        max_iter: most solver iterations.
        seed: seed of the cross-validation folds.

    Fitted attributes: ``classes_``, ``coef_`` ``[d]`` (on standardised inputs when ``standardize``),
    ``intercept_``, ``C_`` (the C used), ``cv_scores_`` (mean held-out log-loss per C, when C is None).
    """

    def __init__(self, C: float | None = None, *, Cs: Sequence[float] = DEFAULT_CS, cv: int = 3,
                 standardize: bool = True, class_weight: str | None = "balanced", solver: str = "auto",
                 max_iter: int = 100, seed: int = 0):
        self.C = C
        self.Cs = Cs
        self.cv = cv
        self.standardize = standardize
        self.class_weight = class_weight
        self.solver = solver
        self.max_iter = max_iter
        self.seed = seed

    def fit(self, X: Float[Tensor, "n d"], y, groups=None) -> LinearProbe:
        """Fit on (X, y); `groups` (one id per row) keeps each group within one CV fold."""
        x, y01, self.classes_, self.mean_, self.scale_, w = _prepare(X, y, self.standardize, self.class_weight)
        xs = (x - self.mean_) / self.scale_
        sw = torch.ones_like(y01) if w is None else w
        if self.C is None:
            self.C_, self.cv_scores_ = self._cross_validate(xs, y01, sw, groups)
        else:
            self.C_ = check_positive(self.C, "C")
        coef, b = fit_logistic(xs[None], y01, C=self.C_, sample_weight=sw, solver=self.solver, max_iter=self.max_iter)
        self.coef_, self.intercept_ = coef[0], float(b[0])
        return self

    def _cross_validate(self, xs: Tensor, y: Tensor, sw: Tensor, groups) -> tuple[float, dict[float, float]]:
        cs = positive_values(self.Cs, "Cs", list(DEFAULT_CS))
        folds = fold_ids(xs.shape[0], self.cv, self.seed, groups, y=y)
        for f in range(self.cv):  # a training part of one class fits an intercept running to infinity
            n_pos, n_train = int(y[folds != f].sum()), int((folds != f).sum())
            if n_pos in (0, n_train):
                rare = min(int(y.sum()), len(y) - int(y.sum()))
                raise InputError(f"cross-validation fold {f} leaves a training part of a single class ({n_pos} "
                                 f"positive of {n_train}; the rarer class has {rare} examples"
                                 + (" and the groups put them together" if groups is not None else "")
                                 + f"): lower cv={self.cv}, add examples of the rarer class, or give C= to skip CV")
        # every (fold, C) problem shares x; held-out rows get weight 0 in its training objective
        train = torch.stack([folds != f for f in range(self.cv)]).to(xs.dtype)  # [cv, n]
        weights = (train[:, None, :] * sw).expand(self.cv, len(cs), -1).reshape(-1, xs.shape[0])
        c = torch.tensor(cs, dtype=xs.dtype).repeat(self.cv)
        coef, b = fit_logistic(xs.expand(len(c), -1, -1), y, C=c, sample_weight=weights,
                               solver=self.solver, max_iter=self.max_iter)
        z = xs @ coef.T + b  # [n, cv*C]: every problem's logits on every row
        t = 2 * y[:, None] - 1
        loss = torch.nn.functional.softplus(-t * z) * sw[:, None]
        held = (1 - train).repeat_interleave(len(cs), 0).T  # [n, cv*C]
        per = (loss * held).sum(0) / (sw[:, None] * held).sum(0).clamp(min=1e-12)
        mean = per.view(self.cv, len(cs)).mean(0)
        best = int(mean.argmin())
        return cs[best], {ci: float(v) for ci, v in zip(cs, mean)}

    def _inputs(self, X) -> Tensor:
        x = as_features(X)
        if x.shape[1] != self.mean_.shape[0]:
            raise InputError(f"X has {x.shape[1]} columns; the probe was fitted on {self.mean_.shape[0]}")
        return (x - self.mean_) / self.scale_
