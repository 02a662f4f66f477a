"""Batched L2-regularised logistic regression in torch: many independent problems in one call.

The objective is scikit-learn's, so a fit here and ``LogisticRegression(C=C)`` reach the same optimum:

    minimise over (w, b):   0.5 * ||w||^2  +  C * sum_i s_i * log(1 + exp(-t_i * (x_i . w + b)))

with ``t_i = +-1``, sample weights ``s_i`` (``class_weight="balanced"`` gives ``n / (2 * n_class)``) and
an unpenalised intercept ``b``. Every problem of the batch has its own data, labels, weights and ``C``,
so one call fits every layer (or every fold, or every value of ``C``) together.

Two solvers:

- ``"newton"``: damped Newton (IRLS) with a backtracking line search; it forms the ``[k+1, k+1]``
  Hessian (reused while it keeps cutting the gradient 4-fold), so it suits k up to a few hundred
  and converges in a few steps, two or three from a good warm start.
- ``"lbfgs"``: torch's L-BFGS on the sum of the independent objectives, for wide inputs (dense probes
  on thousands of neurons) where the Hessian would be too large.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from interp.errors import InputError
from probes.split import check_finite

NEWTON_MAX_K = 640
"""Widest problem ``solver="auto"`` hands to Newton; wider ones go to L-BFGS."""


def balanced_weights(y: Float[Tensor, "*batch n"]) -> Float[Tensor, "*batch n"]:
    """scikit-learn's ``class_weight="balanced"`` for 0/1 labels: ``n / (2 * count of the class)``."""
    n = y.shape[-1]
    pos = y.sum(-1, keepdim=True).clamp(min=1.0)
    neg = (n - y.sum(-1, keepdim=True)).clamp(min=1.0)
    return torch.where(y > 0.5, n / (2 * pos), n / (2 * neg))


def check_weights(s: Tensor, name: str = "sample_weight") -> None:
    """InputError unless every weight is finite and >= 0 (a NaN, inf or negative weight fits nonsense)."""
    bad = ~torch.isfinite(s) | (s < 0)
    if bool(bad.any()):
        vals = torch.unique(s[bad])[:3].tolist()
        raise InputError(f"{name} holds {int(bad.sum())} NaN, infinite or negative values (e.g. {vals}); weights "
                         "must be finite and >= 0: fix or drop those examples")


def _mv(x: Tensor, v: Tensor) -> Tensor:
    """``x @ v`` for x ``[batch, n, k]`` and v ``[batch, k]`` -> ``[batch, n]``.

    Written as ``v @ x^T``: for both layouts the sweep uses (x row-major, or the transpose of a
    contiguous ``[batch, k, n]``) this reads memory in order and is about twice as fast.
    """
    return torch.bmm(v[:, None, :], x.mT)[:, 0]


def _objective(x: Tensor, t: Tensor, s: Tensor, c: Tensor, w: Tensor, b: Tensor) -> Tensor:
    """Per-problem objective ``[batch]`` (t in {-1, +1})."""
    return _loss_at(_mv(x, w) + b[:, None], w, t, s, c)


def _broadcast(v, like: Tensor, name: str) -> Tensor:
    v = torch.as_tensor(v, dtype=like.dtype, device=like.device)
    try:
        return v.expand_as(like).clone()
    except RuntimeError:
        raise InputError(f"{name} of shape {tuple(v.shape)} does not broadcast to {tuple(like.shape)}") from None


