"""Supervised finders for categorical families: class-mean PCA (with a fitted circle) and LDA.

* :func:`class_mean_subspace` -- the mean activation of each class (weekday, month, ...), the top
  principal directions of those means, and for cyclic families a circle fitted through them: an
  angle per class, the cyclic order, and a leave-one-class-out angle error that says how well the
  circle predicts a class it has not seen.
* :func:`lda_subspace` -- Fisher discriminant directions (generalised eigenproblem of between- and
  shrunk within-class scatter), optionally with distractor directions projected out first.

Library choice: plain torch (an SVD of a ``[n_classes, d_model]`` matrix and one ``d_model``-sized
generalised eigenproblem) so the finders run on GPU and in bf16 inputs without a scikit-learn
dependency; scikit-learn's ``LinearDiscriminantAnalysis(solver="eigen")`` is the test oracle without
shrinkage. With shrinkage the two differ on purpose: here only the within-class scatter is shrunk and the
between-class scatter stays the class means' own, while scikit-learn takes the between-class scatter as the
shrunk total covariance minus the shrunk within-class one, which also shrinks it. Their directions then agree
to principal cosines of about 0.99 at ``shrinkage=0.1``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from interp.errors import InputError
from interp.features.circles import align_angles, cyclic_order, fit_circle, same_cyclic_order, wrap
from interp.subspace import CircleMap, Subspace, TableMap


def _check_acts(acts: Tensor, labels: Sequence) -> Tensor:
    acts = torch.as_tensor(acts)
    if acts.dim() != 2:
        raise InputError(f"acts must be [n, d_model] (one row per example); got shape {tuple(acts.shape)}; "
                         "capture with positions=... to get one vector per example")
    if len(labels) != acts.shape[0]:
        raise InputError(f"got {acts.shape[0]} activation rows but {len(labels)} labels; pass one label per row")
    if not torch.isfinite(acts).all():
        raise InputError("acts contain NaN or inf; check the capture (dtype overflow?)")
    return acts


def _classes(labels: Sequence[str], order: Sequence[str] | None) -> list[str]:
    present = list(dict.fromkeys(str(x) for x in labels))
    if order is None:
        return present
    order = [str(x) for x in order]
    missing = [c for c in order if c not in present]
    extra = [c for c in present if c not in order]
    if missing or extra or len(set(order)) != len(order):
        raise InputError(f"order must list every class exactly once; classes in labels: {present}; "
                         f"order: {order} (missing from labels: {missing}, not in order: {extra})")
    return order


def class_means(acts: Float[Tensor, "n d_model"], labels: Sequence[str],
                classes: Sequence[str]) -> Float[Tensor, "n_classes d_model"]:
    """Mean activation of each class, in float64 on the activations' device."""
    labels = [str(x) for x in labels]
    index = {c: i for i, c in enumerate(classes)}
    idx = torch.tensor([index[x] for x in labels], device=acts.device)
    sums = torch.zeros(len(classes), acts.shape[1], dtype=torch.float64, device=acts.device)
    sums.index_add_(0, idx, acts.double())
    counts = torch.bincount(idx, minlength=len(classes)).double()
    return sums / counts[:, None]


def _pca(means: Tensor, rank: int) -> tuple[Tensor, Tensor, Tensor]:
    """Origin, top-`rank` principal directions and explained-variance ratios of the rows."""
    origin = means.mean(0)
    _, s, vh = torch.linalg.svd(means - origin, full_matrices=False)
    var = s.pow(2)
    return origin, vh[:rank], var / var.sum()


def _loco_angle_errors(means: Tensor, ideal: Tensor) -> list[float]:
    """Leave one class out: refit plane + circle on the rest, predict the held-out class's angle."""
    errors = []
    n = len(means)
    for c in range(n):
        keep = [i for i in range(n) if i != c]
        origin, basis, _ = _pca(means[keep], 2)
        pts = (means - origin) @ basis.T
        fit = fit_circle(pts[keep])
        held = pts[c].double() - fit.center.double()
        angle = math.atan2(held[1].item(), held[0].item())
        sign, offset, _ = align_angles(fit.angles, ideal[keep])
        predicted = sign * ideal[c].item() + offset
        errors.append(abs(wrap(torch.tensor(angle - predicted)).item()))
    return errors


