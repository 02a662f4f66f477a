"""Feature selection for k-sparse probes (Gurnee et al. 2023), batched over layers.

Every method returns a *ranking*: a permutation of the ``d`` neurons of each layer, most useful
first, so the k-sparse support is ``ranking[:, :k]`` and supports for increasing k are nested. Inputs
are standardised (zero mean, unit variance per neuron on the training set, as the paper does), or raw
with ``standardize=True``.

==============  ==========================================================================
``mean_diff``   absolute difference of the class means
``f_stat``      ANOVA F-statistic (scikit-learn's ``f_classif`` for two classes)
``mutual_info`` mutual information between the label and the neuron, binned in equal-frequency bins
``l1``          order of entry along an L1-regularised logistic-regression path (lasso path)
``adaptive``    adaptive thresholding: fit an L2 logistic regression, keep the half of the neurons
                with the largest weights, refit, and so on down to one neuron
==============  ==========================================================================

``l1`` and ``adaptive`` fit models, so by default they screen first: only the 512 best neurons by
F-statistic enter the path or the first fit (``max_candidates``); the others rank after them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from interp.errors import InputError
from probes.logistic import NEWTON_MAX_K, check_weights, fit_logistic
from probes.split import check_finite, check_positive, encode_labels

METHODS = ("mean_diff", "f_stat", "mutual_info", "l1", "adaptive")
"""Names accepted by :func:`rank_neurons` (aliases: anova, mi, lasso, at)."""
_ALIASES = {"anova": "f_stat", "f_classif": "f_stat", "mi": "mutual_info", "lasso": "l1", "at": "adaptive",
            "mean_difference": "mean_diff"}


def canonical_method(method: str) -> str:
    """The canonical name of a selection method, or InputError listing the valid ones."""
    name = _ALIASES.get(method, method)
    if name not in METHODS:
        raise InputError(f"method={method!r} is not a selection method; expected one of {METHODS} "
                         f"(or an alias: {sorted(_ALIASES)})")
    return name


def _class_stats(x: Tensor, y: Tensor, rows: Tensor | None,
                 chunk: int = 256) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Per-layer class means and counts over the rows in `rows` (a 0/1 mask; None: all), and the
    sum of squared deviations from the mean: (mean0 [L,d], mean1 [L,d], n0, n1, ssd [L,d]).

    One pass over x in row blocks small enough to stay in cache; sums are taken about each layer's
    first row (so a large offset does not cancel the variance away) and accumulated in float64.
    Selecting rows is a product with a row-weight vector, so it never copies x.
    """
    nl, n, d = x.shape
    yf = y.to(x.dtype)
    r = torch.ones_like(yf) if rows is None else rows.to(x.dtype)
    u = torch.stack([r - r * yf, r * yf])  # [2, n]: class-0 and class-1 row weights
    shift = x[:, :1]
    sums = torch.zeros(nl, 2, d, dtype=torch.float64, device=x.device)
    sq = torch.zeros(nl, d, dtype=torch.float64, device=x.device)
    for i in range(0, n, chunk):
        xc = x[:, i:i + chunk] - shift
        sums += torch.matmul(u[:, i:i + chunk], xc).double()
        sq += torch.matmul(r[i:i + chunk], xc * xc).double()
    n0, n1 = u.double().sum(-1)
    m0, m1 = sums[:, 0] / n0.clamp(min=1), sums[:, 1] / n1.clamp(min=1)
    m = (sums[:, 0] + sums[:, 1]) / (n0 + n1).clamp(min=1)
    ssd = (sq - (n0 + n1) * m ** 2).clamp(min=0)
    base = shift[:, 0].double()
    return ((m0 + base).to(x.dtype), (m1 + base).to(x.dtype), n0.to(x.dtype), n1.to(x.dtype),
            ssd.to(x.dtype))


def _std(x: Tensor) -> Tensor:
    """Per-layer standard deviation of each neuron ``[L, d]``; constant neurons get 1."""
    std = (_class_stats(x, torch.zeros(x.shape[1], device=x.device), None)[4] / x.shape[1]).sqrt()
    return torch.where(std > 1e-6, std, torch.ones_like(std))


def _mean_diff_from_stats(m0, m1, n0, n1, ssd, standardize: bool = False) -> Tensor:
    diff = (m1 - m0).abs()
    if not standardize:
        return diff
    std = (ssd / (n0 + n1)).sqrt()
    return diff / torch.where(std > 1e-6, std, torch.ones_like(std))