def fit_logistic(
    x: Float[Tensor, "batch n k"],
    y: Float[Tensor, "*#batch n"],
    *,
    C: float | Float[Tensor, " batch"] = 1.0,
    sample_weight: Float[Tensor, "*#batch n"] | None = None,
    fit_intercept: bool = True,
    solver: str = "auto",
    max_iter: int = 100,
    tol: float = 1e-6,
    init: tuple[Tensor, Tensor] | None = None,
    hessian_rows: int | None = None,
) -> tuple[Float[Tensor, "batch k"], Float[Tensor, " batch"]]:
    """Fit ``batch`` independent logistic regressions; returns ``(coef [batch, k], intercept [batch])``.

    Args:
        x: inputs, one ``[n, k]`` design matrix per problem (computed in float32 or float64).
        y: 0/1 labels ``[batch, n]``, or ``[n]`` shared by every problem.
        C: inverse regularisation strength (scikit-learn's ``C``), a float or one per problem.
        sample_weight: per-example weights ``[batch, n]`` or ``[n]``; None weighs every example 1.
        fit_intercept: learn an unpenalised intercept.
        solver: ``"newton"``, ``"lbfgs"`` or ``"auto"`` (Newton up to k = NEWTON_MAX_K).
        max_iter: most Newton steps (or L-BFGS iterations).
        tol: stop when every problem's largest gradient entry is below ``tol * (1 + C * n)``.
        init: starting ``(coef, intercept)`` (a warm start, e.g. the fit on fewer features padded
            with zeros); default zeros.
        hessian_rows: Newton only: form the Hessian from about this many evenly spaced rows of
            those with a weight (sub-sampled Newton). The gradient stays exact, so the optimum is
            the same; only the number of steps may grow (when a fresh sub-sampled Hessian cuts the
            gradient less than 4-fold, later ones use every row). None: every row.
    """
    return _fit(x, y, C, sample_weight, fit_intercept, solver, max_iter, tol, init, hessian_rows)[:2]


def fit_logistic_logits(
    x: Float[Tensor, "batch n k"],
    y: Float[Tensor, "*#batch n"],
    *,
    init_logits: Float[Tensor, "batch n"] | None = None,
    **options,
) -> tuple[Float[Tensor, "batch k"], Float[Tensor, " batch"], Float[Tensor, "batch n"]]:
    """:func:`fit_logistic` (same keyword options) that also returns the fitted logits
    ``x @ coef + intercept`` of every row ``[batch, n]``; the Newton solver has them at hand, which
    saves a pass over x. `init_logits`: the logits of `init` when already known (a warm start from a
    fit on a nested support has the same logits), which saves another."""
    opts = {"C": 1.0, "sample_weight": None, "fit_intercept": True, "solver": "auto", "max_iter": 100, "tol": 1e-6,
            "init": None, "hessian_rows": None}
    unknown = set(options) - set(opts)
    if unknown:
        raise InputError(f"unknown options {sorted(unknown)}; expected some of {sorted(opts)}")
    opts.update(options)
    coef, b, z = _fit(x, y, *opts.values(), init_logits=init_logits)
    return coef, b, (predict_logits(x, coef, b) if z is None else z)