def class_mean_subspace(acts: Float[Tensor, "n d_model"], labels: Sequence[str], *, rank: int = 2,
                        circle: bool = True, order: Sequence[str] | None = None, name: str = "") -> Subspace:
    """Top principal directions of the class means, with a fitted circle for cyclic families.

    Args:
        acts: one activation per example, ``[n, d_model]``.
        labels: the class of each row (e.g. ``"Monday"``).
        rank: number of principal directions of the class means to keep.
        circle: fit a circle in the first two directions and attach a :class:`CircleMap` whose
            ``angles`` hold each class's fitted angle (``subspace.to_coords("Friday")`` is then a
            point on the circle); otherwise attach a :class:`TableMap` of the class-mean coordinates.
        order: the expected cyclic order of the classes (e.g. Monday..Sunday). Used to orient the
            circle (angles increase along it), to check the recovered order, and as the reference
            for the leave-one-class-out angle error. Without it, classes keep first-appearance
            order and the LOCO error is measured against the order the full fit found.

    Returns a :class:`Subspace` with origin = mean of the class means. ``meta`` holds
    ``classes``, ``explained_variance`` (of the class means, per direction), and for circles
    ``cyclic_order``, ``order_matches`` (None without `order`), ``radius_cv``,
    ``loco_angle_error`` (mean, radians) and ``loco_angle_errors`` (per class).
    """
    acts = _check_acts(acts, labels)
    classes = _classes(labels, order)
    n_cls = len(classes)
    if not 1 <= rank <= min(n_cls - 1, acts.shape[1]):
        raise InputError(f"rank must be in [1, n_classes - 1 = {n_cls - 1}] (and <= d_model); got {rank}")
    if circle and (rank < 2 or n_cls < 3):
        raise InputError(f"a circle needs rank >= 2 and at least 3 classes; got rank={rank}, "
                         f"{n_cls} classes; pass circle=False for a TableMap")
    means = class_means(acts, labels, classes).cpu()
    origin, basis, evr = _pca(means, rank)
    coords = (means - origin) @ basis.T
    flip = torch.where(coords[0] < 0, -1.0, 1.0).double()  # first class on the positive side
    basis, coords = basis * flip[:, None], coords * flip
    meta: dict = {"finder": "class_mean_pca", "classes": classes, "n_per_class":
                  [sum(str(x) == c for x in labels) for c in classes],
                  "explained_variance": [round(float(v), 6) for v in evr[:rank]]}
    if not circle:
        cmap = TableMap(classes, coords.float())
        return Subspace(basis.float(), origin.float(), cmap, name=name, meta=meta, orthonormalize=False)
    fit = fit_circle(coords[:, :2])
    angles = fit.angles.double()
    if order is not None:  # orient so that angles increase along `order`
        steps = wrap(angles.roll(-1) - angles)
        if steps.sum() < 0:
            basis[1], coords[:, 1] = -basis[1], -coords[:, 1]
            fit = fit_circle(coords[:, :2])
            angles = fit.angles.double()
    found = cyclic_order(classes, angles)
    reference = classes if order is not None else found
    ideal = torch.tensor([2 * math.pi * reference.index(c) / n_cls for c in classes], dtype=torch.float64)
    meta.update(cyclic_order=found, order_matches=same_cyclic_order(found, order) if order is not None else None,
                radius=fit.radius, radius_cv=fit.radius_cv, circle_fit=fit.method,
                angle_error=align_angles(angles, ideal)[2])
    if n_cls >= 4:
        errs = _loco_angle_errors(means, ideal)
        meta.update(loco_angle_error=sum(errs) / len(errs), loco_angle_errors=dict(zip(classes, errs)))
    cmap = CircleMap(fit.center.float(), float(fit.radius), {c: float(a) for c, a in zip(classes, angles)},
                     rank=rank)
    return Subspace(basis.float(), origin.float(), cmap, name=name, meta=meta, orthonormalize=False)


def _shrunk_cov(x: Tensor, shrinkage: float) -> Tensor:
    xc = x - x.mean(0)
    cov = xc.T @ xc / len(x)
    mu = torch.diagonal(cov).mean()
    return (1 - shrinkage) * cov + shrinkage * mu * torch.eye(len(cov), dtype=cov.dtype, device=cov.device)


def _orth_complement(x: Tensor, directions: Tensor | None) -> tuple[Tensor, Tensor | None]:
    if directions is None:
        return x, None
    q, _ = torch.linalg.qr(directions.T.to(x))
    return x - (x @ q) @ q.T, q