def _f_stat_from_stats(m0, m1, n0, n1, ssd) -> Tensor:
    n = n0 + n1
    m = (n0 * m0 + n1 * m1) / n
    ssb = n0 * (m0 - m) ** 2 + n1 * (m1 - m) ** 2
    ssw = (ssd - ssb).clamp(min=0)
    return ssb / (ssw / (n - 2).clamp(min=1)).clamp(min=1e-12)


def mean_diff_scores(x: Float[Tensor, "layer n d"], y: Float[Tensor, " n"], standardize: bool = False,
                     rows: Float[Tensor, " n"] | None = None) -> Float[Tensor, "layer d"]:
    """``|mean(x | y=1) - mean(x | y=0)|`` per neuron, in standard deviations when `standardize`.

    `rows` (a 0/1 mask) restricts every statistic to those rows (e.g. the training split).
    """
    return _mean_diff_from_stats(*_class_stats(x, y, rows), standardize=standardize)


def f_stat_scores(x: Float[Tensor, "layer n d"], y: Float[Tensor, " n"],
                  rows: Float[Tensor, " n"] | None = None) -> Float[Tensor, "layer d"]:
    """One-way ANOVA F-statistic per neuron for two classes (as scikit-learn's ``f_classif``).

    Invariant to each neuron's scale and offset, so raw and standardised inputs rank alike.
    `rows` (a 0/1 mask) restricts every statistic to those rows.
    """
    return _f_stat_from_stats(*_class_stats(x, y, rows))


def mutual_info_scores(
    x: Float[Tensor, "layer n d"], y: Float[Tensor, " n"], n_bins: int = 16
) -> Float[Tensor, "layer d"]:
    """Mutual information (nats) between the label and each neuron cut into equal-frequency bins.

    Miller-Madow corrected: the plug-in estimate of a neuron independent of the label is about
    ``(bins occupied - 1) / (2 n)`` above zero (0.085 nats at n = 100 with 16 bins), while a sparse neuron (few
    distinct values, two bins) gets almost none of that, so noise outranked a sparse informative latent at
    small n. Each entropy gets ``(occupied cells - 1) / (2 n)``, which subtracts
    ``(cells_xy - cells_x - cells_y + 1) / (2 n)`` from the plug-in value; it can be slightly negative."""
    n = x.shape[1]
    yl = y.long()
    out = []
    for xl in x:  # one layer at a time keeps memory at one [n, d] copy
        xs = xl.sort(0).values
        cut = torch.linspace(0, n - 1, n_bins + 1, device=x.device)[1:-1].round().long()
        edges = xs[cut].T.contiguous()  # [d, n_bins - 1]
        bins = torch.searchsorted(edges, xl.T.contiguous())  # [d, n]
        joint = torch.zeros(xl.shape[1], n_bins * 2, dtype=torch.float64, device=x.device)
        joint.scatter_add_(1, bins * 2 + yl, torch.ones_like(bins, dtype=torch.float64))
        p = joint.view(-1, n_bins, 2) / n
        pb = p.sum(2, keepdim=True)
        py = p.sum(1, keepdim=True)
        ratio = torch.where(p > 0, p / (pb * py).clamp(min=1e-300), torch.ones_like(p))
        cells = (p > 0).sum((1, 2)) - (pb > 0).sum((1, 2)) - (py > 0).sum((1, 2)) + 1
        out.append((p * ratio.log()).sum((1, 2)) - cells / (2 * n))
    return torch.stack(out).to(x.dtype)


def rank_by_score(score: Float[Tensor, "*layer d"]) -> Int[Tensor, "*layer d"]:
    """Neuron indices by decreasing score (ties keep index order)."""
    return torch.sort(score, dim=-1, descending=True, stable=True).indices


def _mv(x: Tensor, v: Tensor) -> Tensor:
    """[L, n, d] @ [L, d] -> [L, n]."""
    return torch.bmm(x, v[:, :, None])[:, :, 0]


def _rmv(x: Tensor, r: Tensor) -> Tensor:
    """[L, n] @ [L, n, d] -> [L, d]."""
    return torch.bmm(r[:, None, :], x)[:, 0]