def _fit(x, y, C, sample_weight, fit_intercept, solver, max_iter, tol, init, hessian_rows, init_logits=None):
    if x.dim() != 3:
        raise InputError(f"x must be [batch, n, k]; got shape {tuple(x.shape)}. For one problem use x[None]")
    if solver not in ("auto", "newton", "lbfgs"):
        raise InputError(f"solver={solver!r}: expected 'auto', 'newton' or 'lbfgs'")
    x = x if x.dtype in (torch.float32, torch.float64) else x.float()
    check_finite(x, "x")
    bsz, n, k = x.shape
    shape = torch.empty(bsz, n, dtype=x.dtype, device=x.device)
    y = _broadcast(y.to(x.dtype) if isinstance(y, Tensor) else y, shape, "y")
    if ((y != 0) & (y != 1)).any():
        raise InputError(f"labels must be 0/1; got values {torch.unique(y)[:6].tolist()}")
    s = torch.ones_like(y) if sample_weight is None else _broadcast(sample_weight, shape, "sample_weight")
    if sample_weight is not None:
        check_weights(s)
    c = _broadcast(C, torch.empty(bsz, dtype=x.dtype, device=x.device), "C")
    if not bool(torch.isfinite(c).all()) or (c <= 0).any():
        bad = c[~torch.isfinite(c) | (c <= 0)]
        raise InputError(f"C must be > 0 and finite; got {bad[0].item()} (scikit-learn's C, the inverse L2 "
                         "strength, e.g. 1.0)")
    t = 2 * y - 1
    use_newton = solver == "newton" or (solver == "auto" and k + int(fit_intercept) <= NEWTON_MAX_K)
    if init is not None and (tuple(init[0].shape) != (bsz, k) or tuple(init[1].shape) != (bsz,)):
        raise InputError(f"init must be (coef [{bsz}, {k}], intercept [{bsz}]); got shapes "
                         f"{tuple(init[0].shape)} and {tuple(init[1].shape)}")
    if init_logits is not None and (init is None or tuple(init_logits.shape) != (bsz, n)):
        raise InputError(f"init_logits must come with init and be [{bsz}, {n}]; got "
                         f"{tuple(init_logits.shape)} (init given: {init is not None})")
    if use_newton:
        stride = max(1, -(-n // hessian_rows)) if hessian_rows else 1
        return _newton(x, t, s, c, fit_intercept, max_iter, tol, init, stride, init_logits)
    return (*_lbfgs(x, t, s, c, fit_intercept, max_iter, tol, init), None)


def _loss_at(z: Tensor, w: Tensor, t: Tensor, s: Tensor, c: Tensor) -> Tensor:
    """Objective ``[batch]`` given the logits ``z`` of ``(w, b)``."""
    return 0.5 * (w * w).sum(-1) + c * (s * F.softplus(-t * z)).sum(-1)


def _weighted_gram(x: Tensor, d: Tensor, chunk: int = 1024) -> Tensor:
    """``x^T diag(d) x`` per problem ``[batch, k, k]`` (x ``[batch, m, k]``, d ``[batch, m]``).

    On CPU and for wide k, accumulated over row blocks so that the weighted copy of each block
    stays in cache (about a third faster than one product with a full weighted copy).
    """
    k = x.shape[2]
    if x.device.type != "cpu" or k < 64:
        return torch.bmm(x.mT, x * d[:, :, None])
    h = x.new_zeros(x.shape[0], k, k)
    for i in range(x.shape[0]):
        for j in range(0, x.shape[1], chunk):
            xc = x[i, j:j + chunk]
            h[i].addmm_(xc.T, xc * d[i, j:j + chunk, None])
    return h


def _newton(x, t, s, c, fit_intercept, max_iter, tol, init=None, stride=1, z=None):
    """Damped Newton; returns ``(w, b, z)`` with ``z`` the final logits of every row ``[batch, n]``."""
    bsz, n, k = x.shape
    if init is None:
        w = torch.zeros(bsz, k, dtype=x.dtype, device=x.device)
        b = torch.zeros(bsz, dtype=x.dtype, device=x.device)
    else:
        w, b = (v.to(x.dtype).clone() for v in init)
    eye = torch.eye(k, dtype=torch.float64, device=x.device)
    scale = 1 + c * s.sum(-1)
    z = _mv(x, w) + b[:, None] if z is None else z.to(x.dtype)
    loss = _loss_at(z, w, t, s, c)
    # The Hessian needs only rows with a weight; when they come first (as the sweep orders them) a
    # slice reads them without a copy. Every `stride`-th of them for a sub-sampled Hessian.
    used = torch.nonzero(s.amax(0) > 0)[:, 0]
    prefix = len(used) == 0 or int(used[-1]) == len(used) - 1

    def hessian_rows(step):
        return (x[:, :len(used):step] if prefix else x.index_select(1, used[::step]),
                (lambda v: v[:, :len(used):step]) if prefix else (lambda v: v.index_select(1, used[::step])))

    xh, rows_of = hessian_rows(stride)
    chol, prev, fresh = None, None, False
    for _ in range(max_iter):
        p = torch.sigmoid(t * z)  # probability of the true label
        r = c[:, None] * s * (p - 1) * t  # d loss / d z
        d = c[:, None] * s * p * (1 - p) if chol is None else None  # d^2 loss / d z^2 (0 without weight)
        if chol is None and stride == 1:  # a Hessian is due: one pass gives the gradient and x^T d
            gw, hwb = torch.bmm(torch.stack([r, d], 1), x).unbind(1)
        else:
            gw, hwb = torch.bmm(r[:, None, :], x)[:, 0], None
        gw = gw + w
        gb = r.sum(-1)
        gmax = torch.maximum(gw.abs().amax(-1), gb.abs() if fit_intercept else torch.zeros_like(gb))
        if bool((gmax <= tol * scale).all()):
            break
        g = torch.cat([gw, gb[:, None]], 1).double() if fit_intercept else gw.double()
        # A Hessian is reused while it keeps cutting the gradient 4-fold (a chord step costs two
        # products with x; forming the Hessian costs k of them), and rebuilt when progress slows;
        # if even a fresh sub-sampled one cuts less than that, later ones use every row.
        if chol is None or bool((gmax > 0.25 * prev).any()):
            if fresh and stride > 1:
                stride = 1
                xh, rows_of = hessian_rows(1)
            d = c[:, None] * s * p * (1 - p) if d is None else d
            dh = rows_of(d)
            if stride > 1:  # rescale the sample to the full weight
                dh = dh * (d.sum(-1, keepdim=True) / dh.sum(-1, keepdim=True).clamp(min=1e-30))
            h = _weighted_gram(xh, dh).double() + eye
            if fit_intercept:
                hwb = (torch.bmm(dh[:, None, :], xh)[:, 0] if hwb is None or stride > 1 else hwb).double()
                hbb = dh.sum(-1).double() + 1e-12
                h = torch.cat([torch.cat([h, hwb[:, :, None]], 2),
                               torch.cat([hwb[:, None, :], hbb[:, None, None]], 2)], 1)
            chol, info = torch.linalg.cholesky_ex(h)
            if bool(info.any()):  # not positive definite in floating point: fall back to a damped solve
                chol = torch.linalg.cholesky(h + 1e-8 * h.diagonal(dim1=1, dim2=2).mean(-1)[:, None, None]
                                             * torch.eye(h.shape[1], dtype=h.dtype, device=h.device))
            fresh = True
        else:
            fresh = False
        prev = gmax
        step = -torch.cholesky_solve(g[:, :, None], chol)[:, :, 0]
        dw = step[:, :k].to(x.dtype)
        db = step[:, k].to(x.dtype) if fit_intercept else torch.zeros_like(b)
        dz = _mv(x, dw) + db[:, None]  # logits move linearly along the step
        slope = (g * step).sum(-1).to(x.dtype)  # negative for a descent direction
        alpha = torch.ones_like(b)
        todo = torch.ones_like(b, dtype=torch.bool)
        for _ in range(30):  # backtracking (Armijo) per problem
            new = _loss_at(z + alpha[:, None] * dz, w + alpha[:, None] * dw, t, s, c)
            ok = new <= loss + 1e-4 * alpha * slope + 1e-7 * loss.abs()
            todo = todo & ~ok
            if not bool(todo.any()):
                break
            alpha = torch.where(todo, alpha / 2, alpha)
        else:  # never accepted: the last halving is not evaluated yet
            new = _loss_at(z + alpha[:, None] * dz, w + alpha[:, None] * dw, t, s, c)
        w = w + alpha[:, None] * dw
        b = b + alpha * db
        z = z + alpha[:, None] * dz
        loss = new
    return w, b, z


def _lbfgs(x, t, s, c, fit_intercept, max_iter, tol, init=None):
    bsz, n, k = x.shape
    if init is None:
        init = (torch.zeros(bsz, k, dtype=x.dtype, device=x.device), torch.zeros(bsz, dtype=x.dtype, device=x.device))
    w = init[0].to(x.dtype).clone().requires_grad_(True)
    b = init[1].to(x.dtype).clone().requires_grad_(fit_intercept)
    norm = (c * s.sum(-1)).clamp(min=1.0)  # scale each problem to O(1) so one line search suits all
    params = [w, b] if fit_intercept else [w]
    opt = torch.optim.LBFGS(params, lr=1, max_iter=max_iter, tolerance_grad=tol, tolerance_change=1e-12,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = (_objective(x, t, s, c, w, b) / norm).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return w.detach(), b.detach()


def predict_logits(
    x: Float[Tensor, "*batch n k"], coef: Float[Tensor, "*batch k"], intercept: Float[Tensor, "*batch"]
) -> Float[Tensor, "*batch n"]:
    """Decision function ``x @ coef + intercept`` for one or a batch of problems."""
    x = x.to(coef.dtype)
    if x.dim() == 3 and coef.dim() == 2:
        return _mv(x, coef) + intercept.unsqueeze(-1)
    return (x @ coef.unsqueeze(-1)).squeeze(-1) + intercept.unsqueeze(-1)
