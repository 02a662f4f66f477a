"""Circle probe (Engels et al.): a linear map from activations to ``(cos a, sin a)`` of each class's angle.

Class-mean PCA (:func:`~interp.features.supervised.class_mean_subspace`) fits a round circle through
the class means and judges it against evenly spaced angles; where the means sit unevenly around the
circle (weekdays in the middle layers of small models) its leave-one-class-out error is large even
though the model reads the angle well. The circle probe asks the question the paper asks: is there a
linear read-out of the angle? It projects the activations on their top ``n_pcs`` principal components,
fits ``(cos a_c, sin a_c)`` of each row's class by least squares (ridge with ``alpha > 0``), and checks
the read-out on classes and templates it never saw:

* leave-one-class-out: refit without a class, read the held-out class's mean angle, compare with its
  target angle (no even-spacing assumption is needed: the target is the probe's own target);
* leave-one-template-out (with ``groups``): refit without a template, read every row of it.

The result is a :class:`~interp.subspace.Subspace` spanned by the probe's two read-out directions, with
a :class:`~interp.subspace.CircleMap` whose ``axes`` map the probe's (cos, sin) back into the plane, so
``Rotate(probe, to="Thursday")`` sets what the probe reads to Thursday, exactly as with the class-mean
circle. Library choice: scikit-learn's ``PCA`` and ``LinearRegression`` / ``Ridge``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from interp.errors import InputError
from interp.features.circles import cyclic_order, same_cyclic_order, wrap
from interp.features.supervised import _check_acts, _classes, class_mean_subspace
from interp.subspace import CircleMap, Subspace

N_PCS = 5
"""Principal components the probe reads by default (Engels et al. use 5)."""


def _fit(x: np.ndarray, target: np.ndarray, n_pcs: int, alpha: float):
    """PCA of `x` to `n_pcs` components, then a linear read-out of `target` ``[n, 2]``."""
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LinearRegression, Ridge

    k = min(n_pcs, x.shape[0] - 1, x.shape[1])
    pca = PCA(n_components=k, svd_solver="full").fit(x)
    reg = (Ridge(alpha=alpha) if alpha > 0 else LinearRegression()).fit(pca.transform(x), target)
    return pca, reg


def _read(pca, reg, x: np.ndarray) -> np.ndarray:
    return reg.predict(pca.transform(x))


def _angle_of(v: np.ndarray) -> float:
    return math.atan2(float(v[1]), float(v[0]))


def _err(a: float | np.ndarray, b: float | np.ndarray) -> np.ndarray | np.floating:
    return np.abs(wrap(torch.as_tensor(np.asarray(a) - np.asarray(b), dtype=torch.float64)).numpy())


def _target_angles(classes: list[str], angles, acts: Tensor, labels: Sequence[str]) -> dict[str, float]:
    n = len(classes)
    if angles is None:
        return {c: 2 * math.pi * i / n for i, c in enumerate(classes)}
    if isinstance(angles, str):
        if angles != "class_mean":
            raise InputError(f"angles={angles!r}: use None (evenly spaced along the order), 'class_mean' (the "
                             "class-mean circle's fitted angles) or a {class: radians} mapping")
        cm = class_mean_subspace(acts, labels, order=classes).coord_map
        return {c: float(cm.angles[c]) for c in classes}
    if not isinstance(angles, Mapping) or sorted(map(str, angles)) != sorted(classes):
        raise InputError(f"angles must map every class to radians; classes: {classes}; got "
                         f"{sorted(angles) if isinstance(angles, Mapping) else type(angles).__name__}")
    return {str(c): float(a) for c, a in angles.items()}


def circle_probe(acts: Float[Tensor, "n d_model"], labels: Sequence[str], *, order: Sequence[str] | None = None,
                 angles: Mapping[str, float] | str | None = None, n_pcs: int = N_PCS, alpha: float = 0.0,
                 groups: Sequence | None = None, name: str = "") -> Subspace:
    """A linear probe from activations to ``(cos, sin)`` of each class's angle, as a Subspace with a circle.

    Args:
        acts: one activation per example ``[n, d_model]``.
        labels: the class of each row (e.g. ``"Monday"``).
        order: the classes' cyclic order (e.g. Monday..Sunday); without it, first-appearance order.
        angles: each class's target angle: None (default) spaces them evenly along `order`
            (``2 pi i / n``); ``"class_mean"`` takes the class-mean circle's fitted angles (learned
            from the data, unevenly spaced where the means are); or a ``{class: radians}`` mapping.
        n_pcs: principal components of the activations the probe reads (capped at ``n - 1``).
        alpha: ridge penalty of the read-out; 0 is ordinary least squares (the paper's probe).
        groups: one id per row (e.g. the prompt template); adds the leave-one-template-out error.

    Returns a rank-2 Subspace (origin: the mean activation) spanned by the probe's read-out
    directions; its :class:`CircleMap` has ``axes`` (the probe's cos and sin directions in plane
    coordinates), ``radius`` (the class means' mean read-out radius) and ``angles`` (the angle the
    probe reads for each class mean), so ``subspace.predict(x)`` is the probe's angle for ``x``.
    ``meta`` holds ``target_angles``, ``r2`` (of cos and sin on the fit rows), ``angle_error`` (mean
    |error| of the class means' read angles, fit rows), ``loco_angle_error`` (mean over classes) and
    ``loco_angle_errors``, with `groups` ``loto_angle_error`` (mean |error| over rows of held-out
    templates) and ``loto_angle_errors`` (per template), ``cyclic_order`` and ``order_matches``.
    """
    acts = _check_acts(acts, labels)
    labels = [str(v) for v in labels]
    classes = _classes(labels, order)
    n_cls = len(classes)
    if n_cls < 3:
        raise InputError(f"a circle probe needs at least 3 classes; labels hold {classes}")
    if not n_pcs >= 2:
        raise InputError(f"n_pcs must be >= 2 (the probe reads a plane from them); got {n_pcs}")
    if alpha < 0:
        raise InputError(f"alpha must be >= 0 (0: least squares); got {alpha}")
    if groups is not None and len(groups) != len(labels):
        raise InputError(f"got {len(groups)} groups for {len(labels)} rows; pass one group (template id) per row")
    target = _target_angles(classes, angles, acts, labels)
    x = acts.double().cpu().numpy()
    if not x.var(0).sum() > 0:
        raise InputError(f"all {len(x)} activation rows are identical: a circle probe needs rows that vary")
    theta = np.array([target[v] for v in labels])
    y = np.stack([np.cos(theta), np.sin(theta)], 1)
    lab = np.array(labels)
    pca, reg = _fit(x, y, n_pcs, alpha)
    pred = _read(pca, reg, x)
    r2 = 1 - ((y - pred) ** 2).sum(0) / ((y - y.mean(0)) ** 2).sum(0)
    means = np.stack([x[lab == c].mean(0) for c in classes])
    read = _read(pca, reg, means)  # [n_cls, 2]: the probe's (cos, sin) at each class mean
    read_angles = {c: _angle_of(v) for c, v in zip(classes, read)}
    meta: dict = {"finder": "circle_probe", "classes": classes, "n_pcs": int(pca.n_components_), "alpha": alpha,
                  "angles_from": "order" if angles is None else (angles if isinstance(angles, str) else "given"),
                  "target_angles": target, "r2": [float(v) for v in r2],
                  "angle_error": float(np.mean([_err(read_angles[c], target[c]) for c in classes]))}
    found = cyclic_order(classes, torch.tensor([read_angles[c] for c in classes]))
    meta.update(cyclic_order=found, order_matches=same_cyclic_order(found, order) if order is not None else None)
    loco = {}
    for c in classes:  # leave one class out: refit on the others, read the held-out class's mean
        keep = lab != c
        p, r = _fit(x[keep], y[keep], n_pcs, alpha)
        loco[c] = float(_err(_angle_of(_read(p, r, x[lab == c].mean(0, keepdims=True))[0]), target[c]))
    meta.update(loco_angle_error=float(np.mean(list(loco.values()))), loco_angle_errors=loco)
    if groups is not None:
        g = np.array([str(v) for v in groups])
        per, total = {}, []
        for t in dict.fromkeys(g.tolist()):  # leave one template out: read every row of it
            keep = g != t
            if len(set(lab[keep])) < n_cls:
                continue
            p, r = _fit(x[keep], y[keep], n_pcs, alpha)
            v = _read(p, r, x[~keep])
            e = _err(np.arctan2(v[:, 1], v[:, 0]), theta[~keep])
            per[t], total = float(e.mean()), total + e.tolist()
        meta.update(loto_angle_error=float(np.mean(total)) if total else None, loto_angle_errors=per)
    # the plane: the read-out directions in d_model, orthonormalised; p = R^T c + b in plane coordinates c
    w = torch.as_tensor(pca.components_.T @ reg.coef_.T)  # [d_model, 2]: the read-out as a linear map on x
    q, rr = torch.linalg.qr(w)
    diag = torch.diagonal(rr).abs()
    if not bool(diag.min() > 1e-6 * diag.max()):
        raise InputError(f"the probe's read-out is degenerate (singular values of its plane {diag.tolist()}): the "
                         "activations carry no two-dimensional signal of the classes (identical or constant rows?)")
    basis = q.T  # [2, d_model]
    origin = torch.as_tensor(pca.mean_)
    b = torch.as_tensor(reg.intercept_)  # the read-out at the origin (PCA scores are centred there)
    axes = torch.linalg.inv(rr.T)  # circle (probe) coordinates -> plane coordinates
    center = -(axes @ b)
    radius = float(np.linalg.norm(read, axis=1).mean())
    cmap = CircleMap(center.float(), radius, {c: float(a) for c, a in read_angles.items()}, axes=axes.float())
    return Subspace(basis.float(), origin.float(), cmap, name=name, meta=meta, orthonormalize=False)