def l1_path_ranking(
    x: Float[Tensor, "layer n d"],
    y: Float[Tensor, " n"],
    sample_weight: Float[Tensor, " n"] | None = None,
    n_lambdas: int = 24,
    min_ratio: float = 1e-3,
    inner_iter: int = 10,
) -> Int[Tensor, "layer d"]:
    """Rank neurons by when they enter an L1 logistic path (largest penalty first).

    Runs proximal gradient (FISTA, warm-started) on ``mean_i s_i * logloss_i + lam * ||w||_1`` over a
    geometric grid of ``n_lambdas`` penalties from the one where the first neuron enters down to
    ``min_ratio`` of it. Neurons entering at the same penalty are ordered by their weight; neurons that
    never enter come last, ordered by their gradient at the smallest penalty.
    """
    nl, n, d = x.shape
    s = torch.ones(n, dtype=x.dtype, device=x.device) if sample_weight is None else sample_weight.to(x.dtype)
    s = s / s.mean()
    yf = y.to(x.dtype)
    p0 = (s * yf).sum() / s.sum()
    grad0 = _rmv(x, (s * (p0 - yf)).expand(nl, n)) / n
    lam_max = grad0.abs().amax(-1)  # [L]
    v = torch.randn(nl, d, dtype=x.dtype, device=x.device, generator=torch.Generator(x.device).manual_seed(0))
    for _ in range(15):  # power iteration for the largest eigenvalue of X^T X
        v = _rmv(x, _mv(x, v))
        v = v / v.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    sig2 = _mv(x, v).pow(2).sum(-1)
    lip = 0.25 * s.max() * (sig2 + n) / n * 1.05  # [L]
    step = (1 / lip)[:, None]
    w = torch.zeros(nl, d, dtype=x.dtype, device=x.device)
    b = torch.log(p0 / (1 - p0)).expand(nl).clone()
    entered = torch.full((nl, d), n_lambdas, dtype=torch.long, device=x.device)
    entry_mag = torch.zeros(nl, d, dtype=x.dtype, device=x.device)
    ratios = torch.logspace(0, math.log10(min_ratio), n_lambdas, dtype=x.dtype, device=x.device) * 0.999
    grad = grad0
    for i, r in enumerate(ratios):
        lam = (lam_max * r)[:, None]
        wk, bk, t_prev = w.clone(), b.clone(), 1.0  # FISTA restarts at each penalty
        for _ in range(inner_iter):
            z = _mv(x, w) + b[:, None]
            res = s * (torch.sigmoid(z) - yf) / n
            grad = _rmv(x, res)
            w_new = w - step * grad
            w_new = torch.sign(w_new) * (w_new.abs() - step * lam).clamp(min=0)
            b_new = b - step[:, 0] * res.sum(-1)
            t = (1 + math.sqrt(1 + 4 * t_prev ** 2)) / 2
            w, wk = w_new + (t_prev - 1) / t * (w_new - wk), w_new
            b, bk = b_new + (t_prev - 1) / t * (b_new - bk), b_new
            t_prev = t
        w, b = wk, bk
        new = (w != 0) & (entered == n_lambdas)
        entered = torch.where(new, torch.full_like(entered, i), entered)
        entry_mag = torch.where(new, w.abs(), entry_mag)
    tail = torch.where(entered == n_lambdas, grad.abs(), entry_mag)
    tail = tail / tail.amax(-1, keepdim=True).clamp(min=1e-30)
    return torch.sort(entered.to(x.dtype) + 0.5 * (1 - tail), dim=-1, stable=True).indices


def adaptive_ranking(
    x: Float[Tensor, "layer n d"],
    y: Float[Tensor, " n"],
    sample_weight: Float[Tensor, " n"] | None = None,
    C: float = 1.0,
    keep: float = 0.5,
    max_iter: int = 50,
) -> Int[Tensor, "layer d"]:
    """Adaptive thresholding: refit an L2 logistic regression and drop the smallest weights each round.

    Each round keeps the ``keep`` fraction of the current neurons with the largest ``|weight|``
    (inputs are standardised, so weights are comparable); dropped neurons rank below the kept ones,
    in the order of their last weight. Rounds continue until one neuron remains.
    """
    if not 0 < keep < 1:
        raise InputError(f"keep={keep} must be in (0, 1)")
    nl, n, d = x.shape
    current = torch.arange(d, device=x.device).expand(nl, d)
    dropped: list[Tensor] = []
    while current.shape[1] > 1:
        m = current.shape[1]
        xs = torch.gather(x, 2, current[:, None, :].expand(nl, n, m))
        w, _ = fit_logistic(xs, y, C=C, sample_weight=sample_weight,
                            max_iter=max_iter if m + 1 > NEWTON_MAX_K else 30)
        order = torch.sort(w.abs(), dim=-1, descending=True, stable=True).indices
        current = torch.gather(current, 1, order)
        n_keep = max(1, min(m - 1, math.ceil(m * keep)))
        dropped.append(current[:, n_keep:])
        current = current[:, :n_keep]
    return torch.cat([current] + dropped[::-1], 1)


