"""Partial least squares for numeric attributes, with the number of components chosen on held-out data.

* :class:`PLSRegression` -- PLS with NIPALS deflation (PLS1 for one target, PLS2 for several; each
  weight vector is the exact top singular vector of ``X^T Y`` rather than a power iteration) in torch, following
  the scikit-learn estimator convention (``fit`` returns self; ``x_weights_``, ``x_rotations_``,
  ``coef_``, ``intercept_``; ``predict``, ``transform``). No feature scaling: activation geometry is
  kept, so the found directions live in the residual stream as it is.
* :func:`pls_subspace` -- pick the number of components by k-fold held-out R^2 (accumulated over
  all folds, optionally split by group so one entity never sits in train and test) among
  1..``max_components`` (32 by default), refit on all rows, and return a :class:`Subspace` spanned
  by the PLS rotations with a :class:`LinearMap` that maps a value to the point where activations
  with that value sit and reads the PLS prediction back: ``subspace.predict(x)`` equals
  ``PLSRegression.predict``, and ``subspace.direction()`` is the smallest displacement that raises
  the prediction by one unit of the target.

Library choice: torch (runs on GPU, no scikit-learn dependency); scikit-learn's
``PLSRegression(scale=False)`` is the test oracle.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from interp.errors import InputError
from interp.subspace import LinearMap, Subspace

RANK_TOL = 1e-10
"""A component whose score holds less than this fraction of centred x's total variance is refused as round-off
(in float64, deflation leaves about 1e-30 of it once x's rank is used up)."""


class PLSRegression:
    """NIPALS partial least squares regression of ``y [n, m]`` on ``x [n, d]``."""

    def __init__(self, n_components: int = 2):
        self.n_components = n_components

    def fit(self, x: Float[Tensor, "n d"], y: Float[Tensor, "n *m"], *,  # noqa: F821
            up_to_rank: bool = False) -> PLSRegression:
        """Fit ``n_components`` components; x's centred rank must allow them (an error names the rank), or
        with `up_to_rank` as many as it allows (``n_components_`` says how many were fitted)."""
        x = torch.as_tensor(x).double()
        y = torch.as_tensor(y).double()
        y2 = y[:, None] if y.dim() == 1 else y
        if x.dim() != 2 or len(x) != len(y2):
            raise InputError(f"x must be [n, d] and y [n] or [n, m] with the same n; got {tuple(x.shape)} and "
                             f"{tuple(y.shape)}")
        k = self.n_components
        if not 1 <= k <= min(len(x) - 1, x.shape[1]):
            raise InputError(f"n_components must be in [1, min(n - 1, d) = {min(len(x) - 1, x.shape[1])}]; got {k}")
        self.x_mean_, self.y_mean_ = x.mean(0), y2.mean(0)
        xk, yk = x - self.x_mean_, y2 - self.y_mean_
        d, m = x.shape[1], y2.shape[1]
        w_, p_, q_ = (x.new_zeros(d, k), x.new_zeros(d, k), x.new_zeros(m, k))
        # a score with (almost) none of x's variance left is built from round-off: x's rank is exhausted
        floor = RANK_TOL * float(xk.pow(2).sum())
        for a in range(k):
            # the NIPALS fixed point is the top left singular vector of xk^T yk; take it directly
            u_, _, _ = torch.linalg.svd(xk.T @ yk, full_matrices=False)
            w = u_[:, 0]
            t = xk @ w
            tt = t @ t
            if not tt > floor:
                if a == 0:
                    raise InputError("x is constant over its rows: PLS needs varying activations")
                if not up_to_rank:
                    raise InputError(f"x has rank {a} after centring; use n_components <= {a} (got {k})")
                w_, p_, q_ = w_[:, :a], p_[:, :a], q_[:, :a]
                break
            p = xk.T @ t / tt
            q = yk.T @ t / tt
            xk = xk - torch.outer(t, p)
            yk = yk - torch.outer(t, q)
            w_[:, a], p_[:, a], q_[:, a] = w, p, q
        self.n_components_ = w_.shape[1]
        self.x_weights_, self.x_loadings_, self.y_loadings_ = w_, p_, q_
        self.x_rotations_ = w_ @ torch.linalg.pinv(p_.T @ w_)
        self.coef_ = self.x_rotations_ @ q_.T  # [d, m]
        self.intercept_ = self.y_mean_ - self.x_mean_ @ self.coef_
        self._one_target = y.dim() == 1
        return self

    def transform(self, x: Float[Tensor, "n d"]) -> Float[Tensor, "n k"]:
        return (torch.as_tensor(x).double() - self.x_mean_) @ self.x_rotations_

    def predict(self, x: Float[Tensor, "n d"]) -> Tensor:
        out = torch.as_tensor(x).double() @ self.coef_ + self.intercept_
        return out[:, 0] if self._one_target else out


def _folds(n: int, n_folds: int, groups: Sequence | None, seed: int) -> list[Tensor]:
    g = torch.Generator().manual_seed(seed)
    if groups is None:
        perm = torch.randperm(n, generator=g)
        return [perm[i::n_folds] for i in range(n_folds)]
    keys = list(dict.fromkeys(groups))
    if len(keys) < n_folds:
        raise InputError(f"{len(keys)} distinct groups cannot fill {n_folds} folds; lower n_folds")
    order = torch.randperm(len(keys), generator=g).tolist()
    fold_of = {keys[j]: i % n_folds for i, j in enumerate(order)}
    ids = torch.tensor([fold_of[x] for x in groups])
    return [torch.nonzero(ids == f).squeeze(1) for f in range(n_folds)]


def held_out_r2(x: Tensor, y: Tensor, max_components: int, *, n_folds: int = 5, groups: Sequence | None = None,
                seed: int = 0, progress: bool = False) -> list[float]:
    """Held-out R^2 for 1..max_components, errors and totals summed over all folds before dividing."""
    x, y = torch.as_tensor(x).double(), torch.as_tensor(y).double()
    y2 = y[:, None] if y.dim() == 1 else y
    sse = torch.zeros(max_components, dtype=torch.float64)
    sst = torch.zeros((), dtype=torch.float64)
    for test in tqdm(_folds(len(x), n_folds, groups, seed), desc="pls folds", disable=not progress):
        train = torch.ones(len(x), dtype=torch.bool)
        train[test] = False
        # a fold whose rank is used up before max_components predicts with all it has from there on
        model = PLSRegression(min(max_components, int(train.sum()) - 1)).fit(x[train], y2[train], up_to_rank=True)
        xt = x[test] - model.x_mean_
        pred = model.y_mean_.expand(len(test), -1).clone()
        t = xt @ model.x_rotations_  # scores; prediction with k comps uses the first k
        for k in range(max_components):
            if k < model.n_components_:
                pred = pred + torch.outer(t[:, k], model.y_loadings_[:, k])
            sse[k] += (y2[test] - pred).pow(2).sum()
        sst += (y2[test] - y2[train].mean(0)).pow(2).sum()
    return (1 - sse / sst).tolist()


MAX_COMPONENTS = 32
"""Largest number of components :func:`pls_subspace` tries by default."""


def pls_subspace(acts: Float[Tensor, "n d_model"], values: Float[Tensor, " n"], *, n_components: int | None = None,
                 max_components: int = MAX_COMPONENTS, n_folds: int = 5, groups: Sequence | None = None, seed: int = 0,
                 name: str = "") -> Subspace:
    """Subspace of a numeric attribute by PLS, the number of components chosen by held-out R^2.

    Args:
        acts: one activation per example ``[n, d_model]``.
        values: the attribute per example ``[n]`` (a year, a latitude, a count).
        n_components: fix the number of components; by default the one with the best k-fold
            held-out R^2 among 1..max_components (capped by the rows of a training fold and d_model).
        groups: optional entity id per row; folds then split by entity (a by-prompt split of the
            same entity inflates R^2).

    Returns a Subspace (origin = mean activation) spanned by the orthonormalised PLS rotations,
    with a :class:`LinearMap`: ``to_coords(v)`` is the point nearest to where activations with value
    ``v`` sit on average (least squares from value to coordinates) among those the regression reads
    as ``v``; ``predict(x)`` is the PLS prediction (the map's
    readout holds the regression coefficients in the subspace's coordinates), and ``direction()``
    the ``[d_model]`` displacement that raises the prediction by exactly 1. ``meta`` holds
    ``held_out_r2`` (per number of components), ``n_components``, ``max_components`` and ``train_r2``.
    """
    acts = torch.as_tensor(acts)
    values = torch.as_tensor(values).double().flatten()
    if acts.dim() != 2 or len(acts) != len(values):
        raise InputError(f"acts must be [n, d_model] and values [n]; got {tuple(acts.shape)} and {tuple(values.shape)}")
    if not (torch.isfinite(acts).all() and torch.isfinite(values).all()):
        raise InputError("acts or values contain NaN or inf")
    if values.std() == 0:
        raise InputError("values are constant; PLS needs a varying attribute")
    x = acts.double().cpu()
    smallest_train = len(x) - max(len(f) for f in _folds(len(x), n_folds, groups, seed))
    limit = min(max_components, x.shape[1], smallest_train - 1)
    if limit < 1:
        raise InputError(f"too few rows ({len(x)}) for {n_folds}-fold PLS: the smallest training fold has "
                         f"{smallest_train}; lower n_folds")
    r2 = None
    if n_components is None:
        r2 = held_out_r2(x, values, limit, n_folds=n_folds, groups=groups, seed=seed)
        n_components = int(torch.tensor(r2).argmax()) + 1
    model = PLSRegression(n_components).fit(x, values)
    train_r2 = 1 - ((model.predict(x) - values).pow(2).sum() / (values - values.mean()).pow(2).sum()).item()
    sub = Subspace(model.x_rotations_.T.float(), model.x_mean_.float(), name=name)
    coords = sub.project(x.float()).double()
    design = torch.stack([torch.ones_like(values), values], 1)
    sol = torch.linalg.lstsq(design, coords).solution  # [2, rank]
    # the readout: PLS's prediction in the subspace's coordinates (coef_ lies in the span of the rotations)
    w = sub.basis.double() @ model.coef_[:, 0]
    bias = float(model.y_mean_[0] - (model.x_mean_ - sub.origin.double()) @ model.coef_[:, 0])
    # to_coords(v): where activations with value v sit on average (sol), moved along w onto the points
    # the regression reads as v, so that predict(to_coords(v)) == v
    ww = w @ w
    intercept = sol[0] - (sol[0] @ w + bias) * w / ww
    slope = sol[1] + (1 - sol[1] @ w) * w / ww
    sub.coord_map = LinearMap(intercept.float(), slope.float(), w.float(), bias)
    sub.meta = {"finder": "pls", "n_components": n_components, "max_components": max_components,
                "held_out_r2": r2, "train_r2": train_r2, "n_folds": n_folds, "grouped": groups is not None}
    return sub