def lda_subspace(acts: Float[Tensor, "n d_model"], labels: Sequence[str], *, rank: int | None = None,
                 shrinkage: float = 0.1, distractors: Float[Tensor, "k d_model"] | Subspace | None = None,
                 name: str = "") -> Subspace:
    """Fisher LDA directions, with `distractors` projected out of the data and of the result.

    Args:
        rank: number of discriminant directions (default and maximum: n_classes - 1, and no more than the
            d_model - k dimensions left beside k independent distractors).
        shrinkage: weight in [0, 1] of ``trace(S_w)/d * I`` in the within-class covariance
            (as scikit-learn's ``shrinkage=float``; the between-class scatter is not shrunk, see the
            module docstring); needed when n is not much larger than d_model.
        distractors: directions (or a Subspace's basis) that must not be used, e.g. a token-identity
            or position direction; the returned basis is orthogonal to them.

    Returns a Subspace (origin: mean of the class means) with a :class:`TableMap` of the class
    means' coordinates; ``meta["eigenvalues"]`` holds the discriminant ratios.
    """
    acts = _check_acts(acts, labels)
    if not 0.0 <= shrinkage <= 1.0:
        raise InputError(f"shrinkage must be in [0, 1]; got {shrinkage}")
    classes = _classes(labels, None)
    n_cls = len(classes)
    if n_cls < 2:
        raise InputError(f"LDA needs at least 2 classes; labels hold {classes}")
    if isinstance(distractors, Subspace):
        distractors = distractors.basis
    x, q = _orth_complement(acts.double(), None if distractors is None else torch.as_tensor(distractors).double())
    # the directions live in the complement of the distractors' span: d_model minus the columns QR removed
    room = x.shape[1] - (0 if q is None else q.shape[1])
    top_rank = min(n_cls - 1, room)
    rank = top_rank if rank is None else rank
    if not 1 <= rank <= top_rank:
        raise InputError(f"rank must be in [1, min(n_classes - 1, d_model - number of distractors) = "
                         f"min({n_cls - 1}, {room})]; got {rank}")
    lab = [str(v) for v in labels]
    idx = torch.tensor([classes.index(v) for v in lab], device=x.device)
    priors = torch.bincount(idx, minlength=n_cls).double() / len(lab)
    means = class_means(x, lab, classes)
    sw = sum(priors[k] * _shrunk_cov(x[idx == k], shrinkage) for k in range(n_cls))
    centred = means - priors @ means
    sb = (centred * priors[:, None]).T @ centred
    if q is not None:  # keep the solve inside the complement: the distractor span gets no weight
        p = torch.eye(len(sw), dtype=sw.dtype, device=sw.device) - q @ q.T
        scale = torch.diagonal(sw).mean()
        sw = p @ sw @ p + scale * (q @ q.T)
        sb = p @ sb @ p
    if not float(torch.diagonal(sw).sum()) > 0:
        raise InputError(f"the activations do not vary within any class (n={len(x)}, d_model={x.shape[1]}): "
                         "LDA needs rows that vary; no shrinkage can help")
    # generalised eigenproblem sb v = lam sw v via a Cholesky whitening of sw
    try:
        chol = torch.linalg.cholesky(sw)
    except RuntimeError as e:
        raise InputError(f"within-class covariance is singular (n={len(x)}, d_model={x.shape[1]}); raise "
                         f"shrinkage above {shrinkage}") from e
    li = torch.linalg.solve_triangular(chol, torch.eye(len(sw), dtype=sw.dtype, device=sw.device), upper=False)
    evals, evecs = torch.linalg.eigh(li @ sb @ li.T)
    top = torch.argsort(evals, descending=True)[:rank]
    directions = (li.T @ evecs[:, top]).T  # [rank, d]
    if q is not None:
        directions = directions - (directions @ q) @ q.T
    basis = Subspace(directions.float().cpu()).basis  # orthonormalised, row directions kept
    means = class_means(acts.double(), lab, classes).float().cpu()
    origin = means.mean(0)
    coords = (means - origin) @ basis.T
    meta = {"finder": "lda", "classes": classes, "shrinkage": shrinkage,
            "eigenvalues": [float(v) for v in evals[top]], "n_distractors": 0 if q is None else q.shape[1]}
    sub = Subspace(basis, origin, TableMap(classes, coords), name=name, meta=meta, orthonormalize=False)
    return sub