def _screened(x: Tensor, y: Tensor, max_candidates: int | None, rank_fn) -> Tensor:
    """Run a model-based ranking on the ``max_candidates`` best neurons by F-statistic only.

    The others rank after them, in F-statistic order (a screening step, as strong rules do for the
    lasso: a neuron with almost no class separation is not going to enter the path early).
    """
    d = x.shape[2]
    if max_candidates is None or d <= max_candidates:
        return rank_fn(x)
    pre = rank_by_score(f_stat_scores(x, y))
    cand, rest = pre[:, :max_candidates], pre[:, max_candidates:]
    sub = torch.gather(x, 2, cand[:, None, :].expand(-1, x.shape[1], -1))
    return torch.cat([torch.gather(cand, 1, rank_fn(sub)), rest], 1)


def rank_neurons(
    x: Float[Tensor, "*layer n d"] | np.ndarray,
    y: Tensor | np.ndarray | Sequence,
    method: str = "f_stat",
    *,
    sample_weight: Float[Tensor, " n"] | np.ndarray | None = None,
    C: float = 1.0,
    standardize: bool = False,
    max_candidates: int | None = 512,
) -> Int[Tensor, "*layer d"]:
    """Rank the neurons of each layer by ``method`` (see the module docstring); most useful first.

    Args:
        x: activations, one ``[n, d]`` matrix per layer (a single ``[n, d]`` is accepted);
            standardised, or raw with ``standardize=True``.
        y: binary labels ``[n]`` of any two values (a tensor, array or list), mapped as
            :class:`probes.SparseProbe` and :func:`probes.sweep` map them: the larger value (1, True,
            or the later string) is the positive class. Both classes must occur; NaN or None labels
            are refused.
        method: one of :data:`METHODS`.
        sample_weight: example weights ``[n]`` (finite, >= 0) for the model-based methods (``l1``,
            ``adaptive``); checked for every method.
        C: inverse L2 strength of the logistic fits inside ``adaptive`` (finite, > 0).
        standardize: rank as if every neuron were scaled to zero mean and unit variance (f_stat and
            mutual_info are unaffected; mean_diff divides by the standard deviation; l1 and adaptive
            work on a standardised copy).
        max_candidates: ``l1`` and ``adaptive`` consider only this many neurons, the best by
            F-statistic, and rank the rest after them by F-statistic (None: every neuron).
    """
    method = canonical_method(method)
    x = x if isinstance(x, Tensor) else torch.as_tensor(x)
    if x.dim() == 2:
        return rank_neurons(x[None], y, method, sample_weight=sample_weight, C=C, standardize=standardize,
                            max_candidates=max_candidates)[0]
    n_y = y.shape if hasattr(y, "shape") else (len(y),) if hasattr(y, "__len__") else ()
    if x.dim() != 3 or len(n_y) != 1 or n_y[0] != x.shape[1]:
        raise InputError(f"expected x [layer, n, d] and y [n]; got x {tuple(x.shape)} and y {tuple(n_y)}")
    x = x if x.dtype in (torch.float32, torch.float64) else x.float()
    check_finite(x, "x")
    y01, _ = encode_labels(y, x.shape[1])  # any two values, as SparseProbe and sweep: the larger is class 1
    y = y01.to(device=x.device, dtype=x.dtype)
    if sample_weight is not None:
        sample_weight = torch.as_tensor(sample_weight, device=x.device).to(x.dtype)
        if tuple(sample_weight.shape) != (x.shape[1],):
            raise InputError(f"sample_weight must be one weight per example ([{x.shape[1]}]); "
                             f"got shape {tuple(sample_weight.shape)}")
        check_weights(sample_weight)
        if not bool(sample_weight.sum() > 0):
            raise InputError("sample_weight is 0 for every example; at least one example needs a positive weight")
    C = check_positive(C, "C")
    if x.shape[2] == 0:  # no neurons: the empty ranking (a sweep skips such a site's probe sizes)
        return torch.empty(x.shape[0], 0, dtype=torch.long, device=x.device)
    if method == "mean_diff":
        return rank_by_score(mean_diff_scores(x, y, standardize))
    if method == "f_stat":
        return rank_by_score(f_stat_scores(x, y))
    if method == "mutual_info":
        return rank_by_score(mutual_info_scores(x, y))
    if standardize:
        x = (x - x.mean(1, keepdim=True)) / _std(x)[:, None, :]
    if max_candidates is not None and max_candidates < 1:
        raise InputError(f"max_candidates={max_candidates} must be >= 1 or None")
    if method == "l1":
        return _screened(x, y, max_candidates, lambda v: l1_path_ranking(v, y, sample_weight))
    return _screened(x, y, max_candidates, lambda v: adaptive_ranking(v, y, sample_weight, C=C))
